"""Hypothesis fuzzing of `appliance.protocols.socks5` (RFC 1928, RFC 1929) as the listener reads.

The SOCKS5 frontend keeps one buffer: it calls a parser on everything received so far, and keeps
what the parser did not use for the next message. These tests feed the parsers the same way,
with the bytes cut anywhere, and check:
  - valid handshakes (greeting, credentials, request, then tunnel bytes) give the same messages
    and the same left-over bytes however the network splits them;
  - arbitrary bytes, and valid handshakes with one byte changed, end the same way for every
    split (a message, a `Socks5Error`, or "still incomplete"), and never in another exception;
  - each refusal is the right kind for its stage: a greeting is closed without a reply code,
    credentials are answered "failure" (RFC 1929 §2), a request gets an RFC 1928 §6 reply code.

Example counts come from the hypothesis profile (tests/conftest.py).
"""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from appliance.protocols import socks5
from appliance.protocols.socks5 import (
    Credentials,
    Greeting,
    Request,
    Socks5Error,
    auth_reply,
    parse_credentials,
    parse_greeting,
    parse_request,
)

from .test_fuzz_http1 import split_at

STAGES = {"greeting": parse_greeting, "credentials": parse_credentials, "request": parse_request}


def read_handshake(pieces: list[bytes], stages: list[str]):
    """What the listener makes of `pieces` arriving in turn: (messages, outcome, left over).

    `outcome` is "done" (every stage parsed), "incomplete" (the client stopped sending), or the
    `Socks5Error` as (stage, message, reply, answer): comparable across splits.
    """
    messages, buffered, arrived = [], b"", iter(pieces)
    for stage in stages:
        for _ in range(len(pieces) + 1):
            try:
                parsed = STAGES[stage](buffered)
            except Socks5Error as exc:
                return messages, (stage, str(exc), exc.reply, exc.answer), None
            if parsed is not None:
                message, used = parsed
                assert 0 < used <= len(buffered)
                messages.append(message)
                buffered = buffered[used:]
                break
            more = next(arrived, None)
            if more is None:
                return messages, "incomplete", None
            buffered += more
    return messages, "done", buffered + b"".join(arrived)


# --- generated valid handshakes --------------------------------------------------------------

methods = st.lists(st.integers(0, 255), min_size=1, max_size=255)
utf8_field = st.text(max_size=40).map(lambda s: s.encode("utf-8")).filter(lambda b: len(b) <= 255)
user_field = st.one_of(utf8_field.filter(bool), st.just(b"u" * 255))
label = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,20}[a-z0-9])?", fullmatch=True)
hosts = st.one_of(st.ip_addresses(v=4).map(str), st.ip_addresses(v=6).map(str),
                  st.lists(label, min_size=1, max_size=4).map(".".join).filter(
                      lambda n: not n.replace(".", "").isdigit()))
cuts = st.lists(st.integers(min_value=0, max_value=10 ** 6), max_size=12)


@st.composite
def handshakes(draw):
    """(wire bytes, stages, expected messages, tunnel bytes) of a valid client handshake."""
    offered = draw(methods)
    wire = bytes([5, len(offered), *offered])
    stages, expected = ["greeting"], [Greeting(tuple(offered))]
    if draw(st.booleans()):
        user, password = draw(user_field), draw(utf8_field)
        wire += bytes([1, len(user)]) + user + bytes([len(password)]) + password
        stages.append("credentials")
        expected.append(Credentials(user.decode("utf-8"), password.decode("utf-8")))
    command, host, port = draw(st.sampled_from([1, 2, 3])), draw(hosts), draw(st.integers(0, 65535))
    address = socks5._encode_address(host, port)
    wire += bytes([5, command, 0]) + address
    stages.append("request")
    expected.append(Request(command, host, port, address[0]))
    tunnel = draw(st.binary(max_size=64))
    return wire + tunnel, stages, expected, tunnel


@given(handshakes(), cuts)
def test_valid_handshakes_read_the_same_in_any_split(handshake, cut_at):
    wire, stages, expected, tunnel = handshake
    messages, outcome, left_over = read_handshake(split_at(wire, cut_at), stages)
    assert (messages, outcome, left_over) == (expected, "done", tunnel)


@given(handshakes(), st.integers(min_value=0, max_value=10 ** 6))
def test_every_proper_prefix_of_a_handshake_is_incomplete(handshake, end):
    wire, stages, expected, tunnel = handshake
    prefix = wire[:end % (len(wire) - len(tunnel))]
    messages, outcome, _ = read_handshake([prefix], stages)
    assert outcome == "incomplete" and len(messages) < len(expected)


# --- hostile bytes ----------------------------------------------------------------------------

def check_refusal(outcome) -> None:
    """Each stage refuses in its own way (see the module docstring)."""
    if not isinstance(outcome, tuple):
        return
    stage, _, reply, answer = outcome
    if stage == "greeting":
        assert reply is None and answer in (b"", socks5.method_selection(socks5.METHOD_NONE_ACCEPTABLE))
    elif stage == "credentials":
        assert reply is None and answer == auth_reply(False)
    else:
        assert reply in socks5.REPLY_NAMES and reply != socks5.REP_SUCCEEDED and answer == b""


# Pieces of real messages, so generated inputs get past the first bytes often enough to matter.
PIECES = [b"\x05", b"\x01", b"\x00", b"\x02", b"\x03", b"\x04", b"\xff", b"\x0b", b"a.example",
          b"\x7f\x00\x00\x01", bytes(16), b"\x00\x50", b"\xc3\xa9", b".", b"-", b"_", b"1.2.3.4"]
hostile = st.one_of(st.binary(max_size=300), st.lists(st.sampled_from(PIECES), max_size=16).map(b"".join))
stage_lists = st.sampled_from([["greeting", "request"], ["greeting", "credentials", "request"],
                               ["credentials"], ["request"]])


@given(hostile, stage_lists, cuts)
def test_arbitrary_bytes_end_the_same_in_any_split(data, stages, cut_at):
    whole = read_handshake([data], stages)
    assert read_handshake(split_at(data, cut_at), stages) == whole
    check_refusal(whole[1])


@given(handshakes(), st.data())
def test_one_changed_byte_ends_the_same_in_any_split(handshake, data):
    wire, stages, _, tunnel = handshake
    at = data.draw(st.integers(0, len(wire) - len(tunnel) - 1), label="at")
    value = data.draw(st.integers(0, 255).filter(lambda v: v != wire[at]), label="value")
    corrupted = wire[:at] + bytes([value]) + wire[at + 1:]
    whole = read_handshake([corrupted], stages)
    assert read_handshake(split_at(corrupted, data.draw(cuts, label="cuts")), stages) == whole
    check_refusal(whole[1])


@given(st.binary(min_size=1, max_size=300))
def test_a_refused_greeting_or_request_depends_only_on_what_came_before(data):
    """The parser that refuses a buffer refuses the same way whatever follows: it never looks
    past the message it is reading (so nothing of a pipelined tunnel changes the verdict)."""
    for parse in STAGES.values():
        try:
            parsed = parse(data)
        except Socks5Error as exc:
            for extra in (b"\x00", b"\xff" * 300):
                try:
                    parse(data + extra)
                except Socks5Error as again:
                    assert (str(again), again.reply, again.answer) == (str(exc), exc.reply, exc.answer)
                else:
                    raise AssertionError(f"{parse.__name__} refused {data!r} but not with more")
        else:
            if parsed is not None:
                assert parse(data + b"\xff" * 300) == parsed
