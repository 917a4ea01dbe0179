"""The projection runner as an operated process: ``python -m projections.runner`` under the one
lifecycle, with ``/health`` and ``/metrics`` read over real HTTP, a real broker and real
SIGTERM. Each test has its own data dir and topic on the shared broker.
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from events.catalog import TopicSpec
from events.offsets import high_watermarks
from events.producer import EventProducer
from infra.ops import read_address
from infra.processes import free_port
from infra.provision import apply_topics
from infra.settings import REPO_ROOT, Settings
from projections.sql import query
from projections.store import turnstile_path
from tests.conftest import env_for, wait_for
from tests.ops_client import Samples, health, matching, scrape, value
from tests.projections.test_readmodels import listen

pytestmark = pytest.mark.integration

COMPONENT = "projection:listens"


@pytest.fixture
def settings(stack: Settings, tmp_path: Path) -> Settings:
    return dataclasses.replace(stack, data_dir=tmp_path)


# -- helpers (also used by test_archive_ops) ---------------------------------------------------
def sample(samples: Samples, name: str, **labels: str) -> float | None:
    return value(samples, name, **labels)


def lags(samples: Samples, component: str, topic: str) -> dict[str, float]:
    """``{partition: backbeat_consumer_lag}`` of ``component`` on ``topic``."""
    found = matching(samples, "backbeat_consumer_lag", component=component, topic=topic)
    return {dict(labels)["partition"]: v for labels, v in found.items()}


def stop_process(proc: subprocess.Popen, timeout_s: float = 60) -> tuple[str, str]:
    """SIGTERM, then the process's stdout and stderr (killed if it does not stop in time)."""
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        raise AssertionError(f"did not stop within {timeout_s} s on SIGTERM:\n{err}") from None


# -- the runner --------------------------------------------------------------------------------
def send(settings: Settings, topic: str, records: list[dict]) -> None:
    producer = EventProducer(settings)
    producer.send_many(topic, "ListenRecorded", records, key_field="user_id", time_field="occurred_at",
                       source="/tests")  # fmt: skip
    producer.flush()


def runner(
    settings: Settings, topic: str, port: int, *extra: str, env: dict | None = None
) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "projections.runner", "--projection", "listens", f"--topic=listens={topic}",
           *extra]  # fmt: skip
    return subprocess.Popen(
        cmd, cwd=REPO_ROOT, env={**env_for(settings), "BACKBEAT_OPS_PORT": str(port), **(env or {})},
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def listens_rows(settings: Settings) -> int:
    return query(settings, "SELECT count(*) FROM listens").rows[0][0]


def test_runner_health_metrics_and_sigterm(settings: Settings, unique: Callable[[str], str]):
    topic = unique("ops.listens")
    apply_topics(settings, [TopicSpec(topic, 3)])
    first = [listen(i, user_id=f"u{i % 50}") for i in range(20_000)]
    send(settings, topic, first)
    producer = EventProducer(settings)  # two records that are not Avro: rejected as decode errors
    producer.produce_raw(topic, [b"not avro", b"\x00garbage"], [b"u1", b"u2"])
    producer.flush()
    produced = len(first) + 2

    # a query holding the database keeps the runner at its start: /health must say "starting"
    turnstile = turnstile_path(settings.duckdb_path)
    turnstile.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(turnstile, os.O_RDWR | os.O_CREAT, 0o644)
    fcntl.flock(fd, fcntl.LOCK_SH)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    proc = runner(settings, topic, port, "--batch-size", "2000")
    try:
        starting = wait_for(lambda: health(base), 30, "/health to answer")
        assert starting[0] == 503, starting
        assert starting[1]["status"] == "starting"
        assert starting[1]["components"][COMPONENT]["ready"] is False
        assert read_address(settings.run_dir, "projection-runner") == base
        os.close(fd)  # the query ends: the runner starts and catches up

        ready = wait_for(lambda: (h := health(base)) and h[0] == 200 and h, 90, "/health 200")
        assert ready[1]["status"] == "ready"
        assert ready[1]["process"] == "projection-runner"
        assert ready[1]["components"][COMPONENT]["ready"] is True
        m = scrape(base)
        assert sample(m, "backbeat_records_in_total", component=COMPONENT, topic=topic) == produced
        assert sample(m, "backbeat_ready", component=COMPONENT) == 1
        assert sample(m, "backbeat_up", process="projection-runner") == 1

        # more records while it runs: counted in, applied, lag back to 0
        more = [listen(i, user_id=f"u{i % 50}") for i in range(20_000, 20_500)]
        send(settings, topic, more)
        produced += len(more)

        def settled() -> dict | None:
            s = scrape(base)
            got = sample(s, "backbeat_records_in_total", component=COMPONENT, topic=topic)
            lag = lags(s, COMPONENT, topic)
            return s if got == produced and len(lag) == 3 and set(lag.values()) == {0} else None

        m = wait_for(settled, 60, f"records_in {produced} and lag 0")
        applied = len(first) + len(more)
        assert sample(m, "backbeat_records_out_total", component=COMPONENT, topic="listens") == applied
        assert sample(m, "backbeat_dead_letters_total", component=COMPONENT, reason="decode_error") == 2
        assert sample(m, "backbeat_retries_total", component=COMPONENT) == 0
        marks = high_watermarks(settings, topic)
        for p, hwm in marks.items():
            assert (
                sample(m, "backbeat_consumer_position", component=COMPONENT, topic=topic, partition=str(p))
                == hwm
            )
        assert sample(m, "backbeat_batch_duration_seconds_count", component=COMPONENT) >= 10
        assert proc.poll() is None  # forever mode keeps running when caught up

        out, err = stop_process(proc)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err
    stats = json.loads(out.strip().splitlines()[-1])
    assert stats["applied"] == applied and stats["rejects"] == 2 and stats["records"] == produced
    assert listens_rows(settings) == applied  # nothing lost
    assert read_address(settings.run_dir, "projection-runner") is None  # its address file removed


def test_runner_json_logs_and_until_caught_up(settings: Settings, unique: Callable[[str], str]):
    topic = unique("ops.json")
    apply_topics(settings, [TopicSpec(topic, 2)])
    send(settings, topic, [listen(i) for i in range(300)])
    producer = EventProducer(settings)
    producer.produce_raw(topic, [b"not avro"], [b"u1"])
    producer.flush()
    proc = runner(settings, topic, 0, "--until-caught-up", env={"BACKBEAT_LOG_FORMAT": "json"})
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert json.loads(out.strip().splitlines()[-1])["applied"] == 300
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines
    parsed = [json.loads(line) for line in lines]  # every stderr line is a JSON object
    assert all(p.get("process") == "projection-runner" for p in parsed)
    rejected = [p for p in parsed if "rejected" in p["event"]]
    assert len(rejected) == 1
    assert rejected[0]["projection"] == "listens" and rejected[0]["topic"] == topic
    assert isinstance(rejected[0]["partition"], int) and isinstance(rejected[0]["offset"], int)
    assert any(p["event"].endswith("caught up with the log's end at start") for p in parsed)


def test_runner_ops_port_off_and_bad_arguments(settings: Settings, unique: Callable[[str], str]):
    topic = unique("ops.off")
    apply_topics(settings, [TopicSpec(topic, 1)])
    send(settings, topic, [listen(i) for i in range(10)])
    cmd = [sys.executable, "-m", "projections.runner", "--projection", "listens", f"--topic=listens={topic}",
           "--until-caught-up", "--ops-port", "off"]  # fmt: skip
    done = subprocess.run(
        cmd, cwd=REPO_ROOT, env=env_for(settings), capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.strip().splitlines()[-1])["applied"] == 10
    assert "/metrics and /health on" not in done.stderr  # no endpoint
    assert read_address(settings.run_dir, "projection-runner") is None

    bad = subprocess.run([*cmd[:-2], "--ops-port", "http"], cwd=REPO_ROOT, env=env_for(settings),
                         capture_output=True, text=True, timeout=60)  # fmt: skip
    assert bad.returncode == 1 and "ops port 'http'" in bad.stderr
    bad = subprocess.run([*cmd[:3], "--topic", "listens"], cwd=REPO_ROOT, env=env_for(settings),
                         capture_output=True, text=True, timeout=60)  # fmt: skip
    assert bad.returncode == 2 and "NAME=TOPIC" in bad.stderr


def test_runner_error_exits_1_with_the_message(settings: Settings, unique: Callable[[str], str]):
    missing = unique("ops.missing")
    cmd = [sys.executable, "-m", "projections.runner", "--projection", "listens", f"--topic=listens={missing}",
           "--until-caught-up", "--ops-port", "0"]  # fmt: skip
    done = subprocess.run(
        cmd, cwd=REPO_ROOT, env=env_for(settings), capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 1, done.stderr
    assert missing in done.stderr and "projection-runner" in done.stderr
    assert done.stdout.strip() == ""  # no stats line for a failed run
