//! TLS for edgefn's MQTT connections (`mqtts://`): whom to trust and who
//! edgefn is.
//!
//! - **Trust**: the certificates in `ca_file` (PEM) if it is set, else the
//!   system's CA certificates (`/etc/ssl/certs` on Debian and Raspberry Pi
//!   OS, from the `ca-certificates` package). The broker's certificate must
//!   chain to one of them and name the host of the URL (a DNS name, or an
//!   IP address in its subject alternative names).
//! - **Identity** (optional): `cert_file` (PEM certificate chain, the
//!   device's certificate first) with `key_file` (its PEM private key:
//!   PKCS#8, PKCS#1 or SEC1), for brokers that authenticate clients by
//!   certificate (AWS IoT Core, Mosquitto's `require_certificate true`).
//!
//! Everything is read and checked when the configuration is loaded, so
//! `edgefn check` reports a missing file, a file without certificates or a
//! key that does not belong to its certificate, naming the key. rustls with
//! the *ring* provider; TLS 1.3 and 1.2.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::{ClientConfig, RootCertStore};

/// The TLS files of one broker connection, as configured (resolved paths).
#[derive(Debug, Clone, Default)]
pub struct TlsFiles {
    /// `ca_file`: the CA certificates to trust instead of the system's.
    pub ca_file: Option<PathBuf>,
    /// `cert_file`: edgefn's certificate chain.
    pub cert_file: Option<PathBuf>,
    /// `key_file`: the private key of `cert_file`.
    pub key_file: Option<PathBuf>,
}

/// A checked TLS client setup.
#[derive(Debug, Clone)]
pub struct Tls {
    /// What rumqttc connects with.
    pub config: Arc<ClientConfig>,
    /// For `edgefn check`: whom it trusts and whether it shows a
    /// certificate, e.g. `TLS, CA /etc/edgefn/ca.pem, client certificate
    /// /etc/edgefn/pi-01.crt`.
    pub summary: String,
}

/// A problem with one of the files: the key (`ca_file`, `cert_file` or
/// `key_file`, without its section) and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsProblem {
    /// `ca_file`, `cert_file` or `key_file`.
    pub key: &'static str,
    /// What is wrong, naming the file.
    pub message: String,
}

impl TlsProblem {
    fn new(key: &'static str, message: impl Into<String>) -> TlsProblem {
        TlsProblem {
            key,
            message: message.into(),
        }
    }
}

impl TlsFiles {
    /// Whether any file is set.
    pub fn any(&self) -> bool {
        self.ca_file.is_some() || self.cert_file.is_some() || self.key_file.is_some()
    }

    /// Reads the files and builds the client setup. Every file that cannot
    /// be read or holds nothing usable is reported; whether the key belongs
    /// to the certificate is checked once both could be read.
    pub fn load(&self) -> Result<Tls, Vec<TlsProblem>> {
        let mut problems = Vec::new();
        let mut summary = String::from("TLS");

        let mut roots = RootCertStore::empty();
        match &self.ca_file {
            Some(path) => match certificates("ca_file", path) {
                Ok(certs) => {
                    let (added, _ignored) = roots.add_parsable_certificates(certs);
                    if added == 0 {
                        problems.push(TlsProblem::new(
                            "ca_file",
                            format!("{}: no usable CA certificate in it", path.display()),
                        ));
                    }
                    summary.push_str(&format!(", CA {}", path.display()));
                }
                Err(p) => problems.push(p),
            },
            None => {
                let found = rustls_native_certs::load_native_certs();
                let (added, _ignored) = roots.add_parsable_certificates(found.certs);
                if added == 0 {
                    let why = found
                        .errors
                        .first()
                        .map(|e| format!(" ({e})"))
                        .unwrap_or_default();
                    problems.push(TlsProblem::new(
                        "ca_file",
                        format!(
                            "is not set and no system CA certificates were found{why}: \
                             apt-get install ca-certificates, or set ca_file to the \
                             broker's CA in PEM"
                        ),
                    ));
                }
                summary.push_str(&format!(", {added} system CA certificates"));
            }
        }

        let identity = match (&self.cert_file, &self.key_file) {
            (None, None) => None,
            (Some(_), None) => {
                problems.push(TlsProblem::new(
                    "key_file",
                    "is missing: cert_file needs the private key that goes with it",
                ));
                None
            }
            (None, Some(_)) => {
                problems.push(TlsProblem::new(
                    "cert_file",
                    "is missing: key_file needs the certificate that goes with it",
                ));
                None
            }
            (Some(cert), Some(key)) => {
                let chain = certificates("cert_file", cert).map_err(|p| problems.push(p));
                let key_der = private_key(key).map_err(|p| problems.push(p));
                summary.push_str(&format!(", client certificate {}", cert.display()));
                chain.ok().zip(key_der.ok())
            }
        };

        if !problems.is_empty() {
            return Err(problems);
        }
        let builder =
            ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                .with_safe_default_protocol_versions()
                .expect("ring supports the default TLS versions")
                .with_root_certificates(roots);
        let config = match identity {
            None => builder.with_no_client_auth(),
            Some((chain, key)) => builder
                .with_client_auth_cert(chain, key)
                .map_err(|e| self.mismatch(&e))?,
        };
        Ok(Tls {
            config: Arc::new(config),
            summary,
        })
    }
}

/// The files of the built-in broker's TLS listener, checked: `cert_file`
/// and `key_file` (the broker's certificate chain and its key, required),
/// and `ca_file` (the CA client certificates must chain to; required with
/// `require_certificate`). The listener itself is built by rmqtt from the
/// same paths.
impl TlsFiles {
    /// Reads the files as a TLS server would and checks that the key goes
    /// with the certificate; a one-line summary for `edgefn check`.
    pub fn check_server(&self, require_certificate: bool) -> Result<String, Vec<TlsProblem>> {
        let mut problems = Vec::new();
        let chain = match &self.cert_file {
            Some(path) => certificates("cert_file", path)
                .map_err(|p| problems.push(p))
                .ok(),
            None => {
                problems.push(TlsProblem::new(
                    "cert_file",
                    "is missing: the TLS listener needs the broker's certificate (PEM)",
                ));
                None
            }
        };
        let key = match &self.key_file {
            Some(path) => private_key(path).map_err(|p| problems.push(p)).ok(),
            None => {
                problems.push(TlsProblem::new(
                    "key_file",
                    "is missing: the TLS listener needs the private key of cert_file (PEM)",
                ));
                None
            }
        };
        let mut summary = String::from("TLS");
        let clients = match (&self.ca_file, require_certificate) {
            (Some(path), _) => match certificates("ca_file", path) {
                Ok(certs) => {
                    let mut roots = RootCertStore::empty();
                    if roots.add_parsable_certificates(certs).0 == 0 {
                        problems.push(TlsProblem::new(
                            "ca_file",
                            format!("{}: no usable CA certificate in it", path.display()),
                        ));
                    }
                    Some(roots)
                }
                Err(p) => {
                    problems.push(p);
                    None
                }
            },
            (None, true) => {
                problems.push(TlsProblem::new(
                    "ca_file",
                    "is missing: require_certificate needs the CA that client certificates must chain to",
                ));
                None
            }
            (None, false) => None,
        };
        if !problems.is_empty() {
            return Err(problems);
        }
        let (Some(chain), Some(key)) = (chain, key) else {
            unreachable!("both read, or a problem recorded");
        };
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let verifier = match clients.filter(|_| require_certificate) {
            Some(roots) => {
                summary.push_str(&format!(
                    ", client certificates from {}",
                    self.ca_file.as_deref().unwrap_or(Path::new("")).display()
                ));
                rustls::server::WebPkiClientVerifier::builder_with_provider(
                    Arc::new(roots),
                    provider.clone(),
                )
                .build()
                .map_err(|e| vec![TlsProblem::new("ca_file", e.to_string())])?
            }
            None => rustls::server::WebPkiClientVerifier::no_client_auth(),
        };
        rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("ring supports the default TLS versions")
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain, key)
            .map_err(|e| self.mismatch(&e))?;
        Ok(summary)
    }
}

impl TlsFiles {
    /// `key_file` does not go with `cert_file`, as rustls found.
    fn mismatch(&self, e: &rustls::Error) -> Vec<TlsProblem> {
        let name =
            |p: &Option<PathBuf>| p.as_deref().unwrap_or(Path::new("")).display().to_string();
        vec![TlsProblem::new(
            "key_file",
            format!(
                "{} does not go with cert_file {}: {e}",
                name(&self.key_file),
                name(&self.cert_file)
            ),
        )]
    }
}

/// The unencrypted PEM private key in `path`.
fn private_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsProblem> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| {
        // PKCS#8, or the older OpenSSL format with a Proc-Type header.
        let encrypted = std::fs::read_to_string(path).is_ok_and(|text| {
            text.contains("-----BEGIN ENCRYPTED PRIVATE KEY-----")
                || text.contains("Proc-Type: 4,ENCRYPTED")
        });
        let why = if encrypted {
            "an encrypted private key, which edgefn cannot use: store it \
             decrypted (openssl pkey -in KEY -out KEY.plain), readable by \
             root and edgefn only"
                .to_owned()
        } else {
            pem_error(
                &e,
                "no PEM private key in it (expected e.g. \"-----BEGIN PRIVATE KEY-----\")",
            )
        };
        TlsProblem::new("key_file", format!("{}: {why}", path.display()))
    })
}

/// The PEM certificates in `path` (at least one).
fn certificates(
    key: &'static str,
    path: &Path,
) -> Result<Vec<CertificateDer<'static>>, TlsProblem> {
    const NONE: &str = "no PEM certificate in it (expected \"-----BEGIN CERTIFICATE-----\")";
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| {
            TlsProblem::new(key, format!("{}: {}", path.display(), pem_error(&e, NONE)))
        })?;
    if certs.is_empty() {
        return Err(TlsProblem::new(key, format!("{}: {NONE}", path.display())));
    }
    Ok(certs)
}

/// A PEM reading error in words; `none` when the file holds nothing of the
/// kind wanted.
fn pem_error(e: &rustls::pki_types::pem::Error, none: &str) -> String {
    use rustls::pki_types::pem::Error;
    match e {
        Error::Io(io) => io.to_string(),
        Error::NoItemsFound => none.to_owned(),
        Error::MissingSectionEnd { end_marker } => format!(
            "not valid PEM: its \"-----END {}-----\" line is missing (cut short?)",
            String::from_utf8_lossy(end_marker)
        ),
        Error::IllegalSectionStart { line } => format!(
            "not valid PEM: {:?} does not start a section",
            String::from_utf8_lossy(line)
        ),
        other => format!("not valid PEM: {other}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A self-signed certificate for `127.0.0.1` and its key, as PEM files
    /// in `dir`: (cert, key). It serves as CA and as client certificate.
    fn files(dir: &Path) -> (PathBuf, PathBuf) {
        let c = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_owned()]).unwrap();
        let paths = (dir.join("c.pem"), dir.join("c.key"));
        std::fs::write(&paths.0, c.cert.pem()).unwrap();
        std::fs::write(&paths.1, c.signing_key.serialize_pem()).unwrap();
        paths
    }

    fn keys(r: Result<Tls, Vec<TlsProblem>>) -> Vec<&'static str> {
        r.err().unwrap().iter().map(|p| p.key).collect()
    }

    #[test]
    fn a_ca_and_a_client_certificate_make_a_client_setup() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = files(dir.path());
        let ca = cert.clone();
        let tls = TlsFiles {
            ca_file: Some(ca.clone()),
            cert_file: Some(cert.clone()),
            key_file: Some(key),
        }
        .load()
        .unwrap();
        assert!(tls.config.client_auth_cert_resolver.has_certs());
        assert_eq!(
            tls.summary,
            format!(
                "TLS, CA {}, client certificate {}",
                ca.display(),
                cert.display()
            )
        );
    }

    #[test]
    fn bad_files_are_named_by_their_key() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, _) = files(dir.path());
        let ca = cert.clone();
        let missing = dir.path().join("missing.pem");
        let garbage = dir.path().join("garbage.pem");
        std::fs::write(&garbage, "not a certificate").unwrap();

        let r = TlsFiles {
            ca_file: Some(missing.clone()),
            ..TlsFiles::default()
        }
        .load();
        let p = r.err().unwrap();
        assert_eq!(p[0].key, "ca_file");
        assert!(p[0].message.starts_with(&missing.display().to_string()));

        let r = TlsFiles {
            ca_file: Some(garbage.clone()),
            cert_file: Some(cert.clone()),
            key_file: Some(garbage.clone()),
        };
        assert_eq!(keys(r.load()), ["ca_file", "key_file"]);

        let only_cert = TlsFiles {
            ca_file: Some(ca.clone()),
            cert_file: Some(cert.clone()),
            key_file: None,
        };
        assert_eq!(keys(only_cert.load()), ["key_file"]);

        // Encrypted keys (PKCS#8 and OpenSSL's older format), and a
        // certificate cut short.
        let legacy = dir.path().join("legacy.key");
        std::fs::write(
            &legacy,
            "-----BEGIN RSA PRIVATE KEY-----\nProc-Type: 4,ENCRYPTED\n\
             DEK-Info: AES-128-CBC,00000000000000000000000000000000\n\nMIIB\n\
             -----END RSA PRIVATE KEY-----\n",
        )
        .unwrap();
        let p = TlsFiles {
            ca_file: Some(ca.clone()),
            cert_file: Some(cert.clone()),
            key_file: Some(legacy),
        }
        .load()
        .err()
        .unwrap();
        assert!(p[0].message.contains("an encrypted private key"), "{p:?}");
        let encrypted = dir.path().join("encrypted.key");
        std::fs::write(
            &encrypted,
            "-----BEGIN ENCRYPTED PRIVATE KEY-----\nMIIB\n-----END ENCRYPTED PRIVATE KEY-----\n",
        )
        .unwrap();
        let cut = dir.path().join("cut.pem");
        let text = std::fs::read_to_string(&cert).unwrap();
        std::fs::write(&cut, &text[..text.len() / 2]).unwrap();
        let p = TlsFiles {
            ca_file: Some(cut),
            cert_file: Some(cert.clone()),
            key_file: Some(encrypted),
        }
        .load()
        .err()
        .unwrap();
        assert_eq!(p[0].key, "ca_file");
        assert!(
            p[0].message.ends_with(
                "not valid PEM: its \"-----END CERTIFICATE-----\" line is missing (cut short?)"
            ),
            "{p:?}"
        );
        assert_eq!(p[1].key, "key_file");
        assert!(p[1].message.contains("an encrypted private key"), "{p:?}");

        // A key that is not the certificate's.
        let other = tempfile::tempdir().unwrap();
        let (_, other_key) = files(other.path());
        let r = TlsFiles {
            ca_file: Some(ca),
            cert_file: Some(cert),
            key_file: Some(other_key),
        }
        .load();
        let p = r.err().unwrap();
        assert_eq!(p[0].key, "key_file");
        assert!(p[0].message.contains("does not go with cert_file"), "{p:?}");
    }
}
