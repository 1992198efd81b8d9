//! Forward: the outbox, in order, to the upstream broker; delete on PUBACK.
//!
//! SQLite is the source of truth. rumqttc's `publish()` returning Ok only
//! means *queued*; the packet id appears later as
//! `Event::Outgoing(Outgoing::Publish(pkid))` and the broker's answer as
//! `Incoming(PubAck(pkid))`. So the forwarder:
//!
//! - publishes records in `seq` order at QoS 1 with at most `in_flight`
//!   awaiting their PUBACK, each with the MQTT 5 user property
//!   `edgefn-id = <gateway id>:<seq>` so the cloud side can drop duplicates;
//! - takes records from the store's in-memory recent tail while it keeps
//!   up, and reads SQLite only to catch up (after a reconnect, a restart or
//!   an overflow of the tail), in batches of at least half a window;
//! - learns each record's packet id from the `Outgoing::Publish` events,
//!   which come in the order the publishes were queued, and keeps the
//!   `pkid → record` map for the current connection only;
//! - reports a record for deletion only after its PUBACK, in batches; the
//!   store's writer deletes them in its next transaction;
//! - builds a fresh client for every connection and, after every CONNACK,
//!   publishes again every record still in the outbox, from the oldest.
//!   Records sent before but not acknowledged are counted as `resent`
//!   (possible duplicates upstream);
//! - moves a record the broker refuses (an error reason code in the
//!   PUBACK, e.g. not authorised) to the dead letters rather than retrying
//!   it forever or dropping it silently.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rumqttc::Outgoing;
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::{Packet, PubAckReason, PublishProperties};
use rumqttc::v5::{AsyncClient, Event, MqttOptions};
use tokio::sync::{Notify, watch};

use crate::config::UpstreamConfig;
use crate::ingest::Backoff;
use crate::metrics::Metrics;
use crate::store::{Outbox, Reader, Record};

/// Acknowledged records are reported for deletion once this many have
/// gathered, or at the next [`FLUSH_INTERVAL`] tick, whichever comes first:
/// while devices are quiet, each report costs the writer a transaction, so
/// batching them saves flash writes.
const DELETE_BATCH: usize = 256;

/// How often acknowledged records are reported when fewer than
/// [`DELETE_BATCH`] gathered, and how often the outbox is polled as a
/// fallback to the commit notification.
const FLUSH_INTERVAL: Duration = Duration::from_millis(100);

/// The MQTT 5 user property carrying a record's stable id.
pub const ID_PROPERTY: &str = "edgefn-id";

/// A published record awaiting its PUBACK.
#[derive(Debug, Clone, Copy)]
struct InFlight {
    /// Outbox position.
    seq: i64,
    /// Bytes it counts against the buffer.
    size: u64,
}

/// The forwarding task.
pub struct Forwarder {
    /// Upstream broker and prefix.
    pub config: UpstreamConfig,
    /// For record ids.
    pub gateway_id: String,
    /// The outbox (blocking calls run on the blocking pool).
    pub reader: Arc<Mutex<Reader>>,
    /// Records just committed (in memory), and where PUBACKed ones go.
    pub outbox: Outbox,
    /// Woken after commits that added records.
    pub committed: Arc<Notify>,
    /// Gateway counters.
    pub metrics: Arc<Metrics>,
}

/// Per-connection state.
struct Connection {
    /// The connection's client.
    client: AsyncClient,
    /// Published, packet id not yet known (in publish order).
    unnumbered: VecDeque<InFlight>,
    /// Packet id → record, this connection only.
    by_pkid: HashMap<u16, InFlight>,
    /// Highest seq published on this connection.
    cursor: i64,
    /// Whether CONNACK arrived.
    connected: bool,
    /// The broker's Maximum Packet Size (CONNACK), if it announced one.
    max_packet: Option<u32>,
}

impl Connection {
    fn in_flight(&self) -> usize {
        self.unnumbered.len() + self.by_pkid.len()
    }
}

impl Forwarder {
    fn options(&self) -> MqttOptions {
        let mut o =
            crate::broker_client::options(&self.config.broker, self.config.max_message_size);
        // The outbox, not the broker session, holds what is unacknowledged.
        o.set_clean_start(true);
        o
    }

    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Reader) -> T + Send + 'static,
    ) -> T {
        let reader = self.reader.clone();
        tokio::task::spawn_blocking(move || f(&mut reader.lock().expect("reader lock")))
            .await
            .expect("store task panicked")
    }

    /// Runs until `shutdown` turns true.
    pub async fn run(self, mut shutdown: watch::Receiver<bool>) {
        let mut backoff = Backoff::new(Duration::from_millis(250), Duration::from_secs(30));
        let mut acked: Vec<i64> = Vec::new();
        // Highest seq ever handed to a client: records at or below it that
        // are sent again may be duplicates upstream.
        let mut sent_before: i64 = 0;
        let mut tick = tokio::time::interval(FLUSH_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let window = usize::from(self.config.broker.in_flight);
        loop {
            if *shutdown.borrow() {
                self.flush(&mut acked);
                return;
            }
            let (client, mut events) = AsyncClient::new(self.options(), window + 16);
            let mut conn = Connection {
                client,
                unnumbered: VecDeque::new(),
                by_pkid: HashMap::new(),
                cursor: 0,
                connected: false,
                max_packet: None,
            };
            let lost = loop {
                tokio::select! {
                    _ = crate::ingest::stopped(&mut shutdown) => {
                        self.flush(&mut acked);
                        let _ = conn.client.try_disconnect();
                        let _ = tokio::time::timeout(Duration::from_secs(1), async {
                            while events.poll().await.is_ok() {}
                        }).await;
                        return;
                    }
                    _ = self.committed.notified(), if conn.connected => {
                        self.fill(&mut conn, window, &mut sent_before).await;
                    }
                    _ = tick.tick() => {
                        self.flush(&mut acked);
                        if conn.connected {
                            self.fill(&mut conn, window, &mut sent_before).await;
                        }
                    }
                    event = events.poll() => match event {
                        Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                            conn.max_packet = ack.properties.and_then(|p| p.max_packet_size);
                            backoff.reset();
                            Metrics::add(&self.metrics.upstream_connects, 1);
                            tracing::info!(
                                host = %self.config.broker.host,
                                port = self.config.broker.port,
                                "connected upstream"
                            );
                            // Report what was acknowledged, so that
                            // republishing from the oldest record skips it.
                            self.flush(&mut acked);
                            conn.connected = true;
                            self.fill(&mut conn, window, &mut sent_before).await;
                        }
                        Ok(Event::Outgoing(Outgoing::Publish(pkid))) => {
                            if let Some(r) = conn.unnumbered.pop_front() {
                                conn.by_pkid.insert(pkid, r);
                            }
                        }
                        Ok(Event::Incoming(Packet::PubAck(ack))) => {
                            if let Some(r) = conn.by_pkid.remove(&ack.pkid) {
                                match ack.reason {
                                    PubAckReason::Success | PubAckReason::NoMatchingSubscribers => {
                                        acked.push(r.seq);
                                    }
                                    reason => self.reject(r, &format!("upstream refused: {reason:?}")).await,
                                }
                            }
                            if acked.len() >= DELETE_BATCH {
                                self.flush(&mut acked);
                            }
                            self.fill(&mut conn, window, &mut sent_before).await;
                        }
                        Ok(Event::Incoming(Packet::Disconnect(d))) => {
                            tracing::warn!(reason = ?d.reason_code, "the upstream broker disconnected us");
                        }
                        Ok(_) => {}
                        Err(e) => break e,
                    }
                }
            };
            let delay = backoff.next_delay();
            tracing::warn!(error = %lost, retry_in = ?delay, pending = conn.in_flight(), "upstream connection lost");
            drop(conn);
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = crate::ingest::stopped(&mut shutdown) => {}
            }
        }
    }

    /// Publishes records after the cursor until the window is full.
    async fn fill(&self, conn: &mut Connection, window: usize, sent_before: &mut i64) {
        loop {
            let room = window.saturating_sub(conn.in_flight());
            if room == 0 {
                return;
            }
            let records = match self.outbox.take(conn.cursor, room) {
                Some(records) => records,
                None => {
                    // Catching up from SQLite: a query per half window,
                    // not per PUBACK.
                    if conn.in_flight() > 0 && room < window.div_ceil(2) {
                        return;
                    }
                    let after = conn.cursor;
                    match self.blocking(move |r| r.after(after, room)).await {
                        Ok(r) => r,
                        Err(e) => {
                            tracing::error!(error = %e, "cannot read the outbox");
                            return;
                        }
                    }
                }
            };
            if records.is_empty() {
                return;
            }
            for r in records {
                if let Some(max) = conn.max_packet
                    && self.packet_size(&r) > max as usize
                {
                    // It can never be sent to this broker: retrying would
                    // block everything behind it.
                    conn.cursor = r.seq;
                    let why =
                        format!("larger than the upstream's maximum packet size ({max} bytes)");
                    self.reject(
                        InFlight {
                            seq: r.seq,
                            size: r.size(),
                        },
                        &why,
                    )
                    .await;
                    continue;
                }
                let seq = r.seq;
                if !self.publish(conn, r) {
                    return;
                }
                if seq <= *sent_before {
                    Metrics::add(&self.metrics.resent, 1);
                }
                *sent_before = (*sent_before).max(seq);
            }
        }
    }

    /// An upper bound of the PUBLISH packet size for `r`.
    fn packet_size(&self, r: &Record) -> usize {
        // Fixed header (≤ 5), topic length (2), packet id (2), properties
        // (length ≤ 4, user property: 1 + 2 + key + 2 + value ≤ 64).
        self.config.topic_prefix.len()
            + r.topic.len()
            + r.payload.len()
            + 80
            + self.gateway_id.len()
    }

    /// Queues `r` on the connection; false if the client has no room (it
    /// stays in the outbox and is read again from there).
    fn publish(&self, conn: &mut Connection, r: Record) -> bool {
        let topic = format!("{}{}", self.config.topic_prefix, r.topic);
        let props = PublishProperties {
            user_properties: vec![(
                ID_PROPERTY.to_owned(),
                format!("{}:{}", self.gateway_id, r.seq),
            )],
            ..Default::default()
        };
        let in_flight = InFlight {
            seq: r.seq,
            size: r.size(),
        };
        match conn.client.try_publish_with_properties(
            topic,
            QoS::AtLeastOnce,
            false,
            r.payload,
            props,
        ) {
            Ok(()) => {
                conn.unnumbered.push_back(in_flight);
                conn.cursor = r.seq;
                true
            }
            Err(e) => {
                tracing::warn!(error = %e, seq = r.seq, "could not queue a record upstream");
                false
            }
        }
    }

    /// Reports acknowledged records to the store for deletion.
    fn flush(&self, acked: &mut Vec<i64>) {
        if acked.is_empty() {
            return;
        }
        self.outbox.acknowledged(acked);
        Metrics::add(&self.metrics.forwarded, acked.len() as u64);
        acked.clear();
    }

    async fn reject(&self, r: InFlight, why: &str) {
        Metrics::add(&self.metrics.upstream_rejected, 1);
        tracing::error!(
            seq = r.seq,
            reason = why,
            "a record cannot be delivered upstream; moved to the dead letters"
        );
        let why = why.to_owned();
        if let Err(e) = self
            .blocking(move |rd| rd.reject(r.seq, r.size, &why))
            .await
        {
            tracing::error!(error = %e, seq = r.seq, "cannot move a refused record to the dead letters");
        }
    }
}
