"""`frontends.h2_outbound.OutboundData`: DATA of many streams framed in round-robin turns (RFC 9113 §5.2, §6.1).

A real h2 client and the frontend's h2 connection, in memory: the frames `OutboundData` packs
itself must read back in the client as ordinary DATA, within the client's windows and its
MAX_FRAME_SIZE, one frame per stream per turn.
"""

from __future__ import annotations

import pytest

pytest.importorskip("gevent")

import h2.config  # noqa: E402
import h2.connection  # noqa: E402
import h2.errors  # noqa: E402
import h2.events  # noqa: E402
import h2.settings  # noqa: E402

from appliance.compat import GoawayTolerantH2Connection  # noqa: E402
from appliance.frontends.h2_outbound import OutboundData  # noqa: E402

FRAME = 16384
CODES = h2.settings.SettingCodes


def open_streams(count: int, client_settings: dict | None = None):
    """A client with `count` CONNECT streams answered 200 by a server like the frontend's, and
    the client's windows opened wide as browsers do (6 MiB a stream, 8 MiB more the connection)."""
    client = h2.connection.H2Connection(h2.config.H2Configuration(
        client_side=True, validate_outbound_headers=False))   # h2 4.1 wants :path on CONNECT
    server = GoawayTolerantH2Connection(h2.config.H2Configuration(
        client_side=False, header_encoding=None, validate_inbound_headers=False))
    client.initiate_connection()
    client.update_settings({CODES.INITIAL_WINDOW_SIZE: 6 * 1024 * 1024, **(client_settings or {})})
    client.increment_flow_control_window(8 * 1024 * 1024)
    server.initiate_connection()
    ids = [client.get_next_available_stream_id() + 2 * i for i in range(count)]
    for stream_id in ids:
        client.send_headers(stream_id, [(":method", "CONNECT"), (":authority", "origin:443")])
    exchange(client, server)
    for stream_id in ids:
        server.send_headers(stream_id, [(b":status", b"200")])
    exchange(client, server)
    return client, server, ids


def exchange(client, server) -> None:
    for _ in range(3):
        server.receive_data(client.data_to_send())
        client.receive_data(server.data_to_send())


def deliver(client, server, framed) -> list[tuple[int, bytes]]:
    """Write what h2 queued, then the framed DATA, to the client: the DATA it received."""
    events = client.receive_data(server.data_to_send() + b"".join(framed.pieces))
    return [(e.stream_id, e.data) for e in events if isinstance(e, h2.events.DataReceived)]


def test_one_frame_per_stream_per_turn():
    client, server, (a, b, c) = open_streams(3)
    outbound = OutboundData()
    outbound.add(a, b"a" * (2 * FRAME + 100))
    outbound.add(b, b"b" * FRAME)
    outbound.add(c, memoryview(bytearray(b"c" * 10)))
    framed = outbound.frame(server, budget=1 << 20)
    got = deliver(client, server, framed)
    assert [(sid, len(data)) for sid, data in got] == [
        (a, FRAME), (b, FRAME), (c, 10), (a, FRAME), (a, 100)]
    assert b"".join(data for sid, data in got if sid == a) == b"a" * (2 * FRAME + 100)
    assert framed.emptied == [b, c, a] and not framed.refused and not framed.more
    assert not outbound


def test_budget_ends_a_batch_and_the_next_goes_on_in_turn():
    client, server, (a, b) = open_streams(2)
    outbound = OutboundData()
    outbound.add(a, b"a" * 4 * FRAME)
    outbound.add(b, b"b" * 4 * FRAME)
    first = outbound.frame(server, budget=3 * FRAME)
    assert first.more and not first.emptied
    assert [sid for sid, _ in deliver(client, server, first)] == [a, b, a]
    second = outbound.frame(server, budget=1 << 20)
    assert [sid for sid, _ in deliver(client, server, second)] == [b, a, b, a, b]
    assert second.emptied == [a, b]


def test_frames_fit_the_peers_max_frame_size():
    client, server, (a,) = open_streams(1, {CODES.MAX_FRAME_SIZE: 4 * FRAME})
    outbound = OutboundData()
    outbound.add(a, b"x" * 5 * FRAME)
    got = deliver(client, server, outbound.frame(server, budget=1 << 20))
    assert [len(data) for _, data in got] == [4 * FRAME, FRAME]


def test_a_closed_stream_window_stalls_it_alone():
    client, server, (a, b) = open_streams(2, {CODES.INITIAL_WINDOW_SIZE: 3 * FRAME})
    outbound = OutboundData()
    outbound.add(a, b"a" * 5 * FRAME)
    outbound.add(b, b"b" * FRAME)
    framed = outbound.frame(server, budget=1 << 20)
    got = deliver(client, server, framed)
    assert sum(len(d) for sid, d in got if sid == a) == 3 * FRAME       # its whole window
    assert framed.emptied == [b] and not framed.more
    assert server.local_flow_control_window(a) == 0
    assert not outbound.frame(server, budget=1 << 20).pieces            # still closed: nothing
    client.acknowledge_received_data(3 * FRAME, a)                        # the window reopens
    exchange(client, server)
    framed = outbound.frame(server, budget=1 << 20)
    assert sum(len(d) for _, d in deliver(client, server, framed)) == 2 * FRAME
    assert framed.emptied == [a]


def test_the_connection_window_is_shared_in_turns():
    client, server, ids = open_streams(4)
    window = server.outbound_flow_control_window          # under the streams' windows together
    outbound = OutboundData()
    for stream_id in ids:
        outbound.add(stream_id, b"z" * window)                            # each wants it all
    got = deliver(client, server, outbound.frame(server, budget=1 << 30))
    per_stream = {sid: sum(len(d) for s, d in got if s == sid) for sid in ids}
    assert sum(per_stream.values()) == window and server.outbound_flow_control_window == 0
    assert max(per_stream.values()) - min(per_stream.values()) <= FRAME


def test_a_reset_stream_is_refused_and_the_others_go_on():
    client, server, (a, b) = open_streams(2)
    client.reset_stream(a, h2.errors.ErrorCodes.CANCEL)
    server.receive_data(client.data_to_send())
    outbound = OutboundData()
    outbound.add(a, b"a" * FRAME)
    outbound.add(b, b"b" * FRAME)
    framed = outbound.frame(server, budget=1 << 20)
    assert framed.refused == [a] and framed.emptied == [b]
    assert deliver(client, server, framed) == [(b, b"b" * FRAME)]


def test_drop_forgets_unframed_data():
    client, server, (a, b) = open_streams(2)
    outbound = OutboundData()
    outbound.add(a, b"a" * FRAME)
    outbound.add(b, b"b" * FRAME)
    outbound.drop(a)
    outbound.drop(a)                                                      # twice is harmless
    assert deliver(client, server, outbound.frame(server, budget=1 << 20)) == [(b, b"b" * FRAME)]
