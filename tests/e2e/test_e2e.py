"""End to end, the way a user runs it: helm install into a real kube-apiserver, the operator as
the chart's ServiceAccount, the examples applied (pointed at the local OAuth server), and the
published Secret used to log in to a real IMAP server (and SMTP submission when root).

The tests run in file order and build on each other; the bed is shared by the module."""
import base64
import imaplib
import json
import os
import smtplib
import socket
import subprocess
import threading
import time
from datetime import datetime, timezone

import pytest
from bed import OPERATOR_NAMESPACE, ROOT, Bed, wait_for
from manifests import apply, binding, provider, secret

NS = "mail"
MAILBOX = "helpdesk@example.com"
FAST_MAILBOX = "fast@example.com"
TIMINGS = {}
SECRET_VALUES = {"mail-app-secret", "mail-app-fast-secret"}  # every token or secret the tests saw
DEBUG = {"RUST_LOG": "debug"}

# Keys of a grant-state Secret whose values are no secret (shown in status, Events or metric
# labels by design); every other key, present or future, is looked for by the leak check.
PUBLIC_GRANT_KEYS = {
    "token_type", "issued_at", "expires_at", "scopes", "requested_scopes", "provider", "client_id",
    "imported_from", "mailbox", "account", "token_url", "revocation_url", "client_auth",
    "pending_method", "pending_user_code", "pending_verification_uri", "pending_verification_uri_complete",
    "pending_started_at", "pending_expires_at", "pending_interval", "pending_provider", "pending_client_id",
    "pending_scopes", "pending_redirect_uri", "pending_binding_uid", "pending_generation", "pending_token_url",
}
# Shown to those who can read the binding (in status and the AwaitingAuthorization Event, or in
# the provider URL shown there): looked for in the logs only.
SHOWN_GRANT_KEYS = {"pending_url", "pending_state"}


class SecretWatch:
    """Every version of every Secret the apiserver holds, from a `kubectl get secrets -A -w`
    started with the bed: values that lived for a moment only (a rotated-out refresh token, a
    device code, a PKCE verifier, a pending code) are collected as well as the last ones."""

    def __init__(self, bed):
        self.bed = bed
        self.path = bed.dir / "secrets-watch.json"
        self.stopped = False
        self.proc = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        wait_for("the Secret watch lists", lambda: self.path.exists() and self.path.stat().st_size > 0, timeout=30)

    def _run(self):
        # A watch the apiserver ends (after its request timeout) is started again, listing anew.
        while not self.stopped:
            with open(self.path, "ab") as out:
                self.proc = subprocess.Popen(["kubectl", "get", "secrets", "-A", "-w", "-o", "json"], stdout=out,
                                             stderr=subprocess.DEVNULL, env=self.bed.env)
                self.proc.wait()
            time.sleep(0.5)

    def stop(self):
        self.stopped = True
        if self.proc:
            self.proc.terminate()
        self.thread.join(timeout=10)

    def secrets(self):
        text, decoder, at, found = self.path.read_text(errors="replace"), json.JSONDecoder(), 0, []
        while True:
            while at < len(text) and text[at].isspace():
                at += 1
            try:
                obj, at = decoder.raw_decode(text, at)
            except ValueError:
                return found  # the end (or an object still being written)
            found.append(obj)

    def values(self):
        """(secret, shown, keys): values that must appear nowhere outside Secrets, and values shown
        to readers of the binding that must never be logged, each as {value: "namespace/name key"
        where first seen}; and every key they were seen under."""
        secret, shown, keys = {}, {}, set()
        for s in self.secrets():
            labels = s["metadata"].get("labels") or {}
            role = labels.get("mailoauth.io/secret-role")
            where = f"{s['metadata'].get('namespace')}/{s['metadata']['name']}"
            for key, encoded in (s.get("data") or {}).items():
                value = base64.b64decode(encoded).decode(errors="replace")
                if len(value) < 8:
                    continue
                if role == "grant" and key in SHOWN_GRANT_KEYS:
                    shown.setdefault(value, f"{where} {key}")
                    keys.add(key)
                elif (role == "grant" and key not in PUBLIC_GRANT_KEYS
                      or role == "published" and key in ("access_token", "xoauth2")
                      or labels.get("mailoauth.io/allow-reference") == "true" and key not in ("tls.crt", "ca.crt")):
                    secret.setdefault(value, f"{where} {key}")
                    keys.add(key)
        return secret, shown, keys


def find_leaks(values, haystacks):
    return [f"{where}: {values[v]} ({v[:6]}...)" for where, text in haystacks.items() for v in values if v in text]


def reconciles(bed, name="operator", kind="MailboxBinding"):
    """The operator's count of finished reconciles of `kind`, from its /metrics: every outcome but
    `not_leader` (with leader election, as the chart runs it, a replica counts the reconciles it
    turned away before it led; they decided nothing)."""
    return sum(v for k, v in bed.metrics(name).items()
               if k.startswith("mailoauth_reconciles_total{") and f'kind="{kind}"' in k
               and 'outcome="not_leader"' not in k)


def reconciled_in_log(bed, offset, namespace, name, log="operator"):
    """Whether the operator logged (at debug level) a finished reconcile of namespace/name in its
    log past `offset`."""
    with open(bed.dir / f"{log}.log", "rb") as f:
        f.seek(offset)
        for line in f.read().decode(errors="replace").splitlines():
            if '"message":"reconciled"' in line and f'name: \\"{name}\\", namespace: Some(\\"{namespace}\\")' in line:
                return True
    return False


def log_size(bed, log="operator"):
    path = bed.dir / f"{log}.log"
    return path.stat().st_size if path.exists() else 0


@pytest.fixture(scope="module")
def bed(request):
    started = time.monotonic()
    b = Bed(fast_ttl=30)
    try:
        b.up()
        b.secret_watch = SecretWatch(b)
    except BaseException:
        b.dump_logs()
        b.down()
        raise
    TIMINGS["bed start (s)"] = round(b.up_seconds, 1)
    yield b
    if request.session.testsfailed:
        b.dump_logs()
    b.secret_watch.stop()
    b.down()
    TIMINGS["e2e total (s)"] = round(time.monotonic() - started, 1)
    print("\ne2e timings: " + json.dumps(TIMINGS))


def read_secret(bed, name):
    s = bed.kubectl_json("get", "secret", name, "-n", NS)
    data = {k: base64.b64decode(v).decode() for k, v in (s.get("data") or {}).items()}
    SECRET_VALUES.update(v for k, v in data.items() if k in ("access_token", "xoauth2", "refresh_token"))
    return data


def binding_of(bed, name):
    return bed.kubectl_json("get", "mailboxbinding", name, "-n", NS)


def condition(obj, type_):
    return next((c for c in obj.get("status", {}).get("conditions", []) if c["type"] == type_), {})


def imap_xoauth2(bed, xoauth2):
    """AUTHENTICATE XOAUTH2 with the Secret's value sent as is (SASL-IR); after an OK, the session
    must also open INBOX. Returns the AUTHENTICATE reply."""
    with socket.create_connection(("127.0.0.1", bed.ports["imap"]), timeout=10) as s:
        f = s.makefile("rb")
        assert f.readline().startswith(b"* OK")
        s.sendall(b"a1 AUTHENTICATE XOAUTH2 " + xoauth2.encode() + b"\r\n")
        line = f.readline()
        while line.startswith(b"* "):
            line = f.readline()
        if line.startswith(b"+"):  # the failure challenge: answer with an empty line
            s.sendall(b"\r\n")
            line = f.readline()
        reply = line.decode().strip()
        if reply.startswith("a1 OK"):
            s.sendall(b"a2 SELECT INBOX\r\n")
            line = f.readline()
            while line.startswith(b"* "):
                line = f.readline()
            assert line.startswith(b"a2 OK"), f"SELECT INBOX after login: {line!r}"
        return reply


def imap_with_token(bed, username, token):
    imap = imaplib.IMAP4("127.0.0.1", bed.ports["imap"])
    try:
        typ, _ = imap.authenticate("XOAUTH2", lambda _: f"user={username}\x01auth=Bearer {token}\x01\x01".encode())
        assert imap.select("INBOX")[0] == "OK"
        return typ
    finally:
        imap.logout()


def test_the_chart_installs_its_crds_and_rbac_into_the_apiserver(bed):
    started = time.monotonic()
    bed.helm_install()
    TIMINGS["helm install (s)"] = round(time.monotonic() - started, 1)
    crds = bed.kubectl("get", "crd", "-o", "name").stdout.split()
    for crd in ("mailproviders", "clustermailproviders", "mailboxbindings"):
        assert f"customresourcedefinition.apiextensions.k8s.io/{crd}.mailoauth.io" in crds
    bed.kubectl("get", "serviceaccount", "mail-oauth-operator", "-n", OPERATOR_NAMESPACE)
    bed.kubectl("create", "namespace", NS)


def test_the_operator_runs_as_the_charts_service_account_and_turns_ready(bed):
    started = time.monotonic()
    bed.start_operator()
    TIMINGS["operator ready (s)"] = round(time.monotonic() - started, 1)
    sa = ["--kubeconfig", str(bed.dir / "operator.kubeconfig")]
    can = lambda *a: bed.kubectl(*sa, "auth", "can-i", *a, check=False).stdout.strip()  # noqa: E731
    assert can("patch", "secrets", "-n", NS) == "yes"
    assert can("delete", "secrets", "-n", NS) == "no", "least privilege: owner references delete, not we"
    assert can("create", "pods", "-n", NS) == "no"


def test_a_binding_becomes_ready_and_its_secret_logs_in_to_imap(bed):
    seed = bed.oauth("/test/seed", {"accountId": MAILBOX})["refresh_token"]
    SECRET_VALUES.add(seed)
    apply(bed,
          secret(NS, "idp-client", {"client-secret": "mail-app-secret"}),
          secret(NS, "helpdesk-refresh-token", {"refresh_token": seed}),
          provider(bed, NS, "idp", "mail-app", "idp-client"),
          binding(NS, "helpdesk", "idp", MAILBOX, "helpdesk-refresh-token"))
    started = time.monotonic()
    bed.kubectl("wait", "--for=condition=Ready", "mailboxbinding/helpdesk", "-n", NS, "--timeout=90s")
    TIMINGS["binding Ready (s)"] = round(time.monotonic() - started, 1)

    data = read_secret(bed, "helpdesk-mail-token")
    assert {"username", "access_token", "token_type", "expires_at", "xoauth2", "imap_host", "imap_port"} <= set(data)
    assert "refresh_token" not in data and "client-secret" not in data
    assert data["username"] == MAILBOX
    assert imap_xoauth2(bed, data["xoauth2"]).startswith("a1 OK"), "IMAP login with the xoauth2 key"
    assert imap_with_token(bed, data["username"], data["access_token"]) == "OK"
    # The template from the example rendered with the published values.
    assert f"user {MAILBOX}" in data["msmtprc"]


def test_a_wrong_token_is_refused_by_imap(bed):
    assert imap_xoauth2(bed, base64.b64encode(f"user={MAILBOX}\x01auth=Bearer nope\x01\x01".encode()).decode()).startswith("a1 NO")


def test_mail_goes_out_through_postfix_with_the_published_token(bed):
    if "submission" not in bed.ports:
        pytest.skip("Postfix needs root; the IMAP tests cover the token")
    data = read_secret(bed, "helpdesk-mail-token")
    assert data["smtp_port"] == str(bed.ports["submission"])
    with smtplib.SMTP("127.0.0.1", int(data["smtp_port"]), timeout=20) as smtp:
        smtp.ehlo("e2e")
        code, reply = smtp.docmd("AUTH", "XOAUTH2 " + data["xoauth2"])
        assert code == 235, reply
        refused = smtp.sendmail(MAILBOX, ["someone@e2e.localhost"], f"From: {MAILBOX}\r\nSubject: e2e\r\n\r\nhello\r\n")
        assert refused == {}


def test_the_smtp_examples_program_msmtp_and_curl_send_through_postfix_with_the_mounted_secret(bed):
    """examples/smtp-consumer.yaml as a workload runs it: its container's program (the mount path
    pointed at the published Secret written out as the kubelet mounts it, one pass of its loop)
    and msmtp with its ConfigMap's msmtprc (the bed's Postfix for smtp.office365.com, no TLS on
    loopback), then curl --oauth2-bearer as docs/consumers.md shows it; each mail is accepted by
    Postfix after a SASL login with the published token."""
    if "submission" not in bed.ports:
        pytest.skip("Postfix needs root; the IMAP tests cover the token")
    import tempfile
    from pathlib import Path

    import yaml
    docs = [d for d in yaml.safe_load_all((ROOT / "examples" / "smtp-consumer.yaml").read_text()) if d]
    pod = next(d for d in docs if d["kind"] == "Deployment")["spec"]["template"]["spec"]
    container = pod["containers"][0]
    mount = next(m["mountPath"] for m in container["volumeMounts"] if m["name"] == "mail-token")
    program = container["command"][2]
    msmtprc = next(d for d in docs if d["kind"] == "ConfigMap")["data"]["msmtprc"]
    assert program.count(f'"{mount}"') == 1 and program.count("time.sleep(3600)") == 1, "the test follows the example"
    assert f"passwordeval cat {mount}/access_token" in msmtprc and "auth xoauth2" in msmtprc
    log = bed.dir / "postfix.log"
    before = log.stat().st_size
    with tempfile.TemporaryDirectory(prefix="mail-token-") as tmp:
        files = Path(tmp) / "mail-token"
        files.mkdir()
        for key, value in read_secret(bed, "helpdesk-mail-token").items():
            (files / key).write_text(value)
        one_pass = program.replace(f'"{mount}"', repr(str(files))).replace("time.sleep(3600)", "break")
        sent = subprocess.run(["python3", "-c", one_pass], env={"PATH": os.environ["PATH"], "MAIL_TO": "someone@e2e.localhost"},
                              capture_output=True, text=True, timeout=60)
        assert sent.stdout.strip() == "sent", (sent.stdout, sent.stderr)

        rc = (msmtprc.replace("host smtp.office365.com", "host 127.0.0.1")
              .replace("port 587", f"port {bed.ports['submission']}")
              .replace("tls_starttls on", "tls_starttls off").replace("tls on", "tls off")
              .replace("sender@contoso.com", MAILBOX).replace(mount, str(files)))
        (Path(tmp) / "msmtprc").write_text(rc)
        (Path(tmp) / "msmtprc").chmod(0o600)
        msmtp = subprocess.run(["msmtp", "--debug", "-C", str(Path(tmp) / "msmtprc"), "someone@e2e.localhost"],
                               input="Subject: msmtp\n\nhello\n", capture_output=True, text=True, timeout=60)
        assert msmtp.returncode == 0, msmtp.stderr[-2000:]
        # msmtp sends the mechanism first and the token on a line of its own.
        assert "--> AUTH XOAUTH2\n<-- 334" in msmtp.stdout + msmtp.stderr

        (Path(tmp) / "mail.txt").write_text("Subject: curl\r\n\r\nhello\r\n")
        curl = subprocess.run(["curl", "-sS", f"smtp://127.0.0.1:{bed.ports['submission']}", "--user", MAILBOX,
                               "--oauth2-bearer", (files / "access_token").read_text(),
                               "--mail-from", MAILBOX, "--mail-rcpt", "someone@e2e.localhost",
                               "--upload-file", str(Path(tmp) / "mail.txt")],
                              capture_output=True, text=True, timeout=60)
        assert curl.returncode == 0, curl.stderr
    accepted = lambda: [line for line in log.read_bytes()[before:].decode(errors="replace").splitlines()  # noqa: E731
                        if f"sasl_username={MAILBOX}" in line]
    logins = wait_for("three SASL logins in Postfix's log", lambda: (lambda a: a if len(a) == 3 else None)(accepted()),
                      timeout=10)
    assert ["XOAUTH2", "XOAUTH2", "OAUTHBEARER"] == [line.split("sasl_method=")[1].split(",")[0] for line in logins]


def test_kubectl_get_mbx_shows_ready_mailbox_provider_status_and_expiry(bed):
    out = bed.kubectl("get", "mbx", "-n", NS).stdout.splitlines()
    assert out[0].split() == ["NAME", "READY", "MAILBOX", "PROVIDER", "STATUS", "EXPIRES", "AGE"]
    row = next(line.split() for line in out[1:] if line.startswith("helpdesk "))
    assert row[1:5] == ["True", MAILBOX, "idp", "Ready"]
    expires = binding_of(bed, "helpdesk")["status"]["token"]["expiresAt"]
    assert row[5] == expires, "EXPIRES shows the expiry time itself"
    wide = bed.kubectl("get", "mbx", "-n", NS, "-o", "wide").stdout.splitlines()
    assert wide[0].split()[-8:] == ["RENEW", "SECRET", "IDENTITY", "VERIFIED", "IMAP", "SMTP", "POP3", "MESSAGE"]
    listed = bed.kubectl("get", "mailoauth", "-n", NS, "-o", "name").stdout.split()
    assert "mailprovider.mailoauth.io/idp" in listed and "mailboxbinding.mailoauth.io/helpdesk" in listed


def test_a_restart_requests_no_token_that_is_not_due(bed):
    before = bed.oauth("/test/stats")["token_requests"]
    status_before = binding_of(bed, "helpdesk")["status"]
    assert bed.stop_operator() == 0, "clean exit on SIGTERM"
    # From here to the namespace-scoped install the operator logs at debug level (renewals across
    # rotated refresh tokens included), so that the leak check reads debug logs too.
    offset = log_size(bed)
    bed.start_operator(env_extra=DEBUG)
    # Not a pause: the restarted process has reconciled every binding (its reconcile counter has
    # passed their number, and its debug log names this one) before nothing-was-requested is judged.
    bindings = len(bed.kubectl_json("get", "mailboxbindings", "-A")["items"])
    wait_for("every binding reconciled after the restart", lambda: reconciles(bed) >= bindings
             and reconciled_in_log(bed, offset, NS, "helpdesk"), timeout=30, interval=0.2)
    assert bed.oauth("/test/stats")["token_requests"] == before
    status_after = binding_of(bed, "helpdesk")["status"]
    assert status_after["lastRefreshTime"] == status_before["lastRefreshTime"]
    assert status_after["token"] == status_before["token"]


def test_tokens_are_renewed_before_expiry_and_imap_keeps_working_across_rotations(bed):
    seed = bed.oauth("/test/seed", {"accountId": FAST_MAILBOX, "clientId": "mail-app-fast"})["refresh_token"]
    SECRET_VALUES.add(seed)
    apply(bed,
          secret(NS, "fast-client", {"client-secret": "mail-app-fast-secret"}),
          secret(NS, "fast-refresh-token", {"refresh_token": seed}),
          provider(bed, NS, "idp-fast", "mail-app-fast", "fast-client"),
          binding(NS, "fast", "idp-fast", FAST_MAILBOX, "fast-refresh-token"))
    bed.kubectl("wait", "--for=condition=Ready", "mailboxbinding/fast", "-n", NS, "--timeout=90s")
    seen = [read_secret(bed, "fast-mail-token")]
    started = time.monotonic()
    while len(seen) < 4:
        current = wait_for("a renewed token in the published Secret",
                           lambda: (lambda d: d if d["access_token"] != seen[-1]["access_token"] else None)(
                               read_secret(bed, "fast-mail-token")), timeout=60, interval=1)
        previous_expiry = datetime.fromisoformat(seen[-1]["expires_at"].replace("Z", "+00:00"))
        assert datetime.now(timezone.utc) < previous_expiry, "renewed before the old token expired"
        assert imap_xoauth2(bed, current["xoauth2"]).startswith("a1 OK")
        seen.append(current)
    TIMINGS["three renewals (s)"] = round(time.monotonic() - started, 1)
    stats = bed.oauth("/test/stats")
    assert stats["errors_by_client"].get("mail-app-fast", 0) == 0, "no rejected refresh: no rotation was lost"
    assert stats["grants_by_client"]["mail-app-fast"] >= 4
    assert binding_of(bed, "fast")["status"]["phase"] == "Ready"
    bed.kubectl("delete", "mailboxbinding", "fast", "-n", NS)


def test_a_deleted_or_edited_published_secret_is_restored_and_foreign_keys_survive(bed):
    original = read_secret(bed, "helpdesk-mail-token")
    bed.kubectl("delete", "secret", "helpdesk-mail-token", "-n", NS)
    wait_for("the published Secret restored", lambda: read_secret(bed, "helpdesk-mail-token")["access_token"]
             == original["access_token"], timeout=30, interval=0.5)
    patch = {"data": {"access_token": base64.b64encode(b"tampered").decode(),
                      "added-by-someone": base64.b64encode(b"keep me").decode()}}
    bed.kubectl("patch", "secret", "helpdesk-mail-token", "-n", NS, "--type=merge", "-p", json.dumps(patch))
    restored = wait_for("the edited key restored", lambda: (lambda d: d if d["access_token"] == original["access_token"]
                                                             else None)(read_secret(bed, "helpdesk-mail-token")),
                        timeout=30, interval=0.5)
    assert restored["added-by-someone"] == "keep me"


def test_a_key_the_binding_no_longer_publishes_is_removed_and_foreign_keys_survive(bed):
    """The published Secret was made by a create (the operator's cache said it was absent) and
    written since by applies: a key the binding no longer publishes (its template dropped) must
    go all the same (a create's fields outlive applies of the same manager), and someone else's
    key stays."""
    before = read_secret(bed, "helpdesk-mail-token")
    assert "msmtprc" in before and before.get("added-by-someone") == "keep me"
    bed.kubectl("patch", "mailboxbinding", "helpdesk", "-n", NS, "--type=json",
                "-p", json.dumps([{"op": "remove", "path": "/spec/secretTemplate"}]))
    after = wait_for("the template's key removed", lambda: (lambda d: d if "msmtprc" not in d else None)(
        read_secret(bed, "helpdesk-mail-token")), timeout=30, interval=0.5)
    assert after["added-by-someone"] == "keep me", "someone else's key stays"
    assert after["access_token"] and after["xoauth2"], "the rest is still published"
    # And the binding goes back to rest: nothing more is written.
    rv = bed.kubectl_json("get", "secret", "helpdesk-mail-token", "-n", NS)["metadata"]["resourceVersion"]
    bed.kubectl("annotate", "mailboxbinding", "helpdesk", "-n", NS, "mailoauth.io/touch=2", "--overwrite")
    time.sleep(3)
    assert bed.kubectl_json("get", "secret", "helpdesk-mail-token", "-n", NS)["metadata"]["resourceVersion"] == rv


def test_bad_input_is_refused_by_the_schema_or_reported_in_status_and_an_event(bed):
    def doc(name, grant, mailbox="device@example.com"):
        return {"apiVersion": "mailoauth.io/v1alpha1", "kind": "MailboxBinding",
                "metadata": {"name": name, "namespace": NS},
                "spec": {"providerRef": {"name": "idp"}, "mailbox": mailbox, "grant": grant,
                         "secretName": f"{name}-mail-token"}}

    # The apiserver's own schema refuses them (a server-side dry run without kubectl's client-side
    # validation), naming the field.
    for bad, error in ((doc("two", {"deviceCode": {}, "clientCredentials": {}}),
                        '"spec.grant" must validate one and only one schema (oneOf). Found 2 valid alternatives'),
                       (doc("addr", {"clientCredentials": {}}, mailbox="helpdesk"),
                        'spec.mailbox: Invalid value: "helpdesk": spec.mailbox in body should match')):
        refused = bed.kubectl("apply", "--dry-run=server", "--validate=false", "-f", "-", input=json.dumps(bad),
                              check=False)
        assert refused.returncode != 0, f"the apiserver accepted {bad['metadata']['name']}"
        assert error in refused.stderr, refused.stderr

    # A grant the provider cannot serve: jwtBearer needs a service-account key the provider lacks.
    apply(bed, doc("device", {"jwtBearer": {}}))
    ready = wait_for("Ready=False with InvalidSpec", lambda: (lambda c: c if c.get("reason") == "InvalidSpec"
                                                               else None)(condition(binding_of(bed, "device"), "Ready")),
                     timeout=30, interval=0.5)
    assert ready["status"] == "False" and "serviceAccountKeyRef" in ready["message"]
    warnings = lambda: [e for e in bed.kubectl_json("get", "events.events.k8s.io", "-n", NS)["items"]  # noqa: E731
                        if e.get("regarding", {}).get("name") == "device" and e.get("type") == "Warning"]
    wait_for("a Warning Event", warnings, timeout=30, interval=0.5)
    # Three more reconciles of the failing binding (an annotation each), each seen finished.
    for n in range(3):
        done = reconciles(bed)
        bed.kubectl("annotate", "--overwrite", "mailboxbinding", "device", "-n", NS, f"e2e.example.com/poke={n}")
        wait_for(f"reconcile {n + 1} after the Warning", lambda: reconciles(bed) > done, timeout=30, interval=0.2)
    # One Event, published once: kube-runtime's recorder folds a repeat of the same type and reason
    # into the first Event (`series.count`), so counting Event objects alone could not fail.
    found = warnings()
    assert [(e["reason"], e.get("series")) for e in found] == [("InvalidSpec", None)], \
        f"one Warning, published once, not once per reconcile: {found}"
    assert "serviceAccountKeyRef" in found[0]["note"], found[0]["note"]
    bed.kubectl("delete", "mailboxbinding", "device", "-n", NS)


def test_a_namespace_scoped_install_works_with_roles_only(bed):
    bed.helm("upgrade", "mail-oauth-operator", str(ROOT / "charts" / "mail-oauth-operator"),
             "--namespace", OPERATOR_NAMESPACE, "--set", f"watchNamespaces={{{NS}}}")
    sa = ["--kubeconfig", str(bed.dir / "operator.kubeconfig")]
    assert bed.kubectl(*sa, "auth", "can-i", "list", "secrets", "-A", check=False).stdout.strip() == "no"
    assert bed.kubectl(*sa, "auth", "can-i", "patch", "secrets", "-n", NS, check=False).stdout.strip() == "yes"
    assert bed.stop_operator() == 0
    bed.start_operator("--namespace", NS)
    apply(bed,
          secret(NS, "app-client", {"client-secret": "mail-app-secret"}),
          {"apiVersion": "mailoauth.io/v1alpha1", "kind": "MailboxBinding",
           "metadata": {"name": "app", "namespace": NS},
           "spec": {"providerRef": {"name": "idp"}, "mailbox": "app@example.com", "scopes": ["mail"],
                    "grant": {"clientCredentials": {}}, "secretName": "app-mail-token"}})
    bed.kubectl("wait", "--for=condition=Ready", "mailboxbinding/app", "-n", NS, "--timeout=60s")
    app = read_secret(bed, "app-mail-token")
    assert app["username"] == "app@example.com"
    # The app-only token opens the mailbox the application may use (as Exchange's permission does).
    reply = imap_xoauth2(bed, app["xoauth2"])
    assert reply.startswith("a1 OK"), reply


LEASE_SECONDS = 6
ELECT = {"LEADER_ELECT": "true", "LEADER_LEASE_DURATION": f"{LEASE_SECONDS}s"}
# What the design promises after a SIGKILL (src/controller/leader.rs, kube-lease-manager): the
# follower sleeps until the lease it last read runs out (at most LEASE_SECONDS after the kill: the
# dead leader renewed it last at or before the kill), clears it, waits 0.1-1 s (the lease manager's
# collision guard: its retry period) and takes it; its leadership check runs every 250 ms. Plus a
# margin of 1.25 s for the take-over's apiserver round trips (a read, a release, a write), the
# Lease watch and this test's polling of /metrics every 200 ms. (It was 14 s: a lease written
# twice as long as configured passed.)
FAILOVER_SECONDS = LEASE_SECONDS + 1.0 + 0.25 + 1.25


def lease_holder(bed):
    lease = bed.kubectl("get", "lease", "mail-oauth-operator", "-n", OPERATOR_NAMESPACE, "-o", "json", check=False)
    return (json.loads(lease.stdout).get("spec") or {}).get("holderIdentity") if lease.returncode == 0 else None


def leading(bed, name):
    return bed.metrics(name).get("mailoauth_leader") == 1


def token_requests_by(bed, name):
    return sum(v for k, v in bed.metrics(name).items() if k.startswith("mailoauth_token_requests_total"))


def settled(bed, counts):
    """Waits until each operator in `counts` ({name: its reconcile count before an annotation})
    has finished a reconcile since: each replica reconciles a binding once per annotation or spec
    change (status writes trigger none), the leader acting on it, a follower returning at once.
    Only then can nothing-more be judged."""
    for name, before in counts.items():
        wait_for(f"{name} reconciled the change", lambda: reconciles(bed, name) > before, timeout=30, interval=0.2)


def refreshed_after_request(bed, binding_name, n):
    """Asks for a refresh and returns when the binding records having acted on it."""
    bed.kubectl("annotate", "--overwrite", "mailboxbinding", binding_name, "-n", NS, f"mailoauth.io/refresh-requested=ha-{n}")
    wait_for(f"{binding_name} refreshed", lambda: binding_of(bed, binding_name)["status"].get("lastRefreshRequest") == f"ha-{n}",
             timeout=60, interval=0.2)


def test_two_replicas_elect_one_leader_and_only_the_leader_requests_tokens(bed):
    assert bed.stop_operator() == 0
    bed.start_operator("--namespace", NS, name="operator-a", env_extra=dict(ELECT, POD_NAME="operator-a"))
    wait_for("operator-a to lead", lambda: lease_holder(bed) == "operator-a" and leading(bed, "operator-a"), timeout=30)
    # The follower syncs its caches and turns ready without leading.
    bed.start_operator("--namespace", NS, name="operator-b", env_extra=dict(ELECT, POD_NAME="operator-b"))
    assert not leading(bed, "operator-b")
    before = bed.oauth("/test/stats")["token_requests"]
    counts = {n: reconciles(bed, n) for n in ("operator-a", "operator-b")}
    refreshed_after_request(bed, "helpdesk", 1)
    settled(bed, counts)
    assert bed.oauth("/test/stats")["token_requests"] == before + 1, "one refresh, one token request"
    assert token_requests_by(bed, "operator-b") == 0
    assert token_requests_by(bed, "operator-a") >= 1
    assert lease_holder(bed) == "operator-a" and not leading(bed, "operator-b")


def test_a_killed_leader_is_replaced_within_its_lease_duration(bed):
    killed = time.monotonic()
    bed.kill("operator-a")  # no release: the follower waits for the lease to run out
    wait_for("operator-b to lead", lambda: leading(bed, "operator-b"), timeout=LEASE_SECONDS * 4, interval=0.2)
    took_over = time.monotonic() - killed
    before = bed.oauth("/test/stats")["token_requests"]
    counts = {"operator-b": reconciles(bed, "operator-b")}
    refreshed_after_request(bed, "helpdesk", 2)
    served = time.monotonic() - killed
    TIMINGS["failover after SIGKILL, lease %ds: leading (s)" % LEASE_SECONDS] = round(took_over, 1)
    TIMINGS["failover after SIGKILL: first refresh served (s)"] = round(served, 1)
    assert lease_holder(bed) == "operator-b"
    assert took_over < FAILOVER_SECONDS, f"took over after {took_over:.1f} s; the design promises {FAILOVER_SECONDS} s"
    settled(bed, counts)
    assert bed.oauth("/test/stats")["token_requests"] == before + 1


def test_a_leader_that_shuts_down_hands_over_at_once(bed):
    bed.start_operator("--namespace", NS, name="operator-a", env_extra=dict(ELECT, POD_NAME="operator-a"))
    assert not leading(bed, "operator-a")
    stopped = time.monotonic()
    assert bed.stop_operator("operator-b") == 0
    wait_for("operator-a to lead", lambda: leading(bed, "operator-a"), timeout=LEASE_SECONDS * 4, interval=0.2)
    TIMINGS["handover after SIGTERM (s)"] = round(time.monotonic() - stopped, 1)
    assert time.monotonic() - stopped < LEASE_SECONDS / 2, "the lease was released, not left to run out"
    refreshed_after_request(bed, "helpdesk", 3)
    # The rest of the tests run with this replica as the operator.
    bed.procs["operator"] = bed.procs.pop("operator-a")
    bed.ports["operator"] = bed.ports["operator-a"]


def test_no_token_or_secret_appears_in_logs_events_or_status(bed):
    # Every version of every Secret the apiserver held: each refresh token of the rotations and the
    # one kept beside it, access tokens, client secrets, imported tokens.
    secret, shown, keys = bed.secret_watch.values()
    secret.update({v: "seen by the tests" for v in SECRET_VALUES if v not in secret})
    assert {"refresh_token", "previous_refresh_token", "access_token", "xoauth2", "client-secret"} <= keys, keys
    assert sum(1 for w in secret.values() if w == f"{NS}/fast.mailoauth-grant refresh_token") >= 4, \
        "each rotated refresh token of the renewals was collected"
    logs = {p.name: p.read_text(errors="replace") for p in sorted(bed.dir.glob("operator*.log"))}
    assert any('"level":"DEBUG"' in text for text in logs.values()), "a debug-level log was read"
    haystacks = {
        **logs,
        "events": bed.kubectl("get", "events", "-A", "-o", "json").stdout,
        "mailoauth objects": bed.kubectl("get", "mailoauth", "-A", "-o", "json").stdout,
    }
    leaked = find_leaks(secret, haystacks) + find_leaks(shown, logs)
    assert not leaked, "secret values outside Secrets: " + "; ".join(leaked)
    TIMINGS["secret values looked for"] = len(secret) + len(shown)


def test_deleting_the_binding_garbage_collects_its_secrets(bed):
    bed.kubectl("delete", "mailboxbinding", "helpdesk", "-n", NS)
    names = lambda: bed.kubectl("get", "secrets", "-n", NS, "-o", "name").stdout.split()  # noqa: E731
    wait_for("published and grant-state Secrets garbage collected",
             lambda: not {"secret/helpdesk-mail-token", "secret/helpdesk.mailoauth-grant"} & set(names()),
             timeout=60, interval=1)
    assert "secret/helpdesk-refresh-token" in names(), "the user's own import Secret is untouched"
