"""Mailbox verification end to end: the operator (as the chart runs it) logs in to the bed's real
Dovecot IMAP (and Postfix submission when root) with each Ready binding's published token and
says so in `MailboxVerified` and `status.verification`; a provider whose IMAP port has nobody
listening gives `ServerUnreachable` while `Ready` stays True; `mailoauth.io/verify-requested`
makes a new check; one Event per change of the results; the binding reconcile does not loop on
the verifier's writes; a token from each grant the bed's OAuth server issues (refresh token,
device code, authorization code, client credentials, JWT bearer) is verified over IMAP and POP3 at
Dovecot and SMTP at Postfix; no token in logs, Events or status.

The tests run in file order and build on each other; the bed is shared by the module."""
import json
import time

import pytest
from bed import SERVICE_ACCOUNT, Bed, free_port, wait_for
from manifests import apply, binding, provider, public_provider, secret
from test_consent import browser, sign_in
from test_e2e import ELECT, SecretWatch, condition, find_leaks, leading, reconciles

NS = "verify"
MAILBOX = "verified@example.com"
DEAD_MAILBOX = "unreachable@example.com"
DEBUG = {"RUST_LOG": "debug"}
SEEN = set()  # tokens the tests saw


def verify_bed(request, fake_mail=False):
    """The verification tests' bed (a generator for a module fixture): the bed with its Secret
    watch, the chart, the namespace NS and the operator at debug level; with `fake_mail`, the fake
    mail server too (bed.fake_mail)."""
    b = Bed(fast_ttl=30)
    try:
        b.up()
        if fake_mail:
            b.start_fake_mail()
        b.secret_watch = SecretWatch(b)
        b.helm_install()
        b.kubectl("create", "namespace", NS)
        b.start_operator(env_extra=DEBUG)
    except BaseException:
        b.dump_logs()
        b.down()
        raise
    yield b
    if request.session.testsfailed:
        b.dump_logs()
    b.secret_watch.stop()
    b.down()


@pytest.fixture(scope="module")
def bed(request):
    yield from verify_bed(request)


def get(bed, name):
    return bed.kubectl_json("get", "mailboxbinding", name, "-n", NS)


def verification(obj, protocol):
    return ((obj.get("status") or {}).get("verification") or {}).get(protocol) or {}


def events(bed, name):
    return [e for e in bed.kubectl_json("get", "events.events.k8s.io", "-n", NS)["items"]
            if e.get("regarding", {}).get("name") == name and e.get("action") == "Verify"]


def seeded_binding(bed, name, provider_name, mailbox):
    seed = bed.oauth("/test/seed", {"accountId": mailbox})["refresh_token"]
    SEEN.add(seed)
    return [secret(NS, f"{name}-refresh-token", {"refresh_token": seed}),
            binding(NS, name, provider_name, mailbox, f"{name}-refresh-token", smtp="submission" in bed.ports)]


def test_a_ready_binding_is_verified_over_imap_and_smtp_at_the_real_servers(bed):
    started = time.monotonic()
    apply(bed, secret(NS, "idp-client", {"client-secret": "mail-app-secret"}),
          provider(bed, NS, "idp", "mail-app", "idp-client"),
          *seeded_binding(bed, "mailbox", "idp", MAILBOX))
    SEEN.add("mail-app-secret")
    bed.kubectl("wait", "--for=condition=Ready", "mailboxbinding/mailbox", "-n", NS, "--timeout=60s")
    bed.kubectl("wait", "--for=condition=MailboxVerified", "mailboxbinding/mailbox", "-n", NS, "--timeout=30s")
    b = get(bed, "mailbox")
    verified = condition(b, "MailboxVerified")
    assert (verified["status"], verified["reason"]) == ("True", "Verified"), verified
    protocols = ["imap", "smtp"] if "submission" in bed.ports else ["imap"]
    for p in protocols:
        assert verification(b, p).get("result") == "Verified", (p, b["status"]["verification"])
        assert verification(b, p).get("checkedAt")
    assert condition(b, "Ready")["status"] == "True"
    print(f"\nverified {protocols} {time.monotonic() - started:.1f}s after apply")
    # The bed's Dovecot saw the login of the mailbox.
    assert f"user=<{MAILBOX}>" in (bed.dir / "dovecot.log").read_text(errors="replace")
    # One Normal Event for the first result.
    found = wait_for("the MailboxVerified Event", lambda: events(bed, "mailbox"), timeout=10)
    assert [(e["type"], e["reason"]) for e in found] == [("Normal", "MailboxVerified")], found
    # The verifier's fields are its own field manager's; the reconcile's status apply owns none.
    # (Kubernetes 1.20 records no subresource: every Apply entry is looked at.)
    managers = {m["manager"]: json.dumps(m.get("fieldsV1", {})) for m in
                bed.kubectl_json("get", "mailboxbinding", "mailbox", "-n", NS, "--show-managed-fields")
                ["metadata"]["managedFields"] if m.get("operation") == "Apply"}
    assert '"f:verification"' in managers.get("mail-oauth-operator-verify", ""), managers
    assert '"f:verification"' not in managers.get("mail-oauth-operator", ""), managers
    assert 'MailboxVerified' not in managers.get("mail-oauth-operator", ""), managers
    assert '"f:phase"' in managers.get("mail-oauth-operator", ""), managers


def test_the_reconcile_does_not_loop_on_the_verifiers_writes(bed):
    before, version = reconciles(bed), get(bed, "mailbox")["metadata"]["resourceVersion"]
    time.sleep(3)
    assert reconciles(bed) == before, "no reconcile triggered by the verifier's status writes"
    assert get(bed, "mailbox")["metadata"]["resourceVersion"] == version, "nothing rewritten"


def test_an_unreachable_imap_server_is_said_while_ready_stays_about_the_token(bed):
    dead = provider(bed, NS, "dead-imap", "mail-app", "idp-client")
    dead["spec"]["generic"]["servers"] = {"imap": {"host": "127.0.0.1", "port": free_port(), "tls": "none"}}
    b = seeded_binding(bed, "unreachable", "dead-imap", DEAD_MAILBOX)
    b[1]["spec"]["protocols"] = ["imap"]
    b[1]["spec"].pop("secretTemplate", None)
    apply(bed, dead, *b)
    bed.kubectl("wait", "--for=condition=Ready", "mailboxbinding/unreachable", "-n", NS, "--timeout=60s")
    obj = wait_for("MailboxVerified False", lambda: (lambda o: o if condition(o, "MailboxVerified").get(
        "status") == "False" else None)(get(bed, "unreachable")), timeout=30)
    verified = condition(obj, "MailboxVerified")
    assert verified["reason"] == "ServerUnreachable", verified
    assert "refused" in verified["message"] or "unreachable" in verified["message"], verified
    assert verification(obj, "imap")["result"] == "ServerUnreachable"
    ready = condition(obj, "Ready")
    assert (ready["status"], ready["reason"]) == ("True", "TokenValid"), ready
    assert obj["status"]["phase"] == "Ready"
    assert obj["status"].get("failedAttempts", 0) == 0, "a failing check is no token failure"
    found = wait_for("the Warning Event", lambda: events(bed, "unreachable"), timeout=10)
    assert [(e["type"], e["reason"]) for e in found] == [("Warning", "ServerUnreachable")], found
    wide = bed.kubectl("get", "mbx", "unreachable", "-n", NS, "-o", "wide").stdout
    assert "ServerUnreachable" in wide, wide


def test_the_annotation_makes_a_new_check_and_the_same_result_makes_no_event(bed):
    before = verification(get(bed, "mailbox"), "imap")["checkedAt"]
    time.sleep(1.1)  # checkedAt has whole seconds
    bed.kubectl("annotate", "mailboxbinding", "mailbox", "-n", NS, "mailoauth.io/verify-requested=now-1")
    obj = wait_for("a new check", lambda: (lambda o: o if verification(o, "imap").get("checkedAt") != before
                                            else None)(get(bed, "mailbox")), timeout=20)
    assert obj["status"]["verification"]["lastRequest"] == "now-1"
    assert verification(obj, "imap")["result"] == "Verified"
    time.sleep(1)
    assert [(e["type"], e["reason"]) for e in events(bed, "mailbox")] == [("Normal", "MailboxVerified")], \
        "one Event per change of the results, not per check"
    # The value acted on asks for nothing more.
    checked = verification(obj, "imap")["checkedAt"]
    time.sleep(2)
    assert verification(get(bed, "mailbox"), "imap")["checkedAt"] == checked


def test_bad_verify_settings_are_refused_by_the_schema_or_said_in_the_condition(bed):
    for field, patch in [("spec.verify.interval", {"spec": {"verify": {"interval": "daily"}}}),
                         ("spec.verify.enabled", {"spec": {"verify": {"enabled": "yes"}}})]:
        refused = bed.kubectl("patch", "mailboxbinding", "mailbox", "-n", NS, "--type=merge", "-p",
                              json.dumps(patch), check=False)
        assert refused.returncode != 0 and field in refused.stderr, refused.stderr
    bad_tls = bed.kubectl("patch", "mailprovider", "idp", "-n", NS, "--type=merge", "-p", json.dumps(
        {"spec": {"generic": {"servers": {"imap": {"host": "127.0.0.1", "port": 1, "tls": "sometimes"}}}}}),
        check=False)
    assert bad_tls.returncode != 0 and "tls" in bad_tls.stderr, bad_tls.stderr
    # In range by syntax, not by value: said in the condition with the fix; Ready untouched.
    bed.kubectl("patch", "mailboxbinding", "mailbox", "-n", NS, "--type=merge", "-p",
                json.dumps({"spec": {"verify": {"interval": "30m"}}}))
    obj = wait_for("MailboxVerified InvalidSpec", lambda: (lambda o: o if condition(o, "MailboxVerified").get(
        "reason") == "InvalidSpec" else None)(get(bed, "mailbox")), timeout=20)
    verified = condition(obj, "MailboxVerified")
    assert verified["status"] == "Unknown" and "1h to 720h" in verified["message"], verified
    assert condition(obj, "Ready")["status"] == "True"
    assert verification(obj, "imap")["result"] == "Verified", "the last results stay"
    # Fixed: checked again at once.
    bed.kubectl("patch", "mailboxbinding", "mailbox", "-n", NS, "--type=merge", "-p",
                json.dumps({"spec": {"verify": {"interval": "48h"}}}))
    wait_for("MailboxVerified True again", lambda: condition(get(bed, "mailbox"), "MailboxVerified").get(
        "reason") == "Verified", timeout=20)


def test_metrics_count_verified_mailboxes_and_check_durations(bed):
    m = bed.metrics()
    assert m.get('mailoauth_mailbox_verified{protocol="imap"}') == 1.0, {k: v for k, v in m.items() if "mailbox" in k}
    assert m.get('mailoauth_mailbox_unverified{protocol="imap",reason="ServerUnreachable"}') == 1.0
    assert m.get('mailoauth_mailbox_check_duration_seconds_count{protocol="imap",result="Verified"}', 0) >= 2


def test_a_restarted_operator_checks_nothing_that_is_not_due(bed):
    before = {n: verification(get(bed, n), "imap")["checkedAt"] for n in ("mailbox", "unreachable")}
    bed.stop_operator()
    bed.start_operator(env_extra=DEBUG)
    wait_for("every binding reconciled after the restart", lambda: reconciles(bed) >= 2, timeout=30)
    time.sleep(2)
    after = {n: verification(get(bed, n), "imap")["checkedAt"] for n in ("mailbox", "unreachable")}
    assert after == before, "the schedule lives in status: no check before its time"


def test_only_the_leader_checks_mailboxes(bed):
    assert bed.stop_operator() == 0
    bed.start_operator(name="operator-a", env_extra=dict(ELECT, POD_NAME="operator-a", **DEBUG))
    wait_for("operator-a to lead", lambda: leading(bed, "operator-a"), timeout=30)
    bed.start_operator(name="operator-b", env_extra=dict(ELECT, POD_NAME="operator-b", **DEBUG))
    assert not leading(bed, "operator-b")
    before = verification(get(bed, "mailbox"), "imap")["checkedAt"]
    time.sleep(1.1)
    bed.kubectl("annotate", "mailboxbinding", "mailbox", "-n", NS, "--overwrite", "mailoauth.io/verify-requested=leader")
    wait_for("the leader's check", lambda: verification(get(bed, "mailbox"), "imap").get("checkedAt") != before,
             timeout=20)
    time.sleep(1)
    checks = lambda name: sum(v for k, v in bed.metrics(name).items()  # noqa: E731
                              if k.startswith("mailoauth_mailbox_check_duration_seconds_count"))
    assert checks("operator-a") >= 1 and checks("operator-b") == 0, (checks("operator-a"), checks("operator-b"))
    assert "mailbox checked" not in (bed.dir / "operator-b.log").read_text(errors="replace")
    assert bed.stop_operator("operator-b") == 0 and bed.stop_operator("operator-a") == 0


def every_server(bed, p):
    """The provider `p` with the bed's Dovecot IMAP and POP3 and Postfix submission (when the bed
    has it), without TLS on loopback; POP3's scopes as IMAP's."""
    g = p["spec"]["generic"]
    g["servers"] = {"imap": {"host": "127.0.0.1", "port": bed.ports["imap"], "tls": "none"},
                    "pop3": {"host": "127.0.0.1", "port": bed.ports["pop3"], "tls": "none"}}
    if "submission" in bed.ports:
        g["servers"]["smtp"] = {"host": "127.0.0.1", "port": bed.ports["submission"], "tls": "none"}
    g["scopes"]["pop3"] = g["scopes"]["imap"]
    return p


def grant_binding(name, provider_name, grant, mailbox, protocols, **spec):
    return {"apiVersion": "mailoauth.io/v1alpha1", "kind": "MailboxBinding",
            "metadata": {"name": name, "namespace": NS},
            "spec": {"providerRef": {"name": provider_name}, "mailbox": mailbox, "protocols": protocols,
                     "grant": grant, "secretName": f"{name}-mail-token", **spec}}


def test_a_token_from_each_grant_is_verified_over_imap_pop3_and_smtp_at_the_real_servers(bed):
    # The operator with its callback listener (the authorization code grant), as the only one.
    port = free_port()
    callback = f"http://127.0.0.1:{port}"
    bed.start_operator("--callback-address", f"127.0.0.1:{port}", "--public-url", callback, env_extra=DEBUG)
    protocols = ["imap", "pop3", "smtp"] if "submission" in bed.ports else ["imap", "pop3"]
    key = {"type": "service_account", "client_email": SERVICE_ACCOUNT, "private_key_id": "e2e",
           "private_key": (bed.dir / "gsa.key").read_text()}
    service_account = every_server(bed, public_provider(bed, NS, "grants-sa", "mail-sa"))
    service_account["spec"]["serviceAccountKeyRef"] = {"name": "gsa", "key": "key.json"}
    refresh = seeded_binding(bed, "grant-refresh", "grants-app", "grant-refresh@example.com")
    refresh[1]["spec"]["protocols"] = protocols
    # The bed's OAuth server issues client-credentials tokens for app@example.com (Dovecot's
    # introspection names that user), so that mailbox is the one an app-only binding verifies.
    grants = {  # binding: (grant, mailbox)
        "grant-refresh": ("refreshToken", "grant-refresh@example.com"),
        "grant-device": ("deviceCode", "grant-device@example.com"),
        "grant-code": ("authorizationCode", "grant-code@example.com"),
        "grant-app": ("clientCredentials", "app@example.com"),
        "grant-jwt": ("jwtBearer", "grant-jwt@example.com"),
    }
    apply(bed, secret(NS, "gsa", {"key.json": json.dumps(key)}),
          every_server(bed, provider(bed, NS, "grants-app", "mail-app", "idp-client")),
          every_server(bed, public_provider(bed, NS, "grants-public", "mail-device")), service_account,
          *refresh,
          grant_binding("grant-device", "grants-public", {"deviceCode": {}}, "grant-device@example.com", protocols),
          grant_binding("grant-code", "grants-public", {"authorizationCode": {}}, "grant-code@example.com", protocols),
          grant_binding("grant-app", "grants-app", {"clientCredentials": {}}, "app@example.com", protocols,
                        scopes=["mail"]),
          grant_binding("grant-jwt", "grants-sa", {"jwtBearer": {}}, "grant-jwt@example.com", protocols))
    # A person approves the device code and signs in at the start link.
    authorization = lambda name: wait_for(f"{name} awaiting authorization", lambda: (  # noqa: E731
        get(bed, name).get("status") or {}).get("authorization"), timeout=60)
    bed.oauth("/test/device/approve", {"userCode": authorization("grant-device")["userCode"],
                                       "accountId": "grant-device@example.com"})
    status, page = sign_in(bed, browser(bed), authorization("grant-code")["url"], account="grant-code@example.com")
    assert status == 200 and "Done" in page, page
    results = {}
    for name, (grant, _) in grants.items():
        obj = wait_for(f"{name} MailboxVerified True or False", lambda: (lambda o: o if condition(
            o, "MailboxVerified").get("status") in ("True", "False") else None)(get(bed, name)), timeout=90)
        verified = condition(obj, "MailboxVerified")
        results[grant] = {p: verification(obj, p).get("result") for p in protocols}
        assert (verified["status"], verified["reason"]) == ("True", "Verified"), (name, verified)
        assert results[grant] == {p: "Verified" for p in protocols}, (name, obj["status"]["verification"])
    log = (bed.dir / "dovecot.log").read_text(errors="replace").splitlines()
    for grant, mailbox in grants.values():
        for service in ("imap-login", "pop3-login"):
            assert any(service in line and f"Login: user=<{mailbox}>" in line for line in log), (grant, service)
    print(f"\nverified per grant: {json.dumps(results)}")


def test_no_token_appears_in_logs_events_or_status(bed):
    assert_no_token_leaked(bed)


def assert_no_token_leaked(bed):
    """No value of a Secret the operator reads or writes (nor a token the tests saw) in the
    operator's logs (read at debug level), Dovecot's log, Events or the operator's objects."""
    secret_values, shown, keys = bed.secret_watch.values()
    secret_values.update({v: "seen by the tests" for v in SEEN if v not in secret_values})
    assert {"access_token", "xoauth2", "refresh_token"} <= keys, keys
    logs = {p.name: p.read_text(errors="replace") for p in sorted(bed.dir.glob("operator*.log"))}
    assert any('"level":"DEBUG"' in text for text in logs.values()), "a debug-level log was read"
    assert any("mailbox checked" in text for text in logs.values()), "the checks were logged"
    haystacks = {
        **logs,
        "dovecot log": (bed.dir / "dovecot.log").read_text(errors="replace"),
        "events": bed.kubectl("get", "events", "-A", "-o", "json").stdout,
        "mailoauth objects": bed.kubectl("get", "mailoauth", "-A", "-o", "json").stdout,
    }
    leaked = find_leaks(secret_values, haystacks) + find_leaks(shown, logs)
    assert not leaked, "secret values outside Secrets: " + "; ".join(leaked)
