//! What the forwarder does when the upstream refuses records.
//!
//! A PUBACK with an error reason code says one of two things:
//!
//! - **What the record is** cannot be taken: its topic name is invalid
//!   (0x90) or its payload does not match its format indicator (0x99). It
//!   never will be: the record goes to the dead letters at once
//!   ([`Verdict::Rejected`]).
//! - **Who sends it** is refused, for now: not authorised (0x87), quota
//!   exceeded (0x97), an unspecified or implementation-specific error
//!   (0x80, 0x83), a packet identifier in use (0x91). A cloud with a
//!   wrong ACL or a full quota must cost time, not data: the record stays
//!   in the outbox and is sent again later ([`Verdict::Refused`]).
//!
//! Some brokers refuse by closing the connection instead (AWS IoT Core
//! does for an unauthorised publish; Mosquitto closes it after a refused
//! PUBACK when `max_queued_messages` is 0). A record that was the oldest
//! unacknowledged each time [`super::POISON_STRIKES`] connections in a
//! row ended ([`Cause::Closed`]) is taken as refused the same way.
//!
//! Refusals are tracked per topic ([`Refusals`]):
//!
//! - A topic whose record was refused is *refused*: its later records are
//!   held back, not sent, so its order holds; after a backoff (1 s,
//!   doubling to 1 min) its oldest record is sent again, alone, as a
//!   probe. Records of other topics flow as usual.
//! - A record of the topic accepted ends that: its held records are sent,
//!   in order.
//! - A topic refused for `upstream.refused_topic_timeout` while the
//!   upstream accepted records of other topics meanwhile is refused *for
//!   good*: the cloud takes this gateway's records but not that topic's, so
//!   waiting would hold them for ever. Its records are then sent as any
//!   others, and each one refused goes to the dead letters, saying why.
//!   A record of it accepted again ends that too.
//! - While the upstream accepts nothing at all (every topic refused),
//!   nothing goes to the dead letters however long it lasts: records wait
//!   in the outbox, the buffer fills, and `buffer.full_policy` applies.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use rumqttc::v5::mqttbytes::v5::PubAckReason;

use crate::shutdown::Backoff;

/// Most topics tracked as refused at once. Beyond it a refused record of a
/// new topic is still kept, but its topic's later records are not held
/// back: they are sent, refused and kept each, and all are sent again with
/// the next probe. Bounds memory when a cloud refuses a gateway that
/// emits on very many topics.
pub const MAX_REFUSED_TOPICS: usize = 4096;

/// The first wait before a refused topic is tried again.
const FIRST_RETRY: Duration = Duration::from_secs(1);

/// The longest wait before a refused topic is tried again.
const LAST_RETRY: Duration = Duration::from_secs(60);

/// What a PUBACK's reason code means for its record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Delivered: delete it.
    Delivered,
    /// Refused for what it is: to the dead letters.
    Rejected,
    /// Refused for who sends it, for now: keep it, send it again later.
    Refused,
}

/// The verdict on a record the upstream answered with `reason`.
pub fn verdict(reason: PubAckReason) -> Verdict {
    match reason {
        PubAckReason::Success | PubAckReason::NoMatchingSubscribers => Verdict::Delivered,
        PubAckReason::TopicNameInvalid | PubAckReason::PayloadFormatInvalid => Verdict::Rejected,
        PubAckReason::NotAuthorized
        | PubAckReason::QuotaExceeded
        | PubAckReason::UnspecifiedError
        | PubAckReason::ImplementationSpecificError
        | PubAckReason::PacketIdentifierInUse => Verdict::Refused,
    }
}

/// The MQTT 5 reason code of `reason`.
pub fn code(reason: PubAckReason) -> u8 {
    match reason {
        PubAckReason::Success => 0x00,
        PubAckReason::NoMatchingSubscribers => 0x10,
        PubAckReason::UnspecifiedError => 0x80,
        PubAckReason::ImplementationSpecificError => 0x83,
        PubAckReason::NotAuthorized => 0x87,
        PubAckReason::TopicNameInvalid => 0x90,
        PubAckReason::PacketIdentifierInUse => 0x91,
        PubAckReason::QuotaExceeded => 0x97,
        PubAckReason::PayloadFormatInvalid => 0x99,
    }
}

/// How the upstream refused a record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cause {
    /// A PUBACK with this reason.
    Reason(PubAckReason),
    /// It closed the connection each time the record was sent.
    Closed,
}

impl Cause {
    /// For the `upstream_refusal_reason` gauge: the MQTT reason code, or
    /// 256 for a closed connection.
    pub fn code(self) -> u64 {
        match self {
            Cause::Reason(r) => u64::from(code(r)),
            Cause::Closed => 256,
        }
    }
}

impl std::fmt::Display for Cause {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Cause::Reason(r) => write!(f, "{r:?}, 0x{:02x}", code(*r)),
            Cause::Closed => write!(
                f,
                "it closed the connection each of the {} times the record was the oldest unacknowledged",
                super::POISON_STRIKES
            ),
        }
    }
}

/// One refused topic.
#[derive(Debug)]
struct Topic {
    /// When its records started being refused.
    since: Instant,
    /// When its oldest record may be sent again.
    retry_at: Instant,
    /// How long the waits are.
    backoff: Backoff,
    /// The record sent as its probe, while the answer is awaited.
    probe: Option<i64>,
    /// Refused for good: its refused records go to the dead letters.
    for_good: bool,
}

/// The refused topics (see the module doc).
#[derive(Debug)]
pub struct Refusals {
    /// `upstream.refused_topic_timeout`.
    timeout: Duration,
    /// By topic (as emitted, without the upstream prefix).
    topics: HashMap<String, Topic>,
    /// When a record was last accepted, of any topic.
    last_accepted: Option<Instant>,
    /// The lowest seq held back or kept since the last rewind.
    held_from: Option<i64>,
    /// A topic was accepted again since the last rewind: its held records
    /// are due.
    cleared: bool,
    /// How the last refusal came, while any topic is refused.
    reason: Option<Cause>,
}

impl Refusals {
    /// No topic refused; for good after `timeout`.
    pub fn new(timeout: Duration) -> Refusals {
        Refusals {
            timeout,
            topics: HashMap::new(),
            last_accepted: None,
            held_from: None,
            cleared: false,
            reason: None,
        }
    }

    /// Whether record `seq` of `topic` may be sent at `now`; if not, it is
    /// held back (sent after a later [`Refusals::rewind`]).
    pub fn admit(&mut self, seq: i64, topic: &str, now: Instant) -> bool {
        let Some(t) = self.topics.get_mut(topic) else {
            return true;
        };
        if t.for_good || t.probe == Some(seq) {
            return true;
        }
        if t.probe.is_none() && now >= t.retry_at {
            t.probe = Some(seq);
            return true;
        }
        self.hold(seq);
        false
    }

    fn hold(&mut self, seq: i64) {
        self.held_from = Some(self.held_from.map_or(seq, |h| h.min(seq)));
    }

    /// A record of `topic` was accepted at `now`.
    pub fn accepted(&mut self, topic: &str, now: Instant) {
        self.last_accepted = Some(now);
        if !self.topics.is_empty() && self.topics.remove(topic).is_some() {
            self.cleared = true;
            if self.topics.is_empty() {
                self.reason = None;
            }
        }
    }

    /// Record `seq` of `topic` was refused for who sends it, at `now`. Its
    /// fate: `Some(why)` for the dead letters (its topic is refused for
    /// good), `None` to keep it (it is sent again after a rewind).
    pub fn refused(
        &mut self,
        seq: i64,
        topic: &str,
        reason: Cause,
        now: Instant,
    ) -> Option<String> {
        self.reason = Some(reason);
        if !self.topics.contains_key(topic) && self.topics.len() >= MAX_REFUSED_TOPICS {
            self.hold(seq);
            return None;
        }
        let timeout = self.timeout;
        let last_accepted = self.last_accepted;
        let t = self
            .topics
            .entry(topic.to_owned())
            .or_insert_with(|| Topic {
                since: now,
                retry_at: now,
                backoff: Backoff::new(FIRST_RETRY, LAST_RETRY),
                probe: None,
                for_good: false,
            });
        if t.probe == Some(seq) {
            t.probe = None;
        }
        if !t.for_good
            && now.duration_since(t.since) >= timeout
            && last_accepted.is_some_and(|a| a > t.since)
        {
            t.for_good = true;
            // Its records held back are sent (and refused) from now on.
            self.cleared = true;
        }
        if t.for_good {
            return Some(format!(
                "the upstream refused this topic ({reason}) for over {} while it accepted others",
                humantime::format_duration(timeout)
            ));
        }
        t.retry_at = now + t.backoff.next_delay();
        self.hold(seq);
        None
    }

    /// If records held back are due at `now` (a refused topic's probe, or
    /// the records of a topic accepted again), the cursor to send from
    /// again: every record after it still in the outbox is looked at anew.
    pub fn rewind(&mut self, now: Instant) -> Option<i64> {
        let due = self.cleared
            || self
                .topics
                .values()
                .any(|t| !t.for_good && t.probe.is_none() && now >= t.retry_at);
        if !due {
            return None;
        }
        self.cleared = false;
        self.held_from.take().map(|seq| seq - 1)
    }

    /// The connection was lost: answers to probes will not come, and every
    /// record is looked at anew from the oldest.
    pub fn connection_lost(&mut self) {
        for t in self.topics.values_mut() {
            t.probe = None;
        }
        self.held_from = None;
        self.cleared = false;
    }

    /// Topics refused now.
    pub fn refused_topics(&self) -> usize {
        self.topics.len()
    }

    /// How the last refusal came, while a topic is refused.
    pub fn reason(&self) -> Option<Cause> {
        self.reason
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOT_AUTHORIZED: Cause = Cause::Reason(PubAckReason::NotAuthorized);

    #[test]
    fn reason_codes_say_what_a_record_is_or_who_sends_it() {
        assert_eq!(verdict(PubAckReason::Success), Verdict::Delivered);
        assert_eq!(
            verdict(PubAckReason::NoMatchingSubscribers),
            Verdict::Delivered
        );
        for r in [
            PubAckReason::NotAuthorized,
            PubAckReason::QuotaExceeded,
            PubAckReason::UnspecifiedError,
            PubAckReason::ImplementationSpecificError,
            PubAckReason::PacketIdentifierInUse,
        ] {
            assert_eq!(verdict(r), Verdict::Refused, "{r:?}");
        }
        for r in [
            PubAckReason::TopicNameInvalid,
            PubAckReason::PayloadFormatInvalid,
        ] {
            assert_eq!(verdict(r), Verdict::Rejected, "{r:?}");
        }
        assert_eq!(NOT_AUTHORIZED.code(), 0x87);
        assert_eq!(Cause::Closed.code(), 256);
    }

    #[test]
    fn a_refused_topic_is_held_back_probed_and_released_when_accepted() {
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let mut r = Refusals::new(Duration::from_secs(3600));
        assert!(r.admit(1, "a", t0));
        assert_eq!(r.refused(1, "a", NOT_AUTHORIZED, t0), None);
        // Its next records are held; another topic's are not.
        assert!(!r.admit(2, "a", at(1)));
        assert!(r.admit(3, "b", at(1)));
        r.accepted("b", at(2));
        assert_eq!(r.rewind(at(2)), None, "nothing due before the backoff");
        // After the backoff (at most 1 s): from the oldest held, again.
        assert_eq!(r.rewind(at(1001)), Some(0));
        assert!(r.admit(1, "a", at(1001)), "the probe");
        assert!(!r.admit(2, "a", at(1001)), "held behind its probe");
        assert_eq!(r.refused_topics(), 1);
        assert_eq!(r.reason(), Some(NOT_AUTHORIZED));
        // The probe accepted: the topic's held records are due at once.
        r.accepted("a", at(1100));
        assert_eq!(r.rewind(at(1100)), Some(1));
        assert!(r.admit(2, "a", at(1100)));
        assert_eq!((r.refused_topics(), r.reason()), (0, None));
    }

    #[test]
    fn only_a_topic_refused_while_others_are_accepted_goes_to_the_dead_letters() {
        let t0 = Instant::now();
        let hour = Duration::from_secs(3600);
        let mut r = Refusals::new(hour);
        // Everything refused for two hours: kept.
        assert_eq!(r.refused(1, "a", NOT_AUTHORIZED, t0), None);
        assert_eq!(r.refused(2, "b", NOT_AUTHORIZED, t0), None);
        assert_eq!(r.refused(1, "a", NOT_AUTHORIZED, t0 + 2 * hour), None);
        // Then b is accepted again; a still refused: for good.
        r.accepted("b", t0 + 2 * hour);
        let why = r.refused(
            1,
            "a",
            NOT_AUTHORIZED,
            t0 + 2 * hour + Duration::from_secs(1),
        );
        assert!(
            why.as_deref().is_some_and(|w| w.contains("0x87")),
            "{why:?}"
        );
        // Its later records are sent, and refused ones go too.
        assert!(r.admit(5, "a", t0 + 2 * hour));
        assert!(r.refused(5, "a", NOT_AUTHORIZED, t0 + 2 * hour).is_some());
        // Until one is accepted.
        r.accepted("a", t0 + 3 * hour);
        assert_eq!(r.refused(6, "a", NOT_AUTHORIZED, t0 + 3 * hour), None);
    }

    #[test]
    fn past_the_most_topics_a_refused_record_is_still_kept() {
        let t0 = Instant::now();
        let mut r = Refusals::new(Duration::from_secs(1));
        for i in 0..MAX_REFUSED_TOPICS as i64 {
            assert_eq!(
                r.refused(i + 10, &format!("t{i}"), NOT_AUTHORIZED, t0),
                None
            );
        }
        assert_eq!(r.refused(5, "one more", NOT_AUTHORIZED, t0), None);
        assert_eq!(r.refused_topics(), MAX_REFUSED_TOPICS);
        assert!(r.admit(6, "one more", t0));
        assert_eq!(r.rewind(t0 + LAST_RETRY), Some(4));
        r.connection_lost();
        assert_eq!(r.rewind(t0 + LAST_RETRY), None);
    }
}
