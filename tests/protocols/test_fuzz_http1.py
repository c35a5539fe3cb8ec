"""Hypothesis fuzzing of `appliance.protocols.http1` (RFC 9112).

Two properties: the parsers fail only with `RemoteProtocolError`, whatever bytes arrive; and the
body codecs round-trip, however the network splits the bytes.
"""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from appliance.protocols.http1 import (
    ChunkedDecoder,
    LengthDecoder,
    RemoteProtocolError,
    chunk_header,
    find_head_end,
    last_chunk,
    parse_request_head,
    parse_response_head,
    request_framing,
    response_framing,
)


# Pieces of real heads, so generated inputs get past the first line often enough to matter.
FRAGMENTS = [
    b"GET", b"CONNECT", b"HEAD", b" ", b"  ", b"\t", b"http://a.example/", b"a.example:443", b"/",
    b"*", b"HTTP/1.1", b"HTTP/1.0", b"HTTP/2.0", b"http/1.1", b"200", b"204", b"304", b"101",
    b"OK", b"\r\n", b"\n", b"\r", b":", b": ", b"Host", b"Content-Length", b"Transfer-Encoding",
    b"chunked", b"gzip", b",", b"5", b"-1", b"00", b"Connection", b"close", b"\x00", b"\x7f",
    b"\xff", b"X-A",
]
head_bytes = st.one_of(
    st.binary(max_size=300),
    st.lists(st.sampled_from(FRAGMENTS), max_size=40).map(b"".join),
)


def _only_remote_errors(call, *args):
    try:
        return call(*args)
    except RemoteProtocolError as exc:
        assert exc.status in (400, 501, 502, 505)
        return None


@given(head_bytes)
def test_parse_request_head_raises_only_remote_protocol_error(data):
    head = _only_remote_errors(parse_request_head, data)
    if head is not None:
        assert head.version[0] == 1
        _only_remote_errors(request_framing, head)


@given(head_bytes, st.sampled_from(["GET", "HEAD", "CONNECT", "POST"]))
def test_parse_response_head_raises_only_remote_protocol_error(data, method):
    head = _only_remote_errors(parse_response_head, data)
    if head is not None:
        assert 0 <= head.status <= 999
        _only_remote_errors(response_framing, method, head)


@given(head_bytes, st.integers(min_value=1, max_value=400))
def test_find_head_end_raises_only_remote_protocol_error(data, max_bytes):
    end = _only_remote_errors(find_head_end, data, max_bytes)
    if end is None:
        assert len(data) >= max_bytes
    elif end >= 0:
        assert 0 < end <= min(len(data), max_bytes)
        assert data[:end].endswith((b"\n\n", b"\n\r\n"))
        # The head parsers then see exactly that head, and still fail only in the allowed way.
        _only_remote_errors(parse_request_head, data[:end])
        _only_remote_errors(parse_response_head, data[:end])
    else:
        assert end == -1 and len(data) < max_bytes


@given(st.lists(st.one_of(st.binary(max_size=20), st.sampled_from(FRAGMENTS)), max_size=30))
def test_chunked_decoder_raises_only_remote_protocol_error(pieces):
    decoder = ChunkedDecoder(max_trailer_bytes=256)
    try:
        for piece in pieces:
            assert all(isinstance(out, bytes) and out for out in decoder.feed(piece))
    except RemoteProtocolError as exc:
        assert exc.status == 400


# --- round trips ----------------------------------------------------------------------------

TOKEN = st.from_regex(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]{1,12}", fullmatch=True)
# Field values as a peer may send them: visible ASCII and obs-text, inner blanks, no outer ones.
VISIBLE = "".join(map(chr, [*range(0x21, 0x7F), *range(0x80, 0x100)]))
FIELD_VALUE = st.lists(st.text(VISIBLE, min_size=1, max_size=8), max_size=4).map(" ".join)
TRAILERS = st.lists(st.tuples(TOKEN, FIELD_VALUE), max_size=5).map(tuple)


def split_at(data: bytes, cuts: list[int]) -> list[bytes]:
    """`data` cut at the given offsets (taken modulo its length + 1)."""
    points = sorted({c % (len(data) + 1) for c in cuts})
    return [data[a:b] for a, b in zip([0, *points], [*points, len(data)])]


def chunked(body: bytes, sizes: list[int], extensions: bool) -> bytes:
    out, pos, i = [], 0, 0
    while pos < len(body):
        size = sizes[i % len(sizes)] if sizes else len(body)
        header = chunk_header(size if pos + size <= len(body) else len(body) - pos)
        if extensions and i % 2:
            header = header[:-2] + b";ext=" + str(i).encode() + b"\r\n"
        out += [header, body[pos:pos + size], b"\r\n"]
        pos += size
        i += 1
    return b"".join(out)


@given(
    body=st.binary(max_size=2000),
    sizes=st.lists(st.integers(min_value=1, max_value=300), max_size=8),
    extensions=st.booleans(),
    trailers=TRAILERS,
    leftover=st.binary(max_size=100),
    cuts=st.lists(st.integers(min_value=0, max_value=10**6), max_size=30),
)
def test_chunked_round_trip_in_random_splits(body, sizes, extensions, trailers, leftover, cuts):
    wire = chunked(body, sizes, extensions) + last_chunk(trailers) + leftover
    decoder = ChunkedDecoder()
    payload = []
    for piece in split_at(wire, cuts):
        payload += decoder.feed(piece)
    assert b"".join(payload) == body
    assert decoder.done
    assert decoder.trailers == trailers
    assert decoder.leftover == leftover
    decoder.feed_eof()


@given(
    body=st.binary(max_size=2000),
    leftover=st.binary(max_size=100),
    cuts=st.lists(st.integers(min_value=0, max_value=10**6), max_size=30),
)
def test_length_round_trip_in_random_splits(body, leftover, cuts):
    decoder = LengthDecoder(len(body))
    payload = []
    for piece in split_at(body + leftover, cuts):
        payload += decoder.feed(piece)
    assert b"".join(payload) == body
    assert all(payload)                       # no empty pieces handed on
    assert decoder.done
    assert decoder.leftover == leftover
    decoder.feed_eof()
