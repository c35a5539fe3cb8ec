"""Peek at a TLS ClientHello without terminating TLS (RFC 8446 §4.1.2, §5.1, RFC 6066, RFC 7301).

Sans-I/O: the transparent-interception frontend reads the first bytes of an intercepted
connection and re-calls `read_client_hello` with the grown buffer until it gets a `ClientHello`
(route on its SNI, then splice the buffered bytes upstream or hand them to the TLS terminator),
`NotTls` (plain HTTP or something else: fall back), or `MalformedHello` (answer with the TLS alert
it carries and close). Nothing here touches a socket, the ssl module or the clock.

Why hand-written: mitmproxy parses with a kaitaistruct spec and dpkt neither reassembles a hello
split over records nor checks the inner lengths (DESIGN.md, ecosystem notes B5). Like mitmproxy's
`get_client_hello`, the handshake message is reassembled from consecutive handshake records,
since a large hello (post-quantum key shares, many extensions) may span several records and any
record may arrive split over TCP segments.

Everything is bounded: at most `max_bytes` are looked at, and every length is checked against the
bytes that enclose it, so a lie in any length field is a `MalformedHello`, never an IndexError.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

CONTENT_HANDSHAKE = 22
HANDSHAKE_CLIENT_HELLO = 1
MAX_RECORD = 2 ** 14                    # RFC 8446 §5.1: TLSPlaintext.length
EXT_SERVER_NAME, EXT_ALPN, EXT_SUPPORTED_VERSIONS = 0, 16, 43

# TLS alert descriptions (RFC 8446 §6) a caller may send when it refuses a hello.
ALERT_UNEXPECTED_MESSAGE, ALERT_RECORD_OVERFLOW = 10, 22
ALERT_ILLEGAL_PARAMETER, ALERT_DECODE_ERROR = 47, 50
ALERT_HANDSHAKE_FAILURE, ALERT_ACCESS_DENIED, ALERT_INTERNAL_ERROR = 40, 49, 80
CONTENT_ALERT, ALERT_LEVEL_FATAL = 21, 2

# A DNS host name label as SNI carries it (RFC 6066 §3: ASCII, no trailing dot; IDNA A-labels are
# plain LDH). Underscores are let through: real clients send them for internal names.
_LABEL = re.compile(rb"(?!-)[A-Za-z0-9_-]{1,63}(?<!-)")


@dataclass(frozen=True)
class ClientHello:
    sni: str | None                     # server_name host_name, lower-cased ASCII; None if absent
    alpn: tuple[str, ...]               # protocols offered, in order (latin-1 decoded)
    legacy_version: int                 # e.g. 0x0303
    supported_versions: tuple[int, ...]  # empty when the extension is absent (TLS <= 1.2)


class NotTls(Exception):
    """The bytes cannot start a TLS handshake record (e.g. plain HTTP): the caller falls back."""


class MalformedHello(Exception):
    """TLS, but the ClientHello is broken or too large; `alert` is the TLS alert to answer with."""

    def __init__(self, message: str, alert: int = ALERT_DECODE_ERROR) -> None:
        super().__init__(message)
        self.alert = alert


def alert_record(description: int) -> bytes:
    """A fatal TLS alert in plaintext, as a server sends it before any handshake message
    (RFC 8446 §6, §5.1: legacy record version 0x0303)."""
    return bytes([CONTENT_ALERT, 3, 3, 0, 2, ALERT_LEVEL_FATAL, description])


def read_client_hello(data: bytes, max_bytes: int = 16384 * 4) -> ClientHello | None:
    """The ClientHello at the start of `data`, or None if more bytes are needed.

    Bytes after the records that carry the hello (early data, a second flight) are ignored.
    """
    _check_record_magic(data)
    # The first record starts with the handshake header: refuse early, before its record is in,
    # and in the order the bytes come (the record's length before the header inside it), so the
    # answer never depends on how the bytes were split.
    if len(data) >= 5:
        _check_record_length(_u16(data, 3))
        _check_handshake_header(data[5:5 + min(4, _u16(data, 3))], max_bytes)
    fragments, end = _handshake_fragments(memoryview(data), max_bytes)
    if end > max_bytes:
        raise MalformedHello(f"no complete ClientHello in {max_bytes} bytes", ALERT_RECORD_OVERFLOW)
    header = _first_bytes(fragments, 4)
    if len(header) < 4:
        return None
    need = _check_handshake_header(header, max_bytes)
    have = sum(len(f) for f in fragments)
    if have < need:
        return None
    if have > need:
        # RFC 8446 §5.1: the hello must end on a record boundary (a key change may follow).
        raise MalformedHello("data after the ClientHello in its last record")
    return _parse_body(b"".join(fragments)[4:])


def _check_record_magic(data: bytes) -> None:
    # Content type handshake, then a record version 3.x (SSL 3.0 .. TLS 1.3 legacy values); an
    # SSLv2-style hello (high bit set) is not accepted.
    if len(data) >= 1 and data[0] != CONTENT_HANDSHAKE:
        raise NotTls("first byte is not a TLS handshake record")
    if len(data) >= 2 and data[1] != 3:
        raise NotTls("record version major is not 3")
    if len(data) >= 3 and data[2] > 4:
        raise NotTls("record version minor is out of range")


def _check_record_length(length: int) -> None:
    if length == 0:
        raise MalformedHello("zero-length handshake record")   # RFC 8446 §5.1
    if length > MAX_RECORD:
        raise MalformedHello(f"record of {length} bytes", ALERT_RECORD_OVERFLOW)


def _check_handshake_header(header: bytes, max_bytes: int) -> int:
    """The whole message's length, from the (maybe partial) 4-byte handshake header."""
    if header and header[0] != HANDSHAKE_CLIENT_HELLO:
        raise MalformedHello(f"handshake type {header[0]} is not client_hello",
                             ALERT_UNEXPECTED_MESSAGE)
    need = 4 + int.from_bytes(header[1:4], "big")
    if len(header) == 4 and need > max_bytes:
        raise MalformedHello(f"ClientHello of {need} bytes exceeds {max_bytes}",
                             ALERT_RECORD_OVERFLOW)
    return need


def _handshake_fragments(view: memoryview, max_bytes: int) -> tuple[list[memoryview], int]:
    """The complete handshake records' fragments from the start, and the least offset at which
    the records the hello needs can end (so the caller can refuse at once what cannot fit).

    Stops once the fragments hold the whole hello its header announces, at a record that is not
    all there yet, or past `max_bytes`. Slices of `view`: nothing is copied, so re-calling on a
    growing buffer is cheap.
    """
    fragments: list[memoryview] = []
    offset, have, need = 0, 0, None
    while offset + 5 <= len(view) and offset <= max_bytes and (need is None or have < need):
        content_type, major, length = view[offset], view[offset + 1], _u16(view, offset + 3)
        if content_type != CONTENT_HANDSHAKE or major != 3:
            raise MalformedHello(f"record of type {content_type} inside the ClientHello",
                                 ALERT_UNEXPECTED_MESSAGE)
        _check_record_length(length)
        if offset + 5 + length > len(view):
            return fragments, offset + 5 + length
        fragments.append(view[offset + 5:offset + 5 + length])
        have += length
        offset += 5 + length
        if need is None and have >= 4:         # refused here, before any later record is read
            need = _check_handshake_header(_first_bytes(fragments, 4), max_bytes)
    complete = need is not None and have >= need
    return fragments, offset if complete else offset + 6     # a next record has >= 1 byte


def _first_bytes(fragments: list[memoryview], n: int) -> bytes:
    out = b""
    for fragment in fragments:
        if len(out) >= n:
            break
        out += bytes(fragment[:n - len(out)])
    return out


def _u16(buf, offset: int) -> int:
    return buf[offset] << 8 | buf[offset + 1]


class _Reader:
    """Bounds-checked reads over one length-delimited structure."""

    def __init__(self, data: bytes, what: str) -> None:
        self.data, self.pos, self.what = data, 0, what

    def take(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise MalformedHello(f"{self.what}: length runs past its enclosing structure")
        out = self.data[self.pos:self.pos + n]
        self.pos += n
        return out

    def u8(self) -> int:
        return self.take(1)[0]

    def u16(self) -> int:
        return int.from_bytes(self.take(2), "big")

    def vector(self, length_bytes: int, lo: int, hi: int, what: str) -> bytes:
        n = int.from_bytes(self.take(length_bytes), "big")
        if not lo <= n <= hi:
            raise MalformedHello(f"{what} length {n} outside {lo}..{hi}")
        return self.take(n)

    def done(self) -> bool:
        return self.pos == len(self.data)

    def expect_end(self) -> None:
        if not self.done():
            raise MalformedHello(f"{self.what}: {len(self.data) - self.pos} bytes left over")


def _parse_body(body: bytes) -> ClientHello:
    r = _Reader(body, "ClientHello")
    legacy_version = r.u16()
    if legacy_version >> 8 != 3:
        raise MalformedHello(f"legacy_version {legacy_version:#06x}", ALERT_ILLEGAL_PARAMETER)
    r.take(32)                                              # random
    r.vector(1, 0, 32, "legacy_session_id")
    suites = r.vector(2, 2, 2 ** 16 - 2, "cipher_suites")
    if len(suites) % 2:
        raise MalformedHello("cipher_suites of odd length")
    r.vector(1, 1, 255, "legacy_compression_methods")
    extensions: dict[int, bytes] = {}
    if not r.done():                                        # pre-TLS 1.2 hellos may omit them
        ext = _Reader(r.vector(2, 0, 2 ** 16 - 1, "extensions"), "extensions")
        r.expect_end()
        while not ext.done():
            ext_type, ext_data = ext.u16(), ext.vector(2, 0, 2 ** 16 - 1, "extension_data")
            if ext_type in extensions:                      # RFC 8446 §4.2
                raise MalformedHello(f"duplicate extension {ext_type}", ALERT_ILLEGAL_PARAMETER)
            extensions[ext_type] = ext_data
    return ClientHello(
        sni=_server_name(extensions[EXT_SERVER_NAME]) if EXT_SERVER_NAME in extensions else None,
        alpn=_alpn(extensions[EXT_ALPN]) if EXT_ALPN in extensions else (),
        legacy_version=legacy_version,
        supported_versions=(_supported_versions(extensions[EXT_SUPPORTED_VERSIONS])
                            if EXT_SUPPORTED_VERSIONS in extensions else ()),
    )


def _server_name(data: bytes) -> str | None:
    # RFC 6066 §3: ServerNameList <1..2^16-1> of (NameType, opaque HostName<1..2^16-1>); at most
    # one name per type. Only host_name (0) is defined; others are skipped by their length.
    outer = _Reader(data, "server_name")
    names = _Reader(outer.vector(2, 1, 2 ** 16 - 1, "server_name_list"), "server_name_list")
    outer.expect_end()
    seen: dict[int, bytes] = {}
    while not names.done():
        name_type, name = names.u8(), names.vector(2, 1, 2 ** 16 - 1, "server name")
        if name_type in seen:
            raise MalformedHello(f"two server names of type {name_type}", ALERT_ILLEGAL_PARAMETER)
        seen[name_type] = name
    host = seen.get(0)
    return None if host is None else _host_name(host)


def _host_name(name: bytes) -> str:
    labels = name.split(b".")
    if len(name) > 253 or not all(_LABEL.fullmatch(label) for label in labels):
        raise MalformedHello(f"server name {name[:80]!r} is not an ASCII DNS name",
                             ALERT_ILLEGAL_PARAMETER)
    return name.decode("ascii").lower()


def _alpn(data: bytes) -> tuple[str, ...]:
    # RFC 7301 §3.1: ProtocolNameList <2..2^16-1> of ProtocolName <1..2^8-1>. Names are opaque
    # bytes; latin-1 maps them one to one, and every registered name is ASCII anyway.
    outer = _Reader(data, "alpn")
    names = _Reader(outer.vector(2, 2, 2 ** 16 - 1, "protocol_name_list"), "protocol_name_list")
    outer.expect_end()
    protocols = []
    while not names.done():
        protocols.append(names.vector(1, 1, 255, "protocol name").decode("latin-1"))
    return tuple(protocols)


def _supported_versions(data: bytes) -> tuple[int, ...]:
    # RFC 8446 §4.2.1: ProtocolVersion versions<2..254> in a ClientHello.
    outer = _Reader(data, "supported_versions")
    versions = outer.vector(1, 2, 254, "supported_versions")
    outer.expect_end()
    if len(versions) % 2:
        raise MalformedHello("supported_versions of odd length")
    return tuple(int.from_bytes(versions[i:i + 2], "big") for i in range(0, len(versions), 2))
