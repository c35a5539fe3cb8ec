"""RFC 9110 §7.6 (intermediaries) and RFC 9112 §3.2 (request targets) checks of
`appliance.protocols.forwarding`: targets, hop-by-hop fields, Via, loops, WebSocket upgrades.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from appliance.protocols.forwarding import (
    HOP_BY_HOP,
    Target,
    add_via,
    has_via_loop,
    is_websocket_upgrade,
    origin_request_headers,
    parse_absolute_target,
    parse_authority,
    strip_hop_by_hop,
    via_value,
)
from appliance.protocols.http1 import RemoteProtocolError, header_value, header_values

ME = "proxy.localhost"


def refused(call, *args) -> None:
    with pytest.raises(RemoteProtocolError) as info:
        call(*args)
    assert info.value.status == 400


def names(headers) -> list[str]:
    return [k.lower() for k, _ in headers]


# --- RFC 9112 §3.2.2 absolute-form ----------------------------------------------------------

@pytest.mark.parametrize("target, expected", [
    ("http://example.com/a/b?c=d", Target("http", "example.com", 80, "/a/b?c=d")),
    ("http://example.com", Target("http", "example.com", 80, "/")),
    ("http://example.com?q=1", Target("http", "example.com", 80, "/?q=1")),
    ("http://example.com/p#frag", Target("http", "example.com", 80, "/p")),
    ("http://example.com#frag", Target("http", "example.com", 80, "/")),
    ("HTTP://Example.COM:8080/X", Target("http", "example.com", 8080, "/X")),
    ("http://example.com.:80/", Target("http", "example.com", 80, "/")),
    ("https://example.com/", Target("https", "example.com", 443, "/")),
    ("ws://example.com/chat", Target("ws", "example.com", 80, "/chat")),
    ("wss://example.com:8443/chat", Target("wss", "example.com", 8443, "/chat")),
    ("http://127.0.0.1:3000/", Target("http", "127.0.0.1", 3000, "/")),
    ("http://[::1]:8080/x", Target("http", "::1", 8080, "/x")),
    ("http://[2001:DB8:0:0::1]/", Target("http", "2001:db8::1", 80, "/")),
    ("http://under_score.example/", Target("http", "under_score.example", 80, "/")),
])
def test_s3_2_2_absolute_form(target, expected):
    assert parse_absolute_target(target) == expected


@pytest.mark.parametrize("target", [
    "/relative/path",                     # origin-form is not for a proxy
    "*",
    "example.com:443",                    # authority-form
    "ftp://example.com/",
    "http:/example.com/",
    "http://",
    "http:///path",
    "http://:80/",
    "http://user:pass@example.com/",      # RFC 9110 §4.2.4: userinfo is not allowed
    "http://user@example.com/",
    "http://example.com:0/",
    "http://example.com:65536/",
    "http://example.com:http/",
    "http://example.com:-80/",
    "http://example.com:+80/",
    "http://example.com:8 0/",
    "http://exa mple.com/",
    "http://exa%6dple.com/",
    "http://-example.com/",
    "http://.example.com/",
    "http://example..com/",
    "http://[::1/",
    "http://[::1]x/",
    "http://[not-v6]/",
    "http://[127.0.0.1]/",
    "http://::1/",
    "http://" + "a" * 64 + ".com/",       # a label over 63 characters
    "http://" + "a." * 130 + "com/",      # a name over 253 characters
])
def test_s3_2_2_invalid_absolute_form_is_refused(target):
    refused(parse_absolute_target, target)


# --- RFC 9112 §3.2.3 authority-form ---------------------------------------------------------

@pytest.mark.parametrize("authority, expected", [
    ("example.com:443", ("example.com", 443)),
    ("EXAMPLE.com:8443", ("example.com", 8443)),
    ("10.1.2.3:22", ("10.1.2.3", 22)),
    ("[::1]:443", ("::1", 443)),
    ("[fe80::1%eth0]:443", ("fe80::1", 443)),
    ("[2001:db8::0001]:1", ("2001:db8::1", 1)),
    ("example.com:65535", ("example.com", 65535)),
])
def test_s3_2_3_authority_form(authority, expected):
    assert parse_authority(authority) == expected


@pytest.mark.parametrize("authority", [
    "example.com",                        # CONNECT needs the port
    "example.com:",
    "[::1]",
    "::1",
    "::1:443",
    "example.com:0",
    "example.com:65536",
    "example.com:99999999999999999999",
    "example.com:44a",
    "example.com:\u0664\u0664\u0663",      # Arabic-Indic digits are not DIGIT
    "example.com:\u00b2",                  # superscript two: str.isdigit() says yes
    "user@example.com:443",
    ":443",
    "[::1]:",
    "[::g]:443",
    "exa_mple com:443",
])
def test_s3_2_3_invalid_authority_form_is_refused(authority):
    refused(parse_authority, authority)


def test_s3_2_3_default_port_applies_only_when_missing():
    assert parse_authority("example.com", 80) == ("example.com", 80)
    assert parse_authority("[::1]", 443) == ("::1", 443)
    assert parse_authority("example.com:8080", 80) == ("example.com", 8080)


@pytest.mark.parametrize("target, authority, hostport", [
    (Target("http", "example.com", 80), "example.com", "example.com:80"),
    (Target("http", "example.com", 8080), "example.com:8080", "example.com:8080"),
    (Target("https", "example.com", 443), "example.com", "example.com:443"),
    (Target("https", "example.com", 80), "example.com:80", "example.com:80"),
    (Target("http", "::1", 80), "[::1]", "[::1]:80"),
    (Target("http", "::1", 8080), "[::1]:8080", "[::1]:8080"),
])
def test_target_authority_omits_default_port(target, authority, hostport):
    assert target.authority == authority
    assert target.hostport == hostport


@settings(max_examples=200, deadline=None)
@given(st.one_of(
    st.text(max_size=60),
    st.lists(st.sampled_from(["http", "://", "[", "]", ":", "::1", "@", "/", "?", "#", "%",
                              "example.com", "80", "0", "\u00b2", ".", "-", " "]),
             max_size=12).map("".join),
))
def test_target_parsers_raise_only_remote_protocol_error(text):
    for call in (parse_absolute_target, parse_authority, lambda t: parse_authority(t, 80)):
        try:
            call(text)
        except RemoteProtocolError as exc:
            assert exc.status == 400


# --- RFC 9110 §7.6.1 Connection and hop-by-hop fields --------------------------------------

def test_s7_6_1_hop_by_hop_fields_are_removed():
    headers = (
        ("Host", "a"), ("Connection", "keep-alive"), ("Keep-Alive", "timeout=5"),
        ("Proxy-Connection", "keep-alive"), ("TE", "trailers"), ("Transfer-Encoding", "chunked"),
        ("Upgrade", "h2c"), ("Proxy-Authorization", "Basic eDp5"), ("Proxy-Authenticate", "Basic"),
        ("Trailer", "Checksum"), ("Accept", "*/*"), ("Content-Length", "3"),
    )
    assert strip_hop_by_hop(headers) == (("Host", "a"), ("Trailer", "Checksum"), ("Accept", "*/*"),
                                         ("Content-Length", "3"))


def test_s7_6_1_hop_by_hop_names_match_case_insensitively():
    headers = (("CONNECTION", "close"), ("proxy-CONNECTION", "x"), ("X", "1"))
    assert strip_hop_by_hop(headers) == (("X", "1"),)


def test_s7_6_1_fields_named_by_connection_are_removed():
    headers = (("Connection", "X-Private, close"), ("connection", "x-other"),
               ("x-private", "1"), ("X-Other", "2"), ("X-Public", "3"))
    assert strip_hop_by_hop(headers) == (("X-Public", "3"),)


def test_s7_6_1_connection_cannot_strip_content_length():
    # Dropping it would send the body unframed to the next hop: request smuggling on a pooled
    # origin connection, or a client left waiting for a response that never ends.
    headers = (("Connection", "close, Content-Length"), ("Content-Length", "5"), ("X", "1"))
    assert strip_hop_by_hop(headers) == (("Content-Length", "5"), ("X", "1"))


def test_s7_6_1_keep_spares_a_field():
    headers = (("Connection", "Upgrade"), ("Upgrade", "websocket"))
    assert strip_hop_by_hop(headers, keep=frozenset({"upgrade"})) == (("Upgrade", "websocket"),)


def test_s7_6_1_every_standard_hop_by_hop_field_is_listed():
    assert {"connection", "keep-alive", "proxy-connection", "te", "transfer-encoding", "upgrade",
            "proxy-authenticate", "proxy-authorization"} <= HOP_BY_HOP
    # Trailer announces end-to-end trailer fields (RFC 9110 §6.6.2); the proxy forwards both.
    assert "trailer" not in HOP_BY_HOP


# --- RFC 9110 §7.6.3 Via --------------------------------------------------------------------

def test_s7_6_3_via_is_appended_with_the_received_protocol():
    assert via_value((1, 1), ME) == "1.1 proxy.localhost"
    headers = (("Via", "1.0 fred, 1.1 p.example.net"),)
    out = add_via(headers, (1, 0), ME)
    assert out == headers + (("Via", "1.0 proxy.localhost"),)
    assert header_values(out, "via") == ["1.0 fred", "1.1 p.example.net", "1.0 proxy.localhost"]


@pytest.mark.parametrize("via, loop", [
    ("1.1 proxy.localhost", True),
    ("1.1 PROXY.localhost", True),
    ("1.0 fred, 1.1 proxy.localhost (appliance)", True),
    ("HTTP/1.1 proxy.localhost", True),
    ("1.1 other.example, 1.1 proxy.localhost.example", False),
    ("1.1 other.example", False),
    ("proxy.localhost", False),            # a bare name is not a Via entry of ours
    ("", False),
])
def test_s7_6_3_loop_detected_by_our_via_entry(via, loop):
    assert has_via_loop((("Via", via),), ME) is loop


def test_s7_6_3_loop_found_in_any_via_field():
    headers = (("Via", "1.1 a"), ("X", "y"), ("via", "1.1 b, 1.1 proxy.localhost"))
    assert has_via_loop(headers, ME)
    assert not has_via_loop((("X", "1.1 proxy.localhost"),), ME)
    assert not has_via_loop((), ME)


def test_s7_6_3_our_own_via_is_then_seen_as_a_loop():
    assert has_via_loop(add_via((), (1, 1), ME), ME)


# --- RFC 6455 §4.1 WebSocket opening handshake ---------------------------------------------

@pytest.mark.parametrize("method, headers, expected", [
    ("GET", (("Connection", "Upgrade"), ("Upgrade", "websocket")), True),
    ("GET", (("connection", "keep-alive, upgrade"), ("upgrade", "WebSocket")), True),
    ("GET", (("Connection", "Upgrade"), ("Upgrade", "h2c, websocket")), True),
    ("GET", (("Upgrade", "websocket"),), False),                         # no Connection: upgrade
    ("GET", (("Connection", "Upgrade"),), False),
    ("GET", (("Connection", "Upgrade"), ("Upgrade", "h2c")), False),
    ("POST", (("Connection", "Upgrade"), ("Upgrade", "websocket")), False),
    ("get", (("Connection", "Upgrade"), ("Upgrade", "websocket")), False),
])
def test_websocket_upgrade_detection(method, headers, expected):
    assert is_websocket_upgrade(method, headers) is expected


# --- what the origin sees -------------------------------------------------------------------

def test_origin_headers_replace_host_strip_hops_and_add_via():
    target = parse_absolute_target("http://example.com:8080/x")
    headers = (("Host", "spoofed.example"), ("User-Agent", "t"), ("Proxy-Connection", "keep-alive"),
               ("Proxy-Authorization", "Basic eDp5"), ("Connection", "keep-alive, X-Hop"),
               ("X-Hop", "1"), ("host", "second"), ("Content-Length", "3"))
    out = origin_request_headers(headers, target, (1, 1), ME)
    assert out == (("Host", "example.com:8080"), ("User-Agent", "t"), ("Content-Length", "3"),
                   ("Via", "1.1 proxy.localhost"))


def test_origin_headers_host_added_when_missing():
    out = origin_request_headers((), parse_absolute_target("http://[::1]/"), (1, 0), ME)
    assert out == (("Host", "[::1]"), ("Via", "1.0 proxy.localhost"))


def test_origin_headers_pass_te_trailers_on():
    headers = (("TE", "trailers, gzip"), ("Connection", "TE"))
    out = origin_request_headers(headers, Target("http", "a", 80), (1, 1), ME)
    assert out == (("Host", "a"), ("TE", "trailers"), ("Connection", "TE"),
                   ("Via", "1.1 proxy.localhost"))


def test_origin_headers_drop_te_without_trailers():
    out = origin_request_headers((("TE", "gzip"),), Target("http", "a", 80), (1, 1), ME)
    assert header_value(out, "te") is None and header_value(out, "connection") is None


def test_origin_headers_keep_websocket_upgrade_pair():
    headers = (("Connection", "keep-alive, Upgrade"), ("Upgrade", "websocket"),
               ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=="), ("Sec-WebSocket-Version", "13"),
               ("Keep-Alive", "timeout=5"))
    out = origin_request_headers(headers, Target("ws", "a", 80, "/chat"), (1, 1), ME, upgrade=True)
    assert out == (("Host", "a"), ("Upgrade", "websocket"),
                   ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=="), ("Sec-WebSocket-Version", "13"),
                   ("Connection", "Upgrade"), ("Via", "1.1 proxy.localhost"))


def test_origin_headers_without_upgrade_drop_the_upgrade_pair():
    headers = (("Connection", "Upgrade"), ("Upgrade", "websocket"))
    out = origin_request_headers(headers, Target("http", "a", 80), (1, 1), ME)
    assert "upgrade" not in names(out) and "connection" not in names(out)
