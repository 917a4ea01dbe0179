"""Integration tests of the ``recommendations`` read model over the real broker and registry,
on a slice of the real 30Music file: pair weights, plays and lists equal the offline evaluation's
``item-to-item`` model trained on the same sessions, a restart mid-way gives the same tables, lists
follow the experiment, events are emitted once per user / list, a version-1 file is refused.

One module-scoped run feeds most tests (two read models of the same topic: ``a`` stopped after a
few batches and restarted, ``b`` in one go); each test checks one property of it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import subprocess
import sys
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import duckdb
import pytest

from events.catalog import TopicSpec, topic
from events.console_io import consume
from events.importers.base import dedupe_and_order
from events.importers.listens import parse_30music
from events.importers.run import import_catalog, import_listens
from events.producer import EventProducer
from infra.errors import ConfigError, OffsetMismatchError
from infra.provision import apply_topics
from infra.resources import open_data
from infra.settings import REPO_ROOT, Settings
from personalisation.experiments import MADE_FOR_YOU, Experiment, Variant, assign, assignment_event_id
from personalisation.session_model import SessionModel
from personalisation.streaming import assemble
from projections.decoding import Prepared
from projections.experiment_readout import readout
from projections.readmodels import TRACKS, to_table
from projections.recommendations import (
    AFFINITY_TABLE,
    ASSIGNMENTS_TABLE,
    CONTEXT_TABLE,
    EXPERIMENTS_TOPIC,
    PAIRS_TABLE,
    PLAYS_TABLE,
    RECOMMENDATIONS,
    RECOMMENDATIONS_TOPIC,
    SEEN_TABLE,
    TRANSITIONS_TABLE,
    RecommendationsWriter,
    load_model,
)
from projections.runner import ProjectionRunner, RunStats, run_projections
from projections.sql import query
from projections.tracking import LogIdentity, ensure_tables, reset
from tests.conftest import CATALOG, LISTENS_30MUSIC

pytestmark = pytest.mark.integration

#: Data rows of the real file in the slice (first rows of the file, any user).
SLICE_ROWS = 6000
GAP_MS = 30 * 60 * 1000
STATE = (
    PAIRS_TABLE,
    PLAYS_TABLE,
    TRANSITIONS_TABLE,
    AFFINITY_TABLE,
    CONTEXT_TABLE,
    ASSIGNMENTS_TABLE,
    SEEN_TABLE,
)
LIST_COLUMNS = (
    'user_id, "rank", track_id, score, source, model, experiment_id, experiment_version, variant, '
    "generated_at, list_id"
)


def name(prefix: str) -> str:
    return f"{prefix}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def rows(settings: Settings, sql: str) -> list[tuple]:
    return query(settings, sql, max_rows=None).rows


def dump(settings: Settings, table: str) -> list[tuple]:
    return rows(settings, f"SELECT * FROM {table} ORDER BY ALL")


@dataclass
class Store:
    """One read model: its settings (data dir) and the topics its events go to."""

    settings: Settings
    experiments: str
    lists: str

    def writer(self) -> RecommendationsWriter:
        return RecommendationsWriter(
            self.settings, experiments_topic=self.experiments, recommendations_topic=self.lists
        )

    def runner(self, topic: str, **kwargs: object) -> ProjectionRunner:
        return ProjectionRunner(
            self.settings, [RECOMMENDATIONS.on_topic(topic)], write=self.writer(), **kwargs
        )


@dataclass
class World:
    topic: str
    records: list[dict]  # the slice as produced (import order)
    tail: list[dict]  # one more listen per user, a day after the slice
    a: Store
    b: Store
    a_runs: list[RunStats]
    b_runs: list[RunStats]

    @property
    def listens(self) -> list[tuple[str, str, int, str]]:
        return [listen(r) for r in self.records + self.tail]


def store(stack: Settings, data_dir: Path) -> Store:
    s = Store(dataclasses.replace(stack, data_dir=data_dir), name("rec.exp"), name("rec.lists"))
    apply_topics(stack, [TopicSpec(s.experiments, 3), TopicSpec(s.lists, 3)])
    return s


@pytest.fixture(scope="module")
def world(stack: Settings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    tmp = tmp_path_factory.mktemp("recs")
    with open_data(LISTENS_30MUSIC) as f:
        lines = [line for _, line in zip(range(SLICE_ROWS + 1), f, strict=False)]
    (tmp / "slice.tsv").write_bytes(b"".join(lines))
    records, _ = dedupe_and_order(parse_30music(lines).records, "occurred_at")
    records = [{k: v for k, v in r.items() if k != "_line"} for r in records]
    topic = name("rec.listens")
    apply_topics(stack, [TopicSpec(topic, 3)])
    # the importer also sends a watermark control record to every partition: it must be skipped
    assert import_listens(stack, tmp / "slice.tsv", "30music", topic=topic).produced == len(records)

    a, b = store(stack, tmp / "a"), store(stack, tmp / "b")
    runner = a.runner(topic, batch_size=700)
    runner.progress = lambda p: runner.stop() if p.stats.batches >= 3 else None
    a_runs = [runner.run(until_caught_up=True)]  # stopped mid-way
    a_runs.append(a.runner(topic, batch_size=700).run(until_caught_up=True))  # restarted
    b_runs = [b.runner(topic, batch_size=5000).run(until_caught_up=True)]

    # a tail: one more listen per user, a day later, read by both in one batch, so that every list
    # is recomputed from the same final counts (lists depend on where batches end)
    end = max(r["occurred_at"] for r in records)
    users = sorted({r["user_id"] for r in records})
    first = {}
    for r in records:
        first.setdefault(r["user_id"], r)
    tail = [
        dict(first[u], event_id=f"tail-{u}", occurred_at=end + 86_400_000 + i, session_hint=None)
        for i, u in enumerate(users)
    ]
    producer = EventProducer(stack)
    producer.send_many(
        topic, "ListenRecorded", tail, key_field="user_id", time_field="occurred_at", source="/t"
    )
    producer.flush()
    a_runs.append(a.runner(topic, batch_size=50_000, linger_s=2).run(until_caught_up=True))
    b_runs.append(b.runner(topic, batch_size=50_000, linger_s=2).run(until_caught_up=True))
    yield World(topic, records, tail, a, b, a_runs, b_runs)


def reference(listens: list[tuple[str, str, int, str]]) -> SessionModel:
    """The batch-free reference: the streaming model fed every listen one by one, each user's in
    the order produced (the order of their partition)."""
    model = SessionModel()
    model.observe_all(listens)
    return model


def listen(r: dict) -> tuple[str, str, int, str]:
    """``(user, track, time ms, artist)`` of a ListenRecorded record, as the model observes it."""
    return r["user_id"], r["track_id"], r["occurred_at"], r["artist_id"]


def state_of(model: SessionModel) -> dict[str, set[tuple]]:
    """The model's state as the rows the state tables should hold."""
    pairs = {(a, b) for a, row in model.rules.items() for b in row} | {
        (a, b) for a, row in model.near.items() for b in row
    }
    return {
        PAIRS_TABLE: {
            (a, b, model.rules.get(a, {}).get(b, 0), model.near.get(a, {}).get(b, 0)) for a, b in pairs
        },
        PLAYS_TABLE: {(t, a, model.plays.get(t, 0)) for t, a in model.artist_of.items()},
        AFFINITY_TABLE: {(u, a, v) for u, row in model.affinity.items() for a, v in row.items()},
        TRANSITIONS_TABLE: {
            (u, a, b, n)
            for u, rows_ in model.transitions.items()
            for a, row in rows_.items()
            for b, n in row.items()
        },
        CONTEXT_TABLE: {
            (u, s.first_ms, s.last_ms, tuple(s.plays), s.listens, s.sessions, model.affinity_ref[u])
            for u, s in model.open.items()
        },
    }


def stored_state(settings: Settings) -> dict[str, set[tuple]]:
    return {
        PAIRS_TABLE: set(
            rows(settings, f"SELECT track_a, track_b, rule_weight, near_weight FROM {PAIRS_TABLE}")
        ),
        PLAYS_TABLE: set(rows(settings, f"SELECT track_id, artist_id, plays FROM {PLAYS_TABLE}")),
        AFFINITY_TABLE: set(rows(settings, f"SELECT * FROM {AFFINITY_TABLE}")),
        TRANSITIONS_TABLE: set(rows(settings, f"SELECT * FROM {TRANSITIONS_TABLE}")),
        CONTEXT_TABLE: {
            (u, f, la, tuple(t), n, k, ref)
            for u, f, la, t, n, k, ref in rows(
                settings,
                "SELECT user_id, epoch_ms(first_at), epoch_ms(last_at), session_tracks, listens, sessions, "
                f"epoch_ms(affinity_ref_at) FROM {CONTEXT_TABLE}",
            )
        },
    }


def test_every_listen_applied_once_and_the_restart_happened(world: World):
    first, second, tail = world.a_runs
    assert 3 <= first.batches and first.applied < len(world.records)  # really stopped mid-way
    assert first.applied + second.applied == len(world.records)
    assert tail.batches == 1 and tail.applied == len(world.tail)
    assert world.b_runs[0].applied == len(world.records) and world.b_runs[0].controls == 3
    assert sum(r.duplicates + r.redelivered + r.rejects for r in world.a_runs + world.b_runs) == 0


def test_state_tables_equal_the_model_fed_every_listen_one_by_one(world: World):
    expected = state_of(reference(world.listens))
    types = dict(rows(world.a.settings, f"SELECT column_name, data_type FROM duckdb_columns() "
                                        f"WHERE table_name = '{PAIRS_TABLE}'"))  # fmt: skip
    assert types == {
        "track_a": "VARCHAR",
        "track_b": "VARCHAR",
        "rule_weight": "BIGINT",
        "near_weight": "BIGINT",
    }
    got = stored_state(world.a.settings)
    assert len(expected[PAIRS_TABLE]) > 5000 and len(expected[TRANSITIONS_TABLE]) > 1000
    for table in expected:
        assert got[table] == expected[table], table
    assert sum(n for *_, n in got[PLAYS_TABLE]) < len(world.listens)  # replays were collapsed


def test_restart_mid_way_gives_the_same_tables(world: World):
    for table in STATE:
        assert dump(world.a.settings, table) == dump(world.b.settings, table), table
    sql = f"SELECT {LIST_COLUMNS} FROM recommendations ORDER BY user_id, rank"
    assert rows(world.a.settings, sql) == rows(world.b.settings, sql)


def test_user_contexts_resume_exactly(world: World):
    got = rows(world.a.settings, f"SELECT user_id, listens, sessions FROM {CONTEXT_TABLE}")
    per_user = Counter(u for u, *_ in world.listens)
    assert {u: n for u, n, _ in got} == dict(per_user)
    assert all(sessions >= 2 for *_, sessions in got)  # the tail opened a new session for everyone


def test_final_lists_are_made_as_of_each_users_listen(world: World):
    """The tail batch holds one listen per user, a day later, one ms apart in user order: each
    user's list must come from the model right after that user's listen — with the tail listens
    of the users before, without those after (the leakage rule) — and the assigned variant."""
    model = reference([listen(r) for r in world.records])
    expected: dict[str, list] = {}
    for r in sorted(world.tail, key=lambda r: r["occurred_at"]):
        user = r["user_id"]
        model.observe(*listen(r))
        popular = model.popular(20 + model.rule_steps)
        variant = assign(user, MADE_FOR_YOU).variant
        session = model.session(user)
        primary = model.recommend(user, session, 20, exclude=session) if variant == "streaming" else []
        expected[user] = [(variant, i) for i in assemble(primary, popular, 20, exclude=session)]
    got: dict[str, list[tuple]] = {}
    for user, rank, track, score, source, variant, exp, at in rows(
        world.a.settings,
        'SELECT user_id, "rank", track_id, score, source, variant, experiment_id, epoch_ms(generated_at) '
        'FROM recommendations ORDER BY user_id, "rank"',
    ):
        assert exp == "made-for-you-v1"
        assert at == next(r["occurred_at"] for r in world.tail if r["user_id"] == user)
        got.setdefault(user, []).append((rank, track, score, source, variant))
    assert set(got) == set(expected)
    for user, items in expected.items():
        assert [(r, t, src, v) for r, t, _, src, v in got[user]] == [
            (k, i.track_id, i.source, v) for k, (v, i) in enumerate(items, start=1)
        ], user
        assert [s for _, _, s, _, _ in got[user]] == pytest.approx([i.score for _, i in items], rel=1e-12)
    variants = Counter(v for items in expected.values() for v, _ in items[:1])
    assert min(variants.values()) > 0.3 * len(expected)  # both arms are served
    sources = Counter(src for lst in got.values() for _, _, _, src, _ in lst)
    assert sources["cooccurrence"] > 0 and sources["popular"] > 0


def test_no_list_depends_on_a_later_listen_whatever_the_batches(world: World, stack, tmp_path):
    """The leakage test on the read model. One partition, so offset order is event-time order:
    every list in ``recommendation_history``, built with batches of 150 and of 1,000, must equal the
    list of a reference model fed ONLY the listens up to the one the list is for."""
    records = world.records[:2500]
    single = name("rec.one")
    apply_topics(stack, [TopicSpec(single, 1)])
    producer = EventProducer(stack)
    producer.send_many(
        single, "ListenRecorded", records, key_field="user_id", time_field="occurred_at", source="/t"
    )
    producer.flush()
    model = SessionModel()
    candidates: dict[tuple[str, int], list[list[tuple[str, str]]]] = {}
    for r in records:
        user, t = r["user_id"], r["occurred_at"]
        model.observe(*listen(r))
        session = model.session(user)
        variant = assign(user, MADE_FOR_YOU).variant
        primary = model.recommend(user, session, 20, exclude=session) if variant == "streaming" else []
        items = assemble(primary, model.popular(30), 20, exclude=session)
        candidates.setdefault((user, t), []).append([(i.track_id, i.source) for i in items])
    for size in (150, 1000):
        s = store(stack, tmp_path / str(size))
        s.runner(single, batch_size=size).run(until_caught_up=True)
        lists = rows(
            s.settings,
            "SELECT user_id, epoch_ms(generated_at), list(track_id ORDER BY rank), list(source ORDER BY rank) "
            "FROM recommendation_history GROUP BY list_id, user_id, generated_at",
        )
        assert len(lists) > len({r["user_id"] for r in records})  # users have several lists
        for user, at, tracks, sources in lists:
            assert list(zip(tracks, sources, strict=True)) in candidates[(user, at)], (size, user, at)


def test_experiment_assigned_once_per_user_with_the_documented_variant(world: World):
    events = [r["value"] for r in consume(world.a.settings, world.a.experiments)]
    users = {r["user_id"] for r in world.records}
    assert len(events) == len({e["event_id"] for e in events}) == len(users)  # clean stops: no repeats
    for e in events:
        a = assign(e["user_id"], MADE_FOR_YOU)
        assert (e["variant"], e["bucket"], e["experiment_version"]) == (
            a.variant,
            a.bucket,
            MADE_FOR_YOU.version,
        )
        assert e["event_id"] == assignment_event_id(e["user_id"], MADE_FOR_YOU)
    stored = dict(rows(world.a.settings, f"SELECT user_id, variant FROM {ASSIGNMENTS_TABLE}"))
    assert stored == {e["user_id"]: e["variant"] for e in events}


def test_recommendations_generated_events_match_the_history(world: World):
    events = [r["value"] for r in consume(world.a.settings, world.a.lists)]
    history = rows(
        world.a.settings,
        "SELECT list_id, user_id, variant, model, epoch_ms(generated_at), list(track_id ORDER BY rank) "
        "FROM recommendation_history GROUP BY ALL",
    )
    assert len(events) == len({e["event_id"] for e in events}) == len(history) > len(world.tail)
    by_id = {e["event_id"]: e for e in events}
    for lid, user, variant, model, generated_ms, tracks in history:
        e = by_id[lid]
        assert (e["user_id"], e["variant"], e["model"], e["occurred_at"]) == (
            user,
            variant,
            model,
            generated_ms,
        )
        assert [i["track_id"] for i in e["items"]] == tracks
        assert [i["rank"] for i in e["items"]] == list(range(1, len(tracks) + 1))
    current = set(rows(world.a.settings, "SELECT DISTINCT list_id FROM recommendations"))
    assert {(lid,) for lid, *_ in history} >= current


def test_reset_rebuilds_the_same_tables(world: World):
    before = {t: dump(world.b.settings, t) for t in (*STATE, "recommendations")}
    reset(world.b.settings, ["recommendations"])
    assert rows(world.b.settings, f"SELECT count(*) FROM {PAIRS_TABLE}")[0][0] > 0  # still there
    world.b.runner(world.topic, batch_size=50_000, linger_s=2).run(until_caught_up=True)
    for table in STATE:
        assert dump(world.b.settings, table) == before[table], table
    sql = f"SELECT {LIST_COLUMNS} FROM recommendations ORDER BY ALL"
    strip = [r[:-1] for r in before["recommendations"]]  # drop computed_at (wall clock)
    assert rows(world.b.settings, sql) == strip


def test_an_older_version_file_is_refused_and_reset_rebuilds_the_new_layout(world: World, stack, tmp_path):
    # a file written by version 1 of this read model: integer pair counts in item_pairs."count"
    s = store(stack, tmp_path / "old")
    s.settings.duckdb_path.parent.mkdir(parents=True)
    with duckdb.connect(str(s.settings.duckdb_path)) as conn:
        ensure_tables(conn, dataclasses.replace(RECOMMENDATIONS.on_topic(world.topic), version=1))
        conn.execute(
            f'CREATE TABLE {PAIRS_TABLE} (track_a VARCHAR NOT NULL, track_b VARCHAR NOT NULL, "count" BIGINT '
            "NOT NULL, PRIMARY KEY (track_a, track_b))"
        )
        conn.execute(f"INSERT INTO {PAIRS_TABLE} VALUES ('x', 'y', 7)")
    assert RECOMMENDATIONS.version == 3
    with pytest.raises(OffsetMismatchError, match="built by version 1") as refused:
        s.runner(world.topic).run(until_caught_up=True)
    assert "backbeat projections reset recommendations" in str(refused.value)
    reset(s.settings, ["recommendations"])
    s.runner(world.topic, batch_size=50_000, linger_s=2).run(until_caught_up=True)
    columns = rows(s.settings, f"SELECT column_name FROM duckdb_columns() WHERE table_name = '{PAIRS_TABLE}'")
    assert [c for (c,) in columns] == ["track_a", "track_b", "rule_weight", "near_weight"]
    for table in STATE:  # the same data as the other read models, nothing of the old file left
        assert dump(s.settings, table) == dump(world.a.settings, table), table


def test_reimport_changes_nothing(world: World, tmp_path: Path):
    # the same events again at new offsets (a re-import): recognised by event id, nothing changes
    before = {t: dump(world.a.settings, t) for t in STATE}
    producer = EventProducer(world.a.settings)
    producer.send_many(
        world.topic,
        "ListenRecorded",
        world.records[:500],
        key_field="user_id",
        time_field="occurred_at",
        source="/t",
    )
    producer.flush()
    stats = world.a.runner(world.topic).run(until_caught_up=True)
    assert (stats.applied, stats.duplicates) == (0, 500)
    for table in STATE:
        assert dump(world.a.settings, table) == before[table], table


def catalog_name(artist_id: str, track_id: str, catalog: list[tuple[str, str, str]]) -> tuple[str, str]:
    """The documented md5 mapping, written out in Python (projections.names does it in SQL)."""
    artists = sorted({a for _, _, a in catalog})
    artist = artists[int(hashlib.md5(artist_id.encode()).hexdigest()[:12], 16) % len(artists)]
    tracks = sorted((tid, n) for tid, n, a in catalog if a == artist)
    return tracks[int(hashlib.md5(track_id.encode()).hexdigest()[:12], 16) % len(tracks)][1], artist


def test_backbeat_project_runs_it_beside_listens_and_variants_compare_in_sql(world: World, stack, tmp_path):
    settings = dataclasses.replace(stack, data_dir=tmp_path)
    apply_topics(stack, [topic(EXPERIMENTS_TOPIC), topic(RECOMMENDATIONS_TOPIC)])
    stats = run_projections(
        settings,
        ["listens", "recommendations"],
        topics={"listens": world.topic, "recommendations": world.topic},
        until_caught_up=True,
        batch_size=1500,
    )
    n = len(world.records) + len(world.tail)
    assert stats.per_projection == {"listens": n, "recommendations": n}
    got = {
        r[1]: r
        for r in rows(
            settings,
            "SELECT experiment_id, variant, count(DISTINCT user_id), count(DISTINCT list_id), count(*), "
            "count(*) FILTER (WHERE played_so_far) FROM experiment_exposures GROUP BY ALL",
        )
    }
    assert set(got) == {"control", "streaming"}
    # the same numbers computed here from the two tables
    listens = rows(settings, "SELECT user_id, track_id, occurred_at FROM listens")
    played_at: dict[tuple[str, str], list] = {}
    for user, track, at in listens:
        played_at.setdefault((user, track), []).append(at)
    week = timedelta(days=7)
    expected: dict[str, list[int]] = {}
    for variant, user, track, at in rows(
        settings, "SELECT variant, user_id, track_id, generated_at FROM recommendation_history"
    ):
        e = expected.setdefault(variant, [0, 0])
        e[0] += 1
        e[1] += any(at < t <= at + week for t in played_at.get((user, track), []))
    for variant, (recommended, played) in expected.items():
        assert got[variant][4:6] == (recommended, played), variant
    assert sum(p for _, p in expected.values()) > 0  # some recommendations were played later
    per_user = {
        r[0]: r
        for r in rows(settings, "SELECT variant, users, mean_user_play_through FROM experiment_readout_of(1)")
    }
    assert set(per_user) == {"control", "streaming"} and all(0 <= r[2] <= 1 for r in per_user.values())


def _backbeat(args: list[str], settings: Settings) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, **settings.to_env(), "COLUMNS": "200"}
    return subprocess.run(
        [sys.executable, "-m", "infra.cli", *args], env=env, capture_output=True, text=True, timeout=120
    )


def test_recommend_cli_prints_names_scores_and_variant(world: World, stack):
    settings = world.a.settings
    catalog_topic = name("rec.catalog")
    apply_topics(stack, [TopicSpec(catalog_topic, 1)])
    import_catalog(stack, CATALOG, topic=catalog_topic)
    ProjectionRunner(settings, [TRACKS.on_topic(catalog_topic)]).run(until_caught_up=True)
    catalog = rows(settings, "SELECT track_id, name, artist FROM tracks")
    artists = dict(rows(settings, f"SELECT track_id, artist_id FROM {PLAYS_TABLE}"))
    users = sorted({r["user_id"] for r in world.records})
    user = next(u for u in users if assign(u, MADE_FOR_YOU).variant == "streaming")

    result = _backbeat(["recommend", user, "--json", "--n", "7"], settings)
    assert result.returncode == 0, result.stderr
    doc = json.loads(result.stdout)
    assert (doc["user_id"], doc["experiment_id"], doc["variant"], doc["model"]) == (
        user, "made-for-you-v1", "streaming", "session-seq-cooc-v3",
    )  # fmt: skip
    table = rows(
        settings, f"SELECT track_id, score FROM recommendations WHERE user_id = '{user}' ORDER BY rank"
    )
    assert [(i["track_id"], i["score"]) for i in doc["items"]] == table[:7]
    for item in doc["items"]:
        assert (item["track"], item["artist"]) == catalog_name(
            artists[item["track_id"]], item["track_id"], catalog
        )

    human = _backbeat(["recommend", user, "--n", "3"], settings)
    assert human.returncode == 0, human.stderr
    lines = human.stdout.splitlines()
    assert f"user {user}: made-for-you-v1 / streaming" in human.stdout
    first = doc["items"][0]
    row = next(line for line in lines if line.startswith("│") and first["track_id"] in line)
    assert first["track"] in row and first["artist"] in row and "streaming" in row
    assert f"{first['score']:.4g}" in row
    assert sum(line.startswith("│") for line in lines) == 3

    unknown = _backbeat(["recommend", "no-such-user"], settings)
    assert unknown.returncode == 1 and "Traceback" not in unknown.stderr
    assert "unknown user 'no-such-user'" in unknown.stderr and users[0] in unknown.stderr


def test_recommend_cli_before_the_read_model_says_what_to_run(stack, tmp_path):
    empty = dataclasses.replace(stack, data_dir=tmp_path / "none")
    result = _backbeat(["recommend", "42"], empty)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "backbeat project" in result.stderr
    other = dataclasses.replace(stack, data_dir=tmp_path / "other")
    other.data_dir.mkdir()
    duckdb.connect(str(other.duckdb_path)).close()  # read models exist, but not this one
    result = _backbeat(["recommend", "42"], other)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "no recommendations read model" in result.stderr
    assert "backbeat import listens" in result.stderr and "backbeat project" in result.stderr


def batch(records: list[dict], first_offset: int, topic_name: str) -> Prepared:
    """A prepared batch of ``records`` on partition 0 from ``first_offset`` (what the runner
    hands to a writer), built without Kafka: the writer only sees Arrow rows and offsets."""
    offsets = list(range(first_offset, first_offset + len(records)))
    table = to_table(RECOMMENDATIONS, records, [0] * len(records), offsets)
    return Prepared(
        tables={RECOMMENDATIONS.name: table}, ends={(topic_name, 0): offsets[-1] + 1}, records=len(records)
    )


def test_writer_redelivered_batch_applies_once_and_failed_batch_leaves_nothing(world: World, stack, tmp_path):
    proj = RECOMMENDATIONS.on_topic("rec.unit")
    identity = LogIdentity("cluster-x", {"rec.unit": "topic-x"})
    first, second = batch(world.records[:600], 0, proj.topic), batch(world.records[600:1200], 600, proj.topic)
    tables = (*STATE, "recommendation_history")

    def open_store(path: Path) -> tuple[Store, duckdb.DuckDBPyConnection]:
        s = store(stack, path)
        conn = duckdb.connect(str(s.settings.duckdb_path))
        ensure_tables(conn, proj)
        for statement in proj.extra_ddl:
            conn.execute(statement)
        return s, conn

    def snapshot(conn: duckdb.DuckDBPyConnection) -> dict[str, list[tuple]]:
        out = {t: conn.execute(f"SELECT * EXCLUDE (computed_at) FROM {t} ORDER BY ALL").fetchall()
               for t in ("recommendations", "recommendation_history")}  # fmt: skip
        out |= {t: conn.execute(f"SELECT * FROM {t} ORDER BY ALL").fetchall() for t in STATE}
        return out

    (tmp_path / "x").mkdir()
    s, conn = open_store(tmp_path / "x")
    w = s.writer()
    done = w(conn, tmp_path, {proj.topic: proj}, first, identity)
    assert done.applied == {"recommendations": 600}
    after_first = snapshot(conn)
    again = w(conn, tmp_path, {proj.topic: proj}, first, identity)  # redelivered: below the offsets
    assert (again.applied, again.redelivered) == ({}, 600)
    assert snapshot(conn) == after_first

    conn.execute(
        "ALTER TABLE recommendation_history ADD COLUMN broken INTEGER"
    )  # the batch's last write fails
    with pytest.raises(duckdb.Error):
        w(conn, tmp_path, {proj.topic: proj}, second, identity)
    conn.execute("ALTER TABLE recommendation_history DROP COLUMN broken")
    assert snapshot(conn) == after_first  # rolled back, offsets included
    assert w(conn, tmp_path, {proj.topic: proj}, second, identity).applied == {"recommendations": 600}
    retried = snapshot(conn)
    conn.close()

    (tmp_path / "y").mkdir()
    s2, clean = open_store(tmp_path / "y")
    w2 = s2.writer()
    for b in (first, second):
        w2(clean, tmp_path, {proj.topic: proj}, b, identity)
    # the failed attempt left no trace in the tables nor in the in-memory model (lists, scores)
    assert snapshot(clean) == retried and len(retried["recommendations"]) > 0
    assert all(retried[t] for t in tables)
    clean.close()


def test_in_memory_model_equals_the_tables_after_many_small_batches(world: World, stack, tmp_path):
    # many small batches touch the same rows again and again: the rows rewritten must hold the
    # model's current values, so a restart (load_model) resumes exactly the model in memory
    proj = RECOMMENDATIONS.on_topic("rec.small")
    identity = LogIdentity("cluster-x", {"rec.small": "topic-x"})
    s = store(stack, tmp_path)
    conn = duckdb.connect(str(s.settings.duckdb_path))
    ensure_tables(conn, proj)
    for statement in proj.extra_ddl:
        conn.execute(statement)
    w = s.writer()
    records = world.records[:2000]
    for start in range(0, len(records), 10):
        w(conn, tmp_path, {proj.topic: proj}, batch(records[start : start + 10], start, proj.topic), identity)
    stored = load_model(conn)
    conn.close()
    memory = w.model
    assert memory is not None and len(memory.rules) > 500
    assert state_of(stored) == state_of(memory)
    assert state_of(memory) == state_of(reference([listen(r) for r in records]))


def test_docs_page_shows_the_variant_sql_verbatim():
    doc = (REPO_ROOT / "docs" / "recommendations.md").read_text()
    assert "experiments.md" in doc  # the readout's SQL is shown and tested there


def test_writer_refuses_a_variant_it_cannot_serve(stack):
    odd = Experiment("odd", 1, (Variant("a", 10_000, "two-tower-v3"),))
    with pytest.raises(ConfigError, match="names model 'two-tower-v3'"):
        RecommendationsWriter(stack, experiment=odd)


def test_experiment_readout_reconciles_with_the_history_after_backbeat_project(world: World, stack, tmp_path):
    """After the real pipeline (listens + recommendations over the broker, as ``backbeat project``
    runs them), the readout's counts add up to ``recommendation_history``: every list is either
    in the readout or counted as immature, and the played counts equal a Python recount."""
    settings = dataclasses.replace(stack, data_dir=tmp_path)
    apply_topics(stack, [topic(EXPERIMENTS_TOPIC), topic(RECOMMENDATIONS_TOPIC)])
    run_projections(
        settings,
        ["listens", "recommendations"],
        topics={"listens": world.topic, "recommendations": world.topic},
        until_caught_up=True,
        batch_size=1000,
    )
    history = rows(
        settings, "SELECT variant, user_id, track_id, generated_at, list_id FROM recommendation_history"
    )
    listens = rows(settings, "SELECT user_id, track_id, occurred_at FROM listens")
    watermark = max(at for _, _, at in listens)
    played_at: dict[tuple[str, str], list] = {}
    for user, track, at in listens:
        played_at.setdefault((user, track), []).append(at)
    # the slice spans about 6 days: a 1-day window leaves both mature and immature lists
    for days in (1, 7):
        window = timedelta(days=days)
        got = {r.variant: r for r in readout(settings, MADE_FOR_YOU.experiment_id, days)}
        assert list(got) == ["control", "streaming"] and all(r.window_days == days for r in got.values())
        for variant, r in got.items():
            mine = [h for h in history if h[0] == variant]
            mature = [h for h in mine if h[3] + window <= watermark]
            assert r.lists + r.immature_lists == len({h[4] for h in mine})
            assert r.recommended + r.immature_recommended == len(mine)
            assert (r.recommended, r.users) == (len(mature), len({h[1] for h in mature}))
            played = sum(
                any(at < t <= at + window for t in played_at.get((u, tr), [])) for _, u, tr, at, _ in mature
            )
            assert r.played == played and r.watermark == watermark
        if days == 7:
            assert sum(r.users for r in got.values()) == 0  # nothing is 7 days old yet: no "not played"
        else:
            assert all(r.users > 0 and r.immature_lists > 0 for r in got.values())
            assert all(
                r.mean_ci is not None and r.mean_ci[0] <= r.mean_user_play_through <= r.mean_ci[1]
                for r in got.values()
            )
