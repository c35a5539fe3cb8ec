"""WebSocket inspection: both legs' framing terminated with wsproto, every message re-framed.

Sans-I/O. Where the data path says "WebSocket messages (wsproto, when inspecting)": after the
origin's 101 (the handshake itself is checked in `h2_mapping.check_websocket_switch`), an
admin who set `[websocket] inspect = true` gets, instead of a byte tunnel, two wsproto
connections built after a handshake done elsewhere: a server toward the client, a client toward
the origin. Bytes from one side go in, the bytes to send to either side come out, and, when a
side broke RFC 6455 or a limit, a `Violation` naming the side and the close code it gets:

  - frames of a client that are not masked, or of an origin that are (RFC 6455 §5.1), control
    frames over 125 bytes or fragmented (§5.5), bad opcodes, reserved bits, close codes that are
    reserved or out of range (§7.4): 1002 (wsproto finds these);
  - text that is not UTF-8, in a message or a close reason (§8.1): 1007 (wsproto);
  - a frame announcing more than `max_frame_bytes`: 1009, found in its header by
    `FrameLengthGuard` before any of its payload is read;
  - a message (all its fragments, inflated) over `max_message_bytes`: 1009.

permessage-deflate (RFC 7692), when the origin agreed to it and `allow_compression` is on, is
terminated too: wsproto inflates without any output bound, so compressed bytes are fed to it in
slices of `INFLATE_SLICE` bytes and the message size is checked after each; since deflate
inflates at most about 1032:1, a bomb is stopped at most about a megabyte past the limit instead
of being inflated whole. Other extensions cannot be inspected: their offers are taken out of the
client's handshake (`inspectable_offer`), and an origin that agrees to one anyway is refused
with 502 before the client sees a 101 (`agreed_compression`).

The violator gets its close code, the other side 1011 (an origin failed: RFC 6455 §7.4.1's
"unexpected condition" for the client) or 1001 (the client went away, for the origin).
"""

from __future__ import annotations

from dataclasses import dataclass

from wsproto.connection import Connection, ConnectionState, ConnectionType
from wsproto.events import BytesMessage, CloseConnection, Message, Ping, Pong, TextMessage
from wsproto.extensions import PerMessageDeflate

from .h2_mapping import UpstreamHandshakeError
from .http1 import Headers, header_values

CLIENT, ORIGIN = "client", "origin"
MESSAGE_TOO_BIG = 1009
# What the side that kept the rules hears when the other one broke them.
_BYSTANDER_CODE = {CLIENT: 1011, ORIGIN: 1001}
# Deflate's largest expansion is about 1032:1: one slice of compressed bytes inflates to at most
# about 1 MiB before the message size is checked again.
INFLATE_SLICE = 1024
_PMD = "permessage-deflate"
_PMD_FLAGS = ("client_no_context_takeover", "server_no_context_takeover")
_PMD_BITS = ("client_max_window_bits", "server_max_window_bits")
_CAN_SEND = (ConnectionState.OPEN, ConnectionState.REMOTE_CLOSING)      # a Close, that is
_CAN_RECEIVE = (ConnectionState.OPEN, ConnectionState.LOCAL_CLOSING)


@dataclass(frozen=True)
class Violation:
    """`side` broke the rules; it is sent a Close with `code`, and `reason` is what the logs say."""

    side: str
    code: int
    reason: str

    def describe(self) -> str:
        return f"websocket {self.side} violation, closed {self.code}: {self.reason}"


@dataclass(frozen=True)
class Outcome:
    """What one input produced: bytes for each side (either may be empty), and the violation
    that ended the connection, if this input was one."""

    to_client: bytes = b""
    to_origin: bytes = b""
    violation: Violation | None = None


# --- the handshake: which extensions inspection can follow -------------------------------------

def _elements(values: list[str]) -> list[str]:
    return [e.strip() for v in values for e in v.split(",") if e.strip()]


def inspectable_offer(headers: Headers, allow_compression: bool) -> Headers:
    """The client's handshake fields with only the extension offers inspection can follow:
    permessage-deflate when `allow_compression`, nothing else."""
    kept = [e for e in _elements(header_values(headers, "sec-websocket-extensions"))
            if allow_compression and e.split(";", 1)[0].strip().lower() == _PMD]
    out = tuple((k, v) for k, v in headers if k.lower() != "sec-websocket-extensions")
    return out + ((("Sec-WebSocket-Extensions", ", ".join(kept)),) if kept else ())


def agreed_compression(headers: Headers, allow_compression: bool) -> str | None:
    """The permessage-deflate parameters the origin's 101 agreed to, normalized ("" for the
    defaults), or None without compression; an extension inspection cannot follow (any other,
    two of them, compression when not allowed, parameters out of RFC 7692 §7.1) is a 502."""
    agreed = _elements(header_values(headers, "sec-websocket-extensions"))
    if not agreed:
        return None
    name, *params = [p.strip() for p in agreed[0].split(";")]
    if len(agreed) > 1 or name.lower() != _PMD or not allow_compression:
        raise UpstreamHandshakeError(f"origin agreed to WebSocket extensions {agreed!r}, which "
                                     "inspection cannot follow", 101)
    normalized = []
    for param in params:
        key, _, value = (p.strip().strip('"') for p in param.partition("="))
        key = key.lower()
        if key in _PMD_FLAGS and not value:
            normalized.append(key)
        elif key in _PMD_BITS and value.isdigit() and 9 <= int(value) <= 15:
            normalized.append(f"{key}={int(value)}")
        else:
            raise UpstreamHandshakeError(f"origin agreed to permessage-deflate with {param!r}, "
                                         "which inspection cannot follow", 101)
    return "; ".join([_PMD, *normalized])


def _deflate(agreed: str | None) -> list[PerMessageDeflate]:
    if agreed is None:
        return []
    extension = PerMessageDeflate()
    extension.finalize(agreed)           # both legs take the parameters the origin answered
    return [extension]


# --- frame headers: announced lengths, before any payload ---------------------------------------

def _announced_length(head: bytearray) -> int | None:
    """The payload length a frame header announces (RFC 6455 §5.2), None until it is whole."""
    if len(head) < 2:
        return None
    short = head[1] & 0x7F
    extra = {126: 2, 127: 8}.get(short, 0)
    if len(head) < 2 + extra + (4 if head[1] & 0x80 else 0):
        return None
    return int.from_bytes(head[2:2 + extra], "big") if extra else short


class FrameLengthGuard:
    """Follows the frame boundaries of one direction's bytes, to refuse a frame by the length
    its header announces, before any of its payload is read."""

    def __init__(self, max_frame_bytes: int) -> None:
        self.max_frame_bytes = max_frame_bytes
        self._head = bytearray()
        self._payload_left = 0
        self.refused: int | None = None       # the announced length of a refused frame

    def admit(self, data: bytes) -> int:
        """How many bytes of `data` come before the header of a frame that is too long."""
        i = 0
        while i < len(data):
            if self._payload_left:
                step = min(self._payload_left, len(data) - i)
                self._payload_left -= step
                i += step
                continue
            self._head.append(data[i])
            i += 1
            length = _announced_length(self._head)
            if length is None:
                continue
            start = max(i - len(self._head), 0)    # a header split over reads began earlier
            self._head.clear()
            if length > self.max_frame_bytes:
                self.refused = length
                return start
            self._payload_left = length
        return len(data)


# --- the two legs -------------------------------------------------------------------------------

class _Leg:
    """One direction: what `side` sends, read by `receiver`, re-framed by `sender`."""

    def __init__(self, side: str, receiver: Connection, sender: Connection, max_frame_bytes: int,
                 compressed: bool) -> None:
        self.side = side
        self.other = ORIGIN if side == CLIENT else CLIENT
        self.receiver, self.sender = receiver, sender
        self.guard = FrameLengthGuard(max_frame_bytes)
        self.slice = INFLATE_SLICE if compressed else None
        self.message_bytes = 0


class WebSocketInspector:
    """Both legs of one inspected WebSocket. `agreed` is `agreed_compression` of the origin's 101."""

    def __init__(self, max_frame_bytes: int, max_message_bytes: int, agreed: str | None) -> None:
        self.max_message_bytes = max_message_bytes
        toward_client = Connection(ConnectionType.SERVER, _deflate(agreed))
        toward_origin = Connection(ConnectionType.CLIENT, _deflate(agreed))
        compressed = agreed is not None
        self._legs = {
            CLIENT: _Leg(CLIENT, toward_client, toward_origin, max_frame_bytes, compressed),
            ORIGIN: _Leg(ORIGIN, toward_origin, toward_client, max_frame_bytes, compressed),
        }
        self.violation: Violation | None = None

    @property
    def closed(self) -> bool:
        """The closing handshake is done both ways, or a violation ended the connection."""
        return self.violation is not None or all(
            leg.receiver.state is ConnectionState.CLOSED for leg in self._legs.values())

    def receive(self, side: str, data: bytes) -> Outcome:
        """Bytes that `side` sent."""
        leg = self._legs[side]
        out = {CLIENT: bytearray(), ORIGIN: bytearray()}
        if self.closed or leg.receiver.state not in _CAN_RECEIVE:
            return Outcome()                  # after its Close a side has nothing more to say
        admitted = leg.guard.admit(data)
        step = leg.slice or max(admitted, 1)
        for start in range(0, admitted, step):
            if leg.receiver.state not in _CAN_RECEIVE:
                break                         # its Close came: the rest is to be ignored
            leg.receiver.receive_data(data[start:start + step])
            if not self._drain(leg, out):
                break
        if leg.guard.refused is not None and self.violation is None \
                and leg.receiver.state in _CAN_RECEIVE:
            self._violate(leg, MESSAGE_TOO_BIG, f"a frame of {leg.guard.refused} bytes, over "
                          f"max_frame_bytes {leg.guard.max_frame_bytes}", out)
        return Outcome(bytes(out[CLIENT]), bytes(out[ORIGIN]), self.violation)

    def peer_gone(self, side: str) -> Outcome:
        """`side` closed its connection: the other side hears 1001 unless it was closing anyway."""
        leg = self._legs[side]
        if self.closed or leg.sender.state not in _CAN_SEND:
            return Outcome()
        data = leg.sender.send(CloseConnection(1001, f"the {side} went away"))
        return Outcome(**{f"to_{leg.other}": data})

    def _drain(self, leg: _Leg, out: dict[str, bytearray]) -> bool:
        """Passes on what `leg.receiver` parsed; False once the side broke a rule."""
        for event in leg.receiver.events():
            if isinstance(event, CloseConnection):
                if leg.receiver.state in _CAN_RECEIVE:   # state unchanged: wsproto's parse failure
                    self._violate(leg, event.code, event.reason or "protocol error", out)
                    return False
                if leg.sender.state in _CAN_SEND:
                    out[leg.other] += leg.sender.send(CloseConnection(event.code, event.reason))
            elif isinstance(event, Message):
                if not self._pass_message(leg, event, out):
                    return False
            elif isinstance(event, (Ping, Pong)) and leg.sender.state is ConnectionState.OPEN:
                out[leg.other] += leg.sender.send(type(event)(payload=event.payload))
        return True

    def _pass_message(self, leg: _Leg, event: Message, out: dict[str, bytearray]) -> bool:
        text = isinstance(event, TextMessage)
        leg.message_bytes += len(event.data.encode("utf-8")) if text else len(event.data)
        if leg.message_bytes > self.max_message_bytes:
            self._violate(leg, MESSAGE_TOO_BIG, f"a message of over {self.max_message_bytes} "
                          "bytes (max_message_bytes)", out)
            return False
        if event.message_finished:
            leg.message_bytes = 0
        if (event.data or event.message_finished) and leg.sender.state is ConnectionState.OPEN:
            kind = TextMessage if text else BytesMessage
            out[leg.other] += leg.sender.send(kind(data=event.data, message_finished=event.message_finished))
        return True

    def _violate(self, leg: _Leg, code: int, reason: str, out: dict[str, bytearray]) -> None:
        self.violation = Violation(leg.side, code, reason)
        if leg.receiver.state in _CAN_SEND:
            out[leg.side] += leg.receiver.send(CloseConnection(code, reason))
        if leg.sender.state in _CAN_SEND:
            out[leg.other] += leg.sender.send(CloseConnection(
                _BYSTANDER_CODE[leg.other], f"the {leg.side} broke the WebSocket protocol"))
