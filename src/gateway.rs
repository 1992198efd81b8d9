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
        let (writer, reader) = store::open(
            &config.gateway.data_dir,
            config.buffer.durability,
            config.buffer.max_size,
            config.buffer.full_policy,
        )
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
            let spec = FunctionSpec::from_config(f);
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

        let forward = config.upstream.clone().map(|upstream| {
            tokio::spawn(
                Forwarder {
                    config: upstream,
                    gateway_id: config.gateway.id.clone(),
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
                ingest.push(tokio::spawn(
                    MqttIngest {
                        broker: b.clone(),
                        filters: router.filters().iter().map(|f| f.to_string()).collect(),
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

        let status = tokio::spawn(status_loop(metrics.clone(), pools.clone(), names));

        Ok(Gateway {
            shutdown,
            drained,
            ingest,
            forward,
            status,
            pipeline,
            pools,
            metrics,
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
        self.metrics.snapshot()
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

async fn status_loop(metrics: Arc<Metrics>, pools: Arc<Vec<Pool>>, names: Arc<Vec<String>>) {
    use std::sync::atomic::Ordering::Relaxed;
    let mut tick = tokio::time::interval(STATUS_INTERVAL);
    tick.tick().await;
    loop {
        tick.tick().await;
        let m = metrics.snapshot();
        tracing::info!(
            received = m.received,
            committed = m.committed,
            buffered = m.records_buffered,
            forwarded = m.forwarded,
            dead_letters = m.dead_letters,
            dropped = m.dropped_records,
            broker_dropped = m.broker_dropped,
            local_publishes_dropped = m.local_publishes_dropped,
            refused_too_large = m.refused_too_large,
            commit_failures = m.commit_failures,
            upstream_rejected = m.upstream_rejected,
            resent = m.resent,
            "status"
        );
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
