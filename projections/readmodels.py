"""The read models: what each projection is (name, version, source topic, event type, DuckDB
table) and the pure event → row mapping (decoded event dicts → a ``pyarrow.Table``).

A projection's table is described once as a tuple of :class:`Column`; the DuckDB DDL and the
Arrow schema are both derived from it, so they cannot drift apart. Times arrive as ms since the
epoch (``timestamp-millis``, decoded as ints by :mod:`events.serde`) and are stored as DuckDB
``TIMESTAMP`` holding UTC. Every row also carries where it came from (``kafka_partition``,
``kafka_offset``), which the runner uses to drop redelivered records inside its transaction.
Column types are flat (string, int, double, ms timestamp) or nested: a list of structs (see
:func:`struct_list`) becomes a DuckDB ``STRUCT(...)[]`` column, e.g. the feature store's
``top_artists``. A projection may also carry companion DDL (views and table macros over its table,
:attr:`Projection.extra_ddl`), created by the runner right after the table.

Policies on a repeated key (DESIGN.md §3 "Exactly-once effects"): ``first`` — the first event
with a key wins and a later duplicate changes nothing (``listens``, ``sessions``, and the feature
store's history tables ``user_features`` and ``track_features``, keyed by ``event_id``);
``last`` — the last event per key (highest offset) wins (``tracks``, keyed by ``track_id``, the
compacted-topic semantics).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal

import pyarrow as pa

from infra.errors import ConfigError
from projections.feature_store import TRACK_TABLE, USER_TABLE

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


def sql_type(arrow_type: pa.DataType) -> str:
    """The DuckDB type of an Arrow column type: the flat types of ``_SQL_TYPES`` (``TIMESTAMP``
    for ms timestamps, stored as UTC), ``STRUCT("a" T, ...)`` for a struct and ``T[]`` for a
    list, recursively (DuckDB documentation, "Data Types": STRUCT and LIST). DuckDB has no
    NOT NULL inside nested types, so the nullability of nested fields is checked by
    :func:`to_table` instead.

    Raises:
        ConfigError: the type (or a nested one) has no DuckDB counterpart here.
    """
    if pa.types.is_list(arrow_type):
        return f"{sql_type(arrow_type.value_type)}[]"
    if pa.types.is_struct(arrow_type):
        fields = ", ".join(f'"{f.name}" {sql_type(f.type)}' for f in arrow_type)
        return f"STRUCT({fields})"
    try:
        return _SQL_TYPES[arrow_type]
    except KeyError:
        raise ConfigError(
            f"Arrow type {arrow_type} has no DuckDB column type in backbeat's read models; use one of "
            f"{', '.join(map(str, _SQL_TYPES))}, a struct or a list of them"
        ) from None


def struct_list(*fields: tuple[str, pa.DataType]) -> pa.ListType:
    """The Arrow type of an Avro ``array`` of ``record``: a list of non-null structs whose
    ``fields`` (``(name, type)`` in Avro order) are non-null, e.g.
    ``struct_list(("artist_id", pa.string()), ("affinity", pa.float64()))`` → DuckDB
    ``STRUCT("artist_id" VARCHAR, "affinity" DOUBLE)[]``. Avro unions with null are not
    supported inside (no schema needs them yet)."""
    item = pa.struct([pa.field(name, typ, nullable=False) for name, typ in fields])
    return pa.list_(pa.field("item", item, nullable=False))


def _forbidden_nulls(arr: pa.Array, nullable: bool) -> int:
    """How many values of ``arr`` (and of the fields and items nested in it) are NULL where the
    type says they may not be. NULL lists and structs are not looked into."""
    bad = 0 if nullable else arr.null_count
    typ = arr.type
    if pa.types.is_list(typ):
        bad += _forbidden_nulls(arr.flatten(), typ.value_field.nullable)  # items of non-NULL lists
    elif pa.types.is_struct(typ):
        valid = arr.drop_null() if arr.null_count else arr
        for field, child in zip(typ, valid.flatten(), strict=True):
            bad += _forbidden_nulls(child, field.nullable)
    return bad


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
        """The DuckDB type (:func:`sql_type`)."""
        return sql_type(self.type)


@dataclass(frozen=True)
class Projection:
    """A named, versioned mapping of one event type on one topic to one DuckDB table.

    ``name`` is also the table name; ``key`` the column duplicates are recognised by; ``policy``
    what a repeated key does (module docstring); ``lake`` whether applied rows are also written
    to the Parquet lake, partitioned by the date (UTC) of ``lake_time``; ``extra_ddl`` the
    idempotent statements (``CREATE OR REPLACE VIEW`` / ``MACRO``) over the table that the runner
    runs after :attr:`ddl` at every start, so they follow the code.
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
    extra_ddl: tuple[str, ...] = ()

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
            or missing where the column (or a field or item nested in it) is not nullable.
    """
    # one C++ pass over the dicts (a struct array), about 2x faster than a Python list per column;
    # a missing key becomes NULL, so non-nullable columns are checked below
    struct = pa.array(events, type=projection.event_struct)
    arrays: list[pa.Array] = (
        struct.flatten() if len(events) else [pa.array([], c.type) for c in projection.columns]
    )
    for col, arr in zip(projection.columns, arrays, strict=True):
        bad = _forbidden_nulls(arr, col.nullable)
        if bad:
            raise ValueError(
                f"{projection.name}.{col.name} has {bad} NULL or missing value(s) where none may be"
            )
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

#: ``top_artists`` of UserFeaturesComputed: Avro array of ArtistAffinity records.
ARTIST_AFFINITIES = struct_list(("artist_id", _S), ("affinity", _D))

#: The feature store's history of per-user windowed features (schemas/personalisation/
#: UserFeaturesComputed.avsc): every final value once, keyed by its deterministic ``event_id``
#: (a re-emission after a restart has the same id and values, so ``first`` loses nothing).
#: Views ``user_features_latest`` and macro ``user_features_as_of(ts)``:
#: :mod:`projections.feature_store`.
USER_FEATURES = Projection(
    name=USER_TABLE.name,
    version=1,
    topic="personalisation.features.users",
    event_type="backbeat.personalisation.UserFeaturesComputed",
    columns=(
        Column("event_id", _S),
        Column("user_id", _S),
        Column("occurred_at", _T),
        Column("feature_set", _S),
        Column("window_start", _T),
        Column("window_end", _T),
        Column("window_size_ms", _L),
        Column("window_step_ms", _L),
        Column("grace_ms", _L),
        Column("plays", _I),
        Column("distinct_artists", _I),
        Column("distinct_tracks", _I),
        Column("sessions", _I),
        Column("session_ms_mean", _D, nullable=True),
        Column("session_ms_p50", _D, nullable=True),
        Column("session_ms_max", _L, nullable=True),
        Column("top_artists", ARTIST_AFFINITIES),
        Column("affinity_half_life_ms", _L),
    ),
    key="event_id",
    policy="first",
    extra_ddl=USER_TABLE.companion_ddl(hidden=(PARTITION_COL, OFFSET_COL)),
)

#: The feature store's history of per-track windowed play counts and trending scores
#: (TrackFeaturesComputed.avsc), as :data:`USER_FEATURES`; views ``track_features_latest`` and
#: macro ``track_features_as_of(ts)``.
TRACK_FEATURES = Projection(
    name=TRACK_TABLE.name,
    version=1,
    topic="personalisation.features.tracks",
    event_type="backbeat.personalisation.TrackFeaturesComputed",
    columns=(
        Column("event_id", _S),
        Column("track_id", _S),
        Column("artist_id", _S),
        Column("occurred_at", _T),
        Column("feature_set", _S),
        Column("window_start", _T),
        Column("window_end", _T),
        Column("window_size_ms", _L),
        Column("window_step_ms", _L),
        Column("grace_ms", _L),
        Column("plays", _I),
        Column("listeners", _I),
        Column("trending_score", _D),
        Column("baseline_plays_mean", _D),
        Column("baseline_windows", _I),
    ),
    key="event_id",
    policy="first",
    extra_ddl=TRACK_TABLE.companion_ddl(hidden=(PARTITION_COL, OFFSET_COL)),
)

#: Every projection by name (``backbeat project`` runs them all by default).
PROJECTIONS: dict[str, Projection] = {
    p.name: p for p in (LISTENS, SESSIONS, TRACKS, USER_FEATURES, TRACK_FEATURES)
}


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
    "ARTIST_AFFINITIES",
    "LISTENS",
    "OFFSET_COL",
    "PARTITION_COL",
    "PROJECTIONS",
    "SESSIONS",
    "TRACKS",
    "TRACK_FEATURES",
    "USER_FEATURES",
    "Column",
    "Projection",
    "get_projection",
    "sql_type",
    "struct_list",
    "to_table",
    "to_table_checked",
]
