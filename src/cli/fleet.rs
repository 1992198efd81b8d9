//! The fleet engineer's side: keys, and bundles built from a module and a
//! manifest (`edgefn keygen`, `edgefn deploy`, `edgefn remove`).

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};

use edgefn::bundle::{self, Body, Change, Targets};
use edgefn::config::FunctionManifest;
use edgefn::runtime::{Runtime, Target};

/// Writes a new private key to `out` (mode 0600; an existing file is not
/// replaced) and returns the public key as `deploy.trusted_keys` takes it.
pub fn keygen(out: &Path) -> anyhow::Result<String> {
    let key = edgefn::keys::generate_key().context("cannot draw a random key")?;
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(out)
        .with_context(|| format!("cannot create {}", out.display()))?;
    file.write_all(edgefn::keys::private_key_text(&key).as_bytes())
        .and_then(|()| file.sync_all())
        .with_context(|| format!("cannot write {}", out.display()))?;
    Ok(edgefn::keys::public_key_text(&key.verifying_key()))
}

/// Reads the private key file `path`.
pub fn read_signing_key(path: &Path) -> anyhow::Result<ed25519_dalek::SigningKey> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read the signing key {}", path.display()))?;
    edgefn::keys::parse_private_key(&text)
        .with_context(|| format!("{} is not an edgefn signing key", path.display()))
}

/// Reads a manifest file: one `[[functions]]` table, or the same keys at
/// the top level. A `module` in it is resolved against the file's
/// directory.
pub fn read_manifest(path: &Path) -> anyhow::Result<FunctionManifest> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read the manifest {}", path.display()))?;
    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Tables {
        functions: Vec<FunctionManifest>,
    }
    let parse = |text: &str| -> anyhow::Result<FunctionManifest> {
        let c = config::Config::builder()
            .add_source(config::File::from_str(text, config::FileFormat::Toml))
            .build()?;
        if c.get_array("functions").is_ok() {
            let mut t: Tables = c.try_deserialize()?;
            if t.functions.len() != 1 {
                bail!(
                    "holds {} [[functions]] tables; a manifest holds one",
                    t.functions.len()
                );
            }
            return Ok(t.functions.remove(0));
        }
        Ok(c.try_deserialize()?)
    };
    let mut m = parse(&text).with_context(|| format!("manifest {}", path.display()))?;
    if let Some(module) = &m.module {
        let base = path.parent().unwrap_or(Path::new("."));
        m.module = Some(base.join(module).to_string_lossy().into_owned());
    }
    Ok(m)
}

/// What every bundle carries besides its change: who it is for, its
/// version, its floor and its end.
#[derive(Debug, Clone)]
pub struct Release {
    /// The bundle's version.
    pub version: u64,
    /// The signed floor (`min_version`), if any.
    pub min_version: Option<u64>,
    /// Until when gateways accept it (ms since the epoch), if not for ever.
    pub expires_ms: Option<u64>,
    /// Who it is for.
    pub targets: Targets,
}

impl Release {
    /// A body making `change`, checked as a gateway checks it.
    fn body(self, change: Change) -> anyhow::Result<Body> {
        check_targets(&self.targets)?;
        let mut body = Body::new(self.version, self.targets, change);
        body.min_version = self.min_version;
        body.expires_ms = self.expires_ms;
        if let Some(problem) = body.version_problem() {
            bail!("{problem}");
        }
        Ok(body)
    }
}

/// What `edgefn deploy` makes a bundle of.
#[derive(Debug, Clone)]
pub struct DeployRequest {
    /// The manifest, flags applied; its `module` is the module's path
    /// unless `module` is given.
    pub manifest: FunctionManifest,
    /// The module's path, if not the manifest's.
    pub module: Option<PathBuf>,
    /// Version, floor, end and targets.
    pub release: Release,
}

/// Checks the request as a gateway would (the manifest's keys, the module
/// against the ABI and its limits, the version numbers) and seals it as a
/// bundle, signed with `key` (unsigned without one).
pub fn deploy_bundle(
    req: DeployRequest,
    key: Option<&ed25519_dalek::SigningKey>,
) -> anyhow::Result<Vec<u8>> {
    check_targets(&req.release.targets)?;
    let mut manifest = req.manifest;
    let path = match (req.module, manifest.module.take()) {
        (Some(p), _) => p,
        (None, Some(p)) => PathBuf::from(p),
        (None, None) => bail!("no module: give MODULE.wasm, or `module` in the manifest"),
    };
    let module = std::fs::read(&path).with_context(|| format!("cannot read {}", path.display()))?;
    let config = manifest.clone().check().map_err(|problems| {
        let list: Vec<String> = problems.iter().map(|p| format!("  - {p}")).collect();
        anyhow::anyhow!(
            "the manifest has {} problem(s):\n{}",
            problems.len(),
            list.join("\n")
        )
    })?;
    let runtime = Runtime::new(Target::for_host())?;
    runtime.load(
        &path.display().to_string(),
        &module,
        edgefn::registry::function_spec(&config, ""),
    )?;
    let body = req.release.body(Change::Deploy {
        manifest: Box::new(manifest),
        module,
        sha256: Vec::new(),
    })?;
    Ok(bundle::seal(body, key))
}

/// A signed tombstone for the function `name`.
pub fn remove_bundle(
    name: &str,
    release: Release,
    key: Option<&ed25519_dalek::SigningKey>,
) -> anyhow::Result<Vec<u8>> {
    let body = release.body(Change::Remove { name: name.into() })?;
    Ok(bundle::seal(body, key))
}

fn check_targets(t: &Targets) -> anyhow::Result<()> {
    if t.gateways.is_empty() && t.groups.is_empty() {
        bail!("no target: give --gateway ID or --group NAME (repeatable)");
    }
    for name in t.gateways.iter().chain(&t.groups) {
        if name.is_empty() || name.contains(['/', '+', '#', '\0']) {
            bail!("{name:?} cannot be a target: it is a topic level (no '/', '+', '#')");
        }
    }
    Ok(())
}

/// What `edgefn deploy --broker` (or `edgefn remove --broker`) publishes
/// and waits for.
#[derive(Debug, Clone)]
pub struct Publish {
    /// The control broker.
    pub broker: edgefn::config::BrokerClientConfig,
    /// The function.
    pub name: String,
    /// The bundle's version.
    pub version: u64,
    /// Who it is for.
    pub targets: Targets,
    /// How long to wait for the gateways' reports (none: do not wait).
    pub wait: Option<std::time::Duration>,
}

/// One targeted gateway's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// It runs the version (`state` `active`) or removed it, `ms` after the
    /// bundle was published.
    Applied {
        /// `active` or `removed`.
        state: String,
        /// Milliseconds from publishing to the report.
        ms: u128,
    },
    /// It refused the version.
    Refused {
        /// The reason code.
        code: String,
        /// The reason.
        text: String,
    },
    /// Offline (its last status): it applies the bundle when it connects.
    Pending,
    /// Online, but no report for this version before the wait ended.
    NoReport,
}

/// The deploy topics of a bundle for `name` with `targets`.
pub fn deploy_topics(name: &str, targets: &Targets) -> Vec<String> {
    let gateways = targets
        .gateways
        .iter()
        .map(|g| format!("edgefn/{g}/functions/{name}/deploy"));
    let groups = targets
        .groups
        .iter()
        .map(|g| format!("edgefn/groups/{g}/functions/{name}/deploy"));
    gateways.chain(groups).collect()
}

/// Publishes `bundle` retained on its deploy topics and, with a wait,
/// collects each targeted gateway's report: the gateways named, and those
/// whose status lists a group named. Returns them by gateway id.
pub async fn publish(
    p: &Publish,
    bundle: Vec<u8>,
) -> anyhow::Result<std::collections::BTreeMap<String, Outcome>> {
    use rumqttc::v5::mqttbytes::QoS;
    use rumqttc::v5::mqttbytes::v5::{Filter, Packet};
    use rumqttc::v5::{AsyncClient, Event};
    use std::collections::{BTreeMap, HashMap};
    use std::time::Instant;

    let mut o = edgefn::broker_client::options(&p.broker, bundle.len());
    o.set_clean_start(true);
    let (client, mut events) = AsyncClient::new(o, 64);
    // Subscribed with the status topics, it comes back after the retained
    // statuses (QoS 1 like them, so it queues behind them): from then on,
    // which gateways are in which group is known.
    let marker = format!("edgefn/deploy-tool/{}", p.broker.client_id);
    let topics = deploy_topics(&p.name, &p.targets);
    let mut gateways: HashMap<String, (bool, Vec<String>)> = HashMap::new();
    let mut reports: HashMap<String, serde_json::Value> = HashMap::new();
    let mut first_seen: HashMap<String, u128> = HashMap::new();
    let mut published: Option<Instant> = None;
    // The bundles' PUBACKs and the marker's.
    let mut unacked = topics.len() + 1;
    let connect_limit = std::time::Duration::from_secs(10);
    let deadline = Instant::now() + connect_limit + p.wait.unwrap_or_default();
    let outcomes = |gateways: &HashMap<String, (bool, Vec<String>)>,
                    reports: &HashMap<String, serde_json::Value>,
                    first_seen: &HashMap<String, u128>| {
        let mut targeted: Vec<&String> = p.targets.gateways.iter().collect();
        for (g, (_, groups)) in gateways {
            if groups.iter().any(|x| p.targets.groups.contains(x)) && !targeted.contains(&g) {
                targeted.push(g);
            }
        }
        let mut out = BTreeMap::new();
        for g in targeted {
            let report = reports.get(g);
            let outcome = match report {
                Some(r)
                    if r["version"] == p.version
                        && (r["state"] == "active" || r["state"] == "removed") =>
                {
                    Outcome::Applied {
                        state: r["state"].as_str().unwrap_or_default().to_owned(),
                        ms: first_seen.get(g).copied().unwrap_or_default(),
                    }
                }
                Some(r) if r["refused"]["version"] == p.version => Outcome::Refused {
                    code: r["refused"]["code"].as_str().unwrap_or_default().to_owned(),
                    text: r["refused"]["text"].as_str().unwrap_or_default().to_owned(),
                },
                _ if gateways.get(g).is_some_and(|(online, _)| *online) => Outcome::NoReport,
                _ => Outcome::Pending,
            };
            out.insert(g.clone(), outcome);
        }
        out
    };
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let event = match tokio::time::timeout(left, events.poll()).await {
            Ok(e) => e,
            Err(_) if published.is_some() => break,
            Err(_) => bail!(
                "no answer from the broker {}:{} within {connect_limit:?}",
                p.broker.host,
                p.broker.port
            ),
        };
        match event {
            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                let status = Filter::new("edgefn/+/status", QoS::AtLeastOnce);
                let function = Filter::new(
                    format!("edgefn/+/functions/{}/status", p.name),
                    QoS::AtLeastOnce,
                );
                let marker = Filter::new(marker.clone(), QoS::AtLeastOnce);
                client.subscribe_many([status, function, marker]).await?;
            }
            Ok(Event::Incoming(Packet::SubAck(_))) => {
                client
                    .publish(marker.clone(), QoS::AtLeastOnce, false, "")
                    .await?;
            }
            Ok(Event::Incoming(Packet::Publish(m))) => {
                let topic = String::from_utf8_lossy(&m.topic).into_owned();
                if topic == marker {
                    if published.is_none() {
                        for t in &topics {
                            client
                                .publish(t.clone(), QoS::AtLeastOnce, true, bundle.clone())
                                .await?;
                        }
                        published = Some(Instant::now());
                    }
                    continue;
                }
                let Ok(json) = serde_json::from_slice::<serde_json::Value>(&m.payload) else {
                    continue;
                };
                let mut levels = topic.split('/');
                let (Some("edgefn"), Some(gateway)) = (levels.next(), levels.next()) else {
                    continue;
                };
                let gateway = gateway.to_owned();
                if levels.next() == Some("status") {
                    let groups = json["groups"]
                        .as_array()
                        .map(|a| {
                            a.iter()
                                .filter_map(|g| g.as_str().map(str::to_owned))
                                .collect()
                        })
                        .unwrap_or_default();
                    gateways.insert(gateway, (json["online"] == true, groups));
                } else {
                    if let Some(at) = published
                        && json["version"] == p.version
                    {
                        first_seen
                            .entry(gateway.clone())
                            .or_insert_with(|| at.elapsed().as_millis());
                    }
                    reports.insert(gateway, json);
                }
            }
            Ok(Event::Incoming(Packet::PubAck(_))) => {
                unacked = unacked.saturating_sub(1);
            }
            Ok(_) => {}
            Err(e) => bail!(
                "cannot reach the broker {}:{}: {e}",
                p.broker.host,
                p.broker.port
            ),
        }
        if published.is_some() && unacked == 0 {
            if p.wait.is_none() {
                break;
            }
            let now = outcomes(&gateways, &reports, &first_seen);
            if now.values().all(|o| *o != Outcome::NoReport) {
                break;
            }
        }
    }
    let _ = client.disconnect().await;
    Ok(if p.wait.is_some() {
        outcomes(&gateways, &reports, &first_seen)
    } else {
        BTreeMap::new()
    })
}

/// One gateway as `edgefn status` shows it, from its retained status
/// topics.
#[derive(Debug, Clone, Default)]
pub struct GatewayView {
    /// Its id.
    pub gateway: String,
    /// Its last gateway status (JSON), if any.
    pub status: Option<serde_json::Value>,
    /// Its functions' statuses (JSON), by name.
    pub functions: std::collections::BTreeMap<String, serde_json::Value>,
}

/// Reads every gateway's retained status topics from the control broker
/// (`gateway` and `group` narrow the list).
pub async fn status(
    broker: &edgefn::config::BrokerClientConfig,
    gateway: Option<&str>,
    group: Option<&str>,
) -> anyhow::Result<Vec<GatewayView>> {
    use rumqttc::v5::mqttbytes::QoS;
    use rumqttc::v5::mqttbytes::v5::{Filter, Packet};
    use rumqttc::v5::{AsyncClient, Event};

    let mut o = edgefn::broker_client::options(broker, 1 << 20);
    o.set_clean_start(true);
    let (client, mut events) = AsyncClient::new(o, 16);
    // Subscribed last, it comes back after every retained status: QoS 1
    // like them, so it queues behind them (a QoS 0 message overtakes the
    // QoS 1 ones a broker holds back beyond its in-flight window).
    let marker = format!("edgefn/status-tool/{}", broker.client_id);
    let mut views: std::collections::BTreeMap<String, GatewayView> = Default::default();
    let limit = std::time::Duration::from_secs(10);
    tokio::time::timeout(limit, async {
        loop {
            match events.poll().await? {
                Event::Incoming(Packet::ConnAck(_)) => {
                    client
                        .subscribe_many([
                            Filter::new("edgefn/+/status", QoS::AtLeastOnce),
                            Filter::new("edgefn/+/functions/+/status", QoS::AtLeastOnce),
                            Filter::new(marker.clone(), QoS::AtLeastOnce),
                        ])
                        .await?;
                }
                Event::Incoming(Packet::SubAck(_)) => {
                    client
                        .publish(marker.clone(), QoS::AtLeastOnce, false, "")
                        .await?;
                }
                Event::Incoming(Packet::Publish(m)) => {
                    let topic = String::from_utf8_lossy(&m.topic).into_owned();
                    if topic == marker {
                        return Ok::<_, anyhow::Error>(());
                    }
                    let Ok(json) = serde_json::from_slice::<serde_json::Value>(&m.payload) else {
                        continue;
                    };
                    let levels: Vec<&str> = topic.split('/').collect();
                    let view = views
                        .entry(levels[1].to_owned())
                        .or_insert_with(|| GatewayView {
                            gateway: levels[1].to_owned(),
                            ..Default::default()
                        });
                    match levels.as_slice() {
                        [_, _, "status"] => view.status = Some(json),
                        [_, _, "functions", name, "status"] => {
                            view.functions.insert((*name).to_owned(), json);
                        }
                        _ => {}
                    }
                }
                _ => {}
            }
        }
    })
    .await
    .map_err(|_| {
        anyhow::anyhow!(
            "no answer from the broker {}:{} within {limit:?}",
            broker.host,
            broker.port
        )
    })??;
    let _ = client.disconnect().await;
    Ok(views
        .into_values()
        .filter(|v| gateway.is_none_or(|g| v.gateway == g))
        .filter(|v| {
            group.is_none_or(|g| {
                v.status.as_ref().is_some_and(|s| {
                    s["groups"]
                        .as_array()
                        .is_some_and(|a| a.iter().any(|x| x == g))
                })
            })
        })
        .collect())
}

/// `edgefn status` as a table: one line per gateway, its functions after.
pub fn render_status(views: &[GatewayView], now_ms: u64) -> String {
    let mut out = String::from(
        "gateway  online  updated  version  functions (version, state, failed messages/min, last failure, last refusal)\n",
    );
    for v in views {
        let s = v.status.clone().unwrap_or_default();
        let online = match s["online"].as_bool() {
            Some(true) => "yes",
            Some(false) => "no",
            None => "?",
        };
        let updated = s["updated_ms"].as_u64().map_or("?".to_owned(), |t| {
            format!("{}s ago", now_ms.saturating_sub(t) / 1000)
        });
        let version = s["edgefn_version"].as_str().unwrap_or("?");
        let mut functions: Vec<String> = Vec::new();
        for f in s["functions"].as_array().into_iter().flatten() {
            let name = f["name"].as_str().unwrap_or("?");
            let reported = v.functions.get(name);
            let state = reported
                .and_then(|r| r["state"].as_str())
                .unwrap_or(f["origin"].as_str().unwrap_or("?"));
            let mut line = format!("{name} v{} {state}", f["version"]);
            if let Some(rate) = f["failed_per_min"].as_f64() {
                line.push_str(&format!(" {rate:.1} failed/min"));
            }
            if let Some(last) = f["last_failure"].as_str() {
                line.push_str(&format!(" (last failure: {last})"));
            }
            functions.push(line);
        }
        for (name, r) in &v.functions {
            if !functions.iter().any(|f| f.starts_with(&format!("{name} "))) {
                functions.push(format!("{name} {}", r["state"].as_str().unwrap_or("?")));
            }
        }
        for (name, r) in &v.functions {
            if let Some(code) = r["refused"]["code"].as_str() {
                functions.push(format!("{name}: last refused {code}"));
            }
        }
        // Anything on the status topics may have been published by anyone
        // who can publish there: printed escaped.
        let line = format!(
            "{}  {online}  {updated}  {version}  {}",
            v.gateway,
            functions.join("; ")
        );
        out.push_str(&edgefn::text::printable(&line));
        out.push('\n');
    }
    out
}
