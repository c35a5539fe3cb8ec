"""A blocking HTTP/2 client for hostile tests: python-h2 with its outbound checks off, plus raw frames.

h2 runs with `validate_outbound_headers=False` and `normalize_outbound_headers=False`, so it sends
any header block as given (uppercase names, CR/LF/NUL, pseudo-headers in any order). What h2
refuses to send at all (a HEADERS frame without END_HEADERS followed by CONTINUATION frames,
a SETTINGS or PING frame it did not ask for) goes out as hand-built `hyperframe` frames, with the
header block encoded by the h2 connection's own HPACK encoder so both sides' tables stay in step.

Loopback only; every read has a deadline and every loop a bounded count.
"""

from __future__ import annotations

import fcntl
import socket
import ssl
import struct
import termios
import time
from dataclasses import dataclass, field

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings
from hyperframe.frame import (
    ContinuationFrame, DataFrame, HeadersFrame, PingFrame, PriorityFrame, RstStreamFrame, SettingsFrame,
    WindowUpdateFrame,
)

CLIENT_WINDOW = 16 * 1024 * 1024      # we read everything at once: never stall the proxy on us


@dataclass
class Response:
    status: int | None = None
    headers: list = field(default_factory=list)
    body: bytearray = field(default_factory=bytearray)
    ended: bool = False
    reset: int | None = None          # the error code of an RST_STREAM from the proxy
    done_at: float | None = None      # time.monotonic() when it ended or was reset

    @property
    def done(self) -> bool:
        return self.ended or self.reset is not None

    def header(self, name: str) -> str | None:
        for k, v in self.headers:
            if (k.decode() if isinstance(k, bytes) else k) == name:
                return v.decode("latin-1") if isinstance(v, bytes) else v
        return None


class H2RawClient:
    def __init__(self, port: int, ca_path, timeout: float = 10.0, handshake: bool = True,
                 stream_window: int = CLIENT_WINDOW, rcvbuf: int | None = None) -> None:
        """`stream_window`: the INITIAL_WINDOW_SIZE advertised (0: the proxy may send no DATA);
        `rcvbuf`: a small SO_RCVBUF, set before connecting, for a client that stops reading."""
        context = ssl.create_default_context(cafile=str(ca_path))
        context.set_alpn_protocols(["h2"])
        raw = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if rcvbuf is not None:
            raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        raw.settimeout(timeout)
        raw.connect(("127.0.0.1", port))
        self.sock = context.wrap_socket(raw, server_hostname="localhost")
        assert self.sock.selected_alpn_protocol() == "h2"
        self.timeout = timeout
        self.conn = h2.connection.H2Connection(h2.config.H2Configuration(
            client_side=True, header_encoding=None,
            validate_outbound_headers=False, normalize_outbound_headers=False,
            validate_inbound_headers=False, normalize_inbound_headers=False))
        self.conn.local_settings = h2.settings.Settings(client=True, initial_values={
            h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: stream_window,
            h2.settings.SettingCodes.ENABLE_PUSH: 0,
        })
        self.conn.initiate_connection()
        self.conn.increment_flow_control_window(CLIENT_WINDOW - 65535)
        self.responses: dict[int, Response] = {}
        self.server_settings: dict[int, int] = {}
        self.goaway_code: int | None = None      # from the proxy's GOAWAY
        self.goaway_last_stream: int | None = None
        self.resets: dict[int, int] = {}          # stream id -> RST_STREAM error code from the proxy
        self.frame_counts: dict[int, int] = {}    # frame type -> how many the proxy sent
        self.h2_failed = False
        self.send_failed = False
        self._rx = bytearray()
        self.closed = False             # EOF, reset, or h2 gave up on the connection
        self.bytes_sent = 0
        self.ping_acks = 0
        self.flush()
        if handshake:
            self.wait(lambda: bool(self.server_settings), timeout)

    # --- sending ------------------------------------------------------------------------------

    def flush(self) -> None:
        data = self.conn.data_to_send()
        if data:
            self.send_raw(data)

    def send_raw(self, data: bytes) -> bool:
        """Write bytes as they are; False once the proxy has closed the connection."""
        if self.send_failed:
            return False
        try:
            self.sock.sendall(data)
        except OSError:
            self.send_failed = True     # what the proxy sent before it closed is still readable
            return False
        self.bytes_sent += len(data)
        return True

    def request(self, headers: list, body: bytes | None = None, end: bool = True) -> int:
        """Send a header block exactly as given (no validation, no normalization)."""
        sid = self.conn.get_next_available_stream_id()
        self.responses[sid] = Response()
        self.conn.send_headers(sid, headers, end_stream=end and body is None)
        if body is not None:
            self.conn.send_data(sid, body, end_stream=end)
        self.flush()
        return sid

    def get(self, url: str, extra: list | None = None) -> int:
        """A well-formed proxy request for an absolute http:// URL."""
        rest = url.split("://", 1)[1]
        authority, _, path = rest.partition("/")
        return self.request([(":method", "GET"), (":scheme", "http"), (":authority", authority),
                             (":path", "/" + path)] + (extra or []))

    def data(self, sid: int, payload: bytes, end: bool = False) -> None:
        self.conn.send_data(sid, payload, end_stream=end)
        self.flush()

    def end(self, sid: int) -> None:
        self.conn.end_stream(sid)
        self.flush()

    def reset(self, sid: int, code: int = h2.errors.ErrorCodes.CANCEL) -> None:
        self.conn.reset_stream(sid, code)
        self.flush()

    def trailers(self, sid: int, headers: list) -> None:
        """A trailing HEADERS block that ends the stream."""
        self.conn.send_headers(sid, headers, end_stream=True)
        self.flush()

    def header_block(self, headers: list) -> bytes:
        """An HPACK block from this connection's encoder (keeps the dynamic tables in step)."""
        return self.conn.encoder.encode(headers)

    @staticmethod
    def headers_frame(sid: int, block: bytes, end_headers: bool = True, end_stream: bool = True) -> bytes:
        f = HeadersFrame(sid)
        f.data = block
        f.flags = {"END_HEADERS"} if end_headers else set()
        if end_stream:
            f.flags.add("END_STREAM")
        return f.serialize()

    @staticmethod
    def continuation_frame(sid: int, block: bytes, end_headers: bool = False) -> bytes:
        f = ContinuationFrame(sid)
        f.data = block
        f.flags = {"END_HEADERS"} if end_headers else set()
        return f.serialize()

    @staticmethod
    def rst_frame(sid: int, code: int = h2.errors.ErrorCodes.CANCEL) -> bytes:
        return RstStreamFrame(sid, error_code=code).serialize()

    @staticmethod
    def settings_frame() -> bytes:
        return SettingsFrame(0, settings={h2.settings.SettingCodes.ENABLE_PUSH: 0}).serialize()

    @staticmethod
    def ping_frame(n: int) -> bytes:
        return PingFrame(0, opaque_data=n.to_bytes(8, "big")).serialize()

    @staticmethod
    def data_frame(sid: int, payload: bytes = b"", end_stream: bool = False) -> bytes:
        """A DATA frame h2's flow-control bookkeeping never sees (an empty one costs nothing)."""
        f = DataFrame(sid, data=payload)
        f.flags = {"END_STREAM"} if end_stream else set()
        return f.serialize()

    @staticmethod
    def priority_frame(sid: int, depends_on: int = 0) -> bytes:
        return PriorityFrame(sid, depends_on=depends_on, stream_weight=15).serialize()

    @staticmethod
    def window_update_frame(sid: int, increment: int) -> bytes:
        """Any increment, 0 included (which hyperframe refuses to parse, not to build)."""
        return WindowUpdateFrame(sid, window_increment=increment).serialize()

    def receive_queue(self) -> int:
        """Bytes the kernel holds for us, unread (SIOCINQ): grows while we do not read."""
        return struct.unpack("i", fcntl.ioctl(self.sock.fileno(), termios.FIONREAD, b"\0\0\0\0"))[0]

    # --- receiving ----------------------------------------------------------------------------

    def pump(self, timeout: float) -> bool:
        """One read from the proxy, fed to h2; False once the connection is over."""
        if self.closed:
            return False
        self.sock.settimeout(max(timeout, 0.001))
        try:
            data = self.sock.recv(65536)
        except socket.timeout:
            return True
        except OSError:
            self.closed = True
            return False
        if not data:
            self.closed = True
            return False
        self._scan(data)
        events = []
        if not self.h2_failed:
            try:
                events = self.conn.receive_data(data)
            except h2.exceptions.ProtocolError:
                # Frames for streams h2 never opened (sent raw) or after a GOAWAY: from here on
                # only the frame scanner follows the connection.
                self.h2_failed = True
        for event in events:
            self._on_event(event)
        if not self.h2_failed:
            self.flush()                  # SETTINGS ACK, PING ACK, WINDOW_UPDATE
        return not self.closed

    def _scan(self, data: bytes) -> None:
        """Frame headers read beside h2, so GOAWAY and RST_STREAM are seen even for streams
        sent as raw frames, or after h2 gave up on the connection."""
        self._rx += data
        for _ in range(100_000):
            if len(self._rx) < 9:
                return
            length = int.from_bytes(self._rx[:3], "big")
            if len(self._rx) < 9 + length:
                return
            kind, sid = self._rx[3], int.from_bytes(self._rx[5:9], "big") & 0x7FFFFFFF
            payload = bytes(self._rx[9:9 + length])
            del self._rx[:9 + length]
            self.frame_counts[kind] = self.frame_counts.get(kind, 0) + 1
            if kind == 0x7 and length >= 8:                     # GOAWAY
                self.goaway_code = int.from_bytes(payload[4:8], "big")
                self.goaway_last_stream = int.from_bytes(payload[:4], "big") & 0x7FFFFFFF
            elif kind == 0x3 and length == 4:                   # RST_STREAM
                self.resets[sid] = int.from_bytes(payload, "big")

    def _on_event(self, event) -> None:
        E = h2.events
        sid = getattr(event, "stream_id", None)
        r = self.responses.get(sid) if sid else None
        if isinstance(event, E.ResponseReceived) and r is not None:
            r.headers = list(event.headers)
            r.status = int(dict(r.headers)[b":status"])
            if event.stream_ended is not None:
                r.ended, r.done_at = True, time.monotonic()
        elif isinstance(event, E.DataReceived):
            if r is not None:
                r.body += event.data
            self.conn.acknowledge_received_data(event.flow_controlled_length, sid)
        elif isinstance(event, E.StreamEnded) and r is not None:
            r.ended, r.done_at = True, time.monotonic()
        elif isinstance(event, E.StreamReset) and r is not None:
            r.reset, r.done_at = event.error_code, time.monotonic()
        elif isinstance(event, E.RemoteSettingsChanged):
            self.server_settings.update({int(k): v.new_value for k, v in event.changed_settings.items()})
        elif isinstance(event, E.PingAckReceived):
            self.ping_acks += 1

    def wait(self, predicate, timeout: float | None = None) -> bool:
        """Read until `predicate()` holds, the connection ends, or the deadline passes."""
        deadline = time.monotonic() + (timeout or self.timeout)
        for _ in range(100_000):
            if predicate():
                return True
            left = deadline - time.monotonic()
            if left <= 0 or not self.pump(min(left, 0.5)):
                return predicate()
        return predicate()

    def response(self, sid: int, timeout: float | None = None) -> Response:
        self.wait(lambda: self.responses[sid].done, timeout)
        return self.responses[sid]

    def wait_closed(self, timeout: float | None = None) -> bool:
        """Read (and drop) everything until the proxy closes the connection."""
        return self.wait(lambda: self.closed, timeout)

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass

    def __enter__(self) -> "H2RawClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
