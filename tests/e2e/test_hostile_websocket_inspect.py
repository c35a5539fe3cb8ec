"""Hostile WebSocket frames with `[websocket] inspect = true` (issue 10, group 7).

A real appliance terminates the WebSocket framing of both legs with wsproto and re-frames each
message. The client here is wsproto's, over a raw socket through the HTTP/1.1 proxy
(absolute-form Upgrade), sending hand-built frames where a real library refuses to; the origin
is the `websockets` echo server (tests/e2e/ws_origin.py), or a scripted socket server where the
origin itself has to misbehave. Each case checks the close code the violator gets, the log line
and the access-log `error` saying why, and that a WebSocket opened beside it goes on echoing.
With inspect off (the default) the same frames are relayed blindly.
"""

from __future__ import annotations

import base64
import hashlib
import socket
import struct
import threading

import pytest
from wsproto import ConnectionType, WSConnection
from wsproto.connection import Connection
from wsproto.events import (
    AcceptConnection, BytesMessage, CloseConnection, Ping, Pong, Request, TextMessage,
)
from wsproto.extensions import PerMessageDeflate

from ..protocols.test_websocket_inspect import deflate_bomb, frame
from .conftest import Appliance, wait_for_record
from .h2_raw_client import H2RawClient

MAX_FRAME, MAX_MESSAGE = 65536, 262144
INSPECT = f"[websocket]\ninspect = true\nmax_frame_bytes = {MAX_FRAME}\nmax_message_bytes = {MAX_MESSAGE}\n"
TEXT, BINARY, CLOSE, PING = 0x1, 0x2, 0x8, 0x9
GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


@pytest.fixture(scope="module")
def inspecting(tmp_path_factory):
    app = Appliance(tmp_path_factory.mktemp("ws-inspect"), extra=INSPECT).start()
    yield app
    app.stop()


@pytest.fixture(scope="module")
def blind(tmp_path_factory):
    app = Appliance(tmp_path_factory.mktemp("ws-blind")).start()
    yield app
    app.stop()


class Client:
    """wsproto's client over a raw socket, through the proxy's HTTP/1.1 listener."""

    def __init__(self, app: Appliance, port: int, path: str, compress: bool = False) -> None:
        self.path = path
        self.backlog: list = []
        self.ws = WSConnection(ConnectionType.CLIENT)
        self.sock = socket.create_connection(("127.0.0.1", app.http_port), timeout=10)
        self.sock.sendall(self.ws.send(Request(
            host=f"127.0.0.1:{port}", target=f"http://127.0.0.1:{port}{path}",
            extensions=[PerMessageDeflate()] if compress else [])))
        accepted = self.until(lambda e: isinstance(e, AcceptConnection))
        assert isinstance(accepted[-1], AcceptConnection), accepted
        self.accepted = accepted[-1]

    def send(self, event) -> None:
        self.sock.sendall(self.ws.send(event))

    def until(self, done, max_reads: int = 400) -> list:
        """Events up to the first for which `done` holds (later ones are kept for the next
        call), or all of them when the appliance closed the connection."""
        events, self.backlog = self.backlog, []
        for _ in range(max_reads):
            for i, event in enumerate(events):
                if done(event):
                    self.backlog = events[i + 1:]
                    return events[:i + 1]
            data = self.sock.recv(65536)
            self.ws.receive_data(data or None)
            events += list(self.ws.events())
            if not data:
                return events
        raise AssertionError(f"gave up after {max_reads} reads: {events[-3:]}")

    def echo(self, message: str) -> str:
        self.send(TextMessage(data=message))
        events = self.until(lambda e: isinstance(e, TextMessage) and e.message_finished)
        return "".join(e.data for e in events if isinstance(e, TextMessage))

    def close_code(self) -> tuple[int, str]:
        """The Close the appliance sent; the socket is closed then, as a client would."""
        events = self.until(lambda e: isinstance(e, CloseConnection))
        self.sock.close()
        assert isinstance(events[-1], CloseConnection), events
        return events[-1].code, events[-1].reason

    def close(self) -> None:
        self.sock.close()


def assert_cut_off(app: Appliance, client: Client, code: int, bystander: Client, violator: str = "client"):
    got, _ = client.close_code()
    assert got == code
    record = wait_for_record(app.access_log, lambda r: r["target"].endswith(client.path) and r["error"],
                             context=app.proc.output)
    assert record["kind"] == "websocket" and record["status"] == 101
    assert record["error"].startswith(f"websocket {violator} violation, closed {code}: "), record
    assert f"{client.path}: websocket {violator} violation, closed {code}" in app.proc.output()
    assert bystander.echo("still here") == "still here"           # other connections untouched
    bystander.close()
    return record


# --- what passes ----------------------------------------------------------------------------------

def test_messages_fragments_and_pings_pass_inspected(inspecting, ws_origin):
    client = Client(inspecting, ws_origin, "/echo")
    assert client.echo("héllo") == "héllo"
    client.send(BytesMessage(data=b"\x00" * 1000, message_finished=False))
    client.send(BytesMessage(data=b"\xff" * 1000))
    events = client.until(lambda e: isinstance(e, BytesMessage) and e.message_finished)
    assert b"".join(e.data for e in events) == b"\x00" * 1000 + b"\xff" * 1000
    client.send(Ping(payload=b"ping"))
    assert client.until(lambda e: isinstance(e, Pong))[-1].payload == b"ping"
    client.send(CloseConnection(code=1000, reason="done"))
    assert client.close_code()[0] == 1000
    record = wait_for_record(inspecting.access_log, lambda r: r["target"].endswith("/echo"))
    assert record["status"] == 101 and record["error"] is None, record


def test_compressed_messages_pass_and_are_inflated_for_the_checks(inspecting, ws_origin):
    client = Client(inspecting, ws_origin, "/deflate", compress=True)
    assert [e.name for e in client.accepted.extensions] == ["permessage-deflate"]
    big = "z" * (MAX_FRAME * 2)                   # compresses to far under the frame limit
    assert client.echo(big) == big
    client.close()


def test_without_allow_compression_the_offer_never_reaches_the_origin(tmp_path, ws_origin):
    app = Appliance(tmp_path / "no-deflate", extra=INSPECT + "allow_compression = false\n").start()
    try:
        client = Client(app, ws_origin, "/no-deflate", compress=True)
        assert client.accepted.extensions == []           # the origin was offered nothing
        big = "n" * (MAX_FRAME // 2)
        assert client.echo(big) == big
        client.close()
    finally:
        app.stop()


# --- violations by the client -----------------------------------------------------------------------

@pytest.mark.parametrize("name, data, code", [
    ("unmasked", frame(TEXT, b"no mask", masked=False), 1002),
    ("oversize-frame", frame(BINARY, b"x" * 100, length=MAX_FRAME + 1), 1009),
    ("invalid-utf8", frame(TEXT, b"caf\xc3\x28"), 1007),
    ("close-code-1005", frame(CLOSE, struct.pack("!H", 1005)), 1002),
    ("close-code-999", frame(CLOSE, struct.pack("!H", 999)), 1002),
    ("close-code-5000", frame(CLOSE, struct.pack("!H", 5000)), 1002),
    ("long-ping", frame(PING, b"p" * 126), 1002),
    ("fragmented-ping", frame(PING, b"p", fin=False), 1002),
])
def test_client_violation_is_closed_with_its_code(inspecting, ws_origin, name, data, code):
    bystander = Client(inspecting, ws_origin, f"/bystander-{name}")
    client = Client(inspecting, ws_origin, f"/{name}")
    assert client.echo("before") == "before"
    client.sock.sendall(data)
    assert_cut_off(inspecting, client, code, bystander)


def test_fragmented_message_over_the_limit_is_1009(inspecting, ws_origin):
    bystander = Client(inspecting, ws_origin, "/bystander-fragments")
    client = Client(inspecting, ws_origin, "/fragments")
    piece = b"f" * (MAX_FRAME // 2)                  # every frame well under the frame limit
    for _ in range(MAX_MESSAGE // len(piece)):
        client.send(BytesMessage(data=piece, message_finished=False))
    client.send(BytesMessage(data=piece))
    record = assert_cut_off(inspecting, client, 1009, bystander)
    assert "max_message_bytes" in record["error"]


def test_deflate_bomb_is_1009_without_inflating_it(inspecting, ws_origin):
    bystander = Client(inspecting, ws_origin, "/bystander-bomb")
    client = Client(inspecting, ws_origin, "/bomb", compress=True)
    bomb = deflate_bomb(60)
    assert len(bomb) < MAX_FRAME                      # one frame, inside the frame limit
    before = inspecting.peak_rss_kib()
    client.sock.sendall(frame(BINARY, bomb, rsv1=True))
    record = assert_cut_off(inspecting, client, 1009, bystander)
    assert record["bytes_up"] >= len(bomb)                      # what the client sent, counted
    assert inspecting.peak_rss_kib() - before < 24 * 1024      # 60 MiB inflated were never held


# --- a violation by the origin ------------------------------------------------------------------------

class MaskingOrigin:
    """Accepts one WebSocket handshake, then sends a masked frame (origins must not mask) and
    records every byte it receives after, until the appliance closes."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(4)
        self.sock.settimeout(10)
        self.port = self.sock.getsockname()[1]
        self.received = b""
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        conn, _ = self.sock.accept()
        with conn:
            conn.settimeout(10)
            head = b""
            for _ in range(100):
                head += conn.recv(65536)
                if b"\r\n\r\n" in head:
                    break
            key = next(line.split(b":", 1)[1].strip() for line in head.split(b"\r\n")
                       if line.lower().startswith(b"sec-websocket-key:"))
            accept = base64.b64encode(hashlib.sha1(key + GUID).digest()).decode()
            conn.sendall(f"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                         f"Connection: Upgrade\r\nSec-WebSocket-Accept: {accept}\r\n\r\n".encode()
                         + frame(TEXT, b"masked by the origin", masked=True))
            for _ in range(100):
                data = conn.recv(65536)
                if not data:
                    return
                self.received += data

    def close(self) -> None:
        self.thread.join(10)
        self.sock.close()


def test_masked_origin_frame_is_1002_to_the_origin_and_1011_to_the_client(inspecting, ws_origin):
    bystander = Client(inspecting, ws_origin, "/bystander-origin")
    origin = MaskingOrigin()
    try:
        client = Client(inspecting, origin.port, "/masking-origin")
        events = client.until(lambda e: isinstance(e, CloseConnection))
        assert not any(isinstance(e, TextMessage) for e in events)
        assert events[-1].code == 1011
        client.sock.close()
        record = wait_for_record(inspecting.access_log, lambda r: r["target"].endswith("/masking-origin"))
        assert record["error"].startswith("websocket origin violation, closed 1002: "), record
        assert "websocket origin violation, closed 1002" in inspecting.proc.output()
    finally:
        origin.close()
    seen = Connection(ConnectionType.SERVER)           # what the origin got: our Close, masked
    seen.receive_data(origin.received)
    assert [e.code for e in seen.events() if isinstance(e, CloseConnection)] == [1002]
    assert bystander.echo("still here") == "still here"
    bystander.close()


# --- RFC 8441: an HTTP/2 client's extended CONNECT, inspected the same way ----------------------------

def h2_events(client: H2RawClient, sid: int, ws: Connection, done) -> list:
    """wsproto events in the stream's DATA until `done(event)` or the stream ends."""
    seen, consumed = [], 0

    def ready() -> bool:
        nonlocal consumed
        body = client.responses[sid].body
        ws.receive_data(bytes(body[consumed:]))
        consumed = len(body)
        seen.extend(ws.events())
        return any(done(e) for e in seen) or client.responses[sid].done
    client.wait(ready)
    return seen


def test_extended_connect_stream_is_inspected_too(inspecting, ws_origin):
    client = H2RawClient(inspecting.https_port, inspecting.ca_path)
    try:
        sid = client.request([(":method", "CONNECT"), (":protocol", "websocket"), (":scheme", "http"),
                              (":authority", f"127.0.0.1:{ws_origin}"), (":path", "/h2-inspected"),
                              ("sec-websocket-version", "13")], end=False)
        client.wait(lambda: client.responses[sid].status is not None)
        assert client.responses[sid].status == 200
        ws = Connection(ConnectionType.CLIENT)
        client.data(sid, ws.send(TextMessage(data="over h2")))
        events = h2_events(client, sid, ws, lambda e: isinstance(e, TextMessage))
        assert [e.data for e in events if isinstance(e, TextMessage)] == ["over h2"]
        client.data(sid, frame(TEXT, b"unmasked", masked=False))
        events = h2_events(client, sid, ws, lambda e: isinstance(e, CloseConnection))
        assert [e.code for e in events if isinstance(e, CloseConnection)] == [1002]
        sibling = client.response(client.get(f"http://127.0.0.1:{ws_origin}/other"))
        assert sibling.status is not None                # the connection still serves streams
    finally:
        client.close()
    record = wait_for_record(inspecting.access_log, lambda r: r["target"].endswith("/h2-inspected")
                             and r["error"], context=inspecting.proc.output)
    assert record["status"] == 200 and record["error"].startswith("websocket client violation, closed 1002")


# --- inspect = false: today's blind relay -----------------------------------------------------------

def test_without_inspection_frames_over_the_limits_pass_blindly(blind, ws_origin):
    client = Client(blind, ws_origin, "/blind")
    big = b"b" * (MAX_MESSAGE * 2)                  # over the inspecting appliance's limits
    client.sock.sendall(frame(BINARY, big))
    events = client.until(lambda e: isinstance(e, BytesMessage) and e.message_finished)
    assert b"".join(e.data for e in events) == big
    client.close()
    record = wait_for_record(blind.access_log, lambda r: r["target"].endswith("/blind"))
    assert record["status"] == 101 and record["error"] is None, record
