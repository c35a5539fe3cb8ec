"""Leaf certificates from the appliance CA: on disk for its own https listener, in memory for
interception.

`issue_files` gives the https listener (DESIGN.md `[tls]` with `cert` empty) the chain and key
files that `ssl.SSLContext.load_cert_chain` takes; `LeafCertCache` keeps leaves per origin name set
in memory, and `certs.store.LeafStore` also on disk, for when a rule says `intercept`. All of them
reuse a leaf until two thirds of its validity have passed, so renewal happens well before expiry
(the ACME/certbot habit).

Pure file and crypto code: no sockets, no gevent; `now` is passed in.
"""

from __future__ import annotations

import datetime as dt
from collections import OrderedDict
from pathlib import Path
from typing import Generic, Hashable, NamedTuple, Sequence, TypeVar

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization

from certs.authority import (
    CertificateAuthority,
    key_matches,
    key_type_of,
    normalize_names,
    san_names,
    utc_seconds,
    validity_utc,
    write_atomically,
)


def fresh(not_before: dt.datetime, not_after: dt.datetime, now: dt.datetime) -> bool:
    """Whether a leaf is valid at `now` with more than a third of its validity left."""
    now = utc_seconds(now)
    return not_before <= now and (not_after - now) * 3 > (not_after - not_before)


def issue_files(ca: CertificateAuthority, names: Sequence[str], directory: Path, stem: str,
                now: dt.datetime, days: int, key_type: str = "ec") -> tuple[Path, Path]:
    """Write (or keep) `directory/<stem>.pem` (leaf + CA chain) and `<stem>.key` (mode 0600).

    Existing files are kept when this CA issued them, they cover exactly `names`, hold a
    `key_type` key and are still `fresh`; anything else (missing, unreadable, garbage, another
    CA, other names, another key type, aging) is replaced by a new leaf. The key is written
    first: a crash in between leaves a pair that does not match, which the next call replaces.
    One process writes these (the listener's own certificate, before workers fork); leaves that
    several workers share go through `certs.store.LeafStore`, which never splits a pair.
    """
    ordered = normalize_names(names)
    wanted = frozenset(ordered)
    directory = Path(directory)
    pem_path, key_path = directory / f"{stem}.pem", directory / f"{stem}.key"
    try:
        existing = pem_path.read_bytes(), key_path.read_bytes()
    except OSError:
        existing = None
    if existing and usable_leaf(ca, wanted, *existing, now, key_type) is not None:
        return pem_path, key_path
    chain_pem, key_pem = ca.issue(ordered, now, days, key_type)
    directory.mkdir(parents=True, exist_ok=True)
    write_atomically(key_path, key_pem, 0o600)
    write_atomically(pem_path, chain_pem, 0o644)
    return pem_path, key_path


def usable_leaf(ca: CertificateAuthority, wanted: frozenset[str], chain_pem: bytes,
                key_pem: bytes, now: dt.datetime, key_type: str) -> x509.Certificate | None:
    """The leaf of `chain_pem` when the pair can be served again, else None.

    It can when this CA issued it (and the chain ends in this CA), `key_pem` is its key and of
    `key_type`, its SAN is exactly `wanted` (normalized names) and it is still `fresh`. Files
    from disk may be anything, so garbage is None too, never an exception.
    """
    try:
        cert = x509.load_pem_x509_certificate(chain_pem)
        key = serialization.load_pem_private_key(key_pem, password=None)
        usable = (chain_pem.endswith(ca.cert_pem()) and ca.issued(cert)
                  and key_type_of(key) == key_type and key_matches(cert, key)
                  and san_names(cert) == wanted and fresh(*validity_utc(cert), now))
    except (ValueError, TypeError, UnsupportedAlgorithm):
        return None
    return cert if usable else None


Key = TypeVar("Key", bound=Hashable)
Value = TypeVar("Value")


class RecentlyUsed(Generic[Key, Value]):
    """A bounded mapping that forgets the least recently used entry beyond `max_entries`.

    The memory half of both leaf caches: intercepting proxies meet the same few origins over and
    over, so the hot set fits, while a scan over many names cannot grow memory without bound.
    """

    def __init__(self, max_entries: int) -> None:
        if max_entries < 1:
            raise ValueError("max_entries must be at least 1")
        self.max_entries = max_entries
        self._entries: OrderedDict[Key, Value] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: Key) -> bool:
        return key in self._entries

    def get(self, key: Key) -> Value | None:
        """The entry for `key`, now the most recently used one; None when there is none."""
        value = self._entries.get(key)
        if value is not None:
            self._entries.move_to_end(key)
        return value

    def put(self, key: Key, value: Value) -> None:
        self._entries[key] = value
        self._entries.move_to_end(key)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)

    def pop(self, key: Key) -> None:
        self._entries.pop(key, None)

    def clear(self) -> None:
        self._entries.clear()


class CachedLeaf(NamedTuple):
    chain_pem: bytes
    key_pem: bytes
    not_before: dt.datetime
    not_after: dt.datetime


class LeafCertCache:
    """Minted leaves per set of names, least recently used evicted beyond `max_entries`.

    Minting an EC P-256 leaf costs about a millisecond of CPU; an intercepting proxy meets the
    same few origins over and over, so it pays to keep them. `get` never yields (no I/O), so
    greenlets of one process can share a cache without a lock.
    """

    def __init__(self, ca: CertificateAuthority, days: int, max_entries: int = 1024,
                 key_type: str = "ec") -> None:
        self.ca = ca
        self.days = days
        self.key_type = key_type
        self.max_entries = max_entries
        self.minted = 0
        self._entries: RecentlyUsed[frozenset[str], CachedLeaf] = RecentlyUsed(max_entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, names: Sequence[str]) -> bool:
        return frozenset(normalize_names(names)) in self._entries

    def get(self, names: Sequence[str], now: dt.datetime) -> tuple[bytes, bytes]:
        """(chain_pem, key_pem) for `names` (order and duplicates do not matter)."""
        ordered = normalize_names(names)
        key = frozenset(ordered)
        entry = self._entries.get(key)
        if entry is not None and fresh(entry.not_before, entry.not_after, now):
            return entry.chain_pem, entry.key_pem
        chain_pem, key_pem = self.ca.issue(ordered, now, self.days, self.key_type)
        not_before, not_after = validity_utc(x509.load_pem_x509_certificate(chain_pem))
        self._entries.put(key, CachedLeaf(chain_pem, key_pem, not_before, not_after))
        self.minted += 1
        return chain_pem, key_pem

    def clear(self) -> None:
        """Forget every leaf (for instance after the CA was replaced)."""
        self._entries.clear()
