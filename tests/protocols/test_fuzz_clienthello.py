"""Hypothesis fuzzing of `appliance.protocols.tls_clienthello` as the interception frontend reads.

`frontends/intercept.py` peeks at a growing buffer and calls `read_client_hello` on it until the
answer is not None. So, whatever the bytes (captured real hellos from curl, Chromium, OpenSSL,
Python and Node; the same re-framed over many records; with a byte changed, cut, or followed by
more; or anything at all):
  - the only exceptions are `NotTls` and `MalformedHello` with an RFC 8446 §6 alert;
  - the first verdict on a growing buffer is the verdict on all of it, wherever TCP cut it:
    a hello, not TLS, or malformed with the same alert (checks run in the order the bytes come:
    a record's length before the handshake header inside it); no verdict depends on bytes past
    the ones it was made from (nothing is read past them);
  - a buffer of `max_bytes` + 5 bytes always has a verdict, and a hello found within the budget
    is found in the first `max_bytes` bytes alone: what is held while waiting stays bounded.

Example counts come from the hypothesis profile (tests/conftest.py).
"""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from appliance.protocols import tls_clienthello as hello_codec
from appliance.protocols.tls_clienthello import ClientHello, MalformedHello, NotTls, read_client_hello

from .test_fuzz_http1 import split_at
from .test_rfc8446_captured_hellos import RAW, message_of, reframe

ALERTS = {hello_codec.ALERT_UNEXPECTED_MESSAGE, hello_codec.ALERT_RECORD_OVERFLOW,
          hello_codec.ALERT_ILLEGAL_PARAMETER, hello_codec.ALERT_DECODE_ERROR}


def verdict(data: bytes, max_bytes: int = 16384 * 4):
    """None, a ClientHello, or the refusal as (type, alert): comparable across calls."""
    try:
        return read_client_hello(data, max_bytes)
    except NotTls:
        return NotTls, None
    except MalformedHello as exc:
        assert exc.alert in ALERTS
        return MalformedHello, exc.alert


def first_verdict(pieces: list[bytes], max_bytes: int = 16384 * 4):
    """What the frontend decides: the first answer that is not None on the growing buffer."""
    buffered = b""
    for piece in pieces:
        buffered += piece
        answer = verdict(buffered, max_bytes)
        if answer is not None:
            return answer
    return None


@st.composite
def framed_hellos(draw) -> bytes:
    """A captured hello, as sent or re-framed over several handshake records."""
    raw = RAW[draw(st.sampled_from(sorted(RAW)))]
    if draw(st.booleans()):
        return raw
    message = message_of(raw)
    return reframe(message, draw(st.lists(st.integers(1, len(message) - 1), max_size=10)))


@st.composite
def damaged(draw, messages) -> bytes:
    """A message with a few bytes changed, inserted or removed, or cut short."""
    data = bytearray(draw(messages))
    for _ in range(draw(st.integers(1, 4))):
        action = draw(st.sampled_from(["change", "insert", "remove", "cut"]))
        at = draw(st.integers(0, max(len(data) - 1, 0)))
        if action == "change" and data:
            data[at] = draw(st.integers(0, 255))
        elif action == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=8))
        elif action == "remove":
            del data[at:at + draw(st.integers(1, 8))]
        else:
            del data[at:]
    return bytes(data)


# What a client may send: a hello, a damaged one, or anything; then maybe more bytes behind it.
streams = st.tuples(
    st.one_of(framed_hellos(), damaged(framed_hellos()), st.binary(max_size=600),
              st.binary(max_size=600).map(lambda tail: b"\x16\x03\x01" + tail)),
    st.one_of(st.just(b""), st.binary(max_size=64), framed_hellos().map(lambda raw: raw[:40])),
).map(b"".join)
cuts = st.lists(st.integers(min_value=0, max_value=10 ** 6), max_size=16)


@given(framed_hellos(), cuts, st.binary(max_size=64))
def test_real_hellos_read_the_same_in_any_split_and_with_anything_behind(raw, cut_at, behind):
    expected = read_client_hello(raw)
    assert isinstance(expected, ClientHello)
    assert first_verdict(split_at(raw + behind, cut_at)) == expected


@given(streams, cuts)
def test_the_first_verdict_is_the_verdict_on_everything(data, cut_at):
    assert first_verdict(split_at(data, cut_at)) == verdict(data)


@given(streams, st.integers(min_value=0, max_value=10 ** 6))
def test_a_verdict_never_changes_with_more_bytes(data, end):
    end %= len(data) + 1
    early = verdict(data[:end])
    if early is not None:
        assert verdict(data) == early


@given(st.one_of(framed_hellos(), streams), st.integers(min_value=1, max_value=2500))
def test_the_byte_budget_bounds_what_is_held(data, max_bytes):
    answer = verdict(data, max_bytes)
    if isinstance(answer, ClientHello):
        assert verdict(data[:max_bytes], max_bytes) == answer
    if len(data) >= max_bytes + 5:
        assert answer is not None
