"""Relay credentials end to end (`spec.relay`): the operator (as the chart runs it) generates a
relay password for a binding, stores it beside the grant, publishes `relay_username` and
`relay_password`, keeps it across renewals and restarts, rotates it on
`mailoauth.io/rotate-relay-password` with the old one working for the grace period (published as
its SHA-256 only), and forgets it when the relay is turned off; the relay sidecar
(`mail-oauth-operator relay --secret-dir`) reads the published Secret as kubelet mounts it and
lets a password-only smtplib client send through the bed's real Postfix (XOAUTH2 upstream) with
exactly those credentials. No password in logs, Events or status.

The tests run in file order and build on each other; the bed is shared by the module."""
import base64
import hashlib
import os
import smtplib
import time

import pytest
import yaml
from bed import Bed, free_port, wait_for
import manifests
from manifests import apply, provider, secret
from test_e2e import SecretWatch, condition, find_leaks

NS = "relay"
MAILBOX = "relay-box@example.com"
SEEN = {}  # secret values the tests saw: value -> what


@pytest.fixture(scope="module")
def bed(request):
    b = Bed(fast_ttl=30)
    try:
        b.up()
        b.secret_watch = SecretWatch(b)
        b.helm_install()
        b.kubectl("create", "namespace", NS)
        b.start_operator()
    except BaseException:
        b.dump_logs()
        b.down()
        raise
    yield b
    if request.session.testsfailed:
        b.dump_logs()
    b.secret_watch.stop()
    b.down()


def get(bed, name="box"):
    return bed.kubectl_json("get", "mailboxbinding", name, "-n", NS)


def published(bed, name="box"):
    s = bed.kubectl_json("get", "secret", f"{name}-mail-token", "-n", NS)
    return {k: base64.b64decode(v).decode() for k, v in (s.get("data") or {}).items()}


def relay_binding(bed, name="box", **relay):
    docs, seed = manifests.relay_binding(bed, NS, name, MAILBOX, **relay)
    SEEN[seed] = "seed refresh token"
    return docs


def test_a_relay_enabled_binding_publishes_a_generated_password_and_says_so_without_it(bed):
    apply(bed, secret(NS, "idp-client", {"client-secret": "mail-app-secret"}),
          provider(bed, NS, "idp", "mail-app", "idp-client"),
          *relay_binding(bed, senders=["noreply@example.com"]))
    bed.kubectl("wait", "--for=condition=Ready", "mailboxbinding/box", "-n", NS, "--timeout=60s")
    data = wait_for("relay keys published", lambda: (lambda d: d if "relay_password" in d else None)(published(bed)))
    assert data["relay_username"] == MAILBOX
    password = data["relay_password"]
    SEEN[password] = "relay password"
    assert len(password) == 32 and password.isalnum(), "32 letters and digits"
    assert data["relay_senders"] == "noreply@example.com"
    assert "relay_previous_sha256" not in data
    status = get(bed)["status"]
    assert status["relay"]["username"] == MAILBOX
    assert status["relay"].get("passwordIssuedAt")
    assert password not in str(status)
    # Stored beside the grant, in the grant state.
    grant = bed.kubectl_json("get", "secret", "box.mailoauth-grant", "-n", NS)
    assert base64.b64decode(grant["data"]["relay_password"]).decode() == password


def test_renewals_and_restarts_keep_the_password(bed):
    before = published(bed)
    apply_annotation(bed, "mailoauth.io/refresh-requested", "r1")
    wait_for("a new token", lambda: published(bed)["access_token"] != before["access_token"])
    assert published(bed)["relay_password"] == before["relay_password"]
    bed.stop_operator()
    bed.start_operator()
    apply_annotation(bed, "mailoauth.io/refresh-requested", "r2")
    after = wait_for("a new token after the restart",
                     lambda: (lambda d: d if d["access_token"] != before["access_token"] else None)(published(bed)))
    assert after["relay_password"] == before["relay_password"]


def apply_annotation(bed, key, value, name="box"):
    bed.kubectl("annotate", "--overwrite", "mailboxbinding", name, "-n", NS, f"{key}={value}")


def test_a_rotation_issues_a_new_password_and_the_old_one_works_until_its_grace_ends(bed):
    old = published(bed)["relay_password"]
    bed.kubectl("patch", "mailboxbinding", "box", "-n", NS, "--type=merge",
                "-p", '{"spec":{"relay":{"rotationGracePeriod":"20s"}}}')
    apply_annotation(bed, "mailoauth.io/rotate-relay-password", "2026-12-01")
    data = wait_for("a new relay password",
                    lambda: (lambda d: d if d["relay_password"] != old else None)(published(bed)))
    SEEN[data["relay_password"]] = "rotated relay password"
    assert data["relay_previous_sha256"] == hashlib.sha256(old.encode()).hexdigest()
    assert "relay_previous_until" in data
    status = get(bed)["status"]["relay"]
    assert status["lastRotateRequest"] == "2026-12-01"
    assert status.get("previousPasswordValidUntil")
    # The same value again asks for nothing.
    time.sleep(2)
    assert published(bed)["relay_password"] == data["relay_password"]
    # The grace ends: the previous password's digest is unpublished (the operator comes back then).
    wait_for("the previous password unpublished", lambda: "relay_previous_sha256" not in published(bed), timeout=40)
    assert published(bed)["relay_password"] == data["relay_password"]
    assert not get(bed)["status"]["relay"].get("previousPasswordValidUntil")


def mount(bed, data, path):
    """The published Secret as kubelet mounts it: a `..data` version directory, one file a key."""
    version = path / f"..{time.time_ns()}"
    version.mkdir(parents=True)
    for k, v in data.items():
        (version / k).write_text(v)
    tmp = path / "..data_tmp"
    os.symlink(version.name, tmp)
    os.replace(tmp, path / "..data")
    for k in data:
        if not (path / k).is_symlink():
            os.symlink(f"..data/{k}", path / k)


@pytest.mark.skipif(os.geteuid() != 0, reason="Postfix runs only as root")
def test_the_sidecar_relays_with_the_published_credentials_to_the_real_postfix(bed):
    data = published(bed)
    secret_dir = bed.dir / "relay-secret"
    mount(bed, data, secret_dir)
    port, admin = free_port(), free_port()
    bed.start("relay", [str(bed.operator_bin), "relay", "--secret-dir", str(secret_dir),
                        "--smtp-address", f"127.0.0.1:{port}", "--listen-address", f"127.0.0.1:{admin}",
                        "--allow-private-endpoints"])
    wait_for("the relay's greeting", lambda: bed.alive("relay") and smtp_ok(port), timeout=30)
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as s:
        s.ehlo()
        with pytest.raises(smtplib.SMTPAuthenticationError):
            s.login(MAILBOX, "not the password")
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as s:
        s.ehlo()
        s.login(data["relay_username"], data["relay_password"])
        with pytest.raises(smtplib.SMTPSenderRefused):
            s.sendmail("ceo@example.com", ["user@e2e.localhost"], b"Subject: no\r\n\r\nno\r\n")
        s.rset()
        # A sender of spec.relay.senders goes through; Postfix (XOAUTH2 upstream) accepts it.
        s.sendmail("noreply@example.com", ["user@e2e.localhost"], b"Subject: relayed\r\n\r\nthrough the relay\r\n")
    log = (bed.dir / "postfix.log").read_text(errors="replace")
    assert f"sasl_username={MAILBOX}" in log, "the upstream login was the mailbox's, by XOAUTH2"
    bed.stop("relay")


def smtp_ok(port):
    try:
        with smtplib.SMTP("127.0.0.1", port, timeout=5) as s:
            return s.noop()[0] == 250
    except OSError:
        return False


def test_a_template_may_not_write_a_relay_key_and_bad_relay_settings_are_refused(bed):
    b = relay_binding(bed, name="bad")[1]
    b["spec"]["relay"]["rotationGracePeriod"] = "200h"
    apply(bed, b)
    wait_for("InvalidSpec", lambda: (condition(get(bed, "bad"), "Ready") or {}).get("reason") == "InvalidSpec")
    assert "168h" in condition(get(bed, "bad"), "Ready")["message"]
    b["spec"]["relay"]["rotationGracePeriod"] = "1h"
    b["spec"]["secretTemplate"] = {"data": {"relay_password": "x"}}
    apply(bed, b)
    wait_for("InvalidSpec for the template",
             lambda: "relay_password" in (condition(get(bed, "bad"), "Ready") or {}).get("message", ""))
    # The schema refuses a sender that is no address.
    b["spec"]["relay"]["senders"] = ["not an address"]
    result = bed.kubectl("apply", "-f", "-", input=yaml.safe_dump(b), check=False)
    assert result.returncode != 0 and "senders" in result.stderr, result.stderr
    bed.kubectl("delete", "mailboxbinding", "bad", "-n", NS)


def test_turning_the_relay_off_unpublishes_and_forgets_the_password(bed):
    bed.kubectl("patch", "mailboxbinding", "box", "-n", NS, "--type=merge", "-p", '{"spec":{"relay":{"enabled":false}}}')
    wait_for("relay keys removed", lambda: not any(k.startswith("relay_") for k in published(bed)))
    # (Kubernetes 1.20's server-side apply leaves a removed object field as null.)
    wait_for("the status says no relay", lambda: not get(bed)["status"].get("relay"))
    grant = bed.kubectl_json("get", "secret", "box.mailoauth-grant", "-n", NS)
    wait_for("the grant state forgets it", lambda: not any(
        k.startswith("relay_") for k in bed.kubectl_json("get", "secret", "box.mailoauth-grant", "-n", NS)["data"]))
    assert grant


def test_no_relay_password_appears_in_logs_events_or_status(bed):
    haystacks = {p.name: p.read_text(errors="replace") for p in bed.dir.glob("*.log")}
    haystacks["events"] = str(bed.kubectl_json("get", "events", "-n", NS))
    haystacks["bindings"] = str(bed.kubectl_json("get", "mailboxbindings", "-n", NS))
    assert not find_leaks(SEEN, haystacks)
