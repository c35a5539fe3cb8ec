"""Admission: who is asking (proxy authentication) and whether policy lets them (policy.decide).

Every frontend calls `admit` once per request, tunnel or stream, before anything reaches an
origin. The rules decide first (resolving a name first only when a rule tests destination
networks); what they allow is checked against the built-in refusals on the addresses a name
resolves to, which the resolver's cache then hands to the connect that follows.
"""

from __future__ import annotations

import dataclasses
import ipaddress

from gevent import socket

from .config import Config
from .context import ProxyContext
from .errors import PolicyDenied
from .observe import AccessRecord
from .policy import Decision, Intent, decide, is_name, needs_addresses, refusal
from .protocols.http1 import Headers


class Identity:
    """Who is asking, when that was settled before the request: the user a CONNECT tunnel was
    opened for (requests inside an intercepted tunnel), or nobody (transparent connections,
    which cannot be asked for credentials)."""

    def __init__(self, user: str | None) -> None:
        self.user = user


def admit(ctx: ProxyContext, config: Config, record: AccessRecord, headers: Headers, *,
          kind: str, host: str, port: int, scheme: str, method: str,
          identity: Identity | None = None, addresses: tuple[str, ...] = ()) -> Decision:
    """The decision for one request; raises AuthRequired (407) or PolicyDenied (403).

    `addresses`: what `host` is known to stand for (an intercepted connection's original
    destination), so destination networks are checked against the address actually dialled.
    """
    if identity is not None:
        user = identity.user
    elif ctx.authenticator is not None:
        user = ctx.authenticator.check(record.client, headers)
    else:
        user = None
    record.user = user
    intent = Intent(record.client, record.listener, kind, host, port, scheme, method, user, addresses)
    if not addresses and needs_addresses(config.rules, intent):
        intent = dataclasses.replace(intent, addresses=tuple(ctx.resolver.resolve(host)))
    decision = decide(config.rules, intent)
    if decision.action != "deny":
        # What the rules allow is checked once more on the address it will be dialled to: a
        # name is resolved now (a denied one never is: it stays a 403 whatever DNS says).
        if not intent.addresses and is_name(host):
            intent = dataclasses.replace(intent, addresses=tuple(ctx.resolver.resolve(host)))
        refused = refusal(intent, config.listen, config.policy.connect_ports, is_local_address)
        if refused:
            decision = Decision("deny", refused)
    record.rule = decision.rule
    if decision.action == "deny":
        raise PolicyDenied(decision.rule)
    return dataclasses.replace(decision, addresses=intent.addresses) if intent.addresses else decision


def is_local_address(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """Whether `address` belongs to this host: only a local address can be bound (asked only
    when a request is for a port we listen on with a wildcard address)."""
    if address.is_loopback:
        return True
    family = socket.AF_INET6 if address.version == 6 else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as probe:
        try:
            probe.bind((str(address), 0))
        except OSError:
            return False
    return True
