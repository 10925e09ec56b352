"""End to end, the way a user runs it: helm install into a real kube-apiserver, the operator as
the chart's ServiceAccount, the examples applied (pointed at the local OAuth server), and the
published Secret used to log in to a real IMAP server (and SMTP submission when root).

The tests run in file order and build on each other; the bed is shared by the module."""
import base64
import imaplib
import json
import smtplib
import socket
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


@pytest.fixture(scope="module")
def bed(request):
    started = time.monotonic()
    b = Bed(fast_ttl=30)
    try:
        b.up()
    except BaseException:
        b.dump_logs()
        b.down()
        raise
    TIMINGS["bed start (s)"] = round(b.up_seconds, 1)
    yield b
    if request.session.testsfailed:
        b.dump_logs()
    b.down()
    TIMINGS["e2e total (s)"] = round(time.monotonic() - started, 1)
    print("\ne2e timings: " + json.dumps(TIMINGS))


def read_secret(bed, name):
    s = bed.kubectl_json("get", "secret", name, "-n", NS)
    data = {k: base64.b64decode(v).decode() for k, v in (s.get("data") or {}).items()}
    SECRET_VALUES.update(v for k, v in data.items() if k in ("access_token", "xoauth2", "refresh_token"))
    return data


def read_secret_grant(bed, binding_name):
    """The stored (rotated) refresh token, for the leak check."""
    s = bed.kubectl_json("get", "secret", f"{binding_name}.mailoauth-grant", "-n", NS)
    return base64.b64decode(s["data"]["refresh_token"]).decode()


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


def test_kubectl_get_mbx_shows_ready_mailbox_provider_status_and_expiry(bed):
    out = bed.kubectl("get", "mbx", "-n", NS).stdout.splitlines()
    assert out[0].split() == ["NAME", "READY", "MAILBOX", "PROVIDER", "STATUS", "EXPIRES", "AGE"]
    row = next(line.split() for line in out[1:] if line.startswith("helpdesk "))
    assert row[1:5] == ["True", MAILBOX, "idp", "Ready"]
    expires = binding_of(bed, "helpdesk")["status"]["token"]["expiresAt"]
    assert row[5] == expires, "EXPIRES shows the expiry time itself"
    wide = bed.kubectl("get", "mbx", "-n", NS, "-o", "wide").stdout.splitlines()
    assert wide[0].split()[-4:] == ["RENEW", "SECRET", "IDENTITY", "MESSAGE"]
    listed = bed.kubectl("get", "mailoauth", "-n", NS, "-o", "name").stdout.split()
    assert "mailprovider.mailoauth.io/idp" in listed and "mailboxbinding.mailoauth.io/helpdesk" in listed


def test_a_restart_requests_no_token_that_is_not_due(bed):
    before = bed.oauth("/test/stats")["token_requests"]
    status_before = binding_of(bed, "helpdesk")["status"]
    assert bed.stop_operator() == 0, "clean exit on SIGTERM"
    bed.start_operator()
    time.sleep(5)
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
        SECRET_VALUES.add(read_secret_grant(bed, "fast"))
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


def test_bad_input_is_refused_by_the_schema_or_reported_in_status_and_an_event(bed):
    def doc(name, grant, mailbox="device@example.com"):
        return {"apiVersion": "mailoauth.io/v1alpha1", "kind": "MailboxBinding",
                "metadata": {"name": name, "namespace": NS},
                "spec": {"providerRef": {"name": "idp"}, "mailbox": mailbox, "grant": grant,
                         "secretName": f"{name}-mail-token"}}

    for bad, why in ((doc("two", {"deviceCode": {}, "clientCredentials": {}}), "two grants"),
                     (doc("addr", {"clientCredentials": {}}, mailbox="helpdesk"), "a mailbox without @")):
        refused = bed.kubectl("apply", "-f", "-", input=json.dumps(bad), check=False)
        assert refused.returncode != 0, f"the apiserver accepted {why}"
        assert "spec." in refused.stderr, refused.stderr

    # A grant the provider cannot serve: jwtBearer needs a service-account key the provider lacks.
    apply(bed, doc("device", {"jwtBearer": {}}))
    ready = wait_for("Ready=False with InvalidSpec", lambda: (lambda c: c if c.get("reason") == "InvalidSpec"
                                                               else None)(condition(binding_of(bed, "device"), "Ready")),
                     timeout=30, interval=0.5)
    assert ready["status"] == "False" and "serviceAccountKeyRef" in ready["message"]
    warnings = wait_for("a Warning Event", lambda: [
        e for e in bed.kubectl_json("get", "events.events.k8s.io", "-n", NS)["items"]
        if e.get("regarding", {}).get("name") == "device" and e.get("type") == "Warning"], timeout=30, interval=0.5)
    assert [e["reason"] for e in warnings] == ["InvalidSpec"], "one Warning Event, not one per reconcile"
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


def lease_holder(bed):
    lease = bed.kubectl("get", "lease", "mail-oauth-operator", "-n", OPERATOR_NAMESPACE, "-o", "json", check=False)
    return (json.loads(lease.stdout).get("spec") or {}).get("holderIdentity") if lease.returncode == 0 else None


def leading(bed, name):
    return bed.metrics(name).get("mailoauth_leader") == 1


def token_requests_by(bed, name):
    return sum(v for k, v in bed.metrics(name).items() if k.startswith("mailoauth_token_requests_total"))


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
    refreshed_after_request(bed, "helpdesk", 1)
    time.sleep(2)
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
    refreshed_after_request(bed, "helpdesk", 2)
    served = time.monotonic() - killed
    TIMINGS["failover after SIGKILL, lease %ds: leading (s)" % LEASE_SECONDS] = round(took_over, 1)
    TIMINGS["failover after SIGKILL: first refresh served (s)"] = round(served, 1)
    assert lease_holder(bed) == "operator-b"
    assert took_over < LEASE_SECONDS * 2 + 2
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
    assert len(SECRET_VALUES) > 8, "the earlier tests collected the values to look for"
    haystacks = {
        "operator logs": "".join(p.read_text(errors="replace") for p in bed.dir.glob("operator*.log")),
        "events": bed.kubectl("get", "events", "-A", "-o", "json").stdout,
        "bindings": bed.kubectl("get", "mailboxbindings", "-A", "-o", "json").stdout,
        "providers": bed.kubectl("get", "mailproviders", "-A", "-o", "json").stdout,
    }
    for where, text in haystacks.items():
        leaked = [v[:6] + "..." for v in SECRET_VALUES if v and v in text]
        assert not leaked, f"{where} contains secret values starting {leaked}"


def test_deleting_the_binding_garbage_collects_its_secrets(bed):
    bed.kubectl("delete", "mailboxbinding", "helpdesk", "-n", NS)
    names = lambda: bed.kubectl("get", "secrets", "-n", NS, "-o", "name").stdout.split()  # noqa: E731
    wait_for("published and grant-state Secrets garbage collected",
             lambda: not {"secret/helpdesk-mail-token", "secret/helpdesk.mailoauth-grant"} & set(names()),
             timeout=60, interval=1)
    assert "secret/helpdesk-refresh-token" in names(), "the user's own import Secret is untouched"
