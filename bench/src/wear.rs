//! SD-card wear: what edgefn writes to storage per reading at the steady,
//! low rates of a real site, and what that costs in fsyncs and PUBACK
//! latency.
//!
//! ```sh
//! target/release/edgefn-bench --only wear [--wear-for 30s] [--rounds 3] [--wear-rows 1,2] [--wear-strace]
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
//! `--wear-strace` its fsync and fdatasync calls counted by strace
//! attached for the window (which slows every syscall: the latencies of
//! such a run are not the daemon's), which also splits the bytes between
//! the WAL, the database file and the rest (`Traced`); the PUBACK latency
//! each device saw, p50 and p99 (with an external Mosquitto, Mosquitto's
//! PUBACK); the daemon's own live figure (`disk_bytes_per_message` of
//! `/metrics.json` at the end, over its last 5 minutes: warm-up
//! included); and what the whole block device holding the data directory
//! took per reading (/sys/dev/block/…/stat: every process on the machine,
//! the file system's journal included; meaningful only on an otherwise
//! idle machine). The last two rows set `[buffer] commit_delay = "20ms"`.

use std::time::{Duration, Instant};

use anyhow::Context;
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::Packet;
use rumqttc::v5::{AsyncClient, Event, MqttOptions};

use testkit::{Local, Mosquitto, free_port, port_open, write_config};

use super::{median, percentile, proc_value};

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
    /// From strace, with `--wear-strace`.
    traced: Option<Traced>,
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
    let dir = tempfile::tempdir()?;
    let cloud = Mosquitto::cloud().await;
    let metrics = free_port();
    let (_local, local, local_port) = if r.mosquitto {
        let m = Mosquitto::start_with_extra("max_queued_messages 0\nset_tcp_nodelay true\n").await;
        let (url, port) = (m.url(), m.port);
        (Some(m), Local::Broker(url), port)
    } else {
        let port = free_port();
        (None, Local::Embedded(port), port)
    };
    let mut file = super::edgefn_config(dir.path(), local, cloud.port, module, "full");
    file.buffer.commit_delay = r.commit_delay.map(str::to_owned);
    file.metrics = Some(testkit::MetricsTable {
        listen: Some(format!("127.0.0.1:{metrics}")),
        ..Default::default()
    });
    let edgefn = super::start_edgefn(&write_config(dir.path(), &file))?;
    port_open(metrics).await;
    port_open(local_port).await;
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
    let trace_log = dir.path().join("strace.log");
    let strace = if count_syncs {
        Some(
            std::process::Command::new("strace")
                .args(["-f", "-qq", "-y", "-e", "trace=pwrite64,fsync,fdatasync"])
                .args(["-e", "signal=none", "-o"])
                .arg(&trace_log)
                .args(["-p", &pid.to_string()])
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
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
    let traced = match strace {
        Some(mut child) => {
            // SIGINT makes strace detach and flush its log.
            std::process::Command::new("kill")
                .args(["-INT", &child.id().to_string()])
                .status()?;
            child.wait()?;
            Some(Traced::from_log(&std::fs::read_to_string(&trace_log)?))
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
        traced,
        commits: commits_after.saturating_sub(commits_before),
        live_per_reading,
        puback_us,
    })
}

/// What an strace log of the daemon's `pwrite64`, `fsync` and
/// `fdatasync` calls shows: the syncs, and the bytes the writes dirtied
/// per file, modelled as the kernel counts `write_bytes` (a 4 KiB file
/// page counts when a write finds it clean; a sync of the file leaves its
/// pages clean). The database file is written only by checkpoints, each
/// ending with its fsync; the WAL is synced by every commit.
#[derive(Default)]
struct Traced {
    syncs: u64,
    wal: u64,
    database: u64,
}

impl Traced {
    fn from_log(log: &str) -> Traced {
        const PAGE: u64 = 4096;
        let mut t = Traced::default();
        let mut dirty: std::collections::HashMap<&str, std::collections::HashSet<u64>> =
            Default::default();
        for line in log.lines() {
            // "PID call(FD</path>, ...) = N", or "... <unfinished ...>"
            // when another thread's call interleaves (the arguments are
            // all there; the "resumed" line that follows is skipped).
            let Some((name, rest)) = line
                .split_once(' ')
                .and_then(|(_, call)| call.trim_start().split_once('('))
            else {
                continue;
            };
            let Some((path, _)) = rest.split_once('<').and_then(|(_, r)| r.split_once('>')) else {
                continue;
            };
            match name {
                "fsync" | "fdatasync" => {
                    t.syncs += 1;
                    dirty.remove(path);
                }
                "pwrite64" => {
                    let args = rest.split(" <unfinished").next().unwrap_or(rest);
                    let args = args.rsplit_once(')').map_or(args, |(a, _)| a);
                    let mut last = args.rsplitn(3, ", ");
                    let (Some(Ok(offset)), Some(Ok(len))) = (
                        last.next().map(str::parse::<u64>),
                        last.next().map(str::parse::<u64>),
                    ) else {
                        continue;
                    };
                    if len == 0 {
                        continue;
                    }
                    let pages = dirty.entry(path).or_default();
                    let fresh = (offset / PAGE..=(offset + len - 1) / PAGE)
                        .filter(|p| pages.insert(*p))
                        .count() as u64;
                    if path.ends_with("-wal") {
                        t.wal += fresh * PAGE;
                    } else if path.ends_with(".db") {
                        t.database += fresh * PAGE;
                    }
                }
                _ => {}
            }
        }
        t
    }
}

/// One run of one row, as printed.
struct Line {
    readings: f64,
    bytes_per_reading: f64,
    readings_per_commit: f64,
    bytes_per_second: f64,
    /// Commits per second, or with strace the syncs counted.
    syncs_per_second: f64,
    p50_ms: f64,
    p99_ms: f64,
    live_per_reading: Option<f64>,
    device_per_reading: Option<f64>,
    /// With strace: (WAL, database, the rest) bytes per reading.
    split: Option<(f64, f64, f64)>,
}

impl Line {
    fn of(w: &Wear) -> Line {
        let readings = w.readings.max(1) as f64;
        let per_reading = |b: u64| b as f64 / readings;
        Line {
            readings: w.readings as f64,
            bytes_per_reading: per_reading(w.bytes),
            readings_per_commit: w.readings as f64 / w.commits.max(1) as f64,
            bytes_per_second: w.bytes as f64 / w.secs,
            syncs_per_second: w.traced.as_ref().map_or(w.commits, |t| t.syncs) as f64 / w.secs,
            p50_ms: percentile(&w.puback_us, 0.50),
            p99_ms: percentile(&w.puback_us, 0.99),
            live_per_reading: w.live_per_reading,
            device_per_reading: w.device_bytes.map(per_reading),
            split: w.traced.as_ref().map(|t| {
                let rest = w.bytes as f64 - (t.wal + t.database) as f64;
                (per_reading(t.wal), per_reading(t.database), rest / readings)
            }),
        }
    }

    /// The median of each figure over `runs`.
    fn median(runs: &[Line]) -> Line {
        let m = |f: &dyn Fn(&Line) -> f64| median(runs.iter().map(f).collect()).unwrap_or(f64::NAN);
        let opt = |f: &dyn Fn(&Line) -> Option<f64>| median(runs.iter().filter_map(f).collect());
        Line {
            readings: m(&|l| l.readings),
            bytes_per_reading: m(&|l| l.bytes_per_reading),
            readings_per_commit: m(&|l| l.readings_per_commit),
            bytes_per_second: m(&|l| l.bytes_per_second),
            syncs_per_second: m(&|l| l.syncs_per_second),
            p50_ms: m(&|l| l.p50_ms),
            p99_ms: m(&|l| l.p99_ms),
            live_per_reading: opt(&|l| l.live_per_reading),
            device_per_reading: opt(&|l| l.device_per_reading),
            split: runs.iter().all(|l| l.split.is_some()).then(|| {
                (
                    m(&|l| l.split.map_or(f64::NAN, |s| s.0)),
                    m(&|l| l.split.map_or(f64::NAN, |s| s.1)),
                    m(&|l| l.split.map_or(f64::NAN, |s| s.2)),
                )
            }),
        }
    }

    fn print(&self, load: &str) {
        let or_dash = |v: Option<f64>| v.map_or("-".to_owned(), |b| format!("{b:.0}"));
        println!(
            "| {load} | {:.0} | {:.0} | {:.2} | {:.0} | {:.2} | {:.1} | {:.2} | {:.2} | {} | {} | {} |",
            self.readings,
            self.bytes_per_reading,
            self.readings_per_commit,
            self.bytes_per_second,
            self.bytes_per_second * 86_400.0 / 1e9,
            self.syncs_per_second,
            self.p50_ms,
            self.p99_ms,
            or_dash(self.live_per_reading),
            or_dash(self.device_per_reading),
            self.split.map_or("-".to_owned(), |(wal, db, rest)| format!(
                "{wal:.0} / {db:.0} / {rest:.0}"
            )),
        );
    }
}

fn header(count_syncs: bool) {
    println!(
        "| load | readings | bytes written per reading | readings per commit | bytes/s | GB/day | {} | PUBACK p50 ms | p99 ms | edgefn's own figure | device bytes per reading | WAL / database / rest per reading (strace) |",
        if count_syncs {
            "fsyncs/s (strace)"
        } else {
            "commits/s"
        }
    );
    println!(
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
    );
}

/// Runs the chosen rows (all by default) `--rounds` times, interleaved,
/// printing each run and then, for several rounds, the median of each
/// figure.
pub async fn run(module: &std::path::Path, args: &super::Args) -> anyhow::Result<()> {
    let chosen: Vec<(usize, &Row)> = ROWS
        .iter()
        .enumerate()
        .map(|(i, r)| (i + 1, r))
        .filter(|(n, _)| args.wear_rows.is_empty() || args.wear_rows.contains(n))
        .collect();
    anyhow::ensure!(
        !chosen.is_empty(),
        "--wear-rows: rows are numbered 1 to {}",
        ROWS.len()
    );
    let load = |n: usize, r: &Row| {
        format!(
            "{n}. {} device(s) × {}/s ({}/s){}{}",
            r.devices,
            r.rate,
            r.devices as f64 * r.rate,
            if r.mosquitto {
                ", via Mosquitto"
            } else {
                ", built-in broker"
            },
            r.commit_delay
                .map_or(String::new(), |d| format!(", commit_delay {d}"))
        )
    };
    let rounds = args.rounds.max(1);
    header(args.wear_strace);
    let mut runs: Vec<Vec<Line>> = chosen.iter().map(|_| Vec::new()).collect();
    for round in 1..=rounds {
        for ((n, r), lines) in chosen.iter().zip(&mut runs) {
            eprintln!("round {round}: running wear row {} ...", load(*n, r));
            let w = row(r, module, args.wear_for, args.wear_strace).await?;
            let line = Line::of(&w);
            line.print(&load(*n, r));
            lines.push(line);
        }
    }
    if rounds > 1 {
        println!("\nMedian of {rounds} interleaved rounds:\n");
        header(args.wear_strace);
        for ((n, r), lines) in chosen.iter().zip(&runs) {
            Line::median(lines).print(&load(*n, r));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::Traced;

    #[test]
    fn traced_counts_the_pages_each_write_finds_clean() {
        let log = r#"101 pwrite64(7</d/edgefn.db-wal>, "\x00\x00"..., 24, 4072) = 24
101 pwrite64(7</d/edgefn.db-wal>, "\x0d, 1)"..., 512, 4096) = 512
102 pwrite64(7</d/edgefn.db-wal>, "\x00"..., 24, 4608 <unfinished ...>
101 fsync(9</d/edgefn.db> <unfinished ...>
102 <... pwrite64 resumed>) = 24
101 <... fsync resumed>) = 0
102 fsync(7</d/edgefn.db-wal>) = 0
102 pwrite64(7</d/edgefn.db-wal>, "\x00"..., 512, 4632) = 512
102 pwrite64(9</d/edgefn.db>, "\x00"..., 512, 0) = 512
102 pwrite64(9</d/edgefn.db>, "\x00"..., 512, 512) = 512
102 pwrite64(8</d/edgefn.db-shm>, "\x00"..., 8, 0) = 8
102 fdatasync(7</d/edgefn.db-wal>) = 0
"#;
        let t = Traced::from_log(log);
        assert_eq!(t.syncs, 3);
        // Before the WAL's sync: page 0 (the first write ends where it
        // ends) and page 1 (the next two). After it: page 1 again.
        assert_eq!(t.wal, 3 * 4096);
        // Two writes into one clean page of the database file.
        assert_eq!(t.database, 4096);
    }
}
