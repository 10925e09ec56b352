"""A fast token endpoint for the scale benchmark (not an OAuth server: the real one is tested
elsewhere). POST /token answers any grant with a fresh access token of a configurable lifetime,
after a configurable latency, refusing with 429 beyond a configurable rate. Each request's
`scope` names the binding (the benchmark gives every binding its own scope), so the server can
tell whether a renewal came before `expiresAt - refreshBefore` of the token it replaces.
GET /stats returns the counts.

    python3 token_server.py --port P --cert C --key K [--lifetime S] [--latency-ms L]
                            [--rate R] [--refresh-before S]
"""
import argparse
import json
import secrets
import ssl
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs


class State:
    def __init__(self, args):
        self.args = args
        self.lock = threading.Lock()
        self.expiry = {}  # scope -> expiry of the last token issued for it
        self.stats = {"requests": 0, "issued": 0, "renewals": 0, "late": 0, "rejected_429": 0,
                      "worst_lateness_s": 0.0, "max_requests_in_any_second": 0}
        self.window = []  # times of recent accepted requests, for the rate cap
        self.arrivals = []  # times of every request in the last second

    def admit(self, now):
        if not self.args.rate:
            return True
        self.window = [t for t in self.window if now - t < 1.0]
        if len(self.window) >= self.args.rate:
            return False
        self.window.append(now)
        return True


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *a):
        pass

    def send(self, code, body, headers=()):
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for k, v in headers:
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        if self.path == "/stats":
            with STATE.lock:
                return self.send(200, dict(STATE.stats, tracked=len(STATE.expiry)))
        self.send(404, {"error": "not_found"})

    def do_POST(self):
        length = int(self.headers.get("Content-Length") or 0)
        form = parse_qs(self.rfile.read(length).decode())
        if self.path != "/token":
            return self.send(404, {"error": "not_found"})
        if STATE.args.latency_ms:
            time.sleep(STATE.args.latency_ms / 1000)
        now = time.time()
        scope = (form.get("scope") or [""])[0]
        with STATE.lock:
            STATE.stats["requests"] += 1
            STATE.arrivals = [t for t in STATE.arrivals if now - t < 1.0] + [now]
            STATE.stats["max_requests_in_any_second"] = max(STATE.stats["max_requests_in_any_second"],
                                                            len(STATE.arrivals))
            if not STATE.admit(now):
                STATE.stats["rejected_429"] += 1
                return self.send(429, {"error": "slow_down", "error_description": "rate cap"}, [("Retry-After", "1")])
            previous = STATE.expiry.get(scope)
            if previous is not None:
                STATE.stats["renewals"] += 1
                lateness = now - (previous - STATE.args.refresh_before)
                if lateness > 0:
                    STATE.stats["late"] += 1
                    STATE.stats["worst_lateness_s"] = max(STATE.stats["worst_lateness_s"], round(lateness, 1))
            STATE.expiry[scope] = now + STATE.args.lifetime
            STATE.stats["issued"] += 1
        self.send(200, {"access_token": secrets.token_urlsafe(24), "token_type": "Bearer",
                        "expires_in": STATE.args.lifetime, "scope": scope})


def main():
    global STATE
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--cert", required=True)
    p.add_argument("--key", required=True)
    p.add_argument("--lifetime", type=int, default=3600)
    p.add_argument("--latency-ms", type=int, default=0)
    p.add_argument("--rate", type=int, default=0, help="requests per second before 429 (0: no cap)")
    p.add_argument("--refresh-before", type=float, default=600)
    args = p.parse_args()
    STATE = State(args)
    server = ThreadingHTTPServer(("127.0.0.1", args.port), Handler)
    server.daemon_threads = True
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(args.cert, args.key)
    server.socket = ctx.wrap_socket(server.socket, server_side=True)
    server.serve_forever()


STATE = None
if __name__ == "__main__":
    main()
