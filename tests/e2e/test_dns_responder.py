"""The `dns` listener of the real appliance, driven by the real `dig` (dnsutils) on loopback.

WPAD discovery asks `wpad.<domain>`: answered over UDP and TCP (RFC 7766), truncated to what the
client takes (RFC 1035 §4.2.1, RFC 6891) so that dig retries over TCP; other names go to the
`[dns] forward` resolvers (here a dnslib server the test starts on loopback, never the machine's
resolver) or are REFUSED; clients outside the rules' sources are refused and never forwarded
(RFC 5358); floods of garbage and stalled TCP clients leave the listener serving.
"""

from __future__ import annotations

import contextlib
import os
import random
import re
import signal
import socket
import struct
import subprocess
import time

from dnslib import QTYPE, RCODE, RR, A, DNSHeader, DNSQuestion, DNSRecord
from dnslib.server import BaseResolver, DNSHandler, DNSLogger, DNSServer

from .conftest import child_env, free_port, require_tool

ANSWERS = '[dns]\ndomain = "localdomain"\nanswer = ["127.0.0.1", "::1"]\n'
MANY = "[dns]\nanswer = [" + ", ".join(f'"127.0.1.{i}"' for i in range(1, 61)) + "]\n"
ONLY_127_0_0_1 = '[[rule]]\nname = "one host"\naction = "allow"\nsrc = ["127.0.0.1/32"]\n'


def dig(port: int, *args: str, server: str = "127.0.0.1", timeout: float = 30) -> str:
    exe = require_tool("dig")
    done = subprocess.run([exe, f"@{server}", "-p", str(port), "+time=2", "+tries=1", *args],
                          capture_output=True, text=True, timeout=timeout, env=child_env(),
                          stdin=subprocess.DEVNULL)
    return done.stdout


def short(port: int, *args: str, **kw) -> list[str]:
    return dig(port, "+short", *args, **kw).split()


def status(output: str) -> str:
    return re.search(r"status: (\w+)", output)[1]


def flags(output: str) -> set[str]:
    return set(re.search(r";; flags: ([a-z ]*);", output)[1].split())


def answer_count(output: str) -> int:
    return int(re.search(r"ANSWER: (\d+)", output)[1])


def dns_count(app, result: str) -> float:
    text = app.admin_get("/metrics")[1]
    return float(re.search(rf'^appliance_dns_queries_total\{{result="{result}"\}} (\S+)$', text, re.M)[1])


def dns_appliance(make_appliance, extra: str = ANSWERS, **kw):
    port = free_port()
    app = make_appliance(extra=extra, more_listeners=f'dns = ["127.0.0.1:{port}", "[::1]:{port}"]', **kw)
    return app, port


# -- a resolver of the test's own, on loopback -----------------------------------------------------


class MadeUpNames(BaseResolver):
    """Knows `made-up.test` and `big.test` (100 addresses); records every query it is asked."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, str]] = []

    def resolve(self, request, handler):
        name = str(request.q.qname).lower()
        self.seen.append((name, handler.protocol))
        reply = request.reply()
        count = {"made-up.test.": 1, "big.test.": 100}.get(name)
        if count is None:
            reply.header.rcode = RCODE.NXDOMAIN
        for i in range(count or 0):
            reply.add_answer(RR(request.q.qname, QTYPE.A, ttl=30, rdata=A(f"192.0.2.{i + 7}")))
        return reply


class TruncatingHandler(DNSHandler):
    udplen = 512     # dnslib does not truncate by default; this makes big.test come with TC


@contextlib.contextmanager
def upstream_resolver():
    """UDP and TCP on one free loopback port; yields (port, resolver), stopped at the end."""
    port, resolver = free_port(), MadeUpNames()
    servers = [DNSServer(resolver, address="127.0.0.1", port=port, tcp=tcp, handler=TruncatingHandler,
                         logger=DNSLogger(logf=lambda *_: None)) for tcp in (False, True)]
    for server in servers:
        server.start_thread()
    try:
        yield port, resolver
    finally:
        for server in servers:
            server.stop()
            server.server.server_close()


def raw_udp(port: int, packet: bytes, source: str = "127.0.0.1", timeout: float = 2.0) -> bytes | None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind((source, 0))
        s.settimeout(timeout)
        s.sendto(packet, ("127.0.0.1", port))
        try:
            return s.recv(65535)
        except socket.timeout:
            return None


def closed_within(sock: socket.socket, limit: float) -> float:
    """Seconds until the peer closes `sock` (recv returns b"" or the connection resets)."""
    start = time.monotonic()
    sock.settimeout(limit)
    try:
        while sock.recv(4096):
            pass
    except ConnectionResetError:
        pass
    return time.monotonic() - start


# -- our names ----------------------------------------------------------------------------------


def test_wpad_and_the_appliance_name_over_udp_and_tcp(make_appliance):
    app, port = dns_appliance(make_appliance)
    for transport in ("+notcp", "+tcp"):
        for server in ("127.0.0.1", "::1"):
            assert short(port, transport, "wpad.localdomain", "A", server=server) == ["127.0.0.1"]
            assert short(port, transport, "WPAD.LocalDomain.", "AAAA", server=server) == ["::1"]
            assert short(port, transport, "proxy.test", server=server) == ["127.0.0.1"]
    output = dig(port, "+tcp", "wpad.localdomain")
    assert status(output) == "NOERROR" and "aa" in flags(output) and "(TCP)" in output
    assert dns_count(app, "answered") >= 13


def test_several_queries_on_one_tcp_connection_are_answered_in_order(make_appliance):
    _, port = dns_appliance(make_appliance)
    queries = [DNSRecord(DNSHeader(id=100 + i), q=DNSQuestion(name)).pack()
               for i, name in enumerate(["wpad.localdomain", "proxy.test", "wpad.localdomain"])]
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(b"".join(struct.pack("!H", len(q)) + q for q in queries))
        stream = s.makefile("rb")
        ids = []
        for _ in queries:
            (length,) = struct.unpack("!H", stream.read(2))
            ids.append(DNSRecord.parse(stream.read(length)).header.id)
    assert ids == [100, 101, 102]


def test_answers_follow_a_config_reload(make_appliance):
    app, port = dns_appliance(make_appliance)
    assert short(port, "wpad.localdomain") == ["127.0.0.1"]
    app.config_path.write_text(app.config_path.read_text().replace('"127.0.0.1", "::1"]', '"127.0.0.9"]'))
    os.kill(app.proc.pid, signal.SIGHUP)
    deadline = time.monotonic() + 10
    while short(port, "wpad.localdomain") != ["127.0.0.9"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert short(port, "wpad.localdomain") == ["127.0.0.9"]
    assert short(port, "wpad.localdomain", "AAAA") == []


# -- truncation ---------------------------------------------------------------------------------


def test_udp_answers_are_truncated_to_the_clients_size_and_dig_retries_over_tcp(make_appliance):
    app, port = dns_appliance(make_appliance, extra=MANY)
    plain = dig(port, "+noedns", "+ignore", "wpad.localdomain")       # 512 bytes without EDNS
    assert "tc" in flags(plain) and answer_count(plain) == 0
    assert re.search(r"MSG SIZE\s+rcvd: (\d+)", plain) and int(re.search(r"rcvd: (\d+)", plain)[1]) <= 512
    small = dig(port, "+bufsize=600", "+ignore", "wpad.localdomain")
    assert "tc" in flags(small) and int(re.search(r"rcvd: (\d+)", small)[1]) <= 600
    retried = dig(port, "+noedns", "wpad.localdomain")                # dig goes on over TCP
    assert answer_count(retried) == 60 and "tc" not in flags(retried) and "(TCP)" in retried
    large = dig(port, "+bufsize=4096", "wpad.localdomain")            # fits: no truncation
    assert answer_count(large) == 60 and "(UDP)" in large
    assert dns_count(app, "truncated") >= 3


# -- other names ----------------------------------------------------------------------------------


def test_other_names_are_refused_without_forwarders(make_appliance):
    app, port = dns_appliance(make_appliance)
    for transport in ("+notcp", "+tcp"):
        assert status(dig(port, transport, "example.com")) == "REFUSED"
    assert dns_count(app, "refused") >= 2


def test_other_names_are_forwarded_and_large_answers_fetched_over_tcp(make_appliance):
    with upstream_resolver() as (upstream, resolver):
        app, port = dns_appliance(make_appliance, extra=ANSWERS + f'forward = ["127.0.0.1:{upstream}"]\n')
        for transport in ("+notcp", "+tcp"):
            assert short(port, transport, "made-up.test") == ["192.0.2.7"]
        assert status(dig(port, "nothing-here.test")) == "NXDOMAIN"
        assert short(port, "wpad.localdomain") == ["127.0.0.1"]            # ours are still ours
        big = dig(port, "big.test")               # >1232 bytes: TC to dig, which retries over TCP
        assert answer_count(big) == 100
        assert ("big.test.", "tcp") in resolver.seen                      # TC from upstream: asked again
        assert all(name != "wpad.localdomain." for name, _ in resolver.seen)
        assert dns_count(app, "forwarded") >= 4


def test_forward_servers_are_tried_in_turn_and_servfail_when_all_fail(make_appliance):
    with upstream_resolver() as (upstream, _), \
            socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as silent:
        silent.bind(("127.0.0.1", 0))                                     # takes queries, never answers
        silent.settimeout(5)
        silent_port = silent.getsockname()[1]
        dead_port = free_port()                                           # nothing there: ICMP refused
        forward = f'forward = ["127.0.0.1:{silent_port}", "127.0.0.1:{upstream}"]\n'
        app, port = dns_appliance(make_appliance, extra=ANSWERS + forward)
        start = time.monotonic()
        assert short(port, "+time=8", "made-up.test") == ["192.0.2.7"]
        assert 1.5 < time.monotonic() - start < 7                         # after the first one's 2 s
        assert silent.recv(512)                                           # the silent one was asked
    app, port = dns_appliance(make_appliance, extra=ANSWERS + f'forward = ["127.0.0.1:{dead_port}"]\n')
    assert status(dig(port, "+time=8", "made-up.test")) == "SERVFAIL"
    assert dns_count(app, "servfail") >= 1


def test_clients_outside_the_rules_are_refused_and_never_forwarded(make_appliance):
    with upstream_resolver() as (upstream, resolver):
        extra = ANSWERS + f'forward = ["127.0.0.1:{upstream}"]\n'
        app, port = dns_appliance(make_appliance, extra=extra, rules=ONLY_127_0_0_1)
        for name in ("made-up.test", "wpad.localdomain"):
            for transport in ("+notcp", "+tcp"):
                output = dig(port, transport, "-b", "127.0.0.2", name)
                assert status(output) == "REFUSED" and answer_count(output) == 0
            packet = DNSRecord(DNSHeader(id=7), q=DNSQuestion(name, QTYPE.ANY)).pack()
            reply = raw_udp(port, packet, source="127.0.0.2")
            assert reply is not None and len(reply) <= len(packet)
        assert resolver.seen == []
        assert short(port, "made-up.test") == ["192.0.2.7"]             # 127.0.0.1 is served
        assert resolver.seen == [("made-up.test.", "udp")]
        assert dns_count(app, "refused") >= 6


# -- hostile clients ------------------------------------------------------------------------------


def malformed_packets(count: int, seed: int = 5353) -> list[bytes]:
    rng = random.Random(seed)
    real = bytes(DNSRecord(DNSHeader(id=1), q=DNSQuestion("wpad.localdomain")).pack())
    packets = []
    for i in range(count):
        kind = i % 4
        if kind == 0:
            packets.append(rng.randbytes(rng.randrange(0, 300)))
        elif kind == 1:       # a real query with bytes flipped
            data = bytearray(real)
            for _ in range(rng.randrange(1, 6)):
                data[rng.randrange(len(data))] = rng.randrange(256)
            packets.append(bytes(data))
        elif kind == 2:       # cut short
            packets.append(real[: rng.randrange(len(real))])
        else:                 # a response (QR set), or a header claiming sections that are not there
            packets.append(real[:2] + bytes([0x80 | real[2]]) + real[3:] if i % 8 == 3
                           else real[:4] + b"\xff\xff\xff\xff" + real[8:])
    return packets


def test_floods_of_malformed_packets_leave_the_listener_answering(make_appliance):
    app, port = dns_appliance(make_appliance)
    before = dns_count(app, "malformed")
    packets = malformed_packets(3000)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for i, packet in enumerate(packets):
            s.sendto(packet, ("127.0.0.1", port))
            if i % 100 == 99:
                time.sleep(0.02)     # loopback would drop what the kernel buffer cannot hold
    broken = [p for i, p in enumerate(packets[:40]) if i % 4 in (2, 3)]   # cut short, or a response
    for packet in broken:            # over TCP too: each malformed message closes its connection
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            s.sendall(struct.pack("!H", max(len(packet), 1)) + packet.ljust(1, b"\0"))
            assert closed_within(s, 5) < 5
    assert short(port, "wpad.localdomain") == ["127.0.0.1"]
    assert short(port, "+tcp", "wpad.localdomain") == ["127.0.0.1"]
    assert dns_count(app, "malformed") - before >= 300     # most of 2700; UDP may lose some
    assert app.proc.popen.poll() is None


def test_tcp_clients_that_stall_are_closed_after_the_idle_timeout(make_appliance):
    app, port = dns_appliance(make_appliance, extra="[limits]\nclient_idle_timeout = 1.0\n" + ANSWERS)
    query = DNSRecord(DNSHeader(id=9), q=DNSQuestion("wpad.localdomain")).pack()
    framed = struct.pack("!H", len(query)) + query
    for sent in (b"", framed[:1], framed[:-3]):      # nothing, half a length, most of a query
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            s.sendall(sent)
            assert 0.5 < closed_within(s, 10) < 5
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:   # one byte at a time
        start = time.monotonic()
        with contextlib.suppress(OSError):
            for byte in framed:
                s.sendall(bytes([byte]))
                time.sleep(0.3)
        closed_within(s, 10)
        assert time.monotonic() - start < 5          # the deadline is per query, not per byte
    assert short(port, "+tcp", "wpad.localdomain") == ["127.0.0.1"]
