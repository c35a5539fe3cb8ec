"""Hypothesis fuzzing of `appliance.protocols.h2_mapping` (RFC 9113 §8, RFC 8441).

Properties: any header block h2 could hand over fails only with `StreamError`; whatever is
accepted becomes an HTTP/1.1 head our own HTTP/1.1 parser reads back field for field (so nothing
smuggled in a value turns into a field, a request line or a second request); and the blocks
built for HTTP/2 clients carry no connection-specific field.
"""

from __future__ import annotations

import base64

from hypothesis import given
from hypothesis import strategies as st

from appliance.protocols.forwarding import HOP_BY_HOP
from appliance.protocols.h2_mapping import (
    CONNECTION_SPECIFIC,
    DataLengthCheck,
    StreamError,
    h2_response_block,
    http1_request_head,
    parse_request_block,
    websocket_http1_request,
)
from appliance.protocols.http1 import parse_request_head, request_line, serialize_head

ME = "proxy.localhost"
KEY = base64.b64encode(b"0123456789abcdef").decode("ascii")

NAMES = [b":method", b":scheme", b":authority", b":path", b":protocol", b":status", b":", b"",
         b"host", b"Host", b"content-length", b"cookie", b"te", b"connection", b"upgrade",
         b"transfer-encoding", b"keep-alive", b"proxy-connection", b"via", b"x-a", b"X-A",
         b"sec-websocket-version", b"sec-websocket-key", b"proxy-authorization", b"trailer"]
VALUES = [b"GET", b"CONNECT", b"OPTIONS", b"POST", b"http", b"https", b"ftp", b"websocket",
          b"a.example", b"a.example:443", b"[::1]:80", b"u@a.example", b"/", b"*", b"/a?b",
          b"", b" ", b"\t", b"\r\n", b"\n", b"\r", b"\0", b"\x7f", b"\xff", b"trailers", b"5",
          b"+5", b"5, 5", b"0", b"x\r\nx-injected: 1", b"%", b"@", b":", b"a.example:0", b"13"]

field_name = st.one_of(st.sampled_from(NAMES), st.binary(max_size=8))
field_value = st.one_of(st.sampled_from(VALUES), st.binary(max_size=16),
                        st.lists(st.sampled_from(VALUES), max_size=4).map(b"".join))
random_block = st.lists(st.tuples(field_name, field_value), max_size=12)

SKELETONS = [
    [(b":method", b"GET"), (b":scheme", b"https"), (b":authority", b"a.example"), (b":path", b"/")],
    [(b":method", b"POST"), (b":scheme", b"http"), (b":authority", b"a.example:8080"),
     (b":path", b"/p?q")],
    [(b":method", b"CONNECT"), (b":authority", b"a.example:443")],
    [(b":method", b"CONNECT"), (b":protocol", b"websocket"), (b":scheme", b"https"),
     (b":authority", b"a.example"), (b":path", b"/ws")],
]


# --- valid requests and plausible fields ---------------------------------------------------

token_name = st.from_regex(r"[a-z][a-z0-9!#$%&'*+.^_`|~-]{0,15}", fullmatch=True).filter(
    lambda n: n not in CONNECTION_SPECIFIC | HOP_BY_HOP | {"te", "host", "content-length", "cookie"}
    and not n.startswith("sec-websocket-"))
field_char = st.characters(min_codepoint=0x20, max_codepoint=0xFF, blacklist_characters="\x7f")
field_text = st.text(field_char | st.just("\t"), max_size=30).map(lambda v: v.strip(" \t"))
label = st.from_regex(r"[a-z0-9][a-z0-9-]{0,9}", fullmatch=True)
hostname = st.one_of(st.lists(label, min_size=1, max_size=4).map(".".join),
                     st.sampled_from(["127.0.0.1", "[::1]", "[2001:db8::7]"]))
authority = st.tuples(hostname, st.one_of(st.none(), st.integers(1, 65535))).map(
    lambda t: t[0] if t[1] is None else f"{t[0]}:{t[1]}")
path = st.from_regex(r"/[\x21-\x7e]{0,40}", fullmatch=True)
method = st.one_of(st.sampled_from(["GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"]),
                   st.from_regex(r"[A-Z][A-Z0-9!#$%&'*+.^_`|~-]{0,9}", fullmatch=True)).filter(
    lambda m: m != "CONNECT")
fields = st.lists(st.tuples(token_name, field_text), max_size=8)

# A valid start, then fields that are mostly plausible: a valid name with a value that has
# one suspicious fragment (CR, LF, NUL, edge whitespace...) spliced in, or anything at all.
plain_name = st.sampled_from([b"x-a", b"accept", b"user-agent", b"cookie", b"te", b"via",
                              b"content-length", b"host", b"sec-websocket-version"])
spliced_value = st.tuples(field_text, st.sampled_from(VALUES), field_text).map(
    lambda t: t[0].encode("latin-1") + t[1] + t[2].encode("latin-1"))
extra_field = st.one_of(st.tuples(plain_name, field_text.map(lambda v: v.encode("latin-1"))),
                        st.tuples(plain_name, spliced_value),
                        st.tuples(field_name, field_value))
skeleton_block = st.tuples(st.sampled_from(SKELETONS), st.lists(extra_field, max_size=4)).map(
    lambda t: t[0] + t[1])


def http1_round_trip(req) -> None:
    """The HTTP/1.1 head for `req` parses back to exactly what was meant to be sent."""
    if req.kind == "websocket":
        line, headers = websocket_http1_request(req, KEY, ME)
        want = ("GET", req.path)
    else:
        *want, headers = http1_request_head(req, ME, body_follows=True)
        line = request_line(*want)
    head = parse_request_head(serialize_head(line, headers))
    assert (head.method, head.target, head.version) == (*want, (1, 1))
    assert head.headers == headers
    names = {k.lower() for k, _ in headers}
    assert not names & {"keep-alive", "proxy-connection", "proxy-authorization"}
    assert [k.lower() for k, _ in headers].count("host") == 1


@given(st.one_of(random_block, skeleton_block))
def test_any_block_fails_only_with_stream_error(block):
    try:
        req = parse_request_block(block)
    except StreamError as exc:
        assert exc.status in (400, 501)
        return
    http1_round_trip(req)


@given(skeleton_block)
def test_str_and_bytes_blocks_agree(block):
    as_text = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in block]
    try:
        expected = parse_request_block(block)
    except StreamError:
        expected = None
    try:
        got = parse_request_block(as_text)
    except StreamError:
        got = None
    assert got == expected


def encode(block):
    return [(k.encode("latin-1"), v.encode("latin-1")) for k, v in block]

@given(method, st.sampled_from(["http", "https"]), authority, path, fields)
def test_valid_request_maps_to_the_same_http1_head(method, scheme, authority, path, fields):
    block = [(":method", method), (":scheme", scheme), (":authority", authority), (":path", path)]
    req = parse_request_block(encode(block + fields))
    assert req.headers == tuple(fields)
    got_method, target, headers = http1_request_head(req, ME)
    head = parse_request_head(serialize_head(request_line(got_method, target), headers))
    assert (head.method, head.target) == (method, path)
    assert head.headers == (("Host", req.target.authority),) + tuple(fields) + (("Via", f"2 {ME}"),)


@given(authority, path, fields)
def test_valid_websocket_request_maps_to_the_same_handshake(authority, path, fields):
    block = [(":method", "CONNECT"), (":protocol", "websocket"), (":scheme", "https"),
             (":authority", authority), (":path", path)]
    req = parse_request_block(encode(block + fields))
    line, headers = websocket_http1_request(req, KEY, ME)
    head = parse_request_head(serialize_head(line, headers))
    assert (head.method, head.target) == ("GET", path)
    assert head.headers[5:-1] == tuple(fields)


# --- blocks for HTTP/2 clients --------------------------------------------------------------

any_name = st.from_regex(r"[A-Za-z0-9!#$%&'*+.^_`|~-]{1,20}", fullmatch=True)
response_fields = st.lists(st.tuples(st.one_of(any_name, st.sampled_from(
    ["Connection", "Keep-Alive", "Transfer-Encoding", "Upgrade", "TE", "Content-Length",
     "Proxy-Connection", "Trailer", "X-Private"])), field_text), max_size=10)


@given(st.integers(100, 999).filter(lambda s: s != 101), response_fields)
def test_response_block_has_no_connection_specific_field(status, headers):
    block = h2_response_block(status, tuple(headers), ME)
    assert block[0] == (":status", str(status))
    names = [k for k, _ in block[1:]]
    assert all(n == n.lower() and not n.startswith(":") for n in names)
    assert not set(names) & (CONNECTION_SPECIFIC | {"te"})


@given(st.one_of(st.none(), st.integers(0, 1000)), st.lists(st.integers(0, 300), max_size=8))
def test_data_length_check_refuses_exactly_the_mismatches(declared, pieces):
    check = DataLengthCheck(declared)
    try:
        for n in pieces:
            check.data(n)
        check.end()
    except StreamError:
        assert declared is not None and sum(pieces) != declared
    else:
        assert declared is None or sum(pieces) == declared
