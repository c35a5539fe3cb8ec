"""The proxies under test: squid, tinyproxy and the appliance, each with its
own minimal config and state in a temporary dir, started in the foreground."""
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


def chown_tree(path: Path, user: str) -> None:
    """Let a proxy that drops root privileges write its own state dir."""
    if os.geteuid() != 0:
        return
    entry = pwd.getpwnam(user)
    for p in [path, *path.rglob("*")]:
        os.chown(p, entry.pw_uid, entry.pw_gid)


def start_squid(work: Path, port: int, https: tuple[int, Path, Path] | None = None) -> Child:
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
        "max_filedescriptors 16384",
        "client_db off",
    ]
    if os.geteuid() == 0:
        lines.append(f"cache_effective_user {user}")
    conf.write_text("\n".join(lines) + "\n")
    chown_tree(work, user)
    child = Child("squid", [squid, "-N", "-f", str(conf)], work)
    return child


def start_tinyproxy(work: Path, port: int) -> Child:
    tinyproxy = tool("tinyproxy") or "tinyproxy"
    conf = work / "tinyproxy.conf"
    # No ConnectPort line: tinyproxy 1.11 then allows CONNECT to every port.
    lines = [
        f"Port {port}",
        f"Listen {HOST}",
        "Timeout 600",
        "MaxClients 1024",
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
                    https_port: int | None = None) -> Child:
    """The appliance with http and admin listeners, plus https when https_port is given."""
    conf = work / "appliance.toml"
    https = f'https = "{HOST}:{https_port}"\n' if https_port else ""
    conf.write_text(f"""[appliance]
name = "proxy.localhost"
state_dir = "{work}/var"

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


def start_proxy(name: str, root: Path, ports: dict, taken: set[int], params: Params,
                python: str, cert: tuple[Path, Path] | None = None
                ) -> tuple[Child, int, TlsPort | None]:
    """Start one proxy; with cert = (cert, key), also its TLS port if it has one."""
    work = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=root))
    os.chmod(work, 0o755)
    origin = f"http://{HOST}:{ports['origin']}/small"
    tls = None
    if name == "squid":
        port = pick_port(23128, taken)
        if cert:
            tls = TlsPort(pick_port(23443, taken), cert[0])
        child = start_squid(work, port, (tls.port, *cert) if tls else None)
    elif name == "tinyproxy":
        port = pick_port(28888, taken)
        child = start_tinyproxy(work, port)
    else:
        port = pick_port(24128, taken)
        admin = pick_port(29090, taken)
        if cert:   # the appliance mints its own certificate from the CA it creates
            tls = TlsPort(pick_port(24443, taken), work / "var" / "ca" / "ca.pem")
        child = start_appliance(work, port, admin, python, tls.port if tls else None)
        try:
            wait_until(lambda: http_get(admin, "/healthz", f"{HOST}:{admin}")[0] == 200,
                       params.start_deadline, child, f"{name} /healthz")
        except StartFailed:
            child.stop()
            raise
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

