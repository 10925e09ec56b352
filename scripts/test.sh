#!/usr/bin/env bash
# Runs every test on a fresh machine: installs what the tests need (Node.js and npm for the real
# OAuth server, its npm packages, cargo-nextest when missing), then the unit, scenario and
# integration tests, then the end-to-end suite on real parts (tests/e2e/run.sh: it installs and
# builds its own components). The tests start and stop the servers they use themselves.
# `scripts/test.sh --no-e2e` skips the end-to-end suite.
set -euo pipefail
cd "$(dirname "$0")/.."

need() { command -v "$1" >/dev/null 2>&1; }
if ! need node || ! need npm; then
  echo "installing Node.js and npm" >&2
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nodejs npm
fi
(cd tests/oauth-server && npm ci --no-audit --no-fund --loglevel=error)

if ! cargo nextest --version >/dev/null 2>&1; then
  echo "installing cargo-nextest" >&2
  cargo install --locked cargo-nextest
fi
e2e=1
if [ "${1:-}" = --no-e2e ]; then e2e=0; shift; fi
cargo nextest run --all-targets --no-fail-fast "$@"
if [ "$e2e" = 1 ]; then
  tests/e2e/run.sh
fi
