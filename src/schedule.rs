//! Schedule triggers, the value: a function with `schedule = "every 30s"`
//! or `schedule = "cron: 0 */5 * * * *"` is invoked on those times; the
//! task that fires them is [`crate::ingest::schedule`].
//!
//! A scheduled run is a delivery like a device's: topic
//! `$edgefn/schedule/<function>`, payload [`Run`] as JSON
//! (`{"scheduled_ms":…,"now_ms":…}`), routed to that function only.
//!
//! - `every D` fires on the multiples of `D` since the Unix epoch, so
//!   `every 1h` fires on the hour (UTC) and two gateways fire together.
//! - `cron: S M H DoM Mon DoW` (seconds first) fires in the gateway's local
//!   time zone (`/etc/localtime`, or `TZ`).

use std::time::Duration;

/// Topics of scheduled runs start with this, then the function's name.
pub const TOPIC_PREFIX: &str = "$edgefn/schedule/";

/// The shortest `every` interval.
pub const MIN_INTERVAL: Duration = Duration::from_secs(1);

/// When a function runs.
#[derive(Debug, Clone)]
pub enum Schedule {
    /// On every multiple of this since the epoch.
    Every(Duration),
    /// On the times a cron expression (with seconds) names, local time.
    Cron(Box<croner::Cron>),
}

impl PartialEq for Schedule {
    fn eq(&self, other: &Schedule) -> bool {
        match (self, other) {
            (Schedule::Every(a), Schedule::Every(b)) => a == b,
            (Schedule::Cron(a), Schedule::Cron(b)) => {
                a.pattern.to_string() == b.pattern.to_string()
            }
            _ => false,
        }
    }
}

impl Schedule {
    /// Parses `every <duration>` or `cron: <six fields>`.
    pub fn parse(text: &str) -> Result<Schedule, String> {
        let text = text.trim();
        if let Some(d) = text.strip_prefix("every ") {
            let d = humantime::parse_duration(d.trim()).map_err(|_| {
                format!("{text:?}: {d:?} is not a duration; expected e.g. \"every 30s\"")
            })?;
            if d < MIN_INTERVAL {
                return Err(format!("{text:?}: the shortest interval is 1s"));
            }
            return Ok(Schedule::Every(d));
        }
        if let Some(expr) = text.strip_prefix("cron:") {
            let expr = expr.trim();
            if expr.split_whitespace().count() != 6 {
                return Err(format!(
                    "{text:?}: a cron expression here has six fields, seconds first, \
                     e.g. \"cron: 0 */5 * * * *\""
                ));
            }
            let cron = croner::parser::CronParser::builder()
                .seconds(croner::parser::Seconds::Required)
                .build()
                .parse(expr)
                .map_err(|e| format!("{text:?}: {e}"))?;
            return Ok(Schedule::Cron(Box::new(cron)));
        }
        Err(format!(
            "{text:?}: expected \"every <duration>\" (e.g. \"every 30s\") or \
             \"cron: <sec> <min> <hour> <day> <month> <weekday>\" (e.g. \"cron: 0 */5 * * * *\")"
        ))
    }

    /// The latest due time at or before `now_ms`, if any.
    pub fn latest_at(&self, now_ms: u64) -> Option<u64> {
        match self {
            Schedule::Every(d) => {
                let period = d.as_millis() as u64;
                Some(now_ms / period * period)
            }
            Schedule::Cron(c) => {
                let now = chrono::DateTime::from_timestamp_millis(now_ms as i64)?
                    .with_timezone(&chrono::Local);
                let at = c.find_previous_occurrence(&now, true).ok()?;
                // Cron times are whole seconds.
                u64::try_from(at.timestamp()).ok().map(|s| s * 1000)
            }
        }
    }

    /// The first due time after `after_ms` (ms since the epoch), if any.
    pub fn next_after(&self, after_ms: u64) -> Option<u64> {
        match self {
            Schedule::Every(d) => {
                let period = d.as_millis() as u64;
                Some((after_ms / period + 1) * period)
            }
            Schedule::Cron(c) => {
                let after = chrono::DateTime::from_timestamp_millis(after_ms as i64)?
                    .with_timezone(&chrono::Local);
                let next = c.find_next_occurrence(&after, false).ok()?;
                u64::try_from(next.timestamp()).ok().map(|s| s * 1000)
            }
        }
    }
}

impl std::fmt::Display for Schedule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Schedule::Every(d) => write!(f, "every {}", humantime::format_duration(*d)),
            Schedule::Cron(c) => write!(f, "cron: {} (local time)", c.pattern),
        }
    }
}

/// The payload of a scheduled run.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub struct Run {
    /// When it was due.
    pub scheduled_ms: u64,
    /// When it was handed to the function's pool.
    pub now_ms: u64,
}

/// The topic of `function`'s scheduled runs.
pub fn topic(function: &str) -> String {
    format!("{TOPIC_PREFIX}{function}")
}

/// The function a scheduled run's topic is for.
pub fn function_of(topic: &str) -> Option<&str> {
    topic.strip_prefix(TOPIC_PREFIX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_fires_on_multiples_of_the_interval() {
        let s = Schedule::parse("every 30s").unwrap();
        assert_eq!(s.next_after(0), Some(30_000));
        assert_eq!(s.next_after(29_999), Some(30_000));
        assert_eq!(s.next_after(30_000), Some(60_000));
    }

    #[test]
    fn the_latest_due_time_is_at_or_before_now() {
        let s = Schedule::parse("every 1h").unwrap();
        assert_eq!(s.latest_at(3_600_000 * 5 + 17), Some(3_600_000 * 5));
        assert_eq!(s.latest_at(3_600_000 * 5), Some(3_600_000 * 5));
        let c = Schedule::parse("cron: */10 * * * * *").unwrap();
        assert_eq!(c.latest_at(1_234_567), Some(1_230_000));
    }

    #[test]
    fn cron_takes_six_fields_seconds_first() {
        let s = Schedule::parse("cron: */10 * * * * *").unwrap();
        let next = s.next_after(1_000).unwrap();
        assert_eq!(next % 10_000, 0, "{next}");
        assert!(next > 1_000 && next <= 10_000, "{next}");
    }

    #[test]
    fn malformed_schedules_say_what_is_expected() {
        for (text, says) in [
            ("every", "expected \"every <duration>\""),
            ("every soon", "is not a duration"),
            ("every 10ms", "shortest interval is 1s"),
            ("cron: 0 */5 * * *", "six fields, seconds first"),
            ("cron: 99 * * * * *", "cron:"),
            ("hourly", "expected \"every <duration>\""),
        ] {
            let e = Schedule::parse(text).unwrap_err();
            assert!(e.contains(says), "{text}: {e}");
        }
    }

    #[test]
    fn a_run_topic_names_its_function() {
        assert_eq!(function_of(&topic("agg")), Some("agg"));
        assert_eq!(function_of("sensors/x"), None);
    }
}
