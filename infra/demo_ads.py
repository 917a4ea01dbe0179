"""``backbeat demo ads``: the ad-reporting pipeline end to end on a real Open Bandit log.

up → topics → the Faust worker with the ad-reporting agent only (``BACKBEAT_STREAMS_AGENTS=ads``)
→ import the CSV as impressions and clicks (:mod:`events.importers.ads`) → wait until the agent's
consumer group committed every offset of ``ads.delivery`` (its closing watermarks included, so
every window is final) → the projection runner materialises ``ad_reports``, ``ad_reports_item``
and ``campaign_pauses`` (+ the Parquet lake) → a report (CTR by position, spend per campaign and
hour, over-delivery, paused campaigns) → stop what it started. The tables stay under
``BACKBEAT_DATA_DIR`` for ``backbeat sql``.
"""

from __future__ import annotations

import time
from pathlib import Path

from events.campaigns import CAMPAIGNS_FILE
from infra.demo import group_progress, start_worker, stop_worker, wait_until
from infra.processes import Running, stop
from infra.resources import ADS_OPEN_BANDIT
from infra.settings import Settings

#: The Open Bandit log shipped with backbeat (``data/ads_open_bandit/random/all/all.csv.gz``).
DEFAULT_ADS = ADS_OPEN_BANDIT
#: The read models the ad demo builds.
AD_PROJECTIONS = ("ad_reports", "ad_reports_item", "campaign_pauses")
ADS_TOPIC = "ads.delivery"

TOTALS = """
SELECT sum(impressions) AS impressions,
       sum(overdelivery_impressions) AS overdelivered,
       sum(clicks) AS clicks,
       sum(overdelivery_clicks) AS "clicks (over-delivered)",
       sum(clicks_outside_attribution) AS "clicks > 30 min",
       sum(clicks_unknown_impression) AS "clicks, unknown impression",
       printf('%.2f', sum(spend_micros) / 1e8) AS "spend (EUR)",
       (SELECT count(*) FROM ad_reports) AS "campaign reports",
       (SELECT count(*) FROM ad_reports_item) AS "per-ad reports (1 min + hourly)"
FROM ad_reports WHERE window_size_ms = 60000
"""

CTR_BY_POSITION = """
SELECT position, sum(impressions + overdelivery_impressions) AS impressions,
       sum(clicks + overdelivery_clicks) AS clicks,
       round(100 * sum(clicks + overdelivery_clicks) / sum(impressions + overdelivery_impressions), 3)
         AS "CTR %"
FROM ad_reports_item WHERE window_size_ms = 60000 GROUP BY position ORDER BY position
"""

#: Spend per campaign and UTC hour from the 1-minute windows, summarised per campaign (the full
#: table is one row per campaign and hour: see the docs).
SPEND_PER_HOUR = """
WITH hourly AS (
    SELECT campaign_id, date_trunc('hour', window_start) AS hour, sum(spend_micros) AS spend_micros
    FROM ad_reports WHERE window_size_ms = 60000 GROUP BY ALL
)
SELECT campaign_id, count(*) FILTER (WHERE spend_micros > 0) AS "hours with spend",
       printf('%.2f', sum(spend_micros) / 1e8) AS "spend (EUR)",
       round(avg(spend_micros) FILTER (WHERE spend_micros > 0) / 1e6, 2) AS "mean/hour (cents)",
       round(max(spend_micros) / 1e6, 2) AS "max/hour (cents)",
       arg_max(hour, spend_micros) AS "max hour (UTC)"
FROM hourly GROUP BY campaign_id ORDER BY campaign_id
"""

OVERDELIVERY = """
SELECT campaign_id, sum(impressions) AS "within budget", sum(overdelivery_impressions) AS overdelivered,
       sum(overdelivery_clicks) AS "their clicks",
       printf('%.2f', sum(overdelivery_spend_micros) / 1e8) AS "not billed (EUR)",
       round(100 * sum(overdelivery_impressions) / sum(impressions + overdelivery_impressions), 1)
         AS "over-delivered %"
FROM ad_reports WHERE window_size_ms = 60000 GROUP BY campaign_id ORDER BY campaign_id
"""

PAUSES = """
SELECT campaign_id, count(*) AS "days paused", strftime(min(paused_at), '%Y-%m-%d %H:%M:%S') AS "first pause",
       round(avg(epoch(paused_at - period_start)) / 3600, 1) AS "mean hour of pause (UTC)",
       any_value(budget_minor) AS "daily budget (cents)", round(avg(spent_minor), 1) AS "mean spent (cents)"
FROM campaign_pauses GROUP BY campaign_id ORDER BY campaign_id
"""

#: The report's tables: (title, query).
SECTIONS = (
    ("Ad reports: totals over the 1-minute campaign windows", TOTALS),
    ("Click-through rate by position (per-ad 1-minute windows)", CTR_BY_POSITION),
    ("Spend per campaign and hour (1-minute windows summed per UTC hour)", SPEND_PER_HOUR),
    ("Over-delivery per campaign (impressions after the daily budget ran out)", OVERDELIVERY),
    ("Paused campaigns (CampaignBudgetExhausted, one per campaign and day)", PAUSES),
)

EXPLORE = [
    'backbeat sql "SELECT position, sum(clicks) / sum(impressions) AS ctr FROM ad_reports_item '
    'WHERE window_size_ms = 60000 GROUP BY 1 ORDER BY 1"',
    "backbeat sql \"SELECT campaign_id, date_trunc('hour', window_start) AS hour, "
    "sum(spend_micros) / 1e6 AS spend_cents FROM ad_reports WHERE window_size_ms = 60000 "
    'GROUP BY ALL ORDER BY 1, 2"',
    'backbeat sql "SELECT * FROM ad_reports WHERE window_size_ms = 3600000 ORDER BY clicks DESC LIMIT 5"',
    'backbeat sql "SELECT * FROM campaign_pauses ORDER BY paused_at"',
    "backbeat sql \"SELECT count(*) FROM read_parquet('{lake}/ad_reports/**/*.parquet', "
    'hive_partitioning = true)"',
]


def _print_query(title: str, settings: Settings, sql: str) -> None:
    from infra.console import console, table
    from projections.sql import query

    result = query(settings, sql, max_rows=None)
    console.print(table(result.columns, result.rows, title=title))


def report(settings: Settings) -> None:
    """Print the ad demo's report from the read models."""
    from infra.console import console

    _print_query("Ad reports: totals over the 1-minute campaign windows", settings, TOTALS)
    _print_query("Click-through rate by position (per-ad 1-minute windows)", settings, CTR_BY_POSITION)
    _print_query(
        "Spend per campaign and hour (1-minute windows summed per UTC hour)", settings, SPEND_PER_HOUR
    )
    _print_query(
        "Over-delivery per campaign (impressions after the daily budget ran out)", settings, OVERDELIVERY
    )
    _print_query("Paused campaigns (CampaignBudgetExhausted, one per campaign and day)", settings, PAUSES)
    console.print(
        "Prices and budgets are invented (infra/campaigns.toml); clicks come at a deterministic "
        "delay after their impression (docs/ads.md). Data: Open Bandit Dataset, ZOZO, CC BY 4.0.",
        style="dim",
    )
    console.print("\n[bold]Explore further[/] (DuckDB file: " + str(settings.duckdb_path) + ")")
    for line in EXPLORE:
        console.print("  " + line.format(lake=settings.lake_dir), soft_wrap=True)


def run_ads_demo(
    settings: Settings,
    *,
    file: Path = DEFAULT_ADS,
    campaigns: Path = CAMPAIGNS_FILE,
    keep_running: bool = False,
    agent_timeout_s: float = 600.0,
) -> None:
    """The ad pipeline (module docstring). Stops what it started, also on errors.

    Raises:
        BackbeatError subclasses: any step failing (the message says which and why).
    """
    from events.importers.run import import_ads
    from infra import services
    from infra.console import console, progress_bar, run_with_bar
    from infra.processes import pid_file
    from infra.provision import apply_topics
    from projections.runner import run_projections
    from projections.tracking import reset
    from streams.config import IngestConfig
    from streams.runtime.runner import group_id

    began = time.monotonic()
    console.rule("[bold]backbeat demo ads")
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
            reset(settings, AD_PROJECTIONS)
            console.print("the broker started empty: ad read models of an earlier run were reset")
        worker = start_worker(
            settings, env={"BACKBEAT_STREAMS_AGENTS": "ads", "BACKBEAT_ADS_CAMPAIGNS": str(campaigns)}
        )
        console.print(f"worker started with the ad-reporting agent (pid {worker.pid}, log {worker.log})")

        result = run_with_bar(
            f"import {file.name}",
            lambda total, advance: import_ads(
                settings, file, campaigns=campaigns, on_parsed=total, progress=advance
            ),
        )
        console.print(
            f"ads: {result.rows_read:,} rows → {result.impressions:,} AdImpressionServed + "
            f"{result.clicks:,} AdClicked ({result.duplicates:,} duplicate rows collapsed, "
            f"{result.rejected:,} rejected)"
        )
        for reject in result.rejects[:5]:
            console.print(f"  rejected line {reject.line}: {reject.reason}", style="yellow")

        group = group_id(IngestConfig.from_env().app_id, "ad-reporting")
        with progress_bar() as bar:
            task = bar.add_task("agent: ad reports", total=None)
            wait_until(
                lambda: group_progress(settings, group, ADS_TOPIC),
                on_progress=lambda p: bar.update(task, completed=p.committed, total=p.end),
                worker=worker,
                timeout_s=agent_timeout_s,
            )
        with progress_bar() as bar:
            task = bar.add_task("project into DuckDB", total=None)
            stats = run_projections(
                settings,
                list(AD_PROJECTIONS),
                until_caught_up=True,
                progress=lambda p: bar.update(task, completed=p.done, total=p.total),
            )
        console.print(
            f"read models: {stats.applied:,} rows applied from {stats.records:,} records "
            f"({stats.duplicates:,} repeated reports collapsed) → {settings.duckdb_path}, "
            f"lake {settings.lake_dir}"
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
            "the embedded broker was stopped (its topics lived in memory); the ad read models stay "
            "in DuckDB and Parquet for 'backbeat sql'",
            style="dim",
        )


__all__ = ["AD_PROJECTIONS", "DEFAULT_ADS", "report", "run_ads_demo"]
