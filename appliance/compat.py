"""Workarounds for library versions, in one place (Debian bookworm's and the newest from PyPI)."""

from __future__ import annotations

from h2.connection import ConnectionState, H2Connection


class GoawayTolerantH2Connection(H2Connection):
    """An h2 connection on which streams in flight finish after a GOAWAY (RFC 9113 §6.8).

    python-h2 (4.1 on bookworm up to 4.4) moves the connection to CLOSED on any GOAWAY, sent or
    received, then rejects every later frame (including the DATA of streams the GOAWAY allowed to
    finish), and on a received GOAWAY also drops the frames it had queued for sending. After a
    graceful (NO_ERROR) GOAWAY, this keeps the state machine OPEN and the queue intact; the HTTP/2
    frontend refuses new streams itself once a GOAWAY has gone either way.
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
