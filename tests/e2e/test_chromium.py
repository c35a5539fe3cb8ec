"""Headless Chromium uses the appliance as an HTTPS proxy (ALPN h2): a page over plain http and, from
its script, a ws:// and a wss:// WebSocket, each tunnelled through a CONNECT stream (RFC 9113 §8.5)
on the one HTTP/2 connection Chromium keeps to the proxy.

Chromium trusts the appliance CA and the tests' origin CA through an NSS db in a temporary $HOME
(never --ignore-certificate-errors); it runs with tests/e2e/chromium/flags.txt so it sends nothing
of its own to the Internet. The page POSTs its verdict to the server that served it (through the
proxy too); the test waits for that, bounded, and stops Chromium by its PID.
"""

from __future__ import annotations

import json
import queue
import subprocess
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from .chromium_browser import FLAGS, browser_env, chromium_executable, nss_home, stop_chromium
from .conftest import HERE, Appliance, require_tool

PAGES = HERE / "chromium"
RESULT_TIMEOUT = 20.0


class PageServer(ThreadingHTTPServer):
    """Serves tests/e2e/chromium/*.html and takes the page's verdict at POST /result."""

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), PageHandler)
        self.results: queue.Queue = queue.Queue()
        self.seen: list[str] = []

    @property
    def port(self) -> int:
        return self.server_address[1]


class PageHandler(BaseHTTPRequestHandler):
    server: PageServer
    timeout = 10

    def do_GET(self) -> None:
        self.server.seen.append(f"GET {self.path}")
        name = self.path.split("?")[0].lstrip("/")
        page = PAGES / name
        if not name.endswith(".html") or "/" in name or not page.is_file():
            return self._reply(404, b"not found\n", "text/plain")
        self._reply(200, page.read_bytes(), "text/html; charset=utf-8")

    def do_POST(self) -> None:
        self.server.seen.append(f"POST {self.path}")
        body = self.rfile.read(min(int(self.headers.get("Content-Length", "0")), 1 << 20))
        if self.path == "/result":
            self.server.results.put(body)
        self._reply(204, b"", "text/plain")

    def _reply(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:      # keep pytest's output clean
        pass


@pytest.fixture
def page_server():
    server = PageServer()
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    appliance = Appliance(tmp_path_factory.mktemp("chromium-app")).start()
    try:
        yield appliance
    finally:
        appliance.stop()


def start_chromium(home: Path, proxy: str, url: str, log: Path) -> subprocess.Popen:
    env = browser_env(home)
    args = [chromium_executable(), *FLAGS, "--disable-dev-shm-usage",
            f"--user-data-dir={home / 'profile'}", f"--proxy-server={proxy}",
            "--proxy-bypass-list=<-loopback>", url]
    with open(log, "wb") as out:
        # A session of its own, so its helper processes (zygote, renderer, network) can be ended
        # with it through its process group, whose id is this PID.
        return subprocess.Popen(args, env=env, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True, cwd=home)


def test_chromium_page_and_both_websockets_share_one_h2_connection(
        app, page_server, ws_origin, wss_origin, origin_tls, tmp_path):
    require_tool("chromium")                   # a missing tool fails the test, never skips it
    require_tool("certutil")
    home = nss_home(tmp_path / "home", {"appliance CA": app.ca_path, "test origin CA": origin_tls["ca"]})
    page = (f"http://127.0.0.1:{page_server.port}/websockets.html"
            f"?ws={ws_origin}&wss={wss_origin}")
    log = tmp_path / "chromium.log"
    proc = start_chromium(home, app.https_proxy, page, log)
    try:
        try:
            verdict = json.loads(page_server.results.get(timeout=RESULT_TIMEOUT))
        except queue.Empty:
            pytest.fail(f"no verdict from the page after {RESULT_TIMEOUT}s; page server saw "
                        f"{page_server.seen}; access log {app.records()}\n"
                        f"chromium: {log.read_text(errors='replace')[-3000:]}\n"
                        f"appliance: {app.proc.output()[-3000:]}")
    finally:
        stop_chromium(proc)

    # The echoes came back, in order, on both WebSockets.
    assert verdict["ok"], verdict
    assert verdict["report"]["ws"]["echoes"] == ["hello ws", {"length": 100000, "same": True}, "bye ws"]
    assert verdict["report"]["wss"]["echoes"] == ["hello wss", "bye wss"]

    # The appliance saw it all on one HTTP/2 connection: the page, two CONNECT tunnels (Chromium
    # tunnels ws:// too, and does not use RFC 8441 towards a proxy) and the verdict.
    ws_target, wss_target = f"127.0.0.1:{ws_origin}", f"localhost:{wss_origin}"
    app.wait_record(lambda r: r["kind"] == "tunnel" and r["target"] == ws_target)
    app.wait_record(lambda r: r["kind"] == "tunnel" and r["target"] == wss_target)
    app.wait_record(lambda r: r["target"].endswith("/result"))
    records = app.records()
    page_record = next(r for r in records if "/websockets.html" in r["target"])
    ws_record = next(r for r in records if r["kind"] == "tunnel" and r["target"] == ws_target)
    wss_record = next(r for r in records if r["kind"] == "tunnel" and r["target"] == wss_target)
    result_record = next(r for r in records if r["target"].endswith("/result"))
    mine = [page_record, ws_record, wss_record, result_record]
    assert [r["status"] for r in mine] == [200, 200, 200, 204], mine
    assert [r["method"] for r in mine] == ["GET", "CONNECT", "CONNECT", "POST"], mine
    assert {r["protocol"] for r in mine} == {"HTTP/2"}, mine
    assert len({r["connection"] for r in mine}) == 1, mine
    assert page_record["kind"] == result_record["kind"] == "request"
    # Chromium ends a tunnel with RST_STREAM(CANCEL) once its WebSocket has closed, never with
    # END_STREAM; the appliance takes that as a normal end, not an error.
    assert ws_record["error"] is None and wss_record["error"] is None, mine
    # The 100,000 random characters (6 bits each: at least 75,000 bytes after deflate), both ways.
    assert ws_record["bytes_up"] > 70_000 and ws_record["bytes_down"] > 70_000, ws_record
    assert wss_record["bytes_up"] > 1000 and wss_record["bytes_down"] > 1000, wss_record   # TLS inside

    # Nothing else went through the proxy: Chromium's background requests stay off. (A preconnected
    # connection that Chromium drops mid-handshake leaves a `tls` record; that is no request.)
    others = [r for r in records if r not in mine and r["kind"] != "tls"]
    assert others == [], others
