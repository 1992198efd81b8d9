//! End to end through an existing broker: devices → Mosquitto (stock
//! config) → the real `edgefn` daemon running the real example functions →
//! a second Mosquitto standing in for the cloud.

use std::collections::BTreeMap;
use std::ops::Range;

use testkit::*;

/// Upstream topic of a cleaned reading from `device`.
fn telemetry(device: &str) -> String {
    format!("site/pi-01/telemetry/{device}/temperature")
}

/// Per device, the `seq`s of cleaned readings in arrival order (first
/// arrival of each id).
fn seqs_by_device(seen: &[Seen]) -> BTreeMap<String, Vec<u64>> {
    let mut out: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    for s in Upstream::distinct(seen) {
        if let Some(dev) = s
            .topic
            .strip_prefix("site/pi-01/telemetry/")
            .and_then(|t| t.strip_suffix("/temperature"))
        {
            out.entry(dev.to_owned())
                .or_default()
                .push(s.json()["seq"].as_u64().unwrap());
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readings_are_cleaned_and_arrive_upstream_exactly() {
    let Connected {
        local,
        cloud: _cloud,
        dir,
        upstream,
        mut daemon,
        ..
    } = connected(Mosquitto::cloud().await).await;

    // 3 devices × 100 messages: every 10th is not JSON, then out of range,
    // then without temp_c, then not even UTF-8; the rest are good. Between
    // them, the chaos function traps on some inputs of its own.
    let mut dev = Device::connect("device-a", local.port).await;
    let mut expected: BTreeMap<String, Vec<(u64, f64)>> = BTreeMap::new();
    for i in 0..100u64 {
        for d in ["d1", "d2", "d3"] {
            let topic = format!("sensors/{d}/temperature");
            let t = i as f64 / 4.0 - 10.0;
            let payload: Vec<u8> = match i % 10 {
                0 => b"not json".to_vec(),
                1 => reading(i, 120.0).into_bytes(),
                2 => format!(r#"{{"seq":{i}}}"#).into_bytes(),
                3 => vec![0xff, 0xfe, 0x00],
                _ => {
                    expected.entry(d.to_owned()).or_default().push((i, t));
                    reading(i, t).into_bytes()
                }
            };
            assert!(dev.publish_acked(&topic, payload, PATIENCE).await);
        }
        if i == 50 {
            // Runs until its fuel budget is spent, well before its timeout.
            assert!(dev.publish_acked("chaos/spin", "spin", PATIENCE).await);
        }
        if i % 25 == 0 {
            assert!(dev.publish_acked("chaos/boom", "trap", PATIENCE).await);
            assert!(
                dev.publish_acked("chaos/hello", format!("hello {i}"), PATIENCE)
                    .await
            );
        }
    }
    let total: usize = expected.values().map(Vec::len).sum();
    let seen = upstream
        .wait_until("every cleaned reading and echo", |s| {
            Upstream::distinct(s).len() >= total + 4
        })
        .await;

    // Exactly the good readings, each once, in order per device, with the
    // original fields plus temp_f and device.
    let by_device = seqs_by_device(&seen);
    for (d, readings) in &expected {
        let seqs: Vec<u64> = readings.iter().map(|(s, _)| *s).collect();
        assert_eq!(by_device[d], seqs, "device {d}");
    }
    for s in Upstream::distinct(&seen) {
        if !s.topic.contains("/telemetry/") {
            continue;
        }
        let v = s.json();
        let d = v["device"].as_str().unwrap();
        assert_eq!(s.topic, telemetry(d));
        let seq = v["seq"].as_u64().unwrap();
        let t = expected[d].iter().find(|(q, _)| *q == seq).unwrap().1;
        assert_eq!(v["temp_c"].as_f64().unwrap(), t);
        assert!((v["temp_f"].as_f64().unwrap() - (t * 9.0 / 5.0 + 32.0)).abs() < 1e-9);
        let keys: Vec<&str> = v.as_object().unwrap().keys().map(String::as_str).collect();
        assert_eq!(keys.len(), 4, "{keys:?}");
        assert!(s.id.as_deref().unwrap().starts_with("pi-01:"));
    }
    // The healthy chaos inputs came through although others trapped.
    let echoes: Vec<String> = Upstream::distinct(&seen)
        .into_iter()
        .filter(|s| s.topic == "site/pi-01/echo/chaos/hello")
        .map(|s| s.payload)
        .collect();
    assert_eq!(echoes, ["hello 0", "hello 25", "hello 50", "hello 75"]);

    // A clean stop; the traps and the spin are in the dead letters, one
    // per input, after the configured retry.
    assert!(daemon.terminate().success());
    let dead = edgefn::store::dead_letters(&dir.path().join("data")).unwrap();
    let kinds: Vec<_> = dead
        .iter()
        .map(|d| (d.function.as_str(), d.topic.as_str(), d.kind))
        .collect();
    let trap = ("chaos", "chaos/boom", "trap");
    let fuel = ("chaos", "chaos/spin", "fuel");
    assert_eq!(kinds, [trap, trap, fuel, trap, trap]);
    assert!(dead.iter().all(|d| d.attempts == 2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_wait_in_the_buffer_while_upstream_is_down() {
    let Connected {
        local,
        mut cloud,
        dir,
        upstream,
        mut daemon,
        ..
    } = connected(Mosquitto::cloud_persistent().await).await;

    cloud.stop_gracefully();
    let mut dev = Device::connect("device-b", local.port).await;
    let n = 200u64;
    publish_round_robin(&mut dev, &["d1", "d2"], n).await;
    // Everything is committed to the outbox while the cloud is away.
    let db = dir.path().join("data/edgefn.db");
    wait_for_outbox(&db, n).await;

    cloud.restart().await;
    expect_round_robin(&upstream, &["d1", "d2"], n).await;
    // Delivered records leave the buffer.
    wait_for_outbox(&db, 0).await;
    assert!(daemon.terminate().success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_leaves_the_buffer_only_after_the_upstream_acknowledges_it() {
    let Connected {
        local,
        cloud,
        dir,
        config,
        upstream,
        mut daemon,
        ..
    } = connected(Mosquitto::cloud().await).await;

    // The cloud hangs with the connection open: edgefn publishes into the
    // socket as usual, and no PUBACK ever comes.
    cloud.freeze();
    let n = 50u64;
    let mut dev = Device::connect("device-h", local.port).await;
    publish_round_robin(&mut dev, &["d1"], n).await;
    let db = dir.path().join("data/edgefn.db");
    wait_for_outbox(&db, n).await;
    // A clean stop deletes everything acknowledged: here, nothing.
    assert!(daemon.terminate().success());
    wait_for_outbox(&db, n).await;

    // Once the cloud answers again, all of it arrives after a restart.
    cloud.thaw();
    let mut daemon = Daemon::start(&config);
    expect_round_robin(&upstream, &["d1"], n).await;
    wait_for_outbox(&db, 0).await;
    assert!(daemon.terminate().success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_the_local_broker_restarts_without_its_sessions_edgefn_subscribes_again() {
    let Connected {
        mut local,
        cloud: _cloud,
        dir: _dir,
        upstream,
        mut daemon,
        ..
    } = connected(Mosquitto::cloud().await).await;
    let mut dev = Device::connect("device-i", local.port).await;
    let n = 100u64;
    publish_round_robin_from(&mut dev, &["d1", "d2"], 0..n / 2).await;
    // Everything acknowledged so far is through before the broker goes.
    let _ = upstream.wait_for(n as usize / 2).await;

    // Killed and started afresh: the broker forgot edgefn's session and its
    // subscriptions. edgefn reconnects and subscribes again.
    local.stop();
    local.restart().await;
    daemon.wait_for_log_times(SUBSCRIBED, 2).await;
    publish_round_robin_from(&mut dev, &["d1", "d2"], n / 2..n).await;
    expect_round_robin(&upstream, &["d1", "d2"], n).await;
    assert!(daemon.terminate().success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_local_broker_restarted_mid_stream_loses_nothing_it_acknowledged() {
    // Persistence on, as in Debian's stock mosquitto.conf: edgefn's session,
    // with the messages queued and in flight to it, survives the restart.
    let Connected {
        mut local,
        cloud: _cloud,
        dir: _dir,
        upstream,
        mut daemon,
        ..
    } = connected_to(
        Mosquitto::start_persistent().await,
        Mosquitto::cloud().await,
    )
    .await;
    let mut dev = Device::connect("device-j", local.port).await;
    publish_round_robin_from(&mut dev, &["d1"], 0..100).await;
    // While edgefn hangs, the broker acknowledges 400 more: up to 256
    // (edgefn's Receive Maximum, less any still unacknowledged) go into
    // edgefn's socket; the rest wait in the broker's queue for its session.
    daemon.freeze();
    publish_round_robin_from(&mut dev, &["d1"], 100..500).await;
    local.stop_gracefully();
    local.restart().await;
    daemon.thaw();
    publish_round_robin_from(&mut dev, &["d1"], 500..600).await;

    // What edgefn read from the old connection it commits, but its acks
    // are for a connection that is gone: the broker sends those again (at
    // least once). The queued ones come from the restored session.
    expect_at_least_once(&upstream, "d1", 600).await;
    daemon.wait_for_log("session_present=true").await;
    assert!(daemon.terminate().success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_reach_a_cloud_broker_over_tls_with_a_client_certificate() {
    // The cloud takes edgefn on a TLS listener that wants a client
    // certificate; the test's subscriber uses its plain one.
    let pki = Pki::new();
    let tls_port = free_port();
    let local = Mosquitto::start().await;
    let cloud = Mosquitto::cloud_with_extra(&pki.mosquitto_listener(tls_port)).await;
    let dir = tempfile::tempdir().unwrap();
    let mut file = standard(dir.path(), Local::Broker(local.url()), cloud.port);
    let config = write_config(dir.path(), &file);
    let upstream = Upstream::subscribe(cloud.port, "site/#").await;

    // First with a CA the broker's certificate does not chain to: nothing
    // goes up, and nothing is lost.
    let stranger = Pki::new();
    let ca = stranger.file("ca.pem");
    over_tls(
        dir.path(),
        &mut file,
        "upstream",
        "127.0.0.1",
        tls_port,
        &ca,
        &pki,
    );
    let mut daemon = Daemon::start(&config);
    daemon.wait_for_log(SUBSCRIBED).await;
    let n = 20u64;
    let mut dev = Device::connect("device-k", local.port).await;
    publish_round_robin(&mut dev, &["d1"], n).await;
    wait_for_outbox(&dir.path().join("data/edgefn.db"), n).await;
    // Logged at each attempt: it keeps trying.
    daemon
        .wait_for_log_times(
            "upstream connection lost error=TLS: I/O: invalid peer certificate: UnknownIssuer",
            2,
        )
        .await;
    assert!(daemon.terminate().success());

    // With the right CA, everything arrives.
    over_tls(
        dir.path(),
        &mut file,
        "upstream",
        "127.0.0.1",
        tls_port,
        &pki.file("ca.pem"),
        &pki,
    );
    let check = edgefn(&["check", "--config", config.to_str().unwrap()]);
    let summary = String::from_utf8_lossy(&check.stdout);
    assert!(
        check.status.success(),
        "{summary}{}",
        String::from_utf8_lossy(&check.stderr)
    );
    let want = format!(
        "upstream mqtts://127.0.0.1:{tls_port} prefix \"site/pi-01/\", TLS, CA {}, client certificate {}",
        pki.file("ca.pem").display(),
        pki.file("client.pem").display()
    );
    assert!(summary.contains(&want), "{want:?} not in {summary}");
    let mut daemon = Daemon::start(&config);
    expect_round_robin(&upstream, &["d1"], n).await;
    wait_for_outbox(&dir.path().join("data/edgefn.db"), 0).await;
    assert!(daemon.terminate().success());
}

/// Points `file`'s `[section]` (`local` or `upstream`) to a broker's TLS
/// listener at `host:tls_port`, trusting `ca` and showing the client
/// certificate of `pki`; writes it into `dir`.
fn over_tls(
    dir: &std::path::Path,
    file: &mut ConfigFile,
    section: &str,
    host: &str,
    tls_port: u16,
    ca: &std::path::Path,
    pki: &Pki,
) {
    let url = format!("mqtts://{host}:{tls_port}");
    let files = [
        ca.display().to_string(),
        pki.file("client.pem").display().to_string(),
        pki.file("client.key").display().to_string(),
    ]
    .map(Some);
    let [ca_file, cert_file, key_file] = files;
    match section {
        "local" => {
            let l = &mut file.local;
            (l.url, l.ca_file, l.cert_file, l.key_file) = (Some(url), ca_file, cert_file, key_file);
        }
        "upstream" => {
            let u = file.upstream_mut();
            (u.url, u.ca_file, u.cert_file, u.key_file) = (url, ca_file, cert_file, key_file);
        }
        other => panic!("no [{other}] with a broker"),
    }
    write_config(dir, file);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readings_come_from_a_local_broker_over_tls() {
    // Devices use the broker's plain listener, edgefn its TLS one, whose
    // certificate names only "localhost".
    let pki = Pki::with_broker_names(&["localhost"]);
    let tls_port = free_port();
    let local = Mosquitto::start_with_extra(&pki.mosquitto_listener(tls_port)).await;
    let cloud = Mosquitto::cloud().await;
    let dir = tempfile::tempdir().unwrap();
    let mut file = standard(dir.path(), Local::Broker(local.url()), cloud.port);
    let config = write_config(dir.path(), &file);
    let upstream = Upstream::subscribe(cloud.port, "site/#").await;

    // By address, the name check fails, and edgefn keeps trying.
    let ca = pki.file("ca.pem");
    over_tls(
        dir.path(),
        &mut file,
        "local",
        "127.0.0.1",
        tls_port,
        &ca,
        &pki,
    );
    let mut daemon = Daemon::start(&config);
    daemon
        .wait_for_log_times(
            "local broker connection lost error=TLS: I/O: invalid peer certificate: \
         certificate not valid for name",
            2,
        )
        .await;
    assert!(!daemon.log().contains(SUBSCRIBED));
    assert!(daemon.terminate().success());

    // By the name in the certificate (sent as SNI), it connects.
    over_tls(
        dir.path(),
        &mut file,
        "local",
        "localhost",
        tls_port,
        &ca,
        &pki,
    );
    let mut daemon = Daemon::start(&config);
    daemon.wait_for_log(SUBSCRIBED).await;
    let mut dev = Device::connect("device-l", local.port).await;
    publish_round_robin(&mut dev, &["d1", "d2"], 20).await;
    expect_round_robin(&upstream, &["d1", "d2"], 20).await;
    assert!(daemon.terminate().success());
}

/// A stock device-side Mosquitto, `cloud`, a subscriber on the cloud, and
/// the daemon connected to both. Destructure it binding every field that
/// must live (the brokers, `dir`): fields left to `..` are dropped at once.
/// A device-side Mosquitto (with `local_extra` mosquitto.conf lines) that
/// holds edgefn's persistent session while the daemon is stopped, so it
/// queues what devices publish; a cloud broker with a subscriber on it.
struct SessionWithoutDaemon {
    local: Mosquitto,
    _cloud: Mosquitto,
    _dir: tempfile::TempDir,
    /// The standard config, `local` changed by `more`.
    config: std::path::PathBuf,
    upstream: Upstream,
}

async fn session_without_daemon(
    local_extra: &str,
    more: impl FnOnce(&mut LocalTable),
) -> SessionWithoutDaemon {
    let local = Mosquitto::start_with_extra(local_extra).await;
    let cloud = Mosquitto::cloud().await;
    let dir = tempfile::tempdir().unwrap();
    let mut file = standard(dir.path(), Local::Broker(local.url()), cloud.port);
    more(&mut file.local);
    let config = write_config(dir.path(), &file);
    let upstream = Upstream::subscribe(cloud.port, "site/#").await;
    let mut daemon = Daemon::start(&config);
    daemon.wait_for_log(SUBSCRIBED).await;
    assert!(daemon.terminate().success());
    SessionWithoutDaemon {
        local,
        _cloud: cloud,
        _dir: dir,
        config,
        upstream,
    }
}

/// Publishes readings `0..n`, reading `i` from `devices[i % devices.len()]`,
/// each after the previous one's PUBACK.
async fn publish_round_robin(dev: &mut Device, devices: &[&str], n: u64) {
    publish_round_robin_from(dev, devices, 0..n).await;
}

/// [`publish_round_robin`] for the readings in `seqs`. A reading whose
/// PUBACK does not come (the broker went away) is published again, on a new
/// connection, until one does.
async fn publish_round_robin_from(dev: &mut Device, devices: &[&str], seqs: Range<u64>) {
    let deadline = std::time::Instant::now() + PATIENCE;
    for i in seqs {
        let d = devices[i as usize % devices.len()];
        let topic = format!("sensors/{d}/temperature");
        while !dev.publish_acked(&topic, reading(i, 20.0), PATIENCE).await {
            assert!(
                std::time::Instant::now() < deadline,
                "reading {i} never acknowledged"
            );
        }
    }
}

/// Waits until all `n` readings of [`publish_round_robin`] arrived
/// upstream, and checks that each device's arrived in order.
async fn expect_round_robin(upstream: &Upstream, devices: &[&str], n: u64) {
    let seen = upstream
        .wait_until("every reading", |s| {
            Upstream::distinct(s).len() >= n as usize
        })
        .await;
    let by_device = seqs_by_device(&seen);
    for (k, d) in devices.iter().enumerate() {
        let want: Vec<u64> = (k as u64..n).step_by(devices.len()).collect();
        assert_eq!(by_device[*d], want, "device {d}");
    }
}

/// Waits until the outbox holds exactly `n` rows.
async fn wait_for_outbox(db: &std::path::Path, n: u64) {
    eventually(&format!("the outbox holds {n} rows"), || {
        outbox_rows(db) == n as i64
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_daemon_loses_no_acknowledged_reading() {
    let Connected {
        local,
        cloud: _cloud,
        dir: _dir,
        config,
        upstream,
        mut daemon,
        ..
    } = connected(Mosquitto::cloud().await).await;
    let n = 400u64;
    let mut dev = Device::connect("device-c", local.port).await;
    for i in 0..n {
        assert!(
            dev.publish_acked("sensors/d1/temperature", reading(i, 21.0), PATIENCE)
                .await
        );
        if i == n / 3 {
            // Kill it while readings are in flight at every stage.
            upstream.wait_for(1).await;
            daemon.kill();
        }
        if i == 2 * n / 3 {
            daemon = Daemon::start(&config);
        }
    }
    // Duplicates are possible around the kill, losses are not.
    expect_at_least_once(&upstream, "d1", n).await;
    assert!(daemon.terminate().success());
}

/// Waits until readings `0..n` of `device` all arrived upstream, at least
/// once each (duplicates allowed).
async fn expect_at_least_once(upstream: &Upstream, device: &str, n: u64) {
    let distinct_seqs = |s: &[Seen]| {
        let mut seqs: Vec<u64> = seqs_by_device(s).remove(device).unwrap_or_default();
        seqs.sort_unstable();
        seqs.dedup();
        seqs
    };
    let seen = upstream
        .wait_until("every reading at least once", |s| {
            distinct_seqs(s).len() as u64 >= n
        })
        .await;
    assert_eq!(distinct_seqs(&seen), (0..n).collect::<Vec<_>>());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_message_is_refused_and_the_rest_flows() {
    let Connected {
        local,
        cloud: _cloud,
        dir: _dir,
        upstream,
        daemon: _daemon,
        metrics,
        ..
    } = connected(Mosquitto::cloud().await).await;
    let mut dev = Device::connect("device-d", local.port).await;
    let big = format!(r#"{{"seq":0,"temp_c":20,"pad":"{}"}}"#, "x".repeat(5000));
    assert!(
        dev.publish_acked("sensors/d1/temperature", big, PATIENCE)
            .await
    );
    assert!(
        dev.publish_acked("sensors/d1/temperature", reading(1, 20.0), PATIENCE)
            .await
    );
    let seen = upstream.wait_for(1).await;
    assert_eq!(seen[0].json()["seq"], 1);
    let report = wait_for_counter(metrics, "refused_too_large", 1).await;
    assert_eq!(report["gateway"]["counters"]["refused_too_large"], 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drops_by_a_stock_mosquitto_are_reported() {
    // A stock Mosquitto queues at most 1000 messages for an offline
    // session (max_queued_messages); the rest are dropped although the
    // device got a PUBACK for each. edgefn cannot prevent that, but says so.
    let away = session_without_daemon("sys_interval 1\n", |_| {}).await;
    let (local, config, upstream) = (&away.local, &away.config, &away.upstream);

    let mut dev = Device::connect("device-e", local.port).await;
    for i in 0..1100u64 {
        assert!(
            dev.publish_acked("sensors/d1/temperature", reading(i, 20.0), PATIENCE)
                .await
        );
    }
    let daemon = Daemon::start(config);
    // Reported as drops since the broker started, or as an increase if the
    // broker's retained counter was not yet updated when edgefn subscribed.
    daemon.wait_for_log("dropped=100").await;
    assert!(
        daemon.log().contains("the local broker"),
        "{}",
        daemon.log()
    );
    // The 1000 it did queue all arrive.
    let _ = upstream.wait_for(1000).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_too_large_for_the_upstream_goes_to_the_dead_letters_and_the_rest_flows() {
    // The cloud announces a Maximum Packet Size of 2000 bytes (MQTT 5 CONNACK).
    let Connected {
        local,
        cloud: _cloud,
        dir,
        upstream,
        mut daemon,
        ..
    } = connected(Mosquitto::cloud_with_extra("max_packet_size 2000\n").await).await;
    let mut dev = Device::connect("device-f", local.port).await;
    // chaos echoes plain payloads to echo/<topic>: 3000 bytes cannot go up.
    assert!(
        dev.publish_acked("chaos/big", "x".repeat(3000), PATIENCE)
            .await
    );
    assert!(dev.publish_acked("chaos/small", "fits", PATIENCE).await);
    let seen = upstream.wait_for(1).await;
    assert_eq!(
        (seen[0].topic.as_str(), seen[0].payload.as_str()),
        ("site/pi-01/echo/chaos/small", "fits")
    );
    assert!(daemon.terminate().success());
    let dead = edgefn::store::dead_letters(&dir.path().join("data")).unwrap();
    assert_eq!(dead.len(), 1);
    assert_eq!(
        (dead[0].function.as_str(), dead[0].kind),
        ("upstream", "rejected")
    );
    assert_eq!(dead[0].topic, "echo/chaos/big");
    assert!(
        dead[0].error.contains("maximum packet size"),
        "{}",
        dead[0].error
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deep_backlog_on_the_broker_all_arrives() {
    // With the queue limit lifted as docs/DELIVERY.md recommends, Mosquitto
    // 2.0 keeps a backlog for edgefn while it is down. When edgefn comes
    // back, Mosquitto sends more unacknowledged messages than edgefn's
    // Receive Maximum allows (each PUBACK releases up to a window more);
    // every one must still be acknowledged, or Mosquitto holds it forever.
    // A small window makes the broker overshoot it many times over.
    let away = session_without_daemon("max_queued_messages 0\n", |l| l.in_flight = Some(16)).await;
    let (local, config, upstream) = (&away.local, &away.config, &away.upstream);

    let n = 3000u64;
    let mut dev = Device::connect("device-g", local.port).await;
    publish_round_robin(&mut dev, &["d1", "d2", "d3"], n).await;
    let mut daemon = Daemon::start(config);
    expect_round_robin(upstream, &["d1", "d2", "d3"], n).await;
    assert!(daemon.terminate().success());
}
