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

use std::sync::Arc;
use std::sync::atomic::Ordering;
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
    ForwardedCount, ForwardedRecipients, From, HealthInfo, Id, IsAdmin, MsgID, NodeHealthStatus,
    NodeId, OfflineSession, Publish, Reason, SessionStatus, SubRelations, SubRelationsMap,
    SubsSearchParams, SubsSearchResult, Subscribe, SubscribeReturn, To, Tx, Unsubscribe,
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
    /// The broker: its router tells whether a message has subscribers.
    pub(super) scx: ServerContext,
    /// What routed messages are held within.
    pub(super) budget: Arc<Budget>,
    /// Whose read rights each message is routed by.
    pub(super) gate: Arc<super::access::Gate>,
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
    /// [`DefaultShared::forwards`] (on one node, without a message store)
    /// with the subscribers the ACL does not let read the topic left out.
    async fn forwards_readable(
        &self,
        from: From,
        publish: Publish,
    ) -> std::result::Result<ForwardedCount, (ForwardedCount, Vec<(To, From, Publish, Reason)>)>
    {
        let node = self.scx.node.id();
        let mut relations = match self
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
        relations.retain(|(_, client_id, ..)| {
            let id = Id::new(node, 0, None, None, client_id.clone(), None);
            // A session gone meanwhile is reported by `forwards_to` as usual.
            self.table
                .entry(id)
                .session()
                .is_none_or(|s| self.gate.may_read(&s, &publish.topic))
        });
        if relations.is_empty() {
            return Ok(0);
        }
        match self
            .table
            .forwards_to(from, &publish, relations, None)
            .await
        {
            Ok(recipients) => Ok(recipients.len()),
            Err((recipients, errs)) => Err((recipients.len(), errs)),
        }
    }
}

/// One client id's entry of the session table, with the gate whose read
/// rights the messages published to it directly (retained ones, as it
/// subscribes) are checked against.
struct TakeoverEntry(Box<dyn Entry>, Arc<super::access::Gate>, ServerContext);

#[async_trait]
impl Entry for TakeoverEntry {
    async fn try_lock(&self) -> Result<Box<dyn Entry>> {
        let deadline = Instant::now() + LOCK_PATIENCE;
        loop {
            match self.0.try_lock().await {
                Ok(locked) => {
                    let entry = TakeoverEntry(locked, self.1.clone(), self.2.clone());
                    return Ok(Box::new(entry));
                }
                Err(e) if Instant::now() >= deadline => return Err(e),
                Err(_) => tokio::time::sleep(LOCK_RETRY).await,
            }
        }
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
            .2
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
                let hooks = self.2.extends.hook_mgr();
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
        p: Publish,
    ) -> std::result::Result<(), (From, Publish, Reason)> {
        if let Some(session) = self.0.session()
            && !self.1.may_read(&session, &p.topic)
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
        Box::new(TakeoverEntry(
            self.table.entry(id),
            self.gate.clone(),
            self.scx.clone(),
        ))
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
                .gate
                .may_publish_will(&from.id, &publish.inner.topic, false)
        {
            return Ok(0);
        }
        if publish.target_clientid.is_some() || !self.gate.has_acl() {
            return self.table.forwards(msg_id, from, publish).await;
        }
        self.forwards_readable(from, publish).await
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
            Box::new(TakeoverEntry(e, self.gate.clone(), self.scx.clone())) as Box<dyn Entry>
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
