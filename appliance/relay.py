"""Byte pipes between two sockets: CONNECT tunnels, WebSocket after 101, later SOCKS5 and passthrough.

Each direction runs until its source ends, then half-closes its destination
(`shutdown(SHUT_WR)`), so a peer that has finished sending can still receive (RFC 9112 §9.6
leaves the tunnel open until both sides are done). Plain socket pairs move bytes with
`os.splice` through a kernel pipe, so the payload never enters Python; sockets that are not
plain (TLS, later) or platforms without splice use one reused buffer per direction, taken only
once that direction carries data.

A tunnel ends when both directions have ended, when either side fails (both are shut down at
once), or when neither side has moved a byte for `idle_timeout` seconds.
"""

from __future__ import annotations

import errno
import os
from gevent import socket
import time
from dataclasses import dataclass

import gevent
from gevent.socket import wait_read, wait_write

BUFFER_SIZE = 256 * 1024
_SPLICE_FLAGS = getattr(os, "SPLICE_F_MOVE", 1) | getattr(os, "SPLICE_F_NONBLOCK", 2)
SPLICE_AVAILABLE = hasattr(os, "splice")


class _Idle(Exception):
    """No byte moved in either direction for the idle timeout."""


@dataclass(frozen=True)
class RelayResult:
    a_to_b: int
    b_to_a: int
    error: str | None = None      # "idle timeout", or the socket error that ended the tunnel


class _Activity:
    """Last time either direction moved bytes; a quiet direction only gives up on shared idleness."""

    def __init__(self, idle_timeout: float) -> None:
        self.idle_timeout = idle_timeout
        self.last = time.monotonic()

    def touch(self) -> None:
        self.last = time.monotonic()

    def remaining(self) -> float:
        left = self.last + self.idle_timeout - time.monotonic()
        if left <= 0:
            raise _Idle()
        return left


def _wait(waiter, fd: int, activity: _Activity) -> None:
    """Wait for `fd` readiness, waking up to re-check shared idleness."""
    while True:
        try:
            waiter(fd, timeout=activity.remaining(), timeout_exc=socket.timeout)
            return
        except socket.timeout:
            continue


def _splice_direction(src: socket.socket, dst: socket.socket, activity: _Activity) -> int:
    total = 0
    pipe_r, pipe_w = os.pipe()
    try:
        src_fd, dst_fd = src.fileno(), dst.fileno()
        while True:
            try:
                n = os.splice(src_fd, pipe_w, BUFFER_SIZE, flags=_SPLICE_FLAGS)
            except BlockingIOError:
                _wait(wait_read, src_fd, activity)
                continue
            if n == 0:
                return total
            activity.touch()
            left = n
            while left:
                try:
                    left -= os.splice(pipe_r, dst_fd, left, flags=_SPLICE_FLAGS)
                except BlockingIOError:
                    _wait(wait_write, dst_fd, activity)
            total += n
    finally:
        os.close(pipe_r)
        os.close(pipe_w)


def _copy_direction(src: socket.socket, dst: socket.socket, activity: _Activity) -> int:
    total = 0
    _wait(wait_read, src.fileno(), activity)
    buf = bytearray(BUFFER_SIZE)          # taken only once this direction carries data
    view = memoryview(buf)
    while True:
        n = None
        with gevent.Timeout(activity.remaining(), False):
            n = src.recv_into(buf)
        if n is None:                     # woke up to re-check idleness of both directions
            continue
        if n == 0:
            return total
        activity.touch()
        with gevent.Timeout(activity.idle_timeout, _Idle):
            dst.sendall(view[:n])
        total += n


def can_splice(a: socket.socket, b: socket.socket) -> bool:
    """splice(2) needs real socket fds on both ends: no TLS object in between."""
    return SPLICE_AVAILABLE and type(a).__name__ == "socket" and type(b).__name__ == "socket"


def _direction(src, dst, activity: _Activity, use_splice: bool, first: bytes) -> int:
    total = 0
    if first:
        dst.sendall(first)
        activity.touch()
        total = len(first)
    mover = _splice_direction if use_splice else _copy_direction
    total += mover(src, dst, activity)
    try:
        dst.shutdown(socket.SHUT_WR)
    except OSError:
        pass
    return total


def _shutdown_both(a, b) -> None:
    for s in (a, b):
        try:
            s.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


def pipe(a: socket.socket, b: socket.socket, idle_timeout: float, *, a_to_b_first: bytes = b"",
         b_to_a_first: bytes = b"", use_splice: bool | None = None) -> RelayResult:
    """Relay until both directions end; `*_first` are bytes already read past a handshake."""
    if use_splice is None:
        use_splice = can_splice(a, b)
    a.settimeout(None)
    b.settimeout(None)
    activity = _Activity(idle_timeout)
    upward = gevent.spawn(_direction, a, b, activity, use_splice, a_to_b_first)
    error = None
    down = 0
    try:
        down = _direction(b, a, activity, use_splice, b_to_a_first)
    except _Idle:
        error = "idle timeout"
    except OSError as exc:
        error = _describe(exc)
    if error:
        _shutdown_both(a, b)
    upward.join()
    if not upward.successful():
        exc = upward.exception
        error = error or ("idle timeout" if isinstance(exc, _Idle) else _describe(exc))
        _shutdown_both(a, b)
    up = upward.value or 0
    return RelayResult(a_to_b=up, b_to_a=down, error=error)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.errno:
        return f"{errno.errorcode.get(exc.errno, exc.errno)}: {exc.strerror}"
    return type(exc).__name__
