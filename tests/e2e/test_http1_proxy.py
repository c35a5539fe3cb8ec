"""The explicit HTTP/1.1 proxy driven by curl and httpx against a real origin (RFC 9110 §7.6, RFC 9112)."""

from __future__ import annotations

import json
import socket

import httpx
import pytest

from .conftest import curl, raw_exchange


def httpx_client(proxy: str, **kw) -> httpx.Client:
    """httpx through the proxy; the keyword changed from `proxies` (0.23, bookworm) to `proxy`."""
    try:
        return httpx.Client(proxy=proxy, trust_env=False, **kw)
    except TypeError:
        return httpx.Client(proxies=proxy, trust_env=False, **kw)


@pytest.mark.parametrize("method", ["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "PROPFIND"])
def test_every_method_is_forwarded_in_absolute_form(appliance, origin, method):
    r = curl("-x", appliance.proxy, "-X", method, "--data-binary", "hello", f"{origin}/echo?m={method}")
    assert r.returncode == 0, r.stderr
    echo = json.loads(r.stdout)
    assert echo["method"] == method
    assert echo["query"] == {"m": method}
    assert echo["body_length"] == 5


def test_head_response_has_no_body(appliance, origin):
    r = curl("-x", appliance.proxy, "-I", f"{origin}/bytes?n=1000")
    assert r.returncode == 0, r.stderr
    assert b"Content-Length: 1000" in r.stdout


def test_hop_by_hop_fields_removed_and_via_added(appliance, origin):
    r = curl("-x", appliance.proxy, "-H", "Connection: keep-alive, X-Secret", "-H", "X-Secret: 1",
             "-H", "Keep-Alive: timeout=5", "-H", "Proxy-Connection: keep-alive", "-H", "X-Kept: yes",
             f"{origin}/echo")
    echo = json.loads(r.stdout)
    headers = {k.lower(): v for k, v in echo["headers"]}
    assert "x-secret" not in headers and "keep-alive" not in headers
    assert "proxy-connection" not in headers
    assert headers["x-kept"] == "yes"
    assert headers["via"] == "1.1 proxy.test"
    assert headers["host"] == origin.split("//")[1]


def test_response_carries_via(appliance, origin):
    r = curl("-x", appliance.proxy, "-D", "-", "-o", "/dev/null", f"{origin}/echo")
    assert b"Via: 1.1 proxy.test" in r.stdout


def test_request_that_already_passed_through_us_is_refused(appliance, origin):
    r = curl("-x", appliance.proxy, "-H", "Via: 1.1 other, 1.1 proxy.test", "-w", "%{http_code}",
             "-o", "/dev/null", f"{origin}/echo?loop=1")
    assert r.stdout == b"403"
    seen = json.loads(curl(f"{origin}/seen").stdout)
    assert not any("loop=1" in s for s in seen)


def test_client_keep_alive_and_origin_pool_reuse(appliance, origin):
    r = curl("-x", appliance.proxy, f"{origin}/echo", f"{origin}/echo", f"{origin}/echo",
             "-w", "\n%{num_connects}\n")
    parts = [p for p in r.stdout.split(b"\n") if p.strip()]
    bodies = [json.loads(p) for p in parts if p.startswith(b"{")]
    connects = [int(p) for p in parts if p.isdigit()]
    assert len(bodies) == 3
    assert connects == [1, 0, 0]                        # one client connection for three requests
    assert len({b["peer_port"] for b in bodies}) == 1   # and one origin connection


def test_httpx_streams_a_chunked_upload(appliance, origin):
    def body():
        for i in range(50):
            yield bytes([i]) * 10000

    with httpx_client(appliance.proxy, timeout=30) as client:
        r = client.post(f"{origin}/echo", content=body())
    assert r.status_code == 200
    assert r.json()["body_length"] == 500000
    assert r.headers["via"] == "1.1 proxy.test"


def test_chunked_download_streams(appliance, origin):
    with httpx_client(appliance.proxy, timeout=30) as client:
        with client.stream("GET", f"{origin}/bytes?n=3000000&chunked=1") as r:
            assert r.headers.get("transfer-encoding") == "chunked"
            assert sum(len(c) for c in r.iter_bytes()) == 3000000


def _trailer_origin():
    """A raw origin that answers one request with a chunked body and trailers."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    return srv


def test_trailers_pass_both_ways(appliance):
    srv = _trailer_origin()
    port = srv.getsockname()[1]
    import threading
    got = {}

    def serve():
        conn, _ = srv.accept()
        data = b""
        while b"\r\n0\r\n" not in data or not data.endswith(b"\r\n\r\n"):
            data += conn.recv(65536)
        got["request"] = data
        conn.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTrailer: X-Sum\r\n\r\n"
                     b"5\r\nhello\r\n0\r\nX-Sum: 42\r\n\r\n")
        conn.close()

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    request = (f"POST http://127.0.0.1:{port}/t HTTP/1.1\r\nHost: x\r\nTE: trailers\r\n"
               "Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
               "3\r\nabc\r\n0\r\nX-Check: up\r\n\r\n").encode()
    reply = raw_exchange(appliance.http_port, request)
    t.join(10)
    srv.close()
    assert b"X-Check: up\r\n" in got["request"]
    assert got["request"].startswith(b"POST /t HTTP/1.1\r\n")
    assert b"TE: trailers" in got["request"]
    assert reply.startswith(b"HTTP/1.1 200 OK\r\n")
    assert reply.endswith(b"5\r\nhello\r\n0\r\nX-Sum: 42\r\n\r\n")


def test_denied_request_gets_403_naming_the_rule(make_appliance, origin):
    app = make_appliance(rules='[[rule]]\nname = "no-echo"\naction = "deny"\ndst = ["127.0.0.1/32"]\n'
                               'ports = ["1-65535"]\n')
    r = curl("-x", app.proxy, "-w", "\n%{http_code}", f"{origin}/echo?denied=1")
    body, code = r.stdout.rsplit(b"\n", 1)
    assert code == b"403"
    assert b"no-echo" in body
    seen = json.loads(curl(f"{origin}/seen").stdout)
    assert not any("denied" in s for s in seen)
    record = app.wait_records(1)[-1]
    assert record["status"] == 403 and record["rule"] == "no-echo" and record["error"].startswith("denied")


def test_no_matching_rule_means_deny(make_appliance, origin):
    app = make_appliance(rules='[[rule]]\naction = "allow"\nsrc = ["192.0.2.0/24"]\n')
    r = curl("-x", app.proxy, "-w", "\n%{http_code}", f"{origin}/echo")
    body, code = r.stdout.rsplit(b"\n", 1)
    assert code == b"403"
    assert b"default deny" in body


def test_unreachable_origin_is_502(appliance):
    from .conftest import free_port
    port = free_port()                 # nothing listens there
    r = curl("-x", appliance.proxy, "-w", "\n%{http_code}", f"http://127.0.0.1:{port}/")
    body, code = r.stdout.rsplit(b"\n", 1)
    assert code == b"502"
    assert b"connect" in body


def test_origin_timeout_is_504(make_appliance, origin):
    app = make_appliance("[upstream]\nresponse_timeout = 1.0\n")
    r = curl("-x", app.proxy, "-w", "\n%{http_code}", f"{origin}/slow?s=3")
    assert r.stdout.rsplit(b"\n", 1)[1] == b"504"
    record = app.wait_records(1)[-1]
    assert record["status"] == 504 and "timeout" in record["error"]


def test_origin_form_request_is_400(appliance):
    reply = raw_exchange(appliance.http_port, b"GET / HTTP/1.1\r\nHost: example\r\n\r\n")
    assert reply.startswith(b"HTTP/1.1 400 ")
    assert b"Connection: close" in reply


def test_names_resolve_through_configured_nameserver(make_appliance, origin, tmp_path):
    """[upstream] nameservers: a dnslib DNS server the test starts answers for a made-up name."""
    from dnslib import RR
    from dnslib.server import BaseResolver, DNSServer

    class Fixed(BaseResolver):
        def resolve(self, request, handler):
            reply = request.reply()
            if str(request.q.qname).rstrip(".") == "origin.test" and request.q.qtype == 1:
                reply.add_answer(*RR.fromZone("origin.test. 60 A 127.0.0.1"))
            return reply

    from .conftest import free_port
    dns_port = free_port()
    server = DNSServer(Fixed(), port=dns_port, address="127.0.0.1")
    server.start_thread()
    try:
        app = make_appliance(f'[upstream]\nnameservers = ["127.0.0.1:{dns_port}"]\n')
        origin_port = origin.rsplit(":", 1)[1]
        r = curl("-x", app.proxy, f"http://origin.test:{origin_port}/echo")
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)["headers"]
        r = curl("-x", app.proxy, "-w", "%{http_code}", "-o", "/dev/null",
                 f"http://missing.test:{origin_port}/echo")
        assert r.stdout == b"502"
    finally:
        server.stop()


def test_ipv6_listener_and_several_addresses(make_appliance, origin):
    from .conftest import free_port
    p4, p6 = free_port(), free_port("::1")          # different hosts: a shared number is fine
    make_appliance(http=[f"127.0.0.1:{p4}", f"[::1]:{p6}"])
    for proxy in (f"http://127.0.0.1:{p4}", f"http://[::1]:{p6}"):
        r = curl("-x", proxy, f"{origin}/echo")
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)["method"] == "GET"


def test_access_log_has_one_line_per_request(make_appliance, origin):
    app = make_appliance()
    curl("-x", app.proxy, f"{origin}/echo", f"{origin}/status?code=404")
    records = app.wait_records(2)
    assert [r["status"] for r in records] == [200, 404]
    first = records[0]
    for key in ("time", "client", "user", "listener", "method", "target", "status", "bytes_up",
                "bytes_down", "duration_ms", "rule", "error"):
        assert key in first
    assert first["client"] == "127.0.0.1" and first["listener"] == "http"
    assert first["target"] == f"{origin}/echo" and first["rule"] == "loopback"
    assert first["bytes_down"] > 0 and first["bytes_up"] > 0


def test_squid_access_log_format(make_appliance, origin):
    app = make_appliance(log='format = "squid"')
    curl("-x", app.proxy, f"{origin}/echo")
    app.stop()                                   # flushes and closes the log
    fields = app.access_log.read_text().splitlines()[-1].split()
    assert fields[3] == "TCP_MISS/200"
    assert fields[5] == "GET" and fields[6] == f"{origin}/echo"
    assert fields[8] == "HIER_DIRECT/127.0.0.1"
