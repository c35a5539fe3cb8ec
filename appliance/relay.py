"""Byte pipes between two sockets: CONNECT tunnels, WebSocket after 101, later SOCKS5 and passthrough.

Each direction runs until its source ends, then half-closes its destination
(`shutdown(SHUT_WR)`), so a peer that has finished sending can still receive (RFC 9112 §9.6
leaves the tunnel open until both sides are done). Plain socket pairs adapt to what they carry:
small reads are written straight on from one shared scratch buffer (one recv, one write), large
ones switch the direction to `os.splice` through a kernel pipe, so bulk never enters Python.
Sockets that are not plain (TLS) or platforms without splice use one reused buffer per
direction, taken only once that direction carries data.

A tunnel ends when both directions have ended, when either side fails (both are shut down at
once), or when neither side has moved a byte for `idle_timeout` seconds (one timer per tunnel).
"""

from __future__ import annotations

import errno
import fcntl
import os
import time
from dataclasses import dataclass

import gevent
from gevent import socket
from gevent.hub import Waiter
from gevent.socket import wait_read, wait_write

BUFFER_SIZE = 256 * 1024
_SPLICE_FLAGS = getattr(os, "SPLICE_F_MOVE", 1) | getattr(os, "SPLICE_F_NONBLOCK", 2)
SPLICE_AVAILABLE = hasattr(os, "splice")
F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)      # Linux; named in fcntl since Python 3.10


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
            else:
                self.record(exc)
        except (_Idle, OSError) as exc:
            self.record(exc)

    def record(self, exc: Exception) -> None:
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


# Plain socket pairs (the common tunnel) move each read by the cheapest means for its size. Small
# reads (interactive traffic: WebSocket messages, request/response) are relayed by the read
# watcher's callback in the hub itself, through one shared scratch buffer: one read and one
# non-blocking write per message, no greenlet switch, no timer. A large read means bulk follows,
# so the direction's greenlet takes over and splices through a kernel pipe, where the payload
# never enters Python, until a read comes back small or would wait. The pipe lives only for that
# burst, so an idle tunnel holds just its two sockets (descriptors, not memory, would otherwise
# limit how many idle tunnels one process keeps).
SCRATCH_SIZE = 64 * 1024          # the scratch buffer for small reads
# A burst's pipe is grown to this (F_SETPIPE_SZ; 1 MiB is Linux's default pipe-max-size for
# unprivileged processes): one splice then moves up to this much, a sixteenth of the system calls
# and wake-ups of the default 64 KiB pipe. If the kernel refuses, the pipe keeps its 64 KiB.
BURST_PIPE_SIZE = 1024 * 1024
LARGE_READ = 16 * 1024            # a read this large is taken as bulk: splice what follows
# Shared by every plain tunnel of the process: it holds bytes only from a read to the write that
# follows, with no greenlet switch in between (what a write leaves over is copied out first).
_scratch = bytearray(SCRATCH_SIZE)
_scratch_view = memoryview(_scratch)


class _SmallReads:
    """Relays one direction's small reads from the hub, until a read that is not small: one
    that ends the source, is large, or that the destination cannot take at once."""

    def __init__(self, src_fd: int, dst_fd: int, activity: _Activity, flow: _Flow) -> None:
        self._src_fd, self._dst_fd = src_fd, dst_fd
        self._activity, self._flow = activity, flow
        self._readable = gevent.get_hub().loop.io(src_fd, 1)
        self._waiter = None

    def until_not_small(self) -> tuple[int, int]:
        """Blocks this greenlet while the hub relays small reads. Returns (n, sent) for the read
        that was not small: its `n` bytes are in the scratch, `sent` of them written already."""
        self._waiter = Waiter()
        self._readable.start(self._on_readable)
        try:
            return self._waiter.get()
        finally:
            self._readable.stop()

    def close(self) -> None:
        self._readable.close()

    def _on_readable(self) -> None:        # runs in the hub: must not block
        try:
            n = os.readv(self._src_fd, [_scratch])
            sent = self._write(n)
        except BlockingIOError:             # readiness was spurious: wait on
            return
        except OSError as exc:
            self._readable.stop()
            self._waiter.throw(exc)
            return
        if n and sent == n and n < LARGE_READ:
            self._activity.touch()
            self._flow.moved += n
            return
        self._readable.stop()
        self._waiter.switch((n, sent))

    def _write(self, n: int) -> int:
        if not n:
            return 0
        try:
            return os.write(self._dst_fd, _scratch_view[:n])
        except BlockingIOError:
            return 0


def _plain_direction(src: socket.socket, dst: socket.socket, activity: _Activity, flow: _Flow) -> None:
    src_fd, dst_fd = src.fileno(), dst.fileno()
    small_reads = _SmallReads(src_fd, dst_fd, activity, flow)
    try:
        while True:
            n, sent = small_reads.until_not_small()
            if n == 0:
                return
            activity.touch()
            if sent < n:
                dst.sendall(_scratch[sent:n])     # a copy: the scratch is not ours while we wait
            flow.moved += n
            if n >= LARGE_READ and _splice_burst(src_fd, dst_fd, activity, flow):
                return
    finally:
        small_reads.close()


def _splice_burst(src_fd: int, dst_fd: int, activity: _Activity, flow: _Flow) -> bool:
    """socket → pipe → socket with splice(2) while reads come back large. Returns True at the
    source's end, False once a read came back small or would wait; the pipe is empty then (every
    spliced byte was passed on) and closed."""
    pipe_out, pipe_in = os.pipe()
    try:
        try:
            capacity = fcntl.fcntl(pipe_in, F_SETPIPE_SZ, BURST_PIPE_SIZE)
        except OSError:
            capacity = SCRATCH_SIZE
        while True:
            try:
                n = os.splice(src_fd, pipe_in, capacity, flags=_SPLICE_FLAGS)
            except BlockingIOError:
                return False
            if n == 0:
                return True
            activity.touch()
            left = n
            while left:
                try:
                    left -= os.splice(pipe_out, dst_fd, left, flags=_SPLICE_FLAGS)
                except BlockingIOError:
                    wait_write(dst_fd)
            flow.moved += n
            if n < LARGE_READ:
                return False
    finally:
        os.close(pipe_out)
        os.close(pipe_in)


def _copy_direction(src, dst, activity: _Activity, flow: _Flow) -> None:
    """Any socket pair (TLS, or no splice): a buffer of this direction's own, since TLS reads and
    writes may wait midway; taken only once this direction carries data."""
    if not getattr(src, "pending", lambda: 0)():   # TLS may hold decrypted bytes already
        wait_read(src.fileno())
    buf = bytearray(BUFFER_SIZE)
    view = memoryview(buf)
    while True:
        n = src.recv_into(buf)
        if n == 0:
            return
        activity.touch()
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
    (_plain_direction if use_splice else _copy_direction)(src, dst, activity, flow)
    _half_close(dst)


class _IdleWatch:
    """One timer per tunnel instead of a timeout around every read and write: when neither
    direction has moved a byte for the idle timeout it calls `on_idle`, from the hub, which must
    therefore not block (shutting the sockets down wakes whatever waits on them)."""

    def __init__(self, activity: _Activity, on_idle) -> None:
        self._activity = activity
        self._on_idle = on_idle
        self._loop = gevent.get_hub().loop
        self._timer = None
        self._arm(activity.idle_timeout)

    def _arm(self, seconds: float) -> None:
        self._timer = self._loop.timer(seconds)
        self._timer.start(self._check)

    def _check(self) -> None:
        self._timer.close()
        try:
            left = self._activity.remaining()
        except _Idle as exc:
            self._timer = None
            self._on_idle(exc)
            return
        self._arm(left)

    def cancel(self) -> None:
        if self._timer is not None:
            self._timer.close()
            self._timer = None


def _reset_on_close(sock) -> None:
    """linger 0: closing the socket sends RST instead of FIN."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    except OSError:
        pass


def _shutdown(*socks) -> None:
    for s in socks:
        shutdown_socket(s, socket.SHUT_RDWR)


def _abort(failures: _Failures, *socks) -> None:
    """End the tunnel after a failure or a TLS close, waking whatever waits on either socket.
    A reset from one peer is passed on as a reset to the other (linger 0, and no FIN first: only
    the read side is shut to wake the readers), so an ending that was not clean never looks like
    one; any other failure ends both sides with a FIN."""
    if failures and isinstance(failures[0], ConnectionResetError):
        for s in socks:
            _reset_on_close(s)
            shutdown_socket(s, socket.SHUT_RD)
    else:
        _shutdown(*socks)


def _abort_on_failure(failures: _Failures, *socks):
    """A link callback: once a direction failed or closed the tunnel, wake the other one."""
    def callback(_greenlet) -> None:
        if failures.over:
            _abort(failures, *socks)
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

    def end_idle(exc: _Idle) -> None:
        failures.record(exc)
        _shutdown(a, b)

    idle_watch = _IdleWatch(activity, end_idle)
    upward = gevent.spawn(failures.run, _direction, a, b, activity, use_splice, a_to_b_first, up)
    upward.link(_abort_on_failure(failures, a, b))
    failures.run(_direction, b, a, activity, use_splice, b_to_a_first, down)
    if failures.over:
        _abort(failures, a, b)
    upward.join()
    idle_watch.cancel()
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
