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
import time
from dataclasses import dataclass

import gevent
from gevent import socket
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


class _Flow:
    """Bytes moved in one direction so far: counted as they go, so a failure loses no count."""

    moved = 0


class _Closed(Exception):
    """A TLS side ended. TLS sockets here cannot half-close (the stdlib drops the TLS state on
    shutdown), so the whole tunnel closes: an end, not a failure."""


def is_tls(sock) -> bool:
    return type(sock).__name__ == "SSLSocket"


def shutdown_socket(sock, how: int) -> None:
    """shutdown(2) on the descriptor only: `SSLSocket.shutdown` also drops its TLS object, after
    which a concurrent read or write would bypass TLS and move plain bytes."""
    try:
        socket.socket.shutdown(sock, how)
    except OSError:
        pass


def _half_close(sock) -> None:
    if is_tls(sock):
        raise _Closed()
    shutdown_socket(sock, socket.SHUT_WR)


class _Failures(list):
    """Failures in the order they happened: the first is the cause, the rest its echo (gevent
    answers a shutdown from another greenlet with 'closed in another greenlet'). Once a TLS side
    has closed the tunnel (`closed`), what follows is that closing, not a failure."""

    closed = False
    stream_reset = False          # the HTTP/2 side was reset, with whatever code

    def run(self, fn, *args) -> None:
        try:
            fn(*args)
        except _Closed:
            self.closed = True
        except StreamGone as exc:
            self.stream_reset = True
            if exc.cancelled:
                self.closed = True
            elif not self.closed:
                self.append(exc)
        except (_Idle, OSError) as exc:
            if not self.closed:
                self.append(exc)

    @property
    def over(self) -> bool:
        return self.closed or bool(self)

    def describe(self) -> str | None:
        if not self:
            return None
        exc = self[0]
        if isinstance(exc, _Idle):
            return "idle timeout"
        if isinstance(exc, StreamGone):
            return "stream reset"
        if isinstance(exc, OSError) and exc.errno:
            return f"{errno.errorcode.get(exc.errno, exc.errno)}: {exc.strerror}"
        return type(exc).__name__


PIPE_IDLE_RELEASE = 1.0    # seconds a direction may stay quiet before its kernel pipe is closed


def _splice_direction(src: socket.socket, dst: socket.socket, activity: _Activity, flow: _Flow) -> None:
    """socket → pipe → socket with splice(2). The pipe (two descriptors) exists only while the
    direction carries data: an idle tunnel holds just its two sockets, so descriptors, not
    memory, stop being what limits how many idle tunnels one process keeps."""
    pipe: tuple[int, int] | None = None
    src_fd, dst_fd = src.fileno(), dst.fileno()
    try:
        while True:
            if pipe is None:
                _wait(wait_read, src_fd, activity)
                pipe = os.pipe()
            try:
                n = os.splice(src_fd, pipe[1], BUFFER_SIZE, flags=_SPLICE_FLAGS)
            except BlockingIOError:
                try:
                    wait_read(src_fd, timeout=PIPE_IDLE_RELEASE)
                except socket.timeout:
                    _close_pipe(pipe)          # empty: every spliced byte was passed on
                    pipe = None
                continue
            if n == 0:
                return
            activity.touch()
            left = n
            while left:
                try:
                    left -= os.splice(pipe[0], dst_fd, left, flags=_SPLICE_FLAGS)
                except BlockingIOError:
                    _wait(wait_write, dst_fd, activity)
            flow.moved += n
    finally:
        if pipe is not None:
            _close_pipe(pipe)


def _close_pipe(pipe: tuple[int, int]) -> None:
    os.close(pipe[0])
    os.close(pipe[1])


def _copy_direction(src: socket.socket, dst: socket.socket, activity: _Activity, flow: _Flow) -> None:
    if not getattr(src, "pending", lambda: 0)():   # TLS may hold decrypted bytes already
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
            return
        activity.touch()
        with gevent.Timeout(activity.idle_timeout, _Idle):
            dst.sendall(view[:n])
        flow.moved += n


def can_splice(a: socket.socket, b: socket.socket) -> bool:
    """splice(2) needs real socket fds on both ends: no TLS object in between."""
    return SPLICE_AVAILABLE and type(a).__name__ == "socket" and type(b).__name__ == "socket"


def _direction(src, dst, activity: _Activity, use_splice: bool, first: bytes, flow: _Flow) -> None:
    if first:
        dst.sendall(first)
        activity.touch()
        flow.moved += len(first)
    (_splice_direction if use_splice else _copy_direction)(src, dst, activity, flow)
    _half_close(dst)


def _reset_on_close(sock) -> None:
    """linger 0: closing the socket sends RST instead of FIN."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    except OSError:
        pass


def _shutdown(*socks) -> None:
    for s in socks:
        shutdown_socket(s, socket.SHUT_RDWR)


def _abort_on_failure(failures: _Failures, *socks):
    """A link callback: once a direction failed or closed the tunnel, wake the other one."""
    def callback(_greenlet) -> None:
        if failures.over:
            _shutdown(*socks)
    return callback


def pipe(a: socket.socket, b: socket.socket, idle_timeout: float, *, a_to_b_first: bytes = b"",
         b_to_a_first: bytes = b"", use_splice: bool | None = None) -> RelayResult:
    """Relay until both directions end; `*_first` are bytes already read past a handshake."""
    if use_splice is None:
        use_splice = can_splice(a, b)
    a.settimeout(None)
    b.settimeout(None)
    activity = _Activity(idle_timeout)
    up, down, failures = _Flow(), _Flow(), _Failures()
    upward = gevent.spawn(failures.run, _direction, a, b, activity, use_splice, a_to_b_first, up)
    upward.link(_abort_on_failure(failures, a, b))
    failures.run(_direction, b, a, activity, use_splice, b_to_a_first, down)
    if failures.over:
        _shutdown(a, b)
    upward.join()
    return RelayResult(a_to_b=up.moved, b_to_a=down.moved, error=failures.describe())


# --- an HTTP/2 stream and a socket (CONNECT and extended CONNECT streams) ----------------------

class StreamSide:
    """What `stream_pipe` needs of an HTTP/2 stream; frontends/h2.py provides it.

    read() returns the next DATA payload, b"" at END_STREAM, and raises `StreamGone` once the
    stream was reset; ack(n) returns flow-control credit after the bytes were written on;
    send(data) blocks while the peer's window is closed; end() sends END_STREAM; reset() RST.
    """

    def read(self) -> bytes: ...
    def ack(self, n: int) -> None: ...
    def send(self, data: bytes) -> None: ...
    def end(self) -> None: ...
    def reset(self) -> None: ...


class StreamGone(Exception):
    """The HTTP/2 stream was reset by the peer or ended with its connection.

    `cancelled`: the peer reset it with CANCEL, which is how browsers close a CONNECT tunnel
    they are done with (Chromium never sends END_STREAM on one): an end, not a failure.
    """

    def __init__(self, cancelled: bool = False) -> None:
        super().__init__("stream cancelled" if cancelled else "stream reset")
        self.cancelled = cancelled


def _stream_to_socket(stream: StreamSide, sock: socket.socket, activity: _Activity, flow: _Flow) -> None:
    while True:
        data = None
        with gevent.Timeout(activity.remaining(), False):
            data = stream.read()
        if data is None:                     # woke up to re-check idleness
            continue
        if not data:
            _half_close(sock)                # END_STREAM ↔ FIN (RFC 9113 §8.5)
            return
        activity.touch()
        with gevent.Timeout(activity.idle_timeout, _Idle):
            sock.sendall(data)
        stream.ack(len(data))                # credit only once written on: backpressure
        flow.moved += len(data)


def _socket_to_stream(sock: socket.socket, stream: StreamSide, activity: _Activity, first: bytes,
                      flow: _Flow) -> None:
    if first:
        stream.send(first)
        flow.moved += len(first)
    if not getattr(sock, "pending", lambda: 0)():
        _wait(wait_read, sock.fileno(), activity)
    buf = bytearray(BUFFER_SIZE)     # reused: stream.send has copied what it needs on return
    view = memoryview(buf)
    while True:
        n = None
        with gevent.Timeout(activity.remaining(), False):
            n = sock.recv_into(buf)
        if n is None:
            continue
        if not n:
            stream.end()
            return
        activity.touch()
        with gevent.Timeout(activity.idle_timeout, _Idle):
            stream.send(view[:n])
        flow.moved += n


def stream_pipe(stream: StreamSide, sock: socket.socket, idle_timeout: float,
                socket_first: bytes = b"") -> RelayResult:
    """Relay an HTTP/2 stream and a socket until both directions end; `socket_first` are bytes
    already read from the socket (past a handshake), sent on the stream first.

    A reset stream resets the TCP connection (RST, via linger 0) and a failed socket resets the
    stream, so neither side mistakes an abort for a clean end.
    """
    sock.settimeout(None)
    activity = _Activity(idle_timeout)
    up, down, failures = _Flow(), _Flow(), _Failures()
    upward = gevent.spawn(failures.run, _stream_to_socket, stream, sock, activity, up)

    def wake_downward(_greenlet) -> None:
        if failures.stream_reset:
            # Reset toward the origin, not FIN: linger 0 makes the close send RST; SHUT_RD (which
            # sends nothing) only wakes the reader of this socket.
            _reset_on_close(sock)
            shutdown_socket(sock, socket.SHUT_RD)
        elif failures.over:
            _shutdown(sock)

    upward.link(wake_downward)
    failures.run(_socket_to_stream, sock, stream, activity, socket_first, down)
    if failures.over:
        upward.kill()
    upward.join()
    if failures.closed and not failures and not failures.stream_reset:
        try:
            stream.end()                     # the TLS origin side closed: so does the stream
        except StreamGone:
            pass
    if failures and not isinstance(failures[0], StreamGone):
        try:
            stream.reset()                   # the socket failed: the stream says so (RST_STREAM)
        except StreamGone:
            pass
    if failures or failures.stream_reset:
        _reset_on_close(sock)      # RFC 9113 §8.5: a reset stream resets the TCP connection
    return RelayResult(a_to_b=up.moved, b_to_a=down.moved, error=failures.describe())
