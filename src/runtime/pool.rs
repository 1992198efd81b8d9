//! Per-function pools of warm instances on their own threads.
//!
//! A [`Pool`] starts `concurrency` worker threads for one function. Each
//! worker owns at most one warm [`Instance`] and takes jobs from a bounded
//! queue shared by the pool's workers, so guest code never runs on an async
//! reactor thread and a busy function pushes back on its callers (awaiting
//! [`Pool::submit`]) instead of queueing without bound.
//!
//! A failed invocation drops the worker's instance; the next attempt (a
//! retry, or the next job) gets a fresh one. After `retries` further
//! failures the job's outcome is [`Outcome::Failed`], for the dead letters.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::Instant;

use bytes::Bytes;
use tokio::sync::oneshot;

use super::{Failure, Function, Instance, Output};

/// Jobs queued per worker beyond the one it is running: enough to keep a
/// worker busy while the dispatcher routes the next message, small enough
/// that a stalled function holds few messages.
const QUEUE_PER_WORKER: usize = 4;

/// Every [`Failure::kind`], in the order of
/// [`FunctionMetrics::failures_by_kind`].
pub const FAILURE_KINDS: [&str; 6] = ["error", "timeout", "fuel", "trap", "exit", "start"];

/// The result of a job.
#[derive(Debug)]
pub enum Outcome {
    /// The function succeeded (possibly after retries).
    Ok(Output),
    /// Every attempt failed; the last failure.
    Failed {
        /// How many attempts were made.
        attempts: u32,
        /// Why the last one failed.
        failure: Failure,
    },
}

/// Counters for one function (all its versions), read by the metrics
/// model ([`crate::telemetry`]) and tests.
#[derive(Debug, Default)]
pub struct FunctionMetrics {
    /// Attempts started (first tries and retries).
    pub invocations: AtomicU64,
    /// Attempts that succeeded.
    pub succeeded: AtomicU64,
    /// Attempts that failed.
    pub failures: AtomicU64,
    /// Attempts that failed, by [`Failure::kind`], in the order of
    /// [`FAILURE_KINDS`].
    pub failures_by_kind: [AtomicU64; FAILURE_KINDS.len()],
    /// Attempts that were retries (after a failed one).
    pub retries: AtomicU64,
    /// Messages that waited for a free instance (the queue was full).
    pub throttles: AtomicU64,
    /// Records successful invocations emitted.
    pub emitted_records: AtomicU64,
    /// Bytes (topics and payloads) of those records.
    pub emitted_bytes: AtomicU64,
    /// Messages successful invocations published locally.
    pub published: AtomicU64,
    /// Wall-clock times of recent successful attempts.
    pub durations: crate::metrics::Window,
    /// Jobs that failed every attempt.
    pub dead_letters: AtomicU64,
    /// Fresh instances started (the first, and after each failure).
    pub instances_started: AtomicU64,
    /// Sum of successful attempts' durations, microseconds.
    pub busy_micros: AtomicU64,
    /// Scheduled runs skipped because the one before was still going.
    pub schedule_skipped: AtomicU64,
}

impl FunctionMetrics {
    /// Failed attempts of one [`Failure::kind`] (0 for a kind that is not
    /// one).
    pub fn failures_of(&self, kind: &str) -> u64 {
        FAILURE_KINDS
            .iter()
            .position(|k| *k == kind)
            .map_or(0, |i| self.failures_by_kind[i].load(Ordering::Relaxed))
    }
}

/// What this pool's messages and instances came to: counted per version
/// of a function (a pool runs one version), for its status and its
/// probation after a deploy.
#[derive(Debug, Default)]
pub struct VersionCounts {
    /// Messages whose outcome is in.
    pub messages: AtomicU64,
    /// Of those, the ones that failed every attempt.
    pub failed: AtomicU64,
    /// Fresh instances its workers tried to start.
    pub starts: AtomicU64,
    /// Of those, the ones that failed (instantiation, `_initialize` or
    /// `edgefn_init`).
    pub failed_starts: AtomicU64,
    /// The last failure, as text.
    pub last_failure: std::sync::Mutex<Option<String>>,
}

/// One message for a function.
struct Job {
    /// The message topic.
    topic: Arc<str>,
    /// The message payload.
    payload: Bytes,
    /// Where the outcome goes.
    reply: oneshot::Sender<Outcome>,
    /// For a function that uses state: when it may run.
    turn: Option<crate::state::Turn>,
}

/// A function's workers and their queue. Dropping it closes the queue:
/// the workers finish what is queued and exit.
pub struct Pool {
    /// The queue; closing it stops the workers.
    jobs: async_channel::Sender<Job>,
    /// The worker threads, joined on [`Pool::shutdown`].
    workers: Vec<JoinHandle<()>>,
    /// Shared with the workers.
    metrics: Arc<FunctionMetrics>,
    /// This pool's own, shared with the workers.
    counts: Arc<VersionCounts>,
    /// What the workers run.
    function: Arc<Function>,
}

impl Pool {
    /// Starts `concurrency` workers for `function`, retrying a failed job
    /// `retries` times on fresh instances, counting in `metrics`.
    ///
    /// Fails only if a thread cannot be spawned.
    pub fn start(
        function: Arc<Function>,
        concurrency: usize,
        retries: u32,
        metrics: Arc<FunctionMetrics>,
    ) -> std::io::Result<Pool> {
        let (tx, rx) = async_channel::bounded(concurrency.max(1) * QUEUE_PER_WORKER);
        let counts = Arc::new(VersionCounts::default());
        let mut workers = Vec::new();
        for i in 0..concurrency.max(1) {
            let worker = Worker {
                function: function.clone(),
                retries,
                metrics: metrics.clone(),
                counts: counts.clone(),
                instance: None,
            };
            let rx = rx.clone();
            workers.push(
                std::thread::Builder::new()
                    .name(format!("fn-{}-{i}", function.spec().name))
                    .spawn(move || worker.run(rx))?,
            );
        }
        Ok(Pool {
            jobs: tx,
            workers,
            metrics,
            counts,
            function,
        })
    }

    /// Queues a message, waiting while the queue is full, and returns where
    /// its outcome will arrive. The receiver fails only if the pool was shut
    /// down before the job ran.
    pub async fn submit(&self, topic: Arc<str>, payload: Bytes) -> oneshot::Receiver<Outcome> {
        let (reply, rx) = oneshot::channel();
        let job = Job {
            turn: self
                .function
                .uses_state()
                .then(|| self.function.spec().state.take_turn()),
            topic,
            payload,
            reply,
        };
        // A send error means the pool is shut down: dropping the job drops
        // `reply`, which the caller sees as "not run".
        if let Err(async_channel::TrySendError::Full(job)) = self.jobs.try_send(job) {
            self.metrics.throttles.fetch_add(1, Ordering::Relaxed);
            let _ = self.jobs.send(job).await;
        }
        rx
    }

    /// The function's counters.
    pub fn metrics(&self) -> &Arc<FunctionMetrics> {
        &self.metrics
    }

    /// The function its workers run.
    pub fn function(&self) -> &Arc<Function> {
        &self.function
    }

    /// This pool's (this version's) outcomes.
    pub fn counts(&self) -> &Arc<VersionCounts> {
        &self.counts
    }

    /// Lets queued jobs finish, then stops and joins the workers.
    pub fn shutdown(self) {
        self.jobs.close();
        for w in self.workers {
            let _ = w.join();
        }
    }
}

/// One worker thread's state.
struct Worker {
    /// The function it runs.
    function: Arc<Function>,
    /// Further attempts after a failure.
    retries: u32,
    /// Shared counters.
    metrics: Arc<FunctionMetrics>,
    /// The pool's own.
    counts: Arc<VersionCounts>,
    /// The warm instance, if the last attempt succeeded.
    instance: Option<Instance>,
}

impl Worker {
    fn run(mut self, jobs: async_channel::Receiver<Job>) {
        while let Ok(job) = jobs.recv_blocking() {
            if let Some(t) = &job.turn {
                t.wait();
            }
            let outcome = self.handle(&job.topic, &job.payload);
            // The next message's invocation may start: this one's state
            // writes are applied.
            drop(job.turn);
            if let Outcome::Failed { failure, .. } = &outcome {
                *self.counts.last_failure.lock().expect("counts lock") = Some(failure.to_string());
                self.counts.failed.fetch_add(1, Ordering::Relaxed);
            }
            self.counts.messages.fetch_add(1, Ordering::Relaxed);
            // The receiver may be gone (shutdown); the outcome is then moot.
            let _ = job.reply.send(outcome);
        }
    }

    fn handle(&mut self, topic: &str, payload: &[u8]) -> Outcome {
        let function = self.function.clone();
        let name = &*function.spec().name;
        let mut attempts = 0;
        loop {
            attempts += 1;
            self.metrics.invocations.fetch_add(1, Ordering::Relaxed);
            if attempts > 1 {
                self.metrics.retries.fetch_add(1, Ordering::Relaxed);
            }
            let started = Instant::now();
            let result = self
                .instance()
                .and_then(|i| i.invoke_attempt(topic, payload, attempts));
            match result {
                Ok(output) => {
                    let took = started.elapsed();
                    if self.instance.as_ref().is_some_and(Instance::worn) {
                        tracing::debug!(
                            function = name,
                            "instance replaced: its memory is near memory_limit"
                        );
                        self.instance = None;
                    }
                    let m = &self.metrics;
                    m.succeeded.fetch_add(1, Ordering::Relaxed);
                    m.busy_micros
                        .fetch_add(took.as_micros() as u64, Ordering::Relaxed);
                    m.durations.record(took);
                    m.emitted_records
                        .fetch_add(output.records.len() as u64, Ordering::Relaxed);
                    let bytes: usize = output
                        .records
                        .iter()
                        .map(|r| r.topic.len() + r.payload.len())
                        .sum();
                    m.emitted_bytes.fetch_add(bytes as u64, Ordering::Relaxed);
                    m.published
                        .fetch_add(output.publishes.len() as u64, Ordering::Relaxed);
                    return Outcome::Ok(output);
                }
                Err(failure) => {
                    self.instance = None;
                    self.metrics.failures.fetch_add(1, Ordering::Relaxed);
                    if let Some(i) = FAILURE_KINDS.iter().position(|k| *k == failure.kind()) {
                        self.metrics.failures_by_kind[i].fetch_add(1, Ordering::Relaxed);
                    }
                    tracing::warn!(
                        function = name,
                        topic,
                        attempt = attempts,
                        kind = failure.kind(),
                        error = %crate::text::Printable(&failure.to_string()),
                        "invocation failed"
                    );
                    if attempts > self.retries {
                        self.metrics.dead_letters.fetch_add(1, Ordering::Relaxed);
                        return Outcome::Failed { attempts, failure };
                    }
                }
            }
        }
    }

    /// The warm instance, or a fresh one.
    fn instance(&mut self) -> Result<&mut Instance, Failure> {
        if self.instance.is_none() {
            self.metrics
                .instances_started
                .fetch_add(1, Ordering::Relaxed);
            self.counts.starts.fetch_add(1, Ordering::Relaxed);
            let started = self.function.new_instance();
            if started.is_err() {
                self.counts.failed_starts.fetch_add(1, Ordering::Relaxed);
            }
            self.instance = Some(started?);
        }
        Ok(self.instance.as_mut().expect("just set"))
    }
}
