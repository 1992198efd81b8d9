//! edgefn: Lambda-style WebAssembly functions on edge devices.
//!
//! Device messages arrive over MQTT, each is handed to the sandboxed
//! WebAssembly functions its topic triggers, what they emit is committed
//! to a SQLite outbox *before* the device's message is acknowledged, and
//! the outbox is forwarded to an upstream broker, a record being deleted
//! only after the upstream acknowledged it.
//!
//! # Layout
//!
//! In data-flow order:
//!
//! - [`config`] — the TOML file: typed, every key checked, all errors at once.
//! - [`bundle`] — signed function bundles (docs/DEPLOY.md): sealing and checking.
//! - [`ingest`] — device messages in: [`ingest::mqtt`] (an existing broker, MQTT 5
//!   client, manual acks) and `ingest::embedded` (rmqtt in process, PUBACK after
//!   commit). Both yield [`ingest::Delivery`] `{ topic, payload, ack }`.
//! - [`route`] — MQTT topic filters → functions.
//! - [`registry`] — the functions that run now, by name; the routing table,
//!   swapped atomically when a function is installed or removed.
//! - [`runtime`] — wasmtime: one engine, ABI v1 checks, warm instances,
//!   limits; [`runtime::pool`] runs them on worker threads.
//! - [`pipeline`] — route → invoke → group commit → ack, in ingest order.
//! - [`store`] — the SQLite outbox; its module doc is the storage spec.
//! - [`forward`] — the outbox to the upstream broker, delete on PUBACK.
//! - [`control`] — the control connection: deploy topics in, status topics out.
//! - [`deploy`] — bundles applied on the gateway: verified, persisted, swapped in.
//! - [`gateway`] — builds and wires the stages; startup and shutdown order.
//! - [`metrics`] — counters for status lines and tests.
//! - [`broker_client`] and [`tls`] — what edgefn's two MQTT client connections
//!   share: options, and `mqtts://` (CA and client certificate files → rustls).
//! - [`text`] and [`throttle`] — device- and guest-supplied text escaped
//!   for terminals; log lines a peer can cause, throttled.
//! - [`invoke`] — `edgefn invoke`, the runtime without a broker.
//! - [`fleet`] — `edgefn keygen`, `edgefn deploy`, `edgefn remove`: keys and bundles.
//! - `demo` — `edgefn demo`: gateway, devices and a stand-in cloud in one process.
//! - [`cli`] — subcommands → library calls.

pub mod broker_client;
pub mod bundle;
pub mod cli;
pub mod config;
pub mod control;
pub mod dead_letters;
#[cfg(feature = "embedded-broker")]
pub mod demo;
pub mod deploy;
pub mod fleet;
pub mod forward;
pub mod gateway;
pub mod ingest;
pub mod invoke;
pub mod local_status;
pub mod metrics;
pub mod pipeline;
pub mod registry;
pub mod route;
pub mod runtime;
pub mod schedule;
pub mod store;
pub mod telemetry;
pub mod text;
pub mod throttle;
pub mod tls;
