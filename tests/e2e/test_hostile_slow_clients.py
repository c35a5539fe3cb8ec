"""Slow and greedy clients against the real appliance: what test_bad_input.py and
test_operations.py do not already cover (slowloris and idle keep-alive on the http listener,
the 503 of the per-client cap).

- Slowloris over the https listener (HTTP/1.1 inside TLS): 408 at the header timeout.
- Slow POST: a body trickled just within the idle timeout is cut off with 408 once past its
  grace period (`limits.UploadPace`), and the origin connection is reset, never pooled; over
  HTTP/1.1 and on an HTTP/2 stream.
- Slow read: a client that never reads a large response costs bounded memory and is closed
  after the idle timeout.
- Per-client connection cap: a log line says why; other clients are untouched; the https
  listener closes the extra connection (no TLS, no answer).
- Out of file descriptors (a low RLIMIT_NOFILE set on the running appliance with prlimit):
  new connections are refused with a 503 and closed, and accepting resumes once others close.
- 10,000 idle connections: memory per connection measured and bounded.
"""

from __future__ import annotations

import resource
import socket
import ssl
import time
from pathlib import Path

import pytest

from appliance.limits import MIN_UPLOAD_RATE

from .conftest import Appliance, raw_exchange, read_to_eof
from .h2_raw_client import H2RawClient
from .test_hostile_faults import fault_origin, open_fds  # noqa: F401 (a fixture)

HEADER_TIMEOUT = 1.0
IDLE_TIMEOUT = 2.0


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def tls_client(app: Appliance) -> ssl.SSLSocket:
    context = ssl.create_default_context(cafile=str(app.ca_path))
    context.set_alpn_protocols(["http/1.1"])
    raw = socket.create_connection(("127.0.0.1", app.https_port), timeout=10)
    return context.wrap_socket(raw, server_hostname="localhost")


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    appliance = Appliance(tmp_path_factory.mktemp("slow"), extra=(
        f"[limits]\nheader_timeout = {HEADER_TIMEOUT}\nclient_idle_timeout = {IDLE_TIMEOUT}\n")).start()
    try:
        yield appliance
    finally:
        appliance.stop()


# --- slowloris on the https listener ------------------------------------------------------------

def test_head_trickled_inside_tls_gets_408(app, origin):
    with tls_client(app) as s:
        s.sendall(f"GET {origin}/echo?slowloris=tls HTTP/1.1\r\n".encode())
        started = time.monotonic()
        for _ in range(20):
            time.sleep(0.3)                      # each byte well within the idle timeout
            try:
                s.sendall(b"X-Slow: 1\r\n")
            except OSError:
                break
        reply = read_to_eof(s)
        waited = time.monotonic() - started
    assert reply.startswith(b"HTTP/1.1 408 "), reply
    assert waited < HEADER_TIMEOUT + 3
    record = app.wait_record(lambda r: r["listener"] == "https" and r["status"] == 408)
    assert f"not complete within {HEADER_TIMEOUT:g}s" in record["error"]


# --- slow POST ----------------------------------------------------------------------------------

def test_body_trickled_within_the_idle_timeout_is_cut_off_and_the_origin_reset(app, fault_origin):
    url = fault_origin.url("read-body")
    outcomes = len(fault_origin.outcomes)
    with socket.create_connection(("127.0.0.1", app.http_port), timeout=10) as s:
        s.sendall(f"POST {url} HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n".encode())
        started = time.monotonic()
        for _ in range(40):                       # 1 byte every 0.25 s: 4 bytes/s, never idle
            try:
                s.sendall(b"b")
            except OSError:
                break
            time.sleep(0.25)
            s.setblocking(False)
            try:
                if s.recv(1, socket.MSG_PEEK):
                    break                          # the answer is there
            except BlockingIOError:
                pass
            finally:
                s.setblocking(True)
        reply = read_to_eof(s)
    assert reply.startswith(b"HTTP/1.1 408 "), reply
    assert f"slower than {MIN_UPLOAD_RATE} bytes/s".encode() in reply
    assert time.monotonic() - started < HEADER_TIMEOUT + 4
    record = app.wait_record(lambda r: r["target"] == url)
    assert record["status"] == 408 and "slower than" in record["error"]
    deadline = time.monotonic() + 5
    for _ in range(100):
        if len(fault_origin.outcomes) > outcomes or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert fault_origin.outcomes[outcomes:] == ["reset"]          # not a FIN, never pooled


def test_body_trickled_over_http2_is_cut_off_too(app, fault_origin, origin):
    """The same pace for a request stream on the https listener (ALPN h2): a 408 on the stream,
    the origin reset, the connection and a sibling stream unaffected. Only waits the client is to
    blame for count: the appliance's windows stay open here, so every wait is the client's."""
    url = fault_origin.url("read-body")
    authority, _, path = url.split("://", 1)[1].partition("/")
    outcomes = len(fault_origin.outcomes)
    client = H2RawClient(app.https_port, app.ca_path)
    try:
        sid = client.request([(":method", "POST"), (":scheme", "http"), (":authority", authority),
                              (":path", "/" + path), ("content-length", "100000")], end=False)
        started = time.monotonic()
        for _ in range(40):                       # 1 byte every 0.25 s: 4 bytes/s
            client.data(sid, b"b")
            if client.wait(lambda: client.responses[sid].done, 0.25):
                break
        response = client.responses[sid]
        assert response.status == 408, response
        assert time.monotonic() - started < HEADER_TIMEOUT + 4
        sibling = client.response(client.get(f"{origin}/echo?sibling=h2"))
        assert sibling.status == 200
    finally:
        client.close()
    record = app.wait_record(lambda r: r["target"] == url and r["protocol"] == "HTTP/2")
    assert record["status"] == 408 and "slower than" in record["error"], record
    deadline = time.monotonic() + 5
    for _ in range(100):
        if len(fault_origin.outcomes) > outcomes or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert fault_origin.outcomes[outcomes:outcomes + 1] == ["reset"]


def test_a_fast_body_after_a_slow_start_is_forwarded(app, origin):
    """The pace counts from the first body byte: waiting long for the body to begin (as for a
    100 Continue) is the idle timeout's business, not a slow POST."""
    with socket.create_connection(("127.0.0.1", app.http_port), timeout=10) as s:
        s.sendall(f"POST {origin}/echo?pace=ok HTTP/1.1\r\nHost: x\r\nContent-Length: 200000\r\n"
                  "Connection: close\r\n\r\n".encode())
        time.sleep(HEADER_TIMEOUT + 0.3)
        s.sendall(b"p" * 200000)
        reply = read_to_eof(s)
    assert reply.startswith(b"HTTP/1.1 200 ") and b'"body_length": 200000' in reply


# --- slow read ----------------------------------------------------------------------------------

def test_client_that_never_reads_costs_bounded_memory_and_is_closed(app, origin):
    size = 1 << 30                                 # 1 GiB: far more than any buffer on the way
    before = rss_kib(app.proc.pid)
    with socket.create_connection(("127.0.0.1", app.http_port), timeout=30) as s:
        s.sendall(f"GET {origin}/bytes?n={size} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        record = app.wait_record(lambda r: "/bytes?n=" in r["target"] and r["error"], timeout=IDLE_TIMEOUT + 10)
        during = rss_kib(app.proc.pid)
        received = 0
        try:
            for _ in range(100_000):
                chunk = s.recv(1 << 20)
                if not chunk:
                    break
                received += len(chunk)
        except ConnectionResetError:
            pass
    assert received < size // 10                   # the appliance gave up long before the end
    assert f"did not read for {IDLE_TIMEOUT:g}s" in record["error"], record
    assert IDLE_TIMEOUT * 1000 * 0.9 < record["duration_ms"] < (IDLE_TIMEOUT + 5) * 1000
    # What is held for a stalled reader is one read buffer and the socket buffers, not the body.
    assert during - before < 16 * 1024, (before, during)


# --- per-client connection caps -----------------------------------------------------------------

def test_per_client_cap_logs_why_and_leaves_other_clients_alone(make_appliance, origin):
    app = make_appliance(extra="[limits]\nmax_connections_per_client = 2\n")
    held = [socket.create_connection(("127.0.0.1", app.http_port), timeout=5) for _ in range(2)]
    extra_tls = None
    try:
        for s in held:                              # both are being served (not refused)
            s.sendall(f"GET {origin}/echo?held=1 HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            assert s.recv(65536).startswith(b"HTTP/1.1 200 ")
        reply = raw_exchange(app.http_port, f"GET {origin}/echo?over=1 HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        assert reply.startswith(b"HTTP/1.1 503 ") and b"max_connections_per_client" in reply
        raw = socket.create_connection(("127.0.0.1", app.https_port), timeout=5)
        try:                                        # https: no TLS for a refused connection
            context = ssl.create_default_context(cafile=str(app.ca_path))
            with pytest.raises((ssl.SSLError, OSError)):
                extra_tls = context.wrap_socket(raw, server_hostname="localhost")
        finally:
            raw.close()
        other = socket.create_connection(("127.0.0.1", app.http_port), timeout=5,
                                          source_address=("127.0.0.2", 0))
        with other:                                 # another client address is served at once
            other.sendall(f"GET {origin}/echo?other=1 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
            assert read_to_eof(other).startswith(b"HTTP/1.1 200 ")
        for s in held:                              # and the held connections still work
            s.sendall(f"GET {origin}/echo?held=2 HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            assert s.recv(65536).startswith(b"HTTP/1.1 200 ")
    finally:
        for s in held:
            s.close()
        if extra_tls is not None:
            extra_tls.close()
    lines = [line for line in app.proc.output().splitlines() if "refused: [limits]" in line]
    assert lines and "connection from 127.0.0.1 refused: [limits] max_connections_per_client reached" in lines[0]
    assert len(lines) == 1                          # once a minute per client, not per connection


# --- out of file descriptors --------------------------------------------------------------------

def served(app: Appliance, origin: str, timeout: float = 5.0) -> bytes:
    return raw_exchange(app.http_port, f"GET {origin}/echo?fd=1 HTTP/1.1\r\nHost: x\r\n"
                        "Connection: close\r\n\r\n".encode(), timeout=timeout)


def test_out_of_descriptors_refuses_cleanly_and_accepting_resumes(make_appliance, origin):
    app = make_appliance()
    assert served(app, origin).startswith(b"HTTP/1.1 200 ")
    limit = open_fds(app.proc.pid) + 20
    resource.prlimit(app.proc.pid, resource.RLIMIT_NOFILE, (limit, limit))
    held, refused = [], b""
    try:
        for _ in range(60):                       # more than the 20 descriptors left
            s = socket.create_connection(("127.0.0.1", app.http_port), timeout=5)
            s.sendall(b"GET http://127.0.0.1/ HTTP/1.1\r\n")      # half a head: held open
            held.append(s)
            s.setblocking(False)
            time.sleep(0.02)
            try:
                refused = s.recv(65536)
            except BlockingIOError:
                continue
            finally:
                s.setblocking(True)
            if refused:
                break
        assert refused.startswith(b"HTTP/1.1 503 ") and b"out of file descriptors" in refused, refused
        assert len(held) > 10
        for s in held:
            s.close()
        held = []
        deadline = time.monotonic() + 10
        for _ in range(100):                        # accepting resumes once descriptors are free
            try:
                reply = served(app, origin)
            except ConnectionResetError:            # refused while the closes were under way
                reply = b""
            if reply.startswith(b"HTTP/1.1 200 ") or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert reply.startswith(b"HTTP/1.1 200 "), reply
    finally:
        for s in held:
            s.close()
    output = app.proc.output()
    assert output.count("http: out of file descriptors; refusing new connections") == 1
    assert "Traceback" not in output


# --- 10,000 idle connections --------------------------------------------------------------------

IDLE_CONNECTIONS = 10_000
# An idle HTTP/1.1 client costs a parked greenlet (its saved stack, a few KiB), the session
# and reader objects, the socket object and the kernel's socket (not in our RSS). 64 KiB each
# leaves room for all of it and still catches a per-connection read buffer (256 KiB).
BYTES_PER_IDLE_CONNECTION = 64 * 1024


def test_ten_thousand_idle_connections_cost_little_memory_each(tmp_path, origin):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    assert hard >= IDLE_CONNECTIONS + 1000, f"RLIMIT_NOFILE hard limit {hard} is too low"
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))     # the appliance inherits it
    app = Appliance(tmp_path / "app", extra=(
        f"[limits]\nmax_connections = {IDLE_CONNECTIONS + 100}\n"
        f"max_connections_per_client = {IDLE_CONNECTIONS + 100}\nclient_idle_timeout = 120\n"))
    held: list[socket.socket] = []
    try:
        app.start()
        assert served(app, origin).startswith(b"HTTP/1.1 200 ")
        before = rss_kib(app.proc.pid)
        started = time.monotonic()
        for _ in range(IDLE_CONNECTIONS):
            held.append(socket.create_connection(("127.0.0.1", app.http_port), timeout=10))
        deadline = time.monotonic() + 20
        for _ in range(400):                       # all accepted and parked
            if open_fds(app.proc.pid) >= IDLE_CONNECTIONS or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert open_fds(app.proc.pid) >= IDLE_CONNECTIONS
        assert time.monotonic() - started < 30
        after = rss_kib(app.proc.pid)
        per_connection = (after - before) * 1024 / IDLE_CONNECTIONS
        assert per_connection < BYTES_PER_IDLE_CONNECTION, f"{per_connection:.0f} bytes each"
        assert served(app, origin).startswith(b"HTTP/1.1 200 ")      # still serving
    finally:
        for s in held:
            s.close()
        app.stop()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
