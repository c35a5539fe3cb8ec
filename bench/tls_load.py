"""The TLS suite: a proxy's TLS port driven over HTTP/2 and over HTTP/1.1-in-TLS.

- requests/s of small objects: `h2load` (HTTP/2, `:scheme http` and `:authority` of the origin,
  many streams on a few connections) and `wrk` over TLS (HTTP/1.1, absolute-form requests);
- CONNECT download throughput on one stream, and on 16 at once (16 streams of ONE HTTP/2
  connection, or 16 TLS connections for HTTP/1.1): `tls_client.js` (Node's http2) for h2,
  `tls_h1_client.py` (Python's ssl, the plain suite's client in TLS) for HTTP/1.1.

The "direct" columns are the ceilings of the same clients without a proxy: nginx's own TLS port
(h2 and HTTP/1.1) for small objects, and `tls_client.js ceiling`, a Node TLS server that answers
CONNECT itself and then sends the bytes, for throughput. Loopback only; every run is bounded.
"""
from __future__ import annotations

import datetime
import json
import re
import subprocess
import sys
from pathlib import Path

from children import HOST, Child, OtherLoad, tool, tree_cpu_seconds, wait_until
from load import Params, listening, run_wrk

BENCH_DIR = Path(__file__).resolve().parent
CLIENT_JS = BENCH_DIR / "tls_client.js"
H1_CLIENT = BENCH_DIR / "tls_h1_client.py"


def make_certificate(work: Path) -> tuple[Path, Path]:
    """A self-signed certificate for localhost and 127.0.0.1 (squid, nginx, the ceiling).

    Clients trust the certificate itself. P-256, SHA-256, two days: good for one run.
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID
    import ipaddress

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "bench localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder()
            .subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=2))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.SubjectAlternativeName([
                x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address(HOST))]),
                critical=False)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = work / "bench-cert.pem", work / "bench-key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    key_path.chmod(0o644)   # squid reads it after dropping root; the temp dir is ours alone
    return cert_path, key_path


def start_ceiling(work: Path, h2_port: int, h1_port: int, cert: Path, key: Path) -> Child:
    opts = {"mode": "ceiling", "h2_port": h2_port, "h1_port": h1_port,
            "cert": str(cert), "key": str(key)}
    child = Child("ceiling", [tool("node") or "node", str(CLIENT_JS), json.dumps(opts)], work)
    wait_until(lambda: listening(h2_port) and listening(h1_port), 10.0, child, "ceiling server")
    print(f"ceiling: node pid {child.pid} answering CONNECT itself on {HOST}:{h2_port} (h2), "
          f"{HOST}:{h1_port} (HTTP/1.1 in TLS)")
    return child


# --- requests/s -----------------------------------------------------------------------------

_DURATION = {"us": 1e-3, "ms": 1.0, "s": 1e3}


def parse_h2load(text: str) -> dict:
    def num(pattern: str) -> float:
        m = re.search(pattern, text, re.M)
        return float(m.group(1)) if m else 0.0
    result = {
        "requests_per_s": num(r"^finished in [\d.]+\w+, ([\d.]+) req/s"),
        "requests": int(num(r"^requests: \d+ total, \d+ started, (\d+) done")),
        "succeeded": int(num(r"^requests: .* (\d+) succeeded")),
        "failed": int(num(r"^requests: .* (\d+) failed")),
        "errored": int(num(r"^requests: .* (\d+) errored")),
        "timeout": int(num(r"^requests: .* (\d+) timeout")),
        "non_2xx": int(num(r"^status codes: \d+ 2xx, (\d+) 3xx"))
        + int(num(r"^status codes: .* (\d+) 4xx")) + int(num(r"^status codes: .* (\d+) 5xx")),
    }
    m = re.search(r"^time for request:\s+([\d.]+)(us|ms|s)\s+([\d.]+)(us|ms|s)\s+([\d.]+)(us|ms|s)",
                  text, re.M)
    if m:
        result["latency_mean_ms"] = round(float(m.group(5)) * _DURATION[m.group(6)], 3)
        result["latency_max_ms"] = round(float(m.group(3)) * _DURATION[m.group(4)], 3)
    m = re.search(r"^Application protocol: (\S+)", text, re.M)
    result["alpn"] = m.group(1) if m else None
    return result


def run_h2load(port: int, origin: str | None, params: Params, seconds: int,
               pid: int | None) -> dict:
    """h2load on one TLS port: through a proxy (`:scheme http`, `:authority` origin) or direct."""
    argv = [tool("h2load") or "h2load", "-c", str(params.h2load_clients),
            "-m", str(params.h2load_streams), "-t", "1", "-D", str(seconds), "-N", "5"]
    if origin:
        argv += ["-H", f":authority: {origin}", "-H", ":scheme: http"]
    argv.append(f"https://{HOST}:{port}/small")
    cpu0 = tree_cpu_seconds(pid) if pid else None
    done = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 30)
    cpu1 = tree_cpu_seconds(pid) if pid else None
    if done.returncode != 0:
        raise RuntimeError(f"h2load exited {done.returncode}: "
                           f"{(done.stderr or done.stdout).strip()[-500:]}")
    result = parse_h2load(done.stdout)
    result["seconds"] = seconds
    result["clients"], result["streams_per_client"] = params.h2load_clients, params.h2load_streams
    if cpu0 is not None and result["requests"]:
        result["cpu_s"] = round(cpu1 - cpu0, 3)
        result["cpu_us_per_request"] = round((cpu1 - cpu0) / result["requests"] * 1e6, 2)
    bad = result["failed"] + result["errored"] + result["timeout"]
    result["ok"] = (result["requests"] > 0 and result["alpn"] == "h2"
                    and bad <= 0.01 * result["requests"])
    if not result["ok"]:
        result["error"] = (f"{result['requests']} done, {result['failed']} failed, "
                           f"{result['errored']} errored, {result['timeout']} timeouts, "
                           f"ALPN {result['alpn']}")
    return result


def small_objects(kind: str, port: int, origin_port: int, proxied: bool, params: Params,
                  work: Path, pid: int | None) -> dict:
    """req/s over h2 (h2load) or HTTP/1.1 in TLS (wrk), after an unmeasured warm-up."""
    origin = f"{HOST}:{origin_port}"
    def once(seconds: int, cpu_pid: int | None) -> dict:
        if kind == "h2":
            return run_h2load(port, origin if proxied else None, params, seconds, cpu_pid)
        target_port = port if proxied else None
        # direct: nginx's TLS port, origin-form; proxied: absolute-form to the proxy's TLS port
        return run_wrk(target_port, origin_port if proxied else port, params, work, seconds,
                       cpu_pid, scheme="https")
    try:
        if params.warmup_seconds:
            once(params.warmup_seconds, None)
        return once(params.wrk_seconds, pid)
    except (RuntimeError, subprocess.TimeoutExpired) as exc:
        return {"ok": False, "error": str(exc)}


# --- CONNECT throughput ---------------------------------------------------------------------

def run_connect(kind: str, port: int, ca: Path, bulk_port: int, nbytes: int, streams: int,
                params: Params, pid: int | None) -> dict:
    """One client run: `streams` CONNECT downloads sharing nbytes; MB/s and CPU."""
    opts = {"mode": "h2-connect", "proxy": f"https://{HOST}:{port}", "ca": str(ca),
            "servername": "localhost", "target": f"{HOST}:{bulk_port}", "bytes": nbytes,
            "streams": streams, "timeout": params.transfer_deadline,
            "max_frame_size": params.h2_max_frame_size}
    cpu0 = tree_cpu_seconds(pid) if pid else None
    try:
        client = ([tool("node") or "node", str(CLIENT_JS)] if kind == "h2"
                  else [sys.executable, str(H1_CLIENT)])
        done = subprocess.run(client + [json.dumps(opts)], capture_output=True, text=True, timeout=params.transfer_deadline + 15)
    except subprocess.TimeoutExpired:
        return {"ok": False, "error": f"client did not end in {params.transfer_deadline + 15:.0f}s"}
    cpu1 = tree_cpu_seconds(pid) if pid else None
    try:
        r = json.loads(done.stdout.strip().splitlines()[-1])
    except (IndexError, ValueError):
        return {"ok": False, "error": f"client exited {done.returncode}: "
                                      f"{(done.stderr or done.stdout).strip()[-500:]}"}
    r.pop("per_stream", None)
    r["ok"] = bool(r.get("ok")) and not r.get("error")
    if not r["ok"]:
        return dict(r, ok=False, error=r.get("error") or "client reported failure")
    seconds = r["seconds"]
    r["mb_per_s"] = round(r["bytes"] / seconds / 1e6, 1)
    r["client_cpu_s_per_gb"] = round(r["client_cpu_s"] / (r["bytes"] / 1e9), 3)
    r["client_cpu_busy"] = round(r["client_cpu_s"] / seconds, 3)   # share of one core
    if cpu0 is not None:
        r["cpu_s"] = round(cpu1 - cpu0, 3)
        r["proxy_cpu_busy"] = round((cpu1 - cpu0) / seconds, 3)   # share of one core
    return r


def repeated_connect(kind: str, port: int, ca: Path, bulk_port: int, nbytes: int, streams: int,
                     params: Params, pid: int | None) -> dict:
    """Median MB/s of params.transfer_repeats runs; CPU per GB summed over all of them."""
    samples = []
    for _ in range(params.transfer_repeats):
        r = run_connect(kind, port, ca, bulk_port, nbytes, streams, params, pid)
        samples.append(r)
        if not r["ok"]:
            return dict(r, samples=samples)
    rates = sorted(r["mb_per_s"] for r in samples)
    moved = sum(r["bytes"] for r in samples) / 1e9
    result = {"ok": True, "bytes": nbytes, "streams": streams, "repeats": len(samples),
              "alpn": samples[0].get("alpn"), "mb_per_s": rates[len(rates) // 2],
              "samples_mb_per_s": [r["mb_per_s"] for r in samples],
              "client_cpu_s_per_gb": round(sum(r["client_cpu_s"] for r in samples) / moved, 3),
              "client_cpu_busy": max(r["client_cpu_busy"] for r in samples)}
    if all("cpu_s" in r for r in samples):
        cpu = sum(r["cpu_s"] for r in samples)
        result["cpu_s"] = round(cpu, 3)
        result["cpu_s_per_gb"] = round(cpu / moved, 3)
        result["proxy_cpu_busy"] = round(cpu / sum(r["seconds"] for r in samples), 3)
    return result


def measure_tls(name: str, kind: str, port: int, ca: Path, pid: int | None, ports: dict,
                params: Params, work: Path, throughput_port: int | None = None) -> dict:
    """The TLS suite for one column: kind "h2" or "h1" (HTTP/1.1 in TLS) on a TLS port.

    For direct, `port` is nginx's TLS port (small objects) and throughput_port the ceiling's.
    """
    proxied = name != "direct"
    label = f"{name} {'h2' if kind == 'h2' else 'HTTP/1.1+TLS'}"
    out: dict = {}
    other = OtherLoad()
    s = out["small"] = small_objects(kind, port, ports["origin"], proxied, params, work, pid)
    s["other_cpu_cores"] = other.cores()
    print(f"  {label}: small objects: " + (f"{s['requests_per_s']:.0f} req/s" if s.get("ok")
                                           else f"FAILED ({s.get('error')})"))
    tport = throughput_port or port
    for section, streams, nbytes in (("connect_1", 1, params.tls_bytes),
                                     ("connect_n", params.tls_streams, params.tls_parallel_bytes)):
        other = OtherLoad()
        r = out[section] = repeated_connect(kind, tport, ca, ports["bulk"], nbytes, streams,
                                            params, pid)
        r["other_cpu_cores"] = other.cores()
        cpu = f", {r['cpu_s_per_gb']} CPU-s/GB" if "cpu_s_per_gb" in r else ""
        client = f", client {r['client_cpu_busy'] * 100:.0f}% of a core" if r["ok"] else ""
        print(f"  {label}: CONNECT x{streams}: "
              + (f"{r['mb_per_s']} MB/s{cpu}{client}" if r["ok"] else f"FAILED ({r.get('error')})"))
    return out
