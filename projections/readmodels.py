"""The read models: what each projection is (name, version, source topic, event type, DuckDB
table) and the pure event → row mapping (decoded event dicts → a ``pyarrow.Table``).

A projection's table is described once as a tuple of :class:`Column`; the DuckDB DDL and the
Arrow schema are both derived from it, so they cannot drift apart. Times arrive as ms since the
epoch (``timestamp-millis``, decoded as ints by :mod:`events.serde`) and are stored as DuckDB
``TIMESTAMP`` holding UTC. Every row also carries where it came from (``kafka_partition``,
``kafka_offset``), which the runner uses to drop redelivered records inside its transaction.

Policies on a repeated key (DESIGN.md §3 "Exactly-once effects"): ``first`` — the first event
with a key wins and a later duplicate changes nothing (``listens``, ``sessions``, keyed by
``event_id``); ``last`` — the last event per key (highest offset) wins (``tracks``, keyed by
``track_id``, the compacted-topic semantics).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal

import pyarrow as pa

from infra.errors import ConfigError

Policy = Literal["first", "last"]

#: The provenance columns every read-model row carries.
PARTITION_COL = "kafka_partition"
OFFSET_COL = "kafka_offset"

_SQL_TYPES: dict[pa.DataType, str] = {
    pa.string(): "VARCHAR",
    pa.int32(): "INTEGER",
    pa.int64(): "BIGINT",
    pa.float64(): "DOUBLE",
    pa.timestamp("ms"): "TIMESTAMP",
}


@dataclass(frozen=True)
class Column:
    """One column: ``name`` in the table, its Arrow ``type``, the event ``field`` it comes from
    (default: same name), and whether it may be NULL."""

    name: str
    type: pa.DataType
    field: str = ""
    nullable: bool = False

    @property
    def source(self) -> str:
        """The event field this column is read from."""
        return self.field or self.name

    @property
    def sql_type(self) -> str:
        """The DuckDB type (``TIMESTAMP`` for ms timestamps, stored as UTC)."""
        return _SQL_TYPES[self.type]


@dataclass(frozen=True)
class Projection:
    """A named, versioned mapping of one event type on one topic to one DuckDB table.

    ``name`` is also the table name; ``key`` the column duplicates are recognised by; ``policy``
    what a repeated key does (module docstring); ``lake`` whether applied rows are also written
    to the Parquet lake, partitioned by the date (UTC) of ``lake_time``.
    """

    name: str
    version: int
    topic: str
    event_type: str
    columns: tuple[Column, ...]
    key: str
    policy: Policy
    lake: bool = False
    lake_time: str = ""

    @property
    def arrow_schema(self) -> pa.Schema:
        """The Arrow schema of rows: the columns, then ``kafka_partition`` (int32) and
        ``kafka_offset`` (int64)."""
        fields = [pa.field(c.name, c.type, nullable=c.nullable) for c in self.columns]
        fields += [pa.field(PARTITION_COL, pa.int32(), False), pa.field(OFFSET_COL, pa.int64(), False)]
        return pa.schema(fields)

    @property
    def event_struct(self) -> pa.StructType:
        """The Arrow struct type of the event fields the columns read (by event field name)."""
        return pa.struct([pa.field(c.source, c.type) for c in self.columns])

    @property
    def ddl(self) -> str:
        """``CREATE TABLE IF NOT EXISTS`` for the read model (identifiers quoted)."""
        cols = [f'"{c.name}" {c.sql_type}{"" if c.nullable else " NOT NULL"}' for c in self.columns]
        cols += [f'"{PARTITION_COL}" INTEGER NOT NULL', f'"{OFFSET_COL}" BIGINT NOT NULL']
        return f'CREATE TABLE IF NOT EXISTS "{self.name}" (\n  ' + ",\n  ".join(cols) + "\n)"

    def on_topic(self, topic: str) -> Projection:
        """The same projection reading another topic (tests, blue/green rebuilds)."""
        return replace(self, topic=topic)


def to_table(
    projection: Projection,
    events: Sequence[Mapping[str, Any]],
    partitions: Sequence[int],
    offsets: Sequence[int],
) -> pa.Table:
    """Map decoded events to rows of ``projection`` (pure; no I/O).

    ``events[i]`` came from ``partitions[i]`` at ``offsets[i]``. Times are ints (ms since the
    epoch, UTC). Returns a table with :attr:`Projection.arrow_schema`, one row per event, in
    input order.

    Raises:
        pyarrow.ArrowException, TypeError, ValueError: a value has the wrong type, or is NULL
            or missing where the column is not nullable.
    """
    # one C++ pass over the dicts (a struct array), about 2x faster than a Python list per column;
    # a missing key becomes NULL, so non-nullable columns are checked below
    struct = pa.array(events, type=projection.event_struct)
    arrays: list[pa.Array] = (
        struct.flatten() if len(events) else [pa.array([], c.type) for c in projection.columns]
    )
    for col, arr in zip(projection.columns, arrays, strict=True):
        if not col.nullable and arr.null_count:
            raise ValueError(f"{projection.name}.{col.name} is NULL or missing in {arr.null_count} event(s)")
    arrays.append(pa.array(partitions, type=pa.int32()))
    arrays.append(pa.array(offsets, type=pa.int64()))
    return pa.Table.from_arrays(arrays, schema=projection.arrow_schema)


def to_table_checked(
    projection: Projection,
    events: Sequence[Mapping[str, Any]],
    partitions: Sequence[int],
    offsets: Sequence[int],
) -> tuple[pa.Table, list[tuple[int, str]]]:
    """Like :func:`to_table`, but never raises for a bad event: returns ``(table, rejects)``
    where ``rejects`` lists ``(index, reason)`` of events that could not be mapped (they are
    not in the table). The whole batch is mapped at once; only when that fails is it mapped
    event by event to find the culprits."""
    try:
        return to_table(projection, events, partitions, offsets), []
    except (TypeError, ValueError, pa.ArrowException):
        pass
    good: list[int] = []
    rejects: list[tuple[int, str]] = []
    for i, event in enumerate(events):
        missing = [c.source for c in projection.columns if not c.nullable and c.source not in event]
        if missing:
            rejects.append((i, f"{projection.event_type} lacks field(s) {', '.join(missing)}"))
            continue
        try:
            to_table(projection, [event], [partitions[i]], [offsets[i]])
            good.append(i)
        except (TypeError, ValueError, pa.ArrowException) as exc:
            rejects.append((i, f"cannot map to {projection.name} row: {exc}"))
    table = to_table(
        projection,
        [events[i] for i in good],
        [partitions[i] for i in good],
        [offsets[i] for i in good],
    )
    return table, rejects


_S, _I, _L, _D, _T = pa.string(), pa.int32(), pa.int64(), pa.float64(), pa.timestamp("ms")

LISTENS = Projection(
    name="listens",
    version=1,
    topic="playback.listens",
    event_type="backbeat.playback.ListenRecorded",
    columns=(
        Column("event_id", _S),
        Column("user_id", _S),
        Column("track_id", _S),
        Column("artist_id", _S),
        Column("occurred_at", _T),
        Column("source", _S),
        Column("ms_played", _L, nullable=True),
        Column("track_name", _S, nullable=True),
        Column("artist_name", _S, nullable=True),
        Column("session_hint", _S, nullable=True),
    ),
    key="event_id",
    policy="first",
    lake=True,
    lake_time="occurred_at",
)

SESSIONS = Projection(
    name="sessions",
    version=1,
    topic="listening.sessions",
    event_type="backbeat.listening.SessionEnded",
    columns=(
        Column("event_id", _S),
        Column("user_id", _S),
        Column("session_start", _T),
        Column("session_end", _T),
        Column("listens", _I),
        Column("distinct_artists", _I),
        Column("gap_ms", _L),
    ),
    key="event_id",
    policy="first",
)

TRACKS = Projection(
    name="tracks",
    version=1,
    topic="catalog.tracks",
    event_type="backbeat.catalog.TrackPublished",
    columns=(
        Column("track_id", _S),
        Column("name", _S),
        Column("artist", _S),
        Column("popularity", _I),
        Column("album_id", _S),
        Column("album_name", _S),
        Column("album_release_date", _S, nullable=True),
        Column("genre", _S),
        Column("subgenre", _S),
        Column("danceability", _D),
        Column("energy", _D),
        Column("key", _I),
        Column("loudness_db", _D),
        Column("mode", _I),
        Column("speechiness", _D),
        Column("acousticness", _D),
        Column("instrumentalness", _D),
        Column("liveness", _D),
        Column("valence", _D),
        Column("tempo_bpm", _D),
        Column("duration_ms", _L),
        Column("published_at", _T),
        Column("event_id", _S),
    ),
    key="track_id",
    policy="last",
)

#: Every projection by name.
PROJECTIONS: dict[str, Projection] = {p.name: p for p in (LISTENS, SESSIONS, TRACKS)}


def get_projection(name: str) -> Projection:
    """The projection called ``name``.

    Raises:
        ConfigError: no such projection (the message lists the known ones).
    """
    try:
        return PROJECTIONS[name]
    except KeyError:
        known = ", ".join(sorted(PROJECTIONS))
        raise ConfigError(f"there is no projection {name!r}; known projections: {known}") from None


__all__ = [
    "LISTENS",
    "OFFSET_COL",
    "PARTITION_COL",
    "PROJECTIONS",
    "SESSIONS",
    "TRACKS",
    "Column",
    "Projection",
    "get_projection",
    "to_table",
    "to_table_checked",
]
