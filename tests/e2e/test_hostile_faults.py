"""Faults on both sides of the real appliance: origins that refuse, reset or hang before and
during a response, names that do not resolve, and clients that vanish mid-transfer.

- Before any response byte went out, the client gets a real answer (502, or 504 for a timeout)
  naming the cause, and the access log says why.
- Once response bytes went out, the message stays visibly incomplete: a Content-Length body
  closed short, or a chunked body without its last chunk (h11 refuses both at EOF); never a
  faked complete message. HTTP/2 streams end in RST_STREAM instead of END_STREAM.
- DNS failures come from a dnslib resolver this module starts on loopback (`[upstream]
  nameservers`): NXDOMAIN, SERVFAIL, or a socket that never answers.
- 1,000 clients gone mid-upload and 1,000 gone mid-download (SO_LINGER 0 resets) leave the
  appliance's descriptor count where it was, and it goes on serving.
- An unexpected exception inside a connection handler (the last section): the real session
  class on a real socketpair answers 500 and logs the traceback once.
"""

from __future__ import annotations

import itertools
import os
import re
import socket
import struct
import threading
import time

import h11
import pytest
from dnslib import RCODE
from dnslib.server import BaseResolver, DNSServer

from .conftest import Appliance, free_port, raw_exchange, read_access_log, read_to_eof
from .h2_raw_client import H2RawClient

RESPONSE_TIMEOUT = 1.0
CONNECT_TIMEOUT = 1.0
TUNNEL_IDLE = 1.0
HANG_BOUND = 30.0             # a hanging origin lets go of its connection after this at the latest


def reset(sock: socket.socket) -> None:
    """Close with SO_LINGER 0: the peer gets an RST instead of a FIN."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


class FaultOrigin:
    """A raw HTTP/1.1 origin on loopback whose fault is chosen by the request path's first
    segment (`/rst-before/...`). Each connection runs in a thread; hangs end when the test
    module does (`close`) or after HANG_BOUND. `outcomes` lists, per connection that read to
    its end, whether the proxy closed it with a FIN ("eof") or an RST ("reset")."""

    PARTIAL_BODY = b"x" * 100

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.released = threading.Event()
        self.outcomes: list[str] = []
        self._serial = itertools.count()
        threading.Thread(target=self._accept, daemon=True).start()

    def url(self, fault: str) -> str:
        """A URL for `fault`, never given out before (so its access-log record is its own)."""
        return f"http://127.0.0.1:{self.port}/{fault}/{next(self._serial)}"

    def close(self) -> None:
        self.released.set()
        self.sock.close()

    def _accept(self) -> None:
        while not self.released.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _read_head(self, conn: socket.socket) -> bytes:
        """The request head, and a small Content-Length body with it (read, so that closing
        the connection sends a FIN, not the RST of a close on unread data)."""
        data = b""
        for _ in range(1000):
            head, sep, body = data.partition(b"\r\n\r\n")
            length = re.search(rb"(?im)^content-length: *(\d+)", head)
            wanted = int(length.group(1)) if length else 0
            if sep and (wanted > 1024 or len(body) >= wanted):      # a big body is read later
                break
            more = conn.recv(65536)
            if not more:
                break
            data += more
        return data

    def _serve(self, conn: socket.socket) -> None:
        conn.settimeout(HANG_BOUND)
        try:
            head = self._read_head(conn)
            fault = head.split(b" ", 2)[1].split(b"/")[1].decode() if head.count(b" ") >= 2 else ""
            getattr(self, "_" + fault.replace("-", "_"), self._unknown)(conn)
        except OSError:
            pass
        finally:
            conn.close()

    def _unknown(self, conn) -> None:
        conn.sendall(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")

    def _hang(self, conn) -> None:
        self.released.wait(HANG_BOUND)

    def _partial(self, conn, head: bytes) -> None:
        conn.sendall(head + self.PARTIAL_BODY)
        time.sleep(0.2)          # the proxy has passed the first bytes on before the fault

    def _rst_before(self, conn) -> None:
        reset(conn)

    def _close_before(self, conn) -> None:
        conn.shutdown(socket.SHUT_WR)

    def _hang_before(self, conn) -> None:
        self._hang(conn)

    def _rst_mid_length(self, conn) -> None:
        self._partial(conn, b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n")
        reset(conn)

    def _close_mid_length(self, conn) -> None:
        self._partial(conn, b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n")

    def _close_mid_chunked(self, conn) -> None:
        self._partial(conn, b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n64\r\n")
        conn.sendall(b"\r\n")

    def _rst_mid_close_delimited(self, conn) -> None:
        self._partial(conn, b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n")
        reset(conn)

    def _close_delimited(self, conn) -> None:
        """Not a fault: a body delimited by the close is complete at the FIN (RFC 9112 §6.3)."""
        self._partial(conn, b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n")

    def _hang_mid_length(self, conn) -> None:
        self._partial(conn, b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n")
        self._hang(conn)

    def _read_body(self, conn) -> None:
        """Read what the proxy sends until it ends the connection; note how it ended."""
        try:
            for _ in range(100_000):
                if not conn.recv(65536):
                    self.outcomes.append("eof")
                    return
        except ConnectionResetError:
            self.outcomes.append("reset")
        except socket.timeout:
            self.outcomes.append("hung")


class Nameserver(BaseResolver):
    """Answers NXDOMAIN for nx.test and SERVFAIL for anything else."""

    def resolve(self, request, handler):
        reply = request.reply()
        reply.header.rcode = RCODE.NXDOMAIN if str(request.q.qname) == "nx.test." else RCODE.SERVFAIL
        return reply


@pytest.fixture(scope="module")
def fault_origin():
    origin = FaultOrigin()
    try:
        yield origin
    finally:
        origin.close()


@pytest.fixture(scope="module")
def nameservers():
    """(answering port, silent port): a dnslib server, and a UDP socket that never reads."""
    port = free_port()
    server = DNSServer(Nameserver(), port=port, address="127.0.0.1")
    server.start_thread()
    silent = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    silent.bind(("127.0.0.1", 0))
    try:
        yield port, silent.getsockname()[1]
    finally:
        server.stop()
        silent.close()


def _config(nameserver: int) -> str:
    return (f"[upstream]\nresponse_timeout = {RESPONSE_TIMEOUT}\nconnect_timeout = {CONNECT_TIMEOUT}\n"
            f'nameservers = ["127.0.0.1:{nameserver}"]\n'
            f"[limits]\ntunnel_idle_timeout = {TUNNEL_IDLE}\n")


@pytest.fixture(scope="module")
def app(tmp_path_factory, nameservers):
    appliance = Appliance(tmp_path_factory.mktemp("faults"), extra=_config(nameservers[0])).start()
    try:
        yield appliance
    finally:
        appliance.stop()


@pytest.fixture(scope="module")
def silent_dns_app(tmp_path_factory, nameservers):
    appliance = Appliance(tmp_path_factory.mktemp("silentdns"), extra=_config(nameservers[1])).start()
    try:
        yield appliance
    finally:
        appliance.stop()


def request_bytes(method: str, url: str) -> bytes:
    body = b"hello" if method == "POST" else b""
    length = f"Content-Length: {len(body)}\r\n" if body else ""
    return f"{method} {url} HTTP/1.1\r\nHost: x\r\n{length}\r\n".encode() + body


def h11_reading(reply: bytes) -> tuple[int, bytes, str]:
    """(status, body, "complete" | "incomplete"): how a strict client reads `reply` followed by
    the connection's end."""
    conn = h11.Connection(h11.CLIENT)
    conn.send(h11.Request(method="GET", target="/", headers=[("Host", "x")]))
    conn.send(h11.EndOfMessage())
    conn.receive_data(reply)
    conn.receive_data(b"")
    status, body = 0, b""
    for _ in range(10_000):
        try:
            event = conn.next_event()
        except h11.RemoteProtocolError:
            return status, body, "incomplete"
        if isinstance(event, h11.Response):
            status = event.status_code
        elif isinstance(event, h11.Data):
            body += event.data
        elif isinstance(event, h11.EndOfMessage):
            return status, body, "complete"
        elif event is h11.NEED_DATA or isinstance(event, h11.ConnectionClosed):
            return status, body, "incomplete"
    raise AssertionError("h11 produced no verdict")


def record_for(app: Appliance, target: str, method: str) -> dict:
    return app.wait_record(lambda r: r["target"] == target and r["method"] == method)


# --- HTTP/1.1 proxy: faults before any response byte ------------------------------------------

BEFORE = {      # fault -> (status, what the reply and the log's error say)
    "rst-before": (502, "reset by peer"),
    "close-before": (502, "origin closed without a response"),
    "hang-before": (504, f"no data for {RESPONSE_TIMEOUT:g}s"),
}


@pytest.mark.parametrize("method", ["GET", "POST"])
@pytest.mark.parametrize("fault", sorted(BEFORE))
def test_origin_fault_before_the_response_gets_an_answer(app, fault_origin, fault, method):
    status, why = BEFORE[fault]
    url = fault_origin.url(fault)
    reply = raw_exchange(app.http_port, request_bytes(method, url))
    assert reply.startswith(f"HTTP/1.1 {status} ".encode()), reply[:200]
    assert h11_reading(reply)[2] == "complete"        # our own answer, whole, then the close
    assert why.encode() in reply
    record = record_for(app, url, method)
    assert record["status"] == status and why in record["error"], record


@pytest.mark.parametrize("method", ["GET", "POST"])
def test_origin_refusing_the_connection_is_502(app, method):
    url = f"http://127.0.0.1:{free_port()}/closed-port"
    reply = raw_exchange(app.http_port, request_bytes(method, url))
    assert reply.startswith(b"HTTP/1.1 502 ") and b"Connection refused" in reply, reply[:200]
    record = record_for(app, url, method)
    assert record["error"] == "upstream connect: 127.0.0.1: Connection refused", record


@pytest.fixture
def unanswered_port():
    """A port whose listen backlog is full: the kernel drops further SYNs, so a connect hangs."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    fillers = []
    for _ in range(3):
        s = socket.socket()
        s.setblocking(False)
        try:
            s.connect(("127.0.0.1", port))
        except BlockingIOError:
            pass
        fillers.append(s)
    try:
        yield port
    finally:
        for s in fillers:
            s.close()
        listener.close()


@pytest.mark.parametrize("method", ["GET", "CONNECT"])
def test_origin_never_accepting_is_504_after_the_connect_timeout(app, unanswered_port, method):
    target = (f"127.0.0.1:{unanswered_port}" if method == "CONNECT"
              else f"http://127.0.0.1:{unanswered_port}/")
    started = time.monotonic()
    reply = raw_exchange(app.http_port, f"{method} {target} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    assert reply.startswith(b"HTTP/1.1 504 "), reply[:200]
    assert CONNECT_TIMEOUT * 0.9 < time.monotonic() - started < CONNECT_TIMEOUT + 5
    record = record_for(app, target, method)
    assert record["error"] == "upstream timeout: connect to 127.0.0.1 timed out", record


# --- HTTP/1.1 proxy: faults during the response body -----------------------------------------

DURING = {      # fault -> (the framing the client sees, what the log's error says)
    "rst-mid-length": ("Content-Length: 1000", "reset by peer"),
    "close-mid-length": ("Content-Length: 1000", "connection closed inside a message body"),
    "close-mid-chunked": ("Transfer-Encoding: chunked", "connection closed inside a message body"),
    "rst-mid-close-delimited": ("Transfer-Encoding: chunked", "reset by peer"),
    "hang-mid-length": ("Content-Length: 1000", f"no data for {RESPONSE_TIMEOUT:g}s"),
}


@pytest.mark.parametrize("method", ["GET", "POST"])
@pytest.mark.parametrize("fault", sorted(DURING))
def test_origin_fault_during_the_body_leaves_the_message_incomplete(app, fault_origin, fault, method):
    framing, why = DURING[fault]
    url = fault_origin.url(fault)
    reply = raw_exchange(app.http_port, request_bytes(method, url))
    head = reply.split(b"\r\n\r\n", 1)[0]
    assert head.startswith(b"HTTP/1.1 200 ") and framing.encode() in head, reply[:200]
    status, body, verdict = h11_reading(reply)
    assert (status, body, verdict) == (200, FaultOrigin.PARTIAL_BODY, "incomplete")
    assert not reply.endswith(b"0\r\n\r\n")           # never a last chunk
    record = record_for(app, url, method)
    assert record["status"] == 200 and why in record["error"], record


def test_close_delimited_body_is_complete_at_the_fin(app, fault_origin):
    """The control case: the same bytes ended by a FIN are a whole message, re-framed chunked."""
    url = fault_origin.url("close-delimited")
    reply = raw_exchange(app.http_port, request_bytes("GET", url))
    assert h11_reading(reply) == (200, FaultOrigin.PARTIAL_BODY, "complete")
    assert reply.endswith(b"0\r\n\r\n")
    assert record_for(app, url, "GET")["error"] is None


# --- CONNECT ----------------------------------------------------------------------------------

def test_connect_to_a_closed_port_is_502(app):
    target = f"127.0.0.1:{free_port()}"
    reply = raw_exchange(app.http_port, f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode())
    assert reply.startswith(b"HTTP/1.1 502 ") and b"Connection refused" in reply
    assert record_for(app, target, "CONNECT")["error"] == "upstream connect: 127.0.0.1: Connection refused"


@pytest.mark.parametrize("fault, why", [("rst-before", "ECONNRESET"), ("hang-before", "idle timeout")])
def test_connect_tunnel_ends_when_the_origin_resets_or_hangs(app, fault_origin, fault, why):
    """After the 200 the tunnel is bytes: the origin's reset, or its silence past the tunnel's
    idle timeout, ends it, and the log says which. A reset reaches the client as a reset (never
    as a FIN, which would pass for a clean end); the idle timeout as a FIN."""
    target = f"127.0.0.1:{fault_origin.port}"
    with socket.create_connection(("127.0.0.1", app.http_port), timeout=10) as s:
        s.sendall(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode())
        assert s.recv(1000) == b"HTTP/1.1 200 Connection established\r\n\r\n"
        s.sendall(f"GET /{fault}/x HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        started = time.monotonic()
        if fault == "rst-before":
            with pytest.raises(ConnectionResetError):
                read_to_eof(s)
        else:
            assert read_to_eof(s) == b""
        assert time.monotonic() - started < 9           # the appliance ended it, not our timeout
    record = app.wait_record(lambda r: r["target"] == target and r["method"] == "CONNECT"
                             and r["error"] is not None and why in r["error"])
    assert record["status"] == 200


# --- HTTP/2 over the https listener -------------------------------------------------------------

@pytest.mark.parametrize("fault, status, why", [
    ("closed-port", 502, "Connection refused"),
    ("rst-before", 502, "reset by peer"),
    ("hang-before", 504, f"no data for {RESPONSE_TIMEOUT:g}s"),
])
def test_h2_stream_gets_502_or_504_before_the_response(app, fault_origin, fault, status, why):
    url = (f"http://127.0.0.1:{free_port()}/closed-port" if fault == "closed-port"
           else fault_origin.url(fault))
    with H2RawClient(app.https_port, app.ca_path) as client:
        response = client.response(client.get(url), timeout=10)
    assert (response.status, response.ended) == (status, True)
    assert why in response.body.decode()
    record = record_for(app, url, "GET")
    assert record["protocol"] == "HTTP/2" and record["status"] == status and why in record["error"]


@pytest.mark.parametrize("fault", ["rst-mid-length", "close-mid-length", "hang-mid-length"])
def test_h2_stream_cut_mid_body_is_reset_never_ended(app, fault_origin, fault):
    url = fault_origin.url(fault)
    with H2RawClient(app.https_port, app.ca_path) as client:
        response = client.response(client.get(url), timeout=10)
        assert response.status == 200 and bytes(response.body) == FaultOrigin.PARTIAL_BODY
        assert not response.ended and response.reset is not None
        sid = client.get(fault_origin.url("close-delimited"))       # the connection goes on
        assert client.response(sid, timeout=10).ended
    record = record_for(app, url, "GET")
    assert record["protocol"] == "HTTP/2" and record["error"], record


# --- DNS failures -------------------------------------------------------------------------------

@pytest.mark.parametrize("method", ["GET", "CONNECT"])
@pytest.mark.parametrize("name, why", [("nx.test", "no such name (NXDOMAIN)"),
                                       ("fail.test", "nameserver answered SERVFAIL")])
def test_name_the_nameserver_refuses_is_502_with_the_rcode(app, method, name, why):
    target = f"{name}:80" if method == "CONNECT" else f"http://{name}/"
    reply = raw_exchange(app.http_port, f"{method} {target} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    assert reply.startswith(b"HTTP/1.1 502 ") and why.encode() in reply, reply
    record = record_for(app, target, method)
    assert record["error"].startswith("upstream dns: ") and why in record["error"], record


@pytest.mark.parametrize("method", ["GET", "CONNECT"])
def test_nameserver_never_answering_is_502_after_the_timeout(silent_dns_app, method):
    target = "quiet.test:80" if method == "CONNECT" else "http://quiet.test/"
    started = time.monotonic()
    reply = raw_exchange(silent_dns_app.http_port, f"{method} {target} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    assert reply.startswith(b"HTTP/1.1 502 ") and b"timed out" in reply, reply
    assert time.monotonic() - started < CONNECT_TIMEOUT * 2 + 5
    record = record_for(silent_dns_app, target, method)
    assert record["error"].startswith("upstream dns: ") and "timed out" in record["error"], record


# --- clients gone mid-transfer ------------------------------------------------------------------

ABORTS = 1000
FD_SLACK = 16         # descriptors the appliance may keep for pooled origin connections and such


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def abort_mid_upload(app: Appliance, origin: str) -> None:
    """A POST whose body the origin has started reading (its 100 Continue came through), then
    a reset from the client."""
    with socket.create_connection(("127.0.0.1", app.http_port), timeout=10) as s:
        s.sendall(f"POST {origin}/echo?gone=up HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000\r\n"
                  "Expect: 100-continue\r\n\r\n".encode())
        assert s.recv(65536).startswith(b"HTTP/1.1 100 ")
        s.sendall(b"u" * 4096)
        reset(s)


def abort_mid_download(app: Appliance, origin: str) -> None:
    with socket.create_connection(("127.0.0.1", app.http_port), timeout=10) as s:
        s.sendall(f"GET {origin}/bytes?n=100000000 HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        assert s.recv(65536).startswith(b"HTTP/1.1 200 ")
        reset(s)


@pytest.mark.parametrize("abort", [abort_mid_upload, abort_mid_download])
def test_a_thousand_vanished_clients_leave_no_descriptors_behind(tmp_path, origin, abort):
    app = Appliance(tmp_path / "app").start()
    try:
        for _ in range(5):                                # warm up: pools, log file, caches
            abort(app, origin)
        time.sleep(0.5)
        baseline = open_fds(app.proc.pid)
        started = time.monotonic()
        for _ in range(ABORTS):
            abort(app, origin)
        assert time.monotonic() - started < 60
        deadline = time.monotonic() + 10
        for _ in range(200):
            count = open_fds(app.proc.pid)
            if count <= baseline + FD_SLACK or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert count <= baseline + FD_SLACK, (baseline, count)
        reply = raw_exchange(app.http_port, f"GET {origin}/echo?after=aborts HTTP/1.1\r\nHost: x\r\n"
                             "Connection: close\r\n\r\n".encode())
        assert reply.startswith(b"HTTP/1.1 200 ")
        gone = [r for r in app.wait_records(ABORTS + 6) if "gone=up" in r["target"] or "bytes?n=" in r["target"]]
        assert len(gone) == ABORTS + 5 and all(r["error"] for r in gone)
    finally:
        app.stop()


# --- an exception inside a connection handler ---------------------------------------------------
# By inspection (every frontend's top level): Http1Session.serve_one (http, https with ALPN
# http/1.1, transparent HTTP) and each HTTP/2 stream (h2_exchange) catch Exception, log it with
# its traceback and answer 500; SOCKS5 answers "general failure", transparent TLS closes, the
# DNS responder drops the packet. What a frontend lets through (the admin and pac listeners,
# the TLS handshake, an HTTP/2 connection loop) reaches the server's last guard
# (`ApplianceServer._limited`): logged once with its traceback, that connection closed, the
# slot released. No input from outside is known to reach either path, so these tests drive
# the real session classes on a real socketpair with a fault from the environment: a hosts
# file that cannot be read, and an admin route that raises.

@pytest.fixture
def server(tmp_path):
    """The real ApplianceServer for a test config (its handlers, limiter and access log; no
    listener is opened)."""
    from appliance.config import load
    from appliance.server import ApplianceServer
    config = tmp_path / "appliance.toml"
    config.write_text('[appliance]\nstate_dir = "var"\n[log]\naccess_log = "access.log"\n'
                      '[upstream]\nconnect_timeout = 2.0\n[[rule]]\nname = "loopback"\n'
                      'action = "allow"\nsrc = ["127.0.0.0/8"]\n')
    appliance = ApplianceServer(load(config))
    try:
        yield appliance
    finally:
        appliance.access_log.close()


def serve_over_socketpair(serve, request: bytes) -> bytes:
    """Run `serve` (a listener's handler) on one end of a socketpair, as the listener would for
    a client at 127.0.0.1; send `request` from the other end and read the reply to EOF."""
    import gevent
    from gevent import socket as gsocket
    ours, theirs = gsocket.socketpair()
    task = gevent.spawn(serve, theirs, ("127.0.0.1", 40000))
    try:
        ours.settimeout(10)
        ours.sendall(request)
        reply = read_to_eof(ours)
        task.join(10)
        assert task.dead and task.exception is None      # the guard held: nothing escaped
        return reply
    finally:
        task.kill()
        ours.close()
        theirs.close()


def internal_errors(caplog) -> list:
    return [r for r in caplog.records if r.levelname == "ERROR" and "internal error" in r.getMessage()]


def test_http1_session_answers_500_logs_once_and_serves_on(server, tmp_path, caplog):
    """/etc/hosts unreadable (here a directory in its place): the resolver's OSError is no
    UpstreamError, so it reaches the session's guard as a bug would."""
    from appliance.config import Address
    from appliance.upstream import HostsFile
    server.ctx.resolver.hosts = HostsFile(str(tmp_path))
    serve = server._limited("http", server._handler("http", Address("127.0.0.1", 3128)))
    reply = serve_over_socketpair(serve, b"GET http://unreadable-hosts.test/x HTTP/1.1\r\nHost: x\r\n\r\n")
    assert reply.startswith(b"HTTP/1.1 500 Internal Server Error\r\n") and b"Connection: close" in reply
    [logged] = internal_errors(caplog)
    assert "GET http://unreadable-hosts.test/x" in logged.getMessage()
    assert logged.exc_info and logged.exc_info[0] is IsADirectoryError
    # the next connection is served as usual (an IP literal needs no hosts file)
    port = free_port()
    reply = serve_over_socketpair(serve, f"GET http://127.0.0.1:{port}/ HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    assert reply.startswith(b"HTTP/1.1 502 ") and b"Connection refused" in reply
    assert len(internal_errors(caplog)) == 1 and server.limiter.total == 0
    server.access_log.close()
    first = read_access_log(tmp_path / "access.log")[0]
    assert first["status"] == 500 and first["error"].startswith("internal: IsADirectoryError")


def test_an_exception_a_frontend_lets_through_closes_that_connection_only(server, caplog):
    """An admin route that raises: AdminSession does not catch it; the server's guard logs it
    with its traceback once, closes the connection and frees its slot."""
    def broken_route(_headers):
        raise ValueError("a route with a bug")
    serve = server._limited("admin", server._session({"/broken": broken_route,
                                                      "/healthz": server._healthz}))
    assert serve_over_socketpair(serve, b"GET /broken HTTP/1.1\r\nHost: x\r\n\r\n") == b""
    [logged] = internal_errors(caplog)
    assert logged.getMessage() == "internal error on the admin listener, connection from 127.0.0.1; closed"
    assert logged.exc_info[0] is ValueError and server.limiter.total == 0
    reply = serve_over_socketpair(serve, b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert reply.startswith(b"HTTP/1.1 503 ")          # answering (not ready: no listener opened)
    assert len(internal_errors(caplog)) == 1
