"""`certs.authority`: the CA's files, loading checks, and the leaves it signs (RFC 5280 profile).

Time is always passed in, so these tests pick their `now`; the files live under `tmp_path`.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import ipaddress
import json
import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from certs.authority import (
    CAError,
    CertificateAuthority,
    describe_key,
    key_type_of,
    normalize_names,
    validity_utc,
)

REPO = Path(__file__).resolve().parents[2]
NOW = dt.datetime(2025, 6, 1, 12, 0, 0, tzinfo=dt.timezone.utc)
DAY = dt.timedelta(days=1)


@pytest.fixture
def ca(tmp_path) -> CertificateAuthority:
    return CertificateAuthority.load_or_create(tmp_path / "state", NOW)


def leaf_of(chain_pem: bytes) -> x509.Certificate:
    return x509.load_pem_x509_certificate(chain_pem)  # the first PEM block


def signed_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    # cryptography 38 has no verify_directly_issued_by: check the signature by hand.
    public = issuer.public_key()
    if isinstance(public, rsa.RSAPublicKey):
        public.verify(cert.signature, cert.tbs_certificate_bytes, padding.PKCS1v15(),
                      cert.signature_hash_algorithm)
    else:
        public.verify(cert.signature, cert.tbs_certificate_bytes,
                      ec.ECDSA(cert.signature_hash_algorithm))
    return cert.issuer == issuer.subject


def ext(cert: x509.Certificate, kind):
    return cert.extensions.get_extension_for_class(kind)


# --- creating and loading the CA -------------------------------------------------------------

def test_first_start_creates_key_0600_in_dir_0700(tmp_path):
    ca = CertificateAuthority.load_or_create(tmp_path / "state", NOW)
    assert ca.cert_path == tmp_path / "state" / "ca" / "ca.pem"
    assert ca.key_path == tmp_path / "state" / "ca" / "ca.key"
    assert stat.S_IMODE(ca.key_path.stat().st_mode) == 0o600
    assert stat.S_IMODE(ca.key_path.parent.stat().st_mode) == 0o700
    assert ca.key_path.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")  # PKCS8, clear
    assert x509.load_pem_x509_certificate(ca.cert_path.read_bytes()) == ca.cert
    assert sorted(p.name for p in ca.key_path.parent.iterdir()) == ["ca.key", "ca.pem"]


def test_ca_certificate_profile(ca):
    cert = ca.cert
    assert isinstance(ca.key, ec.EllipticCurvePrivateKey)
    assert isinstance(ca.key.curve, ec.SECP256R1)
    assert isinstance(cert.signature_hash_algorithm, hashes.SHA256)
    assert cert.subject == cert.issuer
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "Appliance CA"
    assert signed_by(cert, cert)
    constraints = ext(cert, x509.BasicConstraints)
    assert constraints.critical and constraints.value.ca and constraints.value.path_length == 0
    usage = ext(cert, x509.KeyUsage)
    assert usage.critical and usage.value.key_cert_sign and usage.value.crl_sign
    assert not usage.value.digital_signature
    ski = ext(cert, x509.SubjectKeyIdentifier).value
    assert ski == x509.SubjectKeyIdentifier.from_public_key(ca.key.public_key())
    assert validity_utc(cert) == (NOW - DAY, NOW + 3650 * DAY)
    assert cert.serial_number > 0


def test_second_start_loads_the_same_ca(tmp_path, ca):
    again = CertificateAuthority.load_or_create(tmp_path / "state", NOW + 30 * DAY)
    assert again.cert == ca.cert
    assert again.fingerprint_sha256() == ca.fingerprint_sha256()
    assert again.key.private_numbers() == ca.key.private_numbers()


def test_custom_common_name(tmp_path):
    ca = CertificateAuthority.load_or_create(tmp_path, NOW, common_name="Example Office CA")
    assert ca.cert.subject.rfc4514_string() == "CN=Example Office CA"


def test_common_name_over_63_characters_is_refused(tmp_path):
    with pytest.raises(ValueError):
        CertificateAuthority.load_or_create(tmp_path, NOW, common_name="C" * 64)
    assert not (tmp_path / "ca" / "ca.key").exists()


def test_exports_pem_der_and_fingerprint(ca):
    assert ca.cert_pem() == ca.cert_path.read_bytes()
    assert x509.load_der_x509_certificate(ca.cert_der()) == ca.cert
    fingerprint = ca.fingerprint_sha256()
    assert re.fullmatch(r"([0-9A-F]{2}:){31}[0-9A-F]{2}", fingerprint)
    assert fingerprint.replace(":", "").lower() == hashlib.sha256(ca.cert_der()).hexdigest()


def test_key_of_another_ca_is_a_mismatch(tmp_path, ca):
    other = CertificateAuthority.load_or_create(tmp_path / "other", NOW)
    ca.key_path.write_bytes(other.key_path.read_bytes())
    with pytest.raises(CAError) as err:
        CertificateAuthority.load_or_create(tmp_path / "state", NOW)
    assert err.value.path == ca.key_path
    assert "does not match" in err.value.message
    assert str(ca.key_path) in str(err.value)


@pytest.mark.parametrize("which", ["cert_path", "key_path"])
@pytest.mark.parametrize("content", [b"", b"garbage\n", b"-----BEGIN CERTIFICATE-----\nAAAA\n"
                                     b"-----END CERTIFICATE-----\n"])
def test_garbage_file_names_its_path(tmp_path, ca, which, content):
    path = getattr(ca, which)
    path.write_bytes(content)
    with pytest.raises(CAError) as err:
        CertificateAuthority.load_or_create(tmp_path / "state", NOW)
    assert err.value.path == path
    assert str(err.value).startswith(f"{path}: ")


@pytest.mark.parametrize("which", ["cert_path", "key_path"])
def test_half_a_ca_is_an_error_not_a_new_ca(tmp_path, ca, which):
    path = getattr(ca, which)
    path.unlink()
    with pytest.raises(CAError, match="missing") as err:
        CertificateAuthority.load_or_create(tmp_path / "state", NOW)
    assert err.value.path == path
    assert not path.exists()


def test_unreadable_file_names_its_path(tmp_path, ca):
    ca.key_path.unlink()
    ca.key_path.mkdir()  # reading a directory fails even as root, unlike chmod 000
    with pytest.raises(CAError, match="cannot read") as err:
        CertificateAuthority.load_or_create(tmp_path / "state", NOW)
    assert err.value.path == ca.key_path


def test_encrypted_key_is_refused(tmp_path, ca):
    encrypted = ca.key.private_bytes(serialization.Encoding.PEM,
                                     serialization.PrivateFormat.PKCS8,
                                     serialization.BestAvailableEncryption(b"secret"))
    ca.key_path.write_bytes(encrypted)
    with pytest.raises(CAError, match="encrypted") as err:
        CertificateAuthority.load_or_create(tmp_path / "state", NOW)
    assert err.value.path == ca.key_path


def test_leaf_in_place_of_the_ca_is_refused(tmp_path, ca):
    chain, key = ca.issue(["example.com"], NOW, 30)
    ca.cert_path.write_bytes(chain)
    ca.key_path.write_bytes(key)
    with pytest.raises(CAError, match="not a CA") as err:
        CertificateAuthority.load_or_create(tmp_path / "state", NOW)
    assert err.value.path == ca.cert_path


def test_expired_ca_is_refused(tmp_path, ca):
    with pytest.raises(CAError, match="expired") as err:
        CertificateAuthority.load_or_create(tmp_path / "state", NOW + 3651 * DAY)
    assert err.value.path == ca.cert_path


def test_rsa_ca_brought_along_can_sign(tmp_path):
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Corporate Root")])
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(NOW - DAY).not_valid_after(NOW + 365 * DAY)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = CertificateAuthority.paths(tmp_path)
    cert_path.parent.mkdir()
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.TraditionalOpenSSL,
                                           serialization.NoEncryption()))
    key_path.chmod(0o600)
    ca = CertificateAuthority.load_or_create(tmp_path, NOW)
    leaf = leaf_of(ca.issue(["example.com"], NOW, 30)[0])
    key.public_key().verify(leaf.signature, leaf.tbs_certificate_bytes, padding.PKCS1v15(),
                            leaf.signature_hash_algorithm)
    assert ca.issued(leaf)
    aki = ext(leaf, x509.AuthorityKeyIdentifier).value
    assert aki == x509.AuthorityKeyIdentifier.from_issuer_public_key(key.public_key())


# --- key types -------------------------------------------------------------------------------

def test_rsa_ca_is_2048_bits_with_exponent_65537(tmp_path):
    ca = CertificateAuthority.load_or_create(tmp_path, NOW, key_type="rsa")
    assert isinstance(ca.key, rsa.RSAPrivateKey)
    assert ca.key.key_size == 2048 and ca.key.public_key().public_numbers().e == 65537
    assert stat.S_IMODE(ca.key_path.stat().st_mode) == 0o600
    assert isinstance(ca.cert.signature_hash_algorithm, hashes.SHA256)
    assert signed_by(ca.cert, ca.cert)  # PKCS#1 v1.5 with SHA-256
    assert ext(ca.cert, x509.BasicConstraints).value.ca
    again = CertificateAuthority.load_or_create(tmp_path, NOW + DAY)
    assert again.cert == ca.cert and key_type_of(again.key) == "rsa"


@pytest.mark.parametrize("ca_type", ["ec", "rsa"])
@pytest.mark.parametrize("leaf_type", ["ec", "rsa"])
def test_every_ca_type_signs_every_leaf_type(tmp_path, ca_type, leaf_type):
    ca = CertificateAuthority.create(tmp_path, NOW, key_type=ca_type)
    chain, key_pem = ca.issue(["example.com", "192.0.2.1"], NOW, 90, key_type=leaf_type)
    leaf = leaf_of(chain)
    assert signed_by(leaf, ca.cert) and ca.issued(leaf)
    assert isinstance(leaf.signature_hash_algorithm, hashes.SHA256)
    key = serialization.load_pem_private_key(key_pem, password=None)
    assert key_type_of(key) == key_type_of(leaf.public_key()) == leaf_type
    assert key_type_of(ca.key) == ca_type
    if leaf_type == "rsa":
        assert key.key_size == 2048 and key.public_key().public_numbers().e == 65537
    else:
        assert isinstance(key.curve, ec.SECP256R1)
    usage = ext(leaf, x509.KeyUsage).value
    assert usage.digital_signature and usage.key_encipherment == (leaf_type == "rsa")
    assert list(ext(leaf, x509.ExtendedKeyUsage).value) == [ExtendedKeyUsageOID.SERVER_AUTH]
    other = CertificateAuthority.create(tmp_path / "other", NOW, key_type=ca_type)
    assert not other.issued(leaf)


def test_key_type_only_matters_when_creating(tmp_path):
    CertificateAuthority.load_or_create(tmp_path, NOW, key_type="ec")
    again = CertificateAuthority.load_or_create(tmp_path, NOW, key_type="rsa")
    assert key_type_of(again.key) == "ec"


def test_unknown_key_type_is_refused_before_writing(tmp_path, ca):
    with pytest.raises(ValueError, match="dsa"):
        CertificateAuthority.create(tmp_path / "new", NOW, key_type="dsa")
    assert not (tmp_path / "new").exists()
    with pytest.raises(ValueError, match="ed25519"):
        ca.issue(["example.com"], NOW, 30, key_type="ed25519")


def test_describe_key(tmp_path, ca):
    assert describe_key(ca.key) == "EC P-256 (secp256r1)"
    assert describe_key(ca.cert.public_key()) == "EC P-256 (secp256r1)"
    rsa_ca = CertificateAuthority.create(tmp_path / "rsa", NOW, key_type="rsa")
    assert describe_key(rsa_ca.key) == "RSA 2048"


# --- the key file's mode ---------------------------------------------------------------------

@pytest.mark.parametrize("mode", [0o644, 0o604, 0o606, 0o660, 0o620, 0o602, 0o666, 0o777])
def test_key_open_to_others_is_refused(tmp_path, ca, mode):
    ca.key_path.chmod(mode)
    with pytest.raises(CAError) as err:
        CertificateAuthority.load_or_create(tmp_path / "state", NOW)
    assert err.value.path == ca.key_path
    assert f"mode {mode:04o}" in err.value.message
    assert f"chmod 600 {ca.key_path}" in str(err.value)
    assert stat.S_IMODE(ca.key_path.stat().st_mode) == mode  # refused, not "fixed" behind a back


@pytest.mark.parametrize("mode", [0o600, 0o640, 0o400, 0o440])
def test_key_closed_to_others_is_accepted(tmp_path, ca, mode):
    ca.key_path.chmod(mode)
    assert CertificateAuthority.load_or_create(tmp_path / "state", NOW).cert == ca.cert


def test_certificate_may_be_world_readable(tmp_path, ca):
    assert stat.S_IMODE(ca.cert_path.stat().st_mode) == 0o644
    ca.cert_path.chmod(0o666)
    assert CertificateAuthority.load(tmp_path / "state", NOW).cert == ca.cert


def test_exists_counts_half_a_ca(tmp_path, ca):
    assert CertificateAuthority.exists(tmp_path / "state")
    assert not CertificateAuthority.exists(tmp_path / "nothing")
    ca.cert_path.unlink()
    assert CertificateAuthority.exists(tmp_path / "state")


# --- leaves ----------------------------------------------------------------------------------

def test_leaf_verifies_against_the_ca(ca):
    chain, key_pem = ca.issue(["example.com"], NOW, 90)
    leaf = leaf_of(chain)
    assert signed_by(leaf, ca.cert)
    assert ca.issued(leaf)
    assert chain == leaf.public_bytes(serialization.Encoding.PEM) + ca.cert_pem()
    assert key_pem.startswith(b"-----BEGIN PRIVATE KEY-----")
    key = serialization.load_pem_private_key(key_pem, password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey) and isinstance(key.curve, ec.SECP256R1)
    assert key.public_key().public_numbers() == leaf.public_key().public_numbers()


def test_leaf_of_another_ca_is_not_issued_by_this_one(tmp_path, ca):
    other = CertificateAuthority.load_or_create(tmp_path / "other", NOW)
    assert not ca.issued(leaf_of(other.issue(["example.com"], NOW, 30)[0]))


def test_leaf_profile(ca):
    leaf = leaf_of(ca.issue(["example.com"], NOW, 90)[0])
    assert isinstance(leaf.signature_hash_algorithm, hashes.SHA256)
    assert leaf.subject.rfc4514_string() == "CN=example.com"
    constraints = ext(leaf, x509.BasicConstraints)
    assert constraints.critical and not constraints.value.ca
    usage = ext(leaf, x509.KeyUsage)
    assert usage.critical and usage.value.digital_signature and not usage.value.key_cert_sign
    assert list(ext(leaf, x509.ExtendedKeyUsage).value) == [ExtendedKeyUsageOID.SERVER_AUTH]
    aki = ext(leaf, x509.AuthorityKeyIdentifier).value
    assert aki.key_identifier == ext(ca.cert, x509.SubjectKeyIdentifier).value.digest
    assert not ext(leaf, x509.SubjectAlternativeName).critical
    assert leaf.serial_number > 0
    assert leaf.serial_number != leaf_of(ca.issue(["example.com"], NOW, 90)[0]).serial_number


def test_san_holds_dns_names_and_ip_literals(ca):
    names = ["example.com", "*.example.com", "127.0.0.1", "::1", "[2001:db8::1]",
             "Example.COM.", "bücher.example"]
    san = ext(leaf_of(ca.issue(names, NOW, 30)[0]), x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == [
        "example.com", "*.example.com", "xn--bcher-kva.example"]
    assert san.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("::1"),
        ipaddress.ip_address("2001:db8::1")]


def test_ip_only_leaf(ca):
    leaf = leaf_of(ca.issue(["192.0.2.7"], NOW, 30)[0])
    san = ext(leaf, x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == []
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("192.0.2.7")]


def test_100_character_hostname_goes_into_san_only(ca):
    long_name = ".".join(["a" * 40, "b" * 40, "c" * 13, "test"])
    assert len(long_name) == 100
    leaf = leaf_of(ca.issue([long_name], NOW, 30)[0])
    assert ext(leaf, x509.SubjectAlternativeName).value.get_values_for_type(
        x509.DNSName) == [long_name]
    assert ext(leaf, x509.SubjectAlternativeName).critical  # RFC 5280 4.2.1.6: empty subject
    assert len(leaf.subject) == 0
    assert signed_by(leaf, ca.cert)


def test_cn_is_the_first_name_only_when_short(ca):
    long_name = "x" * 60 + ".example.com"
    leaf = leaf_of(ca.issue(["short.example", long_name], NOW, 30)[0])
    assert leaf.subject.rfc4514_string() == "CN=short.example"
    leaf = leaf_of(ca.issue([long_name, "short.example"], NOW, 30)[0])
    cns = leaf.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    assert all(len(cn.value) <= 64 for cn in cns) and not cns


@pytest.mark.parametrize("days, expected_days", [
    (1, 2), (90, 91), (198, 199), (199, 199), (200, 199), (400, 199)])
def test_validity_is_backdated_and_never_over_199_days(ca, days, expected_days):
    leaf = leaf_of(ca.issue(["example.com"], NOW, days)[0])
    not_before, not_after = validity_utc(leaf)
    assert not_before == NOW - DAY
    assert not_after - not_before == expected_days * DAY
    assert not_after <= NOW + days * DAY


def test_validity_ends_with_the_ca(ca):
    ca_end = validity_utc(ca.cert)[1]
    leaf = leaf_of(ca.issue(["example.com"], ca_end - 10 * DAY, 90)[0])
    assert validity_utc(leaf)[1] == ca_end


def test_naive_now_means_utc_and_microseconds_are_dropped(ca):
    naive = NOW.replace(tzinfo=None, microsecond=123456)
    leaf = leaf_of(ca.issue(["example.com"], naive, 30)[0])
    assert validity_utc(leaf)[0] == NOW - DAY


def test_days_must_be_positive(ca):
    with pytest.raises(ValueError):
        ca.issue(["example.com"], NOW, 0)


@pytest.mark.parametrize("names", [
    [], [""], ["exa mple.com"], ["a..b"], ["foo.*.example"], ["*"], ["**.example"],
    ["-a.example"], ["a" * 64 + ".example"], ["example.com/path"], ["host:443"]])
def test_bad_names_are_refused(ca, names):
    with pytest.raises(ValueError):
        ca.issue(names, NOW, 30)


def test_one_string_is_not_a_list_of_names(ca):
    with pytest.raises(TypeError):
        ca.issue("example.com", NOW, 30)


def test_normalize_names_dedupes_in_order():
    assert normalize_names(["B.example", "a.example.", "b.example", "[::1]", "0:0::1"]) == (
        "b.example", "a.example", "::1")


# --- import discipline -----------------------------------------------------------------------

def test_certs_imports_no_gevent_ssl_or_frontends():
    # cryptography.x509 pulls in `socket` through email.utils, so `socket` cannot be checked.
    code = ("import json, sys, certs, certs.authority, certs.leaf\n"
            "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in "
            "('gevent', 'ssl', '_ssl') or m.startswith('appliance.frontends'))))")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        filter(None, [str(REPO), os.environ.get("PYTHONPATH", "")]))}
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == []
