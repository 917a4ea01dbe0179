"""What a replay reads and how it knows it read all of it (:mod:`projections.replay`): the
sources (a Kafka topic through :func:`events.log.read_batches`, or the Parquet archive), the
positions ``--from``/``--to`` name, and the :class:`Coverage` of a build's range, checked before
any switch (docs/replay.md "What a replay verifies")."""

from __future__ import annotations

import copy
import fcntl
import json
import os
import re
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import partial
from typing import Any

import duckdb
import pyarrow as pa

from events.log import read_batches
from infra.errors import ConfigError
from infra.settings import Settings
from projections.decoding import MessageLike, Prepared
from projections.readmodels import Projection

SOURCES = ("kafka", "archive")
_PARTITION_SPEC = re.compile(r"^\s*\d+\s*:\s*\d+\s*(,\s*\d+\s*:\s*\d+\s*)*$")
_IDLE_TIMEOUT_S = 30.0
#: Seconds a replay from the archive waits for a running archiver to archive the offsets it
#: needs (the background archiver writes a partition's records at most 5 s after they arrived,
#: docs/archive.md "Bounded loss"); with no archiver running it does not wait.
ARCHIVE_WAIT_S = 15.0
#: Which offsets each build has read (:class:`Coverage`), one row per partition, written in the
#: same transaction as the rows: where it started and stands, how many offsets the source skipped
#: or gave again, and the first of those places (JSON ``[[expected, got], …]``).
COVERAGE_TABLE = "projection_build_coverage"
COVERAGE_DDL = f"""CREATE TABLE IF NOT EXISTS {COVERAGE_TABLE} (
  build_table VARCHAR NOT NULL, "partition" INTEGER NOT NULL, start_offset BIGINT NOT NULL,
  next_offset BIGINT NOT NULL, skipped BIGINT NOT NULL, repeated BIGINT NOT NULL, gaps VARCHAR NOT NULL,
  PRIMARY KEY (build_table, "partition"))"""
#: Places of skipped or repeated offsets kept per partition (the counts are complete).
_MAX_GAPS = 20

#: One batch of records read from a source and the next offset per partition after it.
Batches = Iterator[tuple[Sequence[MessageLike], dict[int, int]]]


# -- coverage ----------------------------------------------------------------------------------------
@dataclass
class PartitionCoverage:
    """What a build read of one partition: from ``start`` to ``next`` (exclusive), with
    ``skipped`` offsets the source moved past without a record and ``repeated`` ones it gave
    twice or out of order; ``gaps``: the first :data:`_MAX_GAPS` places, ``(expected, got)``."""

    start: int
    next: int
    skipped: int = 0
    repeated: int = 0
    gaps: list[tuple[int, int]] = field(default_factory=list)


class Coverage:
    """Which offsets a build has read, partition by partition, from the records themselves.

    :meth:`read` takes each batch as prepared (:attr:`~projections.decoding.Prepared.firsts`,
    :attr:`~projections.decoding.Prepared.breaks`, :attr:`~projections.decoding.Prepared.ends`):
    a batch's first record of a partition must be at the offset the partition stands at, and
    every next one at the offset after the previous. :meth:`moved` takes positions a source
    reports without records (a Kafka partition's end reached past transaction markers).
    :meth:`problems` says what is missing from a range."""

    def __init__(self, parts: Mapping[int, PartitionCoverage]) -> None:
        self.parts = dict(parts)

    @classmethod
    def starting(cls, start: Mapping[int, int]) -> Coverage:
        """Nothing read yet of ranges starting at ``start`` (``{partition: offset}``)."""
        return cls({p: PartitionCoverage(int(o), int(o)) for p, o in start.items()})

    def positions(self) -> dict[int, int]:
        """``{partition: next offset}``: where each partition's coverage ends."""
        return {p: c.next for p, c in self.parts.items()}

    def _step(self, part: int, expected: int, got: int) -> None:
        cov = self.parts[part]
        if got > expected:
            cov.skipped += got - expected
        elif got < expected:
            cov.repeated += expected - got
        else:
            return
        if len(cov.gaps) < _MAX_GAPS:
            cov.gaps.append((expected, got))

    def read(self, prepared: Prepared) -> None:
        """Account for one batch of records read (in the order they were read)."""
        for (_, part), first in prepared.firsts.items():
            self._step(part, self.parts[part].next, first)
        for _, part, expected, got in prepared.breaks:
            self._step(part, expected, got)
        for (_, part), end in prepared.ends.items():
            self.parts[part].next = end

    def moved(self, positions: Mapping[int, int]) -> None:
        """Account for positions the source reached without records (every offset passed over is
        *skipped*)."""
        for part, pos in positions.items():
            cov = self.parts.get(part)
            if cov is not None and pos > cov.next:
                self._step(part, cov.next, pos)
                cov.next = pos

    def snapshot(self) -> Coverage:
        """A copy (what a write commits while reading goes on)."""
        return Coverage(copy.deepcopy(self.parts))

    def problems(self, stop: Mapping[int, int], *, allow_skipped: bool = False) -> list[str]:
        """Sentences naming each partition of ``stop`` whose range is not read exactly: offsets
        not read (before ``stop``), given twice or out of order, or skipped by the source (unless
        ``allow_skipped``). Empty when every offset was read once."""
        out = []
        for part in sorted(stop):
            cov = self.parts.get(part)
            if cov is None:
                out.append(f"partition {part}: nothing of it was read")
                continue
            if cov.next < stop[part]:
                out.append(
                    f"partition {part}: offsets {cov.next}..{stop[part] - 1} were not read (the source "
                    f"ended at {cov.next})"
                )
            places = ", ".join(
                f"{e}..{g - 1}" if g > e else f"{g} after {e - 1}" for e, g in cov.gaps[:5]
            ) + (" …" if len(cov.gaps) > 5 else "")
            if cov.repeated:
                out.append(
                    f"partition {part}: {cov.repeated} offset(s) read twice or out of order (at {places})"
                )
            elif cov.skipped and not allow_skipped:
                out.append(
                    f"partition {part}: {cov.skipped} offset(s) skipped by the source, with no record (at "
                    f"{places}): transaction markers or compacted records on a real Kafka cluster"
                )
        return out


def load_coverage(conn: duckdb.DuckDBPyConnection, table: str) -> Coverage | None:
    rows = conn.execute(
        f'SELECT "partition", start_offset, next_offset, skipped, repeated, gaps FROM {COVERAGE_TABLE} '
        "WHERE build_table = ?",
        [table],
    ).fetchall()
    if not rows:
        return None
    return Coverage(
        {
            int(p): PartitionCoverage(int(s), int(n), int(k), int(r), [tuple(g) for g in json.loads(gaps)])
            for p, s, n, k, r, gaps in rows
        }
    )


def save_coverage(conn: duckdb.DuckDBPyConnection, table: str, coverage: Coverage) -> None:
    """Store ``coverage`` of build ``table`` (inside the caller's transaction)."""
    conn.executemany(
        f"INSERT OR REPLACE INTO {COVERAGE_TABLE} VALUES (?, ?, ?, ?, ?, ?, ?)",
        [
            [table, p, c.start, c.next, c.skipped, c.repeated, json.dumps([list(g) for g in c.gaps])]
            for p, c in sorted(coverage.parts.items())
        ],
    )


# -- positions ---------------------------------------------------------------------------------------
def parse_time(text: str) -> datetime:
    """An ISO 8601 time (``2014-04-20``, ``2014-04-20T08:00:00Z``, with or without offset) as a
    naive UTC datetime (no offset = UTC).

    Raises:
        ConfigError: not an ISO time.
    """
    try:
        when = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise ConfigError(
            f"{text!r} is not a position: use 'earliest', 'latest', an ISO time (2014-04-20T08:00:00Z) "
            "or PARTITION:OFFSET,… (0:100,1:250)"
        ) from None
    return when.astimezone(UTC).replace(tzinfo=None) if when.tzinfo else when


def is_time(spec: str | None) -> bool:
    if spec is None:
        return False
    text = spec.strip().lower()
    return text not in ("earliest", "latest") and not _PARTITION_SPEC.match(spec)


def time_column(projection: Projection) -> str | None:
    """The event-time column of ``projection``: its ``lake_time``, else ``occurred_at``, else its
    first timestamp column (``None``: it has none)."""
    names = [c.name for c in projection.columns if pa.types.is_timestamp(c.type)]
    if projection.lake_time:
        return projection.lake_time
    return "occurred_at" if "occurred_at" in names else (names[0] if names else None)


def resolve_position(
    spec: str | None,
    marks: Mapping[int, int],
    default: Mapping[int, int],
    at_time: Callable[[datetime], dict[int, int]],
) -> dict[int, int]:
    """``{partition: offset}`` of a ``--from``/``--to`` ``spec``: ``None`` → ``default``;
    ``earliest`` → 0; ``latest`` → ``marks`` (the high watermarks); ``P:O,…`` → those offsets
    (unlisted partitions: ``default``); an ISO time → ``at_time(naive UTC datetime)``. Offsets are
    clamped to ``[0, marks[p]]``.

    Raises:
        ConfigError: a malformed spec or a partition the topic does not have.
    """
    if spec is None:
        out = dict(default)
    elif spec.strip().lower() == "earliest":
        out = {p: 0 for p in marks}
    elif spec.strip().lower() == "latest":
        out = dict(marks)
    elif _PARTITION_SPEC.match(spec):
        out = dict(default)
        for item in spec.split(","):
            part, off = (int(x) for x in item.split(":"))
            if part not in marks:
                raise ConfigError(
                    f"partition {part} in {spec!r} does not exist (partitions: {sorted(marks)})"
                )
            out[part] = off
    else:
        out = at_time(parse_time(spec))
    return {p: max(0, min(int(out.get(p, 0)), marks[p])) for p in marks}


# -- sources -----------------------------------------------------------------------------------------
def kafka_batches(
    settings: Settings, topic: str, start: Mapping[int, int], stop: Mapping[int, int], batch_size: int
) -> Batches:
    """Records ``[start[p], stop[p])`` of ``topic`` in batches of at most ``batch_size``, read by
    :func:`events.log.read_batches` (a reader ``assign()``-ed to the partitions, no group). Yields
    ``(records, next offsets)``; a partition whose remaining offsets hold no data records
    (transaction markers) ends at ``stop`` once the reader reaches the end of the log.

    Raises:
        OffsetMismatchError: an offset is out of range or the topic vanished (the log changed).
        TransientError: no progress for 30 s.
    """
    ranges = {(topic, p): (int(start.get(p, 0)), int(end)) for p, end in stop.items()}
    for msgs, positions in read_batches(
        settings, ranges, purpose="replay", batch=batch_size, idle_timeout_s=_IDLE_TIMEOUT_S
    ):
        yield msgs, {p: o for (_, p), o in positions.items()}


def archive_batches(
    settings: Settings,
    topic: str,
    start: Mapping[int, int],
    stop: Mapping[int, int],
    batch_size: int,
    *,
    wait_s: float = ARCHIVE_WAIT_S,
    on_wait: Callable[[dict[int, int]], None] | None = None,
) -> Batches:
    """As :func:`kafka_batches`, from the Parquet archive (:func:`projections.archive.iter_archive`).
    A partition's position only ever moves past records read: where the archive ends before
    ``stop`` the position stays at its end, and the caller's coverage check names the offsets
    missing (the archive cannot vouch for offsets it does not hold). While an archiver is running
    (it holds the archive's lock) and the archive ends short of ``stop``, it waits up to
    ``wait_s`` seconds for the archiver to write the rest, polling its file names every 0.2 s and
    calling ``on_wait(positions)`` each time.

    Raises:
        ConfigError: the archive module is not available.
    """
    iter_archive, archived_positions = archive_functions()
    positions = {p: int(start.get(p, 0)) for p in stop}
    deadline = time.monotonic() + wait_s
    while True:
        todo = {p: o for p, o in stop.items() if positions[p] < o}
        if not todo:
            return
        begin = {p: positions[p] for p in todo}
        for batch in iter_archive(settings, topic, start=begin, stop=dict(todo), batch_size=batch_size,
                                  partitions=set(todo)):  # fmt: skip
            for msg in batch:
                positions[msg.partition()] = msg.offset() + 1
            yield batch, dict(positions)
        short = {p: o for p, o in stop.items() if positions[p] < o}
        if not short or wait_s <= 0 or not archiver_running(settings):
            return
        while time.monotonic() < deadline:  # the archiver writes within seconds: poll its files
            have = archived_positions(settings, topic)
            if any(have.get(p, 0) > positions[p] for p in short):
                break
            if on_wait is not None:
                on_wait(dict(positions))
            time.sleep(0.2)
        else:
            return


def archiver_running(settings: Settings) -> bool:
    """Whether an archiver holds the archive's lock (tested with a shared, non-blocking flock on
    a descriptor of our own, released at once)."""
    path = settings.lake_dir / "archive" / ".lock"
    if not path.exists():
        return False
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # releases the probe's lock
    return False


def archive_functions() -> tuple[Callable[..., Iterator[list[Any]]], Callable[..., dict[int, int]]]:
    try:
        from projections import archive  # noqa: PLC0415 (optional: issue 7's archiver)

        return archive.iter_archive, archive.archived_positions
    except (ImportError, AttributeError) as exc:
        raise ConfigError(
            f"--source archive is not available: projections.archive ({exc}) is missing; archive the "
            "log first with 'backbeat archive' (issue 7), or replay from kafka"
        ) from None


def batches_for(source: str, wait_s: float = ARCHIVE_WAIT_S) -> Callable[..., Batches]:
    return kafka_batches if source == "kafka" else partial(archive_batches, wait_s=wait_s)


__all__ = [
    "ARCHIVE_WAIT_S",
    "COVERAGE_DDL",
    "COVERAGE_TABLE",
    "SOURCES",
    "Batches",
    "Coverage",
    "PartitionCoverage",
    "archive_batches",
    "archive_functions",
    "archiver_running",
    "batches_for",
    "is_time",
    "kafka_batches",
    "load_coverage",
    "parse_time",
    "resolve_position",
    "save_coverage",
    "time_column",
]
