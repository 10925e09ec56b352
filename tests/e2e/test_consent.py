"""A person consents once: the device flow and the authorization code flow on real parts. The chart's CRDs in a real
kube-apiserver, the operator as the chart's ServiceAccount, the local OAuth server (oidc-provider)
as the identity provider, and Dovecot checking the resulting token. The person is played by the
OAuth server's test route that approves or declines a user code as its /device page would, and
by a small browser (cookies, no automatic redirects) that signs in at its login and consent pages.

The tests run in file order and share one bed."""
import base64
import http.cookiejar
import json
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.parse
import urllib.request

import pytest
from bed import SERVICE_ACCOUNT, Bed, free_port, wait_for
from manifests import apply, device_binding, public_provider, secret

NS = "consent"
REPORT = {}
# The operator logs at debug level throughout this file: the leak check at its end reads what it
# logged about device codes, PKCE verifiers, authorization codes and start links at that level.
DEBUG = {"RUST_LOG": "debug"}

# As in test_e2e.py: keys of a grant-state Secret that are no secret; every other key is.
PUBLIC_GRANT_KEYS = {
    "token_type", "issued_at", "expires_at", "scopes", "requested_scopes", "provider", "client_id",
    "imported_from", "mailbox", "account", "token_url", "revocation_url", "client_auth",
    "pending_method", "pending_user_code", "pending_verification_uri", "pending_verification_uri_complete",
    "pending_started_at", "pending_expires_at", "pending_interval", "pending_provider", "pending_client_id",
    "pending_scopes", "pending_redirect_uri", "pending_binding_uid", "pending_generation", "pending_token_url",
}
# Shown to readers of the binding (the start link or provider URL in status and its Event): never logged.
SHOWN_GRANT_KEYS = {"pending_url", "pending_state"}


class SecretWatch:
    """Every version of every Secret, from a `kubectl get secrets -A -w` started with the bed (as
    in test_e2e.py): device codes, verifiers and codes that lived for seconds are collected too."""

    def __init__(self, bed):
        self.bed, self.path, self.stopped, self.proc = bed, bed.dir / "secrets-watch.json", False, None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        wait_for("the Secret watch lists", lambda: self.path.exists() and self.path.stat().st_size > 0, timeout=30)

    def _run(self):
        while not self.stopped:  # a watch the apiserver ends is started again
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

    def values(self):
        """(secret, shown, keys); see test_e2e.py."""
        text, decoder, at = self.path.read_text(errors="replace"), json.JSONDecoder(), 0
        secret, shown, keys = {}, {}, set()
        while True:
            while at < len(text) and text[at].isspace():
                at += 1
            try:
                s, at = decoder.raw_decode(text, at)
            except ValueError:
                return secret, shown, keys
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


def log_size(bed):
    return (bed.dir / "operator.log").stat().st_size


def reconciled_after(bed, name, change):
    """Makes a change to the binding (a harmless annotation) and waits until the operator's
    debug log shows a reconcile of it finished after that: what the operator would do on its own
    by then, it has done."""
    offset = log_size(bed)
    bed.kubectl("annotate", "--overwrite", "mbx", name, "-n", NS, f"e2e.example.com/poke={change}")
    marker = f'name: \\"{name}\\", namespace: Some(\\"{NS}\\")'

    def seen():
        with open(bed.dir / "operator.log", "rb") as f:
            f.seek(offset)
            return any('"message":"reconciled"' in line and marker in line
                       for line in f.read().decode(errors="replace").splitlines())
    wait_for(f"a reconcile of {name} after the change", seen, timeout=30, interval=0.2)


def events_of(bed, name, reason):
    return [e for e in bed.kubectl_json("get", "events.events.k8s.io", "-n", NS)["items"]
            if e.get("regarding", {}).get("name") == name and e.get("reason") == reason]


@pytest.fixture(scope="module")
def bed(request):
    b = Bed(fast_ttl=30)
    try:
        b.up(postfix=False)
        b.secret_watch = SecretWatch(b)
        b.helm_install()
        b.kubectl("create", "namespace", NS)
        b.start_operator(env_extra=DEBUG)
        apply(b, public_provider(b, NS, "idp-public", "mail-device"))
    except BaseException:
        b.dump_logs()
        b.down()
        raise
    yield b
    if request.session.testsfailed:
        b.dump_logs(80)
    b.secret_watch.stop()
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
    bed.start_operator(env_extra=DEBUG)
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
    # kube-runtime's recorder folds an Event of the same type, reason and object published again
    # within six minutes into the first one (`series.count`), re-sending the first note: so the
    # Events are judged by their notes and their series, not by how many objects there are.
    problems = []
    reconciled_after(bed, "declined", "denied")
    denied = events_of(bed, "declined", "AuthorizationDenied")
    if [(e["type"], e.get("series")) for e in denied] != [("Warning", None)]:
        problems.append(f"one denial, one Warning published once: {[(e['type'], e.get('series')) for e in denied]}")
    bed.kubectl("annotate", "mbx", "declined", "-n", NS, "mailoauth.io/reauthorize-requested=1")
    wait_for("a new code", lambda: ((mbx(bed, "declined").get("status") or {}).get("authorization") or {}).get(
        "userCode") not in (None, first), timeout=30)
    second = mbx(bed, "declined")["status"]["authorization"]["userCode"]
    # The new code is what a person reads in the Events, as the first one was.
    try:
        wait_for("an AwaitingAuthorization Event with the new code", lambda: [
            e for e in events_of(bed, "declined", "AwaitingAuthorization") if second in e.get("note", "")],
            timeout=20, interval=0.5)
    except TimeoutError:
        problems.append(f"no Event shows the new code {second}: " + json.dumps(
            [(e.get("note"), e.get("series")) for e in events_of(bed, "declined", "AwaitingAuthorization")]))
    assert any(first in e.get("note", "") for e in events_of(bed, "declined", "AwaitingAuthorization"))
    # Approved before the Events are judged, so that a failure here leaves no binding polling
    # behind for the later tests' request counts.
    bed.oauth("/test/device/approve", {"userCode": second, "accountId": "declined@example.com"})
    wait_reason(bed, "declined", "TokenValid", timeout=30)
    assert not problems, "; ".join(problems)


# ---------- authorization code with PKCE, through the operator's own listener ----------
class NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):
        return None


def browser(bed):
    """A person's browser: keeps cookies, trusts the bed's CA, follows no redirect by itself."""
    jar = http.cookiejar.CookieJar()
    opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(jar), NoRedirect(),
                                         urllib.request.HTTPSHandler(context=bed.oauth_ctx))

    def get(url):
        try:
            with opener.open(url, timeout=30) as r:
                return r.status, r.headers.get("location"), r.read().decode(errors="replace")
        except urllib.error.HTTPError as e:
            return e.code, e.headers.get("location"), e.read().decode(errors="replace")
    return get


def sign_in(bed, get, url, account=None, deny=False, until=None):
    """Follows redirects from `url` through the provider's login and consent pages (signing in as
    `account`, or declining) until a URL starting with `until` (returned unvisited), or a page."""
    for _ in range(12):
        if until and url.startswith(until):
            return url
        if "/interaction/" in url:
            extra = {"account": account} if account else {}
            if deny:
                extra["deny"] = "1"
            if extra:
                url += ("&" if "?" in url else "?") + urllib.parse.urlencode(extra)
        status, location, body = get(url)
        if location is None:
            return status, body
        url = urllib.parse.urljoin(url, location)
    raise AssertionError("too many redirects")


def operator_with_listener(bed):
    port = free_port()
    bed.callback = f"http://127.0.0.1:{port}"
    assert bed.stop_operator() == 0
    bed.start_operator("--callback-address", f"127.0.0.1:{port}", "--public-url", bed.callback, env_extra=DEBUG)


def code_binding(name, mailbox, provider="idp-public"):
    return {"apiVersion": "mailoauth.io/v1alpha1", "kind": "MailboxBinding",
            "metadata": {"name": name, "namespace": NS},
            "spec": {"providerRef": {"name": provider}, "mailbox": mailbox, "protocols": ["imap"],
                     "grant": {"authorizationCode": {}}, "secretName": f"{name}-mail-token"}}


SECURITY_HEADERS = {
    "content-security-policy": "default-src 'none'; style-src 'unsafe-inline'; frame-ancestors 'none'; "
                               "base-uri 'none'; form-action 'none'",
    "x-frame-options": "DENY",
    "referrer-policy": "no-referrer",
    "cache-control": "no-store",
    "x-content-type-options": "nosniff",
}


def raw_get(url, cookie=None):
    """One GET with no cookie jar and no redirects: (status, headers, body)."""
    request = urllib.request.Request(url, headers={"Cookie": cookie} if cookie else {})
    opener = urllib.request.build_opener(NoRedirect())
    try:
        with opener.open(request, timeout=30) as r:
            return r.status, r.headers, r.read().decode(errors="replace")
    except urllib.error.HTTPError as e:
        return e.code, e.headers, e.read().decode(errors="replace")


def start_token(link):
    return urllib.parse.parse_qs(urllib.parse.urlsplit(link).query)["start"][0]


def grant_version(bed, name):
    """The grant-state Secret's resourceVersion, or None when there is none."""
    found = bed.kubectl("get", "secret", f"{name}.mailoauth-grant", "-n", NS, "-o", "json", "--ignore-not-found")
    return json.loads(found.stdout)["metadata"]["resourceVersion"] if found.stdout.strip() else None


def test_an_authorization_code_through_the_callback_turns_the_binding_ready_and_the_page_says_so(bed):
    operator_with_listener(bed)
    apply(bed, code_binding("web", "web@example.com"))
    waiting = wait_reason(bed, "web", "AwaitingAuthorization")
    link = mbx(bed, "web")["status"]["authorization"]["url"]
    assert link.startswith(f"{bed.callback}/authorize/{NS}/web?start=") and link in waiting["message"], link
    assert len(start_token(link)) >= 22, "at least 128 bits"
    reconciled_after(bed, "web", "waiting")
    assert mbx(bed, "web")["status"]["authorization"]["url"] == link, "the link stays while the binding waits"
    get = browser(bed)
    status, body = sign_in(bed, get, link)
    assert status == 200 and "Done" in body and "web@example.com" in body, body
    wait_reason(bed, "web", "TokenValid", timeout=30)
    s = mbx(bed, "web")["status"]
    assert s["account"] == "web@example.com"
    reply = imap_login(bed, published(bed, "web")["xoauth2"])
    assert reply.startswith("a1 OK"), reply


def test_a_replayed_or_forged_callback_changes_nothing(bed):
    apply(bed, code_binding("replay", "replay@example.com"))
    wait_reason(bed, "replay", "AwaitingAuthorization")
    link = mbx(bed, "replay")["status"]["authorization"]["url"]
    get = browser(bed)
    callback = sign_in(bed, get, link, until=f"{bed.callback}/callback")
    status, _, body = get(callback)
    assert status == 200 and "Done" in body, body
    wait_reason(bed, "replay", "TokenValid", timeout=30)
    requests = bed.oauth("/test/stats")["token_requests"]
    status, _, body = get(callback)
    assert status == 400 and "Nothing was changed" in body, body
    forged = callback.replace("state=", "state=x")
    status, _, body = get(forged)
    assert status == 400, body
    reconciled_after(bed, "replay", "replayed")
    assert bed.oauth("/test/stats")["token_requests"] == requests, "no token request for a replayed or forged callback"
    assert condition(mbx(bed, "replay"), "Ready")["reason"] == "TokenValid"


def test_a_start_link_missing_or_wrong_gets_one_page_for_every_binding_and_writes_nothing(bed):
    apply(bed, code_binding("guarded", "guarded@example.com"))
    wait_reason(bed, "guarded", "AwaitingAuthorization")
    link = mbx(bed, "guarded")["status"]["authorization"]["url"]
    start = start_token(link)
    wrong = ("B" if start[0] == "A" else "A") + start[1:]
    before = grant_version(bed, "guarded")
    base = f"{bed.callback}/authorize"
    pages = []
    for url, name in [
        (f"{base}/{NS}/guarded", "guarded"),
        (f"{base}/{NS}/guarded?start=", "guarded"),
        (f"{base}/{NS}/guarded?start={wrong}", "guarded"),
        (f"{base}/{NS}/guarded?start={start[:-1]}", "guarded"),
        (f"{base}/{NS}/nobody?start={start}", "nobody"),
        (f"{base}/{NS}/web?start={start}", "web"),         # exists, Ready: not waiting
        (f"{base}/{NS}/scanner?start={start}", "scanner"),  # exists, another grant
        (f"{base}/{NS}/nobody", "nobody"),
    ]:
        status, headers, body = raw_get(url)
        assert status == 404, (url, status, body)
        for k, v in SECURITY_HEADERS.items():
            assert headers.get(k) == v, (url, k, headers.get(k))
        assert headers.get("set-cookie") is None
        assert "example.com" not in body, body
        pages.append(body.replace(name, "NAME"))
    status, _, body = raw_get(f"{base}/elsewhere/guarded?start={start}")
    assert status == 404
    pages.append(body.replace("elsewhere", NS).replace("guarded", "NAME"))
    assert len(set(pages)) == 1, pages
    assert "kubectl get mbx -n consent NAME -o wide" in pages[0], pages[0]
    time.sleep(1)
    assert grant_version(bed, "guarded") == before, "no request was stored"
    # A re-authorization request makes a new link; the old one is then refused like any other.
    bed.kubectl("annotate", "mbx", "guarded", "-n", NS, "mailoauth.io/reauthorize-requested=1")
    wait_for("a new start link", lambda: (mbx(bed, "guarded")["status"].get("authorization") or {}).get("url")
             not in (None, link), timeout=30)
    assert raw_get(link)[0] == 404
    status, headers, _ = raw_get(mbx(bed, "guarded")["status"]["authorization"]["url"])
    assert status == 303 and headers.get("location", "").startswith(f"{bed.issuer}/"), headers.get("location")
    for k, v in SECURITY_HEADERS.items():
        assert headers.get(k) == v, (k, headers.get(k))
    cookie = headers.get("set-cookie")
    for part in ("HttpOnly", "SameSite=Lax", "Path=/callback", "Max-Age=900"):
        assert part in cookie, cookie


def test_a_callback_in_another_browser_is_refused_and_the_binding_still_awaits(bed):
    apply(bed, code_binding("csrf", "csrf@example.com"))
    wait_reason(bed, "csrf", "AwaitingAuthorization")
    link = mbx(bed, "csrf")["status"]["authorization"]["url"]
    mine = browser(bed)
    callback = sign_in(bed, mine, link, until=f"{bed.callback}/callback")
    stored = grant_version(bed, "csrf")
    requests = bed.oauth("/test/stats")["token_requests"]
    # The provider's redirect, captured and completed elsewhere: no cookie, or a forged one.
    state = urllib.parse.parse_qs(urllib.parse.urlsplit(callback).query)["state"][0]
    key = state.rsplit(".", 1)[0]
    pages = []
    for cookie in (None, f"mailoauth_{key}={state}", f"mailoauth_{key}={state}~{'A' * 43}"):
        status, headers, body = raw_get(callback, cookie)
        assert status == 400, (cookie, status, body)
        for k, v in SECURITY_HEADERS.items():
            assert headers.get(k) == v, (k, headers.get(k))
        assert "csrf@example.com" not in body and "csrf" not in body, body
        pages.append(body)
    status, _, body = browser(bed)(callback)
    assert status == 400
    pages.append(body)
    assert len(set(pages)) == 1, pages
    reconciled_after(bed, "csrf", "forged")
    assert grant_version(bed, "csrf") == stored, "nothing was written"
    assert bed.oauth("/test/stats")["token_requests"] == requests, "no token request"
    assert condition(mbx(bed, "csrf"), "Ready")["reason"] == "AwaitingAuthorization"
    # The browser that started it still completes it.
    status, _, body = mine(callback)
    assert status == 200 and "Done" in body, body
    wait_reason(bed, "csrf", "TokenValid", timeout=30)


def apiserver_secret_reads(bed):
    """The apiserver's count of single-Secret GETs, from its own /metrics."""
    text = bed.kubectl("get", "--raw", "/metrics").stdout
    total = 0.0
    for line in text.splitlines():
        if line.startswith("apiserver_request_total{") and 'resource="secrets"' in line \
                and 'verb="GET"' in line and 'scope="resource"' in line:
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_a_burst_of_bad_callbacks_never_reaches_the_apiserver(bed):
    from concurrent.futures import ThreadPoolExecutor
    apply(bed, code_binding("burst", "burst@example.com"))
    wait_reason(bed, "burst", "AwaitingAuthorization")
    status, headers, _ = raw_get(mbx(bed, "burst")["status"]["authorization"]["url"])
    assert status == 303
    state = urllib.parse.parse_qs(urllib.parse.urlsplit(headers["location"]).query)["state"][0]
    key = state.rsplit(".", 1)[0]
    time.sleep(2)
    reads = apiserver_secret_reads(bed)
    urls = [(f"{bed.callback}/callback?code=c{i}&state={state}", f"mailoauth_{key}={state}~{'x' * 43}" if i % 2 else None)
            for i in range(200)]
    started = time.monotonic()
    with ThreadPoolExecutor(max_workers=16) as pool:
        answers = list(pool.map(lambda u: raw_get(*u)[0], urls))
    elapsed = time.monotonic() - started
    REPORT["200 bad callbacks (s)"] = round(elapsed, 2)
    assert set(answers) <= {400, 503}, set(answers)
    assert answers.count(400) >= 150, answers
    assert elapsed < 20, elapsed
    delta = apiserver_secret_reads(bed) - reads
    REPORT["apiserver Secret reads during the burst"] = delta
    assert delta < 20, f"{delta} Secret reads: the bad callbacks reached the apiserver"
    with urllib.request.urlopen(f"http://127.0.0.1:{bed.ports['operator']}/readyz", timeout=5) as r:
        assert r.status == 200
    assert condition(mbx(bed, "burst"), "Ready")["reason"] == "AwaitingAuthorization"


def test_this_apiserver_refuses_a_server_side_apply_over_a_stale_resource_version(bed):
    """The listener's writes rely on it: an apply carrying metadata.resourceVersion is conditional."""
    bed.kubectl("create", "secret", "generic", "precondition", "-n", NS, "--from-literal=a=1")
    first = bed.kubectl_json("get", "secret", "precondition", "-n", NS)["metadata"]["resourceVersion"]
    bed.kubectl("patch", "secret", "precondition", "-n", NS, "-p", '{"stringData": {"a": "2"}}')
    doc = {"apiVersion": "v1", "kind": "Secret",
           "metadata": {"name": "precondition", "namespace": NS, "resourceVersion": first},
           "stringData": {"a": "3"}}
    result = bed.kubectl("apply", "--server-side", "--force-conflicts", "--field-manager", "e2e", "-f", "-",
                         input=json.dumps(doc), check=False)
    assert result.returncode != 0 and "modified" in (result.stderr + result.stdout), result
    value = bed.kubectl_json("get", "secret", "precondition", "-n", NS)["data"]["a"]
    assert base64.b64decode(value).decode() == "2"


def test_signing_in_as_someone_else_is_refused_and_nothing_is_stored(bed):
    apply(bed, code_binding("pinned", "pinned@example.com"))
    wait_reason(bed, "pinned", "AwaitingAuthorization")
    link = mbx(bed, "pinned")["status"]["authorization"]["url"]
    status, body = sign_in(bed, browser(bed), link, account="mallory@example.com")
    assert "Not authorized" in body and "mallory@example.com" in body, body
    c = wait_reason(bed, "pinned", "IdentityMismatch", type_="Authorized", timeout=30)
    assert "pinned@example.com" in c["message"]
    grant = bed.kubectl_json("get", "secret", "pinned.mailoauth-grant", "-n", NS)
    assert "refresh_token" not in (grant.get("data") or {})


def test_scopes_granted_beyond_a_cluster_providers_allowed_scopes_are_neither_stored_nor_published(bed):
    """The person edits `scope=` in the provider's authorize URL: the request asked for allowed
    scopes only, the provider grants more; the admin's limit holds for what was granted."""
    p = public_provider(bed, NS, "cp-scoped", "mail-device")
    p["kind"] = "ClusterMailProvider"
    del p["metadata"]["namespace"]
    p["spec"]["allowedScopes"] = ["openid", "offline_access", "email"]
    p["spec"]["allowedMailboxes"] = ["example.com"]
    apply(bed, p)
    wait_for("cp-scoped ready", lambda: any(c["type"] == "Ready" and c["status"] == "True" for c in (
        bed.kubectl_json("get", "clustermailprovider", "cp-scoped").get("status") or {}).get("conditions", [])),
        timeout=30)
    doc = code_binding("greedy", "greedy@example.com", provider="cp-scoped")
    doc["spec"]["providerRef"]["kind"] = "ClusterMailProvider"
    doc["spec"]["scopes"] = ["openid", "offline_access", "email"]
    apply(bed, doc)
    wait_reason(bed, "greedy", "AwaitingAuthorization")
    link = mbx(bed, "greedy")["status"]["authorization"]["url"]
    get = browser(bed)
    at_provider = sign_in(bed, get, link, until=bed.issuer)
    parts = urllib.parse.urlsplit(at_provider)
    query = urllib.parse.parse_qs(parts.query)
    assert query["scope"] == ["openid offline_access email"], query["scope"]
    query["scope"] = ["openid offline_access email mail"]
    edited = urllib.parse.urlunsplit(parts._replace(query=urllib.parse.urlencode(query, doseq=True)))
    sign_in(bed, get, edited, account="greedy@example.com")
    c = wait_reason(bed, "greedy", "ProviderNotAllowed", type_="Authorized", timeout=30)
    assert "mail" in c["message"] and "allowedScopes" in c["message"], c["message"]
    grant = bed.kubectl_json("get", "secret", "greedy.mailoauth-grant", "-n", NS)
    assert "refresh_token" not in (grant.get("data") or {}) and "access_token" not in (grant.get("data") or {})
    published = bed.kubectl("get", "secret", "greedy-mail-token", "-n", NS, "--ignore-not-found", "-o", "name")
    assert published.stdout.strip() == "", "a token with more than the allowed scopes was published"


def test_the_paste_path_and_an_authorization_interrupted_by_a_restart(bed):
    apply(bed, code_binding("pasted", "pasted@example.com"))
    wait_reason(bed, "pasted", "AwaitingAuthorization")
    link = mbx(bed, "pasted")["status"]["authorization"]["url"]
    get = browser(bed)
    # The browser cannot reach the operator's callback: the person copies the address instead.
    callback = sign_in(bed, get, link, until=f"{bed.callback}/callback")
    # The operator restarts between the request and the response; the request is in the grant state.
    assert bed.stop_operator() == 0
    bed.start_operator("--callback-address", bed.callback.replace("http://", ""), "--public-url", bed.callback,
                       env_extra=DEBUG)
    bed.kubectl("annotate", "mbx", "pasted", "-n", NS, "team.example.com/owner=mail-ops",
                f"mailoauth.io/authorization-response={callback}")
    wait_reason(bed, "pasted", "TokenValid", timeout=30)
    annotations = mbx(bed, "pasted")["metadata"].get("annotations") or {}
    assert "mailoauth.io/authorization-response" not in annotations, "consumed once, then removed"
    assert annotations.get("team.example.com/owner") == "mail-ops", "only the response was removed"
    reply = imap_login(bed, published(bed, "pasted")["xoauth2"])
    assert reply.startswith("a1 OK"), reply


def generic_provider(bed, name, client_id, **spec):
    p = public_provider(bed, NS, name, client_id)
    p["spec"].update(spec)
    return p


def test_a_client_with_a_certificate_gets_a_persons_token_that_logs_in_to_imap(bed):
    cert = secret(NS, "mail-cert-tls", {"tls.crt": (bed.dir / "client.crt").read_text(),
                                        "tls.key": (bed.dir / "client.key").read_text()})
    cert["type"] = "kubernetes.io/tls"
    apply(bed, cert, generic_provider(bed, "idp-cert", "mail-cert", clientAuthentication={
        "method": "privateKeyJwt", "certificateRef": {"name": "mail-cert-tls"}}))
    ready = wait_for("idp-cert Ready", lambda: (lambda c: c if c.get("reason") == "ProviderReady" else None)(
        condition(bed.kubectl_json("get", "mailprovider", "idp-cert", "-n", NS), "Ready")), timeout=30)
    assert ready
    provider_status = bed.kubectl_json("get", "mailprovider", "idp-cert", "-n", NS)["status"]
    assert provider_status.get("clientSecretExpiresAt"), "the certificate's expiry is shown"
    apply(bed, code_binding("certified", "certified@example.com", provider="idp-cert"))
    wait_reason(bed, "certified", "AwaitingAuthorization")
    status, body = sign_in(bed, browser(bed), mbx(bed, "certified")["status"]["authorization"]["url"])
    assert status == 200 and "Done" in body, body
    wait_reason(bed, "certified", "TokenValid", timeout=30)
    reply = imap_login(bed, published(bed, "certified")["xoauth2"])
    assert reply.startswith("a1 OK"), reply


def test_a_service_account_acting_for_a_mailbox_gets_a_token_that_logs_in_to_imap(bed):
    key = {"type": "service_account", "client_email": SERVICE_ACCOUNT, "private_key_id": "e2e",
           "private_key": (bed.dir / "gsa.key").read_text()}
    apply(bed, secret(NS, "gsa", {"key.json": json.dumps(key)}),
          generic_provider(bed, "idp-sa", "mail-sa", serviceAccountKeyRef={"name": "gsa", "key": "key.json"}))
    doc = code_binding("delegated", "delegated@example.com", provider="idp-sa")
    doc["spec"]["grant"] = {"jwtBearer": {}}
    apply(bed, doc)
    wait_reason(bed, "delegated", "TokenValid", timeout=30)
    assert "refresh_token" not in bed.kubectl_json("get", "secret", "delegated.mailoauth-grant", "-n", NS)["data"]
    reply = imap_login(bed, published(bed, "delegated")["xoauth2"])
    assert reply.startswith("a1 OK"), reply


def test_revoke_on_delete_revokes_the_refresh_token_before_the_binding_goes(bed):
    doc = device_binding(bed, NS, "revoked", "idp-public", "revoked@example.com")
    doc["spec"]["revokeOnDelete"] = True
    apply(bed, doc)
    wait_reason(bed, "revoked", "AwaitingAuthorization")
    assert "mailoauth.io/revoke-on-delete" in mbx(bed, "revoked")["metadata"].get("finalizers", [])
    code = mbx(bed, "revoked")["status"]["authorization"]["userCode"]
    bed.oauth("/test/device/approve", {"userCode": code, "accountId": "revoked@example.com"})
    wait_reason(bed, "revoked", "TokenValid", timeout=30)
    grant = bed.kubectl_json("get", "secret", "revoked.mailoauth-grant", "-n", NS)
    rt = base64.b64decode(grant["data"]["refresh_token"]).decode()
    bed.kubectl("delete", "mailboxbinding", "revoked", "-n", NS, "--wait=true", "--timeout=60s")
    form = urllib.parse.urlencode({"grant_type": "refresh_token", "refresh_token": rt, "client_id": "mail-device"}).encode()
    try:
        with urllib.request.urlopen(urllib.request.Request(f"{bed.issuer}/token", data=form), context=bed.oauth_ctx,
                                    timeout=10) as r:
            answer = json.loads(r.read())
    except urllib.error.HTTPError as e:
        answer = json.loads(e.read())
    assert answer.get("error") == "invalid_grant", f"the refresh token still works after the delete: {answer}"
    events = [e for e in bed.kubectl_json("get", "events.events.k8s.io", "-n", NS)["items"]
              if e.get("regarding", {}).get("name") == "revoked" and e.get("reason") == "Revoked"]
    assert events, "a Normal Revoked event"


def test_no_token_appears_in_the_operator_log_events_or_status(bed):
    # Every version of every Secret: device codes, PKCE verifiers and the codes the listener stored
    # for the moment they waited, refresh tokens, client secrets, the certificate's key.
    secret, shown, keys = bed.secret_watch.values()
    assert {"refresh_token", "access_token", "pending_device_code", "pending_code_verifier", "pending_code",
            "tls.key", *SHOWN_GRANT_KEYS} <= keys, keys
    log = (bed.dir / "operator.log").read_text(errors="replace")
    assert '"level":"DEBUG"' in log, "the log was written at debug level"
    events = bed.kubectl("get", "events", "-A", "-o", "json").stdout
    objects = bed.kubectl("get", "mailoauth", "-A", "-o", "json").stdout
    leaked = [f"{where}: {what[v]} ({v[:6]}...)" for what, haystacks in (
        (secret, {"operator log": log, "events": events, "mailoauth objects": objects}), (shown, {"operator log": log}))
        for where, text in haystacks.items() for v in what if v in text]
    assert not leaked, "secret values outside Secrets: " + "; ".join(leaked)
    assert "panicked" not in log
    REPORT["operator log lines"] = len(log.splitlines())
    REPORT["secret values looked for"] = len(secret) + len(shown)


def test_metrics_show_each_binding_from_the_caches_and_no_credential(bed):
    with urllib.request.urlopen(f"http://127.0.0.1:{bed.ports['operator']}/metrics", timeout=10) as r:
        text = r.read().decode()
    assert 'mailoauth_binding_ready{namespace="consent",binding="scanner"} 1' in text, text
    assert 'mailoauth_binding_token_expiry_timestamp_seconds{namespace="consent",binding="scanner"}' in text
    assert 'mailoauth_provider_client_secret_expiry_timestamp_seconds{namespace="consent",provider="MailProvider/idp-cert"}' in text
    assert 'outcome="ok"' in text and "mailoauth_token_request_duration_seconds_bucket" in text
    assert 'mailoauth_reconciles_total{kind="MailboxBinding",outcome="ok"}' in text
    assert 'binding="revoked"' not in text, "a deleted binding leaves no series"
    for name in ("scanner", "web", "pasted"):
        g = bed.kubectl_json("get", "secret", f"{name}.mailoauth-grant", "-n", NS)
        for key in ("refresh_token", "access_token"):
            assert base64.b64decode(g["data"][key]).decode() not in text
    REPORT["metrics lines"] = len(text.splitlines())
