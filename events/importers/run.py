"""Run an import: parse a file, collapse duplicates, order by event time, produce the events
(Avro, Confluent wire format, CloudEvents headers) to their topic, keyed by entity.

After a listens import, a watermark control record (:mod:`events.control`) goes to every
partition of the topic, at the last event time plus ``max(session gap, END_OF_INPUT_MS)``: the
file is a bounded source, and its end closes every open listening session and feature window
downstream (as a bounded source's end does in Flink). Listens of a later import within that
horizon are then late. Pass ``close_sessions=False`` to leave sessions and windows open, e.g.
when more files of the same period follow.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from events.control import END_OF_INPUT_MS, watermark_headers
from events.importers.base import ImportResult, Parsed, ProgressCallback, Record, dedupe_and_order
from events.importers.catalog import parse_catalog_file
from events.importers.listens import parse_listens_file, without_line
from events.offsets import partitions_of
from events.producer import EventProducer
from infra.settings import Settings

LISTENS_TOPIC = "playback.listens"
CATALOG_TOPIC = "catalog.tracks"
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
