"""The listening-from-playback agent end to end: a Faust worker subprocess on the real broker and
registry reads a seeded stream of player events (:mod:`tests.streams.playback_gen`); its
listens equal a DuckDB computation over the generated events (the 30-second rule, the first end
of each started play), the ``plays`` read model and its skip-rate views equal a GROUP BY over
them, and a worker that dies mid-checkpoint and is SIGKILLed publishes exactly the same listens,
none twice."""

from __future__ import annotations

import dataclasses
import re
import signal
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa
import pytest
from confluent_kafka import Producer

from events.control import END_OF_INPUT_MS, watermark_headers, watermark_of
from events.log import read_to_end
from events.offsets import high_watermarks
from events.producer import EventProducer
from events.registry_client import registry_for
from infra.provision import apply_topics
from infra.settings import Settings
from projections.runner import run_projections
from projections.sql import query
from streams.config import IngestConfig
from streams.playback_config import PlaybackConfig
from streams.plays import listen_event_id
from streams.runtime.published import output_id
from tests.conftest import env_for, wait_for
from tests.streams.playback_gen import player_events
from tests.streams.workers import Worker

pytestmark = pytest.mark.integration

USERS, SESSIONS, SEED = 120, 5, 17


@dataclasses.dataclass
class Inputs:
    source: str
    events: list[tuple[str, dict[str, Any]]]
    records: int  # data records on the topic (the events and one undecodable record)
    mark: int  # the closing watermark
    db: duckdb.DuckDBPyConnection  # table ``ev``: every generated event, with its order ``seq``


@pytest.fixture(scope="module")
def inputs(stack: Settings) -> Iterator[Inputs]:
    source = f"play-src-{uuid.uuid4().hex[:8]}"
    apply_topics(stack, PlaybackConfig(source_topic=source).topic_specs("x")[:1])
    events = player_events(SEED, USERS, SESSIONS)
    producer = EventProducer(stack)
    for kind, record in events:
        producer.send_many(
            source, kind, [record], key_field="user_id", time_field="occurred_at", source="/tests"
        )
    producer.produce_raw(source, [b"not avro"], [b"user-x"])
    producer.flush()
    mark = max(r["occurred_at"] for _, r in events) + END_OF_INPUT_MS
    raw = Producer(stack.producer_conf())
    for p in range(6):
        raw.produce(source, value=b"", partition=p, headers=watermark_headers(mark))
    assert raw.flush(10) == 0
    rows = [
        {"seq": i, "kind": kind, "user_id": r["user_id"], "session_id": r["session_id"],
         "playback_id": r.get("playback_id"), "track_id": r.get("track_id"), "occurred_at": r["occurred_at"],
         "ms_played": r.get("ms_played") if kind in ("PlaybackSkipped", "PlaybackCompleted") else None,
         "country": r.get("country"), "position_ms": r.get("position_ms")}
        for i, (kind, r) in enumerate(events)
    ]  # fmt: skip
    db = duckdb.connect()
    ev = pa.Table.from_pylist(rows)  # noqa: F841 - read by DuckDB by name
    db.execute("CREATE TABLE ev AS SELECT * FROM ev")
    yield Inputs(source, events, len(events) + 1, mark, db)
    db.close()


#: The listens the 30-second rule makes, in SQL: for each play, its first start and its first
#: end (the offset order of a user's events is the generation order ``seq``), counted when the
#: end's ms_played >= 30000; the territory is the first start of the play's session.
EXPECTED_LISTENS = """
WITH s AS (SELECT playback_id, min_by(user_id, seq) AS user_id, min_by(track_id, seq) AS track_id,
                  min_by(occurred_at, seq) AS started_at, min_by(session_id, seq) AS session_id,
                  min(seq) AS seq
           FROM ev WHERE kind = 'PlaybackStarted' GROUP BY playback_id),
     e AS (SELECT playback_id, min_by(ms_played, seq) AS ms_played, min(seq) AS seq
           FROM ev WHERE kind IN ('PlaybackSkipped', 'PlaybackCompleted') GROUP BY playback_id),
     c AS (SELECT session_id, min_by(country, seq) AS country
           FROM ev WHERE kind = 'PlaybackSessionStarted' GROUP BY session_id)
SELECT s.playback_id, s.user_id, s.track_id, s.started_at, e.ms_played, c.country
FROM s JOIN e ON e.playback_id = s.playback_id AND e.seq > s.seq LEFT JOIN c ON c.session_id = s.session_id
WHERE e.ms_played >= 30000
"""

#: The first end of every play (the ``plays`` read model).
FIRST_ENDS = """
SELECT playback_id, min_by(user_id, seq) AS user_id, min_by(track_id, seq) AS track_id,
       min_by(ms_played, seq) AS ms_played,
       min_by(CASE kind WHEN 'PlaybackSkipped' THEN 'SKIPPED' ELSE 'COMPLETED' END, seq) AS outcome,
       min_by(position_ms, seq) AS skip_position_ms
FROM ev WHERE kind IN ('PlaybackSkipped', 'PlaybackCompleted') GROUP BY playback_id
"""


class Run:
    """One worker running only the playback agent, with its own app id and outputs."""

    def __init__(
        self, settings: Settings, inputs: Inputs, tmp: Path, label: str, name: str = "", **env: str
    ) -> None:
        self.settings = settings
        self.inputs = inputs
        self.name = name or f"play-{label}-{uuid.uuid4().hex[:8]}"
        self.config = PlaybackConfig(source_topic=inputs.source, listens_topic=f"{self.name}.listens",
                                     dlq_topic=f"{self.name}.dlq")  # fmt: skip
        apply_topics(settings, self.config.topic_specs(self.name))
        self.env = {
            **env_for(settings),
            "BACKBEAT_INGEST_APP_ID": self.name,
            "BACKBEAT_STREAMS_AGENTS": "playback",
            "BACKBEAT_PLAYBACK_SOURCE_TOPIC": inputs.source,
            "BACKBEAT_PLAYBACK_LISTENS_TOPIC": self.config.listens_topic,
            "BACKBEAT_PLAYBACK_DLQ_TOPIC": self.config.dlq_topic,
            "BACKBEAT_INGEST_STATS_INTERVAL_S": "0.25",
            "BACKBEAT_INGEST_BATCH_WITHIN_S": "0.02",
            **env,
        }
        self.worker = Worker(self.env, tmp / f"{label}.log")

    def stats(self) -> dict[str, Any] | None:
        return self.worker.last_stats("playback")

    def wait_done(self, timeout_s: float = 60) -> dict[str, Any]:
        """Until every record is in and every partition read to its end."""
        ends = high_watermarks(self.settings, self.inputs.source)

        def done() -> dict[str, Any] | None:
            s = self.stats()
            if s is None or s["records_in"] < self.inputs.records:
                return None
            positions = {int(p): n for p, n in s["positions"].items()}
            return s if all(positions.get(p, 0) >= end for p, end in ends.items() if end) else None

        return wait_for(done, timeout_s, "the playback agent to read every record")  # type: ignore[return-value]

    def listens(self) -> tuple[list[dict[str, Any]], list[int]]:
        """Every listen on the listens topic (failing on an identity seen twice, or on a key that
        is not the user), and the watermarks forwarded to it."""
        decoder = registry_for(self.settings.registry_url).decoder()
        topic = self.config.listens_topic
        seen: set[str] = set()
        out: list[dict[str, Any]] = []
        marks: list[int] = []
        starts = {(topic, p): 0 for p in high_watermarks(self.settings, topic)}
        for batch in read_to_end(self.settings, starts, purpose="playback-test"):
            for m in batch:
                if not m.value():
                    marks.append(watermark_of(m.headers()))
                    continue
                ident = output_id(m.headers())
                assert ident not in seen, f"{ident} published twice"
                seen.add(ident)
                value = decoder.decode(m.value())
                assert m.key() == value["user_id"].encode() and ident == value["event_id"]
                out.append(value)
        return out, marks


def assert_exact(inputs: Inputs, listens: list[dict[str, Any]]) -> None:
    """The listens equal :data:`EXPECTED_LISTENS`, row by row and grouped per user and track."""
    db = inputs.db
    got = pa.Table.from_pylist(listens)  # noqa: F841 - read by DuckDB by name
    db.execute("CREATE OR REPLACE TABLE got AS SELECT * FROM got")
    expected = db.execute(EXPECTED_LISTENS + " ORDER BY 1").fetchall()
    rows = db.execute(
        "SELECT playback_id, user_id, track_id, occurred_at, ms_played, territory FROM got ORDER BY 1"
    ).fetchall()
    assert rows == expected
    assert len(expected) > 500
    per_user_track = "SELECT user_id, track_id, count(*), sum(ms_played) FROM ({}) GROUP BY ALL ORDER BY ALL"
    assert (
        db.execute(per_user_track.format("SELECT * FROM got")).fetchall()
        == db.execute(per_user_track.format(EXPECTED_LISTENS)).fetchall()
    )
    assert all(x["source"] == "player" and x["event_id"] == listen_event_id(x["user_id"], x["occurred_at"],
               x["track_id"]) and x["artist_id"] for x in listens)  # fmt: skip
    assert {x["territory"] for x in listens} > {None, "SE"}


def test_listens_and_plays_are_exact(stack: Settings, inputs: Inputs, tmp_path: Path) -> None:
    # the listening-ingest agent of the same worker sessionises the listens, as it does any
    name = f"play-clean-{uuid.uuid4().hex[:8]}"
    ingest = IngestConfig(app_id=name, source_topic=f"{name}.listens", sessions_topic=f"{name}.sessions",
                          dlq_topic=f"{name}.ldlq")  # fmt: skip
    apply_topics(stack, ingest.topic_specs())
    run = Run(stack, inputs, tmp_path, "clean", name=name, BACKBEAT_STREAMS_AGENTS="playback,ingest",
              BACKBEAT_INGEST_SOURCE_TOPIC=ingest.source_topic, BACKBEAT_INGEST_SESSIONS_TOPIC=ingest.sessions_topic,
              BACKBEAT_INGEST_DLQ_TOPIC=ingest.dlq_topic)  # fmt: skip
    try:
        run.worker.start()
        stats = run.wait_done()
        listens, marks = run.listens()
        scraped = run.worker.metrics()
        sessions = wait_for(
            lambda: (s := run.worker.last_stats("ingest")) is not None and s["sessionised"] >= len(listens)
            and s["open_sessions"] == dict.fromkeys(s["open_sessions"], 0) and s,
            30, "the ingest agent to close every session",
        )  # fmt: skip
    finally:
        run.worker.kill()
    # every listen sessionised, none late or a duplicate, every session closed by the forwarded watermark
    assert (sessions["sessionised"], sessions["late"], sessions["duplicates"]) == (len(listens), 0, 0)
    assert sessions["sessions_emitted"] > USERS
    assert_exact(inputs, listens)
    assert stats["reconciles"] and stats["dead_lettered"] == 1
    assert stats["counted"] == stats["listens_emitted"] == len(listens)
    assert stats["duplicates"] > 0 and stats["short_plays"] > 0 and stats["plays_abandoned"] > 0
    assert stats["open_plays"] == dict.fromkeys(stats["open_plays"], 0)  # the closing watermark expired them
    assert sorted(marks) == [inputs.mark] * 6  # forwarded unchanged: no play is open any more
    component = ("component", "agent:listening-from-playback")
    assert scraped[("backbeat_records_in_total", (component, ("topic", inputs.source)))] == inputs.records
    assert ("backbeat_state_entries", (component,)) in scraped

    # the plays read model and its views, against a GROUP BY over the same events
    settings = dataclasses.replace(stack, data_dir=tmp_path / "data")
    result = run_projections(settings, ["plays"], until_caught_up=True, topics={"plays": inputs.source})
    assert result.rejects == 1  # the undecodable record
    got = query(settings, "SELECT playback_id, user_id, track_id, ms_played, outcome, skip_position_ms, counted "
                "FROM plays ORDER BY 1", max_rows=None).rows  # fmt: skip
    first = inputs.db.execute(f"SELECT *, ms_played >= 30000 FROM ({FIRST_ENDS}) ORDER BY 1").fetchall()
    assert [tuple(r) for r in got] == first
    assert sum(1 for r in got if r[-1]) >= len(listens)  # every listen's end is a counted play
    rates = query(settings, "SELECT track_id, plays, skips, early_skips, skip_rate FROM track_skip_rates "
                  "ORDER BY 1", max_rows=None).rows  # fmt: skip
    truth = inputs.db.execute(
        f"SELECT track_id, count(*), count(*) FILTER (outcome = 'SKIPPED'), "
        f"count(*) FILTER (outcome = 'SKIPPED' AND ms_played < 30000), "
        f"count(*) FILTER (outcome = 'SKIPPED') / count(*) FROM ({FIRST_ENDS}) GROUP BY 1 ORDER BY 1"
    ).fetchall()
    assert [tuple(r) for r in rates] == truth and len(truth) == 40
    users = query(settings, "SELECT count(*), sum(skips) FROM user_skip_rates", max_rows=None).rows
    assert tuple(users[0]) == (USERS, sum(r[2] for r in truth))


def test_a_worker_killed_mid_stream_publishes_the_same_listens_once(
    stack: Settings, inputs: Inputs, tmp_path: Path
) -> None:
    small = {"BACKBEAT_INGEST_BATCH": "150", "BACKBEAT_INGEST_FETCH_WAIT_MS": "500"}
    # 1: dies with a batch's listens on the broker but not its checkpoint; 2: with half a
    # checkpoint written; 3: SIGKILLed from outside mid-stream; 4: runs to the end
    runs = [
        Run(stack, inputs, tmp_path, "killed", BACKBEAT_FAILPOINT="outputs-acked:8", **small),
    ]
    run = runs[0]
    try:
        run.worker.start()
        assert run.worker.proc is not None and run.worker.proc.wait(60) == 137
        first = run.listens()[0]
        assert first and len(first) < 600  # it died mid-stream, listens of its batches published
        for env in ({"BACKBEAT_FAILPOINT": "changelog-half:6"}, {}):
            run.worker.env = {k: v for k, v in run.env.items() if k != "BACKBEAT_FAILPOINT"} | env
            run.worker.start()
            if env:
                assert run.worker.proc is not None and run.worker.proc.wait(60) == 137
        # the third incarnation: SIGKILLed once it has processed a batch of its own
        wait_for(lambda: (s := run.stats()) is not None and s["batches"] >= 1, 60, "the third incarnation's batch")
        run.worker.kill(signal.SIGKILL)
        run.worker.start()
        stats = run.wait_done()
        listens, _ = run.listens()
    finally:
        run.worker.kill()
    assert_exact(inputs, listens)
    assert stats["reconciles"] and stats["counted"] == len(listens)
    log = run.worker.log.read_text(errors="replace")
    assert log.count("restored partitions") >= 4
    assert "the last checkpoint was cut short" in log  # the half-written checkpoint was undone
    # listens published before a death were computed again and recognised, not published again
    assert re.search(r"; [1-9][0-9]* outputs published after their checkpoints", log)
