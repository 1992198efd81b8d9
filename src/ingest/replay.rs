//! Replays of dead letters: the daemon's side of `edgefn dead-letters
//! replay` (src/cli/dead_letters.rs), a source of deliveries like a
//! device. Each marked dead letter goes to the current version of its
//! function only, and its outcome is committed like a device message's.

use std::collections::HashSet;
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::mpsc;

use super::{Ack, AckWaiter, Delivery, Replay};
use crate::store::Inspector;

/// How often the daemon looks for replays asked for.
pub const POLL: Duration = Duration::from_secs(1);

/// Most replays handed on per look.
const BATCH: usize = 64;

/// The daemon's side: hands marked dead letters to the pipeline.
pub struct Replayer {
    /// The database's dead letters.
    pub store: Inspector,
    /// The pipeline's input.
    pub deliveries: mpsc::Sender<Delivery>,
}

impl Replayer {
    /// Runs until `shutdown` says so or the pipeline's input closes.
    pub async fn run(self, mut shutdown: tokio::sync::watch::Receiver<bool>) {
        let store = std::sync::Arc::new(std::sync::Mutex::new(self.store));
        let mut in_flight: Vec<(i64, AckWaiter)> = Vec::new();
        let mut tick = tokio::time::interval(POLL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = crate::shutdown::stopped(&mut shutdown) => return,
            }
            in_flight.retain_mut(|(_, w)| w.try_get().is_none());
            let busy: HashSet<i64> = in_flight.iter().map(|(id, _)| *id).collect();
            let store = store.clone();
            let marked = tokio::task::spawn_blocking(move || {
                store.lock().expect("dead letters lock").requested(BATCH)
            })
            .await
            .expect("dead letters task");
            let marked = match marked {
                Ok(m) => m,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot read the dead letters to replay");
                    continue;
                }
            };
            for d in marked.into_iter().filter(|d| !busy.contains(&d.id)) {
                tracing::info!(
                    id = d.id,
                    function = d.letter.function,
                    "replaying a dead letter"
                );
                let (ack, waiter) = Ack::waiter();
                let delivery = Delivery {
                    topic: d.letter.topic,
                    payload: Bytes::from(d.letter.payload),
                    ack,
                    replay: Some(Replay {
                        id: d.id,
                        function: d.letter.function,
                    }),
                };
                in_flight.push((d.id, waiter));
                tokio::select! {
                    sent = self.deliveries.send(delivery) => if sent.is_err() { return },
                    _ = crate::shutdown::stopped(&mut shutdown) => return,
                }
            }
        }
    }
}
