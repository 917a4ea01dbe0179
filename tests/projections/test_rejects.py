"""Rejects over a real broker, registry and DuckDB: a runner is not poisoned by a schema id that
is registered after it saw it (defect 6), listens the agents dead-letter are rejected by the read
model too (defect 4), and `backbeat projections rejects reapply` applies rejects once their cause
is gone, once."""

from __future__ import annotations

import dataclasses
import json
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from typer.testing import CliRunner

from events.catalog import TopicSpec
from events.producer import EventProducer
from events.registry_client import Registry, registry_for
from events.schemas import get_schema, subject_for
from events.serde import AvroEncoder, plain_times
from infra.cli import app
from infra.errors import TransientError
from infra.provision import apply_topics
from infra.settings import REPO_ROOT, Settings
from projections.readmodels import LISTENS
from projections.rejects import list_rejects
from projections.runner import ProjectionRunner
from tests.conftest import env_for, wait_for
from tests.projections.test_readmodels import listen
from tests.projections.test_runner import _runner_cmd, lake_count, rows, run_listens, send

pytestmark = pytest.mark.integration

LISTEN = "backbeat.playback.ListenRecorded"
DAY_MS = 24 * 3600 * 1000


@pytest.fixture
def settings(stack: Settings, tmp_path: Path) -> Settings:
    return dataclasses.replace(stack, data_dir=tmp_path)


def cli(settings: Settings, *args: str) -> str:
    result = CliRunner().invoke(app, list(args), env=settings.to_env())
    assert result.exit_code == 0, (result.output, result.exception)
    return result.stdout


def variant(field: str) -> str:
    """ListenRecorded with one more optional field: a schema text the registry has not seen."""
    schema = json.loads(get_schema("ListenRecorded").schema_str)
    schema["fields"].append({"name": field, "type": ["null", "string"], "default": None})
    return json.dumps(schema)


def next_schema_id(registry: Registry, topic: str, field: str) -> int:
    """The id the registry gives the next new schema: it numbers them max + 1, so registering a
    throw-away one tells it."""
    return registry.register_text(subject_for(topic, LISTEN), variant(field)) + 1


def frame_with(schema_text: str, schema_id: int) -> AvroEncoder:
    import fastavro

    return AvroEncoder(fastavro.parse_schema(plain_times(json.loads(schema_text))), schema_id)


def _count(settings: Settings) -> int:
    try:
        return rows(settings, "SELECT count(*) FROM listens")[0][0]
    except Exception:  # noqa: BLE001 - no table yet
        return -1


def produce(settings: Settings, topic: str, values: list[bytes], users: list[str]) -> None:
    producer = EventProducer(settings)
    producer.produce_raw(topic, values, [u.encode() for u in users])
    producer.flush()


def test_a_running_runner_applies_records_of_a_schema_registered_after_it_saw_the_id(
    settings: Settings, unique: Callable[[str], str]
):
    """Defect 6: "schema id N is not in the registry" was cached for the life of the runner, so
    every later valid record with that id was rejected. Now the runner keeps running, the schema
    gets registered, and the next records with that id are applied; the early ones stay rejects
    until re-applied (and then once)."""
    topic = unique("rej.listens")
    apply_topics(settings, [TopicSpec(topic, 1)])
    registry = registry_for(settings.registry_url)
    schema_id = next_schema_id(registry, topic, unique("a").replace("-", "_"))
    text = variant(unique("b").replace("-", "_"))
    enc = frame_with(text, schema_id)
    early = [listen(i, user_id="u1") for i in range(5)]
    produce(settings, topic, [enc.encode(e) for e in early], ["u1"] * 5)

    runner = subprocess.Popen(  # forever mode, as 'backbeat project' runs
        _runner_cmd(topic), cwd=REPO_ROOT, env=env_for(settings), stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        wait_for(lambda: len(list_rejects(settings, "listens")) == 5, 60, "5 rejects")
        assert {r.reason for r in list_rejects(settings, "listens")} == {
            f"schema id {schema_id} is not in the registry"
        }
        assert registry.register_text(subject_for(topic, LISTEN), text) == schema_id
        later = [listen(i, user_id="u1") for i in range(5, 12)]
        produce(settings, topic, [enc.encode(e) for e in later], ["u1"] * 7)
        wait_for(lambda: _count(settings) == 7, 60, "7 listens applied by the same runner")
        assert runner.poll() is None  # still the runner that saw the unknown id
        runner.send_signal(signal.SIGTERM)
        _out, err = runner.communicate(timeout=30)
    finally:
        if runner.poll() is None:
            runner.kill()
            runner.communicate()
    assert runner.returncode == 0, err
    assert rows(settings, "SELECT event_id FROM listens ORDER BY kafka_offset") == [
        (f"e{i}",) for i in range(5, 12)
    ]
    assert len(list_rejects(settings, "listens")) == 5  # the early ones: their cause is gone now

    out = json.loads(cli(settings, "projections", "rejects", "reapply", "listens", "--json"))
    assert (out["rejects"], out["applied"], out["cleared"], out["kept"], out["missing"]) == (5, 5, 5, 0, 0)
    assert rows(settings, "SELECT count(*), count(DISTINCT event_id) FROM listens") == [(12, 12)]
    assert lake_count(settings) == 12
    assert list_rejects(settings, "listens") == []
    again = json.loads(cli(settings, "projections", "rejects", "reapply", "listens", "--json"))
    assert (again["rejects"], again["applied"]) == (0, 0)
    assert lake_count(settings) == 12


def test_listens_the_agent_dead_letters_are_rejected_by_the_read_model(
    settings: Settings, unique: Callable[[str], str]
):
    """Defect 4: blank ids, negative ms_played and times more than a day ahead never reach the
    listens read model nor the lake; they are rejects with the validator's reason."""
    topic = unique("rej.listens")
    apply_topics(settings, [TopicSpec(topic, 3)])
    now = int(time.time() * 1000)
    good = [listen(i) for i in range(20)]
    bad = [
        listen(100, user_id=" "),
        listen(101, track_id=""),
        listen(102, ms_played=-1),
        listen(103, occurred_at=now + 2 * DAY_MS),
    ]
    send(settings, topic, "ListenRecorded", good + bad, "event_id", "occurred_at")
    stats = run_listens(settings, topic)
    assert stats.records == 24 and stats.applied == 20 and stats.rejects == 4
    assert rows(
        settings, "SELECT count(*) FROM listens WHERE event_id IN ('e100', 'e101', 'e102', 'e103')"
    ) == [(0,)]
    assert rows(settings, "SELECT count(*) FROM listens")[0][0] == 20
    assert lake_count(settings) == 20
    reasons = sorted(r.reason for r in list_rejects(settings, "listens"))
    assert reasons == sorted(
        [
            "invalid: user_id is empty",
            "invalid: track_id is empty",
            "invalid: ms_played=-1 is negative",
            f"invalid: occurred_at={now + 2 * DAY_MS} is more than a day in the future",
        ]
    )
    # still invalid: re-applying keeps them rejected, with the reason, and applies nothing
    out = json.loads(cli(settings, "projections", "rejects", "reapply", "listens", "--json"))
    assert (out["rejects"], out["applied"], out["kept"], out["cleared"]) == (4, 0, 4, 0)
    assert len(list_rejects(settings, "listens")) == 4
    listed = json.loads(cli(settings, "projections", "rejects", "list", "listens", "--json"))
    assert listed["rejects"] == 4 and sum(r["count"] for r in listed["reasons"]) == 4
    assert {f["offset"] for f in listed["first"]} == {r.offset for r in list_rejects(settings, "listens")}


def test_an_unreachable_registry_is_waited_out_never_rejected(
    settings: Settings, unique: Callable[[str], str]
):
    """Errors by kind: while the registry cannot be reached the runner waits (backoff, counted in
    `waits`) and then applies the batch; nothing lands in projection_rejects."""
    topic = unique("rej.listens")
    apply_topics(settings, [TopicSpec(topic, 2)])
    send(settings, topic, "ListenRecorded", [listen(i) for i in range(30)], "event_id", "occurred_at")
    registry = registry_for(settings.registry_url)
    failures = [3]

    def flaky(schema_id: int) -> dict:
        if failures[0] > 0:
            failures[0] -= 1
            raise TransientError(f"registry unreachable (schema id {schema_id})")
        return registry.parsed_schema_by_id(schema_id)

    stats = ProjectionRunner(settings, [LISTENS.on_topic(topic)], lookup=flaky).run(until_caught_up=True)
    assert failures == [0] and stats.waits == 3
    assert (stats.records, stats.applied, stats.rejects) == (30, 30, 0)
    assert list_rejects(settings, "listens") == []
