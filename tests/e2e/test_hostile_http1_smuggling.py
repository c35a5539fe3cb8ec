"""HTTP/1.1 framing and smuggling (hostile-input suite, issue 10, group 1), on raw sockets.

A recording origin (recording_origin.py) keeps the exact bytes it receives per connection. Every
hostile request ends one of two ways: a 400 (or the 501/505 RFC 9112 names) with a log line saying
why and not one byte at the origin; or forwarded in canonical form (CRLF lines, one Host from the
absolute-form target, one framing field) that h11 and Node's llhttp read identically: same method,
target, header list, body and trailers, and nothing after it. Hostile origin responses never reach
the client as a faked complete message (h11 and llhttp agree), and an upstream connection is never
used again after an aborted or ambiguous exchange: the next request arrives on a new connection.
"""

from __future__ import annotations

import base64
import json
import re
import socket
import subprocess
import time
from pathlib import Path

import h11
import pytest

from .conftest import HERE, Appliance, raw_exchange, read_to_eof, require_tool, serving

NODE_PARSER = HERE / "node" / "http1_parse.js"


class Recording:
    """The recording origin's files: conn-<n>.bin with the bytes of connection n."""

    def __init__(self, port: int, root: Path) -> None:
        self.port, self.root = port, root
        self.authority = f"127.0.0.1:{port}"

    def connections(self) -> dict[int, bytes]:
        return {int(p.stem.split("-")[1]): p.read_bytes() for p in self.root.glob("conn-*.bin")}

    def total(self) -> tuple[int, int]:
        conns = self.connections()
        return len(conns), sum(len(data) for data in conns.values())

    def find(self, tag: bytes, timeout: float = 5.0, then: bytes = b"") -> tuple[int, bytes]:
        """The connection whose bytes contain `tag` (and `then` after it), waiting (bounded)."""
        deadline = time.monotonic() + timeout
        for _ in range(int(timeout / 0.02) + 1):
            hits = [(n, data) for n, data in self.connections().items()
                    if tag in data and then in data[data.index(tag):]]
            if hits:
                assert len(hits) == 1, f"{tag!r} on several connections"
                return hits[0]
            if time.monotonic() > deadline:
                break
            time.sleep(0.02)
        raise AssertionError(f"{tag!r} never reached the origin")

    def wait_closed(self, n: int, timeout: float = 5.0) -> None:
        """The proxy closed (or reset) origin connection `n`."""
        marker = self.root / f"conn-{n}.closed"
        deadline = time.monotonic() + timeout
        for _ in range(int(timeout / 0.02) + 1):
            if marker.exists():
                return
            if time.monotonic() > deadline:
                break
            time.sleep(0.02)
        raise AssertionError(f"origin connection {n} still open")


@pytest.fixture(scope="module")
def recording(tmp_path_factory):
    root = tmp_path_factory.mktemp("recorded")
    with serving(tmp_path_factory, "recording_origin.py", str(root)) as port:
        recording = Recording(port, root)
        recording.wait_closed(1)             # serving()'s own probe of the port: connection 1
        yield recording


@pytest.fixture(scope="module")
def proxy(tmp_path_factory):
    app = Appliance(tmp_path_factory.mktemp("smuggling"), "[upstream]\nresponse_timeout = 5.0\n").start()
    try:
        yield app
    finally:
        app.stop()


# --- the two parsers ------------------------------------------------------------------------

def h11_request(data: bytes) -> tuple[dict, bytes]:
    """One request read by h11 from the start of `data`, and the bytes after it."""
    conn = h11.Connection(h11.SERVER)
    conn.receive_data(data)
    message: dict = {"body": b""}
    for _ in range(10000):
        event = conn.next_event()
        if isinstance(event, h11.Request):
            message.update(method=event.method.decode(), target=event.target.decode("latin-1"),
                           headers=[[k.decode("latin-1"), v.decode("latin-1")] for k, v in event.headers.raw_items()])
        elif isinstance(event, h11.Data):
            message["body"] += event.data
        elif isinstance(event, h11.EndOfMessage):
            message["trailers"] = [[k.decode("latin-1"), v.decode("latin-1")] for k, v in event.headers.raw_items()]
            message["body"] = message["body"].decode("latin-1")
            return message, conn.trailing_data[0]
        else:
            raise AssertionError(f"h11 did not read a whole request: {event!r} in {data!r}")
    raise AssertionError("h11 never finished")


def h11_response(data: bytes, method: str = "GET") -> dict:
    """A response as h11 reads it: complete only if its framing says it ended."""
    conn = h11.Connection(h11.CLIENT)
    conn.send(h11.Request(method=method, target="/", headers=[("Host", "x")]))
    conn.send(h11.EndOfMessage())
    conn.receive_data(data)
    conn.receive_data(b"")
    out: dict = {"body": b"", "complete": False}
    try:
        for _ in range(10000):
            event = conn.next_event()
            if isinstance(event, h11.Response):
                out.update(status=event.status_code,
                           headers=[[k.decode("latin-1"), v.decode("latin-1")] for k, v in event.headers.raw_items()])
            elif isinstance(event, h11.Data):
                out["body"] += event.data
            elif isinstance(event, h11.EndOfMessage):
                out["complete"] = True
                break
            else:
                break
    except h11.RemoteProtocolError as exc:
        out["error"] = str(exc)
    out["body"] = out["body"].decode("latin-1")
    return out


def node_parse(data: bytes, mode: str, method: str = "GET") -> dict:
    node = require_tool("node")
    done = subprocess.run([node, str(NODE_PARSER), mode, method], input=base64.b64encode(data),
                          capture_output=True, timeout=20)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


# --- what reached the origin ----------------------------------------------------------------

def forwarded(recording: Recording, target: str) -> tuple[int, bytes, dict]:
    """The request for `target` as the origin received it: connection, exact bytes, and h11's
    reading, checked against llhttp's and for canonical form; nothing may follow it."""
    n, data = recording.find(f" {target} HTTP/1.1\r\n".encode())
    pos = 0
    for _ in range(1000):                        # the connection's requests, one after another
        message, rest = h11_request(data[pos:])
        if message["target"] == target:
            break
        pos = len(data) - len(rest)
    raw = data[pos:len(data) - len(rest)]
    assert rest == b"", f"bytes after the request at the origin: {rest!r}"
    node = node_parse(raw, "request")
    assert node["error"] is None and len(node["messages"]) == 1, node
    theirs = node["messages"][0]
    assert theirs["complete"]
    for key in ("method", "target", "headers", "body", "trailers"):
        assert theirs[key] == message[key], (key, theirs[key], message[key])
    head = raw[:raw.index(b"\r\n\r\n") + 4]
    assert head.count(b"\n") == head.count(b"\r\n") and head.count(b"\r") == head.count(b"\r\n")
    names = [name.lower() for name, _ in message["headers"]]
    assert names.count("host") == 1 and dict(message["headers"])["Host"] == recording.authority
    assert names.count("content-length") + names.count("transfer-encoding") <= 1, message["headers"]
    for name, value in message["headers"]:
        if name.lower() == "content-length":
            assert value == str(len(message["body"]))
        if name.lower() == "transfer-encoding":
            assert value == "chunked"
    return n, raw, message


def record_after(proxy: Appliance, before: int, predicate) -> dict:
    """The one access-log record past the first `before` that matches (every test waits for its
    own records, so those before are all written)."""
    found = [r for r in proxy.wait_records(before + 1)[before:] if predicate(r)]
    assert len(found) == 1, found
    return found[0]


# --- requests the proxy must refuse ----------------------------------------------------------

def post(fields: bytes, body: bytes = b"", tag: str = "x", version: bytes = b"1.1") -> bytes:
    return (b"POST http://{o}/refused?tag=" + tag.encode() + b" HTTP/" + version + b"\r\nHost: {o}\r\n"
            + fields + b"\r\n" + body)


TE = b"Transfer-Encoding: chunked\r\n"

# name -> (request, status, what the log line says)
REFUSED = {
    # Content-Length in every spelling that is not one decimal number
    "cl-conflicting-duplicates": (post(b"Content-Length: 3\r\nContent-Length: 4\r\n", b"abcd"), 400, "conflicting Content-Length"),
    "cl-conflicting-list": (post(b"Content-Length: 3, 4\r\n", b"abcd"), 400, "conflicting Content-Length"),
    "cl-plus-sign": (post(b"Content-Length: +5\r\n", b"hello"), 400, "invalid Content-Length"),
    "cl-minus-sign": (post(b"Content-Length: -5\r\n", b"hello"), 400, "invalid Content-Length"),
    "cl-arabic-indic-digit": (post("Content-Length: \u0665\r\n".encode(), b"hello"), 400, "invalid Content-Length"),
    "cl-fullwidth-digit": (post("Content-Length: \uff15\r\n".encode(), b"hello"), 400, "invalid Content-Length"),
    "cl-hex": (post(b"Content-Length: 0x5\r\n", b"hello"), 400, "invalid Content-Length"),
    "cl-empty": (post(b"Content-Length: \r\n", b"hello"), 400, "invalid Content-Length"),
    "cl-trailing-comma": (post(b"Content-Length: 5,\r\n", b"hello"), 400, "invalid Content-Length"),
    "cl-inner-space": (post(b"Content-Length: 5 5\r\n", b"hello"), 400, "invalid Content-Length"),
    "cl-nbsp-after": (post(b"Content-Length: 5\xa0\r\n", b"hello"), 400, "invalid Content-Length"),
    "cl-nineteen-digits": (post(b"Content-Length: " + b"1" * 19 + b"\r\n", b"hello"), 400, "invalid Content-Length"),
    # Transfer-Encoding with Content-Length, and chunked look-alikes
    "cl-then-te": (post(b"Content-Length: 5\r\n" + TE, b"0\r\n\r\n"), 400, "both Content-Length and Transfer-Encoding"),
    "te-then-cl": (post(TE + b"Content-Length: 5\r\n", b"0\r\n\r\n"), 400, "both Content-Length and Transfer-Encoding"),
    "te-chunked-vertical-tab": (post(b"Transfer-Encoding: chunked\x0b\r\n", b"0\r\n\r\n"), 400, "invalid characters"),
    "te-chunked-then-identity": (post(b"Transfer-Encoding: chunked, identity\r\n", b"0\r\n\r\n"), 400, "must end in chunked"),
    "te-xchunked": (post(b"Transfer-Encoding: xchunked\r\n", b"0\r\n\r\n"), 400, "must end in chunked"),
    "te-chunkedx": (post(b"Transfer-Encoding: chunkedx\r\n", b"0\r\n\r\n"), 400, "must end in chunked"),
    "te-chunked-nbsp": (post(b"Transfer-Encoding: chunked\xa0\r\n", b"0\r\n\r\n"), 400, "must end in chunked"),
    "te-identity": (post(b"Transfer-Encoding: identity\r\n", b"hello"), 400, "must end in chunked"),
    "te-chunked-twice": (post(TE + TE, b"0\r\n\r\n"), 501, "only Transfer-Encoding: chunked"),
    "te-gzip-chunked": (post(b"Transfer-Encoding: gzip, chunked\r\n", b"0\r\n\r\n"), 501, "only Transfer-Encoding: chunked"),
    "te-in-http-1.0": (post(TE, b"0\r\n\r\n", version=b"1.0"), 400, "HTTP/1.0"),
    # whitespace, control characters and line endings in the head
    "space-before-colon-cl": (post(b"Content-Length : 5\r\n", b"hello"), 400, "invalid header name"),
    "space-before-colon-te": (post(b"Transfer-Encoding : chunked\r\n", b"0\r\n\r\n"), 400, "invalid header name"),
    "tab-before-colon-te": (post(b"Transfer-Encoding\t: chunked\r\n", b"0\r\n\r\n"), 400, "invalid header name"),
    "vertical-tab-before-colon": (post(b"Content-Length\x0b: 5\r\n", b"hello"), 400, "invalid header name"),
    "vertical-tab-in-value": (post(b"X-A: a\x0bb\r\n"), 400, "invalid characters"),
    "obs-fold-space": (post(b"X-A: 1\r\n folded\r\n"), 400, "obs-fold"),
    "obs-fold-tab-into-te": (post(b"Transfer-Encoding: identity\r\n\tchunked\r\n", b"0\r\n\r\n"), 400, "obs-fold"),
    "bare-cr-between-fields": (post(b"X-A: 1\rContent-Length: 5\r\n", b"hello"), 400, "bare CR"),
    "bare-cr-in-request-line": (b"POST http://{o}/refused?tag=crline\rHTTP/1.1\r\nHost: {o}\r\n\r\n", 400, "bare CR"),
    "nul-in-name": (post(b"X-\x00A: 1\r\n"), 400, "invalid header name"),
    "nul-in-value": (post(b"X-A: a\x00b\r\n"), 400, "invalid characters"),
    "nul-in-target": (b"GET http://{o}/refused?tag=nul\x00x HTTP/1.1\r\nHost: {o}\r\n\r\n", 400, "invalid request line"),
    "http-2.0-request-line": (post(b"", version=b"2.0"), 505, "not supported"),
    # chunk-size and chunk-extension grammar
    "chunk-size-17-hex-digits": (post(TE, b"0" * 16 + b"5\r\nhello\r\n0\r\n\r\n"), 400, "invalid chunk size"),
    "chunk-size-0x-prefix": (post(TE, b"0x5\r\nhello\r\n0\r\n\r\n"), 400, "invalid chunk size"),
    "chunk-size-negative": (post(TE, b"-5\r\nhello\r\n0\r\n\r\n"), 400, "invalid chunk size"),
    "chunk-size-plus": (post(TE, b"+5\r\nhello\r\n0\r\n\r\n"), 400, "invalid chunk size"),
    "chunk-size-leading-space": (post(TE, b" 5\r\nhello\r\n0\r\n\r\n"), 400, "invalid chunk size"),
    "chunk-size-empty": (post(TE, b"\r\nhello\r\n0\r\n\r\n"), 400, "invalid chunk size"),
    "chunk-size-arabic-indic": (post(TE, "\u0665\r\nhello\r\n0\r\n\r\n".encode()), 400, "invalid chunk size"),
    "chunk-data-without-crlf": (post(TE, b"5\r\nhello0\r\n\r\n"), 400, "not followed by CRLF"),
    "chunk-data-longer-than-size": (post(TE, b"3\r\nhello\r\n0\r\n\r\n"), 400, "not followed by CRLF"),
    "chunk-ext-bare-cr": (post(TE, b"5;a=b\rc\r\nhello\r\n0\r\n\r\n"), 400, "invalid chunk size"),
    "chunk-ext-huge": (post(TE, b"5;" + b"a" * 5000 + b"\r\nhello\r\n0\r\n\r\n"), 400, "chunk-size line too long"),
    "trailer-obs-fold": (post(TE, b"0\r\nX-A: 1\r\n 2\r\n\r\n"), 400, "trailer section: obsolete line folding"),
    "trailer-bare-cr": (post(TE, b"0\r\nX-A: 1\rContent-Length: 5\r\n\r\n"), 400, "trailer section: bare CR"),
    # targets a proxy cannot take
    "userinfo-in-target": (b"GET http://u@{o}/refused?tag=userinfo HTTP/1.1\r\nHost: {o}\r\n\r\n", 400, "userinfo"),
    "origin-form-on-a-proxy": (b"GET /refused?tag=originform HTTP/1.1\r\nHost: {o}\r\n\r\n", 400, "absolute http:// URL"),
}


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_refused_request_never_reaches_the_origin(proxy, recording, name):
    data, status, why = REFUSED[name]
    before_records = len(proxy.records())
    before = recording.total()
    reply = raw_exchange(proxy.http_port, data.replace(b"{o}", recording.authority.encode()))
    assert reply.startswith(b"HTTP/1.1 %d " % status), reply[:200]
    assert b"\r\nConnection: close\r\n" in reply            # and the proxy closed: raw_exchange read EOF
    record = record_after(proxy, before_records, lambda r: r["status"] == status)
    assert record["error"].startswith("protocol: ")
    assert why in record["error"], record["error"]
    assert why in proxy.proc.output()                        # the debug log line says it too
    assert recording.total() == before                      # not a byte, not a connection


def test_refusal_leaves_other_client_connections_alone(proxy, recording):
    """A keep-alive connection opened before a refusal serves its next request afterwards."""
    with socket.create_connection(("127.0.0.1", proxy.http_port), timeout=10) as keep:
        keep.sendall(f"GET http://{recording.authority}/alive?n=1 HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        first = keep.recv(65536)
        assert first.startswith(b"HTTP/1.1 200 ")
        raw_exchange(proxy.http_port, REFUSED["cl-then-te"][0].replace(b"{o}", recording.authority.encode()))
        keep.sendall(f"GET http://{recording.authority}/alive?n=2 HTTP/1.1\r\nHost: x\r\n"
                     "Connection: close\r\n\r\n".encode())
        second = read_to_eof(keep)
    assert second.startswith(b"HTTP/1.1 200 ") and b"conn=" in second
    forwarded(recording, "/alive?n=2")
    proxy.wait_record(lambda r: r["target"].endswith("/alive?n=2"))


def test_bad_chunk_after_forwarded_chunks_never_completes_at_the_origin(proxy, recording):
    """The head and a good chunk are on their way before a bad one arrives: the origin connection
    is reset, so the origin never reads a complete request, and the client gets a 400."""
    with socket.create_connection(("127.0.0.1", proxy.http_port), timeout=10) as s:
        s.sendall(f"POST http://{recording.authority}/late-bad-chunk HTTP/1.1\r\nHost: x\r\n"
                  "Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n".encode())
        n, _ = recording.find(b"/late-bad-chunk ", then=b"hello")   # the first chunk is there
        s.sendall(b"5\r\nworld\r\n0x5\r\n")
        reply = read_to_eof(s)
    assert reply.startswith(b"HTTP/1.1 400 ") and b"invalid chunk size" in reply
    record = proxy.wait_record(lambda r: r["target"].endswith("/late-bad-chunk"))
    assert record["status"] == 400 and "invalid chunk size" in record["error"]
    recording.wait_closed(n)
    data = recording.connections()[n]
    conn = h11.Connection(h11.SERVER)
    conn.receive_data(data[data.index(b"POST"):])
    conn.receive_data(b"")
    events = []
    with pytest.raises(h11.RemoteProtocolError):
        for _ in range(100):
            events.append(type(conn.next_event()))
    assert h11.EndOfMessage not in events


# --- requests forwarded in canonical form ----------------------------------------------------

def req(method: str, tag: str, fields: bytes, body: bytes = b"", eol: bytes = b"\r\n",
        target: str = "http://{o}") -> bytes:
    line = f"{method} {target}/fwd?tag={tag} HTTP/1.1".encode()
    head = eol.join([line, b"Host: {o}", *[f for f in fields.split(b"\r\n") if f], b"Connection: close"])
    return head + eol + eol + body


# name -> (request, expected body, expected trailers)
FORWARDED = {
    "cl-plain": (req("POST", "cl-plain", b"Content-Length: 5", b"hello"), "hello", []),
    "cl-same-twice": (req("POST", "cl-same-twice", b"Content-Length: 5\r\nContent-Length: 5", b"hello"), "hello", []),
    "cl-same-in-a-list": (req("POST", "cl-same-list", b"Content-Length: 5, 5", b"hello"), "hello", []),
    "cl-leading-zeros": (req("POST", "cl-zeros", b"Content-Length: 0005", b"hello"), "hello", []),
    "cl-tabs-around": (req("POST", "cl-tabs", b"Content-Length:\t5\t", b"hello"), "hello", []),
    "cl-zero-twice-on-get": (req("GET", "cl-zero-twice", b"Content-Length: 0\r\nContent-Length: 0"), "", []),
    "cl-named-by-connection": (req("POST", "cl-conn", b"Connection: Content-Length\r\nContent-Length: 5",
                                   b"hello"), "hello", []),
    "te-odd-case": (req("POST", "te-case", b"transfer-ENCODING: ChUnKeD", b"5\r\nhello\r\n0\r\n\r\n"), "hello", []),
    "te-with-ows": (req("POST", "te-ows", b"Transfer-Encoding:  \tchunked \t", b"5\r\nhello\r\n0\r\n\r\n"), "hello", []),
    "te-named-by-connection": (req("POST", "te-conn", b"Connection: Transfer-Encoding\r\nTransfer-Encoding: chunked",
                                   b"5\r\nhello\r\n0\r\n\r\n"), "hello", []),
    "te-empty-value": (req("GET", "te-empty", b"Transfer-Encoding: ", b"0\r\n\r\n"), "", []),
    "chunk-extensions-dropped": (req("POST", "chunk-ext", b"Transfer-Encoding: chunked",
                                     b"5;name=\"v;x\";flag\r\nhello\r\n0;last\r\n\r\n"), "hello", []),
    "chunk-upper-hex-and-zeros": (req("POST", "chunk-hex", b"Transfer-Encoding: chunked",
                                      b"000A\r\n0123456789\r\n0000\r\n\r\n"), "0123456789", []),
    "chunk-bws-before-ext": (req("POST", "chunk-bws", b"Transfer-Encoding: chunked",
                                 b"5 ;a=1\r\nhello\r\n0\r\n\r\n"), "hello", []),
    "bare-lf-head": (req("POST", "bare-lf", b"Content-Length: 5", b"hello", eol=b"\n"), "hello", []),
    "bare-lf-chunked": (req("POST", "bare-lf-chunks", b"Transfer-Encoding: chunked",
                            b"5\nhello\n0\nX-Sum: 1\n\n"), "hello", [["X-Sum", "1"]]),
    "trailers-carrying-framing": (req("POST", "trailer-framing", b"Transfer-Encoding: chunked\r\nTE: trailers",
                                      b"5\r\nhello\r\n0\r\nContent-Length: 99\r\nTransfer-Encoding: chunked\r\n"
                                      b"Host: elsewhere.invalid\r\nX-Sum: 1\r\n\r\n"), "hello", [["X-Sum", "1"]]),
    "absolute-form-beats-host": (req("GET", "abs-host", b"Host: elsewhere.invalid"), "", []),
    "absolute-form-upper-case": (req("GET", "abs-upper", b"", target="HTTP://{o}"), "", []),
}


@pytest.mark.parametrize("name", sorted(FORWARDED))
def test_forwarded_request_is_canonical_for_two_parsers(proxy, recording, name):
    data, body, trailers = FORWARDED[name]
    reply = raw_exchange(proxy.http_port, data.replace(b"{o}", recording.authority.encode()))
    assert reply.startswith(b"HTTP/1.1 200 "), reply[:300]
    target = re.search(rb"/fwd\?tag=[\w-]+", data).group().decode()
    _, raw, message = forwarded(recording, target)
    proxy.wait_record(lambda r: r["target"].endswith(target))
    assert message["body"] == body and message["trailers"] == trailers
    assert message["method"] == data.split(b" ", 1)[0].decode()


# --- Expect: 100-continue, answered before the body ------------------------------------------

@pytest.mark.parametrize("name,status", [("early417", 417), ("early403", 403)])
def test_early_final_answer_to_expect_100_continue(proxy, recording, name, status):
    """The origin answers before reading the body: the client gets that answer and a closed
    connection, the body is never sent, and the origin connection is not used again."""
    tag = f"expect-{name} ".encode()
    with socket.create_connection(("127.0.0.1", proxy.http_port), timeout=10) as s:
        s.sendall(f"POST http://{recording.authority}/hostile/{name}?{tag.decode()}HTTP/1.1\r\n"
                  "Host: x\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\n".encode())
        reply = read_to_eof(s)                            # the proxy closes: the body never came
    answer = h11_response(reply, "POST")
    assert answer["status"] == status and answer["complete"], answer
    assert ["Connection", "close"] in answer["headers"]
    record = proxy.wait_record(lambda r: tag.decode().strip() in r["target"])
    assert record["status"] == status
    n, data = recording.find(tag)
    recording.wait_closed(n)
    assert data.endswith(b"\r\n\r\n") and b"Expect: 100-continue" in data      # head only
    assert probe(proxy, recording, name) != n


# --- hostile origin responses ----------------------------------------------------------------

def probe(proxy: Appliance, recording: Recording, after: str) -> int:
    """A good request after a hostile exchange; the origin connection that carried it."""
    reply = raw_exchange(proxy.http_port, f"GET http://{recording.authority}/probe?after={after} HTTP/1.1\r\n"
                                          "Host: x\r\nConnection: close\r\n\r\n".encode())
    answer = h11_response(reply)
    assert answer["status"] == 200 and answer["complete"] and answer["body"].startswith("conn="), reply
    n, _ = recording.find(f"after={after} ".encode())
    assert answer["body"] == f"conn={n}"
    proxy.wait_record(lambda r: r["target"].endswith(f"after={after}"))
    return n


def hostile(proxy: Appliance, recording: Recording, name: str) -> tuple[int, bytes, dict]:
    before_records = len(proxy.records())
    reply = raw_exchange(proxy.http_port, f"GET http://{recording.authority}/hostile/{name} HTTP/1.1\r\n"
                                          "Host: x\r\nConnection: close\r\n\r\n".encode())
    n, _ = recording.find(f"/hostile/{name} ".encode())
    record = record_after(proxy, before_records, lambda r: r["target"].endswith(f"/hostile/{name}"))
    return n, reply, record


BAD_GATEWAY = {
    "two-cl": "conflicting Content-Length", "cl-list": "conflicting Content-Length",
    "cl-plus": "invalid Content-Length", "cl-arabic": "invalid Content-Length",
    "cl-space-colon": "invalid header name", "obs-fold": "obs-fold", "bare-cr": "bare CR",
    "nul": "invalid characters", "bad-chunk-size": "invalid chunk size", "chunk-0x": "invalid chunk size",
    "chunk-negative": "invalid chunk size", "chunk-no-crlf": "not followed by CRLF",
}


@pytest.mark.parametrize("name", sorted(BAD_GATEWAY))
def test_malformed_origin_response_is_a_502(proxy, recording, name):
    n, reply, record = hostile(proxy, recording, name)
    answer = h11_response(reply)
    assert answer["status"] == 502 and answer["complete"], reply[:300]
    assert BAD_GATEWAY[name] in answer["body"]
    assert record["status"] == 502 and record["error"].startswith("protocol: origin response")
    recording.wait_closed(n)
    assert probe(proxy, recording, name) != n


# name -> body the client gets, complete, from a response whose connection must not be reused
AMBIGUOUS = {
    "cl-te": "abc",              # Transfer-Encoding wins; Content-Length removed before forwarding
    "te-cl": "abc",
    "te-lookalike": "abcdef",    # not chunked: read until close
    "longer-than-cl": "abc",     # the excess is never a next response
    "bytes-after": "abc",
}


def client_reads(reply: bytes) -> dict:
    """The response as h11 and llhttp read it; they must agree."""
    mine, theirs = h11_response(reply), node_parse(reply, "response")
    assert len(theirs["messages"]) == 1, theirs
    node = theirs["messages"][0]
    assert (node["status"], node["headers"], node["body"], node["complete"]) == \
        (mine["status"], mine["headers"], mine["body"], mine["complete"]), (node, mine)
    return mine


@pytest.mark.parametrize("name", sorted(AMBIGUOUS))
def test_ambiguous_origin_response_is_reframed_and_its_connection_dropped(proxy, recording, name):
    n, reply, _ = hostile(proxy, recording, name)
    answer = client_reads(reply)
    assert answer["status"] == 200 and answer["complete"] and answer["body"] == AMBIGUOUS[name]
    names = [k.lower() for k, _ in answer["headers"]]
    assert names.count("content-length") + names.count("transfer-encoding") == 1, answer["headers"]
    recording.wait_closed(n)
    assert probe(proxy, recording, name) != n


def test_same_content_length_twice_reaches_the_client_once(proxy, recording):
    _, reply, _ = hostile(proxy, recording, "same-cl-twice")
    answer = client_reads(reply)
    assert answer["complete"] and answer["body"] == "abc"
    assert [k for k, _ in answer["headers"]].count("Content-Length") == 1


def test_bytes_sent_later_after_a_response_are_never_the_next_response(proxy, recording):
    """Unasked-for bytes arriving on an idle pooled connection: the pool drops it."""
    n, reply, _ = hostile(proxy, recording, "bytes-after-later")
    assert client_reads(reply)["body"] == "abc"
    data_before = recording.connections()[n]
    later = time.monotonic() + 5
    for _ in range(250):                          # the origin's extra bytes have gone out
        if (recording.root / f"conn-{n}.late").exists() or time.monotonic() > later:
            break
        time.sleep(0.02)
    assert (recording.root / f"conn-{n}.late").exists()
    assert probe(proxy, recording, "bytes-after-later") != n
    assert recording.connections()[n] == data_before     # the probe never went there
    recording.wait_closed(n)


@pytest.mark.parametrize("name", ["chunked-cut", "short-body", "bad-chunk-later"])
def test_truncated_origin_response_never_looks_complete(proxy, recording, name):
    n, reply, record = hostile(proxy, recording, name)
    answer = h11_response(reply)
    if answer.get("status") == 502:                    # broken before a byte went to the client
        assert answer["complete"]
    else:
        assert answer["status"] == 200 and not answer["complete"], answer
        theirs = node_parse(reply, "response")
        assert theirs["error"] is not None or not theirs["messages"][0]["complete"], theirs
    assert record["error"], record
    recording.wait_closed(n)
    assert probe(proxy, recording, name) != n


def test_trailers_carrying_framing_are_not_forwarded_to_the_client(proxy, recording):
    with socket.create_connection(("127.0.0.1", proxy.http_port), timeout=10) as s:
        s.sendall(f"GET http://{recording.authority}/hostile/trailer-framing HTTP/1.1\r\nHost: x\r\n"
                  "TE: trailers\r\nConnection: close\r\n\r\n".encode())
        reply = read_to_eof(s)
    tail = reply[reply.index(b"\r\n0\r\n") + 2:]
    assert tail == b"0\r\nX-Sum: 1\r\n\r\n", reply
    proxy.wait_record(lambda r: r["target"].endswith("/hostile/trailer-framing"))
    answer = client_reads(reply)
    assert answer["complete"] and answer["body"] == "abc"
