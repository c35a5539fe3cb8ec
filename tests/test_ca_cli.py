"""`appliance ca init | show | export [--der]`, run as real processes against a temp config."""

from __future__ import annotations

import datetime as dt
import hashlib
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, rsa

REPO = Path(__file__).resolve().parents[1]


def appliance(config: Path, *args: str, text: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        filter(None, [str(REPO), os.environ.get("PYTHONPATH", "")]))}
    return subprocess.run([sys.executable, "-m", "appliance", "ca", *args, "--config", str(config)],
                          cwd=config.parent, env=env, capture_output=True, text=text, timeout=60,
                          stdin=subprocess.DEVNULL)


def write_config(tmp_path: Path, key_type: str | None = None) -> Path:
    config = tmp_path / "appliance.toml"
    text = '[appliance]\nstate_dir = "state"\n'
    if key_type:
        text += f'[ca]\nkey_type = "{key_type}"\n'
    config.write_text(text)
    return config


@pytest.fixture
def config(tmp_path) -> Path:
    return write_config(tmp_path)


def ca_files(config: Path) -> tuple[Path, Path]:
    ca_dir = config.parent / "state" / "ca"
    return ca_dir / "ca.pem", ca_dir / "ca.key"


def test_show_without_a_ca_fails_and_creates_nothing(config):
    done = appliance(config, "show")
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr.startswith("appliance: CA: ")
    assert "no CA yet" in done.stderr and "appliance ca init" in done.stderr
    assert not (config.parent / "state" / "ca").exists()


def test_init_creates_an_ec_ca_then_leaves_it_alone(config):
    done = appliance(config, "init")
    assert done.returncode == 0, done.stderr
    cert_path, key_path = ca_files(config)
    assert "created CA" in done.stdout and str(cert_path) in done.stdout
    assert "EC P-256" in done.stdout
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    assert isinstance(cert.public_key(), ec.EllipticCurvePublicKey)
    before = [(p.read_bytes(), p.stat().st_mtime_ns, p.stat().st_ino)
              for p in (cert_path, key_path)]

    again = appliance(config, "init")
    assert again.returncode == 0, again.stderr
    assert "exists already" in again.stdout
    after = [(p.read_bytes(), p.stat().st_mtime_ns, p.stat().st_ino)
             for p in (cert_path, key_path)]
    assert after == before


def test_init_with_rsa_key_type(tmp_path):
    config = write_config(tmp_path, "rsa")
    done = appliance(config, "init")
    assert done.returncode == 0, done.stderr
    assert "RSA 2048" in done.stdout
    cert = x509.load_pem_x509_certificate(ca_files(config)[0].read_bytes())
    assert isinstance(cert.public_key(), rsa.RSAPublicKey)
    assert cert.public_key().key_size == 2048


def test_init_keeps_an_existing_ca_of_another_key_type(tmp_path):
    config = write_config(tmp_path)
    assert appliance(config, "init").returncode == 0
    write_config(tmp_path, "rsa")
    done = appliance(config, "init")
    assert done.returncode == 0 and "existing CA is kept" in done.stdout
    cert = x509.load_pem_x509_certificate(ca_files(config)[0].read_bytes())
    assert isinstance(cert.public_key(), ec.EllipticCurvePublicKey)


def test_show_describes_the_ca(config):
    assert appliance(config, "init").returncode == 0
    done = appliance(config, "show")
    assert done.returncode == 0, done.stderr
    cert_path, key_path = ca_files(config)
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    fields = dict(line.split(":", 1) for line in done.stdout.splitlines())
    fields = {key: value.strip() for key, value in fields.items()}
    assert fields["subject"] == "CN=Appliance CA"
    der = appliance(config, "export", "--der", text=False).stdout
    assert fields["SHA-256 fingerprint"].replace(":", "").lower() == hashlib.sha256(der).hexdigest()
    not_before, not_after = (dt.datetime.strptime(fields[key], "%Y-%m-%d %H:%M:%S UTC")
                             for key in ("not before", "not after"))
    assert not_after - not_before == dt.timedelta(days=3651)  # 10 years, backdated a day
    assert fields["key"] == "EC P-256 (secp256r1)"
    assert fields["certificate"] == str(cert_path) and fields["private key"] == str(key_path)
    assert cert.subject.rfc4514_string() == fields["subject"]


def test_export_creates_the_ca_on_first_use_with_the_configured_key_type(tmp_path):
    config = write_config(tmp_path, "rsa")
    done = appliance(config, "export")
    assert done.returncode == 0, done.stderr
    cert_path, _ = ca_files(config)
    assert done.stdout == cert_path.read_text()
    assert done.stdout.startswith("-----BEGIN CERTIFICATE-----")
    cert = x509.load_pem_x509_certificate(done.stdout.encode())
    assert isinstance(cert.public_key(), rsa.RSAPublicKey)


def test_export_der_writes_the_same_certificate_in_der(config, tmp_path):
    pem = appliance(config, "export").stdout
    done = appliance(config, "export", "--der", text=False)
    assert done.returncode == 0, done.stderr
    cert = x509.load_der_x509_certificate(done.stdout)
    assert cert == x509.load_pem_x509_certificate(pem.encode())
    assert done.stdout[:1] == b"\x30"  # a DER SEQUENCE, nothing printed before it
    if shutil.which("openssl"):
        der_file = tmp_path / "ca.der"
        der_file.write_bytes(done.stdout)
        subject = subprocess.run(["openssl", "x509", "-inform", "DER", "-noout", "-subject",
                                  "-in", str(der_file)], capture_output=True, text=True,
                                 timeout=30)
        assert subject.returncode == 0, subject.stderr
        assert "Appliance CA" in subject.stdout
    else:
        assert cert.subject.rfc4514_string() == "CN=Appliance CA"


@pytest.mark.parametrize("command", [["init"], ["show"], ["export"], ["export", "--der"]])
def test_a_key_open_to_others_is_refused_with_the_fix(config, command):
    assert appliance(config, "init").returncode == 0
    _, key_path = ca_files(config)
    key_path.chmod(0o644)
    done = appliance(config, *command)
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr.startswith(f"appliance: CA: {key_path}: mode 0644")
    assert f"chmod 600 {key_path}" in done.stderr
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o644


def test_group_readable_key_is_accepted(config):
    assert appliance(config, "init").returncode == 0
    ca_files(config)[1].chmod(0o640)
    assert appliance(config, "show").returncode == 0


def test_half_a_ca_is_an_error_for_init(config):
    assert appliance(config, "init").returncode == 0
    cert_path, _ = ca_files(config)
    cert_path.unlink()
    done = appliance(config, "init")
    assert done.returncode == 1
    assert done.stderr.startswith(f"appliance: CA: {cert_path}: missing")
    assert not cert_path.exists()


def test_bad_config_exits_1(tmp_path):
    config = tmp_path / "appliance.toml"
    config.write_text('[ca]\nkey_type = "dsa"\n')
    for command in ("init", "show", "export"):
        done = appliance(config, command)
        assert done.returncode == 1 and "key_type" in done.stderr
