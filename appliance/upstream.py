"""Reaching origins: name resolution, TCP connect with deadlines, and the HTTP/1.1 keep-alive pool.

Sits after policy on the data path. Names are looked up in /etc/hosts first, then either in the
configured `[upstream] nameservers` (plain DNS over UDP, built with dnslib) or the system resolver.
Every failure becomes an `UpstreamError` whose `kind` says what an admin must look at: dns,
connect, timeout.
"""

from __future__ import annotations

import ipaddress
import os
import random
from gevent import socket
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import gevent
from dnslib import QTYPE, RCODE, DNSRecord
from gevent import ssl

from .config import Address, UpstreamSection
from .errors import UpstreamError

DNS_CACHE_SECONDS = 30.0
DNS_CACHE_ENTRIES = 4096


def is_ip_literal(host: str) -> bool:
    return _literal(host) is not None


def _literal(host: str) -> str | None:
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        return None


class HostsFile:
    """/etc/hosts, re-read when it changes (tests and admins add entries while we run)."""

    def __init__(self, path: str = "/etc/hosts") -> None:
        self.path = path
        self._mtime = None
        self._names: dict[str, list[str]] = {}

    def lookup(self, name: str) -> list[str]:
        try:
            mtime = os.stat(self.path).st_mtime_ns
        except OSError:
            return []
        if mtime != self._mtime:
            self._names = self._read()
            self._mtime = mtime
        return self._names.get(name.lower(), [])

    def _read(self) -> dict[str, list[str]]:
        names: dict[str, list[str]] = {}
        with open(self.path, encoding="utf-8", errors="replace") as f:
            for line in f:
                fields = line.split("#", 1)[0].split()
                if len(fields) >= 2 and _literal(fields[0]):
                    for name in fields[1:]:
                        names.setdefault(name.lower(), []).append(fields[0])
        return names


class Resolver:
    """Name → addresses, with a small cache; IP literals pass straight through."""

    def __init__(self, nameservers: tuple[Address, ...] = (), timeout: float = 5.0,
                 hosts: HostsFile | None = None) -> None:
        self.nameservers = nameservers
        self.timeout = timeout
        self.hosts = hosts or HostsFile()
        self._cache: OrderedDict[str, tuple[float, list[str]]] = OrderedDict()

    def resolve(self, host: str) -> list[str]:
        literal = _literal(host)
        if literal:
            return [literal]
        found = self.hosts.lookup(host)
        if found:
            return found
        cached = self._cache.get(host)
        if cached and cached[0] > time.monotonic():
            return cached[1]
        addresses = self._query_nameservers(host) if self.nameservers else self._system(host)
        if not addresses:
            raise UpstreamError("dns", host, "name has no addresses")
        self._cache[host] = (time.monotonic() + DNS_CACHE_SECONDS, addresses)
        while len(self._cache) > DNS_CACHE_ENTRIES:
            self._cache.popitem(last=False)
        return addresses

    def resolves_to(self, host: str, address: str) -> bool:
        """Whether `host` stands for `address` (an intercepted client's claim, checked against
        the address it actually dialled); a name that does not resolve stands for nothing."""
        try:
            return address in self.resolve(host)
        except UpstreamError:
            return False

    def _system(self, host: str) -> list[str]:
        try:
            with gevent.Timeout(self.timeout, UpstreamError("dns", host, "resolver timed out")):
                infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
        except socket.gaierror as exc:
            raise UpstreamError("dns", host, exc.strerror or str(exc)) from None
        return list(dict.fromkeys(info[4][0] for info in infos))

    def _query_nameservers(self, host: str) -> list[str]:
        last = "no nameserver answered"
        for server in self.nameservers:
            try:
                found = []
                for qtype in ("A", "AAAA"):
                    found += self._ask(server, host, qtype)
                return found
            except UpstreamError as exc:
                last = f"{server}: {exc.detail}"
            except (OSError, ValueError) as exc:
                last = f"{server}: {exc}"
        raise UpstreamError("dns", host, last)

    def _ask(self, server: Address, host: str, qtype: str) -> list[str]:
        query = DNSRecord.question(host, qtype)
        query.header.id = random.randrange(1 << 16)
        family = socket.AF_INET6 if ":" in server.host else socket.AF_INET
        with socket.socket(family, socket.SOCK_DGRAM) as sock:
            sock.settimeout(self.timeout)
            sock.connect((server.host, server.port))
            sock.send(query.pack())
            while True:
                reply = DNSRecord.parse(sock.recv(65535))
                if reply.header.id == query.header.id:
                    break
        if reply.header.rcode == RCODE.NXDOMAIN:
            raise UpstreamError("dns", host, "no such name (NXDOMAIN)")
        if reply.header.rcode != RCODE.NOERROR:
            raise UpstreamError("dns", host, f"nameserver answered {RCODE.get(reply.header.rcode)}")
        return [str(rr.rdata) for rr in reply.rr if rr.rtype == getattr(QTYPE, qtype)]


@dataclass(frozen=True)
class OriginRoute:
    """Where the requests of an intercepted connection go, whatever they name.

    A transparent or intercepted client dialled one address (or one CONNECT target); its
    requests are sent there and nowhere else. `host` is the name the origin's TLS certificate
    must carry (the SNI or CONNECT host) and the only host such requests may name; None for
    transparent plain HTTP, where each request's Host is checked against `address` instead.
    """

    scheme: str                      # "http" or "https" toward the origin
    host: str | None
    port: int
    address: str | None = None       # the original destination to dial; None: resolve `host`

    @property
    def tls(self) -> bool:
        return self.scheme == "https"


def connect(resolver: Resolver, host: str, port: int, timeout: float,
            addresses: tuple[str, ...] = ()) -> socket.socket:
    """Open a TCP connection to host:port, trying in turn within `timeout` each of `addresses`
    (those policy admitted, or an intercepted connection's original destination), or, when none
    are given, each address the name resolves to."""
    deadline = time.monotonic() + timeout
    target = f"{host}:{port}"
    addresses = addresses or resolver.resolve(host)
    last: UpstreamError | None = None
    for address in addresses:
        left = deadline - time.monotonic()
        if left <= 0:
            break
        family = socket.AF_INET6 if ":" in address else socket.AF_INET
        try:
            sock = socket.socket(family, socket.SOCK_STREAM)
        except OSError as exc:         # EMFILE: out of descriptors, a local failure, said so
            raise UpstreamError("connect", target, f"cannot open a socket: {exc.strerror or exc}",
                                exc.errno) from None
        sock.settimeout(left)
        try:
            sock.connect((address, port))
        except socket.timeout:
            sock.close()
            last = UpstreamError("timeout", target, f"connect to {address} timed out")
            continue
        except OSError as exc:
            sock.close()
            last = UpstreamError("connect", target, f"{address}: {exc.strerror or exc}", exc.errno)
            continue
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock
    raise last or UpstreamError("timeout", target, f"no address answered within {timeout:g}s")


def origin_tls_context(ca_file: Path | None) -> ssl.SSLContext:
    """Verifying client context for TLS to origins: the system store plus `[upstream] ca_file`."""
    # gevent.ssl.create_default_context() hands back the stdlib's blocking context; build
    # gevent's own, which verifies (CERT_REQUIRED, check_hostname) like the default one.
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.load_default_certs()
    if ca_file is not None:
        context.load_verify_locations(cafile=str(ca_file))
    context.set_alpn_protocols(["http/1.1"])
    return context


def wrap_tls(sock: socket.socket, context: ssl.SSLContext, host: str, timeout: float) -> socket.socket:
    """TLS handshake toward an origin, checking its certificate for `host`."""
    sock.settimeout(timeout)
    try:
        return context.wrap_socket(sock, server_hostname=host)
    except socket.timeout:
        sock.close()
        raise UpstreamError("timeout", host, "TLS handshake timed out") from None
    except ssl.SSLCertVerificationError as exc:
        sock.close()
        raise UpstreamError("tls", host, f"origin certificate verification failed: "
                            f"{exc.verify_message or exc.reason or exc}") from None
    except (ssl.SSLError, ssl.CertificateError, OSError) as exc:
        sock.close()
        raise UpstreamError("tls", host, getattr(exc, "reason", None) or str(exc)) from None


@dataclass
class OriginConnection:
    """A connection to an origin and the bytes read past the last response."""

    sock: socket.socket
    key: tuple
    buffered: bytes = b""
    reused: bool = False
    idle_since: float = field(default_factory=time.monotonic)

    @cached_property
    def peer_address(self) -> str:
        """The address dialled, asked of the socket once for all the requests it carries."""
        return self.sock.getpeername()[0]

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


class OriginPool:
    """Bounded keep-alive pool of origin connections, newest first, per (host, port, TLS
    context, dialled address): an intercepted client's connections never serve another route."""

    def __init__(self, settings: UpstreamSection, resolver: Resolver) -> None:
        self.settings = settings
        self.resolver = resolver
        self._idle: OrderedDict[tuple, list[OriginConnection]] = OrderedDict()
        self._count = 0

    def get(self, host: str, port: int, tls: ssl.SSLContext | None = None,
            addresses: tuple[str, ...] = ()) -> OriginConnection:
        """A live idle connection if one is pooled, else a new one (TLS-verified for `host`
        when `tls` is given, dialled to one of `addresses` when given): connections are pooled
        per set of addresses, so one dialled for another answer of DNS is never taken."""
        key = (host, port, id(tls) if tls is not None else None, tuple(sorted(addresses)))
        conns = self._idle.get(key)
        while conns:
            conn = conns.pop()
            self._count -= 1
            if not conns:
                del self._idle[key]
            if self._usable(conn):
                conn.reused = True
                return conn
            conn.close()
            conns = self._idle.get(key)
        timeout = self.settings.connect_timeout
        sock = connect(self.resolver, host, port, timeout, addresses)
        if tls is not None:
            sock = wrap_tls(sock, tls, host, timeout)
        return OriginConnection(sock, key)

    def put(self, conn: OriginConnection) -> None:
        """Return a connection whose last response ended cleanly."""
        if conn.buffered or self.settings.pool_max_idle_per_host <= 0:
            conn.close()
            return
        conns = self._idle.setdefault(conn.key, [])
        self._idle.move_to_end(conn.key)
        if len(conns) >= self.settings.pool_max_idle_per_host:
            conns.pop(0).close()
            self._count -= 1
        conn.idle_since = time.monotonic()
        conns.append(conn)
        self._count += 1
        while self._count > self.settings.pool_max_idle:
            self._evict_oldest()

    def _evict_oldest(self) -> None:
        key, conns = next(iter(self._idle.items()))
        conns.pop(0).close()
        self._count -= 1
        if not conns:
            del self._idle[key]

    def _usable(self, conn: OriginConnection) -> bool:
        """Not expired, and the origin has neither closed it nor sent unasked-for bytes."""
        if time.monotonic() - conn.idle_since > self.settings.pool_idle_timeout:
            return False
        conn.sock.settimeout(0.0)
        try:
            if isinstance(conn.sock, ssl.SSLSocket):
                # TLS 1.3 session tickets arrive after the handshake: a read that only
                # consumes records and wants more is an idle connection, data is not.
                conn.sock.recv(1)
            else:
                conn.sock.recv(1, socket.MSG_PEEK)
        except (BlockingIOError, ssl.SSLWantReadError):
            return True
        except (OSError, ValueError):
            return False
        return False                      # EOF (b"") or bytes nobody asked for: not reusable

    def close(self) -> None:
        for conns in self._idle.values():
            for conn in conns:
                conn.close()
        self._idle.clear()
        self._count = 0

    @property
    def idle_count(self) -> int:
        return self._count
