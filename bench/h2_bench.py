#!/usr/bin/env python3
"""HTTP/2 and WebSocket measures of the appliance (issue "Performance"), against nghttpx -s.

Four measures, each with interleaved runs (A B A B ...), medians, and ratios with a target:

1. **h2 CONNECT fairness**: 16 CONNECT streams on ONE HTTP/2 connection to the proxy's TLS
   port, each downloading from the bulk origin without end; bytes per stream are counted over
   a window after a warm-up. Aggregate MB/s, and each stream against the fair share
   (aggregate ÷ 16). The appliance's `https` listener vs `nghttpx -s` (HTTP/2 proxy) in front
   of squid. Targets: aggregate ≥ 1.0× nghttpx, no stream below 0.5 of its fair share.
2. **RFC 8441 WebSocket echo**: round trips/s of one small message at a time through the
   appliance's extended CONNECT (`:protocol websocket`, an HTTP/1.1 Upgrade toward the echo
   origin) vs the same echo through a plain h2 CONNECT stream carrying the WebSocket (the
   client does the Upgrade inside the tunnel). Target ≥ 0.8×.
3. **WebSocket over an HTTP/1.1 CONNECT tunnel** of the appliance's `http` listener vs the
   same client straight at the origin. Target ≥ 0.9× direct.
4. **h2 plain requests/s**: h2load on the proxy's TLS port with `:scheme http` and the origin
   (nginx, 100 bytes) in `:authority` (a browser's request to an HTTPS proxy): the appliance
   vs nghttpx -s → squid. Target ≥ 1.0× (no target in the issue; reported the same way).

Clients: `h2_client.js` (Node's http2 / net; also the raw RFC 6455 echo origin) and h2load.
When the appliance misses a target, `py-spy record` samples it for ~10 s while that measure
runs once more, and the top functions (self and inclusive) are printed and kept in the JSON.

Loopback only; every process is started on a free port, stopped by its PID in `finally`, and
every client run is bounded. Run as `.venv/bin/python bench/h2_bench.py [--quick]`.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))

from report import run_main, save_results  # noqa: E402
from children import (HOST, Child, OtherLoad, StartFailed, cpu_model, first_line,  # noqa: E402
                      pick_port, tool, tree_cpu_seconds, wait_until)
from load import Params, http_get, listening  # noqa: E402
from origins import SMALL_SIZE, start_bulk, start_origin  # noqa: E402
import peers  # noqa: E402
from peers import start_appliance, start_squid  # noqa: E402
from tls_load import make_certificate, run_h2load  # noqa: E402

CLIENT_JS = BENCH_DIR / "h2_client.js"
MEASURES = ("fair", "ws_h2", "ws_h1", "requests")
TARGETS = {"fair": 1.0, "fair_min_share": 0.5, "ws_h2": 0.8, "ws_h1": 0.9, "requests": 1.0}


# --- processes ------------------------------------------------------------------------------

def start_nghttpx_proxy(work: Path, port: int, backend_port: int, cert: Path, key: Path) -> Child:
    """Fallback when bench/peers.py has no start_nghttpx: nghttpx -s (HTTP/2 forward proxy over TLS) in front of squid's http_port.

    One worker like the appliance; the frontend windows the appliance grants (256 KiB per stream,
    4 MiB per connection) instead of nghttpx's 64 KiB; up to 256 connections to squid (the
    default, 8 per backend host, would leave 8 of 16 CONNECT streams waiting); `--conf /dev/null`
    so that no system config is read; access log to a file as every proxy here writes one.
    """
    argv = [tool("nghttpx") or "nghttpx", "--conf=/dev/null", "-s",
            f"--frontend={HOST},{port}", f"--backend={HOST},{backend_port}",
            "--workers=1", "--no-ocsp", "--backend-connections-per-host=256",
            "--frontend-http2-window-size=262144",
            "--frontend-http2-connection-window-size=4194304",
            f"--accesslog-file={work}/nghttpx-access.log",
            f"--errorlog-file={work}/nghttpx-error.log",
            str(key), str(cert)]
    child = Child("nghttpx", argv, work)
    wait_until(lambda: listening(port), 10.0, child, "nghttpx")
    return child


def start_ws_echo(work: Path, port: int) -> Child:
    child = Child("ws-echo", [tool("node") or "node", str(CLIENT_JS),
                              json.dumps({"mode": "ws-echo", "port": port})], work)
    wait_until(lambda: listening(port), 10.0, child, "ws echo origin")
    return child


class Setup:
    """Every process of the run and the ports they listen on."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.children: list[Child] = []

    def start(self, python: str, deadline: float) -> None:
        taken: set[int] = set()
        self.ports = {name: pick_port(base, taken) for name, base in (
            ("origin", 38080), ("bulk", 39000), ("ws", 39100), ("app_http", 34128),
            ("app_https", 34443), ("app_admin", 39090), ("squid", 33128), ("nghttpx", 33443))}
        origin_dir = self.root / "origin"
        origin_dir.mkdir(mode=0o755)
        self.cert, self.key = make_certificate(self.root)
        self._add(start_origin(origin_dir, self.ports["origin"]))
        self._add(start_bulk(origin_dir, self.ports["bulk"], python))
        self.ws_echo = self._add(start_ws_echo(origin_dir, self.ports["ws"]))
        print(f"origin: ws echo pid {self.ws_echo.pid} on {HOST}:{self.ports['ws']}")

        app_dir = self._dir("appliance")
        self.app = self._add(start_appliance(app_dir, self.ports["app_http"],
                                             self.ports["app_admin"], python,
                                             self.ports["app_https"]))
        admin = self.ports["app_admin"]
        wait_until(lambda: http_get(admin, "/healthz", f"{HOST}:{admin}")[0] == 200,
                   deadline, self.app, "appliance /healthz")
        self.app_ca = app_dir / "var" / "ca" / "ca.pem"
        wait_until(lambda: self.app_ca.exists() and listening(self.ports["app_https"]),
                   deadline, self.app, "appliance https")
        self._proxied_ok(self.ports["app_http"], self.app)
        print(f"appliance: pid {self.app.pid}, http {self.ports['app_http']}, "
              f"https {self.ports['app_https']} (h2), work dir {app_dir}")

        squid_dir = self._dir("squid")
        self.squid = self._add(start_squid(squid_dir, self.ports["squid"]))
        wait_until(lambda: listening(self.ports["squid"]), deadline, self.squid, "squid")
        self._proxied_ok(self.ports["squid"], self.squid)
        self.nghttpx_ca = self.cert
        if hasattr(peers, "start_nghttpx"):   # the shared starter, same options as ours
            self.nghttpx = self._add(peers.start_nghttpx(squid_dir, self.ports["nghttpx"],
                                                         self.ports["squid"]))
            self.nghttpx_ca = self.nghttpx.ca
            wait_until(lambda: listening(self.ports["nghttpx"]), 10.0, self.nghttpx, "nghttpx")
        else:
            self.nghttpx = self._add(start_nghttpx_proxy(squid_dir, self.ports["nghttpx"],
                                                         self.ports["squid"], self.cert, self.key))
        print(f"nghttpx -s: pid {self.nghttpx.pid} on {self.ports['nghttpx']} → squid pid "
              f"{self.squid.pid} on {self.ports['squid']}")

    def ensure_ws_echo(self) -> None:
        """Restart the echo origin if it died (its output tail is printed), so one failure
        does not void every later WebSocket run."""
        if self.ws_echo.alive():
            return
        print(f"    ws echo origin exited ({self.ws_echo.proc.returncode}); restarting:\n"
              f"{self.ws_echo.output_tail(5)}")
        self.ws_echo.stop()   # waits for the process to exit, so the port is free again
        self.ws_echo = self._add(start_ws_echo(self.ws_echo.log_path.parent, self.ports["ws"]))

    def _add(self, child: Child) -> Child:
        self.children.append(child)
        return child

    def _dir(self, name: str) -> Path:
        d = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=self.root))
        os.chmod(d, 0o755)
        return d

    def _proxied_ok(self, port: int, child: Child) -> None:
        origin = f"{HOST}:{self.ports['origin']}"
        wait_until(lambda: http_get(port, f"http://{origin}/small", origin) == (200, b"o" * SMALL_SIZE),
                   20.0, child, f"{child.name} GET through proxy")

    def proxy(self, name: str) -> tuple[int, Path, list[int]]:
        """(TLS port, CA file, PIDs whose CPU counts) of the h2 proxy `name`."""
        if name == "appliance":
            return self.ports["app_https"], self.app_ca, [self.app.pid]
        return self.ports["nghttpx"], self.nghttpx_ca, [self.nghttpx.pid, self.squid.pid]

    def stop(self) -> None:
        for child in reversed(self.children):
            child.stop()


def cpu_of(pids: list[int]) -> float:
    return sum(tree_cpu_seconds(p) for p in pids)


# --- one run of each measure ----------------------------------------------------------------

def run_node(opts: dict, pids: list[int], deadline: float) -> dict:
    cpu0 = cpu_of(pids)
    other = OtherLoad()
    try:
        done = subprocess.run([tool("node") or "node", str(CLIENT_JS), json.dumps(opts)],
                              capture_output=True, text=True, timeout=deadline)
    except subprocess.TimeoutExpired:
        return {"ok": False, "error": f"client did not end in {deadline:.0f}s"}
    cpu = cpu_of(pids) - cpu0
    try:
        r = json.loads(done.stdout.strip().splitlines()[-1])
    except (IndexError, ValueError):
        return {"ok": False, "error": f"client exited {done.returncode}: "
                                      f"{(done.stderr or done.stdout).strip()[-400:]}"}
    r["ok"] = bool(r.get("ok")) and not r.get("error")
    r["proxy_cpu_s"] = round(cpu, 3)
    r["other_cpu_cores"] = other.cores()
    return r


def fair_run(setup: Setup, name: str, a: argparse.Namespace) -> dict:
    port, ca, pids = setup.proxy(name)
    r = run_node({"mode": "fair", "proxy": f"https://{HOST}:{port}", "ca": str(ca),
                  "target": f"{HOST}:{setup.ports['bulk']}", "streams": a.streams,
                  "warmup": a.warmup, "seconds": a.seconds, "timeout": a.seconds + a.warmup + 20},
                 pids, a.seconds + a.warmup + 30)
    if r["ok"]:
        per = r.pop("per_stream_bytes")
        fair_share = r["bytes"] / len(per)
        r["mb_per_s"] = round(r["bytes"] / r["seconds"] / 1e6, 1)
        r["per_stream_mb_per_s"] = [round(b / r["seconds"] / 1e6, 1) for b in per]
        r["min_share"] = round(min(per) / fair_share, 3) if fair_share else 0.0
        r["max_share"] = round(max(per) / fair_share, 3) if fair_share else 0.0
        r["client_cpu_busy"] = round(r["client_cpu_s"] / r["seconds"], 3)
        r["proxy_cpu_busy"] = round(r["proxy_cpu_s"] / (r["seconds"] + a.warmup), 3)
    return r


def ws_run(setup: Setup, via: str, streams: int, a: argparse.Namespace) -> dict:
    try:
        setup.ensure_ws_echo()
    except StartFailed as exc:
        return {"ok": False, "error": f"ws echo origin: {exc}"}
    port, ca, pids = setup.proxy("appliance")
    opts = {"mode": "ws", "via": via, "streams": streams, "size": a.ws_size,
            "origin": f"{HOST}:{setup.ports['ws']}", "warmup": a.warmup, "seconds": a.seconds,
            "timeout": a.seconds + a.warmup + 20}
    if via.startswith("h2"):
        opts.update(proxy=f"https://{HOST}:{port}", ca=str(ca))
    elif via == "h1-connect":
        opts["proxy_port"] = setup.ports["app_http"]
    r = run_node(opts, pids if via != "direct" else [], a.seconds + a.warmup + 30)
    if r["ok"]:
        r["round_trips_per_s"] = round(r["round_trips_per_s"], 1)
        r["client_cpu_busy"] = round(r["client_cpu_s"] / r["seconds"], 3)
    return r


def requests_run(setup: Setup, name: str, a: argparse.Namespace) -> dict:
    port, _ca, pids = setup.proxy(name)
    params = Params(quick=a.quick, wrk_threads=1, wrk_connections=1, wrk_seconds=a.seconds,
                    warmup_seconds=0, download_bytes=0, upload_bytes=0, transfer_repeats=1,
                    transfer_deadline=0, start_deadline=0, h2load_clients=a.h2_clients,
                    h2load_streams=a.h2_streams)
    other = OtherLoad()
    try:
        run_h2load(port, f"{HOST}:{setup.ports['origin']}", params, max(1, round(a.warmup)), None)
        cpu0 = cpu_of(pids)
        r = run_h2load(port, f"{HOST}:{setup.ports['origin']}", params, max(1, round(a.seconds)), None)
        r["proxy_cpu_s"] = round(cpu_of(pids) - cpu0, 3)
        if r["requests"]:
            r["cpu_us_per_request"] = round(r["proxy_cpu_s"] / r["requests"] * 1e6, 1)
        if r["ok"] and r["non_2xx"] > 0.01 * r["requests"]:   # a fast error page is no answer
            r.update(ok=False, error=f"{r['non_2xx']} of {r['requests']} answers not 2xx")
    except (RuntimeError, subprocess.TimeoutExpired) as exc:
        r = {"ok": False, "error": str(exc)}
    r["other_cpu_cores"] = other.cores()
    return r


# --- the measures: interleaved runs, medians, ratios ----------------------------------------

def median_of(samples: list[dict], key: str) -> float | None:
    values = [s[key] for s in samples if s.get("ok") and key in s]
    return round(statistics.median(values), 3) if values else None


def interleave(runs: int, sides: dict) -> dict:
    """sides: label → zero-argument run function; A B A B ... for `runs` rounds."""
    samples: dict[str, list[dict]] = {label: [] for label in sides}
    for i in range(runs):
        for label, fn in sides.items():
            r = fn()
            samples[label].append(r)
            show = (r.get("mb_per_s") or r.get("round_trips_per_s") or r.get("requests_per_s"))
            print(f"    round {i + 1} {label}: " + (f"{show}" if r.get("ok") else f"FAILED {r.get('error')}"),
                  flush=True)
    return samples


def measure_fair(setup: Setup, a) -> dict:
    print(f"1. h2 CONNECT x{a.streams} on one connection: appliance vs nghttpx -s → squid")
    s = interleave(a.runs, {"appliance": lambda: fair_run(setup, "appliance", a),
                            "nghttpx": lambda: fair_run(setup, "nghttpx", a)})
    out = {"samples": s}
    for label in s:
        out[label] = {k: median_of(s[label], k) for k in
                      ("mb_per_s", "min_share", "max_share", "proxy_cpu_busy", "client_cpu_busy")}
        # the worst stream over all runs, as a share of its run's fair share
        shares = [x["min_share"] for x in s[label] if x.get("ok")]
        out[label]["worst_min_share"] = min(shares) if shares else None
        ok = [x for x in s[label] if x.get("ok")]
        if ok:
            out[label]["per_stream_mb_per_s_median_run"] = sorted(
                ok, key=lambda x: x["mb_per_s"])[len(ok) // 2]["per_stream_mb_per_s"]
    out["ratio"] = ratio(out["appliance"]["mb_per_s"], out["nghttpx"]["mb_per_s"])
    mins = out["appliance"]["worst_min_share"]
    out["met"] = (out["ratio"] is not None and out["ratio"] >= TARGETS["fair"]
                  and mins is not None and mins >= TARGETS["fair_min_share"])
    return out


def measure_ws(setup: Setup, a, kind: str) -> dict:
    if kind == "ws_h2":
        a_label, b_label, vias = "RFC 8441", "h2 CONNECT", ("h2-8441", "h2-connect")
        print("2. WebSocket echo over h2: extended CONNECT (RFC 8441) vs a plain CONNECT stream")
    else:
        a_label, b_label, vias = "h1 CONNECT", "direct", ("h1-connect", "direct")
        print("3. WebSocket echo: the appliance's HTTP/1.1 CONNECT tunnel vs direct")
    out: dict = {"labels": [a_label, b_label], "by_streams": {}}
    for streams in a.ws_streams:
        print(f"  {streams} echo loop(s) at once, {a.ws_size}-byte messages")
        s = interleave(a.runs, {a_label: lambda st=streams: ws_run(setup, vias[0], st, a),
                                b_label: lambda st=streams: ws_run(setup, vias[1], st, a)})
        row = {"samples": s}
        for label in s:
            row[label] = {k: median_of(s[label], k) for k in
                          ("round_trips_per_s", "proxy_cpu_s", "client_cpu_busy")}
        row["ratio"] = ratio(row[a_label]["round_trips_per_s"], row[b_label]["round_trips_per_s"])
        out["by_streams"][str(streams)] = row
    ratios = [r["ratio"] for r in out["by_streams"].values()]
    out["met"] = all(x is not None and x >= TARGETS[kind] for x in ratios)
    return out


def measure_requests(setup: Setup, a) -> dict:
    print(f"4. h2 plain requests/s (h2load -c{a.h2_clients} -m{a.h2_streams}): appliance vs "
          f"nghttpx -s → squid")
    s = interleave(a.runs, {"appliance": lambda: requests_run(setup, "appliance", a),
                            "nghttpx": lambda: requests_run(setup, "nghttpx", a)})
    out = {"samples": s}
    for label in s:
        out[label] = {k: median_of(s[label], k) for k in
                      ("requests_per_s", "latency_mean_ms", "cpu_us_per_request")}
    out["ratio"] = ratio(out["appliance"]["requests_per_s"], out["nghttpx"]["requests_per_s"])
    out["met"] = out["ratio"] is not None and out["ratio"] >= TARGETS["requests"]
    return out


def other_load(res: dict) -> dict:
    """Per measure, the most CPU other processes used during one of its runs (in cores)."""
    def walk(node):
        if isinstance(node, dict):
            if "other_cpu_cores" in node:
                yield node["other_cpu_cores"]
            for v in node.values():
                yield from walk(v)
        elif isinstance(node, list):
            for v in node:
                yield from walk(v)
    out = {}
    for name, r in res.items():
        values = list(walk(r))
        if values:
            out[name] = max(values)
    return out


def ratio(x, y) -> float | None:
    return round(x / y, 3) if x and y else None


# --- py-spy on a missed target --------------------------------------------------------------

def summarize_collapsed(path: Path, top: int = 15) -> dict:
    """Top functions of py-spy's raw (collapsed) output: self samples and inclusive samples."""
    own: Counter = Counter()
    inclusive: Counter = Counter()
    by_package: Counter = Counter()   # self samples per top-level package (h2, gevent, appliance…)
    total = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        total += n
        frames = [f.split(":")[0] + (")" if "(" in f else "") for f in stack.split(";")]
        frames = [f.replace("))", ")") for f in frames]
        own[frames[-1]] += n
        leaf_file = frames[-1].rpartition("(")[2].rstrip(")")
        by_package[leaf_file.split("/")[0] if "/" in leaf_file else leaf_file] += n
        for f in set(frames):
            inclusive[f] += n
    def rows(c: Counter):
        return [[f, n, round(100 * n / total, 1)] for f, n in c.most_common(top)] if total else []
    return {"samples": total, "self": rows(own), "inclusive": rows(inclusive),
            "self_by_package": rows(by_package)}


def profile(setup: Setup, a, what: str, run) -> dict:
    """py-spy record on the appliance for ~10 s while `run()` drives it once more."""
    spy = tool("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(spy).exists() and not shutil.which(spy):
        return {"error": "py-spy not found (.venv/bin/pip install py-spy)"}
    out = setup.root / f"pyspy-{what}.txt"
    spy_log = open(setup.root / f"pyspy-{what}.log", "wb")
    proc = subprocess.Popen([spy, "record", "-p", str(setup.app.pid), "-d", str(a.profile_seconds),
                             "-r", "100", "--format", "raw", "-o", str(out), "--nonblocking"],
                            stdout=spy_log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        result = run()
        proc.wait(timeout=a.profile_seconds + 30)
    except subprocess.TimeoutExpired:
        os.kill(proc.pid, signal.SIGTERM)
        proc.wait(timeout=10)
        result = {"ok": False, "error": "py-spy did not end"}
    finally:
        spy_log.close()
    if not out.exists():
        return {"error": "py-spy wrote nothing: "
                + (setup.root / f"pyspy-{what}.log").read_text(errors="replace")[-400:]}
    summary = summarize_collapsed(out)
    summary["run_during_profile"] = {k: v for k, v in result.items()
                                     if not isinstance(v, (list, dict))}
    keep = BENCH_DIR / "results" / f"h2-pyspy-{what}-{time.strftime('%Y%m%d-%H%M%S')}.txt"
    shutil.copy(out, keep)
    summary["collapsed_file"] = str(keep.relative_to(BENCH_DIR.parent))
    return summary


# --- report ---------------------------------------------------------------------------------

def fmt(x, suffix="") -> str:
    return "-" if x is None else f"{x:g}{suffix}"


def tables(res: dict, a) -> str:
    lines = ["| measure | appliance | peer | ratio | target | met |",
             "| --- | ---: | ---: | ---: | ---: | :---: |"]
    if "fair" in res:
        f = res["fair"]
        lines.append(f"| 1. h2 CONNECT x{a.streams}, one connection: aggregate MB/s (peer: nghttpx -s → squid) "
                     f"| {fmt(f['appliance']['mb_per_s'])} | {fmt(f['nghttpx']['mb_per_s'])} "
                     f"| {fmt(f['ratio'], 'x')} | ≥ 1.0x | {'yes' if f['ratio'] and f['ratio'] >= 1 else 'NO'} |")
        lines.append(f"| 1. slowest stream ÷ fair share (worst run; median run) "
                     f"| {fmt(f['appliance']['worst_min_share'])}; {fmt(f['appliance']['min_share'])} "
                     f"| {fmt(f['nghttpx']['worst_min_share'])}; {fmt(f['nghttpx']['min_share'])} | - | ≥ 0.5 "
                     f"| {'yes' if (f['appliance']['worst_min_share'] or 0) >= 0.5 else 'NO'} |")
        lines.append(f"| 1. per-stream MB/s, median (fair share = aggregate ÷ {a.streams}) "
                     f"| {fmt(_med(f['appliance'].get('per_stream_mb_per_s_median_run')))} "
                     f"| {fmt(_med(f['nghttpx'].get('per_stream_mb_per_s_median_run')))} | - | - | - |")
        lines.append(f"| 1. proxy CPU, share of a core | {fmt(f['appliance']['proxy_cpu_busy'])} "
                     f"| {fmt(f['nghttpx']['proxy_cpu_busy'])} | - | - | - |")
    for kind, title, target in (("ws_h2", "2. WS echo round trips/s: RFC 8441 (peer: plain h2 CONNECT + Upgrade)", 0.8),
                                ("ws_h1", "3. WS echo round trips/s: h1 CONNECT tunnel (peer: direct)", 0.9)):
        if kind not in res:
            continue
        w = res[kind]
        la, lb = w["labels"]
        for streams, row in w["by_streams"].items():
            ok = row["ratio"] is not None and row["ratio"] >= target
            lines.append(f"| {title}, {streams} loop(s) | {fmt(row[la]['round_trips_per_s'])} "
                         f"| {fmt(row[lb]['round_trips_per_s'])} | {fmt(row['ratio'], 'x')} "
                         f"| ≥ {target}x | {'yes' if ok else 'NO'} |")
    if "requests" in res:
        q = res["requests"]
        lines.append(f"| 4. h2 plain GET req/s, 100 B (peer: nghttpx -s → squid) "
                     f"| {fmt(q['appliance']['requests_per_s'])} | {fmt(q['nghttpx']['requests_per_s'])} "
                     f"| {fmt(q['ratio'], 'x')} | ≥ 1.0x | {'yes' if q['met'] else 'NO'} |")
        lines.append(f"| 4. proxy CPU-us/request (lower is better) | {fmt(q['appliance']['cpu_us_per_request'])} "
                     f"| {fmt(q['nghttpx']['cpu_us_per_request'])} "
                     f"| {fmt(ratio(q['appliance']['cpu_us_per_request'], q['nghttpx']['cpu_us_per_request']), 'x')} | - | - |")
    return "\n".join(lines)


def _med(values):
    return round(statistics.median(values), 1) if values else None


def profile_tables(profiles: dict) -> str:
    out = []
    for what, p in profiles.items():
        if "error" in p:
            out.append(f"py-spy during {what}: {p['error']}")
            continue
        out.append(f"\npy-spy during {what} ({p['samples']} samples; {p.get('collapsed_file')}):\n")
        out.append("| self % | function | | inclusive % | function |")
        out.append("| ---: | --- | --- | ---: | --- |")
        for s, i in zip(p["self"], p["inclusive"]):
            out.append(f"| {s[2]} | `{s[0]}` | | {i[2]} | `{i[0]}` |")
        out.append("\nself time by package: " + ", ".join(
            f"{name} {pct}%" for name, _n, pct in p["self_by_package"][:8]))
    return "\n".join(out)


# --- main -----------------------------------------------------------------------------------

def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="smoke run: 3 rounds of 2 s")
    p.add_argument("--runs", type=int, help="interleaved rounds per measure (default 5, quick 3)")
    p.add_argument("--seconds", type=float, help="measured seconds per run (default 5, quick 2)")
    p.add_argument("--warmup", type=float, help="unmeasured seconds first (default 1, quick 0.5)")
    p.add_argument("--streams", type=int, default=16, help="measure 1: CONNECT streams (16)")
    p.add_argument("--ws-streams", default="1,16", help="measures 2, 3: concurrent echo loops")
    p.add_argument("--ws-size", type=int, default=128, help="WebSocket message bytes (128)")
    p.add_argument("--h2-clients", type=int, default=1, help="measure 4: h2load connections (1)")
    p.add_argument("--h2-streams", type=int, default=50, help="measure 4: streams each (50)")
    p.add_argument("--only", default=",".join(MEASURES), help=f"comma list of {', '.join(MEASURES)}")
    p.add_argument("--no-profile", action="store_true", help="no py-spy on a missed target")
    p.add_argument("--profile-seconds", type=int, default=10)
    p.add_argument("--json", type=Path)
    p.add_argument("--keep-tmp", action="store_true")
    a = p.parse_args(argv)
    a.runs = a.runs or (3 if a.quick else 5)
    a.seconds = a.seconds or (2.0 if a.quick else 5.0)
    a.warmup = a.warmup if a.warmup is not None else (0.5 if a.quick else 1.0)
    a.ws_streams = [int(x) for x in a.ws_streams.split(",") if x]
    a.only = [m for m in a.only.split(",") if m]
    bad = [m for m in a.only if m not in MEASURES]
    if bad:
        p.error(f"--only: unknown {bad}")
    return a


def main(argv: list[str]) -> int:
    a = parse_args(argv)
    python = os.environ.get("PYTHON") or sys.executable
    missing = [t for t in ("node", "nginx", "squid", "nghttpx", "h2load") if not tool(t)]
    if missing:
        print(f"missing tools: {', '.join(missing)} (apt-get install -y nodejs nginx-light squid "
              f"nghttp2-proxy nghttp2-client)", file=sys.stderr)
        return 2

    def _interrupt(signum, _frame):
        raise KeyboardInterrupt(f"signal {signum}")
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGHUP, _interrupt)

    started = time.time()
    load_before = os.getloadavg()[0]
    root = Path(tempfile.mkdtemp(prefix="h2-bench-"))
    os.chmod(root, 0o755)
    setup = None
    res: dict = {}
    profiles: dict = {}
    try:
        setup = Setup(root)
        setup.start(python, 20.0)
        if "fair" in a.only:
            res["fair"] = measure_fair(setup, a)
        if "ws_h2" in a.only:
            res["ws_h2"] = measure_ws(setup, a, "ws_h2")
        if "ws_h1" in a.only:
            res["ws_h1"] = measure_ws(setup, a, "ws_h1")
        if "requests" in a.only:
            res["requests"] = measure_requests(setup, a)
        if not a.no_profile:
            long = argparse.Namespace(**{**vars(a), "seconds": a.profile_seconds + 1, "warmup": 0.5})
            runs = {"fair": lambda: fair_run(setup, "appliance", long),
                    "ws_h2": lambda: ws_run(setup, "h2-8441", max(a.ws_streams), long),
                    "ws_h1": lambda: ws_run(setup, "h1-connect", max(a.ws_streams), long),
                    "requests": lambda: requests_run(setup, "appliance", long)}
            for what, r in res.items():
                if not r.get("met"):
                    print(f"profiling the appliance during {what} (missed its target)")
                    profiles[what] = profile(setup, a, what, runs[what])
        if not setup.app.alive():
            res["appliance_exited"] = setup.app.proc.returncode
    except StartFailed as exc:
        print(f"h2 bench: a process did not start: {exc}", file=sys.stderr)
        return 1
    finally:
        if setup:
            setup.stop()
        if a.keep_tmp:
            print(f"work dir kept: {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)

    machine = (f"{os.cpu_count()} cores, {cpu_model()}, Linux {platform.release()}, "
               f"load {load_before:.2f} before")
    versions = {"node": first_line([tool("node") or "node", "--version"]),
                "nghttpx": first_line([tool("nghttpx") or "nghttpx", "--version"]),
                "squid": first_line([tool("squid") or "squid", "-v"]),
                "h2load": first_line([tool("h2load") or "h2load", "--version"]),
                "python": first_line([python, "-VV"])}
    print(f"\nmachine: {machine}")
    print(f"runs: {a.runs} interleaved rounds per measure, {a.seconds:g} s each after "
          f"{a.warmup:g} s warm-up; medians; ratio = appliance ÷ peer\n")
    text = tables(res, a)
    print(text)
    busy = other_load(res)
    if busy:
        print(f"\nCPU used outside this bench while it measured (cores, max of the runs): {busy}; "
              f"above 0.25 another job shared the 2 cores and the absolute numbers are low")
    if profiles:
        print(profile_tables(profiles))
    summary = {"started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
               "elapsed_s": round(time.time() - started, 1), "machine": machine,
               "versions": versions, "args": {k: (str(v) if isinstance(v, Path) else v)
                                              for k, v in vars(a).items()},
               "targets": TARGETS, "other_cpu_cores_max": busy, "results": res, "profiles": profiles, "table": text}
    save_results(summary, a.json, "h2")
    return 0


if __name__ == "__main__":
    run_main(main, "h2 bench")
