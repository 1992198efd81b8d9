//! `edgefn status`: with `--broker`, what every gateway runs
//! ([`super::fleet`]); with `--config FILE`, the gateway's figures, on the
//! gateway.
//!
//! From the running daemon's metrics listener (`[metrics] listen`,
//! `/metrics.json`: the same report as `/metrics` and the metrics topic),
//! or, when nothing answers there, from what the database knows: the
//! buffer, the dead letters, the deployed functions and their state.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context as _;

use edgefn::config::Config;
use edgefn::metrics::Percentiles;
use edgefn::store::Inspector;
use edgefn::telemetry::Report;

/// `edgefn status`'s arguments.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The control broker: mqtt://HOST[:PORT] or mqtts://HOST[:PORT].
    #[arg(long, required_unless_present = "config", conflicts_with = "config")]
    broker: Option<String>,
    /// This gateway's configuration file.
    #[arg(long, short)]
    config: Option<PathBuf>,
    /// Only this gateway.
    #[arg(long)]
    gateway: Option<String>,
    /// Only the gateways of this group.
    #[arg(long)]
    group: Option<String>,
    /// How to reach the broker.
    #[command(flatten)]
    access: super::deploy::BrokerAccess,
}

/// Prints the fleet's statuses (`--broker`) or this gateway's figures
/// (`--config`).
pub fn command(args: Args) -> anyhow::Result<std::process::ExitCode> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let Some(broker) = args.broker else {
        let config = Config::load(&args.config.expect("clap: --broker or --config"))?;
        print!("{}", runtime.block_on(status(&config))?);
        return Ok(std::process::ExitCode::SUCCESS);
    };
    let client = args.access.broker(&broker, "status")?;
    let views = runtime.block_on(super::fleet::status(
        &client,
        args.gateway.as_deref(),
        args.group.as_deref(),
    ))?;
    print!(
        "{}",
        super::fleet::render_status(&views, edgefn::clock::now_ms())
    );
    Ok(std::process::ExitCode::SUCCESS)
}

/// What `edgefn status --config` prints.
pub async fn status(config: &Config) -> anyhow::Result<String> {
    let why = match config.metrics.listen {
        Some(addr) => match fetch(addr).await {
            Ok(report) => return Ok(render(&report)),
            Err(e) => format!("nothing answers on metrics.listen {addr}: {e:#}"),
        },
        None => "metrics.listen is not set, so the running daemon cannot be asked".to_owned(),
    };
    let data_dir = config.gateway.data_dir.clone();
    let configured: Vec<String> = config.functions.iter().map(|f| f.name.clone()).collect();
    let id = config.gateway.id.clone();
    tokio::task::spawn_blocking(move || offline(&id, &data_dir, &configured, &why)).await?
}

/// GETs `/metrics.json` from the listener at `addr` (`0.0.0.0`: this
/// machine).
async fn fetch(addr: SocketAddr) -> anyhow::Result<Report> {
    use http_body_util::BodyExt as _;
    let addr = if addr.ip().is_unspecified() {
        SocketAddr::new(std::net::Ipv4Addr::LOCALHOST.into(), addr.port())
    } else {
        addr
    };
    let limit = std::time::Duration::from_secs(5);
    let get = async {
        let stream = tokio::net::TcpStream::connect(addr).await?;
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await?;
        tokio::spawn(conn);
        let request = hyper::Request::get("/metrics.json")
            .header(hyper::header::HOST, addr.to_string())
            .body(http_body_util::Empty::<bytes::Bytes>::new())?;
        let response = sender.send_request(request).await?;
        anyhow::ensure!(
            response.status().is_success(),
            "/metrics.json answered {}",
            response.status()
        );
        let body = response.into_body().collect().await?.to_bytes();
        serde_json::from_slice(&body).context("/metrics.json is not an edgefn report")
    };
    tokio::time::timeout(limit, get)
        .await
        .map_err(|_| anyhow::anyhow!("no answer within {limit:?}"))?
}

/// `n` bytes, readable.
fn bytes(n: u64) -> String {
    bytesize::ByteSize::b(n).display().si().to_string()
}

/// A duration in seconds, readable.
fn age(secs: f64) -> String {
    let s = secs as u64;
    match s {
        0..60 => format!("{secs:.1} s"),
        60..3600 => format!("{}m {}s", s / 60, s % 60),
        3600..86400 => format!("{}h {}m", s / 3600, s % 3600 / 60),
        _ => format!("{}d {}h", s / 86400, s % 86400 / 3600),
    }
}

fn ms(p: Option<Percentiles>, f: fn(&Percentiles) -> f64) -> String {
    p.map_or("-".into(), |p| format!("{:.2}", f(&p)))
}

/// The live report as a table.
pub fn render(r: &Report) -> String {
    let g = &r.gateway;
    let c = &g.counters;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{}  edgefn {}  running for {}  upstream {}",
        g.id,
        g.edgefn_version,
        age(g.uptime_s as f64),
        if g.upstream_connected {
            "connected"
        } else {
            "not connected"
        }
    );
    if c.upstream_refused_topics > 0 {
        let how = match c.upstream_refusal_reason {
            256 => "it closes the connection".to_owned(),
            code => format!("reason 0x{code:02x}"),
        };
        let _ = writeln!(
            out,
            "  upstream    refuses {} topic(s) ({how}): their records wait and are tried again",
            c.upstream_refused_topics
        );
    }
    let _ = writeln!(
        out,
        "  buffer      {} records, {}{}",
        g.buffer_records,
        bytes(g.buffer_bytes),
        g.oldest_record_age_s
            .map_or(String::new(), |a| format!(", oldest {}", age(a)))
    );
    let _ = writeln!(
        out,
        "  messages    received {}  committed {}  refused {}  unrouted {}  abandoned {}",
        c.received,
        c.committed,
        c.refused_too_large + c.broker_refused,
        c.unrouted,
        c.abandoned
    );
    let _ = writeln!(
        out,
        "  records     buffered {}  forwarded {}  resent {}  dropped {}  refused upstream {}",
        c.records_buffered, c.forwarded, c.resent, c.dropped_records, c.upstream_rejected
    );
    let _ = writeln!(
        out,
        "  commits     {} (p50 {} ms, p99 {} ms), {} failed",
        c.commit_batches,
        ms(g.commit_latency, |p| p.p50_ms),
        ms(g.commit_latency, |p| p.p99_ms),
        c.commit_failures,
    );
    if let (Some(day), Some(window)) = (g.disk_bytes_per_day, g.disk_window_s) {
        let _ = writeln!(
            out,
            "  disk        {} per message, {} per day (last {})",
            g.disk_bytes_per_message
                .map_or("-".to_owned(), |b| bytes(b.round() as u64)),
            bytes(day.round() as u64),
            age(window),
        );
    }
    let _ = writeln!(
        out,
        "  dead letters {} written, {} dropped; replays {} done, {} failed again, {} refused",
        c.dead_letters, c.dead_letters_dropped, c.replays_done, c.replays_failed, c.replays_refused
    );
    if c.broker_sessions > 0 || c.broker_connections > 0 {
        let _ = writeln!(
            out,
            "  broker      {} connections, {} sessions",
            c.broker_connections, c.broker_sessions
        );
    }
    let _ = writeln!(
        out,
        "  {:<20} {:<16} {:>11} {:>7} {:>7} {:>5} {:>9} {:>8} {:>8} {:>9} {:>8} {:>8}",
        "function",
        "version",
        "invocations",
        "errors",
        "retries",
        "dead",
        "throttled",
        "emitted",
        "refused",
        "state",
        "p50 ms",
        "p99 ms"
    );
    for f in &r.functions {
        let version = if f.origin == "config" {
            "config".to_owned()
        } else {
            format!("v{}", f.version)
        };
        let _ = writeln!(
            out,
            "  {:<20} {:<16} {:>11} {:>7} {:>7} {:>5} {:>9} {:>8} {:>8} {:>9} {:>8} {:>8}",
            f.name,
            version,
            f.invocations,
            f.errors_total(),
            f.retries,
            f.dead_letters,
            f.throttles,
            f.emitted_records,
            f.emit_denied + f.publish_denied + f.state_refused,
            bytes(f.state_bytes),
            ms(f.duration, |p| p.p50_ms),
            ms(f.duration, |p| p.p99_ms)
        );
    }
    out
}

/// What the database in `data_dir` knows, with the daemon not running.
fn offline(
    id: &str,
    data_dir: &std::path::Path,
    configured: &[String],
    why: &str,
) -> anyhow::Result<String> {
    let db = Inspector::open(data_dir)?;
    let (records, size, oldest) = db.buffer()?;
    let now = edgefn::clock::now_ms();
    let mut out = String::new();
    let _ = writeln!(out, "{id}  not running? {why}");
    let _ = writeln!(out, "  from the database in {}:", data_dir.display());
    let _ = writeln!(
        out,
        "  buffer      {records} records, {}{}",
        bytes(size),
        oldest.map_or(String::new(), |o| format!(
            ", oldest {}",
            age(now.saturating_sub(o) as f64 / 1000.0)
        ))
    );
    let dead = db.dead_letter_counts()?;
    let state = db.state_bytes()?;
    let deployed = db.deployed()?;
    let mut names: Vec<(String, String)> = configured
        .iter()
        .map(|n| (n.clone(), "config".to_owned()))
        .collect();
    for (n, v) in deployed {
        names.retain(|(m, _)| *m != n);
        names.push((n, format!("v{v}")));
    }
    for n in dead.keys().chain(state.keys()) {
        if !names.iter().any(|(m, _)| m == n) {
            names.push((n.clone(), "not on the gateway".into()));
        }
    }
    let _ = writeln!(
        out,
        "  {:<20} {:<20} {:>12} {:>15} {:>9}",
        "function", "version", "dead letters", "replays pending", "state"
    );
    for (name, version) in names {
        let (d, pending) = dead.get(&name).copied().unwrap_or_default();
        let _ = writeln!(
            out,
            "  {:<20} {:<20} {:>12} {:>15} {:>9}",
            name,
            version,
            d,
            pending,
            bytes(state.get(&name).copied().unwrap_or(0))
        );
    }
    Ok(out)
}
