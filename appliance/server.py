"""Starts the listeners, routes each accepted connection to its frontend, handles signals.

Each listener address gets a gevent `StreamServer`; all share one `Pool(max_connections)`, so a
flood of connections waits at accept instead of exhausting memory. Signals: TERM/INT drain and
stop, HUP reloads the config (kept if invalid), USR1 reopens the access log for logrotate.
"""

from __future__ import annotations

import logging
import signal
import time
from datetime import datetime, timezone

import gevent
from gevent import socket
from gevent.event import Event
from gevent.pool import Pool
from gevent.server import StreamServer

from pac.document import PacDocument
from pac.render import render_pac

from . import __version__
from .config import Address, Config, ConfigErrors, load
from .context import ProxyContext
from .frontends.admin import PROMETHEUS_TEXT, AdminSession, json_body
from .frontends.http1 import Http1Session
from .frontends.socks5 import Socks5Session
from .frontends.tls import TlsSession, listener_certificate, server_context
from .frontends.transparent import TransparentHttpSession, TransparentTlsSession
from .netfilter import allow_tproxy
from .observe import AccessLog, Observer

log = logging.getLogger("appliance.server")

STREAM_LISTENERS = ("http", "https", "admin", "pac", "socks5", "transparent_http", "transparent_tls")
TRANSPARENT = ("transparent_http", "transparent_tls")
DRAIN_SECONDS = 10.0


def listening_socket(address: Address, backlog: int = 1024, transparent: bool = False) -> socket.socket:
    family = socket.AF_INET6 if ":" in address.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    if transparent and not allow_tproxy(sock):
        log.info("%s: no IP_TRANSPARENT (needs CAP_NET_ADMIN): REDIRECT works, TPROXY does not", address)
    sock.bind((address.host, address.port))
    sock.listen(backlog)
    return sock


class ApplianceServer:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.access_log = AccessLog(config.log.access_log, config.log.format)
        self.observer = Observer(self.access_log)
        self.ctx = ProxyContext.from_config(config, self.observer)
        self.servers: list[tuple[str, StreamServer]] = []
        self.started_at = time.time()
        self._stop = Event()
        self._pool = Pool(config.limits.max_connections)
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
        return self._session({"/healthz": self._healthz, "/metrics": self._metrics, "/status": self._status})

    def _session(self, routes):
        limits = self.config.limits
        return lambda sock, addr: AdminSession(sock, addr, routes, limits.client_idle_timeout,
                                               limits.max_header_bytes).run()

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
        listen = self.config.listen
        if self.config.appliance.workers > 1:
            log.warning("appliance.workers = %d: this version serves from one process",
                        self.config.appliance.workers)
        if self._intercepts():
            self.ctx.leaf_contexts          # the CA now, not at the first intercepted client
        for kind in STREAM_LISTENERS:
            for address in getattr(listen, kind):
                handler = self._handler(kind, address)
                server = StreamServer(listening_socket(address, transparent=kind in TRANSPARENT),
                                      handler, spawn=self._pool)
                server.start()
                self.servers.append((kind, server))
                log.info("%s listener on %s", kind, address)
        if listen.dns:
            from pac.dns_server import DnsService
            self.dns = DnsService(listen.dns, lambda: self.config, self.observer)
            self.dns.start()
            for address in listen.dns:
                log.info("dns listener on %s (UDP and TCP)", address)
        log.info("appliance %s ready", __version__)

    def _intercepts(self) -> bool:
        return bool(self.config.listen.transparent_tls) or any(
            rule.action == "intercept" for rule in self.config.rules)

    @property
    def ready(self) -> bool:
        return (bool(self.servers) and all(s.started for _, s in self.servers)
                and (self.dns is None or self.dns.ready))

    def stop(self, timeout: float = DRAIN_SECONDS) -> None:
        if self.dns is not None:
            self.dns.stop()
        for _, server in self.servers:
            server.close()                   # stop accepting at once
        for session in list(self.ctx.h2_sessions):
            gevent.spawn(session.drain)      # GOAWAY: no new streams, finish those in flight
        for _, server in self.servers:
            server.stop(timeout=timeout)     # then give connections in flight time to finish
        self.ctx.pool.close()
        self.access_log.close()

    # --- admin routes -----------------------------------------------------------------------

    def _healthz(self, _headers=()) -> tuple[int, str, bytes]:
        if self.ready:
            return 200, "text/plain", b"ok\n"
        return 503, "text/plain", b"starting\n"

    def _metrics(self, _headers=()) -> tuple[int, str, bytes]:
        return 200, PROMETHEUS_TEXT, self.observer.metrics.render()

    def _status(self, _headers=()) -> tuple[int, str, bytes]:
        return 200, "application/json", json_body({
            "version": __version__, "config": str(self.config.path),
            "uptime_seconds": round(time.time() - self.started_at, 1),
            "listeners": [{"kind": k, "address": f"{s.server_host}:{s.server_port}"} for k, s in self.servers],
            "connections": len(self._pool), "pooled_origin_connections": self.ctx.pool.idle_count,
        })

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
        log.info("config reloaded from %s (listener changes need a restart)", config.path)

    def serve_forever(self) -> None:
        gevent.signal_handler(signal.SIGTERM, self._stop.set)
        gevent.signal_handler(signal.SIGINT, self._stop.set)
        gevent.signal_handler(signal.SIGHUP, self.reload)
        gevent.signal_handler(signal.SIGUSR1, self.access_log.reopen)
        self.start()
        self._stop.wait()
        log.info("stopping: draining connections for up to %gs", DRAIN_SECONDS)
        self.stop()
