"""The `https` listener: TLS from the client to the appliance, then ALPN picks the protocol.

ALPN `h2` hands the connection to the HTTP/2 frontend; `http/1.1` or no ALPN gives exactly the
HTTP/1.1 proxy of the `http` listener, inside TLS (Chromium's "HTTPS proxy" scheme, curl's
`--proxy https://`). The certificate is the admin's `[tls] cert`, or one minted from the
appliance CA for the appliance's name, localhost, 127.0.0.1 and ::1.
"""

from __future__ import annotations

import logging
from datetime import datetime, timezone
from pathlib import Path

from gevent import socket, ssl

from ..config import Config
from ..context import ProxyContext
from ..observe import AccessRecord
from .h2 import H2Session
from .http1 import Http1Session

log = logging.getLogger("appliance.tls")

ALPN = ["h2", "http/1.1"]


def listener_certificate(config: Config) -> tuple[Path, Path]:
    """The certificate chain and key files the https listener presents."""
    if config.tls.cert is not None:
        return config.tls.cert, config.tls.key
    from certs.authority import CertificateAuthority
    from certs.leaf import issue_files
    now = datetime.now(timezone.utc)
    ca = CertificateAuthority.load_or_create(config.appliance.state_dir, now, key_type=config.ca.key_type)
    names = list(dict.fromkeys([config.appliance.name, "localhost", "127.0.0.1", "::1"]))
    return issue_files(ca, names, config.appliance.state_dir / "tls", "https-listener", now,
                       config.ca.leaf_days, key_type=config.ca.key_type)


def server_context(cert: Path, key: Path) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2      # RFC 9113 §9.2: TLS 1.2 or later
    context.options |= ssl.OP_NO_COMPRESSION
    context.set_alpn_protocols(ALPN)
    context.load_cert_chain(str(cert), str(key))
    return context


class TlsSession:
    """One client connection on the https listener: handshake, then the chosen protocol."""

    def __init__(self, ctx: ProxyContext, context: ssl.SSLContext, sock: socket.socket, address,
                 listener: str = "https") -> None:
        self.ctx = ctx
        self.context = context
        self.sock = sock
        self.address = address
        self.listener = listener

    def run(self) -> None:
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)   # no Nagle stalls on frames
        self.sock.settimeout(self.ctx.config.limits.client_idle_timeout)   # handshake deadline
        try:
            tls = self.context.wrap_socket(self.sock, server_side=True)
        except ssl.SSLEOFError:
            # Closed before or during the ClientHello: a browser's unused preconnect, not an
            # error worth a log line per connection.
            log.debug("TLS connection from %s closed during the handshake", self.address[0])
            self.sock.close()
            return
        except (OSError, ValueError) as exc:
            handshake_failed(self.ctx, self.listener, self.address[0], exc, self.sock)
            return
        if tls.selected_alpn_protocol() == "h2":
            H2Session(self.ctx, tls, self.address, self.listener).run()
        else:
            Http1Session(self.ctx, tls, self.address, self.listener).run()


def handshake_failed(ctx: ProxyContext, listener: str, client_ip: str, exc: BaseException,
                     sock: socket.socket, what: str = "") -> None:
    """A client's TLS handshake with us failed: one log line, one access-log record, closed."""
    reason = getattr(exc, "reason", None) or str(exc) or type(exc).__name__
    where = f" ({what})" if what else ""
    log.info("TLS handshake with %s failed%s: %s", client_ip, where, reason)
    connection = ctx.observer.connection_opened(listener)
    record = AccessRecord(listener, client_ip, kind="tls", error=f"tls handshake: {reason}",
                          protocol="TLS", connection=connection, target=what or "-")
    ctx.observer.finish(record)
    ctx.observer.connection_closed(listener)
    sock.close()
