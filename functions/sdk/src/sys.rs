//! The raw host imports of ABI v1 (WebAssembly import module `edgefn`).
//!
//! Function authors use the safe wrappers in the crate root ([`crate::emit`],
//! [`crate::publish`], [`crate::log`], [`crate::set_error`]). The raw imports
//! are declared only when compiling for wasm32 (pointers are 32-bit there);
//! natively the wrappers go to the recording stand-in in [`crate::testing`].
//!
//! All pointers and lengths are `i32` offsets into the module's exported
//! `memory`. A range outside the memory makes the host fail the invocation.

#[cfg(target_arch = "wasm32")]
#[link(wasm_import_module = "edgefn")]
extern "C" {
    /// `edgefn.emit`: a record for upstream. 0 accepted, -1 invalid topic,
    /// -2 payload too large, -3 too many records in this invocation.
    pub fn emit(topic_ptr: i32, topic_len: i32, payload_ptr: i32, payload_len: i32) -> i32;

    /// `edgefn.publish`: a message for the local broker; codes as `emit`.
    pub fn publish(topic_ptr: i32, topic_len: i32, payload_ptr: i32, payload_len: i32) -> i32;

    /// `edgefn.log`: level 0 trace, 1 debug, 2 info, 3 warn, 4 error.
    pub fn log(level: i32, msg_ptr: i32, msg_len: i32);

    /// `edgefn.set_error`: the message reported if the handler fails.
    pub fn set_error(msg_ptr: i32, msg_len: i32);
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

#[cfg(not(target_arch = "wasm32"))]
pub(crate) use crate::testing::{
    emit_slices, log_slice, publish_slices, set_error_slice,
};
