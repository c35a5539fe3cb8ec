"""`certs.store.LeafStore`: leaves for interception in memory and on disk, shared by worker
processes, and never a certificate paired with another leaf's key.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import multiprocessing
import os
import ssl
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID

from certs import LeafStore
from certs.authority import CAError, CertificateAuthority, key_type_of, validity_utc
from certs.store import leaf_stem

from .tls_pair import client_context, handshake, server_context

NOW = dt.datetime(2025, 6, 1, 12, 0, 0, tzinfo=dt.timezone.utc)
DAY = dt.timedelta(days=1)
NAMES = ["example.com", "www.example.com"]


@pytest.fixture
def ca(tmp_path) -> CertificateAuthority:
    return CertificateAuthority.load_or_create(tmp_path / "state", NOW)


@pytest.fixture
def leaves(tmp_path) -> Path:
    return tmp_path / "state" / "leaves"


def leaf_in(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())  # the first block: the leaf


def key_pem_in(path: Path) -> bytes:
    data = path.read_bytes()
    return data[data.index(b"-----BEGIN PRIVATE KEY-----"):]


def key_in(path: Path):
    return serialization.load_pem_private_key(key_pem_in(path), password=None)


def pem_files(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if not p.is_symlink())


def links(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.is_symlink())


def assert_pair_loads(paths: tuple[Path, Path]) -> None:
    """What the TLS frontend does with the paths; OpenSSL refuses a key of another leaf."""
    ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(*paths)


# --- memory, disk, minting -------------------------------------------------------------------

def test_first_use_mints_one_file_for_cert_and_key(ca, leaves):
    store = LeafStore(ca, leaves, days=90)
    chain_path, key_path = store.files(NAMES, NOW)
    assert chain_path == key_path and chain_path.parent == leaves
    assert (store.minted, store.memory_hits, store.disk_hits) == (1, 0, 0)
    data = chain_path.read_bytes()
    assert data.count(b"-----BEGIN CERTIFICATE-----") == 2 and b"PRIVATE KEY" in data
    assert ca.issued(leaf_in(chain_path))
    assert_pair_loads((chain_path, key_path))


def test_second_use_is_a_memory_hit(ca, leaves):
    store = LeafStore(ca, leaves, days=90)
    first = store.files(NAMES, NOW)
    assert store.files(["WWW.example.com.", "example.com", "example.com"], NOW + DAY) == first
    assert (store.minted, store.memory_hits, store.disk_hits) == (1, 1, 0)
    assert NAMES in store and len(store) == 1


def test_another_worker_finds_the_leaf_on_disk(ca, leaves):
    first = LeafStore(ca, leaves, days=90).files(NAMES, NOW)
    second = LeafStore(ca, leaves, days=90)  # a second worker: same CA, same directory
    assert second.files(list(reversed(NAMES)), NOW + DAY) == first
    assert (second.minted, second.memory_hits, second.disk_hits) == (0, 0, 1)
    assert second.files(NAMES, NOW + DAY) == first
    assert (second.minted, second.memory_hits, second.disk_hits) == (0, 1, 1)


def test_disk_hit_after_memory_eviction(ca, leaves):
    store = LeafStore(ca, leaves, days=90, max_entries=1)
    a = store.files(["a.example"], NOW)
    store.files(["b.example"], NOW)  # evicts a from memory, not from disk
    assert ["a.example"] not in store
    assert store.files(["a.example"], NOW) == a
    assert (store.minted, store.memory_hits, store.disk_hits) == (2, 0, 1)


@pytest.mark.parametrize("later_days", [60, 61, 90, 365])
def test_reminted_once_two_thirds_have_passed(ca, leaves, later_days):
    store = LeafStore(ca, leaves, days=90)
    old, _ = store.files(NAMES, NOW)
    old_bytes = old.read_bytes()
    later = NOW + later_days * DAY
    new, _ = store.files(NAMES, later)
    assert new != old and store.minted == 2
    assert validity_utc(leaf_in(new))[0] == later - DAY
    assert old.read_bytes() == old_bytes  # a path handed out before never changes content
    assert LeafStore(ca, leaves, days=90).files(NAMES, later)[0] == new  # the link moved


def test_still_fresh_on_day_59(ca, leaves):
    store = LeafStore(ca, leaves, days=90)
    first = store.files(NAMES, NOW)
    assert LeafStore(ca, leaves, days=90).files(NAMES, NOW + 59 * DAY) == first


def test_reminted_for_another_ca(tmp_path, ca, leaves):
    first, _ = LeafStore(ca, leaves, days=90).files(NAMES, NOW)
    other = CertificateAuthority.load_or_create(tmp_path / "other", NOW)
    theirs = LeafStore(other, leaves, days=90)
    path, _ = theirs.files(NAMES, NOW)
    assert path != first and theirs.minted == 1 and theirs.disk_hits == 0
    assert other.issued(leaf_in(path))
    assert path.read_bytes().endswith(other.cert_pem() + key_pem_in(path))
    ours = LeafStore(ca, leaves, days=90)  # and back: the link now leads to the other CA's leaf
    again, _ = ours.files(NAMES, NOW)
    assert ours.minted == 1 and ca.issued(leaf_in(again))


def test_key_types_are_kept_apart(ca, leaves):
    ec_path, _ = LeafStore(ca, leaves, days=90).files(NAMES, NOW)
    rsa_store = LeafStore(ca, leaves, days=90, key_type="rsa")
    rsa_path, _ = rsa_store.files(NAMES, NOW)
    assert rsa_path != ec_path and rsa_store.minted == 1
    assert key_type_of(leaf_in(rsa_path).public_key()) == key_type_of(key_in(rsa_path)) == "rsa"
    assert LeafStore(ca, leaves, days=90).files(NAMES, NOW)[0] == ec_path


@pytest.mark.parametrize("damage", ["garbage", "no key", "other key", "link to a missing file",
                                    "link out of the directory", "a plain file"])
def test_damaged_disk_state_is_reminted(tmp_path, ca, leaves, damage):
    path, _ = LeafStore(ca, leaves, days=90).files(NAMES, NOW)
    link = leaves / f"{leaf_stem(frozenset(NAMES), 'ec')}.pem"
    assert os.readlink(link) == path.name
    if damage == "garbage":
        path.write_bytes(b"not a certificate")
    elif damage == "no key":
        path.write_bytes(path.read_bytes().split(b"-----BEGIN PRIVATE KEY-----")[0])
    elif damage == "other key":
        chain, key = ca.issue(NAMES, NOW, 90)
        path.write_bytes(path.read_bytes().split(b"-----BEGIN PRIVATE KEY-----")[0] + key)
    elif damage == "link to a missing file":
        path.unlink()
    elif damage == "link out of the directory":
        outside = tmp_path / "outside.pem"
        outside.write_bytes(path.read_bytes())
        link.unlink()
        link.symlink_to(f"../../{outside.name}")
    else:
        link.unlink()
        link.write_bytes(path.read_bytes())
    store = LeafStore(ca, leaves, days=90)
    new = store.files(NAMES, NOW)
    assert store.minted == 1 and store.disk_hits == 0
    assert new[0].parent == leaves and os.readlink(link) == new[0].name
    assert_pair_loads(new)


def test_memory_hit_checks_the_file_is_still_there(ca, leaves):
    store = LeafStore(ca, leaves, days=90)
    path, _ = store.files(NAMES, NOW)
    path.unlink()  # as another worker's pruning might
    new, _ = store.files(NAMES, NOW)
    assert new.is_file() and store.minted == 2 and store.memory_hits == 0


def test_clear_forgets_memory_only(ca, leaves):
    store = LeafStore(ca, leaves, days=90)
    first = store.files(NAMES, NOW)
    store.clear()
    assert len(store) == 0
    assert store.files(NAMES, NOW) == first and store.disk_hits == 1


def test_bad_arguments(ca, leaves):
    with pytest.raises(ValueError):
        LeafStore(ca, leaves, days=0)
    with pytest.raises(ValueError):
        LeafStore(ca, leaves, days=90, max_entries=0)
    with pytest.raises(ValueError):
        LeafStore(ca, leaves, days=90, key_type="dsa")


def test_unwritable_directory_is_a_ca_error(tmp_path, ca):
    blocker = tmp_path / "file"
    blocker.write_bytes(b"")
    with pytest.raises(CAError, match="cannot write"):
        LeafStore(ca, blocker / "leaves", days=90).files(NAMES, NOW)


# --- what is minted --------------------------------------------------------------------------

@pytest.mark.parametrize("key_type", ["ec", "rsa"])
def test_leaf_profile_with_dns_names_and_ip_addresses(ca, leaves, key_type):
    names = ["example.com", "*.example.com", "192.0.2.1", "[2001:db8::1]"]
    path, _ = LeafStore(ca, leaves, days=90, key_type=key_type).files(names, NOW)
    leaf = leaf_in(path)
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["example.com", "*.example.com"]
    assert san.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("192.0.2.1"), ipaddress.ip_address("2001:db8::1")]
    eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]
    assert not leaf.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert key_type_of(leaf.public_key()) == key_type
    assert ca.issued(leaf) and leaf.serial_number > 0


@pytest.mark.parametrize("days", [1, 90, 199, 400])
def test_validity_including_backdating_is_at_most_199_days(ca, leaves, days):
    path, _ = LeafStore(ca, leaves, days=days).files(NAMES, NOW)
    not_before, not_after = validity_utc(leaf_in(path))
    assert not_before == NOW - DAY
    assert not_after - not_before <= 199 * DAY
    assert not_after <= NOW + days * DAY


def test_modes_of_directory_and_files(ca, leaves):
    path, _ = LeafStore(ca, leaves, days=90).files(NAMES, NOW)
    assert stat.S_IMODE(leaves.stat().st_mode) == 0o700
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert not [p for p in leaves.iterdir() if p.name.startswith(".")]  # no temp files left


@pytest.mark.parametrize("names, prefix", [
    (["Example.COM", "www.example.com"], "example.com."),
    (["*.example.com"], "_.example.com."),
    (["::1"], "__1."),
    (["192.0.2.1", "example.com"], "192.0.2.1."),
    (["bücher.example"], "xn--bcher-kva.example."),
])
def test_file_names_are_readable_and_safe(ca, leaves, names, prefix):
    path, _ = LeafStore(ca, leaves, days=90).files(names, NOW)
    assert path.name.startswith(prefix) and path.parent == leaves
    assert set(path.name) <= set("abcdefghijklmnopqrstuvwxyz0123456789._-")


def test_names_that_are_not_names_never_become_paths(ca, leaves):
    for names in (["../../etc/passwd"], ["a/b"], [".."], ["example.com/x"]):
        with pytest.raises(ValueError):
            LeafStore(ca, leaves, days=90).files(names, NOW)
    assert not leaves.exists()


def test_name_sets_sharing_a_first_name_get_their_own_files(ca, leaves):
    store = LeafStore(ca, leaves, days=90)
    a, _ = store.files(["a.example", "b.example"], NOW)
    b, _ = store.files(["a.example", "c.example"], NOW)
    assert a != b and a.name.split(".")[:2] == b.name.split(".")[:2]


# --- a real handshake ------------------------------------------------------------------------

@pytest.mark.parametrize("ca_type, leaf_type", [("ec", "ec"), ("rsa", "rsa"), ("rsa", "ec")])
def test_stdlib_client_verifies_a_stored_leaf(tmp_path, ca_type, leaf_type):
    now = dt.datetime.now(dt.timezone.utc)  # OpenSSL checks validity against the real clock
    ca = CertificateAuthority.create(tmp_path / "state", now, key_type=ca_type)
    files = LeafStore(ca, tmp_path / "leaves", days=30, key_type=leaf_type).files(
        ["origin.example", "127.0.0.1"], now)
    for hostname in ("origin.example", "127.0.0.1"):
        client, _ = handshake(server_context(files), client_context(ca.cert_path), hostname)
        assert ("DNS", "origin.example") in client.getpeercert()["subjectAltName"]


# --- pruning ---------------------------------------------------------------------------------

def test_disk_is_pruned_to_ten_times_the_memory_bound(ca, leaves):
    store = LeafStore(ca, leaves, days=90, max_entries=2)
    assert store.max_files == 20
    paths = [store.files([f"n{i}.example"], NOW)[0] for i in range(30)]
    kept = pem_files(leaves)
    assert len(kept) <= store.max_files + 2  # checked every max_entries // 4 (at least 1) mints
    assert paths[-1].name in kept and paths[0].name not in kept
    assert all(os.path.exists(leaves / os.readlink(leaves / link)) for link in links(leaves))


def test_pruning_takes_superseded_files_first(ca, leaves):
    store = LeafStore(ca, leaves, days=90, max_entries=1)  # keeps 10 files, checked every mint
    superseded, _ = store.files(["old.example"], NOW)
    current, _ = store.files(["old.example"], NOW + 61 * DAY)  # renewal leaves the old one behind
    for i in range(9):
        store.files([f"n{i}.example"], NOW + 61 * DAY)
    kept = pem_files(leaves)
    assert len(kept) == 10
    assert superseded.name not in kept and current.name in kept
    assert store.prune() == 0


def test_pruning_spares_a_new_file_that_is_not_linked_yet(ca, leaves):
    store = LeafStore(ca, leaves, days=90, max_entries=2)  # keeps 20 files, checked every mint
    first = [store.files([f"n{i}.example"], NOW)[0] for i in range(20)]
    in_flight = leaves / "w.example.0000000000000000.1111111111111111.pem"  # another worker's,
    in_flight.write_bytes(first[-1].read_bytes())                       # written, not linked
    newest = max(p.stat().st_mtime_ns for p in first) / 1e9
    os.utime(in_flight, (newest + 1, newest + 1))
    store.files(["last.example"], NOW)
    kept = pem_files(leaves)
    assert len(kept) == 20 and in_flight.name in kept
    assert first[0].name not in kept and first[1].name not in kept


# --- several workers -------------------------------------------------------------------------

def _worker(state_dir: str, barrier, rounds: int) -> None:
    """One worker process: mint the same names as its twin at the same moments, and load each
    pair it is handed the way the TLS frontend does (a mismatch raises ssl.SSLError)."""
    ca = CertificateAuthority.load(Path(state_dir), NOW)
    store = LeafStore(ca, Path(state_dir) / "leaves", days=90, max_entries=4)
    for i in range(rounds):
        barrier.wait(timeout=30)
        later = NOW + i * 61 * DAY  # every round finds the last leaf stale: both workers renew
        assert_pair_loads(store.files(["race.example", "127.0.0.1"], later))
        assert_pair_loads(store.files([f"r{i}.example"], later))
        fresh_eyes = LeafStore(ca, Path(state_dir) / "leaves", days=90)
        assert_pair_loads(fresh_eyes.files(["race.example", "127.0.0.1"], later))


def test_two_processes_minting_at_once_leave_matching_pairs(tmp_path, ca):
    context = multiprocessing.get_context("spawn")
    barrier = context.Barrier(2)
    rounds = 8
    workers = [context.Process(target=_worker, args=(str(tmp_path / "state"), barrier, rounds))
               for _ in range(2)]
    for worker in workers:
        worker.start()
    try:
        for worker in workers:
            worker.join(timeout=120)
    finally:
        for worker in workers:
            if worker.is_alive():
                worker.terminate()
                worker.join(timeout=10)
    assert [worker.exitcode for worker in workers] == [0, 0]
    later = NOW + (rounds - 1) * 61 * DAY
    store = LeafStore(ca, tmp_path / "state" / "leaves", days=90)
    files = store.files(["127.0.0.1", "race.example"], later)
    assert store.disk_hits == 1 and store.minted == 0
    assert_pair_loads(files)
    leaf = leaf_in(files[0])
    assert ca.issued(leaf) and validity_utc(leaf)[0] == later - DAY
    race = [name for name in pem_files(tmp_path / "state" / "leaves") if name.startswith("127.")]
    assert len(race) >= rounds  # renewed every round, by one worker or both
    for name in pem_files(tmp_path / "state" / "leaves"):  # every file ever written is whole
        path = tmp_path / "state" / "leaves" / name
        assert_pair_loads((path, path))
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
