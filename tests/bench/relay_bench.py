#!/usr/bin/env python3
"""The relay benchmark (beside the scale benchmark, bench.py): `mail-oauth-operator relay
--secret-dir` in front of a fast local upstream, against the same upstream straight.

The upstream is this script's own asyncio server (a process of its own): SMTP submission that
takes `AUTH XOAUTH2` for the one mailbox and token, accepts every message and discards it, and
IMAP that takes `AUTHENTICATE XOAUTH2` and answers `NOOP`, `IDLE`/`DONE`, `LOGOUT`. Without
`--tls`, no TLS on either leg (loopback, `smtp_tls`/`imap_tls` `none` with
`--allow-private-endpoints`): the relay's own work, not the ciphers'. With `--tls`, implicit TLS
on every leg (a throwaway self-signed certificate made with `openssl`): the clients to the
relay's `--smtps-address`/`--imaps-address` and straight to the upstream, the relay to the
upstream (`--upstream-ca-file`), as a deployment runs it.

- Throughput: for each message size, `--messages` messages sent with smtplib by `--parallel`
  client processes (one session each, logged in once), straight to the upstream (XOAUTH2) and
  through the relay (a password); messages per second, MB per second and the ratio. Then the
  same with a new session per message for the smallest size (the relay logs in upstream each
  time, as the client does straight).
- With `--pin`, the relay runs on a CPU of its own (the last one) and the clients and the upstream
  on the others, in the straight runs as in the relayed ones: a relay pod with its own CPU.
  Without it, all of them share every CPU.
- Idle IMAP sessions: `--sessions` connections through the relay, each logged in (`LOGIN` with
  the password) and in `IDLE`; the relay's resident memory (`VmRSS`) above its baseline, per
  session.

    scripts/relay-bench.sh [--messages 4000] [--sizes 1024,102400,1048576] [--sessions 1000]

builds the relay in release mode (debug with BENCH_PROFILE=dev) and runs this with
`--relay-bin`. Prints a report; `--out FILE` writes it as JSON.
"""
import argparse
import asyncio
import base64
import json
import multiprocessing
import os
import resource
import shutil
import smtplib
import socket
import subprocess
import sys
import tempfile
import time

MAILBOX = "bench@example.com"
PASSWORD = "bench relay password 0123456789abcdef"
TOKEN = "ya29.bench-token-0123456789"
XOAUTH2 = f"user={MAILBOX}\x01auth=Bearer {TOKEN}\x01\x01"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------- the upstream ----------

async def smtp_session(reader, writer):
    expected = base64.b64encode(XOAUTH2.encode())
    w = writer.write
    w(b"220 upstream ESMTP\r\n")
    authed = False
    try:
        while True:
            line = await reader.readline()
            if not line:
                return
            verb = line[:4].upper()
            if verb == b"EHLO":
                w(b"250-upstream\r\n250-PIPELINING\r\n250-8BITMIME\r\n250-SIZE 104857600\r\n250 AUTH XOAUTH2\r\n")
            elif verb == b"AUTH":
                parts = line.split()
                response = parts[2] if len(parts) > 2 else None
                if response is None:
                    w(b"334 \r\n")
                    await writer.drain()
                    response = (await reader.readline()).strip()
                authed = response == expected
                w(b"235 2.7.0 ok\r\n" if authed else b"535 5.7.8 no\r\n")
            elif not authed and verb not in (b"QUIT", b"NOOP", b"RSET"):
                w(b"530 5.7.0 authentication required\r\n")
            elif verb == b"DATA":
                w(b"354 go\r\n")
                await writer.drain()
                await reader.readuntil(b"\r\n.\r\n")
                w(b"250 2.0.0 queued\r\n")
            elif verb == b"QUIT":
                w(b"221 bye\r\n")
                await writer.drain()
                return
            else:
                w(b"250 ok\r\n")
            await writer.drain()
    except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
        return
    finally:
        writer.close()


async def imap_session(reader, writer):
    expected = base64.b64encode(XOAUTH2.encode())
    w = writer.write
    w(b"* OK [CAPABILITY IMAP4rev1 SASL-IR IDLE AUTH=XOAUTH2] upstream ready\r\n")
    try:
        while True:
            line = await reader.readline()
            if not line:
                return
            parts = line.split()
            if len(parts) < 2:
                continue
            tag, verb = parts[0], parts[1].upper()
            if verb == b"AUTHENTICATE":
                response = parts[3] if len(parts) > 3 else None
                if response is None:
                    w(b"+ \r\n")
                    await writer.drain()
                    response = (await reader.readline()).strip()
                ok = response == expected
                w(tag + (b" OK [CAPABILITY IMAP4rev1 IDLE] done\r\n" if ok else b" NO [AUTHENTICATIONFAILED] no\r\n"))
            elif verb == b"IDLE":
                w(b"+ idling\r\n")
                await writer.drain()
                if not await reader.readline():
                    return
                w(tag + b" OK IDLE done\r\n")
            elif verb == b"LOGOUT":
                w(b"* BYE\r\n" + tag + b" OK bye\r\n")
                await writer.drain()
                return
            else:
                w(tag + b" OK done\r\n")
            await writer.drain()
    except ConnectionError:
        return
    finally:
        writer.close()


def server_tls(cert_dir):
    if not cert_dir:
        return None
    import ssl
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(os.path.join(cert_dir, "tls.crt"), os.path.join(cert_dir, "tls.key"))
    return ctx


def client_tls(cert_dir):
    if not cert_dir:
        return None
    import ssl
    return ssl.create_default_context(cafile=os.path.join(cert_dir, "ca.crt"))


def upstream(smtp_port, imap_port, ready, cert_dir):
    async def main():
        tls = server_tls(cert_dir)
        s = await asyncio.start_server(smtp_session, "127.0.0.1", smtp_port, limit=128 * 1024 * 1024, backlog=4096,
                                       ssl=tls)
        i = await asyncio.start_server(imap_session, "127.0.0.1", imap_port, backlog=4096, ssl=tls)
        ready.set()
        async with s, i:
            await asyncio.gather(s.serve_forever(), i.serve_forever())
    asyncio.run(main())


# ---------- clients ----------

def message(size):
    line = b"".join(bytes([33 + i % 90]) for i in range(76)) + b"\r\n"
    head = (f"From: {MAILBOX}\r\nTo: {MAILBOX}\r\nSubject: bench\r\n\r\n").encode()
    return head + line * max(1, (size - len(head)) // len(line))


def client(args):
    """One client process: `count` messages of `size`, one session (or one per message)."""
    port, relayed, size, count, per_message, cert_dir = args
    msg = message(size)
    tls = client_tls(cert_dir)

    def session():
        if tls:
            s = smtplib.SMTP_SSL("localhost", port, timeout=120, context=tls)
        else:
            s = smtplib.SMTP("127.0.0.1", port, timeout=120)
        s.ehlo("bench")
        if relayed:
            s.login(MAILBOX, PASSWORD)
        else:
            s.auth("XOAUTH2", lambda challenge=None: XOAUTH2, initial_response_ok=True)
        return s

    s = None if per_message else session()
    for _ in range(count):
        if per_message:
            s = session()
        s.sendmail(MAILBOX, [MAILBOX], msg)
        if per_message:
            s.quit()
    if not per_message:
        s.quit()
    return count * len(msg)


def run_clients(port, relayed, size, messages, parallel, per_message, cert_dir):
    share = [messages // parallel + (1 if i < messages % parallel else 0) for i in range(parallel)]
    with multiprocessing.Pool(parallel) as pool:
        began = time.perf_counter()
        sent = sum(pool.map(client, [(port, relayed, size, n, per_message, cert_dir) for n in share if n]))
        seconds = time.perf_counter() - began
    return {"messages": messages, "seconds": round(seconds, 3), "msgs_per_s": round(messages / seconds, 1),
            "mb_per_s": round(sent / seconds / 1e6, 2)}


def cpu_seconds(pid):
    """User and system CPU time of process `pid` so far."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS")


async def idle_sessions(port, count, cert_dir):
    """`count` IMAP sessions through the relay, each logged in and in IDLE; returns them."""
    tls = client_tls(cert_dir)

    async def one(i):
        reader, writer = await asyncio.open_connection("localhost" if tls else "127.0.0.1", port, ssl=tls)
        assert (await reader.readline()).startswith(b"* OK")
        writer.write(f'a LOGIN {MAILBOX} "{PASSWORD}"\r\n'.encode())
        while True:
            line = await reader.readline()
            assert line, f"session {i} closed at the login"
            if line.startswith(b"a "):
                assert line.startswith(b"a OK"), line
                break
        writer.write(b"b IDLE\r\n")
        assert (await reader.readline()).startswith(b"+"), f"session {i}: no IDLE continuation"
        return reader, writer
    sessions = []
    for start in range(0, count, 100):  # in waves: the relay's accept queue and login pace
        sessions += await asyncio.gather(*(one(i) for i in range(start, min(count, start + 100))))
    return sessions


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--relay-bin", required=True, help="the mail-oauth-operator binary")
    p.add_argument("--profile", default="release", help="what --relay-bin was built as (reported)")
    p.add_argument("--messages", type=int, default=4000,
                   help="messages per size and path (a quarter of it above 128 KiB, half with a session each)")
    p.add_argument("--sizes", default="1024,102400,1048576", help="message sizes in bytes")
    p.add_argument("--parallel", type=int, default=2, help="client processes")
    p.add_argument("--rounds", type=int, default=5, help="rounds per size and path (the median is reported)")
    p.add_argument("--sessions", type=int, default=1000, help="idle IMAP sessions through the relay")
    p.add_argument("--tls", action="store_true", help="implicit TLS on every leg")
    p.add_argument("--pin", action="store_true",
                   help="the relay on a core of its own (the last CPU), the clients and the upstream on the others, "
                        "in both the straight and the relayed runs: a relay pod with its own CPU")
    p.add_argument("--out", help="write the report as JSON here")
    args = p.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = min(hard, max(soft, 4 * args.sessions + 1024))
    resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))

    cpus = sorted(os.sched_getaffinity(0))
    relay_cpus = None
    if args.pin:
        if len(cpus) < 2:
            sys.exit("--pin needs at least two CPUs")
        # This process (and so the upstream and the client processes it starts) on all but the
        # last CPU; the relay on the last one alone, from its start (its runtime sizes itself
        # to the one CPU it sees, as in a pod with a limit of one CPU).
        relay_cpus = {cpus[-1]}
        os.sched_setaffinity(0, set(cpus[:-1]))

    work = tempfile.mkdtemp(prefix="relay-bench-")
    smtp_up, imap_up, smtp, imap, admin = (free_port() for _ in range(5))
    cert_dir = None
    if args.tls:
        cert_dir = os.path.join(work, "tls")
        os.mkdir(cert_dir)
        # A throwaway CA (ca.crt, trusted by every client) and a server certificate it signed.
        ca_key, ca_crt = os.path.join(cert_dir, "ca.key"), os.path.join(cert_dir, "ca.crt")
        key, csr, crt = (os.path.join(cert_dir, n) for n in ("tls.key", "tls.csr", "tls.crt"))
        ext = os.path.join(cert_dir, "ext")
        with open(ext, "w") as f:
            f.write("subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n")
        ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
        for cmd in (["req", "-x509", *ec, "-days", "1", "-subj", "/CN=relay bench CA", "-keyout", ca_key,
                     "-out", ca_crt],
                    ["req", "-new", *ec, "-subj", "/CN=localhost", "-keyout", key, "-out", csr],
                    ["x509", "-req", "-in", csr, "-CA", ca_crt, "-CAkey", ca_key, "-CAcreateserial", "-days", "1",
                     "-extfile", ext, "-out", crt]):
            subprocess.run(["openssl", *cmd], check=True, capture_output=True)
    ready = multiprocessing.Event()
    up = multiprocessing.Process(target=upstream, args=(smtp_up, imap_up, ready, cert_dir), daemon=True)
    up.start()
    ready.wait(10)
    secret = os.path.join(work, "secret")
    os.mkdir(secret)
    expires = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + 3600))
    for key, value in {"username": MAILBOX, "relay_password": PASSWORD, "access_token": TOKEN,
                       "expires_at": expires, "smtp_host": "localhost", "smtp_port": str(smtp_up),
                       "smtp_tls": "implicit" if args.tls else "none", "imap_host": "localhost",
                       "imap_port": str(imap_up), "imap_tls": "implicit" if args.tls else "none"}.items():
        with open(os.path.join(secret, key), "w") as f:
            f.write(value)
    log = open(os.path.join(work, "relay.log"), "w")
    listeners = ["--smtps-address", f"127.0.0.1:{smtp}", "--imaps-address", f"127.0.0.1:{imap}",
                 "--tls-cert-dir", cert_dir, "--upstream-ca-file", os.path.join(cert_dir, "ca.crt")] \
        if args.tls else ["--smtp-address", f"127.0.0.1:{smtp}", "--imap-address", f"127.0.0.1:{imap}"]
    relay = subprocess.Popen(
        [args.relay_bin, "relay", "--secret-dir", secret, *listeners, "--listen-address", f"127.0.0.1:{admin}",
         "--allow-private-endpoints", "--max-connections", str(args.sessions + 64)],
        stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ, RUST_LOG="warn"),
        preexec_fn=(lambda: os.sched_setaffinity(0, relay_cpus)) if relay_cpus else None)
    report = {"profile": args.profile, "tls": args.tls,
              "cpu_placement": f"relay on CPU {cpus[-1]} alone, clients and upstream on CPU {cpus[0]}"
              + (f"-{cpus[-2]}" if len(cpus) > 2 else "") if args.pin
              else f"clients, upstream and relay sharing {len(cpus)} CPUs",
              "upstream": "a local asyncio server, messages discarded",
              "parallel": args.parallel, "cpus": os.cpu_count(), "throughput": [], "imap": {}}
    try:
        deadline = time.time() + 20
        while True:
            try:
                socket.create_connection(("127.0.0.1", smtp), timeout=1).close()
                break
            except OSError:
                if relay.poll() is not None or time.time() > deadline:
                    sys.exit(f"the relay did not start: {open(log.name).read()}")
                time.sleep(0.1)
        runs = [(int(s), False) for s in args.sizes.split(",")]
        runs.append((int(args.sizes.split(",")[0]), True))
        for size, per_message in runs:
            n = args.messages if size <= 128 * 1024 else max(args.parallel, args.messages // 4)
            if per_message:
                n = max(args.parallel, args.messages // 2)
            run_clients(smtp_up, False, size, args.parallel, args.parallel, per_message, cert_dir)  # warm up
            run_clients(smtp, True, size, args.parallel, args.parallel, per_message, cert_dir)
            # Rounds alternate the two paths; the median round of each is reported (the machine
            # is shared: a single round says more about the neighbours than about the relay).
            rounds = {"straight": [], "relayed": []}
            cpu = 0.0
            for _ in range(args.rounds):
                rounds["straight"].append(run_clients(smtp_up, False, size, n, args.parallel, per_message, cert_dir))
                before = cpu_seconds(relay.pid)
                rounds["relayed"].append(run_clients(smtp, True, size, n, args.parallel, per_message, cert_dir))
                cpu += cpu_seconds(relay.pid) - before
            straight, relayed = (sorted(rounds[k], key=lambda r: r["msgs_per_s"])[args.rounds // 2]
                                 for k in ("straight", "relayed"))
            cpu /= args.rounds
            row = {"size": size, "session_per_message": per_message, "straight": straight, "relayed": relayed,
                   "ratio": round(relayed["msgs_per_s"] / straight["msgs_per_s"], 3),
                   "relay_cpu_us_per_message": round(cpu / n * 1e6, 1),
                   "relay_cpu_share": round(cpu / relayed["seconds"], 2)}
            report["throughput"].append(row)
            print(f"{size:>9} B{' (a session each)' if per_message else '':17}  straight "
                  f"{straight['msgs_per_s']:8.1f} msg/s {straight['mb_per_s']:7.2f} MB/s   relayed "
                  f"{relayed['msgs_per_s']:8.1f} msg/s {relayed['mb_per_s']:7.2f} MB/s   ratio {row['ratio']:.3f}"
                  f"   relay CPU {row['relay_cpu_us_per_message']:.0f} us/msg ({row['relay_cpu_share']:.2f} of a core)",
                  flush=True)

        async def imap_run():
            warm = await idle_sessions(imap, 10, cert_dir)
            for _, w in warm:
                w.close()
            await asyncio.sleep(1)
            base = rss_kib(relay.pid)
            began = time.perf_counter()
            sessions = await idle_sessions(imap, args.sessions, cert_dir)
            opened = time.perf_counter() - began
            await asyncio.sleep(1)
            held = rss_kib(relay.pid)
            # They are all still there: one more line through each (DONE, then the tagged OK).
            for r, w in sessions:
                w.write(b"DONE\r\n")
            for r, w in sessions:
                assert (await r.readline()).startswith(b"b OK"), "a session lost its IDLE"
            for _, w in sessions:
                w.close()
            return {"sessions": args.sessions, "open_seconds": round(opened, 2), "baseline_kib": base,
                    "rss_kib": held, "kib_per_session": round((held - base) / args.sessions, 1)}
        report["imap"] = asyncio.run(imap_run())
        i = report["imap"]
        print(f"{i['sessions']} idle IMAP sessions (logged in, IDLE) opened in {i['open_seconds']} s: relay RSS "
              f"{i['rss_kib']} KiB, {i['baseline_kib']} KiB before: {i['kib_per_session']} KiB per session")
    finally:
        relay.terminate()
        relay.wait(10)
        up.terminate()
        shutil.rmtree(work, ignore_errors=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
