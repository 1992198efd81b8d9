//! `edgefn keygen`, `edgefn deploy` and `edgefn remove`: the fleet
//! engineer's arguments; [`super::fleet`] does the work.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;

use super::parse_env;

/// `edgefn keygen`.
#[derive(Debug, clap::Args)]
pub struct KeygenArgs {
    /// The private key file to create (mode 0600; never overwritten).
    #[arg(long)]
    out: PathBuf,
}

/// `edgefn deploy`.
#[derive(Debug, clap::Args)]
pub struct DeployArgs {
    /// The module (.wasm) [default: `module` of --manifest].
    module: Option<PathBuf>,
    /// The function's settings.
    #[command(flatten)]
    manifest: ManifestArgs,
    /// Targets, version, signature, output.
    #[command(flatten)]
    bundle: BundleArgs,
}

/// `edgefn remove`.
#[derive(Debug, clap::Args)]
pub struct RemoveArgs {
    /// The function's name.
    name: String,
    /// Targets, version, signature, output.
    #[command(flatten)]
    bundle: BundleArgs,
}

/// Writes a new key and prints its public half.
pub fn keygen(args: KeygenArgs) -> anyhow::Result<ExitCode> {
    let public = super::fleet::keygen(&args.out)?;
    println!("{public}");
    eprintln!(
        "private key written to {}; put the line above into deploy.trusted_keys",
        args.out.display()
    );
    Ok(ExitCode::SUCCESS)
}

/// Seals the function's bundle and delivers it.
pub fn deploy(args: DeployArgs) -> anyhow::Result<ExitCode> {
    let DeployArgs {
        module,
        manifest,
        bundle,
    } = args;
    let manifest = manifest.manifest()?;
    let name = manifest.name.clone();
    let version = bundle.version();
    let req = super::fleet::DeployRequest {
        manifest,
        module,
        release: bundle.release(version),
    };
    let sealed = super::fleet::deploy_bundle(req, bundle.key()?.as_ref())?;
    bundle.deliver(sealed, &name, &name, version)
}

/// Seals the function's tombstone and delivers it.
pub fn remove(args: RemoveArgs) -> anyhow::Result<ExitCode> {
    let RemoveArgs { name, bundle } = args;
    let version = bundle.version();
    let sealed =
        super::fleet::remove_bundle(&name, bundle.release(version), bundle.key()?.as_ref())?;
    bundle.deliver(sealed, &name, &format!("removal of {name}"), version)
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
    pub fn broker(
        &self,
        url: &str,
        tool: &str,
    ) -> anyhow::Result<edgefn::config::BrokerClientConfig> {
        edgefn::config::tool_broker(
            url,
            [
                self.ca_file.clone(),
                self.cert_file.clone(),
                self.client_key_file.clone(),
            ],
            self.username.clone(),
            std::env::var("EDGEFN_BROKER_PASSWORD").ok(),
            format!("edgefn-{tool}-{}", edgefn::clock::now_ms()),
        )
        .map_err(|problems| {
            let list: Vec<String> = problems.iter().map(|p| format!("  - {p}")).collect();
            anyhow::anyhow!("{}", list.join("\n"))
        })
    }
}

impl BundleArgs {
    fn targets(&self) -> edgefn::bundle::Targets {
        edgefn::bundle::Targets {
            gateways: self.gateways.clone(),
            groups: self.groups.clone(),
        }
    }

    fn key(&self) -> anyhow::Result<Option<ed25519_dalek::SigningKey>> {
        self.signing_key
            .as_deref()
            .map(super::fleet::read_signing_key)
            .transpose()
    }

    fn version(&self) -> u64 {
        self.version.unwrap_or_else(edgefn::clock::now_ms)
    }

    /// Version, floor, end and targets of the bundle to make.
    fn release(&self, version: u64) -> super::fleet::Release {
        super::fleet::Release {
            version,
            min_version: self.min_version,
            expires_ms: match self.expires {
                Expires::After(d) => {
                    Some(edgefn::clock::now_ms().saturating_add(d.as_millis() as u64))
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
        let publish = super::fleet::Publish {
            broker,
            name: name.to_owned(),
            version,
            targets: self.targets(),
            wait: self.wait,
        };
        let outcomes = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
            .block_on(super::fleet::publish(&publish, bundle))?;
        println!("{what} v{version}: {signed}, published on {url}");
        if self.wait.is_none() {
            return Ok(ExitCode::SUCCESS);
        }
        let mut failed = false;
        for (gateway, outcome) in &outcomes {
            use super::fleet::Outcome;
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
                edgefn::text::Printable(&format!("{gateway}  {name} v{version}  {text}"))
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
    fn manifest(self) -> anyhow::Result<edgefn::config::FunctionManifest> {
        let mut m = match &self.manifest {
            Some(path) => super::fleet::read_manifest(path)?,
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
