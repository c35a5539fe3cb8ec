"""Operating the appliance: reloads and stops that lose nothing, limits that answer clearly,
logs that cannot be written, and the admin listener's password."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import threading
import time

import pytest
import websockets
from python_socks.async_.asyncio import Proxy as AsyncProxy

from h2.settings import SettingCodes

from appliance.protocols.proxy_auth import hash_password

from .conftest import Appliance, curl, free_port, raw_exchange, read_to_eof
from .h2_raw_client import H2RawClient


def metric(app: Appliance, name: str) -> float:
    status, text = app.admin_get("/metrics")
    assert status == 200
    found = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
    return float(found.group(1)) if found else 0.0


def test_a_full_disk_under_the_access_log_never_stops_proxying(tmp_path, origin):
    """/dev/full answers every write with ENOSPC, as a full disk does."""
    app = Appliance(tmp_path / "app")
    os.symlink("/dev/full", app.access_log)
    app.start()
    try:
        for i in range(3):
            r = curl("-x", app.proxy, f"{origin}/echo?full={i}")
            assert r.returncode == 0 and b'"full"' in r.stdout
        assert metric(app, "appliance_access_log_write_failures_total") >= 3
        assert metric(app, 'appliance_requests_total{listener="http",status="200"}') >= 3
        assert "access log" in app.proc.output() and "cannot write" in app.proc.output()
    finally:
        app.stop()


# --- reload -------------------------------------------------------------------------------------

def sighup_and_wait(app: Appliance, what: str = "config reloaded") -> None:
    """SIGHUP the appliance (by its PID) and wait for its log to say `what` once more."""
    before = app.proc.output().count(what)
    os.kill(app.proc.pid, signal.SIGHUP)
    deadline = time.monotonic() + 10
    for _ in range(400):
        if app.proc.output().count(what) > before or time.monotonic() > deadline:
            break
        time.sleep(0.025)
    assert app.proc.output().count(what) > before, app.proc.output()[-2000:]


class SlowDownload(threading.Thread):
    """A large response read slowly through the proxy, so it is in flight for a while."""

    def __init__(self, app: Appliance, origin: str, size: int, pause: float = 0.02) -> None:
        super().__init__(daemon=True)
        self.app, self.url, self.size, self.pause = app, f"{origin}/bytes?n={size}", size, pause
        self.received, self.error, self.started_reading = 0, None, threading.Event()

    def run(self) -> None:
        try:
            with socket.create_connection(("127.0.0.1", self.app.http_port), timeout=20) as s:
                s.sendall(f"GET {self.url} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
                head = b""
                while b"\r\n\r\n" not in head:
                    head += s.recv(1)
                for _ in range(100000):
                    data = s.recv(65536)
                    if not data:
                        break
                    self.received += len(data)
                    self.started_reading.set()
                    time.sleep(self.pause)
        except OSError as exc:
            self.error = exc


async def _echo_until(ws, stop: threading.Event, counter: list) -> None:
    for i in range(2000):
        if stop.is_set():
            return
        await ws.send(f"m{i}")
        assert await ws.recv() == f"m{i}"
        counter[0] += 1
        await asyncio.sleep(0.01)


def test_reloads_keep_a_websocket_and_a_download_running_and_apply_the_new_policy(make_appliance, origin,
                                                                                  ws_origin):
    app = make_appliance()
    origin_port = int(origin.rsplit(":", 1)[1])
    download = SlowDownload(app, origin, 8 * 1024 * 1024)
    download.start()
    assert download.started_reading.wait(10)
    stop, echoed, outcome = threading.Event(), [0], {}

    def websocket_echo() -> None:
        async def run():
            sock = await AsyncProxy.from_url(app.proxy).connect("127.0.0.1", ws_origin, timeout=10)
            async with websockets.connect(f"ws://127.0.0.1:{ws_origin}/chat", sock=sock) as ws:
                await _echo_until(ws, stop, echoed)
        try:
            asyncio.run(asyncio.wait_for(run(), 60))
            outcome["ok"] = True
        except Exception as exc:                       # reported by the assertion below
            outcome["error"] = repr(exc)

    echo = threading.Thread(target=websocket_echo, daemon=True)
    echo.start()
    text = app.config_path.read_text()
    deny = f'\n[[rule]]\nname = "origin closed"\naction = "deny"\nports = [{origin_port}]\n'
    app.config_path.write_text(text + "\n[broken\n")                   # invalid: refused, kept
    os.kill(app.proc.pid, signal.SIGHUP)
    sighup_and_wait(app, "reload refused")
    app.config_path.write_text(text.replace("[[rule]]", deny.strip() + "\n\n[[rule]]", 1))
    sighup_and_wait(app)
    r = curl("-x", app.proxy, "-w", "%{http_code}", "-o", "/dev/null", f"{origin}/echo?after=reload")
    assert r.stdout == b"403"                                           # new requests: new policy
    app.config_path.write_text(text)
    sighup_and_wait(app)
    assert curl("-x", app.proxy, f"{origin}/echo?back=1").returncode == 0
    stop.set()
    echo.join(30)
    download.join(60)
    assert outcome.get("ok"), outcome
    assert echoed[0] > 0
    assert download.error is None and download.received == 8 * 1024 * 1024   # nothing lost


def test_reload_opens_and_closes_listeners(make_appliance, origin):
    app = make_appliance()
    extra_port = free_port()
    text = app.config_path.read_text()
    app.config_path.write_text(text.replace("[listen]\n", f'[listen]\nsocks5 = "127.0.0.1:{extra_port}"\n'))
    sighup_and_wait(app)
    r = curl("--socks5-hostname", f"127.0.0.1:{extra_port}", f"{origin}/echo?via=socks")
    assert r.returncode == 0 and b'"via": "socks"' in r.stdout
    app.config_path.write_text(text)
    sighup_and_wait(app)
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", extra_port), timeout=2).close()
    assert curl("-x", app.proxy, f"{origin}/echo").returncode == 0


# --- graceful stop ------------------------------------------------------------------------------

def test_sigterm_finishes_requests_in_flight_and_exits_zero(make_appliance, origin):
    app = make_appliance(extra="[limits]\ndrain_timeout = 20.0\n")
    download = SlowDownload(app, origin, 4 * 1024 * 1024, pause=0.01)
    download.start()
    assert download.started_reading.wait(10)
    os.kill(app.proc.pid, signal.SIGTERM)
    time.sleep(0.3)
    with pytest.raises(OSError):                                  # no longer accepting
        socket.create_connection(("127.0.0.1", app.http_port), timeout=2).close()
    download.join(30)
    assert download.error is None and download.received == 4 * 1024 * 1024
    assert app.proc.popen.wait(30) == 0


def test_sigterm_cuts_tunnels_after_the_drain_time(make_appliance, origin):
    app = make_appliance(extra="[limits]\ndrain_timeout = 1.0\n")
    sock = socket.create_connection(("127.0.0.1", app.http_port), timeout=10)
    sock.sendall(f"CONNECT 127.0.0.1:{origin.rsplit(':', 1)[1]} HTTP/1.1\r\n\r\n".encode())
    assert sock.recv(4096).startswith(b"HTTP/1.1 200")
    started = time.monotonic()
    os.kill(app.proc.pid, signal.SIGTERM)
    assert app.proc.popen.wait(20) == 0
    assert 0.8 < time.monotonic() - started < 10
    sock.settimeout(5)
    assert read_to_eof(sock) == b""                                # closed by the appliance
    sock.close()


# --- limits -------------------------------------------------------------------------------------

def test_per_client_connection_cap_answers_503_and_counts(make_appliance, origin):
    app = make_appliance(extra="[limits]\nmax_connections_per_client = 3\n")
    held = [socket.create_connection(("127.0.0.1", app.http_port), timeout=5) for _ in range(3)]
    try:
        time.sleep(0.2)
        reply = raw_exchange(app.http_port, f"GET {origin}/echo HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        assert reply.startswith(b"HTTP/1.1 503") and b"Retry-After: 5" in reply
        assert b"max_connections_per_client" in reply
        assert metric(app, 'appliance_limit_refusals_total{limit="connections_per_client"}') == 1
        assert app.admin_get("/healthz")[0] == 200                 # the admin listener is exempt
    finally:
        for s in held:
            s.close()
    time.sleep(0.2)
    assert curl("-x", app.proxy, f"{origin}/echo").returncode == 0  # slots come back


def test_socks5_over_the_cap_gets_a_failure_reply(make_appliance):
    port = free_port()
    make_appliance(extra="[limits]\nmax_connections_per_client = 1\n",
                         more_listeners=f'socks5 = "127.0.0.1:{port}"')
    with socket.create_connection(("127.0.0.1", port), timeout=5):
        time.sleep(0.2)
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            s.sendall(b"\x05\x01\x00")
            assert s.recv(2) == b"\x05\x00"
            s.sendall(b"\x05\x01\x00\x01\x7f\x00\x00\x01\x00\x50")
            assert s.recv(3) == b"\x05\x01\x00"                    # general failure


def test_a_head_trickled_past_the_header_timeout_gets_408(make_appliance, origin):
    app = make_appliance(extra="[limits]\nheader_timeout = 1.0\n")
    with socket.create_connection(("127.0.0.1", app.http_port), timeout=10) as s:
        s.sendall(f"GET {origin}/echo HTTP/1.1\r\n".encode())
        for _ in range(6):
            time.sleep(0.3)
            try:
                s.sendall(b"X-Slow: 1\r\n")
            except OSError:
                break
        reply = read_to_eof(s)
    assert reply.startswith(b"HTTP/1.1 408"), reply
    record = app.wait_record(lambda r: r["status"] == 408)
    assert "not complete within 1s" in record["error"]


def test_max_h2_streams_is_what_http2_clients_are_told(make_appliance):
    app = make_appliance(extra="[limits]\nmax_h2_streams = 7\n")
    client = H2RawClient(app.https_port, app.ca_path)
    try:
        assert client.server_settings[SettingCodes.MAX_CONCURRENT_STREAMS] == 7
    finally:
        client.sock.close()


# --- the admin listener -------------------------------------------------------------------------

def test_admin_basic_auth(make_appliance, tmp_path):
    users = tmp_path / "admins"
    users.write_text(f"ops:{hash_password('watch', b'0123456789abcdef')}\n")
    app = make_appliance(extra=f'[admin]\nusers_file = "{users}"\n')
    url = f"http://127.0.0.1:{app.admin_port}/metrics"
    r = curl("-s", "-o", "/dev/null", "-w", "%{http_code}", "-D", "-", url)
    assert r.stdout.endswith(b"401") and b'WWW-Authenticate: Basic realm="appliance admin"' in r.stdout
    assert curl("-s", "-o", "/dev/null", "-w", "%{http_code}", "-u", "ops:wrong", url).stdout == b"401"
    r = curl("-s", "-u", "ops:watch", url)
    assert b"appliance_requests_total" in r.stdout
