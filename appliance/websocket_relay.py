"""WebSocket after the handshake, inspected: a thin gevent shell around `protocols.websocket_inspect`.

Where `relay.pipe` (HTTP/1.1 Upgrade) or `relay.stream_pipe` (RFC 8441 over HTTP/2) would move
bytes blindly, `[websocket] inspect = true` puts this in its place: one greenlet per direction
reads a side (a socket, or the client's HTTP/2 stream), feeds the sans-I/O `WebSocketInspector`
and writes what it gives to each side (a lock per side keeps one writer at a time, since either
direction may answer either side). It ends when the closing handshake is done, a side leaves, a
side breaks a rule (both sides have then been sent their Close), or nothing moved for the idle
timeout. Then each side gets a bounded lingering close: our end of sending, then whatever the
peer still sends is read and dropped, so a socket closed with unread bytes does not answer with
a reset that could discard our Close frame before the peer read it.
"""

from __future__ import annotations

import logging
import time

import gevent
from gevent import socket
from gevent.lock import Semaphore

from .protocols.http1 import Headers
from .protocols.websocket_inspect import (
    CLIENT, ORIGIN, Outcome, WebSocketInspector, agreed_compression, inspectable_offer,
)
from .relay import RelayResult, StreamGone, StreamSide, shutdown_socket

log = logging.getLogger("appliance.websocket")

READ_SIZE = 64 * 1024
LINGER_SECONDS = 2.0          # for the peers to read our Close and end their side
LINGER_BYTES = 1 << 20        # dropped at most, per side, while lingering


def offered_fields(settings, headers: Headers) -> Headers:
    """The client's handshake fields as the origin gets them: when inspecting (`settings` is
    the config's `[websocket]`), only the extension offers inspection can follow."""
    return inspectable_offer(headers, settings.allow_compression) if settings.inspect else headers


def inspector_for(settings, origin_headers: Headers) -> WebSocketInspector | None:
    """What `[websocket]` asks for once the origin's 101 is in: None to relay bytes blindly.
    Raises `UpstreamHandshakeError` (502) when the 101 agreed to what inspection cannot follow."""
    if not settings.inspect:
        return None
    agreed = agreed_compression(origin_headers, settings.allow_compression)
    return WebSocketInspector(settings.max_frame_bytes, settings.max_message_bytes, agreed)


class SocketEnd:
    """A side that is a socket (plain or TLS)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        sock.settimeout(None)                 # deadlines here are gevent.Timeouts

    def recv(self) -> bytes:
        return self.sock.recv(READ_SIZE)

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def end(self) -> None:
        shutdown_socket(self.sock, socket.SHUT_WR)


class StreamEnd:
    """A side that is an HTTP/2 stream (RFC 8441): the credit for what was read goes back at the
    next read, once the inspector's output for it was written on (backpressure)."""

    def __init__(self, stream: StreamSide) -> None:
        self.stream = stream
        self.unacked = 0

    def recv(self) -> bytes:
        if self.unacked:
            self.stream.ack(self.unacked)
        try:
            data = self.stream.read()
        except StreamGone as exc:
            raise ConnectionResetError(str(exc)) from None
        self.unacked = len(data)
        return data

    def send(self, data: bytes) -> None:
        try:
            self.stream.send(data)
        except StreamGone as exc:
            raise ConnectionResetError(str(exc)) from None

    def end(self) -> None:
        try:
            self.stream.end()
        except StreamGone:
            pass


class _Idle(Exception):
    """Neither side moved a byte for the idle timeout."""


class InspectedWebSocket:
    """The two sides of one WebSocket, pumped through a `WebSocketInspector`."""

    def __init__(self, client: SocketEnd | StreamEnd, origin: SocketEnd, inspector: WebSocketInspector,
                 idle_timeout: float, name: str) -> None:
        self.ends = {CLIENT: client, ORIGIN: origin}
        self.locks = {CLIENT: Semaphore(), ORIGIN: Semaphore()}
        self.sent = {CLIENT: 0, ORIGIN: 0}
        self.received = {CLIENT: 0, ORIGIN: 0}
        self.inspector = inspector
        self.idle_timeout = idle_timeout
        self.name = name                  # the target, for the log
        self.last = time.monotonic()
        self.error: str | None = None

    def run(self, client_first: bytes = b"", origin_first: bytes = b"") -> RelayResult:
        """Until the WebSocket ends; `*_first` are bytes read past the handshake. Counted as
        the client's: bytes up are what it sent (inspected or not), bytes down what it got."""
        directions = [gevent.spawn(self._direction, CLIENT, client_first),
                      gevent.spawn(self._direction, ORIGIN, origin_first)]
        for direction in directions:          # whichever ends first ends the WebSocket
            direction.link(lambda _: gevent.killall(directions, block=False))
        try:
            gevent.joinall(directions)
        finally:
            gevent.killall(directions)
        self._linger()
        violation = self.inspector.violation
        if violation is not None:
            log.info("websocket %s: %s", self.name, violation.describe())
            self.error = violation.describe()
        return RelayResult(a_to_b=self.received[CLIENT], b_to_a=self.sent[CLIENT], error=self.error)

    def _direction(self, side: str, first: bytes) -> None:
        try:
            self.received[side] += len(first)
            data = first or self._recv(side)
            while True:                       # ends at EOF, a violation or the closing handshake
                if not data:
                    self._deliver(self.inspector.peer_gone(side))
                    return
                self._deliver(self.inspector.receive(side, data))
                if self.inspector.closed:
                    return
                data = self._recv(side)
        except _Idle:
            self.error = self.error or "idle timeout"
        except OSError as exc:
            if not self.inspector.closed:
                self.error = self.error or f"{side}: {exc.strerror or exc}"

    def _recv(self, side: str) -> bytes:
        """The next read of `side`; idleness is shared: either side moving keeps both waiting."""
        while True:
            left = self.last + self.idle_timeout - time.monotonic()
            if left <= 0:
                raise _Idle()
            data = None
            with gevent.Timeout(left, False):
                data = self.ends[side].recv()
            if data is not None:
                self.last = time.monotonic()
                self.received[side] += len(data)
                return data

    def _deliver(self, outcome: Outcome) -> None:
        for side, data in ((CLIENT, outcome.to_client), (ORIGIN, outcome.to_origin)):
            if data:
                with self.locks[side], gevent.Timeout(self.idle_timeout, _Idle):
                    self.ends[side].send(data)
                self.sent[side] += len(data)
                self.last = time.monotonic()

    def _linger(self) -> None:
        for end in self.ends.values():
            end.end()
        deadline = time.monotonic() + LINGER_SECONDS
        for end in self.ends.values():
            dropped = 0
            with gevent.Timeout(max(deadline - time.monotonic(), 0.01), False):
                while dropped < LINGER_BYTES:
                    try:
                        data = end.recv()
                    except OSError:
                        break
                    if not data:
                        break
                    dropped += len(data)
