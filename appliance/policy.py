"""Policy: an `Intent` (who wants to reach what, how) becomes a `Decision` by the first matching rule.

Pure functions over the frozen `Rule`s of the config; no I/O. Every frontend builds an Intent per
request, tunnel or WebSocket, so one rule set governs HTTP/1.1, HTTP/2, SOCKS5 and transparent
traffic alike. No matching rule means deny, like a firewall's default policy.

Destination CIDRs match an IP-literal target, or any address the target's name resolved to
(`Intent.addresses`), so a name cannot slip past a rule written for the addresses behind it.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from functools import lru_cache

from .config import Rule

DEFAULT_DENY = "default deny (no rule matched)"


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


def _dst_matches(rule: Rule, intent: Intent) -> bool:
    if not rule.dst:
        return True
    literal = _ip(intent.host)
    addresses = [literal] if literal is not None else [a for a in map(_ip, intent.addresses) if a]
    # ::ffff:127.0.0.1 reaches 127.0.0.1 over a dual-stack socket: IPv4 rules must see it too.
    addresses += [a.ipv4_mapped for a in addresses if a.version == 6 and a.ipv4_mapped]
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
    """True when a rule tests destination networks and the target is a name, not an address."""
    if _ip(intent.host) is not None:
        return False
    return any(not isinstance(entry, str) for rule in rules for entry in rule.dst)
