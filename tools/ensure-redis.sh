#!/usr/bin/env bash
# The tests start their own redis-server; install it from the system's packages when missing.
set -euo pipefail
if command -v redis-server >/dev/null && command -v redis-benchmark >/dev/null; then
    exit 0
fi
if command -v apt-get >/dev/null; then
    sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends redis-server redis-tools
elif command -v brew >/dev/null; then
    brew install redis
else
    echo "redis-server is needed by the tests: install Redis 6.2+ and put redis-server on PATH" >&2
    exit 1
fi
command -v redis-server >/dev/null
