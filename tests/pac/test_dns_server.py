"""`pac.dns_server`: forwarding as RFC 5452 and RFC 7766 want it, against in-process upstreams.

Fake resolvers on loopback (gevent sockets in this process) answer with forged ids, keep silent or
set TC, so that each rule of the shell shows: only the answer with our id counts, silence moves on
to the next server, TC is asked again over TCP, and all failing is SERVFAIL. The whole listener,
with real clients, is in tests/e2e/test_dns_responder.py.
"""

from __future__ import annotations

import struct
import time

import pytest

pytest.importorskip("gevent")

import gevent  # noqa: E402
from dnslib import DNSRecord  # noqa: E402
from gevent import socket  # noqa: E402
from gevent.server import StreamServer  # noqa: E402

from appliance.observe import AccessLog, Observer  # noqa: E402
from pac import dns_server  # noqa: E402
from pac.dns_answer import DnsResponder, Forward  # noqa: E402
from pac.dns_server import DnsService, RefusalLog, read_exactly  # noqa: E402

from .test_dns_answer import make_config, query, upstream_answer  # noqa: E402


@pytest.fixture(autouse=True)
def short_timeouts(monkeypatch):
    monkeypatch.setattr(dns_server, "UPSTREAM_TIMEOUT", 0.3)


class FakeUpstream:
    """A UDP (and, if `tcp_answer` is set, TCP) resolver on one loopback port."""

    def __init__(self, udp_answers=None, tcp_answer=None) -> None:
        self.udp, listener = self._bind(tcp=tcp_answer is not None)
        self.port = self.udp.getsockname()[1]
        self.asked: list[str] = []
        self._greenlets = [gevent.spawn(self._serve_udp, udp_answers or (lambda q: []))]
        self.tcp = None
        if listener is not None:
            self.tcp = StreamServer(listener, lambda s, _: self._serve_tcp(s, tcp_answer))
            self.tcp.start()

    @staticmethod
    def _bind(tcp: bool):
        """A UDP socket, and with `tcp` a TCP listener on the same port: the TCP port is taken
        first and the UDP one beside it (a port free for UDP may be in use for TCP)."""
        for _ in range(50):
            udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            if not tcp:
                udp.bind(("127.0.0.1", 0))
                return udp, None
            listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            listener.bind(("127.0.0.1", 0))
            try:
                udp.bind(listener.getsockname())
            except OSError:
                udp.close()
                listener.close()
                continue
            listener.listen(16)
            return udp, listener
        raise AssertionError("no loopback port free for both UDP and TCP in 50 tries")

    def _serve_udp(self, answers) -> None:
        while True:
            data, peer = self.udp.recvfrom(65535)
            self.asked.append("udp")
            for datagram in answers(data):
                self.udp.sendto(datagram, peer)

    def _serve_tcp(self, sock, answer) -> None:
        (length,) = struct.unpack("!H", read_exactly(sock, 2, time.monotonic() + 2))
        self.asked.append("tcp")
        data = answer(read_exactly(sock, length, time.monotonic() + 2))
        sock.sendall(struct.pack("!H", len(data)) + data)

    def close(self) -> None:
        gevent.killall(self._greenlets)
        self.udp.close()
        if self.tcp is not None:
            self.tcp.stop()


def forward_for(*upstreams: FakeUpstream, edns: int | None = None) -> tuple[DnsService, Forward]:
    config = make_config(forward=[f"127.0.0.1:{u.port}" for u in upstreams])
    service = DnsService((), lambda: config, Observer(AccessLog("-")))
    forward = service.responder().respond(query("made-up.test", edns=edns, qid=4321), "127.0.0.1", 4096)
    assert isinstance(forward, Forward)
    return service, forward


def answered(reply) -> list[str]:
    record = DNSRecord.parse(reply.data)
    assert record.header.id == 4321
    return [str(rr.rdata) for rr in record.rr]


def test_forged_ids_are_ignored_and_the_real_answer_taken():
    def forged_then_real(q):
        return [upstream_answer(q, "203.0.113.66", qid=DNSRecord.parse(q).header.id ^ 1),
                upstream_answer(q, "192.0.2.7")]
    upstream = FakeUpstream(forged_then_real)
    try:
        service, forward = forward_for(upstream)
        reply = service.forward(forward)
        assert reply.result == "forwarded" and answered(reply) == ["192.0.2.7"]
    finally:
        upstream.close()


def test_upstream_query_ids_are_random():
    seen = []

    def recording(q):
        seen.append(DNSRecord.parse(q).header.id)
        return [upstream_answer(q)]
    upstream = FakeUpstream(recording)
    try:
        service, forward = forward_for(upstream)
        for _ in range(8):
            assert service.forward(forward).result == "forwarded"
        assert len(seen) == 8 and len(set(seen)) > 1
    finally:
        upstream.close()


def test_a_silent_server_is_passed_over_for_the_next():
    silent, good = FakeUpstream(), FakeUpstream(lambda q: [upstream_answer(q, "192.0.2.8")])
    try:
        service, forward = forward_for(silent, good)
        start = time.monotonic()
        reply = service.forward(forward)
        assert answered(reply) == ["192.0.2.8"] and silent.asked == ["udp"]
        assert 0.25 < time.monotonic() - start < 2
    finally:
        silent.close()
        good.close()


def test_a_truncated_answer_is_asked_again_over_tcp():
    many = [f"192.0.2.{i}" for i in range(1, 101)]
    upstream = FakeUpstream(lambda q: [upstream_answer(q, tc=1)], lambda q: upstream_answer(q, *many))
    try:
        service, forward = forward_for(upstream, edns=4096)
        reply = service.forward(forward)
        assert upstream.asked == ["udp", "tcp"]
        assert reply.result == "forwarded" and len(answered(reply)) == 100
    finally:
        upstream.close()


def test_servfail_when_every_server_fails():
    silent, refusing = FakeUpstream(), FakeUpstream(lambda q: [upstream_answer(q, rcode=5)])
    try:
        service, forward = forward_for(silent, refusing)
        reply = service.forward(forward)
        assert reply.result == "servfail" and DNSRecord.parse(reply.data).header.rcode == 2
        assert silent.asked == refusing.asked == ["udp"]
    finally:
        silent.close()
        refusing.close()


def test_the_responder_is_rebuilt_only_when_the_config_changes():
    configs = [make_config()]
    service = DnsService((), lambda: configs[-1], Observer(AccessLog("-")))
    first = service.responder()
    assert service.responder() is first and isinstance(first, DnsResponder)
    configs.append(make_config(answer=("192.0.2.1",)))
    assert service.responder() is not first


def test_read_exactly_has_a_deadline_and_sees_the_peer_close():
    a, b = socket.socketpair()
    try:
        b.sendall(b"\x00")
        with pytest.raises(socket.timeout):
            read_exactly(a, 2, time.monotonic() + 0.2)
        b.close()
        assert read_exactly(a, 2, time.monotonic() + 1) is None
    finally:
        a.close()


def test_refusals_are_logged_once_a_minute_per_client_and_ten_at_most():
    log = RefusalLog(interval=60, most=10)
    assert log.refused("192.0.2.1", now=0) and not log.refused("192.0.2.1", now=30)
    assert sum(log.refused(f"198.51.100.{i}", now=31) for i in range(50)) == 9
    assert log.refused("192.0.2.1", now=61)
