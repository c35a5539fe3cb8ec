"""RFC 1928 (SOCKS5) and RFC 1929 (username/password) checks of `appliance.protocols.socks5`,
byte by byte: every parser returns None until its message is complete, replies are exact bytes,
and each malformed input is a `Socks5Error` naming the reply code (or the bytes to send before
closing). Hypothesis checks that no input makes a parser raise anything else.

The frontend (`appliance/frontends/socks5.py`) is driven with real clients in
tests/e2e/test_socks5.py.
"""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from appliance.protocols import socks5
from appliance.protocols.socks5 import (
    Credentials,
    Datagram,
    Greeting,
    Request,
    Socks5Error,
    auth_reply,
    build_datagram,
    choose_method,
    method_selection,
    parse_credentials,
    parse_datagram,
    parse_greeting,
    parse_request,
    reply,
)
from tests import test_sans_io

FUZZ = settings(max_examples=300, deadline=None)


def fed_byte_by_byte(parse, message: bytes):
    """Every proper prefix of `message` parses to None; the whole of it to (parsed, len)."""
    for end in range(len(message)):
        assert parse(message[:end]) is None, f"complete after {end} of {len(message)} bytes"
    parsed, used = parse(message)
    assert used == len(message)
    return parsed


def refusal(parse, data: bytes) -> Socks5Error:
    with pytest.raises(Socks5Error) as caught:
        parse(data)
    return caught.value


def port(n: int) -> bytes:
    return struct.pack("!H", n)


def test_codec_imports_no_io():
    test_sans_io.test_sans_io_module_imports_no_io("appliance.protocols.socks5")


# --- greeting and method selection (RFC 1928 §3) ----------------------------------------------

def test_greeting_byte_by_byte():
    assert fed_byte_by_byte(parse_greeting, b"\x05\x02\x00\x02") == Greeting((0, 2))


def test_greeting_leaves_what_follows():
    # A client may send its request right behind the greeting (no round trip wait).
    data = b"\x05\x01\x00" + b"\x05\x01\x00\x01\x7f\x00\x00\x01\x00\x50"
    assert parse_greeting(data) == (Greeting((0,)), 3)


@pytest.mark.parametrize("first", [b"\x04", b"\x00", b"G", b"\x16"])
def test_greeting_of_another_protocol_is_closed_without_answer(first):
    # SOCKS4, HTTP or TLS on the SOCKS5 port: nothing in SOCKS5 to answer with, so just close.
    error = refusal(parse_greeting, first)        # known from the first byte
    assert error.reply is None and error.answer == b""
    assert "version" in str(error)


def test_greeting_with_zero_methods_gets_no_acceptable_method():
    error = refusal(parse_greeting, b"\x05\x00")
    assert error.reply is None and error.answer == b"\x05\xff"


def test_method_selection_bytes():
    assert method_selection(socks5.METHOD_NO_AUTH) == b"\x05\x00"
    assert method_selection(socks5.METHOD_USERPASS) == b"\x05\x02"
    assert method_selection(socks5.METHOD_NONE_ACCEPTABLE) == b"\x05\xff"


@pytest.mark.parametrize("offered, auth_required, chosen", [
    ((0,), False, 0x00),
    ((0, 2), False, 0x00),
    ((2,), False, 0xFF),            # without users there is nothing to check a password against
    ((0, 2), True, 0x02),
    ((2, 0), True, 0x02),
    ((0,), True, 0xFF),             # with [auth] set, no-auth is never offered
    ((1, 0x80), True, 0xFF),        # GSSAPI, private methods
])
def test_method_choice(offered, auth_required, chosen):
    assert choose_method(Greeting(offered), auth_required) == chosen


# --- username/password (RFC 1929 §2) ----------------------------------------------------------

def userpass(user: bytes, password: bytes, version: int = 1) -> bytes:
    return bytes([version, len(user)]) + user + bytes([len(password)]) + password


def test_credentials_byte_by_byte():
    parsed = fed_byte_by_byte(parse_credentials, userpass(b"alice", b"s3cret:x"))
    assert parsed == Credentials("alice", "s3cret:x")


def test_credentials_utf8_and_empty_password():
    assert fed_byte_by_byte(parse_credentials, userpass("jörg".encode(), b"")) == Credentials("jörg", "")


def test_credentials_longest():
    parsed = fed_byte_by_byte(parse_credentials, userpass(b"u" * 255, b"p" * 255))
    assert parsed == Credentials("u" * 255, "p" * 255)


@pytest.mark.parametrize("data, why", [
    (userpass(b"alice", b"pw", version=5), "version"),       # a SOCKS5 request in its place
    (userpass(b"alice", b"pw", version=0), "version"),
    (userpass(b"", b"pw"), "empty user name"),
    (userpass(b"\xff\xfe", b"pw"), "UTF-8"),
    (userpass(b"alice", b"\xc3("), "UTF-8"),                 # a truncated two-byte sequence
])
def test_bad_credentials_get_the_failure_answer(data, why):
    error = refusal(parse_credentials, data)
    assert error.reply is None and error.answer == b"\x01\x01"
    assert why in str(error)


def test_auth_reply_bytes():
    assert auth_reply(True) == b"\x01\x00"
    assert auth_reply(False) == b"\x01\x01"


# --- requests (RFC 1928 §4, §5) ---------------------------------------------------------------

V4 = b"\x05\x01\x00\x01\x7f\x00\x00\x01" + port(80)
V6 = b"\x05\x01\x00\x04" + bytes(15) + b"\x01" + port(443)
NAME = b"\x05\x01\x00\x03\x0bexample.com" + port(8080)


@pytest.mark.parametrize("data, expected", [
    (V4, Request(socks5.CMD_CONNECT, "127.0.0.1", 80, socks5.ATYP_IPV4)),
    (V6, Request(socks5.CMD_CONNECT, "::1", 443, socks5.ATYP_IPV6)),
    (NAME, Request(socks5.CMD_CONNECT, "example.com", 8080, socks5.ATYP_DOMAIN)),
    (b"\x05\x02\x00\x01" + bytes(4) + port(0), Request(socks5.CMD_BIND, "0.0.0.0", 0, 1)),
    (b"\x05\x03\x00\x01" + bytes(4) + port(5353), Request(socks5.CMD_UDP_ASSOCIATE, "0.0.0.0", 5353, 1)),
    (b"\x05\x01\x00\x04" + bytes.fromhex("20010db8000000000000000000000001") + port(65535),
     Request(socks5.CMD_CONNECT, "2001:db8::1", 65535, socks5.ATYP_IPV6)),
])
def test_request_byte_by_byte(data, expected):
    assert fed_byte_by_byte(parse_request, data) == expected


def test_bytes_after_the_request_are_left_for_the_relay():
    # What follows a CONNECT request is the client's first tunnel data (the frontend relays it).
    assert parse_request(V4 + b"GET / HTTP/1.1\r\n") == (parse_request(V4)[0], len(V4))


@pytest.mark.parametrize("name, host", [
    (b"Example.COM.", "example.com"),                 # case and the root dot do not matter
    (b"localhost", "localhost"),
    (b"_srv.my-host.test", "_srv.my-host.test"),
    (b"127.0.0.1", "127.0.0.1"),                      # an address sent as a name is the address
    (b"a" * 63 + b"." + b"b" * 63, "a" * 63 + "." + "b" * 63),
])
def test_domain_names(name, host):
    data = b"\x05\x01\x00\x03" + bytes([len(name)]) + name + port(443)
    assert fed_byte_by_byte(parse_request, data).host == host


@pytest.mark.parametrize("data, code, why", [
    (b"\x04\x01\x00\x01" + bytes(6), socks5.REP_GENERAL_FAILURE, "version"),
    (b"\x05\x01\x01\x01" + bytes(6), socks5.REP_GENERAL_FAILURE, "reserved"),
    (b"\x05\x01\x00\x03\x00" + port(80), socks5.REP_HOST_UNREACHABLE, "empty domain"),
    (b"\x05\x01\x00\x03\x04h\xc3\xa9s" + port(80), socks5.REP_HOST_UNREACHABLE, "not ASCII"),
    (b"\x05\x01\x00\x03\x07a b.com" + port(80), socks5.REP_HOST_UNREACHABLE, "not a host name"),
    (b"\x05\x01\x00\x03\x05-a.bc" + port(80), socks5.REP_HOST_UNREACHABLE, "not a host name"),
    (b"\x05\x01\x00\x03\x05a\x00.bc" + port(80), socks5.REP_HOST_UNREACHABLE, "not a host name"),
    (b"\x05\x01\x00\x03\x03::1" + port(80), socks5.REP_HOST_UNREACHABLE, "not a host name"),
    (b"\x05\x01\x00\x03\x41" + b"a" * 64 + b"\x00\x50", socks5.REP_HOST_UNREACHABLE, "not a host name"),
    (b"\x05\x01\x00\x05" + bytes(6), socks5.REP_ADDRESS_TYPE_NOT_SUPPORTED, "address type 0x05"),
    (b"\x05\x01\x00\x00", socks5.REP_ADDRESS_TYPE_NOT_SUPPORTED, "address type 0x00"),
    (b"\x05\x01\x00\x02", socks5.REP_ADDRESS_TYPE_NOT_SUPPORTED, "address type"),
    (b"\x05\x01\x00\xff", socks5.REP_ADDRESS_TYPE_NOT_SUPPORTED, "address type"),
    (b"\x05\x09\x00\x01" + bytes(6), socks5.REP_COMMAND_NOT_SUPPORTED, "command 0x09"),
    (b"\x05\x00\x00\x01" + bytes(6), socks5.REP_COMMAND_NOT_SUPPORTED, "command 0x00"),
])
def test_malformed_requests_name_their_reply_code(data, code, why):
    error = refusal(parse_request, data)
    assert (error.reply, error.answer) == (code, b"")
    assert why in str(error)


def test_malformed_request_is_refused_as_soon_as_it_shows():
    # Bad version, reserved byte and address type are known before the rest arrives.
    assert refusal(parse_request, b"\x04").reply == socks5.REP_GENERAL_FAILURE
    assert refusal(parse_request, b"\x05\x01\x01\x01").reply == socks5.REP_GENERAL_FAILURE
    assert refusal(parse_request, b"\x05\x01\x00\x05").reply == socks5.REP_ADDRESS_TYPE_NOT_SUPPORTED
    assert refusal(parse_request, b"\x05\x01\x00\x03\x00").reply == socks5.REP_HOST_UNREACHABLE


def test_unknown_command_is_judged_on_the_whole_request():
    # Its address is read first, so an unknown command does not leave bytes behind unread.
    data = b"\x05\x09\x00\x03\x0bexample.com" + port(80)
    for end in range(len(data)):
        assert parse_request(data[:end]) is None
    assert refusal(parse_request, data).reply == socks5.REP_COMMAND_NOT_SUPPORTED


def test_truncated_domain_waits_for_more():
    # Closing the connection here is the frontend's business: the codec only says "incomplete".
    assert parse_request(b"\x05\x01\x00\x03\x0bexamp") is None
    assert parse_request(b"\x05\x01\x00\x03\x0bexample.com\x01") is None


# --- replies (RFC 1928 §6) --------------------------------------------------------------------

@pytest.mark.parametrize("args, expected", [
    ((socks5.REP_SUCCEEDED, "127.0.0.1", 1080), b"\x05\x00\x00\x01\x7f\x00\x00\x01\x04\x38"),
    ((socks5.REP_SUCCEEDED, "::1", 443), b"\x05\x00\x00\x04" + bytes(15) + b"\x01\x01\xbb"),
    ((socks5.REP_SUCCEEDED, "proxy.test", 1), b"\x05\x00\x00\x03\x0aproxy.test\x00\x01"),
    ((socks5.REP_NOT_ALLOWED,), b"\x05\x02\x00\x01\x00\x00\x00\x00\x00\x00"),
    ((socks5.REP_HOST_UNREACHABLE,), b"\x05\x04\x00\x01" + bytes(6)),
    ((socks5.REP_CONNECTION_REFUSED,), b"\x05\x05\x00\x01" + bytes(6)),
    ((socks5.REP_TTL_EXPIRED,), b"\x05\x06\x00\x01" + bytes(6)),
    ((socks5.REP_COMMAND_NOT_SUPPORTED,), b"\x05\x07\x00\x01" + bytes(6)),
    ((socks5.REP_ADDRESS_TYPE_NOT_SUPPORTED,), b"\x05\x08\x00\x01" + bytes(6)),
])
def test_reply_bytes(args, expected):
    assert reply(*args) == expected


def test_reply_codes_have_names():
    assert set(socks5.REPLY_NAMES) == set(range(0, 9))


@pytest.mark.parametrize("host", ["", "x" * 256])
def test_unencodable_bound_name_is_a_value_error(host):
    with pytest.raises(ValueError):
        reply(socks5.REP_SUCCEEDED, host, 1)


# --- UDP ASSOCIATE datagrams (RFC 1928 §7) ----------------------------------------------------

@pytest.mark.parametrize("host, port_, header", [
    ("127.0.0.1", 7, b"\x00\x00\x00\x01\x7f\x00\x00\x01\x00\x07"),
    ("::1", 53, b"\x00\x00\x00\x04" + bytes(15) + b"\x01\x00\x35"),
    ("echo.test", 9, b"\x00\x00\x00\x03\x09echo.test\x00\x09"),
])
def test_datagram_round_trip(host, port_, header):
    for data in (b"", b"ping", bytes(range(256))):
        built = build_datagram(host, port_, data)
        assert built == header + data
        atyp = {4: socks5.ATYP_IPV4, 16: socks5.ATYP_IPV6}.get(len(header) - 6, socks5.ATYP_DOMAIN)
        assert parse_datagram(built) == Datagram(host, port_, atyp, data)


@pytest.mark.parametrize("frag", [1, 0x7F, 0x80, 0xFF])
def test_fragments_are_refused(frag):
    data = b"\x00\x00" + bytes([frag]) + build_datagram("127.0.0.1", 7, b"x")[3:]
    assert "fragment" in str(refusal(parse_datagram, data))


def test_datagram_reserved_bytes_must_be_zero():
    assert "reserved" in str(refusal(parse_datagram, b"\x00\x01" + build_datagram("127.0.0.1", 7, b"x")[2:]))


@pytest.mark.parametrize("host", ["127.0.0.1", "::1", "echo.test"])
def test_every_truncated_datagram_header_is_refused(host):
    # A datagram comes whole or not at all: a short header is an error, never "wait for more".
    header = build_datagram(host, 7, b"")
    for end in range(len(header)):
        refusal(parse_datagram, header[:end])
    assert parse_datagram(header).data == b""


@pytest.mark.parametrize("data, why", [
    (b"\x00\x00\x00\x05" + bytes(6) + b"x", "address type"),
    (b"\x00\x00\x00\x03\x00\x00\x07x", "empty domain"),
    (b"\x00\x00\x00\x03\x03a b\x00\x07x", "not a host name"),
])
def test_bad_datagram_addresses_are_refused(data, why):
    assert why in str(refusal(parse_datagram, data))


# --- fuzzing: whatever arrives, only Socks5Error -----------------------------------------------

PARSERS = [parse_greeting, parse_credentials, parse_request]

# Pieces of real messages, so generated inputs get past the first bytes often enough to matter.
PIECES = [b"\x05", b"\x01", b"\x00", b"\x03", b"\x04", b"\x02", b"\xff", b"\x0b", b"example.com",
          b"\x7f\x00\x00\x01", bytes(16), b"\x00\x50", b"\xc3", b".", b"-", b"1.2.3.4"]
MESSAGES = st.one_of(st.binary(max_size=300),
                     st.lists(st.sampled_from(PIECES), max_size=12).map(b"".join))


def only_socks5_errors(parse, data: bytes):
    try:
        return parse(data)
    except Socks5Error as exc:
        assert exc.reply is None or exc.reply in socks5.REPLY_NAMES
        return exc


@FUZZ
@given(MESSAGES)
def test_handshake_parsers_raise_only_socks5_error(data):
    for parse in PARSERS:
        result = only_socks5_errors(parse, data)
        if isinstance(result, tuple):
            assert 0 < result[1] <= len(data)


@FUZZ
@given(MESSAGES)
def test_datagram_parser_raises_only_socks5_error(data):
    result = only_socks5_errors(parse_datagram, data)
    if isinstance(result, Datagram):
        assert data.endswith(result.data)


@FUZZ
@given(MESSAGES)
def test_a_prefix_never_fails_where_the_whole_would_not(data):
    # Fed in pieces, a parser must not refuse a prefix of an input it accepts whole.
    for parse in PARSERS:
        if isinstance(only_socks5_errors(parse, data), tuple):
            for end in range(len(data)):
                assert not isinstance(only_socks5_errors(parse, data[:end]), Socks5Error)


LABEL = st.from_regex(r"\A[a-z0-9]([a-z0-9-]{0,20}[a-z0-9])?\Z")
HOSTS = st.one_of(
    st.ip_addresses(v=4).map(str), st.ip_addresses(v=6).map(str),
    st.lists(LABEL, min_size=1, max_size=4).map(".".join).filter(lambda n: not n.replace(".", "").isdigit()))


@FUZZ
@given(st.sampled_from([1, 2, 3]), HOSTS, st.integers(0, 65535), st.binary(max_size=20))
def test_generated_requests_round_trip(command, host, port_, rest):
    encoded = socks5._encode_address(host, port_)
    data = bytes([5, command, 0]) + encoded
    request = fed_byte_by_byte(parse_request, data)
    assert (request.command, request.host, request.port) == (command, host, port_)
    assert parse_request(data + rest) == (request, len(data))
    assert parse_datagram(build_datagram(host, port_, rest)) == Datagram(host, port_, encoded[0], rest)
    assert reply(0, host, port_) == b"\x05\x00\x00" + encoded
