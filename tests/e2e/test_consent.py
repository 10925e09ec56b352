"""A person consents once: the device flow on real parts. The chart's CRDs in a real
kube-apiserver, the operator as the chart's ServiceAccount, the local OAuth server (oidc-provider)
as the identity provider, and Dovecot checking the resulting token. The person is played by the
OAuth server's test route that approves or declines a user code as its /device page would.

The tests run in file order and share one bed."""
import base64
import json
import socket
import time

import pytest
from bed import Bed, wait_for
from manifests import apply, device_binding, public_provider

NS = "consent"
REPORT = {}


@pytest.fixture(scope="module")
def bed(request):
    b = Bed(fast_ttl=30)
    try:
        b.up(postfix=False)
        b.helm_install()
        b.kubectl("create", "namespace", NS)
        b.start_operator()
        apply(b, public_provider(b, NS, "idp-public", "mail-device"))
    except BaseException:
        b.dump_logs()
        b.down()
        raise
    yield b
    if request.session.testsfailed:
        b.dump_logs(80)
    b.down()
    print("\nconsent report: " + json.dumps(REPORT, sort_keys=True))


def mbx(bed, name):
    return bed.kubectl_json("get", "mailboxbinding", name, "-n", NS)


def condition(obj, type_):
    return next((c for c in (obj.get("status") or {}).get("conditions", []) if c["type"] == type_), {})


def wait_reason(bed, name, reason, type_="Ready", timeout=60):
    try:
        return wait_for(f"{name} {type_}={reason}", lambda: (lambda c: c if c.get("reason") == reason else None)(
            condition(mbx(bed, name), type_)), timeout=timeout, interval=0.5)
    except TimeoutError:
        raise AssertionError(json.dumps(mbx(bed, name).get("status"), indent=1))


def imap_login(bed, xoauth2):
    with socket.create_connection(("127.0.0.1", bed.ports["imap"]), timeout=10) as s:
        f = s.makefile("rb")
        f.readline()
        s.sendall(b"a1 AUTHENTICATE XOAUTH2 " + xoauth2.encode() + b"\r\n")
        line = f.readline()
        while line.startswith(b"* "):
            line = f.readline()
        if line.startswith(b"+"):
            s.sendall(b"\r\n")
            line = f.readline()
        return line.decode().strip()


def published(bed, name):
    s = bed.kubectl_json("get", "secret", f"{name}-mail-token", "-n", NS)
    return {k: base64.b64decode(v).decode() for k, v in s["data"].items()}


def test_a_device_code_binding_shows_its_code_in_kubectl_and_an_event_then_turns_ready_once_approved(bed):
    started = time.monotonic()
    apply(bed, device_binding(bed, NS, "scanner", "idp-public", "scanner@example.com"))
    waiting = wait_reason(bed, "scanner", "AwaitingAuthorization")
    status = mbx(bed, "scanner")["status"]
    assert status["phase"] == "AwaitingAuthorization"
    code = status["authorization"]["userCode"]
    assert status["authorization"]["verificationUri"] == f"{bed.issuer}/device"
    assert code in waiting["message"]
    wide = bed.kubectl("get", "mbx", "scanner", "-n", NS, "-o", "wide").stdout
    assert code in wide and f"{bed.issuer}/device" in wide, wide
    print("\n" + wide)
    row = wide.splitlines()[1].split()
    assert row[1:5] == ["False", "scanner@example.com", "idp-public", "AwaitingAuthorization"], row
    events = wait_for("the AwaitingAuthorization event", lambda: [
        e for e in bed.kubectl_json("get", "events.events.k8s.io", "-n", NS)["items"]
        if e.get("regarding", {}).get("name") == "scanner" and e.get("reason") == "AwaitingAuthorization"], timeout=20)
    assert events[0]["type"] == "Normal" and code in events[0]["note"]

    polls = bed.oauth("/test/stats")["device_polls"]
    bed.oauth("/test/device/approve", {"userCode": code, "accountId": "scanner@example.com"})
    wait_reason(bed, "scanner", "TokenValid", timeout=30)
    print("\n" + bed.kubectl("get", "mbx", "scanner", "-n", NS, "-o", "wide").stdout)
    REPORT["device code: apply to Ready (s)"] = round(time.monotonic() - started, 1)
    REPORT["device polls while waiting"] = bed.oauth("/test/stats")["device_polls"]
    assert bed.oauth("/test/stats")["device_polls"] - polls <= 3, "polled at the interval, not in a loop"
    status = mbx(bed, "scanner")["status"]
    assert status["phase"] == "Ready" and not status.get("authorization"), "nothing left for a person to do"
    reply = imap_login(bed, published(bed, "scanner")["xoauth2"])
    assert reply.startswith("a1 OK"), reply


def test_polling_goes_on_after_an_operator_restart(bed):
    apply(bed, device_binding(bed, NS, "restart", "idp-public", "restart@example.com"))
    wait_reason(bed, "restart", "AwaitingAuthorization")
    code = mbx(bed, "restart")["status"]["authorization"]["userCode"]
    assert bed.stop_operator() == 0
    bed.oauth("/test/device/approve", {"userCode": code, "accountId": "restart@example.com"})
    codes = bed.oauth("/test/stats")["device_codes"]
    bed.start_operator()
    wait_reason(bed, "restart", "TokenValid", timeout=30)
    assert bed.oauth("/test/stats")["device_codes"] == codes, "the stored code was polled, no new one started"
    reply = imap_login(bed, published(bed, "restart")["xoauth2"])
    assert reply.startswith("a1 OK"), reply


def test_a_declined_code_says_so_and_a_reauthorize_request_starts_a_new_one(bed):
    apply(bed, device_binding(bed, NS, "declined", "idp-public", "declined@example.com"))
    wait_reason(bed, "declined", "AwaitingAuthorization")
    first = mbx(bed, "declined")["status"]["authorization"]["userCode"]
    bed.oauth("/test/device/deny", {"userCode": first})
    c = wait_reason(bed, "declined", "AuthorizationDenied", type_="Authorized", timeout=30)
    assert "reauthorize-requested" in c["message"]
    bed.kubectl("annotate", "mbx", "declined", "-n", NS, "mailoauth.io/reauthorize-requested=1")
    wait_for("a new code", lambda: ((mbx(bed, "declined").get("status") or {}).get("authorization") or {}).get(
        "userCode") not in (None, first), timeout=30)
    second = mbx(bed, "declined")["status"]["authorization"]["userCode"]
    bed.oauth("/test/device/approve", {"userCode": second, "accountId": "declined@example.com"})
    wait_reason(bed, "declined", "TokenValid", timeout=30)


def test_no_device_code_or_token_appears_in_the_operator_log(bed):
    log = (bed.dir / "operator.log").read_text(errors="replace")
    grants = [bed.kubectl_json("get", "secret", f"{n}.mailoauth-grant", "-n", NS) for n in ("scanner", "restart")]
    for g in grants:
        for key in ("refresh_token", "access_token"):
            value = base64.b64decode(g["data"][key]).decode()
            assert value not in log, f"{key} in the log"
    assert "panicked" not in log
