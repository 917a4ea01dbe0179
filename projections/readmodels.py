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
:attr:`Projection.extra_ddl`), created by the runner right after the table, and a row filter
(:class:`RowFilter`, :attr:`Projection.where`) when two read models take the events of one type
apart (``ad_reports`` and ``ad_reports_item`` split ``AdReportPublished`` on ``ad_id``). A column
may read an event field of another type and cast it (:attr:`Column.read_as`, e.g. the ad id
string as the integer ``item_id``).

A projection may also read several event types of its topic (:attr:`Projection.also_reads`) and
map each event to zero or more rows with a function (:attr:`Projection.rows`, e.g. the billing
ledger: a captured payment posts four journal lines, an authorisation none); its key may then be
several columns (``("entry_id", "line")``). An event's rows are applied all or none.

Policies on a repeated key (docs/design.md §3 "Exactly-once effects"): ``first`` — the first event
with a key wins and a later duplicate changes nothing (``listens``, ``sessions``, and the feature
store's history tables ``user_features`` and ``track_features``, keyed by ``event_id``);
``last`` — the last event per key (highest offset) wins (``tracks``, keyed by ``track_id``, the
compacted-topic semantics). The ad read models (``ad_reports``, ``ad_reports_item``,
``campaign_pauses``) are ``first`` by ``event_id``: the agent's reports and budget events are
final and their ids deterministic, so a redelivered copy changes nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal

import pyarrow as pa
import pyarrow.compute as pc

from infra.errors import ConfigError
from projections import availability
from projections.feature_store import TRACK_TABLE, USER_TABLE
from sagas import access, ledger, notification_model
from streams.plays import COUNT_THRESHOLD_MS

Policy = Literal["first", "last"]

#: A projection's row mapping (:attr:`Projection.rows`): ``(event type full name, decoded event)
#: -> rows`` (dicts holding the columns' fields); raises ``ValueError`` (or ``TypeError``,
#: ``KeyError``) for an event that cannot be mapped, which then becomes a reject.
RowMapper = Callable[[str, Mapping[str, Any]], Sequence[Mapping[str, Any]]]

#: The provenance columns every read-model row carries.
PARTITION_COL = "kafka_partition"
OFFSET_COL = "kafka_offset"

_SQL_TYPES: dict[pa.DataType, str] = {
    pa.string(): "VARCHAR",
    pa.int32(): "INTEGER",
    pa.int64(): "BIGINT",
    pa.float64(): "DOUBLE",
    pa.timestamp("ms"): "TIMESTAMP",
    pa.bool_(): "BOOLEAN",
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
    (default: same name), whether it may be NULL, and ``read_as``: the Arrow type of the event
    field when it differs from the column's (the value is cast with Arrow's safe cast, e.g.
    ``"14"`` → 14; a value that does not cast makes the event a reject)."""

    name: str
    type: pa.DataType
    field: str = ""
    nullable: bool = False
    read_as: pa.DataType | None = None

    @property
    def source(self) -> str:
        """The event field this column is read from."""
        return self.field or self.name

    @property
    def source_type(self) -> pa.DataType:
        """The Arrow type of the event field (``read_as``, else the column's type)."""
        return self.read_as or self.type

    @property
    def sql_type(self) -> str:
        """The DuckDB type (:func:`sql_type`)."""
        return sql_type(self.type)


@dataclass(frozen=True)
class RowFilter:
    """Which events of a projection's type become rows: those whose ``field`` is NULL (or
    missing) when ``is_null``, else those where it is not. The others are skipped: neither rows
    nor rejects, and their offsets move on like any record's."""

    field: str
    is_null: bool

    def accepts(self, event: Mapping[str, Any]) -> bool:
        """True when ``event`` (a decoded event dict) passes the filter."""
        return (event.get(self.field) is None) == self.is_null

    def __str__(self) -> str:
        return f"{self.field} IS {'' if self.is_null else 'NOT '}NULL"


@dataclass(frozen=True)
class Projection:
    """A named, versioned mapping of one event type on one topic to one DuckDB table.

    ``name`` is also the table name; ``key`` the column (or tuple of columns) duplicates are
    recognised by; ``policy`` what a repeated key does (module docstring); ``lake`` whether
    applied rows are also written to the Parquet lake, partitioned by the date (UTC) of
    ``lake_time``; ``extra_ddl`` the idempotent statements (``CREATE OR REPLACE VIEW`` /
    ``MACRO``) over the table that the runner runs after :attr:`ddl` at every start, so they
    follow the code; ``where`` the events that
    become rows (``None``: all of its type; :class:`RowFilter`); ``also_reads`` further event
    types (Avro full names) of the topic it reads besides ``event_type`` (others are rejects);
    ``rows`` the function mapping one event to its rows (:data:`RowMapper`; ``None``: one row
    per event, the columns read from the event's fields). One runner feeds one projection per
    topic, so projections that share a topic run in separate runners
    (:func:`projections.runner.run_projections` arranges that).
    """

    name: str
    version: int
    topic: str
    event_type: str
    columns: tuple[Column, ...]
    key: str | tuple[str, ...]
    policy: Policy
    lake: bool = False
    lake_time: str = ""
    extra_ddl: tuple[str, ...] = ()
    where: RowFilter | None = None
    also_reads: tuple[str, ...] = ()
    rows: RowMapper | None = None

    @property
    def key_columns(self) -> tuple[str, ...]:
        """The key as a tuple of column names."""
        return (self.key,) if isinstance(self.key, str) else tuple(self.key)

    @property
    def event_types(self) -> frozenset[str]:
        """Every event type (Avro full name) the projection reads: ``event_type`` and
        ``also_reads``."""
        return frozenset((self.event_type, *self.also_reads))

    @property
    def arrow_schema(self) -> pa.Schema:
        """The Arrow schema of rows: the columns, then ``kafka_partition`` (int32) and
        ``kafka_offset`` (int64)."""
        fields = [pa.field(c.name, c.type, nullable=c.nullable) for c in self.columns]
        fields += [pa.field(PARTITION_COL, pa.int32(), False), pa.field(OFFSET_COL, pa.int64(), False)]
        return pa.schema(fields)

    @property
    def event_struct(self) -> pa.StructType:
        """The Arrow struct type of the event fields the columns read (by event field name, with
        their :attr:`Column.source_type`)."""
        return pa.struct([pa.field(c.source, c.source_type) for c in self.columns])

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
        pyarrow.ArrowException, TypeError, ValueError: a value has the wrong type (or does not
            cast to the column's type, :attr:`Column.read_as`), or is NULL or missing where the
            column (or a field or item nested in it) is not nullable.
    """
    # one C++ pass over the dicts (a struct array), about 2x faster than a Python list per column;
    # a missing key becomes NULL, so non-nullable columns are checked below
    struct = pa.array(events, type=projection.event_struct)
    arrays: list[pa.Array] = (
        struct.flatten() if len(events) else [pa.array([], c.source_type) for c in projection.columns]
    )
    for i, col in enumerate(projection.columns):
        if col.read_as is not None:
            arrays[i] = pc.cast(arrays[i], col.type)  # safe cast: raises ArrowInvalid on loss
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
    types: Sequence[str] | None = None,
) -> tuple[pa.Table, list[tuple[int, str]]]:
    """Like :func:`to_table`, but never raises for a bad event: returns ``(table, rejects)``
    where ``rejects`` lists ``(index, reason)`` of events that could not be mapped (they are
    not in the table). The whole batch is mapped at once; only when that fails is it mapped
    event by event to find the culprits.

    A projection with a row mapping (:attr:`Projection.rows`) maps each event to its rows first;
    ``types[i]`` is the event type of ``events[i]`` (default: ``projection.event_type``). The
    rows of an event share its partition and offset, and an event whose mapping raises, or one
    of whose rows does not fit the columns, is rejected with none of its rows in the table."""
    if projection.rows is not None:
        return _mapped_table_checked(projection, events, partitions, offsets, types)
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


def _mapped_table_checked(
    projection: Projection,
    events: Sequence[Mapping[str, Any]],
    partitions: Sequence[int],
    offsets: Sequence[int],
    types: Sequence[str] | None,
) -> tuple[pa.Table, list[tuple[int, str]]]:
    """:func:`to_table_checked` for a projection with a row mapping."""
    assert projection.rows is not None
    groups: list[tuple[int, Sequence[Mapping[str, Any]]]] = []
    rejects: list[tuple[int, str]] = []
    for i, event in enumerate(events):
        event_type = types[i] if types is not None else projection.event_type
        try:
            groups.append((i, projection.rows(event_type, event)))
        except (TypeError, ValueError, KeyError) as exc:
            rejects.append((i, f"cannot map {event_type} to {projection.name} rows: {exc}"))

    def build(chosen: Sequence[tuple[int, Sequence[Mapping[str, Any]]]]) -> pa.Table:
        return to_table(
            projection,
            [row for _, rows in chosen for row in rows],
            [partitions[i] for i, rows in chosen for _ in rows],
            [offsets[i] for i, rows in chosen for _ in rows],
        )

    try:
        return build(groups), rejects
    except (TypeError, ValueError, pa.ArrowException):
        pass
    good: list[tuple[int, Sequence[Mapping[str, Any]]]] = []
    for group in groups:
        try:
            build([group])
            good.append(group)
        except (TypeError, ValueError, pa.ArrowException) as exc:
            rejects.append((group[0], f"cannot map to {projection.name} rows: {exc}"))
    return build(good), sorted(rejects)


_S, _I, _L, _D, _T = pa.string(), pa.int32(), pa.int64(), pa.float64(), pa.timestamp("ms")

LISTENS = Projection(
    name="listens",
    version=2,
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
        Column("territory", _S, nullable=True),
        Column("playback_id", _S, nullable=True),
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

#: The ad-reporting agent's campaign reports (schemas/ads/AdReportPublished.avsc, ``ad_id``
#: NULL): 1-minute tumbling windows (``window_size_ms = window_step_ms = 60000``) and hourly
#: windows advancing by 5 minutes (3600000/300000); spend exact in micros (and floored to minor
#: units), over-delivery apart, clicks without a known impression or beyond the attribution
#: window counted by click time. Each report is final; its ``event_id`` is deterministic, so a
#: redelivered copy collapses (``first``). Also in the Parquet lake by the window's start date.
AD_REPORTS = Projection(
    name="ad_reports",
    version=1,
    topic="ads.reports",
    event_type="backbeat.ads.AdReportPublished",
    columns=(
        Column("event_id", _S),
        Column("campaign_id", _S),
        Column("window_start", _T),
        Column("window_end", _T),
        Column("window_size_ms", _L),
        Column("window_step_ms", _L),
        Column("impressions", _L),
        Column("clicks", _L),
        Column("click_through_rate", _D),
        Column("spend_micros", _L),
        Column("spend_minor", _L),
        Column("currency", _S),
        Column("overdelivery_impressions", _L),
        Column("overdelivery_clicks", _L),
        Column("overdelivery_spend_micros", _L),
        Column("clicks_unknown_impression", _L),
        Column("clicks_outside_attribution", _L),
        Column("occurred_at", _T),
    ),
    key="event_id",
    policy="first",
    lake=True,
    lake_time="window_start",
    where=RowFilter("ad_id", is_null=True),
)

#: The per-ad reports (``ad_id`` set): one row per (item, position) and 1-minute tumbling window,
#: clicks attributed to the window of the impression they refer to. ``item_id`` is the Open
#: Bandit item (the report's ``ad_id`` as an integer). Lake as :data:`AD_REPORTS`.
AD_REPORTS_ITEM = Projection(
    name="ad_reports_item",
    version=1,
    topic="ads.reports",
    event_type="backbeat.ads.AdReportPublished",
    columns=(
        Column("event_id", _S),
        Column("campaign_id", _S),
        Column("item_id", _I, field="ad_id", read_as=_S),
        Column("position", _I),
        Column("window_start", _T),
        Column("window_end", _T),
        Column("window_size_ms", _L),
        Column("impressions", _L),
        Column("clicks", _L),
        Column("click_through_rate", _D),
        Column("spend_micros", _L),
        Column("spend_minor", _L),
        Column("currency", _S),
        Column("overdelivery_impressions", _L),
        Column("overdelivery_clicks", _L),
        Column("overdelivery_spend_micros", _L),
        Column("occurred_at", _T),
    ),
    key="event_id",
    policy="first",
    lake=True,
    lake_time="window_start",
    where=RowFilter("ad_id", is_null=False),
)

#: The ads orchestrator's record of paused campaigns (schemas/ads/CampaignBudgetExhausted.avsc):
#: a campaign is paused from ``paused_at`` (the event time its budget ran out) to the end of the
#: budget period starting at ``period_start``. The log is history: a pause never drops or alters
#: imported events; the agent reports later impressions of the period as over-delivery.
CAMPAIGN_PAUSES = Projection(
    name="campaign_pauses",
    version=1,
    topic="ads.campaigns",
    event_type="backbeat.ads.CampaignBudgetExhausted",
    columns=(
        Column("event_id", _S),
        Column("campaign_id", _S),
        Column("budget_period", _S),
        Column("period_start", _T),
        Column("paused_at", _T, field="occurred_at"),
        Column("budget_minor", _L),
        Column("spent_minor", _L),
        Column("currency", _S),
    ),
    key="event_id",
    policy="first",
)

# -- issue 17, the ledger on the log (streams/ledger.py, docs/live-royalties.md) ---------------------
#: The billing ledger (:mod:`sagas.ledger`): the double-entry journal lines, one
#: ``LedgerEntryPosted`` each on ``billing.ledger`` (published by the ledger agent,
#: :mod:`streams.ledger`, from the payment events of ``billing.payments``: a capture posts a
#: ``sale`` and a ``settlement`` entry, a refund a ``refund`` entry, the other four types nothing),
#: signed here (debit > 0, credit < 0) in minor units; ``saga_id`` is the payment event's
#: ``correlation_id``, ``event_id``/``event_type`` the payment event's, ``reference_type`` /
#: ``reference_id`` what the payment was for (``SUBSCRIPTION``/``ORDER``/``PAYMENT`` and its id),
#: ``ledger_event_id`` the line's own event id. Keyed by ``(entry_id, line)``, ``first``: ids derive
#: from the payment event id, so a republished line changes nothing. Version 2: built from
#: ``billing.ledger`` (version 1 read ``billing.payments``), with the three reference columns.
#: Views ``ledger_balances(account, currency, balance_minor)`` and ``ledger_by_saga(saga_id,
#: account, balance_minor)``.
LEDGER_ENTRIES = Projection(
    name="ledger_entries",
    version=2,
    topic="billing.ledger",
    event_type=ledger.POSTED_TYPE,
    rows=ledger.posted_rows,
    columns=(
        Column("entry_id", _S),
        Column("line", _I),
        Column("saga_id", _S, nullable=True),
        Column("payment_id", _S),
        Column("account", _S),
        Column("amount_minor", _L),
        Column("currency", _S),
        Column("posted_at", _T),
        Column("event_id", _S),
        Column("event_type", _S),
        Column("entry_kind", _S),
        Column("reference_type", _S),
        Column("reference_id", _S),
        Column("ledger_event_id", _S),
    ),
    key=("entry_id", "line"),
    policy="first",
    extra_ddl=ledger.VIEWS_DDL,
)
# -- end of issue 17, the ledger on the log ---------------------------------------------------------

# --- issue 17: listening from playback (the player's plays and skips) -------------------------

#: The event types of ``playback.events`` (full names); ``plays`` reads them all (so none is a
#: reject) and takes rows from the end events only.
PLAYBACK_EVENT_TYPES: tuple[str, ...] = tuple(
    f"backbeat.playback.{t}"
    for t in (
        "PlaybackSkipped", "PlaybackCompleted", "PlaybackSessionStarted", "PlaybackStarted",
        "PlaybackPaused", "PlaybackResumed", "PlaybackSessionEnded",
    )
)  # fmt: skip


def play_rows(event_type: str, event: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The ``plays`` row of an end event (``PlaybackSkipped`` / ``PlaybackCompleted``); no row
    for the other player events. ``counted``: the 30-second rule (:data:`streams.plays.
    COUNT_THRESHOLD_MS`); ``skip_position_ms`` and ``skip_reason`` for a skip, ``duration_ms``
    for a completion.

    Raises:
        KeyError: a field of the end event is missing.
    """
    name = event_type.rsplit(".", 1)[-1]  # full (backbeat.playback.X) or short
    skipped = name == "PlaybackSkipped"
    if not skipped and name != "PlaybackCompleted":
        return []
    played = event["ms_played"]
    return [
        {
            "playback_id": event["playback_id"],
            "event_id": event["event_id"],
            "user_id": event["user_id"],
            "session_id": event["session_id"],
            "track_id": event["track_id"],
            "ended_at": event["occurred_at"],
            "ms_played": played,
            "outcome": "SKIPPED" if skipped else "COMPLETED",
            "counted": played >= COUNT_THRESHOLD_MS,
            "skip_position_ms": event["position_ms"] if skipped else None,
            "skip_reason": event["reason"] if skipped else None,
            "duration_ms": None if skipped else event["duration_ms"],
        }
    ]


def _skip_rates(view: str, by: str) -> str:
    return f"""CREATE OR REPLACE VIEW {view} AS
SELECT {by},
  CAST(count(*) AS BIGINT) AS plays,
  CAST(count(*) FILTER (WHERE outcome = 'SKIPPED') AS BIGINT) AS skips,
  CAST(count(*) FILTER (WHERE outcome = 'SKIPPED' AND NOT counted) AS BIGINT) AS early_skips,
  CAST(count(*) FILTER (WHERE counted) AS BIGINT) AS counted_plays,
  count(*) FILTER (WHERE outcome = 'SKIPPED') / count(*) AS skip_rate,
  count(*) FILTER (WHERE outcome = 'SKIPPED' AND NOT counted) / count(*) AS early_skip_rate,
  CAST(sum(ms_played) AS BIGINT) AS ms_played,
  max(ended_at) AS last_ended_at
FROM plays GROUP BY {by}"""


#: One row per finished play of the player (``playback.events``): its end (skip or completion),
#: ``ms_played``, whether it counted (>= 30,000 ms, the rule the listening-from-playback agent
#: applies) and, for a skip, where. Keyed by ``playback_id``, ``first``: the first end of a play
#: wins, as in the agent, so a redelivered end changes nothing. Views ``track_skip_rates`` and
#: ``user_skip_rates`` (``plays``, ``skips``, ``early_skips`` = skips before 30 s,
#: ``counted_plays``, ``skip_rate``, ``early_skip_rate`` (shares of plays), ``ms_played``,
#: ``last_ended_at``): the skip features.
PLAYS = Projection(
    name="plays",
    version=1,
    topic="playback.events",
    event_type=PLAYBACK_EVENT_TYPES[0],
    also_reads=PLAYBACK_EVENT_TYPES[1:],
    rows=play_rows,
    columns=(
        Column("playback_id", _S),
        Column("event_id", _S),
        Column("user_id", _S),
        Column("session_id", _S),
        Column("track_id", _S),
        Column("ended_at", _T),
        Column("ms_played", _L),
        Column("outcome", _S),
        Column("counted", pa.bool_()),
        Column("skip_position_ms", _L, nullable=True),
        Column("skip_reason", _S, nullable=True),
        Column("duration_ms", _L, nullable=True),
    ),
    key="playback_id",
    policy="first",
    extra_ddl=(_skip_rates("track_skip_rates", "track_id"), _skip_rates("user_skip_rates", "user_id")),
)
# -- issue 17, notifications (sagas/notifications.py) -----------------------------------------------
#: Every event of ``platform.notifications`` (requests and the relay's final outcomes), one row
#: each, keyed by ``event_id`` (``first``: the relay's final events have deterministic ids, so a
#: re-published copy is stored once); fields of the other types are NULL, ``event_type`` is the
#: short name, ``retryable`` 0/1. View ``notifications_status``: each notification's final state
#: (:mod:`sagas.notification_model`).
NOTIFICATIONS = Projection(
    name="notifications",
    version=1,
    topic="platform.notifications",
    event_type=notification_model.EVENT_TYPES[0],
    also_reads=notification_model.EVENT_TYPES[1:],
    rows=notification_model.notification_rows,
    columns=(
        Column("event_id", _S),
        Column("event_type", _S),
        Column("notification_id", _S),
        Column("user_id", _S),
        Column("channel", _S),
        Column("occurred_at", _T),
        Column("template", _S, nullable=True),
        Column("priority", _S, nullable=True),
        Column("correlation_id", _S, nullable=True),
        Column("provider", _S, nullable=True),
        Column("provider_message_id", _S, nullable=True),
        Column("attempt", _I, nullable=True),
        Column("reason", _S, nullable=True),
        Column("retryable", _I, nullable=True),
        Column("retry_after_ms", _L, nullable=True),
        Column("detail", _S, nullable=True),
    ),
    key="event_id",
    policy="first",
    extra_ddl=notification_model.VIEWS_DDL,
)
# -- end of issue 17, notifications ----------------------------------------------------------------
# -- catalog changes (issue 17: catalog changes apply; projections/availability.py) ---------------
#: A list of strings (Avro ``array`` of ``string``) → DuckDB ``VARCHAR[]``.
_STRINGS = pa.list_(pa.field("item", pa.string(), nullable=False))
_B = pa.bool_()

#: The change log of published tracks (``catalog.track-changes``, TrackUpdated.avsc and
#: TrackWithdrawn.avsc): one row per event, ``change`` ``updated`` or ``withdrawn``, the other
#: type's fields NULL; ``first`` by ``event_id``. Its companions (created with it, and with the
#: ``tracks`` and ``licences`` tables they read when those are missing) are the folded views
#: ``tracks_current`` / macro ``tracks_as_of(ts)`` and ``track_availability`` / macro
#: ``track_availability_at(ts)``; the rules are in :mod:`projections.availability`.
TRACK_CHANGES = Projection(
    name=availability.CHANGES_TABLE,
    version=1,
    topic="catalog.track-changes",
    event_type=availability.UPDATED,
    also_reads=(availability.WITHDRAWN,),
    rows=availability.change_rows,
    columns=(
        Column("event_id", _S),
        Column("change", _S),
        Column("track_id", _S),
        Column("occurred_at", _T),
        Column("changed_fields", _STRINGS, nullable=True),
        Column("name", _S, nullable=True),
        Column("artist", _S, nullable=True),
        Column("album_id", _S, nullable=True),
        Column("genre", _S, nullable=True),
        Column("popularity", _I, nullable=True),
        Column("duration_ms", _L, nullable=True),
        Column("explicit", _B, nullable=True),
        Column("reason", _S, nullable=True),
        Column("territories", _STRINGS, nullable=True),
        Column("licence_id", _S, nullable=True),
    ),
    key="event_id",
    policy="first",
)

#: Licences granted and revoked (``catalog.licences``, LicenceGranted.avsc and LicenceRevoked.avsc):
#: one row per event, ``change`` ``granted`` or ``revoked``; ``first`` by ``event_id``.
LICENCES = Projection(
    name=availability.LICENCES_TABLE,
    version=1,
    topic="catalog.licences",
    event_type=availability.GRANTED,
    also_reads=(availability.REVOKED,),
    rows=availability.licence_rows,
    columns=(
        Column("event_id", _S),
        Column("change", _S),
        Column("licence_id", _S),
        Column("track_id", _S),
        Column("occurred_at", _T),
        Column("society", _S),
        Column("territories", _STRINGS),
        Column("rights_type", _S, nullable=True),
        Column("valid_from", _T, nullable=True),
        Column("valid_until", _T, nullable=True),
        Column("royalty_share_bp", _I, nullable=True),
        Column("reason", _S, nullable=True),
    ),
    key="event_id",
    policy="first",
)

#: Album releases (``catalog.albums``, compacted, AlbumReleased.avsc): the last per ``album_id``.
ALBUMS = Projection(
    name=availability.ALBUMS_TABLE,
    version=1,
    topic="catalog.albums",
    event_type="backbeat.catalog.AlbumReleased",
    columns=(
        Column("album_id", _S),
        Column("event_id", _S),
        Column("released_at", _T, field="occurred_at"),
        Column("name", _S),
        Column("artist", _S),
        Column("album_type", _S),
        Column("track_ids", _STRINGS),
        Column("release_date", _S, nullable=True),
        Column("label", _S, nullable=True),
        Column("upc", _S, nullable=True),
    ),
    key="album_id",
    policy="last",
)

#: The folded views need all three tables: each of the two change projections creates the
#: missing ones (``CREATE TABLE IF NOT EXISTS``, a no-op over a replayed read model's view) and
#: then the views, so either runner may start first.
_CATALOG_VIEWS = (TRACKS.ddl, TRACK_CHANGES.ddl, LICENCES.ddl, *availability.VIEWS_DDL)
TRACK_CHANGES = replace(TRACK_CHANGES, extra_ddl=_CATALOG_VIEWS)
LICENCES = replace(LICENCES, extra_ddl=_CATALOG_VIEWS)
# -- end of catalog changes ------------------------------------------------------------------------

# -- issue 17, subscriptions over time (sagas.access, sagas.renewal) ----------------------------
#: Every entitlement reply of ``platform.entitlements``, one row per event (``first`` by
#: ``event_id``: a resent reply changes nothing); the view ``entitlements`` folds them into one
#: row per entitlement (kind, business-time ``valid_from``/``valid_until``, state). The access
#: rule and the queries: :mod:`sagas.access`.
ENTITLEMENT_EVENTS = Projection(
    name="entitlement_events",
    version=1,
    topic="platform.entitlements",
    event_type=access.ENTITLEMENT_TYPES[0],
    also_reads=access.ENTITLEMENT_TYPES[1:],
    rows=access.entitlement_rows,
    columns=(
        Column("event_id", _S),
        Column("event_type", _S),
        Column("entitlement_id", _S),
        Column("user_id", _S),
        Column("kind", _S, nullable=True),
        Column("subscription_id", _S, nullable=True),
        Column("order_id", _S, nullable=True),
        Column("valid_from", _T, nullable=True),
        Column("valid_until", _T, nullable=True),
        Column("reason", _S, nullable=True),
        Column("occurred_at", _T),
        Column("correlation_id", _S, nullable=True),
    ),
    key="event_id",
    policy="first",
    extra_ddl=(access.ENTITLEMENTS_VIEW,),
)

#: Every event of ``billing.subscriptions`` (requests, activations, renewals, cancellations,
#: rejections), one row per event, ``first`` by ``event_id``; the view ``subscription_periods``
#: has one row per paid period (``SubscriptionActivated`` = period 1, ``SubscriptionRenewed``).
SUBSCRIPTION_EVENTS = Projection(
    name="subscription_events",
    version=1,
    topic="billing.subscriptions",
    event_type=access.SUBSCRIPTION_TYPES[0],
    also_reads=access.SUBSCRIPTION_TYPES[1:],
    rows=access.subscription_rows,
    columns=(
        Column("event_id", _S),
        Column("event_type", _S),
        Column("subscription_id", _S),
        Column("user_id", _S),
        Column("occurred_at", _T),
        Column("plan", _S, nullable=True),
        Column("period", _I, nullable=True),
        Column("period_start", _T, nullable=True),
        Column("period_end", _T, nullable=True),
        Column("access_from", _T, nullable=True),
        Column("effective_at", _T, nullable=True),
        Column("payment_id", _S, nullable=True),
        Column("amount_minor", _L, nullable=True),
        Column("currency", _S, nullable=True),
        Column("reason", _S, nullable=True),
        Column("attempt", _I, nullable=True),
        Column("correlation_id", _S, nullable=True),
    ),
    key="event_id",
    policy="first",
    extra_ddl=(access.PERIODS_VIEW,),
)

#: The simulated business clock (``platform.clock``): its latest tick per ``clock_id`` (``last``).
BUSINESS_CLOCK = Projection(
    name="business_clock",
    version=1,
    topic="platform.clock",
    event_type=access.CLOCK_TYPE,
    columns=(
        Column("clock_id", _S),
        Column("tick", _L),
        Column("now", _T, field="occurred_at"),
        Column("event_id", _S),
    ),
    key="clock_id",
    policy="last",
)

#: Every projection by name (``backbeat project`` runs them all by default).
PROJECTIONS: dict[str, Projection] = {
    p.name: p
    for p in (
        LISTENS, SESSIONS, TRACKS, USER_FEATURES, TRACK_FEATURES, AD_REPORTS, AD_REPORTS_ITEM,
        CAMPAIGN_PAUSES, LEDGER_ENTRIES,
        PLAYS,  # issue 17: listening from playback
        NOTIFICATIONS,  # issue 17, notifications
        TRACK_CHANGES, LICENCES, ALBUMS,  # catalog changes (issue 17)
        ENTITLEMENT_EVENTS, SUBSCRIPTION_EVENTS, BUSINESS_CLOCK,  # issue 17, subscriptions over time
    )
}  # fmt: skip


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
    "AD_REPORTS",
    "AD_REPORTS_ITEM",
    "ALBUMS",
    "ARTIST_AFFINITIES",
    "BUSINESS_CLOCK",
    "ENTITLEMENT_EVENTS",
    "SUBSCRIPTION_EVENTS",
    "CAMPAIGN_PAUSES",
    "LEDGER_ENTRIES",
    "LICENCES",
    "LISTENS",
    "NOTIFICATIONS",
    "OFFSET_COL",
    "PLAYBACK_EVENT_TYPES",
    "PLAYS",
    "PARTITION_COL",
    "PROJECTIONS",
    "SESSIONS",
    "TRACKS",
    "TRACK_CHANGES",
    "TRACK_FEATURES",
    "USER_FEATURES",
    "Column",
    "Projection",
    "RowFilter",
    "RowMapper",
    "get_projection",
    "play_rows",
    "sql_type",
    "struct_list",
    "to_table",
    "to_table_checked",
]
