//! The control connection: bundles in, status out (docs/DEPLOY.md).
//!
//! edgefn's own MQTT client on the broker `[deploy] broker` names, with
//! its own client id (`<client id>-control`) and the broker's TLS and
//! credentials. It subscribes to the desired state, retained:
//! `edgefn/<gateway>/functions/<name>/deploy` and, for each group,
//! `edgefn/groups/<group>/functions/<name>/deploy`, and hands every bundle
//! to the [`Deployer`], one at a time; a bundle that arrives while another
//! for the same topic waits replaces it, and one of a higher version for a
//! function whose bundle is being applied makes that one give up
//! (`superseded`) before it is persisted. An empty message never removes
//! anything (removal is a signed tombstone). It publishes, retained:
//!
//! - `edgefn/<gateway>/functions/<name>/status` on every change: what
//!   runs (state, version, SHA-256) and the last bundle refused;
//! - `edgefn/<gateway>/status`: online (with version, start time, uptime
//!   and the functions running) at every connection and every
//!   [`REFRESH`]; offline when edgefn stops, and as its last will when it
//!   dies or loses the connection.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::{
    ConnectReturnCode, Filter, LastWill, Packet, SubscribeReasonCode,
};
use rumqttc::v5::{AsyncClient, ConnectionError, Event};
use serde::Serialize;
use tokio::sync::{Notify, watch};

use crate::clock::now_ms;
use crate::config::BrokerClientConfig;
use crate::deploy::{Applied, Deployer, Event as DeployEvent};
use crate::registry::{Origin, Registry};
use crate::shutdown::Backoff;

/// How often the gateway status is published again, so a reader can tell
/// a live gateway (a recent `updated_ms`) from a stale retained message.
pub const REFRESH: Duration = Duration::from_secs(30);

/// The control connection's settings.
pub struct Control {
    /// The broker, with the control client id.
    pub broker: BrokerClientConfig,
    /// This gateway's id.
    pub gateway_id: String,
    /// Its groups.
    pub groups: Vec<String>,
    /// Applies bundles.
    pub deployer: Arc<Deployer>,
    /// The functions that run.
    pub registry: Arc<Registry>,
    /// Largest bundle (the connection's packet limit follows it).
    pub max_bundle_size: usize,
    /// The metrics model, published on `edgefn/<id>/metrics`.
    pub telemetry: Arc<crate::telemetry::Telemetry>,
    /// How often.
    pub metrics_interval: Duration,
    /// Gateway counters (bundles refused).
    pub metrics: Arc<crate::metrics::Metrics>,
}

/// A function's status, as published.
#[derive(Debug, Clone, Serialize)]
struct FunctionStatus {
    /// The function.
    function: String,
    /// `active`, `removed`, `rolled_back` (the version before runs again,
    /// or none), or `absent` (never deployed here).
    state: &'static str,
    /// The version running, or removed.
    version: Option<u64>,
    /// SHA-256 of the module running (hex).
    sha256: Option<String>,
    /// The last bundle refused for this function, if any since the start.
    refused: Option<RefusedStatus>,
    /// The last rollback of a new version that failed its probation.
    rolled_back: Option<RolledBackStatus>,
    /// When this status last changed (ms since the epoch).
    updated_ms: u64,
}

/// A refused bundle, as published.
#[derive(Debug, Clone, Serialize)]
struct RefusedStatus {
    /// Where it came from.
    topic: String,
    /// Its version, when it could be read.
    version: Option<u64>,
    /// Stable reason code.
    code: &'static str,
    /// What was wrong.
    text: String,
    /// When (ms since the epoch).
    at_ms: u64,
}

/// A rollback, as published.
#[derive(Debug, Clone, Serialize)]
struct RolledBackStatus {
    /// The version that failed its probation.
    from: u64,
    /// How it failed.
    reason: String,
    /// When (ms since the epoch).
    at_ms: u64,
}

/// The gateway's status, as published.
#[derive(Debug, Serialize)]
struct GatewayStatus<'a> {
    gateway: &'a str,
    groups: &'a [String],
    online: bool,
    edgefn_version: &'static str,
    started_ms: u64,
    uptime_s: u64,
    functions: Vec<RunningFunction>,
    updated_ms: u64,
}

/// One function in the gateway status.
#[derive(Debug, Serialize)]
struct RunningFunction {
    name: String,
    version: u64,
    origin: &'static str,
    /// Messages that failed every attempt (dead letters) since the start.
    failed: u64,
    /// The same per minute, over the last minute or so (none until two
    /// statuses apart).
    failed_per_min: Option<f64>,
    /// The running version's last failure.
    last_failure: Option<String>,
}

/// Most functions with a status (published, and kept to publish again at
/// each connection): functions that ran here or had a verified bundle
/// refused. Beyond it a refusal is counted and logged, not published, so
/// no flood of deploy topics can grow this map or the broker's retained
/// messages.
const MAX_STATUSES: usize = 1024;

/// Refused bundles logged per minute; the rest are counted
/// (`bundles_refused`), and the next line says how many were not logged.
static REFUSALS_LOGGED: crate::throttle::Throttle = crate::throttle::Throttle::per_minute(10);

/// Empty messages on deploy topics logged per minute.
static EMPTY_LOGGED: crate::throttle::Throttle = crate::throttle::Throttle::per_minute(3);

/// Most bundles waiting to be applied (each up to `max_bundle_size`):
/// beyond it the connection stops reading until one is taken, so a flood
/// on many deploy topics cannot fill memory.
const INBOX_CAPACITY: usize = 8;

/// Bundles waiting to be applied, by topic, oldest first.
#[derive(Default)]
struct Inbox {
    queue: Mutex<VecDeque<(String, Bytes)>>,
    /// A bundle was put.
    ready: Notify,
    /// A bundle was taken.
    room: Notify,
}

impl Inbox {
    /// Queues `bundle` from `topic`, replacing one from the same topic that
    /// still waits; waits while [`INBOX_CAPACITY`] others wait.
    async fn put(&self, topic: String, bundle: Bytes) {
        loop {
            let room = self.room.notified();
            {
                let mut q = self.queue.lock().expect("inbox lock");
                let before = q.len();
                q.retain(|(t, _)| *t != topic);
                if q.len() < before || q.len() < INBOX_CAPACITY {
                    q.push_back((topic, bundle));
                    drop(q);
                    self.ready.notify_one();
                    return;
                }
            }
            room.await;
        }
    }

    /// Whether a bundle for `name` waits whose version is above
    /// `version`, by the deployer's checks.
    fn has_newer(&self, name: &str, version: u64, deployer: &Deployer) -> bool {
        let waiting: Vec<Bytes> = {
            let q = self.queue.lock().expect("inbox lock");
            q.iter()
                .filter(|(t, _)| topic_function(t) == Some(name))
                .map(|(_, b)| b.clone())
                .collect()
        };
        waiting.iter().any(|b| {
            deployer
                .peek(b)
                .is_some_and(|(n, v)| n == name && v > version)
        })
    }

    async fn take(&self) -> (String, Bytes) {
        loop {
            let ready = self.ready.notified();
            if let Some(next) = self.queue.lock().expect("inbox lock").pop_front() {
                self.room.notify_one();
                return next;
            }
            ready.await;
        }
    }
}

/// Publishes the status topics.
struct Reporter {
    /// This gateway's id.
    gateway_id: String,
    /// Its groups.
    groups: Vec<String>,
    /// The functions that run.
    registry: Arc<Registry>,
    /// When edgefn started.
    started: Instant,
    /// The same, ms since the epoch.
    started_ms: u64,
    /// Whether statuses are published retained: cleared on a broker that
    /// keeps no retained messages (it refuses a retained last will).
    retain: AtomicBool,
    /// Per function, its failure count when recent statuses were made,
    /// for the rate: the oldest at most a minute old.
    failures: Mutex<HashMap<String, VecDeque<(Instant, u64)>>>,
}

impl Reporter {
    fn status_topic(&self) -> String {
        format!("edgefn/{}/status", self.gateway_id)
    }

    fn gateway_status(&self, online: bool) -> Vec<u8> {
        let table = self.registry.table();
        let status = GatewayStatus {
            gateway: &self.gateway_id,
            groups: &self.groups,
            online,
            edgefn_version: env!("CARGO_PKG_VERSION"),
            started_ms: self.started_ms,
            uptime_s: self.started.elapsed().as_secs(),
            functions: table
                .functions()
                .iter()
                .map(|f| {
                    let failed = f.pool().metrics().dead_letters.load(Ordering::Relaxed);
                    RunningFunction {
                        name: f.name().to_owned(),
                        version: f.version(),
                        origin: match f.origin() {
                            Origin::Config => "config",
                            Origin::Deployed => "deployed",
                        },
                        failed,
                        failed_per_min: self.failure_rate(f.name(), failed),
                        last_failure: f
                            .pool()
                            .counts()
                            .last_failure
                            .lock()
                            .expect("counts lock")
                            .clone(),
                    }
                })
                .collect(),
            updated_ms: now_ms(),
        };
        self.failures
            .lock()
            .expect("failures lock")
            .retain(|name, _| status.functions.iter().any(|f| f.name == *name));
        serde_json::to_vec(&status).expect("status JSON")
    }

    /// Failures per minute of `name`, now at `failed`, from the samples
    /// of the last minute (keeping the newest older one as the start).
    fn failure_rate(&self, name: &str, failed: u64) -> Option<f64> {
        let now = Instant::now();
        let mut all = self.failures.lock().expect("failures lock");
        let samples = all.entry(name.to_owned()).or_default();
        while samples.len() > 1 && now.duration_since(samples[1].0) >= Duration::from_secs(60) {
            samples.pop_front();
        }
        let rate = samples.front().and_then(|&(at, before)| {
            let secs = now.duration_since(at).as_secs_f64();
            (secs >= 1.0).then(|| failed.saturating_sub(before) as f64 * 60.0 / secs)
        });
        samples.push_back((now, failed));
        rate
    }

    /// Publishes the gateway's status (retained).
    fn publish_gateway(&self, client: &AsyncClient, online: bool) {
        let _ = client.try_publish(
            self.status_topic(),
            QoS::AtLeastOnce,
            self.retain.load(Ordering::Relaxed),
            self.gateway_status(online),
        );
    }

    /// Publishes a function's status (retained).
    fn publish_function(&self, client: &AsyncClient, s: &FunctionStatus) {
        let topic = format!("edgefn/{}/functions/{}/status", self.gateway_id, s.function);
        let _ = client.try_publish(
            topic,
            QoS::AtLeastOnce,
            self.retain.load(Ordering::Relaxed),
            serde_json::to_vec(s).expect("status JSON"),
        );
    }
}

impl Control {
    /// The filters bundles arrive on.
    fn filters(&self) -> Vec<Filter> {
        let mut f = vec![Filter::new(
            format!("edgefn/{}/functions/+/deploy", self.gateway_id),
            QoS::AtLeastOnce,
        )];
        for g in &self.groups {
            f.push(Filter::new(
                format!("edgefn/groups/{g}/functions/+/deploy"),
                QoS::AtLeastOnce,
            ));
        }
        f
    }

    /// Runs until `shutdown` turns true, reconnecting with backoff; then
    /// publishes the gateway offline and disconnects.
    pub async fn run(self, mut shutdown: watch::Receiver<bool>) {
        let reporter = Arc::new(Reporter {
            gateway_id: self.gateway_id.clone(),
            groups: self.groups.clone(),
            registry: self.registry.clone(),
            started: Instant::now(),
            started_ms: now_ms(),
            retain: AtomicBool::new(true),
            failures: Mutex::default(),
        });
        let will = |retain: bool| {
            LastWill::new(
                reporter.status_topic(),
                reporter.gateway_status(false),
                QoS::AtLeastOnce,
                retain,
                None,
            )
        };
        let mut o = crate::broker_client::options(&self.broker, self.max_bundle_size);
        o.set_clean_start(true).set_last_will(will(true));
        let (client, mut events) = AsyncClient::new(o, 64);
        let inbox = Arc::new(Inbox::default());
        let statuses: Arc<Mutex<BTreeMap<String, FunctionStatus>>> = Arc::default();
        let applier = tokio::spawn(apply_loop(
            inbox.clone(),
            self.deployer.clone(),
            client.clone(),
            statuses.clone(),
            reporter.clone(),
            self.metrics.clone(),
        ));
        let mut backoff = Backoff::new(Duration::from_millis(250), Duration::from_secs(30));
        let mut refresh = tokio::time::interval(REFRESH);
        let mut metrics_tick = tokio::time::interval(self.metrics_interval);
        metrics_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let publish_status = |online: bool| reporter.publish_gateway(&client, online);
        let reporting = Arc::new(AtomicBool::new(false));
        let publish_metrics = || {
            // A report still being made (a slow disk): this tick is skipped.
            if reporting.swap(true, Ordering::AcqRel) {
                return;
            }
            let reporting = reporting.clone();
            let telemetry = self.telemetry.clone();
            let client = client.clone();
            let topic = format!("edgefn/{}/metrics", self.gateway_id);
            let retain = reporter.retain.load(Ordering::Relaxed);
            tokio::spawn(async move {
                // Reads SQLite (the oldest record): not on the reactor.
                let report = tokio::task::spawn_blocking(move || telemetry.report()).await;
                reporting.store(false, Ordering::Release);
                if let Ok(report) = report {
                    let json = serde_json::to_vec(&report).expect("report JSON");
                    let _ = client.try_publish(topic, QoS::AtMostOnce, retain, json);
                }
            });
        };
        loop {
            tokio::select! {
                _ = crate::shutdown::stopped(&mut shutdown) => break,
                _ = refresh.tick() => publish_status(true),
                _ = metrics_tick.tick() => publish_metrics(),
                event = events.poll() => match event {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => {
                        backoff.reset();
                        tracing::info!(host = %self.broker.host, port = self.broker.port, "connected to the control broker");
                        // Subscribed first: a reader that sees the online
                        // status knows its bundles reach this gateway.
                        if let Err(e) = client.try_subscribe_many(self.filters()) {
                            tracing::error!(error = %e, "could not subscribe to the deploy topics");
                        }
                        publish_status(true);
                        for s in statuses.lock().expect("statuses lock").values() {
                            reporter.publish_function(&client, s);
                        }
                    }
                    Ok(Event::Incoming(Packet::SubAck(ack))) => {
                        let refused = ack.return_codes.iter().filter(|c| !matches!(c, SubscribeReasonCode::Success(_))).count();
                        if refused == 0 {
                            tracing::info!(filters = ack.return_codes.len(), "subscribed to the deploy topics");
                        } else {
                            tracing::error!(refused, codes = ?ack.return_codes, "the control broker refused deploy topic subscriptions; bundles on them do not reach this gateway");
                        }
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        let topic = String::from_utf8_lossy(&p.topic).into_owned();
                        if p.payload.is_empty() {
                            if let Some(not_logged) = EMPTY_LOGGED.admit() {
                                tracing::info!(topic, not_logged, "an empty message on a deploy topic changes nothing (a removal is a signed tombstone)");
                            }
                        } else {
                            inbox.put(topic, p.payload).await;
                        }
                    }
                    Ok(_) => {}
                    Err(ConnectionError::ConnectionRefused(ConnectReturnCode::RetainNotSupported)) => {
                        // Bundles then arrive only while connected, and
                        // `edgefn status` sees nothing between reports.
                        tracing::warn!(host = %self.broker.host, port = self.broker.port, "the control broker keeps no retained messages: connecting without; this gateway gets only bundles published while it is connected, and its status is not retained");
                        reporter.retain.store(false, Ordering::Relaxed);
                        events.options.set_last_will(will(false));
                    }
                    Err(e) => {
                        let delay = backoff.next_delay();
                        tracing::warn!(error = %e, retry_in = ?delay, "control broker connection lost");
                        tokio::select! {
                            _ = tokio::time::sleep(delay) => {}
                            _ = crate::shutdown::stopped(&mut shutdown) => break,
                        }
                    }
                }
            }
        }
        applier.abort();
        publish_status(false);
        let _ = client.try_disconnect();
        let _ = tokio::time::timeout(Duration::from_secs(2), async {
            while events.poll().await.is_ok() {}
        })
        .await;
    }
}

/// The `<name>` of a deploy topic (`…/functions/<name>/deploy`).
fn topic_function(topic: &str) -> Option<&str> {
    let rest = topic.strip_suffix("/deploy")?;
    let (before, name) = rest.rsplit_once('/')?;
    before.ends_with("/functions").then_some(name)
}

/// A function's status entry, made when first needed.
fn entry<'a>(all: &'a mut BTreeMap<String, FunctionStatus>, name: &str) -> &'a mut FunctionStatus {
    all.entry(name.to_owned())
        .or_insert_with(|| FunctionStatus {
            function: name.to_owned(),
            state: "absent",
            version: None,
            sha256: None,
            refused: None,
            rolled_back: None,
            updated_ms: 0,
        })
}

/// Applies bundles one at a time, follows rollbacks, and publishes each
/// function's status. A refused bundle gets a status only when its
/// function is known here (it runs, or has a status) or the bundle itself
/// passed the signature checks: junk on the deploy topics is counted and
/// logged (throttled), nothing more.
async fn apply_loop(
    inbox: Arc<Inbox>,
    deployer: Arc<Deployer>,
    client: AsyncClient,
    statuses: Arc<Mutex<BTreeMap<String, FunctionStatus>>>,
    reporter: Arc<Reporter>,
    metrics: Arc<crate::metrics::Metrics>,
) {
    let mut events = deployer.events();
    loop {
        let (topic, bundle) = tokio::select! {
            next = inbox.take() => next,
            event = events.recv() => {
                let Ok(DeployEvent::RolledBack { name, from, to, sha256, reason }) = event else {
                    continue;
                };
                let mut all = statuses.lock().expect("statuses lock");
                let status = entry(&mut all, &name);
                status.state = "rolled_back";
                status.version = to;
                status.sha256 = sha256;
                status.rolled_back = Some(RolledBackStatus { from, reason, at_ms: now_ms() });
                status.updated_ms = now_ms();
                reporter.publish_function(&client, status);
                reporter.publish_gateway(&client, true);
                continue;
            }
        };
        let Some(name) = topic_function(&topic).map(str::to_owned) else {
            continue;
        };
        let newer = |name: &str, version: u64| inbox.has_newer(name, version, &deployer);
        let result = deployer
            .apply_unless_superseded(&bundle, Some(&name), &newer)
            .await;
        if let Err(refused) = &result {
            crate::metrics::event!(
                metrics.bundles_refused,
                warn,
                throttle = REFUSALS_LOGGED,
                topic = %crate::text::Printable(&topic),
                code = refused.code,
                error = %crate::text::Printable(&refused.text),
                "bundle refused"
            );
        }
        let mut all = statuses.lock().expect("statuses lock");
        let known = all.contains_key(&name)
            || reporter.registry.table().get(&name).is_some()
            || matches!(&result, Err(r) if r.version.is_some());
        if !known || (!all.contains_key(&name) && all.len() >= MAX_STATUSES) {
            continue;
        }
        let status = entry(&mut all, &name);
        let changed = matches!(
            result,
            Ok(Applied::Deployed { .. } | Applied::Removed { .. })
        );
        match result {
            Ok(Applied::Unchanged { .. }) => continue,
            Ok(Applied::Deployed {
                version, sha256, ..
            }) => {
                status.state = "active";
                status.version = Some(version);
                status.sha256 = Some(sha256);
            }
            Ok(Applied::Removed { version, .. }) => {
                status.state = "removed";
                status.version = Some(version);
                status.sha256 = None;
            }
            Err(refused) => {
                status.refused = Some(RefusedStatus {
                    topic: topic.clone(),
                    version: refused.version,
                    code: refused.code,
                    text: refused.text,
                    at_ms: now_ms(),
                });
            }
        }
        status.updated_ms = now_ms();
        reporter.publish_function(&client, status);
        if changed {
            // Its function list changed.
            reporter.publish_gateway(&client, true);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_function_is_read_from_a_deploy_topic() {
        assert_eq!(
            topic_function("edgefn/pi-01/functions/clean/deploy"),
            Some("clean")
        );
        assert_eq!(
            topic_function("edgefn/groups/site-a/functions/x_1/deploy"),
            Some("x_1")
        );
        assert_eq!(topic_function("edgefn/pi-01/functions/clean/status"), None);
        assert_eq!(topic_function("edgefn/pi-01/other/clean/deploy"), None);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_full_inbox_holds_back_new_topics_until_one_is_taken() {
        let inbox = Arc::new(Inbox::default());
        for i in 0..INBOX_CAPACITY {
            inbox.put(format!("t{i}"), Bytes::new()).await;
        }
        // The same topic again replaces its bundle, even when full.
        inbox.put("t0".into(), Bytes::from_static(b"new")).await;
        let put = tokio::spawn({
            let inbox = inbox.clone();
            async move { inbox.put("extra".into(), Bytes::new()).await }
        });
        tokio::task::yield_now().await;
        assert!(!put.is_finished(), "a ninth topic waits");
        assert_eq!(inbox.take().await.0, "t1");
        put.await.unwrap();
        assert_eq!(inbox.queue.lock().unwrap().len(), INBOX_CAPACITY);
        assert_eq!(inbox.queue.lock().unwrap().back().unwrap().0, "extra");
    }

    #[tokio::test]
    async fn a_bundle_waiting_is_replaced_by_a_newer_one_from_the_same_topic() {
        let inbox = Inbox::default();
        inbox.put("a".into(), Bytes::from_static(b"1")).await;
        inbox.put("b".into(), Bytes::from_static(b"2")).await;
        inbox.put("a".into(), Bytes::from_static(b"3")).await;
        assert_eq!(inbox.take().await, ("b".into(), Bytes::from_static(b"2")));
        assert_eq!(inbox.take().await, ("a".into(), Bytes::from_static(b"3")));
    }
}
