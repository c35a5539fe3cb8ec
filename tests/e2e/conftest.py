"""End-to-end fixtures: the real appliance process, real origins, real clients; loopback only.

Every process a test starts is stopped by its PID; every wait is bounded in count and time.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from datetime import datetime, timezone
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """`count` distinct free ports (held open together, so the kernel cannot repeat one)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    held = [socket.socket(family) for _ in range(count)]
    try:
        for s in held:
            s.bind((host, 0))
        return [s.getsockname()[1] for s in held]
    finally:
        for s in held:
            s.close()


def free_port(host: str = "127.0.0.1") -> int:
    return free_ports(1, host)[0]


def wait_for_port(host: str, port: int, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    for _ in range(int(timeout / 0.05) + 1):
        try:
            with socket.create_connection((host, port), timeout=1):
                return
        except OSError:
            if time.monotonic() > deadline:
                break
            time.sleep(0.05)
    raise TimeoutError(f"nothing listens on {host}:{port} after {timeout}s")


def require_tool(name: str) -> str:
    """The test command installs the tools; a missing one is a failure, never a skip."""
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not installed; run the README's test command, which installs it")
    return path


def child_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    for key in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "all_proxy"):
        env.pop(key, None)
    env["NO_PROXY"] = ""
    return env


class Process:
    """A child process stopped by its PID: TERM, then KILL after a grace period."""

    def __init__(self, args: list[str], log_path: Path, cwd: Path = REPO) -> None:
        self.log_path = log_path
        self._log = open(log_path, "wb")
        self.popen = subprocess.Popen(args, cwd=cwd, env=child_env(), stdout=self._log,
                                      stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        self.pid = self.popen.pid

    def stop(self, grace: float = 10.0) -> int:
        if self.popen.poll() is None:
            os.kill(self.pid, signal.SIGTERM)
            try:
                self.popen.wait(grace)
            except subprocess.TimeoutExpired:
                os.kill(self.pid, signal.SIGKILL)
                self.popen.wait(5)
        self._log.close()
        return self.popen.returncode

    def output(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text(errors="replace")


DEFAULT_RULES = """
[[rule]]
name = "loopback"
action = "allow"
src = ["127.0.0.0/8", "::1"]
"""


class Appliance:
    """The real appliance (`python -m appliance run`) on free loopback ports, with a generated config."""

    def __init__(self, workdir: Path, extra: str = "", rules: str = DEFAULT_RULES,
                 http: list[str] | None = None, log: str = "", more_listeners: str = "",
                 workers: int | str = 1) -> None:
        self.dir = workdir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.http_port, self.https_port, self.admin_port = free_ports(3)
        self.access_log = self.dir / "access.log"
        self.ca_path = self.dir / "var" / "ca" / "ca.pem"     # the appliance CA, made at first start
        listen = http or [f"127.0.0.1:{self.http_port}"]
        self.config_path = self.dir / "appliance.toml"
        self.config_path.write_text(
            f'[appliance]\nname = "proxy.test"\nstate_dir = "var"\n'
            f'{"" if workers == 1 else f"workers = {json.dumps(workers)}"}\n'
            f"[listen]\nhttp = {json.dumps(listen)}\nhttps = \"127.0.0.1:{self.https_port}\"\n"
            f"admin = \"127.0.0.1:{self.admin_port}\"\n{more_listeners}\n\n"
            f'[log]\naccess_log = "access.log"\nlevel = "debug"\n{log}\n\n{extra}\n{rules}\n')
        self.proc: Process | None = None

    @property
    def proxy(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def https_proxy(self) -> str:
        return f"https://localhost:{self.https_port}"

    def start(self) -> "Appliance":
        self.proc = Process([sys.executable, "-m", "appliance", "run", "--config", str(self.config_path)],
                            self.dir / "appliance.out")
        deadline = time.monotonic() + 20
        for _ in range(400):
            if self.proc.popen.poll() is not None:
                raise RuntimeError(f"appliance exited:\n{self.proc.output()}")
            try:
                if self.admin_get("/healthz")[0] == 200:
                    return self
            except OSError:
                pass
            if time.monotonic() > deadline:
                break
            time.sleep(0.05)
        raise TimeoutError(f"appliance not healthy:\n{self.proc.output()}")

    def admin_get(self, path: str) -> tuple[int, str]:
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        try:
            with opener.open(f"http://127.0.0.1:{self.admin_port}{path}", timeout=5) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()

    def records(self) -> list[dict]:
        return read_access_log(self.access_log)

    def wait_records(self, count: int, timeout: float = 10.0) -> list[dict]:
        deadline = time.monotonic() + timeout
        for _ in range(int(timeout / 0.05) + 1):
            records = self.records()
            if len(records) >= count or time.monotonic() > deadline:
                return records
            time.sleep(0.05)
        return self.records()

    def wait_record(self, predicate, timeout: float = 10.0) -> dict:
        """The newest access-log record for which `predicate` holds, waiting for it to be written."""
        return wait_for_record(self.access_log, predicate, timeout)

    def peak_rss_kib(self) -> int:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
        raise RuntimeError("no VmHWM")

    def stop(self) -> int:
        return self.proc.stop() if self.proc else 0


def read_access_log(path: Path) -> list[dict]:
    """The JSON access-log records written so far; a line still being written is left out."""
    if not path.exists():
        return []
    text = path.read_text()
    return [json.loads(line) for line in text[:text.rfind("\n") + 1].splitlines() if line.strip()]


def wait_for_record(path: Path, predicate, timeout: float = 10.0, context=lambda: "") -> dict:
    """The newest record for which `predicate` holds, waiting (bounded) for it to be written;
    `context()` adds to the failure message (an appliance's own output, say)."""
    deadline = time.monotonic() + timeout
    for _ in range(int(timeout / 0.05) + 1):
        found = [r for r in read_access_log(path) if predicate(r)]
        if found:
            return found[-1]
        if time.monotonic() > deadline:
            break
        time.sleep(0.05)
    raise AssertionError(f"no matching access-log record in {read_access_log(path)[-5:]}\n{context()}")


@contextlib.contextmanager
def serving(tmp_path_factory, script: str, *args: str, host: str = "127.0.0.1"):
    """Run a test server script from this folder on a free port of `host` (its second argument
    when it listens elsewhere than 127.0.0.1); yields the port."""
    port = free_port(host)
    proc = Process([sys.executable, str(HERE / script), str(port), *args],
                   tmp_path_factory.mktemp(script.split(".")[0]) / "out.log")
    try:
        wait_for_port(host, port)
        yield port
    finally:
        proc.stop()


@pytest.fixture(scope="session")
def origin(tmp_path_factory):
    """The gevent.pywsgi test origin (tests/e2e/origin.py) on a free loopback port."""
    with serving(tmp_path_factory, "origin.py") as port:
        yield f"http://127.0.0.1:{port}"


@pytest.fixture(scope="session")
def ws_origin(tmp_path_factory):
    """The `websockets` library's echo server on a free loopback port."""
    with serving(tmp_path_factory, "ws_origin.py") as port:
        yield port


@pytest.fixture(scope="session")
def origin_tls(tmp_path_factory):
    """A CA of the tests' own and a certificate for localhost/127.0.0.1 from it, for TLS origins."""
    from certs.authority import CertificateAuthority
    from certs.leaf import issue_files
    now = datetime.now(timezone.utc)
    root = tmp_path_factory.mktemp("origin-ca")
    ca = CertificateAuthority.load_or_create(root, now, common_name="Test Origin CA")
    cert, key = issue_files(ca, ["localhost", "127.0.0.1"], root, "origin", now, 30)
    return {"ca": ca.cert_path, "cert": cert, "key": key}


@pytest.fixture(scope="session")
def tls_origin(tmp_path_factory, origin_tls):
    """The same WSGI test origin, speaking TLS."""
    with serving(tmp_path_factory, "origin.py", "127.0.0.1", str(origin_tls["cert"]),
                 str(origin_tls["key"])) as port:
        yield f"127.0.0.1:{port}"


@pytest.fixture(scope="session")
def wss_origin(tmp_path_factory, origin_tls):
    """The WebSocket echo server over TLS (wss://)."""
    with serving(tmp_path_factory, "ws_origin.py", str(origin_tls["cert"]), str(origin_tls["key"])) as port:
        yield port


@pytest.fixture(scope="session")
def h2_ws_origin(tmp_path_factory):
    """Hypercorn with a WebSocket echo app, HTTP/2 by prior knowledge (tests/e2e/h2_ws_origin.py)."""
    with serving(tmp_path_factory, "h2_ws_origin.py") as port:
        yield port


@pytest.fixture(scope="module")
def appliance(tmp_path_factory):
    """One appliance with the default test config, shared by a module's tests."""
    app = Appliance(tmp_path_factory.mktemp("appliance")).start()
    try:
        yield app
    finally:
        app.stop()


@pytest.fixture
def make_appliance(tmp_path):
    """Factory for an appliance with a special config; all are stopped at the end of the test."""
    started = []

    def make(extra: str = "", rules: str = DEFAULT_RULES, **kw) -> Appliance:
        app = Appliance(tmp_path / f"app{len(started)}", extra, rules, **kw).start()
        started.append(app)
        return app

    try:
        yield make
    finally:
        for app in started:
            app.stop()


def curl(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    """Run the real curl (never through an environment proxy)."""
    exe = require_tool("curl")
    return subprocess.run([exe, "-sS", "--noproxy", "", *args], capture_output=True,
                          timeout=timeout, env=child_env(), stdin=subprocess.DEVNULL)


def read_to_eof(sock: socket.socket, max_reads: int = 1000) -> bytes:
    """Everything the peer sends until it closes (bounded by `max_reads` reads and the socket timeout)."""
    chunks = []
    for _ in range(max_reads):
        try:
            chunk = sock.recv(65536)
        except socket.timeout:
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks)


def raw_exchange(port: int, data: bytes, timeout: float = 10.0, host: str = "127.0.0.1") -> bytes:
    """Send raw bytes to the proxy and read until it closes (or the timeout)."""
    with socket.create_connection((host, port), timeout=timeout) as s:
        s.sendall(data)
        return read_to_eof(s)


class HalfCloseOrigin:
    """Reads until the client half-closes, then answers with what it got; or speaks first and
    half-closes its own side, then still reads. Shows both directions survive the other's FIN."""

    def __init__(self, mode: str) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(1)
        self.port = self.sock.getsockname()[1]
        self.mode = mode
        self.received = b""
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        conn, _ = self.sock.accept()
        conn.settimeout(10)
        with conn:
            if self.mode == "server-first":
                conn.sendall(b"banner")
                conn.shutdown(socket.SHUT_WR)
            for _ in range(1000):
                data = conn.recv(65536)
                if not data:
                    break
                self.received += data
            if self.mode == "client-first":
                conn.sendall(b"got:" + self.received)
        self.sock.close()
