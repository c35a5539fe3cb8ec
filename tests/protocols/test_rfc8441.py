"""RFC 8441 (WebSockets over HTTP/2) checks of `appliance.protocols.h2_mapping`: the extended
CONNECT a real h2 client sends (§4), its translation into an RFC 6455 opening handshake for an
HTTP/1.1 origin (§5), the check of the origin's 101, and the 200 that opens the h2 tunnel.
A wsproto server plays the origin, so the handshake is checked against a real implementation.
"""

from __future__ import annotations

import base64

import h2.config
import h2.connection
import h2.events
import h2.settings
import pytest
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, RejectConnection, Request
from wsproto.extensions import PerMessageDeflate
from wsproto.utilities import generate_accept_token

from appliance.protocols.forwarding import Target, is_websocket_upgrade
from appliance.protocols.h2_mapping import (
    StreamError,
    UpstreamHandshakeError,
    check_websocket_switch,
    parse_request_block,
    websocket_accept,
    websocket_h2_response,
    websocket_http1_request,
)
from appliance.protocols.http1 import (
    LocalProtocolError,
    RemoteProtocolError,
    parse_request_head,
    parse_response_head,
    serialize_head,
)
from .h2_peers import h2_pair


ME = "proxy.localhost"
KEY = base64.b64encode(bytes(range(16))).decode("ascii")      # the frontend draws a random one


def through_h2(block, validate: bool = True):
    client, server = h2_pair(validate)
    client.send_headers(client.get_next_available_stream_id(), block, end_stream=False)
    events = server.receive_data(client.data_to_send())
    (received,) = [e for e in events if isinstance(e, h2.events.RequestReceived)]
    return received.headers


WS = [(":method", "CONNECT"), (":protocol", "websocket"), (":scheme", "https"),
      (":authority", "chat.example"), (":path", "/socket?room=1")]


def replace(name, value, base=WS):
    return [(k, value if k == name else v) for k, v in base if value is not None or k != name]


def websocket_request(*fields, base=WS):
    return parse_request_block(through_h2(list(base) + list(fields)))


# --- §4 the extended CONNECT method ---------------------------------------------------------

def test_s4_extended_connect_through_h2():
    req = websocket_request(("sec-websocket-version", "13"), ("origin", "https://chat.example"))
    assert req.kind == "websocket"
    assert (req.method, req.protocol, req.scheme, req.authority, req.path) == \
        ("CONNECT", "websocket", "https", "chat.example", "/socket?room=1")
    assert req.target == Target("https", "chat.example", 443, "/socket?room=1")
    assert req.headers == (("sec-websocket-version", "13"), ("origin", "https://chat.example"))


def test_s4_plain_http_scheme_and_port():
    req = websocket_request(base=replace(":authority", "[::1]:8080", replace(":scheme", "http")))
    assert req.target == Target("http", "::1", 8080, "/socket?room=1")


def test_s4_pseudo_header_order_is_free():
    req = parse_request_block(list(reversed(WS)))
    assert req.kind == "websocket"


def test_s4_protocol_is_a_case_insensitive_token():
    assert parse_request_block(replace(":protocol", "WebSocket")).kind == "websocket"


EXTENDED_BAD = {
    ":protocol on GET": replace(":method", "GET"),
    ":protocol on POST": replace(":method", "POST"),
    "without :scheme": replace(":scheme", None),
    "without :path": replace(":path", None),
    "without :authority": replace(":authority", None),
    "host instead of :authority": replace(":authority", None) + [("host", "chat.example")],
    "asterisk :path": replace(":path", "*"),
    "empty :path": replace(":path", ""),
    "relative :path": replace(":path", "socket"),
    "duplicate :protocol": WS + [(":protocol", "websocket")],
    "CRLF in :protocol": replace(":protocol", "websocket\r\nx: y"),
    "userinfo in :authority": replace(":authority", "u@chat.example"),
    "host disagrees": WS + [("host", "other.example")],
    "upgrade field": WS + [("upgrade", "websocket")],
    "connection field": WS + [("connection", "upgrade")],
}


@pytest.mark.parametrize("block", EXTENDED_BAD.values(), ids=EXTENDED_BAD.keys())
def test_s4_malformed_extended_connect(block):
    with pytest.raises(StreamError) as info:
        parse_request_block(block)
    assert info.value.status == 400
    with pytest.raises(StreamError):
        parse_request_block(through_h2(block, validate=False))


@pytest.mark.parametrize("protocol", ["connect-udp", "connect-ip", "webtransport", "h2c"])
def test_s4_other_protocols_are_not_implemented(protocol):
    with pytest.raises(StreamError) as info:
        parse_request_block(through_h2(replace(":protocol", protocol)))
    assert info.value.status == 501
    assert "only websocket" in str(info.value)


def test_s4_other_schemes_are_not_implemented():
    with pytest.raises(StreamError) as info:
        parse_request_block(replace(":scheme", "wss"))
    assert info.value.status == 501


# --- §5 the handshake the HTTP/1.1 origin gets ----------------------------------------------

def test_s5_http1_handshake():
    req = websocket_request(
        ("sec-websocket-version", "13"), ("sec-websocket-protocol", "chat, superchat"),
        ("sec-websocket-extensions", "permessage-deflate; client_max_window_bits"),
        ("origin", "https://chat.example"), ("sec-websocket-key", "Y2xpZW50"),
        ("proxy-authorization", "Basic dTpw"), ("te", "trailers"), ("user-agent", "browser"),
        ("cookie", "s=1"))     # last: h2's inbound normalization moves joined cookies there
    line, headers = websocket_http1_request(req, KEY, ME)
    assert line == "GET /socket?room=1 HTTP/1.1"
    assert headers == (
        ("Host", "chat.example"), ("Upgrade", "websocket"), ("Connection", "Upgrade"),
        ("Sec-WebSocket-Key", KEY), ("Sec-WebSocket-Version", "13"),
        ("sec-websocket-protocol", "chat, superchat"),
        ("sec-websocket-extensions", "permessage-deflate; client_max_window_bits"),
        ("origin", "https://chat.example"), ("user-agent", "browser"), ("cookie", "s=1"),
        ("Via", f"2 {ME}"))


def test_s5_handshake_parses_back_as_an_upgrade():
    line, headers = websocket_http1_request(websocket_request(), KEY, ME)
    head = parse_request_head(serialize_head(line, headers))
    assert (head.method, head.target, head.version) == ("GET", "/socket?room=1", (1, 1))
    assert is_websocket_upgrade(head.method, head.headers)


def test_s5_version_defaults_to_13_and_passes_the_clients():
    _, headers = websocket_http1_request(websocket_request(), KEY, ME)
    assert ("Sec-WebSocket-Version", "13") in headers
    _, headers = websocket_http1_request(websocket_request(("sec-websocket-version", "8")), KEY, ME)
    assert ("Sec-WebSocket-Version", "8") in headers
    assert [k for k, _ in headers].count("Sec-WebSocket-Version") == 1


def test_s5_host_carries_a_non_default_port():
    req = websocket_request(base=replace(":authority", "Chat.Example:8443"))
    _, headers = websocket_http1_request(req, KEY, ME)
    assert headers[0] == ("Host", "chat.example:8443")


@pytest.mark.parametrize("key", ["", "short", "not base64!!!!!!!!!!!!!!!",
                                 base64.b64encode(bytes(15)).decode(), "\u2603"])
def test_s5_key_must_be_a_16_byte_nonce(key):
    with pytest.raises(LocalProtocolError):
        websocket_http1_request(websocket_request(), key, ME)


def test_s5_only_websocket_requests_map_to_a_handshake():
    get = parse_request_block([(":method", "GET"), (":scheme", "https"),
                               (":authority", "chat.example"), (":path", "/")])
    with pytest.raises(LocalProtocolError):
        websocket_http1_request(get, KEY, ME)


# --- RFC 6455 §4.2.2 the accept token -------------------------------------------------------

def test_rfc6455_s1_3_accept_example():
    assert websocket_accept("dGhlIHNhbXBsZSBub25jZQ==") == "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="


@pytest.mark.parametrize("key", [KEY, "dGhlIHNhbXBsZSBub25jZQ==", "AAAAAAAAAAAAAAAAAAAAAA=="])
def test_rfc6455_s4_2_2_accept_matches_wsproto(key):
    assert websocket_accept(key) == generate_accept_token(key.encode("ascii")).decode("ascii")


# --- RFC 6455 §4.1 the origin's answer ------------------------------------------------------

SWITCHED = (("Upgrade", "websocket"), ("Connection", "Upgrade"),
            ("Sec-WebSocket-Accept", websocket_accept(KEY)))


def test_rfc6455_s4_1_switch_accepted():
    check_websocket_switch(KEY, 101, SWITCHED)
    check_websocket_switch(KEY, 101, (("upgrade", "WebSocket"),
                                      ("connection", "keep-alive, upgrade"),
                                      ("sec-websocket-accept", websocket_accept(KEY))))


SWITCH_BAD = {
    "no Upgrade": SWITCHED[1:],
    "Upgrade h2c": (("Upgrade", "h2c"),) + SWITCHED[1:],
    "two upgrades": (("Upgrade", "websocket, h2c"),) + SWITCHED[1:],
    "no Connection": SWITCHED[:1] + SWITCHED[2:],
    "Connection close": SWITCHED[:1] + (("Connection", "close"),) + SWITCHED[2:],
    "no accept": SWITCHED[:2],
    "wrong accept": SWITCHED[:2] + (("Sec-WebSocket-Accept", websocket_accept("x" + KEY)),),
    "two accepts": SWITCHED + SWITCHED[2:],
}


@pytest.mark.parametrize("headers", SWITCH_BAD.values(), ids=SWITCH_BAD.keys())
def test_rfc6455_s4_1_switch_refused(headers):
    with pytest.raises(UpstreamHandshakeError) as info:
        check_websocket_switch(KEY, 101, headers)
    assert info.value.status == 502 and info.value.origin_status == 101


@pytest.mark.parametrize("status", [200, 302, 403, 426])
def test_rfc6455_s4_1_no_switch_keeps_the_origin_status(status):
    with pytest.raises(UpstreamHandshakeError) as info:
        check_websocket_switch(KEY, status, SWITCHED)
    assert info.value.origin_status == status
    assert isinstance(info.value, RemoteProtocolError) and info.value.status == 502


def test_rfc6455_s4_1_negotiation_must_be_among_the_offers():
    req = websocket_request(("sec-websocket-protocol", "chat, superchat"),
                            ("sec-websocket-extensions", "permessage-deflate"))
    chosen = (("Sec-WebSocket-Protocol", "superchat"),
              ("Sec-WebSocket-Extensions", "permessage-deflate"))
    check_websocket_switch(KEY, 101, SWITCHED + chosen, request=req)
    for extra in ((("Sec-WebSocket-Protocol", "other"),),
                  (("Sec-WebSocket-Protocol", "chat, superchat"),),
                  (("Sec-WebSocket-Extensions", "x-webkit-deflate-frame"),)):
        with pytest.raises(UpstreamHandshakeError):
            check_websocket_switch(KEY, 101, SWITCHED + extra, request=req)


# --- §5 the 200 that opens the tunnel -------------------------------------------------------

def test_s5_h2_response_carries_only_the_negotiation():
    headers = SWITCHED + (("Sec-WebSocket-Protocol", "chat"), ("Server", "x"),
                          ("Sec-WebSocket-Extensions", "permessage-deflate"))
    assert websocket_h2_response(headers) == [
        (":status", "200"), ("sec-websocket-protocol", "chat"),
        ("sec-websocket-extensions", "permessage-deflate")]
    assert websocket_h2_response(SWITCHED) == [(":status", "200")]


def test_s5_h2_response_through_h2():
    client, server = h2_pair()
    stream_id = client.get_next_available_stream_id()
    client.send_headers(stream_id, WS, end_stream=False)
    server.receive_data(client.data_to_send())
    block = websocket_h2_response(SWITCHED + (("Sec-WebSocket-Protocol", "chat"),))
    server.send_headers(stream_id, block)
    events = client.receive_data(server.data_to_send())
    (response,) = [e for e in events if isinstance(e, h2.events.ResponseReceived)]
    assert [(bytes(k), bytes(v)) for k, v in response.headers] == \
        [(b":status", b"200"), (b"sec-websocket-protocol", b"chat")]


# --- the whole handshake against wsproto as the origin --------------------------------------

def origin_answer(line: str, headers, accept):
    origin = WSConnection(ConnectionType.SERVER)
    origin.receive_data(serialize_head(line, headers))
    (request,) = list(origin.events())
    assert isinstance(request, Request)
    return request, parse_response_head(origin.send(accept(request)))


def test_s5_handshake_with_a_wsproto_origin():
    req = websocket_request(("sec-websocket-version", "13"),
                            ("sec-websocket-protocol", "chat, superchat"),
                            ("sec-websocket-extensions",
                             "permessage-deflate; client_max_window_bits"))
    line, headers = websocket_http1_request(req, KEY, ME)
    request, response = origin_answer(line, headers, lambda r: AcceptConnection(
        subprotocol="superchat", extensions=[PerMessageDeflate()]))
    assert (request.host, request.target) == ("chat.example", "/socket?room=1")
    assert list(request.subprotocols) == ["chat", "superchat"]
    check_websocket_switch(KEY, response.status, response.headers, request=req)
    block = websocket_h2_response(response.headers)
    assert block[:2] == [(":status", "200"), ("sec-websocket-protocol", "superchat")]
    assert block[2][0] == "sec-websocket-extensions"
    assert block[2][1].startswith("permessage-deflate")


def test_s5_origin_refusal_is_reported_with_its_status():
    line, headers = websocket_http1_request(websocket_request(), KEY, ME)
    _, response = origin_answer(line, headers, lambda r: RejectConnection(status_code=403))
    with pytest.raises(UpstreamHandshakeError) as info:
        check_websocket_switch(KEY, response.status, response.headers)
    assert info.value.origin_status == 403
