#!/usr/bin/env python3
"""The end-to-end bed: real components on 127.0.0.1, started and stopped by this module.

- etcd 3.4 (Debian) and kube-apiserver + kube-controller-manager 1.20.2 (built by
  build-kube.sh from Debian's source package): RBAC, server-side apply, garbage collection,
  the TokenRequest API;
- the test OAuth server (tests/oauth-server, oidc-provider over TLS) with a plain-http
  introspection listener for Dovecot;
- Dovecot (IMAP and POP3 with XOAUTH2 and OAUTHBEARER through RFC 7662 introspection) and, when
  running as root, Postfix (submission with SASL through Dovecot);
- on request (`start_fake_mail`), a fake mail server (fake_mail.py) answering as Exchange Online or
  a hostile server would, with certificates of the bed's CA;
- the operator binary, run as a local process as the chart's Deployment runs it: the container's
  args and environment from `helm template` with the bed's values, the ServiceAccount it names
  (a TokenRequest token), its readiness probe's path and its termination grace period. Only the
  listen address (a free port on 127.0.0.1) is the bed's own; `POD_NAME` is the process's name.
  `bed.py up --image` (scripts/demo.sh) runs the installed Deployment's pods from the image
  instead, under pod_runner.py, the bed's kubelet.

Every process writes a log under the bed's folder; `Bed.dump_logs()` prints their tails.

Used by test_e2e.py (pytest) and by scripts/demo.sh:
    bed.py up STATE_DIR [--image ARCHIVE]
                            start everything, install the chart, run the operator; print env.
                            With --image (scripts/demo.sh): the chart's Deployment runs from the
                            image ARCHIVE (scripts/image.sh) under pod_runner.py, the bed's
                            kubelet, instead of the binary as a local process
    bed.py down STATE_DIR   stop what `up` started, and wait until it has stopped
"""
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "mail-oauth-operator"
OPERATOR_NAMESPACE = "mail-oauth-operator"
RELEASE = "mail-oauth-operator"
# The chart's values for the bed (`helm install` and the operator started from `helm template`),
# beside its defaults (two replicas with leader election; the bed runs one process unless a test
# starts more): the OAuth server, Dovecot and every endpoint of the tests listen on 127.0.0.1,
# which the operator refuses unless allowPrivateEndpoints.
BED_VALUES = ("--set", "allowPrivateEndpoints=true")
# The image's entrypoint (scripts/image.sh); the chart's `command`, if it ever sets one, must name it.
IMAGE_ENTRYPOINT = "/usr/local/bin/mail-oauth-operator"
IMAGE_CMD = ["run"]
# What a process gets from the bed's own environment (a container gets none of the shell's).
PASSED_ENV = ("PATH", "HOME", "TMPDIR", "LANG", "LLVM_PROFILE_FILE")


SERVICE_ACCOUNT = "mailer@e2e-project.iam.gserviceaccount.com"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(what, check, timeout=60.0, interval=0.2):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            value = check()
            if value:
                return value
        except Exception as e:  # noqa: BLE001 - any failure means "not yet"
            last = e
        time.sleep(interval)
    raise TimeoutError(f"{what} within {timeout:.0f}s (last error: {last})")


class CommandFailed(Exception):
    pass


def run(cmd, check=True, **kw):
    """Runs a command; a failure raises with its output, so that test reports say why."""
    kw.setdefault("capture_output", True)
    kw.setdefault("text", True)
    result = subprocess.run(cmd, **kw)
    if check and result.returncode != 0:
        raise CommandFailed(f"{' '.join(map(str, cmd))} exited {result.returncode}:\n{result.stdout}{result.stderr}")
    return result


class Bed:
    def __init__(self, state_dir=None, fast_ttl=60, access_ttl=3600):
        self.dir = Path(state_dir or tempfile.mkdtemp(prefix="mail-oauth-e2e-"))
        self.issuer = self.server = None
        self.dir.mkdir(parents=True, exist_ok=True)
        self.dir.chmod(0o755)
        self.kube_bin = Path(os.environ.get("KUBE_BIN_DIR", "/nonexistent"))
        self.operator_bin = Path(os.environ.get("OPERATOR_BIN", ROOT / "target" / "debug" / "mail-oauth-operator"))
        self.fast_ttl = fast_ttl
        self.access_ttl = access_ttl
        self.procs = {}
        self.ports = {}
        self.root = os.geteuid() == 0
        self.env = dict(os.environ)
        self.chart_values = []  # what helm_install was given, beside BED_VALUES
        self.grace = {}  # each operator's terminationGracePeriodSeconds
        self.spawned = {}  # when each process started by start_operator was spawned (time.monotonic())

    # ---------- certificates ----------
    def openssl(self, *args):
        run(["openssl", *args], cwd=self.dir)

    def sign(self, name, subject, ext):
        """A key and a certificate signed by the bed's CA, with v3 extensions (rustls refuses v1)."""
        (self.dir / f"{name}.ext").write_text(ext)
        self.openssl("req", "-new", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key",
                     "-out", f"{name}.csr", "-subj", subject)
        self.openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
                     "-CAcreateserial", "-out", f"{name}.crt", "-days", "2", "-extfile", f"{name}.ext")

    def certificates(self):
        self.openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.crt",
                     "-days", "2", "-subj", "/CN=mail-oauth-operator e2e CA",
                     "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign")
        self.sign("apiserver", "/CN=kube-apiserver",
                  "subjectAltName=IP:127.0.0.1,DNS:localhost,DNS:kubernetes.default.svc\nextendedKeyUsage=serverAuth\n")
        self.sign("admin", "/CN=admin/O=system:masters", "extendedKeyUsage=clientAuth\n")
        self.sign("oauth", "/CN=127.0.0.1", "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n")
        self.openssl("genrsa", "-out", "sa.key", "2048")
        self.openssl("rsa", "-in", "sa.key", "-pubout", "-out", "sa.pub")
        # The OAuth server's private_key_jwt client (mail-cert), with an RSA certificate as Entra
        # wants, and a service account for the JWT bearer grant, with a key as Google issues them.
        self.openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "client.key", "-out", "client.crt",
                     "-days", "2", "-subj", "/CN=mail-cert")
        self.openssl("genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048", "-out", "gsa.key")
        self.openssl("pkey", "-in", "gsa.key", "-pubout", "-out", "gsa.pub")

    # ---------- processes ----------
    def start(self, name, cmd, env=None, cwd=None):
        log = open(self.dir / f"{name}.log", "ab")  # a restarted process appends to its log
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env or self.env, cwd=cwd,
                                start_new_session=True)
        self.procs[name] = proc
        (self.dir / f"{name}.pid").write_text(str(proc.pid))
        return proc

    def stop(self, name, timeout=20):
        proc = self.procs.pop(name, None)
        if proc is None or proc.poll() is not None:
            return proc.returncode if proc else None
        proc.send_signal(signal.SIGTERM)
        try:
            return proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            return proc.wait()

    def alive(self, name):
        proc = self.procs.get(name)
        if proc is None or proc.poll() is not None:
            raise RuntimeError(f"{name} exited; see {self.dir / (name + '.log')}")
        return True

    # ---------- components ----------
    def start_etcd(self):
        client, peer = free_port(), free_port()
        self.ports["etcd"] = client
        self.start("etcd", ["etcd", "--data-dir", str(self.dir / "etcd"), "--name", "e2e",
                            "--listen-client-urls", f"http://127.0.0.1:{client}",
                            "--advertise-client-urls", f"http://127.0.0.1:{client}",
                            "--listen-peer-urls", f"http://127.0.0.1:{peer}",
                            "--initial-advertise-peer-urls", f"http://127.0.0.1:{peer}",
                            "--initial-cluster", f"e2e=http://127.0.0.1:{peer}",
                            # The benchmark's 100,000 bindings and their Secrets outgrow the default 2 GiB.
                            "--quota-backend-bytes", str(8 * 2**30)])
        wait_for("etcd answers", lambda: self.alive("etcd") and urllib.request.urlopen(
            f"http://127.0.0.1:{client}/health", timeout=2).status == 200, timeout=30)

    def start_apiserver(self):
        port = free_port()
        self.ports["apiserver"] = port
        self.server = f"https://127.0.0.1:{port}"
        d = self.dir
        self.start("kube-apiserver", [
            str(self.kube_bin / "kube-apiserver"),
            f"--etcd-servers=http://127.0.0.1:{self.ports['etcd']}",
            "--insecure-port=0", f"--secure-port={port}", "--bind-address=127.0.0.1",
            "--advertise-address=127.0.0.1", "--endpoint-reconciler-type=none",
            f"--tls-cert-file={d}/apiserver.crt", f"--tls-private-key-file={d}/apiserver.key",
            f"--client-ca-file={d}/ca.crt",
            f"--service-account-key-file={d}/sa.pub", f"--service-account-signing-key-file={d}/sa.key",
            "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
            "--authorization-mode=RBAC", "--service-cluster-ip-range=10.0.0.0/24",
            "--disable-admission-plugins=ServiceAccount",
            # There is no kubelet; test_plugin.py's stand-in for one (kubelet.py) serves with the
            # bed's CA, as the apiserver must verify a kubelet it proxies a port-forward to.
            f"--kubelet-certificate-authority={d}/ca.crt",
        ])
        self.write_kubeconfig(self.dir / "admin.kubeconfig", user={
            "client-certificate": str(d / "admin.crt"), "client-key": str(d / "admin.key")})
        self.env["KUBECONFIG"] = str(self.dir / "admin.kubeconfig")
        wait_for("kube-apiserver ready", lambda: self.alive("kube-apiserver") and
                 self.kubectl("get", "--raw", "/readyz", check=False).returncode == 0, timeout=90, interval=0.5)

    def start_controller_manager(self):
        d = self.dir
        self.start("kube-controller-manager", [
            str(self.kube_bin / "kube-controller-manager"),
            f"--kubeconfig={d}/admin.kubeconfig",
            "--controllers=garbagecollector,namespace,serviceaccount,serviceaccount-token",
            f"--service-account-private-key-file={d}/sa.key", f"--root-ca-file={d}/ca.crt",
            "--leader-elect=false", "--port=0", "--secure-port=0",
        ])
        wait_for("default ServiceAccount", lambda: self.alive("kube-controller-manager") and
                 self.kubectl("get", "serviceaccount", "default", check=False).returncode == 0, timeout=60)

    def write_kubeconfig(self, path, user, server=None):
        config = {
            "apiVersion": "v1", "kind": "Config",
            "clusters": [{"name": "e2e", "cluster": {"server": server or self.server,
                                                     "certificate-authority": str(self.dir / "ca.crt")}}],
            "users": [{"name": "u", "user": user}],
            "contexts": [{"name": "e2e", "context": {"cluster": "e2e", "user": "u"}}],
            "current-context": "e2e",
        }
        Path(path).write_text(json.dumps(config))

    def start_oauth(self):
        introspection = free_port()
        self.ports["introspection"] = introspection
        env = dict(self.env, TLS_CERT=str(self.dir / "oauth.crt"), TLS_KEY=str(self.dir / "oauth.key"),
                   PORT="0", INTROSPECTION_PORT=str(introspection),
                   ACCESS_TOKEN_TTL=str(self.access_ttl), FAST_ACCESS_TOKEN_TTL=str(self.fast_ttl),
                   DEFAULT_ACCOUNT="scanner@example.com", CLIENT_CERT_FILE=str(self.dir / "client.crt"),
                   SERVICE_ACCOUNT_PUBLIC_KEY_FILE=str(self.dir / "gsa.pub"), SERVICE_ACCOUNT_EMAIL=SERVICE_ACCOUNT,
                   APP_TOKEN_EMAIL="app@example.com")
        self.start("oauth-server", ["node", str(ROOT / "tests" / "oauth-server" / "server.mjs")], env=env)
        def announcement():
            # oidc-provider prints warnings first; the JSON line comes once it is listening.
            self.alive("oauth-server")
            for line in (self.dir / "oauth-server.log").read_text(errors="replace").splitlines():
                if line.startswith("{") and '"issuer"' in line:
                    return json.loads(line)
            return None

        self.issuer = wait_for("OAuth server announced itself", announcement, timeout=30)["issuer"]
        self.oauth_ctx = ssl.create_default_context(cafile=str(self.dir / "ca.crt"))

    def oauth(self, path, body=None):
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.issuer + path, data=data,
                                     headers={"content-type": "application/json"} if data else {})
        with urllib.request.urlopen(req, context=self.oauth_ctx, timeout=10) as r:
            return json.loads(r.read())

    def start_dovecot(self):
        d = self.dir / "dovecot"
        if d.exists():
            shutil.rmtree(d)
        (d / "run").mkdir(parents=True)
        (d / "mail").mkdir()
        port, pop3_port = free_port(), free_port()
        self.ports["imap"] = port
        self.ports["pop3"] = pop3_port
        auth_port = free_port()
        self.ports["dovecot-auth"] = auth_port
        if self.root:
            users = "default_internal_user = dovecot\ndefault_login_user = dovenull\nfirst_valid_uid = 100\n"
            mail_user = "uid=dovecot gid=dovecot"
            shutil.chown(d / "mail", "dovecot", "dovecot")
        else:
            me = os.environ.get("USER") or subprocess.check_output(["id", "-un"], text=True).strip()
            users = f"default_internal_user = {me}\ndefault_login_user = {me}\n"
            mail_user = f"uid={os.getuid()} gid={os.getgid()}"
        (d / "oauth2.conf.ext").write_text(
            "introspection_mode = post\n"
            f"introspection_url = http://introspector:introspector-secret@127.0.0.1:{self.ports['introspection']}/token/introspection\n"
            "force_introspection = yes\n"
            "username_attribute = email\n"
            "active_attribute = active\n"
            "active_value = true\n"
            "scope = mail\n")
        (d / "dovecot.conf").write_text(f"""
base_dir = {d}/run
state_dir = {d}/run
log_path = {self.dir}/dovecot.log
protocols = imap pop3
listen = 127.0.0.1
ssl = no
disable_plaintext_auth = no
auth_mechanisms = xoauth2 oauthbearer
auth_cache_size = 0
auth_verbose = yes
{users}
passdb {{
  driver = oauth2
  mechanisms = xoauth2 oauthbearer
  args = {d}/oauth2.conf.ext
}}
userdb {{
  driver = static
  args = {mail_user} home={d}/mail/%u
}}
mail_location = maildir:~/Maildir
service imap-login {{
  inet_listener imap {{
    address = 127.0.0.1
    port = {port}
  }}
  inet_listener imaps {{
    port = 0
  }}
}}
service pop3-login {{
  inet_listener pop3 {{
    address = 127.0.0.1
    port = {pop3_port}
  }}
  inet_listener pop3s {{
    port = 0
  }}
}}
service auth {{
  inet_listener {{
    address = 127.0.0.1
    port = {auth_port}
  }}
}}
service anvil {{
  unix_listener anvil-auth-penalty {{
    mode = 0
  }}
}}
""")
        self.start("dovecot", ["dovecot", "-F", "-c", str(d / "dovecot.conf")])
        wait_for("Dovecot IMAP greeting", lambda: self.alive("dovecot") and self.imap_greeting(), timeout=20)

    def imap_greeting(self):
        with socket.create_connection(("127.0.0.1", self.ports["imap"]), timeout=2) as s:
            return s.recv(200).startswith(b"* OK")

    def start_postfix(self):
        """Postfix submission on a high port, SASL through Dovecot's auth service. Root only."""
        d = self.dir / "postfix"
        if d.exists():
            shutil.rmtree(d)
        (d / "conf").mkdir(parents=True)
        port = free_port()
        self.ports["submission"] = port
        conf = d / "conf"
        queue = d / "queue"
        data = d / "data"
        for path in (queue, data):
            path.mkdir()
        shutil.chown(data, "postfix", "postfix")
        (conf / "main.cf").write_text(f"""
compatibility_level = 3.6
queue_directory = {queue}
data_directory = {data}
mail_owner = postfix
setgid_group = postdrop
myhostname = e2e.localhost
mydestination = e2e.localhost, localhost
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
maillog_file = {self.dir}/postfix.log
maillog_file_prefixes = {self.dir}
smtpd_sasl_type = dovecot
smtpd_sasl_path = inet:127.0.0.1:{self.ports['dovecot-auth']}
smtpd_sasl_auth_enable = yes
smtpd_tls_security_level = none
smtpd_relay_restrictions = permit_sasl_authenticated, reject
smtpd_recipient_restrictions = permit_sasl_authenticated, reject
alias_maps =
alias_database =
local_recipient_maps =
mailbox_size_limit = 0
""")
        master = Path("/etc/postfix/master.cf").read_text()
        master += (f"\n127.0.0.1:{port} inet n - n - - smtpd\n"
                   "  -o syslog_name=postfix/submission\n  -o smtpd_sasl_auth_enable=yes\n")
        (conf / "master.cf").write_text(master)
        run(["postfix", "-c", str(conf), "check"], check=False)
        result = run(["postfix", "-c", str(conf), "start"], check=False)
        if result.returncode != 0:
            # Postfix reports start-up errors to syslog only; its own check says more.
            check = run(["postfix", "-c", str(conf), "check"], check=False)
            raise RuntimeError(f"postfix start failed: {result.stdout}{result.stderr}{check.stdout}{check.stderr}")
        self.postfix_conf = conf
        wait_for("Postfix submission greeting", lambda: self.smtp_greeting(), timeout=30)

    def start_fake_mail(self):
        """The fake mail server (fake_mail.FakeMail), stopped by `down`. `self.mail_cert` is a
        certificate of the bed's CA for 127.0.0.1 and localhost, `self.elsewhere_cert` one for
        another host only (mail.elsewhere.test): (certificate, key) file pairs."""
        from fake_mail import FakeMail
        self.sign("elsewhere", "/CN=mail.elsewhere.test",
                  "subjectAltName=DNS:mail.elsewhere.test\nextendedKeyUsage=serverAuth\n")
        self.mail_cert = (self.dir / "oauth.crt", self.dir / "oauth.key")
        self.elsewhere_cert = (self.dir / "elsewhere.crt", self.dir / "elsewhere.key")
        self.fake_mail = FakeMail()
        return self.fake_mail

    def smtp_greeting(self):
        with socket.create_connection(("127.0.0.1", self.ports["submission"]), timeout=2) as s:
            return s.recv(200).startswith(b"220")

    def stop_postfix(self):
        if getattr(self, "postfix_conf", None):
            run(["postfix", "-c", str(self.postfix_conf), "stop"], check=False)
            self.postfix_conf = None

    # ---------- Kubernetes ----------
    def kubectl(self, *args, check=True, input=None):
        return run(["kubectl", *args], env=self.env, check=check, input=input)

    def kubectl_json(self, *args):
        return json.loads(self.kubectl(*args, "-o", "json").stdout)

    def helm(self, *args):
        helm_env = dict(self.env)
        for k in ("HELM_CACHE_HOME", "HELM_CONFIG_HOME", "HELM_DATA_HOME"):
            helm_env[k] = str(self.dir / "helm" / k.lower())
        return run(["helm", *args], env=helm_env)

    def helm_install(self, *values):
        """Installs the chart with the bed's values and `values`; the operator is later started
        from the same values."""
        self.chart_values = list(values)
        return self.helm("install", RELEASE, str(CHART), "--namespace", OPERATOR_NAMESPACE, "--create-namespace",
                         *BED_VALUES, *values)

    def chart_deployment(self, *values):
        """The chart's Deployment as `helm template` renders it for the bed's values, those given to
        helm_install, and `values` (later ones win)."""
        import yaml  # installed by scripts/tools.sh with pytest
        rendered = self.helm("template", RELEASE, str(CHART), "--namespace", OPERATOR_NAMESPACE, *BED_VALUES,
                             *self.chart_values, *values, "--show-only", "templates/deployment.yaml").stdout
        return next(d for d in yaml.safe_load_all(rendered) if d and d.get("kind") == "Deployment")

    def service_account_kubeconfig(self, service_account=RELEASE, path=None):
        """A kubeconfig holding a TokenRequest token of the chart's ServiceAccount (at `path`,
        else operator.kubeconfig)."""
        token = self.kubectl("create", "token", service_account, "-n", OPERATOR_NAMESPACE,
                             "--duration=6h").stdout.strip()
        path = path or self.dir / "operator.kubeconfig"
        self.write_kubeconfig(path, user={"token": token})
        path.chmod(0o600)
        return path

    def start_operator(self, *args, env_extra=None, wait=True, name="operator", kubeconfig=None, values=()):
        """Starts the operator as the chart's Deployment would run it (see chart_command), as the
        process `name` (its POD_NAME), with `args` after the container's args, `env_extra` over
        its environment, and chart `values` beside the bed's."""
        if name in self.procs and self.procs[name].poll() is None:
            # Left running by a test that failed before stopping it: never two processes of a name.
            self.stop_operator(name)
        deployment = self.chart_deployment(*values)
        pod = deployment["spec"]["template"]["spec"]
        port = free_port()
        self.ports[name] = port
        cmd, container_env, probe = chart_command(deployment, self.operator_bin, pod_name=name)
        env = {k: os.environ[k] for k in PASSED_ENV if k in os.environ}
        env.update(container_env)
        # In a pod, the in-cluster configuration: here a kubeconfig with the same ServiceAccount.
        env["KUBECONFIG"] = str(kubeconfig or self.service_account_kubeconfig(pod["serviceAccountName"]))
        # The one thing the bed sets itself: where /healthz, /readyz and /metrics are served.
        env["LISTEN_ADDRESS"] = f"127.0.0.1:{port}"
        env.update(env_extra or {})
        self.grace[name] = int(pod.get("terminationGracePeriodSeconds", 30))
        # Started alone with leader election, it acts once it leads (it takes the free Lease, or
        # its own from before a crash, at once): "started" means that.
        alone = not any(n.startswith("operator") and n != name and p.poll() is None for n, p in self.procs.items())
        # When the process was spawned (after the chart was rendered): the bench times from here.
        self.spawned[name] = time.monotonic()
        self.start(name, [*cmd, *args], env=env)
        if wait:
            wait_for(f"{name} {probe}", lambda: self.alive(name) and urllib.request.urlopen(
                f"http://127.0.0.1:{port}{probe}", timeout=2).status == 200, timeout=60)
            if alone and env.get("LEADER_ELECT") == "true":
                wait_for(f"{name} to lead", lambda: self.alive(name)
                         and self.metrics(name).get("mailoauth_leader") == 1, timeout=30)

    def stop_operator(self, name="operator"):
        """SIGTERM, then SIGKILL after the chart's terminationGracePeriodSeconds, as the kubelet
        does; the exit code."""
        return self.stop(name, timeout=self.grace.get(name, 30))

    def kill(self, name):
        """SIGKILL: no shutdown, no lease release."""
        proc = self.procs.pop(name)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()

    def metrics(self, name="operator"):
        """The operator's /metrics as {series: value} (series with their labels)."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.ports[name]}/metrics", timeout=10) as r:
            text = r.read().decode()
        series = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                key, _, value = line.rpartition(" ")
                series[key] = float(value)
        return series

    # ---------- saved state, for the demo ----------
    def save(self):
        (self.dir / "bed.json").write_text(json.dumps({"issuer": self.issuer, "ports": self.ports,
                                                       "server": self.server}))

    @classmethod
    def load(cls, state_dir):
        bed = cls(state_dir)
        saved = json.loads((bed.dir / "bed.json").read_text())
        bed.issuer, bed.ports, bed.server = saved["issuer"], saved["ports"], saved["server"]
        bed.env["KUBECONFIG"] = str(bed.dir / "admin.kubeconfig")
        bed.oauth_ctx = ssl.create_default_context(cafile=str(bed.dir / "ca.crt"))
        return bed

    # ---------- the whole bed ----------
    def up(self, postfix=None):
        started = time.monotonic()
        self.certificates()
        self.start_etcd()
        self.start_apiserver()
        self.start_controller_manager()
        self.start_oauth()
        self.start_dovecot()
        if postfix if postfix is not None else self.root:
            self.start_postfix()
        self.up_seconds = time.monotonic() - started
        return self

    def down(self):
        if getattr(self, "fake_mail", None):
            self.fake_mail.stop()
            self.fake_mail = None
        self.stop_postfix()
        for name in list(self.procs)[::-1]:
            self.stop(name)

    def dump_logs(self, lines=60):
        for log in sorted(self.dir.glob("*.log")):
            text = log.read_text(errors="replace").splitlines()
            print(f"\n----- {log.name} (last {lines} of {len(text)} lines) -----", file=sys.stderr)
            for line in text[-lines:]:
                print(line, file=sys.stderr)


def chart_command(deployment, operator_bin, pod_name, container_name="operator"):
    """The operator container's command line, environment and readiness probe path, from a
    rendered Deployment: the args (or the image's CMD), the env with each `valueFrom.fieldRef`
    resolved as the kubelet would for a pod named `pod_name` in the release namespace. Anything the
    bed cannot resolve (another `valueFrom`, `envFrom`, a `$(VAR)` reference, a command that is not
    the image's entrypoint) fails, so that a chart change the bed does not follow is noticed."""
    pod = deployment["spec"]["template"]["spec"]
    container = next(c for c in pod["containers"] if c["name"] == container_name)
    command = container.get("command") or [IMAGE_ENTRYPOINT]
    if command[0] != IMAGE_ENTRYPOINT:
        raise ValueError(f"the chart's command {command} is not the image's entrypoint {IMAGE_ENTRYPOINT}")
    # As the kubelet does: a command of the container's own replaces the image's CMD too.
    args = container.get("args", [] if "command" in container else IMAGE_CMD)
    args = [*command[1:], *args]
    if container.get("envFrom"):
        raise ValueError(f"the bed cannot resolve envFrom: {container['envFrom']}")
    fields = {"metadata.name": pod_name, "metadata.namespace": OPERATOR_NAMESPACE,
              "spec.serviceAccountName": pod.get("serviceAccountName", "default")}
    env = {}
    for e in container.get("env", []):
        if "valueFrom" in e:
            path = (e["valueFrom"].get("fieldRef") or {}).get("fieldPath")
            if path not in fields:
                raise ValueError(f"the bed cannot resolve {e['name']}: {e['valueFrom']}")
            env[e["name"]] = fields[path]
        else:
            env[e["name"]] = str(e.get("value", ""))
    for text in [*args, *env.values()]:
        if "$(" in text:
            raise ValueError(f"the bed does not expand $(VAR) references: {text}")
    probe = container["readinessProbe"]["httpGet"]["path"]
    return [str(operator_bin), *args], env, probe


def stop_saved(state, timeout=60):
    """SIGTERM to each process group `up` left running (its pid files), then waits for them
    (SIGKILL after `timeout` seconds)."""
    groups = []
    for pid_file in state.glob("*.pid"):
        try:
            pid = int(pid_file.read_text())
            os.killpg(pid, signal.SIGTERM)
            groups.append(pid)
        except (ProcessLookupError, ValueError, PermissionError):
            pass
        pid_file.unlink()
    conf = state / "postfix" / "conf"
    if conf.exists():
        run(["postfix", "-c", str(conf), "stop"], check=False)

    def alive(pid):
        try:
            os.killpg(pid, 0)
            return True
        except (ProcessLookupError, PermissionError):
            return False
    deadline = time.monotonic() + timeout
    while any(alive(p) for p in groups) and time.monotonic() < deadline:
        time.sleep(0.2)
    for pid in groups:
        if alive(pid):
            os.killpg(pid, signal.SIGKILL)


def main(argv):
    image = None
    if len(argv) == 5 and argv[1] == "up" and argv[3] == "--image":
        image = Path(argv[4]).resolve()
        argv = argv[:3]
    if len(argv) != 3 or argv[1] not in ("up", "down"):
        print(__doc__, file=sys.stderr)
        return 2
    state = Path(argv[2])
    if argv[1] == "down":
        stop_saved(state)
        return 0
    bed = Bed(state)
    try:
        bed.up(postfix=False)  # the demo shows IMAP; Postfix wants a folder its user can reach
        bed.helm_install()
        bed.save()
        if image:
            # The Deployment the chart installed, run from the image as a kubelet would run it.
            bed.start("pod-runner", [sys.executable, str(Path(__file__).resolve().parent / "pod_runner.py"), "run",
                                     str(state), "--namespace", OPERATOR_NAMESPACE, "--deployment", RELEASE,
                                     "--image", str(image)])
            wait_for("the Deployment's pods ready", lambda: bed.alive("pod-runner") and bed.kubectl(
                "rollout", "status", f"deployment/{RELEASE}", "-n", OPERATOR_NAMESPACE, "--timeout=5s",
                check=False).returncode == 0, timeout=120, interval=1)
        else:
            bed.start_operator()
    except Exception:
        bed.dump_logs(30)
        bed.down()
        raise
    # Leave the processes running for the demo; `down` stops them by their pid files.
    bed.save()
    print(json.dumps({"kubeconfig": str(bed.dir / "admin.kubeconfig"), "issuer": bed.issuer,
                      "imap_port": bed.ports["imap"], "seconds": round(bed.up_seconds, 1)}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
