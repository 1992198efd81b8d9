#!/usr/bin/env bash
# Builds {{name}}.wasm (a core WebAssembly module) with clang and wasi-libc
# (Debian: apt-get install clang-14 lld-14 wasi-libc libclang-rt-14-dev-wasm32).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
clang="$(command -v clang-14 || command -v clang || true)"
if [[ -z "$clang" ]]; then
    echo "build.sh: no clang; apt-get install clang-14 lld-14 wasi-libc libclang-rt-14-dev-wasm32" >&2
    exit 1
fi
linker=()
if [[ -x /usr/lib/llvm-14/bin/wasm-ld ]]; then
    linker=(-fuse-ld=/usr/lib/llvm-14/bin/wasm-ld)
fi
"$clang" --target=wasm32-wasi -O2 -s -mexec-model=reactor "${linker[@]}" \
    -o {{name}}.wasm {{name}}.c
echo "{{name}}.wasm: $(wc -c <{{name}}.wasm) bytes"
