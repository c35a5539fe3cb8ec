"""The `https` listener: TLS from the client to the appliance, then ALPN picks the protocol.

ALPN `h2` hands the connection to the HTTP/2 frontend; `http/1.1` or no ALPN gives exactly the
HTTP/1.1 proxy of the `http` listener, inside TLS (Chromium's "HTTPS proxy" scheme, curl's
`--proxy https://`). The certificate is the admin's `[tls] cert`, or one minted from the
appliance CA for the appliance's name, localhost, 127.0.0.1 and ::1.

Every handshake with a client (here and in `intercept.py`) goes through `server_handshake`: the
first byte must come within `[limits] client_idle_timeout`, the whole handshake within
`header_timeout` after it, and a failed one is closed without a reset, so the alert OpenSSL sent
reaches the client.
"""

from __future__ import annotations

import logging
import os
from datetime import datetime, timezone
from pathlib import Path

import gevent
from gevent import socket, ssl
from gevent.socket import wait_read

from ..config import Config, LimitsSection
from ..context import ProxyContext
from ..errors import ClientError
from ..observe import AccessRecord
from .h2 import H2Session
from .http1 import Http1Session

log = logging.getLogger("appliance.tls")

ALPN = ["h2", "http/1.1"]
UNREAD_DRAIN_READS = 16         # at most this many 64 KiB reads of a failed client's leftovers


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
        try:
            tls = server_handshake(self.context, self.sock, self.ctx.config.limits)
        except ClientIdle:
            # Idle or closed before the ClientHello: a browser's unused preconnect, not an
            # error worth a log line per connection.
            log.debug("TLS connection from %s closed before the handshake", self.address[0])
            return
        except ssl.SSLEOFError:
            log.debug("TLS connection from %s closed during the handshake", self.address[0])
            return
        except (OSError, ValueError, ClientError) as exc:
            handshake_failed(self.ctx, self.listener, self.address[0], exc)
            return
        if tls.selected_alpn_protocol() == "h2":
            H2Session(self.ctx, tls, self.address, self.listener).run()
        else:
            Http1Session(self.ctx, tls, self.address, self.listener).run()


class ClientIdle(ClientError):
    """No byte of a ClientHello within the idle timeout, or closed before sending one."""


def server_handshake(context: ssl.SSLContext, sock: socket.socket,
                     limits: LimitsSection) -> ssl.SSLSocket:
    """Our side of a client's TLS handshake on `sock`, bounded in time.

    The socket timeout bounds each read only, so a client trickling its hello a byte at a time
    would hold the connection for ever; the whole handshake therefore gets `header_timeout`
    from its first byte, like a request head. Raises ClientIdle, ClientError (too slow) or the
    ssl/OS error; on any failure `sock` is closed, without a reset.
    """
    sock.settimeout(limits.client_idle_timeout)
    tls = None
    try:
        wait_read(sock.fileno(), timeout=limits.client_idle_timeout,
                  timeout_exc=ClientIdle("no TLS ClientHello"))
        tls = context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
        with gevent.Timeout(limits.header_timeout, ClientError(
                f"no complete TLS handshake within {limits.header_timeout:g}s")):
            tls.do_handshake()
        return tls
    except BaseException:
        close_without_reset(tls or sock)
        raise


def close_without_reset(sock: socket.socket) -> None:
    """Close a connection whose handshake failed. Bytes left unread (the rest of an HTTP request
    sent to a TLS port, say) would make the kernel answer RST, which can destroy the alert just
    sent; so what already arrived is read and dropped first (never waiting), then FIN."""
    try:
        raw = socket.socket(fileno=os.dup(sock.fileno()))   # below the TLS layer, if any
    except OSError:
        sock.close()
        return
    try:
        raw.setblocking(False)
        for _ in range(UNREAD_DRAIN_READS):
            if not raw.recv(65536):
                break
    except OSError:                 # nothing more to read now (BlockingIOError), or reset
        pass
    finally:
        try:
            raw.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        raw.close()
        sock.close()


def handshake_failed(ctx: ProxyContext, listener: str, client_ip: str, exc: BaseException,
                     what: str = "") -> None:
    """A client's TLS handshake with us failed (the socket is closed already): one log line, one
    access-log record."""
    reason = getattr(exc, "reason", None) or str(exc) or type(exc).__name__
    where = f" ({what})" if what else ""
    log.info("TLS handshake with %s failed%s: %s", client_ip, where, reason)
    connection = ctx.observer.connection_opened(listener)
    record = AccessRecord(listener, client_ip, kind="tls", error=f"tls handshake: {reason}",
                          protocol="TLS", connection=connection, target=what or "-")
    ctx.observer.finish(record)
    ctx.observer.connection_closed(listener)
