"""The README's "Try it without a cluster", run as a reader runs it (issue 17): the commands of
its first ```sh block, literally, from the repository's root. They must bring the image
(scripts/image.sh), the chart, the chart's Deployment running from that image (its pods run by
tests/e2e/pod_runner.py, the bed's kubelet: the unpacked image root, chrooted, as the image's
user) and Ready mailboxes; `approve` must bring the device-code mailbox to Ready, `status` show
it, and `down` stop everything.

The only thing the test adds to the commands is MAIL_OAUTH_OPERATOR_DEMO_DIR, a folder of its own
for the demo's files (so that a demo a person left running is not touched). Needs root (the
demo's pods run chrooted): it fails, never skips, without it."""
import base64
import hashlib
import imaplib
import json
import os
import re
import shutil
import subprocess
import tarfile
import tempfile
import time
from pathlib import Path

import pytest
from bed import ROOT, Bed, run, wait_for
from pod_runner import PodError, check_reference, map_ports, read_image, resolve_user

SECTION = "## Try it without a cluster"
APP_VERSION = re.search(r'^appVersion: *"?([^"\n]+)"?', (ROOT / "charts/mail-oauth-operator/Chart.yaml").read_text(),
                        re.M).group(1)
ARCHIVE = ROOT / "target" / "image" / f"mail-oauth-operator-{APP_VERSION}.tar"
ENTRYPOINT = "usr/local/bin/mail-oauth-operator"
UP_TIMEOUT = 900  # a first run builds the operator; kube-apiserver is built by prepare.sh before


def readme_commands():
    """The commands of the first ```sh block under the section, by their argument: {"up": line,
    "approve": line, ...}, each line as written (its comment included)."""
    text = (ROOT / "README.md").read_text()
    assert SECTION in text, f"README.md has no '{SECTION}' section"
    section = text.split(SECTION, 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```sh\n(.*?)```", section, re.S)
    assert block, f"no ```sh block under '{SECTION}'"
    commands = {}
    for line in block.group(1).splitlines():
        command = line.split("#", 1)[0].strip()
        if not command:
            continue
        words = command.split()
        assert words[0] == "scripts/demo.sh" and len(words) <= 2, f"README runs something else than the demo: {line}"
        commands[words[1] if len(words) == 2 else "up"] = line
    return commands


def sh(line, env, timeout=300, check=True):
    """One README line, as a reader's shell runs it, from the repository's root."""
    result = subprocess.run(["bash", "-c", line], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if check:
        assert result.returncode == 0, f"`{line}` exited {result.returncode}:\n{result.stdout}\n{result.stderr}"
    return result


class Demo:
    def __init__(self):
        self.commands = readme_commands()
        self.dir = Path(tempfile.mkdtemp(prefix="mail-oauth-e2e-quickstart-"))
        self.state = self.dir / "demo"
        self.env = dict(os.environ, MAIL_OAUTH_OPERATOR_DEMO_DIR=str(self.state))
        self.out = self.dir / "up.out"
        self.up = None
        self.container_pids = []

    def start(self):
        self.started = time.time()
        with open(self.out, "wb") as out:
            self.up = subprocess.Popen(["bash", "-c", self.commands["up"]], cwd=ROOT, env=self.env,
                                       stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)

    def output(self):
        return self.out.read_text(errors="replace")

    def bed(self):
        return Bed.load(self.state)

    def close(self, failed):
        if self.up and self.up.poll() is None:
            self.up.terminate()
            self.up.wait(timeout=30)
        if failed:
            print(f"\n----- the demo's output -----\n{self.output()}")
            if (self.state / "bed.json").exists():
                self.bed().dump_logs(40)
        if self.state.exists():
            run(["python3", str(ROOT / "tests/e2e/bed.py"), "down", str(self.state)], check=False)
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture(scope="module")
def demo(request):
    assert os.geteuid() == 0, "the demo runs the operator's pods chrooted into the image: run the suite as root"
    d = Demo()
    yield d
    d.close(request.session.testsfailed > 0)


def test_the_readme_gives_the_demo_its_four_commands():
    commands = readme_commands()
    assert list(commands) == ["up", "approve", "status", "down"], commands


def test_the_readme_demo_builds_the_image_and_runs_the_charts_deployment_from_it(demo):
    demo.start()
    wait_for("the demo waiting for the device code's approval",
             lambda: "Waiting up to 10 minutes" in demo.output() or demo.up.poll() is not None,
             timeout=UP_TIMEOUT, interval=1)
    assert demo.up.poll() is None, f"the demo ended early ({demo.up.returncode}):\n{demo.output()}"
    out = demo.output()
    # The image, written now by scripts/image.sh from the operator it built.
    assert ARCHIVE.exists() and ARCHIVE.stat().st_mtime >= demo.started, f"{ARCHIVE} was not built by the demo"
    assert "rollout" in out and "successfully rolled out" in out, out
    bed = demo.bed()
    deployment = bed.kubectl_json("get", "deployment", "mail-oauth-operator", "-n", "mail-oauth-operator")
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert container["image"] == f"mail-oauth-operator:{APP_VERSION}"
    replicas = deployment["spec"]["replicas"]
    assert deployment["status"]["readyReplicas"] == replicas, deployment["status"]
    pods = bed.kubectl_json("get", "pods", "-n", "mail-oauth-operator",
                            "-l", "app.kubernetes.io/name=mail-oauth-operator")["items"]
    assert len(pods) == replicas, [p["metadata"]["name"] for p in pods]

    # What the image's one layer holds at the entrypoint: the process must run that file.
    with tarfile.open(ARCHIVE) as tar:
        index = json.load(tar.extractfile("index.json"))
        manifest_digest = index["manifests"][0]["digest"]
        manifest = json.load(tar.extractfile("blobs/sha256/" + manifest_digest.split(":")[1]))
        [layer] = manifest["layers"]
        with tarfile.open(fileobj=tar.extractfile("blobs/sha256/" + layer["digest"].split(":")[1])) as rootfs:
            member = next(m for m in rootfs if m.name.lstrip("./") == ENTRYPOINT)
            image_binary = hashlib.sha256(rootfs.extractfile(member).read()).hexdigest()

    names = set()
    for pod in pods:
        name = pod["metadata"]["name"]
        names.add(name)
        status = pod["status"]
        assert status["phase"] == "Running", status
        assert {c["type"]: c["status"] for c in status["conditions"]}["Ready"] == "True", status
        [cs] = status["containerStatuses"]
        assert cs["imageID"].endswith(manifest_digest), cs
        pid = int(cs["containerID"].removeprefix("bed-chroot://"))
        demo.container_pids.append(pid)
        proc = Path(f"/proc/{pid}")
        # Its root is the image's root, unpacked for this pod, and it runs the image's binary.
        root = os.readlink(proc / "root")
        assert root == str(demo.state / "pods" / name / "bundle" / "rootfs"), root
        assert os.readlink(proc / "exe") == f"{root}/{ENTRYPOINT}"
        assert hashlib.sha256((proc / "exe").read_bytes()).hexdigest() == image_binary
        assert not (proc / "root/bin/sh").exists() and not (proc / "root/usr/bin").exists()
        # As the image's user (the chart's securityContext), without capabilities or a way to gain any.
        fields = dict(line.split(":\t", 1) for line in (proc / "status").read_text().splitlines() if ":\t" in line)
        assert fields["Uid"].split() == ["65532"] * 4, fields["Uid"]
        assert fields["Gid"].split() == ["65532"] * 4, fields["Gid"]
        assert fields["Groups"].split() == ["65532"], fields["Groups"]
        assert fields["NoNewPrivs"].strip() == "1"
        assert int(fields["CapBnd"], 16) == 0 and int(fields["CapEff"], 16) == 0, fields["CapBnd"]
        # The root read-only (readOnlyRootFilesystem), the ServiceAccount token mounted where
        # in-cluster clients read it, and no kubeconfig: the operator uses the in-cluster config.
        mounts = {line.split()[4]: line.split()[5] for line in (proc / "mountinfo").read_text().splitlines()}
        assert mounts["/"].split(",")[0] == "ro", mounts
        token_dir = proc / "root/var/run/secrets/kubernetes.io/serviceaccount"
        assert (token_dir / "namespace").read_text() == "mail-oauth-operator"
        assert (token_dir / "token").read_text().count(".") == 2
        environ = dict(e.split("=", 1) for e in (proc / "environ").read_bytes().decode().split("\0") if "=" in e)
        assert "KUBECONFIG" not in environ
        assert environ["KUBERNETES_SERVICE_HOST"] == "127.0.0.1" and environ["POD_NAME"] == name
        assert environ["LOG_FORMAT"] == "json" and environ["WATCH_NAMESPACES"] == ""
    # One of the pods leads, by its name (the downward API's POD_NAME).
    lease = bed.kubectl_json("get", "lease", "mail-oauth-operator", "-n", "mail-oauth-operator")
    assert lease["spec"]["holderIdentity"] in names, lease["spec"]


def test_the_runner_refuses_what_a_kubelet_would_not_run(demo):
    """The checks that make the pods above mean something: another image, a pull from a
    registry, root, a port the bed cannot give."""
    name, tag, digest, config = read_image(ARCHIVE)
    assert (name, tag) == (f"docker.io/library/mail-oauth-operator:{APP_VERSION}", APP_VERSION)
    ok = {"image": f"mail-oauth-operator:{APP_VERSION}", "imagePullPolicy": "IfNotPresent"}
    for image in (ok["image"], name, f"mail-oauth-operator@{digest}"):
        check_reference(dict(ok, image=image), name, digest)
    for bad, why in ((dict(ok, image="mail-oauth-operator"), "mail-oauth-operator:latest"),
                     (dict(ok, image=f"ghcr.io/example/mail-oauth-operator:{APP_VERSION}"), "ghcr.io"),
                     (dict(ok, image="mail-oauth-operator@sha256:" + "0" * 64), "pinned"),
                     (dict(ok, imagePullPolicy="Always"), "registry")):
        with pytest.raises(PodError, match=why):
            check_reference(bad, name, digest)
    rootfs = next((demo.state / "pods").glob("*/bundle/rootfs"))
    assert resolve_user(rootfs, config["User"], {}, {}) == (65532, 65532, [65532], "/home/nonroot")
    with pytest.raises(PodError, match="runAsNonRoot"):
        resolve_user(rootfs, config["User"], {"runAsNonRoot": True}, {"runAsUser": 0})
    with pytest.raises(PodError, match="containerPort 9090"):
        map_ports({"ports": [{"containerPort": 9090}]}, ["run"], {"LISTEN_ADDRESS": "0.0.0.0:8080"})


def test_a_container_that_dies_is_restarted_from_the_image(demo):
    """As a kubelet does (restartPolicy Always): the pod's status counts the restart and names the
    new process, which runs from the same image root."""
    bed = demo.bed()
    holder = bed.kubectl_json("get", "lease", "mail-oauth-operator", "-n", "mail-oauth-operator")["spec"]["holderIdentity"]
    pods = bed.kubectl_json("get", "pods", "-n", "mail-oauth-operator")["items"]
    # A follower: the leader keeps serving the demo's device-code binding meanwhile.
    pod = next(p for p in pods if p["metadata"]["name"] != holder)
    name = pod["metadata"]["name"]
    old = int(pod["status"]["containerStatuses"][0]["containerID"].removeprefix("bed-chroot://"))
    os.kill(old, 9)

    def restarted():
        status = bed.kubectl_json("get", "pod", name, "-n", "mail-oauth-operator")["status"]
        [cs] = status["containerStatuses"]
        return cs if cs["restartCount"] == 1 and cs["ready"] and cs["containerID"] != f"bed-chroot://{old}" else None
    cs = wait_for("the container restarted and ready", restarted, timeout=60, interval=1)
    assert cs["lastState"]["terminated"]["exitCode"] == 137, cs
    pid = int(cs["containerID"].removeprefix("bed-chroot://"))
    assert os.readlink(f"/proc/{pid}/root") == str(demo.state / "pods" / name / "bundle" / "rootfs")
    demo.container_pids = [p for p in demo.container_pids if p != old] + [pid]


def test_the_imported_mailbox_is_ready_and_its_secret_logs_in(demo):
    bed = demo.bed()
    binding = bed.kubectl_json("get", "mbx", "helpdesk", "-n", "demo")
    assert binding["status"]["phase"] == "Ready", binding["status"]
    secret = bed.kubectl_json("get", "secret", "helpdesk-mail-token", "-n", "demo")
    assert {"username", "access_token", "xoauth2"} <= set(secret["data"]), sorted(secret["data"])
    out = demo.output()
    for key in ("username", "access_token", "xoauth2"):
        assert re.search(rf"^{key}$", out, re.M), f"the demo did not show the Secret's key {key}"
    user = base64.b64decode(secret["data"]["username"]).decode()
    token = base64.b64decode(secret["data"]["access_token"]).decode()
    imap = imaplib.IMAP4("127.0.0.1", bed.ports["imap"], timeout=10)
    try:
        typ, _ = imap.authenticate("XOAUTH2", lambda _: f"user={user}\x01auth=Bearer {token}\x01\x01".encode())
        assert typ == "OK"
    finally:
        imap.logout()


def test_approve_brings_the_device_code_mailbox_to_ready_and_the_demo_ends(demo):
    bed = demo.bed()
    code = bed.kubectl_json("get", "mbx", "scanner", "-n", "demo")["status"]["authorization"]["userCode"]
    result = sh(demo.commands["approve"], demo.env, timeout=60)
    assert f"approved {code}" in result.stdout, result.stdout
    demo.up.wait(timeout=120)
    assert demo.up.returncode == 0, demo.output()
    assert bed.kubectl_json("get", "mbx", "scanner", "-n", "demo")["status"]["phase"] == "Ready"
    assert "The demo is running." in demo.output()


def test_status_shows_the_pods_and_both_mailboxes_ready(demo):
    out = sh(demo.commands["status"], demo.env, timeout=60).stdout
    pods = [line for line in out.splitlines() if line.startswith("mail-oauth-operator-")]
    assert pods and all(re.search(r"\b1/1\s+Running\b", line) for line in pods), out
    for name in ("helpdesk", "scanner"):
        assert re.search(rf"^{name}\s+True\s+\S+\s+\S+\s+Ready\b", out, re.M), out


def test_down_stops_everything(demo):
    pid_files = list(demo.state.glob("*.pid"))
    pids = [int(p.read_text()) for p in pid_files] + demo.container_pids
    assert len(pid_files) >= 6 and demo.container_pids, (pid_files, demo.container_pids)
    sh(demo.commands["down"], demo.env, timeout=120)

    def gone(pid):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        # A zombie is gone too: its parent (this test for none of them) has not reaped it.
        return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1].startswith("Z")
    left = [p for p in pids if not gone(p)]
    assert not left, f"still running after down: {left}"
    assert not list(demo.state.glob("*.pid"))
    status = sh(demo.commands["status"], demo.env, timeout=60, check=False)
    assert status.returncode == 1 and "no demo is running" in status.stdout, status
