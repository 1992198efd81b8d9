//! The shutdown signal every long-running task watches, and the backoff
//! its reconnect loops wait with.

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
