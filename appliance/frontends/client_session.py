"""What every client connection starts with, whatever protocol it speaks."""

from __future__ import annotations

from gevent import socket

from ..context import ProxyContext


class ClientSession:
    """One accepted client connection: the config it started with, where it came from, and the
    listener it came in on. A reload swaps `ctx.config`; this connection keeps its own."""

    def __init__(self, ctx: ProxyContext, sock: socket.socket, address, listener: str) -> None:
        self.ctx = ctx
        self.config = ctx.config
        self.sock = sock
        self.client_ip = address[0]
        self.listener = listener
        self.pseudonym = self.config.appliance.name
        self.connection = 0          # its number in the access log, set once it is counted
