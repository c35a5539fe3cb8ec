"""What every frontend shares: the config in force, the resolver, the origin pool, the observer.

One `ProxyContext` per worker process. A config reload swaps `config` (one object) and leaves
connections in flight on the one they started with.
"""

from __future__ import annotations

from dataclasses import dataclass

from .config import Config
from .observe import Observer
from .upstream import OriginPool, Resolver


@dataclass
class ProxyContext:
    config: Config
    resolver: Resolver
    pool: OriginPool
    observer: Observer

    @classmethod
    def from_config(cls, config: Config, observer: Observer) -> "ProxyContext":
        resolver = Resolver(config.upstream.nameservers, timeout=config.upstream.connect_timeout)
        return cls(config, resolver, OriginPool(config.upstream, resolver), observer)
