"""Hostile TLS clients against the real appliance: split and fragmented ClientHellos, hellos the
size post-quantum key shares make, hellos trickled too slowly, and garbage on TLS ports.

Two ways in, both real TLS: the `https` listener (OpenSSL reads the hello) and CONNECT with
`action = "intercept"` (the appliance peeks the hello itself, `intercept.peek_client_hello`, and
mints the leaf for its SNI). The client is Python's `ssl.SSLObject` over memory BIOs, so the test
writes every byte of the hello itself (split, re-framed into several records) and then carries
on with the same handshake; it trusts only the appliance CA and checks the name, so a completed
handshake for `localhost` through `CONNECT 127.0.0.1:…` proves the SNI was read.
"""

from __future__ import annotations

import json
import select
import socket
import ssl
import threading
import time
from pathlib import Path

import pytest

from appliance.protocols.tls_clienthello import (
    ALERT_DECODE_ERROR, ALERT_RECORD_OVERFLOW, ALERT_UNEXPECTED_MESSAGE, alert_record,
)
from tests.protocols.test_rfc8446_captured_hellos import RAW as CAPTURED
from tests.protocols.test_rfc8446_clienthello import handshake_message, reframe

from .conftest import Appliance, read_to_eof

HEADER_TIMEOUT = 1.5
RULES = """
[[rule]]
name = "inspect loopback"
action = "intercept"
src = ["127.0.0.0/8"]
dst = ["localhost", "127.0.0.1"]
ports = [{port}]

[[rule]]
name = "loopback"
action = "allow"
src = ["127.0.0.0/8", "::1"]
"""
# Enough ALPN names to make a real, completable hello the size Chromium's X25519MLKEM768 key
# share gives (about 1.8 KB): more than one 1448-byte TCP segment.
PQ_PADDING_ALPN = [f"x-pq-sized-{i:03d}" for i in range(110)]


def start_appliance(tmp_path_factory, origin_tls, tls_origin, limits: str = "") -> Appliance:
    port = tls_origin.split(":")[1]
    return Appliance(tmp_path_factory.mktemp("hostile-tls"), rules=RULES.format(port=port),
                     extra=f'[upstream]\nca_file = "{origin_tls["ca"]}"\n[limits]\n{limits}\n').start()


@pytest.fixture(scope="module")
def app(tmp_path_factory, origin_tls, tls_origin):
    """Default limits: byte-by-byte hellos must not run into the header timeout."""
    appliance = start_appliance(tmp_path_factory, origin_tls, tls_origin)
    try:
        yield appliance
    finally:
        appliance.stop()


@pytest.fixture(scope="module")
def impatient_app(tmp_path_factory, origin_tls, tls_origin):
    """A header timeout short enough for a test to outlast it."""
    appliance = start_appliance(tmp_path_factory, origin_tls, tls_origin,
                                f"header_timeout = {HEADER_TIMEOUT}")
    try:
        yield appliance
    finally:
        appliance.stop()


class BioClient:
    """A TLS client whose wire bytes the test sends itself: `ssl.SSLObject` over memory BIOs."""

    def __init__(self, cafile: Path, server_hostname: str, alpn: list[str] | None = None) -> None:
        context = ssl.create_default_context(cafile=str(cafile))
        context.set_alpn_protocols(alpn or ["http/1.1"])
        self.incoming, self.outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.tls = context.wrap_bio(self.incoming, self.outgoing, server_hostname=server_hostname)

    def hello(self) -> bytes:
        """The ClientHello, as OpenSSL would send it (one record)."""
        with pytest.raises(ssl.SSLWantReadError):
            self.tls.do_handshake()
        return self.outgoing.read()

    def finish_handshake(self, sock: socket.socket) -> None:
        """Carry on after the hello was sent: bounded by the socket timeout and 100 reads."""
        for _ in range(100):
            data = sock.recv(65536)
            if not data:
                raise ConnectionError("closed during the handshake")
            self.incoming.write(data)
            try:
                self.tls.do_handshake()
            except ssl.SSLWantReadError:
                sock.sendall(self.outgoing.read())
                continue
            sock.sendall(self.outgoing.read())
            return
        raise AssertionError("handshake did not finish in 100 reads")

    def exchange(self, sock: socket.socket, request: bytes) -> bytes:
        """Send `request` (with `Connection: close`) and return everything until the close."""
        self.tls.write(request)
        sock.sendall(self.outgoing.read())
        reply = b""
        for _ in range(1000):
            data = sock.recv(65536)
            if not data:
                break
            self.incoming.write(data)
            try:
                for _ in range(1000):
                    chunk = self.tls.read(65536)
                    if not chunk:
                        return reply
                    reply += chunk
            except ssl.SSLWantReadError:
                continue
            except ssl.SSLZeroReturnError:
                return reply
        return reply


def send_in_pieces(sock: socket.socket, data: bytes, cuts, pause: float = 0.002) -> None:
    """Each piece its own write, with a pause after it, so each reaches the appliance alone."""
    bounds = [0, *sorted(set(cuts)), len(data)]
    for a, b in zip(bounds, bounds[1:]):
        if b > a:
            sock.sendall(data[a:b])
            time.sleep(pause)


def nodelay_connection(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def intercepted_tunnel(app: Appliance, origin_port: int) -> socket.socket:
    """A CONNECT to the TLS origin by address; the rule intercepts it."""
    sock = nodelay_connection(app.http_port)
    sock.sendall(f"CONNECT 127.0.0.1:{origin_port} HTTP/1.1\r\nHost: 127.0.0.1:{origin_port}\r\n\r\n"
                 .encode())
    head = b""
    for _ in range(200):
        head += sock.recv(1)
        if head.endswith(b"\r\n\r\n"):
            break
    assert head.startswith(b"HTTP/1.1 200"), head
    return sock


class Entry:
    """Where a hostile hello goes, and the request that shows the connection works after it."""

    def __init__(self, name: str, app: Appliance, tls_origin: str, origin: str) -> None:
        self.name, self.app = name, app
        self.origin_port = int(tls_origin.split(":")[1])
        self.plain_origin = origin
        self.served: list[str] = []             # tags of the exchanges that completed

    def connect(self) -> socket.socket:
        if self.name == "https listener":
            return nodelay_connection(self.app.https_port)
        return intercepted_tunnel(self.app, self.origin_port)

    def request(self, tag: str) -> bytes:
        if self.name == "https listener":     # an HTTP proxy request inside TLS to the proxy
            return (f"GET {self.plain_origin}/echo?t={tag} HTTP/1.1\r\nHost: x\r\n"
                    f"Connection: close\r\n\r\n").encode()
        return (f"GET /echo?t={tag} HTTP/1.1\r\nHost: localhost:{self.origin_port}\r\n"
                f"Connection: close\r\n\r\n").encode()

    def client(self, alpn: list[str] | None = None) -> BioClient:
        # CONNECT went to 127.0.0.1, the SNI says localhost: only a leaf minted for the SNI
        # passes the name check, so a finished handshake proves the appliance read it.
        return BioClient(self.app.ca_path, "localhost", alpn)

    def run(self, tag: str, send_hello, alpn: list[str] | None = None) -> None:
        """A full exchange whose hello `send_hello(sock, hello)` sends; asserts the echo."""
        client = self.client(alpn)
        hello = client.hello()
        with self.connect() as sock:
            send_hello(sock, hello)
            client.finish_handshake(sock)
            reply = client.exchange(sock, self.request(tag))
        assert reply.startswith(b"HTTP/1.1 200"), reply[:300]
        assert json.loads(reply.split(b"\r\n\r\n", 1)[1])["query"] == {"t": tag}
        self.served.append(tag)


ENTRIES = ["https listener", "intercepted CONNECT"]


@pytest.fixture(params=ENTRIES)
def entry(request, app, tls_origin, origin) -> Entry:
    return Entry(request.param, app, tls_origin, origin)


@pytest.fixture(params=ENTRIES)
def impatient_entry(request, impatient_app, tls_origin, origin) -> Entry:
    return Entry(request.param, impatient_app, tls_origin, origin)


# --- 1. split and fragmented hellos -------------------------------------------------------------

def test_hello_split_at_every_byte_boundary_one_connection_each(entry):
    """Every split point k of the hello, each as its own connection: hello[:k], pause, hello[k:]."""
    length = len(entry.client().hello())
    for k in range(1, length):
        entry.run(f"split{k}", lambda sock, hello: send_in_pieces(sock, hello, [k]))


def test_hello_one_byte_per_write(entry):
    entry.run("bytewise", lambda sock, hello: send_in_pieces(sock, hello, range(1, len(hello))))


FRAMINGS = {
    "handshake header split over two records": lambda n: [2],
    "record boundary right after the header": lambda n: [4],
    "three records": lambda n: [n // 3, 2 * n // 3],
    "records of 64 bytes": lambda n: range(64, n, 64),
    "one record per byte": lambda n: range(1, n),
}


@pytest.mark.parametrize("framing", sorted(FRAMINGS))
def test_hello_fragmented_over_records(entry, framing):
    """The handshake message re-framed into several records (RFC 8446 §5.1), each record
    also its own TCP write: the SNI is still read and the same handshake completes."""
    def send(sock, hello):
        message = handshake_message(hello)
        records = reframe(message, list(FRAMINGS[framing](len(message))))
        starts, offset = [], 0
        for _ in range(len(records)):
            if offset >= len(records):
                break
            offset += 5 + int.from_bytes(records[offset + 3:offset + 5], "big")
            starts.append(offset)
        send_in_pieces(sock, records, starts[:-1])
    entry.run(framing.replace(" ", "-"), send)


# --- 2. post-quantum-sized hellos ---------------------------------------------------------------

def test_pq_sized_hello_over_two_segments_and_two_records(entry):
    def send(sock, hello):
        assert len(hello) > 1800
        records = reframe(handshake_message(hello), [1000])
        send_in_pieces(sock, records, [1448])              # a full-size segment, then the rest
    entry.run("pq-sized", send, alpn=["http/1.1", *PQ_PADDING_ALPN])


def test_pq_sized_hello_split_at_every_byte(entry):
    entry.run("pq-bytewise", lambda sock, hello: send_in_pieces(sock, hello, range(1, len(hello)),
                                                                 pause=0.0005),
              alpn=["http/1.1", *PQ_PADDING_ALPN])


@pytest.mark.parametrize("cut", [5, 9, 1448])
def test_chromium_x25519mlkem768_hello_sni_is_read(app, tls_origin, cut):
    """Chromium's captured hello (a 1216-byte X25519MLKEM768 key share, ~2 KB), split at `cut`:
    the appliance reads its SNI, mints a leaf for that name and answers with a ServerHello."""
    origin_port = int(tls_origin.split(":")[1])
    hello = CAPTURED["chromium"]
    mark = len(app.proc.output())
    with intercepted_tunnel(app, origin_port) as sock:
        send_in_pieces(sock, hello, [cut])
        reply = sock.recv(5)
        assert reply[:3] == b"\x16\x03\x03", reply             # a TLS handshake record back
    wait_for_log(app, f"intercepted www.example.test:{origin_port} from 127.0.0.1", mark)
    assert any(p.name.startswith("www.example.test.") for p in (app.dir / "var" / "leaves").iterdir())


# --- helpers for 3 and 4 ------------------------------------------------------------------------

def wait_for_log(app: Appliance, text: str, since: int = 0, timeout: float = 10.0) -> str:
    """The appliance's output from offset `since`, once `text` is in it (bounded wait)."""
    deadline = time.monotonic() + timeout
    for _ in range(int(timeout / 0.05) + 1):
        output = app.proc.output()[since:]
        if text in output:
            return output
        if time.monotonic() > deadline:
            break
        time.sleep(0.05)
    raise AssertionError(f"{text!r} not in the appliance's log:\n{app.proc.output()[-3000:]}")


def check_untouched(entry: Entry, tag: str) -> None:
    entry.run(tag, lambda sock, hello: sock.sendall(hello))


# --- 3. slow hellos -----------------------------------------------------------------------------

def test_trickled_hello_is_cut_off_at_the_header_timeout(impatient_entry):
    """One byte every 100 ms (the whole hello would take ~50 s): the appliance closes once the
    header timeout has passed since the first byte, says why in its log, and serves another
    client meanwhile."""
    mark = len(impatient_entry.app.proc.output())
    hello = impatient_entry.client().hello()
    meanwhile = threading.Thread(target=check_untouched, args=(impatient_entry, "meanwhile"))
    answer, sent = None, 0
    with impatient_entry.connect() as sock:
        started = time.monotonic()
        for sent in range(1, len(hello) + 1):
            sock.sendall(hello[sent - 1:sent])
            if sent == 3:
                meanwhile.start()
            readable, _, _ = select.select([sock], [], [], 0.1)
            if readable:
                answer = read_to_eof(sock)      # a reset would raise: it fails the test
                break
        cut_after = time.monotonic() - started
    meanwhile.join(30)
    assert answer is not None and sent < len(hello), "the slow hello was never cut off"
    assert answer == b"" or answer[:1] == b"\x15", answer            # a close (or an alert)
    assert HEADER_TIMEOUT - 0.2 <= cut_after <= HEADER_TIMEOUT + 2.0
    output = wait_for_log(impatient_entry.app, f"within {HEADER_TIMEOUT:g}s", mark)
    assert "Traceback" not in output
    assert not meanwhile.is_alive() and impatient_entry.served == ["meanwhile"]


# --- 4. garbage on TLS ports --------------------------------------------------------------------

GARBAGE = {
    "HTTP request": b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n",
    "random bytes": bytes.fromhex("9f3c00e1a2b37748c0ffee11deadbeef") * 4,
    "record version 7.7": b"\x16\x07\x07\x00\x05\x01\x00\x00\x01\x00",
    "record length over 2^14": b"\x16\x03\x01\xff\xff" + b"\x01" * 100,
    # SSLv2 CLIENT-HELLO (RFC 6101 appendix E.2): 2-byte length with the high bit, msg type 1,
    # version 3.1, 21 bytes of cipher specs, no session id, a 16-byte challenge.
    "SSLv2-style hello": bytes.fromhex("802e01030100150000001001008002008003008004008005008006"
                                       "00400700c0") + bytes(16),
    "alert instead of a hello": alert_record(ALERT_DECODE_ERROR),
    "application data first": b"\x17\x03\x03\x00\x10" + bytes(16),
}


@pytest.mark.parametrize("name", sorted(GARBAGE))
def test_garbage_on_the_https_listener(app, tls_origin, origin, name):
    entry = Entry("https listener", app, tls_origin, origin)
    mark = len(app.proc.output())
    with nodelay_connection(app.https_port) as sock:
        sock.sendall(GARBAGE[name])
        answer = read_to_eof(sock)      # a reset would raise: it fails the test
    assert answer == b"" or answer[:1] == b"\x15", answer          # a TLS alert, or a close
    output = wait_for_log(app, "TLS handshake with 127.0.0.1 failed", mark)
    assert "Traceback" not in output
    check_untouched(entry, "after-garbage")


TUNNEL_GARBAGE = {    # TLS starts that the interceptor's own parser refuses, with its alert
    "record length over 2^14": (b"\x16\x03\x01\x40\x01" + b"\x01", ALERT_RECORD_OVERFLOW),
    "zero-length handshake record": (b"\x16\x03\x01\x00\x00", ALERT_DECODE_ERROR),
    "server hello from the client": (b"\x16\x03\x01\x00\x04\x02\x00\x00\x00", ALERT_UNEXPECTED_MESSAGE),
    "hello length over 64 KiB": (b"\x16\x03\x01\x00\x04\x01\x02\x00\x00", ALERT_RECORD_OVERFLOW),
}


@pytest.mark.parametrize("name", sorted(TUNNEL_GARBAGE))
def test_garbage_hello_in_an_intercepted_tunnel_gets_its_alert(app, tls_origin, origin, name):
    data, alert = TUNNEL_GARBAGE[name]
    mark = len(app.proc.output())
    with intercepted_tunnel(app, int(tls_origin.split(":")[1])) as sock:
        sock.sendall(data)
        answer = read_to_eof(sock)      # a reset would raise: it fails the test
    assert answer == alert_record(alert)
    output = wait_for_log(app, "bad ClientHello", mark)
    assert "Traceback" not in output
    check_untouched(Entry("intercepted CONNECT", app, tls_origin, origin), "after-bad-hello")
