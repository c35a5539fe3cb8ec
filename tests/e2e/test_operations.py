"""Operating the appliance: what happens around the traffic (logs that cannot be written, ...)."""

from __future__ import annotations

import os
import re

from .conftest import Appliance, curl


def metric(app: Appliance, name: str) -> float:
    status, text = app.admin_get("/metrics")
    assert status == 200
    found = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
    return float(found.group(1)) if found else 0.0


def test_a_full_disk_under_the_access_log_never_stops_proxying(tmp_path, origin):
    """/dev/full answers every write with ENOSPC, as a full disk does."""
    app = Appliance(tmp_path / "app")
    os.symlink("/dev/full", app.access_log)
    app.start()
    try:
        for i in range(3):
            r = curl("-x", app.proxy, f"{origin}/echo?full={i}")
            assert r.returncode == 0 and b'"full"' in r.stdout
        assert metric(app, "appliance_access_log_write_failures_total") >= 3
        assert metric(app, 'appliance_requests_total{listener="http",status="200"}') >= 3
        assert "access log" in app.proc.output() and "cannot write" in app.proc.output()
    finally:
        app.stop()
