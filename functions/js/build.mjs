// Builds a JavaScript edgefn function into a WebAssembly component with
// componentize-js, against the function world in wit/:
//
//   node functions/js/build.mjs SOURCE.js OUT.wasm [WORLD]
//
// WORLD is `function` or `function-with-init` (the module also exports
// `init`); without it, `function-with-init` when SOURCE exports `init`.
// Needs @bytecodealliance/componentize-js in node_modules beside this
// script (functions/build.sh installs it).
import { componentize } from '@bytecodealliance/componentize-js';
import { existsSync } from 'node:fs';
import { readFile, writeFile } from 'node:fs/promises';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';

const [source, out, worldArg] = process.argv.slice(2);
if (!source || !out) {
  console.error('usage: node build.mjs SOURCE.js OUT.wasm [function|function-with-init]');
  process.exit(2);
}
// The world: beside this script (a skeleton from `edgefn new`), or the
// repository's.
const here = dirname(fileURLToPath(import.meta.url));
const wit = existsSync(join(here, 'wit')) ? join(here, 'wit') : join(here, '..', '..', 'wit');
const exportsInit = /^export (const|function|async function) init\b/m.test(await readFile(source, 'utf8'));
const world = worldArg ?? (exportsInit ? 'function-with-init' : 'function');
const { component } = await componentize({
  sourcePath: resolve(source),
  witPath: wit,
  worldName: world,
  // Only what a function may use: no HTTP client, no fetch.
  disableFeatures: ['http'],
});
await writeFile(out, component);
console.log(`${out}: ${component.length} bytes`);
