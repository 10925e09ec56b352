#!/usr/bin/env bash
# Builds kube-apiserver and kube-controller-manager 1.20.2 from Debian's `kubernetes` source
# package into a cache outside the checkout, once per machine, and prints the folder.
# Debian ships only kubectl from this source; the server binaries build offline from its vendor/
# tree in GOPATH mode with Go 1.19, after two fixes: the generated OpenAPI file the source
# package lacks (`make generated_files`), and Debian's reflect2 1.0.2 over the vendored 1.0.1,
# which segfaults under Go >= 1.18.
set -euo pipefail
version=1.20.2
cache=${MAIL_OAUTH_OPERATOR_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/mail-oauth-operator}
out=$cache/kube-$version
if [ -x "$out/kube-apiserver" ] && [ -x "$out/kube-controller-manager" ]; then
  echo "$out"
  exit 0
fi
log() { echo "build-kube: $*" >&2; }
started=$(date +%s)

# Source packages need a deb-src entry for the same suites as the machine's binary packages.
src_list=/etc/apt/sources.list.d/mail-oauth-operator-src.sources
if [ ! -f "$src_list" ]; then
  if [ -f /etc/apt/sources.list.d/debian.sources ]; then
    sed 's/^Types: deb$/Types: deb-src/' /etc/apt/sources.list.d/debian.sources > "$src_list"
  else
    grep -h '^deb ' /etc/apt/sources.list | sed 's/^deb /deb-src /' > "${src_list%.sources}.list"
  fi
fi
quiet() { local l; l=$(mktemp); "$@" >"$l" 2>&1 || { cat "$l" >&2; rm -f "$l"; return 1; }; rm -f "$l"; }
log "installing the build dependencies"
quiet apt-get update
quiet env DEBIAN_FRONTEND=noninteractive apt-get install -y golang-1.19-go rsync make dpkg-dev \
  golang-github-modern-go-reflect2-dev

work=$(mktemp -d "$cache/kube-build.XXXXXX")
trap 'rm -rf "$work"' EXIT
cd "$work"
log "fetching the kubernetes source package"
quiet apt-get source --download-only kubernetes
# Debian's version is "1.20.5+really1.20.2": the 1.20.2 tree.
tar -xzf kubernetes_*.orig.tar.gz
tree=$(find . -maxdepth 1 -mindepth 1 -type d | head -1)
cd "$tree"
rm -rf vendor/github.com/modern-go/reflect2
cp -r /usr/share/gocode/src/github.com/modern-go/reflect2 vendor/github.com/modern-go/reflect2
rm -f vendor/github.com/modern-go/reflect2/go.mod

export PATH=/usr/lib/go-1.19/bin:$PATH GOFLAGS=-mod=vendor GO111MODULE=off
log "generating files"
make generated_files >&2
log "building kube-apiserver and kube-controller-manager (about 6 minutes on 2 cores)"
make WHAT="cmd/kube-apiserver cmd/kube-controller-manager" >&2
mkdir -p "$out.partial"
cp _output/bin/kube-apiserver _output/bin/kube-controller-manager "$out.partial/"
rm -rf "$out" && mv "$out.partial" "$out"
log "built in $(( $(date +%s) - started ))s"
echo "$out"
