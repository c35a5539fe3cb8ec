#!/usr/bin/env python3
"""Benchmark the appliance's explicit HTTP/1.1 proxy against squid and tinyproxy.

Sits outside the data path: it starts an origin (nginx for small objects, a
stdlib "bulk" TCP server for CONNECT throughput), then each proxy in turn with
its own temporary config and state, drives it with the same load, stops it by
PID, and reports absolute numbers and the ratios appliance/squid and
appliance/tinyproxy. A direct (no proxy) baseline is measured too.

Loopback only: every socket here is bound to or connects to 127.0.0.1. Every
loop is bounded in count and time, and every process started is stopped by
its PID (or the process group it leads, which this script created) in a
`finally`. Run it through `bench/run`, which installs the tools it needs.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

from children import MiB, Child, StartFailed, pick_port, tool
from load import Params, measure
from origins import start_bulk, start_origin
from peers import start_proxy

BENCH_DIR = Path(__file__).resolve().parent
PROXIES = ("appliance", "squid", "tinyproxy")
TARGETS = ("direct",) + PROXIES


def make_params(args: argparse.Namespace) -> Params:
    if args.quick:
        base = dict(wrk_seconds=2, warmup_seconds=0, download_bytes=256 * MiB,
                    upload_bytes=256 * MiB, transfer_repeats=1, transfer_deadline=20.0)
    else:
        base = dict(wrk_seconds=10, warmup_seconds=2, download_bytes=2048 * MiB,
                    upload_bytes=1024 * MiB, transfer_repeats=3, transfer_deadline=40.0)
    if args.duration:
        base["wrk_seconds"] = args.duration
    return Params(quick=args.quick, wrk_threads=args.threads,
                  wrk_connections=args.connections, start_deadline=20.0, **base)


METRICS = [
    # (label, section, key, higher_is_better, format)
    ("small objects, req/s", "small", "requests_per_s", True, "{:.0f}"),
    ("  latency p50, ms", "small", "latency_p50_ms", False, "{:.2f}"),
    ("  latency p99, ms", "small", "latency_p99_ms", False, "{:.2f}"),
    ("  proxy CPU-us/request", "small", "cpu_us_per_request", False, "{:.1f}"),
    ("CONNECT download, MB/s", "download", "mb_per_s", True, "{:.0f}"),
    ("  proxy CPU-s per GB", "download", "cpu_s_per_gb", False, "{:.3f}"),
    ("CONNECT upload, MB/s", "upload", "mb_per_s", True, "{:.0f}"),
    ("  proxy CPU-s per GB", "upload", "cpu_s_per_gb", False, "{:.3f}"),
]


def metric_value(results: dict, target: str, section: str, key: str):
    sec = results.get(target, {}).get(section)
    if not sec or not sec.get("ok"):
        return None
    return sec.get(key)


def compute_ratios(results: dict) -> dict:
    ratios: dict = {}
    for label, section, key, _, _ in METRICS:
        a = metric_value(results, "appliance", section, key)
        for peer in ("squid", "tinyproxy"):
            b = metric_value(results, peer, section, key)
            ratios.setdefault(f"appliance/{peer}", {})[f"{section}.{key}"] = (
                round(a / b, 3) if a is not None and b else None)
    return ratios


def print_table(results: dict, ratios: dict, skipped: dict) -> None:
    cols = list(TARGETS) + ["app/squid", "app/tiny"]
    width = 12
    print()
    print(f"{'metric':<26}" + "".join(f"{c:>{width}}" for c in cols))
    print("-" * (26 + width * len(cols)))
    for label, section, key, _, fmt in METRICS:
        row = f"{label:<26}"
        for t in TARGETS:
            v = metric_value(results, t, section, key)
            cell = fmt.format(v) if v is not None else ("skip" if t in skipped else "-")
            row += f"{cell:>{width}}"
        for peer in ("squid", "tinyproxy"):
            r = ratios[f"appliance/{peer}"].get(f"{section}.{key}")
            row += f"{(f'{r:.2f}x' if r is not None else '-'):>{width}}"
        print(row)
    print()
    print("Ratios are appliance/peer: above 1 is better for req/s and MB/s; "
          "below 1 is better for latency and CPU.")
    closers = [t for t in TARGETS if results.get(t, {}).get("client_keepalive") is False]
    if closers:
        print(f"No client keep-alive (one TCP connection per request): {', '.join(closers)}.")
    for name, why in skipped.items():
        lines = why.strip().splitlines() or [""]
        print(f"skipped {name}: {lines[0]}" + (f" ... {lines[-1]}" if len(lines) > 1 else ""))


def tool_versions(python: str) -> dict:
    def first_line(argv: list[str]) -> str:
        try:
            p = subprocess.run(argv, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return "missing"
        return ((p.stdout or "") + (p.stderr or "")).strip().splitlines()[0:1][0] if (
            p.stdout or p.stderr) else "?"
    return {
        "squid": first_line([tool("squid") or "squid", "-v"]),
        "tinyproxy": first_line([tool("tinyproxy") or "tinyproxy", "-v"]),
        "nginx": first_line([tool("nginx") or "nginx", "-v"]),
        "wrk": first_line([tool("wrk") or "wrk", "-v"]),
        "python": first_line([python, "-VV"]),
    }


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="smoke mode: 2 s wrk, 256 MiB transfers")
    p.add_argument("--only", action="append", default=[], metavar="NAME",
                   help=f"run only these ({', '.join(TARGETS)}); repeat or comma-separate")
    p.add_argument("--duration", type=int, help="wrk seconds per proxy (default 10, quick 2)")
    p.add_argument("--threads", type=int, default=2, help="wrk threads (default 2)")
    p.add_argument("--connections", type=int, default=50, help="wrk connections (default 50)")
    p.add_argument("--json", type=Path, help="where to write results (default bench/results/)")
    p.add_argument("--keep-tmp", action="store_true", help="keep the temporary work dir")
    args = p.parse_args(argv)
    names = [n.strip() for item in args.only for n in item.split(",") if n.strip()]
    unknown = [n for n in names if n not in TARGETS]
    if unknown:
        p.error(f"--only: unknown {', '.join(unknown)}; choose from {', '.join(TARGETS)}")
    args.targets = [t for t in TARGETS if not names or t in names]
    return args


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    params = make_params(args)
    python = os.environ.get("PYTHON") or sys.executable
    missing = [t for t in ("wrk", "nginx") if not tool(t)]
    missing += [t for t in ("squid", "tinyproxy") if t in args.targets and not tool(t)]
    if missing:
        print(f"missing tools: {', '.join(missing)} (bench/run installs them)", file=sys.stderr)
        return 2

    # SIGTERM/SIGHUP unwind through the finally blocks like Ctrl-C does.
    def _interrupt(signum, _frame):
        raise KeyboardInterrupt(f"signal {signum}")
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGHUP, _interrupt)

    started = time.time()
    load_before = os.getloadavg()[0]
    if load_before > 0.5:
        print(f"warning: load average {load_before:.2f} before the run; other work on this "
              f"{os.cpu_count()}-core machine skews the absolute numbers (ratios less so)")
    root = Path(tempfile.mkdtemp(prefix="proxy-bench-"))
    os.chmod(root, 0o755)
    taken: set[int] = set()
    ports = {"origin": pick_port(28080, taken), "bulk": pick_port(29000, taken)}
    results: dict = {}
    skipped: dict = {}
    children: list[Child] = []
    try:
        origin_dir = root / "origin"
        origin_dir.mkdir(mode=0o755)
        children.append(start_origin(origin_dir, ports["origin"]))
        children.append(start_bulk(origin_dir, ports["bulk"], python))
        for name in args.targets:
            if name == "direct":
                print("direct: no proxy")
                results[name] = measure(name, None, None, ports, params, root)
                continue
            try:
                child, port = start_proxy(name, root, ports, taken, params, python)
            except (StartFailed, OSError) as exc:
                skipped[name] = str(exc)
                print(f"{name}: SKIPPED, did not start: {exc}")
                continue
            children.append(child)
            try:
                results[name] = measure(name, port, child.pid, ports, params, root)
                if not child.alive():
                    results[name]["exited"] = child.proc.returncode
                    print(f"  {name}: exited during the run:\n{child.output_tail()}")
            finally:
                child.stop()
    except StartFailed as exc:
        print(f"bench: origin failed to start: {exc}", file=sys.stderr)
        return 1
    finally:
        for child in reversed(children):
            child.stop()
        if args.keep_tmp:
            print(f"work dir kept: {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)

    ratios = compute_ratios(results)
    print_table(results, ratios, skipped)
    report = {
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
        "elapsed_s": round(time.time() - started, 1),
        "params": asdict(params),
        "machine": {"nproc": os.cpu_count(), "kernel": platform.release(),
                    "loadavg_1m_before": round(load_before, 2),
                    "tools": tool_versions(python)},
        "results": results,
        "skipped": skipped,
        "ratios": ratios,
    }
    out = args.json or BENCH_DIR / "results" / time.strftime("%Y%m%d-%H%M%S.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"results: {out}  (total {report['elapsed_s']} s)")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except KeyboardInterrupt as exc:
        print(f"bench: interrupted ({exc or 'Ctrl-C'}); every started process was stopped",
              file=sys.stderr)
        sys.exit(130)
