"""The shared relay end to end (`relay --shared`, the chart's `relay.enabled`): the operator (as
the chart runs it) publishes relay credentials for bindings with `spec.relay.enabled` in three
namespaces; the shared relay, started as the chart's relay Deployment runs it (its container's
args and environment from `helm template`, a kubeconfig with its own ServiceAccount, so the
chart's RBAC is what lets it read the two namespaces it serves), reads them through the API.
Real clients (imaplib to the bed's Dovecot, smtplib to the bed's Postfix when root) log in with
nothing but the published `relay_username` and `relay_password`, under STARTTLS with a
certificate of the bed's CA: a mailbox bound once by itself, a mailbox bound in two namespaces
by itself (the password picks the binding) or as `namespace/mailbox`; a rotation is picked up without a restart (old and new passwords
both work during the grace); a binding whose relay is turned off, and one in a namespace not
served, do not work; the relay's metrics count it all, and no password reaches its log.

The relay serves only what the operator signed (its key in a Secret of the operator's namespace,
made on first need): a tenant of one served namespace who labels a Secret of its own as published,
claiming another namespace's mailbox, is not served and does not make that mailbox's bare name
ambiguous; a signed Secret copied into another namespace is refused; a deleted key is made anew,
every published Secret is signed again, and the relay keeps serving them.

The tests run in file order and build on each other; the bed is shared by the module."""
import base64
import imaplib
import os
import smtplib
import socket
import ssl
import urllib.request

import pytest
import yaml
from bed import BED_VALUES, CHART, OPERATOR_NAMESPACE, PASSED_ENV, RELEASE, Bed, chart_command, free_port, wait_for
from manifests import apply, provider, relay_binding, secret
from test_e2e import find_leaks

SERVED = ("shared-a", "shared-b")
OUTSIDE = "shared-c"
TWICE = "twice-box@example.com"  # bound in shared-a and shared-b
SOLO = "solo-box@example.com"  # bound in shared-a only
FAR = "far-box@example.com"  # bound in shared-c, not served
# The chart's values for the relay: served namespaces (Roles there only), STARTTLS listeners
# with the certificate Secret (the bed points TLS_CERT_DIR at a folder like its mount).
SIGNING_KEY = "mail-oauth-operator-relay-signing"  # the chart's Secret name for the signing key
SIGNATURE = "mailoauth.io/relay-signature"
PUBLISHED_LABELS = {"app.kubernetes.io/managed-by": "mail-oauth-operator", "mailoauth.io/secret-role": "published"}
RELAY_VALUES = ("--set", "relay.enabled=true", "--set", "relay.tls.secretName=relay-tls",
                "--set", "relay.namespaces={shared-a,shared-b}", "--set", "relay.listeners.pop3=true")
SEEN = {}  # secret values the tests saw: value -> what
SOURCES = iter(f"127.0.{i // 250 + 1}.{i % 250 + 2}" for i in range(10_000))


@pytest.fixture(scope="module")
def bed(request):
    b = Bed(fast_ttl=30)
    try:
        b.up()
        for ns in (*SERVED, OUTSIDE):
            b.kubectl("create", "namespace", ns)
        b.helm_install(*RELAY_VALUES)
        b.start_operator()
    except BaseException:
        b.dump_logs()
        b.down()
        raise
    yield b
    if request.session.testsfailed:
        b.dump_logs()
    b.down()


def published(bed, namespace, name):
    s = bed.kubectl_json("get", "secret", f"{name}-mail-token", "-n", namespace)
    return {k: base64.b64decode(v).decode() for k, v in (s.get("data") or {}).items()}


def password(bed, namespace, name):
    data = wait_for(f"relay keys in {namespace}/{name}",
                    lambda: (lambda d: d if "relay_password" in d else None)(published(bed, namespace, name)))
    SEEN[data["relay_password"]] = f"relay password of {namespace}/{name}"
    SEEN[data["access_token"]] = f"access token of {namespace}/{name}"
    return data["relay_password"]


def annotations(bed, namespace, name):
    return bed.kubectl_json("get", "secret", name, "-n", namespace)["metadata"].get("annotations") or {}


def refused_secrets(bed, reason):
    return bed.metrics("relay").get(f'mailoauth_relay_secrets_refused_total{{reason="{reason}"}}', 0)


def signing_key(bed):
    s = bed.kubectl_json("get", "secret", SIGNING_KEY, "-n", OPERATOR_NAMESPACE)
    SEEN[s["data"]["key"]] = "the relay signing key (base64)"
    SEEN[base64.b64decode(s["data"]["key"]).hex()] = "the relay signing key (hex)"
    return s["data"]["key"]


def tls(bed):
    return ssl.create_default_context(cafile=str(bed.dir / "ca.crt"))


def start_relay(bed):
    """The chart's relay Deployment as a local process: its args and env, its ServiceAccount; the
    listeners on free loopback ports, the certificate folder the bed's."""
    rendered = bed.helm("template", RELEASE, str(CHART), "--namespace", OPERATOR_NAMESPACE, *BED_VALUES,
                        *bed.chart_values, "--show-only", "templates/relay.yaml").stdout
    deployment = next(d for d in yaml.safe_load_all(rendered) if d and d["kind"] == "Deployment")
    cmd, container_env, probe = chart_command(deployment, bed.operator_bin, "relay", container_name="relay")
    assert cmd[1:] == ["relay", "--shared"]
    assert container_env["WATCH_NAMESPACES"] == ",".join(SERVED)
    env = {k: os.environ[k] for k in PASSED_ENV if k in os.environ}
    env.update(container_env)
    ports = {}
    for key in [k for k in env if k.endswith("_ADDRESS") and k != "LISTEN_ADDRESS"]:
        ports[key.removesuffix("_ADDRESS").lower()] = port = free_port()
        env[key] = f"127.0.0.1:{port}"
    admin = bed.ports["relay"] = free_port()
    env["LISTEN_ADDRESS"] = f"127.0.0.1:{admin}"
    certs = bed.dir / "relay-tls"
    certs.mkdir(exist_ok=True)
    bed.sign("relay", "/CN=127.0.0.1", "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\n")
    for name in ("crt", "key"):
        (certs / f"tls.{name}").write_bytes((bed.dir / f"relay.{name}").read_bytes())
    assert container_env["TLS_CERT_DIR"] == "/etc/relay-tls"
    env["TLS_CERT_DIR"] = str(certs)
    service_account = deployment["spec"]["template"]["spec"]["serviceAccountName"]
    env["KUBECONFIG"] = str(bed.service_account_kubeconfig(service_account, path=bed.dir / "relay.kubeconfig"))
    bed.start("relay", cmd, env=env)
    wait_for("the shared relay ready", lambda: bed.alive("relay") and urllib.request.urlopen(
        f"http://127.0.0.1:{admin}{probe}", timeout=2).status == 200, timeout=60)
    bed.relay_ports = ports
    return ports


class Imap(imaplib.IMAP4):
    """imaplib from a chosen loopback address (the relay counts failed logins per address)."""

    def __init__(self, port, source):
        self.source = source
        super().__init__("127.0.0.1", port, timeout=30)

    def _create_socket(self, timeout):
        return socket.create_connection((self.host, self.port), timeout, source_address=(self.source, 0))


def imap_login(bed, user, secret_value, source="127.0.0.1"):
    """Logs in through the relay under STARTTLS and opens INBOX: "OK", or the server's refusal."""
    m = Imap(bed.relay_ports["imap"], source)
    try:
        m.starttls(ssl_context=tls(bed))
        try:
            m.login(user, secret_value)
        except imaplib.IMAP4.error as e:
            return str(e)
        typ, _ = m.select("INBOX")
        m.logout()
        return typ
    finally:
        try:
            m.shutdown()
        except OSError:
            pass


def refused(bed, user, secret_value):
    """A login from an address of its own that the relay refuses as wrong credentials."""
    answer = imap_login(bed, user, secret_value, source=next(SOURCES))
    return answer != "OK" and "AUTHENTICATIONFAILED" in answer


def test_the_operator_publishes_relay_credentials_in_every_namespace(bed):
    docs = []
    for ns, name, mailbox in ((SERVED[0], "twice", TWICE), (SERVED[1], "twice", TWICE),
                              (SERVED[0], "solo", SOLO), (OUTSIDE, "far", FAR)):
        if not any(d["kind"] == "MailProvider" and d["metadata"]["namespace"] == ns for d in docs):
            docs += [secret(ns, "idp-client", {"client-secret": "mail-app-secret"}),
                     provider(bed, ns, "idp", "mail-app", "idp-client")]
        binding_docs, seed = relay_binding(bed, ns, name, mailbox)
        SEEN[seed] = f"seed refresh token of {ns}/{name}"
        docs += binding_docs
    apply(bed, *docs)
    for ns, name in ((SERVED[0], "twice"), (SERVED[1], "twice"), (SERVED[0], "solo"), (OUTSIDE, "far")):
        password(bed, ns, name)
    # The chart's RBAC: the relay's ServiceAccount reads Secrets where it serves, and nowhere else.
    who = f"--as=system:serviceaccount:{OPERATOR_NAMESPACE}:{RELEASE}-relay"
    for ns in SERVED:
        assert bed.kubectl("auth", "can-i", "watch", "secrets", "-n", ns, who).stdout.strip() == "yes"
    assert bed.kubectl("auth", "can-i", "list", "secrets", "-n", OUTSIDE, who, check=False).stdout.strip() == "no"
    assert bed.kubectl("auth", "can-i", "create", "secrets", "-n", SERVED[0], who, check=False).stdout.strip() == "no"
    # The operator signed what it published with relay keys, with a key it made in its namespace;
    # the relay may read that one Secret there, and no other.
    signing_key(bed)
    for ns, name in ((SERVED[0], "solo"), (OUTSIDE, "far")):
        assert annotations(bed, ns, f"{name}-mail-token")[SIGNATURE].startswith("v1.")
    assert bed.kubectl("auth", "can-i", "get", f"secret/{SIGNING_KEY}", "-n", OPERATOR_NAMESPACE, who,
                       check=False).stdout.strip() == "yes"
    assert bed.kubectl("auth", "can-i", "get", "secret/anything-else", "-n", OPERATOR_NAMESPACE, who,
                       check=False).stdout.strip() == "no"


def test_clients_log_in_through_the_shared_relay_with_the_published_credentials(bed):
    start_relay(bed)
    solo = password(bed, SERVED[0], "solo")
    twice_a, twice_b = password(bed, SERVED[0], "twice"), password(bed, SERVED[1], "twice")
    # A mailbox bound once: its relay_username alone.
    assert imap_login(bed, SOLO, solo) == "OK"
    assert imap_login(bed, f"{SERVED[0]}/{SOLO}", solo) == "OK"
    # A mailbox bound in two namespaces: namespace/mailbox, each with its own password.
    assert imap_login(bed, f"{SERVED[0]}/{TWICE}", twice_a) == "OK"
    assert imap_login(bed, f"{SERVED[1]}/{TWICE}", twice_b) == "OK"
    # The bare name too: the password picks the binding, so a binding of the same mailbox in
    # another namespace (any tenant can have one published) locks neither out, and reaches
    # neither without its password.
    assert imap_login(bed, TWICE, twice_a) == "OK"
    assert imap_login(bed, TWICE, twice_b) == "OK"
    assert refused(bed, TWICE, "not the password")
    assert refused(bed, f"{SERVED[1]}/{TWICE}", twice_a)
    assert refused(bed, SOLO, "not the password")
    # A binding in a namespace not served is not served, by either name.
    far = password(bed, OUTSIDE, "far")
    assert refused(bed, FAR, far)
    assert refused(bed, f"{OUTSIDE}/{FAR}", far)


@pytest.mark.skipif(os.geteuid() != 0, reason="Postfix runs only as root")
def test_smtp_submission_through_the_shared_relay_reaches_the_real_postfix(bed):
    solo = password(bed, SERVED[0], "solo")
    with smtplib.SMTP("127.0.0.1", bed.relay_ports["smtp"], timeout=30) as s:
        s.starttls(context=tls(bed))
        s.login(SOLO, solo)
        s.sendmail(SOLO, ["user@e2e.localhost"], b"Subject: shared\r\n\r\nthrough the shared relay\r\n")
    log = (bed.dir / "postfix.log").read_text(errors="replace")
    assert f"sasl_username={SOLO}" in log, "the upstream login was the mailbox's, by XOAUTH2"


def test_a_tenants_forged_secret_is_not_served_and_leaves_the_real_mailbox_unambiguous(bed):
    """A tenant who may create Secrets in shared-b (not in shared-a, not in the operator's
    namespace) labels Secrets of its own as published: one claiming shared-a's mailbox unsigned,
    one with a made-up signature, and a copy of shared-a's signed Secret whole."""
    solo = password(bed, SERVED[0], "solo")
    real = bed.kubectl_json("get", "secret", "solo-mail-token", "-n", SERVED[0])
    data = {k: base64.b64decode(v).decode() for k, v in real["data"].items()}
    forged = dict(data, relay_password="forged-password", relay_senders="ceo@example.com")
    key_id = real["metadata"]["annotations"][SIGNATURE].split(".")[1]
    docs = []
    for name, note in (("forged-unsigned", {}), ("forged-signed", {SIGNATURE: f"v1.{key_id}.{'ab' * 32}"})):
        doc = secret(SERVED[1], name, forged, referable=False)
        doc["metadata"].update(labels=PUBLISHED_LABELS, annotations=note)
        docs.append(doc)
    copy = secret(SERVED[1], "solo-mail-token", data, referable=False)
    copy["metadata"].update(labels=PUBLISHED_LABELS, annotations={SIGNATURE: real["metadata"]["annotations"][SIGNATURE]})
    docs.append(copy)
    before = {r: refused_secrets(bed, r) for r in ("unsigned", "bad_signature")}
    apply(bed, *docs)
    wait_for("the relay refuses the forgeries", lambda: refused_secrets(bed, "unsigned") > before["unsigned"]
             and refused_secrets(bed, "bad_signature") >= before["bad_signature"] + 2, timeout=30)
    # The real mailbox keeps its bare name; the forged password and the copy serve nothing.
    assert imap_login(bed, SOLO, solo) == "OK"
    assert refused(bed, SOLO, "forged-password")
    assert refused(bed, f"{SERVED[1]}/{SOLO}", "forged-password")
    assert refused(bed, f"{SERVED[1]}/{SOLO}", solo)
    assert imap_login(bed, f"{SERVED[0]}/{SOLO}", solo) == "OK"
    log = (bed.dir / "relay.log").read_text(errors="replace")
    assert "forged-signed" in log and "bad_signature" in log, "the refusal is logged with its reason"
    assert "forged-password" not in log
    bed.kubectl("delete", "secret", "-n", SERVED[1], "forged-unsigned", "forged-signed", "solo-mail-token")


def test_a_rotation_is_picked_up_without_a_restart_and_the_old_password_works_during_its_grace(bed):
    old = password(bed, SERVED[0], "solo")
    bed.kubectl("patch", "mailboxbinding", "solo", "-n", SERVED[0], "--type=merge",
                "-p", '{"spec":{"relay":{"rotationGracePeriod":"5m"}}}')
    bed.kubectl("annotate", "--overwrite", "mailboxbinding", "solo", "-n", SERVED[0],
                "mailoauth.io/rotate-relay-password=shared-1")
    new = wait_for("a new relay password", lambda: (lambda p: p if p != old else None)(
        published(bed, SERVED[0], "solo").get("relay_password")))
    SEEN[new] = "rotated relay password"
    # Each try from an address of its own: a try before the relay saw the update is a failure.
    wait_for("the relay takes the new password",
             lambda: imap_login(bed, SOLO, new, source=next(SOURCES)) == "OK", interval=1, timeout=30)
    assert imap_login(bed, SOLO, old) == "OK", "the previous password works during its grace"
    assert bed.alive("relay")


def test_a_deleted_signing_key_is_made_anew_and_every_published_secret_signed_again(bed):
    old_key = signing_key(bed)
    old = {(ns, n): annotations(bed, ns, f"{n}-mail-token")[SIGNATURE]
           for ns, n in ((SERVED[0], "solo"), (SERVED[0], "twice"), (SERVED[1], "twice"))}
    bed.kubectl("delete", "secret", SIGNING_KEY, "-n", OPERATOR_NAMESPACE)
    # Made anew by the operator (a missing Secret is an error here: not yet).
    new_key = wait_for("a new signing key", lambda: (lambda k: k if k != old_key else None)(
        bed.kubectl_json("get", "secret", SIGNING_KEY, "-n", OPERATOR_NAMESPACE)["data"]["key"]), timeout=60)
    signing_key(bed)
    for (ns, n), signature in old.items():
        wait_for(f"{ns}/{n} signed again", lambda: annotations(bed, ns, f"{n}-mail-token")[SIGNATURE].split(".")[1]
                 != signature.split(".")[1], timeout=60)
    assert new_key != old_key
    # The relay takes the new key and serves the Secrets signed with it.
    wait_for("the relay serves with the new key", lambda: imap_login(
        bed, SOLO, password(bed, SERVED[0], "solo"), source=next(SOURCES)) == "OK", interval=1, timeout=60)
    assert imap_login(bed, f"{SERVED[1]}/{TWICE}", password(bed, SERVED[1], "twice")) == "OK"
    assert bed.alive("relay") and bed.alive("operator")


def test_a_binding_whose_relay_is_turned_off_stops_working_at_the_relay(bed):
    current = published(bed, SERVED[0], "solo")["relay_password"]
    bed.kubectl("patch", "mailboxbinding", "solo", "-n", SERVED[0], "--type=merge",
                "-p", '{"spec":{"relay":{"enabled":false}}}')
    wait_for("relay keys removed", lambda: "relay_password" not in published(bed, SERVED[0], "solo"))
    wait_for("the relay refuses the binding", lambda: refused(bed, SOLO, current), interval=1, timeout=30)
    assert refused(bed, f"{SERVED[0]}/{SOLO}", current)
    # The others still work.
    assert imap_login(bed, f"{SERVED[1]}/{TWICE}", password(bed, SERVED[1], "twice")) == "OK"


def test_the_relay_counts_connections_authentications_and_bytes_without_naming_anyone(bed):
    with urllib.request.urlopen(f"http://127.0.0.1:{bed.ports['relay']}/metrics", timeout=10) as r:
        text = r.read().decode()
    m = bed.metrics("relay")
    assert m['mailoauth_relay_authentications_total{protocol="imap",outcome="ok"}'] >= 7
    assert m['mailoauth_relay_authentications_total{protocol="imap",outcome="wrong"}'] >= 7
    assert m['mailoauth_relay_connections_total{protocol="imap",listener="starttls"}'] >= 14
    assert m['mailoauth_relay_bytes_total{protocol="imap",direction="received"}'] > 0
    assert m['mailoauth_relay_bytes_total{protocol="imap",direction="sent"}'] > 0
    wait_for("every connection closed",
             lambda: bed.metrics("relay")['mailoauth_relay_connections_open{protocol="imap"}'] == 0)
    if os.geteuid() == 0:
        assert m['mailoauth_relay_authentications_total{protocol="smtp",outcome="ok"}'] >= 1
    for name in (SOLO, TWICE, FAR, *SERVED, OUTSIDE, "127.0."):
        assert name not in text, f"{name} in the relay's metrics"


def test_no_password_or_token_appears_in_the_relay_log(bed):
    haystacks = {p.name: p.read_text(errors="replace") for p in bed.dir.glob("*.log")}
    assert not find_leaks(SEEN, haystacks)
