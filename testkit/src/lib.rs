//! What edgefn's integration tests (tests/) and its benchmark (bench/)
//! share: private Mosquitto brokers on free loopback ports, the real
//! `edgefn` binary as a daemon and as a command line, configurations built
//! as typed values, the real example functions, MQTT clients standing in
//! for devices and for the cloud, signed bundles, and waits on the
//! metrics report.
//!
//! Nothing here sleeps a thread: waits are async and poll with
//! `tokio::time::sleep`, each bounded by [`PATIENCE`].

pub mod bundle;
pub mod client;
pub mod config;
pub mod daemon;
pub mod metrics;
pub mod mosquitto;
pub mod mqtt;
pub mod pair;

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

pub use bundle::*;
pub use config::*;
pub use daemon::*;
pub use metrics::*;
pub use mosquitto::*;
pub use mqtt::*;

/// How long a test waits for something that should happen before failing.
/// A deadline for a hung test, not a performance threshold.
pub const PATIENCE: Duration = Duration::from_secs(90);

/// The repository root.
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("testkit/ is in the repository")
        .to_owned()
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

/// Waits until something accepts TCP connections on `port`.
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

/// Waits until `pred` holds; panics after [`PATIENCE`] naming `what`.
pub async fn eventually(what: &str, pred: impl Fn() -> bool) {
    let deadline = Instant::now() + PATIENCE;
    while !pred() {
        assert!(Instant::now() < deadline, "never: {what}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// A reading as a device sends it.
pub fn reading(seq: u64, temp_c: f64) -> String {
    format!(r#"{{"seq":{seq},"temp_c":{temp_c}}}"#)
}

/// Rows in the outbox of the database `db` right now (-1 if it cannot be
/// read).
pub fn outbox_rows(db: &Path) -> i64 {
    rusqlite::Connection::open(db)
        .and_then(|c| c.query_row("SELECT COUNT(*) FROM outbox", [], |r| r.get(0)))
        .unwrap_or(-1)
}

/// Sends `sig` (e.g. `-STOP`) to process `pid`.
pub fn signal(pid: u32, sig: &str) {
    let ok = Command::new("kill")
        .args([sig, &pid.to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok, "kill {sig} {pid}");
}
