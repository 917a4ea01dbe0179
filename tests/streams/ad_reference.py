"""Ground truth for the ad-reporting agent: DuckDB GROUP BY queries over the raw ad events, with
the rules of :mod:`streams.ad_reporting` written in SQL (lateness by the watermark before each
record, first-seen dedupe, attribution by join, the daily budget by a running sum)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import duckdb
import pyarrow as pa

from events.campaigns import Campaigns
from streams.ad_reporting import FIELDS


@dataclass(frozen=True)
class AdRow:
    """One record of ``ads.delivery``: ``kind`` imp | click | mark (a watermark at ``t``)."""

    p: int
    off: int
    kind: str
    t: int
    event_id: str = ""
    impression_id: str = ""
    campaign: str = ""
    ad: str = ""
    position: int = 0


def reports(rows: Sequence[AdRow], campaigns: Campaigns, grace_ms: int, attribution_ms: int) -> dict:
    """``{(campaign, ad | None, position | None, size_ms, window_start): counters}`` (FIELDS
    order) for every window with a non-zero counter, and the exhaustions
    ``{(campaign, day_start): (at_ms, spent_micros)}``."""
    con = duckdb.connect()
    con.register("src_a", pa.Table.from_pylist([vars(r) for r in rows]))
    con.execute("CREATE TABLE src AS SELECT * FROM src_a")
    prices = [
        {"campaign": c.campaign_id, "imp_cost": c.impression_micros, "click_cost": c.click_micros,
         "budget": c.budget_micros}
        for c in campaigns.by_id.values()
    ]  # fmt: skip
    con.register("prices", pa.Table.from_pylist(prices))
    con.execute(
        f"""
        CREATE TABLE acc AS
        SELECT * FROM (SELECT *, coalesce(max(t) OVER (PARTITION BY p ORDER BY off
                       ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING), -1) AS w_before FROM src)
        WHERE kind <> 'mark' AND w_before < t - t % 60000 + 60000 + {grace_ms};
        CREATE TABLE imps AS SELECT * FROM acc WHERE kind = 'imp'
            QUALIFY row_number() OVER (PARTITION BY impression_id ORDER BY off) = 1;
        CREATE TABLE clicks AS
        SELECT c.*, i.t AS it, i.ad AS iad, i.position AS ipos, i.campaign AS icamp,
               CASE WHEN i.impression_id IS NULL THEN 'unknown'
                    WHEN c.t - i.t > {attribution_ms} THEN 'outside' ELSE 'attr' END AS verdict
        FROM (SELECT * FROM acc WHERE kind = 'click'
              QUALIFY row_number() OVER (PARTITION BY event_id ORDER BY off) = 1) c
        LEFT JOIN imps i ON i.impression_id = c.impression_id AND i.p = c.p AND i.off < c.off;
        CREATE TABLE costs AS
        SELECT campaign, t - t % 86400000 AS day, p, off, t, imp_cost AS cost FROM imps JOIN prices USING (campaign)
        UNION ALL
        SELECT icamp, it - it % 86400000, p, off, t, click_cost FROM clicks JOIN prices ON prices.campaign = icamp
        WHERE verdict = 'attr';
        CREATE TABLE ex AS
        SELECT campaign, day, arg_min(off, off) AS x_off, arg_min(t, off) AS at, arg_min(spent, off) AS spent
        FROM (SELECT c.*, sum(cost) OVER (PARTITION BY campaign, day ORDER BY off ROWS UNBOUNDED PRECEDING)
                      AS spent, budget FROM costs c JOIN prices USING (campaign))
        WHERE spent >= budget GROUP BY ALL;
        CREATE TABLE facts AS
        SELECT i.campaign, i.ad, i.position, i.t - i.t % 60000 AS pane,
               (ex.x_off IS NOT NULL AND i.off > ex.x_off) AS over, 'imp' AS what, pr.imp_cost AS cost
        FROM imps i JOIN prices pr USING (campaign)
        LEFT JOIN ex ON ex.campaign = i.campaign AND ex.day = i.t - i.t % 86400000
        UNION ALL
        SELECT c.icamp, c.iad, c.ipos, c.it - c.it % 60000,
               (ex.x_off IS NOT NULL AND i.off > ex.x_off), 'click', pr.click_cost
        FROM clicks c JOIN imps i ON i.impression_id = c.impression_id AND i.p = c.p
        JOIN prices pr ON pr.campaign = c.icamp
        LEFT JOIN ex ON ex.campaign = c.icamp AND ex.day = c.it - c.it % 86400000
        WHERE c.verdict = 'attr'
        UNION ALL
        SELECT campaign, NULL, NULL, t - t % 60000, false, verdict, 0 FROM clicks WHERE verdict <> 'attr';
        """
    )
    counters = """
        count(*) FILTER (WHERE what = 'imp' AND NOT over),
        count(*) FILTER (WHERE what = 'click' AND NOT over),
        coalesce(sum(cost) FILTER (WHERE what IN ('imp', 'click') AND NOT over), 0),
        count(*) FILTER (WHERE what = 'imp' AND over),
        count(*) FILTER (WHERE what = 'click' AND over),
        coalesce(sum(cost) FILTER (WHERE what IN ('imp', 'click') AND over), 0),
        count(*) FILTER (WHERE what = 'unknown'),
        count(*) FILTER (WHERE what = 'outside')"""
    out: dict = {}
    for size, step in ((60_000, 60_000), (3_600_000, 300_000)):
        sql = f"""SELECT campaign, start, {counters} FROM (
                    SELECT f.*, f.pane - f.pane % {step} - k * {step} AS start
                    FROM facts f, range(0, {size // step}) r(k))
                  GROUP BY ALL"""
        for campaign, start, *values in con.execute(sql).fetchall():
            out[(campaign, None, None, size, start)] = tuple(int(v) for v in values)
    for size, step in ((60_000, 60_000), (3_600_000, 300_000)):
        sql = f"""SELECT campaign, ad, position, start, {counters} FROM (
                    SELECT f.*, f.pane - f.pane % {step} - k * {step} AS start
                    FROM facts f, range(0, {size // step}) r(k) WHERE ad IS NOT NULL)
                  GROUP BY ALL"""
        for campaign, ad, position, start, *values in con.execute(sql).fetchall():
            out[(campaign, ad, position, size, start)] = tuple(int(v) for v in values)
    out = {k: v for k, v in out.items() if any(v)}
    assert len(FIELDS) == 8
    exhausted = {(c, d): (at, spent) for c, d, _, at, spent in con.execute("SELECT * FROM ex").fetchall()}
    return {"reports": out, "exhausted": exhausted}
