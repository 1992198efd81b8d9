//! The host side of ABI v1: the `edgefn` imports, captured stdio, and the
//! bounds on what one function can make the gateway hold or log.
//!
//! Every import reads guest memory through bounds-checked slices; a range
//! outside memory is an error, which wasmtime turns into a trap that fails
//! the invocation (and only it).
//!
//! Bounds: an invocation may emit (and, separately, publish) at most
//! [`MAX_RECORDS_PER_INVOCATION`] records and `max_emit_bytes` of topics
//! and payloads; a log line (from `log`, stdout or stderr) keeps at most
//! [`MAX_LOG_LINE`] bytes; and a function's instances together log at most
//! `log_rate_limit` lines per second (a token bucket holding one second's
//! worth), the rest being counted and reported in one line.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use wasmtime::{Caller, Linker, ResourceLimiter};
use wasmtime_wasi::p1::WasiP1Ctx;
use wasmtime_wasi::{WasiCtxBuilder, WasiCtxView, WasiView};

use super::{FunctionSpec, MAX_CAPTURED_OUTPUT, MAX_RECORDS_PER_INVOCATION, Output};
use crate::state::{MAX_KEY_LEN, Overlay, Refused};

/// Names of the `edgefn` module's imports, for error messages.
pub(super) const IMPORTS: &[&str] = &[
    "emit",
    "publish",
    "log",
    "set_error",
    "state_get",
    "state_set",
    "state_delete",
];

/// Most bytes of a `set_error` message kept.
const MAX_ERROR_MESSAGE: usize = 1024;

/// Longest topic MQTT allows.
pub const MAX_TOPIC_LEN: usize = 65535;

/// Most bytes of one log line kept (longer ones are cut, saying by how
/// much): a journal line, not a payload dump.
pub const MAX_LOG_LINE: usize = 4096;

/// Return codes of `emit`, `publish` and the state imports (docs/ABI.md).
pub(super) mod code {
    /// Accepted.
    pub const OK: i32 = 0;
    /// Empty, not UTF-8, wildcard or NUL in the topic, or too long.
    pub const INVALID_TOPIC: i32 = -1;
    /// Payload above the function's `max_record_size`.
    pub const TOO_LARGE: i32 = -2;
    /// More than [`super::MAX_RECORDS_PER_INVOCATION`] in one invocation.
    pub const TOO_MANY: i32 = -3;
    /// Past the function's `max_emit_bytes` in one invocation.
    pub const TOO_MANY_BYTES: i32 = -4;
    /// The topic is outside the function's `emit_allow` / `publish_allow`.
    pub const NOT_ALLOWED: i32 = -5;
    /// The write would take the function's state past its `state_limit`.
    pub const STATE_LIMIT: i32 = -6;
    /// A state key that is empty or longer than 1 KiB.
    pub const INVALID_KEY: i32 = -7;
    /// `state_get`: no such key.
    pub const ABSENT: i32 = -1;
}

/// Import calls a function's instances made that were refused, by why:
/// shared by the instances of one function (all its versions, in a
/// gateway).
#[derive(Debug, Default)]
pub struct RefusedCalls {
    /// `emit` to a topic outside `emit_allow`.
    pub emit_denied: AtomicU64,
    /// `publish` to a topic outside `publish_allow`.
    pub publish_denied: AtomicU64,
    /// `state_set` past `state_limit`, and `state_set`/`state_delete`
    /// past the writes one invocation may make.
    pub state_refused: AtomicU64,
}

/// The bounds on one store: every linear memory together within the
/// function's `memory_limit` (a component has several: its interpreter's,
/// libc's, the WASI adapter's), and room for the instances and tables a
/// module (one each) or a component (a few dozen) is made of.
pub(super) struct Limits {
    /// Most bytes of linear memory, all memories together.
    memory_limit: usize,
    /// Bytes of linear memory now, all memories together.
    memory: usize,
    /// The most the store asked for and was refused, if any: for the
    /// error that says how much a function needs.
    refused: Option<usize>,
    /// The growth last accepted, taken back if wasmtime then fails it.
    accepted: usize,
    /// Most core instances, memories and tables.
    counts: (usize, usize, usize),
}

/// Most elements of one table.
const MAX_TABLE_ELEMENTS: usize = 100_000;

impl Limits {
    fn new(memory_limit: usize, component: bool) -> Limits {
        Limits {
            memory_limit,
            memory: 0,
            refused: None,
            accepted: 0,
            counts: if component { (256, 64, 256) } else { (1, 1, 4) },
        }
    }

    /// Bytes of linear memory the store has, all memories together.
    pub(super) fn memory(&self) -> usize {
        self.memory
    }

    /// Most bytes of linear memory, all memories together.
    pub(super) fn memory_limit(&self) -> usize {
        self.memory_limit
    }

    /// The largest total the store asked for and was refused, if any.
    pub(super) fn refused(&self) -> Option<usize> {
        self.refused
    }
}

impl ResourceLimiter for Limits {
    fn memory_growing(
        &mut self,
        current: usize,
        desired: usize,
        maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        // Past the memory's own maximum wasmtime fails it anyway; refused
        // here, it is not counted.
        if maximum.is_some_and(|m| desired > m) {
            return Ok(false);
        }
        let total = (self.memory - current.min(self.memory)).saturating_add(desired);
        if total > self.memory_limit {
            self.refused = Some(self.refused.unwrap_or(0).max(total));
            return Ok(false);
        }
        self.accepted = total - self.memory;
        self.memory = total;
        Ok(true)
    }

    fn memory_grow_failed(&mut self, error: wasmtime::Error) -> wasmtime::Result<()> {
        // A growth this limiter accepted did not happen (the host could not
        // map it): no longer counted. wasmtime also reports growths it
        // refused before asking the limiter (past what the memory's type can
        // represent); those were never counted.
        if !error.to_string().contains("memory type's limits") {
            self.memory -= std::mem::take(&mut self.accepted).min(self.memory);
        }
        Ok(())
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        Ok(desired <= MAX_TABLE_ELEMENTS)
    }

    fn instances(&self) -> usize {
        self.counts.0
    }

    fn memories(&self) -> usize {
        self.counts.1
    }

    fn tables(&self) -> usize {
        self.counts.2
    }
}

/// A function's allowance of log lines, shared by all its instances: a
/// token bucket of `rate` lines refilled at `rate` per second.
#[derive(Debug)]
pub struct LogBudget {
    /// Lines per second (and the bucket's size).
    rate: u32,
    /// The bucket.
    state: Mutex<BucketState>,
    /// Lines dropped so far, for metrics.
    suppressed_total: AtomicU64,
    /// Lines dropped since the last notice (a copy of the state's, read
    /// without the lock at the end of every invocation).
    unreported: AtomicU64,
}

/// The mutable part of a [`LogBudget`].
#[derive(Debug)]
struct BucketState {
    /// Lines that may be logged now.
    tokens: f64,
    /// When `tokens` was last refilled.
    refilled: Instant,
    /// Lines dropped since the last notice.
    suppressed: u64,
    /// When the last "lines suppressed" notice went out.
    noticed: Option<Instant>,
}

/// What [`LogBudget::admit`] decided about one line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Admit {
    /// Log it.
    Line,
    /// Log a notice that this many lines were suppressed, then the line.
    AfterSuppressed(u64),
    /// Drop it (counted).
    Suppressed,
}

impl LogBudget {
    /// A full bucket of `rate` lines per second (at least 1).
    pub fn new(rate: u32) -> LogBudget {
        let rate = rate.max(1);
        LogBudget {
            rate,
            state: Mutex::new(BucketState {
                tokens: f64::from(rate),
                refilled: Instant::now(),
                suppressed: 0,
                noticed: None,
            }),
            suppressed_total: AtomicU64::new(0),
            unreported: AtomicU64::new(0),
        }
    }

    /// Lines dropped so far by this budget.
    pub fn suppressed(&self) -> u64 {
        self.suppressed_total.load(Ordering::Relaxed)
    }

    /// Takes a token for one line, if there is one.
    fn admit(&self) -> Admit {
        let now = Instant::now();
        let mut s = self.state.lock().expect("log budget lock");
        let rate = f64::from(self.rate);
        let elapsed = now.duration_since(s.refilled).as_secs_f64();
        s.tokens = (s.tokens + elapsed * rate).min(rate);
        s.refilled = now;
        if s.tokens < 1.0 {
            s.suppressed += 1;
            self.suppressed_total.fetch_add(1, Ordering::Relaxed);
            self.unreported.store(s.suppressed, Ordering::Relaxed);
            return Admit::Suppressed;
        }
        s.tokens -= 1.0;
        self.unreported.store(0, Ordering::Relaxed);
        match std::mem::take(&mut s.suppressed) {
            0 => Admit::Line,
            n => {
                s.noticed = Some(now);
                Admit::AfterSuppressed(n)
            }
        }
    }

    /// Lines suppressed since the last notice, if a notice is due: at most
    /// one a second, so a function that floods and then goes quiet is
    /// still reported without the notices becoming a flood of their own.
    fn notice_due(&self) -> Option<u64> {
        if self.unreported.load(Ordering::Relaxed) == 0 {
            return None;
        }
        let now = Instant::now();
        let mut s = self.state.lock().expect("log budget lock");
        let due = s
            .noticed
            .is_none_or(|t| now.duration_since(t) >= Duration::from_secs(1));
        if s.suppressed == 0 || !due {
            return None;
        }
        s.noticed = Some(now);
        self.unreported.store(0, Ordering::Relaxed);
        Some(std::mem::take(&mut s.suppressed))
    }
}

/// `message` cut to [`MAX_LOG_LINE`] bytes (at a character boundary),
/// saying how much was cut.
fn cap_line(mut message: String) -> String {
    if message.len() <= MAX_LOG_LINE {
        return message;
    }
    let mut end = MAX_LOG_LINE;
    while !message.is_char_boundary(end) {
        end -= 1;
    }
    let cut = message.len() - end;
    message.truncate(end);
    message.push_str(&format!(" [{cut} more bytes cut]"));
    message
}

/// One record a function emitted or published.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Emitted {
    /// Topic as the function gave it (no prefix).
    pub topic: String,
    /// Payload bytes.
    pub payload: Vec<u8>,
}

/// Guest log levels (`log(level, …)`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogLevel {
    /// 0
    Trace,
    /// 1
    Debug,
    /// 2, and any unknown level; also stdout lines.
    Info,
    /// 3; also stderr lines.
    Warn,
    /// 4
    Error,
}

impl LogLevel {
    fn from_abi(level: i32) -> LogLevel {
        match level {
            0 => LogLevel::Trace,
            1 => LogLevel::Debug,
            3 => LogLevel::Warn,
            4 => LogLevel::Error,
            _ => LogLevel::Info,
        }
    }
}

/// One line a guest logged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestLog {
    /// Level.
    pub level: LogLevel,
    /// Where it came from: `log`, `stdout` or `stderr`.
    pub stream: &'static str,
    /// The text.
    pub message: String,
}

/// Where guest logs go.
pub(super) enum LogSink {
    /// To `tracing`, tagged with the function's name (the daemon).
    Tracing,
    /// Kept for the caller (`edgefn invoke`).
    Collect(Vec<GuestLog>),
}

/// Per-store state: the WASI context, limits and what the current
/// invocation produced.
pub(super) struct HostState {
    /// WASI (env, clocks, random, captured stdio): preview 1 for modules,
    /// through the same context 0.2 for components.
    pub(super) wasi: WasiP1Ctx,
    /// Memory/instance limits, installed with `Store::limiter`.
    pub(super) limits: Limits,
    /// The function's name and limits.
    pub(super) spec: Arc<FunctionSpec>,
    /// The function's log allowance, shared by its instances.
    log_budget: Arc<LogBudget>,
    /// Emitted so far in this invocation.
    records: Vec<Emitted>,
    /// Bytes (topics and payloads) of `records`.
    record_bytes: usize,
    /// Published so far in this invocation.
    publishes: Vec<Emitted>,
    /// Bytes (topics and payloads) of `publishes`.
    publish_bytes: usize,
    /// State written so far in this invocation.
    overlay: Overlay,
    /// Last `set_error` message.
    pub(super) error: Option<String>,
    /// Where logs go.
    pub(super) sink: LogSink,
    /// Captured stdout bytes.
    stdout: Arc<Mutex<Vec<u8>>>,
    /// Captured stderr bytes.
    stderr: Arc<Mutex<Vec<u8>>>,
}

impl HostState {
    /// A fresh state for one instance of a module (`component`: false) or
    /// a component, with `memory_limit` bytes of memory.
    pub(super) fn new(
        spec: Arc<FunctionSpec>,
        log_budget: Arc<LogBudget>,
        memory_limit: usize,
        component: bool,
    ) -> HostState {
        let stdout = Arc::new(Mutex::new(Vec::new()));
        let stderr = Arc::new(Mutex::new(Vec::new()));
        // No preopened directories, no network: a guest's file and socket
        // calls fail. These are WASI's defaults, spelled out.
        let wasi = WasiCtxBuilder::new()
            .envs(&spec.env)
            .stdout(Capture(stdout.clone()))
            .stderr(Capture(stderr.clone()))
            .allow_tcp(false)
            .allow_udp(false)
            .allow_ip_name_lookup(false)
            .build_p1();
        let limits = Limits::new(memory_limit, component);
        HostState {
            wasi,
            limits,
            spec,
            log_budget,
            records: Vec::new(),
            record_bytes: 0,
            publishes: Vec::new(),
            publish_bytes: 0,
            overlay: Overlay::default(),
            error: None,
            sink: LogSink::Tracing,
            stdout,
            stderr,
        }
    }

    /// Clears per-invocation state.
    pub(super) fn begin(&mut self) {
        self.records.clear();
        self.publishes.clear();
        self.record_bytes = 0;
        self.publish_bytes = 0;
        self.overlay.clear();
        self.error = None;
    }

    /// What a successful invocation produced.
    pub(super) fn take_output(&mut self) -> Output {
        self.record_bytes = 0;
        self.publish_bytes = 0;
        Output {
            records: std::mem::take(&mut self.records),
            publishes: std::mem::take(&mut self.publishes),
            state: self.overlay.take(),
        }
    }

    /// Sends captured stdout/stderr to the log, line by line.
    pub(super) fn flush_output(&mut self) {
        for (buf, stream, level) in [
            (self.stdout.clone(), "stdout", LogLevel::Info),
            (self.stderr.clone(), "stderr", LogLevel::Warn),
        ] {
            let bytes = std::mem::take(&mut *buf.lock().expect("stdio lock"));
            if bytes.is_empty() {
                continue;
            }
            let text = String::from_utf8_lossy(&bytes);
            for line in text.lines() {
                self.log(level, stream, line.to_owned());
            }
            if bytes.len() >= MAX_CAPTURED_OUTPUT {
                self.log(level, stream, "[output truncated]".into());
            }
        }
        if let Some(n) = self.log_budget.notice_due() {
            self.suppressed_notice(n);
        }
    }

    /// Logs `message` within the line cap and the function's rate limit.
    fn log(&mut self, level: LogLevel, stream: &'static str, message: String) {
        match self.log_budget.admit() {
            Admit::Suppressed => return,
            Admit::AfterSuppressed(n) => self.suppressed_notice(n),
            Admit::Line => {}
        }
        self.write_log(level, stream, cap_line(message));
    }

    /// Says that `n` lines were not logged.
    fn suppressed_notice(&mut self, n: u64) {
        let rate = self.log_budget.rate;
        self.write_log(
            LogLevel::Warn,
            "edgefn",
            format!("{n} log lines suppressed (log_rate_limit is {rate} lines per second)"),
        );
    }

    fn write_log(&mut self, level: LogLevel, stream: &'static str, message: String) {
        match &mut self.sink {
            LogSink::Collect(v) => v.push(GuestLog {
                level,
                stream,
                message,
            }),
            LogSink::Tracing => {
                let function = &*self.spec.name;
                // A line break or escape in a guest's line must not forge
                // or rewrite journal lines.
                let message = crate::text::Printable(&message);
                match level {
                    LogLevel::Trace => tracing::trace!(function, stream, "{message}"),
                    LogLevel::Debug => tracing::debug!(function, stream, "{message}"),
                    LogLevel::Info => tracing::info!(function, stream, "{message}"),
                    LogLevel::Warn => tracing::warn!(function, stream, "{message}"),
                    LogLevel::Error => tracing::error!(function, stream, "{message}"),
                }
            }
        }
    }
}

impl WasiView for HostState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        self.wasi.ctx()
    }
}

/// Captured guest stdout or stderr: bytes appended to a buffer, capped.
#[derive(Clone)]
struct Capture(Arc<Mutex<Vec<u8>>>);

impl wasmtime_wasi::cli::IsTerminal for Capture {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl wasmtime_wasi::cli::StdoutStream for Capture {
    // The default adapter writes through a background task, so output would
    // land after the invocation ended; this stream writes synchronously.
    fn p2_stream(&self) -> Box<dyn wasmtime_wasi::p2::OutputStream> {
        Box::new(self.clone())
    }
    fn async_stream(&self) -> Box<dyn tokio::io::AsyncWrite + Send + Sync> {
        Box::new(self.clone())
    }
}

impl Capture {
    fn append(&self, buf: &[u8]) {
        let mut out = self.0.lock().expect("stdio lock");
        let room = MAX_CAPTURED_OUTPUT.saturating_sub(out.len());
        out.extend_from_slice(&buf[..buf.len().min(room)]);
    }
}

impl wasmtime_wasi::p2::OutputStream for Capture {
    fn write(&mut self, bytes: bytes::Bytes) -> wasmtime_wasi::p2::StreamResult<()> {
        // Excess output is dropped, not an error.
        self.append(&bytes);
        Ok(())
    }
    fn flush(&mut self) -> wasmtime_wasi::p2::StreamResult<()> {
        Ok(())
    }
    fn check_write(&mut self) -> wasmtime_wasi::p2::StreamResult<usize> {
        Ok(MAX_CAPTURED_OUTPUT)
    }
}

#[wasmtime_wasi::async_trait]
impl wasmtime_wasi::p2::Pollable for Capture {
    async fn ready(&mut self) {}
}

impl tokio::io::AsyncWrite for Capture {
    fn poll_write(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.append(buf);
        Poll::Ready(Ok(buf.len()))
    }
    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

/// Copies `len` bytes at `ptr` out of the guest's memory.
///
/// Fails (and so traps the guest) if the range is outside memory.
fn read_guest(caller: &mut Caller<'_, HostState>, ptr: i32, len: i32) -> wasmtime::Result<Vec<u8>> {
    let memory = guest_memory(caller)?;
    let data = memory.data(&caller);
    let (start, len) = (ptr as u32 as usize, len as u32 as usize);
    data.get(start..start.saturating_add(len))
        .map(<[u8]>::to_vec)
        .ok_or_else(|| out_of_bounds(start, len, data.len()))
}

/// The guest's exported memory.
fn guest_memory(caller: &mut Caller<'_, HostState>) -> wasmtime::Result<wasmtime::Memory> {
    caller
        .get_export("memory")
        .and_then(|e| e.into_memory())
        .ok_or_else(|| wasmtime::format_err!("guest has no memory export"))
}

/// The trap for a range outside the guest's memory.
fn out_of_bounds(start: usize, len: usize, size: usize) -> wasmtime::Error {
    wasmtime::format_err!(
        "guest passed an out-of-bounds range {start:#x}+{len} (memory is {size} bytes)"
    )
}

/// Whether an emitted/published topic is a valid MQTT topic name of at
/// most `max_len` bytes.
fn valid_topic(topic: &[u8], max_len: usize) -> Option<String> {
    if topic.is_empty() || topic.len() > max_len {
        return None;
    }
    let s = std::str::from_utf8(topic).ok()?;
    if s.contains(['+', '#', '\0']) {
        return None;
    }
    Some(s.to_owned())
}

/// Why the host refused a call: ABI v1's negative codes, the WIT world's
/// `error` enum.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Refusal {
    /// Empty, not UTF-8, wildcard or NUL in the topic, or too long.
    InvalidTopic,
    /// Payload above `max_record_size`.
    TooLarge,
    /// More than [`MAX_RECORDS_PER_INVOCATION`] records in one invocation.
    TooManyRecords,
    /// Past `max_emit_bytes` in one invocation.
    TooManyBytes,
    /// Outside `emit_allow` / `publish_allow`.
    NotAllowed,
    /// Past `state_limit`.
    StateLimit,
    /// A state key that is empty or longer than 1 KiB.
    InvalidKey,
    /// More state writes than one invocation may make.
    TooManyWrites,
}

impl Refusal {
    /// The ABI v1 return code.
    fn code(self) -> i32 {
        match self {
            Refusal::InvalidTopic => code::INVALID_TOPIC,
            Refusal::TooLarge => code::TOO_LARGE,
            Refusal::TooManyRecords | Refusal::TooManyWrites => code::TOO_MANY,
            Refusal::TooManyBytes => code::TOO_MANY_BYTES,
            Refusal::NotAllowed => code::NOT_ALLOWED,
            Refusal::StateLimit => code::STATE_LIMIT,
            Refusal::InvalidKey => code::INVALID_KEY,
        }
    }
}

/// An ABI v1 return code: 0 or the refusal's.
fn status(r: Result<(), Refusal>) -> i32 {
    r.map_or_else(Refusal::code, |()| code::OK)
}

impl HostState {
    /// `emit` (`publish`: false) or `publish` of one record, within the
    /// function's permissions and bounds.
    pub(super) fn record(
        &mut self,
        topic: &[u8],
        payload: Vec<u8>,
        publish: bool,
    ) -> Result<(), Refusal> {
        // An emitted topic goes upstream behind the prefix; a published one
        // stays local.
        let max_topic = if publish {
            MAX_TOPIC_LEN
        } else {
            self.spec.max_topic_len
        };
        let Some(topic) = valid_topic(topic, max_topic) else {
            return Err(Refusal::InvalidTopic);
        };
        let allowed = if publish {
            self.spec.publish_allow.iter().any(|f| f.matches(&topic))
        } else {
            self.spec
                .emit_allow
                .as_ref()
                .is_none_or(|a| a.iter().any(|f| f.matches(&topic)))
        };
        if !allowed {
            let calls = &self.spec.calls;
            let denied = if publish {
                &calls.publish_denied
            } else {
                &calls.emit_denied
            };
            denied.fetch_add(1, Ordering::Relaxed);
            return Err(Refusal::NotAllowed);
        }
        if payload.len() > self.spec.max_record_size {
            return Err(Refusal::TooLarge);
        }
        let max_bytes = self.spec.max_emit_bytes;
        let (list, bytes) = if publish {
            (&mut self.publishes, &mut self.publish_bytes)
        } else {
            (&mut self.records, &mut self.record_bytes)
        };
        if list.len() >= MAX_RECORDS_PER_INVOCATION {
            return Err(Refusal::TooManyRecords);
        }
        let size = topic.len() + payload.len();
        if *bytes + size > max_bytes {
            return Err(Refusal::TooManyBytes);
        }
        *bytes += size;
        list.push(Emitted { topic, payload });
        Ok(())
    }

    /// Reads `key` (this invocation's writes first) and hands its value
    /// to `read`.
    pub(super) fn state_get<R>(
        &self,
        key: &[u8],
        read: impl FnOnce(Option<&[u8]>) -> R,
    ) -> Result<R, Refusal> {
        if key.is_empty() || key.len() > MAX_KEY_LEN {
            return Err(Refusal::InvalidKey);
        }
        Ok(self.overlay.read(&self.spec.state, key, read))
    }

    /// Sets `key` to `value`, or deletes it (`None`), in this invocation's
    /// writes.
    pub(super) fn state_write(&mut self, key: &[u8], value: Option<&[u8]>) -> Result<(), Refusal> {
        match self.overlay.write(&self.spec.state, key, value) {
            Ok(()) => Ok(()),
            Err(Refused::InvalidKey) => Err(Refusal::InvalidKey),
            Err(refused) => {
                self.spec
                    .calls
                    .state_refused
                    .fetch_add(1, Ordering::Relaxed);
                Err(if refused == Refused::TooMany {
                    Refusal::TooManyWrites
                } else {
                    Refusal::StateLimit
                })
            }
        }
    }

    /// A guest's `log` call.
    pub(super) fn guest_log(&mut self, level: LogLevel, message: String) {
        self.log(level, "log", message);
    }
}

/// ABI v1 `emit` and `publish`: the record read from guest memory.
fn record(
    caller: &mut Caller<'_, HostState>,
    args: (i32, i32, i32, i32),
    publish: bool,
) -> wasmtime::Result<i32> {
    let topic = read_guest(caller, args.0, args.1)?;
    let payload = read_guest(caller, args.2, args.3)?;
    Ok(status(caller.data_mut().record(&topic, payload, publish)))
}

/// `state_get`: copies the value into the buffer if it fits; returns its
/// length, or [`code::ABSENT`].
fn state_get(
    caller: &mut Caller<'_, HostState>,
    (kp, kl, bp, bl): (i32, i32, i32, i32),
) -> wasmtime::Result<i32> {
    let key = read_guest(caller, kp, kl)?;
    let memory = guest_memory(caller)?;
    let (data, host) = memory.data_and_store_mut(&mut *caller);
    let (start, cap) = (bp as u32 as usize, bl as u32 as usize);
    let Some(buf) = data.get_mut(start..start.saturating_add(cap)) else {
        return Err(out_of_bounds(start, cap, data.len()));
    };
    let read = host.state_get(&key, |v| match v {
        None => code::ABSENT,
        Some(v) => {
            if let Some(dst) = buf.get_mut(..v.len()) {
                dst.copy_from_slice(v);
            }
            i32::try_from(v.len()).unwrap_or(i32::MAX)
        }
    });
    Ok(read.unwrap_or_else(Refusal::code))
}

/// `state_set` (a value) and `state_delete` (`None`).
fn state_write(
    caller: &mut Caller<'_, HostState>,
    (kp, kl): (i32, i32),
    value: Option<(i32, i32)>,
) -> wasmtime::Result<i32> {
    let key = read_guest(caller, kp, kl)?;
    let value = value.map(|(p, l)| read_guest(caller, p, l)).transpose()?;
    Ok(status(
        caller.data_mut().state_write(&key, value.as_deref()),
    ))
}

/// Adds the `edgefn` imports to `linker`.
pub(super) fn add_to_linker(linker: &mut Linker<HostState>) -> wasmtime::Result<()> {
    linker.func_wrap(
        "edgefn",
        "emit",
        |mut c: Caller<'_, HostState>, tp: i32, tl: i32, pp: i32, pl: i32| {
            record(&mut c, (tp, tl, pp, pl), false)
        },
    )?;
    linker.func_wrap(
        "edgefn",
        "publish",
        |mut c: Caller<'_, HostState>, tp: i32, tl: i32, pp: i32, pl: i32| {
            record(&mut c, (tp, tl, pp, pl), true)
        },
    )?;
    linker.func_wrap(
        "edgefn",
        "log",
        |mut c: Caller<'_, HostState>, level: i32, ptr: i32, len: i32| -> wasmtime::Result<()> {
            let bytes = read_guest(&mut c, ptr, len)?;
            let message = String::from_utf8_lossy(&bytes).into_owned();
            c.data_mut().guest_log(LogLevel::from_abi(level), message);
            Ok(())
        },
    )?;
    linker.func_wrap(
        "edgefn",
        "set_error",
        |mut c: Caller<'_, HostState>, ptr: i32, len: i32| -> wasmtime::Result<()> {
            let mut bytes = read_guest(&mut c, ptr, len)?;
            bytes.truncate(MAX_ERROR_MESSAGE);
            c.data_mut().error = Some(String::from_utf8_lossy(&bytes).into_owned());
            Ok(())
        },
    )?;
    linker.func_wrap(
        "edgefn",
        "state_get",
        |mut c: Caller<'_, HostState>, kp: i32, kl: i32, bp: i32, bl: i32| {
            state_get(&mut c, (kp, kl, bp, bl))
        },
    )?;
    linker.func_wrap(
        "edgefn",
        "state_set",
        |mut c: Caller<'_, HostState>, kp: i32, kl: i32, vp: i32, vl: i32| {
            state_write(&mut c, (kp, kl), Some((vp, vl)))
        },
    )?;
    linker.func_wrap(
        "edgefn",
        "state_delete",
        |mut c: Caller<'_, HostState>, kp: i32, kl: i32| state_write(&mut c, (kp, kl), None),
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topics_are_checked() {
        let max = MAX_TOPIC_LEN;
        assert_eq!(valid_topic(b"a/b", max).as_deref(), Some("a/b"));
        assert_eq!(valid_topic(b"", max), None);
        assert_eq!(valid_topic(b"a/+", max), None);
        assert_eq!(valid_topic(b"a/#", max), None);
        assert_eq!(valid_topic(b"a\0", max), None);
        assert_eq!(valid_topic(&[0xff, 0xfe], max), None);
        assert_eq!(valid_topic(b"abc", 2), None);
    }

    #[test]
    fn long_log_lines_are_cut_at_a_character_boundary() {
        let line = "é".repeat(MAX_LOG_LINE);
        let cut = cap_line(line.clone());
        assert!(cut.len() < MAX_LOG_LINE + 40, "{}", cut.len());
        assert!(cut.starts_with(&line[..MAX_LOG_LINE]));
        assert!(cut.ends_with(&format!(" [{} more bytes cut]", line.len() - MAX_LOG_LINE)));
        assert_eq!(cap_line("short".into()), "short");
    }

    #[test]
    fn a_log_budget_admits_its_rate_then_reports_what_it_dropped() {
        let b = LogBudget::new(10);
        let admitted = (0..25).filter(|_| b.admit() != Admit::Suppressed).count();
        // A full bucket: ten at once (and at most one refilled meanwhile).
        assert!((10..=11).contains(&admitted), "{admitted}");
        assert_eq!(b.suppressed(), 25 - admitted as u64);
        assert_eq!(b.notice_due(), Some(25 - admitted as u64));
        // Reported once; nothing new since.
        assert_eq!(b.notice_due(), None);
    }
}
