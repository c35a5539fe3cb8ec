"""Hostile and broken requests on raw sockets: a 400 and a closed connection, nothing forwarded,
and the other connections untouched (RFC 9112 §2.2, §5.2, §6.3, §7.1)."""

from __future__ import annotations

import json
import socket
import threading
import time

import pytest

from .conftest import curl, raw_exchange, read_to_eof

BAD_REQUESTS = {
    "invalid request line": b"GET http://{o}/seen?bad=line\r\nHost: x\r\n\r\n",
    "lowercase version": b"GET http://{o}/seen?bad=ver http/1.1\r\nHost: x\r\n\r\n",
    "space in target": b"GET http://{o}/seen?bad=sp ace HTTP/1.1\r\nHost: x\r\n\r\n",
    "conflicting content-length": b"POST http://{o}/echo?bad=cl HTTP/1.1\r\nHost: x\r\n"
                                  b"Content-Length: 3\r\nContent-Length: 4\r\n\r\nabcd",
    "content-length and chunked": b"POST http://{o}/echo?bad=clte HTTP/1.1\r\nHost: x\r\n"
                                  b"Content-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    "obs-fold": b"GET http://{o}/echo?bad=fold HTTP/1.1\r\nHost: x\r\nX-A: 1\r\n  folded\r\n\r\n",
    "bare CR": b"GET http://{o}/echo?bad=cr HTTP/1.1\r\nHost: x\r\nX-A: 1\rX-B: 2\r\n\r\n",
    "space in header name": b"GET http://{o}/echo?bad=name HTTP/1.1\r\nHost: x\r\nX Bad: 1\r\n\r\n",
    "space before colon": b"GET http://{o}/echo?bad=colon HTTP/1.1\r\nHost: x\r\nX-Bad : 1\r\n\r\n",
    "invalid chunk size": b"POST http://{o}/echo?bad=chunk HTTP/1.1\r\nHost: x\r\n"
                          b"Transfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n0\r\n\r\n",
    "negative content-length": b"POST http://{o}/echo?bad=neg HTTP/1.1\r\nHost: x\r\n"
                               b"Content-Length: -1\r\n\r\n",
}


def _seen(origin) -> list[str]:
    return json.loads(curl(f"{origin}/seen").stdout)


@pytest.mark.parametrize("name", sorted(BAD_REQUESTS))
def test_bad_request_gets_400_and_is_never_forwarded(appliance, origin, name):
    host = origin.split("//")[1]
    before = len(_seen(origin))
    reply = raw_exchange(appliance.http_port, BAD_REQUESTS[name].replace(b"{o}", host.encode()))
    assert reply.startswith(b"HTTP/1.1 400 "), reply[:200]
    assert b"Connection: close" in reply
    # the proxy closed the connection (raw_exchange read to EOF) and the origin saw nothing new
    assert all(s.startswith("GET /seen") for s in _seen(origin)[before:])
    record = appliance.wait_record(lambda r: r["status"] == 400)
    assert record["error"].startswith("protocol")


def test_head_over_max_header_bytes_is_400(make_appliance, origin):
    app = make_appliance("[limits]\nmax_header_bytes = 2048\n")
    host = origin.split("//")[1]
    big = b"GET http://" + host.encode() + b"/echo?big=1 HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 4000 + b"\r\n\r\n"
    reply = raw_exchange(app.http_port, big)
    assert reply.startswith(b"HTTP/1.1 400 ")
    assert b"larger than 2048" in reply
    assert not any("big=1" in s for s in _seen(origin))


def test_bad_chunk_mid_body_never_completes_at_the_origin(appliance, origin):
    """A bad chunk after good ones: the head and the first chunk are on their way, but the origin
    connection is reset, so the origin never sees a complete request."""
    host = origin.split("//")[1]
    with socket.create_connection(("127.0.0.1", appliance.http_port), timeout=10) as s:
        s.sendall(f"POST http://{host}/echo?bad=midchunk HTTP/1.1\r\nHost: x\r\n"
                  "Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n".encode())
        time.sleep(0.3)                       # the proxy has forwarded the head and first chunk
        s.sendall(b"5\r\nworld\r\nnot-hex\r\n")
        reply = b""
        reply += read_to_eof(s)
    assert reply.startswith(b"HTTP/1.1 400 ")
    time.sleep(0.3)
    assert not any("midchunk" in s for s in _seen(origin))


def test_stalled_client_is_dropped_after_idle_timeout(make_appliance):
    app = make_appliance("[limits]\nclient_idle_timeout = 1.0\n")
    with socket.create_connection(("127.0.0.1", app.http_port), timeout=10) as s:
        s.sendall(b"GET http://127.0.0.1/ HTTP/1.1\r\nHost: x\r\n")      # never finishes the head
        start = time.monotonic()
        data = s.recv(65536)
        waited = time.monotonic() - start
    assert data == b""                       # closed by the proxy, not by our 10 s timeout
    assert waited < 9


def test_idle_keep_alive_connection_is_closed(make_appliance, origin):
    app = make_appliance("[limits]\nclient_idle_timeout = 1.0\n")
    host = origin.split("//")[1]
    with socket.create_connection(("127.0.0.1", app.http_port), timeout=10) as s:
        s.sendall(f"GET http://{host}/echo HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
        first = s.recv(65536)
        assert first.startswith(b"HTTP/1.1 200 ")
        rest = b""
        rest += read_to_eof(s)
    assert b"HTTP/1.1" not in rest


def test_bad_connections_do_not_disturb_good_ones(appliance, origin):
    """While bad and stalled connections come and go, a keep-alive client keeps working."""
    host = origin.split("//")[1]
    stop = threading.Event()
    errors = []

    def hammer():
        for i in range(200):
            if stop.is_set():
                break
            payload = list(BAD_REQUESTS.values())[i % len(BAD_REQUESTS)].replace(b"{o}", host.encode())
            try:
                raw_exchange(appliance.http_port, payload, timeout=5)
            except OSError as exc:
                errors.append(exc)

    stalled = [socket.create_connection(("127.0.0.1", appliance.http_port)) for _ in range(20)]
    for s in stalled:
        s.sendall(b"GET http://127.0.0.1/ HTTP/1.1\r\n")     # half a head, then nothing
    threads = [threading.Thread(target=hammer) for _ in range(3)]
    for t in threads:
        t.start()
    try:
        urls = [f"{origin}/echo?good={i}" for i in range(30)]
        r = curl("-x", appliance.proxy, *urls, "-w", "\n%{http_code}\n")
        codes = [line for line in r.stdout.split(b"\n") if line.isdigit()]
        assert codes == [b"200"] * 30
    finally:
        stop.set()
        for t in threads:
            t.join(30)
        for s in stalled:
            s.close()
    assert not errors
