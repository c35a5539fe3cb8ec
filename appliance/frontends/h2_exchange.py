"""What one HTTP/2 stream asks for, carried out (RFC 9113 §8, RFC 8441).

The HTTP/2 frontend (`h2.py`) runs one `H2Exchange` per stream in the stream's greenlet:
a plain request goes to the origin over HTTP/1.1 through `OriginRequest`, a CONNECT becomes a
tunnel (`relay.stream_pipe`), an extended CONNECT a WebSocket handshake toward the origin. Every
exchange ends in exactly one access-log record; errors map to a response or RST_STREAM on this
stream only.
"""

from __future__ import annotations

import base64
import logging
import os
import time

import h2.errors
from gevent import socket

from .. import relay
from ..admission import Identity
from ..errors import AuthRequired, ClientError, PolicyDenied, UpstreamError, http_reply
from ..limits import UploadPace
from ..observe import AccessRecord
from ..origin_request import OriginRequest
from ..protocols import forwarding as fwd
from ..protocols import h2_mapping as h2map
from ..protocols.http1 import (
    CHUNKED, NO_BODY, Framing, LocalProtocolError, RemoteProtocolError, body_decoder, chunk_header,
    last_chunk, request_line, response_framing, serialize_head,
)
from ..protocols.websocket_inspect import WebSocketInspector
from ..reader import send
from ..upstream import connect
from ..websocket_relay import InspectedWebSocket, SocketEnd, StreamEnd, inspector_for, offered_fields

log = logging.getLogger("appliance.h2")

_EXPECTED = (AuthRequired, PolicyDenied, UpstreamError, RemoteProtocolError, LocalProtocolError)


class H2Exchange:
    """What one stream asks for, carried out; always ends in one access-log record."""

    def __init__(self, session, stream, record: AccessRecord) -> None:
        self.s = session
        self.stream = stream
        self.record = record

    def run(self, block) -> None:
        record = self.record
        try:
            request = h2map.parse_request_block(block)
            record.method = request.method
            record.target = request.authority if request.kind == "connect" else \
                f"{request.scheme}://{request.authority}{request.path}"
            handler = {"request": self.forward, "connect": self.tunnel, "websocket": self.websocket}
            handler[request.kind](request)
        except h2map.StreamError as exc:
            record.status = getattr(exc, "status", 400)
            record.error = f"protocol: {exc}"
            if exc.status == 400 or self.stream.headers_sent:
                self._reset(h2.errors.ErrorCodes.PROTOCOL_ERROR)
            else:
                self._error_response(exc)
        except _EXPECTED as exc:
            self._error_response(exc)
        except relay.StreamGone:
            record.error = record.error or "stream reset by client"
        except ClientError as exc:
            record.error = f"client: {exc}"
        except Exception as exc:      # a bug: answer 500 on this stream only
            log.exception("internal error on h2 stream %s", self.stream.id)
            self._error_response(exc)
        finally:
            self.s.ctx.observer.finish(record)

    def _reset(self, code) -> None:
        try:
            self.stream.reset(code)
        except relay.StreamGone:
            pass

    def _error_response(self, exc: BaseException) -> None:
        reply = http_reply(exc)
        self.record.error = reply.log_error
        if isinstance(exc, PolicyDenied):
            self.record.rule = exc.rule
        if self.stream.headers_sent:
            self._reset(h2.errors.ErrorCodes.INTERNAL_ERROR)
            return
        self.record.status = reply.status
        body = reply.body.encode()
        try:
            self.stream.send_headers([(":status", str(reply.status)), *((k.lower(), v) for k, v in reply.headers),
                                      ("content-type", "text/plain; charset=utf-8"),
                                      ("content-length", str(len(body)))])
            self.stream.send(body)
            self.stream.end()
            self.record.bytes_down += len(body)
        except relay.StreamGone:
            pass
        except ClientError as exc:          # the client never opened its window for the body
            self.record.error = f"client: {exc}"
        log.info("h2 %s %s %s from %s: %s", self.record.method, self.record.target,
                 self.record.status, self.s.client_ip, reply.log_error)

    def authorize(self, req, kind: str, method: str):
        """Policy for this stream; on an intercepted connection the target is checked against
        the route first. Returns the target to use and the decision."""
        target = req.target
        if self.s.route is not None and req.scheme != self.s.route.scheme:
            raise RemoteProtocolError(f":scheme {req.scheme} on a {self.s.route.scheme} connection", 421)
        target, decision = self.s.admit_request(self.record, req.headers, target, kind, method)
        if self.stream.gone:            # reset already (rapid reset): the origin never hears of it
            raise relay.StreamGone()
        return target, decision

    # --- plain requests ---------------------------------------------------------------------

    def forward(self, req) -> None:
        record = self.record
        if req.scheme != "http" and self.s.route is None:
            raise RemoteProtocolError("https:// URLs go through CONNECT, not in a plain request", 501)
        target, decision = self.authorize(req, "request", req.method)
        method, path, headers = h2map.http1_request_head(req, self.s.pseudonym)
        check = h2map.DataLengthCheck(req.content_length)
        if self.stream.ended_with_headers:
            check.end()       # a content-length over 0 and no DATA to come: malformed, before the origin
            framing = NO_BODY
        elif req.content_length is not None:
            framing = Framing("length", req.content_length) if req.content_length else NO_BODY
        else:
            framing = CHUNKED
            headers += (("Transfer-Encoding", "chunked"),)
        origin = OriginRequest.routed(self.s.ctx, self.s.route, target,
                                      serialize_head(request_line(method, path), headers), method, framing,
                                      addresses=decision.addresses)

        def upload(sock: socket.socket) -> None:
            self._upload(sock, framing, check)

        try:
            if framing is NO_BODY:
                self._discard_body(check)
            response = origin.send(upload if framing is not NO_BODY else None, self._informational)
        finally:
            record.upstream = origin.upstream_address
        if response.status == 101:
            origin.close()
            raise UpstreamError("protocol", target.hostport, "origin switched protocols on a plain request")
        origin.finish(response, self._relay_response(origin, response))

    def _discard_body(self, check) -> None:
        data = self.stream.read()
        if data:
            raise h2map.StreamError("DATA on a request whose HEADERS ended the stream")
        check.end()

    def _upload(self, sock: socket.socket, framing: Framing, check) -> None:
        name = self.record.target
        timeout = self.s.config.upstream.response_timeout
        pace = UploadPace(self.s.config.limits.header_timeout)      # slow POST, as over HTTP/1.1
        while True:
            ours = not self.stream.peer_may_send()       # our windows closed: our backpressure
            started = time.monotonic()
            data = self.stream.read()
            if not data:
                break
            pace.note(0.0 if ours else time.monotonic() - started, len(data))
            check.data(len(data))
            send(sock, chunk_header(len(data)) + data + b"\r\n" if framing.kind == "chunked" else data,
                 "origin", timeout, name)
            self.stream.ack(len(data))
            self.record.bytes_up += len(data)
        check.end()
        if framing.kind == "chunked":
            trailers = h2map.parse_trailer_block(self.stream.trailers)   # checked like any field
            send(sock, last_chunk(fwd.forwardable_trailers(trailers)), "origin", timeout, name)

    def _informational(self, raw: bytes, response) -> None:
        self.stream.send_headers(h2map.h2_response_block(response.status, response.headers, self.s.pseudonym),
                                 final=False)

    def _download(self, origin: OriginRequest, decoder) -> None:
        """The response body as DATA; END_STREAM rides on its last piece, or on the trailers."""
        reader = origin.reader
        ended = False
        while not decoder.done:
            data = reader.recv()
            if not data:
                decoder.feed_eof()
                break
            pieces = decoder.feed(data)
            for i, piece in enumerate(pieces, 1):
                ended = i == len(pieces) and decoder.done and not decoder.trailers
                self.stream.send(piece, end_stream=ended)
                self.record.bytes_down += len(piece)
        reader.unread(decoder.leftover)
        if not ended:
            trailers = h2map.h2_trailer_block(decoder.trailers) if decoder.trailers else None
            self.stream.end(trailers)

    # --- CONNECT ----------------------------------------------------------------------------

    def tunnel(self, req) -> None:
        self.record.kind = "tunnel"
        if self.s.route is not None:
            raise RemoteProtocolError("CONNECT is for proxies; this connection goes to an origin", 405)
        host, port = req.target.host, req.target.port
        _, decision = self.authorize(req, "tunnel", "CONNECT")
        if decision.action == "intercept":
            self._intercept(host, port)
            return
        sock = connect(self.s.ctx.resolver, host, port, self.s.config.upstream.connect_timeout,
                       decision.addresses)
        self.record.upstream = sock.getpeername()[0]
        try:
            self.stream.send_headers([(":status", "200")])
            self.record.status = 200
            self._relay(sock)
        finally:
            sock.close()

    def _intercept(self, host: str, port: int) -> None:
        """`intercept`: the stream opens (200), then its TLS is terminated by the appliance."""
        from .intercept import TunnelInterception   # it serves the tunnel with our frontends
        self.stream.send_headers([(":status", "200")])
        self.record.status, self.record.kind = 200, "intercept"
        TunnelInterception(self.s.ctx, (self.s.client_ip, 0), self.s.listener, host, port,
                           Identity(self.record.user)).run_over_stream(self.stream)

    def _relay(self, sock: socket.socket, socket_first: bytes = b"",
               inspector: WebSocketInspector | None = None) -> None:
        self.stream.stall_timeout = None          # the relay bounds it by the tunnel idle timeout
        idle_timeout = self.s.config.limits.tunnel_idle_timeout
        with self.s.ctx.observer.live(self.record.kind):        # "tunnel" or "websocket"
            if inspector is None:
                result = relay.stream_pipe(self.stream, sock, idle_timeout, socket_first)
            else:                                 # `[websocket] inspect`: message by message
                result = InspectedWebSocket(StreamEnd(self.stream), SocketEnd(sock), inspector,
                                            idle_timeout, self.record.target).run(origin_first=socket_first)
        self.record.bytes_up += result.a_to_b
        self.record.bytes_down += result.b_to_a
        self.record.error = result.error

    # --- RFC 8441 WebSocket -----------------------------------------------------------------

    def websocket(self, req) -> None:
        self.record.kind = "websocket"
        target, decision = self.authorize(req, "websocket", "CONNECT")
        key = base64.b64encode(os.urandom(16)).decode()
        start, headers = h2map.websocket_http1_request(req, key, self.s.pseudonym)
        headers = offered_fields(self.s.config.websocket, headers)
        origin = OriginRequest.routed(self.s.ctx, self.s.route, target, serialize_head(start, headers),
                                      "GET", NO_BODY, fresh=True, addresses=decision.addresses)
        try:
            response = origin.send()
        finally:
            self.record.upstream = origin.upstream_address
        try:
            if response.status != 101:
                if 200 <= response.status < 300:
                    # RFC 8441 §5: a 2xx opens the WebSocket for the client, which this did not
                    raise h2map.UpstreamHandshakeError(
                        f"origin answered {response.status} to the WebSocket handshake", response.status)
                self._relay_response(origin, response)
                return
            h2map.check_websocket_switch(key, response.status, response.headers, request=req)
            inspector = inspector_for(self.s.config.websocket, response.headers)
            self.stream.send_headers(h2map.websocket_h2_response(response.headers))
            self.record.status = 200
            self._relay(origin.conn.sock, origin.reader.buffered, inspector)
        finally:
            origin.close()

    def _relay_response(self, origin: OriginRequest, response) -> Framing:
        """The origin's final response on the stream; returns how its body was framed. A head whose framing is broken (say two
        Content-Lengths) is a 502 and the origin connection is closed; a body framed by length
        goes on with that one content-length, any other without (a Content-Length beside
        Transfer-Encoding, RFC 9112 §6.3, does not say what the client gets)."""
        try:
            framing = response_framing(origin.method, response)
            fields = fwd.response_fields(response.headers, framing.length if framing.kind == "length" else None)
            block = h2map.h2_response_block(response.status, fields, self.s.pseudonym)
            decoder = body_decoder(framing)
            self.record.status = response.status
            if decoder.done:
                self.stream.send_headers(block, end_stream=True)
            else:
                self.stream.send_headers(block)
                self._download(origin, decoder)
        except BaseException:
            origin.close()
            raise
        return framing
