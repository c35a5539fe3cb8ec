"""Worker processes: with `[appliance] workers` > 1, `appliance run` supervises that many workers.

Where it sits: above the data path. The `Supervisor` is a plain process (no gevent hub, no
listener): it makes what workers must not race to create (the CA, the https listener's
certificate, `state_dir/run`), then re-executes `python -m appliance run` once per worker. A worker
is an ordinary `ApplianceServer` whose listening sockets, TCP and the DNS responder's UDP and TCP,
set SO_REUSEPORT (`shares_ports`), so the kernel spreads connections over the workers. Each worker
finds in its environment (`WorkerSettings`) its index, the status snapshot directory,
PROMETHEUS_MULTIPROC_DIR (so /metrics on any worker sums them all, see `observe.Metrics`), and a
pipe on which it says "ready" once every listener accepts.

Signals: HUP (each worker re-reads and validates the config; an invalid one is refused by each)
and USR1 are forwarded, to a worker still starting once it is ready; TERM and INT are forwarded
and the supervisor waits for every worker to drain, then exits 0. A worker that dies otherwise is
logged (pid, exit status or signal) and restarted after `Backoff` (1 s, doubling up to 30 s while
it keeps dying young). A worker whose first start never got ready means the appliance cannot
start: the others are stopped and `run` exits 1, as it does with one process.

Why re-execute rather than fork: a fresh interpreter inherits no gevent hub, no prometheus_client
value class (chosen from the environment when it is imported) and no half-built server state.
"""

from __future__ import annotations

import logging
import os
import select
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

from certs import CAError

from . import systemd_notify
from .config import Config, ConfigErrors, load
from .observe import Metrics

log = logging.getLogger("appliance.supervisor")

WORKER_ENV = "APPLIANCE_WORKER"             # the worker's index; its listeners share their ports
SUPERVISOR_ENV = "APPLIANCE_SUPERVISOR"     # the supervisor's pid: a worker outliving it stops
STATUS_ENV = "APPLIANCE_STATUS_DIR"         # where the worker leaves its status snapshots
READY_ENV = "APPLIANCE_READY_FD"            # the pipe the worker writes READY to
READY = b"r"
FORWARDED = (signal.SIGHUP, signal.SIGUSR1)
STOPPING = (signal.SIGTERM, signal.SIGINT)
STOP_GRACE = 5.0              # seconds beyond the drain timeout before a worker is killed
READY_WITHIN = 120.0          # a worker that is not ready by then never says so
POLL_SECONDS = 1.0            # the longest the supervisor sleeps without looking at its workers


def shares_ports(environ: Mapping[str, str] = os.environ) -> bool:
    """Whether this process is one of the supervisor's workers, whose listeners share ports."""
    return WORKER_ENV in environ


@dataclass(frozen=True)
class WorkerSettings:
    """What the supervisor tells a worker, through its environment."""

    index: int
    supervisor: int               # pid
    status_dir: Path
    metrics_dir: Path
    ready_fd: int | None = None

    def environ(self) -> dict[str, str]:
        env = {WORKER_ENV: str(self.index), SUPERVISOR_ENV: str(self.supervisor),
               STATUS_ENV: str(self.status_dir), Metrics.MULTIPROC_ENV: str(self.metrics_dir)}
        if self.ready_fd is not None:
            env[READY_ENV] = str(self.ready_fd)
        return env

    @classmethod
    def from_environ(cls, environ: Mapping[str, str]) -> WorkerSettings | None:
        """The settings of this worker; None in a process the supervisor did not start."""
        if WORKER_ENV not in environ:
            return None
        fd = environ.get(READY_ENV)
        return cls(int(environ[WORKER_ENV]), int(environ[SUPERVISOR_ENV]),
                   Path(environ[STATUS_ENV]), Path(environ[Metrics.MULTIPROC_ENV]),
                   int(fd) if fd else None)


@dataclass(frozen=True)
class Backoff:
    """Delay before restarting a worker: `first`, doubled for each worker that died younger than
    `stable_after`, up to `most`; a worker that had lived longer starts the count over."""

    first: float = 1.0
    most: float = 30.0
    stable_after: float = 10.0

    def delay(self, previous: float | None, lifetime: float) -> float:
        if previous is None or lifetime >= self.stable_after:
            return self.first
        return min(previous * 2, self.most)


def describe_exit(returncode: int) -> str:
    """`exit status 3` or `killed by SIGKILL`, from a Popen returncode."""
    if returncode >= 0:
        return f"exit status {returncode}"
    try:
        return f"killed by {signal.Signals(-returncode).name}"
    except ValueError:
        return f"killed by signal {-returncode}"


@dataclass
class Slot:
    """One worker's place: the process in it now, and what its restarts depend on."""

    index: int
    process: subprocess.Popen | None = None
    ready_pipe: int | None = None        # our end of the worker's READY pipe
    started: float = 0.0                 # time.monotonic() at the last start
    starts: int = 0
    ready: bool = False
    ever_ready: bool = False
    delay: float | None = None           # the last restart delay
    restart_at: float | None = None
    pending: list[int] = field(default_factory=list)   # signals for when it is ready

    @property
    def pid(self) -> int | None:
        return None if self.process is None else self.process.pid

    def launched(self, process: subprocess.Popen, ready_pipe: int, now: float) -> None:
        self.process, self.ready_pipe, self.started = process, ready_pipe, now
        self.starts += 1
        self.ready, self.restart_at = False, None

    def became_ready(self) -> list[int]:
        """Mark it ready; returns the signals held back while it started."""
        self.ready = self.ever_ready = True
        pending, self.pending = self.pending, []
        return pending

    def exited(self, now: float, backoff: Backoff) -> float | None:
        """The worker in it ended unasked: the delay before the next start, or None when this
        was the first start and it never got ready (the appliance cannot start)."""
        lifetime = now - self.started
        self.process, self.ready, self.pending = None, False, []
        if self.starts == 1 and not self.ever_ready:
            return None
        self.delay = backoff.delay(self.delay, lifetime)
        self.restart_at = now + self.delay
        return self.delay


def needs_ca(config: Config) -> bool:
    """Whether the workers will load the CA: to serve it (pac), to mint the https listener's
    certificate, or to intercept."""
    return bool(config.listen.pac or config.listen.transparent_tls
                or (config.listen.https and config.tls.cert is None)
                or any(rule.action == "intercept" for rule in config.rules))


def prepare_shared_files(config: Config) -> None:
    """Create, in this one process, what every worker reads and none may create on its own:
    the CA and the https listener's certificate (created now, or checked and renewed)."""
    from datetime import datetime, timezone

    from certs import CertificateAuthority

    from .frontends.tls import listener_certificate
    if needs_ca(config):
        CertificateAuthority.load_or_create(config.appliance.state_dir, datetime.now(timezone.utc),
                                            key_type=config.ca.key_type)
    if config.listen.https:
        listener_certificate(config)


def fresh_directory(path: Path) -> Path:
    """`path`, emptied (what a previous run left there is stale)."""
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    return path


class Supervisor:
    """Starts `config.appliance.workers` workers, restarts those that die, forwards signals."""

    def __init__(self, config: Config, config_path: str, backoff: Backoff = Backoff(),
                 command: list[str] | None = None) -> None:
        self.config = config
        self.config_path = os.path.abspath(config_path)
        self.backoff = backoff
        self.command = command or [sys.executable, "-m", "appliance", "run",
                                   "--config", self.config_path]
        run_dir = config.appliance.state_dir / "run"
        self.status_dir, self.metrics_dir = run_dir / "status", run_dir / "metrics"
        self.slots = [Slot(index) for index in range(config.appliance.workers)]
        self._signals: list[int] = []
        self._stop_deadline: float | None = None    # set once stopping: then stragglers are killed
        self._result = 0
        self._announced = False

    # --- the loop ---------------------------------------------------------------------------

    def run(self) -> int:
        """Serve until TERM/INT and every worker has drained: 0; 1 when a worker could not
        start or had to be killed. Raises OSError or CAError when the shared files cannot be made."""
        fresh_directory(self.status_dir)
        fresh_directory(self.metrics_dir)
        prepare_shared_files(self.config)
        wake_read, wake_write = os.pipe()
        os.set_blocking(wake_read, False)
        os.set_blocking(wake_write, False)
        previous = self._catch_signals(wake_write)
        try:
            log.info("starting %d workers", len(self.slots))
            for slot in self.slots:
                self._start(slot)
            while not self._done():
                self._wait(wake_read)
                self._step()
            return self._result
        finally:
            self._kill_all()
            signal.set_wakeup_fd(-1)
            for signum, handler in previous.items():
                signal.signal(signum, handler)
            os.close(wake_read)
            os.close(wake_write)

    def _catch_signals(self, wake_write: int) -> dict[int, object]:
        previous = {}
        for signum in (*FORWARDED, *STOPPING, signal.SIGCHLD):
            previous[signum] = signal.signal(signum, self._note)
        signal.set_wakeup_fd(wake_write)        # a signal ends the select() of `_wait` at once
        return previous

    def _note(self, signum: int, _frame) -> None:
        self._signals.append(signum)

    def _wait(self, wake_read: int) -> None:
        pipes = [slot.ready_pipe for slot in self.slots if slot.ready_pipe is not None]
        readable, _, _ = select.select([wake_read, *pipes], [], [], self._timeout())
        if wake_read in readable:
            try:
                os.read(wake_read, 512)
            except BlockingIOError:
                pass
        for slot in self.slots:
            if slot.ready_pipe in readable:
                self._read_ready(slot)

    def _timeout(self) -> float:
        now = time.monotonic()
        due = [slot.restart_at for slot in self.slots if slot.restart_at is not None]
        if self._stop_deadline is not None:
            due.append(self._stop_deadline)
        return max(0.0, min([now + POLL_SECONDS, *due]) - now)

    def _step(self) -> None:
        signals, self._signals = self._signals, []
        for signum in signals:
            if signum in STOPPING:
                self._stop(f"{signal.Signals(signum).name} received")
            elif signum == signal.SIGHUP:
                self._reload()
                self._forward(signum)
            elif signum in FORWARDED:
                self._forward(signum)
        for slot in self.slots:
            if slot.process is not None and slot.process.poll() is not None:
                self._ended(slot)
        now = time.monotonic()
        if self._stop_deadline is None:
            for slot in self.slots:
                if slot.restart_at is not None and slot.restart_at <= now:
                    self._restart(slot)
        elif now >= self._stop_deadline:
            self._kill_all()

    def _done(self) -> bool:
        return self._stop_deadline is not None and all(s.process is None for s in self.slots)

    # --- workers ----------------------------------------------------------------------------

    def _start(self, slot: Slot) -> None:
        """Start a worker in `slot`; OSError when even the process cannot be made."""
        read_end, write_end = os.pipe()
        settings = WorkerSettings(slot.index, os.getpid(), self.status_dir, self.metrics_dir,
                                  write_end)
        try:
            process = subprocess.Popen(self.command, env=self._environ(settings),
                                       pass_fds=(write_end,), stdin=subprocess.DEVNULL)
        except OSError:
            os.close(read_end)
            raise
        finally:
            os.close(write_end)
        slot.launched(process, read_end, time.monotonic())
        log.info("worker %d started (pid %d)", slot.index, process.pid)

    def _environ(self, settings: WorkerSettings) -> dict[str, str]:
        """Ours, plus the worker's settings; our packages importable wherever we were started."""
        env = dict(os.environ, **settings.environ())
        home = str(Path(__file__).resolve().parents[1])     # holds appliance/, pac/, certs/
        env["PYTHONPATH"] = os.pathsep.join(p for p in (home, env.get("PYTHONPATH")) if p)
        return env

    def _restart(self, slot: Slot) -> None:
        try:
            prepare_shared_files(self.config)      # a renewed certificate, made here, not there
        except (CAError, OSError, ValueError) as exc:   # the worker will fail on it, and be retried
            log.error("worker %d: shared files: %s", slot.index, exc)
        try:
            self._start(slot)
        except OSError as exc:
            log.error("worker %d: cannot start %s: %s", slot.index, self.command[0], exc)
            slot.restart_at = time.monotonic() + self.backoff.most

    def _read_ready(self, slot: Slot) -> None:
        try:
            data = os.read(slot.ready_pipe, 64)
        except OSError:
            data = b""
        if READY in data and not slot.ready:
            log.info("worker %d (pid %d) ready", slot.index, slot.pid)
            for signum in slot.became_ready():
                slot.process.send_signal(signum)
            if not self._announced and all(s.ready for s in self.slots):
                self._announced = True
                log.info("all %d workers ready", len(self.slots))
                systemd_notify.ready()            # Type=notify: the supervisor speaks for all
        if not data:                                # the worker closed it, or ended
            self._close_pipe(slot)

    def _close_pipe(self, slot: Slot) -> None:
        if slot.ready_pipe is not None:
            os.close(slot.ready_pipe)
            slot.ready_pipe = None

    def _ended(self, slot: Slot) -> None:
        pid, how = slot.pid, describe_exit(slot.process.returncode)
        self._close_pipe(slot)
        self._forget(pid)
        if self._stop_deadline is not None:
            slot.process = None
            log.info("worker %d (pid %d) stopped: %s", slot.index, pid, how)
            return
        delay = slot.exited(time.monotonic(), self.backoff)
        if delay is None:
            log.error("cannot start: worker %d (pid %d) ended before it was ready: %s",
                      slot.index, pid, how)
            self._result = 1
            self._stop("a worker could not start")
        else:
            log.error("worker %d (pid %d) died: %s; restarting it in %gs", slot.index, pid, how, delay)

    def _forget(self, pid: int) -> None:
        """A dead worker's live gauges leave the sums; its counters stay in the totals."""
        from prometheus_client import multiprocess
        try:
            multiprocess.mark_process_dead(pid, str(self.metrics_dir))
        except OSError as exc:
            log.warning("metrics of worker pid %d: %s", pid, exc)

    # --- signals ----------------------------------------------------------------------------

    def _forward(self, signum: int) -> None:
        for slot in self.slots:
            if slot.process is None:
                continue                          # a restart reads the config afresh anyway
            if slot.ready:
                slot.process.send_signal(signum)
            elif signum not in slot.pending:      # its handlers are not installed yet
                slot.pending.append(signum)

    def _reload(self) -> None:
        """Our own copy of the config, for the shared files and restarts; each worker validates
        and applies the file on its own (and keeps its config when the file is invalid)."""
        try:
            config = load(self.config_path)
        except ConfigErrors:
            log.error("reload: %s is invalid; the workers keep their config", self.config_path)
            return
        if config.appliance.workers != len(self.slots):
            log.warning("reload: workers = %d needs a restart; %d keep running",
                        config.appliance.workers, len(self.slots))
        self.config = config
        try:
            prepare_shared_files(config)
        except (CAError, OSError, ValueError) as exc:
            log.error("reload: shared files: %s", exc)
        log.info("reload: forwarding SIGHUP to the workers")

    def _stop(self, reason: str) -> None:
        if self._stop_deadline is not None:
            return
        drain = self.config.limits.drain_timeout
        self._stop_deadline = time.monotonic() + drain + STOP_GRACE
        log.info("stopping (%s): workers drain for up to %gs", reason, drain)
        for slot in self.slots:
            slot.restart_at = None
            if slot.process is not None:
                slot.process.send_signal(signal.SIGTERM)

    def _kill_all(self) -> None:
        """Whatever still runs past the drain deadline (or after an error here) is killed."""
        for slot in self.slots:
            if slot.process is not None and slot.process.poll() is None:
                log.error("worker %d (pid %d) still running: killing it", slot.index, slot.pid)
                slot.process.kill()
                slot.process.wait(5)
                self._result = 1


# --- the worker's side -------------------------------------------------------------------------

def attend(server, settings: WorkerSettings) -> None:
    """In a worker, beside `server.serve_forever()`: say READY once every listener accepts, and
    stop (drain) when the supervisor is gone, so no orphan keeps the ports."""
    import gevent
    if settings.ready_fd is not None:
        gevent.spawn(_say_ready, server, settings.ready_fd)
    gevent.spawn(_watch_supervisor, settings.supervisor)


def _say_ready(server, fd: int) -> None:
    import gevent
    try:
        for _ in range(int(READY_WITHIN / 0.05)):
            if server.ready:
                os.write(fd, READY)
                return
            gevent.sleep(0.05)
        log.error("not ready after %gs", READY_WITHIN)
    finally:
        os.close(fd)


def _watch_supervisor(supervisor: int) -> None:
    """Runs as long as the worker does: a watchdog, once a second."""
    import gevent
    while os.getppid() == supervisor:
        gevent.sleep(1.0)
    log.error("the supervisor (pid %d) is gone: stopping", supervisor)
    os.kill(os.getpid(), signal.SIGTERM)
