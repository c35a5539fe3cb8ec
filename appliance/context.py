"""What every frontend shares: the config in force, the resolver, the origin pool, the observer.

One `ProxyContext` per worker process. A config reload swaps `config` (one object) and leaves
connections in flight on the one they started with.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from functools import cached_property

from .auth import Authenticator
from .config import Config
from .observe import Observer
from .upstream import OriginPool, Resolver, origin_tls_context


@dataclass
class ProxyContext:
    config: Config
    resolver: Resolver
    pool: OriginPool
    observer: Observer
    authenticator: Authenticator | None = None      # None: no proxy authentication
    # HTTP/2 connections in flight, told to GOAWAY when the appliance drains
    h2_sessions: weakref.WeakSet = field(default_factory=weakref.WeakSet)

    @cached_property
    def origin_tls(self):
        """Client TLS context toward origins (wss:// behind extended CONNECT, later more)."""
        return origin_tls_context(self.config.upstream.ca_file)

    @cached_property
    def leaf_contexts(self):
        """TLS contexts with leaves minted for intercepted names (loads or creates the CA)."""
        from .frontends.intercept import LeafContexts
        return LeafContexts(self)

    @classmethod
    def from_config(cls, config: Config, observer: Observer) -> "ProxyContext":
        resolver = Resolver(config.upstream.nameservers, timeout=config.upstream.connect_timeout)
        return cls(config, resolver, OriginPool(config.upstream, resolver), observer,
                   authenticator_for(config))

    def use(self, config: Config) -> None:
        """A reload: new requests see the new config; the users file may have moved."""
        self.config = config
        self.authenticator = authenticator_for(config, self.authenticator)


def authenticator_for(config: Config, current: Authenticator | None = None) -> Authenticator | None:
    auth = config.auth
    if auth.users_file is None:
        return None
    if current is not None and current.users_file == auth.users_file and current.realm == auth.realm:
        return current
    return Authenticator(auth.users_file, auth.realm)
