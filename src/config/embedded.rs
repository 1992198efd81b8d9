//! The built-in broker's keys: who may connect to it, and what they may do.

use super::*;
use crate::access::AccessFiles;

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
