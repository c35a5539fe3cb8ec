"""`compat.GoawayTolerantH2Connection.send_headers_packed` / `send_data_packed` (RFC 9113 §6.1,
§6.2, §6.10, §8.1; RFC 7541 §6.2.3).

The frontend packs a response's HEADERS (and CONTINUATION) and DATA frames itself instead of
through h2's frame objects. A real h2 client, in memory, must read them back as the ordinary
events, and the stream states must move as h2's own `send_headers`/`send_data` move them.
"""

from __future__ import annotations

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import hpack
import pytest

from appliance.compat import GoawayTolerantH2Connection

FRAME = 16384


def request(path: str = "/"):
    """A client whose GET (ended with its HEADERS) the server, like the frontend's, received."""
    client = h2.connection.H2Connection(h2.config.H2Configuration(
        client_side=True, normalize_inbound_headers=False))     # cookie fields as sent
    server = GoawayTolerantH2Connection(h2.config.H2Configuration(
        client_side=False, header_encoding=None, validate_inbound_headers=False,
        validate_outbound_headers=False))
    client.initiate_connection()
    server.initiate_connection()
    client.send_headers(1, [(":method", "GET"), (":scheme", "http"), (":authority", "origin"),
                            (":path", path)], end_stream=True)
    server.receive_data(client.data_to_send())
    client.receive_data(server.data_to_send())
    return client, server


def events_of(client, server, kind):
    return [e for e in client.receive_data(server.data_to_send()) if isinstance(e, kind)]


def test_headers_then_data_ending_the_stream():
    client, server = request()
    server.send_headers_packed(1, [(b":status", b"200"), (b"content-length", b"5")])
    server.send_data_packed(1, b"hello", end_stream=True)
    events = client.receive_data(server.data_to_send())
    kinds = [type(e) for e in events]
    assert kinds[:3] == [h2.events.ResponseReceived, h2.events.DataReceived, h2.events.StreamEnded]
    assert events[0].headers == [(b":status", b"200"), (b"content-length", b"5")]
    assert events[1].data == b"hello"
    assert server.streams[1].closed
    with pytest.raises(h2.exceptions.StreamClosedError):
        server.send_data_packed(1, b"more")


def test_headers_alone_end_the_stream():
    client, server = request()
    server.send_headers_packed(1, [(b":status", b"204")], end_stream=True)
    events = client.receive_data(server.data_to_send())
    assert [type(e) for e in events][:2] == [h2.events.ResponseReceived, h2.events.StreamEnded]
    assert server.streams[1].closed


def test_block_over_max_frame_size_goes_on_in_continuation():
    client, server = request()
    big = [(b":status", b"200")] + [(b"x-field-%d" % i, b"v" * 1000) for i in range(40)]
    server.send_headers_packed(1, big, end_stream=True)
    [response] = events_of(client, server, h2.events.ResponseReceived)
    assert response.headers == big
    assert response.stream_ended is not None


def test_interim_response_then_final_then_trailers():
    client, server = request()
    server.send_headers_packed(1, [(b":status", b"103"), (b"link", b"</a.css>; rel=preload")])
    server.send_headers_packed(1, [(b":status", b"200")])
    server.send_data_packed(1, b"body")
    server.send_headers_packed(1, [(b"x-checksum", b"abc")], end_stream=True)
    events = client.receive_data(server.data_to_send())
    kinds = [type(e) for e in events]
    assert kinds[:4] == [h2.events.InformationalResponseReceived, h2.events.ResponseReceived,
                         h2.events.DataReceived, h2.events.TrailersReceived]
    assert events[3].headers == [(b"x-checksum", b"abc")]
    assert h2.events.StreamEnded in kinds


def test_credentials_never_indexed():
    client, server = request()
    server.send_headers_packed(1, [(b":status", b"200"), (b"authorization", b"Basic c2VjcmV0"),
                                   (b"cookie", b"short=1"), (b"cookie", b"x" * 40)])
    [response] = events_of(client, server, h2.events.ResponseReceived)
    never = [isinstance(field, hpack.NeverIndexedHeaderTuple) for field in response.headers]
    assert never == [False, True, True, False]


def test_closed_stream_is_refused():
    client, server = request()
    server.reset_stream(1)
    with pytest.raises((h2.exceptions.StreamClosedError, KeyError)):
        server.send_headers_packed(1, [(b":status", b"200")])
