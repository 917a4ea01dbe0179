"""Run an import: parse a file, collapse duplicates, order by event time, produce the events
(Avro, Confluent wire format, CloudEvents headers) to their topic, keyed by entity.

After a listens import, a watermark control record (:mod:`events.control`) goes to every
partition of the topic, at the last event time plus ``max(session gap, END_OF_INPUT_MS)``: the
file is a bounded source, and its end closes every open listening session and feature window
downstream (as a bounded source's end does in Flink). Listens of a later import within that
horizon are then late. Pass ``close_sessions=False`` to leave sessions and windows open, e.g.
when more files of the same period follow.

An ads import (:func:`import_ads`, Open Bandit logs, :mod:`events.importers.ads`) produces
impressions and clicks merged in event-time order to ``ads.delivery``, keyed by campaign, and
closes likewise with a watermark at the last event time plus ``END_OF_INPUT_MS`` on every
partition, so every report window of the ad-reporting agent becomes final.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from events.campaigns import CAMPAIGNS_FILE
from events.cloudevents import ce_headers
from events.control import END_OF_INPUT_MS, watermark_headers
from events.importers.ads import parse_ads_file, without_type
from events.importers.base import ImportResult, Parsed, ProgressCallback, Record, dedupe_and_order
from events.importers.catalog import parse_catalog_file
from events.importers.listens import parse_listens_file, without_line
from events.offsets import partitions_of
from events.producer import EventProducer
from events.schemas import get_schema
from infra.settings import Settings

LISTENS_TOPIC = "playback.listens"
CATALOG_TOPIC = "catalog.tracks"
ADS_TOPIC = "ads.delivery"
BATCH = 10_000


def _produce(
    producer: EventProducer,
    topic: str,
    event_type: str,
    records: list[Record],
    *,
    key_field: str,
    time_field: str,
    source: str,
    progress: ProgressCallback | None,
) -> None:
    for start in range(0, len(records), BATCH):
        chunk = [without_line(r) for r in records[start : start + BATCH]]
        producer.send_many(
            topic, event_type, chunk, key_field=key_field, time_field=time_field, source=source
        )
        if progress is not None:
            progress(len(chunk))


def _result(
    path: Path,
    topic: str,
    parsed: Parsed,
    records: list[Record],
    duplicates: int,
    time_field: str,
    began: float,
) -> ImportResult:
    return ImportResult(
        source=str(path),
        topic=topic,
        rows_read=parsed.rows_read,
        produced=len(records),
        duplicates=duplicates,
        rejected=parsed.rejected,
        rejects=parsed.rejects,
        first_time_ms=records[0][time_field] if records else None,
        last_time_ms=records[-1][time_field] if records else None,
        seconds=time.monotonic() - began,
    )


def import_listens(
    settings: Settings,
    path: Path,
    fmt: str,
    *,
    topic: str = LISTENS_TOPIC,
    close_sessions: bool = True,
    progress: ProgressCallback | None = None,
    on_parsed: Callable[[int], None] | None = None,
) -> ImportResult:
    """Import a listening log (``fmt`` = ``30music`` | ``lastfm1k``) into ``topic``.

    ``on_parsed(n)`` is called once with the number of events about to be produced (for a
    progress bar's total); ``progress(k)`` after each batch of ``k`` produced events.

    Raises:
        ConfigError: unreadable file or wrong format. InfraError: broker/registry unreachable.
    """
    began = time.monotonic()
    parsed = parse_listens_file(path, fmt)
    records, duplicates = dedupe_and_order(parsed.records, "occurred_at")
    if on_parsed is not None:
        on_parsed(len(records))
    producer = EventProducer(settings)
    _produce(
        producer, topic, "ListenRecorded", records,
        key_field="user_id", time_field="occurred_at", source=f"/importers/{fmt}",
        progress=progress,
    )  # fmt: skip
    last = records[-1]["occurred_at"] if records else None
    if close_sessions and last is not None:
        watermark = last + max(settings.session_gap_ms + 1, END_OF_INPUT_MS)
        for partition in partitions_of(settings, topic):
            producer.producer.produce(
                topic, b"", partition=partition, timestamp=watermark,
                headers=watermark_headers(watermark),
            )  # fmt: skip
    producer.flush()
    return _result(path, topic, parsed, records, duplicates, "occurred_at", began)


def import_catalog(
    settings: Settings,
    path: Path,
    *,
    topic: str = CATALOG_TOPIC,
    progress: ProgressCallback | None = None,
    on_parsed: Callable[[int], None] | None = None,
) -> ImportResult:
    """Import the Spotify catalog CSV into ``topic``, one ``TrackPublished`` per track.

    Raises:
        ConfigError: unreadable file or wrong columns. InfraError: broker/registry unreachable.
    """
    began = time.monotonic()
    parsed = parse_catalog_file(path)
    records, duplicates = dedupe_and_order(parsed.records, "published_at")
    if on_parsed is not None:
        on_parsed(len(records))
    producer = EventProducer(settings)
    _produce(
        producer, topic, "TrackPublished", records,
        key_field="track_id", time_field="published_at", source="/importers/spotify",
        progress=progress,
    )  # fmt: skip
    producer.flush()
    return _result(path, topic, parsed, records, duplicates, "published_at", began)


@dataclass
class AdImportResult(ImportResult):
    """What an ads import did: ``produced = impressions + clicks`` events; ``rows_read =
    impressions + duplicates + rejected``; ``watermark_ms``: the closing watermark sent (ms), or
    ``None`` when none was."""

    impressions: int = 0
    clicks: int = 0
    watermark_ms: int | None = None

    def reconciles(self) -> bool:
        """True when every row read is accounted for and every event is an impression or a click."""
        return (
            self.rows_read == self.impressions + self.duplicates + self.rejected
            and self.produced == self.impressions + self.clicks
        )


def _produce_mixed(
    producer: EventProducer,
    topic: str,
    events: list[Record],
    *,
    source: str,
    progress: ProgressCallback | None,
) -> None:
    """Produce events of several types (``event_type`` field) in list order, keyed by
    ``campaign_id``, timestamped with ``occurred_at``: each batch is encoded per type, then sent
    interleaved as it was."""
    for start in range(0, len(events), BATCH):
        chunk = events[start : start + BATCH]
        values: list[bytes] = [b""] * len(chunk)
        by_type: dict[str, list[int]] = {}
        for i, event in enumerate(chunk):
            by_type.setdefault(event["event_type"], []).append(i)
        names: dict[str, str] = {}
        for event_type, index in by_type.items():
            names[event_type] = get_schema(event_type).full_name
            encoded = producer.encoder(topic, event_type).encode_many([without_type(chunk[i]) for i in index])
            for i, value in zip(index, encoded, strict=True):
                values[i] = value
        keys = [str(e["campaign_id"]).encode() for e in chunk]
        times = [max(1, int(e["occurred_at"])) for e in chunk]
        headers = [
            ce_headers(
                event_id=e["event_id"], event_type=names[e["event_type"]], source=source,
                time_ms=int(e["occurred_at"]),
            )
            for e in chunk
        ]  # fmt: skip
        producer.produce_raw(topic, values, keys, times, headers)
        if progress is not None:
            progress(len(chunk))


def import_ads(
    settings: Settings,
    path: Path,
    *,
    campaigns: Path = CAMPAIGNS_FILE,
    topic: str = ADS_TOPIC,
    close_windows: bool = True,
    progress: ProgressCallback | None = None,
    on_parsed: Callable[[int], None] | None = None,
) -> AdImportResult:
    """Import an Open Bandit CSV into ``topic``: one ``AdImpressionServed`` per row and one
    ``AdClicked`` per clicked row (rules: :mod:`events.importers.ads`), in event-time order,
    keyed by campaign; then, with ``close_windows``, a watermark control record at the last
    event time + ``END_OF_INPUT_MS`` on every partition. ``on_parsed(n)`` gets the number of
    events to produce, ``progress(k)`` each produced batch.

    Raises:
        ConfigError: unreadable or malformed file or campaigns file. InfraError: broker or
            registry unreachable, or the topic missing.
    """
    began = time.monotonic()
    parsed = parse_ads_file(path, campaigns)
    events = parsed.events
    if on_parsed is not None:
        on_parsed(len(events))
    producer = EventProducer(settings)
    _produce_mixed(producer, topic, events, source="/importers/openbandit", progress=progress)
    watermark = events[-1]["occurred_at"] + END_OF_INPUT_MS if events and close_windows else None
    if watermark is not None:
        for partition in partitions_of(settings, topic):
            producer.producer.produce(
                topic, b"", partition=partition, timestamp=watermark, headers=watermark_headers(watermark)
            )
    producer.flush()
    return AdImportResult(
        source=str(path),
        topic=topic,
        rows_read=parsed.rows_read,
        produced=len(events),
        duplicates=parsed.duplicates,
        rejected=parsed.rejected,
        rejects=parsed.rejects,
        first_time_ms=events[0]["occurred_at"] if events else None,
        last_time_ms=events[-1]["occurred_at"] if events else None,
        seconds=time.monotonic() - began,
        impressions=parsed.impressions,
        clicks=parsed.clicks,
        watermark_ms=watermark,
    )
