"""The appliance's own certificate authority: created on first start, loaded after that.

Off the data path itself: the https listener's certificate (`certs.leaf.issue_files`) and, for
intercepted TLS, one leaf per origin name (`certs.leaf.LeafCertCache`) are signed here. The CA
certificate is what clients install; the PAC listener serves it as `/ca.pem` and `/ca.der`.

Certificates follow RFC 5280 (basicConstraints, keyUsage, SKI/AKI, SAN) and the CA/Browser Forum's
and Apple's rules for leaves (SAN-first, serverAuth EKU, at most 199 days, SHA-256), styled after
mitmproxy's `certs.py`: the CA lives 10 years, leaves are short-lived, both are backdated a day.
Keys are ECDSA P-256 unless `[ca] key_type = "rsa"` asks for RSA 2048 (for clients without ECDSA);
an RSA CA signs with PKCS#1 v1.5 and SHA-256, which every TLS client accepts.

Pure file and crypto code: no sockets, no gevent, no clock (`now` is passed in), so it also runs
on bookworm's cryptography 38 (no `not_valid_*_utc`, no plural PEM loader, no `backend=`).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import re
import stat
import tempfile
from pathlib import Path
from typing import Sequence, Union

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CA_DAYS = 3650
BACKDATE = dt.timedelta(days=1)
MAX_LEAF_VALIDITY = dt.timedelta(days=199)  # Apple/CA-B Forum ceiling from 2026 is 200 days
MAX_CN_LENGTH = 63  # ub-common-name is 64 (RFC 5280); cryptography >= 43 enforces it

KEY_TYPES = ("ec", "rsa")  # `[ca] key_type`: ECDSA P-256, or RSA 2048 with exponent 65537
RSA_KEY_SIZE = 2048
# Key modes that let anyone but the owner read, or anyone but the owner and group write, the key.
# Group read stays allowed: the Debian package may share the state with group `appliance`.
UNSAFE_KEY_MODE = 0o026

# A loaded CA may be one an admin brought along, so either key type is accepted.
SigningKey = Union[ec.EllipticCurvePrivateKey, rsa.RSAPrivateKey]
PublicKey = Union[ec.EllipticCurvePublicKey, rsa.RSAPublicKey]

# What an admin can do about a CA file that cannot be used: never done for them, as clients may
# already trust the certificate.
START_OVER = ("or remove both CA files to create a new CA (every client must then be given the "
              "new certificate)")

_LABEL = re.compile(r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?\Z")


class CAError(Exception):
    """A CA (or leaf) file cannot be used; `path` names the file, `message` says what is wrong."""

    def __init__(self, path: Path | str, message: str) -> None:
        super().__init__(f"{path}: {message}")
        self.path = Path(path)
        self.message = message


def validity_utc(cert: x509.Certificate) -> tuple[dt.datetime, dt.datetime]:
    """(not_before, not_after) as aware UTC datetimes on every cryptography version.

    The `_utc` properties arrived in cryptography 42; the naive ones are deprecated there.
    """
    try:
        return cert.not_valid_before_utc, cert.not_valid_after_utc
    except AttributeError:  # cryptography < 42 (bookworm has 38)
        utc = dt.timezone.utc
        return (cert.not_valid_before.replace(tzinfo=utc),
                cert.not_valid_after.replace(tzinfo=utc))


def utc_seconds(now: dt.datetime) -> dt.datetime:
    """`now` as aware UTC with whole seconds (what a certificate can hold); naive means UTC."""
    if now.tzinfo is None:
        now = now.replace(tzinfo=dt.timezone.utc)
    return now.astimezone(dt.timezone.utc).replace(microsecond=0)


def normalize_names(names: Sequence[str]) -> tuple[str, ...]:
    """Canonical SAN names: IP literals compressed, DNS names lowercase A-labels; no duplicates.

    Names may come from a client's SNI or CONNECT line, so anything that is not a host name, an
    IP literal (IPv6 optionally in brackets) or a leading "*." wildcard raises ValueError.
    """
    if isinstance(names, str):
        raise TypeError("names must be a sequence of names, not one string")
    seen: dict[str, None] = {}
    for raw in names:
        seen.setdefault(_normalize_name(raw), None)
    if not seen:
        raise ValueError("a certificate needs at least one name")
    return tuple(seen)


def _normalize_name(raw: str) -> str:
    name = raw.strip()
    literal = name[1:-1] if name.startswith("[") and name.endswith("]") else name
    try:
        return str(ipaddress.ip_address(literal))
    except ValueError:
        pass
    name = name.rstrip(".").lower()
    wildcard = name.startswith("*.")
    labels = name[2:].split(".") if wildcard else name.split(".")
    try:
        labels = [label.encode("idna").decode("ascii") for label in labels]
    except UnicodeError as exc:
        raise ValueError(f"not a host name: {raw!r} ({exc})") from None
    if not all(_LABEL.match(label) for label in labels):
        raise ValueError(f"not a host name: {raw!r}")
    name = ("*." if wildcard else "") + ".".join(labels)
    if len(name) > 253:
        raise ValueError(f"host name longer than 253 characters: {raw!r}")
    return name


def _san(names: Sequence[str]) -> list[x509.GeneralName]:
    result: list[x509.GeneralName] = []
    for name in names:
        try:
            result.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            result.append(x509.DNSName(name))
    return result


def san_names(cert: x509.Certificate) -> frozenset[str]:
    """The DNS and IP names of a certificate's SAN, as `normalize_names` writes them."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return frozenset()
    ips = (str(ip) for ip in san.get_values_for_type(x509.IPAddress))
    return frozenset(san.get_values_for_type(x509.DNSName)) | frozenset(ips)


def write_atomically(path: Path, data: bytes, mode: int, sync: bool = True) -> None:
    """Write `data` to `path` with `mode` via a temp file and os.replace, so readers never see a
    half-written file and a key file never exists with looser permissions.

    `sync` makes the bytes durable before the rename, so a crash cannot leave an empty file
    under the name; files that are checked on every read and can be made again may skip it.
    """
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as file:
            file.write(data)
            file.flush()
            if sync:
                os.fsync(file.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def generate_key(key_type: str = "ec") -> SigningKey:
    """A new private key of `key_type` ("ec": P-256, "rsa": 2048 bits, exponent 65537)."""
    if key_type == "ec":
        return ec.generate_private_key(ec.SECP256R1())
    if key_type == "rsa":
        return rsa.generate_private_key(public_exponent=65537, key_size=RSA_KEY_SIZE)
    raise ValueError(f"key type must be one of {', '.join(KEY_TYPES)}, not {key_type!r}")


def key_type_of(key: object) -> str:
    """The `[ca] key_type` spelling of a private or public key: "ec" or "rsa"."""
    if isinstance(key, (ec.EllipticCurvePrivateKey, ec.EllipticCurvePublicKey)):
        return "ec"
    if isinstance(key, (rsa.RSAPrivateKey, rsa.RSAPublicKey)):
        return "rsa"
    raise ValueError(f"unsupported key type {type(key).__name__}")


def describe_key(key: SigningKey | PublicKey) -> str:
    """What an admin compares with client requirements: "EC P-256 (secp256r1)", "RSA 2048"."""
    if isinstance(key, (ec.EllipticCurvePrivateKey, ec.EllipticCurvePublicKey)):
        nist = {"secp256r1": "P-256", "secp384r1": "P-384", "secp521r1": "P-521"}
        curve = key.curve.name
        return f"EC {nist[curve]} ({curve})" if curve in nist else f"EC {curve}"
    return f"{key_type_of(key).upper()} {key.key_size}"


def _public_der(key: object) -> bytes:
    return key.public_bytes(serialization.Encoding.DER,  # type: ignore[attr-defined]
                            serialization.PublicFormat.SubjectPublicKeyInfo)


def key_matches(cert: x509.Certificate, key: object) -> bool:
    """Whether `key` is the private half of `cert`'s public key."""
    return _public_der(cert.public_key()) == _public_der(key.public_key())  # type: ignore


class CertificateAuthority:
    """The CA certificate and key, and where they live under the state directory."""

    def __init__(self, cert: x509.Certificate, key: SigningKey, cert_path: Path,
                 key_path: Path) -> None:
        self.cert = cert
        self.key = key
        self.cert_path = cert_path
        self.key_path = key_path

    @staticmethod
    def paths(state_dir: Path) -> tuple[Path, Path]:
        """(cert_path, key_path) of the CA under `state_dir`."""
        ca_dir = Path(state_dir) / "ca"
        return ca_dir / "ca.pem", ca_dir / "ca.key"

    @classmethod
    def exists(cls, state_dir: Path) -> bool:
        """Whether either CA file is there (half a CA counts: `load` then says what is missing)."""
        cert_path, key_path = cls.paths(state_dir)
        try:
            return cert_path.exists() or key_path.exists()
        except OSError as exc:  # e.g. a state_dir we may not search
            raise CAError(cert_path.parent, f"cannot read: {exc.strerror}") from None

    @classmethod
    def load_or_create(cls, state_dir: Path, now: dt.datetime,
                       common_name: str = "Appliance CA",
                       key_type: str = "ec") -> CertificateAuthority:
        """Load the CA from `state_dir/ca/`, or create it there when neither file exists.

        Half a CA (one file without the other) is an error, not a reason to start over: clients
        may already trust the certificate. For the same reason `key_type` only matters when
        creating; an existing CA keeps its key. Run this once in the parent before forking workers.
        """
        if not cls.exists(state_dir):
            return cls.create(state_dir, now, common_name, key_type)
        return cls.load(state_dir, now)

    @classmethod
    def create(cls, state_dir: Path, now: dt.datetime, common_name: str = "Appliance CA",
               key_type: str = "ec") -> CertificateAuthority:
        """A new CA: a `key_type` key, self-signed, 10 years from a day ago; key written first."""
        if not 1 <= len(common_name) <= MAX_CN_LENGTH:
            raise ValueError(f"CA common name must be 1 to {MAX_CN_LENGTH} characters")
        cert_path, key_path = cls.paths(state_dir)
        for path in (cert_path, key_path):
            if path.exists():
                raise CAError(path, "exists already; remove both CA files to create a new CA")
        key = generate_key(key_type)
        cert = _self_signed(key, common_name, utc_seconds(now))
        try:
            cert_path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            os.chmod(cert_path.parent, 0o700)
            write_atomically(key_path, _key_pem(key), 0o600)
            write_atomically(cert_path, cert.public_bytes(serialization.Encoding.PEM), 0o644)
        except OSError as exc:
            raise CAError(exc.filename or cert_path.parent, f"cannot write: {exc.strerror}")
        return cls(cert, key, cert_path, key_path)

    @classmethod
    def load(cls, state_dir: Path, now: dt.datetime) -> CertificateAuthority:
        """Load and check the CA: parseable, a CA, key matching, not expired at `now`, and the key
        file closed to other users (a key anyone can read lets them intercept every client)."""
        cert_path, key_path = cls.paths(state_dir)
        cert = _load_cert(cert_path)
        key = _load_key(key_path)
        if not key_matches(cert, key):
            raise CAError(key_path, f"private key does not match the certificate {cert_path}; "
                                    f"restore the key that belongs to it, {START_OVER}")
        try:
            constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
        except x509.ExtensionNotFound:
            constraints = None
        if constraints is None or not constraints.ca:
            raise CAError(cert_path, "not a CA certificate (basicConstraints CA:TRUE missing)")
        not_after = validity_utc(cert)[1]
        if not_after <= utc_seconds(now):
            raise CAError(cert_path, f"CA certificate expired on {not_after:%Y-%m-%d %H:%M} UTC")
        return cls(cert, key, cert_path, key_path)

    def cert_pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    def cert_der(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.DER)

    def fingerprint_sha256(self) -> str:
        """"AB:CD:..." as browsers and `openssl x509 -fingerprint -sha256` show it."""
        return self.cert.fingerprint(hashes.SHA256()).hex(":").upper()

    def issued(self, cert: x509.Certificate) -> bool:
        """Whether `cert` was signed by this CA's key under this CA's name."""
        if cert.issuer != self.cert.subject or cert.signature_hash_algorithm is None:
            return False
        public = self.key.public_key()
        try:
            if isinstance(public, ec.EllipticCurvePublicKey):
                public.verify(cert.signature, cert.tbs_certificate_bytes,
                              ec.ECDSA(cert.signature_hash_algorithm))
            else:
                public.verify(cert.signature, cert.tbs_certificate_bytes, padding.PKCS1v15(),
                              cert.signature_hash_algorithm)
        except (InvalidSignature, ValueError, TypeError, UnsupportedAlgorithm):
            return False
        return True

    def issue(self, names: Sequence[str], now: dt.datetime, days: int,
              key_type: str = "ec") -> tuple[bytes, bytes]:
        """A server leaf for `names`: (chain PEM = leaf + CA, unencrypted PKCS8 key PEM).

        The leaf gets a new `key_type` key, whatever the CA's own key is. The first name becomes
        the CN only when it fits (<= 63 characters); otherwise the subject is empty and the SAN
        is critical (RFC 5280 4.2.1.6). Validity runs from a day before `now` to `days` after
        it, capped at 199 days in all and at the CA's own expiry.
        """
        if days < 1:
            raise ValueError("days must be at least 1")
        names = normalize_names(names)
        key = generate_key(key_type)
        cert = self._leaf(names, key.public_key(), utc_seconds(now), days)
        return cert.public_bytes(serialization.Encoding.PEM) + self.cert_pem(), _key_pem(key)

    def _leaf(self, names: tuple[str, ...], public: PublicKey, now: dt.datetime,
              days: int) -> x509.Certificate:
        not_before = now - BACKDATE
        not_after = min(now + dt.timedelta(days=days), not_before + MAX_LEAF_VALIDITY,
                        validity_utc(self.cert)[1])
        short = len(names[0]) <= MAX_CN_LENGTH
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])] if short else [])
        builder = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(self.cert.subject)
            .public_key(public)
            .serial_number(x509.random_serial_number())
            .not_valid_before(not_before)
            .not_valid_after(not_after)
            .add_extension(x509.SubjectAlternativeName(_san(names)), critical=not short)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            # RSA leaves also allow keyEncipherment, for TLS 1.2 clients without (EC)DHE suites.
            .add_extension(_key_usage(digital_signature=True,
                                      key_encipherment=isinstance(public, rsa.RSAPublicKey)),
                           critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]),
                           critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
            .add_extension(self._authority_key_identifier(), critical=False)
        )
        return builder.sign(self.key, hashes.SHA256())

    def _authority_key_identifier(self) -> x509.AuthorityKeyIdentifier:
        try:
            ski = self.cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        except x509.ExtensionNotFound:  # a CA brought along without SKI
            return x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key())
        return x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)


def _key_usage(digital_signature: bool = False, cert_sign: bool = False,
               key_encipherment: bool = False) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=digital_signature, content_commitment=False,
        key_encipherment=key_encipherment,
        data_encipherment=False, key_agreement=False, key_cert_sign=cert_sign,
        crl_sign=cert_sign, encipher_only=False, decipher_only=False)


def _self_signed(key: SigningKey, common_name: str,
                 now: dt.datetime) -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    public = key.public_key()
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(now + dt.timedelta(days=CA_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(cert_sign=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        # Not required in a self-signed root, but strict verifiers (X509_STRICT) like it there.
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(public), critical=False)
    )
    return builder.sign(key, hashes.SHA256())


def _key_pem(key: SigningKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _read(path: Path, private: bool = False) -> bytes:
    """The file's bytes; a `private` one only when its mode keeps other users out (checked with
    fstat on the open file, so the mode checked is that of the bytes read)."""
    try:
        with open(path, "rb") as file:
            mode = os.fstat(file.fileno()).st_mode
            if private and mode & UNSAFE_KEY_MODE:
                raise CAError(path, f"mode {stat.S_IMODE(mode):04o} lets other users read or "
                                    f"change the private key; run `chmod 600 {path}` "
                                    f"(group read, 0640, is allowed too)")
            return file.read()
    except FileNotFoundError:
        raise CAError(path, f"missing; restore it, {START_OVER}")
    except OSError as exc:
        raise CAError(path, f"cannot read: {exc.strerror}") from None


def _load_cert(path: Path) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(_read(path))
    except ValueError as exc:
        raise CAError(path, f"not a PEM certificate ({exc}); restore it, {START_OVER}") from None


def _load_key(path: Path) -> SigningKey:
    try:
        key = serialization.load_pem_private_key(_read(path, private=True), password=None)
    except TypeError:
        raise CAError(path, "private key is encrypted; the appliance needs it unencrypted")
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise CAError(path, f"not a usable PEM private key ({exc}); restore it, "
                            f"{START_OVER}") from None
    if not isinstance(key, (ec.EllipticCurvePrivateKey, rsa.RSAPrivateKey)):
        raise CAError(path, f"unsupported key type {type(key).__name__}; use EC or RSA")
    return key
