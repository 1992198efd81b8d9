#!/usr/bin/env bash
# Builds every function in this workspace (each cdylib member) in release mode
# to functions/dist/<name>.wasm, then the Python and JavaScript functions to
# WebAssembly components (functions/dist/<name>_py.wasm, <name>_js.wasm),
# from any current directory.
#
# Toolchain, first that is available:
#   1. rustup with the wasm32-wasip1 target    (rustup target add wasm32-wasip1)
#   2. Debian's Rust (/usr/bin/cargo) with its wasm32 std
#      (apt-get install rustc cargo libstd-rust-dev-wasm32 lld-14 wasi-libc);
#      Rust 1.63 names the target wasm32-wasi
#   3. rustup with the older wasm32-wasi target (Rust before 1.84)
# If none is: as root with apt-get, and EDGEFN_INSTALL=1 or CI=true, installs
# Debian's and goes on; otherwise stops and says what to install.
#
# Python functions build with componentize-py, JavaScript ones with
# componentize-js, at the versions pinned below and in js/package.json. They
# are installed where they are missing, into functions/target/componentize-py
# (a venv) and functions/js/node_modules, from PyPI and npm. That needs
# python3 with venv, and node with npm; where one is missing, as root with
# apt-get and EDGEFN_INSTALL=1 or CI=true, Debian's packages are installed,
# otherwise that language is skipped with the command to run (and
# EDGEFN_COMPONENTS=required makes a skip an error).
#
# Environment: EDGEFN_INSTALL=1 (see above), RUSTFLAGS (passed on),
# EDGEFN_TOOLCHAIN=rustup|debian to force a choice,
# EDGEFN_COMPONENTS=required|skip.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$here"
export CARGO_TARGET_DIR="$here/target"
dist="$here/dist"

# Says what was built and its size.
report_built() {
    printf '%-28s %8d bytes\n' "dist/$(basename "$1")" "$(wc -c <"$1")"
}

debian_packages=(rustc cargo libstd-rust-dev-wasm32 lld-14 wasi-libc)

# Sets debian_target to the wasm32 WASI target Debian's rustc has a std for.
debian_target() {
    [[ -x /usr/bin/cargo && -x /usr/bin/rustc ]] || return 1
    local sysroot
    sysroot="$(/usr/bin/rustc --print sysroot 2>/dev/null)" || return 1
    for t in wasm32-wasip1 wasm32-wasi; do
        if [[ -d "$sysroot/lib/rustlib/$t/lib" ]]; then
            debian_target="$t"
            return 0
        fi
    done
    return 1
}

rustup_has() {
    command -v rustup >/dev/null 2>&1 &&
        rustup target list --installed 2>/dev/null | grep -qx "$1"
}

choose() {
    local force="${EDGEFN_TOOLCHAIN:-}"
    if [[ "$force" != debian ]] && rustup_has wasm32-wasip1; then
        mode=rustup target=wasm32-wasip1
    elif [[ "$force" != rustup ]] && debian_target; then
        mode=debian target="$debian_target"
    elif [[ "$force" != debian ]] && rustup_has wasm32-wasi; then
        mode=rustup target=wasm32-wasi
    else
        return 1
    fi
}

if ! choose; then
    install_cmd="apt-get update && apt-get install -y --no-install-recommends ${debian_packages[*]}"
    if [[ "$(id -u)" == 0 ]] && command -v apt-get >/dev/null 2>&1 &&
        [[ "${EDGEFN_INSTALL:-}" == 1 || "${CI:-}" == true ]]; then
        echo "build.sh: no wasm32 Rust toolchain; installing Debian's: $install_cmd" >&2
        export DEBIAN_FRONTEND=noninteractive
        apt-get update
        apt-get install -y --no-install-recommends "${debian_packages[@]}"
        choose || { echo "build.sh: still no wasm32 toolchain after installing" >&2; exit 1; }
    else
        cat >&2 <<EOF
build.sh: no Rust toolchain for WebAssembly (wasm32-wasip1) found. Either
  rustup target add wasm32-wasip1
or, on Debian/Ubuntu as root,
  $install_cmd
(or run this script as root with EDGEFN_INSTALL=1 to have it do that).
EOF
        exit 1
    fi
fi

if [[ "$mode" == debian ]]; then
    cargo=(env "PATH=/usr/bin:$PATH" /usr/bin/cargo)
    # Debian's rustc links wasm with rust-lld (a link to lld-14); use
    # wasm-ld directly where that link is missing.
    if [[ ! -e /usr/bin/rust-lld && -x /usr/lib/llvm-14/bin/wasm-ld ]]; then
        export RUSTFLAGS="${RUSTFLAGS:+$RUSTFLAGS }-C linker=/usr/lib/llvm-14/bin/wasm-ld"
    fi
else
    # Through rustup, so its cargo and rustc are used even where /usr/bin
    # (Debian's) comes first in PATH.
    toolchain="$(rustup show active-toolchain | cut -d' ' -f1)"
    cargo=(rustup run "$toolchain" cargo)
fi

echo "build.sh: $("${cargo[@]}" --version) ($mode), target $target" >&2

# Cargo prints a JSON message per artifact on stdout (diagnostics go to
# stderr as usual); the .wasm files in them are the functions.
messages="$(mktemp)"
trap 'rm -f "$messages"' EXIT
"${cargo[@]}" build --release --workspace --target "$target" \
    --message-format=json-render-diagnostics >"$messages"

mkdir -p "$dist"
built=0
while IFS= read -r wasm; do
    name="$(basename "$wasm")"
    cp "$wasm" "$dist/$name"
    report_built "$dist/$name"
    built=$((built + 1))
done < <(grep -o '"[^"]*\.wasm"' "$messages" | tr -d '"' | grep -v '/deps/' | sort -u)

if [[ "$built" == 0 ]]; then
    echo "build.sh: cargo built no .wasm module" >&2
    exit 1
fi

# ---- Python and JavaScript: WebAssembly components -------------------------

componentize_py_version=0.25.1
wit="$here/../wit"

may_apt() {
    [[ "$(id -u)" == 0 ]] && command -v apt-get >/dev/null 2>&1 &&
        [[ "${EDGEFN_INSTALL:-}" == 1 || "${CI:-}" == true ]]
}

# Stops or goes on without a language, saying how to get its toolchain.
skip() {
    echo "build.sh: $1" >&2
    if [[ "${EDGEFN_COMPONENTS:-}" == required ]]; then
        exit 1
    fi
}

# Installs Debian packages if allowed; fails otherwise.
apt_install() {
    may_apt || return 1
    echo "build.sh: installing ${*}" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq && apt-get install -y --no-install-recommends "$@" >&2
}

# The function directories under LANGUAGE_DIR holding ENTRY (not the sdk).
function_dirs() {
    local entry
    for entry in "$here/$1"/*/"$2"; do
        [[ -e "$entry" && "$(basename "$(dirname "$entry")")" != sdk ]] || continue
        dirname "$entry"
    done
}

build_python() {
    local venv="$here/target/componentize-py"
    local py="$venv/bin/componentize-py"
    if [[ ! -x "$py" ]] || [[ "$("$py" --version 2>/dev/null)" != *"$componentize_py_version"* ]]; then
        if ! python3 -c 'import venv, ensurepip' >/dev/null 2>&1 &&
            ! apt_install python3 python3-venv python3-pip; then
            skip "Python functions skipped: no python3 with venv; install it with
  apt-get install python3 python3-venv"
            return 0
        fi
        echo "build.sh: installing componentize-py $componentize_py_version into $venv" >&2
        rm -rf "$venv"
        python3 -m venv "$venv"
        "$venv/bin/pip" install --quiet --disable-pip-version-check \
            "componentize-py==$componentize_py_version"
    fi
    local dir
    while IFS= read -r dir; do
        local out
        out="$dist/$(basename "$dir")_py.wasm"
        "$py" -d "$wit" -w function-with-init componentize \
            -p "$here/python/sdk" -p "$dir" app -o "$out" >/dev/null
        report_built "$out"
    done < <(function_dirs python app.py)
}

build_js() {
    if ! command -v node >/dev/null 2>&1 || ! command -v npm >/dev/null 2>&1; then
        if ! apt_install nodejs npm; then
            skip "JavaScript functions skipped: no node and npm; install them with
  apt-get install nodejs npm"
            return 0
        fi
    fi
    # Installed, and not older than the pinned versions.
    if [[ ! -d "$here/js/node_modules/@bytecodealliance/componentize-js" ||
        "$here/js/package-lock.json" -nt "$here/js/node_modules/.package-lock.json" ]]; then
        echo "build.sh: installing componentize-js (js/package.json) into js/node_modules" >&2
        (cd "$here/js" && npm install --no-audit --no-fund --loglevel=error >&2)
    fi
    local dir
    while IFS= read -r dir; do
        local name out
        name="$(basename "$dir")"
        out="$dist/${name//-/_}_js.wasm"
        (cd "$here/js" && node build.mjs "$dir/index.js" "$out" >/dev/null)
        report_built "$out"
    done < <(function_dirs js index.js)
    # TypeScript declarations of the world, for editors and tsc.
    (cd "$here/js" && node types.mjs "$dist/js-types" >/dev/null)
    echo "dist/js-types/                TypeScript declarations of the function world"
}

if [[ "${EDGEFN_COMPONENTS:-}" != skip ]]; then
    build_python
    build_js
fi
