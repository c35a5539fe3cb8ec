"""HTTP/2 request and response header blocks mapped to and from HTTP/1.1 (RFC 9113 §8, RFC 8441).

Sans-I/O: the HTTP/2 frontend hands over the header block h2 decoded (h2 runs with
`header_encoding=None, validate_inbound_headers=False`, so a block is a list of (bytes, bytes)
pairs; str pairs are accepted too and read as latin-1 text) and gets an `H2Request` back, then
asks here for the HTTP/1.1 head to write to the origin and for the HTTP/2 blocks to answer with.

Why we validate ourselves: h2 before 4.4 rejects an ordinary CONNECT, so inbound validation is
off for every version, and h2 4.1 never checked much of RFC 9113 §8.2 anyway (CVE-2025-57804:
CR/LF and connection-specific fields pass through). Everything accepted here is written to an
HTTP/1.1 origin, so the rules are those of a safe downgrade: nothing that `http1.serialize_head`
would refuse or an HTTP/1.1 parser would read differently (no CTLs in values, no framing
fields but one agreeing Content-Length, one Host that matches :authority).

Errors: `StreamError` is a malformed request (RFC 9113 §8.1.1); the frontend resets the stream
with PROTOCOL_ERROR, or answers `status` where that is more useful (501 for an unsupported
:protocol or :scheme). `UpstreamHandshakeError` is an origin that did not switch to WebSocket.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
from dataclasses import dataclass
from typing import Iterable

from .forwarding import DEFAULT_PORTS, Target, parse_authority, strip_hop_by_hop, via_value
from .http1 import (
    Headers,
    LocalProtocolError,
    RemoteProtocolError,
    connection_tokens,
    header_value,
    header_values,
    request_line,
)

__all__ = [
    "H2Request", "StreamError", "UpstreamHandshakeError", "DataLengthCheck",
    "parse_request_block", "parse_trailer_block", "http1_request_head", "h2_response_block",
    "h2_trailer_block", "h2_informational_allowed", "block_bytes", "h2_via",
    "websocket_http1_request", "websocket_accept", "is_websocket_key", "check_websocket_switch",
    "websocket_h2_response",
]

REQUEST_PSEUDO = frozenset({":method", ":scheme", ":authority", ":path", ":protocol"})
# RFC 9113 §8.2.2: a message carrying these is malformed (`te` is allowed as "trailers" only).
CONNECTION_SPECIFIC = frozenset({"connection", "keep-alive", "proxy-connection",
                                 "transfer-encoding", "upgrade"})
SUPPORTED_PROTOCOLS = frozenset({"websocket"})
WEBSOCKET_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
# The version in a Via entry is the protocol version received (RFC 9110 §7.6.3); HTTP/2's is "2".
H2_VIA_VERSION = "2"

_NAME = re.compile(r"[!#$%&'*+\-.^_`|~0-9a-z]+")
_ANY_CASE_NAME = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
# Field values an HTTP/1.1 parser reads back unchanged: VCHAR, obs-text, SP and HTAB inside.
_VALUE = re.compile(r"[\t\x20-\x7e\x80-\xff]*")
_PATH = re.compile(r"[\x21-\x7e]+")
_SCHEME = re.compile(r"[a-z][a-z0-9+.\-]*")
_DIGITS = re.compile(r"[0-9]{1,18}")
_LINE_BREAK_OR_NUL = re.compile(r"[\r\n\0]")


class StreamError(RemoteProtocolError):
    """A malformed HTTP/2 request: reset the stream (PROTOCOL_ERROR), or answer `status`."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message, status)


class UpstreamHandshakeError(RemoteProtocolError):
    """The origin did not accept the WebSocket handshake (RFC 6455 §4.1): answer 502.

    `origin_status` is the status the origin sent; when it is a final non-101 status the
    frontend may pass that response on instead, which RFC 8441 lets a client see as is.
    """

    def __init__(self, message: str, origin_status: int | None = None) -> None:
        super().__init__(message, 502)
        self.origin_status = origin_status


@dataclass(frozen=True)
class H2Request:
    kind: str                 # "request" | "connect" | "websocket"
    method: str
    scheme: str | None        # None for an ordinary CONNECT
    authority: str            # as sent (or the Host field, when :authority was absent)
    path: str | None          # None for an ordinary CONNECT
    protocol: str | None      # the :protocol of an extended CONNECT
    headers: Headers          # regular fields, lowercase names, cookie crumbs joined, in order
    content_length: int | None
    target: Target


# --- reading a header block -----------------------------------------------------------------

def _text(item: object) -> str:
    if isinstance(item, (bytes, bytearray, memoryview)):
        return bytes(item).decode("latin-1")
    if isinstance(item, str):
        if any(ord(c) > 0xFF for c in item):
            raise StreamError(f"field {item[:40]!r} has characters outside latin-1")
        return item
    raise TypeError(f"header block items are bytes or str, not {type(item).__name__}")


def _decode(block: Iterable) -> list[tuple[str, str]]:
    out = []
    for pair in block:
        name, value = pair
        if type(name) is bytes and type(value) is bytes:     # what h2 hands over: the common case
            out.append((name.decode("latin-1"), value.decode("latin-1")))
        else:
            out.append((_text(name), _text(value)))
    return out


def _check_value(name: str, value: str) -> None:
    # RFC 9113 §8.2.1 forbids NUL, CR, LF and edge whitespace; the other CTLs go too, since the
    # HTTP/1.1 side (RFC 9110 §5.5) does not take them either.
    if not _VALUE.fullmatch(value):
        bad = next(c for c in value if not _VALUE.fullmatch(c))
        raise StreamError(f"control character {bad!r} in the value of {name!r}")
    if value[:1] in (" ", "\t") or value[-1:] in (" ", "\t"):
        raise StreamError(f"leading or trailing whitespace in the value of {name!r}")


def _check_name(name: str) -> None:
    if _NAME.fullmatch(name):
        return
    if _ANY_CASE_NAME.fullmatch(name):
        raise StreamError(f"uppercase field name {name!r} (RFC 9113 §8.2.1)")
    raise StreamError(f"invalid field name {name[:40]!r}")


def _split_block(fields: list[tuple[str, str]], allow_pseudo: bool) -> tuple[dict[str, str], list]:
    """Pseudo-header fields (RFC 9113 §8.3) and the regular fields after them."""
    pseudo: dict[str, str] = {}
    regular: list[tuple[str, str]] = []
    for name, value in fields:
        if name.startswith(":"):
            if not allow_pseudo:
                raise StreamError(f"pseudo-header field {name!r} in trailers")
            if regular:
                raise StreamError(f"pseudo-header field {name!r} after a regular field")
            if name == ":status":
                raise StreamError(":status in a request (RFC 9113 §8.3.2 is for responses)")
            if name not in REQUEST_PSEUDO:
                raise StreamError(f"pseudo-header field {name[:40]!r} is not allowed in a request")
            if name in pseudo:
                raise StreamError(f"duplicate {name} pseudo-header field")
            _check_value(name, value)
            pseudo[name] = value
            continue
        _check_name(name)
        _check_value(name, value)
        regular.append((name, value))
    return pseudo, regular


def _check_connection_specific(fields: list[tuple[str, str]]) -> None:
    for name, value in fields:
        if name in CONNECTION_SPECIFIC:
            raise StreamError(f"connection-specific field {name!r} (RFC 9113 §8.2.2)")
        if name == "te" and value.lower() != "trailers":
            raise StreamError(f"te: {value[:40]!r}; only te: trailers is allowed in HTTP/2")


def _content_length(fields: list[tuple[str, str]]) -> int | None:
    values = [value for name, value in fields if name == "content-length"]
    if not values:
        return None
    for value in values:
        if not _DIGITS.fullmatch(value):
            raise StreamError(f"invalid content-length {value[:40]!r}")
    if len({int(v) for v in values}) != 1:
        raise StreamError("conflicting content-length fields")
    return int(values[0])


def _regular_fields(fields: list[tuple[str, str]]) -> Headers:
    """Cookie crumbs joined into one field where the first was (RFC 9113 §8.2.3); one
    content-length kept of agreeing duplicates, so the HTTP/1.1 side sees a single value."""
    # Empty crumbs are skipped: joined they would leave "; " at an end, which HTTP/1.1 trims.
    crumbs = [value for name, value in fields if name == "cookie" and value]
    out: list[tuple[str, str]] = []
    seen_cookie = seen_length = False
    for name, value in fields:
        if name == "cookie":
            if not seen_cookie:
                out.append(("cookie", "; ".join(crumbs)))
            seen_cookie = True
        elif name == "content-length":
            if not seen_length:
                out.append((name, value))
            seen_length = True
        else:
            out.append((name, value))
    return tuple(out)


def _authority(authority: str, default_port: int | None) -> tuple[str, int]:
    try:
        return parse_authority(authority, default_port)
    except RemoteProtocolError as exc:
        raise StreamError(f":authority: {exc}") from None


def _host_field(fields: list[tuple[str, str]]) -> str | None:
    hosts = [value for name, value in fields if name == "host"]
    if len(hosts) > 1:
        raise StreamError("more than one host field")
    return hosts[0] if hosts else None


def _resolve_authority(pseudo: dict[str, str], host: str | None,
                       default_port: int | None) -> tuple[str, str, int]:
    """(authority as sent, host, port); a Host field stands in for a missing :authority
    (RFC 9113 §8.3.1) and must name the same place when both are present."""
    authority = pseudo.get(":authority")
    if authority is None:
        if host is None:
            raise StreamError("request without :authority or host")
        return (host,) + _authority(host, default_port)
    where = _authority(authority, default_port)
    if host is not None:
        try:
            other = parse_authority(host, default_port if default_port is not None else where[1])
        except RemoteProtocolError as exc:
            raise StreamError(f"host: {exc}") from None
        if other != where:
            raise StreamError(f"host {host[:80]!r} does not match :authority {authority[:80]!r}")
    return authority, where[0], where[1]


def _scheme(pseudo: dict[str, str]) -> str:
    scheme = pseudo.get(":scheme")
    if scheme is None:
        raise StreamError("request without :scheme")
    lowered = scheme.lower()
    if lowered in ("http", "https"):
        return lowered
    if _SCHEME.fullmatch(lowered):
        raise StreamError(f":scheme {scheme[:40]!r} is not supported, only http and https", 501)
    raise StreamError(f"invalid :scheme {scheme[:40]!r}")


def _path(pseudo: dict[str, str], method: str, asterisk_ok: bool) -> str:
    path = pseudo.get(":path")
    if path is None:
        raise StreamError("request without :path")
    if not path:
        raise StreamError("empty :path")
    if not _PATH.fullmatch(path):
        raise StreamError(f":path {path[:80]!r} has spaces, control or non-ASCII characters")
    if path == "*" and asterisk_ok and method == "OPTIONS":
        return path
    if not path.startswith("/"):
        raise StreamError(f":path {path[:80]!r} must start with / (or be * for OPTIONS)")
    return path


def parse_request_block(block: Iterable) -> H2Request:
    """Validate a request header block (RFC 9113 §8.1.1, §8.2, §8.3, §8.5; RFC 8441 §4)."""
    pseudo, fields = _split_block(_decode(block), allow_pseudo=True)
    method = pseudo.get(":method")
    if method is None:
        raise StreamError("request without :method")
    if not _ANY_CASE_NAME.fullmatch(method):
        raise StreamError(f"invalid :method {method[:40]!r}")
    _check_connection_specific(fields)
    content_length = _content_length(fields)
    host = _host_field(fields)
    headers = _regular_fields(fields)
    if ":protocol" in pseudo:
        return _extended_connect(pseudo, method, host, headers, content_length)
    if method == "CONNECT":
        return _connect(pseudo, host, headers, content_length)
    scheme = _scheme(pseudo)
    path = _path(pseudo, method, asterisk_ok=True)
    authority, hostname, port = _resolve_authority(pseudo, host, DEFAULT_PORTS[scheme])
    return H2Request("request", method, scheme, authority, path, None, headers, content_length,
                     Target(scheme, hostname, port, path))


def _connect(pseudo: dict[str, str], host: str | None, headers: Headers,
             content_length: int | None) -> H2Request:
    # RFC 9113 §8.5: :method and :authority only, and the authority names a port.
    for name in (":scheme", ":path"):
        if name in pseudo:
            raise StreamError(f"{name} in a CONNECT request (RFC 9113 §8.5)")
    if ":authority" not in pseudo:
        raise StreamError("CONNECT without :authority")
    authority, hostname, port = _resolve_authority(pseudo, host, None)
    return H2Request("connect", "CONNECT", None, authority, None, None, headers, content_length,
                     Target("tcp", hostname, port, ""))


def _extended_connect(pseudo: dict[str, str], method: str, host: str | None, headers: Headers,
                      content_length: int | None) -> H2Request:
    # RFC 8441 §4: :protocol only on CONNECT, which then carries :scheme, :path and :authority.
    if method != "CONNECT":
        raise StreamError(f":protocol in a {method[:20]} request; only CONNECT carries it")
    for name in (":scheme", ":path", ":authority"):
        if name not in pseudo:
            raise StreamError(f"extended CONNECT without {name} (RFC 8441 §4)")
    scheme = _scheme(pseudo)
    path = _path(pseudo, method, asterisk_ok=False)
    authority, hostname, port = _resolve_authority(pseudo, host, DEFAULT_PORTS[scheme])
    protocol = pseudo[":protocol"]
    if protocol.lower() not in SUPPORTED_PROTOCOLS:
        raise StreamError(f"extended CONNECT :protocol {protocol[:40]!r} is not supported, "
                          "only websocket", 501)
    return H2Request("websocket", method, scheme, authority, path, protocol, headers,
                     content_length, Target(scheme, hostname, port, path))


def parse_trailer_block(block: Iterable) -> Headers:
    """A request's trailer block (RFC 9113 §8.1): no pseudo-header or connection-specific field."""
    _, fields = _split_block(_decode(block), allow_pseudo=False)
    _check_connection_specific(fields)
    return tuple(fields)


class DataLengthCheck:
    """RFC 9113 §8.1.1: the DATA of a request must add up to its content-length."""

    def __init__(self, declared: int | None) -> None:
        self.declared = declared
        self.received = 0

    def data(self, n: int) -> None:
        self.received += n
        if self.declared is not None and self.received > self.declared:
            raise StreamError(f"more DATA than content-length {self.declared}")

    def end(self) -> None:
        if self.declared is not None and self.received < self.declared:
            raise StreamError(f"stream ended after {self.received} of {self.declared} "
                              "content-length bytes")


# --- HTTP/2 request → HTTP/1.1 origin -------------------------------------------------------

def h2_via(pseudonym: str) -> str:
    return f"{H2_VIA_VERSION} {pseudonym}"


def _end_to_end(headers: Headers, also_drop: frozenset[str] = frozenset()) -> Headers:
    return tuple((k, v) for k, v in strip_hop_by_hop(headers) if k not in also_drop)


def http1_request_head(req: H2Request, pseudonym: str, *,
                       body_follows: bool = False) -> tuple[str, str, Headers]:
    """(method, request target, fields) for the origin, as `origin_request_headers` does for
    HTTP/1.1 clients: Host first, hop-by-hop gone, `TE: trailers` kept, our Via appended.

    `body_follows`: DATA will follow the HEADERS (no END_STREAM); without a content-length
    the body then goes to the origin chunked, and `Transfer-Encoding: chunked` is added.
    An ordinary CONNECT maps to authority-form (for a next-hop proxy).
    """
    if req.kind == "websocket":
        raise LocalProtocolError("an extended CONNECT maps with websocket_http1_request")
    if req.kind == "connect":
        target = req.target.hostport
        host = target
    else:
        target = req.path or "/"
        host = req.target.authority
    out = (("Host", host),) + _end_to_end(req.headers, frozenset({"host"}))
    if "trailers" in {v.lower() for v in header_values(req.headers, "te")}:
        out += (("TE", "trailers"), ("Connection", "TE"))
    if body_follows and req.content_length is None and req.kind == "request":
        out += (("Transfer-Encoding", "chunked"),)
    return req.method, target, out + (("Via", h2_via(pseudonym)),)


# --- HTTP/1.1 response → HTTP/2 client ------------------------------------------------------

def h2_informational_allowed(status: int) -> bool:
    """1xx responses but 101 may go to an HTTP/2 client as interim HEADERS (RFC 9113 §8.1)."""
    return 100 <= status < 200 and status != 101


def _h2_fields(headers: Headers, also_drop: frozenset[str] = frozenset()) -> list[tuple[str, str]]:
    out = []
    for name, value in strip_hop_by_hop(headers):
        lname = name.lower()
        if lname.startswith(":") or lname in also_drop:
            continue
        if _LINE_BREAK_OR_NUL.search(value):
            raise LocalProtocolError(f"CR, LF or NUL in the value of {name!r}")
        out.append((lname, value))
    return out


def h2_response_block(status: int, headers: Headers, pseudonym: str, *,
                      version: tuple[int, int] = (1, 1)) -> list[tuple[str, str]]:
    """The HEADERS of a response that came over HTTP/`version` (RFC 9113 §8.2.2, §8.3.2).

    A Content-Length beside Transfer-Encoding is dropped: the coding ruled the HTTP/1.1
    framing, so the length is wrong (RFC 9112 §6.3 says a proxy must remove it).
    """
    if not 100 <= status <= 999 or status == 101:
        raise LocalProtocolError(f"status {status} cannot go to an HTTP/2 client")
    chunked = header_value(headers, "transfer-encoding") is not None
    fields = _h2_fields(headers, frozenset({"content-length"}) if chunked else frozenset())
    return [(":status", str(status))] + fields + [("via", via_value(version, pseudonym))]


def h2_trailer_block(headers: Headers) -> list[tuple[str, str]]:
    """Trailers for HTTP/2: lowercase, no pseudo-header, hop-by-hop or framing field."""
    return _h2_fields(headers, frozenset({"content-length", "host"}))


def block_bytes(block: Iterable[tuple[str, str]]) -> list[tuple[bytes, bytes]]:
    """A block as latin-1 bytes: hpack would encode str values as UTF-8, which changes any
    obs-text octet an HTTP/1.1 origin sent (our HTTP/1.1 codec reads values as latin-1)."""
    return [(n.encode("latin-1"), v.encode("latin-1")) for n, v in block]


# --- RFC 8441 extended CONNECT ↔ RFC 6455 handshake -----------------------------------------

_WS_HANDSHAKE = frozenset({"host", "sec-websocket-key", "sec-websocket-accept",
                           "sec-websocket-version", "content-length"})


def is_websocket_key(key: str) -> bool:
    """A Sec-WebSocket-Key is 16 bytes in base64 (RFC 6455 §4.1, item 7)."""
    try:
        return len(base64.b64decode(key.encode("ascii"), validate=True)) == 16
    except (binascii.Error, UnicodeEncodeError):
        return False


def _check_key(key: str) -> None:
    if not is_websocket_key(key):
        raise LocalProtocolError("Sec-WebSocket-Key must be 16 random bytes in base64")


def websocket_http1_request(req: H2Request, key: str, pseudonym: str) -> tuple[str, Headers]:
    """The RFC 6455 opening handshake for an RFC 8441 extended CONNECT (RFC 8441 §5).

    Returns the request line ("GET /path HTTP/1.1") and fields, ready for `serialize_head`.
    `key` is a fresh base64 nonce; the client's own Sec-WebSocket-Key, if it sent one, is
    ignored (HTTP/2 does not use it).
    """
    if req.kind != "websocket":
        raise LocalProtocolError(f"a {req.kind} is not a WebSocket request")
    _check_key(key)
    version = header_value(req.headers, "sec-websocket-version") or "13"
    out = (("Host", req.target.authority), ("Upgrade", "websocket"), ("Connection", "Upgrade"),
           ("Sec-WebSocket-Key", key), ("Sec-WebSocket-Version", version))
    out += _end_to_end(req.headers, _WS_HANDSHAKE)
    return request_line("GET", req.path or "/"), out + (("Via", h2_via(pseudonym)),)


def websocket_accept(key: str) -> str:
    """Sec-WebSocket-Accept for `key` (RFC 6455 §4.2.2 item 5)."""
    digest = hashlib.sha1(key.encode("ascii") + WEBSOCKET_GUID).digest()
    return base64.b64encode(digest).decode("ascii")


def _names(values: list[str]) -> set[str]:
    return {v.split(";", 1)[0].strip().lower() for v in values}


def check_websocket_switch(key: str, status: int, headers: Headers, *,
                           request: H2Request | None = None) -> None:
    """Raise `UpstreamHandshakeError` unless the origin switched to WebSocket (RFC 6455 §4.1).

    With `request`, the subprotocol and extensions chosen must be among those the client
    offered, as a client would check itself.
    """
    if status != 101:
        raise UpstreamHandshakeError(f"origin answered {status} to the WebSocket handshake", status)
    if [v.lower() for v in header_values(headers, "upgrade")] != ["websocket"]:
        raise UpstreamHandshakeError("origin switched without Upgrade: websocket", status)
    if "upgrade" not in connection_tokens(headers):
        raise UpstreamHandshakeError("origin switched without Connection: upgrade", status)
    accepts = [v for k, v in headers if k.lower() == "sec-websocket-accept"]
    if accepts != [websocket_accept(key)]:
        raise UpstreamHandshakeError("origin's Sec-WebSocket-Accept does not match our key", status)
    if request is None:
        return
    chosen = header_values(headers, "sec-websocket-protocol")
    offered = set(header_values(request.headers, "sec-websocket-protocol"))
    if len(chosen) > 1 or (chosen and chosen[0] not in offered):
        raise UpstreamHandshakeError(f"origin chose subprotocol {chosen!r}, not offered", status)
    extensions = _names(header_values(headers, "sec-websocket-extensions"))
    if not extensions <= _names(header_values(request.headers, "sec-websocket-extensions")):
        raise UpstreamHandshakeError("origin chose a WebSocket extension the client did not offer",
                                     status)


def websocket_h2_response(headers: Headers) -> list[tuple[str, str]]:
    """The 200 that opens an RFC 8441 tunnel, with what the origin negotiated (RFC 8441 §5)."""
    out = [(":status", "200")]
    for name in ("sec-websocket-protocol", "sec-websocket-extensions"):
        values = [v for k, v in headers if k.lower() == name]
        if values:
            out.append((name, ", ".join(values)))
    return out
