//! Gateway-wide counters: what came in, what was committed, what went up.
//!
//! Plain relaxed atomics, bumped once per event (or per batch) and read by
//! the periodic status line, `edgefn status` and the tests. Per-function
//! counters live in [`crate::runtime::pool::FunctionMetrics`].

use std::sync::atomic::{AtomicU64, Ordering};

use serde::Serialize;

macro_rules! counters {
    ($($(#[doc = $doc:literal])* $name:ident),* $(,)?) => {
        /// Live counters; see each field.
        #[derive(Debug, Default)]
        pub struct Metrics {
            $($(#[doc = $doc])* pub $name: AtomicU64,)*
        }

        /// A point-in-time copy of [`Metrics`].
        #[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Serialize)]
        pub struct Snapshot {
            $($(#[doc = $doc])* pub $name: u64,)*
        }

        impl Metrics {
            /// Reads every counter.
            pub fn snapshot(&self) -> Snapshot {
                Snapshot { $($name: self.$name.load(Ordering::Relaxed),)* }
            }
        }
    };
}

counters! {
    /// Device messages that reached the pipeline (from either source).
    received,
    /// Device messages refused for exceeding `local.max_message_size`.
    refused_too_large,
    /// Device messages whose topic matched no function.
    unrouted,
    /// Increase of the local broker's `$SYS/broker/publish/messages/dropped`
    /// seen while connected: messages the broker dropped before edgefn saw them.
    broker_dropped,
    /// Device messages whose outcome was committed (then acknowledged).
    committed,
    /// Records written to the outbox.
    records_buffered,
    /// Inputs written to the dead letters.
    dead_letters,
    /// Group commits.
    commit_batches,
    /// Failed commit attempts (retried; nothing acknowledged meanwhile).
    commit_failures,
    /// Records deleted unsent by the `drop_oldest` policy.
    dropped_records,
    /// Messages functions published to the local broker.
    local_publishes,
    /// Of those, lost: the queue to the local broker was full, or the
    /// embedded broker refused them (local publishes are at most once).
    local_publishes_dropped,
    /// Records the upstream acknowledged (then deleted by the writer).
    forwarded,
    /// Records sent again after a reconnect: possible duplicates upstream.
    resent,
    /// Records the upstream refused with an error reason code (moved to the
    /// dead letters).
    upstream_rejected,
    /// Successful connections to the upstream broker.
    upstream_connects,
    /// Successful connections to the local broker.
    local_connects,
}

impl Metrics {
    /// Adds `n` to `counter`.
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }
}
