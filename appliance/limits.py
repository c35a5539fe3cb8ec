"""Connection limits, checked where a connection is accepted, before any protocol runs.

`[limits] max_connections` bounds the connections one worker serves at once and
`max_connections_per_client` those of one client address, so one busy or hostile client cannot
take every slot. A connection over a limit gets the clearest answer its listener can give
without serving it: `503` with `Retry-After` on plain HTTP listeners, a SOCKS5 "general failure"
reply, and a plain close where TLS would have to be negotiated first (https, transparent TLS)
or where nobody would read an answer. Every refusal is logged (at most once a minute per client)
and counted in `appliance_limit_refusals_total{limit}`.
"""

from __future__ import annotations

import logging
import time
from collections import Counter

from gevent import socket

from .protocols import socks5
from .protocols.http1 import serialize_head, status_line

log = logging.getLogger("appliance.limits")

REFUSAL_TIMEOUT = 2.0            # seconds a refused client gets to send what the answer needs
LOG_EVERY = 60.0


class ConnectionLimiter:
    """Counts open connections, in all and per client address; no I/O."""

    def __init__(self) -> None:
        self.total = 0
        self.per_client: Counter[str] = Counter()

    def acquire(self, client: str, max_total: int, max_per_client: int) -> str | None:
        """Take a slot; the name of the limit that refuses it, or None when admitted."""
        if self.total >= max_total:
            return "connections"
        if self.per_client[client] >= max_per_client:
            return "connections_per_client"
        self.total += 1
        self.per_client[client] += 1
        return None

    def release(self, client: str) -> None:
        self.total -= 1
        self.per_client[client] -= 1
        if self.per_client[client] <= 0:
            del self.per_client[client]


class RefusalLog:
    """One log line per client and limit a minute, however many connections are refused."""

    def __init__(self) -> None:
        self._last: dict[tuple[str, str], float] = {}

    def note(self, client: str, limit: str, listener: str) -> None:
        now = time.monotonic()
        key = (client, limit)
        if now - self._last.get(key, float("-inf")) >= LOG_EVERY:
            if len(self._last) > 10000:
                self._last.clear()
            self._last[key] = now
            log.warning("%s: connection from %s refused: [limits] %s reached", listener, client,
                        "max_" + limit)


def refuse_connection(listener: str, sock: socket.socket, limit: str) -> None:
    """Answer a connection over a limit as its listener's protocol allows, then close it."""
    sock.settimeout(REFUSAL_TIMEOUT)
    try:
        if listener in ("http", "transparent_http", "pac", "admin"):
            body = f"too many connections ([limits] max_{limit}); try again later\n".encode()
            head = serialize_head(status_line(503, "Service Unavailable"), (
                ("Content-Type", "text/plain; charset=utf-8"), ("Content-Length", str(len(body))),
                ("Retry-After", "5"), ("Connection", "close")))
            sock.sendall(head + body)
        elif listener == "socks5":
            _refuse_socks5(sock)
        socket.socket.shutdown(sock, socket.SHUT_WR)
        sock.recv(65536)                 # let the client's bytes in: a close on unread data is a reset
    except (OSError, socks5.Socks5Error):
        pass
    finally:
        sock.close()


def _refuse_socks5(sock: socket.socket) -> None:
    """Greeting → no authentication → the request → REP 0x01 (general failure)."""
    data = b""
    for step in (socks5.parse_greeting, socks5.parse_request):
        for _ in range(8):
            parsed = step(data)
            if parsed is not None:
                data = data[parsed[1]:]
                break
            more = sock.recv(1024)
            if not more:
                return
            data += more
        else:
            return
        if step is socks5.parse_greeting:
            sock.sendall(socks5.method_selection(socks5.METHOD_NO_AUTH))
    sock.sendall(socks5.reply(socks5.REP_GENERAL_FAILURE))
