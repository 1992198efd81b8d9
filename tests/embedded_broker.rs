//! End to end through the embedded broker: devices connect to edgefn
//! itself, and a device's PUBACK means its reading's outcome is committed.

#![cfg(feature = "embedded-broker")]

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use testkit::client::raw;
use testkit::*;
use tokio::io::AsyncWriteExt;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connections_publishes_share_commits_and_each_puback_follows_its_own() {
    // No upstream: every committed record stays in the outbox.
    let dir = tempfile::tempdir().unwrap();
    let (port, metrics) = (free_port(), free_port());
    let mut file = standard(dir.path(), Local::Embedded(port), free_port());
    file.upstream = None;
    file.metrics_on(metrics);
    let _daemon = Daemon::start(&write_config(dir.path(), &file));
    port_open(port).await;
    let db = dir.path().join("data/edgefn.db");
    // An MQTT 3.1.1 device sends 200 readings at once, without waiting for
    // any PUBACK.
    let (mut device, connack) = raw::connack(port, 4, 60, "pipelining").await;
    assert_eq!(connack.code, 0);
    let mut burst = Vec::new();
    for id in 1..=200u16 {
        let payload = reading(u64::from(id), 21.0);
        burst.extend(raw::publish_id(
            4,
            "sensors/p1/temperature",
            payload.as_bytes(),
            id,
        ));
    }
    device.write_all(&burst).await.unwrap();
    // The PUBACKs come in the order of the publishes, each once its reading
    // is committed.
    for id in 1..=200u16 {
        let (first, body) = raw::read(&mut device).await.expect("a PUBACK");
        assert_eq!((first, u16::from_be_bytes([body[0], body[1]])), (0x40, id));
        assert!(
            outbox_rows(&db) >= i64::from(id),
            "PUBACK {id} before its commit"
        );
    }
    // They shared commits: one connection is not one commit per message.
    let counters = &report(metrics)["gateway"]["counters"];
    assert_eq!(counters["committed"], 200);
    let commits = counters["commit_batches"].as_u64().unwrap();
    assert!(commits < 200, "{commits} commits for 200 readings");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_puback_from_the_embedded_broker_means_the_reading_is_committed() {
    // No upstream is running: every committed record stays in the outbox,
    // so its row count shows exactly what is committed.
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let config = standard_config(dir.path(), Local::Embedded(port), free_port());
    let daemon = Daemon::start(&config);
    port_open(port).await;
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
    let cloud = Mosquitto::cloud().await;
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let config = standard_config(dir.path(), Local::Embedded(port), cloud.port);
    let upstream = Upstream::subscribe(cloud.port, "site/#").await;
    let _daemon = Daemon::start(&config);
    port_open(port).await;

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
    let cloud = Mosquitto::cloud().await;
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let config = standard_config(dir.path(), Local::Embedded(port), cloud.port);
    let upstream = Upstream::subscribe(cloud.port, "site/#").await;
    let mut daemon = Daemon::start(&config);
    port_open(port).await;

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
    eventually("150 readings acknowledged", || acked_count() >= 150).await;
    // SIGKILL while all three are mid-stream, then a restart.
    daemon.kill();
    let before = acked_count();
    daemon = Daemon::start(&config);
    port_open(port).await;
    eventually("150 more acknowledged after the restart", || {
        acked_count() >= before + 150
    })
    .await;
    stop.store(true, Ordering::Relaxed);
    for d in devices {
        d.await.unwrap();
    }

    let acked = acked.lock().unwrap().clone();
    let seen = upstream
        .wait_until("every acknowledged reading", |s| {
            let got: HashSet<(String, u64)> = s.iter().map(Seen::reading).collect();
            acked.iter().all(|a| got.contains(a))
        })
        .await;
    assert!(seen.len() >= acked.len());
    assert!(daemon.terminate().success());
}

/// Publishes readings `0..n` from device `name` on its own topic, each
/// until it is acknowledged: a failed attempt (no PUBACK within `wait`, or
/// the connection lost) is counted in `failures` and the reading sent again
/// on a new connection with the same client id, as a device would.
async fn publish_until_acked(
    mut dev: Device,
    name: &str,
    n: u64,
    wait: Duration,
    failures: Arc<std::sync::atomic::AtomicUsize>,
) {
    let topic = format!("sensors/{name}/temperature");
    for i in 0..n {
        let payload = format!(r#"{{"seq":{i},"temp_c":20.5,"pad":"{}"}}"#, "p".repeat(380));
        while !dev.publish_acked(&topic, payload.clone(), wait).await {
            failures.fetch_add(1, Ordering::Relaxed);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_that_gives_up_during_a_stall_gets_no_second_copy_upstream() {
    // The cloud is away until both devices have given up on a reading at
    // least twice; meanwhile the buffer (4 KiB, about nine readings) fills
    // and every commit waits for room.
    let mut cloud = Mosquitto::cloud_persistent().await;
    let upstream = Upstream::subscribe(cloud.port, "site/#").await;
    cloud.stop_gracefully();
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let mut file = standard(dir.path(), Local::Embedded(port), cloud.port);
    file.buffer.max_size = Some("4KiB".into());
    let config = write_config(dir.path(), &file);
    let daemon = Daemon::start(&config);
    port_open(port).await;

    let n = 12;
    let fails = || Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let (fails_a, fails_b) = (fails(), fails());
    // A: keep-alive 5 s; it hears nothing while its message waits, and the
    // gateway gives the message up when the keep-alive passes.
    let a = Device::with_keep_alive("sensor-ka", port, Duration::from_secs(5));
    let a = tokio::spawn(publish_until_acked(a, "ka", n, PATIENCE, fails_a.clone()));
    // B: keep-alive 60 s, but it gives up on a PUBACK after 3 s and comes
    // back with the same client id: its new session replaces the old.
    let b = Device::with_keep_alive("sensor-kb", port, Duration::from_secs(60));
    let b = tokio::spawn(publish_until_acked(
        b,
        "kb",
        n,
        Duration::from_secs(3),
        fails_b.clone(),
    ));
    eventually("both devices gave up twice during the stall", || {
        fails_a.load(Ordering::Relaxed) >= 2 && fails_b.load(Ordering::Relaxed) >= 2
    })
    .await;
    cloud.restart().await;
    a.await.unwrap();
    b.await.unwrap();

    // Everything committed goes up; then no reading may have two ids.
    let db = dir.path().join("data/edgefn.db");
    eventually("the buffer drained", || outbox_rows(&db) == 0).await;
    let seen = upstream
        .wait_until("every reading of both devices", |s| {
            let ids: HashSet<&str> = s.iter().filter_map(|x| x.id.as_deref()).collect();
            let readings: HashSet<(String, u64)> = s.iter().map(Seen::reading).collect();
            readings.len() == 2 * n as usize && ids.len() >= readings.len()
        })
        .await;
    let mut ids_of: std::collections::HashMap<(String, u64), HashSet<String>> = Default::default();
    for x in &seen {
        let v = x.json();
        let reading = (
            v["device"].as_str().unwrap().to_owned(),
            v["seq"].as_u64().unwrap(),
        );
        ids_of
            .entry(reading)
            .or_default()
            .insert(x.id.clone().unwrap());
    }
    let copies: Vec<_> = ids_of.iter().filter(|(_, ids)| ids.len() > 1).collect();
    assert!(
        copies.is_empty(),
        "readings committed more than once: {copies:?}"
    );
    drop(daemon);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_embedded_brokers_clients_and_refusals_are_in_the_gateway_metrics() {
    // No upstream: the 4 KiB buffer fills and stays full.
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let mut file = standard(dir.path(), Local::Embedded(port), free_port());
    file.buffer.max_size = Some("4KiB".into());
    file.upstream = None;
    let config = write_config(dir.path(), &file);
    let gateway = edgefn::gateway::Gateway::start(edgefn::config::Config::load(&config).unwrap())
        .await
        .unwrap();

    let mut idle = Device::connect("sensor-idle", port).await;
    assert!(
        idle.publish_acked("other/topic", "not a trigger", PATIENCE)
            .await
    );
    let failures = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let dev = Device::with_keep_alive("sensor-km", port, Duration::from_secs(5));
    let stuck = tokio::spawn(publish_until_acked(
        dev,
        "km",
        20,
        PATIENCE,
        failures.clone(),
    ));
    eventually("a message given up and its connection refused", || {
        let m = gateway.metrics();
        m.abandoned >= 1 && m.broker_refused >= 1
    })
    .await;
    eventually("two connections and two sessions", || {
        let m = gateway.metrics();
        m.broker_connections == 2 && m.broker_sessions == 2
    })
    .await;
    stuck.abort();
    gateway.shutdown().await;
}
