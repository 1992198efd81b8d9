#!/usr/bin/env bash
# Builds {{name}}.wasm (a WebAssembly component) with componentize-py,
# installed into .venv on first use (needs python3 with venv).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
if [[ "$(.venv/bin/componentize-py --version 2>/dev/null)" != *0.25.1* ]]; then
    rm -rf .venv
    python3 -m venv .venv
    .venv/bin/pip install --quiet --disable-pip-version-check componentize-py==0.25.1
fi
.venv/bin/componentize-py -d wit -w function-with-init componentize -p . app -o {{name}}.wasm
echo "{{name}}.wasm: $(wc -c <{{name}}.wasm) bytes"
