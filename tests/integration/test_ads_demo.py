"""`backbeat demo ads --file <the real all.csv>` end to end, as a user types it (its own broker and
registry on free ports), then the read models it leaves against a DuckDB GROUP BY over the CSV,
window by window: impressions straight from the CSV, clicks from the importer's events (their
times are the importer's documented click-delay rule)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import duckdb
import pyarrow as pa
import pytest

from events.campaigns import load_campaigns
from events.importers.ads import ad_events, events_table
from infra.processes import free_port
from infra.settings import REPO_ROOT
from tests.conftest import DATA

pytestmark = pytest.mark.integration

ADS_ALL = DATA / "ads_open_bandit" / "random" / "all" / "all.csv.gz"
MINUTE, HOUR, STEP = 60_000, 3_600_000, 300_000
ATTRIBUTION_MS = 30 * MINUTE

#: Impressions from the CSV (DuckDB reads it, not our parser) with their campaign and prices.
IMPRESSIONS = """
CREATE TEMP TABLE imp AS
SELECT c.campaign_id, r.item_id, r.position, epoch_us(r."timestamp") // 1000 AS t, c.imp_micros, c.click_micros
FROM read_csv(?, header = true) r JOIN camp c ON list_contains(c.items, r.item_id)
"""

#: Clicks with their impression's time, item, position and campaign (from the importer's events).
CLICKS = """
CREATE TEMP TABLE clk AS
SELECT c.campaign_id, i.ad_id::INTEGER AS item_id, i.position, i.occurred_at AS t_imp, c.occurred_at AS t,
       c.occurred_at - i.occurred_at <= ? AS attributed, camp.click_micros
FROM ev c JOIN ev i ON i.event_type = 'AdImpressionServed' AND i.impression_id = c.impression_id
JOIN camp ON camp.campaign_id = c.campaign_id
WHERE c.event_type = 'AdClicked'
"""

#: Per (item, position, 1-minute window): impressions and attributed clicks (by impression time).
TRUTH_ITEM = """
SELECT item_id, position, ws, sum(n)::BIGINT AS impressions, sum(k)::BIGINT AS clicks FROM (
    SELECT item_id, position, t - t % 60000 AS ws, 1 AS n, 0 AS k FROM imp
    UNION ALL
    SELECT item_id, position, t_imp - t_imp % 60000, 0, 1 FROM clk WHERE attributed
) GROUP BY ALL
"""
GOT_ITEM = """
SELECT item_id, position, epoch_ms(window_start) AS ws, impressions + overdelivery_impressions,
       clicks + overdelivery_clicks
FROM ad_reports_item WHERE window_size_ms = 60000
"""

#: Per campaign window of size/step (1-minute tumbling, hourly every 5 minutes): impressions,
#: attributed clicks, total spend in micros (billed + over-delivered) — every window an
#: impression falls in.
TRUTH_CAMPAIGN = """
WITH facts AS (
    SELECT campaign_id, t, 1 AS n, 0 AS k, imp_micros AS micros FROM imp
    UNION ALL
    SELECT campaign_id, t_imp, 0, 1, click_micros FROM clk WHERE attributed
), starts AS (
    SELECT campaign_id, t - t % $step - back * $step AS ws, n, k, micros
    FROM facts, range(0, $size // $step) AS s(back)
)
SELECT campaign_id, ws, sum(n)::BIGINT, sum(k)::BIGINT, sum(micros)::BIGINT FROM starts GROUP BY ALL
"""
GOT_CAMPAIGN = """
SELECT campaign_id, epoch_ms(window_start), impressions + overdelivery_impressions,
       clicks + overdelivery_clicks, spend_micros + overdelivery_spend_micros
FROM ad_reports WHERE window_size_ms = $size AND window_step_ms = $step
  AND impressions + overdelivery_impressions + clicks + overdelivery_clicks > 0
"""


def differ(db: duckdb.DuckDBPyConnection, truth: str, got: str, params: dict | None = None) -> tuple:
    """(rows in truth, rows in got, truth rows missing from got, got rows not in truth)."""
    sql = (
        f"WITH t AS ({truth}), g AS ({got}) SELECT (SELECT count(*) FROM t), (SELECT count(*) FROM g), "
        "(SELECT count(*) FROM (FROM t EXCEPT ALL FROM g)), (SELECT count(*) FROM (FROM g EXCEPT ALL FROM t))"
    )
    return (db.execute(sql, params) if params else db.execute(sql)).fetchone()


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, subprocess.CompletedProcess[str]]:
    data_dir = tmp_path_factory.mktemp("ads-demo")
    env = dict(os.environ)
    env.update(
        BACKBEAT_BOOTSTRAP_SERVERS=f"127.0.0.1:{free_port()}",
        BACKBEAT_REGISTRY_URL=f"http://127.0.0.1:{free_port()}",
        BACKBEAT_DATA_DIR=str(data_dir),
        COLUMNS="160",
    )
    result = subprocess.run(
        [sys.executable, "-m", "infra.cli", "demo", "ads", "--file", str(ADS_ALL)],
        env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    (data_dir / "demo.out").write_text(result.stdout + result.stderr)
    return data_dir, result


@pytest.fixture(scope="module")
def db(demo: tuple[Path, subprocess.CompletedProcess[str]]) -> duckdb.DuckDBPyConnection:
    data_dir, result = demo
    assert result.returncode == 0, [ln for ln in result.stderr.splitlines() if not ln.startswith("[")][-30:]
    conn = duckdb.connect(str(data_dir / "backbeat.duckdb"), read_only=True)
    campaigns = load_campaigns()
    conn.register(
        "camp",
        pa.table(
            {
                "campaign_id": [c.campaign_id for c in campaigns.by_id.values()],
                "items": [list(c.items) for c in campaigns.by_id.values()],
                "imp_micros": [c.impression_micros for c in campaigns.by_id.values()],
                "click_micros": [c.click_micros for c in campaigns.by_id.values()],
                "budget_micros": [c.budget_micros for c in campaigns.by_id.values()],
            }
        ),
    )
    conn.register("ev", events_table(ad_events(ADS_ALL)))
    conn.execute(IMPRESSIONS, [str(ADS_ALL)])
    conn.execute(CLICKS, [ATTRIBUTION_MS])
    return conn


def test_demo_prints_the_report_and_stops_what_it_started(demo):
    data_dir, result = demo
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert "10,000 rows → 10,000 AdImpressionServed + 38 AdClicked" in out
    for title in (
        "Click-through rate by position",
        "Spend per campaign and hour",
        "Over-delivery per campaign",
    ):
        assert title in out
    assert "Paused campaigns" in out and "Explore further" in out
    assert not (data_dir / "run" / "broker.pid").exists() and not (data_dir / "run" / "worker.pid").exists()


def test_per_ad_windows_equal_the_group_by(db):
    assert db.execute("SELECT count(*) FROM imp").fetchone()[0] == 10_000  # every CSV row has a campaign
    truth_rows, got_rows, missing, extra = differ(db, TRUTH_ITEM, GOT_ITEM)
    assert (missing, extra) == (0, 0) and got_rows == truth_rows > 9_000
    assert db.execute(
        "SELECT sum(impressions + overdelivery_impressions) FROM ad_reports_item WHERE window_size_ms = 60000"
    ).fetchone() == (10_000,)
    # attributed clicks land in the window of their impression (34 of the 38; 4 came after 30 min)
    one_minute = "FROM ad_reports_item WHERE window_size_ms = 60000"
    assert db.execute(f"SELECT sum(clicks + overdelivery_clicks) {one_minute}").fetchone() == (34,)
    assert db.execute(
        "SELECT count(*), count(DISTINCT (item_id, position, window_start)), min(window_size_ms), "
        f"max(window_size_ms) {one_minute}"
    ).fetchone()[1:] == (got_rows, MINUTE, MINUTE)
    assert db.execute(  # hourly per-ad windows too; each impression is in 12 of them
        "SELECT sum(impressions + overdelivery_impressions) FROM ad_reports_item WHERE window_size_ms = 3600000"
    ).fetchone() == (120_000,)


@pytest.mark.parametrize(("size", "step"), [(MINUTE, MINUTE), (HOUR, STEP)])
def test_campaign_windows_equal_the_group_by(db, size: int, step: int):
    params = {"size": size, "step": step}
    truth_rows, got_rows, missing, extra = differ(db, TRUTH_CAMPAIGN, GOT_CAMPAIGN, params)
    assert (missing, extra) == (0, 0) and got_rows == truth_rows > 0
    dupes = db.execute(
        "SELECT count(*) - count(DISTINCT (campaign_id, window_start)) FROM ad_reports "
        "WHERE window_size_ms = $size AND window_step_ms = $step",
        params,
    ).fetchone()
    assert dupes == (0,)  # no window published twice


def test_clicks_outside_attribution_are_counted_at_click_time(db):
    truth = db.execute(
        "SELECT campaign_id, t - t % 60000, count(*) FROM clk WHERE NOT attributed GROUP BY ALL ORDER BY ALL"
    ).fetchall()
    got = db.execute(
        "SELECT campaign_id, epoch_ms(window_start), clicks_outside_attribution FROM ad_reports "
        "WHERE window_size_ms = 60000 AND clicks_outside_attribution > 0 ORDER BY ALL"
    ).fetchall()
    assert got == truth and len(truth) == 4
    assert db.execute("SELECT sum(clicks_unknown_impression) FROM ad_reports").fetchone() == (0,)


def test_budgets_pause_campaigns_and_only_then_is_there_over_delivery(db):
    per_day = db.execute(
        """
        WITH d AS (
            SELECT campaign_id, date_trunc('day', window_start) AS period_start, sum(spend_micros) AS spend,
                   sum(overdelivery_impressions) AS over, min(window_start) FILTER (WHERE overdelivery_impressions > 0)
                   AS first_over
            FROM ad_reports WHERE window_size_ms = 60000 GROUP BY ALL
        )
        SELECT d.campaign_id, d.period_start, d.spend >= c.budget_micros, d.over, p.paused_at, d.first_over,
               p.spent_minor >= p.budget_minor
        FROM d JOIN camp c USING (campaign_id)
        LEFT JOIN campaign_pauses p ON p.campaign_id = d.campaign_id AND p.period_start = d.period_start
        """
    ).fetchall()
    paused = [r for r in per_day if r[4] is not None]
    assert len(paused) == db.execute("SELECT count(*) FROM campaign_pauses").fetchone()[0] > 0
    for campaign, day, reached, over, paused_at, first_over, spent_enough in per_day:
        assert reached == (paused_at is not None), (campaign, day)  # paused exactly when spent
        if paused_at is None:
            assert over == 0, (campaign, day)
        else:
            assert spent_enough and (
                first_over is None or first_over >= paused_at.replace(second=0, microsecond=0)
            )
    assert db.execute(
        "SELECT count(DISTINCT (campaign_id, period_start)) = count(*) FROM campaign_pauses"
    ).fetchone()[0]


def test_reports_are_in_the_lake_too(db, demo):
    data_dir, _ = demo
    for table in ("ad_reports", "ad_reports_item"):
        files = sorted(str(f) for f in (data_dir / "lake" / table).rglob("*.parquet"))
        in_lake = db.execute("SELECT count(*) FROM read_parquet(?)", [files]).fetchone()[0]
        assert in_lake == db.execute(f"SELECT count(*) FROM {table}").fetchone()[0] > 0


def test_the_documented_queries_run_and_give_the_documented_figures(db):
    doc = (REPO_ROOT / "docs" / "ads.md").read_text()
    blocks = re.findall(r"```sql\n(.*?)```", doc, re.S)
    assert len(blocks) == 5
    results = [db.execute(sql).fetchall() for sql in blocks]
    assert all(results)
    ctr, spend, over, pauses, _best = results
    assert ctr == [(1, 3322, 12, 0.361), (2, 3412, 13, 0.381), (3, 3266, 9, 0.276)]
    assert spend[0][0] == "c-00" and len(spend) == 5
    assert [(c, o) for c, _, o, *_ in over] == [
        ("c-04", 101),
        ("c-01", 50),
        ("c-00", 30),
        ("c-08", 20),
        ("c-07", 15),
        ("c-06", 4),
    ]
    assert len(pauses) == 12 and ("c-04", "14:59:41", 150, 150, 37) in [
        (r[0], r[2], r[3], r[4], r[5]) for r in pauses
    ]
    totals = db.execute(
        "SELECT sum(impressions), sum(overdelivery_impressions), sum(clicks), sum(overdelivery_clicks), "
        "sum(clicks_outside_attribution), sum(spend_micros) FROM ad_reports WHERE window_size_ms = 60000"
    ).fetchone()
    assert totals == (9_780, 220, 33, 1, 4, 24_307_300_000)
    counts = db.execute(
        "SELECT (SELECT count(*) FILTER (WHERE window_size_ms = 60000) FROM ad_reports), "
        "(SELECT count(*) FILTER (WHERE window_size_ms = 3600000) FROM ad_reports), "
        "(SELECT count(*) FILTER (WHERE window_size_ms = 60000) FROM ad_reports_item), "
        "(SELECT count(*) FILTER (WHERE window_size_ms = 3600000) FROM ad_reports_item)"
    ).fetchone()
    assert counts == (9_237, 19_380, 9_786, 101_424)
