"""`appliance.status`: the status board's counts, rates on a fake clock, bounds, and the merge of
several workers' snapshots; `appliance.frontends.status_page`: the page and its headers."""

from __future__ import annotations

import base64
import hashlib
import json
import re
import subprocess
import sys

import pytest

from appliance.frontends import status_page
from appliance.observe import AccessLog, AccessRecord, Observer
from appliance.status import (
    HISTORY_SECONDS, RECENT_SIZE, StatusBoard, StatusPublisher, destination_host, merge, problem_of,
)

T0 = 1_700_000_000.0
LISTENERS = [{"kind": "http", "address": "127.0.0.1:3128"}, {"kind": "https", "address": "127.0.0.1:8443"}]


def record(**kw) -> AccessRecord:
    kw.setdefault("listener", "http")
    kw.setdefault("client", "192.0.2.10")
    kw.setdefault("target", "http://example.com/")
    kw.setdefault("status", 200)
    return AccessRecord(**kw)


def board(**kw) -> StatusBoard:
    return StatusBoard("1.2.3", T0, **kw)


# --- live counts ----------------------------------------------------------------------------

def test_live_counts_by_protocol():
    b = board()
    for listener in ("http", "http", "https", "https", "socks5", "transparent_tls", "transparent_http"):
        b.opened(listener)
    b.closed("http")
    with b.live("tunnel"), b.live("tunnel"), b.live("websocket"):
        live = b.snapshot(T0 + 5, LISTENERS, h2_connections=1, h2_streams=3)["live"]
        assert live == {"http1": 2, "h2_connections": 1, "h2_streams": 3, "tunnel": 2, "websocket": 1,
                        "socks5": 1, "transparent": 2}
    live = b.snapshot(T0 + 6, LISTENERS)["live"]
    assert live["tunnel"] == live["websocket"] == 0


def test_live_is_released_when_the_relay_fails():
    b = board()
    with pytest.raises(OSError), b.live("tunnel"):
        raise OSError("reset")
    assert b.snapshot(T0)["live"]["tunnel"] == 0


def test_listeners_carry_their_open_connections_and_closing_never_goes_negative():
    b = board()
    b.opened("http")
    b.opened("http")
    b.closed("https")
    s = b.snapshot(T0, LISTENERS)
    assert [(row["kind"], row["open"]) for row in s["listeners"]] == [("http", 2), ("https", 0)]
    assert s["open_by_listener"] == {"http": 2, "https": 0}
    assert s["totals"]["connections"] == 2


def test_observer_feeds_the_board(tmp_path):
    observer = Observer(AccessLog(str(tmp_path / "access.log")))
    observer.connection_opened("socks5")
    with observer.live("tunnel"):
        assert observer.board.snapshot(T0)["live"]["tunnel"] == 1
    observer.finish(record(bytes_up=10, bytes_down=20))
    observer.connection_closed("socks5")
    s = observer.board.snapshot(T0)
    assert s["totals"]["requests"] == 1 and s["totals"]["bytes_down"] == 20
    assert s["live"]["socks5"] == 0 and s["totals"]["connections"] == 1


# --- rates and history ----------------------------------------------------------------------

def test_rates_over_the_last_ten_complete_seconds():
    b = board()
    for second in range(20):                        # 1000 down, 100 up, 2 requests each second
        b.finished(record(bytes_up=50, bytes_down=500), T0 + second + 0.1)
        b.finished(record(bytes_up=50, bytes_down=500), T0 + second + 0.7)
    rate = b.snapshot(T0 + 20.5)["rate"]
    assert rate == {"window_seconds": 10, "bytes_up_per_second": 100.0,
                    "bytes_down_per_second": 1000.0, "requests_per_second": 2.0}
    b.finished(record(bytes_down=10_000_000), T0 + 20.6)      # the second still running: not yet
    assert b.snapshot(T0 + 20.9)["rate"]["bytes_down_per_second"] == 1000.0
    assert b.snapshot(T0 + 21.0)["rate"]["bytes_down_per_second"] == (9 * 1000 + 10_000_000) / 10
    quiet = b.snapshot(T0 + 45)["rate"]                        # nothing for 20 s: back to zero
    assert quiet["bytes_down_per_second"] == quiet["requests_per_second"] == 0


def test_history_is_a_minute_of_seconds_with_quiet_ones_as_zeros():
    b = board()
    b.finished(record(bytes_up=1, bytes_down=2), T0 + 3.5)
    b.finished(record(bytes_up=1, bytes_down=2), T0 + 1.5)      # finished late, in an older second
    b.finished(record(bytes_up=1, bytes_down=2), T0 - 500)      # older than the history: dropped
    history = b.snapshot(T0 + 10.2)["history"]
    assert len(history) == HISTORY_SECONDS
    assert history[-1][0] == T0 + 9
    by_second = {int(h[0] - T0): h[1:] for h in history}
    assert by_second[3] == [1, 2, 1] and by_second[1] == [1, 2, 1] and by_second[2] == [0, 0, 0]
    assert b.snapshot(T0 + 10.2)["totals"]["requests"] == 3


# --- destinations and problems --------------------------------------------------------------

@pytest.mark.parametrize("target, host", [
    ("example.com:443", "example.com"), ("[2001:db8::1]:443", "2001:db8::1"),
    ("http://Example.com:8080/x?y", "example.com"), ("https://[::1]/", "::1"),
    ("-", None), ("/relative", None), ("", None), ("http://[bad/", None),
])
def test_destination_host(target, host):
    assert destination_host(target) == host


def test_top_destinations_ranked_and_bounded():
    b = board(top_capacity=20)
    for n in range(5):
        for _ in range(10 - n):
            b.finished(record(target=f"busy{n}.example:443", kind="tunnel", bytes_down=100), T0)
    for n in range(100):                                       # a flood of one-off names
        b.finished(record(target=f"http://once{n}.example/"), T0)
    assert len(b.tops) <= 20
    top = b.snapshot(T0)["top_destinations"]
    assert [row["host"] for row in top[:5]] == [f"busy{n}.example" for n in range(5)]
    assert top[0] == {"host": "busy0.example", "requests": 10, "bytes": 1000}


def test_recent_errors_and_denials_bounded_newest_first():
    b = board()
    b.finished(record(status=404), T0)                         # the origin's answer: no problem
    b.finished(record(status=403, error="denied: no-ads", rule="no-ads", user="alice"), T0 + 1)
    b.finished(record(status=407, error="auth: proxy authentication required"), T0 + 2)
    for n in range(RECENT_SIZE + 5):
        b.finished(record(status=502, error=f"upstream connect: refused {n}"), T0 + 3 + n)
    s = b.snapshot(T0 + 100)
    assert s["totals"]["errors"] == RECENT_SIZE + 5 and s["totals"]["denials"] == 2
    assert len(s["recent_errors"]) == RECENT_SIZE
    assert s["recent_errors"][0]["error"] == f"upstream connect: refused {RECENT_SIZE + 4}"
    assert [d["status"] for d in s["recent_denials"]] == [407, 403]
    assert s["recent_denials"][1]["rule"] == "no-ads" and s["recent_denials"][1]["user"] == "alice"


@pytest.mark.parametrize("status, error, problem", [
    (200, None, None), (404, None, None), (200, "idle timeout", "error"), (502, None, "error"),
    (403, "denied: x", "denial"), (407, "auth: needed", "denial"), (0, "client: gone", "error"),
])
def test_problem_of(status, error, problem):
    assert problem_of(record(status=status, error=error)) == problem


def test_snapshot_is_json():
    b = board()
    b.opened("http")
    b.finished(record(status=502, error="upstream dns: no such name"), T0 + 1)
    s = b.snapshot(T0 + 3, LISTENERS)
    assert json.loads(json.dumps(s)) == s
    assert s["version"] == "1.2.3" and s["uptime_seconds"] == 3.0 and s["workers"] == 1


# --- several workers ------------------------------------------------------------------------

def _worker(seed: int) -> dict:
    b = board()
    b.opened("http")
    with b.live("tunnel"):
        for n in range(seed):
            b.finished(record(target=f"http://w{seed}.example/", bytes_down=100), T0 + 5.5)
        b.finished(record(target="http://shared.example/", bytes_down=1, status=502, error="e"),
                   T0 + 5 + seed / 10)
        return b.snapshot(T0 + 8, LISTENERS, h2_connections=seed, h2_streams=2 * seed)


def test_merge_sums_counts_and_merges_lists():
    a, b = _worker(2), _worker(3)
    a["connections"], b["connections"] = 4, 5
    m = merge([a, b])
    assert m["workers"] == 2 and m["connections"] == 9
    assert m["live"]["tunnel"] == 2 and m["live"]["h2_streams"] == 10 and m["live"]["http1"] == 0
    assert m["totals"]["requests"] == 7 and m["totals"]["bytes_down"] == 502
    assert [(row["kind"], row["open"]) for row in m["listeners"]] == [("http", 2), ("https", 0)]
    assert m["top_destinations"] == [{"host": "w3.example", "requests": 3, "bytes": 300},
                                     {"host": "w2.example", "requests": 2, "bytes": 200},
                                     {"host": "shared.example", "requests": 2, "bytes": 2}]
    assert [e["time"] for e in m["recent_errors"]] == [T0 + 5.3, T0 + 5.2]
    assert len(m["history"]) == HISTORY_SECONDS
    assert {h[0]: h[3] for h in m["history"]}[T0 + 5] == 7
    assert m["rate"]["requests_per_second"] == 0.7
    assert merge([a]) is a


def test_publisher_shares_fresh_snapshots_only(tmp_path):
    workers = {pid: _worker(pid) for pid in (2, 3, 4)}
    publishers = {pid: StatusPublisher(tmp_path, lambda now, pid=pid: dict(workers[pid], time=now), pid=pid)
                  for pid in workers}
    publishers[3].publish(T0 + 8)
    publishers[4].publish(T0 + 1)                             # stale by the time we read
    (tmp_path / "status-9.json").write_text("{half a fi")   # a torn or foreign file is skipped
    merged = publishers[2].collect(T0 + 8.5)
    assert merged["workers"] == 2 and merged["totals"]["requests"] == 2 + 1 + 3 + 1
    assert merged["pids"] == [2, 3] and "pid" not in merged
    assert json.loads((tmp_path / "status-3.json").read_text())["pid"] == 3
    assert not list(tmp_path.glob(".*.tmp"))
    publishers[3].stop()
    assert not (tmp_path / "status-3.json").exists()
    assert publishers[2].collect(T0 + 8.5)["workers"] == 1


def test_publisher_publishes_in_a_greenlet_until_stopped(tmp_path):
    import gevent
    publisher = StatusPublisher(tmp_path, lambda now: dict(_worker(2), time=now), pid=7)
    publisher.start(interval=0.01)
    gevent.sleep(0.1)
    assert json.loads((tmp_path / "status-7.json").read_text())["pid"] == 7
    publisher.stop()
    gevent.sleep(0.05)
    assert not (tmp_path / "status-7.json").exists()


def test_board_imports_no_io_machinery():
    code = ("import sys, appliance.status; "
            "print(sorted(m for m in ('gevent', 'socket', 'ssl') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.stdout.strip() == "[]", done.stderr


# --- the page -------------------------------------------------------------------------------

def _hash(text: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode()).digest()).decode() + "'"


def test_page_is_self_contained_and_its_policy_allows_only_itself():
    status, ctype, body, headers = status_page.status_page(())
    fields = dict(headers)
    assert status == 200 and ctype == "text/html; charset=utf-8"
    assert fields["Cache-Control"] == "no-store"
    page = body.decode()
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", page)       # no external assets
    assert "@import" not in page and "url(" not in page
    scripts = re.findall(r"<script>(.*?)</script>", page, re.S)
    styles = re.findall(r"<style>(.*?)</style>", page, re.S)
    assert len(scripts) == len(styles) == 1
    policy = fields["Content-Security-Policy"]
    assert "default-src 'none'" in policy and "unsafe" not in policy and "connect-src 'self'" in policy
    assert f"script-src {_hash(scripts[0])}" in policy and f"style-src {_hash(styles[0])}" in policy
    markup = re.sub(r"<(script|style)>.*?</\1>", "", page, flags=re.S)
    assert not re.search(r"<[^>]*\s(style|on[a-z]+)=", markup)    # no inline style or handlers
    assert "innerHTML" not in page                     # traffic's text goes in as text only
    for element in ("live-http1", "live-h2-streams", "live-tunnels", "live-websockets", "live-socks5",
                    "live-transparent", "rate-down", "rate-up", "total-requests", "top-destinations",
                    "recent-errors", "recent-denials", "listeners", "uptime", "version", "spark"):
        assert f'id="{element}"' in page
