"""The admin listener (/healthz, /metrics, /status, /status.json) and the `appliance` command line."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time

from .conftest import REPO, Process, child_env, curl


def _appliance_cmd(*args: str, cwd=REPO) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "appliance", *args], capture_output=True, text=True,
                          timeout=60, cwd=cwd, env=child_env(), stdin=subprocess.DEVNULL)


def _metric(text: str, name: str, **labels) -> float:
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    for line in text.splitlines():
        if line.startswith(f"{name}{{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name}{{{want}}} not in metrics")


def test_healthz_status_and_metrics(make_appliance, origin):
    app = make_appliance()
    assert app.admin_get("/healthz") == (200, "ok\n")
    curl("-x", app.proxy, f"{origin}/echo", f"{origin}/status?code=404")
    curl("-x", app.proxy, "-H", "Via: 1.1 proxy.test", f"{origin}/echo")
    app.wait_records(3)
    status, text = app.admin_get("/metrics")
    assert status == 200
    assert _metric(text, "appliance_requests_total", listener="http", status="200") == 1
    assert _metric(text, "appliance_requests_total", listener="http", status="404") == 1
    assert _metric(text, "appliance_requests_total", listener="http", status="403") == 1
    assert _metric(text, "appliance_connections_total", listener="http") == 2
    assert _metric(text, "appliance_transferred_bytes_total", listener="http", direction="down") > 100
    assert _metric(text, "appliance_transferred_bytes_total", listener="http", direction="up") > 100
    assert 'appliance_build_info{version="' in text
    status, body = app.admin_get("/status.json")
    assert status == 200
    info = json.loads(body)
    assert info["listeners"][0]["kind"] == "http"
    assert info["totals"]["requests"] == 3 and info["totals"]["denials"] == 1
    status, page = app.admin_get("/status")
    assert status == 200 and page.startswith("<!doctype html>")
    assert app.admin_get("/nope")[0] == 404


def test_check_config_reports_file_line_key(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('[listen]\nhttp = "localhost:3128"\n\n[[rule]]\naction = "allow"\n'
                   'src = ["10.0.0.0/33"]\n\n[[rule]]\naction = "permit"\n')
    r = _appliance_cmd("check-config", "--config", str(bad))
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert any(re.match(rf"{re.escape(str(bad))}:2: listen\.http: ", l) for l in lines), lines
    assert any(re.match(rf"{re.escape(str(bad))}:6: rule\[0\]\.src", l) for l in lines), lines
    assert any(re.match(rf"{re.escape(str(bad))}:9: rule\[1\]\.action", l) for l in lines), lines


def test_check_config_unknown_key_and_syntax_error(tmp_path):
    typo = tmp_path / "typo.toml"
    typo.write_text('[appliance]\nnmae = "x"\n')
    r = _appliance_cmd("check-config", "--config", str(typo))
    assert r.returncode == 1 and f"{typo}:2: appliance.nmae:" in r.stderr
    broken = tmp_path / "broken.toml"
    broken.write_text('[listen]\nhttp = "127.0.0.1:3128\n')
    r = _appliance_cmd("check-config", "--config", str(broken))
    assert r.returncode == 1 and f"{broken}:2:" in r.stderr


def test_run_refuses_a_bad_config(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('[listen]\nhttp = "127.0.0.1:99999"\n')
    r = _appliance_cmd("run", "--config", str(bad))
    assert r.returncode == 1
    assert f"{bad}:2: listen.http:" in r.stderr


def test_version_and_shipped_config():
    r = _appliance_cmd("version")
    assert r.returncode == 0 and r.stdout.startswith("appliance ")
    r = _appliance_cmd("check-config", "--config", "appliance.toml")
    assert r.returncode == 0, r.stderr


def test_default_config_answers_curl_within_a_second(tmp_path, origin):
    """`appliance run` on the shipped appliance.toml, on its own ports (127.0.0.1:3128)."""
    shutil.copy(REPO / "appliance.toml", tmp_path / "appliance.toml")   # ./var lands in tmp_path
    proc = Process([sys.executable, "-m", "appliance", "run", "--config", str(tmp_path / "appliance.toml")],
                   tmp_path / "out.log")
    try:
        start = time.monotonic()
        answered = None
        for _ in range(100):
            r = curl("-x", "http://127.0.0.1:3128", "-m", "2", "-o", "/dev/null", "-w", "%{http_code}",
                     f"{origin}/echo")
            if r.stdout == b"200":
                answered = time.monotonic() - start
                break
            if time.monotonic() - start > 5:
                break
            time.sleep(0.02)
        assert answered is not None, proc.output()
        assert answered < 1.0, f"first answer after {answered:.2f}s"
        assert (tmp_path / "var").is_dir()
    finally:
        assert proc.stop() == 0          # SIGTERM drains and exits cleanly


def test_sigterm_drains_requests_in_flight(make_appliance, origin):
    app = make_appliance()
    result = {}

    def slow():
        result["r"] = curl("-x", app.proxy, "-w", "%{http_code}", "-o", "/dev/null", f"{origin}/slow?s=1")

    t = threading.Thread(target=slow)
    t.start()
    time.sleep(0.4)                               # the request is in flight
    assert app.stop() == 0                        # SIGTERM: stop accepting, finish what runs
    t.join(10)
    assert result["r"].stdout == b"200"
    assert "stopping" in app.proc.output()


def test_sighup_reloads_rules_and_keeps_the_old_config_when_the_new_one_is_bad(make_appliance, origin):
    app = make_appliance(rules='[[rule]]\nname = "nobody"\naction = "deny"\n')
    code = lambda: curl("-x", app.proxy, "-o", "/dev/null", "-w", "%{http_code}", f"{origin}/echo").stdout
    assert code() == b"403"
    text = app.config_path.read_text()
    app.config_path.write_text(text.replace('action = "deny"', 'action = "allow"'))
    os.kill(app.proc.pid, signal.SIGHUP)
    for _ in range(100):                      # the reload happens on the appliance's own time
        if code() == b"200":
            break
        time.sleep(0.05)
    assert code() == b"200"
    app.config_path.write_text(text.replace('action = "deny"', 'action = "maybe"'))
    os.kill(app.proc.pid, signal.SIGHUP)
    for _ in range(100):
        if "reload refused" in app.proc.output():
            break
        time.sleep(0.05)
    assert "rule[0].action" in app.proc.output()
    assert code() == b"200"                   # still the last good config
