#!/bin/sh
# What `make test` needs from the system, checked before anything is built, and installed where we may.
#   prometheus  Debian's Prometheus server and promtool (tests/test_prometheus_e2e.py runs the real server)
#   iproute2    `ip`, to bring up the loopback-only network namespace (scripts/loopback.sh), where one can be made
#   python3-venv  `python3 -m venv` (the Makefile builds .venv with it)
# As root with apt-get: installs the missing packages. Otherwise: one line with the command to run, exit 2.
set -eu
PYTHON=${PYTHON:-python3}
missing=""
if ! command -v prometheus >/dev/null 2>&1 || ! command -v promtool >/dev/null 2>&1; then
  missing="$missing prometheus"
fi
if unshare -n true 2>/dev/null && ! command -v ip >/dev/null 2>&1; then
  missing="$missing iproute2"
fi
if ! "$PYTHON" -c "import ensurepip, venv" >/dev/null 2>&1; then
  missing="$missing python3-venv"
fi
[ -z "$missing" ] && exit 0
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "make test: installing Debian packages:$missing" >&2
  if apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $missing >/dev/null; then
    exit 0
  fi
  echo "error: installing$missing with apt-get failed (see above)" >&2
  exit 2
fi
echo "error: make test needs Debian packages:$missing; run: sudo apt-get install -y$missing" >&2
exit 2
