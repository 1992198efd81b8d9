//! A private Mosquitto and edgefn's built-in broker side by side, for tests
//! that put the same client-visible cases to both and expect the same
//! answers.

use edgefn::config::file::LocalTable;

use crate::{Daemon, Local, Mosquitto, free_port, port_open, standard, write_config};

/// A broker under test.
pub struct Broker {
    /// `mosquitto` or `edgefn`.
    pub name: &'static str,
    /// Where clients connect.
    pub port: u16,
    /// What keeps it running (the broker, or the daemon and its directory).
    _running: Box<dyn std::any::Any + Send>,
}

/// A stock Mosquitto, and edgefn's built-in broker (the standard functions,
/// no upstream).
pub async fn brokers() -> [Broker; 2] {
    brokers_with("", |_| {}).await
}

/// [`brokers`], Mosquitto with the extra `mosquitto.conf` lines `mosquitto`
/// and edgefn with its `[local]` table changed by `local`: the same
/// settings, each in its own words.
pub async fn brokers_with(mosquitto: &str, local: impl FnOnce(&mut LocalTable)) -> [Broker; 2] {
    let mosquitto = Mosquitto::start_with_extra(mosquitto).await;
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let mut file = standard(dir.path(), Local::Embedded(port), free_port());
    file.upstream = None;
    local(&mut file.local);
    let daemon = Daemon::start(&write_config(dir.path(), &file));
    port_open(port).await;
    [
        Broker {
            name: "mosquitto",
            port: mosquitto.port,
            _running: Box::new(mosquitto),
        },
        Broker {
            name: "edgefn",
            port,
            _running: Box::new((daemon, dir)),
        },
    ]
}
