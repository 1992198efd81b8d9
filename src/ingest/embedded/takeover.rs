//! Session takeover that always succeeds: rmqtt's session table
//! ([`DefaultShared`]) with the two ways its takeover refuses a reconnect
//! closed.
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
//! Everything else is rmqtt's own table, unchanged.

use std::time::{Duration, Instant};

use async_trait::async_trait;
use rmqtt::Result;
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

/// rmqtt's session table, whose entries take sessions over reliably.
pub(super) struct Takeover(pub(super) DefaultShared);

/// One client id's entry of [`Takeover`].
struct TakeoverEntry(Box<dyn Entry>);

#[async_trait]
impl Entry for TakeoverEntry {
    async fn try_lock(&self) -> Result<Box<dyn Entry>> {
        let deadline = Instant::now() + LOCK_PATIENCE;
        loop {
            match self.0.try_lock().await {
                Ok(locked) => return Ok(Box::new(TakeoverEntry(locked))),
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
        clean_start: bool,
        clear_subscriptions: bool,
        is_admin: IsAdmin,
    ) -> Result<OfflineSession> {
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

    async fn subscribe(&self, subscribe: &Subscribe) -> Result<SubscribeReturn> {
        self.0.subscribe(subscribe).await
    }

    async fn unsubscribe(&self, unsubscribe: &Unsubscribe) -> Result<bool> {
        self.0.unsubscribe(unsubscribe).await
    }

    async fn publish(
        &self,
        from: From,
        p: Publish,
    ) -> std::result::Result<(), (From, Publish, Reason)> {
        self.0.publish(from, p).await
    }

    async fn subscriptions(&self) -> Option<Vec<SubsSearchResult>> {
        self.0.subscriptions().await
    }
}

#[async_trait]
impl Shared for Takeover {
    fn entry(&self, id: Id) -> Box<dyn Entry> {
        Box::new(TakeoverEntry(self.0.entry(id)))
    }

    fn exist(&self, client_id: &str) -> bool {
        self.0.exist(client_id)
    }

    async fn forwards(
        &self,
        msg_id: Option<MsgID>,
        from: From,
        publish: Publish,
    ) -> std::result::Result<ForwardedCount, (ForwardedCount, Vec<(To, From, Publish, Reason)>)>
    {
        self.0.forwards(msg_id, from, publish).await
    }

    async fn forwards_and_get_shareds(
        &self,
        from: From,
        publish: Publish,
    ) -> std::result::Result<
        (SubRelationsMap, ForwardedRecipients),
        (ForwardedRecipients, Vec<(To, From, Publish, Reason)>),
    > {
        self.0.forwards_and_get_shareds(from, publish).await
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
        self.0.forwards_to(from, publish, relations, msg_id).await
    }

    fn iter(&self) -> Box<dyn Iterator<Item = Box<dyn Entry>> + Sync + Send + '_> {
        Box::new(
            self.0
                .iter()
                .map(|e| Box::new(TakeoverEntry(e)) as Box<dyn Entry>),
        )
    }

    fn random_session(&self) -> Option<Session> {
        self.0.random_session()
    }

    async fn session_status(&self, client_id: &str) -> Option<SessionStatus> {
        self.0.session_status(client_id).await
    }

    async fn client_states_count(&self) -> usize {
        self.0.client_states_count().await
    }

    fn sessions_count(&self) -> usize {
        self.0.sessions_count()
    }

    async fn query_subscriptions(&self, q: &SubsSearchParams) -> Vec<SubsSearchResult> {
        self.0.query_subscriptions(q).await
    }

    async fn subscriptions_count(&self) -> usize {
        self.0.subscriptions_count().await
    }

    fn node_name(&self, id: NodeId) -> String {
        self.0.node_name(id)
    }

    async fn check_health(&self) -> Result<HealthInfo> {
        self.0.check_health().await
    }

    async fn health_status(&self) -> Result<NodeHealthStatus> {
        self.0.health_status().await
    }

    fn operation_is_busy(&self) -> bool {
        self.0.operation_is_busy()
    }
}
