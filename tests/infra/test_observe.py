"""The one lifecycle, metrics, ops endpoint and logging setup (infra.lifecycle, infra.metrics,
infra.ops, infra.logs): real HTTP servers on free ports, real processes, real signals."""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from prometheus_client import generate_latest

from infra import logs, metrics, ops
from infra.errors import ConfigError
from infra.processes import free_port
from infra.settings import REPO_ROOT
from tests.conftest import wait_for


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


# -- logging ------------------------------------------------------------------------------------
def _render(fmt: str, record: logging.LogRecord) -> str:
    return logs.formatter(fmt).format(record)


def _record(msg: str, **extra: object) -> logging.LogRecord:
    record = logging.LogRecord("backbeat.test", logging.WARNING, __file__, 1, msg, (), None)
    for key, value in extra.items():
        setattr(record, key, value)
    return record


def test_json_lines_carry_level_logger_and_context_fields():
    logs.set_process("unit")
    line = _render("json", _record("dead letter", topic="listens", partition=3, offset=17, event_id="e1", x=1))
    doc = json.loads(line)
    assert doc["event"] == "dead letter" and doc["level"] == "warning" and doc["logger"] == "backbeat.test"
    assert (doc["topic"], doc["partition"], doc["offset"], doc["event_id"]) == ("listens", 3, 17, "e1")
    assert doc["process"] == "unit" and "x" not in doc and doc["timestamp"].endswith("Z")


def test_bound_fields_follow_the_thread():
    with logs.bind(saga_id="s-1"):
        inside = json.loads(_render("json", _record("step")))
    outside = json.loads(_render("json", _record("step")))
    assert inside["saga_id"] == "s-1" and "saga_id" not in outside


def test_console_lines_are_one_readable_line():
    line = _render("console", _record("applied 5 records", topic="listens", partition=2))
    assert "\n" not in line and "applied 5 records" in line and "topic=listens" in line and "partition=2" in line


def test_bad_format_or_level_is_a_clear_error():
    with pytest.raises(ConfigError, match="BACKBEAT_LOG_FORMAT='xml'"):
        logs.log_format({"BACKBEAT_LOG_FORMAT": "xml"})
    with pytest.raises(ConfigError, match="BACKBEAT_LOG_LEVEL='LOUD'"):
        logs.log_level({"BACKBEAT_LOG_LEVEL": "loud"})
    assert logs.log_format({}) == "console" and logs.log_level({}) == "INFO"


def test_no_module_sets_up_logging_its_own_way():
    """One logging setup: nothing in the code calls ``logging.basicConfig`` (infra.logs is the one)."""
    offenders = [
        str(p.relative_to(REPO_ROOT))
        for package in ("events", "infra", "personalisation", "projections", "sagas", "streams")
        for p in (REPO_ROOT / package).rglob("*.py")
        if "basicConfig(" in p.read_text()
    ]
    assert offenders == []


# -- metrics ------------------------------------------------------------------------------------
def _value(text: str, name: str, **labels: str) -> float | None:
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            got = line[len(name) :].split(" ")[0].strip("{}")
            if ",".join(sorted(got.split(","))) == want:
                return float(line.rsplit(" ", 1)[1])
    return None


def test_components_are_read_at_scrape_time_with_lag_from_high_watermarks():
    state = {"n": 10}
    metrics.set_process("unit", high_watermarks=lambda topic: {0: 25, 1: 7})
    metrics.register(
        "unit:a",
        lambda: metrics.Observation(
            records_in={"listens": state["n"]},
            records_out={"sessions": 2},
            dead_letters={"decode_error": 1},
            retries=4,
            state_entries=9,
            positions={("listens-lag-unit", 0): 20, ("listens-lag-unit", 1): 7},
            saga_states={("order", "completed"): 3},
            ready=True,
        ),
    )
    try:
        text = generate_latest(metrics.REGISTRY).decode()
        assert _value(text, "backbeat_records_in_total", component="unit:a", topic="listens") == 10
        state["n"] = 12
        text = generate_latest(metrics.REGISTRY).decode()
        assert _value(text, "backbeat_records_in_total", component="unit:a", topic="listens") == 12
        assert _value(text, "backbeat_records_out_total", component="unit:a", topic="sessions") == 2
        assert _value(text, "backbeat_dead_letters_total", component="unit:a", reason="decode_error") == 1
        assert _value(text, "backbeat_retries_total", component="unit:a") == 4
        assert _value(text, "backbeat_state_entries", component="unit:a") == 9
        assert _value(text, "backbeat_saga_states", saga_type="order", state="completed") == 3
        lag = {p: _value(text, "backbeat_consumer_lag", component="unit:a", topic="listens-lag-unit", partition=p)
               for p in ("0", "1")}  # fmt: skip
        assert lag == {"0": 5, "1": 0}
        assert _value(text, "backbeat_ready", component="unit:a") == 1
        assert _value(text, "backbeat_up", process="unit") == 1
    finally:
        metrics.unregister("unit:a")
        metrics.set_process("", None)


def test_a_component_that_cannot_report_is_not_ready_and_breaks_nothing():
    metrics.register("unit:broken", lambda: 1 / 0)  # type: ignore[arg-type, return-value]
    metrics.register("unit:fine", lambda: metrics.Observation(records_in={"t": 1}, ready=True))
    try:
        text = generate_latest(metrics.REGISTRY).decode()
        assert _value(text, "backbeat_ready", component="unit:broken") == 0
        assert _value(text, "backbeat_records_in_total", component="unit:fine", topic="t") == 1
        status, body = ops.health()
        assert status == 503 and body["status"] == "starting"
        assert "ZeroDivisionError" in body["components"]["unit:broken"]["error"]
    finally:
        metrics.unregister("unit:broken")
        metrics.unregister("unit:fine")


def test_batch_latency_histogram():
    metrics.observe_batch("unit:h", 0.02)
    metrics.observe_batch("unit:h", 3.0)
    text = generate_latest(metrics.REGISTRY).decode()
    assert _value(text, "backbeat_batch_duration_seconds_count", component="unit:h") == 2
    assert _value(text, "backbeat_batch_duration_seconds_bucket", component="unit:h", le="0.025") == 1


# -- the ops endpoint ---------------------------------------------------------------------------
def test_ops_server_serves_metrics_and_readiness():
    ready = {"v": False}
    metrics.register("unit:ops", lambda: metrics.Observation(ready=ready["v"], detail={"lag": 3}))
    server = ops.OpsServer("127.0.0.1", free_port(), fallback=False).start()
    try:
        status, body = _get(server.url + "/health")
        assert status == 503 and json.loads(body)["components"]["unit:ops"] == {"ready": False, "lag": 3}
        ready["v"] = True
        status, body = _get(server.url + "/health")
        assert status == 200 and json.loads(body)["status"] == "ready"
        assert _get(server.url + "/health/live")[0] == 200
        status, text = _get(server.url + "/metrics")
        assert status == 200 and _value(text, "backbeat_ready", component="unit:ops") == 1
        assert "process_resident_memory_bytes" in text
        assert _get(server.url + "/nope")[0] == 404
    finally:
        server.stop()
        metrics.unregister("unit:ops")


def test_a_taken_port_falls_back_only_for_the_default():
    first = ops.OpsServer("127.0.0.1", free_port(), fallback=False).start()
    try:
        with pytest.raises(ConfigError, match="--ops-port or BACKBEAT_OPS_PORT"):
            ops.OpsServer("127.0.0.1", first.port, fallback=False).start()
        second = ops.OpsServer("127.0.0.1", first.port, fallback=True).start()
        assert second.port != first.port and _get(second.url + "/health/live")[0] == 200
        second.stop()
    finally:
        first.stop()


def test_port_setting():
    assert ops.port_setting("worker", None, {}) == ops.DEFAULT_PORTS["worker"]
    assert ops.port_setting("worker", None, {"BACKBEAT_OPS_PORT": "9999"}) == 9999
    assert ops.port_setting("worker", "1234", {"BACKBEAT_OPS_PORT": "9999"}) == 1234
    assert ops.port_setting("worker", "off", {}) is None
    with pytest.raises(ConfigError, match="port number"):
        ops.port_setting("worker", "http", {})


# -- the lifecycle (real processes) -------------------------------------------------------------
def _toy(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "tests.infra.lifecycle_toy", *args],
        cwd=REPO_ROOT,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT), **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_a_loop_that_ends_stops_the_process_with_status_0():
    out, err = _toy("ok", "50", "off").communicate(timeout=60)
    assert "result 50" in out, err


def test_a_loop_that_fails_stops_the_process_with_status_1_and_the_message():
    proc = _toy("fail", "5", "off", env={"BACKBEAT_LOG_FORMAT": "json"})
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 1, (out, err)
    docs = [json.loads(line) for line in err.splitlines() if line.strip()]  # every line is JSON
    assert any(d["event"] == "toy: the toy failed on purpose" and d["level"] == "error" for d in docs)
    assert all(d["process"] == "toy" for d in docs)
    third = next(d for d in docs if d["event"] == "third step")
    assert (third["topic"], third["partition"], third["offset"], third["event_id"]) == ("toy", 1, 2, "e-3")


def test_an_unexpected_error_exits_1_with_its_traceback():
    proc = _toy("crash", "5", "off")
    _out, err = proc.communicate(timeout=60)
    assert proc.returncode == 1 and "RuntimeError: unexpected" in err


def test_sigterm_marks_health_stopping_then_stops_the_loop_cleanly(tmp_path: Path):
    port = free_port()
    proc = _toy("ok", "0", str(port), env={"BACKBEAT_DATA_DIR": str(tmp_path)})
    try:
        wait_for(lambda: _get(f"http://127.0.0.1:{port}/health")[0] == 200 if _alive(port) else None, 30,
                 "the toy to be ready")  # fmt: skip
        assert ops.read_address(tmp_path / "run", "toy") == f"http://127.0.0.1:{port}"
        shown = subprocess.run(
            [sys.executable, "-m", "infra.cli", "status"], cwd=REPO_ROOT, capture_output=True, text=True,
            env={**os.environ, "BACKBEAT_DATA_DIR": str(tmp_path), "COLUMNS": "200"}, timeout=60,
        )  # fmt: skip
        assert re.search(rf"toy\s.*{proc.pid}.*http://127.0.0.1:{port}.*ready", shown.stdout), shown
        status, text = _get(f"http://127.0.0.1:{port}/metrics")
        assert (_value(text, "backbeat_records_in_total", component="toy", topic="toy") or 0) >= 3
        proc.send_signal(signal.SIGTERM)
        seen = wait_for(lambda: _health_while_stopping(port), 10, "/health to say stopping")
        assert seen == "stopping"
        out, _err = proc.communicate(timeout=60)
        assert proc.returncode == 0 and re.search(r"result \d+", out)
        assert ops.read_address(tmp_path / "run", "toy") is None  # removed on a clean stop
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _alive(port: int) -> bool:
    try:
        return _get(f"http://127.0.0.1:{port}/health/live")[0] == 200
    except OSError:
        return False


def _health_while_stopping(port: int) -> str | None:
    try:
        status, body = _get(f"http://127.0.0.1:{port}/health")
    except OSError:
        return "closed-before-seen"
    doc = json.loads(body)
    return doc["status"] if doc["status"] == "stopping" and status == 503 else None
