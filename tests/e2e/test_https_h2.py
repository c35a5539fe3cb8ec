"""The https listener: HTTP/1.1 inside TLS (curl --proxy https://) and HTTP/2 (Node's http2 client):
plain requests, CONNECT streams carrying TLS (RFC 9113 §8.5) and WebSocket over extended CONNECT
(RFC 8441), against origins the tests start."""

from __future__ import annotations

import json
import socket
import ssl
import subprocess
import sys
import time

import pytest

from .conftest import HERE, child_env, curl, free_port, require_tool

NODE_CLIENT = HERE / "node" / "h2_client.js"


@pytest.fixture(scope="module")
def app(tmp_path_factory, origin_tls):
    """An appliance whose https listener is under test; it trusts the tests' origin CA."""
    from .conftest import Appliance
    appliance = Appliance(tmp_path_factory.mktemp("h2app"),
                          extra=f'[upstream]\nca_file = "{origin_tls["ca"]}"\n').start()
    try:
        yield appliance
    finally:
        appliance.stop()


def node(app, mode: str, timeout: float = 60, **opts) -> dict:
    exe = require_tool("node")
    args = {"proxy": f"https://127.0.0.1:{app.https_port}", "ca": str(app.ca_path), "mode": mode, **opts}
    r = subprocess.run([exe, str(NODE_CLIENT), json.dumps(args)], capture_output=True, text=True,
                       timeout=timeout, env=child_env(), stdin=subprocess.DEVNULL)
    assert r.stdout.strip(), r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


# --- the listener and its CA ----------------------------------------------------------------

def test_ca_created_with_private_key_mode_0600(app):
    key = app.ca_path.with_name("ca.key")
    assert app.ca_path.exists()
    assert key.stat().st_mode & 0o777 == 0o600


def test_ca_export_prints_the_ca_certificate(app):
    r = subprocess.run([sys.executable, "-m", "appliance", "ca", "export", "--config", str(app.config_path)],
                       capture_output=True, text=True, timeout=60, env=child_env(), cwd=HERE.parents[1])
    assert r.returncode == 0, r.stderr
    assert r.stdout == app.ca_path.read_text()
    assert r.stdout.startswith("-----BEGIN CERTIFICATE-----")


@pytest.mark.parametrize("name", ["localhost", "127.0.0.1"])
def test_listener_certificate_verifies_for_its_names(app, name):
    context = ssl.create_default_context(cafile=str(app.ca_path))
    context.set_alpn_protocols(["h2", "http/1.1"])
    with socket.create_connection(("127.0.0.1", app.https_port), timeout=10) as raw:
        with context.wrap_socket(raw, server_hostname=name) as tls:
            assert tls.selected_alpn_protocol() == "h2"


def test_non_tls_bytes_fail_the_handshake_and_are_logged(app, origin):
    with socket.create_connection(("127.0.0.1", app.https_port), timeout=10) as s:
        s.sendall(b"GET http://127.0.0.1/ HTTP/1.1\r\n\r\n")
        s.settimeout(10)
        try:
            data = s.recv(100)              # a TLS alert, or nothing
        except ConnectionResetError:        # or a reset: unread bytes were left behind
            data = b""
    assert not data.startswith(b"HTTP/")
    record = app.wait_record(lambda r: r["kind"] == "tls")
    assert record["error"].startswith("tls handshake")
    assert node(app, "get", origin=origin.split("//")[1])["status"] == 200    # others unaffected


# --- HTTP/1.1 inside TLS (ALPN http/1.1) -----------------------------------------------------

def test_curl_https_proxy_plain_request(app, origin):
    r = curl("--proxy", app.https_proxy, "--proxy-cacert", str(app.ca_path), f"{origin}/echo?via=tls")
    assert r.returncode == 0, r.stderr
    echo = json.loads(r.stdout)
    assert echo["query"] == {"via": "tls"}
    assert dict(echo["headers"])["Via"] == "1.1 proxy.test"
    record = app.wait_record(lambda r: r["target"].endswith("via=tls"))
    assert record["listener"] == "https" and record["status"] == 200


def test_curl_https_proxy_to_https_origin(app, tls_origin, origin_tls):
    r = curl("--proxy", app.https_proxy, "--proxy-cacert", str(app.ca_path),
             "--cacert", str(origin_tls["ca"]), f"https://localhost:{tls_origin.split(':')[1]}/echo?tls=both")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["query"] == {"tls": "both"}


def test_curl_refuses_a_proxy_it_does_not_trust(app, origin, origin_tls):
    r = curl("--proxy", app.https_proxy, "--proxy-cacert", str(origin_tls["ca"]), f"{origin}/echo")
    assert r.returncode == 60                      # peer certificate cannot be authenticated
    record = app.wait_record(lambda r: r["kind"] == "tls")
    assert record["error"].startswith("tls handshake")


# --- HTTP/2 (ALPN h2) with Node's http2 client -----------------------------------------------

def test_h2_plain_get(app, origin):
    result = node(app, "get", origin=origin.split("//")[1], path="/echo?h2=1")
    assert result["alpn"] == "h2" and result["status"] == 200
    assert result["via"] == "1.1 proxy.test"
    echo = json.loads(result["body"])
    headers = dict(echo["headers"])
    assert headers["Host"] == origin.split("//")[1]
    assert headers["Via"] == "2 proxy.test"
    record = app.wait_record(lambda r: r["target"].endswith("h2=1"))
    assert record["listener"] == "https" and record["status"] == 200


def test_h2_post_body_streams_to_the_origin(app, origin):
    result = node(app, "post", origin=origin.split("//")[1], size=3_000_000)
    assert result["status"] == 200
    assert result["echo"]["body_length"] == 3_000_000


def test_h2_hundred_parallel_streams_on_one_connection(app, origin):
    result = node(app, "parallel", origin=origin.split("//")[1], count=100, size=200_000)
    assert result["statuses"] == [200] * 100
    assert result["sizes"] == [200_000] * 100
    for _ in range(200):                       # streams end in any order; wait for all 100 lines
        records = [r for r in app.records() if "n=200000&i=" in r["target"]]
        if len(records) == 100:
            break
        time.sleep(0.05)
    assert len(records) == 100
    assert {r["protocol"] for r in records} == {"HTTP/2"}
    assert len({r["connection"] for r in records}) == 1          # one connection, 100 streams


def test_h2_connect_stream_carries_tls_to_the_origin(app, tls_origin, origin_tls):
    result = node(app, "connect-tls", origin=tls_origin, origin_ca=str(origin_tls["ca"]))
    assert result["status"] == 200 and result["authorized"] is True
    assert result["reply"].startswith("HTTP/1.1 200 OK")
    assert '"inside": "tls"' in result["reply"]
    record = app.wait_record(lambda r: r["kind"] == "tunnel" and r["target"] == tls_origin)
    assert record["status"] == 200 and record["bytes_up"] > 100 and record["bytes_down"] > 100


def test_h2_extended_connect_websocket(app, ws_origin):
    result = node(app, "websocket", origin=f"127.0.0.1:{ws_origin}",
                  messages=["hello", {"char": "x", "count": 200_000}, "bye"])
    assert result.get("enableConnectProtocol") is True, result
    assert result["messages"] == ["hello", "x" * 200_000, "bye"]
    record = app.wait_record(lambda r: r["kind"] == "websocket" and r["listener"] == "https")
    assert record["status"] == 200 and record["bytes_up"] > 200_000


def test_h2_extended_connect_websocket_to_wss_origin(app, wss_origin):
    result = node(app, "websocket", origin=f"localhost:{wss_origin}", scheme="https",
                  messages=["over", "tls"])
    assert result.get("messages") == ["over", "tls"], result


def test_h2_extended_connect_refused_by_origin_is_its_status(app, origin):
    result = node(app, "websocket", origin=origin.split("//")[1], path="/nows")
    assert result["status"] == 404


def test_h2_connect_to_closed_port_is_502(app):
    result = node(app, "connect-tls", origin=f"127.0.0.1:{free_port()}", origin_ca=str(app.ca_path))
    assert result["status"] == 502


def test_h2_denied_stream_is_403_and_the_connection_lives(make_appliance, origin):
    other = make_appliance(rules='[[rule]]\nname = "not-echo"\naction = "deny"\ndst = ["127.0.0.1/32"]\n')
    result = node(other, "get", origin=origin.split("//")[1])
    assert result["status"] == 403 and "not-echo" in result["body"]


def test_h2_drain_sends_goaway_and_finishes_streams_in_flight(make_appliance, origin):
    """SIGTERM: GOAWAY to HTTP/2 clients, no new streams, and the streams in flight complete."""
    import threading
    app = make_appliance()
    result = {}

    def slow():
        result.update(node(app, "get", origin=origin.split("//")[1], path="/slow?s=1.5"))

    t = threading.Thread(target=slow)
    t.start()
    time.sleep(0.7)                                # the stream is in flight at the origin
    assert app.stop() == 0
    t.join(20)
    assert result.get("status") == 200, result
    assert result["body"] == "slow\n"


def test_tunnel_inside_tls_closes_cleanly_when_the_origin_closes_first(app):
    """TLS toward the client cannot half-close: the origin's FIN ends the tunnel, after every
    byte it sent has arrived, as TLS records (never as plain bytes on the TLS connection)."""
    from .conftest import HalfCloseOrigin
    origin = HalfCloseOrigin("server-first")
    context = ssl.create_default_context(cafile=str(app.ca_path))
    context.set_alpn_protocols(["http/1.1"])
    with socket.create_connection(("127.0.0.1", app.https_port), timeout=10) as raw:
        with context.wrap_socket(raw, server_hostname="localhost") as tls:
            tls.sendall(f"CONNECT 127.0.0.1:{origin.port} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            data = b""
            for _ in range(100):
                try:
                    chunk = tls.recv(65536)
                except (ssl.SSLEOFError, ConnectionResetError):
                    break
                if not chunk:
                    break
                data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ")
    assert rest == b"banner"
    record = app.wait_record(lambda r: r["kind"] == "tunnel" and r["target"] == f"127.0.0.1:{origin.port}")
    assert record["error"] is None and record["bytes_down"] >= len(b"banner")


def test_h2_response_trailers_and_hop_by_hop_fields(app):
    """An origin's chunked body with trailers reaches the HTTP/2 client as a trailing HEADERS
    frame; connection-specific fields do not cross into HTTP/2 (RFC 9113 §8.2.2)."""
    import threading
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    port = srv.getsockname()[1]

    def serve():
        conn, _ = srv.accept()
        data = b""
        while b"\r\n\r\n" not in data:
            data += conn.recv(65536)
        conn.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nConnection: keep-alive, X-Hop\r\n"
                     b"X-Hop: 1\r\nKeep-Alive: timeout=5\r\nTrailer: X-Sum\r\n\r\n"
                     b"5\r\nhello\r\n0\r\nX-Sum: 42\r\n\r\n")
        conn.close()

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    result = node(app, "get", origin=f"127.0.0.1:{port}", path="/t")
    t.join(10)
    srv.close()
    assert result["status"] == 200 and result["body"] == "hello"
    assert result["trailers"] == {"x-sum": "42"}
    names = set(result["headers"])
    assert not names & {"x-hop", "keep-alive", "connection", "transfer-encoding"}
    assert result["headers"]["trailer"] == "X-Sum"


class _SilentOrigin:
    """Accepts one connection and reads nothing until told to; then reads everything, and says
    how the connection ended (EOF or reset)."""

    def __init__(self) -> None:
        import threading
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)   # a small window to fill
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(1)
        self.port = self.sock.getsockname()[1]
        self.go = threading.Event()
        self.received = 0
        self.ended_by = None
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        conn, _ = self.sock.accept()
        conn.settimeout(20)
        self.go.wait(20)
        try:
            for _ in range(100_000):
                data = conn.recv(1 << 20)
                if not data:
                    self.ended_by = "eof"
                    break
                self.received += len(data)
        except ConnectionResetError:
            self.ended_by = "reset"
        except socket.timeout:
            self.ended_by = "timeout"
        conn.close()
        self.sock.close()


def _connect_stream(c, port: int) -> int:
    sid = c.request([(b":method", b"CONNECT"), (b":authority", f"127.0.0.1:{port}".encode())], end=False)
    assert c.wait(lambda: c.responses[sid].status is not None) and c.responses[sid].status == 200
    return sid


def test_h2_data_is_acknowledged_only_once_written_on(app, origin):
    """Backpressure (RFC 9113 §5.2): an origin that does not read stalls its CONNECT stream's
    window; what the client could send is bounded, the connection's other streams go on, and
    once the origin reads, every byte arrives."""
    from .h2_raw_client import H2RawClient
    silent = _SilentOrigin()
    chunk = b"x" * 16384
    with H2RawClient(app.https_port, app.ca_path) as c:
        sid = _connect_stream(c, silent.port)
        sent = 0
        for _ in range(4096):                       # at most 64 MiB; the window closes long before
            window = min(c.conn.local_flow_control_window(sid), len(chunk))
            if window <= 0:
                if not c.wait(lambda: c.conn.local_flow_control_window(sid) > 0, 1.0):
                    break                            # no credit for a second: the stream is stalled
                continue
            c.data(sid, chunk[:window])
            sent += window
        assert sent < 16 * 1024 * 1024               # bounded by windows and socket buffers
        assert c.response(c.get(f"{origin}/echo?during=stall")).status == 200   # siblings go on
        silent.go.set()                              # the origin reads at last
        assert c.wait(lambda: c.conn.local_flow_control_window(sid) > 0, 10)     # credit returns
        c.end(sid)
        silent.thread.join(20)
    assert silent.received == sent


def test_h2_stream_reset_resets_the_origin_connection(app):
    """RFC 9113 §8.5: RST_STREAM on a CONNECT stream becomes a TCP reset toward the origin."""
    from .h2_raw_client import H2RawClient
    silent = _SilentOrigin()
    silent.go.set()
    with H2RawClient(app.https_port, app.ca_path) as c:
        sid = _connect_stream(c, silent.port)
        c.data(sid, b"hello")
        c.wait(lambda: silent.received == 5, 5)
        c.reset(sid, 0x2)                             # INTERNAL_ERROR
        silent.thread.join(10)
    assert silent.ended_by == "reset"
