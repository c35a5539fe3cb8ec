"""appliance.config: TOML in, a frozen Config out, or every problem with file, line and key."""

import ast
import dataclasses
import ipaddress
import json
import math
import os
import pickle
import re
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from appliance.config import (
    Address,
    Config,
    ConfigError,
    ConfigErrors,
    LimitsSection,
    ListenSection,
    PacSection,
    Rule,
    load,
    parse,
)

REPO = Path(__file__).resolve().parents[1]
SHIPPED = REPO / "appliance.toml"


def errors_of(text: str, **kwargs) -> list[ConfigError]:
    with pytest.raises(ConfigErrors) as caught:
        parse(text, **kwargs)
    return caught.value.errors


def only_error(text: str) -> ConfigError:
    errors = errors_of(text)
    assert len(errors) == 1, errors
    return errors[0]


# -- the shipped default ---------------------------------------------------------------------------


def test_shipped_config_loads_with_loopback_listeners():
    config = load(SHIPPED)
    assert config.path == SHIPPED
    assert config.appliance.state_dir == REPO / "var"
    assert config.listen.http == (Address("127.0.0.1", 3128),)
    assert config.listen.admin == (Address("127.0.0.1", 9090),)
    assert config.listen.https == (Address("127.0.0.1", 8443),)
    assert config.listen.pac == (Address("127.0.0.1", 8080),)
    assert config.listen.socks5 == (Address("127.0.0.1", 1080),)
    assert config.listen.dns == (Address("127.0.0.1", 5353),)
    # Present in the file but commented out: useful only with the gateway's iptables rules.
    listen = config.listen
    assert listen.transparent_http == listen.transparent_tls == ()
    for field in dataclasses.fields(listen):
        assert all(ipaddress.ip_address(a.host).is_loopback for a in getattr(listen, field.name))


def test_shipped_config_allows_loopback_and_private_ranges_only():
    pinned, rule = load(SHIPPED).rules
    assert rule.action == "allow"
    lines = SHIPPED.read_text().splitlines()
    assert rule.line == lines.index("[[rule]]", pinned.line) + 1
    assert rule.dst == rule.ports == rule.users == ()
    names = {str(network) for network in rule.src}
    private = {"10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "fc00::/7"}
    assert names == {"127.0.0.0/8", "::1/128"} | private
    assert pinned.src == rule.src            # passthrough must not open the proxy to others


def test_shipped_config_passes_pinned_apps_through():
    from appliance.policy import Intent, decide
    rules = load(SHIPPED).rules
    for host, action in (("gateway.icloud.com", "passthrough"), ("apple.com", "passthrough"),
                         ("www.googleapis.com", "passthrough"), ("example.com", "allow")):
        assert decide(rules, Intent("192.168.1.20", "transparent_tls", "tunnel", host, 443)).action == action
    assert decide(rules, Intent("203.0.113.9", "transparent_tls", "tunnel", "apple.com", 443)).action == "deny"


def test_shipped_config_has_the_defaults_of_the_dataclasses():
    config, defaults = load(SHIPPED), parse("", base_dir=REPO)
    for section in ("tls", "ca", "upstream", "pac", "dns", "auth", "limits", "log", "appliance"):
        assert getattr(config, section) == getattr(defaults, section), section


def test_shipped_config_documents_every_key():
    text = SHIPPED.read_text()
    for section in (f.name for f in dataclasses.fields(Config) if f.name not in ("path", "rules")):
        cls = type(getattr(parse(""), section))
        for field in dataclasses.fields(cls):
            assert re.search(rf"^(# )?{field.name} = ", text, re.M), f"{section}.{field.name}"
    for key in ("name", "action", "src", "dst", "ports", "users"):
        assert re.search(rf"^(# )?{key} = ", text, re.M), f"rule.{key}"


def test_shipped_examples_in_comments_are_valid(tmp_path):
    # Uncommenting every commented-out setting must give a valid config too.
    text = re.sub(r"^# (\w+ = |\[\[rule\]\])", r"\1", SHIPPED.read_text(), flags=re.M)
    text = text.replace('users_file = ""', 'users_file = "users"')
    config = parse(text, base_dir=tmp_path)
    assert config.listen.https == (Address("127.0.0.1", 8443),)
    assert config.listen.transparent_tls == (Address("0.0.0.0", 3130),)
    rules = {rule.name: rule for rule in config.rules}
    assert rules["local networks"].ports == ((443, 443), (8000, 8999))
    assert rules["inspect the web"].action == "intercept"


# -- purity ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("module", ["config", "config_values", "toml_lines"])
def test_no_sockets_or_gevent_imported_directly(module):
    tree = ast.parse((REPO / "appliance" / f"{module}.py").read_text())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module.split(".")[0])
    assert not imported & {"socket", "gevent", "ssl", "select", "selectors"}


def test_no_sockets_or_gevent_imported_at_all():
    code = (
        "import sys, appliance.config, appliance.toml_lines; "
        "print([m for m in ('socket', 'gevent', 'ssl') if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert out.stdout.strip() == "[]", out.stderr


# -- defaults and paths ----------------------------------------------------------------------------


def test_empty_text_gives_every_default(tmp_path):
    config = parse("", base_dir=tmp_path)
    assert config.appliance.name == "proxy.localhost"
    assert config.appliance.state_dir == tmp_path / "var"
    assert config.appliance.workers == 1
    assert config.listen == ListenSection()
    assert config.tls.cert is None and config.tls.key is None
    assert config.ca.leaf_days == 90
    assert config.upstream.nameservers == () and config.upstream.connect_timeout == 10.0
    assert config.pac.bypass == ("localhost", "*.local", "10.0.0.0/8", "172.16.0.0/12",
                                 "192.168.0.0/16")
    assert config.pac.direct_fallback is True
    assert config.dns.answer == ("127.0.0.1",) and config.dns.domain == "localdomain"
    assert config.auth.users_file is None
    assert config.limits == LimitsSection()
    assert (config.log.access_log, config.log.format, config.log.level) == ("-", "jsonl", "info")
    assert config.rules == ()


def test_parse_resolves_relative_paths_against_base_dir(tmp_path):
    text = """
[appliance]
state_dir = "state"
[tls]
cert = "/etc/ssl/c.pem"
key = "k.pem"
[upstream]
ca_file = "cas/extra.pem"
[auth]
users_file = "users"
[log]
access_log = "log/access.log"
"""
    config = parse(text, base_dir=tmp_path)
    assert config.appliance.state_dir == tmp_path / "state"
    assert config.tls.cert == Path("/etc/ssl/c.pem")
    assert config.tls.key == tmp_path / "k.pem"
    assert config.upstream.ca_file == tmp_path / "cas" / "extra.pem"
    assert config.auth.users_file == tmp_path / "users"
    assert config.log.access_log == str(tmp_path / "log" / "access.log")


def test_parse_without_base_dir_uses_the_working_directory():
    assert parse("").appliance.state_dir == Path.cwd() / "var"
    assert parse("").path == Path("<string>")


def test_load_resolves_relative_paths_against_the_file(tmp_path):
    folder = tmp_path / "etc"
    folder.mkdir()
    (folder / "a.toml").write_text('[appliance]\nstate_dir = "../state"\n')
    config = load(folder / "a.toml")
    assert config.path == folder / "a.toml"
    assert config.appliance.state_dir == folder / ".." / "state"
    assert config.appliance.state_dir.is_absolute()


def test_empty_paths_mean_not_set_but_state_dir_and_access_log_need_a_value():
    assert parse('[tls]\ncert = ""\nkey = ""').tls.cert is None
    assert "must not be empty" in only_error('[appliance]\nstate_dir = ""').message
    assert '"-"' in only_error('[log]\naccess_log = ""').message


def test_config_is_frozen():
    config = parse("")
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.appliance = None
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.listen.http = ()


# -- listen addresses ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value, expected",
    [
        ('"127.0.0.1:3128"', [("127.0.0.1", 3128)]),
        ('"0.0.0.0:1"', [("0.0.0.0", 1)]),
        ('"[::1]:65535"', [("::1", 65535)]),
        ('"[::]:3128"', [("::", 3128)]),
        ('"[0:0::0001]:80"', [("::1", 80)]),  # written the canonical way
        ('["127.0.0.1:3128", "[::1]:3128"]', [("127.0.0.1", 3128), ("::1", 3128)]),
        ("[]", []),
    ],
)
def test_listen_addresses(value, expected):
    config = parse(f"[listen]\nhttp = {value}")
    assert config.listen.http == tuple(Address(host, port) for host, port in expected)


@pytest.mark.parametrize(
    "value, words",
    [
        ('"localhost:3128"', "hostname"),
        ('"proxy.example.com:3128"', "hostname"),
        ('"127.0.0.1"', "no port"),
        ('"[::1]"', "no port"),
        ('"::1:3128"', "brackets"),
        ('"::1"', "brackets"),
        ('"[127.0.0.1]:80"', "IPv6 addresses only"),
        ('"[::1:80"', "[IPv6]:port"),
        ('"[::1]x80"', "[IPv6]:port"),
        ('"127.0.0.1:0"', "1 to 65535"),
        ('"127.0.0.1:65536"', "1 to 65535"),
        ('"127.0.0.1:http"', "1 to 65535"),
        ('"127.0.0.1:-1"', "1 to 65535"),
        ('":3128"', "host is missing"),
        ('"300.1.1.1:80"', "not an IP address"),
        ('""', "leave the key out"),
        ("3128", "must be a string, not an integer"),
        ("true", "must be a string, not a boolean"),
    ],
)
def test_bad_listen_addresses(value, words):
    error = only_error(f"[listen]\nhttp = {value}")
    assert error.key == "listen.http"
    assert error.line == 2
    assert words in error.message


def test_each_bad_element_of_a_multiline_list_is_reported_on_its_line():
    text = '[listen]\nadmin = [\n  "127.0.0.1:1",\n  "bad",\n  "[::1]:2",\n  "worse:3",\n]\n'
    errors = errors_of(text)
    assert [(e.key, e.line) for e in errors] == [("listen.admin[1]", 4), ("listen.admin[3]", 6)]


def test_address_family_and_text():
    assert Address("127.0.0.1", 3128).family == 2  # socket.AF_INET
    assert Address("::1", 3128).family == 10  # socket.AF_INET6 on Linux
    assert str(Address("127.0.0.1", 3128)) == "127.0.0.1:3128"
    assert str(Address("::1", 3128)) == "[::1]:3128"


def test_address_family_matches_the_socket_module():
    import socket

    assert Address("0.0.0.0", 1).family == socket.AF_INET
    if sys.platform == "linux":
        assert Address("::", 1).family == socket.AF_INET6


def test_two_listeners_on_one_port_are_refused():
    error = only_error('[listen]\nhttp = "127.0.0.1:3128"\nadmin = "127.0.0.1:3128"\n')
    assert (error.key, error.line) == ("listen.admin", 3)
    assert "listen.http" in error.message


def test_a_wildcard_listener_takes_the_port_on_every_address_of_its_family():
    error = only_error('[listen]\nhttp = "0.0.0.0:80"\nadmin = "127.0.0.1:80"')
    assert "listen.http" in error.message
    parse('[listen]\nhttp = "127.0.0.1:80"\nadmin = "127.0.0.2:80"')
    parse('[listen]\nhttp = "0.0.0.0:80"\nadmin = "[::1]:80"')


def test_nameservers_and_dns_forward_default_to_port_53():
    text = '[upstream]\nnameservers = ["10.0.0.53", "::1", "[::1]:5300", "127.0.0.1:5300"]\n'
    text += '[dns]\nforward = "9.9.9.9"\n'
    config = parse(text)
    assert config.upstream.nameservers == (
        Address("10.0.0.53", 53),
        Address("::1", 53),
        Address("::1", 5300),
        Address("127.0.0.1", 5300),
    )
    assert config.dns.forward == (Address("9.9.9.9", 53),)
    error = only_error('[upstream]\nnameservers = ["dns.google"]')
    assert error.key == "upstream.nameservers[0]" and "hostname" in error.message


# -- scalars ---------------------------------------------------------------------------------------


def test_workers_auto_is_the_number_of_cores():
    assert parse('[appliance]\nworkers = "auto"').appliance.workers == (os.cpu_count() or 1)
    assert parse("[appliance]\nworkers = 4").appliance.workers == 4


@pytest.mark.parametrize(
    "text, words",
    [
        ("[appliance]\nworkers = true", "integer, not a boolean"),
        ("[appliance]\nworkers = 0", "between 1 and"),
        ('[appliance]\nworkers = "many"', '"auto"'),
        ("[appliance]\nworkers = 2.0", "integer, not a float"),
        ("[ca]\nleaf_days = 200", "between 1 and 199"),
        ("[ca]\nleaf_days = 0", "between 1 and 199"),
        ("[limits]\nmax_connections = true", "integer, not a boolean"),
        ("[limits]\nmax_header_bytes = 10", "between 1024"),
        ('[limits]\nclient_idle_timeout = "60"', "number of seconds, not a string"),
        ("[limits]\ntunnel_idle_timeout = 0", "positive"),
        ("[upstream]\nconnect_timeout = -1.5", "positive"),
        ("[upstream]\nresponse_timeout = nan", "positive"),
        ("[upstream]\npool_idle_timeout = inf", "positive"),
        ("[upstream]\nconnect_timeout = false", "not a boolean"),
        ("[upstream]\npool_max_idle = -1", "between 0"),
        ('[pac]\ndirect_fallback = "yes"', "true or false"),
        ("[pac]\ndirect_fallback = 1", "true or false"),
        ('[log]\nformat = "json"', "jsonl, squid"),
        ('[log]\nlevel = "verbose"', "debug, info, warning, error"),
        ("[log]\nlevel = 1979-05-27", "string, not a date or time"),
        ('[appliance]\nname = "bad name!"', "not a domain name"),
        ('[dns]\ndomain = "*.local"', "'*'"),
        ('[dns]\nanswer = ["127.0.0.1", "localhost"]', "hostname"),
        ("[tls]\ncert = 1", "must be a string"),
    ],
)
def test_bad_scalars(text, words):
    error = only_error(text)
    assert error.line == 2
    assert words in error.message, error.message


def test_seconds_accept_integers_and_floats():
    config = parse("[upstream]\nconnect_timeout = 5\nresponse_timeout = 0.25")
    assert config.upstream.connect_timeout == 5.0
    assert isinstance(config.upstream.connect_timeout, float)
    assert config.upstream.response_timeout == 0.25


def test_names_and_answers_are_normalized():
    text = '[appliance]\nname = "Proxy.Example.COM"\n[dns]\nanswer = ["::FFFF:1.2.3.4", "10.0.0.1"]'
    config = parse(text)
    assert config.appliance.name == "proxy.example.com"
    assert config.dns.answer == ("::ffff:102:304", "10.0.0.1")
    assert parse('[appliance]\nname = "192.0.2.1"').appliance.name == "192.0.2.1"


def test_tls_cert_and_key_go_together():
    error = only_error('[tls]\ncert = "c.pem"\nkey = ""')
    assert (error.key, error.line) == ("tls.key", 3)
    error = only_error('[tls]\nkey = "k.pem"')
    assert (error.key, error.line) == ("tls.cert", 1)  # missing: the section's header


def test_pac_proxies_and_bypass():
    text = '[pac]\nproxies = ["HTTPS proxy.example:8443", "PROXY 10.0.0.1:3128", "DIRECT"]'
    config = parse(text + "\nbypass = []")
    assert config.pac.proxies == ("HTTPS proxy.example:8443", "PROXY 10.0.0.1:3128", "DIRECT")
    assert config.pac.bypass == ()
    bypass = parse('[pac]\nbypass = ["*.Corp.Example", "10.0.0.0/8"]').pac.bypass
    assert bypass == ("*.corp.example", "10.0.0.0/8")
    assert "PAC proxy" in only_error('[pac]\nproxies = ["proxy:3128"]').message
    assert "host bits" in only_error('[pac]\nbypass = ["10.0.0.1/8"]').message
    assert PacSection().bypass == parse("").pac.bypass


# -- unknown names ---------------------------------------------------------------------------------


def test_unknown_key_suggests_the_closest_known_one():
    error = only_error('[listen]\nhtpp = "127.0.0.1:3128"')
    assert (error.key, error.line) == ("listen.htpp", 2)
    assert "did you mean 'http'" in error.message


def test_unknown_key_without_a_close_one_lists_the_known_ones():
    error = only_error("[ca]\nzzz = 1")
    assert "known keys are key_type, leaf_cache_entries, leaf_days" in error.message


def test_unknown_section_suggests_the_closest_known_one():
    error = only_error("[upstraem]\nx = 1")
    assert (error.key, error.line) == ("upstraem", 1)
    assert "unknown section; did you mean 'upstream'" in error.message


def test_unknown_rule_key_is_reported_per_rule():
    text = '[[rule]]\naction = "deny"\n[[rule]]\naction = "allow"\nscr = ["10.0.0.0/8"]'
    error = only_error(text)
    assert (error.key, error.line) == ("rule[1].scr", 5)
    assert "did you mean 'src'" in error.message


def test_quoted_unknown_keys_are_named_as_written():
    error = only_error('[log]\n"access log" = "-"')
    assert error.key == 'log."access log"'
    assert "access_log" in error.message


def test_a_section_that_is_not_a_table():
    error = only_error('listen = "127.0.0.1:3128"')
    assert (error.key, error.line) == ("listen", 1)
    assert "must be a table" in error.message


# -- rules -----------------------------------------------------------------------------------------


def test_rules_in_order_with_names_lines_and_matchers():
    text = """\
[auth]
users_file = "users"

[[rule]]
action = "deny"
dst = ["Ads.Example.com", "*.tracker.example", ".Example.ORG",
       "203.0.113.0/24", "2001:db8::/32", "10.1.2.3"]

[[rule]]
name = "staff"
action = "allow"
src = "10.0.0.0/8"
ports = [443, "8000-8999", "80"]
users = ["alice", "bob"]
"""
    first, second = parse(text).rules
    assert (first.index, first.name, first.action, first.line) == (0, "rule[0]", "deny", 4)
    assert first.dst == (
        "ads.example.com",
        "*.tracker.example",
        ".example.org",
        ipaddress.ip_network("203.0.113.0/24"),
        ipaddress.ip_network("2001:db8::/32"),
        ipaddress.ip_network("10.1.2.3/32"),
    )
    assert first.src == first.ports == first.users == ()
    assert (second.index, second.name, second.line) == (1, "staff", 9)
    assert second.src == (ipaddress.ip_network("10.0.0.0/8"),)
    assert second.ports == ((443, 443), (8000, 8999), (80, 80))
    assert second.users == ("alice", "bob")


def test_bare_addresses_become_single_host_networks():
    (rule,) = parse('[[rule]]\naction = "allow"\nsrc = ["::1", "192.0.2.7"]').rules
    assert rule.src == (ipaddress.ip_network("::1/128"), ipaddress.ip_network("192.0.2.7/32"))


@pytest.mark.parametrize(
    "value, words",
    [
        ('"10.0.0.1/8"', "has host bits set; did you mean 10.0.0.0/8?"),
        ('"10.0.0.0/33"', "prefix length must be from 0 to 32"),
        ('"::/129"', "prefix length must be from 0 to 128"),
        ('"10.0.0.0/8/8"', "prefix length"),
        ('"10.0.0.0/"', "prefix length"),
        ('"10.0.0.0/-1"', "prefix length"),
        ('"fe80::1%eth0"', "zone"),
        ('"example.com"', "not an IP address or CIDR network"),
        ("10", "must be a string, not an integer"),
    ],
)
def test_bad_sources(value, words):
    error = only_error(f'[[rule]]\naction = "allow"\nsrc = [{value}]')
    assert (error.key, error.line) == ("rule[0].src[0]", 3)
    assert words in error.message


@pytest.mark.parametrize(
    "value, words",
    [
        ('"a.*.example.com"', "'*' may only stand first"),
        ('"*example.com"', "'*' may only stand first"),
        ('"*"', "leave dst out"),
        ('"exa mple.com"', "not a domain name"),
        ('"example..com"', "not a domain name"),
        ('"-example.com"', "not a domain name"),
        ('"example.com/path"', "not an IP address"),
        ('"example.com:443"', "not an IP address"),
        ('"1.2.3"', "not an IP address"),
        ('"10.0.0.1/8"', "host bits"),
        ('""', "not a domain name"),
        ('"' + "a" * 64 + '.com"', "not a domain name"),
        ('"' + "a." * 127 + 'com"', "over 253"),
    ],
)
def test_bad_destinations(value, words):
    error = only_error(f'[[rule]]\naction = "deny"\ndst = [{value}]')
    assert error.key == "rule[0].dst[0]"
    assert words in error.message, error.message


def test_internationalized_destinations_become_punycode():
    (rule,) = parse('[[rule]]\naction = "deny"\ndst = ["*.Bücher.de"]').rules
    assert rule.dst == ("*.xn--bcher-kva.de",)


@pytest.mark.parametrize(
    "value, words",
    [
        ("0", "1 to 65535"),
        ("65536", "1 to 65535"),
        ('"9000-8000"', 'runs backwards; write "8000-9000"'),
        ('"1-70000"', "1 to 65535"),
        ('"http"', 'range like "8000-8999"'),
        ('"80 - 90"', 'range like "8000-8999"'),
        ("true", "not a boolean"),
        ("443.0", "not a float"),
    ],
)
def test_bad_ports(value, words):
    error = only_error(f'[[rule]]\naction = "allow"\nports = [{value}]')
    assert error.key == "rule[0].ports[0]"
    assert words in error.message, error.message


def test_rule_needs_a_known_action():
    error = only_error('[[rule]]\nsrc = ["10.0.0.0/8"]')
    assert (error.key, error.line) == ("rule[0]", 1)
    assert "action is missing" in error.message
    error = only_error('[[rule]]\naction = "permit"')
    assert (error.key, error.line) == ("rule[0].action", 2)
    assert "allow, deny, intercept, passthrough" in error.message


def test_rule_users_need_a_users_file():
    error = only_error('[[rule]]\naction = "allow"\nusers = ["alice"]')
    assert (error.key, error.line) == ("rule[0].users", 3)
    assert "auth.users_file" in error.message
    text = '[auth]\nusers_file = "u"\n[[rule]]\naction = "allow"\nusers = ["a:b"]'
    assert "user name" in only_error(text).message


def test_rule_name_must_not_be_empty():
    assert "must not be empty" in only_error('[[rule]]\nname = " "\naction = "deny"').message


def test_rule_must_be_an_array_of_tables():
    error = only_error('[rule]\naction = "allow"')
    assert error.key == "rule" and "[[rule]]" in error.message
    # An inline array of tables is the same thing to TOML, and accepted.
    (rule,) = parse('rule = [{ action = "deny", ports = 25 }]').rules
    assert rule.ports == ((25, 25),) and rule.line == 1


def test_rule_dataclass_defaults_for_other_modules():
    rule = Rule(index=0, name="r", action="allow")
    assert rule.src == rule.dst == rule.ports == rule.users == ()


# -- errors as a whole -----------------------------------------------------------------------------


def test_all_errors_are_collected_and_sorted_by_line():
    text = """\
[[rule]]
action = "nope"
src = ["10.0.0.1/8"]

[listen]
http = "localhost:3128"
nosuch = 1

[appliance]
workers = true
"""
    errors = errors_of(text, file="site.toml")
    assert [(e.line, e.key) for e in errors] == [
        (2, "rule[0].action"),
        (3, "rule[0].src[0]"),
        (6, "listen.http"),
        (7, "listen.nosuch"),
        (10, "appliance.workers"),
    ]
    assert all(e.file == "site.toml" for e in errors)


def test_error_text_is_file_line_key_message():
    error = ConfigError("a.toml", 3, "listen.http", "bad")
    assert str(error) == "a.toml:3: listen.http: bad"
    assert str(ConfigError("a.toml", None, "(file)", "gone")) == "a.toml:?: (file): gone"
    unordered = [("f", 9, "b", "y"), ("f", None, "c", "z"), ("f", 2, "a", "x")]
    errors = ConfigErrors([ConfigError(*args) for args in unordered])
    assert str(errors) == "f:2: a: x\nf:9: b: y\nf:?: c: z"


def test_errors_survive_pickling():
    # Worker processes hand reload failures back to the parent.
    errors = pickle.loads(pickle.dumps(ConfigErrors([ConfigError("f", 1, "k", "m")])))
    assert str(errors) == "f:1: k: m"
    assert (errors.errors[0].file, errors.errors[0].line) == ("f", 1)


def test_syntax_errors_carry_their_line():
    error = only_error('[listen]\nhttp = "127.0.0.1:3128"\nadmin = = 3\n')
    assert (error.key, error.line) == ("(syntax)", 3)
    assert "(at line" not in error.message and "column" in error.message


def test_syntax_error_at_end_of_document():
    error = only_error('[listen]\nhttp = ["127.0.0.1:3128",\n')
    assert error.key == "(syntax)" and error.line == 2


def test_load_reports_a_missing_file(tmp_path):
    missing = tmp_path / "nope.toml"
    with pytest.raises(ConfigErrors) as caught:
        load(missing)
    (error,) = caught.value.errors
    assert (error.file, error.line, error.key) == (str(missing), None, "(file)")
    assert str(caught.value).startswith(f"{missing}:?: (file): cannot read: ")


def test_load_reports_a_directory(tmp_path):
    with pytest.raises(ConfigErrors, match="cannot read"):
        load(tmp_path)


def test_load_reports_bad_encoding_with_its_line(tmp_path):
    path = tmp_path / "latin1.toml"
    path.write_bytes(b'[appliance]\nname = "caf\xe9"\n')
    with pytest.raises(ConfigErrors) as caught:
        load(path)
    assert (caught.value.errors[0].line, caught.value.errors[0].key) == (2, "(syntax)")


def test_load_accepts_a_byte_order_mark(tmp_path):
    path = tmp_path / "bom.toml"
    path.write_bytes(b'\xef\xbb\xbf[listen]\nhttp = "127.0.0.1:3128"\n')
    assert load(path).listen.http == (Address("127.0.0.1", 3128),)


def test_load_names_the_file_as_given(tmp_path):
    path = tmp_path / "x.toml"
    path.write_text("[ca]\nleaf_days = 999\n")
    with pytest.raises(ConfigErrors) as caught:
        load(str(path))
    assert str(caught.value) == f"{path}:2: ca.leaf_days: must be between 1 and 199, not 999"


# -- fuzzing ---------------------------------------------------------------------------------------


def _known_keys():
    config = parse("")
    for section in (f.name for f in dataclasses.fields(Config) if f.name not in ("path", "rules")):
        for field in dataclasses.fields(type(getattr(config, section))):
            yield section, field.name
    for key in ("name", "action", "src", "dst", "ports", "users"):
        yield "[rule]", key


def _toml(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return "nan" if math.isnan(value) else repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(map(_toml, value)) + "]"
    return json.dumps(value, ensure_ascii=False)


_SAFE_TEXT = st.text(st.characters(blacklist_categories=("Cs", "Cc")), max_size=12)
_VALUES = st.recursive(
    st.booleans()
    | st.integers(-(2**63), 2**63 - 1)
    | st.floats()
    | _SAFE_TEXT
    | st.sampled_from(["auto", "-", "127.0.0.1:3128", "[::1]:1", "10.0.0.0/8", "*.a", "80-90", ""]),
    lambda inner: st.lists(inner, max_size=4),
    max_leaves=6,
)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(sorted(_known_keys())), _VALUES), max_size=6))
def test_any_values_give_a_config_or_located_errors(settings_list):
    text = ""
    for (section, key), value in settings_list:
        header = "[[rule]]" if section == "[rule]" else f"[{section}]"
        text += f"{header}\n{key} = {_toml(value)}\n"
    try:
        config = parse(text, file="f.toml")
    except ConfigErrors as caught:
        assert caught.errors
        for error in caught.errors:
            assert error.line is not None and error.key and error.message, str(error)
    else:
        assert isinstance(config, Config)


@settings(max_examples=300, deadline=None)
@given(st.text())
def test_any_text_gives_a_config_or_config_errors(text):
    try:
        parse(text)
    except ConfigErrors as caught:
        assert all(isinstance(error, ConfigError) for error in caught.errors)



def test_policy_connect_ports():
    assert parse("").policy.connect_ports == ()                     # absent: CONNECT to any port
    ports = parse('[policy]\nconnect_ports = [443, "8000-8999"]\n').policy.connect_ports
    assert ports == ((443, 443), (8000, 8999))
    [error] = errors_of('[policy]\nconnect_ports = [443, "https"]\n')
    assert (error.line, error.key) == (2, "policy.connect_ports[1]")
    assert "must be a port or a range" in error.message
