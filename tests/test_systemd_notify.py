"""appliance.systemd_notify: the sd_notify(3) datagrams the Debian unit's Type=notify waits for."""

from __future__ import annotations

import os
import socket
import tempfile
from pathlib import Path

import pytest

from appliance import systemd_notify
from appliance.supervisor import WORKER_ENV


@pytest.fixture
def receiver(monkeypatch):
    """A datagram socket standing in for systemd's, named by NOTIFY_SOCKET."""
    monkeypatch.delenv(WORKER_ENV, raising=False)
    with tempfile.TemporaryDirectory() as folder:
        path = str(Path(folder) / "notify")
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.bind(path)
            sock.settimeout(5)
            monkeypatch.setenv("NOTIFY_SOCKET", path)
            yield sock


def test_ready_sends_ready_and_status(receiver):
    assert systemd_notify.ready("5 listeners")
    assert receiver.recv(4096) == b"READY=1\nSTATUS=5 listeners"


def test_reloading_and_stopping(receiver):
    assert systemd_notify.reloading() and systemd_notify.ready() and systemd_notify.stopping()
    assert [receiver.recv(4096) for _ in range(3)] == [b"RELOADING=1", b"READY=1", b"STOPPING=1"]


def test_abstract_socket_name(monkeypatch):
    monkeypatch.delenv(WORKER_ENV, raising=False)
    name = f"appliance-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(b"\0" + name.encode())
        sock.settimeout(5)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert systemd_notify.ready()
        assert sock.recv(4096) == b"READY=1"


def test_nothing_outside_systemd(monkeypatch):
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert not systemd_notify.ready()
    monkeypatch.setenv("NOTIFY_SOCKET", "relative/path")       # not a socket name systemd gives
    assert not systemd_notify.ready()


def test_a_worker_leaves_it_to_the_supervisor(receiver, monkeypatch):
    monkeypatch.setenv(WORKER_ENV, "0")
    assert not systemd_notify.ready()
    receiver.settimeout(0.2)
    with pytest.raises(socket.timeout):
        receiver.recv(4096)


def test_a_vanished_manager_is_logged_not_raised(monkeypatch, tmp_path, caplog):
    monkeypatch.delenv(WORKER_ENV, raising=False)
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "gone"))
    assert not systemd_notify.ready()
    assert "could not notify systemd" in caplog.text
