//! The promise across power cuts, on a filesystem that keeps every write
//! not yet fsynced in memory and drops it on command (tests/powercut/fs.rs):
//! what SQLite kept is what a Pi that lost power would have kept.
//!
//! These tests need FUSE (`/dev/fuse`, root). Where it is missing they say
//! why and pass without running, except under `CI=true`, where they fail
//! with the reason: CI must not pass a promise it did not test.

#![cfg(feature = "embedded-broker")]

use std::collections::{BTreeMap, BTreeSet};

use testkit::*;

#[path = "powercut/fs.rs"]
mod fs;

use fs::PowerCutFs;

/// The power-cut filesystem, or `None` (with the reason printed) where FUSE
/// cannot be used; under `CI=true` a missing FUSE fails the test.
fn mount() -> Option<PowerCutFs> {
    match PowerCutFs::mount() {
        Ok(fs) => Some(fs),
        Err(reason) if std::env::var("CI").is_ok_and(|v| v == "true") => {
            panic!("CI=true, but the power-cut tests cannot run here: {reason}")
        }
        Err(reason) => {
            eprintln!("skipped: no power-cut filesystem here: {reason}");
            None
        }
    }
}

/// The standard config on the embedded broker at `port`, upstream at
/// `upstream_port`, its data directory on `fs` and `durability`.
fn config_on(
    dir: &std::path::Path,
    fs: &PowerCutFs,
    port: u16,
    upstream_port: u16,
    durability: &str,
) -> std::path::PathBuf {
    let mut file = standard(dir, Local::Embedded(port), upstream_port);
    file.gateway.data_dir = Some(fs.path().join("data").display().to_string());
    file.buffer.durability = Some(durability.into());
    write_config(dir, &file)
}

/// Publishes readings `seqs` from device `d1`, each until acknowledged.
async fn publish(port: u16, seqs: std::ops::Range<u64>) {
    let mut dev = Device::connect("sensor-pc", port).await;
    for i in seqs {
        while !dev
            .publish_acked("sensors/d1/temperature", reading(i, 20.0), PATIENCE)
            .await
        {}
    }
}

/// A SIGKILL and a power cut at once, then a fresh start.
async fn power_cut(daemon: &mut Daemon, fs: &PowerCutFs, config: &std::path::Path, port: u16) {
    daemon.kill();
    fs.cut();
    *daemon = Daemon::start(config);
    port_open(port).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readings_acknowledged_before_power_cuts_all_arrive_after_them() {
    let Some(fs) = mount() else { return };
    // The cloud is away during both cuts: everything waits in the buffer.
    let mut cloud = Mosquitto::cloud_persistent().await;
    let upstream = Upstream::subscribe(cloud.port, "site/#").await;
    cloud.stop_gracefully();
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let config = config_on(dir.path(), &fs, port, cloud.port, "full");
    let mut daemon = Daemon::start(&config);
    port_open(port).await;
    publish(port, 0..300).await;
    power_cut(&mut daemon, &fs, &config, port).await;
    publish(port, 300..600).await;
    power_cut(&mut daemon, &fs, &config, port).await;
    cloud.restart().await;
    let seen = upstream
        .wait_until("all 600 acknowledged readings", |s| {
            Upstream::distinct(s).len() >= 600
        })
        .await;
    let seqs: BTreeSet<u64> = seen
        .iter()
        .map(|s| s.json()["seq"].as_u64().unwrap())
        .collect();
    assert_eq!(seqs, (0..600).collect());
    assert!(fs.fsyncs() >= 600, "every commit was synced");
    assert!(daemon.terminate().success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn record_ids_are_never_given_to_two_readings_across_power_cuts() {
    let Some(fs) = mount() else { return };
    // `relaxed`: a cut loses the commits since the last sync, records that
    // were already forwarded among them. Their ids must not come back.
    let cloud = Mosquitto::cloud().await;
    let upstream = Upstream::subscribe(cloud.port, "site/#").await;
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let config = config_on(dir.path(), &fs, port, cloud.port, "relaxed");
    let mut daemon = Daemon::start(&config);
    port_open(port).await;
    for round in 0..3u64 {
        let seqs = round * 300..(round + 1) * 300;
        publish(port, seqs.clone()).await;
        // Forwarded before the cut.
        upstream
            .wait_until("the round's readings upstream", |s| {
                let got: BTreeSet<u64> = s
                    .iter()
                    .map(|x| x.json()["seq"].as_u64().unwrap())
                    .collect();
                seqs.clone().all(|i| got.contains(&i))
            })
            .await;
        if round < 2 {
            power_cut(&mut daemon, &fs, &config, port).await;
        }
    }
    let mut readings_of: BTreeMap<String, BTreeSet<u64>> = BTreeMap::new();
    for s in upstream.seen.lock().unwrap().iter() {
        readings_of
            .entry(s.id.clone().unwrap())
            .or_default()
            .insert(s.json()["seq"].as_u64().unwrap());
    }
    let reused: Vec<_> = readings_of.iter().filter(|(_, r)| r.len() > 1).collect();
    assert!(
        reused.is_empty(),
        "ids given to more than one reading: {reused:?}"
    );
    assert!(daemon.terminate().success());
}
