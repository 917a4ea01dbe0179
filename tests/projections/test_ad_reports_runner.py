"""The ad read models on the real broker: AdReportPublished and CampaignBudgetExhausted events
(delivered twice, as at-least-once delivery may) → ad_reports, ad_reports_item and
campaign_pauses in DuckDB and the Parquet lake, once each."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

import pytest

from events.catalog import TopicSpec
from events.control import watermark_headers
from events.producer import EventProducer
from infra.provision import apply_topics
from infra.settings import Settings
from projections.runner import run_projections
from projections.sql import query
from tests.projections.test_ad_reports import HOUR, MINUTE, T0, exhausted, report

pytestmark = pytest.mark.integration

AD_MODELS = ["ad_reports", "ad_reports_item", "campaign_pauses"]


@pytest.fixture
def settings(stack: Settings, tmp_path: Path) -> Settings:
    return dataclasses.replace(stack, data_dir=tmp_path)


def send(settings: Settings, topic: str, event_type: str, records: list[dict]) -> None:
    producer = EventProducer(settings)
    producer.send_many(
        topic, event_type, records, key_field="campaign_id", time_field="occurred_at", source="/tests"
    )
    producer.flush()


def rows(settings: Settings, sql: str) -> list[tuple]:
    return query(settings, sql, max_rows=None).rows


def lake_rows(settings: Settings, name: str) -> int:
    files = sorted((settings.lake_dir / name).rglob("*.parquet"))
    if not files:
        return 0
    paths = ", ".join(f"'{f}'" for f in files)
    return rows(settings, f"SELECT count(*) FROM read_parquet([{paths}])")[0][0]


def test_reports_and_pauses_land_once_each(settings: Settings, unique: Callable[[str], str]):
    reports_topic, campaigns_topic = unique("ads.reports"), unique("ads.campaigns")
    apply_topics(settings, [TopicSpec(reports_topic, 3), TopicSpec(campaigns_topic, 3)])
    minute = [report(c, T0 + i * MINUTE) for c in ("c-00", "c-01") for i in range(30)]
    hourly = [report(c, T0 + i * 5 * MINUTE, HOUR, 5 * MINUTE) for c in ("c-00", "c-01") for i in range(12)]
    per_ad = [report("c-00", T0 + i * MINUTE, ad=str(i % 8), position=1 + i % 3) for i in range(30)]
    first = minute + hourly + per_ad
    # at-least-once: a batch delivered again, then a few re-emitted after a restart
    send(settings, reports_topic, "AdReportPublished", first)
    send(settings, reports_topic, "AdReportPublished", first[::7])
    pauses = [exhausted("c-04", T0), exhausted("c-04", T0 + 24 * HOUR), exhausted("c-09", T0)]
    send(settings, campaigns_topic, "CampaignBudgetExhausted", pauses + pauses[:1])
    topics = {
        "ad_reports": reports_topic,
        "ad_reports_item": reports_topic,
        "campaign_pauses": campaigns_topic,
    }

    stats = run_projections(settings, AD_MODELS, until_caught_up=True, topics=topics)

    assert stats.per_projection == {"ad_reports": 84, "ad_reports_item": 30, "campaign_pauses": 3}
    assert stats.rejects == 0
    assert stats.duplicates == len(first[::7]) + 1
    got = rows(
        settings,
        "SELECT window_size_ms, window_step_ms, count(*), count(DISTINCT event_id), sum(impressions), "
        "sum(spend_micros), sum(clicks_outside_attribution) FROM ad_reports GROUP BY ALL ORDER BY 1",
    )
    assert got == [
        (MINUTE, MINUTE, 60, 60, 60 * 40, 60 * 160_000_001, 60 * 2),
        (HOUR, 5 * MINUTE, 24, 24, 24 * 40, 24 * 160_000_001, 24 * 2),
    ]
    items = rows(
        settings, "SELECT item_id, position, count(*) FROM ad_reports_item GROUP BY ALL ORDER BY 1, 2"
    )
    assert [(i, p) for i, p, _ in items] == sorted({(i % 8, 1 + i % 3) for i in range(30)})
    assert sum(n for *_, n in items) == 30
    assert rows(
        settings, "SELECT count(*) FROM ad_reports_item WHERE window_end - window_start <> INTERVAL 1 MINUTE"
    ) == [(0,)]
    paused = rows(
        settings,
        "SELECT campaign_id, period_start, paused_at, spent_minor FROM campaign_pauses ORDER BY 1, 2",
    )
    assert [(c, str(p)) for c, p, _, _ in paused] == [
        ("c-04", "2019-11-24 00:00:00"), ("c-04", "2019-11-25 00:00:00"), ("c-09", "2019-11-24 00:00:00")
    ]  # fmt: skip
    assert lake_rows(settings, "ad_reports") == 84 and lake_rows(settings, "ad_reports_item") == 30

    # later reports (and a watermark control record) are applied incrementally, copies still once
    more = [report("c-02", T0 + HOUR), report("c-02", T0 + HOUR, ad="17", position=2)]
    send(settings, reports_topic, "AdReportPublished", more + minute[:3])
    control = EventProducer(settings)
    control.producer.produce(reports_topic, b"", partition=0, headers=watermark_headers(T0))
    control.flush()
    again = run_projections(settings, AD_MODELS, until_caught_up=True, topics=topics)
    assert again.per_projection == {"ad_reports": 1, "ad_reports_item": 1}
    assert again.duplicates == 3 and again.rejects == 0 and again.controls == 2  # seen by both runners
    assert rows(settings, "SELECT count(*) FROM ad_reports") == [(85,)]
    assert rows(settings, "SELECT count(*) FROM ad_reports_item") == [(31,)]
    assert lake_rows(settings, "ad_reports") == 85
