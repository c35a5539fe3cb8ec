"""Transparent interception in a small network of namespaces (tests/e2e/netns.py):

    client 192.0.2.2 ──▶ appliance (router; iptables REDIRECT :80 → 3129, :443 → 3130) ──▶ origins

Origins (their own test CA, which only the appliance trusts through [upstream] ca_file):
  198.51.100.10  HTTP :80, HTTPS :443 for site.test, pinned.test, denied.test
                 (also on 2001:db8:3::10, where site.test has its AAAA)
  198.51.100.11  WebSocket echo :80 (ws://) and :443 (wss://) for ws.test
  198.51.100.12  HTTPS :443 with a certificate from a CA nobody trusts, for bad.test
Real curl, Python `websockets` and Node's http2 run in the client namespace; the appliance
runs in its own namespace with the transparent listeners on the wildcard address.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from datetime import datetime, timezone

import pytest

from .conftest import HERE, REPO, child_env, read_access_log, require_tool, wait_for_record
from .netns import TestNetwork, require_network_tools

ORIGIN3_IP4 = "198.51.100.12"
NAMES = {"site.test": [TestNetwork.origin_ip4, TestNetwork.origin_ip6], "pinned.test": TestNetwork.origin_ip4,
         "denied.test": TestNetwork.origin_ip4, "ws.test": TestNetwork.origin2_ip4,
         "bad.test": ORIGIN3_IP4}

RULES = """
[[rule]]
name = "denied site"
action = "deny"
dst = ["denied.test"]

[[rule]]
name = "pinned app"
action = "passthrough"
dst = ["pinned.test"]

[[rule]]
name = "inspected sites"
action = "intercept"
dst = ["site.test", "ws.test", "bad.test"]
ports = [443]

[[rule]]
name = "not that address"
action = "deny"
dst = ["198.51.100.12"]
ports = [80]

[[rule]]
name = "clients"
action = "allow"
src = ["192.0.2.0/24", "2001:db8:2::/64"]
"""


def _issue(root, common_name: str, names: list[str]):
    """(CA certificate, server chain, key) for `names`, from the CA in `root` (made once)."""
    from certs.authority import CertificateAuthority
    from certs.leaf import issue_files
    now = datetime.now(timezone.utc)
    ca = CertificateAuthority.load_or_create(root, now, common_name=common_name)
    cert, key = issue_files(ca, names, root, names[0], now, 30)
    return ca.cert_path, cert, key


@pytest.fixture(scope="module")
def net(tmp_path_factory):
    """The network, its origins and the appliance, shared by this module's tests."""
    require_network_tools()
    require_tool("curl")
    work = tmp_path_factory.mktemp("transparent")
    origin_ca, site_cert, site_key = _issue(work / "origin-ca", "Test Origin CA",
                                            ["site.test", "pinned.test", "denied.test"])
    _, ws_cert, ws_key = _issue(work / "origin-ca", "Test Origin CA", ["ws.test"])
    _, bad_cert, bad_key = _issue(work / "rogue-ca", "Rogue CA", ["bad.test"])
    with TestNetwork() as network:
        network.ca = {"origin": origin_ca}
        network.run(network.origin, ["ip", "addr", "add", f"{ORIGIN3_IP4}/24", "dev", network.origin_if],
                    check=True)
        env = child_env()
        py = sys.executable
        network.spawn(network.origin, [py, str(HERE / "origin.py"), "80", network.origin_ip4], env=env)
        network.spawn(network.origin, [py, str(HERE / "origin.py"), "80", network.origin_ip6], env=env)
        network.spawn(network.origin, [py, str(HERE / "origin.py"), "8080", network.origin_ip4], env=env)
        for address in (network.origin_ip4, network.origin_ip6):
            network.spawn(network.origin, [py, str(HERE / "origin.py"), "443", address,
                                           str(site_cert), str(site_key)], env=env)
        network.spawn(network.origin, [py, str(HERE / "origin.py"), "443", ORIGIN3_IP4,
                                       str(bad_cert), str(bad_key)], env=env)
        ws_env = dict(env, WS_ORIGIN_HOST=network.origin2_ip4)
        network.spawn(network.origin, [py, str(HERE / "ws_origin.py"), "80"], env=ws_env)
        network.spawn(network.origin, [py, str(HERE / "ws_origin.py"), "443", str(ws_cert), str(ws_key)],
                      env=ws_env)
        network.hosts(network.client, NAMES)
        network.hosts(network.appliance, NAMES)
        for family in (4, 6):
            network.redirect(80, 3129, family)
            network.redirect(443, 3130, family)
        network.app_dir = work / "appliance"
        network.app_dir.mkdir()
        (network.app_dir / "appliance.toml").write_text(textwrap.dedent(f"""\
            [appliance]
            name = "gateway.test"
            state_dir = "var"

            [listen]
            transparent_http = ["0.0.0.0:3129", "[::]:3129"]
            transparent_tls = ["0.0.0.0:3130", "[::]:3130"]
            admin = "127.0.0.1:9090"

            [upstream]
            ca_file = "{origin_ca}"

            [log]
            access_log = "access.log"
            level = "debug"
            """) + RULES)
        network.app = network.spawn(network.appliance, [py, "-m", "appliance", "run", "--config",
                                                        str(network.app_dir / "appliance.toml")],
                                    env=env, cwd=str(REPO))
        for host, port in ((network.origin_ip4, 80), (network.origin_ip4, 443), (ORIGIN3_IP4, 443),
                           (network.origin_ip6, 80), (network.origin_ip6, 443), (network.origin_ip4, 8080),
                           (network.origin2_ip4, 80), (network.origin2_ip4, 443)):
            network.wait_port(network.appliance, host, port)
        network.wait_port(network.appliance, "127.0.0.1", 9090)
        network.appliance_ca = network.app_dir / "var" / "ca" / "ca.pem"
        yield network


def client_curl(net, *args: str) -> subprocess.CompletedProcess:
    return net.run(net.client, ["curl", "-sS", "--noproxy", "*", "--max-time", "20", *args])


def records(net) -> list[dict]:
    return read_access_log(net.app_dir / "access.log")


def wait_record(net, predicate, timeout: float = 10.0) -> dict:
    return wait_for_record(net.app_dir / "access.log", predicate, timeout, lambda: net.log(net.app)[-3000:])


def client_python(net, code: str) -> dict:
    """Run a Python snippet in the client namespace; it prints one JSON line."""
    r = net.run(net.client, [sys.executable, "-c", textwrap.dedent(code)], env=child_env())
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


PEER_CERT = """
    import json, socket, ssl
    context = ssl.create_default_context(cafile={cafile!r})
    with socket.create_connection(({host!r}, 443), timeout=10) as sock:
        with context.wrap_socket(sock, server_hostname={host!r}) as tls:
            cert = tls.getpeercert()
    print(json.dumps({{"issuer": dict(x[0] for x in cert["issuer"])["commonName"],
                      "san": cert["subjectAltName"]}}))
"""


# --- port 80 ------------------------------------------------------------------------------------

def test_port_80_is_intercepted_and_logged(net):
    r = client_curl(net, "-4", "http://site.test/echo?t=80")
    assert r.returncode == 0, r.stderr
    echo = json.loads(r.stdout)
    assert echo["query"] == {"t": "80"}
    assert ["Via", "1.1 gateway.test"] in echo["headers"]
    record = wait_record(net, lambda r: r["target"] == "http://site.test/echo?t=80")
    assert record["listener"] == "transparent_http" and record["status"] == 200
    assert record["upstream"] == net.origin_ip4 and record["client"] == net.client_ip4
    assert record["rule"] == "clients"


def test_port_80_over_ipv6(net):
    """ip6tables REDIRECT and IP6T_SO_ORIGINAL_DST: the IPv6 destination is the one dialled."""
    r = client_curl(net, "-6", "http://site.test/echo?t=v6")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["query"] == {"t": "v6"}
    record = wait_record(net, lambda r: r["target"] == "http://site.test/echo?t=v6")
    assert record["listener"] == "transparent_http" and record["status"] == 200
    assert record["upstream"] == net.origin_ip6 and record["client"] == net.client_ip6


def test_port_443_intercepted_over_ipv6(net):
    r = client_curl(net, "-6", "--cacert", str(net.appliance_ca), "https://site.test/echo?t=v6tls")
    assert r.returncode == 0, r.stderr
    record = wait_record(net, lambda r: r["target"] == "https://site.test/echo?t=v6tls")
    assert record["listener"] == "transparent_tls" and record["upstream"] == net.origin_ip6


def test_tproxy_instead_of_redirect(net):
    """TPROXY (mangle table): nothing is rewritten; the listener, which has IP_TRANSPARENT,
    accepts a connection addressed to the origin, and its own address is the destination."""
    a = net.appliance
    for argv in (["iptables", "-t", "mangle", "-A", "PREROUTING", "-i", net.appliance_client_if, "-p", "tcp",
                  "--dport", "8080", "-j", "TPROXY", "--on-port", "3129", "--tproxy-mark", "0x1/0x1"],
                 ["ip", "rule", "add", "fwmark", "0x1/0x1", "lookup", "100"],
                 ["ip", "route", "add", "local", "0.0.0.0/0", "dev", "lo", "table", "100"]):
        r = net.run(a, argv)
        assert r.returncode == 0, r.stderr
    r = client_curl(net, "-4", "http://site.test:8080/echo?t=tproxy")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["query"] == {"t": "tproxy"}
    record = wait_record(net, lambda r: r["target"] == "http://site.test:8080/echo?t=tproxy")
    assert record["listener"] == "transparent_http" and record["upstream"] == net.origin_ip4


def test_a_host_that_does_not_match_the_address_is_not_believed(net):
    """Host says site.test (allowed) but the client dialled .12, which policy denies on port 80."""
    r = client_curl(net, "-H", "Host: site.test", "-w", "\n%{http_code}", f"http://{ORIGIN3_IP4}/echo?t=spoof")
    assert r.stdout.rsplit("\n", 1)[1] == "403"
    record = wait_record(net, lambda r: r["target"].endswith("/echo?t=spoof"))
    assert record["rule"] == "not that address" and record["status"] == 403


def test_websocket_upgrade_on_port_80(net):
    got = client_python(net, """
        import asyncio, json, websockets
        async def main():
            async with websockets.connect("ws://ws.test/chat") as ws:
                await ws.send("hello")
                return await ws.recv()
        print(json.dumps({"echo": asyncio.run(asyncio.wait_for(main(), 20))}))
    """)
    assert got == {"echo": "hello"}
    record = wait_record(net, lambda r: r["kind"] == "websocket" and r["listener"] == "transparent_http")
    assert record["status"] == 101 and record["target"] == "http://ws.test/chat"


# --- port 443 -----------------------------------------------------------------------------------

def test_port_443_passthrough_shows_the_origins_own_certificate(net):
    cert = client_python(net, PEER_CERT.format(cafile=str(net.ca["origin"]), host="pinned.test"))
    assert cert["issuer"] == "Test Origin CA"
    r = client_curl(net, "--cacert", str(net.ca["origin"]), "https://pinned.test/echo?t=pass")
    assert r.returncode == 0 and json.loads(r.stdout)["query"] == {"t": "pass"}
    assert not any(["Via", "1.1 gateway.test"] == h for h in json.loads(r.stdout)["headers"])
    record = wait_record(net, lambda r: r["listener"] == "transparent_tls" and r["target"] == "pinned.test:443"
                         and r["bytes_down"] > 0)
    assert record["rule"] == "pinned app" and record["kind"] == "tunnel"
    assert record["upstream"] == net.origin_ip4


def test_port_443_intercepted_with_a_leaf_for_the_sni(net):
    cert = client_python(net, PEER_CERT.format(cafile=str(net.appliance_ca), host="site.test"))
    assert cert["issuer"] == "Appliance CA" and cert["san"] == [["DNS", "site.test"]]
    r = client_curl(net, "-4", "--cacert", str(net.appliance_ca), "-w", "\n%{http_version}",
                    "https://site.test/echo?t=intercepted")
    assert r.returncode == 0, r.stderr
    body, version = r.stdout.rsplit("\n", 1)
    assert version == "2" and json.loads(body)["query"] == {"t": "intercepted"}
    record = wait_record(net, lambda r: r["target"] == "https://site.test/echo?t=intercepted")
    assert record["listener"] == "transparent_tls" and record["protocol"] == "HTTP/2"
    assert record["status"] == 200 and record["upstream"] == net.origin_ip4


def test_port_443_intercepted_over_http1(net):
    r = client_curl(net, "--http1.1", "--cacert", str(net.appliance_ca), "https://site.test/echo?t=h1")
    assert r.returncode == 0, r.stderr
    record = wait_record(net, lambda r: r["target"] == "https://site.test/echo?t=h1")
    assert record["protocol"] == "HTTP/1.1"


def test_wss_intercepted(net):
    got = client_python(net, f"""
        import asyncio, json, ssl, websockets
        context = ssl.create_default_context(cafile={str(net.appliance_ca)!r})
        async def main():
            async with websockets.connect("wss://ws.test/chat", ssl=context) as ws:
                await ws.send("over tls")
                return await ws.recv()
        print(json.dumps({{"echo": asyncio.run(asyncio.wait_for(main(), 20))}}))
    """)
    assert got == {"echo": "over tls"}
    record = wait_record(net, lambda r: r["kind"] == "websocket" and r["listener"] == "transparent_tls")
    assert record["status"] == 101 and record["target"] == "https://ws.test/chat"


def test_rfc8441_websocket_on_an_intercepted_http2_connection(net):
    """The intercepted client speaks HTTP/2 to us and sees SETTINGS_ENABLE_CONNECT_PROTOCOL: its
    wss:// goes as an extended CONNECT, which becomes an HTTP/1.1 Upgrade to the origin."""
    node = require_tool("node")
    opts = {"proxy": "https://ws.test", "servername": "ws.test", "ca": str(net.appliance_ca),
            "mode": "websocket", "origin": "ws.test", "scheme": "https", "messages": ["h2 hello"]}
    r = net.run(net.client, [node, str(HERE / "node" / "h2_client.js"), json.dumps(opts)])
    result = json.loads(r.stdout.strip().splitlines()[-1])
    assert result.get("messages") == ["h2 hello"], (result, r.stderr)
    record = wait_record(net, lambda r: r["kind"] == "websocket" and r["protocol"] == "HTTP/2"
                         and r["listener"] == "transparent_tls")
    assert record["status"] == 200


def test_origin_with_a_bad_certificate_is_refused_with_the_reason(net):
    r = client_curl(net, "--cacert", str(net.appliance_ca), "-w", "\n%{http_code}", "https://bad.test/")
    assert r.returncode == 0, r.stderr
    body, status = r.stdout.rsplit("\n", 1)
    assert status == "502" and "origin certificate verification failed" in body
    record = wait_record(net, lambda r: r["status"] == 502 and "bad.test" in r["target"])
    assert record["error"].startswith("upstream tls: origin certificate verification failed")


def test_denied_sni_gets_a_tls_alert(net):
    r = client_curl(net, "--cacert", str(net.ca["origin"]), "https://denied.test/")
    assert r.returncode == 35 and "access denied" in r.stderr.lower(), r.stderr
    record = wait_record(net, lambda r: r["target"] == "denied.test:443")
    assert record["rule"] == "denied site" and record["error"] == "denied: denied site"


def test_no_sni_follows_the_default(net):
    """An IP literal carries no SNI: [intercept] no_sni = passthrough (the default)."""
    r = client_curl(net, "-k", f"https://{net.origin_ip4}/echo?t=nosni")
    assert r.returncode == 0, r.stderr
    record = wait_record(net, lambda r: r["target"] == f"{net.origin_ip4}:443" and r["bytes_down"] > 0)
    assert record["kind"] == "tunnel" and record["rule"] == "clients"


def test_direct_connection_to_the_transparent_port_is_refused(net):
    r = net.run(net.appliance, ["curl", "-sS", "--noproxy", "*", "-w", "\n%{http_code}",
                                "http://127.0.0.1:3129/"])
    assert r.stdout.rsplit("\n", 1)[1] == "400"
    assert "only serves connections redirected" in r.stdout


def _reload(net, text: str) -> None:
    """Write the config and SIGHUP the appliance (by its PID); wait for it to take the file."""
    import os
    import signal
    import time
    before = net.log(net.app).count("config reloaded")
    (net.app_dir / "appliance.toml").write_text(text)
    os.kill(net.app.pid, signal.SIGHUP)
    deadline = time.monotonic() + 10
    for _ in range(200):
        if net.log(net.app).count("config reloaded") > before or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert net.log(net.app).count("config reloaded") > before, net.log(net.app)[-2000:]


def test_no_sni_deny_and_intercept_after_a_reload(net):
    """[intercept] no_sni, changed by a reload: "deny" answers an alert; "intercept" mints a
    leaf for the IP address, and the origin, whose certificate names no IP, is refused (502)."""
    original = (net.app_dir / "appliance.toml").read_text()
    try:
        _reload(net, original.replace("[log]", '[intercept]\nno_sni = "deny"\n\n[log]'))
        r = client_curl(net, "-k", f"https://{net.origin_ip4}/echo?t=nosni-deny")
        assert r.returncode == 35, r.stderr
        record = wait_record(net, lambda r: r["target"] == f"{net.origin_ip4}:443"
                             and (r["error"] or "").startswith("denied: no server name"))
        assert record["kind"] == "tunnel"

        _reload(net, original.replace("[log]", '[intercept]\nno_sni = "intercept"\n\n[log]'))
        cert = client_python(net, PEER_CERT.format(cafile=str(net.appliance_ca), host=net.origin_ip4))
        assert cert["issuer"] == "Appliance CA" and cert["san"] == [["IP Address", net.origin_ip4]]
        r = client_curl(net, "--cacert", str(net.appliance_ca), "-w", "\n%{http_code}",
                        f"https://{net.origin_ip4}/echo?t=nosni-intercept")
        body, status = r.stdout.rsplit("\n", 1)
        assert status == "502" and "origin certificate verification failed" in body
    finally:
        _reload(net, original)
