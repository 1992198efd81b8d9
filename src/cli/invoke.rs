//! `edgefn invoke`: run one event through a module, no broker — the
//! "Test" button. Prints what the function emitted, published and logged,
//! and how long it took.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use std::sync::Arc;

use edgefn::route::TopicFilter;
use edgefn::runtime::{FunctionSpec, FunctionState, GuestLog, LogLevel, Report, Runtime, Target};
use edgefn::state::{Entries, StateMap};
use edgefn::text::Printable;

/// `edgefn invoke`'s arguments.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The module (.wasm).
    module: PathBuf,
    /// The message topic.
    #[arg(long, short)]
    topic: String,
    /// The payload: text, or @FILE to read it from a file.
    #[arg(long, short, default_value = "")]
    payload: String,
    /// Environment variable for the function, KEY=VALUE (repeatable).
    #[arg(long = "env", short, value_parser = super::parse_env)]
    env: Vec<(String, String)>,
    /// Memory limit [default: 16MiB for a module, 64MiB for a component]
    #[arg(long)]
    memory_limit: Option<bytesize::ByteSize>,
    /// Timeout.
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    timeout: std::time::Duration,
    /// Run on wasmtime's Pulley interpreter (as on 32-bit ARM).
    #[arg(long)]
    pulley: bool,
    /// Fuel budget (WebAssembly operations), as `fuel` in the config.
    /// Without it, the fuel used is shown but not limited.
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    fuel: Option<u64>,
    /// Most bytes (topics and payloads) the invocation may emit, as
    /// `max_emit_bytes` in the config.
    #[arg(long, default_value = "1MiB")]
    max_emit_bytes: bytesize::ByteSize,
    /// Log lines per second, as `log_rate_limit` in the config.
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..))]
    log_rate_limit: u32,
    /// Start with this state: a JSON object of keys and values (a
    /// string value is its text); the state the invocation leaves is
    /// printed after it.
    #[arg(long)]
    state: Option<PathBuf>,
    /// Most bytes of state, as `state_limit` in the config.
    #[arg(long, default_value = "1MiB")]
    state_limit: bytesize::ByteSize,
}

/// Runs one event as `args` say and prints what happened; the exit code
/// tells how it ended (see [`exit_code`]).
pub fn command(args: Args) -> anyhow::Result<std::process::ExitCode> {
    use anyhow::Context as _;
    let Args {
        module,
        topic,
        payload,
        env,
        memory_limit,
        timeout,
        pulley,
        fuel,
        max_emit_bytes,
        log_rate_limit,
        state,
        state_limit,
    } = args;
    let payload = match payload.strip_prefix('@') {
        Some(file) => {
            std::fs::read(file).with_context(|| format!("cannot read payload file {file}"))?
        }
        None => payload.into_bytes(),
    };
    let req = InvokeRequest {
        module,
        topic,
        payload,
        env,
        memory_limit: memory_limit.map(|m| m.as_u64() as usize),
        timeout,
        pulley,
        fuel,
        max_emit_bytes: max_emit_bytes.as_u64() as usize,
        log_rate_limit,
        state: state.as_deref().map(read_state).transpose()?,
        state_limit: state_limit.as_u64() as usize,
    };
    let (report, after) = invoke(&req)?;
    print!("{}", render(&req.module, &report, fuel));
    if req.state.is_some() || !after.is_empty() {
        println!("state   {}", state_json(&after));
    }
    Ok(std::process::ExitCode::from(exit_code(&report) as u8))
}

/// What `edgefn invoke` runs.
#[derive(Debug, Clone)]
pub struct InvokeRequest {
    /// The module file.
    pub module: std::path::PathBuf,
    /// The message topic.
    pub topic: String,
    /// The message payload.
    pub payload: Vec<u8>,
    /// Environment variables for the guest.
    pub env: Vec<(String, String)>,
    /// Memory limit.
    pub memory_limit: Option<usize>,
    /// Timeout.
    pub timeout: Duration,
    /// Run on the Pulley interpreter instead of native code.
    pub pulley: bool,
    /// Fuel budget; without one the fuel used is still counted and shown,
    /// so an author can choose a budget.
    pub fuel: Option<u64>,
    /// Most bytes the invocation may emit (`max_emit_bytes`).
    pub max_emit_bytes: usize,
    /// Log lines per second (`log_rate_limit`).
    pub log_rate_limit: u32,
    /// The function's state before the invocation (`--state`), if given.
    pub state: Option<Entries>,
    /// Most bytes of state (`state_limit`).
    pub state_limit: usize,
}

/// Reads a `--state` file: a JSON object of keys and values; a string
/// value is its text, any other value its JSON.
pub fn read_state(path: &Path) -> anyhow::Result<Entries> {
    use anyhow::Context as _;
    let text = std::fs::read(path)
        .with_context(|| format!("cannot read state file {}", path.display()))?;
    let map: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(&text)
        .with_context(|| {
            format!(
                "{} is not a JSON object of state keys and values",
                path.display()
            )
        })?;
    Ok(map
        .into_iter()
        .map(|(k, v)| {
            let v = match v {
                serde_json::Value::String(s) => s.into_bytes(),
                other => other.to_string().into_bytes(),
            };
            (k.into_bytes(), v)
        })
        .collect())
}

/// The state after an invocation, as `edgefn invoke` prints it: a JSON
/// object (values that are not UTF-8 as hex, `0x…`).
pub fn state_json(state: &StateMap) -> String {
    let map: serde_json::Map<String, serde_json::Value> = state
        .iter()
        .map(|(k, v)| {
            (
                edgefn::text::printable_bytes(k),
                serde_json::Value::String(show_payload(v)),
            )
        })
        .collect();
    serde_json::to_string_pretty(&map).expect("state JSON")
}

/// Loads the module and runs the event once on a fresh instance.
///
/// Fails if the module does not load; a failing *invocation* is reported
/// in the [`Report`].
pub fn invoke(req: &InvokeRequest) -> anyhow::Result<(Report, StateMap)> {
    let runtime = Runtime::new(if req.pulley {
        Target::Pulley
    } else {
        Target::for_host()
    })?;
    let state = FunctionState::with(
        "invoke",
        req.state_limit,
        req.state.clone().unwrap_or_default(),
    );
    let spec = FunctionSpec {
        name: "invoke".into(),
        env: req.env.clone(),
        memory_limit: req.memory_limit,
        timeout: req.timeout,
        max_record_size: usize::MAX,
        max_emit_bytes: req.max_emit_bytes,
        max_topic_len: edgefn::runtime::MAX_TOPIC_LEN,
        log_rate_limit: req.log_rate_limit,
        fuel: Some(req.fuel.unwrap_or(u64::MAX)),
        emit_allow: None,
        publish_allow: Arc::from([TopicFilter::new("#").expect("a filter")]),
        state: state.clone(),
        calls: Arc::default(),
    };
    let function = runtime.load_file(&req.module, spec)?;
    let mut instance = function
        .new_capturing_instance()
        .map_err(|f| anyhow::anyhow!("{}: {f}", req.module.display()))?;
    let report = instance.invoke_report(&req.topic, &req.payload);
    Ok((report, state.entries()))
}

/// Renders a payload for a terminal: UTF-8 text as is, bytes as hex.
pub fn show_payload(payload: &[u8]) -> String {
    match std::str::from_utf8(payload) {
        Ok(s) => edgefn::text::printable(s).into_owned(),
        Err(_) => {
            let mut out = String::from("0x");
            for b in payload {
                let _ = write!(out, "{b:02x}");
            }
            out
        }
    }
}

/// Renders a report as the CLI prints it; `budget` is the fuel budget
/// asked for, if any.
pub fn render(module: &Path, report: &Report, budget: Option<u64>) -> String {
    let mut out = String::new();
    let level = |l: LogLevel| match l {
        LogLevel::Trace => "TRACE",
        LogLevel::Debug => "DEBUG",
        LogLevel::Info => "INFO",
        LogLevel::Warn => "WARN",
        LogLevel::Error => "ERROR",
    };
    for GuestLog {
        level: l,
        stream,
        message,
    } in &report.logs
    {
        let _ = writeln!(
            out,
            "log     {:5} [{stream}] {}",
            level(*l),
            Printable(message)
        );
    }
    if let Ok(output) = &report.result {
        for e in &output.records {
            let _ = writeln!(
                out,
                "emit    {} {}",
                Printable(&e.topic),
                show_payload(&e.payload)
            );
        }
        for p in &output.publishes {
            let _ = writeln!(
                out,
                "publish {} {}",
                Printable(&p.topic),
                show_payload(&p.payload)
            );
        }
    }
    if let Some(used) = report.fuel_used {
        let _ = match budget {
            Some(b) => writeln!(out, "fuel    {used} of a budget of {b}"),
            None => writeln!(
                out,
                "fuel    {used} (set a budget with --fuel, or fuel = N)"
            ),
        };
    }
    match &report.result {
        Ok(output) => {
            let _ = writeln!(
                out,
                "ok      {} record(s), {} publish(es) in {:.3} ms ({})",
                output.records.len(),
                output.publishes.len(),
                report.elapsed.as_secs_f64() * 1000.0,
                module.display()
            );
        }
        Err(f) => {
            let _ = writeln!(
                out,
                "failed  {} after {:.3} ms ({}); nothing it emitted is kept",
                Printable(&f.to_string()),
                report.elapsed.as_secs_f64() * 1000.0,
                module.display()
            );
        }
    }
    out
}

/// Exit status for a report: 0 ok, 1 failed invocation.
pub fn exit_code(report: &Report) -> i32 {
    i32::from(report.result.is_err())
}
