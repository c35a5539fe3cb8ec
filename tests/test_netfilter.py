"""`appliance.netfilter`: the original destination of a redirected connection, from kernel bytes.

The REDIRECT path itself (SO_ORIGINAL_DST on a real conntrack entry) runs in the network
namespaces of tests/e2e/test_transparent.py; here the sockaddr decoding and the refusal of a
connection made to the listener directly.
"""

from __future__ import annotations

import socket
import struct

import pytest

from appliance.netfilter import OriginalDestinationError, original_destination, parse_sockaddr


def sockaddr_in(ip: str, port: int) -> bytes:
    return struct.pack("=H", socket.AF_INET) + struct.pack("!H", port) + socket.inet_aton(ip) + bytes(8)


def sockaddr_in6(ip: str, port: int) -> bytes:
    return (struct.pack("=H", socket.AF_INET6) + struct.pack("!H", port) + bytes(4)
            + socket.inet_pton(socket.AF_INET6, ip) + bytes(4))


def test_ipv4_sockaddr():
    assert parse_sockaddr(sockaddr_in("198.51.100.10", 443)) == ("198.51.100.10", 443)


def test_ipv6_sockaddr():
    assert parse_sockaddr(sockaddr_in6("2001:db8:3::10", 80)) == ("2001:db8:3::10", 80)


@pytest.mark.parametrize("raw", [b"", b"\x02\x00", sockaddr_in6("::1", 1)[:20],
                                 struct.pack("=H", 99) + bytes(14)])
def test_short_or_foreign_sockaddr_is_an_error(raw):
    with pytest.raises(OriginalDestinationError):
        parse_sockaddr(raw)


@pytest.mark.parametrize("family, host", [(socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")])
def test_direct_connection_is_refused(family, host):
    """No REDIRECT happened: without conntrack's record the appliance would dial itself."""
    with socket.socket(family) as listener:
        listener.bind((host, 0))
        listener.listen()
        with socket.create_connection(listener.getsockname()[:2]):
            accepted, _ = listener.accept()
            with accepted, pytest.raises(OriginalDestinationError, match="directly"):
                original_destination(accepted, listener.getsockname()[:2])


def test_tproxy_local_address_is_the_destination():
    """Under TPROXY the accepted socket keeps the address the client dialled: a listener on
    the wildcard address that accepted a connection to another local port saw no rewrite."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        with socket.create_connection(("127.0.0.1", port)):
            accepted, _ = listener.accept()
            with accepted:
                # as if the listener were bound to port+1 and TPROXY handed it this connection
                assert original_destination(accepted, ("0.0.0.0", port + 1)) == ("127.0.0.1", port)
