#!/usr/bin/env bash
# The relay benchmark (tests/bench/relay_bench.py): `mail-oauth-operator relay` in front of a fast
# local upstream (asyncio, no TLS, messages discarded) against the same upstream straight:
# messages and bytes per second, and the relay's memory per idle IMAP session. Builds the relay
# in release mode (debug with BENCH_PROFILE=dev). Arguments go to relay_bench.py, e.g.
#   scripts/relay-bench.sh --messages 4000 --sessions 1000 --out relay-bench.json
set -euo pipefail
cd "$(dirname "$0")/.."
profile=${BENCH_PROFILE:-release}
dir=$([ "$profile" = dev ] && echo debug || echo "$profile")
cargo build --quiet --profile "$profile" --bin mail-oauth-operator
exec python3 tests/bench/relay_bench.py --relay-bin "${CARGO_TARGET_DIR:-$PWD/target}/$dir/mail-oauth-operator" \
  --profile "$profile" "$@"
