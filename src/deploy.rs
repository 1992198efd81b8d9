//! Applying bundles on the gateway: verify everything, persist, then swap.
//!
//! [`Deployer::apply`] takes a bundle as received and either changes what
//! runs or refuses it with a [`Refused`] reason, leaving what runs
//! untouched. In order: the bundle's own checks ([`bundle::open`]); its
//! version numbers (at most [`bundle::MAX_VERSION`], its floor not above
//! it); its end (`expires_ms`) not passed; a version not below the floor
//! and higher than any accepted or removed before for the name (both kept
//! in SQLite, so a replayed or restored older bundle cannot downgrade the
//! gateway; the same version again is [`Applied::Unchanged`]); a name not
//! defined in the configuration file; the manifest as strictly as a
//! `[[functions]]` table; the module compiled and checked against the ABI;
//! one instance started (`_initialize`, `edgefn_init`) within the
//! function's limits, as a health check; the bundle persisted (synced).
//! Only then is the new version installed in the registry.
//!
//! A new version is then on probation for its first minute: with
//! `rollback = "auto"` it is rolled back only on evidence that no input
//! can produce (its instances fail to start; docs/DEPLOY.md "Rollback"),
//! never below the floor; with `"never"`, not at all (a broken version is
//! logged and counted).
//!
//! At start-up [`Deployer::restore`] installs the deployed functions from
//! SQLite, before any network connection, each checked again as it was
//! when it came (its end aside: a bundle once accepted keeps running), and
//! none whose name the configuration file defines.

use std::collections::BTreeSet;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::broadcast;

use crate::bundle::{self, Body, Change, Refusal, Verifier};
use crate::clock::now_ms;
use crate::config::{Config, DeployConfig, Rollback};
use crate::metrics::{Metrics, event};
use crate::registry::{Deployed, Origin, Registry};
use crate::runtime::{LoadError, Runtime};
use crate::store::{Deployments, StoreError};

/// Why a bundle was not applied: a stable code and a text.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{code}: {text}")]
pub struct Refused {
    /// Stable, `snake_case` (docs/DEPLOY.md lists them).
    pub code: &'static str,
    /// What was wrong, for a person.
    pub text: String,
    /// The refused bundle's version, when it could be read.
    pub version: Option<u64>,
}

impl Refused {
    pub(crate) fn new(code: &'static str, text: impl Into<String>) -> Refused {
        Refused {
            code,
            text: text.into(),
            version: None,
        }
    }
}

impl From<Refusal> for Refused {
    fn from(r: Refusal) -> Refused {
        Refused::new(r.code(), r.to_string())
    }
}

/// What an applied bundle did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Applied {
    /// `name` now runs `version`.
    Deployed {
        /// The function.
        name: String,
        /// Its version.
        version: u64,
        /// SHA-256 of its module, hex.
        sha256: String,
    },
    /// Nothing to do: `version` is the highest already accepted or removed
    /// for `name` (a retained bundle received again, after a reconnect).
    Unchanged {
        /// The function.
        name: String,
        /// The version.
        version: u64,
    },
    /// `name` no longer runs (tombstone `version`).
    Removed {
        /// The function.
        name: String,
        /// The tombstone's version.
        version: u64,
    },
}

/// How long a new version is on probation.
const PROBATION: Duration = Duration::from_secs(60);

/// Failed instance starts that, when they are more than half of its
/// starts in probation, make a new version broken: one failed start can be
/// chance (a clock read in `edgefn_init`), three in a minute are not.
const BROKEN_STARTS: u64 = 3;

/// How often a version on probation is looked at.
const PROBATION_CHECK: Duration = Duration::from_millis(100);

/// What happened to a deployed function without a bundle asking.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A new version failed its probation; `to` runs again (none: the
    /// function no longer runs).
    RolledBack {
        /// The function.
        name: String,
        /// The version that failed.
        from: u64,
        /// The version that runs again.
        to: Option<u64>,
        /// SHA-256 (hex) of what runs again.
        sha256: Option<String>,
        /// Why.
        reason: String,
    },
}

/// Applies bundles to a running gateway (see the module doc).
pub struct Deployer {
    /// What bundles are checked against.
    verifier: Verifier,
    /// Versions and bundles.
    store: Arc<Mutex<Deployments>>,
    /// Names the configuration file defines: not replaceable by a bundle.
    config_names: BTreeSet<String>,
    /// Compiles modules.
    runtime: Arc<Runtime>,
    /// Where functions are installed.
    registry: Arc<Registry>,
    /// The upstream topic prefix (bounds emitted topics).
    topic_prefix: String,
    /// Applies one bundle at a time.
    applying: tokio::sync::Mutex<()>,
    /// Rollbacks, for the status topics.
    events: broadcast::Sender<Event>,
    /// Counts rollbacks.
    metrics: Arc<Metrics>,
    /// The probations running, ended by [`Deployer::stop`].
    probations: Mutex<tokio::task::JoinSet<()>>,
}

impl Deployer {
    /// A deployer for the gateway `gateway`, with its `[deploy]` section
    /// `config`.
    pub fn new(
        gateway: &Config,
        config: &DeployConfig,
        store: Deployments,
        runtime: Arc<Runtime>,
        registry: Arc<Registry>,
        metrics: Arc<Metrics>,
    ) -> Deployer {
        let gateway_id = &gateway.gateway.id;
        let topic_prefix = gateway
            .upstream
            .as_ref()
            .map_or("", |u| u.topic_prefix.as_str());
        Deployer {
            verifier: Verifier {
                trusted_keys: config.trusted_keys.clone(),
                allow_unsigned: config.allow_unsigned,
                gateway_id: gateway_id.to_owned(),
                groups: config.groups.clone(),
                max_size: config.max_bundle_size,
            },
            store: Arc::new(Mutex::new(store)),
            config_names: gateway.functions.iter().map(|f| f.name.clone()).collect(),
            runtime,
            registry,
            topic_prefix: topic_prefix.to_owned(),
            applying: tokio::sync::Mutex::new(()),
            events: broadcast::channel(64).0,
            metrics,
            probations: Mutex::new(tokio::task::JoinSet::new()),
        }
    }

    /// The function and version of `bytes`, if it is a bundle this
    /// gateway's checks accept (signature, hash, targets); nothing else
    /// is looked at.
    pub fn peek(&self, bytes: &[u8]) -> Option<(String, u64)> {
        let body = bundle::open(bytes, &self.verifier).ok()?;
        Some((body.name().to_owned(), body.version))
    }

    /// Refuses a bundle for a function the configuration file defines:
    /// its `[[functions]]` table wins, at run time and at restore alike.
    fn not_configured(&self, name: &str) -> Result<(), Refused> {
        if self.config_names.contains(name) {
            return Err(Refused::new(
                "defined_in_config",
                format!(
                    "{name} is defined in the gateway's configuration file, which wins over a \
                     deployed bundle; remove its [[functions]] table to run a deployed version"
                ),
            ));
        }
        Ok(())
    }

    /// Ends the probations still running (at shutdown: a version on
    /// probation when the gateway stops is kept, as after a restart).
    pub fn stop(&self) {
        self.probations.lock().expect("probations lock").abort_all();
    }

    /// Follows rollbacks.
    pub fn events(&self) -> broadcast::Receiver<Event> {
        self.events.subscribe()
    }

    /// Checks `bytes` and, if every check passes, makes it what runs (see
    /// the module doc). Nothing changes when it is refused. With
    /// `topic_name` (the function a deploy topic names), a bundle for
    /// another function is refused (`wrong_topic`).
    pub async fn apply(
        self: &Arc<Self>,
        bytes: &[u8],
        topic_name: Option<&str>,
    ) -> Result<Applied, Refused> {
        self.apply_unless_superseded(bytes, topic_name, &|_, _| false)
            .await
    }

    /// [`Deployer::apply`], giving up with `superseded` when
    /// `newer(name, version)` says a newer bundle for the function is
    /// waiting: asked before the module is compiled and again before the
    /// bundle is persisted, so a deploy being checked never holds up the
    /// one that replaces it. Nothing changes when it gives up.
    pub async fn apply_unless_superseded(
        self: &Arc<Self>,
        bytes: &[u8],
        topic_name: Option<&str>,
        newer: &(dyn Fn(&str, u64) -> bool + Send + Sync),
    ) -> Result<Applied, Refused> {
        let _one_at_a_time = self.applying.lock().await;
        let body = bundle::open(bytes, &self.verifier)?;
        let version = body.version;
        let applied = self
            .apply_body(body, bytes, topic_name, newer)
            .await
            .map_err(|r| Refused {
                version: Some(version),
                ..r
            })?;
        // The versions no longer in memory leave the artifact cache (a
        // bundle received again changed nothing: nothing to look at).
        if !matches!(applied, Applied::Unchanged { .. }) {
            let runtime = self.runtime.clone();
            let _ = tokio::task::spawn_blocking(move || runtime.prune_artifacts()).await;
        }
        Ok(applied)
    }

    /// [`Deployer::apply`] once the bundle is open.
    async fn apply_body(
        self: &Arc<Self>,
        body: Body,
        bytes: &[u8],
        topic_name: Option<&str>,
        newer: &(dyn Fn(&str, u64) -> bool + Send + Sync),
    ) -> Result<Applied, Refused> {
        if let Some(t) = topic_name
            && t != body.name()
        {
            return Err(Refused::new(
                "wrong_topic",
                format!("a bundle for {} on the deploy topic of {t}", body.name()),
            ));
        }
        if let Some(problem) = body.version_problem() {
            return Err(Refused::new("invalid_manifest", problem));
        }
        let now = now_ms();
        if body.expired_at(now) {
            return Err(Refused::new(
                "expired",
                format!(
                    "the bundle's end (expires_ms {}) is {} s before this gateway's clock; \
                     sign it again to renew it",
                    body.expires_ms.unwrap_or_default(),
                    now.saturating_sub(body.expires_ms.unwrap_or_default()) / 1000
                ),
            ));
        }
        let name = body.name().to_owned();
        let version = body.version;
        let recorded = self.blocking(move |s| s.versions(&name)).await?;
        let name = body.name().to_owned();
        above_floor(&name, version, recorded.and_then(|r| r.floor))?;
        let highest = recorded.map(|r| r.highest);
        if highest == Some(version) {
            return Ok(Applied::Unchanged { name, version });
        }
        if let Some(h) = highest
            && version < h
        {
            return Err(Refused::new(
                "not_newer",
                format!(
                    "version {version} of {name} is not higher than {h}, the highest this gateway accepted or removed"
                ),
            ));
        }
        self.not_configured(&name)?;
        let superseded = || {
            if newer(&name, version) {
                Err(Refused::new(
                    "superseded",
                    format!(
                        "a newer bundle for {name} arrived while version {version} was being applied"
                    ),
                ))
            } else {
                Ok(())
            }
        };
        superseded()?;
        match &body.change {
            Change::Deploy { sha256, .. } => {
                let sha256 = hex(sha256);
                let (function, rollback) = self.start(&body).await?;
                superseded()?;
                let stored = bytes.to_vec();
                let n = name.clone();
                let min_version = body.min_version;
                let floor = self
                    .blocking(move |s| {
                        s.deploy(&n, version, min_version, &stored)?;
                        s.versions(&n)
                    })
                    .await?
                    .and_then(|v| v.floor);
                let function = Arc::new(function);
                let previous = self.registry.reinstate(function.clone());
                tracing::info!(
                    function = %name,
                    version,
                    replaced = previous.as_ref().map(|p| p.version()),
                    "bundle applied"
                );
                {
                    let mut probations = self.probations.lock().expect("probations lock");
                    // Those that ended are let go of; the rest keep running.
                    while probations.try_join_next().is_some() {}
                    probations.spawn(self.clone().probation(function, previous, rollback, floor));
                }
                Ok(Applied::Deployed {
                    name,
                    version,
                    sha256,
                })
            }
            Change::Remove { .. } => {
                let n = name.clone();
                self.blocking(move |s| s.remove(&n, version)).await?;
                let removed = self.registry.remove(&name);
                // Its outcomes still in flight write no state from now on;
                // what one wrote since the delete above goes too.
                self.registry.forget_state(&name);
                let n = name.clone();
                if let Err(e) = self.blocking(move |s| s.delete_state(&n)).await {
                    tracing::warn!(function = %name, error = %e.text, "could not delete the removed function's last state writes; they are deleted with its next removal");
                }
                tracing::info!(
                    function = %name,
                    version,
                    removed = removed.map(|p| p.version()),
                    "removal applied"
                );
                Ok(Applied::Removed { name, version })
            }
        }
    }

    /// Installs every deployed function stored in SQLite. One that no
    /// longer passes its checks (a key since removed from `trusted_keys`,
    /// a module this edgefn cannot run) is logged and left out; the others
    /// run.
    pub async fn restore(&self) -> Result<usize, StoreError> {
        let stored = {
            let store = self.store.clone();
            tokio::task::spawn_blocking(move || store.lock().expect("deployments lock").all())
                .await
                .expect("deployments task")?
        };
        // All at once: each compiles (when its artifact is missing) on a
        // blocking thread of its own, so a Pi's cores share the work.
        let started = futures_util::future::join_all(stored.iter().map(|s| async {
            self.not_configured(&s.name)?;
            above_floor(&s.name, s.version, s.floor)?;
            match bundle::open(&s.bundle, &self.verifier) {
                Ok(body) => self.start(&body).await.map(|(f, _)| f),
                Err(r) => Err(r.into()),
            }
        }))
        .await;
        let mut restored = 0;
        for (s, started) in stored.iter().zip(started) {
            match started {
                Ok(function) => {
                    tracing::info!(function = %s.name, version = s.version, precompiled = function.pool().function().precompiled(), "deployed function restored");
                    self.registry.install(function);
                    restored += 1;
                }
                Err(e) if e.code == "defined_in_config" => tracing::warn!(
                    function = %s.name,
                    version = s.version,
                    error = %e.text,
                    "a deployed function is not restored: the configuration file's runs"
                ),
                Err(e) => tracing::error!(
                    function = %s.name,
                    version = s.version,
                    code = e.code,
                    error = %e.text,
                    "a deployed function could not be restored and does not run"
                ),
            }
        }
        Ok(restored)
    }

    /// Watches a new version for its first [`PROBATION`]. It is broken
    /// when its instances fail to start: at least [`BROKEN_STARTS`] failed
    /// starts, more than half of its starts. With `rollback = "auto"` a
    /// broken version is rolled back (to the version before, or, if there
    /// was none, the function stops); with `"never"` it is kept, logged and
    /// counted (`rollbacks_declined`). Nothing else counts, since any other failure can be
    /// caused by a message, and a message must not be able to bring back
    /// an older version (docs/DEPLOY.md "Rollback"). For the same reason a
    /// function that uses state is never rolled back: its `edgefn_init`
    /// can read state that messages wrote. Never below `floor`. Ends early
    /// when another version replaces it.
    async fn probation(
        self: Arc<Self>,
        new: Arc<Deployed>,
        previous: Option<Arc<Deployed>>,
        rollback: Rollback,
        floor: Option<u64>,
    ) {
        if new.pool().function().uses_state() {
            return;
        }
        let started = Instant::now();
        let counts = new.pool().counts().clone();
        let reason = loop {
            tokio::time::sleep(PROBATION_CHECK).await;
            if !self.registry.is_running(&new) || started.elapsed() >= PROBATION {
                return;
            }
            let starts = counts.starts.load(Ordering::Relaxed);
            let failed = counts.failed_starts.load(Ordering::Relaxed);
            if failed >= BROKEN_STARTS && failed * 2 > starts {
                break format!("{failed} of its {starts} instance starts failed");
            }
        };
        let last = counts.last_failure.lock().expect("counts lock").clone();
        let reason = match last {
            Some(l) => format!("{reason}; the last: {l}"),
            None => reason,
        };
        let _one_at_a_time = self.applying.lock().await;
        if !self.registry.is_running(&new) {
            return;
        }
        let name = new.name().to_owned();
        if rollback == Rollback::Never {
            event!(
                self.metrics.rollbacks_declined,
                error,
                function = %name,
                version = new.version(),
                reason,
                "a new version is broken, but its bundle says rollback = \"never\": it keeps running; sign a fixed version"
            );
            return;
        }
        let below = |v: u64| floor.is_some_and(|f| v < f);
        if previous.as_ref().is_some_and(|p| below(p.version())) {
            event!(
                self.metrics.rollbacks_declined,
                error,
                function = %name,
                version = new.version(),
                previous = previous.as_ref().map(|p| p.version()),
                floor,
                reason,
                "a new version is broken, but the version before is below the floor (min_version): it keeps running; sign a fixed version"
            );
            return;
        }
        Metrics::add(&self.metrics.rollbacks, 1);
        let n = name.clone();
        if let Err(e) = self.blocking(move |s| s.roll_back(&n)).await {
            tracing::error!(function = %name, error = %e.text, "could not record a rollback; rolling back in memory only");
        }
        let to = previous.as_ref().map(|p| p.version());
        match &previous {
            Some(p) => {
                self.registry.reinstate(p.clone());
            }
            None => {
                self.registry.remove(&name);
            }
        }
        tracing::error!(function = %name, from = new.version(), to, reason, "a new version failed its probation and was rolled back");
        let _ = self.events.send(Event::RolledBack {
            name,
            from: new.version(),
            to,
            sha256: previous
                .as_ref()
                .and_then(|p| p.sha256().map(str::to_owned)),
            reason,
        });
    }

    /// Checks the deploy `body`'s manifest and module and starts the
    /// function's instances (one at once, as a health check). Also returns
    /// its rollback setting.
    async fn start(&self, body: &Body) -> Result<(Deployed, Rollback), Refused> {
        let Change::Deploy {
            manifest,
            module,
            sha256,
        } = &body.change
        else {
            unreachable!("start is called for deploys")
        };
        let config = manifest.as_ref().clone().check().map_err(|problems| {
            let list: Vec<String> = problems.iter().map(|p| p.to_string()).collect();
            Refused::new("invalid_manifest", list.join("; "))
        })?;
        let spec = self.registry.spec(&config, &self.topic_prefix);
        let origin = format!("bundle {} v{}", config.name, body.version);
        let runtime = self.runtime.clone();
        let module = module.clone();
        // Loading starts one instance, which runs `_initialize` and
        // `edgefn_init`: the health check.
        let function = tokio::task::spawn_blocking(move || {
            runtime.load(&origin, &module, spec).map_err(|e| match e {
                LoadError::Start { .. } => Refused::new("init_failed", e.to_string()),
                _ => Refused::new("invalid_module", e.to_string()),
            })
        })
        .await
        .expect("load task")?;
        let deployed = self
            .registry
            .start(function, &config, body.version, Origin::Deployed)
            .map_err(|e| Refused::new("init_failed", format!("cannot start its threads: {e}")))?;
        Ok((deployed.with_sha256(hex(sha256)), config.rollback))
    }

    /// Runs `f` on the store on a blocking thread; a store error refuses
    /// the bundle (`persist_failed`).
    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Deployments) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, Refused> {
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || f(&mut store.lock().expect("deployments lock")))
            .await
            .expect("deployments task")
            .map_err(|e| Refused::new("persist_failed", e.to_string()))
    }
}

/// Refuses `version` of `name` below `floor`, the floor recorded for it
/// (from the `min_version` of a bundle this gateway accepted).
fn above_floor(name: &str, version: u64, floor: Option<u64>) -> Result<(), Refused> {
    match floor {
        Some(floor) if version < floor => Err(Refused::new(
            "below_floor",
            format!(
                "version {version} of {name} is below {floor}, the min_version of a bundle this gateway accepted"
            ),
        )),
        _ => Ok(()),
    }
}

/// `bytes` in lowercase hex.
fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
