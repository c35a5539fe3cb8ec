"""Hypothesis fuzzing of `appliance.protocols.proxy_auth.basic_credentials` (RFC 9110 §11.4,
§11.7, RFC 7617) on the field values a client can really send.

The values come through our HTTP/1.1 head parser, as in the listener: any bytes a field value
may hold, obs-text included (latin-1 decoded). Properties: parsing credentials never raises;
what is accepted is exactly `Basic` (any case), spaces, and the base64 of `user:password` in
UTF-8, with at most SP and HTAB around; only the first field counts; and every valid credential
a client can build is read back as sent, whatever the scheme's case and the spacing.

Example counts come from the hypothesis profile (tests/conftest.py).
"""

from __future__ import annotations

import base64
import re

from hypothesis import given
from hypothesis import strategies as st

from appliance.protocols.http1 import RemoteProtocolError, parse_request_head
from appliance.protocols.proxy_auth import Credentials, basic_credentials

BASE64 = re.compile(r"[A-Za-z0-9+/]*=*")      # token68 allows any padding; it decodes the same
FIELDS = ("proxy-authorization", "authorization")


def head(*fields: tuple[bytes, bytes]) -> bytes:
    lines = b"".join(name + b": " + value + b"\r\n" for name, value in fields)
    return b"GET http://a.example/ HTTP/1.1\r\nHost: a.example\r\n" + lines + b"\r\n"


def parsed_headers(data: bytes):
    """The headers the listener would see, or None when the head itself is refused (400)."""
    try:
        return parse_request_head(data).headers
    except RemoteProtocolError:
        return None


# Pieces of credentials, so generated values look like Basic often enough to matter.
PIECES = [b"Basic", b"basic", b"BASIC", b"Bearer", b"Digest", b" ", b"  ", b"\t", b"\xa0", b"\x85",
          b"YWxpY2U6c2VjcmV0", b"YWxpY2U6", b"OnB3", b"w6k6eA==", b"/w==", b"=", b"==", b":",
          b"\xe9", b"\xff", b"\x00", b"\x7f", b",", b"realm=\"x\"", b"dXNlcjpw\xe9"]
junk = st.one_of(st.binary(max_size=80), st.lists(st.sampled_from(PIECES), max_size=8).map(b"".join))
values = st.one_of(junk, st.tuples(st.sampled_from([b"Basic ", b"basic  ", b" BASIC\t"]), junk).map(b"".join))
names = st.sampled_from([b"Proxy-Authorization", b"proxy-authorization", b"PROXY-AUTHORIZATION",
                         b"Authorization", b"X-Proxy-Authorization"])


def check(headers, field: str) -> None:
    result = basic_credentials(headers, field)
    if result is None:
        return
    first = next(value for name, value in headers if name.lower() == field)
    scheme, token = re.fullmatch(r"[ \t]*(\S+) +(\S*)[ \t]*", first).groups()
    assert scheme.lower() == "basic" and BASE64.fullmatch(token)
    assert base64.b64decode(token) == f"{result.user}:{result.password}".encode("utf-8")
    assert result.user and ":" not in result.user


@given(st.lists(st.tuples(names, values), max_size=4))
def test_any_field_value_a_client_sends_never_raises(fields):
    headers = parsed_headers(head(*fields))
    if headers is not None:
        for field in FIELDS:
            check(headers, field)


@given(st.lists(st.tuples(st.sampled_from(["Proxy-Authorization", "Authorization"]),
                          st.text(max_size=60)), max_size=4))
def test_any_text_never_raises(headers):
    for field in FIELDS:
        check(tuple(headers), field)


user = st.text(min_size=1, max_size=30).filter(lambda u: ":" not in u)
password = st.text(max_size=30)
spaces = st.sampled_from(["", " ", "\t", " \t "])


def utf8(text: str) -> bytes | None:
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:     # lone surrogates: no client can send them
        return None


@given(user, password, st.sampled_from(["Basic", "basic", "BASIC", "bAsIc"]),
       st.integers(1, 3), spaces, spaces, st.sampled_from(FIELDS), values)
def test_valid_credentials_read_back_as_sent(user, password, scheme, gap, before, after, field,
                                             second):
    raw = utf8(f"{user}:{password}")
    if raw is None:
        return
    value = f"{before}{scheme}{' ' * gap}{base64.b64encode(raw).decode()}{after}".encode("latin-1")
    headers = (parsed_headers(head((field.encode(), value), (field.encode(), second)))
               or parsed_headers(head((field.encode(), value))))     # when `second` is refused
    assert basic_credentials(headers, field) == Credentials(user, password)
