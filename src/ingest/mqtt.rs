//! Ingest from an existing broker (Mosquitto) as an MQTT 5 client.
//!
//! - **Persistent session**: clean start off and a non-zero session expiry,
//!   so the broker queues device messages while edgefn is down and
//!   redelivers unacknowledged ones after a reconnect.
//! - **Receive Maximum = `in_flight`**: an MQTT 5 client's Receive Maximum
//!   replaces Mosquitto's `max_inflight_messages` (20 by default), so
//!   hundreds of messages can wait in one group commit.
//! - **Manual acks after commit**: a PUBACK is sent only when the pipeline
//!   completes the delivery's [`Ack`]. Mosquitto never resends within a
//!   connection, so a commit that fails is retried by the pipeline, never
//!   acked early.
//! - **One client per connection**: every (re)connect builds a fresh
//!   `AsyncClient`/`EventLoop` pair and a fresh ack channel. Acks go back
//!   through the channel of the connection their message came on; when that
//!   connection is gone the channel is closed and late acks are discarded,
//!   so a packet id reused by the broker on the new connection can never be
//!   acknowledged by mistake.
//! - **No ack is ever dropped on a live connection**: the broker may send
//!   more unacknowledged messages than Receive Maximum allows (Mosquitto
//!   2.0.11 does, by thousands, while it holds a backlog: each PUBACK
//!   releases up to a window more, `db__message_delete_outgoing` in its
//!   `src/database.c`). rumqttc's request channel is bounded and its event
//!   loop takes one request per turn against up to ten incoming packets, so
//!   acks can outrun it. The ingest task therefore keeps acks the client
//!   has no room for in its own queue (two bytes and a QoS each) and hands
//!   them over, in commit order, as the event loop drains. An ack lost here
//!   would leave the message in the broker's in-flight window for the life
//!   of the connection, and a broker that never resends stalls behind it.
//! - **No stale subscriptions**: a persistent session keeps its
//!   subscriptions across restarts, so a trigger removed from the config
//!   would stay subscribed, and the broker would go on queueing, against
//!   edgefn's queue limit, messages no function wants. MQTT cannot list a
//!   session's subscriptions, so the filters the session may hold are
//!   remembered in the store ([`SessionFilters`]); after a CONNACK with the
//!   session present, those no function uses any more are unsubscribed,
//!   and once the broker confirmed it they are forgotten.
//! - **Subscriptions follow the functions**: when a function is installed
//!   or removed while connected, the new triggers are subscribed to and
//!   those no function uses any more unsubscribed (the same bookkeeping);
//!   every CONNACK subscribes to the current set.
//! - **Broker drops are reported**: Mosquitto's
//!   `$SYS/broker/publish/messages/dropped` is watched and every increase is
//!   logged and counted.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::{Filter, Packet, Publish};
use rumqttc::v5::{AsyncClient, Event, MqttOptions};
use tokio::sync::{mpsc, watch};

use super::{Ack, Delivery};
use crate::config::BrokerClientConfig;
use crate::metrics::{Metrics, event};
use crate::registry::Filters;
use crate::runtime::Emitted;
use crate::shutdown::Backoff;
use crate::store::SessionFilters;

/// Mosquitto's counter of messages it dropped (queue limits, size).
pub const SYS_DROPPED: &str = "$SYS/broker/publish/messages/dropped";

/// How soon a (UN)SUBSCRIBE the client had no room for is tried again.
const FOLLOW_RETRY: Duration = Duration::from_millis(20);

/// An acknowledgement the pipeline released and the ingest task has not
/// yet handed to the MQTT client.
#[derive(Debug, Clone, Copy)]
pub struct PendingAck {
    /// The packet id of the message.
    pub pkid: u16,
    /// Its QoS (what kind of ack it takes).
    qos: QoS,
}

/// Acks released by the pipeline for one connection, handed to its client
/// in order as the client's bounded request channel has room.
struct AckQueue {
    /// Where completed [`Ack`]s arrive; closed when the connection ends.
    rx: mpsc::UnboundedReceiver<PendingAck>,
    /// Cloned into every [`Ack`] made on this connection.
    tx: mpsc::UnboundedSender<PendingAck>,
    /// Released acks the client had no room for yet, oldest first.
    waiting: VecDeque<PendingAck>,
}

impl AckQueue {
    fn new() -> AckQueue {
        let (tx, rx) = mpsc::unbounded_channel();
        AckQueue {
            rx,
            tx,
            waiting: VecDeque::new(),
        }
    }

    /// Moves every released ack into the client, until it is full.
    fn hand_over(&mut self, client: &AsyncClient) {
        while let Ok(a) = self.rx.try_recv() {
            self.waiting.push_back(a);
        }
        while let Some(a) = self.waiting.front() {
            let mut stub = Publish::new("", a.qos, Bytes::new(), None);
            stub.pkid = a.pkid;
            if client.try_ack(&stub).is_err() {
                // Full (the event loop takes them as it turns) or closed
                // (the connection is gone and the broker redelivers).
                break;
            }
            self.waiting.pop_front();
        }
    }
}

/// A function's publish on its way to the local broker.
struct LocalPublish {
    /// Topic as the function gave it.
    topic: String,
    /// Payload, shared between attempts.
    payload: Bytes,
}

impl From<Emitted> for LocalPublish {
    fn from(e: Emitted) -> LocalPublish {
        LocalPublish {
            topic: e.topic,
            payload: e.payload.into(),
        }
    }
}

/// What the ingest task needs.
pub struct MqttIngest {
    /// The broker and session settings.
    pub broker: BrokerClientConfig,
    /// Topic filters to subscribe to (the union of all triggers), followed
    /// as functions are installed and removed.
    pub filters: watch::Receiver<Filters>,
    /// Filters the session may hold that no function uses any more:
    /// unsubscribed after the next CONNACK with the session present, or
    /// at once when a change of `filters` drops them.
    pub stale: Vec<String>,
    /// Where the session's filters are remembered across restarts.
    pub session_filters: SessionFilters,
    /// Largest payload; the broker is told (MQTT 5 Maximum Packet Size) not
    /// to send packets much larger, and the pipeline refuses larger payloads.
    pub max_message_size: usize,
    /// Where deliveries go (capacity at least `in_flight`). Dropped when
    /// shutdown begins, which lets the pipeline drain.
    pub deliveries: Option<mpsc::Sender<Delivery>>,
    /// Messages functions publish to the local broker.
    pub publishes: mpsc::Receiver<Emitted>,
    /// Gateway counters.
    pub metrics: Arc<Metrics>,
}

impl MqttIngest {
    fn options(&self) -> MqttOptions {
        let b = &self.broker;
        let mut o = crate::broker_client::options(b, self.max_message_size);
        o.set_clean_start(false)
            .set_session_expiry_interval(Some(
                b.session_expiry.as_secs().min(u32::MAX as u64) as u32
            ))
            .set_receive_maximum(Some(b.in_flight))
            .set_manual_acks(true);
        o
    }

    /// Runs until `shutdown` turns true, reconnecting with backoff.
    ///
    /// On shutdown it stops taking messages but keeps the connection up
    /// until `drained` turns true (the pipeline has committed and acked
    /// what it holds) or a few seconds pass, then disconnects.
    pub async fn run(
        mut self,
        mut shutdown: watch::Receiver<bool>,
        mut drained: watch::Receiver<bool>,
    ) {
        let mut backoff = Backoff::new(Duration::from_millis(250), Duration::from_secs(30));
        let mut sys_dropped: Option<u64> = None;
        'connections: loop {
            if *shutdown.borrow() {
                return;
            }
            if self.deliveries.is_none() {
                return;
            }
            // Room for a window of acks plus publishes; more wait in `acks`.
            let cap = usize::from(self.broker.in_flight) + 64;
            let (client, mut events) = AsyncClient::new(self.options(), cap);
            let mut acks = AckQueue::new();
            // A function's publish the client had no room for yet.
            let mut held: Option<LocalPublish> = None;
            let mut draining = false;
            // UNSUBACKs still to come for the stale filters.
            let mut unsubscribing = 0;
            // What this connection subscribed to (the filters of the
            // functions), once connected.
            let mut subscribed: Option<Vec<String>> = None;
            // The filters of each SUBSCRIBE not yet answered, oldest first
            // (the broker answers in order).
            let mut asked: VecDeque<Vec<String>> = VecDeque::new();
            // False once the registry is gone (shutting down).
            let mut following = true;
            // A (UN)SUBSCRIBE found the client's request queue full (it is
            // shared with the acks): tried again shortly.
            let mut follow_again = false;
            loop {
                acks.hand_over(&client);
                if let Some(p) = held.take() {
                    held = self.publish_locally(&client, p);
                }
                tokio::select! {
                    changed = shutdown.changed(), if !draining => {
                        if changed.is_err() || *shutdown.borrow() {
                            draining = true;
                            self.deliveries = None;
                        }
                    }
                    _ = crate::shutdown::stopped(&mut drained), if draining => {
                        // Let the event loop write every ack, then DISCONNECT.
                        let _ = tokio::time::timeout(Duration::from_secs(2), async {
                            loop {
                                acks.hand_over(&client);
                                if acks.waiting.is_empty() {
                                    break;
                                }
                                if events.poll().await.is_err() {
                                    return;
                                }
                            }
                            let _ = client.try_disconnect();
                            while events.poll().await.is_ok() {}
                        })
                        .await;
                        return;
                    }
                    changed = self.filters.changed(), if subscribed.is_some() && following => {
                        match (changed, subscribed.as_mut()) {
                            (Ok(()), Some(now)) => {
                                let (sent, done) = self.follow_filters(&client, now, &mut asked);
                                unsubscribing += sent;
                                follow_again = !done;
                            }
                            _ => following = false,
                        }
                    }
                    _ = tokio::time::sleep(FOLLOW_RETRY), if follow_again && following => {
                        if let Some(now) = subscribed.as_mut() {
                            let (sent, done) = self.follow_filters(&client, now, &mut asked);
                            unsubscribing += sent;
                            follow_again = !done;
                        }
                    }
                    Some(p) = self.publishes.recv(), if !draining && held.is_none() => {
                        held = self.publish_locally(&client, LocalPublish::from(p));
                    }
                    // Wakes the loop to hand acks over as they are released.
                    Some(a) = acks.rx.recv() => acks.waiting.push_back(a),
                    event = events.poll() => match event {
                        Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                            backoff.reset();
                            Metrics::add(&self.metrics.local_connects, 1);
                            tracing::info!(
                                host = %self.broker.host,
                                port = self.broker.port,
                                session_present = ack.session_present,
                                "connected to the local broker"
                            );
                            let wanted = self.filters.borrow_and_update().to_vec();
                            let mut filters = qos1(&wanted);
                            filters.push(Filter::new(SYS_DROPPED, QoS::AtMostOnce));
                            asked.clear();
                            let sent = client.try_subscribe_many(filters);
                            if let Err(e) = &sent {
                                tracing::warn!(error = %e, "could not subscribe yet; trying again");
                            } else {
                                asked.push_back(wanted.clone());
                            }
                            unsubscribing = 0;
                            self.stale.retain(|f| !wanted.contains(f));
                            if !ack.session_present {
                                // A new session holds only what was just asked for.
                                self.forget_stale(&wanted);
                            }
                            for f in &self.stale {
                                match client.try_unsubscribe(f.as_str()) {
                                    Ok(()) => unsubscribing += 1,
                                    Err(e) => tracing::error!(error = %e, filter = f, "could not unsubscribe"),
                                }
                            }
                            // What was sent; the rest follows as soon as the
                            // client has room.
                            follow_again = sent.is_err();
                            subscribed = Some(if sent.is_ok() { wanted } else { Vec::new() });
                        }
                        Ok(Event::Incoming(Packet::UnsubAck(_))) if unsubscribing > 0 => {
                            unsubscribing -= 1;
                            if unsubscribing == 0 {
                                tracing::info!(
                                    filters = ?self.stale,
                                    "unsubscribed from filters no function uses any more"
                                );
                                let now = subscribed.clone().unwrap_or_default();
                                self.forget_stale(&now);
                            }
                        }
                        Ok(Event::Incoming(Packet::SubAck(ack))) => {
                            let filters = asked.pop_front().unwrap_or_default();
                            let mut granted = 0;
                            for (filter, code) in filters.iter().zip(&ack.return_codes) {
                                if matches!(code, rumqttc::v5::mqttbytes::v5::SubscribeReasonCode::Success(_)) {
                                    granted += 1;
                                } else {
                                    event!(self.metrics.local_subscriptions_refused, error, filter, ?code, "the local broker refused a subscription");
                                }
                            }
                            Metrics::add(&self.metrics.local_subscriptions_granted, granted);
                            tracing::info!(granted, filters = filters.len(), "subscribed");
                        }
                        Ok(Event::Incoming(Packet::Publish(p))) => {
                            if draining {
                                // Not acked: the broker keeps it for the next run.
                                continue;
                            }
                            self.on_publish(&acks.tx, p, &mut sys_dropped).await;
                        }
                        Ok(Event::Incoming(Packet::Disconnect(d))) => {
                            tracing::warn!(reason = ?d.reason_code, "the local broker disconnected us");
                        }
                        Ok(_) => {}
                        Err(e) => {
                            if draining {
                                return;
                            }
                            let delay = backoff.next_delay();
                            tracing::warn!(error = %e, retry_in = ?delay, "local broker connection lost");
                            drop(client);
                            tokio::select! {
                                _ = tokio::time::sleep(delay) => {}
                                _ = crate::shutdown::stopped(&mut shutdown) => return,
                            }
                            continue 'connections;
                        }
                    }
                }
            }
        }
    }

    /// The session holds no stale filters (any more): remember only
    /// `subscribed`.
    fn forget_stale(&mut self, subscribed: &[String]) {
        self.stale.clear();
        self.session_filters
            .save(&self.broker.session_name(), subscribed.to_vec());
    }

    /// Brings the connection's subscriptions from `subscribed` to the
    /// current `filters`: subscribes to the new ones, unsubscribes from
    /// those no function uses any more (stale until the broker confirms).
    /// Returns how many UNSUBSCRIBEs it sent, and whether it sent all it
    /// had to: the client's request queue, shared with the acks, may be
    /// full, and what did not fit is sent on the next call.
    fn follow_filters(
        &mut self,
        client: &AsyncClient,
        subscribed: &mut Vec<String>,
        asked: &mut VecDeque<Vec<String>>,
    ) -> (usize, bool) {
        let wanted = self.filters.borrow_and_update().to_vec();
        let added: Vec<String> = wanted
            .iter()
            .filter(|f| !subscribed.contains(f))
            .cloned()
            .collect();
        let removed: Vec<String> = subscribed
            .iter()
            .filter(|f| !wanted.contains(f))
            .cloned()
            .collect();
        // What the session holds once the broker has answered what is sent
        // now: a request the client had no room for is not in it, and is
        // sent again on the next try.
        let mut now: Vec<String> = subscribed.clone();
        let mut done = true;
        if !added.is_empty() {
            match client.try_subscribe_many(qos1(&added)) {
                Ok(()) => {
                    asked.push_back(added.clone());
                    now.extend(added.iter().cloned());
                }
                Err(e) => {
                    tracing::warn!(error = %e, "could not subscribe yet; trying again");
                    done = false;
                }
            }
        }
        self.stale.retain(|f| !wanted.contains(f));
        let mut sent = 0;
        for f in &removed {
            match client.try_unsubscribe(f.as_str()) {
                Ok(()) => {
                    sent += 1;
                    now.retain(|n| n != f);
                }
                Err(e) => {
                    tracing::warn!(error = %e, filter = f, "could not unsubscribe yet; trying again");
                    done = false;
                }
            }
            if !self.stale.contains(f) {
                self.stale.push(f.clone());
            }
        }
        // Until the broker confirms, the session may hold both.
        self.session_filters.save(
            &self.broker.session_name(),
            wanted.iter().chain(&self.stale).cloned().collect(),
        );
        if !added.is_empty() || !removed.is_empty() {
            tracing::info!(?added, ?removed, "the functions' triggers changed");
        }
        *subscribed = now;
        (sent, done)
    }

    /// Hands a function's publish to the client; gives it back if the
    /// client has no room (the caller holds it and tries again after the
    /// event loop turns, taking no new publishes meanwhile).
    fn publish_locally(&self, client: &AsyncClient, p: LocalPublish) -> Option<LocalPublish> {
        // The payload is shared, not copied, between attempts.
        match client.try_publish(p.topic.clone(), QoS::AtLeastOnce, false, p.payload.clone()) {
            Ok(()) => None,
            Err(_) => Some(p),
        }
    }

    async fn on_publish(
        &self,
        acks: &mpsc::UnboundedSender<PendingAck>,
        p: Publish,
        sys_dropped: &mut Option<u64>,
    ) {
        if p.topic.as_ref() == SYS_DROPPED.as_bytes() {
            self.on_sys_dropped(&p.payload, sys_dropped);
            return;
        }
        let needs_ack = p.qos != QoS::AtMostOnce;
        let topic = match std::str::from_utf8(&p.topic) {
            Ok(t) => t.to_owned(),
            Err(_) => {
                // MQTT forbids this; a broker that sends it anyway gets the
                // message acked so it does not come back forever.
                tracing::warn!("dropped a message whose topic is not UTF-8");
                if needs_ack {
                    Ack::mqtt(
                        acks.clone(),
                        PendingAck {
                            pkid: p.pkid,
                            qos: p.qos,
                        },
                    )
                    .complete();
                }
                return;
            }
        };
        let ack = if needs_ack {
            Ack::mqtt(
                acks.clone(),
                PendingAck {
                    pkid: p.pkid,
                    qos: p.qos,
                },
            )
        } else {
            Ack::nothing()
        };
        // The channel holds at least `in_flight` deliveries and the broker
        // sends at most that many unacked QoS 1 messages, so this waits
        // only under a QoS 0 flood.
        if let Some(deliveries) = &self.deliveries {
            let _ = deliveries
                .send(Delivery {
                    topic,
                    payload: p.payload,
                    ack,
                    replay: None,
                })
                .await;
        }
    }

    fn on_sys_dropped(&self, payload: &[u8], last: &mut Option<u64>) {
        match sys_dropped(payload, last) {
            SysDropped::SinceStart(n) => tracing::warn!(
                dropped = n,
                "the local broker has dropped messages since it started (all clients); \
                 see docs/DELIVERY.md for the mosquitto.conf settings that prevent this"
            ),
            SysDropped::Increase { by, total } => {
                event!(
                    by => self.metrics.broker_dropped,
                    warn,
                    dropped = by,
                    total,
                    "the local broker dropped messages before edgefn could receive them"
                );
            }
            SysDropped::Nothing => {}
        }
    }
}

/// What a `$SYS/broker/publish/messages/dropped` value means.
#[derive(Debug, PartialEq, Eq)]
enum SysDropped {
    /// Not a number, or no change.
    Nothing,
    /// First value seen this run, non-zero: drops before edgefn connected
    /// (or by other clients) since the broker started.
    SinceStart(u64),
    /// The counter grew while edgefn was watching.
    Increase {
        /// By how much.
        by: u64,
        /// Its new value.
        total: u64,
    },
}

/// Interprets one `$SYS` dropped-counter message, given the last value.
/// A smaller value means the broker restarted: it becomes the new baseline.
/// `filters` at QoS 1, for a SUBSCRIBE.
fn qos1(filters: &[String]) -> Vec<Filter> {
    filters
        .iter()
        .map(|f| Filter::new(f.as_str(), QoS::AtLeastOnce))
        .collect()
}

fn sys_dropped(payload: &[u8], last: &mut Option<u64>) -> SysDropped {
    let Some(now) = std::str::from_utf8(payload)
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
    else {
        return SysDropped::Nothing;
    };
    let seen = match *last {
        None if now > 0 => SysDropped::SinceStart(now),
        Some(before) if now > before => SysDropped::Increase {
            by: now - before,
            total: now,
        },
        _ => SysDropped::Nothing,
    };
    *last = Some(now);
    seen
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn broker_drops_are_reported_once_each() {
        let mut last = None;
        assert_eq!(sys_dropped(b"0", &mut last), SysDropped::Nothing);
        assert_eq!(sys_dropped(b"0", &mut last), SysDropped::Nothing);
        assert_eq!(
            sys_dropped(b"12", &mut last),
            SysDropped::Increase { by: 12, total: 12 }
        );
        assert_eq!(sys_dropped(b"12", &mut last), SysDropped::Nothing);
        assert_eq!(sys_dropped(b"garbage", &mut last), SysDropped::Nothing);
        // The broker restarted: a new baseline, nothing invented.
        assert_eq!(sys_dropped(b"3", &mut last), SysDropped::Nothing);
        assert_eq!(
            sys_dropped(b"5", &mut last),
            SysDropped::Increase { by: 2, total: 5 }
        );
        let mut fresh = None;
        assert_eq!(sys_dropped(b"40", &mut fresh), SysDropped::SinceStart(40));
    }
}
