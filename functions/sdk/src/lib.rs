//! Guest SDK for edgefn functions (ABI v1).
//!
//! An edgefn function is a WebAssembly module (wasm32, WASI preview 1,
//! "reactor": no `_start`) that exports a handler the gateway calls once per
//! MQTT message. This crate hides that ABI (see `docs/ABI.md`): write a
//! handler and name it in [`handler!`].
//!
//! ```ignore
//! use edgefn_sdk::{Error, Message};
//!
//! edgefn_sdk::handler!(handle);
//!
//! fn handle(msg: &Message) -> Result<(), Error> {
//!     edgefn_sdk::info(&format!("got {} bytes on {}", msg.payload().len(), msg.topic()));
//!     edgefn_sdk::emit("telemetry/echo", msg.payload())?;
//!     Ok(())
//! }
//! ```
//!
//! Build it as a `cdylib` for `wasm32-wasip1` (rustup) or `wasm32-wasi`
//! (Rust before 1.78, e.g. Debian's 1.63), with `panic = "abort"`.
//!
//! What is here:
//!
//! - [`handler!`]: the exports; [`Message`]: the input, with
//!   [`Message::schedule`] recognising a scheduled run;
//! - [`emit`], [`publish`]: records upstream and messages to the local
//!   broker ([`EmitError`] when the host refuses one);
//! - [`state`]: the function's durable key-value state;
//! - [`log`] (and [`trace`] ... [`error`]), [`set_error`], [`env()`],
//!   [`now_ms`];
//! - [`json`]: a small JSON reader and writer;
//! - [`sys`]: the raw imports, for what the wrappers do not cover.
//!
//! Everything in this crate also builds natively, so a function's logic can
//! be unit-tested with plain `cargo test`: the host imports are then replaced
//! by an in-process stand-in that records what the function emitted,
//! published and logged, and keeps its state (see [`testing`]).
//!
//! The crate has no dependencies and builds with Rust 1.63.

#![forbid(unsafe_op_in_unsafe_fn)]

use std::fmt;

pub mod json;
pub mod state;
pub mod sys;

pub use state::StateError;

#[cfg(not(target_arch = "wasm32"))]
pub mod testing;

/// The ABI version this SDK implements; `edgefn_abi_version()` returns it.
pub const ABI_VERSION: i32 = 1;

/// Longest topic the host accepts, in bytes (the MQTT limit).
pub const MAX_TOPIC_LEN: usize = 65535;

/// Most records (and, separately, most local publishes) one invocation may
/// produce; the host refuses the rest with [`EmitError::TooManyRecords`].
pub const MAX_RECORDS_PER_INVOCATION: usize = 1000;

/// Topics of scheduled runs: this, then the function's name
/// (`$edgefn/schedule/aggregate`). See [`Message::schedule`].
pub const SCHEDULE_TOPIC_PREFIX: &str = "$edgefn/schedule/";

// ---------------------------------------------------------------------------
// The message handed to a handler

/// One input message: its MQTT topic and payload.
///
/// The payload is arbitrary bytes: it need not be UTF-8 or JSON.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Message<'a> {
    topic: &'a str,
    payload: &'a [u8],
}

impl<'a> Message<'a> {
    /// A message (used by the generated exports, and by tests).
    pub fn new(topic: &'a str, payload: &'a [u8]) -> Message<'a> {
        Message { topic, payload }
    }

    /// The topic the message arrived on, e.g. `sensors/pi-7/temperature`.
    pub fn topic(&self) -> &'a str {
        self.topic
    }

    /// The raw payload.
    pub fn payload(&self) -> &'a [u8] {
        self.payload
    }

    /// The payload as text, or `None` if it is not valid UTF-8.
    pub fn payload_str(&self) -> Option<&'a str> {
        std::str::from_utf8(self.payload).ok()
    }

    /// Level `n` of the topic, counting from 0: for `sensors/pi-7/temperature`
    /// level 0 is `sensors`, level 1 is `pi-7`, level 2 is `temperature`, and
    /// level 3 is `None`. An empty level (as in `a//b`) is `Some("")`.
    pub fn topic_level(&self, n: usize) -> Option<&'a str> {
        self.topic.split('/').nth(n)
    }

    /// All levels of the topic, in order.
    pub fn topic_levels(&self) -> std::str::Split<'a, char> {
        self.topic.split('/')
    }

    /// The scheduled run this message is, or `None` for any other message.
    ///
    /// A function with a `schedule` in its configuration is called on those
    /// times with topic `$edgefn/schedule/<function name>` and payload
    /// `{"scheduled_ms":…,"now_ms":…}`; this recognises such a message
    /// (the topic prefix and both fields, as unsigned integers; other fields
    /// are ignored). Device messages can never have such a topic: topics
    /// under `$edgefn/` are the gateway's.
    pub fn schedule(&self) -> Option<ScheduledRun> {
        if !self.topic.starts_with(SCHEDULE_TOPIC_PREFIX) {
            return None;
        }
        let payload = json::from_slice(self.payload).ok()?;
        let field = |name: &str| payload.get(name).and_then(json::Value::as_u64);
        Some(ScheduledRun { scheduled_ms: field("scheduled_ms")?, now_ms: field("now_ms")? })
    }
}

/// A scheduled run of the function (see [`Message::schedule`]). Times are
/// milliseconds since the Unix epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ScheduledRun {
    /// When the run was due: a multiple of the interval for `every D`, a
    /// time the expression names for `cron: …`. The run at start-up that
    /// makes up for runs missed while the gateway was down carries the
    /// latest time missed.
    pub scheduled_ms: u64,
    /// When the gateway handed the run to the function (at or a little
    /// after `scheduled_ms`; later for the make-up run at start-up).
    pub now_ms: u64,
}

// ---------------------------------------------------------------------------
// Errors

/// The error a handler returns to fail the invocation. Its text becomes the
/// invocation's error message on the gateway (through `set_error`; the host
/// keeps at most 1 KiB of it).
///
/// Anything that is a string converts into it, as do the SDK's own errors, so
/// `?` and `.into()` work: `return Err("no device in topic".into())`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Error {
    message: String,
}

impl Error {
    /// An error with this message.
    pub fn new(message: impl Into<String>) -> Error {
        Error { message: message.into() }
    }

    /// The message.
    pub fn message(&self) -> &str {
        &self.message
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Error {}

impl From<&str> for Error {
    fn from(s: &str) -> Error {
        Error::new(s)
    }
}

impl From<String> for Error {
    fn from(s: String) -> Error {
        Error::new(s)
    }
}

impl From<EmitError> for Error {
    fn from(e: EmitError) -> Error {
        Error::new(e.to_string())
    }
}

impl From<StateError> for Error {
    fn from(e: StateError) -> Error {
        Error::new(e.to_string())
    }
}

impl From<json::ParseError> for Error {
    fn from(e: json::ParseError) -> Error {
        Error::new(format!("invalid JSON: {}", e))
    }
}

impl From<std::str::Utf8Error> for Error {
    fn from(e: std::str::Utf8Error) -> Error {
        Error::new(format!("invalid UTF-8: {}", e))
    }
}

impl From<std::string::FromUtf8Error> for Error {
    fn from(e: std::string::FromUtf8Error) -> Error {
        Error::new(format!("invalid UTF-8: {}", e))
    }
}

impl From<std::num::ParseFloatError> for Error {
    fn from(e: std::num::ParseFloatError) -> Error {
        Error::new(format!("invalid number: {}", e))
    }
}

impl From<std::num::ParseIntError> for Error {
    fn from(e: std::num::ParseIntError) -> Error {
        Error::new(format!("invalid integer: {}", e))
    }
}

impl From<fmt::Error> for Error {
    fn from(_: fmt::Error) -> Error {
        Error::new("formatting failed")
    }
}

/// Why the host refused a record from [`emit`] or a message from [`publish`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EmitError {
    /// -1: the topic is empty, not UTF-8, contains `+`, `#` or NUL, or is
    /// longer than 65535 bytes (for [`emit`]: less the length of the
    /// gateway's upstream topic prefix).
    InvalidTopic,
    /// -2: the payload is larger than the gateway's record size limit.
    PayloadTooLarge,
    /// -3: this invocation already produced the maximum number (1000).
    TooManyRecords,
    /// -4: this record would take the invocation's records (or publishes)
    /// past the function's `max_emit_bytes`.
    TooManyBytes,
    /// -5: the topic is outside the function's `emit_allow` (for [`emit`])
    /// or `publish_allow` (for [`publish`]; by default a function may
    /// publish nothing). The host counts the refusal.
    NotAllowed,
    /// A code this SDK does not know (from a newer host).
    Other(i32),
}

impl EmitError {
    /// The error for a non-zero return code of `emit`/`publish`.
    pub fn from_code(code: i32) -> EmitError {
        match code {
            -1 => EmitError::InvalidTopic,
            -2 => EmitError::PayloadTooLarge,
            -3 => EmitError::TooManyRecords,
            -4 => EmitError::TooManyBytes,
            -5 => EmitError::NotAllowed,
            other => EmitError::Other(other),
        }
    }

    /// The ABI return code.
    pub fn code(self) -> i32 {
        match self {
            EmitError::InvalidTopic => -1,
            EmitError::PayloadTooLarge => -2,
            EmitError::TooManyRecords => -3,
            EmitError::TooManyBytes => -4,
            EmitError::NotAllowed => -5,
            EmitError::Other(c) => c,
        }
    }
}

impl fmt::Display for EmitError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            EmitError::InvalidTopic => f.write_str("invalid topic"),
            EmitError::PayloadTooLarge => f.write_str("payload larger than the record size limit"),
            EmitError::TooManyRecords => f.write_str("too many records in this invocation"),
            EmitError::TooManyBytes => f.write_str("too many bytes emitted in this invocation"),
            EmitError::NotAllowed => f.write_str("topic not allowed by the function's emit_allow or publish_allow"),
            EmitError::Other(c) => write!(f, "refused by the host (code {})", c),
        }
    }
}

impl std::error::Error for EmitError {}

fn check_code(code: i32) -> Result<(), EmitError> {
    if code == 0 {
        Ok(())
    } else {
        Err(EmitError::from_code(code))
    }
}

// ---------------------------------------------------------------------------
// Host calls

/// Emits a record for upstream. The gateway prefixes its configured upstream
/// topic prefix to `topic`. Records are kept only if the whole invocation
/// succeeds.
///
/// Fails if the host refuses the record (see [`EmitError`]); the
/// invocation goes on, and `?` passes the refusal on as a failure.
pub fn emit(topic: &str, payload: impl AsRef<[u8]>) -> Result<(), EmitError> {
    check_code(sys::emit_slices(topic.as_bytes(), payload.as_ref()))
}

/// Publishes a message to the local broker (a command to a device, or input
/// for another function). Sent only after the invocation succeeded.
///
/// Fails if the host refuses it (see [`EmitError`]): among others with
/// [`EmitError::NotAllowed`] unless the function's `publish_allow` covers
/// the topic.
pub fn publish(topic: &str, payload: impl AsRef<[u8]>) -> Result<(), EmitError> {
    check_code(sys::publish_slices(topic.as_bytes(), payload.as_ref()))
}

/// Log levels, as numbered by the ABI.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Level {
    Trace = 0,
    Debug = 1,
    Info = 2,
    Warn = 3,
    Error = 4,
}

/// Writes a line to the gateway's log, tagged with the function's name.
pub fn log(level: Level, message: &str) {
    sys::log_slice(level as i32, message.as_bytes())
}

/// [`log`] at [`Level::Trace`].
pub fn trace(message: &str) {
    log(Level::Trace, message)
}

/// [`log`] at [`Level::Debug`].
pub fn debug(message: &str) {
    log(Level::Debug, message)
}

/// [`log`] at [`Level::Info`].
pub fn info(message: &str) {
    log(Level::Info, message)
}

/// [`log`] at [`Level::Warn`].
pub fn warn(message: &str) {
    log(Level::Warn, message)
}

/// [`log`] at [`Level::Error`].
pub fn error(message: &str) {
    log(Level::Error, message)
}

/// Sets the message the gateway reports if this invocation fails (the last
/// call wins). The [`handler!`] macro calls it with the handler's `Err`.
pub fn set_error(message: &str) {
    sys::set_error_slice(message.as_bytes())
}

/// The value of an environment variable from the function's `env` in the
/// gateway's configuration, or `None` if unset or not UTF-8.
pub fn env(key: &str) -> Option<String> {
    #[cfg(not(target_arch = "wasm32"))]
    {
        if let Some(value) = testing::env_override(key) {
            return value;
        }
    }
    std::env::var(key).ok()
}

/// The current time in milliseconds since the Unix epoch, from the
/// gateway's real-time clock (WASI `clock_time_get`, through
/// `std::time::SystemTime`); 0 if the clock is before 1970.
///
/// Natively, [`testing::set_now_ms`] sets the time seen on the current
/// thread, so tests of time-dependent logic are repeatable.
pub fn now_ms() -> u64 {
    #[cfg(not(target_arch = "wasm32"))]
    {
        if let Some(ms) = testing::now_override() {
            return ms;
        }
    }
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

// ---------------------------------------------------------------------------
// The exports

/// Generates the exports of an edgefn module (ABI v1) around a handler.
///
/// `edgefn_sdk::handler!(handle);` with
/// `fn handle(msg: &edgefn_sdk::Message) -> Result<(), edgefn_sdk::Error>`
/// exports `edgefn_abi_version`, `edgefn_alloc` and `edgefn_on_message`.
///
/// `edgefn_sdk::handler!(handle, init = setup);` with
/// `fn setup() -> Result<(), edgefn_sdk::Error>` also exports `edgefn_init`,
/// which the gateway calls once per instance before its first message.
///
/// On `Err(e)` the generated code calls `set_error` with `e` and returns 1.
/// The exports exist only when compiling for wasm32; natively the macro only
/// checks the handler's type, so unit tests build.
#[macro_export]
macro_rules! handler {
    ($handler:path) => {
        $crate::__handler_exports!($handler);
    };
    ($handler:path, init = $init:path) => {
        $crate::__handler_exports!($handler);

        #[cfg(target_arch = "wasm32")]
        #[no_mangle]
        pub extern "C" fn edgefn_init() -> i32 {
            $crate::__rt::init($init)
        }

        #[cfg(not(target_arch = "wasm32"))]
        #[doc(hidden)]
        pub const __EDGEFN_INIT: fn() -> ::core::result::Result<(), $crate::Error> = $init;
    };
}

#[doc(hidden)]
#[macro_export]
macro_rules! __handler_exports {
    ($handler:path) => {
        #[cfg(target_arch = "wasm32")]
        #[no_mangle]
        pub extern "C" fn edgefn_abi_version() -> i32 {
            $crate::ABI_VERSION
        }

        #[cfg(target_arch = "wasm32")]
        #[no_mangle]
        pub extern "C" fn edgefn_alloc(size: i32) -> i32 {
            $crate::__rt::alloc(size)
        }

        #[cfg(target_arch = "wasm32")]
        #[no_mangle]
        pub extern "C" fn edgefn_on_message(
            topic_ptr: i32,
            topic_len: i32,
            payload_ptr: i32,
            payload_len: i32,
        ) -> i32 {
            // SAFETY: the host passes the block it got from `edgefn_alloc`,
            // as the ABI prescribes.
            unsafe {
                $crate::__rt::on_message(topic_ptr, topic_len, payload_ptr, payload_len, $handler)
            }
        }

        // Natively there are no exports; naming the handler here checks its
        // type and keeps it from being reported as unused.
        #[cfg(not(target_arch = "wasm32"))]
        #[doc(hidden)]
        pub const __EDGEFN_HANDLER: for<'a, 'b> fn(&'a $crate::Message<'b>) -> ::core::result::Result<(), $crate::Error> =
            $handler;
    };
}

/// Runtime support for the generated exports. Not a public API.
#[doc(hidden)]
pub mod __rt {
    use super::{set_error, Error, Message};
    use std::alloc::Layout;

    fn layout(size: usize) -> Layout {
        // Alignment 1 can never make from_size_align fail for sizes that fit
        // in a wasm32 address space. A zero size allocates one byte, so the
        // allocator is never asked for a zero-sized block.
        Layout::from_size_align(size.max(1), 1).expect("layout")
    }

    /// `edgefn_alloc`: `size` bytes, alignment 1, or 0 if they cannot be had.
    pub fn alloc(size: i32) -> i32 {
        if size < 0 {
            return 0;
        }
        // SAFETY: the layout has a non-zero size.
        let p = unsafe { std::alloc::alloc(layout(size as usize)) };
        p as usize as i32
    }

    /// Frees a block returned by [`alloc`].
    ///
    /// # Safety
    /// `ptr`/`size` must be a block returned by `alloc(size)` not yet freed.
    pub unsafe fn free(ptr: i32, size: i32) {
        if ptr != 0 && size >= 0 {
            // SAFETY: as the caller promises.
            unsafe { std::alloc::dealloc(ptr as u32 as usize as *mut u8, layout(size as usize)) }
        }
    }

    /// `edgefn_on_message`: runs the handler, then frees the input block.
    ///
    /// # Safety
    /// The arguments must be the ones the ABI prescribes: `topic_ptr` from
    /// `edgefn_alloc(topic_len + payload_len)`, and
    /// `payload_ptr == topic_ptr + topic_len`.
    pub unsafe fn on_message(
        topic_ptr: i32,
        topic_len: i32,
        payload_ptr: i32,
        payload_len: i32,
        handler: fn(&Message) -> Result<(), Error>,
    ) -> i32 {
        if topic_len < 0 || payload_len < 0 || topic_ptr == 0 {
            set_error("edgefn_on_message: invalid arguments");
            return 1;
        }
        let result = {
            // SAFETY: the host wrote topic_len + payload_len bytes at topic_ptr
            // (ABI v1); the slices live only inside this block.
            let topic = unsafe {
                std::slice::from_raw_parts(topic_ptr as u32 as usize as *const u8, topic_len as usize)
            };
            let payload = unsafe {
                std::slice::from_raw_parts(payload_ptr as u32 as usize as *const u8, payload_len as usize)
            };
            match std::str::from_utf8(topic) {
                Ok(topic) => handler(&Message::new(topic, payload)),
                Err(_) => Err(Error::new("the topic is not UTF-8")),
            }
        };
        // SAFETY: the block is [topic_ptr, topic_ptr + topic_len + payload_len)
        // and it was handed to us by the call.
        unsafe { free(topic_ptr, topic_len.saturating_add(payload_len)) };
        finish(result)
    }

    /// `edgefn_init`.
    pub fn init(init: fn() -> Result<(), Error>) -> i32 {
        finish(init())
    }

    fn finish(result: Result<(), Error>) -> i32 {
        match result {
            Ok(()) => 0,
            Err(e) => {
                let message = e.message();
                set_error(if message.is_empty() { "failed" } else { message });
                1
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topic_levels() {
        let m = Message::new("sensors/pi-7/temperature", b"{}");
        assert_eq!(m.topic_level(0), Some("sensors"));
        assert_eq!(m.topic_level(1), Some("pi-7"));
        assert_eq!(m.topic_level(2), Some("temperature"));
        assert_eq!(m.topic_level(3), None);
        assert_eq!(m.topic_levels().count(), 3);
        let m = Message::new("a//b", b"");
        assert_eq!(m.topic_level(1), Some(""));
        let m = Message::new("single", b"");
        assert_eq!(m.topic_level(0), Some("single"));
        assert_eq!(m.topic_level(1), None);
    }

    #[test]
    fn payload_str() {
        assert_eq!(Message::new("t", b"hi").payload_str(), Some("hi"));
        assert_eq!(Message::new("t", &[0xff, 0xfe]).payload_str(), None);
    }

    #[test]
    fn emit_error_codes() {
        for code in [-1, -2, -3, -4, -5, -7] {
            assert_eq!(EmitError::from_code(code).code(), code);
        }
        assert_eq!(EmitError::from_code(-3), EmitError::TooManyRecords);
        assert_eq!(EmitError::from_code(-5), EmitError::NotAllowed);
        assert_eq!(EmitError::from_code(-7), EmitError::Other(-7));
        let e: Error = EmitError::InvalidTopic.into();
        assert_eq!(e.message(), "invalid topic");
    }

    #[test]
    fn error_conversions() {
        fn f() -> Result<(), Error> {
            let _: f64 = "x".parse()?;
            Ok(())
        }
        assert!(f().unwrap_err().message().starts_with("invalid number"));
        let e: Error = "boom".into();
        assert_eq!(e.to_string(), "boom");
        let e: Error = json::parse("{").unwrap_err().into();
        assert!(e.message().starts_with("invalid JSON"), "{}", e);
    }

    #[test]
    fn scheduled_runs_are_recognised() {
        let run = |topic: &str, payload: &str| Message::new(topic, payload.as_bytes()).schedule();
        assert_eq!(
            run("$edgefn/schedule/aggregate", r#"{"scheduled_ms":1732540800000,"now_ms":1732540800012}"#),
            Some(ScheduledRun { scheduled_ms: 1_732_540_800_000, now_ms: 1_732_540_800_012 })
        );
        // Field order and unknown fields do not matter.
        assert_eq!(
            run("$edgefn/schedule/f", r#"{"now_ms":5,"extra":[1],"scheduled_ms":4}"#),
            Some(ScheduledRun { scheduled_ms: 4, now_ms: 5 })
        );
        // Anything else is not a scheduled run.
        let scheduled = r#"{"scheduled_ms":1,"now_ms":2}"#;
        assert_eq!(run("sensors/pi-7/temperature", scheduled), None);
        assert_eq!(run("schedule/f", scheduled), None);
        assert_eq!(run("$edgefn/schedule/f", r#"{"scheduled_ms":1}"#), None);
        assert_eq!(run("$edgefn/schedule/f", r#"{"scheduled_ms":-1,"now_ms":2}"#), None);
        assert_eq!(run("$edgefn/schedule/f", r#"{"scheduled_ms":1.5,"now_ms":2}"#), None);
        assert_eq!(run("$edgefn/schedule/f", "not json"), None);
    }

    #[test]
    fn now_ms_reads_the_clock_unless_a_test_sets_it() {
        testing::set_now_ms(None);
        let before = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as u64;
        let now = now_ms();
        assert!(now >= before && now < before + 60_000, "{} vs {}", now, before);
        testing::set_now_ms(Some(42));
        assert_eq!(now_ms(), 42);
        testing::set_now_ms(None);
    }

    #[test]
    fn rt_alloc_and_finish() {
        // Natively pointers do not fit in i32, so only the error paths of
        // the runtime are checked here; the wasm32 path is checked by the
        // gateway's tests.
        assert_eq!(__rt::alloc(-1), 0);
        let (r, c) = testing::run(|| Err::<(), _>(Error::new("nope")));
        assert!(r.is_err());
        assert_eq!(c.error, None); // run() does not go through finish()
        assert_eq!(__rt::init(|| Err("init failed".into())), 1);
        assert_eq!(testing::take().error.as_deref(), Some("init failed"));
        assert_eq!(__rt::init(|| Ok(())), 0);
        assert_eq!(__rt::init(|| Err(Error::new(""))), 1);
        assert_eq!(testing::take().error.as_deref(), Some("failed"));
    }
}
