"""The scale benchmark (scripts/bench.sh runs it): the operator against a bare loop on the real
kube-apiserver of the e2e bed and a fast local token endpoint (token_server.py).

For each size N it measures:
  * operator: from process start (N client-credentials bindings already applied, none Ready) to
    all Ready, and the bare loop (tests/bench/bare_loop.rs, same libraries and concurrency) doing
    the same token requests and writes for another N bindings; their ratio;
  * RSS of the operator above its idle baseline (0 bindings), per binding;
  * API requests (counted by the apiserver) per binding made Ready, while idle, and during a
    restart with N valid tokens; token requests during the restart; the restart's peak RSS;
  * CPU while idle (30 s).
With --renewals, one run with the endpoint capped at 20 requests/s and tokens living 120 s:
the share of renewals made before expiresAt - refreshBefore of the token they replace.
With --verify N, one run with mailbox verification on: N bindings whose provider's IMAP and SMTP
servers are the e2e fake mail server (tests/e2e/fake_mail.py, accepting every XOAUTH2 login, in
this process), the operator at --verify-server-rate: over --verify-seconds once all are Ready, its
CPU, the check starts per second at each server (the most in any sliding second) and the API
requests; then, restarted at a high rate until every mailbox is verified, the same while idle.

Prints a JSON report (and writes it to --out).
"""
import argparse
import concurrent.futures
import http.client
import json
import os
import ssl
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(ROOT / "tests" / "e2e"))
from bed import OPERATOR_NAMESPACE, Bed, free_port, wait_for  # noqa: E402
from fake_mail import FakeMail  # noqa: E402

CLK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")
OWN_RESOURCES = {"secrets", "mailboxbindings", "mailproviders", "clustermailproviders", "events", "leases",
                 "namespaces"}


def proc_status(pid, key):
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    return 0


def cpu_seconds(pid):
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK


class Run:
    def __init__(self, bed, args):
        self.bed, self.args = bed, args
        self.token_port = None

    # ---------- parts ----------
    def start_token_server(self, lifetime=3600, rate=0, refresh_before=600):
        self.bed.stop("token-server")
        self.token_port = free_port()
        self.bed.start("token-server", [sys.executable, str(HERE / "token_server.py"), "--port", str(self.token_port),
                                        "--cert", str(self.bed.dir / "oauth.crt"), "--key", str(self.bed.dir / "oauth.key"),
                                        "--lifetime", str(lifetime), "--rate", str(rate),
                                        "--refresh-before", str(refresh_before), "--latency-ms", str(self.args.latency_ms)])
        wait_for("token server", lambda: self.token_stats() is not None, timeout=20)

    def token_stats(self):
        import ssl
        ctx = ssl.create_default_context(cafile=str(self.bed.dir / "ca.crt"))
        with urllib.request.urlopen(f"https://127.0.0.1:{self.token_port}/stats", context=ctx, timeout=5) as r:
            return json.loads(r.read())

    def api_requests(self, by_kind=False):
        """Non-watch requests the apiserver has served on the operator's resources (by verb and
        resource with `by_kind`)."""
        text = self.bed.kubectl("get", "--raw", "/metrics").stdout
        counts = {}
        for line in text.splitlines():
            if line.startswith("apiserver_request_total{"):
                labels = dict(kv.split("=", 1) for kv in line[line.index("{") + 1:line.rindex("}")].split(","))
                labels = {k: v.strip('"') for k, v in labels.items()}
                if labels.get("resource") in OWN_RESOURCES and labels.get("verb") not in ("WATCH", "CONNECT"):
                    kind = f'{labels["verb"]} {labels["resource"]}{"/" + labels["subresource"] if labels.get("subresource") else ""}'
                    counts[kind] = counts.get(kind, 0) + float(line.rsplit(" ", 1)[1])
        return counts if by_kind else sum(counts.values())

    def per(self, before, after, n):
        return {k: round((after.get(k, 0) - before.get(k, 0)) / n, 2) for k in sorted(after)
                if after.get(k, 0) - before.get(k, 0) > 0}

    def create(self, namespace, count, refresh_before=None, provider_ready=False, servers=None):
        """A namespace, the fast provider and `count` client-credentials bindings, by kubectl create.
        With `provider_ready`, the operator first makes the provider Ready (then stops), as in a
        cluster where bindings are added to a provider already in use. With `servers` (the
        provider's), the bindings' mailboxes are verified at them (IMAP and SMTP)."""
        self.bed.kubectl("create", "namespace", namespace)
        docs = [
            {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "fast-client", "namespace": namespace,
                                                                "labels": {"mailoauth.io/allow-reference": "true"}},
             "stringData": {"client-secret": "bench-secret"}},
            {"apiVersion": "mailoauth.io/v1alpha1", "kind": "MailProvider", "metadata": {"name": "fast", "namespace": namespace},
             "spec": {"generic": {"tokenUrl": f"https://127.0.0.1:{self.token_port}/token",
                                  "caBundle": (self.bed.dir / "ca.crt").read_text(),
                                  "servers": servers or {"imap": {"host": "127.0.0.1", "port": 993}}},
                      "clientId": "bench",
                      "clientAuthentication": {"clientSecretRefs": [{"name": "fast-client", "key": "client-secret"}]}}},
        ]
        self.create_docs(docs)
        if provider_ready:
            self.start_operator(namespace)
            self.bed.kubectl("wait", "--for=condition=Ready", "mailprovider/fast", "-n", namespace, "--timeout=60s")
            self.bed.stop_operator()
        bindings = []
        for i in range(count):
            # Mailbox verification is measured apart: its mail server here is a port nobody serves.
            spec = {"providerRef": {"name": "fast"}, "mailbox": f"b-{i}@example.com", "scopes": [f"bench-{i}"],
                    "grant": {"clientCredentials": {}}, "secretName": f"b-{i}-mail-token", "protocols": ["imap"],
                    "verify": {"enabled": False}}
            if servers:
                spec.update(protocols=sorted(servers), verify={"enabled": True})
            if refresh_before:
                spec["refreshBefore"] = refresh_before
            bindings.append({"apiVersion": "mailoauth.io/v1alpha1", "kind": "MailboxBinding",
                             "metadata": {"name": f"b-{i}", "namespace": namespace}, "spec": spec})
        self.post_parallel(f"/apis/mailoauth.io/v1alpha1/namespaces/{namespace}/mailboxbindings", bindings)

    def post_parallel(self, path, docs, workers=16):
        """Creates `docs` through the API (POST to `path`), `workers` at a time, each worker on
        its own keep-alive HTTPS connection with the bed's admin certificate."""
        ctx = ssl.create_default_context(cafile=str(self.bed.dir / "ca.crt"))
        ctx.load_cert_chain(str(self.bed.dir / "admin.crt"), str(self.bed.dir / "admin.key"))
        port = self.bed.ports["apiserver"]
        local = threading.local()

        def post(doc):
            for attempt in range(5):
                conn = getattr(local, "conn", None)
                if conn is None:
                    conn = local.conn = http.client.HTTPSConnection("127.0.0.1", port, context=ctx, timeout=60)
                try:
                    conn.request("POST", path, body=json.dumps(doc), headers={"Content-Type": "application/json"})
                    r = conn.getresponse()
                    body = r.read()
                except (OSError, http.client.HTTPException):
                    conn.close()
                    local.conn = None
                    time.sleep(0.2 * (attempt + 1))
                    continue
                if r.status in (200, 201, 409):
                    return
                if r.status in (429, 500, 503, 504):
                    time.sleep(0.2 * (attempt + 1))
                    continue
                raise RuntimeError(f"POST {path}: {r.status} {body[:300]!r}")
            raise RuntimeError(f"POST {path}: gave up after 5 attempts")

        with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
            for _ in pool.map(post, docs):
                pass

    def create_docs(self, docs):
        self.bed.kubectl("create", "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "List", "items": docs}))

    def start_operator(self, namespace, *extra):
        self.bed.start_operator("--namespace", namespace, "--max-concurrent-reconciles", str(self.args.concurrency),
                                "--api-qps", str(self.args.api_qps), *extra,
                                kubeconfig=self.bed.dir / "admin.kubeconfig",
                                env_extra=dict(RUST_LOG=os.environ.get("BENCH_RUST_LOG", "warn"), **dict(
                                    kv.split("=", 1) for kv in os.environ.get("BENCH_OPERATOR_ENV", "").split(",") if kv)))
        return self.bed.procs["operator"].pid

    def ready_count(self):
        m = self.bed.metrics()
        return sum(v for k, v in m.items() if k.startswith("mailoauth_binding_ready{"))

    def reconciled(self):
        m = self.bed.metrics()
        return sum(v for k, v in m.items() if k.startswith("mailoauth_reconciles_total{") and 'kind="MailboxBinding"' in k)

    # ---------- the measurements ----------
    def size(self, n):
        report = {"bindings": n}
        # Idle baseline: the operator on an empty namespace.
        self.start_token_server()
        empty = f"bench-empty-{n}"
        self.bed.kubectl("create", "namespace", empty)
        pid = self.start_operator(empty)
        time.sleep(5)
        baseline = proc_status(pid, "VmRSS")
        self.bed.stop_operator()
        report["rss_idle_baseline_mib"] = round(baseline / 2**20, 1)

        # The bare loop (left out with --no-bare-loop: the operator alone, e.g. at 100,000).
        loop_ns = f"bench-loop-{n}"
        if self.args.no_bare_loop:
            self.bed.kubectl("create", "namespace", loop_ns)
        else:
            self.create(loop_ns, n)
            env = dict(self.bed.env, BENCH_NAMESPACE=loop_ns, BENCH_COUNT=str(n),
                       BENCH_CONCURRENCY=str(self.args.concurrency),
                       BENCH_TOKEN_URL=f"https://127.0.0.1:{self.token_port}/token",
                       BENCH_CA=str(self.bed.dir / "ca.crt"))
            out = subprocess.run([self.args.bare_loop], env=env, capture_output=True, text=True, check=True)
            loop = json.loads(out.stdout.strip().splitlines()[-1])
            assert loop["failed"] == 0, out.stderr
            report["bare_loop_s"] = round(loop["seconds"], 2)

        # The operator, started with N bindings waiting.
        op_ns = f"bench-op-{n}"
        self.create(op_ns, n, provider_ready=True)
        api_before, tokens_before = self.api_requests(by_kind=True), self.token_stats()["issued"]
        pid = self.start_operator(op_ns, "--provider-token-rate", "10000")
        # From the operator's spawn (not from the chart's rendering before it), as the bare loop
        # times itself from its first request; polled as often as the bare loop's end is exact.
        # Every scrape renders one `mailoauth_binding_ready` series per binding (11 MB and 0.38 s of
        # the operator's CPU at 100,000): beyond 10,000, once a second.
        wait_for("all bindings Ready", lambda: self.ready_count() >= n, timeout=max(120, n / 5),
                 interval=0.05 if n <= 10_000 else 1.0)
        report["operator_s"] = round(time.monotonic() - self.bed.spawned["operator"], 2)
        if "bare_loop_s" in report:
            report["ratio"] = round(report["operator_s"] / report["bare_loop_s"], 2)
        time.sleep(10)
        report["token_requests_per_binding"] = round((self.token_stats()["issued"] - tokens_before) / n, 3)
        api_after = self.api_requests(by_kind=True)
        report["api_requests_per_binding_made_ready"] = round(sum(self.per(api_before, api_after, n).values()), 2)
        report["api_requests_per_binding_made_ready_by_kind"] = self.per(api_before, api_after, n)

        # Steady state: memory, idle CPU and idle API requests.
        time.sleep(5)
        steady = proc_status(pid, "VmRSS")
        report["rss_steady_mib"] = round(steady / 2**20, 1)
        report["rss_per_binding_kib"] = round((steady - baseline) / n / 1024, 2)
        api0, cpu0, t0 = self.api_requests(by_kind=True), cpu_seconds(pid), time.monotonic()
        time.sleep(30)
        cpu1, t1 = cpu_seconds(pid), time.monotonic()
        report["idle_cpu_percent_of_a_core"] = round(100 * (cpu1 - cpu0) / (t1 - t0), 2)
        # Counted by the apiserver from every client, itself included (it keeps its own
        # namespaces and leases): compare with the same window without the operator below.
        idle = self.per(api0, self.api_requests(by_kind=True), 1)
        report["idle_api_requests_in_30s"] = sum(idle.values())
        report["idle_api_requests_in_30s_by_kind"] = idle

        # The same 30 s with the operator stopped: what the apiserver counts of itself.
        self.bed.stop_operator()
        api0 = self.api_requests(by_kind=True)
        time.sleep(30)
        report["api_requests_in_30s_without_operator"] = sum(self.per(api0, self.api_requests(by_kind=True), 1).values())

        # A restart with N valid tokens.
        api0, tokens0 = self.api_requests(), self.token_stats()["requests"]
        started = time.monotonic()
        pid = self.start_operator(op_ns, "--provider-token-rate", "10000")
        wait_for("every binding reconciled after the restart", lambda: self.reconciled() >= n,
                 timeout=max(120, n / 5), interval=0.25)
        report["restart_all_reconciled_s"] = round(time.monotonic() - started, 2)
        time.sleep(10)
        report["restart_rss_peak_mib"] = round(proc_status(pid, "VmHWM") / 2**20, 1)
        report["restart_rss_after_mib"] = round(proc_status(pid, "VmRSS") / 2**20, 1)
        report["restart_peak_over_steady"] = round(proc_status(pid, "VmHWM") / steady, 2)
        report["restart_token_requests"] = self.token_stats()["requests"] - tokens0
        report["restart_api_requests"] = self.api_requests() - api0 - 1
        self.bed.stop_operator()
        for ns in (empty, loop_ns, op_ns):
            self.bed.kubectl("delete", "namespace", ns, "--wait=false")
        return report

    def verify(self, n, seconds, rate):
        """Verification on for `n` bindings at the fake mail server: see the module's text."""
        self.start_token_server()
        fake = FakeMail()
        try:
            ports = {p: fake.listen(p, "none", name=p) for p in ("imap", "smtp")}
            ns = f"bench-verify-{n}"
            self.create(ns, n, provider_ready=True,
                        servers={p: {"host": "127.0.0.1", "port": port, "tls": "none"} for p, port in ports.items()})
            started = time.monotonic()
            pid = self.start_operator(ns, "--provider-token-rate", "10000", "--verify-server-rate", str(rate))
            wait_for("all bindings Ready", lambda: self.ready_count() >= n, timeout=max(120, n / 5), interval=0.25)
            report = {"bindings": n, "verify_server_rate": rate, "observed_s": seconds,
                      "all_ready_s": round(time.monotonic() - started, 1)}
            api0, cpu0, t0 = self.api_requests(by_kind=True), cpu_seconds(pid), time.monotonic()
            time.sleep(seconds)
            cpu1, t1 = cpu_seconds(pid), time.monotonic()
            report["cpu_percent_of_a_core"] = round(100 * (cpu1 - cpu0) / (t1 - t0), 2)
            for p in ports:
                logins = [login.at for login in fake.logins_at(p)]
                window = [at for at in logins if t0 <= at < t1]
                report[f"{p}_check_starts_per_s"] = round(len(window) / (t1 - t0), 2)
                report[f"{p}_max_check_starts_in_any_second"] = most_in(logins, 1)
                report[f"{p}_max_check_starts_in_any_10s"] = most_in(logins, 10)
                report[f"{p}_check_starts_since_start"] = len(logins)
            api = self.per(api0, self.api_requests(by_kind=True), 1)
            report["api_requests"] = sum(api.values())
            report["api_requests_by_kind"] = api
            print(json.dumps(report), flush=True)
            self.bed.stop_operator()

            # Every mailbox verified (a fast rate), then the same window while nothing is due.
            fast = 200
            pid = self.start_operator(ns, "--provider-token-rate", "10000", "--verify-server-rate", str(fast),
                                      "--verify-concurrency", "64")
            verified = lambda: self.bed.metrics().get('mailoauth_mailbox_verified{protocol="imap"}', 0)  # noqa: E731
            started = time.monotonic()
            wait_for("every mailbox verified", lambda: verified() >= n, timeout=max(300, n / 10), interval=1)
            report["all_verified_at_rate_s"] = {"rate": fast, "seconds": round(time.monotonic() - started, 1)}
            time.sleep(10)
            logins0 = {p: len(fake.logins_at(p)) for p in ports}
            api0, cpu0, t0 = self.api_requests(by_kind=True), cpu_seconds(pid), time.monotonic()
            time.sleep(seconds)
            cpu1, t1 = cpu_seconds(pid), time.monotonic()
            idle = self.per(api0, self.api_requests(by_kind=True), 1)
            report["all_verified"] = {
                "idle_cpu_percent_of_a_core": round(100 * (cpu1 - cpu0) / (t1 - t0), 2),
                "check_starts": {p: len(fake.logins_at(p)) - logins0[p] for p in ports},
                "api_requests": sum(idle.values()), "api_requests_by_kind": idle,
                "rss_mib": round(proc_status(pid, "VmRSS") / 2**20, 1)}
            self.bed.stop_operator()
            self.bed.kubectl("delete", "namespace", ns, "--wait=false")
            return report
        finally:
            fake.stop()

    def renewals(self, n, seconds, lifetime):
        """The endpoint capped at 20 requests/s, tokens of `lifetime` s, refreshBefore 30s."""
        self.start_token_server(lifetime=lifetime, rate=20, refresh_before=30)
        ns = f"bench-renew-{n}"
        self.create(ns, n, refresh_before="30s", provider_ready=True)
        api0 = self.api_requests(by_kind=True)
        self.start_operator(ns, "--provider-token-rate", "20")
        time.sleep(seconds)
        stats = self.token_stats()
        self.bed.stop_operator()
        by_kind = self.per(api0, self.api_requests(by_kind=True), max(stats["issued"], 1))
        api = sum(by_kind.values()) * max(stats["issued"], 1)
        return {"bindings": n, "lifetime_s": lifetime, "refresh_before_s": 30, "cap_per_s": 20, "observed_s": seconds,
                "max_requests_in_any_second": stats["max_requests_in_any_second"],
                "token_requests": stats["requests"], "issued": stats["issued"], "renewals": stats["renewals"],
                "late_renewals": stats["late"], "worst_lateness_s": stats["worst_lateness_s"],
                "rejected_429": stats["rejected_429"],
                "on_time_share": round(1 - stats["late"] / stats["renewals"], 4) if stats["renewals"] else None,
                "api_requests_per_token": round(api / max(stats["issued"], 1), 2),
                "api_requests_per_token_by_kind": by_kind}


def most_in(times, window):
    """The most of `times` (seconds) in any `window` seconds."""
    times, most, first = sorted(times), 0, 0
    for last, at in enumerate(times):
        while at - times[first] >= window:
            first += 1
        most = max(most, last - first + 1)
    return most


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--sizes", default="1000")
    p.add_argument("--renewals", type=int, default=0, help="bindings for the renewal run (0: skip)")
    p.add_argument("--renewal-seconds", type=int, default=300)
    p.add_argument("--renewal-lifetime", type=int, default=120)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--api-qps", type=int, default=1000)
    p.add_argument("--latency-ms", type=int, default=0)
    p.add_argument("--verify", type=int, default=0, help="bindings for the verification run (0: skip)")
    p.add_argument("--verify-seconds", type=int, default=60)
    p.add_argument("--verify-server-rate", type=float, default=1.0)
    p.add_argument("--bare-loop", help="the bare loop's executable (needed with --sizes)")
    p.add_argument("--no-bare-loop", action="store_true", help="time the operator alone (e.g. at 100,000)")
    p.add_argument("--out")
    p.add_argument("--check", action="store_true",
                   help="fail unless each binding took one token request and a restart took none (the CI smoke run)")
    args = p.parse_args()
    if args.sizes and not args.bare_loop:
        p.error("--sizes needs --bare-loop")
    bed = Bed()
    report = {"machine": {"cores": os.cpu_count(), "memory_gib": round(os.sysconf("SC_PHYS_PAGES") * PAGE / 2**30, 1)},
              "concurrency": args.concurrency, "api_qps": args.api_qps, "sizes": []}
    try:
        bed.certificates()
        bed.start_etcd()
        bed.start_apiserver()
        bed.kubectl("apply", "-f", str(ROOT / "crds"))
        bed.kubectl("wait", "--for=condition=Established", "crd", "--all", "--timeout=60s")
        # The operator's own namespace, where the chart's Deployment keeps its Lease (leader
        # election is on, as the chart runs it).
        bed.kubectl("create", "namespace", OPERATOR_NAMESPACE)
        run = Run(bed, args)
        for n in [int(s) for s in args.sizes.split(",") if s]:
            report["sizes"].append(run.size(n))
            print(json.dumps(report["sizes"][-1]), flush=True)
        if args.renewals:
            report["renewals"] = run.renewals(args.renewals, args.renewal_seconds, args.renewal_lifetime)
            print(json.dumps(report["renewals"]), flush=True)
        if args.verify:
            report["verify"] = run.verify(args.verify, args.verify_seconds, args.verify_server_rate)
            print(json.dumps(report["verify"]), flush=True)
    except BaseException:
        bed.dump_logs(20)
        raise
    finally:
        bed.down()
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    if args.check:
        for size in report["sizes"]:
            assert size["token_requests_per_binding"] == 1, size
            assert size["restart_token_requests"] == 0, size
            # A restart re-checks bindings at rest from its caches: no request per binding (the
            # lists, the Lease and the apiserver's own namespace checks only).
            assert size["restart_api_requests"] < min(50, size["bindings"] / 2), size
            # A binding made Ready: one read (is the published name taken?), two creates, one
            # status, one Ready Event, and the shared lists and Lease spread over the bindings.
            assert size["api_requests_per_binding_made_ready"] <= 5.5, size
            # The apiserver keeps its own namespaces (and leases); anything else while idle is ours.
            ours = {k: v for k, v in size["idle_api_requests_in_30s_by_kind"].items()
                    if not k.endswith((" namespaces", " leases"))}
            assert not ours, size
        if "renewals" in report:
            r = report["renewals"]
            assert r["renewals"] > 0 and r["late_renewals"] == 0, r
            # The operator's --provider-token-rate 20, seen at the endpoint (a request's network
            # jitter may put one more into a sliding second).
            assert r["max_requests_in_any_second"] <= 21, r
        if "verify" in report:
            v = report["verify"]
            # The pacer's rate per server, seen at the server (the logins, after a greeting and
            # capabilities: a connection's jitter may put one more into a sliding window).
            for p in ("imap", "smtp"):
                assert v[f"{p}_max_check_starts_in_any_second"] <= v["verify_server_rate"] + 1, v
                assert v[f"{p}_max_check_starts_in_any_10s"] <= 10 * v["verify_server_rate"] + 1, v
            assert v["all_verified"]["check_starts"] == {"imap": 0, "smtp": 0}, v


if __name__ == "__main__":
    main()
