"""Headless Chromium finds the appliance through its PAC file and prefers the HTTPS (HTTP/2) endpoint.

    client ns 192.0.2.2 ── appliance ns 192.0.2.1 ── origin ns 198.51.100.10 (site.test, :80)
    Chromium                http :3128, https :8443,    a small HTML page server
                            pac :80, dns :53,
                            admin 127.0.0.1:9090

Chromium never hands a loopback destination to a PAC-chosen proxy, so everything here sits on
TEST-NET addresses in the namespaces of tests/e2e/netns.py. The appliance is called "192.0.2.1"
(`[appliance] name`): the PAC file names the proxies by that address, which Chromium needs no
lookup for, and the https listener's certificate (minted from the appliance CA, which Chromium
trusts through an NSS db) carries it. Only the appliance resolves site.test (its namespace's hosts
file); Chromium's own resolver answers nothing but the names a run lets through
(--host-resolver-rules), so the page can only arrive through a proxy.

  1. --proxy-pac-url: the page goes over the https listener as HTTP/2 (the PAC file's first entry,
     "HTTPS 192.0.2.1:8443").
  2. The same with the https endpoint refusing connections (a TCP reset from iptables in the
     appliance namespace): Chromium falls back to "PROXY 192.0.2.1:3128", the http listener.
  3. --proxy-auto-detect with the client's resolver pointed at the appliance's DNS responder:
     Chromium looks up `wpad` (search domain localdomain), fetches http://wpad/wpad.dat from the
     pac listener and sends the page over the https listener as HTTP/2 again.

Each Chromium run prints the page's DOM (--dump-dom) and exits; it is bounded by a timeout and
stopped by its PID (and its process group). The network fixture stops everything else. Besides
the appliance's access log, each run's NetLog (--log-net-log) gives Chromium's side: where it got
the PAC file, the proxy list the script returned, and which proxy it gave up on.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .chromium_browser import browser_env, chromium_executable, flags, nss_home, stop_chromium
from .conftest import REPO, child_env, read_access_log, require_tool, wait_for_record
from .netns import NETNS_ETC, TestNetwork, namespace_env, require_network_tools

APPLIANCE = TestNetwork.appliance_client_ip4          # 192.0.2.1, the client's gateway
HTTP_PORT, HTTPS_PORT, PAC_PORT, DNS_PORT = 3128, 8443, 80, 53
ADMIN = "127.0.0.1:9090"                              # inside the appliance namespace
DOMAIN = "localdomain"
PAC_URL = f"http://{APPLIANCE}/proxy.pac"
SITE = "site.test"
BROWSER_TIMEOUT = 25.0
# Names Chromium's own resolver may look up; everything else maps to ~NOTFOUND (the rules in
# tests/e2e/chromium/flags.txt). The rules map IP literals too, so the appliance's address needs
# its EXCLUDE, or Chromium could not reach the PAC file or the proxies.
PAC_RUN_NAMES = (APPLIANCE,)
WPAD_RUN_NAMES = (APPLIANCE, "wpad", f"wpad.{DOMAIN}")

CONFIG = f"""\
[appliance]
name = "{APPLIANCE}"
state_dir = "var"

[listen]
http = "{APPLIANCE}:{HTTP_PORT}"
https = "{APPLIANCE}:{HTTPS_PORT}"
pac = "{APPLIANCE}:{PAC_PORT}"
dns = "{APPLIANCE}:{DNS_PORT}"
admin = "{ADMIN}"

[dns]
domain = "{DOMAIN}"
answer = ["{APPLIANCE}"]

[log]
access_log = "access.log"
level = "debug"

[[rule]]
name = "clients"
action = "allow"
src = ["192.0.2.0/24"]
"""

# The origin: any GET answers a small HTML page naming the path it was asked for.
PAGE_SERVER = """\
import html, sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from socketserver import TCPServer

class Page(BaseHTTPRequestHandler):
    def do_GET(self):
        body = ("<!DOCTYPE html><html><head><title>PAC test</title></head><body>"
                f"<p id='served'>served {html.escape(self.path)}</p></body></html>").encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/html; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format, *args):
        sys.stderr.write("%s %s\\n" % (self.client_address[0], format % args))
        sys.stderr.flush()

class Server(ThreadingHTTPServer):
    daemon_threads = True
    server_bind = TCPServer.server_bind      # no getfqdn(): the namespace has no resolver

Server((sys.argv[1], int(sys.argv[2])), Page).serve_forever()
"""

ADMIN_GET = """\
import sys, urllib.request
opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
try:
    with opener.open("http://%s" % sys.argv[1], timeout=5) as reply:
        sys.stdout.write(reply.read().decode())
except OSError as exc:
    sys.exit("%s" % exc)
"""


@pytest.fixture(scope="module")
def net(tmp_path_factory):
    """The network, the page server in the origin namespace and the appliance in its own."""
    require_network_tools()
    require_tool("chromium")                   # missing tools fail the tests, never skip them
    require_tool("certutil")
    work = tmp_path_factory.mktemp("chromium-pac")
    with TestNetwork() as network:
        network.spawn(network.origin, [sys.executable, "-c", PAGE_SERVER, network.origin_ip4, "80"])
        network.hosts(network.appliance, {SITE: network.origin_ip4})
        network.app_dir = work / "appliance"
        network.app_dir.mkdir()
        (network.app_dir / "appliance.toml").write_text(CONFIG)
        network.app = network.spawn(
            network.appliance, [sys.executable, "-m", "appliance", "run", "--config",
                                str(network.app_dir / "appliance.toml")],
            env=child_env(), cwd=str(REPO))
        network.wait_port(network.appliance, network.origin_ip4, 80)
        wait_healthy(network)
        network.appliance_ca = network.app_dir / "var" / "ca" / "ca.pem"
        network.work = work
        yield network


def admin_get(net, path: str) -> str:
    r = net.run(net.appliance, [sys.executable, "-c", ADMIN_GET, f"{ADMIN}{path}"])
    if r.returncode != 0:
        raise OSError(f"GET {path} on the admin listener: {r.stderr.strip()}")
    return r.stdout


def wait_healthy(net, timeout: float = 20.0) -> None:
    """Until /healthz answers 200 (every listener accepting, the DNS responder too); bounded."""
    deadline = time.monotonic() + timeout
    for _ in range(int(timeout / 0.1) + 1):
        if net.app.poll() is not None:
            raise RuntimeError(f"the appliance exited:\n{net.log(net.app)[-3000:]}")
        try:
            admin_get(net, "/healthz")
            return
        except OSError:
            if time.monotonic() > deadline:
                break
            time.sleep(0.1)
    raise TimeoutError(f"appliance not healthy after {timeout}s:\n{net.log(net.app)[-3000:]}")


def records(net) -> list[dict]:
    return read_access_log(net.app_dir / "access.log")


def wait_record(net, predicate, timeout: float = 10.0) -> dict:
    return wait_for_record(net.app_dir / "access.log", predicate, timeout, lambda: net.log(net.app)[-3000:])


def load_page(net, name: str, url: str, proxy_flags: list[str], resolvable: tuple[str, ...]) -> str:
    """Run a fresh headless Chromium in the client namespace until it has printed `url`'s DOM;
    returns the DOM. Bounded by BROWSER_TIMEOUT; Chromium is stopped by its PID either way."""
    run_dir = net.work / name
    home = nss_home(run_dir / "home", {"appliance CA": net.appliance_ca})
    out, log = run_dir / "dom.html", run_dir / "chromium.log"
    args = [chromium_executable(), *flags(resolvable), "--disable-dev-shm-usage",
            f"--user-data-dir={home / 'profile'}", *proxy_flags,
            f"--log-net-log={run_dir / 'netlog.json'}", "--dump-dom", url]
    with open(out, "wb") as stdout, open(log, "wb") as stderr:
        proc = net.spawn(net.client, args, env=browser_env(home, namespace_env()), stdout=stdout,
                         stderr=stderr, start_new_session=True, cwd=str(home))
    try:
        proc.wait(BROWSER_TIMEOUT)
    except subprocess.TimeoutExpired:
        pass
    finally:
        stop_chromium(proc)
        net.stop(proc)
    dom = out.read_text(errors="replace")
    assert "served " in dom, (f"Chromium printed no page for {url} (exit {proc.returncode}):\n"
                              f"{dom[-2000:]}\nchromium: {log.read_text(errors='replace')[-3000:]}\n"
                              f"access log: {records(net)[-5:]}\nappliance: {net.log(net.app)[-3000:]}")
    return dom


def page_url(run: str) -> tuple[str, str]:
    path = f"/page.html?run={run}"
    return f"http://{SITE}{path}", path


def netlog(path: Path) -> list[tuple[str, dict]]:
    """(event type name, params) for each event of a Chromium NetLog (--log-net-log) file."""
    text = path.read_text(errors="replace")
    try:
        data = json.loads(text)
    except json.JSONDecodeError:     # cut short: Chromium writes one event a line, "{...},\n"
        data = json.loads(text[:text.rfind("},\n") + 1] + "]}")
    names = {number: name for name, number in data["constants"]["logEventTypes"].items()}
    return [(names.get(event["type"], str(event["type"])), event.get("params") or {})
            for event in data.get("events", [])]


def params_of(events: list[tuple[str, dict]], event_type: str, key: str) -> list:
    return [params[key] for name, params in events if name == event_type and key in params]


def dns_answered(net) -> float:
    """appliance_dns_queries_total{result="answered"} from the admin listener."""
    for line in admin_get(net, "/metrics").splitlines():
        if line.startswith('appliance_dns_queries_total{result="answered"}'):
            return float(line.split()[-1])
    raise AssertionError("no appliance_dns_queries_total{result=\"answered\"} in /metrics")


PROXY_LIST = f"HTTPS {APPLIANCE}:{HTTPS_PORT};PROXY {APPLIANCE}:{HTTP_PORT};DIRECT"


def test_pac_url_page_goes_over_the_https_endpoint_as_h2(net):
    url, path = page_url("pac-h2")
    dom = load_page(net, "pac-h2", url, [f"--proxy-pac-url={PAC_URL}"], PAC_RUN_NAMES)
    assert f"served {path}" in dom

    # Chromium's own account: it ran our PAC file, which chose HTTPS first.
    events = netlog(net.work / "pac-h2" / "netlog.json")
    assert f"Custom PAC URL: {PAC_URL}" in params_of(events, "PAC_FILE_DECIDER_FETCH_PAC_SCRIPT", "source")
    assert PROXY_LIST in params_of(events, "PROXY_RESOLUTION_SERVICE_RESOLVED_PROXY_LIST", "proxy_info")

    # The appliance's: the page came in on the https listener, as an HTTP/2 stream, once.
    record = wait_record(net, lambda r: r["target"] == url)
    assert record["listener"] == "https" and record["protocol"] == "HTTP/2", record
    assert record["status"] == 200 and record["client"] == net.client_ip4, record
    assert record["upstream"] == net.origin_ip4 and record["kind"] == "request", record
    assert [r for r in records(net) if r["target"] == url] == [record]


def test_pac_falls_back_to_the_proxy_entry_when_https_is_down(net):
    """The https endpoint "stopped": its port answers every SYN with a reset."""
    reject = ["-p", "tcp", "-d", APPLIANCE, "--dport", str(HTTPS_PORT),
              "-j", "REJECT", "--reject-with", "tcp-reset"]
    r = net.run(net.appliance, [net.iptables, "-w", "5", "-I", "INPUT", *reject])
    assert r.returncode == 0, r.stderr
    try:
        url, path = page_url("fallback")
        dom = load_page(net, "fallback", url, [f"--proxy-pac-url={PAC_URL}"], PAC_RUN_NAMES)
        listing = net.run(net.appliance, [net.iptables, "-w", "5", "-L", "INPUT", "-v", "-n", "-x"]).stdout
    finally:
        r = net.run(net.appliance, [net.iptables, "-w", "5", "-D", "INPUT", *reject])
        assert r.returncode == 0, r.stderr
    assert f"served {path}" in dom

    # Chromium tried the HTTPS entry, was turned away (the rule counted it), marked it bad and
    # went on to the PROXY entry.
    rejected = [line for line in listing.splitlines() if "REJECT" in line and f"dpt:{HTTPS_PORT}" in line]
    assert rejected and int(rejected[0].split()[0]) > 0, listing
    events = netlog(net.work / "fallback" / "netlog.json")
    assert PROXY_LIST in params_of(events, "PROXY_RESOLUTION_SERVICE_RESOLVED_PROXY_LIST", "proxy_info")
    bad = params_of(events, "PROXY_LIST_FALLBACK", "bad_proxy_chain")
    assert f"[https://{APPLIANCE}:{HTTPS_PORT}]" in bad, bad

    record = wait_record(net, lambda r: r["target"] == url)
    assert record["listener"] == "http" and record["protocol"] == "HTTP/1.1", record
    assert record["status"] == 200 and record["client"] == net.client_ip4, record
    assert record["upstream"] == net.origin_ip4, record
    assert [r for r in records(net) if r["target"] == url] == [record]


def test_auto_detect_finds_wpad_through_the_appliance_dns(net):
    """No PAC URL: Chromium resolves `wpad` (search domain localdomain) through the appliance's DNS
    responder, fetches http://wpad/wpad.dat from the pac listener, and uses what it says."""
    resolv = NETNS_ETC / net.client / "resolv.conf"   # bind-mounted by `ip netns exec` at start
    original = resolv.read_text()
    answered = dns_answered(net)
    resolv.write_text(f"nameserver {APPLIANCE}\nsearch {DOMAIN}\noptions timeout:1 attempts:2\n")
    try:
        url, path = page_url("wpad")
        dom = load_page(net, "wpad", url, ["--proxy-auto-detect"], WPAD_RUN_NAMES)
    finally:
        resolv.write_text(original)
    assert f"served {path}" in dom

    # Chromium found the PAC file by WPAD over DNS (on Linux it has no DHCP source) and ran it.
    events = netlog(net.work / "wpad" / "netlog.json")
    sources = params_of(events, "PAC_FILE_DECIDER_FETCH_PAC_SCRIPT", "source")
    assert "WPAD DNS: http://wpad/wpad.dat" in sources, sources
    assert PROXY_LIST in params_of(events, "PROXY_RESOLUTION_SERVICE_RESOLVED_PROXY_LIST", "proxy_info")
    # The appliance's DNS responder answered the lookups (nothing else in the namespace could).
    assert dns_answered(net) > answered

    record = wait_record(net, lambda r: r["target"] == url)
    assert record["listener"] == "https" and record["protocol"] == "HTTP/2", record
    assert record["status"] == 200 and record["client"] == net.client_ip4, record
    assert record["upstream"] == net.origin_ip4, record
    assert [r for r in records(net) if r["target"] == url] == [record]
