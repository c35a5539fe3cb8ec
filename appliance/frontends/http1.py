"""The explicit HTTP/1.1 proxy: one greenlet per client connection, requests served in turn.

Data path: read a head → parse (protocols.http1) → build an Intent → policy.decide → either
  - CONNECT host:port: connect, answer 200, relay bytes both ways (relay.pipe);
  - GET with `Upgrade: websocket`: forward the handshake on a fresh origin connection; after the
    origin's 101 both sides become a byte tunnel, any other answer is a normal response;
  - any other method in absolute-form: forward over a pooled origin connection, bodies streamed
    both ways (RFC 9112 framing, trailers kept), hop-by-hop fields dropped, Via added.
Every request or tunnel ends in exactly one access-log record. Errors map to replies in one
place (`errors.http_reply`); after an error the client connection is closed, since the rest of
its bytes can no longer be trusted to be at a message boundary.
"""

from __future__ import annotations

import itertools
import logging
import time

from gevent import socket

from .. import relay
from ..admission import Identity, admit
from ..context import ProxyContext
from ..errors import AuthRequired, ClientError, PolicyDenied, UpstreamError, http_reply
from ..limits import UploadPace
from ..observe import AccessRecord
from ..origin_request import OriginRequest
from ..protocols import forwarding as fwd
from ..protocols import websocket_bridge
from ..protocols.h2_mapping import check_websocket_switch, h2_via
from ..protocols.http1 import (
    Headers, LocalProtocolError, RemoteProtocolError, RequestHead, ResponseHead, body_decoder,
    chunk_header, header_value, header_values, last_chunk, parse_request_head, request_framing,
    request_line, response_framing, serialize_head, status_line, wants_keep_alive,
)
from ..reader import SocketReader, send
from ..upstream import OriginRoute, connect
from ..upstream_h2 import H2Tunnel
from ..websocket_relay import InspectedWebSocket, SocketEnd, inspector_for, offered_fields
from .client_session import ClientSession

log = logging.getLogger("appliance.http1")

REFUSAL_BODY_LIMIT = 64 * 1024
_EXPECTED = (AuthRequired, PolicyDenied, UpstreamError, RemoteProtocolError, LocalProtocolError)


def error_response(status: int, reason: str, body: str, pseudonym: str, extra: Headers = ()) -> bytes:
    payload = body.encode("utf-8")
    head = serialize_head(status_line(status, reason), extra + (
        ("Content-Type", "text/plain; charset=utf-8"), ("Content-Length", str(len(payload))),
        ("Connection", "close"), ("Via", fwd.via_value((1, 1), pseudonym)),
    ))
    return head + payload


class BodyPump:
    """Moves one message body from a reader to a socket, re-framing it for the receiving side."""

    def __init__(self, src: SocketReader, dst: socket.socket, dst_side: str, timeout: float,
                 chunked_out: bool, dst_name: str = "", pace: UploadPace | None = None) -> None:
        self.src, self.dst, self.dst_side = src, dst, dst_side
        self.timeout, self.dst_name = timeout, dst_name
        self.chunked_out = chunked_out
        self.pace = pace                 # for a request body: the rate it must keep up
        self.sent = 0

    def _recv(self) -> bytes:
        if self.pace is None:
            return self.src.recv()
        started = time.monotonic()
        data = self.src.recv()
        self.pace.note(time.monotonic() - started, len(data))
        return data

    def _send(self, data: bytes) -> None:
        send(self.dst, data, self.dst_side, self.timeout, self.dst_name)
        self.sent += len(data)

    def run(self, decoder, prefix: bytes = b"") -> Headers:
        """Stream the body; `prefix` (a head) goes out with the first body bytes."""
        pending = prefix
        while not decoder.done:
            data = self._recv()
            if not data:
                decoder.feed_eof()
                break
            for piece in decoder.feed(data):
                framed = chunk_header(len(piece)) + piece + b"\r\n" if self.chunked_out else piece
                self._send(pending + framed if pending else framed)
                pending = b""
        self.src.unread(decoder.leftover)
        if self.chunked_out:
            pending += last_chunk(fwd.forwardable_trailers(decoder.trailers))
        if pending:
            self._send(pending)
        return decoder.trailers


class Http1Session(ClientSession):
    """One client connection on an `http` listener (or `https` with ALPN http/1.1)."""

    def __init__(self, ctx: ProxyContext, sock: socket.socket, address, listener: str,
                 route: OriginRoute | None = None, identity: Identity | None = None) -> None:
        super().__init__(ctx, sock, address, listener, route, identity)
        self.limits = self.config.limits
        self.client = SocketReader(sock, "client", self.limits.client_idle_timeout)

    # --- connection loop --------------------------------------------------------------------

    def run(self) -> None:
        self.connection = self.ctx.observer.connection_opened(self.listener)
        try:
            if self.sock.family != socket.AF_UNIX:    # an intercepted tunnel's bridge is AF_UNIX
                self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            while self.serve_one():
                pass
        except ClientError as exc:
            log.debug("client %s: %s", self.client_ip, exc)
        finally:
            self.sock.close()
            self.ctx.observer.connection_closed(self.listener)

    def serve_one(self) -> bool:
        """Serve one request; True to keep the connection for another."""
        before = self.client.received - len(self.client.buffered)
        try:
            raw = self.client.read_head(self.limits.max_header_bytes, self.limits.header_timeout)
        except ClientError:
            return False                      # idle between requests, or gone: nothing to log
        except RemoteProtocolError as exc:
            self._finish_error(self._record(), exc)
            return False
        if raw is None:
            return False
        record = self._record()
        keep = False
        try:
            head = parse_request_head(raw)
            record.method, record.target = head.method, head.target
            if head.method != "CONNECT":
                keep = self.forward(head, record)
            elif self.route is None:
                keep = self.tunnel(head, record)
            else:
                raise RemoteProtocolError("CONNECT is for proxies; this connection goes to an origin", 405)
        except _EXPECTED as exc:
            self._finish_error(record, exc)
            return False
        except ClientError as exc:
            record.error = record.error or f"client: {exc}"
            self.ctx.observer.finish(record)
            raise
        except Exception as exc:             # a bug: answer 500, log it, keep serving others
            log.exception("internal error on %s %s", record.method, record.target)
            self._finish_error(record, exc)
            return False
        record.bytes_up = max(record.bytes_up, self.client.received - len(self.client.buffered) - before)
        self.ctx.observer.finish(record)
        return keep

    def _record(self) -> AccessRecord:
        return AccessRecord(self.listener, self.client_ip, connection=self.connection)

    def _finish_error(self, record: AccessRecord, exc: BaseException) -> None:
        reply = http_reply(exc)
        record.error = reply.log_error
        if isinstance(exc, PolicyDenied):
            record.rule = exc.rule
        if record.status == 0:                 # nothing sent yet: the client gets a real answer
            record.status = reply.status
            try:
                data = error_response(reply.status, reply.reason, reply.body, self.pseudonym, reply.headers)
                self.client.sendall(data)
                record.bytes_down += len(data)
            except ClientError:
                pass
        log.info("%s %s %s from %s: %s", record.method, record.target, record.status,
                 self.client_ip, reply.log_error)
        self.ctx.observer.finish(record)

    # --- CONNECT ----------------------------------------------------------------------------

    def tunnel(self, head: RequestHead, record: AccessRecord) -> bool:
        record.kind = "tunnel"
        host, port = fwd.parse_authority(head.target)
        decision = admit(self.ctx, self.config, record, head.headers, kind="tunnel", host=host,
                         port=port, scheme="tcp", method="CONNECT")
        if decision.action == "intercept":
            return self._intercept(host, port, record)
        origin = self._connect(host, port, decision.addresses)
        record.upstream = origin.getpeername()[0]
        reply = serialize_head(status_line(200, "Connection established"), ())
        record.bytes_up = self.client.received - len(self.client.buffered)
        self.client.sendall(reply)
        record.status = 200
        with self.ctx.observer.live("tunnel"):
            result = relay.pipe(self.sock, origin, self.limits.tunnel_idle_timeout,
                                a_to_b_first=self._take_buffered())
        origin.close()
        record.bytes_up += result.a_to_b
        record.bytes_down += len(reply) + result.b_to_a
        record.error = result.error
        return False

    def _intercept(self, host: str, port: int, record: AccessRecord) -> bool:
        """`intercept`: answer 200, then terminate the client's TLS inside the tunnel ourselves.
        The tunnel's own record ends here; each request inside gets its own."""
        reply = serialize_head(status_line(200, "Connection established"), ())
        record.bytes_up = self.client.received - len(self.client.buffered)
        self.client.sendall(reply)
        record.status, record.bytes_down, record.kind = 200, len(reply), "intercept"
        from .intercept import TunnelInterception    # it serves the tunnel with this module
        interception = TunnelInterception(self.ctx, (self.client_ip, 0), self.listener, host, port,
                                          Identity(record.user))
        interception.run_over_socket(self.sock, self._take_buffered())
        return False

    def _connect(self, host: str, port: int, addresses: tuple[str, ...]) -> socket.socket:
        return connect(self.ctx.resolver, host, port, self.config.upstream.connect_timeout, addresses)

    def _take_buffered(self) -> bytes:
        data, self.client.buffered = self.client.buffered, b""
        return data

    # --- forwarding -------------------------------------------------------------------------

    def request_target(self, head: RequestHead) -> fwd.Target:
        """Where the request says it goes: absolute-form on a proxy connection, origin-form
        with Host on an intercepted one (in the route's scheme)."""
        if self.route is not None:
            hosts = header_values(head.headers, "host")
            if len(hosts) != 1:
                raise RemoteProtocolError("a request needs exactly one Host field")
            target = fwd.parse_origin_form(head.target, hosts[0], self.route.scheme)
            if target.scheme != self.route.scheme:
                raise RemoteProtocolError(f"a {target.scheme}:// URL on a {self.route.scheme} connection", 421)
            return target
        if head.target.startswith("/") or head.target == "*":
            raise RemoteProtocolError("this is a proxy: requests need an absolute http:// URL")
        target = fwd.parse_absolute_target(head.target)
        if target.scheme in ("https", "wss"):
            raise RemoteProtocolError("https:// URLs go through CONNECT, not in a plain request", 501)
        return target

    def forward(self, head: RequestHead, record: AccessRecord) -> bool:
        target = self.request_target(head)
        framing = request_framing(head)
        if fwd.has_via_loop(head.headers, self.pseudonym):
            raise PolicyDenied("Via header names this appliance", "forwarding loop detected")
        websocket = fwd.is_websocket_upgrade(head.method, head.headers)
        record.kind = "websocket" if websocket else "request"
        if websocket:
            websocket_bridge.client_key(head.headers)       # a bad handshake never leaves: 400
        target, decision = self.admit_request(record, head.headers, target, record.kind, head.method)
        if self.route is not None:
            record.target = f"{target.scheme}://{target.authority}{target.path}"
        if websocket and self.route is None and target.hostport in self.config.upstream.h2_origins:
            return self.websocket_over_h2(head, target, record, decision.addresses)
        headers = fwd.origin_request_headers(head.headers, target, head.version, self.pseudonym,
                                             upgrade=websocket)
        if websocket:
            headers = offered_fields(self.config.websocket, headers)
        if framing.kind == "chunked":
            headers += (("Transfer-Encoding", "chunked"),)
        else:                                # one Content-Length, whatever spelling framed it
            headers = fwd.with_content_length(headers, framing.length)
        if framing.kind == "chunked" and self.client.buffered:
            body_decoder(framing).feed(self.client.buffered)   # refuse a bad first chunk before connecting
        upstream_head = serialize_head(request_line(head.method, target.path), headers)
        exchange = OriginExchange(self, head, record, target, upstream_head, framing, decision.addresses)
        return exchange.run(websocket)


    # --- WebSocket toward an HTTP/2 origin (RFC 8441) --------------------------------------

    def websocket_over_h2(self, head: RequestHead, target: fwd.Target, record: AccessRecord,
                          addresses: tuple[str, ...]) -> bool:
        """The client's Upgrade becomes an extended CONNECT; its 101 comes from us, with the
        accept value for its own key, once the origin has opened the stream with 200."""
        key = websocket_bridge.client_key(head.headers)
        block = websocket_bridge.extended_connect_block(target, head.headers, self.pseudonym)
        upstream = self.config.upstream
        tunnel, status, headers = H2Tunnel.open(self.ctx.resolver, target, block, upstream.connect_timeout,
                                                upstream.response_timeout, addresses)
        record.upstream = tunnel.sock.getpeername()[0]
        try:
            if status != 200:
                return self._h2_refusal(tunnel, status, headers, record)
            reply = serialize_head(status_line(101, "Switching Protocols"),
                                   websocket_bridge.switch_response_headers(key, headers)
                                   + (("Via", h2_via(self.pseudonym)),))
            self.client.sendall(reply)
            record.status = 101
            record.bytes_up = self.client.received - len(self.client.buffered)
            with self.ctx.observer.live("websocket"):
                result = relay.stream_pipe(tunnel, self.sock, self.limits.tunnel_idle_timeout,
                                           socket_first=self._take_buffered())
            record.bytes_up += result.b_to_a
            record.bytes_down += len(reply) + result.a_to_b
            record.error = result.error
            return False
        finally:
            tunnel.close()

    def _h2_refusal(self, tunnel: H2Tunnel, status: int, headers, record: AccessRecord) -> bool:
        """The origin did not open the tunnel: its answer goes to the client as a response, with
        a Content-Length when the body is short (WebSocket clients seldom read chunked refusals)."""
        record.status = status
        fields = fwd.strip_hop_by_hop(headers) + (("Connection", "close"), ("Via", h2_via(self.pseudonym)))
        pieces, size, body = [], 0, tunnel.body()
        try:
            for piece in body:
                pieces.append(piece)
                size += len(piece)
                if size > REFUSAL_BODY_LIMIT:
                    break
            else:
                payload = b"".join(pieces)
                fields = tuple((k, v) for k, v in fields if k.lower() != "content-length")
                self.client.sendall(serialize_head(status_line(status, ""), fields + (
                    ("Content-Length", str(len(payload))),)) + payload)
                record.bytes_down += len(payload)
                return False
            self.client.sendall(serialize_head(status_line(status, ""), fields + (("Transfer-Encoding", "chunked"),)))
            for piece in itertools.chain(pieces, body):
                self.client.sendall(chunk_header(len(piece)) + piece + b"\r\n")
                record.bytes_down += len(piece)
            self.client.sendall(last_chunk())
        except relay.StreamGone:
            pass                                   # the body ends short: the client sees it
        return False


class OriginExchange:
    """One client request forwarded to an origin and its response streamed back to the client."""

    def __init__(self, session: Http1Session, head: RequestHead, record: AccessRecord,
                 target: fwd.Target, upstream_head: bytes, framing, addresses: tuple[str, ...]) -> None:
        self.s = session
        self.head = head
        self.record = record
        self.framing = framing
        self.request = OriginRequest.routed(session.ctx, session.route, target, upstream_head,
                                            head.method, framing, addresses=addresses)

    def run(self, websocket: bool) -> bool:
        self.request.fresh = websocket
        try:
            response = self.request.send(self._upload, self._informational)
        finally:
            self.record.upstream = self.request.upstream_address
        if websocket and response.status == 101:
            return self._switch(response)
        return self._respond(response)

    def _upload(self, origin_sock: socket.socket) -> None:
        BodyPump(self.s.client, origin_sock, "origin", self.request.timeout,
                 chunked_out=self.framing.kind == "chunked", dst_name=self.request.target.hostport,
                 pace=UploadPace(self.s.limits.header_timeout)).run(body_decoder(self.framing))

    def _informational(self, raw: bytes, response: ResponseHead) -> None:
        if self.head.version >= (1, 1):          # 100 Continue and friends go to 1.1 clients
            self.s.client.sendall(raw)

    def _client_head(self, response: ResponseHead, headers: Headers) -> bytes:
        return serialize_head(status_line(response.status, response.reason, (1, 1)),
                              fwd.add_via(headers, response.version, self.s.pseudonym))

    def _respond(self, response: ResponseHead) -> bool:
        record = self.record
        try:
            framing = response_framing(self.head.method, response)
        except RemoteProtocolError:
            self.request.close()
            raise
        decoder = body_decoder(framing)
        keep_client = wants_keep_alive(self.head.version, self.head.headers) and \
            not self.request.abandons_upload(response)
        chunked_out = False
        if framing.kind in ("chunked", "close"):
            headers = fwd.response_fields(response.headers, None)
            if self.head.version >= (1, 1):
                chunked_out = True
                headers += (("Transfer-Encoding", "chunked"),)
            else:
                keep_client = False
        elif framing.kind == "length":
            headers = fwd.response_fields(response.headers, framing.length)
        else:                                # no body: a Content-Length here is metadata (HEAD, 304)
            headers = fwd.strip_hop_by_hop(response.headers)
        if not keep_client:
            headers += (("Connection", "close"),)
        elif self.head.version < (1, 1):
            headers += (("Connection", "keep-alive"),)    # HTTP/1.0 persistence is opt-in
        record.status = response.status
        record.content_type = header_value(response.headers, "content-type")
        pump = BodyPump(self.request.reader, self.s.sock, "client", self.s.limits.client_idle_timeout,
                        chunked_out=chunked_out)
        try:
            pump.run(decoder, prefix=self._client_head(response, headers))
        except RemoteProtocolError as exc:      # the origin's body broke its framing
            self.request.close()
            if pump.sent == 0:                  # nothing reached the client: it gets the 502
                record.status = 0
            raise RemoteProtocolError(f"origin response: {exc}", 502) from None
        except BaseException:
            self.request.close()
            raise
        finally:
            record.bytes_down += pump.sent
        return self.request.finish(response, framing) and keep_client

    def _switch(self, response: ResponseHead) -> bool:
        """After 101 Switching Protocols the two connections are one byte tunnel (RFC 9110 §15.2.2),
        or with `[websocket] inspect` one WebSocket inspected message by message; only after the
        origin completed the client's handshake (RFC 6455 §4.1), else 502."""
        record = self.record
        try:
            check_websocket_switch(websocket_bridge.client_key(self.head.headers), response.status,
                                   response.headers)
            inspector = inspector_for(self.s.config.websocket, response.headers)
        except RemoteProtocolError:
            self.request.close()
            raise
        headers = fwd.strip_hop_by_hop(response.headers, keep=frozenset({"upgrade"}))
        headers += (("Connection", "Upgrade"),)
        head = self._client_head(response, headers)
        self.s.client.sendall(head)
        record.status = 101
        record.bytes_up = self.s.client.received - len(self.s.client.buffered)
        origin_sock = self.request.conn.sock
        with self.s.ctx.observer.live("websocket"):
            if inspector is not None:
                result = InspectedWebSocket(SocketEnd(self.s.sock), SocketEnd(origin_sock), inspector,
                                            self.s.limits.tunnel_idle_timeout, record.target).run(
                    self.s._take_buffered(), self.request.reader.buffered)
            else:
                result = relay.pipe(self.s.sock, origin_sock, self.s.limits.tunnel_idle_timeout,
                                    a_to_b_first=self.s._take_buffered(),
                                    b_to_a_first=self.request.reader.buffered)
        self.request.close()
        record.bytes_up += result.a_to_b
        record.bytes_down += len(head) + result.b_to_a
        record.error = result.error
        return False
