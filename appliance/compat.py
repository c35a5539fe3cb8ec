"""Workarounds for library versions, in one place (Debian bookworm's and the newest from PyPI)."""

from __future__ import annotations

import struct

from h2.connection import ConnectionInputs, ConnectionState, H2Connection, _decode_headers
from h2.errors import ErrorCodes
from h2.stream import StreamInputs
from hpack import NeverIndexedHeaderTuple
from hyperframe.frame import RstStreamFrame

_FRAME_HEAD = struct.Struct(">BHBBL")       # length (24 bits), type, flags, stream id
_DATA, _HEADERS, _CONTINUATION = 0x0, 0x1, 0x9
_END_STREAM, _END_HEADERS = 0x1, 0x4
# Kept out of the HPACK table, as h2's outbound normalizing does (and nghttp2, and Firefox).
_CREDENTIALS = frozenset({b"authorization", b"proxy-authorization"})


class GoawayTolerantH2Connection(H2Connection):
    """An h2 connection on which streams in flight finish after a GOAWAY (RFC 9113 §6.8).

    python-h2 (4.1 on bookworm up to 4.4) moves the connection to CLOSED on any GOAWAY, sent or
    received, then rejects every later frame (including the DATA of streams the GOAWAY allowed to
    finish), and on a received GOAWAY also drops the frames it had queued for sending. After a
    graceful (NO_ERROR) GOAWAY, this keeps the state machine OPEN and the queue intact; the HTTP/2
    frontend refuses new streams itself once a GOAWAY has gone either way. It also leaves the
    content-length check to the frontend, so that a wrong length resets one stream only.
    """

    def _receive_goaway_frame(self, frame):
        if frame.error_code != 0:
            return super()._receive_goaway_frame(frame)
        queued = bytes(self._data_to_send)
        state = self.state_machine.state            # SERVER_OPEN or CLIENT_OPEN
        frames, events = super()._receive_goaway_frame(frame)
        self._data_to_send = bytearray(queued) + self._data_to_send
        if state != ConnectionState.CLOSED:
            self.state_machine.state = state
        return frames, events

    def close_connection(self, error_code=0, additional_data=None, last_stream_id=None):
        state = self.state_machine.state
        super().close_connection(error_code, additional_data, last_stream_id)
        if error_code == 0 and state != ConnectionState.CLOSED:
            self.state_machine.state = state

    def count_sent_data(self, stream_id: int, size: int) -> None:
        """What `send_data` checks and counts for one DATA frame, without building it (the
        HTTP/2 frontend packs DATA frames itself; same attributes in h2 4.1 to 4.4): both state
        machines take SEND_DATA (raising on a closed stream or connection), both windows shrink."""
        self.state_machine.process_input(ConnectionInputs.SEND_DATA)
        stream = self.streams[stream_id]
        stream.state_machine.process_input(StreamInputs.SEND_DATA)
        stream.outbound_flow_control_window -= size
        self.outbound_flow_control_window -= size

    def send_data_packed(self, stream_id: int, data, end_stream: bool = False) -> None:
        """`send_data` for one unpadded frame within the windows (the caller checked both),
        with its head packed here instead of by a hyperframe object."""
        self.count_sent_data(stream_id, len(data))
        if end_stream:
            self.streams[stream_id].state_machine.process_input(StreamInputs.SEND_END_STREAM)
        self._data_to_send += frame_head(len(data), _DATA, _END_STREAM if end_stream else 0, stream_id)
        self._data_to_send += data

    def send_headers_packed(self, stream_id: int, block: list[tuple[bytes, bytes]],
                            end_stream: bool = False) -> None:
        """`send_headers` of a response, an interim response or trailers on an open stream: the
        same state changes and HPACK encoding, without h2's header generators and frame objects
        (most of a small response's cost in h2). Only for blocks `h2_mapping` built and checked
        (lowercase names, :status only, no connection-specific field, no CR/LF/NUL): h2's
        outbound validation and normalizing, which would check them again, are skipped."""
        self.state_machine.process_input(ConnectionInputs.SEND_HEADERS)
        stream = self.streams[stream_id]                 # KeyError: gone already
        interim = block[0][0] == b":status" and block[0][1][:1] == b"1"
        stream.state_machine.process_input(
            StreamInputs.SEND_INFORMATIONAL_HEADERS if interim else StreamInputs.SEND_HEADERS)
        encoded = self.encoder.encode([
            NeverIndexedHeaderTuple(name, value)
            if name in _CREDENTIALS or (name == b"cookie" and len(value) < 20) else (name, value)
            for name, value in block])
        if end_stream:
            stream.state_machine.process_input(StreamInputs.SEND_END_STREAM)
        size = self.max_outbound_frame_size
        pieces = [encoded[i:i + size] for i in range(0, len(encoded), size)] or [b""]
        out = self._data_to_send
        for i, piece in enumerate(pieces):
            kind = _HEADERS if i == 0 else _CONTINUATION
            flags = (_END_STREAM if end_stream and i == 0 else 0) | \
                (_END_HEADERS if i == len(pieces) - 1 else 0)
            out += frame_head(len(piece), kind, flags, stream_id)
            out += piece

    refused_streams = 0              # new streams refused over MAX_CONCURRENT_STREAMS, for metrics

    def _receive_headers_frame(self, frame):
        # RFC 9113 §5.1.2: a HEADERS frame over our MAX_CONCURRENT_STREAMS is a *stream* error
        # (REFUSED_STREAM: the client may retry it). h2 (4.1 to 4.4) raises TooManyStreamsError
        # before decoding the block, which loses the HPACK state and so ends the connection.
        # Here the block is decoded first (HPACK stays in step) and only that stream is refused.
        # `streams` holds every open stream (and closed ones not yet swept), so while it is
        # short of the limit the count (a sweep over all of them, per HEADERS) is not needed.
        limit = self.local_settings.max_concurrent_streams
        if (frame.stream_id not in self.streams and frame.stream_id % 2 == 1
                and frame.stream_id > self.highest_inbound_stream_id
                and len(self.streams) >= limit and self.open_inbound_streams + 1 > limit):
            list(_decode_headers(self.decoder, frame.data))
            self.highest_inbound_stream_id = frame.stream_id
            self.refused_streams += 1
            reset = RstStreamFrame(frame.stream_id)
            reset.error_code = ErrorCodes.REFUSED_STREAM
            return [reset], []
        return super()._receive_headers_frame(frame)

    def _begin_new_stream(self, stream_id, allowed_ids):
        # RFC 9113 §8.1.1: a content-length that disagrees with the DATA makes the request
        # malformed, a *stream* error. h2 (4.1 to 4.4) checks it in every version, whatever
        # `validate_inbound_headers` says, by raising out of `receive_data`: a connection error
        # that drops every other stream and the frames after it. The frontend checks the length
        # itself (`h2_mapping.DataLengthCheck`) and resets only that stream, so h2's check is off.
        stream = super()._begin_new_stream(stream_id, allowed_ids)
        stream._initialize_content_length = _content_length_left_to_frontend
        stream._track_content_length = _data_length_left_to_frontend
        return stream

    def pending_header_block_bytes(self) -> int:
        """Bytes of a header block whose END_HEADERS has not come yet (HEADERS + CONTINUATION).

        h2 (4.1 to 4.4) holds these frames in its frame buffer's private `_headers_buffer` and
        bounds only their number (64), so a block may grow to about 64 × MAX_FRAME_SIZE before h2
        stops it. Should a later h2 rename the buffer, this says 0 and h2's own bound is left.
        """
        frames = getattr(self.incoming_buffer, "_headers_buffer", None) or ()
        return sum(len(frame.data) for frame in frames)


def frame_head(size: int, kind: int, flags: int, stream_id: int) -> bytes:
    """The 9 octets that open an HTTP/2 frame (RFC 9113 §4.1)."""
    return _FRAME_HEAD.pack(size >> 16, size & 0xFFFF, kind, flags, stream_id)


def _content_length_left_to_frontend(headers) -> None:
    return None


def _data_length_left_to_frontend(length, end_stream) -> None:
    return None
