"""The HTTP/2 proxy frontend (RFC 9113, RFC 8441): one greenlet per stream, one writer per connection.

Data path: the `https` listener's TLS session picks this for ALPN `h2`. The connection greenlet
reads frames into h2 and dispatches events; each request stream runs in its own greenlet as
  - a plain request (`:scheme http`): forwarded over HTTP/1.1 through `OriginRequest`;
  - `CONNECT host:port` (§8.5): a tunnel, DATA ↔ bytes, END_STREAM ↔ FIN, RST_STREAM ↔ reset;
  - extended CONNECT with `:protocol websocket` (RFC 8441): an HTTP/1.1 Upgrade toward the
    origin, then the WebSocket frames relayed unchanged.
(those three live in `h2_exchange.py`; this module is the connection and its streams.)
Flow control is backpressure: DATA is acknowledged only once written on, and a stream sends
only within the peer's window. Only the writer greenlet writes to the socket: it frames the DATA
every stream has handed it in round-robin turns of one frame (`OutboundData`), so that streams
share the connection fairly, and writes what h2 queued and those frames in one TLS write.
"""

from __future__ import annotations

import logging
import time

import gevent
import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings
from gevent import socket
from gevent.event import Event
from gevent.queue import Queue

from .. import relay
from ..compat import GoawayTolerantH2Connection
from ..admission import Identity
from ..context import ProxyContext
from ..errors import ClientError
from ..observe import AccessRecord
from ..protocols import h2_mapping as h2map
from ..upstream import OriginRoute
from .client_session import ClientSession
from .h2_exchange import H2Exchange
from .h2_outbound import OutboundData

log = logging.getLogger("appliance.h2")

INITIAL_WINDOW = 256 * 1024          # per stream; what one stream may have in flight toward us
CONNECTION_WINDOW = 4 * 1024 * 1024  # shared by all streams of a connection
WRITE_BATCH = 256 * 1024             # DATA bytes framed for one TLS write, over all streams
# Abuse limits per connection and per 10 s window (rapid reset CVE-2023-44487, floods).
FLOOD_WINDOW = 10.0
# Streams ended by a reset, from either side: the client's own (rapid reset) and the ones its
# requests make us send (a malformed request each, streams over MAX_CONCURRENT_STREAMS;
# "MadeYouReset", CVE-2025-8671), which cost us the same work.
MAX_RESETS = 200
MAX_PINGS = 100
MAX_SETTINGS = 100
# Frames that cost work and move nothing (CVE-2019-9518): DATA without payload or END_STREAM,
# PRIORITY frames (RFC 9113 §5.3.2 deprecates them; clients that still send some send a handful).
MAX_EMPTY_FRAMES = 100
# An unfinished header block (HEADERS, then CONTINUATION without END_HEADERS, CVE-2024-27316 and
# kin) is held whole until it ends. An HPACK field is never sent in more than 4 times its
# decoded size (name + value + 32; Huffman codes are at most 30 bits an octet), so a block over
# this many times MAX_HEADER_LIST_SIZE can only end over the limit: refuse it before it ends.
# h2 itself stops a block only at 64 frames, up to 64 × 16 KiB.
MAX_BLOCK_INFLATION = 4
GOAWAY_HANDOFF_TRIES = 500           # × 1 ms: how long `goaway` waits for the writer to take it
# How long `goaway` waits for the writer to get it out: a client that does not read (its TCP
# window shut) must not hold the connection for the whole write timeout after a flood.
GOAWAY_WRITE_TIMEOUT = 2.0


class _Flood:
    """Counts one kind of frame per window; `hit()` says whether the limit is passed."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.count = 0
        self.since = time.monotonic()

    def hit(self, n: int = 1) -> bool:
        now = time.monotonic()
        if now - self.since > FLOOD_WINDOW:
            self.count, self.since = 0, now
        self.count += n
        return self.count > self.limit


class H2Stream(relay.StreamSide):
    """One stream as its greenlet sees it: blocking reads of DATA, flow-controlled sends."""

    def __init__(self, session: "H2Session", stream_id: int, ended: bool) -> None:
        self.session = session
        self.id = stream_id
        self.inbox: Queue = Queue()
        self.ended_with_headers = ended          # HEADERS carried END_STREAM: no body follows
        if ended:
            self.inbox.put(b"")
        self.data_framed = Event()               # the writer has framed all the data handed to it
        self.gone = False
        self.reset_code: int | None = None
        self.trailers: tuple = ()
        self.headers_sent = False
        # How long `send` waits for the client's flow-control windows to let its data go (a
        # client that opens streams with a zero window and never opens it holds an origin
        # connection per stream); None: the caller bounds it (a tunnel, by its idle timeout).
        self.stall_timeout: float | None = session.config.limits.client_idle_timeout

    # inbound

    def read(self) -> bytes:
        item = self.inbox.get()
        if item is None:
            raise relay.StreamGone(self.reset_code == h2.errors.ErrorCodes.CANCEL)
        return item

    def ack(self, n: int) -> None:
        self.session.ack(self.id, n)

    def peer_may_send(self) -> bool:
        """Whether our flow-control windows let the client send on this stream now: if not, a
        wait for its DATA is our backpressure, not the client's slowness."""
        try:
            return self.session.conn.remote_flow_control_window(self.id) > 0
        except (h2.exceptions.StreamClosedError, KeyError):         # KeyError: h2 4.1
            return False

    # outbound

    def send_headers(self, block, end_stream: bool = False, final: bool = True) -> None:
        """A response's HEADERS; `final=False` for a 1xx, after which the response still follows."""
        encoded = h2map.block_bytes(block)      # latin-1 as read from HTTP/1.1, not UTF-8
        self.session.send(lambda c: c.send_headers_packed(self.id, encoded, end_stream), self)
        self.headers_sent = self.headers_sent or final

    def send(self, data, end_stream: bool = False) -> None:
        """Hand `data` to the writer and wait until it has framed all of it (within the peer's
        windows, in turns with the other streams); the caller may reuse its buffer then.
        `end_stream`: this is the last of the body, without trailers (END_STREAM rides on the
        last DATA frame when it can)."""
        if not data:
            if end_stream:
                self.end()
            return
        if self.gone:
            raise relay.StreamGone()
        if self.session.send_at_once(self, data, end_stream):
            return
        self.data_framed.clear()
        self.session.outbound.add(self.id, data)
        self.session.wake_writer()
        try:
            framed = self.data_framed.wait(self.stall_timeout)
        finally:
            self.session.outbound.drop(self.id)     # left unframed: timeout, kill, or reset
        if self.gone:
            raise relay.StreamGone()
        if not framed:
            self.reset(h2.errors.ErrorCodes.CANCEL)
            raise ClientError(f"the client's flow-control window stayed closed for "
                              f"{self.stall_timeout:g} s")
        if end_stream:
            self.end()

    def end(self, trailers=None) -> None:
        if trailers:
            encoded = h2map.block_bytes(trailers)
            self.session.send(lambda c: c.send_headers_packed(self.id, encoded, end_stream=True), self)
        else:
            self.session.send(lambda c: c.end_stream(self.id), self)

    def reset(self, code: int = h2.errors.ErrorCodes.CONNECT_ERROR) -> None:
        self.session.send(lambda c: c.reset_stream(self.id, code), self)
        self.gone = True
        self.session.reset_sent()

    # events from the connection greenlet

    def closed_by_peer(self, code: int | None = None) -> None:
        self.reset_code = code
        self.gone = True
        self.inbox.put(None)
        self.data_framed.set()


class H2Session(ClientSession):
    """One HTTP/2 connection from a client, inside TLS."""

    def __init__(self, ctx: ProxyContext, sock: socket.socket, address, listener: str,
                 route: OriginRoute | None = None, identity: Identity | None = None) -> None:
        super().__init__(ctx, sock, address, listener, route, identity)
        self.conn = GoawayTolerantH2Connection(h2.config.H2Configuration(
            client_side=False, header_encoding=None, validate_inbound_headers=False,
            normalize_inbound_headers=False))
        self.streams: dict[int, H2Stream] = {}
        self.tasks: dict[int, gevent.Greenlet] = {}
        self.outbound = OutboundData()
        self._sent_at_once = 0                   # DATA bytes queued in h2 since the last write
        self._wake = Event()
        self._drained = Event()
        self._drained.set()
        self.closing = False
        self._refused_counted = 0
        self._floods = {"reset": _Flood(MAX_RESETS), "ping": _Flood(MAX_PINGS),
                        "settings": _Flood(MAX_SETTINGS), "empty": _Flood(MAX_EMPTY_FRAMES)}
        self._streams_started = 0
        self._headers_priority = None            # the PriorityUpdated of the last HEADERS

    # --- the writer -------------------------------------------------------------------------

    def send(self, action, stream: H2Stream | None = None) -> None:
        """Apply one h2 state change and let the writer send what it produced."""
        try:
            action(self.conn)
        except (h2.exceptions.StreamClosedError, KeyError) as exc:   # KeyError: h2 4.1
            if stream is not None:
                stream.gone = True
                raise relay.StreamGone() from exc
            return
        except h2.exceptions.ProtocolError as exc:
            # After an error GOAWAY the connection is closed for every frame: the streams still
            # running are gone with it.
            if self.conn.state_machine.state != h2.connection.ConnectionState.CLOSED:
                raise
            if stream is not None:
                stream.gone = True
                raise relay.StreamGone() from exc
            return
        self._wake.set()

    def wake_writer(self) -> None:
        self._wake.set()

    def send_at_once(self, stream: H2Stream, data, end_stream: bool = False) -> bool:
        """With no stream waiting for its turn, up to a frame of DATA goes to h2 at once (h2
        copies it), and the sender need not wait for the writer: an echo or a small response
        (HEADERS, then DATA with END_STREAM) leaves in one write. Bounded by a batch between
        writes."""
        size = len(data)
        if (self.outbound or size > self.conn.max_outbound_frame_size
                or self._sent_at_once + size > WRITE_BATCH):
            return False
        try:
            if size > self.conn.local_flow_control_window(stream.id):
                return False
        except (h2.exceptions.StreamClosedError, KeyError):     # KeyError: h2 4.1
            raise relay.StreamGone() from None
        self.send(lambda c: c.send_data_packed(stream.id, data, end_stream), stream)
        self._sent_at_once += size
        return True

    def _writer(self) -> None:
        more = False
        while True:
            if not more:
                self._wake.wait()
            self._wake.clear()
            data, more = self._next_write()
            if not data:
                if self.closing and not self.streams:
                    return
                continue
            self._drained.clear()
            try:
                self.sock.sendall(data)
            except OSError as exc:            # the client is gone; the reader sees it too
                log.debug("h2 client %s: write failed: %s", self.client_ip, exc)
                self.closing = True
                for stream in list(self.streams.values()):
                    stream.closed_by_peer()
                return
            finally:
                self._drained.set()
            if more:
                gevent.sleep(0)               # the reader and the streams run between batches

    def _next_write(self) -> tuple[bytes, bool]:
        """What h2 queued (HEADERS, WINDOW_UPDATE, ...), then the next turns of DATA, as one
        write; and whether DATA is left that the windows would let go now."""
        queued = self.conn.data_to_send()
        self._sent_at_once = 0
        framed = self.outbound.frame(self.conn, WRITE_BATCH)
        for stream_id in framed.refused:
            if stream_id in self.streams:
                self.streams[stream_id].gone = True
        for stream_id in framed.emptied + framed.refused:
            if stream_id in self.streams:
                self.streams[stream_id].data_framed.set()
        if not framed.pieces:
            return queued, False
        # One copy of the payload, out of the senders' buffers: they reuse them once woken.
        return b"".join([queued, *framed.pieces]), framed.more

    def ack(self, stream_id: int, n: int) -> None:
        if n:
            self.send(lambda c: c.acknowledge_received_data(n, stream_id))

    # --- the connection loop ----------------------------------------------------------------

    def run(self) -> None:
        self.connection = self.ctx.observer.connection_opened(self.listener)
        self.ctx.h2_sessions.add(self)
        limits = self.config.limits
        self.conn.local_settings = h2.settings.Settings(client=False, initial_values={
            h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: limits.max_h2_streams,
            h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: INITIAL_WINDOW,
            h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE: limits.max_header_bytes,
            h2.settings.SettingCodes.ENABLE_CONNECT_PROTOCOL: 1,
        })
        self.conn.initiate_connection()
        self.conn.increment_flow_control_window(CONNECTION_WINDOW - 65535)
        self._wake.set()
        writer = gevent.spawn(self._writer)
        try:
            self._read_loop(limits.client_idle_timeout)
        except (ClientError, OSError) as exc:
            log.debug("h2 client %s: %s", self.client_ip, exc)
        finally:
            for stream in list(self.streams.values()):
                stream.closed_by_peer()
            gevent.joinall(list(self.tasks.values()), timeout=1)
            gevent.killall(list(self.tasks.values()))
            self.closing = True
            self._wake.set()
            writer.join(timeout=2)
            writer.kill()
            self.sock.close()
            self.ctx.observer.connection_closed(self.listener)

    def _read_loop(self, idle_timeout: float) -> None:
        max_list = self.config.limits.max_header_bytes
        # h2 enforces MAX_HEADER_LIST_SIZE in its HPACK decoder (an HPACK bomb ends in a
        # DenialOfServiceError), but sets the decoder's limit only from a changed setting the
        # client ACKs; settings given as `initial_values` never change, so without this the
        # decoder kept h2's default (64 KiB) whatever we advertise.
        self.conn.decoder.max_header_list_size = max_list
        while True:
            self.sock.settimeout(idle_timeout)
            try:
                data = self.sock.recv(65536)
            except socket.timeout:
                if self.streams:
                    continue
                self.goaway(h2.errors.ErrorCodes.NO_ERROR)
                return
            if not data or self.conn.state_machine.state == h2.connection.ConnectionState.CLOSED:
                return        # (CLOSED: a stream greenlet sent an error GOAWAY, a flood of resets)
            try:
                events = self.conn.receive_data(data)
            except h2.exceptions.ProtocolError as exc:
                # h2 has queued a GOAWAY with the error code already (HPACK bomb: ENHANCE_YOUR_CALM,
                # streams over MAX_CONCURRENT_STREAMS, 64 CONTINUATION frames: PROTOCOL_ERROR).
                log.info("h2 client %s: protocol error, closing: %s", self.client_ip, exc)
                self.goaway(None)
                return
            if self.conn.refused_streams > self._refused_counted and not self._count_refused_streams():
                return
            for event in events:
                if self._dispatch(event) is False:
                    return
            if self.conn.pending_header_block_bytes() > MAX_BLOCK_INFLATION * max_list:
                self._flood("CONTINUATION")
                return
            self._wake.set()
            if self.closing and not self.streams:
                return

    def _count_refused_streams(self) -> bool:
        """False when the refusals (resets we sent) make a flood and the connection is ending."""
        refused = self.conn.refused_streams - self._refused_counted
        self._refused_counted = self.conn.refused_streams
        metrics = self.ctx.observer.metrics
        metrics.child(metrics.limit_refusals, "h2_streams").inc(refused)
        log.info("h2 client %s: %d stream(s) over [limits] max_h2_streams refused (REFUSED_STREAM)",
                 self.client_ip, refused)
        if self._floods["reset"].hit(refused):
            return self._flood("RST_STREAM (refused streams)")
        return True

    def reset_sent(self) -> None:
        """A stream greenlet reset its stream: that counts toward the reset limit too. Over it,
        the GOAWAY goes out from here, and the read loop is woken to end the connection."""
        if self._floods["reset"].hit() and not self.closing:
            self._flood("RST_STREAM (provoked by malformed or refused requests)")
            relay.shutdown_socket(self.sock, socket.SHUT_RD)

    def goaway(self, code) -> None:
        """Send GOAWAY(`code`), or with `code` None the one h2 queued on a protocol error."""
        self.closing = True
        if code is not None:
            self.send(lambda c: c.close_connection(error_code=code))
        self._wake.set()
        # Let the writer take the GOAWAY before the read loop ends: `run` then wakes the writer
        # once more to let it finish, and a writer that had not yet woken for the GOAWAY would
        # use up that wake-up on it and sleep on until the join timeout (2 s), holding the
        # connection of an abusive client open for nothing.
        for _ in range(GOAWAY_HANDOFF_TRIES):
            if not self._wake.is_set():
                break
            gevent.sleep(0.001)
        self._drained.wait(GOAWAY_WRITE_TIMEOUT)

    def drain(self) -> None:
        """Shutdown: GOAWAY now, finish the streams in flight, then close (RFC 9113 §6.8)."""
        if not self.closing:
            self.goaway(h2.errors.ErrorCodes.NO_ERROR)

    def _dispatch(self, event) -> bool | None:
        E = h2.events
        stream = self.streams.get(getattr(event, "stream_id", None) or 0)
        if isinstance(event, E.RequestReceived):
            self._headers_priority = event.priority_updated
            self._start_stream(event)
        elif isinstance(event, E.DataReceived):
            if event.data:
                if stream is not None:
                    stream.inbox.put(event.data)
            elif event.stream_ended is None and self._floods["empty"].hit():
                # (an empty DATA frame must not reach the inbox either: b"" is END_STREAM there)
                return self._flood("empty DATA")
            if event.flow_controlled_length > len(event.data):     # padding is credited at once
                self.ack(event.stream_id, event.flow_controlled_length - len(event.data))
            elif stream is None:
                self.ack(event.stream_id, event.flow_controlled_length)
        elif isinstance(event, E.StreamEnded):
            if stream is not None:
                stream.inbox.put(b"")
        elif isinstance(event, E.TrailersReceived):
            if stream is not None:
                stream.trailers = tuple(event.headers)
        elif isinstance(event, E.StreamReset):
            if stream is not None:
                stream.closed_by_peer(event.error_code)
            if self._floods["reset"].hit():
                return self._flood("RST_STREAM")
        elif isinstance(event, E.RemoteSettingsChanged):
            # New windows or frame size (like a WINDOW_UPDATE) take effect when the writer frames
            # DATA next: the read loop wakes it after every read.
            if self._floods["settings"].hit():
                return self._flood("SETTINGS")
        elif isinstance(event, E.PingReceived):
            if self._floods["ping"].hit():
                return self._flood("PING")
        elif isinstance(event, E.PriorityUpdated):
            # h2 reports a HEADERS frame's priority as one too, right after its RequestReceived
            if event is not self._headers_priority and self._floods["empty"].hit():
                return self._flood("PRIORITY")
        elif isinstance(event, E.ConnectionTerminated):
            # The client's GOAWAY: no new streams from it; those in flight finish if it said
            # NO_ERROR, any error code ends the connection now.
            self.closing = True
            if event.error_code != h2.errors.ErrorCodes.NO_ERROR or not self.streams:
                return False
        return None

    def _flood(self, what: str) -> bool:
        log.warning("h2 client %s: %s flood, closing the connection (ENHANCE_YOUR_CALM)", self.client_ip, what)
        self.goaway(h2.errors.ErrorCodes.ENHANCE_YOUR_CALM)
        return False

    # --- streams ----------------------------------------------------------------------------

    def _start_stream(self, event) -> None:
        ended = event.stream_ended is not None
        stream = H2Stream(self, event.stream_id, ended)
        self.streams[event.stream_id] = stream
        if self.closing:
            self.send(lambda c: c.reset_stream(event.stream_id, h2.errors.ErrorCodes.REFUSED_STREAM))
            del self.streams[event.stream_id]
            return
        task = gevent.spawn(self._serve_stream, stream, event.headers)
        self.tasks[event.stream_id] = task
        self._streams_started += 1
        # [limits] max_h2_streams_per_connection: then a graceful GOAWAY, the streams in flight
        # finish and the client goes on on a new connection (nginx's keepalive_requests does the
        # same), so stream ids and per-connection state never grow forever.
        if self._streams_started == self.config.limits.max_h2_streams_per_connection:
            # This stream is the last one the GOAWAY lets in; later ones are refused above.
            log.info("h2 client %s: %d streams on one connection, [limits] "
                     "max_h2_streams_per_connection: GOAWAY", self.client_ip, self._streams_started)
            self.goaway(h2.errors.ErrorCodes.NO_ERROR)

    def _credit_unread(self, stream: H2Stream) -> None:
        """DATA a finished stream never read still counts against the connection's window:
        give that credit back, or a few abandoned uploads would stall the whole connection."""
        unread = 0
        while not stream.inbox.empty():
            item = stream.inbox.get_nowait()
            unread += len(item) if item else 0
        if unread:
            self.ack(stream.id, unread)

    def _serve_stream(self, stream: H2Stream, block) -> None:
        record = AccessRecord(self.listener, self.client_ip, protocol="HTTP/2", connection=self.connection)
        try:
            H2Exchange(self, stream, record).run(block)
        finally:
            self._credit_unread(stream)
            self.streams.pop(stream.id, None)
            self.tasks.pop(stream.id, None)
            if self.closing and not self.streams:
                self._wake.set()
                # Nothing left to serve after a GOAWAY: end the read loop by shutting the read
                # side of the descriptor (not SSLSocket.shutdown, which drops the TLS state and
                # would leave the writer sending plain text).
                relay.shutdown_socket(self.sock, socket.SHUT_RD)
