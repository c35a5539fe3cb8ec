"""Destination policy on the address actually dialled (hostile-input suite, group 4, a start):
loopback, "this host", link-local and metadata addresses in every spelling a client might try,
through the HTTP/1.1 proxy (absolute-form), CONNECT, and SOCKS5 with a name (socks5h) and with
each address type. A rule denying those networks must hold, and the origin on loopback must
never see a request."""

from __future__ import annotations

import json
import socket
import struct
import urllib.request

import pytest

from .conftest import curl, free_port

RULES = """
[[rule]]
name = "the box itself"
action = "deny"
dst = ["127.0.0.0/8", "::1", "0.0.0.0/8", "::", "localhost", "169.254.0.0/16", "fe80::/10"]

[[rule]]
name = "clients"
action = "allow"
src = ["127.0.0.0/8", "::1"]
"""

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
