"""The bench's tables and ratios: one table for the plain HTTP/1.1 suite, one for the TLS suite.

A table is columns (each a target's results, under a key), metric rows, and ratio columns
(column A / column B for the same metric in the same run).
"""
from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def save_results(summary: dict, path: Path | None, prefix: str = "") -> Path:
    """Write a run's JSON (to `path`, or results/<prefix>-<time>.json) and say where it went."""
    name = time.strftime("%Y%m%d-%H%M%S.json")
    out = path or RESULTS_DIR / (f"{prefix}-{name}" if prefix else name)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=2) + "\n")
    print(f"\nresults: {out}  (total {summary['elapsed_s']} s)")
    return out


def run_main(main, name: str) -> None:
    """`sys.exit(main(argv))`; Ctrl-C ends with 130 after main's cleanup has stopped its children."""
    try:
        sys.exit(main(sys.argv[1:]))
    except KeyboardInterrupt as exc:
        print(f"{name}: interrupted ({exc or 'Ctrl-C'}); every started process was stopped",
              file=sys.stderr)
        sys.exit(130)


@dataclass(frozen=True)
class Metric:
    label: str
    section: str
    key: str
    fmt: str
    scale: float = 1.0
    ratio: bool = True          # a ratio makes sense (not for the client's own CPU share)


@dataclass(frozen=True)
class Column:
    header: str
    target: str                 # key in results: direct, appliance, squid, tinyproxy
    suite: str | None = None    # key under the target: None (plain), "tls_h2", "tls_h1"


@dataclass(frozen=True)
class Table:
    title: str
    columns: tuple[Column, ...]
    metrics: tuple[Metric, ...]
    ratios: tuple[tuple[str, str, str], ...]   # (header, column header A, column header B)
    notes: tuple[str, ...] = ()


PLAIN = Table(
    title="explicit HTTP/1.1 proxy (plain TCP)",
    columns=(Column("direct", "direct"), Column("appliance", "appliance"),
             Column("app auto", "appliance-auto"),
             Column("squid", "squid"), Column("tinyproxy", "tinyproxy"),
             Column("mitmproxy", "mitmproxy"), Column("proxy.py", "proxy.py")),
    metrics=(
        Metric("small objects, req/s", "small", "requests_per_s", "{:.0f}"),
        Metric("  latency p50, ms", "small", "latency_p50_ms", "{:.2f}"),
        Metric("  latency p99, ms", "small", "latency_p99_ms", "{:.2f}"),
        Metric("  proxy CPU-us/request", "small", "cpu_us_per_request", "{:.1f}"),
        Metric("  proxy CPU-s per 1000 req", "small", "cpu_us_per_request", "{:.3f}",
               scale=1e-3),
        Metric("CONNECT download x1, MB/s", "download", "mb_per_s", "{:.0f}"),
        Metric("  proxy CPU-s per GB", "download", "cpu_s_per_gb", "{:.3f}"),
        Metric("CONNECT download x4, MB/s", "download_n", "mb_per_s", "{:.0f}"),
        Metric("  proxy CPU-s per GB", "download_n", "cpu_s_per_gb", "{:.3f}"),
        Metric("CONNECT upload x1, MB/s", "upload", "mb_per_s", "{:.0f}"),
        Metric("  proxy CPU-s per GB", "upload", "cpu_s_per_gb", "{:.3f}"),
    ),
    ratios=(("app/squid", "appliance", "squid"), ("app/tiny", "appliance", "tinyproxy"),
            ("app/mitm", "appliance", "mitmproxy"), ("app/pp", "appliance", "proxy.py"),
            ("auto/1", "app auto", "appliance")),
    notes=("appliance = workers 1; app auto = workers \"auto\" (one per core, SO_REUSEPORT). "
           "mitmproxy = mitmdump, CONNECT passed through (ignore_hosts .*); proxy.py with its "
           "defaults (threadless, one worker per core). x4 = 4 tunnels at once sharing the bytes.",),
)


def tls_table(streams: int) -> Table:
    return Table(
        title="proxy over TLS: HTTP/2 (ALPN h2) and HTTP/1.1 in TLS (ALPN http/1.1)",
        columns=(Column("direct h2", "direct", "tls_h2"), Column("direct h1", "direct", "tls_h1"),
                 Column("app h2", "appliance", "tls_h2"), Column("app h1", "appliance", "tls_h1"),
                 Column("squid h1", "squid", "tls_h1")),
        metrics=(
            Metric("small objects, req/s", "small", "requests_per_s", "{:.0f}"),
            Metric("  latency mean, ms", "small", "latency_mean_ms", "{:.2f}"),
            Metric("  proxy CPU-us/request", "small", "cpu_us_per_request", "{:.1f}"),
            Metric("CONNECT x1 download, MB/s", "connect_1", "mb_per_s", "{:.0f}"),
            Metric("  proxy CPU-s per GB", "connect_1", "cpu_s_per_gb", "{:.3f}"),
            Metric("  proxy CPU, % of a core", "connect_1", "proxy_cpu_busy", "{:.0f}",
                   scale=100, ratio=False),
            Metric("  client CPU, % of a core", "connect_1", "client_cpu_busy", "{:.0f}",
                   scale=100, ratio=False),
            Metric(f"CONNECT x{streams} aggregate, MB/s", "connect_n", "mb_per_s", "{:.0f}"),
            Metric("  proxy CPU-s per GB", "connect_n", "cpu_s_per_gb", "{:.3f}"),
            Metric("  proxy CPU, % of a core", "connect_n", "proxy_cpu_busy", "{:.0f}",
                   scale=100, ratio=False),
            Metric("  client CPU, % of a core", "connect_n", "client_cpu_busy", "{:.0f}",
                   scale=100, ratio=False),
        ),
        ratios=(("h2/h1", "app h2", "app h1"), ("h2/squid", "app h2", "squid h1"),
                ("h1/squid", "app h1", "squid h1")),
        notes=(
            "h1 = HTTP/1.1 inside TLS on the same port. Small objects: h2load "
            "(h2) or wrk (h1), same concurrency; direct = nginx's own TLS port.",
            f"CONNECT x{streams}: {streams} streams of ONE h2 connection, or {streams} TLS "
            "connections for h1; direct = a Node TLS server that answers CONNECT itself (the "
            "client's ceiling).",
        ),
    )


def value(results: dict, column: Column, metric: Metric):
    node = results.get(column.target, {})
    if column.suite:
        node = node.get(column.suite, {})
    sec = node.get(metric.section)
    if not sec or not sec.get("ok") or sec.get(metric.key) is None:
        return None
    return sec[metric.key] * metric.scale


def compute_ratios(results: dict, table: Table) -> dict:
    cols = {c.header: c for c in table.columns}
    out: dict = {}
    for header, a_name, b_name in table.ratios:
        entry = out.setdefault(f"{a_name}/{b_name}", {})
        for m in table.metrics:
            if not m.ratio:
                continue
            a, b = value(results, cols[a_name], m), value(results, cols[b_name], m)
            entry[f"{m.section}.{m.key}"] = round(a / b, 3) if a is not None and b else None
    return out


def print_table(results: dict, table: Table, ratios: dict, skipped: dict) -> None:
    width, label_width = 11, 30
    heads = [c.header for c in table.columns] + [r[0] for r in table.ratios]
    print()
    print(table.title)
    print(f"{'metric':<{label_width}}" + "".join(f"{h:>{width}}" for h in heads))
    print("-" * (label_width + width * len(heads)))
    for m in table.metrics:
        row = f"{m.label:<{label_width}}"
        for c in table.columns:
            v = value(results, c, m)
            cell = m.fmt.format(v) if v is not None else ("skip" if c.target in skipped else "-")
            row += f"{cell:>{width}}"
        for _, a_name, b_name in table.ratios:
            r = ratios[f"{a_name}/{b_name}"].get(f"{m.section}.{m.key}")
            row += f"{(f'{r:.2f}x' if r is not None else '-'):>{width}}"
        print(row)
    for note in table.notes:
        print(note)


BUSY_CORES = 0.25   # other processes' CPU during a measurement worth a warning


def busy_sections(results: dict) -> list[str]:
    """Measurements during which processes outside the bench used >= BUSY_CORES cores."""
    found = []
    for target, node in results.items():
        for suite, sections in [(None, node)] + [(k, v) for k, v in node.items()
                                                  if k.startswith("tls_")]:
            for name, sec in sections.items():
                if isinstance(sec, dict) and sec.get("other_cpu_cores", 0) >= BUSY_CORES:
                    where = f"{target} {suite[4:]} {name}" if suite else f"{target} {name}"
                    found.append(f"{where} ({sec['other_cpu_cores']:.2f})")
    return found


def print_footer(results: dict, skipped: dict) -> None:
    print()
    busy = busy_sections(results)
    if busy:
        print(f"Other processes used >= {BUSY_CORES} of the cores during: {', '.join(busy)}; "
              "those numbers are low by up to that share.")
    print("Ratios are A/B: above 1 is better for req/s and MB/s; "
          "below 1 is better for latency and CPU.")
    closers = [t for t, r in results.items() if r.get("client_keepalive") is False]
    if closers:
        print(f"No client keep-alive (one TCP connection per request): {', '.join(closers)}.")
    for name, why in skipped.items():
        lines = why.strip().splitlines() or [""]
        print(f"skipped {name}: {lines[0]}" + (f" ... {lines[-1]}" if len(lines) > 1 else ""))


IDLE_PROXIES = ("appliance", "appliance-auto", "squid", "tinyproxy", "mitmproxy", "proxy.py")
IDLE_HEADERS = {"appliance-auto": "app auto"}
IDLE_SHORT = {"squid": "squid", "tinyproxy": "tiny", "mitmproxy": "mitm", "proxy.py": "pp"}


def print_idle(results: dict, counts: list[int], targets: list[str], nofile: int = 0) -> dict:
    """The idle-tunnel table: KiB of process-tree RSS (and Pss) per idle CONNECT tunnel,
    how many tunnels each proxy held; ratios appliance / each peer. Returns the ratios."""
    names = [n for n in IDLE_PROXIES if n in targets and "idle" in results.get(n, {})]
    width, label_width = 11, 30
    peers = [n for n in names if not n.startswith("appliance")]
    heads = [IDLE_HEADERS.get(n, n) for n in names] + [f"app/{IDLE_SHORT[n]}" for n in peers]
    print()
    print("idle CONNECT tunnels: proxy process-tree memory per tunnel (KiB)")
    print(f"{'metric':<{label_width}}" + "".join(f"{h:>{width}}" for h in heads))
    print("-" * (label_width + width * len(heads)))
    ratios: dict = {}

    def entry(name: str, count: int) -> dict:
        return results.get(name, {}).get("idle", {}).get(str(count), {})

    for count in counts:
        for label, key in ((f"RSS KiB/tunnel @{count}", "rss_kib_per_tunnel"),
                           (f"  Pss KiB/tunnel @{count}", "pss_kib_per_tunnel"),
                           (f"  fds/tunnel @{count}", "fds_per_tunnel")):
            row = f"{label:<{label_width}}"
            for n in names:
                e = entry(n, count)
                v = e.get(key)
                row += f"{('-' if v is None else f'{v:.1f}' + ('' if e.get('ok') else '*')):>{width}}"
            for n in peers:
                a, b = entry("appliance", count).get(key), entry(n, count).get(key)
                r = round(a / b, 3) if a is not None and b else None
                ratios.setdefault(f"appliance/{n}", {})[f"{count}.{key}"] = r
                row += f"{(f'{r:.2f}x' if r is not None else '-'):>{width}}"
            print(row)
        row = f"{f'  tunnels held of {count}':<{label_width}}"
        for n in names:
            e = entry(n, count)
            row += f"{e.get('alive_after_settle', e.get('opened', 0)):>{width}}"
        print(row)
    print("RSS: VmRSS summed over the proxy's process tree (/proc/PID/status), after minus "
          "before, divided by the tunnels opened; Pss splits shared pages between processes "
          "(fairer for forking proxies). Each count on a freshly started proxy.")
    failed = [(n, c, entry(n, c).get("error", "")) for n in names for c in counts
              if not entry(n, c).get("ok")]
    for n, c, why in failed:
        print(f"* {n} @{c}: {why}")
    if nofile and nofile < 2 * max(counts) + 64:
        print(f"RLIMIT_NOFILE here is {nofile} and could not be raised (no CAP_SYS_RESOURCE): a "
              f"one-process proxy needs 2 descriptors per tunnel, so it cannot hold more than "
              f"about {(nofile - 64) // 2} tunnels on this machine, whatever its own limits.")
    return ratios
