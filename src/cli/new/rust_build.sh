#!/usr/bin/env bash
# Builds {{name}}.wasm (a core WebAssembly module) with rustup's
# wasm32-wasip1 target (rustup target add wasm32-wasip1), or Debian's Rust
# 1.63 (apt-get install rustc cargo libstd-rust-dev-wasm32 lld-14 wasi-libc).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
if command -v rustup >/dev/null 2>&1 && rustup target list --installed | grep -qx wasm32-wasip1; then
    cargo build --release --target wasm32-wasip1 --target-dir target
    cp target/wasm32-wasip1/release/{{lib}}.wasm {{name}}.wasm
else
    RUSTFLAGS="${RUSTFLAGS:--C linker=/usr/lib/llvm-14/bin/wasm-ld}" \
        PATH=/usr/bin:$PATH cargo build --offline --release --target wasm32-wasi --target-dir target
    cp target/wasm32-wasi/release/{{lib}}.wasm {{name}}.wasm
fi
echo "{{name}}.wasm: $(wc -c <{{name}}.wasm) bytes"
