"""`backbeat dlq list` and `backbeat dlq redrive` against the real broker: reason counts, records
put back where they came from without their dlq_* headers, and each one once, also after a
crash mid-way or with the state file lost."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path

import pytest
from typer.testing import CliRunner

from events import dead_letters
from events.catalog import TopicSpec
from events.dead_letters import REDRIVE_HEADER, RedriveState, redrive
from events.log import read_to_end
from events.offsets import high_watermarks
from events.producer import EventProducer
from infra.cli import app
from infra.provision import apply_topics
from infra.settings import Settings

pytestmark = pytest.mark.integration


@pytest.fixture
def settings(stack: Settings, tmp_path: Path) -> Settings:
    return dataclasses.replace(stack, data_dir=tmp_path)


def cli(settings: Settings, *args: str) -> dict:
    result = CliRunner().invoke(app, [*args, "--json"], env=settings.to_env())
    assert result.exit_code == 0, (result.output, result.exception)
    return json.loads(result.stdout)


def dead(key: str, value: bytes | None, reason: str | None, origin: tuple[str, int, int] | None, ts: int):
    headers = [("ce_id", key.encode()), ("ce_type", b"backbeat.playback.ListenRecorded")]
    if reason is not None:
        headers += [("dlq_reason", reason.encode()), ("dlq_error", f"{reason} of {key}".encode())]
    if origin is not None:
        topic, part, off = origin
        headers += [("dlq_topic", topic.encode()), ("dlq_partition", str(part).encode()),
                    ("dlq_offset", str(off).encode())]  # fmt: skip
    return key.encode(), value, ts, headers


def put(settings: Settings, topic: str, records: list) -> None:
    producer = EventProducer(settings)
    producer.produce_raw(
        topic,
        [r[1] for r in records],
        [r[0] for r in records],
        [r[2] for r in records],
        [r[3] for r in records],
    )
    producer.flush()


def everything(settings: Settings, topic: str) -> list:
    return [m for batch in read_to_end(settings, {(topic, p): 0 for p in high_watermarks(settings, topic)})
            for m in batch]  # fmt: skip


def topics(settings: Settings, unique: Callable[[str], str]) -> tuple[str, str]:
    source = unique("dlq.src")
    apply_topics(settings, [TopicSpec(source, 3), TopicSpec(f"{source}.dlq", 1)])
    return source, f"{source}.dlq"


def test_list_and_redrive_each_dead_letter_once(settings: Settings, unique: Callable[[str], str]):
    source, dlq = topics(settings, unique)
    letters = [
        dead("k1", b"\x00bad1", "decode_error", (source, 2, 10), 1_000),
        dead("k2", b"\x00bad2", "decode_error", (source, 0, 11), 2_000),
        dead("k3", b"v3", "validation_error", (source, 1, 12), 3_000),
        dead("k1", b"\x00bad1", "decode_error", (source, 2, 10), 1_000),  # dead-lettered twice
        dead("k4", b"v4", "validation_error", (source, 2, 13), 4_000),
        dead("k5", None, "decode_error", None, 5_000),  # no origin headers
    ]
    put(settings, dlq, letters)

    listed = cli(settings, "dlq", "list", dlq)
    assert listed["records"] == 6
    by = {r["reason"]: r for r in listed["reasons"]}
    assert (by["decode_error"]["count"], by["validation_error"]["count"]) == (4, 2)
    assert by["decode_error"]["offsets"] == [{"partition": 0, "first": 0, "last": 5}]
    assert by["validation_error"]["offsets"] == [{"partition": 0, "first": 2, "last": 4}]
    assert by["decode_error"]["source_topics"] == {source: 3, "?": 1}
    assert by["validation_error"]["example_error"] == "validation_error of k3"
    assert by["validation_error"]["redriven"] == 0

    first = cli(settings, "dlq", "redrive", dlq, "--reason", "validation_error")
    assert (first["selected"], first["redriven"], first["already"]) == (2, 2, 0)
    back = everything(settings, source)
    assert sorted((m.key(), m.value(), m.partition(), m.timestamp()[1]) for m in back) == [
        (b"k3", b"v3", 1, 3_000), (b"k4", b"v4", 2, 4_000)]  # fmt: skip
    for m in back:  # original headers, no dlq_*, plus the redrive mark
        names = [k for k, _ in m.headers()]
        assert names == ["ce_id", "ce_type", REDRIVE_HEADER]
    assert {dict(m.headers())[REDRIVE_HEADER] for m in back} == {
        f"{source}:1:12".encode(),
        f"{source}:2:13".encode(),
    }

    again = cli(settings, "dlq", "redrive", dlq, "--reason", "validation_error")
    assert (again["redriven"], again["already"]) == (0, 2)
    rest = cli(settings, "dlq", "redrive", dlq)
    assert (rest["selected"], rest["redriven"], rest["already"], rest["no_origin"]) == (6, 2, 3, 1)
    assert sum(high_watermarks(settings, source).values()) == 4  # k1 once, k2, k3, k4
    assert cli(settings, "dlq", "list", dlq)["reasons"][0]["redriven"] == 3  # decode_error: k1 ×2, k2

    # the state file lost: the target itself says what was redriven
    RedriveState.file_of(settings, dlq).unlink()
    lost = cli(settings, "dlq", "redrive", dlq)
    assert (lost["redriven"], lost["already"]) == (0, 5) and lost["scanned"] == 4
    assert sum(high_watermarks(settings, source).values()) == 4

    # --to another topic: what was redriven already stays so (identity = origin); the dead
    # letter without an origin goes there, partitioned by key, also once
    other = unique("dlq.other")
    apply_topics(settings, [TopicSpec(other, 2)])
    moved = cli(settings, "dlq", "redrive", dlq, "--reason", "decode_error", "--to", other)
    assert (moved["redriven"], moved["already"], moved["per_target"]) == (1, 3, {other: 1})
    (k5,) = everything(settings, other)
    assert (k5.key(), k5.value(), dict(k5.headers())[REDRIVE_HEADER]) == (b"k5", None, f"{dlq}:0:5".encode())
    assert cli(settings, "dlq", "redrive", dlq, "--to", other)["redriven"] == 0
    assert len(everything(settings, other)) == 1


def test_a_redrive_killed_after_producing_is_not_repeated(
    settings: Settings, unique: Callable[[str], str], monkeypatch: pytest.MonkeyPatch
):
    source, dlq = topics(settings, unique)
    put(settings, dlq, [dead(f"k{i}", f"v{i}".encode(), "validation_error", (source, i % 3, i), 1_000 + i)
                        for i in range(6)])  # fmt: skip
    real_scan = dead_letters._scan
    calls: list[int] = []

    def crash_after_produce(*args: object, **kwargs: object):
        calls.append(1)
        if len(calls) == 2:  # 1: the first look at the targets; 2: after the producer's flush
            raise KeyboardInterrupt("killed after producing, before recording")
        return real_scan(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(dead_letters, "_scan", crash_after_produce)
    with pytest.raises(KeyboardInterrupt):
        redrive(settings, dlq)
    assert sum(high_watermarks(settings, source).values()) == 6  # produced, not recorded
    state = RedriveState.load(settings, dlq)
    assert state.pending and not state.done
    monkeypatch.setattr(dead_letters, "_scan", real_scan)
    result = redrive(settings, dlq)
    assert (result.redriven, result.already) == (0, 6)
    assert sum(high_watermarks(settings, source).values()) == 6
    assert len(RedriveState.load(settings, dlq).done) == 6 and not RedriveState.load(settings, dlq).pending
