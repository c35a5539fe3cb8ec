"""SOCKS5 UDP ASSOCIATE (RFC 1928 §7): datagrams relayed while the control connection lives.

The client sends each datagram, with a SOCKS5 header naming its destination, to a UDP port the
appliance opened for it on the address the client reached the listener on. Each datagram is
checked by policy for its destination (a name is resolved here), then sent from an ephemeral
socket per address family; answers come back only from destinations the client has sent to,
wrapped in a header naming their source. Fragmented datagrams (FRAG != 0) are dropped, as the
RFC allows. The association ends when the TCP control connection closes (or sends anything), or
after `[limits] tunnel_idle_timeout` without a datagram.
"""

from __future__ import annotations

import logging
import time

import gevent
from gevent import socket

from ..admission import Identity, admit
from ..errors import PolicyDenied, UpstreamError
from ..observe import AccessRecord
from ..protocols import socks5

log = logging.getLogger("appliance.socks5")

MAX_DATAGRAM = 65535
MAX_PEERS = 1024                   # destinations one association may be answered from
LOG_EVERY = 10.0                   # seconds between log lines about dropped datagrams


class UdpAssociation:
    def __init__(self, session, request: socks5.Request, record: AccessRecord, identity: Identity) -> None:
        self.s = session
        self.ctx = session.ctx
        self.record = record
        self.identity = identity
        self.expected_port = request.port          # 0: any source port of the client
        self.client_addr: tuple | None = None      # where the client's datagrams come from
        self.peers: set[tuple[str, int]] = set()
        self.outbound: dict[int, socket.socket] = {}
        self.answer_loops: list[gevent.Greenlet] = []
        self.last_activity = time.monotonic()
        self.dropped = 0
        self._last_log = 0.0

    def run(self) -> None:
        local_ip = self.s.sock.getsockname()[0].split("%", 1)[0]
        family = socket.AF_INET6 if ":" in local_ip else socket.AF_INET
        self.relay_sock = socket.socket(family, socket.SOCK_DGRAM)
        from_client = None
        try:
            self.relay_sock.bind((local_ip, 0))
            self.s._reply(socks5.REP_SUCCEEDED, self.relay_sock.getsockname())
            self.record.status = 200
            from_client = gevent.spawn(self._from_client)
            self._watch_control()
        finally:
            for loop in [from_client, *self.answer_loops]:
                if loop is not None:
                    loop.kill(block=False)
            self.relay_sock.close()
            for sock in self.outbound.values():
                sock.close()
        if self.dropped:
            self.record.error = f"{self.dropped} datagrams dropped"

    def _watch_control(self) -> None:
        """The association lives as long as the control connection is open and quiet."""
        idle = self.s.config.limits.tunnel_idle_timeout
        sock = self.s.sock
        sock.settimeout(min(idle, 5.0))
        data = self.s.reader.buffered        # sent behind the request: data on it all the same
        while not data:
            try:
                data = sock.recv(1)
            except socket.timeout:
                if time.monotonic() - self.last_activity > idle:
                    self.record.error = "idle timeout"
                    return
                continue
            except OSError:
                return
            if not data:
                return
        self.record.error = "data on the control connection"
        log.info("SOCKS5 UDP association of %s: data on the control connection; closing",
                 self.s.client_ip)

    # --- client → destinations ----------------------------------------------------------------

    def _from_client(self) -> None:
        while True:
            data, source = self.relay_sock.recvfrom(MAX_DATAGRAM)
            if not self._is_client(source):
                self._drop(f"datagram from {source[0]}:{source[1]}, not the client")
                continue
            self.client_addr = source
            try:
                datagram = socks5.parse_datagram(data)
                address = self._admit(datagram)
            except (socks5.Socks5Error, PolicyDenied, UpstreamError) as exc:
                self._drop(str(exc))
                continue
            self.last_activity = time.monotonic()
            if len(self.peers) < MAX_PEERS:
                self.peers.add((address, datagram.port))
            try:
                self._outbound(address).sendto(datagram.data, (address, datagram.port))
            except OSError as exc:
                self._drop(f"send to {address}:{datagram.port}: {exc.strerror or exc}")
                continue
            self.record.bytes_up += len(datagram.data)

    def _is_client(self, source: tuple) -> bool:
        host = source[0].split("%", 1)[0]
        if host.startswith("::ffff:"):
            host = host[7:]
        return host == self.s.client_ip and self.expected_port in (0, source[1])

    def _admit(self, datagram: socks5.Datagram) -> str:
        """Policy for this datagram's destination; the address to send it to."""
        admit(self.ctx, self.s.config, self.record, (), kind="udp", host=datagram.host,
              port=datagram.port, scheme="udp", method="UDP", identity=self.identity)
        addresses = self.ctx.resolver.resolve(datagram.host)
        return addresses[0]

    def _outbound(self, address: str) -> socket.socket:
        family = socket.AF_INET6 if ":" in address else socket.AF_INET
        sock = self.outbound.get(family)
        if sock is None:
            sock = self.outbound[family] = socket.socket(family, socket.SOCK_DGRAM)
            sock.bind(("::" if family == socket.AF_INET6 else "0.0.0.0", 0))
            self.answer_loops.append(gevent.spawn(self._answers, sock))
        return sock

    # --- destinations → client ----------------------------------------------------------------

    def _answers(self, sock: socket.socket) -> None:
        while True:
            data, source = sock.recvfrom(MAX_DATAGRAM)
            peer = (source[0].split("%", 1)[0], source[1])
            if peer not in self.peers or self.client_addr is None:
                self._drop(f"unasked-for datagram from {peer[0]}:{peer[1]}")
                continue
            self.last_activity = time.monotonic()
            try:
                self.relay_sock.sendto(socks5.build_datagram(peer[0], peer[1], data), self.client_addr)
            except OSError as exc:
                self._drop(f"send to the client: {exc.strerror or exc}")
                continue
            self.record.bytes_down += len(data)

    def _drop(self, why: str) -> None:
        self.dropped += 1
        now = time.monotonic()
        if now - self._last_log > LOG_EVERY:
            self._last_log = now
            log.info("SOCKS5 UDP association of %s: datagram dropped: %s", self.s.client_ip, why)
