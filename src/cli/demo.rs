//! `edgefn demo`: the whole data flow on one machine, with nothing to set up.
//!
//! It starts a stand-in cloud broker (a second embedded broker), writes a
//! gateway configuration using the built-in device broker and the example
//! function `clean-temperature`, runs the gateway, and connects simulated
//! devices that publish temperature readings (some of them garbage, which
//! the function drops). Once a second it prints what each hop has counted.
//! Midway the cloud goes away for a while: readings keep being
//! acknowledged and pile up in the SQLite buffer, then drain when it is back.
//!
//! The function is not in the configuration: it is deployed as a fleet
//! engineer would, a bundle signed with a key made for the demo and
//! published on the stand-in cloud (version 1 before the devices start,
//! version 2 midway, while readings flow); the table shows which version
//! runs.

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

use edgefn::config::Config;
use edgefn::gateway::Gateway;
use edgefn::ingest::embedded::EmbeddedBroker;
use edgefn::registry::Registry;

/// `edgefn demo`'s arguments.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The function to run on the readings.
    #[arg(long, default_value = "functions/dist/clean_temperature.wasm")]
    module: PathBuf,
    /// Where to keep the demo's config and database.
    #[arg(long, default_value = "edgefn-demo")]
    data_dir: PathBuf,
    /// Simulated devices.
    #[arg(long, default_value_t = 5)]
    devices: usize,
    /// Readings per second per device.
    #[arg(long, default_value_t = 20.0)]
    rate: f64,
    /// When the cloud broker goes away ("0s" for never).
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    outage_after: std::time::Duration,
    /// How long it stays away.
    #[arg(long, default_value = "8s", value_parser = humantime::parse_duration)]
    outage_for: std::time::Duration,
    /// When version 2 of the function is pushed, signed, through the
    /// cloud broker ("0s" for never).
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    upgrade_after: std::time::Duration,
    /// Stop after this long (default: until Ctrl-C).
    #[arg(long, value_parser = humantime::parse_duration)]
    duration: Option<std::time::Duration>,
}

/// Runs the demo as `args` say, until its duration or Ctrl-C.
pub fn command(args: Args) -> anyhow::Result<std::process::ExitCode> {
    let opts = DemoOptions {
        module: args.module,
        data_dir: args.data_dir,
        devices: args.devices,
        rate: args.rate,
        outage_after: (!args.outage_after.is_zero()).then_some(args.outage_after),
        outage_for: args.outage_for,
        upgrade_after: (!args.upgrade_after.is_zero()).then_some(args.upgrade_after),
        duration: args.duration,
    };
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(run(opts))?;
    Ok(std::process::ExitCode::SUCCESS)
}

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
    /// When version 2 of the function is deployed (after start), if at all.
    pub upgrade_after: Option<Duration>,
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
    let key_path = data_dir.join("data/fleet.key");
    std::fs::create_dir_all(data_dir.join("data"))?;
    let public_key = crate::cli::fleet::keygen(&key_path)?;
    let key = crate::cli::fleet::read_signing_key(&key_path)?;
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

# Functions come as signed bundles over the cloud broker (docs/DEPLOY.md).
[deploy]
trusted_keys = ["{public_key}"]
"#,
            data = data_dir.join("data").display(),
        ),
    )?;
    let config = Config::load(&config_path)?;
    let gateway = Gateway::start(config).await?;
    let device_addr = gateway
        .local_broker_addr()
        .context("the demo gateway has no embedded broker")?;
    let deploy = Deploy {
        module,
        key,
        cloud: cloud_addr,
        registry: gateway.registry().clone(),
    };
    let ms = deploy.push(1).await?;

    println!("edgefn demo");
    println!("  config        {}", config_path.display());
    println!("  device broker mqtt://{device_addr} (built into edgefn)");
    println!("  cloud broker  mqtt://{cloud_addr} (stand-in)");
    println!(
        "  {} simulated devices, {} readings/s each; about 1 in 10 is garbage the function drops",
        opts.devices, opts.rate
    );
    println!(
        "  clean-temperature v1 deployed through the cloud broker, signed: running {ms} ms after it was published"
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
    let mut upgrade_after = opts.upgrade_after;
    let mut upgrade: Option<tokio::task::JoinHandle<anyhow::Result<u128>>> = None;
    println!(
        "{:>5}  {:>8} {:>8} {:>8} {:>8} {:>9} {:>8}  cloud  function",
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
        if upgrade_after.take_if(|after| t >= *after).is_some() {
            let deploy = deploy.clone();
            upgrade = Some(tokio::spawn(async move { deploy.push(2).await }));
            println!(
                "       -- clean-temperature v2 (UNIT=C) pushed through the cloud broker, signed; devices keep publishing --"
            );
        }
        if let Some(done) = upgrade.take_if(|u| u.is_finished()) {
            println!("{}", upgraded(done.await?));
        }
        let running = gateway
            .registry()
            .table()
            .get("clean-temperature")
            .map_or("none".to_owned(), |f| format!("v{}", f.version()));
        let m = gateway.metrics();
        let buffered = m
            .records_buffered
            .saturating_sub(m.forwarded + m.dropped_records + m.upstream_rejected);
        println!(
            "{:>4}s  {:>8} {:>8} {:>8} {:>8} {:>9} {:>8}  {:<5}  {running}",
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
    // An upgrade still being applied is seen through.
    if let Some(u) = upgrade {
        println!("{}", upgraded(u.await?));
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

/// The table's line on the upgrade's outcome.
fn upgraded(outcome: anyhow::Result<u128>) -> String {
    match outcome {
        Ok(ms) => format!("       -- v2 runs on demo-pi, {ms} ms after it was published --"),
        Err(e) => format!("       -- v2 was not applied: {e:#} --"),
    }
}

/// Deploys clean-temperature to the demo gateway through the cloud.
#[derive(Clone)]
struct Deploy {
    /// The module.
    module: PathBuf,
    /// The demo's fleet key.
    key: ed25519_dalek::SigningKey,
    /// The stand-in cloud broker.
    cloud: SocketAddr,
    /// What the gateway runs.
    registry: Arc<Registry>,
}

impl Deploy {
    /// Publishes `version` (v1: `UNIT=F`, later ones `UNIT=C`) and waits
    /// until the gateway runs it; returns how long that took (ms). The
    /// stand-in cloud keeps retained messages only while it runs, and it
    /// goes away in the demo, so a bundle published before an outage can
    /// be lost: it is published again (the same version twice changes
    /// nothing).
    async fn push(&self, version: u64) -> anyhow::Result<u128> {
        use crate::cli::fleet::{DeployRequest, Publish};
        use edgefn::bundle::Targets;
        let manifest = edgefn::config::FunctionManifest {
            name: "clean-temperature".into(),
            triggers: vec!["sensors/+/temperature".into()],
            env: [(
                "UNIT".to_owned(),
                if version == 1 { "F" } else { "C" }.to_owned(),
            )]
            .into(),
            memory_limit: Some("16MiB".into()),
            timeout: Some("100ms".into()),
            concurrency: Some(2),
            ..Default::default()
        };
        let targets = Targets {
            gateways: vec!["demo-pi".into()],
            groups: vec![],
        };
        let request = DeployRequest {
            manifest,
            module: Some(self.module.clone()),
            release: crate::cli::fleet::Release {
                version,
                min_version: None,
                expires_ms: Some(edgefn::clock::now_ms() + 86_400_000),
                targets: targets.clone(),
            },
        };
        let key = self.key.clone();
        let bundle = tokio::task::spawn_blocking(move || {
            crate::cli::fleet::deploy_bundle(request, Some(&key))
        })
        .await??;
        let publish = Publish {
            broker: edgefn::config::tool_broker(
                &format!("mqtt://{}", self.cloud),
                [None, None, None],
                None,
                None,
                format!("demo-deploy-{version}"),
            )
            .map_err(|p| anyhow::anyhow!("{p:?}"))?,
            name: "clean-temperature".into(),
            version,
            targets,
            wait: None,
        };
        let published = Instant::now();
        for _ in 0..30 {
            crate::cli::fleet::publish(&publish, bundle.clone()).await?;
            let attempt = Instant::now();
            while attempt.elapsed() < Duration::from_secs(1) {
                let table = self.registry.table();
                if table
                    .get("clean-temperature")
                    .is_some_and(|f| f.version() == version)
                {
                    return Ok(published.elapsed().as_millis());
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
        anyhow::bail!("the gateway did not take version {version} within 30 s (see its log)")
    }
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
    let metrics = Arc::new(edgefn::metrics::Metrics::default());
    let settings = edgefn::config::EmbeddedConfig {
        listen: addr,
        tls: None,
        // The stand-in cloud listens on loopback and takes anyone.
        access: edgefn::access::AccessFiles {
            allow_anonymous: true,
            ..Default::default()
        },
        limits: edgefn::config::BrokerLimits {
            memory_limit: 64 << 20,
            max_queued_bytes: 64 << 20,
            ..Default::default()
        },
    };
    let registry = Arc::new(Registry::default());
    let broker = EmbeddedBroker::start(&settings, 1 << 20, None, registry, tx, metrics).await?;
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
