"""HTTP/2 toward an origin: one RFC 8441 extended CONNECT stream, for a WebSocket.

Used when an HTTP/1.1 client's WebSocket handshake targets an origin listed in `[upstream]
h2_origins`. The connection is HTTP/2 over cleartext with prior knowledge (RFC 9113 §3.3), one
per WebSocket; the origin must announce SETTINGS_ENABLE_CONNECT_PROTOCOL = 1. `H2Tunnel` is the
stream side of `relay.stream_pipe`, like the frontend's streams: DATA is acknowledged only once
written on, and sent only within the origin's window.
"""

from __future__ import annotations

import gevent
import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
from gevent import socket
from gevent.event import Event
from gevent.lock import Semaphore
from gevent.queue import Queue

from . import relay
from .errors import UpstreamError
from .protocols.forwarding import Target
from .protocols.websocket_bridge import parse_response_block
from .upstream import Resolver, connect

_READ = 65536


class H2Tunnel(relay.StreamSide):
    def __init__(self, sock: socket.socket, name: str, timeout: float) -> None:
        self.sock = sock
        self.name = name
        self.timeout = timeout
        self.conn = h2.connection.H2Connection(h2.config.H2Configuration(
            client_side=True, header_encoding=None, validate_inbound_headers=False))
        self.stream_id = 0
        self.inbox: Queue = Queue()
        self.window_open = Event()
        self.gone = False
        self._write_lock = Semaphore()
        self._response: Queue = Queue()
        self._reader: gevent.Greenlet | None = None

    # --- opening ----------------------------------------------------------------------------

    @classmethod
    def open(cls, resolver: Resolver, target: Target, block, connect_timeout: float,
             response_timeout: float, addresses: tuple[str, ...] = ()) -> tuple["H2Tunnel", int, tuple]:
        """Connect (to `addresses`, those policy admitted, when given), check RFC 8441 support,
        send the extended CONNECT; returns the response."""
        sock = connect(resolver, target.host, target.port, connect_timeout, addresses)
        tunnel = cls(sock, target.hostport, response_timeout)
        try:
            tunnel._handshake()
            tunnel._request(block)
            status, headers = tunnel._response.get(timeout=response_timeout)
        except gevent.queue.Empty:
            tunnel.close()
            raise UpstreamError("timeout", target.hostport, "no HTTP/2 response") from None
        except BaseException:
            tunnel.close()
            raise
        return tunnel, status, headers

    def _flush(self) -> None:
        with self._write_lock:                    # one writer at a time on this connection
            data = self.conn.data_to_send()
            if data:
                self.sock.sendall(data)

    def _handshake(self) -> None:
        self.conn.initiate_connection()
        self._flush()
        self.sock.settimeout(self.timeout)
        try:
            while True:                           # the origin's first SETTINGS
                data = self.sock.recv(_READ)
                if not data:
                    raise UpstreamError("closed", self.name, "origin closed the HTTP/2 connection")
                events = self.conn.receive_data(data)
                self._flush()
                if any(isinstance(e, h2.events.RemoteSettingsChanged) for e in events):
                    break
        except socket.timeout:
            raise UpstreamError("timeout", self.name, "no HTTP/2 SETTINGS from the origin") from None
        except h2.exceptions.ProtocolError as exc:
            raise UpstreamError("protocol", self.name, f"HTTP/2: {exc}") from None
        except OSError as exc:
            raise UpstreamError("closed", self.name, str(exc)) from None
        if not self.conn.remote_settings.enable_connect_protocol:
            raise UpstreamError("protocol", self.name,
                                "origin does not offer extended CONNECT (RFC 8441)")

    def _request(self, block) -> None:
        self.stream_id = self.conn.get_next_available_stream_id()
        encoded = [(n.encode("latin-1"), v.encode("latin-1")) for n, v in block]
        self.conn.send_headers(self.stream_id, encoded)
        self._flush()
        self.sock.settimeout(None)
        self._reader = gevent.spawn(self._read_loop)

    # --- the connection's read loop ---------------------------------------------------------

    def _read_loop(self) -> None:
        try:
            while True:
                data = self.sock.recv(_READ)
                if not data:
                    break
                for event in self.conn.receive_data(data):
                    self._dispatch(event)
                self._flush()
        except (OSError, h2.exceptions.ProtocolError):
            pass
        self.gone = True
        self.inbox.put(None)
        self.window_open.set()
        self._response.put((502, ()))             # only read if no response came yet

    def _dispatch(self, event) -> None:
        E = h2.events
        if getattr(event, "stream_id", None) not in (None, 0, self.stream_id):
            return
        if isinstance(event, E.ResponseReceived):
            try:
                self._response.put(parse_response_block(event.headers))
            except Exception as exc:               # malformed: report as a failed handshake
                self._response.put((502, (("x-error", str(exc)),)))
        elif isinstance(event, E.DataReceived):
            self.inbox.put(event.data)
            padding = event.flow_controlled_length - len(event.data)
            if padding:
                self.conn.acknowledge_received_data(padding, self.stream_id)
        elif isinstance(event, E.StreamEnded):
            self.inbox.put(b"")
        elif isinstance(event, (E.StreamReset, E.ConnectionTerminated)):
            self.gone = True
            self.inbox.put(None)
            self.window_open.set()
        elif isinstance(event, (E.WindowUpdated, E.RemoteSettingsChanged)):
            self.window_open.set()

    # --- relay.StreamSide -------------------------------------------------------------------

    def read(self) -> bytes:
        item = self.inbox.get()
        if item is None:
            raise relay.StreamGone()
        return item

    def ack(self, n: int) -> None:
        self._act(lambda c: c.acknowledge_received_data(n, self.stream_id))

    def send(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            if self.gone:
                raise relay.StreamGone()
            try:
                size = min(self.conn.local_flow_control_window(self.stream_id),
                           self.conn.max_outbound_frame_size, len(view))
            except (h2.exceptions.StreamClosedError, KeyError):
                raise relay.StreamGone() from None
            if size <= 0:
                self.window_open.clear()
                self.window_open.wait()
                continue
            chunk = bytes(view[:size])
            self._act(lambda c: c.send_data(self.stream_id, chunk))
            view = view[size:]

    def end(self) -> None:
        self._act(lambda c: c.end_stream(self.stream_id))

    def reset(self) -> None:
        self._act(lambda c: c.reset_stream(self.stream_id, h2.errors.ErrorCodes.CANCEL))
        self.gone = True

    def _act(self, action) -> None:
        try:
            action(self.conn)
        except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError, KeyError):
            raise relay.StreamGone() from None
        self._flush()

    def body(self):
        """The DATA of a non-200 answer, piece by piece (flow control credited as it goes)."""
        while True:
            data = self.read()
            if not data:
                return
            self.ack(len(data))
            yield data

    def close(self) -> None:
        if self._reader is not None:
            self._reader.kill(block=False)
        try:
            self.sock.close()
        except OSError:
            pass
