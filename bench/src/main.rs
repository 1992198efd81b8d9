//! End-to-end benchmark: devices → broker → edgefn (clean-temperature,
//! durable buffer) → cloud broker, against Mosquitto's own bridge between
//! the same two brokers as the reference (no processing, no durable buffer).
//!
//! ```sh
//! functions/build.sh && cargo build --release --workspace --bins
//! target/release/edgefn-bench --messages 20000 --devices 10
//! target/release/edgefn-bench --only deploy,restart,fleet
//! target/release/edgefn-bench --only wear
//! target/release/edgefn-bench --only connect
//! target/release/edgefn-bench --only embedded-n,embedded-tls
//! ```
//!
//! The deploy scenarios are described in `fleet.rs`; the rest of this
//! doc is about the throughput ones.
//!
//! Each scenario runs on fresh private Mosquitto instances (stock config) on
//! free loopback ports: a throughput run (every device publishes QoS 1 as
//! fast as its client's in-flight window allows; rate = messages / time
//! from first publish to last arrival) and a latency run (a fixed total
//! rate; latency = arrival time − the `ts_us` the device put in the payload).
//! `EDGEFN_BENCH_LOG` sets the daemon's log filter (default: warnings).
//! `EDGEFN_BENCH_LOCAL_CONF` adds mosquitto.conf lines to the device-side
//! broker, `\n`-separated (e.g. `log_dest file /tmp/local.log\nlog_type all`).
//! For edgefn it also reads the daemon's peak RSS (`VmHWM`) and the bytes it
//! wrote to disk (`write_bytes` in /proc/PID/io) per message, and, over
//! the throughput run, its CPU time and context switches per message
//! (from /proc/PID/stat, and summed over its threads from
//! /proc/PID/task/*/status):
//! these two vary far less between runs than msg/s on a shared machine, so
//! they are the figures to compare when changing edgefn's hot path.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use clap::Parser;
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::Packet;
use rumqttc::v5::{AsyncClient, Event, MqttOptions};
use testkit::{ConfigFile, Local, Mosquitto, free_port, port_open, write_config};

mod connect;
mod fleet;
mod wear;

/// How a bench client reaches its broker: over TLS (trusting a CA), and
/// with a user name and password, or neither.
#[derive(Clone, Default)]
pub(crate) struct Dial {
    /// TLS, with this client setup.
    pub(crate) tls: Option<Arc<rustls::ClientConfig>>,
    /// User name and password.
    pub(crate) login: Option<(String, String)>,
}

impl Dial {
    /// Options for client `id` of the broker at `port`.
    pub(crate) fn options(&self, id: String, port: u16) -> MqttOptions {
        let mut o = MqttOptions::new(id, "127.0.0.1", port);
        o.set_keep_alive(Duration::from_secs(60));
        if let Some(tls) = &self.tls {
            o.set_transport(rumqttc::Transport::tls_with_config(
                rumqttc::TlsConfiguration::Rustls(tls.clone()),
            ));
        }
        if let Some((user, password)) = &self.login {
            o.set_credentials(user, password);
        }
        o
    }
}

/// End-to-end benchmark of edgefn against Mosquitto's bridge.
#[derive(Debug, Parser)]
struct Args {
    /// Messages in each throughput run.
    #[arg(long, default_value_t = 20_000)]
    messages: u64,
    /// Simulated devices (connections) in the multi-device scenarios.
    #[arg(long, default_value_t = 10)]
    devices: usize,
    /// Total publish rate of the latency runs, messages per second.
    #[arg(long, default_value_t = 2000)]
    rate: u64,
    /// Length of each latency run.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    latency_for: Duration,
    /// Scenarios to run: the throughput ones (bridge, edgefn, embedded-1,
    /// embedded-n by default, and embedded-tls), the deploy ones (deploy,
    /// restart, fleet; see fleet.rs), `connect` (see connect.rs), `wear`,
    /// or `memory` (the idle daemon's RSS with the function's instances
    /// warm, at concurrency 2 and 6).
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
    /// The function every scenario runs: an example in functions/dist,
    /// without `.wasm` (clean_temperature, clean_temperature_py,
    /// clean_temperature_js). Several, for `restart` only: it deploys
    /// `--restart-copies` of each.
    #[arg(long, value_delimiter = ',', default_value = "clean_temperature")]
    function: Vec<String>,
    /// `restart`: deployed copies of each `--function`.
    #[arg(long, default_value_t = 10)]
    restart_copies: usize,
    /// Measurements in each of the deploy and restart scenarios.
    #[arg(long, default_value_t = 10)]
    samples: usize,
    /// Gateway processes in the fleet scenario.
    #[arg(long, default_value_t = 20)]
    gateways: usize,
    /// Give the device-side Mosquitto `max_queued_messages N` instead of
    /// its stock limit of 1000 (0 means no limit in Mosquitto's terms).
    #[arg(long)]
    max_queued_messages: Option<u64>,
    /// How long arrivals may stall before a run is declared over.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    stall: Duration,
    /// Leave the device-side Mosquitto's `set_tcp_nodelay` at its default
    /// (false) instead of the recommended true.
    #[arg(long)]
    nagle: bool,
    /// `durability` for edgefn's buffer: full or relaxed.
    #[arg(long, default_value = "full")]
    durability: String,
    /// Run the chosen scenarios this many times, interleaved, and print the
    /// median of each figure (the rate as median, min–max; "vs bridge" as
    /// the median of each round's ratio): one run varies by tens of percent
    /// on a shared machine.
    #[arg(long, default_value_t = 1)]
    rounds: usize,
    /// Measured window of each `wear` row (after a 5 s warm-up).
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    wear_for: Duration,
    /// `wear`: trace the daemon's writes and syncs with strace (fsyncs per
    /// second, and which file the bytes go to; slows the daemon).
    #[arg(long)]
    wear_strace: bool,
    /// `wear`: run only these rows (numbered from 1 as printed).
    #[arg(long, value_delimiter = ',')]
    wear_rows: Vec<usize>,
}

fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

/// A child process killed on drop.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Arrivals at the cloud broker.
#[derive(Default)]
struct Arrivals {
    /// Messages received.
    count: AtomicU64,
    /// `(arrival time, latency µs)`, for the current run.
    samples: Mutex<Vec<(Instant, u64)>>,
}

/// Subscribes to `site/#` on the cloud broker; returns once subscribed.
async fn cloud_subscriber(port: u16, arrivals: Arc<Arrivals>) -> tokio::task::JoinHandle<()> {
    let mut o = MqttOptions::new(format!("bench-cloud-{port}"), "127.0.0.1", port);
    o.set_keep_alive(Duration::from_secs(60));
    o.set_max_packet_size(Some(1 << 20));
    let (client, mut events) = AsyncClient::new(o, 100);
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
    let task = tokio::spawn(async move {
        let mut ready = Some(ready_tx);
        loop {
            match events.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    let _ = client.subscribe("site/#", QoS::AtLeastOnce).await;
                }
                Ok(Event::Incoming(Packet::SubAck(_))) => {
                    if let Some(r) = ready.take() {
                        let _ = r.send(());
                    }
                }
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    let now = now_us();
                    let ts = ts_of(&p.payload);
                    arrivals.count.fetch_add(1, Ordering::Relaxed);
                    arrivals
                        .samples
                        .lock()
                        .unwrap()
                        .push((Instant::now(), now.saturating_sub(ts)));
                }
                Ok(_) => {}
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    });
    let _ = tokio::time::timeout(Duration::from_secs(30), ready_rx).await;
    task
}

/// The `ts_us` field of a payload (0 if absent).
fn ts_of(payload: &[u8]) -> u64 {
    let text = std::str::from_utf8(payload).unwrap_or("");
    text.split("\"ts_us\":")
        .nth(1)
        .and_then(|rest| {
            rest.split(|c: char| !c.is_ascii_digit())
                .next()
                .and_then(|n| n.parse().ok())
        })
        .unwrap_or(0)
}

/// Publishes `total` readings from `devices` connections to `port`, at
/// `rate` msg/s in total (0 = as fast as possible). Returns when all are
/// handed to the clients.
async fn load(
    dial: &Dial,
    port: u16,
    devices: usize,
    total: u64,
    rate: u64,
    tag: &str,
) -> anyhow::Result<()> {
    let per = total / devices as u64;
    let mut tasks = Vec::new();
    for d in 0..devices {
        let o = dial.options(format!("bench-{tag}-{d}"), port);
        let (client, mut events) = AsyncClient::new(o, 1000);
        let poller = tokio::spawn(async move {
            loop {
                if events.poll().await.is_err() {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        });
        tasks.push(tokio::spawn(async move {
            let topic = format!("sensors/dev{d}/temperature");
            let mut tick = (rate > 0).then(|| {
                tokio::time::interval(Duration::from_secs_f64(devices as f64 / rate as f64))
            });
            for i in 0..per {
                if let Some(t) = tick.as_mut() {
                    t.tick().await;
                }
                let payload = format!(
                    r#"{{"seq":{i},"temp_c":{:.2},"ts_us":{}}}"#,
                    20.0 + (i % 100) as f64 / 10.0,
                    now_us()
                );
                client
                    .publish(topic.clone(), QoS::AtLeastOnce, false, payload)
                    .await
                    .unwrap();
            }
            (client, poller)
        }));
    }
    let mut keep = VecDeque::new();
    for t in tasks {
        keep.push_back(t.await?);
    }
    // Keep the clients alive until the caller has seen every arrival.
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_secs(600)).await;
        drop(keep);
    });
    Ok(())
}

/// How long arrivals may stall before a run is declared over with losses
/// (a stock Mosquitto drops what exceeds its queues); `--stall`.
static STALL_MS: AtomicU64 = AtomicU64::new(5000);

/// Waits until `n` arrivals in total, or until none came for [`STALL_MS`];
/// returns the time of the last arrival.
async fn arrived(a: &Arrivals, n: u64) -> Instant {
    let mut last_count = 0;
    let mut last_change = Instant::now();
    loop {
        let c = a.count.load(Ordering::Relaxed);
        if c >= n {
            break;
        }
        if c != last_count {
            (last_count, last_change) = (c, Instant::now());
        } else if last_change.elapsed() > Duration::from_millis(STALL_MS.load(Ordering::Relaxed)) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    a.samples
        .lock()
        .unwrap()
        .last()
        .map_or(Instant::now(), |s| s.0)
}

/// One scenario's figures.
#[derive(Debug, Default)]
struct Figures {
    name: String,
    sent: u64,
    delivered: u64,
    rate: f64,
    p50_ms: f64,
    p99_ms: f64,
    latency_rate: f64,
    rss_mb: Option<f64>,
    bytes_per_msg: Option<f64>,
    /// edgefn's CPU time per message in the throughput run, µs: a figure
    /// far less noisy than msg/s on a shared machine.
    cpu_us_per_msg: Option<f64>,
    /// edgefn's context switches per message in the throughput run.
    switches_per_msg: Option<f64>,
}

fn percentile(sorted: &[u64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i] as f64 / 1000.0
}

/// A process's CPU time and its threads' context switches at one moment.
struct Usage {
    /// User + system time in clock ticks (`/proc/PID/stat`), threads that
    /// have exited included.
    cpu_ticks: u64,
    /// Context switches (voluntary + not) per live thread id.
    switches: std::collections::HashMap<u32, u64>,
}

/// Linux reports CPU times in units of `USER_HZ`, 100 on every
/// architecture it runs on.
const TICKS_PER_SECOND: f64 = 100.0;

impl Usage {
    fn of(pid: u32) -> Option<Usage> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        // After the command name (which may hold spaces) come the fields
        // from `state` (field 3) on; utime and stime are fields 14 and 15.
        let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
        let cpu_ticks =
            fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
        let mut switches = std::collections::HashMap::new();
        for task in std::fs::read_dir(format!("/proc/{pid}/task"))
            .ok()?
            .flatten()
        {
            let Some(tid) = task.file_name().to_str().and_then(|t| t.parse().ok()) else {
                continue;
            };
            let path = format!("{pid}/task/{tid}");
            // A thread may end between listing and reading: skip it.
            let count = |key| proc_value_at(&path, "status", key);
            if let (Some(v), Some(n)) = (
                count("voluntary_ctxt_switches:"),
                count("nonvoluntary_ctxt_switches:"),
            ) {
                switches.insert(tid, v + n);
            }
        }
        Some(Usage {
            cpu_ticks,
            switches,
        })
    }

    /// `(CPU µs, context switches)` since `before`; switches only of the
    /// threads alive at both moments (edgefn's long-lived ones).
    fn since(&self, before: &Usage) -> (f64, u64) {
        let cpu = self.cpu_ticks.saturating_sub(before.cpu_ticks) as f64 / TICKS_PER_SECOND * 1e6;
        let switches = self
            .switches
            .iter()
            .filter_map(|(tid, n)| Some(n.saturating_sub(*before.switches.get(tid)?)))
            .sum();
        (cpu, switches)
    }
}

fn proc_value(pid: u32, file: &str, key: &str) -> Option<u64> {
    proc_value_at(&pid.to_string(), file, key)
}

/// A number from `/proc/{path}/{file}`'s line starting with `key`.
fn proc_value_at(path: &str, file: &str, key: &str) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{path}/{file}")).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
}

/// Runs the throughput and latency runs against `device_port`, arrivals
/// counted on `cloud_port`.
async fn measure(
    args: &Args,
    name: &str,
    dial: &Dial,
    device_port: u16,
    cloud_port: u16,
    devices: usize,
    edgefn_pid: Option<u32>,
) -> anyhow::Result<Figures> {
    let arrivals = Arc::new(Arrivals::default());
    let sub = cloud_subscriber(cloud_port, arrivals.clone()).await;
    let written_before = edgefn_pid.and_then(|p| proc_value(p, "io", "write_bytes:"));

    let n = args.messages / devices as u64 * devices as u64;
    let usage_before = edgefn_pid.and_then(Usage::of);
    let start = Instant::now();
    load(dial, device_port, devices, n, 0, "tput").await?;
    let last = arrived(&arrivals, n).await;
    let delivered = arrivals.count.load(Ordering::Relaxed);
    let rate = delivered as f64 / (last - start).as_secs_f64();
    let usage = edgefn_pid
        .and_then(Usage::of)
        .zip(usage_before)
        .filter(|_| delivered > 0)
        .map(|(after, before)| {
            let (cpu_us, switches) = after.since(&before);
            (
                cpu_us / delivered as f64,
                switches as f64 / delivered as f64,
            )
        });

    arrivals.samples.lock().unwrap().clear();
    let m = (args.rate as f64 * args.latency_for.as_secs_f64()) as u64 / devices as u64
        * devices as u64;
    let started = Instant::now();
    load(dial, device_port, devices, m, args.rate, "lat").await?;
    let last = arrived(&arrivals, delivered + m).await;
    let delivered_lat = arrivals.count.load(Ordering::Relaxed) - delivered;
    let latency_rate = delivered_lat as f64 / (last - started).as_secs_f64();
    let mut lat: Vec<u64> = arrivals
        .samples
        .lock()
        .unwrap()
        .iter()
        .map(|s| s.1)
        .collect();
    lat.sort_unstable();

    let (rss_mb, bytes_per_msg) = match edgefn_pid {
        Some(pid) => (
            proc_value(pid, "status", "VmHWM:").map(|kb| kb as f64 / 1024.0),
            proc_value(pid, "io", "write_bytes:")
                .zip(written_before)
                .map(|(after, before)| (after - before) as f64 / (n + m) as f64),
        ),
        None => (None, None),
    };
    sub.abort();
    Ok(Figures {
        name: name.to_owned(),
        sent: n + m,
        delivered: delivered + delivered_lat,
        rate,
        p50_ms: percentile(&lat, 0.50),
        p99_ms: percentile(&lat, 0.99),
        latency_rate,
        rss_mb,
        bytes_per_msg,
        cpu_us_per_msg: usage.map(|u| u.0),
        switches_per_msg: usage.map(|u| u.1),
    })
}

/// `memory`: the daemon's resident memory started from the function's
/// artifact, and idle after bursts from `--devices` devices have warmed
/// every instance, at concurrency 2 and 6; what warming added at 6 beyond
/// what it added at 2, over 4, is the cost of one more warm instance.
async fn memory(args: &Args, module: &Path) -> anyhow::Result<()> {
    let mut rows = Vec::new();
    for concurrency in [2, 6] {
        let dir = tempfile::tempdir()?;
        let cloud = Mosquitto::cloud().await;
        let port = free_port();
        let mut file = edgefn_config(
            dir.path(),
            Local::Embedded(port),
            cloud.port,
            module,
            &args.durability,
        );
        file.functions[0].concurrency = Some(concurrency);
        let config = write_config(dir.path(), &file);
        // Once to compile; measured from the artifact, as a gateway runs
        // after its first start.
        let first = start_edgefn(&config)?;
        port_open(port).await;
        drop(first);
        let e = start_edgefn(&config)?;
        port_open(port).await;
        let idle = proc_value(e.0.id(), "status", "VmRSS:").unwrap_or(0);
        for round in 0..3 {
            load(
                &Dial::default(),
                port,
                args.devices,
                args.messages,
                0,
                &format!("m{round}"),
            )
            .await?;
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
        let warm = proc_value(e.0.id(), "status", "VmRSS:").unwrap_or(0);
        eprintln!("  concurrency {concurrency}: RSS {idle} kB at start, {warm} kB warm");
        rows.push((concurrency, idle, warm));
    }
    println!(
        "| function | concurrency | RSS at start | RSS idle, instances warm |\n| --- | ---: | ---: | ---: |"
    );
    let name = module.file_stem().unwrap_or_default().to_string_lossy();
    for (c, idle, warm) in &rows {
        println!(
            "| {name} | {c} | {:.1} MB | {:.1} MB |",
            *idle as f64 / 1e3,
            *warm as f64 / 1e3
        );
    }
    // What warming added at 6 instances beyond what it added at 2.
    let added = |r: &(i64, u64, u64)| r.2 as f64 - r.1 as f64;
    let per = (added(&rows[1]) - added(&rows[0])) / 4.0 / 1e3;
    println!("\none more warm instance: {per:.1} MB");
    Ok(())
}

/// The daemon's configuration in `dir`: gateway `bench`, device messages
/// from `local`, upstream at `cloud_port` (prefix `site/bench/`), the
/// buffer with `durability`, clean-temperature (`module`, UNIT=F, 100 ms,
/// concurrency 2).
fn edgefn_config(
    dir: &Path,
    local: Local,
    cloud_port: u16,
    module: &Path,
    durability: &str,
) -> ConfigFile {
    let mut local = testkit::local_table(local);
    local.max_message_size = None;
    local.client_id = None;
    ConfigFile {
        gateway: testkit::GatewayTable {
            id: "bench".into(),
            data_dir: Some(dir.join("data").display().to_string()),
        },
        local,
        upstream: Some(testkit::UpstreamTable {
            topic_prefix: Some("site/bench/".into()),
            ..testkit::upstream(cloud_port)
        }),
        buffer: testkit::BufferTable {
            durability: Some(durability.into()),
            ..Default::default()
        },
        functions: vec![testkit::FunctionManifest {
            name: "clean-temperature".into(),
            module: Some(module.display().to_string()),
            triggers: vec!["sensors/+/temperature".into()],
            env: [("UNIT".to_owned(), "F".to_owned())].into(),
            timeout: Some("100ms".into()),
            concurrency: Some(2),
            ..Default::default()
        }],
        ..Default::default()
    }
}

fn start_edgefn(config: &Path) -> anyhow::Result<Proc> {
    let exe = testkit::binary();
    let child = Command::new(&exe)
        .args(["run", "--config"])
        .arg(config)
        .env(
            "EDGEFN_LOG",
            std::env::var("EDGEFN_BENCH_LOG").unwrap_or_else(|_| {
                "warn,edgefn::runtime::host=error,rmqtt=error,rmqtt_net=error".into()
            }),
        )
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .with_context(|| format!("start {}", exe.display()))?;
    Ok(Proc(child))
}

/// Device-side Mosquitto settings: the queue limit asked for, and
/// `set_tcp_nodelay true` as docs/DELIVERY.md recommends (without it,
/// Mosquitto's sends to edgefn wait under Nagle's algorithm for the TCP ack
/// of the previous one, which edgefn's PUBACK carries only after the
/// commit); `--nagle` leaves Mosquitto's default.
fn device_side_conf(args: &Args) -> String {
    let mut lines = args
        .max_queued_messages
        .map(|n| format!("max_queued_messages {n}\n"))
        .unwrap_or_default();
    if !args.nagle {
        lines.push_str("set_tcp_nodelay true\n");
    }
    // Extra mosquitto.conf lines for the device side, for diagnosis
    // (e.g. `log_dest file /tmp/local.log` and `log_type all`).
    if let Ok(extra) = std::env::var("EDGEFN_BENCH_LOCAL_CONF") {
        lines.push_str(&extra.replace("\\n", "\n"));
        lines.push('\n');
    }
    lines
}

async fn scenario(args: &Args, which: &str, module: &Path) -> anyhow::Result<Figures> {
    let dir = tempfile::tempdir()?;
    // The stand-in cloud must not drop what reaches it (a stock Mosquitto
    // drops beyond 1000 queued messages for a subscriber that falls
    // behind, the bench's own at tens of thousands of msg/s): testkit's
    // cloud queues without bound.
    let cloud = Mosquitto::cloud().await;
    let cloud_port = cloud.port;
    match which {
        "bridge" => {
            let bridge = format!(
                "{}connection bench-bridge\naddress 127.0.0.1:{cloud_port}\n\
                 topic sensors/# out 1 \"\" site/bridge/\ncleansession true\n",
                device_side_conf(args)
            );
            let local = Mosquitto::start_with_extra(&bridge).await;
            // Let the bridge connect before the clock starts.
            tokio::time::sleep(Duration::from_secs(1)).await;
            measure(
                args,
                "Mosquitto bridge (reference)",
                &Dial::default(),
                local.port,
                cloud_port,
                args.devices,
                None,
            )
            .await
        }
        "edgefn" => {
            let local = Mosquitto::start_with_extra(&device_side_conf(args)).await;
            let file = edgefn_config(
                dir.path(),
                Local::Broker(local.url()),
                cloud_port,
                module,
                &args.durability,
            );
            let metrics = free_port();
            let mut file = file;
            testkit::ConfigFileExt::metrics_on(&mut file, metrics);
            let e = start_edgefn(&write_config(dir.path(), &file))?;
            // Serving once its metrics answer (after the functions load, a
            // component's compile included); then its subscription.
            let deadline = std::time::Instant::now() + Duration::from_secs(300);
            while testkit::metrics::try_get(metrics, "/metrics.json").is_err() {
                anyhow::ensure!(std::time::Instant::now() < deadline, "edgefn never served");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
            measure(
                args,
                "edgefn via Mosquitto",
                &Dial::default(),
                local.port,
                cloud_port,
                args.devices,
                Some(e.0.id()),
            )
            .await
        }
        "embedded-1" | "embedded-n" => {
            let port = free_port();
            let file = edgefn_config(
                dir.path(),
                Local::Embedded(port),
                cloud_port,
                module,
                &args.durability,
            );
            let e = start_edgefn(&write_config(dir.path(), &file))?;
            port_open(port).await;
            let devices = if which == "embedded-1" {
                1
            } else {
                args.devices
            };
            let name = format!("edgefn embedded broker, {devices} device(s)");
            let dial = Dial::default();
            measure(
                args,
                &name,
                &dial,
                port,
                cloud_port,
                devices,
                Some(e.0.id()),
            )
            .await
        }
        "embedded-tls" => {
            // The same, over the TLS listener (the broker's certificate only).
            let pki = testkit::Pki::new();
            let (port, tls_port) = (free_port(), free_port());
            let mut file = edgefn_config(
                dir.path(),
                Local::Embedded(port),
                cloud_port,
                module,
                &args.durability,
            );
            connect::tls_listener(&mut file, &pki, tls_port, false);
            let e = start_edgefn(&write_config(dir.path(), &file))?;
            port_open(tls_port).await;
            let dial = connect::tls_dial(&pki, false);
            let name = format!(
                "edgefn embedded broker over TLS, {} device(s)",
                args.devices
            );
            let pid = Some(e.0.id());
            measure(args, &name, &dial, tls_port, cloud_port, args.devices, pid).await
        }
        other => bail!("unknown scenario {other}"),
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    STALL_MS.store(args.stall.as_millis() as u64, Ordering::Relaxed);
    let modules: Vec<PathBuf> = args
        .function
        .iter()
        .map(|f| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(format!("../functions/dist/{f}.wasm"))
        })
        .collect();
    for m in &modules {
        anyhow::ensure!(
            m.exists(),
            "{} missing: run functions/build.sh",
            m.display()
        );
    }
    let module = modules[0].clone();
    let all = ["bridge", "edgefn", "embedded-1", "embedded-n"];
    let chosen: Vec<&str> = if args.only.is_empty() {
        all.to_vec()
    } else {
        args.only.iter().map(String::as_str).collect()
    };
    if chosen.contains(&"wear") {
        anyhow::ensure!(chosen.len() == 1, "run the wear scenario on its own");
        return wear::run(&module, &args).await;
    }
    if chosen.contains(&"memory") {
        anyhow::ensure!(chosen.len() == 1, "run the memory scenario on its own");
        return memory(&args, &module).await;
    }
    if chosen.contains(&"connect") {
        anyhow::ensure!(chosen.len() == 1, "run the connect scenario on its own");
        return connect::run(&module, args.samples.max(1) * 100).await;
    }
    let deploys = ["deploy", "restart", "fleet"];
    if chosen.iter().any(|c| deploys.contains(c)) {
        anyhow::ensure!(
            chosen.iter().all(|c| deploys.contains(c)),
            "run the deploy scenarios ({}) apart from the throughput ones",
            deploys.join(", ")
        );
        println!("| scenario | figure | | |\n| --- | --- | --- | --- |");
        for which in chosen {
            eprintln!("running {which} ...");
            fleet::run(
                which,
                &modules,
                args.samples,
                args.gateways,
                args.restart_copies,
            )
            .await?;
        }
        return Ok(());
    }
    // rounds[r][s]: round r of scenario s.
    let mut rounds: Vec<Vec<Figures>> = Vec::new();
    for round in 1..=args.rounds.max(1) {
        let mut results = Vec::new();
        for which in &chosen {
            eprintln!("round {round}: running {which} ...");
            let f = scenario(&args, which, &module).await?;
            eprintln!("  {f:?}");
            results.push(f);
        }
        rounds.push(results);
    }
    let bridge = chosen.iter().position(|w| *w == "bridge");
    println!(
        "\n{} messages per throughput run, {} devices, latency at {} msg/s for {:?}, durability {}, device-side Mosquitto queues {}, set_tcp_nodelay {}{}\n",
        args.messages,
        args.devices,
        args.rate,
        args.latency_for,
        args.durability,
        args.max_queued_messages
            .map_or("stock (max_queued_messages 1000)".to_owned(), |n| {
                format!("max_queued_messages {n}")
            }),
        !args.nagle,
        if rounds.len() > 1 {
            format!(", median of {} interleaved rounds", rounds.len())
        } else {
            String::new()
        }
    );
    println!(
        "| scenario | delivered / sent | msg/s | vs bridge | p50 ms | p99 ms | achieved msg/s in latency run | peak RSS MB | disk bytes/msg | CPU µs/msg | switches/msg |"
    );
    println!("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |");
    for s in 0..chosen.len() {
        let runs: Vec<&Figures> = rounds.iter().map(|r| &r[s]).collect();
        let med = |get: &dyn Fn(&Figures) -> Option<f64>| {
            median(runs.iter().filter_map(|f| get(f)).collect())
        };
        let opt = |get: &dyn Fn(&Figures) -> Option<f64>, digits: usize| {
            med(get).map_or(String::new(), |v| format!("{v:.digits$}"))
        };
        let rates: Vec<f64> = runs.iter().map(|f| f.rate).collect();
        let rate = if runs.len() > 1 {
            let lo = rates.iter().copied().fold(f64::INFINITY, f64::min);
            let hi = rates.iter().copied().fold(0.0, f64::max);
            format!(
                "{:.0} ({lo:.0}–{hi:.0})",
                med(&|f| Some(f.rate)).unwrap_or(0.0)
            )
        } else {
            format!("{:.0}", rates[0])
        };
        // Each round's rate against that round's bridge: the machine's
        // speed drifts between rounds, a pair of neighbouring runs less so.
        let vs_bridge =
            bridge.and_then(|b| median(rounds.iter().map(|r| r[s].rate / r[b].rate).collect()));
        println!(
            "| {} | {} / {} | {rate} | {} | {} | {} | {} | {} | {} | {} | {} |",
            runs[0].name,
            runs.iter().map(|f| f.delivered).sum::<u64>(),
            runs.iter().map(|f| f.sent).sum::<u64>(),
            vs_bridge.map_or("".into(), |v| format!("{:.0} %", 100.0 * v)),
            opt(&|f| Some(f.p50_ms), 2),
            opt(&|f| Some(f.p99_ms), 2),
            opt(&|f| Some(f.latency_rate), 0),
            opt(&|f| f.rss_mb, 1),
            opt(&|f| f.bytes_per_msg, 0),
            opt(&|f| f.cpu_us_per_msg, 1),
            opt(&|f| f.switches_per_msg, 2),
        );
    }
    Ok(())
}

/// The median of the finite values (the mean of the middle two for an even
/// count); `None` if there are none (a run without samples gives NaN).
fn median(mut v: Vec<f64>) -> Option<f64> {
    v.retain(|x| x.is_finite());
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let m = v.len() / 2;
    Some(if v.len() % 2 == 1 {
        v[m]
    } else {
        (v[m - 1] + v[m]) / 2.0
    })
}
