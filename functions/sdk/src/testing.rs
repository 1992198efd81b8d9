//! A native stand-in for the gateway, for unit tests of functions.
//!
//! Only compiled when the target is not wasm32. The host calls of the SDK
//! ([`crate::emit`], [`crate::publish`], [`crate::log`], [`crate::set_error`])
//! record into a per-thread [`Captured`], checking topics and counting
//! records the way the gateway does (codes -1 and -3; the record size limit,
//! -2, and the bytes one invocation may emit, -4, are gateway settings and
//! are not checked here). [`invoke`] runs a
//! handler on one message, much as the gateway would:
//!
//! ```
//! use edgefn_sdk::{testing, Error, Message};
//!
//! fn handle(msg: &Message) -> Result<(), Error> {
//!     edgefn_sdk::emit("out", msg.payload())?;
//!     Ok(())
//! }
//!
//! let (result, captured) = testing::invoke(handle, "in/topic", b"42");
//! assert!(result.is_ok());
//! assert_eq!(captured.emitted[0].topic, "out");
//! assert_eq!(captured.emitted[0].payload, b"42");
//! ```
//!
//! Tests run on parallel threads, so [`set_env`] sets variables for
//! [`crate::env`] on the current thread only, rather than for the process.

use crate::{Error, Level, Message, MAX_RECORDS_PER_INVOCATION, MAX_TOPIC_LEN};
use std::cell::RefCell;
use std::collections::HashMap;

/// A record emitted or a message published by the function.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub topic: String,
    pub payload: Vec<u8>,
}

impl Record {
    /// The payload as text (panics if it is not UTF-8: this is for tests).
    pub fn payload_str(&self) -> &str {
        std::str::from_utf8(&self.payload).expect("payload is not UTF-8")
    }
}

/// What a function did through the host calls.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Captured {
    /// `emit` calls the host accepted, in order.
    pub emitted: Vec<Record>,
    /// `publish` calls the host accepted, in order.
    pub published: Vec<Record>,
    /// `log` calls, in order.
    pub logs: Vec<(Level, String)>,
    /// The last `set_error` message, if any.
    pub error: Option<String>,
}

impl Captured {
    /// The log lines at `level`.
    pub fn logs_at(&self, level: Level) -> Vec<&str> {
        self.logs.iter().filter(|(l, _)| *l == level).map(|(_, m)| m.as_str()).collect()
    }
}

thread_local! {
    static CAPTURED: RefCell<Captured> = RefCell::new(Captured::default());
    static ENV: RefCell<HashMap<String, Option<String>>> = RefCell::new(HashMap::new());
}

/// Returns what was captured on this thread so far, and starts afresh.
pub fn take() -> Captured {
    CAPTURED.with(|c| std::mem::take(&mut *c.borrow_mut()))
}

/// Runs `f` with a fresh capture and returns its result with what it did.
pub fn run<T>(f: impl FnOnce() -> T) -> (T, Captured) {
    take();
    let result = f();
    (result, take())
}

/// Runs `handler` on one message, as the gateway would, and returns its
/// result with what it emitted, published and logged. If the handler fails,
/// `error` holds its message (the gateway would also discard the records;
/// here they are kept so a test can look at them).
pub fn invoke(
    handler: fn(&Message) -> Result<(), Error>,
    topic: &str,
    payload: &[u8],
) -> (Result<(), Error>, Captured) {
    let (result, mut captured) = run(|| handler(&Message::new(topic, payload)));
    if let Err(e) = &result {
        captured.error = Some(e.message().to_string());
    }
    (result, captured)
}

/// Sets (`Some`) or unsets (`None`) an environment variable as seen by
/// [`crate::env`] on this thread.
pub fn set_env(key: &str, value: Option<&str>) {
    ENV.with(|e| {
        e.borrow_mut().insert(key.to_string(), value.map(str::to_string));
    })
}

/// Forgets every [`set_env`] of this thread.
pub fn clear_env() {
    ENV.with(|e| e.borrow_mut().clear())
}

pub(crate) fn env_override(key: &str) -> Option<Option<String>> {
    ENV.with(|e| e.borrow().get(key).cloned())
}

/// Whether the gateway would accept `topic` for emit/publish.
pub fn topic_is_valid(topic: &[u8]) -> bool {
    !topic.is_empty()
        && topic.len() <= MAX_TOPIC_LEN
        && std::str::from_utf8(topic).is_ok()
        && !topic.iter().any(|b| matches!(b, b'+' | b'#' | 0))
}

fn record(topic: &[u8], payload: &[u8], which: fn(&mut Captured) -> &mut Vec<Record>) -> i32 {
    if !topic_is_valid(topic) {
        return -1;
    }
    CAPTURED.with(|c| {
        let mut c = c.borrow_mut();
        let list = which(&mut c);
        if list.len() >= MAX_RECORDS_PER_INVOCATION {
            return -3;
        }
        list.push(Record {
            topic: String::from_utf8(topic.to_vec()).expect("checked"),
            payload: payload.to_vec(),
        });
        0
    })
}

pub(crate) fn emit_slices(topic: &[u8], payload: &[u8]) -> i32 {
    record(topic, payload, |c| &mut c.emitted)
}

pub(crate) fn publish_slices(topic: &[u8], payload: &[u8]) -> i32 {
    record(topic, payload, |c| &mut c.published)
}

pub(crate) fn log_slice(level: i32, message: &[u8]) {
    let level = match level {
        0 => Level::Trace,
        1 => Level::Debug,
        3 => Level::Warn,
        4 => Level::Error,
        _ => Level::Info,
    };
    let message = String::from_utf8_lossy(message).into_owned();
    CAPTURED.with(|c| c.borrow_mut().logs.push((level, message)))
}

pub(crate) fn set_error_slice(message: &[u8]) {
    let mut message = message;
    if message.len() > 1024 {
        message = &message[..1024];
    }
    let message = String::from_utf8_lossy(message).into_owned();
    CAPTURED.with(|c| c.borrow_mut().error = Some(message))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{emit, env, publish, EmitError};

    #[test]
    fn emit_checks_topics_like_the_gateway() {
        let (_, c) = run(|| {
            assert_eq!(emit("", "x"), Err(EmitError::InvalidTopic));
            assert_eq!(emit("a/+/b", "x"), Err(EmitError::InvalidTopic));
            assert_eq!(emit("a/#", "x"), Err(EmitError::InvalidTopic));
            assert_eq!(emit("a\0b", "x"), Err(EmitError::InvalidTopic));
            assert_eq!(emit(&"t".repeat(65536), "x"), Err(EmitError::InvalidTopic));
            assert_eq!(emit(&"t".repeat(65535), "x"), Ok(()));
            assert_eq!(publish("devices/x/cmd", "on"), Ok(()));
        });
        assert_eq!(c.emitted.len(), 1);
        assert_eq!(c.published, vec![Record { topic: "devices/x/cmd".into(), payload: b"on".to_vec() }]);
    }

    #[test]
    fn at_most_1000_records() {
        let (_, c) = run(|| {
            for i in 0..1000 {
                assert_eq!(emit("t", i.to_string()), Ok(()));
            }
            assert_eq!(emit("t", "one too many"), Err(EmitError::TooManyRecords));
            assert_eq!(publish("t", "publishes count on their own"), Ok(()));
        });
        assert_eq!(c.emitted.len(), 1000);
        assert_eq!(c.published.len(), 1);
    }

    #[test]
    fn logs_and_errors() {
        let (_, c) = run(|| {
            crate::warn("careful");
            crate::sys::log_slice(9, b"odd level");
            crate::set_error("first");
            crate::set_error(&"e".repeat(2000));
        });
        assert_eq!(c.logs, vec![(Level::Warn, "careful".into()), (Level::Info, "odd level".into())]);
        assert_eq!(c.logs_at(Level::Warn), vec!["careful"]);
        assert_eq!(c.error.as_deref().map(str::len), Some(1024));
    }

    #[test]
    fn env_overrides_are_per_thread() {
        set_env("EDGEFN_SDK_TEST_VAR", Some("yes"));
        assert_eq!(env("EDGEFN_SDK_TEST_VAR").as_deref(), Some("yes"));
        std::thread::spawn(|| assert_eq!(env("EDGEFN_SDK_TEST_VAR"), None)).join().unwrap();
        set_env("EDGEFN_SDK_TEST_VAR", None);
        assert_eq!(env("EDGEFN_SDK_TEST_VAR"), None);
        clear_env();
    }

    #[test]
    fn invoke_reports_the_error() {
        fn handle(msg: &Message) -> Result<(), Error> {
            emit("out", msg.payload())?;
            Err("bad reading".into())
        }
        let (r, c) = invoke(handle, "in", b"p");
        assert_eq!(r, Err(Error::new("bad reading")));
        assert_eq!(c.error.as_deref(), Some("bad reading"));
        assert_eq!(c.emitted.len(), 1);
    }
}
