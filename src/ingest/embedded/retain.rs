//! Retained messages: rmqtt's topic tree for matching, SQLite to outlive
//! restarts, and the broker's byte budget.
//!
//! * A retained PUBLISH replaces what its topic held; an empty one clears
//!   it. A subscriber gets what matches its filter as it subscribes (MQTT 5
//!   retain handling as asked, none for a shared subscription), each
//!   message checked against its read rights like any other, and queued
//!   before the SUBACK, so that nothing routed to the subscription later
//!   arrives before it (see `sessions`).
//! * Its payload and topic count against `[local] memory_limit` while it is
//!   retained, and at most [`MAX_RETAINED`] topics hold one. One that does
//!   not fit is not retained (the one before stays), counted in
//!   `broker_dropped_memory_limit` and logged at most once a minute; it is
//!   still routed and acknowledged as usual. While it is routed its payload
//!   counts twice (the retained copy and the routed one).
//! * A message is kept until it is replaced or cleared; rmqtt's default
//!   lifetime for queued messages does not apply. An MQTT 5 message expiry
//!   interval set by the publisher does: such a message is kept in memory
//!   only, and goes when it expires.
//! * The others are written to the `retained` table in the writer's next
//!   transaction (after the publisher's acknowledgement, as Mosquitto's
//!   persistence keeps them), and loaded at start. MQTT 5 properties of a
//!   retained message (content type, user properties, …) are not kept
//!   across a restart.
//! * A will denied by the ACL is not retained either.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use rmqtt::Result;
use rmqtt::codec::v5::PublishProperties;
use rmqtt::retain::{DefaultRetainStorage, RetainStorage};
use rmqtt::types::{
    ClientId, CodecPublish, From, FromType, Id, Publish, QoS, Retain, TopicFilter, TopicName,
};

use super::access::Gate;
use super::sessions::Budget;
use crate::metrics::event;
use crate::store::{Retained, RetainedMessages};
use crate::text::Printable;
use crate::throttle::Throttle;

/// Most retained messages (topics) at once: each costs a node of the tree
/// besides its bytes. Beyond it, a retained publish on a new topic is not
/// kept (one on a topic already retained replaces it as usual).
pub(super) const MAX_RETAINED: isize = 10_000;

/// How often expired retained messages are swept out of memory.
const SWEEP_INTERVAL_MS: u64 = 60_000;

/// Retained messages not kept for the memory limit, logged at most once a minute.
static LIMIT_LOGGED: Throttle = Throttle::per_minute(1);

/// The broker's retained messages.
pub(super) struct Retainer {
    /// rmqtt's tree (its own `RetainStorage` is a stub; its helpers work).
    tree: DefaultRetainStorage,
    /// Where they outlive a restart; none: memory only.
    store: Option<RetainedMessages>,
    /// The broker's byte budget.
    budget: Arc<Budget>,
    /// Whose wills may be retained.
    gate: Arc<Gate>,
    /// When expired messages were last swept, ms since the epoch.
    swept_ms: AtomicU64,
}

fn qos_of(n: u8) -> QoS {
    match n {
        0 => QoS::AtMostOnce,
        1 => QoS::AtLeastOnce,
        _ => QoS::ExactlyOnce,
    }
}

impl Retainer {
    /// An empty one.
    pub(super) fn new(
        store: Option<RetainedMessages>,
        budget: Arc<Budget>,
        gate: Arc<Gate>,
    ) -> Retainer {
        Retainer {
            tree: DefaultRetainStorage::new(),
            store,
            budget,
            gate,
            swept_ms: AtomicU64::new(crate::clock::now_ms()),
        }
    }

    /// Takes in what the store kept, as published by `from` (edgefn).
    /// Those beyond the memory limit are left out (and stay in the store).
    pub(super) async fn load(&self, kept: Vec<Retained>, from: &From) -> Result<usize> {
        let mut loaded = 0;
        for m in kept {
            let extra = m.topic.len();
            let Some(payload) = self.budget.hold_with(Bytes::from(m.payload), extra) else {
                tracing::warn!(
                    topic = %Printable(&m.topic),
                    "a retained message does not fit in local.memory_limit: not loaded"
                );
                continue;
            };
            let publish = CodecPublish {
                dup: false,
                retain: true,
                qos: qos_of(m.qos),
                topic: m.topic.as_str().into(),
                packet_id: None,
                payload,
                properties: Some(PublishProperties::default()),
            };
            let publish = Publish::from(publish).create_time(crate::clock::now_ms() as i64);
            let retain = Retain {
                msg_id: None,
                from: from.clone(),
                publish,
            };
            self.tree
                .set_with_timeout(&TopicName::from(m.topic), retain, None)
                .await?;
            loaded += 1;
        }
        Ok(loaded)
    }

    /// Sweeps expired messages out of memory, at most once a minute.
    async fn sweep(&self) {
        let now = crate::clock::now_ms();
        let last = self.swept_ms.load(Ordering::Relaxed);
        if now.saturating_sub(last) >= SWEEP_INTERVAL_MS
            && self
                .swept_ms
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            self.tree.remove_expired_messages().await;
        }
    }
}

#[async_trait]
impl RetainStorage for Retainer {
    fn enable(&self) -> bool {
        true
    }

    async fn set(
        &self,
        topic: &TopicName,
        mut retain: Retain,
        _fitted_expiry: Option<Duration>,
    ) -> Result<()> {
        self.sweep().await;
        if matches!(retain.from.typ(), FromType::LastWill)
            && !self.gate.may_publish_will(&retain.from.id, topic, false)
        {
            return Ok(());
        }
        if retain.publish.payload.is_empty() {
            self.tree.set_with_timeout(topic, retain, None).await?;
            if let Some(store) = &self.store {
                store.clear(topic);
            }
            return Ok(());
        }
        // Only the publisher's own expiry (rmqtt passes its default for every message).
        let expiry = retain
            .publish
            .properties
            .as_ref()
            .and_then(|p| p.message_expiry_interval)
            .map(|s| Duration::from_secs(u64::from(s.get())));
        if RetainStorage::count(&self.tree).await >= MAX_RETAINED
            && self.tree.get_message(topic).await?.is_empty()
        {
            event!(
                self.budget.metrics.broker_dropped_memory_limit,
                warn,
                throttle = LIMIT_LOGGED,
                topic = %Printable(topic),
                most = MAX_RETAINED,
                "the built-in broker holds its most retained messages: one on a new topic was not kept"
            );
            return Ok(());
        }
        let payload = std::mem::take(&mut retain.publish.payload);
        let size = payload.len();
        // The topic stays with the message: it counts too.
        let Some(held) = self.budget.hold_with(payload, topic.len()) else {
            event!(
                self.budget.metrics.broker_dropped_memory_limit,
                warn,
                throttle = LIMIT_LOGGED,
                topic = %Printable(topic),
                size,
                limit = self.budget.limit,
                "the built-in broker holds local.memory_limit: a retained message was not kept (the one before stays)"
            );
            return Ok(());
        };
        if let Some(store) = &self.store {
            match expiry {
                None => store.set(Retained {
                    topic: topic.to_string(),
                    payload: held.to_vec(),
                    qos: retain.publish.qos.value(),
                }),
                Some(_) => store.clear(topic),
            }
        }
        retain.publish.payload = held;
        self.tree.set_with_timeout(topic, retain, expiry).await
    }

    async fn get(&self, topic_filter: &TopicFilter) -> Result<Vec<(TopicName, Retain)>> {
        self.tree.get_message(topic_filter).await
    }

    async fn count(&self) -> isize {
        RetainStorage::count(&self.tree).await
    }

    async fn max(&self) -> isize {
        RetainStorage::max(&self.tree).await
    }
}

/// The identity under which loaded retained messages were published.
pub(super) fn loaded_from(node: rmqtt::types::NodeId) -> From {
    From::from_system(Id::new(
        node,
        0,
        None,
        None,
        ClientId::from_static(super::EDGEFN_CLIENT_ID),
        None,
    ))
}
