//! Shared subscriptions (`$share/GROUP/FILTER`, MQTT 5 and, as Mosquitto
//! allows, 3.1.1): each message on the filter goes to one member of the
//! group, in turn, an online member whenever one is.
//!
//! rmqtt routes shared subscriptions but leaves the choice of member to an
//! extension whose default chooses none (nothing is delivered); this is
//! that choice. With an `acl_file`, only members that may read the topic
//! are chosen, so a member without the right does not take the message
//! from the others.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use async_trait::async_trait;
use rmqtt::context::ServerContext;
use rmqtt::subscribe::SharedSubscription;
use rmqtt::types::{
    ClientId, Id, IsOnline, NodeId, SharedGroup, SubscriptionIdentifier, SubscriptionOptions,
    TopicName,
};

use super::access::Gate;

/// Takes the members of a group in turn, skipping offline ones and, with an
/// `acl_file`, those that may not read the topic.
///
/// One turn counter for all groups: the choice stays fair within a group
/// (each message moves the start by one) and holds no memory per group, so
/// a client inventing group names costs nothing here.
pub(super) struct InTurn {
    /// The turn.
    turn: AtomicUsize,
    /// Whose read rights a member needs.
    gate: Arc<Gate>,
}

impl InTurn {
    pub(super) fn new(gate: Arc<Gate>) -> InTurn {
        InTurn {
            turn: AtomicUsize::new(0),
            gate,
        }
    }
}

#[async_trait]
impl SharedSubscription for InTurn {
    fn is_supported(&self) -> bool {
        true
    }

    async fn choice(
        &self,
        scx: &ServerContext,
        _group: &SharedGroup,
        _publisher_id: &Id,
        topic: &TopicName,
        members: &[(
            NodeId,
            ClientId,
            SubscriptionOptions,
            Option<Vec<SubscriptionIdentifier>>,
            Option<IsOnline>,
        )],
    ) -> Option<(usize, IsOnline)> {
        let mut readable = vec![true; members.len()];
        if self.gate.has_acl() {
            let sessions = scx.extends.shared().await;
            for (may, (node, client_id, ..)) in readable.iter_mut().zip(members) {
                let id = Id::new(*node, 0, None, None, client_id.clone(), None);
                *may = sessions
                    .entry(id)
                    .session()
                    .is_none_or(|s| self.gate.can_read(&s, topic));
            }
        }
        let turn = self.turn.fetch_add(1, Ordering::Relaxed);
        pick(
            turn,
            members
                .iter()
                .zip(readable)
                .map(|(m, may)| may.then_some(m.4.unwrap_or(false))),
        )
    }
}

/// From `turn` on (wrapping), the first member that may have the message
/// (`Some`) and is online (`Some(true)`); else the first that may have it
/// (an offline session queues the message); else none.
fn pick(
    turn: usize,
    members: impl ExactSizeIterator<Item = Option<bool>> + Clone,
) -> Option<(usize, IsOnline)> {
    let n = members.len();
    if n == 0 {
        return None;
    }
    let start = turn % n;
    let all: Vec<Option<bool>> = members.collect();
    let order = (0..n).map(|k| (start + k) % n);
    order
        .clone()
        .find(|&i| all[i] == Some(true))
        .map(|i| (i, true))
        .or_else(|| {
            order
                .clone()
                .find(|&i| all[i].is_some())
                .map(|i| (i, false))
        })
}

#[cfg(test)]
mod tests {
    use super::pick;

    #[test]
    fn members_take_turns_and_an_online_one_is_preferred() {
        let all_on = [Some(true), Some(true), Some(true)];
        let chosen: Vec<usize> = (0..6)
            .map(|t| pick(t, all_on.iter().copied()).unwrap().0)
            .collect();
        assert_eq!(chosen, [0, 1, 2, 0, 1, 2]);
        let one_off = [Some(true), Some(false), Some(false)];
        assert_eq!(pick(1, one_off.iter().copied()), Some((0, true)));
        let all_off = [Some(false), Some(false)];
        assert_eq!(pick(3, all_off.iter().copied()), Some((1, false)));
        assert_eq!(pick(0, std::iter::empty::<Option<bool>>()), None);
    }

    #[test]
    fn a_member_that_may_not_read_is_never_chosen() {
        // The second may not read: its turns go to the next that may.
        let members = [Some(true), None, Some(true)];
        let chosen: Vec<usize> = (0..3)
            .map(|t| pick(t, members.iter().copied()).unwrap().0)
            .collect();
        assert_eq!(chosen, [0, 2, 2]);
        assert_eq!(pick(0, [None, None].iter().copied()), None);
        // One that may read, offline, before one that may not, online.
        assert_eq!(
            pick(0, [None, Some(false)].iter().copied()),
            Some((1, false))
        );
    }
}
