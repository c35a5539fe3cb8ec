"""The sans-I/O cores import no I/O machinery: no gevent, no socket, no ssl (DESIGN.md).

Checked in a fresh interpreter, since this test process has long imported all of them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FORBIDDEN = ("gevent", "socket", "ssl", "_socket", "_ssl")

PROBE = """
import json, sys
import {module}
print(json.dumps(sorted(m for m in sys.modules if m.split(".")[0] in {forbidden!r})))
"""


@pytest.mark.parametrize("module", [
    "appliance.protocols.http1",
    "appliance.protocols.forwarding",
    "appliance.protocols.h2_mapping",
    "appliance.protocols.websocket_bridge",
    "appliance.protocols.proxy_auth",
    "appliance.protocols.tls_clienthello",
    "appliance.protocols.socks5",
    "appliance.protocols.websocket_inspect",
    "appliance.policy",
    "pac.render",
    "pac.document",
])
def test_sans_io_module_imports_no_io(module):
    path = [str(REPO), os.environ.get("PYTHONPATH", "")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, path))}
    code = PROBE.format(module=module, forbidden=FORBIDDEN)
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == [], f"{module} pulls in I/O modules"


def test_probe_would_see_a_socket_import():
    # The check above is only worth something if the probe notices an import when there is one.
    code = PROBE.format(module="socket", forbidden=FORBIDDEN)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert "socket" in json.loads(done.stdout)
