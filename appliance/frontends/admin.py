"""A small HTTP/1.1 server for fixed routes, on the same codec as the proxy.

The admin listener serves `/healthz`, `/metrics` (Prometheus text), `/status` (a live HTML page,
`frontends/status_page.py`) and `/status.json` (what the page shows): serve it on loopback or a
management network, and set `[admin] users_file` for Basic auth (`BasicAuthGuard`; `/healthz`
stays open for health checks). The pac listener serves
the PAC file (`/proxy.pac`, `/wpad.dat`, with conditional GET) and the CA (`/ca.pem`, `/ca.der`).
A route gets the request's header fields and returns (status, content type, body) and,
optionally, extra response fields.
"""

from __future__ import annotations

import json
import logging
from typing import Callable

from gevent import socket

from ..errors import AuthRequired, ClientError
from ..protocols.http1 import (
    Headers, RemoteProtocolError, parse_request_head, serialize_head, status_line, wants_keep_alive,
)
from ..protocols.proxy_auth import basic_credentials
from ..reader import SocketReader

log = logging.getLogger("appliance.admin")

PROMETHEUS_TEXT = "text/plain; version=0.0.4; charset=utf-8"

Route = Callable[[Headers], tuple]      # (status, content type, body[, extra header fields])
Guard = Callable[[str, str, Headers], "tuple | None"]   # (client, path, headers) → None to serve, or a refusal


class BasicAuthGuard:
    """Basic auth for the admin listener (`[admin] users_file`): 401 with a challenge unless the
    request's Authorization names a user of that file with the right password (RFC 7617)."""

    def __init__(self, authenticator) -> None:
        self.authenticator = authenticator

    def __call__(self, client: str, headers: Headers):
        credentials = basic_credentials(headers, "authorization")
        if credentials is not None:
            try:
                self.authenticator.verify(client, credentials.user, credentials.password)
                return None
            except AuthRequired:
                pass
        challenge = ("WWW-Authenticate", f'Basic realm="{self.authenticator.realm}", charset="UTF-8"')
        return 401, "text/plain", b"the admin listener needs a user name and password\n", (challenge,)


class AdminSession:
    """One connection to the admin listener."""

    def __init__(self, sock: socket.socket, address, routes: dict[str, Route],
                 idle_timeout: float, max_header_bytes: int, guard: Guard | None = None) -> None:
        self.reader = SocketReader(sock, "client", idle_timeout)
        self.routes = routes
        self.max_header_bytes = max_header_bytes
        self.client_ip = address[0]
        self.guard = guard

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
        extra: Headers = ()
        refusal = self.guard(self.client_ip, path, head.headers) if self.guard is not None else None
        if refusal is not None:
            status, ctype, body, extra = refusal
        elif head.method not in ("GET", "HEAD"):
            status, ctype, body = 405, "text/plain", b"only GET and HEAD\n"
        elif route is None:
            status, ctype, body = 404, "text/plain", f"not found; try {', '.join(self.routes)}\n".encode()
        else:
            status, ctype, body, *more = route(head.headers)
            extra = more[0] if more else ()
        keep = wants_keep_alive(head.version, head.headers)
        self._send(status, ctype, b"" if head.method == "HEAD" else body, keep, len(body), extra)
        return keep

    def _send(self, status: int, ctype: str, body: bytes, keep: bool, length: int | None = None,
              extra: Headers = ()) -> None:
        if status == 304:               # RFC 9110 §15.4.5: no body, no Content-Length needed
            headers = extra
        else:
            headers = (("Content-Type", ctype), ("Content-Length", str(len(body) if length is None else length)))
            headers += extra if any(k == "Cache-Control" for k, _ in extra) else \
                extra + (("Cache-Control", "no-store"),)
        if not keep:
            headers += (("Connection", "close"),)
        reason = {200: "OK", 304: "Not Modified", 400: "Bad Request", 401: "Unauthorized", 404: "Not Found",
                  405: "Method Not Allowed", 503: "Service Unavailable"}.get(status, "")
        self.reader.sendall(serialize_head(status_line(status, reason), headers) + body)


def json_body(data: dict) -> bytes:
    return (json.dumps(data, indent=2) + "\n").encode()
