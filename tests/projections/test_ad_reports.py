"""The ad read models, pure: AdReportPublished → ad_reports / ad_reports_item rows (split by the
row filter on ad_id), CampaignBudgetExhausted → campaign_pauses, and runner grouping."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import pytest

from events.importers.base import event_id
from events.schemas import get_schema
from events.serde import AvroEncoder
from projections.decoding import BatchPreparer
from projections.readmodels import (
    AD_REPORTS,
    AD_REPORTS_ITEM,
    CAMPAIGN_PAUSES,
    LISTENS,
    PROJECTIONS,
    SESSIONS,
    RowFilter,
    to_table,
    to_table_checked,
)
from projections.runner import share_runners
from tests.projections.test_readmodels import FakeMsg

MINUTE, HOUR = 60_000, 3_600_000
T0 = 1_574_553_600_000  # 2019-11-24 00:00 UTC


def report(
    campaign: str = "c-01",
    start: int = T0,
    size: int = MINUTE,
    step: int = MINUTE,
    ad: str | None = None,
    position: int | None = None,
    **over: Any,
) -> dict[str, Any]:
    """An AdReportPublished as the agent emits it (id: campaign, ad, position, size, start)."""
    rec: dict[str, Any] = {
        "event_id": event_id(campaign, ad, position, size, start),
        "campaign_id": campaign,
        "occurred_at": start + size + 30 * MINUTE + 2 * MINUTE,
        "window_start": start,
        "window_end": start + size,
        "impressions": 40,
        "clicks": 2,
        "click_through_rate": 0.05,
        "spend_minor": 160,
        "currency": "EUR",
        "ad_id": ad,
        "position": position,
        "window_size_ms": size,
        "window_step_ms": step,
        "spend_micros": 160_000_001,
        "overdelivery_impressions": 3,
        "overdelivery_clicks": 1,
        "overdelivery_spend_micros": 4_500_000,
        "clicks_unknown_impression": 1 if ad is None else 0,
        "clicks_outside_attribution": 2 if ad is None else 0,
    }
    rec.update(over)
    return rec


def exhausted(campaign: str = "c-04", day: int = T0, **over: Any) -> dict[str, Any]:
    """A CampaignBudgetExhausted (once per campaign and UTC day)."""
    rec: dict[str, Any] = {
        "event_id": event_id(campaign, "exhausted", day),
        "campaign_id": campaign,
        "occurred_at": day + 5 * HOUR + 17,
        "budget_period": "DAILY",
        "period_start": day,
        "budget_minor": 150,
        "spent_minor": 151,
        "currency": "EUR",
    }
    rec.update(over)
    return rec


def test_campaign_report_row_keeps_every_figure():
    row = to_table(AD_REPORTS, [report(size=HOUR, step=5 * MINUTE)], [2], [9]).to_pylist()[0]
    assert row["window_start"] == datetime(2019, 11, 24, 0, 0)
    assert row["window_end"] == datetime(2019, 11, 24, 1, 0)
    assert (row["window_size_ms"], row["window_step_ms"]) == (HOUR, 5 * MINUTE)
    assert (row["impressions"], row["clicks"], row["click_through_rate"]) == (40, 2, 0.05)
    assert (row["spend_micros"], row["spend_minor"], row["currency"]) == (160_000_001, 160, "EUR")
    assert (row["overdelivery_impressions"], row["overdelivery_clicks"]) == (3, 1)
    assert row["overdelivery_spend_micros"] == 4_500_000
    assert (row["clicks_unknown_impression"], row["clicks_outside_attribution"]) == (1, 2)
    assert row["occurred_at"] == datetime(2019, 11, 24, 1, 32)
    assert (row["kafka_partition"], row["kafka_offset"]) == (2, 9)


def test_every_report_field_that_matters_is_a_column():
    fields = {f["name"] for f in get_schema("AdReportPublished").raw["fields"]}
    assert {c.source for c in AD_REPORTS.columns} == fields - {"ad_id", "position"}
    item_cols = {c.name for c in AD_REPORTS_ITEM.columns}
    assert {"item_id", "position", "window_start", "window_end", "impressions", "clicks"} <= item_cols
    assert {"click_through_rate", "spend_micros", "overdelivery_impressions"} <= item_cols
    pause_cols = [c.name for c in CAMPAIGN_PAUSES.columns]
    assert {"campaign_id", "period_start", "paused_at", "budget_minor", "spent_minor", "currency"} <= set(
        pause_cols
    )
    assert {"ad_reports", "ad_reports_item", "campaign_pauses"} <= set(PROJECTIONS)


def test_per_ad_report_row_has_the_item_as_an_integer():
    row = to_table(AD_REPORTS_ITEM, [report(ad="14", position=3)], [0], [1]).to_pylist()[0]
    assert (row["item_id"], row["position"], row["campaign_id"]) == (14, 3, "c-01")
    assert row["window_end"] == datetime(2019, 11, 24, 0, 1) and row["window_size_ms"] == MINUTE
    assert (row["impressions"], row["clicks"], row["overdelivery_impressions"]) == (40, 2, 3)


def test_a_non_numeric_ad_or_a_missing_position_is_a_reject_not_a_crash():
    events = [report(ad="14", position=1), report(ad="banner-7", position=1), report(ad="3", position=None)]
    table, rejects = to_table_checked(AD_REPORTS_ITEM, events, [0, 0, 0], [1, 2, 3])
    assert table.column("item_id").to_pylist() == [14]
    assert [i for i, _ in rejects] == [1, 2]
    assert "NULL" in rejects[1][1]


def test_row_filter_takes_reports_apart():
    campaign, per_ad = report(), report(ad="7", position=2)
    assert RowFilter("ad_id", is_null=True).accepts(campaign)
    assert not RowFilter("ad_id", is_null=True).accepts(per_ad)
    assert RowFilter("ad_id", is_null=False).accepts(per_ad)
    assert str(AD_REPORTS.where) == "ad_id IS NULL" and str(AD_REPORTS_ITEM.where) == "ad_id IS NOT NULL"


def test_batch_preparer_gives_each_read_model_its_reports_and_moves_every_offset():
    schema = get_schema("AdReportPublished").parsed_plain
    enc = AvroEncoder(schema, 5)
    events = [
        report(),
        report(ad="7", position=2),
        report(size=HOUR, step=5 * MINUTE),
        report(ad="8", position=1),
    ]
    msgs = [FakeMsg(enc.encode(e), i) for i, e in enumerate(events)]
    for proj, want, filtered in (
        (AD_REPORTS, [events[0]["event_id"], events[2]["event_id"]], 2),
        (AD_REPORTS_ITEM, [events[1]["event_id"], events[3]["event_id"]], 2),
    ):
        out = BatchPreparer({"t": proj.on_topic("t")}, {5: schema}.__getitem__).prepare(msgs)
        assert out.tables[proj.name].column("event_id").to_pylist() == want
        assert out.filtered == filtered and not out.rejects
        assert out.ends == {("t", 0): 4}


def test_campaign_pause_row():
    row = to_table(CAMPAIGN_PAUSES, [exhausted()], [1], [0]).to_pylist()[0]
    assert (row["campaign_id"], row["budget_period"]) == ("c-04", "DAILY")
    assert row["period_start"] == datetime(2019, 11, 24)
    assert row["paused_at"] == datetime(2019, 11, 24, 5, 0, 0, 17_000)
    assert (row["budget_minor"], row["spent_minor"], row["currency"]) == (150, 151, "EUR")


@pytest.mark.parametrize(
    ("names", "groups"),
    [
        (["listens", "sessions"], [["listens", "sessions"]]),
        (
            ["ad_reports", "ad_reports_item", "campaign_pauses"],
            [["ad_reports", "campaign_pauses"], ["ad_reports_item"]],
        ),
        (
            ["listens", "ad_reports", "ad_reports_item", "sessions"],
            [["listens", "ad_reports", "sessions"], ["ad_reports_item"]],
        ),
    ],
)
def test_share_runners_never_puts_two_readers_of_a_topic_in_one_runner(
    names: list[str], groups: list[list[str]]
):
    got = share_runners([PROJECTIONS[n] for n in names])
    assert [[p.name for p in g] for g in got] == groups
    assert share_runners([LISTENS, SESSIONS, LISTENS.on_topic("x")]) == [
        [LISTENS, SESSIONS, LISTENS.on_topic("x")]
    ]
