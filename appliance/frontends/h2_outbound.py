"""DATA waiting to go out on one HTTP/2 connection, framed in fair turns (sans-I/O).

The HTTP/2 frontend's streams hand their DATA to `OutboundData`; the connection's writer asks
it for a batch of frames (`frame`) and writes them after what h2 itself queued, in one write.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import h2.connection
import h2.exceptions

from ..compat import GoawayTolerantH2Connection, frame_head


@dataclass
class FramedData:
    """One batch of `OutboundData.frame`: the frames' bytes in order, and what became of streams."""

    pieces: list = field(default_factory=list)    # frame heads and payload views, to be joined
    emptied: list[int] = field(default_factory=list)   # streams all of whose data is framed now
    refused: list[int] = field(default_factory=list)   # streams h2 says can send no more (closed)
    more: bool = False                             # stopped at the budget with data sendable


class OutboundData:
    """DATA the streams have handed to the writer, framed in round-robin turns (sans-I/O).

    Each turn gives one stream at most one frame (the peer's MAX_FRAME_SIZE), within its window
    and the connection's, so a stream cannot take the connection window from the others however
    much it has queued. h2's `send_data` builds, serializes and joins every frame in Python (most
    of the CPU of a busy tunnel); here h2 only checks the connection and stream state and counts
    both windows, as its `send_data` does, and the frame head is packed here. The frames' bytes
    must be written after what `data_to_send()` returned before `frame` was called.
    """

    def __init__(self) -> None:
        self._pending: dict[int, memoryview] = {}
        self._turns: deque[int] = deque()            # streams with data, in turn order

    def __bool__(self) -> bool:
        return bool(self._turns)

    def add(self, stream_id: int, data) -> None:
        view = memoryview(data).cast("B")
        if view:
            self._pending[stream_id] = view
            self._turns.append(stream_id)

    def drop(self, stream_id: int) -> None:
        """Forget what is left unframed of a stream's data."""
        if self._pending.pop(stream_id, None) is not None:
            self._turns.remove(stream_id)

    def frame(self, conn: GoawayTolerantH2Connection, budget: int) -> FramedData:
        out = FramedData()
        frame_size = conn.max_outbound_frame_size
        stalled = 0                        # turns in a row that framed nothing
        while self._turns and stalled < len(self._turns):
            if budget <= 0:
                out.more = True
                break
            stream_id = self._turns.popleft()
            view = self._pending[stream_id]
            try:
                size = min(len(view), frame_size, conn.local_flow_control_window(stream_id))
                if size > 0:
                    conn.count_sent_data(stream_id, size)
            except (h2.exceptions.ProtocolError, KeyError) as exc:     # KeyError: h2 4.1
                closed = conn.state_machine.state == h2.connection.ConnectionState.CLOSED
                if not (closed or isinstance(exc, (h2.exceptions.StreamClosedError, KeyError))):
                    raise
                del self._pending[stream_id]
                out.refused.append(stream_id)
                continue
            if size <= 0:                  # this stream's window is closed: the others go on
                self._turns.append(stream_id)
                stalled += 1
                continue
            stalled = 0
            out.pieces += (frame_head(size, 0, 0, stream_id), view[:size])      # DATA, no flags
            budget -= size
            if size < len(view):
                self._pending[stream_id] = view[size:]
                self._turns.append(stream_id)
            else:
                del self._pending[stream_id]
                out.emptied.append(stream_id)
        return out
