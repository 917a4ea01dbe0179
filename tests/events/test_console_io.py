"""Console produce/consume (events.console_io) over the real broker and registry, plus the pure
parts (start parsing, JSON rendering, event-type resolution)."""

from __future__ import annotations

import base64
import json
import threading
from collections import defaultdict
from datetime import UTC, datetime

import pytest

from events import console_io
from events.catalog import TopicSpec
from events.cloudevents import rfc3339_ms
from events.console_io import (
    BadLinesError,
    consume,
    parse_start,
    produce_json_lines,
    to_json_line,
)
from events.control import watermark_headers
from events.offsets import high_watermarks, partitions_of
from events.producer import EventProducer
from events.serde import frame
from infra.errors import ConfigError, InfraError
from infra.provision import apply_topics
from tests.conftest import wait_for

LISTEN_TYPE = "backbeat.playback.ListenRecorded"
T0 = 1_397_982_525_000  # 2014-04-20T08:28:45Z


def listen(i: int, *, user: str | None = None, at: int | str | None = None, **extra: object) -> dict:
    record = {
        "event_id": f"e{i:04d}",
        "user_id": user if user is not None else f"u{i % 5}",
        "track_id": f"t{i}",
        "artist_id": f"a{i % 3}",
        "occurred_at": at if at is not None else T0 + i * 1000,
        "source": "cli-test",
    }
    record.update(extra)
    return record


def lines_of(records: list[dict]) -> list[str]:
    return [json.dumps(r) + "\n" for r in records]


def expected(record: dict) -> dict:
    """A listen as it decodes: defaults filled in, times as ms."""
    out = {"ms_played": None, "track_name": None, "artist_name": None, "session_hint": None,
           "territory": None, "playback_id": None, **record}
    if isinstance(out["occurred_at"], str):
        out["occurred_at"] = console_io.parse_time_ms(out["occurred_at"])
    return out


@pytest.fixture
def topic(stack, unique):
    name = unique("console")
    apply_topics(stack, [TopicSpec(name, 3, event_types=(LISTEN_TYPE,))])
    return name


def produce(settings, topic, records):
    return produce_json_lines(
        settings, topic, lines_of(records), event_type="ListenRecorded", key_field="user_id"
    )


def read_all(settings, topic, **kwargs) -> list[dict]:
    return list(consume(settings, topic, **kwargs))


def drain_in_thread(iterator) -> tuple[list[dict], threading.Thread]:
    """Iterate in a daemon thread, appending to the returned list as records arrive."""
    out: list[dict] = []

    def run() -> None:
        for record in iterator:
            out.append(record)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return out, thread


# -- over the broker -----------------------------------------------------------------------------


def test_produced_lines_come_back_exactly(stack, topic):
    records = [listen(i) for i in range(12)]
    records[3] = listen(3, at="2014-04-20T10:28:48+02:00")  # ISO with an offset
    records[4]["ms_played"] = 183_000
    records[5]["track_name"] = "Ça plane pour moi"
    report = produce(stack, topic, records)
    assert (report.produced, report.topic, report.event_type) == (12, topic, LISTEN_TYPE)
    assert (report.key_field, report.time_field) == ("user_id", "occurred_at")

    got = read_all(stack, topic)
    assert len(got) == 12
    by_id = {r["value"]["event_id"]: r for r in got}
    for rec in records:
        out = by_id[rec["event_id"]]
        want = expected(rec)
        assert out["value"] == want
        assert out["topic"] == topic
        assert out["key"] == rec["user_id"]
        assert out["timestamp"] == want["occurred_at"]
        assert out["headers"]["ce_id"] == rec["event_id"]
        assert out["headers"]["ce_type"] == LISTEN_TYPE
        assert out["headers"]["ce_source"] == "/cli"
        assert out["headers"]["ce_specversion"] == "1.0"
        assert out["headers"]["ce_time"] == rfc3339_ms(want["occurred_at"])
        assert out["headers"]["content-type"] == "application/avro"
        assert "error" not in out
    assert by_id["e0003"]["value"]["occurred_at"] == T0 + 3000  # 10:28:48+02:00 = 08:28:48Z
    # per partition: offsets 0..n-1 in order, a user's listens in one partition in input order
    per_part: dict[int, list[dict]] = defaultdict(list)
    for r in got:
        per_part[r["partition"]].append(r)
    assert sum(len(v) for v in per_part.values()) == 12
    for part in per_part.values():
        assert [r["offset"] for r in part] == list(range(len(part)))
    users: dict[str, set[int]] = defaultdict(set)
    for r in got:
        users[r["key"]].add(r["partition"])
    assert all(len(ps) == 1 for ps in users.values())
    # every record renders as one JSON line that parses back to the same dict
    for r in got:
        line = to_json_line(r)
        assert "\n" not in line
        assert json.loads(line) == r


def test_bad_lines_are_all_reported_and_nothing_is_sent(stack, topic):
    good = [listen(i) for i in range(3)]
    lines = lines_of(good)
    lines.insert(1, '{"event_id": "e9", "user_id": "u1",\n')  # line 2: broken JSON
    lines.insert(3, json.dumps(listen(7, user=42)) + "\n")  # line 4: user_id is not a string
    lines.append("\n")  # a blank line is fine
    with pytest.raises(BadLinesError) as info:
        produce_json_lines(stack, topic, lines, event_type="ListenRecorded", key_field="user_id")
    err = info.value
    assert sorted({p.line for p in err.problems}) == [2, 4]
    assert [p.field for p in err.problems if p.line == 4] == ["user_id"]
    message = str(err)
    assert "line 2" in message and "not JSON" in message and "column" in message
    assert "line 4, field user_id: 42 is not string" in message
    assert "nothing was sent" in message
    assert high_watermarks(stack, topic) == {0: 0, 1: 0, 2: 0}
    assert read_all(stack, topic) == []


def test_latest_yields_nothing_then_only_new_records(stack, topic):
    produce(stack, topic, [listen(i) for i in range(6)])
    assert read_all(stack, topic, start="latest") == []
    # offsets are fixed when consume() is called, so records produced after it are "new"
    following = consume(stack, topic, start="latest", follow=True, limit=2)
    out, thread = drain_in_thread(following)
    produce(stack, topic, [listen(100), listen(101)])
    wait_for(lambda: len(out) >= 2, 30, "two new records")
    thread.join(10)
    assert not thread.is_alive()
    assert sorted(r["value"]["event_id"] for r in out) == ["e0100", "e0101"]


def test_reads_to_the_true_end_of_a_partition_of_several_batches(stack, unique):
    # ListOffsets LATEST on the embedded broker says 21 here (last batch's base + 1, docs/broker.md §2)
    name = unique("console-batches")
    apply_topics(stack, [TopicSpec(name, 1, event_types=(LISTEN_TYPE,))])
    for batch in range(3):
        produce(stack, name, [listen(batch * 10 + i) for i in range(10)])
    got = read_all(stack, name)
    assert [r["offset"] for r in got] == list(range(30))
    assert [r["value"]["event_id"] for r in got] == [f"e{i:04d}" for i in range(30)]
    assert read_all(stack, name, start="latest") == []
    assert [r["offset"] for r in read_all(stack, name, start="25")] == list(range(25, 30))


def test_start_at_an_offset_and_at_partition_offsets(stack, topic):
    produce(stack, topic, [listen(i) for i in range(15)])
    everything = read_all(stack, topic)
    counts = defaultdict(int)
    for r in everything:
        counts[r["partition"]] += 1

    from_one = read_all(stack, topic, start="1")
    assert len(from_one) == 15 - sum(1 for c in counts.values() if c)
    assert all(r["offset"] >= 1 for r in from_one)
    assert {(r["partition"], r["offset"]) for r in from_one} == {
        (r["partition"], r["offset"]) for r in everything if r["offset"] >= 1
    }

    part = max(counts, key=lambda p: counts[p])
    only = read_all(stack, topic, start=f"{part}:2")
    assert [(r["partition"], r["offset"]) for r in only] == [(part, o) for o in range(2, counts[part])]
    # an offset past the end starts at the end: nothing to read
    assert read_all(stack, topic, start=f"{part}:{counts[part] + 100}") == []
    with pytest.raises(ConfigError, match="partitions"):
        consume(stack, topic, start="7:0")


def test_start_at_a_time(stack, topic):
    produce(stack, topic, [listen(i) for i in range(20)])
    since = datetime.fromtimestamp((T0 + 12_000) / 1000, UTC).isoformat()
    got = read_all(stack, topic, start=since)
    assert sorted(r["value"]["event_id"] for r in got) == [f"e{i:04d}" for i in range(12, 20)]
    assert all(r["timestamp"] >= T0 + 12_000 for r in got)
    assert read_all(stack, topic, start="2030-01-01T00:00:00Z") == []


def test_limit(stack, topic):
    produce(stack, topic, [listen(i) for i in range(10)])
    assert len(read_all(stack, topic, limit=3)) == 3
    assert read_all(stack, topic, limit=0) == []
    assert len(read_all(stack, topic, limit=100)) == 10


def test_bad_records_yield_errors_not_a_crash(stack, topic):
    producer = EventProducer(stack)
    good = producer.encoder(topic, LISTEN_TYPE).encode(expected(listen(1, user="k")))
    values = [
        b"not avro at all",
        frame(987_654) + b"\x02xx",  # an unknown schema id
        good[:8],  # truncated body
        b"",  # a control record (below) has an empty value
        good,
    ]
    headers = [None, None, None, watermark_headers(T0 + 60_000), None]
    producer.produce_raw(topic, values, [b"k"] * 5, [T0] * 5, headers)
    producer.produce_raw(topic, [None], [b"k"], [T0])  # a tombstone
    producer.flush()

    got = read_all(stack, topic)
    assert len(got) == 6
    assert len({r["partition"] for r in got}) == 1
    assert [r["offset"] for r in got] == list(range(6))
    assert all(r["value"] is None and r["error"] for r in got[:3])
    assert "magic byte" in got[0]["error"]
    assert "987654" in got[1]["error"]
    assert got[3]["control"] == "watermark" and got[3]["watermark_ms"] == T0 + 60_000
    assert got[3]["value"] is None and "error" not in got[3]
    assert got[4]["value"]["event_id"] == "e0001" and "error" not in got[4]
    assert got[5]["value"] is None and "error" not in got[5]  # tombstone
    for r in got:
        json.loads(to_json_line(r))


def test_follow_yields_records_produced_after_it_started(stack, topic):
    produce(stack, topic, [listen(0), listen(1)])
    out, thread = drain_in_thread(consume(stack, topic, follow=True, limit=3))
    wait_for(lambda: len(out) >= 2, 30, "the two existing records")
    assert thread.is_alive()
    produce(stack, topic, [listen(2)])
    wait_for(lambda: len(out) >= 3, 30, "the record produced while following")
    thread.join(10)
    assert not thread.is_alive()
    assert [r["value"]["event_id"] for r in out][-1] == "e0002"


def test_producing_to_a_missing_topic_fails_without_creating_it(stack, unique):
    name = unique("missing")
    with pytest.raises(InfraError, match="does not exist"):
        produce(stack, name, [listen(1)])
    with pytest.raises(InfraError, match="does not exist"):
        partitions_of(stack, name)


# -- pure ----------------------------------------------------------------------------------------


def test_event_type_comes_from_the_catalogue_or_must_be_named(monkeypatch):
    catalogue = {
        "single": TopicSpec("single", 1, key="user_id", event_types=(LISTEN_TYPE,)),
        "mixed": TopicSpec(
            "mixed", 1, key="user_id", event_types=(LISTEN_TYPE, "backbeat.listening.SessionEnded")
        ),
    }
    monkeypatch.setattr(console_io, "load_catalogue", lambda: catalogue)
    schema, key = console_io._resolve_event_type("single", None, None)
    assert (schema.full_name, key) == (LISTEN_TYPE, "user_id")
    with pytest.raises(ConfigError, match="several event types.*ListenRecorded.*SessionEnded"):
        console_io._resolve_event_type("mixed", None, None)
    schema, _ = console_io._resolve_event_type("mixed", "SessionEnded", None)
    assert schema.name == "SessionEnded"
    with pytest.raises(ConfigError, match="does not carry"):
        console_io._resolve_event_type("mixed", "TrackPublished", None)
    with pytest.raises(ConfigError, match="not in the topic catalogue"):
        console_io._resolve_event_type("elsewhere", None, None)
    with pytest.raises(ConfigError, match="key field 'nope'"):
        console_io._resolve_event_type("elsewhere", "ListenRecorded", "nope")


def test_validation_reports_every_field_and_accepts_iso_times():
    schema = console_io.get_schema("ListenRecorded")
    bad = listen(1, at="yesterday", ms_played="long", bogus=1)
    del bad["track_id"]
    lines = [json.dumps(listen(0, at="2014-04-20T08:28:45Z")), json.dumps(bad), "[1, 2]", ""]
    records, problems, count, blank = console_io.parse_json_lines(lines, schema, "user_id")
    assert (count, blank) == (4, 1)
    assert records == [expected(listen(0, at=T0))]
    assert {(p.line, p.field) for p in problems} == {
        (2, "bogus"), (2, "track_id"), (2, "occurred_at"), (2, "ms_played"), (3, ""),
    }  # fmt: skip
    reasons = {p.field: p.reason for p in problems}
    assert reasons["ms_played"] == '"long" is not null | long'
    assert reasons["track_id"].startswith("missing")


def test_parse_start():
    assert parse_start("earliest").kind == "earliest"
    assert parse_start("latest").kind == "latest"
    assert parse_start("42").offset == 42
    assert parse_start("0:5,2:7").offsets == {0: 5, 2: 7}
    assert parse_start("2014-04-20T08:28:45Z").time_ms == T0
    assert parse_start("2014-04-20T08:28:45").time_ms == T0  # naive = UTC
    with pytest.raises(ConfigError, match="ISO-8601"):
        parse_start("last tuesday")


def test_to_json_line_renders_bytes_and_times():
    line = to_json_line({"b": b"\x00\xff", "t": datetime(2020, 1, 1, tzinfo=UTC), "s": "é"})
    data = json.loads(line)
    assert base64.b64decode(data["b"]) == b"\x00\xff"
    assert data["t"] == "2020-01-01T00:00:00Z"
    assert data["s"] == "é" and "é" in line
