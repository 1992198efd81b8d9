//! Durable per-function state: a key-value store the gateway keeps for the
//! function (by its name), in SQLite, across restarts and upgrades.
//!
//! ```
//! use edgefn_sdk::{state, Error, Message};
//!
//! fn handle(_msg: &Message) -> Result<(), Error> {
//!     let n: u64 = state::get_str("count")?.and_then(|s| s.parse().ok()).unwrap_or(0);
//!     state::set("count", (n + 1).to_string())?;
//!     Ok(())
//! }
//! # edgefn_sdk::testing::reset();
//! # edgefn_sdk::testing::invoke(handle, "t", b"").0.unwrap();
//! # assert_eq!(edgefn_sdk::testing::state_str("count").as_deref(), Some("1"));
//! ```
//!
//! What a handler can rely on (docs/ABI.md, "State"):
//!
//! - An invocation reads the function's state with its own writes on top.
//! - When it succeeds, its writes are applied at once: the next invocation,
//!   on any instance of the function, reads them. They are committed to
//!   SQLite together with the records it emitted (a crash before that
//!   commit loses them with the records, and the message runs again). When
//!   it fails (an `Err`, a trap, the timeout) it writes nothing, so a retry
//!   starts from the state as it was before.
//! - With `concurrency = 1` (the default) invocations run one at a time, in
//!   the order the messages came in, so each one reads exactly the state
//!   the one before it left: a read-modify-write such as the counter above
//!   is safe. With `concurrency` above 1, overlapping invocations can read
//!   the same value and one's update can replace the other's: a function
//!   that updates what it read keeps `concurrency = 1`.
//! - Keys and values are bytes. A key is 1 to [`MAX_KEY_LEN`] bytes; keys
//!   plus values of the function together are bounded by its `state_limit`
//!   (default [`DEFAULT_LIMIT`]). There is no way to list the keys: keep a
//!   key that lists the others if the function needs one.
//! - What one invocation writes is held by the gateway until its outcome is
//!   committed, so it is bounded too: the bytes its writes hold (the keys
//!   written plus the values set) are at most `state_limit` as well, and it
//!   may call [`set`] and [`delete`] at most [`MAX_WRITES_PER_INVOCATION`]
//!   times in all, refused calls included (those with an invalid key
//!   aside); later calls fail with [`StateError::TooManyWrites`]. Deleting
//!   a key the invocation does not see (absent, or already deleted by it)
//!   holds nothing, and deleting a key only it set forgets that set.
//!
//! Natively (`cargo test`) these calls go to a per-thread map in
//! [`crate::testing`], which a test can fill and inspect.

use crate::sys;
use std::fmt;

/// Longest key the host accepts, in bytes; the empty key is invalid too.
pub const MAX_KEY_LEN: usize = 1024;

/// The gateway's default `state_limit`: bytes of keys plus values of one
/// function together (1 MiB).
pub const DEFAULT_LIMIT: usize = 1 << 20;

/// Most [`set`] and [`delete`] calls one invocation may make, refused ones
/// included (but not those with an invalid key); the host refuses every
/// call after that with [`StateError::TooManyWrites`].
pub const MAX_WRITES_PER_INVOCATION: usize = 10_000;

/// Bytes [`get`] first offers the host for the value; a longer value takes
/// a second call with a buffer of its exact size.
const FIRST_READ: usize = 256;

/// `state_get`'s return value for a key that does not exist.
const ABSENT: i32 = -1;

/// Why the host refused a state call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StateError {
    /// -3: this invocation already made [`MAX_WRITES_PER_INVOCATION`]
    /// state writes ([`set`] and [`delete`] calls, refused ones included);
    /// every later one is refused. Nothing was written.
    TooManyWrites,
    /// -6 (only from [`set`]): the write would take the function's state
    /// (keys plus values) past its `state_limit`, or the bytes this
    /// invocation's writes hold (keys written plus values set) past
    /// `state_limit`. Nothing was written; deleting keys makes room in the
    /// state, and overwriting a value set earlier in the invocation with a
    /// shorter one (or deleting a key it set) makes room among its writes.
    LimitReached,
    /// -7: the key is empty or longer than [`MAX_KEY_LEN`] bytes.
    InvalidKey,
    /// A code this SDK does not know (from a newer host).
    Other(i32),
}

impl StateError {
    /// The error for a negative return code of a state import (other than
    /// `state_get`'s -1, which means the key is absent).
    pub fn from_code(code: i32) -> StateError {
        match code {
            -3 => StateError::TooManyWrites,
            -6 => StateError::LimitReached,
            -7 => StateError::InvalidKey,
            other => StateError::Other(other),
        }
    }

    /// The ABI return code.
    pub fn code(self) -> i32 {
        match self {
            StateError::TooManyWrites => -3,
            StateError::LimitReached => -6,
            StateError::InvalidKey => -7,
            StateError::Other(c) => c,
        }
    }
}

impl fmt::Display for StateError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StateError::TooManyWrites => {
                write!(f, "this invocation made the most state writes the host allows ({})", MAX_WRITES_PER_INVOCATION)
            }
            StateError::LimitReached => f.write_str("the function's state_limit is reached"),
            StateError::InvalidKey => write!(f, "invalid state key (empty or longer than {} bytes)", MAX_KEY_LEN),
            StateError::Other(c) => write!(f, "state call refused by the host (code {})", c),
        }
    }
}

impl std::error::Error for StateError {}

fn check(code: i32) -> Result<(), StateError> {
    if code == 0 {
        Ok(())
    } else {
        Err(StateError::from_code(code))
    }
}

/// The value of `key` as this invocation sees it, or `None` if the key does
/// not exist.
///
/// A value longer than the first buffer offered (256 bytes) is read again
/// with a buffer of its size, as the ABI prescribes.
///
/// Fails with [`StateError::InvalidKey`] if the key is empty or longer than
/// [`MAX_KEY_LEN`].
pub fn get(key: impl AsRef<[u8]>) -> Result<Option<Vec<u8>>, StateError> {
    let key = key.as_ref();
    let mut buf = vec![0u8; FIRST_READ];
    loop {
        let n = sys::state_get_slices(key, &mut buf);
        if n == ABSENT {
            return Ok(None);
        }
        if n < 0 {
            return Err(StateError::from_code(n));
        }
        let n = n as u32 as usize;
        if n <= buf.len() {
            buf.truncate(n);
            return Ok(Some(buf));
        }
        // Too small: the host copied nothing. With `concurrency` above 1,
        // another invocation may set a longer value before the next call,
        // hence the loop.
        buf.resize(n, 0);
    }
}

/// The value of `key` as text, or `None` if the key does not exist.
///
/// Fails like [`get`], and also if the value is not UTF-8.
pub fn get_str(key: impl AsRef<[u8]>) -> Result<Option<String>, crate::Error> {
    match get(key)? {
        None => Ok(None),
        Some(bytes) => Ok(Some(String::from_utf8(bytes)?)),
    }
}

/// Sets `key` to `value` (an empty value is a value: the key then exists).
/// Later invocations read it once this one succeeds.
///
/// Fails, writing nothing, with:
/// - [`StateError::InvalidKey`] if the key is empty or longer than
///   [`MAX_KEY_LEN`];
/// - [`StateError::TooManyWrites`] if this invocation already made
///   [`MAX_WRITES_PER_INVOCATION`] writes ([`set`] and [`delete`] calls);
/// - [`StateError::LimitReached`] if the function's state would pass its
///   `state_limit`, or the bytes this invocation's writes hold (keys
///   written plus values set) would.
///
/// Every call but one with an invalid key counts toward
/// [`MAX_WRITES_PER_INVOCATION`], a refused one too.
pub fn set(key: impl AsRef<[u8]>, value: impl AsRef<[u8]>) -> Result<(), StateError> {
    check(sys::state_set_slices(key.as_ref(), value.as_ref()))
}

/// Deletes `key`; deleting a key that does not exist is not an error.
/// Later invocations see the key gone once this one succeeds.
///
/// Deleting a key this invocation does not see (absent, or already deleted
/// by it) changes nothing and holds nothing; deleting a key only this
/// invocation set forgets that set. Either way the call counts toward
/// [`MAX_WRITES_PER_INVOCATION`].
///
/// Fails, deleting nothing, with [`StateError::InvalidKey`] if the key is
/// empty or longer than [`MAX_KEY_LEN`], and with
/// [`StateError::TooManyWrites`] if this invocation already made
/// [`MAX_WRITES_PER_INVOCATION`] writes. A delete is never refused for the
/// `state_limit` ([`StateError::LimitReached`]).
pub fn delete(key: impl AsRef<[u8]>) -> Result<(), StateError> {
    check(sys::state_delete_slice(key.as_ref()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing;

    #[test]
    fn get_set_delete() {
        testing::reset();
        assert_eq!(get("k"), Ok(None));
        assert_eq!(set("k", "v"), Ok(()));
        assert_eq!(get("k"), Ok(Some(b"v".to_vec())));
        assert_eq!(get_str(b"k".as_ref()).unwrap().as_deref(), Some("v"));
        assert_eq!(set(b"k".to_vec(), ""), Ok(()));
        assert_eq!(get("k"), Ok(Some(Vec::new())), "an empty value exists");
        assert_eq!(delete("k"), Ok(()));
        assert_eq!(get("k"), Ok(None));
        assert_eq!(delete("k"), Ok(()), "deleting an absent key is fine");
    }

    #[test]
    fn long_values_are_read_in_a_second_call() {
        testing::reset();
        for n in [FIRST_READ - 1, FIRST_READ, FIRST_READ + 1, 100_000] {
            let value: Vec<u8> = (0..n).map(|i| i as u8).collect();
            set("big", &value).unwrap();
            assert_eq!(get("big").unwrap().as_deref(), Some(value.as_slice()), "{} bytes", n);
        }
    }

    #[test]
    fn keys_are_checked() {
        testing::reset();
        let longest = "k".repeat(MAX_KEY_LEN);
        let too_long = "k".repeat(MAX_KEY_LEN + 1);
        assert_eq!(set(&longest, "v"), Ok(()));
        assert_eq!(get(&longest), Ok(Some(b"v".to_vec())));
        assert_eq!(set(&too_long, "v"), Err(StateError::InvalidKey));
        assert_eq!(get(&too_long), Err(StateError::InvalidKey));
        assert_eq!(delete(&too_long), Err(StateError::InvalidKey));
        assert_eq!(set("", "v"), Err(StateError::InvalidKey));
        assert_eq!(get(""), Err(StateError::InvalidKey));
        assert_eq!(delete(""), Err(StateError::InvalidKey));
        // Keys are bytes: not necessarily UTF-8.
        assert_eq!(set([0xffu8, 0x00], [1u8, 2]), Ok(()));
        assert_eq!(get([0xffu8, 0x00]), Ok(Some(vec![1, 2])));
    }

    #[test]
    fn get_str_wants_utf8() {
        testing::reset();
        set("bin", [0xffu8, 0xfe]).unwrap();
        let e = get_str("bin").unwrap_err();
        assert!(e.message().starts_with("invalid UTF-8"), "{}", e);
        assert_eq!(get_str("none").unwrap(), None);
    }

    #[test]
    fn error_codes() {
        for code in [-3, -6, -7, -2] {
            assert_eq!(StateError::from_code(code).code(), code);
        }
        assert_eq!(StateError::from_code(-3), StateError::TooManyWrites);
        assert_eq!(StateError::from_code(-6), StateError::LimitReached);
        assert_eq!(StateError::from_code(-2), StateError::Other(-2));
        assert_eq!(StateError::from_code(-9), StateError::Other(-9));
        let e: crate::Error = StateError::LimitReached.into();
        assert_eq!(e.message(), "the function's state_limit is reached");
        let e: crate::Error = StateError::TooManyWrites.into();
        assert_eq!(e.message(), "this invocation made the most state writes the host allows (10000)");
    }

    fn bump(msg: &crate::Message) -> Result<(), crate::Error> {
        let n: u64 = get_str("n")?.map_or(Ok(0), |v| v.parse())?;
        set("n", (n + 1).to_string())?;
        assert_eq!(get_str("n")?, Some((n + 1).to_string()), "reads its own write");
        if msg.payload() == b"fail" {
            return Err("asked to fail".into());
        }
        Ok(())
    }

    #[test]
    fn each_invocation_reads_what_the_one_before_left() {
        testing::reset();
        for _ in 0..3 {
            testing::invoke(bump, "t", b"").0.unwrap();
        }
        assert_eq!(testing::state_str("n").as_deref(), Some("3"), "no update lost");
        assert!(testing::invoke(bump, "t", b"fail").0.is_err());
        testing::invoke(bump, "t", b"").0.unwrap();
        assert_eq!(testing::state_str("n").as_deref(), Some("4"), "the failed one left nothing");
    }

    #[test]
    fn a_delete_is_seen_by_the_next_invocation_and_never_refused_for_the_limit() {
        fn del(_: &crate::Message) -> Result<(), crate::Error> {
            delete("n")?;
            assert_eq!(get("n")?, None);
            Ok(())
        }
        testing::reset();
        testing::set_state("n", "7");
        testing::set_state_limit(0);
        testing::invoke(del, "t", b"").0.unwrap();
        testing::set_state_limit(DEFAULT_LIMIT);
        testing::invoke(bump, "t", b"").0.unwrap();
        assert_eq!(testing::state_str("n").as_deref(), Some("1"), "counted from the delete");
    }
}
