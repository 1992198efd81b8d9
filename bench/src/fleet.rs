//! The deploy scenarios: how long a signed bundle takes to run, how long a
//! gateway with deployed functions takes to start, and a fleet of gateway
//! processes taking one deploy.
//!
//! Each drives the release binaries as a fleet engineer and a Pi would:
//! `edgefn keygen`, `edgefn deploy --wait`, `edgefn status` and
//! `edgefn run`, on private Mosquitto instances.
//!
//! - `deploy`: one gateway (embedded broker), its control connection on the
//!   stand-in cloud Mosquitto; `--samples` deploys of clean-temperature,
//!   each a new version. Deploy-to-active is what `edgefn deploy --wait`
//!   prints for the gateway: from the bundle's publication to the
//!   gateway's `active` report (received, verified, compiled, health
//!   check, persisted, swapped, reported). The command's own wall time
//!   (process start, connect, read the retained statuses) is beside it.
//! - `restart`: the same gateway with 10 deployed functions (ten distinct
//!   modules: clean-temperature with a custom section naming each), shut
//!   down and started `--samples` times with its precompiled artifacts and
//!   as many times without (the directory deleted before each start).
//!   Restart-to-ready is from spawning `edgefn run` to its embedded broker
//!   accepting a TCP connection, which it does only once every function is
//!   restored.
//! - `fleet`: `--gateways` gateway processes (default 20) on one local
//!   Mosquitto, each with its own id, database and control connection to
//!   one cloud Mosquitto, all in group `all`; one
//!   `edgefn deploy --group all --wait` until every one reports `active`,
//!   then `edgefn status` listing them.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};

use testkit::{ConfigFile, Daemon, Local, Mosquitto, free_port, write_config};

use super::median;

/// Runs `edgefn args…`; fails with its output unless it succeeds.
fn run_edgefn(args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new(testkit::binary())
        .args(args)
        .stdin(Stdio::null())
        .output()
        .context("run edgefn")?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    ensure!(
        out.status.success(),
        "edgefn {} failed ({}):\n{stdout}{}",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(stdout)
}

/// A fleet's signing key: `(key file, public key text)`.
fn keygen(dir: &Path) -> anyhow::Result<(PathBuf, String)> {
    let key = dir.join("fleet.key");
    let out = run_edgefn(&["keygen", "--out", &key.display().to_string()])?;
    let public = out
        .lines()
        .find(|l| l.starts_with("ed25519:"))
        .context("edgefn keygen printed no public key")?
        .to_owned();
    Ok((key, public))
}

/// One gateway's configuration file: no `[[functions]]`, `[deploy]` with
/// group `all` and `public` trusted, device messages from `local` (a
/// broker: as client `edgefn-<id>`), upstream and control connection on
/// the cloud broker.
fn gateway_config(dir: &Path, id: &str, local: Local, cloud_port: u16, public: &str) -> PathBuf {
    let mut local = testkit::local_table(local);
    local.max_message_size = None;
    if local.client_id.is_some() {
        local.client_id = Some(format!("edgefn-{id}"));
    }
    let file = ConfigFile {
        gateway: testkit::GatewayTable {
            id: id.into(),
            data_dir: Some(dir.join(id).display().to_string()),
        },
        local,
        upstream: Some(testkit::UpstreamTable {
            topic_prefix: Some(format!("site/{id}/")),
            ..testkit::upstream(cloud_port)
        }),
        deploy: Some(testkit::DeployTable {
            groups: vec!["all".into()],
            trusted_keys: vec![public.into()],
            ..Default::default()
        }),
        ..Default::default()
    };
    // One file per gateway, all in `dir`.
    let gateway_dir = dir.join(format!("{id}-config"));
    std::fs::create_dir_all(&gateway_dir).expect("a directory for the config");
    write_config(&gateway_dir, &file)
}

/// Starts `edgefn run` on `config`, its log (warnings) in a file beside it.
fn start_gateway(config: &Path) -> Daemon {
    Daemon::start_logging(config, "warn,rmqtt=error,rmqtt_net=error")
}

/// Stops a gateway as systemd does (SIGTERM) and waits for it to exit.
fn stop_gateway(mut gateway: Daemon) -> anyhow::Result<()> {
    let exit = gateway.terminate();
    ensure!(exit.success(), "edgefn run exited with {exit}");
    Ok(())
}

/// How long until something accepts a connection on `port`, polling
/// every 0.5 ms.
fn until_listening(port: u16, since: Instant) -> anyhow::Result<Duration> {
    let deadline = since + Duration::from_secs(60);
    loop {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return Ok(since.elapsed());
        }
        if Instant::now() > deadline {
            bail!("nothing listens on port {port}");
        }
        std::thread::sleep(Duration::from_micros(500));
    }
}

/// `edgefn status` on the cloud broker until `n` gateways are online.
fn until_online(cloud_port: u16, n: usize) -> anyhow::Result<String> {
    let broker = format!("mqtt://127.0.0.1:{cloud_port}");
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let out = run_edgefn(&["status", "--broker", &broker])?;
        if online(&out) >= n {
            return Ok(out);
        }
        if Instant::now() > deadline {
            bail!("fewer than {n} gateways online:\n{out}");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The gateways `edgefn status` printed as online.
fn online(status: &str) -> usize {
    status
        .lines()
        .skip(1)
        .filter(|l| l.split_whitespace().nth(1) == Some("yes"))
        .count()
}

/// What one `edgefn deploy --wait` printed: the reported milliseconds of
/// each gateway that reports `active`, and its wall time.
struct Deploy {
    active_ms: Vec<f64>,
    wall: Duration,
    output: String,
}

/// `edgefn deploy MODULE --name NAME … --group all --wait`.
fn deploy(module: &Path, name: &str, key: &Path, cloud_port: u16) -> anyhow::Result<Deploy> {
    let started = Instant::now();
    let output = run_edgefn(&[
        "deploy",
        &module.display().to_string(),
        "--name",
        name,
        "--trigger",
        &format!("sensors/+/{name}"),
        "--env",
        "UNIT=F",
        "--timeout",
        "100ms",
        "--signing-key",
        &key.display().to_string(),
        "--broker",
        &format!("mqtt://127.0.0.1:{cloud_port}"),
        "--group",
        "all",
        "--wait",
        "60s",
    ])?;
    let wall = started.elapsed();
    let active_ms = output
        .lines()
        .filter(|l| l.contains(" active "))
        .filter_map(|l| {
            let ms = l.rsplit_once('(')?.1.strip_suffix(" ms)")?;
            ms.parse().ok()
        })
        .collect();
    Ok(Deploy {
        active_ms,
        wall,
        output,
    })
}

/// `module` with a custom section `edgefn-bench` holding `tag`: the same
/// code under another SHA-256.
fn tagged(module: &[u8], tag: &str) -> Vec<u8> {
    fn leb(mut n: usize, out: &mut Vec<u8>) {
        loop {
            let b = (n & 0x7f) as u8;
            n >>= 7;
            if n == 0 {
                out.push(b);
                return;
            }
            out.push(b | 0x80);
        }
    }
    let name = b"edgefn-bench";
    let mut content = Vec::new();
    leb(name.len(), &mut content);
    content.extend_from_slice(name);
    content.extend_from_slice(tag.as_bytes());
    let mut out = module.to_vec();
    out.push(0);
    leb(content.len(), &mut out);
    out.extend_from_slice(&content);
    out
}

/// `median (min–max)` of `v`, in `unit`.
fn spread(v: &[f64], unit: &str) -> String {
    let lo = v.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = v.iter().copied().fold(0.0, f64::max);
    match median(v.to_vec()) {
        Some(m) => format!("{m:.0} {unit} ({lo:.0}–{hi:.0}, n = {})", v.len()),
        None => "no samples".into(),
    }
}

/// Runs one of `deploy`, `restart`, `fleet`, printing its figures.
pub async fn run(
    which: &str,
    modules: &[PathBuf],
    samples: usize,
    gateways: usize,
    copies: usize,
) -> anyhow::Result<()> {
    let module = modules[0].as_path();
    let dir = tempfile::tempdir()?;
    let cloud = Mosquitto::start().await;
    let cloud_port = cloud.port;
    let (key, public) = keygen(dir.path())?;
    let size = std::fs::metadata(module)?.len();
    match which {
        "deploy" | "restart" => {
            let port = free_port();
            let config = gateway_config(
                dir.path(),
                "pi-01",
                Local::Embedded(port),
                cloud_port,
                &public,
            );
            let gateway = start_gateway(&config);
            until_online(cloud_port, 1)?;
            if which == "deploy" {
                // The first deploy of these bytes compiles them; the next
                // versions (the same code) load the artifact it left.
                let mut active = Vec::new();
                let mut wall = Vec::new();
                for _ in 0..samples.max(2) {
                    let d = deploy(module, "clean-temperature", &key, cloud_port)?;
                    ensure!(d.active_ms.len() == 1, "not active:\n{}", d.output);
                    active.extend(d.active_ms);
                    wall.push(d.wall.as_secs_f64() * 1e3);
                }
                println!(
                    "| deploy-to-active, {} KB {}, 1 gateway | first (compiling) {:.0} ms; then from the artifact {} | edgefn deploy --wait wall time {} |",
                    size / 1000,
                    module.file_stem().unwrap_or_default().to_string_lossy(),
                    active[0],
                    spread(&active[1..], "ms"),
                    spread(&wall[1..], "ms"),
                );
                return stop_gateway(gateway);
            }
            let mut deployed = Vec::new();
            for module in modules {
                let bytes = std::fs::read(module)?;
                let stem = module.file_stem().unwrap_or_default().to_string_lossy();
                for i in 1..=copies {
                    let name = format!("fn-{}", deployed.len() + 1);
                    let m = dir.path().join(format!("{name}.wasm"));
                    std::fs::write(&m, tagged(&bytes, &i.to_string()))?;
                    let d = deploy(&m, &name, &key, cloud_port)?;
                    ensure!(d.active_ms.len() == 1, "not active:\n{}", d.output);
                    deployed.push(stem.clone());
                }
            }
            deployed.dedup();
            let total = copies * modules.len();
            stop_gateway(gateway)?;
            let artifacts = dir.path().join("pi-01/artifacts");
            for cached in [true, false] {
                let mut ready = Vec::new();
                for _ in 0..samples {
                    if !cached {
                        std::fs::remove_dir_all(&artifacts)?;
                    }
                    let started = Instant::now();
                    let gateway = start_gateway(&config);
                    ready.push(until_listening(port, started)?.as_secs_f64() * 1e3);
                    stop_gateway(gateway)?;
                }
                let files = std::fs::read_dir(&artifacts)?.count();
                ensure!(files == total, "{files} artifacts, not {total}");
                println!(
                    "| restart-to-ready, {total} deployed functions ({copies} × {}), {} | {} |",
                    deployed.join(", "),
                    if cached {
                        "precompiled artifacts"
                    } else {
                        "compiling (artifacts deleted)"
                    },
                    spread(&ready, "ms"),
                );
            }
            Ok(())
        }
        "fleet" => {
            let local = Mosquitto::start().await;
            let mut procs = Vec::new();
            for i in 1..=gateways {
                let id = format!("pi-{i:02}");
                let config = gateway_config(
                    dir.path(),
                    &id,
                    Local::Broker(local.url()),
                    cloud_port,
                    &public,
                );
                procs.push(start_gateway(&config));
            }
            until_online(cloud_port, gateways)?;
            let rss: u64 = procs
                .iter()
                .filter_map(|p| super::proc_value(p.child.id(), "status", "VmRSS:"))
                .sum();
            let d = deploy(module, "clean-temperature", &key, cloud_port)?;
            ensure!(
                d.active_ms.len() == gateways,
                "{} of {gateways} active:\n{}",
                d.active_ms.len(),
                d.output
            );
            let last = d.active_ms.iter().copied().fold(0.0, f64::max);
            let started = Instant::now();
            let status = until_online(cloud_port, gateways)?;
            let status_wall = started.elapsed();
            let listed = status
                .lines()
                .filter(|l| l.contains("clean-temperature v") && l.contains(" active"))
                .count();
            println!(
                "| fleet of {gateways} gateways, {} KB module, one deploy to group all | last gateway active after {last:.0} ms; each: {}; edgefn deploy --wait wall time {:.0} ms | edgefn status: {listed} of {gateways} listed running it, in {:.0} ms | RSS of the {gateways} gateways before the deploy: {:.0} MB |",
                size / 1000,
                spread(&d.active_ms, "ms"),
                d.wall.as_secs_f64() * 1e3,
                status_wall.as_secs_f64() * 1e3,
                rss as f64 / 1024.0,
            );
            for p in procs {
                stop_gateway(p)?;
            }
            Ok(())
        }
        other => bail!("unknown scenario {other}"),
    }
}
