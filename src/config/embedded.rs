//! The built-in broker's keys: where it listens, who may connect to it,
//! what they may do, and what it holds for them.

use std::num::{NonZeroU32, NonZeroUsize};

use super::*;
use crate::access::AccessFiles;

/// `[local]` with `embedded = true`: the broker built into edgefn.
#[derive(Debug, Clone)]
pub struct EmbeddedConfig {
    /// TCP address devices connect to (port 0: a free port).
    pub listen: SocketAddr,
    /// A second listener, for MQTT over TLS.
    pub tls: Option<TlsListener>,
    /// Who may connect, and what they may do (re-read on SIGHUP).
    pub access: AccessFiles,
    /// What it holds for its clients, and how many it takes.
    pub limits: BrokerLimits,
}

/// The built-in broker's bounds (DELIVERY.md says what happens at each).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokerLimits {
    /// `memory_limit`: most payload bytes held for all clients together
    /// (queued for online and offline sessions, in flight, retained).
    pub memory_limit: usize,
    /// `max_queued_messages`: most messages waiting for one session behind
    /// its in-flight window.
    pub max_queued_messages: usize,
    /// `max_queued_bytes`: most payload bytes held for one session (queued
    /// and in flight).
    pub max_queued_bytes: usize,
    /// `max_connections`: most clients connected at once.
    pub max_connections: NonZeroUsize,
    /// `max_connections_per_user`: most clients of one user name (or of
    /// anonymous clients) connected at once.
    pub max_connections_per_user: Option<NonZeroUsize>,
    /// `max_connections_per_address`: most open connections from one IP
    /// address on the plain listener, logged in or not.
    pub max_connections_per_address: NonZeroUsize,
    /// `max_publish_rate`: PUBLISH packets per second one connection may
    /// send; beyond it (after a second's worth at once) its publishes wait.
    pub max_publish_rate: Option<NonZeroU32>,
    /// `max_keepalive`, in seconds: the longest keep-alive an MQTT 5 client
    /// is given (asking for none or more, it is told this one).
    pub max_keepalive: u16,
}

/// `local.memory_limit`: with the daemon's own 25–30 MB, the built-in broker
/// stays within 64 MB whatever clients make it hold.
const DEFAULT_MEMORY_LIMIT: &str = "32MiB";

/// `local.max_queued_bytes`: a quarter of the default `memory_limit`, so
/// that a few offline sessions cannot take all of it.
const DEFAULT_MAX_QUEUED_BYTES: &str = "8MiB";

/// `local.max_queued_messages`: Mosquitto's default.
const DEFAULT_MAX_QUEUED_MESSAGES: i64 = 1000;

/// `local.max_connections`: a Pi serves this many devices on a few MB.
const DEFAULT_MAX_CONNECTIONS: i64 = 1024;

/// `local.max_connections_per_address`: more than a LAN device opens, few
/// enough that one address cannot take the gateway's sockets.
const DEFAULT_MAX_CONNECTIONS_PER_ADDRESS: i64 = 64;

/// `local.max_keepalive`: MQTT's longest, as Mosquitto's default.
const DEFAULT_MAX_KEEPALIVE: &str = "65535s";

/// Upper bound of `max_connections` and `max_connections_per_user`: the
/// sessions the broker keeps at most (connected and offline).
const MAX_CONNECTIONS: i64 = 4096;

impl Default for BrokerLimits {
    /// The defaults of `[local]` (with `max_message_size` at its default).
    fn default() -> BrokerLimits {
        let size = |s: &str| {
            s.parse::<bytesize::ByteSize>()
                .map_or(0, |b| b.as_u64() as usize)
        };
        BrokerLimits {
            memory_limit: size(DEFAULT_MEMORY_LIMIT),
            max_queued_messages: DEFAULT_MAX_QUEUED_MESSAGES as usize,
            max_queued_bytes: size(DEFAULT_MAX_QUEUED_BYTES),
            max_connections: NonZeroUsize::new(DEFAULT_MAX_CONNECTIONS as usize)
                .unwrap_or(NonZeroUsize::MIN),
            max_connections_per_user: None,
            max_connections_per_address: NonZeroUsize::new(
                DEFAULT_MAX_CONNECTIONS_PER_ADDRESS as usize,
            )
            .unwrap_or(NonZeroUsize::MIN),
            max_publish_rate: None,
            max_keepalive: u16::MAX,
        }
    }
}

/// Checks the built-in broker's bounds: `memory_limit`, `max_queued_bytes`
/// (each at least `max_message_size`, or not one message could be held),
/// `max_queued_messages`, `max_connections`, `max_connections_per_user`,
/// `max_connections_per_address`, `max_publish_rate`, `max_keepalive`.
pub(super) fn check_limits(
    p: &mut Checker,
    raw: &LocalTable,
    max_message_size: usize,
) -> BrokerLimits {
    let at_least_one_message = |p: &mut Checker, key: &str, value: Option<&str>, default: &str| {
        let size = p.size(key, value, default);
        if size < max_message_size as u64 {
            p.push(
                key,
                format!(
                    "{size} bytes is less than local.max_message_size ({max_message_size}): not one message could be held"
                ),
            );
        }
        usize::try_from(size).unwrap_or(usize::MAX)
    };
    let memory_limit = at_least_one_message(
        p,
        "local.memory_limit",
        raw.memory_limit.as_deref(),
        DEFAULT_MEMORY_LIMIT,
    );
    let max_queued_bytes = at_least_one_message(
        p,
        "local.max_queued_bytes",
        raw.max_queued_bytes.as_deref(),
        DEFAULT_MAX_QUEUED_BYTES,
    );
    let max_queued_messages = p.int(
        "local.max_queued_messages",
        raw.max_queued_messages,
        DEFAULT_MAX_QUEUED_MESSAGES,
        (1, 1_000_000),
    ) as usize;
    let max_connections = p.int(
        "local.max_connections",
        raw.max_connections,
        DEFAULT_MAX_CONNECTIONS,
        (1, MAX_CONNECTIONS),
    ) as usize;
    let max_connections_per_address = p.int(
        "local.max_connections_per_address",
        raw.max_connections_per_address,
        DEFAULT_MAX_CONNECTIONS_PER_ADDRESS,
        (1, MAX_CONNECTIONS),
    ) as usize;
    let mut optional = |key: &str, value: Option<i64>, max: i64| {
        value.and_then(|v| usize::try_from(p.int(key, Some(v), 1, (1, max))).ok())
    };
    let max_connections_per_user = optional(
        "local.max_connections_per_user",
        raw.max_connections_per_user,
        MAX_CONNECTIONS,
    )
    .and_then(NonZeroUsize::new);
    let max_publish_rate = optional("local.max_publish_rate", raw.max_publish_rate, 1_000_000)
        .and_then(|r| NonZeroU32::new(r as u32));
    let max_keepalive = p.duration(
        "local.max_keepalive",
        raw.max_keepalive.as_deref(),
        DEFAULT_MAX_KEEPALIVE,
    );
    let max_keepalive = match u16::try_from(max_keepalive.as_secs()) {
        Ok(secs) if secs >= 5 => secs,
        _ => {
            p.push(
                "local.max_keepalive",
                format!(
                    "{} is out of range; expected 5s to 65535s",
                    humantime::format_duration(max_keepalive)
                ),
            );
            u16::MAX
        }
    };
    BrokerLimits {
        memory_limit,
        max_queued_messages,
        max_queued_bytes,
        max_connections: NonZeroUsize::new(max_connections).unwrap_or(NonZeroUsize::MIN),
        max_connections_per_user,
        max_connections_per_address: NonZeroUsize::new(max_connections_per_address)
            .unwrap_or(NonZeroUsize::MIN),
        max_publish_rate,
        max_keepalive,
    }
}

/// The built-in broker's TLS listener (`tls_listen` and its files).
#[derive(Debug, Clone)]
pub struct TlsListener {
    /// Where it listens.
    pub listen: SocketAddr,
    /// `cert_file`, `key_file`, and `ca_file` for client certificates.
    pub files: crate::tls::TlsFiles,
    /// Whether a client must show a certificate from `ca_file`.
    pub require_certificate: bool,
    /// Whether a client certificate's common name is its user name, and
    /// logs it in without a password.
    pub use_identity_as_username: bool,
    /// For `edgefn check`.
    pub summary: String,
}

/// Checks `tls_listen` and the files, flags and address that go with it:
/// `ca_file`, `cert_file` and `key_file` (Mosquitto's `cafile`,
/// `certfile`, `keyfile`) are the listener's with the built-in broker.
pub(super) fn check_tls_listener(
    p: &mut Checker,
    raw: &LocalTable,
    listen: SocketAddr,
    base: &Path,
) -> Option<TlsListener> {
    let require_certificate = raw.require_certificate.unwrap_or(false);
    let use_identity_as_username = raw.use_identity_as_username.unwrap_or(false);
    let Some(tls_listen) = raw.tls_listen.as_deref() else {
        p.not_applicable(
            "local",
            &[
                ("ca_file", raw.ca_file.is_some()),
                ("cert_file", raw.cert_file.is_some()),
                ("key_file", raw.key_file.is_some()),
                ("require_certificate", raw.require_certificate.is_some()),
                ("use_identity_as_username", raw.use_identity_as_username.is_some()),
            ],
            "belongs to the built-in broker's TLS listener: set tls_listen = \"IP:PORT\" (e.g. \"0.0.0.0:8883\")",
        );
        return None;
    };
    let Ok(tls_listen) = tls_listen.parse::<SocketAddr>() else {
        p.push(
            "local.tls_listen",
            format!("{tls_listen:?} is not an address; expected e.g. \"0.0.0.0:8883\""),
        );
        return None;
    };
    if tls_listen.port() == listen.port() && tls_listen.port() != 0 {
        p.push(
            "local.tls_listen",
            format!(
                "port {} is listen's too: give TLS its own port (8883 by custom)",
                listen.port()
            ),
        );
    }
    if use_identity_as_username && !require_certificate {
        p.push(
            "local.use_identity_as_username",
            "needs require_certificate = true: the user name comes from the client's certificate",
        );
    }
    let files = crate::tls::TlsFiles {
        ca_file: raw.ca_file.as_ref().map(|f| base.join(f)),
        cert_file: raw.cert_file.as_ref().map(|f| base.join(f)),
        key_file: raw.key_file.as_ref().map(|f| base.join(f)),
    };
    match files.check_server(require_certificate) {
        Ok(summary) => Some(TlsListener {
            listen: tls_listen,
            files,
            require_certificate,
            use_identity_as_username,
            summary,
        }),
        Err(problems) => {
            for problem in problems {
                p.push(format!("local.{}", problem.key), problem.message);
            }
            None
        }
    }
}

/// Checks `password_file`, `acl_file` and `allow_anonymous` (whose default
/// is true only when every listener is on loopback), reading both files so
/// that their problems are reported by line. A listener off loopback that
/// would take nobody is an error; one that takes anonymous clients, a
/// warning.
pub(super) fn check_access(
    p: &mut Checker,
    raw: &LocalTable,
    listen: SocketAddr,
    tls: Option<&TlsListener>,
    base: &Path,
) -> AccessFiles {
    let exposed = [Some(listen), tls.map(|t| t.listen)]
        .into_iter()
        .flatten()
        .find(|a| !a.ip().is_loopback());
    let files = AccessFiles {
        password_file: raw.password_file.as_ref().map(|f| base.join(f)),
        acl_file: raw.acl_file.as_ref().map(|f| base.join(f)),
        allow_anonymous: raw.allow_anonymous.unwrap_or(exposed.is_none()),
    };
    let certificates = tls.is_some_and(|t| t.use_identity_as_username);
    match files.load() {
        Err(problems) => {
            for (key, problem) in problems {
                p.push(format!("local.{key}"), problem.to_string());
            }
        }
        Ok(access) => {
            let names_users = access.acl.as_ref().is_some_and(|acl| acl.names_users());
            if names_users && files.allow_anonymous && files.password_file.is_none() {
                p.push(
                    "local.acl_file",
                    "has user lines or %u patterns, but without password_file a client may give any user name (allow_anonymous is true): set password_file, or allow_anonymous = false",
                );
            }
        }
    }
    let Some(listen) = exposed else {
        return files;
    };
    if files.allow_anonymous {
        p.warnings.push(Problem {
            key: "local.allow_anonymous".into(),
            message: format!(
                "the built-in broker on {listen} takes clients without a user name from the network{}; keep it on a network whose devices you trust, or set allow_anonymous = false (docs/BROKER.md)",
                if files.acl_file.is_some() { " (within the acl_file's anonymous rules)" } else { ", and lets them publish and subscribe anywhere" }
            ),
        });
    } else if files.password_file.is_none() && !certificates {
        p.push(
            "local.password_file",
            format!(
                "is missing: the built-in broker on {listen} takes no client without a user name off loopback (allow_anonymous defaults to false there), so no device could connect; create one with `mosquitto_passwd -c FILE USER` and set password_file, or set allow_anonymous = true to take any client on this network"
            ),
        );
    }
    files
}
