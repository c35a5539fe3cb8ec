"""Access log and metrics: the end of every path through the appliance.

Each request or tunnel carries one `AccessRecord` that the frontend fills as it goes; `Observer.
finish` writes it exactly once, as a JSON line or a Squid native line (so SARG and friends keep
working), and updates the Prometheus metrics served on the admin listener.
"""

from __future__ import annotations

import itertools
import logging
import os
import sys
import time
from dataclasses import dataclass, field
from json.encoder import encode_basestring_ascii
from typing import Callable

import gevent
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector

from . import __version__
from .status import StatusBoard


def _json_str(value: str | None) -> str:
    return "null" if value is None else encode_basestring_ascii(value)


@dataclass
class AccessRecord:
    """What happened to one request or tunnel; filled along the data path, written once."""

    listener: str
    client: str
    kind: str = "request"                 # request | tunnel | websocket | intercept | tls
    method: str = "-"
    target: str = "-"
    status: int = 0
    bytes_up: int = 0                     # client → origin, bytes as received from the client
    bytes_down: int = 0                   # origin → client, bytes as sent to the client
    rule: str | None = None
    error: str | None = None
    user: str | None = None
    upstream: str | None = None           # origin address actually used
    content_type: str | None = None
    protocol: str = "HTTP/1.1"            # what the client spoke: HTTP/1.1 or HTTP/2
    connection: int = 0                   # the client connection's number, unique in this process
    start: float = field(default_factory=time.time)
    _mono: float = field(default_factory=time.monotonic, repr=False)

    @property
    def duration_s(self) -> float:
        return time.monotonic() - self._mono

    def squid_result(self) -> str:
        if self.error and self.error.startswith("denied"):
            return "TCP_DENIED"
        if self.kind in ("tunnel", "websocket", "intercept") and self.status in (101, 200):
            return "TCP_TUNNEL"
        if self.status == 0 or (self.error and self.error.startswith("protocol")):
            return "NONE_NONE"
        return "TCP_MISS"

    def to_json(self) -> str:
        """One JSON object, as `json.dumps(..., separators=(",", ":"))` writes it, built by
        hand: this runs once per request, and the generic encoder costs more than the request."""
        return (f'{{"time":{round(self.start, 3)!r},"client":{_json_str(self.client)},'
                f'"user":{_json_str(self.user)},"listener":{_json_str(self.listener)},'
                f'"kind":{_json_str(self.kind)},"method":{_json_str(self.method)},'
                f'"target":{_json_str(self.target)},"status":{self.status:d},'
                f'"bytes_up":{self.bytes_up:d},"bytes_down":{self.bytes_down:d},'
                f'"duration_ms":{round(self.duration_s * 1000, 1)!r},"rule":{_json_str(self.rule)},'
                f'"upstream":{_json_str(self.upstream)},"error":{_json_str(self.error)},'
                f'"protocol":{_json_str(self.protocol)},"connection":{self.connection:d}}}')

    def to_squid(self) -> str:
        """`%ts.%03tu %6tr %>a %Ss/%03>Hs %<st %rm %ru %[un %Sh/%<a %mt` (Squid's default)."""
        hier = f"HIER_DIRECT/{self.upstream}" if self.upstream else "HIER_NONE/-"
        return (f"{self.start:.3f} {int(self.duration_s * 1000):6d} {self.client} "
                f"{self.squid_result()}/{self.status:03d} {self.bytes_down} {self.method} "
                f"{self.target} {self.user or '-'} {hier} {self.content_type or '-'}")


class AccessLog:
    """Appends one line per record to a file (reopened on SIGUSR1 for logrotate) or stdout.

    Lines written while the event loop is busy are joined and written by one `write` when it
    next turns (a callback, not a timer: an idle appliance writes each line at once, a busy one
    writes a batch per loop turn instead of a system call per request). `lost(n)` is told of
    lines that could not be written.
    """

    def __init__(self, path: str, fmt: str = "jsonl", lost: Callable[[int], None] | None = None) -> None:
        self.path = path
        self.format = fmt
        self.lost = lost
        self._file = None
        self._pending: list[str] = []
        self._last_complaint = float("-inf")
        self.reopen()

    def reopen(self) -> None:
        """Open (again) the log file, after logrotate moved it (SIGUSR1). A file that cannot be
        opened leaves the log off; each write tries again, and losses are counted."""
        if self.path == "-":
            self._file = sys.stdout
            return
        self.flush()                               # lines so far belong to the old file
        old = self._file
        try:
            self._file = open(self.path, "ab", buffering=0)    # one write(2) per batch
        except OSError as exc:
            self._file = None
            self._failed(exc)
        if old is not None:
            try:
                old.close()
            except OSError:
                pass

    def write(self, record: AccessRecord) -> None:
        """Queue one line for the next turn of the loop. Proxying never stops for the log: a
        line that cannot be written (full disk, file gone, ...) is counted and dropped."""
        if not self._pending:
            gevent.get_hub().loop.run_callback(self.flush)
        self._pending.append(record.to_squid() if self.format == "squid" else record.to_json())

    def flush(self) -> None:
        lines, self._pending = self._pending, []
        if not lines:
            return
        if self._file is None:
            self.reopen()
        try:
            if self._file is None:
                raise FileNotFoundError(f"{self.path} is not open")
            text = "\n".join(lines) + "\n"
            if self.path == "-":
                self._file.write(text)
                self._file.flush()
            else:
                data = memoryview(text.encode("utf-8"))
                while data:
                    data = data[self._file.write(data):]
        except (OSError, ValueError) as exc:       # ValueError: write to a closed file
            self._failed(exc)
            if self.lost is not None:
                self.lost(len(lines))

    def _failed(self, exc: Exception) -> None:
        now = time.monotonic()
        if now - self._last_complaint > 60:
            self._last_complaint = now
            logging.getLogger("appliance.observe").error(
                "access log %s: cannot write (%s); lines are lost until it works again",
                self.path, getattr(exc, "strerror", None) or exc)

    def close(self) -> None:
        self.flush()
        if self._file is not None and self.path != "-":
            self._file.close()


class Metrics:
    """Prometheus metrics (`appliance_` prefix, base units, `_total` counters), per listener.

    With several workers (`[appliance] workers`), the supervisor gives each worker
    PROMETHEUS_MULTIPROC_DIR: prometheus_client then keeps every value in a per-process file
    there, and `render` sums all the workers' files, dead ones' counters included, so whichever
    worker answers /metrics reports the whole appliance. Gauges count only live workers
    (`livesum`); `Info` has no multiprocess mode, so build info is a `max` gauge there.
    """

    MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"     # prometheus_client's own name for it

    def __init__(self) -> None:
        self.multiprocess_dir = os.environ.get(self.MULTIPROC_ENV) or None
        self.registry = CollectorRegistry()
        r = self.registry
        self.connections = Counter("appliance_connections", "Client connections accepted",
                                   ["listener"], registry=r)
        self.active = Gauge("appliance_active_connections", "Client connections open now",
                            ["listener"], registry=r, multiprocess_mode="livesum")
        self.requests = Counter("appliance_requests", "Requests and tunnels by final status",
                                ["listener", "status"], registry=r)
        self.bytes = Counter("appliance_transferred_bytes", "Bytes relayed (up: client to origin)",
                             ["listener", "direction"], registry=r)
        self.duration = Histogram("appliance_request_duration_seconds", "Request or tunnel duration",
                                  ["listener"], registry=r)
        self.dns_queries = Counter("appliance_dns_queries", "DNS queries on the dns listener by result "
                                   "(answered, forwarded, refused, truncated, servfail, malformed)",
                                   ["result"], registry=r)
        self.log_failures = Counter("appliance_access_log_write_failures",
                                    "Access-log lines that could not be written (full disk, ...)",
                                    registry=r)
        self.limit_refusals = Counter("appliance_limit_refusals",
                                      "Connections refused by a [limits] setting", ["limit"], registry=r)
        if self.multiprocess_dir is None:
            Info("appliance_build", "Build information", registry=r).info({"version": __version__})
        else:
            Gauge("appliance_build_info", "Build information", ["version"], registry=r,
                  multiprocess_mode="max").labels(__version__).set(1)

        self._children: dict[tuple, object] = {}

    def child(self, metric, *labels: str):
        """`metric.labels(*labels)`, cached: label lookup costs more than the update itself."""
        key = (metric, labels)
        found = self._children.get(key)
        if found is None:
            found = self._children[key] = metric.labels(*labels)
        return found

    def render(self) -> bytes:
        if self.multiprocess_dir is None:
            return generate_latest(self.registry)
        everyone = CollectorRegistry()             # fresh per scrape: the files are the truth
        MultiProcessCollector(everyone, self.multiprocess_dir)
        return generate_latest(everyone)


class Observer:
    """Where every path ends: one access-log line, one set of metric updates, and the counts
    of the status page (`board`)."""

    def __init__(self, access_log: AccessLog, metrics: Metrics | None = None,
                 board: StatusBoard | None = None) -> None:
        self.access_log = access_log
        self.metrics = metrics or Metrics()
        access_log.lost = self.metrics.log_failures.inc
        self.board = board or StatusBoard(__version__, time.time())
        self._connection_ids = itertools.count(1)

    def live(self, kind: str):
        """`with observer.live("tunnel"):` around a relay: counted as running on the status page."""
        return self.board.live(kind)

    def connection_opened(self, listener: str) -> int:
        """Count a new client connection; returns its number for the access log."""
        m = self.metrics
        m.child(m.connections, listener).inc()
        m.child(m.active, listener).inc()
        self.board.opened(listener)
        return next(self._connection_ids)

    def connection_closed(self, listener: str) -> None:
        m = self.metrics
        m.child(m.active, listener).dec()
        self.board.closed(listener)

    def finish(self, record: AccessRecord) -> None:
        m = self.metrics
        m.child(m.requests, record.listener, str(record.status)).inc()
        m.child(m.bytes, record.listener, "up").inc(record.bytes_up)
        m.child(m.bytes, record.listener, "down").inc(record.bytes_down)
        m.child(m.duration, record.listener).observe(record.duration_s)
        self.board.finished(record, time.time())
        self.access_log.write(record)
