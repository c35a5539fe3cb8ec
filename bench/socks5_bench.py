#!/usr/bin/env python3
"""Benchmark SOCKS5 CONNECT throughput: the appliance against microsocks and dante, and direct.

Sits outside the data path, run by hand as root (never by the test suite):

    .venv/bin/python bench/socks5_bench.py                  # about two minutes on 2 cores
    .venv/bin/python bench/socks5_bench.py --runs 3 --size-mib 512 --streams 1,4,16
    .venv/bin/python bench/socks5_bench.py --only direct,appliance

Everything binds to and connects to 127.0.0.1 only:

- **origin**: this file again (`socks5_bench.py --serve-origin PORT`), a process of its own, a
  thread per connection: reads one HTTP/1.1 request head, answers `GET /bytes/N` with a 200 and N
  bytes sent with `os.sendfile` from one 4 MiB memfd (no copy through Python, no disk), then
  half-closes. It costs little CPU, so that the proxy is what sets the pace.
- **clients**: curl (`-o /dev/null -w '%{speed_download} ...'`), with `--socks5 127.0.0.1:PORT`
  (address type IPv4, curl 7.88 keeps a numeric host as an address under `--socks5-hostname`
  too) or with no proxy for "direct". N streams are N curl processes started together, each
  fetching total/N bytes.
- **peers**, all running for the whole bench (idle while another is measured):
  the appliance (`python -m appliance run --config tmp/appliance.toml`: `socks5` and `admin`
  listeners, a JSON access log to a file, one allow rule for 127.0.0.0/8, `workers = 1`),
  microsocks (Debian's `microsocks -i 127.0.0.1 -p PORT`, a thread per client) and dante
  (Debian's `danted -f tmp/danted.conf -p tmp/danted.pid`, in the foreground: internal and
  external 127.0.0.1, `socksmethod: none`, `client pass` / `socks pass` from 127.0.0.0/8 with
  `log: connect disconnect error` to a temp file, `user.privileged: root`,
  `user.unprivileged: nobody`). Each gets a free port near 31080; a service installed by the
  Debian package is never touched.

Runs interleave: per round, for each stream count, direct, appliance, microsocks, dante; `--runs`
rounds (default 5) after one uncounted 256 MiB warm-up per target. Reported per target and stream
count: MB/s medians (MB = 10^6 bytes; 1 stream: curl's own speed_download; N streams: all bytes /
wall time from the first curl's start to the last one's exit), the proxy's CPU seconds per GB
(utime+stime+cutime+cstime of its process tree from /proc/PID/stat around each run, summed over
the runs, / GB moved), its CPU in % of a core, the curl and origin CPU, and the ratios appliance ÷
direct, appliance ÷ microsocks, appliance ÷ dante. Every appliance run is checked against its
access log (one `socks5` record per stream with all bytes down), every dante run against its log
(one session-end line per stream with all bytes to the client), every microsocks run against its
output (one "connected to" line per stream), every run against curl's byte count and HTTP status.

Each process is started in a session of its own (bench/children.py) and stopped by its PID (then
its own process group) in a `finally`, also on Ctrl-C or SIGTERM; every wait has a deadline; the
temporary directory is removed at the end unless `--keep-tmp`. Prints markdown tables and writes
bench/results/socks5-YYYYMMDD-HHMMSS.json.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
if str(BENCH_DIR) not in sys.path:
    sys.path.insert(0, str(BENCH_DIR))

from report import run_main, save_results  # noqa: E402
from children import (HOST, MiB, Child, OtherLoad, StartFailed, cpu_model, first_line,  # noqa: E402
                      pick_port, tool, tree_cpu_seconds, wait_until)

PROXIES = ("appliance", "microsocks", "dante")
TARGETS = ("direct",) + PROXIES
BODY_CHUNK = 4 * MiB          # the origin's memfd; sendfile cycles through it
WARMUP_BYTES = 256 * MiB
START_DEADLINE = 20.0
INSTALL_HINT = "apt-get install -y microsocks dante-server"


# -- the origin (runs in its own process) --------------------------------------------------------

def serve_origin(port: int) -> None:
    """HTTP/1.1 origin: `GET /bytes/N` → 200 and N bytes by sendfile from a 4 MiB memfd."""
    body = os.memfd_create("socks5-bench-body")
    pattern = bytes(range(256)) * (MiB // 256)
    for _ in range(BODY_CHUNK // MiB):
        os.write(body, pattern)
    timeout = struct.pack("ll", 60, 0)     # every blocking send/recv gives up after 60 s

    def handle(conn: socket.socket) -> None:
        try:
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, timeout)
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, timeout)
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            head = b""
            while b"\r\n\r\n" not in head:
                data = conn.recv(4096)
                if not data or len(head) > 16384:
                    return
                head += data
            path = head.split(b"\r\n", 1)[0].split(b" ")[1]
            n = int(path[len(b"/bytes/"):]) if path.startswith(b"/bytes/") else 0
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n"
                         b"Content-Length: %d\r\nConnection: close\r\n\r\n" % n)
            sent = 0
            while sent < n:
                offset = sent % BODY_CHUNK
                k = os.sendfile(conn.fileno(), body, offset, min(BODY_CHUNK - offset, n - sent))
                if k <= 0:
                    return
                sent += k
            conn.shutdown(socket.SHUT_WR)
            while conn.recv(65536):            # until the client closes
                pass
        except (OSError, ValueError, IndexError):
            pass
        finally:
            conn.close()

    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((HOST, port))
    listener.listen(128)
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    while True:
        conn, _ = listener.accept()
        threading.Thread(target=handle, args=(conn,), daemon=True).start()


# -- machine and tools ---------------------------------------------------------------------------

def machine(python: str) -> dict:
    return {
        "nproc": os.cpu_count(),
        "cpu_model": cpu_model(),
        "kernel": platform.release(),
        "python": first_line([python, "--version"]),
        "curl": first_line(["curl", "--version"]),
        "microsocks": first_line(["dpkg-query", "-W", "-f", "${Version}", "microsocks"]),
        "dante": first_line([tool("danted") or "danted", "-v"]),
        "dante_package": first_line(["dpkg-query", "-W", "-f", "${Version}", "dante-server"]),
        "loadavg_1m_before": round(os.getloadavg()[0], 2),
    }


# -- the peers -----------------------------------------------------------------------------------

class Target:
    """One column: how curl reaches the origin, the process to charge CPU to, a run's check."""

    def __init__(self, name: str, port: int | None = None, child: Child | None = None,
                 log_path: Path | None = None) -> None:
        self.name = name
        self.port = port
        self.child = child
        self.log_path = log_path

    def cpu(self) -> float:
        return tree_cpu_seconds(self.child.pid) if self.child else 0.0

    def log_lines(self) -> list[str]:
        if self.log_path is None or not self.log_path.exists():
            return []
        return self.log_path.read_text(errors="replace").splitlines()

    def check(self, before: int, streams: int, per_stream: int) -> str:
        """Wait (bounded) for the proxy's own record of the run; say what was found."""
        if self.log_path is None:
            return ""
        found: list = []
        for _ in range(60):
            new = self.log_lines()[before:]
            if self.name == "appliance":
                found = [r for r in map(_json_or_none, new) if r and r.get("listener") == "socks5"
                         and r.get("status") == 200 and r.get("bytes_down", 0) >= per_stream]
            elif self.name == "dante":
                # The session's end: "pass(1): tcp/connect ]: <bytes to client> -> client ..."
                found = [line for line in new if "tcp/connect ]: " in line
                         and _int(line.split("tcp/connect ]: ", 1)[1].split(" ", 1)[0]) >= per_stream]
            else:    # microsocks prints "client[fd] 127.0.0.1: connected to HOST:PORT"
                found = [line for line in new if ": connected to " in line]
            if len(found) >= streams:
                return f"{len(found)} log records"
            time.sleep(0.05)
        raise RuntimeError(f"{self.name}: {len(found)} log records for {streams} streams; new log "
                           f"lines:\n" + "\n".join(self.log_lines()[before:][-10:]))


def _int(text: str) -> int:
    return int(text) if text.isdigit() else -1


def _json_or_none(line: str) -> dict | None:
    try:
        return json.loads(line)
    except ValueError:
        return None


def appliance_config(port: int, admin: int) -> str:
    return textwrap.dedent(f"""\
        [appliance]
        name = "proxy.localhost"
        state_dir = "var"
        workers = 1

        [listen]
        socks5 = "{HOST}:{port}"
        admin = "{HOST}:{admin}"

        [log]
        access_log = "access.log"
        level = "warning"

        [[rule]]
        name = "bench"
        action = "allow"
        src = ["127.0.0.0/8"]
        """)


def dante_config(port: int, log_path: Path) -> str:
    return textwrap.dedent(f"""\
        logoutput: {log_path}
        internal: {HOST} port = {port}
        external: {HOST}
        clientmethod: none
        socksmethod: none
        user.privileged: root
        user.unprivileged: nobody
        client pass {{
            from: 127.0.0.0/8 to: 0.0.0.0/0
            log: error
        }}
        socks pass {{
            from: 127.0.0.0/8 to: 0.0.0.0/0
            command: connect
            log: connect disconnect error
        }}
        """)


def http_status(url: str) -> str:
    res = subprocess.run(["curl", "-s", "--noproxy", "*", "--max-time", "2", "-o", "/dev/null",
                          "-w", "%{http_code}", url], capture_output=True, text=True, timeout=5,
                         env=curl_env())
    return res.stdout.strip()


def proxied_ok(port: int | None, origin_port: int) -> bool:
    """One small download through the proxy (or direct): the readiness probe."""
    r = curl_argv(port, origin_port, 16, 5)
    res = subprocess.run(r, capture_output=True, text=True, timeout=10, env=curl_env())
    return res.returncode == 0 and res.stdout.split()[:1] == ["200"]


def start_peer(name: str, work: Path, taken: set[int], origin_port: int, python: str) -> Target:
    if name == "appliance":
        port, admin = pick_port(31080, taken), pick_port(31090, taken)
        home = work / "appliance"
        home.mkdir()
        (home / "appliance.toml").write_text(appliance_config(port, admin))
        env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
        env["PYTHONPATH"] = str(REPO)
        child = Child(name, [python, "-m", "appliance", "run", "--config",
                             str(home / "appliance.toml")], work, env=env, cwd=REPO)
        target = Target(name, port, child, home / "access.log")
        wait_until(lambda: http_status(f"http://{HOST}:{admin}/healthz") == "200",
                   START_DEADLINE, child, "appliance /healthz")
    elif name == "microsocks":
        binary = tool("microsocks")
        if binary is None:
            raise StartFailed(f"microsocks is not installed ({INSTALL_HINT})")
        port = pick_port(31081, taken)
        child = Child(name, [binary, "-i", HOST, "-p", str(port)], work)
        target = Target(name, port, child, child.log_path)   # its stdout: a line per client
    elif name == "dante":
        binary = tool("danted")
        if binary is None:
            raise StartFailed(f"danted is not installed ({INSTALL_HINT})")
        port = pick_port(31082, taken)
        log_path = work / "danted.log"
        (work / "danted.conf").write_text(dante_config(port, log_path))
        child = Child(name, [binary, "-f", str(work / "danted.conf"), "-p",
                             str(work / "danted.pid")], work)
        target = Target(name, port, child, log_path)
    else:
        raise ValueError(name)
    try:
        wait_until(lambda: proxied_ok(target.port, origin_port), START_DEADLINE, child,
                   f"{name}: a download through it")
    except StartFailed:
        child.stop()
        raise
    return target


# -- one measurement -----------------------------------------------------------------------------

def curl_env() -> dict[str, str]:
    """curl reads *_proxy variables: a bench run must not depend on the caller's environment."""
    return {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}


def curl_argv(port: int | None, origin_port: int, size: int, timeout: float) -> list[str]:
    via = ["--socks5", f"{HOST}:{port}"] if port else ["--noproxy", "*"]
    return ["curl", "-sS", *via, "--max-time", str(int(timeout)), "-o", "/dev/null",
            "-w", "%{http_code} %{size_download} %{speed_download} %{time_total}",
            f"http://{HOST}:{origin_port}/bytes/{size}"]


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_once(target: Target, origin: Child, origin_port: int, streams: int, total: int,
             timeout: float) -> dict:
    per_stream = total // streams
    before_log = len(target.log_lines())
    other = OtherLoad()
    cpu0, origin0, client0 = target.cpu(), tree_cpu_seconds(origin.pid), children_cpu()
    t0 = time.monotonic()
    procs = [subprocess.Popen(curl_argv(target.port, origin_port, per_stream, timeout),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=curl_env()) for _ in range(streams)]
    outputs = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=max(1.0, timeout + 10 - (time.monotonic() - t0)))
            outputs.append((p.returncode, out, err))
    finally:
        for p in procs:          # only on a timeout or an interrupt: curl processes we started
            if p.poll() is None:
                p.kill()
                p.wait(timeout=5)
    wall = time.monotonic() - t0
    cpu1, origin1, client1 = target.cpu(), tree_cpu_seconds(origin.pid), children_cpu()
    per = []
    for rc, out, err in outputs:
        parts = out.split()
        if rc != 0 or len(parts) != 4 or parts[0] != "200" or int(parts[1]) != per_stream:
            raise RuntimeError(f"{target.name}: curl exit {rc}: {out!r} {err.strip()}")
        per.append({"mb_s": float(parts[2]) / 1e6, "curl_s": float(parts[3])})
    checked = target.check(before_log, streams, per_stream)
    gb = per_stream * streams / 1e9
    mb_s = per[0]["mb_s"] if streams == 1 else per_stream * streams / wall / 1e6
    return {
        "streams": streams, "bytes": per_stream * streams, "mb_s": round(mb_s, 1),
        "wall_s": round(wall, 3), "per_stream": per, "gb": gb,
        "proxy_cpu_s": round(cpu1 - cpu0, 3) if target.child else None,
        "origin_cpu_s": round(origin1 - origin0, 3), "client_cpu_s": round(client1 - client0, 3),
        "other_cpu_cores": other.cores(), "checked": checked,
    }


# -- the whole run -------------------------------------------------------------------------------

def median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def summarize(samples: list[dict]) -> dict:
    gb = sum(s["gb"] for s in samples)
    wall = sum(s["wall_s"] for s in samples)
    mbs = [s["mb_s"] for s in samples]

    def per_gb(key: str) -> float | None:
        if any(s[key] is None for s in samples):
            return None
        return round(sum(s[key] for s in samples) / gb, 3)

    def pct(key: str) -> float | None:
        if any(s[key] is None for s in samples):
            return None
        return round(100 * sum(s[key] for s in samples) / wall, 1)

    return {"mb_s_median": round(median(mbs), 1), "mb_s_min": min(mbs), "mb_s_max": max(mbs),
            "proxy_cpu_s_per_gb": per_gb("proxy_cpu_s"), "proxy_cpu_pct": pct("proxy_cpu_s"),
            "client_cpu_s_per_gb": per_gb("client_cpu_s"), "client_cpu_pct": pct("client_cpu_s"),
            "origin_cpu_s_per_gb": per_gb("origin_cpu_s"), "origin_cpu_pct": pct("origin_cpu_s"),
            "other_cpu_cores_max": max(s["other_cpu_cores"] for s in samples)}


def ratios(results: dict, stream_counts: list[int], samples: dict) -> dict:
    out: dict = {}
    app = results.get("appliance")
    for peer in ("direct", "microsocks", "dante"):
        other = results.get(peer)
        for n in stream_counts:
            key = f"appliance/{peer}"
            entry = out.setdefault(key, {})
            if not app or not other or str(n) not in app or str(n) not in other:
                entry[str(n)] = None
                continue
            a, b = app[str(n)], other[str(n)]
            pairs = [x["mb_s"] / y["mb_s"] for x, y in zip(samples["appliance"][n], samples[peer][n])]
            entry[str(n)] = {
                "mb_s": round(a["mb_s_median"] / b["mb_s_median"], 3),
                "mb_s_per_round_median": round(median(pairs), 3),
                "cpu_s_per_gb": (round(a["proxy_cpu_s_per_gb"] / b["proxy_cpu_s_per_gb"], 3)
                                 if b["proxy_cpu_s_per_gb"] else None),
            }
    return out


def measure(targets: list[Target], origin: Child, origin_port: int, stream_counts: list[int],
            runs: int, total: int, timeout: float) -> dict:
    samples: dict = {t.name: {n: [] for n in stream_counts} for t in targets}
    idle: dict = {t.name: 0.0 for t in targets}
    for t in targets:      # warm-up, not counted: first connections, page cache, imports
        run_once(t, origin, origin_port, 1, WARMUP_BYTES, timeout)
    for i in range(runs):
        for n in stream_counts:
            for t in targets:
                others = {o.name: o.cpu() for o in targets if o is not t and o.child}
                r = run_once(t, origin, origin_port, n, total, timeout)
                for name, cpu in others.items():   # idle peers should cost nothing meanwhile
                    idle[name] += next(o.cpu() for o in targets if o.name == name) - cpu
                samples[t.name][n].append(r)
                cpu = "" if r["proxy_cpu_s"] is None else f"  proxy CPU {r['proxy_cpu_s']:.2f} s"
                print(f"  round {i + 1}/{runs} {n:2d} stream(s) {t.name:10s} {r['mb_s']:8.1f} MB/s"
                      f"{cpu}", file=sys.stderr)
    results = {t.name: {str(n): summarize(samples[t.name][n]) for n in stream_counts}
               for t in targets}
    for t in targets:
        for n in stream_counts:
            for s in samples[t.name][n]:
                s.pop("gb")
    return {"results": results, "ratios": ratios(results, stream_counts, samples),
            "idle_peer_cpu_s": {k: round(v, 3) for k, v in idle.items() if k != "direct"},
            "samples": {name: {str(n): v for n, v in by_n.items()} for name, by_n in samples.items()}}


# -- report --------------------------------------------------------------------------------------

def fmt(value: float | None, digits: int = 1, suffix: str = "") -> str:
    return "–" if value is None else f"{value:.{digits}f}{suffix}"


def tables(summary: dict) -> str:
    res, rat, runs = summary["results"], summary["ratios"], summary["params"]["runs"]
    names = [t for t in TARGETS if t in res]
    head = "| metric | " + " | ".join(names) + " | app ÷ direct | app ÷ microsocks | app ÷ dante |"
    lines = [head, "| --- |" + " ---: |" * (len(names) + 3)]

    def cell(name: str, n: int, key: str, digits: int) -> str:
        return fmt(res[name][str(n)][key], digits) if name in res else "–"

    def ratio(peer: str, n: int, key: str) -> str:
        entry = rat.get(f"appliance/{peer}", {}).get(str(n))
        return "–" if not entry or entry.get(key) is None else f"{entry[key]:.2f}"

    for n in summary["params"]["streams"]:
        label = "1 stream" if n == 1 else f"{n} streams"
        lines.append(f"| {label}, MB/s (median of {runs}) | "
                     + " | ".join(cell(t, n, "mb_s_median", 1) for t in names) + " | "
                     + " | ".join(f"**{ratio(p, n, 'mb_s')}**" for p in ("direct", "microsocks", "dante"))
                     + " |")
        lines.append(f"| {label}, MB/s min–max | "
                     + " | ".join(f"{res[t][str(n)]['mb_s_min']:.0f}–{res[t][str(n)]['mb_s_max']:.0f}"
                                  for t in names) + " | | | |")
    for n in summary["params"]["streams"]:
        label = "1 stream" if n == 1 else f"{n} streams"
        lines.append(f"| {label}, proxy CPU-s per GB | "
                     + " | ".join(cell(t, n, "proxy_cpu_s_per_gb", 3) for t in names) + " | – | "
                     + " | ".join(ratio(p, n, "cpu_s_per_gb") for p in ("microsocks", "dante")) + " |")
    cpu = ["", "| CPU, % of one core (over the runs) | streams | proxy | curl | origin | "
               "other (max, cores) |", "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for t in names:
        for n in summary["params"]["streams"]:
            r = res[t][str(n)]
            cpu.append(f"| {t} | {n} | {fmt(r['proxy_cpu_pct'], 0)} | {fmt(r['client_cpu_pct'], 0)} | "
                       f"{fmt(r['origin_cpu_pct'], 0)} | {r['other_cpu_cores_max']:.2f} |")
    return "\n".join(lines + cpu)


# -- main ----------------------------------------------------------------------------------------

def parse_list(text: str, kind=str) -> list:
    return [kind(x) for x in text.replace(" ", "").split(",") if x]


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=5, help="interleaved rounds (default 5)")
    ap.add_argument("--size-mib", type=int, default=2048,
                    help="MiB per measurement, split over the streams (default 2048)")
    ap.add_argument("--streams", default="1,4", help="stream counts (default 1,4)")
    ap.add_argument("--only", default=",".join(TARGETS), help="targets (default all: "
                    + ",".join(TARGETS) + ")")
    ap.add_argument("--timeout", type=float, default=120.0, help="seconds per transfer (default 120)")
    ap.add_argument("--python", default=sys.executable, help="interpreter of the appliance")
    ap.add_argument("--json", type=Path, help="output file (default bench/results/socks5-*.json)")
    ap.add_argument("--keep-tmp", action="store_true", help="keep configs and logs")
    ap.add_argument("--serve-origin", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.serve_origin:
        serve_origin(args.serve_origin)
        return 0
    stream_counts = parse_list(args.streams, int)
    wanted = parse_list(args.only)
    if any(t not in TARGETS for t in wanted) or "direct" not in wanted:
        ap.error(f"--only takes a list of {', '.join(TARGETS)}, and always includes direct")
    if min([args.runs, args.size_mib, *stream_counts]) < 1 or shutil.which("curl") is None:
        ap.error("counts and sizes must be at least 1, and curl must be installed")
    sys.stdout.reconfigure(line_buffering=True)

    def on_term(signum, frame):  # run the finally blocks: processes, tmp dir
        raise KeyboardInterrupt(f"signal {signum}")
    signal.signal(signal.SIGTERM, on_term)

    started = time.time()
    total = args.size_mib * MiB
    summary: dict = {"started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
                     "machine": machine(args.python),
                     "params": {"runs": args.runs, "size_mib": args.size_mib,
                                "streams": stream_counts, "targets": wanted,
                                "warmup_mib": WARMUP_BYTES // MiB, "python": args.python}}
    if summary["machine"]["loadavg_1m_before"] > 0.5:
        print(f"warning: load average {summary['machine']['loadavg_1m_before']} at the start: "
              "compare ratios, not absolute numbers", file=sys.stderr)
    work = Path(tempfile.mkdtemp(prefix="socks5-bench-"))
    started_children: list[Child] = []
    taken: set[int] = set()
    try:
        origin_port = pick_port(31000, taken)
        origin = Child("origin", [sys.executable, str(Path(__file__).resolve()), "--serve-origin",
                                  str(origin_port)], work)
        started_children.append(origin)
        wait_until(lambda: proxied_ok(None, origin_port), START_DEADLINE, origin, "origin")
        targets = [Target("direct")]
        skipped = {}
        for name in (p for p in PROXIES if p in wanted):
            try:
                target = start_peer(name, work, taken, origin_port, args.python)
            except StartFailed as exc:
                skipped[name] = str(exc)
                print(f"{name}: skipped: {exc}", file=sys.stderr)
                continue
            started_children.append(target.child)
            targets.append(target)
        summary["ports"] = {"origin": origin_port, **{t.name: t.port for t in targets if t.port}}
        summary["skipped"] = skipped
        print(f"measuring {', '.join(t.name for t in targets)}: {args.runs} rounds of "
              f"{stream_counts} streams, {args.size_mib} MiB each ...", file=sys.stderr)
        summary.update(measure(targets, origin, origin_port, stream_counts, args.runs, total,
                               args.timeout))
        summary["exit_codes"] = {}
        for child in reversed(started_children):
            child.stop()
            summary["exit_codes"][child.name] = child.proc.returncode
        summary["exit_codes"] = {k: v for k, v in reversed(summary["exit_codes"].items())}
    finally:
        for child in reversed(started_children):
            child.stop()
        if args.keep_tmp:
            print(f"kept {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)
    summary["elapsed_s"] = round(time.time() - started, 1)
    m = summary["machine"]
    print(f"\n{summary['started']}: {m['nproc']} × {m['cpu_model']}, Linux {m['kernel']}, "
          f"{m['python']}, {m['curl'].split(' (')[0]}, microsocks {m['microsocks']}, "
          f"dante {m['dante_package']}, load average {m['loadavg_1m_before']} at the start\n")
    print(tables(summary))
    for name, why in summary["skipped"].items():
        print(f"\n{name} skipped: {why}")
    save_results(summary, args.json, "socks5")
    return 0


if __name__ == "__main__":
    run_main(main, "socks5 bench")
