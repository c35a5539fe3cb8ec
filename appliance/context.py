"""What every frontend shares: the config in force, the resolver, the origin pool, the observer.

One `ProxyContext` per worker process. A config reload swaps `config` (one object) and leaves
connections in flight on the one they started with.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from functools import cached_property

from .config import Config
from .observe import Observer
from .upstream import OriginPool, Resolver, origin_tls_context


@dataclass
class ProxyContext:
    config: Config
    resolver: Resolver
    pool: OriginPool
    observer: Observer
    # HTTP/2 connections in flight, told to GOAWAY when the appliance drains
    h2_sessions: weakref.WeakSet = field(default_factory=weakref.WeakSet)

    @cached_property
    def origin_tls(self):
        """Client TLS context toward origins (wss:// behind extended CONNECT, later more)."""
        return origin_tls_context(self.config.upstream.ca_file)

    @classmethod
    def from_config(cls, config: Config, observer: Observer) -> "ProxyContext":
        resolver = Resolver(config.upstream.nameservers, timeout=config.upstream.connect_timeout)
        return cls(config, resolver, OriginPool(config.upstream, resolver), observer)
