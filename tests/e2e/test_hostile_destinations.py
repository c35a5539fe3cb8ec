"""Destination policy on the address actually dialled (hostile-input suite, group 4).

Loopback, "this host", link-local, metadata, multicast and broadcast addresses in every spelling a
client might try, and names that resolve to them, through every explicit front end: HTTP/1.1
absolute-form, CONNECT, WebSocket Upgrade, HTTP/2 request, CONNECT and extended CONNECT (RFC 8441)
streams, and SOCKS5 with a name (socks5h) and with each address type. The deny rules are the
packaged config's own (packaging/appliance.toml). Also: the appliance's own listeners (a loop),
CONNECT ports outside `[policy] connect_ports`, and the packaged config as installed, which is
not an open proxy. Each case asserts the refusal, the rule in the access log, and that a tripwire
listener at the destination never saw a connection."""

from __future__ import annotations

import json
import re
import socket
import struct
import threading
import time
import tomllib
import urllib.request

import pytest
from dnslib import DNSRecord

from appliance.policy import CONNECT_PORT, DEFAULT_DENY, FORWARDING_LOOP, NOT_UNICAST

from .conftest import REPO, Appliance, curl, free_port, free_ports, serving
from .h2_raw_client import H2RawClient

PACKAGED = REPO / "packaging" / "appliance.toml"


def packaged_deny_rules() -> str:
    """The packaged config's deny rules, as written there, for the tests to hold it to."""
    tables = tomllib.loads(PACKAGED.read_text())["rule"]
    return "".join("[[rule]]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in t.items()) + "\n"
                   for t in tables if t["action"] == "deny")


PACKAGED_DENIALS = [t["name"] for t in tomllib.loads(PACKAGED.read_text())["rule"] if t["action"] == "deny"]
assert PACKAGED_DENIALS == ["the box itself", "link-local", "cloud metadata"]

RULES = packaged_deny_rules() + """
[[rule]]
name = "clients"
action = "allow"
src = ["127.0.0.0/8", "::1"]
"""
REFUSALS = (*PACKAGED_DENIALS, NOT_UNICAST, FORWARDING_LOOP, CONNECT_PORT, DEFAULT_DENY)

SPELLINGS = ["127.0.0.1", "127.1", "2130706433", "0x7f000001", "0177.0.0.1", "127.000.000.001",
             "127.0.0.1.", "[::ffff:127.0.0.1]", "[::ffff:7f00:1]", "[::1]", "localhost",
             "localhost.", "LOCALHOST", "0.0.0.0", "0", "[::]"]


@pytest.fixture(scope="module")
def guarded(tmp_path_factory, origin):
    from .conftest import Appliance
    socks_port = free_port()
    app = Appliance(tmp_path_factory.mktemp("guarded"), rules=RULES,
                    more_listeners=f'socks5 = "127.0.0.1:{socks_port}"').start()
    app.socks_port = socks_port
    try:
        yield app
    finally:
        app.stop()


def seen(origin: str) -> list[str]:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(f"{origin}/seen", timeout=5) as r:
        return [line for line in json.loads(r.read()) if "spelling=" in line]


@pytest.mark.parametrize("host", SPELLINGS)
def test_every_spelling_of_the_box_is_denied_everywhere(guarded, origin, host):
    port = origin.rsplit(":", 1)[1]
    url = f"http://{host}:{port}/echo?spelling={host}"
    before = len(seen(origin))
    plain = curl("-g", "-o", "/dev/null", "-w", "%{http_code}", "-x", guarded.proxy, url)
    assert plain.stdout == b"403", (host, plain)
    tunnel = curl("-g", "-p", "-o", "/dev/null", "-x", guarded.proxy, url)
    assert tunnel.returncode != 0 and b"403" in tunnel.stderr, (host, tunnel)
    socks = curl("-g", "-o", "/dev/null", "--socks5-hostname", f"127.0.0.1:{guarded.socks_port}", url)
    assert socks.returncode == 97, (host, socks)             # the SOCKS5 request was refused
    assert len(seen(origin)) == before                        # nothing reached the origin


@pytest.mark.parametrize("atyp, address", [
    (1, socket.inet_pton(socket.AF_INET, "127.0.0.1")),
    (1, socket.inet_pton(socket.AF_INET, "169.254.169.254")),
    (4, socket.inet_pton(socket.AF_INET6, "::1")),
    (4, socket.inet_pton(socket.AF_INET6, "::ffff:127.0.0.1")),
], ids=["ipv4 loopback", "metadata", "ipv6 loopback", "ipv4-mapped"])
def test_socks5_address_types_are_checked_too(guarded, origin, atyp, address):
    port = int(origin.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", guarded.socks_port), timeout=5) as s:
        s.sendall(b"\x05\x01\x00")
        assert s.recv(2) == b"\x05\x00"
        s.sendall(b"\x05\x01\x00" + bytes([atyp]) + address + struct.pack("!H", port))
        assert s.recv(2) == b"\x05\x02"                       # not allowed by ruleset


# --- helpers ----------------------------------------------------------------------------------

class Tripwire:
    """A listener on 127.0.0.1 and ::1 (one port) that counts the connections it accepts:
    any count above zero means a forbidden destination was dialled."""

    def __init__(self) -> None:
        self.port = free_port()
        self.count = 0
        self.socks = []
        for family, host in ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")):
            s = socket.socket(family)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((host, self.port))
            s.listen(64)
            s.settimeout(0.2)
            self.socks.append(s)
        self.stopped = threading.Event()
        self.threads = [threading.Thread(target=self._accept, args=(s,), daemon=True) for s in self.socks]
        for t in self.threads:
            t.start()

    def _accept(self, sock: socket.socket) -> None:
        while not self.stopped.is_set():
            try:
                conn, _ = sock.accept()
            except (socket.timeout, OSError):
                continue
            self.count += 1
            conn.close()

    def close(self) -> None:
        self.stopped.set()
        for t in self.threads:
            t.join(5)
        for s in self.socks:
            s.close()


@pytest.fixture(scope="module")
def tripwire():
    wire = Tripwire()
    try:
        yield wire
    finally:
        wire.close()


def refused_records(app: Appliance) -> list[dict]:
    return [r for r in app.records() if r["rule"] in REFUSALS]


def expect_refusals(app: Appliance, before: int, rule: str, count: int) -> None:
    """`count` more refusals logged since `before`, each 403 and naming `rule`."""
    records = []
    for _ in range(200):                       # the log is written as each exchange ends
        records = refused_records(app)[before:]
        if len(records) >= count:
            break
        time.sleep(0.05)
    assert len(records) == count, records
    assert all(r["rule"] == rule and r["status"] == 403 for r in records), records


def h1_websocket_status(app: Appliance, authority: str) -> bytes:
    """An absolute-form WebSocket Upgrade through the HTTP/1.1 proxy: the status line."""
    head = (f"GET http://{authority}/ws HTTP/1.1\r\nHost: {authority}\r\nUpgrade: websocket\r\n"
            "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
            "Sec-WebSocket-Version: 13\r\n\r\n").encode()
    with socket.create_connection(("127.0.0.1", app.http_port), timeout=10) as s:
        s.sendall(head)
        got = b""
        for _ in range(100):
            chunk = s.recv(65536)
            got += chunk
            if not chunk or b"\r\n" in got:
                break
    return got.split(b"\r\n", 1)[0]


def h2_statuses(app: Appliance, authority: str) -> list[int | None]:
    """A plain http:// request stream, a CONNECT stream and an RFC 8441 WebSocket stream to
    `authority`, on one HTTP/2 connection to the https listener: their statuses."""
    with H2RawClient(app.https_port, app.ca_path) as c:
        sids = [c.get(f"http://{authority}/echo"),
                c.request([(":method", "CONNECT"), (":authority", authority)], end=False),
                c.request([(":method", "CONNECT"), (":protocol", "websocket"), (":scheme", "http"),
                           (":authority", authority), (":path", "/ws"),
                           ("sec-websocket-version", "13")], end=False)]
        return [c.response(sid).status for sid in sids]


def socks5_reply(app_port: int, atyp: int, address: bytes, port: int) -> bytes:
    with socket.create_connection(("127.0.0.1", app_port), timeout=10) as s:
        s.sendall(b"\x05\x01\x00")
        assert s.recv(2) == b"\x05\x00"
        s.sendall(b"\x05\x01\x00" + bytes([atyp]) + address + struct.pack("!H", port))
        return s.recv(2)


def every_front_end_refuses(app: Appliance, host: str, port: int, rule: str, socks_port: int) -> None:
    """HTTP/1.1 request, CONNECT and WebSocket, HTTP/2 request, CONNECT and WebSocket streams,
    SOCKS5 with the name: each refused with 403 (SOCKS5: "not allowed by ruleset") naming `rule`."""
    authority = f"{host}:{port}"
    before = len(refused_records(app))
    plain = curl("-g", "-o", "/dev/null", "-w", "%{http_code}", "-x", app.proxy, f"http://{authority}/")
    assert plain.stdout == b"403", (host, plain)
    tunnel = curl("-g", "-p", "-o", "/dev/null", "-x", app.proxy, f"http://{authority}/")
    assert tunnel.returncode != 0 and b"403" in tunnel.stderr, (host, tunnel)
    assert h1_websocket_status(app, authority) == b"HTTP/1.1 403 Forbidden", host
    assert h2_statuses(app, authority) == [403, 403, 403], host
    if host.startswith("["):        # an IPv6 literal goes as one (ATYP 4); the name field holds names
        request = (4, socket.inet_pton(socket.AF_INET6, host.strip("[]")))
    else:
        request = (3, bytes([len(host)]) + host.encode())
    assert socks5_reply(socks_port, *request, port) == b"\x05\x02", host
    expect_refusals(app, before, rule, 7)


# --- the same spellings through HTTP/2 and WebSocket -------------------------------------------

@pytest.mark.parametrize("host", SPELLINGS)
def test_every_spelling_is_denied_through_every_front_end(guarded, tripwire, host):
    # The packaged rule names 0.0.0.0/8 and :: too; the rules decide before the built-in checks.
    every_front_end_refuses(guarded, host, tripwire.port, "the box itself", guarded.socks_port)
    assert tripwire.count == 0


# --- link-local, metadata, unspecified, multicast, broadcast -----------------------------------

@pytest.mark.parametrize("host, rule", [
    ("169.254.169.254", "link-local"), ("[fe80::1]", "link-local"),
    ("[fd00:ec2::254]", "cloud metadata"), ("100.100.100.200", "cloud metadata"),
    ("[::ffff:169.254.169.254]", "link-local"),
    ("0.0.0.0", "the box itself"), ("[::]", "the box itself"), ("[::ffff:0.0.0.0]", "the box itself"),
    ("224.0.0.1", NOT_UNICAST), ("239.255.255.250", NOT_UNICAST), ("[ff02::1]", NOT_UNICAST),
    ("255.255.255.255", NOT_UNICAST), ("240.0.0.1", NOT_UNICAST),
])
def test_internal_and_non_unicast_destinations_are_denied(guarded, tripwire, host, rule):
    every_front_end_refuses(guarded, host, tripwire.port, rule, guarded.socks_port)
    assert tripwire.count == 0


# --- names that resolve to forbidden addresses -------------------------------------------------

@pytest.fixture(scope="module")
def nameserver(tmp_path_factory):
    with serving(tmp_path_factory, "dns_rebind_server.py") as port:
        yield port


def a_queries(nameserver: int, name: str) -> int:
    """How many A queries the hostile nameserver has had for `name`."""
    reply = DNSRecord.parse(DNSRecord.question(f"queries.{name}.", "TXT").send("127.0.0.1", nameserver, timeout=5))
    return int(str(reply.rr[0].rdata).strip('"'))


@pytest.fixture(scope="module")
def resolving(tmp_path_factory, nameserver):
    """The guarded appliance, resolving names only through the hostile nameserver."""
    socks_port = free_port()
    app = Appliance(tmp_path_factory.mktemp("resolving"), rules=RULES,
                    extra=f'[upstream]\nnameservers = ["127.0.0.1:{nameserver}"]\nconnect_timeout = 5.0\n',
                    more_listeners=f'socks5 = "127.0.0.1:{socks_port}"').start()
    app.socks_port = socks_port
    try:
        yield app
    finally:
        app.stop()


@pytest.mark.parametrize("name, rule", [
    ("loop4.test", "the box itself"), ("loop6.test", "the box itself"),
    ("mapped.test", "the box itself"), ("mixed.test", "the box itself"),
    ("metadata.test", "link-local"), ("unspecified.test", "the box itself"),
    ("multicast.test", NOT_UNICAST),
])
def test_a_name_for_a_forbidden_address_is_denied(resolving, tripwire, name, rule):
    every_front_end_refuses(resolving, name, tripwire.port, rule, resolving.socks_port)
    assert tripwire.count == 0


@pytest.fixture(scope="module")
def rebinding(tmp_path_factory, nameserver):
    """Only the tripwire's address is forbidden here; 127.0.0.2 stands for a harmless address."""
    socks_port = free_port()
    rules = ('[[rule]]\nname = "the tripwire"\naction = "deny"\ndst = ["127.0.0.1/32", "::1"]\n\n'
             '[[rule]]\nname = "clients"\naction = "allow"\nsrc = ["127.0.0.0/8"]\n')
    app = Appliance(tmp_path_factory.mktemp("rebinding"), rules=rules,
                    extra=f'[upstream]\nnameservers = ["127.0.0.1:{nameserver}"]\nconnect_timeout = 5.0\n',
                    more_listeners=f'socks5 = "127.0.0.1:{socks_port}"').start()
    app.socks_port = socks_port
    try:
        yield app
    finally:
        app.stop()


@pytest.mark.parametrize("front_end", ["request", "connect", "h2-request", "h2-connect", "socks5"])
def test_dns_rebinding_cannot_swap_the_address_between_check_and_dial(rebinding, nameserver,
                                                                       tripwire, front_end):
    """The name answers 127.0.0.2 first, then the forbidden 127.0.0.1 (TTL 0). The decision and
    the dial must use one answer: the dial goes to 127.0.0.2 (nothing listens there: 502), the
    name is asked for once, and the tripwire on 127.0.0.1 is never reached."""
    name = f"rebind-{front_end}.test"
    authority = f"{name}:{tripwire.port}"
    if front_end == "request":
        r = curl("-o", "/dev/null", "-w", "%{http_code}", "-x", rebinding.proxy, f"http://{authority}/")
        assert r.stdout == b"502", r
    elif front_end == "connect":
        r = curl("-p", "-o", "/dev/null", "-x", rebinding.proxy, f"http://{authority}/")
        assert r.returncode != 0 and b"502" in r.stderr, r
    elif front_end == "socks5":
        reply = socks5_reply(rebinding.socks_port, 3, bytes([len(name)]) + name.encode(), tripwire.port)
        assert reply == b"\x05\x05", reply                         # connection refused
    else:
        with H2RawClient(rebinding.https_port, rebinding.ca_path) as c:
            sid = (c.get(f"http://{authority}/") if front_end == "h2-request" else
                   c.request([(":method", "CONNECT"), (":authority", authority)], end=False))
            assert c.response(sid).status == 502
    record = rebinding.wait_record(lambda r: name in r["target"])
    assert record["rule"] == "clients" and "127.0.0.2" in record["error"], record
    assert a_queries(nameserver, name) == 1                          # one answer, checked and dialled
    assert tripwire.count == 0


# --- the appliance's own listeners: a forwarding loop -------------------------------------------

@pytest.fixture(scope="module")
def open_to_loopback(tmp_path_factory):
    """Rules that let loopback clients reach anything, loopback included: only the built-in
    loop refusal stands between a request for one of our own ports and a self-connection."""
    socks_port, pac_port, dns_port = free_ports(3)
    app = Appliance(tmp_path_factory.mktemp("loop"), rules=(
        '[[rule]]\nname = "anything"\naction = "allow"\nsrc = ["127.0.0.0/8", "::1"]\n'),
        more_listeners=f'socks5 = "127.0.0.1:{socks_port}"\npac = "127.0.0.1:{pac_port}"\n'
                       f'dns = "127.0.0.1:{dns_port}"').start()
    app.socks_port = socks_port
    app.own_ports = {"http": app.http_port, "https": app.https_port, "socks5": socks_port,
                     "pac": pac_port, "dns": dns_port, "admin": app.admin_port}
    try:
        yield app
    finally:
        app.stop()


@pytest.mark.parametrize("listener", ["http", "https", "socks5", "pac", "dns", "admin"])
@pytest.mark.parametrize("host", ["127.0.0.1", "[::ffff:127.0.0.1]", "localhost"])
def test_a_request_for_our_own_listener_is_refused_as_a_loop(open_to_loopback, listener, host):
    app = open_to_loopback
    before = len(app.records())
    every_front_end_refuses(app, host, app.own_ports[listener], FORWARDING_LOOP, app.socks_port)
    # exactly the 7 records of the test's own requests: the appliance never became its own client
    assert len(app.wait_records(before + 8, timeout=0.5)) == before + 7


# --- CONNECT ports -----------------------------------------------------------------------------

def test_connect_is_bound_to_connect_ports(make_appliance, origin, tripwire):
    origin_port = int(origin.rsplit(":", 1)[1])
    socks_port = free_port()
    app = make_appliance(extra=f"[policy]\nconnect_ports = [443, {origin_port}]\n",
                         more_listeners=f'socks5 = "127.0.0.1:{socks_port}"')
    before = len(refused_records(app))
    authority = f"127.0.0.1:{tripwire.port}"
    tunnel = curl("-p", "-o", "/dev/null", "-x", app.proxy, f"http://{authority}/")
    assert tunnel.returncode != 0 and b"403" in tunnel.stderr, tunnel
    with H2RawClient(app.https_port, app.ca_path) as c:
        sid = c.request([(":method", "CONNECT"), (":authority", authority)], end=False)
        assert c.response(sid).status == 403
    expect_refusals(app, before, CONNECT_PORT, 2)
    assert tripwire.count == 0
    # a listed port tunnels; SOCKS5 and plain requests are not bound to connect_ports
    assert curl("-p", "-o", "/dev/null", "-w", "%{http_code}", "-x", app.proxy, f"{origin}/echo").stdout == b"200"
    reply = socks5_reply(socks_port, 1, socket.inet_aton("127.0.0.1"), tripwire.port)
    assert reply == b"\x05\x00"
    for _ in range(100):
        if tripwire.count:
            break
        time.sleep(0.05)
    assert tripwire.count == 1
    tripwire.count = 0


# --- the packaged config, as installed -----------------------------------------------------------

def packaged_appliance(workdir) -> Appliance:
    """packaging/appliance.toml with only its listener addresses, state_dir and access_log
    rewritten to the test's ports and folder (IPv4 loopback; its [::] twins dropped)."""
    app = Appliance(workdir)
    app.socks_port, app.pac_port = free_ports(2)
    ports = {"http": app.http_port, "https": app.https_port, "socks5": app.socks_port,
             "pac": app.pac_port, "admin": app.admin_port}
    text = PACKAGED.read_text()
    for key, port in ports.items():
        text, n = re.subn(rf"(?m)^{key} = .*?(\s+#|$)", rf'{key} = "127.0.0.1:{port}"\1', text, count=1)
        assert n == 1, key
    text, n = re.subn(r'(?m)^state_dir = "[^"]*"', 'state_dir = "var"', text)
    assert n == 1
    text, n = re.subn(r'(?m)^access_log = "[^"]*"', 'access_log = "access.log"', text)
    assert n == 1
    app.config_path.write_text(text)
    return app.start()


def diagnostic(app: Appliance, *parts: str) -> bool:
    """Whether the appliance's diagnostics (level info, as packaged) say a line with `parts`."""
    for _ in range(100):
        if any(all(p in line for p in parts) for line in app.proc.output().splitlines()):
            return True
        time.sleep(0.05)
    return False


def test_the_packaged_config_is_not_an_open_proxy(tmp_path, tripwire):
    app = packaged_appliance(tmp_path / "packaged")
    try:
        outside = "http://198.51.100.7/"                  # TEST-NET-2: refused, so never dialled
        for source in ("127.0.0.1", "127.0.0.2"):         # outside the packaged src networks
            r = curl("--interface", source, "-o", "/dev/null", "-w", "%{http_code}", "-x", app.proxy, outside)
            assert r.stdout == b"403", (source, r)
            r = curl("--interface", source, "-p", "-o", "/dev/null", "-x", app.proxy, "https://198.51.100.7/")
            assert r.returncode != 0 and b"403" in r.stderr, (source, r)
            with H2RawClient(app.https_port, app.ca_path) as c:
                assert c.response(c.get(outside)).status == 403
            assert socks5_reply(app.socks_port, 1, socket.inet_aton("198.51.100.7"), 80) == b"\x05\x02"
        for host, rule in [("127.0.0.1", "the box itself"), ("localhost", "the box itself"),
                           ("169.254.169.254", "link-local"), ("[fd00:ec2::254]", "cloud metadata"),
                           ("100.100.100.200", "cloud metadata"), ("0.0.0.0", "the box itself")]:
            r = curl("-g", "-o", "/dev/null", "-w", "%{http_code}", "-x", app.proxy,
                     f"http://{host}:{tripwire.port}/")
            assert r.stdout == b"403", (host, r)
            assert diagnostic(app, f"http://{host}:{tripwire.port}/ 403", f"denied: {rule}"), (host, rule)
        assert tripwire.count == 0
        for _ in range(100):                                  # Squid's format, as packaged
            lines = app.access_log.read_text().splitlines() if app.access_log.exists() else []
            denied = [line for line in lines if " TCP_DENIED/403 " in line]
            if len(denied) >= 2 * 4 + 6:
                break
            time.sleep(0.05)
        assert len(denied) == 2 * 4 + 6, lines
        assert {line.split()[2] for line in denied} == {"127.0.0.1", "127.0.0.2"}
    finally:
        app.stop()
