"""Admission: who is asking (proxy authentication) and whether policy lets them (policy.decide).

Every frontend calls `admit` once per request, tunnel or stream, before anything reaches an
origin. Names are resolved first only when a rule tests destination networks.
"""

from __future__ import annotations

import dataclasses

from .config import Config
from .context import ProxyContext
from .errors import PolicyDenied
from .observe import AccessRecord
from .policy import Decision, Intent, decide, needs_addresses
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
    record.rule = decision.rule
    if decision.action == "deny":
        raise PolicyDenied(decision.rule)
    return decision
