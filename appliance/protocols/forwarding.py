"""What a forward proxy changes in a message it passes on (RFC 9110 §7.6, RFC 9112 §3.2).

Sans-I/O: request targets (absolute-form and authority-form) become a `Target`; hop-by-hop
fields go, `Via` is added, and a request that already passed through this appliance is seen as a
loop. The HTTP/1.1 frontend and, later, the HTTP/2 frontend share these rules.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

from .http1 import Headers, RemoteProtocolError, connection_tokens, header_values

# RFC 9110 §7.6.1 names these; Proxy-Connection and Keep-Alive are the pre-standard ones
# clients still send (RFC 9112 §9.6 / Appendix C.2.2).
HOP_BY_HOP = frozenset({
    "connection", "keep-alive", "proxy-connection", "te", "transfer-encoding", "upgrade",
    "proxy-authenticate", "proxy-authorization",
})

# Connection may name only hop-by-hop fields; if it names these, the body would reach the next
# hop unframed (request smuggling on a pooled origin connection), so they are never dropped.
FRAMING_FIELDS = frozenset({"content-length"})

# RFC 9110 §6.5.1: fields a recipient needs before the content (framing, routing, request
# modifiers, authentication, response control, how to process the content) are not trailers.
# Passed on, a next hop that merges trailers into the header section could be re-framed or
# re-routed by them, so they are dropped from the trailer section this proxy forwards.
NOT_TRAILERS = HOP_BY_HOP | frozenset({
    "content-length", "host", "trailer", "content-encoding", "content-type", "content-range",
    "authorization", "cookie", "set-cookie", "www-authenticate", "cache-control", "expect",
    "max-forwards", "pragma", "range", "age", "expires", "date", "location", "retry-after", "vary",
    "if-match", "if-none-match", "if-modified-since", "if-unmodified-since", "if-range",
})

DEFAULT_PORTS = {"http": 80, "https": 443, "ws": 80, "wss": 443}
_HOSTNAME = re.compile(r"(?=.{1,253}\Z)[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,62})(?:\.[A-Za-z0-9_-]{1,63})*\.?")


@dataclass(frozen=True)
class Target:
    """Where a request goes: scheme, host (no brackets), port and the origin-form path."""

    scheme: str
    host: str
    port: int
    path: str = "/"

    @property
    def authority(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        if self.port == DEFAULT_PORTS.get(self.scheme):
            return host
        return f"{host}:{self.port}"

    @property
    def hostport(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


def _check_host(host: str) -> str:
    if host.startswith("["):
        if not host.endswith("]"):
            raise RemoteProtocolError(f"invalid host {host!r}")
        try:
            return str(ipaddress.IPv6Address(host[1:-1].split("%")[0]))
        except ValueError:
            raise RemoteProtocolError(f"invalid IPv6 literal {host!r}") from None
    if not _HOSTNAME.fullmatch(host):
        raise RemoteProtocolError(f"invalid host {host!r}")
    return host.rstrip(".").lower()


def parse_authority(authority: str, default_port: int | None = None) -> tuple[str, int]:
    """`host:port` or `[v6]:port` (authority-form, RFC 9112 §3.2.3) to (host, port)."""
    if "@" in authority:
        raise RemoteProtocolError("userinfo is not allowed in a request target")
    host, sep, port_text = authority.rpartition(":")
    if not sep or host.endswith(":") or (host.startswith("[") != host.endswith("]")):
        host, port_text = authority, ""
    if not port_text:
        if default_port is None:
            raise RemoteProtocolError(f"port missing in {authority!r}")
        port = default_port
    elif port_text.isascii() and port_text.isdigit() and 0 < int(port_text) < 65536:
        port = int(port_text)
    else:
        raise RemoteProtocolError(f"invalid port in {authority!r}")
    return _check_host(host), port


def parse_absolute_target(target: str) -> Target:
    """absolute-form `scheme://authority/path?query` (RFC 9112 §3.2.2) to a `Target`."""
    scheme, sep, rest = target.partition("://")
    scheme = scheme.lower()
    if not sep or scheme not in DEFAULT_PORTS:
        raise RemoteProtocolError(f"a proxy request needs an absolute http:// URL, got {target[:80]!r}")
    cut = min((i for i in (rest.find("/"), rest.find("?"), rest.find("#")) if i >= 0), default=len(rest))
    authority, path = rest[:cut], rest[cut:].split("#", 1)[0]
    if not authority:
        raise RemoteProtocolError("empty host in request target")
    host, port = parse_authority(authority, DEFAULT_PORTS[scheme])
    if not path.startswith("/"):
        path = "/" + path
    return Target(scheme, host, port, path)


def parse_origin_form(target: str, host_field: str | None, scheme: str) -> Target:
    """An origin server's view of a request (RFC 9112 §3.2.1): `/path?query` with the host from
    the Host field, as an intercepted client sends it. Absolute-form is accepted too (§3.2.2:
    servers must), `*` only as the OPTIONS target (checked by the caller)."""
    if "://" in target:
        return parse_absolute_target(target)
    if not (target.startswith("/") or target == "*"):
        raise RemoteProtocolError(f"invalid request target {target[:80]!r}")
    if not host_field:
        raise RemoteProtocolError("request without a Host field")
    host, port = parse_authority(host_field, DEFAULT_PORTS[scheme])
    return Target(scheme, host, port, target)


def strip_hop_by_hop(headers: Headers, keep: frozenset[str] = frozenset()) -> Headers:
    """Drop hop-by-hop fields and every field the Connection header names (RFC 9110 §7.6.1)."""
    drop = (HOP_BY_HOP | (connection_tokens(headers) - FRAMING_FIELDS)) - keep
    return tuple((k, v) for k, v in headers if k.lower() not in drop)


def with_content_length(headers: Headers, length: int | None) -> Headers:
    """The fields with the framing this hop sends (RFC 9110 §8.6, RFC 9112 §6.3): every received
    Content-Length (duplicates, lists, leading zeros) replaced by one decimal `length`, or by
    none when `length` is None (a body sent on chunked or until close, whatever Content-Length
    came beside its Transfer-Encoding). A bodiless message that had none gets none."""
    out = tuple((k, v) for k, v in headers if k.lower() != "content-length")
    if length is None or (not length and len(out) == len(headers)):
        return out
    return out + (("Content-Length", str(length)),)


def response_fields(headers: Headers, content_length: int | None) -> Headers:
    """A response's fields for the next hop, in one pass: hop-by-hop gone (as `strip_hop_by_hop`)
    and Content-Length only as `with_content_length` puts it."""
    drop = HOP_BY_HOP | connection_tokens(headers) | FRAMING_FIELDS
    out = tuple((k, v) for k, v in headers if k.lower() not in drop)
    if content_length is None:
        return out
    return out + (("Content-Length", str(content_length)),)


def forwardable_trailers(trailers: Headers) -> Headers:
    """The trailer fields passed on: none of `NOT_TRAILERS`."""
    return tuple((k, v) for k, v in trailers if k.lower() not in NOT_TRAILERS)


def via_value(version: tuple[int, int], pseudonym: str) -> str:
    return f"{version[0]}.{version[1]} {pseudonym}"


def add_via(headers: Headers, version: tuple[int, int], pseudonym: str) -> Headers:
    """Append our hop to Via (RFC 9110 §7.6.3); the protocol is the one we received."""
    return headers + (("Via", via_value(version, pseudonym)),)


def has_via_loop(headers: Headers, pseudonym: str) -> bool:
    """True when a Via entry names this appliance: the request came round to us again."""
    for entry in header_values(headers, "via"):
        parts = entry.split()
        if len(parts) >= 2 and parts[1].lower() == pseudonym.lower():
            return True
    return False


def is_websocket_upgrade(method: str, headers: Headers) -> bool:
    """An HTTP/1.1 WebSocket opening handshake (RFC 6455 §4.1) on a GET."""
    return (method == "GET" and "upgrade" in connection_tokens(headers)
            and "websocket" in {v.lower() for v in header_values(headers, "upgrade")})


def origin_request_headers(headers: Headers, target: Target, version: tuple[int, int],
                           pseudonym: str, upgrade: bool = False) -> Headers:
    """The fields an origin sees: hop-by-hop gone, Host from the target, our Via added.

    For a WebSocket handshake the Upgrade/Connection pair is kept, since that hop is the one
    being upgraded. `TE: trailers` is passed on because this proxy forwards trailers.
    """
    keep = frozenset({"upgrade"}) if upgrade else frozenset()
    out = tuple((k, v) for k, v in strip_hop_by_hop(headers, keep) if k.lower() != "host")
    out = (("Host", target.authority),) + out
    if upgrade:
        out += (("Connection", "Upgrade"),)
    elif "trailers" in {v.lower() for v in header_values(headers, "te")}:
        out += (("TE", "trailers"), ("Connection", "TE"))
    return add_via(out, version, pseudonym)
