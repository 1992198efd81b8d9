//! The gateway's metrics listener: its report, and waits on its counters
//! (rather than on log text) wherever a counter says what a test waits
//! for.

use std::time::{Duration, Instant};

use crate::PATIENCE;

/// GETs `path` from the HTTP listener on `port` of this machine (the
/// metrics listener): the body of a 200 answer, or what went wrong.
pub fn try_get(port: u16, path: &str) -> Result<String, String> {
    use std::io::{Read as _, Write as _};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).map_err(|e| e.to_string())?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").map_err(|e| e.to_string())?;
    let mut response = String::new();
    s.read_to_string(&mut response).map_err(|e| e.to_string())?;
    let (head, body) = response
        .split_once("\r\n\r\n")
        .ok_or_else(|| format!("no HTTP answer: {response:?}"))?;
    if head.starts_with("HTTP/1.0 200") || head.starts_with("HTTP/1.1 200") {
        Ok(body.to_owned())
    } else {
        Err(head.to_owned())
    }
}

/// [`try_get`], which must succeed.
pub fn get(port: u16, path: &str) -> String {
    try_get(port, path).unwrap_or_else(|e| panic!("GET {path} on port {port}: {e}"))
}

/// The metrics model's report from the listener on `port`
/// (`/metrics.json`).
pub fn report(port: u16) -> serde_json::Value {
    serde_json::from_str(&get(port, "/metrics.json")).unwrap()
}

/// The function called `name` in a [`report`].
pub fn function_report(report: &serde_json::Value, name: &str) -> serde_json::Value {
    report["functions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["name"] == name)
        .unwrap_or_else(|| panic!("no function {name} in {report}"))
        .clone()
}

/// Waits until the report from the listener on `port` satisfies `pred`
/// (the listener may not answer yet); returns that report. Panics after
/// [`PATIENCE`] naming `what`, with the last report or answer.
pub async fn wait_for_report(
    port: u16,
    what: &str,
    pred: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let last = match tokio::task::spawn_blocking(move || try_get(port, "/metrics.json"))
            .await
            .unwrap()
        {
            Ok(body) => {
                let report: serde_json::Value = serde_json::from_str(&body).unwrap();
                if pred(&report) {
                    return report;
                }
                report.to_string()
            }
            Err(e) => e,
        };
        assert!(Instant::now() < deadline, "never: {what}; last: {last}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// Waits until the gateway counter `name` (`gateway.counters.NAME` of the
/// report on `port`) is at least `at_least`; returns the report.
pub async fn wait_for_counter(port: u16, name: &str, at_least: u64) -> serde_json::Value {
    wait_for_report(port, &format!("counter {name} >= {at_least}"), |r| {
        r["gateway"]["counters"][name]
            .as_u64()
            .is_some_and(|v| v >= at_least)
    })
    .await
}
