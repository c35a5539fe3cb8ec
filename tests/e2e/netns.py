"""A three-namespace test network for transparent interception: client → appliance → origin.

```
  CLIENT ns                APPLIANCE ns (forwarding on)              ORIGIN ns
  to-appl ─── veth ─── to-client            to-origin ─── veth ─── to-appl
  192.0.2.2/24         192.0.2.1/24         198.51.100.1/24        198.51.100.10/24, .11/24
  2001:db8:2::2/64     2001:db8:2::1/64     2001:db8:3::1/64       2001:db8:3::10/64, ::11/64
  default via .1 / ::1                                             default via .1 / ::1
```

The client's default route is the appliance, so its connections to the origin cross the appliance
namespace, where `redirect()` adds `iptables -t nat ... -j REDIRECT` rules (PREROUTING on
`to-client`) that hand them to a local listener; that listener recovers the original destination
with `getsockopt(SOL_IP, SO_ORIGINAL_DST)` / `getsockopt(SOL_IPV6, IP6T_SO_ORIGINAL_DST)` and, as
the appliance routes to the origin directly, connects onward itself.

Only addresses from TEST-NET (RFC 5737) and the IPv6 documentation prefix (RFC 3849) are used,
IPv6 addresses are added `nodad` so they work at once. Veth pairs are created straight inside the
namespaces (`ip link add ... netns A type veth peer ... netns B`), so the machine's own interfaces,
routes and iptables are never touched. Names resolve only through the per-namespace hosts file
`/etc/netns/NS/hosts`, which `ip netns exec` bind-mounts over `/etc/hosts` (beside it a
`resolv.conf` naming no reachable server, so any other lookup fails at once).

Teardown (also after a failed test or a failed setup): every spawned process is stopped by its
PID (TERM, bounded wait, KILL), any process still inside one of our namespaces is killed by PID,
then the namespaces are deleted (which removes the veths and the iptables rules in them) and
`/etc/netns/NS` is removed.

Usage::

    from tests.e2e.netns import test_network  # noqa: F401  (registers the fixture)

    def test_something(test_network):
        net = test_network
        net.spawn(net.origin, [sys.executable, "-m", "http.server", "-b", net.origin_ip4, "8080"])
        net.wait_port(net.client, net.origin_ip4, 8080)
        net.redirect(80, 3129)               # and net.redirect(80, 3129, family=6)
        net.hosts(net.client, {"origin.test": net.origin_ip4})
        out = net.run(net.client, ["curl", "-s", "http://origin.test:8080/"])

Without root, `ip` or `iptables`/`ip6tables` the fixture skips, except under CI=true, where it
fails: the project's test script installs them, so missing tools there are a broken setup.
"""

from __future__ import annotations

import itertools
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Mapping
from pathlib import Path

import pytest

NETNS_ETC = Path("/etc/netns")
_SBIN_PATH = os.pathsep.join(
    [os.environ.get("PATH", ""), "/usr/local/sbin", "/usr/sbin", "/sbin"])
_counter = itertools.count(1)

_LOCALHOST_LINES = (
    "127.0.0.1\tlocalhost\n"
    "::1\tlocalhost ip6-localhost ip6-loopback\n"
)
# No name server: nothing listens on the namespace's own loopback, so a name missing from the
# hosts file (or a reverse lookup such as http.server's getfqdn) fails at once instead of timing
# out towards the machine's resolver, which the namespaces cannot reach.
_RESOLV_CONF = "nameserver 127.0.0.1\noptions timeout:1 attempts:1\n"
# Left in /etc/netns by the run that created the directory, so that whichever run finishes last
# removes it too (a machine's own /etc/netns never holds it, and `ip netns` ignores it).
_MADE_MARKER = ".made-by-appliance-tests"
_PROXY_VARS = ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "all_proxy",
               "no_proxy", "NO_PROXY")


def find_tool(name: str) -> str | None:
    """`name` on PATH or in the sbin directories (a non-login root shell may lack them)."""
    return shutil.which(name, path=_SBIN_PATH)


def namespace_env() -> dict:
    """The environment for processes in the namespaces: no proxy settings leaking in."""
    env = {k: v for k, v in os.environ.items() if k not in _PROXY_VARS}
    env["PATH"] = _SBIN_PATH
    return env


class TestNetwork:
    """Client, appliance and origin namespaces joined by two veth pairs; a context manager.

    Attributes: `client`, `appliance`, `origin` (namespace names); the addresses below; the
    interface names `client_if` (client → appliance), `appliance_client_if` (appliance's side
    towards the client, where REDIRECT rules match), `appliance_origin_if`, `origin_if`.
    """

    __test__ = False  # not a test class, despite its name

    client_ip4 = "192.0.2.2"
    client_ip6 = "2001:db8:2::2"
    appliance_client_ip4 = "192.0.2.1"          # the client's gateway
    appliance_client_ip6 = "2001:db8:2::1"
    appliance_origin_ip4 = "198.51.100.1"       # the origin's gateway
    appliance_origin_ip6 = "2001:db8:3::1"
    origin_ip4 = "198.51.100.10"
    origin_ip6 = "2001:db8:3::10"
    origin2_ip4 = "198.51.100.11"               # a second origin address, for "wrong host" tests
    origin2_ip6 = "2001:db8:3::11"

    client_if = "to-appl"
    appliance_client_if = "to-client"
    appliance_origin_if = "to-origin"
    origin_if = "to-appl"

    def __init__(self, command_timeout: float = 30.0) -> None:
        tag = f"{os.getpid()}-{next(_counter)}"
        self.client = f"apxt{tag}-cli"
        self.appliance = f"apxt{tag}-app"
        self.origin = f"apxt{tag}-org"
        self.namespaces = (self.client, self.appliance, self.origin)
        self.command_timeout = command_timeout
        self.ip = find_tool("ip") or "ip"
        self.iptables = find_tool("iptables") or "iptables"
        self.ip6tables = find_tool("ip6tables") or "ip6tables"
        self.workdir: Path | None = None    # spawned processes' logs
        self._created: list[str] = []       # namespaces we added
        self._etc_dirs: list[Path] = []     # /etc/netns/NS we made
        self._hosts: dict[str, dict[str, list[str]]] = {}
        self._procs: list[subprocess.Popen] = []

    # -- lifecycle ----------------------------------------------------------------------------

    def __enter__(self) -> TestNetwork:
        try:
            self._build()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def _build(self) -> None:
        self.workdir = Path(tempfile.mkdtemp(prefix="apxt-netns-"))
        for ns in self.namespaces:
            self._ip("netns", "add", ns)
            self._created.append(ns)
            self._write_hosts(ns)  # before anything runs in it: never the machine's /etc/hosts
            # No duplicate address detection for the veths' link-local addresses either (the
            # global ones get `nodad`), so no address is ever tentative. Set before the veths
            # exist, so they inherit it.
            self._checked(ns, ["sysctl", "-q", "-w", "net.ipv6.conf.default.accept_dad=0",
                               "net.ipv6.conf.all.accept_dad=0"])
            self._ip("-n", ns, "link", "set", "lo", "up")
        # Distinct interface indexes on the two ends of each pair: the kernel's link watcher
        # delays a carrier change by up to a second unless a device's index differs from its
        # peer's (it treats the change as urgent only for stacked devices), and with both ends
        # at index 2 of fresh namespaces the first packets would be dropped meanwhile.
        self._ip("-n", self.client, "link", "add", self.client_if, "index", "10", "type",
                 "veth", "peer", "name", self.appliance_client_if, "index", "11",
                 "netns", self.appliance)
        self._ip("-n", self.appliance, "link", "add", self.appliance_origin_if, "index", "12",
                 "type", "veth", "peer", "name", self.origin_if, "index", "13",
                 "netns", self.origin)
        self._address(self.client, self.client_if, [self.client_ip4 + "/24"],
                      [self.client_ip6 + "/64"])
        self._address(self.appliance, self.appliance_client_if,
                      [self.appliance_client_ip4 + "/24"], [self.appliance_client_ip6 + "/64"])
        self._address(self.appliance, self.appliance_origin_if,
                      [self.appliance_origin_ip4 + "/24"], [self.appliance_origin_ip6 + "/64"])
        self._address(self.origin, self.origin_if,
                      [self.origin_ip4 + "/24", self.origin2_ip4 + "/24"],
                      [self.origin_ip6 + "/64", self.origin2_ip6 + "/64"])
        for ns, gw4, gw6 in ((self.client, self.appliance_client_ip4, self.appliance_client_ip6),
                             (self.origin, self.appliance_origin_ip4, self.appliance_origin_ip6)):
            self._ip("-n", ns, "route", "add", "default", "via", gw4)
            self._ip("-n", ns, "-6", "route", "add", "default", "via", gw6)
        # Forwarding in the appliance namespace only; each namespace has its own sysctls.
        self._checked(self.appliance, ["sysctl", "-q", "-w", "net.ipv4.ip_forward=1",
                                       "net.ipv6.conf.all.forwarding=1"])
        self._wait_links_up()

    def _wait_links_up(self, timeout: float = 5.0) -> None:
        """Until every veth end has carrier and is up (normally at once); bounded."""
        ends = ((self.client, self.client_if), (self.appliance, self.appliance_client_if),
                (self.appliance, self.appliance_origin_if), (self.origin, self.origin_if))
        deadline = time.monotonic() + timeout
        for _ in range(int(timeout / 0.02) + 1):
            down = []
            for ns, dev in ends:
                out = subprocess.run([self.ip, "-n", ns, "-o", "link", "show", "dev", dev],
                                     capture_output=True, text=True, timeout=10).stdout
                if "LOWER_UP" not in out or "NO-CARRIER" in out or " state UP " not in out:
                    down.append(f"{ns}/{dev}")
            if not down:
                return
            if time.monotonic() > deadline:
                break
            time.sleep(0.02)
        raise RuntimeError(f"veth ends not up after {timeout}s: {', '.join(down)}")

    def _address(self, ns: str, dev: str, v4: list[str], v6: list[str]) -> None:
        for addr in v4:
            self._ip("-n", ns, "addr", "add", addr, "dev", dev)
        for addr in v6:
            self._ip("-n", ns, "-6", "addr", "add", addr, "dev", dev, "nodad")
        self._ip("-n", ns, "link", "set", dev, "up")

    def close(self) -> None:
        """Stop our processes by PID, delete our namespaces and /etc/netns dirs. Idempotent."""
        procs, self._procs = self._procs, []
        for proc in procs:
            _stop(proc)
        for ns in reversed(self._created):
            self._kill_stragglers(ns)
            subprocess.run([self.ip, "netns", "delete", ns], capture_output=True, timeout=30)
        self._created = []
        for path in self._etc_dirs:
            shutil.rmtree(path, ignore_errors=True)
        self._etc_dirs = []
        _remove_netns_etc_if_ours()
        if self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)
            self.workdir = None

    def _kill_stragglers(self, ns: str) -> None:
        """Processes left inside a namespace we made (say, a spawned process's children)."""
        try:
            out = subprocess.run([self.ip, "netns", "pids", ns], capture_output=True, text=True,
                                 timeout=10).stdout
        except subprocess.TimeoutExpired:
            return
        for pid in [int(p) for p in out.split() if p.isdigit()][:1000]:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass

    # -- running things -----------------------------------------------------------------------

    def _ip(self, *args: str) -> None:
        res = subprocess.run([self.ip, *args], capture_output=True, text=True,
                             timeout=self.command_timeout)
        if res.returncode != 0:
            raise RuntimeError(f"ip {' '.join(args)}: exit {res.returncode}: {res.stderr.strip()}")

    def _checked(self, ns: str, argv: list[str]) -> None:
        res = self.run(ns, argv)
        if res.returncode != 0:
            raise RuntimeError(f"in {ns}: {' '.join(argv)}: exit {res.returncode}: "
                               f"{res.stderr.strip()}")

    def _argv(self, ns: str, argv: Iterable[str]) -> list[str]:
        if ns not in self.namespaces:
            raise ValueError(f"{ns!r} is not one of this network's namespaces {self.namespaces}")
        return [self.ip, "netns", "exec", ns, *map(str, argv)]

    def run(self, ns: str, argv: Iterable[str], **kw) -> subprocess.CompletedProcess:
        """Run `argv` inside namespace `ns` to completion; output captured as text.

        Keyword arguments go to `subprocess.run`; defaults: `timeout=30` (the constructor's
        `command_timeout`), `capture_output=True`, `text=True`, `check=False`, an environment
        without proxy variables.
        """
        kw.setdefault("timeout", self.command_timeout)
        if "stdout" not in kw and "stderr" not in kw:
            kw.setdefault("capture_output", True)
        kw.setdefault("text", True)
        kw.setdefault("env", namespace_env())
        return subprocess.run(self._argv(ns, argv), **kw)

    def spawn(self, ns: str, argv: Iterable[str], **kw) -> subprocess.Popen:
        """Start `argv` inside namespace `ns`; it is stopped by its PID at teardown.

        `ip netns exec` execs the command, so the Popen's PID is the command's own. Unless
        `stdout`/`stderr` are given, both go to a log file whose path is `proc.log_path`.
        """
        argv = self._argv(ns, argv)
        kw.setdefault("env", namespace_env())
        kw.setdefault("stdin", subprocess.DEVNULL)
        log = None
        if "stdout" not in kw and "stderr" not in kw:
            assert self.workdir is not None, "spawn() outside the context manager"
            log_path = self.workdir / f"proc-{len(self._procs) + 1}-{ns}.log"
            log = open(log_path, "wb")
            kw["stdout"], kw["stderr"] = log, subprocess.STDOUT
        try:
            proc = subprocess.Popen(argv, **kw)
        finally:
            if log is not None:
                log.close()  # the child holds its own descriptor
        if log is not None:
            proc.log_path = log_path
        self._procs.append(proc)
        return proc

    def stop(self, proc: subprocess.Popen) -> int | None:
        """Stop one spawned process now (by PID); returns its exit status."""
        if proc in self._procs:
            self._procs.remove(proc)
        return _stop(proc)

    @staticmethod
    def log(proc: subprocess.Popen) -> str:
        """What a spawned process wrote so far (empty when its output went elsewhere)."""
        path = getattr(proc, "log_path", None)
        if path is None or not Path(path).exists():
            return ""
        return Path(path).read_text(errors="replace")

    # -- network configuration ----------------------------------------------------------------

    def redirect(self, dport: int, to_port: int, family: int = 4) -> None:
        """NAT-REDIRECT TCP from the client side with destination port `dport` to local `to_port`.

        `iptables` (family=4) or `ip6tables` (family=6) `-t nat -A PREROUTING -i to-client -p tcp
        --dport DPORT -j REDIRECT --to-ports TO_PORT` in the appliance namespace. The redirected
        connection arrives at the address of `to-client` (192.0.2.1 / 2001:db8:2::1), so bind
        the listener to that address or the wildcard.
        """
        if family not in (4, 6):
            raise ValueError(f"family must be 4 or 6, not {family!r}")
        tool = self.iptables if family == 4 else self.ip6tables
        self._checked(self.appliance, [tool, "-w", "5", "-t", "nat", "-A", "PREROUTING",
                                       "-i", self.appliance_client_if, "-p", "tcp",
                                       "--dport", str(int(dport)), "-j", "REDIRECT",
                                       "--to-ports", str(int(to_port))])

    def hosts(self, ns: str, entries: Mapping[str, str | Iterable[str]]) -> Path:
        """Add `{"name": "ip" or ["ip", ...]}` to namespace `ns`'s hosts file; returns its path.

        Entries accumulate over calls (a name given again is replaced). The file is rewritten in
        place, so processes started by `run`/`spawn` afterwards, and already running ones that
        read /etc/hosts again, see the new entries.
        """
        known = self._hosts.setdefault(ns, {})
        for name, addrs in entries.items():
            known[name] = [addrs] if isinstance(addrs, str) else list(addrs)
        return self._write_hosts(ns)

    def _write_hosts(self, ns: str) -> Path:
        if ns not in self.namespaces:
            raise ValueError(f"{ns!r} is not one of this network's namespaces {self.namespaces}")
        directory = NETNS_ETC / ns
        if directory not in self._etc_dirs:
            for attempt in range(3):  # another run may remove an empty /etc/netns in between
                try:
                    NETNS_ETC.mkdir(mode=0o755)
                    (NETNS_ETC / _MADE_MARKER).touch()
                except FileExistsError:
                    pass
                try:
                    directory.mkdir(mode=0o755, exist_ok=True)
                    break
                except FileNotFoundError:
                    if attempt == 2:
                        raise
            self._etc_dirs.append(directory)
        lines = [_LOCALHOST_LINES]
        for name, addrs in self._hosts.get(ns, {}).items():
            lines.extend(f"{addr}\t{name}\n" for addr in addrs)
        path = directory / "hosts"
        with open(path, "w") as f:  # in place: keep the inode that bind mounts point at
            f.write("".join(lines))
        resolv = directory / "resolv.conf"
        if not resolv.exists():
            resolv.write_text(_RESOLV_CONF)
        return path

    def wait_port(self, ns: str, host: str, port: int, timeout: float = 10.0) -> None:
        """Wait until a TCP connect from namespace `ns` to host:port succeeds; bounded."""
        probe = ("import socket, sys\n"
                 "try:\n"
                 "    socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=1).close()\n"
                 "except OSError:\n"
                 "    sys.exit(1)\n")
        python = sys.executable
        deadline = time.monotonic() + timeout
        for _ in range(int(timeout / 0.05) + 1):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                res = self.run(ns, [python, "-c", probe, host, str(port)],
                               timeout=max(remaining, 2.0))
            except subprocess.TimeoutExpired:
                break
            if res.returncode == 0:
                return
            time.sleep(0.05)
        raise TimeoutError(f"nothing accepts on {host}:{port} from namespace {ns} after {timeout}s")


def _remove_netns_etc_if_ours() -> None:
    try:
        if os.listdir(NETNS_ETC) != [_MADE_MARKER]:
            return  # absent, the machine's own, or another run still uses it
        (NETNS_ETC / _MADE_MARKER).unlink()
        NETNS_ETC.rmdir()
    except OSError:
        pass


def _stop(proc: subprocess.Popen, grace: float = 5.0) -> int | None:
    """TERM, wait up to `grace`, then KILL and wait again: by the process's own PID."""
    if proc.poll() is not None:
        return proc.returncode
    try:
        proc.terminate()
        return proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        try:
            return proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            return None


def missing_requirements() -> list[str]:
    """Why a TestNetwork cannot be built here; empty when it can."""
    problems = []
    if os.geteuid() != 0:
        problems.append("not running as root")
    for tool in ("ip", "iptables", "ip6tables", "sysctl"):
        if find_tool(tool) is None:
            problems.append(f"{tool} is not installed")
    return problems


def require_network_tools() -> None:
    """Skip when the network cannot be built; under CI=true fail instead (CI installs them)."""
    problems = missing_requirements()
    if not problems:
        return
    message = "network-namespace tests need root, iproute2 and iptables: " + "; ".join(problems)
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(message + " (CI=true: the test script installs iptables; this is a failure)")
    pytest.skip(message)


@pytest.fixture
def test_network():
    """A fresh `TestNetwork` per test (function scope: no iptables rule, process or hosts entry
    leaks from one test into the next; building one takes well under a second)."""
    require_network_tools()
    with TestNetwork() as net:
        yield net
