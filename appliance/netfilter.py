"""Where an intercepted connection was going: the original destination under REDIRECT or TPROXY.

Sits at the very start of the transparent listeners' data path (`frontends/transparent.py`).
With iptables `REDIRECT` (nat table) the kernel rewrote the destination to our listener and
keeps the original in conntrack, which `getsockopt(SO_ORIGINAL_DST)` returns as a `sockaddr_in`
(IPv4, `SOL_IP`) or `sockaddr_in6` (IPv6, `SOL_IPV6`, `IP6T_SO_ORIGINAL_DST`). With `TPROXY`
(mangle table) nothing was rewritten: the accepted socket's own address is the original
destination, and the listening socket needs `IP_TRANSPARENT` to accept such connections.

A connection made to the listener's own address directly (not redirected) would make the
appliance dial itself: `OriginalDestinationError` says so and the frontend refuses it.
"""

from __future__ import annotations

import ipaddress
import socket as _stdlib_socket
import struct

SO_ORIGINAL_DST = 80         # linux/netfilter_ipv4.h
IP6T_SO_ORIGINAL_DST = 80    # linux/netfilter_ipv6/ip6_tables.h
IP_TRANSPARENT = 19          # linux/in.h
IPV6_TRANSPARENT = 75        # linux/in6.h
SOL_IPV6 = getattr(_stdlib_socket, "SOL_IPV6", 41)


class OriginalDestinationError(Exception):
    """The original destination cannot be known (not redirected, or conntrack lost it)."""


def parse_sockaddr(raw: bytes) -> tuple[str, int]:
    """(address, port) of a `struct sockaddr_in` or `sockaddr_in6` as the kernel returns it."""
    if len(raw) < 8:
        raise OriginalDestinationError(f"sockaddr of {len(raw)} bytes is too short")
    family = struct.unpack_from("=H", raw)[0]
    port = struct.unpack_from("!H", raw, 2)[0]
    if family == _stdlib_socket.AF_INET and len(raw) >= 8:
        return str(ipaddress.IPv4Address(raw[4:8])), port
    if family == _stdlib_socket.AF_INET6 and len(raw) >= 24:
        return str(ipaddress.IPv6Address(raw[8:24])), port
    raise OriginalDestinationError(f"unexpected address family {family} in sockaddr")


def original_destination(sock, listening: tuple[str, int]) -> tuple[str, int]:
    """The destination the client dialled, for a socket accepted on `listening` (host, port).

    TPROXY first: a local address other than the listener's is the original one. Otherwise
    conntrack's record of the REDIRECT. Raises OriginalDestinationError for a direct connection.
    """
    local = sock.getsockname()
    local_host, local_port = _plain(local[0]), local[1]
    listen_host, listen_port = _plain(listening[0]), listening[1]
    if local_port != listen_port or (not _unspecified(listen_host) and local_host != listen_host):
        return local_host, local_port                      # TPROXY: nothing was rewritten
    v6 = sock.family == _stdlib_socket.AF_INET6
    try:
        if v6:
            raw = sock.getsockopt(SOL_IPV6, IP6T_SO_ORIGINAL_DST, 28)
        else:
            raw = sock.getsockopt(_stdlib_socket.SOL_IP, SO_ORIGINAL_DST, 16)
    except OSError as exc:
        raise OriginalDestinationError(
            f"no original destination ({exc.strerror or exc}): the connection was made to the "
            f"listener directly, not redirected by iptables") from None
    host, port = parse_sockaddr(raw)
    host = _plain(host)
    if (host, port) == (local_host, local_port):
        raise OriginalDestinationError("the connection was made to the listener directly, not redirected")
    return host, port


def allow_tproxy(sock) -> bool:
    """Set IP(V6)_TRANSPARENT on a listening socket so TPROXY can hand it foreign addresses.

    Needs CAP_NET_ADMIN; without it REDIRECT still works, so failure is only reported.
    """
    try:
        if sock.family == _stdlib_socket.AF_INET6:
            sock.setsockopt(SOL_IPV6, IPV6_TRANSPARENT, 1)
        else:
            sock.setsockopt(_stdlib_socket.SOL_IP, IP_TRANSPARENT, 1)
    except OSError:
        return False
    return True


def _plain(host: str) -> str:
    """An address without scope id, with IPv4-mapped IPv6 shown as IPv4."""
    address = ipaddress.ip_address(host.split("%", 1)[0])
    if address.version == 6 and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return str(address)


def _unspecified(host: str) -> bool:
    return ipaddress.ip_address(host).is_unspecified
