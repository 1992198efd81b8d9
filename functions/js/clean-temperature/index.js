// clean-temperature in JavaScript: the same function as the Rust
// clean-temperature (functions/clean-temperature/src/lib.rs), built into a
// component with componentize-js (functions/js/build.mjs).
//
// Input: a JSON object with a numeric `temp_c`, on a topic whose second
// level names the device (`sensors/pi-7/temperature`, `{"temp_c": 21.5}`).
//
// Output: for a reading within -40..=85 °C, one record on
// `telemetry/<device>/temperature`: the input's fields in their order, plus
// `device` and, with `UNIT=F` in the function's env, `temp_f` (fields of
// those names replaced in place). Anything else is dropped with a warning;
// dropping is the function's job, so the invocation succeeds.
//
// With `DEDUP_WINDOW` (`500ms`, `30s`, `2m`, `1h`; unset or `0`: off), a
// reading whose cleaned record equals the device's last accepted one,
// accepted less than the window ago, is dropped silently. The last accepted
// record is kept in state under `last/<device>` as `<ms> <record>`.

import { emit, env, handler, initializer, log, Refused, state, text } from '../sdk/edgefn.js';

const MIN_C = -40;
const MAX_C = 85;
const SCALE = { ms: 1, s: 1000, m: 60000, h: 3600000 };

// DEDUP_WINDOW in milliseconds, undefined when de-duplication is off.
function dedupWindowMs() {
  const text = env('DEDUP_WINDOW');
  if (text === undefined) return undefined;
  const m = /^(\d+)(ms|s|m|h)?$/.exec(text.trim());
  if (m === null || (m[2] === undefined && Number(m[1]) !== 0)) {
    throw new Error(
      `DEDUP_WINDOW ${JSON.stringify(text)} is not a duration: write a whole number ` +
        'with ms, s, m or h, e.g. 30s (0 turns it off)');
  }
  const ms = Number(m[1]) * (SCALE[m[2]] ?? 0);
  return ms === 0 ? undefined : ms;
}

function drop(message, why) {
  log.warn(`dropped a reading on ${message.topic}: ${why}`);
}

function jsonType(value) {
  if (value === null) return 'null';
  if (Array.isArray(value)) return 'array';
  return { boolean: 'boolean', number: 'number', string: 'string' }[typeof value];
}

// Once per instance: a bad DEDUP_WINDOW stops the instance from starting,
// with the message every invocation would fail with.
export const init = initializer(dedupWindowMs);

export const handle = handler((message) => {
  const device = message.topic.split('/')[1] ?? '';
  if (device === '') return drop(message, 'the topic has no device level');
  let reading;
  try {
    reading = JSON.parse(text(message));
  } catch (e) {
    return drop(message, `not JSON: ${e.message}`);
  }
  if (reading === null || typeof reading !== 'object' || Array.isArray(reading)) {
    return drop(message, `expected a JSON object, got ${jsonType(reading)}`);
  }
  const tempC = reading.temp_c;
  if (typeof tempC !== 'number') return drop(message, 'no numeric temp_c');
  if (!(tempC >= MIN_C && tempC <= MAX_C)) {
    return drop(message, `temp_c ${tempC} is outside ${MIN_C}..=${MAX_C} °C`);
  }

  if (env('UNIT') === 'F') reading.temp_f = (tempC * 9) / 5 + 32;
  reading.device = device;
  const record = JSON.stringify(reading);
  const topic = `telemetry/${device}/temperature`;

  const windowMs = dedupWindowMs();
  if (windowMs === undefined) {
    emit(topic, record);
    return;
  }
  const now = Date.now();
  const key = `last/${device}`;
  let duplicate;
  try {
    duplicate = acceptedWithin(key, record, now, windowMs);
  } catch (e) {
    if (!(e instanceof Refused)) throw e;
    // An invalid key: a device name of more than 1019 bytes.
    log.warn(`not de-duplicating device ${device}: ${e.message}`);
    emit(topic, record);
    return;
  }
  if (!duplicate) {
    emit(topic, record);
    remember(key, record, now, device);
  }
});

function acceptedWithin(key, record, now, windowMs) {
  const last = state.getText(key);
  if (last === undefined) return false;
  const space = last.indexOf(' ');
  const at = Number(last.slice(0, space));
  if (space < 0 || !Number.isInteger(at)) return false; // unreadable: overwritten
  return last.slice(space + 1) === record && at <= now && now - at < windowMs;
}

function remember(key, record, now, device) {
  try {
    state.set(key, `${now} ${record}`);
  } catch (e) {
    if (!(e instanceof Refused)) throw e;
    // The state is full: forget this device rather than compare the next
    // reading with an older record.
    state.delete(key);
    log.warn(`not de-duplicating device ${device}: ${e.message}`);
  }
}
