//! Bundles applied to a running gateway (embedded broker, a real cloud
//! Mosquitto): every bad bundle refused with its reason while readings keep
//! flowing, upgrades, removals, and deployed functions restored after a
//! restart with the upstream away.

use ed25519_dalek::SigningKey;
use edgefn::bundle::{Body, Change, Targets, seal};
use edgefn::config::{Config, FunctionManifest};
use edgefn::deploy::Applied;
use edgefn::gateway::Gateway;
use testkit::*;

fn manifest(env: &str) -> FunctionManifest {
    FunctionManifest {
        name: "chaos".into(),
        triggers: vec!["chaos/#".into()],
        timeout: Some("100ms".into()),
        env: [("GREETING".to_owned(), env.to_owned())].into(),
        ..Default::default()
    }
}

/// A module that passes the ABI checks and runs `init` as `edgefn_init`.
fn with_init(init: &str) -> Vec<u8> {
    wat::parse_str(format!(
        r#"(module (memory (export "memory") 1)
          (func (export "edgefn_abi_version") (result i32) i32.const 1)
          (func (export "edgefn_alloc") (param i32) (result i32) i32.const 1024)
          (func (export "edgefn_init") (result i32) {init})
          (func (export "edgefn_on_message") (param i32 i32 i32 i32) (result i32) i32.const 0))"#
    ))
    .unwrap()
}

/// The standard config with the embedded broker on `port`, without the
/// chaos function, and a `[deploy]` section trusting `key`, then `more`.
fn deploy_config(
    dir: &std::path::Path,
    port: u16,
    cloud_port: u16,
    key: &SigningKey,
    more: impl FnOnce(&mut ConfigFile),
) -> std::path::PathBuf {
    let mut file = standard(dir, Local::Embedded(port), cloud_port);
    file.without_function("chaos").trusting(&[trusted(key)]);
    more(&mut file);
    write_config(dir, &file)
}

/// Reading `seq` is PUBACKed and (with the upstream up) arrives.
async fn flows(dev: &mut Device, upstream: Option<&Upstream>, seq: u64) {
    assert!(
        dev.publish_acked("sensors/d1/temperature", reading(seq, 20.0), PATIENCE)
            .await,
        "reading {seq} was not acknowledged"
    );
    if let Some(up) = upstream {
        up.wait_until(&format!("reading {seq}"), |s| {
            s.iter()
                .any(|m| m.topic.ends_with("telemetry/d1/temperature") && m.reading().1 == seq)
        })
        .await;
    }
}

/// What the running chaos echoes for `env`: its GREETING.
async fn greeting(dev: &mut Device, upstream: &Upstream, expect: &str) {
    assert!(dev.publish_acked("chaos/g", "env", PATIENCE).await);
    upstream
        .wait_until(&format!("greeting {expect}"), |s| {
            s.iter()
                .any(|m| m.topic == "site/pi-01/chaos/env" && m.payload == expect)
        })
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bundles_are_verified_before_anything_changes_and_deployed_functions_survive_restarts() {
    let mut cloud = Mosquitto::cloud().await;
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let key = SigningKey::from_bytes(&[7; 32]);
    let path = deploy_config(dir.path(), port, cloud.port, &key, |c| {
        c.deploy.as_mut().unwrap().max_bundle_size = Some("1MiB".into())
    });
    let config = Config::load(&path).unwrap();
    let chaos = std::fs::read(module("chaos")).unwrap();
    let upstream = Upstream::subscribe(cloud.port, "site/#").await;
    let gateway = Gateway::start(config.clone()).await.unwrap();
    let mut dev = Device::connect("sensor-d1", port).await;
    flows(&mut dev, Some(&upstream), 0).await;

    let v1 = seal(deploy_body(manifest("v1"), chaos.clone(), 1), Some(&key));
    let applied = gateway.apply_bundle(&v1).await;
    assert!(
        matches!(&applied, Ok(Applied::Deployed { name, version: 1, sha256 }) if name == "chaos" && sha256.len() == 64),
        "{applied:?}"
    );
    // The same bundle again (a retained message after a reconnect) is no
    // change.
    assert_eq!(
        gateway.apply_bundle(&v1).await,
        Ok(Applied::Unchanged {
            name: "chaos".into(),
            version: 1
        })
    );
    greeting(&mut dev, &upstream, "v1").await;

    let v2 = |m: FunctionManifest, module: Vec<u8>| seal(deploy_body(m, module, 2), Some(&key));
    let good = v2(manifest("v2"), chaos.clone());
    let mut tampered = good.clone();
    let middle = tampered.len() / 2;
    tampered[middle] ^= 1;
    let mut elsewhere = deploy_body(manifest("v2"), chaos.clone(), 2);
    elsewhere.targets = Targets {
        gateways: vec!["pi-02".into()],
        groups: vec!["site-b".into()],
    };
    let named_like_config = FunctionManifest {
        name: "clean-temperature".into(),
        ..manifest("v2")
    };
    let bad_timeout = FunctionManifest {
        timeout: Some("soon".into()),
        ..manifest("v2")
    };
    let cases: Vec<(&str, Vec<u8>)> = vec![
        (
            "unsigned",
            seal(deploy_body(manifest("v2"), chaos.clone(), 2), None),
        ),
        (
            "untrusted_key",
            seal(
                deploy_body(manifest("v2"), chaos.clone(), 2),
                Some(&SigningKey::from_bytes(&[8; 32])),
            ),
        ),
        ("bad_signature", tampered),
        ("not_targeted", seal(elsewhere, Some(&key))),
        ("malformed", b"garbage".to_vec()),
        ("malformed", good[..good.len() / 2].to_vec()),
        ("malformed", Vec::new()),
        ("too_large", v2(manifest("v2"), vec![0; 2 << 20])),
        ("defined_in_config", v2(named_like_config, chaos.clone())),
        ("invalid_manifest", v2(bad_timeout, chaos.clone())),
        ("invalid_module", v2(manifest("v2"), b"not wasm".to_vec())),
        ("init_failed", v2(manifest("v2"), with_init("i32.const 1"))),
        (
            "init_failed",
            v2(manifest("v2"), with_init("(loop (br 0)) i32.const 0")),
        ),
    ];
    for (seq, (code, bundle)) in (1..).zip(cases) {
        let refused = gateway.apply_bundle(&bundle).await.unwrap_err();
        assert_eq!(refused.code, code, "{refused}");
        // What ran before still runs, and readings flow.
        let running = gateway.registry().table();
        assert_eq!(running.get("chaos").map(|f| f.version()), Some(1));
        flows(&mut dev, Some(&upstream), seq).await;
    }
    greeting(&mut dev, &upstream, "v1").await;

    // An upgrade, then a restart with the upstream away: v3 runs again from
    // the gateway's own database.
    let v3 = seal(deploy_body(manifest("v3"), chaos.clone(), 3), Some(&key));
    assert!(gateway.apply_bundle(&v3).await.is_ok());
    greeting(&mut dev, &upstream, "v3").await;
    drop(dev);
    gateway.shutdown().await;
    cloud.stop();
    let gateway = Gateway::start(config.clone()).await.unwrap();
    let running = gateway.registry().table();
    assert_eq!(running.get("chaos").map(|f| f.version()), Some(3));
    // Without compiling: both modules come from their precompiled artifacts.
    let precompiled = |gateway: &Gateway, name: &str| {
        let table = gateway.registry().table();
        table.get(name).unwrap().pool().function().precompiled()
    };
    assert!(precompiled(&gateway, "chaos"));
    assert!(precompiled(&gateway, "clean-temperature"));
    let mut dev = Device::connect("sensor-d1", port).await;
    assert!(dev.publish_acked("chaos/g", "env", PATIENCE).await);
    flows(&mut dev, None, 100).await;
    assert_eq!(
        gateway.apply_bundle(&v1).await.unwrap_err().code,
        "not_newer"
    );

    // Removed by a signed tombstone, for good: across a restart, and an
    // older deploy replayed after it changes nothing.
    let mut tombstone = deploy_body(manifest("v4"), vec![], 4);
    tombstone.change = Change::Remove {
        name: "chaos".into(),
    };
    assert_eq!(
        gateway
            .apply_bundle(&seal(tombstone.clone(), None))
            .await
            .unwrap_err()
            .code,
        "unsigned"
    );
    assert!(
        gateway
            .apply_bundle(&seal(tombstone, Some(&key)))
            .await
            .is_ok()
    );
    assert!(gateway.registry().table().get("chaos").is_none());
    drop(dev);
    gateway.shutdown().await;
    // Damaged artifacts (a torn write, a rotten card) are compiled again;
    // the removed function's is deleted.
    let artifacts = || -> Vec<std::path::PathBuf> {
        std::fs::read_dir(dir.path().join("data/artifacts"))
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect()
    };
    assert_eq!(artifacts().len(), 2, "{:?}", artifacts());
    for a in artifacts() {
        let mut bytes = std::fs::read(&a).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 0xff;
        std::fs::write(&a, bytes).unwrap();
    }
    let gateway = Gateway::start(config).await.unwrap();
    assert!(gateway.registry().table().get("chaos").is_none());
    assert!(!precompiled(&gateway, "clean-temperature"));
    assert_eq!(artifacts().len(), 1, "{:?}", artifacts());
    let mut dev = Device::connect("sensor-d1", port).await;
    flows(&mut dev, None, 200).await;
    drop(dev);
    assert_eq!(
        gateway.apply_bundle(&v3).await.unwrap_err().code,
        "not_newer"
    );
    let v5 = seal(deploy_body(manifest("v5"), chaos, 5), Some(&key));
    assert!(gateway.apply_bundle(&v5).await.is_ok());
    gateway.shutdown().await;
}

/// Waits until the last status on `topic` says `version` is active.
async fn wait_active(control: &Upstream, topic: &str, version: u64) {
    control
        .wait_until(&format!("v{version} active on {topic}"), |s| {
            last_status(s, topic).is_some_and(|j| j["state"] == "active" && j["version"] == version)
        })
        .await;
}

#[cfg(feature = "embedded-broker")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bundles_on_the_control_topics_are_applied_and_every_outcome_is_on_the_status_topics() {
    let cloud = Mosquitto::cloud().await;
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let key = SigningKey::from_bytes(&[7; 32]);
    let path = deploy_config(dir.path(), port, cloud.port, &key, |c| {
        c.deploy.as_mut().unwrap().groups = vec!["site-a".into()];
    });
    let chaos = std::fs::read(module("chaos")).unwrap();
    let gateway_topic = "edgefn/pi-01/functions/chaos/deploy";
    let group_topic = "edgefn/groups/site-a/functions/chaos/deploy";
    let status = "edgefn/pi-01/functions/chaos/status";
    let control = Upstream::subscribe(cloud.port, "edgefn/pi-01/#").await;
    let data = Upstream::subscribe(cloud.port, "site/#").await;
    let active = |version: u64| wait_active(&control, status, version);
    let refused = |code: &'static str| {
        let control = &control;
        async move {
            let seen = control
                .wait_until(&format!("a refusal {code}"), |s| {
                    last_status(s, status).is_some_and(|j| j["refused"]["code"] == code)
                })
                .await;
            last_status(&seen, status).unwrap()
        }
    };

    // Deployed while the gateway is away: it catches up when it connects.
    let v1 = seal(deploy_body(manifest("v1"), chaos.clone(), 1), Some(&key));
    publish_retained(cloud.port, gateway_topic, v1).await;
    let mut daemon = Daemon::start(&path);
    active(1).await;
    control
        .wait_until("the gateway online, running chaos", |s| {
            last_status(s, "edgefn/pi-01/status").is_some_and(|j| {
                j["online"] == true
                    && j["functions"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .any(|f| f["name"] == "chaos" && f["version"] == 1)
            })
        })
        .await;
    let mut dev = Device::connect("sensor-d1", port).await;
    greeting(&mut dev, &data, "v1").await;

    // Refused, each with its reason on the status topic; v1 goes on.
    let mut tampered = seal(deploy_body(manifest("v2"), chaos.clone(), 2), Some(&key));
    let middle = tampered.len() / 2;
    tampered[middle] ^= 1;
    publish_retained(cloud.port, group_topic, tampered).await;
    let s = refused("bad_signature").await;
    assert_eq!(
        (s["state"].clone(), s["version"].clone()),
        ("active".into(), 1.into())
    );
    flows(&mut dev, Some(&data), 1).await;
    let other = FunctionManifest {
        name: "other".into(),
        ..manifest("v2")
    };
    publish_retained(
        cloud.port,
        gateway_topic,
        seal(deploy_body(other, chaos.clone(), 2), Some(&key)),
    )
    .await;
    refused("wrong_topic").await;
    // An empty retained message removes nothing.
    publish_retained(cloud.port, gateway_topic, Vec::new()).await;
    daemon
        .wait_for_log("an empty message on a deploy topic changes nothing")
        .await;
    flows(&mut dev, Some(&data), 2).await;

    // An upgrade through the group's topic.
    let v2 = seal(deploy_body(manifest("v2"), chaos.clone(), 2), Some(&key));
    publish_retained(cloud.port, group_topic, v2).await;
    active(2).await;
    greeting(&mut dev, &data, "v2").await;

    // A version whose instances stop starting is rolled back on its own,
    // and the status topic says so.
    let (at, broken) = breaking_soon();
    let v3 = seal(deploy_body(manifest("v3"), broken, 3), Some(&key));
    publish_retained(cloud.port, gateway_topic, v3).await;
    active(3).await;
    clock_past(at).await;
    traps(&mut dev, 4).await;
    let seen = control
        .wait_until("the rollback to v2", |s| {
            last_status(s, status).is_some_and(|j| j["state"] == "rolled_back" && j["version"] == 2)
        })
        .await;
    let s = last_status(&seen, status).unwrap();
    assert_eq!(s["rolled_back"]["from"], 3, "{s}");
    assert!(
        s["rolled_back"]["reason"]
            .as_str()
            .unwrap()
            .contains("instance starts failed"),
        "{s}"
    );
    greeting(&mut dev, &data, "v2").await;

    // Killed: the broker publishes the last will.
    daemon.kill();
    control
        .wait_until("the gateway offline", |s| {
            last_status(s, "edgefn/pi-01/status").is_some_and(|j| j["online"] == false)
        })
        .await;
    // Back: v2 runs from the database; the retained v3 (rolled back) and
    // v2 change nothing.
    let mut daemon = Daemon::start(&path);
    control
        .wait_until("the gateway online again", |s| {
            last_status(s, "edgefn/pi-01/status").is_some_and(|j| j["online"] == true)
        })
        .await;
    let mut dev = Device::connect("sensor-d1", port).await;
    assert!(dev.publish_acked("chaos/g", "env", PATIENCE).await);
    // v2 greeted before v3 and after its rollback; this is the third.
    data.wait_until("three v2 greetings", |s| {
        s.iter()
            .filter(|m| m.topic == "site/pi-01/chaos/env" && m.payload == "v2")
            .count()
            >= 3
    })
    .await;
    assert!(daemon.terminate().success());
    control
        .wait_until("the gateway offline after a clean stop", |s| {
            last_status(s, "edgefn/pi-01/status").is_some_and(|j| j["online"] == false)
        })
        .await;

    // While it is away: v4 on the gateway topic, whose health check takes
    // two seconds, and v5 on the group topic. Back, it receives v4 first;
    // v5 arrives while v4 is being applied, and v4 gives up for it instead
    // of running first.
    let slow = FunctionManifest {
        timeout: Some("10s".into()),
        ..manifest("v4")
    };
    publish_retained(
        cloud.port,
        gateway_topic,
        seal(deploy_body(slow, slow_init_module(2_000), 4), Some(&key)),
    )
    .await;
    let v5 = seal(deploy_body(manifest("v5"), chaos.clone(), 5), Some(&key));
    publish_retained(cloud.port, group_topic, v5).await;
    let mut daemon = Daemon::start(&path);
    active(5).await;
    let seen = control.seen.lock().unwrap().clone();
    let statuses: Vec<serde_json::Value> = seen
        .iter()
        .filter(|m| m.topic == status)
        .map(Seen::json)
        .collect();
    assert!(
        !statuses
            .iter()
            .any(|j| j["state"] == "active" && j["version"] == 4),
        "v4 never ran: {statuses:?}"
    );
    let s = statuses.last().unwrap();
    assert_eq!(
        (
            s["refused"]["version"].clone(),
            s["refused"]["code"].clone()
        ),
        (4.into(), "superseded".into()),
        "{s}"
    );
    let mut dev = Device::connect("sensor-d1", port).await;
    greeting(&mut dev, &data, "v5").await;
    assert!(daemon.terminate().success());
}

/// A module whose `edgefn_init` sleeps `ms` in WASI's `poll_oneoff`, then
/// succeeds.
fn slow_init_module(ms: i64) -> Vec<u8> {
    wat::parse_str(format!(
        r#"(module
          (import "wasi_snapshot_preview1" "poll_oneoff" (func $poll (param i32 i32 i32 i32) (result i32)))
          (memory (export "memory") 1)
          (func (export "edgefn_abi_version") (result i32) i32.const 1)
          (func (export "edgefn_alloc") (param i32) (result i32) i32.const 1024)
          (func (export "edgefn_init") (result i32)
            (i32.store8 (i32.const 2056) (i32.const 0))
            (i32.store (i32.const 2064) (i32.const 1))
            (i64.store (i32.const 2072) (i64.const {ns}))
            (drop (call $poll (i32.const 2048) (i32.const 2304) (i32.const 1) (i32.const 2400)))
            i32.const 0)
          (func (export "edgefn_on_message") (param i32 i32 i32 i32) (result i32) i32.const 0))"#,
        ns = ms * 1_000_000
    ))
    .unwrap()
}

#[cfg(feature = "embedded-broker")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn edgefn_deploy_publishes_to_a_group_and_waits_for_each_gateways_report() {
    let cloud = Mosquitto::cloud().await;
    let dir = tempfile::tempdir().unwrap();
    let key_file = dir.path().join("fleet.key");
    let out = edgefn(&["keygen", "--out", key_file.to_str().unwrap()]);
    let public = String::from_utf8(out.stdout).unwrap();
    let key =
        edgefn::keys::parse_private_key(&std::fs::read_to_string(&key_file).unwrap()).unwrap();
    assert_eq!(
        edgefn::keys::public_key_text(&key.verifying_key()),
        public.trim()
    );
    // Two gateways of group site-a.
    let statuses = Upstream::subscribe(cloud.port, "edgefn/+/status").await;
    let mut daemons = Vec::new();
    for id in ["pi-01", "pi-02"] {
        let gw = dir.path().join(id);
        std::fs::create_dir(&gw).unwrap();
        let path = deploy_config(&gw, free_port(), cloud.port, &key, |c| {
            c.gateway.id = id.into();
            c.upstream_mut().topic_prefix = Some(format!("site/{id}/"));
            c.deploy.as_mut().unwrap().groups = vec!["site-a".into()];
        });
        daemons.push(Daemon::start(&path));
    }
    statuses
        .wait_until("both gateways online", |s| {
            ["pi-01", "pi-02"].iter().all(|g| {
                last_status(s, &format!("edgefn/{g}/status")).is_some_and(|j| j["online"] == true)
            })
        })
        .await;

    let broker = format!("mqtt://127.0.0.1:{}", cloud.port);
    let chaos = module("chaos");
    let deploy = |version: &str, target: &[&str]| {
        let mut args = vec![
            "deploy",
            chaos.to_str().unwrap(),
            "--name",
            "chaos",
            "--trigger",
            "chaos/#",
            "--version",
            version,
            "--signing-key",
            key_file.to_str().unwrap(),
            "--broker",
            &broker,
            "--wait",
            "20s",
        ];
        args.extend(target);
        let out = edgefn(&args);
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.success(), text)
    };
    let (ok, text) = deploy("5", &["--group", "site-a"]);
    assert!(ok, "{text}");
    for g in ["pi-01", "pi-02"] {
        assert!(text.contains(&format!("{g}  chaos v5  active")), "{text}");
    }
    // Lower than what runs: each gateway refuses it, and says why.
    let (ok, text) = deploy("4", &["--gateway", "pi-01"]);
    assert!(!ok, "{text}");
    assert!(
        text.contains("pi-01  chaos v4  refused: not_newer"),
        "{text}"
    );
    // A gateway that never connected is pending; the others still answer.
    let (ok, text) = deploy("6", &["--gateway", "pi-09", "--gateway", "pi-02"]);
    assert!(ok, "{text}");
    assert!(
        text.contains("pi-09  chaos v6  pending (offline)"),
        "{text}"
    );
    assert!(text.contains("pi-02  chaos v6  active"), "{text}");

    // What runs where, from the retained status topics.
    let out = edgefn(&["status", "--broker", &broker, "--group", "site-a"]);
    let table = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{table}");
    let line = |g: &str| {
        table
            .lines()
            .find(|l| l.starts_with(&format!("{g} ")))
            .unwrap_or_else(|| panic!("no {g} in {table}"))
            .to_owned()
    };
    assert!(line("pi-01").contains("  yes  "), "{table}");
    assert!(line("pi-01").contains("chaos v5 active"), "{table}");
    assert!(
        line("pi-01").contains("chaos: last refused not_newer"),
        "{table}"
    );
    assert!(line("pi-02").contains("chaos v6 active"), "{table}");
    let out = edgefn(&["status", "--broker", &broker, "--gateway", "pi-02"]);
    let only = String::from_utf8_lossy(&out.stdout).into_owned();
    assert_eq!(only.lines().count(), 2, "{only}");
    for mut d in daemons {
        assert!(d.terminate().success());
    }
}

/// A fix: refuses (returns 1 for) every payload that starts with `X`, and
/// emits every other payload to `fixed`.
fn fix_module() -> Vec<u8> {
    wat::parse_str(
        r#"(module
          (import "edgefn" "emit" (func $emit (param i32 i32 i32 i32) (result i32)))
          (memory (export "memory") 1)
          (data (i32.const 16) "fixed")
          (func (export "edgefn_abi_version") (result i32) i32.const 1)
          (func (export "edgefn_alloc") (param i32) (result i32) i32.const 1024)
          (func (export "edgefn_on_message") (param i32 i32 i32 i32) (result i32)
            (if (i32.and (i32.gt_u (local.get 3) (i32.const 0))
                         (i32.eq (i32.load8_u (local.get 2)) (i32.const 88)))
              (then (return (i32.const 1))))
            (drop (call $emit (i32.const 16) (i32.const 5) (local.get 2) (local.get 3)))
            i32.const 0))"#,
    )
    .unwrap()
}

/// A module whose instances start until the wall clock passes `at`, and
/// fail to start (`edgefn_init` returns 1) from then on; a payload
/// starting with `t` traps (so the next message needs a fresh instance).
fn breaks_at(at: std::time::SystemTime) -> Vec<u8> {
    let ns = at.duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as i64;
    wat::parse_str(format!(
        r#"(module
          (import "wasi_snapshot_preview1" "clock_time_get"
            (func $clock (param i32 i64 i32) (result i32)))
          (memory (export "memory") 1)
          (func (export "edgefn_abi_version") (result i32) i32.const 1)
          (func (export "edgefn_alloc") (param i32) (result i32) i32.const 1024)
          (func (export "edgefn_init") (result i32)
            (drop (call $clock (i32.const 0) (i64.const 1) (i32.const 512)))
            (i64.gt_s (i64.load (i32.const 512)) (i64.const {ns})))
          (func (export "edgefn_on_message") (param i32 i32 i32 i32) (result i32)
            (if (i32.eq (i32.load8_u (local.get 2)) (i32.const 116)) (then unreachable))
            i32.const 0))"#
    ))
    .unwrap()
}

/// A version that starts now and breaks in two seconds (a debug build
/// checks and starts a small module in well under that).
fn breaking_soon() -> (std::time::SystemTime, Vec<u8>) {
    let at = std::time::SystemTime::now() + std::time::Duration::from_secs(2);
    (at, breaks_at(at))
}

/// Waits until the wall clock is past `at`: the condition the module under
/// test reads, not a stand-in for an event.
async fn clock_past(at: std::time::SystemTime) {
    if let Ok(left) = at.duration_since(std::time::SystemTime::now()) {
        tokio::time::sleep(left + std::time::Duration::from_millis(50)).await;
    }
}

/// Publishes `n` payloads `t…` (each traps, so each next message needs a
/// fresh instance); each is acknowledged (a dead letter).
async fn traps(dev: &mut Device, n: usize) {
    for i in 0..n {
        assert!(
            dev.publish_acked("chaos/t", format!("trap {i}"), PATIENCE)
                .await
        );
    }
}

#[cfg(feature = "embedded-broker")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_input_can_roll_a_fix_back_and_only_a_version_that_cannot_start_is_rolled_back() {
    let cloud = Mosquitto::cloud().await;
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let key = SigningKey::from_bytes(&[7; 32]);
    let path = deploy_config(dir.path(), port, cloud.port, &key, |_| {});
    let config = Config::load(&path).unwrap();
    let upstream = Upstream::subscribe(cloud.port, "site/#").await;
    let gateway = Gateway::start(config.clone()).await.unwrap();
    let chaos = std::fs::read(module("chaos")).unwrap();
    let version = || gateway.registry().table().get("chaos").map(|f| f.version());
    let sealed = |b: Body| seal(b, Some(&key));

    // v100 takes everything: X payloads go upstream (echoed).
    assert!(
        gateway
            .apply_bundle(&sealed(deploy_body(manifest("v100"), chaos.clone(), 100)))
            .await
            .is_ok()
    );
    let mut dev = Device::connect("sensor-d1", port).await;
    assert!(dev.publish_acked("chaos/x", "X before", PATIENCE).await);
    upstream
        .wait_until("X echoed by v100", |s| {
            s.iter().any(|m| m.payload == "X before")
        })
        .await;

    // v200, a fix refusing X payloads: a flood of them is refused, each a
    // dead letter, and never rolls the gateway back to v100.
    assert!(
        gateway
            .apply_bundle(&sealed(deploy_body(manifest("v200"), fix_module(), 200)))
            .await
            .is_ok()
    );
    for i in 0..25 {
        assert!(
            dev.publish_acked("chaos/x", format!("X exploit {i}"), PATIENCE)
                .await
        );
    }
    // Rounds of one more exploit and a plain reading, each reading seen
    // upstream through v200: the exploit never through v100.
    for i in 0..10 {
        assert!(
            dev.publish_acked("chaos/x", format!("X late {i}"), PATIENCE)
                .await
        );
        let plain = format!("plain {i}");
        assert!(dev.publish_acked("chaos/x", plain.clone(), PATIENCE).await);
        upstream
            .wait_until(&plain, |s| {
                s.iter()
                    .any(|m| m.topic == "site/pi-01/fixed" && m.payload == plain)
            })
            .await;
    }
    assert_eq!(version(), Some(200));
    let seen = upstream.seen.lock().unwrap().clone();
    let exploits: Vec<&Seen> = seen
        .iter()
        .filter(|m| m.payload.starts_with("X ") && m.payload != "X before")
        .collect();
    assert!(exploits.is_empty(), "{exploits:?}");
    assert_eq!(gateway.metrics().dead_letters, 35);

    // Versions a gateway cannot keep, expired bundles and versions below
    // the floor are refused before anything changes.
    let refused = |b: Vec<u8>| {
        let gateway = &gateway;
        async move { gateway.apply_bundle(&b).await.unwrap_err().code }
    };
    let huge = deploy_body(manifest("huge"), chaos.clone(), (1u64 << 63) + 5);
    assert_eq!(refused(sealed(huge)).await, "invalid_manifest");
    let mut floor_above = deploy_body(manifest("odd"), chaos.clone(), 300);
    floor_above.min_version = Some(301);
    assert_eq!(refused(sealed(floor_above)).await, "invalid_manifest");
    let mut expired = deploy_body(manifest("old"), chaos.clone(), 300);
    expired.expires_ms = Some(1_000);
    assert_eq!(refused(sealed(expired)).await, "expired");
    assert_eq!(version(), Some(200));

    // v300 starts, then its instances fail to start: rolled back to v200.
    let (at, broken) = breaking_soon();
    let mut v300 = deploy_body(manifest("v300"), broken, 300);
    v300.expires_ms = Some(u64::MAX);
    assert!(gateway.apply_bundle(&sealed(v300)).await.is_ok());
    assert_eq!(version(), Some(300));
    clock_past(at).await;
    traps(&mut dev, 4).await;
    eventually("the rollback of v300 to v200", || version() == Some(200)).await;
    assert_eq!(gateway.metrics().rollbacks, 1);

    // v400 the same, with rollback = "never": it keeps running.
    let (at, broken) = breaking_soon();
    let never = FunctionManifest {
        rollback: Some("never".into()),
        ..manifest("v400")
    };
    assert!(
        gateway
            .apply_bundle(&sealed(deploy_body(never, broken, 400)))
            .await
            .is_ok()
    );
    clock_past(at).await;
    traps(&mut dev, 4).await;
    eventually("v400 found broken and kept", || {
        gateway.metrics().rollbacks_declined == 1
    })
    .await;
    assert_eq!(version(), Some(400));
    // v500, a fix with its floor at itself (min_version 500).
    let mut v500 = deploy_body(manifest("v500"), fix_module(), 500);
    v500.min_version = Some(500);
    assert!(gateway.apply_bundle(&sealed(v500)).await.is_ok());
    let below = deploy_body(manifest("below"), chaos.clone(), 450);
    assert_eq!(refused(sealed(below)).await, "below_floor");
    // v700 raises the floor to 700 and breaks: the version before it (v500)
    // is below the floor, so v700 stays.
    let (at, broken) = breaking_soon();
    let mut v700 = deploy_body(manifest("v700"), broken, 700);
    v700.min_version = Some(700);
    assert!(gateway.apply_bundle(&sealed(v700)).await.is_ok());
    clock_past(at).await;
    traps(&mut dev, 4).await;
    eventually("v700 found broken and kept", || {
        gateway.metrics().rollbacks_declined == 2
    })
    .await;
    assert_eq!(version(), Some(700));
    assert_eq!(gateway.metrics().rollbacks, 1);
    // The publisher signs a fix; it is what runs after a restart.
    let v800 = sealed(deploy_body(manifest("v800"), fix_module(), 800));
    assert!(gateway.apply_bundle(&v800).await.is_ok());
    drop(dev);
    gateway.shutdown().await;
    let gateway = Gateway::start(config).await.unwrap();
    assert_eq!(
        gateway.registry().table().get("chaos").map(|f| f.version()),
        Some(800)
    );
    gateway.shutdown().await;
}

/// Publishes `n` QoS 1 messages `payload` on `topic(i)`, as fast as the
/// broker at `port` takes them; returns when every one is acknowledged.
async fn flood(
    port: u16,
    n: usize,
    topic: impl Fn(usize) -> String + Send + 'static,
    payload: &[u8],
) {
    use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
    let mut o = MqttOptions::new(format!("flood-{}", free_port()), "127.0.0.1", port);
    o.set_inflight(100);
    let (client, mut events) = AsyncClient::new(o, 200);
    let payload = payload.to_vec();
    let sender = tokio::spawn(async move {
        for i in 0..n {
            client
                .publish(topic(i), QoS::AtLeastOnce, false, payload.clone())
                .await
                .unwrap();
        }
        client
    });
    let mut acked = 0;
    while acked < n {
        match tokio::time::timeout(PATIENCE, events.poll()).await {
            Ok(Ok(Event::Incoming(Packet::PubAck(_)))) => acked += 1,
            Ok(Ok(_)) => {}
            other => panic!("flooding: {other:?}"),
        }
    }
    let _ = sender.await.unwrap().disconnect().await;
}

#[cfg(feature = "embedded-broker")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn junk_on_the_deploy_topics_is_counted_and_leaves_no_status_behind() {
    let cloud = Mosquitto::cloud().await;
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let key = SigningKey::from_bytes(&[7; 32]);
    let path = deploy_config(dir.path(), port, cloud.port, &key, |_| {});
    let statuses = Upstream::subscribe(cloud.port, "edgefn/pi-01/#").await;
    let gateway = Gateway::start(Config::load(&path).unwrap()).await.unwrap();
    let chaos = std::fs::read(module("chaos")).unwrap();
    let v1 = seal(deploy_body(manifest("v1"), chaos, 1), Some(&key));
    assert!(gateway.apply_bundle(&v1).await.is_ok());
    statuses
        .wait_until("the gateway online", |s| {
            last_status(s, "edgefn/pi-01/status").is_some_and(|j| j["online"] == true)
        })
        .await;

    // 2,000 messages that are no bundle, each on a topic of its own.
    let junk = 2_000;
    flood(
        cloud.port,
        junk,
        |i| format!("edgefn/pi-01/functions/junk-{i}/deploy"),
        b"not a bundle",
    )
    .await;
    eventually("every junk message refused", || {
        gateway.metrics().bundles_refused == junk as u64
    })
    .await;
    // Junk on the topic of a function that runs is refused on its status
    // topic; published after the rest, it arrives after any other status.
    publish_retained(
        cloud.port,
        "edgefn/pi-01/functions/chaos/deploy",
        b"junk".to_vec(),
    )
    .await;
    let seen = statuses
        .wait_until("chaos's refusal", |s| {
            last_status(s, "edgefn/pi-01/functions/chaos/status")
                .is_some_and(|j| j["refused"]["code"] == "malformed")
        })
        .await;
    let junk_statuses = seen
        .iter()
        .filter(|m| m.topic.contains("/junk-") && m.topic.ends_with("/status"))
        .count();
    assert_eq!(junk_statuses, 0);
    assert_eq!(
        gateway.registry().table().get("chaos").map(|f| f.version()),
        Some(1)
    );
    gateway.shutdown().await;
}

#[cfg(feature = "embedded-broker")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_configured_function_wins_over_a_deployed_bundle_of_its_name_at_restart() {
    let cloud = Mosquitto::cloud().await;
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let key = SigningKey::from_bytes(&[7; 32]);
    // First without a chaos table: the bundle is deployed.
    let path = deploy_config(dir.path(), port, cloud.port, &key, |_| {});
    let gateway = Gateway::start(Config::load(&path).unwrap()).await.unwrap();
    let chaos = std::fs::read(module("chaos")).unwrap();
    let v1 = seal(deploy_body(manifest("v1"), chaos, 1), Some(&key));
    assert!(gateway.apply_bundle(&v1).await.is_ok());
    gateway.shutdown().await;
    // Then the operator adds a chaos table to the file: it runs, not the
    // bundle, as a bundle of that name arriving now would be refused.
    let mut file = standard(dir.path(), Local::Embedded(port), cloud.port);
    file.trusting(&[trusted(&key)]);
    let with_table = write_config(dir.path(), &file);
    let gateway = Gateway::start(Config::load(&with_table).unwrap())
        .await
        .unwrap();
    let table = gateway.registry().table();
    let running = table.get("chaos").unwrap();
    assert_eq!(
        (running.version(), running.origin()),
        (0, edgefn::registry::Origin::Config)
    );
    let chaos = std::fs::read(module("chaos")).unwrap();
    let v2 = seal(deploy_body(manifest("v2"), chaos, 2), Some(&key));
    assert_eq!(
        gateway.apply_bundle(&v2).await.unwrap_err().code,
        "defined_in_config"
    );
    gateway.shutdown().await;
}

/// A gateway whose control topics are on its local Mosquitto (`[deploy]
/// broker = "local"`), with no function in its configuration: a bundle
/// retained there before it starts runs; an upgrade published while a
/// device publishes without pause loses no reading and duplicates none,
/// and the readings go from the old version's output to the new one's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upgrade_through_the_local_broker_under_load_loses_and_duplicates_nothing() {
    // The device publishes as fast as Mosquitto acknowledges it, which
    // can outrun edgefn for a while: a stock Mosquitto would drop QoS 1
    // messages beyond 1,000 queued for edgefn (logged and counted as
    // `broker_dropped`); DELIVERY.md's setting for the [A] hop queues them.
    let local = Mosquitto::start_with_extra("max_queued_messages 0\n").await;
    let cloud = Mosquitto::cloud().await;
    let dir = tempfile::tempdir().unwrap();
    let key = SigningKey::from_bytes(&[7; 32]);
    let file = ConfigFile {
        gateway: GatewayTable {
            id: "pi-01".into(),
            data_dir: Some(dir.path().join("data").display().to_string()),
        },
        local: LocalTable {
            url: Some(local.url()),
            client_id: Some("edgefn-pi-01".into()),
            ..Default::default()
        },
        upstream: Some(upstream(cloud.port)),
        deploy: Some(DeployTable {
            broker: Some("local".into()),
            trusted_keys: vec![trusted(&key)],
            ..Default::default()
        }),
        ..Default::default()
    };
    let path = write_config(dir.path(), &file);
    let clean = std::fs::read(module("clean_temperature")).unwrap();
    let bundle = |unit: &str, version: u64| {
        let m = FunctionManifest {
            name: "clean-temperature".into(),
            triggers: vec!["sensors/+/temperature".into()],
            timeout: Some("100ms".into()),
            concurrency: Some(2),
            env: [("UNIT".to_owned(), unit.to_owned())].into(),
            ..Default::default()
        };
        seal(deploy_body(m, clean.clone(), version), Some(&key))
    };
    let topic = "edgefn/pi-01/functions/clean-temperature/deploy";
    let status = "edgefn/pi-01/functions/clean-temperature/status";
    publish_retained(local.port, topic, bundle("F", 1)).await;
    let control = Upstream::subscribe(local.port, "edgefn/pi-01/#").await;
    let data = Upstream::subscribe(cloud.port, "site/#").await;
    let active = |version: u64| wait_active(&control, status, version);
    let _daemon = Daemon::start(&path);
    active(1).await;

    // A device publishes without pause until told to stop.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sent = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let device = {
        let (stop, sent) = (stop.clone(), sent.clone());
        let port = local.port;
        tokio::spawn(async move {
            let mut dev = Device::connect("sensor-d1", port).await;
            let mut seq = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                assert!(
                    dev.publish_acked("sensors/d1/temperature", reading(seq, 20.0), PATIENCE)
                        .await
                );
                seq += 1;
                sent.store(seq, std::sync::atomic::Ordering::Relaxed);
            }
            seq
        })
    };
    let readings = |s: &[Seen]| {
        s.iter()
            .filter(|m| m.topic == "site/pi-01/telemetry/d1/temperature")
            .count()
    };
    data.wait_until("200 readings through v1", |s| readings(s) >= 200)
        .await;
    publish_retained(local.port, topic, bundle("C", 2)).await;
    active(2).await;
    let at_swap = sent.load(std::sync::atomic::Ordering::Relaxed);
    data.wait_until("200 more readings", |s| readings(s) as u64 >= at_swap + 200)
        .await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let total = device.await.unwrap();
    let seen = data
        .wait_until("every reading", |s| readings(s) as u64 >= total)
        .await;
    let mut by_seq: Vec<(u64, bool)> = seen
        .iter()
        .filter(|m| m.topic == "site/pi-01/telemetry/d1/temperature")
        .map(|m| (m.reading().1, m.json().get("temp_f").is_some()))
        .collect();
    by_seq.sort();
    let seqs: Vec<u64> = by_seq.iter().map(|r| r.0).collect();
    assert_eq!(seqs, (0..total).collect::<Vec<_>>(), "each reading once");
    // v1 (UNIT=F) adds temp_f, v2 does not. Messages are routed in the
    // order they arrive, so every reading before the swap went to v1 and
    // every one after to v2: a single switch.
    let switches = by_seq.windows(2).filter(|w| w[0].1 != w[1].1).count();
    assert!(by_seq.first().unwrap().1 && !by_seq.last().unwrap().1);
    assert_eq!(switches, 1, "switches between v1 and v2");
}
