//! The plain listener's front: edgefn's own accept loop, relaying each device's connection
//! to rmqtt over loopback.
//!
//! rmqtt handles a connection's packets one at a time and sends a PUBACK as soon as the
//! publish hook returns (see the module docs of `embedded`), so a hook that waited for the
//! commit would give each connection one message per commit. Behind the front the hook
//! returns as soon as the message is in the pipeline: it leaves the commit's waiter with the
//! connection ([`Peer::hold`]), under the message's packet id. The front reads rmqtt's
//! answers in order and holds each PUBACK or PUBREC that has a waiter, and everything rmqtt
//! sends after it, until that commit is done. A connection's publishes share commits; its
//! acknowledgements still go out in the order of its publishes and only after the commit
//! that holds each.
//!
//! Why a packet id is enough to match: the hook leaves the waiter before rmqtt writes the
//! acknowledgement, and rmqtt writes the acknowledgements of a connection in the order of its
//! publishes. An acknowledgement with packet id N waits for every message held under N when
//! the front reads it: its own message is among them, or was taken by an earlier
//! acknowledgement with id N, which waited for its commit and went out before. So nothing is
//! let out before the commit of the publish it answers; a client that reuses an id early
//! only waits longer.
//!
//! What rmqtt sees: a connection from 127.0.0.1, the front's own port. The front keeps the
//! device's address for logs ([`Peers::device_addr`]). The hook takes the front's path for a
//! session on the plain listener whose relay is open and was opened before the session began
//! ([`Peers::relayed`]); any other session of that listener (its relay ended, or a connection
//! made straight to rmqtt's loopback port) has nobody to acknowledge to, and its messages
//! are refused with the connection.
//!
//! A message given up (its device closed the connection, came back on another, or let its
//! keep-alive pass before the commit) is taken out of the pipeline
//! ([`crate::ingest::AckWaiter::abandon`]) with every message held behind it; the connection
//! closes without their acknowledgements and the device sends them again. A message a commit
//! already has is acknowledged once committed.
//!
//! rmqtt's loopback listeners take only logins that came through a relay
//! ([`Peers::relays_login`]): a local process connecting to them straight is refused
//! (CONNACK Not authorized), so it cannot take a device's session over.
//!
//! Before a client logs in, the front bounds its sockets, for both listeners together: at
//! most `max_connections_per_address` open from one IP address, and `max_connections` +
//! [`LOGIN_SOCKETS`] in all; one more is closed as it opens, counted and logged. rmqtt
//! closes a connection that sent no CONNECT within its handshake timeout.
//!
//! The TLS listener's connections pass the front too, for these bounds, but as bytes
//! ([`Relay::Bytes`]): rmqtt ends TLS (and reads the client's certificate), so the front
//! cannot see their packets, and the hook waits for each of their commits itself.

use std::collections::VecDeque;
use std::io;
use std::net::IpAddr;

use bytes::{Buf, BytesMut};
use tokio::io::AsyncWriteExt;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};

use super::*;
use crate::ingest::AckWaiter;

/// Sockets the front keeps open beyond `max_connections`: room for clients logging in, and
/// for those to be answered "Server unavailable" in a CONNACK rather than by a closed socket.
const LOGIN_SOCKETS: usize = 256;

/// Bytes read at once (more when a packet is larger). A connection's buffers are taken only
/// once it has something to read, and given back when a larger packet has passed: an idle
/// socket holds none.
const READ_CHUNK: usize = 4 * 1024;

/// File descriptors kept for all but the broker's sockets: SQLite's files, the upstream
/// and control connections, the metrics listener, deploys.
const OTHER_FILES: u64 = 128;

/// How long the accept loop pauses when accepting fails (out of file descriptors).
const ACCEPT_PAUSE: Duration = Duration::from_millis(100);

/// MQTT packet types whose packet id may have a held waiter.
const PUBACK: u8 = 4;
const PUBREC: u8 = 5;

/// The connections the front relays now, by rmqtt's listener and the port of the front's
/// own connection to it (the remote port rmqtt sees).
#[derive(Default)]
pub(super) struct Peers {
    /// Relayed connections.
    relays: Mutex<HashMap<(ListenerId, u16), Arc<Peer>>>,
    /// Sockets open now, on both listeners.
    open: Mutex<Open>,
}

impl Peers {
    /// Sockets open now on the broker's listeners, logged in or not.
    pub(super) fn sockets(&self) -> usize {
        self.open
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .total
    }

    /// The relay a session's connection came through: open, and opened before the session
    /// began (a session of an earlier connection from a reused port has none).
    fn relay_of(&self, id: &Id) -> Option<Arc<Peer>> {
        let addr = id.remote_addr?;
        let relays = self.relays.lock().unwrap_or_else(PoisonError::into_inner);
        relays
            .get(&(id.lid, addr.port()))
            .filter(|peer| id.create_time >= peer.opened_ms)
            .cloned()
    }

    /// How a session's acknowledgements reach its device.
    pub(super) fn relayed(&self, id: &Id) -> Relayed {
        if id.lid != LISTENER_ID {
            return Relayed::Waiting;
        }
        self.relay_of(id).map_or(Relayed::Gone, Relayed::Holding)
    }

    /// Whether a login came through one of the front's relays. rmqtt's loopback listeners
    /// take no other: a local process connecting to them straight could otherwise take a
    /// device's session over.
    pub(super) fn relays_login(&self, id: &Id) -> bool {
        self.relay_of(id).is_some()
    }

    /// The address of the device a session's connection came from.
    pub(super) fn device_addr(&self, id: &Id) -> Option<SocketAddr> {
        let addr = id.remote_addr?;
        let relays = self.relays.lock().unwrap_or_else(PoisonError::into_inner);
        Some(
            relays
                .get(&(id.lid, addr.port()))
                .map_or(addr, |peer| peer.addr),
        )
    }
}

/// How a session's acknowledgements reach its device.
pub(super) enum Relayed {
    /// Through this relay, which holds each until its commit.
    Holding(Arc<Peer>),
    /// Its relay has ended (or it never had one): nobody receives them.
    Gone,
    /// As rmqtt writes them: the hook waits for each commit (the TLS listener).
    Waiting,
}

/// One relayed connection.
pub(super) struct Peer {
    /// The device's address.
    addr: SocketAddr,
    /// When the front connected to rmqtt for it (ms since the epoch, rmqtt's clock).
    opened_ms: i64,
    /// Acknowledgements to hold, in the order their publishes were handled.
    held: Mutex<VecDeque<Held>>,
}

impl Peer {
    /// Holds the acknowledgement of `held`'s packet id until its commit.
    pub(super) fn hold(&self, held: Held) {
        self.held
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push_back(held);
    }

    /// Takes the held messages with `packet_id` into `into` (in order).
    fn take(&self, packet_id: u16, into: &mut Vec<Held>) {
        let mut held = self.held.lock().unwrap_or_else(PoisonError::into_inner);
        let mut at = 0;
        while at < held.len() {
            if held[at].packet_id == packet_id {
                into.extend(held.remove(at));
            } else {
                at += 1;
            }
        }
    }

    /// Takes every held message out (dropping them gives them up).
    fn release(&self) -> VecDeque<Held> {
        std::mem::take(&mut *self.held.lock().unwrap_or_else(PoisonError::into_inner))
    }
}

/// A device's message in the pipeline whose acknowledgement waits for its commit.
pub(super) struct Held {
    /// Its packet id.
    pub(super) packet_id: u16,
    /// Its commit.
    pub(super) waiter: AckWaiter,
    /// What tells that the device came back on another connection.
    pub(super) device: DeviceWait,
    /// Its client id and topic, for the log.
    pub(super) client_id: ClientId,
    pub(super) topic: rmqtt::types::TopicName,
    /// Counts it as in flight, for shutdown's grace.
    pub(super) in_flight: InFlight,
    /// Whether its outcome is known (else dropping it gives it up).
    pub(super) settled: bool,
}

impl Held {
    /// Waits for the commit; `Err` when the message will not be acknowledged: then the
    /// connection must close.
    async fn committed(mut self, inner: &Inner) -> Result<(), Refusal> {
        let outcome = match inner.commit_of(&mut self.waiter, &mut self.device).await {
            Ok(()) => Ok(()),
            Err(Unwaited::Dropped) => Err(Refusal::Dropped),
            Err(Unwaited::Stopped) => {
                // Its connection closes now: out of the pipeline, unless a commit has it.
                if self.waiter.abandon() {
                    Metrics::add(&inner.metrics.abandoned, 1);
                }
                Err(Refusal::ShuttingDown)
            }
            Err(Unwaited::GaveUp(_)) => Err(Refusal::GaveUp),
        };
        self.settled = true;
        if let Err(refusal) = outcome {
            inner.not_acknowledged(&self.client_id, &self.topic, refusal);
        }
        outcome
    }
}

impl Drop for Held {
    /// A message whose connection ended before its commit: taken out of the pipeline if no
    /// commit has it yet (the device sends it again).
    fn drop(&mut self) {
        if !self.settled && self.waiter.abandon() {
            let inner = self.in_flight.inner();
            Metrics::add(&inner.metrics.abandoned, 1);
            inner.not_acknowledged(&self.client_id, &self.topic, Refusal::GaveUp);
        }
    }
}

/// How the front relays a listener's connections.
#[derive(Debug, Clone, Copy)]
pub(super) enum Relay {
    /// MQTT in the clear (the plain listener): acknowledgements are held until their commit.
    HoldingAcks,
    /// TLS, which rmqtt ends (the TLS listener): bytes as they come; the hook waits for each
    /// commit.
    Bytes,
}

impl Relay {
    /// rmqtt's listener for these connections.
    fn listener(self) -> ListenerId {
        match self {
            Relay::HoldingAcks => LISTENER_ID,
            Relay::Bytes => TLS_LISTENER_ID,
        }
    }
}

/// Counts the sockets open per address and in all.
#[derive(Default)]
struct Open {
    /// Per IP address.
    by_address: HashMap<IpAddr, usize>,
    /// In all.
    total: usize,
}

/// The accept loop of the plain listener and its bounds.
pub(super) struct Front {
    /// The relayed connections and open sockets (shared with the hook and the gate).
    peers: Arc<Peers>,
    /// `max_connections` + [`LOGIN_SOCKETS`].
    max_open: usize,
    /// `max_connections_per_address`.
    per_address: usize,
    /// State shared with the hook.
    inner: Arc<Inner>,
}

/// One open socket, counted in [`Front::open`] while it lives.
struct Admitted {
    /// The front.
    front: Arc<Front>,
    /// Its address.
    ip: IpAddr,
}

impl Drop for Admitted {
    fn drop(&mut self) {
        let mut open = self
            .front
            .peers
            .open
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        open.total -= 1;
        if let Some(n) = open.by_address.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                open.by_address.remove(&self.ip);
            }
        }
    }
}

/// Removes a peer from [`Peers`] when its relay ends, and gives up what it still holds.
struct Registered<'a> {
    /// The registry.
    peers: &'a Peers,
    /// The peer's key.
    key: (ListenerId, u16),
    /// The peer.
    peer: Arc<Peer>,
}

impl Drop for Registered<'_> {
    fn drop(&mut self) {
        let mut relays = self
            .peers
            .relays
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if relays
            .get(&self.key)
            .is_some_and(|peer| Arc::ptr_eq(peer, &self.peer))
        {
            relays.remove(&self.key);
        }
        drop(relays);
        drop(self.peer.release());
    }
}

impl Front {
    /// A front with `limits`, for either listener.
    pub(super) fn new(
        peers: Arc<Peers>,
        limits: &crate::config::BrokerLimits,
        inner: Arc<Inner>,
    ) -> Front {
        Front {
            peers,
            max_open: socket_budget(limits.max_connections.get() + LOGIN_SOCKETS),
            per_address: limits.max_connections_per_address.get(),
            inner,
        }
    }

    /// Accepts devices on `listener` until the task is aborted, relaying each to rmqtt's
    /// loopback listener `broker` ([`Relay`] says how).
    pub(super) async fn run(
        self: Arc<Self>,
        listener: TcpListener,
        broker: SocketAddr,
        how: Relay,
    ) {
        loop {
            let (socket, addr) = match listener.accept().await {
                Ok(accepted) => accepted,
                Err(error) => {
                    debug!(%error, "accepting an MQTT connection failed");
                    tokio::time::sleep(ACCEPT_PAUSE).await;
                    continue;
                }
            };
            let Some(admitted) = self.admit(addr) else {
                continue;
            };
            tokio::spawn(Arc::clone(&self).relay(socket, addr, admitted, broker, how));
        }
    }

    /// Counts a new socket, or refuses it (counted and logged) past a bound.
    fn admit(self: &Arc<Self>, addr: SocketAddr) -> Option<Admitted> {
        let ip = addr.ip();
        let refused = {
            let mut open = self
                .peers
                .open
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            let from_ip = open.by_address.get(&ip).copied().unwrap_or(0);
            if open.total >= self.max_open {
                Some(access::Refused::Connections)
            } else if from_ip >= self.per_address {
                Some(access::Refused::AddressConnections)
            } else {
                open.total += 1;
                *open.by_address.entry(ip).or_insert(0) += 1;
                None
            }
        };
        if let Some(why) = refused {
            self.inner.gate.refused(why, "", Some(addr), None, None);
            return None;
        }
        Some(Admitted {
            front: Arc::clone(self),
            ip,
        })
    }

    /// Relays one device's connection until either side closes it or the broker stops.
    async fn relay(
        self: Arc<Self>,
        device: TcpStream,
        addr: SocketAddr,
        _admitted: Admitted,
        broker: SocketAddr,
        how: Relay,
    ) {
        let opened_ms = rmqtt::utils::timestamp_millis();
        let broker = match TcpStream::connect(broker).await {
            Ok(broker) => broker,
            Err(error) => {
                warn!(%error, remote_addr = %addr, "cannot relay an MQTT connection to the broker");
                return;
            }
        };
        let Ok(port) = broker.local_addr().map(|a| a.port()) else {
            return;
        };
        // Nagle would hold back an acknowledgement written after a wait; the kernel's
        // keep-alive probes find devices gone behind a NAT (as rmqtt does on its sockets).
        let _ = device.set_nodelay(true);
        let _ = socket2::SockRef::from(&device).set_keepalive(true);
        let _ = broker.set_nodelay(true);
        let peer = Arc::new(Peer {
            addr,
            opened_ms,
            held: Mutex::new(VecDeque::new()),
        });
        let key = (how.listener(), port);
        self.peers
            .relays
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(key, Arc::clone(&peer));
        let (mut from_device, mut to_device) = device.into_split();
        let (mut from_broker, mut to_broker) = broker.into_split();
        // Dropped before the sockets: out of the registry before the port can be reused.
        let _registered = Registered {
            peers: &self.peers,
            key,
            peer: Arc::clone(&peer),
        };
        let back = async {
            match how {
                Relay::HoldingAcks => answers(from_broker, to_device, &peer, &self.inner).await,
                Relay::Bytes => pass(&mut from_broker, &mut to_device).await,
            }
        };
        tokio::select! {
            _ = pass(&mut from_device, &mut to_broker) => {}
            _ = back => {}
            () = self.inner.reached(Phase::Stopped) => {}
        }
    }
}

/// How many sockets the front may keep open: `wanted`, or fewer if the file limit cannot
/// hold three descriptors for each (the device's socket and both ends of its loopback
/// connection to rmqtt) beside [`OTHER_FILES`]. Raises the soft limit to the hard one first,
/// as systemd leaves it at 1,024 for services that set no `LimitNOFILE`.
fn socket_budget(wanted: usize) -> usize {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) else {
        return wanted;
    };
    let limit = if soft < hard && setrlimit(Resource::RLIMIT_NOFILE, hard, hard).is_ok() {
        hard
    } else {
        soft
    };
    let fit = usize::try_from(limit.saturating_sub(OTHER_FILES) / 3).unwrap_or(usize::MAX);
    if fit < wanted {
        warn!(
            file_limit = limit,
            sockets = fit,
            wanted,
            "the file limit (LimitNOFILE) holds fewer broker sockets than local.max_connections \
             + 256: beyond them, new connections are closed as they open"
        );
    }
    fit.min(wanted).max(1)
}

/// Copies rmqtt's packets to the device, holding each acknowledgement that has a waiter
/// (and what follows it) until its commit. Ends when rmqtt closes the connection, a write
/// fails, or a held message will not be acknowledged.
async fn answers(
    mut broker: OwnedReadHalf,
    mut device: OwnedWriteHalf,
    peer: &Peer,
    inner: &Inner,
) -> io::Result<()> {
    let mut buf = BytesMut::new();
    let mut waits = Vec::new();
    loop {
        if read(&mut broker, &mut buf).await? == 0 {
            return Ok(());
        }
        let mut sent = 0;
        let mut at = 0;
        while let Some(packet) = next_packet(&buf[at..])? {
            if let Some(id) = packet.acknowledges {
                peer.take(id, &mut waits);
            }
            if !waits.is_empty() {
                send(&mut device, &buf[sent..at]).await?;
                sent = at;
                for held in waits.drain(..) {
                    if held.committed(inner).await.is_err() {
                        return Ok(());
                    }
                }
            }
            at += packet.len;
        }
        send(&mut device, &buf[sent..at]).await?;
        buf.advance(at);
        if buf.is_empty() && buf.capacity() > READ_CHUNK {
            buf = BytesMut::new();
        }
    }
}

/// Copies bytes from `from` to `to` until `from` ends or either fails.
async fn pass(from: &mut OwnedReadHalf, to: &mut OwnedWriteHalf) -> io::Result<()> {
    let mut buf = BytesMut::new();
    while read(from, &mut buf).await? > 0 {
        send(to, &buf).await?;
        buf.clear();
        if buf.capacity() > READ_CHUNK {
            buf = BytesMut::new();
        }
    }
    Ok(())
}

/// Writes `bytes` to `to`, failing if that takes longer than rmqtt allows its own writes.
async fn send(to: &mut OwnedWriteHalf, bytes: &[u8]) -> io::Result<()> {
    match tokio::time::timeout(SEND_TIMEOUT, to.write_all(bytes)).await {
        Ok(written) => written,
        Err(_) => Err(io::ErrorKind::TimedOut.into()),
    }
}

/// Reads what `from` has into `buf` once it has something (`0`: it ended), taking room in
/// `buf` only then.
async fn read(from: &mut OwnedReadHalf, buf: &mut BytesMut) -> io::Result<usize> {
    loop {
        from.readable().await?;
        buf.reserve(READ_CHUNK);
        match from.try_read_buf(buf) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            read => return read,
        }
    }
}

/// A complete MQTT packet at the start of a buffer.
#[derive(Debug, PartialEq, Eq)]
struct Packet {
    /// Its length, fixed header included.
    len: usize,
    /// The packet id of a PUBACK or PUBREC.
    acknowledges: Option<u16>,
}

/// The packet at the start of `bytes`, if it is complete.
fn next_packet(bytes: &[u8]) -> io::Result<Option<Packet>> {
    let Some(&first) = bytes.first() else {
        return Ok(None);
    };
    let mut remaining = 0usize;
    let mut header = 1;
    loop {
        let Some(&byte) = bytes.get(header) else {
            return Ok(None);
        };
        remaining |= usize::from(byte & 0x7f) << (7 * (header - 1));
        header += 1;
        if byte & 0x80 == 0 {
            break;
        }
        if header > 4 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "malformed remaining length from the broker",
            ));
        }
    }
    let len = header + remaining;
    if bytes.len() < len {
        return Ok(None);
    }
    let acknowledges = match first >> 4 {
        PUBACK | PUBREC => bytes
            .get(header..header + 2)
            .map(|id| u16::from_be_bytes([id[0], id[1]])),
        _ => None,
    };
    Ok(Some(Packet { len, acknowledges }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packets_are_split_and_acknowledgements_named() {
        // PUBACK 7 (3.1.1), PUBREC 0x0102 with an MQTT 5 reason, PINGRESP.
        let stream = [0x40, 2, 0, 7, 0x50, 3, 1, 2, 0, 0xd0, 0];
        let mut at = 0;
        let mut seen = Vec::new();
        while let Some(p) = next_packet(&stream[at..]).unwrap() {
            at += p.len;
            seen.push(p);
        }
        assert_eq!(at, stream.len());
        assert_eq!(
            seen,
            [
                Packet {
                    len: 4,
                    acknowledges: Some(7)
                },
                Packet {
                    len: 5,
                    acknowledges: Some(0x0102)
                },
                Packet {
                    len: 2,
                    acknowledges: None
                },
            ]
        );
    }

    #[test]
    fn an_incomplete_packet_waits_for_more() {
        // A PUBLISH of 200 bytes: two length bytes, cut short.
        let mut publish = vec![0x30, 0xc8, 0x01];
        publish.extend(std::iter::repeat_n(0, 199));
        assert_eq!(next_packet(&publish).unwrap(), None);
        publish.push(0);
        assert_eq!(
            next_packet(&publish).unwrap(),
            Some(Packet {
                len: 203,
                acknowledges: None
            })
        );
        assert_eq!(next_packet(&[0x40]).unwrap(), None);
    }

    #[test]
    fn a_length_of_more_than_four_bytes_is_an_error() {
        assert!(next_packet(&[0x30, 0xff, 0xff, 0xff, 0xff, 0x01]).is_err());
    }
}
