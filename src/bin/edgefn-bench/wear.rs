//! SD-card wear: what edgefn writes to storage per reading at the steady,
//! low rates of a real site, and what that costs in fsyncs and PUBACK
//! latency.
//!
//! ```sh
//! target/release/edgefn-bench --only wear [--wear-for 30s]
//! ```
//!
//! Each row: fresh brokers and a fresh edgefn (clean-temperature, the
//! upstream connected), `devices` connections each publishing one ~50-byte
//! reading QoS 1 every `1 / rate` s, one at a time (the next after the
//! PUBACK, as a sensor does), for a warm-up of 5 s and then the measured
//! window. Over the window: `write_bytes` of the daemon's /proc/PID/io
//! (the 4 KiB file pages it dirtied, which writeback sends to the device:
//! SQLite's WAL and database, checkpoints included) per acknowledged
//! reading and per second; readings per commit; the daemon's commits per
//! second (from `/metrics.json`; each one fsyncs the WAL with
//! `durability = "full"`, and a checkpoint adds its own), or with
//! `--wear-strace` its fsync and fdatasync calls counted by `strace -f -c`
//! attached for the window (which slows every syscall: the latencies of
//! such a run are not the daemon's); the PUBACK latency each device saw,
//! p50 and p99 (with an external Mosquitto, Mosquitto's PUBACK); the
//! daemon's own live figure (`disk_bytes_per_message` of `/metrics.json`
//! at the end, over its last 5 minutes: warm-up included); and what the
//! whole block device holding the data directory took per reading
//! (/sys/dev/block/…/stat: every process on the machine, the file
//! system's journal included; meaningful only on an otherwise idle
//! machine). The last two rows set `[buffer] commit_delay = "20ms"`.

use std::time::{Duration, Instant};

use anyhow::Context;
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::Packet;
use rumqttc::v5::{AsyncClient, Event, MqttOptions};

use super::{ScratchDir, free_port, mosquitto, percentile, proc_value, wait_for_port};

/// One row: how the readings reach edgefn.
struct Row {
    /// Devices.
    devices: usize,
    /// Readings per second per device.
    rate: f64,
    /// Through an external Mosquitto (else the built-in broker).
    mosquitto: bool,
    /// `[buffer] commit_delay`, if set.
    commit_delay: Option<&'static str>,
}

const ROWS: [Row; 7] = [
    Row {
        devices: 20,
        rate: 5.0,
        mosquitto: false,
        commit_delay: None,
    },
    Row {
        devices: 1,
        rate: 20.0,
        mosquitto: false,
        commit_delay: None,
    },
    Row {
        devices: 200,
        rate: 1.0,
        mosquitto: false,
        commit_delay: None,
    },
    Row {
        devices: 20,
        rate: 5.0,
        mosquitto: true,
        commit_delay: None,
    },
    Row {
        devices: 1,
        rate: 20.0,
        mosquitto: true,
        commit_delay: None,
    },
    Row {
        devices: 20,
        rate: 5.0,
        mosquitto: false,
        commit_delay: Some("20ms"),
    },
    Row {
        devices: 200,
        rate: 1.0,
        mosquitto: false,
        commit_delay: Some("20ms"),
    },
];

/// What one row measured.
struct Wear {
    readings: u64,
    bytes: u64,
    /// Written to the whole block device holding the data directory
    /// (every process, the file system's journal included), if known.
    device_bytes: Option<u64>,
    secs: f64,
    syncs: Option<u64>,
    commits: u64,
    /// The daemon's own figure at the end (`disk_bytes_per_message`).
    live_per_reading: Option<f64>,
    puback_us: Vec<u64>,
}

/// The daemon's `/metrics.json` report.
fn report(metrics: u16) -> anyhow::Result<serde_json::Value> {
    use std::io::{Read as _, Write as _};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", metrics))?;
    write!(s, "GET /metrics.json HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")?;
    let mut response = String::new();
    s.read_to_string(&mut response)?;
    let body = response.split_once("\r\n\r\n").context("an HTTP answer")?.1;
    Ok(serde_json::from_str(body)?)
}

/// `gateway.counters.commit_batches`: transactions committed.
fn commits(metrics: u16) -> anyhow::Result<u64> {
    report(metrics)?["gateway"]["counters"]["commit_batches"]
        .as_u64()
        .context("commit_batches in the report")
}

/// Bytes written so far to the block device `path` is on, from
/// /sys/dev/block/MAJOR:MINOR/stat (sectors of 512 bytes); none for a
/// file system without one (tmpfs, overlay).
fn device_written(path: &std::path::Path) -> Option<u64> {
    use std::os::unix::fs::MetadataExt as _;
    let dev = std::fs::metadata(path).ok()?.dev();
    let major = ((dev >> 32) & 0xffff_f000) | ((dev >> 8) & 0xfff);
    let minor = ((dev >> 12) & 0xffff_ff00) | (dev & 0xff);
    let stat = std::fs::read_to_string(format!("/sys/dev/block/{major}:{minor}/stat")).ok()?;
    let sectors: u64 = stat.split_whitespace().nth(6)?.parse().ok()?;
    Some(sectors * 512)
}

/// One device: publishes a reading every `period`, each after the last
/// one's PUBACK, until `until`; returns the PUBACK latencies of the
/// readings sent from `from` on.
async fn device(
    port: u16,
    id: usize,
    period: Duration,
    from: Instant,
    until: Instant,
) -> anyhow::Result<Vec<u64>> {
    let mut o = MqttOptions::new(format!("wear-{id}"), "127.0.0.1", port);
    o.set_keep_alive(Duration::from_secs(60));
    let (client, mut events) = AsyncClient::new(o, 10);
    let topic = format!("sensors/d{id:03}/temperature");
    let mut latencies = Vec::new();
    // Spread the devices over the period.
    let mut next = Instant::now() + period.mul_f64((id as f64 * 0.618_034) % 1.0);
    let mut seq = 0u64;
    let mut sent: Option<Instant> = None;
    loop {
        if sent.is_none() {
            if next >= until {
                return Ok(latencies);
            }
            tokio::time::sleep_until(next.into()).await;
            seq += 1;
            let temp = 20.0 + (seq % 50) as f64 / 10.0;
            let payload = format!(r#"{{"seq":{seq},"temp_c":{temp:.1},"device":"d{id:03}"}}"#);
            client
                .publish(&topic, QoS::AtLeastOnce, false, payload)
                .await?;
            sent = Some(Instant::now());
            next += period;
        }
        match tokio::time::timeout(Duration::from_secs(30), events.poll()).await {
            Ok(Ok(Event::Incoming(Packet::PubAck(_)))) => {
                let at = sent.take().expect("a reading in flight");
                if at >= from {
                    latencies.push(at.elapsed().as_micros() as u64);
                }
            }
            Ok(Ok(_)) => {}
            Ok(Err(e)) => anyhow::bail!("device {id}: {e}"),
            Err(_) => anyhow::bail!("device {id}: no PUBACK within 30 s"),
        }
    }
}

async fn row(
    r: &Row,
    module: &std::path::Path,
    window: Duration,
    count_syncs: bool,
) -> anyhow::Result<Wear> {
    let dir = ScratchDir::new("wear")?;
    let cloud_port = free_port();
    let _cloud = mosquitto(dir.path(), cloud_port, "max_queued_messages 0\n")?;
    let metrics = free_port();
    let local_port = free_port();
    let (_local, local) = if r.mosquitto {
        let m = mosquitto(
            dir.path(),
            local_port,
            "max_queued_messages 0\nset_tcp_nodelay true\n",
        )?;
        (Some(m), format!("url = \"mqtt://127.0.0.1:{local_port}\""))
    } else {
        (
            None,
            format!("embedded = true\nlisten = \"127.0.0.1:{local_port}\""),
        )
    };
    let config = super::edgefn_config(
        dir.path(),
        &local,
        cloud_port,
        module,
        &match r.commit_delay {
            Some(d) => format!("durability = \"full\"\ncommit_delay = \"{d}\""),
            None => "durability = \"full\"".to_owned(),
        },
        &format!("[metrics]\nlisten = \"127.0.0.1:{metrics}\""),
    );
    let edgefn = super::start_edgefn(&config)?;
    wait_for_port(metrics)?;
    wait_for_port(local_port)?;
    let pid = edgefn.0.id();
    let warm_up = Duration::from_secs(5);
    let start = Instant::now();
    let from = start + warm_up;
    let until = from + window;
    let period = Duration::from_secs_f64(1.0 / r.rate);
    let devices: Vec<_> = (0..r.devices)
        .map(|id| tokio::spawn(device(local_port, id, period, from, until)))
        .collect();
    tokio::time::sleep_until(from.into()).await;
    let bytes_before = proc_value(pid, "io", "write_bytes:").context("/proc/PID/io")?;
    let device_before = device_written(dir.path());
    let commits_before = commits(metrics)?;
    // ptrace slows every syscall of the daemon: only when asked, and the
    // latencies of such a run are not the daemon's own.
    let strace = if count_syncs {
        Some(
            std::process::Command::new("strace")
                .args([
                    "-f",
                    "-c",
                    "-e",
                    "trace=fsync,fdatasync",
                    "-p",
                    &pid.to_string(),
                ])
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .context("start strace (apt-get install strace)")?,
        )
    } else {
        None
    };
    tokio::time::sleep_until(until.into()).await;
    let bytes_after = proc_value(pid, "io", "write_bytes:").context("/proc/PID/io")?;
    let device_after = device_written(dir.path());
    let commits_after = commits(metrics)?;
    let live_per_reading = report(metrics)?["gateway"]["disk_bytes_per_message"].as_f64();
    let syncs = match strace {
        Some(child) => {
            // SIGINT makes strace detach and print its summary.
            std::process::Command::new("kill")
                .args(["-INT", &child.id().to_string()])
                .status()?;
            let out = child.wait_with_output()?;
            let text = String::from_utf8_lossy(&out.stderr).into_owned();
            Some(
                text.lines()
                    .filter(|l| l.ends_with(" fsync") || l.ends_with(" fdatasync"))
                    .filter_map(|l| l.split_whitespace().nth(3)?.parse::<u64>().ok())
                    .sum(),
            )
        }
        None => None,
    };
    let mut puback_us = Vec::new();
    for d in devices {
        puback_us.extend(d.await??);
    }
    puback_us.sort_unstable();
    Ok(Wear {
        readings: puback_us.len() as u64,
        bytes: bytes_after.saturating_sub(bytes_before),
        device_bytes: device_before
            .zip(device_after)
            .map(|(b, a)| a.saturating_sub(b)),
        secs: window.as_secs_f64(),
        syncs,
        commits: commits_after.saturating_sub(commits_before),
        live_per_reading,
        puback_us,
    })
}

/// Runs every row and prints the table.
pub async fn run(
    module: &std::path::Path,
    window: Duration,
    count_syncs: bool,
) -> anyhow::Result<()> {
    println!(
        "| load | readings | bytes written per reading | readings per commit | bytes/s | GB/day | {} | PUBACK p50 ms | p99 ms | edgefn's own figure | device bytes per reading |",
        if count_syncs {
            "fsyncs/s (strace)"
        } else {
            "commits/s"
        }
    );
    println!("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |");
    for r in &ROWS {
        let how = format!(
            "{}{}",
            if r.mosquitto {
                ", via Mosquitto"
            } else {
                ", built-in broker"
            },
            r.commit_delay
                .map_or(String::new(), |d| format!(", commit_delay {d}"))
        );
        eprintln!(
            "running wear: {} device(s) x {}/s{how} ...",
            r.devices, r.rate
        );
        let w = row(r, module, window, count_syncs).await?;
        let per_second = w.bytes as f64 / w.secs;
        let readings = w.readings.max(1) as f64;
        println!(
            "| {} device(s) × {}/s ({}/s){how} | {} | {:.0} | {:.2} | {:.0} | {:.2} | {:.1} | {:.2} | {:.2} | {} | {} |",
            r.devices,
            r.rate,
            r.devices as f64 * r.rate,
            w.readings,
            w.bytes as f64 / readings,
            w.readings as f64 / w.commits.max(1) as f64,
            per_second,
            per_second * 86_400.0 / 1e9,
            w.syncs.unwrap_or(w.commits) as f64 / w.secs,
            percentile(&w.puback_us, 0.50),
            percentile(&w.puback_us, 0.99),
            w.live_per_reading
                .map_or("-".to_owned(), |b| format!("{b:.0}")),
            w.device_bytes
                .map_or("-".to_owned(), |b| format!("{:.0}", b as f64 / readings)),
        );
    }
    Ok(())
}
