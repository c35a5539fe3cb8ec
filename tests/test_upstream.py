"""upstream: /etc/hosts-style lookups, configured nameservers (a real dnslib server), connect
errors by kind, and the bounded keep-alive pool."""

from __future__ import annotations

import os

import gevent
import pytest
from dnslib import RR
from dnslib.server import BaseResolver, DNSServer
from gevent import socket

from appliance.config import Address, UpstreamSection
from appliance.errors import UpstreamError
from appliance.upstream import HostsFile, OriginPool, Resolver, connect


def _listener(backlog: int = 16):
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(backlog)
    return sock, sock.getsockname()[1]


def _free_port() -> int:
    sock, port = _listener()
    sock.close()
    return port


def test_hosts_file_is_read_first_and_reread_on_change(tmp_path):
    hosts = tmp_path / "hosts"
    hosts.write_text("127.0.0.1 localhost\n127.0.0.2 origin.test alias.test # comment\n")
    resolver = Resolver(hosts=HostsFile(str(hosts)))
    assert resolver.resolve("origin.test") == ["127.0.0.2"]
    assert resolver.resolve("ALIAS.test") == ["127.0.0.2"]
    hosts.write_text("127.0.0.3 origin.test\n")
    os.utime(hosts, ns=(1, 1))                 # a different mtime, as an edit gives
    assert resolver.resolve("origin.test") == ["127.0.0.3"]


def test_ip_literals_pass_through():
    assert Resolver().resolve("::1") == ["::1"]
    assert Resolver().resolve("127.0.0.1") == ["127.0.0.1"]


class _Zone(BaseResolver):
    def resolve(self, request, handler):
        reply = request.reply()
        name = str(request.q.qname).rstrip(".")
        if name == "both.test":
            reply.add_answer(*RR.fromZone("both.test. 60 A 127.0.0.5\nboth.test. 60 AAAA ::1"))
        elif name != "empty.test":
            reply.header.rcode = 3                # NXDOMAIN
        return reply


@pytest.fixture
def dns_server():
    port = _free_port()
    server = DNSServer(_Zone(), port=port, address="127.0.0.1")
    server.start_thread()
    try:
        yield Address("127.0.0.1", port)
    finally:
        server.stop()


def test_configured_nameserver_answers(tmp_path, dns_server):
    resolver = Resolver((dns_server,), timeout=2, hosts=HostsFile(str(tmp_path / "none")))
    assert resolver.resolve("both.test") == ["127.0.0.5", "::1"]
    with pytest.raises(UpstreamError) as err:
        resolver.resolve("missing.test")
    assert err.value.kind == "dns" and "NXDOMAIN" in str(err.value)
    with pytest.raises(UpstreamError) as err:
        resolver.resolve("empty.test")
    assert err.value.kind == "dns"


def test_silent_nameserver_times_out(tmp_path):
    silent = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    silent.bind(("127.0.0.1", 0))
    resolver = Resolver((Address("127.0.0.1", silent.getsockname()[1]),), timeout=0.3,
                        hosts=HostsFile(str(tmp_path / "none")))
    with pytest.raises(UpstreamError) as err:
        resolver.resolve("any.test")
    assert err.value.kind == "dns"
    silent.close()


def test_connect_refused_is_a_connect_error():
    with pytest.raises(UpstreamError) as err:
        connect(Resolver(), "127.0.0.1", _free_port(), 5)
    assert err.value.kind == "connect"


def test_connect_dials_the_admitted_addresses_and_never_asks_dns_again(tmp_path):
    """Policy checked these addresses for the name: connect dials them, whatever DNS would say
    now (a rebinding nameserver answering a forbidden address the second time is never asked)."""
    class NoResolver(Resolver):
        def resolve(self, host):
            raise AssertionError(f"{host} resolved again")
    sock, port = _listener()
    try:
        origin = connect(NoResolver(hosts=HostsFile(str(tmp_path / "none"))), "rebind.test", port, 5,
                         ("127.0.0.1",))
        assert origin.getpeername() == ("127.0.0.1", port)
        origin.close()
    finally:
        sock.close()


def test_connect_timeout_is_a_timeout_error():
    sock, port = _listener(backlog=0)          # never accepts: once its queue is full, SYNs wait
    held = []
    try:
        for _ in range(8):
            c = socket.socket()
            c.setblocking(False)
            try:
                c.connect(("127.0.0.1", port))
            except BlockingIOError:
                pass
            held.append(c)
        with pytest.raises(UpstreamError) as err:
            connect(Resolver(), "127.0.0.1", port, 0.5)
        assert err.value.kind == "timeout"
    finally:
        for c in held:
            c.close()
        sock.close()


def _settings(**kw) -> UpstreamSection:
    base = dict(ca_file=None, nameservers=(), connect_timeout=5.0, response_timeout=5.0,
                pool_max_idle_per_host=2, pool_max_idle=3, pool_idle_timeout=30.0)
    base.update(kw)
    return UpstreamSection(**base)


class _Origin:
    def __init__(self):
        self.sock, self.port = _listener()
        self.accepted = []
        self.task = gevent.spawn(self._accept)

    def _accept(self):
        while True:
            conn, _ = self.sock.accept()
            self.accepted.append(conn)

    def close(self):
        self.task.kill()
        for c in self.accepted:
            c.close()
        self.sock.close()


def test_pool_reuses_idle_connections_newest_first():
    origin = _Origin()
    pool = OriginPool(_settings(), Resolver())
    try:
        first = pool.get("127.0.0.1", origin.port)
        assert not first.reused
        pool.put(first)
        again = pool.get("127.0.0.1", origin.port)
        assert again is first and again.reused
    finally:
        pool.close()
        origin.close()


def test_pool_is_bounded_per_host_and_in_all():
    origins = [_Origin(), _Origin()]
    pool = OriginPool(_settings(), Resolver())
    try:
        conns = [pool.get("127.0.0.1", o.port) for o in origins for _ in range(3)]
        for c in conns:
            pool.put(c)
        assert pool.idle_count == 3                  # 2 per host, 3 in all
    finally:
        pool.close()
        for o in origins:
            o.close()


def test_pool_drops_closed_dirty_and_expired_connections():
    origin = _Origin()
    pool = OriginPool(_settings(pool_idle_timeout=0.2), Resolver())
    try:
        conn = pool.get("127.0.0.1", origin.port)
        pool.put(conn)
        gevent.sleep(0.05)
        origin.accepted[0].close()                   # the origin closes the idle connection
        gevent.sleep(0.05)
        assert pool.get("127.0.0.1", origin.port) is not conn

        conn = pool.get("127.0.0.1", origin.port)
        conn.buffered = b"stray"                     # bytes past the response: never reused
        pool.put(conn)
        assert pool.idle_count == 0

        conn = pool.get("127.0.0.1", origin.port)
        pool.put(conn)
        gevent.sleep(0.3)                            # past pool_idle_timeout
        assert pool.get("127.0.0.1", origin.port) is not conn
    finally:
        pool.close()
        origin.close()
