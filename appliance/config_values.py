"""Single TOML values into typed values, or a message saying what is wrong: config's value layer.

One job: `appliance.config` knows the schema (which key takes which converter) and reports where a
problem is; each converter here takes the one value `tomllib` read and returns what the appliance
uses (an `Address`, a network, a lower-case domain, a `(low, high)` port range, an absolute path)
or raises `Invalid` with a message an admin can act on. Nothing here knows file names or lines.

Two shapes: a converter, `(context, path, value) -> typed value`, as the schema tables hold them;
an element check, `value -> typed value`, which `each` applies to every element of an array. Pure
like the rest of config loading: no sockets, no gevent, no DNS (names are refused where an address
is needed, so start-up never waits on a resolver).
"""

from __future__ import annotations

import ipaddress
import math
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, Union

from appliance.toml_lines import KeyPath

Network = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]
# socket.AF_INET and socket.AF_INET6 as Linux numbers them: this module must not import socket.
_FAMILY = {4: 2, 6: 10}


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


class Invalid(ValueError):
    """A value is wrong: the converter that raises it knows why, its caller knows where."""


class Context(Protocol):
    """What a converter may ask of its caller: where relative paths start, where errors go."""

    base_dir: Path

    def error(self, path: KeyPath, message: str) -> None: ...


def kind(value: Any) -> str:
    """The TOML name of a value's type, for "must be X, not Y" messages."""
    if isinstance(value, bool):
        return "a boolean"
    names = {int: "an integer", float: "a float", str: "a string", list: "an array"}
    return names.get(type(value), "a table" if isinstance(value, dict) else "a date or time")


# -- converters: (context, path, TOML value) -> Python value, or raise Invalid -------------

Convert = Callable[[Context, KeyPath, Any], Any]


def string(value: Any) -> str:
    if not isinstance(value, str):
        raise Invalid(f"must be a string, not {kind(value)}")
    return value


def integer(low: int, high: int) -> Convert:
    def convert(context: Context, path: KeyPath, value: Any) -> int:
        if type(value) is not int:  # bool is an int subclass, but `true` is no count
            raise Invalid(f"must be an integer, not {kind(value)}")
        if not low <= value <= high:
            raise Invalid(f"must be between {low} and {high}, not {value}")
        return value

    return convert


def seconds(context: Context, path: KeyPath, value: Any) -> float:
    if type(value) not in (int, float):
        raise Invalid(f"must be a number of seconds, not {kind(value)}")
    if not (math.isfinite(value) and value > 0):  # tomllib reads `inf` and `nan`
        raise Invalid(f"must be a positive number of seconds, not {value}")
    return float(value)


def boolean(context: Context, path: KeyPath, value: Any) -> bool:
    if type(value) is not bool:
        raise Invalid(f"must be true or false, not {kind(value)}")
    return value


def choice(*options: str) -> Convert:
    def convert(context: Context, path: KeyPath, value: Any) -> str:
        if string(value) not in options:
            raise Invalid(f"must be one of {', '.join(options)}, not {value!r}")
        return value

    return convert


def optional_path(context: Context, path: KeyPath, value: Any) -> Path | None:
    """"" means "not set"; anything else is a path, relative ones against the config's folder."""
    text = string(value)
    return context.base_dir / text if text else None


def directory(context: Context, path: KeyPath, value: Any) -> Path:
    if not string(value):
        raise Invalid('must not be empty; "." is the config file\'s own folder')
    return context.base_dir / value


def access_log(context: Context, path: KeyPath, value: Any) -> str:
    if not string(value):
        raise Invalid('must not be empty; "-" logs to standard output')
    return value if value == "-" else str(context.base_dir / value)


def workers(context: Context, path: KeyPath, value: Any) -> int:
    if value == "auto":
        return os.cpu_count() or 1
    if isinstance(value, str):
        raise Invalid(f'must be a number of processes or "auto", not {value!r}')
    return integer(1, 1024)(context, path, value)


def each(convert_one: Callable[[Any], Any]) -> Convert:
    """An array whose every element `convert_one` checks; one value alone counts as [value].

    Each bad element is reported on its own, on its own line when the array spans several.
    """

    def convert(context: Context, path: KeyPath, value: Any) -> tuple:
        items = enumerate(value) if isinstance(value, list) else [(None, value)]
        out = []
        for index, item in items:
            try:
                out.append(convert_one(item))
            except Invalid as error:
                context.error(path if index is None else path + (index,), str(error))
        return tuple(out)

    return convert


# -- element checks: TOML value -> Python value, or raise Invalid -------------------------


def address(default_port: int | None = None) -> Callable[[Any], Address]:
    """"host:port" or "[v6]:port" with an IP literal; the port is optional if there is a default."""

    def convert(value: Any) -> Address:
        text = string(value)
        if not text:
            raise Invalid("an empty address; to have none, leave the key out or write []")
        host, port, bracketed = split_host_port(text, optional_port=default_port is not None)
        ip = ip_literal(host, bracketed)
        if port is None:
            if default_port is None:
                shown = f"[{ip}]" if ip.version == 6 else ip
                raise Invalid(f"{text!r} has no port; write it as {shown}:PORT")
            return Address(str(ip), default_port)
        if not re.fullmatch(r"[0-9]{1,5}", port) or not 1 <= int(port) <= 65535:
            raise Invalid(f"{text!r}: the port must be a number from 1 to 65535")
        return Address(str(ip), int(port))

    return convert


def authority(value: Any) -> str:
    """"host:port" of a remote server: a DNS name or an IP literal ([v6] in brackets), port required."""
    text = string(value)
    host, port, bracketed = split_host_port(text, optional_port=False)
    if port is None or not re.fullmatch(r"[0-9]{1,5}", port) or not 1 <= int(port) <= 65535:
        raise Invalid(f"{text!r}: write host:port, with a port from 1 to 65535")
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        if bracketed:
            raise Invalid(f"{text!r}: brackets are for IPv6 addresses only") from None
        return f"{domain(host, text)}:{int(port)}"
    return f"[{ip}]:{int(port)}" if ip.version == 6 else f"{ip}:{int(port)}"


def split_host_port(text: str, optional_port: bool) -> tuple[str, str | None, bool]:
    if text.startswith("["):
        host, closed, rest = text[1:].partition("]")
        if not closed or (rest and not rest.startswith(":")):
            raise Invalid(f"{text!r} is not of the form [IPv6]:port")
        return host, rest[1:] if rest else None, True
    if text.count(":") > 1:
        if optional_port:
            return text, None, False  # a bare IPv6 address, which cannot carry a port
        raise Invalid(f"{text!r}: an IPv6 address with a port goes in brackets, as [::1]:3128")
    host, colon, port = text.partition(":")
    return host, port if colon else None, False


_HOSTNAME = re.compile(r"[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*\.?")


def ip_literal(host: str, bracketed: bool) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    if not host:
        raise Invalid("the host is missing; 127.0.0.1 is loopback only, 0.0.0.0 every address")
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        # Names are refused: binding or resolving must not depend on DNS at start-up.
        if _HOSTNAME.fullmatch(host) and not re.fullmatch(r"[0-9.]+", host):
            raise Invalid(f"{host!r} is a hostname; write an IP address, as 127.0.0.1") from None
        raise Invalid(f"{host!r} is not an IP address") from None
    if bracketed and ip.version == 4:
        raise Invalid(f"[{host}]: brackets are for IPv6 addresses only")
    return ip


def network(value: Any) -> Network:
    """"10.0.0.0/8", "fc00::/7", or a bare address meaning just that one (/32, /128)."""
    text = string(value)
    address, slash, prefix = text.partition("/")
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        raise Invalid(f"{text!r} is not an IP address or CIDR network") from None
    if "%" in address:
        raise Invalid(f"{text!r}: a zone (%...) has no place in a network")
    if not slash:
        return ipaddress.ip_network(ip)
    if not re.fullmatch(r"[0-9]{1,3}", prefix) or int(prefix) > ip.max_prefixlen:
        raise Invalid(f"{text!r}: the prefix length must be from 0 to {ip.max_prefixlen}")
    network = ipaddress.ip_network(f"{ip}/{int(prefix)}", strict=False)
    if network.network_address != ip:
        raise Invalid(f"{text!r} has host bits set; did you mean {network}?")
    return network


_LABEL = re.compile(r"(?!-)[a-z0-9_-]{1,63}(?<!-)")


def domain(text: str, pattern: str) -> str:
    """A lower-case DNS name in ASCII; `pattern` is what the admin wrote, for the message."""
    if "*" in text:
        raise Invalid(f"{pattern!r}: '*' may only stand first, as in '*.example.com'")
    try:
        name = text.lower() if text.isascii() else text.encode("idna").decode("ascii")
    except UnicodeError:
        raise Invalid(f"{pattern!r} is not a valid internationalized domain name") from None
    bad = [label for label in name.split(".") if not _LABEL.fullmatch(label)]
    if bad or len(name) > 253:
        what = f"label {bad[0]!r} is not valid" if bad else "it is over 253 characters"
        raise Invalid(f"{pattern!r} is not a domain name: {what}")
    return name


def destination(value: Any) -> str | Network:
    """A network, or a domain pattern: "example.com", "*.example.com", ".example.com"."""
    text = string(value).lower()
    if "/" in text or ":" in text or re.fullmatch(r"[0-9.]+", text):
        return network(text)
    if text == "*":
        raise Invalid("'*' would match everything; leave dst out to match any destination")
    for prefix in ("*.", "."):
        if text.startswith(prefix):
            return prefix + domain(text[len(prefix) :], text)
    return domain(text, text)


def host_name(context: Context, path: KeyPath, value: Any) -> str:
    text = string(value)
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        return domain(text, text)


def port_range(value: Any) -> tuple[int, int]:
    """443 or "8000-8999" (or "443"), as an inclusive (low, high) pair."""
    text = value if isinstance(value, str) else ""
    match = re.fullmatch(r"([0-9]{1,5})(?:-([0-9]{1,5}))?", text)
    if type(value) is int:
        low = high = value
    elif match:
        low, high = int(match[1]), int(match[2] or match[1])
    else:
        shown = repr(value) if isinstance(value, str) else kind(value)
        raise Invalid(f'must be a port or a range like "8000-8999", not {shown}')
    if not (1 <= low <= 65535 and 1 <= high <= 65535):
        raise Invalid(f"{value!r}: ports go from 1 to 65535")
    if low > high:
        raise Invalid(f"{value!r}: the range runs backwards; write \"{high}-{low}\"")
    return low, high


def user(value: Any) -> str:
    # The users file holds "user:hash" lines, so a name cannot hold ':' (nor blanks).
    if not re.fullmatch(r"[^\s:]+", string(value)):
        raise Invalid(f"{value!r} is not a user name (no blanks, no ':', not empty)")
    return value


_PAC_PROXY = re.compile(r"DIRECT|(PROXY|HTTPS|HTTP|SOCKS|SOCKS4|SOCKS5) [^\s;:]+:[0-9]{1,5}")


def pac_bypass(value: Any) -> str:
    """A `[pac] bypass` entry: a destination as in rules, or "<local>" for dotless host names."""
    if value == "<local>":
        return value
    return str(destination(value))


def pac_proxy(value: Any) -> str:
    if not _PAC_PROXY.fullmatch(string(value)):
        raise Invalid(f'{value!r} is not a PAC proxy, as "PROXY host:port" or "HTTPS host:port"')
    return value


def rule_name(context: Context, path: KeyPath, value: Any) -> str:
    if not string(value).strip():
        raise Invalid("must not be empty")
    return value
