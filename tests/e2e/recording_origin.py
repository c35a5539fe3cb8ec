"""A recording HTTP/1.1 origin for the smuggling tests: it writes the exact bytes it receives on
each connection to `<record_dir>/conn-<n>.bin` (n counts accepted connections from 1), writes
`conn-<n>.closed` once the peer closed or reset it (and `conn-<n>.late` once a response's late
extra bytes went out), and answers each request h11 reads:

  /hostile/<name>  the canned, possibly broken response `HOSTILE[name]` (raw bytes, h11 bypassed)
  anything else    200, body `conn=<n>` (so a test knows which connection carried a request)

Usage: recording_origin.py PORT RECORD_DIR. Stopped by its PID; loopback only.
"""

from __future__ import annotations

import socket
import sys
import threading
import time
from pathlib import Path

import h11

# name -> (when to answer, response bytes, what to do after, extra bytes sent a moment later).
# "head": answer as soon as the request head is read, before any body (an early response);
# "end": after the whole request. "close": close the connection after answering; "keep": read on.
HOSTILE = {
    "early417": ("head", b"HTTP/1.1 417 Expectation Failed\r\nContent-Length: 4\r\n\r\nnope", "keep", b""),
    "early403": ("head", b"HTTP/1.1 403 Forbidden\r\nContent-Length: 6\r\n\r\ndenied", "keep", b""),
    "cl-te": ("end", b"HTTP/1.1 200 OK\r\nContent-Length: 30\r\nTransfer-Encoding: chunked\r\n\r\n"
                     b"3\r\nabc\r\n0\r\n\r\n", "keep", b""),
    "te-cl": ("end", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 0\r\n\r\n"
                     b"3\r\nabc\r\n0\r\n\r\n", "keep", b""),
    "two-cl": ("end", b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd", "keep", b""),
    "cl-list": ("end", b"HTTP/1.1 200 OK\r\nContent-Length: 3, 4\r\n\r\nabcd", "keep", b""),
    "same-cl-twice": ("end", b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\nabc", "keep", b""),
    "cl-plus": ("end", b"HTTP/1.1 200 OK\r\nContent-Length: +3\r\n\r\nabc", "keep", b""),
    "cl-arabic": ("end", b"HTTP/1.1 200 OK\r\nContent-Length: \xd9\xa3\r\n\r\nabc", "keep", b""),
    "cl-space-colon": ("end", b"HTTP/1.1 200 OK\r\nContent-Length : 3\r\n\r\nabc", "keep", b""),
    "obs-fold": ("end", b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nX-A: 1\r\n 2\r\n\r\nabc", "keep", b""),
    "bare-cr": ("end", b"HTTP/1.1 200 OK\r\nContent-Length: 3\rX-A: 1\r\n\r\nabc", "keep", b""),
    "nul": ("end", b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nX-A: a\x00b\r\n\r\nabc", "keep", b""),
    "bad-chunk-size": ("end", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n0\r\n\r\n",
                       "keep", b""),
    "chunk-0x": ("end", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0x3\r\nabc\r\n0\r\n\r\n",
                 "keep", b""),
    "chunk-negative": ("end", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n-3\r\nabc\r\n0\r\n\r\n",
                       "keep", b""),
    "chunk-no-crlf": ("end", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabcX0\r\n\r\n",
                      "keep", b""),
    "bad-chunk-later": ("end", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n",
                        "keep", b"zz\r\nmore\r\n0\r\n\r\n"),
    "chunked-cut": ("end", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n", "close", b""),
    "short-body": ("end", b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc", "close", b""),
    "longer-than-cl": ("end", b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nabcdef", "keep", b""),
    "bytes-after": ("end", b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nabc"
                           b"HTTP/1.1 200 OK\r\nContent-Length: 8\r\n\r\nsmuggled", "keep", b""),
    "bytes-after-later": ("end", b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nabc", "keep",
                          b"HTTP/1.1 200 OK\r\nContent-Length: 8\r\n\r\nsmuggled"),
    "te-lookalike": ("end", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: xchunked\r\nContent-Length: 3\r\n\r\n"
                            b"abcdef", "close", b""),
    "trailer-framing": ("end", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n"
                               b"Content-Length: 99\r\nTransfer-Encoding: chunked\r\nX-Sum: 1\r\n\r\n",
                        "keep", b""),
}

LATER = 0.3          # seconds before the "extra" bytes of a response that sends some later


class Recorder:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.lock = threading.Lock()
        self.count = 0

    def open(self) -> tuple[int, Path]:
        with self.lock:
            self.count += 1
            n = self.count
        path = self.root / f"conn-{n}.bin"
        path.write_bytes(b"")
        return n, path


def serve_connection(sock: socket.socket, n: int, path: Path) -> None:
    parser = h11.Connection(h11.SERVER)
    pending: tuple | None = None           # a hostile answer waiting for the end of the request
    with sock, open(path, "ab", buffering=0) as record:
        sock.settimeout(120)
        for _ in range(100000):
            try:
                data = sock.recv(65536)
            except OSError:
                data = b""
            record.write(data)
            if not data:
                break
            parser.receive_data(data)
            for _ in range(1000):
                try:
                    event = parser.next_event()
                except h11.RemoteProtocolError:
                    event = h11.NEED_DATA      # keep recording whatever else arrives
                    parser = h11.Connection(h11.SERVER)
                if event is h11.NEED_DATA or event is h11.PAUSED:
                    break
                if isinstance(event, h11.Request):
                    target = event.target.decode("latin-1")
                    name = target.split("/hostile/", 1)[1].split("?")[0] if "/hostile/" in target else None
                    pending = HOSTILE[name] if name else None
                    if pending and pending[0] == "head":
                        if answer(sock, pending, path.with_suffix(".late")):
                            return
                        pending = None
                elif isinstance(event, h11.EndOfMessage):
                    if pending:
                        if answer(sock, pending, path.with_suffix(".late")):
                            return
                        pending = None
                        parser = h11.Connection(h11.SERVER)   # h11 never saw the raw answer
                    else:
                        body = b"conn=%d" % n
                        sock.sendall(parser.send(h11.Response(status_code=200, headers=[
                            ("Content-Length", str(len(body))), ("X-Conn", str(n))])))
                        sock.sendall(parser.send(h11.Data(data=body)) + parser.send(h11.EndOfMessage()))
                        parser.start_next_cycle()


def answer(sock: socket.socket, hostile: tuple, late_marker: Path) -> bool:
    """Send a canned answer; True when the connection is to be closed now."""
    _, response, after, extra = hostile
    sock.sendall(response)
    if extra:
        time.sleep(LATER)              # a fault injected in time, not a synchronisation
        try:
            sock.sendall(extra)
        except OSError:
            pass
        late_marker.touch()
    if after == "close":
        sock.close()
        return True
    return False


def main() -> None:
    port, root = int(sys.argv[1]), Path(sys.argv[2])
    root.mkdir(parents=True, exist_ok=True)
    recorder = Recorder(root)
    listener = socket.create_server(("127.0.0.1", port))
    while True:
        sock, _ = listener.accept()
        n, path = recorder.open()
        threading.Thread(target=serve_connection_logged, args=(sock, n, path), daemon=True).start()


def serve_connection_logged(sock: socket.socket, n: int, path: Path) -> None:
    try:
        serve_connection(sock, n, path)
    finally:
        (path.parent / f"conn-{n}.closed").touch()


if __name__ == "__main__":
    main()
