"""`frontends.intercept.peek_client_hello`: the ClientHello is read without being consumed.

Real sockets on loopback, a real hello from the ssl module, sent in pieces with pauses, so the
SO_RCVLOWAT wait and the byte-by-byte reassembly both run.
"""

from __future__ import annotations

import pytest

pytest.importorskip("gevent")

import gevent  # noqa: E402
from gevent import socket  # noqa: E402

from appliance.errors import ClientError  # noqa: E402
from appliance.frontends.intercept import peek_client_hello, refuse_hello  # noqa: E402
from appliance.protocols.tls_clienthello import ALERT_ACCESS_DENIED, NotTls, alert_record  # noqa: E402
from tests.protocols.test_rfc8446_clienthello import real_hello  # noqa: E402


def pair():
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    client = socket.create_connection(listener.getsockname())
    server, _ = listener.accept()
    listener.close()
    return client, server


def send_in_pieces(sock, data: bytes, cuts: list[int], pause: float = 0.02) -> None:
    bounds = [0, *cuts, len(data)]
    for a, b in zip(bounds, bounds[1:]):
        sock.sendall(data[a:b])
        gevent.sleep(pause)


def test_hello_split_over_segments_is_peeked_and_left_unread():
    hello = real_hello("www.example.test", alpn=["h2", "http/1.1"])
    client, server = pair()
    with client, server:
        sender = gevent.spawn(send_in_pieces, client, hello, [1, 5, 40, len(hello) - 1])
        parsed = peek_client_hello(server, timeout=5)
        sender.join()
        assert parsed.sni == "www.example.test" and parsed.alpn == ("h2", "http/1.1")
        server.settimeout(1)
        assert server.recv(len(hello), socket.MSG_WAITALL) == hello     # still all there


def test_plain_http_is_not_tls():
    client, server = pair()
    with client, server:
        client.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        with pytest.raises(NotTls):
            peek_client_hello(server, timeout=5)


def test_a_client_that_stops_mid_hello_times_out():
    hello = real_hello()
    client, server = pair()
    with client, server:
        client.sendall(hello[:30])
        with pytest.raises(ClientError, match="ClientHello"):
            peek_client_hello(server, timeout=0.3)


def test_a_client_that_closes_mid_hello_is_a_client_error():
    hello = real_hello()
    client, server = pair()
    with server:
        client.sendall(hello[:30])
        client.close()
        with pytest.raises(ClientError):
            peek_client_hello(server, timeout=0.5)


def test_refusal_is_a_tls_alert_then_a_clean_close():
    hello = real_hello()
    client, server = pair()
    with client:
        client.sendall(hello)
        peek_client_hello(server, timeout=5)
        refuse_hello(server, ALERT_ACCESS_DENIED)
        client.settimeout(2)
        assert client.recv(100) == alert_record(ALERT_ACCESS_DENIED)
        assert client.recv(100) == b""          # FIN, not a reset
