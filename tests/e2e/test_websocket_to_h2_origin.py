"""An HTTP/1.1 client's WebSocket toward an origin that speaks HTTP/2: the appliance turns the
Upgrade into an RFC 8441 extended CONNECT ([upstream] h2_origins) and answers the 101 itself."""

from __future__ import annotations

from websockets.frames import Frame, Opcode
from websockets.http11 import Response

from .test_connect_and_websocket import _WebsocketsSansIO


def _texts(client, want: int) -> list[str]:
    frames = client.next_events(lambda e: isinstance(e, Frame) and e.opcode == Opcode.TEXT)
    return [f.data.decode() for f in frames if isinstance(f, Frame) and f.opcode == Opcode.TEXT]


def test_websocket_upgrade_goes_to_the_origin_as_extended_connect(make_appliance, h2_ws_origin):
    app = make_appliance(f'[upstream]\nh2_origins = ["127.0.0.1:{h2_ws_origin}"]\n')
    client = _WebsocketsSansIO(app.http_port, h2_ws_origin, "/chat")
    events = client.next_events(lambda e: isinstance(e, Response))
    response = events[0]
    assert response.status_code == 101              # checked by the client: accept value for its key
    assert response.headers["Via"] == "2 proxy.test"
    client.proto.send_text(b"version")
    client.flush()
    assert _texts(client, 1) == ["2"]                # the origin saw HTTP/2
    for text in ("hello", "y" * 100_000):
        client.proto.send_text(text.encode())
        client.flush()
        got = []
        for _ in range(50):
            got += _texts(client, 1)
            if got:
                break
        assert got == [text]
    client.proto.send_close(1000)
    client.flush()
    client.next_events(lambda e: isinstance(e, Frame) and e.opcode == Opcode.CLOSE)
    client.sock.close()
    record = app.wait_record(lambda r: r["kind"] == "websocket")
    assert record["status"] == 101 and record["bytes_up"] > 100_000 and record["bytes_down"] > 100_000


def test_origin_refusal_reaches_the_client_as_its_status(make_appliance, h2_ws_origin):
    app = make_appliance(f'[upstream]\nh2_origins = ["127.0.0.1:{h2_ws_origin}"]\n')
    client = _WebsocketsSansIO(app.http_port, h2_ws_origin, "/deny")
    events = client.next_events(lambda e: isinstance(e, Response))
    assert events[0].status_code == 403
    client.sock.close()


def test_origin_without_http2_is_502(make_appliance, origin):
    """An HTTP/1.1-only server listed in h2_origins: no SETTINGS come back, so 502, not a hang."""
    port = int(origin.rsplit(":", 1)[1])
    app = make_appliance(f'[upstream]\nh2_origins = ["127.0.0.1:{port}"]\nresponse_timeout = 2.0\n')
    client = _WebsocketsSansIO(app.http_port, port, "/chat")
    events = client.next_events(lambda e: isinstance(e, Response))
    assert events[0].status_code in (502, 504)
    client.sock.close()
