"""The CLI as a user types it, against the shared real broker: import with rejects, sql errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.conftest import env_for

HEADER = "UserId\tSessionId\tItemId\tTime\tArtistId\tsplit\n"


def _backbeat(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "infra.cli", *args], env=env | {"COLUMNS": "200"},
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip


def test_import_reports_rejected_rows_and_duplicates(stack, tmp_path: Path):
    env = env_for(stack)
    assert _backbeat(["topics", "apply"], env).returncode == 0
    tsv = tmp_path / "listens.tsv"
    tsv.write_text(
        HEADER
        + "1\t10\t100\t1397982525\t7\tt\n"
        + "1\t10\t100\t1397982525\t7\tt\n"  # exact duplicate
        + "2\t11\t101\tnot-a-time\t8\tt\n"
        + "3\t12\t102\t1397982600\n"
    )
    result = _backbeat(["import", "listens", str(tsv), "--format", "30music"], env)
    assert result.returncode == 0, result.stderr
    assert "4 rows read, 1 events produced, 1 duplicate rows collapsed" in result.stdout
    assert "2 rejected" in result.stdout
    assert "line 4: Time is not unix seconds" in result.stderr
    assert "line 5: expected 6 tab-separated columns, got 4" in result.stderr


def test_wrong_format_is_a_clear_error(stack, tmp_path: Path):
    tsv = tmp_path / "lastfm.tsv"
    tsv.write_text("user_1\t2009-05-04T13:54:10Z\ta\tb\tc\td\n")
    result = _backbeat(["import", "listens", str(tsv)], env_for(stack))
    assert result.returncode == 1
    assert "not a 30Music file" in result.stderr and "Traceback" not in result.stderr


def test_sql_before_any_projection_says_what_to_do(stack, tmp_path: Path):
    env = env_for(stack) | {"BACKBEAT_DATA_DIR": str(tmp_path)}
    result = _backbeat(["sql", "SELECT 1"], env)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "error:" in result.stderr


def test_unreachable_broker_is_a_clear_error(tmp_path: Path):
    import os

    from infra.processes import free_port

    env = dict(os.environ) | {
        "BACKBEAT_BOOTSTRAP_SERVERS": f"127.0.0.1:{free_port()}",
        "BACKBEAT_DATA_DIR": str(tmp_path),
    }
    result = _backbeat(["topics", "apply"], env)
    assert result.returncode == 1
    assert "cannot reach Kafka" in result.stderr and "backbeat up" in result.stderr


def test_backbeat_worker_starts_the_agent_and_stops_on_sigterm(stack, tmp_path: Path):
    import signal

    from tests.conftest import wait_for

    log_path = tmp_path / "worker.log"
    env = env_for(stack) | {"BACKBEAT_INGEST_APP_ID": "cli-worker-test"}
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "infra.cli", "worker", "-l", "info"], env=env, stdout=log, stderr=subprocess.STDOUT
        )
        try:
            wait_for(
                lambda: "listening-ingest: caught up" in log_path.read_text(errors="replace")
                or proc.poll() is not None,
                timeout_s=90, what="the listening-ingest agent to be assigned and caught up",
            )  # fmt: skip
            assert proc.poll() is None, log_path.read_text()[-2000:]
            text = log_path.read_text()
            for agent in ("listening-ingest", "user-features", "track-features", "ad-reporting"):
                assert f"{agent}: consuming" in text, agent
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(60) == 0, log_path.read_text()[-2000:]  # a clean stop
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert "6066" not in log_path.read_text()  # backbeat worker runs no web server


def test_produce_and_consume_as_a_user_types_them(stack, unique, tmp_path: Path):
    import json

    from events.catalog import TopicSpec
    from infra.provision import apply_topics

    topic = unique("cli.listens")
    apply_topics(stack, [TopicSpec(topic, 2, event_types=("backbeat.playback.ListenRecorded",))])
    env = env_for(stack)
    common = ["--event-type", "ListenRecorded", "--key-field", "user_id"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"event_id": "e0"\n{"event_id": "e1", "user_id": 7, "track_id": "t", "artist_id": "a", "occurred_at": 1, "source": "cli"}\n')
    result = _backbeat(["produce", topic, "--file", str(bad), *common], env)
    assert result.returncode == 1
    assert "line 1: not JSON" in result.stderr and "line 2: user_id" in result.stderr
    assert "nothing was sent" in result.stderr
    good = '{"event_id": "e2", "user_id": "u2", "track_id": "t", "artist_id": "a", "occurred_at": "2014-04-20T08:28:45Z", "source": "cli"}\n'
    result = subprocess.run(
        [sys.executable, "-m", "infra.cli", "produce", topic, *common], input=good, env=env,
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    result = _backbeat(["consume", topic], env)
    assert result.returncode == 0, result.stderr
    [line] = result.stdout.splitlines()  # the bad file sent nothing
    record = json.loads(line)
    assert record["key"] == "u2" and record["value"]["occurred_at"] == 1_397_982_525_000
    assert record["headers"]["ce_type"] == "backbeat.playback.ListenRecorded"
