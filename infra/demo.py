"""``backbeat demo`` (= ``make demo``): the walking skeleton end to end on real data.

up → topics → import the Spotify catalog and a real listening log → the Faust worker's agents
sessionise the listens and compute windowed user and track features → the projection runner
materialises ``listens``, ``sessions``, ``tracks``, the feature store and the recommendations
into DuckDB (+ the Parquet lake) → a report → stop what it started.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from confluent_kafka import ConsumerGroupTopicPartitions, TopicPartition
from confluent_kafka.admin import AdminClient

from events.offsets import high_watermarks
from infra.errors import InfraError
from infra.processes import Running, spawn, stop, tail
from infra.resources import CATALOG_SPOTIFY, DATA_DIR, LISTENS_30MUSIC
from infra.settings import Settings
from projections.names import NAMES_CTE, name_ctes

#: The demo's data: the real data sets shipped with backbeat (``data/`` in the repository).
DEFAULT_LISTENS = LISTENS_30MUSIC
DEFAULT_CATALOG = CATALOG_SPOTIFY


@dataclass(frozen=True)
class AgentProgress:
    """How far a consumer group got: committed offsets and high watermarks summed over
    partitions (events, control records included)."""

    committed: int
    end: int

    @property
    def done(self) -> bool:
        """True when every partition's committed offset reached its high watermark."""
        return self.committed >= self.end


def group_progress(settings: Settings, group: str, topic: str) -> AgentProgress:
    """Committed offsets of ``group`` on ``topic`` against the Fetch-based high watermarks.

    Raises:
        InfraError: the broker cannot be reached.
    """
    ends = high_watermarks(settings, topic)
    admin = AdminClient(settings.kafka_common())
    request = ConsumerGroupTopicPartitions(group, [TopicPartition(topic, p) for p in ends])
    try:
        result = admin.list_consumer_group_offsets([request])[group].result(timeout=10)
    except Exception as exc:
        raise InfraError(f"cannot read the offsets of consumer group {group}: {exc}") from exc
    committed = {tp.partition: max(tp.offset, 0) for tp in result.topic_partitions}
    return AgentProgress(
        committed=sum(min(committed.get(p, 0), end) for p, end in ends.items()),
        end=sum(ends.values()),
    )


def worker_env(settings: Settings) -> dict[str, str]:
    """The environment of a worker subprocess: ours plus the resolved BACKBEAT_* settings."""
    return {**os.environ, **settings.to_env(), "PYTHONUNBUFFERED": "1"}


def start_worker(
    settings: Settings, ready: Callable[[], bool] | None = None, env: Mapping[str, str] | None = None
) -> Running:
    """Start the Faust worker (``faust -A streams.app worker``) in the background, logging to
    ``<data_dir>/run/worker.log``; ``env`` adds variables to :func:`worker_env` (e.g.
    ``BACKBEAT_STREAMS_AGENTS=ads`` to run one agent group).

    Raises:
        InfraError: it exits while starting.
    """
    argv = [sys.executable, "-m", "faust", "-A", "streams.app", "worker", "-l", "info", "--without-web"]
    return spawn(
        "worker",
        argv,
        run_dir=settings.run_dir,
        address="-",
        ready=ready or (lambda: True),
        timeout_s=60,
        env={**worker_env(settings), **(env or {})},
    )


def wait_until(
    check: Callable[[], AgentProgress],
    *,
    on_progress: Callable[[AgentProgress], None],
    worker: Running,
    timeout_s: float,
) -> AgentProgress:
    """Poll ``check`` twice a second until it reports done; fail when the worker dies or
    ``timeout_s`` (s) passes.

    Raises:
        InfraError: the worker exited, or no completion in time (the log's tail is quoted).
    """
    from infra.processes import is_alive

    deadline = time.monotonic() + timeout_s
    while True:
        progress = check()
        on_progress(progress)
        if progress.done:
            return progress
        if not is_alive(worker):
            raise InfraError(f"the worker exited; last lines of {worker.log}:\n{tail(Path(worker.log))}")
        if time.monotonic() > deadline:
            raise InfraError(
                f"the agent did not finish within {timeout_s:.0f} s "
                f"({progress.committed:,}/{progress.end:,}); see {worker.log}"
            )
        time.sleep(0.5)


def stop_worker(worker: Running) -> None:
    """Stop the worker started by :func:`start_worker`."""
    stop(worker, timeout_s=20)


__all__ = [
    "AgentProgress",
    "DATA_DIR",
    "DEFAULT_CATALOG",
    "DEFAULT_LISTENS",
    "group_progress",
    "start_worker",
    "stop_worker",
    "wait_until",
]


# -- the report ----------------------------------------------------------------------------------
# Names of 30Music ids: the deterministic md5 mapping onto the catalog (projections.names).
TOP_ARTISTS = NAMES_CTE + """
SELECT artist_id, any_value(artist_shown) AS artist, count(*) AS listens,
       count(DISTINCT user_id) AS listeners
FROM named GROUP BY artist_id ORDER BY listens DESC, artist_id LIMIT 10
"""

TOP_TRACKS = NAMES_CTE + """
SELECT track_id, any_value(track_shown) AS track, any_value(artist_shown) AS artist,
       count(*) AS listens, count(DISTINCT user_id) AS listeners
FROM named GROUP BY track_id ORDER BY listens DESC, track_id LIMIT 10
"""

SESSION_STATS = """
SELECT count(*) AS sessions,
       count(DISTINCT user_id) AS users,
       round(avg(listens), 2) AS avg_listens,
       median(listens) AS median_listens,
       round(median(epoch(session_end - session_start)) / 60, 1) AS median_minutes,
       round(quantile_cont(epoch(session_end - session_start), 0.9) / 60, 1) AS p90_minutes,
       round(avg(distinct_artists), 2) AS avg_distinct_artists
FROM sessions
"""

PER_HOUR = """
SELECT hour(occurred_at) AS hour_utc, count(*) AS listens FROM listens GROUP BY 1 ORDER BY 1
"""

TOTALS = """
SELECT (SELECT count(*) FROM listens) AS listens,
       (SELECT count(DISTINCT user_id) FROM listens) AS users,
       (SELECT count(*) FROM sessions) AS sessions,
       (SELECT sum(listens) FROM sessions) AS listens_in_sessions,
       (SELECT count(*) FROM tracks) AS catalog_tracks
"""

FEATURE_TOTALS = """
SELECT 'user' AS entity,
       format('{}/{}', window_size_ms // 60000, window_step_ms // 60000) AS "window/step (min)",
       count(*) AS "values", count(DISTINCT user_id) AS entities, round(avg(plays), 2) AS avg_plays
FROM user_features GROUP BY ALL
UNION ALL
SELECT 'track', format('{}/{}', window_size_ms // 60000, window_step_ms // 60000), count(*),
       count(DISTINCT track_id), round(avg(plays), 2)
FROM track_features GROUP BY ALL
ORDER BY 1 DESC, 2
"""

TRENDING = "WITH " + name_ctes(
    "(SELECT track_id, artist_id, NULL::VARCHAR AS track_name, NULL::VARCHAR AS artist_name, window_start, "
    "plays, listeners, trending_score, baseline_plays_mean FROM track_features)",
    "f",
) + """
SELECT track_id, track_shown AS track, artist_shown AS artist, window_start, plays, listeners,
       round(baseline_plays_mean, 2) AS baseline, round(trending_score, 1) AS trending
FROM named WHERE listeners >= 3
QUALIFY row_number() OVER (PARTITION BY track_id ORDER BY trending_score DESC, window_start) = 1
ORDER BY trending_score DESC, plays DESC, track_id LIMIT 10
"""

MOST_ACTIVE_USER = """
SELECT user_id FROM listens JOIN experiment_assignments USING (user_id)
WHERE variant = 'streaming' GROUP BY 1 ORDER BY count(*) DESC, 1 LIMIT 1
"""

EXPLORE = [
    "backbeat sql \"SELECT user_id, count(*) AS listens FROM listens GROUP BY 1 ORDER BY 2 DESC LIMIT 10\"",
    "backbeat sql \"SELECT date_trunc('day', session_start) AS day, count(*), avg(listens) "
    "FROM sessions GROUP BY 1 ORDER BY 1\"",
    "backbeat sql \"SELECT genre, round(avg(energy), 3) AS energy, round(avg(tempo_bpm)) AS bpm, "
    "count(*) FROM tracks GROUP BY 1 ORDER BY 4 DESC\"",
    "backbeat sql \"SELECT listens, count(*) AS sessions FROM sessions GROUP BY 1 ORDER BY 1 LIMIT 20\"",
    "backbeat sql \"SELECT count(*) FROM read_parquet('{lake}/listens/**/*.parquet', "
    "hive_partitioning = true)\"",
    "backbeat features {user}          # the feature store: latest values, --as-of for a point in time",
    "backbeat recommend {user}         # Made for You: the user's list, its A/B variant",
    "backbeat evaluate recommendations # HR@20/MRR@20 of the model against baselines",
    "backbeat evaluate experiment      # the A/B readout: play-through within 7 days per variant, 95% CI",
]


def _print_query(title: str, settings: Settings, sql: str) -> None:
    from infra.console import console, table
    from projections.sql import query

    result = query(settings, sql)
    console.print(table(result.columns, result.rows, title=title))


def _print_hours(settings: Settings) -> None:
    from infra.console import console
    from projections.sql import query

    rows = query(settings, PER_HOUR).rows
    peak = max((n for _, n in rows), default=1)
    console.print("[bold]Listens per hour of day (UTC)[/]")
    for hour, n in rows:
        console.print(f"  {hour:02d}h {n:>7,} {'█' * max(1, round(40 * n / peak))}")


def report(settings: Settings) -> None:
    """Print the demo's report from the read models."""
    from infra.console import console
    from projections.sql import query

    _print_query("Totals", settings, TOTALS)
    console.print(
        "Names: 30Music ids have no names; they are mapped deterministically onto the Spotify "
        "catalog (artist by md5(artist_id), track by md5(track_id) among that artist's tracks). "
        "The names are illustrative, the counts are real.",
        style="dim",
    )
    _print_query("Top artists", settings, TOP_ARTISTS)
    _print_query("Top tracks", settings, TOP_TRACKS)
    _print_query("Listening sessions (30-minute inactivity gap)", settings, SESSION_STATS)
    _print_hours(settings)
    _print_query("Feature store: final window values", settings, FEATURE_TOTALS)
    _print_query(
        "Trending: tracks (3+ listeners) most above their own last day, best 1 h window", settings, TRENDING
    )
    user = str(query(settings, MOST_ACTIVE_USER).rows[0][0])
    _print_recommendations(settings, user)
    _print_readout(settings)
    console.print("\n[bold]Explore further[/] (DuckDB file: " + str(settings.duckdb_path) + ")")
    for line in EXPLORE:
        console.print("  " + line.format(lake=settings.lake_dir, user=user), soft_wrap=True)


def _print_readout(settings: Settings) -> None:
    """The A/B readout of "Made for You" (``backbeat evaluate experiment``): per variant, the
    per-user play-through of recommended tracks within 7 days with 95 % bootstrap intervals."""
    from infra.cli_evaluate import readout_table
    from infra.console import console
    from projections.experiment_readout import ExperimentReadoutError, readout

    try:
        results = readout(settings)
    except ExperimentReadoutError as exc:
        console.print(f"A/B readout: {exc}", style="dim")
        return
    console.print(readout_table(results))
    immature = sum(r.immature_lists for r in results)
    console.print(
        f"{immature:,} list(s) whose 7-day window is still open at the latest listen are left out "
        "(not counted as unplayed); metric and intervals: backbeat evaluate experiment --help",
        style="dim",
    )


def _print_recommendations(settings: Settings, user: str) -> None:
    from infra.console import console, table
    from projections.recommendations import read_recommendations

    recs = read_recommendations(settings, user, n=10)
    rows = [(i.rank, i.track_id, i.track, i.artist, round(i.score, 4)) for i in recs.items]
    title = f"Made for You: user {user} (most listens in variant {recs.variant} of {recs.experiment_id})"
    console.print(table(["rank", "track_id", "track", "artist", "score"], rows, title=title))


def run_demo(
    settings: Settings,
    *,
    listens: Path,
    fmt: str,
    catalog: Path,
    keep_running: bool = False,
    agent_timeout_s: float = 600.0,
) -> None:
    """The main job (see the module docstring). Stops what it started, also on errors.

    Raises:
        BackbeatError subclasses: any step failing (the message says which and why).
    """
    from events.importers.run import import_catalog, import_listens
    from infra import services
    from infra.console import console, progress_bar, run_with_bar
    from infra.processes import pid_file
    from infra.provision import apply_topics
    from projections.readmodels import PROJECTIONS
    from projections.runner import STATEFUL, run_projections
    from projections.tracking import reset
    from streams.config import IngestConfig
    from streams.features_config import partials_topic
    from streams.runtime.runner import group_id

    began = time.monotonic()
    console.rule("[bold]backbeat demo")
    started = services.up(settings)
    for running in started:
        console.print(f"started {running.name} on {running.address} (pid {running.pid})")
    broker_is_new = any(r.name == services.BROKER for r in started)
    worker: Running | None = None
    try:
        reports = apply_topics(settings)
        created = [r.name for r in reports if r.action == "created"]
        console.print(f"topics: {len(created)} created, {len(reports) - len(created)} already there")
        if broker_is_new and settings.duckdb_path.exists():
            reset(settings, [*PROJECTIONS, *STATEFUL])
            console.print("the broker started empty: read models of an earlier run were reset")
        worker = start_worker(settings)
        console.print(f"worker started (pid {worker.pid}, log {worker.log})")

        result = run_with_bar(
            f"import {catalog.name}",
            lambda total, advance: import_catalog(settings, catalog, on_parsed=total, progress=advance),
        )
        console.print(
            f"catalog: {result.rows_read:,} rows → {result.produced:,} TrackPublished "
            f"({result.duplicates:,} repeated track rows collapsed, {result.rejected:,} rejected)"
        )
        result = run_with_bar(
            f"import {listens.name}",
            lambda total, advance: import_listens(settings, listens, fmt, on_parsed=total, progress=advance),
        )
        console.print(
            f"listens: {result.rows_read:,} rows → {result.produced:,} ListenRecorded "
            f"({result.duplicates:,} duplicate rows collapsed, {result.rejected:,} rejected)"
        )
        for reject in result.rejects[:5]:
            console.print(f"  rejected line {reject.line}: {reject.reason}", style="yellow")

        app_id = IngestConfig.from_env().app_id
        stages = [
            ("agent: sessions", "playback.listens", "listening-ingest"),
            ("agent: user features", "playback.listens", "user-features"),
            ("agent: track features", partials_topic(app_id), "track-features"),
        ]
        for title, topic, agent in stages:
            with progress_bar() as bar:
                task = bar.add_task(title, total=None)
                wait_until(
                    lambda topic=topic, group=group_id(app_id, agent): group_progress(settings, group, topic),
                    on_progress=lambda p, b=bar, t=task: b.update(t, completed=p.committed, total=p.end),
                    worker=worker,
                    timeout_s=agent_timeout_s,
                )
        with progress_bar() as bar:
            task = bar.add_task("project into DuckDB", total=None)
            stats = run_projections(
                settings,
                until_caught_up=True,
                progress=lambda p: bar.update(task, completed=p.done, total=p.total),
            )
        console.print(
            f"read models: {stats.applied:,} rows applied from {stats.records:,} records "
            f"({stats.rate:,.0f} records/s) → {settings.duckdb_path}, lake {settings.lake_dir}"
        )
    finally:
        if worker is not None:
            stop_worker(worker)
            pid_file(settings.run_dir, "worker").unlink(missing_ok=True)
        if not keep_running:
            for running in reversed(started):
                stop(running)
                pid_file(settings.run_dir, running.name).unlink(missing_ok=True)
    report(settings)
    console.print(f"\ndone in {time.monotonic() - began:.0f} s", style="bold")
    if started and not keep_running:
        console.print(
            "the embedded broker was stopped (its topics lived in memory); the read models stay "
            "in DuckDB and Parquet for 'backbeat sql'",
            style="dim",
        )
