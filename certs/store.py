"""Leaves for intercepted TLS, kept in memory and on disk so that every worker can share them.

Where it sits: when a rule says `intercept`, the TLS frontend asks `LeafStore.files(names, now)`
for the origin's names (SNI or CONNECT host) and hands both returned paths to
`ssl.SSLContext.load_cert_chain`. Minting costs about a millisecond of CPU (EC) or a hundred (RSA
2048 key generation), and each worker process would otherwise mint its own leaf for the same
origin, so leaves live in a bounded LRU per process and, behind it, in files under
`state_dir/leaves`.

Why the disk layout looks the way it does: `load_cert_chain(certfile, keyfile)` opens the two
paths one after the other, so a pair in two files, or one file renamed over while a worker is
between the two opens, can pair one leaf's certificate with another leaf's key. Here a leaf never
changes once written: each one is a single file (chain, then key; mode 0600) named after its
serial, written whole and renamed into place, and both paths handed out are that file. A symlink
per name set (`<name>.<digest>.pem`) points at the current one; renewal writes a new file and
swaps the link with os.replace, so readers see the old or the new leaf, never half of each.
Superseded files stay until pruning, which keeps about 10 × `max_entries` files and takes the
superseded ones first, then the oldest.

Pure file and crypto code: no sockets, no gevent, `now` passed in. `files` never yields to
another greenlet (local file I/O blocks briefly instead), so one store per process needs no lock.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import os
import re
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from cryptography import x509

from certs.authority import (
    KEY_TYPES,
    CAError,
    CertificateAuthority,
    normalize_names,
    validity_utc,
    write_atomically,
)
from certs.leaf import RecentlyUsed, fresh, usable_leaf

DISK_FACTOR = 10  # files kept on disk per entry kept in memory, before pruning starts
KEY_MARKER = b"-----BEGIN PRIVATE KEY-----"  # what `CertificateAuthority.issue` writes (PKCS8)
_UNSAFE = re.compile(r"[^a-z0-9._-]")


@dataclass(frozen=True)
class StoredLeaf:
    """One leaf file on disk, and when it stops being `fresh` (from the certificate itself)."""

    path: Path
    not_before: dt.datetime
    not_after: dt.datetime


def leaf_stem(names: frozenset[str], key_type: str) -> str:
    """The file name (without ".pem") for a normalized name set: readable, safe, unique.

    The smallest name, with anything but [a-z0-9._-] replaced, says what it is for; a SHA-256 of
    all names and the key type tells apart sets that share it. Names come from clients, so they
    are never used as a path as they are (normalization already refused "/" and empty labels).
    """
    ordered = sorted(names)
    label = _UNSAFE.sub("_", ordered[0])[:64].lstrip(".") or "_"
    digest = hashlib.sha256("\n".join([key_type, *ordered]).encode()).hexdigest()[:16]
    return f"{label}.{digest}"


class LeafStore:
    """Leaf files per set of names, for `ssl.SSLContext.load_cert_chain`, shared by workers.

    `minted`, `memory_hits` and `disk_hits` count how each `files` call was answered.
    """

    def __init__(self, ca: CertificateAuthority, directory: Path, days: int,
                 max_entries: int = 1024, key_type: str = "ec") -> None:
        if days < 1:
            raise ValueError("days must be at least 1")
        if key_type not in KEY_TYPES:
            raise ValueError(f"key type must be one of {', '.join(KEY_TYPES)}, not {key_type!r}")
        self.ca = ca
        self.directory = Path(directory)
        self.days = days
        self.key_type = key_type
        self.max_entries = max_entries
        self.max_files = DISK_FACTOR * max_entries
        self.minted = self.memory_hits = self.disk_hits = 0
        self._memory: RecentlyUsed[frozenset[str], StoredLeaf] = RecentlyUsed(max_entries)
        # Counting the directory costs a listing; do it every so many mints, so the bound is loose.
        self._prune_every = max(1, max_entries // 4)
        self._mints_since_prune = 0

    def __len__(self) -> int:
        return len(self._memory)

    def __contains__(self, names: Sequence[str]) -> bool:
        return frozenset(normalize_names(names)) in self._memory

    def files(self, names: Sequence[str], now: dt.datetime) -> tuple[Path, Path]:
        """(chain_pem_path, key_pem_path) of a fresh leaf for `names` (the same file twice).

        From memory when this process used the set lately and the file is still there (another
        worker's pruning may have removed it); else from disk when the current file was issued
        by this CA for exactly these names with a key of `key_type` and is fresh; else minted.
        Raises ValueError for names that are not host names or IP literals, and CAError when the
        directory cannot be written.
        """
        ordered = normalize_names(names)
        wanted = frozenset(ordered)
        entry = self._memory.get(wanted)
        if entry is not None and fresh(entry.not_before, entry.not_after, now) \
                and entry.path.is_file():
            self.memory_hits += 1
            return entry.path, entry.path
        pointer = self.directory / f"{leaf_stem(wanted, self.key_type)}.pem"
        entry = self._current(pointer, wanted, now)
        if entry is not None:
            self.disk_hits += 1
        else:
            entry = self._mint(ordered, pointer, now)
        self._memory.put(wanted, entry)
        return entry.path, entry.path

    def clear(self) -> None:
        """Forget the leaves held in memory (the files stay; they are checked again on use)."""
        self._memory.clear()

    def _current(self, pointer: Path, wanted: frozenset[str],
                 now: dt.datetime) -> StoredLeaf | None:
        """The leaf the name set's link points at, when it can be served again."""
        try:
            target = os.readlink(pointer)
        except OSError:  # missing, or not a link (a file of some other layout)
            return None
        # Only a file of this name set in this directory, so a stray link cannot lead elsewhere.
        if os.sep in target or not target.startswith(f"{pointer.stem}."):
            return None
        path = self.directory / target
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
            with os.fdopen(fd, "rb") as file:
                data = file.read()
        except OSError:
            return None
        chain_pem, marker, key_rest = data.partition(KEY_MARKER)
        if not marker:
            return None
        cert = usable_leaf(self.ca, wanted, chain_pem, marker + key_rest, now, self.key_type)
        return None if cert is None else StoredLeaf(path, *validity_utc(cert))

    def _mint(self, ordered: tuple[str, ...], pointer: Path, now: dt.datetime) -> StoredLeaf:
        chain_pem, key_pem = self.ca.issue(ordered, now, self.days, self.key_type)
        cert = x509.load_pem_x509_certificate(chain_pem)
        # 64 random bits of the serial: unique among the files of one name set.
        path = pointer.with_name(f"{pointer.stem}.{cert.serial_number & (2**64 - 1):016x}.pem")
        try:
            self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            # No fsync: a file a crash left empty fails the checks on reading and is minted
            # again, and an fsync per mint would stall the worker's event loop on slow disks.
            write_atomically(path, chain_pem + key_pem, 0o600, sync=False)
            _point(pointer, path.name)
        except OSError as exc:
            raise CAError(exc.filename or self.directory,
                          f"cannot write a leaf certificate: {exc.strerror}") from None
        self.minted += 1
        self._mints_since_prune += 1
        if self._mints_since_prune >= self._prune_every:
            self._mints_since_prune = 0
            self.prune()
        return StoredLeaf(path, *validity_utc(cert))

    def prune(self) -> int:
        """Remove leaf files beyond `max_files`; return how many went.

        The newest `max_entries` files are never taken: one of them may be another worker's
        leaf, written but not linked yet. Of the others, files no link points at (superseded,
        or the loser of a race between workers) go first, then the oldest current ones with
        their links. Best effort: another worker may prune at the same time, and a file still
        in some worker's memory is minted again when it is found missing.
        """
        try:
            entries = list(os.scandir(self.directory))
        except OSError:
            return 0
        leaves = [e for e in entries if not e.name.startswith(".") and e.name.endswith(".pem")
                  and e.is_file(follow_symlinks=False)]
        excess = len(leaves) - self.max_files
        if excess <= 0:
            return 0
        links = {e.path: _readlink(e.path) for e in entries if e.is_symlink()}
        current = set(links.values())
        candidates = sorted(leaves, key=_mtime)[:-self.max_entries]
        candidates.sort(key=lambda e: (e.name in current, _mtime(e)))
        removed = {e.name for e in candidates[:excess] if _unlink(e.path)}
        for link, target in links.items():
            if target in removed:
                _unlink(link)
        return len(removed)


def _point(pointer: Path, target: str) -> None:
    """Make `pointer` a link to `target` in one step (a new link renamed over the old one)."""
    tmp = pointer.with_name(f".{pointer.name}.{secrets.token_hex(8)}.tmp")
    os.symlink(target, tmp)
    try:
        os.replace(tmp, pointer)
    except BaseException:
        _unlink(tmp)
        raise


def _readlink(path: str) -> str | None:
    try:
        return os.readlink(path)
    except OSError:
        return None


def _mtime(entry: os.DirEntry) -> int:
    try:
        return entry.stat(follow_symlinks=False).st_mtime_ns
    except OSError:
        return 0


def _unlink(path: str | Path) -> bool:
    try:
        os.unlink(path)
    except OSError:
        return False
    return True
