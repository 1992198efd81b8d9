//! The built-in broker's gate: `[local] password_file`, `acl_file` and
//! `allow_anonymous` (see [`crate::access`]) applied to rmqtt's clients.
//!
//! * CONNECT: rmqtt's `ClientAuthenticate` hook, for every client (the
//!   listener takes no anonymous client by itself, so even those come
//!   here). A refused client gets CONNACK "Not authorized" (MQTT 3.1.1
//!   code 5, MQTT 5 0x87) whatever the reason, as from Mosquitto: a wrong
//!   password, an unknown user, no user name.
//! * Will: as in Mosquitto, a client whose will is on a topic it may not
//!   write is let in, and its will is dropped when it would be published
//!   ([`Gate::may_publish_will`]: neither routed nor committed). Password hashes are computed on
//!   the blocking pool, two at a time: a password-guessing loop waits its
//!   turn and cannot stall the data path.
//! * TLS with `use_identity_as_username`: a client whose certificate
//!   (verified against `ca_file` in the handshake) has a common name logs
//!   in as that user without a password, as with Mosquitto.
//! * PUBLISH: checked in the publish hook before anything else; a denied
//!   message is neither routed nor committed. MQTT 5 clients get PUBACK
//!   (PUBREC) 0x87 Not authorized; MQTT 3.1.1 ones an ordinary PUBACK, as
//!   from Mosquitto, since 3.1.1 has no way to say no.
//! * SUBSCRIBE: a filter no message could pass gets 0x87 (MQTT 5) / 0x80
//!   (3.1.1) in the SUBACK; others are granted, and each message is checked
//!   against the receiver's read rights as it is routed
//!   ([`Gate::may_read`], from the session table's `forwards`).
//! * SIGHUP: [`Gate::reload`] re-reads both files; if either is wrong the
//!   rules before stay. Clients whose password entry changed or went are
//!   disconnected; everyone else keeps their connection, under the new ACL
//!   from their next packet on.
//!
//! Each refusal is counted by reason (`edgefn_broker_refusals_total`) and
//! logged at most once a minute per client address and reason.

use std::net::SocketAddr;
use std::sync::Arc;

use arc_swap::ArcSwap;
use rmqtt::codec::v5::SubscribeAckReason;
use rmqtt::context::ServerContext;
use rmqtt::hook::{HookResult, ReturnType};
use rmqtt::session::Session;
use rmqtt::types::{AuthResult, ConnectInfo, Id, Subscribe, SubscribeAclResult};
use tokio::sync::Semaphore;
use tracing::{debug, error, info, warn};

use crate::access::{Access, AccessFiles, Client, Login};
use crate::metrics::Metrics;
use crate::route::TopicFilter;
use crate::text::Printable;
use crate::throttle::PerKey;

/// Password hashes computed at once (PBKDF2 costs CPU a Pi has little of).
const CONCURRENT_LOGINS: usize = 2;

/// Client addresses remembered for throttling refusal logs.
const LOGGED_PEERS: usize = 1024;

/// Why the gate said no.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Refused {
    /// A user name with a wrong password.
    BadPassword,
    /// A user name the password file does not have.
    UnknownUser,
    /// No user name, and `allow_anonymous` is false.
    Anonymous,
    /// A will on a topic the client may not write.
    Will,
    /// A PUBLISH the ACL denies.
    Publish,
    /// A SUBSCRIBE filter the ACL denies.
    Subscribe,
    /// The client's password entry changed or went at a reload.
    Revoked,
    /// A client certificate without a common name, or one that is not the
    /// user name (`use_identity_as_username`).
    Identity,
    /// `max_connections` clients are connected.
    Connections,
    /// `max_connections_per_user` clients of its user name are connected.
    UserConnections,
    /// `max_connections_per_address` connections from its address are open.
    AddressConnections,
}

impl From<super::limits::Over> for Refused {
    fn from(over: super::limits::Over) -> Refused {
        match over {
            super::limits::Over::Connections => Refused::Connections,
            super::limits::Over::UserConnections => Refused::UserConnections,
        }
    }
}

impl Refused {
    /// The `reason` label.
    fn label(self) -> &'static str {
        match self {
            Refused::BadPassword => "bad_password",
            Refused::UnknownUser => "unknown_user",
            Refused::Anonymous => "anonymous",
            Refused::Will => "will_denied",
            Refused::Publish => "publish_denied",
            Refused::Subscribe => "subscribe_denied",
            Refused::Revoked => "revoked",
            Refused::Identity => "no_identity",
            Refused::Connections => "max_connections",
            Refused::UserConnections => "max_connections_per_user",
            Refused::AddressConnections => "max_connections_per_address",
        }
    }

    fn counter(self, m: &Metrics) -> &std::sync::atomic::AtomicU64 {
        match self {
            Refused::BadPassword => &m.broker_refused_password,
            Refused::UnknownUser => &m.broker_refused_user,
            Refused::Anonymous => &m.broker_refused_anonymous,
            Refused::Will => &m.broker_refused_will,
            Refused::Publish => &m.broker_refused_publish,
            Refused::Subscribe => &m.broker_refused_subscribe,
            Refused::Revoked => &m.broker_refused_revoked,
            Refused::Identity => &m.broker_refused_identity,
            Refused::Connections => &m.broker_refused_connections,
            Refused::UserConnections => &m.broker_refused_user_connections,
            Refused::AddressConnections => &m.broker_refused_address_connections,
        }
    }
}

/// The access rules in force, and where they come from.
pub(super) struct Gate {
    /// The files, re-read by [`Gate::reload`].
    files: AccessFiles,
    /// The rules now.
    rules: ArcSwap<Access>,
    /// Password hashes being computed.
    logins: Semaphore,
    /// Refusal logs, per client address and reason.
    logged: PerKey,
    /// Where refusals are counted.
    metrics: Arc<Metrics>,
    /// The front's connections: a refused client's address is its device's.
    peers: Arc<super::front::Peers>,
}

/// Who a session is, for the ACL.
fn client(session: &Session) -> Client<'_> {
    Client {
        id: &session.id.client_id,
        user: session.username().map(|u| &**u),
    }
}

impl Gate {
    /// A gate with the rules read from `files` (already checked by the
    /// configuration; read again here).
    pub(super) fn new(
        files: AccessFiles,
        metrics: Arc<Metrics>,
        peers: Arc<super::front::Peers>,
    ) -> anyhow::Result<Gate> {
        let rules = files.load().map_err(|problems| {
            let text: Vec<String> = problems
                .iter()
                .map(|(key, p)| format!("local.{key}: {p}"))
                .collect();
            anyhow::anyhow!("{}", text.join("; "))
        })?;
        Ok(Gate {
            files,
            rules: ArcSwap::from_pointee(rules),
            logins: Semaphore::new(CONCURRENT_LOGINS),
            logged: PerKey::per_minute(LOGGED_PEERS),
            metrics,
            peers,
        })
    }

    /// Counts a refusal and logs it, at most once a minute per address and reason. `addr` is
    /// the device's ([`super::front::Peers::device_addr`]).
    pub(super) fn refused(
        &self,
        why: Refused,
        client_id: &str,
        addr: Option<SocketAddr>,
        user: Option<&str>,
        topic: Option<&str>,
    ) {
        Metrics::add(why.counter(&self.metrics), 1);
        let peer = addr.map_or_else(|| client_id.to_owned(), |a| a.ip().to_string());
        if self.logged.admit(&format!("{peer} {}", why.label())) {
            warn!(
                reason = why.label(),
                client_id = %Printable(client_id),
                remote_addr = ?addr,
                user = user.map(|u| Printable(u).to_string()),
                topic = topic.map(|t| Printable(t).to_string()),
                "built-in broker refused a client (more of this reason from this address: counted, logged again in a minute)"
            );
        } else {
            debug!(reason = why.label(), client_id = %Printable(client_id), "built-in broker refused a client");
        }
    }

    /// The `ClientAuthenticate` hook: a CONNECT's user name, password and will.
    pub(super) async fn authenticate(&self, info: &ConnectInfo) -> ReturnType {
        let rules = self.rules.load_full();
        let user = info.username().map(|u| &**u);
        let refusal = match (user, &rules.passwords) {
            // Only the TLS listener with `use_identity_as_username` collects certificates
            // (verified against `ca_file` by then); rmqtt put its common name in the user name.
            _ if info.cert().is_some() => {
                let cn = info.cert().and_then(|c| c.common_name.as_deref());
                (cn.is_none() || cn != user).then_some(Refused::Identity)
            }
            (None, _) if rules.allow_anonymous => None,
            (None, _) => Some(Refused::Anonymous),
            // No password file: a user name is taken as given, as Mosquitto does.
            (Some(_), None) if rules.allow_anonymous => None,
            (Some(_), None) => Some(Refused::UnknownUser),
            (Some(user), Some(_)) => self.login(&rules, user, info.password()).await,
        };
        let result = match refusal {
            None => AuthResult::Allow(false, None),
            Some(why) => {
                let addr = self.peers.device_addr(info.id());
                self.refused(why, info.client_id(), addr, user, None);
                // As Mosquitto answers: Not authorized (MQTT 3.1.1 code 5, MQTT 5 0x87)
                // whatever was wrong with a login, so nothing tells a guesser which part;
                // a certificate without a name, Bad user name or password.
                if why == Refused::Identity {
                    AuthResult::BadUsernameOrPassword
                } else {
                    AuthResult::NotAuthorized
                }
            }
        };
        (false, Some(HookResult::AuthResult(result)))
    }

    /// Checks `user`'s password on the blocking pool.
    async fn login(
        &self,
        rules: &Arc<Access>,
        user: &str,
        password: Option<&bytes::Bytes>,
    ) -> Option<Refused> {
        let Ok(_turn) = self.logins.acquire().await else {
            return Some(Refused::BadPassword);
        };
        let (rules, user) = (Arc::clone(rules), user.to_owned());
        let password = password.cloned().unwrap_or_default();
        let login = tokio::task::spawn_blocking(move || {
            rules
                .passwords
                .as_ref()
                .map_or(Login::UnknownUser, |p| p.check(&user, &password))
        })
        .await
        .unwrap_or(Login::BadPassword);
        match login {
            Login::Accepted => None,
            Login::UnknownUser => Some(Refused::UnknownUser),
            Login::BadPassword => Some(Refused::BadPassword),
        }
    }

    /// Whether the ACL lets `session` publish on `topic`; a denial is counted and logged.
    pub(super) fn may_publish(&self, session: &Session, topic: &str) -> bool {
        let rules = self.rules.load();
        let Some(acl) = &rules.acl else {
            return true;
        };
        let who = client(session);
        if acl.may_publish(who, topic) {
            return true;
        }
        self.refused(
            Refused::Publish,
            who.id,
            self.peers.device_addr(&session.id),
            who.user,
            Some(topic),
        );
        false
    }

    /// Whether the client `id` may publish its will on `topic`; `count`: a
    /// denial is counted and logged (once per will: where it is first seen).
    pub(super) fn may_publish_will(&self, id: &Id, topic: &str, count: bool) -> bool {
        let rules = self.rules.load();
        let Some(acl) = &rules.acl else {
            return true;
        };
        let who = Client {
            id: &id.client_id,
            user: id.username.as_deref(),
        };
        if acl.may_publish(who, topic) {
            return true;
        }
        if count {
            let addr = self.peers.device_addr(id);
            self.refused(Refused::Will, who.id, addr, who.user, Some(topic));
        }
        false
    }

    /// The `ClientSubscribeCheckAcl` hook.
    pub(super) fn check_subscribe(
        &self,
        session: &Session,
        subscribe: &Subscribe,
        acc: Option<HookResult>,
    ) -> ReturnType {
        let rules = self.rules.load();
        let Some(acl) = &rules.acl else {
            return (true, acc);
        };
        let who = client(session);
        // A filter rmqtt let through but edgefn cannot read is refused.
        let filter = TopicFilter::new(&subscribe.topic_filter);
        if filter
            .as_ref()
            .is_ok_and(|filter| acl.may_subscribe(who, filter))
        {
            return (true, acc);
        }
        self.refused(
            Refused::Subscribe,
            who.id,
            self.peers.device_addr(&session.id),
            who.user,
            Some(&subscribe.topic_filter),
        );
        let refusal = SubscribeAclResult::new_failure(SubscribeAckReason::NotAuthorized);
        (false, Some(HookResult::SubscribeAclResult(refusal)))
    }

    /// Whether a message on `topic` may be routed to `session`; a denial is counted.
    pub(super) fn may_read(&self, session: &Session, topic: &str) -> bool {
        let allowed = self.can_read(session, topic);
        if !allowed {
            Metrics::add(&self.metrics.broker_refused_read, 1);
        }
        allowed
    }

    /// [`Gate::may_read`], counting nothing.
    pub(super) fn can_read(&self, session: &Session, topic: &str) -> bool {
        let rules = self.rules.load();
        rules
            .acl
            .as_ref()
            .is_none_or(|acl| acl.may_read(client(session), topic))
    }

    /// Whether there is an ACL to route by.
    pub(super) fn has_acl(&self) -> bool {
        self.rules.load().acl.is_some()
    }

    /// Re-reads the files; on success applies them and disconnects the
    /// clients whose password entry changed (see the module docs).
    pub(super) async fn reload(self: &Arc<Self>, scx: &ServerContext) {
        let files = self.files.clone();
        let loaded = tokio::task::spawn_blocking(move || files.load()).await;
        let new = match loaded {
            Ok(Ok(rules)) => Arc::new(rules),
            Ok(Err(problems)) => {
                Metrics::add(&self.metrics.access_reloads_failed, 1);
                for (key, problem) in problems {
                    error!(key = %format!("local.{key}"), %problem, "cannot reload the built-in broker's access files: the rules before stay");
                }
                return;
            }
            Err(e) => {
                Metrics::add(&self.metrics.access_reloads_failed, 1);
                error!(error = %e, "cannot reload the built-in broker's access files");
                return;
            }
        };
        let old = self.rules.swap(Arc::clone(&new));
        Metrics::add(&self.metrics.access_reloads, 1);
        let entries: Vec<_> = scx.extends.shared().await.iter().collect();
        let mut revoked = 0;
        for entry in entries {
            let Some(session) = entry.session() else {
                continue;
            };
            let Some(user) = session.username() else {
                continue;
            };
            // Logged in by certificate: the password file does not concern it.
            if session
                .connect_info()
                .await
                .is_ok_and(|i| i.cert().is_some())
            {
                continue;
            }
            let kept = match (&old.passwords, &new.passwords) {
                (Some(before), Some(now)) => before.same_user(now, user),
                (None, None) => true,
                _ => false,
            };
            if kept {
                continue;
            }
            revoked += 1;
            // Each in a task of its own: a session busy with a handshake may
            // take its lock's patience, and the next signal must not wait.
            let gate = Arc::clone(self);
            tokio::spawn(async move {
                let kicked = match entry.try_lock().await {
                    Ok(mut locked) => locked.kick(true, true, true).await.map(|_| ()),
                    Err(e) => Err(e),
                };
                match kicked {
                    Ok(()) => gate.refused(
                        Refused::Revoked,
                        &session.id.client_id,
                        gate.peers.device_addr(&session.id),
                        session.username().map(|u| &**u),
                        None,
                    ),
                    Err(e) => warn!(
                        client_id = %Printable(&session.id.client_id),
                        error = %e,
                        "a client whose password entry changed could not be disconnected"
                    ),
                }
            });
        }
        info!(
            users = new.passwords.as_ref().map_or(0, |p| p.len()),
            acl = new.acl.is_some(),
            revoked,
            "built-in broker's access files reloaded"
        );
    }
}
