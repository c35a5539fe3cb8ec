"""The status board: what the admin listener's `/status` page shows, counted as traffic passes.

It sits beside the access log and the metrics at the end of every path: `observe.Observer` feeds
it the client connections opened and closed per listener, each finished `AccessRecord`, and the
relays running now (the frontends wrap tunnels and WebSockets in `Observer.live(kind)`). HTTP/2
connections and streams are read from the open sessions when a snapshot is taken; HTTP/1.1 counts
the client connections open on the http and https listeners less the HTTP/2 ones.

From finished records it keeps totals, per-second byte and request counts (rates over a sliding
window, and a minute of history for the sparkline), the busiest destinations (a bounded map) and
the recent errors and denials (bounded lists). A tunnel's bytes count when it ends: the relay
reports them then. Like the sans-I/O cores the board touches no socket, greenlet or clock: `now`
is passed in, so tests drive it with a fake clock.

With several worker processes each writes its snapshot to a run directory about once a second
(`StatusPublisher`), and whichever worker answers `/status.json` merges the fresh ones (`merge`).
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections import deque
from pathlib import Path
from typing import Callable, Iterable, Iterator
from urllib.parse import urlsplit

WINDOW_SECONDS = 10           # rates are averages over this many seconds
HISTORY_SECONDS = 60          # per-second counts kept for the sparkline
TOP_SHOWN = 10                # destinations in a snapshot
TOP_CAPACITY = 1000           # destinations tracked; beyond it the least used are forgotten
RECENT_SIZE = 50              # errors, and denials, kept
FRESH_SECONDS = 5.0           # a worker's snapshot older than this is left out of the merge
PUBLISH_INTERVAL = 1.0

LIVE_KINDS = ("http1", "h2_connections", "h2_streams", "tunnel", "websocket", "socks5", "transparent")
HTTP_LISTENERS = ("http", "https")
TRANSPARENT_LISTENERS = ("transparent_http", "transparent_tls")
UNCOUNTED_LISTENERS = ("admin", "pac")     # their connections are not the proxy's clients


def destination_host(target: str) -> str | None:
    """The host of an access record's target: `host:port`, `[v6]:port` or an absolute URL."""
    if not target or target == "-":
        return None
    if "://" in target:
        try:
            return urlsplit(target).hostname
        except ValueError:
            return None
    if target.startswith("["):
        return target[1:target.find("]")] if "]" in target else None
    if target.startswith("/"):
        return None
    return target.rsplit(":", 1)[0] if target.count(":") == 1 else target


def problem_of(record) -> str | None:
    """Which recent list a record joins: "denial" (policy or proxy authentication said no),
    "error" (anything else failed), or None (it went as asked; an origin's 404 is its answer)."""
    error = record.error or ""
    if error.startswith(("denied", "auth:")) or record.status == 407:
        return "denial"
    if error or record.status >= 500:
        return "error"
    return None


class StatusBoard:
    """Counts for one worker process; `snapshot(now)` is JSON-able."""

    def __init__(self, version: str, started: float, window: int = WINDOW_SECONDS,
                 top_capacity: int = TOP_CAPACITY, recent_size: int = RECENT_SIZE) -> None:
        self.version = version
        self.started = started
        self.window = window
        self.top_capacity = top_capacity
        self.open_by_listener: dict[str, int] = {}
        self.connections_total = 0
        self.running: dict[str, int] = {}            # live(kind): relays in progress
        self.totals = {"requests": 0, "bytes_up": 0, "bytes_down": 0, "errors": 0, "denials": 0}
        self.seconds: dict[int, list[int]] = {}      # second → [bytes up, bytes down, requests]
        self.tops: dict[str, list[int]] = {}         # host → [requests, bytes]
        self.recent = {"error": deque(maxlen=recent_size), "denial": deque(maxlen=recent_size)}

    # --- fed by the Observer -----------------------------------------------------------------

    def opened(self, listener: str) -> None:
        self.open_by_listener[listener] = self.open_by_listener.get(listener, 0) + 1
        self.connections_total += 1

    def closed(self, listener: str) -> None:
        self.open_by_listener[listener] = max(0, self.open_by_listener.get(listener, 0) - 1)

    @contextlib.contextmanager
    def live(self, kind: str) -> Iterator[None]:
        """Counts one `kind` ("tunnel", "websocket", ...) as running for the `with` block."""
        self.running[kind] = self.running.get(kind, 0) + 1
        try:
            yield
        finally:
            self.running[kind] -= 1

    def finished(self, record, now: float) -> None:
        """One access-log record: totals, this second's counts, its destination, a problem."""
        up, down = record.bytes_up, record.bytes_down
        totals = self.totals
        totals["requests"] += 1
        totals["bytes_up"] += up
        totals["bytes_down"] += down
        self._count_second(int(now), up, down)
        host = destination_host(record.target)
        if host:
            self._count_destination(host, up + down)
        problem = problem_of(record)
        if problem is not None:
            totals[problem + "s"] += 1
            self.recent[problem].append({
                "time": round(now, 3), "client": record.client, "user": record.user,
                "listener": record.listener, "method": record.method, "target": record.target,
                "status": record.status, "rule": record.rule, "error": record.error})

    def _count_second(self, second: int, up: int, down: int) -> None:
        entry = self.seconds.get(second)
        if entry is None:
            if len(self.seconds) >= 2 * HISTORY_SECONDS:      # forget what the history no longer shows
                self.seconds = {k: v for k, v in self.seconds.items() if k > second - HISTORY_SECONDS}
            entry = self.seconds[second] = [0, 0, 0]
        entry[0] += up
        entry[1] += down
        entry[2] += 1

    def _count_destination(self, host: str, size: int) -> None:
        entry = self.tops.get(host)
        if entry is None:
            if len(self.tops) >= self.top_capacity:
                self._forget_least_used()
            entry = self.tops[host] = [0, 0]
        entry[0] += 1
        entry[1] += size

    def _forget_least_used(self) -> None:
        """Keep the busier half: a flood of one-off names cannot grow the map without bound."""
        keep = sorted(self.tops.items(), key=lambda item: item[1][0], reverse=True)
        self.tops = dict(keep[:self.top_capacity // 2])

    # --- read ---------------------------------------------------------------------------------

    def snapshot(self, now: float, listeners: Iterable[dict] = (), h2_connections: int = 0,
                 h2_streams: int = 0) -> dict:
        """Everything the page shows, as plain JSON types. `listeners` are {kind, address}; the
        HTTP/2 counts are read by the caller from the open sessions."""
        history = self.history(now)
        return {
            "version": self.version, "time": round(now, 3), "workers": 1,
            "uptime_seconds": round(now - self.started, 1),
            "listeners": [dict(entry, open=self.open_by_listener.get(entry["kind"], 0))
                          if entry["kind"] not in UNCOUNTED_LISTENERS else dict(entry)
                          for entry in listeners],
            "live": self._live(h2_connections, h2_streams),
            "open_by_listener": dict(self.open_by_listener),
            "totals": dict(self.totals, connections=self.connections_total),
            "rate": rates(history[-self.window:]),
            "history": history,
            "top_destinations": top_list(self.tops.items()),
            "recent_errors": list(reversed(self.recent["error"])),
            "recent_denials": list(reversed(self.recent["denial"])),
        }

    def _live(self, h2_connections: int, h2_streams: int) -> dict:
        open_on = self.open_by_listener.get
        return {
            "http1": max(0, sum(open_on(name, 0) for name in HTTP_LISTENERS) - h2_connections),
            "h2_connections": h2_connections,
            "h2_streams": h2_streams,
            "tunnel": self.running.get("tunnel", 0),
            "websocket": self.running.get("websocket", 0),
            "socks5": open_on("socks5", 0),
            "transparent": sum(open_on(name, 0) for name in TRANSPARENT_LISTENERS),
        }

    def history(self, now: float) -> list[list[int]]:
        """[second, bytes up, bytes down, requests] for each of the last HISTORY_SECONDS complete
        seconds, oldest first, quiet seconds as zeros (what the sparkline draws)."""
        last = int(now) - 1
        quiet = (0, 0, 0)
        return [[second, *self.seconds.get(second, quiet)]
                for second in range(last - HISTORY_SECONDS + 1, last + 1)]


def rates(seconds: list[list[int]]) -> dict:
    """Averages over `seconds` ([second, up, down, requests] each, quiet ones included)."""
    window = len(seconds) or 1
    return {"window_seconds": len(seconds),
            "bytes_up_per_second": round(sum(s[1] for s in seconds) / window, 1),
            "bytes_down_per_second": round(sum(s[2] for s in seconds) / window, 1),
            "requests_per_second": round(sum(s[3] for s in seconds) / window, 2)}


def top_list(items: Iterable[tuple[str, list[int]]], shown: int = TOP_SHOWN) -> list[dict]:
    ranked = sorted(items, key=lambda item: (-item[1][0], -item[1][1], item[0]))
    return [{"host": host, "requests": counts[0], "bytes": counts[1]} for host, counts in ranked[:shown]]


# --- several workers ----------------------------------------------------------------------------

def merge(snapshots: list[dict]) -> dict:
    """One view of several workers' snapshots: counts summed, listeners joined, destinations
    added up and ranked again, recent problems interleaved newest first."""
    if len(snapshots) == 1:
        return snapshots[0]
    if not snapshots:
        raise ValueError("nothing to merge")
    merged = dict(snapshots[0])
    for key, value in snapshots[0].items():
        if isinstance(value, (int, float)) and not isinstance(value, bool) and key not in _NOT_SUMMED:
            merged[key] = sum(s.get(key, 0) for s in snapshots)
    merged["time"] = max(s["time"] for s in snapshots)
    merged["uptime_seconds"] = max(s["uptime_seconds"] for s in snapshots)
    merged["workers"] = sum(s.get("workers", 1) for s in snapshots)
    merged.pop("pid", None)
    merged["pids"] = sorted(s["pid"] for s in snapshots if "pid" in s)
    for key in ("live", "open_by_listener", "totals"):
        merged[key] = _sum_maps(s.get(key, {}) for s in snapshots)
    merged["listeners"] = _merge_listeners(snapshots)
    merged["history"] = _merge_history(snapshots)
    window = snapshots[0]["rate"]["window_seconds"]
    merged["rate"] = {"window_seconds": window, **_sum_maps(
        {k: v for k, v in s["rate"].items() if k != "window_seconds"} for s in snapshots)}
    tops: dict[str, list[int]] = {}
    for s in snapshots:
        for entry in s["top_destinations"]:
            counts = tops.setdefault(entry["host"], [0, 0])
            counts[0] += entry["requests"]
            counts[1] += entry["bytes"]
    merged["top_destinations"] = top_list(tops.items())
    for key in ("recent_errors", "recent_denials"):
        rows = sorted((row for s in snapshots for row in s[key]), key=lambda row: -row["time"])
        merged[key] = rows[:RECENT_SIZE]
    return merged


_NOT_SUMMED = {"time", "uptime_seconds", "workers", "pid"}


def _sum_maps(maps: Iterable[dict]) -> dict:
    total: dict = {}
    for counts in maps:
        for key, value in counts.items():
            total[key] = total.get(key, 0) + value
    return {k: round(v, 2) if isinstance(v, float) else v for k, v in total.items()}


def _merge_listeners(snapshots: list[dict]) -> list[dict]:
    """SO_REUSEPORT workers share addresses: one row per listener, its open connections summed."""
    rows: dict[tuple, dict] = {}
    for s in snapshots:
        for entry in s["listeners"]:
            key = (entry["kind"], entry["address"])
            if key in rows and "open" in entry:
                rows[key]["open"] = rows[key].get("open", 0) + entry["open"]
            else:
                rows[key] = dict(entry)
    return list(rows.values())


def _merge_history(snapshots: list[dict]) -> list[list[int]]:
    seconds: dict[int, list[int]] = {}
    for s in snapshots:
        for second, up, down, requests in s["history"]:
            entry = seconds.setdefault(second, [second, 0, 0, 0])
            entry[1] += up
            entry[2] += down
            entry[3] += requests
    return [seconds[k] for k in sorted(seconds)][-HISTORY_SECONDS:]


class StatusPublisher:
    """Shares this worker's snapshot through `directory/status-<pid>.json` (written about once
    a second, atomically by rename) and reads the others' back for `/status.json`."""

    def __init__(self, directory: str | os.PathLike, snapshot: Callable[[float], dict],
                 pid: int | None = None) -> None:
        self.directory = Path(directory)
        self.snapshot = snapshot
        self.pid = os.getpid() if pid is None else pid
        self.path = self.directory / f"status-{self.pid}.json"
        self._task = None

    def publish(self, now: float) -> dict:
        data = dict(self.snapshot(now), pid=self.pid)
        self.directory.mkdir(parents=True, exist_ok=True)
        scratch = self.path.with_name(f".{self.path.name}.tmp")
        scratch.write_text(json.dumps(data, separators=(",", ":")), encoding="utf-8")
        os.replace(scratch, self.path)
        return data

    def collect(self, now: float, fresh: float = FRESH_SECONDS) -> dict:
        """This worker's snapshot now, merged with every other worker's fresher than `fresh`."""
        own = dict(self.snapshot(now), pid=self.pid)
        others = []
        for path in sorted(self.directory.glob("status-*.json")):
            if path == self.path:
                continue
            try:
                data = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError):       # gone, or half a file from an old writer
                continue
            if isinstance(data, dict) and now - data.get("time", 0) <= fresh:
                others.append(data)
        return merge([own, *others])

    def start(self, interval: float = PUBLISH_INTERVAL) -> None:
        """Publish in a greenlet until `stop()`; a failed write is retried at the next tick."""
        import gevent                # here: the board itself stays importable without gevent

        def loop() -> None:
            while True:
                try:
                    self.publish(time.time())
                except OSError:
                    pass
                gevent.sleep(interval)
        if self._task is None:
            self._task = gevent.spawn(loop)

    def stop(self) -> None:
        if self._task is not None:
            self._task.kill(block=True, timeout=1)
            self._task = None
        with contextlib.suppress(OSError):
            self.path.unlink()
