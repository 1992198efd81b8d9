//! The command line: each subcommand is a thin call into the library.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};

use crate::config::{BrokerClientConfig, Config, LocalSource};
use crate::invoke::InvokeRequest;
use crate::runtime::{FunctionSpec, Runtime, Target};

/// Lambda-style WebAssembly functions on edge devices.
#[derive(Debug, Parser)]
#[command(name = "edgefn", version, about)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the gateway daemon.
    Run {
        /// The configuration file.
        #[arg(
            long,
            short,
            env = "EDGEFN_CONFIG",
            default_value = "/etc/edgefn/edgefn.toml"
        )]
        config: PathBuf,
    },
    /// Check a configuration and every module it names; print a summary.
    Check {
        /// The configuration file.
        #[arg(
            long,
            short,
            env = "EDGEFN_CONFIG",
            default_value = "/etc/edgefn/edgefn.toml"
        )]
        config: PathBuf,
    },
    /// Run a self-contained demo: the gateway with its built-in broker,
    /// simulated devices and a stand-in cloud broker, with live counts.
    #[cfg(feature = "embedded-broker")]
    Demo {
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
        /// Stop after this long (default: until Ctrl-C).
        #[arg(long, value_parser = humantime::parse_duration)]
        duration: Option<std::time::Duration>,
    },
    /// Run one event through a module locally and print what it did.
    Invoke {
        /// The module (.wasm).
        module: PathBuf,
        /// The message topic.
        #[arg(long, short)]
        topic: String,
        /// The payload: text, or @FILE to read it from a file.
        #[arg(long, short, default_value = "")]
        payload: String,
        /// Environment variable for the function, KEY=VALUE (repeatable).
        #[arg(long = "env", short, value_parser = parse_env)]
        env: Vec<(String, String)>,
        /// Memory limit.
        #[arg(long, default_value = "16MiB")]
        memory_limit: bytesize::ByteSize,
        /// Timeout.
        #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
        timeout: std::time::Duration,
        /// Run on wasmtime's Pulley interpreter (as on 32-bit ARM).
        #[arg(long)]
        pulley: bool,
        /// Fuel budget (WebAssembly operations), as `fuel` in the config.
        /// Without it, the fuel used is shown but not limited.
        #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
        fuel: Option<u64>,
        /// Most bytes (topics and payloads) the invocation may emit, as
        /// `max_emit_bytes` in the config.
        #[arg(long, default_value = "1MiB")]
        max_emit_bytes: bytesize::ByteSize,
        /// Log lines per second, as `log_rate_limit` in the config.
        #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..))]
        log_rate_limit: u32,
    },
}

fn parse_env(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .filter(|(k, _)| !k.is_empty())
        .ok_or_else(|| format!("{s:?} is not KEY=VALUE"))
}

/// Runs the parsed command.
pub fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Run { config } => {
            let config = Config::load(&config)?;
            tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?
                .block_on(crate::gateway::run(config))?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Check { config } => check(&config),
        #[cfg(feature = "embedded-broker")]
        Command::Demo {
            module,
            data_dir,
            devices,
            rate,
            outage_after,
            outage_for,
            duration,
        } => {
            let opts = crate::demo::DemoOptions {
                module,
                data_dir,
                devices,
                rate,
                outage_after: (!outage_after.is_zero()).then_some(outage_after),
                outage_for,
                duration,
            };
            tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?
                .block_on(crate::demo::run(opts))?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Invoke {
            module,
            topic,
            payload,
            env,
            memory_limit,
            timeout,
            pulley,
            fuel,
            max_emit_bytes,
            log_rate_limit,
        } => {
            let payload = match payload.strip_prefix('@') {
                Some(file) => std::fs::read(file)
                    .with_context(|| format!("cannot read payload file {file}"))?,
                None => payload.into_bytes(),
            };
            let req = InvokeRequest {
                module,
                topic,
                payload,
                env,
                memory_limit: memory_limit.as_u64() as usize,
                timeout,
                pulley,
                fuel,
                max_emit_bytes: max_emit_bytes.as_u64() as usize,
                log_rate_limit,
            };
            let report = crate::invoke::invoke(&req)?;
            print!("{}", crate::invoke::render(&req.module, &report, fuel));
            Ok(ExitCode::from(crate::invoke::exit_code(&report) as u8))
        }
    }
}

/// `edgefn check`: every problem in the config, then every module.
fn check(path: &std::path::Path) -> anyhow::Result<ExitCode> {
    let config = Config::load(path)?;
    let runtime = Runtime::new(Target::for_host())?;
    let mut failed = 0;
    println!(
        "gateway  {} (data in {})",
        config.gateway.id,
        config.gateway.data_dir.display()
    );
    // `, TLS, CA /etc/edgefn/ca.pem, client certificate …` for mqtts://.
    let tls = |b: &BrokerClientConfig| {
        b.tls
            .as_ref()
            .map(|t| format!(", {}", t.summary))
            .unwrap_or_default()
    };
    match &config.local.source {
        LocalSource::Broker(b) => println!(
            "local    {} as {:?}, {} in flight{}",
            b.url(),
            b.client_id,
            b.in_flight,
            tls(b)
        ),
        LocalSource::Embedded { listen } => println!("local    embedded broker on {listen}"),
    }
    match &config.upstream {
        Some(u) => println!(
            "upstream {} prefix {:?}{}",
            u.broker.url(),
            u.topic_prefix,
            tls(&u.broker)
        ),
        None => println!("upstream none (records stay buffered)"),
    }
    for w in &config.warnings {
        println!("warning: {w}");
    }
    for f in &config.functions {
        let prefix = config
            .upstream
            .as_ref()
            .map_or("", |u| u.topic_prefix.as_str());
        match runtime.load_file(&f.module, FunctionSpec::from_config(f, prefix)) {
            Ok(_) => {
                println!(
                    "function {} ok: {} <- {}",
                    f.name,
                    f.module.display(),
                    f.triggers
                        .iter()
                        .map(|t| t.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                );
                println!(
                    "         memory {}, timeout {}, concurrency {}, retries {}, fuel {}",
                    bytesize::ByteSize(f.memory_limit as u64),
                    humantime::format_duration(f.timeout),
                    f.concurrency,
                    f.retries,
                    f.fuel.map_or("unlimited".to_owned(), |n| n.to_string())
                );
            }
            Err(e) => {
                failed += 1;
                eprintln!("error: function {:?}: {e}", f.name);
            }
        }
    }
    if failed > 0 {
        eprintln!("{failed} function(s) failed to load");
        return Ok(ExitCode::FAILURE);
    }
    println!("ok");
    Ok(ExitCode::SUCCESS)
}
