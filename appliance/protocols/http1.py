"""HTTP/1.1 message heads and body framing, as a forward proxy needs them (RFC 9112).

Sans-I/O: the HTTP/1.1 frontend and the origin pool feed bytes in and get frozen heads, body
pieces and bytes to send back. Nothing here touches a socket or the clock.

Why not h11: a proxy sits between two parties that may disagree about where a message ends, so
it must refuse what h11 0.14 (Debian bookworm) and 0.16 both accept and quietly repair:
obs-fold continuation lines are unfolded, and a request carrying both Content-Length and
Transfer-Encoding is read as chunked (the classic request-smuggling pair, RFC 9112 §6.1 and
§11.2). A proxy also needs the head as the client wrote it (header case and order kept) and the
Content-Length body as raw bytes it can move without a parser in the way.

Errors: `RemoteProtocolError` means the peer sent something invalid and carries the HTTP status
to answer with; `LocalProtocolError` means our own code tried to build an invalid message.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

Headers = tuple[tuple[str, str], ...]

MAX_CHUNK_LINE = 4096          # chunk-size line with extensions; real ones are tens of bytes
MAX_HEADER_LINES = 256


class ProtocolError(Exception):
    """An HTTP/1.1 message that cannot be handled."""


class RemoteProtocolError(ProtocolError):
    """The peer broke the protocol; `status` is the answer a server gives to such a request."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


class LocalProtocolError(ProtocolError):
    """Our side tried to build a message the protocol forbids."""


@dataclass(frozen=True)
class RequestHead:
    method: str
    target: str
    version: tuple[int, int]
    headers: Headers


@dataclass(frozen=True)
class ResponseHead:
    version: tuple[int, int]
    status: int
    reason: str
    headers: Headers


@dataclass(frozen=True)
class Framing:
    """How a message body is delimited (RFC 9112 §6.3)."""

    kind: str            # "none" | "length" | "chunked" | "close"
    length: int = 0


NO_BODY = Framing("none")
CHUNKED = Framing("chunked")
UNTIL_CLOSE = Framing("close")

_TOKEN = rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
_REQUEST_LINE = re.compile(rb"(" + _TOKEN + rb") ([\x21-\x7e]+) HTTP/([0-9])\.([0-9])")
_STATUS_LINE = re.compile(rb"HTTP/([0-9])\.([0-9]) ([0-9]{3})(?: ([\t\x20-\x7e\x80-\xff]*))?")
_HEADER_LINE = re.compile(rb"(" + _TOKEN + rb"):[ \t]*([\t\x20-\x7e\x80-\xff]*?)[ \t]*")
_CHUNK_LINE = re.compile(rb"([0-9A-Fa-f]{1,16})[ \t]*(?:;[\t\x20-\x7e\x80-\xff]*)?")
_DIGITS = re.compile(r"[0-9]{1,18}")


# --- heads -----------------------------------------------------------------------------------

def find_head_end(buf: bytes | bytearray, max_bytes: int) -> int:
    """Index just past the blank line that ends a head in `buf`, or -1 if more bytes are needed.

    Lines may end in CRLF or a bare LF (RFC 9112 §2.2 lets a recipient accept LF). Raises
    `RemoteProtocolError` once `max_bytes` are buffered without a complete head.
    """
    ends = [i for i in (buf.find(b"\n\r\n", 0, max_bytes), buf.find(b"\n\n", 0, max_bytes)) if i >= 0]
    if ends:
        i = min(ends)
        end = i + (3 if buf[i + 1:i + 2] == b"\r" else 2)
        if end <= max_bytes:
            return end
    if len(buf) >= max_bytes:
        raise RemoteProtocolError(f"message head larger than {max_bytes} bytes")
    return -1


def _head_lines(data: bytes) -> list[bytes]:
    lines = data.split(b"\n")
    while lines and lines[-1] in (b"", b"\r"):
        lines.pop()
    out = []
    for line in lines:
        if line.endswith(b"\r"):
            line = line[:-1]
        if b"\r" in line:
            raise RemoteProtocolError("bare CR in message head")
        out.append(line)
    if not out:
        raise RemoteProtocolError("empty message head")
    return out


def _parse_header_lines(lines: list[bytes]) -> Headers:
    if len(lines) > MAX_HEADER_LINES:
        raise RemoteProtocolError(f"more than {MAX_HEADER_LINES} header fields")
    headers = []
    for line in lines:
        if line[:1] in (b" ", b"\t"):
            raise RemoteProtocolError("obsolete line folding (obs-fold) in header")
        m = _HEADER_LINE.fullmatch(line)
        if m is None:
            name = line.split(b":", 1)[0]
            if b":" not in line or not re.fullmatch(_TOKEN, name):
                raise RemoteProtocolError(f"invalid header name {name[:40]!r}")
            raise RemoteProtocolError(f"invalid characters in header {name.decode('latin-1')!r}")
        headers.append((m.group(1).decode("ascii"), m.group(2).decode("latin-1")))
    return tuple(headers)


def parse_request_head(data: bytes) -> RequestHead:
    """Parse a request head (request line, fields, blank line) as returned by `find_head_end`."""
    lines = _head_lines(data)
    m = _REQUEST_LINE.fullmatch(lines[0])
    if m is None:
        raise RemoteProtocolError(f"invalid request line {lines[0][:80]!r}")
    version = (int(m.group(3)), int(m.group(4)))
    if version[0] != 1:
        raise RemoteProtocolError(f"HTTP/{version[0]}.{version[1]} is not supported here", 505)
    headers = _parse_header_lines(lines[1:])
    return RequestHead(m.group(1).decode("ascii"), m.group(2).decode("ascii"), version, headers)


def parse_response_head(data: bytes) -> ResponseHead:
    """Parse a response head from an origin."""
    try:
        lines = _head_lines(data)
    except RemoteProtocolError as exc:
        raise RemoteProtocolError(f"origin response: {exc}", 502) from None
    m = _STATUS_LINE.fullmatch(lines[0])
    if m is None:
        raise RemoteProtocolError(f"invalid status line {lines[0][:80]!r}", 502)
    version = (int(m.group(1)), int(m.group(2)))
    if version[0] != 1:
        raise RemoteProtocolError(f"origin answered HTTP/{version[0]}.{version[1]}", 502)
    try:
        headers = _parse_header_lines(lines[1:])
    except RemoteProtocolError as exc:
        raise RemoteProtocolError(f"origin response: {exc}", 502) from None
    reason = (m.group(4) or b"").decode("latin-1")
    return ResponseHead(version, int(m.group(3)), reason, headers)


def serialize_head(start_line: str, headers: Headers) -> bytes:
    """Encode a start line and fields; refuses CR/LF in anything (header injection)."""
    parts = [start_line]
    parts.extend(f"{name}: {value}" for name, value in headers)
    if any("\r" in part or "\n" in part for part in parts):
        raise LocalProtocolError("CR or LF inside a start line or header")
    return "\r\n".join(parts).encode("latin-1") + b"\r\n\r\n"


def request_line(method: str, target: str, version: tuple[int, int] = (1, 1)) -> str:
    return f"{method} {target} HTTP/{version[0]}.{version[1]}"


def status_line(status: int, reason: str, version: tuple[int, int] = (1, 1)) -> str:
    return f"HTTP/{version[0]}.{version[1]} {status} {reason}"


# --- header field helpers -------------------------------------------------------------------

def header_values(headers: Headers, name: str) -> list[str]:
    """All values of a field, comma-separated lists split (RFC 9110 §5.3).

    Only SP and HTAB are whitespace here (OWS, RFC 9110 §5.6.3): `str.strip()` would also take
    NBSP or NEL (obs-text bytes read as Latin-1) off `chunked\xa0`, reading a coding that no
    strict parser after us would."""
    lname = name.lower()
    out = []
    for key, value in headers:
        if key.lower() == lname:
            out.extend(v.strip(" \t") for v in value.split(",") if v.strip(" \t"))
    return out


def header_value(headers: Headers, name: str) -> str | None:
    """The first raw value of a field, or None."""
    lname = name.lower()
    for key, value in headers:
        if key.lower() == lname:
            return value
    return None


def connection_tokens(headers: Headers) -> set[str]:
    return {v.lower() for v in header_values(headers, "connection")}


def wants_keep_alive(version: tuple[int, int], headers: Headers) -> bool:
    """Persistence per RFC 9112 §9.3: 1.1 unless `close`, 1.0 only with `keep-alive`."""
    tokens = connection_tokens(headers)
    if "close" in tokens:
        return False
    return version >= (1, 1) or "keep-alive" in tokens


# --- framing --------------------------------------------------------------------------------

def _content_length(headers: Headers) -> int | None:
    raw = [value for key, value in headers if key.lower() == "content-length"]
    if not raw:
        return None
    # Split by hand, not with header_values: that drops empty list elements, and an empty
    # or "5," Content-Length must be refused, not read as absent (RFC 9112 §6.3 item 5).
    values = [v.strip(" \t") for value in raw for v in value.split(",")]
    if any(not _DIGITS.fullmatch(v) for v in values):
        raise RemoteProtocolError("invalid Content-Length")
    if len({int(v) for v in values}) != 1:
        raise RemoteProtocolError("conflicting Content-Length values")
    return int(values[0])


def request_framing(head: RequestHead) -> Framing:
    """Body framing of a request; refuses the ambiguous combinations a smuggler would use."""
    codings = [c.lower() for c in header_values(head.headers, "transfer-encoding")]
    has_length = header_value(head.headers, "content-length") is not None
    if codings and has_length:
        raise RemoteProtocolError("both Content-Length and Transfer-Encoding")
    if codings:
        if codings != ["chunked"]:
            if codings[-1] != "chunked":
                raise RemoteProtocolError("request Transfer-Encoding must end in chunked")
            raise RemoteProtocolError("only Transfer-Encoding: chunked is supported", 501)
        if head.version < (1, 1):
            raise RemoteProtocolError("Transfer-Encoding in an HTTP/1.0 request")
        return CHUNKED
    length = _content_length(head.headers)
    return Framing("length", length) if length else NO_BODY


def response_framing(request_method: str, head: ResponseHead) -> Framing:
    """Body framing of a response to `request_method` (RFC 9112 §6.3, in its order)."""
    if request_method == "HEAD" or head.status < 200 or head.status in (204, 304):
        return NO_BODY
    if request_method == "CONNECT" and 200 <= head.status < 300:
        return NO_BODY
    codings = [c.lower() for c in header_values(head.headers, "transfer-encoding")]
    if codings:
        return CHUNKED if codings[-1] == "chunked" else UNTIL_CLOSE
    try:
        length = _content_length(head.headers)
    except RemoteProtocolError as exc:
        raise RemoteProtocolError(f"origin response: {exc}", 502) from None
    if length is None:
        return UNTIL_CLOSE
    return Framing("length", length) if length else NO_BODY


# --- body decoding --------------------------------------------------------------------------

class BodyDecoder:
    """Turns the bytes of one message body into payload pieces.

    `feed(data)` returns the payload found in `data`; once `done`, `leftover` holds the bytes
    after the body (the next pipelined message) and `trailers` the trailer fields, if any.
    """

    done: bool = False
    leftover: bytes = b""
    trailers: Headers = ()

    def feed(self, data: bytes) -> list[bytes]:
        raise NotImplementedError

    def feed_eof(self) -> None:
        """The connection ended; raises unless that is a valid end of this body."""
        if not self.done:
            raise RemoteProtocolError("connection closed inside a message body")


class _NoBody(BodyDecoder):
    done = True

    def feed(self, data: bytes) -> list[bytes]:
        self.leftover += data
        return []


class LengthDecoder(BodyDecoder):
    def __init__(self, length: int) -> None:
        self.remaining = length
        self.done = length == 0

    def feed(self, data: bytes) -> list[bytes]:
        if self.done:
            self.leftover += data
            return []
        if len(data) < self.remaining:
            self.remaining -= len(data)
            return [data] if data else []
        piece, self.leftover = data[:self.remaining], data[self.remaining:]
        self.remaining = 0
        self.done = True
        return [piece]


class CloseDecoder(BodyDecoder):
    def feed(self, data: bytes) -> list[bytes]:
        return [data] if data else []

    def feed_eof(self) -> None:
        self.done = True


class ChunkedDecoder(BodyDecoder):
    """RFC 9112 §7.1: chunk-size lines, chunk data and CRLF, last-chunk, trailer section."""

    def __init__(self, max_trailer_bytes: int = 16384) -> None:
        self._buf = b""
        self._chunk_left = 0
        self._state = "size"          # size | data | data-end | trailers
        self._max_trailer_bytes = max_trailer_bytes

    def feed(self, data: bytes) -> list[bytes]:
        if self.done:
            self.leftover += data
            return []
        buf = self._buf + data if self._buf else data
        self._buf = b""
        pieces: list[bytes] = []
        pos = 0
        while pos < len(buf) and not self.done:
            step = getattr(self, "_on_" + self._state.replace("-", "_"))
            advanced = step(buf, pos, pieces)
            if advanced < 0:
                self._buf = buf[pos:]
                return pieces
            pos = advanced
        if self.done:
            self.leftover = buf[pos:]
        return pieces

    def _on_size(self, buf: bytes, pos: int, pieces: list[bytes]) -> int:
        nl = buf.find(b"\n", pos, pos + MAX_CHUNK_LINE)
        if nl < 0:
            if len(buf) - pos >= MAX_CHUNK_LINE:
                raise RemoteProtocolError("chunk-size line too long")
            return -1
        line = buf[pos:nl]
        if line.endswith(b"\r"):
            line = line[:-1]
        m = _CHUNK_LINE.fullmatch(line)
        if m is None:
            raise RemoteProtocolError(f"invalid chunk size {line[:40]!r}")
        self._chunk_left = int(m.group(1), 16)
        self._state = "data" if self._chunk_left else "trailers"
        return nl + 1

    def _on_data(self, buf: bytes, pos: int, pieces: list[bytes]) -> int:
        take = min(self._chunk_left, len(buf) - pos)
        pieces.append(buf[pos:pos + take] if (pos or take != len(buf)) else buf)
        self._chunk_left -= take
        if self._chunk_left == 0:
            self._state = "data-end"
        return pos + take

    def _on_data_end(self, buf: bytes, pos: int, pieces: list[bytes]) -> int:
        if buf[pos:pos + 1] == b"\n":
            self._state = "size"
            return pos + 1
        if len(buf) - pos < 2:
            if buf[pos:pos + 1] != b"\r":
                raise RemoteProtocolError("chunk data not followed by CRLF")
            return -1
        if buf[pos:pos + 2] != b"\r\n":
            raise RemoteProtocolError("chunk data not followed by CRLF")
        self._state = "size"
        return pos + 2

    def _on_trailers(self, buf: bytes, pos: int, pieces: list[bytes]) -> int:
        if buf[pos:pos + 2] == b"\r\n" or buf[pos:pos + 1] == b"\n":
            self.done = True
            return pos + (2 if buf[pos:pos + 1] == b"\r" else 1)
        if buf[pos:pos + 1] == b"\r" and len(buf) - pos < 2:
            return -1
        try:
            end = find_head_end(buf[pos:], self._max_trailer_bytes)
            if end < 0:
                return -1
            self.trailers = _parse_header_lines(_head_lines(buf[pos:pos + end]))
        except RemoteProtocolError as exc:
            raise RemoteProtocolError(f"trailer section: {exc}") from None
        self.done = True
        return pos + end


def body_decoder(framing: Framing) -> BodyDecoder:
    if framing.kind == "length":
        return LengthDecoder(framing.length)
    if framing.kind == "chunked":
        return ChunkedDecoder()
    if framing.kind == "close":
        return CloseDecoder()
    return _NoBody()


# --- body encoding --------------------------------------------------------------------------

def chunk_header(size: int) -> bytes:
    return b"%x\r\n" % size


def last_chunk(trailers: Headers = ()) -> bytes:
    """The zero-size chunk and trailer section that end a chunked body."""
    if not trailers:
        return b"0\r\n\r\n"
    return b"0\r\n" + serialize_head("", trailers)[2:]
