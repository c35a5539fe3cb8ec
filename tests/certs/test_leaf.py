"""`certs.leaf`: the https listener's certificate files, the interception cache, and a real TLS
handshake with the stdlib `ssl` module against what they produce (in memory, no sockets).
"""

from __future__ import annotations

import datetime as dt
import ssl
import stat

import pytest
from cryptography import x509

from certs.authority import CertificateAuthority, key_type_of, validity_utc
from certs.leaf import LeafCertCache, RecentlyUsed, fresh, issue_files

from .tls_pair import client_context, handshake, server_context

NOW = dt.datetime(2025, 6, 1, 12, 0, 0, tzinfo=dt.timezone.utc)
DAY = dt.timedelta(days=1)
NAMES = ["proxy.localhost", "localhost", "127.0.0.1", "::1"]


@pytest.fixture
def ca(tmp_path) -> CertificateAuthority:
    return CertificateAuthority.load_or_create(tmp_path / "state", NOW)


def serial(pem_path) -> int:
    return x509.load_pem_x509_certificate(pem_path.read_bytes()).serial_number


def issue(ca, tmp_path, names=NAMES, now=NOW, days=90):
    return issue_files(ca, names, tmp_path / "state" / "tls", "https", now, days)


# --- issue_files -----------------------------------------------------------------------------

def test_issue_files_writes_chain_and_private_key(tmp_path, ca):
    pem_path, key_path = issue(ca, tmp_path)
    assert pem_path == tmp_path / "state" / "tls" / "https.pem"
    assert key_path == tmp_path / "state" / "tls" / "https.key"
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600
    assert key_path.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    chain = pem_path.read_bytes()
    assert chain.count(b"-----BEGIN CERTIFICATE-----") == 2 and chain.endswith(ca.cert_pem())
    assert ca.issued(x509.load_pem_x509_certificate(chain))
    assert sorted(p.name for p in key_path.parent.iterdir()) == ["https.key", "https.pem"]


@pytest.mark.parametrize("later_days", [0, 1, 30, 59])
def test_reused_while_more_than_a_third_is_left(tmp_path, ca, later_days):
    pem_path, key_path = issue(ca, tmp_path)
    before = (pem_path.read_bytes(), key_path.read_bytes(), pem_path.stat().st_ino)
    issue(ca, tmp_path, now=NOW + later_days * DAY)
    assert (pem_path.read_bytes(), key_path.read_bytes(), pem_path.stat().st_ino) == before


@pytest.mark.parametrize("later_days", [60, 61, 90, 91, 365])
def test_reissued_once_two_thirds_have_passed(tmp_path, ca, later_days):
    # 90 days forward + 1 backdated = 91 days in all; on day 60 only 30 of them (< 91/3) are left.
    pem_path, key_path = issue(ca, tmp_path)
    old_serial, old_key = serial(pem_path), key_path.read_bytes()
    later = NOW + later_days * DAY
    issue(ca, tmp_path, now=later)
    assert serial(pem_path) != old_serial and key_path.read_bytes() != old_key
    assert validity_utc(x509.load_pem_x509_certificate(pem_path.read_bytes()))[0] == later - DAY
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600


def test_reissued_when_clock_is_before_the_leaf(tmp_path, ca):
    pem_path, _ = issue(ca, tmp_path)
    old = serial(pem_path)
    issue(ca, tmp_path, now=NOW - 2 * DAY)
    assert serial(pem_path) != old


@pytest.mark.parametrize("names", [
    NAMES[:-1], NAMES + ["proxy.example"], ["other.localhost", *NAMES[1:]]])
def test_reissued_when_names_differ(tmp_path, ca, names):
    pem_path, _ = issue(ca, tmp_path)
    old = serial(pem_path)
    issue(ca, tmp_path, names=names)
    assert serial(pem_path) != old


def test_same_names_in_another_spelling_are_reused(tmp_path, ca):
    pem_path, _ = issue(ca, tmp_path)
    old = serial(pem_path)
    issue(ca, tmp_path, names=["[::1]", "LOCALHOST", "127.0.0.1", "proxy.localhost.", "::1"])
    assert serial(pem_path) == old


def test_reissued_for_another_ca(tmp_path, ca):
    pem_path, _ = issue(ca, tmp_path)
    old = serial(pem_path)
    other = CertificateAuthority.load_or_create(tmp_path / "other", NOW)
    issue(other, tmp_path)
    assert serial(pem_path) != old
    assert pem_path.read_bytes().endswith(other.cert_pem())
    assert other.issued(x509.load_pem_x509_certificate(pem_path.read_bytes()))


@pytest.mark.parametrize("damage", ["garbage pem", "garbage key", "other key", "no key"])
def test_reissued_when_files_are_damaged(tmp_path, ca, damage):
    pem_path, key_path = issue(ca, tmp_path)
    old = serial(pem_path)
    if damage == "garbage pem":
        pem_path.write_bytes(b"not a certificate")
    elif damage == "garbage key":
        key_path.write_bytes(b"not a key")
    elif damage == "other key":
        key_path.write_bytes(ca.issue(NAMES, NOW, 90)[1])
    else:
        key_path.unlink()
    issue(ca, tmp_path)
    assert serial(pem_path) != old
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600


@pytest.mark.parametrize("key_type", ["ec", "rsa"])
def test_issue_files_keeps_only_the_asked_key_type(tmp_path, ca, key_type):
    other = "rsa" if key_type == "ec" else "ec"
    pem_path, key_path = issue_files(ca, NAMES, tmp_path / "tls", "https", NOW, 90, key_type)
    first = serial(pem_path)
    assert key_type_of(x509.load_pem_x509_certificate(pem_path.read_bytes()).public_key()) \
        == key_type
    issue_files(ca, NAMES, tmp_path / "tls", "https", NOW, 90, key_type)
    assert serial(pem_path) == first
    issue_files(ca, NAMES, tmp_path / "tls", "https", NOW, 90, other)
    assert serial(pem_path) != first
    assert key_type_of(x509.load_pem_x509_certificate(pem_path.read_bytes()).public_key()) \
        == other
    server_context((pem_path, key_path))  # the pair matches


def test_fresh_boundary():
    start, end = NOW, NOW + 90 * DAY
    assert fresh(start, end, NOW + 59 * DAY)
    assert not fresh(start, end, NOW + 60 * DAY)  # exactly a third left is not more than a third
    assert not fresh(start, end, NOW - DAY)


# --- LeafCertCache ---------------------------------------------------------------------------

def test_cache_mints_once_per_name_set(ca):
    cache = LeafCertCache(ca, days=30)
    first = cache.get(["example.com", "www.example.com"], NOW)
    assert cache.get(["www.example.com", "example.com", "EXAMPLE.com"], NOW + DAY) == first
    assert cache.minted == 1 and len(cache) == 1
    assert ca.issued(x509.load_pem_x509_certificate(first[0]))
    cache.get(["example.com"], NOW)
    assert cache.minted == 2 and len(cache) == 2


def test_cache_evicts_least_recently_used(ca):
    cache = LeafCertCache(ca, days=30, max_entries=2)
    a = cache.get(["a.example"], NOW)
    cache.get(["b.example"], NOW)
    assert cache.get(["a.example"], NOW) == a  # a is now the most recently used
    cache.get(["c.example"], NOW)  # evicts b
    assert ["a.example"] in cache and ["c.example"] in cache and ["b.example"] not in cache
    assert len(cache) == 2 and cache.minted == 3
    cache.get(["b.example"], NOW)  # minted again, evicts a
    assert cache.minted == 4 and ["a.example"] not in cache
    assert cache.get(["c.example"], NOW) and cache.minted == 4


def test_cache_renews_once_two_thirds_have_passed(ca):
    cache = LeafCertCache(ca, days=30)  # 31 days in all
    first = cache.get(["example.com"], NOW)
    assert cache.get(["example.com"], NOW + 19 * DAY) == first
    renewed = cache.get(["example.com"], NOW + 21 * DAY)
    assert renewed != first and cache.minted == 2 and len(cache) == 1
    assert cache.get(["example.com"], NOW + 21 * DAY) == renewed


def test_cache_clear_and_bounds(ca):
    cache = LeafCertCache(ca, days=30)
    cache.get(["example.com"], NOW)
    cache.clear()
    assert len(cache) == 0
    with pytest.raises(ValueError):
        LeafCertCache(ca, days=30, max_entries=0)


def test_cache_mints_the_asked_key_type(tmp_path):
    rsa_ca = CertificateAuthority.load_or_create(tmp_path / "rsa", NOW, key_type="rsa")
    cache = LeafCertCache(rsa_ca, days=30, key_type="rsa")
    chain_pem, _ = cache.get(["example.com"], NOW)
    leaf = x509.load_pem_x509_certificate(chain_pem)
    assert key_type_of(leaf.public_key()) == "rsa" and rsa_ca.issued(leaf)


def test_recently_used_keeps_the_newest():
    recent = RecentlyUsed(2)
    recent.put("a", 1)
    recent.put("b", 2)
    assert recent.get("a") == 1  # a is now the most recently used
    recent.put("c", 3)
    assert "b" not in recent and recent.get("b") is None
    assert len(recent) == 2 and recent.get("a") == 1 and recent.get("c") == 3
    recent.pop("a")
    recent.pop("missing")
    assert len(recent) == 1
    with pytest.raises(ValueError):
        RecentlyUsed(0)


# --- a real TLS handshake, in memory ---------------------------------------------------------

@pytest.fixture
def tls_files(tmp_path):
    # OpenSSL checks validity against the real clock, so this test uses it.
    now = dt.datetime.now(dt.timezone.utc)
    ca = CertificateAuthority.load_or_create(tmp_path / "state", now)
    return ca, issue_files(ca, NAMES, tmp_path / "state" / "tls", "https", now, 90)


@pytest.mark.parametrize("hostname", ["localhost", "127.0.0.1", "::1", "proxy.localhost"])
def test_stdlib_client_verifies_the_listener_certificate(tls_files, hostname):
    ca, files = tls_files
    client, _ = handshake(server_context(files), client_context(ca.cert_path), hostname)
    peer = client.getpeercert()
    assert ("DNS", "localhost") in peer["subjectAltName"]
    assert ("IP Address", "127.0.0.1") in peer["subjectAltName"]


def test_stdlib_client_rejects_a_name_not_in_the_certificate(tls_files):
    ca, files = tls_files
    with pytest.raises(ssl.SSLCertVerificationError, match="mismatch"):
        handshake(server_context(files), client_context(ca.cert_path), "example.com")


def test_stdlib_client_rejects_another_ca(tmp_path, tls_files):
    _, files = tls_files
    now = dt.datetime.now(dt.timezone.utc)
    other = CertificateAuthority.load_or_create(tmp_path / "other", now)
    with pytest.raises(ssl.SSLCertVerificationError):
        handshake(server_context(files), client_context(other.cert_path), "localhost")


def test_cached_leaf_serves_a_handshake(tmp_path):
    now = dt.datetime.now(dt.timezone.utc)
    ca = CertificateAuthority.load_or_create(tmp_path / "state", now)
    chain_pem, key_pem = LeafCertCache(ca, days=30).get(["x" * 60 + ".example.com"], now)
    (tmp_path / "leaf.pem").write_bytes(chain_pem)
    (tmp_path / "leaf.key").write_bytes(key_pem)
    server = server_context((tmp_path / "leaf.pem", tmp_path / "leaf.key"))
    handshake(server, client_context(ca.cert_path), "x" * 60 + ".example.com")  # CN-less leaf
