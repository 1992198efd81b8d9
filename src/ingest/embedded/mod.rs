//! Ingest source \[B\]: an MQTT broker (rmqtt 0.24, library mode) inside the edgefn process.
//!
//! Devices connect to this broker instead of an external Mosquitto. Every PUBLISH whose topic
//! matches a function's trigger becomes a [`Delivery`], and the device's acknowledgement
//! (PUBACK for QoS 1, PUBREC for QoS 2) is sent only after the pipeline committed the
//! message's outcome. Messages on other topics are routed to subscribers as by any broker.
//!
//! # How the acknowledgement waits for the commit
//!
//! What edgefn relies on in rmqtt 0.24 (which of it a test pins: see "Pinned by tests"):
//!
//! * rmqtt handles a connection's packets one at a time, inline in the session's event loop:
//!   `SessionState::run_loop` awaits `process_mqtt_message` for each packet it reads, so
//!   nothing else happens on that connection until a PUBLISH has been dealt with: no reading,
//!   no delivery to it, and no check of its keep-alive either.
//! * `SessionState::process_publish` sends the QoS 1 PUBACK only after `publish`, and so the
//!   publish hooks, returned `Ok`. An `Err` leaves it before the PUBACK and ends the session
//!   loop; rmqtt then closes the socket and, for MQTT 5, sends a DISCONNECT. QoS 2 is the same
//!   with PUBREC.
//! * `SessionState::_publish` resolves an MQTT 5 topic alias, runs the `MessagePublish` hook,
//!   then the `MessagePublishCheckAcl` hook, and only then forwards the message to subscribers.
//! * The `MessagePublish` hook cannot refuse a message: its result only *replaces* it. The ACL
//!   hook can: a rejected `PublishAclResult` whose `PublishResult::disconnect` is true makes
//!   `_publish` return `Err(MqttError::PublishAckReason)`. A rejection with `disconnect = false`
//!   would NOT do: `publish` turns it into `Ok`, and for MQTT 3.1.1 `Sink::send_publish_ack`
//!   sends an ordinary PUBACK, which carries no reason code.
//!
//! So edgefn's hook is registered on [`Type::MessagePublishCheckAcl`]. For a matching topic it
//! sends the [`Delivery`] into `deliveries` (awaiting capacity: backpressure to the device).
//! Then, on the plain listener, whose connections reach rmqtt through edgefn's own relay
//! (`front`), it leaves the [`crate::ingest::AckWaiter`] with that connection under the
//! message's packet id and returns `(true, acc)` at once: rmqtt writes the PUBACK, and the
//! relay holds it (and all rmqtt sends that device after it) until the commit, or closes the
//! connection without it if the message is not committed. Elsewhere (the TLS listener, whose
//! bytes the relay cannot read, and a connection made straight to rmqtt's loopback port) the
//! hook awaits the waiter itself:
//! * committed: it returns `(true, acc)`, i.e. "proceed, no verdict"; with no other handler,
//!   `DefaultHook::message_publish_check_acl` then allows the message (no verdict means
//!   allowed), rmqtt forwards it to local subscribers and sends the PUBACK;
//! * given up (see below), dropped uncommitted, pipeline closed, or broker shutting down: for
//!   QoS 1/2 it returns `(false, PublishAclResult(ImplementationSpecificError, disconnect =
//!   true))`. `false` stops rmqtt's chain of handlers, the connection is closed without
//!   PUBACK/PUBREC, and the device resends on reconnect. An MQTT 5 device gets DISCONNECT 0x83
//!   Implementation Specific Error. For QoS 0 there is no acknowledgement to withhold: the
//!   message is routed normally and the loss logged.
//!
//! A refusal before the message is handed over (shutting down, the device gave up while it
//! waited for room) is answered that way on either path.
//!
//! rmqtt skips the ACL hook for superuser sessions; edgefn's authentication handler
//! (`access`) never makes one.
//!
//! Before any of this, the same hook asks the access rules (`access`: `[local]
//! password_file`, `acl_file`): a PUBLISH the ACL denies is refused without `disconnect`
//! (MQTT 5 PUBACK 0x87, 3.1.1 a plain PUBACK) and never reaches the pipeline.
//!
//! # Behaviour that follows
//!
//! * One connection's publishes are handled by rmqtt strictly in order. Behind the relay they
//!   share commits: rmqtt reads the next while the relay holds the PUBACKs, which go out in
//!   the order of the publishes. On the TLS listener they go one at a time: a device's rate is
//!   bounded by the commit latency, and pipelined publishes wait unread in the socket buffer.
//! * While a message waits for its commit, its device hears nothing more on that connection:
//!   behind the relay, all rmqtt sends after the PUBACK waits with it (PINGRESP included); on
//!   the TLS listener rmqtt's loop waits for the hook. A commit stall (a full buffer, a stuck
//!   disk) can outlast the device's patience, so edgefn gives the message up when, before it
//!   is committed, its connection ends (behind the relay: the device closed it, typically
//!   after a keep-alive without PINGRESP), or the device connects again with the same client
//!   id or a newer session of that client id appears (rmqtt's `ClientConnect` and
//!   `SessionCreated` hooks), or, where the hook waits, its keep-alive passes. The keep-alive
//!   deadline is the server-side timeout rmqtt's fitter computes from the client's keep-alive
//!   (`Fitter::keep_alive`: keep-alive + 3 s below 6 s, else 1.5 × keep-alive, twice the
//!   default backoff of 0.75), after which rmqtt itself would close a connection it heard
//!   nothing from, were its loop not waiting for the hook.
//! * A message given up is never committed: while it waits for its client's permit or for room
//!   in `deliveries` it is simply not handed over; once handed over it is abandoned
//!   ([`crate::ingest::AckWaiter::abandon`]) and the commit stage leaves it out. The connection
//!   is closed without PUBACK, as for any refusal, and the copy the device sends again is the
//!   only one committed. A message a commit already holds is not given up: it is acknowledged
//!   a moment later, if its connection is still there.
//! * After a reconnect, a hook that gave up returns only once the new session exists (rmqtt's
//!   `SessionCreated` hook) or the keep-alive passes (`Inner::linger`). During that CONNECT
//!   rmqtt kicks the old session and waits up to 5 s for its answer. The lingering session
//!   does not answer, so such a reconnect takes those 5 s, then replaces the old session.
//! * Every other reconnect takes its session over at once, whatever state the old one is in:
//!   `sessions` wraps rmqtt's session table so that a kick that finds the old session ending
//!   removes what is left of it, and a CONNECT racing another of its client id waits for it,
//!   where rmqtt alone would refuse the new CONNECT (Server unavailable).
//! * At most `MAX_IN_PIPELINE_PER_CLIENT` messages of one client id are in the pipeline, those
//!   its device gave up on included (an abandoned message counts until the commit stage drops
//!   it). The next waits for one to leave, and is given up like any other; its connection's
//!   later packets wait unread behind it.
//! * Last wills whose topic matches a trigger are delivered too (they pass the
//!   `MessagePublish` hook only); nobody waits for their commit.
//! * Messages published by edgefn itself ([`EmbeddedBroker::publish`]) go through
//!   `SessionState::forwards`, which runs no publish hook, so they never wait on the pipeline.
//!   If their topic matches a trigger (chaining) they are handed to a bounded relay queue and
//!   from there into `deliveries`; `publish` never awaits the pipeline, so a function's publish
//!   cannot deadlock against its own stage. When the relay queue is full the chained copy is
//!   dropped, counted and logged (local subscribers still receive the message).
//! * Shutdown is two-phase (see [`EmbeddedBroker::shutdown`]): nothing new enters the pipeline,
//!   what it already holds gets a grace period to be committed and acknowledged, then the
//!   remaining waits are refused and every session is kicked.
//! * rmqtt core keeps sessions, subscriptions and messages queued for devices in memory:
//!   they are lost when edgefn restarts. Retained messages are kept in SQLite as well
//!   (`retain`).
//!
//! # Pinned by tests
//!
//! The integration tests run edgefn with its devices on this broker's plain listener, behind
//! the relay; the devices are MQTT 5 clients publishing at QoS 1, each waiting for a PUBACK
//! before its next publish, unless said otherwise.
//!
//! * `a_connections_publishes_share_commits_and_each_puback_follows_its_own`
//!   (tests/embedded_broker.rs): an MQTT 3.1.1 device writes 200 publishes at once; their
//!   PUBACKs come in order, when each arrives the outbox holds at least as many rows, and the
//!   200 took fewer than 200 commits. Pins that the relay holds each PUBACK until its commit
//!   while rmqtt reads on.
//! * `a_puback_from_the_embedded_broker_means_the_reading_is_committed`
//!   (tests/embedded_broker.rs): when each PUBACK arrives, the reading's outbox row exists;
//!   a reading the function drops is acknowledged with no row. Pins that rmqtt sends the PUBACK
//!   only after the ACL hook returned, and that "proceed, no verdict" means allowed and
//!   acknowledged.
//! * `a_device_that_gives_up_during_a_stall_gets_no_second_copy_upstream`
//!   (tests/embedded_broker.rs): while a full buffer stalls every commit, a device with a 5 s
//!   keep-alive and one that stops waiting for a PUBACK after 3 s and reconnects with the same
//!   client id both lose connections with a reading unacknowledged and resend it; afterwards
//!   every reading arrives upstream under exactly one record id. Pins that a given-up reading
//!   gets no PUBACK (the relay closes the connection without it; a reading still waiting for
//!   room is refused with `disconnect`) and the device resends (a PUBACK for a given-up
//!   reading would lose it), that a message given up on is never committed, and that a
//!   connection the device closed and a reconnect with the same client id both count. It does
//!   not tell the two apart: the 5 s device's client drops its connection 5 to 10 s after the
//!   stuck publish (at its second keep-alive tick without PINGRESP) and reconnects.
//! * `the_embedded_brokers_clients_and_refusals_are_in_the_gateway_metrics`
//!   (tests/embedded_broker.rs): with two devices connected (one idle after a publish on a
//!   topic no trigger matches, one whose readings stall on a full buffer), the gateway's
//!   metrics show two connections and two sessions (rmqtt's counts), and a message given up
//!   during the stall is counted in `abandoned` and its refusal in `broker_refused`.
//! * `the_embedded_broker_is_a_broker_and_functions_reach_devices` (tests/embedded_broker.rs):
//!   another client subscribed on this broker receives a device's readings (rmqtt forwards a
//!   message once the hook allows it), the readings arrive upstream in the order sent, and a
//!   function's local publish (through [`BrokerPublisher::publish`]) reaches a client
//!   subscribed to `devices/+/cmd`. Its topic matches no trigger: chaining is not exercised.
//! * `a_killed_daemon_loses_no_reading_a_device_got_a_puback_for` (tests/embedded_broker.rs):
//!   three devices on concurrent connections publish without pause; after a SIGKILL and a
//!   restart, every reading any of them got a PUBACK for arrives upstream.
//! * `a_full_buffer_drains_when_the_upstream_refuses_records_instead_of_acknowledging_them`
//!   (tests/hardening.rs): a device whose readings wait for room in a full buffer (briefly: the
//!   upstream comes back at once and refuses them into the dead letters) gets all 60
//!   acknowledged on one connection: a wait for room ends in a PUBACK, not a refusal.
//! * `a_function_asleep_in_a_wasi_call_times_out_and_holds_no_other_acknowledgement`
//!   (tests/hardening.rs): a message whose function sleeps in a WASI call is acknowledged once
//!   the function timed out (twice) and its dead letter is committed, and another device's 20
//!   readings sent meanwhile are all acknowledged.
//! * `readings_acknowledged_before_power_cuts_all_arrive_after_them` (tests/powercut.rs): with
//!   `durability = "full"`, every reading a device got a PUBACK for survives a SIGKILL together
//!   with the loss of every write not yet fsynced, twice: a PUBACK follows a synced commit.
//! * `record_ids_are_never_given_to_two_readings_across_power_cuts` (tests/powercut.rs): with
//!   `durability = "relaxed"`, record ids lost in a power cut are not given to other readings.
//!   It uses this broker for ingest but pins no rmqtt behaviour.
//!
//! The two power-cut tests need FUSE; where it is missing they pass without running.
//!
//! Not pinned by a test:
//! * that the hook sees a topic with its MQTT 5 alias already resolved;
//! * that the `MessagePublish` hook can only replace a message, and that a rejection with
//!   `disconnect = false` gets an MQTT 3.1.1 device an ordinary PUBACK (why the ACL hook, with
//!   `disconnect`, is used);
//! * the DISCONNECT reason 0x83 an MQTT 5 device gets (the tests see only the closed connection);
//! * QoS 2 (PUBREC after the commit) and QoS 0 (routed normally when not committed);
//! * that on the TLS listener a PUBACK follows the commit: its tests publish through the
//!   waiting hook (tests/broker_access.rs) without looking at the outbox;
//! * that rmqtt skips the ACL hook for superusers, and that no session is one here;
//! * that a connection answers nothing, PINGREQ included, while a message waits for its commit;
//! * the linger after a reconnect: a CONNECT rmqtt refused would only make the reconnecting
//!   device try again, which the stall test does not tell from a failed publish;
//! * the bound of `MAX_IN_PIPELINE_PER_CLIENT` messages per client id;
//! * last wills passing the `MessagePublish` hook only, and their delivery;
//! * that [`EmbeddedBroker::publish`] runs no publish hook, and chaining through the relay;
//! * the two phases of [`EmbeddedBroker::shutdown`];
//! * sessions living in memory only;
//! * the listener limits and defaults described on the constants below.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::num::{NonZeroU16, NonZeroU32};
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use anyhow::Context as _;
use bytes::Bytes;
use rmqtt::codec::v5::{PublishAckReason, PublishProperties};
use rmqtt::context::ServerContext;
use rmqtt::hook::{Handler, HookResult, Parameter, ReturnType, Type};
use rmqtt::net::Builder;
use rmqtt::server::MqttServer;
use rmqtt::session::SessionState;
use rmqtt::shared::Entry;
use rmqtt::types::{
    AuthResult, ClientId, CodecPublish, From as MsgFrom, FromType, Id, ListenerId, Publish,
    PublishAclResult, PublishResult, QoS, Reason,
};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, watch};
use tokio::task::{JoinHandle, JoinSet};
use tracing::{debug, info, warn};

use crate::ingest::{Ack, AckWaiter, Delivery, Hold};
use crate::metrics::Metrics;
use crate::registry::Registry;

mod access;
mod fitter;
mod front;
mod hook;
mod limits;
mod retain;
mod sessions;
mod share;

use hook::relay_chained;

/// Name of the plain listener, shown in rmqtt's own log lines.
const LISTENER_NAME: &str = "edgefn/tcp";

/// Name of the TLS listener.
const TLS_LISTENER_NAME: &str = "edgefn/tls";

/// Key of our only listener in rmqtt's `listen_cfgs`. `MqttServerBuilder::listener` would use the
/// port, which is 0 when the caller asks for a free port (and rmqtt then logs a warning), so
/// the id is set explicitly with `listener_by_id`.
const LISTENER_ID: ListenerId = 1;

/// Key of the TLS listener.
const TLS_LISTENER_ID: ListenerId = 2;

/// Client id under which edgefn's own publishes enter the broker. It only matters to MQTT 5
/// subscribers with "no local" set, who would not receive messages from a client of the same id.
const EDGEFN_CLIENT_ID: &str = "$edgefn";

/// Bytes a PUBLISH needs besides its payload, so that a payload of exactly
/// `max_message_size` is accepted whatever its topic: the longest topic MQTT allows (65,535
/// bytes plus its 2-byte length), the packet id (2) and room for MQTT 5 properties (4 KiB).
/// rmqtt's codec compares the limit with the packet's remaining length, without the fixed
/// header, for MQTT 3.1.1 and 5 alike.
const PACKET_OVERHEAD: usize = 2 + 65_535 + 2 + 4096;

/// The largest remaining length MQTT can encode (256 MiB - 1).
const MQTT_MAX_PACKET: usize = 268_435_455;

/// Upper bound on sessions (connected plus persistent offline ones). rmqtt's default is
/// unlimited; each session holds queues in memory, so a Pi needs a bound. Beyond it new
/// clients are refused with "Server unavailable".
const MAX_SESSIONS: isize = 4096;

/// Unacknowledged QoS 1/2 messages the broker keeps in flight to each subscriber, and the
/// Receive Maximum it announces to MQTT 5 clients. It also bounds a client's unfinished
/// inbound QoS 2 exchanges: a client beyond it is disconnected. rmqtt's default is 16.
const MAX_INFLIGHT: u16 = 32;

/// Lifetime of a message waiting in a subscriber's queue when the publisher set no MQTT 5
/// expiry. Commands to devices mostly go stale: a valve command should not fire an hour
/// late. rmqtt's default (5 min), made explicit.
const MESSAGE_EXPIRY: Duration = Duration::from_secs(5 * 60);

/// How long an MQTT 3.1.1 persistent session (clean session = false) is kept while its client
/// is offline. rmqtt's default (2 h), made explicit.
const SESSION_EXPIRY: Duration = Duration::from_secs(2 * 60 * 60);

/// Cap on the session expiry an MQTT 5 client may ask for (rmqtt's default: no cap), so that
/// abandoned sessions and their queues do not live for ever in memory.
const MAX_SESSION_EXPIRY: Duration = Duration::from_secs(24 * 60 * 60);

/// Interval after which an unacknowledged QoS 1/2 message to a subscriber is resent.
/// rmqtt's default, made explicit.
const MESSAGE_RETRY_INTERVAL: Duration = Duration::from_secs(20);

/// Time a new connection has to send its CONNECT (rmqtt's default is 30 s); a client that
/// has not done so within this time on a local network is dead or hostile.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(15);

/// Connections waiting to be accepted (rmqtt's listeners' default).
const LISTEN_BACKLOG: u32 = 512;

/// Time a write to a client may take before the connection is dropped. rmqtt's default, made
/// explicit. A PUBACK that cannot be written in this time ends the connection; the device then
/// resends, which at-least-once delivery allows.
const SEND_TIMEOUT: Duration = Duration::from_secs(10);

/// Topic aliases an MQTT 5 client may use (rmqtt's default is 0: none). Constrained devices
/// save bandwidth with them, and rmqtt resolves them before edgefn's hook sees the topic.
const MAX_TOPIC_ALIASES: u16 = 32;

/// Most messages of one client id in the pipeline at once, those its device gave up on
/// included: as many as an MQTT 5 client may have unacknowledged (the Receive Maximum, so
/// that they can share a commit), and a device reconnecting in a loop cannot fill the
/// pipeline. Its next message waits (and is given up like any other) until one leaves.
const MAX_IN_PIPELINE_PER_CLIENT: usize = MAX_INFLIGHT as usize;

/// Messages published by edgefn itself on trigger topics waiting to enter `deliveries`.
const CHAIN_QUEUE_CAPACITY: usize = 1024;

/// Longest time `shutdown` lets the pipeline commit the device messages it already holds
/// (and so acknowledge them). Matches the gateway's drain grace: a group commit takes
/// milliseconds, so this is only reached with a stuck disk or a full buffer.
const COMMIT_GRACE: Duration = Duration::from_secs(10);

/// How often `shutdown` looks whether the messages in flight are done.
const SHUTDOWN_POLL: Duration = Duration::from_millis(20);

/// Longest time `shutdown` waits for the client sessions to close.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// Minimum time between two warnings about messages the broker dropped (in between, drops
/// are counted and logged at debug level).
const DROP_WARN_INTERVAL: Duration = Duration::from_secs(10);

/// Where the broker is in its life, as seen by the hook and the relay. Ordered: each phase
/// implies the ones before it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Phase {
    /// Normal operation.
    Running,
    /// [`EmbeddedBroker::shutdown`] began: nothing new enters the pipeline, but messages
    /// already handed over may still be committed, and are then acknowledged.
    Closing,
    /// Nobody waits for a commit any more: what is not committed is refused.
    Stopped,
}

/// Why a device's message was not committed, so that it must not be acknowledged.
#[derive(Debug, Clone, Copy)]
enum Refusal {
    /// `deliveries` is closed: the pipeline has stopped.
    PipelineClosed,
    /// The pipeline dropped the message without committing it.
    Dropped,
    /// The broker is shutting down (or its handle was dropped).
    ShuttingDown,
    /// The relay queue for edgefn's own publishes on trigger topics was full.
    RelayFull,
    /// The device gave up on the message (its connection is gone or was replaced) before
    /// it was committed; it sends it again, so it is taken out of the pipeline.
    GaveUp,
}

impl Refusal {
    /// Short text for logs and for the MQTT 5 reason string.
    fn as_str(self) -> &'static str {
        match self {
            Refusal::PipelineClosed => "edgefn pipeline closed",
            Refusal::Dropped => "edgefn dropped the message uncommitted",
            Refusal::ShuttingDown => "edgefn is shutting down",
            Refusal::RelayFull => "relay queue for edgefn's own publishes is full",
            Refusal::GaveUp => {
                "the device gave up waiting (keep-alive passed or a new connection took over)"
            }
        }
    }
}

/// Why a device no longer waits for a message it sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum GaveUp {
    /// Its keep-alive passed without an answer.
    Expired,
    /// It is connecting again with the same client id.
    Reconnecting,
    /// A newer session of its client id exists.
    Replaced,
}

/// How a wait for a commit ended without it (see `Inner::commit_of`).
enum Unwaited {
    /// The pipeline dropped the message uncommitted.
    Dropped,
    /// The broker stopped.
    Stopped,
    /// The device gave up, and the message was taken out of the pipeline.
    GaveUp(GaveUp),
}

/// What tells that a device stopped waiting for the message it sent.
struct DeviceWait {
    /// When its keep-alive passes, if it has one.
    deadline: Option<tokio::time::Instant>,
    /// CONNECTs with its client id.
    connects: watch::Receiver<u64>,
    /// Sessions created for its client id.
    sessions: watch::Receiver<u64>,
}

impl DeviceWait {
    /// Resolves when the device stopped waiting, saying why. Cancel-safe.
    async fn gave_up(&mut self) -> GaveUp {
        tokio::select! {
            () = until(self.deadline) => GaveUp::Expired,
            _ = self.connects.changed() => GaveUp::Reconnecting,
            _ = self.sessions.changed() => GaveUp::Replaced,
        }
    }
}

/// Counts one device publish in [`Inner::in_flight`] while it lives: until it is
/// acknowledged or refused (shutdown's grace waits for these).
struct InFlight(
    /// The state holding the counter.
    Arc<Inner>,
);

impl InFlight {
    /// Starts counting.
    fn enter(inner: &Arc<Inner>) -> Self {
        inner.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight(Arc::clone(inner))
    }

    /// The shared state.
    fn inner(&self) -> &Inner {
        &self.0
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Resolves at `deadline`; never without one.
async fn until(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Where a delivery that nobody acknowledges came from.
#[derive(Debug, Clone, Copy)]
enum Origin {
    /// A client's last will, published by rmqtt when the client went away.
    LastWill,
    /// A message published by edgefn itself ([`EmbeddedBroker::publish`]).
    Chained,
}

/// One client id with messages in the pipeline or a publish being handled.
struct ClientSlot {
    /// Counts the CONNECTs with this client id while the slot lives: the device came back,
    /// so it no longer waits for a message sent on an earlier connection.
    connects: watch::Sender<u64>,
    /// Counts the sessions created for this client id while the slot lives: once a newer
    /// session exists, the older one may end without stopping the newer one's start.
    sessions: watch::Sender<u64>,
    /// [`MAX_IN_PIPELINE_PER_CLIENT`] permits; each delivery's ack holds one.
    permits: Arc<Semaphore>,
}

/// The client ids with a [`ClientSlot`]; a slot goes when nothing refers to it any more.
type Clients = Arc<Mutex<HashMap<ClientId, Arc<ClientSlot>>>>;

/// A reference to a client's slot that removes the slot from [`Clients`] when it is the last.
struct ClientRef {
    /// The map the slot is in.
    clients: Clients,
    /// Its key.
    client_id: ClientId,
    /// The slot; `None` only while dropping.
    slot: Option<Arc<ClientSlot>>,
}

impl ClientRef {
    /// The slot of `client_id`, made if there is none.
    fn enter(clients: &Clients, client_id: &ClientId) -> ClientRef {
        let mut map = clients.lock().unwrap_or_else(PoisonError::into_inner);
        let slot = map
            .entry(client_id.clone())
            .or_insert_with(|| {
                Arc::new(ClientSlot {
                    connects: watch::channel(0).0,
                    sessions: watch::channel(0).0,
                    permits: Arc::new(Semaphore::new(MAX_IN_PIPELINE_PER_CLIENT)),
                })
            })
            .clone();
        ClientRef {
            clients: clients.clone(),
            client_id: client_id.clone(),
            slot: Some(slot),
        }
    }

    fn slot(&self) -> &ClientSlot {
        self.slot.as_ref().expect("present until dropped")
    }
}

impl Drop for ClientRef {
    fn drop(&mut self) {
        let mut map = self.clients.lock().unwrap_or_else(PoisonError::into_inner);
        drop(self.slot.take());
        if map
            .get(&self.client_id)
            .is_some_and(|slot| Arc::strong_count(slot) == 1)
        {
            map.remove(&self.client_id);
        }
    }
}

/// What a delivery's ack holds while it is in the pipeline: one of its client's permits.
struct ClientPermit {
    /// Released first (fields drop in order), then the slot reference.
    _permit: OwnedSemaphorePermit,
    /// Keeps the slot (and so the bound) alive.
    _client: ClientRef,
}

/// State shared by the hook handler, the relay task and [`EmbeddedBroker`].
struct Inner {
    /// Which topics trigger a function.
    functions: Arc<Registry>,
    /// The pipeline's input. Taken out (dropped) when shutdown begins, because the pipeline
    /// drains only once every sender is gone, and rmqtt may keep the hook handlers (and so
    /// this struct) alive for as long as any session task lives.
    deliveries: Mutex<Option<mpsc::Sender<Delivery>>>,
    /// The broker's [`Phase`]; its sender lives in [`EmbeddedBroker`], and a dropped sender
    /// counts as [`Phase::Stopped`].
    phase: watch::Receiver<Phase>,
    /// Device publishes currently handed to (or waiting to enter) the pipeline.
    in_flight: AtomicUsize,
    /// The gateway's counters: refused, dropped and lost messages are counted there.
    metrics: Arc<Metrics>,
    /// Rate limit of the warnings about dropped messages.
    drop_warnings: crate::throttle::Throttle,
    /// Clients with a publish being handled or messages in the pipeline.
    clients: Clients,
    /// Who may connect, publish and subscribe.
    gate: Arc<access::Gate>,
    /// How many may connect, and how fast each may publish.
    limits: Arc<limits::Limits>,
    /// The connections the plain listener's front relays (see `front`).
    peers: Arc<front::Peers>,
}

/// The hook handler registered with rmqtt (one instance per hook type).
struct EdgefnHook(
    /// State shared with the broker handle.
    Arc<Inner>,
);

/// A message published by edgefn itself on a trigger topic, waiting for the relay.
struct Chained {
    /// Topic.
    topic: String,
    /// Payload.
    payload: Bytes,
}

/// The broker running in this process (ingest source \[B\]).
pub struct EmbeddedBroker {
    /// Publishes edgefn's own messages; also holds rmqtt's server context and the shared state.
    publisher: BrokerPublisher,
    /// Address the listener is bound to (the real port when 0 was asked for).
    local_addr: SocketAddr,
    /// Address the TLS listener is bound to, if there is one.
    tls_addr: Option<SocketAddr>,
    /// Announces the [`Phase`] to the hook and the relay.
    phase: watch::Sender<Phase>,
    /// The accept loop (`MqttServer::run`); aborting it closes the listening socket.
    server_task: JoinHandle<()>,
    /// The task running [`relay_chained`].
    relay_task: JoinHandle<()>,
}

/// A cloneable handle that publishes edgefn's own messages into the embedded broker (see
/// [`EmbeddedBroker::publish`]), for a task that forwards functions' local publishes.
#[derive(Clone)]
pub struct BrokerPublisher {
    /// rmqtt's server context: sessions, routing, hooks.
    scx: ServerContext,
    /// State shared with the hook handler and the relay task.
    inner: Arc<Inner>,
    /// Queue of edgefn's own publishes on trigger topics (see [`relay_chained`]).
    chain: mpsc::Sender<Chained>,
    /// Identity of edgefn's own publishes.
    from: MsgFrom,
}

/// How many clients the embedded broker has now.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BrokerClients {
    /// Open connections.
    pub connections: u64,
    /// Sessions: connected clients and the persistent sessions of offline ones.
    pub sessions: u64,
    /// Open sockets on the listeners, logged in or not.
    pub sockets: u64,
}

impl BrokerPublisher {
    /// See [`EmbeddedBroker::clients`].
    pub fn clients(&self) -> BrokerClients {
        let count = |c: isize| u64::try_from(c).unwrap_or(0);
        BrokerClients {
            connections: count(self.scx.connections.count()),
            sessions: count(self.scx.sessions.count()),
            sockets: self.inner.peers.sockets() as u64,
        }
    }

    /// See [`EmbeddedBroker::publish`].
    pub async fn publish(&self, topic: &str, payload: Bytes) -> anyhow::Result<()> {
        anyhow::ensure!(
            *self.inner.phase.borrow() == Phase::Running,
            "the embedded MQTT broker is shutting down"
        );
        anyhow::ensure!(
            !topic.is_empty()
                && topic.len() <= usize::from(u16::MAX)
                && !topic.contains(['+', '#', '\0']),
            "invalid MQTT topic name {topic:?}"
        );
        let message = CodecPublish {
            dup: false,
            retain: false,
            qos: QoS::AtLeastOnce,
            topic: topic.into(),
            packet_id: None,
            payload: payload.clone(),
            // Present (though empty) so that MQTT 5 subscribers get their subscription ids:
            // rmqtt puts them only into a message that has properties.
            properties: Some(PublishProperties::default()),
        };
        let message = Publish::from(message).create_time(rmqtt::utils::timestamp_millis());
        // No message store and no retain storage: rmqtt wants no expiry for those.
        SessionState::forwards(&self.scx, self.from.clone(), message, false, None)
            .await
            .with_context(|| format!("cannot publish to the embedded broker on {topic}"))?;

        if self.inner.functions.matches_any(topic) {
            let chained = Chained {
                topic: topic.to_owned(),
                payload,
            };
            if let Err(error) = self.chain.try_send(chained) {
                let refusal = match error {
                    mpsc::error::TrySendError::Full(_) => Refusal::RelayFull,
                    mpsc::error::TrySendError::Closed(_) => Refusal::ShuttingDown,
                };
                self.inner.lost_internal(topic, Origin::Chained, refusal);
            }
        }
        Ok(())
    }
}

impl std::fmt::Debug for BrokerPublisher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BrokerPublisher")
            .field("from", &self.from)
            .finish_non_exhaustive()
    }
}

impl EmbeddedBroker {
    /// Starts rmqtt in this process on `listen` (TCP, MQTT 3.1, 3.1.1 and 5), accepting any
    /// client, with packets up to `max_message_size` bytes of payload plus room for any topic.
    ///
    /// Every QoS 0/1/2 PUBLISH from a client whose topic triggers one of `functions` (read
    /// per message: the set may change while it runs) is sent into `deliveries` as a
    /// [`Delivery`] with an [`Ack::waiter`], and its PUBACK (PUBREC) is sent only after the
    /// outcome is committed; a message dropped uncommitted closes the client's
    /// connection without acknowledgement (see the module docs). Other messages are routed as
    /// by any broker. Runs on the caller's tokio runtime; port 0 picks a free port (see
    /// [`EmbeddedBroker::local_addr`]).
    pub async fn start(
        config: &crate::config::EmbeddedConfig,
        max_message_size: usize,
        retained: Option<(Vec<crate::store::Retained>, crate::store::RetainedMessages)>,
        functions: Arc<Registry>,
        deliveries: mpsc::Sender<Delivery>,
        metrics: Arc<Metrics>,
    ) -> anyhow::Result<EmbeddedBroker> {
        let crate::config::EmbeddedConfig {
            listen,
            tls,
            access,
            limits,
        } = config;
        let listen = *listen;
        let max_packet = max_message_size.saturating_add(PACKET_OVERHEAD);
        anyhow::ensure!(
            max_packet <= MQTT_MAX_PACKET,
            "max message size {max_message_size} is larger than MQTT allows ({} bytes)",
            MQTT_MAX_PACKET - PACKET_OVERHEAD
        );
        let max_packet = u32::try_from(max_packet).context("max message size out of range")?;
        let peers = Arc::new(front::Peers::default());
        let gate = Arc::new(access::Gate::new(
            access.clone(),
            metrics.clone(),
            peers.clone(),
        )?);

        let scx = ServerContext::new()
            // rmqtt would refuse new connections while the 1-min load average exceeds 80 or the
            // CPU load 90 %, and samples the CPU in a background task. On a gateway busy
            // running functions that would lock devices out; backpressure is the pipeline's job.
            .busy_check_enable(false)
            .mqtt_max_sessions(MAX_SESSIONS)
            .build()
            .await;
        // Reconnects take their session over whatever state the old one is in, and what is
        // routed to subscribers stays within `memory_limit`.
        let budget = Arc::new(sessions::Budget {
            limit: limits.memory_limit,
            metrics: metrics.clone(),
        });
        let client_limits = Arc::new(limits::Limits::new(limits, scx.clone(), metrics.clone()));
        *scx.extends.shared_mut().await = Box::new(sessions::Sessions {
            table: rmqtt::shared::DefaultShared::new(Some(scx.clone())),
            budget: budget.clone(),
            cx: Arc::new(sessions::Around {
                scx: scx.clone(),
                gate: gate.clone(),
                queues: Arc::new(sessions::Queues::new(
                    limits.max_queued_bytes,
                    limits.memory_limit,
                    metrics.clone(),
                )),
                limits: client_limits.clone(),
            }),
        });
        let retainer =
            retain::Retainer::new(retained.as_ref().map(|r| r.1.clone()), budget, gate.clone());
        if let Some((kept, _)) = retained {
            let loaded = retainer
                .load(kept, &retain::loaded_from(scx.node.id()))
                .await
                .context("cannot load the retained messages")?;
            debug!(loaded, "retained messages loaded");
        }
        *scx.extends.retain_mut().await = Box::new(retainer);
        *scx.extends.shared_subscription_mut().await = Box::new(share::InTurn::new(gate.clone()));
        *scx.extends.fitter_mgr_mut().await = Box::new(fitter::Fitters {
            max_keepalive: limits.max_keepalive,
        });

        let (phase, phase_rx) = watch::channel(Phase::Running);
        let inner = Arc::new(Inner {
            functions,
            deliveries: Mutex::new(Some(deliveries)),
            phase: phase_rx,
            in_flight: AtomicUsize::new(0),
            metrics: metrics.clone(),
            drop_warnings: crate::throttle::Throttle::new(1, DROP_WARN_INTERVAL),
            clients: Clients::default(),
            gate,
            limits: client_limits,
            peers: peers.clone(),
        });

        let register = scx.extends.hook_mgr().register();
        for typ in [
            Type::MessagePublishCheckAcl,
            Type::MessagePublish,
            Type::MessageDropped,
            Type::SessionCreated,
            Type::ClientConnect,
            Type::ClientAuthenticate,
            Type::ClientConnected,
            Type::ClientDisconnected,
            Type::ClientSubscribeCheckAcl,
        ] {
            register
                .add(typ, Box::new(EdgefnHook(Arc::clone(&inner))))
                .await;
        }
        register.start().await;

        // Devices connect to the front, which relays each connection to rmqtt on loopback.
        let devices =
            bind_front(listen).with_context(|| format!("cannot listen for MQTT on {listen}"))?;
        let local_addr = devices.local_addr()?;
        let loopback = SocketAddr::from((std::net::Ipv4Addr::LOCALHOST, 0));
        let listener = listener_builder(LISTENER_NAME, loopback, max_packet, limits)
            .bind()
            .context("cannot open the built-in broker's loopback listener")?
            .tcp()?;
        let front = Arc::new(front::Front::new(peers, limits, Arc::clone(&inner)));
        let mut fronts = vec![Arc::clone(&front).run(
            devices,
            listener.local_addr()?,
            front::Relay::HoldingAcks,
        )];
        let mut server = MqttServer::new(scx.clone()).listener_by_id(listener, LISTENER_ID);
        let mut tls_addr = None;
        if let Some(tls) = &tls {
            let path = |p: &Option<std::path::PathBuf>| {
                p.as_ref().map(|p| p.to_string_lossy().into_owned())
            };
            let devices = bind_front(tls.listen)
                .with_context(|| format!("cannot listen for MQTT over TLS on {}", tls.listen))?;
            tls_addr = Some(devices.local_addr()?);
            let listener = listener_builder(TLS_LISTENER_NAME, loopback, max_packet, limits)
                .tls_cert(path(&tls.files.cert_file))
                .tls_key(path(&tls.files.key_file))
                .tls_client_ca_certs(path(&tls.files.ca_file))
                .tls_cross_certificate(tls.require_certificate)
                .cert_cn_as_username(tls.use_identity_as_username)
                // The gate reads the certificate: only this listener's clients have one.
                .collect_cert_info(tls.use_identity_as_username)
                .bind()
                .context("cannot open the built-in broker's loopback TLS listener")?
                .tls()
                .context("cannot set up the TLS listener (local.cert_file, key_file, ca_file)")?;
            fronts.push(Arc::clone(&front).run(
                devices,
                listener.local_addr()?,
                front::Relay::Bytes,
            ));
            server = server.listener_by_id(listener, TLS_LISTENER_ID);
        }
        let server = server.build();
        let server_task = tokio::spawn(async move {
            // `run` returns only when every accept loop has ended, which they never do; the
            // task is aborted by `shutdown`. (`MqttServer::start` is not used: on error it
            // calls `std::process::exit`.)
            let (stopped, _) = tokio::join!(server.run(), futures_util::future::join_all(fronts));
            if let Err(error) = stopped {
                warn!(%error, "embedded MQTT broker stopped");
            }
        });

        let (chain, chain_rx) = mpsc::channel(CHAIN_QUEUE_CAPACITY);
        let relay_task = tokio::spawn(relay_chained(Arc::clone(&inner), chain_rx));

        let from = MsgFrom::from_system(Id::new(
            scx.node.id(),
            0,
            None,
            None,
            ClientId::from_static(EDGEFN_CLIENT_ID),
            None,
        ));

        debug!(%local_addr, max_packet_size = max_packet, "embedded MQTT broker started");
        Ok(EmbeddedBroker {
            publisher: BrokerPublisher {
                scx,
                inner,
                chain,
                from,
            },
            local_addr,
            tls_addr,
            phase,
            server_task,
            relay_task,
        })
    }

    /// The address the broker listens on (with the real port if 0 was asked for).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The TLS listener's address, if there is one (with the real port).
    pub fn tls_addr(&self) -> Option<SocketAddr> {
        self.tls_addr
    }

    /// Connections and sessions (connected, and persistent ones of offline clients) now.
    pub fn clients(&self) -> BrokerClients {
        self.publisher.clients()
    }

    /// Publishes a message from edgefn itself to the broker's subscribers, at QoS 1 (each
    /// subscriber gets it at the lower of that and its subscription's QoS). Best effort: `Ok`
    /// when no one is subscribed. It never waits for the pipeline; a message whose topic
    /// matches a trigger is also handed to the pipeline (chaining), see the module docs.
    pub async fn publish(&self, topic: &str, payload: Bytes) -> anyhow::Result<()> {
        self.publisher.publish(topic, payload).await
    }

    /// Re-reads `[local] password_file` and `acl_file` (SIGHUP): applied if
    /// both are right, else the rules before stay; clients whose password
    /// entry changed are disconnected, the others keep their connections.
    pub async fn reload_access(&self) {
        let publisher = &self.publisher;
        publisher.inner.gate.reload(&publisher.scx).await;
    }

    /// A cloneable handle whose `publish` is this broker's [`EmbeddedBroker::publish`]. It
    /// fails once shutdown has begun.
    pub fn publisher(&self) -> BrokerPublisher {
        self.publisher.clone()
    }

    /// Stops accepting connections and shuts the broker down:
    ///
    /// 1. the listening socket is closed; device publishes on trigger topics arriving from now
    ///    on, or still waiting for room in `deliveries`, are refused (no acknowledgement); the
    ///    broker's sender into `deliveries` is dropped, so the pipeline can drain;
    /// 2. publishes already handed to the pipeline get up to 10 s (`COMMIT_GRACE`) to be
    ///    committed, and are then acknowledged as usual; those still waiting are refused;
    /// 3. every session is kicked (connected clients are disconnected, MQTT 5 ones with reason
    ///    0x98 Administrative action) and discarded.
    pub async fn shutdown(mut self) {
        self.phase.send_replace(Phase::Closing);
        self.publisher.inner.close_deliveries();
        self.server_task.abort();
        let _ = (&mut self.server_task).await;

        let deadline = tokio::time::Instant::now() + COMMIT_GRACE;
        while self.publisher.inner.in_flight.load(Ordering::Relaxed) > 0
            && tokio::time::Instant::now() < deadline
        {
            tokio::time::sleep(SHUTDOWN_POLL).await;
        }
        let uncommitted = self.publisher.inner.in_flight.load(Ordering::Relaxed);
        if uncommitted > 0 {
            info!(
                uncommitted,
                grace = ?COMMIT_GRACE,
                "device messages not committed in time at shutdown: not acknowledged, \
                 devices will resend"
            );
        }
        self.phase.send_replace(Phase::Stopped);

        let entries: Vec<Box<dyn Entry>> =
            self.publisher.scx.extends.shared().await.iter().collect();
        let sessions = entries.len();
        let mut kicks = JoinSet::new();
        for entry in entries {
            kicks.spawn(async move {
                match entry.try_lock().await {
                    // Clean start, clear subscriptions, administrative: the session ends for
                    // good (rmqtt cleans up an admin-kicked session instead of keeping it
                    // offline).
                    Ok(mut entry) => {
                        if let Err(error) = entry.kick(true, true, true).await {
                            debug!(%error, "kicking a session at shutdown failed");
                        }
                    }
                    Err(error) => debug!(%error, "locking a session at shutdown failed"),
                }
            });
        }
        let all_closed = tokio::time::timeout(SHUTDOWN_GRACE, async {
            while kicks.join_next().await.is_some() {}
        })
        .await;
        if all_closed.is_err() {
            warn!(sessions, grace = ?SHUTDOWN_GRACE, "some MQTT sessions did not close in time");
        }
        // The relay saw `Closing` and ended after counting what it still held.
        let _ = (&mut self.relay_task).await;
        let m = &self.publisher.inner.metrics;
        info!(
            sessions,
            refused = m.broker_refused.load(Ordering::Relaxed),
            dropped_to_subscribers = m.broker_dropped_to_subscribers.load(Ordering::Relaxed),
            lost_internal = m.broker_lost_internal.load(Ordering::Relaxed),
            "embedded MQTT broker stopped"
        );
    }
}

/// The listening socket devices connect to (the front's), on `addr`.
fn bind_front(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    // Restarting under systemd must not fail on connections left in TIME_WAIT.
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

/// A listener with edgefn's settings (see the constants above), on `addr`.
fn listener_builder(
    name: &str,
    addr: SocketAddr,
    max_packet: u32,
    limits: &crate::config::BrokerLimits,
) -> Builder {
    Builder::new()
        .name(name)
        .laddr(addr)
        // Restarting under systemd must not fail on connections left in TIME_WAIT.
        .reuseaddr(Some(true))
        // A PUBACK is a small write after a wait: Nagle's algorithm would hold it back.
        .nodelay(true)
        // Every CONNECT goes to the gate, anonymous ones included.
        .allow_anonymous(false)
        .max_packet_size(max_packet)
        .max_inflight(NonZeroU16::new(MAX_INFLIGHT).unwrap_or(NonZeroU16::MIN))
        // Messages queued per subscriber behind its in-flight window (and for a persistent
        // session while it is offline). Beyond it rmqtt drops messages, which edgefn counts.
        .max_mqueue_len(limits.max_queued_messages)
        // No rate limit on delivery from the queues (rmqtt's default, made explicit).
        .mqueue_rate_limit(NonZeroU32::MAX, Duration::from_secs(1))
        .max_qos_allowed(QoS::ExactlyOnce)
        .message_expiry_interval(MESSAGE_EXPIRY)
        .session_expiry_interval(SESSION_EXPIRY)
        .max_session_expiry_interval(MAX_SESSION_EXPIRY)
        .message_retry_interval(MESSAGE_RETRY_INTERVAL)
        .handshake_timeout(HANDSHAKE_TIMEOUT)
        .send_timeout(SEND_TIMEOUT)
        .max_topic_aliases(MAX_TOPIC_ALIASES)
}

impl std::fmt::Debug for EmbeddedBroker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmbeddedBroker")
            .field("local_addr", &self.local_addr)
            .field("phase", &*self.phase.borrow())
            .field("clients", &self.clients())
            .finish_non_exhaustive()
    }
}

impl Drop for EmbeddedBroker {
    /// A broker dropped without `shutdown` stops accepting connections and stops waiting
    /// for commits; open connections end when their clients go away.
    fn drop(&mut self) {
        self.phase.send_replace(Phase::Stopped);
        self.publisher.inner.close_deliveries();
        self.server_task.abort();
        self.relay_task.abort();
    }
}
