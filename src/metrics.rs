//! Gateway-wide counters: what came in, what was committed, what went up.
//!
//! Plain relaxed atomics, bumped once per event (or per batch) and read by
//! the periodic status line and the tests; the embedded broker's client
//! counts are gauges, set when a snapshot is taken. Per-function
//! counters live in [`crate::runtime::pool::FunctionMetrics`]; both are
//! read into one report by [`crate::telemetry`].

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde::{Deserialize, Serialize};

macro_rules! counters {
    ($($(#[doc = $doc:literal])* $name:ident),* $(,)?) => {
        /// Live counters; see each field.
        #[derive(Debug, Default)]
        pub struct Metrics {
            $($(#[doc = $doc])* pub $name: AtomicU64,)*
        }

        /// A point-in-time copy of [`Metrics`].
        #[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
        #[serde(default)]
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
    /// Scheduled runs handed to the pipeline.
    scheduled_runs,
    /// Device messages refused for exceeding `local.max_message_size`.
    refused_too_large,
    /// Device messages whose topic matched no function.
    unrouted,
    /// Increase of the local broker's `$SYS/broker/publish/messages/dropped`
    /// seen while connected: messages the broker dropped before edgefn saw them.
    broker_dropped,
    /// Device messages whose outcome was committed (then acknowledged).
    committed,
    /// Device messages left out of a commit because their device gave up
    /// on them before (it sends them again): embedded broker only.
    abandoned,
    /// Records written to the outbox.
    records_buffered,
    /// Inputs written to the dead letters.
    dead_letters,
    /// Old dead letters deleted to keep them within
    /// `buffer.dead_letters_max_size`.
    dead_letters_dropped,
    /// Dead letters replayed (`edgefn dead-letters replay`) and run.
    replays_done,
    /// Replayed dead letters that failed again (they stay).
    replays_failed,
    /// Replays refused: the dead letter's function is not on the gateway.
    replays_refused,
    /// Transactions committed, each one fsync of the WAL with `durability
    /// = "full"`: group commits of messages, and commits of deletes of
    /// forwarded records alone.
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
    /// Records moved to the dead letters instead of delivered: the
    /// upstream refused them for what they are (an invalid topic name or
    /// payload format), kept refusing their topic while it accepted others,
    /// or can never take them (too large).
    upstream_rejected,
    /// PUBACKs that refused a record for who sends it (not authorised,
    /// quota exceeded, …): the record was kept, to be sent again.
    upstream_refusals,
    /// Topics whose records the upstream refuses now (held back, sent
    /// again after a backoff).
    upstream_refused_topics,
    /// The MQTT reason code of the last refusal while a topic is refused
    /// (e.g. 135 = 0x87 not authorised); 0 when none is.
    upstream_refusal_reason,
    /// Successful connections to the upstream broker.
    upstream_connects,
    /// Upstream connection, now: 1 up, 0 down.
    upstream_connected,
    /// Successful connections to the local broker.
    local_connects,
    /// Embedded broker: QoS 1/2 device publishes not acknowledged because
    /// they were not committed (the connection was closed without a PUBACK;
    /// the device sends them again).
    broker_refused,
    /// Embedded broker: messages dropped on the way to a local subscriber
    /// (its queue full, expired, subscriber gone).
    broker_dropped_to_subscribers,
    /// Embedded broker: last wills and functions' own publishes on trigger
    /// topics that never reached a commit; nobody sends these again.
    broker_lost_internal,
    /// Bundles refused on the control topics (any reason, junk included).
    bundles_refused,
    /// New versions rolled back: their instances failed to start.
    rollbacks,
    /// New versions whose instances failed to start, kept running:
    /// `rollback = "never"`, or the version before is below the floor.
    rollbacks_declined,
    /// Connections to the metrics listener closed at once: it was serving
    /// its most.
    metrics_connections_refused,
    /// Connections to the metrics listener cut: headers not sent within
    /// its header timeout, or open past its connection timeout.
    metrics_connections_cut,
    /// Embedded broker, now: open connections.
    broker_connections,
    /// Embedded broker, now: sessions (connected clients and the persistent
    /// sessions of offline ones).
    broker_sessions,
}

impl Metrics {
    /// Sets the gauge `gauge` to `value`.
    pub fn set(gauge: &AtomicU64, value: u64) {
        gauge.store(value, Ordering::Relaxed);
    }

    /// Adds `n` to `counter`.
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }
}

/// Durations a [`Window`] keeps: percentiles are over the most recent/// this many.
pub const WINDOW: usize = 1024;

/// The most recent [`WINDOW`] durations of something, for percentiles.
#[derive(Debug, Default)]
pub struct Window(Mutex<Ring>);

#[derive(Debug, Default)]
struct Ring {
    /// Microseconds, up to [`WINDOW`] of them.
    samples: Vec<u32>,
    /// Where the next goes once full.
    next: usize,
}

/// Percentiles of a [`Window`], milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Percentiles {
    /// Median.
    pub p50_ms: f64,
    /// 95th percentile.
    pub p95_ms: f64,
    /// 99th percentile.
    pub p99_ms: f64,
    /// How many durations they are of.
    pub samples: usize,
}

impl Window {
    /// Adds a duration, pushing out the oldest once full.
    pub fn record(&self, d: Duration) {
        let micros = u32::try_from(d.as_micros()).unwrap_or(u32::MAX);
        let mut r = self.0.lock().expect("window lock");
        if r.samples.len() < WINDOW {
            r.samples.push(micros);
        } else {
            let i = r.next;
            r.samples[i] = micros;
        }
        r.next = (r.next + 1) % WINDOW;
    }

    /// The percentiles of what it holds; none while empty.
    pub fn percentiles(&self) -> Option<Percentiles> {
        let mut v = self.0.lock().expect("window lock").samples.clone();
        if v.is_empty() {
            return None;
        }
        v.sort_unstable();
        // Nearest rank.
        let at = |p: f64| {
            let rank = ((p * v.len() as f64).ceil() as usize).clamp(1, v.len());
            f64::from(v[rank - 1]) / 1000.0
        };
        Some(Percentiles {
            p50_ms: at(0.50),
            p95_ms: at(0.95),
            p99_ms: at(0.99),
            samples: v.len(),
        })
    }
}
