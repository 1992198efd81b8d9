#!/usr/bin/env bash
# Builds {{name}}.wasm (a core WebAssembly module) with rustup's
# wasm32-wasip1 target (rustup target add wasm32-wasip1), or Debian's Rust
# 1.63 (apt-get install rustc cargo libstd-rust-dev-wasm32 lld-14 wasi-libc).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
if command -v rustup >/dev/null 2>&1 && rustup target list --installed 2>/dev/null | grep -qx wasm32-wasip1; then
    # Through rustup, so its cargo is used even where Debian's comes first.
    toolchain="$(rustup show active-toolchain | cut -d' ' -f1)"
    rustup run "$toolchain" cargo build --release --target wasm32-wasip1 --target-dir target
    cp target/wasm32-wasip1/release/{{lib}}.wasm {{name}}.wasm
elif [[ -x /usr/bin/cargo ]]; then
    if [[ ! -e /usr/bin/rust-lld && -x /usr/lib/llvm-14/bin/wasm-ld ]]; then
        export RUSTFLAGS="${RUSTFLAGS:+$RUSTFLAGS }-C linker=/usr/lib/llvm-14/bin/wasm-ld"
    fi
    PATH=/usr/bin:$PATH /usr/bin/cargo build --offline --release --target wasm32-wasi --target-dir target
    cp target/wasm32-wasi/release/{{lib}}.wasm {{name}}.wasm
else
    echo "build.sh: no Rust toolchain for WebAssembly: rustup target add wasm32-wasip1," >&2
    echo "  or apt-get install rustc cargo libstd-rust-dev-wasm32 lld-14 wasi-libc" >&2
    exit 1
fi
echo "{{name}}.wasm: $(wc -c <{{name}}.wasm) bytes"
