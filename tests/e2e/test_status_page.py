"""The admin listener's status page (`/status`) in headless Chromium while traffic runs.

The appliance carries an open CONNECT tunnel, a CONNECT stream on an HTTP/2 connection, an open
WebSocket, an open SOCKS5 connection, a denial, an upstream error and a loop of downloads.
Chromium (tests/e2e/chromium/flags.txt, a fresh profile each run, no proxy: the page is on
127.0.0.1, which the flags' resolver rules leave alone) loads the page twice with --dump-dom and
once with --screenshot. The numbers in the DOM were put there by the page's own
script from /status.json (the served page has none, and its CSP allows only that script), so
they show the script ran, refreshed in place several times, and changed between the two moments
as the traffic went on. Every process is stopped by its PID, every wait is bounded.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import re
import shutil
import socket
import ssl
import struct
import subprocess
import threading
import time
from pathlib import Path

import h2.config
import h2.connection
import h2.events
from python_socks.sync import Proxy

from .chromium_browser import FLAGS, browser_env, chromium_executable, stop_chromium
from .conftest import DEFAULT_RULES, free_port

RULES = '[[rule]]\nname = "no-blocked"\naction = "deny"\ndst = ["blocked.test"]\n' + DEFAULT_RULES
VIRTUAL_TIME_MS = 3500          # the page polls once a second: three or four refreshes per load
CHROMIUM_TIMEOUT = 60
TRAFFIC_SECONDS = 60            # the download loop's own bound, should the test not stop it
SCREENSHOT_COPY = Path("/tmp/status-page.png")


class Downloads(threading.Thread):
    """GET `url` through the proxy again and again (a fresh connection each), until stopped."""

    def __init__(self, proxy_port: int, url: str) -> None:
        super().__init__(daemon=True)
        self.proxy_port, self.url = proxy_port, url
        self.stop = threading.Event()
        self.done = 0
        self.failures: list[str] = []

    def run(self) -> None:
        deadline = time.monotonic() + TRAFFIC_SECONDS
        while not self.stop.is_set() and time.monotonic() < deadline:
            try:
                status, body = proxy_get(self.proxy_port, self.url)
                assert status == 200 and len(body) == 100_000, status
                self.done += 1
            except (OSError, AssertionError) as exc:
                self.failures.append(repr(exc))
            self.stop.wait(0.05)


def proxy_get(proxy_port: int, url: str) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", proxy_port, timeout=10)
    try:
        conn.request("GET", url)
        answer = conn.getresponse()
        return answer.status, answer.read()
    finally:
        conn.close()


def open_through_proxy(proxy_port: int, request: str, expect: bytes) -> socket.socket:
    """Send `request` to the proxy and read its head, which must start with `expect`; the
    connection stays open (a tunnel or a WebSocket) for the caller to close."""
    sock = socket.create_connection(("127.0.0.1", proxy_port), timeout=10)
    sock.sendall(request.encode())
    head = b""
    for _ in range(100):
        if b"\r\n\r\n" in head:
            break
        head += sock.recv(4096)
    assert head.startswith(expect), head
    return sock


def open_h2_tunnel(app, authority: str) -> ssl.SSLSocket:
    """A CONNECT stream (RFC 9113 §8.5) on an HTTP/2 connection to the https listener, left open."""
    context = ssl.create_default_context(cafile=str(app.ca_path))
    context.set_alpn_protocols(["h2"])
    sock = context.wrap_socket(socket.create_connection(("127.0.0.1", app.https_port), timeout=10),
                               server_hostname="localhost")
    # h2 before 4.4 would refuse to send a CONNECT without :path (DESIGN.md, known traps)
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True,
                                                                validate_outbound_headers=False))
    conn.initiate_connection()
    conn.send_headers(1, [(":method", "CONNECT"), (":authority", authority)])
    sock.sendall(conn.data_to_send())
    for _ in range(20):
        events = conn.receive_data(sock.recv(65536))
        sock.sendall(conn.data_to_send())
        answers = [e for e in events if isinstance(e, h2.events.ResponseReceived)]
        if answers:
            assert dict(answers[0].headers)[b":status"] == b"200", answers
            return sock
    raise AssertionError("no answer to the CONNECT stream")


def chromium(home: Path, url: str, *extra: str) -> str:
    """One headless Chromium run on `url` with a fresh profile; its stdout."""
    home.mkdir()
    args = [chromium_executable(), *FLAGS, f"--user-data-dir={home / 'profile'}", "--window-size=1200,900",
            "--hide-scrollbars", f"--virtual-time-budget={VIRTUAL_TIME_MS}", *extra, url]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
                            env=browser_env(home), start_new_session=True)
    try:
        out, err = proc.communicate(timeout=CHROMIUM_TIMEOUT)
    finally:
        stop_chromium(proc)
    assert proc.returncode == 0, err.decode(errors="replace")[-3000:]
    return out.decode()


def readings(dom: str) -> dict[str, float]:
    """The numbers the page's script wrote: `id="…" … data-value="…"`."""
    return {m.group(1): float(m.group(2))
            for m in re.finditer(r'id="([a-z0-9-]+)"[^>]*?data-value="([0-9.e+-]+)"', dom)}


def table(dom: str, body_id: str) -> str:
    match = re.search(rf'<tbody id="{body_id}">(.*?)</tbody>', dom, re.S)
    assert match, f"no table {body_id}"
    return match.group(1)


def status_json(app) -> dict:
    status, body = app.admin_get("/status.json")
    assert status == 200, body
    return json.loads(body)


def wait_status(app, predicate, what: str, timeout: float = 10.0) -> dict:
    deadline = time.monotonic() + timeout
    for _ in range(int(timeout / 0.1) + 1):
        snapshot = status_json(app)
        if predicate(snapshot) or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert predicate(snapshot), f"{what}: {json.dumps({k: snapshot[k] for k in ('live', 'totals')})}"
    return snapshot


def test_status_routes_and_headers(make_appliance):
    app = make_appliance()
    conn = http.client.HTTPConnection("127.0.0.1", app.admin_port, timeout=10)
    try:
        conn.request("GET", "/status")
        page = conn.getresponse()
        body = page.read()
    finally:
        conn.close()
    assert page.status == 200 and page.getheader("Content-Type") == "text/html; charset=utf-8"
    assert page.getheader("Cache-Control") == "no-store"
    assert page.getheader("Content-Security-Policy").startswith("default-src 'none'; script-src 'sha256-")
    assert b'id="live-tunnels"' in body and b"http://" not in body and b"https://" not in body
    snapshot = status_json(app)
    for field in ("version", "config", "uptime_seconds", "listeners", "connections",
                  "pooled_origin_connections", "live", "totals", "rate", "history",
                  "top_destinations", "recent_errors", "recent_denials"):
        assert field in snapshot, field
    assert {row["kind"] for row in snapshot["listeners"]} == {"http", "https", "admin"}


def test_status_page_shows_live_numbers_in_chromium(make_appliance, origin, ws_origin, tmp_path):
    socks_port = free_port()
    app = make_appliance(rules=RULES, more_listeners=f'socks5 = "127.0.0.1:{socks_port}"')
    origin_authority = origin.split("//")[1]
    downloads = Downloads(app.http_port, f"{origin}/bytes?n=100000")
    with contextlib.ExitStack() as held:      # connections kept open while the page is looked at
        held.enter_context(open_through_proxy(app.http_port, f"CONNECT {origin_authority} HTTP/1.1\r\n"
                                              f"Host: {origin_authority}\r\n\r\n", b"HTTP/1.1 200"))
        held.enter_context(open_through_proxy(
            app.http_port, f"GET http://127.0.0.1:{ws_origin}/ HTTP/1.1\r\nHost: 127.0.0.1:{ws_origin}\r\n"
            "Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
            "Sec-WebSocket-Version: 13\r\n\r\n", b"HTTP/1.1 101"))
        held.enter_context(open_h2_tunnel(app, origin_authority))
        held.enter_context(Proxy.from_url(f"socks5://127.0.0.1:{socks_port}").connect(
            "127.0.0.1", int(origin_authority.rsplit(":", 1)[1]), timeout=10))
        try:
            assert proxy_get(app.http_port, "http://blocked.test/")[0] == 403
            assert proxy_get(app.http_port, f"http://127.0.0.1:{free_port()}/")[0] == 502
            downloads.start()
            wait_status(app, lambda s: s["totals"]["requests"] >= 5
                        and s["rate"]["bytes_down_per_second"] > 0, "downloads counted")
            page = f"http://127.0.0.1:{app.admin_port}/status"

            first_dom = chromium(tmp_path / "first", page, "--dump-dom")
            first = readings(first_dom)
            wait_status(app, lambda s: s["totals"]["requests"] >= first["total-requests"] + 5,
                        "more downloads")
            time.sleep(1.1)                                     # uptime moves on by a second at least
            second_dom = chromium(tmp_path / "second", page, "--dump-dom")
            second = readings(second_dom)
            screenshot = tmp_path / "status.png"
            chromium(tmp_path / "third", page, f"--screenshot={screenshot}")
        finally:
            downloads.stop.set()
            downloads.join(15)

    # The page's script ran (the served page carries no numbers), refreshed in place, and the
    # numbers are what this test did.
    for seen in (first, second):
        assert seen["updates"] >= 2, seen
        assert seen["live-tunnels"] == 2 and seen["live-websockets"] == 1, seen   # CONNECT on h1 and h2
        assert seen["live-h2-streams"] == 1 and seen["live-h2-connections"] == 1, seen
        assert seen["live-socks5"] == 1 and seen["live-transparent"] == 0, seen
        assert seen["live-http1"] >= 2 and seen["open-connections"] >= 4, seen
        assert seen["total-denials"] == 1 and seen["total-errors"] == 1, seen
        assert seen["rate-down"] > 0 and seen["workers"] == 1, seen
    # ... and they moved between the two moments while the downloads ran.
    assert second["total-requests"] >= first["total-requests"] + 5, (first, second)
    assert second["total-down"] >= first["total-down"] + 5 * 100_000, (first, second)
    assert second["uptime"] > first["uptime"], (first, second)
    denials = table(second_dom, "recent-denials")
    assert "blocked.test" in denials and "no-blocked" in denials, denials
    assert "upstream connect" in table(second_dom, "recent-errors")
    assert "127.0.0.1" in table(second_dom, "top-destinations")
    assert re.search(r"<td>http</td><td>127\.0\.0\.1:\d+</td>", table(second_dom, "listeners"))
    assert not downloads.failures, downloads.failures[:3]

    png = screenshot.read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and png[12:16] == b"IHDR"
    assert struct.unpack(">II", png[16:24]) == (1200, 900)
    assert len(png) > 20_000                              # a page drawn, not a blank one
    shutil.copyfile(screenshot, SCREENSHOT_COPY)           # for a person to look at

    # The tunnels, the WebSocket and the SOCKS5 connection are closed: the live counts come down.
    wait_status(app, lambda s: not any(s["live"].values()), "everything closed")
