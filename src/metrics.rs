//! Gateway-wide counters: what came in, what was committed, what went up.
//!
//! Plain relaxed atomics, bumped once per event (or per batch) and read by
//! the periodic status line and the tests; the embedded broker's client
//! counts are gauges, set when a snapshot is taken. Per-function
//! counters live in [`crate::runtime::pool::FunctionMetrics`]; both are
//! read into one report by [`crate::telemetry`].
//!
//! What each figure is called is defined once, here: [`FAMILIES`] holds
//! every metric family's name, kind, unit and help, and [`COUNTERS`]
//! (made with [`Metrics`]) says which family and label each gateway
//! counter feeds. The Prometheus text, the JSON report's counters and
//! docs/CONFIG.md's list of metrics are made from them. Where an event is
//! both counted and logged, `event!` does both.
//!
//! To add a counter: a line in `counters!` below, its family in
//! [`FAMILIES`] if it is a new one, then
//! `EDGEFN_BLESS=1 cargo test -p edgefn --lib metrics::` to write
//! docs/CONFIG.md's list.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde::{Deserialize, Serialize};

macro_rules! counters {
    ($($(#[doc = $doc:literal])* $name:ident => $family:literal $([$label:literal = $value:literal])?,)*) => {
        /// Live counters; see each field.
        #[derive(Debug, Default)]
        pub struct Metrics {
            $($(#[doc = $doc])* pub $name: AtomicU64,)*
        }

        /// A point-in-time copy of [`Metrics`].
        #[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
        #[serde(default)]
        pub struct Snapshot {
            $($(#[doc = $doc])* pub $name: u64,)*
        }

        impl Metrics {
            /// Reads every counter.
            pub fn snapshot(&self) -> Snapshot {
                Snapshot { $($name: self.$name.load(Ordering::Relaxed),)* }
            }
        }

        /// Where each of the gateway's counters is shown: its field in
        /// [`Snapshot`] (and `gateway.counters` of the JSON report), its
        /// family in [`FAMILIES`] and its label there.
        pub const COUNTERS: &[Counter] = &[
            $(Counter {
                field: stringify!($name),
                family: $family,
                label: counters!(@label $($label, $value)?),
            },)*
        ];

        impl Snapshot {
            /// Every counter with its value, in the order of [`COUNTERS`].
            pub fn values(&self) -> impl Iterator<Item = (&'static Counter, u64)> {
                COUNTERS.iter().zip([$(self.$name),*])
            }
        }
    };
    (@label) => { None };
    (@label $label:literal, $value:literal) => { Some(($label, $value)) };
}

counters! {
    /// Device messages that reached the pipeline (from either source).
    received => "edgefn_messages_received",
    /// Scheduled runs handed to the pipeline.
    scheduled_runs => "edgefn_scheduled_runs",
    /// Device messages refused for exceeding `local.max_message_size`.
    refused_too_large => "edgefn_messages_refused" ["reason" = "too_large"],
    /// Device messages whose topic matched no function.
    unrouted => "edgefn_messages_refused" ["reason" = "unrouted"],
    /// Increase of the local broker's `$SYS/broker/publish/messages/dropped`
    /// seen while connected: messages the broker dropped before edgefn saw them.
    broker_dropped => "edgefn_local_broker_dropped",
    /// Device messages whose outcome was committed (then acknowledged).
    committed => "edgefn_messages_committed",
    /// Device messages left out of a commit because their device gave up
    /// on them before (it sends them again): embedded broker only.
    abandoned => "edgefn_messages_abandoned",
    /// Records written to the outbox.
    records_buffered => "edgefn_records_buffered",
    /// Inputs written to the dead letters.
    dead_letters => "edgefn_dead_letters_written",
    /// Old dead letters deleted to keep them within
    /// `buffer.dead_letters_max_size`.
    dead_letters_dropped => "edgefn_dead_letters_dropped",
    /// Dead letters replayed (`edgefn dead-letters replay`) and run.
    replays_done => "edgefn_replays" ["outcome" = "done"],
    /// Replayed dead letters that failed again (they stay).
    replays_failed => "edgefn_replays" ["outcome" = "failed"],
    /// Replays refused: the dead letter's function is not on the gateway.
    replays_refused => "edgefn_replays" ["outcome" = "refused"],
    /// Transactions committed, each one fsync of the WAL with `durability
    /// = "full"`: group commits of messages, and commits of deletes of
    /// forwarded records alone.
    commit_batches => "edgefn_commits",
    /// Failed commit attempts (retried; nothing acknowledged meanwhile).
    commit_failures => "edgefn_commit_failures",
    /// Records deleted unsent by the `drop_oldest` policy.
    dropped_records => "edgefn_records_dropped" ["reason" = "drop_oldest"],
    /// Messages functions published to the local broker.
    local_publishes => "edgefn_local_publishes",
    /// Of those, lost: the queue to the local broker was full, or the
    /// embedded broker refused them (local publishes are at most once).
    local_publishes_dropped => "edgefn_local_publishes_dropped",
    /// Records the upstream acknowledged (then deleted by the writer).
    forwarded => "edgefn_records_forwarded",
    /// Records sent again after a reconnect: possible duplicates upstream.
    resent => "edgefn_records_resent",
    /// Records moved to the dead letters instead of delivered: the
    /// upstream refused them for what they are (an invalid topic name or
    /// payload format), kept refusing their topic while it accepted others,
    /// or can never take them (too large).
    upstream_rejected => "edgefn_records_dropped" ["reason" = "upstream_rejected"],
    /// PUBACKs that refused a record for who sends it (not authorised,
    /// quota exceeded, …): the record was kept, to be sent again.
    upstream_refusals => "edgefn_upstream_refusals",
    /// Topics whose records the upstream refuses now (held back, sent
    /// again after a backoff).
    upstream_refused_topics => "edgefn_upstream_refused_topics",
    /// The MQTT reason code of the last refusal while a topic is refused
    /// (e.g. 135 = 0x87 not authorised); 0 when none is.
    upstream_refusal_reason => "edgefn_upstream_refusal_reason",
    /// Successful connections to the upstream broker.
    upstream_connects => "edgefn_connects" ["broker" = "upstream"],
    /// Upstream connection, now: 1 up, 0 down.
    upstream_connected => "edgefn_upstream_connected",
    /// Successful connections to the local broker.
    local_connects => "edgefn_connects" ["broker" = "local"],
    /// Trigger filters the local broker granted, counted at each SUBACK.
    local_subscriptions_granted => "edgefn_local_subscriptions" ["outcome" = "granted"],
    /// Trigger filters the local broker refused (its ACL, most likely).
    local_subscriptions_refused => "edgefn_local_subscriptions" ["outcome" = "refused"],
    /// Embedded broker: QoS 1/2 device publishes not acknowledged because
    /// they were not committed (the connection was closed without a PUBACK;
    /// the device sends them again).
    broker_refused => "edgefn_messages_refused" ["reason" = "not_committed"],
    /// Embedded broker: messages dropped on the way to a local subscriber
    /// (its queue full, expired, subscriber gone).
    broker_dropped_to_subscribers => "edgefn_broker_dropped" ["reason" = "to_subscriber"],
    /// Embedded broker: messages not routed to any subscriber (or not
    /// retained) because they would take it beyond `local.memory_limit`.
    broker_dropped_memory_limit => "edgefn_broker_dropped" ["reason" = "memory_limit"],
    /// Embedded broker: messages not routed to one subscriber because they
    /// would take its session beyond `local.max_queued_bytes`.
    broker_dropped_session_limit => "edgefn_broker_dropped" ["reason" = "max_queued_bytes"],
    /// Embedded broker, now: payload bytes held for subscribers (queued,
    /// in flight), at most `local.memory_limit`.
    broker_held_bytes => "edgefn_broker_held",
    /// Embedded broker: last wills and functions' own publishes on trigger
    /// topics that never reached a commit; nobody sends these again.
    broker_lost_internal => "edgefn_broker_dropped" ["reason" = "internal"],
    /// Built-in broker: CONNECTs refused, a user name with a wrong password.
    broker_refused_password => "edgefn_broker_refusals" ["reason" = "bad_password"],
    /// Built-in broker: CONNECTs refused, a user name not in password_file.
    broker_refused_user => "edgefn_broker_refusals" ["reason" = "unknown_user"],
    /// Built-in broker: CONNECTs refused, no user name and allow_anonymous false.
    broker_refused_anonymous => "edgefn_broker_refusals" ["reason" = "anonymous"],
    /// Built-in broker: wills dropped, on a topic their client may not write.
    broker_refused_will => "edgefn_broker_refusals" ["reason" = "will_denied"],
    /// Built-in broker: PUBLISHes the ACL denied (not routed, not committed).
    broker_refused_publish => "edgefn_broker_refusals" ["reason" = "publish_denied"],
    /// Built-in broker: SUBSCRIBE filters the ACL denied.
    broker_refused_subscribe => "edgefn_broker_refusals" ["reason" = "subscribe_denied"],
    /// Built-in broker: messages withheld from a subscriber the ACL does not
    /// let read their topic.
    broker_refused_read => "edgefn_broker_refusals" ["reason" = "read_denied"],
    /// Built-in broker: clients disconnected at a reload because their
    /// password file entry changed or went.
    broker_refused_revoked => "edgefn_broker_refusals" ["reason" = "revoked"],
    /// Built-in broker: CONNECTs refused, a client certificate without a
    /// common name to take as user name (use_identity_as_username).
    broker_refused_identity => "edgefn_broker_refusals" ["reason" = "no_identity"],
    /// Built-in broker: CONNECTs refused, `local.max_connections` reached.
    broker_refused_connections => "edgefn_broker_refusals" ["reason" = "max_connections"],
    /// Built-in broker: CONNECTs refused, `local.max_connections_per_user`
    /// reached for their user name.
    broker_refused_user_connections => "edgefn_broker_refusals" ["reason" = "max_connections_per_user"],
    /// Built-in broker: connections closed as they opened,
    /// `local.max_connections_per_address` from their address being open.
    broker_refused_address_connections => "edgefn_broker_refusals" ["reason" = "max_connections_per_address"],
    /// Built-in broker: PUBLISHes that waited because their connection went
    /// beyond `local.max_publish_rate`.
    broker_publish_waits => "edgefn_broker_publish_waits",
    /// Built-in broker: password and ACL files re-read (SIGHUP) and applied.
    access_reloads => "edgefn_broker_access_reloads" ["outcome" = "applied"],
    /// Built-in broker: reloads that failed (a file unreadable or wrong);
    /// the rules before stay in force.
    access_reloads_failed => "edgefn_broker_access_reloads" ["outcome" = "failed"],
    /// Bundles refused on the control topics (any reason, junk included).
    bundles_refused => "edgefn_bundles_refused",
    /// New versions rolled back: their instances failed to start.
    rollbacks => "edgefn_rollbacks" ["outcome" = "rolled_back"],
    /// New versions whose instances failed to start, kept running:
    /// `rollback = "never"`, or the version before is below the floor.
    rollbacks_declined => "edgefn_rollbacks" ["outcome" = "declined"],
    /// Connections to the metrics listener closed at once: it was serving
    /// its most.
    metrics_connections_refused => "edgefn_metrics_connections_dropped" ["reason" = "limit"],
    /// Connections to the metrics listener cut: headers not sent within
    /// its header timeout, or open past its connection timeout.
    metrics_connections_cut => "edgefn_metrics_connections_dropped" ["reason" = "timeout"],
    /// Embedded broker, now: open connections.
    broker_connections => "edgefn_broker_connections",
    /// Embedded broker, now: sessions (connected clients and the persistent
    /// sessions of offline ones).
    broker_sessions => "edgefn_broker_sessions",
    /// Embedded broker, now: open sockets on its listeners, logged in or not.
    broker_sockets => "edgefn_broker_sockets",
}

/// What a metric family is to Prometheus.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Only goes up (since the daemon started); `_total` in Prometheus.
    Counter,
    /// A value now.
    Gauge,
}

/// One family of the metrics model, as Prometheus shows it and
/// docs/CONFIG.md lists it.
#[derive(Debug, Clone, Copy)]
pub struct Family {
    /// Its Prometheus name, without the unit or `_total`.
    pub name: &'static str,
    /// Counter or gauge.
    pub kind: Kind,
    /// Its unit (`seconds`, `bytes`), appended to the name, if it has one.
    pub unit: Option<&'static str>,
    /// Its labels.
    pub labels: &'static [&'static str],
    /// Where the JSON report has it, when not (only) in
    /// `gateway.counters` (Markdown).
    pub json: &'static str,
    /// What it counts: Prometheus' HELP.
    pub help: &'static str,
    /// More for the operator, after `help` in docs/CONFIG.md (Markdown).
    pub more: &'static str,
}

impl Family {
    /// Its name as Prometheus shows it: unit, and `_total` for a counter.
    pub fn full_name(&self) -> String {
        let mut name = self.name.to_owned();
        if let Some(unit) = self.unit {
            name = format!("{name}_{unit}");
        }
        if self.kind == Kind::Counter {
            name.push_str("_total");
        }
        name
    }
}

/// One of the gateway's counters: see [`COUNTERS`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Counter {
    /// Its field in [`Snapshot`] and `gateway.counters`.
    pub field: &'static str,
    /// The name of its [`Family`].
    pub family: &'static str,
    /// Its label in the family, if the family has one.
    pub label: Option<(&'static str, &'static str)>,
}

/// The family called `name`.
pub fn find(name: &str) -> Option<&'static Family> {
    FAMILIES.iter().find(|f| f.name == name)
}

const fn family(
    name: &'static str,
    kind: Kind,
    labels: &'static [&'static str],
    help: &'static str,
) -> Family {
    Family {
        name,
        kind,
        unit: None,
        labels,
        json: "",
        help,
        more: "",
    }
}

const fn more(mut f: Family, more: &'static str) -> Family {
    f.more = more;
    f
}

const fn unit(mut f: Family, unit: &'static str) -> Family {
    f.unit = Some(unit);
    f
}

const fn json(mut f: Family, json: &'static str) -> Family {
    f.json = json;
    f
}

use Kind::{Counter as C, Gauge as G};

/// Every family of the metrics model, in the order Prometheus shows them:
/// the gateway's, then each function's. The gateway's counters
/// ([`COUNTERS`]) say which family they feed; the others are made from
/// the report. docs/CONFIG.md's list of metrics is made from this table
/// (a test fails when they differ).
pub const FAMILIES: &[Family] = &[
    json(
        family(
            "edgefn_info",
            G,
            &["gateway", "version"],
            "The gateway: 1, labelled with its id and edgefn version.",
        ),
        "`gateway.id`, `gateway.edgefn_version`",
    ),
    json(
        unit(
            family("edgefn_uptime", G, &[], "Seconds since the daemon started."),
            "seconds",
        ),
        "`gateway.uptime_s`",
    ),
    family(
        "edgefn_messages_received",
        C,
        &[],
        "Device messages that reached the pipeline.",
    ),
    family(
        "edgefn_scheduled_runs",
        C,
        &[],
        "Scheduled runs handed to functions.",
    ),
    more(
        family(
            "edgefn_messages_refused",
            C,
            &["reason"],
            "Device messages refused, by reason.",
        ),
        "`too_large`: larger than `local.max_message_size`; `unrouted`: no function's trigger (external broker); `not_committed`: not acknowledged because the device's connection closed before its commit (built-in broker; the device sends it again).",
    ),
    more(
        family(
            "edgefn_local_broker_dropped",
            C,
            &[],
            "Messages the local broker says it dropped ($SYS/broker/publish/messages/dropped) while edgefn was connected: lost before edgefn saw them.",
        ),
        "External broker only; see [DELIVERY.md](DELIVERY.md).",
    ),
    family(
        "edgefn_messages_committed",
        C,
        &[],
        "Deliveries whose outcome was committed (device messages, scheduled runs, replays).",
    ),
    family(
        "edgefn_messages_abandoned",
        C,
        &[],
        "Messages left out of a commit: their device gave up on them (it sends them again).",
    ),
    json(
        family("edgefn_buffer_records", G, &[], "Records in the buffer."),
        "`gateway.buffer_records`",
    ),
    json(
        unit(
            family(
                "edgefn_buffer",
                G,
                &[],
                "Bytes (topics and payloads) in the buffer.",
            ),
            "bytes",
        ),
        "`gateway.buffer_bytes`",
    ),
    json(
        unit(
            family(
                "edgefn_buffer_oldest_record_age",
                G,
                &[],
                "Age of the oldest buffered record (0: none).",
            ),
            "seconds",
        ),
        "`gateway.oldest_record_age_s`",
    ),
    family(
        "edgefn_records_buffered",
        C,
        &[],
        "Records written to the buffer.",
    ),
    family(
        "edgefn_records_forwarded",
        C,
        &[],
        "Records the upstream acknowledged.",
    ),
    family(
        "edgefn_records_resent",
        C,
        &[],
        "Records sent again after a reconnect: possible duplicates upstream.",
    ),
    more(
        family(
            "edgefn_records_dropped",
            C,
            &["reason"],
            "Records lost, by reason.",
        ),
        "`drop_oldest`: deleted unsent by `buffer.full_policy`; `upstream_rejected`: refused by the upstream for what they are, moved to the dead letters.",
    ),
    json(
        family(
            "edgefn_upstream_connected",
            G,
            &[],
            "1 while the upstream connection is up.",
        ),
        "`gateway.upstream_connected`",
    ),
    more(
        family(
            "edgefn_local_subscriptions",
            C,
            &["outcome"],
            "Trigger filters the local broker granted or refused, counted at each SUBACK (external broker).",
        ),
        "A refused one is also logged: the broker does not let edgefn read that filter (a broker that checks its ACL at SUBSCRIBE; Mosquitto's acl_file grants and withholds the messages instead), and its messages never reach a function.",
    ),
    family(
        "edgefn_connects",
        C,
        &["broker"],
        "Successful connections to a broker: upstream, or the local broker (external broker).",
    ),
    more(
        family(
            "edgefn_upstream_refusals",
            C,
            &[],
            "PUBACKs refusing a record for who sends it (not authorised, quota exceeded, ...): the record is kept and sent again.",
        ),
        "An upstream closing the connection over a record counts too; see [DELIVERY.md](DELIVERY.md#when-the-upstream-refuses).",
    ),
    more(
        family(
            "edgefn_upstream_refused_topics",
            G,
            &[],
            "Topics whose records the upstream refuses now (held back, tried again after a backoff).",
        ),
        "Alert on `edgefn_upstream_refused_topics > 0`: the upstream refuses this gateway's records.",
    ),
    more(
        family(
            "edgefn_upstream_refusal_reason",
            G,
            &[],
            "MQTT reason code of the last refusal while a topic is refused (135: not authorised; 256: it closed the connection); 0 when none is.",
        ),
        "Others seen: 151 (0x97) quota exceeded.",
    ),
    more(
        family(
            "edgefn_bundles_refused",
            C,
            &[],
            "Bundles refused on the control topics (junk included).",
        ),
        "See [DEPLOY.md](DEPLOY.md#control-topics).",
    ),
    more(
        family(
            "edgefn_rollbacks",
            C,
            &["outcome"],
            "New versions whose instances failed to start: rolled back, or kept (rollback = never, or the version before is below the floor).",
        ),
        "See [DEPLOY.md](DEPLOY.md#rollback).",
    ),
    more(
        family(
            "edgefn_metrics_connections_dropped",
            C,
            &["reason"],
            "Connections to the metrics listener closed by it, by reason.",
        ),
        "`limit`: 16 open already; `timeout`: no headers within 5 s, or open for 30 s.",
    ),
    family(
        "edgefn_dead_letters_written",
        C,
        &[],
        "Inputs written to the dead letters.",
    ),
    more(
        family(
            "edgefn_dead_letters_dropped",
            C,
            &[],
            "Old dead letters deleted to keep within their bound.",
        ),
        "The bound: `buffer.dead_letters_max_size`.",
    ),
    more(
        family(
            "edgefn_replays",
            C,
            &["outcome"],
            "Dead letters replayed, by outcome.",
        ),
        "`edgefn dead-letters replay`: `done` (run), `failed` (failed again, kept), `refused` (its function is not on the gateway).",
    ),
    more(
        family(
            "edgefn_commits",
            C,
            &[],
            "Transactions committed: group commits of messages, and commits of deletes of forwarded records alone.",
        ),
        "With `durability = \"full\"` each is one fsync of the WAL.",
    ),
    family(
        "edgefn_commit_failures",
        C,
        &[],
        "Failed commit attempts (retried; nothing acknowledged meanwhile).",
    ),
    json(
        unit(
            family(
                "edgefn_commit_duration",
                G,
                &["quantile"],
                "Group commit time (fsync included), quantiles of the most recent 1024 commits of messages.",
            ),
            "seconds",
        ),
        "`gateway.commit_latency`",
    ),
    json(
        more(
            unit(
                family(
                    "edgefn_disk_written",
                    C,
                    &[],
                    "Bytes written to storage by the daemon (/proc/self/io write_bytes).",
                ),
                "bytes",
            ),
            "Since it started: the 4 KiB file pages it dirtied in the database, its WAL, compiled modules.",
        ),
        "`gateway.disk_write_bytes`",
    ),
    json(
        more(
            family(
                "edgefn_disk_bytes_per_message",
                G,
                &[],
                "Bytes written to storage per committed message, over the last 5 minutes.",
            ),
            "`disk_window_s`: what it is over, since start-up finished until 5 minutes have passed. Also in the status line the daemon logs every minute and in `edgefn status --config`; see [DELIVERY.md](DELIVERY.md#sd-cards).",
        ),
        "`gateway.disk_bytes_per_message`, `gateway.disk_window_s`",
    ),
    json(
        family(
            "edgefn_disk_bytes_per_day",
            G,
            &[],
            "Bytes written to storage per day at the rate of the last 5 minutes.",
        ),
        "`gateway.disk_bytes_per_day`",
    ),
    family(
        "edgefn_local_publishes",
        C,
        &[],
        "Messages functions published, handed to the local broker after their commit.",
    ),
    family(
        "edgefn_local_publishes_dropped",
        C,
        &[],
        "Of those, lost: the queue to the local broker full, or refused by it.",
    ),
    family(
        "edgefn_broker_sessions",
        G,
        &[],
        "Built-in broker: sessions (connected and persistent offline).",
    ),
    family(
        "edgefn_broker_connections",
        G,
        &[],
        "Built-in broker: open connections.",
    ),
    family(
        "edgefn_broker_sockets",
        G,
        &[],
        "Built-in broker: open sockets on its listeners, logged in or not (at most local.max_connections + 256, fewer if the file limit cannot hold three descriptors for each; local.max_connections_per_address from one IP address).",
    ),
    unit(
        family(
            "edgefn_broker_held",
            G,
            &[],
            "Built-in broker: payload bytes held for subscribers now (queued for online and offline sessions, in flight, retained), at most local.memory_limit.",
        ),
        "bytes",
    ),
    more(
        family(
            "edgefn_broker_dropped",
            C,
            &["reason"],
            "Built-in broker: messages lost on its own side, by reason.",
        ),
        "`to_subscriber`: on the way to a local subscriber (its queue full, expired, gone); `internal`: last wills and functions' publishes on trigger topics that never reached a commit (nobody sends these again); `memory_limit`: not routed to subscribers, or not retained, as it would take the broker beyond `local.memory_limit` (the publisher is answered as always); `max_queued_bytes`: not routed to one subscriber, as it would take its session beyond `local.max_queued_bytes`.",
    ),
    more(
        family(
            "edgefn_broker_refusals",
            C,
            &["reason"],
            "Built-in broker: what local.password_file, local.acl_file, local.allow_anonymous and the connection limits refused, by reason.",
        ),
        "`bad_password`, `unknown_user` and `anonymous`: CONNECTs refused (CONNACK Not authorized); `will_denied`: wills on a topic their client may not write, dropped when due (the client was let in, as by Mosquitto); `publish_denied`: PUBLISHes not routed nor committed (MQTT 5: PUBACK 0x87); `subscribe_denied`: SUBSCRIBE filters refused in the SUBACK; `read_denied`: messages withheld from a subscriber; `revoked`: clients disconnected at a reload because their password entry changed; `no_identity`: a client certificate without a common name (use_identity_as_username); `max_connections`: CONNECTs refused as local.max_connections clients were connected; `max_connections_per_user`: CONNECTs refused as local.max_connections_per_user clients of their user name were connected (both CONNACK Server unavailable: MQTT 5 0x88, 3.1.1 code 3). `max_connections_per_address`: connections closed as they opened, local.max_connections_per_address being open from their IP address (`max_connections` also counts those closed as they opened because edgefn_broker_sockets was at its most). A TLS handshake the listener refuses (no certificate, a foreign one) is not counted: it ends before MQTT begins. Each is logged at most once a minute per client address.",
    ),
    family(
        "edgefn_broker_publish_waits",
        C,
        &[],
        "Built-in broker: PUBLISHes that waited because their connection sent faster than local.max_publish_rate.",
    ),
    family(
        "edgefn_broker_access_reloads",
        C,
        &["outcome"],
        "Built-in broker: re-readings of local.password_file and local.acl_file (SIGHUP), applied or failed (the rules before stay).",
    ),
    json(
        family(
            "edgefn_function_info",
            G,
            &["function", "version", "origin"],
            "Each function that runs: 1, labelled with its version and origin.",
        ),
        "`functions[].version`, `origin` (version 0: the configuration file's)",
    ),
    json(
        family(
            "edgefn_invocations",
            C,
            &["function", "outcome"],
            "Attempts, by function and outcome (ok or the failure's kind).",
        ),
        "`functions[].invocations`, `succeeded`, `errors` (`error`, `timeout`, `fuel`, `trap`, `exit`, `start`)",
    ),
    json(
        family(
            "edgefn_retries",
            C,
            &["function"],
            "Attempts that were retries.",
        ),
        "`functions[].retries`",
    ),
    json(
        family(
            "edgefn_function_dead_letters",
            C,
            &["function"],
            "Inputs that failed every attempt.",
        ),
        "`functions[].dead_letters`",
    ),
    json(
        family(
            "edgefn_throttles",
            C,
            &["function"],
            "Messages that waited for a free instance.",
        ),
        "`functions[].throttles` (all `concurrency` busy, its queue full)",
    ),
    json(
        family(
            "edgefn_emitted_records",
            C,
            &["function"],
            "Records emitted by successful invocations.",
        ),
        "`functions[].emitted_records`",
    ),
    json(
        unit(
            family(
                "edgefn_emitted",
                C,
                &["function"],
                "Bytes (topics and payloads) of those records.",
            ),
            "bytes",
        ),
        "`functions[].emitted_bytes`",
    ),
    json(
        family(
            "edgefn_published",
            C,
            &["function"],
            "Local publishes of successful invocations.",
        ),
        "`functions[].published`",
    ),
    json(
        more(
            family(
                "edgefn_calls_refused",
                C,
                &["function", "call"],
                "Import calls refused: emit/publish outside the allow-lists, state_set/state_delete past state_limit.",
            ),
            "`state_set` counts `state_set` and `state_delete` refused past `state_limit` (pending writes included) or past 10,000 state writes in one invocation.",
        ),
        "`functions[].emit_denied`, `publish_denied`, `state_refused`",
    ),
    json(
        unit(
            family(
                "edgefn_state",
                G,
                &["function"],
                "Bytes of the function's state.",
            ),
            "bytes",
        ),
        "`functions[].state_bytes`",
    ),
    json(
        family(
            "edgefn_schedule_skipped",
            C,
            &["function"],
            "Scheduled runs skipped: the one before was still going.",
        ),
        "`functions[].schedule_skipped`",
    ),
    json(
        unit(
            family(
                "edgefn_invocation_duration",
                G,
                &["function", "quantile"],
                "Successful attempts' duration, quantiles of the most recent 1024.",
            ),
            "seconds",
        ),
        "`functions[].duration`",
    ),
];

/// Counts an event and logs it, in one call: `count` (1, or `n =>`
/// before the counter) is added to the counter, then the line is logged
/// at `level` — with `throttle = T,` only when the
/// [`Throttle`](crate::throttle::Throttle) `T` admits it, with the
/// `not_logged` count of the lines it held back.
///
/// ```text
/// event!(metrics.bundles_refused, warn, throttle = REFUSALS_LOGGED, code, "bundle refused");
/// event!(by => metrics.broker_dropped, warn, dropped = by, "the local broker dropped messages");
/// ```
macro_rules! event {
    ($n:expr => $counter:expr, $level:ident, throttle = $throttle:expr, $($line:tt)+) => {{
        $crate::metrics::Metrics::add(&$counter, $n);
        if let Some(not_logged) = $throttle.admit() {
            tracing::$level!(not_logged, $($line)+);
        }
    }};
    ($n:expr => $counter:expr, $level:ident, $($line:tt)+) => {{
        $crate::metrics::Metrics::add(&$counter, $n);
        tracing::$level!($($line)+);
    }};
    ($counter:expr, $level:ident, throttle = $throttle:expr, $($line:tt)+) => {
        $crate::metrics::event!(1 => $counter, $level, throttle = $throttle, $($line)+)
    };
    ($counter:expr, $level:ident, $($line:tt)+) => {
        $crate::metrics::event!(1 => $counter, $level, $($line)+)
    };
}
pub(crate) use event;

impl Metrics {
    /// Sets the gauge `gauge` to `value`.
    pub fn set(gauge: &AtomicU64, value: u64) {
        gauge.store(value, Ordering::Relaxed);
    }

    /// Adds `n` to `counter`.
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }
}

/// Durations a [`Window`] keeps: percentiles are over the most recent/// this many.
pub const WINDOW: usize = 1024;

/// The most recent [`WINDOW`] durations of something, for percentiles.
#[derive(Debug, Default)]
pub struct Window(Mutex<Ring>);

#[derive(Debug, Default)]
struct Ring {
    /// Microseconds, up to [`WINDOW`] of them.
    samples: Vec<u32>,
    /// Where the next goes once full.
    next: usize,
}

/// Percentiles of a [`Window`], milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Percentiles {
    /// Median.
    pub p50_ms: f64,
    /// 95th percentile.
    pub p95_ms: f64,
    /// 99th percentile.
    pub p99_ms: f64,
    /// How many durations they are of.
    pub samples: usize,
}

impl Window {
    /// Adds a duration, pushing out the oldest once full.
    pub fn record(&self, d: Duration) {
        let micros = u32::try_from(d.as_micros()).unwrap_or(u32::MAX);
        let mut r = self.0.lock().expect("window lock");
        if r.samples.len() < WINDOW {
            r.samples.push(micros);
        } else {
            let i = r.next;
            r.samples[i] = micros;
        }
        r.next = (r.next + 1) % WINDOW;
    }

    /// The percentiles of what it holds; none while empty.
    pub fn percentiles(&self) -> Option<Percentiles> {
        let mut v = self.0.lock().expect("window lock").samples.clone();
        if v.is_empty() {
            return None;
        }
        v.sort_unstable();
        // Nearest rank.
        let at = |p: f64| {
            let rank = ((p * v.len() as f64).ceil() as usize).clamp(1, v.len());
            f64::from(v[rank - 1]) / 1000.0
        };
        Some(Percentiles {
            p50_ms: at(0.50),
            p95_ms: at(0.95),
            p99_ms: at(0.99),
            samples: v.len(),
        })
    }
}

/// docs/CONFIG.md's list of metrics, made from [`FAMILIES`] and
/// [`COUNTERS`]: one Markdown table row per family.
pub fn config_md_rows() -> String {
    let mut out = String::new();
    for f in FAMILIES {
        let labels = if f.labels.is_empty() {
            String::new()
        } else {
            format!("{{{}}}", f.labels.join(","))
        };
        let mut json: Vec<String> = COUNTERS
            .iter()
            .filter(|c| c.family == f.name)
            .map(|c| match c.label {
                Some((_, value)) => format!("`{value}`: `gateway.counters.{}`", c.field),
                None => format!("`gateway.counters.{}`", c.field),
            })
            .collect();
        if !f.json.is_empty() {
            json.push(f.json.to_owned());
        }
        let meaning = if f.more.is_empty() {
            f.help.to_owned()
        } else {
            format!("{} {}", f.help, f.more)
        };
        out.push_str(&format!(
            "| `{}{labels}` | {} | {meaning} |\n",
            f.full_name(),
            json.join(", ")
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_counter_feeds_a_family_of_its_kind_once() {
        let mut seen = std::collections::BTreeSet::new();
        for c in COUNTERS {
            let family = find(c.family)
                .unwrap_or_else(|| panic!("{}: no family {} in FAMILIES", c.field, c.family));
            assert_eq!(
                c.label.map(|(l, _)| l),
                family.labels.first().copied(),
                "{}: its label is not its family's",
                c.field
            );
            assert!(seen.insert((c.family, c.label)), "{} twice", c.field);
        }
        let names: std::collections::BTreeSet<_> = FAMILIES.iter().map(|f| f.full_name()).collect();
        assert_eq!(names.len(), FAMILIES.len(), "a family name twice");
    }

    /// docs/CONFIG.md lists the metrics between two marker lines; the rows
    /// there are [`config_md_rows`]. `EDGEFN_BLESS=1` writes them.
    #[test]
    fn config_md_lists_the_metrics_of_the_table() {
        const BEGIN: &str = "| --- | --- | --- |\n";
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/docs/CONFIG.md");
        let doc = std::fs::read_to_string(path).unwrap();
        let marker = "<!-- metrics: made from FAMILIES in src/metrics.rs -->\n";
        let at = doc
            .find(marker)
            .expect("the metrics marker in docs/CONFIG.md")
            + marker.len();
        let start = at + doc[at..].find(BEGIN).expect("the metrics table's header") + BEGIN.len();
        let end = start
            + doc[start..]
                .find("\n\n")
                .expect("the end of the metrics table")
            + 1;
        let want = config_md_rows();
        if doc[start..end] != want {
            if std::env::var_os("EDGEFN_BLESS").is_some() {
                std::fs::write(path, format!("{}{want}{}", &doc[..start], &doc[end..])).unwrap();
            } else {
                panic!(
                    "docs/CONFIG.md's list of metrics is not the table in src/metrics.rs: \
                     run `EDGEFN_BLESS=1 cargo test -p edgefn --lib metrics::` and review the diff"
                );
            }
        }
    }
}
