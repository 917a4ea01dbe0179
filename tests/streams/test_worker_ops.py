"""The worker's operations surface end to end: a real worker process on the real broker, its
``/metrics`` and ``/health`` read over HTTP while it runs, its stop on SIGTERM, and its log lines
(one JSON object per line with ``BACKBEAT_LOG_FORMAT=json``)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from events.producer import EventProducer
from infra import ops
from infra.processes import free_port
from infra.settings import REPO_ROOT, Settings
from streams.config import IngestConfig
from streams.runtime.agent import BatchAgent, Result
from streams.runtime.runner import AgentRunner, PartitionState, RunnerConfig
from tests.conftest import settings_for, wait_for
from tests.ops_client import Samples, get, matching, scrape
from tests.streams.workers import Worker, ingest_setup

T0 = 1_700_000_000_000
COMPONENT = "agent:listening-ingest"


def listen(user: str, t: int, eid: str, **extra: object) -> dict:
    record = {"event_id": eid, "user_id": user, "track_id": f"track-{eid}", "artist_id": "a1",
              "occurred_at": t, "source": "tests", "ms_played": 1000}  # fmt: skip
    record.update(extra)
    return record


def send(settings: Settings, config: IngestConfig, records: list[dict], raw: list[bytes] = ()) -> None:
    producer = EventProducer(settings)
    producer.send_many(config.source_topic, "ListenRecorded", records, key_field="user_id",
                       time_field="occurred_at", source="/tests")  # fmt: skip
    if raw:
        producer.produce_raw(config.source_topic, list(raw), [b"bad"] * len(raw))
    producer.flush()


def samples(metrics: Samples, name: str, **labels: str) -> dict[tuple, float]:
    """The samples of ``name`` whose labels include ``labels``."""
    return matching(metrics, name, **labels)


def value(metrics: Samples, name: str, **labels: str) -> float | None:
    found = samples(metrics, name, **labels)
    assert len(found) <= 1, found
    return next(iter(found.values()), None)


@pytest.mark.integration
def test_metrics_and_health_of_a_running_worker(
    stack: Settings, unique: Callable[[str], str], tmp_path: Path
):
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    config, env = ingest_setup(stack, unique("ops"), BACKBEAT_OPS_PORT=str(port))
    users = [f"u{i}" for i in range(7)]
    first = [listen(u, T0 + i * 1000, f"{u}-{i}") for i in range(4) for u in users]
    bad = listen("bad", T0, "bad-1", ms_played=-1)  # a validation error
    send(stack, config, [*first, bad], raw=[b"not avro"])  # and a decode error
    worker = Worker(env, tmp_path / "worker.log")
    worker.start()
    try:
        # the ops server starts before the agents: the first answer is "starting"
        status, body = wait_for(lambda: get(f"{base}/health") or worker.check(), 60, "the ops port")
        assert status == 503, body
        assert json.loads(body)["status"] == "starting"
        live = get(f"{base}/health/live")
        assert live is not None and live[0] == 200

        status, body = wait_for(lambda: (a := get(f"{base}/health")) and a[0] == 200 and a, 90, "ready")
        health = json.loads(body)
        assert health["status"] == "ready" and health["process"] == "worker"
        assert health["components"][COMPONENT]["ready"] is True
        assert health["components"][COMPONENT]["assigned"] == list(range(6))
        assert ops.read_address(stack.run_dir, "worker") == base

        produced = len(first) + 2
        m = wait_for(
            lambda: (m := scrape(base)) and value(m, "backbeat_records_in_total", component=COMPONENT) == produced
            and m, 30, "records in",
        )  # fmt: skip
        assert (
            value(m, "backbeat_records_in_total", component=COMPONENT, topic=config.source_topic) == produced
        )
        assert value(m, "backbeat_dead_letters_total", component=COMPONENT, reason="decode_error") == 1
        assert value(m, "backbeat_dead_letters_total", component=COMPONENT, reason="validation_error") == 1
        assert value(m, "backbeat_records_out_total", component=COMPONENT, topic=config.dlq_topic) == 2
        assert value(m, "backbeat_ready", component=COMPONENT) == 1
        assert value(m, "backbeat_up", process="worker") == 1
        assert value(m, "backbeat_state_entries", component=COMPONENT) == len(users)
        assert value(m, "backbeat_batch_duration_seconds_count", component=COMPONENT) >= 1
        positions = samples(m, "backbeat_consumer_position", component=COMPONENT)
        assert len(positions) == 6 and sum(positions.values()) == produced
        lags = wait_for(
            lambda: (lag := samples(scrape(base), "backbeat_consumer_lag", component=COMPONENT))
            and len(lag) == 6 and all(v == 0 for v in lag.values()) and lag, 30, "lag 0",
        )  # fmt: skip
        assert set(lags.values()) == {0}

        # more records while it runs: counted, and the lag returns to 0
        more = [listen(u, T0 + 60_000 + i, f"{u}-m{i}") for i in range(3) for u in users]
        send(stack, config, more)
        m = wait_for(
            lambda: (m := scrape(base))
            and value(m, "backbeat_records_in_total", component=COMPONENT) == produced + len(more)
            and all(v == 0 for v in samples(m, "backbeat_consumer_lag", component=COMPONENT).values())
            and m, 30, "the second batch",
        )  # fmt: skip
        assert value(m, "backbeat_dead_letters_total", component=COMPONENT, reason="decode_error") == 1

        # SIGTERM: /health never says ready again, then the port closes and the exit status is 0
        assert worker.proc is not None
        proc = worker.proc
        proc.send_signal(signal.SIGTERM)
        seen: list[object] = []

        def stopped() -> bool:
            answer = get(f"{base}/health")
            seen.append(answer and (answer[0], json.loads(answer[1])["status"]))
            return answer is None and proc.poll() is not None

        wait_for(stopped, 60, "the worker to stop")
        assert proc.returncode == 0, worker.log.read_text(errors="replace")[-3000:]
        after = seen[next((i for i, s in enumerate(seen) if s != (200, "ready")), len(seen)) :]
        assert after and all(s in (None, (503, "stopping")) for s in after), seen
        assert ops.read_address(stack.run_dir, "worker") is None  # the address file is removed
    finally:
        worker.kill()


@pytest.mark.integration
def test_json_log_lines_of_backbeat_worker(stack: Settings, unique: Callable[[str], str], tmp_path: Path):
    """``backbeat worker --ops-port`` with ``BACKBEAT_LOG_FORMAT=json``: every stderr line is a JSON
    object of process ``worker`` (Faust's and mode's lines included), and the dead-letter line
    names the record's topic, partition and offset."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    config, env = ingest_setup(stack, unique("ops-json"), BACKBEAT_LOG_FORMAT="json")
    env.pop("BACKBEAT_OPS_PORT", None)
    send(stack, config, [listen("u1", T0, "j1")], raw=[b"not avro"])
    stderr_path = tmp_path / "stderr.log"
    with stderr_path.open("wb") as err, (tmp_path / "stdout.log").open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "infra.cli", "worker", "--ops-port", str(port)],
            cwd=REPO_ROOT, env=env, stdout=out, stderr=err,
        )  # fmt: skip
    try:

        def dead_lettered() -> bool:
            assert proc.poll() is None, stderr_path.read_text(errors="replace")[-3000:]
            answer = get(f"{base}/health")
            return bool(answer and answer[0] == 200) and "dead-lettered" in stderr_path.read_text()

        wait_for(dead_lettered, 90, "ready and a dead letter")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0, stderr_path.read_text(errors="replace")[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)

    lines = [ln for ln in stderr_path.read_text().splitlines() if ln.strip()]
    assert len(lines) > 5
    parsed = []
    for line in lines:
        obj = json.loads(line)  # fails on any line that is not JSON
        assert isinstance(obj, dict) and obj["process"] == "worker", line
        assert {"timestamp", "level", "logger", "event"} <= set(obj), line
        parsed.append(obj)
    loggers = {o["logger"] for o in parsed}
    assert any(name.startswith(("faust", "mode")) for name in loggers), loggers
    dead = [o for o in parsed if "dead-lettered" in o["event"]]
    assert len(dead) == 1, dead
    assert dead[0]["topic"] == config.source_topic and dead[0]["agent"] == "listening-ingest"
    assert dead[0]["partition"] in range(6) and dead[0]["offset"] >= 0 and dead[0]["level"] == "warning"
    assert any(f"/metrics and /health on {base}" in o["event"] for o in parsed)
    stats = [o for o in parsed if o["event"].startswith("ingest stats ")]
    assert stats and json.loads(stats[-1]["event"][len("ingest stats ") :])["records_in"] == 2


class _Agent(BatchAgent):
    """The smallest agent: what :meth:`AgentRunner.observe` reads, nothing consumed."""

    name = "observed"
    stats_name = "observed"
    decodes = False

    def __init__(self) -> None:
        self.partitions: dict[int, dict[str, int]] = {}

    source_topic = "observed.source"  # type: ignore[assignment]
    changelog_topic = "observed.changelog"  # type: ignore[assignment]
    output_topics = ("observed.out",)  # type: ignore[assignment]

    def restore(self, partition, items):  # noqa: ANN001, ANN201
        self.partitions[partition] = {}

    def process(self, batch, now_ms):  # noqa: ANN001, ANN201
        return Result()

    def checkpoint(self, partition, offset):  # noqa: ANN001, ANN201
        return []

    def revoke(self, partition):  # noqa: ANN001, ANN201
        self.partitions.pop(partition, None)

    def state_entries(self) -> int:
        return sum(len(s) for s in list(self.partitions.values()))


def test_observe_reads_while_the_loop_thread_changes_its_dicts(tmp_path: Path):
    """``observe()`` runs on the ops server's thread while the runner's thread assigns and
    revokes partitions and adds counters: no "changed size during iteration", and every
    observation is one the loop could have been in (counts only grow while a partition stays)."""
    settings = settings_for(tmp_path, free_port(), free_port())
    runner = AgentRunner(_Agent(), settings, RunnerConfig(group_id="observed"))
    stop = threading.Event()
    errors: list[BaseException] = []

    def loop() -> None:  # what _on_assign/_batch/_on_revoke do to the runner's dicts
        i = 0
        while not stop.is_set():
            i += 1
            for p in range(8):
                state = runner.assigned.get(p)
                if state is None:
                    runner.assigned[p] = state = PartitionState(None, {}, {})
                    runner.agent.partitions[p] = {}
                state.counters["records_in"] = state.counters.get("records_in", 0) + 1
                state.counters[f"new-{i % 50}"] = 1  # keys come and go
                state.counters.pop(f"new-{(i + 25) % 50}", None)
                state.next = (state.next or 0) + 1
                runner.agent.partitions[p][f"k{i % 100}"] = i
            if i % 7 == 0:
                for p in range(0, 8, 2):
                    runner.assigned.pop(p, None)
                    runner.agent.revoke(p)

    thread = threading.Thread(target=loop)
    thread.start()
    observed = 0
    try:
        deadline = time.monotonic() + 1.5
        while time.monotonic() < deadline:
            try:
                o = runner.observe()
            except BaseException as exc:  # noqa: BLE001 - the failure this test looks for
                errors.append(exc)
                break
            assert set(o.positions) <= {("observed.source", p) for p in range(8)}
            assert o.records_in["observed.source"] >= 0 and o.dead_letters == {}
            assert o.state_entries is not None and o.state_entries <= 8 * 100
            assert o.detail["assigned"] == sorted(p for _, p in o.positions)
            observed += 1
    finally:
        stop.set()
        thread.join()
    assert not errors, errors
    assert observed > 100
