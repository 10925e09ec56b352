"""The kubectl plugin (`kubectl mailoauth`, src/plugin) against the real apiserver: the chart's
CRDs, the operator as the chart's ServiceAccount with its authorization listener, the local OAuth
server as the identity provider and Dovecot checking the tokens.

The person is played as in test_consent.py: the OAuth server's test route approves a device code,
and a small browser follows the authorization code redirects. The bed runs the operator as a local
process, not a pod, so the plugin's own port-forward (to a pod, through the API server) has
nothing of its own to reach: the authorization code tests reach the operator's listener at its
own address, with `--callback-url`, at the link's address when something already listens there,
and through the apiserver's pods/portforward to kubelet.py's stand-in for a kubelet, which hands
the bytes to the operator process's listener.

The tests run in file order and share one bed."""
import base64
import json
import os
import subprocess
import threading
import time

import pytest
import yaml
from bed import ROOT, Bed, free_port, wait_for
from kubelet import PortForwardNode
from manifests import apply, device_binding, public_provider
from test_consent import browser, sign_in

NS = "plug"
PLUGIN = os.environ.get("PLUGIN_BIN", str(ROOT / "target" / "debug" / "kubectl-mailoauth"))
REPORT = {}


@pytest.fixture(scope="module")
def bed(request):
    b = Bed()
    try:
        b.up(postfix=False)
        b.helm_install()
        b.kubectl("create", "namespace", NS)
        port = free_port()
        b.callback = f"http://127.0.0.1:{port}"
        b.start_operator("--callback-address", f"127.0.0.1:{port}", "--public-url", b.callback)
        apply(b, public_provider(b, NS, "idp-public", "mail-device"))
    except BaseException:
        b.dump_logs()
        b.down()
        raise
    yield b
    if request.session.testsfailed:
        b.dump_logs(80)
    b.down()
    print("\nplugin report: " + json.dumps(REPORT, sort_keys=True))


def plugin(bed, *args, code=0, timeout=180, input=None):
    """Runs the plugin as a person would (the bed's admin kubeconfig in KUBECONFIG); checks its
    exit code; returns (stdout, stderr)."""
    result = subprocess.run([PLUGIN, *args], env=bed.env, capture_output=True, text=True, timeout=timeout,
                            input=input if input is not None else "")
    assert result.returncode == code, f"{args} exited {result.returncode}:\n{result.stdout}\n{result.stderr}"
    return result.stdout, result.stderr


class Running:
    """The plugin running in the background: its stdout read line by line as it comes."""

    def __init__(self, bed, *args, stdin=subprocess.DEVNULL):
        self.proc = subprocess.Popen([PLUGIN, *args], env=bed.env, stdin=stdin,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.lines, self.errors = [], []
        self.readers = [threading.Thread(target=self._read, args=(self.proc.stdout, self.lines), daemon=True),
                        threading.Thread(target=self._read, args=(self.proc.stderr, self.errors), daemon=True)]
        for r in self.readers:
            r.start()

    @staticmethod
    def _read(stream, into):
        for line in stream:
            into.append(line.rstrip("\n"))

    def line(self, what, match, timeout=60):
        return wait_for(what, lambda: next((l for l in self.lines if match(l)), None) or self._alive(), timeout=timeout)

    def _alive(self):
        if self.proc.poll() is not None:
            raise AssertionError(f"the plugin exited {self.proc.returncode}:\n" + "\n".join(self.lines + self.errors))
        return None

    def finish(self, timeout=60):
        code = self.proc.wait(timeout=timeout)
        for r in self.readers:
            r.join(timeout=5)
        return code, "\n".join(self.lines), "\n".join(self.errors)


def mbx(bed, name):
    return bed.kubectl_json("get", "mailboxbinding", name, "-n", NS)


def condition(obj, type_):
    return next((c for c in (obj.get("status") or {}).get("conditions", []) if c["type"] == type_), {})


def code_binding(name, mailbox):
    return {"apiVersion": "mailoauth.io/v1alpha1", "kind": "MailboxBinding",
            "metadata": {"name": name, "namespace": NS},
            "spec": {"providerRef": {"name": "idp-public"}, "mailbox": mailbox, "protocols": ["imap"],
                     "grant": {"authorizationCode": {}}, "secretName": f"{name}-mail-token"}}


def published(bed, name):
    s = bed.kubectl_json("get", "secret", f"{name}-mail-token", "-n", NS)
    return {k: base64.b64decode(v).decode() for k, v in s["data"].items()}


def test_the_krew_manifest_is_rendered_for_a_release_with_each_archives_sha256(tmp_path):
    """scripts/krew/render.py, as the release workflow's `plugin` job runs it (no bed needed)."""
    import hashlib
    import tarfile
    digests = {}
    for arch in ("amd64", "arm64"):
        binary = tmp_path / "kubectl-mailoauth"
        binary.write_bytes(f"plugin for {arch}".encode())
        archive = tmp_path / f"kubectl-mailoauth-linux-{arch}.tar.gz"
        with tarfile.open(archive, "w:gz") as t:
            t.add(binary, arcname="kubectl-mailoauth")
        digests[arch] = hashlib.sha256(archive.read_bytes()).hexdigest()
    version = yaml.safe_load((ROOT / "scripts" / "krew" / "mailoauth.yaml").read_text())["spec"]["version"][1:]
    render = [str(ROOT / "scripts" / "krew" / "render.py"), "acme/mail-oauth-operator", version, str(tmp_path)]
    out = subprocess.run(render, capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out
    doc = yaml.safe_load(out.stdout)
    assert doc["spec"]["homepage"] == "https://github.com/acme/mail-oauth-operator"
    for p in doc["spec"]["platforms"]:
        arch = p["selector"]["matchLabels"]["arch"]
        assert p["sha256"] == digests[arch]
        assert p["uri"] == f"https://github.com/acme/mail-oauth-operator/releases/download/v{version}/" \
                           f"kubectl-mailoauth-linux-{arch}.tar.gz"
    wrong = subprocess.run([*render[:2], "9.9.9", render[3]], capture_output=True, text=True, timeout=30)
    assert wrong.returncode == 1 and "the manifest's version is not v9.9.9" in wrong.stderr, wrong
    (tmp_path / "kubectl-mailoauth-linux-arm64.tar.gz").unlink()
    missing = subprocess.run(render, capture_output=True, text=True, timeout=30)
    assert missing.returncode == 1 and "kubectl-mailoauth-linux-arm64.tar.gz" in missing.stderr, missing


def test_kubectl_finds_the_plugin_on_its_path_and_it_says_its_version(bed, tmp_path):
    (tmp_path / "kubectl-mailoauth").symlink_to(PLUGIN)
    env = dict(bed.env, PATH=f"{tmp_path}:{bed.env['PATH']}")
    out = subprocess.run(["kubectl", "mailoauth", "version"], env=env, capture_output=True, text=True, timeout=30)
    assert out.returncode == 0 and out.stdout.startswith("kubectl-mailoauth 0.") and "mailoauth.io/v1alpha1" in out.stdout, out
    listed = subprocess.run(["kubectl", "plugin", "list"], env=env, capture_output=True, text=True, timeout=30)
    assert "kubectl-mailoauth" in listed.stdout, listed
    _, err = plugin(bed, "status", "-o", "xml", code=2)
    assert "invalid value 'xml'" in err, err


def test_check_reports_the_crds_and_the_running_operator_and_a_namespace_without_one(bed):
    out, _ = plugin(bed, "check")
    for crd in ("mailproviders", "clustermailproviders", "mailboxbindings"):
        assert f"ok   CRD {crd}.mailoauth.io installed, serves v1alpha1 (this plugin's schema)" in out, out
    # The bed runs the operator as a process: the Deployment has no pods (no scheduler, no
    # kubelet), and the leader Lease says an operator runs.
    assert "leader: operator (Lease mail-oauth-operator/mail-oauth-operator renewed" in out, out
    assert "warn Deployment mail-oauth-operator/mail-oauth-operator: 0/2 ready" in out, out
    assert "versions: plugin 0.1.0, operator 0.1.0" in out, out
    out, err = plugin(bed, "check", "--operator-namespace", "nowhere", code=1)
    assert "FAIL no operator is running in namespace nowhere" in out, out
    assert "error: 1 problem(s) found" in err, err


def test_authorize_shows_the_device_code_and_returns_once_the_person_approved_it(bed):
    apply(bed, device_binding(bed, NS, "scanner", "idp-public", "scanner@example.com"))
    started = time.monotonic()
    run = Running(bed, "authorize", "scanner", "-n", NS, "--no-browser", "--timeout", "3m")
    run.line("the verification URL", lambda l: l.strip() == f"{bed.issuer}/device")
    run.line("the code", lambda l: l == "and enter the code")
    code = run.lines[run.lines.index("and enter the code") + 1].strip()
    assert code == mbx(bed, "scanner")["status"]["authorization"]["userCode"]
    run.line("the expiry", lambda l: l.startswith("The code expires at "))
    time.sleep(2)
    assert run.proc.poll() is None, "the plugin waits for the person"
    bed.oauth("/test/device/approve", {"userCode": code, "accountId": "scanner@example.com"})
    status, out, err = run.finish(timeout=60)
    assert status == 0, out + err
    assert f"{NS}/scanner is Ready: authorized as scanner@example.com; the token expires at " in out, out
    assert condition(mbx(bed, "scanner"), "Ready")["reason"] == "TokenValid"
    REPORT["device code: apply to Ready through the plugin (s)"] = round(time.monotonic() - started, 1)
    # Ready already: nothing to do, said so.
    out, _ = plugin(bed, "authorize", "scanner", "-n", NS, "--no-browser")
    assert "is authorized and Ready" in out and "reauthorize scanner starts over" in out, out


def test_status_shows_every_binding_with_expiry_verification_and_the_fix(bed):
    apply(bed, dict(code_binding("orphan", "orphan@example.com"),
                    spec=dict(code_binding("orphan", "orphan@example.com")["spec"], providerRef={"name": "nobody"})))
    wait_for("orphan ProviderNotFound", lambda: condition(mbx(bed, "orphan"), "Ready").get("reason") == "ProviderNotFound",
             timeout=60)
    wait_for("scanner's mailbox checked", lambda: condition(mbx(bed, "scanner"), "MailboxVerified").get("reason") == "Verified",
             timeout=60)
    out, _ = plugin(bed, "status", "-n", NS)
    print("\n" + out)
    lines = out.splitlines()
    assert lines[0].split() == ["NAME", "MAILBOX", "PROVIDER", "GRANT", "READY", "REASON", "EXPIRES", "EXPIRES", "AT",
                                "VERIFIED", "FIX"]
    scanner = next(l for l in lines if l.startswith("scanner "))
    assert scanner.split()[:7] == ["scanner", "scanner@example.com", "idp-public", "deviceCode", "True", "TokenValid", "in"]
    assert "imap=Verified" in scanner and scanner.rstrip().endswith("-"), scanner
    orphan = next(l for l in lines if l.startswith("orphan "))
    assert "ProviderNotFound" in orphan and orphan.endswith("create the provider or fix spec.providerRef"), orphan
    assert mbx(bed, "scanner")["status"]["token"]["expiresAt"][:19] in scanner, scanner
    wide, _ = plugin(bed, "status", "-n", NS, "-o", "wide")
    assert wide.splitlines()[0].split()[-5:] == ["ACCOUNT", "SECRET", "VERIFIED", "MESSAGE", "FIX"], wide
    assert "scanner@example.com   scanner-mail-token" in wide, wide
    everywhere, _ = plugin(bed, "status", "-A")
    assert everywhere.splitlines()[0].startswith("NAMESPACE ") and f"\n{NS} " in everywhere, everywhere
    rows = json.loads(plugin(bed, "status", "-n", NS, "-o", "json")[0])
    by_name = {r["name"]: r for r in rows}
    assert by_name["scanner"]["ready"] == "True" and by_name["scanner"]["verification"] == {"imap": "Verified"}
    assert by_name["scanner"]["expiresAt"] == mbx(bed, "scanner")["status"]["token"]["expiresAt"]
    assert by_name["orphan"]["failing"] == "ProviderNotFound" and by_name["orphan"]["fix"]
    as_yaml = yaml.safe_load(plugin(bed, "status", "-n", NS, "-o", "yaml")[0])
    assert [(r["name"], r["ready"], r.get("fix")) for r in as_yaml] == [(r["name"], r["ready"], r.get("fix")) for r in rows]
    one = json.loads(plugin(bed, "status", "-n", NS, "scanner", "-o", "json")[0])
    assert [r["name"] for r in one] == ["scanner"]
    _, err = plugin(bed, "status", "-n", "empty-namespace")
    assert "No mailbox bindings found in namespace empty-namespace." in err, err
    # Never a token in anything status prints.
    token = published(bed, "scanner")["access_token"]
    assert token not in out + wide + everywhere


def test_kubeconfig_and_context_flags_are_kubectls(bed, tmp_path):
    config = json.loads((bed.dir / "admin.kubeconfig").read_text())
    config["clusters"].append({"name": "down", "cluster": {"server": f"https://127.0.0.1:{free_port()}",
                                                           "certificate-authority": str(bed.dir / "ca.crt")}})
    config["contexts"] += [{"name": "plug-ns", "context": {"cluster": "e2e", "user": "u", "namespace": NS}},
                           {"name": "nowhere", "context": {"cluster": "down", "user": "u"}}]
    path = tmp_path / "kubeconfig.json"
    path.write_text(json.dumps(config))
    env = dict(bed.env, KUBECONFIG=str(tmp_path / "absent"))

    def run(*args):
        return subprocess.run([PLUGIN, *args], env=env, capture_output=True, text=True, timeout=60)
    # The context's namespace is the default one, as in kubectl.
    ok = run("--kubeconfig", str(path), "--context", "plug-ns", "status", "-o", "json")
    assert ok.returncode == 0 and "scanner" in {r["name"] for r in json.loads(ok.stdout)}, ok
    down = run("status", "--kubeconfig", str(path), "--context", "nowhere")
    assert down.returncode == 1 and down.stderr.startswith("error: listing mailbox bindings in namespace default: ") \
        and "Connection refused" in down.stderr, down
    unknown = run("status", "--kubeconfig", str(path), "--context", "nosuch")
    assert unknown.returncode == 1 and unknown.stderr.startswith("error: cannot connect to the cluster: ") \
        and "nosuch" in unknown.stderr, unknown
    # KUBECONFIG, as kubectl reads it, when no flag names one.
    via_env = subprocess.run([PLUGIN, "status", "-n", NS], env=dict(env, KUBECONFIG=str(path)), capture_output=True,
                             text=True, timeout=60)
    assert via_env.returncode == 0 and "scanner" in via_env.stdout, via_env


def test_inspect_shows_keys_sizes_and_expiry_and_values_only_when_asked(bed):
    values = published(bed, "scanner")
    out, err = plugin(bed, "inspect", "scanner", "-n", NS)
    print("\n" + out)
    assert "Secret:       scanner-mail-token\n" in out
    assert f"Expires:      {values['expires_at'][:19]}" in out, out
    assert f"  access_token   {len(values['access_token'])}\n" in out, out
    assert "Grant state:  scanner.mailoauth-grant exists (" in out and "holds a refresh token" in out, out
    assert values["access_token"] not in out + err and values["xoauth2"] not in out + err
    doc = json.loads(plugin(bed, "inspect", "scanner", "-n", NS, "-o", "json")[0])
    assert {k["name"] for k in doc["keys"]} >= {"access_token", "expires_at", "username", "xoauth2"}
    assert all("value" not in k for k in doc["keys"]) and doc["grantStateExists"]
    shown, err = plugin(bed, "inspect", "scanner", "-n", NS, "--show-values")
    assert values["access_token"] in shown and "warning: printing the Secret's values" in err, err
    grant = bed.kubectl_json("get", "secret", "scanner.mailoauth-grant", "-n", NS)
    refresh = base64.b64decode(grant["data"]["refresh_token"]).decode()
    assert refresh not in shown, "grant-state values are never printed"
    out, _ = plugin(bed, "inspect", "orphan", "-n", NS)
    assert "orphan-mail-token (not published yet)" in out and "does not exist" in out, out


def test_refresh_sets_its_annotation_and_returns_once_the_operator_refreshed(bed):
    before = published(bed, "scanner")["access_token"]
    out, err = plugin(bed, "refresh", "scanner", "-n", NS)
    assert out.startswith(f"{NS}/scanner refreshed; the token expires at "), out + err
    value = mbx(bed, "scanner")["metadata"]["annotations"]["mailoauth.io/refresh-requested"]
    assert f"mailoauth.io/refresh-requested={value}" in err
    assert mbx(bed, "scanner")["status"]["lastRefreshRequest"] == value
    assert published(bed, "scanner")["access_token"] != before, "a new token was published"
    # Without waiting: set, and back at once.
    out, err = plugin(bed, "refresh", "scanner", "-n", NS, "--wait=false")
    assert out == "" and "asked for a refresh" in err
    _, err = plugin(bed, "refresh", "nobody", "-n", NS, code=1)
    assert "error: mailboxbinding nobody not found in namespace plug" in err, err


def test_verify_checks_the_mailbox_now_and_shows_each_protocol(bed):
    out, err = plugin(bed, "verify", "scanner", "-n", NS)
    assert out.startswith(f"{NS}/scanner MailboxVerified=True (Verified)\n  imap: Verified"), out + err
    value = mbx(bed, "scanner")["metadata"]["annotations"]["mailoauth.io/verify-requested"]
    assert mbx(bed, "scanner")["status"]["verification"]["lastRequest"] == value
    _, err = plugin(bed, "verify", "orphan", "-n", NS, code=1)
    assert "orphan has no valid token to check the mailbox with yet (ProviderNotFound; fix: create the provider" in err, err
    assert "mailoauth.io/verify-requested" not in (mbx(bed, "orphan")["metadata"].get("annotations") or {})


def test_reauthorize_drops_the_grant_and_authorize_takes_it_back_to_ready(bed):
    out, err = plugin(bed, "reauthorize", "scanner", "-n", NS)
    assert f"{NS}/scanner awaits a person's authorization: kubectl mailoauth authorize -n {NS} scanner" in out, out + err
    value = mbx(bed, "scanner")["metadata"]["annotations"]["mailoauth.io/reauthorize-requested"]
    assert mbx(bed, "scanner")["status"]["lastReauthorizeRequest"] == value
    run = Running(bed, "authorize", "scanner", "-n", NS, "--no-browser", "--timeout", "2m")
    run.line("the code", lambda l: l == "and enter the code")
    code = run.lines[run.lines.index("and enter the code") + 1].strip()
    bed.oauth("/test/device/approve", {"userCode": code, "accountId": "scanner@example.com"})
    status, out, err = run.finish()
    assert status == 0 and "is Ready" in out, out + err


def test_authorize_a_declined_code_fails_with_the_fix(bed):
    apply(bed, device_binding(bed, NS, "declined", "idp-public", "declined@example.com"))
    run = Running(bed, "authorize", "declined", "-n", NS, "--no-browser", "--timeout", "2m")
    run.line("the code", lambda l: l == "and enter the code")
    code = run.lines[run.lines.index("and enter the code") + 1].strip()
    bed.oauth("/test/device/deny", {"userCode": code})
    status, out, err = run.finish()
    assert status == 1, out + err
    assert "AuthorizationDenied; fix: set the mailoauth.io/reauthorize-requested annotation" in err, err
    # Run again, it asks for a new code itself, and this time the person approves.
    run = Running(bed, "authorize", "declined", "-n", NS, "--no-browser", "--timeout", "2m")
    run.line("a new code", lambda l: l == "and enter the code")
    second = run.lines[run.lines.index("and enter the code") + 1].strip()
    assert second != code
    bed.oauth("/test/device/approve", {"userCode": second, "accountId": "declined@example.com"})
    status, out, err = run.finish()
    assert status == 0 and "asked for a new one" in err, out + err


def test_authorize_an_authorization_code_through_the_operators_listener_with_one_browser_visit(bed):
    apply(bed, code_binding("web", "web@example.com"))
    started = time.monotonic()
    run = Running(bed, "authorize", "web", "-n", NS, "--no-browser", "--callback-url", bed.callback)
    link = run.line("the start link", lambda l: l.strip().startswith(f"{bed.callback}/authorize/{NS}/web?start=")).strip()
    assert link == mbx(bed, "web")["status"]["authorization"]["url"]
    status, body = sign_in(bed, browser(bed), link)
    assert status == 200 and "Done" in body, body
    code, out, err = run.finish()
    assert code == 0 and f"{NS}/web is Ready: authorized as web@example.com" in out, out + err
    REPORT["authorization code: apply to Ready through the plugin (s)"] = round(time.monotonic() - started, 1)
    # Without --callback-url: the link's address (here the operator's own) is in use, so the
    # plugin takes it for a port-forward already running instead of starting its own.
    apply(bed, code_binding("web2", "web2@example.com"))
    run = Running(bed, "authorize", "web2", "-n", NS, "--no-browser")
    link = run.line("the start link", lambda l: "/authorize/plug/web2?start=" in l).strip()
    status, body = sign_in(bed, browser(bed), link)
    assert status == 200 and "Done" in body, body
    code, out, err = run.finish()
    assert code == 0 and "is Ready" in out and "is already in use on this machine" in err, out + err


def test_rotate_relay_password_publishes_a_new_password_and_says_until_when_the_old_one_works(bed):
    _, err = plugin(bed, "rotate-relay-password", "scanner", "-n", NS, code=1)
    assert "scanner has no relay password: spec.relay.enabled is not true" in err, err
    bed.kubectl("patch", "mbx", "scanner", "-n", NS, "--type=merge", "-p", json.dumps({"spec": {"relay": {"enabled": True}}}))
    first = wait_for("a relay password", lambda: published(bed, "scanner").get("relay_password"), timeout=30)
    out, err = plugin(bed, "rotate-relay-password", "scanner", "-n", NS)
    value = mbx(bed, "scanner")["metadata"]["annotations"]["mailoauth.io/rotate-relay-password"]
    assert f"mailoauth.io/rotate-relay-password={value}" in err, err
    relay = mbx(bed, "scanner")["status"]["relay"]
    assert relay["lastRotateRequest"] == value
    assert out.startswith(f"{NS}/scanner: a new relay password is published in scanner-mail-token (issued ") \
        and "; the previous one works until " in out, out
    second = published(bed, "scanner")["relay_password"]
    assert second != first and first not in out + err and second not in out + err


def test_authorize_without_the_operators_listener_takes_the_pasted_address(bed):
    """The paste path: the operator has no listener, status shows the provider's URL; the person
    signs in, the browser lands on a page that does not load, and its address goes to the plugin."""
    assert bed.stop_operator() == 0
    bed.start_operator("--public-url", "http://localhost:8400")
    apply(bed, code_binding("pasted", "pasted@example.com"))
    run = Running(bed, "authorize", "pasted", "-n", NS, "--no-browser", stdin=subprocess.PIPE)
    url = run.line("the provider's URL", lambda l: l.strip().startswith(f"{bed.issuer}/")).strip()
    run.line("the paste prompt", lambda l: "Paste that page's address here" in l)
    callback = sign_in(bed, browser(bed), url, until="http://localhost:8400/callback")
    run.proc.stdin.write(callback + "\n")
    run.proc.stdin.flush()
    code, out, err = run.finish()
    assert code == 0 and f"{NS}/pasted is Ready: authorized as pasted@example.com" in out, out + err
    assert "handed the address to the operator (mailoauth.io/authorization-response)" in err, err
    assert "mailoauth.io/authorization-response" not in (mbx(bed, "pasted")["metadata"].get("annotations") or {})


def test_authorize_refuses_a_grant_no_person_authorizes(bed):
    doc = code_binding("app", "app@example.com")
    doc["spec"]["grant"] = {"clientCredentials": {}}
    apply(bed, doc)
    _, err = plugin(bed, "authorize", "app", "-n", NS, code=1)
    assert "uses the clientCredentials grant, which no person authorizes" in err, err


def test_authorize_forwards_the_browser_to_the_operators_pod_through_the_apiserver(bed):
    """The chart's way: the public URL is on the person's machine (http://127.0.0.1:<port>, as
    the chart's http://localhost:8400), the plugin listens there and forwards each connection
    through the real apiserver's pods/portforward to the operator's pod. The pod and its node's
    kubelet are kubelet.py's stand-in, which hands the forwarded bytes to the operator process's
    listener; the apiserver, the plugin, the browser's redirects and the operator are real."""
    local = free_port()
    listener = bed.callback.replace("http://", "")
    assert bed.stop_operator() == 0
    bed.start_operator("--callback-address", listener, "--public-url", f"http://127.0.0.1:{local}")
    apply(bed, code_binding("faraway", "faraway@example.com"))
    # No operator pod yet: the plugin says what is missing.
    _, err = plugin(bed, "authorize", "faraway", "-n", NS, "--no-browser", code=1)
    assert "no running operator pod in namespace mail-oauth-operator (pods labelled " \
           "app.kubernetes.io/name=mail-oauth-operator): the port-forward needs one" in err, err
    assert "pass --callback-url" in err
    node = PortForwardNode(bed, target=int(listener.rsplit(":", 1)[1]))
    try:
        node.register("mail-oauth-operator", "mail-oauth-operator-e2e",
                      {"app.kubernetes.io/name": "mail-oauth-operator"}, "callback", 8400)
        started = time.monotonic()
        run = Running(bed, "authorize", "faraway", "-n", NS, "--no-browser")
        link = run.line("the start link", lambda l: l.strip().startswith(f"http://127.0.0.1:{local}/authorize/")).strip()
        try:
            status, body = sign_in(bed, browser(bed), link)
        except OSError as e:
            raise AssertionError(f"{e}; the stand-in kubelet saw: {node.forwarded} {node.errors}")
        assert status == 200 and "Done" in body, body
        code, out, err = run.finish()
        assert code == 0 and f"{NS}/faraway is Ready: authorized as faraway@example.com" in out, out + err
        assert f"forwarding 127.0.0.1:{local} to the operator's listener in pod " \
               "mail-oauth-operator/mail-oauth-operator-e2e (port 8400)" in err, err
        assert ("mail-oauth-operator", "mail-oauth-operator-e2e", 8400) in node.forwarded, node.forwarded
        REPORT["authorization code through the plugin's port-forward (s)"] = round(time.monotonic() - started, 1)
    finally:
        node.close()


def test_check_reports_a_missing_crd(bed):
    """Last: the CRD is gone for good on this bed."""
    bed.kubectl("delete", "crd", "clustermailproviders.mailoauth.io")
    out, _ = plugin(bed, "check", code=1)
    assert "FAIL CRD clustermailproviders.mailoauth.io is not installed: install the chart" in out, out
    assert "ok   CRD mailboxbindings.mailoauth.io installed" in out, out
