"""The origins: nginx serving a small object, and a stdlib "bulk" TCP server.

The bulk server runs in a process of its own (`python origins.py PORT`), so
that it shares no GIL with the client that measures throughput.
"""
from __future__ import annotations

import signal
import os
import socket
import sys
import threading
from pathlib import Path

from children import HOST, MiB, Child, tool, wait_until
from load import http_get, listening

SMALL_SIZE = 100


def serve_bulk(port: int) -> None:
    """Bulk TCP server (runs in its own process: `python origins.py PORT`).

    Protocol, one command line per connection: `GET n\\n` sends n bytes then
    waits for the client to close; `PUT n\\n` reads and discards n bytes, then
    answers `OK n\\n`. Data comes from one preallocated 1 MiB buffer.
    """
    payload = memoryview(bytearray(b"x" * MiB))

    def handle(conn: socket.socket) -> None:
        conn.settimeout(120)
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sink = bytearray(MiB)
        view = memoryview(sink)
        try:
            line = b""
            while b"\n" not in line and len(line) < 64:
                data = conn.recv(64)
                if not data:
                    return
                line += data
            command, _, rest = line.partition(b"\n")
            verb, _, count = command.partition(b" ")
            n = int(count)
            if verb == b"GET":
                remaining = n
                while remaining > 0:
                    chunk = min(remaining, MiB)
                    conn.sendall(payload[:chunk])
                    remaining -= chunk
                while conn.recv_into(view):   # wait for the client's close
                    pass
            elif verb == b"PUT":
                got = len(rest)
                while got < n:
                    k = conn.recv_into(view)
                    if not k:
                        break
                    got += k
                conn.sendall(f"OK {got}\n".encode())
                conn.recv_into(view)
        except (OSError, ValueError):
            pass
        finally:
            conn.close()

    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((HOST, port))
    listener.listen(128)
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    while True:
        conn, _ = listener.accept()
        threading.Thread(target=handle, args=(conn,), daemon=True).start()


def tls_server_block(www: Path, tls: tuple[int, Path, Path] | None) -> str:
    """nginx's own TLS port (h2 and HTTP/1.1): the TLS suite's direct baseline."""
    if tls is None:
        return ""
    port, cert, key = tls
    return f"""
    server {{
        listen {HOST}:{port} ssl http2 backlog=4096;
        ssl_certificate {cert};
        ssl_certificate_key {key};
        root {www};
        location = /small {{ }}
    }}"""


def start_origin(work: Path, port: int, tls: tuple[int, Path, Path] | None = None) -> Child:
    """nginx serving /small on port, and over TLS on tls = (port, cert, key) if given."""
    www = work / "www"
    www.mkdir()
    (www / "small").write_bytes(b"o" * SMALL_SIZE)
    conf = work / "nginx.conf"
    conf.write_text(f"""
daemon off;
worker_processes 1;
pid {work}/nginx.pid;
error_log {work}/nginx-error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {work}/nginx-body;
    proxy_temp_path {work}/nginx-proxy;
    fastcgi_temp_path {work}/nginx-fastcgi;
    uwsgi_temp_path {work}/nginx-uwsgi;
    scgi_temp_path {work}/nginx-scgi;
    keepalive_requests 1000000;
    keepalive_timeout 120s;
    default_type application/octet-stream;
    server {{
        listen {HOST}:{port} backlog=4096;
        root {www};
        location = /small {{ }}
    }}{tls_server_block(www, tls)}
}}
""")
    child = Child("nginx", [tool("nginx") or "nginx", "-p", str(work),
                            "-e", str(work / "nginx-error.log"), "-c", str(conf)], work)
    target = f"http://{HOST}:{port}/small"

    def ready() -> bool:
        status, body = http_get(port, "/small", f"{HOST}:{port}")
        return status == 200 and len(body) == SMALL_SIZE
    wait_until(ready, 10.0, child, "origin nginx")
    if tls:
        wait_until(lambda: listening(tls[0]), 10.0, child, "origin nginx TLS port")
    also = f" and https://{HOST}:{tls[0]}/small (h2, HTTP/1.1)" if tls else ""
    print(f"origin: nginx pid {child.pid} serving {target}{also} ({SMALL_SIZE} bytes)")
    return child


def start_bulk(work: Path, port: int, python: str) -> Child:
    child = Child("bulk", [python, str(Path(__file__).resolve()), str(port)], work)
    wait_until(lambda: listening(port), 10.0, child, "bulk server")
    print(f"origin: bulk server pid {child.pid} on {HOST}:{port}")
    return child



if __name__ == "__main__":
    serve_bulk(int(sys.argv[1]))
