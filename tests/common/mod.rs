//! Helpers for the integration tests: private Mosquitto brokers on free
//! loopback ports, the real `edgefn` binary, the real example functions,
//! and MQTT clients standing in for devices and for the cloud.

#![allow(dead_code)]

pub mod powercut;

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use rumqttc::Outgoing;
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::Packet;
use rumqttc::v5::{AsyncClient, Event, MqttOptions};

/// How long a test waits for something that should happen before failing.
/// A deadline for a hung test, not a performance threshold.
pub const PATIENCE: Duration = Duration::from_secs(90);

/// The repository root.
pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Path of an example function's module, building the functions once if
/// they are missing (`functions/build.sh`).
pub fn module(name: &str) -> PathBuf {
    static BUILT: OnceLock<()> = OnceLock::new();
    let path = root().join("functions/dist").join(format!("{name}.wasm"));
    if !path.exists() {
        BUILT.get_or_init(|| {
            let status = Command::new("bash")
                .arg(root().join("functions/build.sh"))
                .status()
                .expect("run functions/build.sh");
            assert!(status.success(), "functions/build.sh failed");
        });
    }
    assert!(path.exists(), "{} was not built", path.display());
    path
}

/// A free TCP port on 127.0.0.1 (bound and released; the small race with
/// other processes is acceptable in tests).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Waits until something accepts TCP connections on `port`, without
/// holding up the async test's runtime.
pub async fn port_open(port: u16) {
    let deadline = Instant::now() + PATIENCE;
    while tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .is_err()
    {
        assert!(Instant::now() < deadline, "nothing listens on port {port}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits until something accepts TCP connections on `port`, from code
/// that is not async (starting a Mosquitto).
pub fn wait_for_port(port: u16) {
    let deadline = Instant::now() + PATIENCE;
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "nothing listens on port {port}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

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
    pub fn start() -> Mosquitto {
        Self::start_with(false, "")
    }

    /// Starts one with extra mosquitto.conf lines.
    pub fn start_with_extra(extra: &str) -> Mosquitto {
        Self::start_with(false, extra)
    }

    /// Starts one on the device side that keeps sessions and queued
    /// messages across a graceful restart ([`Mosquitto::stop_gracefully`]),
    /// as Debian's and Raspberry Pi OS's stock `/etc/mosquitto/mosquitto.conf`
    /// does (`persistence true`).
    pub fn start_persistent() -> Mosquitto {
        Self::start_with(true, "")
    }

    /// Starts a stand-in for the cloud broker.
    pub fn cloud() -> Mosquitto {
        Self::start_with(false, CLOUD)
    }

    /// Starts a stand-in for the cloud broker with extra lines.
    pub fn cloud_with_extra(extra: &str) -> Mosquitto {
        Self::start_with(false, &format!("{CLOUD}{extra}"))
    }

    /// Starts a stand-in for the cloud broker that keeps sessions and
    /// queued messages across a graceful restart
    /// ([`Mosquitto::stop_gracefully`]), so a subscriber standing in for
    /// the cloud misses nothing while it reconnects.
    pub fn cloud_persistent() -> Mosquitto {
        Self::start_with(true, CLOUD)
    }

    fn start_with(persistent: bool, extra: &str) -> Mosquitto {
        let mut m = Mosquitto {
            port: free_port(),
            dir: tempfile::tempdir().unwrap(),
            child: None,
            persistent,
            extra: extra.to_owned(),
        };
        m.restart();
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
    pub fn restart(&mut self) {
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
        wait_for_port(self.port);
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

/// Sends `sig` (e.g. `-STOP`) to process `pid`.
fn signal(pid: u32, sig: &str) {
    let ok = Command::new("kill")
        .args([sig, &pid.to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok, "kill {sig} {pid}");
}

fn mosquitto_binary() -> PathBuf {
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
        for (name, names) in [("broker", names), ("client", &["pi-01"])] {
            let key = rcgen::KeyPair::generate().unwrap();
            let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
            let cert = rcgen::CertificateParams::new(names)
                .unwrap()
                .signed_by(&key, &issuer)
                .unwrap();
            std::fs::write(dir.path().join(format!("{name}.pem")), cert.pem()).unwrap();
            std::fs::write(dir.path().join(format!("{name}.key")), key.serialize_pem()).unwrap();
        }
        Pki { dir }
    }

    /// A file of it: `ca.pem`, `broker.pem`, `broker.key`, `client.pem`,
    /// `client.key`.
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

/// A message seen by an [`Upstream`] subscriber.
#[derive(Debug, Clone, PartialEq)]
pub struct Seen {
    /// Topic.
    pub topic: String,
    /// Payload as text.
    pub payload: String,
    /// The `edgefn-id` user property.
    pub id: Option<String>,
}

impl Seen {
    /// The payload parsed as JSON.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.payload).unwrap_or_else(|e| panic!("{}: {e}", self.payload))
    }

    /// The cleaned reading it carries: (`device`, `seq`).
    pub fn reading(&self) -> (String, u64) {
        let v = self.json();
        (
            v["device"].as_str().expect("a device").to_owned(),
            v["seq"].as_u64().expect("a seq"),
        )
    }
}

/// A subscriber standing in for the cloud: collects everything under a
/// filter, acknowledging each message.
pub struct Upstream {
    /// Everything received, in order.
    pub seen: Arc<Mutex<Vec<Seen>>>,
    /// The client task.
    task: tokio::task::JoinHandle<()>,
}

impl Upstream {
    /// Subscribes to `filter` on the broker at `port`; returns once the
    /// subscription is acknowledged.
    pub async fn subscribe(port: u16, filter: &str) -> Upstream {
        let mut o = MqttOptions::new(format!("cloud-{}", free_port()), "127.0.0.1", port);
        o.set_keep_alive(Duration::from_secs(30));
        // A persistent session: on a persistent broker nothing published
        // while this subscriber reconnects is lost.
        o.set_clean_start(false);
        o.set_session_expiry_interval(Some(3600));
        o.set_max_packet_size(Some(1 << 20));
        let (client, mut events) = AsyncClient::new(o, 100);
        let seen = Arc::new(Mutex::new(Vec::new()));
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
        let filter = filter.to_owned();
        let task = {
            let seen = seen.clone();
            tokio::spawn(async move {
                let mut ready = Some(ready_tx);
                loop {
                    match events.poll().await {
                        Ok(Event::Incoming(Packet::ConnAck(_))) => {
                            client
                                .subscribe(filter.clone(), QoS::AtLeastOnce)
                                .await
                                .unwrap();
                        }
                        Ok(Event::Incoming(Packet::SubAck(_))) => {
                            if let Some(r) = ready.take() {
                                let _ = r.send(());
                            }
                        }
                        Ok(Event::Incoming(Packet::Publish(p))) => {
                            let id = p.properties.as_ref().and_then(|props| {
                                props
                                    .user_properties
                                    .iter()
                                    .find(|(k, _)| k == "edgefn-id")
                                    .map(|(_, v)| v.clone())
                            });
                            seen.lock().unwrap().push(Seen {
                                topic: String::from_utf8_lossy(&p.topic).into_owned(),
                                payload: String::from_utf8_lossy(&p.payload).into_owned(),
                                id,
                            });
                        }
                        Ok(_) => {}
                        Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                    }
                }
            })
        };
        tokio::time::timeout(PATIENCE, ready_rx)
            .await
            .expect("upstream subscription")
            .unwrap();
        Upstream { seen, task }
    }

    /// Waits until `pred` holds for what was received; panics after [`PATIENCE`].
    pub async fn wait_until(&self, what: &str, pred: impl Fn(&[Seen]) -> bool) -> Vec<Seen> {
        let deadline = Instant::now() + PATIENCE;
        loop {
            {
                let seen = self.seen.lock().unwrap();
                if pred(&seen) {
                    return seen.clone();
                }
                if Instant::now() > deadline {
                    panic!(
                        "timed out waiting for {what}; received {} messages",
                        seen.len()
                    );
                }
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// Waits until at least `n` messages arrived.
    pub async fn wait_for(&self, n: usize) -> Vec<Seen> {
        self.wait_until(&format!("{n} messages upstream"), |s| s.len() >= n)
            .await
    }

    /// Distinct messages by id (duplicates after reconnects collapse).
    pub fn distinct(seen: &[Seen]) -> Vec<Seen> {
        let mut ids = std::collections::HashSet::new();
        seen.iter()
            .filter(|s| ids.insert(s.id.clone().expect("every record has an id")))
            .cloned()
            .collect()
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A device publishing QoS 1 messages one at a time, each waiting for its
/// PUBACK. Every connection gets a fresh client, so a PUBACK is attributed
/// to exactly the message it acknowledges: nothing queued on a dead
/// connection is sent (and acknowledged) later in another's name.
pub struct Device {
    /// Client id.
    id: String,
    /// Broker port.
    port: u16,
    /// MQTT keep-alive.
    keep_alive: Duration,
    /// The current connection, if any.
    conn: Option<DeviceConn>,
    /// Connections made so far.
    pub connections: usize,
}

/// What a device's event loop reports.
enum DeviceEvent {
    /// CONNACK.
    Connected,
    /// A publish went out with this packet id.
    Sent(u16),
    /// PUBACK for this packet id.
    Acked(u16),
    /// The connection is gone.
    Lost,
}

/// One connection of a [`Device`].
struct DeviceConn {
    /// The client.
    client: AsyncClient,
    /// Its events.
    events: tokio::sync::mpsc::UnboundedReceiver<DeviceEvent>,
    /// The event loop task.
    task: tokio::task::JoinHandle<()>,
}

impl Drop for DeviceConn {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Device {
    /// A device with `client_id` for the broker at `port` (connects lazily).
    pub async fn connect(client_id: &str, port: u16) -> Device {
        Self::with_keep_alive(client_id, port, Duration::from_secs(30))
    }

    /// [`Device::connect`] with MQTT keep-alive `keep_alive`.
    pub fn with_keep_alive(client_id: &str, port: u16, keep_alive: Duration) -> Device {
        Device {
            id: client_id.to_owned(),
            port,
            keep_alive,
            conn: None,
            connections: 0,
        }
    }

    async fn connection(&mut self) -> Option<&mut DeviceConn> {
        if self.conn.is_none() {
            let mut o = MqttOptions::new(&self.id, "127.0.0.1", self.port);
            o.set_keep_alive(self.keep_alive);
            o.set_clean_start(true);
            let (client, mut events) = AsyncClient::new(o, 10);
            let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
            let task = tokio::spawn(async move {
                loop {
                    let e = match events.poll().await {
                        Ok(Event::Incoming(Packet::ConnAck(_))) => DeviceEvent::Connected,
                        Ok(Event::Outgoing(Outgoing::Publish(pkid))) => DeviceEvent::Sent(pkid),
                        Ok(Event::Incoming(Packet::PubAck(a))) => DeviceEvent::Acked(a.pkid),
                        Ok(_) => continue,
                        Err(_) => {
                            let _ = tx.send(DeviceEvent::Lost);
                            return;
                        }
                    };
                    if tx.send(e).is_err() {
                        return;
                    }
                }
            });
            match rx.recv().await {
                Some(DeviceEvent::Connected) => {
                    self.connections += 1;
                    self.conn = Some(DeviceConn {
                        client,
                        events: rx,
                        task,
                    })
                }
                _ => {
                    task.abort();
                    // Broker not (yet) there: a short pause before the next try.
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    return None;
                }
            }
        }
        self.conn.as_mut()
    }

    /// Publishes at QoS 1 and waits for its PUBACK. Returns false if the
    /// connection was lost first, could not be made, or nothing came
    /// within `wait`.
    pub async fn publish_acked(
        &mut self,
        topic: &str,
        payload: impl Into<Vec<u8>>,
        wait: Duration,
    ) -> bool {
        let payload: Vec<u8> = payload.into();
        let Some(conn) = self.connection().await else {
            return false;
        };
        if conn
            .client
            .publish(topic, QoS::AtLeastOnce, false, payload)
            .await
            .is_err()
        {
            self.conn = None;
            return false;
        }
        let acked = tokio::time::timeout(wait, async {
            let mut pkid = None;
            while let Some(e) = conn.events.recv().await {
                match e {
                    DeviceEvent::Sent(p) => pkid = Some(p),
                    DeviceEvent::Acked(p) if Some(p) == pkid => return true,
                    DeviceEvent::Lost => return false,
                    _ => {}
                }
            }
            false
        })
        .await
        .unwrap_or(false);
        if !acked {
            self.conn = None;
        }
        acked
    }
}

/// Runs the `edgefn` command line with `args` (logging errors only) and
/// returns what it did.
pub fn edgefn(args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_edgefn"))
        .args(args)
        .env("EDGEFN_LOG", "error")
        .output()
        .expect("run edgefn")
}

/// Writes a gateway config into `dir` and returns its path.
pub fn write_config(dir: &Path, text: &str) -> PathBuf {
    let path = dir.join("edgefn.toml");
    std::fs::write(&path, text).unwrap();
    path
}

/// The standard test config: clean-temperature (UNIT=F) on
/// `sensors/+/temperature` and chaos (with a fuel budget) on `chaos/#`,
/// local broker `local`
/// (a URL, or `embedded` for the built-in broker on `embedded_port`),
/// upstream at `upstream_port` with prefix `site/pi-01/`.
pub fn standard_config(dir: &Path, local: &str, upstream_port: u16) -> PathBuf {
    let local = if let Some(port) = local.strip_prefix("embedded:") {
        format!("embedded = true\nlisten = \"127.0.0.1:{port}\"")
    } else {
        format!(
            "url = \"{local}\"\nclient_id = \"edgefn-test-{}\"",
            free_port()
        )
    };
    write_config(
        dir,
        &format!(
            r#"
[gateway]
id = "pi-01"
data_dir = "{data}"

[local]
{local}
max_message_size = "4KiB"

[upstream]
url = "mqtt://127.0.0.1:{upstream_port}"
topic_prefix = "site/pi-01/"

[buffer]
max_size = "64MiB"

[[functions]]
name = "clean-temperature"
module = "{clean}"
triggers = ["sensors/+/temperature"]
env = {{ UNIT = "F" }}
memory_limit = "16MiB"
timeout = "100ms"
concurrency = 2

[[functions]]
name = "chaos"
module = "{chaos}"
triggers = ["chaos/#"]
env = {{ GREETING = "hi" }}
timeout = "200ms"
fuel = 2_000_000
retries = 1
publish_allow = ["devices/chaos/cmd"]
"#,
            data = dir.join("data").display(),
            clean = module("clean_temperature").display(),
            chaos = module("chaos").display(),
        ),
    )
}

/// The `edgefn` daemon as a child process.
pub struct Daemon {
    /// The process.
    pub child: Child,
    /// Its stderr log file.
    pub log: PathBuf,
}

impl Daemon {
    /// Starts `edgefn run --config CONFIG`, logging to a file beside it.
    pub fn start(config: &Path) -> Daemon {
        Self::start_logging(config, "info,rmqtt=warn,rmqtt_net=warn")
    }

    /// [`Daemon::start`] with the log filter `filter` (`EDGEFN_LOG`).
    pub fn start_logging(config: &Path, filter: &str) -> Daemon {
        let log = config.with_extension(format!("{}.log", free_port()));
        let child = Command::new(env!("CARGO_BIN_EXE_edgefn"))
            .args(["run", "--config"])
            .arg(config)
            .env("EDGEFN_LOG", filter)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("start edgefn");
        Daemon { child, log }
    }

    /// SIGKILL: no chance to flush or say goodbye.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGSTOP: the daemon hangs with its connections open; what brokers
    /// send it waits in its socket buffers.
    pub fn freeze(&self) {
        signal(self.child.id(), "-STOP");
    }

    /// SIGCONT after [`Daemon::freeze`].
    pub fn thaw(&self) {
        signal(self.child.id(), "-CONT");
    }

    /// SIGTERM and wait for a clean exit.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        self.begin_stop();
        self.child.wait().unwrap()
    }

    /// SIGTERM, without waiting for the exit.
    pub fn begin_stop(&self) {
        signal(self.child.id(), "-TERM");
    }

    /// The log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until the log contains `text`.
    pub async fn wait_for_log(&self, text: &str) {
        self.wait_for_log_times(text, 1).await;
    }

    /// Waits until the log contains `text` at least `times` times.
    pub async fn wait_for_log_times(&self, text: &str, times: usize) {
        let deadline = Instant::now() + PATIENCE;
        while self.log().matches(text).count() < times {
            assert!(
                Instant::now() < deadline,
                "log never said {text:?} {times} times:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Rows in the outbox of the database `db` right now (-1 if it cannot be
/// read).
pub fn outbox_rows(db: &Path) -> i64 {
    rusqlite::Connection::open(db)
        .and_then(|c| c.query_row("SELECT COUNT(*) FROM outbox", [], |r| r.get(0)))
        .unwrap_or(-1)
}

/// Waits until `pred` holds; panics after [`PATIENCE`] naming `what`.
pub async fn eventually(what: &str, pred: impl Fn() -> bool) {
    let deadline = Instant::now() + PATIENCE;
    while !pred() {
        assert!(Instant::now() < deadline, "never: {what}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// Publishes `payload` retained, QoS 1, on the broker at `port`, as a
/// fleet engineer's tool would; returns once the broker acknowledged it.
pub async fn publish_retained(port: u16, topic: &str, payload: Vec<u8>) {
    let mut o = MqttOptions::new(format!("fleet-{}", free_port()), "127.0.0.1", port);
    o.set_max_packet_size(Some(16 << 20));
    let (client, mut events) = AsyncClient::new(o, 10);
    client
        .publish(topic, QoS::AtLeastOnce, true, payload)
        .await
        .unwrap();
    tokio::time::timeout(PATIENCE, async {
        loop {
            match events.poll().await {
                Ok(Event::Incoming(Packet::PubAck(_))) => break,
                Ok(_) => {}
                Err(e) => panic!("publishing {topic}: {e}"),
            }
        }
    })
    .await
    .expect("the broker acknowledged the retained message");
    let _ = client.disconnect().await;
}

/// A watch on how many subscriptions a Mosquitto holds, offline sessions'
/// included, this watcher's own among them. The broker must publish its
/// `$SYS` tree every second (`sys_interval 1`).
pub struct Subscriptions(Upstream);

impl Subscriptions {
    /// Subscribes to the count of the Mosquitto on `port`.
    pub async fn watch(port: u16) -> Subscriptions {
        Subscriptions(Upstream::subscribe(port, "$SYS/broker/subscriptions/count").await)
    }

    /// Waits until the last count published is `want`.
    pub async fn wait_for(&self, want: &str) {
        self.0
            .wait_until(&format!("{want} subscriptions on the local broker"), |s| {
                s.last().is_some_and(|c| c.payload == want)
            })
            .await;
    }
}

/// What the daemon logs each time the local broker grants its subscriptions.
pub const SUBSCRIBED: &str = "subscribed granted=";

/// A daemon connected to a device-side broker and a cloud broker with a
/// subscriber on `site/#`, running the standard config.
pub struct Connected {
    /// The device-side broker.
    pub local: Mosquitto,
    /// The cloud broker.
    pub cloud: Mosquitto,
    /// Holds the config and `data/`.
    pub dir: tempfile::TempDir,
    /// The config file.
    pub config: std::path::PathBuf,
    /// The subscriber on the cloud broker.
    pub upstream: Upstream,
    /// The daemon, subscribed and connected upstream.
    pub daemon: Daemon,
}

/// [`Connected`] with a stock device-side broker and `cloud`.
pub async fn connected(cloud: Mosquitto) -> Connected {
    connected_to(Mosquitto::start(), cloud).await
}

/// [`connected`] with the device-side broker `local`.
pub async fn connected_to(local: Mosquitto, cloud: Mosquitto) -> Connected {
    connected_with(local, cloud, "").await
}

/// [`connected_to`], with `upstream` (lines of `[upstream]`) added to the
/// standard config.
pub async fn connected_with(local: Mosquitto, cloud: Mosquitto, upstream: &str) -> Connected {
    let dir = tempfile::tempdir().unwrap();
    let config = standard_config(dir.path(), &local.url(), cloud.port);
    let text = std::fs::read_to_string(&config).unwrap();
    let prefix = "topic_prefix = \"site/pi-01/\"\n";
    assert!(text.contains(prefix));
    std::fs::write(
        &config,
        text.replacen(prefix, &format!("{prefix}{upstream}\n"), 1),
    )
    .unwrap();
    let upstream = Upstream::subscribe(cloud.port, "site/#").await;
    let daemon = Daemon::start(&config);
    daemon.wait_for_log(SUBSCRIBED).await;
    daemon.wait_for_log("connected upstream").await;
    Connected {
        local,
        cloud,
        dir,
        config,
        upstream,
        daemon,
    }
}

/// A reading as a device sends it.
pub fn reading(seq: u64, temp_c: f64) -> String {
    format!(r#"{{"seq":{seq},"temp_c":{temp_c}}}"#)
}

/// GETs `path` from the HTTP listener on `port` of this machine (the
/// metrics listener): the body.
pub fn get(port: u16, path: &str) -> String {
    use std::io::{Read as _, Write as _};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    write!(s, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").unwrap();
    let mut response = String::new();
    s.read_to_string(&mut response).unwrap();
    let (head, body) = response.split_once("\r\n\r\n").unwrap();
    assert!(
        head.starts_with("HTTP/1.0 200") || head.starts_with("HTTP/1.1 200"),
        "{head}"
    );
    body.to_owned()
}

/// The metrics model's report from the listener on `port`
/// (`/metrics.json`).
pub fn report(port: u16) -> serde_json::Value {
    serde_json::from_str(&get(port, "/metrics.json")).unwrap()
}

/// The function called `name` in a [`report`].
pub fn function_report(report: &serde_json::Value, name: &str) -> serde_json::Value {
    report["functions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["name"] == name)
        .unwrap_or_else(|| panic!("no function {name} in {report}"))
        .clone()
}
