"""The Debian package, end to end: built with `make deb`, checked by lintian and systemd-analyze,
installed with apt on this machine, run as its service user on Debian's /usr/bin/python3 and
bookworm's libraries, reinstalled, then purged, leaving the machine as it was found.

The package is built once per content of its sources (`make deb` into a cache folder named after
their hash), so the second pass of scripts/test reuses it; installing, running and purging happen
in every pass. No systemd runs here (CI has none as PID 1): the appliance is started the way the
unit would start it (`User=appliance`, the unit's command), directly by PID, and systemd's part
is played by this test: the NOTIFY_SOCKET readiness datagram, SIGHUP for reload, SIGUSR1 after
logrotate, SIGTERM to stop. Only loopback traffic, every wait bounded.

Needs root, apt and Debian's build tools (scripts/debian-packages.sh installs them). Outside CI
it is skipped without them; under CI=true that is a failure.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import http.server
import os
import pwd
import re
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
import threading
import time
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
VERSION = re.search(r'^__version__ = "(.+)"$', (REPO / "appliance/__init__.py").read_text(), re.M)[1]
DEB_NAME = f"appliance_{VERSION}_all.deb"
CONFFILE = Path("/etc/appliance/appliance.toml")
UNIT = Path("/lib/systemd/system/appliance.service")
STATE_DIR, LOG_DIR = Path("/var/lib/appliance"), Path("/var/log/appliance")
ACCESS_LOG = LOG_DIR / "access.log"
# Everything the package installs or makes, none of which may be there before or after.
OWNED_PATHS = [Path(p) for p in (
    "/etc/appliance", "/var/lib/appliance", "/var/log/appliance", "/usr/share/appliance",
    "/usr/bin/appliance", "/lib/systemd/system/appliance.service", "/etc/logrotate.d/appliance",
    "/usr/share/doc/appliance", "/usr/share/man/man1/appliance.1.gz",
    "/usr/share/python3/runtime.d/appliance.rtupdate",
    "/etc/systemd/system/multi-user.target.wants/appliance.service",
    "/var/lib/systemd/deb-systemd-helper-enabled/appliance.service.dsh-also",
    "/var/lib/systemd/deb-systemd-helper-enabled/multi-user.target.wants/appliance.service")]
DEPENDS = ["python3", "python3-gevent", "python3-h2", "python3-wsproto", "python3-cryptography",
           "python3-dnslib", "python3-prometheus-client", "adduser"]
# Debian's tools, Debian's python3: nothing from the virtualenv or pyenv running this test.
SYSTEM_ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8", "HOME": "/root",
              "DEBIAN_FRONTEND": "noninteractive"}
SERVICE_ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"}   # as systemd gives
APT_OPTIONS = ["-o", "DPkg::Lock::Timeout=120", "-q"]     # wait for another apt, not fail
UNDER_CI = os.environ.get("CI") == "true"
ORIGIN_BODY = b"hello from the origin, through the packaged appliance\n"


def require(condition: bool, why: str) -> None:
    if not condition:
        (pytest.fail if UNDER_CI else pytest.skip)(why)


def run(cmd: list, timeout: float = 60, check: bool = True, **kwargs) -> subprocess.CompletedProcess:
    """`cmd` to its end, within `timeout` (then it and everything it started are killed)."""
    kwargs.setdefault("env", SYSTEM_ENV)
    args = [str(c) for c in cmd]
    with subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, start_new_session=True,
                          **kwargs) as process:
        try:
            stdout, stderr = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.communicate()
            raise
    result = subprocess.CompletedProcess(args, process.returncode, stdout, stderr)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, cmd))} exited {result.returncode}\n"
                             f"stdout:\n{result.stdout[-6000:]}\nstderr:\n{result.stderr[-6000:]}")
    return result


def as_service_user(*args: str, timeout: float = 60, check: bool = True) -> subprocess.CompletedProcess:
    return run(["runuser", "-u", "appliance", "--", *args], timeout=timeout, check=check,
               env=SERVICE_ENV)


def package_status() -> str:
    """dpkg's status of the package: "" when dpkg knows nothing of it."""
    result = run(["dpkg-query", "-W", "-f=${db:Status-Abbrev}", "appliance"], check=False)
    return result.stdout.strip() if result.returncode == 0 else ""


# --- building, once per content of the sources ----------------------------------------------

def package_inputs() -> list[Path]:
    files = [REPO / name for name in ("Makefile", "setup.py", "pyproject.toml", "README.md",
                                      "appliance.toml")]
    for top in ("appliance", "pac", "certs", "packaging"):
        files += [path for path in (REPO / top).rglob("*") if path.is_file()
                  and "__pycache__" not in path.parts and path.suffix != ".pyc"]
    return sorted(files)


def source_key() -> str:
    digest = hashlib.sha256()
    for path in package_inputs():
        executable = path.stat().st_mode & 0o111 != 0
        digest.update(f"{path.relative_to(REPO)}\0{executable}\0".encode())
        digest.update(path.read_bytes() + b"\0")
    return digest.hexdigest()[:24]


@pytest.fixture(scope="module")
def deb() -> Path:
    require(shutil.which("dpkg-buildpackage") is not None and shutil.which("dh") is not None,
            "Debian's build tools are missing (apt-get install debhelper dh-python)")
    cache_root = Path(tempfile.gettempdir())
    cache = cache_root / f"appliance-deb-{source_key()}"
    with open(cache_root / "appliance-deb.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (cache / DEB_NAME).exists():
            for old in cache_root.glob("appliance-deb-*"):     # builds of older sources
                if old.is_dir():
                    shutil.rmtree(old, ignore_errors=True)
            work = Path(tempfile.mkdtemp(prefix="appliance-deb-", dir=cache_root))
            try:
                run(["make", "-C", REPO, "deb", f"BUILD_DIR={work}/build", f"DIST={work}/dist"],
                    timeout=300)
                built = work / "dist" / DEB_NAME
                assert built.is_file(), f"make deb wrote no {DEB_NAME}"
                cache.mkdir()
                shutil.move(built, cache / DEB_NAME)
            finally:
                shutil.rmtree(work, ignore_errors=True)
    cache.chmod(0o755)        # apt's unprivileged _apt user reads the local .deb
    return cache / DEB_NAME


@pytest.fixture(scope="module")
def installed(deb: Path):
    """The package installed with apt, its dependencies from Debian; purged at the end (if a
    test did not already), and the service user removed if this test brought it."""
    require(os.geteuid() == 0, "installing a package needs root")
    require(shutil.which("apt-get") is not None, "apt-get is missing")
    assert package_status() in ("", "un", "pn"), (
        f"the appliance package is already on this machine ({package_status()}): "
        f"this test would replace it; purge it first")
    leftovers = [str(path) for path in OWNED_PATHS if path.exists() or path.is_symlink()]
    assert not leftovers, f"left over from an earlier install: {leftovers}"
    user_existed = run(["getent", "passwd", "appliance"], check=False).returncode == 0
    try:
        run(["apt-get", *APT_OPTIONS, "install", "-y", "--no-install-recommends", f"./{deb.name}"],
            cwd=deb.parent, timeout=300)
        assert package_status() == "ii"
        yield deb
    finally:
        if package_status() not in ("", "un", "pn"):
            run(["apt-get", *APT_OPTIONS, "purge", "-y", "appliance"], timeout=180, check=False)
        if not user_existed:
            run(["userdel", "appliance"], check=False)
            if run(["getent", "group", "appliance"], check=False).returncode == 0:
                run(["groupdel", "appliance"], check=False)


# --- the package as built -------------------------------------------------------------------

def test_changelog_has_the_version_of_the_code():
    changelog = run(["dpkg-parsechangelog", "-l", REPO / "packaging/debian/changelog",
                     "-S", "Version"]).stdout.strip()
    assert changelog == VERSION, "packaging/debian/changelog needs an entry for " + VERSION


def test_lintian_reports_no_errors(deb: Path):
    require(shutil.which("lintian") is not None, "lintian is missing")
    result = run(["lintian", "--display-info", "--tag-display-limit", "0", deb], timeout=300,
                 check=False)
    tags = [line for line in result.stdout.splitlines() if re.match(r"[EWIPX]: ", line)]
    print("lintian:", *(tags or ["no tags"]), sep="\n  ")
    errors = [line for line in tags if line.startswith("E: ")]
    assert not errors, "\n".join(errors)
    assert result.returncode == 0, result.stdout + result.stderr


def test_depends_on_debian_packages_and_installs_privately(deb: Path):
    fields = run(["dpkg-deb", "-f", deb, "Depends", "Architecture"]).stdout
    depends = {re.split(r"[ :(]", item.strip())[0]
               for item in fields.split("\n")[0].split(":", 1)[1].split(",")}
    assert set(DEPENDS) <= depends, f"missing from Depends: {set(DEPENDS) - depends}"
    assert "Architecture: all" in fields
    contents = [line.split()[-1].lstrip(".") for line in run(["dpkg-deb", "-c", deb]).stdout.splitlines()]
    for package in ("appliance", "pac", "certs"):
        assert f"/usr/share/appliance/{package}/__init__.py" in contents
    public = [path for path in contents if "-packages/" in path]
    assert not public, f"private modules must not be importable by everyone: {public[:5]}"
    assert "/usr/bin/appliance" in contents


# --- installed ------------------------------------------------------------------------------

def test_installs_user_folders_conffile_and_no_ca(installed: Path):
    user = pwd.getpwnam("appliance")
    assert user.pw_shell in ("/usr/sbin/nologin", "/bin/false") and user.pw_uid < 1000
    for folder in (STATE_DIR, LOG_DIR):
        info = folder.stat()
        assert (info.st_uid, stat.S_IMODE(info.st_mode)) == (user.pw_uid, 0o750), folder
    conffiles = run(["dpkg-query", "-W", "-f=${Conffiles}", "appliance"]).stdout
    assert str(CONFFILE) in conffiles and "/etc/logrotate.d/appliance" in conffiles
    # The CA is made by the service's first start, never by the package: clones of an image
    # must not share a key. (Where systemd runs, installing started the service already.)
    assert not (STATE_DIR / "ca").exists() or Path("/run/systemd/system").is_dir()
    assert Path("/usr/bin/appliance").read_text().startswith("#!/usr/bin/python3\n")
    private = run(["/usr/bin/python3", "-I", "-c", "import certs"], check=False, cwd="/")
    assert private.returncode != 0, "the private modules are importable by every program"


def test_unit_verifies_and_is_hardened(installed: Path):
    require(shutil.which("systemd-analyze") is not None, "systemd-analyze is missing")
    result = run(["systemd-analyze", "verify", UNIT], check=False)
    assert result.returncode == 0 and not result.stdout.strip() and not result.stderr.strip(), (
        result.stdout + result.stderr)
    unit = UNIT.read_text()
    for line in ("Type=notify", "User=appliance", "ExecReload=/bin/kill -HUP $MAINPID",
                 "ExecStartPre=/usr/bin/appliance check-config --config /etc/appliance/appliance.toml",
                 "ProtectSystem=strict", "ProtectHome=yes", "PrivateTmp=yes", "NoNewPrivileges=yes",
                 "StateDirectory=appliance", "LogsDirectory=appliance",
                 "ConfigurationDirectory=appliance", "AmbientCapabilities=CAP_NET_BIND_SERVICE",
                 "RestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX AF_NETLINK"):
        assert line in unit.splitlines(), f"{UNIT} lacks {line}"
    security = run(["systemd-analyze", "security", "--offline=true", UNIT], check=False)
    score = re.search(r"Overall exposure level for appliance\.service: ([0-9.]+)", security.stdout)
    assert score and float(score[1]) <= 2.5, security.stdout[-3000:] + security.stderr


def test_shipped_config_checks_as_the_service_user(installed: Path):
    result = as_service_user("/usr/bin/appliance", "check-config", "--config", str(CONFFILE))
    assert result.stdout.strip() == f"{CONFFILE}: ok"
    shipped = tomllib.loads(CONFFILE.read_text())
    assert shipped["appliance"]["state_dir"] == str(STATE_DIR)
    assert shipped["log"]["access_log"] == str(ACCESS_LOG)
    listen = shipped["listen"]
    for kind, port in (("http", 3128), ("socks5", 1080), ("pac", 80)):
        assert f"0.0.0.0:{port}" in listen[kind] and f"[::]:{port}" in listen[kind], kind
    assert {"0.0.0.0:443", "0.0.0.0:8443"} & set(listen["https"])
    rules = {rule["name"]: rule for rule in shipped["rule"]}
    order = list(rules)                                # first match wins
    assert order.index("the box itself") < order.index("pinned apps") < order.index("local networks")
    assert order.index("link-local") < order.index("pinned apps")
    assert rules["pinned apps"]["action"] == "passthrough"
    assert {"127.0.0.0/8", "::1"} <= set(rules["the box itself"]["dst"])
    assert {"169.254.0.0/16", "fe80::/10"} <= set(rules["link-local"]["dst"])
    for rule in shipped["rule"]:
        if rule["action"] in ("allow", "passthrough", "intercept"):
            assert set(rule["src"]) <= {"10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "fc00::/7"}


def test_runs_on_debian_python_and_libraries(installed: Path):
    probe = ("import sys; sys.path.insert(0, '/usr/share/appliance'); "
             "import appliance, pac, certs, gevent, h2, cryptography, dnslib, prometheus_client; "
             "print(sys.version.split()[0]); "
             "[print(m.__name__, getattr(m, '__version__', '-'), m.__file__) for m in "
             "(appliance, pac, certs, gevent, h2, cryptography, dnslib, prometheus_client)]")
    lines = as_service_user("/usr/bin/python3", "-I", "-c", probe).stdout.splitlines()
    print(*lines, sep="\n")
    assert lines[0].startswith("3.11")
    for line in lines[1:]:
        name, _, path = line.split()
        where = "/usr/share/appliance/" if name in ("appliance", "pac", "certs") else "/usr/lib/python3/dist-packages/"
        assert path.startswith(where), line


class Origin(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(ORIGIN_BODY)))
        self.end_headers()
        self.wfile.write(ORIGIN_BODY)

    def log_message(self, *args) -> None:
        pass


@contextlib.contextmanager
def origin_server():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Origin)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def free_ports(count: int) -> list[int]:
    socks = [socket.socket() for _ in range(count)]
    try:
        for sock in socks:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in socks]
    finally:
        for sock in socks:
            sock.close()


def config_for_test(shipped: str, listeners: dict[str, int], origin_port: int, workers: int) -> str:
    """The shipped config with loopback test ports and `workers`, and a first rule letting this
    test reach its origin on loopback (which the shipped rules rightly deny), whose port CONNECT
    may reach besides 443."""
    out, section = [], ""
    for line in shipped.splitlines(keepends=True):
        if line.startswith("["):
            section = line.strip()
            if section == "[[rule]]" and "test origin" not in "".join(out):
                out.append(f'[[rule]]\nname = "test origin"\naction = "allow"\nsrc = ["127.0.0.1"]\n'
                           f'dst = ["127.0.0.1"]\nports = [{origin_port}]\n\n')
            out.append(line)
            if section == "[listen]":
                out += [f'{kind} = "127.0.0.1:{port}"\n' for kind, port in listeners.items()]
        elif section == "[appliance]" and line.startswith("workers ="):
            out.append(f"workers = {workers}\n")
        elif section == "[policy]" and line.startswith("connect_ports ="):
            out.append(f"connect_ports = [443, {origin_port}]\n")   # CONNECT to the test origin too
        elif section != "[listen]":
            out.append(line)
    return "".join(out)


def curl(*args: str, timeout: float = 15) -> subprocess.CompletedProcess:
    return run(["curl", "-sS", "--noproxy", "", "--max-time", str(timeout), *args],
               timeout=timeout + 10, check=False, env=SERVICE_ENV)


def wait_ready(notify: socket.socket, process: subprocess.Popen, stderr: Path, within: float) -> None:
    """What systemd does for Type=notify: wait for READY=1 from the main process."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        assert process.poll() is None, f"the appliance exited {process.returncode}:\n{stderr.read_text()}"
        try:
            message = notify.recv(4096).decode()
        except socket.timeout:
            continue
        if "READY=1" in message.split("\n"):
            return
    raise AssertionError(f"no READY=1 on NOTIFY_SOCKET within {within}s (Type=notify would time "
                         f"out): is appliance.systemd_notify.ready() called once the listeners "
                         f"are up?\n{stderr.read_text()}")


def stop(process: subprocess.Popen, within: float = 30) -> int | None:
    """SIGTERM to the main process, as systemd's KillMode=mixed; SIGKILL to its group if it hangs."""
    if process.poll() is None:
        os.kill(process.pid, signal.SIGTERM)
        try:
            return process.wait(within)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(10)
            return None
    return process.returncode


class Appliance:
    """The installed appliance started as appliance.service starts it: the unit's user and
    command, a bare environment, a NOTIFY_SOCKET; on loopback test ports; stopped by PID."""

    def __init__(self, kinds: tuple[str, ...], origin_port: int, workers: int = 1) -> None:
        self.workdir = Path(tempfile.mkdtemp(prefix="appliance-pkgtest-"))
        self.workdir.chmod(0o755)                 # the service user reads its config here
        self.ports = dict(zip(kinds, free_ports(len(kinds))))
        self.config = self.workdir / "appliance.toml"
        self.config.write_text(config_for_test(CONFFILE.read_text(), self.ports, origin_port, workers))
        self.config.chmod(0o644)
        self.stderr = self.workdir / "stderr.log"
        self.process: subprocess.Popen | None = None

    def __enter__(self) -> Appliance:
        as_service_user("/usr/bin/appliance", "check-config", "--config", str(self.config))
        notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            notify.bind(str(self.workdir / "notify"))
            (self.workdir / "notify").chmod(0o666)
            notify.settimeout(0.5)
            with open(self.stderr, "wb") as errors:
                self.process = subprocess.Popen(
                    ["/usr/bin/appliance", "run", "--config", str(self.config)], cwd="/",
                    user="appliance", group="appliance", extra_groups=[], start_new_session=True,
                    env=dict(SERVICE_ENV, NOTIFY_SOCKET=str(self.workdir / "notify")),
                    stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=errors)
            wait_ready(notify, self.process, self.stderr, within=30)
        except BaseException:
            self.__exit__()
            raise
        finally:
            notify.close()
        return self

    def __exit__(self, *exc_info) -> None:
        if self.process is not None and self.process.poll() is None:
            stop(self.process, within=15)
        shutil.rmtree(self.workdir, ignore_errors=True)

    @property
    def pid(self) -> int:
        return self.process.pid

    def log(self) -> str:
        return self.stderr.read_text()

    def stopped_cleanly(self) -> bool:
        return stop(self.process) == 0


def test_serves_http_and_https_as_the_service_user(installed: Path):
    service = pwd.getpwnam("appliance")
    with origin_server() as origin_port, \
            Appliance(("http", "https", "socks5", "pac", "admin"), origin_port) as appliance:
        check_process(appliance.pid, service)
        check_proxying(appliance, origin_port)
        check_ca(appliance, service)
        check_reload_and_log_rotation(appliance, origin_port)
        assert appliance.stopped_cleanly(), f"SIGTERM did not end it cleanly:\n{appliance.log()}"


def test_workers_run_from_the_private_directory(installed: Path):
    """With workers, the supervisor re-executes `python3 -m appliance` from /usr/share/appliance."""
    with origin_server() as origin_port, Appliance(("http",), origin_port, workers=2) as appliance:
        workers = children_of(appliance.pid)
        assert len(workers) == 2, appliance.log()
        for worker in workers:
            check_process(worker, pwd.getpwnam("appliance"))
        for _ in range(4):
            result = curl("-x", f"http://127.0.0.1:{appliance.ports['http']}",
                          f"http://127.0.0.1:{origin_port}/workers")
            assert result.stdout.encode() == ORIGIN_BODY, result.stderr + appliance.log()
        assert appliance.stopped_cleanly(), appliance.log()


def children_of(pid: int) -> list[int]:
    children = []
    for stat_file in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            fields = stat_file.read_text().rsplit(")", 1)[1].split()
            if int(fields[1]) == pid:            # after the name: state, ppid, ...
                children.append(int(stat_file.parent.name))
    return children


def check_process(pid: int, service: pwd.struct_passwd) -> None:
    status = Path(f"/proc/{pid}/status").read_text()
    uids = re.search(r"^Uid:\s+(.*)$", status, re.M)[1].split()
    assert set(uids) == {str(service.pw_uid)}, status
    assert os.path.realpath(f"/proc/{pid}/exe").startswith("/usr/bin/python3")
    maps = Path(f"/proc/{pid}/maps").read_text()
    for library in ("gevent", "cryptography"):     # their compiled parts, from Debian's packages
        assert f"/usr/lib/python3/dist-packages/{library}/" in maps, library
    assert "site-packages" not in maps and "/.venv/" not in maps and "pyenv" not in maps


def check_proxying(appliance: Appliance, origin_port: int) -> None:
    ports, workdir = appliance.ports, appliance.workdir
    url = f"http://127.0.0.1:{origin_port}/through-the-package"
    http_proxy = f"http://127.0.0.1:{ports['http']}"
    for extra in ([], ["-p"]):                       # absolute-form request, CONNECT tunnel
        result = curl("-x", http_proxy, *extra, url)
        assert result.returncode == 0 and result.stdout.encode() == ORIGIN_BODY, (
            f"{extra}: {result.stderr}\n{appliance.log()}")
    ca = workdir / "ca.pem"                          # as clients get it: from the pac listener
    result = curl("-o", str(ca), f"http://127.0.0.1:{ports['pac']}/ca.pem")
    assert result.returncode == 0 and ca.read_bytes().startswith(b"-----BEGIN CERTIFICATE-----")
    result = curl("--proxy", f"https://127.0.0.1:{ports['https']}", "--proxy-cacert", str(ca), url)
    assert result.returncode == 0 and result.stdout.encode() == ORIGIN_BODY, (
        f"https listener: {result.stderr}\n{appliance.log()}")
    # The shipped rules: nothing on the box itself, here its admin listener, is reachable.
    result = curl("-o", "/dev/null", "-w", "%{http_code}", "-x", http_proxy,
                  f"http://127.0.0.1:{ports['admin']}/healthz")
    assert result.stdout == "403", result.stdout + result.stderr
    assert curl(f"http://127.0.0.1:{ports['admin']}/healthz").stdout.strip() == "ok"
    log = ACCESS_LOG.read_text()
    assert "TCP_MISS/200" in log and "TCP_TUNNEL/200" in log and "TCP_DENIED/403" in log, log


def check_ca(appliance: Appliance, service: pwd.struct_passwd) -> None:
    """Created by the first start, in the state folder, readable by the service alone."""
    cert, key = STATE_DIR / "ca" / "ca.pem", STATE_DIR / "ca" / "ca.key"
    assert cert.read_bytes() == (appliance.workdir / "ca.pem").read_bytes()
    info = key.stat()
    assert (info.st_uid, stat.S_IMODE(info.st_mode)) == (service.pw_uid, 0o600)
    assert (STATE_DIR / "ca").stat().st_uid == service.pw_uid


def check_reload_and_log_rotation(appliance: Appliance, origin_port: int) -> None:
    url = f"http://127.0.0.1:{origin_port}/after-rotation"
    os.kill(appliance.pid, signal.SIGHUP)           # systemctl reload
    time.sleep(1)
    assert appliance.process.poll() is None, appliance.log()
    # logrotate with the packaged snippet; its postrotate (systemctl kill -s USR1) needs systemd,
    # so this test sends the signal itself.
    require(shutil.which("logrotate") is not None, "logrotate is missing")
    run(["logrotate", "--force", "--state", appliance.workdir / "logrotate.state",
         "/etc/logrotate.d/appliance"])
    rotated = LOG_DIR / "access.log.1"
    assert rotated.exists() and ACCESS_LOG.exists() and ACCESS_LOG.stat().st_size == 0
    os.kill(appliance.pid, signal.SIGUSR1)
    deadline = time.monotonic() + 10
    while "/after-rotation" not in ACCESS_LOG.read_text() and time.monotonic() < deadline:
        result = curl("-x", f"http://127.0.0.1:{appliance.ports['http']}", url)
        assert result.stdout.encode() == ORIGIN_BODY, result.stderr
        time.sleep(0.2)
    assert "/after-rotation" in ACCESS_LOG.read_text(), "the access log was not reopened on SIGUSR1"
    assert pwd.getpwuid(ACCESS_LOG.stat().st_uid).pw_name == "appliance"


def file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_reinstall_keeps_the_ca_and_the_edited_config(installed: Path):
    as_service_user("/usr/bin/appliance", "ca", "init", "--config", str(CONFFILE))  # or exists
    ca_files = [STATE_DIR / "ca" / "ca.pem", STATE_DIR / "ca" / "ca.key"]
    before = [file_digest(path) for path in ca_files]
    edited = CONFFILE.read_text() + "# edited by the admin\n"
    CONFFILE.write_text(edited)
    run(["apt-get", *APT_OPTIONS, "install", "-y", "--reinstall", "--no-install-recommends",
         f"./{installed.name}"],
        cwd=installed.parent, timeout=300)
    assert [file_digest(path) for path in ca_files] == before, "a reinstall replaced the CA"
    assert CONFFILE.read_text() == edited, "a reinstall replaced the admin's config"
    show = as_service_user("/usr/bin/appliance", "ca", "show").stdout   # default: the conffile
    assert "SHA-256 fingerprint" in show


def test_purge_leaves_nothing(installed: Path):
    run(["apt-get", *APT_OPTIONS, "purge", "-y", "appliance"], timeout=180)
    assert package_status() in ("", "un", "pn"), package_status()
    listed = run(["dpkg", "-l", "appliance"], check=False).stdout
    assert not re.search(r"^(ii|rc|iU|iF|hi)\s+appliance\s", listed, re.M), listed
    left = [str(path) for path in OWNED_PATHS if path.exists() or path.is_symlink()]
    assert not left, f"left after purge: {left}"
    uid = str(pwd.getpwnam("appliance").pw_uid)     # Debian keeps the user; the fixture drops it
    owned = run(["find", "/etc", "/var", "/usr", "/run", "/srv", "/opt", "-xdev", "-uid", uid],
                timeout=120, check=False).stdout.split()
    assert not owned, f"files of the appliance user left after purge: {owned[:20]}"
