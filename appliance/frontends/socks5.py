"""The SOCKS5 listener (RFC 1928, RFC 1929): one greenlet per client connection.

Data path: greeting → method (username/password when `[auth]` has users, and then never
no-auth) → request → Intent → policy.decide, like every other frontend:
  - CONNECT to an IPv4 or IPv6 address or a domain name (resolved here, so `socks5h` works):
    connect, reply with the bound address, then the shared byte relay (splice, half-close);
    a rule saying `intercept` terminates TLS inside, as for HTTP CONNECT;
  - UDP ASSOCIATE: `socks5_udp.UdpAssociation`, policy per datagram destination;
  - BIND: answered "command not supported" (no FTP active mode through this proxy).
Every refusal is a SOCKS5 reply code (`errors.socks5_reply`), a log line and one access-log
record; a client that does not speak SOCKS5 is closed.
"""

from __future__ import annotations

import logging

from gevent import socket

from .. import relay
from ..admission import Identity, admit
from ..errors import AuthRequired, ClientError, PolicyDenied, UpstreamError, socks5_reply
from ..observe import AccessRecord
from ..protocols import socks5
from ..protocols.forwarding import Target
from ..reader import SocketReader
from ..upstream import connect
from .client_session import ClientSession

log = logging.getLogger("appliance.socks5")

MAX_HANDSHAKE_BYTES = 1024          # the longest greeting, credentials or request is 515 bytes


class Socks5Session(ClientSession):
    """One client connection on a `socks5` listener."""

    def run(self) -> None:
        observer = self.ctx.observer
        self.connection = observer.connection_opened(self.listener)
        self.reader = SocketReader(self.sock, "client", self.config.limits.client_idle_timeout)
        self.replied = False
        record = AccessRecord(self.listener, self.client_ip, kind="tunnel", method="CONNECT",
                              protocol="SOCKS5", connection=self.connection)
        try:
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._serve(record)
        except socks5.Socks5Error as exc:
            self._refuse(record, exc, exc.answer)
        except (PolicyDenied, UpstreamError) as exc:
            self._refuse(record, exc)
        except ClientError as exc:             # gone, stalled, or failed to authenticate
            record.error = record.error or f"client: {exc}"
            log.info("SOCKS5 %s %s from %s: closed (%s)", record.method, record.target,
                     self.client_ip, record.error)
        except Exception as exc:             # a bug: this client only
            log.exception("internal error on SOCKS5 from %s", self.client_ip)
            self._refuse(record, exc)
        finally:
            self.sock.close()
            observer.finish(record)
            observer.connection_closed(self.listener)

    # --- handshake --------------------------------------------------------------------------

    def _read(self, parse):
        """The next message, read until `parse` has all of it; the rest stays buffered."""
        data = self.reader.buffered
        self.reader.buffered = b""
        for _ in range(MAX_HANDSHAKE_BYTES):
            parsed = parse(data)
            if parsed is not None:
                message, used = parsed
                self.reader.buffered = data[used:]
                return message
            if len(data) > MAX_HANDSHAKE_BYTES:
                raise socks5.Socks5Error("handshake message too long")
            more = self.reader.recv()
            if not more:
                raise ClientError("closed during the SOCKS5 handshake")
            data += more
        raise socks5.Socks5Error("handshake message too long")

    def _send(self, data: bytes) -> None:
        self.reader.sendall(data)

    def _serve(self, record: AccessRecord) -> None:
        greeting = self._read(socks5.parse_greeting)
        authenticator = self.ctx.authenticator
        method = socks5.choose_method(greeting, authenticator is not None)
        self._send(socks5.method_selection(method))
        if method == socks5.METHOD_NONE_ACCEPTABLE:
            wanted = "username/password" if authenticator is not None else "no authentication"
            if authenticator is not None:
                record.status = 407
            raise socks5.Socks5Error(f"client offers no acceptable method (needs {wanted})")
        user = None
        if method == socks5.METHOD_USERPASS:
            user = self._authenticate(record)
        request = self._read(socks5.parse_request)
        target = Target("tcp", request.host, request.port)
        record.target = target.hostport
        if request.command == socks5.CMD_CONNECT:
            self._connect(request, record, Identity(user))
        elif request.command == socks5.CMD_UDP_ASSOCIATE:
            from .socks5_udp import UdpAssociation
            record.kind, record.method = "udp", "UDP_ASSOCIATE"
            UdpAssociation(self, request, record, Identity(user)).run()
        else:
            record.method = "BIND"
            raise socks5.Socks5Error("BIND is not supported", socks5.REP_COMMAND_NOT_SUPPORTED)

    def _authenticate(self, record: AccessRecord) -> str:
        credentials = self._read(socks5.parse_credentials)
        record.user = credentials.username
        try:
            user = self.ctx.authenticator.verify(self.client_ip, credentials.username, credentials.password)
        except AuthRequired as exc:
            record.status, record.error = 407, f"auth: {exc.reason}"
            self._send(socks5.auth_reply(False))
            raise ClientError(exc.reason) from None
        self._send(socks5.auth_reply(True))
        return user

    # --- CONNECT ----------------------------------------------------------------------------

    def _connect(self, request: socks5.Request, record: AccessRecord, identity: Identity) -> None:
        decision = admit(self.ctx, self.config, record, (), kind="tunnel", host=request.host,
                         port=request.port, scheme="tcp", method="CONNECT", identity=identity)
        if decision.action == "intercept":
            self._reply(socks5.REP_SUCCEEDED, self.sock.getsockname())
            record.status, record.kind = 200, "intercept"
            from .intercept import TunnelInterception      # it serves the tunnel with our frontends
            TunnelInterception(self.ctx, (self.client_ip, 0), self.listener, request.host,
                               request.port, identity).run_over_socket(self.sock, self._take_buffered())
            return
        origin = connect(self.ctx.resolver, request.host, request.port,
                         self.config.upstream.connect_timeout, decision.addresses)
        try:
            record.upstream = origin.getpeername()[0]
            self._reply(socks5.REP_SUCCEEDED, origin.getsockname())
            record.status = 200
            result = relay.pipe(self.sock, origin, self.config.limits.tunnel_idle_timeout,
                                a_to_b_first=self._take_buffered())
        finally:
            origin.close()
        record.bytes_up, record.bytes_down, record.error = result.a_to_b, result.b_to_a, result.error

    def _take_buffered(self) -> bytes:
        data, self.reader.buffered = self.reader.buffered, b""
        return data

    def _reply(self, code: int, bound: tuple = ("0.0.0.0", 0)) -> None:
        self.replied = True
        self._send(socks5.reply(code, bound[0].split("%", 1)[0], bound[1]))

    def _refuse(self, record: AccessRecord, exc: BaseException, answer: bytes = b"") -> None:
        code, error = socks5_reply(exc)
        record.error = record.error or error
        if isinstance(exc, PolicyDenied):
            record.rule = exc.rule
        record.status = record.status or _status(exc, code)
        is_request_refusal = not isinstance(exc, socks5.Socks5Error) or exc.reply is not None
        try:
            if answer:
                self._send(answer)
            elif is_request_refusal and not self.replied:
                self._reply(code)
        except ClientError:
            pass
        log.info("SOCKS5 %s %s from %s: %s (%s)", record.method, record.target, self.client_ip,
                 socks5.REPLY_NAMES.get(code, code) if is_request_refusal else "closed", record.error)


def _status(exc: BaseException, code: int) -> int:
    """The access log's HTTP-like status: whose fault it was, as Squid would log it."""
    if isinstance(exc, socks5.Socks5Error):         # the client's request, not an origin
        return 501 if code == socks5.REP_COMMAND_NOT_SUPPORTED else 400
    return {socks5.REP_NOT_ALLOWED: 403, socks5.REP_TTL_EXPIRED: 504}.get(code, 502)
