//! The real `edgefn` binary: as a daemon (a child process logging to a
//! file), as a command line, and connected between two Mosquittos.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use crate::{
    ConfigFile, ConfigFileExt, Local, Mosquitto, PATIENCE, Upstream, free_port, signal, standard,
    write_config,
};

/// The `edgefn` binary of this build: beside the running test or
/// benchmark executable (`target/<profile>/deps/` for tests), or
/// `EDGEFN_BIN`.
pub fn binary() -> PathBuf {
    if let Some(bin) = std::env::var_os("EDGEFN_BIN") {
        return bin.into();
    }
    let exe = std::env::current_exe().expect("the running executable");
    let mut dir = exe.parent().expect("its directory").to_owned();
    if dir.ends_with("deps") {
        dir.pop();
    }
    let bin = dir.join("edgefn");
    assert!(
        bin.exists(),
        "no edgefn binary at {} (build it: cargo build --bins)",
        bin.display()
    );
    bin
}

/// Runs the `edgefn` command line with `args` (logging errors only) and
/// returns what it did.
pub fn edgefn(args: &[&str]) -> Output {
    Command::new(binary())
        .args(args)
        .env("EDGEFN_LOG", "error")
        .output()
        .expect("run edgefn")
}

/// What a command printed, stdout then stderr.
pub fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// The log filter of [`Daemon::start`].
pub const DAEMON_LOG: &str = "info,rmqtt=warn,rmqtt_net=warn";

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
        Self::start_logging(config, DAEMON_LOG)
    }

    /// [`Daemon::start`] with the log filter `filter` (`EDGEFN_LOG`).
    pub fn start_logging(config: &Path, filter: &str) -> Daemon {
        let log = config.with_extension(format!("{}.log", free_port()));
        let child = Command::new(binary())
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
    /// Its metrics listener's port.
    pub metrics: u16,
}

/// [`Connected`] with a stock device-side broker and `cloud`.
pub async fn connected(cloud: Mosquitto) -> Connected {
    connected_to(Mosquitto::start().await, cloud).await
}

/// [`connected`] with the device-side broker `local`.
pub async fn connected_to(local: Mosquitto, cloud: Mosquitto) -> Connected {
    connected_with(local, cloud, |_| {}).await
}

/// [`connected_to`], with `more` applied to the standard config (which
/// serves metrics on a free port) first.
pub async fn connected_with(
    local: Mosquitto,
    cloud: Mosquitto,
    more: impl FnOnce(&mut ConfigFile),
) -> Connected {
    let dir = tempfile::tempdir().unwrap();
    let mut file = standard(dir.path(), Local::Broker(local.url()), cloud.port);
    file.metrics_on(free_port());
    more(&mut file);
    let metrics = metrics_port(&file);
    let config = write_config(dir.path(), &file);
    let upstream = Upstream::subscribe(cloud.port, "site/#").await;
    let daemon = Daemon::start(&config);
    crate::wait_for_counter(metrics, "local_subscriptions_granted", 1).await;
    crate::wait_for_counter(metrics, "upstream_connects", 1).await;
    Connected {
        local,
        cloud,
        dir,
        config,
        upstream,
        daemon,
        metrics,
    }
}

/// The port of `file`'s `[metrics] listen`, which must be set.
pub fn metrics_port(file: &ConfigFile) -> u16 {
    file.metrics
        .as_ref()
        .and_then(|m| m.listen.as_deref())
        .and_then(|l| l.rsplit_once(':'))
        .and_then(|(_, port)| port.parse().ok())
        .expect("[metrics] listen with a port")
}
