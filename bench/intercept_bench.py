#!/usr/bin/env python3
"""Benchmark transparent interception: leaf minting, and passthrough throughput against direct.

Sits outside the data path, run by hand (never by the test suite):

    .venv/bin/python bench/intercept_bench.py            # both parts, about a minute or two
    .venv/bin/python bench/intercept_bench.py --only mint
    .venv/bin/python bench/intercept_bench.py --only passthrough --runs 3 --size-mib 256

1. **mint**: `certs.LeafStore` over a fresh CA in a temporary directory (on the disk that holds
   the temp dir, as `state_dir/leaves` would be), for each key type: a first `files()` for a new
   name (key generation, signing, atomic write, link), a memory hit (same store, same name), a
   disk hit (a second `LeafStore` over the same directory, as another worker would see it), and
   building an `ssl.SSLContext` + `load_cert_chain` from the returned files (what the appliance
   does once per new name before caching the context). Names of the two key types are
   interleaved through one run; medians and p95 in milliseconds.
2. **passthrough**: three network namespaces (tests/e2e/netns.py: client → appliance router →
   origin). The origin is `openssl s_server -WWW` serving one large file from a tmpfs directory;
   the client is curl. "direct" is curl with no REDIRECT rule in the appliance namespace (the
   kernel only forwards the packets), "appliance" is the same curl with `iptables -t nat -A
   PREROUTING ... --dport 443 -j REDIRECT --to-ports 3130`, so the appliance's `transparent_tls`
   listener peeks the SNI, matches a `passthrough` rule and splices the bytes on. Runs alternate
   direct, appliance, direct, ...; the rule is deleted and re-added between them. Reported:
   MB/s medians (MB = 10^6 bytes), appliance ÷ direct, and the appliance's CPU seconds per GB
   (utime + stime from /proc/PID/stat around each run).

Every process is started through `TestNetwork.spawn` and stopped by its PID when the network
closes (also on Ctrl-C or SIGTERM); every command has a timeout; the tmpfs directory and the
temporary directories are removed at the end. Prints markdown tables and writes a JSON file
(default bench/results/intercept-YYYYMMDD-HHMMSS.json, beside bench/run's results).
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import platform
import shutil
import signal
import ssl
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import certs  # noqa: E402
from certs.leaf import issue_files  # noqa: E402
from report import run_main, save_results  # noqa: E402
from children import cpu_model, first_line  # noqa: E402  (bench/ is this script's folder)

MiB = 1024 * 1024
APP_PORT = 3130
ADMIN_PORT = 9090
ORIGIN_NAME = "pinned.test"
FILE_NAME = "big.bin"


# -- small helpers ------------------------------------------------------------------------------

def median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def p95(values: list[float]) -> float | None:
    """Nearest-rank 95th percentile."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(0.95 * len(ordered)) - 1)]


def fmt(value: float | None, digits: int = 2) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def machine() -> dict:
    import cryptography
    return {
        "nproc": os.cpu_count(),
        "cpu_model": cpu_model(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "openssl_python": ssl.OPENSSL_VERSION,
        "cryptography": cryptography.__version__,
        "openssl_cli": first_line(["openssl", "version"]),
        "curl": first_line(["curl", "--version"]),
        "loadavg_1m_before": round(os.getloadavg()[0], 2),
    }


# -- part 1: leaf minting -----------------------------------------------------------------------

def _ms(start_ns: int) -> float:
    return (time.perf_counter_ns() - start_ns) / 1e6


def _schedule(counts: dict[str, int]) -> list[str]:
    """Key types spread evenly over one run: ec ec ... rsa ec ec ... (each in proportion)."""
    slots = []
    for key_type, n in counts.items():
        slots.extend(((i + 0.5) / n, key_type) for i in range(n))
    return [key_type for _, key_type in sorted(slots)]


def bench_mint(counts: dict[str, int], now: dt.datetime) -> dict:
    """Per key type: lists of milliseconds for first mint, memory hit, disk hit, SSLContext."""
    tmp = Path(tempfile.mkdtemp(prefix="intercept-bench-mint-"))
    try:
        samples = {kt: {"first_mint": [], "memory_hit": [], "disk_hit": [], "ssl_context": []}
                   for kt in counts}
        stores = {}
        for kt in counts:
            ca = certs.CertificateAuthority.create(tmp / kt, now, key_type=kt)
            leaves = tmp / kt / "leaves"
            first = certs.LeafStore(ca, leaves, days=90, max_entries=1024, key_type=kt)
            second = certs.LeafStore(ca, leaves, days=90, max_entries=1024, key_type=kt)
            stores[kt] = (first, second)
            # Warm-up (imports, OpenSSL's first-use costs), not counted: a name never used again.
            chain, key = first.files([f"warmup.{kt}.bench.test"], now)
            ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(chain, key)
        counter = {kt: 0 for kt in counts}
        for kt in _schedule(counts):
            first, second = stores[kt]
            name = f"host{counter[kt]:04d}.{kt}.bench.test"
            counter[kt] += 1
            s = samples[kt]
            t = time.perf_counter_ns()
            chain, key = first.files([name], now)
            s["first_mint"].append(_ms(t))
            t = time.perf_counter_ns()
            again = first.files([name], now)
            s["memory_hit"].append(_ms(t))
            t = time.perf_counter_ns()
            other = second.files([name], now)
            s["disk_hit"].append(_ms(t))
            t = time.perf_counter_ns()
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(chain, key)
            s["ssl_context"].append(_ms(t))
            if again != (chain, key) or other != (chain, key):
                raise RuntimeError(f"{name}: the stores disagree: {chain} {again} {other}")
        result = {}
        for kt, s in samples.items():
            first, second = stores[kt]
            # Every counted call must have been answered the way it is labelled.
            expected = (counts[kt] + 1, counts[kt], counts[kt])
            got = (first.minted, first.memory_hits, second.disk_hits)
            if got != expected or second.minted:
                raise RuntimeError(f"{kt}: minted/memory/disk = {got} (second store minted "
                                   f"{second.minted}), expected {expected}")
            result[kt] = {op: {"n": len(v), "median_ms": round(median(v), 4),
                               "p95_ms": round(p95(v), 4), "samples_ms": [round(x, 4) for x in v]}
                          for op, v in s.items()}
        return {"directory": str(tmp), "results": result}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def mint_table(mint: dict) -> str:
    labels = {"first_mint": "first mint (new name: key, sign, write)",
              "memory_hit": "memory hit (same store)",
              "disk_hit": "disk hit (second LeafStore, as another worker)",
              "ssl_context": "SSLContext + load_cert_chain"}
    lines = ["| leaf minting | key | n | median ms | p95 ms |", "| --- | --- | ---: | ---: | ---: |"]
    for op, label in labels.items():
        for kt, ops in mint["results"].items():
            r = ops[op]
            lines.append(f"| {label} | {kt} | {r['n']} | {r['median_ms']:.3f} | {r['p95_ms']:.3f} |")
    return "\n".join(lines)


# -- part 2: passthrough throughput -------------------------------------------------------------

def proc_cpu_seconds(pid: int) -> float:
    """utime + stime of `pid` and its live descendants (the appliance runs as one process)."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    todo, seen = [pid], set()
    while todo:
        p = todo.pop()
        if p in seen:
            continue
        seen.add(p)
        try:
            stat = Path(f"/proc/{p}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        total += int(fields[11]) + int(fields[12])  # fields 14 and 15 of stat(5)
        for task in Path(f"/proc/{p}/task").glob("*/children"):
            try:
                todo.extend(int(c) for c in task.read_text().split())
            except OSError:
                pass
    return total / tick


class Redirect:
    """The REDIRECT rule of `TestNetwork.redirect`, deleted and added again between runs."""

    def __init__(self, net) -> None:
        self.net = net
        self.rule = ["PREROUTING", "-i", net.appliance_client_if, "-p", "tcp", "--dport", "443",
                     "-j", "REDIRECT", "--to-ports", str(APP_PORT)]

    def _iptables(self, op: str) -> subprocess.CompletedProcess:
        return self.net.run(self.net.appliance,
                            [self.net.iptables, "-w", "5", "-t", "nat", op, *self.rule], timeout=15)

    def present(self) -> bool:
        return self._iptables("-C").returncode == 0

    def set(self, on: bool) -> None:
        if on != self.present():
            res = self._iptables("-A" if on else "-D")
            if res.returncode != 0:
                raise RuntimeError(f"iptables {'-A' if on else '-D'}: {res.stderr.strip()}")
        if self.present() != on:
            raise RuntimeError(f"REDIRECT rule still {'absent' if on else 'present'}")


def appliance_config() -> str:
    return textwrap.dedent(f"""\
        [appliance]
        name = "gateway.test"
        state_dir = "var"

        [listen]
        transparent_tls = "0.0.0.0:{APP_PORT}"
        admin = "127.0.0.1:{ADMIN_PORT}"

        [log]
        access_log = "access.log"

        [[rule]]
        name = "pinned"
        action = "passthrough"
        dst = ["{ORIGIN_NAME}"]

        [[rule]]
        name = "clients"
        action = "allow"
        src = ["192.0.2.0/24"]
        """)


def wait_healthz(net, proc, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    for _ in range(int(timeout / 0.1) + 1):
        if proc.poll() is not None:
            raise RuntimeError(f"appliance exited {proc.returncode}:\n{net.log(proc)[-3000:]}")
        res = net.run(net.appliance, ["curl", "-s", "--noproxy", "*", "--max-time", "2", "-o",
                                      "/dev/null", "-w", "%{http_code}",
                                      f"http://127.0.0.1:{ADMIN_PORT}/healthz"], timeout=5)
        if res.stdout.strip() == "200":
            return
        if time.monotonic() > deadline:
            break
        time.sleep(0.1)
    raise RuntimeError(f"appliance /healthz not 200 after {timeout}s:\n{net.log(proc)[-3000:]}")


def access_records(path: Path) -> list[dict]:
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            out.append({"raw": line})
    return out


def curl_once(net, cacert: Path, size: int, timeout: float) -> dict:
    res = net.run(net.client, ["curl", "-sS", "--noproxy", "*", "-4", "--max-time", str(int(timeout)),
                               "-o", "/dev/null", "-w", "%{speed_download} %{size_download} %{time_total}",
                               "--cacert", str(cacert), f"https://{ORIGIN_NAME}/{FILE_NAME}"],
                  timeout=timeout + 15)
    parts = res.stdout.split()
    # s_server -WWW closes without close_notify on some versions: curl may then exit 56 after
    # the whole body arrived; a run counts only when every byte came.
    if len(parts) != 3 or int(parts[1]) != size:
        raise RuntimeError(f"curl exit {res.returncode}: {res.stdout!r} {res.stderr.strip()}")
    return {"bytes": int(parts[1]), "mb_s": float(parts[0]) / 1e6, "curl_s": float(parts[2]),
            "curl_exit": res.returncode}


def bench_passthrough(runs: int, size_mib: int, now: dt.datetime, timeout: float) -> dict:
    from tests.e2e.netns import TestNetwork, missing_requirements, namespace_env
    problems = missing_requirements()
    for tool in ("openssl", "curl"):
        if shutil.which(tool) is None:
            problems.append(f"{tool} is not installed")
    if problems:
        raise RuntimeError("passthrough part needs: " + "; ".join(problems))
    size = size_mib * MiB
    work = Path(tempfile.mkdtemp(prefix="intercept-bench-"))
    shm = Path(tempfile.mkdtemp(prefix="intercept-bench-www-", dir="/dev/shm"))
    try:
        block = os.urandom(MiB)
        with open(shm / FILE_NAME, "wb") as f:
            for _ in range(size_mib):
                f.write(block)
        origin_ca = certs.CertificateAuthority.create(work / "origin-ca", now,
                                                      common_name="Bench Origin CA")
        cert, key = issue_files(origin_ca, [ORIGIN_NAME], work / "origin-ca", ORIGIN_NAME, now, 30)
        app_dir = work / "appliance"
        app_dir.mkdir()
        (app_dir / "appliance.toml").write_text(appliance_config())
        with TestNetwork(command_timeout=30.0) as net:
            net.hosts(net.client, {ORIGIN_NAME: net.origin_ip4})
            net.hosts(net.appliance, {ORIGIN_NAME: net.origin_ip4})
            net.spawn(net.origin, ["openssl", "s_server", "-quiet", "-accept", "443", "-cert",
                                   str(cert), "-key", str(key), "-WWW"], cwd=str(shm))
            net.wait_port(net.client, net.origin_ip4, 443)
            env = namespace_env()
            env["PYTHONPATH"] = str(REPO)
            app = net.spawn(net.appliance, [sys.executable, "-m", "appliance", "run", "--config",
                                            str(app_dir / "appliance.toml")], env=env, cwd=str(REPO))
            wait_healthz(net, app)
            redirect = Redirect(net)
            log_path = app_dir / "access.log"
            samples = {"direct": [], "appliance": []}

            def one(mode: str) -> dict:
                redirect.set(mode == "appliance")
                before_records = len(access_records(log_path))
                cpu0 = proc_cpu_seconds(app.pid)
                r = curl_once(net, origin_ca.cert_path, size, timeout)
                cpu1 = proc_cpu_seconds(app.pid)
                # The access-log record is written when the relay ends, just after curl's.
                new = []
                for _ in range(50):
                    new = access_records(log_path)[before_records:]
                    if mode == "direct" or new:
                        break
                    time.sleep(0.05)
                if mode == "appliance" and not any(rec.get("listener") == "transparent_tls"
                                                   and rec.get("rule") == "pinned" for rec in new):
                    raise RuntimeError(f"appliance run left no passthrough record: {new}")
                if mode == "direct" and new:
                    raise RuntimeError(f"direct run went through the appliance: {new}")
                r["appliance_cpu_s"] = round(cpu1 - cpu0, 3)
                r["cpu_s_per_gb"] = round((cpu1 - cpu0) / (r["bytes"] / 1e9), 4)
                r["access_log"] = new[-1] if new else None
                return r

            one("direct")      # warm-up: ARP/neighbour entries, page cache, the appliance's
            one("appliance")   # first resolve and imports; not counted
            for i in range(runs):
                for mode in ("direct", "appliance"):
                    r = one(mode)
                    samples[mode].append(r)
                    print(f"  run {i + 1}/{runs} {mode:9s} {r['mb_s']:8.1f} MB/s  "
                          f"appliance CPU {r['appliance_cpu_s']:.2f} s", file=sys.stderr)
            redirect.set(False)
            app_rc = net.stop(app)
        direct = [r["mb_s"] for r in samples["direct"]]
        through = [r["mb_s"] for r in samples["appliance"]]
        pairs = [a / d for d, a in zip(direct, through)]
        cpu = [r["cpu_s_per_gb"] for r in samples["appliance"]]
        return {
            "file_bytes": size, "runs_each": runs, "origin": "openssl s_server -WWW (tmpfs)",
            "client": "curl -4, HTTP/1.1 over TLS, --cacert origin CA",
            "appliance_exit": app_rc,
            "direct_mb_s_median": round(median(direct), 1),
            "appliance_mb_s_median": round(median(through), 1),
            "ratio_appliance_over_direct": round(median(through) / median(direct), 3),
            "ratio_per_pair_median": round(median(pairs), 3),
            "appliance_cpu_s_per_gb_median": round(median(cpu), 3),
            "direct_appliance_cpu_s_median": round(median(
                [r["appliance_cpu_s"] for r in samples["direct"]]), 3),
            "samples": samples,
        }
    finally:
        shutil.rmtree(shm, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)


def passthrough_table(p: dict) -> str:
    d, a = p["samples"]["direct"], p["samples"]["appliance"]
    return "\n".join([
        "| passthrough (transparent_tls, splice) | MB/s median | min–max | ratio to direct | "
        "appliance CPU-s per GB |",
        "| --- | ---: | ---: | ---: | ---: |",
        f"| direct (kernel forwarding only) | {p['direct_mb_s_median']:.1f} | "
        f"{min(r['mb_s'] for r in d):.0f}–{max(r['mb_s'] for r in d):.0f} | 1.00 | – |",
        f"| via appliance | {p['appliance_mb_s_median']:.1f} | "
        f"{min(r['mb_s'] for r in a):.0f}–{max(r['mb_s'] for r in a):.0f} | "
        f"**{p['ratio_appliance_over_direct']:.2f}** (per pair {p['ratio_per_pair_median']:.2f}) | "
        f"{p['appliance_cpu_s_per_gb_median']:.3f} |",
    ])


# -- main -----------------------------------------------------------------------------------------

def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", choices=("mint", "passthrough"), help="run one part only")
    ap.add_argument("--names-ec", type=int, default=200, help="EC names to mint (default 200)")
    ap.add_argument("--names-rsa", type=int, default=30, help="RSA names to mint (default 30)")
    ap.add_argument("--runs", type=int, default=5, help="direct/appliance transfers each (default 5)")
    ap.add_argument("--size-mib", type=int, default=512, help="file size in MiB (default 512)")
    ap.add_argument("--timeout", type=float, default=120.0, help="seconds per transfer (default 120)")
    ap.add_argument("--json", type=Path, help="output file (default bench/results/intercept-*.json)")
    args = ap.parse_args(argv)
    sys.stdout.reconfigure(line_buffering=True)  # progress (stderr) and tables in order
    if min(args.names_ec, args.names_rsa, args.runs, args.size_mib) < 1:
        ap.error("counts and sizes must be at least 1")

    def on_term(signum, frame):  # run the finally blocks: namespaces, processes, tmp dirs
        raise KeyboardInterrupt(f"signal {signum}")
    signal.signal(signal.SIGTERM, on_term)

    started = time.time()
    now = dt.datetime.now(dt.timezone.utc)
    summary: dict = {"started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
                     "machine": machine(),
                     "params": {"names": {"ec": args.names_ec, "rsa": args.names_rsa},
                                "runs_each": args.runs, "size_mib": args.size_mib}}
    tables = []
    if args.only in (None, "mint"):
        print("mint: ...", file=sys.stderr)
        summary["mint"] = bench_mint({"ec": args.names_ec, "rsa": args.names_rsa}, now)
        tables.append(mint_table(summary["mint"]))
    if args.only in (None, "passthrough"):
        print("passthrough: ...", file=sys.stderr)
        summary["passthrough"] = bench_passthrough(args.runs, args.size_mib, now, args.timeout)
        tables.append(passthrough_table(summary["passthrough"]))
    summary["elapsed_s"] = round(time.time() - started, 1)
    m = summary["machine"]
    print(f"\n{summary['started']}: {m['nproc']} × {m['cpu_model']}, Linux {m['kernel']}, "
          f"Python {m['python']}, {m['openssl_python']}, cryptography {m['cryptography']}\n")
    print("\n\n".join(tables))
    save_results(summary, args.json, "intercept")
    return 0


if __name__ == "__main__":
    run_main(main, "intercept bench")
