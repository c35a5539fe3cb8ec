"""Starts the listeners, routes each accepted connection to its frontend, handles signals.

Each listener address gets a gevent `StreamServer` (`ListenerServer`: it still refuses
connections when out of file descriptors); all share one bounded `Pool`, and
`limits.ConnectionLimiter` answers connections over `[limits] max_connections` (in all, and per
client address) with a refusal, so a flood neither exhausts memory nor starves other clients.
Signals: TERM/INT drain ([limits] drain_timeout) and stop, HUP reloads the config (kept if
invalid; listeners added or removed are opened or closed, connections in flight keep going),
USR1 reopens the access log for logrotate.
"""

from __future__ import annotations

import logging
import signal
import time
from datetime import datetime, timezone
from pathlib import Path

import gevent
from gevent import socket
from gevent.event import Event
from gevent.pool import Pool
from gevent.server import StreamServer

from pac.document import PacDocument
from pac.render import render_pac

from . import __version__, systemd_notify
from .config import Address, Config, ConfigErrors, load
from .context import ProxyContext
from .auth import Authenticator
from .frontends.admin import PROMETHEUS_TEXT, AdminSession, BasicAuthGuard, json_body
from .frontends.http1 import Http1Session
from .frontends.socks5 import Socks5Session
from .frontends.status_page import status_page
from .frontends.tls import TlsSession, listener_certificate, server_context
from .frontends.transparent import TransparentHttpSession, TransparentTlsSession
from .limits import ConnectionLimiter, DescriptorReserve, RefusalLog, refuse_connection
from .netfilter import allow_tproxy
from .observe import AccessLog, Observer
from .status import StatusPublisher
from .supervisor import shares_ports

log = logging.getLogger("appliance.server")

STREAM_LISTENERS = ("http", "https", "admin", "pac", "socks5", "transparent_http", "transparent_tls")
TRANSPARENT = ("transparent_http", "transparent_tls")
REFUSAL_HEADROOM = 256     # greenlets beyond max_connections, to answer connections over it


def listening_socket(address: Address, backlog: int = 1024, transparent: bool = False,
                     reuse_port: bool | None = None) -> socket.socket:
    """A listening TCP socket on `address`. `reuse_port` (SO_REUSEPORT) lets every worker process
    bind the same port, the kernel spreading connections over them; None: only in a worker of
    the supervisor (`supervisor.shares_ports`), so two appliances never share a port by mistake."""
    family = socket.AF_INET6 if ":" in address.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port or (reuse_port is None and shares_ports()):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    if family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    if transparent and not allow_tproxy(sock):
        log.info("%s: no IP_TRANSPARENT (needs CAP_NET_ADMIN): REDIRECT works, TPROXY does not", address)
    sock.bind((address.host, address.port))
    sock.listen(backlog)
    return sock


class ListenerServer(StreamServer):
    """A StreamServer that, out of file descriptors, refuses waiting connections (through the
    descriptor reserve) instead of leaving them in the backlog, and accepts again as soon as
    descriptors are free; gevent alone would log a traceback and back off."""

    def __init__(self, listener, handle, spawn, kind: str, reserve: DescriptorReserve) -> None:
        super().__init__(listener, handle, spawn=spawn)
        self.kind = kind
        self.reserve = reserve

    def do_read(self):
        try:
            return super().do_read()
        except OSError as exc:
            if exc.errno not in DescriptorReserve.SHORTAGE:
                raise
            self.reserve.shed(self.kind, self.socket)
            return None


class ApplianceServer:
    def __init__(self, config: Config, worker: int | None = None,
                 status_dir: Path | None = None) -> None:
        self.config = config
        self.worker = worker                  # index among the supervisor's workers; None: alone
        self.status_dir = status_dir          # where workers leave status snapshots; None: alone
        self.access_log = AccessLog(config.log.access_log, config.log.format)
        self.observer = Observer(self.access_log)
        self.ctx = ProxyContext.from_config(config, self.observer)
        self.listeners: dict[tuple[str, Address], StreamServer] = {}
        self.limiter = ConnectionLimiter()
        self._admin_auth: BasicAuthGuard | None = None
        self.refusals = RefusalLog()
        self.descriptor_reserve = DescriptorReserve()
        self.started_at = time.time()
        self._stop = Event()
        # Refusals over a limit need a greenlet too: the pool has room for them beyond the limit.
        self._pool = Pool(config.limits.max_connections + REFUSAL_HEADROOM)
        self.dns = None                       # the WPAD DNS responder (UDP and TCP), if listening
        self.pac_document: PacDocument | None = None
        self._render_pac()

    # --- listeners --------------------------------------------------------------------------

    def _handler(self, kind: str, address: Address):
        listening = (address.host, address.port)
        if kind == "transparent_http":
            return lambda sock, addr: TransparentHttpSession(self.ctx, sock, addr, listening).run()
        if kind == "transparent_tls":
            return lambda sock, addr: TransparentTlsSession(self.ctx, sock, addr, listening).run()
        if kind == "socks5":
            return lambda sock, addr: Socks5Session(self.ctx, sock, addr, "socks5").run()
        if kind == "pac":
            return self._session(self._pac_routes())
        if kind == "http":
            return lambda sock, addr: Http1Session(self.ctx, sock, addr, "http").run()
        if kind == "https":
            context = server_context(*listener_certificate(self.config))
            return lambda sock, addr: TlsSession(self.ctx, context, sock, addr, "https").run()
        return self._session(self._admin_routes(), guard=self._admin_guard)

    def _session(self, routes, guard=None):
        limits = self.config.limits
        return lambda sock, addr: AdminSession(sock, addr, routes, limits.client_idle_timeout,
                                               limits.max_header_bytes, guard).run()

    def _admin_guard(self, client: str, path: str, headers):
        """[admin] users_file: Basic auth on the admin listener, read from the config in force."""
        users_file = self.config.admin.users_file
        if users_file is None or path == "/healthz":   # health checks carry no credentials
            return None
        if self._admin_auth is None or self._admin_auth.authenticator.users_file != users_file:
            self._admin_auth = BasicAuthGuard(Authenticator(users_file, "appliance admin"))
        return self._admin_auth(client, headers)

    def _pac_routes(self):
        """The pac listener: the PAC file (as WPAD expects it, too) and the CA to install."""
        from certs import CertificateAuthority
        ca = CertificateAuthority.load_or_create(self.config.appliance.state_dir, datetime.now(timezone.utc),
                                                 key_type=self.config.ca.key_type)
        pem, der = ca.cert_pem(), ca.cert_der()

        def pac_file(headers):
            return self.pac_document.respond(headers)
        return {"/proxy.pac": pac_file, "/wpad.dat": pac_file,
                "/ca.pem": lambda _: (200, "application/x-pem-file", pem),
                "/ca.der": lambda _: (200, "application/x-x509-ca-cert", der)}

    def _render_pac(self) -> None:
        """(Re)build the PAC file from the config in force; unchanged content keeps its ETag."""
        self.pac_document = PacDocument.build(render_pac(self.config, __version__),
                                              datetime.now(timezone.utc), self.pac_document)

    def start(self) -> None:
        if self._intercepts():
            self.ctx.leaf_contexts          # the CA now, not at the first intercepted client
        self._apply_listeners()
        log.info("appliance %s ready", __version__)
        systemd_notify.ready()               # Type=notify: listeners are up (no-op elsewhere)

    def _wanted_listeners(self) -> list[tuple[str, Address]]:
        listen = self.config.listen
        return [(kind, address) for kind in STREAM_LISTENERS for address in getattr(listen, kind)]

    def _apply_listeners(self) -> None:
        """Open the listeners the config names and close those it no longer does. Closing only
        stops accepting: connections already accepted on a closed listener go on to their end."""
        wanted = self._wanted_listeners()
        for key in [key for key in self.listeners if key not in wanted]:
            self.listeners.pop(key).close()
            log.info("%s listener on %s closed", *key)
        for kind, address in wanted:
            if (kind, address) in self.listeners:
                continue
            handler = self._limited(kind, self._handler(kind, address))
            server = ListenerServer(listening_socket(address, transparent=kind in TRANSPARENT),
                                    handler, self._pool, kind, self.descriptor_reserve)
            server.start()
            self.listeners[(kind, address)] = server
            log.info("%s listener on %s", kind, address)
        self._apply_dns()

    def _apply_dns(self) -> None:
        addresses = self.config.listen.dns
        if self.dns is not None and tuple(self.dns.addresses) == tuple(addresses):
            return
        if self.dns is not None:
            self.dns.stop()
            self.dns = None
            log.info("dns listener closed")
        if addresses:
            from pac.dns_server import DnsService
            self.dns = DnsService(addresses, lambda: self.config, self.observer)
            self.dns.start()
            for address in addresses:
                log.info("dns listener on %s (UDP and TCP)", address)

    def _limited(self, kind: str, handler):
        """`handler`, behind [limits] max_connections and max_connections_per_client (the admin
        listener is exempt from the per-client cap, so an operator can always look), and behind
        the last guard: an exception a frontend let through is logged once with its traceback
        and closes that connection only (frontends answer their own 500s where they can)."""
        def serve(sock, addr) -> None:
            client = addr[0]
            limits = self.config.limits
            per_client = limits.max_connections_per_client if kind != "admin" else limits.max_connections
            refused = self.limiter.acquire(client, limits.max_connections, per_client)
            if refused is not None:
                self.observer.metrics.child(self.observer.metrics.limit_refusals, refused).inc()
                self.refusals.note(client, refused, kind)
                refuse_connection(kind, sock, refused)
                return
            try:
                handler(sock, addr)
            except Exception:          # a bug no frontend caught: this connection only
                log.exception("internal error on the %s listener, connection from %s; closed", kind, client)
                sock.close()
            finally:
                self.limiter.release(client)
        return serve

    def _intercepts(self) -> bool:
        return bool(self.config.listen.transparent_tls) or any(
            rule.action == "intercept" for rule in self.config.rules)

    @property
    def ready(self) -> bool:
        return (bool(self.listeners) and all(s.started for s in self.listeners.values())
                and (self.dns is None or self.dns.ready))

    def stop(self, timeout: float | None = None) -> None:
        """Stop accepting, GOAWAY on HTTP/2, let requests and tunnels in flight go on for up
        to `timeout` ([limits] drain_timeout), then close what is left."""
        if timeout is None:
            timeout = self.config.limits.drain_timeout
        if self.dns is not None:
            self.dns.stop()
        if self.status_publisher is not None:
            self.status_publisher.stop()
        for server in self.listeners.values():
            server.close()                   # stop accepting at once
        for session in list(self.ctx.h2_sessions):
            gevent.spawn(session.drain)      # GOAWAY: no new streams, finish those in flight
        deadline = time.monotonic() + timeout
        for server in self.listeners.values():
            server.stop(timeout=max(0.0, deadline - time.monotonic()))
        self.ctx.pool.close()
        self.access_log.close()

    # --- admin routes -----------------------------------------------------------------------

    def _healthz(self, _headers=()) -> tuple[int, str, bytes]:
        if self.ready:
            return 200, "text/plain", b"ok\n"
        return 503, "text/plain", b"starting\n"

    def _metrics(self, _headers=()) -> tuple[int, str, bytes]:
        return 200, PROMETHEUS_TEXT, self.observer.metrics.render()

    # With a status_dir (several workers), each worker shares its snapshot through a file there
    # and /status.json merges the fresh ones; without, it serves this process's own.
    status_publisher: StatusPublisher | None = None

    def _admin_routes(self) -> dict:
        if self.status_dir is not None and self.status_publisher is None:
            self.status_publisher = StatusPublisher(self.status_dir, self.status_snapshot)
            self.status_publisher.start()
        return {"/healthz": self._healthz, "/metrics": self._metrics,
                "/status": status_page, "/status.json": self._status}

    def status_snapshot(self, now: float) -> dict:
        """This process's counts (status.StatusBoard) and what only the server knows."""
        # A closed session may stay in the weak set until the garbage collector comes by.
        h2 = [session for session in self.ctx.h2_sessions if session.sock.fileno() >= 0]
        snapshot = self.observer.board.snapshot(
            now, [{"kind": k, "address": f"{s.server_host}:{s.server_port}"}
                  for (k, _), s in self.listeners.items()],
            h2_connections=len(h2), h2_streams=sum(len(session.streams) for session in h2))
        snapshot.update({
            "name": self.config.appliance.name, "config": str(self.config.path),
            "uptime_seconds": round(now - self.started_at, 1),
            "connections": len(self._pool), "pooled_origin_connections": self.ctx.pool.idle_count,
        })
        return snapshot

    def _status(self, _headers=()) -> tuple[int, str, bytes]:
        now = time.time()
        publisher = self.status_publisher
        data = self.status_snapshot(now) if publisher is None else publisher.collect(now)
        return 200, "application/json", json_body(data)

    # --- lifecycle --------------------------------------------------------------------------

    def reload(self) -> None:
        try:
            config = load(self.config.path)
        except ConfigErrors as exc:
            log.error("reload refused, keeping the running config:\n%s", exc)
            return
        self.config = config
        self.ctx.use(config)
        self._render_pac()
        try:
            self._apply_listeners()
        except OSError as exc:               # a new address in use or not ours: keep the rest
            log.error("reload: cannot open a listener: %s", exc)
        log.info("config reloaded from %s", config.path)

    def serve_forever(self) -> None:
        gevent.signal_handler(signal.SIGTERM, self._stop.set)
        gevent.signal_handler(signal.SIGINT, self._stop.set)
        gevent.signal_handler(signal.SIGHUP, self.reload)
        gevent.signal_handler(signal.SIGUSR1, self.access_log.reopen)
        self.start()
        self._stop.wait()
        log.info("stopping: draining connections for up to %gs", self.config.limits.drain_timeout)
        self.stop()
