"""CONNECT downloads through a proxy's TLS port over HTTP/1.1 (ALPN http/1.1), n connections.

    python tls_h1_client.py '<json>'   one JSON line on stdout, the shape tls_client.js prints

opts: proxy ("https://127.0.0.1:PORT"), ca, servername, target ("127.0.0.1:BULK"), bytes
(shared by all connections), streams (connections), timeout (seconds). Each connection sends
`CONNECT target`, then `GET n\\n` to the bench's bulk server, and counts n bytes with
`recv_into` one reused 1 MiB buffer, all connections in one thread on a selector. It is the
plain suite's CONNECT client with TLS around it, and costs less CPU per GB than Node's tls
module (about 0.7 against 0.9 CPU-s per GB here), so the proxy rather than the client is
the limit. Loopback only; the run ends by opts.timeout at the latest.
"""
from __future__ import annotations

import json
import selectors
import socket
import ssl
import sys
import time
from urllib.parse import urlsplit

MiB = 1024 * 1024


def open_tunnel(context: ssl.SSLContext, host: str, port: int, servername: str, target: str,
                deadline: float) -> tuple[ssl.SSLSocket, str]:
    raw = socket.create_connection((host, port), timeout=max(1.0, deadline - time.monotonic()))
    raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock = context.wrap_socket(raw, server_hostname=servername)
    sock.sendall(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode())
    head = b""
    while not head.endswith(b"\r\n\r\n") and len(head) < 16384:   # byte by byte: no overread
        data = sock.recv(1)
        if not data:
            break
        head += data
    status = head.split(b"\r\n", 1)[0].decode(errors="replace")
    if not status.startswith(("HTTP/1.1 200", "HTTP/1.0 200")) or not head.endswith(b"\r\n\r\n"):
        sock.close()
        raise OSError(f"CONNECT answered {status!r}")
    return sock, sock.selected_alpn_protocol() or "none"


def run(opts: dict) -> dict:
    deadline = time.monotonic() + opts.get("timeout", 60)
    url = urlsplit(opts["proxy"])
    context = ssl.create_default_context(cafile=opts["ca"])
    context.set_alpn_protocols(["http/1.1"])
    n = opts.get("streams", 1)
    per_stream = opts["bytes"] // n
    socks, alpn = [], "none"
    try:
        for _ in range(n):
            sock, alpn = open_tunnel(context, url.hostname, url.port, opts.get("servername", "localhost"),
                                     opts["target"], deadline)
            socks.append(sock)
        got = [0] * n
        view = memoryview(bytearray(MiB))
        selector = selectors.DefaultSelector()
        cpu0, t0 = time.process_time(), time.perf_counter()
        for i, sock in enumerate(socks):
            sock.sendall(f"GET {per_stream}\n".encode())
            sock.setblocking(False)
            selector.register(sock, selectors.EVENT_READ, i)
        open_count = n
        while open_count and time.monotonic() < deadline:
            for key, _ in selector.select(timeout=1.0):
                i, sock = key.data, key.fileobj
                eof = False
                while True:   # drain: one recv_into returns at most one TLS record
                    try:
                        k = sock.recv_into(view, min(MiB, per_stream - got[i]))
                    except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
                        break
                    if not k:
                        eof = True
                        break
                    got[i] += k
                    if got[i] >= per_stream:
                        break
                if got[i] >= per_stream or eof:
                    selector.unregister(sock)
                    open_count -= 1
        seconds = time.perf_counter() - t0
        cpu = time.process_time() - cpu0
    finally:
        for sock in socks:
            sock.close()
    total = sum(got)
    ok = all(g == per_stream for g in got)
    result = {"bytes": total, "streams": n, "bytes_wanted": per_stream * n, "seconds": seconds,
              "ok": ok, "client_cpu_s": cpu, "alpn": alpn}
    if not ok:
        result["error"] = f"moved {total} of {per_stream * n} bytes" + (
            " (timeout)" if time.monotonic() >= deadline else "")
    return result


def main() -> int:
    try:
        result = run(json.loads(sys.argv[1]))
    except (OSError, ValueError) as exc:
        result = {"error": f"{type(exc).__name__}: {exc}"}
    print(json.dumps(result), flush=True)
    return 1 if result.get("error") else 0


if __name__ == "__main__":
    sys.exit(main())
