"""Policy: an `Intent` (who wants to reach what, how) becomes a `Decision` by the first matching rule.

Pure functions over the frozen `Rule`s of the config; no I/O. Every frontend builds an Intent per
request, tunnel or WebSocket, so one rule set governs HTTP/1.1, HTTP/2, SOCKS5 and transparent
traffic alike. No matching rule means deny, like a firewall's default policy.

Destination CIDRs match an IP-literal target, or any address the target's name resolved to
(`Intent.addresses`), so a name cannot slip past a rule written for the addresses behind it.

After the rules allow, `refusal` applies what no rule can allow: a destination that is not a unicast
address (0.0.0.0/8 and :: reach this host; multicast and broadcast are no TCP peers), a forwarding
loop (this appliance's own listeners), and a CONNECT to a port outside `[policy] connect_ports`
(Squid's `http_access deny CONNECT !SSL_ports`).
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from functools import lru_cache

from .config import ListenSection, Rule

DEFAULT_DENY = "default deny (no rule matched)"
NOT_UNICAST = "built-in: the destination is not a unicast address"
FORWARDING_LOOP = "built-in: forwarding loop (the destination is this appliance's own listener)"
CONNECT_PORT = "built-in: CONNECT to a port outside [policy] connect_ports"
# Where an HTTP CONNECT arrives; a SOCKS5 CONNECT is a general TCP tunnel and not port-bound.
CONNECT_LISTENERS = ("http", "https")
# "this network" (RFC 1122: 0.0.0.0 reaches this host), and class E with the broadcast address
_IPV4_NEVER_DIALLED = (ipaddress.ip_network("0.0.0.0/8"), ipaddress.ip_network("240.0.0.0/4"))


@dataclass(frozen=True)
class Intent:
    client: str                      # client IP address
    listener: str                    # listener kind: http, https, socks5, ...
    kind: str                        # request | tunnel | websocket
    host: str                        # target host: a name or an IP literal (no brackets)
    port: int
    scheme: str = "http"
    method: str = ""
    user: str | None = None
    addresses: tuple[str, ...] = ()  # resolved addresses of `host`, when a rule needs them


@dataclass(frozen=True)
class Decision:
    action: str                      # allow | deny | intercept | passthrough
    rule: str                        # the rule's name, or DEFAULT_DENY
    rule_index: int | None = None
    # What a name was admitted as: its addresses, checked here, are the ones to dial (connect
    # never resolves it again, so DNS cannot answer otherwise in between: rebinding).
    addresses: tuple[str, ...] = ()

    @property
    def allowed(self) -> bool:
        return self.action != "deny"


@lru_cache(maxsize=4096)
def _ip(text: str):
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


def domain_matches(pattern: str, host: str) -> bool:
    """`example.com` exact, `*.example.com` subdomains only, `.example.com` both."""
    host = host.rstrip(".").lower()
    if pattern.startswith("*."):
        return host.endswith(pattern[1:])
    if pattern.startswith("."):
        return host == pattern[1:] or host.endswith(pattern)
    return host == pattern


def dialled_addresses(intent: Intent) -> list:
    """The addresses a connection for `intent` may be dialled to: the IP literal, or what the
    name resolved to, with the IPv4 address inside each IPv4-mapped IPv6 one (::ffff:127.0.0.1
    reaches 127.0.0.1 over a dual-stack socket: IPv4 rules must see it too)."""
    literal = _ip(intent.host)
    addresses = [literal] if literal is not None else [a for a in map(_ip, intent.addresses) if a]
    return addresses + [a.ipv4_mapped for a in addresses if a.version == 6 and a.ipv4_mapped]


def _dst_matches(rule: Rule, intent: Intent) -> bool:
    if not rule.dst:
        return True
    literal = _ip(intent.host)
    addresses = dialled_addresses(intent)
    for entry in rule.dst:
        if isinstance(entry, str):
            if literal is None and domain_matches(entry, intent.host):
                return True
        elif any(addr.version == entry.version and addr in entry for addr in addresses):
            return True
    return False


def _src_matches(rule: Rule, intent: Intent) -> bool:
    if not rule.src:
        return True
    client = _ip(intent.client)
    if client is not None and client.version == 6 and client.ipv4_mapped:
        client = client.ipv4_mapped
    return client is not None and any(client.version == n.version and client in n for n in rule.src)


def rule_matches(rule: Rule, intent: Intent) -> bool:
    return (_src_matches(rule, intent)
            and (not rule.ports or any(lo <= intent.port <= hi for lo, hi in rule.ports))
            and (not rule.users or intent.user in rule.users)
            and _dst_matches(rule, intent))


def decide(rules: tuple[Rule, ...], intent: Intent) -> Decision:
    for rule in rules:
        if rule_matches(rule, intent):
            return Decision(rule.action, rule.name, rule.index)
    return Decision("deny", DEFAULT_DENY)


def needs_addresses(rules: tuple[Rule, ...], intent: Intent) -> bool:
    """True when a rule tests destination networks and the target is a name, not an address:
    the rules need its addresses before deciding."""
    return is_name(intent.host) and any(not isinstance(entry, str) for rule in rules for entry in rule.dst)


def is_name(host: str) -> bool:
    """A host name, not an IP literal: what it resolves to is dialled, and checked first."""
    return _ip(host) is None


def _not_unicast(address) -> bool:
    if address.is_unspecified or address.is_multicast:
        return True
    return address.version == 4 and any(address in network for network in _IPV4_NEVER_DIALLED)


@lru_cache(maxsize=16)
def _listening(listen: ListenSection) -> dict[int, tuple]:
    """Our listeners by port: the addresses bound on each (one config's worth, cached)."""
    ports: dict[int, list] = {}
    for kind in ListenSection.__dataclass_fields__:
        for listener in getattr(listen, kind):
            ports.setdefault(listener.port, []).append(_ip(listener.host))
    return {port: tuple(bound) for port, bound in ports.items()}


def _is_own_listener(listen: ListenSection, address, port: int, is_local) -> bool:
    """Whether address:port is one of our listening sockets; a wildcard listener (0.0.0.0, ::)
    takes every address of this host, which only `is_local(address)` (I/O) can tell."""
    for bound in _listening(listen).get(port, ()):
        if bound == address:
            return True
        if bound is not None and bound.is_unspecified and is_local(address):
            # an IPv4 wildcard takes IPv4 only; "::" takes both (dual-stack)
            if bound.version == 6 or address.version == 4:
                return True
    return False


def refusal(intent: Intent, listen: ListenSection, connect_ports: tuple[tuple[int, int], ...],
            is_local) -> str | None:
    """The built-in reason `intent` is refused whatever the rules say, or None.

    `is_local(address)`: whether the address belongs to this host (asked only for a port we
    listen on with a wildcard address)."""
    addresses = dialled_addresses(intent)
    if any(_not_unicast(address) for address in addresses):
        return NOT_UNICAST
    if any(_is_own_listener(listen, address, intent.port, is_local) for address in addresses):
        return FORWARDING_LOOP
    if (connect_ports and intent.method == "CONNECT" and intent.kind == "tunnel"
            and intent.listener in CONNECT_LISTENERS
            and not any(lo <= intent.port <= hi for lo, hi in connect_ports)):
        return CONNECT_PORT
    return None
