"""RFC 8441 §4-5 from the other side: an HTTP/1.1 client's RFC 6455 handshake carried to an
HTTP/2 origin as an extended CONNECT (appliance.protocols.websocket_bridge)."""

from __future__ import annotations

import pytest

from appliance.protocols.forwarding import Target
from appliance.protocols.http1 import RemoteProtocolError
from appliance.protocols.websocket_bridge import (
    client_key, extended_connect_block, parse_response_block, switch_response_headers,
)

KEY = "dGhlIHNhbXBsZSBub25jZQ=="          # RFC 6455 §1.3's example key
CLIENT = (("Host", "chat.example:8080"), ("Upgrade", "websocket"), ("Connection", "Upgrade"),
          ("Sec-WebSocket-Key", KEY), ("Sec-WebSocket-Version", "13"),
          ("Sec-WebSocket-Protocol", "chat, superchat"), ("Origin", "http://chat.example"),
          ("Proxy-Authorization", "Basic eA=="), ("Cookie", "a=1"))


def test_section_4_extended_connect_pseudo_headers_and_fields():
    block = extended_connect_block(Target("http", "chat.example", 8080, "/room?x=1"), CLIENT, "proxy.test")
    assert block[:5] == [(":method", "CONNECT"), (":protocol", "websocket"), (":scheme", "http"),
                         (":path", "/room?x=1"), (":authority", "chat.example:8080")]
    names = [n for n, _ in block]
    assert "sec-websocket-key" not in names and "host" not in names       # RFC 8441 §5: no key
    assert "upgrade" not in names and "connection" not in names and "proxy-authorization" not in names
    assert ("sec-websocket-protocol", "chat, superchat") in block and ("origin", "http://chat.example") in block
    assert ("sec-websocket-version", "13") in block and block[-1] == ("via", "1.1 proxy.test")
    assert all(n == n.lower() for n in names)


def test_version_defaults_to_13_and_wss_maps_to_https():
    headers = tuple(h for h in CLIENT if h[0] != "Sec-WebSocket-Version")
    block = extended_connect_block(Target("wss", "chat.example", 443, "/"), headers, "p")
    assert (":scheme", "https") in block and (":authority", "chat.example") in block
    assert ("sec-websocket-version", "13") in block


@pytest.mark.parametrize("key", [None, "", "short", "dGhlIHNhbXBsZSBub25jZQ", "!!!!dGhlIHNhbXBsZSBub25jZQ=="])
def test_client_key_must_be_16_bytes_base64(key):
    headers = tuple(h for h in CLIENT if h[0] != "Sec-WebSocket-Key")
    if key is not None:
        headers += (("Sec-WebSocket-Key", key),)
    with pytest.raises(RemoteProtocolError):
        client_key(headers)
    assert client_key(CLIENT) == KEY


def test_section_5_the_101_carries_the_accept_for_the_clients_key_and_the_origins_choices():
    out = dict(switch_response_headers(KEY, (("sec-websocket-protocol", "chat"), ("server", "x"))))
    assert out["Sec-WebSocket-Accept"] == "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="     # RFC 6455 §1.3
    assert out["Upgrade"] == "websocket" and out["Connection"] == "Upgrade"
    assert out["Sec-WebSocket-Protocol"] == "chat" and "server" not in out


def test_response_block_parsing():
    assert parse_response_block([(b":status", b"200"), (b"sec-websocket-protocol", b"chat")]) == \
        (200, (("sec-websocket-protocol", "chat"),))
    for bad in ([], [(":path", "/")], [(":status", "2000")], [(":status", "200"), ("X-Up", "1")],
                [(":status", "200"), ("x", "a\r\nb")], [(":status", "200"), (":status", "200")]):
        with pytest.raises(RemoteProtocolError) as err:
            parse_response_block(bad)
        assert err.value.status == 502
