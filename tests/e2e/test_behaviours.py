"""Behaviours the documentation promises that the other files do not run (issue 18), on real parts:
the chart's values as the operator receives them (the bed starts every operator from what
`helm template` renders: strict Secret references, private endpoints, the provider rate, leader
election), and a leader cut off from the apiserver, by a network partition (a relay the test cuts)
and by a freeze (SIGSTOP) past its lease: it stops leading by its own clock before the other
replica takes over, and sends no token request once its lease has run out, not even one it had
read everything for and was waiting to send.

The tests run in file order and share one bed."""
import json
import os
import signal
import socket
import threading
import time
from datetime import datetime, timedelta, timezone

import pytest
from bed import OPERATOR_NAMESPACE, RELEASE, Bed, wait_for
from manifests import apply, binding, provider, secret

NS = "behaviours"
LEASE_SECONDS = 5
# The leader renews its lease half-way through (`grace` = lease / 2, whole seconds) and stops
# acting a sixth of the lease before it runs out: at 5 s, renewed 3 s after the last renewal, and
# leading until 4.17 s after it.
RENEWS_AFTER = LEASE_SECONDS - LEASE_SECONDS // 2
# Two replicas with leader election, as the chart's defaults run them, with a short lease; 0.55
# token requests per second to a provider, so that a second request waits 1.8 s for its slot.
ELECTION = ("--set", "replicaCount=2", "--set", "leaderElection.enabled=true",
            "--set", f"leaderElection.leaseDuration={LEASE_SECONDS}s", "--set-json", "providerTokenRate=0.55")
FAST_CLIENT = "mail-app-fast"  # access tokens of 30 s: a renewal every 15 s


@pytest.fixture(scope="module")
def bed(request):
    b = Bed(fast_ttl=30)
    try:
        b.up(postfix=False)
        b.helm_install()
        b.kubectl("create", "namespace", NS)
    except BaseException:
        b.dump_logs()
        b.down()
        raise
    yield b
    if request.session.testsfailed:
        b.dump_logs(80)
    relay = getattr(b, "relay", None)
    if relay:
        relay.close()
    for name in list(b.procs):
        if name.startswith("operator") and b.procs[name].poll() is None:
            os.kill(b.procs[name].pid, signal.SIGCONT)
    b.down()


def get(bed, kind, name, ns=NS):
    out = bed.kubectl("get", kind, name, "-o", "json", "-n", ns, check=False)
    return json.loads(out.stdout) if out.returncode == 0 else None


def condition(obj, type_):
    return next((c for c in ((obj or {}).get("status") or {}).get("conditions", []) if c["type"] == type_), None)


def wait_condition(bed, kind, name, type_, reasons, timeout=60):
    reasons = {reasons} if isinstance(reasons, str) else set(reasons)

    def check():
        c = condition(get(bed, kind, name), type_)
        return c if c and c["reason"] in reasons else None
    return wait_for(f"{kind} {name} {type_} {sorted(reasons)}", check, timeout=timeout, interval=0.3)


def process_env(bed, name):
    raw = open(f"/proc/{bed.procs[name].pid}/environ", "rb").read().split(b"\0")
    return dict(item.decode().split("=", 1) for item in raw if b"=" in item)


def metric_sum(bed, name, prefix, *labels):
    return sum(v for k, v in bed.metrics(name).items() if k.startswith(prefix) and all(lab in k for lab in labels))


def token_requests(bed, name):
    return metric_sum(bed, name, "mailoauth_token_requests_total")


def reconciles(bed, name):
    return metric_sum(bed, name, "mailoauth_reconciles_total{", 'kind="MailboxBinding"')


def leading(bed, name):
    return bed.metrics(name).get("mailoauth_leader") == 1


def lease_holder(bed):
    lease = get(bed, "lease", "mail-oauth-operator", ns=OPERATOR_NAMESPACE)
    return ((lease or {}).get("spec") or {}).get("holderIdentity")


def lease_renewed(bed):
    lease = get(bed, "lease", "mail-oauth-operator", ns=OPERATOR_NAMESPACE)
    renewed = ((lease or {}).get("spec") or {}).get("renewTime")
    if not renewed:
        return datetime.min.replace(tzinfo=timezone.utc)
    return datetime.fromisoformat(renewed.replace("Z", "+00:00"))


def client_credentials(name, provider_name):
    return {"apiVersion": "mailoauth.io/v1alpha1", "kind": "MailboxBinding",
            "metadata": {"name": name, "namespace": NS},
            "spec": {"providerRef": {"name": provider_name}, "mailbox": "app@example.com", "scopes": ["mail"],
                     "grant": {"clientCredentials": {}}, "secretName": f"{name}-mail-token"}}


def test_private_endpoints_are_refused_unless_the_chart_allows_them(bed):
    bed.start_operator(values=("--set", "allowPrivateEndpoints=false"))
    env = process_env(bed, "operator")
    rendered = {e["name"]: e.get("value") for e in bed.chart_deployment("--set", "allowPrivateEndpoints=false")
                ["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["ALLOW_PRIVATE_ENDPOINTS"] == rendered["ALLOW_PRIVATE_ENDPOINTS"] == "false"
    assert env["POD_NAME"] == "operator", "metadata.name resolved to the process's name"
    assert env["STRICT_SECRET_REFERENCES"] == rendered["STRICT_SECRET_REFERENCES"] == "true"
    apply(bed, secret(NS, "client", {"client-secret": "mail-app-secret"}),
          provider(bed, NS, "idp", "mail-app", "client"))
    refused = wait_condition(bed, "mailprovider", "idp", "Ready", "EndpointsUnresolved")
    assert "refused" in refused["message"] and "127.0.0.1" in refused["message"], refused["message"]
    assert bed.stop_operator() == 0


def test_strict_secret_references_and_the_provider_rate_come_from_the_chart(bed):
    rate = 0.5  # one token request every 2 s; the operator's own default is 10 per second
    bed.start_operator(values=("--set-json", f"providerTokenRate={rate}"))
    # Strict mode, the chart's default: an unlabelled Secret is never read.
    apply(bed, secret(NS, "plain-client", {"client-secret": "mail-app-secret"}, referable=False),
          provider(bed, NS, "plain", "mail-app", "plain-client"))
    refused = wait_condition(bed, "mailprovider", "plain", "Ready", "SecretReferenceNotAllowed")
    assert "mailoauth.io/allow-reference" in refused["message"], refused["message"]
    # The provider from the first test is ready now that private endpoints are allowed.
    wait_condition(bed, "mailprovider", "idp", "Ready", "ProviderReady")

    # Four bindings at once on one provider: their token requests arrive one per 2 s at the server.
    samples, done = [], threading.Event()

    def sample():
        while not done.is_set():
            sent = time.monotonic()
            count = bed.oauth("/test/stats")["token_requests"]
            samples.append((sent, time.monotonic(), count))
            time.sleep(0.02)
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    wait_for("a first sample", lambda: samples, timeout=10, interval=0.05)
    before = samples[-1][2]
    started = time.monotonic()
    apply(bed, *(client_credentials(f"app{i}", "idp") for i in range(4)))
    try:
        for i in range(4):
            wait_condition(bed, "mailboxbinding", f"app{i}", "Ready", "TokenValid", timeout=60)
        wait_for("the fourth request counted", lambda: samples[-1][2] >= before + 4, timeout=10, interval=0.05)
    finally:
        done.set()
        sampler.join(timeout=10)
    assert samples[-1][2] == before + 4, "one token request per binding"

    def arrival(k):
        """Request k arrived after the last sample that did not count it was sent, and before
        the first sample that did was answered."""
        after = max((s[0] for s in samples if s[2] < before + k), default=started)
        by = min(s[1] for s in samples if s[2] >= before + k)
        return after, by
    windows = [arrival(k) for k in range(1, 5)]
    gaps = [round(b[0] - a[1], 2) for a, b in zip(windows, windows[1:])]
    # 2 s apart; allowing for the network and the sampling, at least 1.5 s.
    assert all(g >= 1.5 for g in gaps), f"token requests {gaps} s apart at providerTokenRate={rate}"
    assert bed.stop_operator() == 0


class Relay:
    """A TCP relay to the apiserver that a test can cut: while cut, nothing passes either way
    (connections stay open and bytes wait, new connections are accepted and wait too), as a
    network partition looks to both ends; restored, the waiting bytes go on, late."""

    def __init__(self, port):
        self.target = ("127.0.0.1", port)
        self.flowing = threading.Event()
        self.flowing.set()
        self.closed = False
        self.sockets = []
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while not self.closed:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            self.flowing.wait()
            try:
                upstream = socket.create_connection(self.target, timeout=10)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            self.sockets += [client, upstream]
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    def _pump(self, src, dst):
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                self.flowing.wait()
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def cut(self):
        self.flowing.clear()

    def restore(self):
        self.flowing.set()

    def close(self):
        self.closed = True
        self.flowing.set()
        self.listener.close()
        for s in self.sockets:
            try:
                s.close()
            except OSError:
                pass


def test_two_replicas_from_the_chart_elect_one_leader(bed):
    if "operator" in bed.procs:  # left running by a test above that failed
        bed.stop_operator()
    deployment = bed.chart_deployment(*ELECTION)
    env = {e["name"]: e.get("value") for e in deployment["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert (env["LEADER_ELECT"], env["LEADER_LEASE_DURATION"]) == ("true", f"{LEASE_SECONDS}s")
    # Replica a reaches the apiserver through a relay the next test cuts.
    bed.relay = Relay(int(bed.server.rsplit(":", 1)[1]))
    service_account = deployment["spec"]["template"]["spec"]["serviceAccountName"]
    assert service_account == RELEASE
    token = bed.kubectl("create", "token", service_account, "-n", OPERATOR_NAMESPACE, "--duration=6h").stdout.strip()
    relayed = bed.dir / "operator-a.kubeconfig"
    bed.write_kubeconfig(relayed, user={"token": token}, server=f"https://127.0.0.1:{bed.relay.port}")
    bed.start_operator(name="operator-a", values=ELECTION, kubeconfig=relayed)
    wait_for("operator-a to lead", lambda: lease_holder(bed) == "operator-a" and leading(bed, "operator-a"), timeout=30)
    bed.start_operator(name="operator-b", values=ELECTION)
    assert process_env(bed, "operator-b")["POD_NAME"] == "operator-b"
    assert not leading(bed, "operator-b")

    # Two grants whose access tokens live 30 s: renewed every 15 s, each rotating its refresh
    # token (the server revokes the whole grant if a rotated-out one is ever sent again).
    docs = [secret(NS, "fast-client", {"client-secret": "mail-app-fast-secret"}),
            provider(bed, NS, "fast", FAST_CLIENT, "fast-client")]
    for name in ("one", "two"):
        seed = bed.oauth("/test/seed", {"accountId": f"{name}@example.com", "clientId": FAST_CLIENT})["refresh_token"]
        docs += [secret(NS, f"{name}-seed", {"refresh_token": seed}),
                 binding(NS, name, "fast", f"{name}@example.com", f"{name}-seed", smtp=False)]
    apply(bed, *docs)
    for name in ("one", "two"):
        wait_condition(bed, "mailboxbinding", name, "Ready", "TokenValid")
    assert token_requests(bed, "operator-a") >= 2 and token_requests(bed, "operator-b") == 0


def test_a_leader_cut_off_from_the_apiserver_stops_leading_before_another_takes_over(bed):
    """The partition: a cannot see the Lease any more, b cannot see a. a must stop by its own
    clock, before b's takeover (when a's last renewal runs out), never after it; and a request it
    read everything for while leading, then waited for the provider's slot, is not sent once its
    lease has run out (a asks again after the wait).

    The cut comes just before a's next renewal, with both bindings asked for a refresh just
    before: a sends one request and the other waits for its slot (1.8 s later), which comes after
    a's leadership has run out (its last renewal + 4.17 s)."""
    metric = lambda m, prefix, *labels: sum(v for k, v in m.items()  # noqa: E731
                                            if k.startswith(prefix) and all(lab in k for lab in labels))
    for attempt in range(5):
        renewed = lease_renewed(bed)
        assert lease_holder(bed) == "operator-a"
        # a renews 3 s after its last renewal: ask for the refreshes 0.4 s before that.
        time.sleep(max(0.0, renewed.timestamp() + RENEWS_AFTER - 0.4 - time.time()))
        before = bed.metrics("operator-a")
        value = f"c{attempt}"
        bed.kubectl("annotate", "--overwrite", "mailboxbinding", "one", "two", "-n", NS,
                    f"mailoauth.io/refresh-requested={value}")

        def one_sent_one_waiting():
            m = bed.metrics("operator-a")
            sent = metric(m, "mailoauth_token_requests_total") - metric(before, "mailoauth_token_requests_total")
            return m if sent == 1 and m.get("mailoauth_token_requests_waiting") == 1 else None
        at_cut = wait_for("a's first request sent and its second waiting", one_sent_one_waiting, timeout=5,
                          interval=0.01)
        bed.relay.cut()
        cut = time.monotonic()
        if lease_renewed(bed) == renewed:
            break
        # a renewed the lease before the cut: its leadership outlasts the wait. Again.
        bed.relay.restore()
        refreshed(bed, value)
    else:
        pytest.fail("could not cut a off between its first request and its next lease renewal")
    stopped = took_over = None
    while took_over is None and time.monotonic() - cut < LEASE_SECONDS * 4:
        now = time.monotonic()
        if stopped is None and not leading(bed, "operator-a"):
            stopped = now
        if leading(bed, "operator-b"):
            took_over = now
        time.sleep(0.1)
    assert took_over is not None, "operator-b never took over"
    assert stopped is not None, "operator-a, cut off from the apiserver, still says it leads after b took over"
    assert stopped < took_over, f"a stopped {stopped - cut:.1f} s after the cut, b took over at {took_over - cut:.1f} s"
    assert stopped - cut <= LEASE_SECONDS + 0.5, f"a stopped leading {stopped - cut:.1f} s after the cut"
    # The waiting request got its slot after a's lease ran out: a asked, and did not send it.
    def ended():
        now = bed.metrics("operator-a")
        return any(metric(now, *what) > metric(at_cut, *what) for what in
                   [("mailoauth_reconciles_total{", 'outcome="not_leader"'), ("mailoauth_token_requests_total",)])
    wait_for("a's waiting request to end", ended, timeout=10, interval=0.1)
    assert token_requests(bed, "operator-a") == metric(at_cut, "mailoauth_token_requests_total"), \
        "a sent the request it waited for after its lease had run out"

    print(f"\na stopped leading {stopped - cut:.1f} s after the cut, b took over {took_over - cut:.1f} s after it")

    restored = datetime.now(timezone.utc)
    bed.relay.restore()
    # Back in touch. What a sent during the cut arrives now, late: its lease renewal (kube-lease-
    # manager renews by an unconditional patch of renewTime) sets the lease's renewTime back, so
    # that b stops leading by the same clock and a may take the lease again. Either way one
    # replica leads, and the grants live on.
    leader = steady_leader(bed, since=restored)
    refreshed(bed, "p1")
    assert bed.oauth("/test/stats")["errors_by_client"].get(FAST_CLIENT, 0) == 0
    print(f"after the cut healed, {leader} leads")


def steady_leader(bed, since, names=("operator-a", "operator-b")):
    """The replica that holds the lease, renewed it after `since`, says it leads while the other
    says it does not, and still does 3 s (a renewal and a half) later."""
    def one_leader():
        holder = lease_holder(bed)
        if holder not in names or lease_renewed(bed) <= since + timedelta(seconds=1):
            return None
        return holder if [n for n in names if leading(bed, n)] == [holder] else None
    while True:
        holder = wait_for("one leader", one_leader, timeout=40, interval=0.2)
        time.sleep(3)
        if one_leader() == holder:
            return holder


def refreshed(bed, value):
    """Asks both bindings for a refresh and waits until their status records it was served."""
    bed.kubectl("annotate", "--overwrite", "mailboxbinding", "one", "two", "-n", NS,
                f"mailoauth.io/refresh-requested={value}")
    for name in ("one", "two"):
        wait_for(f"{name} refreshed ({value})",
                 lambda: (get(bed, "mailboxbinding", name)["status"].get("lastRefreshRequest") == value
                          and condition(get(bed, "mailboxbinding", name), "Ready")["reason"] == "TokenValid"),
                 timeout=60, interval=0.3)


def test_a_leader_frozen_past_its_lease_sends_no_token_request_after_it_wakes(bed):
    """The leader (call it b) is asked for a refresh of both bindings at once: b sends one request,
    and the other waits for the provider's next slot (1.8 s later) with the refresh token it has
    read. b is frozen (SIGSTOP) right then, past its lease: the other replica (a) takes over and
    serves that refresh itself. Woken (SIGCONT), b must not send it: the refresh token it holds is
    spent now, and sending it again would make the server revoke the grant. (Frozen past a lease,
    b also finds the wait's own 2 s bound passed: the request is sent away, and b's next reconcile
    asks first whether it leads. The check after the wait itself is pinned by the partition test
    above, where the slot comes while b runs.)"""
    leader = steady_leader(bed, since=datetime.now(timezone.utc) - timedelta(seconds=1))
    other = "operator-a" if leader == "operator-b" else "operator-b"
    b = bed.procs[leader]
    def mbx():
        return {i["metadata"]["name"]: i for i in bed.kubectl_json("get", "mailboxbinding", "-n", NS)["items"]}
    for attempt in range(3):
        value = f"s{attempt}"
        server_before = bed.oauth("/test/stats")["token_requests"]
        b_sent = token_requests(bed, leader)
        bed.kubectl("annotate", "--overwrite", "mailboxbinding", "one", "two", "-n", NS,
                    f"mailoauth.io/refresh-requested={value}")

        def one_served_one_waiting():
            # One refresh sent, answered and recorded in its binding's status; the other waiting.
            m = bed.metrics(leader)
            if m.get("mailoauth_token_requests_waiting") != 1:
                return None
            sent = sum(v for k, v in m.items() if k.startswith("mailoauth_token_requests_total"))
            done = sum(v for k, v in m.items()
                       if k.startswith("mailoauth_reconciles_total{") and 'kind="MailboxBinding"' in k)
            acted = [n for n, o in mbx().items() if (o.get("status") or {}).get("lastRefreshRequest") == value]
            return (sent, done, acted[0]) if sent > b_sent and len(acted) == 1 else None
        found = wait_for("one refresh served, one waiting for its slot", one_served_one_waiting, timeout=20,
                         interval=0.02)
        os.kill(b.pid, signal.SIGSTOP)
        sent, b_reconciled, served = found
        # Nothing reached the server but what b had counted (the follower sends nothing).
        if bed.oauth("/test/stats")["token_requests"] == server_before + (sent - b_sent):
            b_sent = sent
            break
        # The slot came before the freeze: thaw, let it finish, and try again.
        os.kill(b.pid, signal.SIGCONT)
        refreshed(bed, value)
    else:
        pytest.fail("could not freeze b while a request waited for its slot")
    waiting = "two" if served == "one" else "one"
    frozen = time.monotonic()
    try:
        wait_for(f"{other} to lead", lambda: leading(bed, other), timeout=LEASE_SECONDS * 4, interval=0.2)
        wait_for(f"{other} serving {waiting}'s refresh",
                 lambda: (mbx()[waiting].get("status") or {}).get("lastRefreshRequest") == value, timeout=30)
    finally:
        os.kill(b.pid, signal.SIGCONT)
    woke = time.monotonic()
    wait_for(f"{leader} reconciled after waking", lambda: reconciles(bed, leader) > b_reconciled, timeout=30,
             interval=0.1)
    time.sleep(2)
    assert token_requests(bed, leader) == b_sent, "the woken leader sent the request it was waiting to send"
    assert not leading(bed, leader) and leading(bed, other)
    assert bed.oauth("/test/stats")["errors_by_client"].get(FAST_CLIENT, 0) == 0, \
        "a refresh token was sent twice (the server revoked the grant)"
    # Both grants are alive: the new leader renews them again.
    refreshed(bed, "after")
    assert token_requests(bed, leader) == b_sent
    print(f"\n{leader} frozen {woke - frozen:.1f} s with {waiting}'s refresh waiting for its slot; {other} took "
          "over and served it")
    assert bed.stop_operator(leader) == 0
    assert bed.stop_operator(other) == 0
