"""A CA that cannot be used fails closed: `appliance run` refuses to start and `appliance ca show`
refuses to describe it, both naming the file and saying what to do; nothing is created or
changed. A new CA appears only where neither file existed (clients may already trust the old
certificate, so a broken CA is never silently replaced).

The real `python -m appliance` process, with a config whose https listener needs the CA.
"""

from __future__ import annotations

import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

import pytest

from certs.authority import CertificateAuthority
from tests.e2e.conftest import REPO, Appliance, Process, child_env


def appliance_command(app: Appliance, *args: str, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "appliance", *args, "--config", str(app.config_path)],
                          cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)


def run_until_exit(app: Appliance, timeout: float = 30) -> tuple[int, str]:
    """`appliance run`, which must exit on its own; stopped by its PID if it does not."""
    proc = Process([sys.executable, "-m", "appliance", "run", "--config", str(app.config_path)],
                   app.dir / "run.out")
    try:
        code = proc.popen.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.stop()
        pytest.fail(f"appliance run started with a broken CA:\n{proc.output()[-2000:]}")
    proc.stop()
    return code, proc.output()


def snapshot(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes()
            for p in sorted(directory.rglob("*")) if p.is_file()}


def another_ca(tmp_path: Path) -> CertificateAuthority:
    return CertificateAuthority.create(tmp_path / "other", datetime.now(timezone.utc),
                                       common_name="Another CA")


def break_missing_cert(cert: Path, key: Path, other: CertificateAuthority) -> Path:
    cert.unlink()
    return cert


def break_missing_key(cert: Path, key: Path, other: CertificateAuthority) -> Path:
    key.unlink()
    return key


def break_garbled_cert(cert: Path, key: Path, other: CertificateAuthority) -> Path:
    cert.write_bytes(cert.read_bytes()[:200])             # cut short, as by a full disk
    return cert


def break_empty_cert(cert: Path, key: Path, other: CertificateAuthority) -> Path:
    cert.write_bytes(b"")
    return cert


def break_garbled_key(cert: Path, key: Path, other: CertificateAuthority) -> Path:
    key.write_bytes(b"-----BEGIN PRIVATE KEY-----\nnot base64 at all\n-----END PRIVATE KEY-----\n")
    return key


def break_key_of_another_ca(cert: Path, key: Path, other: CertificateAuthority) -> Path:
    key.write_bytes(other.key_path.read_bytes())
    return key


def break_certificate_of_another_ca(cert: Path, key: Path, other: CertificateAuthority) -> Path:
    cert.write_bytes(other.cert_pem())
    return key                                    # the key no longer matches: its file is named


BREAKAGES = {
    "certificate missing": (break_missing_cert, "missing; restore it"),
    "key missing": (break_missing_key, "missing; restore it"),
    "certificate cut short": (break_garbled_cert, "not a PEM certificate"),
    "certificate empty": (break_empty_cert, "not a PEM certificate"),
    "key corrupt": (break_garbled_key, "not a usable PEM private key"),
    "key of another CA": (break_key_of_another_ca, "private key does not match the certificate"),
    "certificate of another CA": (break_certificate_of_another_ca,
                                  "private key does not match the certificate"),
}


@pytest.fixture
def broken(tmp_path, request):
    """An appliance whose CA was made by a first `ca init`, then broken as `request.param` says."""
    app = Appliance(tmp_path / "app")
    init = appliance_command(app, "ca", "init")
    assert init.returncode == 0, init.stderr
    cert, key = CertificateAuthority.paths(app.dir / "var")
    breakage, message = BREAKAGES[request.param]
    named = breakage(cert, key, another_ca(tmp_path))
    return app, named, message


@pytest.mark.parametrize("broken", sorted(BREAKAGES), indirect=True)
def test_run_refuses_to_start(broken):
    app, named, message = broken
    before = snapshot(app.dir / "var")
    code, output = run_until_exit(app)
    assert code != 0
    line = next(line for line in output.splitlines() if "cannot start" in line)
    assert f"{named}: {message}" in line
    assert "remove both CA files to create a new CA" in line      # what to do, besides restoring
    assert "Traceback" not in output
    assert snapshot(app.dir / "var") == before                      # no new CA, nothing rewritten


@pytest.mark.parametrize("broken", sorted(BREAKAGES), indirect=True)
def test_ca_show_says_what_is_wrong(broken):
    app, named, message = broken
    before = snapshot(app.dir / "var")
    shown = appliance_command(app, "ca", "show")
    assert shown.returncode == 1 and shown.stdout == ""
    assert shown.stderr.startswith(f"appliance: CA: {named}: {message}")
    assert "remove both CA files to create a new CA" in shown.stderr
    assert snapshot(app.dir / "var") == before


@pytest.mark.parametrize("broken", ["certificate missing", "key of another CA"], indirect=True)
def test_ca_export_does_not_replace_it_either(broken):
    app, named, message = broken
    before = snapshot(app.dir / "var")
    exported = appliance_command(app, "ca", "export")
    assert exported.returncode == 1 and exported.stdout == ""
    assert f"{named}: {message}" in exported.stderr
    assert snapshot(app.dir / "var") == before


def test_a_new_ca_is_created_only_where_neither_file_existed(tmp_path):
    app = Appliance(tmp_path / "app")
    cert, key = CertificateAuthority.paths(app.dir / "var")
    assert not cert.exists() and not key.exists()
    app.start()
    try:
        assert app.admin_get("/healthz")[0] == 200
    finally:
        assert app.stop() == 0
    assert cert.exists() and key.exists() and key.stat().st_mode & 0o777 == 0o600
    shown = appliance_command(app, "ca", "show")
    assert shown.returncode == 0 and str(cert) in shown.stdout
    first = cert.read_bytes()
    app.start()                                  # a second start loads the same CA
    app.stop()
    assert cert.read_bytes() == first
