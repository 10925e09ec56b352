"""Hostile input on real parts: manifests a tenant could apply and token endpoints that misbehave.

Every case ends in a schema rejection by the real kube-apiserver or a typed condition naming the
fix, the operator stays alive throughout, and token requests are counted (at the real OAuth
server, and at a small programmable HTTPS endpoint for the endpoint behaviours). Then the crash
matrix: the operator is killed at each step between a token response and its last write, and the
grant must still work at the real OAuth server afterwards (it revokes the whole grant when a
rotated-out refresh token is replayed, so a lost rotation shows).

The tests run in file order and share one bed."""
import base64
import http.server
import json
import signal
import socket
import ssl
import threading
import time
import urllib.request
from datetime import datetime, timedelta, timezone
from email.utils import format_datetime

import pytest
from bed import OPERATOR_NAMESPACE, Bed, wait_for
from manifests import apply, secret

NS = "hostile"
REPORT = {}


# ---------- a programmable token endpoint ----------
class Hostile(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, bed):
        super().__init__(("127.0.0.1", 0), HostileHandler)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(str(bed.dir / "oauth.crt"), str(bed.dir / "oauth.key"))
        self.socket = ctx.wrap_socket(self.socket, server_side=True)
        self.counts = {}
        self.lock = threading.Lock()
        self.url = f"https://127.0.0.1:{self.server_address[1]}"
        threading.Thread(target=self.serve_forever, daemon=True).start()

    def count(self, behaviour):
        with self.lock:
            return self.counts.get(behaviour, 0)


def token_json(**extra):
    body = {"access_token": "hostile-at-" + str(time.monotonic_ns()), "token_type": "Bearer", "expires_in": 3600}
    body.update(extra)
    for k in [k for k, v in body.items() if v is None]:
        del body[k]
    return json.dumps(body).encode()


class HostileHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def reply(self, status, body=b"", content_type="application/json", headers=()):
        self.send_response(status)
        self.send_header("content-type", content_type)
        self.send_header("content-length", str(len(body)))
        for k, v in headers:
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self):  # noqa: N802 - http.server's naming
        length = int(self.headers.get("content-length") or 0)
        form = self.rfile.read(length).decode(errors="replace")
        behaviour = self.path.strip("/").split("/")[0]
        with self.server.lock:
            self.server.counts[behaviour] = self.server.counts.get(behaviour, 0) + 1
        later = format_datetime(datetime.now(timezone.utc) + timedelta(minutes=7), usegmt=True)
        cases = {
            "huge-body": lambda: self.reply(200, b'{"access_token":"' + b"a" * (2 * 1024 * 1024) + b'"}'),
            "html": lambda: self.reply(200, b"<html><body>Sign in</body></html>", "text/html"),
            "truncated-json": lambda: self.reply(200, b'{"access_token": "abc'),
            "absurd-expires": lambda: self.reply(200, token_json(expires_in=1e300)),
            "zero-expires": lambda: self.reply(200, token_json(expires_in=0)),
            "negative-expires": lambda: self.reply(200, token_json(expires_in=-100)),
            "string-expires": lambda: self.reply(200, token_json(expires_in="3600", token_type=None), "text/plain"),
            "tiny-expires": lambda: self.reply(200, token_json(expires_in=1)),
            "redirect": lambda: self.reply(302, b"", headers=[("location", "https://169.254.169.254/latest/meta-data")]),
            "throttled-seconds": lambda: self.reply(429, b"", headers=[("retry-after", "120")]),
            "throttled-date": lambda: self.reply(429, b"", headers=[("retry-after", later)]),
            "throttled-absurd": lambda: self.reply(429, b"", headers=[("retry-after", "99999999999")]),
            "unauthorized-empty": lambda: self.reply(401, b""),
            "echo-secret": lambda: self.reply(400, json.dumps(
                {"error": "invalid_client", "error_description": f"bad credentials in request {form}"}).encode()),
            "server-error": lambda: self.reply(500, b"<h1>Internal Server Error</h1>", "text/html"),
            "invalid-request": lambda: self.reply(400, b'{"error":"invalid_request"}'),
            "rotate-no-access-token": lambda: self.reply(200, b'{"refresh_token":"hostile-rescued-rt","expires_in":"soon"}'),
            "control-chars": lambda: self.reply(400, json.dumps(
                {"error": "invalid_grant", "error_description": "\u0007\u001b[31mred\nsecond line " + "x" * 5000}).encode()),
        }
        if behaviour == "slow-body":
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", "1000")
            self.end_headers()
            try:
                for _ in range(45):
                    self.wfile.write(b" ")
                    self.wfile.flush()
                    time.sleep(1)
            except OSError:
                pass
            return
        cases.get(behaviour, lambda: self.reply(404, b'{"error":"not_found"}'))()

    def do_GET(self):  # noqa: N802
        # Discovery documents for the issuer cases.
        if self.path.startswith("/huge-discovery/"):
            return self.reply(200, b'{"issuer":"' + b"x" * (200 * 1024) + b'"}')
        if self.path.startswith("/metadata-discovery/"):
            return self.reply(200, json.dumps({"issuer": f"{self.server.url}/metadata-discovery",
                                               "token_endpoint": "https://169.254.169.254/token"}).encode())
        return self.reply(404, b"{}")


# ---------- fixtures and helpers ----------
@pytest.fixture(scope="module")
def bed(request):
    b = Bed(fast_ttl=30)
    try:
        b.up(postfix=False)
        b.helm_install()
        b.kubectl("create", "namespace", NS)
        b.kubectl("label", "namespace", NS, "team=mail")
        b.start_operator()
    except BaseException:
        b.dump_logs()
        b.down()
        raise
    b.hostile = Hostile(b)
    yield b
    if request.session.testsfailed:
        b.dump_logs(80)
    b.hostile.shutdown()
    b.down()
    print("\nhostile report: " + json.dumps(REPORT, sort_keys=True))


def operator_alive(bed):
    bed.alive("operator")
    with urllib.request.urlopen(f"http://127.0.0.1:{bed.ports['operator']}/healthz", timeout=5) as r:
        assert r.status == 200


def get(bed, kind, name, ns=NS):
    args = ["get", kind, name, "-o", "json"] + (["-n", ns] if ns else [])
    out = bed.kubectl(*args, check=False)
    return json.loads(out.stdout) if out.returncode == 0 else None


def condition(obj, type_="Ready"):
    return next((c for c in ((obj or {}).get("status") or {}).get("conditions", []) if c["type"] == type_), None)


def wait_reason(bed, kind, name, reasons, timeout=60, ns=NS, type_="Ready"):
    """Waits until the condition's reason is one of `reasons`; returns the condition."""
    reasons = {reasons} if isinstance(reasons, str) else set(reasons)

    def check():
        c = condition(get(bed, kind, name, ns), type_)
        return c if c and c["reason"] in reasons else None

    try:
        return wait_for(f"{kind}/{name} {type_} reason in {sorted(reasons)}", check, timeout=timeout, interval=0.5)
    except TimeoutError:
        raise AssertionError(f"{kind}/{name}: {json.dumps((get(bed, kind, name, ns) or {}).get('status'))}")


def try_apply(bed, doc):
    return bed.kubectl("apply", "-f", "-", input=json.dumps(doc), check=False)


def binding(name, provider="good", grant=None, kind="MailProvider", **spec):
    body = {"providerRef": {"kind": kind, "name": provider}, "mailbox": f"{name[:40]}@example.com",
            "grant": {"clientCredentials": {}} if grant is None else grant, "secretName": f"{name[:200]}-token", "scopes": ["mail"]}
    body.update(spec)
    return {"apiVersion": "mailoauth.io/v1alpha1", "kind": "MailboxBinding",
            "metadata": {"name": name, "namespace": NS}, "spec": body}


def generic(bed, name, ns=NS, secret_name="client", **generic_spec):
    g = {"caBundle": (bed.dir / "ca.crt").read_text(), "scopes": {"imap": ["mail"]}}
    g.update(generic_spec)
    if "issuerUrl" not in g and "tokenUrl" not in g:
        g["issuerUrl"] = bed.issuer
    return {"apiVersion": "mailoauth.io/v1alpha1", "kind": "MailProvider",
            "metadata": {"name": name, "namespace": ns},
            "spec": {"generic": g, "clientId": "mail-app",
                     "clientAuthentication": {"clientSecretRefs": [{"name": secret_name, "key": "client-secret"}]}}}


def cluster_provider(bed, name, **extra):
    p = generic(bed, name)
    p["kind"] = "ClusterMailProvider"
    del p["metadata"]["namespace"]
    p["spec"].update(extra)
    return p


def token_requests(bed):
    return bed.oauth("/test/stats")["token_requests"]


# ---------- the tests ----------
def test_a_good_provider_and_binding_are_ready_with_a_normal_event_and_no_warning(bed):
    apply(bed, secret(NS, "client", {"client-secret": "mail-app-secret"}),
          secret(OPERATOR_NAMESPACE, "client", {"client-secret": "mail-app-secret"}),
          generic(bed, "good"), binding("baseline"))
    wait_reason(bed, "mailboxbinding", "baseline", "TokenValid")
    events = wait_for("the Ready event", lambda: [
        e for e in bed.kubectl_json("get", "events.events.k8s.io", "-n", NS)["items"]
        if e.get("regarding", {}).get("name") == "baseline" and e.get("reason") == "Ready"], timeout=20)
    assert events[0]["type"] == "Normal"
    warnings = [e for e in bed.kubectl_json("get", "events.events.k8s.io", "-n", NS)["items"]
                if e.get("regarding", {}).get("name") == "baseline" and e.get("type") == "Warning"]
    assert warnings == [], f"no Warning on the happy path: {[w['reason'] for w in warnings]}"


# Manifests the apiserver's schema refuses: (manifest, what its error must say). Kubernetes 1.20
# reports a oneOf failure without a field path ("<nil>"), naming the field in the message instead.
ONE_GRANT = '"spec.grant" must validate one and only one schema (oneOf)'
ONE_PRESET = '"spec" must validate one and only one schema (oneOf)'
REJECTED = {
    "two grants": (lambda b: binding("x1", grant={"deviceCode": {}, "clientCredentials": {}}),
                   ONE_GRANT + ". Found 2 valid alternatives"),
    "no grant": (lambda b: binding("x2", grant={}), ONE_GRANT + ". Found none valid"),
    "mailbox without @": (lambda b: binding("x3", mailbox="helpdesk"), "spec.mailbox: Invalid value"),
    "mailbox with a space": (lambda b: binding("x4", mailbox="help desk@example.com"), "spec.mailbox: Invalid value"),
    "mailbox of 300 characters": (lambda b: binding("x5", mailbox="a" * 290 + "@example.com"),
                                  "spec.mailbox in body should be at most 254 chars long"),
    "refreshBefore in words": (lambda b: binding("x6", refreshBefore="10 minutes"), "spec.refreshBefore: Invalid value"),
    "refreshBefore of 40 characters": (lambda b: binding("x7", refreshBefore="9" * 39 + "h"),
                                       "spec.refreshBefore in body should be at most 32 chars long"),
    "negative refreshBefore": (lambda b: binding("x8", refreshBefore="-10m"), "spec.refreshBefore: Invalid value"),
    "secretName in capitals": (lambda b: binding("x9", secretName="Token"), "spec.secretName: Invalid value"),
    "empty secretName": (lambda b: binding("x10", secretName=""), "spec.secretName in body should be at least 1 chars long"),
    "an empty scope": (lambda b: binding("x11", scopes=[""]), "spec.scopes in body should be at least 1 chars long"),
    "a scope with a space": (lambda b: binding("x12", scopes=["mail admin"]), "spec.scopes: Invalid value"),
    "65 scopes": (lambda b: binding("x13", scopes=[f"s{i}" for i in range(65)]),
                  "spec.scopes in body should have at most 64 items"),
    "no protocols": (lambda b: binding("x14", protocols=[]), "spec.protocols in body should have at least 1 items"),
    "an unknown protocol": (lambda b: binding("x15", protocols=["smtpx"]), 'spec.protocols: Unsupported value: "smtpx"'),
    "an unknown provider kind": (lambda b: binding("x16", kind="SecretStore"),
                                 'spec.providerRef.kind: Unsupported value: "SecretStore"'),
    "an empty provider name": (lambda b: binding("x17", provider=""),
                               "spec.providerRef.name in body should be at least 1 chars long"),
    "65 template labels": (lambda b: binding("x18", secretTemplate={"labels": {f"l{i}": "v" for i in range(65)}}),
                           "spec.secretTemplate.labels in body should have at most 64 properties"),
    "two presets": (lambda b: {**generic(b, "p1"), "spec": {**generic(b, "p1")["spec"], "google": {}}},
                    ONE_PRESET + ". Found 2 valid alternatives"),
    "no preset": (lambda b: {**generic(b, "p2"), "spec": {"clientId": "x"}}, ONE_PRESET + ". Found none valid"),
    "an http token URL": (lambda b: generic(b, "p3", tokenUrl="http://127.0.0.1/token"), "spec.generic.tokenUrl: Invalid value"),
    "a token URL with spaces": (lambda b: generic(b, "p4", tokenUrl="https://idp example/token"),
                                "spec.generic.tokenUrl: Invalid value"),
    "an empty clientId": (lambda b: {**generic(b, "p5"), "spec": {**generic(b, "p5")["spec"], "clientId": ""}},
                          "spec.clientId in body should be at least 1 chars long"),
    "a tenant with a slash": (lambda b: {**generic(b, "p6"), "spec": {"microsoft": {"tenant": "../admin"}, "clientId": "x"}},
                              "spec.microsoft.tenant: Invalid value"),
    "port 70000": (lambda b: generic(b, "p7", servers={"imap": {"host": "imap", "port": 70000}}),
                   "spec.generic.servers.imap.port in body should be less than or equal to 65535"),
    "a caBundle over 64 KiB": (lambda b: generic(b, "p8", caBundle="x" * 70000), "spec.generic.caBundle: Invalid value"),
    "a cluster provider allowing a bad label operator": (lambda b: cluster_provider(
        b, "cp-bad", allowedNamespaces={"selector": {"matchExpressions": [{"key": "a", "operator": "Maybe"}]}}),
        'spec.allowedNamespaces.selector.matchExpressions.operator: Unsupported value: "Maybe"'),
}


def with_refs(doc, refs):
    doc["spec"]["clientAuthentication"] = {"clientSecretRefs": refs}
    return doc


# Sizes, counts and duplicates: (manifest, the field path the apiserver's error must name).
REFUSED_AT = {
    "a template data value over 16 KiB": (
        lambda b: binding("s1", secretTemplate={"data": {"big": "x" * (16 * 1024 + 1)}}), "spec.secretTemplate.data.big"),
    "17 template data keys": (
        lambda b: binding("s2", secretTemplate={"data": {f"k{i}": "v" for i in range(17)}}), "spec.secretTemplate.data"),
    "a template annotation over 4 KiB": (
        lambda b: binding("s3", secretTemplate={"annotations": {"note": "x" * 4097}}),
        "spec.secretTemplate.annotations.note"),
    "65 template annotations": (
        lambda b: binding("s4", secretTemplate={"annotations": {f"a{i}": "v" for i in range(65)}}),
        "spec.secretTemplate.annotations"),
    "a template label value of 64 characters": (
        lambda b: binding("s5", secretTemplate={"labels": {"team": "v" * 64}}), "spec.secretTemplate.labels.team"),
    "a template label value with a space": (
        lambda b: binding("s6", secretTemplate={"labels": {"team": "mail ops"}}), "spec.secretTemplate.labels.team"),
    "17 identity aliases": (
        lambda b: binding("s7", identityAliases=[f"a{i}@example.com" for i in range(17)]), "spec.identityAliases"),
    "the same identity alias twice": (
        lambda b: binding("s8", identityAliases=["a@example.com", "a@example.com"]), "spec.identityAliases[1]"),
    "the same scope twice": (lambda b: binding("s9", scopes=["mail", "mail"]), "spec.scopes[1]"),
    "the same protocol twice": (lambda b: binding("s10", protocols=["imap", "imap"]), "spec.protocols[1]"),
    "an unknown identity mode": (lambda b: binding("s11", identity="trusted"), "spec.identity"),
    "9 client secret refs": (
        lambda b: with_refs(generic(b, "r1"), [{"name": f"client-{i}"} for i in range(9)]),
        "spec.clientAuthentication.clientSecretRefs"),
    "50 client secret refs": (
        lambda b: with_refs(generic(b, "r2"), [{"name": f"client-{i}", "key": "client-secret"} for i in range(50)]),
        "spec.clientAuthentication.clientSecretRefs"),
    "the same client secret ref twice": (
        lambda b: with_refs(generic(b, "r3"), [{"name": "client", "key": "client-secret"}] * 2),
        "spec.clientAuthentication.clientSecretRefs[1]"),
    "the same client secret ref twice, the key defaulted": (
        lambda b: with_refs(generic(b, "r4"), [{"name": "client"}, {"name": "client", "key": "client-secret"}]),
        "spec.clientAuthentication.clientSecretRefs[1]"),
    "the same ref twice with different expiries": (
        lambda b: with_refs(generic(b, "r5"), [{"name": "client", "expiresAt": "2030-01-01T00:00:00Z"},
                                               {"name": "client"}]),
        "spec.clientAuthentication.clientSecretRefs[1]"),
    "a cluster provider's client secret ref twice": (
        lambda b: with_refs(cluster_provider(b, "cp-dup"), [{"name": "client"}] * 2),
        "spec.clientAuthentication.clientSecretRefs[1]"),
    "65 allowed scopes": (
        lambda b: cluster_provider(b, "cp-scopes", allowedScopes=[f"s{i}" for i in range(65)]), "spec.allowedScopes"),
    "the same allowed mailbox twice": (
        lambda b: cluster_provider(b, "cp-mbx", allowedMailboxes=["example.com", "example.com"]),
        "spec.allowedMailboxes[1]"),
    "an allowed namespace that is no namespace name": (
        # Kubernetes 1.20 names the list, not the item, for an item's pattern.
        lambda b: cluster_provider(b, "cp-ns", allowedNamespaces={"names": ["Team A"]}), "spec.allowedNamespaces.names"),
    "65 matchLabels": (
        lambda b: cluster_provider(b, "cp-sel", allowedNamespaces={
            "selector": {"matchLabels": {f"l{i}": "v" for i in range(65)}}}),
        "spec.allowedNamespaces.selector.matchLabels"),
    "a token URL over 2048 characters": (
        lambda b: generic(b, "r6", tokenUrl="https://idp.example.com/" + "t" * 2048), "spec.generic.tokenUrl"),
}


def dry_run(bed, doc):
    """A server-side dry run without kubectl's own checks: only the apiserver's schema judges."""
    return bed.kubectl("apply", "--dry-run=server", "--validate=false", "-f", "-", input=json.dumps(doc), check=False)


def test_hostile_manifests_are_refused_by_the_apiserver_schema(bed):
    refused = []
    for what, (make, error) in REJECTED.items():
        result = dry_run(bed, make(bed))
        assert result.returncode != 0, f"the apiserver accepted {what}"
        assert error in result.stderr, f"{what}: the error does not say {error!r}: {result.stderr[:2000]}"
        refused.append(what)
    for what, (make, path) in REFUSED_AT.items():
        result = dry_run(bed, make(bed))
        assert result.returncode != 0, f"the apiserver accepted {what}"
        assert f"{path}:" in result.stderr, f"{what}: the error does not name {path}: {result.stderr[:2000]}"
        refused.append(what)
    # The largest binding the schema accepts, for the record (docs/trust-model.md): every list and
    # map at its bound, keys as long as the operator accepts them.
    largest = binding("largest", identityAliases=[f"{i:02d}{'a' * 240}@example.com" for i in range(16)],
                      scopes=[f"{i:02d}{'s' * 500}" for i in range(64)], secretTemplate={
                          "labels": {f"{'l' * 200}.example.com/{i:02d}{'n' * 61}": "v" * 63 for i in range(64)},
                          "annotations": {f"{'a' * 200}.example.com/{i:02d}{'n' * 61}": "x" * 4096 for i in range(64)},
                          "data": {f"{i:02d}{'k' * 251}": "x" * 16384 for i in range(16)}})
    result = bed.kubectl("create", "--dry-run=server", "--validate=false", "-f", "-", input=json.dumps(largest),
                         check=False)
    assert result.returncode == 0, result.stderr
    REPORT["largest binding the schema accepts (JSON bytes)"] = len(json.dumps(largest))
    operator_alive(bed)
    REPORT["manifests refused by the schema"] = len(refused)


def test_hostile_manifests_that_pass_the_schema_end_in_a_typed_condition_and_request_nothing(bed):
    apply(bed,
          secret(NS, "foreign", {"owner": "another tool"}),
          secret(NS, "unlabelled-seed", {"rt": "a refresh token"}, referable=False),
          # Every namespace, any scope; an application grant needs allowedMailboxes all the same.
          cluster_provider(bed, "cp-open", allowedMailboxes=["example.com"]),
          cluster_provider(bed, "cp-other-ns", allowedNamespaces={"names": ["elsewhere"]}),
          cluster_provider(bed, "cp-empty-selector", allowedNamespaces={"selector": {}}),
          cluster_provider(bed, "cp-notin", allowedNamespaces={"selector": {"matchExpressions": [
              {"key": "team", "operator": "NotIn", "values": ["mail"]}]}}),
          cluster_provider(bed, "cp-scopes", allowedScopes=["openid"]),
          cluster_provider(bed, "cp-mailboxes", allowedMailboxes=["*@contoso.com"]))
    for p in ("cp-open", "cp-other-ns", "cp-empty-selector", "cp-notin", "cp-scopes", "cp-mailboxes"):
        wait_reason(bed, "clustermailprovider", p, "ProviderReady", ns=None)
    long_name = "a" * 100 + "." + "b" * 99
    cases = {
        "an overflowing refreshBefore": (binding("r1", refreshBefore="99999999999999999999h"), "InvalidSpec", "spec.refreshBefore"),
        "refreshBefore over 24h": (binding("r2", refreshBefore="25h"), "InvalidSpec", "24h"),
        # (A bad template label value is refused by the schema now: see the schema test.)
        "a bad template annotation key": (binding("r4", secretTemplate={"annotations": {"a b": "x"}}), "InvalidSpec", "annotations"),
        "a bad template data key": (binding("r5", secretTemplate={"data": {"a/b": "x"}}), "InvalidSpec", "a/b"),
        "an operator label in the template": (binding("r6", secretTemplate={"labels": {"mailoauth.io/binding": "x"}}), "InvalidSpec", "set by the operator"),
        "its own grant-state name as secretName": (binding("r7", secretName="r7.mailoauth-grant"), "InvalidSpec", "reserved"),
        "another binding's grant-state name": (binding("r8", secretName="baseline.mailoauth-grant"), "InvalidSpec", "reserved"),
        "an unknown placeholder": (binding("r9", secretTemplate={"data": {"f": "{{ refresh_token }}"}}), "InvalidSpec", "refresh_token"),
        "an unclosed placeholder": (binding("r10", secretTemplate={"data": {"f": "{{ mailbox"}}), "InvalidSpec", "unclosed"),
        "a template overwriting access_token": (binding("r11", secretTemplate={"data": {"access_token": "x"}}), "InvalidSpec", "overwrite"),
        "a missing provider": (binding("r12", provider="nope"), "ProviderNotFound", "not found"),
        "a cluster provider for another namespace": (binding("r13", provider="cp-other-ns", kind="ClusterMailProvider"), "ProviderNotAllowed", "does not allow namespace"),
        "a cluster provider with an empty selector": (binding("r14", provider="cp-empty-selector", kind="ClusterMailProvider"), "ProviderNotAllowed", "does not allow namespace"),
        "a cluster provider excluding by expression": (binding("r15", provider="cp-notin", kind="ClusterMailProvider"), "ProviderNotAllowed", "does not allow namespace"),
        "a scope the cluster provider does not allow": (binding("r16", provider="cp-scopes", kind="ClusterMailProvider"), "ProviderNotAllowed", "allowedScopes"),
        "a mailbox the cluster provider does not allow": (binding("r17", provider="cp-mailboxes", kind="ClusterMailProvider"), "ProviderNotAllowed", "allowedMailboxes"),
        "a missing import Secret": (binding("r18", grant={"refreshToken": {"secretRef": {"name": "none", "key": "rt"}}}), "ImportSecretNotFound", "none"),
        "a grant the provider cannot serve": (binding("r19", grant={"jwtBearer": {}}), "InvalidSpec", "serviceAccountKeyRef"),
        "a foreign Secret as secretName": (binding("r20", secretName="foreign"), "SecretConflict", "foreign"),
        "an import Secret not labelled for the operator": (binding("r22", grant={"refreshToken": {"secretRef": {"name": "unlabelled-seed", "key": "rt"}}}), "SecretReferenceNotAllowed", "kubectl label secret"),
        "a template rendering past 512 KiB": (binding("r21", secretTemplate={"data": {f"k{i}": "{{xoauth2}}" * 1150 for i in range(5)}}), "InvalidSpec", "KiB"),
    }
    before = token_requests(bed)
    for what, (doc, _, _) in cases.items():
        result = try_apply(bed, doc)
        assert result.returncode == 0, f"{what}: {result.stderr}"
    results = {}
    for what, (doc, reason, words) in cases.items():
        c = wait_reason(bed, "mailboxbinding", doc["metadata"]["name"], reason)
        assert c["status"] == "False", what
        assert words in c["message"], f"{what}: {c['message']}"
        results[what] = reason
    # Exactly one request: the template bomb's (its size is known only once the token is there to
    # render; the token is stored, nothing published). None of the others reaches the token endpoint.
    requested = token_requests(bed) - before
    assert requested == 1, f"{requested} token requests; only the template bomb asks, once"
    bomb = get(bed, "secret", "r21.mailoauth-grant")
    assert bomb and "access_token" in bomb["data"], "the one request was the template bomb's"
    assert get(bed, "secret", "r21-token") is None, "nothing published for the bomb"
    # A very long binding name: the label the operator stamps is hashed to fit; the binding works.
    apply(bed, binding(long_name, provider="cp-open", kind="ClusterMailProvider"))
    wait_reason(bed, "mailboxbinding", long_name, "TokenValid")
    label = get(bed, "secret", f"{long_name[:200]}-token")["metadata"]["labels"]["mailoauth.io/binding"]
    assert len(label) <= 63 and label.startswith("a" * 40), label
    operator_alive(bed)
    REPORT["manifests ending in a typed condition"] = len(results) + 1
    REPORT["token requests for blocked manifests"] = requested


def test_a_status_no_type_can_read_stops_neither_that_binding_nor_the_others(bed):
    # The status subresource is checked only against the schema: a number out of range for the
    # operator's types (or a foreign writer's time format) must not fail the whole watch list.
    patch = {"status": {"failedAttempts": 99999999999}}
    result = bed.kubectl("patch", "mailboxbinding", "baseline", "-n", NS, "--subresource=status", "--type=merge",
                         "-p", json.dumps(patch), check=False)
    assert result.returncode == 0, result.stderr
    # The watch still lists (a new binding is served) and a restart still starts.
    apply(bed, binding("during-bad-status"))
    wait_reason(bed, "mailboxbinding", "during-bad-status", "TokenValid")
    assert bed.stop_operator() == 0
    bed.start_operator()
    apply(bed, binding("after-bad-status"))
    wait_reason(bed, "mailboxbinding", "after-bad-status", "TokenValid")
    wait_reason(bed, "mailboxbinding", "baseline", "TokenValid")
    operator_alive(bed)


def test_hostile_providers_end_in_a_typed_condition(bed):
    h = bed.hostile.url
    apply(bed,
          generic(bed, "q1", tokenUrl="https://169.254.169.254/token"),
          generic(bed, "q2", tokenUrl="https://metadata.google.internal./token"),
          generic(bed, "q3", tokenUrl="https://[::ffff:169.254.169.254]/token"),
          generic(bed, "q4", issuerUrl=f"{h}/huge-discovery"),
          generic(bed, "q5", issuerUrl=f"{h}/metadata-discovery"),
          generic(bed, "q6", caBundle="not a certificate", tokenUrl=f"{h}/x/token"),
          generic(bed, "q7", secret_name="missing"),
          secret(NS, "unlabelled-client", {"client-secret": "mail-app-secret"}, referable=False),
          generic(bed, "q9", secret_name="unlabelled-client"))
    # An expiry without a time zone: refused by the schema's date-time format, or reported.
    q8 = {**generic(bed, "q8"), "spec": {**generic(bed, "q8")["spec"], "clientAuthentication": {
        "clientSecretRefs": [{"name": "client", "key": "client-secret", "expiresAt": "2027-01-01T00:00:00"}]}}}
    q8_refused = try_apply(bed, q8).returncode != 0
    expected = {"q1": ("EndpointsUnresolved", "refused"), "q2": ("EndpointsUnresolved", "refused"),
                "q3": ("EndpointsUnresolved", "refused"), "q4": ("EndpointsUnresolved", "KiB"),
                "q5": ("EndpointsUnresolved", "refused"), "q6": ("EndpointsUnresolved", "caBundle"),
                "q7": ("ClientSecretNotFound", "missing"),
                "q9": ("SecretReferenceNotAllowed", "mailoauth.io/allow-reference=true")}
    if not q8_refused:
        expected["q8"] = ("InvalidSpec", "expiresAt")
    for name, (reason, words) in expected.items():
        c = wait_reason(bed, "mailprovider", name, reason)
        assert words in c["message"], f"{name}: {c['message']}"
        assert len(c["message"]) < 1000
    operator_alive(bed)
    REPORT["hostile providers"] = len(expected) + (1 if q8_refused else 0)


ENDPOINT_CASES = {
    # behaviour: (Ready reason, RefreshFailing reason or None, permanent)
    "huge-body": ("TokenEndpointUnavailable", False),
    "slow-body": ("TokenEndpointUnavailable", False),
    "html": ("TokenRequestFailed", False),
    "truncated-json": ("TokenRequestFailed", False),
    "redirect": ("TokenRequestFailed", False),
    "throttled-seconds": ("Throttled", False),
    "throttled-date": ("Throttled", False),
    "throttled-absurd": ("Throttled", False),
    "unauthorized-empty": ("ClientCredentialsInvalid", True),
    "echo-secret": ("ClientCredentialsInvalid", True),
    "server-error": ("TokenEndpointUnavailable", False),
    "invalid-request": ("RequestRejected", True),
    "rotate-no-access-token": ("TokenRequestFailed", False),
    "control-chars": ("ReauthorizationRequired", True),
}
ENDPOINT_READY = ["absurd-expires", "zero-expires", "negative-expires", "string-expires"]


def test_misbehaving_token_endpoints_end_in_a_typed_condition_with_requests_counted(bed):
    h = bed.hostile.url
    docs = [secret(NS, "echo-client", {"client-secret": "echo-this-secret-value"})]
    for b in list(ENDPOINT_CASES) + ENDPOINT_READY + ["tiny-expires"]:
        p = generic(bed, f"ep-{b}", tokenUrl=f"{h}/{b}/token", secret_name="echo-client" if b == "echo-secret" else "client")
        docs += [p, binding(f"ep-{b}", provider=f"ep-{b}")]
    apply(bed, *docs)
    started = time.monotonic()
    for b in ENDPOINT_READY:
        wait_reason(bed, "mailboxbinding", f"ep-{b}", "TokenValid", timeout=60)
    for b, (reason, permanent) in ENDPOINT_CASES.items():
        c = wait_reason(bed, "mailboxbinding", f"ep-{b}", reason, type_="RefreshFailing", timeout=90)
        assert c["status"] == "True"
        assert len(c["message"]) < 1000, b
        operator_alive(bed)
    # Lifetimes: absurd is capped at a year; zero and negative get the default hour.
    token = lambda b: get(bed, "mailboxbinding", f"ep-{b}")["status"]["token"]  # noqa: E731
    life = lambda b: (datetime.fromisoformat(token(b)["expiresAt"].replace("Z", "+00:00"))  # noqa: E731
                      - datetime.fromisoformat(token(b)["issuedAt"].replace("Z", "+00:00"))).total_seconds()
    assert 365 * 86400 <= life("absurd-expires") <= 366 * 86400
    assert life("zero-expires") == 3600 and life("negative-expires") == 3600 and life("string-expires") == 3600
    # Retry-After is kept in status: 120 s, a date 7 minutes ahead, and an absurd value capped at 1 h.
    def wait_after(b):
        st = get(bed, "mailboxbinding", f"ep-{b}")["status"]
        return (datetime.fromisoformat(st["nextAttemptTime"].replace("Z", "+00:00"))
                - datetime.fromisoformat(st["lastFailureTime"].replace("Z", "+00:00"))).total_seconds()
    assert 120 <= wait_after("throttled-seconds") <= 130
    assert 380 <= wait_after("throttled-date") <= 430
    assert wait_after("throttled-absurd") == 3600
    # The echoed secret never reaches status, Events or the log.
    texts = [bed.kubectl("get", "mailboxbindings,mailproviders", "-n", NS, "-o", "json").stdout,
             bed.kubectl("get", "events", "-n", NS, "-o", "json").stdout,
             (bed.dir / "operator.log").read_text(errors="replace")]
    assert not any("echo-this-secret-value" in t for t in texts), "the echoed client secret leaked"
    assert not any("\u001b[31m" in t or "\\u001b[31m" in t for t in texts[:2]), "control characters reached status"
    # A refresh token carried by a response without an access token is kept.
    grant = get(bed, "secret", "ep-rotate-no-access-token.mailoauth-grant")
    assert base64.b64decode(grant["data"]["refresh_token"]).decode() == "hostile-rescued-rt"
    # Counting: permanent failures stop; a one-second token is renewed at most every 15 s.
    wait_for("a one-second token obtained", lambda: (get(bed, "mailboxbinding", "ep-tiny-expires").get("status") or {}).get("token"),
             timeout=30)
    counts = {b: bed.hostile.count(b) for b in list(ENDPOINT_CASES) + ENDPOINT_READY + ["tiny-expires"]}
    time.sleep(20)
    elapsed = time.monotonic() - started
    for b, (_, permanent) in ENDPOINT_CASES.items():
        if permanent:
            assert bed.hostile.count(b) == counts[b], f"{b}: a permanent failure was retried"
            # The first retry of a transient failure comes after 30 s (jittered), past this 20 s
            # window: the status says no retry is planned at all.
            status = get(bed, "mailboxbinding", f"ep-{b}")["status"]
            assert "nextAttemptTime" not in status, f"{b}: a permanent failure has a retry planned: {status}"
        assert bed.hostile.count(b) <= 6, f"{b}: {bed.hostile.count(b)} requests in {elapsed:.0f}s"
    tiny = bed.hostile.count("tiny-expires")
    assert tiny <= elapsed / 15 + 2, f"a 1 s token made {tiny} requests in {elapsed:.0f} s"
    operator_alive(bed)
    REPORT["endpoint behaviours"] = len(ENDPOINT_CASES) + len(ENDPOINT_READY) + 1
    REPORT["endpoint requests"] = {b: bed.hostile.count(b) for b in counts}
    REPORT["endpoint test seconds"] = round(elapsed)


def test_a_binding_deleted_and_recreated_adopts_its_own_grant_state(bed):
    seed = bed.oauth("/test/seed", {"accountId": "adopt@example.com"})["refresh_token"]
    doc = binding("adopt", grant={"refreshToken": {"secretRef": {"name": "adopt-seed", "key": "rt"}}},
                  mailbox="adopt@example.com", scopes=["openid", "offline_access", "email", "mail"])
    apply(bed, secret(NS, "adopt-seed", {"rt": seed}), doc)
    wait_reason(bed, "mailboxbinding", "adopt", "TokenValid")
    rotated = base64.b64decode(get(bed, "secret", "adopt.mailoauth-grant")["data"]["refresh_token"]).decode()
    # Delete without cascading (the Secrets stay, their owner references removed, as after a
    # backup restore), then recreate.
    bed.kubectl("delete", "mailboxbinding", "adopt", "-n", NS, "--cascade=orphan", "--wait=true")
    wait_for("owner references removed", lambda: not get(bed, "secret", "adopt.mailoauth-grant")["metadata"].get(
        "ownerReferences"), timeout=30)
    apply(bed, doc)
    wait_reason(bed, "mailboxbinding", "adopt", "TokenValid")
    new_uid = get(bed, "mailboxbinding", "adopt")["metadata"]["uid"]
    grant = get(bed, "secret", "adopt.mailoauth-grant")
    assert grant["metadata"]["ownerReferences"][0]["uid"] == new_uid, "adopted"
    assert base64.b64decode(grant["data"]["refresh_token"]).decode() == rotated, "the rotated token was kept"
    errors = bed.oauth("/test/stats")["errors_by_client"].get("mail-app", 0)
    before = token_requests(bed)
    bed.kubectl("annotate", "mailboxbinding", "adopt", "-n", NS, "mailoauth.io/refresh-requested=1")
    wait_for("a refresh with the adopted token", lambda: token_requests(bed) > before, timeout=30)
    wait_reason(bed, "mailboxbinding", "adopt", "RefreshSucceeded", type_="RefreshFailing")
    assert bed.oauth("/test/stats")["errors_by_client"].get("mail-app", 0) == errors, "no replayed token"


@pytest.mark.parametrize("step,client", [("after-token-response", "mail-app-stable"),
                                         ("after-grant-write", "mail-app"),
                                         ("after-publish", "mail-app")])
def test_a_crash_between_the_token_response_and_the_last_write_loses_no_grant(bed, step, client):
    account = f"crash-{step}@example.com"
    seed = bed.oauth("/test/seed", {"accountId": account, "clientId": client})["refresh_token"]
    name = f"crash-{step}"
    p = generic(bed, f"idp-{client}", secret_name=f"{client}-secret")
    p["spec"]["clientId"] = client
    doc = binding(name, provider=f"idp-{client}", grant={"refreshToken": {"secretRef": {"name": f"{name}-seed", "key": "rt"}}},
                  mailbox=account, scopes=["openid", "offline_access", "email", "mail"])
    apply(bed, secret(NS, f"{client}-secret", {"client-secret": f"{client}-secret"}), p)
    wait_reason(bed, "mailprovider", f"idp-{client}", "ProviderReady")
    assert bed.stop_operator() == 0
    offset = (bed.dir / "operator.log").stat().st_size
    bed.start_operator(env_extra={"MAIL_OAUTH_OPERATOR_FAILPOINT": f"{step}/{name}"}, wait=False)
    apply(bed, secret(NS, f"{name}-seed", {"rt": seed}), doc)
    wait_for(f"the operator to die at {step}", lambda: bed.procs["operator"].poll() is not None, timeout=60)
    code = bed.procs.pop("operator").returncode
    with open(bed.dir / "operator.log", "rb") as f:
        f.seek(offset)
        lines = [json.loads(line) for line in f.read().decode(errors="replace").splitlines() if line.startswith("{")]
    bed.start_operator()  # before judging, so that a failure here leaves the next case an operator
    # Died at the failpoint, not of something else: aborted (SIGABRT, no shutdown, no flush) right
    # after logging that this step of this binding was reached.
    assert code == -signal.SIGABRT, f"the operator exited with {code}, not by the failpoint's abort"
    reached = [entry for entry in lines if entry.get("fields", {}).get("message") == "failpoint reached; aborting"]
    assert [(e["fields"].get("step"), e.get("span", {}).get("object")) for e in reached] == [(step, name)], reached
    wait_reason(bed, "mailboxbinding", name, "TokenValid", timeout=60)
    errors = bed.oauth("/test/stats")["errors_by_client"].get(client, 0)
    # Two refreshes in a row: each uses the newest stored refresh token; a lost rotation would
    # make the server refuse (and revoke the grant).
    for n in ("1", "2"):
        before = bed.oauth("/test/stats")["grants_by_client"].get(client, 0)
        bed.kubectl("annotate", "--overwrite", "mailboxbinding", name, "-n", NS, f"mailoauth.io/refresh-requested={n}")
        wait_for(f"refresh {n}", lambda: bed.oauth("/test/stats")["grants_by_client"].get(client, 0) > before, timeout=30)
    wait_reason(bed, "mailboxbinding", name, "RefreshSucceeded", type_="RefreshFailing")
    assert bed.oauth("/test/stats")["errors_by_client"].get(client, 0) == errors, "a refresh was refused"
    data = {k: base64.b64decode(v).decode() for k, v in get(bed, "secret", f"{name[:200]}-token")["data"].items()}
    reply = imap_login(bed, data["xoauth2"])
    assert reply.startswith("a1 OK"), reply
    REPORT.setdefault("crash matrix", {})[step] = "grant works after restart"


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


def test_the_operator_survived_everything_and_stops_cleanly(bed):
    operator_alive(bed)
    log = (bed.dir / "operator.log").read_text(errors="replace")
    assert "panicked" not in log, "a reconcile panicked"
    assert bed.stop_operator() == 0
