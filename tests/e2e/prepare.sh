#!/usr/bin/env bash
# Sourced by tests/e2e/run.sh and scripts/demo.sh from the repository root: installs what the bed
# needs (Debian: etcd, Dovecot, Postfix and msmtp when root, curl; helm, kubectl and pytest through
# scripts/tools.sh; the OAuth server's npm packages), builds kube-apiserver and
# kube-controller-manager 1.20.2 once per machine (cached), builds the operator and the kubectl
# plugin, and exports KUBE_BIN_DIR, OPERATOR_BIN and PLUGIN_BIN.
eval "$(scripts/tools.sh)"
KUBE_BIN_DIR=$(tests/e2e/build-kube.sh)
export KUBE_BIN_DIR

packages=(openssl curl etcd-server dovecot-core dovecot-imapd dovecot-pop3d)
# msmtp: the SMTP example's msmtprc is tried against Postfix.
[ "$(id -u)" = 0 ] && packages+=(postfix msmtp)
missing=()
for p in "${packages[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
if [ ${#missing[@]} -gt 0 ]; then
  echo "installing ${missing[*]}" >&2
  echo "postfix postfix/main_mailer_type select No configuration" | debconf-set-selections 2>/dev/null || true
  apt-get update -qq >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi

(cd tests/oauth-server && npm ci --no-audit --no-fund --loglevel=error)
cargo build --quiet --bin mail-oauth-operator --bin kubectl-mailoauth
export OPERATOR_BIN=${CARGO_TARGET_DIR:-$PWD/target}/debug/mail-oauth-operator
export PLUGIN_BIN=${CARGO_TARGET_DIR:-$PWD/target}/debug/kubectl-mailoauth
