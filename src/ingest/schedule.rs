//! The scheduler: fires the runs of functions with a `schedule`
//! ([`crate::schedule::Schedule`]) into the deliveries channel, where a
//! scheduled run is a delivery like a device's, its outcome committed like
//! any other. It follows the registry's functions: a function deployed
//! with a schedule starts firing, one removed stops.
//!
//! - A run still going when the next is due: that run is skipped and
//!   counted (`schedule_skipped`), never queued behind it.
//! - Runs missed while the gateway was down are not made up, except one:
//!   a function whose last committed run (kept in SQLite) is older than
//!   its latest due time runs once at start-up.
//! - Due times are wall-clock times, and a Pi's wall clock steps (no
//!   real-time clock; NTP sets it some time after boot). The scheduler
//!   compares how far the wall clock moved with how far the monotonic
//!   clock did each time it wakes (at least once a minute, and at every
//!   due time): when they differ by [`CLOCK_STEP`] or more, every due time
//!   is recomputed from the new wall time. A clock set back thus delays a
//!   schedule by at most one interval (or one minute), never by the step;
//!   a clock set forward runs each function once at once (its due time
//!   passed), then on the new times.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::mpsc;

use super::{Ack, AckWaiter, Delivery};
use crate::clock::now_ms;
use crate::registry::Registry;
use crate::schedule::{Run, Schedule, topic};

/// A difference between the wall clock's and the monotonic clock's
/// progress this large is a step of the wall clock (NTP setting it, an
/// operator's `date`), not the scheduler waking late.
pub const CLOCK_STEP: Duration = Duration::from_secs(1);

/// The longest the scheduler sleeps: how soon it notices a step of the
/// wall clock when no run is due sooner.
const LONGEST_SLEEP: Duration = Duration::from_secs(60);

/// One scheduled function as the scheduler tracks it.
struct Entry {
    schedule: Arc<Schedule>,
    /// The next due time (ms since the epoch).
    next_ms: u64,
    /// The run handed on last, until its outcome is committed.
    running: Option<AckWaiter>,
}

/// Reads the wall clock, ms since the epoch.
pub type WallClock = Arc<dyn Fn() -> u64 + Send + Sync>;

/// Fires scheduled runs into the deliveries channel (see the module doc).
pub struct Scheduler {
    /// Counts skipped runs.
    registry: Arc<Registry>,
    /// The scheduled functions, as they change.
    schedules: tokio::sync::watch::Receiver<crate::registry::Schedules>,
    deliveries: mpsc::Sender<Delivery>,
    /// Last committed run per function, from the store, for the one
    /// catch-up run at start-up; taken as each function is first seen.
    last_runs: HashMap<String, u64>,
    /// The wall clock due times are read on.
    wall: WallClock,
}

impl Scheduler {
    /// A scheduler over `registry`'s functions, handing runs to
    /// `deliveries`; `last_runs` is [`crate::store::Reader::schedule_runs`].
    pub fn new(
        registry: Arc<Registry>,
        deliveries: mpsc::Sender<Delivery>,
        last_runs: HashMap<String, u64>,
    ) -> Scheduler {
        Scheduler {
            schedules: registry.schedules(),
            registry,
            deliveries,
            last_runs,
            wall: Arc::new(now_ms),
        }
    }

    /// Runs until `shutdown` says so, or the deliveries channel closes.
    pub async fn run(mut self, mut shutdown: tokio::sync::watch::Receiver<bool>) {
        let mut changes = self.schedules.clone();
        let mut entries: HashMap<Arc<str>, Entry> = HashMap::new();
        // The wall and monotonic clocks when last awake.
        let mut last_awake: Option<(u64, tokio::time::Instant)> = None;
        loop {
            let now = (self.wall)();
            let awake = tokio::time::Instant::now();
            if let Some((wall, mono)) = last_awake {
                let moved = now as i128 - wall as i128;
                let passed = awake.duration_since(mono).as_millis() as i128;
                let step = moved - passed;
                if step.unsigned_abs() >= CLOCK_STEP.as_millis() {
                    tracing::warn!(
                        step_ms = step as i64,
                        "the wall clock was set {}: every schedule's next run is taken from the new time",
                        if step < 0 { "back" } else { "forward" }
                    );
                    if step < 0 {
                        for e in entries.values_mut() {
                            e.next_ms = e.schedule.next_after(now).unwrap_or(u64::MAX);
                        }
                    }
                }
            }
            last_awake = Some((now, awake));
            {
                let current = changes.borrow_and_update().clone();
                // A new version with the same schedule keeps its entry (and
                // its run still going); a changed schedule starts again.
                entries
                    .retain(|name, e| current.iter().any(|(n, s)| n == name && **s == *e.schedule));
                for (name, schedule) in current.iter() {
                    if entries.contains_key(name) {
                        continue;
                    }
                    let Some(next) = schedule.next_after(now) else {
                        tracing::warn!(function = %name, "its schedule names no future time");
                        continue;
                    };
                    // Missed while the gateway was down: the latest one
                    // runs now.
                    let missed = self
                        .last_runs
                        .remove(&**name)
                        .and_then(|last| schedule.latest_at(now).filter(|&due| due > last));
                    if let Some(due) = missed {
                        tracing::info!(function = %name, due_ms = due, "a scheduled run was missed while edgefn was down: running the latest now");
                    }
                    entries.insert(
                        name.clone(),
                        Entry {
                            schedule: schedule.clone(),
                            next_ms: missed.unwrap_or(next),
                            running: None,
                        },
                    );
                }
            }
            let now = (self.wall)();
            for (name, e) in entries.iter_mut() {
                if e.next_ms > now {
                    continue;
                }
                let scheduled_ms = e.next_ms;
                // Not made up: the next due time after now.
                e.next_ms = e.schedule.next_after(now).unwrap_or(u64::MAX);
                if e.running.as_mut().is_some_and(|w| w.try_get().is_none()) {
                    let metrics = self.registry.metrics_for(name);
                    metrics.schedule_skipped.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(
                        function = %name,
                        "skipped a scheduled run: the one before is still going"
                    );
                    continue;
                }
                let (ack, waiter) = Ack::waiter();
                e.running = Some(waiter);
                let payload = serde_json::to_vec(&Run {
                    scheduled_ms,
                    now_ms: now,
                })
                .expect("run JSON");
                let d = Delivery {
                    topic: topic(name),
                    payload: Bytes::from(payload),
                    ack,
                    replay: None,
                };
                tokio::select! {
                    sent = self.deliveries.send(d) => if sent.is_err() { return },
                    _ = crate::shutdown::stopped(&mut shutdown) => return,
                }
            }
            let next = entries.values().map(|e| e.next_ms).min();
            // Woken at least every minute, to notice a step of the clock;
            // measured from the time read above, so a step from then on
            // is noticed at the next wake.
            let wait =
                next.map(|n| Duration::from_millis(n.saturating_sub(now)).min(LONGEST_SLEEP));
            tokio::select! {
                changed = changes.changed() => if changed.is_err() { return },
                _ = sleep(wait) => {}
                _ = crate::shutdown::stopped(&mut shutdown) => return,
            }
        }
    }
}

/// Sleeps `d`, or forever.
async fn sleep(d: Option<Duration>) {
    match d {
        Some(d) => tokio::time::sleep(d).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A scheduler for one function `f` on `schedule`, reading the wall
    /// clock plus `offset_ms`; its runs, acknowledged at once.
    fn stepped(
        schedule: &str,
        offset_ms: Arc<std::sync::atomic::AtomicI64>,
    ) -> (mpsc::Receiver<Delivery>, impl Drop) {
        let (deliveries, rx) = mpsc::channel(4);
        let schedules: crate::registry::Schedules =
            vec![(Arc::from("f"), Arc::new(Schedule::parse(schedule).unwrap()))].into();
        let (functions, watch_rx) = tokio::sync::watch::channel(schedules);
        let (stop, shutdown) = tokio::sync::watch::channel(false);
        let scheduler = Scheduler {
            registry: Arc::new(Registry::default()),
            schedules: watch_rx,
            deliveries,
            last_runs: HashMap::new(),
            wall: Arc::new(move || (now_ms() as i64 + offset_ms.load(Ordering::Relaxed)) as u64),
        };
        tokio::spawn(scheduler.run(shutdown));
        /// Keeps the scheduler's inputs open; stops it when dropped.
        struct Running {
            _functions: tokio::sync::watch::Sender<crate::registry::Schedules>,
            stop: tokio::sync::watch::Sender<bool>,
        }
        impl Drop for Running {
            fn drop(&mut self) {
                let _ = self.stop.send(true);
            }
        }
        (
            rx,
            Running {
                _functions: functions,
                stop,
            },
        )
    }

    /// The next run: its due time; acknowledged, as a commit would.
    async fn next_run(rx: &mut mpsc::Receiver<Delivery>) -> u64 {
        let d = tokio::time::timeout(Duration::from_secs(90), rx.recv())
            .await
            .expect("a run within 90 s")
            .expect("the scheduler runs");
        let run: Run = serde_json::from_slice(&d.payload).unwrap();
        d.ack.complete();
        run.scheduled_ms
    }

    #[tokio::test]
    async fn a_clock_set_back_delays_a_schedule_by_one_interval_not_by_the_step() {
        let offset = Arc::new(std::sync::atomic::AtomicI64::new(0));
        let (mut runs, _stop) = stepped("every 1s", offset.clone());
        let first = next_run(&mut runs).await;
        // NTP sets the clock two hours back.
        offset.store(-2 * 3_600_000, Ordering::Relaxed);
        // Runs go on, on the new clock's seconds (about two hours "before"
        // the first), not two hours later.
        let mut next = next_run(&mut runs).await;
        if next > first {
            // One run may have been due before the step was seen.
            next = next_run(&mut runs).await;
        }
        assert!(next < first, "{next} after {first}");
        assert_eq!(next % 1000, 0);
        let after = next_run(&mut runs).await;
        assert_eq!(after, next + 1000);
    }

    #[tokio::test]
    async fn a_clock_set_forward_runs_once_then_on_the_new_times() {
        let offset = Arc::new(std::sync::atomic::AtomicI64::new(0));
        let (mut runs, _stop) = stepped("every 1s", offset.clone());
        let first = next_run(&mut runs).await;
        offset.store(3 * 3_600_000, Ordering::Relaxed);
        // The due time the step passed runs once; then the new clock's.
        let _passed = next_run(&mut runs).await;
        let next = next_run(&mut runs).await;
        assert!(next >= first + 3 * 3_600_000, "{next} vs {first}");
        assert_eq!(next_run(&mut runs).await, next + 1000);
    }
}
