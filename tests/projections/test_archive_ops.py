"""The archiver as an operated process: ``python -m projections.archive`` under the one lifecycle,
with ``/health`` and ``/metrics`` read over real HTTP, a real broker and real SIGTERM.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from events.catalog import TopicSpec
from events.offsets import high_watermarks
from infra.ops import read_address
from infra.processes import free_port
from infra.provision import apply_topics
from infra.settings import REPO_ROOT, Settings
from projections.archive import ArchiveLock, archive_files, archived_positions
from tests.conftest import env_for, wait_for
from tests.projections.test_readmodels import listen
from tests.projections.test_runner_ops import health, lags, sample, scrape, send, stop_process

pytestmark = pytest.mark.integration


@pytest.fixture
def settings(stack: Settings, tmp_path: Path) -> Settings:
    return dataclasses.replace(stack, data_dir=tmp_path)


def archiver(settings: Settings, topic: str, port: int, env: dict | None = None) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "projections.archive", "--topic", topic, "--chunk-records", "1000",
           "--max-delay-s", "0.2"]  # fmt: skip
    return subprocess.Popen(
        cmd, cwd=REPO_ROOT, env={**env_for(settings), "BACKBEAT_OPS_PORT": str(port), **(env or {})},
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def files(settings: Settings, topic: str) -> int:
    return sum(len(fs) for fs in archive_files(settings, topic).values())


def test_archiver_health_metrics_and_sigterm(settings: Settings, unique: Callable[[str], str]):
    topic = unique("ops.archive")
    apply_topics(settings, [TopicSpec(topic, 2)])
    send(settings, topic, [listen(i) for i in range(5_000)])
    produced = 5_000

    lock = ArchiveLock(settings)  # another archiver holds the archive: this one waits, "starting"
    assert lock.acquire()
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    proc = archiver(settings, topic, port)
    try:
        starting = wait_for(lambda: health(base), 30, "/health to answer")
        assert starting[0] == 503, starting
        assert starting[1]["status"] == "starting"
        assert starting[1]["components"]["archiver"] == {"ready": False, "waiting_for_lock": True}
        assert read_address(settings.run_dir, "archiver") == base
        lock.release()

        ready = wait_for(lambda: (h := health(base)) and h[0] == 200 and h, 60, "/health 200")
        detail = ready[1]["components"]["archiver"]
        assert detail["ready"] is True and detail["topics"] == 1 and detail["refused"] == []
        assert sum(archived_positions(settings, topic).values()) == produced  # ready = archived

        send(settings, topic, [listen(i) for i in range(5_000, 5_700)])
        produced += 700

        def settled() -> dict | None:
            s = scrape(base)
            out = sample(s, "backbeat_records_out_total", component="archiver", topic=topic)
            lag = lags(s, "archiver", topic)
            return s if out == produced and len(lag) == 2 and set(lag.values()) == {0} else None

        m = wait_for(settled, 60, f"records_out {produced} and lag 0")
        assert sample(m, "backbeat_records_in_total", component="archiver", topic=topic) == produced
        assert sample(m, "backbeat_ready", component="archiver") == 1
        assert sample(m, "backbeat_up", process="archiver") == 1
        marks = high_watermarks(settings, topic)
        for p, hwm in marks.items():
            assert (
                sample(m, "backbeat_consumer_position", component="archiver", topic=topic, partition=str(p))
                == hwm
            )
        written = files(settings, topic)
        assert health(base)[1]["components"]["archiver"]["files"] == written
        assert sample(m, "backbeat_batch_duration_seconds_count", component="archiver") == written

        out, err = stop_process(proc)
    finally:
        lock.release()
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err
    assert "archiver stopped: 5700 records" in err
    assert archived_positions(settings, topic) == marks  # nothing lost
    assert read_address(settings.run_dir, "archiver") is None


def test_archiver_json_logs(settings: Settings, unique: Callable[[str], str]):
    topic = unique("ops.archive.json")
    apply_topics(settings, [TopicSpec(topic, 1)])
    send(settings, topic, [listen(i) for i in range(50)])
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    proc = archiver(settings, topic, port, env={"BACKBEAT_LOG_FORMAT": "json"})
    try:
        wait_for(lambda: (h := health(base)) and h[0] == 200, 60, "/health 200")
        _out, err = stop_process(proc)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err
    parsed = [json.loads(line) for line in err.splitlines() if line.strip()]  # every line is JSON
    assert parsed and all(p.get("process") == "archiver" for p in parsed)
    archiving = [p for p in parsed if p["event"].startswith("archiving ")]
    assert [p["topic"] for p in archiving] == [topic]
