"""`appliance.policy`: an Intent becomes a Decision by the first matching rule, else deny.

Rules come from `appliance.config.parse`, so these tests read like the `[[rule]]` tables an admin
writes.
"""

from __future__ import annotations

import textwrap

import pytest

from appliance.config import parse
from appliance.policy import (CONNECT_PORT, DEFAULT_DENY, FORWARDING_LOOP, NOT_UNICAST, Decision, Intent,
                              decide, domain_matches, is_name, needs_addresses, refusal)


def rules(toml: str):
    return parse(textwrap.dedent(toml)).rules


def intent(host: str = "example.com", port: int = 80, client: str = "192.0.2.10", **kw) -> Intent:
    kw.setdefault("listener", "http")
    kw.setdefault("kind", "request")
    return Intent(client=client, host=host, port=port, **kw)


def test_no_rules_means_default_deny():
    decision = decide((), intent())
    assert decision == Decision("deny", DEFAULT_DENY, None)
    assert not decision.allowed


def test_no_matching_rule_means_default_deny():
    r = rules("""
        [[rule]]
        action = "allow"
        src = ["10.0.0.0/8"]
    """)
    assert decide(r, intent(client="192.0.2.1")) == Decision("deny", DEFAULT_DENY)


def test_empty_rule_matches_everything():
    r = rules("""
        [[rule]]
        name = "open"
        action = "allow"
    """)
    decision = decide(r, intent(host="anything.example", port=1, client="::1"))
    assert decision == Decision("allow", "open", 0)
    assert decision.allowed


def test_first_match_wins():
    r = rules("""
        [[rule]]
        name = "block-ads"
        action = "deny"
        dst = ["*.ads.example"]

        [[rule]]
        name = "lan"
        action = "allow"
        src = ["192.0.2.0/24"]

        [[rule]]
        name = "never reached for the LAN"
        action = "deny"
    """)
    assert decide(r, intent(host="x.ads.example")) == Decision("deny", "block-ads", 0)
    assert decide(r, intent(host="ads.example")) == Decision("allow", "lan", 1)
    assert decide(r, intent(client="198.51.100.1")) == Decision("deny", "never reached for the LAN", 2)


def test_unnamed_rules_are_named_by_index():
    r = rules("""
        [[rule]]
        action = "deny"
        ports = [25]

        [[rule]]
        action = "allow"
    """)
    assert decide(r, intent(port=25)) == Decision("deny", "rule[0]", 0)
    assert decide(r, intent(port=80)) == Decision("allow", "rule[1]", 1)


@pytest.mark.parametrize("action, allowed", [
    ("allow", True), ("deny", False), ("intercept", True), ("passthrough", True),
])
def test_every_action_is_reported(action, allowed):
    r = rules(f"""
        [[rule]]
        name = "r"
        action = "{action}"
    """)
    decision = decide(r, intent())
    assert decision.action == action
    assert decision.allowed is allowed


# --- source ---------------------------------------------------------------------------------

@pytest.mark.parametrize("client, matches", [
    ("127.0.0.1", True),
    ("10.200.1.1", True),
    ("::1", True),
    ("fd00::5", True),
    ("::ffff:10.0.0.7", True),       # IPv4 client seen on a dual-stack socket
    ("11.0.0.1", False),
    ("2001:db8::1", False),
    ("not-an-address", False),
    ("", False),
])
def test_src_networks(client, matches):
    r = rules("""
        [[rule]]
        name = "local"
        action = "allow"
        src = ["127.0.0.0/8", "::1", "10.0.0.0/8", "fc00::/7"]
    """)
    assert decide(r, intent(client=client)).allowed is matches


# --- destination ----------------------------------------------------------------------------

@pytest.mark.parametrize("pattern, host, matches", [
    ("example.com", "example.com", True),
    ("example.com", "EXAMPLE.com.", True),
    ("example.com", "www.example.com", False),
    ("*.example.com", "www.example.com", True),
    ("*.example.com", "a.b.example.com", True),
    ("*.example.com", "example.com", False),
    ("*.example.com", "badexample.com", False),
    (".example.com", "example.com", True),
    (".example.com", "www.example.com", True),
    (".example.com", "badexample.com", False),
    (".example.com", "example.com.evil", False),
])
def test_domain_patterns(pattern, host, matches):
    assert domain_matches(pattern, host) is matches


def test_dst_domains_from_config():
    r = rules("""
        [[rule]]
        name = "corp"
        action = "allow"
        dst = ["Intranet.Example", "*.corp.example", ".svc.example", "bücher.example"]
    """)
    for host in ("intranet.example", "a.corp.example", "svc.example", "x.svc.example",
                 "xn--bcher-kva.example"):
        assert decide(r, intent(host=host)).allowed, host
    for host in ("corp.example", "intranet.example.org", "10.0.0.1"):
        assert not decide(r, intent(host=host)).allowed, host


def test_dst_networks_match_ip_literals():
    r = rules("""
        [[rule]]
        name = "no-internal"
        action = "deny"
        dst = ["127.0.0.0/8", "10.0.0.0/8", "::1", "fe80::/10"]

        [[rule]]
        name = "rest"
        action = "allow"
    """)
    for host in ("127.0.0.1", "10.1.2.3", "::1", "fe80::1"):
        assert decide(r, intent(host=host)).rule == "no-internal", host
    for host in ("192.0.2.1", "2001:db8::1", "example.com"):
        assert decide(r, intent(host=host)).rule == "rest", host


def test_dst_network_sees_ipv4_mapped_ipv6_literal():
    # http://[::ffff:127.0.0.1]/ reaches 127.0.0.1; a rule for 127.0.0.0/8 must catch it.
    r = rules("""
        [[rule]]
        name = "no-loopback"
        action = "deny"
        dst = ["127.0.0.0/8"]

        [[rule]]
        name = "rest"
        action = "allow"
    """)
    assert decide(r, intent(host="::ffff:127.0.0.1")).rule == "no-loopback"
    assert decide(r, intent(host="name.example", addresses=("::ffff:127.0.0.2",))).rule == "no-loopback"
    assert decide(r, intent(host="::ffff:192.0.2.1")).rule == "rest"


def test_dst_networks_match_resolved_addresses_of_a_name():
    r = rules("""
        [[rule]]
        name = "no-internal"
        action = "deny"
        dst = ["10.0.0.0/8", "fc00::/7"]

        [[rule]]
        name = "rest"
        action = "allow"
    """)
    sneaky = intent(host="sneaky.example", addresses=("192.0.2.1", "10.9.9.9"))
    assert needs_addresses(r, sneaky)
    assert decide(r, sneaky).rule == "no-internal"
    assert decide(r, intent(host="v6.example", addresses=("fd12::1",))).rule == "no-internal"
    assert decide(r, intent(host="fine.example", addresses=("192.0.2.1", "2001:db8::1"))).rule == "rest"
    assert decide(r, intent(host="unresolved.example")).rule == "rest"
    assert decide(r, intent(host="junk.example", addresses=("not-an-ip",))).rule == "rest"


def test_domain_pattern_never_matches_an_ip_literal():
    r = rules("""
        [[rule]]
        action = "allow"
        dst = [".example.com"]
    """)
    assert not decide(r, intent(host="192.0.2.1", addresses=())).allowed


def test_names_need_addresses_only_for_rules_testing_networks():
    """The rules resolve a name only when one tests destination networks; what they allow is
    resolved afterwards for the built-in refusals (admission), so a denied name is never looked up."""
    by_name = rules("""
        [[rule]]
        action = "allow"
        dst = [".example.com"]
    """)
    by_network = rules("""
        [[rule]]
        action = "deny"
        dst = ["10.0.0.0/8"]
    """)
    assert not needs_addresses(by_name, intent(host="www.example.com"))
    assert needs_addresses(by_network, intent(host="www.example.com"))
    assert not needs_addresses(by_network, intent(host="10.0.0.1"))
    assert is_name("example.com") and not is_name("10.0.0.1") and not is_name("::1")


# --- ports and users ------------------------------------------------------------------------

@pytest.mark.parametrize("port, matches", [
    (443, True), (8000, True), (8500, True), (8999, True), (7999, False), (9000, False), (80, False),
])
def test_ports_and_ranges(port, matches):
    r = rules("""
        [[rule]]
        name = "tls-and-alt"
        action = "allow"
        ports = [443, "8000-8999"]
    """)
    assert decide(r, intent(port=port)).allowed is matches


def test_users():
    r = rules("""
        [auth]
        users_file = "users.txt"

        [[rule]]
        name = "staff"
        action = "allow"
        users = ["alice", "bob"]
    """)
    assert decide(r, intent(user="alice")) == Decision("allow", "staff", 0)
    assert decide(r, intent(user="bob")).allowed
    assert not decide(r, intent(user="mallory")).allowed
    assert not decide(r, intent(user=None)).allowed
    assert not decide(r, intent(user="Alice")).allowed


def test_all_matchers_must_hold_together():
    r = rules("""
        [auth]
        users_file = "users.txt"

        [[rule]]
        name = "narrow"
        action = "allow"
        src = ["192.0.2.0/24"]
        dst = ["*.example.com"]
        ports = [443]
        users = ["alice"]
    """)
    good = dict(client="192.0.2.5", host="www.example.com", port=443, user="alice")
    assert decide(r, intent(**good)).allowed
    for change in ({"client": "198.51.100.5"}, {"host": "www.example.org"}, {"port": 80},
                   {"user": "bob"}):
        assert not decide(r, intent(**{**good, **change})).allowed, change


def test_decide_is_pure():
    r = rules("""
        [[rule]]
        action = "allow"
        dst = ["example.com"]
    """)
    i = intent()
    assert decide(r, i) == decide(r, i)
    assert i == intent()


# --- built-in refusals: what no rule can allow ----------------------------------------------

LISTEN = parse(textwrap.dedent("""
    [listen]
    http = ["127.0.0.1:3128", "[::1]:3128"]
    https = "0.0.0.0:8443"
    socks5 = "[::]:1080"
    admin = "127.0.0.1:9090"
""")).listen


def never_local(address) -> bool:
    return False


def only(*local: str):
    return lambda address: str(address) in local


@pytest.mark.parametrize("host, addresses", [
    ("0.0.0.0", ()), ("::", ()), ("0.1.2.3", ()), ("224.0.0.1", ()), ("ff02::1", ()),
    ("255.255.255.255", ()), ("240.0.0.1", ()), ("::ffff:0.0.0.0", ()),
    ("zero.example", ("0.0.0.0",)), ("multicast.example", ("192.0.2.1", "239.1.2.3")),
])
def test_a_destination_that_is_not_unicast_is_refused(host, addresses):
    assert refusal(intent(host=host, addresses=addresses), LISTEN, (), never_local) == NOT_UNICAST


@pytest.mark.parametrize("host, port, addresses, local, loop", [
    ("127.0.0.1", 3128, (), never_local, True),           # a listener's own address
    ("::1", 3128, (), never_local, True),
    ("::ffff:127.0.0.1", 9090, (), never_local, True),    # mapped: the same socket
    ("127.0.0.2", 3128, (), never_local, False),          # bound to 127.0.0.1 only: not us
    ("127.0.0.1", 3129, (), never_local, False),          # not a port we listen on
    ("proxy.example", 3128, ("127.0.0.1",), never_local, True),   # a name for it
    ("192.168.1.1", 8443, (), only("192.168.1.1"), True),  # wildcard: any local address
    ("192.168.1.1", 8443, (), never_local, False),         # ... but not another host's
    ("fd00::1", 8443, (), only("fd00::1"), False),        # 0.0.0.0 takes IPv4 only
    ("fd00::1", 1080, (), only("fd00::1"), True),         # :: takes both families
    ("192.168.1.1", 1080, (), only("192.168.1.1"), True),
])
def test_a_request_for_our_own_listener_is_a_forwarding_loop(host, port, addresses, local, loop):
    found = refusal(intent(host=host, port=port, addresses=addresses), LISTEN, (), local)
    assert found == (FORWARDING_LOOP if loop else None)


@pytest.mark.parametrize("listener, kind, method, port, refused", [
    ("http", "tunnel", "CONNECT", 22, True),
    ("https", "tunnel", "CONNECT", 7000, True),
    ("http", "tunnel", "CONNECT", 443, False),
    ("http", "tunnel", "CONNECT", 8001, False),           # inside the range "8000-8999"
    ("socks5", "tunnel", "CONNECT", 22, False),           # SOCKS5 is a general TCP tunnel
    ("https", "websocket", "CONNECT", 8080, False),       # RFC 8441: a WebSocket, not a tunnel
    ("http", "request", "GET", 8080, False),
])
def test_connect_ports_bind_http_connect_only(listener, kind, method, port, refused):
    wanted = intent(host="192.0.2.1", port=port, listener=listener, kind=kind, method=method)
    assert refusal(wanted, LISTEN, ((443, 443), (8000, 8999)), never_local) == (CONNECT_PORT if refused else None)
    assert refusal(wanted, LISTEN, (), never_local) is None        # [] lets CONNECT go anywhere


def test_the_packaged_config_is_no_open_proxy():
    """packaging/appliance.toml, as installed: outsiders are refused everything; LAN clients
    reach the web but not the gateway itself, link-local, metadata or non-443 CONNECT ports."""
    from pathlib import Path
    config = parse((Path(__file__).parents[1] / "packaging" / "appliance.toml").read_text())

    def verdict(client, host, port=80, addresses=(), **kw):
        wanted = intent(host=host, port=port, client=client, addresses=addresses, **kw)
        refused = refusal(wanted, config.listen, config.policy.connect_ports, never_local)
        return refused or decide(config.rules, wanted).rule

    for outsider in ("198.51.100.7", "2001:db8::7", "127.0.0.1", "::1", "100.64.0.1"):
        assert verdict(outsider, "example.com", addresses=("93.184.215.14",)) == DEFAULT_DENY
    lan = "192.168.1.20"
    assert verdict(lan, "example.com", addresses=("93.184.215.14",)) == "local networks"
    assert verdict(lan, "example.com", 443, ("93.184.215.14",), kind="tunnel", method="CONNECT") \
        == "local networks"
    assert verdict(lan, "example.com", 22, ("93.184.215.14",), kind="tunnel", method="CONNECT") \
        == CONNECT_PORT
    for inside, rule in [("127.0.0.1", "the box itself"), ("::ffff:127.0.0.1", "the box itself"),
                         ("localhost", "the box itself"), ("169.254.169.254", "link-local"),
                         ("fe80::1", "link-local"), ("fd00:ec2::254", "cloud metadata"),
                         ("100.100.100.200", "cloud metadata"), ("0.0.0.0", NOT_UNICAST),
                         ("224.0.0.1", NOT_UNICAST)]:
        assert verdict(lan, inside) == rule, inside
    assert verdict(lan, "rebound.example", addresses=("93.184.215.14", "127.0.0.1")) == "the box itself"
    assert verdict(lan, "192.168.1.1", 3128) == "local networks"     # not local in this test
    assert verdict(lan, "wild.example", 3128, ("0.0.0.0",)) == NOT_UNICAST
