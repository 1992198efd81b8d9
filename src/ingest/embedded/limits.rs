//! The built-in broker's bounds on its clients: connections in total and
//! per user name (`[local] max_connections`, `max_connections_per_user`),
//! and how fast one connection may publish (`max_publish_rate`).
//!
//! # Connections
//!
//! A client counts from the moment it passes the gate (`ClientAuthenticate`
//! hook) until its connection ends, so clients logging in at the same
//! moment cannot pass a limit together:
//!
//! * passing the gate, it holds a reservation ([`Pending::Admitted`]);
//! * connected (`ClientConnected` hook), the reservation becomes a
//!   [`Counted`] kept in its session's attributes; it is given back when the
//!   connection ends (`ClientDisconnected`), with the session, or, at a
//!   limit, when its session task is found gone ([`Limits::sweep`]: rmqtt
//!   keeps a session whose CONNACK could not be sent, and runs no hook);
//! * the handshake failing to lock the session table, the reservation goes
//!   at once; failing later, or the client gone, after
//!   [`PENDING_PATIENCE`].
//!
//! A reconnect of the same client id and user name whose old connection
//! still counts is never refused: it replaces that connection (which the
//! takeover ends), and a device whose old connection is only half-closed
//! must get back in.
//!
//! A refused client gets CONNACK Server unavailable (MQTT 3.1.1 code 3,
//! MQTT 5 0x88), a code devices answer by trying again later. rmqtt's
//! authentication hook can only say Not authorized (which a device may take
//! for wrong credentials and give up) and runs no hook on a refusal it
//! sends, so the gate lets the client through and the limit's refusal is
//! taken as rmqtt locks the session table for the login, which then fails
//! (`sessions::TakeoverEntry::try_lock`).
//!
//! # Maximum Packet Size
//!
//! The smallest Maximum Packet Size any MQTT 5 client announced is kept
//! (from its login on, before anything can be routed to it),
//! so that routing looks at each subscriber's only for messages that could
//! exceed it (`sessions`).
//!
//! # Publish rate
//!
//! With `max_publish_rate`, each connection's PUBLISH packets pass a token
//! bucket (governor's, keyed by client id) holding one second's worth; a
//! publish beyond it waits in the publish hook. Since rmqtt handles a
//! connection's packets one at a time, the client's next packets wait
//! unread behind it: the device is slowed, nothing is refused or dropped.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::num::NonZeroUsize;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use governor::clock::Clock;
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use rmqtt::context::ServerContext;
use rmqtt::session::Session;
use rmqtt::types::{ClientId, ConnectInfo, Id, UserName};

use crate::config::BrokerLimits;
use crate::metrics::Metrics;

/// Longest a client that passed the gate may take to be connected: the
/// handshake's own timeout, plus waiting for another CONNECT of its client
/// id, plus rmqtt's 5 s for the old session to step aside.
const PENDING_PATIENCE: Duration = Duration::from_secs(15 + 10 + 5 + 5);

/// Key of the [`Counted`] in a session's attributes.
const COUNTED: &str = "edgefn.connection";

/// One login: a connection is its remote address and client id.
type Login = (Option<SocketAddr>, ClientId);

/// Which limit a client met.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Over {
    /// `max_connections`.
    Connections,
    /// `max_connections_per_user`.
    UserConnections,
}

impl Over {
    /// Why, for rmqtt's log.
    pub(super) fn as_str(self) -> &'static str {
        match self {
            Over::Connections => "local.max_connections clients are connected",
            Over::UserConnections => {
                "local.max_connections_per_user clients of this user name are connected"
            }
        }
    }
}

/// A login between the gate and its connection.
enum Pending {
    /// Let in; counts as connected.
    Admitted {
        /// Its user name.
        user: Option<UserName>,
        /// When it passed the gate.
        since: Instant,
    },
    /// Refused by a limit: its session table lock fails.
    Refused {
        /// Which limit.
        over: Over,
        /// When.
        since: Instant,
    },
}

/// Connections now.
#[derive(Default)]
struct Counts {
    /// Connected clients.
    connected: usize,
    /// Connected clients per user name (`None`: anonymous).
    per_user: HashMap<Option<UserName>, usize>,
    /// Logins past the gate, not yet connected or refused.
    pending: HashMap<Login, Pending>,
}

impl Counts {
    /// Clients that count against the limits of `user`: connected or about to be.
    fn of(&self, user: &Option<UserName>) -> (usize, usize) {
        let admitted = self
            .pending
            .values()
            .filter(|p| matches!(p, Pending::Admitted { .. }));
        let (mut total, mut mine) = (
            self.connected,
            self.per_user.get(user).copied().unwrap_or(0),
        );
        for p in admitted {
            total += 1;
            if matches!(p, Pending::Admitted { user: u, .. } if u == user) {
                mine += 1;
            }
        }
        (total, mine)
    }

    /// Forgets logins that never connected.
    fn prune(&mut self, now: Instant) {
        self.pending.retain(|_, p| match p {
            Pending::Admitted { since, .. } | Pending::Refused { since, .. } => {
                now.duration_since(*since) < PENDING_PATIENCE
            }
        });
    }
}

/// A connected client, counted until dropped.
struct Counted {
    /// Where it is counted.
    counts: Arc<Mutex<Counts>>,
    /// Its user name.
    user: Option<UserName>,
}

impl Drop for Counted {
    fn drop(&mut self) {
        let mut c = self.counts.lock().unwrap_or_else(PoisonError::into_inner);
        c.connected = c.connected.saturating_sub(1);
        if let Some(n) = c.per_user.get_mut(&self.user) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                c.per_user.remove(&self.user);
            }
        }
    }
}

/// Stops counting `session`'s connection, if it still counts.
async fn uncount(session: &Session) {
    let counted = session
        .extra_attrs
        .write()
        .await
        .get_mut::<Option<Counted>>(COUNTED)
        .and_then(Option::take);
    drop(counted);
}

/// The bounds, and the counts they are checked against.
pub(super) struct Limits {
    /// `max_connections`.
    max_connections: NonZeroUsize,
    /// `max_connections_per_user`.
    per_user: Option<NonZeroUsize>,
    /// Connections now.
    counts: Arc<Mutex<Counts>>,
    /// `max_publish_rate`, per client id.
    rate: Option<DefaultKeyedRateLimiter<ClientId>>,
    /// The smallest Maximum Packet Size any MQTT 5 client announced yet.
    smallest_packet: AtomicU32,
    /// Where waits are counted.
    metrics: Arc<Metrics>,
    /// The broker: its session table tells a takeover.
    scx: ServerContext,
}

impl Limits {
    pub(super) fn new(limits: &BrokerLimits, scx: ServerContext, metrics: Arc<Metrics>) -> Limits {
        Limits {
            max_connections: limits.max_connections,
            per_user: limits.max_connections_per_user,
            counts: Arc::default(),
            rate: limits
                .max_publish_rate
                .map(|r| RateLimiter::keyed(Quota::per_second(r))),
            smallest_packet: AtomicU32::new(u32::MAX),
            metrics,
            scx,
        }
    }

    /// Whether a packet of `size` bytes could be larger than some client's
    /// Maximum Packet Size (then its subscribers' are looked at).
    pub(super) fn may_exceed(&self, size: usize) -> bool {
        size > self.smallest_packet.load(Ordering::Relaxed) as usize
    }

    /// After the gate let `info` in: whether a limit refuses it. If not, it
    /// counts from now on.
    pub(super) async fn admit(&self, info: &ConnectInfo) -> Result<(), Over> {
        // Before anything can be routed to it.
        if let ConnectInfo::V5(_, connect) = info
            && let Some(max) = connect.max_packet_size
        {
            self.smallest_packet.fetch_min(max.get(), Ordering::Relaxed);
        }
        let id = info.id();
        let user = id.username.clone();
        if let Some(old) = self.scx.extends.shared().await.entry(id.clone()).session()
            && old.username() == user.as_ref()
            && old
                .extra_attrs
                .read()
                .await
                .get::<Option<Counted>>(COUNTED)
                .is_some_and(Option::is_some)
        {
            // A takeover: this connection replaces one that still counts.
            return Ok(());
        }
        if self.over(&user).is_some() {
            self.sweep().await;
        }
        let mut c = self.counts.lock().unwrap_or_else(PoisonError::into_inner);
        c.prune(Instant::now());
        let over = self.over_in(&c, &user);
        let login = (id.remote_addr, id.client_id.clone());
        let pending = match over {
            Some(over) => Pending::Refused {
                over,
                since: Instant::now(),
            },
            None => Pending::Admitted {
                user,
                since: Instant::now(),
            },
        };
        c.pending.insert(login, pending);
        over.map_or(Ok(()), Err)
    }

    /// Which limit a login of `user` would meet now, if any.
    fn over(&self, user: &Option<UserName>) -> Option<Over> {
        let mut c = self.counts.lock().unwrap_or_else(PoisonError::into_inner);
        c.prune(Instant::now());
        self.over_in(&c, user)
    }

    /// Which limit a login of `user` would meet with `c`, if any.
    fn over_in(&self, c: &Counts, user: &Option<UserName>) -> Option<Over> {
        let (total, mine) = c.of(user);
        if total >= self.max_connections.get() {
            Some(Over::Connections)
        } else if self.per_user.is_some_and(|max| mine >= max.get()) {
            Some(Over::UserConnections)
        } else {
            None
        }
    }

    /// Stops counting connections whose session task is gone without its
    /// `ClientDisconnected` hook: rmqtt leaves such a session in its table
    /// when its CONNACK could not be sent. Only run at a limit.
    async fn sweep(&self) {
        let entries: Vec<_> = self.scx.extends.shared().await.iter().collect();
        for entry in entries {
            if entry.tx().is_some_and(|tx| tx.is_closed())
                && let Some(session) = entry.session()
            {
                uncount(&session).await;
            }
        }
    }

    /// Forgets the login of `id` (its handshake failed): it no longer counts.
    pub(super) fn forget(&self, id: &Id) {
        let mut c = self.counts.lock().unwrap_or_else(PoisonError::into_inner);
        c.pending.remove(&(id.remote_addr, id.client_id.clone()));
    }

    /// Whether a limit refused the login of `id` (once: the refusal is
    /// taken).
    pub(super) fn refusal(&self, id: &Id) -> Option<Over> {
        let mut c = self.counts.lock().unwrap_or_else(PoisonError::into_inner);
        let login = (id.remote_addr, id.client_id.clone());
        match c.pending.get(&login) {
            Some(Pending::Refused { over, .. }) => {
                let over = *over;
                c.pending.remove(&login);
                Some(over)
            }
            _ => None,
        }
    }

    /// The `ClientConnected` hook: `session`'s connection counts until it ends.
    pub(super) async fn connected(&self, session: &Session) {
        let user = session.id.username.clone();
        {
            let mut c = self.counts.lock().unwrap_or_else(PoisonError::into_inner);
            c.pending
                .remove(&(session.id.remote_addr, session.id.client_id.clone()));
            c.connected += 1;
            *c.per_user.entry(user.clone()).or_default() += 1;
        }
        let counted = Counted {
            counts: self.counts.clone(),
            user,
        };
        session
            .extra_attrs
            .write()
            .await
            .insert(COUNTED.into(), Some(counted));
    }

    /// The `ClientDisconnected` hook: `session`'s connection no longer counts.
    pub(super) async fn disconnected(&self, session: &Session) {
        uncount(session).await;
        if let Some(rate) = &self.rate
            && rate.len() > 2 * self.max_connections.get()
        {
            rate.retain_recent();
        }
    }

    /// Waits until `client_id` may publish again (`max_publish_rate`).
    pub(super) async fn pace(&self, client_id: &ClientId) {
        let Some(rate) = &self.rate else {
            return;
        };
        let mut waited = false;
        while let Err(not_until) = rate.check_key(client_id) {
            if !waited {
                Metrics::add(&self.metrics.broker_publish_waits, 1);
                waited = true;
            }
            let wait = not_until.wait_time_from(rate.clock().now());
            tokio::time::sleep(wait).await;
        }
    }
}
