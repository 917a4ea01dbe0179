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

Per batch and partition: decode, apply in offset order, close what the watermark made final,
write the outputs and wait for the broker, then the checkpoints (:mod:`streams.ad_state`) to the
``ads`` table's changelog partition equal to the source partition — the guarantees of
:mod:`streams.features`: after a crash the same reports with the same ids. **No report or budget
event is published twice**: each checkpoint also records where the report and campaign topics
stood after the batch's outputs were on the broker; a partition restored after a crash reads
those topics from there to their end and does not publish again an event id it finds (what was
published between its last checkpoint and the crash). Late events and dead letters may repeat
(their ``late_*``/``dlq_*`` headers name the source record).
Counters reconcile: ``events_in = impressions + clicks + late + duplicates + replayed +
dead_lettered``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import time
from collections.abc import Sequence, Set
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from confluent_kafka import Consumer, TopicPartition
from faust.types import TP, EventT

from events.campaigns import CAMPAIGNS_FILE, MICROS, Campaigns, load_campaigns
from events.catalog import TopicSpec, topic
from events.cloudevents import ce_headers
from events.control import is_control, watermark_of
from events.offsets import high_watermarks
from events.registry_client import registry_for
from events.schemas import get_schema
from events.serde import AvroDecoder, AvroEncoder
from infra.errors import InfraError
from infra.settings import Settings
from streams import ad_state
from streams.ad_reporting import AdPartition, Exhausted, Report, exhausted_event_id
from streams.features import partition_of
from streams.records import Record, dead_letter, send_records, send_tracked
from streams.windows import parse_duration_ms

if TYPE_CHECKING:
    from streams.app import BackbeatApp

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


@dataclass
class AdStats:
    """Counters of this process (module docstring)."""

    events_in: int = 0
    impressions: int = 0
    clicks: int = 0
    late: int = 0
    duplicates: int = 0
    replayed: int = 0
    dead_lettered: int = 0
    control_records: int = 0
    reports: int = 0
    exhausted: int = 0
    suppressed: int = 0
    batches: int = 0
    busy_s: float = 0.0

    def reconciles(self) -> bool:
        """Every event in is accounted for once."""
        out = (
            self.impressions + self.clicks + self.late + self.duplicates + self.replayed + self.dead_lettered
        )
        return self.events_in == out


class AdReporting:
    """State and batch processing of the agent (one instance per worker process)."""

    def __init__(self, faust_app: BackbeatApp, table: Any, config: AdsConfig) -> None:
        self.app = faust_app
        self.table = table
        self.config = config
        self.settings = faust_app.backbeat_settings
        self.campaigns: Campaigns = load_campaigns(config.campaigns_file)
        self.partitions: dict[int, AdPartition] = {}
        self.stats = AdStats()
        self._decoder: AvroDecoder | None = None
        self._report_encoder: AvroEncoder | None = None
        self._exhausted_encoder: AvroEncoder | None = None
        self._reports_partitions = topic("ads.reports").partitions
        self._published: set[str] = set()  # event ids found after restored checkpoints
        self._campaigns_partitions = topic("ads.campaigns").partitions

    async def start(self) -> None:
        """Connect to the registry (registers the output event types)."""
        if self._report_encoder is None:
            registry = registry_for(self.settings.registry_url)
            c = self.config
            self._report_encoder = await asyncio.to_thread(
                registry.encoder, c.reports_topic, "AdReportPublished"
            )
            self._exhausted_encoder = await asyncio.to_thread(
                registry.encoder, c.campaigns_topic, "CampaignBudgetExhausted"
            )
            self._decoder = registry.decoder()

    def forget(self, tps: Set[TP]) -> None:
        """Drop revoked partitions (restored from the table when reassigned)."""
        for tp in tps:
            if tp.topic == self.config.source_topic:
                self.partitions.pop(tp.partition, None)

    async def _partition(self, partition: int) -> AdPartition:
        ap = self.partitions.get(partition)
        if ap is None:
            c = self.config
            ap = ad_state.restore(
                partition, self.table.data.items(), self.campaigns, c.grace_ms, c.attribution_ms
            )
            self.partitions[partition] = ap
            found = await asyncio.to_thread(published_ids, self.settings, ap.output_offsets)
            self._published |= found
            log.info(
                "ad reporting: partition %d restored at watermark %d; %d events published after it",
                partition, ap.watermark, len(found),
            )  # fmt: skip
        return ap

    async def process(self, events: Sequence[EventT]) -> None:
        """One batch (module docstring)."""
        started = time.perf_counter()
        try:
            await self._process(events)
        finally:
            self.stats.busy_s += time.perf_counter() - started

    async def _process(self, events: Sequence[EventT]) -> None:
        by_partition: dict[int, list[Any]] = {}
        for event in events:
            by_partition.setdefault(event.message.partition, []).append(event.message)
        reports: list[Report] = []
        exhausted: list[Exhausted] = []
        late: list[Record] = []
        dead: list[Record] = []
        checkpoints: list[tuple[int, AdPartition, int]] = []
        for partition, msgs in by_partition.items():
            ap = await self._partition(partition)
            self._feed(ap, msgs, exhausted, late, dead)
            reports += ap.advance()
            checkpoints.append((partition, ap, msgs[-1].offset))
        self.stats.batches += 1
        producer = self.app.producer._ensure_producer()
        tracked: list[tuple[str, asyncio.Future[int]]] = []
        if reports:
            tracked += await self._send_reports(producer, reports)
        if exhausted:
            tracked += await self._send_exhausted(producer, exhausted)
        pending: list[asyncio.Future[Any]] = []
        if late:
            pending += await send_records(producer, self.config.late_topic, 0, late)
        if dead:
            pending += await send_records(producer, self.config.dlq_topic, 0, dead)
        ends = await asyncio.gather(*(f for _, f in tracked))
        if pending:
            await asyncio.gather(*pending)  # outputs are on the broker before the checkpoints
        positions: dict[str, int] = {}
        for (where, _), end in zip(tracked, ends, strict=True):
            positions[where] = max(positions.get(where, 0), end)
        changelog = self.table.changelog_topic.get_topic_name()
        for partition, ap, offset in checkpoints:
            ap.output_offsets = {**ap.output_offsets, **positions}
            records = ad_state.records(ap, offset)
            if records:
                await send_records(producer, changelog, partition, [(k, v, None, []) for k, v in records])

    def _feed(
        self,
        ap: AdPartition,
        msgs: list[Any],
        exhausted: list[Exhausted],
        late: list[Record],
        dead: list[Record],
    ) -> None:
        decoder = self._decoder
        assert decoder is not None, "start() first"
        control = [bool(m.headers) and is_control(m.headers) for m in msgs]
        records, errors = decoder.decode_many([m.value for m, c in zip(msgs, control, strict=True) if not c])
        reasons = dict(errors)
        s = self.stats
        c0 = dataclasses.replace(ap.counters)
        j = 0
        for m, is_ctl in zip(msgs, control, strict=True):
            if is_ctl:
                s.control_records += 1
                mark = watermark_of(m.headers)
                if mark is not None:
                    ap.advance_watermark(mark)
                continue
            record = records[j]
            k = j
            j += 1
            s.events_in += 1
            if record is None:
                dead.append(dead_letter(m, "decode_error", reasons[k]))
                s.dead_lettered += 1
                continue
            problem = self._invalid(record)
            if problem is not None:
                dead.append(dead_letter(m, "validation_error", problem))
                s.dead_lettered += 1
                continue
            click = "click_id" in record
            done, is_late = (ap.add_click if click else ap.add_impression)(record, m.offset)
            if done is not None:
                exhausted.append(done)
            if is_late:
                late.append(self._late(m, ap, "click" if click else "impression"))
        c1 = ap.counters
        s.impressions += c1.impressions - c0.impressions
        s.clicks += c1.clicks - c0.clicks
        s.late += c1.late - c0.late
        s.duplicates += c1.duplicates - c0.duplicates
        s.replayed += c1.replayed - c0.replayed

    def _invalid(self, record: dict[str, Any]) -> str | None:
        campaign = record.get("campaign_id")
        if campaign not in self.campaigns.by_id:
            return f"campaign_id={campaign!r} is not in {self.config.campaigns_file.name}"
        occurred = record.get("occurred_at")
        if not isinstance(occurred, int) or occurred <= 0:
            return f"occurred_at={occurred!r} is not a positive ms timestamp"
        if "click_id" not in record and not 1 <= int(record.get("position") or 0) <= 3:
            return f"position={record.get('position')!r} is not 1-3"
        return None

    @staticmethod
    def _late(message: Any, ap: AdPartition, kind: str) -> Record:
        headers = list(message.headers or ())
        headers += [
            ("late_reason", f"{kind}_after_pane_closed".encode()),
            ("late_watermark_ms", str(ap.watermark).encode()),
            ("late_topic", message.topic.encode()),
            ("late_partition", str(message.partition).encode()),
            ("late_offset", str(message.offset).encode()),
        ]
        ts = int(message.timestamp * 1000) if message.timestamp else None
        return (message.key, message.value, ts, headers)

    def _fresh(self, event_id: str) -> bool:
        """False for an event published before a crash (found after a restored checkpoint)."""
        if event_id in self._published:
            self._published.discard(event_id)
            self.stats.suppressed += 1
            return False
        return True

    async def _send_reports(
        self, producer: Any, reports: list[Report]
    ) -> list[tuple[str, asyncio.Future[int]]]:
        encoder = self._report_encoder
        assert encoder is not None, "start() first"
        reports = [r for r in reports if self._fresh(r.event_id)]
        full_name = get_schema("AdReportPublished").full_name
        values = encoder.encode_many(self._report_record(r) for r in reports)
        by_partition: dict[int, list[Record]] = {}
        for r, value in zip(reports, values, strict=True):
            key = r.campaign_id.encode()
            headers = ce_headers(
                event_id=r.event_id, event_type=full_name, source=SOURCE_URI, time_ms=r.final_at
            )
            target = partition_of(key, self._reports_partitions)
            by_partition.setdefault(target, []).append((key, value, r.final_at, headers))
        pending: list[tuple[str, asyncio.Future[int]]] = []
        for target, records in by_partition.items():
            where = f"{self.config.reports_topic}:{target}"
            pending += [
                (where, f) for f in await send_tracked(producer, self.config.reports_topic, target, records)
            ]
        self.stats.reports += len(reports)
        return pending

    def _report_record(self, r: Report) -> dict[str, Any]:
        impressions, clicks = r.get("impressions"), r.get("clicks")
        spend = r.get("spend_micros")
        return {
            "event_id": r.event_id,
            "campaign_id": r.campaign_id,
            "occurred_at": r.final_at,
            "window_start": r.window_start,
            "window_end": r.window_end,
            "impressions": impressions,
            "clicks": clicks,
            "click_through_rate": clicks / impressions if impressions else 0.0,
            "spend_minor": spend // MICROS,
            "currency": self.campaigns.by_id[r.campaign_id].currency,
            "ad_id": r.ad_id,
            "position": r.position,
            "window_size_ms": r.size_ms,
            "window_step_ms": r.step_ms,
            "spend_micros": spend,
            "overdelivery_impressions": r.get("overdelivery_impressions"),
            "overdelivery_clicks": r.get("overdelivery_clicks"),
            "overdelivery_spend_micros": r.get("overdelivery_spend_micros"),
            "clicks_unknown_impression": r.get("clicks_unknown_impression"),
            "clicks_outside_attribution": r.get("clicks_outside_attribution"),
        }

    async def _send_exhausted(
        self, producer: Any, items: list[Exhausted]
    ) -> list[tuple[str, asyncio.Future[int]]]:
        encoder = self._exhausted_encoder
        assert encoder is not None, "start() first"
        items = [e for e in items if self._fresh(exhausted_event_id(e.campaign_id, e.day_start))]
        full_name = get_schema("CampaignBudgetExhausted").full_name
        values = encoder.encode_many(
            {
                "event_id": exhausted_event_id(e.campaign_id, e.day_start),
                "campaign_id": e.campaign_id,
                "occurred_at": e.at_ms,
                "budget_period": "DAILY",
                "period_start": e.day_start,
                "budget_minor": e.budget_micros // MICROS,
                "spent_minor": e.spent_micros // MICROS,
                "currency": self.campaigns.by_id[e.campaign_id].currency,
            }
            for e in items
        )
        by_partition: dict[int, list[Record]] = {}
        for e, value in zip(items, values, strict=True):
            key = e.campaign_id.encode()
            eid = exhausted_event_id(e.campaign_id, e.day_start)
            headers = ce_headers(event_id=eid, event_type=full_name, source=SOURCE_URI, time_ms=e.at_ms)
            target = partition_of(key, self._campaigns_partitions)
            by_partition.setdefault(target, []).append((key, value, e.at_ms, headers))
        pending: list[tuple[str, asyncio.Future[int]]] = []
        for target, records in by_partition.items():
            where = f"{self.config.campaigns_topic}:{target}"
            pending += [
                (where, f) for f in await send_tracked(producer, self.config.campaigns_topic, target, records)
            ]
        self.stats.exhausted += len(items)
        return pending

    def stats_dict(self) -> dict[str, Any]:
        """Counters, ``reconciles`` and the partition watermarks."""
        out: dict[str, Any] = asdict(self.stats)
        out["busy_s"] = round(out["busy_s"], 3)
        out["reconciles"] = self.stats.reconciles()
        out["watermarks"] = {p: ap.watermark for p, ap in sorted(self.partitions.items())}
        return out


def published_ids(settings: Settings, positions: dict[str, int]) -> set[str]:
    """The CloudEvents ids (``ce_id`` header) of the records from ``positions``
    (``"topic:partition"`` → offset) to the current end of each partition (blocking).

    Raises:
        InfraError: the broker cannot be reached, or the records do not come within 60 s.
    """
    wanted: dict[tuple[str, int], int] = {}
    for where, offset in positions.items():
        name, _, part = where.rpartition(":")
        wanted[(name, int(part))] = offset
    ends: dict[tuple[str, int], int] = {}
    for name in {t for t, _ in wanted}:
        for part, end in high_watermarks(settings, name).items():
            ends[(name, part)] = end
    todo = {tp: off for tp, off in wanted.items() if off < ends.get(tp, 0)}
    found: set[str] = set()
    if not todo:
        return found
    consumer = Consumer(settings.consumer_conf(f"ads-readback-{os.getpid()}"))
    try:
        consumer.assign([TopicPartition(t, p, off) for (t, p), off in todo.items()])
        deadline = time.monotonic() + 60
        while todo and time.monotonic() < deadline:
            for msg in consumer.consume(1000, timeout=0.5):
                if msg.error() is not None:
                    continue
                headers = dict(msg.headers() or [])
                if headers.get("ce_id"):
                    found.add(headers["ce_id"].decode())
                tp = (msg.topic(), msg.partition())
                if msg.offset() + 1 >= ends[tp]:
                    todo.pop(tp, None)
        if todo:
            raise InfraError(f"could not read back {sorted(todo)} within 60 s to find published reports")
    finally:
        consumer.close()
    return found


def register(app: BackbeatApp, config: AdsConfig) -> AdReporting:
    """Define the ``ads`` table and the ad-reporting agent on ``app``."""
    partitions = topic("ads.delivery").partitions
    table = app.Table(TABLE, partitions=partitions, key_type=bytes, value_type=bytes)
    agent_state = AdReporting(app, table, config)
    source = app.topic(
        config.source_topic, key_serializer="raw", value_serializer="raw", partitions=partitions
    )
    batch, within = app.ingest_config.batch, app.ingest_config.batch_within_s

    @app.agent(source, name="ad-reporting")
    async def ad_reporting(stream: Any) -> None:
        """Batches of ad events → final windowed reports."""
        await agent_state.start()
        async for events in stream.take_events(batch, within=within):
            await agent_state.process(events)

    @app.on_partitions_revoked.connect
    async def on_revoked(sender: Any, revoked: Set[TP], **kwargs: Any) -> None:
        agent_state.forget(revoked)

    @app.timer(app.ingest_config.stats_interval_s)
    async def log_stats() -> None:
        """Log the counters as one JSON line (``ads stats {...}``)."""
        log.info("ads stats %s", json.dumps(agent_state.stats_dict(), sort_keys=True))

    return agent_state
