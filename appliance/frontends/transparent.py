"""The transparent listeners: connections that iptables REDIRECT or TPROXY sent to the appliance.

Data path: the original destination comes from `netfilter.original_destination`; then
  - `transparent_http`: exactly the HTTP/1.1 proxy (`Http1Session`) in origin-form mode, every
    request sent to the original destination and checked by policy (a Host that does not resolve
    to that address is not believed: policy sees the address), WebSocket Upgrade included;
  - `transparent_tls`: the ClientHello is peeked, not read (`intercept.peek_client_hello`), and
    policy decides on its SNI (believed when it resolves to the original destination) and the
    address: `passthrough`/`allow` splice the untouched bytes to the original destination,
    `intercept` terminates TLS (`intercept.TlsInterception`), `deny` answers a TLS alert.
A ClientHello without SNI (or with an IP literal) follows `[intercept] no_sni`. Transparent
clients never see a 407, so they are admitted without credentials (rules naming users do not
match them). Every connection ends in one access-log record.
"""

from __future__ import annotations

import logging

from gevent import socket

from .. import relay
from ..admission import Identity, admit
from ..context import ProxyContext
from ..errors import ClientError, PolicyDenied, UpstreamError
from ..netfilter import OriginalDestinationError, original_destination
from ..observe import AccessRecord
from ..protocols.http1 import serialize_head, status_line
from ..protocols.tls_clienthello import ALERT_ACCESS_DENIED, ClientHello, MalformedHello, NotTls
from ..upstream import OriginRoute, connect, is_ip_literal
from .http1 import Http1Session
from .intercept import TlsInterception, peek_client_hello, refuse_hello
from .tls import close_without_reset

log = logging.getLogger("appliance.transparent")

NOBODY = Identity(None)


def _hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class TransparentHttpSession:
    """One connection on a `transparent_http` listener."""

    def __init__(self, ctx: ProxyContext, sock: socket.socket, address, listening: tuple[str, int]) -> None:
        self.ctx, self.sock, self.address, self.listening = ctx, sock, address, listening

    def run(self) -> None:
        try:
            host, port = original_destination(self.sock, self.listening)
        except OriginalDestinationError as exc:
            _refuse_direct(self.ctx, self.sock, self.address[0], "transparent_http", exc)
            return
        route = OriginRoute("http", None, port, host)
        Http1Session(self.ctx, self.sock, self.address, "transparent_http", route, NOBODY).run()


class TransparentTlsSession:
    """One connection on a `transparent_tls` listener."""

    def __init__(self, ctx: ProxyContext, sock: socket.socket, address, listening: tuple[str, int]) -> None:
        self.ctx, self.sock, self.address, self.listening = ctx, sock, address, listening
        self.config = ctx.config
        self.client_ip = address[0]

    def run(self) -> None:
        try:
            host, port = original_destination(self.sock, self.listening)
        except OriginalDestinationError as exc:
            refuse_hello(self.sock, ALERT_ACCESS_DENIED)
            _log_direct(self.ctx, self.client_ip, "transparent_tls", exc)
            return
        observer = self.ctx.observer
        connection = observer.connection_opened("transparent_tls")
        record = AccessRecord("transparent_tls", self.client_ip, kind="tunnel", method="-",
                              target=_hostport(host, port), protocol="TLS", connection=connection)
        try:
            self._serve(host, port, record)
        except Exception as exc:               # a bug: this connection only
            log.exception("internal error on transparent TLS to %s", record.target)
            record.error = f"internal: {type(exc).__name__}: {exc}"
            self.sock.close()
        finally:
            observer.finish(record)
            observer.connection_closed("transparent_tls")

    def _serve(self, host: str, port: int, record: AccessRecord) -> None:
        try:
            limits = self.config.limits
            hello = peek_client_hello(self.sock, limits.header_timeout, limits.client_idle_timeout)
        except NotTls:
            hello = None
        except MalformedHello as exc:
            record.error = f"protocol: bad ClientHello: {exc}"
            log.info("transparent TLS from %s to %s: %s", self.client_ip, record.target, record.error)
            refuse_hello(self.sock, exc.alert)
            return
        except ClientError as exc:
            record.error = f"client: {exc}"
            log.info("transparent TLS from %s to %s: %s", self.client_ip, record.target, exc)
            close_without_reset(self.sock)
            return
        action, name = self._decide(hello, host, port, record)
        if action == "deny":
            log.info("transparent TLS from %s to %s refused: %s", self.client_ip, record.target, record.error)
            refuse_hello(self.sock, ALERT_ACCESS_DENIED)
        elif action == "intercept":
            record.kind, record.status = "intercept", 200
            route = OriginRoute("https", name, port, host)
            TlsInterception(self.ctx, self.sock, self.address, "transparent_tls", route, NOBODY).run()
        else:
            self._passthrough(host, port, record)

    def _decide(self, hello: ClientHello | None, host: str, port: int,
                record: AccessRecord) -> tuple[str, str]:
        """(action, name to intercept as) from policy, the SNI and `[intercept] no_sni`."""
        sni = hello.sni if hello is not None else None
        if sni is not None and is_ip_literal(sni):
            sni = None
        believed = sni if sni is not None and self.ctx.resolver.resolves_to(sni, host) else None
        if sni is not None:
            record.target = _hostport(sni, port)
            if believed is None:
                log.info("transparent TLS from %s: SNI %s does not resolve to the intercepted "
                         "address %s; policy sees the address", self.client_ip, sni, host)
        try:
            decision = admit(self.ctx, self.config, record, (), kind="tunnel", host=believed or host,
                             port=port, scheme="tls", method="", identity=NOBODY, addresses=(host,))
        except PolicyDenied as exc:
            record.rule, record.error = exc.rule, f"denied: {exc.rule}"
            return "deny", ""
        action = "passthrough" if decision.action == "allow" else decision.action
        if hello is None:
            return ("passthrough", "") if action != "deny" else ("deny", "")
        if sni is None and action != "deny":
            action = self.config.intercept.no_sni
            if action == "deny":
                record.error = "denied: no server name ([intercept] no_sni)"
        return action, sni or host


    def _passthrough(self, host: str, port: int, record: AccessRecord) -> None:
        """The client's bytes, ClientHello first, go to the original destination untouched."""
        try:
            origin = connect(self.ctx.resolver, host, port, self.config.upstream.connect_timeout, (host,))
        except UpstreamError as exc:
            record.error = f"upstream {exc.kind}: {exc.detail}"
            log.info("transparent TLS from %s to %s: %s", self.client_ip, record.target, exc)
            self.sock.close()
            return
        record.upstream, record.status = host, 200
        try:
            result = relay.pipe(self.sock, origin, self.config.limits.tunnel_idle_timeout)
        finally:
            origin.close()
            self.sock.close()
        record.bytes_up, record.bytes_down, record.error = result.a_to_b, result.b_to_a, result.error


def _log_direct(ctx: ProxyContext, client_ip: str, listener: str, exc: Exception) -> None:
    log.warning("%s: connection from %s refused: %s", listener, client_ip, exc)
    connection = ctx.observer.connection_opened(listener)
    ctx.observer.finish(AccessRecord(listener, client_ip, kind="tunnel", error=f"protocol: {exc}",
                                     connection=connection))
    ctx.observer.connection_closed(listener)


def _refuse_direct(ctx: ProxyContext, sock: socket.socket, client_ip: str, listener: str,
                   exc: Exception) -> None:
    """A plain-HTTP client that reached the transparent port directly gets a 400 saying so."""
    body = b"this port only serves connections redirected by the gateway's firewall\n"
    head = serialize_head(status_line(400, "Bad Request"), (
        ("Content-Type", "text/plain; charset=utf-8"), ("Content-Length", str(len(body))),
        ("Connection", "close")))
    try:
        sock.settimeout(1.0)
        sock.recv(65536)               # closing on unread bytes would reset instead of answering
        sock.sendall(head + body)
    except OSError:
        pass
    finally:
        sock.close()
    _log_direct(ctx, client_ip, listener, exc)
