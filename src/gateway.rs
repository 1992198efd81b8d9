//! Builds the stages from a [`Config`], wires them with bounded channels,
//! and shuts them down in order.
//!
//! Startup: open the store, compile and check every function of the
//! configuration and install it in the [`Registry`] (the path every
//! function takes, see [`Gateway::install`]), start the pipeline, then the
//! forwarder, then ingest (last, so nothing arrives before there is
//! somewhere for it to go).
//!
//! Shutdown ([`run`]'s signal, or [`Gateway::shutdown`]): the gateway
//! holds a handle to every task it starts and stops them in this order,
//! each within a deadline (a task still running past it is named in the
//! log and aborted): ingest stops taking messages but keeps its
//! connection so acks can still be sent, and the scheduler and the
//! replayer stop handing on runs; the pipeline drains (every message it
//! holds is committed and acknowledged); then ingest disconnects, the
//! forwarder deletes what was acknowledged and disconnects, the control
//! connection and the metrics listener close, deploy probations end, and
//! the pools stop.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use tokio::sync::{Notify, mpsc, watch};

use crate::config::{BrokerClientConfig, Config, DeployBroker, FunctionConfig, LocalSource};
use crate::control::Control;
use crate::deploy::{Applied, Deployer, Refused};
use crate::forward::Forwarder;
use crate::ingest::mqtt::MqttIngest;
use crate::ingest::replay::Replayer;
use crate::ingest::schedule::Scheduler;
use crate::metrics::{Metrics, Snapshot, event};
use crate::pipeline::Pipeline;
use crate::registry::{Deployed, Origin, Registry};
use crate::runtime::pool::{FunctionMetrics, Pool};
use crate::runtime::{Runtime, Target};
use crate::store;

/// How long the pipeline may take to commit what it holds at shutdown
/// before the rest is left unacknowledged (to be redelivered). Well inside
/// systemd's default 90 s stop timeout.
const DRAIN_GRACE: Duration = Duration::from_secs(10);

/// Capacity of the queue of functions' local publishes.
const LOCAL_PUBLISH_QUEUE: usize = 1024;

/// A running gateway.
pub struct Gateway {
    /// Turned true to stop.
    shutdown: watch::Sender<bool>,
    /// Turned true when the pipeline has drained.
    drained: watch::Sender<bool>,
    /// Ingest task(s).
    ingest: Vec<tokio::task::JoinHandle<()>>,
    /// Forwarder task, if an upstream is configured.
    forward: Option<tokio::task::JoinHandle<()>>,
    /// Fires scheduled runs.
    scheduler: tokio::task::JoinHandle<()>,
    /// Hands replayed dead letters on.
    replayer: tokio::task::JoinHandle<()>,
    /// The metrics listener, with `[metrics] listen`.
    metrics_server: Option<tokio::task::JoinHandle<()>>,
    /// Periodic status line.
    status: tokio::task::JoinHandle<()>,
    /// The pipeline.
    pipeline: crate::pipeline::Running,
    /// The functions (their pools are stopped last).
    registry: Arc<Registry>,
    /// The upstream topic prefix functions' topics are checked against.
    topic_prefix: String,
    /// Applies bundles, with a `[deploy]` section.
    deployer: Option<Arc<Deployer>>,
    /// The control connection, with a `[deploy]` section.
    control: Option<tokio::task::JoinHandle<()>>,
    /// Gateway counters.
    metrics: Arc<Metrics>,
    /// Reads them, gauges included.
    counts: Counts,
    /// The embedded broker, if any.
    #[cfg(feature = "embedded-broker")]
    broker: Option<crate::ingest::embedded::EmbeddedBroker>,
    /// Compiles functions; keeps the engine (and its epoch ticker) alive.
    runtime: Arc<Runtime>,
    /// The metrics model.
    telemetry: Arc<crate::telemetry::Telemetry>,
}

/// How often the status line is logged.
const STATUS_INTERVAL: Duration = Duration::from_secs(60);

impl Gateway {
    /// Starts everything `config` describes.
    ///
    /// Fails if the store cannot be opened, a module does not load, or the
    /// embedded broker cannot listen; nothing is left running then.
    pub async fn start(config: Config) -> anyhow::Result<Gateway> {
        let metrics = Arc::new(Metrics::default());
        let started = std::time::Instant::now();
        // First, so a port in use stops start-up before anything runs.
        let metrics_listener = match config.metrics.listen {
            Some(addr) => Some(
                tokio::net::TcpListener::bind(addr)
                    .await
                    .with_context(|| format!("cannot listen on metrics.listen {addr}"))?,
            ),
            None => None,
        };
        let (writer, reader) = store::open(&config.gateway.data_dir, &config.buffer)
            .context("cannot open the buffer")?;
        tracing::info!(
            data_dir = %config.gateway.data_dir.display(),
            buffered = reader.pending().unwrap_or(0),
            "buffer opened"
        );

        let artifacts = config.gateway.data_dir.join("artifacts");
        let runtime = Arc::new(
            Runtime::new(Target::for_host())?
                .with_artifacts(&artifacts)
                .with_context(|| format!("cannot create {}", artifacts.display()))?,
        );
        let registry = Arc::new(Registry::default());
        registry.preload_state(
            reader
                .function_states()
                .context("cannot read the functions' state")?,
        );
        let last_runs = reader
            .schedule_runs()
            .context("cannot read the functions' last scheduled runs")?;
        let topic_prefix = config
            .upstream
            .as_ref()
            .map_or(String::new(), |u| u.topic_prefix.clone());
        for f in &config.functions {
            let function = start_function(&runtime, &registry, f, &topic_prefix, Origin::Config)
                .await
                .with_context(|| format!("function {:?}", f.name))?;
            registry.install(function);
        }
        // Deployed functions, before any network connection.
        let deployer = match &config.deploy {
            Some(d) => {
                let deployments = store::Deployments::open(&config.gateway.data_dir)
                    .context("cannot open the deployed functions")?;
                let deployer = Deployer::new(
                    &config,
                    d,
                    deployments,
                    runtime.clone(),
                    registry.clone(),
                    metrics.clone(),
                );
                deployer
                    .restore()
                    .await
                    .context("cannot read the deployed functions")?;
                Some(Arc::new(deployer))
            }
            None => None,
        };
        {
            let rt = runtime.clone();
            tokio::task::spawn_blocking(move || rt.prune_artifacts()).await?;
        }

        let (shutdown, shutdown_rx) = watch::channel(false);
        let (drained, drained_rx) = watch::channel(false);
        let committed = Arc::new(Notify::new());
        let (publish_tx, publish_rx) = mpsc::channel(LOCAL_PUBLISH_QUEUE);

        let in_flight = match &config.local.source {
            LocalSource::Broker(b) => usize::from(b.in_flight),
            LocalSource::Embedded(_) => 1024,
        };
        let (deliveries_tx, deliveries_rx) = mpsc::channel(in_flight);
        let commit_latency = Arc::new(crate::metrics::Window::default());
        let pipeline = Pipeline {
            registry: registry.clone(),
            writer,
            max_batch: config.buffer.max_batch,
            commit_delay: config.buffer.commit_delay,
            max_message_size: config.local.max_message_size,
            metrics: metrics.clone(),
            committed: committed.clone(),
            local_publish: Some(publish_tx),
            commit_latency: commit_latency.clone(),
        }
        .start(deliveries_rx);
        let scheduler = tokio::spawn(
            Scheduler::new(registry.clone(), deliveries_tx.clone(), last_runs)
                .run(shutdown_rx.clone()),
        );
        let replayer = tokio::spawn(
            Replayer {
                store: store::Inspector::open(&config.gateway.data_dir)
                    .context("cannot open the dead letters")?,
                deliveries: deliveries_tx.clone(),
            }
            .run(shutdown_rx.clone()),
        );

        // What an external broker's persistent session may hold for us.
        let session_filters = reader.session_filters();
        let remembered = match &config.local.source {
            LocalSource::Broker(b) => reader
                .local_subscriptions(&b.session_name())
                .context("cannot read the local broker session's filters")?,
            LocalSource::Embedded(_) => Vec::new(),
        };
        // The built-in broker's retained messages, and where it keeps them.
        let retained = match &config.local.source {
            LocalSource::Embedded(_) => Some((
                reader
                    .retained()
                    .context("cannot read the retained messages")?,
                reader.retained_messages(),
            )),
            LocalSource::Broker(_) => None,
        };
        let incarnation = reader.incarnation();
        let outbox = reader.outbox();
        let reader = Arc::new(Mutex::new(reader));
        let forward = config.upstream.clone().map(|upstream| {
            tokio::spawn(
                Forwarder {
                    config: upstream,
                    gateway_id: config.gateway.id.clone(),
                    incarnation,
                    outbox,
                    reader: reader.clone(),
                    committed,
                    metrics: metrics.clone(),
                }
                .run(shutdown_rx.clone()),
            )
        });
        if forward.is_none() {
            tracing::warn!("no [upstream] configured: records stay in the buffer");
        }
        for w in &config.warnings {
            tracing::warn!(key = w.key, "{}", w.message);
        }

        let mut ingest = Vec::new();
        #[cfg(feature = "embedded-broker")]
        let mut broker = None;
        match &config.local.source {
            LocalSource::Broker(b) => {
                let filters = registry.filters();
                let stale: Vec<String> = remembered
                    .into_iter()
                    .filter(|f| !filters.borrow().contains(f))
                    .collect();
                // Until the broker confirms the unsubscriptions, the session
                // may hold both.
                session_filters.save(
                    &b.session_name(),
                    filters.borrow().iter().chain(&stale).cloned().collect(),
                );
                ingest.push(tokio::spawn(
                    MqttIngest {
                        broker: b.clone(),
                        filters,
                        stale,
                        session_filters,
                        max_message_size: config.local.max_message_size,
                        deliveries: Some(deliveries_tx),
                        publishes: publish_rx,
                        metrics: metrics.clone(),
                    }
                    .run(shutdown_rx.clone(), drained_rx.clone()),
                ));
            }
            #[cfg(feature = "embedded-broker")]
            LocalSource::Embedded(embedded) => {
                let b = crate::ingest::embedded::EmbeddedBroker::start(
                    embedded,
                    config.local.max_message_size,
                    retained,
                    registry.clone(),
                    deliveries_tx,
                    metrics.clone(),
                )
                .await
                .with_context(|| {
                    format!("cannot start the embedded broker on {}", embedded.listen)
                })?;
                tracing::info!(listen = %b.local_addr(), tls_listen = ?b.tls_addr(), "embedded broker listening");
                ingest.push(tokio::spawn(forward_local_publishes(
                    b.publisher(),
                    publish_rx,
                    metrics.clone(),
                )));
                broker = Some(b);
            }
            #[cfg(not(feature = "embedded-broker"))]
            LocalSource::Embedded(_) => {
                drop(retained);
                anyhow::bail!("this edgefn was built without the embedded-broker feature")
            }
        }

        let counts = Counts {
            metrics: metrics.clone(),
            #[cfg(feature = "embedded-broker")]
            broker: broker.as_ref().map(|b| b.publisher()),
        };
        let wear = Arc::new(crate::telemetry::DiskWear::default());
        let telemetry = Arc::new(crate::telemetry::Telemetry {
            gateway_id: config.gateway.id.clone(),
            started,
            snapshot: Box::new({
                let counts = counts.clone();
                move || counts.snapshot()
            }),
            registry: registry.clone(),
            commit_latency,
            buffer: Box::new(move || {
                let r = reader.lock().expect("reader lock");
                let oldest = r.oldest_created_ms().unwrap_or_else(|e| {
                    tracing::warn!(error = %e, "cannot read the oldest buffered record");
                    None
                });
                (r.records(), r.outbox_bytes(), oldest)
            }),
            wear: wear.clone(),
        });
        let metrics_server = match metrics_listener {
            Some(listener) => {
                tracing::info!(listen = %listener.local_addr()?, "metrics listening (/metrics, /metrics.json)");
                Some(tokio::spawn(crate::telemetry::serve(
                    listener,
                    telemetry.clone(),
                    metrics.clone(),
                    shutdown_rx.clone(),
                )))
            }
            None => None,
        };

        let control = match (&config.deploy, &deployer) {
            (Some(d), Some(deployer)) => {
                #[cfg(feature = "embedded-broker")]
                let embedded = broker.as_ref().map(|b| b.local_addr());
                #[cfg(not(feature = "embedded-broker"))]
                let embedded = None;
                let broker = control_broker(&config, d.broker, embedded);
                Some(tokio::spawn(
                    Control {
                        broker,
                        gateway_id: config.gateway.id.clone(),
                        groups: d.groups.clone(),
                        deployer: deployer.clone(),
                        registry: registry.clone(),
                        max_bundle_size: d.max_bundle_size,
                        telemetry: telemetry.clone(),
                        metrics_interval: config.metrics.interval,
                        metrics: metrics.clone(),
                    }
                    .run(shutdown_rx.clone()),
                ))
            }
            _ => None,
        };

        // Start-up is over: what is written from here on is the card's
        // steady cost.
        wear.rate(counts.snapshot().committed);
        let status = tokio::spawn(status_loop(counts.clone(), registry.clone(), wear));

        Ok(Gateway {
            shutdown,
            drained,
            ingest,
            forward,
            scheduler,
            replayer,
            metrics_server,
            status,
            pipeline,
            registry,
            topic_prefix,
            deployer,
            control,
            metrics,
            counts,
            #[cfg(feature = "embedded-broker")]
            broker,
            runtime,
            telemetry,
        })
    }

    /// Compiles and checks `f` (the same checks as at start-up), starts its
    /// instances and makes it the running version of its name: messages
    /// routed from now on go to it, those routed before finish on the
    /// version they were routed to. With an external broker, ingest
    /// subscribes to its new triggers and unsubscribes from those no
    /// function uses any more. Nothing changes if it fails.
    pub async fn install(&self, f: &FunctionConfig, origin: Origin) -> anyhow::Result<()> {
        let function = start_function(&self.runtime, &self.registry, f, &self.topic_prefix, origin)
            .await
            .with_context(|| format!("function {:?}", f.name))?;
        let version = function.version();
        let previous = self.registry.install(function);
        tracing::info!(
            function = %f.name,
            version,
            replaced = previous.map(|p| p.version()),
            "function installed"
        );
        Ok(())
    }

    /// Stops routing messages to the function called `name`; those
    /// already routed to it finish. False if there is none.
    pub fn remove(&self, name: &str) -> bool {
        let removed = self.registry.remove(name);
        if let Some(f) = &removed {
            tracing::info!(function = name, version = f.version(), "function removed");
        }
        removed.is_some()
    }

    /// Applies a bundle as received (docs/DEPLOY.md): verified, persisted,
    /// then swapped in; refused with a reason, changing nothing, otherwise.
    pub async fn apply_bundle(&self, bundle: &[u8]) -> Result<Applied, Refused> {
        match &self.deployer {
            Some(d) => d.apply(bundle, None).await,
            None => Err(Refused {
                code: "not_enabled",
                text: "this gateway's configuration has no [deploy] section".into(),
                version: None,
            }),
        }
    }

    /// The metrics model's report now (reads SQLite: call from a blocking
    /// thread, or accept a short wait).
    pub fn report(&self) -> crate::telemetry::Report {
        self.telemetry.report()
    }

    /// The functions that run now.
    pub fn registry(&self) -> &Arc<Registry> {
        &self.registry
    }

    /// The embedded broker's address (with the real port if 0 was asked).
    pub fn local_broker_addr(&self) -> Option<std::net::SocketAddr> {
        #[cfg(feature = "embedded-broker")]
        return self.broker.as_ref().map(|b| b.local_addr());
        #[cfg(not(feature = "embedded-broker"))]
        None
    }

    /// Re-reads what a running gateway re-reads on SIGHUP: the built-in
    /// broker's password and ACL files.
    pub async fn reload(&self) {
        #[cfg(feature = "embedded-broker")]
        if let Some(broker) = &self.broker {
            broker.reload_access().await;
            return;
        }
        tracing::info!("SIGHUP: nothing to reload (no built-in broker)");
    }

    /// Gateway counters.
    pub fn metrics(&self) -> Snapshot {
        self.counts.snapshot()
    }

    /// Per-function counters, in installation order (the configuration's
    /// first).
    pub fn function_metrics(&self) -> Vec<Arc<FunctionMetrics>> {
        let table = self.registry.table();
        table
            .functions()
            .iter()
            .map(|f| f.pool().metrics().clone())
            .collect()
    }

    /// Stops in order (see the module doc).
    pub async fn shutdown(self) {
        tracing::info!("shutting down");
        let _ = self.shutdown.send(true);
        #[cfg(feature = "embedded-broker")]
        let broker = self.broker;
        #[cfg(feature = "embedded-broker")]
        if let Some(b) = broker {
            b.shutdown().await;
        }
        stop_task("scheduler", self.scheduler).await;
        stop_task("replayer", self.replayer).await;
        let mut writer = self.pipeline.drain(DRAIN_GRACE).await;
        let _ = self.drained.send(true);
        for i in self.ingest {
            stop_task("ingest", i).await;
        }
        if let Some(f) = self.forward {
            stop_task("forwarder", f).await;
        }
        if let Some(c) = self.control {
            stop_task("control connection", c).await;
        }
        if let Some(m) = self.metrics_server {
            stop_task("metrics listener", m).await;
        }
        if let Some(d) = &self.deployer {
            d.stop();
        }
        // Delete what the upstream acknowledged since the last commit.
        let deleted = tokio::task::spawn_blocking(move || writer.commit(&mut [], &|| true)).await;
        if let Ok(Err(e)) = deleted {
            tracing::warn!(error = %e, "could not delete delivered records; they will be sent again");
        }
        self.status.abort();
        let _ = self.status.await;
        let pools: Vec<Pool> = self
            .registry
            .clear()
            .into_iter()
            .filter_map(|f| Arc::try_unwrap(f).ok().map(Deployed::into_pool))
            .collect();
        tokio::task::spawn_blocking(move || {
            for p in pools {
                p.shutdown();
            }
        })
        .await
        .ok();
        let m = self.metrics.snapshot();
        tracing::info!(committed = m.committed, forwarded = m.forwarded, "stopped");
    }
}

/// Sends functions' local publishes into the embedded broker.
#[cfg(feature = "embedded-broker")]
async fn forward_local_publishes(
    broker: crate::ingest::embedded::BrokerPublisher,
    mut publishes: mpsc::Receiver<crate::runtime::Emitted>,
    metrics: Arc<Metrics>,
) {
    while let Some(p) = publishes.recv().await {
        if let Err(e) = broker.publish(&p.topic, p.payload.into()).await {
            event!(
                metrics.local_publishes_dropped,
                warn,
                error = %e,
                topic = p.topic,
                "could not publish to the embedded broker"
            );
        }
    }
}

/// Takes snapshots of the gateway's counters with the gauges read fresh.
#[derive(Clone)]
struct Counts {
    /// The counters.
    metrics: Arc<Metrics>,
    /// The embedded broker, for its client gauges.
    #[cfg(feature = "embedded-broker")]
    broker: Option<crate::ingest::embedded::BrokerPublisher>,
}

impl Counts {
    fn snapshot(&self) -> Snapshot {
        #[cfg(feature = "embedded-broker")]
        if let Some(b) = &self.broker {
            let clients = b.clients();
            Metrics::set(&self.metrics.broker_connections, clients.connections);
            Metrics::set(&self.metrics.broker_sessions, clients.sessions);
            Metrics::set(&self.metrics.broker_sockets, clients.sockets);
        }
        self.metrics.snapshot()
    }
}

/// The broker and client settings of the control connection: those of
/// `[upstream]` or `[local]` with the client id `<client id>-control`, or
/// a plain connection to the embedded broker at `embedded`.
fn control_broker(
    config: &Config,
    which: DeployBroker,
    embedded: Option<std::net::SocketAddr>,
) -> BrokerClientConfig {
    let own = |b: &BrokerClientConfig| BrokerClientConfig {
        client_id: format!("{}-control", b.client_id),
        in_flight: 16,
        ..b.clone()
    };
    match (which, &config.upstream, &config.local.source) {
        (DeployBroker::Upstream, Some(u), _) => own(&u.broker),
        (_, _, LocalSource::Broker(b)) => own(b),
        _ => {
            let addr = embedded.expect("the embedded broker runs");
            BrokerClientConfig {
                host: "127.0.0.1".into(),
                port: addr.port(),
                client_id: format!("edgefn-{}-control", config.gateway.id),
                username: None,
                password: None,
                in_flight: 16,
                session_expiry: Duration::ZERO,
                keep_alive: Duration::from_secs(30),
                tls: None,
            }
        }
    }
}

/// Compiles `f`'s module on a blocking thread and starts its instances:
/// everything but installing it.
async fn start_function(
    runtime: &Arc<Runtime>,
    registry: &Registry,
    f: &FunctionConfig,
    topic_prefix: &str,
    origin: Origin,
) -> anyhow::Result<Deployed> {
    let rt = runtime.clone();
    let spec = registry.spec(f, topic_prefix);
    let path = f.module.clone();
    let function = tokio::task::spawn_blocking(move || rt.load_file(&path, spec)).await??;
    tracing::info!(function = %f.name, module = %f.module.display(), precompiled = function.precompiled(), "function loaded");
    Ok(registry.start(function, f, 0, origin)?)
}

async fn status_loop(
    counts: Counts,
    registry: Arc<Registry>,
    wear: Arc<crate::telemetry::DiskWear>,
) {
    use std::sync::atomic::Ordering::Relaxed;
    let mut tick = tokio::time::interval(STATUS_INTERVAL);
    tick.tick().await;
    loop {
        tick.tick().await;
        let m = counts.snapshot();
        let disk = wear.rate(m.committed);
        tracing::info!(
            disk_bytes_per_message = disk.and_then(|d| d.bytes_per_message).map(|b| b.round()),
            disk_mb_per_day = disk.map(|d| (d.bytes_per_day / 1e6).round()),
            received = m.received,
            committed = m.committed,
            buffered = m.records_buffered,
            forwarded = m.forwarded,
            dead_letters = m.dead_letters,
            dead_letters_dropped = m.dead_letters_dropped,
            dropped = m.dropped_records,
            broker_dropped = m.broker_dropped,
            local_publishes_dropped = m.local_publishes_dropped,
            refused_too_large = m.refused_too_large,
            commit_failures = m.commit_failures,
            upstream_rejected = m.upstream_rejected,
            resent = m.resent,
            abandoned = m.abandoned,
            "status"
        );
        #[cfg(feature = "embedded-broker")]
        if counts.broker.is_some() {
            tracing::info!(
                connections = m.broker_connections,
                sessions = m.broker_sessions,
                refused = m.broker_refused,
                dropped_to_subscribers = m.broker_dropped_to_subscribers,
                lost_internal = m.broker_lost_internal,
                "embedded broker status"
            );
        }
        for function in registry.table().functions() {
            let f = function.pool().metrics();
            tracing::debug!(
                function = function.name(),
                version = function.version(),
                invocations = f.invocations.load(Relaxed),
                failures = f.failures.load(Relaxed),
                timeouts = f.failures_of("timeout"),
                out_of_fuel = f.failures_of("fuel"),
                "function status"
            );
        }
    }
}

/// Runs the daemon until `stop` resolves, then shuts it down in order;
/// each message on `reload` (SIGHUP) is a [`Gateway::reload`].
pub async fn run(
    config: Config,
    stop: impl std::future::Future<Output = ()>,
    mut reload: tokio::sync::mpsc::Receiver<()>,
) -> anyhow::Result<()> {
    let gateway = Gateway::start(config).await?;
    tokio::pin!(stop);
    loop {
        tokio::select! {
            () = &mut stop => break,
            Some(()) = reload.recv() => gateway.reload().await,
        }
    }
    gateway.shutdown().await;
    Ok(())
}

/// How long each task may take to stop once asked (the pipeline's drain
/// and the forwarder's wait for PUBACKs have their own, shorter, bounds).
const TASK_DEADLINE: Duration = Duration::from_secs(15);

/// Waits up to [`TASK_DEADLINE`] for the task `name` to end; past it, says
/// so and aborts it. A task that panicked is logged.
async fn stop_task(name: &str, task: tokio::task::JoinHandle<()>) {
    let abort = task.abort_handle();
    match tokio::time::timeout(TASK_DEADLINE, task).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) if e.is_panic() => tracing::error!(task = name, "the task had panicked"),
        Ok(Err(_)) => {}
        Err(_) => {
            tracing::error!(task = name, deadline = ?TASK_DEADLINE, "a task did not stop in time: aborted");
            abort.abort();
        }
    }
}
