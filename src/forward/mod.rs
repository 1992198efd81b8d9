//! Forward: the outbox, in order, to the upstream broker; delete on PUBACK.
//!
//! SQLite is the source of truth. rumqttc's `publish()` returning Ok only
//! means *queued*; the packet id appears later as
//! `Event::Outgoing(Outgoing::Publish(pkid))` and the broker's answer as
//! `Incoming(PubAck(pkid))`. So the forwarder:
//!
//! - publishes records in `seq` order at QoS 1 with at most `in_flight`
//!   awaiting their PUBACK, each with the MQTT 5 user property
//!   `edgefn-id = <gateway id>:<incarnation>:<seq>` ([`record_id`]) so the
//!   cloud side can drop duplicates;
//! - takes records from the store's in-memory recent tail while it keeps
//!   up, and reads SQLite only to catch up (after a reconnect, a restart or
//!   an overflow of the tail), in batches of at least half a window;
//! - learns each record's packet id from the `Outgoing::Publish` events,
//!   which come in the order the publishes were queued, and keeps the
//!   `pkid → record` map for the current connection only;
//! - reports a record for deletion only after its PUBACK, in batches; the
//!   store's writer deletes them in its next transaction;
//! - builds a fresh client for every connection and, after every CONNACK,
//!   publishes again every record still in the outbox, from the oldest.
//!   Records sent before but not acknowledged are counted as `resent`
//!   (possible duplicates upstream);
//! - keeps a record the broker refuses for who sends it (not authorised,
//!   quota exceeded, …) and sends it again later, holding back the later
//!   records of its topic meanwhile (`refusals`); moves a record the
//!   broker refuses for what it is (an invalid topic name or payload
//!   format), or a topic it kept refusing while it accepted others, to the
//!   dead letters, rather than retrying it forever or dropping it
//!   silently; the same for a record it can never take (larger than the
//!   Maximum Packet Size the broker announced, or a topic that with the
//!   prefix is longer than MQTT allows);
//! - watches for a record that ends the connection whenever it is sent (a
//!   broker that enforces a limit or refuses by disconnecting): after a
//!   connection is lost while a record is the oldest unacknowledged, the
//!   next connection sends that record alone first; when [`POISON_STRIKES`]
//!   connections in a row end that way, the record's topic is refused as
//!   by a PUBACK (`refusals`): held back while the rest flows, tried
//!   again later, and given up to the dead letters only if the upstream
//!   keeps refusing it while accepting other topics;
//! - at shutdown stops sending, waits up to [`DRAIN_GRACE`] for the PUBACKs
//!   of what is in flight and reports those records delivered, so a clean
//!   stop sends nothing twice (what is still unacknowledged then is sent
//!   again at the next start).

mod refusals;

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rumqttc::Outgoing;
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::{Packet, PubAck, PublishProperties};
use rumqttc::v5::{AsyncClient, Event, MqttOptions};
use tokio::sync::{Notify, watch};

use crate::config::UpstreamConfig;
use crate::metrics::{Metrics, event};
use crate::shutdown::Backoff;
use crate::store::{Outbox, Reader, Record};
use refusals::{Cause, Refusals, Verdict};

pub use refusals::MAX_REFUSED_TOPICS;

/// Acknowledged records are reported for deletion once this many have
/// gathered, or at the next [`FLUSH_INTERVAL`] tick, whichever comes first:
/// while devices are quiet, each report costs the writer a transaction, so
/// batching them saves flash writes.
const DELETE_BATCH: usize = 256;

/// How often acknowledged records are reported when fewer than
/// [`DELETE_BATCH`] gathered, and how often the outbox is polled as a
/// fallback to the commit notification.
const FLUSH_INTERVAL: Duration = Duration::from_millis(100);

/// Connections in a row that may end while the same record is the oldest
/// unacknowledged before that record is given up as the cause (the last
/// ones with it sent alone). Three: one lost connection is an outage, two
/// with the record alone on the wire are a pattern, three are proof
/// enough to stop one record from holding back all the others.
pub const POISON_STRIKES: u32 = 3;

/// Longest a clean shutdown waits for the PUBACKs of records in flight.
pub const DRAIN_GRACE: Duration = Duration::from_secs(3);

/// Longest topic MQTT can carry (its length is a 16-bit field).
const MAX_TOPIC_LEN: usize = 65_535;

/// Most records one fill looks at: records held back (their topic is
/// refused) take no room in the window, so a long run of them is gone
/// through over several ticks rather than in one go.
const SCAN_PER_FILL: usize = 4096;

/// Refusals logged per minute (all are counted).
static REFUSALS_LOGGED: crate::throttle::Throttle = crate::throttle::Throttle::per_minute(5);

/// Records moved to the dead letters logged per minute (each is counted in
/// `upstream_rejected` and kept in the dead letters with its reason).
static REJECTIONS_LOGGED: crate::throttle::Throttle = crate::throttle::Throttle::per_minute(10);

/// A record's stable id: `<gateway id>:<incarnation>:<seq>`, the
/// incarnation in 16 hex digits (see the store's invariant 5).
pub fn record_id(gateway_id: &str, incarnation: u64, seq: i64) -> String {
    format!("{gateway_id}:{incarnation:016x}:{seq}")
}

/// The MQTT 5 user property carrying a record's stable id.
pub const ID_PROPERTY: &str = "edgefn-id";

/// A published record awaiting its PUBACK.
#[derive(Debug, Clone)]
struct InFlight {
    /// Outbox position.
    seq: i64,
    /// Its topic, as emitted (without the prefix).
    topic: String,
}

/// The forwarding task.
pub struct Forwarder {
    /// Upstream broker and prefix.
    pub config: UpstreamConfig,
    /// For record ids.
    pub gateway_id: String,
    /// The buffer's incarnation, for record ids.
    pub incarnation: u64,
    /// The outbox (blocking calls run on the blocking pool).
    pub reader: Arc<Mutex<Reader>>,
    /// Records just committed (in memory), and where PUBACKed ones go.
    pub outbox: Outbox,
    /// Woken after commits that added records.
    pub committed: Arc<Notify>,
    /// Gateway counters.
    pub metrics: Arc<Metrics>,
}

/// Per-connection state.
struct Connection {
    /// The connection's client.
    client: AsyncClient,
    /// Published, packet id not yet known (in publish order).
    unnumbered: VecDeque<InFlight>,
    /// Packet id → record, this connection only.
    by_pkid: HashMap<u16, InFlight>,
    /// Where the next fill reads from: the last record looked at.
    cursor: i64,
    /// Highest seq published on this connection.
    highest_sent: i64,
    /// Whether CONNACK arrived.
    connected: bool,
    /// The broker's Maximum Packet Size (CONNACK), if it announced one.
    max_packet: Option<u32>,
    /// Sending only the suspect record (see [`Suspect`]) until its PUBACK.
    probing: bool,
}

impl Connection {
    fn in_flight(&self) -> usize {
        self.unnumbered.len() + self.by_pkid.len()
    }

    /// Whether record `seq` was sent on this connection and awaits its
    /// PUBACK.
    fn sent(&self, seq: i64) -> bool {
        seq <= self.highest_sent
            && self
                .unnumbered
                .iter()
                .chain(self.by_pkid.values())
                .any(|r| r.seq == seq)
    }

    /// The oldest record sent on this connection and not acknowledged.
    fn oldest_unacknowledged(&self) -> Option<&InFlight> {
        self.unnumbered
            .iter()
            .chain(self.by_pkid.values())
            .min_by_key(|r| r.seq)
    }
}

/// A record that was the oldest unacknowledged one when connections were
/// lost (see [`POISON_STRIKES`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Suspect {
    /// The record.
    seq: i64,
    /// Connections in a row lost while it was the oldest unacknowledged.
    strikes: u32,
}

/// What the forwarder knows across connections.
#[derive(Debug)]
struct Progress {
    /// Acknowledged records not yet reported to the store.
    acked: Vec<i64>,
    /// Highest seq ever handed to a client: records at or below it that
    /// are sent again may be duplicates upstream.
    sent_before: i64,
    /// The record suspected of ending connections, if any.
    suspect: Option<Suspect>,
    /// Topics the upstream refuses.
    refusals: Refusals,
}

impl Forwarder {
    fn options(&self) -> MqttOptions {
        let mut o =
            crate::broker_client::options(&self.config.broker, self.config.max_message_size);
        // The outbox, not the broker session, holds what is unacknowledged.
        o.set_clean_start(true);
        o
    }

    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Reader) -> T + Send + 'static,
    ) -> T {
        let reader = self.reader.clone();
        tokio::task::spawn_blocking(move || f(&mut reader.lock().expect("reader lock")))
            .await
            .expect("store task panicked")
    }

    /// Runs until `shutdown` turns true.
    pub async fn run(self, mut shutdown: watch::Receiver<bool>) {
        let mut backoff = Backoff::new(Duration::from_millis(250), Duration::from_secs(30));
        let mut progress = Progress {
            acked: Vec::new(),
            sent_before: 0,
            suspect: None,
            refusals: Refusals::new(self.config.refused_topic_timeout),
        };
        let mut tick = tokio::time::interval(FLUSH_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let window = usize::from(self.config.broker.in_flight);
        loop {
            if *shutdown.borrow() {
                self.flush(&mut progress.acked);
                return;
            }
            let (client, mut events) = AsyncClient::new(self.options(), window + 16);
            let mut conn = Connection {
                client,
                unnumbered: VecDeque::new(),
                by_pkid: HashMap::new(),
                cursor: 0,
                highest_sent: 0,
                connected: false,
                max_packet: None,
                probing: false,
            };
            let lost = loop {
                tokio::select! {
                    _ = crate::shutdown::stopped(&mut shutdown) => {
                        self.drain(&mut conn, &mut events, &mut progress).await;
                        return;
                    }
                    _ = self.committed.notified(), if conn.connected => {
                        self.fill(&mut conn, window, &mut progress).await;
                    }
                    _ = tick.tick() => {
                        self.flush(&mut progress.acked);
                        if conn.connected {
                            self.rewind_if_due(&mut conn, &mut progress);
                            self.fill(&mut conn, window, &mut progress).await;
                        }
                    }
                    event = events.poll() => match event {
                        Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                            conn.max_packet = ack.properties.and_then(|p| p.max_packet_size);
                            backoff.reset();
                            Metrics::add(&self.metrics.upstream_connects, 1);
                            Metrics::set(&self.metrics.upstream_connected, 1);
                            tracing::info!(
                                host = %self.config.broker.host,
                                port = self.config.broker.port,
                                "connected upstream"
                            );
                            // Report what was acknowledged, so that
                            // republishing from the oldest record skips it.
                            self.flush(&mut progress.acked);
                            conn.connected = true;
                            conn.probing = progress.suspect.is_some();
                            self.fill(&mut conn, window, &mut progress).await;
                        }
                        Ok(Event::Incoming(Packet::PubAck(ack))) => {
                            self.on_puback(&mut conn, &ack, &mut progress);
                            self.rewind_if_due(&mut conn, &mut progress);
                            self.fill(&mut conn, window, &mut progress).await;
                        }
                        Ok(Event::Incoming(Packet::Disconnect(d))) => {
                            tracing::warn!(reason = ?d.reason_code, "the upstream broker disconnected us");
                        }
                        Ok(event) => Self::on_event(&mut conn, event),
                        Err(e) => break e,
                    }
                }
            };
            Metrics::set(&self.metrics.upstream_connected, 0);
            // What the broker sent just before it closed the connection (a
            // PUBACK refusing a record, from a broker that then closes) was
            // read but not yet handed out.
            while let Some(event) = events.state.events.pop_front() {
                match event {
                    Event::Incoming(Packet::PubAck(ack)) => {
                        self.on_puback(&mut conn, &ack, &mut progress)
                    }
                    event => Self::on_event(&mut conn, event),
                }
            }
            let delay = backoff.next_delay();
            tracing::warn!(error = %lost, retry_in = ?delay, pending = conn.in_flight(), "upstream connection lost");
            if conn.connected {
                self.suspect(&conn, &mut progress);
            }
            progress.refusals.connection_lost();
            drop(conn);
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = crate::shutdown::stopped(&mut shutdown) => {}
            }
        }
    }

    /// Numbers published records as their packet ids become known.
    fn on_event(conn: &mut Connection, event: Event) {
        if let Event::Outgoing(Outgoing::Publish(pkid)) = event
            && let Some(r) = conn.unnumbered.pop_front()
        {
            tracing::debug!(seq = r.seq, pkid, "sent upstream");
            conn.by_pkid.insert(pkid, r);
        }
    }

    /// A PUBACK: the record is delivered, refused for what it is (to the
    /// dead letters), or refused for who sends it (kept; see
    /// [`refusals`]).
    fn on_puback(&self, conn: &mut Connection, ack: &PubAck, progress: &mut Progress) {
        let Some(r) = conn.by_pkid.remove(&ack.pkid) else {
            return;
        };
        let now = Instant::now();
        match refusals::verdict(ack.reason) {
            Verdict::Delivered => {
                progress.refusals.accepted(&r.topic, now);
                progress.acked.push(r.seq);
            }
            Verdict::Rejected => self.refuse(
                r.seq,
                format!(
                    "upstream refused: {:?} (0x{:02x})",
                    ack.reason,
                    refusals::code(ack.reason)
                ),
            ),
            Verdict::Refused => {
                self.refused_for_now(progress, r.seq, &r.topic, Cause::Reason(ack.reason), now)
            }
        }
        self.report_refusals(&progress.refusals);
        if progress.suspect.is_some_and(|s| s.seq == r.seq) {
            // It went through (or was refused outright): not the cause.
            progress.suspect = None;
            conn.probing = false;
        }
        if progress.acked.len() >= DELETE_BATCH {
            self.flush(&mut progress.acked);
        }
    }

    /// Sets the refusal gauges.
    fn report_refusals(&self, refusals: &Refusals) {
        Metrics::set(
            &self.metrics.upstream_refused_topics,
            refusals.refused_topics() as u64,
        );
        Metrics::set(
            &self.metrics.upstream_refusal_reason,
            refusals.reason().map_or(0, Cause::code),
        );
    }

    /// When records held back for a refused topic are due, sends from the
    /// oldest of them again: what was acknowledged meanwhile is reported
    /// first, so it is not read back.
    fn rewind_if_due(&self, conn: &mut Connection, progress: &mut Progress) {
        if let Some(from) = progress.refusals.rewind(Instant::now()) {
            self.flush(&mut progress.acked);
            conn.cursor = conn.cursor.min(from);
        }
    }

    /// After a connection that was up is lost: the oldest record it had
    /// unacknowledged takes a strike, and after [`POISON_STRIKES`] in a
    /// row it goes to the dead letters.
    fn suspect(&self, conn: &Connection, progress: &mut Progress) {
        let Some(InFlight { seq, topic }) = conn.oldest_unacknowledged() else {
            return;
        };
        let seq = *seq;
        let strikes = match progress.suspect {
            Some(s) if s.seq == seq => s.strikes + 1,
            _ => 1,
        };
        if strikes < POISON_STRIKES {
            tracing::info!(
                seq,
                strikes,
                "the upstream connection was lost with this record unacknowledged; \
                 it is sent alone first on the next connection"
            );
            progress.suspect = Some(Suspect { seq, strikes });
            return;
        }
        // A refusal by closing the connection: the record's topic is held
        // back and tried again later (refusals), and goes to the dead
        // letters only if the upstream goes on doing so while it accepts
        // other records.
        progress.suspect = None;
        self.refused_for_now(progress, seq, topic, Cause::Closed, Instant::now());
        self.report_refusals(&progress.refusals);
    }

    /// Record `seq` of `topic` was refused for who sends it, by `cause`:
    /// counted, and kept to be sent again (its topic held back), or, when
    /// its topic is refused for good, moved to the dead letters.
    fn refused_for_now(
        &self,
        progress: &mut Progress,
        seq: i64,
        topic: &str,
        cause: Cause,
        now: Instant,
    ) {
        Metrics::add(&self.metrics.upstream_refusals, 1);
        match progress.refusals.refused(seq, topic, cause, now) {
            Some(why) => self.refuse(seq, why),
            None => {
                if let Some(not_logged) = REFUSALS_LOGGED.admit() {
                    tracing::warn!(
                        seq,
                        topic,
                        %cause,
                        not_logged,
                        "the upstream refused a record for now: kept, its topic held back and tried again later"
                    );
                }
            }
        }
    }

    /// Clean shutdown: sends nothing more, waits up to [`DRAIN_GRACE`] for
    /// the PUBACKs of records in flight, reports them, disconnects.
    async fn drain(
        &self,
        conn: &mut Connection,
        events: &mut rumqttc::v5::EventLoop,
        progress: &mut Progress,
    ) {
        if conn.connected && conn.in_flight() > 0 {
            tracing::info!(
                in_flight = conn.in_flight(),
                "draining the upstream connection: waiting for the PUBACKs of records in flight"
            );
            let _ = tokio::time::timeout(DRAIN_GRACE, async {
                while conn.in_flight() > 0 {
                    match events.poll().await {
                        Ok(Event::Incoming(Packet::PubAck(ack))) => {
                            self.on_puback(conn, &ack, progress);
                        }
                        Ok(event) => Self::on_event(conn, event),
                        Err(_) => return,
                    }
                }
            })
            .await;
        }
        self.flush(&mut progress.acked);
        let _ = conn.client.try_disconnect();
        let _ = tokio::time::timeout(Duration::from_secs(1), async {
            while events.poll().await.is_ok() {}
        })
        .await;
    }

    /// Publishes records after the cursor until the window is full (records
    /// of a refused topic held back, records already on their way skipped).
    async fn fill(&self, conn: &mut Connection, window: usize, progress: &mut Progress) {
        let mut scanned = 0;
        loop {
            if scanned >= SCAN_PER_FILL {
                return;
            }
            let window = if conn.probing { 1 } else { window };
            let room = window.saturating_sub(conn.in_flight());
            if room == 0 {
                return;
            }
            let records = match self.outbox.take(conn.cursor, room) {
                Some(records) => records,
                None => {
                    // Catching up from SQLite: a query per half window,
                    // not per PUBACK.
                    if conn.in_flight() > 0 && room < window.div_ceil(2) {
                        return;
                    }
                    let after = conn.cursor;
                    match self.blocking(move |r| r.after(after, room)).await {
                        Ok(r) => r,
                        Err(e) => {
                            tracing::error!(error = %e, "cannot read the outbox");
                            return;
                        }
                    }
                }
            };
            if records.is_empty() {
                return;
            }
            scanned += records.len();
            let now = Instant::now();
            for r in records {
                if conn.sent(r.seq) || !progress.refusals.admit(r.seq, &r.topic, now) {
                    conn.cursor = r.seq;
                    continue;
                }
                if let Some(why) = self.unsendable(conn, &r) {
                    // It can never be sent to this broker: retrying would
                    // block everything behind it.
                    conn.cursor = r.seq;
                    self.refuse(r.seq, why);
                    continue;
                }
                let seq = r.seq;
                if !self.publish(conn, r) {
                    return;
                }
                if seq <= progress.sent_before {
                    Metrics::add(&self.metrics.resent, 1);
                }
                progress.sent_before = progress.sent_before.max(seq);
                if conn.probing {
                    return;
                }
            }
        }
    }

    /// Why `r` can never be sent on this connection, if it cannot.
    fn unsendable(&self, conn: &Connection, r: &Record) -> Option<String> {
        let topic = self.config.topic_prefix.len() + r.topic.len();
        if topic > MAX_TOPIC_LEN {
            return Some(format!(
                "its topic with the upstream prefix is {topic} bytes; MQTT allows {MAX_TOPIC_LEN}"
            ));
        }
        let max = conn.max_packet?;
        (self.packet_size(r) > max as usize)
            .then(|| format!("larger than the upstream's maximum packet size ({max} bytes)"))
    }

    /// An upper bound of the PUBLISH packet size for `r`.
    fn packet_size(&self, r: &Record) -> usize {
        // Fixed header (≤ 5), topic length (2), packet id (2), properties
        // (length ≤ 4, user property: 1 + 2 + key (9) + 2 + value: the
        // gateway id, two colons, 16 hex digits and a seq of ≤ 19 digits).
        self.config.topic_prefix.len()
            + r.topic.len()
            + r.payload.len()
            + 100
            + self.gateway_id.len()
    }

    /// Queues `r` on the connection; false if the client has no room (it
    /// stays in the outbox and is read again from there).
    fn publish(&self, conn: &mut Connection, r: Record) -> bool {
        let topic = format!("{}{}", self.config.topic_prefix, r.topic);
        let props = PublishProperties {
            user_properties: vec![(
                ID_PROPERTY.to_owned(),
                record_id(&self.gateway_id, self.incarnation, r.seq),
            )],
            ..Default::default()
        };
        let in_flight = InFlight {
            seq: r.seq,
            topic: r.topic,
        };
        match conn.client.try_publish_with_properties(
            topic,
            QoS::AtLeastOnce,
            false,
            r.payload,
            props,
        ) {
            Ok(()) => {
                conn.unnumbered.push_back(in_flight);
                conn.cursor = r.seq;
                conn.highest_sent = conn.highest_sent.max(r.seq);
                true
            }
            Err(e) => {
                tracing::warn!(error = %e, seq = r.seq, "could not queue a record upstream");
                false
            }
        }
    }

    /// Reports acknowledged records to the store for deletion.
    fn flush(&self, acked: &mut Vec<i64>) {
        if acked.is_empty() {
            return;
        }
        self.outbox.acknowledged(acked);
        Metrics::add(&self.metrics.forwarded, acked.len() as u64);
        acked.clear();
    }

    /// Hands a record that cannot be delivered to the store, which moves
    /// it to the dead letters; counted and logged.
    fn refuse(&self, seq: i64, why: String) {
        event!(
            self.metrics.upstream_rejected,
            error,
            throttle = REJECTIONS_LOGGED,
            seq,
            reason = why,
            "a record cannot be delivered upstream; moved to the dead letters"
        );
        self.outbox.refused(seq, why);
    }
}
