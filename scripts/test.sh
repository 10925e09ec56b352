#!/usr/bin/env bash
# Runs every test on a fresh machine: installs what the tests need (Node.js and npm for the real
# OAuth server, its npm packages, cargo-nextest, Dovecot and, as root, Postfix when missing), then the unit, scenario and
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
# tests/mail_servers.rs drives the relay with Python's smtplib, imaplib and poplib (standard
# library only) and with curl (imap, imaps, pop3, pop3s).
if ! need python3 || ! need curl; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3 curl
fi
(cd tests/oauth-server && npm ci --no-audit --no-fund --loglevel=error)

# tests/mail_servers.rs logs in at a real Dovecot (IMAP, POP3) and, as root, Postfix submission,
# where curl, msmtp and swaks send through the relay.
packages=(dovecot-core dovecot-imapd dovecot-pop3d)
[ "$(id -u)" = 0 ] && packages+=(postfix msmtp swaks)
missing=()
for p in "${packages[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
if [ ${#missing[@]} -gt 0 ]; then
  echo "installing ${missing[*]}" >&2
  echo "postfix postfix/main_mailer_type select No configuration" | debconf-set-selections 2>/dev/null || true
  apt-get update -qq >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi

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
