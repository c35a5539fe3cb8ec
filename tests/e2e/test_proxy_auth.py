"""Proxy authentication (RFC 9110 §11.7, Basic RFC 7617) on HTTP/1.1 and HTTP/2: 407 with a
challenge, users in rules, failures logged and throttled per client address."""

from __future__ import annotations

import base64
import json
import threading

import pytest

from appliance.protocols.proxy_auth import hash_password

from .conftest import curl
from .test_https_h2 import node

RULES = '''
[[rule]]
name = "staff"
action = "allow"
src = ["127.0.0.0/8"]
users = ["alice"]
'''


@pytest.fixture
def auth_app(make_appliance, tmp_path):
    users = tmp_path / "users"
    users.write_text(f"alice:{hash_password('s3cret:x', b'0123456789abcdef')}\n"
                     f"bob:{hash_password('hunter2', b'fedcba9876543210')}\n")
    return make_appliance(f'[auth]\nusers_file = "{users}"\nrealm = "Test Realm"\n', rules=RULES)


def test_no_credentials_is_407_with_a_basic_challenge(auth_app, origin):
    r = curl("-x", auth_app.proxy, "-D", "-", "-o", "/dev/null", f"{origin}/echo?auth=none")
    head = r.stdout.decode()
    assert head.startswith("HTTP/1.1 407 ")
    assert 'Proxy-Authenticate: Basic realm="Test Realm", charset="UTF-8"' in head
    record = auth_app.wait_record(lambda r: r["target"].endswith("auth=none"))
    assert record["status"] == 407 and record["error"].startswith("auth")


def test_valid_credentials_pass_and_are_logged_not_forwarded(auth_app, origin):
    r = curl("-x", auth_app.proxy, "-U", "alice:s3cret:x", f"{origin}/echo?auth=ok")
    assert r.returncode == 0, r.stderr
    headers = {k.lower() for k, _ in json.loads(r.stdout)["headers"]}
    assert "proxy-authorization" not in headers           # credentials stay with the proxy
    record = auth_app.wait_record(lambda r: r["target"].endswith("auth=ok"))
    assert record["user"] == "alice" and record["status"] == 200


def test_connect_with_credentials(auth_app, origin):
    r = curl("-p", "-x", auth_app.proxy, "-U", "alice:s3cret:x", f"{origin}/echo?auth=tunnel")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["query"] == {"auth": "tunnel"}


def test_wrong_password_is_407_and_logged(auth_app, origin):
    r = curl("-x", auth_app.proxy, "-U", "alice:wrong", "-w", "%{http_code}", "-o", "/dev/null",
             f"{origin}/echo")
    assert r.stdout == b"407"
    assert "proxy authentication failed for user 'alice' from 127.0.0.1" in auth_app.proc.output()


def test_rule_users_decide_after_authentication(auth_app, origin):
    r = curl("-x", auth_app.proxy, "-U", "bob:hunter2", "-w", "\n%{http_code}", f"{origin}/echo")
    body, code = r.stdout.rsplit(b"\n", 1)
    assert code == b"403" and b"default deny" in body      # bob is known, but no rule admits him


def test_http2_stream_needs_credentials_too(auth_app, origin):
    target = origin.split("//")[1]
    refused = node(auth_app, "get", origin=target)
    assert refused["status"] == 407
    assert refused["headers"]["proxy-authenticate"].startswith('Basic realm="Test Realm"')
    token = base64.b64encode(b"alice:s3cret:x").decode()
    ok = node(auth_app, "get", origin=target, headers={"proxy-authorization": f"Basic {token}"})
    assert ok["status"] == 200
    record = auth_app.wait_record(lambda r: r["protocol"] == "HTTP/2" and r["status"] == 200)
    assert record["user"] == "alice"


def test_brute_force_slows_down_that_client_only(auth_app, origin):
    """After a few failures from 127.0.0.1 its answers are delayed; 127.0.0.2 is served meanwhile."""
    for _ in range(5):                              # the next failure waits 1 s before its 407
        curl("-x", auth_app.proxy, "-U", "alice:guess", "-o", "/dev/null", f"{origin}/echo")
    done = []

    def slow_guess():
        curl("-x", auth_app.proxy, "-U", "alice:guess", "-o", "/dev/null", f"{origin}/echo")
        done.append("attacker")

    attacker = threading.Thread(target=slow_guess)
    attacker.start()
    r = curl("--interface", "127.0.0.2", "-x", auth_app.proxy, "-U", "alice:s3cret:x",
             "-w", "%{http_code}", "-o", "/dev/null", f"{origin}/echo")
    done.append("other client")
    attacker.join(30)
    assert r.stdout == b"200"
    assert done == ["other client", "attacker"]             # the other client did not wait
    assert "answering after" in auth_app.proc.output()
