//! Brokers edgefn connects to as a client: URLs, credentials and TLS
//! files, checked.

use super::*;

/// How edgefn connects, as a client, to a broker.
#[derive(Debug, Clone)]
pub struct BrokerClientConfig {
    /// Host name or address.
    pub host: String,
    /// TCP port.
    pub port: u16,
    /// MQTT client id; it names the persistent session, so it must be stable
    /// across restarts and unique per broker.
    pub client_id: String,
    /// Optional user name.
    pub username: Option<String>,
    /// Optional password (set it with `EDGEFN_LOCAL__PASSWORD` or
    /// `EDGEFN_UPSTREAM__PASSWORD` rather than in the file).
    pub password: Option<String>,
    /// Unacknowledged QoS 1 messages allowed in flight (the MQTT 5 Receive
    /// Maximum for ingest, the publish window for upstream).
    pub in_flight: u16,
    /// How long the broker keeps the session (and queues for it) while
    /// edgefn is disconnected.
    pub session_expiry: Duration,
    /// MQTT keep-alive interval.
    pub keep_alive: Duration,
    /// TLS, for an `mqtts://` URL.
    pub tls: Option<crate::tls::Tls>,
}

impl BrokerClientConfig {
    /// Names the persistent session this client has on its broker (what
    /// the broker keys it by is the client id; the address tells brokers
    /// apart).
    pub fn session_name(&self) -> String {
        format!("{} {}", self.url(), self.client_id)
    }

    /// `mqtt://HOST:PORT` or `mqtts://HOST:PORT`, as for a user.
    pub fn url(&self) -> String {
        let scheme = if self.tls.is_some() { "mqtts" } else { "mqtt" };
        if self.host.contains(':') {
            format!("{scheme}://[{}]:{}", self.host, self.port)
        } else {
            format!("{scheme}://{}:{}", self.host, self.port)
        }
    }
}

/// A broker URL, parsed.
pub(super) struct BrokerUrl {
    /// A host name or an IP address (IPv6 without its brackets).
    pub(super) host: String,
    /// The port, or the scheme's default.
    pub(super) port: u16,
    /// `mqtts://`
    pub(super) tls: bool,
}

/// A broker connection for a command-line tool (`edgefn deploy`): `url`
/// and the TLS files (CA, client certificate, its key) checked as for
/// `[upstream]`, each problem keyed by its flag.
pub fn tool_broker(
    url: &str,
    files: [Option<PathBuf>; 3],
    username: Option<String>,
    password: Option<String>,
    client_id: String,
) -> Result<BrokerClientConfig, Vec<Problem>> {
    let mut p = Checker::default();
    let parsed = parse_mqtt_url(&mut p, "--broker", url);
    let files = files.map(|f| f.map(|f| f.to_string_lossy().into_owned()));
    let tls = check_tls(&mut p, "tool", parsed.as_ref(), files, false, Path::new(""));
    if !p.problems.is_empty() {
        for problem in &mut p.problems {
            problem.key = match problem.key.as_str() {
                "tool.url" => "--broker",
                "tool.ca_file" => "--ca-file",
                "tool.cert_file" => "--cert-file",
                "tool.key_file" => "--client-key-file",
                other => other,
            }
            .to_owned();
        }
        return Err(p.problems);
    }
    let url = parsed.expect("checked");
    Ok(BrokerClientConfig {
        host: url.host,
        port: url.port,
        client_id,
        username,
        password,
        in_flight: 64,
        session_expiry: Duration::ZERO,
        keep_alive: Duration::from_secs(30),
        tls,
    })
}

/// Parses `mqtt://HOST[:PORT]` (default port 1883) or `mqtts://HOST[:PORT]`
/// (TLS, default port 8883).
pub(super) fn parse_mqtt_url(p: &mut Checker, key: &str, url: &str) -> Option<BrokerUrl> {
    let (rest, tls, default_port) = if let Some(rest) = url.strip_prefix("mqtt://") {
        (rest, false, 1883)
    } else if let Some(rest) = url.strip_prefix("mqtts://") {
        (rest, true, 8883)
    } else {
        p.push(
            key,
            format!(
                "{url:?} is not supported; expected \"mqtt://HOST:PORT\" or \"mqtts://HOST:PORT\" (TLS)"
            ),
        );
        return None;
    };
    let rest = rest.trim_end_matches('/');
    // An IPv6 literal is bracketed; a port, if any, follows the bracket.
    let port_sep = match rest.rfind(']') {
        Some(end) => rest[end..].rfind(':').map(|i| end + i),
        None => rest.rfind(':'),
    };
    let (host, port) = match port_sep.map(|i| (&rest[..i], &rest[i + 1..])) {
        Some((h, port)) => match port.parse::<u16>() {
            Ok(port) if port > 0 => (h, port),
            _ => {
                p.push(key, format!("{url:?} has an invalid port {port:?}"));
                return None;
            }
        },
        None => (rest, default_port),
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() {
        p.push(key, format!("{url:?} has no host"));
        return None;
    }
    Some(BrokerUrl {
        host: host.to_owned(),
        port,
        tls,
    })
}

/// Whether `host` is this machine (`localhost` or a loopback address).
pub(super) fn is_loopback(host: &str) -> bool {
    host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// Checks `section`'s TLS files against its URL: loaded for `mqtts://`,
/// refused for `mqtt://`; loaded too when the URL itself was wrong (`None`),
/// so their problems are reported with the URL's. Relative paths are
/// resolved against `base`. Warns when credentials would cross the network
/// unencrypted.
pub(super) fn check_tls(
    p: &mut Checker,
    section: &str,
    url: Option<&BrokerUrl>,
    files: [Option<String>; 3],
    has_credentials: bool,
    base: &Path,
) -> Option<crate::tls::Tls> {
    let [ca_file, cert_file, key_file] = files.map(|f| f.map(|f| base.join(f)));
    let files = crate::tls::TlsFiles {
        ca_file,
        cert_file,
        key_file,
    };
    // Reads the files, recording their problems under `section` (with
    // `url_ok` false, only those of the files themselves).
    let load = |p: &mut Checker, url_ok: bool| match files.load() {
        Ok(tls) => Some(tls),
        Err(problems) => {
            for problem in problems {
                if url_ok || problem.key != "ca_file" || files.ca_file.is_some() {
                    p.push(format!("{section}.{}", problem.key), problem.message);
                }
            }
            None
        }
    };
    let Some(url) = url else {
        if files.any() {
            load(p, false);
        }
        return None;
    };
    if url.tls && rustls::pki_types::ServerName::try_from(url.host.as_str()).is_err() {
        p.push(
            format!("{section}.url"),
            format!(
                "{:?} cannot be checked against a TLS certificate; expected a DNS name or an IP address",
                url.host
            ),
        );
    }
    if !url.tls && has_credentials && !is_loopback(&url.host) {
        p.warnings.push(Problem {
            key: format!("{section}.url"),
            message: format!(
                "the username and password go to {} unencrypted; use mqtts:// (TLS)",
                url.host
            ),
        });
    }
    if !url.tls {
        p.not_applicable(
            section,
            &[
                ("ca_file", files.ca_file.is_some()),
                ("cert_file", files.cert_file.is_some()),
                ("key_file", files.key_file.is_some()),
            ],
            "only applies to TLS: use an mqtts:// URL",
        );
        return None;
    }
    load(p, true)
}
