"""The `dns` listener: the WPAD DNS responder on UDP and TCP, a thin gevent shell.

Where it sits: beside the proxy's listeners, started by `appliance.server`. Each datagram or TCP
message goes to `pac.dns_answer.DnsResponder`, which decides; this module only moves bytes, asks
the `[dns] forward` resolvers when told to, and counts each query once in
`appliance_dns_queries_total{result}`.

Bounds, so that neither a flood nor a stalled client hurts the appliance: local answers are made
inline in the UDP read loop (a malformed packet costs no greenlet); forwarded queries run in a
`Pool(FORWARDS_IN_FLIGHT)`, and get SERVFAIL at once when it is full; TCP clients share a
`Pool(TCP_CLIENTS)` and each query must arrive within `[limits] client_idle_timeout` (at most
MAX_IDLE); every upstream exchange has UPSTREAM_TIMEOUT per server and transport.

Forwarding (RFC 5452): a fresh socket (so a fresh source port) and a random id per upstream query,
on a connected UDP socket so that the kernel drops datagrams from anyone but that server; an
answer with TC is asked again over TCP (RFC 7766).
"""

from __future__ import annotations

import logging
import random
import struct
import time
from typing import Callable

import gevent
from gevent import socket
from gevent.exceptions import ConcurrentObjectUseError
from gevent.pool import Group, Pool
from gevent.server import StreamServer

from appliance.config import Address, Config
from appliance.observe import Observer
from appliance.supervisor import shares_ports

from .dns_answer import (
    MAX_MESSAGE,
    MAX_QUERY,
    OUTSIDER,
    UDP_MAX,
    DnsResponder,
    Dropped,
    Forward,
    Reply,
    UpstreamFailed,
    UpstreamTruncated,
    answer_from_upstream,
    servfail,
)

log = logging.getLogger("appliance.dns")

UPSTREAM_TIMEOUT = 2.0     # seconds for one forward server over one transport
MAX_IDLE = 10.0            # a TCP client's wait per query at most; client_idle_timeout caps it lower
TCP_CLIENTS = 128          # TCP clients served at once; more wait in the kernel's accept backlog
FORWARDS_IN_FLIGHT = 256   # forwarded UDP queries at once; beyond that, SERVFAIL at once
UDP_SEND_TIMEOUT = 1.0     # a full send buffer drops the answer after this (UDP is lossy anyway)
RESULTS = ("answered", "forwarded", "refused", "truncated", "servfail", "malformed")

_ids = random.SystemRandom()    # upstream query ids: unpredictable (RFC 5452 §9.2)


class DnsService:
    """UDP and TCP on every address of `[listen] dns`, answering with the config in force."""

    def __init__(self, addresses: tuple[Address, ...], config: Callable[[], Config],
                 observer: Observer) -> None:
        self.addresses = addresses
        self._config = config
        self._metrics = observer.metrics
        self._responder: DnsResponder | None = None
        self._responder_config: Config | None = None
        self._udp: list[socket.socket] = []
        self._readers = Group()
        self._forwards = Pool(FORWARDS_IN_FLIGHT)
        self._tcp_clients = Pool(TCP_CLIENTS)
        self._tcp_servers: list[StreamServer] = []
        self._refusals = RefusalLog()
        self.ready = False
        for result in RESULTS:     # every series exists from the start, at 0
            self._metrics.child(self._metrics.dns_queries, result)

    def start(self) -> None:
        try:
            for address in self.addresses:
                udp = bound_socket(address, socket.SOCK_DGRAM)
                self._udp.append(udp)
                server = StreamServer(bound_socket(address, socket.SOCK_STREAM), self._serve_tcp,
                                      spawn=self._tcp_clients)
                self._tcp_servers.append(server)
                server.start()
                self._readers.spawn(self._serve_udp, udp)
        except BaseException:
            self.stop()
            raise
        self.ready = True

    def stop(self) -> None:
        self.ready = False
        for server in self._tcp_servers:
            server.close()                  # stop accepting at once
        self._readers.kill(timeout=1)
        self._forwards.kill(timeout=1)
        for server in self._tcp_servers:
            server.stop(timeout=1)          # a DNS client in flight needs no long drain
        for sock in self._udp:
            sock.close()
        self._tcp_servers, self._udp = [], []

    def responder(self) -> DnsResponder:
        """The responder for the config in force, rebuilt only when a reload swapped it."""
        config = self._config()
        if config is not self._responder_config or self._responder is None:
            self._responder, self._responder_config = DnsResponder(config), config
        return self._responder

    # --- UDP ----------------------------------------------------------------------------------

    def _serve_udp(self, sock: socket.socket) -> None:
        sock.settimeout(UDP_SEND_TIMEOUT)   # gevent applies it to sendto; an idle read just loops
        while True:
            try:
                packet, peer = sock.recvfrom(MAX_QUERY + 1)   # one byte more shows "too large"
            except socket.timeout:
                continue
            except OSError as error:
                if sock.fileno() < 0:
                    return
                log.warning("reading a datagram failed: %s", error)
                gevent.sleep(0.1)
                continue
            try:
                self._datagram(sock, packet, peer)
            except Exception:    # noqa: BLE001 - a bug for one packet must not stop the listener
                log.exception("internal error answering %s", peer[0])
            gevent.sleep(0)      # a read that finds data does not yield: let a flood share the hub

    def _datagram(self, sock: socket.socket, packet: bytes, peer) -> None:
        outcome = self.responder().respond(packet, peer[0], UDP_MAX)
        if isinstance(outcome, Forward):
            if not self._forwards.full():
                self._forwards.spawn(self._forward_udp, sock, outcome, peer)
                return
            outcome = servfail(outcome)
        self._send_udp(sock, self._account(outcome, peer[0]), peer)

    def _forward_udp(self, sock: socket.socket, forward: Forward, peer) -> None:
        self._send_udp(sock, self._account(self.forward(forward), peer[0]), peer)

    @staticmethod
    def _send_udp(sock: socket.socket, data: bytes | None, peer) -> None:
        if data is None:
            return
        try:
            sock.sendto(data, peer)
        except (OSError, ConcurrentObjectUseError) as error:   # full buffer, or another waits on it
            log.debug("answer to %s dropped: %s", peer[0], error)

    # --- TCP (RFC 7766: 2-byte length, several queries per connection, answered in order) ------

    def _serve_tcp(self, sock: socket.socket, peer) -> None:
        client = peer[0]
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            while True:
                idle = min(self._config().limits.client_idle_timeout, MAX_IDLE)
                deadline = time.monotonic() + idle
                prefix = read_exactly(sock, 2, deadline)
                if prefix is None:
                    return
                (length,) = struct.unpack("!H", prefix)
                if not 0 < length <= MAX_QUERY:
                    self._account(Dropped(f"TCP message of {length} bytes"), client)
                    return
                message = read_exactly(sock, length, deadline)
                if message is None:
                    return
                outcome = self.responder().respond(message, client, None)
                if isinstance(outcome, Forward):
                    outcome = self.forward(outcome)
                data = self._account(outcome, client)
                if data is not None:
                    sock.settimeout(idle)
                    sock.sendall(struct.pack("!H", len(data)) + data)
                if outcome.result == "malformed":
                    return                   # a stream that carried garbage is not worth reading on
                gevent.sleep(0)              # pipelined queries are all buffered: let others run
        except socket.timeout:
            log.debug("TCP client %s stalled; closed", client)
        except OSError as error:
            log.debug("TCP client %s: %s", client, error)
        finally:
            sock.close()

    # --- forwarding ---------------------------------------------------------------------------

    def forward(self, forward: Forward) -> Reply:
        """Each forward server in turn (UDP, then TCP if truncated); SERVFAIL if all fail."""
        for server in forward.servers:
            outcome = ask_udp(server, forward)
            if isinstance(outcome, UpstreamTruncated):
                outcome = ask_tcp(server, forward)
            if isinstance(outcome, Reply):
                return outcome
            log.debug("forward to %s failed: %s", server, outcome.reason)
        return servfail(forward)

    # --- the end of every query ---------------------------------------------------------------

    def _account(self, outcome: Reply | Dropped, client: str) -> bytes | None:
        """Count the query, log what an admin may want, and return the bytes to send, if any."""
        m = self._metrics
        m.child(m.dns_queries, outcome.result).inc()
        if isinstance(outcome, Dropped):
            log.debug("dropped a packet from %s: %s", client, outcome.reason)
            return None
        if outcome.reason == OUTSIDER:
            self._refusals.refused(client)
        elif outcome.reason:
            log.debug("%s for %s: %s", outcome.result, client, outcome.reason)
        return outcome.data


def ask_udp(server: Address, forward: Forward) -> Reply | UpstreamTruncated | UpstreamFailed:
    query_id = _ids.randrange(0x10000)
    deadline = time.monotonic() + UPSTREAM_TIMEOUT
    try:
        with socket.socket(_family(server), socket.SOCK_DGRAM) as sock:
            sock.connect((server.host, server.port))    # only this server's datagrams get in
            sock.settimeout(UPSTREAM_TIMEOUT)
            sock.send(forward.query(query_id))
            for _ in range(64):                         # forged or stale datagrams, bounded
                sock.settimeout(max(deadline - time.monotonic(), 0.001))
                outcome = answer_from_upstream(forward, query_id, sock.recv(MAX_MESSAGE))
                if outcome is not None:
                    return outcome
            return UpstreamFailed("only datagrams that were not the answer")
    except socket.timeout:
        return UpstreamFailed(f"no answer over UDP in {UPSTREAM_TIMEOUT:g}s")
    except OSError as error:
        return UpstreamFailed(f"UDP: {error}")


def ask_tcp(server: Address, forward: Forward) -> Reply | UpstreamFailed:
    query_id = _ids.randrange(0x10000)
    deadline = time.monotonic() + UPSTREAM_TIMEOUT
    query = forward.query(query_id)
    try:
        with socket.create_connection((server.host, server.port), timeout=UPSTREAM_TIMEOUT) as sock:
            sock.sendall(struct.pack("!H", len(query)) + query)
            prefix = read_exactly(sock, 2, deadline)
            data = prefix and read_exactly(sock, struct.unpack("!H", prefix)[0], deadline)
    except socket.timeout:
        return UpstreamFailed(f"no answer over TCP in {UPSTREAM_TIMEOUT:g}s")
    except OSError as error:
        return UpstreamFailed(f"TCP: {error}")
    outcome = answer_from_upstream(forward, query_id, data) if data else None
    if isinstance(outcome, (Reply, UpstreamFailed)):
        return outcome
    return UpstreamFailed("no usable answer over TCP")


def read_exactly(sock: socket.socket, size: int, deadline: float) -> bytes | None:
    """`size` bytes by the monotonic `deadline` (else socket.timeout); None if the peer closed."""
    data = bytearray()
    while len(data) < size:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise socket.timeout("deadline passed")
        sock.settimeout(remaining)
        chunk = sock.recv(size - len(data))
        if not chunk:
            return None
        data += chunk
    return bytes(data)


def bound_socket(address: Address, kind: int, reuse_port: bool | None = None) -> socket.socket:
    """A UDP or listening TCP socket on `address`; IPv6 ones take IPv6 only (no mapped IPv4).
    `reuse_port` (SO_REUSEPORT, UDP and TCP) lets the supervisor's workers share the address;
    None: only in such a worker (`appliance.supervisor.shares_ports`)."""
    family = _family(address)
    sock = socket.socket(family, kind)
    try:
        if kind == socket.SOCK_STREAM:    # not for UDP: there it would let a second socket share the port
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port or (reuse_port is None and shares_ports()):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind((address.host, address.port))
        if kind == socket.SOCK_STREAM:
            sock.listen(TCP_CLIENTS)
    except BaseException:
        sock.close()
        raise
    return sock


def _family(address: Address) -> int:
    return socket.AF_INET6 if ":" in address.host else socket.AF_INET


class RefusalLog:
    """Clients outside the rules, at info once a minute each and ten a minute at most: spoofed
    sources cannot flood the log."""

    def __init__(self, interval: float = 60.0, most: int = 10) -> None:
        self.interval, self.most = interval, most
        self._window = -interval
        self._logged: set[str] = set()

    def refused(self, client: str, now: float | None = None) -> bool:
        now = time.monotonic() if now is None else now
        if now - self._window >= self.interval:
            self._window, self._logged = now, set()
        if client in self._logged or len(self._logged) >= self.most:
            log.debug("refused %s: %s", client, OUTSIDER)
            return False
        self._logged.add(client)
        log.info("refused queries from %s: %s (logged once a minute)", client, OUTSIDER)
        return True
