//! Durable per-function state: what `state_get`, `state_set` and
//! `state_delete` read and write (docs/ABI.md "State").
//!
//! A function's state is held here in memory (it is bounded by the
//! function's `state_limit`) and in SQLite (table `function_state`). An
//! invocation's writes go into an overlay ([`Overlay`]) that it reads
//! through; when it succeeds they are applied here at once, so the next
//! invocation sees them, and they become part of its outcome, written to
//! SQLite in the same transaction as its records. A failed invocation's
//! overlay is dropped. Invocations run in ingest order for a function with
//! one instance, and commits follow ingest order, so the state in memory
//! is the committed state plus the writes of outcomes still on their way
//! to the disk: a crash loses those writes together with the records and
//! acknowledgements of their messages, which are then delivered and run
//! again. (The commit stage never leaves out the outcome of an invocation
//! that wrote state: [`crate::pipeline`].)
//!
//! The state belongs to the function's name: it is kept across versions
//! (an upgrade sees it) and restarts, and deleted when the function is
//! removed.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};

/// Longest state key, bytes.
pub const MAX_KEY_LEN: usize = 1024;

/// Default `state_limit`: keys and values of one function together.
pub const DEFAULT_LIMIT: usize = 1 << 20;

/// Most `state_set` and `state_delete` calls one invocation may make: like
/// the records an invocation may emit, what it writes is held in memory
/// until its outcome is committed, so it is bounded in count as well as in
/// bytes (the invocation's writes together are at most `state_limit`).
pub const MAX_WRITES_PER_INVOCATION: usize = 10_000;

/// Keys and values, as read from the store.
pub type Entries = Vec<(Vec<u8>, Vec<u8>)>;

/// Keys and values, sorted by key.
pub type StateMap = BTreeMap<Vec<u8>, Vec<u8>>;

/// One write of an invocation: a value, or `None` to delete.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StateWrite {
    /// The key.
    pub key: Vec<u8>,
    /// The new value; `None` deletes the key.
    pub value: Option<Vec<u8>>,
}

/// The order in which the invocations of a function that uses state run:
/// one at a time, in the order their messages were handed to its pools
/// (ingest order, which is also commit order), across all its instances
/// and versions. Each message gets a [`Turn`] when it is queued; its
/// invocation waits for it, and finishing (or dropping) it lets the next
/// one go.
#[derive(Debug, Default)]
pub struct Turns {
    /// The next turn to hand out.
    next: std::sync::atomic::AtomicU64,
    /// The turn whose invocation may run, and turns given up early.
    serving: std::sync::Mutex<(u64, std::collections::BTreeSet<u64>)>,
    /// Woken when `serving` moves.
    moved: std::sync::Condvar,
}

/// A message's place in its function's [`Turns`]; given back when dropped.
#[derive(Debug)]
pub struct Turn {
    turns: Arc<FunctionState>,
    n: u64,
}

impl Turns {
    fn done(&self, n: u64) {
        let mut s = self.serving.lock().expect("turns lock");
        let (serving, skipped) = &mut *s;
        if *serving == n {
            *serving += 1;
            while skipped.remove(serving) {
                *serving += 1;
            }
            self.moved.notify_all();
        } else {
            // Given up before its turn: skipped when the turn comes.
            skipped.insert(n);
        }
    }
}

impl Turn {
    /// Waits (blocking the thread) until it is this turn's go.
    pub fn wait(&self) {
        let t = &self.turns.turns;
        let mut s = t.serving.lock().expect("turns lock");
        while s.0 != self.n {
            s = t.moved.wait(s).expect("turns lock");
        }
    }
}

impl Drop for Turn {
    fn drop(&mut self) {
        self.turns.turns.done(self.n);
    }
}

/// One function's state.
pub struct FunctionState {
    /// The function's name.
    name: Arc<str>,
    /// Most bytes of keys and values together.
    limit: AtomicUsize,
    /// Set when the function is removed: its outcomes still in flight
    /// write no state.
    removed: AtomicBool,
    /// The keys and values.
    committed: RwLock<Committed>,
    /// The order its invocations run in.
    turns: Turns,
}

#[derive(Default)]
struct Committed {
    map: HashMap<Vec<u8>, Vec<u8>>,
    /// Σ key + value lengths.
    bytes: usize,
}

impl fmt::Debug for FunctionState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FunctionState")
            .field("name", &self.name)
            .field("bytes", &self.bytes())
            .field("limit", &self.limit())
            .finish()
    }
}

impl FunctionState {
    /// An empty state for `name`, bounded by `limit` bytes.
    pub fn new(name: &str, limit: usize) -> Arc<FunctionState> {
        Self::with(name, limit, std::iter::empty())
    }

    /// A state for `name` holding `entries` (as committed before).
    pub fn with(
        name: &str,
        limit: usize,
        entries: impl IntoIterator<Item = (Vec<u8>, Vec<u8>)>,
    ) -> Arc<FunctionState> {
        let mut c = Committed::default();
        for (k, v) in entries {
            c.bytes += k.len() + v.len();
            c.map.insert(k, v);
        }
        Arc::new(FunctionState {
            name: name.into(),
            limit: AtomicUsize::new(limit),
            removed: AtomicBool::new(false),
            committed: RwLock::new(c),
            turns: Turns::default(),
        })
    }

    /// The next turn, for a message handed to one of the function's pools
    /// now.
    pub fn take_turn(self: &Arc<Self>) -> Turn {
        Turn {
            n: self.turns.next.fetch_add(1, Ordering::Relaxed),
            turns: self.clone(),
        }
    }

    /// The function's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Most bytes of keys and values together.
    pub fn limit(&self) -> usize {
        self.limit.load(Ordering::Relaxed)
    }

    /// Sets the limit (a new version may have another).
    pub fn set_limit(&self, limit: usize) {
        self.limit.store(limit, Ordering::Relaxed);
    }

    /// Bytes of keys and values committed.
    pub fn bytes(&self) -> usize {
        self.committed.read().expect("state lock").bytes
    }

    /// Keys committed.
    pub fn len(&self) -> usize {
        self.committed.read().expect("state lock").map.len()
    }

    /// Whether nothing is committed.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Calls `f` with the committed value of `key`, if any.
    pub fn read<T>(&self, key: &[u8], f: impl FnOnce(Option<&[u8]>) -> T) -> T {
        let c = self.committed.read().expect("state lock");
        f(c.map.get(key).map(Vec::as_slice))
    }

    /// Every committed key and value, sorted by key.
    pub fn entries(&self) -> StateMap {
        let c = self.committed.read().expect("state lock");
        c.map.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
    }

    /// Marks the function removed: [`FunctionState::apply`] does nothing
    /// from now on.
    pub fn mark_removed(&self) {
        self.removed.store(true, Ordering::Relaxed);
        let mut c = self.committed.write().expect("state lock");
        *c = Committed::default();
    }

    /// Whether the function was removed.
    pub fn is_removed(&self) -> bool {
        self.removed.load(Ordering::Relaxed)
    }

    /// Applies a successful invocation's writes, in order.
    pub fn apply(&self, writes: &[StateWrite]) {
        if self.is_removed() {
            return;
        }
        let mut c = self.committed.write().expect("state lock");
        for w in writes {
            if let Some(old) = c.map.remove(&w.key) {
                c.bytes -= w.key.len() + old.len();
            }
            if let Some(v) = &w.value {
                c.bytes += w.key.len() + v.len();
                c.map.insert(w.key.clone(), v.clone());
            }
        }
    }
}

/// Why a `state_set` or `state_delete` was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// Empty, or longer than [`MAX_KEY_LEN`].
    InvalidKey,
    /// The state, or the invocation's writes, would be larger than the
    /// function's `state_limit`.
    OverLimit,
    /// The invocation already made [`MAX_WRITES_PER_INVOCATION`] writes.
    TooMany,
}

/// One invocation's writes over the committed state.
#[derive(Debug, Default)]
pub struct Overlay {
    /// Key → new value (`None`: deleted). Holds only writes that change
    /// something: a delete of a key the invocation does not see is no
    /// write.
    writes: BTreeMap<Vec<u8>, Option<Vec<u8>>>,
    /// Bytes the state would grow (or shrink) by if committed now.
    delta: isize,
    /// Bytes `writes` holds: keys, and the values of sets.
    pending: usize,
    /// Write calls made, refused ones included.
    calls: usize,
}

/// Bytes one write holds.
fn held(key: &[u8], value: Option<&[u8]>) -> usize {
    key.len() + value.map_or(0, <[u8]>::len)
}

impl Overlay {
    /// Forgets every write.
    pub fn clear(&mut self) {
        self.writes.clear();
        self.delta = 0;
        self.pending = 0;
        self.calls = 0;
    }

    /// Calls `f` with `key`'s value as this invocation sees it.
    pub fn read<T>(
        &self,
        state: &FunctionState,
        key: &[u8],
        f: impl FnOnce(Option<&[u8]>) -> T,
    ) -> T {
        match self.writes.get(key) {
            Some(v) => f(v.as_deref()),
            None => state.read(key, f),
        }
    }

    /// Writes `key` (`value` `None`: deletes it), unless the key is invalid,
    /// the invocation made [`MAX_WRITES_PER_INVOCATION`] writes, or the
    /// state or the invocation's writes would pass the limit. A delete of
    /// a key the invocation does not see changes nothing and holds nothing.
    pub fn write(
        &mut self,
        state: &FunctionState,
        key: &[u8],
        value: Option<&[u8]>,
    ) -> Result<(), Refused> {
        if key.is_empty() || key.len() > MAX_KEY_LEN {
            return Err(Refused::InvalidKey);
        }
        self.calls += 1;
        if self.calls > MAX_WRITES_PER_INVOCATION {
            return Err(Refused::TooMany);
        }
        let size = |v: Option<&[u8]>| v.map_or(0, |v| key.len() + v.len()) as isize;
        let before = self.read(state, key, size);
        let seen = self.read(state, key, |v| v.is_some());
        let written = self.writes.get(key).map(|v| held(key, v.as_deref()));
        if value.is_none() && !seen {
            return Ok(());
        }
        let delta = self.delta + size(value) - before;
        // A delete never grows the state: always allowed.
        if value.is_some() && delta > 0 && state.bytes() as isize + delta > state.limit() as isize {
            return Err(Refused::OverLimit);
        }
        let committed = state.read(key, |v| v.is_some());
        let pending = self.pending - written.unwrap_or(0);
        if value.is_none() && !committed {
            // Set by this invocation only: forgetting the set deletes it.
            self.writes.remove(key);
            self.pending = pending;
            self.delta = delta;
            return Ok(());
        }
        let pending = pending + held(key, value);
        if value.is_some() && pending > state.limit() {
            return Err(Refused::OverLimit);
        }
        self.pending = pending;
        self.delta = delta;
        self.writes.insert(key.to_vec(), value.map(<[u8]>::to_vec));
        Ok(())
    }

    /// The writes, in key order, leaving the overlay empty.
    pub fn take(&mut self) -> Vec<StateWrite> {
        self.delta = 0;
        self.pending = 0;
        self.calls = 0;
        std::mem::take(&mut self.writes)
            .into_iter()
            .map(|(key, value)| StateWrite { key, value })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_invocation_reads_its_own_writes_over_the_committed_state() {
        let s = FunctionState::with("f", 100, [(b"a".to_vec(), b"1".to_vec())]);
        let mut o = Overlay::default();
        assert_eq!(
            o.read(&s, b"a", |v| v.map(<[u8]>::to_vec)),
            Some(b"1".to_vec())
        );
        o.write(&s, b"a", Some(b"2")).unwrap();
        o.write(&s, b"b", Some(b"3")).unwrap();
        o.write(&s, b"b", None).unwrap();
        assert_eq!(
            o.read(&s, b"a", |v| v.map(<[u8]>::to_vec)),
            Some(b"2".to_vec())
        );
        assert!(!o.read(&s, b"b", |v| v.is_some()));
        // Not applied yet: others see the old value.
        assert_eq!(s.read(b"a", |v| v.map(<[u8]>::to_vec)), Some(b"1".to_vec()));
        let writes = o.take();
        s.apply(&writes);
        assert_eq!(s.read(b"a", |v| v.map(<[u8]>::to_vec)), Some(b"2".to_vec()));
        assert_eq!(s.len(), 1);
        assert_eq!(s.bytes(), 2);
    }

    #[test]
    fn writes_past_the_limit_are_refused_and_deletes_make_room() {
        let s = FunctionState::with("f", 10, [(b"k".to_vec(), vec![0; 5])]);
        let mut o = Overlay::default();
        assert_eq!(o.write(&s, b"x", Some(&[0; 3])), Ok(()));
        assert_eq!(o.write(&s, b"y", Some(&[0; 1])), Err(Refused::OverLimit));
        o.write(&s, b"k", None).unwrap();
        assert_eq!(o.write(&s, b"y", Some(&[0; 1])), Ok(()));
        assert_eq!(o.write(&s, b"", Some(b"v")), Err(Refused::InvalidKey));
        let long = vec![b'k'; MAX_KEY_LEN + 1];
        assert_eq!(o.write(&s, &long, None), Err(Refused::InvalidKey));
        s.apply(&o.take());
        assert_eq!(s.bytes(), 6);
    }

    #[test]
    fn an_invocations_writes_are_bounded_in_bytes_and_count_and_deleting_nothing_holds_nothing() {
        let s = FunctionState::with("f", 64, [(b"k".to_vec(), vec![0; 5])]);
        let mut o = Overlay::default();
        // Deletes of keys it does not see: no writes, however many.
        for i in 0..MAX_WRITES_PER_INVOCATION - 3 {
            assert_eq!(o.write(&s, format!("absent-{i}").as_bytes(), None), Ok(()));
        }
        assert_eq!(o.pending, 0);
        // A key set and deleted in the same invocation is no write either.
        o.write(&s, b"new", Some(b"v")).unwrap();
        o.write(&s, b"new", None).unwrap();
        o.write(&s, b"k", None).unwrap();
        assert_eq!(
            o.take(),
            [StateWrite {
                key: b"k".to_vec(),
                value: None
            }]
        );
        // Past the count, every write is refused.
        let mut o = Overlay::default();
        for _ in 0..MAX_WRITES_PER_INVOCATION {
            o.write(&s, b"k", Some(b"1")).unwrap();
        }
        assert_eq!(o.write(&s, b"k", None), Err(Refused::TooMany));
        assert_eq!(o.write(&s, b"x", Some(b"")), Err(Refused::TooMany));
        // The writes held count against the limit: growing one value and
        // shrinking it again leaves room for others.
        let mut o = Overlay::default();
        o.write(&s, b"k", None).unwrap();
        assert_eq!(o.write(&s, b"a", Some(&[0; 60])), Ok(()));
        assert_eq!(o.write(&s, b"b", Some(&[0; 10])), Err(Refused::OverLimit));
        o.write(&s, b"a", Some(&[0; 1])).unwrap();
        assert_eq!(o.write(&s, b"b", Some(&[0; 10])), Ok(()));
        assert_eq!(o.pending, 1 + 2 + 11);
    }

    #[test]
    fn turns_go_in_order_and_one_given_up_is_skipped() {
        let s = FunctionState::new("f", 10);
        let (a, b, c) = (s.take_turn(), s.take_turn(), s.take_turn());
        let order = Arc::new(std::sync::Mutex::new(Vec::new()));
        let run = |t: Turn, name: &'static str| {
            let order = order.clone();
            std::thread::spawn(move || {
                t.wait();
                order.lock().unwrap().push(name);
            })
        };
        let third = run(c, "c");
        drop(b);
        let first = run(a, "a");
        first.join().unwrap();
        third.join().unwrap();
        assert_eq!(*order.lock().unwrap(), ["a", "c"]);
    }

    #[test]
    fn a_removed_function_keeps_no_state() {
        let s = FunctionState::with("f", 10, [(b"k".to_vec(), b"v".to_vec())]);
        s.mark_removed();
        s.apply(&[StateWrite {
            key: b"x".to_vec(),
            value: Some(b"y".to_vec()),
        }]);
        assert!(s.is_empty());
        assert_eq!(s.bytes(), 0);
    }
}
