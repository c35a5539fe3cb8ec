"""TLS interception: terminate a client's TLS with a leaf from the appliance CA, then proxy its
requests to the origin it was going to, over TLS the appliance verifies itself.

Data path: the transparent TLS listener (`transparent.py`) and CONNECT tunnels whose rule says
`intercept` (HTTP/1.1 in `http1.py`, HTTP/2 streams in `h2_exchange.py`) come here with a socket
whose first bytes are the client's ClientHello, still unread (peeked), and an `OriginRoute`:
  1. connect to the origin with TLS, SNI and full verification (system store plus
     `[upstream] ca_file`); a verified connection is handed to the origin pool for the first
     request;
  2. handshake with the client using a leaf for the name it asked for (`certs.LeafStore`),
     offering ALPN `h2` and `http/1.1` (the HTTP/2 frontend translates to the origin's HTTP/1.1);
  3. serve the client with the HTTP/2 or HTTP/1.1 frontend in origin-form mode: every request
     goes to the route, policy is checked per request, WebSocket (Upgrade or RFC 8441) included.
An origin that fails verification is never trusted: the client's handshake completes with
ALPN http/1.1 only and every request is answered 502 with the reason, which is also logged.

Tunnels over TLS (the https listener) or HTTP/2 streams are not sockets the ssl module can wrap,
so they are bridged to one end of a socketpair, and the other end is intercepted.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from datetime import datetime, timezone

import gevent
from gevent import socket, ssl
from gevent.socket import wait_read

from .. import relay
from ..admission import Identity
from ..context import ProxyContext
from ..errors import ClientError, UpstreamError, http_reply
from ..observe import AccessRecord
from ..protocols.http1 import LocalProtocolError, RemoteProtocolError, parse_request_head
from ..protocols.tls_clienthello import (
    ALERT_INTERNAL_ERROR, ClientHello, MalformedHello, NotTls, alert_record, read_client_hello,
)
from ..reader import SocketReader
from ..upstream import OriginRoute, connect, is_ip_literal
from .tls import close_without_reset, handshake_failed, server_handshake

log = logging.getLogger("appliance.intercept")

HELLO_MAX_BYTES = 64 * 1024
MAX_PEEKS = 10_000               # each peek waits for more bytes, or 5 ms when none can be awaited
CONTEXT_TTL = 3600.0             # rebuild a leaf's SSLContext hourly, so renewed leaves are used
BRIDGE_LINGER = 5.0              # after an intercepted tunnel ends, time left to flush its bytes


class LeafContexts:
    """Server TLS contexts presenting minted leaves, one per (name, ALPN offer), LRU-bounded.

    The leaves themselves come from `certs.LeafStore` (memory and disk under state_dir/leaves,
    shared by workers); a context is rebuilt after `CONTEXT_TTL` so a renewed leaf is picked up.
    """

    def __init__(self, ctx: ProxyContext) -> None:
        from certs import CertificateAuthority, LeafStore
        config = ctx.config
        now = datetime.now(timezone.utc)
        ca = CertificateAuthority.load_or_create(config.appliance.state_dir, now,
                                                 key_type=config.ca.key_type)
        self.store = LeafStore(ca, config.appliance.state_dir / "leaves", config.ca.leaf_days,
                               config.ca.leaf_cache_entries, key_type=config.ca.key_type)
        self.max_entries = config.ca.leaf_cache_entries
        self._contexts: OrderedDict[tuple, tuple[float, ssl.SSLContext]] = OrderedDict()

    def context(self, name: str, alpn: tuple[str, ...]) -> ssl.SSLContext:
        key = (name, alpn)
        entry = self._contexts.get(key)
        if entry is not None and time.monotonic() - entry[0] < CONTEXT_TTL:
            self._contexts.move_to_end(key)
            return entry[1]
        chain, key_file = self.store.files([name], datetime.now(timezone.utc))
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.options |= ssl.OP_NO_COMPRESSION
        context.set_alpn_protocols(list(alpn))
        context.load_cert_chain(str(chain), str(key_file))
        self._contexts[key] = (time.monotonic(), context)
        while len(self._contexts) > self.max_entries:
            self._contexts.popitem(last=False)
        return context


def peek_client_hello(sock: socket.socket, timeout: float,
                      idle_timeout: float | None = None) -> ClientHello:
    """The ClientHello at the start of `sock`, left unread in the kernel for whoever comes next.

    The first byte may take `idle_timeout` (default: `timeout`); the whole hello must then be in
    within `timeout` of it, so a client trickling it byte by byte is cut off like a slow request
    head. Raises NotTls / MalformedHello (from the parser) or ClientError (closed, or too slow).
    SO_RCVLOWAT makes a TCP socket readable only once more bytes than already seen are in, so a
    hello split over segments costs one wakeup per segment, not a busy loop.
    """
    too_slow = ClientError(f"no complete TLS ClientHello within {timeout:g}s")
    wait_read(sock.fileno(), timeout=timeout if idle_timeout is None else idle_timeout,
              timeout_exc=ClientError("no TLS ClientHello: the client sent nothing"))
    deadline = time.monotonic() + timeout
    seen = 0
    for _ in range(MAX_PEEKS):
        left = deadline - time.monotonic()
        if left <= 0:
            break
        _set_lowat(sock, seen + 1)
        wait_read(sock.fileno(), timeout=left, timeout_exc=too_slow)
        try:
            data = sock.recv(HELLO_MAX_BYTES, socket.MSG_PEEK)
        except OSError as exc:
            raise ClientError(f"read failed: {exc.strerror or exc}") from None
        if not data:
            raise ClientError("closed before sending a TLS ClientHello")
        hello = read_client_hello(data, HELLO_MAX_BYTES)
        if hello is not None:
            _set_lowat(sock, 1)
            return hello
        if len(data) == seen:        # no progress: the peer closed mid-hello, or no RCVLOWAT
            gevent.sleep(0.005)
        seen = len(data)
    _set_lowat(sock, 1)
    raise too_slow


def _set_lowat(sock: socket.socket, n: int) -> None:
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, n)
    except OSError:
        pass


def refuse_hello(sock: socket.socket, alert: int) -> None:
    """Answer a ClientHello with a fatal alert. The hello is read first: closing with unread
    bytes would send RST, and the client would see a reset instead of the alert."""
    try:
        sock.settimeout(1.0)
        sock.recv(HELLO_MAX_BYTES)
        sock.sendall(alert_record(alert))
        relay.shutdown_socket(sock, socket.SHUT_WR)
    except OSError:
        pass
    finally:
        sock.close()


class TlsInterception:
    """One intercepted TLS connection, from the peeked ClientHello to its last request."""

    def __init__(self, ctx: ProxyContext, sock: socket.socket, address, listener: str,
                 route: OriginRoute, identity: Identity) -> None:
        self.ctx = ctx
        self.sock = sock
        self.address = address
        self.client_ip = address[0]
        self.listener = listener
        self.route = route
        self.identity = identity

    def run(self) -> None:
        origin_failure = self._verify_origin()
        alpn = ("h2", "http/1.1") if origin_failure is None else ("http/1.1",)
        try:
            context = self.ctx.leaf_contexts.context(self.route.host, alpn)
        except Exception as exc:         # CA unusable, or a name no certificate can carry
            log.error("cannot mint a certificate for %s: %s", self.route.host, exc)
            refuse_hello(self.sock, ALERT_INTERNAL_ERROR)
            return
        try:
            tls = server_handshake(context, self.sock, self.ctx.config.limits)
        except (OSError, ValueError, ClientError) as exc:
            # Typically the client does not trust the appliance CA ("certificate unknown").
            handshake_failed(self.ctx, self.listener, self.client_ip, exc,
                             f"intercepting {self.route.host}")
            return
        if origin_failure is not None:
            self._answer_failure(tls, origin_failure)
            return
        from .h2 import H2Session            # the frontends import this module
        from .http1 import Http1Session
        session = H2Session if tls.selected_alpn_protocol() == "h2" else Http1Session
        session(self.ctx, tls, self.address, self.listener, self.route, self.identity).run()

    def _verify_origin(self) -> UpstreamError | None:
        """Connect and verify the origin before the client's handshake, so a refusal is known
        in time; the verified connection serves the first request."""
        route = self.route
        try:
            conn = self.ctx.pool.get(route.host, route.port, self.ctx.origin_tls,
                                     (route.address,) if route.address else ())
        except UpstreamError as exc:
            log.warning("intercepted %s:%d from %s: origin refused: %s", route.host, route.port,
                        self.client_ip, exc)
            return exc
        self.ctx.pool.put(conn)
        return None

    def _answer_failure(self, tls: socket.socket, failure: UpstreamError) -> None:
        """Every request on this connection gets the 502 (or 504) saying why; one is enough."""
        from .http1 import error_response
        limits = self.ctx.config.limits
        record = AccessRecord(self.listener, self.client_ip, kind="request",
                              target=f"https://{self.route.host}:{self.route.port}/")
        reader = SocketReader(tls, "client", limits.client_idle_timeout)
        try:
            raw = reader.read_head(limits.max_header_bytes)
            if raw is not None:
                head = parse_request_head(raw)
                record.method = head.method
                record.target = f"https://{self.route.host}:{self.route.port}{head.target}"
        except (ClientError, RemoteProtocolError, LocalProtocolError):
            pass
        reply = http_reply(failure)
        record.status, record.error = reply.status, reply.log_error
        try:
            data = error_response(reply.status, reply.reason, reply.body, self.ctx.config.appliance.name)
            reader.sendall(data)
            record.bytes_down = len(data)
        except ClientError:
            pass
        finally:
            tls.close()
            self.ctx.observer.finish(record)


class TunnelInterception:
    """A CONNECT tunnel whose rule says `intercept`: TLS is terminated inside it."""

    def __init__(self, ctx: ProxyContext, address, listener: str, host: str, port: int,
                 identity: Identity) -> None:
        self.ctx = ctx
        self.address = address
        self.listener = listener
        self.host, self.port = host, port
        self.identity = identity

    def run_over_socket(self, sock: socket.socket, buffered: bytes = b"") -> None:
        """An HTTP/1.1 CONNECT: the client's own socket, unless it is TLS already (the https
        listener) or bytes were read past the CONNECT head; then through a bridge."""
        if not buffered and not relay.is_tls(sock):
            self._serve(sock)
            return
        idle = self.ctx.config.limits.tunnel_idle_timeout
        self._bridged(lambda end: relay.pipe(sock, end, idle, a_to_b_first=buffered))

    def run_over_stream(self, stream: relay.StreamSide) -> None:
        """An HTTP/2 CONNECT stream."""
        idle = self.ctx.config.limits.tunnel_idle_timeout
        self._bridged(lambda end: relay.stream_pipe(stream, end, idle))

    def _bridged(self, pipe_to) -> None:
        outer, inner = socket.socketpair()
        bridge = gevent.spawn(pipe_to, outer)
        try:
            self._serve(inner)
        finally:
            inner.close()
            bridge.join(timeout=BRIDGE_LINGER)
            bridge.kill(block=True, timeout=1.0)
            outer.close()

    def _serve(self, sock: socket.socket) -> None:
        limits = self.ctx.config.limits
        try:
            hello = peek_client_hello(sock, limits.header_timeout, limits.client_idle_timeout)
        except NotTls:
            self._relay_plain(sock)
            return
        except MalformedHello as exc:
            log.info("CONNECT %s:%d from %s: bad ClientHello: %s", self.host, self.port,
                     self.address[0], exc)
            refuse_hello(sock, exc.alert)
            return
        except ClientError as exc:
            log.info("CONNECT %s:%d from %s: %s", self.host, self.port, self.address[0], exc)
            close_without_reset(sock)
            return
        route = self._route(hello)
        TlsInterception(self.ctx, sock, self.address, self.listener, route, self.identity).run()

    def _route(self, hello: ClientHello) -> OriginRoute:
        """The name the client asked for (SNI, else the CONNECT host), dialled at the CONNECT
        target, which is what policy allowed."""
        name = hello.sni or self.host
        if name == self.host:
            return OriginRoute("https", name, self.port)
        address = self.host if is_ip_literal(self.host) else self.ctx.resolver.resolve(self.host)[0]
        return OriginRoute("https", name, self.port, address)

    def _relay_plain(self, sock: socket.socket) -> None:
        """Not TLS inside an intercepted tunnel: nothing to decrypt, so it is relayed as is."""
        log.info("CONNECT %s:%d from %s: not TLS, relayed without interception", self.host,
                 self.port, self.address[0])
        try:
            origin = connect(self.ctx.resolver, self.host, self.port,
                             self.ctx.config.upstream.connect_timeout)
        except UpstreamError as exc:
            log.info("CONNECT %s:%d from %s: %s", self.host, self.port, self.address[0], exc)
            sock.close()
            return
        try:
            with self.ctx.observer.live("tunnel"):
                relay.pipe(sock, origin, self.ctx.config.limits.tunnel_idle_timeout)
        finally:
            origin.close()
            sock.close()

