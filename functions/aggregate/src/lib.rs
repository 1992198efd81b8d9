//! aggregate: per-device temperature summaries on a schedule, kept in the
//! function's durable state.
//!
//! Configure it with the same triggers as clean-temperature and a
//! `schedule`:
//!
//! ```toml
//! [[functions]]
//! name = "aggregate"
//! module = "functions/aggregate.wasm"
//! triggers = ["sensors/+/temperature"]
//! schedule = "every 5m"
//! ```
//!
//! **A reading** is what clean-temperature takes: a JSON object with a
//! numeric `temp_c`, on a topic whose second level names the device
//! (`sensors/pi-7/temperature` with `{"temp_c": 21.5}`). A plausible one
//! (-40..=85 °C) is added to the device's current window: its count, min,
//! max and sum. Anything else is dropped with a warning, as clean-temperature
//! drops it; a topic under `$edgefn/` that is not a scheduled run too.
//!
//! **A scheduled run** (topic `$edgefn/schedule/<name>`) emits one record per
//! device that had readings since the last run, on
//! `summary/<device>/temperature`, and starts that device's next window:
//!
//! ```json
//! {"device":"pi-7","count":3,"min":20.5,"max":22,"mean":21.25,"from_ms":1732540500000,"to_ms":1732540800000}
//! ```
//!
//! `min`, `max` and `mean` are °C; `from_ms` .. `to_ms` (milliseconds since
//! the Unix epoch) is the window: from the previous run's due time (or,
//! before the first run, the device's first reading) to this run's due time
//! (`scheduled_ms`). Readings handled between a run's due time and its start
//! (normally milliseconds) count in the window that run closes. A device
//! without readings in a window gets no record.
//!
//! An invocation's state writes are committed with its records, so a
//! summary and the reset of its window happen together or not at all. When
//! a run cannot emit every summary because the gateway's bounds on one
//! invocation are reached (1000 records, `max_emit_bytes`), the devices left
//! over keep their windows, which the next run closes (a longer window);
//! a warning says how many. Any other refusal (e.g. `emit_allow` not
//! covering `summary/#`) fails the run, which leaves the state as it was.
//!
//! Every reading and run reads a window, updates it and writes it back.
//! That needs `concurrency = 1` (the default), with which each invocation
//! reads the state the one before it left, committed or not yet: every
//! reading is counted once, in the window open when it was handled. With
//! more instances, two overlapping invocations can update the same window
//! as it was before either, and one's update replaces the other's (a
//! reading lost, or one counted after the run that reset its window).
//!
//! State (there is no way to list keys, so one key lists the devices):
//!
//! | key | value |
//! | --- | --- |
//! | `devices` | JSON array of the devices with an open window, in the order first seen |
//! | `window/<device>` | JSON `{"count":N,"min":…,"max":…,"sum":…,"from_ms":…}` |
//! | `last_run_ms` | the due time of the last scheduled run, decimal |
//!
//! A reading of a new device that would take the state past `state_limit`
//! (about 100 bytes per device) fails, so it is retried or dead-lettered
//! rather than silently left out.

use edgefn_sdk::json::{self, Object, Value};
use edgefn_sdk::{emit, now_ms, state, warn, EmitError, Error, Message, ScheduledRun, SCHEDULE_TOPIC_PREFIX};

edgefn_sdk::handler!(handle);

/// Readings outside this range (°C) are sensor faults (as in
/// clean-temperature).
const MIN_C: f64 = -40.0;
const MAX_C: f64 = 85.0;

/// The state key listing the devices with an open window.
const DEVICES_KEY: &str = "devices";

/// The state key of the last scheduled run's due time.
const LAST_RUN_KEY: &str = "last_run_ms";

fn handle(msg: &Message) -> Result<(), Error> {
    if let Some(run) = msg.schedule() {
        return summarise(&run);
    }
    if msg.topic().starts_with(SCHEDULE_TOPIC_PREFIX) {
        return drop_reading(msg, "a scheduled run without scheduled_ms and now_ms");
    }
    if msg.topic().starts_with("$edgefn/") {
        return drop_reading(msg, "a topic of the gateway's that is not a scheduled run");
    }
    let device = match msg.topic_level(1) {
        Some(device) if !device.is_empty() => device,
        _ => return drop_reading(msg, "the topic has no device level"),
    };
    let temp_c = match json::from_slice(msg.payload()) {
        Ok(reading) => match reading.get("temp_c").and_then(Value::as_f64) {
            Some(t) => t,
            None if reading.as_object().is_some() => return drop_reading(msg, "no numeric temp_c"),
            None => return drop_reading(msg, &format!("expected a JSON object, got {}", reading.type_name())),
        },
        Err(e) => return drop_reading(msg, &format!("not JSON: {}", e)),
    };
    if !(MIN_C..=MAX_C).contains(&temp_c) {
        return drop_reading(msg, &format!("temp_c {} is outside {}..={} °C", temp_c, MIN_C, MAX_C));
    }
    add_reading(device, temp_c)
        .map_err(|e| Error::new(format!("cannot keep the window of device {}: {}", device, e.message())))
}

/// Logs why a message is dropped; the invocation still succeeds.
fn drop_reading(msg: &Message, why: &str) -> Result<(), Error> {
    warn(&format!("dropped a reading on {}: {}", msg.topic(), why));
    Ok(())
}

// ---------------------------------------------------------------------------
// Windows

/// One device's readings since its window opened.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Window {
    count: u64,
    min: f64,
    max: f64,
    sum: f64,
    /// When the window opened, ms since the Unix epoch.
    from_ms: u64,
}

impl Window {
    fn key(device: &str) -> String {
        format!("window/{}", device)
    }

    fn to_json(self) -> String {
        let mut o = Object::new();
        o.insert("count", self.count);
        o.insert("min", self.min);
        o.insert("max", self.max);
        o.insert("sum", self.sum);
        o.insert("from_ms", self.from_ms);
        Value::Object(o).to_string()
    }

    fn from_json(bytes: &[u8]) -> Option<Window> {
        let v = json::from_slice(bytes).ok()?;
        let f = |name: &str| v.get(name).and_then(Value::as_f64);
        let u = |name: &str| v.get(name).and_then(Value::as_u64);
        Some(Window { count: u("count")?, min: f("min")?, max: f("max")?, sum: f("sum")?, from_ms: u("from_ms")? })
    }

    /// The window of `device`, if it has one.
    fn load(device: &str) -> Result<Option<Window>, Error> {
        match state::get(Window::key(device))? {
            None => Ok(None),
            Some(bytes) => match Window::from_json(&bytes) {
                Some(w) => Ok(Some(w)),
                None => {
                    warn(&format!("the window of device {} is unreadable; starting a new one", device));
                    Ok(None)
                }
            },
        }
    }
}

/// Adds a reading to the device's window, opening one (and listing the
/// device) if it has none.
fn add_reading(device: &str, temp_c: f64) -> Result<(), Error> {
    let window = match Window::load(device)? {
        Some(mut w) => {
            w.count += 1;
            w.min = w.min.min(temp_c);
            w.max = w.max.max(temp_c);
            w.sum += temp_c;
            w
        }
        None => {
            let from_ms = match last_run_ms()? {
                Some(ms) => ms,
                None => now_ms(),
            };
            let mut devices = load_devices()?;
            if !devices.iter().any(|d| d == device) {
                devices.push(device.to_string());
                save_devices(&devices)?;
            }
            Window { count: 1, min: temp_c, max: temp_c, sum: temp_c, from_ms }
        }
    };
    state::set(Window::key(device), window.to_json())?;
    Ok(())
}

/// The devices with an open window.
fn load_devices() -> Result<Vec<String>, Error> {
    let bytes = match state::get(DEVICES_KEY)? {
        Some(bytes) => bytes,
        None => return Ok(Vec::new()),
    };
    match json::from_slice(&bytes) {
        Ok(Value::Array(items)) => Ok(items.iter().filter_map(Value::as_str).map(str::to_string).collect()),
        _ => Err(Error::new(format!("the state key {} is not a JSON array of device names", DEVICES_KEY))),
    }
}

fn save_devices(devices: &[String]) -> Result<(), Error> {
    if devices.is_empty() {
        state::delete(DEVICES_KEY)?;
    } else {
        let list: Vec<Value> = devices.iter().map(|d| Value::from(d.as_str())).collect();
        state::set(DEVICES_KEY, Value::Array(list).to_string())?;
    }
    Ok(())
}

fn last_run_ms() -> Result<Option<u64>, Error> {
    Ok(state::get_str(LAST_RUN_KEY)?.and_then(|v| v.parse().ok()))
}

// ---------------------------------------------------------------------------
// Scheduled runs

/// The summary record of a device's window closed at `to_ms`.
fn summary(device: &str, w: &Window, to_ms: u64) -> String {
    let mut o = Object::new();
    o.insert("device", device);
    o.insert("count", w.count);
    o.insert("min", w.min);
    o.insert("max", w.max);
    o.insert("mean", w.sum / w.count as f64);
    o.insert("from_ms", w.from_ms);
    o.insert("to_ms", to_ms);
    Value::Object(o).to_string()
}

/// Emits every open window's summary and closes those windows.
fn summarise(run: &ScheduledRun) -> Result<(), Error> {
    let devices = load_devices()?;
    let mut left_over = Vec::new();
    let mut refused = None;
    for device in devices {
        if refused.is_some() {
            left_over.push(device);
            continue;
        }
        let window = match Window::load(&device)? {
            Some(w) if w.count > 0 => w,
            _ => continue, // listed without a window: nothing to report
        };
        let topic = format!("summary/{}/temperature", device);
        match emit(&topic, summary(&device, &window, run.scheduled_ms)) {
            Ok(()) => state::delete(Window::key(&device))?,
            Err(e @ EmitError::TooManyRecords) | Err(e @ EmitError::TooManyBytes) => {
                refused = Some(e);
                left_over.push(device);
            }
            Err(e) => return Err(format!("the summary of device {} on {} was refused: {}", device, topic, e).into()),
        }
    }
    if let Some(e) = refused {
        warn(&format!("{} devices' windows stay open until the next run: {}", left_over.len(), e));
    }
    save_devices(&left_over)?;
    state::set(LAST_RUN_KEY, run.scheduled_ms.to_string())?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::handle;
    use edgefn_sdk::json::{self, Value};
    use edgefn_sdk::testing::{self, Captured};
    use edgefn_sdk::Level;

    const T0: u64 = 1_732_540_500_000;
    const RUN1: u64 = 1_732_540_800_000;
    const RUN2: u64 = 1_732_541_100_000;

    /// A reading at `ms` on the test clock; must succeed and emit nothing.
    fn reading(ms: u64, device: &str, temp_c: &str) {
        testing::set_now_ms(Some(ms));
        let topic = format!("sensors/{}/temperature", device);
        let payload = format!(r#"{{"temp_c":{}}}"#, temp_c);
        let (result, c) = testing::invoke(handle, &topic, payload.as_bytes());
        assert_eq!(result, Ok(()));
        assert!(c.emitted.is_empty(), "a reading emits nothing: {:?}", c.emitted);
        assert!(c.logs.is_empty(), "{:?}", c.logs);
    }

    /// A scheduled run due at `ms`, started 5 ms later; must succeed.
    fn run(ms: u64) -> Captured {
        testing::set_now_ms(Some(ms + 5));
        let (result, c) = testing::invoke_scheduled(handle, "aggregate", ms, ms + 5);
        assert_eq!(result, Ok(()), "{:?}", c.logs);
        c
    }

    fn summaries(c: &Captured) -> Vec<(&str, &str)> {
        c.emitted.iter().map(|r| (r.topic.as_str(), r.payload_str())).collect()
    }

    fn state_keys() -> Vec<String> {
        testing::state_entries().into_keys().map(|k| String::from_utf8(k).unwrap()).collect()
    }

    #[test]
    fn summarises_each_device_on_a_scheduled_run() {
        testing::reset();
        reading(T0 + 1_000, "pi-7", "20.5");
        reading(T0 + 2_000, "pi-8", "-3");
        reading(T0 + 3_000, "pi-7", "22");
        reading(T0 + 4_000, "pi-7", "21.25");
        assert_eq!(
            testing::state_str("window/pi-7").as_deref(),
            Some(r#"{"count":3,"min":20.5,"max":22,"sum":63.75,"from_ms":1732540501000}"#)
        );
        assert_eq!(testing::state_str("devices").as_deref(), Some(r#"["pi-7","pi-8"]"#));

        let c = run(RUN1);
        assert_eq!(
            summaries(&c),
            [
                (
                    "summary/pi-7/temperature",
                    r#"{"device":"pi-7","count":3,"min":20.5,"max":22,"mean":21.25,"from_ms":1732540501000,"to_ms":1732540800000}"#
                ),
                (
                    "summary/pi-8/temperature",
                    r#"{"device":"pi-8","count":1,"min":-3,"max":-3,"mean":-3,"from_ms":1732540502000,"to_ms":1732540800000}"#
                ),
            ]
        );
        assert!(c.logs.is_empty(), "{:?}", c.logs);
        // The windows are reset; only the run's time is left.
        assert_eq!(state_keys(), ["last_run_ms"]);
        assert_eq!(testing::state_str("last_run_ms"), Some(RUN1.to_string()));
    }

    #[test]
    fn windows_follow_each_other() {
        testing::reset();
        reading(T0, "pi-7", "20");
        run(RUN1);
        // The next window opens at the previous run's due time, whenever
        // its first reading comes.
        reading(RUN1 + 60_000, "pi-7", "24");
        reading(RUN1 + 120_000, "pi-7", "26");
        let c = run(RUN2);
        assert_eq!(
            summaries(&c),
            [(
                "summary/pi-7/temperature",
                r#"{"device":"pi-7","count":2,"min":24,"max":26,"mean":25,"from_ms":1732540800000,"to_ms":1732541100000}"#
            )]
        );
    }

    #[test]
    fn a_device_without_readings_gets_no_summary() {
        testing::reset();
        let c = run(RUN1);
        assert!(c.emitted.is_empty());
        reading(RUN1 + 1, "pi-7", "20");
        run(RUN2);
        let c = run(RUN2 + 300_000);
        assert!(c.emitted.is_empty(), "pi-7 had no reading in the last window");
        assert_eq!(state_keys(), ["last_run_ms"]);
    }

    #[test]
    fn bad_readings_are_dropped_and_leave_the_state_alone() {
        testing::reset();
        reading(T0, "pi-7", "20");
        let before = testing::state_entries();
        for (topic, payload, why) in [
            ("sensors/pi-7/temperature", "not json", "not JSON"),
            ("sensors/pi-7/temperature", "[20]", "got array"),
            ("sensors/pi-7/temperature", r#"{"temp":20}"#, "no numeric temp_c"),
            ("sensors/pi-7/temperature", r#"{"temp_c":"20"}"#, "no numeric temp_c"),
            ("sensors/pi-7/temperature", r#"{"temp_c":85.5}"#, "outside"),
            ("sensors/pi-7/temperature", r#"{"temp_c":-41}"#, "outside"),
            ("sensors//temperature", r#"{"temp_c":20}"#, "no device level"),
            ("sensors", r#"{"temp_c":20}"#, "no device level"),
            ("$edgefn/other/x", r#"{"temp_c":20}"#, "not a scheduled run"),
            ("$edgefn/schedule/aggregate", "{}", "without scheduled_ms"),
        ] {
            let (r, c) = testing::invoke(handle, topic, payload.as_bytes());
            assert_eq!(r, Ok(()));
            assert!(c.emitted.is_empty());
            let warnings = c.logs_at(Level::Warn);
            assert_eq!(warnings.len(), 1, "{:?}", c.logs);
            assert!(warnings[0].contains(why) && warnings[0].contains(topic), "{:?}: {}", payload, warnings[0]);
        }
        assert_eq!(testing::state_entries(), before);
    }

    #[test]
    fn state_survives_from_before_and_is_read_back_exactly() {
        // As after a restart or an upgrade: the state committed earlier.
        testing::reset();
        testing::set_state("devices", r#"["pi-7"]"#);
        testing::set_state("window/pi-7", r#"{"count":2,"min":0.1,"max":0.2,"sum":0.30000000000000004,"from_ms":5}"#);
        testing::set_state("last_run_ms", "5");
        reading(T0, "pi-7", "0.3");
        let c = run(RUN1);
        let v = json::from_slice(&c.emitted[0].payload).unwrap();
        assert_eq!(v.get("count").and_then(Value::as_u64), Some(3));
        assert_eq!(v.get("min").and_then(Value::as_f64), Some(0.1));
        assert_eq!(v.get("max").and_then(Value::as_f64), Some(0.3));
        assert_eq!(v.get("mean").and_then(Value::as_f64), Some((0.30000000000000004 + 0.3) / 3.0));
        assert_eq!(v.get("from_ms").and_then(Value::as_u64), Some(5));
    }

    #[test]
    fn a_refused_summary_fails_the_run_and_keeps_the_windows() {
        testing::reset();
        reading(T0, "pi-7", "20");
        reading(T0, "pi-8", "21");
        let before = testing::state_entries();
        testing::set_emit_allow(Some(&["summary/pi-7/#"]));
        testing::set_now_ms(Some(RUN1));
        let (r, c) = testing::invoke_scheduled(handle, "aggregate", RUN1, RUN1);
        let e = r.unwrap_err();
        assert!(e.message().contains("summary/pi-8/temperature") && e.message().contains("emit_allow"), "{}", e);
        assert_eq!(c.error.as_deref(), Some(e.message()));
        // The gateway discards the whole run: its record for pi-7 and the
        // reset of pi-7's window (the stand-in keeps the record for tests).
        assert_eq!(testing::state_entries(), before);
        testing::set_emit_allow(Some(&["summary/#"]));
        assert_eq!(run(RUN1).emitted.len(), 2);
    }

    #[test]
    fn past_1000_devices_the_rest_wait_for_the_next_run() {
        testing::reset();
        for i in 0..1005 {
            reading(T0 + i, &format!("d{}", i), "20");
        }
        let c = run(RUN1);
        assert_eq!(c.emitted.len(), 1000);
        assert_eq!(c.emitted[999].topic, "summary/d999/temperature");
        let warnings = c.logs_at(Level::Warn);
        assert_eq!(warnings.len(), 1, "{:?}", c.logs);
        assert!(warnings[0].starts_with("5 devices' windows stay open"), "{}", warnings[0]);
        assert_eq!(testing::state_str("devices").as_deref(), Some(r#"["d1000","d1001","d1002","d1003","d1004"]"#));
        // Their window now spans both periods.
        let c = run(RUN2);
        assert_eq!(c.emitted.len(), 5);
        let v = json::from_slice(&c.emitted[0].payload).unwrap();
        assert_eq!(v.get("from_ms").and_then(Value::as_u64), Some(T0 + 1000));
        assert_eq!(v.get("to_ms").and_then(Value::as_u64), Some(RUN2));
        assert_eq!(state_keys(), ["last_run_ms"]);
    }

    #[test]
    fn a_full_state_fails_the_reading_of_a_new_device() {
        testing::reset();
        reading(T0, "pi-7", "20");
        let used: usize = testing::state_entries().iter().map(|(k, v)| k.len() + v.len()).sum();
        testing::set_state_limit(used + 10);
        // Readings of a listed device do not grow the state much...
        reading(T0 + 1, "pi-7", "21");
        // ... a new device's window does not fit.
        let before = testing::state_entries();
        let (r, _) = testing::invoke(handle, "sensors/pi-8/temperature", br#"{"temp_c":20}"#);
        let e = r.unwrap_err();
        assert_eq!(e.message(), "cannot keep the window of device pi-8: the function's state_limit is reached");
        assert_eq!(testing::state_entries(), before, "nothing of the failed reading is kept");
    }

    #[test]
    fn every_reading_is_counted_once_around_a_run() {
        // Each invocation reads the state the one before it left: no
        // reading is lost or counted twice, around a scheduled run too.
        testing::reset();
        reading(T0, "pi-7", "20");
        reading(T0 + 1, "pi-8", "10");
        reading(T0 + 2, "pi-7", "22");
        let c = run(RUN1);
        reading(RUN1 + 10, "pi-7", "30");
        assert_eq!(
            summaries(&c),
            [
                (
                    "summary/pi-7/temperature",
                    r#"{"device":"pi-7","count":2,"min":20,"max":22,"mean":21,"from_ms":1732540500000,"to_ms":1732540800000}"#
                ),
                (
                    "summary/pi-8/temperature",
                    r#"{"device":"pi-8","count":1,"min":10,"max":10,"mean":10,"from_ms":1732540500001,"to_ms":1732540800000}"#
                ),
            ]
        );
        assert_eq!(testing::state_str("devices").as_deref(), Some(r#"["pi-7"]"#));
        assert_eq!(
            testing::state_str("window/pi-7").as_deref(),
            Some(r#"{"count":1,"min":30,"max":30,"sum":30,"from_ms":1732540800000}"#)
        );
    }

    #[test]
    fn a_new_instance_reads_the_same_state() {
        testing::reset();
        reading(T0, "pi-7", "20");
        testing::new_instance();
        reading(T0 + 1, "pi-7", "24");
        let c = run(RUN1);
        let v = json::from_slice(&c.emitted[0].payload).unwrap();
        assert_eq!(v.get("count").and_then(Value::as_u64), Some(2));
        assert_eq!(v.get("mean").and_then(Value::as_f64), Some(22.0));
    }
}
