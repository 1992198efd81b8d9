//! A native stand-in for the gateway, for unit tests of functions.
//!
//! Only compiled when the target is not wasm32. The host calls of the SDK
//! ([`crate::emit`], [`crate::publish`], [`crate::log`], [`crate::set_error`])
//! record into a per-thread [`Captured`], checking topics and counting
//! records the way the gateway does (codes -1 and -3, and -5 once a test
//! sets [`set_emit_allow`] or [`set_publish_allow`]; the record size limit,
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
//! Tests run on parallel threads, so everything here is per thread:
//! [`set_env`] sets variables for [`crate::env`] on the current thread only,
//! rather than for the process, and [`set_now_ms`] the time
//! [`crate::now_ms`] returns.
//!
//! ## State
//!
//! [`crate::state`] reads and writes a per-thread map that stands for the
//! function's state. It lasts across invocations on the thread, as the
//! gateway's lasts across invocations, so a test can run several messages
//! through a stateful handler, set the state it starts from ([`set_state`])
//! and look at the state afterwards ([`state`], [`state_entries`]). Writes
//! are checked as the gateway checks them, in the same order: the key
//! (-7), then the count of write calls of the invocation (-3 past
//! [`crate::state::MAX_WRITES_PER_INVOCATION`], refused calls included),
//! then the `state_limit` (-6, for a set only: one that grows the state
//! past it, or that makes the bytes the invocation's writes hold, keys
//! written plus values set, pass it; a delete is never refused for it),
//! with the default 1 MiB limit or what [`set_state_limit`] sets. As on
//! the gateway, a delete of a key the invocation does not see changes
//! nothing and holds nothing, and a delete of a key only the invocation
//! set forgets that set. As on the gateway, an
//! invocation reads the state with its own writes on top, and they are its
//! own until it ends; [`invoke`] then applies them at once, so the next
//! invocation reads them, or discards them if the handler failed. This is
//! the gateway with `concurrency = 1`: one invocation at a time, each
//! reading the state the one before it left.
//!
//! ```
//! use edgefn_sdk::{state, testing, Error, Message};
//!
//! fn count(_: &Message) -> Result<(), Error> {
//!     let n: u64 = state::get_str("n")?.map_or(Ok(0), |s| s.parse())?;
//!     state::set("n", (n + 1).to_string())?;
//!     Ok(())
//! }
//!
//! testing::reset();
//! testing::set_state("n", "41");
//! let (result, _) = testing::invoke(count, "in", b"");
//! assert!(result.is_ok());
//! assert_eq!(testing::state_str("n").as_deref(), Some("42"));
//! ```
//!
//! libtest runs each test on a thread of its own, but with
//! `--test-threads=1` all run on one thread: a test that depends on the
//! state (or env, clock, allow lists) being fresh starts with [`reset`].

use crate::state::{DEFAULT_LIMIT, MAX_KEY_LEN, MAX_WRITES_PER_INVOCATION};
use crate::{Error, Level, Message, MAX_RECORDS_PER_INVOCATION, MAX_TOPIC_LEN, SCHEDULE_TOPIC_PREFIX};
use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, HashMap};

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

/// Key → new value (`None`: deleted).
type Writes = BTreeMap<Vec<u8>, Option<Vec<u8>>>;

/// The function's state as the stand-in keeps it: what the gateway keeps
/// (the writes of every successful invocation so far) and one invocation's
/// writes over it.
#[derive(Debug)]
struct State {
    /// The keys and values.
    entries: BTreeMap<Vec<u8>, Vec<u8>>,
    /// Σ key + value lengths of `entries`.
    bytes: usize,
    /// The `state_limit` simulated.
    limit: usize,
    /// The current invocation's writes ([`run`], [`invoke`]); outside an
    /// invocation each state call is applied at once.
    overlay: Option<Overlay>,
}

/// One invocation's writes, as the gateway's overlay.
#[derive(Debug, Default)]
struct Overlay {
    /// The writes, latest per key; only writes that change something (a
    /// delete of a key the invocation does not see is no write).
    writes: Writes,
    /// Bytes the state would grow (or shrink) by if applied now.
    delta: isize,
    /// Bytes `writes` holds: keys, and the values of sets.
    pending: usize,
    /// Write calls made, refused ones included (invalid keys aside).
    calls: usize,
}

/// Bytes one write holds.
fn held(key: &[u8], value: Option<&[u8]>) -> usize {
    key.len() + value.map_or(0, <[u8]>::len)
}

impl Default for State {
    fn default() -> State {
        State { entries: BTreeMap::new(), bytes: 0, limit: DEFAULT_LIMIT, overlay: None }
    }
}

impl State {
    /// The value of `key` as the current invocation sees it.
    fn read(&self, key: &[u8]) -> Option<&Vec<u8>> {
        match self.overlay.as_ref().and_then(|o| o.writes.get(key)) {
            Some(v) => v.as_ref(),
            None => self.entries.get(key),
        }
    }

    /// A write of the current invocation (`value` `None`: a delete),
    /// checked as the gateway checks it, in the same order: -7 for an
    /// invalid key (not counted); -3 once the invocation made
    /// [`MAX_WRITES_PER_INVOCATION`] write calls (refused ones included);
    /// for a set, -6 if the state would grow past the limit, or if the bytes
    /// the invocation's writes hold would pass it. A delete of a key the
    /// invocation does not see changes nothing, and one of a key only it
    /// set forgets that set.
    fn write(&mut self, key: &[u8], value: Option<&[u8]>) -> i32 {
        if !key_is_valid(key) {
            return -7;
        }
        let State { entries, bytes, limit, overlay } = self;
        let overlay = overlay.get_or_insert_with(Overlay::default);
        overlay.calls += 1;
        if overlay.calls > MAX_WRITES_PER_INVOCATION {
            return -3;
        }
        let committed = entries.get(key).map(Vec::as_slice);
        let written = overlay.writes.get(key).map(Option::as_deref);
        let seen = match written {
            Some(v) => v,
            None => committed,
        };
        if value.is_none() && seen.is_none() {
            return 0;
        }
        let size = |v: Option<&[u8]>| v.map_or(0, |v| key.len() + v.len()) as isize;
        let delta = overlay.delta + size(value) - size(seen);
        // A delete never grows the state: always allowed.
        if value.is_some() && delta > 0 && *bytes as isize + delta > *limit as isize {
            return -6;
        }
        let pending = overlay.pending - written.map_or(0, |v| held(key, v));
        if value.is_none() && committed.is_none() {
            // Set by this invocation only: forgetting the set deletes it.
            overlay.writes.remove(key);
            overlay.pending = pending;
            overlay.delta = delta;
            return 0;
        }
        let pending = pending + held(key, value);
        if value.is_some() && pending > *limit {
            return -6;
        }
        overlay.pending = pending;
        overlay.delta = delta;
        overlay.writes.insert(key.to_vec(), value.map(<[u8]>::to_vec));
        0
    }

    /// Applies writes to the state.
    fn apply(&mut self, writes: Writes) {
        for (key, value) in writes {
            if let Some(old) = self.entries.remove(&key) {
                self.bytes -= key.len() + old.len();
            }
            if let Some(v) = value {
                self.bytes += key.len() + v.len();
                self.entries.insert(key, v);
            }
        }
    }

    /// Ends the current invocation: a success's writes are applied, a
    /// failure's discarded.
    fn end(&mut self, success: bool) {
        let writes = self.overlay.take().unwrap_or_default().writes;
        if success {
            self.apply(writes);
        }
    }
}

/// The topic filters set by [`set_emit_allow`] and [`set_publish_allow`];
/// `None`: any topic.
#[derive(Debug, Clone, Default)]
struct Allow {
    /// Like the function's `emit_allow`.
    emit: Option<Vec<String>>,
    /// Like the function's `publish_allow`.
    publish: Option<Vec<String>>,
}

thread_local! {
    static CAPTURED: RefCell<Captured> = RefCell::new(Captured::default());
    static ENV: RefCell<HashMap<String, Option<String>>> = RefCell::new(HashMap::new());
    static STATE: RefCell<State> = RefCell::new(State::default());
    static ALLOW: RefCell<Allow> = RefCell::new(Allow::default());
    static NOW: Cell<Option<u64>> = Cell::new(None);
}

/// Returns what was captured on this thread so far, and starts afresh.
pub fn take() -> Captured {
    CAPTURED.with(|c| std::mem::take(&mut *c.borrow_mut()))
}

/// Forgets everything this module keeps for the current thread: the
/// capture, [`set_env`]s, the state and its limit, the allow lists, the
/// clock set by [`set_now_ms`], and what the SDK keeps in the instance
/// ([`new_instance`]).
pub fn reset() {
    take();
    clear_env();
    STATE.with(|s| *s.borrow_mut() = State::default());
    ALLOW.with(|a| *a.borrow_mut() = Allow::default());
    NOW.with(|n| n.set(None));
    new_instance();
}

/// Stands for the gateway starting a new instance of the function (after a
/// failure, an upgrade, or at any time): the state is the function's, not
/// the instance's, so the next invocation reads it as before. The SDK
/// keeps nothing of its own in an instance across invocations, so this
/// changes nothing here; the function's own statics are not reset either.
pub fn new_instance() {}

/// Runs `f` as one invocation with a fresh capture and returns its result
/// with what it did. Its state writes are applied whatever it returns.
pub fn run<T>(f: impl FnOnce() -> T) -> (T, Captured) {
    take();
    STATE.with(|s| s.borrow_mut().overlay = Some(Overlay::default()));
    let result = f();
    STATE.with(|s| s.borrow_mut().end(true));
    (result, take())
}

/// Runs `handler` on one message, as the gateway would, and returns its
/// result with what it emitted, published and logged. If it succeeds, its
/// state writes are applied at once, so the next invocation reads them. If
/// it fails, `error` holds its message and its state writes are discarded,
/// as the gateway discards them (the gateway would also discard the
/// records; here they are kept so a test can look at them).
pub fn invoke(
    handler: fn(&Message) -> Result<(), Error>,
    topic: &str,
    payload: &[u8],
) -> (Result<(), Error>, Captured) {
    take();
    STATE.with(|s| s.borrow_mut().overlay = Some(Overlay::default()));
    let result = handler(&Message::new(topic, payload));
    STATE.with(|s| s.borrow_mut().end(result.is_ok()));
    let mut captured = take();
    if let Err(e) = &result {
        captured.error = Some(e.message().to_string());
    }
    (result, captured)
}

/// Runs `handler` on a scheduled run of the function named `function`, as
/// the gateway calls it: topic `$edgefn/schedule/<function>`, payload
/// `{"scheduled_ms":…,"now_ms":…}` (see [`crate::Message::schedule`]).
/// Otherwise like [`invoke`]; the clock [`crate::now_ms`] reads is not
/// changed.
pub fn invoke_scheduled(
    handler: fn(&Message) -> Result<(), Error>,
    function: &str,
    scheduled_ms: u64,
    now_ms: u64,
) -> (Result<(), Error>, Captured) {
    let topic = format!("{}{}", SCHEDULE_TOPIC_PREFIX, function);
    let payload = format!(r#"{{"scheduled_ms":{},"now_ms":{}}}"#, scheduled_ms, now_ms);
    invoke(handler, &topic, payload.as_bytes())
}

/// Sets the time [`crate::now_ms`] returns on this thread (`Some`), or
/// goes back to the real clock (`None`).
pub fn set_now_ms(ms: Option<u64>) {
    NOW.with(|n| n.set(ms))
}

pub(crate) fn now_override() -> Option<u64> {
    NOW.with(Cell::get)
}

/// Sets `key` to `value` in this thread's state, as if an earlier
/// invocation had written it: for the state a test starts from.
/// Not checked against the key rules or the limit.
pub fn set_state(key: impl AsRef<[u8]>, value: impl AsRef<[u8]>) {
    let mut writes = Writes::new();
    writes.insert(key.as_ref().to_vec(), Some(value.as_ref().to_vec()));
    STATE.with(|s| s.borrow_mut().apply(writes))
}

/// The value of `key` in this thread's state, as the next invocation reads
/// it (without the writes of an invocation still running in [`run`]).
pub fn state(key: impl AsRef<[u8]>) -> Option<Vec<u8>> {
    STATE.with(|s| s.borrow().entries.get(key.as_ref()).cloned())
}

/// The value of `key` in this thread's state, as text (panics if it is not
/// UTF-8: this is for tests).
pub fn state_str(key: impl AsRef<[u8]>) -> Option<String> {
    state(key).map(|v| String::from_utf8(v).expect("state value is not UTF-8"))
}

/// Every key and value of this thread's state, sorted by key.
pub fn state_entries() -> BTreeMap<Vec<u8>, Vec<u8>> {
    STATE.with(|s| s.borrow().entries.clone())
}

/// Empties this thread's state (the limit stays).
pub fn clear_state() {
    STATE.with(|s| {
        let mut s = s.borrow_mut();
        s.entries.clear();
        s.bytes = 0;
    })
}

/// Sets the `state_limit` simulated on this thread: most bytes of keys plus
/// values together (default [`crate::state::DEFAULT_LIMIT`], as on the
/// gateway).
pub fn set_state_limit(bytes: usize) {
    STATE.with(|s| s.borrow_mut().limit = bytes)
}

/// Sets the topic filters `emit` may use on this thread, like the
/// function's `emit_allow` (e.g. `Some(&["telemetry/#"])`); an emit outside
/// them is refused with [`crate::EmitError::NotAllowed`]. `None` (the
/// default here, as on the gateway): any topic.
pub fn set_emit_allow(filters: Option<&[&str]>) {
    ALLOW.with(|a| a.borrow_mut().emit = filters.map(|f| f.iter().map(|s| s.to_string()).collect()))
}

/// Sets the topic filters `publish` may use on this thread, like the
/// function's `publish_allow`. `None` (the default here): any topic. Note
/// that the gateway's default is the opposite, no topic at all: a function
/// that publishes needs `publish_allow` in its configuration.
pub fn set_publish_allow(filters: Option<&[&str]>) {
    ALLOW.with(|a| a.borrow_mut().publish = filters.map(|f| f.iter().map(|s| s.to_string()).collect()))
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

/// Whether the MQTT topic filter `filter` matches `topic`: `+` is one whole
/// level, `#` a whole last level and the levels under it (`a/#` matches `a`
/// too); a filter starting with a wildcard does not match a topic starting
/// with `$`.
fn filter_matches(filter: &str, topic: &str) -> bool {
    if topic.starts_with('$') && (filter.starts_with('+') || filter.starts_with('#')) {
        return false;
    }
    let mut topic_levels = topic.split('/');
    for f in filter.split('/') {
        match (f, topic_levels.next()) {
            ("#", _) => return true,
            ("+", Some(_)) => {}
            (f, Some(t)) if f == t => {}
            _ => return false,
        }
    }
    topic_levels.next().is_none()
}

fn allowed(topic: &str, which: fn(&Allow) -> &Option<Vec<String>>) -> bool {
    ALLOW.with(|a| match which(&a.borrow()) {
        None => true,
        Some(filters) => filters.iter().any(|f| filter_matches(f, topic)),
    })
}

fn record(
    topic: &[u8],
    payload: &[u8],
    which: fn(&mut Captured) -> &mut Vec<Record>,
    allow: fn(&Allow) -> &Option<Vec<String>>,
) -> i32 {
    if !topic_is_valid(topic) {
        return -1;
    }
    if !allowed(std::str::from_utf8(topic).expect("checked"), allow) {
        return -5;
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
    record(topic, payload, |c| &mut c.emitted, |a| &a.emit)
}

pub(crate) fn publish_slices(topic: &[u8], payload: &[u8]) -> i32 {
    record(topic, payload, |c| &mut c.published, |a| &a.publish)
}

fn key_is_valid(key: &[u8]) -> bool {
    !key.is_empty() && key.len() <= MAX_KEY_LEN
}

pub(crate) fn state_get_slices(key: &[u8], buf: &mut [u8]) -> i32 {
    if !key_is_valid(key) {
        return -7;
    }
    STATE.with(|s| match s.borrow().read(key) {
        None => -1,
        Some(v) => {
            if let Some(dst) = buf.get_mut(..v.len()) {
                dst.copy_from_slice(v);
            }
            i32::try_from(v.len()).unwrap_or(i32::MAX)
        }
    })
}

fn state_write(key: &[u8], value: Option<&[u8]>) -> i32 {
    STATE.with(|s| {
        let mut s = s.borrow_mut();
        if s.overlay.is_some() {
            return s.write(key, value);
        }
        // Outside an invocation: one of its own, applied at once.
        let code = s.write(key, value);
        let writes = s.overlay.take().unwrap_or_default().writes;
        s.apply(writes);
        code
    })
}

pub(crate) fn state_set_slices(key: &[u8], value: &[u8]) -> i32 {
    state_write(key, Some(value))
}

pub(crate) fn state_delete_slice(key: &[u8]) -> i32 {
    state_write(key, None)
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
    use crate::state::{self, StateError};
    use crate::{emit, env, publish, EmitError, ScheduledRun};

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

    #[test]
    fn allow_lists_refuse_other_topics() {
        reset();
        set_emit_allow(Some(&["telemetry/+/temperature", "summary/#"]));
        set_publish_allow(Some(&[]));
        let (_, c) = run(|| {
            assert_eq!(emit("telemetry/pi-7/temperature", "x"), Ok(()));
            assert_eq!(emit("summary", "x"), Ok(()));
            assert_eq!(emit("summary/a/b", "x"), Ok(()));
            assert_eq!(emit("telemetry/pi-7/humidity", "x"), Err(EmitError::NotAllowed));
            assert_eq!(emit("telemetry/pi-7", "x"), Err(EmitError::NotAllowed));
            assert_eq!(emit("a/+", "x"), Err(EmitError::InvalidTopic), "an invalid topic is -1 first");
            assert_eq!(publish("devices/x/cmd", "on"), Err(EmitError::NotAllowed));
        });
        assert_eq!(c.emitted.len(), 3);
        assert!(c.published.is_empty());
        set_emit_allow(None);
        set_publish_allow(None);
        assert_eq!(run(|| emit("anything", "x")).0, Ok(()));
        assert_eq!(run(|| publish("anything", "x")).0, Ok(()));
    }

    #[test]
    fn filters_match_like_mqtt() {
        assert!(filter_matches("#", "a/b"));
        assert!(filter_matches("a/#", "a"));
        assert!(filter_matches("+/b", "a/b"));
        assert!(filter_matches("a/+", "a/"));
        assert!(!filter_matches("a/+", "a"));
        assert!(!filter_matches("a/+", "a/b/c"));
        assert!(!filter_matches("a/b", "a/b/c"));
        assert!(!filter_matches("#", "$edgefn/x"));
        assert!(!filter_matches("+/x", "$SYS/x"));
        assert!(filter_matches("$SYS/#", "$SYS/x"));
    }

    #[test]
    fn state_lasts_across_invocations_and_failures_undo_it() {
        fn bump(msg: &Message) -> Result<(), Error> {
            let n: u64 = state::get_str("n")?.map_or(Ok(0), |s| s.parse())?;
            state::set("n", (n + 1).to_string())?;
            if msg.payload() == b"fail" {
                return Err("asked to fail".into());
            }
            Ok(())
        }
        reset();
        set_state("n", "10");
        assert!(invoke(bump, "t", b"").0.is_ok());
        assert!(invoke(bump, "t", b"").0.is_ok());
        assert_eq!(state_str("n").as_deref(), Some("12"));
        let (r, c) = invoke(bump, "t", b"fail");
        assert!(r.is_err());
        assert_eq!(c.error.as_deref(), Some("asked to fail"));
        assert_eq!(state_str("n").as_deref(), Some("12"), "a failed invocation's writes are discarded");
        assert_eq!(state_entries().len(), 1);
        clear_state();
        assert_eq!(state("n"), None);
    }

    #[test]
    fn the_state_limit_counts_keys_and_values() {
        reset();
        set_state_limit(10);
        set_state("k", [0u8; 5]); // 6 bytes
        let (_, _) = run(|| {
            assert_eq!(state::set("x", [0u8; 3]), Ok(())); // 10 bytes: at the limit
            assert_eq!(state::set("y", b""), Err(StateError::LimitReached));
            assert_eq!(state::set("x", [0u8; 4]), Err(StateError::LimitReached));
            assert_eq!(state::set("x", [0u8; 2]), Ok(()), "shrinking a value is fine");
            assert_eq!(state::delete("k"), Ok(()));
            assert_eq!(state::set("y", [0u8; 3]), Ok(()));
        });
        assert_eq!(state_str("x").map(|v| v.len()), Some(2));
        assert_eq!(state("k"), None);
        // A state already over a lowered limit (7 bytes over 4) can still
        // change without growing, as long as the invocation's writes hold
        // no more than the limit either.
        set_state_limit(4);
        let (_, _) = run(|| {
            assert_eq!(state::delete("x"), Ok(())); // holds 1 byte
            assert_eq!(state::set("z", [0u8; 2]), Ok(()), "the invocation's writes do not grow the state");
            assert_eq!(state::set("w", b""), Err(StateError::LimitReached), "grows the state");
        });
        assert_eq!(state_entries().len(), 2);
        assert_eq!(state("z").map(|v| v.len()), Some(2));
    }

    #[test]
    fn at_most_10000_state_writes_per_invocation() {
        reset();
        set_state_limit(100);
        set_state("k", "v");
        let (_, _) = run(|| {
            // Invalid keys are refused before they are counted.
            for _ in 0..5 {
                assert_eq!(state::set("", "v"), Err(StateError::InvalidKey));
                assert_eq!(state::delete(""), Err(StateError::InvalidKey));
            }
            // Refused sets and deletes of absent keys count.
            assert_eq!(state::set("big", [0u8; 200]), Err(StateError::LimitReached));
            for i in 0..state::MAX_WRITES_PER_INVOCATION - 2 {
                assert_eq!(state::delete(format!("absent-{}", i)), Ok(()), "write {}", i + 2);
            }
            assert_eq!(state::set("n", "1"), Ok(()), "the 10,000th write");
            assert_eq!(state::set("n", "2"), Err(StateError::TooManyWrites));
            assert_eq!(state::delete("k"), Err(StateError::TooManyWrites));
            assert_eq!(state::delete("absent"), Err(StateError::TooManyWrites));
            assert_eq!(state::set("", "v"), Err(StateError::InvalidKey), "the key is checked first");
            // Reads go on, and the refused writes changed nothing.
            assert_eq!(state::get("n"), Ok(Some(b"1".to_vec())));
            assert_eq!(state::get("k"), Ok(Some(b"v".to_vec())));
        });
        assert_eq!(state_str("n").as_deref(), Some("1"), "the accepted writes are applied");
        assert_eq!(state_str("k").as_deref(), Some("v"));
        // The count is per invocation.
        let (_, _) = run(|| {
            assert_eq!(state::set("n", "2"), Ok(()));
            assert_eq!(state::delete("k"), Ok(()));
        });
        assert_eq!(state_str("n").as_deref(), Some("2"));
        assert_eq!(state("k"), None);
        // A handler that passes the error on fails with its message.
        fn many(_: &Message) -> Result<(), Error> {
            for i in 0..=state::MAX_WRITES_PER_INVOCATION {
                state::set("i", i.to_string())?;
            }
            Ok(())
        }
        let (r, c) = invoke(many, "t", b"");
        assert_eq!(r, Err(Error::new("this invocation made the most state writes the host allows (10000)")));
        assert!(c.error.is_some());
        assert_eq!(state("i"), None, "the failed invocation wrote nothing");
    }

    #[test]
    fn deletes_of_keys_the_invocation_does_not_see_hold_nothing() {
        reset();
        set_state_limit(20);
        set_state("k", "v"); // 2 bytes
        let (_, _) = run(|| {
            // 1,000 bytes of keys, if they were held.
            for i in 0..100 {
                assert_eq!(state::delete(format!("absent-{:03}", i)), Ok(()));
            }
            assert_eq!(state::delete("k"), Ok(()), "holds its key: 1 byte");
            assert_eq!(state::delete("k"), Ok(()), "already deleted: holds nothing more");
            // A key set and deleted by the invocation: the set is forgotten.
            assert_eq!(state::set("t", [0u8; 15]), Ok(())); // holds 16 bytes
            assert_eq!(state::delete("t"), Ok(()));
            assert_eq!(state::get("t"), Ok(None));
            // 1 + 19 bytes held, the state at 19 bytes: within the limit.
            assert_eq!(state::set("a", [0u8; 18]), Ok(()));
            assert_eq!(state::set("b", b""), Err(StateError::LimitReached), "1 + 19 + 1 bytes held");
        });
        let entries = state_entries();
        assert_eq!(entries.len(), 1, "{:?}", entries.keys().collect::<Vec<_>>());
        assert_eq!(state("a").map(|v| v.len()), Some(18));
    }

    #[test]
    fn the_bytes_an_invocations_sets_hold_are_bounded_by_the_limit() {
        reset();
        set_state_limit(20);
        set_state("a", [0u8; 9]); // 10 bytes
        set_state("b", [0u8; 9]); // 20 bytes: at the limit
        let (_, _) = run(|| {
            assert_eq!(state::delete("a"), Ok(())); // holds 1 byte
            assert_eq!(state::delete("b"), Ok(())); // 2; the state would be 0
            // Overwriting one key holds only its latest value.
            for _ in 0..100 {
                assert_eq!(state::set("c", [0u8; 9]), Ok(())); // 12 held, state 10
            }
            // The state would be at 20 bytes, within the limit, but the
            // writes would hold 22.
            assert_eq!(state::set("d", [0u8; 9]), Err(StateError::LimitReached));
            assert_eq!(state::get("d"), Ok(None), "a refused set writes nothing");
            // Shortening a value set earlier makes room among the writes.
            assert_eq!(state::set("c", [0u8; 1]), Ok(())); // 4 held
            assert_eq!(state::set("d", [0u8; 9]), Ok(())); // 14 held
        });
        assert_eq!(state("a"), None);
        assert_eq!(state("b"), None);
        assert_eq!(state("c").map(|v| v.len()), Some(1));
        assert_eq!(state("d").map(|v| v.len()), Some(9));
        // A delete is never refused for the limit, even with the writes
        // holding all of it; a set then is, though the state shrinks.
        set_state_limit(3);
        set_state("e", b""); // the state at 13 bytes
        let (_, _) = run(|| {
            assert_eq!(state::delete("d"), Ok(())); // 1 held
            assert_eq!(state::set("c", b"x"), Ok(())); // 3 held: at the limit
            assert_eq!(state::delete("e"), Ok(()), "4 held: a delete is not refused");
            assert_eq!(state::set("x", b""), Err(StateError::LimitReached), "5 held");
        });
        assert_eq!(state_entries().len(), 1);
        assert_eq!(state_str("c").as_deref(), Some("x"));
    }

    #[test]
    fn invoke_scheduled_sends_what_the_gateway_sends() {
        fn handle(msg: &Message) -> Result<(), Error> {
            assert_eq!(msg.topic(), "$edgefn/schedule/agg");
            assert_eq!(msg.schedule(), Some(ScheduledRun { scheduled_ms: 60_000, now_ms: 60_007 }));
            Ok(())
        }
        assert!(invoke_scheduled(handle, "agg", 60_000, 60_007).0.is_ok());
    }

    #[test]
    fn reset_forgets_everything() {
        set_env("EDGEFN_SDK_TEST_VAR", Some("yes"));
        set_state("k", "v");
        set_state_limit(1);
        set_now_ms(Some(5));
        set_publish_allow(Some(&[]));
        crate::info("x");
        reset();
        assert_eq!(env("EDGEFN_SDK_TEST_VAR"), None);
        assert!(state_entries().is_empty());
        assert_eq!(run(|| state::set("k", "v")).0, Ok(()));
        assert_ne!(crate::now_ms(), 5);
        assert_eq!(run(|| publish("t", "x")).0, Ok(()));
        assert_eq!(take(), Captured::default());
    }

    #[test]
    fn the_next_invocation_reads_what_the_last_successful_one_wrote() {
        fn put(msg: &Message) -> Result<(), Error> {
            let seen = state::get_str("k")?.unwrap_or_default();
            crate::info(&seen);
            state::set("k", msg.payload())?;
            if msg.payload() == b"fail" {
                return Err("asked to fail".into());
            }
            Ok(())
        }
        reset();
        set_state("k", "0");
        let (_, c) = invoke(put, "t", b"1");
        assert_eq!(c.logs_at(Level::Info), ["0"]);
        assert_eq!(state_str("k").as_deref(), Some("1"), "applied when it succeeds");
        let (_, c) = invoke(put, "t", b"2");
        assert_eq!(c.logs_at(Level::Info), ["1"]);
        new_instance();
        let (r, c) = invoke(put, "t", b"fail");
        assert!(r.is_err());
        assert_eq!(c.logs_at(Level::Info), ["2"], "a new instance reads the same state");
        let (_, c) = invoke(put, "t", b"3");
        assert_eq!(c.logs_at(Level::Info), ["2"], "the failed invocation left nothing");
        assert_eq!(state_str("k").as_deref(), Some("3"));
    }

    #[test]
    fn an_invocation_reads_its_own_writes() {
        reset();
        set_state("k", "old");
        let (_, _) = run(|| {
            assert_eq!(state::get("k"), Ok(Some(b"old".to_vec())));
            state::set("k", "new").unwrap();
            assert_eq!(state::get("k"), Ok(Some(b"new".to_vec())));
            state::delete("k").unwrap();
            assert_eq!(state::get("k"), Ok(None));
            assert_eq!(state("k").as_deref(), Some(b"old".as_ref()), "not applied before the end");
        });
        assert_eq!(state("k"), None);
    }
}
