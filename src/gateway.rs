//! Builds the stages from a [`Config`], wires them with bounded channels,
//! and shuts them down in order.
//!
//! Startup: open the store, compile and check every function, start the
//! pools and the pipeline, then the forwarder, then ingest (last, so nothing
//! arrives before there is somewhere for it to go).
//!
//! Shutdown (SIGTERM/SIGINT, or [`Gateway::shutdown`]): ingest stops taking
//! messages but keeps its connection so acks can still be sent; the
//! pipeline drains (every message it holds is committed and acknowledged);
//! then ingest disconnects, the forwarder deletes what was acknowledged and
//! disconnects, and the pools stop.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use tokio::sync::{Notify, mpsc, watch};

use crate::config::{Config, LocalSource};
use crate::forward::Forwarder;
use crate::ingest::mqtt::MqttIngest;
use crate::metrics::{Metrics, Snapshot};
use crate::pipeline::Pipeline;
use crate::route::Router;
use crate::runtime::pool::{FunctionMetrics, Pool};
use crate::runtime::{FunctionSpec, Runtime, Target};
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
    /// Periodic status line.
    status: tokio::task::JoinHandle<()>,
    /// The pipeline.
    pipeline: crate::pipeline::Running,
    /// Function pools (stopped last).
    pools: Arc<Vec<Pool>>,
    /// Gateway counters.
    metrics: Arc<Metrics>,
    /// Reads them, gauges included.
    counts: Counts,
    /// The embedded broker, if any.
    #[cfg(feature = "embedded-broker")]
    broker: Option<crate::ingest::embedded::EmbeddedBroker>,
    /// Keeps the engine (and its epoch ticker) alive.
    _runtime: Arc<Runtime>,
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
        let (writer, reader) = store::open(&config.gateway.data_dir, &config.buffer)
            .context("cannot open the buffer")?;
        tracing::info!(
            data_dir = %config.gateway.data_dir.display(),
            buffered = reader.pending().unwrap_or(0),
            "buffer opened"
        );

        let runtime = Arc::new(Runtime::new(Target::for_host())?);
        let mut pools = Vec::new();
        for f in &config.functions {
            let rt = runtime.clone();
            let prefix = config
                .upstream
                .as_ref()
                .map_or("", |u| u.topic_prefix.as_str());
            let spec = FunctionSpec::from_config(f, prefix);
            let path = f.module.clone();
            let function = tokio::task::spawn_blocking(move || rt.load_file(&path, spec))
                .await?
                .with_context(|| format!("function {:?}", f.name))?;
            tracing::info!(function = %f.name, module = %f.module.display(), "function loaded");
            pools.push(Pool::start(Arc::new(function), f.concurrency, f.retries)?);
        }
        let pools = Arc::new(pools);
        let router = Arc::new(Router::new(
            config.functions.iter().map(|f| f.triggers.as_slice()),
        ));
        let names: Arc<Vec<String>> =
            Arc::new(config.functions.iter().map(|f| f.name.clone()).collect());

        let (shutdown, shutdown_rx) = watch::channel(false);
        let (drained, drained_rx) = watch::channel(false);
        let committed = Arc::new(Notify::new());
        let (publish_tx, publish_rx) = mpsc::channel(LOCAL_PUBLISH_QUEUE);

        let in_flight = match &config.local.source {
            LocalSource::Broker(b) => usize::from(b.in_flight),
            LocalSource::Embedded { .. } => 1024,
        };
        let (deliveries_tx, deliveries_rx) = mpsc::channel(in_flight);
        let pipeline = Pipeline {
            router: router.clone(),
            pools: pools.clone(),
            names: names.clone(),
            writer,
            max_batch: config.buffer.max_batch,
            max_message_size: config.local.max_message_size,
            metrics: metrics.clone(),
            committed: committed.clone(),
            local_publish: Some(publish_tx),
        }
        .start(deliveries_rx);

        // What an external broker's persistent session may hold for us.
        let session_filters = reader.session_filters();
        let remembered = match &config.local.source {
            LocalSource::Broker(b) => reader
                .local_subscriptions(&b.session_name())
                .context("cannot read the local broker session's filters")?,
            LocalSource::Embedded { .. } => Vec::new(),
        };
        let forward = config.upstream.clone().map(|upstream| {
            tokio::spawn(
                Forwarder {
                    config: upstream,
                    gateway_id: config.gateway.id.clone(),
                    incarnation: reader.incarnation(),
                    outbox: reader.outbox(),
                    reader: Arc::new(Mutex::new(reader)),
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
                let filters: Vec<String> = router.filters().iter().map(|f| f.to_string()).collect();
                let stale: Vec<String> = remembered
                    .into_iter()
                    .filter(|f| !filters.contains(f))
                    .collect();
                // Until the broker confirms the unsubscriptions, the session
                // may hold both.
                session_filters.save(
                    &b.session_name(),
                    filters.iter().chain(&stale).cloned().collect(),
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
            LocalSource::Embedded { listen } => {
                let b = crate::ingest::embedded::EmbeddedBroker::start(
                    *listen,
                    config.local.max_message_size,
                    router.clone(),
                    deliveries_tx,
                    metrics.clone(),
                )
                .await
                .with_context(|| format!("cannot start the embedded broker on {listen}"))?;
                tracing::info!(listen = %b.local_addr(), "embedded broker listening");
                ingest.push(tokio::spawn(forward_local_publishes(
                    b.publisher(),
                    publish_rx,
                    metrics.clone(),
                )));
                broker = Some(b);
            }
            #[cfg(not(feature = "embedded-broker"))]
            LocalSource::Embedded { .. } => {
                anyhow::bail!("this edgefn was built without the embedded-broker feature")
            }
        }

        let counts = Counts {
            metrics: metrics.clone(),
            #[cfg(feature = "embedded-broker")]
            broker: broker.as_ref().map(|b| b.publisher()),
        };
        let status = tokio::spawn(status_loop(counts.clone(), pools.clone(), names));

        Ok(Gateway {
            shutdown,
            drained,
            ingest,
            forward,
            status,
            pipeline,
            pools,
            metrics,
            counts,
            #[cfg(feature = "embedded-broker")]
            broker,
            _runtime: runtime,
        })
    }

    /// The embedded broker's address (with the real port if 0 was asked).
    pub fn local_broker_addr(&self) -> Option<std::net::SocketAddr> {
        #[cfg(feature = "embedded-broker")]
        return self.broker.as_ref().map(|b| b.local_addr());
        #[cfg(not(feature = "embedded-broker"))]
        None
    }

    /// Gateway counters.
    pub fn metrics(&self) -> Snapshot {
        self.counts.snapshot()
    }

    /// Per-function counters, in configuration order.
    pub fn function_metrics(&self) -> Vec<Arc<FunctionMetrics>> {
        self.pools.iter().map(|p| p.metrics().clone()).collect()
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
        let mut writer = self.pipeline.drain(DRAIN_GRACE).await;
        let _ = self.drained.send(true);
        for i in self.ingest {
            let _ = i.await;
        }
        if let Some(f) = self.forward {
            let _ = f.await;
        }
        // Delete what the upstream acknowledged since the last commit.
        let deleted = tokio::task::spawn_blocking(move || writer.commit(&mut [], &|| true)).await;
        if let Ok(Err(e)) = deleted {
            tracing::warn!(error = %e, "could not delete delivered records; they will be sent again");
        }
        self.status.abort();
        let _ = self.status.await;
        let pools = Arc::try_unwrap(self.pools).ok();
        tokio::task::spawn_blocking(move || {
            for p in pools.into_iter().flatten() {
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
            Metrics::add(&metrics.local_publishes_dropped, 1);
            tracing::warn!(error = %e, topic = p.topic, "could not publish to the embedded broker");
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
        }
        self.metrics.snapshot()
    }
}

async fn status_loop(counts: Counts, pools: Arc<Vec<Pool>>, names: Arc<Vec<String>>) {
    use std::sync::atomic::Ordering::Relaxed;
    let mut tick = tokio::time::interval(STATUS_INTERVAL);
    tick.tick().await;
    loop {
        tick.tick().await;
        let m = counts.snapshot();
        tracing::info!(
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
        for (name, p) in names.iter().zip(pools.iter()) {
            let f = p.metrics();
            tracing::debug!(
                function = %name,
                invocations = f.invocations.load(Relaxed),
                failures = f.failures.load(Relaxed),
                timeouts = f.timeouts.load(Relaxed),
                out_of_fuel = f.out_of_fuel.load(Relaxed),
                "function status"
            );
        }
    }
}

/// Runs the daemon until SIGTERM or SIGINT.
pub async fn run(config: Config) -> anyhow::Result<()> {
    let gateway = Gateway::start(config).await?;
    wait_for_signal().await?;
    gateway.shutdown().await;
    Ok(())
}

async fn wait_for_signal() -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    Ok(())
}
