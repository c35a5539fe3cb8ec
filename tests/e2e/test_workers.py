"""`[appliance] workers`: several worker processes on the same ports, under one supervisor.

Which worker served what is read from the metrics directory (one file per worker pid, as
prometheus_client's multiprocess mode keeps them) and from /proc (who holds a listening socket),
never from anything the appliance adds for the tests.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import time
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.parser import text_string_to_metric_families

from .conftest import Appliance, free_ports, raw_exchange

REQUESTS_200 = ("appliance_requests_total", (("listener", "http"), ("status", "200")))


def wait_for(predicate, what: str, app: Appliance, timeout: float = 20.0):
    deadline = time.monotonic() + timeout
    for _ in range(int(timeout / 0.05) + 1):
        found = predicate()
        if found:
            return found
        if time.monotonic() > deadline:
            break
        time.sleep(0.05)
    raise AssertionError(f"{what}: not within {timeout}s\n{app.proc.output()[-4000:]}")


def started_workers(app: Appliance) -> dict[int, int]:
    """Worker index → pid of its latest start, from the supervisor's log lines."""
    return {int(i): int(pid) for i, pid in
            re.findall(r"worker (\d+) started \(pid (\d+)\)", app.proc.output())}


def all_ready(app: Appliance, count: int) -> dict[int, int]:
    wait_for(lambda: f"all {count} workers ready" in app.proc.output(), "all workers ready", app)
    pids = started_workers(app)
    assert len(pids) == count and len(set(pids.values())) == count
    return pids


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def listeners_of(port: int) -> set[int]:
    """Pids holding a listening TCP socket on 127.0.0.1:`port`, from /proc alone."""
    inodes = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[1] == f"0100007F:{port:04X}" and fields[3] == "0A":      # 0A: LISTEN
            inodes.add(fields[9])
    pids = set()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            links = {os.readlink(fd) for fd in (proc / "fd").iterdir()}
        except OSError:
            continue
        if any(f"socket:[{inode}]" in links for inode in inodes):
            pids.add(int(proc.name))
    return pids


def get(app: Appliance, url: str) -> int:
    """One request through the proxy on a fresh connection (so the kernel picks a worker)."""
    host = url.split("/")[2]
    reply = raw_exchange(app.http_port, f"GET {url} HTTP/1.1\r\nHost: {host}\r\n"
                                        f"Connection: close\r\n\r\n".encode())
    return int(reply.split(b" ", 2)[1]) if reply.startswith(b"HTTP/1.1 ") else 0


def samples(text: str) -> dict:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def scrape(app: Appliance) -> dict:
    status, text = app.admin_get("/metrics")
    assert status == 200
    return samples(text)


def served_by(app: Appliance, pid: int, tmp_path: Path) -> float:
    """Requests answered 200 by one worker: its own counter file, summed alone."""
    alone = tmp_path / f"pid{pid}"
    alone.mkdir()
    shutil.copy(app.dir / "var" / "run" / "metrics" / f"counter_{pid}.db", alone)
    registry = CollectorRegistry()
    MultiProcessCollector(registry, str(alone))
    return samples(generate_latest(registry).decode()).get(REQUESTS_200, 0.0)


def test_auto_workers_share_the_ports_and_metrics_count_them_all(make_appliance, origin, tmp_path):
    if (os.cpu_count() or 1) < 2:
        pytest.fail("workers = \"auto\" needs two cores to mean several workers")
    pac, dns = free_ports(2)                 # the CA (made once, up front) and DNS (UDP too)
    app = make_appliance(workers="auto",
                         more_listeners=f'pac = "127.0.0.1:{pac}"\ndns = "127.0.0.1:{dns}"')
    pids = all_ready(app, os.cpu_count())
    for port in (app.http_port, app.https_port, app.admin_port, pac, dns):
        assert listeners_of(port) == set(pids.values()), port
    total = 40
    assert [get(app, f"{origin}/echo?n={i}") for i in range(total)] == [200] * total
    app.wait_records(total)
    for _ in range(4):                       # whichever worker answers, it reports them all
        assert scrape(app)[REQUESTS_200] == total
    per_worker = [served_by(app, pid, tmp_path) for pid in pids.values()]
    assert sum(per_worker) == total
    assert all(count > 0 for count in per_worker), per_worker     # the kernel used every worker
    served_ca = {raw_exchange(pac, b"GET /ca.pem HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                 .split(b"\r\n\r\n", 1)[1] for _ in range(20)}
    assert served_ca == {app.ca_path.read_bytes()}                # one CA, made by the supervisor


def test_a_killed_worker_is_logged_and_restarted(make_appliance, origin):
    app = make_appliance(workers=2)
    pids = all_ready(app, 2)
    assert [get(app, f"{origin}/echo?before={i}") for i in range(10)] == [200] * 10
    victim = pids[0]
    os.kill(victim, signal.SIGKILL)
    wait_for(lambda: re.search(rf"worker 0 \(pid {victim}\) died: killed by SIGKILL; "
                               rf"restarting it in [\d.]+s", app.proc.output()), "death logged", app)
    new = wait_for(lambda: started_workers(app)[0] != victim and started_workers(app)[0], "restart", app)
    wait_for(lambda: f"worker 0 (pid {new}) ready" in app.proc.output(), "restarted worker ready", app)
    assert not alive(victim) and alive(new) and alive(pids[1])
    assert listeners_of(app.http_port) == {new, pids[1]}
    assert [get(app, f"{origin}/echo?after={i}") for i in range(10)] == [200] * 10
    app.wait_records(20)
    assert scrape(app)[REQUESTS_200] == 20       # the dead worker's count is still in the total


def test_sighup_and_sigusr1_reach_every_worker(make_appliance, origin):
    app = make_appliance(workers=2, rules='[[rule]]\nname = "nobody"\naction = "deny"\n')
    pids = all_ready(app, 2)
    assert {get(app, f"{origin}/echo") for _ in range(10)} == {403}
    text = app.config_path.read_text()
    app.config_path.write_text(text.replace('action = "deny"', 'action = "allow"'))
    os.kill(app.proc.pid, signal.SIGHUP)
    for pid in pids.values():
        wait_for(lambda: f"appliance.server[{pid}]: config reloaded" in app.proc.output(),
                 f"worker pid {pid} reloaded", app)
    assert {get(app, f"{origin}/echo") for _ in range(20)} == {200}
    app.config_path.write_text(text.replace('action = "deny"', 'action = "maybe"'))
    os.kill(app.proc.pid, signal.SIGHUP)
    for pid in pids.values():                    # each worker refuses it and keeps its config
        wait_for(lambda: re.search(rf"\[{pid}\]: reload refused", app.proc.output()),
                 f"worker pid {pid} refused the bad config", app)
    assert {get(app, f"{origin}/echo") for _ in range(20)} == {200}
    rotated = app.access_log.with_name("access.log.1")     # logrotate: move, then USR1
    app.wait_records(50)
    app.access_log.rename(rotated)
    os.kill(app.proc.pid, signal.SIGUSR1)
    for pid in pids.values():
        wait_for(lambda: open_files(pid) & {app.access_log, rotated} == {app.access_log},
                 f"worker pid {pid} reopened the access log", app)
    assert {get(app, f"{origin}/echo") for _ in range(20)} == {200}
    assert len(app.wait_records(20)) == 20                 # every worker writes the new file
    assert len(rotated.read_text().splitlines()) == 50     # and none the old one any more


def open_files(pid: int) -> set[Path]:
    try:
        return {Path(os.readlink(fd)) for fd in Path(f"/proc/{pid}/fd").iterdir()}
    except OSError:
        return set()


def test_sigterm_stops_every_worker_and_exits_0(make_appliance, origin):
    app = make_appliance(workers=2)
    pids = all_ready(app, 2)
    assert get(app, f"{origin}/echo") == 200
    assert app.stop() == 0
    for index, pid in pids.items():
        assert f"worker {index} (pid {pid}) stopped: exit status 0" in app.proc.output()
        assert not alive(pid)
    assert not listeners_of(app.http_port)


def test_workers_do_not_outlive_their_supervisor(make_appliance, origin):
    app = make_appliance(workers=2)
    pids = all_ready(app, 2)
    os.kill(app.proc.pid, signal.SIGKILL)           # no chance to forward anything
    app.proc.popen.wait(10)
    for pid in pids.values():
        wait_for(lambda: not alive(pid), f"orphaned worker pid {pid} gone", app)
    assert "the supervisor" in app.proc.output() and "is gone: stopping" in app.proc.output()
    assert not listeners_of(app.http_port)


def test_a_worker_that_cannot_start_makes_run_exit_1(tmp_path):
    app = Appliance(tmp_path / "app", workers=2)
    taken = socket.socket()                  # the http port, held without SO_REUSEPORT
    taken.bind(("127.0.0.1", app.http_port))
    taken.listen(1)
    try:
        with pytest.raises(RuntimeError, match="appliance exited"):
            app.start()
        assert app.proc.popen.wait(30) == 1
        output = app.proc.output()
        assert "Address already in use" in output and "cannot start: worker" in output
        for pid in started_workers(app).values():
            assert not alive(pid)
    finally:
        taken.close()
        app.stop()
