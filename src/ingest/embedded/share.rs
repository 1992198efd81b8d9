//! Shared subscriptions (`$share/GROUP/FILTER`, MQTT 5 and, as Mosquitto
//! allows, 3.1.1): each message on the filter goes to one member of the
//! group, in turn, an online member whenever one is.
//!
//! rmqtt routes shared subscriptions but leaves the choice of member to an
//! extension whose default chooses none (nothing is delivered); this is
//! that choice.

use std::sync::atomic::{AtomicUsize, Ordering};

use async_trait::async_trait;
use rmqtt::context::ServerContext;
use rmqtt::subscribe::SharedSubscription;
use rmqtt::types::{
    ClientId, Id, IsOnline, NodeId, SharedGroup, SubscriptionIdentifier, SubscriptionOptions,
    TopicName,
};

/// Takes the members of a group in turn, skipping offline ones.
///
/// One turn counter for all groups: the choice stays fair within a group
/// (each message moves the start by one) and holds no memory per group, so
/// a client inventing group names costs nothing here.
#[derive(Debug, Default)]
pub(super) struct InTurn(AtomicUsize);

#[async_trait]
impl SharedSubscription for InTurn {
    fn is_supported(&self) -> bool {
        true
    }

    async fn choice(
        &self,
        _scx: &ServerContext,
        _group: &SharedGroup,
        _publisher_id: &Id,
        _topic: &TopicName,
        members: &[(
            NodeId,
            ClientId,
            SubscriptionOptions,
            Option<Vec<SubscriptionIdentifier>>,
            Option<IsOnline>,
        )],
    ) -> Option<(usize, IsOnline)> {
        pick(
            self.0.fetch_add(1, Ordering::Relaxed),
            members.iter().map(|m| m.4),
        )
    }
}

/// From `turn` on (wrapping), the first member known to be online; else
/// the one at `turn` (an offline session queues the message).
fn pick(
    turn: usize,
    online: impl ExactSizeIterator<Item = Option<IsOnline>> + Clone,
) -> Option<(usize, IsOnline)> {
    let n = online.len();
    if n == 0 {
        return None;
    }
    let start = turn % n;
    let all: Vec<bool> = online.map(|o| o.unwrap_or(false)).collect();
    (0..n)
        .map(|k| (start + k) % n)
        .find(|&i| all[i])
        .map(|i| (i, true))
        .or(Some((start, false)))
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
        let one_off = [Some(true), Some(false), None];
        assert_eq!(pick(1, one_off.iter().copied()), Some((0, true)));
        let all_off = [Some(false), Some(false)];
        assert_eq!(pick(3, all_off.iter().copied()), Some((1, false)));
        assert_eq!(pick(0, std::iter::empty::<Option<bool>>()), None);
    }
}
