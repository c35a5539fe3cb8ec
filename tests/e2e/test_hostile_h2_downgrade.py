"""HTTP/2 → HTTP/1.1 downgrade (hostile-input suite, issue 10, group 2), against the real appliance.

Every HTTP/2 request the appliance takes is written to an HTTP/1.1 origin, so what h2 would let
through (it runs with inbound validation off, on 4.1 and 4.4 alike: `protocols/h2_mapping.py`
checks instead) must not reach the origin in a form an HTTP/1.1 parser reads differently. A
recording origin (`recording_origin.py`) keeps the exact bytes of every connection:

- a malformed request (CR, LF, NUL or space in a pseudo-header or a field, uppercase or non-token
  names, framing fields, connection-specific fields, a second or different host, `:protocol`
  where it does not belong, malformed CONNECT and extended CONNECT) is reset on its own stream
  with PROTOCOL_ERROR, with an access-log line saying why; not a byte reaches the origin, and a
  sibling stream in flight on the same connection and a later one are served;
- a request that is well-formed but unusual is forwarded in canonical form (h11 and llhttp read
  it alike, one Host, one framing field; the checks of `test_hostile_http1_smuggling.forwarded`);
- hostile origin responses reach the HTTP/2 client as a 502 (broken framing in the head, origin
  connection closed) or with one content-length only when the body is framed by length.

Not covered here: `:protocol` without SETTINGS_ENABLE_CONNECT_PROTOCOL cannot happen (the
appliance always advertises it; asserted), so `:protocol` on other methods and with an unknown
value stand in for it.
"""

from __future__ import annotations

import time

import pytest
from h2.errors import ErrorCodes
from h2.settings import SettingCodes

from .conftest import Appliance
from .h2_raw_client import H2RawClient
from .test_hostile_http1_smuggling import Recording, forwarded, h11_request, recording  # noqa: F401


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    appliance = Appliance(tmp_path_factory.mktemp("h2downgrade"), "[upstream]\nresponse_timeout = 5.0\n").start()
    try:
        yield appliance
    finally:
        appliance.stop()


def client(app) -> H2RawClient:
    return H2RawClient(app.https_port, app.ca_path)


def block(authority: str, path: str, *extra, method: str = "GET", scheme: str = "http") -> list:
    return [(":method", method), (":scheme", scheme), (":authority", authority), (":path", path), *extra]


def new_record(app: Appliance, seen: int, predicate, timeout: float = 10.0) -> dict:
    """The one access-log record after the first `seen` for which `predicate` holds (waiting)."""
    deadline = time.monotonic() + timeout
    for _ in range(int(timeout / 0.05) + 1):
        found = [r for r in app.records()[seen:] if predicate(r)]
        if found:
            assert len(found) == 1, found
            return found[0]
        if time.monotonic() > deadline:
            break
        time.sleep(0.05)
    raise AssertionError(f"no matching access-log record in {app.records()[seen:]}")


def targets_since(recording: Recording, before: dict[int, bytes]) -> list[str]:
    """The request targets the origin received since `before` (a `connections()` snapshot),
    every byte of them read by h11 as whole requests: a partial request fails here."""
    out = []
    for n, data in sorted(recording.connections().items()):
        new = data[len(before.get(n, b"")):]
        for _ in range(100):
            if not new:
                break
            message, new = h11_request(new)
            out.append(message["target"])
    return sorted(out)


def served(c: H2RawClient, sid: int) -> int:
    """A good stream's answer from the recording origin: the origin connection that carried it."""
    r = c.response(sid)
    assert r.status == 200 and r.ended and bytes(r.body).startswith(b"conn="), r
    return int(bytes(r.body)[5:])


# --- malformed requests: reset on their stream, never forwarded ------------------------------

def _bad(*extra, path: str = "/bad", **kw):
    return lambda a: block(a, path, *extra, **kw)


def _pseudo(name: str, value):
    """A good block with one pseudo-header's value replaced (`value` may use the authority)."""
    def make(a):
        return [(k, (value(a) if callable(value) else value) if k == name else v) for k, v in block(a, "/bad")]
    return make


def _without(*names, method: str = "CONNECT", protocol: str | None = None):
    def make(a):
        full = [(":method", method)] + ([(":protocol", protocol)] if protocol else []) + \
            [(":scheme", "http"), (":authority", a), (":path", "/ws")]
        return [(k, v) for k, v in full if k not in names] + [("sec-websocket-version", "13")]
    return make


def ctl(c: str) -> str:
    return f"control character {c!r} in the value of"


# name: (header block for the recording origin's authority, what the access log says)
MALFORMED = {
    # CR, LF, NUL and space in pseudo-header values (RFC 9113 §8.2.1, §8.3)
    ":method with CR": (_pseudo(":method", "GE\rT"), ctl("\r") + " ':method'"),
    ":method with LF": (_pseudo(":method", "GET\n"), ctl("\n") + " ':method'"),
    ":method with NUL": (_pseudo(":method", "G\x00ET"), ctl("\x00") + " ':method'"),
    ":method with space": (_pseudo(":method", "G T"), "invalid :method 'G T'"),
    ":path with CR": (_pseudo(":path", "/bad?a\rb"), ctl("\r") + " ':path'"),
    ":path with LF": (_pseudo(":path", "/bad?a\nHost: x"), ctl("\n") + " ':path'"),
    ":path with NUL": (_pseudo(":path", "/bad?a\x00b"), ctl("\x00") + " ':path'"),
    ":authority with CR": (_pseudo(":authority", lambda a: a + "\r"), ctl("\r") + " ':authority'"),
    ":authority with LF": (_pseudo(":authority", lambda a: a + "\nX: y"), ctl("\n") + " ':authority'"),
    ":authority with NUL": (_pseudo(":authority", lambda a: "x\x00" + a), ctl("\x00") + " ':authority'"),
    ":authority with space": (_pseudo(":authority", lambda a: a.replace(":", " :")), ":authority: invalid host"),
    ":scheme with CR": (_pseudo(":scheme", "http\r"), ctl("\r") + " ':scheme'"),
    ":scheme with LF": (_pseudo(":scheme", "ht\ntp"), ctl("\n") + " ':scheme'"),
    ":scheme with NUL": (_pseudo(":scheme", "http\x00"), ctl("\x00") + " ':scheme'"),
    "duplicate :path": (lambda a: [(":method", "GET"), (":scheme", "http"), (":authority", a), (":path", "/bad"),
                                   (":path", "/other")], "duplicate :path"),
    "unknown pseudo-header": (lambda a: [(":foo", "1")] + block(a, "/bad"), "pseudo-header field ':foo' is not allowed"),
    "uppercase pseudo-header": (lambda a: [(":method", "GET"), (":scheme", "http"), (":authority", a),
                                           (":PATH", "/bad")], "pseudo-header field ':PATH' is not allowed"),
    # ordinary values: control characters and edge whitespace
    "value with trailing space": (_bad(("x-trail", "1 ")), "whitespace in the value of 'x-trail'"),
    "value with leading tab": (_bad(("x-tab", "\t1")), "whitespace in the value of 'x-tab'"),
    "value with vertical tab": (_bad(("x-vt", "1\x0b2")), ctl("\x0b") + " 'x-vt'"),
    "value with DEL": (_bad(("x-del", "1\x7f")), ctl("\x7f") + " 'x-del'"),
    "value with CRLF and a field": (_bad(("x-split", "1\r\nContent-Length: 5")), ctl("\r") + " 'x-split'"),
    # field names: uppercase and non-tokens (RFC 9113 §8.2.1, RFC 9110 §5.1)
    "uppercase Content-Length": (_bad(("Content-Length", "0")), "uppercase field name 'Content-Length'"),
    "name with CR": (_bad(("x-a\rb", "1")), "invalid field name 'x-a\\rb'"),
    "name with LF": (_bad(("x-a\nb", "1")), "invalid field name 'x-a\\nb'"),
    "name with space": (_bad(("a b", "1")), "invalid field name 'a b'"),
    "name with parentheses": (_bad(("x(y)", "1")), "invalid field name 'x(y)'"),
    "name with a colon": (_bad(("x:y", "1")), "invalid field name 'x:y'"),
    "empty name": (_bad(("", "1")), "invalid field name ''"),
    # framing fields
    "two different content-lengths": (_bad(("content-length", "0"), ("content-length", "5"), method="POST"),
                                      "conflicting content-length fields"),
    "content-length with a sign": (_bad(("content-length", "+0"), method="POST"), "invalid content-length '+0'"),
    "content-length list": (_bad(("content-length", "0, 0"), method="POST"), "invalid content-length '0, 0'"),
    "content-length in hex": (_bad(("content-length", "0x0"), method="POST"), "invalid content-length '0x0'"),
    "content-length on a stream without DATA": (_bad(("content-length", "5"), method="POST"),
                                                "stream ended after 0 of 5 content-length bytes"),
    "transfer-encoding identity": (_bad(("transfer-encoding", "identity")),
                                   "connection-specific field 'transfer-encoding'"),
    "transfer-encoding gzip": (_bad(("transfer-encoding", "gzip")), "connection-specific field 'transfer-encoding'"),
    "transfer-encoding empty": (_bad(("transfer-encoding", "")), "connection-specific field 'transfer-encoding'"),
    "te: trailers, gzip": (_bad(("te", "trailers, gzip")), "only te: trailers"),
    # host
    "host with another port": (lambda a: block(a, "/bad", ("host", a.split(":")[0] + ":1")),
                               "does not match :authority"),
    "two equal host fields": (lambda a: block(a, "/bad", ("host", a), ("host", a)), "more than one host field"),
    # :protocol where it does not belong (RFC 8441 §4)
    ":protocol on GET": (_without(method="GET", protocol="websocket"), ":protocol in a GET request"),
    ":protocol on POST": (_without(method="POST", protocol="websocket"), ":protocol in a POST request"),
    # ordinary CONNECT (RFC 9113 §8.5)
    "CONNECT with :scheme": (lambda a: [(":method", "CONNECT"), (":scheme", "http"), (":authority", a)],
                             ":scheme in a CONNECT request"),
    "CONNECT without :authority": (lambda a: [(":method", "CONNECT")], "CONNECT without :authority"),
    "CONNECT with only a host field": (lambda a: [(":method", "CONNECT"), ("host", a)], "CONNECT without :authority"),
    "CONNECT with userinfo": (lambda a: [(":method", "CONNECT"), (":authority", "user:pw@" + a)], "userinfo"),
    "CONNECT without a port": (lambda a: [(":method", "CONNECT"), (":authority", a.split(":")[0])], "port missing"),
    "CONNECT to port 0": (lambda a: [(":method", "CONNECT"), (":authority", a.split(":")[0] + ":0")], "invalid port"),
    # extended CONNECT (RFC 8441 §4)
    "extended CONNECT without :path": (_without(":path", protocol="websocket"), "extended CONNECT without :path"),
    "extended CONNECT without :scheme": (_without(":scheme", protocol="websocket"),
                                         "extended CONNECT without :scheme"),
    "extended CONNECT without :authority": (_without(":authority", protocol="websocket"),
                                            "extended CONNECT without :authority"),
    "extended CONNECT with :path *": (lambda a: [(":method", "CONNECT"), (":protocol", "websocket"), (":scheme", "http"),
                                                 (":authority", a), (":path", "*")], "must start with /"),
    ":protocol with CR": (lambda a: [(":method", "CONNECT"), (":protocol", "websocket\r"), (":scheme", "http"),
                                     (":authority", a), (":path", "/ws")], ctl("\r") + " ':protocol'"),
}

@pytest.mark.parametrize("name", list(MALFORMED))
def test_malformed_request_is_reset_alone_and_never_reaches_the_origin(app, recording, name):
    make_block, why = MALFORMED[name]
    authority = recording.authority
    slug = "".join(ch if ch.isalnum() else "-" for ch in name)
    seen, before = len(app.records()), recording.connections()
    with client(app) as c:
        # a sibling in flight across the reset: its head is at the origin, its body still to come
        sibling = c.request(block(authority, f"/good?sibling={slug}", method="POST"), end=False)
        bad = c.request(make_block(authority))
        r = c.response(bad)
        assert (r.status, r.reset) == (None, ErrorCodes.PROTOCOL_ERROR), r
        c.data(sibling, b"hello", end=True)
        served(c, sibling)
        served(c, c.get(f"http://{authority}/good?after={slug}"))
        assert c.goaway_code is None and not c.closed
    record = new_record(app, seen, lambda r: why in (r.get("error") or ""))
    assert record["status"] == 400 and record["error"].startswith("protocol: "), record
    assert targets_since(recording, before) == sorted([f"/good?sibling={slug}", f"/good?after={slug}"])


def test_content_length_zero_with_data_is_reset_before_the_origin(app, recording):
    seen, before = len(app.records()), recording.connections()
    with client(app) as c:
        r = c.response(c.request(block(recording.authority, "/bad?cl0", ("content-length", "0"), method="POST"),
                                 body=b"smuggled"))
        assert (r.status, r.reset) == (None, ErrorCodes.PROTOCOL_ERROR), r
        served(c, c.get(f"http://{recording.authority}/good?after=cl0"))
    record = new_record(app, seen, lambda r: "DATA on a request whose HEADERS ended" in (r.get("error") or "")
                        or "more DATA than content-length 0" in (r.get("error") or ""))
    assert record["status"] == 400
    assert targets_since(recording, before) == ["/good?after=cl0"]


def test_unknown_protocol_is_answered_501_and_connect_protocol_is_advertised(app, recording):
    seen, before = len(app.records()), recording.connections()
    with client(app) as c:
        assert c.server_settings[SettingCodes.ENABLE_CONNECT_PROTOCOL] == 1
        r = c.response(c.request([(":method", "CONNECT"), (":protocol", "x-unknown"), (":scheme", "http"),
                                  (":authority", recording.authority), (":path", "/ws"),
                                  ("sec-websocket-version", "13")], end=False))
        assert r.status == 501 and b"only websocket" in bytes(r.body), r
        served(c, c.get(f"http://{recording.authority}/good?after=protocol"))
    record = new_record(app, seen, lambda r: "x-unknown" in (r.get("error") or ""))
    assert record["status"] == 501
    assert targets_since(recording, before) == ["/good?after=protocol"]


# --- unusual but well-formed: forwarded in canonical form ------------------------------------

# name: (extra fields, DATA pieces or None for HEADERS with END_STREAM, what the origin must see)
FORWARDED = {
    "space and tab inside a value": ([("x-sp", "a b\tc")], None, [["x-sp", "a b\tc"]]),
    "obs-text in a value": ([("x-latin", b"caf\xe9")], None, [["x-latin", "caf\xe9"]]),
    "the same content-length twice": ([("content-length", "5"), ("content-length", "5")], [b"hel", b"lo"],
                                      [["content-length", "5"]]),
    "host equal to :authority": ([("host", "{a}")], None, []),
    "te: trailers": ([("te", "trailers")], None, [["TE", "trailers"]]),
    "cookie crumbs": ([("cookie", "a=1"), ("cookie", "b=2")], None, [["cookie", "a=1; b=2"]]),
    "body without content-length": ([], [b"hel", b"lo"], [["Transfer-Encoding", "chunked"]]),
}


@pytest.mark.parametrize("name", list(FORWARDED))
def test_unusual_request_is_forwarded_canonically(app, recording, name):
    extra, pieces, expected = FORWARDED[name]
    slug = "".join(ch if ch.isalnum() else "-" for ch in name)
    target = f"/fwd?case={slug}"
    fields = [(k, v.replace("{a}", recording.authority) if isinstance(v, str) else v) for k, v in extra]
    with client(app) as c:
        sid = c.request(block(recording.authority, target, *fields, method="POST" if pieces else "GET"),
                        end=pieces is None)
        for i, piece in enumerate(pieces or ()):
            c.data(sid, piece, end=i == len(pieces) - 1)
        served(c, sid)
    _, _, message = forwarded(recording, target)
    assert message["body"] == ("hello" if pieces else "")
    for field in expected:
        assert field in message["headers"], (field, message["headers"])
    app.wait_record(lambda r: r["target"].endswith(target))


def test_request_trailers_reach_the_origin_without_framing_or_routing_fields(app, recording):
    """Fix (a): trailers are passed on as an HTTP/1.1 proxy passes them (`forwardable_trailers`):
    a content-length, host or cookie in a trailer section must not reach a next hop that merges
    trailers into the head."""
    target = "/fwd?case=trailers"
    with client(app) as c:
        sid = c.request(block(recording.authority, target, ("te", "trailers"), method="POST"), end=False)
        c.data(sid, b"hello")
        c.trailers(sid, [("x-sum", "1"), ("content-length", "99"), ("host", "elsewhere.invalid"),
                         ("cookie", "a=1"), ("x-other", "2")])
        served(c, sid)
    _, _, message = forwarded(recording, target)
    assert message["body"] == "hello" and message["trailers"] == [["x-sum", "1"], ["x-other", "2"]]


@pytest.mark.parametrize("version", [None, "13"], ids=["without sec-websocket-version", "version 13"])
def test_websocket_handshake_answered_200_by_the_origin_is_a_502(app, recording, version):
    """RFC 8441 §5: a 2xx to an extended CONNECT opens the WebSocket; an origin that answered the
    handshake with a plain 200 did not switch, so the client gets a 502, not a tunnel. Without
    sec-websocket-version the origin still gets a canonical handshake (version 13, once: the
    RFC 8441 mapping in h2_mapping defaults it)."""
    target = f"/ws?version={version}"
    seen = len(app.records())
    with client(app) as c:
        r = c.response(c.request([(":method", "CONNECT"), (":protocol", "websocket"), (":scheme", "http"),
                                  (":authority", recording.authority), (":path", target)]
                                 + ([("sec-websocket-version", version)] if version else []), end=False))
        assert r.status == 502 and b"origin answered 200 to the WebSocket handshake" in bytes(r.body), r
    n, data = recording.find(f" {target} HTTP/1.1\r\n".encode())
    message, rest = h11_request(data)
    assert rest == b"" and message["method"] == "GET" and message["target"] == target
    names = [k.lower() for k, _ in message["headers"]]
    assert names.count("sec-websocket-version") == 1 and ["Sec-WebSocket-Version", "13"] in message["headers"]
    assert names.count("host") == 1 and ["Upgrade", "websocket"] in message["headers"]
    recording.wait_closed(n)
    record = new_record(app, seen, lambda r: r.get("kind") == "websocket")
    assert record["status"] == 502


# --- hostile origin responses toward an HTTP/2 client ----------------------------------------

@pytest.mark.parametrize("name,why", [("two-cl", "conflicting Content-Length"),
                                      ("cl-list", "conflicting Content-Length"),
                                      ("cl-plus", "invalid Content-Length")])
def test_origin_response_with_broken_framing_is_a_502_and_its_connection_closed(app, recording, name, why):
    """Fix (b): the framing is read before anything goes to the client; a broken one is a 502 on
    the stream, and the origin connection is closed (never pooled, never left open)."""
    seen = len(app.records())
    with client(app) as c:
        r = c.response(c.get(f"http://{recording.authority}/hostile/{name}"))
        assert r.status == 502 and why in bytes(r.body).decode(), r
        n, _ = recording.find(f"/hostile/{name} ".encode())
        recording.wait_closed(n)
        assert served(c, c.get(f"http://{recording.authority}/good?after={name}")) != n
    record = new_record(app, seen, lambda r: r["target"].endswith(f"/hostile/{name}"))
    assert record["status"] == 502 and why in record["error"]


# name: body the HTTP/2 client gets, and the one content-length it may see (None: none)
REFRAMED = {
    "same-cl-twice": ("abc", "3"),
    "cl-te": ("abc", None),
    "te-cl": ("abc", None),
    "te-lookalike": ("abcdef", None),
    "longer-than-cl": ("abc", "3"),
}


@pytest.mark.parametrize("name", list(REFRAMED))
def test_origin_response_reaches_the_h2_client_with_one_true_content_length(app, recording, name):
    """Fix (c): the response fields are those an HTTP/1.1 client would get (`response_fields`):
    one content-length, only when the body is framed by length, and it matches the DATA."""
    body, length = REFRAMED[name]
    with client(app) as c:
        r = c.response(c.get(f"http://{recording.authority}/hostile/{name}"))
        assert r.status == 200 and r.ended and bytes(r.body) == body.encode(), r
        lengths = [v for k, v in r.headers if k == b"content-length"]
        assert lengths == ([length.encode()] if length else []), r.headers
        assert not [k for k, _ in r.headers if k == b"transfer-encoding"]
    app.wait_record(lambda r: r["target"].endswith(f"/hostile/{name}"))
