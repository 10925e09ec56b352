#!/usr/bin/env bash
# The scale benchmark (tests/bench/bench.py): the operator against a bare loop, on the e2e bed's
# real kube-apiserver and a fast local token endpoint. Builds both in release mode (debug with
# BENCH_PROFILE=dev, as the CI smoke run does). Arguments go to bench.py, e.g.
#   scripts/bench.sh --sizes 1000,10000 --renewals 1000 --out docs/bench.json
#   scripts/bench.sh --sizes "" --verify 10000   (verification only: see docs/performance.md)
set -euo pipefail
cd "$(dirname "$0")/.."
eval "$(scripts/tools.sh)"
KUBE_BIN_DIR=$(tests/e2e/build-kube.sh)
export KUBE_BIN_DIR
dpkg -s openssl etcd-server >/dev/null 2>&1 || {
  apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq openssl etcd-server >/dev/null
}
profile=${BENCH_PROFILE:-release}
dir=$([ "$profile" = dev ] && echo debug || echo "$profile")
cargo build --quiet --profile "$profile" --bin mail-oauth-operator
loop=$(cargo bench --profile "$profile" --bench bare_loop --no-run --message-format=json 2>/dev/null |
  python3 -c 'import json,sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m["target"]["name"] == "bare_loop" and m.get("executable"):
        print(m["executable"])')
export OPERATOR_BIN=${CARGO_TARGET_DIR:-$PWD/target}/$dir/mail-oauth-operator
exec python3 tests/bench/bench.py --bare-loop "$loop" "$@"
