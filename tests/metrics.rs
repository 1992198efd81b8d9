//! The one metrics model, shown three ways: the Prometheus endpoint
//! (scraped with Python's prometheus_client parser), the JSON report on
//! the metrics topic, and `edgefn status --config`; each with exact counts
//! of what was sent.

#![cfg(feature = "embedded-broker")]

use std::io::Write as _;

use testkit::*;

/// `edgefn status --config CONFIG`: (success, output).
fn status(config: &std::path::Path) -> (bool, String) {
    let out = edgefn(&["status", "--config", config.to_str().unwrap()]);
    (out.status.success(), text(&out))
}

/// Parses Prometheus text with Python's prometheus_client (OpenMetrics
/// parser): `name{labels} value` lines, sorted, for the samples named.
fn scrape_with_python(text: &str, names: &[&str]) -> Vec<String> {
    let script = r#"
import json, sys
from prometheus_client.openmetrics.parser import text_string_to_metric_families
names = set(json.loads(sys.argv[1]))
out = []
for family in text_string_to_metric_families(sys.stdin.read()):
    for s in family.samples:
        if s.name in names:
            labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
            out.append(f"{s.name}{{{labels}}} {s.value:g}")
print("\n".join(sorted(out)))
"#;
    let mut child = std::process::Command::new("/usr/bin/python3")
        .args(["-c", script, &serde_json::to_string(names).unwrap()])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("/usr/bin/python3 (apt-get install python3 python3-prometheus-client)");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "the Prometheus text does not parse (or python3-prometheus-client is missing): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_metrics_model_counts_exactly_what_was_sent_on_every_view() {
    let cloud = Mosquitto::cloud().await;
    let upstream = Upstream::subscribe(cloud.port, "site/pi-01/#").await;
    let reports = Upstream::subscribe(cloud.port, "edgefn/pi-01/metrics").await;
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let metrics_port = free_port();
    let mut file = standard(dir.path(), Local::Embedded(port), cloud.port);
    file.metrics_on(metrics_port)
        .trusting(&[trusted(&signing_key(3))]);
    file.metrics.as_mut().unwrap().interval = Some("1s".into());
    let config = write_config(dir.path(), &file);
    let mut daemon = Daemon::start(&config);
    port_open(port).await;
    port_open(metrics_port).await;

    // A second daemon on the same metrics port stops at start-up, saying
    // why.
    let dir2 = tempfile::tempdir().unwrap();
    let mut file = standard(dir2.path(), Local::Embedded(free_port()), cloud.port);
    file.metrics_on(metrics_port);
    let other = write_config(dir2.path(), &file);
    let out = edgefn(&["run", "--config", other.to_str().unwrap()]);
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        said.contains(&format!(
            "cannot listen on metrics.listen 127.0.0.1:{metrics_port}"
        )),
        "{said}"
    );

    // 20 readings, 3 messages chaos traps on (two attempts each), and one
    // no function takes, which the built-in broker handles as any broker
    // (it never reaches the pipeline).
    let mut dev = Device::connect("device-m", port).await;
    for i in 0..20 {
        assert!(
            dev.publish_acked("sensors/d1/temperature", reading(i, 20.0), PATIENCE)
                .await
        );
    }
    for _ in 0..3 {
        assert!(dev.publish_acked("chaos/x", "trap", PATIENCE).await);
    }
    assert!(dev.publish_acked("nobody/listens", "x", PATIENCE).await);
    upstream
        .wait_until("20 readings upstream", |s| {
            s.iter()
                .filter(|m| m.topic.ends_with("/temperature"))
                .count()
                >= 20
        })
        .await;

    let report = || -> serde_json::Value {
        serde_json::from_str(&get(metrics_port, "/metrics.json")).unwrap()
    };
    eventually("the 20 records acknowledged upstream and deleted", || {
        let r = report();
        r["gateway"]["counters"]["forwarded"] == 20 && r["gateway"]["buffer_records"] == 0
    })
    .await;
    let r = report();
    let c = &r["gateway"]["counters"];
    assert_eq!(r["gateway"]["id"], "pi-01");
    assert_eq!(
        (c["received"].as_u64(), c["committed"].as_u64()),
        (Some(23), Some(23))
    );
    assert_eq!(
        (c["unrouted"].as_u64(), c["dead_letters"].as_u64()),
        (Some(0), Some(3))
    );
    assert_eq!(r["gateway"]["buffer_records"], 0);
    assert_eq!(r["gateway"]["upstream_connected"], true);
    // What the card takes, from the end of start-up on: every message
    // came after it.
    let g = &r["gateway"];
    assert!(g["disk_window_s"].as_f64().unwrap() > 0.0, "{g}");
    // Numbers, present once messages were committed (their size depends on
    // the filesystem, so only their presence is checked).
    assert!(g["disk_bytes_per_day"].is_number(), "{g}");
    assert!(g["disk_bytes_per_message"].is_number(), "{g}");
    let f = |name: &str| {
        r["functions"]
            .as_array()
            .unwrap()
            .iter()
            .find(|f| f["name"] == name)
            .unwrap()
            .clone()
    };
    let clean = f("clean-temperature");
    assert_eq!(
        (
            clean["invocations"].as_u64(),
            clean["emitted_records"].as_u64()
        ),
        (Some(20), Some(20))
    );
    assert_eq!(clean["duration"]["samples"], 20);
    let chaos = f("chaos");
    assert_eq!(chaos["invocations"], 6);
    assert_eq!(chaos["errors"]["trap"], 6);
    assert_eq!(
        (chaos["retries"].as_u64(), chaos["dead_letters"].as_u64()),
        (Some(3), Some(3))
    );

    // The same counts in the Prometheus text, as a real client parses it.
    let scraped = scrape_with_python(
        &get(metrics_port, "/metrics"),
        &[
            "edgefn_messages_received_total",
            "edgefn_records_forwarded_total",
            "edgefn_function_dead_letters_total",
            "edgefn_emitted_records_total",
        ],
    );
    assert_eq!(
        scraped,
        [
            "edgefn_emitted_records_total{function=chaos} 0",
            "edgefn_emitted_records_total{function=clean-temperature} 20",
            "edgefn_function_dead_letters_total{function=chaos} 3",
            "edgefn_function_dead_letters_total{function=clean-temperature} 0",
            "edgefn_messages_received_total{} 23",
            "edgefn_records_forwarded_total{} 20",
        ]
    );
    let invocations = scrape_with_python(
        &get(metrics_port, "/metrics"),
        &["edgefn_invocations_total"],
    );
    assert!(
        invocations.contains(&"edgefn_invocations_total{function=chaos,outcome=trap} 6".to_owned()),
        "{invocations:?}"
    );
    assert!(
        invocations.contains(
            &"edgefn_invocations_total{function=clean-temperature,outcome=ok} 20".to_owned()
        ),
        "{invocations:?}"
    );

    // The metrics topic carries the same report.
    let published = reports
        .wait_until("a report with every message", |s| {
            s.iter()
                .any(|m| m.json()["gateway"]["counters"]["received"] == 23)
        })
        .await;
    let last = published
        .iter()
        .rev()
        .find(|m| m.json()["gateway"]["counters"]["received"] == 23)
        .unwrap()
        .json();
    assert_eq!(last["gateway"]["counters"]["dead_letters"], 3);

    // `edgefn status --config`: from the running daemon ...
    let (ok, live) = status(&config);
    assert!(ok, "{live}");
    assert!(
        live.contains("messages    received 23  committed 23"),
        "{live}"
    );
    assert!(
        live.lines().any(|l| l.starts_with("  disk ")
            && l.contains(" per message, ")
            && l.contains(" per day (last ")),
        "{live}"
    );
    let chaos_line = live
        .lines()
        .find(|l| l.trim_start().starts_with("chaos"))
        .unwrap();
    let cols: Vec<&str> = chaos_line.split_whitespace().collect();
    assert_eq!(
        &cols[..6],
        ["chaos", "config", "6", "6", "3", "3"],
        "{live}"
    );
    assert!(daemon.terminate().success());

    // ... and from the database when it is not running.
    let (ok, offline) = status(&config);
    assert!(ok, "{offline}");
    assert!(offline.contains("not running?"), "{offline}");
    let chaos_line = offline
        .lines()
        .find(|l| l.trim_start().starts_with("chaos"))
        .unwrap();
    let cols: Vec<&str> = chaos_line.split_whitespace().collect();
    assert_eq!(&cols[..4], ["chaos", "config", "3", "0"], "{offline}");
}

/// Descriptors the process `pid` holds open now.
fn open_descriptors(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_half_sent_requests_is_cut_and_holds_few_descriptors() {
    use std::io::{Read as _, Write as _};
    let cloud = Mosquitto::cloud().await;
    let upstream = Upstream::subscribe(cloud.port, "site/pi-01/#").await;
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let metrics_port = free_port();
    let mut file = standard(dir.path(), Local::Embedded(port), cloud.port);
    file.metrics_on(metrics_port);
    let config = write_config(dir.path(), &file);
    let mut daemon = Daemon::start(&config);
    port_open(port).await;
    port_open(metrics_port).await;
    let mut dev = Device::connect("device-f", port).await;
    assert!(
        dev.publish_acked("sensors/d1/temperature", reading(0, 20.0), PATIENCE)
            .await
    );
    report(metrics_port);
    let before = open_descriptors(daemon.child.id());

    // 200 clients that send half a request and wait.
    let flood = 200;
    let streams: Vec<std::net::TcpStream> = (0..flood)
        .map(|_| {
            let mut s = std::net::TcpStream::connect(("127.0.0.1", metrics_port)).unwrap();
            s.write_all(b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\n")
                .unwrap();
            s
        })
        .collect();
    // Each is closed by the gateway: at once past the connection cap, after
    // the header timeout within it (a read then ends).
    let (closed_tx, mut closed) = tokio::sync::mpsc::unbounded_channel();
    for mut s in streams {
        let closed_tx = closed_tx.clone();
        std::thread::spawn(move || {
            s.set_read_timeout(Some(PATIENCE)).unwrap();
            let mut buf = [0u8; 256];
            // Whatever the gateway answers, then the end of the stream.
            let ended = loop {
                match s.read(&mut buf) {
                    Ok(0) => break true,
                    Ok(_) => {}
                    Err(e) => {
                        use std::io::ErrorKind::{TimedOut, WouldBlock};
                        break !matches!(e.kind(), TimedOut | WouldBlock);
                    }
                }
            };
            let _ = closed_tx.send(ended);
        });
    }
    let cap = edgefn::telemetry::MAX_CONNECTIONS;
    for _ in 0..flood - cap {
        assert!(
            closed.recv().await.unwrap(),
            "a connection past the cap was not closed"
        );
    }
    // While the others wait for their timeout, the gateway holds a
    // descriptor for each of them only, and readings flow.
    let during = open_descriptors(daemon.child.id());
    assert!(
        during <= before + cap + 2,
        "{during} descriptors during the flood, {before} before"
    );
    assert!(
        dev.publish_acked("sensors/d1/temperature", reading(1, 20.0), PATIENCE)
            .await
    );
    upstream
        .wait_until("the reading sent during the flood", |s| {
            s.iter().any(|m| m.reading() == ("d1".into(), 1))
        })
        .await;
    for _ in 0..cap {
        assert!(
            closed.recv().await.unwrap(),
            "a half-sent request was never cut"
        );
    }
    let r = report(metrics_port);
    let counters = &r["gateway"]["counters"];
    assert_eq!(
        counters["metrics_connections_refused"],
        (flood - cap) as u64
    );
    assert_eq!(counters["metrics_connections_cut"], cap as u64);
    assert!(daemon.terminate().success());
}
