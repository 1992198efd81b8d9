//! The Lambda controls of a function on the device: schedules, durable
//! state, permissions. Each against the real daemon, its built-in broker
//! and a real Mosquitto standing in for the cloud.

#![cfg(feature = "embedded-broker")]

use testkit::*;

/// Emits every payload it gets to `tick`.
const TICK: &str = r#"(module
  (import "edgefn" "emit" (func $emit (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 0) "tick")
  (func (export "edgefn_abi_version") (result i32) i32.const 1)
  (func (export "edgefn_alloc") (param i32) (result i32) i32.const 1024)
  (func (export "edgefn_on_message") (param i32 i32 i32 i32) (result i32)
    (drop (call $emit (i32.const 0) (i32.const 4) (local.get 2) (local.get 3)))
    i32.const 0))"#;

/// Sleeps 1.5 s (WASI `poll_oneoff`), then emits the payload to `slow`.
const SLOW: &str = r#"(module
  (import "wasi_snapshot_preview1" "poll_oneoff" (func $poll (param i32 i32 i32 i32) (result i32)))
  (import "edgefn" "emit" (func $emit (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 0) "slow")
  (func (export "edgefn_abi_version") (result i32) i32.const 1)
  (func (export "edgefn_alloc") (param i32) (result i32) i32.const 1024)
  (func (export "edgefn_on_message") (param i32 i32 i32 i32) (result i32)
    (i32.store8 (i32.const 2056) (i32.const 0))
    (i32.store (i32.const 2064) (i32.const 1))
    (i64.store (i32.const 2072) (i64.const 1500000000))
    (drop (call $poll (i32.const 2048) (i32.const 2304) (i32.const 1) (i32.const 2400)))
    (drop (call $emit (i32.const 0) (i32.const 4) (local.get 2) (local.get 3)))
    i32.const 0))"#;

/// On each message: emits to `allowed/x` and `secret/x`, publishes to
/// `cmd/x`, then emits `e=<emit code> p=<publish code>` (codes as one
/// character each: `0` ok, `5` for −5) to `result`.
const PERMISSIONS: &str = r#"(module
  (import "edgefn" "emit" (func $emit (param i32 i32 i32 i32) (result i32)))
  (import "edgefn" "publish" (func $publish (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 0) "allowed/x")
  (data (i32.const 16) "secret/x")
  (data (i32.const 32) "cmd/x")
  (data (i32.const 48) "result")
  (data (i32.const 64) "e=? p=?")
  (func (export "edgefn_abi_version") (result i32) i32.const 1)
  (func (export "edgefn_alloc") (param i32) (result i32) i32.const 1024)
  (func (export "edgefn_on_message") (param i32 i32 i32 i32) (result i32)
    (drop (call $emit (i32.const 0) (i32.const 9) (local.get 2) (local.get 3)))
    (i32.store8 (i32.const 66)
      (i32.sub (i32.const 48) (call $emit (i32.const 16) (i32.const 8) (local.get 2) (local.get 3))))
    (i32.store8 (i32.const 70)
      (i32.sub (i32.const 48) (call $publish (i32.const 32) (i32.const 5) (local.get 2) (local.get 3))))
    (drop (call $emit (i32.const 48) (i32.const 6) (i32.const 64) (i32.const 7)))
    i32.const 0))"#;

/// A gateway `pi-01` with the built-in broker on `port`, the cloud at
/// `cloud_port`, and `functions`, with `more` applied; written in `dir`.
fn config(
    dir: &std::path::Path,
    port: u16,
    cloud_port: u16,
    functions: Vec<FunctionManifest>,
    more: impl FnOnce(&mut ConfigFile),
) -> std::path::PathBuf {
    let mut file = embedded_gateway(dir, port, cloud_port, functions);
    more(&mut file);
    write_config(dir, &file)
}

/// The function `name` running the module file `module`.
fn runs_file(name: &str, module: &std::path::Path) -> FunctionManifest {
    FunctionManifest {
        name: name.into(),
        module: Some(module.display().to_string()),
        ..Default::default()
    }
}

/// Writes the module `wat` as `name.wasm` in `dir`.
fn module_file(dir: &std::path::Path, name: &str, wat: &str) -> std::path::PathBuf {
    let path = dir.join(format!("{name}.wasm"));
    std::fs::write(&path, wat::parse_str(wat).unwrap()).unwrap();
    path
}

/// The scheduled runs seen upstream on `topic`: their payloads, parsed.
fn runs(seen: &[Seen], topic: &str) -> Vec<serde_json::Value> {
    Upstream::on(seen, topic).iter().map(Seen::json).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_schedule_runs_the_function_and_one_missed_run_is_made_up_at_start_up() {
    let cloud = Mosquitto::cloud().await;
    let upstream = Upstream::subscribe(cloud.port, "site/pi-01/#").await;
    let dir = tempfile::tempdir().unwrap();
    let tick = module_file(dir.path(), "tick", TICK);
    let functions = |schedule: &str| {
        vec![FunctionManifest {
            schedule: Some(schedule.into()),
            ..runs_file("tick", &tick)
        }]
    };
    let port = free_port();
    let cfg = config(dir.path(), port, cloud.port, functions("every 1s"), |_| {});
    let mut daemon = Daemon::start(&cfg);
    let seen = upstream
        .wait_until("three scheduled runs", |s| {
            runs(s, "site/pi-01/tick").len() >= 3
        })
        .await;
    let ticks = runs(&seen, "site/pi-01/tick");
    for pair in ticks.windows(2) {
        let (a, b) = (
            pair[0]["scheduled_ms"].as_u64().unwrap(),
            pair[1]["scheduled_ms"].as_u64().unwrap(),
        );
        assert_eq!(a % 1000, 0, "{ticks:?}");
        assert!(b > a, "{ticks:?}");
    }
    for t in &ticks {
        assert!(
            t["now_ms"].as_u64().unwrap() >= t["scheduled_ms"].as_u64().unwrap(),
            "{t}"
        );
    }
    assert!(daemon.terminate().success());

    // Down for "two hours": the last run was before the latest due time of
    // an hourly schedule, which runs once at start-up.
    let db = dir.path().join("data").join("edgefn.db");
    let conn = rusqlite::Connection::open(&db).unwrap();
    let last: i64 = conn
        .query_row(
            "SELECT last_ms FROM schedule_runs WHERE function = 'tick'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    conn.execute("UPDATE schedule_runs SET last_ms = last_ms - 7200000", [])
        .unwrap();
    drop(conn);
    let before = upstream.seen.lock().unwrap().len();
    config(dir.path(), port, cloud.port, functions("every 1h"), |_| {});
    let mut daemon = Daemon::start(&cfg);
    let seen = upstream
        .wait_until("the missed run", |s| {
            runs(&s[before..], "site/pi-01/tick").len() == 1
        })
        .await;
    let made_up = &runs(&seen[before..], "site/pi-01/tick")[0];
    let due = made_up["scheduled_ms"].as_u64().unwrap();
    assert_eq!(due % 3_600_000, 0, "{made_up}");
    assert!(due > last as u64 - 7_200_000, "{made_up}");
    daemon
        .wait_for_log("a scheduled run was missed while edgefn was down")
        .await;
    assert!(daemon.terminate().success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_still_going_when_the_next_is_due_makes_that_one_skipped_not_queued() {
    let cloud = Mosquitto::cloud().await;
    let upstream = Upstream::subscribe(cloud.port, "site/pi-01/#").await;
    let dir = tempfile::tempdir().unwrap();
    let slow = module_file(dir.path(), "slow", SLOW);
    let metrics = free_port();
    let functions = vec![FunctionManifest {
        schedule: Some("every 1s".into()),
        timeout: Some("10s".into()),
        ..runs_file("slow", &slow)
    }];
    let port = free_port();
    let cfg = config(dir.path(), port, cloud.port, functions, |c| {
        c.metrics_on(metrics);
    });
    let mut daemon = Daemon::start(&cfg);
    let seen = upstream
        .wait_until("three slow runs", |s| runs(s, "site/pi-01/slow").len() >= 3)
        .await;
    // Each run takes 1.5 s, so the run due 1 s after it is skipped: the
    // runs that happen are at least 2 s apart, none queued behind another.
    let done = runs(&seen, "site/pi-01/slow");
    for pair in done.windows(2) {
        let gap =
            pair[1]["scheduled_ms"].as_u64().unwrap() - pair[0]["scheduled_ms"].as_u64().unwrap();
        assert!(gap >= 2000, "{done:?}");
    }
    let skipped = function_report(&report(metrics), "slow")["schedule_skipped"]
        .as_u64()
        .unwrap();
    assert!(skipped >= 2, "{skipped} skipped");
    assert!(daemon.terminate().success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn permissions_refuse_exactly_the_topics_outside_the_allow_lists() {
    let cloud = Mosquitto::cloud().await;
    let upstream = Upstream::subscribe(cloud.port, "site/pi-01/#").await;
    let dir = tempfile::tempdir().unwrap();
    let m = module_file(dir.path(), "permissions", PERMISSIONS);
    let metrics = free_port();
    let functions = vec![
        FunctionManifest {
            triggers: vec!["narrow/go".into()],
            emit_allow: Some(vec!["allowed/#".into(), "result".into()]),
            ..runs_file("narrow", &m)
        },
        FunctionManifest {
            triggers: vec!["commander/go".into()],
            publish_allow: Some(vec!["cmd/+".into()]),
            ..runs_file("commander", &m)
        },
    ];
    let port = free_port();
    let cfg = config(dir.path(), port, cloud.port, functions, |c| {
        c.metrics_on(metrics);
    });
    let mut daemon = Daemon::start(&cfg);
    port_open(port).await;
    let commands = Upstream::subscribe(port, "cmd/#").await;
    let mut dev = Device::connect("device-p", port).await;
    assert!(dev.publish_acked("narrow/go", "n", PATIENCE).await);
    assert!(dev.publish_acked("commander/go", "c", PATIENCE).await);
    let seen = upstream
        .wait_until("both results", |s| {
            s.iter().filter(|m| m.topic == "site/pi-01/result").count() >= 2
        })
        .await;
    let got: Vec<(String, String)> = Upstream::distinct(&seen)
        .into_iter()
        .map(|s| (s.topic, s.payload))
        .collect();
    assert_eq!(
        got,
        [
            // narrow: emits only under allowed/# and result; publishes nothing.
            ("site/pi-01/allowed/x".to_owned(), "n".to_owned()),
            ("site/pi-01/result".to_owned(), "e=5 p=5".to_owned()),
            // commander: emits anywhere (no emit_allow), publishes to cmd/+.
            ("site/pi-01/allowed/x".to_owned(), "c".to_owned()),
            ("site/pi-01/secret/x".to_owned(), "c".to_owned()),
            ("site/pi-01/result".to_owned(), "e=0 p=0".to_owned()),
        ]
    );
    let published = commands.wait_for(1).await;
    assert_eq!(published[0].topic, "cmd/x");
    assert_eq!(published[0].payload, "c");
    // Counted, each by what was refused.
    let r = report(metrics);
    let counts = |name: &str| {
        let f = function_report(&r, name);
        (f["emit_denied"].as_u64(), f["publish_denied"].as_u64())
    };
    assert_eq!(counts("narrow"), (Some(1), Some(1)));
    assert_eq!(counts("commander"), (Some(0), Some(0)));
    assert!(daemon.terminate().success());
}

/// Runs `edgefn dead-letters ARGS --config CONFIG`: (success, stdout +
/// stderr).
fn dead_letters_cli(config: &std::path::Path, args: &[&str]) -> (bool, String) {
    let mut all = vec!["dead-letters"];
    all.extend(args);
    all.extend(["--config", config.to_str().unwrap()]);
    let out = edgefn(&all);
    (out.status.success(), text(&out))
}

/// The dead letters in `dir`'s database: (id, function, attempts, replay).
fn stored_dead_letters(dir: &std::path::Path) -> Vec<(i64, String, u32, bool)> {
    edgefn::store::Inspector::open(&dir.join("data"))
        .unwrap()
        .list(None)
        .unwrap()
        .into_iter()
        .map(|d| (d.id, d.letter.function, d.letter.attempts, d.replay))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_are_replayed_through_the_fixed_version_and_refused_for_a_removed_function() {
    let cloud = Mosquitto::cloud().await;
    let upstream = Upstream::subscribe(cloud.port, "site/pi-01/#").await;
    let dir = tempfile::tempdir().unwrap();
    let chaos = module("chaos");
    let fixed = module_file(dir.path(), "fixed", TICK);
    let broken = vec![
        FunctionManifest {
            triggers: vec!["jobs/#".into()],
            retries: Some(1),
            ..runs_file("worker", &chaos)
        },
        FunctionManifest {
            triggers: vec!["others/#".into()],
            ..runs_file("other", &chaos)
        },
    ];
    let port = free_port();
    let cfg = config(dir.path(), port, cloud.port, broken, |_| {});
    let mut daemon = Daemon::start(&cfg);
    port_open(port).await;
    let mut dev = Device::connect("device-d", port).await;
    for topic in ["jobs/1", "jobs/2", "others/1"] {
        assert!(dev.publish_acked(topic, "fail", PATIENCE).await);
    }
    let first = stored_dead_letters(dir.path());
    let ids: Vec<i64> = first.iter().map(|d| d.0).collect();
    assert_eq!(
        first,
        [
            (ids[0], "worker".into(), 2, false),
            (ids[1], "worker".into(), 2, false),
            (ids[2], "other".into(), 1, false),
        ]
    );
    let (ok, listed) = dead_letters_cli(&cfg, &["list"]);
    assert!(ok, "{listed}");
    assert!(
        listed.contains("worker") && listed.contains("jobs/2"),
        "{listed}"
    );
    let (ok, shown) = dead_letters_cli(&cfg, &["show", &ids[0].to_string()]);
    assert!(ok && shown.contains("payload   fail (4 bytes)"), "{shown}");

    // Replayed through the same broken version: it fails again and stays,
    // its attempts counted up.
    let (ok, said) = dead_letters_cli(&cfg, &["replay", &ids[0].to_string()]);
    assert!(ok, "{said}");
    eventually("the replay failed again", || {
        stored_dead_letters(dir.path())[0] == (ids[0], "worker".into(), 4, false)
    })
    .await;

    // The fixed version, "other" removed.
    assert!(daemon.terminate().success());
    let worker = FunctionManifest {
        triggers: vec!["jobs/#".into()],
        ..runs_file("worker", &fixed)
    };
    let metrics = free_port();
    config(dir.path(), port, cloud.port, vec![worker], |c| {
        c.metrics_on(metrics);
    });
    let mut daemon = Daemon::start(&cfg);
    port_open(port).await;
    let (ok, said) = dead_letters_cli(&cfg, &["replay", "--all"]);
    assert!(!ok, "{said}");
    assert!(
        said.contains(&format!("{} (other)", ids[2])) && said.contains("nothing was changed"),
        "{said}"
    );
    assert!(stored_dead_letters(dir.path()).iter().all(|d| !d.3));

    let (ok, said) = dead_letters_cli(&cfg, &["replay", "--function", "worker"]);
    assert!(
        ok && said.contains("2 dead letter(s) marked for replay"),
        "{said}"
    );
    let seen = upstream
        .wait_until("both jobs through the fixed version", |s| {
            s.iter().filter(|m| m.topic == "site/pi-01/tick").count() >= 2
        })
        .await;
    let done: Vec<&str> = seen
        .iter()
        .filter(|m| m.topic == "site/pi-01/tick")
        .map(|m| m.payload.as_str())
        .collect();
    assert_eq!(done, ["fail", "fail"]);
    eventually("the replayed dead letters deleted", || {
        stored_dead_letters(dir.path()).len() == 1
    })
    .await;
    let report = wait_for_counter(metrics, "replays_done", 2).await;
    let counters = &report["gateway"]["counters"];
    assert_eq!(
        (&counters["replays_done"], &counters["replays_refused"]),
        (&2.into(), &0.into())
    );

    // Marked behind the command's back (as if removed after marking): the
    // daemon refuses it, and it stays.
    let db = dir.path().join("data").join("edgefn.db");
    rusqlite::Connection::open(&db)
        .unwrap()
        .execute("UPDATE dead_letters SET replay = 1", [])
        .unwrap();
    wait_for_counter(metrics, "replays_refused", 1).await;
    assert!(
        daemon
            .log()
            .contains("cannot replay a dead letter: its function is not on this gateway"),
        "{}",
        daemon.log()
    );
    eventually("the refused replay unmarked", || {
        stored_dead_letters(dir.path()) == [(ids[2], "other".into(), 1, false)]
    })
    .await;

    let (ok, said) = dead_letters_cli(&cfg, &["purge", "--function", "other"]);
    assert!(ok && said.contains("1 dead letter(s) deleted"), "{said}");
    let (_, listed) = dead_letters_cli(&cfg, &["list"]);
    assert_eq!(listed, "no dead letters\n");
    assert!(daemon.terminate().success());
}

/// A clean-temperature bundle for `pi-01`, version `version`, with
/// de-duplication over an hour, `timeout` as given, signed by `key`.
fn clean_temperature_bundle(
    key: &ed25519_dalek::SigningKey,
    version: u64,
    timeout: &str,
) -> Vec<u8> {
    let manifest = edgefn::config::FunctionManifest {
        name: "clean-temperature".into(),
        triggers: vec!["sensors/+/temperature".into()],
        timeout: Some(timeout.into()),
        env: [
            ("UNIT".to_owned(), "F".to_owned()),
            ("DEDUP_WINDOW".to_owned(), "1h".to_owned()),
        ]
        .into(),
        ..Default::default()
    };
    let module = std::fs::read(module("clean_temperature")).unwrap();
    sealed(key, version, manifest, module)
}

/// The readings (`seq`s) seen upstream, first arrival of each record.
fn seqs(seen: &[Seen]) -> Vec<u64> {
    Upstream::distinct(seen)
        .iter()
        .filter(|s| s.topic.ends_with("/temperature"))
        .map(|s| s.reading().1)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn state_survives_a_sigkill_a_restart_and_an_upgrade() {
    let cloud = Mosquitto::cloud().await;
    let upstream = Upstream::subscribe(cloud.port, "site/pi-01/#").await;
    let statuses = Upstream::subscribe(cloud.port, "edgefn/pi-01/functions/+/status").await;
    let dir = tempfile::tempdir().unwrap();
    let key = ed25519_dalek::SigningKey::from_bytes(&[9; 32]);
    let port = free_port();
    let cfg = config(dir.path(), port, cloud.port, vec![], |c| {
        c.trusting(&[trusted(&key)]);
    });
    let deploy_topic = "edgefn/pi-01/functions/clean-temperature/deploy";
    publish_retained(
        cloud.port,
        deploy_topic,
        clean_temperature_bundle(&key, 1, "100ms"),
    )
    .await;
    let mut daemon = Daemon::start(&cfg);
    statuses
        .wait_until("v1 active", active("clean-temperature", 1))
        .await;
    port_open(port).await;

    // The same reading twice: the second is a duplicate, dropped.
    let mut dev = Device::connect("device-s", port).await;
    for (seq, temp) in [(1, 20.0), (1, 20.0), (2, 21.0)] {
        assert!(
            dev.publish_acked("sensors/d1/temperature", reading(seq, temp), PATIENCE)
                .await
        );
    }
    upstream
        .wait_until("readings 1 and 2", |s| seqs(s).contains(&2))
        .await;

    // Killed: the state of reading 2 was committed with it.
    daemon.kill();
    let mut daemon = Daemon::start(&cfg);
    port_open(port).await;
    let mut dev = Device::connect("device-s", port).await;
    for (seq, temp) in [(2, 21.0), (3, 22.0)] {
        assert!(
            dev.publish_acked("sensors/d1/temperature", reading(seq, temp), PATIENCE)
                .await
        );
    }
    upstream
        .wait_until("reading 3", |s| seqs(s).contains(&3))
        .await;

    // A new version: the state is the function's, not the version's.
    publish_retained(
        cloud.port,
        deploy_topic,
        clean_temperature_bundle(&key, 2, "200ms"),
    )
    .await;
    statuses
        .wait_until("v2 active", active("clean-temperature", 2))
        .await;
    for (seq, temp) in [(3, 22.0), (4, 23.0)] {
        assert!(
            dev.publish_acked("sensors/d1/temperature", reading(seq, temp), PATIENCE)
                .await
        );
    }
    let seen = upstream
        .wait_until("reading 4", |s| seqs(s).contains(&4))
        .await;
    assert_eq!(seqs(&seen), [1, 2, 3, 4]);
    assert!(daemon.terminate().success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aggregate_sums_up_each_devices_readings_on_its_schedule() {
    let cloud = Mosquitto::cloud().await;
    let upstream = Upstream::subscribe(cloud.port, "site/pi-01/summary/#").await;
    let dir = tempfile::tempdir().unwrap();
    let functions = vec![FunctionManifest {
        schedule: Some("every 1s".into()),
        emit_allow: Some(vec!["summary/#".into()]),
        ..function("aggregate", "aggregate", &["sensors/+/temperature"])
    }];
    let port = free_port();
    let cfg = config(dir.path(), port, cloud.port, functions, |_| {});
    let mut daemon = Daemon::start(&cfg);
    port_open(port).await;
    let mut dev = Device::connect("device-a", port).await;
    for (device, temp) in [("d1", 20.0), ("d2", -5.0), ("d1", 22.0), ("d1", 24.0)] {
        let topic = format!("sensors/{device}/temperature");
        assert!(dev.publish_acked(&topic, reading(0, temp), PATIENCE).await);
    }
    // Runs may close a window between readings: add up every summary.
    let totals = |s: &[Seen]| {
        let mut by_device = std::collections::BTreeMap::<String, (u64, f64, f64, f64)>::new();
        for m in Upstream::distinct(s) {
            let j = m.json();
            let e = by_device
                .entry(j["device"].as_str().unwrap().to_owned())
                .or_insert((0, f64::MAX, f64::MIN, 0.0));
            let n = j["count"].as_u64().unwrap();
            e.0 += n;
            e.1 = e.1.min(j["min"].as_f64().unwrap());
            e.2 = e.2.max(j["max"].as_f64().unwrap());
            e.3 += j["mean"].as_f64().unwrap() * n as f64;
        }
        by_device
    };
    let seen = upstream
        .wait_until("every reading summed up", |s| {
            let t = totals(s);
            t.get("d1").is_some_and(|d| d.0 == 3) && t.get("d2").is_some_and(|d| d.0 == 1)
        })
        .await;
    let t = totals(&seen);
    assert_eq!(t["d1"], (3, 20.0, 24.0, 66.0));
    assert_eq!(t["d2"], (1, -5.0, -5.0, -5.0));
    assert!(daemon.terminate().success());
}

/// On each message, by its first byte: `b` sets key `k` to 2,000 bytes,
/// `l` sets a 2,000-byte key, `o` asks `state_get` to write far outside
/// memory (a trap), `d` deletes 20,000 distinct 1,000-byte keys that do
/// not exist and then sets `k` to the payload, anything else sets `k` to
/// the payload; then emits the (last) call's code as one character (`0`
/// ok, `3` for −3, `6` for −6, `7` for −7) to `result`.
const HOG: &str = r#"(module
  (import "edgefn" "state_get" (func $get (param i32 i32 i32 i32) (result i32)))
  (import "edgefn" "state_set" (func $set (param i32 i32 i32 i32) (result i32)))
  (import "edgefn" "state_delete" (func $del (param i32 i32) (result i32)))
  (import "edgefn" "emit" (func $emit (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 0) "k")
  (data (i32.const 16) "result")
  (func (export "edgefn_abi_version") (result i32) i32.const 1)
  (func (export "edgefn_alloc") (param i32) (result i32) i32.const 8192)
  (func (export "edgefn_on_message") (param i32 i32 i32 i32) (result i32)
    (local $code i32) (local $first i32) (local $i i32)
    (local.set $first (i32.load8_u (local.get 2)))
    (if (i32.eq (local.get $first) (i32.const 100))
      (then
        (loop $more
          (i32.store (i32.const 4096) (local.get $i))
          (drop (call $del (i32.const 4096) (i32.const 1000)))
          (local.set $i (i32.add (local.get $i) (i32.const 1)))
          (br_if $more (i32.lt_u (local.get $i) (i32.const 20000))))
        (local.set $code (call $set (i32.const 0) (i32.const 1) (local.get 2) (local.get 3)))))
    (if (i32.eq (local.get $first) (i32.const 100)) (then)
    (else (if (i32.eq (local.get $first) (i32.const 98))
      (then (local.set $code (call $set (i32.const 0) (i32.const 1) (i32.const 4096) (i32.const 2000))))
    (else (if (i32.eq (local.get $first) (i32.const 108))
      (then (local.set $code (call $set (i32.const 4096) (i32.const 2000) (i32.const 0) (i32.const 1))))
    (else (if (i32.eq (local.get $first) (i32.const 111))
      (then (local.set $code (call $get (i32.const 0) (i32.const 1) (i32.const 1000000) (i32.const 16))))
    (else
      (local.set $code (call $set (i32.const 0) (i32.const 1) (local.get 2) (local.get 3)))))))))))
    (i32.store8 (i32.const 32) (i32.sub (i32.const 48) (local.get $code)))
    (drop (call $emit (i32.const 16) (i32.const 6) (i32.const 32) (i32.const 1)))
    i32.const 0))"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_state_calls_fail_only_themselves_each_with_its_code_and_counter() {
    let cloud = Mosquitto::cloud().await;
    let upstream = Upstream::subscribe(cloud.port, "site/pi-01/#").await;
    let dir = tempfile::tempdir().unwrap();
    let hog = module_file(dir.path(), "hog", HOG);
    let metrics = free_port();
    let functions = vec![
        FunctionManifest {
            triggers: vec!["hog/#".into()],
            state_limit: Some("1KiB".into()),
            timeout: Some("10s".into()),
            ..runs_file("hog", &hog)
        },
        function(
            "clean-temperature",
            "clean_temperature",
            &["sensors/+/temperature"],
        ),
    ];
    let port = free_port();
    let cfg = config(dir.path(), port, cloud.port, functions, |c| {
        c.metrics_on(metrics);
    });
    let mut daemon = Daemon::start(&cfg);
    port_open(port).await;
    let mut dev = Device::connect("device-h", port).await;
    for (topic, payload) in [
        ("hog/1", "big value"),
        ("hog/2", "long key"),
        ("hog/3", "out of bounds"),
        ("sensors/d1/temperature", reading(1, 20.0).as_str()),
        ("hog/4", "small"),
        ("hog/5", "deletes of keys that do not exist"),
    ] {
        assert!(dev.publish_acked(topic, payload, PATIENCE).await);
    }
    let seen = upstream
        .wait_until("the last result", |s| {
            s.iter().filter(|m| m.topic == "site/pi-01/result").count() >= 4
        })
        .await;
    let results: Vec<String> = Upstream::distinct(&seen)
        .into_iter()
        .filter(|m| m.topic == "site/pi-01/result")
        .map(|m| m.payload)
        .collect();
    // Over the limit (−6), a key too long (−7), then a write that fits; the
    // out-of-bounds call trapped its invocation only, and the reading went
    // through. Deleting keys that do not exist holds nothing, and after
    // 10,000 writes in one invocation every further one is refused (−3).
    assert_eq!(results, ["6", "7", "0", "3"]);
    assert!(seen.iter().any(|m| m.topic.ends_with("/temperature")));
    let r = report(metrics);
    let f = function_report(&r, "hog");
    assert_eq!(f["state_refused"], 1 + 10_001);
    assert_eq!(f["errors"]["trap"], 1);
    assert_eq!(f["dead_letters"], 1);
    assert_eq!(f["state_bytes"], 1 + "small".len());
    let dead = edgefn::store::dead_letters(&dir.path().join("data")).unwrap();
    assert_eq!(dead.len(), 1);
    assert_eq!(
        (dead[0].kind, dead[0].payload.as_slice()),
        ("trap", &b"out of bounds"[..])
    );
    assert!(dead[0].error.contains("out-of-bounds"), "{}", dead[0].error);
    assert!(daemon.terminate().success());
}

/// A bundle deploying `module` as `worker` on `jobs/#` to `pi-01`.
fn worker_bundle(key: &ed25519_dalek::SigningKey, version: u64, module: Vec<u8>) -> Vec<u8> {
    let manifest = edgefn::config::FunctionManifest {
        name: "worker".into(),
        triggers: vec!["jobs/#".into()],
        ..Default::default()
    };
    sealed(key, version, manifest, module)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_letter_replayed_after_a_fixed_version_is_deployed_runs_through_that_version() {
    let cloud = Mosquitto::cloud().await;
    let upstream = Upstream::subscribe(cloud.port, "site/pi-01/#").await;
    let statuses = Upstream::subscribe(cloud.port, "edgefn/pi-01/functions/+/status").await;
    let dir = tempfile::tempdir().unwrap();
    let key = ed25519_dalek::SigningKey::from_bytes(&[5; 32]);
    let port = free_port();
    let cfg = config(dir.path(), port, cloud.port, vec![], |c| {
        c.trusting(&[trusted(&key)]);
    });
    let topic = "edgefn/pi-01/functions/worker/deploy";
    let chaos = std::fs::read(module("chaos")).unwrap();
    publish_retained(cloud.port, topic, worker_bundle(&key, 1, chaos)).await;
    let mut daemon = Daemon::start(&cfg);
    statuses.wait_until("v1 active", active("worker", 1)).await;
    port_open(port).await;
    let mut dev = Device::connect("device-w", port).await;
    assert!(dev.publish_acked("jobs/7", "fail", PATIENCE).await);
    let (ok, listed) = dead_letters_cli(&cfg, &["list"]);
    assert!(
        ok && listed.contains("worker") && listed.contains(" v1 "),
        "{listed}"
    );

    let fixed = wat::parse_str(TICK).unwrap();
    publish_retained(cloud.port, topic, worker_bundle(&key, 2, fixed)).await;
    statuses.wait_until("v2 active", active("worker", 2)).await;
    let (ok, said) = dead_letters_cli(&cfg, &["replay", "--all"]);
    assert!(ok, "{said}");
    let seen = upstream
        .wait_until("the job through v2", |s| {
            s.iter().any(|m| m.topic == "site/pi-01/tick")
        })
        .await;
    let done: Vec<&Seen> = seen
        .iter()
        .filter(|m| m.topic == "site/pi-01/tick")
        .collect();
    assert_eq!(done.len(), 1);
    assert_eq!(done[0].payload, "fail");
    eventually("the dead letter deleted", || {
        stored_dead_letters(dir.path()).is_empty()
    })
    .await;
    assert!(daemon.terminate().success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn escapes_in_topics_and_guest_text_never_reach_the_operators_terminal() {
    let cloud = Mosquitto::cloud().await;
    let dir = tempfile::tempdir().unwrap();
    let functions = vec![function("chaos", "chaos", &["chaos/#"])];
    let port = free_port();
    let cfg = config(dir.path(), port, cloud.port, functions, |_| {});
    let mut daemon = Daemon::start(&cfg);
    port_open(port).await;
    // A device's topic that retitles the terminal, clears the screen and
    // forges a line; the function traps on it (a dead letter).
    let hostile = "chaos/\u{1b}]0;owned\u{7}\u{1b}[2J\nINFO forged";
    let mut dev = Device::connect("device-e", port).await;
    assert!(dev.publish_acked(hostile, "trap", PATIENCE).await);
    eventually("the dead letter", || {
        stored_dead_letters(dir.path()).len() == 1
    })
    .await;
    assert!(daemon.terminate().success());
    let id = stored_dead_letters(dir.path())[0].0.to_string();
    let (ok, list) = dead_letters_cli(&cfg, &["list"]);
    let (ok2, show) = dead_letters_cli(&cfg, &["show", &id]);
    assert!(ok && ok2, "{list}{show}");
    // Invoked locally, the function echoes the topic into what it emits.
    let chaos = module("chaos");
    let invoke = edgefn(&[
        "invoke",
        chaos.to_str().unwrap(),
        "--topic",
        hostile,
        "--payload",
        "\u{1b}[31mred",
    ]);
    let invoked = String::from_utf8_lossy(&invoke.stdout).into_owned();
    assert!(invoke.status.success(), "{invoked}");
    for (what, text) in [
        ("list", &list),
        ("show", &show),
        ("invoke", &invoked),
        ("the daemon's log", &daemon.log()),
    ] {
        assert!(
            !text.contains('\u{1b}'),
            "{what} printed an escape: {text:?}"
        );
        assert!(!text.contains('\u{7}'), "{what} printed a bell: {text:?}");
        assert!(
            !text.contains("\nINFO forged"),
            "{what} printed a forged line: {text:?}"
        );
    }
    assert!(show.contains("chaos/\\x1b]0;owned\\x07"), "{show}");
    assert!(invoked.contains("echo/chaos/\\x1b]0;owned"), "{invoked}");
}
