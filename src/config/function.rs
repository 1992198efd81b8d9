//! `[[functions]]` and the manifest of a deployed bundle: one function,
//! its triggers and limits, checked key by key.

use super::*;

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
    /// `None`: the runtime's default for the function's kind (16 MiB for a
    /// module, 64 MiB for a component).
    pub memory_limit: Option<usize>,
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

/// Default memory per instance.
pub(super) fn default_memory_limit() -> &'static str {
    "16MiB"
}

/// Default invocation timeout.
pub(super) fn default_timeout() -> &'static str {
    "1s"
}

/// Default largest emitted record.
pub(super) fn default_max_record_size() -> &'static str {
    "256KiB"
}

/// Default bytes one invocation may emit: four records of the largest
/// default size. The pipeline holds up to about two thousand messages'
/// outcomes at once, so this is what bounds its memory.
pub(super) fn default_max_emit_bytes() -> &'static str {
    "1MiB"
}

/// Default log lines per second per function: a chatty function is seen,
/// a flooding one cannot fill the journal (journald itself allows a
/// service about 330 lines per second by default).
pub(super) fn default_log_rate_limit() -> i64 {
    100
}

/// Smallest memory limit accepted: one 64 KiB wasm page is too little for any
/// real guest, and a typo like `"16KiB"` should be caught.
pub(super) const MIN_MEMORY_LIMIT: u64 = 128 * 1024;

pub(super) fn check_function(
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
    if raw.memory_limit.is_some() && memory_limit < MIN_MEMORY_LIMIT {
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
        memory_limit: raw.memory_limit.is_some().then_some(memory_limit as usize),
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
pub(super) fn filters(p: &mut Checker, key: &str, list: &[String]) -> Vec<TopicFilter> {
    let mut out = Vec::new();
    for (j, t) in list.iter().enumerate() {
        match TopicFilter::new(t) {
            Ok(f) => out.push(f),
            Err(e) => p.push(format!("{key}[{j}]"), format!("{t:?}: {e}")),
        }
    }
    out
}
