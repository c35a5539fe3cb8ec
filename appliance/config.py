"""The appliance's configuration: `appliance.toml` read with `tomllib`, checked, and frozen.

Everything starts from a `Config`: the server binds its `listen` addresses, `policy` walks its
`rules`, `upstream` takes its timeouts, `pac/` and `certs/` read their sections. Reading is pure
(no sockets, no gevent), so a SIGHUP reload builds a new `Config` and swaps it in whole, or keeps
the old one when this module raises.

Validation collects every problem in the file before raising `ConfigErrors`, so `appliance
check-config` shows an admin all there is to fix at once. Each `ConfigError` names the file, the
line and the dotted key; the line comes from `appliance.toml_lines`, because tomllib keeps no
positions.
"""

from __future__ import annotations

import difflib
import ipaddress
import os
import re
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from appliance.config_values import (
    Address,
    Convert,
    Invalid,
    Network,
    access_log,
    address,
    authority,
    boolean,
    choice,
    destination,
    directory,
    domain,
    each,
    host_name,
    integer,
    ip_literal,
    kind,
    network,
    optional_path,
    pac_bypass,
    pac_proxy,
    port_range,
    rule_name,
    seconds,
    string,
    user,
    workers,
)
from appliance.toml_lines import KeyLines, KeyPath, dotted

ACTIONS = ("allow", "deny", "intercept", "passthrough")


class ConfigError(Exception):
    """One problem in a config file, with what an admin needs to find and fix it."""

    def __init__(self, file: str, line: int | None, key: str, message: str) -> None:
        super().__init__(file, line, key, message)  # args as __init__ takes them: picklable
        self.file, self.line, self.key, self.message = file, line, key, message

    def __str__(self) -> str:
        line = "?" if self.line is None else self.line
        return f"{self.file}:{line}: {self.key}: {self.message}"


class ConfigErrors(Exception):
    """Every problem found in one config file, in line order: what `load` and `parse` raise."""

    def __init__(self, errors: list[ConfigError]) -> None:
        ordered = sorted(errors, key=lambda e: (e.line is None, e.line or 0))
        super().__init__(ordered)
        self.errors = ordered

    def __str__(self) -> str:
        return "\n".join(str(error) for error in self.errors)



@dataclass(frozen=True)
class ApplianceSection:
    name: str = "proxy.localhost"
    state_dir: Path = field(default_factory=lambda: Path.cwd() / "var")
    workers: int = 1


@dataclass(frozen=True)
class ListenSection:
    http: tuple[Address, ...] = ()
    https: tuple[Address, ...] = ()
    socks5: tuple[Address, ...] = ()
    pac: tuple[Address, ...] = ()
    dns: tuple[Address, ...] = ()
    admin: tuple[Address, ...] = ()
    transparent_http: tuple[Address, ...] = ()
    transparent_tls: tuple[Address, ...] = ()


@dataclass(frozen=True)
class TlsSection:
    cert: Path | None = None
    key: Path | None = None


@dataclass(frozen=True)
class CaSection:
    leaf_days: int = 90
    key_type: str = "ec"             # the CA's and leaves' keys: "ec" (P-256) or "rsa" (2048 bits)
    leaf_cache_entries: int = 1024   # minted leaves kept in memory per worker (also kept on disk)


@dataclass(frozen=True)
class InterceptSection:
    no_sni: str = "passthrough"      # transparent TLS without a server name: passthrough | intercept | deny


@dataclass(frozen=True)
class UpstreamSection:
    ca_file: Path | None = None
    nameservers: tuple[Address, ...] = ()
    connect_timeout: float = 10.0
    response_timeout: float = 60.0
    pool_max_idle_per_host: int = 64
    pool_max_idle: int = 1024
    pool_idle_timeout: float = 30.0
    # origins that speak HTTP/2 with RFC 8441: WebSocket upgrades to them go as extended CONNECT
    h2_origins: tuple[str, ...] = ()


PAC_BYPASS = ("localhost", "*.local", "10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16")


@dataclass(frozen=True)
class PacSection:
    proxies: tuple[str, ...] = ()
    direct_fallback: bool = True
    bypass: tuple[str, ...] = PAC_BYPASS


@dataclass(frozen=True)
class DnsSection:
    domain: str = "localdomain"
    answer: tuple[str, ...] = ("127.0.0.1",)
    forward: tuple[Address, ...] = ()


@dataclass(frozen=True)
class AuthSection:
    users_file: Path | None = None
    realm: str = "appliance"


@dataclass(frozen=True)
class LimitsSection:
    max_header_bytes: int = 65536
    client_idle_timeout: float = 60.0
    tunnel_idle_timeout: float = 3600.0
    max_connections: int = 10000
    header_timeout: float = 30.0            # a request head must be complete this long after its first byte
    max_connections_per_client: int = 1000  # connections one client address may hold at once
    max_h2_streams: int = 100               # concurrent streams per HTTP/2 connection
    max_h2_streams_per_connection: int = 10000   # streams in a connection's life, then GOAWAY
    drain_timeout: float = 10.0             # on SIGTERM: time left for requests and tunnels in flight


@dataclass(frozen=True)
class AdminSection:
    users_file: Path | None = None          # Basic auth for the admin listener (None: none)


@dataclass(frozen=True)
class LogSection:
    access_log: str = "-"
    format: str = "jsonl"
    level: str = "info"


@dataclass(frozen=True)
class PolicySection:
    # ports an HTTP CONNECT (HTTP/1.1 or HTTP/2) may reach, whatever the rules say; () = any.
    # The packaged config says [443], like Squid's `http_access deny CONNECT !SSL_ports`.
    connect_ports: tuple[tuple[int, int], ...] = ()


@dataclass(frozen=True)
class WebsocketSection:
    inspect: bool = False                   # parse every frame (wsproto) instead of relaying bytes
    max_frame_bytes: int = 1 << 20          # when inspecting: a frame announcing more: close 1009
    max_message_bytes: int = 16 << 20       # when inspecting: a larger message (inflated): 1009
    allow_compression: bool = True          # when inspecting: permessage-deflate (RFC 7692)


@dataclass(frozen=True)
class Rule:
    """One `[[rule]]`; empty matchers match anything. Matching itself is `policy`'s business."""

    index: int
    name: str
    action: str
    src: tuple[Network, ...] = ()
    dst: tuple[str | Network, ...] = ()
    ports: tuple[tuple[int, int], ...] = ()
    users: tuple[str, ...] = ()
    line: int = 0


@dataclass(frozen=True)
class Config:
    path: Path
    appliance: ApplianceSection = field(default_factory=ApplianceSection)
    listen: ListenSection = field(default_factory=ListenSection)
    tls: TlsSection = field(default_factory=TlsSection)
    ca: CaSection = field(default_factory=CaSection)
    intercept: InterceptSection = field(default_factory=InterceptSection)
    upstream: UpstreamSection = field(default_factory=UpstreamSection)
    pac: PacSection = field(default_factory=PacSection)
    dns: DnsSection = field(default_factory=DnsSection)
    auth: AuthSection = field(default_factory=AuthSection)
    admin: AdminSection = field(default_factory=AdminSection)
    limits: LimitsSection = field(default_factory=LimitsSection)
    log: LogSection = field(default_factory=LogSection)
    policy: PolicySection = field(default_factory=PolicySection)
    websocket: WebsocketSection = field(default_factory=WebsocketSection)
    rules: tuple[Rule, ...] = ()


def load(path: str | os.PathLike) -> Config:
    """Reads and checks a config file; relative paths in it resolve against its directory."""
    file = os.fspath(path)
    try:
        data = Path(file).read_bytes()
    except OSError as error:
        reason = error.strerror or str(error)
        raise ConfigErrors([ConfigError(file, None, "(file)", f"cannot read: {reason}")]) from None
    try:
        text = data.decode("utf-8-sig")  # tolerate the BOM some Windows editors write
    except UnicodeDecodeError as error:
        line = data[: error.start].count(b"\n") + 1
        raise ConfigErrors([ConfigError(file, line, "(syntax)", "not UTF-8 text")]) from None
    absolute = Path(file).absolute()
    return _parse(text, file, absolute.parent, absolute)


def parse(text: str, file: str = "<string>", base_dir: Path | None = None) -> Config:
    """Checks config text; `file` names it in errors, relative paths resolve against `base_dir`."""
    base = Path.cwd() if base_dir is None else Path(base_dir).absolute()
    return _parse(text, file, base, Path(file))


def _parse(text: str, file: str, base_dir: Path, path: Path) -> Config:
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise ConfigErrors([_syntax_error(file, text, error)]) from None
    context = _Context(file, KeyLines(text), base_dir)
    config = _build(context, document, path)
    if context.errors:
        raise ConfigErrors(context.errors)
    return config


_AT_LINE = re.compile(r"\s*\(at line (\d+), column (\d+)\)$")


def _syntax_error(file: str, text: str, error: tomllib.TOMLDecodeError) -> ConfigError:
    message = str(error)
    match = _AT_LINE.search(message)
    if match:
        line: int | None = int(match[1])
        message = f"{message[: match.start()]} (column {match[2]})"
    elif message.endswith("(at end of document)"):
        line = max(1, len(text.splitlines()))
    else:
        line = None
    return ConfigError(file, line, "(syntax)", message)


# -- where errors go ------------------------------------------------------------------------


@dataclass
class _Context:
    file: str
    lines: KeyLines
    base_dir: Path
    errors: list[ConfigError] = field(default_factory=list)

    def error(self, path: KeyPath, message: str) -> None:
        self.errors.append(ConfigError(self.file, self.lines.line(path), dotted(path), message))


def _unknown(key: str, known: Any, what: str = "key") -> str:
    close = difflib.get_close_matches(key, list(known), n=1)
    if close:
        return f"unknown {what}; did you mean {close[0]!r}?"
    return f"unknown {what}; known {what}s are {', '.join(sorted(known))}"


# -- sections ----------------------------------------------------------------------------------

_RESOLVERS = each(address(default_port=53))
_LISTENERS = [f.name for f in fields(ListenSection)]

# Each section's dataclass, and a converter for each of its keys (named as the fields).
def _realm(context: _Context, path, value: Any) -> str:
    text = string(value)
    if not text or any(ord(c) < 0x20 or c == "\x7f" for c in text):
        raise Invalid("the realm must be a non-empty line of text")
    return text


_SECTIONS: dict[str, tuple[type, dict[str, Convert]]] = {
    "appliance": (ApplianceSection, {
        "name": host_name, "state_dir": directory, "workers": workers,
    }),
    "listen": (ListenSection, dict.fromkeys(_LISTENERS, each(address()))),
    "tls": (TlsSection, {"cert": optional_path, "key": optional_path}),
    "ca": (CaSection, {"leaf_days": integer(1, 199), "key_type": choice("ec", "rsa"),
                       "leaf_cache_entries": integer(1, 10**6)}),
    "intercept": (InterceptSection, {"no_sni": choice("passthrough", "intercept", "deny")}),
    "upstream": (UpstreamSection, {
        "ca_file": optional_path, "nameservers": _RESOLVERS,
        "connect_timeout": seconds, "response_timeout": seconds,
        "pool_max_idle_per_host": integer(0, 10**5), "pool_max_idle": integer(0, 10**6),
        "pool_idle_timeout": seconds, "h2_origins": each(authority),
    }),
    "pac": (PacSection, {
        "proxies": each(pac_proxy), "direct_fallback": boolean,
        "bypass": each(pac_bypass),
    }),
    "dns": (DnsSection, {
        "domain": lambda context, path, value: domain(string(value), value),
        "answer": each(lambda value: str(ip_literal(string(value), bracketed=False))),
        "forward": _RESOLVERS,
    }),
    "auth": (AuthSection, {"users_file": optional_path, "realm": _realm}),
    "limits": (LimitsSection, {
        "max_header_bytes": integer(1024, 16 << 20), "max_connections": integer(1, 10**7),
        "client_idle_timeout": seconds, "tunnel_idle_timeout": seconds,
        "header_timeout": seconds, "max_connections_per_client": integer(1, 10**7),
        "max_h2_streams": integer(1, 10000), "drain_timeout": seconds,
        "max_h2_streams_per_connection": integer(1, 2**30),
    }),
    "admin": (AdminSection, {"users_file": optional_path}),
    "log": (LogSection, {
        "access_log": access_log, "format": choice("jsonl", "squid"),
        "level": choice("debug", "info", "warning", "error"),
    }),
    "policy": (PolicySection, {"connect_ports": each(port_range)}),
    "websocket": (WebsocketSection, {
        "inspect": boolean, "allow_compression": boolean,
        "max_frame_bytes": integer(125, 1 << 40), "max_message_bytes": integer(125, 1 << 40),
    }),
}
# Defaults that must go through their converter: paths resolve against the config's folder.
_TOML_DEFAULTS = {"appliance": {"state_dir": "var"}}

_RULE_KEYS: dict[str, Convert] = {
    "name": rule_name, "action": choice(*ACTIONS), "src": each(network),
    "dst": each(destination), "ports": each(port_range), "users": each(user),
}


def _build(context: _Context, document: dict[str, Any], path: Path) -> Config:
    for key in document.keys() - _SECTIONS.keys() - {"rule"}:
        context.error((key,), _unknown(key, [*_SECTIONS, "rule"], what="section"))
    sections = {name: _section(context, document, name) for name in _SECTIONS}
    config = Config(path=path, rules=_rules(context, document), **sections)
    _check_tls(context, config.tls)
    _check_listeners(context, config.listen)
    _check_rule_users(context, config)
    return config


def _section(context: _Context, document: dict[str, Any], name: str) -> Any:
    cls, converters = _SECTIONS[name]
    table = document.get(name, {})
    if not isinstance(table, dict):
        context.error((name,), f"must be a table, [{name}], not {kind(table)}")
        table = {}
    table = {**_TOML_DEFAULTS.get(name, {}), **table}
    return cls(**_read(context, table, (name,), converters))


def _read(
    context: _Context, table: dict[str, Any], at: KeyPath, converters: dict[str, Convert]
) -> dict[str, Any]:
    """Converts every key of `table`; unknown and bad ones are reported and left to defaults."""
    values = {}
    for key, value in table.items():
        path = at + (key,)
        convert = converters.get(key)
        if convert is None:
            context.error(path, _unknown(key, converters))
            continue
        try:
            values[key] = convert(context, path, value)
        except Invalid as error:
            context.error(path, str(error))
    return values


def _rules(context: _Context, document: dict[str, Any]) -> tuple[Rule, ...]:
    tables = document.get("rule", [])
    if not isinstance(tables, list) or not all(isinstance(table, dict) for table in tables):
        context.error(("rule",), "must be a list of [[rule]] tables")
        return ()
    return tuple(_rule(context, index, table) for index, table in enumerate(tables))


def _rule(context: _Context, index: int, table: dict[str, Any]) -> Rule:
    at = ("rule", index)
    values = _read(context, table, at, _RULE_KEYS)
    if "action" not in table:
        context.error(at, f"the action is missing; one of {', '.join(ACTIONS)}")
    return Rule(
        index=index,
        name=values.pop("name", f"rule[{index}]"),
        action=values.pop("action", "deny"),
        line=context.lines.line(at) or 0,
        **values,
    )


# -- checks across keys --------------------------------------------------------------------------


def _check_tls(context: _Context, tls: TlsSection) -> None:
    for have, lacking in (("cert", "key"), ("key", "cert")):
        if getattr(tls, have) and not getattr(tls, lacking):
            message = f"must be set too, since tls.{have} is: set both or neither"
            context.error(("tls", lacking), message)


def _check_listeners(context: _Context, listen: ListenSection) -> None:
    """Two listeners on one port fail at bind time; say so now, naming both keys."""
    taken: dict[Address, str] = {}
    for name in (f.name for f in fields(ListenSection)):
        for bound in getattr(listen, name):
            other = next((taken[a] for a in taken if _overlap(a, bound)), None)
            if other:
                context.error(("listen", name), f"{bound} is also taken by listen.{other}")
            taken.setdefault(bound, name)


def _overlap(a: Address, b: Address) -> bool:
    if a.port != b.port or a.family != b.family:
        return False
    # 0.0.0.0 (or ::) takes the port on every address of its family.
    hosts = (ipaddress.ip_address(a.host), ipaddress.ip_address(b.host))
    return hosts[0] == hosts[1] or any(host.is_unspecified for host in hosts)


def _check_rule_users(context: _Context, config: Config) -> None:
    if config.auth.users_file is not None:
        return
    for rule in config.rules:
        if rule.users:
            message = "no user can ever match: auth.users_file is not set"
            context.error(("rule", rule.index, "users"), message)
