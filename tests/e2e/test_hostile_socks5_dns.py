"""Hostile SOCKS5 and DNS clients against the real appliance (issue 10, group 8).

SOCKS5 (RFC 1928, RFC 1929), byte by byte on the real listener: every proper prefix of a valid
greeting, request and sub-negotiation, then the client's FIN; every single-byte change of a valid
greeting and CONNECT request (every position, every other value); the RFC 1929 edge cases. Each
connection comes from its own loopback source address (127.a.b.c), so its log line and its
access-log record are told apart from every other; each must get exactly the bytes RFC 1928 says
(a reply code, or the method-selection/failure answer, or nothing) and then a clean close, a log
line saying why, one access-log record, and no traceback. The rules admit only the test origin,
so no changed byte ever makes the appliance dial anything but loopback.

DNS: single malformed messages get exactly a clean drop or FORMERR/NOTIMP/BADVERS (header only,
never larger than the query), each logged; clients outside the rules get REFUSED without
recursion (RA clear, nothing forwarded) also for ANY over TCP; TCP clients that never read, or
more stalled TCP clients than the listener serves at once, leave it answering.
"""

from __future__ import annotations

import contextlib
import ipaddress
import re
import socket
import struct
import time

import pytest
from dnslib import EDNS0, OPCODE, QTYPE, DNSHeader, DNSQuestion, DNSRecord
from dnslib.server import DNSLogger, DNSServer

from appliance.protocols.proxy_auth import hash_password

from .conftest import Appliance, free_port
from .test_dns_responder import ANSWERS, MANY, ONLY_127_0_0_1, dns_appliance, short, upstream_resolver
from .test_socks5 import PASSWORD, ZoneResolver, connect_request, read_until_closed, start_socks_app

GREETING = b"\x05\x01\x00"
USERPASS = b"\x05\x01\x02"
CREDENTIALS = b"\x01\x05alice" + bytes([len(PASSWORD)]) + PASSWORD.encode()
HANDSHAKE_CLOSED = "closed (client: closed during the SOCKS5 handshake)"
LINE = re.compile(r"SOCKS5 \S+ \S+ from (127\.\d+\.\d+\.\d+): (.*)$")


def refusal(code: int) -> bytes:
    """A SOCKS5 reply refusing a request: BND.ADDR 0.0.0.0:0."""
    return bytes([5, code, 0, 1]) + bytes(6)


class Sources:
    """A fresh loopback source address per connection: 127.<block>.x.y."""

    def __init__(self, block: int) -> None:
        self.block, self.count = block, 0

    def next(self) -> str:
        self.count += 1
        assert self.count < 65000
        return f"127.{self.block}.{self.count >> 8}.{self.count & 255}"


def exchange_from(source: str, port: int, data: bytes, timeout: float = 10.0) -> bytes:
    """Send `data` from `source`, then FIN; what the appliance sent until it closed."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.bind((source, 0))
        sock.connect(("127.0.0.1", port))
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
        return read_until_closed(sock, timeout)


def outcomes(app, sources: set[str], timeout: float = 30.0) -> tuple[dict[str, str], dict[str, dict]]:
    """The log line and the access-log record of each source (waiting, bounded, for all of
    them); no traceback in the appliance's output."""
    deadline = time.monotonic() + timeout
    for _ in range(int(timeout / 0.1) + 1):
        records = {r["client"]: r for r in app.records() if r["client"] in sources}
        if len(records) == len(sources) or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    output = app.proc.output()
    assert "Traceback" not in output
    lines = {}
    for line in output.splitlines():
        match = LINE.search(line)
        if match and match[1] in sources:
            lines[match[1]] = match[2]
    assert sorted(sources - records.keys()) == [], "no access-log record"
    return lines, records


def check_cases(app, cases: dict[str, tuple[bytes, bytes, str]], got: dict[str, bytes]) -> None:
    """`cases`: source → (sent, expected answer, expected log text); every one must match."""
    lines, records = outcomes(app, set(cases))
    wrong = []
    for source, (sent, answer, logged) in cases.items():
        line = lines.get(source, "")
        if got[source] != answer or logged not in line or records[source]["listener"] != "socks5":
            wrong.append((sent.hex(), got[source].hex(), line, logged))
    assert wrong == [], f"{len(wrong)} of {len(cases)} wrong, e.g. {wrong[:5]}"


# --- the appliances --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def dns_port():
    port = free_port()
    server = DNSServer(ZoneResolver(), port=port, address="127.0.0.1",
                       logger=DNSLogger(logf=lambda *_: None))
    server.start_thread()
    try:
        yield port
    finally:
        server.stop()


def origin_only(origin: str, users: str = "") -> str:
    """Only the test origin is admitted, from anywhere on loopback; everything else: default deny."""
    port = int(origin.rsplit(":", 1)[1])
    return (f'[[rule]]\nname = "origin only"\naction = "allow"\nsrc = ["127.0.0.0/8"]\n'
            f'dst = ["127.0.0.1/32"]\nports = [{port}]\n{users}\n')


@pytest.fixture(scope="module")
def socks_app(tmp_path_factory, origin, dns_port):
    app = start_socks_app(tmp_path_factory.mktemp("hostile-socks5"),
                          f'[upstream]\nnameservers = ["127.0.0.1:{dns_port}"]\n', origin_only(origin))
    try:
        yield app
    finally:
        app.stop()


@pytest.fixture(scope="module")
def auth_app(tmp_path_factory, origin, dns_port):
    directory = tmp_path_factory.mktemp("hostile-socks5-auth")
    users = directory / "users"
    users.write_text(f"alice:{hash_password(PASSWORD, b'0123456789abcdef')}\n")
    app = start_socks_app(directory, f'[auth]\nusers_file = "{users}"\n\n'
                          f'[upstream]\nnameservers = ["127.0.0.1:{dns_port}"]\n',
                          origin_only(origin, 'users = ["alice"]'))
    try:
        yield app
    finally:
        app.stop()


def origin_request(origin: str) -> bytes:
    return connect_request("127.0.0.1", int(origin.rsplit(":", 1)[1]))


def still_tunnels(app, origin: str, greeting: bytes = GREETING, credentials: bytes = b"") -> None:
    """A well-behaved client is served after all of it: the tunnel reaches the origin."""
    request = origin_request(origin) + b"GET /echo?still=1 HTTP/1.0\r\n\r\n"
    answer = exchange_from("127.0.0.1", app.socks_port, greeting + credentials + request)
    selected = greeting[:1] + greeting[2:]
    expected = selected + (b"\x01\x00" if credentials else b"") + b"\x05\x00\x00\x01"
    assert answer.startswith(expected) and b" 200 " in answer.split(b"\r\n", 1)[0], answer[:200]


# --- every prefix, then FIN --------------------------------------------------------------------

@pytest.mark.parametrize("request_kind", ["ipv4", "ipv6", "name"])
def test_every_prefix_of_a_greeting_and_request_then_close(socks_app, origin, request_kind):
    port = int(origin.rsplit(":", 1)[1])
    request = connect_request({"ipv4": "127.0.0.1", "ipv6": "::1", "name": "origin.test"}[request_kind], port)
    sources = Sources({"ipv4": 10, "ipv6": 11, "name": 12}[request_kind])
    cases, got = {}, {}
    for sent in [GREETING[:n] for n in range(len(GREETING))] + [GREETING + request[:n] for n in range(len(request))]:
        source = sources.next()
        got[source] = exchange_from(source, socks_app.socks_port, sent)
        cases[source] = (sent, b"\x05\x00" if len(sent) >= len(GREETING) else b"", HANDSHAKE_CLOSED)
    check_cases(socks_app, cases, got)
    still_tunnels(socks_app, origin)


def test_every_prefix_of_the_sub_negotiation_then_close(auth_app, origin):
    sources = Sources(13)
    cases, got = {}, {}
    for n in range(len(CREDENTIALS)):
        source, sent = sources.next(), USERPASS + CREDENTIALS[:n]
        got[source] = exchange_from(source, auth_app.socks_port, sent)
        cases[source] = (sent, b"\x05\x02", HANDSHAKE_CLOSED)
    check_cases(auth_app, cases, got)
    still_tunnels(auth_app, origin, USERPASS, CREDENTIALS)


# --- every single-byte change --------------------------------------------------------------------

def greeting_oracle(at: int, value: int) -> tuple[bytes, str]:
    """What RFC 1928 §3 makes of GREETING with byte `at` set to `value`, sent alone."""
    if at == 0:
        return b"", f"closed (protocol: not SOCKS5: version byte {value:#04x})"
    if at == 1:
        if value == 0:
            return b"\x05\xff", "closed (protocol: greeting offers no authentication method)"
        return b"", HANDSHAKE_CLOSED                     # announces more methods than sent
    return b"\x05\xff", "closed (protocol: client offers no acceptable method (needs no authentication))"


def request_oracle(at: int, value: int) -> tuple[bytes | None, str]:
    """What RFC 1928 §4-6 makes of the CONNECT to 127.0.0.1:origin with byte `at` set to
    `value`: the reply (None: a success with a bound address) and the log text."""
    if at == 0:
        return refusal(1), f"general failure (protocol: request version byte {value:#04x}, not 5)"
    if at == 1:
        if value == 2:
            return refusal(7), "command not supported (protocol: BIND is not supported)"
        if value == 3:
            return None, ""                              # UDP ASSOCIATE, ended by our FIN
        return refusal(7), f"command not supported (protocol: unknown command {value:#04x})"
    if at == 2:
        return refusal(1), f"general failure (protocol: reserved byte {value:#04x} is not zero)"
    if at == 3:
        if value in (3, 4):                              # a name of 127 bytes, or IPv6: more to come
            return b"", HANDSHAKE_CLOSED
        return refusal(8), f"address type not supported (protocol: request: unknown address type {value:#04x})"
    return refusal(2), "not allowed by ruleset (denied: "  # another address or port


def test_every_single_byte_change_of_the_greeting(socks_app, origin):
    sources = Sources(20)
    cases, got = {}, {}
    for at in range(len(GREETING)):
        for value in range(256):
            if value == GREETING[at]:
                continue
            source, sent = sources.next(), GREETING[:at] + bytes([value]) + GREETING[at + 1:]
            got[source] = exchange_from(source, socks_app.socks_port, sent)
            cases[source] = (sent, *greeting_oracle(at, value))
    assert len(cases) == 3 * 255
    check_cases(socks_app, cases, got)
    still_tunnels(socks_app, origin)


def test_every_single_byte_change_of_a_connect_request(socks_app, origin):
    request = origin_request(origin)
    sources = Sources(21)
    cases, got, associations = {}, {}, []
    for at in range(len(request)):
        for value in range(256):
            if value == request[at]:
                continue
            source, sent = sources.next(), request[:at] + bytes([value]) + request[at + 1:]
            answer = exchange_from(source, socks_app.socks_port, GREETING + sent)
            assert answer[:2] == b"\x05\x00", (sent.hex(), answer.hex())
            expected, logged = request_oracle(at, value)
            if expected is None:                         # UDP ASSOCIATE: success, a bound address
                assert answer[2:5] == b"\x05\x00\x00" and len(answer) == 12, answer.hex()
                associations.append(source)
                continue
            got[source] = answer[2:]
            cases[source] = (sent, expected, logged)
    assert len(cases) + len(associations) == len(request) * 255 and len(associations) == 1
    check_cases(socks_app, cases, got)
    _, records = outcomes(socks_app, set(associations))
    assert [(records[s]["kind"], records[s]["method"]) for s in associations] == [("udp", "UDP_ASSOCIATE")]
    still_tunnels(socks_app, origin)


# --- RFC 1929 edge cases ---------------------------------------------------------------------------

AUTH_FAILED = b"\x05\x02\x01\x01"


@pytest.mark.parametrize("block, credentials, logged", [
    (31, b"\x01\x00\x02pw", "closed (protocol: empty user name)"),
    (32, b"\x01\x05alice\x00", "closed (auth: invalid credentials for user 'alice')"),
    (33, b"\x01\xff" + b"u" * 255 + b"\x02pw", f"closed (auth: invalid credentials for user '{'u' * 255}')"),
    (34, b"\x01\x05alice\xff" + b"p" * 255, "closed (auth: invalid credentials for user 'alice')"),
    (35, b"\x01\x00\x00", "closed (protocol: empty user name)"),
], ids=["empty user", "empty password", "255-byte user", "255-byte password", "both empty"])
def test_auth_edge_cases_get_the_failure_answer_and_a_log_line(auth_app, block, credentials, logged):
    source = Sources(block).next()
    got = {source: exchange_from(source, auth_app.socks_port, USERPASS + credentials)}
    check_cases(auth_app, {source: (credentials, AUTH_FAILED, logged)}, got)
    if "invalid credentials" in logged:
        assert outcomes(auth_app, {source})[1][source]["status"] == 407


def test_every_sub_negotiation_version_but_1_gets_the_failure_answer(auth_app, origin):
    sources = Sources(40)
    cases, got = {}, {}
    for version in range(256):
        if version == 1:
            continue
        source, sent = sources.next(), bytes([version]) + CREDENTIALS[1:]
        got[source] = exchange_from(source, auth_app.socks_port, USERPASS + sent)
        cases[source] = (sent, AUTH_FAILED,
                         f"closed (protocol: username/password sub-negotiation version {version:#04x}, not 1)")
    check_cases(auth_app, cases, got)
    still_tunnels(auth_app, origin, USERPASS, CREDENTIALS)


def test_a_255_byte_user_with_the_request_behind_it_is_read_whole(auth_app, origin):
    """The longest sub-negotiation (513 bytes) and a request in one write: no "too long"."""
    credentials = b"\x01\xff" + b"u" * 255 + b"\xff" + b"p" * 255
    source = Sources(41).next()
    got = {source: exchange_from(source, auth_app.socks_port, USERPASS + credentials + origin_request(origin))}
    check_cases(auth_app, {source: (credentials, AUTH_FAILED, "closed (auth: invalid credentials for user 'uuu")}, got)


# --- DNS: malformed messages, one by one ------------------------------------------------------------

def query(name: str = "wpad.localdomain", qtype: str = "A", qid: int = 77, **header) -> DNSRecord:
    return DNSRecord(DNSHeader(id=qid, **header), q=DNSQuestion(name, getattr(QTYPE, qtype)))


def with_opts(record: DNSRecord, versions: list[int]) -> bytes:
    for version in versions:
        record.add_ar(EDNS0(udp_len=1232, version=version))
    return bytes(record.pack())


REAL = bytes(query().pack())
MALFORMED = {     # name: (packet, rcode or None for a silent drop, log text)
    "no question": (REAL[:4] + b"\x00\x00" + REAL[6:12], 1, "malformed for {}: 0 questions"),
    "two questions": (bytes(DNSRecord(DNSHeader(id=77), questions=[
        DNSQuestion("wpad.localdomain"), DNSQuestion("proxy.test")]).pack()), 1, "malformed for {}: 2 questions"),
    "opcode STATUS": (bytes(query(opcode=OPCODE.STATUS).pack()), 4, "malformed for {}: opcode 2"),
    "opcode UPDATE": (bytes(query(opcode=OPCODE.UPDATE).pack()), 4, "malformed for {}: opcode 5"),
    "two OPT records": (with_opts(query(), [0, 0]), 1, "malformed for {}: more than one OPT record"),
    "EDNS version 1": (with_opts(query(), [1]), 16, "malformed for {}: EDNS version 1"),
    "a response": (bytes(query(qr=1).pack()), None, "dropped a packet from {}: a response, not a query"),
    "short header": (REAL[:11], None, "dropped a packet from {}: not a DNS message"),
    "question cut": (REAL[:-3], None, "dropped a packet from {}: not a DNS message"),
    "pointer loop": (REAL[:12] + b"\xc0\x0c" + REAL[-4:], None, "dropped a packet from {}: not a DNS message"),
    "label of 64 bytes": (REAL[:12] + b"\x40" + REAL[13:], None, "dropped a packet from {}: not a DNS message"),
    "counts beyond the data": (REAL[:6] + b"\xff\xff\xff\xff\xff\xff" + REAL[12:], None,
                               "dropped a packet from {}: not a DNS message"),
    "empty": (b"", None, "dropped a packet from {}: not a DNS message"),
}


def udp_from(source: str, port: int, packet: bytes, timeout: float) -> bytes | None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind((source, 0))
        s.settimeout(timeout)
        s.sendto(packet, ("127.0.0.1", port))
        with contextlib.suppress(socket.timeout):
            return s.recv(65535)
    return None


def check_error_answer(packet: bytes, answer: bytes, rcode: int) -> None:
    """An error for a malformed query: the id, QR, the rcode, the header alone (FORMERR, NOTIMP)
    or with the question and OPT (BADVERS), never larger than the query."""
    record = DNSRecord.parse(answer)
    assert record.header.id == 77 and record.header.qr == 1 and len(answer) <= len(packet)
    if rcode == 16:
        opt = [rr for rr in record.ar if rr.rtype == QTYPE.OPT]
        assert len(opt) == 1 and (opt[0].ttl >> 24) == 1 and record.header.rcode == 0
    else:
        assert record.header.rcode == rcode and (record.header.q, record.header.a) == (0, 0)


@pytest.fixture(scope="module")
def dns_app(tmp_path_factory):
    port = free_port()
    app = Appliance(tmp_path_factory.mktemp("hostile-dns"), extra=ANSWERS,
                    more_listeners=f'dns = "127.0.0.1:{port}"').start()
    app.dns_port = port
    try:
        yield app
    finally:
        app.stop()


@pytest.mark.parametrize("name", sorted(MALFORMED))
def test_each_malformed_message_is_dropped_or_answered_formerr_notimp_badvers(dns_app, name):
    packet, rcode, logged = MALFORMED[name]
    index = sorted(MALFORMED).index(name) + 1
    source = f"127.50.0.{index}"
    answer = udp_from(source, dns_app.dns_port, packet, timeout=1.0 if rcode is None else 5.0)
    if rcode is None:
        assert answer is None
    else:
        check_error_answer(packet, answer, rcode)
    if packet:                                           # over TCP: the same, then closed
        with socket.socket() as s:
            s.settimeout(5)
            s.bind((f"127.51.0.{index}", 0))
            s.connect(("127.0.0.1", dns_app.dns_port))
            s.sendall(struct.pack("!H", len(packet)) + packet)
            stream = read_until_closed(s)
        if rcode is None:
            assert stream == b""
        else:
            (length,) = struct.unpack("!H", stream[:2])
            assert len(stream) == 2 + length
            check_error_answer(packet, stream[2:], rcode)
    wait_for_line(dns_app, logged.format(source))
    assert short(dns_app.dns_port, "wpad.localdomain") == ["127.0.0.1"]


def wait_for_line(app, text: str, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    for _ in range(int(timeout / 0.05) + 1):
        output = app.proc.output()
        if text in output or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert text in output, output[-2000:]
    assert "Traceback" not in output


# --- DNS: no recursion, no ANY for outsiders -------------------------------------------------------

def tcp_exchange(port: int, packet: bytes, source: str) -> bytes:
    with socket.socket() as s:
        s.settimeout(5)
        s.bind((source, 0))
        s.connect(("127.0.0.1", port))
        s.sendall(struct.pack("!H", len(packet)) + packet)
        (length,) = struct.unpack("!H", s.recv(2, socket.MSG_WAITALL))
        return s.recv(length, socket.MSG_WAITALL)


def test_outsiders_get_no_recursion_and_no_any_over_udp_and_tcp(make_appliance):
    with upstream_resolver() as (upstream, resolver):
        app, port = dns_appliance(make_appliance, extra=ANSWERS + f'forward = ["127.0.0.1:{upstream}"]\n',
                                  rules=ONLY_127_0_0_1)
        for name in ("made-up.test", "wpad.localdomain", "big.test"):
            for qtype in ("ANY", "A", "TXT"):
                packet = bytes(query(name, qtype, rd=1).pack())
                for answer in (udp_from("127.0.0.2", port, packet, 5.0),
                               tcp_exchange(port, packet, "127.0.0.2")):
                    record = DNSRecord.parse(answer)
                    assert (record.header.rcode, record.header.ra, record.header.a) == (5, 0, 0)
                    assert len(answer) <= len(packet)
        assert resolver.seen == []                                        # nothing was forwarded
        inside = DNSRecord.parse(udp_from("127.0.0.1", port, bytes(query("made-up.test", rd=1).pack()), 5.0))
        assert inside.header.ra == 1 and str(inside.rr[0].rdata) == "192.0.2.7"


# --- DNS: TCP clients that stall -----------------------------------------------------------------

def test_a_tcp_client_that_never_reads_is_closed_and_others_are_served(make_appliance):
    """6,000 pipelined queries whose answers (60 addresses, about 1 KB each) fill every buffer
    between the appliance and a client that never reads: the appliance serves others meanwhile,
    and closes that client once its answers stall for the idle timeout."""
    app, port = dns_appliance(make_appliance, extra="[limits]\nclient_idle_timeout = 1.0\n" + MANY)
    framed = struct.pack("!H", len(REAL)) + REAL
    with socket.socket() as hog:
        hog.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        hog.bind(("127.61.0.1", 0))
        hog.connect(("127.0.0.1", port))
        hog.settimeout(10)
        hog.sendall(framed * 6000)
        assert len(short(port, "+tcp", "wpad.localdomain")) == 60              # others are served
        wait_for_line(app, "TCP client 127.61.0.1 stalled; closed", timeout=30)
        received = 0
        with contextlib.suppress(ConnectionResetError):
            for _ in range(100_000):                    # what was in the buffers, then the end
                chunk = hog.recv(65536)
                if not chunk:
                    break
                received += len(chunk)
    assert 0 < received < 6000 * 900                    # closed with most answers never sent
    assert app.proc.popen.poll() is None and "Traceback" not in app.proc.output()


def test_more_stalled_tcp_clients_than_the_listener_serves_at_once(make_appliance):
    app, port = dns_appliance(make_appliance, extra="[limits]\nclient_idle_timeout = 1.0\n" + ANSWERS)
    stalled = []
    try:
        for i in range(200):                              # TCP_CLIENTS is 128
            s = socket.socket()
            s.bind((str(ipaddress.ip_address("127.60.0.1") + i), 0))
            s.connect(("127.0.0.1", port))
            stalled.append(s)
        assert short(port, "wpad.localdomain") == ["127.0.0.1"]            # UDP is not held up
        started = time.monotonic()
        assert short(port, "+tcp", "+time=8", "wpad.localdomain") == ["127.0.0.1"]
        assert time.monotonic() - started < 6            # the stalled ones time out in turn
    finally:
        for s in stalled:
            s.close()
    assert app.proc.popen.poll() is None and "Traceback" not in app.proc.output()
