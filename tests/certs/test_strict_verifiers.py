"""Minted leaves pass a strict verifier nobody here wrote: `openssl verify -x509_strict`, with
the purpose a TLS server certificate must have (hostile-input suite, group 6, a start)."""

from __future__ import annotations

import datetime as dt
import shutil
import subprocess

import pytest

from certs import CertificateAuthority
from certs.leaf import issue_files

NOW = dt.datetime.now(dt.timezone.utc)


@pytest.mark.parametrize("key_type", ["ec", "rsa"])
@pytest.mark.parametrize("names", [["www.example.test"], ["192.0.2.7"], ["a.example.test", "2001:db8::7"],
                                   ["x" * 63 + ".example.test"]], ids=["dns", "ipv4", "mixed", "long name"])
def test_openssl_x509_strict_accepts_the_leaf(tmp_path, key_type, names):
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.fail("openssl is not installed; the README's test command installs it")
    ca = CertificateAuthority.create(tmp_path, NOW, key_type=key_type)
    chain, _ = issue_files(ca, names, tmp_path / "leaf", "leaf", NOW, 90, key_type=key_type)
    leaf = tmp_path / "leaf-only.pem"
    text = chain.read_text()
    leaf.write_text(text[:text.index("-----END CERTIFICATE-----") + len("-----END CERTIFICATE-----")] + "\n")
    done = subprocess.run([openssl, "verify", "-x509_strict", "-purpose", "sslserver",
                           "-CAfile", str(ca.cert_path), str(leaf)], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0 and done.stdout.strip().endswith(": OK"), done.stdout + done.stderr
