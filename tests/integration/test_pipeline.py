"""The walking skeleton over the real broker: the real 30Music file → importer → Faust agent →
projection runner → DuckDB, compared with ground truth computed from the file itself."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import duckdb
import pytest

from events.importers.run import import_catalog, import_listens
from infra import services
from infra.demo import group_progress
from infra.processes import free_port
from infra.provision import apply_topics
from infra.settings import Settings
from projections.runner import run_projections
from projections.sql import query
from streams.features_config import partials_topic
from streams.runtime.runner import group_id
from tests.conftest import CATALOG, LISTENS_30MUSIC, LISTENS_LASTFM1K, env_for, settings_for, wait_for

GROUND_TRUTH = """
WITH l AS (
    SELECT DISTINCT UserId::VARCHAR AS user_id, ItemId, "Time"
    FROM read_csv(?, delim = '\t', header = true)
), g AS (
    SELECT user_id, "Time" * 1000 - lag("Time" * 1000) OVER (PARTITION BY user_id ORDER BY "Time") AS gap
    FROM l
)
SELECT user_id, count(*) AS listens, count(*) FILTER (WHERE gap IS NULL OR gap > 1800000) AS sessions
FROM g GROUP BY user_id
"""


def truth_per_user(path: Path) -> dict[str, tuple[int, int]]:
    """{user: (distinct listens, sessions)} straight from the TSV, with DuckDB, not our parser."""
    rows = duckdb.connect().execute(GROUND_TRUTH, [str(path)]).fetchall()
    return {user: (listens, sessions) for user, listens, sessions in rows}


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory: pytest.TempPathFactory):
    """The real 30Music file imported twice, sessionised by a worker, projected, on a broker of
    its own (the shared one's playback.listens holds other tests' events)."""
    settings = settings_for(tmp_path_factory.mktemp("pipeline"), free_port(), free_port())
    services.up(settings)
    try:
        yield from _run_pipeline(settings)
    finally:
        services.down(settings)


def _run_pipeline(settings: Settings):
    apply_topics(settings)
    env = env_for(settings) | {"BACKBEAT_INGEST_APP_ID": "pipeline-test"}
    log = open(settings.data_dir / "worker.log", "wb")  # noqa: SIM115
    worker = subprocess.Popen(
        [sys.executable, "-m", "faust", "-A", "streams.app", "worker", "-l", "info", "--without-web"],
        env=env, stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        catalog = import_catalog(settings, CATALOG)
        first = import_listens(settings, LISTENS_30MUSIC, "30music")
        second = import_listens(settings, LISTENS_30MUSIC, "30music")  # a re-import: no effect
        stages = (  # every agent that reads the listens or the partials
            ("playback.listens", "listening-ingest"),
            ("playback.listens", "user-features"),
            (partials_topic("pipeline-test"), "track-features"),
        )
        for topic, agent in stages:
            wait_for(
                lambda topic=topic, agent=agent: group_progress(settings, group_id("pipeline-test", agent), topic).done
                or worker.poll() is not None,
                timeout_s=240, what=f"{agent} to process every record of {topic}",
            )  # fmt: skip
        assert worker.poll() is None, (settings.data_dir / "worker.log").read_text()[-3000:]
        stats = run_projections(settings, until_caught_up=True)
        yield settings, catalog, first, second, stats
    finally:
        worker.terminate()
        try:
            worker.wait(30)
        except subprocess.TimeoutExpired:
            worker.kill()
        log.close()


def test_listens_and_sessions_per_user_equal_the_file(pipeline):
    settings, _, first, _, _ = pipeline
    truth = truth_per_user(LISTENS_30MUSIC)
    got = query(
        settings,
        """SELECT user_id, (SELECT count(*) FROM listens l WHERE l.user_id = u.user_id),
                  (SELECT count(*) FROM sessions s WHERE s.user_id = u.user_id)
           FROM (SELECT DISTINCT user_id FROM listens) u""",
        max_rows=None,
    ).rows
    assert {u: (n, s) for u, n, s in got} == truth
    assert sum(n for n, _ in truth.values()) == first.produced == 86_468
    assert sum(s for _, s in truth.values()) == 7_533


def test_every_listen_is_in_exactly_one_closed_session(pipeline):
    settings = pipeline[0]
    row = query(
        settings,
        """SELECT (SELECT sum(listens) FROM sessions), (SELECT count(*) FROM listens),
                  (SELECT count(*) FROM sessions WHERE session_end < session_start),
                  (SELECT count(*) FROM projection_rejects)""",
    ).rows[0]
    assert row == (86_468, 86_468, 0, 0)


def test_reimport_changes_nothing_downstream(pipeline):
    settings, _, first, second, stats = pipeline
    assert second.produced == first.produced
    assert query(settings, "SELECT count(DISTINCT event_id), count(*) FROM listens").rows[0] == (
        86_468,
        86_468,
    )
    assert query(settings, "SELECT count(DISTINCT event_id), count(*) FROM sessions").rows[0] == (
        7_533,
        7_533,
    )
    assert stats.records >= 2 * 86_468  # both imports were read, the second one collapsed


def test_importer_counts_reconcile_and_duplicates_are_reported(pipeline):
    _, catalog, first, _, _ = pipeline
    assert first.reconciles() and first.rows_read == 88_761 and first.duplicates == 2_293
    assert catalog.reconciles() and catalog.produced == 28_356


def test_parquet_lake_holds_every_listen_once(pipeline):
    settings = pipeline[0]
    lake = settings.lake_dir / "listens"
    got = (
        duckdb.connect()
        .execute(
            "SELECT count(*), count(DISTINCT event_id) FROM read_parquet(?, hive_partitioning = true)",
            [str(lake / "**" / "*.parquet")],
        )
        .fetchone()
    )
    assert got == (86_468, 86_468)


WINDOW_TRUTH = """
SELECT user_id, {size} AS window_size_ms, w AS window_start, count(*) AS plays,
       count(DISTINCT artist_id) AS distinct_artists
FROM (SELECT user_id, artist_id,
             epoch_ms(occurred_at) - epoch_ms(occurred_at) % {step} - k * {step} AS w
      FROM listens, range(0, {size} // {step}) r(k))
GROUP BY ALL
"""

TRACK_TRUTH = """
SELECT track_id, w AS window_start, count(*) AS plays, count(DISTINCT user_id) AS listeners
FROM (SELECT track_id, user_id, epoch_ms(occurred_at) - epoch_ms(occurred_at) % 300000 - k * 300000 AS w
      FROM listens, range(0, 12) r(k))
GROUP BY ALL HAVING count(*) >= 2
"""


def test_feature_store_equals_a_group_by_over_the_listens(pipeline):
    """Every user window (1 h/5 min, 1 day/1 h) and every track window with 2+ plays, with their
    counts, and nothing else; the re-import's listens came after the closing watermark (late)."""
    settings = pipeline[0]
    mine = """SELECT user_id, window_size_ms, epoch_ms(window_start) AS window_start, plays, distinct_artists
              FROM user_features"""
    truth = " UNION ALL ".join(
        WINDOW_TRUTH.format(size=size, step=step)
        for size, step in ((3_600_000, 300_000), (86_400_000, 3_600_000))
    )
    counts = query(
        settings,
        f"""SELECT (SELECT count(*) FROM user_features),
                   (SELECT count(*) FROM (({mine}) EXCEPT ({truth}))),
                   (SELECT count(*) FROM (({truth}) EXCEPT ({mine})))""",
    ).rows[0]
    assert counts == (174_424 + 127_138, 0, 0)
    mine_tracks = "SELECT track_id, epoch_ms(window_start), plays, listeners FROM track_features"
    counts = query(
        settings,
        f"""SELECT (SELECT count(*) FROM track_features),
                   (SELECT count(*) FROM (({mine_tracks}) EXCEPT ({TRACK_TRUTH}))),
                   (SELECT count(*) FROM (({TRACK_TRUTH}) EXCEPT ({mine_tracks})))""",
    ).rows[0]
    assert counts == (33_870, 0, 0)
    assert query(settings, "SELECT count(DISTINCT user_id) FROM recommendations").rows[0][0] == 3_297


def test_demo_command_on_lastfm1k(tmp_path: Path):
    """`backbeat demo --listens … --format lastfm1k` end to end, as a user types it."""
    env = dict(os.environ)
    env.update(
        BACKBEAT_BOOTSTRAP_SERVERS=f"127.0.0.1:{free_port()}",
        BACKBEAT_REGISTRY_URL=f"http://127.0.0.1:{free_port()}",
        BACKBEAT_DATA_DIR=str(tmp_path),
        COLUMNS="160",
    )
    result = subprocess.run(
        [sys.executable, "-m", "infra.cli", "demo", "--listens", str(LISTENS_LASTFM1K), "--format", "lastfm1k"],
        env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    (tmp_path / "demo.out").write_text(result.stdout + result.stderr)
    assert result.returncode == 0, [ln for ln in result.stderr.splitlines() if not ln.startswith("[")][-30:]
    assert "Top artists" in result.stdout and "Listens per hour" in result.stdout
    assert "Feature store" in result.stdout and "Made for You" in result.stdout
    settings = Settings.from_env(env)
    assert query(settings, "SELECT count(*) FROM listens").rows[0][0] == 5000
    assert query(settings, "SELECT sum(listens) FROM sessions").rows[0][0] == 5000
    assert not (tmp_path / "run" / "broker.pid").exists()  # it stopped what it started
