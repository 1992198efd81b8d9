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

use edgefn_sdk::json::{self, Value};
use edgefn_sdk::{emit, env, warn, Error, Message};

edgefn_sdk::handler!(handle);

/// Readings outside this range (°C) are sensor faults.
const MIN_C: f64 = -40.0;
const MAX_C: f64 = 85.0;

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

    emit(&format!("telemetry/{}/temperature", device), Value::Object(reading).to_string())?;
    Ok(())
}

/// Logs why a reading is dropped; the invocation still succeeds.
fn drop_reading(msg: &Message, why: &str) -> Result<(), Error> {
    warn(&format!("dropped a reading on {}: {}", msg.topic(), why));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::handle;
    use edgefn_sdk::testing::{self, Captured};
    use edgefn_sdk::Level;

    fn run(topic: &str, payload: &str, unit: Option<&str>) -> Captured {
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
        testing::set_env("UNIT", None);
        let (result, c) = testing::invoke(handle, "sensors/d/temperature", &[0x7b, 0xff, 0x7d]);
        assert_eq!(result, Ok(()));
        assert!(c.emitted.is_empty());
        assert_eq!(c.logs_at(Level::Warn).len(), 1);
    }
}
