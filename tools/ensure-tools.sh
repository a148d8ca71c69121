#!/usr/bin/env bash
# System tools the tests need, installed from the system's packages when missing:
#   redis-server, redis-benchmark  the tests start their own redis-server on loopback
#   redis-cli                      (never the system one); bench-budget runs redis-benchmark;
#                                  tests/redis_cluster.py runs `redis-cli --cluster create`
#   promtool                       tests/test_metrics.py lints a real /metrics scrape with
#                                  `promtool check metrics` (Debian/Ubuntu: promtool is taken out of
#                                  the prometheus package into .venv/bin, so no Prometheus server is
#                                  installed or started: on a systemd machine it would take :9090)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV_BIN=.venv/bin

missing() {
    local out=()
    if ! command -v redis-server >/dev/null || ! command -v redis-benchmark >/dev/null \
            || ! command -v redis-cli >/dev/null; then
        out+=(redis)
    fi
    command -v promtool >/dev/null || [ -x "$VENV_BIN/promtool" ] || out+=(promtool)
    echo "${out[@]}"
}

wanted=$(missing)
[ -z "$wanted" ] && exit 0

if command -v apt-get >/dev/null; then
    sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    $sudo apt-get update -qq
    for tool in $wanted; do
        case $tool in
            redis)
                DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends \
                    redis-server redis-tools ;;
            promtool)
                work=$(mktemp -d)
                (cd "$work" && apt-get download -qq prometheus && dpkg-deb -x prometheus_*.deb root)
                mkdir -p "$VENV_BIN"
                install -m 0755 "$work/root/usr/bin/promtool" "$VENV_BIN/promtool"
                rm -rf "$work" ;;
        esac
    done
elif command -v brew >/dev/null; then
    formulae=()
    for tool in $wanted; do
        case $tool in
            redis) formulae+=(redis) ;;
            promtool) formulae+=(prometheus) ;;
        esac
    done
    brew install "${formulae[@]}"
else
    echo "missing: $wanted. The tests need redis-server, redis-cli and redis-benchmark (Redis 6.2+)" \
         "and promtool (from Prometheus 2.x) on PATH: install them, then run make test again" >&2
    exit 1
fi

still=$(missing)
if [ -n "$still" ]; then
    echo "still missing after installing: $still (redis-server/redis-cli/redis-benchmark, promtool)" >&2
    exit 1
fi
