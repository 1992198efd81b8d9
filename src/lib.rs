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
//! In layers: a module imports only from the layers listed before its own
//! (the vocabulary first, the commands last); within the configuration
//! layer, only from modules listed before it; the stages in data-flow
//! order.
//!
//! Vocabulary, importing nothing of the crate:
//! - [`route`] — MQTT topic filters and the router: topic → functions.
//! - [`schedule`] — the `schedule` value (`every 30s`, `cron: …`) and the
//!   topics of scheduled runs.
//! - [`clock`] — the wall clock, ms since the epoch.
//! - [`keys`] — Ed25519 keys as text, and new ones.
//! - [`metrics`] — the gateway's live counters and duration windows; the
//!   one table of every metric's name, kind, unit and help.
//! - [`shutdown`] — the shutdown signal every task watches; reconnect backoff.
//! - [`state`] — functions' durable state: values, one invocation's writes,
//!   turns.
//! - [`tls`] — `mqtts://`: CA and client certificate files → rustls.
//! - [`text`] and [`throttle`] — device- and guest-supplied text escaped
//!   for terminals; log lines a peer can cause, throttled.
//!
//! Configuration and the things it describes:
//! - [`access`] — who may use the built-in broker and for what:
//!   Mosquitto's password file and ACL file.
//! - [`config`] — the TOML file: its tables as written ([`config::file`]),
//!   every key checked, all errors at once.
//! - [`broker_client`] — what edgefn's MQTT client connections share.
//! - [`bundle`] — signed function bundles (docs/DEPLOY.md): sealing and checking.
//! - [`runtime`] — wasmtime: one engine, ABI v1 checks, warm instances,
//!   limits; [`runtime::pool`] runs them on worker threads. It knows no
//!   configuration: [`registry`] turns a function's table into its spec.
//! - [`store`] — SQLite: outbox, dead letters, state, deployments; its
//!   module doc is the storage spec.
//! - [`registry`] — the functions that run now, by name; the routing table,
//!   swapped atomically when a function is installed or removed.
//!
//! Stages, in data-flow order:
//! - [`ingest`] — deliveries in: [`ingest::mqtt`] (an existing broker, MQTT 5
//!   client, manual acks), `ingest::embedded` (rmqtt in process, PUBACK after
//!   commit), [`ingest::schedule`] (scheduled runs) and [`ingest::replay`]
//!   (dead letters replayed). All yield
//!   [`ingest::Delivery`] `{ topic, payload, ack }`.
//! - [`pipeline`] — route → invoke → group commit → ack, in ingest order.
//! - [`forward`] — the outbox to the upstream broker, delete on PUBACK;
//!   refusals held back per topic.
//! - [`control`] — the control connection: deploy topics in, status topics out.
//! - [`deploy`] — bundles applied on the gateway: verified, persisted, swapped in.
//! - [`telemetry`] — one report of the metrics: Prometheus, JSON, HTTP.
//! - [`gateway`] — builds and wires the stages, owns every task they run;
//!   startup and shutdown order.
//!
//! The `edgefn` binary is not part of the library: `src/main.rs` and
//! `src/cli/`, one file per subcommand (`run`, `check`, `invoke`,
//! `status`, `deploy` for deploy/remove/keygen with `fleet` doing their
//! work, `dead_letters`, `demo`), each calling the modules above.
//!
//! # Where a change goes
//!
//! - A trigger kind: a source of [`ingest::Delivery`] in `src/ingest/`,
//!   started and stopped in `src/gateway.rs`.
//! - A host call: `src/runtime/host.rs` (and docs/ABI.md).
//! - A config key: its table in `src/config/file.rs`, its check in
//!   `src/config/mod.rs` (`src/config/function.rs` for `[[functions]]`),
//!   docs/CONFIG.md.
//! - A counter: a line in `counters!` in `src/metrics.rs` (and its family
//!   in `FAMILIES` if new); docs/CONFIG.md's list is written from it.
//! - A CLI subcommand: a file in `src/cli/` and its line in
//!   `src/cli/mod.rs`.

pub mod access;
pub mod broker_client;
pub mod bundle;
pub mod clock;
pub mod config;
pub mod control;
pub mod deploy;
pub mod forward;
pub mod gateway;
pub mod ingest;
pub mod keys;
pub mod metrics;
pub mod pipeline;
pub mod registry;
pub mod route;
pub mod runtime;
pub mod schedule;
pub mod shutdown;
pub mod state;
pub mod store;
pub mod telemetry;
pub mod text;
pub mod throttle;
pub mod tls;
