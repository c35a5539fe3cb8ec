"""`appliance.observe`: access-log records (JSON lines, Squid native lines) and Prometheus metrics."""

from __future__ import annotations

import json
import re
import time

import gevent
import pytest
from prometheus_client.parser import text_string_to_metric_families

from appliance import __version__
from appliance.observe import AccessLog, AccessRecord, Metrics, Observer

START = 1700000000.25


def record(**kw) -> AccessRecord:
    kw.setdefault("listener", "http")
    kw.setdefault("client", "192.0.2.10")
    kw.setdefault("start", START)
    return AccessRecord(**kw)


def samples(metrics: Metrics) -> dict[tuple[str, tuple], float]:
    """Every sample of the rendered text, keyed by (name, sorted labels)."""
    text = metrics.render().decode("utf-8")
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


# --- JSON lines -----------------------------------------------------------------------------

def test_json_record_has_every_field():
    r = record(method="GET", target="http://example.com/", status=200, bytes_up=120,
               bytes_down=5120, rule="lan", user="alice", upstream="192.0.2.80",
               content_type="text/html", protocol="HTTP/2", connection=7,
               _mono=time.monotonic() - 0.25)
    line = r.to_json()
    assert "\n" not in line and ", " not in line        # one compact line
    data = json.loads(line)
    assert 250 <= data.pop("duration_ms") < 5000
    assert data == {
        "time": 1700000000.25, "client": "192.0.2.10", "user": "alice", "listener": "http",
        "kind": "request", "method": "GET", "target": "http://example.com/", "status": 200,
        "bytes_up": 120, "bytes_down": 5120, "rule": "lan", "upstream": "192.0.2.80",
        "error": None, "protocol": "HTTP/2", "connection": 7,
    }


def test_json_record_defaults_and_escaping():
    r = record(kind="tunnel", error='upstream connect: "refused"\n', target="a b\u00e9")
    data = json.loads(r.to_json())
    assert (data["method"], data["status"], data["user"], data["rule"]) == ("-", 0, None, None)
    assert data["error"] == 'upstream connect: "refused"\n'
    assert data["target"] == "a b\u00e9"
    assert data["kind"] == "tunnel"


def test_json_time_is_rounded_to_milliseconds():
    assert json.loads(record(start=1700000000.123456).to_json())["time"] == 1700000000.123


# --- Squid native lines ---------------------------------------------------------------------

def test_squid_line_fields():
    r = record(method="GET", target="http://example.com/", status=200, bytes_down=5120,
               user="alice", upstream="192.0.2.80", content_type="text/html",
               _mono=time.monotonic() - 1.5)
    fields = r.to_squid().split()
    assert fields[0] == "1700000000.250"
    assert 1500 <= int(fields[1]) < 10000
    assert fields[2:] == ["192.0.2.10", "TCP_MISS/200", "5120", "GET", "http://example.com/",
                          "alice", "HIER_DIRECT/192.0.2.80", "text/html"]


def test_squid_line_pads_elapsed_to_six_columns():
    line = record(method="GET", target="http://a/", status=200).to_squid()
    assert re.match(r"1700000000\.250 [ 0-9]{5}[0-9] 192\.0\.2\.10 TCP_MISS/200 ", line), line


def test_squid_line_dashes_for_unknowns():
    fields = record().to_squid().split()
    assert fields[3:] == ["NONE_NONE/000", "0", "-", "-", "-", "HIER_NONE/-", "-"]


@pytest.mark.parametrize("kw, result", [
    ({"status": 200}, "TCP_MISS/200"),
    ({"status": 404}, "TCP_MISS/404"),
    ({"status": 502, "error": "upstream connect: refused"}, "TCP_MISS/502"),
    ({"status": 403, "error": "denied: default deny (no rule matched)"}, "TCP_DENIED/403"),
    ({"status": 407, "error": "denied: auth"}, "TCP_DENIED/407"),
    ({"status": 0, "error": "denied: rule[0]"}, "TCP_DENIED/000"),
    ({"kind": "tunnel", "method": "CONNECT", "status": 200}, "TCP_TUNNEL/200"),
    ({"kind": "websocket", "status": 101}, "TCP_TUNNEL/101"),
    ({"kind": "tunnel", "method": "CONNECT", "status": 502}, "TCP_MISS/502"),
    ({"status": 400, "error": "protocol: invalid request line"}, "NONE_NONE/400"),
    ({"status": 0, "error": "client went away"}, "NONE_NONE/000"),
])
def test_squid_result_codes(kw, result):
    assert record(**kw).to_squid().split()[3] == result


# --- the access log file --------------------------------------------------------------------

def test_access_log_writes_json_lines(tmp_path):
    path = tmp_path / "access.log"
    log = AccessLog(str(path))
    log.write(record(method="GET", target="http://a/", status=200))
    log.write(record(method="CONNECT", target="b:443", status=200, kind="tunnel"))
    log.close()
    lines = path.read_text(encoding="utf-8").splitlines()
    assert [json.loads(line)["method"] for line in lines] == ["GET", "CONNECT"]


def test_access_log_appends_to_an_existing_file(tmp_path):
    path = tmp_path / "access.log"
    path.write_text("old line\n", encoding="utf-8")
    log = AccessLog(str(path))
    log.write(record(status=204))
    log.close()
    lines = path.read_text(encoding="utf-8").splitlines()
    assert lines[0] == "old line"
    assert json.loads(lines[1])["status"] == 204


def test_access_log_lines_are_visible_once_the_loop_turns(tmp_path):
    path = tmp_path / "access.log"
    log = AccessLog(str(path))
    log.write(record(status=200))
    gevent.sleep(0)                         # the next turn of the loop writes the line
    assert len(path.read_text(encoding="utf-8").splitlines()) == 1
    log.close()


def test_access_log_writes_a_busy_turn_in_one_write(tmp_path):
    """Records finished in one turn of the loop go out in one write(2), whole lines only."""
    path = tmp_path / "access.log"
    log = AccessLog(str(path))
    writes = []
    real_write = log._file.write
    log._file = type("Spy", (), {"write": lambda self, data: writes.append(bytes(data)) or real_write(data),
                                 "close": lambda self: None})()
    for i in range(50):
        log.write(record(status=200, bytes_up=i))
    gevent.sleep(0)
    assert len(writes) == 1 and writes[0].count(b"\n") == 50
    assert [json.loads(line)["bytes_up"] for line in path.read_text().splitlines()] == list(range(50))


def test_access_log_counts_lines_lost_on_a_full_disk(tmp_path):
    """/dev/full answers ENOSPC, as a full disk does: the lines are counted lost, not kept."""
    lost = []
    log = AccessLog("/dev/full", lost=lost.append)
    for _ in range(3):
        log.write(record(status=200))
    gevent.sleep(0)
    log.write(record(status=201))
    log.close()
    assert lost == [3, 1]


def test_access_log_squid_format(tmp_path):
    path = tmp_path / "access.log"
    log = AccessLog(str(path), fmt="squid")
    log.write(record(method="GET", target="http://a/", status=403, error="denied: rule[1]"))
    log.close()
    (line,) = path.read_text(encoding="utf-8").splitlines()
    assert line.split()[3:7] == ["TCP_DENIED/403", "0", "GET", "http://a/"]


def test_access_log_reopen_follows_logrotate(tmp_path):
    path = tmp_path / "access.log"
    log = AccessLog(str(path))
    log.write(record(status=200))
    path.rename(tmp_path / "access.log.1")
    log.write(record(status=201))           # still goes to the renamed file, like any daemon
    log.reopen()                            # SIGUSR1
    log.write(record(status=202))
    log.close()
    rotated = (tmp_path / "access.log.1").read_text(encoding="utf-8").splitlines()
    assert [json.loads(line)["status"] for line in rotated] == [200, 201]
    fresh = path.read_text(encoding="utf-8").splitlines()
    assert [json.loads(line)["status"] for line in fresh] == [202]


def test_access_log_to_stdout(capsys):
    log = AccessLog("-")
    log.write(record(status=200, method="GET"))
    log.reopen()
    log.close()                             # must not close stdout
    out = capsys.readouterr().out
    assert json.loads(out)["status"] == 200


# --- metrics --------------------------------------------------------------------------------

def test_metrics_render_build_info_and_families():
    text = Metrics().render().decode("utf-8")
    assert f'appliance_build_info{{version="{__version__}"}} 1.0' in text
    for name, kind in (("appliance_connections_total", "counter"),
                       ("appliance_active_connections", "gauge"),
                       ("appliance_requests_total", "counter"),
                       ("appliance_transferred_bytes_total", "counter"),
                       ("appliance_request_duration_seconds", "histogram")):
        assert f"# TYPE {name} {kind}\n" in text, name


def test_metrics_are_per_registry():
    a, b = Metrics(), Metrics()
    a.connections.labels("http").inc()
    assert ("appliance_connections_total", (("listener", "http"),)) in samples(a)
    assert ("appliance_connections_total", (("listener", "http"),)) not in samples(b)


def test_observer_counts_connections_and_finished_records(tmp_path):
    path = tmp_path / "access.log"
    log = AccessLog(str(path))
    observer = Observer(log)
    observer.connection_opened("http")
    observer.connection_opened("http")
    observer.connection_opened("socks5")
    observer.connection_closed("http")
    observer.finish(record(status=200, bytes_up=100, bytes_down=2000))
    observer.finish(record(status=200, bytes_up=1, bytes_down=2))
    observer.finish(record(status=403, error="denied: rule[0]"))
    log.close()

    s = samples(observer.metrics)
    http = (("listener", "http"),)
    assert s[("appliance_connections_total", http)] == 2
    assert s[("appliance_active_connections", http)] == 1
    assert s[("appliance_active_connections", (("listener", "socks5"),))] == 1
    assert s[("appliance_requests_total", (("listener", "http"), ("status", "200")))] == 2
    assert s[("appliance_requests_total", (("listener", "http"), ("status", "403")))] == 1
    assert s[("appliance_transferred_bytes_total", (("direction", "up"), ("listener", "http")))] == 101
    assert s[("appliance_transferred_bytes_total", (("direction", "down"), ("listener", "http")))] == 2002
    assert s[("appliance_request_duration_seconds_count", http)] == 3
    assert len(path.read_text(encoding="utf-8").splitlines()) == 3     # one line per record
