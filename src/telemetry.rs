//! One metrics model: a [`Report`] of the gateway and each function, made
//! from the live counters on demand, and shown three ways:
//!
//! - the Prometheus text format (OpenMetrics) at `/metrics` of the
//!   `[metrics] listen` address, and the same report as JSON at
//!   `/metrics.json` ([`serve`]);
//! - as JSON on `edgefn/<gateway-id>/metrics` on the control broker,
//!   every `[metrics] interval` ([`crate::control`]);
//! - `edgefn status --config` on the gateway, from `/metrics.json` or,
//!   with the daemon stopped, from the database ([`offline`]).
//!
//! Counters are plain atomics bumped where things happen
//! ([`crate::metrics::Metrics`] for the gateway,
//! [`FunctionMetrics`] per function name); durations are kept in a
//! [`crate::metrics::Window`] of the most recent ones, from which percentiles are taken.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use serde::{Deserialize, Serialize};

use crate::clock::now_ms;
use crate::metrics::{Percentiles, Snapshot, WINDOW, Window};
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

/// A report as a Prometheus collector.
#[derive(Debug)]
struct Exporter(Report);

fn counter(
    e: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    values: &[(&[(&str, &str)], u64)],
) -> Result<(), std::fmt::Error> {
    let c = ConstCounter::new(0u64);
    let mut m = e.encode_descriptor(name, help, None, c.metric_type())?;
    if let [(labels, v)] = values
        && labels.is_empty()
    {
        return ConstCounter::new(*v).encode(m);
    }
    for (labels, v) in values {
        ConstCounter::new(*v).encode(m.encode_family(labels)?)?;
    }
    Ok(())
}

fn gauge(
    e: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    values: &[(&[(&str, &str)], f64)],
) -> Result<(), std::fmt::Error> {
    let g = ConstGauge::new(0.0f64);
    let mut m = e.encode_descriptor(name, help, None, g.metric_type())?;
    if let [(labels, v)] = values
        && labels.is_empty()
    {
        return ConstGauge::new(*v).encode(m);
    }
    for (labels, v) in values {
        ConstGauge::new(*v).encode(m.encode_family(labels)?)?;
    }
    Ok(())
}

impl Collector for Exporter {
    fn encode(&self, mut e: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        let g = &self.0.gateway;
        let c = &g.counters;
        let none: &[(&str, &str)] = &[];
        let e = &mut e;
        gauge(
            e,
            "edgefn_info",
            "The gateway: 1, labelled with its id and edgefn version.",
            &[(&[("gateway", &g.id), ("version", &g.edgefn_version)], 1.0)],
        )?;
        gauge(
            e,
            "edgefn_uptime_seconds",
            "Seconds since the daemon started.",
            &[(none, g.uptime_s as f64)],
        )?;
        counter(
            e,
            "edgefn_messages_received",
            "Device messages that reached the pipeline.",
            &[(none, c.received)],
        )?;
        counter(
            e,
            "edgefn_scheduled_runs",
            "Scheduled runs handed to functions.",
            &[(none, c.scheduled_runs)],
        )?;
        counter(
            e,
            "edgefn_messages_refused",
            "Device messages refused, by reason.",
            &[
                (&[("reason", "too_large")], c.refused_too_large),
                (&[("reason", "unrouted")], c.unrouted),
                (&[("reason", "not_committed")], c.broker_refused),
            ],
        )?;
        counter(
            e,
            "edgefn_messages_committed",
            "Deliveries whose outcome was committed (device messages, scheduled runs, replays).",
            &[(none, c.committed)],
        )?;
        counter(
            e,
            "edgefn_messages_abandoned",
            "Messages left out of a commit: their device gave up on them.",
            &[(none, c.abandoned)],
        )?;
        gauge(
            e,
            "edgefn_buffer_records",
            "Records in the buffer.",
            &[(none, g.buffer_records as f64)],
        )?;
        gauge(
            e,
            "edgefn_buffer_bytes",
            "Bytes (topics and payloads) in the buffer.",
            &[(none, g.buffer_bytes as f64)],
        )?;
        gauge(
            e,
            "edgefn_buffer_oldest_record_age_seconds",
            "Age of the oldest buffered record (0: none).",
            &[(none, g.oldest_record_age_s.unwrap_or(0.0))],
        )?;
        counter(
            e,
            "edgefn_records_buffered",
            "Records written to the buffer.",
            &[(none, c.records_buffered)],
        )?;
        counter(
            e,
            "edgefn_records_forwarded",
            "Records the upstream acknowledged.",
            &[(none, c.forwarded)],
        )?;
        counter(
            e,
            "edgefn_records_resent",
            "Records sent again after a reconnect.",
            &[(none, c.resent)],
        )?;
        counter(
            e,
            "edgefn_records_dropped",
            "Records lost, by reason.",
            &[
                (&[("reason", "drop_oldest")], c.dropped_records),
                (&[("reason", "upstream_rejected")], c.upstream_rejected),
            ],
        )?;
        gauge(
            e,
            "edgefn_upstream_connected",
            "1 while the upstream connection is up.",
            &[(none, f64::from(u8::from(g.upstream_connected)))],
        )?;
        counter(
            e,
            "edgefn_upstream_refusals",
            "PUBACKs refusing a record for who sends it (not authorised, quota exceeded, ...): the record is kept and sent again.",
            &[(none, c.upstream_refusals)],
        )?;
        gauge(
            e,
            "edgefn_upstream_refused_topics",
            "Topics whose records the upstream refuses now (held back, tried again after a backoff).",
            &[(none, c.upstream_refused_topics as f64)],
        )?;
        gauge(
            e,
            "edgefn_upstream_refusal_reason",
            "MQTT reason code of the last refusal while a topic is refused (135: not authorised; 256: it closed the connection); 0 when none is.",
            &[(none, c.upstream_refusal_reason as f64)],
        )?;
        counter(
            e,
            "edgefn_bundles_refused",
            "Bundles refused on the control topics (junk included).",
            &[(none, c.bundles_refused)],
        )?;
        counter(
            e,
            "edgefn_rollbacks",
            "New versions whose instances failed to start: rolled back, or kept (rollback = never, or the version before is below the floor).",
            &[
                (&[("outcome", "rolled_back")], c.rollbacks),
                (&[("outcome", "declined")], c.rollbacks_declined),
            ],
        )?;
        counter(
            e,
            "edgefn_metrics_connections_dropped",
            "Connections to the metrics listener closed by it, by reason.",
            &[
                (&[("reason", "limit")], c.metrics_connections_refused),
                (&[("reason", "timeout")], c.metrics_connections_cut),
            ],
        )?;
        counter(
            e,
            "edgefn_dead_letters_written",
            "Inputs written to the dead letters.",
            &[(none, c.dead_letters)],
        )?;
        counter(
            e,
            "edgefn_dead_letters_dropped",
            "Old dead letters deleted to keep within their bound.",
            &[(none, c.dead_letters_dropped)],
        )?;
        counter(
            e,
            "edgefn_replays",
            "Dead letters replayed, by outcome.",
            &[
                (&[("outcome", "done")], c.replays_done),
                (&[("outcome", "failed")], c.replays_failed),
                (&[("outcome", "refused")], c.replays_refused),
            ],
        )?;
        counter(
            e,
            "edgefn_commits",
            "Group commits.",
            &[(none, c.commit_batches)],
        )?;
        counter(
            e,
            "edgefn_commit_failures",
            "Failed commit attempts (retried).",
            &[(none, c.commit_failures)],
        )?;
        if let Some(p) = g.commit_latency {
            gauge(
                e,
                "edgefn_commit_duration_seconds",
                "Group commit time, quantiles of the most recent commits.",
                &[
                    (&[("quantile", "0.5")][..], p.p50_ms / 1000.0),
                    (&[("quantile", "0.95")][..], p.p95_ms / 1000.0),
                    (&[("quantile", "0.99")][..], p.p99_ms / 1000.0),
                ],
            )?;
        }
        if let Some(d) = g.disk_write_bytes {
            counter(
                e,
                "edgefn_disk_written_bytes",
                "Bytes written to storage by the daemon (/proc/self/io write_bytes).",
                &[(none, d)],
            )?;
        }
        if let Some(d) = g.disk_bytes_per_message {
            gauge(
                e,
                "edgefn_disk_bytes_per_message",
                "Bytes written to storage per committed message, over the last 5 minutes.",
                &[(none, d)],
            )?;
        }
        if let Some(d) = g.disk_bytes_per_day {
            gauge(
                e,
                "edgefn_disk_bytes_per_day",
                "Bytes written to storage per day at the rate of the last 5 minutes.",
                &[(none, d)],
            )?;
        }
        counter(
            e,
            "edgefn_local_publishes",
            "Messages functions published, handed to the local broker after their commit.",
            &[(none, c.local_publishes)],
        )?;
        counter(
            e,
            "edgefn_local_publishes_dropped",
            "Of those, lost: the queue to the local broker full, or refused by it.",
            &[(none, c.local_publishes_dropped)],
        )?;
        gauge(
            e,
            "edgefn_broker_sessions",
            "Embedded broker: sessions (connected and persistent offline).",
            &[(none, c.broker_sessions as f64)],
        )?;
        gauge(
            e,
            "edgefn_broker_connections",
            "Embedded broker: open connections.",
            &[(none, c.broker_connections as f64)],
        )?;

        let fs = &self.0.functions;
        let labels: Vec<[(&str, &str); 1]> =
            fs.iter().map(|f| [("function", f.name.as_str())]).collect();
        let each = |v: &dyn Fn(&FunctionReport) -> u64| -> Vec<(&[(&str, &str)], u64)> {
            fs.iter()
                .zip(&labels)
                .map(|(f, l)| (&l[..], v(f)))
                .collect()
        };
        let version = |f: &FunctionReport| f.version.to_string();
        let versions: Vec<String> = fs.iter().map(version).collect();
        let info: Vec<[(&str, &str); 3]> = fs
            .iter()
            .zip(&versions)
            .map(|(f, v)| {
                [
                    ("function", f.name.as_str()),
                    ("version", v.as_str()),
                    ("origin", f.origin.as_str()),
                ]
            })
            .collect();
        gauge(
            e,
            "edgefn_function_info",
            "Each function that runs: 1, labelled with its version and origin.",
            &info.iter().map(|l| (&l[..], 1.0)).collect::<Vec<_>>(),
        )?;
        let outcomes: Vec<Vec<(&str, &str)>> = fs
            .iter()
            .flat_map(|f| {
                std::iter::once(vec![("function", f.name.as_str()), ("outcome", "ok")]).chain(
                    f.errors
                        .keys()
                        .map(|k| vec![("function", f.name.as_str()), ("outcome", k.as_str())]),
                )
            })
            .collect();
        let mut values = Vec::new();
        let mut i = 0;
        for f in fs {
            values.push((&outcomes[i][..], f.succeeded));
            i += 1;
            for n in f.errors.values() {
                values.push((&outcomes[i][..], *n));
                i += 1;
            }
        }
        counter(
            e,
            "edgefn_invocations",
            "Attempts, by function and outcome (ok or the failure's kind).",
            &values,
        )?;
        counter(
            e,
            "edgefn_retries",
            "Attempts that were retries.",
            &each(&|f| f.retries),
        )?;
        counter(
            e,
            "edgefn_function_dead_letters",
            "Inputs that failed every attempt.",
            &each(&|f| f.dead_letters),
        )?;
        counter(
            e,
            "edgefn_throttles",
            "Messages that waited for a free instance.",
            &each(&|f| f.throttles),
        )?;
        counter(
            e,
            "edgefn_emitted_records",
            "Records emitted by successful invocations.",
            &each(&|f| f.emitted_records),
        )?;
        counter(
            e,
            "edgefn_emitted_bytes",
            "Bytes of those records.",
            &each(&|f| f.emitted_bytes),
        )?;
        counter(
            e,
            "edgefn_published",
            "Local publishes of successful invocations.",
            &each(&|f| f.published),
        )?;
        let denied: Vec<Vec<(&str, &str)>> = fs
            .iter()
            .flat_map(|f| {
                ["emit", "publish", "state_set"]
                    .into_iter()
                    .map(|call| vec![("function", f.name.as_str()), ("call", call)])
            })
            .collect();
        let denied_values: Vec<(&[(&str, &str)], u64)> = fs
            .iter()
            .flat_map(|f| [f.emit_denied, f.publish_denied, f.state_refused])
            .zip(&denied)
            .map(|(v, l)| (&l[..], v))
            .collect();
        counter(
            e,
            "edgefn_calls_refused",
            "Import calls refused: emit/publish outside the allow-lists, state_set past state_limit.",
            &denied_values,
        )?;
        gauge(
            e,
            "edgefn_state_bytes",
            "Bytes of the function's state.",
            &fs.iter()
                .zip(&labels)
                .map(|(f, l)| (&l[..], f.state_bytes as f64))
                .collect::<Vec<_>>(),
        )?;
        counter(
            e,
            "edgefn_schedule_skipped",
            "Scheduled runs skipped: the one before was still going.",
            &each(&|f| f.schedule_skipped),
        )?;
        let mut durations = Vec::new();
        let qlabels: Vec<Vec<(&str, &str)>> = fs
            .iter()
            .flat_map(|f| {
                ["0.5", "0.95", "0.99"]
                    .into_iter()
                    .map(|q| vec![("function", f.name.as_str()), ("quantile", q)])
            })
            .collect();
        for (i, f) in fs.iter().enumerate() {
            if let Some(p) = f.duration {
                for (j, v) in [p.p50_ms, p.p95_ms, p.p99_ms].into_iter().enumerate() {
                    durations.push((&qlabels[i * 3 + j][..], v / 1000.0));
                }
            }
        }
        gauge(
            e,
            "edgefn_invocation_duration_seconds",
            &format!("Successful attempts' duration, quantiles of the most recent {WINDOW}."),
            &durations,
        )?;
        Ok(())
    }
}

/// The report in the Prometheus text format (OpenMetrics).
pub fn prometheus(report: Report) -> String {
    let mut registry = prometheus_client::registry::Registry::default();
    registry.register_collector(Box::new(Exporter(report)));
    let mut out = String::new();
    prometheus_client::encoding::text::encode(&mut out, &registry).expect("writing to a String");
    out
}

/// The content type of [`prometheus`]'s text.
pub const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Most connections the metrics listener serves at once. A scraper needs
/// one; beyond this a new connection is closed at once (counted), so a
/// flood of connections holds at most this many descriptors and tasks.
pub const MAX_CONNECTIONS: usize = 16;

/// Longest a client may take to send a request's headers before its
/// connection is closed (counted): a half-sent request holds a slot only
/// this long.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(5);

/// Longest one connection lives, whatever it does (a slow reader of a
/// large report included).
pub const CONNECTION_TIMEOUT: Duration = Duration::from_secs(30);

/// Connections refused or cut, logged per minute (the rest counted).
static LISTENER_LOGGED: crate::throttle::Throttle = crate::throttle::Throttle::per_minute(3);

/// Serves `/metrics` and `/metrics.json` on `listener` until `shutdown`,
/// at most [`MAX_CONNECTIONS`] at a time, each within [`HEADER_TIMEOUT`]
/// and [`CONNECTION_TIMEOUT`]; what is refused or cut is counted in
/// `metrics`.
pub async fn serve(
    listener: tokio::net::TcpListener,
    telemetry: Arc<Telemetry>,
    metrics: Arc<crate::metrics::Metrics>,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) {
    use crate::metrics::Metrics;
    use axum::routing::get;
    let report = |t: Arc<Telemetry>| async move {
        tokio::task::spawn_blocking(move || t.report())
            .await
            .expect("report task")
    };
    let app = axum::Router::new()
        .route(
            "/metrics",
            get({
                let t = telemetry.clone();
                move || async move {
                    let r = report(t).await;
                    (
                        [(axum::http::header::CONTENT_TYPE, OPENMETRICS)],
                        prometheus(r),
                    )
                }
            }),
        )
        .route(
            "/metrics.json",
            get({
                let t = telemetry.clone();
                move || async move {
                    let json = serde_json::to_vec(&report(t).await).expect("report JSON");
                    (
                        [(axum::http::header::CONTENT_TYPE, "application/json")],
                        json,
                    )
                }
            }),
        );
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    let mut connections = tokio::task::JoinSet::new();
    loop {
        let accepted = tokio::select! {
            _ = crate::shutdown::stopped(&mut shutdown) => break,
            Some(_) = connections.join_next(), if !connections.is_empty() => continue,
            accepted = listener.accept() => accepted,
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(e) => {
                // Out of descriptors, most likely: wait rather than spin.
                if let Some(not_logged) = LISTENER_LOGGED.admit() {
                    tracing::warn!(error = %e, not_logged, "the metrics listener cannot accept a connection");
                }
                tokio::select! {
                    _ = crate::shutdown::stopped(&mut shutdown) => break,
                    _ = tokio::time::sleep(Duration::from_millis(100)) => continue,
                }
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            Metrics::add(&metrics.metrics_connections_refused, 1);
            if let Some(not_logged) = LISTENER_LOGGED.admit() {
                tracing::warn!(
                    max = MAX_CONNECTIONS,
                    not_logged,
                    "the metrics listener is serving its most connections: a new one is closed"
                );
            }
            continue;
        };
        let service = hyper_util::service::TowerToHyperService::new(app.clone());
        let metrics = metrics.clone();
        connections.spawn(async move {
            let _slot = slot;
            let connection = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .keep_alive(false)
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
            let cut = match tokio::time::timeout(CONNECTION_TIMEOUT, connection).await {
                Ok(Ok(())) => false,
                Ok(Err(e)) => e.is_timeout(),
                Err(_) => true,
            };
            if cut {
                Metrics::add(&metrics.metrics_connections_cut, 1);
            }
        });
    }
    connections.shutdown().await;
}

#[cfg(test)]
mod tests {
    use super::*;

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
