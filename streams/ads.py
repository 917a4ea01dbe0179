"""The ad-reporting agent: ``ads.delivery`` (impressions and clicks, keyed by campaign) → final
windowed ``AdReportPublished`` on ``ads.reports``, ``CampaignBudgetExhausted`` on
``ads.campaigns``, late events on ``ads.late``, undecodable or invalid records on
``ads.delivery.dlq``. The rules are in :mod:`streams.ad_reporting`.

Configuration (environment):

=============================  ===================================================
``BACKBEAT_ADS_GRACE``         grace period for late events (``2m``)
``BACKBEAT_ADS_ATTRIBUTION``   attribution window of a click (``30m``)
``BACKBEAT_ADS_CAMPAIGNS``     campaigns file (``infra/campaigns.toml``)
``BACKBEAT_ADS_SOURCE_TOPIC``  input (``ads.delivery``); ``BACKBEAT_ADS_REPORTS_TOPIC``,
                               ``…_CAMPAIGNS_TOPIC``, ``…_LATE_TOPIC``, ``…_DLQ_TOPIC``
=============================  ===================================================

Per batch and partition: the runtime decodes and validates (:func:`events.validation.
validate_ad_event`, against the campaigns file), the agent applies the events in offset order and
closes what the watermark made final; checkpoints are :mod:`streams.ad_state` in the agent's
changelog. Outputs, order and restarts are the runtime's (:mod:`streams.runtime.runner`): after a
crash the same reports with the same ids, and no report, budget event, late record or dead letter
published twice (late records are identified by the source record their ``late_*`` headers name).
Counters reconcile: ``records_in = impressions + clicks + late + duplicates + replayed +
dead_lettered``.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from events.campaigns import CAMPAIGNS_FILE, MICROS, Campaigns, load_campaigns
from events.catalog import TopicSpec, topic
from events.validation import Validator, validate_ad_event
from streams import ad_state
from streams.ad_reporting import AdPartition, Exhausted, Report, exhausted_event_id
from streams.features import partition_of
from streams.runtime.agent import BatchAgent, ChangelogRecord, Emit, PartitionBatch, Raw, Result
from streams.windows import parse_duration_ms

log = logging.getLogger(__name__)

TABLE = "ads"
SOURCE_URI = "/streams/ad-reporting"


@dataclass(frozen=True)
class AdsConfig:
    """Resolved configuration (module docstring)."""

    grace_ms: int = 120_000
    attribution_ms: int = 1_800_000
    campaigns_file: Path = CAMPAIGNS_FILE
    source_topic: str = "ads.delivery"
    reports_topic: str = "ads.reports"
    campaigns_topic: str = "ads.campaigns"
    late_topic: str = "ads.late"
    dlq_topic: str = "ads.delivery.dlq"

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> AdsConfig:
        """Read ``BACKBEAT_ADS_*``.

        Raises:
            ConfigError: a malformed duration.
        """
        env = dict(os.environ if environ is None else environ)
        d = cls()
        return cls(
            grace_ms=parse_duration_ms(env.get("BACKBEAT_ADS_GRACE") or "2m"),
            attribution_ms=parse_duration_ms(env.get("BACKBEAT_ADS_ATTRIBUTION") or "30m"),
            campaigns_file=Path(env.get("BACKBEAT_ADS_CAMPAIGNS") or CAMPAIGNS_FILE),
            source_topic=env.get("BACKBEAT_ADS_SOURCE_TOPIC") or d.source_topic,
            reports_topic=env.get("BACKBEAT_ADS_REPORTS_TOPIC") or d.reports_topic,
            campaigns_topic=env.get("BACKBEAT_ADS_CAMPAIGNS_TOPIC") or d.campaigns_topic,
            late_topic=env.get("BACKBEAT_ADS_LATE_TOPIC") or d.late_topic,
            dlq_topic=env.get("BACKBEAT_ADS_DLQ_TOPIC") or d.dlq_topic,
        )

    def topic_specs(self, app_id: str) -> list[TopicSpec]:
        """The agent's topics (catalogue entries, renamed when overridden) and its changelog."""
        names = {
            "ads.delivery": self.source_topic,
            "ads.reports": self.reports_topic,
            "ads.campaigns": self.campaigns_topic,
            "ads.late": self.late_topic,
            "ads.delivery.dlq": self.dlq_topic,
        }
        specs = [dataclasses.replace(topic(k), name=v) for k, v in names.items()]
        specs.append(
            TopicSpec(
                name=f"{app_id}-{TABLE}-changelog",
                partitions=topic("ads.delivery").partitions,
                cleanup_policy="compact",
                key="m|b|c|a|w:<partition>:…",
                doc="Checkpoints of the ad-reporting agent (streams.ad_state).",
            )
        )
        return specs


class AdReporting(BatchAgent):
    """The agent (module docstring); ``app_id`` prefixes its changelog."""

    name = "ad-reporting"
    stats_name = "ads"
    source_uri = SOURCE_URI
    count_names = ("impressions", "clicks", "late", "duplicates", "replayed", "reports", "exhausted")

    def __init__(self, config: AdsConfig, app_id: str) -> None:
        self.config = config
        self.app_id = app_id
        self.campaigns: Campaigns = load_campaigns(config.campaigns_file)
        self.partitions: dict[int, AdPartition] = {}
        self._reports_partitions = topic("ads.reports").partitions
        self._per_campaign: dict[str, tuple[bytes, int, str]] = {}
        self._campaigns_partitions = topic("ads.campaigns").partitions

    @property
    def source_topic(self) -> str:
        """``BACKBEAT_ADS_SOURCE_TOPIC``."""
        return self.config.source_topic

    @property
    def changelog_topic(self) -> str:
        """``<app id>-ads-changelog``."""
        return f"{self.app_id}-{TABLE}-changelog"

    @property
    def output_topics(self) -> Sequence[str]:
        """Reports, budget events, late events, dead letters."""
        c = self.config
        return (c.reports_topic, c.campaigns_topic, c.late_topic, c.dlq_topic)

    @property
    def dlq_topic(self) -> str:
        """``BACKBEAT_ADS_DLQ_TOPIC``."""
        return self.config.dlq_topic

    @property
    def event_types(self) -> Mapping[str, str]:
        """``AdReportPublished`` and ``CampaignBudgetExhausted``."""
        return {
            self.config.reports_topic: "AdReportPublished",
            self.config.campaigns_topic: "CampaignBudgetExhausted",
        }

    def validator(self) -> Validator:
        """:func:`events.validation.validate_ad_event` with the campaigns of the campaigns file."""
        known = frozenset(self.campaigns.by_id)

        def valid(record: Mapping[str, Any], now_ms: int | None) -> str | None:
            return validate_ad_event(record, now_ms, known)

        return valid

    def restore(self, partition: int, items: Mapping[bytes, bytes]) -> None:
        """The partition's ad state from its checkpoint records."""
        c = self.config
        ap = ad_state.restore(partition, items.items(), self.campaigns, c.grace_ms, c.attribution_ms)
        self.partitions[partition] = ap
        log.info("ad reporting: partition %d restored at watermark %d", partition, ap.watermark)

    def process(self, batch: PartitionBatch, now_ms: int) -> Result:
        """Apply the impressions and clicks; emit the reports and budget events made final."""
        ap = self.partitions[batch.partition]
        c0 = dataclasses.replace(ap.counters)
        exhausted: list[Exhausted] = []
        raws: list[Raw] = []
        marks = batch.marks
        for i, (record, offset) in enumerate(zip(batch.records, batch.offsets, strict=True)):
            if record is None:
                mark = marks.get(i)
                if mark is not None:
                    ap.advance_watermark(mark)
                continue
            click = "click_id" in record
            done, is_late = (ap.add_click if click else ap.add_impression)(record, offset)
            if done is not None:
                exhausted.append(done)
            if is_late:
                raws.append(self._late(batch.messages[i], ap, "click" if click else "impression"))
        emits = [self._report(r) for r in ap.advance()]
        emits += [self._exhausted(e) for e in exhausted]
        c1 = ap.counters
        counts = {
            "impressions": c1.impressions - c0.impressions,
            "clicks": c1.clicks - c0.clicks,
            "late": c1.late - c0.late,
            "duplicates": c1.duplicates - c0.duplicates,
            "replayed": c1.replayed - c0.replayed,
            "reports": sum(1 for e in emits if e.event_type == "AdReportPublished"),
            "exhausted": len(exhausted),
        }
        return Result(emits=emits, raws=raws, counts=counts)

    def _late(self, message: Any, ap: AdPartition, kind: str) -> Raw:
        topic, partition, offset = message.topic(), message.partition(), message.offset()
        headers = list(message.headers() or ())
        headers += [
            ("late_reason", f"{kind}_after_pane_closed".encode()),
            ("late_watermark_ms", str(ap.watermark).encode()),
            ("late_topic", topic.encode()),
            ("late_partition", str(partition).encode()),
            ("late_offset", str(offset).encode()),
        ]
        _, ts = message.timestamp()
        return Raw(
            self.config.late_topic, 0, message.key(), message.value(), ts if ts > 0 else None, headers,
            f"late:{topic}/{partition}/{offset}",
        )  # fmt: skip

    def _campaign(self, campaign_id: str) -> tuple[bytes, int, str]:
        """A campaign's record key, its partition on the reports topic (murmur2, as Kafka's
        default partitioner) and its currency, computed once per campaign."""
        known = self._per_campaign.get(campaign_id)
        if known is None:
            key = campaign_id.encode()
            known = (
                key,
                partition_of(key, self._reports_partitions),
                self.campaigns.by_id[campaign_id].currency,
            )
            self._per_campaign[campaign_id] = known
        return known

    def _report(self, r: Report) -> Emit:
        (impressions, clicks, spend, over_impressions, over_clicks, over_spend, unknown, outside) = r.counters
        key, target, currency = self._campaign(r.campaign_id)
        event_id = r.event_id  # a hash: computed once
        record = {
            "event_id": event_id,
            "campaign_id": r.campaign_id,
            "occurred_at": r.final_at,
            "window_start": r.window_start,
            "window_end": r.window_start + r.size_ms,
            "impressions": impressions,
            "clicks": clicks,
            "click_through_rate": clicks / impressions if impressions else 0.0,
            "spend_minor": spend // MICROS,
            "currency": currency,
            "ad_id": r.ad_id,
            "position": r.position,
            "window_size_ms": r.size_ms,
            "window_step_ms": r.step_ms,
            "spend_micros": spend,
            "overdelivery_impressions": over_impressions,
            "overdelivery_clicks": over_clicks,
            "overdelivery_spend_micros": over_spend,
            "clicks_unknown_impression": unknown,
            "clicks_outside_attribution": outside,
        }
        return Emit(self.config.reports_topic, target, key, "AdReportPublished", record, event_id, r.final_at)

    def _exhausted(self, e: Exhausted) -> Emit:
        eid = exhausted_event_id(e.campaign_id, e.day_start)
        key = e.campaign_id.encode()
        record = {
            "event_id": eid,
            "campaign_id": e.campaign_id,
            "occurred_at": e.at_ms,
            "budget_period": "DAILY",
            "period_start": e.day_start,
            "budget_minor": e.budget_micros // MICROS,
            "spent_minor": e.spent_micros // MICROS,
            "currency": self.campaigns.by_id[e.campaign_id].currency,
        }
        target = partition_of(key, self._campaigns_partitions)
        return Emit(self.config.campaigns_topic, target, key, "CampaignBudgetExhausted", record, eid, e.at_ms)

    def checkpoint(self, partition: int, offset: int) -> Iterable[ChangelogRecord]:
        """What changed since the last checkpoint (:mod:`streams.ad_state`)."""
        return ad_state.records(self.partitions[partition], offset)

    def revoke(self, partition: int) -> None:
        """Drop the partition's state."""
        self.partitions.pop(partition, None)

    def state_entries(self) -> int:
        """Keys of state across the assigned partitions: campaign and ad panes, impressions
        awaiting attribution, and budgets (``len`` of each dict, safe while the agent runs)."""
        return sum(len(ap.campaign_panes) + len(ap.ad_panes) + len(ap.impressions) + len(ap.budgets)
                   for ap in list(self.partitions.values()))  # fmt: skip

    def stats(self, counts: Mapping[str, int]) -> dict[str, Any]:
        """The partition watermarks."""
        return {"watermarks": {p: ap.watermark for p, ap in sorted(self.partitions.items())}}

    def reconciles(self, counts: Mapping[str, int]) -> bool:
        """``records_in = impressions + clicks + late + duplicates + replayed + dead_lettered``."""
        names = ("impressions", "clicks", "late", "duplicates", "replayed", "dead_lettered")
        return counts.get("records_in", 0) == sum(counts.get(k, 0) for k in names)


__all__ = ["AdReporting", "AdsConfig"]
