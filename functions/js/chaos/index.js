// chaos in JavaScript: misbehaves on request, for testing how the gateway
// handles a JavaScript function. Not an example to copy. The same words as
// the Python chaos (functions/python/chaos/app.py):
//
// spin (loops forever: timeout), oom (keeps 1 MiB arrays until memory runs
// out: failure), fail (emits `attempted` to chaos/fail, then throws
// `Error: asked to fail`), count (emits {"count":N,"init":I}), env (emits
// GREETING), context (emits the context as JSON), forbidden (emits to
// forbidden/x, then the refusal's name or `accepted` to chaos/forbidden),
// hoard (sets 2 MiB of state, then the refusal's name to chaos/hoard),
// flood (logs 1 MiB through console.log); otherwise emits the payload to echo/<input topic>.
import { emit, env, handler, initializer, Refused, state, text } from '../sdk/edgefn.js';

const COMMANDS = ['spin', 'oom', 'fail', 'count', 'env', 'context', 'forbidden', 'hoard', 'flood'];
let count = 0;
let inits = 0;

function attempt(call) {
  try {
    call();
    return 'accepted';
  } catch (e) {
    if (e instanceof Refused) return e.error;
    throw e;
  }
}

export const init = initializer(() => {
  inits += 1;
});

export const handle = handler((message) => {
  const payload = text(message);
  const cmd = COMMANDS.find((c) => payload.includes(c));
  switch (cmd) {
    case 'spin':
      for (;;) {}
    case 'oom': {
      const blocks = [];
      for (;;) blocks.push(new Uint8Array(1 << 20).fill(1));
    }
    case 'fail':
      emit('chaos/fail', 'attempted');
      throw new Error('asked to fail');
    case 'count':
      count += 1;
      emit('chaos/count', { count, init: inits });
      return;
    case 'env':
      emit('chaos/env', env('GREETING'));
      return;
    case 'context':
      emit('chaos/context', message.context);
      return;
    case 'forbidden':
      emit('chaos/forbidden', attempt(() => emit('forbidden/x', 'x')));
      return;
    case 'hoard':
      emit('chaos/hoard', attempt(() => state.set('hoard', new Uint8Array(2 << 20))));
      return;
    case 'flood': {
      const line = 'x'.repeat(1023);
      for (let i = 0; i < 1024; i++) console.log(line);
      return;
    }
    default:
      emit(`echo/${message.topic}`, message.payload);
  }
});
