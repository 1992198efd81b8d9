//! The gateway's one TOML file: typed, documented, checked.
//!
//! Loading happens in two passes, like Vector's config validation:
//!
//! 1. **Structure** — the `config` crate reads the TOML file and `EDGEFN_…`
//!    environment overrides (`EDGEFN_UPSTREAM__PASSWORD=…` sets
//!    `upstream.password`), and serde maps it onto [`RawConfig`]. Unknown keys
//!    and wrong types stop here, with the key named.
//! 2. **Meaning** — small `check_*` functions turn the raw values (human sizes
//!    like `"64MiB"`, durations like `"250ms"`, URLs, topic filters) into a
//!    [`Config`], collecting *every* problem so `edgefn check` reports them all
//!    at once.
//!
//! Defaults are named functions so that the documentation of a default and its
//! value live in one place.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::route::TopicFilter;

/// The function name of dead letters for records the upstream refused:
/// reserved, no function may take it.
pub const UPSTREAM: &str = "upstream";
/// Everything that can be wrong with a configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read or is not valid TOML, or a key is unknown or
    /// has the wrong type. The message comes from the TOML/serde layer and
    /// names the key.
    #[error("{path}: {message}")]
    Structure {
        /// The configuration file.
        path: PathBuf,
        /// What is wrong, naming the key.
        message: String,
    },
    /// One or more values are well-formed TOML but do not make sense.
    #[error("{path}: {} problem(s):\n{}", .problems.len(), Problems(.problems))]
    Invalid {
        /// The configuration file.
        path: PathBuf,
        /// Every problem found, each naming its key.
        problems: Vec<Problem>,
    },
}

/// One problem with one key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// The key, as a path a user can find in the file, e.g. `functions[0].timeout`.
    pub key: String,
    /// What was found and what was expected.
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.key, self.message)
    }
}

struct Problems<'a>(&'a [Problem]);

impl fmt::Display for Problems<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, p) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "  - {p}")?;
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------
// Raw structure, exactly as written in the file.
// ---------------------------------------------------------------------------

/// The file as written; strings for sizes and durations are parsed later.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    gateway: RawGateway,
    #[serde(default)]
    local: RawLocal,
    upstream: Option<RawUpstream>,
    #[serde(default)]
    buffer: RawBuffer,
    deploy: Option<RawDeploy>,
    metrics: Option<RawMetrics>,
    #[serde(default)]
    functions: Vec<FunctionManifest>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMetrics {
    listen: Option<String>,
    interval: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDeploy {
    broker: Option<String>,
    #[serde(default)]
    groups: Vec<String>,
    #[serde(default)]
    trusted_keys: Vec<String>,
    allow_unsigned: Option<bool>,
    max_bundle_size: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawGateway {
    id: String,
    data_dir: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLocal {
    url: Option<String>,
    embedded: Option<bool>,
    listen: Option<String>,
    client_id: Option<String>,
    username: Option<String>,
    password: Option<String>,
    in_flight: Option<i64>,
    session_expiry: Option<String>,
    keep_alive: Option<String>,
    max_message_size: Option<String>,
    ca_file: Option<String>,
    cert_file: Option<String>,
    key_file: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawUpstream {
    url: String,
    topic_prefix: Option<String>,
    client_id: Option<String>,
    username: Option<String>,
    password: Option<String>,
    in_flight: Option<i64>,
    keep_alive: Option<String>,
    max_message_size: Option<String>,
    refused_topic_timeout: Option<String>,
    ca_file: Option<String>,
    cert_file: Option<String>,
    key_file: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBuffer {
    max_size: Option<String>,
    full_policy: Option<String>,
    durability: Option<String>,
    max_batch: Option<i64>,
    dead_letters_max_size: Option<String>,
    commit_delay: Option<String>,
}

/// A `[[functions]]` table as written, before its checks: also the
/// manifest of a deployed bundle (where `module` is absent, the module
/// being in the bundle). Sizes and durations are text, as in the file.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FunctionManifest {
    /// `name`
    pub name: String,
    /// `module`: a path; absent in a bundle.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub module: Option<String>,
    /// `triggers`
    #[serde(default)]
    pub triggers: Vec<String>,
    /// `env`
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    /// `memory_limit`
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_limit: Option<String>,
    /// `timeout`
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<String>,
    /// `concurrency`
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub concurrency: Option<i64>,
    /// `retries`
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retries: Option<i64>,
    /// `fuel`
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fuel: Option<i64>,
    /// `max_record_size`
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_record_size: Option<String>,
    /// `max_emit_bytes`
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_emit_bytes: Option<String>,
    /// `log_rate_limit`
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log_rate_limit: Option<i64>,
    /// `schedule`
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schedule: Option<String>,
    /// `state_limit`
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state_limit: Option<String>,
    /// `emit_allow`
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub emit_allow: Option<Vec<String>>,
    /// `publish_allow`
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub publish_allow: Option<Vec<String>>,
    /// `rollback`: in a bundle only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollback: Option<String>,
}

impl FunctionManifest {
    /// Checks a bundle's manifest as strictly as a `[[functions]]` table
    /// (problems keyed `manifest.…`). The result's `module` is empty: the
    /// module comes with the bundle.
    pub fn check(self) -> Result<FunctionConfig, Vec<Problem>> {
        let mut p = Checker::default();
        if self.module.is_some() {
            p.push(
                "manifest.module",
                "not allowed in a bundle: the module is the bundle's own",
            );
        }
        let f = check_function(&mut p, "manifest", self, Path::new(""));
        if p.problems.is_empty() {
            Ok(f)
        } else {
            Err(p.problems)
        }
    }
}

// ---------------------------------------------------------------------------
// Checked configuration.
// ---------------------------------------------------------------------------

/// A checked configuration: every value parsed and within range.
#[derive(Debug, Clone)]
pub struct Config {
    /// `[gateway]`
    pub gateway: GatewayConfig,
    /// `[local]`: where device messages come from.
    pub local: LocalConfig,
    /// `[upstream]`: where emitted records go. `None` keeps everything in the
    /// buffer (useful on a bench, or before the cloud side exists).
    pub upstream: Option<UpstreamConfig>,
    /// `[buffer]`
    pub buffer: BufferConfig,
    /// `[deploy]`: functions pushed over MQTT. `None`: only the
    /// configuration's functions run.
    pub deploy: Option<DeployConfig>,
    /// `[metrics]`
    pub metrics: MetricsConfig,
    /// `[[functions]]`
    pub functions: Vec<FunctionConfig>,
    /// Settings that work but are probably not what the operator wants
    /// (a password sent unencrypted across the network): printed by
    /// `edgefn check`, logged by `edgefn run`.
    pub warnings: Vec<Problem>,
}

/// `[deploy]`: where signed bundles come from and who may sign them.
#[derive(Debug, Clone)]
pub struct DeployConfig {
    /// The broker carrying the control topics.
    pub broker: DeployBroker,
    /// Groups this gateway belongs to (bundles for a group reach all its
    /// gateways).
    pub groups: Vec<String>,
    /// Keys whose signatures are accepted.
    pub trusted_keys: Vec<ed25519_dalek::VerifyingKey>,
    /// Whether unsigned bundles are accepted.
    pub allow_unsigned: bool,
    /// Largest bundle, bytes.
    pub max_bundle_size: usize,
}

/// `deploy.broker`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeployBroker {
    /// The `[upstream]` broker (the cloud).
    Upstream,
    /// The `[local]` broker.
    Local,
}

/// Default `deploy.max_bundle_size`.
fn default_max_bundle_size() -> &'static str {
    "16MiB"
}

/// `[gateway]`: who this gateway is and where it keeps its data.
#[derive(Debug, Clone)]
pub struct GatewayConfig {
    /// Unique per gateway: part of every record id and of client ids.
    pub id: String,
    /// Holds the SQLite database (`edgefn.db`). Relative paths are relative
    /// to the configuration file.
    pub data_dir: PathBuf,
}

/// `[local]`: the broker devices publish to.
#[derive(Debug, Clone)]
pub struct LocalConfig {
    /// An existing broker, or the embedded one.
    pub source: LocalSource,
    /// Largest payload accepted from a device; larger messages are refused
    /// and counted.
    pub max_message_size: usize,
}

/// Where device messages come from.
#[derive(Debug, Clone)]
pub enum LocalSource {
    /// An existing broker (Mosquitto) reached as an MQTT 5 client.
    Broker(BrokerClientConfig),
    /// The broker built into edgefn, listening on this address.
    Embedded {
        /// TCP address devices connect to.
        listen: SocketAddr,
    },
}

/// How edgefn connects, as a client, to a broker.
#[derive(Debug, Clone)]
pub struct BrokerClientConfig {
    /// Host name or address.
    pub host: String,
    /// TCP port.
    pub port: u16,
    /// MQTT client id; it names the persistent session, so it must be stable
    /// across restarts and unique per broker.
    pub client_id: String,
    /// Optional user name.
    pub username: Option<String>,
    /// Optional password (set it with `EDGEFN_LOCAL__PASSWORD` or
    /// `EDGEFN_UPSTREAM__PASSWORD` rather than in the file).
    pub password: Option<String>,
    /// Unacknowledged QoS 1 messages allowed in flight (the MQTT 5 Receive
    /// Maximum for ingest, the publish window for upstream).
    pub in_flight: u16,
    /// How long the broker keeps the session (and queues for it) while
    /// edgefn is disconnected.
    pub session_expiry: Duration,
    /// MQTT keep-alive interval.
    pub keep_alive: Duration,
    /// TLS, for an `mqtts://` URL.
    pub tls: Option<crate::tls::Tls>,
}

impl BrokerClientConfig {
    /// Names the persistent session this client has on its broker (what
    /// the broker keys it by is the client id; the address tells brokers
    /// apart).
    pub fn session_name(&self) -> String {
        format!("{} {}", self.url(), self.client_id)
    }

    /// `mqtt://HOST:PORT` or `mqtts://HOST:PORT`, as for a user.
    pub fn url(&self) -> String {
        let scheme = if self.tls.is_some() { "mqtts" } else { "mqtt" };
        if self.host.contains(':') {
            format!("{scheme}://[{}]:{}", self.host, self.port)
        } else {
            format!("{scheme}://{}:{}", self.host, self.port)
        }
    }
}

/// `[upstream]`: the cloud broker records are forwarded to.
#[derive(Debug, Clone)]
pub struct UpstreamConfig {
    /// The connection.
    pub broker: BrokerClientConfig,
    /// Prepended to every emitted topic, e.g. `site/pi-01/`.
    pub topic_prefix: String,
    /// Largest packet exchanged with the upstream broker.
    pub max_message_size: usize,
    /// How long the upstream may refuse one topic's records (not
    /// authorised, quota exceeded, …) while it accepts other topics before
    /// that topic's records go to the dead letters; while it refuses every
    /// topic, records are kept however long that lasts.
    pub refused_topic_timeout: Duration,
}

/// What happens when the buffer is full.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FullPolicy {
    /// Stop acknowledging devices until the upstream drains the buffer:
    /// nothing acknowledged is ever dropped (the default).
    Backpressure,
    /// Delete the oldest records to make room; every dropped record is
    /// counted and logged.
    DropOldest,
}

/// How hard a commit tries to be on disk before a device is acknowledged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// `synchronous = FULL`: every group commit is fsynced; survives power cuts.
    Full,
    /// `synchronous = NORMAL`: survives a crash of edgefn, not a power cut;
    /// fewer flash writes.
    Relaxed,
}

/// `[buffer]`: the SQLite outbox.
#[derive(Debug, Clone)]
pub struct BufferConfig {
    /// Bound on the bytes of buffered records (topics + payloads).
    pub max_size: u64,
    /// What to do when `max_size` is reached.
    pub full_policy: FullPolicy,
    /// fsync policy.
    pub durability: Durability,
    /// Most invocation outcomes in one group commit.
    pub max_batch: usize,
    /// Bound on the bytes of dead letters (function names, topics, payloads
    /// and error texts); beyond it the oldest are deleted, counted and
    /// logged.
    pub dead_letters_max_size: u64,
    /// How long a commit waits, after its first message is ready, for more
    /// to share its fsync (0: none). Every message's PUBACK waits up to
    /// this much longer; in exchange fewer commits write fewer pages.
    pub commit_delay: Duration,
}

impl Default for BufferConfig {
    /// The defaults of an empty `[buffer]` table.
    fn default() -> BufferConfig {
        check_buffer(&mut Checker::default(), RawBuffer::default())
    }
}

/// `[[functions]]`: one function and its trigger and limits.
#[derive(Debug, Clone)]
pub struct FunctionConfig {
    /// Unique name; shows in logs, metrics and dead letters.
    pub name: String,
    /// Path of the `.wasm` module (relative to the configuration file).
    pub module: PathBuf,
    /// MQTT topic filters that trigger it.
    pub triggers: Vec<TopicFilter>,
    /// Environment variables the guest sees through WASI.
    pub env: BTreeMap<String, String>,
    /// Largest linear memory an instance may grow to.
    pub memory_limit: usize,
    /// Wall-clock limit of one invocation.
    pub timeout: Duration,
    /// Warm instances, i.e. invocations that may run at once.
    pub concurrency: usize,
    /// Further attempts, each on a fresh instance, before a message goes to
    /// the dead letters.
    pub retries: u32,
    /// Largest payload of one emitted or published record.
    pub max_record_size: usize,
    /// WebAssembly operations one invocation may execute, if the function
    /// wants a deterministic budget besides its wall-clock `timeout`.
    pub fuel: Option<u64>,
    /// Most bytes (topics and payloads) one invocation may emit, and
    /// separately publish: with the record count, what bounds the memory a
    /// message's outcome holds until it is committed.
    pub max_emit_bytes: usize,
    /// Log lines per second (from `log`, stdout and stderr) the function's
    /// instances may write together; the rest are counted and reported.
    pub log_rate_limit: u32,
    /// When it runs besides its triggers, if at all.
    pub schedule: Option<crate::schedule::Schedule>,
    /// Most bytes of keys and values its durable state may hold.
    pub state_limit: usize,
    /// Topic filters it may emit to (before the upstream prefix); `None`:
    /// any.
    pub emit_allow: Option<Vec<TopicFilter>>,
    /// Topic filters it may publish to on the local broker; empty: none.
    pub publish_allow: Vec<TopicFilter>,
    /// When a gateway may roll a new version of it back on its own (a
    /// deployed function's; those of the configuration file are never
    /// rolled back).
    pub rollback: Rollback,
}

/// `rollback`: when a gateway may go back, on its own, from a new version
/// of a deployed function to the one before (docs/DEPLOY.md "Rollback").
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Rollback {
    /// Only on evidence no input can produce: the version's instances
    /// cannot start.
    #[default]
    Auto,
    /// Never: the publisher decides, by signing another version.
    Never,
}

/// Default `[gateway] data_dir`.
fn default_data_dir() -> &'static str {
    "/var/lib/edgefn"
}
/// Default `[local] listen` for the embedded broker: the MQTT port, on all
/// interfaces, since devices are other machines.
fn default_listen() -> &'static str {
    "0.0.0.0:1883"
}
/// Default in-flight window towards the local broker. Hundreds, so a stock
/// Mosquitto (which would otherwise hold an MQTT 3.1.1 client to 20) keeps
/// edgefn's commits batched; each unacknowledged message costs its size in
/// memory here.
fn default_local_in_flight() -> i64 {
    256
}
/// Default in-flight window towards the upstream broker.
fn default_upstream_in_flight() -> i64 {
    64
}
/// Default session expiry: a broker keeps edgefn's session and queue for a
/// week of downtime.
fn default_session_expiry() -> &'static str {
    "7d"
}
/// Default keep-alive.
fn default_keep_alive() -> &'static str {
    "30s"
}
/// Default largest device message.
fn default_max_message_size() -> &'static str {
    "256KiB"
}
/// Default buffer bound.
fn default_buffer_size() -> &'static str {
    "256MiB"
}
/// Default bound on dead letters: a quarter of the buffer's, so failing
/// inputs can never take more than a fraction of the room records need.
fn default_dead_letters_max_size(max_size: u64) -> u64 {
    max_size / 4
}
/// Longest `[buffer] commit_delay`: a device's PUBACK waits for it.
const MAX_COMMIT_DELAY: Duration = Duration::from_secs(1);

/// Default invocations per group commit.
fn default_max_batch() -> i64 {
    512
}
/// Default memory per instance.
fn default_memory_limit() -> &'static str {
    "16MiB"
}
/// Default invocation timeout.
fn default_timeout() -> &'static str {
    "1s"
}
/// Default largest emitted record.
fn default_max_record_size() -> &'static str {
    "256KiB"
}
/// Default bytes one invocation may emit: four records of the largest
/// default size. The pipeline holds up to about two thousand messages'
/// outcomes at once, so this is what bounds its memory.
fn default_max_emit_bytes() -> &'static str {
    "1MiB"
}
/// Default log lines per second per function: a chatty function is seen,
/// a flooding one cannot fill the journal (journald itself allows a
/// service about 330 lines per second by default).
fn default_log_rate_limit() -> i64 {
    100
}

/// Shortest keep-alive accepted: the MQTT client (rumqttc) refuses less.
const MIN_KEEP_ALIVE: Duration = Duration::from_secs(5);

/// Largest size accepted for message and record limits: what an MQTT
/// packet can carry (256 MiB).
const MAX_MESSAGE_SIZE: u64 = 256 * 1024 * 1024 - 1;

/// Smallest memory limit accepted: one 64 KiB wasm page is too little for any
/// real guest, and a typo like `"16KiB"` should be caught.
const MIN_MEMORY_LIMIT: u64 = 128 * 1024;

impl Config {
    /// Reads, checks and returns the configuration in `path`.
    ///
    /// Fails with [`ConfigError::Structure`] on unreadable or malformed files
    /// and unknown keys, and with [`ConfigError::Invalid`] listing every
    /// semantic problem otherwise. The TLS files of `mqtts://` URLs (and,
    /// without a `ca_file`, the system's CA certificates) are read here;
    /// module files are not opened here, see `edgefn check`.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let raw = Self::load_raw(path)?;
        let base = path.parent().unwrap_or(Path::new("."));
        Self::from_raw(raw, base).map_err(|problems| ConfigError::Invalid {
            path: path.to_owned(),
            problems,
        })
    }

    fn load_raw(path: &Path) -> Result<RawConfig, ConfigError> {
        let structure = |message: String| ConfigError::Structure {
            path: path.to_owned(),
            message,
        };
        if !path.is_file() {
            return Err(structure("no such file".into()));
        }
        // Only variables that name a section (`EDGEFN_SECTION__KEY`) are
        // overrides; `EDGEFN_LOG` and friends are not configuration.
        let overrides: config::Map<String, String> = std::env::vars()
            .filter(|(k, _)| {
                k.strip_prefix("EDGEFN_")
                    .is_some_and(|rest| rest.contains("__"))
            })
            .collect();
        let built = config::Config::builder()
            .add_source(config::File::from(path).format(config::FileFormat::Toml))
            .add_source(
                config::Environment::with_prefix("EDGEFN")
                    .prefix_separator("_")
                    .separator("__")
                    // Values stay text (a password "007" stays "007");
                    // numeric keys are converted from text when read.
                    .try_parsing(false)
                    .source(Some(overrides)),
            )
            .build()
            .map_err(|e| structure(e.to_string()))?;
        built
            .try_deserialize::<RawConfig>()
            .map_err(|e| structure(e.to_string()))
    }

    /// Checks raw values, collecting every problem. Relative paths are
    /// resolved against `base` (the configuration file's directory).
    pub fn from_raw(raw: RawConfig, base: &Path) -> Result<Config, Vec<Problem>> {
        let mut p = Checker::default();

        let id = raw.gateway.id.trim().to_owned();
        if id.is_empty() || id.contains(['/', '+', '#', ' ']) {
            p.push(
                "gateway.id",
                format!("{id:?} must be non-empty, without spaces, '/', '+' or '#'"),
            );
        }
        let data_dir = base.join(
            raw.gateway
                .data_dir
                .as_deref()
                .unwrap_or(default_data_dir()),
        );

        let local = check_local(&mut p, raw.local, &id, base);
        let has_upstream = raw.upstream.is_some();
        let upstream = raw.upstream.map(|u| check_upstream(&mut p, u, &id, base));
        let buffer = check_buffer(&mut p, raw.buffer);

        let mut names = BTreeSet::new();
        let mut functions = Vec::new();
        for (i, f) in raw.functions.into_iter().enumerate() {
            let key = format!("functions[{i}]");
            if !names.insert(f.name.clone()) {
                p.push(
                    format!("{key}.name"),
                    format!("{:?} is used by another function", f.name),
                );
            }
            if f.module.is_none() {
                p.push(
                    format!("{key}.module"),
                    "missing: the path of the function's .wasm module",
                );
            }
            if f.rollback.is_some() {
                p.push(
                    format!("{key}.rollback"),
                    "only in a deployed bundle (edgefn deploy --rollback): \
                     the configuration file's functions are never rolled back",
                );
            }
            functions.push(check_function(&mut p, &key, f, base));
        }
        let embedded = matches!(
            local.as_ref().map(|l| &l.source),
            Some(LocalSource::Embedded { .. })
        );
        let deploy = raw
            .deploy
            .map(|d| check_deploy(&mut p, d, has_upstream, embedded));
        let metrics = check_metrics(&mut p, raw.metrics);
        if functions.is_empty() && deploy.is_none() {
            p.push(
                "functions",
                "at least one [[functions]] table is needed (or a [deploy] section, to receive functions over MQTT)",
            );
        }

        if !p.problems.is_empty() {
            return Err(p.problems);
        }
        Ok(Config {
            gateway: GatewayConfig { id, data_dir },
            local: local.expect("checked"),
            upstream: upstream.map(|u| u.expect("checked")),
            buffer,
            deploy,
            metrics,
            functions,
            warnings: p.warnings,
        })
    }
}

/// `[metrics]`: where the metrics model is shown (docs/CONFIG.md).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetricsConfig {
    /// The HTTP listener for `/metrics` and `/metrics.json`; none: off.
    pub listen: Option<SocketAddr>,
    /// How often the report is published on `edgefn/<id>/metrics`.
    pub interval: Duration,
}

impl Default for MetricsConfig {
    fn default() -> MetricsConfig {
        MetricsConfig {
            listen: None,
            interval: Duration::from_secs(60),
        }
    }
}

fn check_metrics(p: &mut Checker, raw: Option<RawMetrics>) -> MetricsConfig {
    let Some(raw) = raw else {
        return MetricsConfig::default();
    };
    let listen = raw.listen.as_deref().and_then(|l| {
        l.parse::<SocketAddr>()
            .map_err(|_| {
                p.push(
                    "metrics.listen",
                    format!("{l:?} is not an address; expected e.g. \"127.0.0.1:9464\""),
                )
            })
            .ok()
    });
    let interval = p.duration("metrics.interval", raw.interval.as_deref(), "60s");
    if interval < Duration::from_secs(1) {
        p.push(
            "metrics.interval",
            format!("{interval:?} is too short; expected at least 1s"),
        );
    }
    MetricsConfig { listen, interval }
}

/// Collects problems (and warnings) while the check goes on.
#[derive(Default)]
struct Checker {
    problems: Vec<Problem>,
    warnings: Vec<Problem>,
}

impl Checker {
    fn push(&mut self, key: impl Into<String>, message: impl Into<String>) {
        self.problems.push(Problem {
            key: key.into(),
            message: message.into(),
        });
    }

    /// Records `message` for each key of `section` that is set although it
    /// does not apply.
    fn not_applicable(&mut self, section: &str, keys: &[(&str, bool)], message: &str) {
        for (key, set) in keys {
            if *set {
                self.push(format!("{section}.{key}"), message);
            }
        }
    }

    /// Parses a human size like `"64MiB"`; on error records it and returns
    /// the (valid) default instead so checking can go on.
    fn size(&mut self, key: &str, value: Option<&str>, default: &str) -> u64 {
        let text = value.unwrap_or(default);
        match text.parse::<bytesize::ByteSize>() {
            Ok(b) if b.as_u64() > 0 => b.as_u64(),
            _ => {
                self.push(
                    key,
                    format!("{text:?} is not a size; expected e.g. \"64MiB\", \"512KiB\""),
                );
                default
                    .parse::<bytesize::ByteSize>()
                    .map_or(0, |b| b.as_u64())
            }
        }
    }

    /// Parses a human duration like `"250ms"`.
    fn duration(&mut self, key: &str, value: Option<&str>, default: &str) -> Duration {
        let text = value.unwrap_or(default);
        match humantime::parse_duration(text) {
            Ok(d) if !d.is_zero() => d,
            _ => {
                self.push(
                    key,
                    format!("{text:?} is not a duration; expected e.g. \"250ms\", \"30s\", \"1h\""),
                );
                humantime::parse_duration(default).unwrap_or(Duration::from_secs(1))
            }
        }
    }

    /// Checks an integer is within `range`.
    fn int(&mut self, key: &str, value: Option<i64>, default: i64, range: (i64, i64)) -> i64 {
        let v = value.unwrap_or(default);
        if v < range.0 || v > range.1 {
            self.push(
                key,
                format!("{v} is out of range; expected {} to {}", range.0, range.1),
            );
            return default;
        }
        v
    }
}

/// A broker URL, parsed.
struct BrokerUrl {
    /// A host name or an IP address (IPv6 without its brackets).
    host: String,
    /// The port, or the scheme's default.
    port: u16,
    /// `mqtts://`
    tls: bool,
}

/// A broker connection for a command-line tool (`edgefn deploy`): `url`
/// and the TLS files (CA, client certificate, its key) checked as for
/// `[upstream]`, each problem keyed by its flag.
pub fn tool_broker(
    url: &str,
    files: [Option<PathBuf>; 3],
    username: Option<String>,
    password: Option<String>,
    client_id: String,
) -> Result<BrokerClientConfig, Vec<Problem>> {
    let mut p = Checker::default();
    let parsed = parse_mqtt_url(&mut p, "--broker", url);
    let files = files.map(|f| f.map(|f| f.to_string_lossy().into_owned()));
    let tls = check_tls(&mut p, "tool", parsed.as_ref(), files, false, Path::new(""));
    if !p.problems.is_empty() {
        for problem in &mut p.problems {
            problem.key = match problem.key.as_str() {
                "tool.url" => "--broker",
                "tool.ca_file" => "--ca-file",
                "tool.cert_file" => "--cert-file",
                "tool.key_file" => "--client-key-file",
                other => other,
            }
            .to_owned();
        }
        return Err(p.problems);
    }
    let url = parsed.expect("checked");
    Ok(BrokerClientConfig {
        host: url.host,
        port: url.port,
        client_id,
        username,
        password,
        in_flight: 64,
        session_expiry: Duration::ZERO,
        keep_alive: Duration::from_secs(30),
        tls,
    })
}

/// Parses `mqtt://HOST[:PORT]` (default port 1883) or `mqtts://HOST[:PORT]`
/// (TLS, default port 8883).
fn parse_mqtt_url(p: &mut Checker, key: &str, url: &str) -> Option<BrokerUrl> {
    let (rest, tls, default_port) = if let Some(rest) = url.strip_prefix("mqtt://") {
        (rest, false, 1883)
    } else if let Some(rest) = url.strip_prefix("mqtts://") {
        (rest, true, 8883)
    } else {
        p.push(
            key,
            format!(
                "{url:?} is not supported; expected \"mqtt://HOST:PORT\" or \"mqtts://HOST:PORT\" (TLS)"
            ),
        );
        return None;
    };
    let rest = rest.trim_end_matches('/');
    // An IPv6 literal is bracketed; a port, if any, follows the bracket.
    let port_sep = match rest.rfind(']') {
        Some(end) => rest[end..].rfind(':').map(|i| end + i),
        None => rest.rfind(':'),
    };
    let (host, port) = match port_sep.map(|i| (&rest[..i], &rest[i + 1..])) {
        Some((h, port)) => match port.parse::<u16>() {
            Ok(port) if port > 0 => (h, port),
            _ => {
                p.push(key, format!("{url:?} has an invalid port {port:?}"));
                return None;
            }
        },
        None => (rest, default_port),
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() {
        p.push(key, format!("{url:?} has no host"));
        return None;
    }
    Some(BrokerUrl {
        host: host.to_owned(),
        port,
        tls,
    })
}

/// Whether `host` is this machine (`localhost` or a loopback address).
fn is_loopback(host: &str) -> bool {
    host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// Checks `section`'s TLS files against its URL: loaded for `mqtts://`,
/// refused for `mqtt://`; loaded too when the URL itself was wrong (`None`),
/// so their problems are reported with the URL's. Relative paths are
/// resolved against `base`. Warns when credentials would cross the network
/// unencrypted.
fn check_tls(
    p: &mut Checker,
    section: &str,
    url: Option<&BrokerUrl>,
    files: [Option<String>; 3],
    has_credentials: bool,
    base: &Path,
) -> Option<crate::tls::Tls> {
    let [ca_file, cert_file, key_file] = files.map(|f| f.map(|f| base.join(f)));
    let files = crate::tls::TlsFiles {
        ca_file,
        cert_file,
        key_file,
    };
    // Reads the files, recording their problems under `section` (with
    // `url_ok` false, only those of the files themselves).
    let load = |p: &mut Checker, url_ok: bool| match files.load() {
        Ok(tls) => Some(tls),
        Err(problems) => {
            for problem in problems {
                if url_ok || problem.key != "ca_file" || files.ca_file.is_some() {
                    p.push(format!("{section}.{}", problem.key), problem.message);
                }
            }
            None
        }
    };
    let Some(url) = url else {
        if files.any() {
            load(p, false);
        }
        return None;
    };
    if url.tls && rustls::pki_types::ServerName::try_from(url.host.as_str()).is_err() {
        p.push(
            format!("{section}.url"),
            format!(
                "{:?} cannot be checked against a TLS certificate; expected a DNS name or an IP address",
                url.host
            ),
        );
    }
    if !url.tls && has_credentials && !is_loopback(&url.host) {
        p.warnings.push(Problem {
            key: format!("{section}.url"),
            message: format!(
                "the username and password go to {} unencrypted; use mqtts:// (TLS)",
                url.host
            ),
        });
    }
    if !url.tls {
        p.not_applicable(
            section,
            &[
                ("ca_file", files.ca_file.is_some()),
                ("cert_file", files.cert_file.is_some()),
                ("key_file", files.key_file.is_some()),
            ],
            "only applies to TLS: use an mqtts:// URL",
        );
        return None;
    }
    load(p, true)
}

fn check_local(p: &mut Checker, raw: RawLocal, id: &str, base: &Path) -> Option<LocalConfig> {
    let max_message_size = p.size(
        "local.max_message_size",
        raw.max_message_size.as_deref(),
        default_max_message_size(),
    );
    if max_message_size > MAX_MESSAGE_SIZE {
        p.push(
            "local.max_message_size",
            format!("{max_message_size} bytes is more than an MQTT packet holds (256MiB)"),
        );
    }
    let max_message_size = max_message_size.min(MAX_MESSAGE_SIZE) as usize;
    let in_flight = p.int(
        "local.in_flight",
        raw.in_flight,
        default_local_in_flight(),
        (1, 65535),
    ) as u16;
    let session_expiry = p.duration(
        "local.session_expiry",
        raw.session_expiry.as_deref(),
        default_session_expiry(),
    );
    if session_expiry.as_secs() > u64::from(u32::MAX) {
        p.push(
            "local.session_expiry",
            "is longer than MQTT allows (about 136 years)",
        );
    }
    let keep_alive = p.duration(
        "local.keep_alive",
        raw.keep_alive.as_deref(),
        default_keep_alive(),
    );
    if keep_alive < MIN_KEEP_ALIVE {
        p.push(
            "local.keep_alive",
            format!("{keep_alive:?} is too short; expected at least 5s"),
        );
    }
    let embedded = raw.embedded.unwrap_or(false);
    let source = if embedded {
        if raw.url.is_some() {
            p.push(
                "local.url",
                "cannot be set together with embedded = true: choose one",
            );
        }
        p.not_applicable(
            "local",
            &[
                ("client_id", raw.client_id.is_some()),
                ("username", raw.username.is_some()),
                ("password", raw.password.is_some()),
                ("in_flight", raw.in_flight.is_some()),
                ("session_expiry", raw.session_expiry.is_some()),
                ("keep_alive", raw.keep_alive.is_some()),
                ("ca_file", raw.ca_file.is_some()),
                ("cert_file", raw.cert_file.is_some()),
                ("key_file", raw.key_file.is_some()),
            ],
            "only applies to an external broker (url = ...), not with embedded = true",
        );
        if !cfg!(feature = "embedded-broker") {
            p.push(
                "local.embedded",
                "this edgefn was built without the `embedded-broker` feature",
            );
        }
        let listen = raw.listen.as_deref().unwrap_or(default_listen());
        match listen.parse::<SocketAddr>() {
            Ok(listen) => Some(LocalSource::Embedded { listen }),
            Err(_) => {
                p.push(
                    "local.listen",
                    format!("{listen:?} is not an address; expected e.g. \"0.0.0.0:1883\""),
                );
                None
            }
        }
    } else {
        if raw.listen.is_some() {
            p.push("local.listen", "is only used with embedded = true");
        }
        let Some(url) = raw.url.as_deref() else {
            p.push(
                "local.url",
                "is missing; set url = \"mqtt://HOST:PORT\" or embedded = true",
            );
            return None;
        };
        let url = parse_mqtt_url(p, "local.url", url);
        let files = [raw.ca_file, raw.cert_file, raw.key_file];
        let has_credentials = raw.username.is_some();
        let tls = check_tls(p, "local", url.as_ref(), files, has_credentials, base);
        let url = url?;
        Some(LocalSource::Broker(BrokerClientConfig {
            host: url.host,
            port: url.port,
            client_id: raw.client_id.unwrap_or_else(|| format!("edgefn-{id}")),
            username: raw.username,
            password: raw.password,
            in_flight,
            session_expiry,
            keep_alive,
            tls,
        }))
    };
    Some(LocalConfig {
        source: source?,
        max_message_size,
    })
}

fn check_upstream(
    p: &mut Checker,
    raw: RawUpstream,
    id: &str,
    base: &Path,
) -> Option<UpstreamConfig> {
    let in_flight = p.int(
        "upstream.in_flight",
        raw.in_flight,
        default_upstream_in_flight(),
        (1, 65535),
    ) as u16;
    let keep_alive = p.duration(
        "upstream.keep_alive",
        raw.keep_alive.as_deref(),
        default_keep_alive(),
    );
    if keep_alive < MIN_KEEP_ALIVE {
        p.push(
            "upstream.keep_alive",
            format!("{keep_alive:?} is too short; expected at least 5s"),
        );
    }
    let max_message_size = p.size(
        "upstream.max_message_size",
        raw.max_message_size.as_deref(),
        default_max_message_size(),
    );
    if max_message_size > MAX_MESSAGE_SIZE {
        p.push(
            "upstream.max_message_size",
            format!("{max_message_size} bytes is more than an MQTT packet holds (256MiB)"),
        );
    }
    let max_message_size = max_message_size.min(MAX_MESSAGE_SIZE) as usize;
    let refused_topic_timeout = p.duration(
        "upstream.refused_topic_timeout",
        raw.refused_topic_timeout.as_deref(),
        "1h",
    );
    let topic_prefix = raw.topic_prefix.unwrap_or_default();
    if topic_prefix.contains(['+', '#', '\0']) {
        p.push(
            "upstream.topic_prefix",
            format!("{topic_prefix:?} must not contain '+', '#' or NUL"),
        );
    }
    let url = parse_mqtt_url(p, "upstream.url", &raw.url);
    let files = [raw.ca_file, raw.cert_file, raw.key_file];
    let has_credentials = raw.username.is_some();
    let tls = check_tls(p, "upstream", url.as_ref(), files, has_credentials, base);
    let url = url?;
    Some(UpstreamConfig {
        broker: BrokerClientConfig {
            host: url.host,
            port: url.port,
            client_id: raw
                .client_id
                .unwrap_or_else(|| format!("edgefn-{id}-upstream")),
            username: raw.username,
            password: raw.password,
            in_flight,
            session_expiry: Duration::from_secs(0),
            keep_alive,
            tls,
        },
        topic_prefix,
        max_message_size,
        refused_topic_timeout,
    })
}

fn check_buffer(p: &mut Checker, raw: RawBuffer) -> BufferConfig {
    let max_size = p.size(
        "buffer.max_size",
        raw.max_size.as_deref(),
        default_buffer_size(),
    );
    let full_policy = match raw.full_policy.as_deref().unwrap_or("backpressure") {
        "backpressure" => FullPolicy::Backpressure,
        "drop_oldest" => FullPolicy::DropOldest,
        other => {
            p.push(
                "buffer.full_policy",
                format!("{other:?} is not a policy; expected \"backpressure\" or \"drop_oldest\""),
            );
            FullPolicy::Backpressure
        }
    };
    let durability = match raw.durability.as_deref().unwrap_or("full") {
        "full" => Durability::Full,
        "relaxed" => Durability::Relaxed,
        other => {
            p.push(
                "buffer.durability",
                format!("{other:?} is not a durability; expected \"full\" or \"relaxed\""),
            );
            Durability::Full
        }
    };
    let max_batch = p.int(
        "buffer.max_batch",
        raw.max_batch,
        default_max_batch(),
        (1, 100_000),
    ) as usize;
    let dead_letters_max_size = match raw.dead_letters_max_size.as_deref() {
        None => default_dead_letters_max_size(max_size),
        Some(text) => p.size(
            "buffer.dead_letters_max_size",
            Some(text),
            default_buffer_size(),
        ),
    };
    let commit_delay = match raw.commit_delay.as_deref() {
        None => Duration::ZERO,
        Some(text) => match humantime::parse_duration(text) {
            Ok(d) if d <= MAX_COMMIT_DELAY => d,
            Ok(_) => {
                p.push(
                    "buffer.commit_delay",
                    format!(
                        "{text:?} is too long: every PUBACK waits for it; at most {}",
                        humantime::format_duration(MAX_COMMIT_DELAY)
                    ),
                );
                Duration::ZERO
            }
            Err(_) => {
                p.push(
                    "buffer.commit_delay",
                    format!("{text:?} is not a duration; expected e.g. \"0\", \"10ms\", \"20ms\""),
                );
                Duration::ZERO
            }
        },
    };
    BufferConfig {
        max_size,
        full_policy,
        durability,
        max_batch,
        dead_letters_max_size,
        commit_delay,
    }
}

fn check_deploy(
    p: &mut Checker,
    raw: RawDeploy,
    has_upstream: bool,
    embedded: bool,
) -> DeployConfig {
    let broker = match raw.broker.as_deref() {
        None | Some("upstream") => DeployBroker::Upstream,
        Some("local") => DeployBroker::Local,
        Some(other) => {
            p.push(
                "deploy.broker",
                format!("{other:?}: expected \"upstream\" or \"local\""),
            );
            DeployBroker::Upstream
        }
    };
    if broker == DeployBroker::Upstream && !has_upstream {
        p.push(
            "deploy.broker",
            "\"upstream\" (the default) needs an [upstream] section; set broker = \"local\" to use the local broker",
        );
    }
    if broker == DeployBroker::Local && embedded {
        p.push(
            "deploy.broker",
            "\"local\" needs an external local broker: the embedded one keeps no retained messages (a gateway would miss every bundle published while it was away) and takes no message larger than local.max_message_size; use the upstream broker",
        );
    }
    for (i, g) in raw.groups.iter().enumerate() {
        if g.is_empty() || g.contains(['/', '+', '#', '\0']) {
            p.push(
                format!("deploy.groups[{i}]"),
                format!(
                    "{g:?} must be non-empty, without '/', '+', '#' or NUL (it is a topic level)"
                ),
            );
        }
    }
    let mut trusted_keys = Vec::new();
    for (i, k) in raw.trusted_keys.iter().enumerate() {
        match crate::keys::parse_public_key(k) {
            Ok(key) => trusted_keys.push(key),
            Err(e) => p.push(format!("deploy.trusted_keys[{i}]"), e.to_string()),
        }
    }
    let allow_unsigned = raw.allow_unsigned.unwrap_or(false);
    if raw.trusted_keys.is_empty() && !allow_unsigned {
        p.push(
            "deploy.trusted_keys",
            "needs at least one key (`edgefn keygen` prints one), or allow_unsigned = true",
        );
    }
    if allow_unsigned {
        p.warnings.push(Problem {
            key: "deploy.allow_unsigned".into(),
            message: "unsigned bundles are accepted: anyone who can publish on the control topics can run code on this gateway".into(),
        });
    }
    let max_bundle_size = p.size(
        "deploy.max_bundle_size",
        raw.max_bundle_size.as_deref(),
        default_max_bundle_size(),
    );
    if max_bundle_size > MAX_MESSAGE_SIZE {
        p.push(
            "deploy.max_bundle_size",
            format!("{max_bundle_size} bytes is more than 256MiB"),
        );
    }
    DeployConfig {
        broker,
        groups: raw.groups,
        trusted_keys,
        allow_unsigned,
        max_bundle_size: max_bundle_size.min(MAX_MESSAGE_SIZE) as usize,
    }
}

fn check_function(
    p: &mut Checker,
    key: &str,
    raw: FunctionManifest,
    base: &Path,
) -> FunctionConfig {
    if raw.name.is_empty()
        || !raw
            .name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    {
        p.push(
            format!("{key}.name"),
            format!(
                "{:?} must be non-empty letters, digits, '-' or '_'",
                raw.name
            ),
        );
    }
    if raw.name == crate::config::UPSTREAM {
        p.push(
            format!("{key}.name"),
            "\"upstream\" is edgefn's own (the dead letters of records the upstream refused)",
        );
    }
    if raw.triggers.is_empty() && raw.schedule.is_none() {
        p.push(
            format!("{key}.triggers"),
            "needs at least one MQTT topic filter, e.g. [\"sensors/+/temperature\"], \
             or a schedule",
        );
    }
    let triggers = filters(p, &format!("{key}.triggers"), &raw.triggers);
    for (j, t) in triggers.iter().enumerate() {
        if t.as_str().starts_with("$edgefn/") {
            p.push(
                format!("{key}.triggers[{j}]"),
                format!("{t:?}: topics under $edgefn/ are edgefn's own"),
            );
        }
    }
    let schedule = raw.schedule.as_deref().and_then(|s| {
        crate::schedule::Schedule::parse(s)
            .map_err(|e| p.push(format!("{key}.schedule"), e))
            .ok()
    });
    let state_limit = p.size(
        &format!("{key}.state_limit"),
        raw.state_limit.as_deref(),
        "1MiB",
    );
    if state_limit > MAX_MESSAGE_SIZE {
        p.push(
            format!("{key}.state_limit"),
            format!("{state_limit} bytes is more than 256MiB"),
        );
    }
    let emit_allow = raw
        .emit_allow
        .as_ref()
        .map(|a| filters(p, &format!("{key}.emit_allow"), a));
    let publish_allow = filters(
        p,
        &format!("{key}.publish_allow"),
        raw.publish_allow.as_deref().unwrap_or_default(),
    );
    for k in raw.env.keys() {
        if k.is_empty() || k.contains(['=', '\0']) {
            p.push(
                format!("{key}.env"),
                format!("{k:?} is not a valid variable name"),
            );
        }
    }
    let memory_limit = p.size(
        &format!("{key}.memory_limit"),
        raw.memory_limit.as_deref(),
        default_memory_limit(),
    );
    if memory_limit < MIN_MEMORY_LIMIT {
        p.push(
            format!("{key}.memory_limit"),
            format!("{memory_limit} bytes is too small; expected at least 128KiB"),
        );
    }
    let timeout = p.duration(
        &format!("{key}.timeout"),
        raw.timeout.as_deref(),
        default_timeout(),
    );
    let concurrency = p.int(&format!("{key}.concurrency"), raw.concurrency, 1, (1, 64)) as usize;
    let retries = p.int(&format!("{key}.retries"), raw.retries, 0, (0, 10)) as u32;
    let fuel = raw
        .fuel
        .map(|v| p.int(&format!("{key}.fuel"), Some(v), 1, (1, i64::MAX)) as u64);
    let max_record_size = p.size(
        &format!("{key}.max_record_size"),
        raw.max_record_size.as_deref(),
        default_max_record_size(),
    ) as usize;
    let max_emit_bytes = p.size(
        &format!("{key}.max_emit_bytes"),
        raw.max_emit_bytes.as_deref(),
        default_max_emit_bytes(),
    );
    if max_emit_bytes > MAX_MESSAGE_SIZE {
        p.push(
            format!("{key}.max_emit_bytes"),
            format!("{max_emit_bytes} bytes is more than 256MiB"),
        );
    }
    let log_rate_limit = p.int(
        &format!("{key}.log_rate_limit"),
        raw.log_rate_limit,
        default_log_rate_limit(),
        (1, 100_000),
    ) as u32;
    let rollback = match raw.rollback.as_deref() {
        None | Some("auto") => Rollback::Auto,
        Some("never") => Rollback::Never,
        Some(other) => {
            p.push(
                format!("{key}.rollback"),
                format!("{other:?}: expected \"auto\" or \"never\""),
            );
            Rollback::Auto
        }
    };
    FunctionConfig {
        name: raw.name,
        module: raw.module.map(|m| base.join(m)).unwrap_or_default(),
        triggers,
        env: raw.env,
        memory_limit: memory_limit as usize,
        timeout,
        concurrency,
        retries,
        max_record_size,
        fuel,
        max_emit_bytes: max_emit_bytes.min(MAX_MESSAGE_SIZE) as usize,
        log_rate_limit,
        schedule,
        state_limit: state_limit.min(MAX_MESSAGE_SIZE) as usize,
        emit_allow,
        publish_allow,
        rollback,
    }
}

/// Checks a list of topic filters (problems keyed `key[i]`).
fn filters(p: &mut Checker, key: &str, list: &[String]) -> Vec<TopicFilter> {
    let mut out = Vec::new();
    for (j, t) in list.iter().enumerate() {
        match TopicFilter::new(t) {
            Ok(f) => out.push(f),
            Err(e) => p.push(format!("{key}[{j}]"), format!("{t:?}: {e}")),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, text: &str) -> PathBuf {
        let path = dir.join("edgefn.toml");
        std::fs::write(&path, text).unwrap();
        path
    }

    const EXAMPLE: &str = r#"
[gateway]
id = "pi-01"
data_dir = "/var/lib/edgefn"

[local]
url = "mqtt://127.0.0.1:1883"

[upstream]
url = "mqtt://127.0.0.1:1884"
topic_prefix = "site/pi-01/"

[buffer]
max_size = "256MiB"

[[functions]]
name = "clean-temperature"
module = "functions/dist/clean_temperature.wasm"
triggers = ["sensors/+/temperature"]
env = { UNIT = "F" }
memory_limit = "16MiB"
timeout = "100ms"
concurrency = 2
"#;

    #[test]
    fn the_readme_example_loads() {
        let dir = tempfile::tempdir().unwrap();
        let c = Config::load(&write(dir.path(), EXAMPLE)).unwrap();
        assert_eq!(c.gateway.id, "pi-01");
        assert_eq!(c.gateway.data_dir, PathBuf::from("/var/lib/edgefn"));
        let LocalSource::Broker(b) = &c.local.source else {
            panic!("expected an external broker")
        };
        assert_eq!((b.host.as_str(), b.port), ("127.0.0.1", 1883));
        assert_eq!(b.client_id, "edgefn-pi-01");
        let up = c.upstream.unwrap();
        assert_eq!(up.broker.port, 1884);
        assert_eq!(up.topic_prefix, "site/pi-01/");
        assert_eq!(c.buffer.max_size, 256 * 1024 * 1024);
        let f = &c.functions[0];
        assert_eq!(f.memory_limit, 16 * 1024 * 1024);
        assert_eq!(f.timeout, Duration::from_millis(100));
        assert_eq!(f.concurrency, 2);
        assert_eq!(f.env.get("UNIT").map(String::as_str), Some("F"));
        assert_eq!(
            f.module,
            dir.path().join("functions/dist/clean_temperature.wasm")
        );
    }

    #[test]
    fn a_fuel_budget_is_optional_and_read_as_an_integer() {
        let dir = tempfile::tempdir().unwrap();
        let c = Config::load(&write(dir.path(), EXAMPLE)).unwrap();
        assert_eq!(c.functions[0].fuel, None);
        let text = EXAMPLE.replace("concurrency = 2", "concurrency = 2\nfuel = 5_000_000");
        let c = Config::load(&write(dir.path(), &text)).unwrap();
        assert_eq!(c.functions[0].fuel, Some(5_000_000));
    }

    #[test]
    fn an_unknown_key_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let text = EXAMPLE.replace("max_size = \"256MiB\"", "max_sise = \"256MiB\"");
        let err = Config::load(&write(dir.path(), &text)).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("max_sise"), "{msg}");
    }

    #[test]
    fn malformed_toml_is_reported_with_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(dir.path(), "[gateway\nid = 1");
        let msg = Config::load(&path).unwrap_err().to_string();
        assert!(msg.contains("edgefn.toml"), "{msg}");
    }

    #[test]
    fn every_semantic_problem_is_reported_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let text = EXAMPLE
            .replace("\"100ms\"", "\"soon\"")
            .replace("\"16MiB\"", "\"lots\"")
            .replace("sensors/+/temperature", "sensors/#/temperature")
            .replace("concurrency = 2", "concurrency = 0\nfuel = 0")
            .replace(
                "max_size = \"256MiB\"",
                "max_size = \"256MiB\"\nfull_policy = \"panic\"",
            );
        let Err(ConfigError::Invalid { problems, .. }) = Config::load(&write(dir.path(), &text))
        else {
            panic!("expected semantic problems")
        };
        let keys: Vec<_> = problems.iter().map(|p| p.key.as_str()).collect();
        assert_eq!(
            keys,
            [
                "buffer.full_policy",
                "functions[0].triggers[0]",
                "functions[0].memory_limit",
                "functions[0].timeout",
                "functions[0].concurrency",
                "functions[0].fuel",
            ]
        );
        assert!(problems[3].message.contains("\"soon\""));
    }

    #[test]
    fn commit_delay_is_off_by_default_and_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let c = Config::load(&write(dir.path(), EXAMPLE)).unwrap();
        assert_eq!(c.buffer.commit_delay, Duration::ZERO);
        let with = |v: &str| {
            EXAMPLE.replace(
                "max_size = \"256MiB\"",
                &format!("max_size = \"256MiB\"\ncommit_delay = \"{v}\""),
            )
        };
        let c = Config::load(&write(dir.path(), &with("20ms"))).unwrap();
        assert_eq!(c.buffer.commit_delay, Duration::from_millis(20));
        let c = Config::load(&write(dir.path(), &with("0"))).unwrap();
        assert_eq!(c.buffer.commit_delay, Duration::ZERO);
        for bad in ["2s", "soon"] {
            let Err(ConfigError::Invalid { problems, .. }) =
                Config::load(&write(dir.path(), &with(bad)))
            else {
                panic!("{bad}: expected a problem")
            };
            assert_eq!(problems.len(), 1, "{bad}: {problems:?}");
            assert_eq!(problems[0].key, "buffer.commit_delay");
            assert!(problems[0].message.contains(bad), "{}", problems[0].message);
        }
    }

    #[test]
    fn the_bounds_on_dead_letters_emits_and_logs_have_defaults_and_are_checked() {
        let dir = tempfile::tempdir().unwrap();
        let c = Config::load(&write(dir.path(), EXAMPLE)).unwrap();
        assert_eq!(
            c.buffer.dead_letters_max_size,
            64 << 20,
            "a quarter of max_size"
        );
        assert_eq!(c.functions[0].max_emit_bytes, 1 << 20);
        assert_eq!(c.functions[0].log_rate_limit, 100);
        let text = EXAMPLE
            .replace(
                "max_size = \"256MiB\"",
                "max_size = \"256MiB\"\ndead_letters_max_size = \"many\"",
            )
            .replace(
                "concurrency = 2",
                "concurrency = 2\nmax_emit_bytes = \"300MiB\"\nlog_rate_limit = 0",
            );
        let Err(ConfigError::Invalid { problems, .. }) = Config::load(&write(dir.path(), &text))
        else {
            panic!("expected semantic problems")
        };
        let keys: Vec<_> = problems.iter().map(|p| p.key.as_str()).collect();
        assert_eq!(
            keys,
            [
                "buffer.dead_letters_max_size",
                "functions[0].max_emit_bytes",
                "functions[0].log_rate_limit",
            ]
        );
    }

    /// The keys of the semantic problems `text` has.
    fn problem_keys(dir: &Path, text: &str) -> Vec<String> {
        match Config::load(&write(dir, text)) {
            Err(ConfigError::Invalid { problems, .. }) => {
                problems.into_iter().map(|p| p.key).collect()
            }
            other => panic!("expected semantic problems, got {other:?}"),
        }
    }

    #[test]
    fn lambda_controls_are_checked_and_each_problem_names_its_key() {
        let dir = tempfile::tempdir().unwrap();
        let with = |extra: &str| {
            EXAMPLE.replace("concurrency = 2\n", &format!("concurrency = 2\n{extra}\n"))
        };
        let c = Config::load(&write(
            dir.path(),
            &with("schedule = \"cron: 0 */5 * * * *\"\nstate_limit = \"64KiB\"\nemit_allow = [\"clean/#\"]\npublish_allow = [\"devices/+/cmd\"]"),
        ))
        .unwrap();
        let f = &c.functions[0];
        assert!(f.schedule.is_some());
        assert_eq!(f.state_limit, 64 << 10);
        assert_eq!(f.emit_allow.as_ref().unwrap()[0].as_str(), "clean/#");
        assert_eq!(f.publish_allow[0].as_str(), "devices/+/cmd");
        assert_eq!(c.metrics.listen, None);
        for (extra, key) in [
            ("schedule = \"every now and then\"", "functions[0].schedule"),
            ("schedule = \"cron: 0 */5 * * *\"", "functions[0].schedule"),
            ("schedule = \"cron: 0 61 * * * *\"", "functions[0].schedule"),
            ("state_limit = \"lots\"", "functions[0].state_limit"),
            ("emit_allow = [\"a/#/b\"]", "functions[0].emit_allow[0]"),
            (
                "publish_allow = [\"ok\", \"x+\"]",
                "functions[0].publish_allow[1]",
            ),
            (
                "triggers = [\"$edgefn/schedule/x\"]",
                "functions[0].triggers[0]",
            ),
        ] {
            let text = with(extra).replace(
                if extra.starts_with("triggers") {
                    "triggers = [\"sensors/+/temperature\"]\n"
                } else {
                    "\u{0}"
                },
                "",
            );
            assert_eq!(problem_keys(dir.path(), &text), [key], "{extra}");
        }
        let text = format!("{EXAMPLE}\n[metrics]\nlisten = \"localhost\"\ninterval = \"0s\"\n");
        assert_eq!(
            problem_keys(dir.path(), &text),
            ["metrics.listen", "metrics.interval"]
        );
    }

    /// A public key as `edgefn keygen` prints it.
    fn key() -> String {
        let k = ed25519_dalek::SigningKey::from_bytes(&[1; 32]);
        crate::keys::public_key_text(&k.verifying_key())
    }

    #[test]
    fn a_deploy_section_takes_keys_and_groups_and_makes_functions_optional() {
        let dir = tempfile::tempdir().unwrap();
        let functions = EXAMPLE.find("[[functions]]").unwrap();
        let key = key();
        let deploy = format!("[deploy]\ngroups = [\"site-a\"]\ntrusted_keys = [\"{key}\"]\n");
        let text = format!("{}{deploy}", &EXAMPLE[..functions]);
        let c = Config::load(&write(dir.path(), &text)).unwrap();
        assert!(c.functions.is_empty());
        let d = c.deploy.unwrap();
        assert_eq!(d.broker, DeployBroker::Upstream);
        assert_eq!(d.groups, ["site-a"]);
        assert_eq!(d.trusted_keys.len(), 1);
        assert!(!d.allow_unsigned);
        assert_eq!(d.max_bundle_size, 16 << 20);

        let bad = format!(
            "{}[deploy]\nbroker = \"cloud\"\ngroups = [\"a/b\", \"\"]\ntrusted_keys = [\"{key}\", \"ed25519:short\"]\nmax_bundle_size = \"1TiB\"\n",
            &EXAMPLE[..functions]
        );
        assert_eq!(
            problem_keys(dir.path(), &bad),
            [
                "deploy.broker",
                "deploy.groups[0]",
                "deploy.groups[1]",
                "deploy.trusted_keys[1]",
                "deploy.max_bundle_size",
            ]
        );
        // No key, no upstream; and without [deploy], functions are needed.
        let upstream = EXAMPLE.find("[upstream]").unwrap();
        let buffer = EXAMPLE.find("[buffer]").unwrap();
        let bare = format!(
            "{}{}[deploy]\n",
            &EXAMPLE[..upstream],
            &EXAMPLE[buffer..functions]
        );
        assert_eq!(
            problem_keys(dir.path(), &bare),
            ["deploy.broker", "deploy.trusted_keys"]
        );
        assert_eq!(
            problem_keys(dir.path(), &EXAMPLE[..functions]),
            ["functions"]
        );
        // The control topics on the embedded broker: refused, it keeps
        // no retained messages.
        let embedded = format!(
            "{}[deploy]\nbroker = \"local\"\ntrusted_keys = [\"{key}\"]\n",
            &EXAMPLE[..functions].replace("url = \"mqtt://127.0.0.1:1883\"", "embedded = true")
        );
        assert_eq!(problem_keys(dir.path(), &embedded), ["deploy.broker"]);
        let external = embedded.replace("embedded = true", "url = \"mqtt://127.0.0.1:1883\"");
        let c = Config::load(&write(dir.path(), &external)).unwrap();
        assert_eq!(c.deploy.unwrap().broker, DeployBroker::Local);
        // Unsigned bundles: allowed when asked, with a warning.
        let lax = format!("{}[deploy]\nallow_unsigned = true\n", &EXAMPLE[..functions]);
        let c = Config::load(&write(dir.path(), &lax)).unwrap();
        assert_eq!(c.warnings[0].key, "deploy.allow_unsigned");
    }

    #[test]
    fn a_bundle_manifest_is_checked_like_a_functions_table_without_a_module() {
        let manifest = FunctionManifest {
            name: "clean".into(),
            triggers: vec!["sensors/+/temperature".into()],
            timeout: Some("100ms".into()),
            ..Default::default()
        };
        let f = manifest.clone().check().unwrap();
        assert_eq!(f.timeout, Duration::from_millis(100));
        assert_eq!(f.module, PathBuf::new());
        let bad = FunctionManifest {
            module: Some("x.wasm".into()),
            timeout: Some("soon".into()),
            triggers: vec![],
            ..manifest
        };
        let keys: Vec<String> = bad
            .check()
            .unwrap_err()
            .into_iter()
            .map(|p| p.key)
            .collect();
        assert_eq!(
            keys,
            ["manifest.module", "manifest.triggers", "manifest.timeout"]
        );
        // In the file, the module is required.
        let dir = tempfile::tempdir().unwrap();
        let text = EXAMPLE.replace("module = \"functions/dist/clean_temperature.wasm\"\n", "");
        assert_eq!(problem_keys(dir.path(), &text), ["functions[0].module"]);
    }

    #[test]
    fn embedded_broker_and_url_are_exclusive() {
        let dir = tempfile::tempdir().unwrap();
        let text = EXAMPLE.replace(
            "url = \"mqtt://127.0.0.1:1883\"",
            "url = \"mqtt://127.0.0.1:1883\"\nembedded = true",
        );
        let msg = Config::load(&write(dir.path(), &text))
            .unwrap_err()
            .to_string();
        assert!(msg.contains("local.url"), "{msg}");
    }

    #[test]
    fn environment_overrides_name_a_section() {
        // Both variables are read by this test only.
        let dir = tempfile::tempdir().unwrap();
        let path = write(dir.path(), EXAMPLE);
        // SAFETY: tests in this module do not read these variables concurrently.
        unsafe {
            std::env::set_var("EDGEFN_UPSTREAM__PASSWORD", "s3cret");
            std::env::set_var("EDGEFN_UNRELATED", "1");
        }
        let c = Config::load(&path).unwrap();
        unsafe {
            std::env::remove_var("EDGEFN_UPSTREAM__PASSWORD");
            std::env::remove_var("EDGEFN_UNRELATED");
        }
        assert_eq!(
            c.upstream.unwrap().broker.password.as_deref(),
            Some("s3cret")
        );
    }

    #[test]
    fn a_keep_alive_below_five_seconds_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let text = EXAMPLE.replace(
            "topic_prefix = \"site/pi-01/\"",
            "topic_prefix = \"site/pi-01/\"\nkeep_alive = \"2s\"",
        );
        let msg = Config::load(&write(dir.path(), &text))
            .unwrap_err()
            .to_string();
        assert!(
            msg.contains("upstream.keep_alive: 2s is too short"),
            "{msg}"
        );
    }

    #[test]
    fn urls_are_parsed() {
        let mut p = Checker::default();
        let mut parse =
            |url: &str| parse_mqtt_url(&mut p, "k", url).map(|u| (u.host, u.port, u.tls));
        assert_eq!(
            parse("mqtt://broker.local"),
            Some(("broker.local".into(), 1883, false))
        );
        assert_eq!(
            parse("mqtt://[::1]:1884"),
            Some(("::1".into(), 1884, false))
        );
        assert_eq!(parse("mqtt://[::1]"), Some(("::1".into(), 1883, false)));
        assert_eq!(
            parse("mqtts://cloud.example"),
            Some(("cloud.example".into(), 8883, true))
        );
        assert_eq!(
            parse("mqtts://cloud.example:443"),
            Some(("cloud.example".into(), 443, true))
        );
        assert_eq!(parse("http://x:1"), None);
        assert_eq!(parse("mqtt://x:0"), None);
        assert_eq!(p.problems.len(), 2);
    }

    #[test]
    fn a_password_sent_unencrypted_across_the_network_is_warned_about() {
        let dir = tempfile::tempdir().unwrap();
        let load = |local: &str, upstream: &str| {
            let text = EXAMPLE
                .replace("url = \"mqtt://127.0.0.1:1883\"", local)
                .replace("url = \"mqtt://127.0.0.1:1884\"", upstream);
            Config::load(&write(dir.path(), &text)).unwrap().warnings
        };
        let warnings = load(
            "url = \"mqtt://localhost:1883\"\nusername = \"edgefn\"",
            "url = \"mqtt://cloud.example:1883\"\nusername = \"pi-01\"",
        );
        assert_eq!(
            warnings.iter().map(ToString::to_string).collect::<Vec<_>>(),
            [
                "upstream.url: the username and password go to cloud.example unencrypted; use mqtts:// (TLS)"
            ]
        );
        // Without credentials there is nothing to leak.
        assert!(load("url = \"mqtt://[::1]\"", "url = \"mqtt://cloud.example\"").is_empty());
    }

    #[test]
    fn tls_files_belong_to_mqtts_urls_and_are_checked_at_load() {
        let dir = tempfile::tempdir().unwrap();
        let module = dir.path().join("f.wasm");
        std::fs::write(&module, b"").unwrap();
        let load = |upstream: &str, local: &str| {
            let path = write(
                dir.path(),
                &format!(
                    "[gateway]\nid = \"pi-01\"\n[local]\n{local}\n[upstream]\n{upstream}\n\
                     [[functions]]\nname = \"f\"\nmodule = \"f.wasm\"\ntriggers = [\"a/#\"]\n"
                ),
            );
            Config::load(&path)
        };
        // TLS files with a plain URL, or with the embedded broker.
        let err = load(
            "url = \"mqtt://cloud:1883\"\nca_file = \"ca.pem\"",
            "embedded = true\ncert_file = \"c.pem\"",
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("upstream.ca_file: only applies to TLS: use an mqtts:// URL"),
            "{err}"
        );
        assert!(
            err.contains("local.cert_file: only applies to an external broker"),
            "{err}"
        );
        // A URL that is wrong does not hide the files' problems; a host
        // that no certificate can name is refused.
        let err = load(
            "url = \"mqtts://cloud:0\"\nca_file = \"ca.pem\"",
            "url = \"mqtts://[fe80::1%eth0]\"",
        )
        .unwrap_err()
        .to_string();
        for needle in [
            "upstream.url: \"mqtts://cloud:0\" has an invalid port",
            "upstream.ca_file: ",
            "local.url: \"fe80::1%eth0\" cannot be checked against a TLS certificate",
        ] {
            assert!(err.contains(needle), "{needle:?} not in {err}");
        }
        // Missing files are named with their key and resolved path.
        let err = load(
            "url = \"mqtts://cloud\"\nca_file = \"ca.pem\"\ncert_file = \"c.pem\"\nkey_file = \"c.key\"",
            "url = \"mqtts://127.0.0.1\"\nkey_file = \"k.pem\"",
        )
        .unwrap_err()
        .to_string();
        for needle in [
            format!("upstream.ca_file: {}", dir.path().join("ca.pem").display()),
            format!("upstream.cert_file: {}", dir.path().join("c.pem").display()),
            format!("upstream.key_file: {}", dir.path().join("c.key").display()),
            "local.cert_file: is missing".to_owned(),
        ] {
            assert!(err.contains(&needle), "{needle:?} not in {err}");
        }
    }
}
