//! Ingest: device messages in, one [`Delivery`] type out.
//!
//! Two sources produce deliveries: [`mqtt`] (an existing broker such as
//! Mosquitto, as an MQTT 5 client with manual acknowledgements) and
//! `embedded` (the in-process rmqtt broker, through its publish hook).
//! Each delivery carries an [`Ack`]; the pipeline completes it only after
//! the message's outcome is committed to SQLite. An ack that is dropped
//! instead is never sent: the broker redelivers (external) or the device is
//! not acknowledged (embedded).
//!
//! A waiting source (the embedded broker) may also *abandon* a delivery it
//! no longer wants acknowledged, because the device gave up on it (its
//! connection is gone or replaced) and will send it again:
//! [`AckWaiter::abandon`]. The commit stage *claims* each delivery just
//! before the transaction that would commit it ([`Ack::claim`]) and leaves
//! out those already abandoned, so an abandoned message is never committed
//! and its resend is the only copy; one claimed first is committed and
//! acknowledged as usual.

#[cfg(feature = "embedded-broker")]
pub mod embedded;
pub mod mqtt;
pub mod replay;
pub mod schedule;

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};

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
    /// Set when this is a dead letter replayed (`edgefn dead-letters
    /// replay`): it goes to that function only.
    pub replay: Option<Replay>,
}

/// A dead letter to run again.
#[derive(Debug, Clone)]
pub struct Replay {
    /// Its id in the dead letters.
    pub id: i64,
    /// The function that failed on it (`upstream` for a record the
    /// upstream refused: sent again).
    pub function: String,
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
    Waiter {
        /// Completed after the commit.
        tx: oneshot::Sender<()>,
        /// Shared with the [`AckWaiter`]: see [`Claim`].
        claim: Arc<AtomicU8>,
        /// Held while the delivery is in the pipeline (the source's bound
        /// on what one client has there), released when the ack goes.
        _hold: Option<Hold>,
    },
}

/// Something a source keeps alive while its delivery is in the pipeline.
pub struct Hold(
    /// Dropped when the [`Ack`] is completed or dropped.
    #[allow(dead_code)]
    Box<dyn Send + Sync>,
);

impl Hold {
    /// Holds `value` until the ack is gone.
    pub fn new(value: impl Send + Sync + 'static) -> Hold {
        Hold(Box::new(value))
    }
}

impl std::fmt::Debug for Hold {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Hold")
    }
}

/// States of a waiting delivery's claim.
struct Claim;

impl Claim {
    /// Neither claimed nor abandoned.
    const OPEN: u8 = 0;
    /// The commit stage is committing it: it will be acknowledged.
    const CLAIMED: u8 = 1;
    /// Its source gave it up: it must not be committed.
    const ABANDONED: u8 = 2;
}

/// The delivery was dropped before its outcome was committed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the message was dropped before its outcome was committed")]
pub struct Dropped;

/// Resolves when the paired [`Ack`] is completed (`Ok`) or dropped (`Err`).
#[derive(Debug)]
pub struct AckWaiter {
    /// Completed or dropped with the [`Ack`].
    rx: oneshot::Receiver<()>,
    /// Shared with the [`Ack`].
    claim: Arc<AtomicU8>,
}

impl Future for AckWaiter {
    type Output = Result<(), Dropped>;
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        Pin::new(&mut self.rx)
            .poll(cx)
            .map(|r| r.map_err(|_| Dropped))
    }
}

impl AckWaiter {
    /// The outcome if it is already known, without waiting.
    pub fn try_get(&mut self) -> Option<Result<(), Dropped>> {
        match self.rx.try_recv() {
            Ok(()) => Some(Ok(())),
            Err(oneshot::error::TryRecvError::Empty) => None,
            Err(oneshot::error::TryRecvError::Closed) => Some(Err(Dropped)),
        }
    }

    /// Gives the delivery up so it is never committed. True if it was not
    /// claimed for a commit yet; false if a commit has it (it will then be
    /// completed or dropped soon: keep waiting).
    pub fn abandon(&self) -> bool {
        self.claim
            .compare_exchange(
                Claim::OPEN,
                Claim::ABANDONED,
                Ordering::AcqRel,
                Ordering::Acquire,
            )
            .is_ok()
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
        Self::waiter_holding(None)
    }

    /// [`Ack::waiter`] that keeps `hold` until the ack is completed or
    /// dropped.
    pub fn waiter_holding(hold: Option<Hold>) -> (Ack, AckWaiter) {
        let (tx, rx) = oneshot::channel();
        let claim = Arc::new(AtomicU8::new(Claim::OPEN));
        let ack = Ack(AckKind::Waiter {
            tx,
            claim: claim.clone(),
            _hold: hold,
        });
        (ack, AckWaiter { rx, claim })
    }

    /// Claims the delivery for the commit about to be made: false if its
    /// source abandoned it (leave it out; drop the ack). Always true for
    /// sources that cannot abandon.
    pub fn claim(&self) -> bool {
        match &self.0 {
            AckKind::Waiter { claim, .. } => claim
                .compare_exchange(
                    Claim::OPEN,
                    Claim::CLAIMED,
                    Ordering::AcqRel,
                    Ordering::Acquire,
                )
                .map_or_else(|now| now == Claim::CLAIMED, |_| true),
            _ => true,
        }
    }

    /// Undoes [`Ack::claim`] after a commit that failed: until the retry
    /// claims it again, its source may abandon it.
    pub fn unclaim(&self) {
        if let AckKind::Waiter { claim, .. } = &self.0 {
            let _ = claim.compare_exchange(
                Claim::CLAIMED,
                Claim::OPEN,
                Ordering::AcqRel,
                Ordering::Acquire,
            );
        }
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
            AckKind::Waiter { tx, .. } => {
                let _ = tx.send(());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_abandoned_delivery_cannot_be_claimed_and_a_claimed_one_cannot_be_abandoned() {
        let (ack, waiter) = Ack::waiter();
        assert!(waiter.abandon());
        assert!(!ack.claim());
        let (ack, waiter) = Ack::waiter();
        assert!(ack.claim());
        assert!(!waiter.abandon());
        // A failed commit hands it back; then it can be abandoned.
        ack.unclaim();
        assert!(waiter.abandon());
        assert!(!ack.claim());
        // Acks of sources that wait for nobody are always claimed.
        assert!(Ack::nothing().claim());
    }

    #[test]
    fn what_an_ack_holds_is_released_with_it() {
        let held = Arc::new(());
        let (ack, _waiter) = Ack::waiter_holding(Some(Hold::new(held.clone())));
        assert_eq!(Arc::strong_count(&held), 2);
        ack.complete();
        assert_eq!(Arc::strong_count(&held), 1);
    }

    #[tokio::test]
    async fn a_waiter_learns_whether_its_ack_was_completed_or_dropped() {
        let (ack, waiter) = Ack::waiter();
        ack.complete();
        assert_eq!(waiter.await, Ok(()));
        let (ack, waiter) = Ack::waiter();
        drop(ack);
        assert_eq!(waiter.await, Err(Dropped));
    }
}
