"""Shared by the benchmarks: a private broker + registry on free ports, the real 30Music
listens replayed N times (user ids suffixed by copy number), peak RSS."""

from __future__ import annotations

import contextlib
import re
import resource
import tempfile
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import fastavro
from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

from events.importers.base import dedupe_and_order
from events.importers.listens import parse_listens_file, without_line
from events.log import reader_conf
from events.offsets import high_watermarks
from events.schemas import get_schema
from events.serde import AvroDecoder
from infra import services
from infra.processes import free_port
from infra.resources import ADS_OPEN_BANDIT, LISTENS_30MUSIC
from infra.settings import Settings


@contextlib.contextmanager
def private_stack() -> Iterator[Settings]:
    """A broker and registry on free loopback ports with a temporary data dir; stopped after."""
    with tempfile.TemporaryDirectory(prefix="bb-bench-") as tmp:
        settings = Settings.from_env(
            {
                "BACKBEAT_BOOTSTRAP_SERVERS": f"127.0.0.1:{free_port()}",
                "BACKBEAT_REGISTRY_URL": f"http://127.0.0.1:{free_port()}",
                "BACKBEAT_DATA_DIR": tmp,
            }
        )
        services.up(settings)
        try:
            yield settings
        finally:
            services.down(settings)


def replayed_listens(copies: int, path: Path = LISTENS_30MUSIC) -> list[dict[str, Any]]:
    """The file's ListenRecorded records ``copies`` times, user and event ids suffixed ``#k``,
    in event-time order within each copy."""
    records, _ = dedupe_and_order(parse_listens_file(path, "30music").records, "occurred_at")
    base = [without_line(r) for r in records]
    out: list[dict[str, Any]] = []
    for k in range(copies):
        suffix = f"#{k}"
        out.extend({**r, "user_id": r["user_id"] + suffix, "event_id": r["event_id"] + suffix} for r in base)
    return out


#: How far apart replayed copies of the ad log are (8 days: no window spans two copies).
AD_COPY_SHIFT_MS = 8 * 86_400_000


def replayed_ad_events(copies: int, path: Path = ADS_OPEN_BANDIT) -> list[dict[str, Any]]:
    """The ad log's events (:func:`events.importers.ads.ad_events`) ``copies`` times, each copy
    :data:`AD_COPY_SHIFT_MS` later with event, impression and click ids suffixed ``#k``."""
    from events.importers.ads import ad_events

    base = ad_events(path)
    out = []
    for k in range(copies):
        for e in base:
            out.append(
                {**e, "occurred_at": e["occurred_at"] + k * AD_COPY_SHIFT_MS,
                 "event_id": f"{e['event_id']}#{k}", "impression_id": f"{e['impression_id']}#{k}",
                 **({"click_id": f"{e['click_id']}#{k}"} if e.get("click_id") else {})}
            )  # fmt: skip
    return out


def peak_rss_mib(children: bool = False) -> float:
    """Peak resident set size in MiB of this process (or of its waited-for children)."""
    who = resource.RUSAGE_CHILDREN if children else resource.RUSAGE_SELF
    return resource.getrusage(who).ru_maxrss / 1024


_LOG_TIME = re.compile(r"^\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3})\]")


def log_time(line: str) -> float:
    """The time (s since the epoch, local clock) at the start of a Faust worker log line.

    Raises:
        ValueError: the line has no ``[YYYY-mm-dd HH:MM:SS,mmm]`` prefix.
    """
    match = _LOG_TIME.match(line)
    if not match:
        raise ValueError(f"no timestamp in {line!r}")
    return datetime.strptime(match.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()


def process_peak_rss_mb(pid: int) -> float:
    """Peak resident set size (``VmHWM``) of a running process in MB, or -1 when unknown."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return round(int(line.split()[1]) / 1024, 1)
    return -1.0


def raw_read(settings: Settings, topic: str, decoder: AvroDecoder) -> tuple[int, float]:
    """``(data records, seconds)`` of a plain consume + decode of every record of ``topic``, the
    baseline the benchmarks divide by. Deliberately a plain loop (no positions, no batching logic
    of :mod:`events.log`): one confluent consumer with the properties of backbeat's readers
    (:func:`events.log.reader_conf`) ``assign()``-ed to every partition from the start, 50,000
    messages per ``consume``, each batch decoded by the one decoder
    (:meth:`events.serde.AvroDecoder.decode_many`); control records (empty values) are skipped.

    Raises:
        AssertionError: a data record does not decode.
    """
    marks = high_watermarks(settings, topic)
    total = sum(marks.values())
    consumer = Consumer(reader_conf(settings, f"bench-raw-{topic}"))
    consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in marks])
    seen = data = 0
    start = time.perf_counter()
    while seen < total:
        msgs = [m for m in consumer.consume(num_messages=50_000, timeout=1.0) if m.error() is None]
        seen += len(msgs)
        values = [v for v in (m.value() for m in msgs) if v]
        _, errors = decoder.decode_many(values)
        assert not errors, errors[:3]
        data += len(values)
    elapsed = time.perf_counter() - start
    consumer.close()
    return data, elapsed


def raw_consume_decode(
    settings: Settings, topic: str, total: int, event_type: str = "ListenRecorded"
) -> float:
    """events/s of :func:`raw_read` of the ``total`` records of ``topic``, all of
    ``event_type``, with its writer schema parsed once.

    Raises:
        AssertionError: the topic does not hold exactly ``total`` records, or one does not decode.
    """
    schema = fastavro.parse_schema(get_schema(event_type).parsed_plain)
    decoded, elapsed = raw_read(settings, topic, AvroDecoder(lambda _id: schema))
    assert decoded == total, (decoded, total)
    return decoded / elapsed
