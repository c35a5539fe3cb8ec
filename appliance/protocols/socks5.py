"""SOCKS5 (RFC 1928) with username/password authentication (RFC 1929), sans-I/O.

The SOCKS5 frontend (`frontends/socks5.py`) feeds the bytes a client sent and gets back what
was asked, or `None` while a message is still incomplete; every refusal is a `Socks5Error` that
says which reply code the client gets (or that the connection is simply closed, when the client
does not speak SOCKS5 at all). UDP ASSOCIATE datagrams are read and written here too.

Nothing here touches a socket or resolves a name: a domain name stays a name for the appliance
to resolve (so clients can use `socks5h`), and is checked to be one.
"""

from __future__ import annotations

import ipaddress
import re
import struct
from dataclasses import dataclass

VERSION = 5
AUTH_VERSION = 1                      # RFC 1929 sub-negotiation

METHOD_NO_AUTH = 0x00
METHOD_USERPASS = 0x02
METHOD_NONE_ACCEPTABLE = 0xFF

CMD_CONNECT, CMD_BIND, CMD_UDP_ASSOCIATE = 1, 2, 3
ATYP_IPV4, ATYP_DOMAIN, ATYP_IPV6 = 1, 3, 4

REP_SUCCEEDED = 0x00
REP_GENERAL_FAILURE = 0x01
REP_NOT_ALLOWED = 0x02               # "connection not allowed by ruleset"
REP_NETWORK_UNREACHABLE = 0x03
REP_HOST_UNREACHABLE = 0x04
REP_CONNECTION_REFUSED = 0x05
REP_TTL_EXPIRED = 0x06               # what SOCKS5 has for a timeout
REP_COMMAND_NOT_SUPPORTED = 0x07
REP_ADDRESS_TYPE_NOT_SUPPORTED = 0x08

REPLY_NAMES = {
    REP_SUCCEEDED: "succeeded", REP_GENERAL_FAILURE: "general failure",
    REP_NOT_ALLOWED: "not allowed by ruleset", REP_NETWORK_UNREACHABLE: "network unreachable",
    REP_HOST_UNREACHABLE: "host unreachable", REP_CONNECTION_REFUSED: "connection refused",
    REP_TTL_EXPIRED: "TTL expired", REP_COMMAND_NOT_SUPPORTED: "command not supported",
    REP_ADDRESS_TYPE_NOT_SUPPORTED: "address type not supported",
}

_HOSTNAME = re.compile(r"(?=.{1,253}\Z)[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,62})(?:\.[A-Za-z0-9_-]{1,63})*\.?")


class Socks5Error(Exception):
    """The client broke the protocol or asked for something refused.

    `reply`: the REP code to answer a request with; None when there is no request to answer
    (a greeting or sub-negotiation went wrong) and the connection is closed instead, after
    `answer` (bytes, possibly empty) is sent.
    """

    def __init__(self, message: str, reply: int | None = None, answer: bytes = b"") -> None:
        super().__init__(message)
        self.reply = reply
        self.answer = answer


@dataclass(frozen=True)
class Greeting:
    methods: tuple[int, ...]


@dataclass(frozen=True)
class Credentials:
    username: str
    password: str


@dataclass(frozen=True)
class Request:
    command: int
    host: str                         # an IP address (IPv6 without brackets) or a domain name
    port: int
    address_type: int


@dataclass(frozen=True)
class Datagram:
    host: str
    port: int
    address_type: int
    data: bytes


# --- greeting (RFC 1928 §3) -------------------------------------------------------------------

def parse_greeting(data: bytes) -> tuple[Greeting, int] | None:
    """VER NMETHODS METHODS...; (greeting, bytes used) or None if incomplete."""
    if not data:
        return None
    if data[0] != VERSION:
        raise Socks5Error(f"not SOCKS5: version byte {data[0]:#04x}")
    if len(data) < 2:
        return None
    count = data[1]
    if count == 0:
        raise Socks5Error("greeting offers no authentication method",
                          answer=method_selection(METHOD_NONE_ACCEPTABLE))
    if len(data) < 2 + count:
        return None
    return Greeting(tuple(data[2:2 + count])), 2 + count


def method_selection(method: int) -> bytes:
    return bytes([VERSION, method])


def choose_method(greeting: Greeting, auth_required: bool) -> int:
    """Username/password when the appliance has users (never no-auth then), else no-auth."""
    wanted = METHOD_USERPASS if auth_required else METHOD_NO_AUTH
    return wanted if wanted in greeting.methods else METHOD_NONE_ACCEPTABLE


# --- username/password (RFC 1929 §2) ----------------------------------------------------------

def parse_credentials(data: bytes) -> tuple[Credentials, int] | None:
    """VER ULEN UNAME PLEN PASSWD; (credentials, bytes used) or None if incomplete."""
    if not data:
        return None
    if data[0] != AUTH_VERSION:
        raise Socks5Error(f"username/password sub-negotiation version {data[0]:#04x}, not 1",
                          answer=auth_reply(False))
    if len(data) < 2:
        return None
    ulen = data[1]
    if len(data) < 3 + ulen:
        return None
    plen = data[2 + ulen]
    end = 3 + ulen + plen
    if len(data) < end:
        return None
    if ulen == 0:
        raise Socks5Error("empty user name", answer=auth_reply(False))
    try:
        username = data[2:2 + ulen].decode("utf-8")
        password = data[3 + ulen:end].decode("utf-8")
    except UnicodeDecodeError:
        raise Socks5Error("user name or password is not UTF-8", answer=auth_reply(False)) from None
    return Credentials(username, password), end


def auth_reply(ok: bool) -> bytes:
    return bytes([AUTH_VERSION, 0 if ok else 1])


# --- requests and replies (RFC 1928 §4, §6) ---------------------------------------------------

def _address(data: bytes, offset: int, what: str) -> tuple[int, str, int, int] | None:
    """(type, host, port, end) of ATYP ADDR PORT at `offset`, or None if incomplete."""
    if len(data) <= offset:
        return None
    atyp = data[offset]
    if atyp == ATYP_IPV4:
        end = offset + 1 + 4
        host = str(ipaddress.IPv4Address(data[offset + 1:end])) if len(data) >= end else None
    elif atyp == ATYP_IPV6:
        end = offset + 1 + 16
        host = str(ipaddress.IPv6Address(data[offset + 1:end])) if len(data) >= end else None
    elif atyp == ATYP_DOMAIN:
        if len(data) <= offset + 1:
            return None
        length = data[offset + 1]
        if length == 0:
            raise Socks5Error(f"{what}: empty domain name", REP_HOST_UNREACHABLE)
        end = offset + 2 + length
        host = _domain(data[offset + 2:end], what) if len(data) >= end else None
    else:
        raise Socks5Error(f"{what}: unknown address type {atyp:#04x}", REP_ADDRESS_TYPE_NOT_SUPPORTED)
    if host is None or len(data) < end + 2:
        return None
    return atyp, host, struct.unpack_from("!H", data, end)[0], end + 2


def _domain(raw: bytes, what: str) -> str:
    try:
        name = raw.decode("ascii")
    except UnicodeDecodeError:
        raise Socks5Error(f"{what}: domain name is not ASCII", REP_HOST_UNREACHABLE) from None
    if not _HOSTNAME.fullmatch(name):
        raise Socks5Error(f"{what}: {name[:80]!r} is not a host name", REP_HOST_UNREACHABLE)
    try:                                   # "127.0.0.1" sent as a name is still that address
        return str(ipaddress.ip_address(name))
    except ValueError:
        return name.rstrip(".").lower()


def parse_request(data: bytes) -> tuple[Request, int] | None:
    """VER CMD RSV ATYP DST.ADDR DST.PORT; (request, bytes used) or None if incomplete."""
    if not data:
        return None
    if data[0] != VERSION:
        raise Socks5Error(f"request version byte {data[0]:#04x}, not 5", REP_GENERAL_FAILURE)
    if len(data) < 4:
        return None
    command = data[1]
    if data[2] != 0:
        raise Socks5Error(f"reserved byte {data[2]:#04x} is not zero", REP_GENERAL_FAILURE)
    found = _address(data, 3, "request")
    if found is None:
        return None
    atyp, host, port, end = found
    if command not in (CMD_CONNECT, CMD_BIND, CMD_UDP_ASSOCIATE):
        raise Socks5Error(f"unknown command {command:#04x}", REP_COMMAND_NOT_SUPPORTED)
    return Request(command, host, port, atyp), end


def _encode_address(host: str, port: int) -> bytes:
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        raw = host.encode("ascii")
        if not 0 < len(raw) < 256:
            raise ValueError(f"cannot encode {host!r} as a SOCKS5 address") from None
        return bytes([ATYP_DOMAIN, len(raw)]) + raw + struct.pack("!H", port)
    atyp = ATYP_IPV4 if address.version == 4 else ATYP_IPV6
    return bytes([atyp]) + address.packed + struct.pack("!H", port)


def reply(code: int, host: str = "0.0.0.0", port: int = 0) -> bytes:
    """VER REP RSV ATYP BND.ADDR BND.PORT."""
    return bytes([VERSION, code, 0]) + _encode_address(host, port)


# --- UDP ASSOCIATE datagrams (RFC 1928 §7) ----------------------------------------------------

def parse_datagram(data: bytes) -> Datagram:
    """RSV(2) FRAG ATYP DST.ADDR DST.PORT DATA. Fragments are refused (FRAG != 0)."""
    if len(data) < 4:
        raise Socks5Error("datagram shorter than its header")
    if data[0:2] != b"\0\0":
        raise Socks5Error("datagram reserved bytes are not zero")
    if data[2] != 0:
        raise Socks5Error(f"fragmented datagram (FRAG {data[2]}) refused")
    found = _address(data, 3, "datagram")
    if found is None:
        raise Socks5Error("datagram header truncated")
    atyp, host, port, end = found
    return Datagram(host, port, atyp, data[end:])


def build_datagram(host: str, port: int, data: bytes) -> bytes:
    return b"\0\0\0" + _encode_address(host, port) + data
