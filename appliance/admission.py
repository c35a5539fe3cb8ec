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


def admit(ctx: ProxyContext, config: Config, record: AccessRecord, headers: Headers, *,
          kind: str, host: str, port: int, scheme: str, method: str) -> Decision:
    """The decision for one request; raises AuthRequired (407) or PolicyDenied (403)."""
    user = None
    if ctx.authenticator is not None:
        user = ctx.authenticator.check(record.client, headers)
        record.user = user
    intent = Intent(record.client, record.listener, kind, host, port, scheme, method, user)
    if needs_addresses(config.rules, intent):
        intent = dataclasses.replace(intent, addresses=tuple(ctx.resolver.resolve(host)))
    decision = decide(config.rules, intent)
    record.rule = decision.rule
    if decision.action == "deny":
        raise PolicyDenied(decision.rule)
    return decision
