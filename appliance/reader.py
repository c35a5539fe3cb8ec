"""Buffered reads and deadline-bound writes on one side of a proxied exchange.

The HTTP/1.1 frontend reads client heads and bodies through a `SocketReader`, and origin
responses through another; each knows its side, so a timeout or reset becomes the error that
names that side (`ClientError` for the client, `UpstreamError` for the origin) and the edge can
answer correctly: nobody to answer for a vanished client, 502/504 for an origin.
"""

from __future__ import annotations

import time

import socket

from .errors import ClientError, UpstreamError
from .protocols.http1 import RemoteProtocolError, find_head_end

READ_SIZE = 256 * 1024


class SocketReader:
    """Reads from `sock` with a per-read timeout; `buffered` holds bytes read but not yet used."""

    def __init__(self, sock: socket.socket, side: str, timeout: float, name: str = "") -> None:
        self.sock = sock
        self.side = side            # "client" | "origin"
        self.name = name            # for error messages: the origin's host:port
        self.timeout = timeout
        self.buffered = b""
        self.received = 0           # bytes taken off the socket

    def _fail(self, what: str, exc: BaseException | None = None):
        if self.side == "client":
            return ClientError(what)
        kind = "timeout" if isinstance(exc, socket.timeout) else "closed"
        return UpstreamError(kind, self.name, what)

    def recv(self, size: int = READ_SIZE) -> bytes:
        """Buffered bytes first, then one read from the socket; b"" at end of stream."""
        if self.buffered:
            data, self.buffered = self.buffered, b""
            return data
        self.sock.settimeout(self.timeout)
        try:
            data = self.sock.recv(size)
        except socket.timeout as exc:
            raise self._fail(f"no data for {self.timeout:g}s", exc) from None
        except OSError as exc:
            raise self._fail(f"read failed: {exc.strerror or exc}", exc) from None
        self.received += len(data)
        return data

    def _recv_within(self, left: float, deadline: float, limit: float) -> bytes:
        """One read, waiting at most `left` seconds (or the idle timeout, if shorter)."""
        idle = self.timeout
        self.timeout = min(idle, left) if idle is not None else left
        try:
            return self.recv()
        except ClientError:
            if time.monotonic() >= deadline:
                raise RemoteProtocolError(f"request head not complete within {limit:g}s", 408) from None
            raise
        finally:
            self.timeout = idle

    def unread(self, data: bytes) -> None:
        if data:
            self.buffered = data + self.buffered

    def read_head(self, max_bytes: int, complete_within: float | None = None) -> bytes | None:
        """One message head, or None if the peer closed before sending a byte of it.

        `complete_within`: once the first byte is in, the rest must follow within this many
        seconds (a slowloris client trickling a byte per idle timeout is cut off with 408).
        """
        buf = self.buffered.lstrip(b"\r\n")   # RFC 9112 §2.2: ignore CRLF before a request line
        self.buffered = b""
        deadline = None
        while True:
            end = find_head_end(buf, max_bytes) if buf else -1
            if end >= 0:
                self.buffered = buf[end:]
                return buf[:end]
            if buf and complete_within is not None:
                deadline = deadline or time.monotonic() + complete_within
                left = deadline - time.monotonic()
                if left <= 0:
                    raise RemoteProtocolError(f"request head not complete within {complete_within:g}s", 408)
                data = self._recv_within(left, deadline, complete_within)
            else:
                data = self.recv()
            if not data:
                if not buf:
                    return None
                raise RemoteProtocolError("connection closed inside a message head")
            buf = (buf + data).lstrip(b"\r\n") if not buf else buf + data

    def sendall(self, data: bytes) -> None:
        send(self.sock, data, self.side, self.timeout, self.name)


def send(sock: socket.socket, data: bytes, side: str, timeout: float, name: str = "") -> None:
    """sendall with a deadline, failing as the error of `side`.

    One `send` first: a head or a small body nearly always fits the socket buffer whole, and
    gevent's `sendall` costs a `getsockopt` and a timer on every call besides the write."""
    sock.settimeout(timeout)
    try:
        sent = sock.send(data)
        if sent < len(data):
            sock.sendall(memoryview(data)[sent:])
    except socket.timeout:
        err = f"peer did not read for {timeout:g}s"
        raise (ClientError(err) if side == "client" else UpstreamError("timeout", name, err)) from None
    except OSError as exc:
        err = f"write failed: {exc.strerror or exc}"
        raise (ClientError(err) if side == "client" else UpstreamError("closed", name, err)) from None
