"""relay.pipe: both movers (for plain sockets, small reads relayed from the hub and bulk spliced
through a pipe; the portable buffer copy), half-close in each direction, byte counts, idle
timeout and failure of one side."""

from __future__ import annotations

import hashlib
import os
import random

import gevent
import pytest
from gevent import socket

from appliance import relay

MOVERS = ["splice", "copy"] if relay.SPLICE_AVAILABLE else ["copy"]


def _pair():
    """Two connected TCP socket pairs on loopback: (client, proxy_side_a), (proxy_side_b, server)."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(4)
    port = listener.getsockname()[1]
    c = socket.create_connection(("127.0.0.1", port))
    a, _ = listener.accept()
    b = socket.create_connection(("127.0.0.1", port))
    s, _ = listener.accept()
    listener.close()
    return c, a, b, s


def _read_all(sock) -> bytes:
    chunks = []
    while True:
        data = sock.recv(1 << 16)
        if not data:
            return b"".join(chunks)
        chunks.append(data)


@pytest.mark.parametrize("mover", MOVERS)
def test_bytes_both_ways_with_half_close(mover):
    c, a, b, s = _pair()
    up = os.urandom(3 * 1024 * 1024 + 17)
    down = os.urandom(1024 * 1024 + 5)
    tunnel = gevent.spawn(relay.pipe, a, b, 30, use_splice=(mover == "splice"))

    def client():
        c.sendall(up)
        c.shutdown(socket.SHUT_WR)          # client done sending; must still receive
        return _read_all(c)

    def server():
        got = _read_all(s)                  # sees the client's FIN after all its bytes
        s.sendall(down)
        s.shutdown(socket.SHUT_WR)
        return got

    gc, gs = gevent.spawn(client), gevent.spawn(server)
    gevent.joinall([gc, gs, tunnel], timeout=30, raise_error=True)
    assert hashlib.sha256(gs.value).digest() == hashlib.sha256(up).digest()
    assert gc.value == down
    result = tunnel.value
    assert (result.a_to_b, result.b_to_a, result.error) == (len(up), len(down), None)
    for sock in (c, a, b, s):
        sock.close()


@pytest.mark.parametrize("mover", MOVERS)
def test_first_bytes_are_sent_before_relaying(mover):
    c, a, b, s = _pair()
    tunnel = gevent.spawn(relay.pipe, a, b, 30, a_to_b_first=b"early", b_to_a_first=b"hello",
                          use_splice=(mover == "splice"))
    c.shutdown(socket.SHUT_WR)
    s.shutdown(socket.SHUT_WR)
    assert _read_all(s) == b"early" and _read_all(c) == b"hello"
    assert tunnel.get(timeout=10).a_to_b == 5


@pytest.mark.parametrize("mover", MOVERS)
def test_idle_tunnel_is_closed(mover):
    c, a, b, s = _pair()
    result = relay.pipe(a, b, 0.3, use_splice=(mover == "splice"))
    assert result.error == "idle timeout"
    assert c.recv(10) == b"" and s.recv(10) == b""


@pytest.mark.parametrize("mover", MOVERS)
def test_busy_direction_keeps_a_quiet_one_alive(mover):
    """Only shared idleness ends a tunnel: a long download with a silent uploader survives."""
    c, a, b, s = _pair()
    tunnel = gevent.spawn(relay.pipe, a, b, 0.3, use_splice=(mover == "splice"))
    for _ in range(8):                       # 8 × 0.1 s of traffic one way only: 0.8 s > 0.3 s
        s.sendall(b"x" * 1000)
        gevent.sleep(0.1)
    s.shutdown(socket.SHUT_WR)
    c.shutdown(socket.SHUT_WR)
    assert len(_read_all(c)) == 8000
    assert tunnel.get(timeout=10).error is None


@pytest.mark.parametrize("mover", MOVERS)
def test_reset_on_one_side_ends_both_and_is_passed_on_as_a_reset(mover):
    """A reset is not a clean end: the other peer gets a reset too, never a FIN first."""
    c, a, b, s = _pair()
    c.settimeout(10)
    tunnel = gevent.spawn(relay.pipe, a, b, 30, use_splice=(mover == "splice"))
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    s.close()                                # RST toward the relay
    result = tunnel.get(timeout=10)
    assert result.a_to_b == 0 and "ECONNRESET" in (result.error or "")
    a.close()                                # as every caller does once the relay returns
    with pytest.raises(ConnectionResetError):
        c.recv(10)


@pytest.mark.parametrize("mover", MOVERS)
def test_mixed_sizes_under_backpressure_on_two_tunnels(mover):
    """Small and large writes interleaved, with receivers that start late so writes on the relay
    fill up and wait: the shared scratch of small reads, the switch to splicing and back, and the
    copy taken before waiting must keep each tunnel's bytes whole and in order."""
    rng = random.Random(9)
    pairs = [_pair() for _ in range(2)]
    for _c, _a, b, s in pairs:              # small buffers toward the server: it backs up soon
        b.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 128 * 1024)
    tunnels = [gevent.spawn(relay.pipe, a, b, 30, use_splice=(mover == "splice"))
               for _c, a, b, _s in pairs]
    payloads = [b"".join(os.urandom(rng.choice([1, 100, 100, 1500, relay.LARGE_READ, 200_000]))
                         for _ in range(100)) for _ in pairs]

    def client(c, payload):
        view = memoryview(payload)
        while view:
            step = rng.choice([7, 128, 128, 4096, 70_000])
            c.sendall(view[:step])
            view = view[step:]
            gevent.sleep(0)                 # one write at a time reaches the relay
        c.shutdown(socket.SHUT_WR)

    def server(s):
        gevent.sleep(0.3)                   # let the relay's writes back up first
        return _read_all(s)

    senders = [gevent.spawn(client, c, payload) for (c, _a, _b, _s), payload in zip(pairs, payloads)]
    receivers = [gevent.spawn(server, s) for _c, _a, _b, s in pairs]
    gevent.joinall(senders + receivers, timeout=30, raise_error=True)
    for (c, a, b, s), payload, receiver, tunnel in zip(pairs, payloads, receivers, tunnels):
        assert hashlib.sha256(receiver.value).digest() == hashlib.sha256(payload).digest()
        s.shutdown(socket.SHUT_WR)
        assert tunnel.get(timeout=10).a_to_b == len(payload)
        for sock in (c, a, b, s):
            sock.close()


@pytest.mark.parametrize("mover", MOVERS)
def test_echo_of_small_messages(mover):
    """Request/response traffic (a WebSocket echo, say): each small message arrives whole."""
    c, a, b, s = _pair()
    tunnel = gevent.spawn(relay.pipe, a, b, 30, use_splice=(mover == "splice"))

    def echo():
        while data := s.recv(65536):
            s.sendall(data)
        s.shutdown(socket.SHUT_WR)

    echoer = gevent.spawn(echo)
    for i in range(200):
        message = b"%d:" % i + b"m" * (i % 130)
        c.sendall(message)
        got = b""
        while len(got) < len(message):
            got += c.recv(65536)
        assert got == message
    c.shutdown(socket.SHUT_WR)
    assert _read_all(c) == b""
    echoer.get(timeout=10)
    result = tunnel.get(timeout=10)
    assert result.a_to_b == result.b_to_a and result.error is None
    for sock in (c, a, b, s):
        sock.close()


def test_splice_is_chosen_for_plain_sockets_only():
    c, a, b, s = _pair()
    assert relay.can_splice(a, b) == relay.SPLICE_AVAILABLE
    for sock in (c, a, b, s):
        sock.close()


def _pipes() -> set[str]:
    """The kernel pipes this process holds ("pipe:[inode]"), whoever opened them."""
    found = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:                  # closed meanwhile (the listing's own fd, say)
            continue
        if target.startswith("pipe:"):
            found.add(target)
    return found


@pytest.mark.skipif(not relay.SPLICE_AVAILABLE, reason="os.splice exists only on Linux")
def test_an_idle_spliced_tunnel_holds_no_pipes():
    """The kernel pipes exist only while bulk flows: an idle tunnel costs its two sockets.
    Pipes are told apart by inode, so descriptors other code closes meanwhile do not count."""
    c, a, b, s = _pair()
    before = _pipes()
    tunnel = gevent.spawn(relay.pipe, a, b, 30, use_splice=True)
    gevent.sleep(0.05)
    assert not _pipes() - before                                   # none before any data
    c.sendall(b"x" * 100000)
    got = b""
    while len(got) < 100000:
        got += s.recv(65536)
    gevent.sleep(0.1)
    assert not _pipes() - before
    s.sendall(b"back")                                             # and data flows again
    assert c.recv(4) == b"back"
    for sock in (c, s):
        sock.close()
    tunnel.join(5)
    for sock in (a, b):
        sock.close()
