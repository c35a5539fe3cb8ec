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
import math
import os
import re
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Union

from appliance.toml_lines import KeyLines, KeyPath, dotted

Network = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]
ACTIONS = ("allow", "deny", "intercept", "passthrough")
# socket.AF_INET and socket.AF_INET6 as Linux numbers them: this module must not import socket.
_FAMILY = {4: 2, 6: 10}


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
class Address:
    """An IP literal and a port: something to bind or to send to, never a name to resolve."""

    host: str
    port: int

    @property
    def family(self) -> int:
        return _FAMILY[ipaddress.ip_address(self.host).version]

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


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


@dataclass(frozen=True)
class UpstreamSection:
    ca_file: Path | None = None
    nameservers: tuple[Address, ...] = ()
    connect_timeout: float = 10.0
    response_timeout: float = 60.0
    pool_max_idle_per_host: int = 8
    pool_max_idle: int = 256
    pool_idle_timeout: float = 30.0


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


@dataclass(frozen=True)
class LimitsSection:
    max_header_bytes: int = 65536
    client_idle_timeout: float = 60.0
    tunnel_idle_timeout: float = 3600.0
    max_connections: int = 10000


@dataclass(frozen=True)
class LogSection:
    access_log: str = "-"
    format: str = "jsonl"
    level: str = "info"


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
    upstream: UpstreamSection = field(default_factory=UpstreamSection)
    pac: PacSection = field(default_factory=PacSection)
    dns: DnsSection = field(default_factory=DnsSection)
    auth: AuthSection = field(default_factory=AuthSection)
    limits: LimitsSection = field(default_factory=LimitsSection)
    log: LogSection = field(default_factory=LogSection)
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


class _Invalid(ValueError):
    """A value is wrong: the converter that raises it knows why, its caller knows where."""


@dataclass
class _Context:
    file: str
    lines: KeyLines
    base_dir: Path
    errors: list[ConfigError] = field(default_factory=list)

    def error(self, path: KeyPath, message: str) -> None:
        self.errors.append(ConfigError(self.file, self.lines.line(path), dotted(path), message))


def _kind(value: Any) -> str:
    """The TOML name of a value's type, for "must be X, not Y" messages."""
    if isinstance(value, bool):
        return "a boolean"
    names = {int: "an integer", float: "a float", str: "a string", list: "an array"}
    return names.get(type(value), "a table" if isinstance(value, dict) else "a date or time")


def _unknown(key: str, known: Any, what: str = "key") -> str:
    close = difflib.get_close_matches(key, list(known), n=1)
    if close:
        return f"unknown {what}; did you mean {close[0]!r}?"
    return f"unknown {what}; known {what}s are {', '.join(sorted(known))}"


# -- converters: (context, path, TOML value) -> Python value, or raise _Invalid ------------

Convert = Callable[[_Context, KeyPath, Any], Any]


def _string(value: Any) -> str:
    if not isinstance(value, str):
        raise _Invalid(f"must be a string, not {_kind(value)}")
    return value


def _integer(low: int, high: int) -> Convert:
    def convert(context: _Context, path: KeyPath, value: Any) -> int:
        if type(value) is not int:  # bool is an int subclass, but `true` is no count
            raise _Invalid(f"must be an integer, not {_kind(value)}")
        if not low <= value <= high:
            raise _Invalid(f"must be between {low} and {high}, not {value}")
        return value

    return convert


def _seconds(context: _Context, path: KeyPath, value: Any) -> float:
    if type(value) not in (int, float):
        raise _Invalid(f"must be a number of seconds, not {_kind(value)}")
    if not (math.isfinite(value) and value > 0):  # tomllib reads `inf` and `nan`
        raise _Invalid(f"must be a positive number of seconds, not {value}")
    return float(value)


def _boolean(context: _Context, path: KeyPath, value: Any) -> bool:
    if type(value) is not bool:
        raise _Invalid(f"must be true or false, not {_kind(value)}")
    return value


def _choice(*options: str) -> Convert:
    def convert(context: _Context, path: KeyPath, value: Any) -> str:
        if _string(value) not in options:
            raise _Invalid(f"must be one of {', '.join(options)}, not {value!r}")
        return value

    return convert


def _optional_path(context: _Context, path: KeyPath, value: Any) -> Path | None:
    """"" means "not set"; anything else is a path, relative ones against the config's folder."""
    text = _string(value)
    return context.base_dir / text if text else None


def _directory(context: _Context, path: KeyPath, value: Any) -> Path:
    if not _string(value):
        raise _Invalid('must not be empty; "." is the config file\'s own folder')
    return context.base_dir / value


def _access_log(context: _Context, path: KeyPath, value: Any) -> str:
    if not _string(value):
        raise _Invalid('must not be empty; "-" logs to standard output')
    return value if value == "-" else str(context.base_dir / value)


def _workers(context: _Context, path: KeyPath, value: Any) -> int:
    if value == "auto":
        return os.cpu_count() or 1
    if isinstance(value, str):
        raise _Invalid(f'must be a number of processes or "auto", not {value!r}')
    return _integer(1, 1024)(context, path, value)


def _each(convert_one: Callable[[Any], Any]) -> Convert:
    """An array whose every element `convert_one` checks; one value alone counts as [value].

    Each bad element is reported on its own, on its own line when the array spans several.
    """

    def convert(context: _Context, path: KeyPath, value: Any) -> tuple:
        items = enumerate(value) if isinstance(value, list) else [(None, value)]
        out = []
        for index, item in items:
            try:
                out.append(convert_one(item))
            except _Invalid as error:
                context.error(path if index is None else path + (index,), str(error))
        return tuple(out)

    return convert


# -- element checks: TOML value -> Python value, or raise _Invalid ------------------------


def _address(default_port: int | None = None) -> Callable[[Any], Address]:
    """"host:port" or "[v6]:port" with an IP literal; the port is optional if there is a default."""

    def convert(value: Any) -> Address:
        text = _string(value)
        if not text:
            raise _Invalid("an empty address; to have none, leave the key out or write []")
        host, port, bracketed = _split_host_port(text, optional_port=default_port is not None)
        ip = _ip_literal(host, bracketed)
        if port is None:
            if default_port is None:
                shown = f"[{ip}]" if ip.version == 6 else ip
                raise _Invalid(f"{text!r} has no port; write it as {shown}:PORT")
            return Address(str(ip), default_port)
        if not re.fullmatch(r"[0-9]{1,5}", port) or not 1 <= int(port) <= 65535:
            raise _Invalid(f"{text!r}: the port must be a number from 1 to 65535")
        return Address(str(ip), int(port))

    return convert


def _split_host_port(text: str, optional_port: bool) -> tuple[str, str | None, bool]:
    if text.startswith("["):
        host, closed, rest = text[1:].partition("]")
        if not closed or (rest and not rest.startswith(":")):
            raise _Invalid(f"{text!r} is not of the form [IPv6]:port")
        return host, rest[1:] if rest else None, True
    if text.count(":") > 1:
        if optional_port:
            return text, None, False  # a bare IPv6 address, which cannot carry a port
        raise _Invalid(f"{text!r}: an IPv6 address with a port goes in brackets, as [::1]:3128")
    host, colon, port = text.partition(":")
    return host, port if colon else None, False


_HOSTNAME = re.compile(r"[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*\.?")


def _ip_literal(host: str, bracketed: bool) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    if not host:
        raise _Invalid("the host is missing; 127.0.0.1 is loopback only, 0.0.0.0 every address")
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        # Names are refused: binding or resolving must not depend on DNS at start-up.
        if _HOSTNAME.fullmatch(host) and not re.fullmatch(r"[0-9.]+", host):
            raise _Invalid(f"{host!r} is a hostname; write an IP address, as 127.0.0.1") from None
        raise _Invalid(f"{host!r} is not an IP address") from None
    if bracketed and ip.version == 4:
        raise _Invalid(f"[{host}]: brackets are for IPv6 addresses only")
    return ip


def _network(value: Any) -> Network:
    """"10.0.0.0/8", "fc00::/7", or a bare address meaning just that one (/32, /128)."""
    text = _string(value)
    address, slash, prefix = text.partition("/")
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        raise _Invalid(f"{text!r} is not an IP address or CIDR network") from None
    if "%" in address:
        raise _Invalid(f"{text!r}: a zone (%...) has no place in a network")
    if not slash:
        return ipaddress.ip_network(ip)
    if not re.fullmatch(r"[0-9]{1,3}", prefix) or int(prefix) > ip.max_prefixlen:
        raise _Invalid(f"{text!r}: the prefix length must be from 0 to {ip.max_prefixlen}")
    network = ipaddress.ip_network(f"{ip}/{int(prefix)}", strict=False)
    if network.network_address != ip:
        raise _Invalid(f"{text!r} has host bits set; did you mean {network}?")
    return network


_LABEL = re.compile(r"(?!-)[a-z0-9_-]{1,63}(?<!-)")


def _domain(text: str, pattern: str) -> str:
    """A lower-case DNS name in ASCII; `pattern` is what the admin wrote, for the message."""
    if "*" in text:
        raise _Invalid(f"{pattern!r}: '*' may only stand first, as in '*.example.com'")
    try:
        name = text.lower() if text.isascii() else text.encode("idna").decode("ascii")
    except UnicodeError:
        raise _Invalid(f"{pattern!r} is not a valid internationalized domain name") from None
    bad = [label for label in name.split(".") if not _LABEL.fullmatch(label)]
    if bad or len(name) > 253:
        what = f"label {bad[0]!r} is not valid" if bad else "it is over 253 characters"
        raise _Invalid(f"{pattern!r} is not a domain name: {what}")
    return name


def _destination(value: Any) -> str | Network:
    """A network, or a domain pattern: "example.com", "*.example.com", ".example.com"."""
    text = _string(value).lower()
    if "/" in text or ":" in text or re.fullmatch(r"[0-9.]+", text):
        return _network(text)
    if text == "*":
        raise _Invalid("'*' would match everything; leave dst out to match any destination")
    for prefix in ("*.", "."):
        if text.startswith(prefix):
            return prefix + _domain(text[len(prefix) :], text)
    return _domain(text, text)


def _host_name(context: _Context, path: KeyPath, value: Any) -> str:
    text = _string(value)
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        return _domain(text, text)


def _port_range(value: Any) -> tuple[int, int]:
    """443 or "8000-8999" (or "443"), as an inclusive (low, high) pair."""
    text = value if isinstance(value, str) else ""
    match = re.fullmatch(r"([0-9]{1,5})(?:-([0-9]{1,5}))?", text)
    if type(value) is int:
        low = high = value
    elif match:
        low, high = int(match[1]), int(match[2] or match[1])
    else:
        shown = repr(value) if isinstance(value, str) else _kind(value)
        raise _Invalid(f'must be a port or a range like "8000-8999", not {shown}')
    if not (1 <= low <= 65535 and 1 <= high <= 65535):
        raise _Invalid(f"{value!r}: ports go from 1 to 65535")
    if low > high:
        raise _Invalid(f"{value!r}: the range runs backwards; write \"{high}-{low}\"")
    return low, high


def _user(value: Any) -> str:
    # The users file holds "user:hash" lines, so a name cannot hold ':' (nor blanks).
    if not re.fullmatch(r"[^\s:]+", _string(value)):
        raise _Invalid(f"{value!r} is not a user name (no blanks, no ':', not empty)")
    return value


_PAC_PROXY = re.compile(r"DIRECT|(PROXY|HTTPS|HTTP|SOCKS|SOCKS4|SOCKS5) [^\s;:]+:[0-9]{1,5}")


def _pac_proxy(value: Any) -> str:
    if not _PAC_PROXY.fullmatch(_string(value)):
        raise _Invalid(f'{value!r} is not a PAC proxy, as "PROXY host:port" or "HTTPS host:port"')
    return value


def _rule_name(context: _Context, path: KeyPath, value: Any) -> str:
    if not _string(value).strip():
        raise _Invalid("must not be empty")
    return value


# -- sections ----------------------------------------------------------------------------------

_RESOLVERS = _each(_address(default_port=53))
_LISTENERS = [f.name for f in fields(ListenSection)]

# Each section's dataclass, and a converter for each of its keys (named as the fields).
_SECTIONS: dict[str, tuple[type, dict[str, Convert]]] = {
    "appliance": (ApplianceSection, {
        "name": _host_name, "state_dir": _directory, "workers": _workers,
    }),
    "listen": (ListenSection, dict.fromkeys(_LISTENERS, _each(_address()))),
    "tls": (TlsSection, {"cert": _optional_path, "key": _optional_path}),
    "ca": (CaSection, {"leaf_days": _integer(1, 199)}),
    "upstream": (UpstreamSection, {
        "ca_file": _optional_path, "nameservers": _RESOLVERS,
        "connect_timeout": _seconds, "response_timeout": _seconds,
        "pool_max_idle_per_host": _integer(0, 10**5), "pool_max_idle": _integer(0, 10**6),
        "pool_idle_timeout": _seconds,
    }),
    "pac": (PacSection, {
        "proxies": _each(_pac_proxy), "direct_fallback": _boolean,
        "bypass": _each(lambda value: str(_destination(value))),
    }),
    "dns": (DnsSection, {
        "domain": lambda context, path, value: _domain(_string(value), value),
        "answer": _each(lambda value: str(_ip_literal(_string(value), bracketed=False))),
        "forward": _RESOLVERS,
    }),
    "auth": (AuthSection, {"users_file": _optional_path}),
    "limits": (LimitsSection, {
        "max_header_bytes": _integer(1024, 16 << 20), "max_connections": _integer(1, 10**7),
        "client_idle_timeout": _seconds, "tunnel_idle_timeout": _seconds,
    }),
    "log": (LogSection, {
        "access_log": _access_log, "format": _choice("jsonl", "squid"),
        "level": _choice("debug", "info", "warning", "error"),
    }),
}
# Defaults that must go through their converter: paths resolve against the config's folder.
_TOML_DEFAULTS = {"appliance": {"state_dir": "var"}}

_RULE_KEYS: dict[str, Convert] = {
    "name": _rule_name, "action": _choice(*ACTIONS), "src": _each(_network),
    "dst": _each(_destination), "ports": _each(_port_range), "users": _each(_user),
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
        context.error((name,), f"must be a table, [{name}], not {_kind(table)}")
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
        except _Invalid as error:
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
        for address in getattr(listen, name):
            other = next((taken[a] for a in taken if _overlap(a, address)), None)
            if other:
                context.error(("listen", name), f"{address} is also taken by listen.{other}")
            taken.setdefault(address, name)


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
