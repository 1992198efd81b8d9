//! End to end through the embedded broker: devices connect to edgefn
//! itself, and a device's PUBACK means its reading's outcome is committed.

#![cfg(feature = "embedded-broker")]

mod common;

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;

/// Rows in the outbox right now.
fn outbox_rows(db: &std::path::Path) -> i64 {
    let c = rusqlite::Connection::open(db).unwrap();
    c.query_row("SELECT COUNT(*) FROM outbox", [], |r| r.get(0))
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_puback_from_the_embedded_broker_means_the_reading_is_committed() {
    // No upstream is running: every committed record stays in the outbox,
    // so its row count shows exactly what is committed.
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let config = standard_config(dir.path(), &format!("embedded:{port}"), free_port());
    let daemon = Daemon::start(&config);
    wait_for_port(port);
    let db = dir.path().join("data/edgefn.db");
    let mut dev = Device::connect("sensor-1", port).await;
    for i in 0..100u64 {
        assert!(
            dev.publish_acked("sensors/s1/temperature", reading(i, 19.5), PATIENCE)
                .await
        );
        // The PUBACK came only after the commit.
        assert_eq!(outbox_rows(&db), i as i64 + 1, "after PUBACK {i}");
    }
    // Readings the function drops are committed as outcomes too: acked, no row.
    assert!(
        dev.publish_acked("sensors/s1/temperature", "garbage", PATIENCE)
            .await
    );
    assert_eq!(outbox_rows(&db), 100);
    drop(daemon);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_embedded_broker_is_a_broker_and_functions_reach_devices() {
    let cloud = Mosquitto::cloud();
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let config = standard_config(dir.path(), &format!("embedded:{port}"), cloud.port);
    let upstream = Upstream::subscribe(cloud.port, "site/#").await;
    let _daemon = Daemon::start(&config);
    wait_for_port(port);

    // Another client on the embedded broker sees device traffic, and a
    // device listening for commands gets what a function publishes.
    let watcher = Upstream::subscribe(port, "sensors/#").await;
    let commands = Upstream::subscribe(port, "devices/+/cmd").await;
    let mut dev = Device::connect("sensor-2", port).await;
    for i in 0..20u64 {
        assert!(
            dev.publish_acked("sensors/s2/temperature", reading(i, 30.0), PATIENCE)
                .await
        );
    }
    assert!(
        dev.publish_acked("chaos/x", "publish fan-on", PATIENCE)
            .await
    );

    let seen = upstream.wait_for(20).await;
    let seqs: Vec<u64> = seen
        .iter()
        .map(|s| s.json()["seq"].as_u64().unwrap())
        .collect();
    assert_eq!(seqs, (0..20).collect::<Vec<_>>());
    assert_eq!(seen[0].topic, "site/pi-01/telemetry/s2/temperature");
    assert_eq!(seen[0].json()["temp_f"], 86.0);
    watcher.wait_for(20).await;
    let cmd = commands.wait_for(1).await;
    assert_eq!(
        (cmd[0].topic.as_str(), cmd[0].payload.as_str()),
        ("devices/chaos/cmd", "publish fan-on")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_daemon_loses_no_reading_a_device_got_a_puback_for() {
    let cloud = Mosquitto::cloud();
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let config = standard_config(dir.path(), &format!("embedded:{port}"), cloud.port);
    let upstream = Upstream::subscribe(cloud.port, "site/#").await;
    let mut daemon = Daemon::start(&config);
    wait_for_port(port);

    // Three devices publish continuously; each remembers what was acked.
    let stop = Arc::new(AtomicBool::new(false));
    let acked = Arc::new(Mutex::new(Vec::<(String, u64)>::new()));
    let mut devices = Vec::new();
    for d in ["k1", "k2", "k3"] {
        let (stop, acked) = (stop.clone(), acked.clone());
        devices.push(tokio::spawn(async move {
            let mut dev = Device::connect(&format!("sensor-{d}"), port).await;
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let topic = format!("sensors/{d}/temperature");
                if dev
                    .publish_acked(&topic, reading(i, 22.0), Duration::from_secs(30))
                    .await
                {
                    acked.lock().unwrap().push((d.to_owned(), i));
                }
                i += 1;
            }
        }));
    }
    let acked_count = || acked.lock().unwrap().len();
    wait_until(|| acked_count() >= 150).await;
    // SIGKILL while all three are mid-stream, then a restart.
    daemon.kill();
    let before = acked_count();
    daemon = Daemon::start(&config);
    wait_for_port(port);
    wait_until(|| acked_count() >= before + 150).await;
    stop.store(true, Ordering::Relaxed);
    for d in devices {
        d.await.unwrap();
    }

    let acked = acked.lock().unwrap().clone();
    let seen = upstream
        .wait_until("every acknowledged reading", |s| {
            let got: HashSet<(String, u64)> = s
                .iter()
                .map(|x| {
                    let v = x.json();
                    (
                        v["device"].as_str().unwrap().to_owned(),
                        v["seq"].as_u64().unwrap(),
                    )
                })
                .collect();
            acked.iter().all(|a| got.contains(a))
        })
        .await;
    assert!(seen.len() >= acked.len());
    assert!(daemon.terminate().success());
}

/// Waits until `pred` holds; panics after [`PATIENCE`].
async fn wait_until(pred: impl Fn() -> bool) {
    let deadline = std::time::Instant::now() + PATIENCE;
    while !pred() {
        assert!(std::time::Instant::now() < deadline, "condition never held");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
