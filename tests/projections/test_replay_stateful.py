"""Blue/green replay of the stateful ``recommendations`` read model (projections.replay_stateful)
over the real Tansu broker, the embedded registry and real DuckDB files."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path
from typing import Any, cast

import pytest

from events.catalog import TopicSpec
from events.producer import EventProducer
from infra.errors import ConfigError
from infra.provision import apply_topics
from infra.settings import REPO_ROOT, Settings
from projections.readmodels import Projection
from projections.recommendations import RECOMMENDATIONS, STATE_TABLES, RecommendationsWriter
from projections.replay import replay
from projections.replay_stateful import STABLE_TABLES, build_path
from projections.runner import ProjectionRunner
from projections.sql import query
from projections.tracking import reset
from tests.conftest import env_for
from tests.projections.test_recommendations_runner import listens, send

pytestmark = pytest.mark.integration

#: generated_at is the user's latest listen: independent of batch boundaries, unlike the tracks
LIST_HEAD = (
    "SELECT DISTINCT user_id, experiment_id, variant, model, generated_at FROM recommendations ORDER BY 1"
)


class NoEvents:
    def send_many(self, *_args: Any, **_kwargs: Any) -> None:
        return None

    def flush(self, *_args: Any, **_kwargs: Any) -> None:
        return None


@pytest.fixture
def settings(stack: Settings, tmp_path: Path) -> Settings:
    return dataclasses.replace(stack, data_dir=tmp_path / "live")


def rows(settings: Settings, sql: str) -> list[tuple]:
    return query(settings, sql, max_rows=None).rows


def table(settings: Settings, name: str) -> list[tuple]:
    return sorted(rows(settings, f"SELECT * FROM {name}"), key=repr)


def setup(settings: Settings, unique: Any) -> Projection:
    name = unique("replay.rec")
    apply_topics(settings, [TopicSpec(name, 2)])
    # a seed user plays 15 tracks first, so every later user gets a list whatever the batches
    send(settings, name, listens(["seed"], [f"s{i}" for i in range(15)], 1_700_000_000_000))
    send(settings, name, listens([f"a-{i}" for i in range(8)], ["t1", "t2", "s3"], 1_700_001_000_000))
    send(settings, name, listens([f"b-{i}" for i in range(5)], ["t1", "t9"], 1_700_002_000_000))
    return RECOMMENDATIONS.on_topic(name)


def run(settings: Settings, proj: Projection, write: RecommendationsWriter | None = None) -> None:
    write = write or RecommendationsWriter(settings, producer=cast(EventProducer, NoEvents()))
    ProjectionRunner(settings, [proj], write=write).run(until_caught_up=True)


def test_replay_equals_fresh_build_runner_continues_old_kept_then_dropped(
    settings: Settings, unique: Any, tmp_path: Path
) -> None:
    proj = setup(settings, unique)
    live_writer = RecommendationsWriter(settings, producer=cast(EventProducer, NoEvents()))
    run(settings, proj, live_writer)
    before = {t: table(settings, t) for t in STATE_TABLES}
    head_before = rows(settings, LIST_HEAD)
    assert len(head_before) == 14  # every user has a list

    result = replay(settings, "recommendations", projection=proj, batch_size=7)
    assert result.verified and result.switched and result.verification.mode == "live"
    assert result.events == 15 + 24 + 10 and result.build == 1 and result.version == RECOMMENDATIONS.version
    assert not build_path(settings, "recommendations", 1).exists()  # copied in, then deleted

    # a fresh build of the same log in another data dir
    fresh = dataclasses.replace(settings, data_dir=tmp_path / "fresh")
    run(fresh, proj)
    for t in STABLE_TABLES:
        assert table(settings, t) == table(fresh, t) == before[t], t
    assert rows(settings, LIST_HEAD) == rows(fresh, LIST_HEAD) == head_before
    # readers see the new version; the old one is kept under versioned names
    assert rows(settings, "SELECT build, state, table_name FROM projection_builds ORDER BY build") == [
        (0, "old", f"recommendations__v{RECOMMENDATIONS.version}_b0"),
        (1, "current", "recommendations"),
    ]
    for t in STATE_TABLES:
        assert table(settings, f"{t}__v{RECOMMENDATIONS.version}_b0") == before[t], t
    assert rows(settings, "SELECT version FROM projection_versions WHERE projection = 'recommendations'") == [
        (RECOMMENDATIONS.version,)
    ]

    # the live runner (same writer instance: its in-memory model) keeps updating the new version
    send(settings, proj.topic, listens(["c-0"], ["t9", "s1"], 1_700_003_000_000))
    run(settings, proj, live_writer)
    assert rows(settings, "SELECT listens FROM recommendation_context WHERE user_id = 'c-0'") == [(2,)]
    assert rows(settings, "SELECT count(*) FROM recommendations WHERE user_id = 'c-0'")[0][0] > 0
    assert (
        rows(
            settings, "SELECT sum(next_offset) FROM projection_offsets WHERE projection = 'recommendations'"
        )[0][0]
        == 15 + 24 + 10 + 2
    )
    run(fresh, proj)
    for t in STABLE_TABLES:
        assert table(settings, t) == table(fresh, t), t

    # new listens the live runner has not read yet: a build to the end of the log cannot be
    # compared with the live version, so it is recounted; --drop-old drops every old version
    send(settings, proj.topic, listens(["c-1"], ["t1", "s2", "s5"], 1_700_004_000_000))
    again = replay(settings, "recommendations", projection=proj, stop="latest", drop_old=True)
    assert again.verified and again.build == 2 and again.verification.mode == "recount"
    assert again.verification.got[0] == 15 + 24 + 10 + 2 + 3  # distinct listens (event ids)
    assert sorted(again.dropped) == sorted(
        [f"{t}__v{RECOMMENDATIONS.version}_b{b}" for b in (0, 1) for t in STATE_TABLES]
    )
    assert rows(settings, "SELECT build, state FROM projection_builds") == [(2, "current")]
    run(fresh, proj)
    for t in STABLE_TABLES:
        assert table(settings, t) == table(fresh, t), t
    # the live writer notices the tables moved ahead under it and reloads its model
    send(settings, proj.topic, listens(["c-2"], ["s2", "t2"], 1_700_005_000_000))
    run(settings, proj, live_writer)
    run(fresh, proj)
    for t in STABLE_TABLES:
        assert table(settings, t) == table(fresh, t), t
    assert rows(settings, LIST_HEAD) == rows(fresh, LIST_HEAD)
    # c-2's list was made by both at the end of a batch holding only its listens: same model, same list
    c2 = "SELECT \"rank\", track_id, score, list_id FROM recommendations WHERE user_id = 'c-2' ORDER BY 1"
    assert rows(settings, c2) == rows(fresh, c2) != []


def test_killed_build_resumes_and_verifies_and_partial_start_is_refused(
    settings: Settings, unique: Any
) -> None:
    proj = setup(settings, unique)
    run(settings, proj)
    with pytest.raises(ConfigError, match="stateful"):
        replay(settings, "recommendations", projection=proj, start="0:3,1:0")
    code = (
        "import os, signal\n"
        "from infra.settings import Settings\n"
        "from projections.recommendations import RECOMMENDATIONS\n"
        "from projections.replay import replay\n"
        "def kill(p):\n"
        "    if p.events >= 10: os.kill(os.getpid(), signal.SIGKILL)\n"
        f"replay(Settings.from_env(), 'recommendations', projection=RECOMMENDATIONS.on_topic({proj.topic!r}),"
        " batch_size=5, progress=kill)\n"
    )
    env = env_for(settings)
    child = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO_ROOT, env=env, capture_output=True, timeout=120
    )
    assert child.returncode == -9, child.stderr
    assert rows(settings, "SELECT build, state FROM projection_builds") == [(1, "building")]
    assert build_path(settings, "recommendations", 1).exists()
    result = replay(settings, "recommendations", projection=proj, batch_size=5)
    assert result.resumed and result.verified and result.switched and result.build == 1
    assert 0 < result.events < 49  # only what the killed run had not committed
    # tamper with the live version: a new build at the same offsets must fail verification
    from projections.store import writer

    with writer(settings.duckdb_path) as conn:
        conn.execute("UPDATE item_plays SET plays = plays + 1 WHERE track_id = 't1'")
    failed = replay(settings, "recommendations", projection=proj)
    assert not failed.verified and not failed.switched and "item_plays" in failed.verification.detail
    assert rows(settings, "SELECT build, state FROM projection_builds ORDER BY build") == [
        (0, "old"),
        (1, "current"),
        (2, "failed"),
    ]
    # a reset drops every kept version of every state table, not only the current ones
    kept = "SELECT count(*) FROM duckdb_tables() WHERE regexp_matches(table_name, '__v[0-9]+_b[0-9]+$')"
    assert rows(settings, kept)[0][0] == len(STATE_TABLES)  # build 0, kept after the switch
    reset(settings, ["recommendations"])
    assert rows(settings, kept)[0][0] == 0
