#!/usr/bin/env python3
"""A kubelet for the bed, for one Deployment: runs the pods of a Deployment the chart installed,
from the image scripts/image.sh built, the way a kubelet and its container runtime would, on
machines where no container runtime works (podman and crun cannot run containers here; see
docs/testing.md). Needs root (mount namespaces, chroot), umoci and kubectl.

    pod_runner.py run STATE_DIR --namespace NS --deployment NAME --image ARCHIVE

(started by `bed.py up STATE_DIR --image ARCHIVE`, stopped by SIGTERM from `bed.py down`):

1. reads the Deployment from the apiserver (not the chart's files) and its pod template;
2. checks that the container's image reference is the archive's: the reference, normalized as
   containerd normalizes it (docker.io/, library/, :latest), must be the name containerd imports
   the archive as (its io.containerd.image.name, docker.io/library/mail-oauth-operator:<tag>);
   `imagePullPolicy: Always` is refused (a kubelet would go to a registry; none is reachable);
3. for each replica: a Pod object on the Node `bed-node` (the template's labels and a
   pod-template-hash), a root filesystem of its own (`umoci unpack` of the archive, as
   scripts/check-image.sh does), a TokenRequest token of the pod's serviceAccountName with the
   cluster's CA and the namespace (the kubelet's projected ServiceAccount volume, at
   /var/run/secrets/kubernetes.io/serviceaccount/, renewed hourly), KUBERNETES_SERVICE_HOST and
   _PORT, the image's env then the container's (downward-API fieldRefs resolved, $(VAR)
   expanded), the image's entrypoint and the container's args (command and args as a runtime
   combines them with the image's ENTRYPOINT and CMD);
4. runs the container (`exec` below, a process of its own that becomes the container): mount and
   UTS namespaces of its own, the token, /etc/hosts, /etc/hostname, /etc/resolv.conf, /dev and
   /proc mounted as a runtime mounts them, the root read-only when readOnlyRootFilesystem, a
   chroot into the unpacked root, the security context's user and group (else the image's USER),
   an empty capability bounding set when capabilities drop ALL, no_new_privs when
   allowPrivilegeEscalation is false; runAsNonRoot refuses uid 0;
5. calls the readinessProbe and livenessProbe (httpGet) every periodSeconds, reports the phase,
   the Ready condition and containerStatuses (containerID `bed-chroot://<pid>`) in the Pod's
   status and the replicas in the Deployment's status (so `kubectl rollout status` works), and
   restarts a container that exits or fails its liveness probe failureThreshold times
   (restartCount, back-off from 10 s);
6. on SIGTERM: SIGTERM to each container, SIGKILL after terminationGracePeriodSeconds, then
   deletes its Pods.

What it does not do: a network namespace (the bed has no pod network): each containerPort gets a
free port on 127.0.0.1, and the env value or argument that binds it (`0.0.0.0:<containerPort>` or
`:<containerPort>`) is rewritten to that port, the one change to the container's configuration
(a port no value binds is refused); a PID namespace, cgroups (resources), seccomp, volumes other
than the ServiceAccount token (a pod with others is refused), service links.
"""
import argparse
import ctypes
import hashlib
import json
import os
import random
import re
import shutil
import signal
import string
import subprocess
import sys
import tarfile
import time
import urllib.error
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bed import Bed, CommandFailed, free_port, run  # noqa: E402

NODE = "bed-node"
TOKEN_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"
TOKEN_RENEWAL = 3600  # seconds; the token lasts 6 h
DEVICES = ("null", "zero", "full", "random", "urandom")


class PodError(Exception):
    """Something in the Deployment or the image a kubelet would refuse (or the bed cannot do)."""


# ---------- the image ----------
def normalize_reference(ref):
    """An image reference as containerd names it: docker.io/library/ for a bare name, :latest
    when it has neither tag nor digest."""
    name, digest = (ref.split("@", 1) + [None])[:2] if "@" in ref else (ref, None)
    tag = None
    colon = name.rfind(":")
    if colon > name.rfind("/"):
        name, tag = name[:colon], name[colon + 1:]
    first = name.split("/", 1)[0]
    if "/" not in name or not ("." in first or ":" in first or first == "localhost"):
        name = "docker.io/" + name
    if name.startswith("docker.io/") and name.count("/") == 1:
        name = "docker.io/library/" + name[len("docker.io/"):]
    if tag is None and digest is None:
        tag = "latest"
    return name + (f":{tag}" if tag else "") + (f"@{digest}" if digest else "")


def read_image(archive):
    """The archive's one manifest: (containerd name, tag, manifest digest, image config)."""
    with tarfile.open(archive) as tar:
        def blob(digest):
            algo, hexa = digest.split(":", 1)
            return json.load(tar.extractfile(f"blobs/{algo}/{hexa}"))
        index = json.load(tar.extractfile("index.json"))
        manifests = index.get("manifests", [])
        if len(manifests) != 1:
            raise PodError(f"{archive} holds {len(manifests)} images, not one")
        m = manifests[0]
        annotations = m.get("annotations", {})
        name, tag = annotations.get("io.containerd.image.name"), annotations.get("org.opencontainers.image.ref.name")
        if not name or not tag:
            raise PodError(f"{archive} names no image (io.containerd.image.name, org.opencontainers.image.ref.name)")
        config = blob(blob(m["digest"])["config"]["digest"]).get("config", {})
    return name, tag, m["digest"], config


def check_reference(container, archive_name, manifest_digest):
    ref = container.get("image", "")
    if container.get("imagePullPolicy") == "Always":
        raise PodError(f"imagePullPolicy Always: a kubelet would pull {ref} from a registry, and none is reachable")
    wanted = normalize_reference(ref)
    name, _, digest = wanted.partition("@")
    if digest and digest != manifest_digest:
        raise PodError(f"the Deployment's image {ref} is pinned to {digest}, the archive is {manifest_digest}")
    if name != archive_name and not (digest and name.rsplit(":", 1)[0] == archive_name.rsplit(":", 1)[0]):
        raise PodError(f"the Deployment runs {ref} ({wanted}), the archive is {archive_name}: "
                       "a node that imported the archive would not find that image")
    return wanted


def resolve_user(rootfs, image_user, pod_sc, container_sc):
    """(uid, gid, supplementary groups, home) as the runtime resolves them: runAsUser/runAsGroup
    (the container's over the pod's), else the image's USER (a name looked up in its /etc/passwd)."""
    passwd = {}
    passwd_file = Path(rootfs) / "etc" / "passwd"
    for line in passwd_file.read_text().splitlines() if passwd_file.exists() else []:
        f = line.split(":")
        if len(f) >= 7:
            passwd[f[0]] = (int(f[2]), int(f[3]), f[5])
    user, _, group = (image_user or "0").partition(":")
    if user.isdigit():
        uid = int(user)
        gid = next((g for u, g, _ in passwd.values() if u == uid), 0)
    elif user in passwd:
        uid, gid, _ = passwd[user]
    else:
        raise PodError(f"the image's user {user} is not in its /etc/passwd")
    if group:
        if not group.isdigit():
            raise PodError(f"the image's group {group} is not numeric")
        gid = int(group)

    def pick(key):
        return container_sc.get(key, pod_sc.get(key))
    if pick("runAsUser") is not None:
        uid = int(pick("runAsUser"))
        gid = next((g for u, g, _ in passwd.values() if u == uid), gid if pick("runAsGroup") is None else 0)
    if pick("runAsGroup") is not None:
        gid = int(pick("runAsGroup"))
    if pick("runAsNonRoot") and uid == 0:
        raise PodError("runAsNonRoot, and the container would run as uid 0")
    groups = [gid, *[int(g) for g in pod_sc.get("supplementalGroups", [])]]
    if pod_sc.get("fsGroup") is not None:
        groups.append(int(pod_sc["fsGroup"]))
    home = next((h for u, _, h in passwd.values() if u == uid), "/")
    return uid, gid, sorted(set(groups)), home


# ---------- the container's configuration ----------
def expand(text, env):
    """Kubernetes' $(VAR) expansion: a defined variable is replaced, $$ is a literal $, anything
    else is left as written."""
    return re.sub(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)",
                  lambda m: "$" if m.group(0) == "$$" else env.get(m.group(1), m.group(0)), text)


def field_value(path, pod):
    meta, spec, status = pod["metadata"], pod["spec"], pod.get("status", {})
    simple = {"metadata.name": meta["name"], "metadata.namespace": meta["namespace"],
              "metadata.uid": meta.get("uid", ""), "spec.nodeName": spec.get("nodeName", ""),
              "spec.serviceAccountName": spec.get("serviceAccountName", "default"),
              "status.podIP": "127.0.0.1", "status.hostIP": "127.0.0.1"}
    if path in simple:
        return simple[path]
    m = re.fullmatch(r"metadata\.(labels|annotations)\['([^']+)'\]", path)
    if m:
        return meta.get(m.group(1), {}).get(m.group(2), "")
    raise PodError(f"the runner cannot resolve the fieldRef {path}")


def container_config(pod, container, image_config):
    """(argv, env) as a runtime starts the container: command/args over the image's
    ENTRYPOINT/CMD, the image's env, then the container's."""
    env = {}
    for item in image_config.get("Env") or []:
        k, _, v = item.partition("=")
        env[k] = v
    if container.get("envFrom"):
        raise PodError(f"the runner cannot resolve envFrom: {container['envFrom']}")
    for e in container.get("env", []):
        if "valueFrom" in e:
            ref = e["valueFrom"].get("fieldRef")
            if not ref:
                raise PodError(f"the runner cannot resolve {e['name']}: {e['valueFrom']}")
            env[e["name"]] = field_value(ref["fieldPath"], pod)
        else:
            env[e["name"]] = expand(str(e.get("value", "")), env)
    if "command" in container:
        command, args = container["command"], container.get("args", [])
    else:
        command = image_config.get("Entrypoint") or []
        args = container["args"] if "args" in container else (image_config.get("Cmd") or [])
    argv = [expand(a, env) for a in [*command, *args]]
    if not argv:
        raise PodError("neither the container nor the image names a program to run")
    return argv, env


def map_ports(container, argv, env):
    """Each containerPort to a free port on 127.0.0.1, the value binding it rewritten: (argv,
    env, {containerPort: port, name: port})."""
    ports = {}
    for p in container.get("ports", []):
        cp = int(p["containerPort"])
        hp = free_port()
        pattern = re.compile(rf"^(0\.0\.0\.0|\[::\]|)(:{cp})$")
        hits = [k for k, v in env.items() if pattern.match(v)]
        argv = [f"127.0.0.1:{hp}" if pattern.match(a) else a for a in argv]
        if not hits and f"127.0.0.1:{hp}" not in argv:
            raise PodError(f"no env value or argument binds containerPort {cp} (0.0.0.0:{cp}); "
                           "the bed has no pod network to give it")
        for k in hits:
            env[k] = f"127.0.0.1:{hp}"
        ports[cp] = hp
        if p.get("name"):
            ports[p["name"]] = hp
    return argv, env, ports


def probe_url(probe, ports):
    get = (probe or {}).get("httpGet")
    if not get:
        if probe:
            raise PodError(f"the runner calls httpGet probes only: {probe}")
        return None
    port = get["port"]
    if port not in ports:
        raise PodError(f"the probe's port {port} is no containerPort")
    return f"http://127.0.0.1:{ports[port]}{get.get('path', '/')}"


def probe_ok(url, timeout):
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return 200 <= r.status < 400
    except urllib.error.HTTPError as e:
        return 200 <= e.code < 400
    except OSError:
        return False


# ---------- the container process ----------
CLONE_NEWNS, CLONE_NEWUTS = 0x00020000, 0x04000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 32, 4096, 16384, 1 << 18
PR_CAPBSET_DROP, PR_SET_NO_NEW_PRIVS = 24, 38


def exec_container(spec_path):
    """Becomes the container described by the JSON file `spec_path` (see Pod.spawn); never returns."""
    spec = json.loads(Path(spec_path).read_text())
    libc = ctypes.CDLL(None, use_errno=True)

    def check(rc, what):
        if rc != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"{what}: {os.strerror(err)}")

    def mount(src, target, fstype, flags, data=None):
        check(libc.mount(src and src.encode(), str(target).encode(), fstype and fstype.encode(),
                         ctypes.c_ulong(flags), data and data.encode()), f"mount {target}")
    root = Path(spec["rootfs"])
    check(libc.unshare(CLONE_NEWNS | CLONE_NEWUTS), "unshare")
    mount(None, "/", None, MS_REC | MS_PRIVATE)
    mount(str(root), root, None, MS_BIND | MS_REC)
    for src, dst in spec["mounts"]:  # read-only bind mounts, as the kubelet mounts these
        target = root / dst.lstrip("/")
        if Path(src).is_dir():
            target.mkdir(parents=True, exist_ok=True)
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            target.touch(exist_ok=True)
        mount(src, target, None, MS_BIND)
        mount(None, target, None, MS_REMOUNT | MS_BIND | MS_RDONLY)
    dev = root / "dev"
    dev.mkdir(exist_ok=True)
    mount("tmpfs", dev, "tmpfs", MS_NOSUID | MS_NOEXEC, "mode=755,size=64k")
    for name in DEVICES:
        (dev / name).touch()
        mount(f"/dev/{name}", dev / name, None, MS_BIND)
    (root / "proc").mkdir(exist_ok=True)
    mount("proc", root / "proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    hostname = spec["hostname"].encode()
    check(libc.sethostname(hostname, len(hostname)), "sethostname")
    if spec["read_only"]:
        mount(None, root, None, MS_REMOUNT | MS_BIND | MS_RDONLY)
    os.chroot(root)
    os.chdir(spec["workdir"] or "/")
    if spec["drop_all_caps"]:
        for cap in range(64):
            if libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) != 0 and ctypes.get_errno() == 22:  # EINVAL: past the last
                break
    os.setgroups(spec["groups"])
    os.setresgid(spec["gid"], spec["gid"], spec["gid"])
    os.setresuid(spec["uid"], spec["uid"], spec["uid"])
    if spec["no_new_privs"]:
        check(libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "no_new_privs")
    os.execve(spec["argv"][0], spec["argv"], spec["env"])


# ---------- the kubelet ----------
def log(*args):
    print(time.strftime("%H:%M:%S"), *args, flush=True)


class Pod:
    """One replica: its Pod object, root filesystem, token and container process."""

    def __init__(self, runner, name, pod_obj):
        self.runner, self.name, self.obj = runner, name, pod_obj
        self.dir = runner.pods_dir / name
        self.proc = None
        self.restarts = 0
        self.ready = False
        self.started_at = None
        self.next_start = 0.0
        self.backoff = 10
        self.failures = 0
        self.last_terminated = None
        self.next_readiness = self.next_liveness = 0.0
        self.token_written = 0.0
        self.reported = None

    def prepare(self):
        r = self.runner
        spec = self.obj["spec"]
        container = spec["containers"][0]
        bundle = self.dir / "bundle"
        run(["umoci", "unpack", "--image", f"{r.layout}:{r.tag}", str(bundle)])
        self.rootfs = bundle / "rootfs"
        sc = container.get("securityContext", {})
        self.uid, self.gid, self.groups, home = resolve_user(
            self.rootfs, r.image_config.get("User"), spec.get("securityContext", {}), sc)
        argv, env = container_config(self.obj, container, r.image_config)
        argv, env, self.ports = map_ports(container, argv, env)
        env.setdefault("HOME", home)
        env["HOSTNAME"] = self.name
        env["KUBERNETES_SERVICE_HOST"], env["KUBERNETES_SERVICE_PORT"] = r.api_host, str(r.api_port)
        self.readiness = container.get("readinessProbe") or {}
        self.liveness = container.get("livenessProbe") or {}
        self.readiness_url = probe_url(self.readiness, self.ports)
        self.liveness_url = probe_url(self.liveness, self.ports)
        files = self.dir / "etc"
        files.mkdir(parents=True)
        (files / "hosts").write_text(f"127.0.0.1\tlocalhost\n::1\tlocalhost\n127.0.0.1\t{self.name}\n")
        (files / "hostname").write_text(self.name + "\n")
        resolv = Path("/etc/resolv.conf")
        (files / "resolv.conf").write_bytes(resolv.read_bytes() if resolv.exists() else b"")
        mounts = [[str(files / n), f"/etc/{n}"] for n in ("hosts", "hostname", "resolv.conf")]
        self.token_dir = None
        if spec.get("automountServiceAccountToken", True):
            self.token_dir = self.dir / "serviceaccount"
            self.token_dir.mkdir(mode=0o755)
            (self.token_dir / "ca.crt").write_bytes(r.ca)
            (self.token_dir / "namespace").write_text(r.namespace)
            self.write_token()
            mounts.append([str(self.token_dir), TOKEN_DIR])
        if container.get("volumeMounts") or spec.get("volumes"):
            raise PodError("the runner mounts only the ServiceAccount token; the pod asks for volumes")
        self.exec_spec = {
            "rootfs": str(self.rootfs), "mounts": mounts, "hostname": self.name,
            "read_only": bool(sc.get("readOnlyRootFilesystem")),
            "drop_all_caps": "ALL" in (sc.get("capabilities") or {}).get("drop", []),
            "no_new_privs": sc.get("allowPrivilegeEscalation") is False,
            "uid": self.uid, "gid": self.gid, "groups": self.groups,
            "workdir": container.get("workingDir") or r.image_config.get("WorkingDir") or "/",
            "argv": argv, "env": env,
        }
        (self.dir / "container.json").write_text(json.dumps(self.exec_spec, indent=1))
        self.grace = int(spec.get("terminationGracePeriodSeconds", 30))

    def write_token(self):
        sa = self.obj["spec"].get("serviceAccountName", "default")
        token = self.runner.bed.kubectl("create", "token", sa, "-n", self.runner.namespace,
                                        "--duration=6h").stdout.strip()
        tmp = self.token_dir / ".token.new"
        tmp.write_text(token)
        tmp.chmod(0o644)  # as the kubelet's projected token without fsGroup
        tmp.rename(self.token_dir / "token")
        self.token_written = time.monotonic()

    def spawn(self):
        out = open(self.runner.state / f"{self.name}.log", "ab")
        self.proc = subprocess.Popen([sys.executable, "-I", __file__, "exec", str(self.dir / "container.json")],
                                     stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, env={})
        out.close()
        (self.dir / "container.pid").write_text(str(self.proc.pid))
        self.started_at = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        self.ready, self.failures = False, 0
        delay = (self.readiness.get("initialDelaySeconds", 0), self.liveness.get("initialDelaySeconds", 0))
        now = time.monotonic()
        self.next_readiness, self.next_liveness = now + delay[0], now + delay[1]
        log(f"{self.name}: started container pid {self.proc.pid} as {self.uid}:{self.gid} in {self.rootfs}")

    def stop(self, grace=None):
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=self.grace if grace is None else grace)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def tick(self, now):
        """One round of the kubelet's loop for this pod."""
        if self.token_dir and now - self.token_written > TOKEN_RENEWAL:
            self.write_token()
        if self.proc is None:
            if now >= self.next_start:
                self.spawn()
            return
        code = self.proc.poll()
        if code is not None:
            code = 128 - code if code < 0 else code  # killed by a signal: 128 + its number, as runtimes report it
            log(f"{self.name}: container exited {code}; restart in {self.backoff} s")
            self.last_terminated = {"exitCode": code, "reason": "Completed" if code == 0 else "Error",
                                    "startedAt": self.started_at,
                                    "finishedAt": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
            self.proc, self.ready = None, False
            self.restarts += 1
            self.next_start = now + self.backoff
            self.backoff = min(self.backoff * 2, 300)
            return
        if self.readiness_url and now >= self.next_readiness:
            self.ready = probe_ok(self.readiness_url, self.readiness.get("timeoutSeconds", 1))
            self.next_readiness = now + self.readiness.get("periodSeconds", 10)
        elif not self.readiness_url:
            self.ready = True
        if self.liveness_url and now >= self.next_liveness:
            self.next_liveness = now + self.liveness.get("periodSeconds", 10)
            if probe_ok(self.liveness_url, self.liveness.get("timeoutSeconds", 1)):
                self.failures = 0
            else:
                self.failures += 1
                if self.failures >= self.liveness.get("failureThreshold", 3):
                    log(f"{self.name}: liveness probe failed {self.failures} times; restarting")
                    self.stop()

    def status(self):
        running = self.proc is not None and self.proc.poll() is None
        cs = {"name": self.obj["spec"]["containers"][0]["name"], "image": self.obj["spec"]["containers"][0]["image"],
              "imageID": self.runner.image_id, "ready": self.ready, "started": running,
              "restartCount": self.restarts,
              "state": {"running": {"startedAt": self.started_at}} if running
              else {"waiting": {"reason": "CrashLoopBackOff" if self.restarts else "ContainerCreating"}}}
        if running:
            cs["containerID"] = f"bed-chroot://{self.proc.pid}"
        if self.last_terminated:
            cs["lastState"] = {"terminated": self.last_terminated}
        ready = "True" if self.ready else "False"
        return {"phase": "Running" if running or self.restarts else "Pending", "hostIP": "127.0.0.1",
                "podIP": "127.0.0.1", "startTime": self.started_at,
                "conditions": [{"type": "PodScheduled", "status": "True"},
                               {"type": "Initialized", "status": "True"},
                               {"type": "ContainersReady", "status": ready},
                               {"type": "Ready", "status": ready}],
                "containerStatuses": [cs]}

    def report(self):
        status = self.status()
        key = json.dumps(status, sort_keys=True)
        if key != self.reported:
            self.runner.bed.kubectl("patch", "pod", self.name, "-n", self.runner.namespace, "--subresource=status",
                                    "--type=merge", "-p", json.dumps({"status": status}))
            self.reported = key


class Runner:
    def __init__(self, state, namespace, deployment, archive):
        self.state = Path(state)
        self.namespace, self.deployment_name, self.archive = namespace, deployment, Path(archive).resolve()
        self.bed = Bed.load(self.state)
        self.pods_dir = self.state / "pods"
        self.pods = []
        self.stopping = False

    def setup(self):
        self.archive_name, self.tag, self.manifest_digest, self.image_config = read_image(self.archive)
        self.image_id = f"{self.archive_name}@{self.manifest_digest}"
        d = self.bed.kubectl_json("get", "deployment", self.deployment_name, "-n", self.namespace)
        self.deployment = d
        template = d["spec"]["template"]
        containers = template["spec"]["containers"]
        if len(containers) != 1 or template["spec"].get("initContainers"):
            raise PodError("the runner runs pods of one container and no init containers")
        ref = check_reference(containers[0], self.archive_name, self.manifest_digest)
        log(f"{self.namespace}/{self.deployment_name}: image {containers[0]['image']} is {ref}, "
            f"the archive {self.archive.name} ({self.manifest_digest[:19]})")
        if self.pods_dir.exists():
            shutil.rmtree(self.pods_dir)
        self.pods_dir.mkdir(mode=0o700)
        self.layout = self.pods_dir / "image"
        self.layout.mkdir()
        with tarfile.open(self.archive) as tar:
            tar.extractall(self.layout)
        # The apiserver, as a pod sees it through the kubernetes Service: host, port and CA.
        kubeconfig = json.loads((self.state / "admin.kubeconfig").read_text())
        cluster = kubeconfig["clusters"][0]["cluster"]
        host_port = cluster["server"].split("://", 1)[1].rstrip("/")
        self.api_host, _, port = host_port.rpartition(":")
        self.api_port = int(port)
        self.ca = Path(cluster["certificate-authority"]).read_bytes()
        self.bed.kubectl("apply", "-f", "-", input=json.dumps(
            {"apiVersion": "v1", "kind": "Node", "metadata": {"name": NODE, "labels": {"kubernetes.io/hostname": NODE}}}))
        template_hash = hashlib.sha256(json.dumps(template, sort_keys=True).encode()).hexdigest()[:10]
        for _ in range(int(d["spec"].get("replicas", 1))):
            suffix = "".join(random.choices(string.ascii_lowercase + string.digits, k=5))
            name = f"{self.deployment_name}-{template_hash}-{suffix}"
            meta = {"name": name, "namespace": self.namespace,
                    "labels": {**template["metadata"].get("labels", {}), "pod-template-hash": template_hash},
                    "annotations": template["metadata"].get("annotations", {})}
            spec = dict(template["spec"], nodeName=NODE)
            obj = {"apiVersion": "v1", "kind": "Pod", "metadata": meta, "spec": spec}
            created = json.loads(self.bed.kubectl("create", "-f", "-", "-o", "json", input=json.dumps(obj)).stdout)
            pod = Pod(self, name, created)
            pod.prepare()
            self.pods.append(pod)
            pod.report()

    def report_deployment(self):
        ready = sum(1 for p in self.pods if p.ready)
        n = len(self.pods)
        status = {"observedGeneration": self.deployment["metadata"]["generation"], "replicas": n,
                  "updatedReplicas": n, "readyReplicas": ready, "availableReplicas": ready,
                  "unavailableReplicas": n - ready,
                  "conditions": [{"type": "Available", "status": "True" if ready == n else "False",
                                  "reason": "MinimumReplicasAvailable" if ready == n else "MinimumReplicasUnavailable"},
                                 {"type": "Progressing", "status": "True", "reason": "NewReplicaSetAvailable"}]}
        key = json.dumps(status, sort_keys=True)
        if key != getattr(self, "reported", None):
            self.bed.kubectl("patch", "deployment", self.deployment_name, "-n", self.namespace, "--subresource=status",
                             "--type=merge", "-p", json.dumps({"status": status}))
            self.reported = key

    def loop(self):
        while not self.stopping:
            now = time.monotonic()
            for pod in self.pods:
                try:
                    pod.tick(now)
                    pod.report()
                except CommandFailed as e:  # the apiserver unreachable for a moment: next round
                    log(f"{pod.name}: {e}")
            try:
                self.report_deployment()
            except CommandFailed as e:
                log(f"deployment status not reported: {e}")
            time.sleep(0.5)

    def shutdown(self):
        for pod in self.pods:
            if pod.proc is not None and pod.proc.poll() is None:
                pod.proc.send_signal(signal.SIGTERM)
        for pod in self.pods:
            pod.stop()
            log(f"{pod.name}: stopped")
        for pod in self.pods:
            run(["kubectl", "delete", "pod", pod.name, "-n", self.namespace, "--wait=false", "--request-timeout=5s"],
                env=self.bed.env, check=False)


def main(argv):
    if len(argv) == 3 and argv[1] == "exec":
        exec_container(argv[2])
        return 1
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=["run"])
    parser.add_argument("state")
    parser.add_argument("--namespace", required=True)
    parser.add_argument("--deployment", required=True)
    parser.add_argument("--image", required=True)
    a = parser.parse_args(argv[1:])
    if os.geteuid() != 0:
        print("pod_runner: run as root (mount namespaces, chroot)", file=sys.stderr)
        return 1
    runner = Runner(a.state, a.namespace, a.deployment, a.image)

    def on_term(*_):
        runner.stopping = True
    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    try:
        runner.setup()
        runner.loop()
    except PodError as e:
        log(f"pod_runner: {e}")
        return 1
    finally:
        runner.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
