"""The namespace test network itself: routing client → appliance → origin, per-namespace hosts
files, and iptables REDIRECT with SO_ORIGINAL_DST / IP6T_SO_ORIGINAL_DST in the appliance.

These check the harness that the transparent-interception end-to-end tests build on, with a
small inline origin and an inline listener instead of the appliance.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.e2e import netns
from tests.e2e.netns import NETNS_ETC, TestNetwork, find_tool, require_network_tools

test_network = netns.test_network  # the fixture: a fresh TestNetwork per test

# An origin: answers every GET with which address it was reached on and who asked.
ORIGIN = r"""
import http.server, socket, sys, threading

class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        host, port = self.connection.getsockname()[:2]
        peer = self.client_address[0]
        body = f"origin {host} {port} from {peer}\n".encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args):
        pass

class V6(http.server.ThreadingHTTPServer):
    address_family = socket.AF_INET6

port = int(sys.argv[1])
servers = [(V6 if ":" in h else http.server.ThreadingHTTPServer)((h, port), Handler)
           for h in sys.argv[2:]]
for s in servers[1:]:
    threading.Thread(target=s.serve_forever, daemon=True).start()
servers[0].serve_forever()
"""

# A REDIRECT target: reports the connection's original destination as the response body.
# Bounded: at most 100 connections, 120 s of life, 5 s per connection.
ORIGINAL_DST_LISTENER = r"""
import select, socket, struct, sys, time

SO_ORIGINAL_DST = 80          # linux/netfilter_ipv4.h, level SOL_IP
IP6T_SO_ORIGINAL_DST = 80     # linux/netfilter_ipv6/ip6_tables.h, level SOL_IPV6

def original_dst(conn):
    if conn.family == socket.AF_INET:
        raw = conn.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)       # struct sockaddr_in
        port, addr = struct.unpack_from("!2xH4s", raw)
        return f"{socket.inet_ntop(socket.AF_INET, addr)}:{port}"
    raw = conn.getsockopt(socket.IPPROTO_IPV6, IP6T_SO_ORIGINAL_DST, 28)  # struct sockaddr_in6
    port, _flowinfo, addr = struct.unpack_from("!2xHI16s", raw)
    return f"[{socket.inet_ntop(socket.AF_INET6, addr)}]:{port}"

port = int(sys.argv[1])
listeners = []
for family, host in ((socket.AF_INET, "0.0.0.0"), (socket.AF_INET6, "::")):
    s = socket.socket(family, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if family == socket.AF_INET6:
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    s.bind((host, port))
    s.listen(16)
    listeners.append(s)

deadline = time.monotonic() + 120
for _ in range(100):
    ready, _, _ = select.select(listeners, [], [], max(0.0, deadline - time.monotonic()))
    if not ready:
        break
    conn, _ = ready[0].accept()
    with conn:
        conn.settimeout(5)
        head = b""
        try:
            while b"\r\n\r\n" not in head and len(head) < 65536:
                chunk = conn.recv(4096)
                if not chunk:
                    break
                head += chunk
            body = (original_dst(conn) + "\n").encode()
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n"
                         % len(body) + body)
        except OSError as exc:
            print("listener:", exc, file=sys.stderr, flush=True)
"""


def curl(net: TestNetwork, ns: str, url: str, *extra: str) -> str:
    res = net.run(ns, [CURL, "--noproxy", "*", "-sS", "-g", "--max-time", "10", *extra, url],
                  timeout=20)
    assert res.returncode == 0, f"curl {url} from {ns}: exit {res.returncode}: {res.stderr}"
    return res.stdout


CURL = find_tool("curl") or "curl"


@pytest.fixture(autouse=True)
def _require_curl():
    require_network_tools()
    if find_tool("curl") is None:
        pytest.fail("curl is not installed; run the README's test command, which installs it")


def start_origin(net: TestNetwork, *hosts: str, port: int = 8080) -> subprocess.Popen:
    proc = net.spawn(net.origin, [sys.executable, "-c", ORIGIN, str(port), *hosts])
    for host in hosts:
        net.wait_port(net.origin, host, port, timeout=10)
    return proc


def test_client_reaches_origin_through_the_appliance(test_network):
    net = test_network
    start_origin(net, net.origin_ip4, net.origin_ip6, net.origin2_ip4)
    net.hosts(net.client, {"origin.test": [net.origin_ip4, net.origin_ip6],
                           "other.test": net.origin2_ip4})

    # Routed, not NATed: the origin sees the client's own address.
    assert curl(net, net.client, f"http://{net.origin_ip4}:8080/") == \
        f"origin {net.origin_ip4} 8080 from {net.client_ip4}\n"
    assert curl(net, net.client, f"http://[{net.origin_ip6}]:8080/") == \
        f"origin {net.origin_ip6} 8080 from {net.client_ip6}\n"
    # Names come from the client's own hosts file.
    assert curl(net, net.client, "http://origin.test:8080/", "-4") == \
        f"origin {net.origin_ip4} 8080 from {net.client_ip4}\n"
    assert curl(net, net.client, "http://origin.test:8080/", "-6") == \
        f"origin {net.origin_ip6} 8080 from {net.client_ip6}\n"
    assert curl(net, net.client, "http://other.test:8080/") == \
        f"origin {net.origin2_ip4} 8080 from {net.client_ip4}\n"
    # The appliance reaches the origin directly, as a transparent proxy connecting onward will.
    assert curl(net, net.appliance, f"http://[{net.origin_ip6}]:8080/") == \
        f"origin {net.origin_ip6} 8080 from {net.appliance_origin_ip6}\n"


def test_hosts_files_are_per_namespace(test_network):
    net = test_network
    net.hosts(net.client, {"origin.test": net.origin_ip4})
    lookup = [sys.executable, "-c",
              "import socket, sys; print(socket.gethostbyname(sys.argv[1]))", "origin.test"]
    assert net.run(net.client, lookup).stdout == f"{net.origin_ip4}\n"
    assert net.run(net.appliance, lookup).returncode != 0
    assert (NETNS_ETC / net.client / "hosts").read_text().startswith("127.0.0.1\tlocalhost\n")


@pytest.mark.parametrize("family", [4, 6])
def test_redirect_reports_original_destination(test_network, family):
    net = test_network
    net.redirect(80, 3129, family=family)
    net.redirect(443, 3130, family=family)
    listener = net.spawn(net.appliance, [sys.executable, "-c", ORIGINAL_DST_LISTENER, "3129"])
    tls_listener = net.spawn(net.appliance, [sys.executable, "-c", ORIGINAL_DST_LISTENER, "3130"])
    net.wait_port(net.appliance, net.appliance_client_ip4, 3129)
    net.wait_port(net.appliance, net.appliance_client_ip4, 3130)

    origin, other = ((net.origin_ip4, net.origin2_ip4) if family == 4
                     else (net.origin_ip6, net.origin2_ip6))
    url_host = origin if family == 4 else f"[{origin}]"
    other_host = other if family == 4 else f"[{other}]"
    try:
        assert curl(net, net.client, f"http://{url_host}/") == f"{url_host}:80\n"
        assert curl(net, net.client, f"http://{other_host}:80/") == f"{other_host}:80\n"
        # Plain HTTP to port 443 is enough to see the second rule and listener at work.
        assert curl(net, net.client, f"http://{url_host}:443/") == f"{url_host}:443\n"
    finally:
        print(net.log(listener), net.log(tls_listener))


def test_teardown_removes_everything():
    require_network_tools()
    with TestNetwork() as net:
        names = net.namespaces
        net.hosts(net.client, {"origin.test": net.origin_ip4})
        net.redirect(80, 3129)
        sleeper = net.spawn(net.client, [sys.executable, "-c", "import time; time.sleep(60)"])
        logs = net.workdir
    assert sleeper.poll() is not None
    listed = subprocess.run([net.ip, "netns", "list"], capture_output=True, text=True,
                            timeout=30).stdout
    assert not any(name in listed for name in names)
    assert not any((NETNS_ETC / name).exists() for name in names)
    assert not Path(logs).exists()


def test_failed_setup_leaves_nothing():
    require_network_tools()
    net = TestNetwork()
    net.origin2_ip4 = "not-an-address"  # `ip addr add` fails halfway through the build
    with pytest.raises(RuntimeError, match="not-an-address"):
        net.__enter__()
    listed = subprocess.run([net.ip, "netns", "list"], capture_output=True, text=True,
                            timeout=30).stdout
    assert not any(name in listed for name in net.namespaces)
    assert not any((NETNS_ETC / name).exists() for name in net.namespaces)
