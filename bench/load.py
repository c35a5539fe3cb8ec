"""The load: wrk for small objects, a CONNECT client for throughput.

Both run against a proxy port, or straight at the origin for the direct
baseline (proxy_port None). Every loop is bounded in count and time.
"""
from __future__ import annotations

import re
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from children import HOST, MiB, OtherLoad, tool, tree_cpu_seconds


@dataclass(frozen=True)
class Params:
    quick: bool
    wrk_threads: int
    wrk_connections: int
    wrk_seconds: int
    warmup_seconds: int
    download_bytes: int
    upload_bytes: int
    transfer_repeats: int         # each transfer runs this often; the median is reported
    transfer_deadline: float      # seconds allowed for one transfer
    start_deadline: float         # seconds allowed for a proxy to become ready
    h2load_clients: int = 2       # TLS suite: h2load connections ...
    h2load_streams: int = 25      # ... and concurrent streams on each (2 x 25 = wrk's 50)
    tls_bytes: int = 0            # TLS suite: one CONNECT stream downloads this much
    tls_parallel_bytes: int = 0   # TLS suite: tls_streams parallel CONNECTs share this much
    tls_streams: int = 16
    h2_max_frame_size: int = 16384   # SETTINGS_MAX_FRAME_SIZE the h2 CONNECT client advertises


def read_response(s: socket.socket) -> tuple[int, bytes, bool]:
    """Read one response (Content-Length, else until EOF); (status, body, reusable)."""
    buf = b""
    while b"\r\n\r\n" not in buf and len(buf) < 16384:
        data = s.recv(4096)
        if not data:
            break
        buf += data
    head, _, body = buf.partition(b"\r\n\r\n")
    parts = head.split(b" ", 2)
    status = int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0
    m = re.search(rb"(?im)^content-length:\s*(\d+)", head)
    limit = int(m.group(1)) if m else 1 * MiB
    while len(body) < limit:
        data = s.recv(min(limit - len(body), 65536))
        if not data:
            return status, body, False
        body += data
    closes = re.search(rb"(?im)^(proxy-)?connection:\s*close", head) is not None
    return status, body, bool(m) and not closes


def http_get(port: int, target: str, host_header: str, timeout: float = 5.0) -> tuple[int, bytes]:
    """One GET over a fresh connection; returns (status, body)."""
    with socket.create_connection((HOST, port), timeout=timeout) as s:
        s.sendall(f"GET {target} HTTP/1.1\r\nHost: {host_header}\r\n"
                  f"Connection: close\r\n\r\n".encode())
        status, body, _ = read_response(s)
    return status, body


def keeps_alive(port: int, target: str, host_header: str, timeout: float = 5.0) -> bool:
    """Whether a second request on the same client connection is answered.

    Tinyproxy closes after every response, so wrk reconnects each time and
    counts one "read" socket error per request; this records why.
    """
    request = f"GET {target} HTTP/1.1\r\nHost: {host_header}\r\n\r\n".encode()
    with socket.create_connection((HOST, port), timeout=timeout) as s:
        for _ in range(2):
            try:
                s.sendall(request)
                status, _, reusable = read_response(s)
            except OSError:
                return False
            if status != 200 or not reusable:
                return False
    return True


def listening(port: int) -> bool:
    with socket.create_connection((HOST, port), timeout=1.0):
        return True


def open_tunnel(proxy_port: int | None, bulk_port: int, timeout: float) -> socket.socket:
    """A socket to the bulk server, through CONNECT on the proxy (or direct)."""
    if proxy_port is None:
        s = socket.create_connection((HOST, bulk_port), timeout=timeout)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return s
    s = socket.create_connection((HOST, proxy_port), timeout=timeout)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    authority = f"{HOST}:{bulk_port}"
    s.sendall(f"CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n".encode())
    head = b""
    while b"\r\n\r\n" not in head and len(head) < 16384:
        data = s.recv(4096)
        if not data:
            break
        head += data
    status_line = head.split(b"\r\n", 1)[0]
    parts = status_line.split(b" ", 2)
    if len(parts) < 2 or parts[1] != b"200" or not head.endswith(b"\r\n\r\n"):
        s.close()
        raise OSError(f"CONNECT refused: {status_line.decode(errors='replace')!r}")
    return s


def write_wrk_script(work: Path, path: str, host_header: str) -> Path:
    script = work / "wrk-proxy.lua"
    script.write_text(f'wrk.method = "GET"\nwrk.path = "{path}"\n'
                      f'wrk.headers["Host"] = "{host_header}"\n')
    return script


_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3}


def parse_wrk(text: str) -> dict:
    def num(pattern: str, default: float = 0.0) -> float:
        m = re.search(pattern, text)
        return float(m.group(1)) if m else default
    result = {
        "requests": int(num(r"(\d+) requests in")),
        "requests_per_s": num(r"Requests/sec:\s+([\d.]+)"),
        "non_2xx_3xx": int(num(r"Non-2xx or 3xx responses:\s+(\d+)")),
    }
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
    errors = [int(x) for x in m.groups()] if m else [0, 0, 0, 0]
    result.update(dict(zip(("err_connect", "err_read", "err_write", "err_timeout"), errors)))
    m = re.search(r"^\s+Latency\s+([\d.]+)(us|ms|s)\s", text, re.M)
    if m:
        result["latency_mean_ms"] = round(float(m.group(1)) * _UNITS[m.group(2)], 3)
    for pct, value, unit in re.findall(r"^\s+(50|75|90|99)%\s+([\d.]+)(us|ms|s)\s*$", text, re.M):
        result[f"latency_p{pct}_ms"] = round(float(value) * _UNITS[unit], 3)
    return result


def run_wrk(proxy_port: int | None, origin_port: int, params: Params, work: Path,
            seconds: int, pid: int | None, scheme: str = "http") -> dict:
    """wrk at the origin (proxy_port None) or at a proxy port with absolute-form requests.

    scheme "https": wrk speaks TLS to that port (no ALPN, so HTTP/1.1; no certificate check),
    while the requests stay `GET http://origin/small`.
    """
    origin = f"{HOST}:{origin_port}"
    if proxy_port is None:
        url, path = f"{scheme}://{origin}/", "/small"
    else:
        url, path = f"{scheme}://{HOST}:{proxy_port}/", f"http://{origin}/small"
    script = write_wrk_script(work, path, origin)
    argv = [tool("wrk") or "wrk", f"-t{params.wrk_threads}", f"-c{params.wrk_connections}", f"-d{seconds}s",
            "--timeout", "5s", "--latency", "-s", str(script), url]
    cpu0 = tree_cpu_seconds(pid) if pid else None
    done = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 30)
    cpu1 = tree_cpu_seconds(pid) if pid else None
    if done.returncode != 0:
        raise RuntimeError(f"wrk exited {done.returncode}: {done.stderr.strip()[-500:]}")
    result = parse_wrk(done.stdout)
    result["seconds"] = seconds
    if cpu0 is not None and result["requests"]:
        result["cpu_s"] = round(cpu1 - cpu0, 3)
        result["cpu_us_per_request"] = round((cpu1 - cpu0) / result["requests"] * 1e6, 2)
    bad = result["non_2xx_3xx"] + result["err_timeout"] + result["err_connect"]
    result["ok"] = result["requests"] > 0 and bad <= 0.01 * result["requests"]
    if not result["ok"]:
        result["error"] = (f"{result['requests']} requests, {result['non_2xx_3xx']} non-2xx, "
                           f"{result['err_connect']} connect errors, {result['err_timeout']} timeouts")
    return result


def run_transfer(direction: str, proxy_port: int | None, bulk_port: int, nbytes: int,
                 params: Params, pid: int | None) -> dict:
    """Download (GET) or upload (PUT) nbytes through a tunnel; MB/s and CPU-s per GB."""
    buf = bytearray(MiB)
    view = memoryview(buf)
    deadline = time.monotonic() + params.transfer_deadline
    sock = open_tunnel(proxy_port, bulk_port, timeout=10.0)
    moved = 0
    try:
        verb = "GET" if direction == "download" else "PUT"
        cpu0 = tree_cpu_seconds(pid) if pid else None
        t0 = time.perf_counter()
        sock.sendall(f"{verb} {nbytes}\n".encode())
        timed_out = False
        if direction == "download":
            while moved < nbytes:
                if time.monotonic() > deadline:
                    timed_out = True
                    break
                k = sock.recv_into(view, min(MiB, nbytes - moved))
                if not k:
                    break
                moved += k
        else:
            while moved < nbytes:
                if time.monotonic() > deadline:
                    timed_out = True
                    break
                chunk = min(MiB, nbytes - moved)
                sock.sendall(view[:chunk])
                moved += chunk
            reply = b""
            while not timed_out and b"\n" not in reply and len(reply) < 64:
                data = sock.recv(64)
                if not data:
                    break
                reply += data
            if reply.strip() != f"OK {nbytes}".encode():
                moved = min(moved, int(reply.split()[1]) if reply.startswith(b"OK ") else 0)
        elapsed = time.perf_counter() - t0
        cpu1 = tree_cpu_seconds(pid) if pid else None
    finally:
        sock.close()
    result = {"bytes": moved, "seconds": round(elapsed, 3),
              "mb_per_s": round(moved / elapsed / 1e6, 1) if elapsed > 0 else 0.0,
              "ok": moved == nbytes and not timed_out}
    if cpu0 is not None and moved:
        result["cpu_s"] = round(cpu1 - cpu0, 3)
        result["cpu_s_per_gb"] = round((cpu1 - cpu0) / (moved / 1e9), 3)
    if not result["ok"]:
        result["error"] = (f"moved {moved} of {nbytes} bytes"
                           + (f" (deadline {params.transfer_deadline:.0f}s)" if timed_out else ""))
    return result


def repeated_transfer(direction: str, proxy_port: int | None, bulk_port: int, nbytes: int,
                      params: Params, pid: int | None) -> dict:
    """Median MB/s of params.transfer_repeats runs; CPU-s per GB over all of them.

    Summing CPU over every run keeps the 10 ms tick of /proc/PID/stat small
    against the total. The first failure ends the repeats.
    """
    samples = []
    for _ in range(params.transfer_repeats):
        try:
            r = run_transfer(direction, proxy_port, bulk_port, nbytes, params, pid)
        except OSError as exc:
            r = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
        samples.append(r)
        if not r["ok"]:
            return dict(r, samples=samples)
    rates = sorted(r["mb_per_s"] for r in samples)
    result = {"ok": True, "bytes": nbytes, "repeats": len(samples),
              "mb_per_s": rates[len(rates) // 2], "samples_mb_per_s": [r["mb_per_s"] for r in samples]}
    if all("cpu_s" in r for r in samples):
        cpu = sum(r["cpu_s"] for r in samples)
        result["cpu_s"] = round(cpu, 3)
        result["cpu_s_per_gb"] = round(cpu / (nbytes * len(samples) / 1e9), 3)
    return result


def measure(name: str, proxy_port: int | None, pid: int | None, ports: dict,
            params: Params, work: Path) -> dict:
    out: dict = {}
    origin = f"{HOST}:{ports['origin']}"
    try:
        out["client_keepalive"] = keeps_alive(
            proxy_port or ports["origin"],
            f"http://{origin}/small" if proxy_port else "/small", origin)
    except OSError:
        out["client_keepalive"] = False
    if params.warmup_seconds:
        try:
            run_wrk(proxy_port, ports["origin"], params, work, params.warmup_seconds, None)
        except (RuntimeError, subprocess.TimeoutExpired) as exc:
            print(f"  {name}: warm-up failed: {exc}")
    other = OtherLoad()
    try:
        out["small"] = run_wrk(proxy_port, ports["origin"], params, work, params.wrk_seconds, pid)
    except (RuntimeError, subprocess.TimeoutExpired) as exc:
        out["small"] = {"ok": False, "error": str(exc)}
    out["small"]["other_cpu_cores"] = other.cores()
    s = out["small"]
    print(f"  {name}: small objects: " + (f"{s['requests_per_s']:.0f} req/s" if s.get("ok")
                                          else f"FAILED ({s.get('error')})"))
    for direction, nbytes in (("download", params.download_bytes), ("upload", params.upload_bytes)):
        other = OtherLoad()
        r = repeated_transfer(direction, proxy_port, ports["bulk"], nbytes, params, pid)
        r["other_cpu_cores"] = other.cores()
        out[direction] = r
        cpu = f", {r['cpu_s_per_gb']} CPU-s/GB" if "cpu_s_per_gb" in r else ""
        print(f"  {name}: CONNECT {direction}: " + (f"{r['mb_per_s']} MB/s{cpu}" if r["ok"]
                                                    else f"FAILED ({r.get('error')})"))
    return out

