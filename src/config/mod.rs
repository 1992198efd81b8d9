//! The gateway's one TOML file: typed, documented, checked.
//!
//! Loading happens in two passes, like Vector's config validation:
//!
//! 1. **Structure** — the `config` crate reads the TOML file and `EDGEFN_…`
//!    environment overrides (`EDGEFN_UPSTREAM__PASSWORD=…` sets
//!    `upstream.password`), and serde maps it onto [`ConfigFile`]. Unknown keys
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

mod broker;
mod embedded;
pub mod file;
mod function;

pub use broker::{BrokerClientConfig, tool_broker};
use broker::{check_tls, parse_mqtt_url};
pub use embedded::{BrokerLimits, EmbeddedConfig, TlsListener};
use embedded::{check_access, check_limits, check_tls_listener};
pub use file::ConfigFile;
use file::{BufferTable, DeployTable, LocalTable, MetricsTable, UpstreamTable};
use function::check_function;
pub use function::{FunctionConfig, FunctionManifest, Rollback};

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
    // A Python function's component is about 19 MB.
    "32MiB"
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
    /// The broker built into edgefn.
    Embedded(EmbeddedConfig),
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
        check_buffer(&mut Checker::default(), BufferTable::default())
    }
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

/// Shortest keep-alive accepted: the MQTT client (rumqttc) refuses less.
const MIN_KEEP_ALIVE: Duration = Duration::from_secs(5);

/// Largest size accepted for message and record limits: what an MQTT
/// packet can carry (256 MiB).
const MAX_MESSAGE_SIZE: u64 = 256 * 1024 * 1024 - 1;

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

    fn load_raw(path: &Path) -> Result<ConfigFile, ConfigError> {
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
            .try_deserialize::<ConfigFile>()
            .map_err(|e| structure(e.to_string()))
    }

    /// Checks raw values, collecting every problem. Relative paths are
    /// resolved against `base` (the configuration file's directory).
    pub fn from_raw(raw: ConfigFile, base: &Path) -> Result<Config, Vec<Problem>> {
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
            Some(LocalSource::Embedded(_))
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

fn check_metrics(p: &mut Checker, raw: Option<MetricsTable>) -> MetricsConfig {
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

fn check_local(p: &mut Checker, raw: LocalTable, id: &str, base: &Path) -> Option<LocalConfig> {
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
            ],
            "only applies to an external broker (url = ...), not with embedded = true",
        );
        if !cfg!(feature = "embedded-broker") {
            p.push(
                "local.embedded",
                "this edgefn was built without the `embedded-broker` feature",
            );
        }
        let limits = check_limits(p, &raw, max_message_size);
        let listen = raw.listen.as_deref().unwrap_or(default_listen());
        match listen.parse::<SocketAddr>() {
            Ok(listen) => {
                let tls = check_tls_listener(p, &raw, listen, base);
                let access = check_access(p, &raw, listen, tls.as_ref(), base);
                Some(LocalSource::Embedded(EmbeddedConfig {
                    listen,
                    tls,
                    access,
                    limits,
                }))
            }
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
        p.not_applicable(
            "local",
            &[
                ("memory_limit", raw.memory_limit.is_some()),
                ("max_queued_messages", raw.max_queued_messages.is_some()),
                ("max_queued_bytes", raw.max_queued_bytes.is_some()),
                ("max_connections", raw.max_connections.is_some()),
                (
                    "max_connections_per_user",
                    raw.max_connections_per_user.is_some(),
                ),
                (
                    "max_connections_per_address",
                    raw.max_connections_per_address.is_some(),
                ),
                ("max_publish_rate", raw.max_publish_rate.is_some()),
                ("max_keepalive", raw.max_keepalive.is_some()),
                ("password_file", raw.password_file.is_some()),
                ("acl_file", raw.acl_file.is_some()),
                ("allow_anonymous", raw.allow_anonymous.is_some()),
                ("tls_listen", raw.tls_listen.is_some()),
                ("require_certificate", raw.require_certificate.is_some()),
                (
                    "use_identity_as_username",
                    raw.use_identity_as_username.is_some(),
                ),
            ],
            "is only used with embedded = true (the built-in broker)",
        );
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
    raw: UpstreamTable,
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

fn check_buffer(p: &mut Checker, raw: BufferTable) -> BufferConfig {
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
    raw: DeployTable,
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
            "\"local\" needs an external local broker: the embedded one takes no message larger than local.max_message_size, which bundles often are, and edgefn would be a client of itself; use the upstream broker",
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

#[cfg(test)]
mod tests;
