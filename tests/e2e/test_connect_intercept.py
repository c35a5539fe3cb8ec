"""Explicit CONNECT with `action = "intercept"`: the appliance terminates TLS inside the tunnel
with a leaf from its CA, verifies the origin itself, and proxies (and logs) each request.

Three ways in: HTTP/1.1 CONNECT on the http listener (the client's socket is intercepted
directly), HTTP/1.1 CONNECT inside TLS on the https listener, and an HTTP/2 CONNECT stream
(both bridged). Real clients: curl, Node's http2 + tls, Python ssl, `websockets`.
"""

from __future__ import annotations

import asyncio
import json
import socket
import ssl

import pytest
import websockets
from python_socks.async_.asyncio import Proxy as AsyncProxy

from .conftest import Appliance, curl, read_to_eof
from .test_https_h2 import node

RULES = """
[[rule]]
name = "inspect localhost"
action = "intercept"
src = ["127.0.0.0/8"]
dst = ["localhost"]

[[rule]]
name = "forbidden inside"
action = "deny"
dst = ["forbidden.localhost"]

[[rule]]
name = "loopback"
action = "allow"
src = ["127.0.0.0/8", "::1"]
"""


@pytest.fixture(scope="module")
def app(tmp_path_factory, origin_tls):
    """Intercepts CONNECT to localhost; trusts the tests' origin CA for the origin side."""
    appliance = Appliance(tmp_path_factory.mktemp("intercept"), rules=RULES,
                          extra=f'[upstream]\nca_file = "{origin_tls["ca"]}"\n').start()
    try:
        yield appliance
    finally:
        appliance.stop()


def tls_through_connect(app: Appliance, host: str, port: int, cafile: str) -> ssl.SSLSocket:
    """CONNECT by hand, then TLS trusting only `cafile`."""
    sock = socket.create_connection(("127.0.0.1", app.http_port), timeout=10)
    sock.sendall(f"CONNECT {host}:{port} HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n".encode())
    head = b""
    for _ in range(100):
        head += sock.recv(1)
        if head.endswith(b"\r\n\r\n"):
            break
    assert head.startswith(b"HTTP/1.1 200"), head
    context = ssl.create_default_context(cafile=cafile)
    context.set_alpn_protocols(["http/1.1"])
    return context.wrap_socket(sock, server_hostname=host)


def test_the_client_sees_a_leaf_for_the_connect_host_from_the_appliance_ca(app, tls_origin):
    port = int(tls_origin.split(":")[1])
    with tls_through_connect(app, "localhost", port, str(app.ca_path)) as tls:
        cert = tls.getpeercert()
        assert dict(x[0] for x in cert["issuer"])["commonName"] == "Appliance CA"
        assert ("DNS", "localhost") in cert["subjectAltName"]
        tls.sendall(b"GET /echo?via=python HTTP/1.1\r\nHost: localhost:%d\r\nConnection: close\r\n\r\n" % port)
        reply = read_to_eof(tls)
    assert reply.startswith(b"HTTP/1.1 200")
    echo = json.loads(reply.split(b"\r\n\r\n", 1)[1])
    assert echo["path"] == "/echo" and any(k == "Via" for k, _ in echo["headers"])   # we forwarded it


def test_curl_over_http2_inside_the_tunnel_is_logged_per_request(app, tls_origin):
    port = int(tls_origin.split(":")[1])
    r = curl("-x", app.proxy, "--cacert", str(app.ca_path), "-w", "\n%{http_version}",
             f"https://localhost:{port}/echo?curl=h2")
    assert r.returncode == 0, r.stderr
    body, version = r.stdout.decode().rsplit("\n", 1)
    assert version == "2" and json.loads(body)["query"] == {"curl": "h2"}
    record = app.wait_record(lambda r: r["target"].endswith("/echo?curl=h2"))
    assert record["protocol"] == "HTTP/2" and record["status"] == 200
    assert record["target"] == f"https://localhost:{port}/echo?curl=h2"
    assert record["listener"] == "http" and record["rule"] == "inspect localhost"
    tunnel = app.wait_record(lambda r: r["kind"] == "intercept" and r["target"] == f"localhost:{port}")
    assert tunnel["status"] == 200 and tunnel["rule"] == "inspect localhost"


def test_curl_http1_inside_a_tunnel_on_the_https_listener(app, tls_origin):
    """HTTP/1.1 CONNECT inside TLS to the proxy: TLS in TLS, bridged to the interceptor."""
    port = int(tls_origin.split(":")[1])
    r = curl("--proxy", app.https_proxy, "--proxy-cacert", str(app.ca_path), "--cacert", str(app.ca_path),
             "--http1.1", f"https://localhost:{port}/echo?curl=https-proxy")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["query"] == {"curl": "https-proxy"}
    record = app.wait_record(lambda r: r["target"].endswith("/echo?curl=https-proxy"))
    assert record["listener"] == "https" and record["protocol"] == "HTTP/1.1"


def test_http2_connect_stream_is_intercepted(app, tls_origin):
    port = int(tls_origin.split(":")[1])
    result = node(app, "connect-tls", origin=f"localhost:{port}", origin_ca=str(app.ca_path))
    assert result.get("status") == 200, result
    assert result["authorized"] is True            # Node verified our leaf against the appliance CA
    assert result["reply"].startswith("HTTP/1.1 200")
    record = app.wait_record(lambda r: r["target"].endswith("/echo?inside=tls"))
    assert record["listener"] == "https" and record["status"] == 200


def test_a_request_for_another_host_inside_the_tunnel_is_misdirected(app, tls_origin):
    port = int(tls_origin.split(":")[1])
    with tls_through_connect(app, "localhost", port, str(app.ca_path)) as tls:
        tls.sendall(b"GET /echo HTTP/1.1\r\nHost: forbidden.localhost\r\n\r\n")
        reply = tls.recv(65536)
    assert reply.startswith(b"HTTP/1.1 421"), reply


def test_wss_inside_an_intercepted_tunnel(app, wss_origin):
    context = ssl.create_default_context(cafile=str(app.ca_path))

    async def run():
        sock = await AsyncProxy.from_url(app.proxy).connect("localhost", wss_origin, timeout=10)
        async with websockets.connect(f"wss://localhost:{wss_origin}/chat", sock=sock, ssl=context,
                                      server_hostname="localhost") as ws:
            out = []
            for message in ("hello", "x" * 100000):
                await ws.send(message)
                out.append(await ws.recv())
            return out

    assert asyncio.run(asyncio.wait_for(run(), 30)) == ["hello", "x" * 100000]
    record = app.wait_record(lambda r: r["kind"] == "websocket" and str(wss_origin) in r["target"])
    assert record["status"] == 101 and record["target"].startswith("https://localhost:")


def test_origin_with_an_untrusted_certificate_gets_a_502_saying_why(make_appliance, tls_origin):
    """Without [upstream] ca_file the test origin's CA is unknown: never silently trusted."""
    app = make_appliance(rules=RULES)
    port = int(tls_origin.split(":")[1])
    r = curl("-x", app.proxy, "--cacert", str(app.ca_path), "-w", "\n%{http_code}",
             f"https://localhost:{port}/echo")
    assert r.returncode == 0, r.stderr
    body, status = r.stdout.decode().rsplit("\n", 1)
    assert status == "502"
    assert "origin certificate verification failed: self-signed certificate in certificate chain" in body
    record = app.wait_record(lambda r: r["status"] == 502)
    assert record["error"] == ("upstream tls: origin certificate verification failed: "
                               "self-signed certificate in certificate chain")


def test_a_client_that_does_not_trust_the_ca_is_logged(app, tls_origin):
    port = int(tls_origin.split(":")[1])
    r = curl("-x", app.proxy, f"https://localhost:{port}/echo")       # system store only
    assert r.returncode == 60, r.stderr                                # curl: peer certificate not trusted
    record = app.wait_record(lambda r: r["kind"] == "tls" and "intercepting localhost" in r["target"])
    assert record["error"].startswith("tls handshake:")


def test_not_tls_inside_an_intercepted_tunnel_is_relayed(app, origin):
    """Nothing to decrypt: plain HTTP inside a CONNECT to localhost goes through as bytes."""
    port = int(origin.rsplit(":", 1)[1])
    sock = socket.create_connection(("127.0.0.1", app.http_port), timeout=10)
    with sock:
        sock.sendall(f"CONNECT localhost:{port} HTTP/1.1\r\n\r\n".encode())
        assert sock.recv(4096).startswith(b"HTTP/1.1 200")
        sock.sendall(b"GET /echo?plain=1 HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        reply = read_to_eof(sock)
    assert reply.startswith(b"HTTP/1.1 200") and b'"plain": "1"' in reply.replace(b'":"', b'": "')
