"""clean_temperature in Python: the same function as the Rust
clean-temperature (functions/clean-temperature/src/lib.rs).

Input: a JSON object with a numeric `temp_c`, on a topic whose second level
names the device (`sensors/pi-7/temperature`, `{"temp_c": 21.5, "seq": 12}`).

Output: for a reading within -40..=85 °C, one record on
`telemetry/<device>/temperature`: the input's fields in their order, plus
`device` and, with `UNIT=F` in the function's env, `temp_f` (fields of those
names replaced in place). Anything else is dropped with a warning; dropping
is the function's job, so the invocation succeeds.

With `DEDUP_WINDOW` (`500ms`, `30s`, `2m`, `1h`; unset or `0`: off), a
reading whose cleaned record equals the device's last accepted one, accepted
less than the window ago, is dropped silently. The last accepted record is
kept in state under `last/<device>` as `<ms since the epoch> <record>`.
"""

import json
import os
import re
import time

import edgefn
from edgefn import WitWorld  # noqa: F401  (the component's exports)

MIN_C = -40.0
MAX_C = 85.0

_DURATION = re.compile(r"(\d+)(ms|s|m|h)?")
_SCALE = {"ms": 1, "s": 1_000, "m": 60_000, "h": 3_600_000}


def dedup_window_ms():
    """DEDUP_WINDOW in milliseconds, None when de-duplication is off."""
    text = os.environ.get("DEDUP_WINDOW")
    if text is None:
        return None
    m = _DURATION.fullmatch(text.strip())
    if m is None or (m.group(2) is None and m.group(1).lstrip("0") != ""):
        raise ValueError(
            f"DEDUP_WINDOW {json.dumps(text)} is not a duration: write a whole number "
            "with ms, s, m or h, e.g. 30s (0 turns it off)"
        )
    ms = int(m.group(1)) * _SCALE.get(m.group(2), 0)
    return ms or None


@edgefn.init
def init():
    # A bad DEDUP_WINDOW stops the instance with the message every
    # invocation would fail with.
    dedup_window_ms()


def _json_type(value):
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    return "array"


def _no_constants(name):
    raise ValueError(f"{name} is not JSON")


def drop(msg, why):
    edgefn.warn(f"dropped a reading on {msg.topic}: {why}")


@edgefn.handler
def handle(msg):
    levels = msg.topic.split("/")
    device = levels[1] if len(levels) > 1 else ""
    if not device:
        return drop(msg, "the topic has no device level")
    try:
        reading = json.loads(msg.payload, parse_constant=_no_constants)
    except ValueError as e:
        return drop(msg, f"not JSON: {e}")
    if not isinstance(reading, dict):
        return drop(msg, f"expected a JSON object, got {_json_type(reading)}")
    temp_c = reading.get("temp_c")
    if isinstance(temp_c, bool) or not isinstance(temp_c, (int, float)):
        return drop(msg, "no numeric temp_c")
    if not MIN_C <= temp_c <= MAX_C:
        return drop(msg, f"temp_c {temp_c} is outside {MIN_C}..={MAX_C} °C")

    if os.environ.get("UNIT") == "F":
        reading["temp_f"] = temp_c * 9.0 / 5.0 + 32.0
    reading["device"] = device
    record = json.dumps(reading, separators=(",", ":"), ensure_ascii=False)
    topic = f"telemetry/{device}/temperature"

    window_ms = dedup_window_ms()
    if window_ms is None:
        edgefn.emit(topic, record)
        return
    now = int(time.time() * 1000)
    key = f"last/{device}"
    try:
        duplicate = accepted_within(key, record, now, window_ms)
    except edgefn.Refused as e:
        # An invalid key: a device name of more than 1019 bytes.
        edgefn.warn(f"not de-duplicating device {device}: {e}")
        edgefn.emit(topic, record)
        return
    if not duplicate:
        edgefn.emit(topic, record)
        remember(key, record, now, device)


def accepted_within(key, record, now, window_ms):
    last = edgefn.state.get(key)
    if last is None:
        return False
    at, _, last_record = last.partition(b" ")
    try:
        at = int(at)
    except ValueError:
        return False  # unreadable: overwritten
    return last_record == record.encode() and at <= now and now - at < window_ms


def remember(key, record, now, device):
    try:
        edgefn.state.set(key, f"{now} {record}")
    except edgefn.Refused as e:
        # The state is full: forget this device rather than compare the next
        # reading with an older record.
        edgefn.state.delete(key)
        edgefn.warn(f"not de-duplicating device {device}: {e}")
