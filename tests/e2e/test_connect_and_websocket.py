"""CONNECT tunnels (RFC 9110 §9.3.6) and WebSocket over HTTP/1.1 (RFC 6455) through the proxy."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import socket

import pytest
import websockets
import websockets.client
import wsproto
import wsproto.events as ws_events
from python_socks.async_.asyncio import Proxy as AsyncProxy
from python_socks.sync import Proxy
from websockets.frames import Frame, Opcode
from websockets.http11 import Response
from websockets.uri import parse_uri

from .conftest import HalfCloseOrigin, curl, free_port, read_to_eof


def test_curl_proxytunnel(appliance, origin):
    r = curl("-p", "-x", appliance.proxy, f"{origin}/echo?tunnel=1")
    assert r.returncode == 0, r.stderr
    echo = json.loads(r.stdout)
    assert echo["query"] == {"tunnel": "1"}
    headers = {k.lower() for k, _ in echo["headers"]}
    assert "via" not in headers                   # a tunnel carries bytes, not rewritten messages
    record = appliance.wait_record(lambda r: r["kind"] == "tunnel" and r["target"] == origin.split("//")[1])
    assert record["status"] == 200 and record["bytes_down"] > 0 and record["bytes_up"] > 0


def test_connect_half_close_client_first(appliance):
    origin = HalfCloseOrigin("client-first")
    sock = Proxy.from_url(appliance.proxy).connect("127.0.0.1", origin.port, timeout=10)
    sock.settimeout(10)
    sock.sendall(b"hello tunnel")
    sock.shutdown(socket.SHUT_WR)                 # our FIN must reach the origin as a FIN
    reply = b""
    reply += read_to_eof(sock)
    sock.close()
    origin.thread.join(10)
    assert reply == b"got:hello tunnel"


def _raw_tunnel(proxy_port: int, authority: str) -> tuple[socket.socket, bytes]:
    """CONNECT by hand, keeping any tunnel bytes that arrive with the 200 (client libraries may drop them)."""
    sock = socket.create_connection(("127.0.0.1", proxy_port), timeout=10)
    sock.sendall(f"CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n".encode())
    data = b""
    for _ in range(100):
        if b"\r\n\r\n" in data:
            break
        data += sock.recv(65536)
    head, _, rest = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 "), head
    return sock, rest


def test_connect_half_close_server_first(appliance):
    origin = HalfCloseOrigin("server-first")
    sock, banner = _raw_tunnel(appliance.http_port, f"127.0.0.1:{origin.port}")
    banner += read_to_eof(sock)
    sock.sendall(b"after your FIN")               # the other direction still flows
    sock.shutdown(socket.SHUT_WR)
    origin.thread.join(10)
    sock.close()
    assert banner == b"banner"
    assert origin.received == b"after your FIN"


def test_connect_to_closed_port_is_502(appliance):
    port = free_port()
    reply = _raw_connect(appliance.http_port, f"127.0.0.1:{port}")
    assert reply.startswith(b"HTTP/1.1 502 ")


def test_connect_denied_is_403(make_appliance):
    app = make_appliance(rules='[[rule]]\nname = "web-only"\naction = "allow"\nports = [80, 443]\n')
    reply = _raw_connect(app.http_port, "127.0.0.1:22")
    assert reply.startswith(b"HTTP/1.1 403 ")
    assert b"default deny" in reply


def _raw_connect(port: int, authority: str) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(f"CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n".encode())
        data = b""
        data += read_to_eof(s)
        return data


# --- WebSocket ---------------------------------------------------------------------------------

async def _echo_over(ws, messages):
    out = []
    for m in messages:
        await ws.send(m)
        out.append(await ws.recv())
    return out


def test_websocket_through_connect(appliance, ws_origin):
    """The way browsers do ws:// through an HTTP proxy: CONNECT, then the handshake inside."""
    async def run():
        sock = await AsyncProxy.from_url(appliance.proxy).connect("127.0.0.1", ws_origin, timeout=10)
        async with websockets.connect(f"ws://127.0.0.1:{ws_origin}/chat", sock=sock) as ws:
            return await _echo_over(ws, ["hello", b"\x00\x01binary", "x" * 200000])

    got = asyncio.run(asyncio.wait_for(run(), 30))
    assert got == ["hello", b"\x00\x01binary", "x" * 200000]


def _wsproto_handshake_absolute(proxy_port: int, ws_port: int, path: str = "/chat"):
    """wsproto client sending the opening handshake in absolute-form straight to the proxy."""
    sock = socket.create_connection(("127.0.0.1", proxy_port), timeout=10)
    ws = wsproto.WSConnection(wsproto.ConnectionType.CLIENT)
    target = f"http://127.0.0.1:{ws_port}{path}"
    sock.sendall(ws.send(ws_events.Request(host=f"127.0.0.1:{ws_port}", target=target)))
    return sock, ws


def _wsproto_events(sock, ws, want, limit=200):
    got = []
    for _ in range(limit):
        data = sock.recv(65536)
        ws.receive_data(data or None)
        for event in ws.events():
            got.append(event)
            if isinstance(event, want):
                return got
        if not data:
            break
    return got


class _WebsocketsSansIO:
    """The `websockets` library's own sans-I/O client (ClientConnection in 10.4, ClientProtocol
    from 11) on a plain socket to the proxy, its handshake sent in absolute-form, as a client
    configured for an HTTP proxy without CONNECT does."""

    def __init__(self, proxy_port: int, ws_port: int, path: str = "/chat") -> None:
        protocol = getattr(websockets.client, "ClientProtocol", None) or websockets.client.ClientConnection
        self.proto = protocol(parse_uri(f"ws://127.0.0.1:{ws_port}{path}"))
        request = self.proto.connect()
        self.proto.send_request(dataclasses.replace(request, path=f"http://127.0.0.1:{ws_port}{path}"))
        self.sock = socket.create_connection(("127.0.0.1", proxy_port), timeout=10)
        self.flush()

    def flush(self) -> None:
        for data in self.proto.data_to_send():
            if data:
                self.sock.sendall(data)
            else:
                self.sock.shutdown(socket.SHUT_WR)

    def next_events(self, want, max_reads: int = 500) -> list:
        got = []
        for _ in range(max_reads):
            data = self.sock.recv(65536)
            if data:
                self.proto.receive_data(data)
            else:
                self.proto.receive_eof()
            got += self.proto.events_received()
            self.flush()
            if any(want(e) for e in got) or not data:
                return got
        return got


def test_websocket_absolute_form_upgrade(appliance, ws_origin):
    client = _WebsocketsSansIO(appliance.http_port, ws_origin)
    events = client.next_events(lambda e: isinstance(e, Response))
    assert events[0].status_code == 101
    for text in ("one", "two" * 10000):
        client.proto.send_text(text.encode())
        client.flush()
        frames = client.next_events(lambda e: isinstance(e, Frame) and e.opcode == Opcode.TEXT)
        assert [f.data.decode() for f in frames if f.opcode == Opcode.TEXT] == [text]
    client.proto.send_close(1000)
    client.flush()
    frames = client.next_events(lambda e: isinstance(e, Frame) and e.opcode == Opcode.CLOSE)
    assert any(f.opcode == Opcode.CLOSE for f in frames)
    client.sock.close()
    record = appliance.wait_record(lambda r: r["kind"] == "websocket")
    assert record["status"] == 101 and record["bytes_up"] > 30000 and record["bytes_down"] > 30000


def test_websocket_upgrade_refused_by_origin_is_a_normal_response(appliance, origin):
    """An origin that does not switch (here: 404 from a plain HTTP server) answers normally."""
    port = int(origin.rsplit(":", 1)[1])
    sock, ws = _wsproto_handshake_absolute(appliance.http_port, port, "/nows")
    events = _wsproto_events(sock, ws, ws_events.RejectConnection)
    sock.close()
    reject = [e for e in events if isinstance(e, ws_events.RejectConnection)]
    assert reject and reject[0].status_code == 404


@pytest.mark.parametrize("size", [1, 65536, 3 * 1024 * 1024])
def test_websocket_large_binary_through_connect(appliance, ws_origin, size):
    payload = bytes(range(256)) * (size // 256) + b"x" * (size % 256)

    async def run():
        sock = await AsyncProxy.from_url(appliance.proxy).connect("127.0.0.1", ws_origin, timeout=10)
        async with websockets.connect(f"ws://127.0.0.1:{ws_origin}/", sock=sock, max_size=None) as ws:
            await ws.send(payload)
            return await ws.recv()

    assert asyncio.run(asyncio.wait_for(run(), 60)) == payload
