"""Headless Chromium for the end-to-end tests: its flags, a $HOME that trusts our CAs, stopping it.

Every run gets all of tests/e2e/chromium/flags.txt (they keep Chromium's own background traffic
off), a fresh --user-data-dir, and a temporary $HOME whose NSS db ($HOME/.pki/nssdb, made with
certutil) trusts the CAs a test names, never --ignore-certificate-errors. Chromium runs in a
session of its own, so it and its helpers (zygote, renderer, network service) are stopped through
its PID and process group.
"""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

from .conftest import HERE, child_env, require_tool

FLAGS_FILE = HERE / "chromium" / "flags.txt"
FLAGS = [line.strip() for line in FLAGS_FILE.read_text().splitlines()
         if line.strip() and not line.startswith("#")]
RESOLVER_RULES = "--host-resolver-rules="


def flags(resolver_excludes: tuple[str, ...] = ()) -> list[str]:
    """FLAGS, with `resolver_excludes` added as EXCLUDE entries to the one --host-resolver-rules
    flag: Chromium keeps only the last such flag, so extra names go into it, not into a second."""
    if not resolver_excludes:
        return list(FLAGS)
    rules = [flag for flag in FLAGS if flag.startswith(RESOLVER_RULES)]
    assert len(rules) == 1, f"{FLAGS_FILE} should have one {RESOLVER_RULES} flag, not {rules}"
    merged = rules[0] + "".join(f" , EXCLUDE {name}" for name in resolver_excludes)
    return [merged if flag == rules[0] else flag for flag in FLAGS]


def nss_home(home: Path, cas: dict[str, Path]) -> Path:
    """A $HOME whose NSS db ($HOME/.pki/nssdb) trusts `cas` (nickname → PEM) to issue server certs."""
    certutil = require_tool("certutil")
    db = home / ".pki" / "nssdb"
    db.mkdir(parents=True)
    env = {**child_env(), "HOME": str(home)}
    commands = [[certutil, "-N", "--empty-password", "-d", f"sql:{db}"]]
    commands += [[certutil, "-A", "-n", name, "-t", "C,,", "-i", str(pem), "-d", f"sql:{db}"]
                 for name, pem in cas.items()]
    for command in commands:
        r = subprocess.run(command, capture_output=True, text=True, timeout=30, env=env,
                           stdin=subprocess.DEVNULL)
        assert r.returncode == 0, f"{command}: {r.stdout}{r.stderr}"
    return home


def chromium_executable() -> str:
    """Debian's /usr/bin/chromium is a shell launcher adding flags of its own (extensions among
    them); chromium-flags.txt is written for the binary it execs, so run that when it is there."""
    launcher = require_tool("chromium")
    binary = Path("/usr/lib/chromium/chromium")
    return str(binary) if binary.is_file() and os.access(binary, os.X_OK) else launcher


def browser_env(home: Path, base: dict | None = None) -> dict:
    """The environment for Chromium: `base` (default: child_env()) with $HOME and the XDG
    folders in `home`, and no $DISPLAY."""
    env = {**(child_env() if base is None else base), "HOME": str(home),
           "XDG_CONFIG_HOME": str(home / ".config"), "XDG_CACHE_HOME": str(home / ".cache")}
    env.pop("DISPLAY", None)
    return env


def stop_chromium(proc: subprocess.Popen) -> None:
    """TERM, then KILL, by its PID; then whatever is left in its process group (its helpers).
    Chromium must have been started with start_new_session=True, so the group is its own."""
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(5)
    try:
        os.killpg(proc.pid, signal.SIGKILL)      # helpers left behind in its process group
    except ProcessLookupError:
        pass
