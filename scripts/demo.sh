#!/usr/bin/env bash
# Try mail-oauth-operator without a cluster, on a Debian machine (as root, or with sudo rights
# for apt-get the first time):
#   scripts/demo.sh        start a local kube-apiserver, OAuth server and IMAP server, build the
#                          image (scripts/image.sh, from the debug build of the operator), install
#                          the chart, run the chart's Deployment from that image
#                          (tests/e2e/pod_runner.py: the bed's kubelet), apply an example and show
#                          the result
#   scripts/demo.sh approve  approve the device code the demo's scanner binding shows, as the
#                          person at the verification page would
#   scripts/demo.sh status show the running demo's pods and bindings (starts nothing)
#   scripts/demo.sh down   stop everything it started
# Anything else is refused: only "up" (or no argument) starts a demo, replacing a running one.
# The first run builds kube-apiserver 1.20.2 from Debian's source package (about 6-7 minutes on
# 2 cores; cached afterwards); later runs are ready in well under a minute. The demo's files are
# in MAIL_OAUTH_OPERATOR_DEMO_DIR (default ~/.cache/mail-oauth-operator/demo). Needs root: the
# operator's pods run chrooted into the image's root, in mount namespaces of their own.
set -euo pipefail
cd "$(dirname "$0")/.."
cache=${MAIL_OAUTH_OPERATOR_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/mail-oauth-operator}
state=${MAIL_OAUTH_OPERATOR_DEMO_DIR:-$cache/demo}

usage() {
  echo "usage: scripts/demo.sh [up|status|approve|down]" >&2
  exit 2
}
[ $# -le 1 ] || usage
case "${1:-up}" in
  up | approve | status | down) ;;
  *) usage ;;
esac

if [ "${1:-up}" = status ]; then
  if [ ! -f "$state/kube-apiserver.pid" ]; then
    echo "no demo is running (start one with: scripts/demo.sh)"
    exit 1
  fi
  eval "$(scripts/tools.sh)"
  export KUBECONFIG=$state/admin.kubeconfig
  echo "\$ kubectl get pods -n mail-oauth-operator -o wide"
  kubectl get pods -n mail-oauth-operator -o wide
  echo
  echo "\$ kubectl get mbx -n demo -o wide"
  kubectl get mbx -n demo -o wide
  exit 0
fi

if [ "${1:-up}" = approve ]; then
  python3 - "$state" <<'PY'
import sys
sys.path.insert(0, "tests/e2e")
from bed import Bed

bed = Bed.load(sys.argv[1])
status = bed.kubectl_json("get", "mailboxbinding", "scanner", "-n", "demo").get("status") or {}
code = (status.get("authorization") or {}).get("userCode")
if not code:
    sys.exit(f"the scanner binding shows no code to approve (phase {status.get('phase')})")
bed.oauth("/test/device/approve", {"userCode": code, "accountId": "scanner@example.com"})
print(f"approved {code} as scanner@example.com")
PY
  exit 0
fi

if [ "${1:-up}" = down ]; then
  if [ -d "$state" ]; then python3 tests/e2e/bed.py down "$state"; fi
  echo "demo stopped"
  exit 0
fi

if [ "$(id -u)" != 0 ]; then
  echo "scripts/demo.sh: run it as root (it installs packages, and runs the operator's pods chrooted into the image)" >&2
  exit 1
fi
source tests/e2e/prepare.sh
if [ -d "$state" ]; then python3 tests/e2e/bed.py down "$state" >/dev/null 2>&1 || true; fi
rm -rf "$state"
mkdir -p "$state"
app_version=$(sed -n 's/^appVersion: *"\{0,1\}\([^"]*\)"\{0,1\} *$/\1/p' charts/mail-oauth-operator/Chart.yaml)
image=target/image/mail-oauth-operator-$app_version.tar
echo "\$ scripts/image.sh $OPERATOR_BIN"
scripts/image.sh "$OPERATOR_BIN" 2>"$state/image.log" || { cat "$state/image.log" >&2; exit 1; }
tail -1 "$state/image.log"
echo
echo "starting etcd, kube-apiserver, kube-controller-manager, the OAuth server and Dovecot;"
echo "installing the chart and running its Deployment from $image ..."
python3 tests/e2e/bed.py up "$state" --image "$image" >/dev/null
export KUBECONFIG=$state/admin.kubeconfig
echo "\$ kubectl -n mail-oauth-operator rollout status deployment/mail-oauth-operator"
kubectl -n mail-oauth-operator rollout status deployment/mail-oauth-operator --timeout=120s
echo "\$ kubectl get pods -n mail-oauth-operator -o wide"
kubectl get pods -n mail-oauth-operator -o wide
echo

python3 - "$state" <<'PY'
import sys
sys.path.insert(0, "tests/e2e")
from bed import Bed
from manifests import apply, binding, device_binding, provider, public_provider, secret

bed = Bed.load(sys.argv[1])
seed = bed.oauth("/test/seed", {"accountId": "helpdesk@example.com"})["refresh_token"]
bed.kubectl("create", "namespace", "demo")
apply(bed,
      secret("demo", "idp-client", {"client-secret": "mail-app-secret"}),
      secret("demo", "helpdesk-refresh-token", {"refresh_token": seed}),
      provider(bed, "demo", "idp", "mail-app", "idp-client"),
      binding("demo", "helpdesk", "idp", "helpdesk@example.com", "helpdesk-refresh-token",
              smtp="submission" in bed.ports))
bed.kubectl("wait", "--for=condition=Ready", "mailboxbinding/helpdesk", "-n", "demo", "--timeout=90s")
# A device-code binding (examples/device-code.yaml) with a public client: a person enters a code.
apply(bed, public_provider(bed, "demo", "idp-public", "mail-device"),
      device_binding(bed, "demo", "scanner", "idp-public", "scanner@example.com"))
PY

echo
echo "\$ kubectl get mbx -n demo -o wide"
kubectl get mbx -n demo -o wide
echo
echo "\$ kubectl get secret helpdesk-mail-token -n demo   (keys of the published Secret)"
kubectl get secret helpdesk-mail-token -n demo -o go-template='{{range $k, $v := .data}}{{$k}}{{"\n"}}{{end}}'
echo
echo "A second mailbox waits for a person (the device flow):"
for _ in $(seq 1 60); do
  code=$(kubectl get mbx scanner -n demo -o jsonpath='{.status.authorization.userCode}' 2>/dev/null || true)
  [ -n "$code" ] && break
  sleep 1
done
echo "\$ kubectl get mbx scanner -n demo -o wide"
kubectl get mbx scanner -n demo -o wide
uri=$(kubectl get mbx scanner -n demo -o jsonpath='{.status.authorization.verificationUri}')
cat <<EOT

Open $uri in a browser on this machine (its certificate is the demo's own CA:
$state/ca.crt), enter the code $code and confirm; or, from another terminal:
  scripts/demo.sh approve
Waiting up to 10 minutes for the binding to turn Ready ...
EOT
for _ in $(seq 1 600); do
  phase=$(kubectl get mbx scanner -n demo -o jsonpath='{.status.phase}' 2>/dev/null || true)
  [ "$phase" = Ready ] && break
  sleep 1
done
echo "\$ kubectl get mbx scanner -n demo -o wide"
kubectl get mbx scanner -n demo -o wide
cat <<EOT

The demo is running. To look around (kubectl and helm are the ones the demo installed):
  $(command -v kubectl)
  export PATH=$(dirname "$(command -v kubectl)"):\$PATH KUBECONFIG=$KUBECONFIG
  kubectl get mailoauth -A
  kubectl describe mbx helpdesk -n demo
The operator's pods run from the image's root ($state/pods/<pod>/bundle/rootfs), as uid 65532;
their logs: $state/mail-oauth-operator-*.log; the bed's kubelet: $state/pod-runner.log
Stop everything: scripts/demo.sh down
EOT
