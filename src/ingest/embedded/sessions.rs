//! rmqtt's session table ([`DefaultShared`]), wrapped twice: session
//! takeover that always succeeds, and a bound on the bytes the broker holds
//! for its subscribers.
//!
//! # Takeover
//!
//! A device that reconnects with its client id takes its session over:
//! rmqtt locks the client id for the handshake, asks the old session to
//! stop ("kick") and waits for its answer. rmqtt 0.24 refuses the new
//! CONNECT (Server unavailable: MQTT 5 0x88, 3.1.1 code 3) when
//!
//! * the old session ended just before the kick reached it: its task had
//!   left its loop but not yet dropped its channel, so the kick is queued,
//!   never read, and dropped with the channel; the kicker sees its answer
//!   channel closed (`recv kick result is RecvError`). By then the old
//!   session is gone, so kicking again finds its channel closed and simply
//!   removes what is left of it: [`TakeoverEntry::kick`] does that once;
//! * another CONNECT of the same client id holds the lock (a device that
//!   retries before its first attempt was answered): rmqtt fails at once;
//!   [`TakeoverEntry::try_lock`] waits for the lock instead, up to
//!   [`LOCK_PATIENCE`], so connects of one client id are served in turn,
//!   as Mosquitto serves them.
//!
//! # Memory limit
//!
//! Every message the broker routes to subscribers passes
//! [`Shared::forwards`]. There its payload is wrapped ([`Held`]) so that
//! its bytes count against `[local] memory_limit` for as long as any copy
//! of it is held anywhere (queued for online or offline sessions, in
//! flight), and are given back when the last copy is dropped; copies for
//! several subscribers share one payload, and count once. A message that
//! would go beyond the limit is not routed: dropped for every subscriber,
//! counted if it had any (`broker_dropped_memory_limit`) and logged at
//! most once a minute. The publisher is not refused: a device's message on a trigger
//! topic was already committed and is acknowledged as always; subscribers
//! of the built-in broker get at most what fits.
//!
//! Within that, each session holds at most `[local] max_queued_bytes`
//! ([`Queues`]): a message that would take one subscriber's session beyond
//! it is not routed to that subscriber (counted,
//! `broker_dropped_session_limit`), while the others get it. So a few
//! offline sessions cannot take the whole budget from the rest.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use crate::metrics::{Metrics, event};
use crate::text::Printable;
use crate::throttle::Throttle;
use async_trait::async_trait;
use bytes::Bytes;
use rmqtt::Result;
use rmqtt::codec::v5::RetainHandling;
use rmqtt::context::ServerContext;
use rmqtt::session::Session;
use rmqtt::shared::{DefaultShared, Entry, Shared};
use rmqtt::types::{
    ClientId, ForwardedCount, ForwardedRecipients, From, HealthInfo, Id, IsAdmin, MsgID,
    NodeHealthStatus, NodeId, OfflineSession, Publish, Reason, SessionStatus, SubRelations,
    SubRelationsMap, SubsSearchParams, SubsSearchResult, Subscribe, SubscribeReturn, To, Tx,
    Unsubscribe,
};

/// Longest a CONNECT waits for another CONNECT of its client id to finish
/// its handshake (which includes up to 5 s of kick).
pub(super) const LOCK_PATIENCE: Duration = Duration::from_secs(10);

/// How often a waiting CONNECT tries the lock again.
const LOCK_RETRY: Duration = Duration::from_millis(5);

/// rmqtt's session table, whose entries take sessions over reliably and
/// whose routing holds at most `limit` bytes of payloads.
pub(super) struct Sessions {
    /// rmqtt's own.
    pub(super) table: DefaultShared,
    /// What routed messages are held within.
    pub(super) budget: Arc<Budget>,
    /// What the entries need too.
    pub(super) cx: Arc<Around>,
}

/// What the session table's entries need besides rmqtt's own.
pub(super) struct Around {
    /// The broker: its router tells whether a message has subscribers.
    pub(super) scx: ServerContext,
    /// Whose read rights each message is routed by.
    pub(super) gate: Arc<super::access::Gate>,
    /// What each session holds.
    pub(super) queues: Arc<Queues>,
    /// Logins a connection limit refused.
    pub(super) limits: Arc<super::limits::Limits>,
}

/// Drops for a client's Maximum Packet Size, logged at most once a minute.
static TOO_LARGE_LOGGED: Throttle = Throttle::per_minute(1);

impl Around {
    /// Whether a PUBLISH of about `size` bytes fits the Maximum Packet Size
    /// `session`'s client announced (MQTT 5); if not, the message is not
    /// sent to it, as MQTT asks, and that is counted and logged.
    async fn fits(&self, session: &Session, size: usize, publish: &Publish) -> bool {
        let max = match session.connect_info().await.as_deref() {
            Ok(rmqtt::types::ConnectInfo::V5(_, connect)) => connect.max_packet_size,
            _ => None,
        };
        let Some(max) = max.filter(|max| size > max.get() as usize) else {
            return true;
        };
        event!(
            self.queues.metrics.broker_dropped_to_subscribers,
            warn,
            throttle = TOO_LARGE_LOGGED,
            client_id = %Printable(&session.id.client_id),
            topic = %Printable(&publish.topic),
            size,
            max = max.get(),
            "a message larger than a subscriber's Maximum Packet Size was not sent to it"
        );
        false
    }
}

/// About the size of `p` as a PUBLISH packet, never less: the fixed header
/// (at most 5 bytes), topic, packet id, properties and payload, with room
/// for a message expiry and a topic alias whether or not they are sent.
/// Each subscription identifier added per subscriber takes 5 bytes more.
pub(super) fn packet_size(p: &Publish) -> usize {
    let props = p.properties.as_ref().map_or(0, |pr| {
        let text = |t: Option<usize>| t.map_or(0, |len| 3 + len);
        let users: usize = pr
            .user_properties
            .iter()
            .map(|(k, v)| 5 + k.len() + v.len())
            .sum();
        // Payload format 2, message expiry 5, topic alias 3.
        10 + text(pr.correlation_data.as_ref().map(|d| d.len()))
            + text(pr.content_type.as_ref().map(|t| t.len()))
            + text(pr.response_topic.as_ref().map(|t| t.len()))
            + users
            + 5 * pr.subscription_ids.len()
    });
    // Fixed header, topic length, packet id, properties length.
    5 + 2 + p.topic.len() + 2 + 4 + props + p.payload.len()
}

/// `[local] max_queued_bytes`: the payload bytes held for each session
/// (queued while it is online or offline, in flight).
pub(super) struct Queues {
    /// Most bytes one session holds; `None` where that cannot bind (not
    /// below `memory_limit`), and nothing is counted per session.
    limit: Option<usize>,
    /// Bytes held per client id.
    held: Mutex<SessionCounts>,
    /// Where drops are counted.
    metrics: Arc<Metrics>,
}

/// Bytes held per client id. An entry stays (at 0) while anything may
/// count in it, so that routing a message and dropping it take no lock
/// and allocate no entry; entries nothing refers to are swept as the map
/// outgrows twice what it held at the last sweep.
struct SessionCounts {
    /// The counts.
    counts: HashMap<ClientId, Arc<AtomicUsize>>,
    /// Size at which the next sweep runs.
    sweep_at: usize,
}

/// Entries the per-session counts hold before their first sweep.
const FIRST_SWEEP: usize = 1024;

/// A payload counted for one session until dropped.
struct QueuedFor {
    /// The payload (itself counted in the broker's [`Budget`]).
    payload: Bytes,
    /// The session's count.
    count: Arc<AtomicUsize>,
}

impl AsRef<[u8]> for QueuedFor {
    fn as_ref(&self) -> &[u8] {
        &self.payload
    }
}

impl Drop for QueuedFor {
    fn drop(&mut self) {
        self.count.fetch_sub(self.payload.len(), Ordering::Relaxed);
    }
}

/// Drops for a session's limit, logged at most once a minute.
static SESSION_LIMIT_LOGGED: Throttle = Throttle::per_minute(1);

impl Queues {
    /// Each session within `limit` bytes, the broker within `memory_limit`.
    pub(super) fn new(limit: usize, memory_limit: usize, metrics: Arc<Metrics>) -> Queues {
        Queues {
            limit: (limit < memory_limit).then_some(limit),
            held: Mutex::new(SessionCounts {
                counts: HashMap::new(),
                sweep_at: FIRST_SWEEP,
            }),
            metrics,
        }
    }

    /// `publish` with its payload (`payload`) counted for `client_id`'s
    /// session until its last copy is dropped; false (counted and logged)
    /// if it does not fit.
    fn count_for(&self, client_id: &ClientId, publish: &mut Publish, payload: &Bytes) -> bool {
        let Some(limit) = self.limit else {
            return true;
        };
        let len = payload.len();
        let count = {
            let mut held = self.held.lock().unwrap_or_else(PoisonError::into_inner);
            if held.counts.len() >= held.sweep_at {
                held.counts
                    .retain(|_, c| Arc::strong_count(c) > 1 || c.load(Ordering::Relaxed) > 0);
                held.sweep_at = (2 * held.counts.len()).max(FIRST_SWEEP);
            }
            match held.counts.get(client_id) {
                Some(count) => count.clone(),
                None => {
                    let count = Arc::new(AtomicUsize::new(0));
                    held.counts.insert(client_id.clone(), count.clone());
                    count
                }
            }
        };
        let fits = count
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |now| {
                (now.saturating_add(len) <= limit).then_some(now + len)
            })
            .is_ok();
        if !fits {
            event!(
                self.metrics.broker_dropped_session_limit,
                warn,
                throttle = SESSION_LIMIT_LOGGED,
                client_id = %Printable(client_id),
                topic = %Printable(&publish.topic),
                size = len,
                limit,
                "a session of the built-in broker holds local.max_queued_bytes: a message was not routed to it"
            );
            return false;
        }
        publish.inner.payload = Bytes::from_owner(QueuedFor {
            payload: payload.clone(),
            count,
        });
        true
    }
}

/// `[local] memory_limit`: the payload bytes the broker holds for its
/// clients (routed, queued, in flight, retained).
pub(super) struct Budget {
    /// The payload bytes held now are `metrics.broker_held_bytes`.
    pub(super) limit: usize,
    /// Where the held bytes and the drops are counted.
    pub(super) metrics: Arc<Metrics>,
}

/// A payload whose bytes count as held until it is dropped.
struct Held {
    /// The payload.
    payload: Bytes,
    /// Bytes counted besides the payload's (a retained message's topic).
    extra: usize,
    /// Where it is counted.
    metrics: Arc<Metrics>,
}

impl AsRef<[u8]> for Held {
    fn as_ref(&self) -> &[u8] {
        &self.payload
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        self.metrics
            .broker_held_bytes
            .fetch_sub((self.payload.len() + self.extra) as u64, Ordering::Relaxed);
    }
}

/// Drops for the memory limit, logged at most once a minute.
static LIMIT_LOGGED: Throttle = Throttle::per_minute(1);

impl Budget {
    /// `payload` counted as held until its last copy is dropped, or `None`
    /// if it does not fit.
    pub(super) fn hold(&self, payload: Bytes) -> Option<Bytes> {
        self.hold_with(payload, 0)
    }

    /// [`Budget::hold`], counting `extra` bytes besides the payload's.
    pub(super) fn hold_with(&self, payload: Bytes, extra: usize) -> Option<Bytes> {
        let len = (payload.len() + extra) as u64;
        let held = &self.metrics.broker_held_bytes;
        held.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |now| {
            (now.saturating_add(len) <= self.limit as u64).then_some(now + len)
        })
        .ok()?;
        Some(Bytes::from_owner(Held {
            payload,
            extra,
            metrics: self.metrics.clone(),
        }))
    }
}

impl Sessions {
    /// [`DefaultShared::forwards`] (on one node, without a message store),
    /// each subscriber getting the message within its session's
    /// `max_queued_bytes`, and those the ACL does not let read the topic
    /// left out.
    async fn forwards_within(
        &self,
        from: From,
        mut publish: Publish,
    ) -> std::result::Result<ForwardedCount, (ForwardedCount, Vec<(To, From, Publish, Reason)>)>
    {
        let node = self.cx.scx.node.id();
        let mut relations = match self
            .cx
            .scx
            .extends
            .router()
            .await
            .matches(from.id.clone(), &publish.topic)
            .await
        {
            Ok(mut map) => map.remove(&node).unwrap_or_default(),
            Err(e) => {
                tracing::warn!(error = %e, topic = %Printable(&publish.topic), "cannot match subscribers");
                return Ok(0);
            }
        };
        let acl = self.cx.gate.has_acl();
        // Only when a client announced a Maximum Packet Size this message
        // could exceed is each subscriber's looked up for it.
        let size = packet_size(&publish);
        // With room for 16 subscription identifiers (each subscriber's own).
        let sized = self.cx.limits.may_exceed(size + 5 * 16);
        if acl || sized {
            let mut kept = Vec::with_capacity(relations.len());
            for relation in relations {
                let id = Id::new(node, 0, None, None, relation.1.clone(), None);
                // A session gone meanwhile is reported by `forwards_to` as usual.
                if let Some(session) = self.table.entry(id).session() {
                    if acl && !self.cx.gate.may_read(&session, &publish.topic) {
                        continue;
                    }
                    let ids = relation.3.as_ref().map_or(0, Vec::len);
                    if sized && !self.cx.fits(&session, size + 5 * ids, &publish).await {
                        continue;
                    }
                }
                kept.push(relation);
            }
            relations = kept;
        }
        let (mut forwarded, mut errors) = (0, Vec::new());
        let payload = publish.payload.clone();
        for relation in relations {
            if !self
                .cx
                .queues
                .count_for(&relation.1, &mut publish, &payload)
            {
                continue;
            }
            match self
                .table
                .forwards_to(from.clone(), &publish, vec![relation], None)
                .await
            {
                Ok(recipients) => forwarded += recipients.len(),
                Err((recipients, errs)) => {
                    forwarded += recipients.len();
                    errors.extend(errs);
                }
            }
        }
        if errors.is_empty() {
            Ok(forwarded)
        } else {
            Err((forwarded, errors))
        }
    }
}

/// One client id's entry of the session table, with the gate whose read
/// rights the messages published to it directly (retained ones, as it
/// subscribes) are checked against.
struct TakeoverEntry(Box<dyn Entry>, Arc<Around>);

impl TakeoverEntry {
    /// rmqtt's lock of this client id, waiting up to [`LOCK_PATIENCE`] for
    /// another CONNECT of it to finish.
    async fn lock_in_turn(&self) -> Result<Box<dyn Entry>> {
        let deadline = Instant::now() + LOCK_PATIENCE;
        loop {
            match self.0.try_lock().await {
                Ok(locked) => {
                    let entry = TakeoverEntry(locked, self.1.clone());
                    return Ok(Box::new(entry));
                }
                Err(e) if Instant::now() >= deadline => return Err(e),
                Err(_) => tokio::time::sleep(LOCK_RETRY).await,
            }
        }
    }
}

#[async_trait]
impl Entry for TakeoverEntry {
    /// Called by rmqtt only as a client logs in, after its authentication:
    /// a login a connection limit refused stops here, with CONNACK Server
    /// unavailable (see `limits`).
    async fn try_lock(&self) -> Result<Box<dyn Entry>> {
        let id = self.0.id();
        if let Some(over) = self.1.limits.refusal(&id) {
            return Err(anyhow::anyhow!("{}", over.as_str()));
        }
        let locked = self.lock_in_turn().await;
        if locked.is_err() {
            self.1.limits.forget(&id);
        }
        locked
    }

    fn id(&self) -> Id {
        self.0.id()
    }

    fn id_same(&self) -> Option<bool> {
        self.0.id_same()
    }

    async fn set(&mut self, session: Session, tx: Tx) -> Result<()> {
        self.0.set(session, tx).await
    }

    async fn remove(&mut self) -> Result<Option<(Session, Tx)>> {
        self.0.remove().await
    }

    async fn remove_with(&mut self, id: &Id) -> Result<Option<(Session, Tx)>> {
        self.0.remove_with(id).await
    }

    async fn kick(
        &mut self,
        mut clean_start: bool,
        mut clear_subscriptions: bool,
        is_admin: IsAdmin,
    ) -> Result<OfflineSession> {
        // A session goes on only with the user it was made for: a client of
        // another user with the same client id starts afresh (as with
        // Mosquitto), or it would receive what was queued under the old
        // user's read rights.
        if let Some(old) = self.0.session()
            && old.username() != self.0.id().username.as_ref()
        {
            clean_start = true;
            clear_subscriptions = true;
        }
        match self
            .0
            .kick(clean_start, clear_subscriptions, is_admin)
            .await
        {
            Ok(offline) => Ok(offline),
            Err(e) => {
                tracing::debug!(
                    client_id = %crate::text::Printable(&self.0.id().client_id),
                    error = %e,
                    "the old session ended during the takeover; removing what is left of it"
                );
                self.0
                    .kick(clean_start, clear_subscriptions, is_admin)
                    .await
            }
        }
    }

    async fn online(&self) -> bool {
        self.0.online().await
    }

    async fn is_connected(&self) -> bool {
        self.0.is_connected().await
    }

    fn session(&self) -> Option<Session> {
        self.0.session()
    }

    fn exist(&self) -> bool {
        self.0.exist()
    }

    fn tx(&self) -> Option<Tx> {
        self.0.tx()
    }

    /// Subscribes, then queues the retained messages the subscription
    /// brings before anything routed to it later can pass them: rmqtt
    /// would send them from a task of its own (see
    /// [`Sessions::retain_load_with`]), which a live message published
    /// right after the SUBACK overtakes, so a device could end up with an
    /// older retained state after a newer one.
    async fn subscribe(&self, subscribe: &Subscribe) -> Result<SubscribeReturn> {
        let answer = self.0.subscribe(subscribe).await?;
        let Some(granted) = answer.success() else {
            return Ok(answer);
        };
        // MQTT 5: retained messages go to no shared subscription, and as its retain handling says.
        let opts = &subscribe.opts;
        let wanted = match opts.retain_handling() {
            Some(RetainHandling::AtSubscribe) | None => true,
            Some(RetainHandling::AtSubscribeNew) => answer.prev_opts.is_none(),
            Some(RetainHandling::NoAtSubscribe) => false,
        };
        if !wanted || opts.has_shared_group() {
            return Ok(answer);
        }
        let retained = self
            .1
            .scx
            .extends
            .retain()
            .await
            .get(&subscribe.topic_filter)
            .await?;
        for (topic, mut retain) in retained {
            // As rmqtt's `_send_retain_messages` prepares them.
            let p = &mut retain.publish;
            p.dup = false;
            p.retain = true;
            p.qos = p.qos.less_value(granted);
            p.topic = topic;
            p.packet_id = None;
            p.create_time = Some(rmqtt::utils::timestamp_millis());
            if let Err((from, p, reason)) = self.publish(retain.from, retain.publish).await {
                let hooks = self.1.scx.extends.hook_mgr();
                hooks
                    .message_dropped(Some(self.id()), from, p, reason)
                    .await;
            }
        }
        Ok(answer)
    }

    async fn unsubscribe(&self, unsubscribe: &Unsubscribe) -> Result<bool> {
        self.0.unsubscribe(unsubscribe).await
    }

    async fn publish(
        &self,
        from: From,
        mut p: Publish,
    ) -> std::result::Result<(), (From, Publish, Reason)> {
        if let Some(session) = self.0.session() {
            if !self.1.gate.may_read(&session, &p.topic) {
                return Ok(());
            }
            let size = packet_size(&p);
            if self.1.limits.may_exceed(size) && !self.1.fits(&session, size, &p).await {
                return Ok(());
            }
        }
        let payload = p.payload.clone();
        if !self
            .1
            .queues
            .count_for(&self.0.id().client_id, &mut p, &payload)
        {
            return Ok(());
        }
        self.0.publish(from, p).await
    }

    async fn subscriptions(&self) -> Option<Vec<SubsSearchResult>> {
        self.0.subscriptions().await
    }
}

#[async_trait]
impl Shared for Sessions {
    fn entry(&self, id: Id) -> Box<dyn Entry> {
        Box::new(TakeoverEntry(self.table.entry(id), self.cx.clone()))
    }

    fn exist(&self, client_id: &str) -> bool {
        self.table.exist(client_id)
    }

    async fn forwards(
        &self,
        msg_id: Option<MsgID>,
        from: From,
        mut publish: Publish,
    ) -> std::result::Result<ForwardedCount, (ForwardedCount, Vec<(To, From, Publish, Reason)>)>
    {
        let payload = std::mem::take(&mut publish.inner.payload);
        let size = payload.len();
        match self.budget.hold(payload) {
            Some(held) => publish.inner.payload = held,
            None => {
                // A message nobody subscribed to is not held anyway: nothing to count.
                let subscribed = match self
                    .cx
                    .scx
                    .extends
                    .router()
                    .await
                    .matches(from.id.clone(), &publish.inner.topic)
                    .await
                {
                    Ok(relations) => relations.values().any(|r| !r.is_empty()),
                    Err(_) => true,
                };
                if !subscribed {
                    return Ok(0);
                }
                event!(
                    self.budget.metrics.broker_dropped_memory_limit,
                    warn,
                    throttle = LIMIT_LOGGED,
                    topic = %Printable(&publish.inner.topic),
                    size,
                    limit = self.budget.limit,
                    "the built-in broker holds local.memory_limit for its subscribers: a message was not routed to them"
                );
                return Ok(0);
            }
        }
        if matches!(from.typ(), rmqtt::types::FromType::LastWill)
            && !self
                .cx
                .gate
                .may_publish_will(&from.id, &publish.inner.topic, false)
        {
            return Ok(0);
        }
        if publish.target_clientid.is_some() {
            return self.table.forwards(msg_id, from, publish).await;
        }
        self.forwards_within(from, publish).await
    }

    async fn forwards_and_get_shareds(
        &self,
        from: From,
        publish: Publish,
    ) -> std::result::Result<
        (SubRelationsMap, ForwardedRecipients),
        (ForwardedRecipients, Vec<(To, From, Publish, Reason)>),
    > {
        self.table.forwards_and_get_shareds(from, publish).await
    }

    async fn forwards_to(
        &self,
        from: From,
        publish: &Publish,
        relations: SubRelations,
        msg_id: Option<MsgID>,
    ) -> std::result::Result<
        ForwardedRecipients,
        (ForwardedRecipients, Vec<(To, From, Publish, Reason)>),
    > {
        self.table
            .forwards_to(from, publish, relations, msg_id)
            .await
    }

    fn iter(&self) -> Box<dyn Iterator<Item = Box<dyn Entry>> + Sync + Send + '_> {
        Box::new(self.table.iter().map(|e| {
            let entry = TakeoverEntry(e, self.cx.clone());
            Box::new(entry) as Box<dyn Entry>
        }))
    }

    /// Nothing: each subscription's retained messages were queued as it was
    /// made ([`TakeoverEntry::subscribe`]), in order with what followed.
    async fn retain_load_with(
        &self,
        _topic_filter: &rmqtt::types::TopicFilter,
        _cb: Arc<dyn rmqtt::shared::RetainLoadCallback>,
    ) -> Result<Vec<(NodeId, MsgID)>> {
        Ok(Vec::new())
    }

    fn random_session(&self) -> Option<Session> {
        self.table.random_session()
    }

    async fn session_status(&self, client_id: &str) -> Option<SessionStatus> {
        self.table.session_status(client_id).await
    }

    async fn client_states_count(&self) -> usize {
        self.table.client_states_count().await
    }

    fn sessions_count(&self) -> usize {
        self.table.sessions_count()
    }

    async fn query_subscriptions(&self, q: &SubsSearchParams) -> Vec<SubsSearchResult> {
        self.table.query_subscriptions(q).await
    }

    async fn subscriptions_count(&self) -> usize {
        self.table.subscriptions_count().await
    }

    fn node_name(&self, id: NodeId) -> String {
        self.table.node_name(id)
    }

    async fn check_health(&self) -> Result<HealthInfo> {
        self.table.check_health().await
    }

    async fn health_status(&self) -> Result<NodeHealthStatus> {
        self.table.health_status().await
    }

    fn operation_is_busy(&self) -> bool {
        self.table.operation_is_busy()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rmqtt::types::{CodecPublish, QoS};

    fn publish() -> Publish {
        Publish::from(CodecPublish {
            dup: false,
            retain: false,
            qos: QoS::AtLeastOnce,
            topic: "t".into(),
            packet_id: None,
            payload: Bytes::new(),
            properties: None,
        })
    }

    #[test]
    fn a_session_holds_at_most_its_bytes_and_gets_them_back_as_copies_go() {
        let metrics = Arc::new(Metrics::default());
        let queues = Queues::new(10, 100, metrics.clone());
        let (a, b) = (ClientId::from("a"), ClientId::from("b"));
        let six = Bytes::from_static(b"123456");
        let mut first = publish();
        assert!(queues.count_for(&a, &mut first, &six));
        assert_eq!(&first.payload[..], b"123456");
        // Twelve bytes would be more than a's ten; b has its own.
        assert!(!queues.count_for(&a, &mut publish(), &six));
        assert!(queues.count_for(&b, &mut publish(), &six));
        // A copy held elsewhere (in flight, queued) still counts.
        let copy = first.clone();
        drop(first);
        assert!(!queues.count_for(&a, &mut publish(), &six));
        drop(copy);
        assert!(queues.count_for(&a, &mut publish(), &six));
        assert_eq!(
            metrics.broker_dropped_session_limit.load(Ordering::Relaxed),
            2
        );
    }

    #[test]
    fn a_session_limit_not_below_the_memory_limit_counts_nothing() {
        let queues = Queues::new(100, 100, Arc::new(Metrics::default()));
        let big = Bytes::from(vec![0u8; 1000]);
        let mut p = publish();
        assert!(queues.count_for(&ClientId::from("a"), &mut p, &big));
        assert!(p.payload.is_empty(), "the payload is left as it was");
    }

    #[test]
    fn counts_nothing_refers_to_are_swept_as_the_map_grows() {
        let queues = Queues::new(10, 100, Arc::new(Metrics::default()));
        let one = Bytes::from_static(b"1");
        let mut kept = publish();
        assert!(queues.count_for(&ClientId::from("kept"), &mut kept, &one));
        for i in 0..2 * FIRST_SWEEP {
            let id = ClientId::from(format!("gone-{i}"));
            assert!(queues.count_for(&id, &mut publish(), &one));
        }
        let held = queues.held.lock().unwrap();
        assert!(
            held.counts.len() <= FIRST_SWEEP + 1,
            "{}",
            held.counts.len()
        );
        assert!(held.counts.contains_key("kept"));
    }
}
