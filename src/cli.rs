//! The command line: each subcommand is a thin call into the library.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};

use crate::config::{BrokerClientConfig, Config, LocalSource};
use crate::invoke::InvokeRequest;
use crate::runtime::{Runtime, Target};

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
// Made once per process: the size of a variant does not matter.
#[allow(clippy::large_enum_variant)]
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
        /// When version 2 of the function is pushed, signed, through the
        /// cloud broker ("0s" for never).
        #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
        upgrade_after: std::time::Duration,
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
        /// Start with this state: a JSON object of keys and values (a
        /// string value is its text); the state the invocation leaves is
        /// printed after it.
        #[arg(long)]
        state: Option<PathBuf>,
        /// Most bytes of state, as `state_limit` in the config.
        #[arg(long, default_value = "1MiB")]
        state_limit: bytesize::ByteSize,
    },
    /// Make a new private signing key; print its public key, for
    /// `deploy.trusted_keys`.
    Keygen {
        /// The private key file to create (mode 0600; never overwritten).
        #[arg(long)]
        out: PathBuf,
    },
    /// Make a signed bundle of a function, for gateways to run: checked
    /// here as strictly as a gateway checks it.
    Deploy {
        /// The module (.wasm) [default: `module` of --manifest].
        module: Option<PathBuf>,
        /// The function's settings.
        #[command(flatten)]
        manifest: ManifestArgs,
        /// Targets, version, signature, output.
        #[command(flatten)]
        bundle: BundleArgs,
    },
    /// Show what every gateway on a control broker runs, from their
    /// retained status topics (--broker); or, on a gateway, its figures
    /// (--config): from the running daemon, or from its database.
    Status {
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
        access: BrokerAccess,
    },
    /// Inspect, replay or delete the gateway's dead letters (safe while
    /// the daemon runs).
    DeadLetters {
        /// The gateway's configuration file.
        #[arg(
            long,
            short,
            global = true,
            env = "EDGEFN_CONFIG",
            default_value = "/etc/edgefn/edgefn.toml"
        )]
        config: PathBuf,
        /// What to do.
        #[command(subcommand)]
        action: DeadLettersCommand,
    },
    /// Make a signed tombstone: the targeted gateways stop running the
    /// function.
    Remove {
        /// The function's name.
        name: String,
        /// Targets, version, signature, output.
        #[command(flatten)]
        bundle: BundleArgs,
    },
}

/// `edgefn dead-letters` subcommands.
#[derive(Debug, clap::Subcommand)]
pub enum DeadLettersCommand {
    /// One line per dead letter, oldest first.
    List {
        /// Only this function's.
        #[arg(long)]
        function: Option<String>,
    },
    /// One dead letter in full, payload included.
    Show {
        /// Its id (from `list`).
        id: i64,
    },
    /// Run dead letters again, through the current version of their
    /// function, in the running daemon: deleted if they run, kept with
    /// their attempts counted up if they fail again.
    Replay {
        /// These ids.
        ids: Vec<i64>,
        /// Every dead letter of this function.
        #[arg(long)]
        function: Option<String>,
        /// Every dead letter.
        #[arg(long, conflicts_with_all = ["ids", "function"])]
        all: bool,
    },
    /// Delete dead letters.
    Purge {
        /// These ids.
        ids: Vec<i64>,
        /// Only this function's.
        #[arg(long)]
        function: Option<String>,
        /// Only those stored longer ago than this, e.g. 7d.
        #[arg(long, value_parser = humantime::parse_duration)]
        older_than: Option<std::time::Duration>,
        /// Every dead letter.
        #[arg(long, conflicts_with_all = ["ids", "function", "older_than"])]
        all: bool,
    },
}

impl DeadLettersCommand {
    fn action(self) -> anyhow::Result<crate::dead_letters::Action> {
        use crate::dead_letters::Action;
        use crate::store::Selection;
        let now_ms = crate::fleet::version_now();
        Ok(match self {
            DeadLettersCommand::List { function } => Action::List { function },
            DeadLettersCommand::Show { id } => Action::Show { id },
            DeadLettersCommand::Replay { ids, function, all } => {
                if ids.is_empty() && function.is_none() && !all {
                    anyhow::bail!("say which dead letters: IDs, --function NAME or --all");
                }
                Action::Replay(Selection {
                    ids,
                    function,
                    before_ms: None,
                })
            }
            DeadLettersCommand::Purge {
                ids,
                function,
                older_than,
                all,
            } => {
                if ids.is_empty() && function.is_none() && older_than.is_none() && !all {
                    anyhow::bail!(
                        "say which dead letters: IDs, --function NAME, --older-than AGE or --all"
                    );
                }
                Action::Purge(Selection {
                    ids,
                    function,
                    before_ms: older_than.map(|d| now_ms.saturating_sub(d.as_millis() as u64)),
                })
            }
        })
    }
}

/// Who a bundle is for, and who signs it.
#[derive(Debug, clap::Args)]
pub struct BundleArgs {
    /// A gateway the bundle is for, by `gateway.id` (repeatable).
    #[arg(long = "gateway")]
    gateways: Vec<String>,
    /// A group the bundle is for, as in `deploy.groups` (repeatable).
    #[arg(long = "group")]
    groups: Vec<String>,
    /// The bundle's version: higher than any before for this function
    /// name, at most 9223372036854775807 [default: the current time in
    /// milliseconds].
    #[arg(long)]
    version: Option<u64>,
    /// The signed floor: gateways that accept this bundle never run a
    /// version of the function below N again, rollbacks included (give
    /// the bundle's own version for a security fix).
    #[arg(long, value_name = "N")]
    min_version: Option<u64>,
    /// How long gateways accept the bundle from the broker (a captured
    /// old bundle served later is refused `expired`); re-sign to renew. A
    /// gateway that accepted it keeps running it after that. `never` for
    /// no end.
    #[arg(long, value_name = "DURATION", default_value = "30d", value_parser = parse_expires)]
    expires: Expires,
    /// The private key file `edgefn keygen` wrote.
    #[arg(long, required_unless_present = "unsigned")]
    signing_key: Option<PathBuf>,
    /// Make an unsigned bundle (accepted only by gateways with
    /// `deploy.allow_unsigned = true`).
    #[arg(long, conflicts_with = "signing_key")]
    unsigned: bool,
    /// Write the bundle to this file.
    #[arg(long, required_unless_present = "broker")]
    output: Option<PathBuf>,
    /// Publish the bundle (retained) on the control broker of the targeted
    /// gateways: mqtt://HOST[:PORT] or mqtts://HOST[:PORT].
    #[arg(long)]
    broker: Option<String>,
    /// With --broker: wait (30s, or as given) for the report of every
    /// targeted gateway that is online; exit non-zero if one refused.
    #[arg(long, num_args = 0..=1, default_missing_value = "30s", value_parser = humantime::parse_duration, requires = "broker")]
    wait: Option<std::time::Duration>,
    /// How to reach the broker.
    #[command(flatten)]
    access: BrokerAccess,
}

/// `--expires`: a duration from now, or never.
#[derive(Debug, Clone, Copy)]
enum Expires {
    /// This long after signing.
    After(std::time::Duration),
    /// No end.
    Never,
}

fn parse_expires(text: &str) -> Result<Expires, String> {
    if text == "never" {
        return Ok(Expires::Never);
    }
    humantime::parse_duration(text)
        .map(Expires::After)
        .map_err(|e| format!("{text:?}: {e}; expected a duration such as 30d, or never"))
}

/// TLS files and credentials for `--broker`.
#[derive(Debug, clap::Args)]
pub struct BrokerAccess {
    /// CA certificates to trust for mqtts:// instead of the system's.
    #[arg(long)]
    ca_file: Option<PathBuf>,
    /// A client certificate for mqtts://.
    #[arg(long)]
    cert_file: Option<PathBuf>,
    /// The client certificate's private key.
    #[arg(long)]
    client_key_file: Option<PathBuf>,
    /// User name on the broker (the password from EDGEFN_BROKER_PASSWORD).
    #[arg(long)]
    username: Option<String>,
}

impl BrokerAccess {
    /// The client settings for `url`, checked; the client id is `tool-…`.
    fn broker(&self, url: &str, tool: &str) -> anyhow::Result<crate::config::BrokerClientConfig> {
        crate::config::tool_broker(
            url,
            [
                self.ca_file.clone(),
                self.cert_file.clone(),
                self.client_key_file.clone(),
            ],
            self.username.clone(),
            std::env::var("EDGEFN_BROKER_PASSWORD").ok(),
            format!("edgefn-{tool}-{}", crate::fleet::version_now()),
        )
        .map_err(|problems| {
            let list: Vec<String> = problems.iter().map(|p| format!("  - {p}")).collect();
            anyhow::anyhow!("{}", list.join("\n"))
        })
    }
}

impl BundleArgs {
    fn targets(&self) -> crate::bundle::Targets {
        crate::bundle::Targets {
            gateways: self.gateways.clone(),
            groups: self.groups.clone(),
        }
    }

    fn key(&self) -> anyhow::Result<Option<ed25519_dalek::SigningKey>> {
        self.signing_key
            .as_deref()
            .map(crate::fleet::read_signing_key)
            .transpose()
    }

    fn version(&self) -> u64 {
        self.version.unwrap_or_else(crate::fleet::version_now)
    }

    /// Version, floor, end and targets of the bundle to make.
    fn release(&self, version: u64) -> crate::fleet::Release {
        crate::fleet::Release {
            version,
            min_version: self.min_version,
            expires_ms: match self.expires {
                Expires::After(d) => {
                    Some(crate::fleet::version_now().saturating_add(d.as_millis() as u64))
                }
                Expires::Never => None,
            },
            targets: self.targets(),
        }
    }

    /// Writes `bundle` to `--output`, publishes it with `--broker`
    /// (waiting for reports with `--wait`), and says so.
    fn deliver(
        &self,
        bundle: Vec<u8>,
        name: &str,
        what: &str,
        version: u64,
    ) -> anyhow::Result<ExitCode> {
        let signed = if self.unsigned { "unsigned" } else { "signed" };
        if let Some(out) = &self.output {
            std::fs::write(out, &bundle)
                .with_context(|| format!("cannot write {}", out.display()))?;
            println!(
                "{what} v{version}: {} bytes, {signed}, written to {}",
                bundle.len(),
                out.display()
            );
        }
        let Some(url) = &self.broker else {
            return Ok(ExitCode::SUCCESS);
        };
        let broker = self.access.broker(url, "deploy")?;
        let publish = crate::fleet::Publish {
            broker,
            name: name.to_owned(),
            version,
            targets: self.targets(),
            wait: self.wait,
        };
        let outcomes = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
            .block_on(crate::fleet::publish(&publish, bundle))?;
        println!("{what} v{version}: {signed}, published on {url}");
        if self.wait.is_none() {
            return Ok(ExitCode::SUCCESS);
        }
        let mut failed = false;
        for (gateway, outcome) in &outcomes {
            use crate::fleet::Outcome;
            let text = match outcome {
                Outcome::Applied { state, ms } => format!("{state}  ({ms} ms)"),
                Outcome::Refused { code, text } => {
                    failed = true;
                    format!("refused: {code}: {text}")
                }
                Outcome::Pending => "pending (offline)".to_owned(),
                Outcome::NoReport => {
                    failed = true;
                    "no report".to_owned()
                }
            };
            println!(
                "  {}",
                crate::text::Printable(&format!("{gateway}  {name} v{version}  {text}"))
            );
        }
        if outcomes.is_empty() {
            println!("  no targeted gateway has reported on this broker");
        }
        Ok(if failed {
            ExitCode::FAILURE
        } else {
            ExitCode::SUCCESS
        })
    }
}

/// The keys of a `[[functions]]` table, as flags of `edgefn deploy`.
#[derive(Debug, clap::Args)]
pub struct ManifestArgs {
    /// A file holding one `[[functions]]` table (or its keys at the top
    /// level); the flags below override its keys.
    #[arg(long)]
    manifest: Option<PathBuf>,
    /// `name`
    #[arg(long)]
    name: Option<String>,
    /// `triggers`: an MQTT topic filter (repeatable).
    #[arg(long = "trigger")]
    triggers: Vec<String>,
    /// `env`: KEY=VALUE (repeatable).
    #[arg(long = "env", short, value_parser = parse_env)]
    env: Vec<(String, String)>,
    /// `memory_limit`, e.g. 16MiB.
    #[arg(long)]
    memory_limit: Option<String>,
    /// `timeout`, e.g. 100ms.
    #[arg(long)]
    timeout: Option<String>,
    /// `concurrency`
    #[arg(long)]
    concurrency: Option<i64>,
    /// `retries`
    #[arg(long)]
    retries: Option<i64>,
    /// `fuel`
    #[arg(long)]
    fuel: Option<i64>,
    /// `max_record_size`
    #[arg(long)]
    max_record_size: Option<String>,
    /// `max_emit_bytes`
    #[arg(long)]
    max_emit_bytes: Option<String>,
    /// `log_rate_limit`
    #[arg(long)]
    log_rate_limit: Option<i64>,
    /// `schedule`: "every 30s" or "cron: 0 */5 * * * *".
    #[arg(long)]
    schedule: Option<String>,
    /// `state_limit`, e.g. 1MiB.
    #[arg(long)]
    state_limit: Option<String>,
    /// `emit_allow`: a topic filter the function may emit to (repeatable;
    /// none given: any).
    #[arg(long = "emit-allow")]
    emit_allow: Vec<String>,
    /// `publish_allow`: a topic filter the function may publish to on the
    /// local broker (repeatable; none given: none).
    #[arg(long = "publish-allow")]
    publish_allow: Vec<String>,
    /// `rollback`: "auto" (default: the gateway rolls a new version back
    /// only when its instances cannot start) or "never".
    #[arg(long)]
    rollback: Option<String>,
}

impl ManifestArgs {
    /// The manifest file's keys with the flags applied.
    fn manifest(self) -> anyhow::Result<crate::config::FunctionManifest> {
        let mut m = match &self.manifest {
            Some(path) => crate::fleet::read_manifest(path)?,
            None => Default::default(),
        };
        if let Some(v) = self.name {
            m.name = v;
        }
        if !self.triggers.is_empty() {
            m.triggers = self.triggers;
        }
        m.env.extend(self.env);
        let set = |field: &mut Option<String>, v: Option<String>| {
            if v.is_some() {
                *field = v;
            }
        };
        set(&mut m.memory_limit, self.memory_limit);
        set(&mut m.timeout, self.timeout);
        set(&mut m.max_record_size, self.max_record_size);
        set(&mut m.max_emit_bytes, self.max_emit_bytes);
        set(&mut m.schedule, self.schedule);
        set(&mut m.state_limit, self.state_limit);
        set(&mut m.rollback, self.rollback);
        if !self.emit_allow.is_empty() {
            m.emit_allow = Some(self.emit_allow);
        }
        if !self.publish_allow.is_empty() {
            m.publish_allow = Some(self.publish_allow);
        }
        m.concurrency = self.concurrency.or(m.concurrency);
        m.retries = self.retries.or(m.retries);
        m.fuel = self.fuel.or(m.fuel);
        m.log_rate_limit = self.log_rate_limit.or(m.log_rate_limit);
        if m.name.is_empty() {
            anyhow::bail!("no function name: give --name, or `name` in the manifest");
        }
        Ok(m)
    }
}

fn parse_env(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .filter(|(k, _)| !k.is_empty())
        .ok_or_else(|| format!("{s:?} is not KEY=VALUE"))
}

/// Resolves at the first SIGTERM (systemd's stop) or SIGINT (Ctrl-C).
fn stop_signal() -> anyhow::Result<impl std::future::Future<Output = ()>> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
    })
}

/// Runs the parsed command.
pub fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Run { config } => {
            let config = Config::load(&config)?;
            tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?
                .block_on(async {
                    let stop = stop_signal()?;
                    crate::gateway::run(config, stop).await
                })?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Check { config } => check(&config),
        Command::DeadLetters { config, action } => {
            let config = Config::load(&config)?;
            let functions: Vec<String> = config.functions.iter().map(|f| f.name.clone()).collect();
            print!(
                "{}",
                crate::dead_letters::run(&config.gateway.data_dir, &functions, action.action()?)?
            );
            Ok(ExitCode::SUCCESS)
        }
        #[cfg(feature = "embedded-broker")]
        Command::Demo {
            module,
            data_dir,
            devices,
            rate,
            outage_after,
            outage_for,
            upgrade_after,
            duration,
        } => {
            let opts = crate::demo::DemoOptions {
                module,
                data_dir,
                devices,
                rate,
                outage_after: (!outage_after.is_zero()).then_some(outage_after),
                outage_for,
                upgrade_after: (!upgrade_after.is_zero()).then_some(upgrade_after),
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
            state,
            state_limit,
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
                state: state
                    .as_deref()
                    .map(crate::invoke::read_state)
                    .transpose()?,
                state_limit: state_limit.as_u64() as usize,
            };
            let (report, after) = crate::invoke::invoke(&req)?;
            print!("{}", crate::invoke::render(&req.module, &report, fuel));
            if req.state.is_some() || !after.is_empty() {
                println!("state   {}", crate::invoke::state_json(&after));
            }
            Ok(ExitCode::from(crate::invoke::exit_code(&report) as u8))
        }
        Command::Keygen { out } => {
            let public = crate::fleet::keygen(&out)?;
            println!("{public}");
            eprintln!(
                "private key written to {}; put the line above into deploy.trusted_keys",
                out.display()
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Deploy {
            module,
            manifest,
            bundle,
        } => deploy(module, manifest, bundle),
        Command::Status {
            broker,
            config,
            gateway,
            group,
            access,
        } => {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let Some(broker) = broker else {
                let config = Config::load(&config.expect("clap: --broker or --config"))?;
                print!(
                    "{}",
                    runtime.block_on(crate::local_status::status(&config))?
                );
                return Ok(ExitCode::SUCCESS);
            };
            let client = access.broker(&broker, "status")?;
            let views = runtime.block_on(crate::fleet::status(
                &client,
                gateway.as_deref(),
                group.as_deref(),
            ))?;
            print!(
                "{}",
                crate::fleet::render_status(&views, crate::fleet::version_now())
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Remove { name, bundle } => {
            let version = bundle.version();
            let sealed = crate::fleet::remove_bundle(
                &name,
                bundle.release(version),
                bundle.key()?.as_ref(),
            )?;
            bundle.deliver(sealed, &name, &format!("removal of {name}"), version)
        }
    }
}

fn deploy(
    module: Option<PathBuf>,
    manifest: ManifestArgs,
    bundle: BundleArgs,
) -> anyhow::Result<ExitCode> {
    let manifest = manifest.manifest()?;
    let name = manifest.name.clone();
    let version = bundle.version();
    let req = crate::fleet::DeployRequest {
        manifest,
        module,
        release: bundle.release(version),
    };
    let sealed = crate::fleet::deploy_bundle(req, bundle.key()?.as_ref())?;
    bundle.deliver(sealed, &name, &name, version)
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
    if let Some(listen) = config.metrics.listen {
        println!("metrics  http://{listen}/metrics (and /metrics.json)");
    }
    for w in &config.warnings {
        println!("warning: {w}");
    }
    for f in &config.functions {
        let prefix = config
            .upstream
            .as_ref()
            .map_or("", |u| u.topic_prefix.as_str());
        match runtime.load_file(&f.module, crate::registry::function_spec(f, prefix)) {
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
                let filters = |list: &[crate::route::TopicFilter]| {
                    list.iter()
                        .map(|t| t.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                };
                println!(
                    "         state limit {}, emits to {}, publishes to {}{}",
                    bytesize::ByteSize(f.state_limit as u64),
                    f.emit_allow
                        .as_deref()
                        .map_or("any topic".to_owned(), filters),
                    if f.publish_allow.is_empty() {
                        "nothing".to_owned()
                    } else {
                        filters(&f.publish_allow)
                    },
                    match &f.schedule {
                        Some(s) => format!(", runs {s}"),
                        None => String::new(),
                    }
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
