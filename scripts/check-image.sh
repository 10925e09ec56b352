#!/usr/bin/env bash
# Checks the image scripts/image.sh wrote, as the chart will use it, and fails loudly:
#
#   scripts/check-image.sh [ARCHIVE]     default target/image/mail-oauth-operator-<appVersion>.tar
#   scripts/check-image.sh --self-test   also breaks copies of the image (a shell added, the user
#                                        root, a wrong tag) and fails unless each is refused
#   scripts/check-image.sh --containerd  also imports the archive into a containerd of its own, as
#                                        `kind load image-archive` and `k3s ctr images import` do,
#                                        and fails unless it is mail-oauth-operator:<appVersion>
#
# From the oci-archive (what `kind load image-archive` or `skopeo copy` gets): its one tag is the
# chart's appVersion and containerd's name is mail-oauth-operator:<appVersion>; the config's user is
# not root (and exists in /etc/passwd); entrypoint and command are the chart's (IMAGE_ENTRYPOINT in
# tests/e2e/bed.py, args ["run"]); the labels name source, version and revision. Unpacked with
# umoci: no shell, no other program than the operator, no script. Then the binary runs from the
# unpacked root with `chroot --userspec=<the image's user>` (podman and crun cannot run containers
# on these machines, see docs; a chroot proves the image holds everything the binary needs, the
# dynamic loader and libraries included): `--version` gives the chart's version, and `run`
# against an unreachable API server answers /healthz 200 and /readyz 503, then stops on SIGTERM,
# having written nothing into its root (the chart mounts it read-only).
# Needs root (chroot), umoci, python3.
set -euo pipefail
cd "$(dirname "$0")/.."

name=mail-oauth-operator
chart=charts/$name/Chart.yaml
app_version=$(sed -n 's/^appVersion: *"\{0,1\}\([^"]*\)"\{0,1\} *$/\1/p' "$chart")
entrypoint=$(sed -n 's/^IMAGE_ENTRYPOINT = "\(.*\)"$/\1/p' tests/e2e/bed.py)
if [ -z "$app_version" ] || [ -z "$entrypoint" ]; then
  echo "check-image: no appVersion in $chart or IMAGE_ENTRYPOINT in tests/e2e/bed.py" >&2; exit 1
fi
grep -q "image: \"{{ .Values.image.repository }}:{{ default .Chart.AppVersion .Values.image.tag }}\"" \
  charts/$name/templates/deployment.yaml || { echo "check-image: the chart no longer pulls <repository>:<appVersion>" >&2; exit 1; }

self_test=0 with_containerd=0
while [ $# -gt 0 ]; do
  case "$1" in
    --self-test) self_test=1; shift ;;
    --containerd) with_containerd=1; shift ;;
    -*) echo "check-image: unknown option $1" >&2; exit 2 ;;
    *) break ;;
  esac
done
if [ "$with_containerd" = 1 ] && { ! command -v containerd >/dev/null || ! command -v ctr >/dev/null; }; then
  echo "check-image: --containerd needs containerd and ctr (Debian's containerd; scripts/tools.sh installs it)" >&2; exit 1
fi
archive=${1:-target/image/$name-$app_version.tar}
[ -f "$archive" ] || { echo "check-image: no image at $archive (scripts/image.sh BINARY writes it)" >&2; exit 1; }
chroot=$(command -v chroot) || { echo "check-image: no chroot (coreutils)" >&2; exit 1; }
[ "$(id -u)" = 0 ] || { echo "check-image: run as root (it chroots into the image's root)" >&2; exit 1; }

tmp=$(mktemp -d)
child=
cleanup() {
  if [ -n "$child" ]; then kill -KILL "$child" 2>/dev/null || true; fi
  if [ -n "${ctrd:-}" ]; then kill -TERM "$ctrd" 2>/dev/null || true; wait "$ctrd" 2>/dev/null || true; fi
  rm -rf "$tmp"
}
trap cleanup EXIT

# check ARCHIVE DIR: every check on one archive; prints "FAIL: ..." for each failure, returns 1 if any.
check() {
  local archive=$1 dir=$2 failures=0
  fail() { echo "check-image: FAIL: $*" >&2; failures=$((failures + 1)); }
  mkdir -p "$dir/layout"
  tar -xf "$archive" -C "$dir/layout"

  # The tag, the config and the labels, read from the layout's index, manifest and config.
  local facts
  if ! facts=$(python3 - "$dir/layout" "$app_version" "$entrypoint" "$name" <<'PY'
import json, os, sys
layout, version, entrypoint, name = sys.argv[1:]
def blob(digest):
    algo, hexa = digest.split(":", 1)
    return json.load(open(os.path.join(layout, "blobs", algo, hexa)))
index = json.load(open(os.path.join(layout, "index.json")))
problems = []
manifests = index.get("manifests", [])
tags = [m.get("annotations", {}).get("org.opencontainers.image.ref.name") for m in manifests]
if tags != [version]:
    problems.append(f"the image's tags are {tags}, not the chart's appVersion [{version!r}]")
names = [m.get("annotations", {}).get("io.containerd.image.name") for m in manifests]
if names != [f"docker.io/library/{name}:{version}"]:
    problems.append(f"containerd would import it as {names}, not {name}:{version} (the chart's default image)")
user = ""
if manifests:
    manifest = blob(manifests[0]["digest"])
    config = blob(manifest["config"]["digest"])
    c = config.get("config", {})
    user = c.get("User", "")
    uid = user.split(":")[0]
    if not uid or uid in ("0", "root"):
        problems.append(f"the image runs as {user or 'root (no User)'}: it must name a non-root user")
    if c.get("Entrypoint") != [entrypoint]:
        problems.append(f"entrypoint {c.get('Entrypoint')} is not the chart's {[entrypoint]}")
    if c.get("Cmd") != ["run"]:
        problems.append(f"command {c.get('Cmd')} is not ['run']")
    labels = c.get("Labels") or {}
    for key in ("source", "version", "revision"):
        if not labels.get(f"org.opencontainers.image.{key}"):
            problems.append(f"no org.opencontainers.image.{key} label")
    if labels.get("org.opencontainers.image.version", version) != version:
        problems.append(f"the version label {labels['org.opencontainers.image.version']} is not {version}")
    # Every layer a whole tar (other runtimes than containerd and umoci refuse a truncated one),
    # its names relative.
    import tarfile
    for layer in manifest.get("layers", []):
        algo, hexa = layer["digest"].split(":", 1)
        try:
            with tarfile.open(os.path.join(layout, "blobs", algo, hexa), "r:*") as tar:
                absolute = [m.name for m in tar if m.name.startswith("/")]
            if absolute:
                problems.append(f"layer {layer['digest'][:19]} has absolute names: {absolute[:3]}")
        except (tarfile.TarError, OSError, EOFError) as e:
            problems.append(f"layer {layer['digest'][:19]} is not a whole tar archive: {e}")
    print(f"config: user {user}, {config.get('os')}/{config.get('architecture')}, entrypoint {c.get('Entrypoint')} {c.get('Cmd')}, "
          f"revision {labels.get('org.opencontainers.image.revision')}", file=sys.stderr)
for p in problems:
    print("PROBLEM " + p)
print("USER " + user)
PY
  ); then fail "cannot read the image's index, manifest or config"; return 1; fi
  while IFS= read -r line; do
    case "$line" in "PROBLEM "*) fail "${line#PROBLEM }" ;; esac
  done <<<"$facts"
  local user tag
  user=$(sed -n 's/^USER //p' <<<"$facts")
  tag=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["manifests"][0]["annotations"]["org.opencontainers.image.ref.name"])' "$dir/layout/index.json" 2>/dev/null || true)
  [ -n "$tag" ] || { fail "no tag to unpack"; return 1; }

  # The root filesystem, as a runtime would unpack it.
  if ! umoci unpack --image "$dir/layout:$tag" "$dir/bundle" >/dev/null 2>"$dir/unpack.err"; then
    cat "$dir/unpack.err" >&2; fail "umoci cannot unpack $tag"; return 1
  fi
  local rootfs=$dir/bundle/rootfs
  local found
  found=$(cd "$rootfs" && find . \( -type f -o -type l \) \( -name sh -o -name bash -o -name dash -o -name ash \
    -o -name zsh -o -name ksh -o -name mksh -o -name csh -o -name tcsh -o -name fish -o -name busybox \
    -o -name toybox -o -name apt -o -name apt-get -o -name dpkg \) | sort)
  [ -z "$found" ] || fail "a shell or package manager in the image: $(paste -sd' ' <<<"$found")"
  found=$(cd "$rootfs" && find ./bin ./sbin ./usr/bin ./usr/sbin ./usr/local/bin ./usr/local/sbin \
    \( -type f -o -type l \) ! -path ".$entrypoint" 2>/dev/null | sort)
  [ -z "$found" ] || fail "programs besides the operator: $(paste -sd' ' <<<"$found")"
  found=$(cd "$rootfs" && find . -type f -perm /111 -exec sh -c 'head -c2 "$1" | grep -q "^#!" && echo "$1"' _ {} \; | sort)
  [ -z "$found" ] || fail "scripts (no interpreter can run them): $(paste -sd' ' <<<"$found")"
  [ -x "$rootfs$entrypoint" ] || { fail "no executable at $entrypoint"; return 1; }
  # Resolve the config's user as a runtime does: numeric, or a name in the image's /etc/passwd.
  local uid=${user%%:*} gid=${user#*:}
  [ "$gid" != "$user" ] || gid=
  if ! [[ "$uid" =~ ^[0-9]+$ ]]; then
    local entry
    entry=$(awk -F: -v u="$uid" '$1 == u { print $3 ":" $4 }' "$rootfs/etc/passwd" 2>/dev/null)
    [ -n "$entry" ] || { fail "user $uid is not in the image's /etc/passwd"; return 1; }
    uid=${entry%%:*}; gid=${gid:-${entry#*:}}
  fi
  [ "$uid" != 0 ] || fail "the image's user resolves to uid 0"
  awk -F: -v u="$uid" '$3 == u { ok = 1 } END { exit !ok }' "$rootfs/etc/passwd" 2>/dev/null \
    || fail "uid $uid has no /etc/passwd entry in the image"
  gid=${gid:-$uid}

  # The binary from the unpacked root, as the image's user: --version, then `run` without a cluster.
  local version
  if ! version=$(env -i "$chroot" --userspec="$uid:$gid" "$rootfs" "$entrypoint" --version 2>&1); then
    fail "$entrypoint --version failed in the image's root: $version"; return 1
  fi
  [ "$version" = "$name $app_version" ] || fail "--version says '$version', not '$name $app_version'"
  cat > "$rootfs/tmp/kubeconfig" <<'EOF'
apiVersion: v1
kind: Config
clusters:
- name: c
  cluster:
    server: https://127.0.0.1:1
    insecure-skip-tls-verify: true
users:
- name: u
  user:
    token: not-a-real-token
contexts:
- name: x
  context:
    cluster: c
    user: u
current-context: x
EOF
  chmod 0644 "$rootfs/tmp/kubeconfig"
  touch "$dir/before-run" && sleep 0.01
  local port
  port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  env -i KUBECONFIG=/tmp/kubeconfig RUST_LOG=info "$chroot" --userspec="$uid:$gid" "$rootfs" \
    "$entrypoint" run --listen-address "127.0.0.1:$port" --log-format json >"$dir/run.log" 2>&1 &
  child=$!
  status() { python3 - "$port" "$1" <<'PY'
import sys, urllib.request, urllib.error
try:
    print(urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}{sys.argv[2]}", timeout=2).status)
except urllib.error.HTTPError as e:
    print(e.code)
except Exception:
    print(0)
PY
  }
  local deadline=$((SECONDS + 20)) healthz=0 readyz
  while [ $SECONDS -lt $deadline ] && kill -0 "$child" 2>/dev/null; do
    healthz=$(status /healthz)
    [ "$healthz" != 200 ] || break
    sleep 0.2
  done
  if [ "$healthz" = 200 ]; then
    readyz=$(status /readyz)
    [ "$readyz" = 503 ] || fail "/readyz answered $readyz without an API server, not 503"
    kill -TERM "$child"
    deadline=$((SECONDS + 20))
    while kill -0 "$child" 2>/dev/null && [ $SECONDS -lt $deadline ]; do sleep 0.2; done
    if kill -0 "$child" 2>/dev/null; then fail "the operator did not stop within 20 s of SIGTERM"
    elif ! wait "$child"; then fail "the operator exited non-zero after SIGTERM"
    fi
  else
    fail "/healthz did not answer 200 within 20 s"
  fi
  kill -KILL "$child" 2>/dev/null || true
  wait "$child" 2>/dev/null || true
  child=
  grep -q 'shutdown signal received' "$dir/run.log" || fail "no 'shutdown signal received' in the operator's log"
  # The chart mounts the root read-only (readOnlyRootFilesystem): the operator must write nothing.
  found=$(cd "$rootfs" && find . -newer "$dir/before-run" ! -path ./tmp/kubeconfig | sort)
  [ -z "$found" ] || fail "the operator wrote into its root (read-only in the chart): $(paste -sd' ' <<<"$found")"
  if grep -q not-a-real-token "$dir/run.log"; then fail "the credential leaked into the log"; fi
  if [ "$failures" -gt 0 ]; then
    echo "check-image: the operator's log:" >&2; sed 's/^/  /' "$dir/run.log" | tail -20 >&2
    return 1
  fi
  echo "check-image: $archive: tag $tag, user $user ($uid:$gid), no shell, '$version', /healthz 200, /readyz 503, stopped on SIGTERM, wrote nothing (chroot)" >&2
}

# What `kind load image-archive` and `k3s ctr images import` do with the archive: a containerd of
# its own (sockets and content under $tmp) imports it; it must be the chart's default image.
ctrd=
containerd_import() {
  local dir=$tmp/containerd ref=docker.io/library/$name:$app_version
  mkdir -p "$dir"
  printf 'version = 2\nroot = "%s/root"\nstate = "%s/state"\n[grpc]\n  address = "%s/sock"\n' "$dir" "$dir" "$dir" > "$dir/config.toml"
  containerd --config "$dir/config.toml" >"$dir/log" 2>&1 &
  ctrd=$!
  local deadline=$((SECONDS + 20))
  until [ -S "$dir/sock" ] || [ $SECONDS -ge $deadline ]; do sleep 0.1; done
  local ok=1
  if ! ctr -a "$dir/sock" -n k8s.io images import --all-platforms --digests --snapshotter=native "$archive" >"$dir/import.log" 2>&1; then
    cat "$dir/import.log" "$dir/log" >&2
    echo "check-image: FAIL: containerd (as kind and k3s load an archive) cannot import $archive" >&2; ok=0
  elif ! ctr -a "$dir/sock" -n k8s.io images ls -q | grep -qxF "$ref"; then
    ctr -a "$dir/sock" -n k8s.io images ls -q >&2
    echo "check-image: FAIL: containerd imports $archive, but not as $ref (the chart's default image)" >&2; ok=0
  fi
  kill -TERM "$ctrd" 2>/dev/null || true; wait "$ctrd" 2>/dev/null || true; ctrd=
  [ "$ok" = 1 ] && echo "check-image: containerd imports it as $ref (kind load image-archive, ctr images import)" >&2
  [ "$ok" = 1 ]
}

started=$SECONDS
if ! check "$archive" "$tmp/good"; then
  echo "check-image: FAILED: $archive is not an image the chart can run" >&2
  exit 1
fi
if [ "$with_containerd" = 1 ] && ! containerd_import; then
  echo "check-image: FAILED: $archive does not load into a cluster's containerd as the chart's image" >&2
  exit 1
fi
echo "check-image: passed in $((SECONDS - started)) s" >&2
[ "$self_test" = 1 ] || exit 0

# The check refuses broken images: each copy breaks one thing, and must fail for that reason.
# broken DIR WHAT WANT: the layout in $tmp/DIR/layout has WHAT; pack it, check it, expect WANT.
broken() {
  local dir=$tmp/$1 what=$2 want=$3
  tar -C "$dir/layout" -cf "$dir.tar" oci-layout index.json blobs
  if check "$dir.tar" "$dir/check" 2>"$dir.err"; then
    cat "$dir.err" >&2
    echo "check-image: FAILED: an image with $what passed the check" >&2
    exit 1
  fi
  if ! grep -q "FAIL: .*$want" "$dir.err"; then
    cat "$dir.err" >&2
    echo "check-image: FAILED: an image with $what failed, but not for '$want'" >&2
    exit 1
  fi
  echo "check-image: self-test: an image with $what is refused: $(grep -m1 "FAIL: .*$want" "$dir.err" | sed 's/^check-image: //')" >&2
}
copy() { mkdir -p "$tmp/$1/layout" && tar -xf "$archive" -C "$tmp/$1/layout"; }

copy shell
umoci unpack --image "$tmp/shell/layout:$app_version" "$tmp/shell/bundle" >/dev/null
mkdir -p "$tmp/shell/bundle/rootfs/bin" && cp "$(readlink -f /bin/sh)" "$tmp/shell/bundle/rootfs/bin/sh"
umoci repack --image "$tmp/shell/layout:$app_version" "$tmp/shell/bundle" >/dev/null
broken shell "/bin/sh added" "a shell or package manager in the image: ./bin/sh"

copy root
umoci config --image "$tmp/root/layout:$app_version" --config.user 0:0 >/dev/null
broken root "USER 0:0" "the image runs as 0:0"

copy tag
umoci tag --image "$tmp/tag/layout:$app_version" latest && umoci rm --image "$tmp/tag/layout:$app_version"
broken tag "the tag latest" "the image's tags are \['latest'\]"

echo "check-image: self-test passed in $((SECONDS - started)) s" >&2
