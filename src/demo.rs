//! `edgefn demo`: the whole data flow on one machine, with nothing to set up.
//!
//! It starts a stand-in cloud broker (a second embedded broker), writes a
//! gateway configuration using the built-in device broker and the example
//! function `clean-temperature`, runs the gateway, and connects simulated
//! devices that publish temperature readings (some of them garbage, which
//! the function drops). Once a second it prints what each hop has counted.
//! Midway the cloud goes away for a while: readings keep being
//! acknowledged and pile up in the SQLite buffer, then drain when it is back.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::Packet;
use rumqttc::v5::{AsyncClient, Event, MqttOptions};
use tokio::sync::mpsc;

use crate::config::Config;
use crate::gateway::Gateway;
use crate::ingest::embedded::EmbeddedBroker;
use crate::registry::Registry;

/// What `edgefn demo` runs.
#[derive(Debug, Clone)]
pub struct DemoOptions {
    /// The function module to run.
    pub module: PathBuf,
    /// Where the demo keeps its configuration and database.
    pub data_dir: PathBuf,
    /// Simulated devices.
    pub devices: usize,
    /// Readings per second per device.
    pub rate: f64,
    /// When the cloud goes away (after start), if at all.
    pub outage_after: Option<Duration>,
    /// How long it stays away.
    pub outage_for: Duration,
    /// Stop after this long (Ctrl-C stops earlier).
    pub duration: Option<Duration>,
}

/// Counters of the demo's own clients.
#[derive(Default)]
struct Counts {
    /// Readings devices published and got a PUBACK for.
    sent: AtomicU64,
    /// Records the stand-in cloud received.
    arrived: AtomicU64,
}

/// Runs the demo until Ctrl-C or the duration passes.
///
/// Fails if the module is missing or a broker cannot start.
pub async fn run(opts: DemoOptions) -> anyhow::Result<()> {
    let module = std::fs::canonicalize(&opts.module).with_context(|| {
        format!(
            "{} not found; build the example functions with functions/build.sh",
            opts.module.display()
        )
    })?;
    std::fs::create_dir_all(&opts.data_dir)?;
    let data_dir = std::fs::canonicalize(&opts.data_dir)?;
    // Each demo starts from an empty buffer, so its counts add up.
    let _ = std::fs::remove_dir_all(data_dir.join("data"));

    let mut cloud = start_cloud("127.0.0.1:0".parse()?).await?;
    let cloud_addr = cloud.local_addr();
    let config_path = data_dir.join("edgefn-demo.toml");
    std::fs::write(
        &config_path,
        format!(
            r#"# Written by `edgefn demo`.
[gateway]
id = "demo-pi"
data_dir = "{data}"

[local]
embedded = true
listen = "127.0.0.1:0"

[upstream]
url = "mqtt://{cloud_addr}"
topic_prefix = "site/demo-pi/"

[buffer]
max_size = "64MiB"

[[functions]]
name = "clean-temperature"
module = "{module}"
triggers = ["sensors/+/temperature"]
env = {{ UNIT = "F" }}
memory_limit = "16MiB"
timeout = "100ms"
concurrency = 2
"#,
            data = data_dir.join("data").display(),
            module = module.display(),
        ),
    )?;
    let config = Config::load(&config_path)?;
    let gateway = Gateway::start(config).await?;
    let device_addr = gateway
        .local_broker_addr()
        .context("the demo gateway has no embedded broker")?;

    println!("edgefn demo");
    println!("  config        {}", config_path.display());
    println!("  device broker mqtt://{device_addr} (built into edgefn)");
    println!("  cloud broker  mqtt://{cloud_addr} (stand-in)");
    println!(
        "  {} simulated devices, {} readings/s each; about 1 in 10 is garbage the function drops",
        opts.devices, opts.rate
    );
    println!("  Ctrl-C to stop\n");

    let counts = Arc::new(Counts::default());
    let mut tasks = Vec::new();
    tasks.push(tokio::spawn(cloud_subscriber(cloud_addr, counts.clone())));
    for d in 0..opts.devices {
        tasks.push(tokio::spawn(device(
            d,
            device_addr,
            opts.rate,
            counts.clone(),
        )));
    }

    let started = Instant::now();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut cloud_down_since: Option<Instant> = None;
    println!(
        "{:>5}  {:>8} {:>8} {:>8} {:>8} {:>9} {:>8}  cloud",
        "t", "acked", "received", "kept", "dropped", "buffered", "arrived"
    );
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = tokio::signal::ctrl_c() => break,
        }
        let t = started.elapsed();
        if opts.duration.is_some_and(|d| t >= d) {
            break;
        }
        if let Some(after) = opts.outage_after
            && cloud_down_since.is_none()
            && t >= after
            && t < after + opts.outage_for
        {
            cloud.shutdown().await;
            cloud = Cloud::Down;
            cloud_down_since = Some(Instant::now());
            println!(
                "       -- the cloud broker goes away; edgefn keeps acknowledging devices and buffers --"
            );
        }
        if let Some(since) = cloud_down_since
            && since.elapsed() >= opts.outage_for
            && cloud.is_dead()
        {
            cloud = start_cloud(cloud_addr).await?;
            println!("       -- the cloud broker is back; the buffer drains in order --");
        }
        let m = gateway.metrics();
        let buffered = m
            .records_buffered
            .saturating_sub(m.forwarded + m.dropped_records + m.upstream_rejected);
        println!(
            "{:>4}s  {:>8} {:>8} {:>8} {:>8} {:>9} {:>8}  {}",
            t.as_secs(),
            counts.sent.load(Ordering::Relaxed),
            m.received,
            m.records_buffered,
            m.committed
                .saturating_sub(m.records_buffered + m.dead_letters),
            buffered,
            counts.arrived.load(Ordering::Relaxed),
            if cloud.is_dead() { "down" } else { "up" },
        );
    }
    for t in tasks {
        t.abort();
    }
    gateway.shutdown().await;
    cloud.shutdown().await;
    println!(
        "\nrun it yourself: edgefn run --config {}",
        config_path.display()
    );
    Ok(())
}

/// The stand-in cloud: an embedded broker with no functions.
enum Cloud {
    /// Running.
    Up(Box<EmbeddedBroker>),
    /// Away (the outage).
    Down,
}

impl Cloud {
    fn local_addr(&self) -> SocketAddr {
        match self {
            Cloud::Up(b) => b.local_addr(),
            Cloud::Down => unreachable!("asked a stopped cloud for its address"),
        }
    }
    fn is_dead(&self) -> bool {
        matches!(self, Cloud::Down)
    }
    async fn shutdown(self) {
        if let Cloud::Up(b) = self {
            b.shutdown().await;
        }
    }
}

async fn start_cloud(addr: SocketAddr) -> anyhow::Result<Cloud> {
    // Nothing is ever routed to a function: the channel stays empty.
    let (tx, _rx) = mpsc::channel(1);
    let metrics = Arc::new(crate::metrics::Metrics::default());
    let broker =
        EmbeddedBroker::start(addr, 1 << 20, Arc::new(Registry::default()), tx, metrics).await?;
    Ok(Cloud::Up(Box::new(broker)))
}

/// Counts everything arriving at the cloud, reconnecting across outages.
async fn cloud_subscriber(addr: SocketAddr, counts: Arc<Counts>) {
    loop {
        let mut o = MqttOptions::new("demo-cloud-app", addr.ip().to_string(), addr.port());
        o.set_keep_alive(Duration::from_secs(30));
        let (client, mut events) = AsyncClient::new(o, 16);
        loop {
            match events.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    let _ = client.subscribe("site/#", QoS::AtLeastOnce).await;
                }
                Ok(Event::Incoming(Packet::Publish(_))) => {
                    counts.arrived.fetch_add(1, Ordering::Relaxed);
                }
                Ok(_) => {}
                Err(_) => break,
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// One simulated device: publishes readings at `rate`, QoS 1.
async fn device(n: usize, addr: SocketAddr, rate: f64, counts: Arc<Counts>) {
    let id = format!("sensor-{n:02}");
    let mut o = MqttOptions::new(&id, addr.ip().to_string(), addr.port());
    o.set_keep_alive(Duration::from_secs(30));
    let (client, mut events) = AsyncClient::new(o, 64);
    let counts2 = counts.clone();
    tokio::spawn(async move {
        loop {
            match events.poll().await {
                Ok(Event::Incoming(Packet::PubAck(_))) => {
                    counts2.sent.fetch_add(1, Ordering::Relaxed);
                }
                Ok(_) => {}
                Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        }
    });
    let topic = format!("sensors/{id}/temperature");
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / rate.max(0.1)));
    let mut seq = 0u64;
    loop {
        tick.tick().await;
        seq += 1;
        let payload = match fastrand::u8(0..20) {
            0 => "sensor fault".to_owned(),
            1 => format!(
                r#"{{"seq":{seq},"temp_c":{}}}"#,
                150.0 + fastrand::f64() * 50.0
            ),
            _ => format!(
                r#"{{"seq":{seq},"temp_c":{:.2}}}"#,
                18.0 + n as f64 + fastrand::f64() * 4.0
            ),
        };
        if client
            .publish(topic.clone(), QoS::AtLeastOnce, false, payload)
            .await
            .is_err()
        {
            return;
        }
    }
}
