//! The host side of ABI v1: the `edgefn` imports and captured stdio.
//!
//! Every import reads guest memory through bounds-checked slices; a range
//! outside memory is an error, which wasmtime turns into a trap that fails
//! the invocation (and only it).

use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use wasmtime::{Caller, Linker, StoreLimits, StoreLimitsBuilder};
use wasmtime_wasi::WasiCtxBuilder;
use wasmtime_wasi::p1::WasiP1Ctx;

use super::{FunctionSpec, MAX_CAPTURED_OUTPUT, MAX_RECORDS_PER_INVOCATION, Output};

/// Names of the `edgefn` module's imports, for error messages.
pub(super) const IMPORTS: &[&str] = &["emit", "publish", "log", "set_error"];

/// Most bytes of a `set_error` message kept.
const MAX_ERROR_MESSAGE: usize = 1024;

/// Longest topic MQTT allows.
const MAX_TOPIC_LEN: usize = 65535;

/// Return codes of `emit` and `publish` (docs/ABI.md).
mod code {
    /// Accepted.
    pub const OK: i32 = 0;
    /// Empty, not UTF-8, wildcard or NUL in the topic, or too long.
    pub const INVALID_TOPIC: i32 = -1;
    /// Payload above the function's `max_record_size`.
    pub const TOO_LARGE: i32 = -2;
    /// More than [`super::MAX_RECORDS_PER_INVOCATION`] in one invocation.
    pub const TOO_MANY: i32 = -3;
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
    /// WASI preview 1 (env, clocks, random, captured stdio).
    pub(super) wasi: WasiP1Ctx,
    /// Memory/instance limits, installed with `Store::limiter`.
    pub(super) limits: StoreLimits,
    /// The function's name and limits.
    pub(super) spec: Arc<FunctionSpec>,
    /// Emitted so far in this invocation.
    records: Vec<Emitted>,
    /// Published so far in this invocation.
    publishes: Vec<Emitted>,
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
    pub(super) fn new(spec: Arc<FunctionSpec>) -> HostState {
        let stdout = Arc::new(Mutex::new(Vec::new()));
        let stderr = Arc::new(Mutex::new(Vec::new()));
        let wasi = WasiCtxBuilder::new()
            .envs(&spec.env)
            .stdout(Capture(stdout.clone()))
            .stderr(Capture(stderr.clone()))
            .build_p1();
        let limits = StoreLimitsBuilder::new()
            .memory_size(spec.memory_limit)
            .instances(1)
            .memories(1)
            .tables(4)
            .table_elements(100_000)
            .build();
        HostState {
            wasi,
            limits,
            spec,
            records: Vec::new(),
            publishes: Vec::new(),
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
        self.error = None;
    }

    /// What a successful invocation produced.
    pub(super) fn take_output(&mut self) -> Output {
        Output {
            records: std::mem::take(&mut self.records),
            publishes: std::mem::take(&mut self.publishes),
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
    }

    fn log(&mut self, level: LogLevel, stream: &'static str, message: String) {
        match &mut self.sink {
            LogSink::Collect(v) => v.push(GuestLog {
                level,
                stream,
                message,
            }),
            LogSink::Tracing => {
                let function = &*self.spec.name;
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
    let memory = caller
        .get_export("memory")
        .and_then(|e| e.into_memory())
        .ok_or_else(|| wasmtime::format_err!("guest has no memory export"))?;
    let data = memory.data(&caller);
    let (start, len) = (ptr as u32 as usize, len as u32 as usize);
    data.get(start..start.saturating_add(len))
        .map(<[u8]>::to_vec)
        .ok_or_else(|| {
            wasmtime::format_err!(
                "guest passed an out-of-bounds range {start:#x}+{len} (memory is {} bytes)",
                data.len()
            )
        })
}

/// Whether an emitted/published topic is a valid MQTT topic name.
fn valid_topic(topic: &[u8]) -> Option<String> {
    if topic.is_empty() || topic.len() > MAX_TOPIC_LEN {
        return None;
    }
    let s = std::str::from_utf8(topic).ok()?;
    if s.contains(['+', '#', '\0']) {
        return None;
    }
    Some(s.to_owned())
}

/// Shared body of `emit` and `publish`.
fn record(
    caller: &mut Caller<'_, HostState>,
    args: (i32, i32, i32, i32),
    publish: bool,
) -> wasmtime::Result<i32> {
    let topic = read_guest(caller, args.0, args.1)?;
    let payload = read_guest(caller, args.2, args.3)?;
    let state = caller.data_mut();
    let Some(topic) = valid_topic(&topic) else {
        return Ok(code::INVALID_TOPIC);
    };
    if payload.len() > state.spec.max_record_size {
        return Ok(code::TOO_LARGE);
    }
    let list = if publish {
        &mut state.publishes
    } else {
        &mut state.records
    };
    if list.len() >= MAX_RECORDS_PER_INVOCATION {
        return Ok(code::TOO_MANY);
    }
    list.push(Emitted { topic, payload });
    Ok(code::OK)
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
            c.data_mut().log(LogLevel::from_abi(level), "log", message);
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
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topics_are_checked() {
        assert_eq!(valid_topic(b"a/b").as_deref(), Some("a/b"));
        assert_eq!(valid_topic(b""), None);
        assert_eq!(valid_topic(b"a/+"), None);
        assert_eq!(valid_topic(b"a/#"), None);
        assert_eq!(valid_topic(b"a\0"), None);
        assert_eq!(valid_topic(&[0xff, 0xfe]), None);
    }
}
