//! clean-temperature: the example edgefn function.
//!
//! Input: a JSON object with a numeric `temp_c`, on a topic whose second
//! level names the device, e.g. `sensors/pi-7/temperature` with
//! `{"temp_c": 21.5, "seq": 12}`.
//!
//! Output: for a plausible reading (-40..=85 °C, the range of common
//! sensors), one record on `telemetry/<device>/temperature`: the input's
//! fields in their order with their values unchanged, plus `device` and, when
//! the function's env has `UNIT=F`, `temp_f` (replacing fields of those names
//! in place): `{"temp_c":21.5,"seq":12,"device":"pi-7"}`.
//!
//! Anything else (not JSON, not an object, no numeric `temp_c`, out of range,
//! no device in the topic) is dropped with a warning in the gateway's log.
//! Dropping is this function's job, not a failure, so the handler returns
//! `Ok` and the gateway acknowledges the message.
//!
//! ## De-duplication
//!
//! With `DEDUP_WINDOW` in the function's env (a duration: `500ms`, `30s`,
//! `2m`, `1h`; unset or `0`: off), a reading whose cleaned record is
//! identical to the last record accepted from the same device, less than
//! `DEDUP_WINDOW` ago, is dropped without a log line. Identical means the
//! same cleaned record, byte for byte: the same fields in the same order
//! with the same values as written (so `21.5` and `21.50` differ, and a
//! reading with a changing `seq` is never a duplicate), after the cleaning
//! above (so a spacing difference or a stale `device` field does not
//! count). A dropped duplicate does not restart the window: an unchanging
//! device still gets one record through per window.
//!
//! The last accepted record of each device and when it was accepted are kept
//! in the function's state, key `last/<device>`, value `<ms since the Unix
//! epoch> <record>`. With `concurrency = 1` (the default) each reading is
//! compared with the one accepted just before it, whether or not that one's
//! outcome is committed yet. With more instances, overlapping invocations
//! read the same last record, so a duplicate can pass, or a reading be
//! dropped as equal to a record another invocation is replacing at that
//! moment. If the state is full (`state_limit`),
//! the reading is emitted, the device's entry is deleted and a warning
//! logged: that device is then not de-duplicated until there is room.
//!
//! A `DEDUP_WINDOW` that is not a duration fails every invocation (and the
//! start of every instance) with a message saying so.

use edgefn_sdk::json::{self, Value};
use edgefn_sdk::{emit, env, now_ms, state, warn, Error, Message, StateError};

edgefn_sdk::handler!(handle, init = init);

/// Readings outside this range (°C) are sensor faults.
const MIN_C: f64 = -40.0;
const MAX_C: f64 = 85.0;

/// Once per instance: a bad `DEDUP_WINDOW` stops the instance from starting,
/// with the same message every invocation would fail with.
fn init() -> Result<(), Error> {
    dedup_window().map(|_| ())
}

fn handle(msg: &Message) -> Result<(), Error> {
    let device = match msg.topic_level(1) {
        Some(device) if !device.is_empty() => device,
        _ => return drop_reading(msg, "the topic has no device level"),
    };

    let mut reading = match json::from_slice(msg.payload()) {
        Ok(Value::Object(fields)) => fields,
        Ok(other) => return drop_reading(msg, &format!("expected a JSON object, got {}", other.type_name())),
        Err(e) => return drop_reading(msg, &format!("not JSON: {}", e)),
    };

    let temp_c = match reading.get("temp_c").and_then(Value::as_f64) {
        Some(t) => t,
        None => return drop_reading(msg, "no numeric temp_c"),
    };
    if !(MIN_C..=MAX_C).contains(&temp_c) {
        return drop_reading(msg, &format!("temp_c {} is outside {}..={} °C", temp_c, MIN_C, MAX_C));
    }

    if env("UNIT").as_deref() == Some("F") {
        reading.insert("temp_f", temp_c * 9.0 / 5.0 + 32.0);
    }
    reading.insert("device", device);
    let record = Value::Object(reading).to_string();

    let window_ms = match dedup_window()? {
        None => {
            emit(&format!("telemetry/{}/temperature", device), record)?;
            return Ok(());
        }
        Some(ms) => ms,
    };
    let now = now_ms();
    let key = format!("last/{}", device);
    match accepted_within(&key, &record, now, window_ms) {
        Ok(true) => {}
        Ok(false) => {
            emit(&format!("telemetry/{}/temperature", device), &record)?;
            remember(&key, &record, now, device);
        }
        Err(e) => {
            // The key is invalid: a device name of more than 1019 bytes.
            warn(&format!("not de-duplicating device {}: {}", device, e));
            emit(&format!("telemetry/{}/temperature", device), &record)?;
        }
    }
    Ok(())
}

/// `DEDUP_WINDOW` in milliseconds, `None` if de-duplication is off.
fn dedup_window() -> Result<Option<u64>, Error> {
    let text = match env("DEDUP_WINDOW") {
        None => return Ok(None),
        Some(text) => text,
    };
    match parse_duration_ms(text.trim()) {
        Some(0) => Ok(None),
        Some(ms) => Ok(Some(ms)),
        None => Err(format!(
            "DEDUP_WINDOW {:?} is not a duration: write a whole number with ms, s, m or h, e.g. 30s (0 turns it off)",
            text
        )
        .into()),
    }
}

/// `500ms`, `30s`, `2m`, `1h` (a whole number and a unit; `0` alone too)
/// in milliseconds; `None` for anything else.
fn parse_duration_ms(text: &str) -> Option<u64> {
    let digits = text.bytes().take_while(u8::is_ascii_digit).count();
    let (number, unit) = text.split_at(digits);
    let n: u64 = number.parse().ok()?;
    let scale = match unit {
        "ms" => 1,
        "s" => 1_000,
        "m" => 60_000,
        "h" => 3_600_000,
        "" if n == 0 => 0,
        _ => return None,
    };
    n.checked_mul(scale)
}

/// Whether `record` is the device's last accepted record, accepted less than
/// `window_ms` before `now` (a last time after `now`, from a clock that was
/// set back, does not count).
fn accepted_within(key: &str, record: &str, now: u64, window_ms: u64) -> Result<bool, StateError> {
    let last = match state::get(key)? {
        Some(last) => last,
        None => return Ok(false),
    };
    let (at, last_record) = match parse_last(&last) {
        Some(parsed) => parsed,
        None => return Ok(false), // unreadable: overwritten below
    };
    Ok(last_record == record.as_bytes() && at <= now && now - at < window_ms)
}

/// Splits a `last/<device>` value, `<ms> <record>`.
fn parse_last(value: &[u8]) -> Option<(u64, &[u8])> {
    let space = value.iter().position(|&b| b == b' ')?;
    let at = std::str::from_utf8(&value[..space]).ok()?.parse().ok()?;
    Some((at, &value[space + 1..]))
}

/// Keeps `record` as the device's last accepted one. If the state is full,
/// the device's entry is deleted instead (an older record must not be
/// compared with the next reading) and a warning logged.
fn remember(key: &str, record: &str, now: u64, device: &str) {
    if let Err(e) = state::set(key, format!("{} {}", now, record)) {
        // The key was valid for `get`, and a delete is never refused for
        // the limit.
        let _ = state::delete(key);
        warn(&format!("not de-duplicating device {}: {}", device, e));
    }
}

/// Logs why a reading is dropped; the invocation still succeeds.
fn drop_reading(msg: &Message, why: &str) -> Result<(), Error> {
    warn(&format!("dropped a reading on {}: {}", msg.topic(), why));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::{handle, init, parse_duration_ms};
    use edgefn_sdk::testing::{self, Captured};
    use edgefn_sdk::Level;

    /// One reading on a fresh thread state (no DEDUP_WINDOW).
    fn run(topic: &str, payload: &str, unit: Option<&str>) -> Captured {
        testing::reset();
        testing::set_env("UNIT", unit);
        let (result, captured) = testing::invoke(handle, topic, payload.as_bytes());
        assert_eq!(result, Ok(()), "the handler never fails");
        captured
    }

    fn emitted(c: &Captured) -> Vec<(&str, &str)> {
        c.emitted.iter().map(|r| (r.topic.as_str(), r.payload_str())).collect()
    }

    fn assert_dropped(topic: &str, payload: &str, why: &str) {
        let c = run(topic, payload, Some("F"));
        assert!(c.emitted.is_empty(), "{} emitted {:?}", payload, c.emitted);
        let warnings = c.logs_at(Level::Warn);
        assert_eq!(warnings.len(), 1, "{:?}", c.logs);
        assert!(warnings[0].contains(why), "{:?} does not say {:?}", warnings[0], why);
        assert!(warnings[0].contains(topic), "{:?}", warnings[0]);
    }

    #[test]
    fn keeps_fields_in_order_and_adds_device() {
        let c = run("sensors/pi-7/temperature", r#"{"seq": 12, "temp_c": 21.50, "note": "ok"}"#, None);
        assert_eq!(
            emitted(&c),
            [("telemetry/pi-7/temperature", r#"{"seq":12,"temp_c":21.50,"note":"ok","device":"pi-7"}"#)]
        );
        assert!(c.logs.is_empty());
    }

    #[test]
    fn adds_fahrenheit_when_unit_is_f() {
        let c = run("sensors/pi-7/temperature", r#"{"temp_c":25}"#, Some("F"));
        assert_eq!(emitted(&c), [("telemetry/pi-7/temperature", r#"{"temp_c":25,"temp_f":77,"device":"pi-7"}"#)]);
        let c = run("sensors/a/temperature", r#"{"temp_c":-40}"#, Some("F"));
        assert_eq!(c.emitted[0].payload_str(), r#"{"temp_c":-40,"temp_f":-40,"device":"a"}"#);
        let c = run("sensors/a/temperature", r#"{"temp_c":20.5}"#, Some("F"));
        let expected = format!(r#"{{"temp_c":20.5,"temp_f":{},"device":"a"}}"#, 20.5f64 * 9.0 / 5.0 + 32.0);
        assert_eq!(c.emitted[0].payload_str(), expected);
        // Any other UNIT leaves Fahrenheit out.
        let c = run("sensors/a/temperature", r#"{"temp_c":25}"#, Some("C"));
        assert_eq!(c.emitted[0].payload_str(), r#"{"temp_c":25,"device":"a"}"#);
    }

    #[test]
    fn replaces_existing_device_and_temp_f_in_place() {
        let c = run("sensors/pi-7/t", r#"{"device":"old","temp_f":0,"temp_c":0,"x":[1,{"y":null}]}"#, Some("F"));
        assert_eq!(c.emitted[0].payload_str(), r#"{"device":"pi-7","temp_f":32,"temp_c":0,"x":[1,{"y":null}]}"#);
    }

    #[test]
    fn range_is_inclusive() {
        for t in ["-40", "85", "-40.0", "84.999", "0"] {
            let c = run("sensors/d/temperature", &format!(r#"{{"temp_c":{}}}"#, t), None);
            assert_eq!(c.emitted.len(), 1, "{}", t);
        }
    }

    #[test]
    fn drops_bad_readings() {
        assert_dropped("sensors/d/temperature", "not json", "not JSON");
        assert_dropped("sensors/d/temperature", "", "not JSON");
        assert_dropped("sensors/d/temperature", "[1,2]", "got array");
        assert_dropped("sensors/d/temperature", "21.5", "got number");
        assert_dropped("sensors/d/temperature", r#"{"temp":21.5}"#, "no numeric temp_c");
        assert_dropped("sensors/d/temperature", r#"{"temp_c":"21.5"}"#, "no numeric temp_c");
        assert_dropped("sensors/d/temperature", r#"{"temp_c":null}"#, "no numeric temp_c");
        assert_dropped("sensors/d/temperature", r#"{"temp_c":85.01}"#, "outside");
        assert_dropped("sensors/d/temperature", r#"{"temp_c":-40.5}"#, "outside");
        assert_dropped("sensors/d/temperature", r#"{"temp_c":1e400}"#, "outside");
        assert_dropped("sensors", r#"{"temp_c":20}"#, "no device level");
        assert_dropped("sensors//temperature", r#"{"temp_c":20}"#, "no device level");
    }

    #[test]
    fn drops_non_utf8_payloads() {
        testing::reset();
        let (result, c) = testing::invoke(handle, "sensors/d/temperature", &[0x7b, 0xff, 0x7d]);
        assert_eq!(result, Ok(()));
        assert!(c.emitted.is_empty());
        assert_eq!(c.logs_at(Level::Warn).len(), 1);
    }

    // De-duplication

    /// Starts a de-duplication test: DEDUP_WINDOW set, the state empty.
    fn dedup(window: &str) {
        testing::reset();
        testing::set_env("DEDUP_WINDOW", Some(window));
    }

    /// One reading at `ms` on the test clock; the payloads emitted.
    fn at(ms: u64, topic: &str, payload: &str) -> Vec<String> {
        testing::set_now_ms(Some(ms));
        let (result, c) = testing::invoke(handle, topic, payload.as_bytes());
        assert_eq!(result, Ok(()), "the handler never fails");
        c.emitted.iter().map(|r| r.payload_str().to_string()).collect()
    }

    const T0: u64 = 1_732_540_800_000;
    const PI7: &str = "sensors/pi-7/temperature";

    #[test]
    fn without_dedup_window_every_reading_goes_through_and_no_state_is_kept() {
        for window in [None, Some("0"), Some("0s")] {
            testing::reset();
            testing::set_env("DEDUP_WINDOW", window);
            assert_eq!(at(T0, PI7, r#"{"temp_c":20}"#).len(), 1);
            assert_eq!(at(T0 + 1, PI7, r#"{"temp_c":20}"#).len(), 1, "{:?}", window);
            assert!(testing::state_entries().is_empty(), "{:?}", window);
        }
    }

    #[test]
    fn a_duplicate_within_the_window_is_dropped() {
        dedup("30s");
        let reading = r#"{"temp_c":21.5}"#;
        assert_eq!(at(T0, PI7, reading), [r#"{"temp_c":21.5,"device":"pi-7"}"#]);
        assert_eq!(
            testing::state_str("last/pi-7").as_deref(),
            Some(format!(r#"{} {{"temp_c":21.5,"device":"pi-7"}}"#, T0).as_str())
        );
        let (_, c) = {
            testing::set_now_ms(Some(T0 + 29_999));
            testing::invoke(handle, PI7, reading.as_bytes())
        };
        assert!(c.emitted.is_empty());
        assert!(c.logs.is_empty(), "a duplicate is dropped silently: {:?}", c.logs);
        // The window counts from the last accepted reading: at 30 s the same
        // reading goes through again and starts a new window.
        assert_eq!(at(T0 + 30_000, PI7, reading).len(), 1);
        assert_eq!(at(T0 + 59_999, PI7, reading).len(), 0);
        assert_eq!(at(T0 + 60_000, PI7, reading).len(), 1);
    }

    #[test]
    fn dropped_duplicates_do_not_extend_the_window() {
        dedup("30s");
        let emitted: Vec<usize> =
            (0..7u64).map(|i| at(T0 + i * 10_000, PI7, r#"{"temp_c":19}"#).len()).collect();
        // Readings every 10 s for a minute: one record per 30 s.
        assert_eq!(emitted, [1, 0, 0, 1, 0, 0, 1]);
    }

    #[test]
    fn only_the_last_accepted_reading_counts() {
        dedup("1m");
        assert_eq!(at(T0, PI7, r#"{"temp_c":20}"#).len(), 1);
        assert_eq!(at(T0 + 1_000, PI7, r#"{"temp_c":20.1}"#).len(), 1, "a new value");
        assert_eq!(at(T0 + 2_000, PI7, r#"{"temp_c":20}"#).len(), 1, "not the last value any more");
        assert_eq!(at(T0 + 3_000, PI7, r#"{"temp_c":20}"#).len(), 0);
    }

    #[test]
    fn devices_are_deduplicated_separately() {
        dedup("30s");
        assert_eq!(at(T0, PI7, r#"{"temp_c":20}"#).len(), 1);
        assert_eq!(at(T0 + 1, "sensors/pi-8/temperature", r#"{"temp_c":20}"#).len(), 1);
        assert_eq!(at(T0 + 2, PI7, r#"{"temp_c":20}"#).len(), 0);
        assert_eq!(at(T0 + 3, "sensors/pi-8/temperature", r#"{"temp_c":20}"#).len(), 0);
        let keys: Vec<Vec<u8>> = testing::state_entries().into_keys().collect();
        assert_eq!(keys, [b"last/pi-7".to_vec(), b"last/pi-8".to_vec()]);
    }

    #[test]
    fn identical_means_the_same_cleaned_record() {
        dedup("30s");
        assert_eq!(at(T0, PI7, r#"{"temp_c":21.5,"seq":1}"#).len(), 1);
        // Another field changed: not a duplicate.
        assert_eq!(at(T0 + 1, PI7, r#"{"temp_c":21.5,"seq":2}"#).len(), 1);
        // The same cleaned record, written differently: spacing, a stale
        // device field (replaced in place by the cleaning).
        assert_eq!(at(T0 + 2, PI7, r#"{ "temp_c": 21.5, "seq": 2 }"#).len(), 0);
        assert_eq!(at(T0 + 3, PI7, r#"{"temp_c":21.5,"seq":2,"device":"old"}"#).len(), 0);
        // The same number written differently is a different record: the
        // function passes values on as written.
        assert_eq!(at(T0 + 4, PI7, r#"{"temp_c":21.50,"seq":2}"#).len(), 1);
        // The same fields in another order too.
        assert_eq!(at(T0 + 5, PI7, r#"{"seq":2,"temp_c":21.50}"#).len(), 1);
    }

    #[test]
    fn dropped_readings_leave_the_state_alone() {
        dedup("30s");
        assert_eq!(at(T0, PI7, r#"{"temp_c":20}"#).len(), 1);
        let before = testing::state_entries();
        assert_eq!(at(T0 + 1, PI7, r#"{"temp_c":99}"#).len(), 0);
        assert_eq!(at(T0 + 2, PI7, "not json").len(), 0);
        assert_eq!(at(T0 + 3, PI7, r#"{"temp_c":20}"#).len(), 0);
        assert_eq!(testing::state_entries(), before);
    }

    #[test]
    fn dedup_works_with_fahrenheit() {
        dedup("500ms");
        testing::set_env("UNIT", Some("F"));
        assert_eq!(at(T0, PI7, r#"{"temp_c":25}"#), [r#"{"temp_c":25,"temp_f":77,"device":"pi-7"}"#]);
        assert_eq!(at(T0 + 499, PI7, r#"{"temp_c":25}"#).len(), 0);
        assert_eq!(at(T0 + 500, PI7, r#"{"temp_c":25}"#).len(), 1);
    }

    #[test]
    fn a_clock_set_back_does_not_drop_readings() {
        dedup("30s");
        assert_eq!(at(T0, PI7, r#"{"temp_c":20}"#).len(), 1);
        assert_eq!(at(T0 - 3_600_000, PI7, r#"{"temp_c":20}"#).len(), 1);
        assert_eq!(at(T0 - 3_600_000 + 1, PI7, r#"{"temp_c":20}"#).len(), 0);
    }

    #[test]
    fn a_full_state_still_emits_and_warns() {
        dedup("30s");
        testing::set_state("last/pi-7", format!(r#"{} {{"temp_c":20,"device":"pi-7"}}"#, T0));
        testing::set_state_limit(60);
        // A longer record no longer fits: emitted, the old entry deleted so
        // it is never compared with a later reading.
        testing::set_now_ms(Some(T0 + 1));
        let (r, c) = testing::invoke(handle, PI7, br#"{"temp_c":20,"note":"a longer record"}"#);
        assert_eq!(r, Ok(()));
        assert_eq!(c.emitted.len(), 1);
        let warnings = c.logs_at(Level::Warn);
        assert_eq!(warnings.len(), 1, "{:?}", c.logs);
        assert!(warnings[0].contains("pi-7") && warnings[0].contains("state_limit"), "{}", warnings[0]);
        assert_eq!(testing::state("last/pi-7"), None);
        assert_eq!(at(T0 + 2, PI7, r#"{"temp_c":20}"#).len(), 1);
    }

    #[test]
    fn an_unreadable_state_entry_is_replaced() {
        dedup("30s");
        testing::set_state("last/pi-7", "garbage");
        assert_eq!(at(T0, PI7, r#"{"temp_c":20}"#).len(), 1);
        assert_eq!(at(T0 + 1, PI7, r#"{"temp_c":20}"#).len(), 0);
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration_ms("500ms"), Some(500));
        assert_eq!(parse_duration_ms("30s"), Some(30_000));
        assert_eq!(parse_duration_ms("2m"), Some(120_000));
        assert_eq!(parse_duration_ms("1h"), Some(3_600_000));
        assert_eq!(parse_duration_ms("0"), Some(0));
        assert_eq!(parse_duration_ms("0ms"), Some(0));
        for bad in ["", "30", "s", "1.5s", "-1s", "30 s", "30sec", "1d", "99999999999999999999s", "18446744073709551615h"] {
            assert_eq!(parse_duration_ms(bad), None, "{:?}", bad);
        }
    }

    #[test]
    fn a_bad_dedup_window_fails_init_and_every_invocation() {
        dedup("soon");
        let e = init().unwrap_err();
        assert!(e.message().contains("DEDUP_WINDOW \"soon\" is not a duration"), "{}", e);
        let (r, c) = testing::invoke(handle, PI7, br#"{"temp_c":20}"#);
        assert_eq!(r, Err(e));
        assert!(c.emitted.is_empty());
        testing::set_env("DEDUP_WINDOW", Some(" 30s "));
        assert_eq!(init(), Ok(()));
    }

    #[test]
    fn each_reading_is_compared_with_the_one_accepted_just_before() {
        dedup("30s");
        let emitted: Vec<usize> = ["20", "21", "20", "20", "21"]
            .iter()
            .enumerate()
            .map(|(i, t)| at(T0 + i as u64, PI7, &format!(r#"{{"temp_c":{}}}"#, t)).len())
            .collect();
        assert_eq!(emitted, [1, 1, 1, 0, 1]);
        assert!(testing::state_str("last/pi-7").unwrap().ends_with(r#"{"temp_c":21,"device":"pi-7"}"#));
        // A new instance reads the same state.
        testing::new_instance();
        assert_eq!(at(T0 + 10, PI7, r#"{"temp_c":21}"#).len(), 0);
    }

    #[test]
    fn a_failed_invocation_leaves_the_last_record_alone() {
        dedup("30s");
        assert_eq!(at(T0, PI7, r#"{"temp_c":20}"#).len(), 1);
        let before = testing::state_entries();
        // An emit refused by the gateway fails the invocation: nothing it
        // wrote is kept, so the retry is not taken for a duplicate.
        testing::set_emit_allow(Some(&[]));
        testing::set_now_ms(Some(T0 + 1));
        let (r, _) = testing::invoke(handle, PI7, br#"{"temp_c":21}"#);
        assert!(r.is_err());
        assert_eq!(testing::state_entries(), before);
        testing::set_emit_allow(None);
        assert_eq!(at(T0 + 2, PI7, r#"{"temp_c":21}"#).len(), 1, "the retry goes through");
    }
}
