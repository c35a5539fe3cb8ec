"""appliance.supervisor: restart policy and bookkeeping as plain values, the supervision loop with
stand-in workers (tiny Python scripts), and whole-appliance metrics from several processes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from appliance.config import load
from appliance.supervisor import (
    READY_ENV,
    Backoff,
    Slot,
    Supervisor,
    WorkerSettings,
    describe_exit,
    needs_ca,
    shares_ports,
)

REPO = Path(__file__).resolve().parents[1]


# --- restart policy -----------------------------------------------------------------------------

def test_backoff_doubles_while_workers_die_young_and_stops_at_the_bound():
    backoff = Backoff(first=1.0, most=30.0, stable_after=10.0)
    delays, previous = [], None
    for _ in range(8):
        previous = backoff.delay(previous, lifetime=0.5)
        delays.append(previous)
    assert delays == [1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0, 30.0]


def test_backoff_starts_over_after_a_worker_lived_long_enough():
    backoff = Backoff(first=1.0, most=30.0, stable_after=10.0)
    assert backoff.delay(16.0, lifetime=10.0) == 1.0
    assert backoff.delay(16.0, lifetime=9.9) == 30.0
    assert backoff.delay(None, lifetime=0.0) == 1.0


@pytest.mark.parametrize("code, text", [(0, "exit status 0"), (1, "exit status 1"),
                                        (-9, "killed by SIGKILL"), (-15, "killed by SIGTERM"),
                                        (-200, "killed by signal 200")])
def test_describe_exit(code, text):
    assert describe_exit(code) == text


# --- a worker's place ---------------------------------------------------------------------------

class FakeProcess:
    pid = 4242


def test_a_first_start_that_never_got_ready_means_the_appliance_cannot_start():
    slot = Slot(0)
    slot.launched(FakeProcess(), 7, now=100.0)
    assert slot.exited(now=100.5, backoff=Backoff()) is None
    assert slot.restart_at is None and slot.process is None


def test_a_worker_that_was_ready_is_restarted_later_and_later_while_it_keeps_dying():
    slot, backoff = Slot(1), Backoff(first=1.0, most=30.0, stable_after=10.0)
    slot.launched(FakeProcess(), 7, now=0.0)
    slot.became_ready()
    assert slot.exited(now=100.0, backoff=backoff) == 1.0     # lived long: the first delay
    assert slot.restart_at == 101.0 and not slot.ready
    slot.launched(FakeProcess(), 8, now=101.0)                # the restart never gets ready:
    assert slot.exited(now=102.0, backoff=backoff) == 2.0     # not fatal, only later
    slot.launched(FakeProcess(), 9, now=104.0)
    assert slot.exited(now=105.0, backoff=backoff) == 4.0
    assert slot.starts == 3


def test_signals_for_a_starting_worker_wait_until_it_is_ready():
    slot = Slot(0)
    slot.launched(FakeProcess(), 7, now=0.0)
    slot.pending.append(signal.SIGHUP)
    assert slot.became_ready() == [signal.SIGHUP]
    assert slot.pending == [] and slot.ready and slot.ever_ready


# --- what a worker is told ----------------------------------------------------------------------

def test_worker_settings_travel_in_the_environment(tmp_path):
    settings = WorkerSettings(3, 1234, tmp_path / "status", tmp_path / "metrics", ready_fd=9)
    env = settings.environ()
    assert env["PROMETHEUS_MULTIPROC_DIR"] == str(tmp_path / "metrics")
    assert WorkerSettings.from_environ(env) == settings
    assert shares_ports(env)
    assert WorkerSettings.from_environ({}) is None and not shares_ports({})
    without_pipe = WorkerSettings(0, 1, tmp_path, tmp_path)
    assert READY_ENV not in without_pipe.environ()
    assert WorkerSettings.from_environ(without_pipe.environ()) == without_pipe


def config_file(tmp_path: Path, listen: str, rules: str = "", workers: int = 2):
    path = tmp_path / "appliance.toml"
    path.write_text(f'[appliance]\nstate_dir = "var"\nworkers = {workers}\n\n[listen]\n{listen}\n\n'
                    f'[[rule]]\naction = "allow"\nsrc = ["127.0.0.0/8"]\n{rules}\n')
    return load(path)


@pytest.mark.parametrize("listen, rules, wanted", [
    ('http = "127.0.0.1:3128"', "", False),
    ('http = "127.0.0.1:3128"\npac = "127.0.0.1:8080"', "", True),
    ('https = "127.0.0.1:8443"', "", True),
    ('transparent_tls = "127.0.0.1:3130"', "", True),
    ('http = "127.0.0.1:3128"', '\n[[rule]]\naction = "intercept"\nsrc = ["10.0.0.0/8"]\n', True),
])
def test_the_ca_is_made_up_front_only_when_workers_will_use_it(tmp_path, listen, rules, wanted):
    assert needs_ca(config_file(tmp_path, listen, rules)) is wanted


# --- the loop, with stand-in workers ------------------------------------------------------------

STAND_IN = textwrap.dedent("""
    import os, signal, sys, time
    from pathlib import Path
    here = Path(sys.argv[1])
    index = os.environ["APPLIANCE_WORKER"]
    log = here / f"worker{index}.log"
    def note(what):
        with open(log, "a") as f:
            f.write(f"{os.getpid()} {what}\\n")
    signal.signal(signal.SIGHUP, lambda *a: note("HUP"))
    signal.signal(signal.SIGTERM, lambda *a: (note("TERM"), sys.exit(0)))
    note("start")
    if (here / f"fail{index}").exists():
        sys.exit(3)                                 # cannot start
    os.write(int(os.environ["APPLIANCE_READY_FD"]), b"r")
    crash = here / f"crash{index}"
    if crash.exists():                              # dies once, after it was ready
        crash.unlink()
        time.sleep(0.2)
        os._exit(5)
    for _ in range(600):
        time.sleep(0.1)
""")


def stand_in_supervisor(tmp_path: Path, workers: int = 2) -> Supervisor:
    script = tmp_path / "stand_in.py"
    script.write_text(STAND_IN)
    config = config_file(tmp_path, 'http = "127.0.0.1:3128"', workers=workers)
    return Supervisor(config, str(config.path), Backoff(first=0.1, most=0.4, stable_after=5.0),
                      command=[sys.executable, str(script), str(tmp_path)])


def drive(supervisor: Supervisor, steps) -> tuple[int, list]:
    """Run the supervisor here (signal handlers need the main thread) while `steps` runs in a
    thread against it; the thread always ends with SIGTERM to us, so `run` returns."""
    failures = []

    def script():
        try:
            steps()
        except BaseException as exc:           # reported by the test, after the run
            failures.append(exc)
        finally:
            if signal.getsignal(signal.SIGTERM) == supervisor._note:     # never pytest's own
                os.kill(os.getpid(), signal.SIGTERM)
    thread = threading.Thread(target=script, daemon=True)
    thread.start()
    code = supervisor.run()
    thread.join(10)
    return code, failures


def until(predicate, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    for _ in range(int(timeout / 0.02) + 1):
        if predicate():
            return
        if time.monotonic() > deadline:
            break
        time.sleep(0.02)
    raise AssertionError("condition not met in time")


def lines(tmp_path: Path, index: int) -> list[str]:
    path = tmp_path / f"worker{index}.log"
    return path.read_text().splitlines() if path.exists() else []


def test_a_worker_that_dies_is_restarted_and_signals_reach_every_worker(tmp_path):
    (tmp_path / "crash1").touch()
    supervisor = stand_in_supervisor(tmp_path)
    pids = []

    def steps():
        until(lambda: supervisor.slots[1].starts == 2 and supervisor.slots[1].ready)
        until(lambda: all(slot.ready for slot in supervisor.slots))
        pids.extend(slot.pid for slot in supervisor.slots)
        os.kill(os.getpid(), signal.SIGHUP)
        until(lambda: all(f"{pid} HUP" in lines(tmp_path, i) for i, pid in enumerate(pids)))

    code, failures = drive(supervisor, steps)
    assert not failures, failures
    assert code == 0
    assert [line.split()[1] for line in lines(tmp_path, 0)] == ["start", "HUP", "TERM"]
    assert [line.split()[1] for line in lines(tmp_path, 1)] == ["start", "start", "HUP", "TERM"]
    assert all(slot.process is None for slot in supervisor.slots)
    for pid in pids:                          # reaped: nothing of them is left
        assert not Path(f"/proc/{pid}").exists()


def test_a_worker_that_cannot_start_stops_the_appliance_with_status_1(tmp_path):
    (tmp_path / "fail1").touch()
    supervisor = stand_in_supervisor(tmp_path)
    started = time.monotonic()
    code = supervisor.run()                   # returns by itself: no signal needed
    assert code == 1
    assert time.monotonic() - started < 10
    assert all(slot.process is None for slot in supervisor.slots)
    assert lines(tmp_path, 1) == [lines(tmp_path, 1)[0]]        # started once, never again


def test_the_run_directories_start_empty(tmp_path):
    supervisor = stand_in_supervisor(tmp_path, workers=2)
    stale = supervisor.metrics_dir / "counter_1.db"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"old")
    code, failures = drive(supervisor, lambda: until(
        lambda: all(slot.ready for slot in supervisor.slots)))
    assert (code, failures) == (0, [])
    assert not stale.exists() and supervisor.status_dir.is_dir()


# --- metrics of the whole appliance -------------------------------------------------------------

COUNTING = textwrap.dedent("""
    import os, sys
    from appliance.observe import AccessRecord, AccessLog, Observer
    observer = Observer(AccessLog(os.devnull))
    for _ in range(int(sys.argv[1])):
        observer.connection_opened("http")
        observer.finish(AccessRecord("http", "127.0.0.1", status=200))
    if sys.argv[2] == "close":
        observer.connection_closed("http")
    print(os.getpid())
""")


def test_metrics_sum_every_worker_and_live_gauges_forget_dead_ones(tmp_path):
    """Two processes count into PROMETHEUS_MULTIPROC_DIR; a third renders the sum. Run with the
    interpreter under test, so the newest prometheus_client and Debian's are both checked."""
    from prometheus_client import multiprocess
    metrics_dir = tmp_path / "metrics"
    metrics_dir.mkdir()
    env = dict(os.environ, PROMETHEUS_MULTIPROC_DIR=str(metrics_dir),
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    pids = []
    for count, close in ((3, "close"), (4, "keep")):
        done = subprocess.run([sys.executable, "-c", COUNTING, str(count), close], env=env,
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        pids.append(int(done.stdout))
    render = "from appliance.observe import Metrics; import sys; sys.stdout.write(Metrics().render().decode())"

    def scrape() -> dict:
        done = subprocess.run([sys.executable, "-c", render], env=env, capture_output=True,
                              text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        return {(s.name, tuple(sorted(s.labels.items()))): s.value
                for family in text_string_to_metric_families(done.stdout) for s in family.samples}

    values = scrape()
    assert values[("appliance_requests_total", (("listener", "http"), ("status", "200")))] == 7
    assert values[("appliance_connections_total", (("listener", "http"),))] == 7
    assert values[("appliance_request_duration_seconds_count", (("listener", "http"),))] == 7
    assert values[("appliance_active_connections", (("listener", "http"),))] == 2 + 4
    assert values[("appliance_build_info", (("version", __import__("appliance").__version__),))] == 1
    for pid in pids:                  # both have exited: as the supervisor does for dead workers
        multiprocess.mark_process_dead(pid, str(metrics_dir))
    values = scrape()
    assert values[("appliance_requests_total", (("listener", "http"), ("status", "200")))] == 7
    assert values.get(("appliance_active_connections", (("listener", "http"),)), 0) == 0
