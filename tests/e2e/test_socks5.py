"""The SOCKS5 listener (RFC 1928, RFC 1929) driven by real clients: curl (`--socks5-hostname`,
`--socks5`, with and without `--proxy-user`), python-socks (CONNECT to IPv4, IPv6 and a name the
appliance resolves), PySocks (UDP ASSOCIATE), and raw sockets for exact reply codes and
malformed input.

Names resolve only through a dnslib server the tests start (`[upstream] nameservers`) or
/etc/hosts (`localhost`), never through the machine's resolver. Everything listens on loopback.

What a client sends right behind its CONNECT request, before the reply, is relayed to the origin
as the tunnel's first bytes (`test_bytes_after_the_request_are_the_tunnels_first_bytes`): clients
may pipeline their first data, and nothing else could be meant by them. Behind a UDP ASSOCIATE
request, or later on its control connection, any byte ends the association: that connection
carries nothing in SOCKS5 once the reply is sent.
"""

from __future__ import annotations

import contextlib
import json
import socket
import struct
import threading
import time

import pytest
import socks
from dnslib import RCODE, RR
from dnslib.server import BaseResolver, DNSServer
from python_socks.sync import Proxy

from appliance.protocols.proxy_auth import hash_password

from .conftest import DEFAULT_RULES, Appliance, HalfCloseOrigin, curl, free_port, serving

NO_AUTH = b"\x05\x01\x00"
USERPASS = b"\x05\x01\x02"
PASSWORD = "s3cret:x"                # RFC 1929 passwords may hold colons, like Basic ones


def connect_request(host: str, port: int, command: int = 1) -> bytes:
    """VER CMD RSV ATYP DST.ADDR DST.PORT, IPv4/IPv6 literals as such, anything else as a name."""
    for family, atyp in ((socket.AF_INET, 1), (socket.AF_INET6, 4)):
        with contextlib.suppress(OSError):
            return bytes([5, command, 0, atyp]) + socket.inet_pton(family, host) + struct.pack("!H", port)
    name = host.encode()
    return bytes([5, command, 0, 3, len(name)]) + name + struct.pack("!H", port)


def recv_exactly(sock: socket.socket, n: int) -> bytes:
    data = b""
    for _ in range(n):
        if len(data) == n:
            break
        chunk = sock.recv(n - len(data))
        if not chunk:
            break
        data += chunk
    return data


def read_reply(sock: socket.socket) -> tuple[int, str, int]:
    """(REP, BND.ADDR, BND.PORT) of a reply (RFC 1928 §6)."""
    head = recv_exactly(sock, 4)
    assert len(head) == 4 and head[0] == 5 and head[2] == 0, head
    if head[3] == 1:
        host = socket.inet_ntop(socket.AF_INET, recv_exactly(sock, 4))
    elif head[3] == 4:
        host = socket.inet_ntop(socket.AF_INET6, recv_exactly(sock, 16))
    else:
        host = recv_exactly(sock, recv_exactly(sock, 1)[0]).decode()
    return head[1], host, struct.unpack("!H", recv_exactly(sock, 2))[0]


def open_socks(port: int, request: bytes, greeting: bytes = NO_AUTH) -> tuple[socket.socket, tuple]:
    """Greeting and request in one write (as curl sends them); the socket after the reply."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(greeting + request)
    assert recv_exactly(sock, 2) == b"\x05\x00"
    return sock, read_reply(sock)


def refused_with(port: int, request: bytes) -> tuple[int, bytes]:
    """The reply code to `request`, and what followed it before the appliance closed."""
    sock, (code, host, bound_port) = open_socks(port, request)
    with sock:
        assert (host, bound_port) == ("0.0.0.0", 0)
        return code, read_until_closed(sock)


def read_until_closed(sock: socket.socket, timeout: float = 10.0) -> bytes:
    """What arrives until the appliance closes (a reset counts: it closed with our bytes unread);
    fails if it is still open after `timeout`."""
    sock.settimeout(timeout)
    data = b""
    for _ in range(1000):
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            return data
        except socket.timeout:
            raise AssertionError(f"still open after {timeout}s, having received {data!r}") from None
        if not chunk:
            return data
        data += chunk
    raise AssertionError("too much data")


def exchange(port: int, data: bytes) -> bytes:
    """Send raw bytes (then our FIN) and read until the appliance closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
        return read_until_closed(sock)


def wait_for_log(app: Appliance, text: str, timeout: float = 5.0) -> str:
    """The last line of the appliance's output holding `text` (waiting for it); never a traceback."""
    deadline = time.monotonic() + timeout
    for _ in range(int(timeout / 0.05) + 1):
        output = app.proc.output()
        if text in output or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert text in output, output[-3000:]
    assert "Traceback" not in output
    return [line for line in output.splitlines() if text in line][-1]


def http_get(sock: socket.socket, host: str, port: int, path: str) -> tuple[bytes, dict]:
    """An HTTP/1.0 GET over an open tunnel: (status line, JSON body)."""
    authority = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    sock.sendall(f"GET {path} HTTP/1.0\r\nHost: {authority}\r\n\r\n".encode())
    head, _, body = read_until_closed(sock).partition(b"\r\n\r\n")
    return head.split(b"\r\n", 1)[0], json.loads(body)


# --- what the tests talk to -------------------------------------------------------------------

class ZoneResolver(BaseResolver):
    """origin.test → 127.0.0.1, v6.test → ::1; every other name: NXDOMAIN."""

    ZONE = {"origin.test": "origin.test. 60 A 127.0.0.1", "v6.test": "v6.test. 60 AAAA ::1"}

    def resolve(self, request, handler):
        reply = request.reply()
        name = str(request.q.qname).rstrip(".").lower()
        if name not in self.ZONE:
            reply.header.rcode = RCODE.NXDOMAIN
        else:
            reply.add_answer(*[rr for rr in RR.fromZone(self.ZONE[name]) if rr.rtype == request.q.qtype])
        return reply


class UdpServer:
    """A UDP server on loopback in a thread: keeps what arrives, and echoes it back."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(0.1)
        self.port = self.sock.getsockname()[1]
        self.received: list[bytes] = []
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while not self.stopping.is_set():
            try:
                data, peer = self.sock.recvfrom(65535)
            except socket.timeout:
                continue
            except OSError:
                return
            self.received.append(data)
            self.sock.sendto(data, peer)

    def __enter__(self) -> "UdpServer":
        return self

    def __exit__(self, *exc) -> None:
        self.stopping.set()
        self.thread.join(5)
        self.sock.close()


@pytest.fixture(scope="module")
def dns_port():
    port = free_port()
    server = DNSServer(ZoneResolver(), port=port, address="127.0.0.1")
    server.start_thread()
    try:
        yield port
    finally:
        server.stop()


@pytest.fixture(scope="module")
def udp_echo():
    with UdpServer() as server:
        yield server


@pytest.fixture(scope="module")
def udp_denied():
    """A UDP server on a port the rules deny: nothing may ever reach it through the proxy."""
    with UdpServer() as server:
        yield server


@pytest.fixture(scope="module")
def origin6(tmp_path_factory):
    """tests/e2e/origin.py on [::1]."""
    with serving(tmp_path_factory, "origin.py", "::1", host="::1") as port:
        yield port


def start_socks_app(directory, extra: str = "", rules: str = DEFAULT_RULES, make=None) -> Appliance:
    """An appliance with a socks5 listener; `app.socks_port` is where it listens."""
    port = free_port()
    listen = f'socks5 = "127.0.0.1:{port}"'
    app = (make(extra, rules, more_listeners=listen) if make
           else Appliance(directory, extra, rules, more_listeners=listen).start())
    app.socks_port = port
    return app


def rules(denied_port: int, users: str = "") -> str:
    return (f'[[rule]]\nname = "deny-port"\naction = "deny"\nports = [{denied_port}]\n\n'
            f'[[rule]]\nname = "loopback"\naction = "allow"\nsrc = ["127.0.0.0/8", "::1"]\n{users}\n')


@pytest.fixture(scope="module")
def socks_app(tmp_path_factory, dns_port, udp_denied):
    app = start_socks_app(tmp_path_factory.mktemp("socks5"),
                          f'[upstream]\nnameservers = ["127.0.0.1:{dns_port}"]\n',
                          rules(udp_denied.port))
    try:
        yield app
    finally:
        app.stop()


@pytest.fixture(scope="module")
def auth_app(tmp_path_factory, dns_port, udp_denied):
    """Users alice and bob; the rules admit only alice."""
    directory = tmp_path_factory.mktemp("socks5-auth")
    users = directory / "users"
    users.write_text(f"alice:{hash_password(PASSWORD, b'0123456789abcdef')}\n"
                     f"bob:{hash_password('hunter2', b'fedcba9876543210')}\n")
    app = start_socks_app(directory, f'[auth]\nusers_file = "{users}"\n\n'
                          f'[upstream]\nnameservers = ["127.0.0.1:{dns_port}"]\n',
                          rules(udp_denied.port, users='users = ["alice"]'))
    try:
        yield app
    finally:
        app.stop()


def origin_port(origin: str) -> int:
    return int(origin.rsplit(":", 1)[1])


# --- curl -------------------------------------------------------------------------------------

@pytest.mark.parametrize("option, host, target", [
    ("--socks5-hostname", "origin.test", "origin.test"),    # the appliance resolves the name
    ("--socks5", "127.0.0.1", "127.0.0.1"),                  # curl sends the address
])
def test_curl(socks_app, origin, option, host, target):
    port = origin_port(origin)
    r = curl(option, f"127.0.0.1:{socks_app.socks_port}", f"http://{host}:{port}/echo?via={option}")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["query"] == {"via": option}
    record = socks_app.wait_record(lambda r: r["target"] == f"{target}:{port}" and r["status"] == 200)
    assert (record["listener"], record["protocol"], record["kind"], record["method"]) == \
        ("socks5", "SOCKS5", "tunnel", "CONNECT")
    assert record["user"] is None and record["upstream"] == "127.0.0.1" and record["rule"] == "loopback"
    assert record["bytes_up"] > 0 and record["bytes_down"] > 0


@pytest.mark.parametrize("option, user_option", [("--socks5-hostname", "--proxy-user"), ("--socks5", "-U")])
def test_curl_with_credentials(auth_app, origin, option, user_option):
    port = origin_port(origin)
    host = "origin.test" if option == "--socks5-hostname" else "127.0.0.1"
    r = curl(option, f"127.0.0.1:{auth_app.socks_port}", user_option, f"alice:{PASSWORD}",
             f"http://{host}:{port}/echo?auth={user_option}")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["query"] == {"auth": user_option}
    record = auth_app.wait_record(lambda r: r["target"] == f"{host}:{port}" and r["status"] == 200)
    assert record["user"] == "alice" and record["listener"] == "socks5"


def test_curl_without_credentials_fails_and_the_log_says_why(auth_app, origin):
    r = curl("--socks5-hostname", f"127.0.0.1:{auth_app.socks_port}", f"{origin}/echo?auth=none")
    assert r.returncode != 0 and b"No authentication method was acceptable" in r.stderr
    wait_for_log(auth_app, "client offers no acceptable method (needs username/password)")
    record = auth_app.wait_record(lambda r: "no acceptable method" in (r["error"] or ""))
    assert record["status"] == 407 and record["listener"] == "socks5" and record["user"] is None


def test_curl_with_a_wrong_password_fails_and_is_logged(auth_app, origin):
    r = curl("--socks5-hostname", f"127.0.0.1:{auth_app.socks_port}", "--proxy-user", "alice:wrong",
             f"{origin}/echo?auth=wrong")
    assert r.returncode != 0
    wait_for_log(auth_app, "proxy authentication failed for user 'alice' from 127.0.0.1")
    record = auth_app.wait_record(lambda r: (r["error"] or "").startswith("auth: invalid credentials"))
    assert record["status"] == 407 and record["user"] == "alice"


def test_with_auth_set_a_greeting_offering_only_no_auth_gets_ff(auth_app):
    assert exchange(auth_app.socks_port, NO_AUTH) == b"\x05\xff"


def test_non_utf8_credentials_get_the_failure_answer(auth_app):
    credentials = b"\x01\x02\xff\xfe\x02pw"
    assert exchange(auth_app.socks_port, USERPASS + credentials) == b"\x05\x02\x01\x01"
    wait_for_log(auth_app, "user name or password is not UTF-8")


def test_an_authenticated_user_no_rule_admits_is_not_allowed(auth_app, origin):
    credentials = b"\x01\x03bob\x07hunter2"
    port = origin_port(origin)
    reply = exchange(auth_app.socks_port, USERPASS + credentials + connect_request("127.0.0.1", port))
    assert reply == b"\x05\x02\x01\x00" + b"\x05\x02\x00\x01" + bytes(6)
    record = auth_app.wait_record(lambda r: r["user"] == "bob")
    assert record["status"] == 403 and record["rule"].startswith("default deny")


# --- python-socks: CONNECT to IPv4, IPv6, and a name --------------------------------------------

@pytest.mark.parametrize("host", ["127.0.0.1", "::1", "origin.test", "v6.test", "localhost"])
def test_python_socks_connect(socks_app, origin, origin6, host):
    port = origin6 if host in ("::1", "v6.test") else origin_port(origin)
    proxy = Proxy.from_url(f"socks5://127.0.0.1:{socks_app.socks_port}", rdns=True)
    with proxy.connect(host, port, timeout=10) as sock:
        sock.settimeout(10)
        status, body = http_get(sock, host, port, f"/echo?host={host}")
    assert status == b"HTTP/1.1 200 OK" and body["query"] == {"host": host}
    target = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    record = socks_app.wait_record(lambda r: r["target"] == target and r["status"] == 200)
    assert record["upstream"] in ("127.0.0.1", "::1") and record["protocol"] == "SOCKS5"


def test_python_socks_with_credentials(auth_app, origin):
    port = origin_port(origin)
    proxy = Proxy.from_url(f"socks5://alice:{PASSWORD}@127.0.0.1:{auth_app.socks_port}", rdns=True)
    with proxy.connect("origin.test", port, timeout=10) as sock:
        sock.settimeout(10)
        status, body = http_get(sock, "origin.test", port, "/echo?client=python-socks")
    assert status == b"HTTP/1.1 200 OK"
    record = auth_app.wait_record(lambda r: r["status"] == 200 and r["user"] == "alice"
                         and r["target"] == f"origin.test:{port}")
    assert record["bytes_down"] > 0


# --- the success reply's bound address (RFC 1928 §6) -------------------------------------------

@pytest.mark.parametrize("family", ["IPv4", "IPv6"])
def test_success_reply_carries_the_bound_address(socks_app, origin, origin6, family):
    """BND.ADDR:BND.PORT is the appliance's end of its origin connection: the origin sees that port."""
    host, port = ("127.0.0.1", origin_port(origin)) if family == "IPv4" else ("::1", origin6)
    sock, (code, bound_host, bound_port) = open_socks(socks_app.socks_port, connect_request(host, port))
    with sock:
        assert code == 0 and bound_host == host and bound_port != 0
        status, body = http_get(sock, host, port, "/echo?bound=1")
    assert body["peer_port"] == bound_port


# --- half-close in both directions ------------------------------------------------------------

def test_half_close_client_first(socks_app):
    origin = HalfCloseOrigin("client-first")
    proxy = Proxy.from_url(f"socks5://127.0.0.1:{socks_app.socks_port}")
    with proxy.connect("127.0.0.1", origin.port, timeout=10) as sock:
        sock.settimeout(10)
        sock.sendall(b"hello socks")
        sock.shutdown(socket.SHUT_WR)             # our FIN reaches the origin as a FIN ...
        answer = read_until_closed(sock)               # ... which still answers
    origin.thread.join(10)
    assert answer == b"got:hello socks"


def test_half_close_server_first(socks_app):
    origin = HalfCloseOrigin("server-first")
    sock, (code, _, _) = open_socks(socks_app.socks_port, connect_request("127.0.0.1", origin.port))
    with sock:
        assert code == 0
        banner = read_until_closed(sock)               # the origin's FIN reaches us ...
        sock.sendall(b"after your FIN")          # ... and our direction still flows
        sock.shutdown(socket.SHUT_WR)
        origin.thread.join(10)
    assert banner == b"banner" and origin.received == b"after your FIN"


def test_bytes_after_the_request_are_the_tunnels_first_bytes(socks_app):
    origin = HalfCloseOrigin("client-first")
    reply = exchange(socks_app.socks_port, NO_AUTH + connect_request("127.0.0.1", origin.port) + b"GARBAGE")
    origin.thread.join(10)
    assert reply[:2] == b"\x05\x00" and reply[2:4] == b"\x05\x00" and reply.endswith(b"got:GARBAGE")
    assert origin.received == b"GARBAGE"


# --- reply codes ------------------------------------------------------------------------------

@pytest.mark.parametrize("case, code, status, logged", [
    ("denied", 0x02, 403, "not allowed by ruleset (denied: deny-port)"),
    ("no such name", 0x04, 502, "missing.test:80 from 127.0.0.1: host unreachable (upstream dns: "),
    ("closed port", 0x05, 502, "connection refused (upstream connect: 127.0.0.1: Connection refused)"),
    ("BIND", 0x07, 501, "command not supported (protocol: BIND is not supported)"),
    ("unknown command", 0x07, 501, "command not supported (protocol: unknown command 0x09)"),
    ("address type 5", 0x08, 400, "address type not supported (protocol: request: unknown address type 0x05)"),
    ("empty domain", 0x04, 400, "host unreachable (protocol: request: empty domain name)"),
])
def test_reply_codes(socks_app, udp_denied, case, code, status, logged):
    closed = free_port()
    request = {
        "denied": connect_request("127.0.0.1", udp_denied.port),
        "no such name": connect_request("missing.test", 80),
        "closed port": connect_request("127.0.0.1", closed),
        "BIND": connect_request("127.0.0.1", 21, command=2),
        "unknown command": connect_request("127.0.0.1", 80, command=9),
        "address type 5": b"\x05\x01\x00\x05" + bytes(6),
        "empty domain": b"\x05\x01\x00\x03\x00\x00\x50",
    }[case]
    assert refused_with(socks_app.socks_port, request) == (code, b"")     # the reply, then closed
    line = wait_for_log(socks_app, logged)
    record = socks_app.wait_record(lambda r: r["error"] and f"({r['error']})" in line)
    assert record["status"] == status and record["listener"] == "socks5"
    if case == "no such name":                    # the test resolver's answer, not the machine's
        assert line.endswith("no such name (NXDOMAIN))")


def test_connect_timeout_is_ttl_expired(make_appliance):
    """An origin whose accept queue is full never answers a SYN (Linux drops it): a timeout."""
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(0)
    queued = []
    try:
        for _ in range(4):                        # fill the queue (one is enough; a few to be sure)
            s = socket.socket()
            s.setblocking(False)
            s.connect_ex(silent.getsockname())
            queued.append(s)
        app = start_socks_app(None, "[upstream]\nconnect_timeout = 0.3\n", make=make_appliance)
        started = time.monotonic()
        code, rest = refused_with(app.socks_port, connect_request("127.0.0.1", silent.getsockname()[1]))
        assert (code, rest) == (0x06, b"") and time.monotonic() - started < 5
        wait_for_log(app, "TTL expired (upstream timeout: connect to 127.0.0.1 timed out)")
        record = app.wait_record(lambda r: r["listener"] == "socks5")
        assert record["status"] == 504
    finally:
        for s in queued:
            s.close()
        silent.close()


# --- malformed input --------------------------------------------------------------------------

@pytest.mark.parametrize("data, answer, logged", [
    (b"\x04\x01\x00\x50\x7f\x00\x00\x01\x00", b"", "closed (protocol: not SOCKS5: version byte 0x04)"),
    (b"GET / HTTP/1.1\r\n\r\n", b"", "closed (protocol: not SOCKS5: version byte 0x47)"),
    (b"\x05\x00", b"\x05\xff", "closed (protocol: greeting offers no authentication method)"),
    (b"\x05\x01\x02", b"\x05\xff", "closed (protocol: client offers no acceptable method (needs no authentication))"),
    (NO_AUTH + b"\x05\x01\x00\x03\x0bexamp", b"\x05\x00", "closed (client: closed during the SOCKS5 handshake)"),
    (NO_AUTH + b"\x05\x01\x00", b"\x05\x00", "closed (client: closed during the SOCKS5 handshake)"),
    (NO_AUTH + b"\x06\x01\x00\x01", b"\x05\x00\x05\x01\x00\x01" + bytes(6),
     "general failure (protocol: request version byte 0x06, not 5)"),
])
def test_malformed_input(socks_app, data, answer, logged):
    assert exchange(socks_app.socks_port, data) == answer
    line = wait_for_log(socks_app, logged)
    socks_app.wait_record(lambda r: r["error"] and f"({r['error']})" in line)


# --- UDP ASSOCIATE ----------------------------------------------------------------------------

@contextlib.contextmanager
def pysocks_udp(app: Appliance):
    """A PySocks UDP socket associated through the appliance (its TCP control connection is
    opened by bind(), with the default timeout as its only deadline: set it)."""
    sock = socks.socksocket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.set_proxy(socks.SOCKS5, "127.0.0.1", app.socks_port, rdns=True)
    sock.settimeout(5)
    before = socket.getdefaulttimeout()
    socket.setdefaulttimeout(10)
    try:
        sock.bind(("127.0.0.1", 0))
    finally:
        socket.setdefaulttimeout(before)
    try:
        yield sock
    finally:
        sock.close()


def test_udp_associate_round_trip(socks_app, udp_echo):
    with pysocks_udp(socks_app) as sock:
        sock.sendto(b"ping", ("127.0.0.1", udp_echo.port))
        assert sock.recvfrom(1024) == (b"ping", ("127.0.0.1", udp_echo.port))
        sock.sendto(b"by name", ("origin.test", udp_echo.port))       # resolved by the appliance
        assert sock.recvfrom(1024) == (b"by name", ("127.0.0.1", udp_echo.port))
    record = socks_app.wait_record(lambda r: r["kind"] == "udp" and r["bytes_up"] == 11)
    assert (record["method"], record["status"], record["bytes_down"]) == ("UDP_ASSOCIATE", 200, 11)
    assert record["listener"] == "socks5" and record["protocol"] == "SOCKS5" and record["error"] is None


def test_udp_policy_applies_per_datagram(socks_app, udp_echo, udp_denied):
    with pysocks_udp(socks_app) as sock:
        sock.sendto(b"not for you", ("127.0.0.1", udp_denied.port))
        sock.sendto(b"allowed", ("127.0.0.1", udp_echo.port))
        # Datagrams are handled in order: once this answer is back, the denied one was dropped.
        assert sock.recvfrom(1024) == (b"allowed", ("127.0.0.1", udp_echo.port))
    time.sleep(0.2)
    assert udp_denied.received == []
    wait_for_log(socks_app, "datagram dropped: denied by policy: deny-port")
    record = socks_app.wait_record(lambda r: r["kind"] == "udp" and r["error"] == "1 datagrams dropped")
    assert record["bytes_up"] == len(b"allowed")


def raw_association(app: Appliance) -> tuple[socket.socket, socket.socket]:
    """(control connection, UDP socket connected to the relay) of a hand-made UDP ASSOCIATE."""
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("127.0.0.1", 0))
    udp.settimeout(5)
    control, (code, relay_host, relay_port) = open_socks(
        app.socks_port, connect_request("0.0.0.0", udp.getsockname()[1], command=3))
    assert code == 0 and relay_host == "127.0.0.1" and relay_port != 0
    udp.connect((relay_host, relay_port))
    return control, udp


def datagram(port: int, data: bytes, frag: int = 0) -> bytes:
    return b"\x00\x00" + bytes([frag]) + connect_request("127.0.0.1", port)[3:] + data


def test_udp_fragments_are_refused(socks_app, udp_echo):
    control, udp = raw_association(socks_app)
    with control, udp:
        udp.send(datagram(udp_echo.port, b"fragment 1", frag=1))
        udp.send(datagram(udp_echo.port, b"whole"))
        assert udp.recv(1024) == datagram(udp_echo.port, b"whole")
    assert b"fragment 1" not in udp_echo.received
    wait_for_log(socks_app, "datagram dropped: fragmented datagram (FRAG 1) refused")


def test_garbage_on_the_control_connection_ends_the_association(socks_app, udp_echo):
    control, udp = raw_association(socks_app)
    with control, udp:
        udp.send(datagram(udp_echo.port, b"before"))
        assert udp.recv(1024) == datagram(udp_echo.port, b"before")
        control.sendall(b"garbage")
        assert read_until_closed(control) == b""
        wait_for_log(socks_app, "data on the control connection; closing")
        udp.send(datagram(udp_echo.port, b"after"))
        with pytest.raises((socket.timeout, ConnectionRefusedError)):
            udp.recv(1024)                                   # the relay port is gone
    assert b"after" not in udp_echo.received
    record = socks_app.wait_record(lambda r: r["kind"] == "udp" and r["bytes_up"] == len(b"before"))
    assert record["error"] == "data on the control connection"


def test_garbage_behind_the_udp_associate_request_ends_the_association(socks_app):
    # Sent in the same write as the request: the association is set up, then ended at once.
    request = connect_request("127.0.0.1", 40000, command=3)
    with socket.create_connection(("127.0.0.1", socks_app.socks_port), timeout=10) as control:
        control.sendall(NO_AUTH + request + b"junk")
        assert recv_exactly(control, 2) == b"\x05\x00"
        assert read_reply(control)[0] == 0
        assert read_until_closed(control) == b""
    record = socks_app.wait_record(lambda r: r["kind"] == "udp" and r["target"] == "127.0.0.1:40000")
    assert record["error"] == "data on the control connection"


def test_no_traceback_in_the_log(socks_app, auth_app):
    for app in (socks_app, auth_app):
        assert "Traceback" not in app.proc.output()
