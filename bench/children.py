"""Processes the bench starts, and the loopback ports they listen on.

Every child runs in a session of its own and is stopped by its PID (then by
the process group it leads, which only holds its own descendants), never by
name. CPU is read from /proc/PID/stat for the whole process tree.
"""
from __future__ import annotations

import os
import platform
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

HOST = "127.0.0.1"   # the only address anything here binds or connects to
MiB = 1024 * 1024
CLK_TCK = os.sysconf("SC_CLK_TCK")


def tool(name: str) -> str | None:
    """Path of a program, also where root's PATH would find it (/usr/sbin)."""
    return shutil.which(name) or shutil.which(name, path="/usr/local/sbin:/usr/sbin:/sbin")


class StartFailed(Exception):
    """A proxy (or the origin) did not come up; the message says why."""


class Child:
    """A process this script started, in its own session, stopped by PID."""

    def __init__(self, name: str, argv: list[str], workdir: Path,
                 env: dict[str, str] | None = None, cwd: Path | None = None):
        self.name = name
        self.argv = argv
        self.log_path = workdir / f"{name}.out"
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT,
            start_new_session=True, env=env, cwd=str(cwd) if cwd else None)
        self.pid = self.proc.pid
        self._stopped = False

    def alive(self) -> bool:
        return self.proc.poll() is None

    def output_tail(self, lines: int = 15) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.strip().splitlines()[-lines:])

    def stop(self, grace: float = 5.0) -> None:
        """SIGTERM the PID, wait, then SIGKILL what is left of its process group."""
        if self._stopped:
            return
        self._stopped = True
        if self.alive():
            try:
                os.kill(self.pid, signal.SIGTERM)
                self.proc.wait(timeout=grace)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                pass
        # The group was created by start_new_session, so pgid == pid; it only
        # holds this child's descendants (squid/nginx workers, etc.).
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(self.pid, 0)
            except (ProcessLookupError, PermissionError):
                break
            try:
                os.killpg(self.pid, sig)
            except ProcessLookupError:
                break
            time.sleep(0.5)
        try:
            self.proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            pass
        self._log.close()


def tree_cpu_seconds(root_pid: int) -> float:
    """utime+stime of root_pid and its live descendants, plus reaped children."""
    table: dict[int, tuple[int, int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            raw = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = raw[raw.rfind(")") + 2:].split()
        ppid = int(fields[1])
        ticks = sum(int(x) for x in fields[11:15])  # utime stime cutime cstime
        table[int(entry)] = (ppid, ticks)
    if root_pid not in table:
        return float("nan")
    members, frontier = {root_pid}, [root_pid]
    while frontier:
        parent = frontier.pop()
        for pid, (ppid, _) in table.items():
            if ppid == parent and pid not in members:
                members.add(pid)
                frontier.append(pid)
    return sum(table[p][1] for p in members) / CLK_TCK


def machine_busy_seconds() -> float:
    """CPU seconds all cores spent on processes since boot, plus steal (/proc/stat).

    user+nice+system+steal: irq and softirq time are left out, since the kernel charges the
    softirq work of our own loopback traffic there and to no process.
    """
    user, nice, system, _idle, _iowait, _irq, _softirq, steal = (
        int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9])
    return (user + nice + system + steal) / CLK_TCK


class OtherLoad:
    """CPU used outside the bench's own process tree while a measurement runs.

    The bench shares its 2 cores with whatever else runs on the machine; this tells how much
    that was (in cores, averaged over the measurement), so that a number taken while another
    job ran can be recognized. Kernel threads that carry our own loopback traffic
    (ksoftirqd) count as "other" too, so a few hundredths of a core is normal; steal time
    (the hypervisor running someone else) counts as well.
    """

    def __init__(self) -> None:
        self._t0 = time.monotonic()
        self._busy0 = machine_busy_seconds()
        self._own0 = tree_cpu_seconds(os.getpid())

    def cores(self) -> float:
        elapsed = time.monotonic() - self._t0
        other = (machine_busy_seconds() - self._busy0) - (tree_cpu_seconds(os.getpid()) - self._own0)
        return round(max(0.0, other) / elapsed, 2) if elapsed > 0 else 0.0


def port_is_free(port: int) -> bool:
    # SO_REUSEADDR as the servers use it: TIME_WAIT leftovers of an earlier
    # run do not count, while a listening socket still makes bind fail.
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((HOST, port))
        except OSError:
            return False
    return True


def pick_port(preferred: int, taken: set[int]) -> int:
    """First free port at or after preferred (below the ephemeral range)."""
    for port in range(preferred, preferred + 200):
        if port not in taken and port_is_free(port):
            taken.add(port)
            return port
    raise StartFailed(f"no free port near {preferred}")


def wait_until(check, deadline: float, child: Child | None, what: str) -> None:
    """Poll check() every 0.1 s until it is true; bounded by deadline seconds."""
    end = time.monotonic() + deadline
    last_error = ""
    while time.monotonic() < end:
        if child is not None and not child.alive():
            raise StartFailed(f"{what} exited with code {child.proc.returncode}:\n"
                              f"{child.output_tail()}")
        try:
            if check():
                return
        except OSError as exc:
            last_error = str(exc)
        time.sleep(0.1)
    tail = child.output_tail() if child else ""
    raise StartFailed(f"{what} not ready after {deadline:.0f}s {last_error}\n{tail}".rstrip())


def cpu_model() -> str:
    """The CPU's model name, for the machine line of a report."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def first_line(argv: list[str]) -> str:
    """The first line a tool prints (its version, usually), or "unavailable"."""
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "unavailable"
    text = (out.stdout or out.stderr).strip()
    return text.splitlines()[0] if text else ""
