"""Proxy authentication: Basic credentials checked against the users file, failures throttled.

Sits before policy on the data path: a frontend asks `check()` for the user of a request (or
stream); the answer goes into the Intent, so rules can name users. Scrypt is slow on purpose, so
a checked password is remembered (by a digest of user, password and stored hash, never the
password itself) and the hash runs in gevent's thread pool, off the event loop. Wrong passwords
from one client address slow down that client's next answers; other clients are not delayed.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import time
from collections import OrderedDict
from pathlib import Path

import gevent
from gevent import get_hub

from .errors import AuthRequired
from .protocols.http1 import Headers
from .protocols.proxy_auth import basic_credentials, hash_password, parse_users, verify_password

log = logging.getLogger("appliance.auth")

REMEMBERED = 1024                 # verified credentials kept
FAILURE_WINDOW = 60.0             # failures older than this are forgotten
FREE_FAILURES = 3                 # failures before the answers slow down
MAX_DELAY = 5.0

@functools.cache
def _dummy_hash() -> str:
    """Checked for unknown users, so they cost as much as known ones (no user enumeration by time)."""
    return hash_password("-", b"\0" * 16)


class Authenticator:
    def __init__(self, users_file: Path, realm: str) -> None:
        self.users_file = users_file
        self.realm = realm
        self._users: dict[str, str] = {}
        self._mtime: int | None = None
        self._verified: OrderedDict[bytes, str] = OrderedDict()
        self._failures: dict[str, list[float]] = {}

    def users(self) -> dict[str, str]:
        """The users file, re-read when it changes (`appliance users add` while running)."""
        try:
            mtime = os.stat(self.users_file).st_mtime_ns
        except OSError as exc:
            log.error("users file %s: %s; nobody can authenticate", self.users_file, exc.strerror)
            return {}
        if mtime != self._mtime:
            try:
                self._users = parse_users(self.users_file.read_text(encoding="utf-8"))
            except (OSError, ValueError, UnicodeDecodeError) as exc:
                log.error("users file %s: %s; keeping the previous users", self.users_file, exc)
            self._mtime = mtime
            self._verified.clear()
        return self._users

    def check(self, client: str, headers: Headers) -> str:
        """The authenticated user name, or `AuthRequired` (a 407) after any throttling delay."""
        credentials = basic_credentials(headers)
        if credentials is None:
            raise AuthRequired(self.realm, "proxy credentials required")
        return self.verify(client, credentials.user, credentials.password)

    def verify(self, client: str, user: str, password: str) -> str:
        """`user` if the password is right, else `AuthRequired` after any throttling delay.
        HTTP Basic (`check`) and SOCKS5 username/password (RFC 1929) both come here."""
        stored = self.users().get(user)
        key = hashlib.sha256(f"{user}\0{password}\0{stored}".encode()).digest()
        if stored is not None and key in self._verified:
            self._verified.move_to_end(key)
            return user
        ok = get_hub().threadpool.apply(verify_password, (password, stored or _dummy_hash()))
        if not (ok and stored is not None):
            self._failed(client, user)
            raise AuthRequired(self.realm, f"invalid credentials for user {user!r}")
        self._verified[key] = user
        while len(self._verified) > REMEMBERED:
            self._verified.popitem(last=False)
        self._failures.pop(client, None)
        return user

    def _failed(self, client: str, user: str) -> None:
        now = time.monotonic()
        recent = [t for t in self._failures.get(client, []) if now - t < FAILURE_WINDOW] + [now]
        self._failures[client] = recent
        if len(self._failures) > 10000:               # bounded: forget the oldest clients
            for stale in list(self._failures)[:1000]:
                del self._failures[stale]
        delay = 0.0
        if len(recent) > FREE_FAILURES:
            delay = min(MAX_DELAY, 0.25 * 2 ** (len(recent) - FREE_FAILURES - 1))
        log.warning("proxy authentication failed for user %r from %s (%d in %gs%s)", user, client,
                    len(recent), FAILURE_WINDOW, f", answering after {delay:g}s" if delay else "")
        if delay:
            gevent.sleep(delay)                       # this client's greenlet only
