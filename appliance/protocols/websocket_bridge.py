"""An HTTP/1.1 client's WebSocket handshake (RFC 6455) carried to an HTTP/2 origin (RFC 8441).

Sans-I/O. The reverse of `h2_mapping.websocket_http1_request`: the client sends `GET` with
`Upgrade: websocket` and its own `Sec-WebSocket-Key`; the origin, listed in `[upstream]
h2_origins`, gets an extended CONNECT (`:protocol websocket`) instead, which has no key; when it
answers 200 the appliance itself answers the client `101` with the `Sec-WebSocket-Accept` for
the client's key and whatever subprotocol and extensions the origin chose. The WebSocket frames
are the same on both sides (RFC 8441 §5), so they are relayed unchanged.
"""

from __future__ import annotations

import re

from .forwarding import Target, strip_hop_by_hop
from .h2_mapping import is_websocket_key, websocket_accept
from .http1 import Headers, RemoteProtocolError, header_value

# Fields of the RFC 6455 handshake that RFC 8441 replaces, or that HTTP/2 carries otherwise.
_NOT_CARRIED = frozenset({"host", "sec-websocket-key", "sec-websocket-accept", "content-length"})
_STATUS = re.compile(r"[1-5][0-9]{2}")
_NEGOTIATED = (("sec-websocket-protocol", "Sec-WebSocket-Protocol"),
               ("sec-websocket-extensions", "Sec-WebSocket-Extensions"))


def client_key(headers: Headers) -> str:
    """The client's Sec-WebSocket-Key: one, of 16 bytes in base64 (RFC 6455 §4.1, item 7), in a
    handshake for version 13 (item 9), the only one there is; else a 400 before anything is sent."""
    keys = [v for k, v in headers if k.lower() == "sec-websocket-key"]
    if len(keys) != 1 or not is_websocket_key(keys[0].strip(" \t")):
        raise RemoteProtocolError("WebSocket handshake without a valid Sec-WebSocket-Key")
    if (header_value(headers, "sec-websocket-version") or "").strip(" \t") != "13":
        raise RemoteProtocolError("WebSocket handshake for a version other than 13")
    return keys[0].strip(" \t")


def extended_connect_block(target: Target, headers: Headers, pseudonym: str) -> list[tuple[str, str]]:
    """The HEADERS of the extended CONNECT that stands for the client's GET (RFC 8441 §4)."""
    scheme = "https" if target.scheme in ("https", "wss") else "http"
    block = [(":method", "CONNECT"), (":protocol", "websocket"), (":scheme", scheme),
             (":path", target.path or "/"), (":authority", target.authority)]
    for name, value in strip_hop_by_hop(headers):        # Upgrade and Connection go too
        lname = name.lower()
        if lname not in _NOT_CARRIED:
            block.append((lname, value))
    if not any(name == "sec-websocket-version" for name, _ in block):
        block.append(("sec-websocket-version", "13"))
    block.append(("via", f"1.1 {pseudonym}"))
    return block


def _text(item) -> str:
    return item.decode("latin-1") if isinstance(item, (bytes, bytearray)) else str(item)


def parse_response_block(block) -> tuple[int, Headers]:
    """(status, fields) of the origin's response HEADERS; a malformed block is the origin's fault."""
    fields = [(_text(n), _text(v)) for n, v in block]
    if not fields or fields[0][0] != ":status" or not _STATUS.fullmatch(fields[0][1]):
        raise RemoteProtocolError("origin's HTTP/2 response has no valid :status first", 502)
    regular = []
    for name, value in fields[1:]:
        if name.startswith(":") or name != name.lower() or any(c in value for c in "\r\n\0"):
            raise RemoteProtocolError(f"origin's HTTP/2 response has a malformed field {name[:40]!r}", 502)
        regular.append((name, value))
    return int(fields[0][1]), tuple(regular)


def switch_response_headers(key: str, origin_headers: Headers) -> Headers:
    """The fields of the 101 the appliance sends the HTTP/1.1 client once the origin said 200."""
    out: Headers = (("Upgrade", "websocket"), ("Connection", "Upgrade"),
                    ("Sec-WebSocket-Accept", websocket_accept(key)))
    for lname, name in _NEGOTIATED:
        values = [v for k, v in origin_headers if k.lower() == lname]
        if values:
            out += ((name, ", ".join(values)),)
    return out
