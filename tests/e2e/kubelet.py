"""A stand-in for one kubelet's port-forward endpoint, so that a port-forward through the real
kube-apiserver reaches something on the bed, which has no kubelet (pods never run).

The apiserver proxies `pods/portforward` to `https://<node address>:<kubelet port>/portForward/
<namespace>/<pod>?ports=<port>` as it is (an upgrade-aware proxy): this server answers that
request as a kubelet does for a WebSocket client (subprotocol `v4.channel.k8s.io`: binary
messages whose first byte is the channel, data on channel 0 and errors on channel 1, the first
message of each channel carrying the port), and connects each forward to `target` on 127.0.0.1,
where the pod's port would be. Only what a port-forward needs; TLS with the bed's CA, which the
bed's apiserver trusts for kubelets (`--kubelet-certificate-authority`).

`PortForwardNode.register(bed, namespace, pod, port_name, port)` makes the Node object (its
address and kubelet port in its status) and a pod on it that looks running and ready."""
import base64
import hashlib
import json
import socket
import ssl
import struct
import threading
import urllib.parse

from bed import free_port

WS_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
PROTOCOL = "v4.channel.k8s.io"


def _read_exact(sock, n):
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ConnectionError("closed")
        data += chunk
    return data


def _frame(payload, opcode=2):
    head = bytes([0x80 | opcode])
    n = len(payload)
    if n < 126:
        head += bytes([n])
    elif n < 65536:
        head += bytes([126]) + struct.pack(">H", n)
    else:
        head += bytes([127]) + struct.pack(">Q", n)
    return head + payload


def _read_frame(sock):
    b1, b2 = _read_exact(sock, 2)
    opcode, masked, n = b1 & 0x0F, b2 & 0x80, b2 & 0x7F
    if n == 126:
        n = struct.unpack(">H", _read_exact(sock, 2))[0]
    elif n == 127:
        n = struct.unpack(">Q", _read_exact(sock, 8))[0]
    mask = _read_exact(sock, 4) if masked else b"\0\0\0\0"
    payload = bytearray(_read_exact(sock, n))
    for i in range(n):
        payload[i] ^= mask[i % 4]
    return opcode, bytes(payload)


class PortForwardNode:
    def __init__(self, bed, target):
        self.bed, self.target, self.port = bed, target, free_port()
        self.forwarded = []  # (namespace, pod, port) of each port-forward served
        self.errors = []  # what went wrong in a connection, for a failing test's message
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(str(bed.dir / "oauth.crt"), str(bed.dir / "oauth.key"))  # SAN IP:127.0.0.1
        listener = socket.create_server(("127.0.0.1", self.port))
        self.listener = context.wrap_socket(listener, server_side=True)
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                conn, _ = self.listener.accept()
            except ssl.SSLError as e:  # one client's failed handshake
                self.errors.append(repr(e))
                continue
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn):
        try:
            head = b""
            while b"\r\n\r\n" not in head:
                chunk = conn.recv(4096)
                if not chunk:
                    return
                head += chunk
            lines = head.split(b"\r\n\r\n", 1)[0].decode().split("\r\n")
            method, target, _ = lines[0].split(" ", 2)
            headers = {k.strip().lower(): v.strip() for k, v in (l.split(":", 1) for l in lines[1:] if ":" in l)}
            path = urllib.parse.urlsplit(target)
            parts = path.path.strip("/").split("/")
            if method != "GET" or parts[0] != "portForward" or len(parts) != 3 \
                    or PROTOCOL not in headers.get("sec-websocket-protocol", ""):
                conn.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
                return
            # The apiserver names the port as `port` (the kubelet's PortHeader), however asked.
            query = urllib.parse.parse_qs(path.query)
            port = int((query.get("port") or query["ports"])[0])
            self.forwarded.append((parts[1], parts[2], port))
            accept = base64.b64encode(hashlib.sha1((headers["sec-websocket-key"] + WS_GUID).encode()).digest())
            conn.sendall(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                         b"Sec-WebSocket-Accept: " + accept + b"\r\nSec-WebSocket-Protocol: " + PROTOCOL.encode()
                         + b"\r\n\r\n")
            lock = threading.Lock()

            def send(payload, opcode=2):
                with lock:
                    conn.sendall(_frame(payload, opcode))
            # The first message of each channel (data 0, error 1) names the port, as a kubelet's does.
            send(b"\x00" + struct.pack("<H", port))
            send(b"\x01" + struct.pack("<H", port))
            upstream = socket.create_connection(("127.0.0.1", self.target), timeout=30)

            def pump():
                try:
                    while True:
                        data = upstream.recv(65536)
                        if not data:
                            break
                        send(b"\x00" + data)
                except OSError:
                    pass
                try:
                    send(b"", opcode=8)
                except OSError:
                    pass
            threading.Thread(target=pump, daemon=True).start()
            while True:
                opcode, payload = _read_frame(conn)
                if opcode == 8:
                    break
                if opcode == 9:
                    send(payload, opcode=10)
                elif opcode in (1, 2) and payload[:1] == b"\x00" and len(payload) > 1:
                    upstream.sendall(payload[1:])
            upstream.close()
        except (OSError, ConnectionError, ValueError, KeyError) as e:
            self.errors.append(repr(e))
        finally:
            conn.close()

    def register(self, namespace, pod, labels, port_name, port, node="e2e-node"):
        """The Node (address 127.0.0.1, this server as its kubelet) and a pod on it, running and
        ready, with a container port `port_name`."""
        bed = self.bed
        bed.kubectl("apply", "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "Node", "metadata": {"name": node}}))
        bed.kubectl("patch", "node", node, "--subresource=status", "--type=merge", "-p", json.dumps({"status": {
            "addresses": [{"type": "InternalIP", "address": "127.0.0.1"}],
            "daemonEndpoints": {"kubeletEndpoint": {"Port": self.port}}}}))
        bed.kubectl("apply", "-f", "-", input=json.dumps({
            "apiVersion": "v1", "kind": "Pod", "metadata": {"name": pod, "namespace": namespace, "labels": labels},
            "spec": {"nodeName": node, "containers": [{"name": "operator", "image": "mail-oauth-operator:e2e",
                                                        "ports": [{"name": port_name, "containerPort": port}]}]}}))
        bed.kubectl("patch", "pod", pod, "-n", namespace, "--subresource=status", "--type=merge", "-p", json.dumps({
            "status": {"phase": "Running", "conditions": [{"type": "Ready", "status": "True"}]}}))

    def close(self):
        self.listener.close()
