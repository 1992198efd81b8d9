//! Private Mosquitto brokers on free loopback ports, device side or
//! standing in for the cloud, and a private PKI for their TLS listeners.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use crate::{free_port, signal};

/// A private Mosquitto on its own port: with a stock configuration (no
/// raised in-flight or queue limits) on the device side, or standing in for
/// the cloud.
pub struct Mosquitto {
    /// Its port.
    pub port: u16,
    /// Holds its config and log.
    dir: tempfile::TempDir,
    /// The process, while running.
    child: Option<Child>,
    /// Whether it persists sessions to its directory.
    persistent: bool,
    /// Extra configuration lines.
    extra: String,
}

/// What a stand-in cloud broker adds to a stock config: a cloud broker
/// does not drop messages because a test's subscriber falls behind a burst
/// (a stock Mosquitto queues at most 1000 for it).
const CLOUD: &str = "max_queued_messages 0\n";

impl Mosquitto {
    /// Starts one with a stock configuration on a free port (device side).
    pub async fn start() -> Mosquitto {
        Self::start_with(false, "").await
    }

    /// Starts one with extra mosquitto.conf lines.
    pub async fn start_with_extra(extra: &str) -> Mosquitto {
        Self::start_with(false, extra).await
    }

    /// Starts one on the device side that keeps sessions and queued
    /// messages across a graceful restart ([`Mosquitto::stop_gracefully`]),
    /// as Debian's and Raspberry Pi OS's stock `/etc/mosquitto/mosquitto.conf`
    /// does (`persistence true`).
    pub async fn start_persistent() -> Mosquitto {
        Self::start_with(true, "").await
    }

    /// Starts a stand-in for the cloud broker.
    pub async fn cloud() -> Mosquitto {
        Self::start_with(false, CLOUD).await
    }

    /// Starts a stand-in for the cloud broker with extra lines.
    pub async fn cloud_with_extra(extra: &str) -> Mosquitto {
        Self::start_with(false, &format!("{CLOUD}{extra}")).await
    }

    /// Starts a stand-in for the cloud broker that keeps sessions and
    /// queued messages across a graceful restart
    /// ([`Mosquitto::stop_gracefully`]), so a subscriber standing in for
    /// the cloud misses nothing while it reconnects.
    pub async fn cloud_persistent() -> Mosquitto {
        Self::start_with(true, CLOUD).await
    }

    async fn start_with(persistent: bool, extra: &str) -> Mosquitto {
        let mut m = Mosquitto {
            port: free_port(),
            dir: tempfile::tempdir().unwrap(),
            child: None,
            persistent,
            extra: extra.to_owned(),
        };
        m.restart().await;
        m
    }

    /// SIGTERM: Mosquitto saves its persistence file and exits.
    pub fn stop_gracefully(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = Command::new("kill")
                .args(["-TERM", &c.id().to_string()])
                .status();
            let _ = c.wait();
        }
    }

    /// Starts it again on the same port (after [`Mosquitto::stop`]).
    pub async fn restart(&mut self) {
        assert!(self.child.is_none());
        let conf = self.dir.path().join("mosquitto.conf");
        let persistence = if self.persistent {
            format!(
                "persistence true\npersistence_location {}/\n",
                self.dir.path().display()
            )
        } else {
            "persistence false\n".to_owned()
        };
        std::fs::write(
            &conf,
            format!(
                "listener {} 127.0.0.1\nallow_anonymous true\n{persistence}log_dest file {}\n\
                 # As root, stay root: the files are in the test's private directory.\n\
                 user root\n{}",
                self.port,
                self.dir.path().join("mosquitto.log").display(),
                self.extra
            ),
        )
        .unwrap();
        let child = Command::new(mosquitto_binary())
            .arg("-c")
            .arg(&conf)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start mosquitto (apt-get install mosquitto)");
        self.child = Some(child);
        crate::port_open(self.port).await;
    }

    /// Stops it (SIGKILL: an outage, not a clean shutdown).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGSTOP: the broker hangs with its connections open; what is sent
    /// to it waits in its socket buffers, unacknowledged.
    pub fn freeze(&self) {
        self.signal("-STOP");
    }

    /// SIGCONT after [`Mosquitto::freeze`].
    pub fn thaw(&self) {
        self.signal("-CONT");
    }

    /// SIGHUP: it reads its configuration again, its `acl_file` among it.
    pub fn reload(&self) {
        self.signal("-HUP");
    }

    fn signal(&self, sig: &str) {
        signal(self.child.as_ref().expect("running").id(), sig);
    }

    /// `mqtt://127.0.0.1:PORT`
    pub fn url(&self) -> String {
        format!("mqtt://127.0.0.1:{}", self.port)
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        self.stop();
        if std::thread::panicking() {
            let log =
                std::fs::read_to_string(self.dir.path().join("mosquitto.log")).unwrap_or_default();
            eprintln!("--- mosquitto on port {} ---\n{log}", self.port);
        }
    }
}

/// Mosquitto's binary: where Debian puts it, or on the PATH.
pub fn mosquitto_binary() -> PathBuf {
    for p in [
        "/usr/sbin/mosquitto",
        "/usr/bin/mosquitto",
        "/usr/local/sbin/mosquitto",
    ] {
        if Path::new(p).exists() {
            return p.into();
        }
    }
    "mosquitto".into()
}

/// A private PKI in a temporary directory: a CA, a certificate it signed
/// for a broker on this machine, and one for edgefn as a client, each with
/// its key, as PEM files.
pub struct Pki {
    /// Holds the files.
    pub dir: tempfile::TempDir,
}

impl Default for Pki {
    fn default() -> Pki {
        Pki::new()
    }
}

impl Pki {
    /// Generates one whose broker certificate names `127.0.0.1` and
    /// `localhost`.
    pub fn new() -> Pki {
        Self::with_broker_names(&["127.0.0.1", "localhost"])
    }

    /// Generates one whose broker certificate names only `names`.
    pub fn with_broker_names(names: &[&str]) -> Pki {
        let dir = tempfile::tempdir().unwrap();
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        // Named after its directory: two test CAs are never taken for each other.
        let name = format!("edgefn test CA {}", dir.path().display());
        ca.distinguished_name.push(rcgen::DnType::CommonName, name);
        std::fs::write(
            dir.path().join("ca.pem"),
            ca.self_signed(&ca_key).unwrap().pem(),
        )
        .unwrap();
        let issuer = rcgen::Issuer::new(ca, ca_key);
        for (name, names) in [
            ("broker", names),
            ("client", &["pi-01"]),
            ("nameless", &["nameless"]),
        ] {
            let key = rcgen::KeyPair::generate().unwrap();
            let sans: Vec<String> = names.iter().map(|n| n.to_string()).collect();
            let mut params = rcgen::CertificateParams::new(sans).unwrap();
            params.distinguished_name = rcgen::DistinguishedName::new();
            if name == "client" {
                // The client's identity, for `use_identity_as_username`.
                params
                    .distinguished_name
                    .push(rcgen::DnType::CommonName, "pi-01");
            }
            let cert = params.signed_by(&key, &issuer).unwrap();
            std::fs::write(dir.path().join(format!("{name}.pem")), cert.pem()).unwrap();
            std::fs::write(dir.path().join(format!("{name}.key")), key.serialize_pem()).unwrap();
        }
        Pki { dir }
    }

    /// A file of it: `ca.pem`, `broker.pem`, `broker.key`, `client.pem`,
    /// `client.key` (common name `pi-01`), `nameless.pem`, `nameless.key`
    /// (no common name).
    pub fn file(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// mosquitto.conf lines for a TLS listener on `port` that wants a
    /// client certificate signed by this CA.
    pub fn mosquitto_listener(&self, port: u16) -> String {
        format!(
            "listener {port} 127.0.0.1\ncafile {}\ncertfile {}\nkeyfile {}\nrequire_certificate true\n",
            self.file("ca.pem").display(),
            self.file("broker.pem").display(),
            self.file("broker.key").display(),
        )
    }
}
