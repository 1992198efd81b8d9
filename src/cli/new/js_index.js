// {{name}}: an edgefn function in JavaScript (a WebAssembly component).
//
// Each MQTT message on the function's triggers arrives in `handle`. What it
// emits goes upstream once the invocation succeeds; throwing fails the
// invocation (retried, then a dead letter with the error's text).
import { emit, env, handler, log, text } from './edgefn.js';

export const handle = handler((msg) => {
  const reading = JSON.parse(text(msg));
  reading.device = msg.topic.split('/')[1] ?? msg.topic;
  if (env('VERBOSE') === '1') log.info(`${msg.topic}: ${JSON.stringify(reading)}`);
  emit(`processed/${msg.topic}`, reading);
});
