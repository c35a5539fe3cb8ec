"""WebSocket inspection, sans-I/O (appliance.protocols.websocket_inspect; RFC 6455, RFC 7692).

Bytes come from real wsproto peers (a client and an origin) or are built by hand where a peer
would refuse to send them; what the inspector gives each side is read back by those peers, so
every case checks the close code a real endpoint sees.
"""

from __future__ import annotations

import os
import struct
import tracemalloc
import zlib

import pytest
from wsproto.connection import Connection, ConnectionType
from wsproto.events import BytesMessage, CloseConnection, Ping, Pong, TextMessage
from wsproto.extensions import PerMessageDeflate

from appliance.protocols.h2_mapping import UpstreamHandshakeError
from appliance.protocols.websocket_inspect import (
    CLIENT, ORIGIN, FrameLengthGuard, Outcome, WebSocketInspector, agreed_compression, inspectable_offer,
)

MAX_FRAME, MAX_MESSAGE = 4096, 64 * 1024
TEXT, BINARY, CLOSE, PING, CONT = 0x1, 0x2, 0x8, 0x9, 0x0


def deflate(agreed: str | None) -> list:
    if agreed is None:
        return []
    extension = PerMessageDeflate()
    extension.finalize(agreed)
    return [extension]


class Peers:
    """A real wsproto client and origin on either side of one inspector."""

    def __init__(self, agreed: str | None = None, max_frame: int = MAX_FRAME,
                 max_message: int = MAX_MESSAGE) -> None:
        self.inspector = WebSocketInspector(max_frame, max_message, agreed)
        self.client = Connection(ConnectionType.CLIENT, deflate(agreed))
        self.origin = Connection(ConnectionType.SERVER, deflate(agreed))
        self.violation = None

    def from_client(self, data: bytes) -> tuple[list, list]:
        return self._deliver(self.inspector.receive(CLIENT, data))

    def from_origin(self, data: bytes) -> tuple[list, list]:
        return self._deliver(self.inspector.receive(ORIGIN, data))

    def _deliver(self, outcome) -> tuple[list, list]:
        """(events the client sees, events the origin sees)."""
        self.violation = outcome.violation
        for peer, data in ((self.client, outcome.to_client), (self.origin, outcome.to_origin)):
            if data:
                peer.receive_data(data)
        return list(self.client.events()), list(self.origin.events())


def frame(opcode: int, payload: bytes = b"", *, fin: bool = True, masked: bool = True,
          rsv1: bool = False, length: int | None = None) -> bytes:
    """One frame by hand (RFC 6455 §5.2); `length` announces another length than the payload's."""
    n = len(payload) if length is None else length
    mask_bit = 0x80 if masked else 0
    head = bytes([(0x80 if fin else 0) | (0x40 if rsv1 else 0) | opcode])
    if n < 126:
        head += bytes([mask_bit | n])
    elif n < 1 << 16:
        head += bytes([mask_bit | 126]) + struct.pack("!H", n)
    else:
        head += bytes([mask_bit | 127]) + struct.pack("!Q", n)
    if not masked:
        return head + payload
    key = b"\x11\x22\x33\x44"
    return head + key + bytes(b ^ key[i % 4] for i, b in enumerate(payload))


def deflate_bomb(mebibytes: int) -> bytes:
    """A permessage-deflate payload of `mebibytes` MiB of zeros, about 1 KiB per MiB: one
    compressed MiB repeated (a full flush makes each independent of what came before), in a
    512-byte window that fits whatever window the peers agreed to."""
    compressor = zlib.compressobj(9, zlib.DEFLATED, -9)
    piece = compressor.compress(bytes(1 << 20)) + compressor.flush(zlib.Z_FULL_FLUSH)
    return (piece * mebibytes)[:-4]          # RFC 7692 §7.2.1: without the final 00 00 ff ff


def closes(events: list) -> list[int]:
    return [e.code for e in events if isinstance(e, CloseConnection)]


def assert_cut_off(peers: Peers, violator: str, code: int, seen_by_client, seen_by_origin) -> None:
    assert peers.violation is not None and peers.violation.side == violator
    assert peers.violation.code == code
    own, other = (seen_by_client, seen_by_origin) if violator == CLIENT else (seen_by_origin, seen_by_client)
    assert closes(own) == [code]
    assert closes(other) == [1001 if violator == CLIENT else 1011]
    assert peers.inspector.closed
    for side in (CLIENT, ORIGIN):                        # nothing is parsed after a violation
        assert peers.inspector.receive(side, frame(TEXT, b"late", masked=side == CLIENT)) == Outcome()


# --- what passes, re-framed ---------------------------------------------------------------------

def test_messages_pass_both_ways_reframed():
    peers = Peers()
    _, seen = peers.from_client(peers.client.send(TextMessage(data="héllo")))
    assert [(type(e), e.data) for e in seen] == [(TextMessage, "héllo")]
    seen, _ = peers.from_origin(peers.origin.send(BytesMessage(data=b"\x00\xffbin")))
    assert [(type(e), e.data) for e in seen] == [(BytesMessage, b"\x00\xffbin")]
    assert peers.violation is None


def test_fragments_pass_in_order_and_a_split_character_is_not_invalid():
    peers = Peers()
    data = peers.client.send(TextMessage(data="ab", message_finished=False))
    data += frame(CONT, "é".encode()[:1], fin=False) + frame(CONT, "é".encode()[1:] + b"!")
    _, seen = peers.from_client(data)
    assert "".join(e.data for e in seen) == "abé!" and seen[-1].message_finished
    assert peers.violation is None


def test_bytes_split_at_every_offset_give_the_same_message():
    payload = os.urandom(300)
    data = frame(BINARY, payload)
    for cut in range(1, len(data)):
        peers = Peers()
        _, first = peers.from_client(data[:cut])
        _, second = peers.from_client(data[cut:])
        events = first + second
        assert b"".join(e.data for e in events) == payload and events[-1].message_finished


def test_ping_and_pong_pass():
    peers = Peers()
    _, seen = peers.from_client(peers.client.send(Ping(payload=b"are you there")))
    assert [(type(e), e.payload) for e in seen] == [(Ping, b"are you there")]
    seen, _ = peers.from_origin(peers.origin.send(Pong(payload=b"yes")))
    assert [(type(e), e.payload) for e in seen] == [(Pong, b"yes")]


def test_closing_handshake_passes_and_ends_the_connection():
    peers = Peers()
    _, seen = peers.from_client(peers.client.send(CloseConnection(code=1000, reason="bye")))
    assert [(e.code, e.reason) for e in seen] == [(1000, "bye")]
    assert not peers.inspector.closed
    seen, _ = peers.from_origin(peers.origin.send(CloseConnection(code=1000, reason="bye")))
    assert closes(seen) == [1000]
    assert peers.inspector.closed and peers.violation is None


@pytest.mark.parametrize("code", [1000, 1001, 1003, 1011, 3000, 4999])
def test_valid_close_codes_pass(code):
    peers = Peers()
    _, seen = peers.from_client(frame(CLOSE, struct.pack("!H", code) + b"why"))
    assert [(e.code, e.reason) for e in seen] == [(code, "why")] and peers.violation is None


def test_a_side_gone_without_close_leaves_the_other_a_1001():
    peers = Peers()
    outcome = peers.inspector.peer_gone(CLIENT)
    peers.origin.receive_data(outcome.to_origin)
    assert closes(list(peers.origin.events())) == [1001] and outcome.to_client == b""


# --- masking (RFC 6455 §5.1, §5.3): 1002 -----------------------------------------------------------

def test_unmasked_client_frame_is_1002():
    peers = Peers()
    seen_by_client, seen_by_origin = peers.from_client(frame(TEXT, b"no mask", masked=False))
    assert_cut_off(peers, CLIENT, 1002, seen_by_client, seen_by_origin)
    assert not any(isinstance(e, TextMessage) for e in seen_by_origin)


def test_masked_origin_frame_is_1002_and_the_client_hears_1011():
    peers = Peers()
    seen_by_client, seen_by_origin = peers.from_origin(frame(TEXT, b"masked", masked=True))
    assert_cut_off(peers, ORIGIN, 1002, seen_by_client, seen_by_origin)
    assert not any(isinstance(e, TextMessage) for e in seen_by_client)


# --- sizes: 1009 -----------------------------------------------------------------------------------

def test_frame_announcing_more_than_the_limit_is_1009_before_its_payload():
    peers = Peers()
    seen_by_client, seen_by_origin = peers.from_client(frame(BINARY, b"", length=MAX_FRAME + 1))
    assert_cut_off(peers, CLIENT, 1009, seen_by_client, seen_by_origin)
    assert "4097 bytes" in peers.violation.reason


def test_frame_at_the_limit_passes_and_a_frame_before_a_too_long_one_still_goes():
    peers = Peers()
    good = peers.client.send(BytesMessage(data=b"x" * MAX_FRAME))
    _, seen_by_origin = peers.from_client(good + frame(BINARY, b"", length=1 << 40))
    assert [len(e.data) for e in seen_by_origin if isinstance(e, BytesMessage)] == [MAX_FRAME]
    assert peers.violation.code == 1009 and closes(seen_by_origin) == [1001]


def test_origin_frame_too_long_with_its_header_split_over_reads():
    peers = Peers()
    data = frame(BINARY, b"", masked=False, length=1 << 20)
    assert peers.from_origin(data[:3]) == ([], []) and peers.violation is None
    seen_by_client, seen_by_origin = peers.from_origin(data[3:])
    assert_cut_off(peers, ORIGIN, 1009, seen_by_client, seen_by_origin)


def test_guard_follows_frame_boundaries_over_payloads():
    guard = FrameLengthGuard(10)
    data = frame(BINARY, b"0123456789") + frame(BINARY, b"x" * 11)
    assert guard.admit(data[:5]) == 5
    assert guard.admit(data[5:]) == len(frame(BINARY, b"0123456789")) - 5
    assert guard.refused == 11


def test_fragmented_message_over_the_limit_is_1009_and_its_last_fragment_never_goes():
    peers = Peers()
    piece = b"y" * 4000                     # each frame under the frame limit
    sent = []
    for _ in range(MAX_MESSAGE // len(piece)):
        _, seen = peers.from_client(peers.client.send(BytesMessage(data=piece, message_finished=False)))
        sent += seen
    assert peers.violation is None
    seen_by_client, seen_by_origin = peers.from_client(peers.client.send(BytesMessage(data=piece)))
    assert_cut_off(peers, CLIENT, 1009, seen_by_client, seen_by_origin)
    assert sum(len(e.data) for e in sent) == (MAX_MESSAGE // len(piece)) * len(piece)
    assert not any(isinstance(e, BytesMessage) for e in seen_by_origin)


def test_limits_count_per_message():
    peers = Peers(max_frame=MAX_MESSAGE)
    for _ in range(3):                         # three messages, together over the limit
        _, seen = peers.from_client(peers.client.send(BytesMessage(data=b"z" * (MAX_MESSAGE // 2))))
        assert peers.violation is None and sum(len(e.data) for e in seen) == MAX_MESSAGE // 2


# --- permessage-deflate (RFC 7692): inflated sizes count, bombs stop early ------------------------------

def test_compressed_messages_pass_on_both_legs():
    peers = Peers(agreed="permessage-deflate")
    data = peers.client.send(TextMessage(data="compress me " * 100))
    assert data[0] & 0x40 and len(data) < 200          # RSV1: compressed on the wire
    _, seen = peers.from_client(data)
    assert "".join(e.data for e in seen) == "compress me " * 100
    seen, _ = peers.from_origin(peers.origin.send(BytesMessage(data=b"\x00" * 10000)))
    assert b"".join(e.data for e in seen) == b"\x00" * 10000


def test_deflate_bomb_is_1009_without_inflating_it_whole():
    peers = Peers(agreed="permessage-deflate", max_frame=1 << 20, max_message=1 << 20)
    bomb = deflate_bomb(256)
    assert len(bomb) < 1 << 20                          # one small frame ...
    tracemalloc.start()
    try:
        seen_by_client, seen_by_origin = peers.from_client(frame(BINARY, bomb, rsv1=True))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert_cut_off(peers, CLIENT, 1009, seen_by_client, seen_by_origin)
    assert peak < 24 << 20                              # ... of 256 MiB inflated was never held


def test_invalid_deflate_data_is_1007():
    peers = Peers(agreed="permessage-deflate")
    seen_by_client, seen_by_origin = peers.from_client(frame(BINARY, b"\xff\xff\xff\xff", rsv1=True))
    assert_cut_off(peers, CLIENT, 1007, seen_by_client, seen_by_origin)


def test_compressed_frame_without_agreed_compression_is_1002():
    peers = Peers()
    seen_by_client, seen_by_origin = peers.from_client(frame(BINARY, b"abc", rsv1=True))
    assert_cut_off(peers, CLIENT, 1002, seen_by_client, seen_by_origin)


@pytest.mark.parametrize(("header", "agreed"), [
    (None, None),
    ("permessage-deflate", "permessage-deflate"),
    ('permessage-deflate; Server_No_Context_Takeover; client_max_window_bits="10"',
     "permessage-deflate; server_no_context_takeover; client_max_window_bits=10"),
])
def test_agreed_compression(header, agreed):
    headers = (("Upgrade", "websocket"),) + ((("Sec-WebSocket-Extensions", header),) if header else ())
    assert agreed_compression(headers, True) == agreed


@pytest.mark.parametrize(("header", "allow"), [
    ("permessage-deflate", False),
    ("x-webkit-deflate-frame", True),
    ("permessage-deflate, permessage-deflate", True),
    ("permessage-deflate; client_max_window_bits=8", True),
    ("permessage-deflate; client_max_window_bits", True),
    ("permessage-deflate; unknown_param", True),
])
def test_extensions_inspection_cannot_follow_are_502(header, allow):
    with pytest.raises(UpstreamHandshakeError) as caught:
        agreed_compression((("Sec-WebSocket-Extensions", header),), allow)
    assert caught.value.status == 502


def test_offer_keeps_only_permessage_deflate_and_only_when_allowed():
    headers = (("Host", "a"), ("Sec-WebSocket-Extensions", "x-webkit-deflate-frame, permessage-deflate; "
                                                           "client_max_window_bits"),
               ("sec-websocket-extensions", "foo"))
    assert inspectable_offer(headers, True) == (
        ("Host", "a"), ("Sec-WebSocket-Extensions", "permessage-deflate; client_max_window_bits"))
    assert inspectable_offer(headers, False) == (("Host", "a"),)


# --- UTF-8 (RFC 6455 §8.1): 1007 -------------------------------------------------------------------

def test_invalid_utf8_text_is_1007():
    peers = Peers()
    seen_by_client, seen_by_origin = peers.from_client(frame(TEXT, b"ok \xff\xfe"))
    assert_cut_off(peers, CLIENT, 1007, seen_by_client, seen_by_origin)


def test_text_message_ending_inside_a_character_is_1007():
    peers = Peers()
    seen_by_client, seen_by_origin = peers.from_origin(frame(TEXT, "é".encode()[:1], masked=False))
    assert_cut_off(peers, ORIGIN, 1007, seen_by_client, seen_by_origin)


def test_invalid_utf8_close_reason_is_1007():
    peers = Peers()
    seen_by_client, seen_by_origin = peers.from_client(frame(CLOSE, struct.pack("!H", 1000) + b"\xc3"))
    assert_cut_off(peers, CLIENT, 1007, seen_by_client, seen_by_origin)


# --- close codes (RFC 6455 §7.4): 1002 -------------------------------------------------------------

@pytest.mark.parametrize("code", [0, 999, 1004, 1005, 1006, 1015, 1016, 2999, 5000, 65535])
def test_reserved_or_out_of_range_close_code_is_1002(code):
    peers = Peers()
    seen_by_client, seen_by_origin = peers.from_client(frame(CLOSE, struct.pack("!H", code)))
    assert_cut_off(peers, CLIENT, 1002, seen_by_client, seen_by_origin)


def test_close_with_a_one_byte_payload_is_1002():
    peers = Peers()
    seen_by_client, seen_by_origin = peers.from_client(frame(CLOSE, b"\x03"))
    assert_cut_off(peers, CLIENT, 1002, seen_by_client, seen_by_origin)


# --- control frames (RFC 6455 §5.5) and other framing: 1002 -------------------------------------------

@pytest.mark.parametrize("data", [
    frame(PING, b"p" * 126),                       # over 125 bytes
    frame(PING, b"p", fin=False),                  # fragmented
    frame(CLOSE, struct.pack("!H", 1000) + b"r" * 124),
    frame(0x3, b"reserved opcode"),
    bytes([0x82 | 0x20, 0x80]) + b"\0\0\0\0",      # RSV2 with no extension
    frame(CONT, b"continuation of nothing"),
    frame(TEXT, b"a", fin=False) + frame(TEXT, b"b"),   # a new message inside a message
], ids=["long ping", "fragmented ping", "long close", "opcode 3", "rsv2", "lone continuation",
        "nested message"])
def test_framing_errors_are_1002(data):
    peers = Peers()
    seen_by_client, seen_by_origin = peers.from_client(data)
    assert_cut_off(peers, CLIENT, 1002, seen_by_client, seen_by_origin)


def test_a_side_leaving_after_a_violation_adds_nothing():
    peers = Peers()
    peers.from_client(frame(TEXT, b"x", masked=False))
    assert peers.inspector.peer_gone(ORIGIN) == Outcome() == peers.inspector.peer_gone(CLIENT)
