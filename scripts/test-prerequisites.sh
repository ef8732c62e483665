#!/usr/bin/env bash
# What `make test` needs besides the Python packages: PostgreSQL on 127.0.0.1:5432 (trust auth for user postgres),
# Redis on 127.0.0.1:6379, and headless Chromium with chromedriver for the web page's end-to-end test.
# Each is started or installed only when missing, so a second run does nothing. Debian/Ubuntu commands.
set -euo pipefail

as_root() {
  if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi
}

wait_for() {
  for _ in $(seq 30); do "$@" >/dev/null 2>&1 && return 0; sleep 1; done
  return 1
}

if ! pg_isready -h 127.0.0.1 -p 5432 -q; then
  echo "make test: starting PostgreSQL" >&2
  as_root pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql)" main start
  wait_for pg_isready -h 127.0.0.1 -p 5432 -q || { echo "make test: PostgreSQL did not start" >&2; exit 1; }
fi

if ! redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1; then
  echo "make test: starting Redis" >&2
  as_root redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" --appendonly no \
    --dir /var/lib/redis --logfile /var/log/redis/make-test.log
  wait_for redis-cli -h 127.0.0.1 -p 6379 ping || { echo "make test: Redis did not start" >&2; exit 1; }
fi

if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then
  echo "make test: installing chromium and chromium-driver (web page test)" >&2
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null
fi
