"""The admin listener: `/healthz`, `/metrics` (Prometheus text) and `/status` (JSON).

A small HTTP/1.1 server on the same codec as the proxy. Serve it on loopback or a management
network only: it needs no credentials.
"""

from __future__ import annotations

import json
import logging
from typing import Callable

from gevent import socket

from ..errors import ClientError
from ..protocols.http1 import RemoteProtocolError, parse_request_head, serialize_head, status_line, wants_keep_alive
from ..reader import SocketReader

log = logging.getLogger("appliance.admin")

PROMETHEUS_TEXT = "text/plain; version=0.0.4; charset=utf-8"


class AdminSession:
    """One connection to the admin listener."""

    def __init__(self, sock: socket.socket, address, routes: dict[str, Callable[[], tuple[int, str, bytes]]],
                 idle_timeout: float, max_header_bytes: int) -> None:
        self.reader = SocketReader(sock, "client", idle_timeout)
        self.routes = routes
        self.max_header_bytes = max_header_bytes

    def run(self) -> None:
        try:
            while self._serve_one():
                pass
        except ClientError:
            pass

    def _serve_one(self) -> bool:
        try:
            raw = self.reader.read_head(self.max_header_bytes)
            if raw is None:
                return False
            head = parse_request_head(raw)
        except RemoteProtocolError as exc:
            self._send(400, "text/plain", f"{exc}\n".encode(), keep=False)
            return False
        path = head.target.split("?", 1)[0]
        route = self.routes.get(path)
        if head.method not in ("GET", "HEAD"):
            status, ctype, body = 405, "text/plain", b"only GET and HEAD\n"
        elif route is None:
            status, ctype, body = 404, "text/plain", b"not found; try /healthz, /metrics, /status\n"
        else:
            status, ctype, body = route()
        keep = wants_keep_alive(head.version, head.headers)
        self._send(status, ctype, b"" if head.method == "HEAD" else body, keep, len(body))
        return keep

    def _send(self, status: int, ctype: str, body: bytes, keep: bool, length: int | None = None) -> None:
        headers = (("Content-Type", ctype), ("Content-Length", str(len(body) if length is None else length)),
                   ("Cache-Control", "no-store"))
        if not keep:
            headers += (("Connection", "close"),)
        reason = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
                  503: "Service Unavailable"}.get(status, "")
        self.reader.sendall(serialize_head(status_line(status, reason), headers) + body)


def json_body(data: dict) -> bytes:
    return (json.dumps(data, indent=2) + "\n").encode()
