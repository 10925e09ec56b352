#!/usr/bin/env bash
# Builds the operator's container image from a binary, without a Docker daemon and without pulling
# anything from a container registry: the one recipe CI and a release use.
#
#   scripts/image.sh [--out DIR] BINARY
#
#   BINARY  the operator built for Linux, e.g. target/release/mail-oauth-operator (a release builds
#           with `cargo build --release --locked`; CI passes the debug build it already has, to stay
#           fast). The image gets a copy without debug info (strip --strip-debug).
#   --out   where to write (default target/image)
#
# The image is a distroless-style root assembled from Debian packages of the binary's architecture
# (`apt-get download` + `dpkg -x`: libc6, libgcc-s1, ca-certificates: what `ldd` shows the binary
# needs, plus the CA bundle), an /etc/passwd and /etc/group with the nonroot user (65532), no shell
# and no package manager; the binary at /usr/local/bin/mail-oauth-operator (the chart's entrypoint),
# `run` as its command, USER 65532:65532. It is assembled with umoci into an OCI layout and tagged
# with the chart's appVersion (charts/mail-oauth-operator/Chart.yaml), which is the tag the chart
# pulls by default. Written under --out:
#
#   oci/                               the OCI image layout (umoci/skopeo: oci:DIR/oci:<appVersion>)
#   mail-oauth-operator-<appVersion>.tar  the same as an oci-archive, named mail-oauth-operator:<appVersion>
#                                      for `kind load image-archive`, `ctr images import`, `docker load`
#                                      and `skopeo copy oci-archive:FILE docker://<registry>/...`
#
# Labels (OCI annotations): org.opencontainers.image.{source,version,revision,created,title,licenses}.
# IMAGE_SOURCE sets the source URL (default: the git remote when it is a URL); SOURCE_DATE_EPOCH the
# creation time (default: the commit's time), so that the same inputs give the same image.
# Needs: umoci, apt-get and dpkg-deb (Debian or Ubuntu), python3, tar; strip when present.
# Works as root or not (umoci --rootless); packages of another architecture than the machine's need
# `dpkg --add-architecture ARCH && apt-get update` first.
set -euo pipefail
cd "$(dirname "$0")/.."

usage() { sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }
out=target/image
while [ $# -gt 0 ]; do
  case "$1" in
    --out) out=${2:?--out needs a directory}; shift 2 ;;
    -h|--help) usage ;;
    -*) echo "unknown option $1" >&2; usage ;;
    *) break ;;
  esac
done
[ $# -eq 1 ] || usage
binary=$1
[ -f "$binary" ] || { echo "no binary at $binary" >&2; exit 1; }

name=mail-oauth-operator
entrypoint=/usr/local/bin/$name
chart=charts/$name/Chart.yaml
tag=$(sed -n 's/^appVersion: *"\{0,1\}\([^"]*\)"\{0,1\} *$/\1/p' "$chart")
[ -n "$tag" ] || { echo "no appVersion in $chart" >&2; exit 1; }
revision=$(git rev-parse HEAD 2>/dev/null || echo unknown)
source_url=${IMAGE_SOURCE:-$(git remote get-url origin 2>/dev/null || true)}
case "$source_url" in https://*) ;; *) source_url=unknown ;; esac
epoch=${SOURCE_DATE_EPOCH:-$(git log -1 --format=%ct 2>/dev/null || date +%s)}
created=$(date -u -d "@$epoch" +%Y-%m-%dT%H:%M:%SZ)

# The binary's architecture, from its ELF header (e_machine), in Debian's and OCI's spelling.
machine=$(od -An -tx1 -j18 -N2 "$binary" | tr -d ' \n')
case "$machine" in
  3e00) arch=amd64 ;;
  b700) arch=arm64 ;;
  *) echo "$binary: not an x86-64 or aarch64 ELF binary (e_machine $machine)" >&2; exit 1 ;;
esac
if [ "$arch" != "$(dpkg --print-architecture)" ] && ! dpkg --print-foreign-architectures | grep -qx "$arch"; then
  echo "$binary is $arch: run 'dpkg --add-architecture $arch && apt-get update' first" >&2
  exit 1
fi
for tool in umoci apt-get dpkg-deb python3 tar; do
  command -v "$tool" >/dev/null || { echo "missing: $tool (scripts/tools.sh installs umoci)" >&2; exit 1; }
done

packages=(libc6 libgcc-s1 ca-certificates)
work=$out/work
rm -rf "$work" "$out/oci" && mkdir -p "$work/debs" "$work/rootfs"
work=$(cd "$work" && pwd)
rootfs=$work/rootfs
echo "image: $name:$tag ($arch) from $binary" >&2

# 1. The Debian packages, at the versions the machine's apt knows (an `apt-get update` when the
#    lists are missing). Each package's control file goes into /var/lib/dpkg/status.d/ as in
#    distroless, so that SBOM tools and scanners see what the image holds.
download() { (cd "$work/debs" && apt-get download -q "${packages[@]/%/:$arch}") >&2; }
if ! download 2>"$work/apt.err"; then
  if [ "$(id -u)" = 0 ]; then
    apt-get update -qq >&2
    download
  else
    cat "$work/apt.err" >&2; exit 1
  fi
fi
mkdir -p "$rootfs/var/lib/dpkg/status.d"
for deb in "$work"/debs/*.deb; do
  pkg=$(dpkg-deb -f "$deb" Package)
  dpkg-deb -x "$deb" "$rootfs"
  dpkg-deb -f "$deb" > "$rootfs/var/lib/dpkg/status.d/$pkg"
  echo "  $pkg $(dpkg-deb -f "$deb" Version)" >&2
done

# 2. What a distroless root keeps of them: libraries, the CA bundle (update-ca-certificates would
#    build it in postinst; here it is the same concatenation), the licences. No programs: libc6's
#    and ca-certificates' scripts and helpers go (a shell script is useless without a shell).
rm -rf "${rootfs:?}"/usr/sbin "${rootfs:?}"/usr/bin "${rootfs:?}"/sbin "${rootfs:?}"/bin "$rootfs"/etc/ca-certificates \
  "$rootfs"/usr/share/lintian "$rootfs"/usr/share/man "$rootfs"/usr/share/info "$rootfs"/usr/libexec
find "$rootfs/usr/share/doc" -type f ! -name copyright -delete
# Packages of a merged-/usr release (Debian 13, recent Ubuntu) put the libraries and the dynamic
# loader under /usr only; the binary asks for /lib64/ld-linux-*.so.2 or /lib/ld-linux-*.so.1.
for dir in lib lib64; do
  if [ ! -e "$rootfs/$dir" ] && [ -d "$rootfs/usr/$dir" ]; then ln -s "usr/$dir" "$rootfs/$dir"; fi
done
mkdir -p "$rootfs/etc/ssl/certs"
find "$rootfs/usr/share/ca-certificates" -name '*.crt' | LC_ALL=C sort | xargs cat > "$rootfs/etc/ssl/certs/ca-certificates.crt"
printf 'root:x:0:0:root:/root:/sbin/nologin\nnobody:x:65534:65534:nobody:/nonexistent:/sbin/nologin\nnonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin\n' > "$rootfs/etc/passwd"
printf 'root:x:0:\nnobody:x:65534:\nnonroot:x:65532:\n' > "$rootfs/etc/group"
printf 'hosts: files dns\n' > "$rootfs/etc/nsswitch.conf"
[ -f /etc/os-release ] && cp -L /etc/os-release "$rootfs/etc/os-release"
mkdir -p "$rootfs/tmp" "$rootfs/root" "$rootfs/home/nonroot" "$rootfs/usr/local/bin"
chmod 1777 "$rootfs/tmp"; chmod 0700 "$rootfs/root" "$rootfs/home/nonroot"
if command -v strip >/dev/null && strip --strip-debug -o "$rootfs$entrypoint" "$binary" 2>/dev/null; then :; else
  cp "$binary" "$rootfs$entrypoint"
fi
chmod 0755 "$rootfs$entrypoint"
find "$rootfs" -exec touch -h -d "@$epoch" {} +

# 3. The image: one layer, the config (user, entrypoint, command, labels), tagged <appVersion>.
rootless=()
if [ "$(id -u)" = 0 ]; then
  chown -R 0:0 "$rootfs" && chown 65532:65532 "$rootfs/home/nonroot"
else
  rootless=(--rootless) # the files become root's in the image; /home/nonroot too (nothing writes there)
fi
image="$out/oci:$tag"
umoci init --layout "$out/oci"
umoci new --image "$image"
# unpack + repack, not `umoci insert`: umoci 0.4's insert writes a layer whose tar lacks its end
# (containerd and umoci read it, other runtimes refuse it).
umoci unpack "${rootless[@]}" --image "$image" "$work/bundle" >/dev/null
cp -a "$rootfs/." "$work/bundle/rootfs/"
umoci repack --image "$image" --history.created "$created" \
  --history.created_by "scripts/image.sh: Debian ${packages[*]} and $name" "$work/bundle"
labels=(
  "org.opencontainers.image.title=$name"
  "org.opencontainers.image.description=Kubernetes operator that obtains, refreshes and publishes OAuth 2.0 tokens for mailboxes"
  "org.opencontainers.image.source=$source_url"
  "org.opencontainers.image.version=$tag"
  "org.opencontainers.image.revision=$revision"
  "org.opencontainers.image.created=$created"
  "org.opencontainers.image.licenses=Apache-2.0"
)
config=(--architecture "$arch" --os linux --created "$created" --history.created "$created"
  --config.user 65532:65532 --config.entrypoint "$entrypoint" --config.cmd run --config.workingdir /
  --config.env PATH=/usr/local/bin:/usr/bin:/bin --config.env SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt
  --config.exposedports 8080/tcp)
for label in "${labels[@]}"; do config+=(--config.label "$label" --manifest.annotation "$label"); done
umoci config --image "$image" --clear config.env "${config[@]}"
umoci gc --layout "$out/oci"

# 4. The name runtimes import it as: containerd (kind, k3s, ctr) and docker read
#    io.containerd.image.name; OCI tools read the ref name (the tag).
python3 - "$out/oci/index.json" "docker.io/library/$name:$tag" <<'PY'
import json, sys
path, full = sys.argv[1], sys.argv[2]
index = json.load(open(path))
for m in index["manifests"]:
    m.setdefault("annotations", {})["io.containerd.image.name"] = full
json.dump(index, open(path, "w"), separators=(",", ":"))
PY
chmod -R a+rX "$out/oci"
archive=$out/$name-$tag.tar
tar --sort=name --mtime="@$epoch" --owner=0 --group=0 --numeric-owner -C "$out/oci" -cf "$archive" oci-layout index.json blobs
rm -rf "$work"
echo "image: $out/oci:$tag and $archive ($(du -h "$archive" | cut -f1), $name:$tag, $arch)" >&2
