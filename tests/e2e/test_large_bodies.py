"""1 GiB bodies both ways, Content-Length and chunked, with the proxy's memory staying bounded."""

from __future__ import annotations

import hashlib
import json
import subprocess

import pytest

from .conftest import child_env, curl, require_tool

GIB = 1 << 30
MEMORY_LIMIT_KIB = 150 * 1024        # far below any body; the process starts at about 40 MiB


@pytest.fixture(scope="module")
def big_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("big") / "gib.bin"
    with open(path, "wb") as f:
        f.truncate(GIB)                  # sparse: 1 GiB of zeros without using the disk
    return path


def _zeros_sha256(n: int) -> str:
    h = hashlib.sha256()
    block = b"\0" * (1 << 20)
    for _ in range(n // len(block)):
        h.update(block)
    return h.hexdigest()


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
def test_gib_upload(appliance, origin, big_file, framing):
    args = ["-T", str(big_file)] if framing == "content-length" else \
        ["-T", "-", "-H", "Transfer-Encoding: chunked"]
    stdin = open(big_file, "rb") if framing == "chunked" else None
    try:
        r = subprocess.run([require_tool("curl"), "-sS", "--noproxy", "", "-x", appliance.proxy,
                            "-X", "POST", *args, f"{origin}/echo?upload={framing}"],
                           stdin=stdin or subprocess.DEVNULL, capture_output=True, timeout=300,
                           env=child_env())
    finally:
        if stdin:
            stdin.close()
    assert r.returncode == 0, r.stderr
    echo = json.loads(r.stdout)
    assert echo["body_length"] == GIB
    assert echo["body_sha256"] == _zeros_sha256(GIB)
    assert appliance.peak_rss_kib() < MEMORY_LIMIT_KIB


@pytest.mark.parametrize("chunked", ["0", "1"])
def test_gib_download(appliance, origin, chunked):
    r = curl("-x", appliance.proxy, "-o", "/dev/null", "-w", "%{http_code} %{size_download}",
             f"{origin}/bytes?n={GIB}&chunked={chunked}", timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout == f"200 {GIB}".encode()
    assert appliance.peak_rss_kib() < MEMORY_LIMIT_KIB
