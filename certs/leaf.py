"""Leaf certificates from the appliance CA: on disk for its own https listener, in memory for
interception.

`issue_files` gives the https listener (DESIGN.md `[tls]` with `cert` empty) the chain and key
files that `ssl.SSLContext.load_cert_chain` takes; `LeafCertCache` gives the TLS frontend a leaf
per origin name set when a rule says `intercept`. Both reuse a leaf until two thirds of its
validity have passed, so renewal happens well before expiry (the ACME/certbot habit).

Pure file and crypto code: no sockets, no gevent; `now` is passed in.
"""

from __future__ import annotations

import datetime as dt
from collections import OrderedDict
from pathlib import Path
from typing import NamedTuple, Sequence

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization

from certs.authority import (
    CertificateAuthority,
    key_matches,
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
                now: dt.datetime, days: int) -> tuple[Path, Path]:
    """Write (or keep) `directory/<stem>.pem` (leaf + CA chain) and `<stem>.key` (mode 0600).

    Existing files are kept when this CA issued them, they cover exactly `names` and they are
    still `fresh`; anything else (missing, unreadable, garbage, another CA, other names, aging)
    is replaced by a new leaf. The key is written first: a crash in between leaves a pair that
    does not match, which the next call replaces.
    """
    ordered = normalize_names(names)
    wanted = frozenset(ordered)
    directory = Path(directory)
    pem_path, key_path = directory / f"{stem}.pem", directory / f"{stem}.key"
    if _reusable(ca, wanted, pem_path, key_path, now):
        return pem_path, key_path
    chain_pem, key_pem = ca.issue(ordered, now, days)
    directory.mkdir(parents=True, exist_ok=True)
    write_atomically(key_path, key_pem, 0o600)
    write_atomically(pem_path, chain_pem, 0o644)
    return pem_path, key_path


def _reusable(ca: CertificateAuthority, wanted: frozenset[str], pem_path: Path, key_path: Path,
              now: dt.datetime) -> bool:
    try:
        chain = pem_path.read_bytes()
        cert = x509.load_pem_x509_certificate(chain)
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    except (OSError, ValueError, TypeError, UnsupportedAlgorithm):
        return False
    return (chain.endswith(ca.cert_pem()) and ca.issued(cert) and key_matches(cert, key)
            and san_names(cert) == wanted and fresh(*validity_utc(cert), now))


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

    def __init__(self, ca: CertificateAuthority, days: int, max_entries: int = 1024) -> None:
        if max_entries < 1:
            raise ValueError("max_entries must be at least 1")
        self.ca = ca
        self.days = days
        self.max_entries = max_entries
        self.minted = 0
        self._entries: OrderedDict[frozenset[str], CachedLeaf] = OrderedDict()

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
            self._entries.move_to_end(key)
            return entry.chain_pem, entry.key_pem
        chain_pem, key_pem = self.ca.issue(ordered, now, self.days)
        not_before, not_after = validity_utc(x509.load_pem_x509_certificate(chain_pem))
        self._entries[key] = CachedLeaf(chain_pem, key_pem, not_before, not_after)
        self._entries.move_to_end(key)
        self.minted += 1
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)
        return chain_pem, key_pem

    def clear(self) -> None:
        """Forget every leaf (for instance after the CA was replaced)."""
        self._entries.clear()
