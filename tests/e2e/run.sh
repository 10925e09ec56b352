#!/usr/bin/env bash
# The end-to-end suite on real parts. Installs what it needs (Debian: etcd, Dovecot, Postfix when
# root; helm, kubectl and pytest through scripts/tools.sh; the OAuth server's npm packages),
# builds kube-apiserver/kube-controller-manager 1.20.2 once per machine (cached), builds the
# operator, then runs tests/e2e/test_e2e.py. Component logs are printed when a test fails.
set -euo pipefail
cd "$(dirname "$0")/../.."
source tests/e2e/prepare.sh
exec python3 -m pytest tests/e2e -v -p no:cacheprovider -s --tb=short "$@"
