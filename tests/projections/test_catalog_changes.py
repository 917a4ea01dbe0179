"""Catalog changes applied by the projection runner over the real broker and registry
(``docs/live-catalog.md``): generated changes on a slice of the real Spotify catalog, folded into
``tracks_current`` and ``track_availability``, equal to an independent SQL computation over the
raw events read back from the topics, the same after a SIGKILL of the runner and a restart; and
served recommendations never list a track withdrawn or unlicensed in the territory served (CLI
and HTTP API), while the same track is listed where it is available.

One module-scoped world: the changes are produced *before* the catalog they change (a change
before its ``TrackPublished``), a runner process is SIGKILLed after its first committed batch
and restarted (read model ``a``), and a second read model ``b`` is built in one clean run.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa
import pytest
from fastapi.testclient import TestClient

from events.catalog import TopicSpec
from events.catalog_changes import (
    ALBUMS_TOPIC,
    CHANGES_TOPIC,
    DAY_MS,
    DEFAULT_START_MS,
    LICENCES_TOPIC,
    TERRITORIES,
    TRACKS_TOPIC,
    generate,
)
from events.console_io import consume
from events.producer import EventProducer
from infra.api import create_app
from infra.cli_catalog_changes import load_catalog, produce_changes
from infra.provision import apply_topics
from infra.settings import REPO_ROOT, Settings
from projections.readmodels import LICENCES, TRACK_CHANGES, TRACKS
from projections.recommendations import RECOMMENDATIONS, RecommendationsWriter, read_recommendations
from projections.replay import replay
from projections.runner import ProjectionRunner, run_projections
from projections.sql import query
from tests.conftest import CATALOG, env_for, wait_for

pytestmark = pytest.mark.integration

NAMES = ["tracks", "track_changes", "licences", "albums"]
PROJECTION_TOPIC = {
    "tracks": TRACKS_TOPIC,
    "track_changes": CHANGES_TOPIC,
    "licences": LICENCES_TOPIC,
    "albums": ALBUMS_TOPIC,
}
#: A point inside the simulated period (some album licences not yet valid, some terms running).
MID_MS = DEFAULT_START_MS + 200 * DAY_MS


def name(prefix: str) -> str:
    return f"{prefix}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def rows(settings: Settings, sql: str) -> list[tuple]:
    return query(settings, sql, max_rows=None).rows


def _clean(record: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in record.items() if k != "_line"}


def publish(settings: Settings, topic: str, tracks: list[dict[str, Any]]) -> None:
    producer = EventProducer(settings)
    producer.send_many(
        topic, "TrackPublished", [_clean(t) for t in tracks], key_field="track_id",
        time_field="published_at", source="/tests",
    )  # fmt: skip
    producer.flush()


def _progress(settings: Settings) -> int:
    if not settings.duckdb_path.exists():
        return 0
    try:
        return rows(settings, "SELECT coalesce(sum(next_offset), 0) FROM projection_offsets")[0][0]
    except Exception:  # tables not created yet, or the file is being written
        return 0


@dataclass
class World:
    topics: dict[str, str]  # default topic -> this test's topic
    a: Settings  # killed mid-way and restarted
    b: Settings  # one clean run
    raw: duckdb.DuckDBPyConnection  # the raw events read back from the topics
    killed_at: int  # records committed when the runner was killed
    total: int  # records in the four topics


def _raw_tables(settings: Settings, topics: dict[str, str]) -> duckdb.DuckDBPyConnection:
    """The four topics read back and decoded, as DuckDB tables ``pub``, ``chg``, ``lic`` (every
    record: its type, partition, offset, and its fields; times as ms)."""
    conn = duckdb.connect()
    for table, topic in (("pub", TRACKS_TOPIC), ("chg", CHANGES_TOPIC), ("lic", LICENCES_TOPIC)):
        recs = []
        for r in consume(settings, topics[topic]):
            value = dict(r["value"])
            value["type"] = r["headers"]["ce_type"].rsplit(".", 1)[-1]
            value["part"], value["off"] = r["partition"], r["offset"]
            recs.append(value)
        fields = sorted({k for v in recs for k in v})
        data = pa.Table.from_pylist([{k: v.get(k) for k in fields} for v in recs])
        conn.register(f"{table}_arrow", data)
        conn.execute(f"CREATE TABLE {table} AS SELECT * FROM {table}_arrow")
    return conn


@pytest.fixture(scope="module")
def world(stack: Settings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    topics = {t: name(t) for t in PROJECTION_TOPIC.values()}
    apply_topics(stack, [TopicSpec(t, 3) for t in topics.values()])
    catalog = load_catalog(CATALOG, limit=300)
    made = generate(catalog, seed=7, changes=300)
    assert {"TrackUpdated", "TrackWithdrawn", "LicenceRevoked", "AlbumReleased"} <= set(made.counts)
    produce_changes(stack, made.events, topics=topics)  # the changes before the catalog

    a = dataclasses.replace(stack, data_dir=tmp_path_factory.mktemp("catalog-a"))
    b = dataclasses.replace(stack, data_dir=tmp_path_factory.mktemp("catalog-b"))
    overrides = {p: topics[t] for p, t in PROJECTION_TOPIC.items()}
    cmd = [sys.executable, "-m", "projections.runner", "--batch-size", "40"]
    for p in NAMES:
        cmd += ["--projection", p, "--topic", f"{p}={overrides[p]}"]
    proc = subprocess.Popen(
        cmd, cwd=REPO_ROOT, env=env_for(a), stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        wait_for(lambda: _progress(a) > 0, 60, "the runner's first committed batch")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=30)
    killed_at = _progress(a)
    publish(stack, topics[TRACKS_TOPIC], catalog)  # the catalog arrives after (some of) its changes
    run_projections(a, NAMES, until_caught_up=True, topics=overrides)
    run_projections(b, NAMES, until_caught_up=True, topics=overrides)
    total = len(made.events) + len(catalog)
    yield World(topics, a, b, _raw_tables(stack, topics), killed_at, total)


# -- the independent computation (written apart from projections/availability.py) ----------------
def _ts(ms: int) -> str:
    return f"make_timestamp({ms} * 1000)"


def expected_availability(raw: duckdb.DuckDBPyConnection, at_ms: int) -> list[tuple]:
    """Per published track and territory: available, licence_id, reason, since, withdrawal
    reason — by the rules of docs/live-catalog.md, with correlated subqueries."""
    terr = ", ".join(f"('{t}')" for t in TERRITORIES)
    sql = f"""
    WITH terr(territory) AS (VALUES {terr}),
    tt AS (SELECT DISTINCT p.track_id, t.territory FROM pub p, terr t),
    g AS (
        SELECT * FROM lic x WHERE x.type = 'LicenceGranted' AND NOT EXISTS (
            SELECT 1 FROM lic y WHERE y.type = 'LicenceGranted' AND y.licence_id = x.licence_id
              AND (y.part > x.part OR (y.part = x.part AND y.off > x.off)))
    ),
    gc AS (
        SELECT g.licence_id, g.track_id, tt.territory, g.valid_from, g.valid_until,
               (SELECT max(r.occurred_at) FROM lic r WHERE r.type = 'LicenceRevoked'
                  AND r.licence_id = g.licence_id AND r.occurred_at <= {at_ms}
                  AND (len(r.territories) = 0 OR array_position(r.territories, tt.territory) IS NOT NULL)
               ) AS revoked_at
        FROM g JOIN tt ON tt.track_id = g.track_id
         AND (len(g.territories) = 0 OR array_position(g.territories, tt.territory) IS NOT NULL)
    ),
    ok AS (
        SELECT *, row_number() OVER (PARTITION BY track_id, territory ORDER BY valid_from, licence_id) AS rn
        FROM gc WHERE revoked_at IS NULL AND valid_from <= {at_ms}
          AND (valid_until IS NULL OR valid_until > {at_ms})
    ),
    w AS (
        SELECT c.track_id, tt.territory, c.occurred_at, c.reason,
               row_number() OVER (PARTITION BY c.track_id, tt.territory
                                  ORDER BY c.occurred_at, c.part, c.off) AS rn
        FROM chg c JOIN tt ON tt.track_id = c.track_id
         AND (len(c.territories) = 0 OR array_position(c.territories, tt.territory) IS NOT NULL)
        WHERE c.type = 'TrackWithdrawn' AND c.occurred_at <= {at_ms}
    ),
    per AS (
        SELECT tt.track_id, tt.territory, ok.licence_id, ok.valid_from AS licensed_since,
               w.occurred_at AS withdrawn_at, w.reason AS withdrawal_reason,
               (SELECT max(revoked_at) FROM gc WHERE gc.track_id = tt.track_id
                  AND gc.territory = tt.territory) AS revoked_at,
               (SELECT max(valid_until) FROM gc WHERE gc.track_id = tt.track_id
                  AND gc.territory = tt.territory AND gc.revoked_at IS NULL AND gc.valid_from <= {at_ms}
                  AND gc.valid_until <= {at_ms}) AS expired_at,
               (SELECT min(valid_from) FROM gc WHERE gc.track_id = tt.track_id
                  AND gc.territory = tt.territory AND gc.revoked_at IS NULL
                  AND gc.valid_from > {at_ms}) AS future_from
        FROM tt LEFT JOIN ok ON ok.track_id = tt.track_id AND ok.territory = tt.territory AND ok.rn = 1
        LEFT JOIN w ON w.track_id = tt.track_id AND w.territory = tt.territory AND w.rn = 1
    )
    SELECT track_id, territory, withdrawn_at IS NULL AND licence_id IS NOT NULL, licence_id,
           CASE WHEN withdrawn_at IS NOT NULL THEN 'withdrawn' WHEN licence_id IS NOT NULL THEN 'licensed'
                WHEN revoked_at IS NOT NULL THEN 'licence_revoked'
                WHEN expired_at IS NOT NULL THEN 'licence_expired'
                WHEN future_from IS NOT NULL THEN 'licence_not_yet_valid' ELSE 'unlicensed' END,
           {_ts("coalesce(withdrawn_at, licensed_since, revoked_at, expired_at, future_from)")},
           withdrawal_reason
    FROM per ORDER BY track_id, territory"""
    return raw.execute(sql).fetchall()


FIELDS = ("name", "artist", "album_id", "genre", "popularity", "duration_ms", "explicit")


def expected_tracks(raw: duckdb.DuckDBPyConnection, at_ms: int) -> list[tuple]:
    """Per published track (the last TrackPublished of its id): the fields after the latest edit
    setting each, edits, last edit time, withdrawal status, available territories and status."""
    latest = "\n".join(
        f"""LEFT JOIN (SELECT track_id, {f} AS new_{f}, row_number() OVER (PARTITION BY track_id
                 ORDER BY occurred_at DESC, part DESC, off DESC) AS rn_{f}
               FROM chg WHERE type = 'TrackUpdated' AND occurred_at <= {at_ms} AND {f} IS NOT NULL) e_{f}
             ON e_{f}.track_id = p.track_id AND e_{f}.rn_{f} = 1"""
        for f in FIELDS
    )
    shown = ", ".join(
        f"e_{f}.new_{f}" if f == "explicit" else f"coalesce(e_{f}.new_{f}, p.{f})" for f in FIELDS
    )
    sql = f"""
    WITH p AS (
        SELECT * FROM pub x WHERE NOT EXISTS (SELECT 1 FROM pub y WHERE y.track_id = x.track_id
          AND (y.part > x.part OR (y.part = x.part AND y.off > x.off)))
    )
    SELECT p.track_id, {shown},
           (SELECT count(*) FROM chg c WHERE c.track_id = p.track_id AND c.type = 'TrackUpdated'
              AND c.occurred_at <= {at_ms}),
           (SELECT {_ts("max(c.occurred_at)")} FROM chg c WHERE c.track_id = p.track_id
              AND c.type = 'TrackUpdated' AND c.occurred_at <= {at_ms}),
           EXISTS (SELECT 1 FROM chg c WHERE c.track_id = p.track_id AND c.type = 'TrackWithdrawn'
              AND c.occurred_at <= {at_ms} AND len(c.territories) = 0),
           (SELECT {_ts("min(c.occurred_at)")} FROM chg c WHERE c.track_id = p.track_id
              AND c.type = 'TrackWithdrawn' AND c.occurred_at <= {at_ms})
    FROM p {latest} ORDER BY p.track_id"""
    out = raw.execute(sql).fetchall()
    withdrawn: dict[str, set[str]] = {}
    for track, territories in raw.execute(
        f"SELECT track_id, territories FROM chg WHERE type = 'TrackWithdrawn' AND occurred_at <= {at_ms}"
    ).fetchall():
        withdrawn.setdefault(track, set()).update(territories)
    avail: dict[str, list[str]] = {}
    for track, territory, ok, *_ in expected_availability(raw, at_ms):
        avail.setdefault(track, [])
        if ok:
            avail[track].append(territory)
    result = []
    for r in out:
        track, world_wd = r[0], r[10]
        places = sorted(avail[track])
        status = (
            "withdrawn" if world_wd else "available" if len(places) == len(TERRITORIES)
            else "partial" if places else "unavailable"
        )  # fmt: skip
        result.append((*r[:11], sorted(withdrawn.get(track, ())), r[11], places, bool(places), status))
    return result


TRACK_COLUMNS = (
    "track_id, name, artist, album_id, genre, popularity, duration_ms, explicit, edits, updated_at, "
    "withdrawn_worldwide, withdrawn_territories, withdrawn_at, available_territories, available, status"
)
AVAIL_COLUMNS = "track_id, territory, available, licence_id, reason, since, withdrawal_reason"


def _tracks(settings: Settings, source: str) -> list[tuple]:
    return rows(settings, f"SELECT {TRACK_COLUMNS} FROM {source} ORDER BY track_id")


def _avail(settings: Settings, source: str) -> list[tuple]:
    return rows(settings, f"SELECT {AVAIL_COLUMNS} FROM {source} ORDER BY track_id, territory")


def test_track_availability_equals_independent_sql_now_and_mid_period(world: World):
    now_ms = int(time.time() * 1000)
    for source, at in ((f"track_availability_at({_ts(MID_MS)})", MID_MS), ("track_availability", now_ms)):
        got = _avail(world.a, source)
        assert got == expected_availability(world.raw, at), source
        assert len(got) == len({r[0] for r in got}) * len(TERRITORIES)
    reasons_mid = {r[4] for r in _avail(world.a, f"track_availability_at({_ts(MID_MS)})")}
    reasons_now = {r[4] for r in _avail(world.a, "track_availability")}
    # the data exercises every rule
    assert {"licensed", "withdrawn", "licence_revoked", "unlicensed", "licence_not_yet_valid"} <= reasons_mid
    assert {"licensed", "withdrawn", "licence_revoked", "licence_expired", "unlicensed"} <= reasons_now


def test_tracks_current_folds_edits_and_withdrawals_like_independent_sql(world: World):
    now_ms = int(time.time() * 1000)
    for source, at in ((f"tracks_as_of({_ts(MID_MS)})", MID_MS), ("tracks_current", now_ms)):
        assert _tracks(world.a, source) == expected_tracks(world.raw, at), source
    current = _tracks(world.a, "tracks_current")
    published = rows(world.a, "SELECT count(*) FROM tracks")[0][0]
    assert len(current) == published  # withdrawn tracks stay, with their status
    statuses = {r[-1] for r in current}
    assert {"withdrawn", "partial", "available", "unavailable"} <= statuses
    renamed = "SELECT count(*) FROM tracks_current c JOIN tracks t USING (track_id) WHERE c.name <> t.name"
    assert rows(world.a, renamed)[0][0] > 0  # edits show
    # the published record is untouched: tracks holds the last TrackPublished per id
    base = rows(world.a, "SELECT track_id, name, popularity FROM tracks ORDER BY track_id")
    raw_base = world.raw.execute(
        "SELECT track_id, arg_max(name, (part, off)), arg_max(popularity, (part, off)) FROM pub "
        "GROUP BY track_id ORDER BY track_id"
    ).fetchall()
    assert base == raw_base


def test_sigkill_mid_way_then_restart_gives_the_same_read_models(world: World):
    assert 0 < world.killed_at < world.total, "the runner was not killed mid-way"
    for table in ("tracks", "track_changes", "licences", "albums"):
        cols = "* EXCLUDE (kafka_partition, kafka_offset)"
        a = rows(world.a, f"SELECT {cols} FROM {table} ORDER BY ALL")
        assert a == rows(world.b, f"SELECT {cols} FROM {table} ORDER BY ALL"), table
        assert len(a) == rows(world.a, f"SELECT count(DISTINCT event_id) FROM {table}")[0][0]
    for source in ("track_availability", f"track_availability_at({_ts(MID_MS)})"):
        assert _avail(world.a, source) == _avail(world.b, source)
    assert _tracks(world.a, "tracks_current") == _tracks(world.b, "tracks_current")
    counts = world.raw.execute("SELECT (SELECT count(*) FROM chg), (SELECT count(*) FROM lic)").fetchall()[0]
    assert (
        rows(world.a, "SELECT count(*) FROM track_changes")[0][0],
        rows(world.a, "SELECT count(*) FROM licences")[0][0],
    ) == counts


def test_replay_of_the_tables_keeps_the_folded_views(world: World):
    before = (_tracks(world.b, "tracks_current"), _avail(world.b, "track_availability"))
    for proj in (TRACK_CHANGES, LICENCES, TRACKS):
        result = replay(
            world.b, proj.name, projection=proj.on_topic(world.topics[PROJECTION_TOPIC[proj.name]])
        )
        assert result.switched, proj.name
        assert rows(
            world.b, f"SELECT table_type FROM information_schema.tables WHERE table_name = '{proj.name}'"
        ) == [("VIEW",)]  # the name now reads the new version's table
    assert (_tracks(world.b, "tracks_current"), _avail(world.b, "track_availability")) == before
    assert before[0] == _tracks(world.a, "tracks_current")


# -- recommendations --------------------------------------------------------------------------------
MIN = 60_000
T0_MS = DEFAULT_START_MS


def _licence(i: int, track: str, territories: list[str]) -> dict[str, Any]:
    return {
        "event_id": f"rec-lic-{i}", "licence_id": f"L{i}", "track_id": track, "occurred_at": T0_MS,
        "society": "Merlin", "rights_type": "MASTER", "territories": territories, "valid_from": T0_MS,
        "valid_until": None, "royalty_share_bp": 1000,
    }  # fmt: skip


def _listens(users: list[str], tracks: list[str], start_ms: int) -> list[dict[str, Any]]:
    return [
        {
            "event_id": f"{u}-{t}-{start_ms}",
            "user_id": u,
            "track_id": t,
            "artist_id": "a1",
            "occurred_at": start_ms + i * MIN,
            "source": "test",
            "ms_played": None,
            "track_name": None,
            "artist_name": None,
            "session_hint": None,
        }  # fmt: skip
        for u in users
        for i, t in enumerate(tracks)
    ]


def test_recommendations_never_list_withdrawn_or_unlicensed_tracks(stack: Settings, tmp_path: Path):
    settings = dataclasses.replace(stack, data_dir=tmp_path)
    t = {k: name(k) for k in ("tracks", "changes", "licences", "listens", "exp", "lists")}
    apply_topics(stack, [TopicSpec(v, 2) for v in t.values()])
    catalog = load_catalog(CATALOG, limit=12)
    ids = [c["track_id"] for c in catalog]
    withdrawn, de_unlicensed, unknown = ids[0], ids[1], "30music-4711"  # the last: not in the catalog
    publish(stack, t["tracks"], catalog)
    producer = EventProducer(stack)
    licences = [_licence(i, tid, ["FR"] if tid == de_unlicensed else []) for i, tid in enumerate(ids)]
    producer.send_many(
        t["licences"], "LicenceGranted", licences, key_field="track_id", time_field="occurred_at", source="/t"
    )
    withdrawal = {
        "event_id": "rec-wd", "track_id": withdrawn, "occurred_at": T0_MS + DAY_MS, "reason": "TAKEDOWN_REQUEST",
        "territories": ["DE"], "licence_id": None,
    }  # fmt: skip
    producer.send_many(
        t["changes"],
        "TrackWithdrawn",
        [withdrawal],
        key_field="track_id",
        time_field="occurred_at",
        source="/t",
    )
    fans = [f"fan-{i}" for i in range(10)]  # make the three popular; their lists hold the rest
    others = [f"other-{i}" for i in range(6)]  # never played them: their lists offer them
    plays = _listens(fans, [withdrawn, de_unlicensed, unknown], 1_700_000_000_000)
    for k, u in enumerate(others):
        # after the fans' plays: a list is made from the model as of its user's listen
        plays += _listens([u], [ids[2 + k], ids[3 + k]], 1_700_000_000_000 + (60 + k * 10) * MIN)
    producer.send_many(
        t["listens"], "ListenRecorded", plays, key_field="user_id", time_field="occurred_at", source="/t"
    )
    producer.flush()
    writer = RecommendationsWriter(settings, experiments_topic=t["exp"], recommendations_topic=t["lists"])
    ProjectionRunner(settings, [RECOMMENDATIONS.on_topic(t["listens"])], write=writer).run(
        until_caught_up=True
    )
    run_projections(
        settings, ["tracks", "track_changes", "licences"], until_caught_up=True,
        topics={"tracks": t["tracks"], "track_changes": t["changes"], "licences": t["licences"]},
    )  # fmt: skip
    stored = dict(
        rows(settings, 'SELECT user_id, list(track_id ORDER BY "rank") FROM recommendations GROUP BY 1')
    )
    assert all({withdrawn, de_unlicensed, unknown} <= set(stored[u]) for u in others)  # they would be listed

    hidden = {withdrawn, de_unlicensed}
    for user in stored:  # every list, in DE and in FR
        de = read_recommendations(settings, user, territory="DE")
        assert not hidden & {i.track_id for i in de.items}, user
        assert set(de.withheld) == hidden & set(stored[user])
        fr = read_recommendations(settings, user, territory="FR")
        assert [i.track_id for i in fr.items] == stored[user] and fr.withheld == ()
    de_items = {i.track_id for i in read_recommendations(settings, others[0], territory="de").items}
    assert unknown in de_items  # a track the catalog does not know is not filtered

    client = TestClient(create_app(settings))
    for user in others:
        de = client.get(f"/users/{user}/recommendations", params={"territory": "DE"})
        assert de.status_code == 200, de.text
        assert not hidden & {i["track_id"] for i in de.json()["items"]}
        assert de.json()["territory"] == "DE" and set(de.json()["withheld"]) == hidden
        fr = client.get(f"/users/{user}/recommendations", params={"territory": "FR", "n": 50})
        assert hidden <= {i["track_id"] for i in fr.json()["items"]}
    bad = client.get(f"/users/{others[0]}/recommendations", params={"territory": "XX"})
    assert bad.status_code == 400 and bad.json()["type"].endswith("unknown-territory")

    env = {**env_for(settings), "COLUMNS": "200"}
    for territory, shown in (("DE", set()), ("FR", hidden)):
        out = subprocess.run(
            [sys.executable, "-m", "infra.cli", "recommend", others[0], "--territory", territory, "--json"],
            cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert out.returncode == 0, out.stderr
        listed = {i["track_id"] for i in json.loads(out.stdout)["items"]}
        assert listed & hidden == shown, territory
