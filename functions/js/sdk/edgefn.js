// edgefn for JavaScript functions: the WIT world `edgefn:function`
// (wit/edgefn.wit) with JavaScript types. A function exports its handler
// wrapped by `handler`:
//
//   import { handler, emit } from '../sdk/edgefn.js';
//   export const handle = handler((msg) => {
//     emit(`telemetry/${msg.topic}`, msg.payload);
//   });
//
// A handler that returns succeeds: what it emitted, published and wrote to
// state is kept. One that throws fails the invocation: the gateway retries
// it and then dead-letters the message with the error's text.

import * as host from 'edgefn:function/host@1.0.0';
import * as store from 'edgefn:function/state@1.0.0';
import { getEnvironment } from 'wasi:cli/environment@0.2.0';

const encoder = new TextEncoder();
const decoder = new TextDecoder();

/** A call the gateway refused; `error` says why ('not-allowed', 'too-large',
 * 'state-limit', ...). The call did nothing. */
export class Refused extends Error {
  constructor(call, error) {
    super(`${call} refused: ${error}`);
    this.name = 'Refused';
    this.error = error;
  }
}

function bytes(payload) {
  if (payload instanceof Uint8Array) return payload;
  if (ArrayBuffer.isView(payload)) {
    return new Uint8Array(payload.buffer, payload.byteOffset, payload.byteLength);
  }
  if (typeof payload === 'string') return encoder.encode(payload);
  return encoder.encode(JSON.stringify(payload));
}

function refusable(call, f) {
  try {
    return f();
  } catch (e) {
    // A refusal arrives as an error whose payload is the world's `error`.
    if (typeof e?.payload === 'string') throw new Refused(call, e.payload);
    throw e;
  }
}

/** Queues a record for upstream (a string is sent as UTF-8, an object as
 * JSON). Throws `Refused`. */
export function emit(topic, payload) {
  refusable('emit', () => host.emit(topic, bytes(payload)));
}

/** Queues a message for the local broker (topics in `publish_allow` only).
 * Throws `Refused`. */
export function publish(topic, payload) {
  refusable('publish', () => host.publish(topic, bytes(payload)));
}

/** The function's log: `log.info('...')`, also `debug`, `warn`, `error`. */
export const log = {
  trace: (message) => host.log('trace', String(message)),
  debug: (message) => host.log('debug', String(message)),
  info: (message) => host.log('info', String(message)),
  warn: (message) => host.log('warn', String(message)),
  error: (message) => host.log('error', String(message)),
};

/** The function's durable state: kept only if the invocation succeeds. */
export const state = {
  /** The value of `key` (a Uint8Array), or undefined. */
  get: (key) => refusable('state.get', () => store.get(key)),
  /** The value of `key` as text, or undefined. */
  getText(key) {
    const value = state.get(key);
    return value === undefined ? undefined : decoder.decode(value);
  },
  /** Sets `key` (a string is stored as UTF-8, an object as JSON). */
  set: (key, value) => refusable('state.set', () => store.set(key, bytes(value))),
  /** Removes `key`. */
  delete: (key) => refusable('state.delete', () => store.delete(key)),
};

/** The function's environment variables (`env` in its configuration). */
export function env(name) {
  for (const [key, value] of getEnvironment()) {
    if (key === name) return value;
  }
  return undefined;
}

/** The payload of a message as text. */
export function text(message) {
  return decoder.decode(message.payload);
}

function failed(e) {
  // The stack goes to the function's log (stderr); the text is what the
  // dead letter keeps.
  console.error(e?.stack ?? String(e));
  return e instanceof Error ? `${e.name}: ${e.message}` : String(e);
}

/** Wraps a handler for export as `handle`. */
export function handler(fn) {
  return (message) => {
    try {
      fn(message);
    } catch (e) {
      throw failed(e);
    }
  };
}

/** Wraps an initialiser for export as `init` (world `function-with-init`). */
export function initializer(fn) {
  return () => {
    try {
      fn();
    } catch (e) {
      throw failed(e);
    }
  };
}
