//! The gateway against hostile functions, refusing upstreams and stalls:
//! none of them may stop it for good, and what it holds stays bounded.

use testkit::*;

/// The dead letters of the daemon whose config is in `dir`.
fn dead_letters(dir: &tempfile::TempDir) -> Vec<edgefn::store::DeadLetter> {
    edgefn::store::dead_letters(&dir.path().join("data")).unwrap()
}

/// Payloads of the records seen upstream on `topic`, first arrival of each
/// id, in arrival order.
fn payloads_on(seen: &[Seen], topic: &str) -> Vec<String> {
    Upstream::on(seen, topic)
        .into_iter()
        .map(|s| s.payload)
        .collect()
}

/// Through an external broker, with `upstream.refused_topic_timeout` at
/// 1 s: publishes `payload` on `topic` (for chaos), then 20 plain messages,
/// waits until those 20 arrived upstream in order (the bad one held
/// nothing back) and the bad one is a dead letter, stops the daemon and
/// returns that dead letter.
async fn one_bad_message_then_twenty(topic: &str, payload: &str) -> edgefn::store::DeadLetter {
    let Connected {
        local,
        cloud: _cloud,
        dir,
        upstream,
        mut daemon,
        ..
    } = connected_with(Mosquitto::start().await, Mosquitto::cloud().await, |c| {
        c.upstream_mut().refused_topic_timeout = Some("1s".into())
    })
    .await;
    let mut dev = Device::connect("device-b", local.port).await;
    assert!(dev.publish_acked(topic, payload, PATIENCE).await);
    for i in 0..20 {
        let payload = format!("after {i}");
        assert!(dev.publish_acked("chaos/after", payload, PATIENCE).await);
    }
    let after = "site/pi-01/echo/chaos/after";
    let seen = upstream
        .wait_until("20 records after the bad one", |s| {
            payloads_on(s, after).len() >= 20
        })
        .await;
    let want: Vec<String> = (0..20).map(|i| format!("after {i}")).collect();
    assert_eq!(payloads_on(&seen, after), want);
    eventually("the bad one in the dead letters", || {
        !dead_letters(&dir).is_empty()
    })
    .await;
    assert!(daemon.terminate().success());
    let mut dead = dead_letters(&dir);
    assert_eq!(dead.len(), 1, "{dead:?}");
    dead.remove(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_buffer_drains_when_the_upstream_refuses_records_instead_of_acknowledging_them() {
    // The cloud, once up, announces a Maximum Packet Size of 300 bytes:
    // every cleaned reading below (about 450 bytes) can only be refused.
    let mut cloud = Mosquitto::cloud_with_extra("max_packet_size 300\n").await;
    cloud.stop();
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let mut file = standard(dir.path(), Local::Embedded(port), cloud.port);
    file.buffer.max_size = Some("4KiB".into());
    // Room for all 60 dead letters (by default they get a quarter of max_size).
    file.buffer.dead_letters_max_size = Some("1MiB".into());
    let config = write_config(dir.path(), &file);
    let daemon = Daemon::start(&config);
    port_open(port).await;

    let device = tokio::spawn(async move {
        let mut dev = Device::connect("sensor-r", port).await;
        for i in 0..60u64 {
            let payload = format!(r#"{{"seq":{i},"temp_c":20.5,"pad":"{}"}}"#, "p".repeat(380));
            assert!(
                dev.publish_acked("sensors/r1/temperature", payload, PATIENCE)
                    .await,
                "reading {i} was never acknowledged"
            );
        }
    });
    // About nine records fill 4 KiB; then the device waits for room.
    daemon.wait_for_log("buffer full").await;
    cloud.restart().await;
    device.await.unwrap();
    eventually("all 60 records refused into the dead letters", || {
        dead_letters(&dir).len() == 60
    })
    .await;
    for d in dead_letters(&dir) {
        assert_eq!((d.function.as_str(), d.kind), ("upstream", "rejected"));
        assert!(d.error.contains("maximum packet size"), "{}", d.error);
    }
    drop(daemon);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_whose_topic_is_too_long_with_the_prefix_is_refused_at_emit_and_the_rest_flows() {
    // chaos echoes to `echo/<topic>`: 65,530 bytes, and 65,541 behind the
    // prefix `site/pi-01/`, more than an MQTT topic can be.
    let long = format!("chaos/{}", "t".repeat(65_519));
    let dead = one_bad_message_then_twenty(&long, "x").await;
    assert_eq!((dead.function.as_str(), dead.kind), ("chaos", "error"));
    assert!(dead.error.contains("invalid topic"), "{}", dead.error);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_the_upstream_answers_by_closing_the_connection_goes_to_the_dead_letters() {
    // `chaos/poison\u{7}`: valid MQTT, but Mosquitto closes the connection
    // of a client that publishes a topic with a control character.
    let dead = one_bad_message_then_twenty("chaos/p", "poison").await;
    assert_eq!(
        (dead.function.as_str(), dead.kind, dead.topic.as_str()),
        ("upstream", "rejected", "chaos/poison\u{7}")
    );
    assert!(
        dead.error
            .contains("closed the connection each of the 3 times"),
        "{}",
        dead.error
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clean_stop_waits_for_the_pubacks_of_records_in_flight() {
    let local = Mosquitto::start().await;
    let cloud = Mosquitto::cloud().await;
    let dir = tempfile::tempdir().unwrap();
    let mut file = standard(dir.path(), Local::Broker(local.url()), cloud.port);
    let metrics = free_port();
    file.metrics_on(metrics);
    let config = write_config(dir.path(), &file);
    let daemon = Daemon::start_logging(&config, "info,edgefn::forward=debug,rmqtt=warn");
    daemon.wait_for_log(SUBSCRIBED).await;
    wait_for_counter(metrics, "upstream_connects", 1).await;
    // The cloud hangs: what edgefn sends waits in its socket, unacknowledged.
    cloud.freeze();
    let mut dev = Device::connect("device-s", local.port).await;
    for i in 0..5 {
        assert!(
            dev.publish_acked("sensors/s1/temperature", reading(i, 21.0), PATIENCE)
                .await
        );
    }
    daemon.wait_for_log_times("sent upstream", 5).await;
    daemon.begin_stop();
    daemon
        .wait_for_log("draining the upstream connection")
        .await;
    // The PUBACKs come while edgefn drains: they count.
    cloud.thaw();
    let mut daemon = daemon;
    assert!(daemon.child.wait().unwrap().success());
    assert_eq!(outbox_rows(&dir.path().join("data/edgefn.db")), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trigger_removed_from_the_config_is_unsubscribed_from_the_persistent_session() {
    // Mosquitto publishes how many subscriptions it holds, offline
    // sessions' included, every second.
    let local = Mosquitto::start_with_extra("sys_interval 1\n").await;
    let cloud = Mosquitto::cloud().await;
    let dir = tempfile::tempdir().unwrap();
    let mut file = standard(dir.path(), Local::Broker(local.url()), cloud.port);
    let config = write_config(dir.path(), &file);
    let subscriptions = Subscriptions::watch(local.port).await;
    let mut daemon = Daemon::start(&config);
    daemon.wait_for_log(SUBSCRIBED).await;
    assert!(daemon.terminate().success());
    // Its session keeps `sensors/+/temperature`, `chaos/#` and the $SYS
    // drop counter; the fourth is the counting subscriber's.
    subscriptions.wait_for("4").await;

    // Without the chaos function, `chaos/#` must go.
    write_config(dir.path(), file.without_function("chaos"));
    let mut daemon = Daemon::start(&config);
    daemon.wait_for_log(SUBSCRIBED).await;
    subscriptions.wait_for("3").await;
    assert!(daemon.terminate().success());
}

#[cfg(feature = "embedded-broker")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_function_asleep_in_a_wasi_call_times_out_and_holds_no_other_acknowledgement() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    // No upstream: everything stays in the buffer.
    let config = standard_config(dir.path(), Local::Embedded(port), free_port());
    let daemon = Daemon::start(&config);
    port_open(port).await;
    // chaos (timeout 200 ms, one retry) sleeps an hour in poll_oneoff.
    let sleeper = tokio::spawn(async move {
        let mut dev = Device::connect("sleeper", port).await;
        assert!(dev.publish_acked("chaos/s", "sleep", PATIENCE).await);
    });
    let mut dev = Device::connect("sensor-w", port).await;
    for i in 0..20 {
        assert!(
            dev.publish_acked("sensors/w1/temperature", reading(i, 21.0), PATIENCE)
                .await,
            "reading {i} waited for the sleeping function"
        );
    }
    sleeper.await.unwrap();
    let dead = dead_letters(&dir);
    assert_eq!(dead.len(), 1);
    assert_eq!(
        (dead[0].function.as_str(), dead[0].kind, dead[0].attempts),
        ("chaos", "timeout", 2)
    );
    drop(daemon);
}

/// A Mosquitto whose access list is the file `acl` holds (written first
/// with `rules`), for anonymous clients. Mosquitto 2.0.11 answers a denied
/// QoS 1 publish with PUBACK 0x87; with `max_queued_messages 0`
/// (`unbounded`) it then also closes the connection.
async fn cloud_with_acl(acl: &std::path::Path, rules: &str, unbounded: bool) -> Mosquitto {
    std::fs::write(acl, rules).unwrap();
    let extra = format!("acl_file {}\n", acl.display());
    if unbounded {
        Mosquitto::cloud_with_extra(&extra).await
    } else {
        Mosquitto::start_with_extra(&extra).await
    }
}

/// The gateway in `dir` with the built-in broker on `port`, in this
/// process, `more` applied to its standard config.
async fn gateway(
    dir: &tempfile::TempDir,
    port: u16,
    cloud: &Mosquitto,
    more: impl FnOnce(&mut ConfigFile),
) -> edgefn::gateway::Gateway {
    let mut file = standard(dir.path(), Local::Embedded(port), cloud.port);
    more(&mut file);
    let config = write_config(dir.path(), &file);
    edgefn::gateway::Gateway::start(edgefn::config::Config::load(&config).unwrap())
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cloud_that_refuses_every_record_costs_time_not_data() {
    let acl_dir = tempfile::tempdir().unwrap();
    let acl = acl_dir.path().join("acl");
    // A mistake in the cloud's access list: anyone may read, nobody write.
    let cloud = cloud_with_acl(&acl, "topic read #\n", false).await;
    let upstream = Upstream::subscribe(cloud.port, "site/#").await;
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let mut file = standard(dir.path(), Local::Embedded(port), cloud.port);
    file.metrics_on(free_port());
    let config = write_config(dir.path(), &file);
    let gateway = edgefn::gateway::Gateway::start(edgefn::config::Config::load(&config).unwrap())
        .await
        .unwrap();
    let mut dev = Device::connect("sensor-a", port).await;
    let readings = 100;
    for i in 0..readings {
        assert!(
            dev.publish_acked("sensors/a1/temperature", reading(i, 20.0), PATIENCE)
                .await
        );
    }
    // Refused (0x87), tried again after backoffs, and kept all along.
    eventually("three refusals", || {
        gateway.metrics().upstream_refusals >= 3
    })
    .await;
    let m = gateway.metrics();
    assert_eq!(
        (m.upstream_refused_topics, m.upstream_refusal_reason),
        (1, 0x87)
    );
    assert_eq!((m.dead_letters, m.upstream_rejected), (0, 0));
    assert_eq!(
        outbox_rows(&dir.path().join("data/edgefn.db")),
        readings as i64
    );
    let status = edgefn(&["status", "--config", config.to_str().unwrap()]);
    let status = String::from_utf8_lossy(&status.stdout);
    assert!(
        status.contains("upstream    refuses 1 topic(s) (reason 0x87)"),
        "{status}"
    );
    // The ACL fixed and reloaded: every reading arrives, in order.
    std::fs::write(&acl, "topic readwrite #\n").unwrap();
    cloud.reload();
    let seen = upstream
        .wait_until("every reading", |s| {
            Upstream::distinct(s).len() >= readings as usize
        })
        .await;
    let seqs: Vec<u64> = Upstream::distinct(&seen)
        .iter()
        .map(|m| m.reading().1)
        .collect();
    assert_eq!(seqs, (0..readings).collect::<Vec<_>>());
    eventually("no refused topic left", || {
        gateway.metrics().upstream_refused_topics == 0
    })
    .await;
    assert!(dead_letters(&dir).is_empty());
    drop(dev);
    gateway.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_topic_the_cloud_refuses_while_it_takes_others_goes_to_the_dead_letters_after_its_timeout()
 {
    let acl_dir = tempfile::tempdir().unwrap();
    let acl = acl_dir.path().join("acl");
    // Readings may be written; chaos's echoes may not.
    let cloud = cloud_with_acl(
        &acl,
        "topic read #\ntopic write site/pi-01/telemetry/#\n",
        true,
    )
    .await;
    let upstream = Upstream::subscribe(cloud.port, "site/#").await;
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let gateway = gateway(&dir, port, &cloud, |c| {
        c.upstream_mut().refused_topic_timeout = Some("2s".into());
    })
    .await;
    let mut dev = Device::connect("sensor-b", port).await;
    for i in 0..5 {
        assert!(
            dev.publish_acked("chaos/x", format!("echo {i}"), PATIENCE)
                .await
        );
    }
    eventually("the echo refused", || {
        gateway.metrics().upstream_refusals >= 1
    })
    .await;
    // Readings flow meanwhile, and go on flowing.
    let mut sent = 0;
    while dead_letters(&dir).len() < 5 {
        assert!(
            dev.publish_acked("sensors/b1/temperature", reading(sent, 20.0), PATIENCE)
                .await
        );
        sent += 1;
        upstream
            .wait_until(&format!("reading {}", sent - 1), |s| {
                s.iter().any(|m| m.reading() == ("b1".into(), sent - 1))
            })
            .await;
    }
    let dead = dead_letters(&dir);
    assert_eq!(dead.len(), 5);
    let payloads: Vec<String> = dead
        .iter()
        .map(|d| String::from_utf8_lossy(&d.payload).into_owned())
        .collect();
    assert_eq!(
        payloads,
        (0..5).map(|i| format!("echo {i}")).collect::<Vec<_>>()
    );
    for d in &dead {
        assert_eq!((d.function.as_str(), d.kind), ("upstream", "rejected"));
        assert!(
            d.error.contains("0x87") && d.error.contains("accepted others"),
            "{}",
            d.error
        );
    }
    // No reading was lost or held back for good.
    assert_eq!(gateway.metrics().upstream_rejected, 5);
    drop(dev);
    gateway.shutdown().await;
}

/// Peak resident memory (`VmHWM`) of process `pid`, bytes.
fn peak_rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .expect("VmHWM");
    kb * 1024
}

/// A daemon on `dir` whose built-in broker holds at most `memory_limit`
/// (messages up to 512 KiB), no upstream: it, its port and its metrics port.
#[cfg(feature = "embedded-broker")]
async fn broker_within(dir: &std::path::Path, memory_limit: &str) -> (Daemon, u16, u16) {
    let port = free_port();
    let metrics = free_port();
    let mut file = standard(dir, Local::Embedded(port), free_port());
    file.upstream = None;
    file.local.max_message_size = Some("512KiB".into());
    file.local.memory_limit = Some(memory_limit.into());
    file.metrics_on(metrics);
    let daemon = Daemon::start(&write_config(dir, &file));
    port_open(port).await;
    (daemon, port, metrics)
}

#[cfg(feature = "embedded-broker")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_the_built_in_broker_holds_for_subscribers_stays_within_its_memory_limit() {
    let dir = tempfile::tempdir().unwrap();
    let (daemon, port, metrics) = broker_within(dir.path(), "2MiB").await;
    // Eight sleepers: persistent sessions, offline, each on its own topic.
    for s in 0..8 {
        session_v5(
            port,
            &format!("sleeper-{s}"),
            false,
            Some(&format!("flood/{s}")),
        )
        .await;
    }
    // 200 MB for them, 256 KiB at a time, every publish acknowledged.
    let mut flooder = Device::connect("flooder", port).await;
    let payload = vec![7u8; 256 * 1024];
    for _ in 0..100 {
        for s in 0..8 {
            assert!(
                flooder
                    .publish_acked(&format!("flood/{s}"), payload.clone(), PATIENCE)
                    .await
            );
        }
    }
    // Meanwhile readings are acknowledged and committed as always.
    let mut dev = Device::connect("sensor-f", port).await;
    for i in 0..5 {
        assert!(
            dev.publish_acked("sensors/f1/temperature", reading(i, 20.0), PATIENCE)
                .await
        );
    }
    let report = wait_for_counter(metrics, "committed", 5).await;
    let counters = &report["gateway"]["counters"];
    let held = counters["broker_held_bytes"].as_u64().unwrap();
    let dropped = counters["broker_dropped_memory_limit"].as_u64().unwrap();
    // 2 MiB holds 8 of the 256 KiB messages; the other 792 were not routed.
    assert_eq!((held, dropped), (8 * 256 * 1024, 800 - 8), "{counters}");
    let peak = peak_rss(daemon.child.id());
    assert!(peak < 150 << 20, "peak RSS {} MB", peak >> 20);
    // The sleepers' sessions end: what they held is given back.
    for s in 0..8 {
        session_v5(port, &format!("sleeper-{s}"), true, None).await;
    }
    wait_for_report(metrics, "nothing held", |r| {
        r["gateway"]["counters"]["broker_held_bytes"] == 0
    })
    .await;
}

#[cfg(feature = "embedded-broker")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retained_messages_count_against_the_memory_limit_and_give_it_back_when_cleared() {
    let dir = tempfile::tempdir().unwrap();
    let (_daemon, port, metrics) = broker_within(dir.path(), "1MiB").await;
    let size = 300 * 1024;
    // A retained message holds its payload and its topic (`retain/N`: 8 bytes).
    let one = (size + 8) as u64;
    let held_and_dropped = |held: u64, dropped: u64| {
        move |r: &serde_json::Value| {
            let c = &r["gateway"]["counters"];
            c["broker_held_bytes"] == held && c["broker_dropped_memory_limit"] == dropped
        }
    };
    // Three fit in 1 MiB; the fourth is acknowledged, not kept.
    for t in 0..4 {
        publish_retained(port, &format!("retain/{t}"), vec![b'r'; size]).await;
    }
    wait_for_report(
        metrics,
        "three held, one not kept",
        held_and_dropped(3 * one, 1),
    )
    .await;
    // Cleared, its bytes are given back, and the fourth fits now.
    publish_retained(port, "retain/0", Vec::new()).await;
    wait_for_report(metrics, "two held", held_and_dropped(2 * one, 1)).await;
    publish_retained(port, "retain/3", vec![b'r'; size]).await;
    wait_for_report(metrics, "three held again", held_and_dropped(3 * one, 1)).await;
}
