"""The feature store over the real broker: UserFeaturesComputed / TrackFeaturesComputed events
produced with the registry's encoder (duplicates, re-emissions, windows out of order) → the
projection runner → DuckDB history tables, latest views, as-of macros, the ASOF JOIN training
query of the docs, and ``backbeat features`` as a user types it.

Expected values are computed here in Python from the events sent, not by the SQL under test.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
import uuid
from collections.abc import Iterable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import duckdb
import pytest

from events.catalog import TopicSpec
from events.producer import EventProducer
from infra.provision import apply_topics
from infra.settings import REPO_ROOT, Settings
from projections.feature_store import (
    USER_TABLE,
    NoFeatureStoreError,
    UnknownEntityError,
    read_features,
)
from projections.readmodels import LISTENS, TRACK_FEATURES, USER_FEATURES
from projections.runner import RunStats, run_projections
from projections.sql import query
from projections.store import writer
from projections.tracking import reset
from tests.conftest import env_for
from tests.projections.test_feature_store_unit import DAY, HOUR, MIN5, T0, at, track_event, user_event
from tests.projections.test_readmodels import listen

pytestmark = pytest.mark.integration

DOC = REPO_ROOT / "docs" / "feature-store.md"
NAMES = ("user_features", "track_features", "listens")

# u1: 1 h windows every 5 min from 08:00 to 09:00, sent in a shuffled order, plus 1 d windows
U1_HOURS = [T0 + k * MIN5 for k in (3, 0, 12, 1, 7, 2, 12, 4, 5, 11, 6, 8, 10, 9)]  # 12 twice
U1_DAYS = [T0 - DAY + HOUR, T0 - DAY + 2 * HOUR]
U2_HOURS = [T0 + HOUR, T0]
TRACK_STARTS = [T0 + k * MIN5 for k in (0, 2, 1, 2)]
LATE = T0 - MIN5  # a window older than all others, arriving in the second run


def _unique(prefix: str) -> str:
    return f"{prefix}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def _send(settings: Settings, topic: str, event_type: str, events: list[dict], key: str) -> None:
    producer = EventProducer(settings)  # encodes with Registry.encoder (registers the schema)
    producer.send_many(topic, event_type, events, key_field=key, time_field="occurred_at", source="/tests")
    producer.flush()


def _run(settings: Settings, topics: dict[str, str]) -> RunStats:
    return run_projections(settings, list(NAMES), until_caught_up=True, topics=topics)


@dataclasses.dataclass
class Store:
    settings: Settings
    topics: dict[str, str]
    users: list[dict[str, Any]]  # distinct user feature events (one per event_id)
    tracks: list[dict[str, Any]]
    first: RunStats
    second: RunStats


@pytest.fixture(scope="module")
def store(stack: Settings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Store]:
    settings = dataclasses.replace(stack, data_dir=tmp_path_factory.mktemp("feature-store"))
    topics = {name: _unique(f"fs.{name}") for name in NAMES}
    apply_topics(settings, [TopicSpec(t, 3) for t in topics.values()])
    users = [user_event("u1", s) for s in U1_HOURS]
    users += [user_event("u1", s, DAY) for s in U1_DAYS] + [user_event("u2", s) for s in U2_HOURS]
    tracks = [track_event("t1", s) for s in TRACK_STARTS] + [track_event("t2", T0)]
    listens = [
        listen(i, user_id="u1", artist_id=f"a{i}", occurred_at=T0 + HOUR + i * 60_000 + 1) for i in range(3)
    ]
    _send(settings, topics["user_features"], "UserFeaturesComputed", users, "user_id")
    _send(settings, topics["track_features"], "TrackFeaturesComputed", tracks, "track_id")
    _send(settings, topics["listens"], "ListenRecorded", listens, "user_id")
    first = _run(settings, topics)
    # after a "restart" the agents re-emit what they had sent (same ids and values) plus a late,
    # older window
    late = user_event("u1", LATE)
    _send(settings, topics["user_features"], "UserFeaturesComputed", users[:5] + [late], "user_id")
    second = _run(settings, topics)
    distinct_users = list({e["event_id"]: e for e in [*users, late]}.values())
    distinct_tracks = list({e["event_id"]: e for e in tracks}.values())
    yield Store(settings, topics, distinct_users, distinct_tracks, first, second)


def rows(store: Store, sql: str, params: list | None = None) -> list[tuple]:
    return query(store.settings, sql, params, max_rows=None).rows


def _key(e: dict[str, Any], entity: str) -> tuple:
    return (e[entity], e["feature_set"], e["window_size_ms"])


def expected_latest(events: Iterable[dict[str, Any]], entity: str) -> dict[tuple, str]:
    """{(entity, feature_set, size): event_id} of the greatest window_end, from the events."""
    best: dict[tuple, dict[str, Any]] = {}
    for e in events:
        k = _key(e, entity)
        if k not in best or e["window_end"] > best[k]["window_end"]:
            best[k] = e
    return {k: e["event_id"] for k, e in best.items()}


def expected_as_of(events: Iterable[dict[str, Any]], entity: str, ts_ms: int) -> dict[tuple, str]:
    return expected_latest([e for e in events if e["occurred_at"] <= ts_ms], entity)


# -- history -------------------------------------------------------------------------------------
def test_history_holds_each_value_once(store: Store):
    got = rows(store, "SELECT event_id, user_id, window_start, plays, top_artists FROM user_features")
    assert len(got) == len({r[0] for r in got}) == len(store.users) == 18
    want = {
        e["event_id"]: (e["user_id"], at(e["window_start"]), e["plays"], e["top_artists"])
        for e in store.users
    }
    assert {r[0]: r[1:] for r in got} == want
    # run one: 18 user events sent, one of them twice (and one track twice); run two: 5
    # re-emitted and 1 new (late) one
    assert (store.first.per_projection["user_features"], store.first.duplicates) == (17, 1 + 1)
    assert (store.second.applied, store.second.duplicates) == (1, 5)
    tracks = rows(store, "SELECT event_id, plays, trending_score FROM track_features")
    assert sorted(tracks) == sorted((e["event_id"], e["plays"], e["trending_score"]) for e in store.tracks)


def test_latest_views_pick_the_greatest_window_end(store: Store):
    got = rows(store, "SELECT user_id, feature_set, window_size_ms, event_id FROM user_features_latest")
    assert {(r[0], r[1], r[2]): r[3] for r in got} == expected_latest(store.users, "user_id")
    assert len(got) == 3  # u1 1 h, u1 1 d, u2 1 h: the late older window changed nothing
    u1 = rows(
        store, "SELECT window_end FROM user_features_latest WHERE user_id = 'u1' ORDER BY window_size_ms"
    )
    assert u1 == [(at(T0 + 12 * MIN5 + HOUR),), (at(T0 + 2 * HOUR),)]
    got = rows(store, "SELECT track_id, feature_set, window_size_ms, event_id FROM track_features_latest")
    assert {(r[0], r[1], r[2]): r[3] for r in got} == expected_latest(store.tracks, "track_id")


@pytest.mark.parametrize(
    "ts_ms",
    [
        T0,
        T0 + HOUR - 1,
        T0 + HOUR,
        T0 + HOUR + 1,
        T0 + HOUR + 7 * MIN5,
        T0 + HOUR + 7 * MIN5 - 1,
        T0 + 3 * HOUR,
    ],
)
def test_as_of_returns_exactly_the_values_known_then(store: Store, ts_ms: int):
    ts = at(ts_ms)
    got = rows(
        store,
        "SELECT user_id, feature_set, window_size_ms, event_id, occurred_at FROM user_features_as_of(?)",
        [ts],
    )
    assert {(r[0], r[1], r[2]): r[3] for r in got} == expected_as_of(store.users, "user_id", ts_ms)
    assert all(r[4] <= ts for r in got)  # no leakage
    tracks = rows(
        store, "SELECT track_id, feature_set, window_size_ms, event_id FROM track_features_as_of(?)", [ts]
    )
    assert {(r[0], r[1], r[2]): r[3] for r in tracks} == expected_as_of(store.tracks, "track_id", ts_ms)


def test_asof_join_training_query(store: Store):
    labels = [
        ("u1", T0 + HOUR + 2 * MIN5 + 30_000),  # 09:10:30: the window ending 09:10
        ("u1", T0 + 50 * 60_000),  # 08:50: before u1's first value (08:55): none
        ("u1", T0 + HOUR - 1),  # 08:59:59.999: the late window ending 08:55
        ("u2", T0 + 5 * HOUR),
        ("u3", T0 + HOUR),  # no such user: none
    ]
    values = ", ".join(f"('{u}', TIMESTAMP '{at(ms)}')" for u, ms in labels)
    got = rows(
        store,
        f"""WITH labels(user_id, ts) AS (VALUES {values})
        SELECT l.user_id, l.ts, f.event_id, f.occurred_at
        FROM labels l
        ASOF LEFT JOIN (
            SELECT * FROM user_features WHERE window_size_ms = 3600000 AND feature_set = 'listening-v1'
        ) f ON f.user_id = l.user_id AND f.occurred_at <= l.ts
        ORDER BY l.user_id, l.ts""",
    )
    hourly = [e for e in store.users if e["window_size_ms"] == HOUR]
    want = []
    for user, ms in sorted(labels):
        known = expected_as_of([e for e in hourly if e["user_id"] == user], "user_id", ms)
        want.append((user, at(ms), next(iter(known.values()), None)))
    assert [r[:3] for r in got] == want
    assert all(r[3] is None or r[3] <= r[1] for r in got)
    assert [w[2] is None for w in want] == [True, False, False, False, True]


def _doc_sql() -> list[str]:
    return re.findall(r"```sql\n(.*?)```", DOC.read_text(), flags=re.S)


def test_every_sql_example_of_the_docs_runs(store: Store):
    examples = _doc_sql()
    assert len(examples) >= 4
    results = [rows(store, sql.replace("'42'", "'u1'")) for sql in examples]
    assert all(results), "every example returns rows on this store (user 42 → u1)"


# -- lifecycle -----------------------------------------------------------------------------------
def test_views_and_macros_are_in_the_file_and_survive_reset_and_rebuild(store: Store, tmp_path: Path):
    settings = dataclasses.replace(store.settings, data_dir=tmp_path)
    _run(settings, store.topics)
    with duckdb.connect(str(settings.duckdb_path), read_only=True) as conn:  # a fresh process's view
        names = {
            r[0] for r in conn.execute("SELECT view_name FROM duckdb_views() WHERE NOT internal").fetchall()
        }
        macros = {
            r[0]
            for r in conn.execute(
                "SELECT function_name FROM duckdb_functions() WHERE function_type = 'table_macro'"
            ).fetchall()
        }
    assert {"user_features_latest", "track_features_latest"} <= names
    assert {"user_features_as_of", "track_features_as_of"} <= macros
    before = query(settings, "SELECT * FROM user_features_latest ORDER BY user_id, window_size_ms").rows
    reset(settings, ["user_features"])
    again = _run(settings, store.topics)
    assert again.per_projection == {"user_features": 18}
    assert (
        query(settings, "SELECT * FROM user_features_latest ORDER BY user_id, window_size_ms").rows == before
    )


def test_read_features_errors(store: Store, tmp_path: Path):
    empty = dataclasses.replace(store.settings, data_dir=tmp_path / "none")
    with pytest.raises(NoFeatureStoreError, match=r"'backbeat project --until-caught-up'"):
        read_features(empty, USER_TABLE, "u1")
    old = dataclasses.replace(store.settings, data_dir=tmp_path / "old")
    with writer(old.duckdb_path) as conn:  # read models from before the feature store existed
        conn.execute(LISTENS.ddl)
    with pytest.raises(NoFeatureStoreError, match="there is no feature store"):
        read_features(old, USER_TABLE, "u1")
    with writer(old.duckdb_path) as conn:
        conn.execute(USER_FEATURES.ddl)
        for statement in USER_FEATURES.extra_ddl:
            conn.execute(statement)
    with pytest.raises(NoFeatureStoreError, match="the feature store is empty"):
        read_features(old, USER_TABLE, "u1")
    with pytest.raises(UnknownEntityError, match="'nobody' has no features: it is not among the 2 users"):
        read_features(store.settings, USER_TABLE, "nobody")
    with pytest.raises(UnknownEntityError, match="first value became known at 2014-04-20 08:55:00"):
        read_features(store.settings, USER_TABLE, "u1", datetime(2014, 4, 20, 8, 54))
    assert TRACK_FEATURES.name == "track_features"


# -- the CLI -------------------------------------------------------------------------------------
def _backbeat(args: list[str], settings: Settings) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "infra.cli", *args], env=env_for(settings) | {"COLUMNS": "200"},
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip


def test_cli_latest_features_of_a_user(store: Store):
    result = _backbeat(["features", "u1"], store.settings)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "features of user u1 (latest)" in out
    assert "1 h window / 5 min step" in out and "1 d window / 1 h step" in out
    latest_hour = user_event("u1", T0 + 12 * MIN5)
    assert re.search(
        rf"plays\s+│\s+{latest_hour['plays']}\s+│\s+{user_event('u1', U1_DAYS[1], DAY)['plays']}", out
    )
    assert f"a{latest_hour['plays']}" in out  # its top artist
    assert "2014-04-20 10:00:00" in out  # window end of the latest 1 h window


def test_cli_as_of_json(store: Store):
    result = _backbeat(["features", "u1", "--as-of", "2014-04-20T11:07:00+02:00", "--json"], store.settings)
    assert result.returncode == 0, result.stderr
    doc = json.loads(result.stdout)
    assert doc["as_of"] == "2014-04-20T09:07:00Z"
    ts_ms = T0 + HOUR + 7 * 60_000
    want = expected_as_of(store.users, "user_id", ts_ms)
    got = {("u1", f["feature_set"], f["window_size_ms"]): f["event_id"] for f in doc["features"]}
    assert got == {k: v for k, v in want.items() if k[0] == "u1"}
    hourly = next(f for f in doc["features"] if f["window_size_ms"] == HOUR)
    assert hourly["window_end"] == "2014-04-20T09:05:00Z"
    assert hourly["top_artists"] == user_event("u1", T0 + MIN5)["top_artists"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["features", "nobody"], "user 'nobody' has no features"),
        (["features", "u1", "--as-of", "tomorrow"], "--as-of 'tomorrow' is not an ISO-8601 time"),
    ],
)
def test_cli_errors(store: Store, args: list[str], message: str):
    result = _backbeat(args, store.settings)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert message in " ".join(result.stderr.split())


def test_cli_without_a_feature_store_says_what_to_run(store: Store, tmp_path: Path):
    result = _backbeat(["features", "u1"], dataclasses.replace(store.settings, data_dir=tmp_path))
    assert result.returncode == 1 and "Traceback" not in result.stderr
    text = " ".join(result.stderr.split())
    assert "backbeat worker" in text and "backbeat project --until-caught-up" in text
