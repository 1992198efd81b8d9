//! Throttles for log lines that a peer can cause at will (a refused bundle,
//! a refused connection, a refused record): at most a few lines per period
//! get through, the rest are only counted, and the next line that gets
//! through says how many were held back. What happened is always counted
//! in the metrics model besides; the throttle only keeps the journal
//! readable and small under a flood.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// At most `burst` events per `period` pass (see the module doc).
#[derive(Debug)]
pub struct Throttle {
    /// Events that pass per period.
    burst: u32,
    /// The period.
    period: Duration,
    /// The current period.
    state: Mutex<Window>,
}

#[derive(Debug, Default)]
struct Window {
    /// When the current period began; none before the first event.
    start: Option<Instant>,
    /// Events passed in it.
    passed: u32,
    /// Events held back since the last one passed.
    held: u64,
}

impl Throttle {
    /// Lets `burst` events (at least one) through per `period`.
    pub const fn new(burst: u32, period: Duration) -> Throttle {
        Throttle {
            burst: if burst == 0 { 1 } else { burst },
            period,
            state: Mutex::new(Window {
                start: None,
                passed: 0,
                held: 0,
            }),
        }
    }

    /// One line a minute.
    pub const fn per_minute(burst: u32) -> Throttle {
        Throttle::new(burst, Duration::from_secs(60))
    }

    /// Whether an event now may be logged: `Some(n)` with the number held
    /// back since the last one that passed, or `None` (held back).
    pub fn admit(&self) -> Option<u64> {
        self.admit_at(Instant::now())
    }

    fn admit_at(&self, now: Instant) -> Option<u64> {
        let mut w = self.state.lock().expect("throttle lock");
        if w.start.is_none_or(|s| now.duration_since(s) >= self.period) {
            w.start = Some(now);
            w.passed = 0;
        }
        if w.passed >= self.burst {
            w.held += 1;
            return None;
        }
        w.passed += 1;
        Some(std::mem::take(&mut w.held))
    }
}

/// One event per key (a client's address, say) per period, for at most
/// `keys` keys at once; events of further keys share one [`Throttle`] of a
/// line per period. A peer that changes its key at will (a new client id per
/// attempt) gets no more lines than the key table holds.
#[derive(Debug)]
pub struct PerKey {
    /// The period.
    period: Duration,
    /// Most keys remembered.
    keys: usize,
    /// When each key last passed.
    last: Mutex<std::collections::HashMap<String, Instant>>,
    /// For keys beyond `keys`.
    overflow: Throttle,
}

impl PerKey {
    /// One event per key per minute, for up to `keys` keys.
    pub fn per_minute(keys: usize) -> PerKey {
        let period = Duration::from_secs(60);
        PerKey {
            period,
            keys,
            last: Mutex::default(),
            overflow: Throttle::new(1, period),
        }
    }

    /// Whether an event of `key` now may be logged.
    pub fn admit(&self, key: &str) -> bool {
        self.admit_at(key, Instant::now())
    }

    fn admit_at(&self, key: &str, now: Instant) -> bool {
        let mut last = self.last.lock().expect("throttle lock");
        if let Some(at) = last.get_mut(key) {
            if now.duration_since(*at) < self.period {
                return false;
            }
            *at = now;
            return true;
        }
        if last.len() >= self.keys {
            last.retain(|_, at| now.duration_since(*at) < self.period);
        }
        if last.len() >= self.keys {
            return self.overflow.admit_at(now).is_some();
        }
        last.insert(key.to_owned(), now);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_key_passes_once_a_period_and_a_flood_of_keys_once_in_all() {
        let t = PerKey::per_minute(2);
        let t0 = Instant::now();
        assert!(t.admit_at("a", t0));
        assert!(!t.admit_at("a", t0 + Duration::from_secs(59)));
        assert!(t.admit_at("b", t0));
        assert!(
            t.admit_at("c", t0),
            "the first key beyond the table passes the overflow"
        );
        for key in ["d", "e", "f"] {
            assert!(!t.admit_at(key, t0), "{key}");
        }
        assert!(t.admit_at("a", t0 + Duration::from_secs(60)));
        assert!(
            t.admit_at("g", t0 + Duration::from_secs(61)),
            "b's entry expired"
        );
    }

    #[test]
    fn a_burst_passes_per_period_and_the_next_says_what_was_held_back() {
        let t = Throttle::new(2, Duration::from_secs(60));
        let t0 = Instant::now();
        assert_eq!(t.admit_at(t0), Some(0));
        assert_eq!(t.admit_at(t0), Some(0));
        for _ in 0..1000 {
            assert_eq!(t.admit_at(t0 + Duration::from_secs(59)), None);
        }
        assert_eq!(t.admit_at(t0 + Duration::from_secs(60)), Some(1000));
        assert_eq!(t.admit_at(t0 + Duration::from_secs(61)), Some(0));
        assert_eq!(t.admit_at(t0 + Duration::from_secs(62)), None);
        assert_eq!(
            Throttle::new(0, Duration::from_secs(1)).admit_at(t0),
            Some(0)
        );
    }
}
