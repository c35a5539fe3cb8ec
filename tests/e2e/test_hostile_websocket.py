"""Hostile WebSocket handshakes (issue 10, group 7): 101 only after a valid handshake both ways.

The client's opening handshake (RFC 6455 §4.1) must carry a 16-byte base64 Sec-WebSocket-Key and
version 13, or it is refused before anything reaches the origin. The origin's 101 must carry
Upgrade: websocket, Connection: upgrade and the Sec-WebSocket-Accept of the key it was sent
(RFC 6455 §4.2.2); otherwise the client gets a 502, never a 101, since a client that took the
switch would then speak WebSocket to something that did not agree to it. Any other answer from
the origin is an ordinary response, relayed as one. The origin here is a scripted socket server
that answers each handshake as the test says and records what it received; the clients are raw
sockets (a real library refuses to send the broken handshakes) and wsproto's client for the good one,
over HTTP/1.1 absolute-form, and h2 extended CONNECT (RFC 8441) through the `https` listener.
"""

from __future__ import annotations

import base64
import hashlib
import socket
import threading

import pytest
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, BytesMessage, Request

from .conftest import Appliance, wait_for_record
from .h2_raw_client import H2RawClient

GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
KEY = base64.b64encode(b"0123456789abcdef").decode()
PONG = b"pong from the origin"


def accept_for(key: str) -> str:
    return base64.b64encode(hashlib.sha1(key.encode() + GUID).digest()).decode()


def sec_key(head: bytes) -> str:
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"sec-websocket-key":
            return value.strip().decode()
    return ""


ANSWERS = {
    # name: a function of the key the origin received -> the origin's raw answer
    "good": lambda key: (f"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                         f"Connection: Upgrade\r\nSec-WebSocket-Accept: {accept_for(key)}\r\n\r\n"),
    "wrong accept": lambda key: ("HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                                 f"Connection: Upgrade\r\nSec-WebSocket-Accept: {accept_for(KEY + 'x')}\r\n\r\n"),
    "no accept": lambda key: ("HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                              "Connection: Upgrade\r\n\r\n"),
    "two accepts": lambda key: ("HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                                f"Connection: Upgrade\r\nSec-WebSocket-Accept: {accept_for(key)}\r\n"
                                f"Sec-WebSocket-Accept: {accept_for(key)}\r\n\r\n"),
    "no upgrade field": lambda key: ("HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\n"
                                     f"Sec-WebSocket-Accept: {accept_for(key)}\r\n\r\n"),
    "upgrade to h2c": lambda key: ("HTTP/1.1 101 Switching Protocols\r\nUpgrade: h2c\r\n"
                                   f"Connection: Upgrade\r\nSec-WebSocket-Accept: {accept_for(key)}\r\n\r\n"),
    "no connection upgrade": lambda key: ("HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                                          f"Sec-WebSocket-Accept: {accept_for(key)}\r\n\r\n"),
    "403": lambda key: ("HTTP/1.1 403 Forbidden\r\nContent-Type: text/plain\r\nContent-Length: 7\r\n\r\n"
                        "go away"),
    "426": lambda key: ("HTTP/1.1 426 Upgrade Required\r\nSec-WebSocket-Version: 13\r\n"
                        "Content-Length: 0\r\n\r\n"),
}
BAD_SWITCHES = ["wrong accept", "no accept", "two accepts", "no upgrade field", "upgrade to h2c",
                "no connection upgrade"]


class ScriptedOrigin:
    """Answers every WebSocket handshake with ANSWERS[answer]; after a good 101 it echoes bytes.
    Records each request head it received."""

    def __init__(self, answer: str) -> None:
        self.answer = answer
        self.heads: list[bytes] = []
        self.frames: list[bytes] = []               # raw WebSocket bytes after the 101
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        for _ in range(100_000):                   # bounded: stopped by close() long before
            if self.stopping.is_set():
                return
            try:
                conn, _ = self.sock.accept()
            except (socket.timeout, OSError):
                continue
            threading.Thread(target=self._one, args=(conn,), daemon=True).start()

    def _one(self, conn: socket.socket) -> None:
        conn.settimeout(5)
        with conn:
            head = b""
            try:
                for _ in range(200):
                    chunk = conn.recv(65536)
                    if not chunk:
                        return
                    head += chunk
                    if b"\r\n\r\n" in head:
                        break
                self.heads.append(head)
                conn.sendall(ANSWERS[self.answer](sec_key(head)).encode())
                if self.answer != "good":
                    return
                for _ in range(1000):    # each read of client frames gets one server frame back
                    data = conn.recv(65536)
                    if not data:
                        return
                    self.frames.append(data)
                    conn.sendall(bytes([0x82, len(PONG)]) + PONG)   # FIN, binary, unmasked
            except OSError:
                return

    def close(self) -> None:
        self.stopping.set()
        self.thread.join(5)
        self.sock.close()


@pytest.fixture
def scripted():
    origins = []

    def make(answer: str) -> ScriptedOrigin:
        origins.append(ScriptedOrigin(answer))
        return origins[-1]
    yield make
    for origin in origins:
        origin.close()


def h1_handshake(app: Appliance, port: int, headers: str) -> bytes:
    """An absolute-form Upgrade through the HTTP/1.1 listener; what came back until close or the
    end of a head (and its short body)."""
    head = (f"GET http://127.0.0.1:{port}/ws HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
            f"Upgrade: websocket\r\nConnection: Upgrade\r\n{headers}\r\n").encode()
    with socket.create_connection(("127.0.0.1", app.http_port), timeout=10) as s:
        s.sendall(head)
        got = b""
        for _ in range(200):
            try:
                chunk = s.recv(65536)
            except socket.timeout:
                break
            if not chunk:
                break
            got += chunk
            if b"\r\n\r\n" in got and (got.startswith(b"HTTP/1.1 101") or got.endswith(b"go away")
                                       or b"Content-Length: 0" in got or b"Connection: close" in got):
                s.settimeout(0.5)
    return got


GOOD_CLIENT = f"Sec-WebSocket-Key: {KEY}\r\nSec-WebSocket-Version: 13\r\n"


# --- the client's handshake -------------------------------------------------------------------

@pytest.mark.parametrize("name, headers", [
    ("no key", "Sec-WebSocket-Version: 13\r\n"),
    ("key of 15 bytes", f"Sec-WebSocket-Key: {base64.b64encode(b'x' * 15).decode()}\r\nSec-WebSocket-Version: 13\r\n"),
    ("key not base64", "Sec-WebSocket-Key: not*base64*at*all!!\r\nSec-WebSocket-Version: 13\r\n"),
    ("two keys", f"Sec-WebSocket-Key: {KEY}\r\nSec-WebSocket-Key: {KEY}\r\nSec-WebSocket-Version: 13\r\n"),
    ("no version", f"Sec-WebSocket-Key: {KEY}\r\n"),
    ("version 8", f"Sec-WebSocket-Key: {KEY}\r\nSec-WebSocket-Version: 8\r\n"),
])
def test_a_bad_client_handshake_is_refused_and_never_forwarded(appliance, scripted, name, headers):
    origin = scripted("good")
    got = h1_handshake(appliance, origin.port, headers)
    assert got.startswith(b"HTTP/1.1 400 "), got[:300]
    assert origin.heads == []
    record = wait_for_record(appliance.access_log, lambda r: r["kind"] == "websocket"
                             and r["target"].endswith(f":{origin.port}/ws"))
    assert record["status"] == 400 and "WebSocket" in (record["error"] or ""), record


# --- the origin's answer ----------------------------------------------------------------------

@pytest.mark.parametrize("answer", BAD_SWITCHES)
def test_a_bad_switch_from_the_origin_is_a_502_never_a_101(appliance, scripted, answer):
    origin = scripted(answer)
    got = h1_handshake(appliance, origin.port, GOOD_CLIENT)
    assert got.startswith(b"HTTP/1.1 502 "), got[:300]
    assert b"101" not in got.split(b"\r\n", 1)[0]
    assert len(origin.heads) == 1 and sec_key(origin.heads[0]) == KEY
    record = wait_for_record(appliance.access_log, lambda r: r["kind"] == "websocket"
                             and r["target"].endswith(f":{origin.port}/ws"))
    assert record["status"] == 502 and record["error"], record


@pytest.mark.parametrize("answer, status", [("403", b"403"), ("426", b"426")])
def test_any_other_answer_is_relayed_as_a_response(appliance, scripted, answer, status):
    origin = scripted(answer)
    got = h1_handshake(appliance, origin.port, GOOD_CLIENT)
    assert got.split(b"\r\n", 1)[0].split(b" ")[1] == status, got[:300]
    if answer == "403":
        assert got.endswith(b"go away")


def test_a_good_switch_relays_frames_for_a_real_client(appliance, scripted):
    """wsproto's client (RFC 6455, h11 underneath) speaks through the proxy: it checks the
    Sec-WebSocket-Accept itself, its masked frame reaches the origin, the origin's comes back."""
    origin = scripted("good")
    ws = WSConnection(ConnectionType.CLIENT)
    with socket.create_connection(("127.0.0.1", appliance.http_port), timeout=10) as s:
        s.sendall(ws.send(Request(host=f"127.0.0.1:{origin.port}",
                                  target=f"http://127.0.0.1:{origin.port}/ws")))
        events = []
        for _ in range(100):
            ws.receive_data(s.recv(65536))
            events += list(ws.events())
            if events:
                break
        assert isinstance(events[0], AcceptConnection), events
        s.sendall(ws.send(BytesMessage(data=b"ping through the proxy")))
        got = b""
        for _ in range(100):
            ws.receive_data(s.recv(65536))
            got += b"".join(e.data for e in ws.events() if isinstance(e, BytesMessage))
            if len(got) >= len(PONG):
                break
    assert got == PONG
    frame = origin.frames[0]
    assert frame[0] == 0x82 and frame[1] & 0x80        # the client's frame arrived, masked


# --- the same over HTTP/2 (RFC 8441 extended CONNECT to an HTTP/1.1 origin) -------------------

@pytest.mark.parametrize("answer", BAD_SWITCHES)
def test_a_bad_switch_behind_an_extended_connect_is_a_502_stream(appliance, scripted, origin, answer):
    scripted_origin = scripted(answer)
    client = H2RawClient(appliance.https_port, appliance.ca_path)
    try:
        sid = client.request([(":method", "CONNECT"), (":protocol", "websocket"),
                              (":scheme", "http"), (":authority", f"127.0.0.1:{scripted_origin.port}"),
                              (":path", "/ws"), ("sec-websocket-version", "13")], end=False)
        response = client.response(sid)
        assert response.status == 502, response
        assert len(scripted_origin.heads) == 1
        sibling = client.response(client.get(f"{origin}/echo?sibling=1"))
        assert sibling.status == 200                      # the connection still serves streams
    finally:
        client.close()
