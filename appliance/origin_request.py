"""One request sent to an origin over HTTP/1.1, whatever protocol the client spoke.

The HTTP/1.1 and HTTP/2 frontends both forward through this: it takes a connection from the
origin pool (or a fresh one for an Upgrade), writes the request head, runs the frontend's body
upload in a greenlet beside the response reader (so `Expect: 100-continue` and early answers
work), reads the final response head, and afterwards returns the connection to the pool only if
both messages ended cleanly at a boundary: never after an answer that came before the whole
request body was sent (the origin may never read the rest), nor after a response framed both by
Transfer-Encoding and Content-Length (RFC 9112 §6.3: a sign of smuggling or splitting).
"""

from __future__ import annotations

import struct
from typing import Callable

import gevent
from gevent import socket

from .context import ProxyContext
from .errors import ClientError, UpstreamError
from .protocols.forwarding import Target
from .protocols.http1 import (
    CHUNKED, NO_BODY, Framing, RemoteProtocolError, ResponseHead,
    header_value, parse_response_head, wants_keep_alive,
)
from .reader import SocketReader
from .relay import StreamGone, shutdown_socket
from .upstream import OriginConnection, OriginRoute, connect, wrap_tls

Upload = Callable[[socket.socket], None]
_BODY_FAILURES = (ClientError, UpstreamError, RemoteProtocolError, StreamGone)


class OriginRequest:
    def __init__(self, ctx: ProxyContext, target: Target, head: bytes, method: str,
                 framing: Framing, fresh: bool = False, tls: bool = False,
                 addresses: tuple[str, ...] = (), tls_host: str | None = None) -> None:
        self.ctx = ctx
        self.target = target
        self.head = head
        self.method = method
        self.framing = framing
        self.fresh = fresh                 # a connection of its own (Upgrade), never pooled
        self.tls = tls
        self.addresses = addresses         # dial these (admitted or the route's), not what DNS says now
        self.tls_host = tls_host or target.host   # the name the origin's certificate must carry
        self.timeout = ctx.config.upstream.response_timeout
        self.max_header_bytes = ctx.config.limits.max_header_bytes
        self.conn: OriginConnection | None = None
        self.reader: SocketReader | None = None
        self.upstream_address: str | None = None
        self._upload: gevent.Greenlet | None = None
        self.answered_early = False        # the final head came before the body was all sent

    # --- request ----------------------------------------------------------------------------

    @classmethod
    def routed(cls, ctx: ProxyContext, route: OriginRoute | None, target: Target, head: bytes,
               method: str, framing: Framing, fresh: bool = False,
               addresses: tuple[str, ...] = ()) -> OriginRequest:
        """A request toward `target`, or, on an intercepted connection, toward its route;
        `addresses`: what policy admitted the target as (`Decision.addresses`)."""
        if route is None:
            return cls(ctx, target, head, method, framing, fresh, tls=target.scheme in ("https", "wss"),
                       addresses=addresses)
        return cls(ctx, target, head, method, framing, fresh, tls=route.tls,
                   addresses=(route.address,) if route.address else addresses, tls_host=route.host)

    def _open(self) -> OriginConnection:
        host, port = self.tls_host, self.target.port
        tls = self.ctx.origin_tls if self.tls else None
        if self.fresh:
            timeout = self.ctx.config.upstream.connect_timeout
            sock = connect(self.ctx.resolver, host, port, timeout, self.addresses)
            if tls is not None:
                sock = wrap_tls(sock, tls, host, timeout)
            return OriginConnection(sock, (host, port))
        return self.ctx.pool.get(host, port, tls, self.addresses)

    def send(self, upload: Upload | None = None,
             informational: Callable[[bytes, ResponseHead], None] | None = None) -> ResponseHead:
        """Write the request, start the body upload, and return the final response head."""
        try:
            return self._send(upload, informational)
        except UpstreamError:
            failure = self.upload_failure()
            if failure is not None:      # the body breaking off is the real cause
                raise failure from None
            raise

    def _send(self, upload, informational) -> ResponseHead:
        for attempt in (1, 2):
            self.conn = conn = self._open()
            self.reader = SocketReader(conn.sock, "origin", self.timeout, self.target.hostport)
            self.upstream_address = conn.peer_address
            try:
                self.reader.sendall(self.head)
                if upload is not None and self.framing is not NO_BODY:
                    self._upload = gevent.spawn(self._run_upload, upload, conn)
                response = self._final_head(informational)
                self.answered_early = self._upload is not None and not self._upload.dead
                return response
            except UpstreamError as exc:
                conn.close()
                # A pooled connection the origin closed meanwhile: retry once, when no body
                # has been consumed (a streamed body cannot be replayed).
                if not (conn.reused and attempt == 1 and self.framing is NO_BODY and exc.kind == "closed"):
                    raise
        raise AssertionError("unreachable")

    def _run_upload(self, upload: Upload, conn: OriginConnection) -> Exception | None:
        """Runs beside the response reader; returns what stopped it, if anything."""
        try:
            upload(conn.sock)
            return None
        except _BODY_FAILURES as exc:
            # The body broke off: reset the origin connection (linger 0 makes close send RST)
            # so the origin never takes a truncated body for a complete request, and wake the
            # response reader, since this exchange is over. Only the read side is shut: SHUT_WR
            # would send the origin a FIN ahead of the RST, the very end of a request it must
            # not see.
            try:
                conn.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            except OSError:
                pass
            shutdown_socket(conn.sock, socket.SHUT_RD)
            return exc

    def _final_head(self, informational) -> ResponseHead:
        while True:
            raw = self.reader.read_head(self.max_header_bytes)
            if raw is None:
                raise UpstreamError("closed", self.target.hostport, "origin closed without a response")
            response = parse_response_head(raw)
            if response.status >= 200 or response.status == 101:
                return response
            if informational is not None:
                informational(raw, response)

    def upload_failure(self) -> Exception | None:
        if self._upload is not None and self._upload.dead:
            return self._upload.value
        return None

    # --- response ---------------------------------------------------------------------------

    def finish(self, response: ResponseHead, framing: Framing) -> bool:
        """After the response body (framed by `framing`, as the frontend read it): settle the
        upload, pool or close. True if the upload ended well.

        An error response may come before the body was consumed; then the upload is stopped and
        the connection closed, since it is no longer at a message boundary.
        """
        upload_ok = True
        if self._upload is not None:
            self._upload.join(timeout=0 if self.abandons_upload(response) else None)
            if not self._upload.dead:
                self._upload.kill()
                upload_ok = False
            elif self._upload.value is not None:
                self.close()
                raise self._upload.value
        conn = self.conn
        conn.buffered = self.reader.buffered       # bytes past the response: the pool refuses it
        if upload_ok and not self.fresh and not self.answered_early and \
                framing.kind != "close" and wants_keep_alive(response.version, response.headers) and \
                not (framing is CHUNKED and header_value(response.headers, "content-length") is not None):
            self.ctx.pool.put(conn)
        else:
            conn.close()
        return upload_ok

    def abandons_upload(self, response: ResponseHead) -> bool:
        """An error answer before the body was all sent: the rest of the body is not sent, and
        neither connection is at a message boundary afterwards."""
        return self.answered_early and response.status >= 400 and not self._upload.dead

    def close(self) -> None:
        if self._upload is not None and not self._upload.dead:
            self._upload.kill()
        if self.conn is not None:
            self.conn.close()
