"""Connection limits, checked where a connection is accepted, before any protocol runs.

`[limits] max_connections` bounds the connections one worker serves at once and
`max_connections_per_client` those of one client address, so one busy or hostile client cannot
take every slot. A connection over a limit gets the clearest answer its listener can give
without serving it: `503` with `Retry-After` on plain HTTP listeners, a SOCKS5 "general failure"
reply, and a plain close where TLS would have to be negotiated first (https, transparent TLS)
or where nobody would read an answer. Every refusal is logged (at most once a minute per client)
and counted in `appliance_limit_refusals_total{limit}`.

Out of file descriptors (EMFILE), a listener cannot accept, and a connection left in the
backlog would wait, unanswered, for as long as the shortage lasts. `DescriptorReserve` keeps
one descriptor aside for that case: it is given up to accept the waiting connection, which is
answered like one over a limit and closed, and then taken back.

`UploadPace` bounds how slowly a request body may arrive: a client trickling a byte just within
each idle timeout (slow POST) would otherwise hold a client slot and an origin connection for
ever. Past a grace period it must have kept a minimum average rate, as Apache's mod_reqtimeout
asks (`body=...,MinRate=500`).
"""

from __future__ import annotations

import errno
import logging
import os
import time
from collections import Counter

from gevent import socket

from .protocols import socks5
from .protocols.http1 import RemoteProtocolError, serialize_head, status_line

log = logging.getLogger("appliance.limits")

REFUSAL_TIMEOUT = 2.0            # seconds a refused client gets to send what the answer needs
LOG_EVERY = 60.0
MIN_UPLOAD_RATE = 500            # bytes a second a request body must average past its grace period
HTTP_LISTENERS = ("http", "transparent_http", "pac", "admin")    # refused with a 503


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


class UploadPace:
    """Whether a request body keeps up a minimum rate; no I/O, the caller times its reads.

    Only time spent waiting for the client counts: while the origin is slow to take the body,
    backpressure stops the reads and the client is not to blame. Within `grace` seconds of
    such waiting any pace is fine (`[limits] header_timeout`, what a request head gets)."""

    def __init__(self, grace: float, min_rate: int = MIN_UPLOAD_RATE) -> None:
        self.grace = grace
        self.min_rate = min_rate
        self.waited = 0.0
        self.received = 0

    def note(self, waited: float, received: int) -> None:
        """One read from the client: how long it waited and what it got; 408 when too slow.
        The clock starts at the first body byte: before it, a client may rightly be waiting for
        a 100 Continue, and the idle timeout bounds that wait."""
        if self.received:
            self.waited += waited
        self.received += received
        if self.waited > self.grace and self.received < self.min_rate * self.waited:
            raise RemoteProtocolError(
                f"request body slower than {self.min_rate} bytes/s: {self.received} bytes in "
                f"{self.waited:.1f}s", 408)


class DescriptorReserve:
    """One descriptor held back, so that connections can still be refused when none is left."""

    SHORTAGE = (errno.EMFILE, errno.ENFILE)

    def __init__(self) -> None:
        self._fd: int | None = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
        self._last_log = float("-inf")

    def shed(self, listener: str, listening: socket.socket) -> None:
        """After an accept failed for want of descriptors: accept one waiting connection with
        the reserve's slot, refuse it, and take the slot back (if the shortage allows)."""
        now = time.monotonic()
        if now - self._last_log >= LOG_EVERY:
            self._last_log = now
            log.warning("%s: out of file descriptors; refusing new connections until some close",
                        listener)
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        try:
            fd, _ = listening._accept()
        except OSError:
            fd = None
        if fd is not None:
            refused = socket.socket(listening.family, listening.type, fileno=fd)
            refused.setblocking(False)
            try:
                if listener in HTTP_LISTENERS:
                    refused.send(refusal_response("the proxy is out of file descriptors"))
            except OSError:
                pass
            refused.close()
        try:
            self._fd = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            self._fd = None               # taken back at the next shedding


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
        if listener in HTTP_LISTENERS:
            sock.sendall(refusal_response(f"too many connections ([limits] max_{limit})"))
        elif listener == "socks5":
            _refuse_socks5(sock)
        socket.socket.shutdown(sock, socket.SHUT_WR)
        sock.recv(65536)                 # let the client's bytes in: a close on unread data is a reset
    except (OSError, socks5.Socks5Error):
        pass
    finally:
        sock.close()


def refusal_response(why: str) -> bytes:
    """503 with Retry-After, for a connection refused before any request was read."""
    body = f"{why}; try again later\n".encode()
    head = serialize_head(status_line(503, "Service Unavailable"), (
        ("Content-Type", "text/plain; charset=utf-8"), ("Content-Length", str(len(body))),
        ("Retry-After", "5"), ("Connection", "close")))
    return head + body


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
