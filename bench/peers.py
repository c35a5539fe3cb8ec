"""The proxies under test: squid, tinyproxy, mitmproxy (mitmdump), proxy.py and the
appliance (workers = 1 and "auto"), plus nghttpx in front of squid as the HTTP/2 peer;
each with its own minimal config and state in a temporary dir, started in the foreground.

mitmproxy and proxy.py come from a venv of their own, bench/.peers-venv, made by
bench/install-peers."""
from __future__ import annotations

import os
import pwd
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from children import HOST, Child, StartFailed, pick_port, tool, wait_until
from load import Params, http_get, listening
from origins import SMALL_SIZE

REPO_ROOT = Path(__file__).resolve().parent.parent
PEERS_VENV = Path(__file__).resolve().parent / ".peers-venv"
NOFILE = 65536   # RLIMIT_NOFILE every proxy gets (bench/proxy_bench.py raises its own to it)


def peer_tool(name: str) -> str | None:
    """A program from bench/.peers-venv (mitmdump, proxy, py-spy), else from PATH."""
    candidate = PEERS_VENV / "bin" / name
    return str(candidate) if candidate.exists() else tool(name)


def raise_nofile(limit: int = NOFILE) -> int:
    """Raise this process's RLIMIT_NOFILE (children inherit it); returns the soft limit."""
    import resource
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = max(soft, limit)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, max(hard, want)))
    except (ValueError, OSError):   # not root: up to the hard limit only
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(want, hard), hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def chown_tree(path: Path, user: str) -> None:
    """Let a proxy that drops root privileges write its own state dir."""
    if os.geteuid() != 0:
        return
    entry = pwd.getpwnam(user)
    for p in [path, *path.rglob("*")]:
        os.chown(p, entry.pw_uid, entry.pw_gid)


def start_squid(work: Path, port: int, https: tuple[int, Path, Path] | None = None,
                max_fds: int = 16384) -> Child:
    """squid with http_port, plus https_port (TLS to the proxy) when https = (port, cert, key)."""
    squid = tool("squid") or "squid"
    user = "proxy"
    conf = work / "squid.conf"
    tls_lines = []
    if https:
        tls_port, cert, key = https
        shutil.copy(cert, work / "https-cert.pem")
        shutil.copy(key, work / "https-key.pem")
        (work / "https-key.pem").chmod(0o600)
        tls_lines = [f"https_port {HOST}:{tls_port} tls-cert={work}/https-cert.pem "
                     f"tls-key={work}/https-key.pem"]
    lines = [
        f"http_port {HOST}:{port}",
        *tls_lines,
        "acl bench_clients src 127.0.0.0/8",
        "http_access allow bench_clients",
        "http_access deny all",
        "cache deny all",
        "cache_mem 0 MB",
        f"access_log stdio:{work}/access.log",
        f"cache_log {work}/cache.log",
        f"pid_filename {work}/squid.pid",
        f"coredump_dir {work}",
        "logfile_rotate 0",
        "netdb_filename none",
        "pinger_enable off",
        "icp_port 0",
        "htcp_port 0",
        "dns_nameservers 127.0.0.1",
        "visible_hostname bench.localhost",
        "shutdown_lifetime 1 seconds",
        f"max_filedescriptors {max_fds}",
        "client_db off",
    ]
    if os.geteuid() == 0:
        lines.append(f"cache_effective_user {user}")
    conf.write_text("\n".join(lines) + "\n")
    chown_tree(work, user)
    child = Child("squid", [squid, "-N", "-f", str(conf)], work)
    return child


def start_tinyproxy(work: Path, port: int, max_clients: int = 1024) -> Child:
    tinyproxy = tool("tinyproxy") or "tinyproxy"
    conf = work / "tinyproxy.conf"
    # No ConnectPort line: tinyproxy 1.11 then allows CONNECT to every port.
    lines = [
        f"Port {port}",
        f"Listen {HOST}",
        "Timeout 600",
        f"MaxClients {max_clients}",
        "Allow 127.0.0.1",
        f"PidFile \"{work}/tinyproxy.pid\"",
        f"LogFile \"{work}/tinyproxy.log\"",
        "LogLevel Connect",
    ]
    if os.geteuid() == 0:
        lines += ["User nobody", "Group nogroup"]
    conf.write_text("\n".join(lines) + "\n")
    chown_tree(work, "nobody")
    return Child("tinyproxy", [tinyproxy, "-d", "-c", str(conf)], work)


def start_appliance(work: Path, port: int, admin_port: int, python: str,
                    https_port: int | None = None, workers: int | str = 1,
                    max_connections: int | None = None) -> Child:
    """The appliance with http and admin listeners, plus https when https_port is given.

    workers: 1 or "auto" (one process per core, SO_REUSEPORT); max_connections sets both
    [limits] max_connections and max_connections_per_client (the idle-tunnel bench).
    """
    conf = work / "appliance.toml"
    https = f'https = "{HOST}:{https_port}"\n' if https_port else ""
    workers_value = f'"{workers}"' if isinstance(workers, str) else str(workers)
    # h2load keeps one HTTP/2 connection for a whole run: the lifetime stream cap is lifted, as
    # nginx's keepalive_requests is for the origin (origins.py).
    limits = "\n[limits]\nmax_h2_streams_per_connection = 1000000000\n"
    if max_connections:
        limits += (f"max_connections = {max_connections}\n"
                   f"max_connections_per_client = {max_connections}\n")
    conf.write_text(f"""[appliance]
name = "proxy.localhost"
state_dir = "{work}/var"
workers = {workers_value}
{limits}
[listen]
http = "{HOST}:{port}"
{https}admin = "{HOST}:{admin_port}"

[log]
access_log = "{work}/access.log"

[[rule]]
action = "allow"
src = ["127.0.0.0/8"]
""")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    return Child("appliance", [python, "-m", "appliance", "run", "--config", str(conf)],
                 work, env=env, cwd=REPO_ROOT)


@dataclass(frozen=True)
class TlsPort:
    """A proxy's TLS port and the CA file a client trusts for it."""
    port: int
    ca: Path


TLS_CAPABLE = ("appliance", "squid")   # tinyproxy has no TLS toward its clients


APPLIANCE_WORKERS = {"appliance": 1, "appliance-auto": "auto"}   # target name -> workers


def start_proxy(name: str, root: Path, ports: dict, taken: set[int], params: Params,
                python: str, cert: tuple[Path, Path] | None = None,
                max_connections: int | None = None
                ) -> tuple[Child, int, TlsPort | None]:
    """Start one proxy; with cert = (cert, key), also its TLS port if it has one.

    name: appliance (workers = 1), appliance-auto (workers = "auto"), squid, tinyproxy,
    mitmproxy, proxy.py. max_connections: raise each proxy's connection limits to at least
    this (the idle-tunnel bench); None keeps the suite's ordinary configs.
    """
    work = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=root))
    os.chmod(work, 0o755)
    origin = f"http://{HOST}:{ports['origin']}/small"
    tls = None
    many = max_connections or 0
    if name == "squid":
        port = pick_port(23128, taken)
        if cert:
            tls = TlsPort(pick_port(23443, taken), cert[0])
        child = start_squid(work, port, (tls.port, *cert) if tls else None,
                            max_fds=max(16384, 2 * many + 1024))
    elif name == "tinyproxy":
        port = pick_port(28888, taken)
        child = start_tinyproxy(work, port, max_clients=max(1024, many + 100))
    elif name == "mitmproxy":
        port = pick_port(25128, taken)
        child = start_mitmproxy(work, port)
    elif name == "proxy.py":
        port = pick_port(26128, taken)
        child = start_proxypy(work, port)
    elif name in APPLIANCE_WORKERS:
        port = pick_port(24128, taken)
        admin = pick_port(29090, taken)
        if cert:   # the appliance mints its own certificate from the CA it creates
            tls = TlsPort(pick_port(24443, taken), work / "var" / "ca" / "ca.pem")
        child = start_appliance(work, port, admin, python, tls.port if tls else None,
                                workers=APPLIANCE_WORKERS[name],
                                max_connections=max(many + 100, 30000) if many else None)
        try:
            wait_until(lambda: http_get(admin, "/healthz", f"{HOST}:{admin}")[0] == 200,
                       params.start_deadline, child, f"{name} /healthz")
        except StartFailed:
            child.stop()
            raise
    else:
        raise StartFailed(f"unknown proxy {name}")
    try:
        def proxied_ok() -> bool:
            status, body = http_get(port, origin, f"{HOST}:{ports['origin']}")
            return status == 200 and len(body) == SMALL_SIZE
        wait_until(proxied_ok, params.start_deadline, child, f"{name} GET through proxy")
    except StartFailed:
        child.stop()
        raise
    if tls:
        try:
            wait_until(lambda: listening(tls.port) and tls.ca.exists(), params.start_deadline,
                       child, f"{name} TLS port")
        except StartFailed:
            child.stop()
            raise
    also = f", TLS on {HOST}:{tls.port}" if tls else ""
    print(f"{name}: pid {child.pid} on {HOST}:{port}{also} (work dir {work})")
    return child, port, tls



def start_mitmproxy(work: Path, port: int) -> Child:
    """mitmdump as a plain forward proxy: CONNECT passed through untouched (ignore_hosts .*),
    no interception, no flow output; its state (a CA it makes anyway) under work/mitmproxy."""
    mitmdump = peer_tool("mitmdump") or "mitmdump"
    confdir = work / "mitmproxy"
    confdir.mkdir(exist_ok=True)
    argv = [mitmdump, "--mode", "regular", "--listen-host", HOST, "--listen-port", str(port),
            "--set", f"confdir={confdir}", "--set", "ignore_hosts=.*",
            "--set", "flow_detail=0", "--set", "termlog_verbosity=warn"]
    return Child("mitmproxy", argv, work)


def start_proxypy(work: Path, port: int) -> Child:
    """proxy.py (abhinavsingh/proxy.py) with its defaults (threadless, one worker per core),
    loopback only, RLIMIT_NOFILE raised through its own --open-file-limit."""
    proxy = peer_tool("proxy") or "proxy"
    argv = [proxy, "--hostname", HOST, "--port", str(port), "--open-file-limit", str(NOFILE),
            "--timeout", "600", "--log-level", "WARNING",
            "--pid-file", str(work / "proxypy.pid")]
    return Child("proxy.py", argv, work)


def start_nghttpx(work: Path, port: int, backend_port: int) -> Child:
    """nghttpx in HTTP/2 proxy mode (`nghttpx -s`) on HOST:port, TLS with ALPN h2 (and
    http/1.1), forwarding every request and CONNECT to the forward proxy (squid's http_port)
    on HOST:backend_port: the HTTP/2 peer of the appliance's https listener.

    The certificate is self-signed, made in work (bench-cert.pem, which a client trusts:
    also set as `child.ca`). One worker like the appliance; `--conf=/dev/null` (no system
    config); the frontend windows the appliance grants (256 KiB per stream, 4 MiB per
    connection) instead of nghttpx's 64 KiB; up to 256 connections to squid (the default 8
    per backend host would queue CONNECT streams); access and error logs in work.
    Wait for it with `wait_until(lambda: listening(port), ...)`; stop it with child.stop().
    """
    from tls_load import make_certificate
    nghttpx = tool("nghttpx") or "nghttpx"
    cert, key = make_certificate(work)
    argv = [nghttpx, "--conf=/dev/null", "-s", f"--frontend={HOST},{port}",
            f"--backend={HOST},{backend_port}", "--workers=1", "--no-ocsp",
            "--backend-connections-per-host=256", "--frontend-http2-window-size=262144",
            "--frontend-http2-connection-window-size=4194304",
            f"--accesslog-file={work}/nghttpx-access.log",
            f"--errorlog-file={work}/nghttpx-error.log", f"--pid-file={work}/nghttpx.pid",
            str(key), str(cert)]
    child = Child("nghttpx", argv, work)
    child.ca = cert
    return child
