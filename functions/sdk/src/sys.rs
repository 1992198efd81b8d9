//! The raw host imports of ABI v1 (WebAssembly import module `edgefn`).
//!
//! Function authors use the safe wrappers: [`crate::emit`],
//! [`crate::publish`], [`crate::log`], [`crate::set_error`] in the crate root
//! and [`crate::state`] for the state imports. The raw imports
//! are declared only when compiling for wasm32 (pointers are 32-bit there);
//! natively the wrappers go to the recording stand-in in [`crate::testing`].
//!
//! All pointers and lengths are `i32` offsets into the module's exported
//! `memory`. A range outside the memory makes the host fail the invocation.

#[cfg(target_arch = "wasm32")]
#[link(wasm_import_module = "edgefn")]
extern "C" {
    /// `edgefn.emit`: a record for upstream. 0 accepted, -1 invalid topic,
    /// -2 payload too large, -3 too many records in this invocation, -4 past
    /// `max_emit_bytes`, -5 topic outside `emit_allow`.
    pub fn emit(topic_ptr: i32, topic_len: i32, payload_ptr: i32, payload_len: i32) -> i32;

    /// `edgefn.publish`: a message for the local broker; codes as `emit`
    /// (-5: outside `publish_allow`).
    pub fn publish(topic_ptr: i32, topic_len: i32, payload_ptr: i32, payload_len: i32) -> i32;

    /// `edgefn.log`: level 0 trace, 1 debug, 2 info, 3 warn, 4 error.
    pub fn log(level: i32, msg_ptr: i32, msg_len: i32);

    /// `edgefn.set_error`: the message reported if the handler fails.
    pub fn set_error(msg_ptr: i32, msg_len: i32);

    /// `edgefn.state_get`: the value's length (>= 0) if the key exists,
    /// copied into the buffer only if it is at most `buf_len`; -1 no such
    /// key; -7 invalid key (empty or longer than 1024 bytes).
    pub fn state_get(key_ptr: i32, key_len: i32, buf_ptr: i32, buf_len: i32) -> i32;

    /// `edgefn.state_set`: 0 written; -3 this invocation already made
    /// 10,000 state writes (`state_set` and `state_delete` calls, refused
    /// ones included, invalid keys aside); -6 the function's state, or the
    /// bytes this invocation's writes hold, would pass its `state_limit`;
    /// -7 invalid key.
    pub fn state_set(key_ptr: i32, key_len: i32, value_ptr: i32, value_len: i32) -> i32;

    /// `edgefn.state_delete`: 0 deleted (also if it was absent: then it
    /// changes nothing and holds nothing); -3 this invocation already made
    /// 10,000 state writes (as `state_set`); -7 invalid key. Never refused
    /// for the `state_limit`.
    pub fn state_delete(key_ptr: i32, key_len: i32) -> i32;
}

#[cfg(target_arch = "wasm32")]
fn ptr(bytes: &[u8]) -> i32 {
    bytes.as_ptr() as usize as i32
}

#[cfg(target_arch = "wasm32")]
fn len(bytes: &[u8]) -> i32 {
    bytes.len() as i32
}

#[cfg(target_arch = "wasm32")]
pub(crate) fn emit_slices(topic: &[u8], payload: &[u8]) -> i32 {
    // SAFETY: both ranges are live slices of our own memory.
    unsafe { emit(ptr(topic), len(topic), ptr(payload), len(payload)) }
}

#[cfg(target_arch = "wasm32")]
pub(crate) fn publish_slices(topic: &[u8], payload: &[u8]) -> i32 {
    // SAFETY: both ranges are live slices of our own memory.
    unsafe { publish(ptr(topic), len(topic), ptr(payload), len(payload)) }
}

#[cfg(target_arch = "wasm32")]
pub(crate) fn log_slice(level: i32, message: &[u8]) {
    // SAFETY: a live slice of our own memory.
    unsafe { log(level, ptr(message), len(message)) }
}

#[cfg(target_arch = "wasm32")]
pub(crate) fn set_error_slice(message: &[u8]) {
    // SAFETY: a live slice of our own memory.
    unsafe { set_error(ptr(message), len(message)) }
}

#[cfg(target_arch = "wasm32")]
pub(crate) fn state_get_slices(key: &[u8], buf: &mut [u8]) -> i32 {
    // SAFETY: both ranges are live slices of our own memory; the host writes
    // at most `buf.len()` bytes into `buf`, which we hold mutably.
    unsafe { state_get(ptr(key), len(key), buf.as_mut_ptr() as usize as i32, len(buf)) }
}

#[cfg(target_arch = "wasm32")]
pub(crate) fn state_set_slices(key: &[u8], value: &[u8]) -> i32 {
    // SAFETY: both ranges are live slices of our own memory.
    unsafe { state_set(ptr(key), len(key), ptr(value), len(value)) }
}

#[cfg(target_arch = "wasm32")]
pub(crate) fn state_delete_slice(key: &[u8]) -> i32 {
    // SAFETY: a live slice of our own memory.
    unsafe { state_delete(ptr(key), len(key)) }
}

#[cfg(not(target_arch = "wasm32"))]
pub(crate) use crate::testing::{
    emit_slices, log_slice, publish_slices, set_error_slice, state_delete_slice, state_get_slices,
    state_set_slices,
};
