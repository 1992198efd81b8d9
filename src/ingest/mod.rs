//! Ingest: device messages in, one [`Delivery`] type out.
//!
//! Two sources produce deliveries: [`mqtt`] (an existing broker such as
//! Mosquitto, as an MQTT 5 client with manual acknowledgements) and
//! `embedded` (the in-process rmqtt broker, through its publish hook).
//! Each delivery carries an [`Ack`]; the pipeline completes it only after
//! the message's outcome is committed to SQLite. An ack that is dropped
//! instead is never sent: the broker redelivers (external) or the device is
//! not acknowledged (embedded).

#[cfg(feature = "embedded-broker")]
pub mod embedded;
pub mod mqtt;

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use tokio::sync::oneshot;

/// One message from a device, with the means to acknowledge it.
#[derive(Debug)]
pub struct Delivery {
    /// MQTT topic name.
    pub topic: String,
    /// Payload bytes, as received (not necessarily UTF-8 or JSON).
    pub payload: Bytes,
    /// Completed after the outcome is committed.
    pub ack: Ack,
}

/// Acknowledges a delivery to its source; see the module doc.
#[derive(Debug)]
pub struct Ack(AckKind);

#[derive(Debug)]
enum AckKind {
    /// Nothing to acknowledge (QoS 0, tests).
    Nothing,
    /// A PUBACK to send on the connection the message came on. The channel
    /// belongs to that connection only: once the connection is gone it is
    /// closed and the ack is discarded (the broker redelivers), so it can
    /// never acknowledge another message that reuses the packet id on a
    /// later connection.
    Mqtt {
        /// To the ingest task of that connection, which hands acks to the
        /// MQTT client as it has room (see [`mqtt`]).
        acks: tokio::sync::mpsc::UnboundedSender<mqtt::PendingAck>,
        /// The message's packet id and QoS.
        ack: mqtt::PendingAck,
    },
    /// Someone awaits the commit (the embedded broker's publish hook).
    Waiter(oneshot::Sender<()>),
}

/// The delivery was dropped before its outcome was committed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the message was dropped before its outcome was committed")]
pub struct Dropped;

/// Resolves when the paired [`Ack`] is completed (`Ok`) or dropped (`Err`).
#[derive(Debug)]
pub struct AckWaiter(oneshot::Receiver<()>);

impl Future for AckWaiter {
    type Output = Result<(), Dropped>;
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        Pin::new(&mut self.0)
            .poll(cx)
            .map(|r| r.map_err(|_| Dropped))
    }
}

impl AckWaiter {
    /// The outcome if it is already known, without waiting.
    pub fn try_get(&mut self) -> Option<Result<(), Dropped>> {
        match self.0.try_recv() {
            Ok(()) => Some(Ok(())),
            Err(oneshot::error::TryRecvError::Empty) => None,
            Err(oneshot::error::TryRecvError::Closed) => Some(Err(Dropped)),
        }
    }
}

impl Ack {
    /// An ack with nothing behind it.
    pub fn nothing() -> Ack {
        Ack(AckKind::Nothing)
    }

    /// An ack that has the ingest task behind `acks` send a PUBACK.
    pub(crate) fn mqtt(
        acks: tokio::sync::mpsc::UnboundedSender<mqtt::PendingAck>,
        ack: mqtt::PendingAck,
    ) -> Ack {
        Ack(AckKind::Mqtt { acks, ack })
    }

    /// An ack whose completion someone awaits.
    pub fn waiter() -> (Ack, AckWaiter) {
        let (tx, rx) = oneshot::channel();
        (Ack(AckKind::Waiter(tx)), AckWaiter(rx))
    }

    /// Completes the acknowledgement. Call only after the outcome is
    /// committed. Never blocks.
    pub fn complete(self) {
        match self.0 {
            AckKind::Nothing => {}
            AckKind::Mqtt { acks, ack } => {
                // Fails only if the connection is gone; then the broker
                // redelivers the message on the next one.
                if acks.send(ack).is_err() {
                    tracing::debug!(pkid = ack.pkid, "ack for a closed connection discarded");
                }
            }
            AckKind::Waiter(tx) => {
                let _ = tx.send(());
            }
        }
    }
}

/// Resolves once `flag` is true (or its sender is gone).
pub async fn stopped(flag: &mut tokio::sync::watch::Receiver<bool>) {
    let _ = flag.wait_for(|s| *s).await;
}

/// Exponential backoff with full jitter, for reconnects.
#[derive(Debug, Clone)]
pub struct Backoff {
    /// First delay.
    min: std::time::Duration,
    /// Largest delay.
    max: std::time::Duration,
    /// Next delay before jitter.
    next: std::time::Duration,
}

impl Backoff {
    /// Starts at `min`, doubling up to `max`.
    pub fn new(min: std::time::Duration, max: std::time::Duration) -> Backoff {
        Backoff {
            min,
            max,
            next: min,
        }
    }

    /// The next delay: uniformly random in [next/2, next], then doubles.
    /// Jitter keeps a fleet that lost its broker at once from reconnecting
    /// at once.
    pub fn next_delay(&mut self) -> std::time::Duration {
        let d = self.next;
        self.next = (self.next * 2).min(self.max);
        d / 2 + d.mul_f64(fastrand::f64() / 2.0)
    }

    /// Back to `min` after a successful connection.
    pub fn reset(&mut self) {
        self.next = self.min;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn a_waiter_learns_whether_its_ack_was_completed_or_dropped() {
        let (ack, waiter) = Ack::waiter();
        ack.complete();
        assert_eq!(waiter.await, Ok(()));
        let (ack, waiter) = Ack::waiter();
        drop(ack);
        assert_eq!(waiter.await, Err(Dropped));
    }

    #[test]
    fn backoff_grows_to_its_cap_with_jitter() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(1));
        let first = b.next_delay();
        assert!(first >= Duration::from_millis(50) && first <= Duration::from_millis(100));
        for _ in 0..10 {
            b.next_delay();
        }
        let late = b.next_delay();
        assert!(late >= Duration::from_millis(500) && late <= Duration::from_secs(1));
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(100));
    }
}
