"""The pac listener: the PAC file at /proxy.pac and /wpad.dat (conditional GET, regenerated on
reload), evaluated by an independent PAC engine (npm pac-resolver on QuickJS), and the CA."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import urllib.request

import pytest
from cryptography import x509

from .conftest import HERE, child_env, curl, free_port, require_tool

PAC_MIME = "application/x-ns-proxy-autoconfig"
PAC = """
[pac]
bypass = ["<local>", "localhost", ".corp.example", "*.lab.example", "10.0.0.0/8", "192.168.0.0/16", "fc00::/7"]
"""
RULES = """
[[rule]]
name = "hidden"
action = "deny"
dst = ["secret.example", "203.0.113.0/24"]

[[rule]]
name = "loopback"
action = "allow"
src = ["127.0.0.0/8", "::1"]
"""


def get(url: str, headers: dict | None = None) -> tuple[int, dict, bytes]:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with opener.open(request, timeout=10) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


@pytest.fixture
def pac_app(make_appliance):
    port = free_port()
    app = make_appliance(extra=PAC, rules=RULES, more_listeners=f'pac = "127.0.0.1:{port}"')
    app.pac_url = f"http://127.0.0.1:{port}"
    return app


def evaluate(tmp_path, pac: bytes, urls: list[str], hosts: dict[str, str]) -> dict:
    """FindProxyForURL for each URL, by pac-resolver; dnsResolve answers from `hosts` only."""
    node = require_tool("node")
    path = tmp_path / "served.pac"
    path.write_bytes(pac)
    r = subprocess.run([node, str(HERE / "node" / "pac_eval.js"),
                        json.dumps({"pac": str(path), "urls": urls, "hosts": hosts})],
                       capture_output=True, text=True, timeout=60, env=child_env(), stdin=subprocess.DEVNULL)
    result = json.loads(r.stdout.strip().splitlines()[-1])
    assert "error" not in result, result
    return result


def test_proxy_pac_and_wpad_dat_with_validators(pac_app):
    status, headers, body = get(f"{pac_app.pac_url}/proxy.pac")
    assert status == 200 and headers["Content-Type"] == PAC_MIME
    assert headers["ETag"].startswith('"') and headers["Last-Modified"].endswith(" GMT")
    assert body.startswith(b"// Proxy auto-config for proxy.test")
    assert get(f"{pac_app.pac_url}/wpad.dat")[2] == body
    status, headers304, body304 = get(f"{pac_app.pac_url}/wpad.dat", {"If-None-Match": headers["ETag"]})
    assert (status, body304) == (304, b"") and headers304["ETag"] == headers["ETag"]
    status, _, _ = get(f"{pac_app.pac_url}/proxy.pac", {"If-Modified-Since": headers["Last-Modified"]})
    assert status == 304
    r = curl("-sI", f"{pac_app.pac_url}/proxy.pac")             # HEAD: the head alone
    assert b"200 OK" in r.stdout and f"Content-Length: {len(body)}".encode() in r.stdout


def test_the_cli_prints_what_is_served(pac_app):
    import sys
    printed = subprocess.run([sys.executable, "-m", "appliance", "pac", "--config", str(pac_app.config_path)],
                             capture_output=True, timeout=60, env=child_env(), check=True).stdout
    assert printed == get(f"{pac_app.pac_url}/proxy.pac")[2]


def test_an_independent_pac_engine_reads_it_as_meant(pac_app, tmp_path):
    pac = get(f"{pac_app.pac_url}/proxy.pac")[2]
    proxied = f"HTTPS proxy.test:{pac_app.https_port}; PROXY proxy.test:{pac_app.http_port}; DIRECT"
    expected = {
        "http://intranet/": "DIRECT",                        # plain host name (<local>)
        "http://localhost:8080/": "DIRECT",
        "http://wiki.corp.example/": "DIRECT",               # .corp.example: subdomains ...
        "https://corp.example/": "DIRECT",                   # ... and the name itself
        "http://build.lab.example/": "DIRECT",               # *.lab.example: subdomains only
        "http://lab.example/": proxied,
        "http://10.20.30.40/": "DIRECT",                     # bypassed networks, by address
        "http://files.internal.test/": "DIRECT",             # a name resolving into 192.168/16
        "http://example.com/": proxied,                      # the outside world: HTTPS first
        "http://secret.example/": proxied,                   # deny rules are the proxy's business
        "http://203.0.113.7/": proxied,
    }
    got = evaluate(tmp_path, pac, list(expected), {"files.internal.test": "192.168.7.7",
                                                   "example.com": "198.51.100.80"})
    assert got == expected
    assert b"secret" not in pac and b"203.0.113" not in pac


def test_the_pac_is_regenerated_on_reload(pac_app):
    status, headers, before = get(f"{pac_app.pac_url}/proxy.pac")
    text = pac_app.config_path.read_text()
    pac_app.config_path.write_text(text.replace("[pac]\n", '[pac]\nproxies = ["HTTPS gw.example:443"]\n'))
    os.kill(pac_app.proc.pid, signal.SIGHUP)
    deadline = time.monotonic() + 10
    for _ in range(200):
        status, new_headers, after = get(f"{pac_app.pac_url}/proxy.pac", {"If-None-Match": headers["ETag"]})
        if status == 200 or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert status == 200 and new_headers["ETag"] != headers["ETag"]
    assert b'return "HTTPS gw.example:443; DIRECT";' in after and after != before


def test_ca_pem_and_der_with_their_mime_types(pac_app):
    status, headers, pem = get(f"{pac_app.pac_url}/ca.pem")
    assert status == 200 and headers["Content-Type"] == "application/x-pem-file"
    assert pem == pac_app.ca_path.read_bytes()
    status, headers, der = get(f"{pac_app.pac_url}/ca.der")
    assert status == 200 and headers["Content-Type"] == "application/x-x509-ca-cert"
    assert x509.load_der_x509_certificate(der) == x509.load_pem_x509_certificate(pem)
    assert x509.load_pem_x509_certificate(pem).subject.rfc4514_string() == "CN=Appliance CA"
