//! One metrics model: a [`Report`] of the gateway and each function, made
//! from the live counters on demand, and shown three ways:
//!
//! - the Prometheus text format (OpenMetrics) at `/metrics` of the
//!   `[metrics] listen` address, and the same report as JSON at
//!   `/metrics.json` ([`serve`]);
//! - as JSON on `edgefn/<gateway-id>/metrics` on the control broker,
//!   every `[metrics] interval` ([`crate::control`]);
//! - `edgefn status --config` on the gateway, from `/metrics.json` or,
//!   with the daemon stopped, from the database (src/cli/status.rs).
//!
//! Counters are plain atomics bumped where things happen
//! ([`crate::metrics::Metrics`] for the gateway,
//! [`FunctionMetrics`] per function name); durations are kept in a
//! [`crate::metrics::Window`] of the most recent ones, from which percentiles are taken.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

mod http;
mod prometheus;

pub use http::{CONNECTION_TIMEOUT, HEADER_TIMEOUT, MAX_CONNECTIONS, serve};
pub use prometheus::{OPENMETRICS, prometheus};

use serde::{Deserialize, Serialize};

use crate::clock::now_ms;
use crate::metrics::{Percentiles, Snapshot, Window};
use crate::registry::{Origin, Registry};
use crate::runtime::pool::{FAILURE_KINDS, FunctionMetrics};

/// Everything about the gateway and its functions at one moment.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Report {
    /// The gateway.
    pub gateway: GatewayReport,
    /// Each function that runs, in installation order.
    pub functions: Vec<FunctionReport>,
}

/// The gateway's figures.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GatewayReport {
    /// `gateway.id`.
    pub id: String,
    /// This edgefn's version.
    pub edgefn_version: String,
    /// When the report was made, ms since the epoch.
    pub at_ms: u64,
    /// Seconds since the daemon started.
    pub uptime_s: u64,
    /// The gateway's counters since the start (see
    /// [`crate::metrics::Metrics`]).
    pub counters: Snapshot,
    /// Records in the buffer now.
    pub buffer_records: u64,
    /// Bytes (topics and payloads) in the buffer now.
    pub buffer_bytes: u64,
    /// Age of the oldest buffered record, seconds.
    pub oldest_record_age_s: Option<f64>,
    /// Whether the upstream connection is up.
    pub upstream_connected: bool,
    /// Group commit times (the fsync included), of the most recent ones.
    pub commit_latency: Option<Percentiles>,
    /// Bytes this process caused to be written to storage since it started
    /// (`write_bytes` of /proc/self/io), if the system says.
    pub disk_write_bytes: Option<u64>,
    /// Bytes written per committed message over the last
    /// `disk_window_s` (none if no message was committed in it).
    pub disk_bytes_per_message: Option<f64>,
    /// Bytes written per day at the rate of the last `disk_window_s`.
    pub disk_bytes_per_day: Option<f64>,
    /// Seconds the two figures above are over: since start-up finished, up
    /// to [`WEAR_WINDOW`] and a little more.
    pub disk_window_s: Option<f64>,
}

/// One function's figures (all versions of its name since the start).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FunctionReport {
    /// Its name.
    pub name: String,
    /// The version that runs (0: from the configuration file).
    pub version: u64,
    /// `config` or `deployed`.
    pub origin: String,
    /// Attempts (first tries and retries).
    pub invocations: u64,
    /// Attempts that succeeded.
    pub succeeded: u64,
    /// Failed attempts by kind (`error`, `timeout`, `fuel`, `trap`,
    /// `exit`, `start`).
    pub errors: BTreeMap<String, u64>,
    /// Attempts that were retries.
    pub retries: u64,
    /// Inputs that failed every attempt (written to the dead letters).
    pub dead_letters: u64,
    /// Messages that waited for a free instance.
    pub throttles: u64,
    /// Records emitted by successful invocations.
    pub emitted_records: u64,
    /// Their bytes (topics and payloads).
    pub emitted_bytes: u64,
    /// Local publishes of successful invocations.
    pub published: u64,
    /// `emit` calls refused by `emit_allow`.
    pub emit_denied: u64,
    /// `publish` calls refused by `publish_allow`.
    pub publish_denied: u64,
    /// Bytes of state (keys and values).
    pub state_bytes: u64,
    /// `state_set` calls refused by `state_limit`.
    pub state_refused: u64,
    /// Scheduled runs skipped (the one before was still going).
    pub schedule_skipped: u64,
    /// Successful attempts' durations, of the most recent ones.
    pub duration: Option<Percentiles>,
}

impl FunctionReport {
    /// Failed attempts, all kinds.
    pub fn errors_total(&self) -> u64 {
        self.errors.values().sum()
    }
}

/// Over about how long [`DiskWear`] takes its rates.
pub const WEAR_WINDOW: Duration = Duration::from_secs(300);

/// [`DiskWear`] keeps a reading at most this often.
const WEAR_SAMPLE: Duration = Duration::from_secs(10);

/// What the daemon writes to storage lately: readings of `write_bytes`
/// (/proc/self/io) and of the committed messages, the oldest about
/// [`WEAR_WINDOW`] old, so the rates leave out start-up (compiling
/// modules writes too) and follow changes in load.
#[derive(Debug, Default)]
pub struct DiskWear(Mutex<std::collections::VecDeque<WearSample>>);

#[derive(Debug, Clone, Copy)]
struct WearSample {
    at: Instant,
    bytes: u64,
    committed: u64,
}

/// [`DiskWear`]'s rates.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DiskRate {
    /// Bytes per committed message; none if none was committed.
    pub bytes_per_message: Option<f64>,
    /// Bytes per day at this rate.
    pub bytes_per_day: f64,
    /// Seconds they are over.
    pub window_s: f64,
}

impl DiskWear {
    /// Takes a reading, and returns the rates from the oldest kept up to
    /// it; none before the first reading, or if the system does not say.
    pub fn rate(&self, committed: u64) -> Option<DiskRate> {
        let bytes = disk_write_bytes()?;
        self.rate_at(Instant::now(), bytes, committed)
    }

    fn rate_at(&self, now: Instant, bytes: u64, committed: u64) -> Option<DiskRate> {
        let mut samples = self.0.lock().expect("wear lock");
        // The base is the newest reading at least WEAR_WINDOW old.
        while samples.len() > 1 && now.duration_since(samples[1].at) >= WEAR_WINDOW {
            samples.pop_front();
        }
        let base = samples.front().copied();
        if samples
            .back()
            .is_none_or(|last| now.duration_since(last.at) >= WEAR_SAMPLE)
        {
            samples.push_back(WearSample {
                at: now,
                bytes,
                committed,
            });
        }
        let base = base?;
        let secs = now.duration_since(base.at).as_secs_f64();
        if secs <= 0.0 {
            return None;
        }
        let written = bytes.saturating_sub(base.bytes) as f64;
        let messages = committed.saturating_sub(base.committed);
        Some(DiskRate {
            bytes_per_message: (messages > 0).then(|| written / messages as f64),
            bytes_per_day: written / secs * 86_400.0,
            window_s: secs,
        })
    }
}

/// Reads `write_bytes` from /proc/self/io.
fn disk_write_bytes() -> Option<u64> {
    let io = std::fs::read_to_string("/proc/self/io").ok()?;
    io.lines()
        .find_map(|l| l.strip_prefix("write_bytes:"))
        .and_then(|v| v.trim().parse().ok())
}

/// Where a report's live figures come from.
pub struct Telemetry {
    /// `gateway.id`.
    pub gateway_id: String,
    /// When the daemon started.
    pub started: Instant,
    /// Takes a snapshot of them with the gauges read fresh.
    pub snapshot: Box<dyn Fn() -> Snapshot + Send + Sync>,
    /// The functions.
    pub registry: Arc<Registry>,
    /// Commit times.
    pub commit_latency: Arc<Window>,
    /// The buffer's gauges: (records, bytes, oldest record's time).
    pub buffer: Box<dyn Fn() -> (u64, u64, Option<u64>) + Send + Sync>,
    /// Storage writes lately; its first reading is taken when start-up is
    /// over.
    pub wear: Arc<DiskWear>,
}

impl Telemetry {
    /// The report now. Reads SQLite (the oldest record): call from a
    /// blocking thread.
    pub fn report(&self) -> Report {
        let counters = (self.snapshot)();
        let (buffer_records, buffer_bytes, oldest) = (self.buffer)();
        let now = now_ms();
        let disk = disk_write_bytes();
        let wear = disk.and_then(|b| self.wear.rate_at(Instant::now(), b, counters.committed));
        let gateway = GatewayReport {
            id: self.gateway_id.clone(),
            edgefn_version: env!("CARGO_PKG_VERSION").to_owned(),
            at_ms: now,
            uptime_s: self.started.elapsed().as_secs(),
            counters,
            buffer_records,
            buffer_bytes,
            oldest_record_age_s: oldest.map(|o| now.saturating_sub(o) as f64 / 1000.0),
            upstream_connected: counters.upstream_connected == 1,
            commit_latency: self.commit_latency.percentiles(),
            disk_write_bytes: disk,
            disk_bytes_per_message: wear.and_then(|w| w.bytes_per_message),
            disk_bytes_per_day: wear.map(|w| w.bytes_per_day),
            disk_window_s: wear.map(|w| w.window_s),
        };
        let functions = self
            .registry
            .table()
            .functions()
            .iter()
            .map(|f| {
                let calls = self.registry.refused_calls(f.name());
                function_report(
                    f.name(),
                    f.version(),
                    f.origin(),
                    f.pool().metrics(),
                    &calls,
                    f.state().bytes() as u64,
                )
            })
            .collect();
        Report { gateway, functions }
    }
}

fn function_report(
    name: &str,
    version: u64,
    origin: Origin,
    m: &FunctionMetrics,
    calls: &crate::runtime::RefusedCalls,
    state_bytes: u64,
) -> FunctionReport {
    let load = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
    FunctionReport {
        name: name.to_owned(),
        version,
        origin: match origin {
            Origin::Config => "config",
            Origin::Deployed => "deployed",
        }
        .to_owned(),
        invocations: load(&m.invocations),
        succeeded: load(&m.succeeded),
        errors: FAILURE_KINDS
            .iter()
            .zip(&m.failures_by_kind)
            .map(|(k, n)| ((*k).to_owned(), load(n)))
            .collect(),
        retries: load(&m.retries),
        dead_letters: load(&m.dead_letters),
        throttles: load(&m.throttles),
        emitted_records: load(&m.emitted_records),
        emitted_bytes: load(&m.emitted_bytes),
        published: load(&m.published),
        emit_denied: load(&calls.emit_denied),
        publish_denied: load(&calls.publish_denied),
        state_bytes,
        state_refused: load(&calls.state_refused),
        schedule_skipped: load(&m.schedule_skipped),
        duration: m.durations.percentiles(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::WINDOW;

    #[test]
    fn disk_wear_is_over_the_recent_window_from_the_first_reading_on() {
        let w = DiskWear::default();
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        // Start-up wrote 5 MB; the window starts after it.
        assert_eq!(w.rate_at(t0, 5_000_000, 0), None);
        let r = w.rate_at(at(1), 5_004_000, 1).unwrap();
        assert_eq!(r.bytes_per_message, Some(4_000.0));
        assert_eq!((r.bytes_per_day, r.window_s), (4_000.0 * 86_400.0, 1.0));
        // Nothing committed: no per-message figure, the rate still shown.
        let w2 = DiskWear::default();
        w2.rate_at(t0, 0, 7);
        assert_eq!(w2.rate_at(at(2), 100, 7).unwrap().bytes_per_message, None);
        // A reading every 10 s at 4 kB and 1 message per second, then the
        // load changes to 1 kB per message: after a window the rate is of
        // the new load only.
        let (mut bytes, mut committed) = (5_004_000, 1);
        for s in (10..=600).step_by(10) {
            let per = if s <= 300 { 4_000 } else { 1_000 };
            bytes += 10 * per;
            committed += 10;
            w.rate_at(at(s), bytes, committed);
        }
        let r = w.rate_at(at(610), bytes + 10_000, committed + 10).unwrap();
        assert_eq!(r.bytes_per_message, Some(1_000.0));
        assert_eq!(r.window_s, 300.0);
    }

    #[test]
    fn percentiles_are_of_the_most_recent_durations() {
        let w = Window::default();
        assert_eq!(w.percentiles(), None);
        for ms in 1..=100 {
            w.record(Duration::from_millis(ms));
        }
        let p = w.percentiles().unwrap();
        assert_eq!(
            (p.p50_ms, p.p95_ms, p.p99_ms, p.samples),
            (50.0, 95.0, 99.0, 100)
        );
        for _ in 0..WINDOW {
            w.record(Duration::from_millis(7));
        }
        let p = w.percentiles().unwrap();
        assert_eq!((p.p50_ms, p.p99_ms, p.samples), (7.0, 7.0, WINDOW));
    }
}
