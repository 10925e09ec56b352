#!/usr/bin/env bash
# Fuzzes the parsers that read what tenants, token endpoints and mail servers send (tests/fuzz: token, error
# and device responses and id_tokens, Go durations, the SASL value and template substitution,
# pasted authorization responses, mail server replies) with cargo-fuzz (libFuzzer, AddressSanitizer), each target for
# the given seconds (default 30), and prints the executions per target; a target that ran no input
# at all (0 executions, or no libFuzzer summary) fails the run. Installs cargo-fuzz when missing.
# The machine's stable toolchain builds the sanitizer flags cargo-fuzz passes when
# RUSTC_BOOTSTRAP=1 is set, as here.
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=${1:-30}
if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "installing cargo-fuzz" >&2
  cargo install --locked cargo-fuzz
fi
export RUSTC_BOOTSTRAP=1
total=0
for target in token_response go_duration publish authorization_response mail_reply; do
  log=$(mktemp)
  if ! cargo fuzz run --fuzz-dir tests/fuzz "$target" -- -max_total_time="$seconds" >"$log" 2>&1; then
    tail -40 "$log" >&2
    echo "fuzz target $target found a crash (see above)" >&2
    exit 1
  fi
  runs=$(grep -Eo 'Done [0-9]+ runs' "$log" | tail -1 | grep -Eo '[0-9]+' || echo 0)
  if [ "$runs" -eq 0 ]; then
    tail -40 "$log" >&2
    echo "fuzz $target: 0 executions in ${seconds}s: it fuzzed nothing (see above)" >&2
    exit 1
  fi
  total=$((total + runs))
  echo "fuzz $target: $runs executions in ${seconds}s, no crash"
  rm -f "$log"
done
echo "fuzz total: $total executions, no crash"
