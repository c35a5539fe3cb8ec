"""HTTP/2 resource attacks (hostile-input suite, issue 10, group 3), against the real appliance.

Already in test_h2_hostile.py: rapid reset, CONTINUATION flood (full and empty frames), HPACK
bomb, header lists over the limit, SETTINGS and PING floods from a client that reads, streams
over MAX_CONCURRENT_STREAMS. Here, what those leave open:

- server-provoked resets ("MadeYouReset"): every malformed request makes the appliance send a
  RST_STREAM; those count toward the same limit as the client's own resets;
- frames that cost work and move nothing: empty DATA (which must not end a body either),
  PRIORITY floods, WINDOW_UPDATE of 0;
- a client that never reads: a PING flood while its TCP window is shut ends the connection
  within a bound, not after the whole write timeout;
- zero-window stalls: 100 downloads on streams whose window never opens time out and release
  their origin connections;
- the lifetime stream cap: a graceful GOAWAY after [limits] max_h2_streams_per_connection streams.

Each ends in a GOAWAY (ENHANCE_YOUR_CALM for the floods) or a bounded state, with the appliance's
resident memory (VmRSS) and open descriptors (/proc/PID/fd) measured before and after.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from h2.errors import ErrorCodes

from appliance.frontends.h2 import MAX_EMPTY_FRAMES, MAX_RESETS

from .conftest import Appliance
from .h2_raw_client import H2RawClient, Response
from .test_hostile_http1_smuggling import forwarded, recording  # noqa: F401

HEADERS_FRAME = 0x1
STREAMS_PER_CONNECTION = 2000    # [limits] max_h2_streams_per_connection here (10,000 by default)
# A flood is answered with a few small frames each; what it may leave behind is Python's
# allocator keeping a few freed arenas and the pool keeping the bystander's origin connections.
# 16 MiB is well above that (a few MiB, measured) and well below what an unbounded queue of
# answers or one buffer per frame would take.
FLOOD_RSS_KIB = 16 * 1024
POOLED_FDS = 4             # idle pooled origin connections the bystander's requests may leave


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    appliance = Appliance(tmp_path_factory.mktemp("h2resources"),
                          "[upstream]\nresponse_timeout = 5.0\n\n"
                          f"[limits]\nmax_h2_streams_per_connection = {STREAMS_PER_CONNECTION}\n").start()
    try:
        yield appliance
    finally:
        appliance.stop()


def client(app, **kw) -> H2RawClient:
    return H2RawClient(app.https_port, app.ca_path, **kw)


def block(authority: str, path: str, *extra, method: str = "GET") -> list:
    return [(":method", method), (":scheme", "http"), (":authority", authority), (":path", path), *extra]


def usage(app: Appliance) -> tuple[int, int]:
    """(VmRSS in KiB, open descriptors) of the appliance process."""
    status = Path(f"/proc/{app.proc.pid}/status").read_text()
    rss = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:"))
    return rss, len(os.listdir(f"/proc/{app.proc.pid}/fd"))


def settle(app: Appliance, fds_at_most: int, timeout: float = 10.0) -> tuple[int, int]:
    """Usage once the descriptors are down to `fds_at_most` (or the deadline passed)."""
    deadline = time.monotonic() + timeout
    for _ in range(int(timeout / 0.05) + 1):
        rss, fds = usage(app)
        if fds <= fds_at_most or time.monotonic() > deadline:
            return rss, fds
        time.sleep(0.05)
    return usage(app)


def served(c: H2RawClient, sid: int) -> None:
    r = c.response(sid)
    assert r.status == 200 and r.ended and bytes(r.body).startswith(b"conn="), r


def assert_flood_cut_off(app, attacker: H2RawClient, what: str) -> None:
    assert attacker.wait_closed(), "the appliance kept the connection open"
    assert attacker.goaway_code == ErrorCodes.ENHANCE_YOUR_CALM, (attacker.goaway_code, attacker.frame_counts)
    assert f"{what} flood, closing the connection (ENHANCE_YOUR_CALM)" in app.proc.output()


# --- server-provoked resets ------------------------------------------------------------------

def test_provoked_resets_count_toward_the_reset_limit(app, recording):
    """Each request carries a CR in a field: the appliance resets it (PROTOCOL_ERROR), and after
    MAX_RESETS of them in the window the client gets GOAWAY(ENHANCE_YOUR_CALM), as if it had
    reset them itself (CVE-2025-8671). Nothing reaches the origin; another client is served."""
    before = recording.connections()
    rss0, fds0 = usage(app)
    attempts = 1000
    with client(app) as other, client(app) as attacker:
        served(other, other.get(f"http://{recording.authority}/good?bystander=provoked"))
        sid = 1
        for i in range(attempts):
            bad = attacker.header_block(block(recording.authority, f"/bad?provoked={i}", ("x-bad", "1\r2")))
            if not attacker.send_raw(attacker.headers_frame(sid, bad)):
                break
            sid += 2
            if i % 50 == 49 and not attacker.pump(0.01):      # read the resets: never stall the writer
                break
        assert_flood_cut_off(app, attacker, "RST_STREAM (provoked by malformed or refused requests)")
        # The resets are PROTOCOL_ERROR (malformed) and REFUSED_STREAM (the streams over
        # MAX_CONCURRENT_STREAMS, which a client sending this fast has): both count. The cut-off
        # comes at the (MAX_RESETS + 1)th; refusals are counted per read, so a read's worth more.
        codes = set(attacker.resets.values())
        assert ErrorCodes.PROTOCOL_ERROR in codes and codes <= {ErrorCodes.PROTOCOL_ERROR, ErrorCodes.REFUSED_STREAM}
        assert MAX_RESETS < len(attacker.resets) <= MAX_RESETS + 100, len(attacker.resets)
        served(other, other.get(f"http://{recording.authority}/good?bystander=after-provoked"))
        assert other.goaway_code is None
    assert not [t for n, d in recording.connections().items() for t in [d[len(before.get(n, b"")):]]
                if b"provoked=" in t]
    rss, fds = settle(app, fds0 + POOLED_FDS)
    assert fds <= fds0 + POOLED_FDS and rss - rss0 < FLOOD_RSS_KIB, (rss0, rss, fds0, fds)


# --- frames that move nothing ----------------------------------------------------------------

def test_empty_data_frames_in_a_body_do_not_end_it(app, recording):
    """An empty DATA frame (no END_STREAM) is nothing: the body goes on after it. (It used to
    reach the stream as b"", which reads as END_STREAM: the body was cut at the origin.)"""
    target = "/fwd?case=empty-data"
    with client(app) as c:
        sid = c.request(block(recording.authority, target, method="POST"), end=False)
        c.data(sid, b"hel")
        for _ in range(5):
            c.send_raw(c.data_frame(sid))
        c.data(sid, b"lo", end=True)
        served(c, sid)
        assert c.goaway_code is None
    _, _, message = forwarded(recording, target)
    assert message["body"] == "hello"


@pytest.mark.parametrize("kind", ["empty DATA", "PRIORITY"])
def test_empty_frame_floods_are_cut_off(app, recording, kind):
    """CVE-2019-9518: frames without payload (empty DATA without END_STREAM, PRIORITY) cost work
    and move nothing; past MAX_EMPTY_FRAMES per window the client gets ENHANCE_YOUR_CALM."""
    rss0, fds0 = usage(app)
    frames = 2000
    with client(app) as other, client(app) as attacker:
        sid = attacker.request(block(recording.authority, "/good?empty=flood", method="POST"), end=False)
        sent = 0
        for i in range(frames):
            frame = attacker.data_frame(sid) if kind == "empty DATA" else attacker.priority_frame(101 + 2 * i)
            if not attacker.send_raw(frame):
                break
            sent += 1
        assert sent > MAX_EMPTY_FRAMES
        assert_flood_cut_off(app, attacker, kind)
        served(other, other.get(f"http://{recording.authority}/good?bystander={kind.replace(' ', '-')}"))
    rss, fds = settle(app, fds0 + POOLED_FDS)
    assert fds <= fds0 + POOLED_FDS and rss - rss0 < FLOOD_RSS_KIB, (rss0, rss, fds0, fds)


def test_priority_on_headers_is_not_counted_as_a_flood(app, recording):
    """Browsers put a priority on every HEADERS; h2 reports it as a PriorityUpdated too, which
    must not count toward the PRIORITY limit."""
    with client(app) as c:
        for batch in range(3):
            sids = []
            for i in range(MAX_EMPTY_FRAMES // 2):
                sid = c.conn.get_next_available_stream_id()
                c.responses[sid] = Response()
                c.conn.send_headers(sid, block(recording.authority, f"/good?prio={batch}-{i}"), end_stream=True,
                                    priority_weight=200, priority_depends_on=0, priority_exclusive=False)
                sids.append(sid)
            c.flush()
            for sid in sids:
                served(c, sid)
        assert c.goaway_code is None and not c.closed


@pytest.mark.parametrize("where", ["connection", "stream"])
def test_window_update_of_zero_ends_the_connection(app, recording, where):
    """RFC 9113 §6.9: an increment of 0 is a PROTOCOL_ERROR (h2 makes it a connection error on a
    stream too, 4.1 and 4.4 alike: hyperframe refuses to parse it). Other clients go on."""
    with client(app) as other, client(app) as c:
        sid = c.request(block(recording.authority, "/good?wu=0", method="POST"), end=False)
        c.send_raw(c.window_update_frame(0 if where == "connection" else sid, 0))
        assert c.wait_closed()
        assert c.goaway_code == ErrorCodes.PROTOCOL_ERROR
        served(other, other.get(f"http://{recording.authority}/good?bystander=wu0-{where}"))
    assert "protocol error, closing" in app.proc.output()


# --- a client that never reads ---------------------------------------------------------------

def test_ping_flood_from_a_client_that_never_reads_ends_the_connection(app, origin):
    """The client asks for 50 MB, reads nothing (its TCP window shuts, the appliance's writer
    blocks), then floods PINGs. The appliance's answers are bounded by the flood limit; its
    GOAWAY cannot be written, so it closes the connection after GOAWAY_WRITE_TIMEOUT instead of
    the whole write timeout (client_idle_timeout, 60 s)."""
    host = origin.split("//")[1]
    rss0, fds0 = usage(app)
    with client(app, rcvbuf=65536) as attacker:
        attacker.get(f"http://{host}/bytes?n=50000000&never=reads")
        queued, deadline = -1, time.monotonic() + 10
        for _ in range(200):                   # until the kernel holds all it will take for us
            time.sleep(0.05)
            now = attacker.receive_queue()
            if now == queued and now > 0 or time.monotonic() > deadline:
                break
            queued = now
        assert queued > 0
        flood_at = time.monotonic()
        for i in range(2000):
            if not attacker.send_raw(attacker.ping_frame(i)):
                break
        record = app.wait_record(lambda r: r["target"].endswith("never=reads"), timeout=20)
        took = time.monotonic() - flood_at
        assert took < 10, took                 # GOAWAY_WRITE_TIMEOUT + the writer's 2 s join, not 60 s
        assert record["error"] and record["bytes_down"] < 50_000_000, record
        assert "PING flood, closing the connection" in app.proc.output()
        rss, fds = settle(app, fds0)
        # The closed connection's descriptors (client and origin) are gone; memory is what the
        # flood allows (100 PING ACKs) plus a batch of DATA in flight (256 KiB): FLOOD_RSS_KIB.
        assert fds <= fds0 and rss - rss0 < FLOOD_RSS_KIB, (rss0, rss, fds0, fds)
        assert attacker.wait_closed(30)       # what was in flight, then EOF


# --- zero-window stalls on many streams ------------------------------------------------------

STALL_TIMEOUT = 2.0        # [limits] client_idle_timeout of this test's appliance


def test_zero_window_streams_time_out_and_release_their_origin_connections(tmp_path_factory, recording):
    """INITIAL_WINDOW_SIZE 0 and 100 downloads: each response's HEADERS go out, its DATA cannot.
    Each stream waits client_idle_timeout for the window, then is reset (CANCEL), its origin
    connection closed; descriptors return to the baseline and memory stays bounded."""
    app = Appliance(tmp_path_factory.mktemp("h2zerowindow"),
                    f"[limits]\nclient_idle_timeout = {STALL_TIMEOUT}\n").start()
    try:
        rss0, fds0 = usage(app)
        before = recording.connections()
        streams = 100
        with client(app, stream_window=0) as c:
            sids = [c.get(f"http://{recording.authority}/good?zero-window={i}") for i in range(streams)]
            assert c.wait(lambda: all(c.responses[s].status == 200 for s in sids), 10)
            rss_stalled, fds_stalled = usage(app)
            started = time.monotonic()
            assert c.wait(lambda: all(c.responses[s].done for s in sids), 10 + STALL_TIMEOUT)
            assert all(c.responses[s].reset == ErrorCodes.CANCEL and not c.responses[s].body for s in sids)
            assert time.monotonic() - started < STALL_TIMEOUT + 5
            assert c.goaway_code is None and not c.closed    # a stream matter: the connection goes on
        used = [n for n in recording.connections() if n not in before]
        assert len(used) == streams                          # one origin connection per stalled stream
        for n in used:
            recording.wait_closed(n)                          # all released
        rss, fds = settle(app, fds0)
        # While stalled: one origin socket per stream (+100 descriptors, no more). Each stream
        # holds a greenlet, its request state and the origin's few bytes: 100 of them well under
        # 16 MiB. After: descriptors back to the baseline, memory within the same bound.
        assert fds_stalled <= fds0 + streams + 2 and rss_stalled - rss0 < 16 * 1024, (fds0, fds_stalled, rss0, rss_stalled)
        assert fds <= fds0 and rss - rss0 < 16 * 1024, (fds0, fds, rss0, rss)
        record = app.wait_record(lambda r: r["target"].endswith("zero-window=99"))
        assert "flow-control window stayed closed" in record["error"]
    finally:
        app.stop()


# --- lifetime stream cap ---------------------------------------------------------------------

def test_a_connection_gets_a_graceful_goaway_after_its_lifetime_stream_cap(app):
    """[limits] max_h2_streams_per_connection streams (each answered by the appliance itself, a 501 for
    :scheme ftp, so no origin is involved), then GOAWAY(NO_ERROR) naming the last one: the
    streams in flight are answered, later ones not processed, then the connection closes. The client may go on on a new one."""
    cap = STREAMS_PER_CONNECTION
    seen = len(app.records())
    rss0, fds0 = usage(app)
    batch = 96                 # under MAX_CONCURRENT_STREAMS; not a divisor of the cap, so one
    with client(app) as c:     # batch has streams on both sides of it
        for first in range(0, cap + batch, batch):
            for i in range(first, first + batch):
                sid = 2 * i + 1
                c.send_raw(c.headers_frame(sid, c.header_block(
                    [(":method", "GET"), (":scheme", "ftp"), (":authority", "cap.test"), (":path", f"/{i}")])))
            answered = min(first + batch, cap)
            assert c.wait(lambda: c.frame_counts.get(HEADERS_FRAME, 0) >= answered
                          and (first + batch <= cap or c.closed), 20), (first, c.frame_counts, c.resets)
            if c.goaway_code is not None:
                break
        assert c.goaway_code == ErrorCodes.NO_ERROR and c.goaway_last_stream == 2 * cap - 1
        assert c.closed and c.frame_counts[HEADERS_FRAME] == cap      # not one stream past the cap
        # Streams past the GOAWAY's last stream were not processed (RFC 9113 §6.8: the client may
        # retry them); those that came before the connection closed were refused explicitly.
        assert set(c.resets.values()) <= {ErrorCodes.REFUSED_STREAM} and min(c.resets, default=2 * cap + 1) > 2 * cap
    with client(app) as fresh:
        r = fresh.response(fresh.request([(":method", "GET"), (":scheme", "ftp"), (":authority", "cap.test"),
                                          (":path", "/after")]))
        assert r.status == 501
    assert f"{cap} streams on one connection, [limits] max_h2_streams_per_connection: GOAWAY" in app.proc.output()
    records = app.wait_records(seen + cap + 1, timeout=20)[seen:]
    assert sum(1 for r in records if r["status"] == 501) == cap + 1
    rss, fds = settle(app, fds0)
    assert fds <= fds0 and rss - rss0 < FLOOD_RSS_KIB, (rss0, rss, fds0, fds)
