"""RFC 9112 (HTTP/1.1) checks of `appliance.protocols.http1`: heads, framing, chunked coding.

Test names carry the section they check: `s2_2` is RFC 9112 §2.2, and so on. Every invalid input
must end in `RemoteProtocolError` with the status the frontend answers with: 400 for a client's
request, 505 for an unsupported major version, 501 for a transfer coding we do not implement,
502 for whatever an origin gets wrong.
"""

from __future__ import annotations

import pytest

from appliance.protocols.http1 import (
    CHUNKED,
    MAX_CHUNK_LINE,
    MAX_HEADER_LINES,
    NO_BODY,
    UNTIL_CLOSE,
    ChunkedDecoder,
    CloseDecoder,
    Framing,
    LengthDecoder,
    LocalProtocolError,
    RemoteProtocolError,
    RequestHead,
    ResponseHead,
    body_decoder,
    chunk_header,
    connection_tokens,
    find_head_end,
    header_value,
    header_values,
    last_chunk,
    parse_request_head,
    parse_response_head,
    request_framing,
    request_line,
    response_framing,
    serialize_head,
    status_line,
    wants_keep_alive,
)


def refused(call, *args, status: int = 400) -> RemoteProtocolError:
    """Run `call(*args)`, which must raise RemoteProtocolError carrying `status`."""
    with pytest.raises(RemoteProtocolError) as info:
        call(*args)
    assert info.value.status == status, str(info.value)
    return info.value


def request(headers: bytes = b"", line: bytes = b"GET http://example.com/ HTTP/1.1") -> RequestHead:
    return parse_request_head(line + b"\r\n" + headers + b"\r\n")


def response(headers: bytes = b"", line: bytes = b"HTTP/1.1 200 OK") -> ResponseHead:
    return parse_response_head(line + b"\r\n" + headers + b"\r\n")


def decode_all(decoder, data: bytes, step: int | None = None) -> bytes:
    """Feed `data` whole or `step` bytes at a time; the payload pieces joined."""
    step = step or max(len(data), 1)
    pieces = []
    for i in range(0, len(data), step):
        pieces += decoder.feed(data[i:i + step])
    return b"".join(pieces)


# --- §2.2 message parsing: where a head ends ------------------------------------------------

def test_s2_2_head_end_is_just_past_the_blank_line():
    head = b"GET http://a/ HTTP/1.1\r\nHost: a\r\n\r\n"
    assert find_head_end(head + b"body bytes", 1000) == len(head)


def test_s2_2_incomplete_head_asks_for_more():
    assert find_head_end(b"", 100) == -1
    assert find_head_end(b"GET http://a/ HTTP/1.1\r\nHost: a\r\n", 100) == -1
    assert find_head_end(b"GET http://a/ HTTP/1.1\r\nHost: a\r\n\r", 100) == -1


def test_s2_2_bare_lf_line_endings_are_accepted():
    data = b"GET http://a/x HTTP/1.1\nHost: a\nX-One: 1\n\nrest"
    end = find_head_end(data, 1000)
    assert data[end:] == b"rest"
    head = parse_request_head(data[:end])
    assert head.target == "http://a/x"
    assert head.headers == (("Host", "a"), ("X-One", "1"))


def test_s2_2_mixed_crlf_and_lf_line_endings_are_accepted():
    data = b"HTTP/1.1 200 OK\r\nA: 1\nB: 2\r\n\n"
    assert find_head_end(data, 1000) == len(data)
    assert parse_response_head(data).headers == (("A", "1"), ("B", "2"))


def test_s2_2_bytearray_buffers_work_too():
    assert find_head_end(bytearray(b"GET http://a/ HTTP/1.1\r\n\r\nX"), 100) == 26


@pytest.mark.parametrize("max_bytes", [16, 40, 100])
def test_s2_2_head_larger_than_limit_is_refused(max_bytes):
    data = b"GET http://a/ HTTP/1.1\r\n" + b"X-Filler: yyyyyyyy\r\n" * 20
    refused(find_head_end, data, max_bytes)


def test_s2_2_head_ending_past_the_limit_is_refused_even_when_complete():
    data = b"GET http://a/ HTTP/1.1\r\n" + b"X: y\r\n" * 20 + b"\r\n"
    refused(find_head_end, data, 60)


def test_s2_2_head_of_exactly_the_limit_is_accepted():
    data = b"GET http://a/ HTTP/1.1\r\nHost: a\r\n\r\n"
    assert find_head_end(data + b"more", len(data)) == len(data)
    assert find_head_end(data[:-1], len(data)) == -1


@pytest.mark.parametrize("data", [
    b"GET http://a/ HTTP/1.1\r\nX: a\rb\r\n\r\n",       # in a field value
    b"GET http://a/\r HTTP/1.1\r\n\r\n",               # in the request line
    b"GET http://a/ HTTP/1.1\r\r\n\r\n",               # CR CR LF
    b"GET http://a/ HTTP/1.1\r\nX: y\r\r\n\r\n",
    b"GET http://a/ HTTP/1.1\r\n\rX: y\r\n\r\n",
])
def test_s2_2_bare_cr_is_refused(data):
    refused(parse_request_head, data)


def test_s2_2_bare_cr_from_an_origin_is_a_bad_gateway():
    refused(parse_response_head, b"HTTP/1.1 200 OK\r\nX: a\rb\r\n\r\n", status=502)
    refused(parse_response_head, b"HTTP/1.1 200 OK\r\r\n\r\n", status=502)


def test_s2_2_empty_head_is_refused():
    refused(parse_request_head, b"\r\n")
    refused(parse_request_head, b"")
    refused(parse_response_head, b"\r\n", status=502)


def test_s2_2_whitespace_before_first_field_is_refused():
    refused(parse_request_head, b"GET http://a/ HTTP/1.1\r\n X: y\r\n\r\n")
    refused(parse_response_head, b"HTTP/1.1 200 OK\r\n\tX: y\r\n\r\n", status=502)


# --- §2.3 / §3 request line -----------------------------------------------------------------

def test_s3_request_line_and_fields_are_kept_as_written():
    head = parse_request_head(
        b"POST http://Example.com:8080/a/b?c=d HTTP/1.1\r\n"
        b"Host: Example.com:8080\r\n"
        b"X-Mixed-CASE:   padded value \t\r\n"
        b"x-dup: 1\r\n"
        b"X-Dup: 2\r\n"
        b"Empty:\r\n"
        b"Latin: caf\xe9\r\n"
        b"\r\n")
    assert head == RequestHead(
        "POST", "http://Example.com:8080/a/b?c=d", (1, 1),
        (("Host", "Example.com:8080"), ("X-Mixed-CASE", "padded value"), ("x-dup", "1"),
         ("X-Dup", "2"), ("Empty", ""), ("Latin", "caf\xe9")))


@pytest.mark.parametrize("line, method, target", [
    (b"CONNECT example.com:443 HTTP/1.1", "CONNECT", "example.com:443"),
    (b"OPTIONS * HTTP/1.1", "OPTIONS", "*"),
    (b"GET / HTTP/1.1", "GET", "/"),
    (b"M-SEARCH * HTTP/1.1", "M-SEARCH", "*"),
    (b"get http://a/ HTTP/1.1", "get", "http://a/"),   # methods are case-sensitive tokens
])
def test_s3_request_line_forms(line, method, target):
    head = request(line=line)
    assert (head.method, head.target) == (method, target)


def test_s2_3_http_1_0_is_accepted():
    assert request(line=b"GET http://a/ HTTP/1.0").version == (1, 0)


@pytest.mark.parametrize("line", [
    b"GET http://a/",                          # missing version
    b"GET http://a/ ",
    b"GET",
    b"GET  http://a/ HTTP/1.1",                # two spaces
    b"GET http://a/  HTTP/1.1",
    b" GET http://a/ HTTP/1.1",
    b"GET http://a/ HTTP/1.1 ",
    b"GET\thttp://a/ HTTP/1.1",                # tab is not SP
    b"GET http://a/ http/1.1",                 # version name is case-sensitive
    b"GET http://a/ Http/1.1",
    b"GET http://a/ HTTP/1",
    b"GET http://a/ HTTP/11.1",
    b"GET http://a/ HTTP/1.1.1",
    b"GET http://a/ HTTPS/1.1",
    b"GET http://a/\x00 HTTP/1.1",             # control characters in the target
    b"GET http://a/\x01x HTTP/1.1",
    b"GET http://a/\x1b HTTP/1.1",
    b"GET http://a/\x7f HTTP/1.1",
    b"GET http://a/\xff HTTP/1.1",
    b"GET http://a/a b HTTP/1.1",
    b"G(T http://a/ HTTP/1.1",                 # not a token
    b"http://a/ HTTP/1.1",
])
def test_s3_invalid_request_line_is_refused(line):
    refused(parse_request_head, line + b"\r\nHost: a\r\n\r\n")


@pytest.mark.parametrize("version", [b"HTTP/2.0", b"HTTP/3.0", b"HTTP/0.9"])
def test_s2_3_other_major_versions_get_505(version):
    refused(parse_request_head, b"GET http://a/ " + version + b"\r\n\r\n", status=505)


# --- §4 status line -------------------------------------------------------------------------

def test_s4_status_line_parsed():
    head = response(b"Content-Type: text/plain\r\n", b"HTTP/1.0 404 Not  Found \xe9")
    assert head == ResponseHead((1, 0), 404, "Not  Found \xe9", (("Content-Type", "text/plain"),))


@pytest.mark.parametrize("line", [b"HTTP/1.1 204", b"HTTP/1.1 204 "])
def test_s4_reason_phrase_may_be_empty(line):
    head = response(line=line)
    assert (head.status, head.reason) == (204, "")


@pytest.mark.parametrize("line", [
    b"HTTP/1.1 20 OK",
    b"HTTP/1.1 2000 OK",
    b"HTTP/1.1 abc OK",
    b"HTTP/1.1  200 OK",
    b"http/1.1 200 OK",
    b"HTTP/1.1",
    b"ICY 200 OK",
    b"HTTP/1.1 200 O\x00K",
    b"HTTP/1.1 200 OK\x7f",
    b" HTTP/1.1 200 OK",
    b"HTTP/2 200",
])
def test_s4_invalid_status_line_is_a_bad_gateway(line):
    refused(parse_response_head, line + b"\r\n\r\n", status=502)


def test_s4_other_major_version_from_origin_is_a_bad_gateway():
    refused(parse_response_head, b"HTTP/2.0 200 OK\r\n\r\n", status=502)


# --- §5 field syntax ------------------------------------------------------------------------

@pytest.mark.parametrize("field", [
    b"Bad Name: x",                # space inside the name
    b"Name : x",                   # §5.1: no whitespace between name and colon
    b"Name\t: x",
    b": x",                        # empty name
    b":",
    b"No colon at all",
    b"NoColon",
    b"X\x00: y",
    b"\xc4: y",                    # non-token byte
    b"X(1): y",
    b"X: a\x00b",                  # control characters in the value
    b"X: a\x7fb",
    b"X: a\x0bb",
])
def test_s5_invalid_field_is_refused(field):
    refused(parse_request_head, b"GET http://a/ HTTP/1.1\r\n" + field + b"\r\n\r\n")
    refused(parse_response_head, b"HTTP/1.1 200 OK\r\n" + field + b"\r\n\r\n", status=502)


@pytest.mark.parametrize("fold", [b" continued", b"\tcontinued", b"   "])
def test_s5_2_obs_fold_is_refused(fold):
    data = b"GET http://a/ HTTP/1.1\r\nX-Long: first\r\n" + fold + b"\r\nHost: a\r\n\r\n"
    refused(parse_request_head, data)
    refused(parse_response_head, b"HTTP/1.1 200 OK\r\nX: y\r\n" + fold + b"\r\n\r\n", status=502)


def test_s5_empty_line_inside_a_head_is_refused():
    # Whatever follows the first blank line is body, never more fields.
    refused(parse_request_head, b"GET http://a/ HTTP/1.1\r\nA: 1\r\n\r\nB: 2\r\n\r\n")


def test_s5_field_count_is_bounded():
    ok = b"GET http://a/ HTTP/1.1\r\n" + b"X: y\r\n" * MAX_HEADER_LINES + b"\r\n"
    assert len(parse_request_head(ok).headers) == MAX_HEADER_LINES
    too_many = b"GET http://a/ HTTP/1.1\r\n" + b"X: y\r\n" * (MAX_HEADER_LINES + 1) + b"\r\n"
    refused(parse_request_head, too_many)
    refused(parse_response_head, b"HTTP/1.1 200 OK\r\n" + too_many.split(b"\r\n", 1)[1], status=502)


def test_s5_tab_in_field_value_is_kept():
    assert request(b"X: a\tb\r\n").headers == (("X", "a\tb"),)


# --- field helpers (RFC 9110 §5.3, RFC 9112 §9.3) -----------------------------------------

def test_field_values_split_lists_case_insensitively():
    headers = (("Connection", "keep-alive, Upgrade"), ("connection", " TE ,, "), ("X", "1"))
    assert header_values(headers, "CONNECTION") == ["keep-alive", "Upgrade", "TE"]
    assert header_value(headers, "connection") == "keep-alive, Upgrade"
    assert header_value(headers, "absent") is None
    assert connection_tokens(headers) == {"keep-alive", "upgrade", "te"}


@pytest.mark.parametrize("version, connection, expected", [
    ((1, 1), None, True),
    ((1, 1), "close", False),
    ((1, 1), "Keep-Alive, CLOSE", False),
    ((1, 0), None, False),
    ((1, 0), "keep-alive", True),
    ((1, 0), "Keep-Alive", True),
])
def test_s9_3_persistence(version, connection, expected):
    headers = (("Connection", connection),) if connection else ()
    assert wants_keep_alive(version, headers) is expected


# --- §6 request framing ---------------------------------------------------------------------

def test_s6_3_request_without_length_or_coding_has_no_body():
    assert request_framing(request()) == NO_BODY


@pytest.mark.parametrize("fields, length", [
    (b"Content-Length: 10\r\n", 10),
    (b"Content-Length: 10, 10\r\n", 10),
    (b"Content-Length: 10\r\nContent-Length: 10\r\n", 10),
    (b"Content-Length: 007\r\n", 7),
])
def test_s6_3_content_length_frames_request(fields, length):
    assert request_framing(request(fields)) == Framing("length", length)


def test_s6_3_content_length_zero_means_no_body():
    assert request_framing(request(b"Content-Length: 0\r\n")) == NO_BODY


@pytest.mark.parametrize("fields", [
    b"Content-Length: 10, 11\r\n",
    b"Content-Length: 10\r\nContent-Length: 11\r\n",
    b"Content-Length: 0\r\nContent-Length: 5\r\n",
])
def test_s6_3_conflicting_content_lengths_are_refused(fields):
    assert "conflicting" in str(refused(request_framing, request(fields)))


@pytest.mark.parametrize("value", [
    b"abc", b"-1", b"+5", b"1e3", b"0x10", b"5 5", b"1.0", b"", b",", b"5,", b", 5",
    b"1" * 19,
])
def test_s6_3_invalid_content_length_is_refused(value):
    refused(request_framing, request(b"Content-Length: " + value + b"\r\n"))


@pytest.mark.parametrize("fields", [
    b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n",
    b"Transfer-Encoding: chunked\r\nContent-Length: 5\r\n",
    b"Transfer-Encoding: chunked\r\nContent-Length: 0\r\n",
    b"Transfer-Encoding: gzip, chunked\r\nContent-Length: 5\r\n",
    b"Content-Length: 5\r\nTransfer-Encoding: identity\r\n",
])
def test_s6_1_content_length_with_transfer_encoding_is_refused(fields):
    # The request-smuggling pair (RFC 9112 §6.1, §11.2): refused, never read as chunked.
    refused(request_framing, request(fields))


@pytest.mark.parametrize("value", [b"chunked", b"Chunked", b"CHUNKED", b" chunked "])
def test_s6_1_chunked_request(value):
    assert request_framing(request(b"Transfer-Encoding: " + value + b"\r\n")) == CHUNKED


@pytest.mark.parametrize("value", [b"gzip, chunked", b"deflate,chunked", b"chunked, chunked"])
def test_s6_1_unsupported_transfer_coding_is_not_implemented(value):
    refused(request_framing, request(b"Transfer-Encoding: " + value + b"\r\n"), status=501)


def test_s6_1_split_transfer_encoding_fields_are_combined():
    fields = b"Transfer-Encoding: gzip\r\nTransfer-Encoding: chunked\r\n"
    refused(request_framing, request(fields), status=501)


@pytest.mark.parametrize("value", [b"gzip", b"chunked, gzip", b"identity"])
def test_s6_3_request_coding_not_ending_in_chunked_is_a_bad_request(value):
    # §6.3 item 4: the length cannot be determined; 400 and close.
    refused(request_framing, request(b"Transfer-Encoding: " + value + b"\r\n"))


def test_s6_1_transfer_encoding_in_http_1_0_request_is_refused():
    head = request(b"Transfer-Encoding: chunked\r\n", line=b"POST http://a/ HTTP/1.0")
    refused(request_framing, head)


# --- §6.3 response framing ------------------------------------------------------------------

@pytest.mark.parametrize("method, line, fields", [
    ("HEAD", b"HTTP/1.1 200 OK", b"Content-Length: 10\r\n"),
    ("HEAD", b"HTTP/1.1 200 OK", b"Transfer-Encoding: chunked\r\n"),
    ("GET", b"HTTP/1.1 100 Continue", b""),
    ("GET", b"HTTP/1.1 101 Switching Protocols", b"Content-Length: 10\r\n"),
    ("GET", b"HTTP/1.1 103 Early Hints", b""),
    ("GET", b"HTTP/1.1 204 No Content", b"Content-Length: 10\r\n"),
    ("GET", b"HTTP/1.1 304 Not Modified", b"Content-Length: 10\r\n"),
    ("GET", b"HTTP/1.1 304 Not Modified", b"Transfer-Encoding: chunked\r\n"),
    ("CONNECT", b"HTTP/1.1 200 Connection established", b"Content-Length: 10\r\n"),
    ("CONNECT", b"HTTP/1.1 299 Whatever", b"Transfer-Encoding: chunked\r\n"),
    ("GET", b"HTTP/1.1 200 OK", b"Content-Length: 0\r\n"),
])
def test_s6_3_responses_without_body(method, line, fields):
    assert response_framing(method, response(fields, line)) == NO_BODY


def test_s6_3_failed_connect_response_has_a_body():
    head = response(b"Content-Length: 5\r\n", b"HTTP/1.1 407 Proxy Authentication Required")
    assert response_framing("CONNECT", head) == Framing("length", 5)


@pytest.mark.parametrize("fields, framing", [
    (b"Transfer-Encoding: chunked\r\n", CHUNKED),
    (b"Transfer-Encoding: gzip, Chunked\r\n", CHUNKED),
    (b"Transfer-Encoding: chunked\r\nContent-Length: 10\r\n", CHUNKED),   # coding overrides
    (b"Transfer-Encoding: gzip\r\n", UNTIL_CLOSE),                        # §6.3 item 4
    (b"Content-Length: 7\r\n", Framing("length", 7)),
    (b"Content-Length: 7, 7\r\n", Framing("length", 7)),
    (b"", UNTIL_CLOSE),                                                   # §6.3 item 8
])
def test_s6_3_response_framing(fields, framing):
    assert response_framing("GET", response(fields)) == framing


@pytest.mark.parametrize("fields", [
    b"Content-Length: 7, 8\r\n",
    b"Content-Length: 7\r\nContent-Length: 8\r\n",
    b"Content-Length: seven\r\n",
    b"Content-Length: \r\n",
    b"Content-Length: -7\r\n",
])
def test_s6_3_bad_response_content_length_is_a_bad_gateway(fields):
    refused(response_framing, "GET", response(fields), status=502)


# --- §6 body decoders -----------------------------------------------------------------------

def test_body_decoder_follows_framing():
    assert isinstance(body_decoder(Framing("length", 3)), LengthDecoder)
    assert isinstance(body_decoder(CHUNKED), ChunkedDecoder)
    assert isinstance(body_decoder(UNTIL_CLOSE), CloseDecoder)
    none = body_decoder(NO_BODY)
    assert none.done
    assert none.feed(b"GET http://a/ HTTP/1.1\r\n") == []
    assert none.leftover == b"GET http://a/ HTTP/1.1\r\n"
    none.feed_eof()


@pytest.mark.parametrize("step", [None, 1, 2, 5])
def test_s6_2_length_body_and_pipelined_leftover(step):
    decoder = LengthDecoder(10)
    assert decode_all(decoder, b"0123456789GET http://a/", step) == b"0123456789"
    assert decoder.done
    assert decoder.leftover == b"GET http://a/"


def test_s6_2_length_body_leftover_keeps_growing_after_done():
    decoder = LengthDecoder(2)
    assert decoder.feed(b"ab") == [b"ab"]
    assert decoder.done and decoder.leftover == b""
    assert decoder.feed(b"cd") == []
    assert decoder.feed(b"ef") == []
    assert decoder.leftover == b"cdef"


def test_s6_2_length_body_cut_short_is_refused():
    decoder = LengthDecoder(10)
    assert decoder.feed(b"") == []
    decoder.feed(b"12345")
    assert decoder.remaining == 5 and not decoder.done
    refused(decoder.feed_eof)


def test_s6_2_zero_length_is_done_at_once():
    decoder = LengthDecoder(0)
    assert decoder.done
    assert decoder.feed(b"next") == []
    assert decoder.leftover == b"next"


def test_s6_3_until_close_body_ends_at_eof():
    decoder = CloseDecoder()
    assert decode_all(decoder, b"everything\r\n0\r\n\r\n", 3) == b"everything\r\n0\r\n\r\n"
    assert decoder.feed(b"") == []
    assert not decoder.done
    decoder.feed_eof()
    assert decoder.done


# --- §7.1 chunked transfer coding -----------------------------------------------------------

CHUNKED_BODY = b"5\r\nhello\r\n7;name=value;x=\"q\"\r\n, world\r\n0\r\n\r\n"


@pytest.mark.parametrize("step", [None, 1, 2, 3, 7])
def test_s7_1_chunked_body_with_pipelined_leftover(step):
    decoder = ChunkedDecoder()
    pipelined = b"GET http://a/ HTTP/1.1\r\n\r\n"
    assert decode_all(decoder, CHUNKED_BODY + pipelined, step) == b"hello, world"
    assert decoder.done
    assert decoder.trailers == ()
    assert decoder.leftover == pipelined


def test_s7_1_chunked_leftover_keeps_growing_after_done():
    decoder = ChunkedDecoder()
    assert decoder.feed(b"0\r\n\r\nAB") == []
    assert decoder.feed(b"CD") == []
    assert decoder.leftover == b"ABCD"


@pytest.mark.parametrize("step", [None, 1, 4])
def test_s7_1_2_chunked_trailers(step):
    data = (b"3\r\nabc\r\n0\r\nChecksum: 1234\r\nX-Trace:  a b \r\n\r\n"
            b"POST http://b/ HTTP/1.1\r\n")
    decoder = ChunkedDecoder()
    assert decode_all(decoder, data, step) == b"abc"
    assert decoder.done
    assert decoder.trailers == (("Checksum", "1234"), ("X-Trace", "a b"))
    assert decoder.leftover == b"POST http://b/ HTTP/1.1\r\n"


@pytest.mark.parametrize("step", [None, 1])
def test_s7_1_bare_lf_in_chunked_coding_is_accepted(step):
    data = b"4\nabcd\n2;ext\nef\n0\nTrailer-One: 1\n\nnext"
    decoder = ChunkedDecoder()
    assert decode_all(decoder, data, step) == b"abcdef"
    assert decoder.trailers == (("Trailer-One", "1"),)
    assert decoder.leftover == b"next"


def test_s7_1_empty_chunked_body_with_bare_lf_end():
    decoder = ChunkedDecoder()
    assert decode_all(decoder, b"0\n\n", 1) == b""
    assert decoder.done and decoder.leftover == b""


def test_s7_1_hex_sizes_any_case_and_sixteen_digits():
    decoder = ChunkedDecoder()
    body = b"x" * 26
    data = b"1A\r\n" + body + b"\r\n000000000000000a\r\n" + b"y" * 10 + b"\r\n0 \r\n\r\n"
    assert decode_all(decoder, data) == body + b"y" * 10
    assert decoder.done


def test_s7_1_chunked_body_cut_short_is_refused():
    decoder = ChunkedDecoder()
    decoder.feed(b"5\r\nhel")
    refused(decoder.feed_eof)


@pytest.mark.parametrize("size_line", [
    b"zz", b"", b"-1", b"0x10", b"1" * 17, b"f" * 17, b" 5", b"5 x", b"+5", b"5\x00", b";ext",
    b"5;ext\x00", b"5\r",
])
def test_s7_1_invalid_chunk_size_is_refused(size_line):
    decoder = ChunkedDecoder()
    refused(decoder.feed, size_line + b"\r\nhello\r\n0\r\n\r\n")


def test_s7_1_invalid_chunk_size_after_a_good_chunk_is_refused():
    decoder = ChunkedDecoder()
    assert decoder.feed(b"2\r\nab\r\n") == [b"ab"]
    refused(decoder.feed, b"zz\r\n")


def test_s7_1_chunk_size_line_over_limit_is_refused():
    refused(ChunkedDecoder().feed, b"5;" + b"x" * MAX_CHUNK_LINE + b"\r\nhello\r\n0\r\n\r\n")


def test_s7_1_chunk_size_line_over_limit_is_refused_before_its_end_arrives():
    decoder = ChunkedDecoder()
    for _ in range(MAX_CHUNK_LINE // 512 - 1):
        assert decoder.feed(b"5;" + b"x" * 510) == []
    refused(decoder.feed, b"x" * 1024)


def test_s7_1_long_chunk_extension_under_limit_is_accepted():
    decoder = ChunkedDecoder()
    line = b"5;" + b"x" * (MAX_CHUNK_LINE - 10)
    assert decode_all(decoder, line + b"\r\nhello\r\n0\r\n\r\n", 100) == b"hello"
    assert decoder.done


@pytest.mark.parametrize("data", [
    b"5\r\nhelloX\r\n0\r\n\r\n",
    b"5\r\nhello0\r\n\r\n",
    b"5\r\nhello\rX0\r\n\r\n",
    b"5\r\nhello\r\r\n0\r\n\r\n",
    b"5\r\nhello world\r\n0\r\n\r\n",
])
def test_s7_1_chunk_data_without_crlf_is_refused(data):
    refused(ChunkedDecoder().feed, data)


def test_s7_1_missing_crlf_seen_when_fed_byte_by_byte():
    decoder = ChunkedDecoder()
    for byte in b"3\r\nabc\r":
        decoder.feed(bytes([byte]))
    refused(decoder.feed, b"X")


@pytest.mark.parametrize("trailers", [
    b"Bad Name: x\r\n\r\n",
    b"X: y\r\n folded\r\n\r\n",
    b"X: a\rb\r\n\r\n",
    b"X: a\x00b\r\n\r\n",
    b"NoColon\r\n\r\n",
])
def test_s7_1_2_invalid_trailer_section_is_refused(trailers):
    refused(ChunkedDecoder().feed, b"0\r\n" + trailers)


def test_s7_1_2_trailer_section_is_bounded():
    decoder = ChunkedDecoder(max_trailer_bytes=64)
    refused(decoder.feed, b"0\r\n" + b"X: y\r\n" * 20)


# --- encoders -------------------------------------------------------------------------------

def test_s7_1_chunk_header():
    assert chunk_header(1) == b"1\r\n"
    assert chunk_header(255) == b"ff\r\n"
    assert chunk_header(65536) == b"10000\r\n"


def test_s7_1_last_chunk_without_trailers():
    assert last_chunk() == b"0\r\n\r\n"
    decoder = ChunkedDecoder()
    assert decoder.feed(chunk_header(3) + b"abc\r\n" + last_chunk()) == [b"abc"]
    assert decoder.done and decoder.trailers == () and decoder.leftover == b""


def test_s7_1_2_last_chunk_with_trailers():
    trailers = (("Checksum", "sha256=abc"), ("X-Count", "2"))
    encoded = last_chunk(trailers)
    assert encoded == b"0\r\nChecksum: sha256=abc\r\nX-Count: 2\r\n\r\n"
    decoder = ChunkedDecoder()
    assert decoder.feed(encoded + b"next") == []
    assert decoder.trailers == trailers
    assert decoder.leftover == b"next"


def test_s7_1_2_last_chunk_refuses_trailer_injection():
    with pytest.raises(LocalProtocolError):
        last_chunk((("X", "a\r\nEvil: 1"),))


def test_serialize_head_keeps_case_and_order():
    data = serialize_head(request_line("GET", "/p?q"), (("Host", "a"), ("x-Lower", "v"), ("X", "")))
    assert data == b"GET /p?q HTTP/1.1\r\nHost: a\r\nx-Lower: v\r\nX: \r\n\r\n"
    assert parse_request_head(data) == RequestHead(
        "GET", "/p?q", (1, 1), (("Host", "a"), ("x-Lower", "v"), ("X", "")))


def test_serialize_head_status_line_and_latin1():
    data = serialize_head(status_line(200, "OK", (1, 0)), (("X", "caf\xe9"),))
    assert data == b"HTTP/1.0 200 OK\r\nX: caf\xe9\r\n\r\n"
    assert serialize_head(status_line(204, "No Content"), ()) == b"HTTP/1.1 204 No Content\r\n\r\n"


@pytest.mark.parametrize("start, headers", [
    ("GET / HTTP/1.1\r\nEvil: 1", ()),
    ("GET / HTTP/1.1\n", ()),
    ("GET / HTTP/1.1", (("X", "a\r\nEvil: 1"),)),       # a whole CRLF smuggled into a value
    ("GET / HTTP/1.1", (("X", "a\r\n"),)),
    ("GET / HTTP/1.1", (("X", "a\nEvil: 1"),)),
    ("GET / HTTP/1.1", (("X", "a\rEvil: 1"),)),
    ("GET / HTTP/1.1", (("X\r\nEvil", "1"),)),
    ("GET / HTTP/1.1", (("X", "ok"), ("Y", "\r\n\r\nGET http://evil/ HTTP/1.1"))),
])
def test_serialize_head_refuses_cr_lf_injection(start, headers):
    with pytest.raises(LocalProtocolError):
        serialize_head(start, headers)
