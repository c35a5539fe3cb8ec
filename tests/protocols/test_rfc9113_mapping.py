"""RFC 9113 §8 checks of `appliance.protocols.h2_mapping`: request header blocks as a real h2
server decodes them (validation off, as the frontend runs it), the HTTP/1.1 head the origin gets,
and the HTTP/2 response, trailer and informational blocks built from an HTTP/1.1 response.

Bad blocks are fed both directly and through a real h2 client → server pair. h2 4.4 refuses a
few of them itself (content-length it cannot read, or conflicting values) even with inbound
validation off; h2 4.1 passes everything on, and then `parse_request_block` must refuse it.
"""

from __future__ import annotations

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings
import pytest

from appliance.protocols.forwarding import Target, has_via_loop
from appliance.protocols.h2_mapping import (
    DataLengthCheck,
    StreamError,
    block_bytes,
    h2_informational_allowed,
    h2_response_block,
    h2_trailer_block,
    http1_request_head,
    parse_request_block,
    parse_trailer_block,
)
from appliance.protocols.http1 import (
    LocalProtocolError,
    parse_request_head,
    request_line,
    serialize_head,
)
from .h2_peers import h2_pair


ME = "proxy.localhost"


# --- a real h2 client and server ------------------------------------------------------------

def through_h2(block, validate: bool = True, end_stream: bool = True):
    """The header block the server side's RequestReceived carries for `block`."""
    client, server = h2_pair(validate)
    client.send_headers(client.get_next_available_stream_id(), block, end_stream=end_stream)
    events = server.receive_data(client.data_to_send())
    (received,) = [e for e in events if isinstance(e, h2.events.RequestReceived)]
    return received.headers


def response_through_h2(block):
    """Send `block` as a response from the server side; the client's ResponseReceived headers."""
    client, server = h2_pair()
    stream_id = client.get_next_available_stream_id()
    client.send_headers(stream_id, [(":method", "GET"), (":scheme", "https"),
                                    (":authority", "a.example"), (":path", "/")], end_stream=True)
    server.receive_data(client.data_to_send())
    server.send_headers(stream_id, block, end_stream=True)
    events = client.receive_data(server.data_to_send())
    (received,) = [e for e in events if isinstance(e, h2.events.ResponseReceived)]
    return [(bytes(k), bytes(v)) for k, v in received.headers]


def refused(block, status: int = 400) -> StreamError:
    with pytest.raises(StreamError) as info:
        parse_request_block(block)
    assert info.value.status == status
    return info.value


def refused_through_h2(block, status: int = 400) -> None:
    """Refused by h2 itself (h2 4.4, content-length only) or by us; never passed on."""
    try:
        received = through_h2(block, validate=False)
    except h2.exceptions.ProtocolError as exc:
        assert "content-length" in str(exc).lower()
        return
    refused(received, status)


def as_bytes(block):
    return [(k.encode("latin-1"), v.encode("latin-1")) for k, v in block]


GET = [(":method", "GET"), (":scheme", "https"), (":authority", "a.example"), (":path", "/")]


def with_fields(*fields, base=GET):
    return list(base) + list(fields)


def replace(name, value, base=GET):
    return [(k, value if k == name else v) for k, v in base if value is not None or k != name]


# --- §8.3.1 request pseudo-header fields: valid requests ------------------------------------

def test_s8_3_1_request_through_h2():
    block = [(":method", "GET"), (":scheme", "http"), (":authority", "Origin.Example:8080"),
             (":path", "/a/b?c=d&e"), ("user-agent", "curl/8"), ("accept", "*/*")]
    req = parse_request_block(through_h2(block))
    assert req.kind == "request"
    assert (req.method, req.scheme, req.authority, req.path) == \
        ("GET", "http", "Origin.Example:8080", "/a/b?c=d&e")
    assert req.protocol is None and req.content_length is None
    assert req.headers == (("user-agent", "curl/8"), ("accept", "*/*"))
    assert req.target == Target("http", "origin.example", 8080, "/a/b?c=d&e")


@pytest.mark.parametrize("scheme, authority, target", [
    ("http", "a.example", Target("http", "a.example", 80, "/")),
    ("https", "a.example", Target("https", "a.example", 443, "/")),
    ("https", "a.example:8443", Target("https", "a.example", 8443, "/")),
    ("http", "127.0.0.1:3000", Target("http", "127.0.0.1", 3000, "/")),
    ("http", "[::1]:8080", Target("http", "::1", 8080, "/")),
    ("https", "[2001:DB8::1]", Target("https", "2001:db8::1", 443, "/")),
])
def test_s8_3_1_authority_and_default_port_from_scheme(scheme, authority, target):
    block = replace(":authority", authority, replace(":scheme", scheme))
    assert parse_request_block(through_h2(block)).target == target


def test_s8_3_1_scheme_is_case_insensitive():
    assert parse_request_block(replace(":scheme", "HTTPS")).scheme == "https"


def test_s8_3_1_options_asterisk():
    block = replace(":path", "*", replace(":method", "OPTIONS"))
    req = parse_request_block(through_h2(block))
    assert req.path == "*" and req.target.path == "*"
    method, path, _ = http1_request_head(req, ME)
    assert (method, path) == ("OPTIONS", "*")


def test_s8_3_1_host_stands_in_for_missing_authority():
    block = [(":method", "GET"), (":scheme", "http"), (":path", "/x"), ("host", "b.example:81")]
    req = parse_request_block(through_h2(block, validate=False))
    assert req.authority == "b.example:81"
    assert req.target == Target("http", "b.example", 81, "/x")


@pytest.mark.parametrize("host", ["a.example", "A.EXAMPLE", "a.example:443", "a.example.:443"])
def test_s8_3_1_host_agreeing_with_authority(host):
    req = parse_request_block(through_h2(with_fields(("host", host)), validate=False))
    assert req.target.host == "a.example"
    assert ("host", host) in req.headers


def test_s8_3_1_str_pairs_are_accepted_too():
    req = parse_request_block(with_fields(("x-a", "1")))
    assert req.headers == (("x-a", "1"),)


# --- §8.3 pseudo-header fields: malformed requests ------------------------------------------

PSEUDO_BAD = {
    "regular field before pseudo": [("x-a", "1")] + GET,
    "pseudo after regular": GET[:2] + [("x-a", "1")] + GET[2:],
    "unknown pseudo": with_fields((":foo", "1"), base=GET[:1]) + GET[1:],
    ":status in request": GET[:1] + [(":status", "200")] + GET[1:],
    "duplicate :method": GET + [(":method", "GET")],
    "duplicate :scheme": GET + [(":scheme", "https")],
    "duplicate :authority": GET + [(":authority", "a.example")],
    "duplicate :path": GET + [(":path", "/")],
    "duplicate :path differing": GET + [(":path", "/admin")],
    "missing :method": GET[1:],
    "missing :scheme": replace(":scheme", None),
    "missing :path": replace(":path", None),
    "empty :path": replace(":path", ""),
    "relative :path": replace(":path", "a/b"),
    "absolute-form :path": replace(":path", "https://b.example/"),
    "asterisk for GET": replace(":path", "*"),
    "invalid :scheme": replace(":scheme", "ht tp"),
    "empty :scheme": replace(":scheme", ""),
    "no :authority and no host": replace(":authority", None),
    "invalid :method": replace(":method", "GE T"),
    "empty :method": replace(":method", ""),
}


@pytest.mark.parametrize("block", PSEUDO_BAD.values(), ids=PSEUDO_BAD.keys())
def test_s8_3_malformed_pseudo_header_fields(block):
    refused(block)
    refused(as_bytes(block))
    refused_through_h2(block)


@pytest.mark.parametrize("scheme", ["ftp", "ws", "wss", "gopher"])
def test_s8_3_1_other_schemes_are_not_implemented(scheme):
    error = refused(replace(":scheme", scheme), 501)
    assert "only http and https" in str(error)
    refused_through_h2(replace(":scheme", scheme), 501)


# --- §8.2.1 field validity ------------------------------------------------------------------

FIELD_BAD = {
    "uppercase name": with_fields(("X-Up", "1")),
    "empty name": with_fields(("", "1")),
    "space in name": with_fields(("x a", "1")),
    "colon in name": with_fields(("x:a", "1")),
    "non-token name": with_fields(("x(a)", "1")),
    "CR in value": with_fields(("x-a", "a\rb")),
    "LF in value": with_fields(("x-a", "a\nb")),
    "NUL in value": with_fields(("x-a", "a\0b")),
    "CRLF injection": with_fields(("x-a", "1\r\nx-injected: yes")),
    "leading SP": with_fields(("x-a", " 1")),
    "leading HTAB": with_fields(("x-a", "\t1")),
    "trailing SP": with_fields(("x-a", "1 ")),
    "trailing HTAB": with_fields(("x-a", "1\t")),
    "only SP": with_fields(("x-a", " ")),
    "other CTL": with_fields(("x-a", "a\x01b")),
    "DEL": with_fields(("x-a", "a\x7fb")),
    "CRLF in :authority": replace(":authority", "a.example\r\nx-injected: yes"),
    "CRLF in :path": replace(":path", "/\r\nx-injected: yes"),
    "LF in :method": replace(":method", "GET\n"),
    "space in :path": replace(":path", "/a b"),
    "HTAB in :path": replace(":path", "/a\tb"),
    "CTL in :path": replace(":path", "/a\x01"),
    "DEL in :path": replace(":path", "/a\x7f"),
    "non-ASCII :path": replace(":path", "/\xe9"),
    "NUL in :scheme": replace(":scheme", "https\0"),
    "leading SP in :authority": replace(":authority", " a.example"),
}


@pytest.mark.parametrize("block", FIELD_BAD.values(), ids=FIELD_BAD.keys())
def test_s8_2_1_field_validity(block):
    refused(block)
    refused(as_bytes(block))
    refused_through_h2(as_bytes(block))


def test_s8_2_1_uppercase_name_message():
    assert "uppercase" in str(refused(with_fields(("Content-Type", "text/plain"))))


def test_s8_2_1_non_latin1_str_is_refused():
    refused(with_fields(("x-a", "\u2603")))


def test_s8_2_1_obs_text_passes_as_latin1():
    req = parse_request_block(through_h2(as_bytes(with_fields(("x-a", "caf\xe9")))))
    assert req.headers == (("x-a", "caf\xe9"),)
    method, path, headers = http1_request_head(req, ME)
    assert b"x-a: caf\xe9\r\n" in serialize_head(request_line(method, path), headers)


def test_s8_2_1_empty_value_is_allowed():
    assert parse_request_block(with_fields(("x-a", ""))).headers == (("x-a", ""),)


# --- §8.2.2 connection-specific fields ------------------------------------------------------

CONNECTION_BAD = {
    "connection": with_fields(("connection", "close")),
    "keep-alive": with_fields(("keep-alive", "timeout=5")),
    "proxy-connection": with_fields(("proxy-connection", "keep-alive")),
    "transfer-encoding": with_fields(("transfer-encoding", "chunked")),
    "upgrade": with_fields(("upgrade", "websocket")),
    "te gzip": with_fields(("te", "gzip")),
    "te list": with_fields(("te", "trailers, deflate")),
    "te empty": with_fields(("te", "")),
}


@pytest.mark.parametrize("block", CONNECTION_BAD.values(), ids=CONNECTION_BAD.keys())
def test_s8_2_2_connection_specific_fields(block):
    refused(block)
    refused_through_h2(block)


@pytest.mark.parametrize("value", ["trailers", "Trailers"])
def test_s8_2_2_te_trailers_is_allowed(value):
    req = parse_request_block(through_h2(with_fields(("te", value)), validate=False))
    assert req.headers == (("te", value),)


# --- §8.3.1 :authority and host -------------------------------------------------------------

AUTHORITY_BAD = {
    "userinfo": replace(":authority", "user@a.example"),
    "userinfo with password": replace(":authority", "user:pw@a.example"),
    "empty": replace(":authority", ""),
    "invalid host": replace(":authority", "a..example"),
    "space in host": replace(":authority", "a example"),
    "port zero": replace(":authority", "a.example:0"),
    "port too large": replace(":authority", "a.example:65536"),
    "port not a number": replace(":authority", "a.example:https"),
    "unclosed IPv6": replace(":authority", "[::1:443"),
    "bad IPv6": replace(":authority", "[::g]:443"),
    "host disagrees": with_fields(("host", "b.example")),
    "host port disagrees": with_fields(("host", "a.example:444")),
    "two host fields": with_fields(("host", "a.example"), ("host", "a.example")),
    "two hosts, no authority": with_fields(("host", "a.example"), ("host", "b.example"),
                                           base=replace(":authority", None)),
    "invalid host field": with_fields(("host", "user@a.example")),
    "invalid host field alone": with_fields(("host", "a..b"), base=replace(":authority", None)),
}


@pytest.mark.parametrize("block", AUTHORITY_BAD.values(), ids=AUTHORITY_BAD.keys())
def test_s8_3_1_authority(block):
    refused(block)
    refused_through_h2(block)


# --- §8.1.1 content-length ------------------------------------------------------------------

LENGTH_BAD = {
    "sign": with_fields(("content-length", "+5")),
    "negative": with_fields(("content-length", "-1")),
    "underscore": with_fields(("content-length", "5_0")),
    "hex": with_fields(("content-length", "0x5")),
    "list": with_fields(("content-length", "5, 5")),
    "empty": with_fields(("content-length", "")),
    "non-ASCII digit": as_bytes(with_fields(("content-length", "\xb2"))),
    "huge": with_fields(("content-length", "9" * 19)),
    "enormous": with_fields(("content-length", "9" * 5000)),
    "conflicting": with_fields(("content-length", "1"), ("content-length", "2")),
}


@pytest.mark.parametrize("block", LENGTH_BAD.values(), ids=LENGTH_BAD.keys())
def test_s8_1_1_content_length(block):
    refused(block)
    refused_through_h2(block)


def test_s8_1_1_agreeing_duplicates_collapse_to_one():
    block = with_fields(("content-length", "5"), ("x-a", "1"), ("content-length", "5"),
                        base=replace(":method", "POST"))
    req = parse_request_block(through_h2(block, validate=False, end_stream=False))
    assert req.content_length == 5
    assert req.headers == (("content-length", "5"), ("x-a", "1"))


def test_s8_1_1_data_length_check():
    check = DataLengthCheck(5)
    check.data(2)
    check.data(3)
    check.end()
    with pytest.raises(StreamError):
        DataLengthCheck(5).data(6)
    over = DataLengthCheck(5)
    over.data(5)
    with pytest.raises(StreamError):
        over.data(1)
    under = DataLengthCheck(5)
    under.data(4)
    with pytest.raises(StreamError):
        under.end()
    with pytest.raises(StreamError):
        DataLengthCheck(1).end()
    DataLengthCheck(0).end()


def test_s8_1_1_data_length_check_without_declared_length():
    check = DataLengthCheck(None)
    check.data(10 ** 9)
    check.end()


# --- §8.2.3 cookie crumbs -------------------------------------------------------------------

def test_s8_2_3_cookie_crumbs_joined_where_the_first_was():
    block = with_fields(("cookie", "a=1"), ("x-a", "1"), ("cookie", "b=2"), ("cookie", "c=3"))
    req = parse_request_block(block)
    assert req.headers == (("cookie", "a=1; b=2; c=3"), ("x-a", "1"))


def test_s8_2_3_empty_crumbs_leave_no_trailing_separator():
    block = with_fields(("cookie", ""), ("cookie", "a=1"), ("cookie", ""))
    assert parse_request_block(block).headers == (("cookie", "a=1"),)
    assert parse_request_block(with_fields(("cookie", ""), ("cookie", ""))).headers == \
        (("cookie", ""),)


def test_s8_2_3_cookie_crumbs_through_h2():
    # The client splits one cookie into crumbs for compression; the origin gets one field.
    block = with_fields(("cookie", "a=1; b=2; c=3"), ("accept", "*/*"))
    req = parse_request_block(through_h2(block))
    _, _, headers = http1_request_head(req, ME)
    assert [v for k, v in headers if k == "cookie"] == ["a=1; b=2; c=3"]


# --- §8.5 CONNECT ---------------------------------------------------------------------------

CONNECT = [(":method", "CONNECT"), (":authority", "a.example:443")]


@pytest.mark.parametrize("authority, target", [
    ("a.example:443", Target("tcp", "a.example", 443, "")),
    ("A.Example:8443", Target("tcp", "a.example", 8443, "")),
    ("[::1]:22", Target("tcp", "::1", 22, "")),
    ("192.0.2.1:5222", Target("tcp", "192.0.2.1", 5222, "")),
])
def test_s8_5_connect_through_h2(authority, target):
    # h2 < 4.4 refuses to *send* a CONNECT without :path unless outbound validation is off.
    block = replace(":authority", authority, CONNECT)
    req = parse_request_block(through_h2(block, validate=False, end_stream=False))
    assert req.kind == "connect" and req.method == "CONNECT"
    assert req.scheme is None and req.path is None and req.protocol is None
    assert req.authority == authority
    assert req.target == target


CONNECT_BAD = {
    "with :scheme": CONNECT + [(":scheme", "https")],
    "with :path": CONNECT + [(":path", "/")],
    "with both": CONNECT + [(":scheme", "https"), (":path", "/")],
    "no :authority": CONNECT[:1],
    "host instead of :authority": CONNECT[:1] + [("host", "a.example:443")],
    "no port": replace(":authority", "a.example", CONNECT),
    "empty port": replace(":authority", "a.example:", CONNECT),
    "userinfo": replace(":authority", "u@a.example:443", CONNECT),
    "host disagrees": CONNECT + [("host", "b.example:443")],
    "connection field": CONNECT + [("connection", "keep-alive")],
}


@pytest.mark.parametrize("block", CONNECT_BAD.values(), ids=CONNECT_BAD.keys())
def test_s8_5_malformed_connect(block):
    refused(block)
    refused_through_h2(block)


def test_s8_5_connect_with_agreeing_host():
    req = parse_request_block(CONNECT + [("host", "a.example:443")])
    assert req.target.port == 443


# --- §8.1 trailers --------------------------------------------------------------------------

def test_s8_1_request_trailers():
    assert parse_trailer_block([(b"x-checksum", b"abc")]) == (("x-checksum", "abc"),)
    for bad in ([(b":path", b"/")], [(b"X-Up", b"1")], [(b"x-a", b"1\r\n")],
                [(b"transfer-encoding", b"chunked")], [(b"connection", b"close")]):
        with pytest.raises(StreamError):
            parse_trailer_block(bad)


# --- HTTP/2 request → HTTP/1.1 head (RFC 9110 §7.6) ------------------------------------------

def http1_bytes(req, **kw) -> bytes:
    method, path, headers = http1_request_head(req, ME, **kw)
    return serialize_head(request_line(method, path), headers)


def test_s8_3_1_http1_head_host_first_and_via_last():
    block = [(":method", "POST"), (":scheme", "http"), (":authority", "Origin.Example:80"),
             (":path", "/submit?x=1"), ("content-length", "3"), ("content-type", "text/plain"),
             ("host", "origin.example"), ("proxy-authorization", "Basic dTpw"),
             ("via", "1.1 other"), ("te", "trailers"), ("trailer", "x-sum")]
    req = parse_request_block(through_h2(block, validate=False, end_stream=False))
    method, path, headers = http1_request_head(req, ME, body_follows=True)
    assert (method, path) == ("POST", "/submit?x=1")
    assert headers == (("Host", "origin.example"), ("content-length", "3"),
                       ("content-type", "text/plain"), ("via", "1.1 other"), ("trailer", "x-sum"),
                       ("TE", "trailers"), ("Connection", "TE"), ("Via", f"2 {ME}"))


def test_s8_3_1_http1_head_parses_back():
    req = parse_request_block(with_fields(("accept", "*/*"), ("cookie", "a=1"), ("cookie", "b=2")))
    head = parse_request_head(http1_bytes(req))
    assert (head.method, head.target, head.version) == ("GET", "/", (1, 1))
    assert head.headers == (("Host", "a.example"), ("accept", "*/*"), ("cookie", "a=1; b=2"),
                            ("Via", f"2 {ME}"))


def test_s8_1_body_without_length_goes_chunked():
    req = parse_request_block(replace(":method", "POST"))
    _, _, headers = http1_request_head(req, ME, body_follows=True)
    assert ("Transfer-Encoding", "chunked") in headers
    _, _, headers = http1_request_head(req, ME)
    assert "Transfer-Encoding" not in dict(headers)
    with_length = parse_request_block(with_fields(("content-length", "0"),
                                                  base=replace(":method", "POST")))
    _, _, headers = http1_request_head(with_length, ME, body_follows=True)
    assert "Transfer-Encoding" not in dict(headers)


def test_s8_5_connect_maps_to_authority_form():
    req = parse_request_block(CONNECT)
    method, path, headers = http1_request_head(req, ME)
    assert (method, path) == ("CONNECT", "a.example:443")
    assert headers[0] == ("Host", "a.example:443")


def test_via_from_h2_is_seen_as_a_loop():
    req = parse_request_block(GET)
    _, _, headers = http1_request_head(req, ME)
    assert has_via_loop(headers, ME)


def test_websocket_request_is_not_an_ordinary_head():
    req = parse_request_block([(":method", "CONNECT"), (":protocol", "websocket"),
                               (":scheme", "https"), (":authority", "a.example"), (":path", "/")])
    with pytest.raises(LocalProtocolError):
        http1_request_head(req, ME)


# --- HTTP/1.1 response → HTTP/2 (RFC 9113 §8.2.2, §8.3.2) -------------------------------------

def test_s8_2_2_response_block():
    headers = (("Content-Type", "text/html"), ("Connection", "keep-alive, X-Private"),
               ("Keep-Alive", "timeout=5"), ("X-Private", "1"), ("Set-Cookie", "a=1"),
               ("Set-Cookie", "b=2"), ("Upgrade", "h2c"), ("Proxy-Connection", "close"),
               ("Content-Length", "10"), ("Via", "1.0 origin"))
    block = h2_response_block(200, headers, ME)
    assert block == [(":status", "200"), ("content-type", "text/html"), ("set-cookie", "a=1"),
                     ("set-cookie", "b=2"), ("content-length", "10"), ("via", "1.0 origin"),
                     ("via", f"1.1 {ME}")]
    assert response_through_h2(block)[0] == (b":status", b"200")


def test_s8_2_2_chunked_response_loses_its_content_length():
    block = h2_response_block(200, (("Transfer-Encoding", "chunked"), ("Content-Length", "5")), ME)
    assert block == [(":status", "200"), ("via", f"1.1 {ME}")]


def test_s8_3_2_response_via_names_the_received_version():
    assert h2_response_block(204, (), ME, version=(1, 0))[-1] == ("via", f"1.0 {ME}")


@pytest.mark.parametrize("status", [101, 99, 1000])
def test_s8_3_2_statuses_that_cannot_be_sent(status):
    with pytest.raises(LocalProtocolError):
        h2_response_block(status, (), ME)


def test_s8_1_informational():
    assert h2_informational_allowed(100)
    assert h2_informational_allowed(103)
    assert not h2_informational_allowed(101)
    assert not h2_informational_allowed(200)
    block = h2_response_block(103, (("Link", "</a.css>; rel=preload"),), ME)
    assert block[0] == (":status", "103")


def test_s8_1_trailer_block():
    trailers = (("X-Checksum", "abc"), ("Content-Length", "5"), ("Connection", "close"),
                ("Transfer-Encoding", "chunked"), ("Server-Timing", "db;dur=5"))
    assert h2_trailer_block(trailers) == [("x-checksum", "abc"), ("server-timing", "db;dur=5")]


def test_obs_text_survives_as_latin1_bytes():
    block = h2_response_block(200, (("X-Name", "caf\xe9"),), ME)
    received = response_through_h2(block_bytes(block))
    assert (b"x-name", b"caf\xe9") in received
