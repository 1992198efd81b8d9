// Writes TypeScript declarations of the function world (wit/edgefn.wit)
// for JavaScript and TypeScript functions, with jco's type generator:
//
//   node functions/js/types.mjs OUT_DIR
//
// (`jco types` does the same from the command line where its file access
// works; this passes the WIT as text.)
import { mkdir, readFile, readdir, writeFile } from 'node:fs/promises';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

const here = dirname(fileURLToPath(import.meta.url));
const out = process.argv[2];
if (!out) {
  console.error('usage: node types.mjs OUT_DIR');
  process.exit(2);
}
const { generateTypes, $init } = await import(
  join(here, 'node_modules/@bytecodealliance/jco-transpile/vendor/js-component-bindgen-component.js')
);
await $init;
const wit = join(here, '..', '..', 'wit');
// The world and its WASI dependency as one source: each dependency
// becomes a nested `package … { … }` block.
const sources = [await readFile(join(wit, 'edgefn.wit'), 'utf8')];
for (const dep of await readdir(join(wit, 'deps'))) {
  for (const file of await readdir(join(wit, 'deps', dep))) {
    const text = await readFile(join(wit, 'deps', dep, file), 'utf8');
    sources.push(`${text.replace(/^package ([^;]+);/m, 'package $1 {')}\n}`);
  }
}
const files = generateTypes('edgefn', {
  wit: { tag: 'source', val: sources.join('\n') },
  world: 'edgefn:function/function-with-init',
  guest: true,
});
for (const [name, bytes] of files) {
  const path = join(out, name);
  await mkdir(dirname(path), { recursive: true });
  await writeFile(path, bytes);
  console.log(path);
}
