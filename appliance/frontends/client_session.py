"""What every client connection starts with, whatever protocol it speaks.

Explicit proxy connections name their destination in each request. Intercepted connections
(transparent listeners, or a CONNECT tunnel whose rule says `intercept`) carry an `OriginRoute`
instead: their requests are in origin-form and go to the route's address, whatever they name,
and `route_request` decides what policy may believe about them.
"""

from __future__ import annotations

import logging

from gevent import socket

from ..admission import Identity, admit
from ..context import ProxyContext
from ..observe import AccessRecord
from ..policy import Decision
from ..protocols.forwarding import Target
from ..protocols.http1 import Headers, RemoteProtocolError
from ..upstream import OriginRoute

log = logging.getLogger("appliance.session")


class ClientSession:
    """One accepted client connection: the config it started with, where it came from, and the
    listener it came in on. A reload swaps `ctx.config`; this connection keeps its own."""

    def __init__(self, ctx: ProxyContext, sock: socket.socket, address, listener: str,
                 route: OriginRoute | None = None, identity: Identity | None = None) -> None:
        self.ctx = ctx
        self.config = ctx.config
        self.sock = sock
        self.client_ip = address[0]
        self.listener = listener
        self.pseudonym = self.config.appliance.name
        self.connection = 0          # its number in the access log, set once it is counted
        self.route = route           # set on intercepted connections: where every request goes
        self.identity = identity     # set when the user is known without asking (see admit)

    def route_request(self, target: Target) -> tuple[Target, str, tuple[str, ...]]:
        """For an intercepted connection: (target, host policy sees, addresses it stands for).

        Under TLS the route's host is the name the origin proved it owns, so a request naming
        another host is misdirected (421, RFC 9110 §15.5.20). In plain HTTP the Host field is
        only a claim: it is believed for policy when it resolves to the address the client
        actually dialled; otherwise policy sees that address (Squid's host_verify_strict idea).
        """
        route = self.route
        if route.host is not None:
            if (target.host, target.port) != (route.host, route.port):
                raise RemoteProtocolError(
                    f"this connection is for {route.host}:{route.port}, not {target.hostport}", 421)
            return target, target.host, (route.address,) if route.address else ()
        target = Target(target.scheme, target.host, route.port, target.path)
        if target.host == route.address or self.ctx.resolver.resolves_to(target.host, route.address):
            return target, target.host, (route.address,)
        log.info("client %s: Host %s does not resolve to the intercepted address %s; policy "
                 "sees the address", self.client_ip, target.host, route.address)
        return target, route.address, (route.address,)


    def admit_request(self, record: AccessRecord, headers: Headers, target: Target, kind: str,
                      method: str) -> tuple[Target, Decision]:
        """Policy (and, on explicit connections, authentication) for one request or stream;
        on intercepted connections the target is first checked against the route."""
        host, addresses = target.host, ()
        if self.route is not None:
            target, host, addresses = self.route_request(target)
        decision = admit(self.ctx, self.config, record, headers, kind=kind, host=host,
                         port=target.port, scheme=target.scheme, method=method,
                         identity=self.identity, addresses=addresses)
        return target, decision

