"""Destination policy through the transparent front end (hostile-input suite, group 4).

The same network of namespaces as tests/e2e/test_transparent.py (tests/e2e/netns.py):

    client 192.0.2.2 ──▶ appliance (iptables REDIRECT :80 → 3129, :443 → 3130) ──▶ origin ns

with the packaged config's own deny rules (test_hostile_destinations.packaged_deny_rules) in front
of an allow rule for the client network. The origin namespace also holds the metadata addresses
169.254.169.254, 100.100.100.200 and fd00:ec2::254 (on its loopback, routed there from the
appliance), each with a tripwire listener that notes every connection it accepts; another tripwire
listens on the appliance's own loopback (127.0.0.1, ::1) on ports 80 and 443. Cases:
  1. an original destination (SO_ORIGINAL_DST) that the packaged rules forbid: 403 on port 80,
     a TLS access_denied alert on 443, the rule in the access log, nothing dialled;
  2. an original destination that is one of the appliance's own listeners (a REDIRECT of a port
     we listen on): refused with the built-in forwarding-loop rule; a connection made to the
     transparent port itself is refused as not redirected (400);
  3. a Host header (or TLS SNI) naming a forbidden host while the client dialled an allowed origin:
     the claim is not believed, the request goes to the address dialled and nowhere else;
  4. the control: allowed destinations still work.
"""

from __future__ import annotations

import json
import sys
import textwrap
import time

import pytest

from appliance.policy import FORWARDING_LOOP

from .conftest import HERE, REPO, child_env, require_tool
from .netns import TestNetwork, missing_requirements
from .test_hostile_destinations import PACKAGED_DENIALS, packaged_deny_rules
from .test_transparent import client_curl, records, wait_record

METADATA4 = "169.254.169.254"
ALIBABA_METADATA = "100.100.100.200"
METADATA6 = "fd00:ec2::254"
NAMES = {"site.test": TestNetwork.origin_ip4, "metadata.test": METADATA4}
RULES = packaged_deny_rules() + """
[[rule]]
name = "clients"
action = "allow"
src = ["192.0.2.0/24", "2001:db8:2::/64"]
"""

# A listener that notes each connection it accepts ("accepted ADDRESS:PORT"); runs in a namespace
# (an in-process listener cannot), bounded in time, stopped by its PID at teardown.
TRIPWIRE = """
import select, socket, sys, time
listeners = []
for spec in sys.argv[1:]:
    host, port = spec.rsplit(":", 1)
    host = host.strip("[]")
    s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((host, int(port)))
    s.listen(64)
    listeners.append(s)
print("listening", flush=True)
deadline = time.monotonic() + 3600
while time.monotonic() < deadline:
    for s in select.select(listeners, [], [], 1.0)[0]:
        conn, peer = s.accept()
        print("accepted", "[%s]:%d" % conn.getsockname()[:2], "from", peer[0], flush=True)
        conn.close()
"""


def _spawn_tripwire(net, ns: str, addresses: list[str]):
    proc = net.spawn(ns, [sys.executable, "-c", TRIPWIRE, *addresses], env=child_env())
    for _ in range(200):                          # bounded: 10 s
        if "listening" in net.log(proc) or proc.poll() is not None:
            break
        time.sleep(0.05)
    assert "listening" in net.log(proc), net.log(proc)
    return proc


def tripped(net) -> list[str]:
    """Every connection the tripwires have accepted so far."""
    return [line for proc in net.tripwires for line in net.log(proc).splitlines()
            if line.startswith("accepted")]


@pytest.fixture(scope="module")
def net(tmp_path_factory, origin_tls):
    problems = missing_requirements()
    if problems:
        pytest.fail("network-namespace tests need root, iproute2 and iptables: " + "; ".join(problems))
    require_tool("curl")
    work = tmp_path_factory.mktemp("hostile-transparent")
    with TestNetwork() as network:
        o, a = network.origin, network.appliance
        for argv in (["ip", "addr", "add", f"{METADATA4}/32", "dev", "lo"],
                     ["ip", "addr", "add", f"{ALIBABA_METADATA}/32", "dev", "lo"],
                     ["ip", "-6", "addr", "add", f"{METADATA6}/128", "dev", "lo", "nodad"]):
            network.run(o, argv, check=True)
        for argv in (["ip", "route", "add", f"{METADATA4}/32", "via", network.origin_ip4],
                     ["ip", "route", "add", f"{ALIBABA_METADATA}/32", "via", network.origin_ip4],
                     ["ip", "-6", "route", "add", f"{METADATA6}/128", "via", network.origin_ip6]):
            network.run(a, argv, check=True)
        env = child_env()
        network.spawn(o, [sys.executable, str(HERE / "origin.py"), "80", network.origin_ip4], env=env)
        network.spawn(o, [sys.executable, str(HERE / "origin.py"), "443", network.origin_ip4,
                          str(origin_tls["cert"]), str(origin_tls["key"])], env=env)
        network.tripwires = [
            _spawn_tripwire(network, o, [f"{METADATA4}:80", f"{METADATA4}:443", f"{ALIBABA_METADATA}:80",
                                         f"[{METADATA6}]:80"]),
            _spawn_tripwire(network, a, ["127.0.0.1:80", "[::1]:80", "127.0.0.1:443", "[::1]:443"])]
        network.hosts(network.client, NAMES)
        network.hosts(a, NAMES)
        for family in (4, 6):
            network.redirect(80, 3129, family)
            network.redirect(443, 3130, family)
            network.redirect(3129, 3129, family)     # a client dialling the transparent ports
            network.redirect(3130, 3130, family)     # themselves, on another of our addresses
        network.redirect(3128, 3129)                 # the explicit proxy's port, intercepted
        network.app_dir = work / "appliance"
        network.app_dir.mkdir()
        (network.app_dir / "appliance.toml").write_text(textwrap.dedent("""\
            [appliance]
            name = "gateway.test"
            state_dir = "var"

            [listen]
            transparent_http = ["0.0.0.0:3129", "[::]:3129"]
            transparent_tls = ["0.0.0.0:3130", "[::]:3130"]
            http = "0.0.0.0:3128"
            admin = "127.0.0.1:9090"

            [log]
            access_log = "access.log"
            level = "debug"
            """) + RULES)
        network.app = network.spawn(a, [sys.executable, "-m", "appliance", "run", "--config",
                                        str(network.app_dir / "appliance.toml")], env=env, cwd=str(REPO))
        for host, port in ((network.origin_ip4, 80), (network.origin_ip4, 443)):
            network.wait_port(a, host, port)
        network.wait_port(a, "127.0.0.1", 9090)
        network.wait_port(a, "127.0.0.1", 3128)
        # the tripwires are reachable from the appliance: had it dialled them, they would know
        for host, port in ((METADATA4, 80), (METADATA4, 443), (ALIBABA_METADATA, 80), (METADATA6, 80),
                           ("127.0.0.1", 80), ("::1", 80), ("127.0.0.1", 443), ("::1", 443)):
            network.wait_port(a, host, port)
        assert len(tripped(network)) == 8, tripped(network)
        yield network


def records_since(net, before: int, expected: int, timeout: float = 0.5) -> list[dict]:
    """The records written after the first `before`, waiting (bounded) for more than `expected`
    of them: a loop would add the records of the appliance's connections to itself."""
    deadline = time.monotonic() + timeout
    found = records(net)[before:]
    for _ in range(int(timeout / 0.05) + 1):
        if len(found) > expected or time.monotonic() > deadline:
            break
        time.sleep(0.05)
        found = records(net)[before:]
    return found


def http_status(r) -> tuple[str, str]:
    """(body, status) of a `client_curl(..., "-w", "\\n%{http_code}", ...)`."""
    body, _, status = r.stdout.rpartition("\n")
    return body, status


# --- 1. forbidden original destinations ---------------------------------------------------------

@pytest.mark.parametrize("url, rule", [
    (f"http://{METADATA4}/latest/meta-data/?t=meta4", "link-local"),
    (f"http://{ALIBABA_METADATA}/latest/meta-data/?t=alibaba", "cloud metadata"),
    (f"http://[{METADATA6}]/latest/meta-data/?t=meta6", "cloud metadata"),
    ("http://metadata.test/latest/meta-data/?t=byname", "link-local"),
])
def test_a_forbidden_original_destination_is_refused_on_port_80(net, url, rule):
    assert rule in PACKAGED_DENIALS
    before = tripped(net)
    body, status = http_status(client_curl(net, "-g", "-w", "\n%{http_code}", url))
    assert status == "403", body
    tag = url.rsplit("?", 1)[1]
    record = wait_record(net, lambda r: r["target"].endswith(tag))
    client = net.client_ip6 if "[" in url else net.client_ip4
    assert record["listener"] == "transparent_http" and record["client"] == client
    assert record["rule"] == rule and record["status"] == 403 and not record["upstream"], record
    assert tripped(net) == before


def test_a_host_naming_an_allowed_site_does_not_unlock_the_metadata_address(net):
    """The client dials 169.254.169.254 and claims `Host: site.test` (allowed, but it resolves
    elsewhere): the claim is not believed, policy sees the address dialled."""
    before = tripped(net)
    body, status = http_status(client_curl(net, "-H", "Host: site.test", "-w", "\n%{http_code}",
                                           f"http://{METADATA4}/latest/meta-data/?t=claims-site"))
    assert status == "403", body
    record = wait_record(net, lambda r: r["target"].endswith("?t=claims-site"))
    assert record["rule"] == "link-local" and record["status"] == 403 and not record["upstream"]
    assert tripped(net) == before


@pytest.mark.parametrize("host", [METADATA4, "metadata.test"])
def test_a_forbidden_original_destination_on_port_443_gets_an_alert(net, host):
    before = tripped(net)
    r = client_curl(net, "-k", f"https://{host}/latest/meta-data/")
    assert r.returncode == 35 and "access denied" in r.stderr.lower(), r.stderr
    record = wait_record(net, lambda r: r["listener"] == "transparent_tls" and r["target"] == f"{host}:443")
    assert record["rule"] == "link-local" and record["error"] == "denied: link-local", record
    assert not record["upstream"]
    assert tripped(net) == before


# --- 2. the appliance's own listeners as the original destination: a loop ------------------------

@pytest.mark.parametrize("url", [
    "http://192.0.2.1:3128/loop?t=explicit-port",          # REDIRECTed away from our explicit proxy
    "http://198.51.100.1:3129/loop?t=transparent-port",     # the transparent listener itself
    "http://[2001:db8:3::1]:3129/loop?t=transparent-port-v6",
])
def test_our_own_listener_as_original_destination_is_a_loop(net, url):
    before, records_before = tripped(net), len(records(net))
    body, status = http_status(client_curl(net, "-g", "-w", "\n%{http_code}", url))
    assert status == "403", body
    tag = url.rsplit("?", 1)[1]
    record = wait_record(net, lambda r: r["target"].endswith(tag))
    client = net.client_ip6 if "[" in url else net.client_ip4
    assert record["listener"] == "transparent_http" and record["client"] == client
    assert record["rule"] == FORWARDING_LOOP and record["status"] == 403 and not record["upstream"]
    assert tripped(net) == before
    # one record, the client's: the appliance never became its own client
    assert [r["client"] for r in records_since(net, records_before, 1)] == [client]


def test_our_own_tls_listener_as_original_destination_is_a_loop(net):
    records_before = len(records(net))
    r = client_curl(net, "-k", "https://198.51.100.1:3130/")
    assert r.returncode == 35 and "access denied" in r.stderr.lower(), r.stderr
    record = wait_record(net, lambda r: r["target"] == "198.51.100.1:3130")
    assert record["listener"] == "transparent_tls" and record["rule"] == FORWARDING_LOOP
    assert record["error"] == f"denied: {FORWARDING_LOOP}" and not record["upstream"]
    assert [r["client"] for r in records_since(net, records_before, 1)] == [net.client_ip4]


def test_the_transparent_port_dialled_on_its_own_address_is_not_a_redirect(net):
    """192.0.2.1:3129 is where REDIRECT delivers: SO_ORIGINAL_DST equals the listener, so the
    connection was not intercepted and there is nowhere to send it."""
    body, status = http_status(client_curl(net, "-w", "\n%{http_code}", "http://192.0.2.1:3129/"))
    assert status == "400" and "only serves connections redirected" in body
    record = wait_record(net, lambda r: r["listener"] == "transparent_http" and r["client"] == net.client_ip4
                         and "directly" in (r["error"] or ""))
    assert record["error"].startswith("protocol: ") and not record["upstream"]


# --- 3. a forbidden Host or SNI on a connection to an allowed origin ----------------------------

@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "[::1]", METADATA4, "metadata.test",
                                  "127.0.0.1:9090", "198.51.100.1:3128"])
def test_a_forbidden_host_header_goes_only_to_the_address_dialled(net, host):
    """The Host field is only a claim: not resolving to 198.51.100.10, it is not believed, and the
    request goes to 198.51.100.10:80, the original destination, never to the Host (nor its port)."""
    before = tripped(net)
    tag = f"t=host-{host}"
    body, status = http_status(client_curl(net, "-g", "-H", f"Host: {host}", "-w", "\n%{http_code}",
                                           f"http://{net.origin_ip4}/echo?{tag}"))
    assert status == "200", body
    echo = json.loads(body)
    assert echo["query"] == {"t": f"host-{host}"}                      # the origin answered
    record = wait_record(net, lambda r: r["target"].endswith(tag))
    assert record["listener"] == "transparent_http" and record["rule"] == "clients"
    assert record["upstream"] == net.origin_ip4 and record["status"] == 200, record
    assert tripped(net) == before
    assert "does not resolve to the intercepted address" in net.log(net.app)


@pytest.mark.parametrize("name", ["localhost", "metadata.test"])
def test_a_forbidden_sni_goes_only_to_the_address_dialled(net, origin_tls, name):
    """The ClientHello names a forbidden host, the client dialled the origin on 443: passthrough
    to 198.51.100.10 (the origin's certificate names localhost, so it verifies for that name)."""
    before = tripped(net)
    trust = ["--cacert", str(origin_tls["ca"])] if name == "localhost" else ["-k"]
    r = client_curl(net, *trust, "--connect-to", f"{name}:443:{net.origin_ip4}:443",
                    f"https://{name}/echo?t=sni-{name}")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["query"] == {"t": f"sni-{name}"}
    record = wait_record(net, lambda r: r["listener"] == "transparent_tls" and r["target"] == f"{name}:443"
                         and r["bytes_down"] > 0)
    assert record["upstream"] == net.origin_ip4 and record["rule"] == "clients" and record["kind"] == "tunnel"
    assert tripped(net) == before


# --- 4. control ---------------------------------------------------------------------------------

def test_allowed_destinations_still_work(net):
    before = tripped(net)
    body, status = http_status(client_curl(net, "-w", "\n%{http_code}", "http://site.test/echo?t=control"))
    assert status == "200" and json.loads(body)["query"] == {"t": "control"}
    record = wait_record(net, lambda r: r["target"] == "http://site.test/echo?t=control")
    assert record["rule"] == "clients" and record["upstream"] == net.origin_ip4
    r = client_curl(net, "-k", f"https://{net.origin_ip4}/echo?t=control-tls")
    assert r.returncode == 0 and json.loads(r.stdout)["query"] == {"t": "control-tls"}, r.stderr
    record = wait_record(net, lambda r: r["listener"] == "transparent_tls"
                         and r["target"] == f"{net.origin_ip4}:443" and r["bytes_down"] > 0)
    assert record["rule"] == "clients" and record["upstream"] == net.origin_ip4
    assert tripped(net) == before
