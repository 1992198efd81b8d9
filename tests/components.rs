//! Functions as WebAssembly components: the Python and JavaScript ones built
//! by functions/build.sh (componentize-py, componentize-js), run by the
//! real daemon beside the Rust modules. One conformance suite over the
//! clean-temperature of each language, and a hostile set per language.

#![cfg(feature = "embedded-broker")]

use std::time::Duration;

use edgefn::runtime::{FunctionSpec, LoadError, Runtime, Target};
use testkit::*;

/// The languages and the example module names of their clean-temperature.
const CLEAN_TEMPERATURE: [(&str, &str); 3] = [
    ("rust", "clean_temperature"),
    ("python", "clean_temperature_py"),
    ("javascript", "clean_temperature_js"),
];

/// A gateway `pi-01` with the built-in broker on `port`, the cloud at
/// `cloud_port`, running `functions`, with metrics on `metrics`.
fn config(
    dir: &std::path::Path,
    port: u16,
    cloud_port: u16,
    metrics: u16,
    functions: Vec<FunctionManifest>,
) -> std::path::PathBuf {
    let mut file = embedded_gateway(dir, port, cloud_port, functions);
    file.metrics_on(metrics);
    write_config(dir, &file)
}

/// A JSON value with every number as a float, so that `77` from one
/// language and `77.0` from another compare equal.
fn numbers_as_floats(v: serde_json::Value) -> serde_json::Value {
    use serde_json::Value;
    match v {
        Value::Number(n) => serde_json::json!(n.as_f64().unwrap()),
        Value::Array(a) => Value::Array(a.into_iter().map(numbers_as_floats).collect()),
        Value::Object(o) => Value::Object(
            o.into_iter()
                .map(|(k, v)| (k, numbers_as_floats(v)))
                .collect(),
        ),
        other => other,
    }
}

/// What one language's clean-temperature did with the same inputs.
#[derive(Debug, PartialEq)]
struct Behaviour {
    /// Records upstream: topic and payload, parsed.
    records: Vec<(String, serde_json::Value)>,
    /// Its state afterwards: key, and the record part of the value parsed
    /// (values are `<ms> <record>`).
    state: Vec<(String, serde_json::Value)>,
    /// Dead letters: topic and payload.
    dead: Vec<(String, String)>,
}

/// The readings every language gets, in order: kept, a duplicate, a stale
/// `device` replaced, not JSON, not an object, out of range, not numeric,
/// kept, and another device.
const READINGS: [(&str, &str); 9] = [
    ("sensors/a/temperature", r#"{"temp_c":21.5,"seq":1}"#),
    ("sensors/a/temperature", r#"{"temp_c":21.5,"seq":1}"#),
    (
        "sensors/b/temperature",
        r#"{"seq":2,"temp_c":-40,"device":"x"}"#,
    ),
    ("sensors/a/temperature", "not json"),
    ("sensors/a/temperature", "[1,2]"),
    ("sensors/a/temperature", r#"{"temp_c":90}"#),
    ("sensors/a/temperature", r#"{"temp_c":"hot"}"#),
    ("sensors/a/temperature", r#"{"temp_c":22,"seq":3}"#),
    ("sensors/c/temperature", r#"{"temp_c":0}"#),
];

/// Runs the module `module` as clean-temperature (UNIT=F, DEDUP_WINDOW=1h)
/// over [`READINGS`] and says what it did; then checks that a DEDUP_WINDOW
/// that is not a duration stops it from starting.
async fn clean_temperature_behaviour(module_name: &str) -> Behaviour {
    let cloud = Mosquitto::cloud().await;
    let upstream = Upstream::subscribe(cloud.port, "site/pi-01/#").await;
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let manifest = |window: &str| FunctionManifest {
        env: [
            ("UNIT".to_owned(), "F".to_owned()),
            ("DEDUP_WINDOW".to_owned(), window.to_owned()),
        ]
        .into(),
        timeout: Some("2s".into()),
        retries: Some(1),
        ..function("clean-temperature", module_name, &["sensors/+/temperature"])
    };
    let cfg = config(
        dir.path(),
        port,
        cloud.port,
        free_port(),
        vec![manifest("1h")],
    );
    let mut daemon = Daemon::start(&cfg);
    port_open(port).await;
    let mut device = Device::connect("sensor-1", port).await;
    for (topic, payload) in READINGS {
        assert!(
            device.publish_acked(topic, payload, PATIENCE).await,
            "{module_name}: {topic} {payload}: {}",
            daemon.log()
        );
    }
    // Committed before each PUBACK and forwarded in commit order: once the
    // last reading's record is upstream, every record is.
    let seen = upstream
        .wait_until("the last reading's record", |s| {
            s.iter()
                .any(|r| r.topic == "site/pi-01/telemetry/c/temperature")
        })
        .await;
    let records = Upstream::distinct(&seen)
        .iter()
        .map(|s| (s.topic.clone(), numbers_as_floats(s.json())))
        .collect();
    drop(device);
    assert!(daemon.terminate().success());

    let state = {
        let db = dir.path().join("data").join("edgefn.db");
        let conn = rusqlite::Connection::open(db).unwrap();
        let mut q = conn
            .prepare("SELECT key, value FROM function_state WHERE function = 'clean-temperature' ORDER BY key")
            .unwrap();
        q.query_map([], |r| {
            Ok((r.get::<_, Vec<u8>>(0)?, r.get::<_, Vec<u8>>(1)?))
        })
        .unwrap()
        .map(|r| {
            let (k, v) = r.unwrap();
            let v = String::from_utf8(v).unwrap();
            let (ms, record) = v.split_once(' ').unwrap();
            assert!(ms.parse::<u64>().is_ok(), "{v}");
            (
                String::from_utf8(k).unwrap(),
                numbers_as_floats(serde_json::from_str(record).unwrap()),
            )
        })
        .collect()
    };

    let dead = edgefn::store::dead_letters(&dir.path().join("data")).unwrap();

    // A DEDUP_WINDOW that is not a duration stops the function from
    // starting (its init fails), with a message saying so.
    config(
        dir.path(),
        port,
        cloud.port,
        free_port(),
        vec![manifest("banana")],
    );
    let check = edgefn(&["check", "--config", cfg.to_str().unwrap()]);
    assert!(!check.status.success(), "{module_name}: {}", text(&check));
    assert!(
        text(&check).contains(r#"DEDUP_WINDOW \"banana\" is not a duration"#)
            || text(&check).contains(r#"DEDUP_WINDOW "banana" is not a duration"#),
        "{module_name}: {}",
        text(&check)
    );
    Behaviour {
        records,
        state,
        dead: dead
            .into_iter()
            .map(|d| (d.topic, String::from_utf8(d.payload).unwrap()))
            .collect(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clean_temperature_does_the_same_in_rust_python_and_javascript() {
    let mut behaviours = Vec::new();
    for (language, module_name) in CLEAN_TEMPERATURE {
        behaviours.push((language, clean_temperature_behaviour(module_name).await));
    }
    let (_, rust) = &behaviours[0];
    // The Rust module is the reference: check it did what the inputs ask.
    let topics: Vec<&str> = rust.records.iter().map(|(t, _)| t.as_str()).collect();
    assert_eq!(
        topics,
        [
            "site/pi-01/telemetry/a/temperature",
            "site/pi-01/telemetry/b/temperature",
            "site/pi-01/telemetry/a/temperature",
            "site/pi-01/telemetry/c/temperature",
        ]
    );
    assert_eq!(
        rust.records[1].1,
        numbers_as_floats(
            serde_json::json!({"seq": 2, "temp_c": -40, "device": "b", "temp_f": -40})
        )
    );
    assert_eq!(
        rust.state
            .iter()
            .map(|(k, _)| k.as_str())
            .collect::<Vec<_>>(),
        ["last/a", "last/b", "last/c"]
    );
    // Bad readings are dropped, not failures.
    assert_eq!(rust.dead, []);
    for (language, behaviour) in &behaviours[1..] {
        assert_eq!(behaviour, rust, "{language} differs from rust");
    }
}

/// The chaos function of `language` (`py` or `js`) on `chaos-<language>/#`:
/// 500 ms, one retry, 64 MiB, 1 MiB of state, emitting only to `chaos/#`
/// and `echo/#`, 100 log lines a second.
fn chaos_component(language: &str) -> FunctionManifest {
    FunctionManifest {
        env: [("GREETING".to_owned(), format!("hi from {language}"))].into(),
        timeout: Some("500ms".into()),
        retries: Some(1),
        memory_limit: Some("64MiB".into()),
        state_limit: Some("1MiB".into()),
        log_rate_limit: Some(100),
        emit_allow: Some(vec!["chaos/#".into(), "echo/#".into()]),
        ..function(
            &format!("chaos-{language}"),
            &format!("chaos_{language}"),
            &[&format!("chaos-{language}/#")],
        )
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_python_and_javascript_fail_only_themselves_with_their_reasons() {
    let cloud = Mosquitto::cloud().await;
    let upstream = Upstream::subscribe(cloud.port, "site/pi-01/#").await;
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let metrics = free_port();
    let cfg = config(
        dir.path(),
        port,
        cloud.port,
        metrics,
        vec![
            chaos_component("py"),
            chaos_component("js"),
            clean_temperature(),
        ],
    );
    let mut daemon = Daemon::start(&cfg);
    port_open(port).await;
    let mut device = Device::connect("sensor-1", port).await;
    // Python also waits in WASI (time.sleep) and tries a file.
    let python = [
        "spin",
        "sleep",
        "oom",
        "fail",
        "forbidden",
        "hoard",
        "flood",
        "file",
        "count",
        "context",
        "env",
    ];
    let javascript = [
        "spin",
        "oom",
        "fail",
        "forbidden",
        "hoard",
        "flood",
        "count",
        "context",
        "env",
    ];
    for (language, commands) in [("py", &python[..]), ("js", &javascript[..])] {
        let topic = format!("chaos-{language}/x");
        for cmd in commands {
            assert!(device.publish_acked(&topic, *cmd, PATIENCE).await, "{cmd}");
        }
        assert!(device.publish_acked(&topic, "hello", PATIENCE).await);
    }
    // The other functions kept serving.
    assert!(
        device
            .publish_acked("sensors/z/temperature", r#"{"temp_c":20}"#, PATIENCE)
            .await
    );
    let seen = upstream
        .wait_until("every echo and the temperature", |s| {
            ["py", "js"].iter().all(|l| {
                s.iter()
                    .any(|r| r.topic == format!("site/pi-01/echo/chaos-{l}/x"))
            }) && s
                .iter()
                .any(|r| r.topic == "site/pi-01/telemetry/z/temperature")
        })
        .await;
    let payloads = |topic: &str| -> Vec<String> {
        Upstream::on(&seen, &format!("site/pi-01/{topic}"))
            .into_iter()
            .map(|s| s.payload)
            .collect()
    };
    // Refusals come back as the world's error; the invocation goes on.
    assert_eq!(payloads("chaos/forbidden"), ["not-allowed", "not-allowed"]);
    assert_eq!(payloads("chaos/hoard"), ["state-limit", "state-limit"]);
    assert!(payloads("forbidden/x").is_empty());
    // What a failed invocation emitted is not kept.
    assert!(payloads("chaos/fail").is_empty());
    // Fresh instances after the failures: module-level state starts over,
    // and init ran once in each.
    let counts: Vec<serde_json::Value> = Upstream::on(&seen, "site/pi-01/chaos/count")
        .iter()
        .map(Seen::json)
        .collect();
    assert_eq!(
        counts,
        [
            serde_json::json!({"count": 1, "init": 1}),
            serde_json::json!({"count": 1, "init": 1})
        ]
    );
    let contexts: Vec<serde_json::Value> = Upstream::on(&seen, "site/pi-01/chaos/context")
        .iter()
        .map(Seen::json)
        .collect();
    assert_eq!(
        contexts,
        [
            serde_json::json!({"function": "chaos-py", "attempt": 1, "trigger": "mqtt"}),
            serde_json::json!({"function": "chaos-js", "attempt": 1, "trigger": "mqtt"})
        ]
    );
    assert_eq!(payloads("chaos/env"), ["hi from py", "hi from js"]);
    // No directories are open to a function.
    assert_eq!(payloads("chaos/file"), ["FileNotFoundError"]);

    let report = metrics::report(metrics);
    let log = daemon.log();
    for language in ["py", "js"] {
        let f = metrics::function_report(&report, &format!("chaos-{language}"));
        assert_eq!(f["emit_denied"], 1, "{language}: {f}");
        assert_eq!(f["state_refused"], 1, "{language}: {f}");
        // 1 MiB of output in one invocation: 64 KiB of it kept.
        let lines: Vec<&str> = log
            .lines()
            .filter(|l| l.contains(&format!("chaos-{language}")) && l.contains("stdout"))
            .collect();
        assert!(lines.len() < 100, "{language}: {}", lines.len());
        assert!(
            lines.iter().any(|l| l.contains("[output truncated]")),
            "{language}"
        );
    }
    drop(device);
    assert!(daemon.terminate().success());

    // spin, oom and fail are dead letters, each after its retry, with the
    // reason: a timeout, the language's out-of-memory error, the exception.
    let dead = edgefn::store::dead_letters(&dir.path().join("data")).unwrap();
    let summary: Vec<(&str, &str, &str)> = dead
        .iter()
        .map(|d| {
            (
                d.function.as_str(),
                std::str::from_utf8(&d.payload).unwrap(),
                d.kind,
            )
        })
        .collect();
    assert_eq!(
        summary,
        [
            ("chaos-py", "spin", "timeout"),
            ("chaos-py", "sleep", "timeout"),
            ("chaos-py", "oom", "error"),
            ("chaos-py", "fail", "error"),
            ("chaos-js", "spin", "timeout"),
            ("chaos-js", "oom", "error"),
            ("chaos-js", "fail", "error"),
        ]
    );
    assert!(dead.iter().all(|d| d.attempts == 2), "{dead:?}");
    assert!(dead[2].error.contains("MemoryError"), "{:?}", dead[2]);
    assert!(dead[5].error.contains("out of memory"), "{:?}", dead[5]);
    assert!(
        dead[3].error.contains("ValueError: asked to fail"),
        "{:?}",
        dead[3]
    );
    assert!(
        dead[6].error.contains("Error: asked to fail"),
        "{:?}",
        dead[6]
    );
}

/// A spec for loading a component directly: its default memory, 2 s.
fn spec(name: &str) -> FunctionSpec {
    FunctionSpec {
        memory_limit: None,
        timeout: Duration::from_secs(2),
        ..FunctionSpec::new(name)
    }
}

#[test]
fn components_that_are_not_functions_are_refused_with_the_reason() {
    let runtime = Runtime::new(Target::Native).unwrap();
    // A component of another world: no `handle`.
    let other =
        wat::parse_str(r#"(component (core module $m) (core instance (instantiate $m)))"#).unwrap();
    let err = runtime
        .load("other.wasm", &other, spec("other"))
        .err()
        .unwrap();
    assert!(matches!(err, LoadError::Abi { .. }), "{err}");
    assert!(
        err.to_string().contains("does not export `handle`"),
        "{err}"
    );

    // A truncated one.
    let python = std::fs::read(module("clean_temperature_py")).unwrap();
    let err = runtime
        .load(
            "truncated.wasm",
            &python[..python.len() / 2],
            spec("truncated"),
        )
        .err()
        .unwrap();
    assert!(matches!(err, LoadError::NotWasm { .. }), "{err}");

    // One whose init fails: the start fails with the exception's text.
    let err = runtime
        .load(
            "clean_temperature_py.wasm",
            &python,
            FunctionSpec {
                env: vec![("DEDUP_WINDOW".into(), "banana".into())],
                ..spec("bad-window")
            },
        )
        .err()
        .unwrap();
    assert!(matches!(err, LoadError::Start { .. }), "{err}");
    assert!(
        err.to_string()
            .contains(r#"init failed: ValueError: DEDUP_WINDOW "banana" is not a duration"#),
        "{err}"
    );

    // One whose memory at start is past its limit says what it needs.
    let err = runtime
        .load(
            "clean_temperature_py.wasm",
            &python,
            FunctionSpec {
                memory_limit: Some(4 << 20),
                ..spec("small")
            },
        )
        .err()
        .unwrap();
    assert!(err.to_string().contains("memory_limit is 4MiB"), "{err}");
    assert!(
        err.to_string().contains("a growth of its memory to 13."),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_python_function_deploys_in_a_signed_bundle_and_restarts_from_its_artifact() {
    use ed25519_dalek::SigningKey;
    use edgefn::bundle::seal;

    let cloud = Mosquitto::cloud().await;
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let key = SigningKey::from_bytes(&[9; 32]);
    let mut file = standard(dir.path(), Local::Embedded(port), cloud.port);
    file.without_function("chaos").trusting(&[trusted(&key)]);
    let path = write_config(dir.path(), &file);
    let topic = "edgefn/pi-01/functions/chaos-py/deploy";
    let status = "edgefn/pi-01/functions/chaos-py/status";
    let control = Upstream::subscribe(cloud.port, "edgefn/pi-01/#").await;
    let data = Upstream::subscribe(cloud.port, "site/#").await;
    let manifest = |greeting: &str| FunctionManifest {
        name: "chaos-py".into(),
        triggers: vec!["chaos-py/#".into()],
        env: [("GREETING".to_owned(), greeting.to_owned())].into(),
        ..Default::default()
    };
    let python = std::fs::read(module("chaos_py")).unwrap();

    let mut daemon = Daemon::start(&path);
    let v1 = seal(deploy_body(manifest("v1"), python.clone(), 1), Some(&key));
    publish_retained(cloud.port, topic, v1).await;
    control
        .wait_until("v1 active", |s| {
            last_status(s, status).is_some_and(|j| j["state"] == "active" && j["version"] == 1)
        })
        .await;
    let mut dev = Device::connect("sensor-1", port).await;
    let greets = |expect: &'static str| {
        let data = &data;
        async move {
            data.wait_until(&format!("greeting {expect}"), |s| {
                s.iter()
                    .any(|m| m.topic == "site/pi-01/chaos/env" && m.payload == expect)
            })
            .await;
        }
    };
    assert!(dev.publish_acked("chaos-py/x", "env", PATIENCE).await);
    greets("v1").await;

    // A component of another world is refused before anything changes.
    let other = wat::parse_str("(component)").unwrap();
    let v2 = seal(deploy_body(manifest("v2"), other, 2), Some(&key));
    publish_retained(cloud.port, topic, v2).await;
    let seen = control
        .wait_until("v2 refused", |s| {
            last_status(s, status).is_some_and(|j| j["refused"]["code"] == "invalid_module")
        })
        .await;
    let refusal = last_status(&seen, status).unwrap();
    assert_eq!(refusal["version"], 1, "{refusal}");
    assert!(
        refusal["refused"]["text"]
            .as_str()
            .unwrap()
            .contains("does not export `handle`"),
        "{refusal}"
    );
    drop(dev);
    assert!(daemon.terminate().success());

    // A restart with the cloud gone: the deployed Python function comes
    // back from the database, its code from the precompiled artifact.
    drop(control);
    drop(cloud);
    let mut daemon = Daemon::start(&path);
    port_open(port).await;
    daemon
        .wait_for_log("deployed function restored function=chaos-py version=1 precompiled=true")
        .await;
    let mut dev = Device::connect("sensor-1", port).await;
    assert!(dev.publish_acked("chaos-py/x", "count", PATIENCE).await);
    assert!(daemon.terminate().success());
    let committed: i64 = rusqlite::Connection::open(dir.path().join("data").join("edgefn.db"))
        .unwrap()
        .query_row(
            "SELECT count(*) FROM outbox WHERE topic LIKE '%chaos/count'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(committed, 1);
}

/// Writes `edgefn new NAME --lang LANG` into `dir`/NAME, builds it with its
/// own build.sh (the toolchains functions/build.sh installed, linked in),
/// and invokes it.
fn new_function(dir: &std::path::Path, lang: &str) -> String {
    let name = format!("my-{lang}");
    let at = dir.join(&name);
    let out = edgefn(&["new", &name, "--lang", lang, "--dir", at.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out));
    let readme = std::fs::read_to_string(at.join("README.md")).unwrap();
    for says in [
        "./build.sh",
        "edgefn invoke",
        "edgefn deploy",
        "[[functions]]",
    ] {
        assert!(
            readme.contains(says),
            "{lang}: README lacks {says}:\n{readme}"
        );
    }
    assert!(!readme.contains("{{"), "{lang}: {readme}");
    // The toolchains functions/build.sh installed, so the build needs no
    // network.
    module("clean_temperature_py");
    match lang {
        "python" => std::os::unix::fs::symlink(
            root().join("functions/target/componentize-py"),
            at.join(".venv"),
        )
        .unwrap(),
        "js" => std::os::unix::fs::symlink(
            root().join("functions/js/node_modules"),
            at.join("node_modules"),
        )
        .unwrap(),
        _ => {}
    }
    let build = std::process::Command::new("bash")
        .arg(at.join("build.sh"))
        .output()
        .unwrap();
    assert!(build.status.success(), "{lang}: {}", text(&build));
    let wasm = at.join(format!("{name}.wasm"));
    let out = edgefn(&[
        "invoke",
        wasm.to_str().unwrap(),
        "--topic",
        "sensors/pi-7/temperature",
        "--payload",
        r#"{"temp_c":21.5}"#,
    ]);
    assert!(out.status.success(), "{lang}: {}", text(&out));
    text(&out)
}

#[test]
fn new_functions_in_python_javascript_and_rust_build_and_run() {
    let dir = tempfile::tempdir().unwrap();
    for lang in ["python", "js", "rust"] {
        let out = new_function(dir.path(), lang);
        let emitted = out
            .lines()
            .find(|l| l.starts_with("emit"))
            .unwrap_or_else(|| panic!("{lang}: {out}"));
        let json = emitted.split_once(' ').unwrap().1.trim();
        let (topic, payload) = json.split_once(' ').unwrap();
        assert_eq!(topic, "processed/sensors/pi-7/temperature", "{lang}");
        assert_eq!(
            numbers_as_floats(serde_json::from_str(payload).unwrap()),
            numbers_as_floats(serde_json::json!({"temp_c": 21.5, "device": "pi-7"})),
            "{lang}"
        );
    }
    // A C skeleton is written (clang builds it where it is installed), and
    // a name that cannot be a function's is refused.
    let out = edgefn(&[
        "new",
        "my-c",
        "--lang",
        "c",
        "--dir",
        dir.path().join("my-c").to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(dir.path().join("my-c/my-c.c").exists());
    let out = edgefn(&["new", "no/slash", "--lang", "python"]);
    assert!(!out.status.success());
    assert!(
        text(&out).contains("is not a function name"),
        "{}",
        text(&out)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_javascript_instance_is_replaced_before_its_heap_fills_its_memory() {
    use edgefn::runtime::pool::{FunctionMetrics, Outcome, Pool};
    use std::sync::Arc;

    // SpiderMonkey's heap grows about 1 KB a call until it cannot allocate:
    // at 16 MiB (9 MiB in use at start) one instance would crash after
    // about 7,000 calls.
    let runtime = Runtime::new(Target::Native).unwrap();
    let bytes = std::fs::read(module("clean_temperature_js")).unwrap();
    let spec = FunctionSpec {
        memory_limit: Some(16 << 20),
        ..FunctionSpec::new("js")
    };
    let function = Arc::new(runtime.load("js", &bytes, spec).unwrap());
    let metrics = Arc::new(FunctionMetrics::default());
    let pool = Pool::start(function, 1, 0, metrics.clone()).unwrap();
    let topic: Arc<str> = "sensors/d1/temperature".into();
    for n in 0..12_000 {
        let payload = bytes::Bytes::from(format!(r#"{{"temp_c":21.5,"seq":{n}}}"#));
        match pool.submit(topic.clone(), payload).await.await.unwrap() {
            Outcome::Ok(out) => assert_eq!(out.records.len(), 1),
            Outcome::Failed { failure, .. } => panic!("invocation {n} failed: {failure}"),
        }
    }
    let started = metrics
        .instances_started
        .load(std::sync::atomic::Ordering::Relaxed);
    assert!(started > 1, "one instance served all: {started}");
    pool.shutdown();
}
