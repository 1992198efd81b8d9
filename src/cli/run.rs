//! `edgefn run`: the gateway daemon, until SIGTERM or SIGINT; SIGHUP
//! re-reads the built-in broker's password and ACL files.

use std::path::Path;
use std::process::ExitCode;

use edgefn::config::Config;

/// Runs the gateway of the configuration at `path` until a stop signal.
pub fn run(path: &Path) -> anyhow::Result<ExitCode> {
    let config = Config::load(path)?;
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(async {
            let stop = stop_signal()?;
            edgefn::gateway::run(config, stop, reload_signal()?).await
        })?;
    Ok(ExitCode::SUCCESS)
}

/// A message at each SIGHUP (the operator's `systemctl reload edgefn`).
fn reload_signal() -> anyhow::Result<tokio::sync::mpsc::Receiver<()>> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut hup = signal(SignalKind::hangup())?;
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    tokio::spawn(async move {
        while hup.recv().await.is_some() {
            // One pending reload covers any number of signals.
            let _ = tx.try_send(());
        }
    });
    Ok(rx)
}

/// Resolves at the first SIGTERM (systemd's stop) or SIGINT (Ctrl-C).
fn stop_signal() -> anyhow::Result<impl std::future::Future<Output = ()>> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
    })
}
