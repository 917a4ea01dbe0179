"""The feature agents end to end: a Faust worker subprocess on the real broker and registry.
Windowed counts equal a DuckDB GROUP BY over what the source topic holds (late listens inside
and outside the grace period included); a worker killed (SIGKILL) mid-stream and restarted
emits exactly the values of an uninterrupted run."""

from __future__ import annotations

import random
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Producer

from events.control import END_OF_INPUT_MS, is_control, watermark_headers, watermark_of
from events.importers.base import dedupe_and_order
from events.importers.listens import parse_listens_file, without_line
from events.offsets import high_watermarks
from events.producer import EventProducer
from events.registry_client import registry_for
from infra.provision import apply_topics
from infra.settings import Settings
from streams.config import IngestConfig
from streams.features_config import FeaturesConfig
from tests.conftest import LISTENS_30MUSIC, env_for, wait_for
from tests.streams import feature_reference as ref
from tests.streams.workers import TopicReader, Worker

pytestmark = pytest.mark.integration

#: Restarted workers find a backlog of small changelog and partial batches; on the embedded broker
#: a Fetch that lists them for longer than the fetch wait returns nothing and a partition can stall
#: under load (docs/broker.md §7), so the crash runs wait longer per Fetch.
SLOW_FETCH = {"BACKBEAT_INGEST_FETCH_WAIT_MS": "500"}

MIN = 60_000
HOUR = 60 * MIN
GAP = 30 * MIN
WINDOWS = {
    "BACKBEAT_FEATURES_USER_WINDOWS": "1h/5m,4h/1h",
    "BACKBEAT_FEATURES_TRACK_WINDOWS": "1h/5m",
    "BACKBEAT_FEATURES_GRACE": "10m",
    "BACKBEAT_FEATURES_HALF_LIFE": "2h",
    "BACKBEAT_FEATURES_BASELINE_WINDOWS": "3",
    "BACKBEAT_FEATURES_TRACK_MIN_PLAYS": "1",
}

MIN_PLAYS = {"BACKBEAT_FEATURES_TRACK_MIN_PLAYS": "2"}  # the default: fewer track windows to read


class Setup:
    """An isolated copy of the feature agents' topics on the shared broker."""

    def __init__(self, settings: Settings, name: str, source: str, log: Path, **env: str) -> None:
        self.settings = settings
        self.name = name
        self.source = source
        self.features = FeaturesConfig.from_env(
            {
                **WINDOWS,
                **env,
                "BACKBEAT_FEATURES_USERS_TOPIC": f"{name}.users",
                "BACKBEAT_FEATURES_TRACKS_TOPIC": f"{name}.tracks",
            }
        )
        specs = IngestConfig(app_id=name, source_topic=source).topic_specs()[:1]
        apply_topics(settings, specs + self.features.topic_specs(name, 6))
        self.env = {
            **env_for(settings),
            **WINDOWS,
            "BACKBEAT_INGEST_APP_ID": name,
            "BACKBEAT_INGEST_SOURCE_TOPIC": source,
            "BACKBEAT_FEATURES_USERS_TOPIC": self.features.users_topic,
            "BACKBEAT_FEATURES_TRACKS_TOPIC": self.features.tracks_topic,
            "BACKBEAT_STREAMS_AGENTS": "features",
            "BACKBEAT_INGEST_STATS_INTERVAL_S": "0.25",
            "BACKBEAT_INGEST_BATCH_WITHIN_S": "0.05",
            **env,
        }
        self.worker = Worker(self.env, log)

    def wait_done(self, mark: int, total: int = 0, timeout_s: float = 180) -> dict[str, Any]:
        """Poll the worker's stats until this process took ``total`` listens, every source
        watermark reached ``mark`` on the track side (the watermark records follow the listens
        in every partition), and two successive stats lines show the same counts."""
        seen: list[dict[str, Any]] = []

        def done() -> bool:
            users, tracks = self.worker.last_stats("features"), self.worker.last_stats("tracks")
            if users is None or tracks is None:
                return False
            stats = {**users, **{k: v for k, v in tracks.items() if k not in users or k == "track_watermarks"}}
            stats["track_features"], stats["batches"] = tracks["track_features"], (users["batches"], tracks["batches"])
            marks = list(stats["track_watermarks"].values())
            if not (stats["records_in"] >= total and len(marks) == 6 and min(marks) >= mark):
                return False
            keys = ("user_features", "track_features", "partials", "batches")
            if seen and all(seen[-1][k] == stats[k] for k in keys):
                return True
            seen.append(stats)
            time.sleep(0.6)  # two stats intervals: the next line must show the same counts
            return False

        wait_for(done, timeout_s, "the feature agents to finish")
        return seen[-1]

    def outputs(self, stats: dict[str, Any]) -> tuple[dict[str, dict], dict[str, dict]]:
        """Every feature event on both topics by event id; no id may be there twice."""
        decoder = registry_for(self.settings.registry_url).decoder()
        out = []
        for topic, want in (
            (self.features.users_topic, "user_features"),
            (self.features.tracks_topic, "track_features"),
        ):
            reader = TopicReader(self.settings, topic, 6)
            try:
                ends = high_watermarks(self.settings, topic)  # outputs of every process so far
                assert sum(ends.values()) >= stats[want]
                wait_for(lambda r=reader, n=sum(ends.values()): len(r.poll()) >= n, 30, f"all of {topic}")
                by_id: dict[str, dict] = {}
                for msg in reader.records:
                    event = decoder.decode(msg.value())
                    assert event["event_id"] not in by_id, f"{event['event_id']} published twice on {topic}"
                    by_id[event["event_id"]] = event
                out.append(by_id)
            finally:
                reader.close()
        return out[0], out[1]


def read_source(settings: Settings, topic: str) -> list[ref.Row]:
    """What the source topic holds, in offset order per partition, as reference rows."""
    decoder = registry_for(settings.registry_url).decoder()
    reader = TopicReader(settings, topic, 6)
    try:
        end = sum(high_watermarks(settings, topic).values())
        wait_for(lambda: len(reader.poll()) >= end, 30, f"all of {topic}")
        records = reader.records
        rows = []
        for msg in records:
            headers = msg.headers() or []
            if is_control(headers):
                rows.append(ref.Row(msg.partition(), msg.offset(), watermark_of(headers) or -1, control=True))
            else:
                e = decoder.decode(msg.value())
                rows.append(
                    ref.Row(msg.partition(), msg.offset(), e["occurred_at"], e["user_id"], e["track_id"],
                            e["artist_id"], e["event_id"])
                )  # fmt: skip
        return rows
    finally:
        reader.close()


def send_marks(settings: Settings, topic: str, mark: int) -> None:
    producer = Producer(settings.producer_conf())
    for p in range(6):
        producer.produce(topic, value=b"", partition=p, headers=watermark_headers(mark))
    assert producer.flush(10) == 0


@pytest.fixture
def setups(stack: Settings, unique: Callable[[str], str], tmp_path: Path) -> Iterator[list[Setup]]:
    made: list[Setup] = []
    yield made
    for setup in made:
        setup.worker.kill()
        if setup.worker.log.exists():
            print("".join(setup.worker.log.read_text(errors="replace").splitlines(True)[-30:]))


def synthetic_listens(seed: int, n: int, t0: int) -> list[dict[str, Any]]:
    """Listens of 30 users over ~8 h; 6% arrive up to 8 min late (inside the 10 min grace
    period), 4% 15-50 min late (mostly beyond it)."""
    rng = random.Random(seed)
    clock = t0
    out = []
    for k in range(n):
        clock += rng.randrange(0, 40_000)
        t = clock
        roll = rng.random()
        if roll < 0.06:
            t -= rng.randrange(MIN, 8 * MIN)
        elif roll < 0.10:
            t -= rng.randrange(15 * MIN, 50 * MIN)
        track = f"t{min(int(rng.expovariate(0.12)), 49)}"
        out.append(
            {"event_id": f"s{seed}-{k}", "user_id": f"user{rng.randrange(30)}", "track_id": track,
             "artist_id": f"a{int(track[1:]) % 11}", "occurred_at": t, "source": "tests", "ms_played": 1000}
        )  # fmt: skip
    return out


def test_windowed_counts_equal_a_group_by_with_late_listens(
    stack: Settings, unique: Callable[[str], str], tmp_path: Path, setups: list[Setup]
) -> None:
    name = unique("feat")
    setup = Setup(stack, name, f"{name}.listens", tmp_path / "worker.log")
    setups.append(setup)
    listens = synthetic_listens(7, 1200, 1_700_000_000_000)
    listens += listens[100:130]  # re-sent duplicates (same ids and times)
    producer = EventProducer(stack)
    producer.send_many(
        setup.source, "ListenRecorded", listens, key_field="user_id", time_field="occurred_at", source="/tests"
    )
    producer.flush()  # the listens before the watermarks
    mark = max(r["occurred_at"] for r in listens) + END_OF_INPUT_MS
    send_marks(stack, setup.source, mark)
    setup.worker.start()
    stats = setup.wait_done(mark, len(listens))
    users, tracks = setup.outputs(stats)
    scraped = setup.worker.metrics()  # the worker's /metrics agree with its stats line
    uf, tf = (("component", "agent:user-features"),), (("component", "agent:track-features"),)
    assert scraped[("backbeat_records_in_total", (*uf, ("topic", setup.source)))] == stats["records_in"]
    assert scraped[("backbeat_state_entries", uf)] > 0  # artist affinities stay after the windows close
    assert ("backbeat_state_entries", tf) in scraped

    rows = read_source(stack, setup.source)
    con = ref.connect(rows)
    grace = setup.features.grace_ms
    late_in, late_out = con.execute(
        f"""SELECT count(*) FILTER (WHERE w_before > t AND w_before < t - t % 300000 + 300000 + {grace}),
                   count(*) FILTER (WHERE w_before >= t - t % 300000 + 300000 + {grace})
            FROM (SELECT *, max(t) OVER (PARTITION BY "partition" ORDER BY "offset"
                  ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING) AS w_before FROM src WHERE 1=1)
            WHERE NOT control"""
    ).fetchone()
    assert late_in > 20 and late_out > 10, (
        "the input must hold late listens inside and beyond the grace period"
    )
    assert stats["windows"]["1h/5m"]["late"] == late_out
    for spec in setup.features.user_windows:
        truth = ref.user_windows(con, spec, GAP)
        got = {
            (e["user_id"], e["window_start"]): (
                e["plays"], e["distinct_artists"], e["distinct_tracks"], e["sessions"], e["session_ms_max"]
            )
            for e in users.values()
            if e["window_size_ms"] == spec.size_ms
        }  # fmt: skip
        assert got == truth, spec.name
    spec = setup.features.user_windows[0]
    truth_tracks = ref.track_windows(con, spec, setup.features.baseline_windows)
    got_tracks = {(e["track_id"], e["window_start"]): (e["plays"], e["listeners"]) for e in tracks.values()}
    assert got_tracks == {k: (p, n) for k, (p, n, _) in truth_tracks.items()}

    proc = setup.worker.proc
    assert proc is not None
    setup.worker.kill(signal.SIGTERM)  # a clean stop: every agent ends its stream, exit 0
    assert proc.returncode == 0
    assert "Crashed" not in setup.worker.log.read_text(errors="replace")


def thirty_music_slice(n: int) -> list[dict[str, Any]]:
    records, _ = dedupe_and_order(parse_listens_file(LISTENS_30MUSIC, "30music").records, "occurred_at")
    return [without_line(r) for r in records[:n]]


def test_killed_and_restarted_worker_emits_the_values_of_an_uninterrupted_run(
    stack: Settings, unique: Callable[[str], str], tmp_path: Path, setups: list[Setup]
) -> None:
    source = unique("feat-src")
    listens = thirty_music_slice(12_000)
    clean = Setup(stack, unique("feat-clean"), source, tmp_path / "clean.log", **MIN_PLAYS)
    setups.append(clean)
    producer = EventProducer(stack)
    producer.send_many(
        source, "ListenRecorded", listens, key_field="user_id", time_field="occurred_at", source="/tests"
    )
    producer.flush()  # the listens before the watermarks
    mark = max(r["occurred_at"] for r in listens) + END_OF_INPUT_MS
    send_marks(stack, source, mark)
    clean.worker.start()
    clean_users, clean_tracks = clean.outputs(clean.wait_done(mark, len(listens)))
    clean.worker.kill()

    crashed = Setup(
        stack, unique("feat-crash"), source, tmp_path / "crashed.log",
        BACKBEAT_INGEST_BATCH="300", BACKBEAT_INGEST_BATCH_WITHIN_S="0.01", **MIN_PLAYS, **SLOW_FETCH,
    )  # fmt: skip
    setups.append(crashed)
    crashed.worker.start()
    kills = 0
    for share in (0.3, 0.6):  # SIGKILL twice mid-stream, with outputs already out
        wait_for(
            lambda share=share: ((s := crashed.worker.last_stats("features")) is not None
                                 and s["records_in"] >= share * len(listens) and s["user_features"] > 0),
            120, f"{share:.0%} of the listens in",
        )  # fmt: skip
        crashed.worker.kill()
        kills += 1
        crashed.worker.start()
    users, tracks = crashed.outputs(crashed.wait_done(mark))
    assert kills == 2
    assert len(clean_users) > 10_000 and len(clean_tracks) > 100
    assert users == clean_users
    assert tracks == clean_tracks
