"""Proxy authentication headers (RFC 9110 §11.7, Basic scheme RFC 7617) and password hashes.

Sans-I/O: parsing `Proxy-Authorization`, the `Proxy-Authenticate` challenge, and the users-file
line format `name:scrypt$N$r$p$salt$hash` (salt and hash in base64). Hashing itself is
`hashlib.scrypt` with parameters passed in; the salt is passed in too (no randomness here).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re
from dataclasses import dataclass

from .http1 import Headers, header_value

SCRYPT_N, SCRYPT_R, SCRYPT_P = 2 ** 14, 8, 1      # about 16 MiB and tens of ms per check
_NAME = re.compile(r"[A-Za-z0-9._@+-]{1,64}")


@dataclass(frozen=True)
class Credentials:
    user: str
    password: str


def basic_credentials(headers: Headers, field: str = "proxy-authorization") -> Credentials | None:
    """The Basic credentials in Proxy-Authorization (or `field`: "authorization" for a server
    of its own, like the admin listener), or None if absent or not Basic/decodable."""
    value = header_value(headers, field)
    if not value:
        return None
    # RFC 9110 §11.4: credentials = auth-scheme [ 1*SP token68 ], around it only OWS (SP, HTAB);
    # str.strip() would also take obs-text such as NBSP (0xA0) for whitespace.
    scheme, _, token = value.strip(" \t").partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        decoded = base64.b64decode(token.lstrip(" "), validate=True).decode("utf-8")
    except ValueError:          # not base64 (binascii.Error), not ASCII at all, or not UTF-8
        return None
    user, colon, password = decoded.partition(":")
    if not colon or not user:
        return None
    return Credentials(user, password)


def challenge(realm: str) -> tuple[str, str]:
    """The Proxy-Authenticate field of a 407 (RFC 7617 §2, UTF-8 charset)."""
    escaped = realm.replace("\\", "\\\\").replace('"', '\\"')
    return ("Proxy-Authenticate", f'Basic realm="{escaped}", charset="UTF-8"')


def valid_user_name(name: str) -> bool:
    return bool(_NAME.fullmatch(name))


def hash_password(password: str, salt: bytes, n: int = SCRYPT_N, r: int = SCRYPT_R, p: int = SCRYPT_P) -> str:
    digest = hashlib.scrypt(password.encode("utf-8"), salt=salt, n=n, r=r, p=p, dklen=32,
                            maxmem=256 * 1024 * 1024)
    b64 = lambda raw: base64.b64encode(raw).decode("ascii")  # noqa: E731
    return f"scrypt${n}${r}${p}${b64(salt)}${b64(digest)}"


_STORED = re.compile(r"scrypt\$([0-9]{1,8})\$([0-9]{1,2})\$([0-9]{1,2})\$([A-Za-z0-9+/=]{4,88})\$([A-Za-z0-9+/]{43}=)")


def _scrypt_parameters(stored: str) -> tuple[int, int, int, bytes, bytes] | None:
    """(n, r, p, salt, digest) of a well-formed stored hash with sane costs, else None: a
    hand-edited line must neither crash the check nor make it run for seconds."""
    m = _STORED.fullmatch(stored)
    if m is None:
        return None
    n, r, p = int(m.group(1)), int(m.group(2)), int(m.group(3))
    if not (2 ** 10 <= n <= 2 ** 20 and n & (n - 1) == 0 and 1 <= r <= 32 and 1 <= p <= 16):
        return None
    try:
        salt = base64.b64decode(m.group(4), validate=True)
        digest = base64.b64decode(m.group(5), validate=True)
    except binascii.Error:
        return None
    return (n, r, p, salt, digest) if salt and len(digest) == 32 else None


def verify_password(password: str, stored: str) -> bool:
    """Constant-time check of `password` against a `scrypt$N$r$p$salt$hash` string."""
    parameters = _scrypt_parameters(stored)
    if parameters is None:
        return False
    n, r, p, salt, expected = parameters
    computed = hashlib.scrypt(password.encode("utf-8"), salt=salt, n=n, r=r, p=p, dklen=32,
                              maxmem=256 * 1024 * 1024)
    return hmac.compare_digest(computed, expected)


def parse_users(text: str) -> dict[str, str]:
    """`name:hash` lines; blank lines and `#` comments skipped. Raises ValueError naming the line."""
    users: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, colon, stored = line.partition(":")
        if not colon or not valid_user_name(name) or _scrypt_parameters(stored) is None:
            raise ValueError(f"line {number}: expected name:scrypt$..., as `appliance users add` writes")
        if name in users:
            raise ValueError(f"line {number}: user {name!r} appears twice")
        users[name] = stored
    return users


def format_users(users: dict[str, str]) -> str:
    return "".join(f"{name}:{stored}\n" for name, stored in sorted(users.items()))
