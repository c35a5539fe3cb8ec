#!/usr/bin/env python3
"""Benchmark the appliance's explicit proxy against squid, tinyproxy, mitmproxy and proxy.py.

Sits outside the data path: it starts an origin (nginx for small objects, a
stdlib "bulk" TCP server for CONNECT throughput), then each proxy in turn with
its own temporary config and state, drives it with the same load, stops it by
PID, and reports absolute numbers and ratios. Three suites: "plain" (the
explicit HTTP/1.1 proxy on TCP: the appliance with workers = 1 and "auto",
squid, tinyproxy, mitmproxy, proxy.py), "tls" (the proxy's TLS port: the
appliance over HTTP/2 and over HTTP/1.1 in TLS, squid's https_port) and "idle"
(RSS per idle CONNECT tunnel at 2,000 and 10,000 tunnels). A direct (no proxy)
baseline is measured for plain and tls. nghttpx (HTTP/2 proxy mode in front of
squid, the HTTP/2 peer that bench/h2_bench.py measures) is started once and
checked, and its version recorded.

Loopback only: every socket here is bound to or connects to 127.0.0.1. Every
loop is bounded in count and time, and every process started is stopped by
its PID (or the process group it leads, which this script created) in a
`finally`. Run it through `bench/run`, which installs the tools it needs.
"""
from __future__ import annotations

import argparse
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import report
from children import (MiB, Child, OtherLoad, StartFailed, cpu_model, first_line, pick_port,
                      tool, wait_until)
from load import Params, measure
from origins import start_bulk, start_origin
from load import listening
from peers import TLS_CAPABLE, peer_tool, raise_nofile, start_nghttpx, start_proxy, start_squid
from tls_load import make_certificate, measure_tls, start_ceiling
from tunnels import idle_cost, parallel_download, start_sink

BENCH_DIR = Path(__file__).resolve().parent
PROXIES = ("appliance", "appliance-auto", "squid", "tinyproxy", "mitmproxy", "proxy.py")
TARGETS = ("direct",) + PROXIES
TARGET_ALIASES = {"proxypy": "proxy.py", "mitmdump": "mitmproxy", "auto": "appliance-auto"}
SUITES = ("plain", "tls", "idle")
SUITE_ALIASES = {"h2": "tls", "h1": "plain"}
PARALLEL_STREAMS = 4      # plain suite: CONNECT download over this many tunnels at once


def make_params(args: argparse.Namespace) -> Params:
    if args.quick:
        base = dict(wrk_seconds=2, warmup_seconds=0, download_bytes=256 * MiB,
                    upload_bytes=256 * MiB, transfer_repeats=1, transfer_deadline=20.0,
                    tls_bytes=256 * MiB, tls_parallel_bytes=256 * MiB)
    else:
        base = dict(wrk_seconds=10, warmup_seconds=2, download_bytes=2048 * MiB,
                    upload_bytes=1024 * MiB, transfer_repeats=3, transfer_deadline=40.0,
                    tls_bytes=1024 * MiB, tls_parallel_bytes=1024 * MiB)
    if args.duration:
        base["wrk_seconds"] = args.duration
    if args.idle_counts:
        args.idle = [int(x) for x in args.idle_counts.split(",") if x.strip()]
    else:
        args.idle = [500, 2000] if args.quick else [2000, 10000]
    return Params(quick=args.quick, wrk_threads=args.threads,
                  wrk_connections=args.connections, start_deadline=20.0,
                  h2load_clients=args.h2_clients, h2load_streams=args.h2_streams,
                  tls_streams=args.tls_streams, h2_max_frame_size=args.h2_frame_size, **base)


def tool_versions(python: str) -> dict:
    return {
        "squid": first_line([tool("squid") or "squid", "-v"]),
        "tinyproxy": first_line([tool("tinyproxy") or "tinyproxy", "-v"]),
        "nginx": first_line([tool("nginx") or "nginx", "-v"]),
        "wrk": first_line([tool("wrk") or "wrk", "-v"]),
        "h2load": first_line([tool("h2load") or "h2load", "--version"]),
        "nghttpx": first_line([tool("nghttpx") or "nghttpx", "--version"]),
        "mitmproxy": first_line([peer_tool("mitmdump") or "mitmdump", "--version"]),
        "proxy.py": first_line([peer_tool("proxy") or "proxy", "--version"]),
        "node": first_line([tool("node") or "node", "--version"]),
        "python": first_line([python, "-VV"]),
    }


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="smoke mode: 2 s wrk, 256 MiB transfers")
    p.add_argument("--only", action="append", default=[], metavar="NAME",
                   help=f"run only these targets ({', '.join(TARGETS)}) and/or suites "
                        f"(plain, tls; h2 = tls); repeat or comma-separate")
    p.add_argument("--duration", type=int, help="wrk seconds per proxy (default 10, quick 2)")
    p.add_argument("--threads", type=int, default=2, help="wrk threads (default 2)")
    p.add_argument("--connections", type=int, default=50, help="wrk connections (default 50)")
    p.add_argument("--h2-clients", type=int, default=2,
                   help="TLS suite: h2load connections (default 2)")
    p.add_argument("--h2-streams", type=int, default=25,
                   help="TLS suite: concurrent streams per h2load connection (default 25)")
    p.add_argument("--tls-streams", type=int, default=16,
                   help="TLS suite: parallel CONNECT streams (default 16)")
    p.add_argument("--h2-frame-size", type=int, default=16384,
                   help="TLS suite: SETTINGS_MAX_FRAME_SIZE of the h2 CONNECT client "
                        "(default 16384, what browsers keep; at most 16777215)")
    p.add_argument("--idle-counts", metavar="N,M",
                   help="idle suite: tunnel counts (default 2000,10000; quick 500,2000)")
    p.add_argument("--idle-deadline", type=float, default=90.0,
                   help="idle suite: seconds allowed to open one count's tunnels (default 90)")
    p.add_argument("--json", type=Path, help="where to write results (default bench/results/)")
    p.add_argument("--keep-tmp", action="store_true", help="keep the temporary work dir")
    args = p.parse_args(argv)
    names = [n.strip() for item in args.only for n in item.split(",") if n.strip()]
    names = [TARGET_ALIASES.get(n, SUITE_ALIASES.get(n, n)) for n in names]
    unknown = [n for n in names if n not in TARGETS + SUITES]
    if unknown:
        p.error(f"--only: unknown {', '.join(unknown)}; choose from "
                f"{', '.join(TARGETS + SUITES)} (h2 = tls)")
    targets = [n for n in names if n in TARGETS]
    args.suites = [s for s in SUITES if s in names] or list(SUITES)
    args.targets = [t for t in TARGETS if not targets or t in targets]
    if args.suites == ["tls"]:   # tinyproxy, mitmproxy (passthrough), proxy.py: no TLS port here
        args.targets = [t for t in args.targets if t == "direct" or t in TLS_CAPABLE]
    if args.suites == ["idle"]:
        args.targets = [t for t in args.targets if t != "direct"]
    if not args.targets:
        p.error("--only: nothing to run (tinyproxy has no TLS suite)")
    return args


def measure_direct(args, params: Params, root: Path, ports: dict, taken: set[int],
                   cert: tuple[Path, Path] | None) -> dict:
    """No proxy: the same load straight at the origins; for TLS, at nginx's TLS port and at
    the Node ceiling server (the CONNECT clients' own limit)."""
    out: dict = {}
    print("direct: no proxy")
    if "plain" in args.suites:
        out = measure("direct", None, None, ports, params, root)
        out["download_n"] = measure_parallel("direct", None, None, ports, params)
    if "tls" in args.suites and cert:
        ceiling_ports = (pick_port(27443, taken), pick_port(27543, taken))
        ceiling = start_ceiling(root, *ceiling_ports, *cert)
        try:
            for kind, suite, tport in (("h2", "tls_h2", ceiling_ports[0]),
                                       ("h1", "tls_h1", ceiling_ports[1])):
                out[suite] = measure_tls("direct", kind, ports["origin_tls"], cert[0], None,
                                         ports, params, root, throughput_port=tport)
        finally:
            ceiling.stop()
    return out


def measure_proxy(name: str, args, params: Params, root: Path, ports: dict, taken: set[int],
                  cert: tuple[Path, Path] | None, python: str, children: list[Child]) -> dict:
    """Start one proxy (raises StartFailed), run the suites on it, stop it by PID."""
    want_tls = "tls" in args.suites and name in TLS_CAPABLE and cert is not None
    child, port, tls = start_proxy(name, root, ports, taken, params, python,
                                   cert if want_tls else None)
    children.append(child)
    out: dict = {}
    try:
        if "plain" in args.suites:
            out = measure(name, port, child.pid, ports, params, root)
            out["download_n"] = measure_parallel(name, port, child.pid, ports, params)
        if tls:
            kinds = (("h2", "tls_h2"), ("h1", "tls_h1")) if name == "appliance" else (("h1", "tls_h1"),)
            for kind, suite in kinds:
                out[suite] = measure_tls(name, kind, tls.port, tls.ca, child.pid, ports,
                                         params, root)
        if not child.alive():
            out["exited"] = child.proc.returncode
            print(f"  {name}: exited during the run:\n{child.output_tail()}")
    finally:
        child.stop()
    return out


def measure_parallel(name: str, port: int | None, pid: int | None, ports: dict,
                     params: Params) -> dict:
    """CONNECT download over PARALLEL_STREAMS tunnels at once, sharing download_bytes."""
    other = OtherLoad()
    r = parallel_download(port, ports["bulk"], params.download_bytes, PARALLEL_STREAMS,
                          params.transfer_deadline, pid)
    r["other_cpu_cores"] = other.cores()
    cpu = f", {r['cpu_s_per_gb']} CPU-s/GB" if "cpu_s_per_gb" in r else ""
    print(f"  {name}: CONNECT download x{PARALLEL_STREAMS}: "
          + (f"{r['mb_per_s']} MB/s{cpu}" if r["ok"] else f"FAILED ({r.get('error')})"))
    return r


def measure_idle(name: str, args, params: Params, root: Path, ports: dict, taken: set[int],
                 python: str, children: list[Child]) -> dict:
    """For each count: a fresh proxy (limits raised), a fresh sink, N idle tunnels."""
    out: dict = {}
    for count in args.idle:
        sink_port = pick_port(30000, taken)
        sink = start_sink(root, sink_port, python)
        children.append(sink)
        try:
            child, port, _ = start_proxy(name, root, ports, taken, params, python, None,
                                         max_connections=count)
            children.append(child)
            try:
                out[str(count)] = idle_cost(child.pid, port, sink_port, count,
                                            args.idle_deadline)
                if not child.alive():
                    out[str(count)].update(ok=False, error=f"exited with code "
                                           f"{child.proc.returncode}")
            finally:
                child.stop()
        except (StartFailed, OSError) as exc:
            out[str(count)] = {"ok": False, "requested": count, "opened": 0,
                               "error": f"did not start: {str(exc).splitlines()[0]}"}
        finally:
            sink.stop()
    return out


def check_nghttpx(root: Path, ports: dict, taken: set[int], params: Params) -> dict:
    """Start squid and nghttpx -s in front of it; check one HTTP/2 proxied GET with h2load."""
    if not tool("nghttpx") or not tool("squid"):
        return {"ok": False, "error": "nghttpx or squid missing (bench/install-peers)"}
    work = Path(tempfile.mkdtemp(prefix="nghttpx-", dir=root))
    os.chmod(work, 0o755)
    squid_port, h2_port = pick_port(23228, taken), pick_port(23543, taken)
    squid_work, h2_work = work / "squid", work / "nghttpx"
    for d in (squid_work, h2_work):
        d.mkdir(mode=0o755)
    squid = start_squid(squid_work, squid_port)
    nghttpx = None
    try:
        wait_until(lambda: listening(squid_port), params.start_deadline, squid, "squid for nghttpx")
        nghttpx = start_nghttpx(h2_work, h2_port, squid_port)
        wait_until(lambda: listening(h2_port), params.start_deadline, nghttpx, "nghttpx")
        out = {"ok": True, "pid": nghttpx.pid, "port": h2_port, "backend": f"squid {squid_port}"}
        if tool("h2load"):
            argv = [tool("h2load"), "-n200", "-c1", "-m10", "-H", ":scheme: http",
                    "-H", f":authority: 127.0.0.1:{ports['origin']}",
                    f"https://127.0.0.1:{h2_port}/small"]
            done = subprocess.run(argv, capture_output=True, text=True, timeout=30)
            m = re.search(r"requests: \d+ total, \d+ started, \d+ done, (\d+) succeeded", done.stdout)
            proto = re.search(r"Application protocol: (\S+)", done.stdout)
            out["h2load_succeeded"] = int(m.group(1)) if m else 0
            out["alpn"] = proto.group(1) if proto else None
            out["ok"] = out["h2load_succeeded"] == 200 and out["alpn"] == "h2"
            if not out["ok"]:
                out["error"] = done.stdout.strip()[-400:]
        print(f"nghttpx: -s in front of squid: {'ok' if out['ok'] else 'FAILED'}"
              + (f" ({out.get('h2load_succeeded')}/200 h2 GETs through it)" if "alpn" in out else ""))
        return out
    except (StartFailed, OSError, subprocess.TimeoutExpired) as exc:
        print(f"nghttpx: FAILED: {exc}")
        return {"ok": False, "error": str(exc)}
    finally:
        if nghttpx:
            nghttpx.stop()
        squid.stop()


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    params = make_params(args)
    python = os.environ.get("PYTHON") or sys.executable
    missing = [t for t in ("wrk", "nginx") if not tool(t)]
    missing += [t for t in ("squid", "tinyproxy") if t in args.targets and not tool(t)]
    if "tls" in args.suites:
        missing += [t for t in ("h2load", "node") if not tool(t)]
    if missing:
        print(f"missing tools: {', '.join(missing)} (bench/run installs them)", file=sys.stderr)
        return 2
    for name, prog in (("mitmproxy", "mitmdump"), ("proxy.py", "proxy")):
        if name in args.targets and not peer_tool(prog):
            print(f"{name}: not installed (bench/install-peers puts it in bench/.peers-venv); "
                  f"skipped", file=sys.stderr)
            args.targets.remove(name)
    nofile = raise_nofile()   # 10,000 idle tunnels take 20,000+ descriptors in a proxy

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
    nghttpx_check = None
    try:
        origin_dir = root / "origin"
        origin_dir.mkdir(mode=0o755)
        cert = None
        if "tls" in args.suites:
            cert = make_certificate(root)
            ports["origin_tls"] = pick_port(28443, taken)
        children.append(start_origin(origin_dir, ports["origin"],
                                     (ports["origin_tls"], *cert) if cert else None))
        children.append(start_bulk(origin_dir, ports["bulk"], python))
        for name in args.targets:
            if name == "direct":
                if {"plain", "tls"} & set(args.suites):
                    results[name] = measure_direct(args, params, root, ports, taken, cert)
                continue
            if {"plain", "tls"} & set(args.suites):
                try:
                    results[name] = measure_proxy(name, args, params, root, ports, taken, cert,
                                                  python, children)
                except (StartFailed, OSError) as exc:
                    skipped[name] = str(exc)
                    print(f"{name}: SKIPPED, did not start: {exc}")
        if "idle" in args.suites:
            for name in args.targets:
                if name != "direct":
                    print(f"{name}: idle tunnels {', '.join(map(str, args.idle))}")
                    results.setdefault(name, {})["idle"] = measure_idle(
                        name, args, params, root, ports, taken, python, children)
        if "squid" in args.targets:
            nghttpx_check = check_nghttpx(root, ports, taken, params)
        else:
            nghttpx_check = None
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

    tables = []
    if "plain" in args.suites:
        tables.append(("plain", report.PLAIN))
    if "tls" in args.suites:
        tables.append(("tls", report.tls_table(params.tls_streams)))
    ratios = {}
    for suite, table in tables:
        ratios[suite] = report.compute_ratios(results, table)
        report.print_table(results, table, ratios[suite], skipped)
    if "idle" in args.suites:
        ratios["idle"] = report.print_idle(results, args.idle, args.targets, nofile)
    report.print_footer(results, skipped)
    summary = {
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
        "elapsed_s": round(time.time() - started, 1),
        "params": asdict(params),
        "suites": args.suites,
        "machine": {"nproc": os.cpu_count(), "kernel": platform.release(),
                    "cpu": cpu_model(), "loadavg_1m_before": round(load_before, 2),
                    "nofile": nofile, "tools": tool_versions(python)},
        "idle_counts": args.idle if "idle" in args.suites else [],
        "nghttpx_check": nghttpx_check,
        "results": results,
        "skipped": skipped,
        "ratios": ratios,
    }
    report.save_results(summary, args.json)
    return 0


if __name__ == "__main__":
    report.run_main(main, "bench")
