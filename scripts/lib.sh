# Shared by scripts/demo and scripts/test: find or install what edgefn needs.
# Installs with apt-get when running as root (or EDGEFN_INSTALL=1 / CI=true
# with root); otherwise stops and prints the exact command to run.

root_dir="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# Build output outside the clone, so a fresh clone on the same machine
# reuses the previous build.
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/edgefn/target}"

can_install() {
    [[ "$(id -u)" == 0 ]] && command -v apt-get >/dev/null 2>&1
}

apt_updated=0
apt_install() {
    if can_install; then
        echo "==> installing: $*" >&2
        if [[ "$apt_updated" == 0 ]]; then
            apt-get update -qq >&2
            apt_updated=1
        fi
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >&2
    else
        echo "edgefn needs: $*" >&2
        echo "run:  sudo apt-get update && sudo apt-get install -y --no-install-recommends $*" >&2
        exit 1
    fi
}

need_rust() {
    if ! command -v cargo >/dev/null 2>&1; then
        echo "edgefn needs Rust (cargo) 1.94 or newer." >&2
        echo "run:  curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs | sh" >&2
        exit 1
    fi
}

# Python's Prometheus client, whose parser the metrics tests scrape with.
need_prometheus_parser() {
    if ! /usr/bin/python3 -c 'import prometheus_client.openmetrics.parser' 2>/dev/null; then
        apt_install python3 python3-prometheus-client
    fi
}

need_mosquitto() {
    if [[ ! -x /usr/sbin/mosquitto && ! -x /usr/bin/mosquitto ]] && ! command -v mosquitto >/dev/null 2>&1; then
        apt_install mosquitto mosquitto-clients
    fi
    # The package starts a system broker on 1883; the tests never use it.
}

build_functions() {
    if can_install; then
        EDGEFN_INSTALL=1 EDGEFN_COMPONENTS=${EDGEFN_COMPONENTS:-required} bash "$root_dir/functions/build.sh"
    else
        EDGEFN_COMPONENTS=${EDGEFN_COMPONENTS:-required} bash "$root_dir/functions/build.sh"
    fi
}
