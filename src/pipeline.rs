//! The middle of the data flow: route → invoke → commit → ack.
//!
//! ```text
//! deliveries ─▶ dispatch ─(ordered, bounded)─▶ commit thread ─▶ ack
//!                  │ submit to each matching    settles outcomes in ingest
//!                  ▼ function's pool            order, group commit, then acks
//!               pools (worker threads, warm instances)
//! ```
//!
//! - **dispatch** routes each delivery through the registry's current
//!   table and submits it to every matching function's pool (waiting while
//!   a pool is busy: backpressure), then queues a `Pending` holding the
//!   outcome receivers *in ingest order*. The `Pending` holds the version
//!   each went to, so a function replaced meanwhile finishes it.
//! - the **commit thread** owns the SQLite writer. It takes pendings in that
//!   order, so commits — and therefore outbox `seq`s and upstream order —
//!   follow ingest order even when invocations run in parallel. It takes
//!   every pending whose outcomes are all in (up to `max_batch`) and commits
//!   them in one transaction; while it is fsyncing, the next batch runs in
//!   the pools (group commit). Only after the commit does it complete the
//!   acks. A failed commit is retried with backoff; nothing is acknowledged
//!   meanwhile. The same transactions delete the records the forwarder
//!   reports delivered; when no input comes for `DELETE_DELAY`, it
//!   commits those alone.
//!
//! The pools' workers wake the commit thread directly when an outcome is in:
//! no task sits between them, because every thread hop on this path is
//! latency a device waits for (docs/PERFORMANCE.md).
//!
//! Every channel is bounded, so a slow stage pushes back to ingest, which
//! stops acknowledging, which makes the broker stop sending.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::{Notify, mpsc, oneshot};

use crate::ingest::{Ack, Delivery, Replay};
use crate::metrics::{Metrics, event};
use crate::registry::{Deployed, Registry};
use crate::runtime::Emitted;
use crate::runtime::pool::Outcome;
use crate::shutdown::Backoff;
use crate::store::{DeadLetter, NewRecord, Outcomes, Replayed, Writer};

/// A commit that takes this long is logged: on a healthy SD card a commit
/// takes a few milliseconds, so this means storage trouble that devices
/// feel (each message in the commit waited for it).
const SLOW_COMMIT: Duration = Duration::from_millis(100);

/// How long deletes of records the upstream acknowledged wait for a commit
/// of new input to ride along with before they get one of their own. At a
/// steady low rate (a reading every 50 ms) this halves the commits, and so
/// the fsyncs and the pages written per reading; an acknowledged record is
/// never sent again meanwhile, and after a crash at most this much of them
/// is (a duplicate upstream, which the record id lets the cloud drop).
const DELETE_DELAY: Duration = Duration::from_secs(1);

/// A delivery whose invocations are under way.
struct Pending {
    /// Completed after commit.
    ack: Ack,
    /// The input, kept for dead letters.
    topic: Arc<str>,
    /// The input, kept for dead letters.
    payload: Bytes,
    /// `(function version, outcome)` per matching function whose outcome
    /// is not yet taken, in match order.
    running: VecDeque<(Arc<Deployed>, oneshot::Receiver<Outcome>)>,
    /// `(function version, outcome)` taken so far, in match order; `None`
    /// if the pool shut down before running it.
    settled: Vec<(Arc<Deployed>, Option<Outcome>)>,
    /// Set for a replayed dead letter.
    replay: Option<Replay>,
}

impl Pending {
    /// Takes the outcomes that are in, without waiting; true when all are.
    fn poll(&mut self) -> bool {
        while let Some((f, rx)) = self.running.front_mut() {
            let outcome = match rx.try_recv() {
                Ok(o) => Some(o),
                Err(oneshot::error::TryRecvError::Empty) => return false,
                Err(oneshot::error::TryRecvError::Closed) => None,
            };
            let f = f.clone();
            self.running.pop_front();
            self.settled.push((f, outcome));
        }
        true
    }

    /// Waits for every outcome. Cancel-safe: an outcome is taken only
    /// once it is in, so a timed-out wait can be resumed.
    async fn settle(&mut self) {
        while let Some((_, rx)) = self.running.front_mut() {
            let outcome = rx.await.ok();
            let (f, _) = self.running.pop_front().expect("the front");
            self.settled.push((f, outcome));
        }
    }

    /// What to commit, once settled; `None` if a pool shut down before
    /// running its part: the delivery is then dropped unacknowledged and
    /// comes again.
    fn into_ready(self) -> Option<Ready> {
        debug_assert!(self.running.is_empty());
        let mut outcomes = Outcomes::default();
        let mut publishes = Vec::new();
        if let Some(r) = &self.replay {
            if r.function == crate::config::UPSTREAM {
                // A record the upstream refused: sent again.
                outcomes.records.push(NewRecord {
                    topic: self.topic.to_string(),
                    payload: self.payload.to_vec(),
                });
                outcomes.replays.push(Replayed::Done { id: r.id });
            } else if self.settled.is_empty() {
                outcomes.replays.push(Replayed::NoFunction { id: r.id });
            }
        }
        for (f, outcome) in self.settled {
            match outcome? {
                Outcome::Ok(out) => {
                    outcomes
                        .records
                        .extend(out.records.into_iter().map(|e| NewRecord {
                            topic: e.topic,
                            payload: e.payload,
                        }));
                    publishes.extend(out.publishes);
                    if !out.state.is_empty() {
                        outcomes.state.push((f.state().clone(), out.state));
                    }
                }
                Outcome::Failed { attempts, failure } => {
                    let letter = DeadLetter {
                        function: f.name().to_owned(),
                        topic: self.topic.to_string(),
                        payload: self.payload.to_vec(),
                        kind: failure.kind(),
                        error: failure.to_string(),
                        attempts,
                        version: Some(f.version()),
                    };
                    match &self.replay {
                        Some(r) => outcomes.replays.push(Replayed::Failed { id: r.id, letter }),
                        None => outcomes.dead_letters.push(letter),
                    }
                    continue;
                }
            }
            if let Some(r) = &self.replay {
                outcomes.replays.push(Replayed::Done { id: r.id });
            }
        }
        if let Some(name) = crate::schedule::function_of(&self.topic)
            && self.replay.is_none()
            && let Ok(run) = serde_json::from_slice::<crate::schedule::Run>(&self.payload)
        {
            outcomes.schedule_runs.push((name.into(), run.scheduled_ms));
        }
        Some(Ready {
            outcomes,
            publishes,
            ack: self.ack,
        })
    }
}

/// A delivery ready to commit.
struct Ready {
    /// What to write.
    outcomes: Outcomes,
    /// What to publish locally after the commit.
    publishes: Vec<Emitted>,
    /// Completed after commit.
    ack: Ack,
}

/// Everything the pipeline needs.
pub struct Pipeline {
    /// The functions, read per message.
    pub registry: Arc<Registry>,
    /// The SQLite writer.
    pub writer: Writer,
    /// Most deliveries per group commit.
    pub max_batch: usize,
    /// How long a commit waits for more deliveries after its first
    /// (`[buffer] commit_delay`).
    pub commit_delay: Duration,
    /// Larger payloads are refused (acknowledged, counted, logged), whichever
    /// source they came from.
    pub max_message_size: usize,
    /// Gateway counters.
    pub metrics: Arc<Metrics>,
    /// Woken after each commit that added records (the forwarder waits on it).
    pub committed: Arc<Notify>,
    /// Where functions' local publishes go after commit.
    pub local_publish: Option<mpsc::Sender<Emitted>>,
    /// Commit times.
    pub commit_latency: Arc<crate::metrics::Window>,
}

/// Handles of a running pipeline.
pub struct Running {
    /// Finishes when the dispatcher has handed everything on.
    dispatch: tokio::task::JoinHandle<()>,
    /// Finishes when everything collected was committed (or given up).
    commit: std::thread::JoinHandle<Writer>,
    /// Tells a commit thread stuck on a full buffer or a failing disk to
    /// give up (its acks are dropped, never sent).
    give_up: Arc<AtomicBool>,
}

impl Running {
    /// Waits until every delivery taken from the input channel (closed by
    /// the caller) is committed and acknowledged. If that takes longer than
    /// `grace` (a full buffer, a dead disk), what is left is dropped
    /// unacknowledged: the broker or device sends it again.
    pub async fn drain(self, grace: Duration) -> Writer {
        let give_up = self.give_up.clone();
        let timer = tokio::spawn(async move {
            tokio::time::sleep(grace).await;
            give_up.store(true, Ordering::Relaxed);
        });
        let _ = self.dispatch.await;
        let commit = self.commit;
        let writer = tokio::task::spawn_blocking(move || commit.join())
            .await
            .expect("join")
            .expect("commit thread panicked");
        timer.abort();
        writer
    }
}

impl Pipeline {
    /// Starts the stages, reading `deliveries` until it is closed. Call
    /// from within the tokio runtime (the commit thread waits through it).
    pub fn start(self, deliveries: mpsc::Receiver<Delivery>) -> Running {
        let (pending_tx, pending_rx) = mpsc::channel(self.max_batch.max(64) * 2);
        let give_up = Arc::new(AtomicBool::new(false));
        let dispatch = tokio::spawn(dispatch(
            deliveries,
            self.max_message_size,
            self.registry.clone(),
            self.metrics.clone(),
            pending_tx,
        ));
        let commit = {
            let give_up = give_up.clone();
            let rt = tokio::runtime::Handle::current();
            std::thread::Builder::new()
                .name("edgefn-commit".into())
                .spawn(move || commit_loop(self, pending_rx, &give_up, &rt))
                .expect("spawn commit thread")
        };
        Running {
            dispatch,
            commit,
            give_up,
        }
    }
}

async fn dispatch(
    mut deliveries: mpsc::Receiver<Delivery>,
    max_message_size: usize,
    registry: Arc<Registry>,
    metrics: Arc<Metrics>,
    pending: mpsc::Sender<Pending>,
) {
    let mut matched = Vec::new();
    while let Some(d) = deliveries.recv().await {
        if d.replay.is_some() {
            // Counted by outcome (`replays_*`).
        } else if crate::schedule::function_of(&d.topic).is_some() {
            Metrics::add(&metrics.scheduled_runs, 1);
        } else {
            Metrics::add(&metrics.received, 1);
        }
        // A replayed dead letter was taken once: no second size check.
        if d.payload.len() > max_message_size && d.replay.is_none() {
            event!(
                metrics.refused_too_large,
                warn,
                topic = d.topic,
                size = d.payload.len(),
                max = max_message_size,
                "refused a message larger than local.max_message_size"
            );
            d.ack.complete();
            continue;
        }
        let table = registry.table();
        if let Some(r) = &d.replay {
            // To the function that failed on it, whatever else the topic
            // triggers.
            matched.clear();
            matched.extend(table.position(&r.function));
            if matched.is_empty() && r.function != crate::config::UPSTREAM {
                tracing::error!(
                    id = r.id,
                    function = r.function,
                    "cannot replay a dead letter: its function is not on this gateway (it stays a dead letter)"
                );
                Metrics::add(&metrics.replays_refused, 1);
            }
        } else {
            table.route_into(&d.topic, &mut matched);
        }
        if matched.is_empty() && d.replay.is_none() {
            Metrics::add(&metrics.unrouted, 1);
            d.ack.complete();
            continue;
        }
        let topic: Arc<str> = d.topic.into();
        let mut running = VecDeque::with_capacity(matched.len());
        for &i in &matched {
            let f = table.function(i);
            let outcome = f.pool().submit(topic.clone(), d.payload.clone()).await;
            running.push_back((f.clone(), outcome));
        }
        let p = Pending {
            ack: d.ack,
            topic,
            payload: d.payload,
            settled: Vec::with_capacity(running.len()),
            running,
            replay: d.replay,
        };
        if pending.send(p).await.is_err() {
            return;
        }
    }
}

fn commit_loop(
    pipeline: Pipeline,
    mut pending: mpsc::Receiver<Pending>,
    give_up: &AtomicBool,
    rt: &tokio::runtime::Handle,
) -> Writer {
    let Pipeline {
        mut writer,
        max_batch,
        commit_delay,
        metrics,
        committed,
        local_publish,
        commit_latency,
        ..
    } = pipeline;
    let mut batch: Vec<Ready> = Vec::with_capacity(max_batch);
    // The next delivery in order, taken but with outcomes still to come.
    let mut held: Option<Pending> = None;
    let stop = || give_up.load(Ordering::Relaxed);
    loop {
        // Wait for input. Records the upstream acknowledged meanwhile are
        // deleted by the next commit; with no input for DELETE_DELAY after
        // they are reported, by a commit of their own.
        let first = match held.take() {
            Some(p) => Some(p),
            None => match pending.try_recv() {
                Ok(p) => Some(p),
                Err(mpsc::error::TryRecvError::Disconnected) => break,
                Err(mpsc::error::TryRecvError::Empty) => {
                    let next = rt.block_on(async {
                        if !writer.has_acknowledged() {
                            tokio::select! {
                                p = pending.recv() => return Some(p),
                                _ = writer.acknowledgements() => {}
                            }
                        }
                        tokio::time::timeout(DELETE_DELAY, pending.recv())
                            .await
                            .ok()
                    });
                    match next {
                        Some(Some(p)) => Some(p),
                        Some(None) => break,
                        None => None,
                    }
                }
            },
        };
        if let Some(mut p) = first {
            if !p.poll() {
                rt.block_on(p.settle());
            }
            batch.extend(p.into_ready());
        }
        // Then everything else that is ready, in order.
        while batch.len() < max_batch {
            let Ok(mut p) = pending.try_recv() else { break };
            if p.poll() {
                batch.extend(p.into_ready());
            } else {
                held = Some(p);
                break;
            }
        }
        // With a commit delay, what comes in order until it is over.
        if !commit_delay.is_zero() && !batch.is_empty() {
            let deadline = tokio::time::Instant::now() + commit_delay;
            while batch.len() < max_batch {
                let next = match held.take() {
                    Some(p) => Some(p),
                    // Timers are made inside the runtime (this thread is not).
                    None => rt
                        .block_on(async { tokio::time::timeout_at(deadline, pending.recv()).await })
                        .ok()
                        .flatten(),
                };
                let Some(mut p) = next else { break };
                if p.poll()
                    || rt
                        .block_on(async { tokio::time::timeout_at(deadline, p.settle()).await })
                        .is_ok()
                {
                    batch.extend(p.into_ready());
                } else {
                    held = Some(p);
                    break;
                }
            }
        }
        let mut backoff = Backoff::new(Duration::from_millis(50), Duration::from_secs(5));
        let done = loop {
            // Room first, claims after: while the batch waits for room in a
            // full buffer, a device that gives up on its message (and will
            // send it again) can still take it out (see `ingest`).
            let incoming = batch.iter().map(|r| r.outcomes.bytes()).sum();
            let room = writer.wait_for_room(incoming, &stop);
            if let Ok(false) = room {
                break None;
            }
            let before = batch.len();
            if room.is_ok() {
                // An outcome that wrote state is committed even if its
                // source gave up (the device then sends a duplicate): the
                // state in memory already holds its writes, and later
                // invocations read them.
                batch.retain(|r| r.ack.claim() || !r.outcomes.state.is_empty());
                Metrics::add(&metrics.abandoned, (before - batch.len()) as u64);
            }
            let mut outcomes: Vec<&mut Outcomes> =
                batch.iter_mut().map(|r| &mut r.outcomes).collect();
            let started = Instant::now();
            match room.and_then(|_| writer.commit(&mut outcomes, &stop)) {
                Ok(done) => {
                    let took = started.elapsed();
                    if !outcomes.is_empty() {
                        commit_latency.record(took);
                    }
                    if took >= SLOW_COMMIT {
                        tracing::warn!(
                            took = ?took,
                            deliveries = outcomes.len(),
                            records = done.as_ref().map_or(0, |d| d.records),
                            "a commit took long; every message in it waited for it \
                             (slow or busy storage, a WAL checkpoint, or a full buffer)"
                        );
                    }
                    break done;
                }
                Err(e) => {
                    drop(outcomes);
                    for r in &batch {
                        r.ack.unclaim();
                    }
                    let delay = backoff.next_delay();
                    event!(
                        metrics.commit_failures,
                        error,
                        error = %e,
                        retry_in = ?delay,
                        held = batch.len(),
                        "commit failed; the messages stay unacknowledged and the commit is retried"
                    );
                    if stop() {
                        break None;
                    }
                    std::thread::sleep(delay);
                }
            }
        };
        let Some(done) = done else {
            // Given up at shutdown: drop the acks unsent.
            batch.clear();
            continue;
        };
        Metrics::add(&metrics.commit_batches, done.transactions);
        Metrics::add(&metrics.committed, batch.len() as u64);
        Metrics::add(&metrics.records_buffered, done.records);
        Metrics::add(&metrics.dead_letters, done.dead_letters);
        Metrics::add(&metrics.dead_letters_dropped, done.dead_letters_dropped);
        Metrics::add(&metrics.dropped_records, done.dropped);
        if done.records > 0 {
            committed.notify_one();
        }
        for r in batch.drain(..) {
            for replayed in &r.outcomes.replays {
                match replayed {
                    Replayed::Done { .. } => Metrics::add(&metrics.replays_done, 1),
                    Replayed::Failed { .. } => Metrics::add(&metrics.replays_failed, 1),
                    Replayed::NoFunction { .. } => {}
                }
            }
            r.ack.complete();
            for p in r.publishes {
                if let Some(tx) = &local_publish {
                    Metrics::add(&metrics.local_publishes, 1);
                    if tx.try_send(p).is_err() {
                        event!(
                            metrics.local_publishes_dropped,
                            warn,
                            "local publish queue full; a function's publish was dropped"
                        );
                    }
                }
            }
        }
    }
    writer
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Durability, FullPolicy};
    use crate::ingest::AckWaiter;
    use crate::registry::Origin;
    use crate::route::TopicFilter;
    use crate::runtime::pool::Pool;
    use crate::runtime::{FunctionSpec, Runtime, Target};

    /// An ABI v1 module that runs `body` on each message, then passes the
    /// payload to the host import `edgefn.<import>` under the topic `topic`,
    /// and succeeds. `body` may use the local `$n`.
    fn guest(import: &str, topic: &str, body: &str) -> String {
        let len = topic.len();
        format!(
            r#"(module
      (import "edgefn" "{import}" (func $host (param i32 i32 i32 i32) (result i32)))
      (memory (export "memory") 2)
      (data (i32.const 0) "{topic}")
      (func (export "edgefn_abi_version") (result i32) (i32.const 1))
      (func (export "edgefn_alloc") (param i32) (result i32) (i32.const 1024))
      (func (export "edgefn_on_message") (param i32 i32 i32 i32) (result i32)
        (local $n i32)
        {body}
        (drop (call $host (i32.const 0) (i32.const {len}) (local.get 2) (local.get 3)))
        (i32.const 0)))"#
        )
    }

    /// Emits every payload to `echo`.
    fn echo() -> String {
        guest("emit", "echo", "")
    }

    /// Publishes every payload to the local topic `cmd`.
    fn publisher() -> String {
        guest("publish", "cmd", "")
    }

    /// Emits every payload to `echo`, after a long busy loop if the payload
    /// starts with `s` (slow).
    fn slow_on_s() -> String {
        guest(
            "emit",
            "echo",
            "(if (i32.eq (i32.load8_u (local.get 2)) (i32.const 115))
          (then
            (local.set $n (i32.const 50000000))
            (block $done (loop $l
              (br_if $done (i32.eqz (local.get $n)))
              (local.set $n (i32.sub (local.get $n) (i32.const 1)))
              (br $l)))))",
        )
    }

    /// A store in `dir` with room to spare.
    fn open_store(dir: &std::path::Path, durability: Durability) -> (Writer, crate::store::Reader) {
        let buffer = crate::config::BufferConfig {
            durability,
            max_size: 1 << 30,
            full_policy: FullPolicy::Backpressure,
            ..Default::default()
        };
        crate::store::open(dir, &buffer).unwrap()
    }

    /// A pipeline running `wat` on every topic with `concurrency` warm
    /// instances, committing with `writer`.
    fn start(
        wat: &str,
        writer: Writer,
        metrics: &Arc<Metrics>,
        local_publish: Option<mpsc::Sender<Emitted>>,
        concurrency: usize,
    ) -> (mpsc::Sender<Delivery>, Running) {
        let (tx, running, _) = start_with(
            wat,
            writer,
            metrics,
            local_publish,
            concurrency,
            Duration::ZERO,
        );
        (tx, running)
    }

    /// [`start`] with a commit delay; also returns the registry.
    fn start_with(
        wat: &str,
        writer: Writer,
        metrics: &Arc<Metrics>,
        local_publish: Option<mpsc::Sender<Emitted>>,
        concurrency: usize,
        commit_delay: Duration,
    ) -> (mpsc::Sender<Delivery>, Running, Arc<Registry>) {
        let rt = Runtime::new(Target::Native).unwrap();
        let spec = FunctionSpec {
            publish_allow: Arc::from([TopicFilter::new("#").unwrap()]),
            ..FunctionSpec::for_test("f")
        };
        let f = rt.load("f", &wat::parse_str(wat).unwrap(), spec).unwrap();
        let registry = Arc::new(Registry::default());
        let pool = Pool::start(Arc::new(f), concurrency, 0, registry.metrics_for("f")).unwrap();
        let triggers = vec![TopicFilter::new("#").unwrap()];
        registry.install(Deployed::new("f", 0, triggers, pool, Origin::Config));
        let (tx, rx) = mpsc::channel(16);
        let running = Pipeline {
            registry: registry.clone(),
            writer,
            max_batch: 16,
            commit_delay,
            max_message_size: 1 << 20,
            metrics: metrics.clone(),
            committed: Arc::new(Notify::new()),
            local_publish,
            commit_latency: Arc::default(),
        }
        .start(rx);
        (tx, running, registry)
    }

    /// The payloads in the outbox, in order (the first 10).
    fn buffered(reader: &crate::store::Reader) -> Vec<Vec<u8>> {
        reader
            .after(0, 10)
            .unwrap()
            .into_iter()
            .map(|r| r.payload)
            .collect()
    }

    /// Sends `payload` on topic `t`; returns the waiter for its ack.
    async fn deliver(tx: &mpsc::Sender<Delivery>, payload: impl Into<Bytes>) -> AckWaiter {
        let (ack, waiter) = Ack::waiter();
        tx.send(Delivery {
            topic: "t".into(),
            payload: payload.into(),
            ack,
            replay: None,
        })
        .await
        .unwrap();
        waiter
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn with_a_commit_delay_a_message_that_comes_meanwhile_shares_the_commit() {
        let dir = tempfile::tempdir().unwrap();
        let (writer, reader) = open_store(dir.path(), Durability::Full);
        let metrics = Arc::new(Metrics::default());
        let (tx, running, registry) =
            start_with(&echo(), writer, &metrics, None, 1, Duration::from_secs(3));
        let f = registry.metrics_for("f");
        let mut waiters = Vec::new();
        for (i, payload) in ["a", "b"].into_iter().enumerate() {
            let waiter = deliver(&tx, payload).await;
            waiters.push(waiter);
            until("the invocation is done", || {
                f.succeeded.load(Ordering::Relaxed) == i as u64 + 1
            })
            .await;
            // Its outcome is in, and still it waits for the delay.
            assert_eq!(metrics.committed.load(Ordering::Relaxed), 0);
        }
        for w in waiters {
            assert_eq!(w.await, Ok(()));
        }
        assert_eq!(metrics.committed.load(Ordering::Relaxed), 2);
        assert_eq!(metrics.commit_batches.load(Ordering::Relaxed), 1);
        assert_eq!(buffered(&reader), [b"a".to_vec(), b"b".to_vec()]);
        drop(tx);
        running.drain(Duration::from_secs(5)).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn local_publishes_that_find_the_queue_full_are_counted_and_acks_go_on() {
        let dir = tempfile::tempdir().unwrap();
        let (writer, _reader) = open_store(dir.path(), Durability::Relaxed);
        let metrics = Arc::new(Metrics::default());
        // Room for one publish, and nobody taking it.
        let (publish_tx, mut publish_rx) = mpsc::channel(1);
        let (tx, running) = start(&publisher(), writer, &metrics, Some(publish_tx), 1);
        for i in 0..3 {
            let waiter = deliver(&tx, format!("go {i}")).await;
            assert_eq!(waiter.await, Ok(()));
        }
        // Acks go out first, then the publishes.
        until("three publishes tried", || {
            metrics.local_publishes.load(Ordering::Relaxed) == 3
        })
        .await;
        assert_eq!(metrics.local_publishes_dropped.load(Ordering::Relaxed), 2);
        assert_eq!(publish_rx.recv().await.unwrap().payload, b"go 0");
        drop(tx);
        running.drain(Duration::from_secs(5)).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_slow_message_holds_back_the_commit_and_ack_of_a_faster_later_one() {
        let dir = tempfile::tempdir().unwrap();
        let (writer, reader) = open_store(dir.path(), Durability::Relaxed);
        let metrics = Arc::new(Metrics::default());
        // Two instances: the second message runs, and finishes, while the
        // first is still busy.
        let (tx, running) = start(&slow_on_s(), writer, &metrics, None, 2);
        let (slow_ack, mut slow) = Ack::waiter();
        let (fast_ack, fast) = Ack::waiter();
        for (payload, ack) in [("slow", slow_ack), ("fast", fast_ack)] {
            let payload = Bytes::from(payload);
            let topic = "t".into();
            tx.send(Delivery {
                topic,
                payload,
                ack,
                replay: None,
            })
            .await
            .unwrap();
        }
        assert_eq!(fast.await, Ok(()));
        // Commits (and so acks and outbox order) follow ingest order.
        assert_eq!(
            slow.try_get(),
            Some(Ok(())),
            "the later message was acked first"
        );
        assert_eq!(buffered(&reader), [b"slow".to_vec(), b"fast".to_vec()]);
        drop(tx);
        running.drain(Duration::from_secs(5)).await;
    }

    /// Emits what state key `k` held (to `seen`, if anything), sets it to
    /// the payload, then traps if the payload starts with `!`.
    const STATEFUL: &str = r#"(module
      (import "edgefn" "state_get" (func $get (param i32 i32 i32 i32) (result i32)))
      (import "edgefn" "state_set" (func $set (param i32 i32 i32 i32) (result i32)))
      (import "edgefn" "emit" (func $emit (param i32 i32 i32 i32) (result i32)))
      (memory (export "memory") 2)
      (data (i32.const 0) "k")
      (data (i32.const 16) "seen")
      (func (export "edgefn_abi_version") (result i32) (i32.const 1))
      (func (export "edgefn_alloc") (param i32) (result i32) (i32.const 1024))
      (func (export "edgefn_on_message") (param i32 i32 i32 i32) (result i32)
        (local $n i32)
        (local.set $n (call $get (i32.const 0) (i32.const 1) (i32.const 512) (i32.const 256)))
        (if (i32.ge_s (local.get $n) (i32.const 0))
          (then (drop (call $emit (i32.const 16) (i32.const 4) (i32.const 512) (local.get $n)))))
        (drop (call $set (i32.const 0) (i32.const 1) (local.get 2) (local.get 3)))
        (if (i32.eq (i32.load8_u (local.get 2)) (i32.const 33)) (then unreachable))
        (i32.const 0)))"#;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn state_is_committed_with_the_outcome_and_a_failed_invocation_leaves_none() {
        let dir = tempfile::tempdir().unwrap();
        let (writer, reader) = open_store(dir.path(), Durability::Full);
        let metrics = Arc::new(Metrics::default());
        let (tx, running) = start(STATEFUL, writer, &metrics, None, 1);
        for payload in ["one", "!trap", "two"] {
            let waiter = deliver(&tx, payload).await;
            assert_eq!(waiter.await, Ok(()));
        }
        // "two" saw "one": the write of the failed "trap" was discarded.
        assert_eq!(buffered(&reader), [b"one".to_vec()]);
        assert_eq!(metrics.dead_letters.load(Ordering::Relaxed), 1);
        let stored = reader.function_states().unwrap();
        assert_eq!(stored["f"], [(b"k".to_vec(), b"two".to_vec())]);
        drop(tx);
        running.drain(Duration::from_secs(5)).await;
    }

    /// Adds one to the little-endian u32 under state key `k`.
    const COUNTER: &str = r#"(module
      (import "edgefn" "state_get" (func $get (param i32 i32 i32 i32) (result i32)))
      (import "edgefn" "state_set" (func $set (param i32 i32 i32 i32) (result i32)))
      (memory (export "memory") 2)
      (data (i32.const 0) "k")
      (func (export "edgefn_abi_version") (result i32) (i32.const 1))
      (func (export "edgefn_alloc") (param i32) (result i32) (i32.const 1024))
      (func (export "edgefn_on_message") (param i32 i32 i32 i32) (result i32)
        (if (i32.ne (call $get (i32.const 0) (i32.const 1) (i32.const 512) (i32.const 4)) (i32.const 4))
          (then (i32.store (i32.const 512) (i32.const 0))))
        (i32.store (i32.const 512) (i32.add (i32.load (i32.const 512)) (i32.const 1)))
        (drop (call $set (i32.const 0) (i32.const 1) (i32.const 512) (i32.const 4)))
        (i32.const 0)))"#;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn messages_in_flight_together_each_see_the_state_the_one_before_left() {
        for concurrency in [1, 4] {
            counts_to_200(concurrency).await;
        }
    }

    /// 200 messages through [`COUNTER`] with `concurrency` instances.
    async fn counts_to_200(concurrency: usize) {
        let dir = tempfile::tempdir().unwrap();
        let (writer, reader) = open_store(dir.path(), Durability::Full);
        let metrics = Arc::new(Metrics::default());
        let (tx, running) = start(COUNTER, writer, &metrics, None, concurrency);
        // All sent before any is acknowledged: most run while the ones
        // before them wait for their commit.
        let mut waiters = Vec::new();
        for i in 0..200 {
            let waiter = deliver(&tx, format!("{i}")).await;
            waiters.push(waiter);
        }
        for w in waiters {
            assert_eq!(w.await, Ok(()));
        }
        assert!(
            metrics.commit_batches.load(Ordering::Relaxed) < 200,
            "no two messages shared a commit: the test proves nothing"
        );
        let stored = reader.function_states().unwrap();
        assert_eq!(
            stored["f"],
            [(b"k".to_vec(), 200u32.to_le_bytes().to_vec())]
        );
        drop(tx);
        running.drain(Duration::from_secs(5)).await;
    }

    async fn until(what: &str, pred: impl Fn() -> bool) {
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        while !pred() {
            assert!(std::time::Instant::now() < deadline, "never: {what}");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_failing_commit_is_retried_and_nothing_is_acked_before_it_succeeds() {
        let dir = tempfile::tempdir().unwrap();
        let (mut writer, reader) = open_store(dir.path(), Durability::Full);
        let disk_full = writer.disk_full_switch();
        disk_full.store(true, Ordering::Relaxed);
        let metrics = Arc::new(Metrics::default());
        let (tx, running) = start(&echo(), writer, &metrics, None, 1);

        // Large enough that the database must grow to hold it.
        let mut waiter = deliver(&tx, vec![b'x'; 64 * 1024]).await;

        until("two failed commits", || {
            metrics.commit_failures.load(Ordering::Relaxed) >= 2
        })
        .await;
        assert_eq!(waiter.try_get(), None, "acknowledged before the commit");
        assert_eq!(reader.pending().unwrap(), 0);

        // Room again: the retry goes through, then (only then) the ack.
        disk_full.store(false, Ordering::Relaxed);
        assert_eq!(waiter.await, Ok(()));
        assert_eq!(reader.pending().unwrap(), 1);
        assert_eq!(metrics.committed.load(Ordering::Relaxed), 1);
        drop(tx);
        running.drain(Duration::from_secs(5)).await;
    }
}
