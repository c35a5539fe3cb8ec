"""`read_client_hello` against ClientHellos captured from real clients (RFC 8446 §4.1.2, §5.1).

The fixtures in tests/protocols/clienthellos/ are the first bytes curl, Chromium, OpenSSL's
s_client, Python's ssl and Node's tls sent to a loopback listener (written by hand-run
clienthellos/capture.py; `#` lines name each client's version and command). Unlike the hellos
test_rfc8446_clienthello.py makes with the stdlib, these include BoringSSL's: GREASE values,
ECH GREASE, ALPS, a post-quantum key share, permuted extensions, near 2 KB.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from appliance.protocols.tls_clienthello import (
    ClientHello,
    MalformedHello,
    NotTls,
    read_client_hello,
)

HELLOS = Path(__file__).parent / "clienthellos"
SNI, H2_AND_H1 = "www.example.test", ("h2", "http/1.1")

# name: (server name, ALPN offer, sends supported_versions), as the capture commands ask.
EXPECTED = {
    "curl": (SNI, H2_AND_H1, True),
    "curl-no-sni": (None, H2_AND_H1, True),             # an IP literal gets no server_name
    "openssl": (SNI, H2_AND_H1, True),
    "openssl-tls12": (SNI, H2_AND_H1, False),           # -no_tls1_3
    "chromium": (SNI, H2_AND_H1, True),
    "python": (SNI, ("http/1.1",), True),
    "node": (SNI, H2_AND_H1, True),
}
NAMES = sorted(EXPECTED)


def load(name: str) -> bytes:
    lines = (HELLOS / f"{name}.hex").read_text().splitlines()
    return bytes.fromhex("".join(line for line in lines if not line.startswith("#")))


RAW = {name: load(name) for name in NAMES}
FEW = settings(max_examples=50, deadline=None)


def record(fragment: bytes, content_type: int = 22, version: bytes = b"\x03\x01") -> bytes:
    return bytes([content_type]) + version + len(fragment).to_bytes(2, "big") + fragment


def message_of(raw: bytes) -> bytes:
    """The handshake message; every client sent its hello in one record."""
    assert raw[0] == 22 and int.from_bytes(raw[3:5], "big") == len(raw) - 5
    return raw[5:]


def reframe(message: bytes, cuts) -> bytes:
    bounds = [0, *sorted(set(cuts)), len(message)]
    return b"".join(record(message[a:b]) for a, b in zip(bounds, bounds[1:]) if b > a)


def summary(hello: ClientHello) -> tuple:
    return hello.sni, hello.alpn, bool(hello.supported_versions)


def outcome(raw: bytes):
    try:
        return read_client_hello(raw)
    except (NotTls, MalformedHello) as exc:
        return exc


def test_every_fixture_has_its_expectations():
    assert sorted(path.stem for path in HELLOS.glob("*.hex")) == NAMES


@pytest.mark.parametrize("name", NAMES)
def test_fields(name):
    hello = read_client_hello(RAW[name])
    assert summary(hello) == EXPECTED[name]
    assert hello.legacy_version == 0x0303
    assert (0x0304 in hello.supported_versions) is EXPECTED[name][2]
    assert (SNI.encode() in RAW[name]) is (hello.sni is not None)


def test_chromium_hello_is_large_and_greased():
    raw = RAW["chromium"]
    assert len(raw) > 1500                              # the X25519MLKEM768 share is 1216 bytes
    grease = [v for v in read_client_hello(raw).supported_versions if v & 0x0f0f == 0x0a0a]
    assert len(grease) == 1                             # RFC 8701 values are passed through


@pytest.mark.parametrize("name", NAMES)
def test_byte_by_byte_is_none_until_the_last_byte(name):
    # Every truncation of the stream is a hello still arriving: None, never an exception.
    raw = RAW[name]
    for n in range(len(raw)):
        assert read_client_hello(raw[:n]) is None, n
    assert summary(read_client_hello(raw)) == EXPECTED[name]


@pytest.mark.parametrize("name", NAMES)
def test_byte_by_byte_over_records_that_split_the_header(name):
    message = message_of(RAW[name])
    stream = reframe(message, [1, 2, 3, 40, len(message) // 2])
    for n in range(len(stream)):
        assert read_client_hello(stream[:n]) is None, n
    assert read_client_hello(stream) == read_client_hello(RAW[name])


@FEW
@given(st.sampled_from(NAMES), st.data())
def test_any_record_framing_reads_the_same(name, data):
    message = message_of(RAW[name])
    cuts = data.draw(st.lists(st.integers(1, len(message) - 1), max_size=12))
    stream = reframe(message, cuts)
    assert read_client_hello(stream) == read_client_hello(RAW[name])
    short = data.draw(st.integers(0, len(stream) - 1))
    assert read_client_hello(stream[:short]) is None


@pytest.mark.parametrize("name", NAMES)
def test_truncated_message_with_lengths_that_agree_is_malformed(name):
    # Cut the message and fix its handshake and record lengths: no longer a hello arriving, but a
    # complete one whose body lies. The parser rightly raises, except at the one cut that leaves
    # a hello without extensions, which TLS 1.2 allows (RFC 5246 §7.4.1.2).
    message = message_of(RAW[name])
    body = message[4:]
    at = 2 + 32
    at += 1 + body[at]                                  # legacy_session_id
    at += 2 + int.from_bytes(body[at:at + 2], "big")    # cipher_suites
    at += 1 + body[at]                                  # legacy_compression_methods
    for n in range(len(body)):
        cut = b"\x01" + n.to_bytes(3, "big") + body[:n]
        if n == at:
            assert read_client_hello(record(cut)) == ClientHello(None, (), 0x0303, ())
        else:
            with pytest.raises(MalformedHello):
                read_client_hello(record(cut))


@pytest.mark.parametrize("name", NAMES)
def test_every_single_byte_flip(name):
    # Whatever the byte, only the parser's own outcomes come out (no IndexError and the like).
    raw = RAW[name]
    for at in range(len(raw)):
        result = outcome(raw[:at] + bytes([raw[at] ^ 0xff]) + raw[at + 1:])
        assert result is None or isinstance(result, (ClientHello, NotTls, MalformedHello)), at
        if 11 <= at < 43:                               # the 32 random bytes are opaque
            assert result == read_client_hello(raw)


@FEW
@given(st.sampled_from(NAMES), st.data())
def test_single_byte_mutation(name, data):
    raw = RAW[name]
    at = data.draw(st.integers(0, len(raw) - 1))
    mutated = raw[:at] + bytes([data.draw(st.integers(0, 255))]) + raw[at + 1:]
    result = outcome(mutated)
    assert result is None or isinstance(result, (ClientHello, NotTls, MalformedHello))
    if isinstance(result, ClientHello) and result.sni is not None:
        assert result.sni.isascii() and result.sni == result.sni.lower()


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("after", [
    record(b"\x01", content_type=20, version=b"\x03\x03"),              # middlebox-compat CCS
    record(b"\x01", content_type=20, version=b"\x03\x03") + b"\x17\x03\x03\x00\x20early",
    RAW["openssl"],                                                     # a second flight
    b"\x00",
], ids=["ccs", "early-data", "second-hello", "junk"])
def test_bytes_after_the_hello_are_ignored(name, after):
    assert read_client_hello(RAW[name] + after) == read_client_hello(RAW[name])


@FEW
@given(st.sampled_from(NAMES), st.binary(min_size=1, max_size=64))
def test_any_bytes_after_the_hello_are_ignored(name, after):
    assert read_client_hello(RAW[name] + after) == read_client_hello(RAW[name])
