#!/usr/bin/env bash
# Builds edgefn for a Raspberry Pi on an x86_64 Linux machine.
#
#   cross/build.sh [--mode auto|cross|linker] [--dry-run] TARGET [CARGO ARGS...]
#
# TARGET (a short name or the full triple):
#   aarch64  aarch64-unknown-linux-gnu       Pi 3/4/5, Zero 2 W, 64-bit OS (Cranelift)
#   armv7    armv7-unknown-linux-gnueabihf   Pi 2/3/4, 32-bit OS          (Pulley)
#   armv6    arm-unknown-linux-gnueabihf     Pi Zero, Zero W, Pi 1        (Pulley)
#
# --mode cross   (a) cross-rs in Docker or Podman, configured by cross/Cross.toml
# --mode linker  (b) rustup's standard library for TARGET and Debian's cross
#                C compiler, set for this build only through
#                CARGO_TARGET_<TRIPLE>_LINKER, CC_<triple> and AR_<triple>
# --mode auto    (default) (a) if `cross` is installed and its container
#                engine answers, else (b)
# --dry-run      check what is needed and print the build command, build nothing
#
# CARGO ARGS go to `cargo build --release`, e.g. --locked or
# --no-default-features (no embedded broker). EDGEFN_CROSS_CC=path/to/gcc
# replaces the C cross compiler in mode (b).
#
# Prints the binary's path and size, and what it needs on the Pi.
# Exit status: 0 built (or, with --dry-run, ready to build); 2 usage error;
# 3 something is missing (the commands that fix it are printed); otherwise
# the build's.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

usage() {
    sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed -e '$d' -e 's/^# \{0,1\}//' >&2
    exit 2
}

say() { printf '==> %s\n' "$*" >&2; }
warn() { printf 'warning: %s\n' "$*" >&2; }

mode=auto
dry_run=0
while [[ $# -gt 0 ]]; do
    case "$1" in
        --mode) [[ $# -ge 2 ]] || usage; mode="$2"; shift 2 ;;
        --mode=*) mode="${1#--mode=}"; shift ;;
        -n|--dry-run) dry_run=1; shift ;;
        -h|--help) usage ;;
        -*) printf 'unknown option %s\n\n' "$1" >&2; usage ;;
        *) break ;;
    esac
done
[[ $# -ge 1 ]] || usage
case "$mode" in auto|cross|linker) ;; *) printf 'unknown mode %s\n\n' "$mode" >&2; usage ;; esac

case "$1" in
    aarch64|arm64|aarch64-unknown-linux-gnu) target=aarch64-unknown-linux-gnu ;;
    armv7|armhf|armv7-unknown-linux-gnueabihf) target=armv7-unknown-linux-gnueabihf ;;
    armv6|arm|arm-unknown-linux-gnueabihf) target=arm-unknown-linux-gnueabihf ;;
    *) printf 'unsupported target %s\n\n' "$1" >&2; usage ;;
esac
shift
cargo_args=("$@")

# Per target: the Debian cross compiler, its packages, the qemu-user
# emulator and the sysroot Debian installs for it.
case "$target" in
    aarch64-unknown-linux-gnu)
        debian_cc=aarch64-linux-gnu-gcc
        debian_pkgs="gcc-aarch64-linux-gnu libc6-dev-arm64-cross"
        qemu="qemu-aarch64"
        sysroot=/usr/aarch64-linux-gnu ;;
    *)
        debian_cc=arm-linux-gnueabihf-gcc
        debian_pkgs="gcc-arm-linux-gnueabihf libc6-dev-armhf-cross"
        qemu="qemu-arm"
        sysroot=/usr/arm-linux-gnueabihf ;;
esac

fixes=()     # commands that would make the chosen mode work
notes=()     # why a mode cannot be used
need() { fixes+=("$1"); }

# Runs "$@" for at most $1 seconds (where `timeout` exists).
with_timeout() {
    local secs="$1"; shift
    if command -v timeout >/dev/null 2>&1; then timeout "$secs" "$@"; else "$@"; fi
}

# ---------------------------------------------------------------------------
# Rust: cargo, a recent enough rustc.
# ---------------------------------------------------------------------------
check_rust() {
    if ! command -v cargo >/dev/null 2>&1 || ! command -v rustc >/dev/null 2>&1; then
        need "curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs | sh"
        return 1
    fi
    local want have
    want="$(sed -n 's/^rust-version *= *"\([0-9.]*\)".*/\1/p' Cargo.toml | head -n 1)"
    have="$(rustc --version 2>/dev/null | awk '{print $2}' | cut -d- -f1)"
    if [[ -z "$have" ]]; then
        notes+=("rustc --version failed")
        need "rustup update stable"
        return 1
    fi
    if [[ -n "$want" && "$(printf '%s\n%s\n' "$want" "$have" | sort -V | head -n 1)" != "$want" ]]; then
        notes+=("rustc $have ($(command -v rustc)) is older than edgefn's rust-version $want")
        if command -v rustup >/dev/null 2>&1; then
            need "rustup update stable   # and put ~/.cargo/bin first in PATH"
        else
            need "curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs | sh"
        fi
        return 1
    fi
}

# ---------------------------------------------------------------------------
# Mode (a): cross-rs.
# ---------------------------------------------------------------------------
engine="${CROSS_CONTAINER_ENGINE:-}"
if [[ -z "$engine" ]]; then
    if command -v docker >/dev/null 2>&1; then engine=docker
    elif command -v podman >/dev/null 2>&1; then engine=podman
    fi
fi

# Whether mode (a) can run; records why not (and the fixes) if it cannot.
cross_ready() {
    local ok=0
    check_rust || ok=1
    if ! command -v cross >/dev/null 2>&1; then
        notes+=("cross is not installed")
        need "cargo install cross --git https://github.com/cross-rs/cross"
        ok=1
    fi
    if [[ -z "$engine" ]]; then
        notes+=("neither docker nor podman is installed")
        need "sudo apt-get install docker.io && sudo usermod -aG docker \"\$USER\"   # then log in again"
        ok=1
    elif ! with_timeout 20 "$engine" info >/dev/null 2>&1; then
        notes+=("$engine is installed but does not answer ($engine info failed)")
        if [[ "$engine" == docker ]]; then
            need "sudo systemctl start docker   # and: sudo usermod -aG docker \"\$USER\", then log in again"
        else
            need "podman info   # see why podman does not run"
        fi
        ok=1
    fi
    if ! command -v rustup >/dev/null 2>&1; then
        notes+=("cross needs rustup (it adds the target's standard library itself)")
        need "curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs | sh"
        ok=1
    fi
    return "$ok"
}

# ---------------------------------------------------------------------------
# Mode (b): rustup target + Debian cross compiler.
# ---------------------------------------------------------------------------
cc="${EDGEFN_CROSS_CC:-$debian_cc}"

# Whether the standard library for $target is installed for this rustc.
has_target_std() {
    local dir
    dir="$(rustc --print target-libdir --target "$target" 2>/dev/null)" || return 1
    compgen -G "$dir/libstd-*.rlib" >/dev/null
}

# Tag_CPU_arch of an object file ("v6KZ", "v7", …), if readelf can tell.
cpu_arch_of() {
    readelf -A "$1" 2>/dev/null | sed -n 's/^ *Tag_CPU_arch: *//p' | head -n 1
}

# Whether an ARM architecture tag is newer than a Pi Zero/1 (ARM1176, ARMv6KZ) runs.
beyond_armv6() {
    [[ "$1" =~ ^v6T2|^v7|^v8|^v9 ]]
}

linker_ready() {
    local ok=0
    check_rust || ok=1
    if [[ "$ok" == 0 ]] && ! has_target_std; then
        notes+=("the Rust standard library for $target is not installed")
        if command -v rustup >/dev/null 2>&1; then
            need "rustup target add $target"
        else
            need "curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs | sh   # then: rustup target add $target"
        fi
        ok=1
    fi
    if ! command -v "$cc" >/dev/null 2>&1; then
        notes+=("no C cross compiler $cc")
        need "sudo apt-get install --no-install-recommends $debian_pkgs"
        return 1
    fi
    # Compile and link a program: proves the compiler, its libc and crt files.
    local tmp
    tmp="$(mktemp -d)"
    if ! printf 'int main(void) { return 0; }\n' | "$cc" -x c - -o "$tmp/t" >"$tmp/log" 2>&1; then
        notes+=("$cc cannot link a program for $target: $(head -n 3 "$tmp/log" | tr '\n' ' ')")
        need "sudo apt-get install --no-install-recommends $debian_pkgs"
        ok=1
    elif [[ "$target" == arm-unknown-linux-gnueabihf ]]; then
        # Debian's arm-linux-gnueabihf toolchain is ARMv7 (Thumb-2): its crt
        # files and libgcc end up in the binary, which then dies with SIGILL
        # on a Pi Zero or Pi 1 (rust-lang/rust#74517).
        local crt arch
        crt="$(readlink -f "$("$cc" -print-file-name=crt1.o)")"
        if ! command -v readelf >/dev/null 2>&1; then
            warn "readelf not found: cannot tell whether $cc targets ARMv6"
        else
            arch="$(cpu_arch_of "$crt")"
            if [[ -n "$arch" ]] && beyond_armv6 "$arch"; then
                notes+=("$cc links ARMv7 start-up code ($crt: Tag_CPU_arch $arch); the binary would die with SIGILL on a Pi Zero/1")
                need "use mode (a): cross ships an ARMv6 toolchain for $target"
                need "or point EDGEFN_CROSS_CC at an ARMv6 hard-float gcc (crosstool-ng: --with-arch=armv6 --with-fpu=vfp --with-float=hard)"
                ok=1
            fi
        fi
    fi
    rm -rf "$tmp"
    return "$ok"
}

# ---------------------------------------------------------------------------
# Choose the mode.
# ---------------------------------------------------------------------------
print_fixes() {
    local n
    for n in "${notes[@]}"; do printf '  - %s\n' "$n" >&2; done
    printf 'To fix:\n' >&2
    for n in "${fixes[@]}"; do printf '  %s\n' "$n" >&2; done
}

case "$mode" in
    cross)
        if ! cross_ready; then
            printf 'Mode (a), cross-rs, cannot run:\n' >&2; print_fixes; exit 3
        fi ;;
    linker)
        if ! linker_ready; then
            printf 'Mode (b), rustup target + Debian cross compiler, cannot run for %s:\n' "$target" >&2
            print_fixes; exit 3
        fi ;;
    auto)
        if cross_ready; then
            mode=cross
        else
            cross_notes=("${notes[@]}"); cross_fixes=("${fixes[@]}")
            notes=(); fixes=()
            say "not using cross-rs: $(IFS=";"; printf "%s" "${cross_notes[*]}" | sed "s/;/; /g")"
            if linker_ready; then
                mode=linker
            else
                printf 'Cannot build %s.\n\nMode (b), rustup target + Debian cross compiler:\n' "$target" >&2
                print_fixes
                printf '\nOr mode (a), cross-rs with Docker:\n' >&2
                notes=("${cross_notes[@]}"); fixes=("${cross_fixes[@]}")
                print_fixes
                exit 3
            fi
        fi ;;
esac

# ---------------------------------------------------------------------------
# Build.
# ---------------------------------------------------------------------------
target_upper="$(printf '%s' "$target" | tr 'a-z-' 'A-Z_')"
target_lower="$(printf '%s' "$target" | tr '-' '_')"

if [[ "$mode" == cross ]]; then
    say "mode (a): cross-rs with $engine, config cross/Cross.toml"
    cmd=(env "CROSS_CONFIG=$root/cross/Cross.toml" cross build --release --target "$target" "${cargo_args[@]}")
else
    ar="${cc%gcc}ar"
    command -v "$ar" >/dev/null 2>&1 || ar="ar"
    say "mode (b): rustup target $target, C compiler and linker $cc"
    cmd=(env "CARGO_TARGET_${target_upper}_LINKER=$cc" "CC_${target_lower}=$cc" "AR_${target_lower}=$ar"
         cargo build --release --target "$target" "${cargo_args[@]}")
fi

if [[ "$dry_run" == 1 ]]; then
    printf 'would run:'; printf ' %q' "${cmd[@]}"; printf '\n'
    exit 0
fi
say "$(printf '%q ' "${cmd[@]}")"
"${cmd[@]}"

# ---------------------------------------------------------------------------
# Report.
# ---------------------------------------------------------------------------
target_dir="$(cargo metadata --format-version 1 --no-deps --offline 2>/dev/null |
    sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')"
bin="${target_dir:-$root/target}/$target/release/edgefn"
if [[ ! -f "$bin" ]]; then
    printf 'built, but %s is not there\n' "$bin" >&2
    exit 1
fi

bytes="$(stat -c %s "$bin")"
if command -v numfmt >/dev/null 2>&1; then
    human="$(numfmt --to=iec-i --suffix=B --format=%.1f "$bytes")"
else
    human="$((bytes / 1048576)) MiB"
fi
printf 'binary: %s\n' "$bin"
printf 'size:   %s (%s bytes)\n' "$human" "$bytes"
if command -v file >/dev/null 2>&1; then
    printf 'file:   %s\n' "$(file -b "$bin")"
fi
if command -v readelf >/dev/null 2>&1; then
    glibc="$(readelf -V -W "$bin" | grep -o 'GLIBC_[0-9][0-9.]*' | sed 's/GLIBC_//' | sort -Vu | tail -n 1)"
    if [[ -n "$glibc" ]]; then
        printf 'glibc:  %s or newer on the Pi (ldd --version; Raspberry Pi OS 12 bookworm has 2.36, 11 bullseye 2.31)\n' "$glibc"
        if [[ "$(printf '2.36\n%s\n' "$glibc" | sort -V | tail -n 1)" != 2.36 ]]; then
            warn "this binary needs glibc $glibc: it will not start on Raspberry Pi OS bookworm (2.36); build with older images (cross/Cross.toml)"
        fi
    fi
    if [[ "$target" == arm-unknown-linux-gnueabihf ]]; then
        arch="$(cpu_arch_of "$bin")"
        printf 'arch:   Tag_CPU_arch %s\n' "${arch:-unknown}"
        if [[ -n "$arch" ]] && beyond_armv6 "$arch"; then
            warn "the binary contains code newer than ARMv6: it will die with SIGILL on a Pi Zero/1"
        fi
    fi
fi
# A quick run under emulation, where qemu-user and a sysroot are installed.
if command -v "$qemu" >/dev/null 2>&1 && [[ -d "$sysroot/lib" ]]; then
    if out="$(with_timeout 60 "$qemu" -L "$sysroot" "$bin" --version 2>&1)"; then
        printf 'qemu:   %s -L %s … --version: %s\n' "$qemu" "$sysroot" "$out"
    else
        warn "$qemu -L $sysroot $bin --version failed: $out"
    fi
else
    printf 'check:  %s -L %s %s --version   (apt-get install qemu-user %s)\n' \
        "$qemu" "$sysroot" "$bin" "${debian_pkgs#* }"
fi
