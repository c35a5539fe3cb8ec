"""`appliance.protocols.tls_clienthello` against real ClientHellos (RFC 8446 §4.1.2, §5.1).

Fixtures are made offline by the stdlib `ssl` module (OpenSSL) over memory BIOs, so they are the
bytes a real client sends. Broken hellos are built by hand from the same grammar.
"""

from __future__ import annotations

import ssl

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from appliance.protocols.tls_clienthello import (
    ClientHello,
    MalformedHello,
    NotTls,
    read_client_hello,
)

FUZZ = settings(max_examples=300, deadline=None)


def real_hello(server_hostname: str | None = "www.example.com", *, alpn: list[str] | None = None,
               maximum: ssl.TLSVersion | None = None,
               minimum: ssl.TLSVersion | None = None) -> bytes:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    if server_hostname is None:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    if alpn:
        ctx.set_alpn_protocols(alpn)
    if maximum:
        ctx.maximum_version = maximum
    if minimum:
        ctx.minimum_version = minimum
    outgoing = ssl.MemoryBIO()
    tls = ctx.wrap_bio(ssl.MemoryBIO(), outgoing, server_hostname=server_hostname)
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


def record(fragment: bytes, content_type: int = 22, version: bytes = b"\x03\x01") -> bytes:
    return bytes([content_type]) + version + len(fragment).to_bytes(2, "big") + fragment


def handshake_message(hello: bytes) -> bytes:
    """The handshake message of a hello that OpenSSL sent in one record."""
    assert hello[0] == 22 and int.from_bytes(hello[3:5], "big") == len(hello) - 5
    return hello[5:]


def reframe(message: bytes, cuts: list[int]) -> bytes:
    """The handshake message re-framed into records that end at `cuts`."""
    bounds = [0, *sorted(set(cuts)), len(message)]
    return b"".join(record(message[a:b]) for a, b in zip(bounds, bounds[1:]) if b > a)


def u8v(data: bytes) -> bytes:
    return len(data).to_bytes(1, "big") + data


def u16v(data: bytes) -> bytes:
    return len(data).to_bytes(2, "big") + data


def ext(ext_type: int, data: bytes) -> bytes:
    return ext_type.to_bytes(2, "big") + u16v(data)


def sni_ext(name: bytes, name_type: int = 0) -> bytes:
    return ext(0, u16v(bytes([name_type]) + u16v(name)))


def built_hello(extensions: list[bytes] | None, *, version: int = 0x0303, session_id: bytes = b"",
                suites: bytes = b"\x13\x01\xc0\x2f", compression: bytes = b"\x00",
                handshake_type: int = 1) -> bytes:
    body = (version.to_bytes(2, "big") + bytes(32) + u8v(session_id) + u16v(suites)
            + u8v(compression))
    if extensions is not None:
        body += u16v(b"".join(extensions))
    return record(bytes([handshake_type]) + len(body).to_bytes(3, "big") + body)


HOST = real_hello("www.example.com")
NO_SNI = real_hello(None)
ALPN = real_hello("h2.example", alpn=["h2", "http/1.1"])
TLS12 = real_hello("old.example", maximum=ssl.TLSVersion.TLSv1_2)
TLS13 = real_hello("new.example", minimum=ssl.TLSVersion.TLSv1_3)
REAL = [HOST, NO_SNI, ALPN, TLS12, TLS13]


# --- real hellos, whole -------------------------------------------------------------------------

def test_hostname_is_read():
    hello = read_client_hello(HOST)
    assert hello == ClientHello(sni="www.example.com", alpn=(), legacy_version=0x0303,
                                supported_versions=hello.supported_versions)
    assert 0x0304 in hello.supported_versions


def test_sni_is_lower_cased():
    raw = real_hello("WWW.Example.COM")
    assert b"WWW.Example.COM" in raw or b"www.example.com" in raw
    assert read_client_hello(raw).sni == "www.example.com"


def test_idna_a_label_is_kept():
    hello = read_client_hello(real_hello("bücher.example"))
    assert hello.sni == "xn--bcher-kva.example"


def test_no_sni():
    assert b"www.example.com" not in NO_SNI
    assert read_client_hello(NO_SNI).sni is None


def test_alpn_offered_in_order():
    assert read_client_hello(ALPN).alpn == ("h2", "http/1.1")
    assert read_client_hello(HOST).alpn == ()


def test_tls12_only_has_no_supported_versions():
    hello = read_client_hello(TLS12)
    assert (hello.sni, hello.legacy_version, hello.supported_versions) == (
        "old.example", 0x0303, ())


def test_tls13_only():
    hello = read_client_hello(TLS13)
    assert (hello.sni, hello.legacy_version, hello.supported_versions) == (
        "new.example", 0x0303, (0x0304,))


def test_bytes_after_the_hello_records_are_ignored():
    # A TLS 1.3 client may follow its hello with ChangeCipherSpec or early data.
    follow = record(b"\x01", content_type=20, version=b"\x03\x03") + b"\x17\x03\x03"
    assert read_client_hello(HOST + follow) == read_client_hello(HOST)


def test_hand_built_hello_agrees_with_the_grammar():
    raw = built_hello([sni_ext(b"a.example"), ext(16, u16v(u8v(b"h2"))), ext(43, u8v(b"\x03\x04"))])
    assert read_client_hello(raw) == ClientHello("a.example", ("h2",), 0x0303, (0x0304,))


def test_hello_without_extensions_is_allowed():
    # Extensions are optional before TLS 1.3 (RFC 5246 §7.4.1.2).
    assert read_client_hello(built_hello(None)) == ClientHello(None, (), 0x0303, ())


def test_unknown_server_name_type_is_skipped():
    raw = built_hello([ext(0, u16v(b"\x07" + u16v(b"??") + b"\x00" + u16v(b"b.example")))])
    assert read_client_hello(raw).sni == "b.example"


# --- real hellos, in pieces ---------------------------------------------------------------------

@pytest.mark.parametrize("raw", REAL, ids=["host", "no-sni", "alpn", "tls12", "tls13"])
def test_byte_by_byte_is_none_until_complete(raw):
    for n in range(len(raw)):
        assert read_client_hello(raw[:n]) is None, n
    assert read_client_hello(raw) == read_client_hello(bytes(raw))


@pytest.mark.parametrize("raw", REAL, ids=["host", "no-sni", "alpn", "tls12", "tls13"])
def test_split_over_three_records(raw):
    message = handshake_message(raw)
    third = len(message) // 3
    split = reframe(message, [third, 2 * third])
    assert split.count(b"\x16\x03\x01") >= 3 and len(split) == len(raw) + 10
    assert read_client_hello(split) == read_client_hello(raw)
    for n in range(len(split)):
        assert read_client_hello(split[:n]) is None, n


def test_handshake_header_itself_split_over_records():
    message = handshake_message(ALPN)
    split = reframe(message, [1, 2, 3, 200])
    assert read_client_hello(split) == read_client_hello(ALPN)


@FUZZ
@given(st.lists(st.integers(min_value=1, max_value=len(HOST) - 6), max_size=8))
def test_any_record_framing_reads_the_same(cuts):
    assert read_client_hello(reframe(handshake_message(HOST), cuts)) == read_client_hello(HOST)


# --- not TLS ------------------------------------------------------------------------------------

@pytest.mark.parametrize("raw", [
    b"GET / HTTP/1.1\r\nHost: a.example\r\n\r\n",
    b"CONNECT a.example:443 HTTP/1.1\r\n\r\n",
    b"G",
    b"\x05\x01\x00",                                  # SOCKS5 greeting
    b"\x80\x2e\x01\x00\x02",                          # SSLv2-style hello
    b"\x16\x04",                                      # handshake type, but no TLS version
    b"\x16\x03\x09",
    b"\x17\x03\x03\x00\x05hello",                     # application data first
])
def test_not_tls(raw):
    with pytest.raises(NotTls):
        read_client_hello(raw)


@pytest.mark.parametrize("raw", [b"", b"\x16", b"\x16\x03", b"\x16\x03\x01\x02"])
def test_a_possible_tls_start_needs_more(raw):
    assert read_client_hello(raw) is None


# --- malformed ----------------------------------------------------------------------------------

def test_record_longer_than_its_handshake_message():
    message = handshake_message(HOST) + b"\x00\x00\x00"
    with pytest.raises(MalformedHello):
        read_client_hello(record(message))


def test_handshake_length_shorter_than_the_body():
    message = bytearray(handshake_message(HOST))
    message[1:4] = (len(message) - 4 - 10).to_bytes(3, "big")
    with pytest.raises(MalformedHello):
        read_client_hello(record(bytes(message)))


def test_body_truncated_inside_the_extensions():
    message = bytearray(handshake_message(HOST)[:-10])
    message[1:4] = (len(message) - 4).to_bytes(3, "big")
    with pytest.raises(MalformedHello):
        read_client_hello(record(bytes(message)))


@pytest.mark.parametrize("kwargs", [
    {"session_id": bytes(33)},
    {"suites": b"\x13"},
    {"suites": b""},
    {"compression": b""},
    {"version": 0x0200},
], ids=["session-id-33", "odd-suites", "no-suites", "no-compression", "version"])
def test_garbled_body_fields(kwargs):
    with pytest.raises(MalformedHello):
        read_client_hello(built_hello([sni_ext(b"a.example")], **kwargs))


def test_extensions_length_that_does_not_add_up():
    good = built_hello([sni_ext(b"a.example")])
    for delta in (-1, +1):
        broken = bytearray(good)
        at = len(good) - len(sni_ext(b"a.example")) - 2
        broken[at:at + 2] = (len(sni_ext(b"a.example")) + delta).to_bytes(2, "big")
        with pytest.raises(MalformedHello):
            read_client_hello(bytes(broken))


@pytest.mark.parametrize("extension", [
    ext(0, u16v(b"\x00" + u16v(b"a.example")) + b"x"),         # list shorter than the extension
    ext(0, u16v(b"\x00" + u16v(b"a.example") + b"\x00")),       # entry cut short
    ext(0, b""),
    ext(16, u16v(u8v(b"h2") + b"\x00")),                       # empty protocol name
    ext(16, u16v(b"\x05h2")),
    ext(43, u8v(b"\x03")),
    ext(43, b""),
], ids=["sni-list", "sni-entry", "sni-empty", "alpn-empty-name", "alpn-length", "versions-odd",
        "versions-empty"])
def test_garbled_extension_contents(extension):
    with pytest.raises(MalformedHello):
        read_client_hello(built_hello([extension]))


@pytest.mark.parametrize("name", [
    b"", b"a..example", b"a.example.", b".a.example", b"b\xc3\xbccher.example", b"a example",
    b"a/b.example", b"-a.example", b"a-.example", b"x" * 64 + b".example",
    (b"a" * 63 + b".") * 4 + b"a", b"a\x00.example",
])
def test_sni_that_is_not_an_ascii_dns_name(name):
    with pytest.raises(MalformedHello):
        read_client_hello(built_hello([sni_ext(name)]))


def test_two_host_names():
    entries = b"\x00" + u16v(b"a.example") + b"\x00" + u16v(b"b.example")
    with pytest.raises(MalformedHello):
        read_client_hello(built_hello([ext(0, u16v(entries))]))


def test_wrong_handshake_type():
    with pytest.raises(MalformedHello):
        read_client_hello(built_hello([], handshake_type=2))
    server_hello_start = b"\x16\x03\x03\x00\x7a\x02"        # refused before the record is in
    with pytest.raises(MalformedHello):
        read_client_hello(server_hello_start)


@pytest.mark.parametrize("extension", [
    sni_ext(b"a.example"), ext(16, u16v(u8v(b"h2"))), ext(0xff01, b"\x00"), ext(0x0a0a, b""),
])
def test_duplicate_extension(extension):
    with pytest.raises(MalformedHello):
        read_client_hello(built_hello([extension, ext(23, b""), extension]))


def test_duplicate_extension_in_a_real_hello():
    # Append a second supported_versions to OpenSSL's own extensions and fix up every length.
    message = bytearray(handshake_message(TLS13))
    extra = ext(43, u8v(b"\x03\x04"))
    body = bytes(message[4:]) + extra
    # The extensions block ends the body; its length sits just before it.
    start = 2 + 32
    start += 1 + body[start]
    start += 2 + int.from_bytes(body[start:start + 2], "big")
    start += 1 + body[start]
    old = int.from_bytes(body[start:start + 2], "big")
    body = body[:start] + (old + len(extra)).to_bytes(2, "big") + body[start + 2:]
    with pytest.raises(MalformedHello, match="duplicate"):
        read_client_hello(record(b"\x01" + len(body).to_bytes(3, "big") + body))


def test_non_handshake_record_between_fragments():
    message = handshake_message(HOST)
    split = record(message[:100]) + record(b"\x01\x00", content_type=21) + record(message[100:])
    with pytest.raises(MalformedHello):
        read_client_hello(split)


def test_zero_length_record():
    with pytest.raises(MalformedHello):
        read_client_hello(record(b"") + HOST)


def test_record_over_2_14():
    with pytest.raises(MalformedHello):
        read_client_hello(b"\x16\x03\x01\x40\x01\x01")


def test_oversize_declared_length_is_refused_at_once():
    with pytest.raises(MalformedHello):
        read_client_hello(b"\x16\x03\x01\x40\x00\x01\xff\xff\xff")


def test_oversize_against_max_bytes():
    assert read_client_hello(HOST, max_bytes=len(HOST)) is not None
    with pytest.raises(MalformedHello):
        read_client_hello(HOST, max_bytes=len(HOST) - 1)
    with pytest.raises(MalformedHello):                     # known to be too big from the header
        read_client_hello(HOST[:9], max_bytes=len(HOST) - 1)


def test_oversize_buffer_of_many_small_records():
    # A hello announcing 60 KiB sent one byte per record: 6 bytes a byte, past 64 KiB buffered.
    message = b"\x01" + (60000).to_bytes(3, "big") + bytes(60000)
    stream = b"".join(record(message[i:i + 1]) for i in range(20000))
    assert len(stream) > 16384 * 4
    with pytest.raises(MalformedHello):
        read_client_hello(stream)
    assert read_client_hello(stream[:16384 * 4 - 10]) is None


# --- fuzz ---------------------------------------------------------------------------------------

def outcome(raw: bytes):
    try:
        return read_client_hello(raw)
    except (NotTls, MalformedHello) as exc:
        return exc


@FUZZ
@given(st.binary(max_size=600))
def test_arbitrary_bytes(raw):
    # Any other exception (IndexError, ValueError, UnicodeDecodeError) escapes and fails here.
    assert isinstance(outcome(raw), (type(None), ClientHello, NotTls, MalformedHello))


@FUZZ
@given(st.binary(max_size=600))
def test_arbitrary_bytes_behind_a_handshake_record_header(tail):
    raw = b"\x16\x03\x01" + tail
    assert isinstance(outcome(raw), (type(None), ClientHello, MalformedHello))


@FUZZ
@given(st.sampled_from(REAL), st.data())
def test_single_byte_mutation_of_a_real_hello(raw, data):
    at = data.draw(st.integers(min_value=0, max_value=len(raw) - 1))
    value = data.draw(st.integers(min_value=0, max_value=255))
    mutated = raw[:at] + bytes([value]) + raw[at + 1:]
    result = outcome(mutated)
    assert result is None or isinstance(result, (ClientHello, NotTls, MalformedHello))
    if isinstance(result, ClientHello) and result.sni is not None:
        assert result.sni.isascii() and result.sni == result.sni.lower()
