"""The feature store in DuckDB: views and table macros over the feature history tables, and the
point-in-time read behind ``backbeat features``.

The history tables ``user_features`` and ``track_features`` are projections
(:data:`projections.readmodels.USER_FEATURES` / ``TRACK_FEATURES``): every final value of a
``UserFeaturesComputed`` / ``TrackFeaturesComputed`` event once, keyed by its deterministic
``event_id``. Over each, this module defines (the runner creates them with the table, at every
start, idempotently; they live in the DuckDB file, so read-only connections such as
``backbeat sql`` use them):

* ``<table>_latest`` (view): per entity, ``feature_set`` and ``window_size_ms``, the value with the
  greatest ``window_end`` — whatever order the windows arrived in;
* ``<table>_as_of(ts)`` (table macro): per entity, ``feature_set`` and ``window_size_ms``, the
  latest value with ``occurred_at <= ts``, never a later one. ``occurred_at`` is the event time at
  which a value became known (the window end, see the schemas' docs), so a training query as of
  ``ts`` sees only what was known then (no label leakage). ``ts`` is a UTC ``TIMESTAMP``, a
  ``TIMESTAMPTZ``, a ``DATE``, or an ISO-8601 string; an offset in a string (``Z``, ``+02:00``)
  is honoured (DuckDB's own string → ``TIMESTAMP`` cast would drop it), a string without one is
  UTC — independent of the session's ``TimeZone``.

``feature_set`` is part of the grouping so that two feature definitions (``listening-v1`` and a
later ``-v2``) are never mixed; with one feature set it is one row per entity and window size.
The provenance columns ``kafka_partition`` / ``kafka_offset`` are left out of views and macros.
DDL builders and :func:`parse_as_of` are pure; :func:`read_features` is the I/O edge.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import duckdb

from infra.errors import BackbeatError
from infra.settings import Settings
from projections.store import NoReadModelsError, reader


class FeatureStoreError(BackbeatError):
    """A feature-store read could not be answered (base of the errors below)."""


class NoFeatureStoreError(FeatureStoreError):
    """There is no feature store yet: no DuckDB file, no feature tables, or no values in them."""


class UnknownEntityError(FeatureStoreError):
    """The entity (user or track) has no feature values (at all, or as of the time asked)."""


class BadTimeError(FeatureStoreError):
    """An as-of time is not an ISO-8601 date or time."""


#: Group of a "latest" / "as of" value besides the entity column.
_GROUP = ("feature_set", "window_size_ms")

#: A string ``ts`` that ends in a UTC offset after a time of day: ``Z``, ``+02``, ``+02:00``, ``-0500``.
_OFFSET_RE = r"[T ]\d{1,2}:\d{2}(:\d{2}(\.\d+)?)?\s*(Z|[+-]\d{2}(:?\d{2})?)$"


def utc_timestamp_sql(param: str) -> str:
    """A DuckDB expression turning macro parameter ``param`` into a UTC ``TIMESTAMP``: a
    ``TIMESTAMPTZ`` or a string with an offset via ``timezone('UTC', CAST(… AS TIMESTAMPTZ))``
    (the instant, whatever the session ``TimeZone``), anything else (``TIMESTAMP``, ``DATE``, a
    string without offset) by a plain cast, read as UTC. Rule from the DuckDB documentation
    ("Timestamp with Time Zone Functions", ``timezone(text, timestamptz)``)."""
    return (
        f"CASE WHEN typeof({param}) = 'TIMESTAMP WITH TIME ZONE' OR (typeof({param}) = 'VARCHAR' "
        f"AND regexp_matches(CAST({param} AS VARCHAR), '{_OFFSET_RE}')) "
        f"THEN timezone('UTC', CAST({param} AS TIMESTAMPTZ)) ELSE CAST({param} AS TIMESTAMP) END"
    )


@dataclass(frozen=True)
class FeatureTable:
    """A feature-store history table: its ``name``, the ``entity`` column (``user_id`` /
    ``track_id``) the values are per, and ``kind`` (``"user"``), the entity's name in messages.
    Names of the companions: :attr:`latest`, :attr:`as_of`."""

    name: str
    entity: str
    kind: str

    @property
    def latest(self) -> str:
        """Name of the latest-value view, ``<name>_latest``."""
        return f"{self.name}_latest"

    @property
    def as_of(self) -> str:
        """Name of the point-in-time table macro, ``<name>_as_of``."""
        return f"{self.name}_as_of"

    def _select(self, hidden: Sequence[str]) -> str:
        quoted = ", ".join(f'"{h}"' for h in hidden)
        cols = f"* EXCLUDE ({quoted})" if hidden else "*"
        return f'SELECT {cols} FROM "{self.name}"'

    def _one_per_group(self, order: str) -> str:
        group = ", ".join((f'"{self.entity}"', *_GROUP))
        return f"QUALIFY row_number() OVER (PARTITION BY {group} ORDER BY {order}) = 1"

    def companion_ddl(self, hidden: Sequence[str] = ()) -> tuple[str, str]:
        """``CREATE OR REPLACE`` of the latest view and the as-of macro (module docstring), both
        without the ``hidden`` columns. Ties (same ``window_end``, which deterministic event ids
        make a re-emission of the same value) are broken by ``event_id`` so reads are stable."""
        select = self._select(hidden)
        latest_pick = self._one_per_group("window_end DESC, occurred_at DESC, event_id")
        as_of_pick = self._one_per_group("occurred_at DESC, window_end DESC, event_id")
        return (
            f'CREATE OR REPLACE VIEW "{self.latest}" AS\n{select}\n{latest_pick}',
            f'CREATE OR REPLACE MACRO "{self.as_of}"(ts) AS TABLE\n{select}\n'
            f"WHERE occurred_at <= ({utc_timestamp_sql('ts')})\n{as_of_pick}",
        )


USER_TABLE = FeatureTable("user_features", "user_id", "user")
TRACK_TABLE = FeatureTable("track_features", "track_id", "track")


def parse_as_of(text: str) -> datetime:
    """An ISO-8601 date or time (``2014-04-20``, ``2014-04-20T10:00``, ``…Z``, ``…+02:00``) as a
    naive UTC ``datetime`` (the read models' convention). A time without offset is UTC.
    Parsing: :meth:`datetime.fromisoformat` (Python ≥ 3.11 accepts ``Z``).

    Raises:
        BadTimeError: ``text`` is not such a time (the message shows accepted forms).
    """
    try:
        when = datetime.fromisoformat(text.strip())
    except ValueError:
        raise BadTimeError(
            f"--as-of {text!r} is not an ISO-8601 time; use e.g. 2014-04-20T10:00:00Z or "
            "2014-04-20T12:00:00+02:00 or 2014-04-20 (a time without an offset is UTC)"
        ) from None
    return when.astimezone(UTC).replace(tzinfo=None) if when.tzinfo else when


def _no_store(settings: Settings, why: str) -> NoFeatureStoreError:
    return NoFeatureStoreError(
        f"{why} at {settings.duckdb_path}: the features are computed by the Faust worker "
        "('backbeat worker', which publishes personalisation.features.users / .tracks) and "
        "materialised by the projections: run the worker, then 'backbeat project --until-caught-up'"
    )


def _rows(cursor: duckdb.DuckDBPyConnection) -> list[dict[str, Any]]:
    names = [d[0] for d in cursor.description or []]
    return [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]


def read_features(
    settings: Settings,
    table: FeatureTable,
    entity_id: str,
    as_of: datetime | None = None,
    timeout_s: float = 30.0,
) -> list[dict[str, Any]]:
    """The latest feature values of ``entity_id`` in ``table`` (``as_of=None``: the latest
    view), or those known as of ``as_of`` (naive UTC; the as-of macro), one dict per
    ``(feature_set, window_size_ms)`` ordered by them. Keys are the table's columns without the
    provenance columns: times are naive UTC ``datetime``, ``top_artists`` a list of
    ``{"artist_id": str, "affinity": float}``. Opens the DuckDB file read-only for the read
    (:func:`projections.store.reader`), so it works while the runner writes.

    Raises:
        NoFeatureStoreError: no DuckDB file, no feature table/view/macro (the projections never
            ran with this code), or no values at all; the message says what to run.
        UnknownEntityError: the entity has no values, or none known as of ``as_of``.
        DatabaseBusyError: the file stayed locked for ``timeout_s`` seconds.
    """
    try:
        with reader(settings.duckdb_path, timeout_s) as conn:
            present = conn.execute(
                "SELECT (SELECT count(*) FROM duckdb_tables() WHERE table_name = $t), "
                "(SELECT count(*) FROM duckdb_views() WHERE view_name = $v), "
                "(SELECT count(*) FROM duckdb_functions() WHERE function_name = $m)",
                {"t": table.name, "v": table.latest, "m": table.as_of},
            ).fetchall()[0]
            if not all(present):
                raise _no_store(settings, f"there is no feature store ({table.name} and its views)")
            order = "ORDER BY feature_set, window_size_ms"
            if as_of is None:
                sql = f'SELECT * FROM "{table.latest}" WHERE "{table.entity}" = ? {order}'
                rows = _rows(conn.execute(sql, [entity_id]))
            else:
                sql = f'SELECT * FROM "{table.as_of}"(?) WHERE "{table.entity}" = ? {order}'
                rows = _rows(conn.execute(sql, [as_of, entity_id]))
            if rows:
                return rows
            total, entities, first = conn.execute(
                f'SELECT count(*), count(DISTINCT "{table.entity}"), '
                f'min(occurred_at) FILTER (WHERE "{table.entity}" = ?) FROM "{table.name}"',
                [entity_id],
            ).fetchall()[0]
    except NoReadModelsError:
        raise _no_store(settings, "there are no read models yet") from None
    if total == 0:
        raise _no_store(settings, f"the feature store is empty (no {table.kind} features)")
    if first is None:
        raise UnknownEntityError(
            f"{table.kind} {entity_id!r} has no features: it is not among the {entities:,} "
            f"{table.kind}s in {table.name}; check the id, e.g. backbeat sql "
            f'"SELECT DISTINCT {table.entity} FROM {table.name} LIMIT 10"'
        )
    raise UnknownEntityError(
        f"{table.kind} {entity_id!r} has no features known as of {as_of:%Y-%m-%d %H:%M:%S} UTC: "
        f"its first value became known at {first:%Y-%m-%d %H:%M:%S} UTC; ask for a later --as-of"
    )


__all__ = [
    "TRACK_TABLE",
    "USER_TABLE",
    "BadTimeError",
    "FeatureStoreError",
    "FeatureTable",
    "NoFeatureStoreError",
    "UnknownEntityError",
    "parse_as_of",
    "read_features",
    "utc_timestamp_sql",
]
