"""Mailbox verification end to end against servers that say no: the operator (as the chart runs
it) checks bindings whose provider's `servers` point at the fake mail server (fake_mail.py)
answering with Exchange Online's exact texts, at hostile servers (a greeting that never ends, a
server that never answers, STARTTLS missing or refused), at a server whose certificate names
another host, and at the bed's Dovecot (POP3; a token of another user); an app-only token shaped
as Entra's puts its service principal into the fix commands; a token of about 10 KiB logs in (in
two steps) at servers that refuse command lines over 1 KiB. Each ends in its typed
reason within bounded time, with the fix commands naming the mailbox, one Event per change,
`Ready` untouched; the operator's memory stays flat; no token ever crossed a connection without
TLS, and none appears in logs, Events or status.

The tests run in file order and share the bed (test_verify.verify_bed, with the fake server)."""
import base64
import http.server
import json
import socket
import ssl
import threading
import time

import pytest
from bed import wait_for
from fake_mail import (IMAP_AUTHENTICATE_FAILED, POP3_AUTHENTICATION_FAILURE, SMTP_MAILBOX_DISABLED,
                       SMTP_TENANT_DISABLED)
from manifests import apply, provider, secret
from test_e2e import condition
from test_verify import NS, SEEN, assert_no_token_leaked, events, get, seeded_binding, verification, verify_bed

APP_MAILBOX = "app@example.com"  # the mailbox the bed's OAuth server puts into app-only tokens
SP_PLACEHOLDER = "<service principal object id>"


@pytest.fixture(scope="module")
def bed(request):
    yield from verify_bed(request, fake_mail=True)


def servers_provider(bed, name, **servers):
    """The bed's provider with `servers` = {protocol: (port, tls)} on 127.0.0.1, trusting the bed's
    CA (generic.caBundle), with POP3 scopes as IMAP's."""
    p = provider(bed, NS, name, "mail-app", "idp-client")
    g = p["spec"]["generic"]
    g["servers"] = {proto: {"host": "127.0.0.1", "port": port, "tls": tls} for proto, (port, tls) in servers.items()}
    g["scopes"]["pop3"] = g["scopes"]["imap"]
    return p


def delegated(bed, name, provider_name, protocol):
    """A seeded refresh-token binding for `<name>@example.com` checking `protocol` only."""
    docs = seeded_binding(bed, name, provider_name, f"{name}@example.com")
    docs[1]["spec"]["protocols"] = [protocol]
    docs[1]["spec"].pop("secretTemplate", None)
    return docs


def app_only(name, provider_name, protocol, mailbox=APP_MAILBOX):
    return [{"apiVersion": "mailoauth.io/v1alpha1", "kind": "MailboxBinding",
             "metadata": {"name": name, "namespace": NS},
             "spec": {"providerRef": {"name": provider_name}, "mailbox": mailbox, "scopes": ["mail"],
                      "protocols": [protocol], "grant": {"clientCredentials": {}},
                      "secretName": f"{name}-mail-token"}}]


def settled(bed, name, timeout):
    """The binding once its MailboxVerified is no longer Unknown (or absent)."""
    return wait_for(f"{name}: MailboxVerified True or False", lambda: (lambda o: o if condition(
        o, "MailboxVerified").get("status") in ("True", "False") else None)(get(bed, name)), timeout=timeout)


def expect(bed, name, protocol, reason, *fragments, timeout=90):
    """Waits for the binding's MailboxVerified; checks its reason, the protocol's result, the
    message fragments, `Ready` True and exactly one Event, a Warning with the reason. The
    binding."""
    obj = settled(bed, name, timeout)
    verified = condition(obj, "MailboxVerified")
    assert (verified["status"], verified["reason"]) == ("False", reason), (name, verified)
    result = verification(obj, protocol)
    assert result.get("result") == reason, (name, obj["status"].get("verification"))
    for fragment in fragments:
        assert fragment in result["message"], (name, fragment, result["message"])
        assert fragment in verified["message"], (name, fragment, verified["message"])
    ready = condition(obj, "Ready")
    assert (ready["status"], ready["reason"]) == ("True", "TokenValid"), (name, ready)
    assert obj["status"].get("failedAttempts", 0) == 0, "a failing check is no token failure"
    found = wait_for(f"{name}: the Warning Event", lambda: events(bed, name), timeout=10)
    assert [(e["type"], e["reason"]) for e in found] == [("Warning", reason)], (name, found)
    return obj


def test_exchange_onlines_refusals_end_in_their_reasons_with_the_fix_for_the_mailbox(bed):
    fake, cert = bed.fake_mail, bed.mail_cert
    smtp_tenant = fake.listen("smtp", "starttls", cert, answer=SMTP_TENANT_DISABLED, name="smtp-tenant")
    smtp_mailbox = fake.listen("smtp", "implicit", cert, answer=SMTP_MAILBOX_DISABLED, name="smtp-mailbox")
    imap_app = fake.listen("imap", "implicit", cert, answer=IMAP_AUTHENTICATE_FAILED, name="imap-app")
    pop3_app = fake.listen("pop3", "starttls", cert, answer=POP3_AUTHENTICATION_FAILURE, name="pop3-app")
    imap_off = fake.listen("imap", "starttls", cert, mode="not-connected", name="imap-off")
    SEEN.add("mail-app-secret")
    apply(bed, secret(NS, "idp-client", {"client-secret": "mail-app-secret"}),
          servers_provider(bed, "exchange", smtp=(smtp_tenant, "starttls"), imap=(imap_app, "implicit"),
                           pop3=(pop3_app, "starttls")),
          servers_provider(bed, "exchange-mailbox", smtp=(smtp_mailbox, "implicit"), imap=(imap_off, "starttls")),
          *delegated(bed, "smtp-off-tenant", "exchange", "smtp"),
          *delegated(bed, "smtp-off-mailbox", "exchange-mailbox", "smtp"),
          *delegated(bed, "imap-off", "exchange-mailbox", "imap"),
          *delegated(bed, "imap-delegated", "exchange", "imap"),
          *app_only("app-imap", "exchange", "imap"),
          *app_only("app-pop3", "exchange", "pop3"))
    started = time.monotonic()
    tenant_fix = "Set-TransportConfig -SmtpClientAuthenticationDisabled $false"
    expect(bed, "smtp-off-tenant", "smtp", "SmtpAuthDisabled", "535 5.7.139", "disabled for the tenant",
           "Set-CASMailbox -Identity smtp-off-tenant@example.com -SmtpClientAuthenticationDisabled $false",
           tenant_fix)
    expect(bed, "smtp-off-mailbox", "smtp", "SmtpAuthDisabled", "disabled for the mailbox",
           "Set-CASMailbox -Identity smtp-off-mailbox@example.com -SmtpClientAuthenticationDisabled $false")
    expect(bed, "imap-off", "imap", "ProtocolDisabled", "User is authenticated but not connected.",
           "Set-CASMailbox -Identity imap-off@example.com -ImapEnabled $true")
    # The bed's OAuth server issues opaque tokens: the commands keep the placeholder and say where
    # the id is found, with the provider's client id (a JWT's oid is filled in: unit-tested).
    for name, protocol in (("app-imap", "imap"), ("app-pop3", "pop3")):
        expect(bed, name, protocol, "MailboxAccessDenied",
               f"Add-MailboxPermission -Identity {APP_MAILBOX} -User {SP_PLACEHOLDER} -AccessRights FullAccess",
               f"Add-RecipientPermission -Identity {APP_MAILBOX} -Trustee {SP_PLACEHOLDER} -AccessRights SendAs",
               "Enterprise applications", "Get-ServicePrincipal | Where-Object AppId -eq 'mail-app'")
    # The same "AUTHENTICATE failed." for a person's token: refused, with the likely causes.
    expect(bed, "imap-delegated", "imap", "LoginRefused", "AUTHENTICATE failed.",
           "the token may be for another user than imap-delegated@example.com",
           "Set-CASMailbox -Identity imap-delegated@example.com -ImapEnabled $true")
    print(f"\nsix Exchange refusals said {time.monotonic() - started:.1f}s after apply")
    # Each server was sent the mailbox's token, under TLS only (after STARTTLS where configured).
    for listener, user in (("smtp-tenant", "smtp-off-tenant@example.com"),
                           ("smtp-mailbox", "smtp-off-mailbox@example.com"),
                           ("imap-off", "imap-off@example.com"), ("imap-app", APP_MAILBOX),
                           ("imap-app", "imap-delegated@example.com"),
                           ("pop3-app", APP_MAILBOX)):
        logins = [login for login in fake.logins_at(listener) if login.user == user]
        assert logins and all(login.tls for login in logins), (listener, user, fake.logins_at(listener))
    assert not fake.plaintext_logins()
    wide = bed.kubectl("get", "mbx", "-n", NS, "-o", "wide").stdout
    for reason in ("SmtpAuthDisabled", "ProtocolDisabled", "MailboxAccessDenied"):
        assert reason in wide, wide


SERVICE_PRINCIPAL = "6d1b2a55-0c1f-4a4e-9f4e-5a1f0b0c2d3e"
CLIENT_ID = "0e3b5f2a-7c1d-4e8f-9a6b-1c2d3e4f5a6b"


class EntraLikeTokens(http.server.BaseHTTPRequestHandler):
    """A token endpoint answering every request with an app-only access token shaped as Entra's:
    a JWT naming the application's service principal (`oid`) and client id (`appid`). Its
    signature is a stand-in: the operator reads the payload for display only."""
    protocol_version = "HTTP/1.1"
    padding = 0  # characters of an extra claim (a long token, as Entra's with many groups)
    issued = []  # the tokens issued (kept by the tests for the leak check)

    def log_message(self, *args):
        pass

    def do_POST(self):  # noqa: N802 - http.server's naming
        self.rfile.read(int(self.headers.get("content-length") or 0))
        part = lambda d: base64.urlsafe_b64encode(json.dumps(d).encode()).decode().rstrip("=")  # noqa: E731
        claims = {"aud": "https://outlook.office365.com", "appid": CLIENT_ID, "oid": SERVICE_PRINCIPAL,
                  "roles": ["IMAP.AccessAsApp"], "iat": int(time.time()), "jti": str(time.monotonic_ns())}
        if self.padding:
            claims["groups"] = "g" * self.padding
        token = f"{part({'typ': 'JWT', 'alg': 'RS256'})}.{part(claims)}.c2lnbmF0dXJl"
        self.issued.append(token)
        body = json.dumps({"access_token": token, "token_type": "Bearer", "expires_in": 3600}).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


class LongTokens(EntraLikeTokens):
    """As EntraLikeTokens, with access tokens of about 10 KiB (base64 of the XOAUTH2 response:
    about 14 KiB), as Entra issues for users in many groups."""
    padding = 7 * 1024
    issued = []


def token_endpoint(bed, handler):
    """An HTTPS server (the bed's mail certificate) answering with `handler`; the server."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(*map(str, bed.mail_cert))
    server.socket = ctx.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def with_token_url(provider_doc, server):
    g = provider_doc["spec"]["generic"]
    del g["issuerUrl"]
    g["tokenUrl"] = f"https://127.0.0.1:{server.server_address[1]}/tenant/oauth2/v2.0/token"
    return provider_doc


def test_an_entra_app_only_token_puts_its_service_principal_into_the_commands(bed):
    server = token_endpoint(bed, EntraLikeTokens)
    try:
        p = with_token_url(servers_provider(bed, "entra-like", imap=(bed.fake_mail.listeners["imap-app"].port,
                                                                      "implicit")), server)
        apply(bed, p, *app_only("app-entra", "entra-like", "imap"))
        expect(bed, "app-entra", "imap", "MailboxAccessDenied",
               f"Add-MailboxPermission -Identity {APP_MAILBOX} -User {SERVICE_PRINCIPAL} -AccessRights FullAccess",
               f"Add-RecipientPermission -Identity {APP_MAILBOX} -Trustee {SERVICE_PRINCIPAL} -AccessRights SendAs",
               "the token's oid claim")
        assert SP_PLACEHOLDER not in condition(get(bed, "app-entra"), "MailboxVerified")["message"]
    finally:
        server.shutdown()
    SEEN.update(EntraLikeTokens.issued)


def test_a_token_of_more_than_8_kib_logs_in_in_two_steps_where_long_first_lines_are_refused(bed):
    fake, cert = bed.fake_mail, bed.mail_cert
    smtp = fake.listen("smtp", "starttls", cert, mode="short-lines", name="smtp-short")
    imap = fake.listen("imap", "implicit", cert, mode="short-lines", name="imap-short")
    pop3 = fake.listen("pop3", "implicit", cert, mode="short-lines", name="pop3-short")
    server = token_endpoint(bed, LongTokens)
    try:
        p = with_token_url(servers_provider(bed, "long-tokens", smtp=(smtp, "starttls"), imap=(imap, "implicit"),
                                            pop3=(pop3, "implicit")), server)
        doc = app_only("long-token", "long-tokens", "imap")
        doc[0]["spec"]["protocols"] = ["smtp", "imap", "pop3"]
        apply(bed, p, *doc)
        obj = settled(bed, "long-token", timeout=90)
    finally:
        server.shutdown()
    SEEN.update(LongTokens.issued)
    assert LongTokens.issued and min(len(t) for t in LongTokens.issued) > 8 * 1024, \
        [len(t) for t in LongTokens.issued]
    verified = condition(obj, "MailboxVerified")
    assert (verified["status"], verified["reason"]) == ("True", "Verified"), verified
    for protocol in ("smtp", "imap", "pop3"):
        assert verification(obj, protocol).get("result") == "Verified", (protocol, obj["status"]["verification"])
    published = bed.kubectl_json("get", "secret", "long-token-mail-token", "-n", NS)
    token = base64.b64decode(published["data"]["access_token"]).decode()
    assert len(token) > 8 * 1024 and token in LongTokens.issued
    for name in ("smtp-short", "imap-short", "pop3-short"):
        listener, logins = fake.listeners[name], fake.logins_at(name)
        # The token came alone, after the server's challenge, in one line of more than 8 KiB;
        # every command line was short (none was refused).
        assert logins and all(login.continuation and login.tls and login.user == APP_MAILBOX for login in logins), \
            (name, logins)
        assert all(login.size > 8 * 1024 for login in logins), (name, [login.size for login in logins])
        assert listener.longest_command <= 64 and listener.refused_long == 0, \
            (name, listener.longest_command, listener.refused_long)
    # The same token as an initial response (one first line) is what these servers refuse.
    assert refused_as_initial_response(fake.listeners["imap-short"].port, APP_MAILBOX, token) == "a1 BAD Line too long"
    print(f"\na {len(token)}-byte token verified in two steps at servers refusing lines over 1 KiB")


def refused_as_initial_response(port, mailbox, token):
    """The fake IMAP server's answer (implicit TLS) to `AUTHENTICATE XOAUTH2 <response>` in one line."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    response = base64.b64encode(f"user={mailbox}\x01auth=Bearer {token}\x01\x01".encode()).decode()
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw, \
            ctx.wrap_socket(raw, server_hostname="127.0.0.1") as s:
        f = s.makefile("rb")
        f.readline()
        s.sendall(f"a1 AUTHENTICATE XOAUTH2 {response}\r\n".encode())
        return f.readline().decode().strip()


def test_the_same_refusal_again_makes_no_new_event(bed):
    before = verification(get(bed, "smtp-off-tenant"), "smtp")["checkedAt"]
    time.sleep(1.1)  # checkedAt has whole seconds
    bed.kubectl("annotate", "mailboxbinding", "smtp-off-tenant", "-n", NS, "mailoauth.io/verify-requested=again")
    wait_for("a new check", lambda: verification(get(bed, "smtp-off-tenant"), "smtp").get("checkedAt") != before,
             timeout=30)
    time.sleep(1)
    assert [(e["type"], e["reason"]) for e in events(bed, "smtp-off-tenant")] == [("Warning", "SmtpAuthDisabled")]
    assert len(bed.fake_mail.logins_at("smtp-tenant")) >= 2, "checked again at the server"


def test_a_certificate_for_another_host_is_tls_failed_naming_the_host_and_no_token_is_sent(bed):
    fake = bed.fake_mail
    port = fake.listen("imap", "implicit", bed.elsewhere_cert, name="imap-elsewhere")
    apply(bed, servers_provider(bed, "elsewhere", imap=(port, "implicit")),
          *delegated(bed, "wrong-cert", "elsewhere", "imap"))
    expect(bed, "wrong-cert", "imap", "TLSFailed", "the certificate presented by 127.0.0.1 does not name 127.0.0.1",
           "the token was not sent")
    assert fake.listeners["imap-elsewhere"].connections >= 1, "the operator did connect"
    assert fake.logins_at("imap-elsewhere") == []


def rss_kib(bed, name="operator"):
    for line in open(f"/proc/{bed.procs[name].pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def test_hostile_servers_end_in_a_typed_reason_in_bounded_time_and_memory_without_a_token_in_clear(bed):
    fake, cert = bed.fake_mail, bed.mail_cert
    cases = {  # binding: (protocol, listener mode, reason, message fragment)
        "endless-greeting": ("smtp", "endless", "ServerUnreachable", "longer than 8192 bytes during the greeting"),
        "silent": ("imap", "silent", "ServerUnreachable", "no answer in time during the greeting"),
        "no-starttls": ("imap", "no-starttls", "TLSFailed", "does not offer STARTTLS"),
        "starttls-refused-smtp": ("smtp", "starttls-refused", "TLSFailed", "refused STARTTLS: 454 4.7.0"),
        "starttls-refused-pop3": ("pop3", "starttls-refused", "TLSFailed", "refused STARTTLS: -ERR"),
    }
    docs = []
    for name, (protocol, mode, _, _) in cases.items():
        port = fake.listen(protocol, "starttls", cert, mode=mode, name=name)
        docs += [servers_provider(bed, f"hostile-{name}", **{protocol: (port, "starttls")}),
                 *delegated(bed, name, f"hostile-{name}", protocol)]
    before = rss_kib(bed)
    started = time.monotonic()
    apply(bed, *docs)
    for name, (protocol, _, reason, fragment) in cases.items():
        # Bounded: the check's own limits (20 s a reply, 45 s a check) plus the time to a token.
        expect(bed, name, protocol, reason, fragment, timeout=120)
    elapsed = time.monotonic() - started
    time.sleep(2)
    after = rss_kib(bed)
    print(f"\nhostile servers said in {elapsed:.1f}s; operator RSS {before} KiB before, {after} KiB after;"
          f" the endless greeting got {fake.listeners['endless-greeting'].sent} bytes out")
    assert elapsed < 150, elapsed
    assert after - before < 6 * 1024, f"RSS grew by {after - before} KiB"
    # The client stopped reading the 100 MB line (the rest never left the fake server).
    assert fake.listeners["endless-greeting"].sent < 100 * 1024 * 1024
    for name in cases:
        assert fake.listeners[name].connections >= 1, name
        assert fake.logins_at(name) == [], (name, "a token was sent where TLS was not set up")
    assert not fake.plaintext_logins(), "no token ever crossed a connection without TLS"


def test_pop3_at_the_beds_dovecot_is_verified(bed):
    apply(bed, servers_provider(bed, "dovecot-pop3", pop3=(bed.ports["pop3"], "none")),
          *delegated(bed, "pop3", "dovecot-pop3", "pop3"))
    obj = settled(bed, "pop3", timeout=90)
    verified = condition(obj, "MailboxVerified")
    assert (verified["status"], verified["reason"]) == ("True", "Verified"), verified
    assert verification(obj, "pop3")["result"] == "Verified", obj["status"]["verification"]
    log = (bed.dir / "dovecot.log").read_text(errors="replace")
    assert any("pop3-login" in line and "Login: user=<pop3@example.com>" in line for line in log.splitlines()), \
        log[-2000:]
    assert [(e["type"], e["reason"]) for e in events(bed, "pop3")] == [("Normal", "MailboxVerified")]


def test_a_token_of_another_user_is_login_refused_at_dovecot(bed):
    # The bed's app-only tokens are for app@example.com; Dovecot refuses them for anyone else.
    apply(bed, servers_provider(bed, "dovecot-imap", imap=(bed.ports["imap"], "none")),
          *app_only("someone-else", "dovecot-imap", "imap", mailbox="someone@example.com"))
    expect(bed, "someone-else", "imap", "LoginRefused", "Authentication failed",
           "check that the token is for someone@example.com")


def test_no_token_appears_in_logs_events_or_status(bed):
    assert not bed.fake_mail.plaintext_logins()
    assert_no_token_leaked(bed)
