"""Catalog changes as read models: the change and licence logs as tables, and the rules that fold
them (``docs/live-catalog.md``): ``tracks_current`` (each published track with its metadata edits
and withdrawal status) and ``track_availability`` (per track and territory: may it be played
now, under which licence, and if not, why), both as DuckDB views over table macros taking the
point in time, so a question "as of" any time has the same answer as the views at that time.

Tables (projections of :mod:`projections.readmodels`, ``first`` by ``event_id``, so a
redelivered event changes nothing): ``track_changes`` (``catalog.track-changes``: one row per
``TrackUpdated`` / ``TrackWithdrawn``, ``change`` = ``updated`` / ``withdrawn``) and ``licences``
(``catalog.licences``: one row per ``LicenceGranted`` / ``LicenceRevoked``, ``change`` =
``granted`` / ``revoked``). ``tracks`` stays the ``last``-per-key projection of
``TrackPublished`` on the compacted ``catalog.tracks``: the published record.

Rules, at a point in time ``ts`` (``now`` for the views), ``T`` the territories of
:data:`events.catalog_changes.TERRITORIES`:

* **Edits** (``tracks_as_of(ts)``): every published track (a row of ``tracks``), each field of
  ``name``, ``popularity``, ``genre``, ``duration_ms``, ``explicit``, ``artist``, ``album_id``
  replaced by the value of the latest ``TrackUpdated`` with ``occurred_at <= ts`` that sets it
  (non-NULL), latest by ``(occurred_at, kafka_partition, kafka_offset)`` (one track's changes
  share a partition, so ties go by log order). Changes always overlay the published record,
  whatever arrived first: a change before its ``TrackPublished`` waits in ``track_changes`` and
  applies once the track is published; a re-publication does not undo them. ``explicit`` is NULL
  until an edit sets it (the catalog file has no such column).
* **Withdrawals** are facts from their time on, never undone (the catalogue has no event that
  reinstates a track): ``withdrawn_worldwide`` when a ``TrackWithdrawn`` with no territories
  took effect, ``withdrawn_territories`` the sorted territories named by the others. The track
  stays in ``tracks_current`` with that status (``status``: ``withdrawn`` worldwide, else
  ``available`` in every territory of ``T``, ``partial`` in some, ``unavailable`` in none).
* **Licences**: a licence id's grant is its last ``LicenceGranted`` (log order); it covers the
  territories it lists (none listed: every territory of ``T``; territories outside ``T`` are not
  tracked) from ``valid_from`` until ``valid_until`` (excluded; NULL = open), except a territory
  named by (or, for an empty list, every territory of) a ``LicenceRevoked`` of that licence with
  ``occurred_at <= ts`` — whichever order the grant and the revocation came in.
* **Availability** (``track_availability_at(ts)``; ``track_availability_of(ts, ids)`` for the
  track ids of a ``VARCHAR[]`` only, NULL for all), one row per published track and territory of
  ``T``: ``available`` when a licence covers it at ``ts`` and no withdrawal covers it.
  ``licence_id``: the covering licence with the earliest ``valid_from`` (then lowest id);
  ``reason``, the first that holds: ``withdrawn`` (``since`` = the first withdrawal covering the
  territory, ``withdrawal_reason`` its reason), ``licensed`` (``since`` = that licence's
  ``valid_from``), ``licence_revoked`` (a licence covered it until revoked; ``since`` = the
  latest such revocation), ``licence_expired`` (``since`` = the latest ``valid_until`` passed),
  ``licence_not_yet_valid`` (``since`` = the earliest ``valid_from`` to come), ``unlicensed``
  (never licensed there; ``since`` NULL).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import duckdb

from events.catalog_changes import TERRITORIES
from infra.errors import BackbeatError

#: The read models' names.
CHANGES_TABLE = "track_changes"
LICENCES_TABLE = "licences"
ALBUMS_TABLE = "albums"
CURRENT_VIEW = "tracks_current"
AVAILABILITY_VIEW = "track_availability"

UPDATED, WITHDRAWN = "backbeat.catalog.TrackUpdated", "backbeat.catalog.TrackWithdrawn"
GRANTED, REVOKED = "backbeat.catalog.LicenceGranted", "backbeat.catalog.LicenceRevoked"
#: The fields a ``TrackUpdated`` may set that ``tracks_current`` folds (``explicit`` is new).
EDITABLE = ("name", "artist", "album_id", "genre", "popularity", "duration_ms", "explicit")


def change_rows(event_type: str, event: Mapping[str, Any]) -> Sequence[Mapping[str, Any]]:
    """One ``track_changes`` row of a ``TrackUpdated`` or ``TrackWithdrawn`` (decoded event
    dict; times in ms): ``change`` ``updated`` / ``withdrawn``, the fields of the other type NULL.

    Raises:
        ValueError: another event type.
    """
    if event_type == UPDATED:
        row = {k: event.get(k) for k in ("event_id", "track_id", "occurred_at", "changed_fields", *EDITABLE)}
        return [{**row, "change": "updated"}]
    if event_type == WITHDRAWN:
        keys = ("event_id", "track_id", "occurred_at", "reason", "territories", "licence_id")
        return [{**{k: event.get(k) for k in keys}, "change": "withdrawn"}]
    raise ValueError(f"{event_type} is not a track change")


def licence_rows(event_type: str, event: Mapping[str, Any]) -> Sequence[Mapping[str, Any]]:
    """One ``licences`` row of a ``LicenceGranted`` or ``LicenceRevoked`` (decoded event dict):
    ``change`` ``granted`` / ``revoked``; a revocation's empty ``territories`` means all the
    licence covered, a grant's means worldwide.

    Raises:
        ValueError: another event type.
    """
    common = ("event_id", "licence_id", "track_id", "occurred_at", "society", "territories")
    if event_type == GRANTED:
        keys = (*common, "rights_type", "valid_from", "valid_until", "royalty_share_bp")
        return [{**{k: event.get(k) for k in keys}, "change": "granted"}]
    if event_type == REVOKED:
        return [{**{k: event.get(k) for k in (*common, "reason")}, "change": "revoked"}]
    raise ValueError(f"{event_type} is not a licence event")


def territories_sql(territories: Sequence[str] = TERRITORIES) -> str:
    """``['DE', 'FR', …]``: the territory list as a DuckDB list literal."""
    return "[" + ", ".join(f"'{t}'" for t in territories) + "]"


#: SQL for "now" as a naive UTC ``TIMESTAMP`` (whatever the session's time zone).
NOW_SQL = "make_timestamp(epoch_us(now()))"

#: ``ids``: the track ids to answer for (a ``VARCHAR[]``), NULL for all.
_ONLY = "(ids IS NULL OR list_contains(ids, track_id))"

AVAILABILITY_MACRO = f"""CREATE OR REPLACE MACRO track_availability_of(ts, ids) AS TABLE
WITH terr AS (SELECT unnest({territories_sql()}) AS territory),
grants AS (
    SELECT * FROM {LICENCES_TABLE} WHERE change = 'granted' AND {_ONLY}
    QUALIFY row_number() OVER (PARTITION BY licence_id ORDER BY kafka_partition DESC, kafka_offset DESC) = 1
), cover AS (
    SELECT g.licence_id, g.track_id, t.territory, g.valid_from, g.valid_until
    FROM grants g JOIN terr t ON len(g.territories) = 0 OR list_contains(g.territories, t.territory)
), revoked AS (
    SELECT c.licence_id, c.territory, max(r.occurred_at) AS revoked_at
    FROM cover c JOIN {LICENCES_TABLE} r ON r.change = 'revoked' AND r.licence_id = c.licence_id
     AND (len(r.territories) = 0 OR list_contains(r.territories, c.territory)) AND r.occurred_at <= ts
    GROUP BY ALL
), state AS (
    SELECT c.*, v.revoked_at,
           CASE WHEN v.revoked_at IS NOT NULL THEN 'revoked'
                WHEN c.valid_from > ts THEN 'future'
                WHEN c.valid_until IS NOT NULL AND c.valid_until <= ts THEN 'expired'
                ELSE 'licensed' END AS state
    FROM cover c LEFT JOIN revoked v USING (licence_id, territory)
), lic AS (
    SELECT track_id, territory,
           arg_min(licence_id, (valid_from, licence_id)) FILTER (WHERE state = 'licensed') AS licence_id,
           min(valid_from) FILTER (WHERE state = 'licensed') AS licensed_since,
           max(revoked_at) FILTER (WHERE state = 'revoked') AS revoked_at,
           max(valid_until) FILTER (WHERE state = 'expired') AS expired_at,
           min(valid_from) FILTER (WHERE state = 'future') AS future_from
    FROM state GROUP BY ALL
), wd AS (
    SELECT w.track_id, t.territory, min(w.occurred_at) AS withdrawn_at,
           arg_min(w.reason, (w.occurred_at, w.kafka_partition, w.kafka_offset)) AS withdrawal_reason
    FROM {CHANGES_TABLE} w JOIN terr t ON len(w.territories) = 0 OR list_contains(w.territories, t.territory)
    WHERE w.change = 'withdrawn' AND w.occurred_at <= ts AND (ids IS NULL OR list_contains(ids, w.track_id))
    GROUP BY ALL
)
SELECT k.track_id, t.territory,
       (w.withdrawn_at IS NULL AND l.licence_id IS NOT NULL) AS available,
       l.licence_id,
       CASE WHEN w.withdrawn_at IS NOT NULL THEN 'withdrawn'
            WHEN l.licence_id IS NOT NULL THEN 'licensed'
            WHEN l.revoked_at IS NOT NULL THEN 'licence_revoked'
            WHEN l.expired_at IS NOT NULL THEN 'licence_expired'
            WHEN l.future_from IS NOT NULL THEN 'licence_not_yet_valid'
            ELSE 'unlicensed' END AS reason,
       CASE WHEN w.withdrawn_at IS NOT NULL THEN w.withdrawn_at
            WHEN l.licence_id IS NOT NULL THEN l.licensed_since
            WHEN l.revoked_at IS NOT NULL THEN l.revoked_at
            WHEN l.expired_at IS NOT NULL THEN l.expired_at
            ELSE l.future_from END AS since,
       w.withdrawal_reason
FROM (SELECT DISTINCT track_id FROM tracks WHERE {_ONLY}) k CROSS JOIN terr t
LEFT JOIN lic l USING (track_id, territory)
LEFT JOIN wd w USING (track_id, territory)"""

_LATEST = "ORDER BY occurred_at, kafka_partition, kafka_offset"
_FOLDED = ",\n           ".join(
    f"last({f} {_LATEST}) FILTER (WHERE {f} IS NOT NULL) AS {f}" for f in EDITABLE
)
_REPLACED = ", ".join(f"coalesce(u.{f}, t.{f}) AS {f}" for f in EDITABLE if f != "explicit")

CURRENT_MACRO = f"""CREATE OR REPLACE MACRO tracks_as_of(ts) AS TABLE
WITH upd AS (
    SELECT track_id, count(*) AS edits, max(occurred_at) AS updated_at,
           {_FOLDED}
    FROM {CHANGES_TABLE} WHERE change = 'updated' AND occurred_at <= ts GROUP BY track_id
), wd AS (
    SELECT track_id, bool_or(len(territories) = 0) AS withdrawn_worldwide,
           list_sort(list_distinct(flatten(list(territories)))) AS withdrawn_territories,
           min(occurred_at) AS withdrawn_at
    FROM {CHANGES_TABLE} WHERE change = 'withdrawn' AND occurred_at <= ts GROUP BY track_id
), av AS (
    SELECT track_id, coalesce(list(territory ORDER BY territory) FILTER (WHERE available), []) AS avail,
           count(*) AS territories
    FROM track_availability_at(ts) GROUP BY track_id
)
SELECT t.* REPLACE ({_REPLACED}),
       u.explicit,
       coalesce(u.edits, 0) AS edits,
       u.updated_at,
       coalesce(w.withdrawn_worldwide, false) AS withdrawn_worldwide,
       coalesce(w.withdrawn_territories, []) AS withdrawn_territories,
       w.withdrawn_at,
       a.avail AS available_territories,
       len(a.avail) > 0 AS available,
       CASE WHEN coalesce(w.withdrawn_worldwide, false) THEN 'withdrawn'
            WHEN len(a.avail) = a.territories THEN 'available'
            WHEN len(a.avail) > 0 THEN 'partial'
            ELSE 'unavailable' END AS status
FROM tracks t
LEFT JOIN upd u USING (track_id)
LEFT JOIN wd w USING (track_id)
LEFT JOIN av a USING (track_id)"""

#: The views and macros (created after the ``tracks``, ``track_changes`` and ``licences`` tables).
VIEWS_DDL: tuple[str, ...] = (
    AVAILABILITY_MACRO,
    "CREATE OR REPLACE MACRO track_availability_at(ts) AS TABLE "
    "SELECT * FROM track_availability_of(ts, NULL)",
    f"CREATE OR REPLACE VIEW {AVAILABILITY_VIEW} AS SELECT * FROM track_availability_at({NOW_SQL})",
    CURRENT_MACRO,
    f"CREATE OR REPLACE VIEW {CURRENT_VIEW} AS SELECT * FROM tracks_as_of({NOW_SQL})",
)

#: The territory a list is served for when none is given (``--territory``, ``?territory=``) and
#: the user has no listen with a territory (:func:`user_territory`).
DEFAULT_TERRITORY = "US"


class UnknownTerritoryError(BackbeatError):
    """A territory that availability is not tracked for (not in the fixed list)."""


class AvailabilityUnreadableError(BackbeatError):
    """The ``track_availability`` view exists but a table under it is gone (a reset read model
    not rebuilt yet): availability cannot be checked, so nothing is served unchecked."""


def resolve_territory(territory: str | None) -> str:
    """The territory to filter for: ``territory`` upper-cased, or :data:`DEFAULT_TERRITORY`.

    Raises:
        UnknownTerritoryError: not one of :data:`events.catalog_changes.TERRITORIES` (the message
            lists them).
    """
    chosen = (territory or DEFAULT_TERRITORY).strip().upper()
    if chosen not in TERRITORIES:
        raise UnknownTerritoryError(
            f"territory {territory!r} is not tracked for availability; use one of {', '.join(TERRITORIES)}"
        )
    return chosen


def user_territory(conn: duckdb.DuckDBPyConnection, user_id: str) -> str | None:
    """The territory of ``user_id``'s latest listen that has one (the ``listens`` read model:
    listens derived from player events carry their session's country), or ``None`` (no such
    listen, or no ``listens`` table yet)."""
    try:
        row = conn.execute(
            "SELECT territory FROM listens WHERE user_id = ? AND territory IS NOT NULL "
            "ORDER BY occurred_at DESC LIMIT 1",
            [user_id],
        ).fetchone()
    except duckdb.CatalogException:
        return None
    return str(row[0]) if row else None


def has_availability(conn: duckdb.DuckDBPyConnection) -> bool:
    """Whether the ``track_availability`` view exists (the catalog change read models ran)."""
    found = conn.execute(
        "SELECT count(*) FROM duckdb_views() WHERE NOT internal AND view_name = ?", [AVAILABILITY_VIEW]
    ).fetchall()
    return bool(found[0][0])


def unavailable(conn: duckdb.DuckDBPyConnection, track_ids: Sequence[str], territory: str) -> set[str]:
    """The ``track_ids`` the catalog knows that may not be played in ``territory`` now (a
    ``track_availability`` row with ``available`` false). Tracks the catalog does not know (no
    ``tracks`` row, e.g. 30Music ids of a file import) are not in it: availability is a fact
    about catalog tracks, and the live path speaks catalog ids only. Empty when the view does
    not exist yet (nothing is known to be withdrawn or unlicensed).

    Raises:
        AvailabilityUnreadableError: the view exists but cannot be read (a table under it was
            dropped by a reset: the message says to run the projections again).
    """
    if not track_ids or not has_availability(conn):
        return set()
    try:
        rows = conn.execute(
            f"SELECT track_id FROM track_availability_of({NOW_SQL}, CAST($ids AS VARCHAR[])) "
            "WHERE territory = $territory AND NOT available",
            {"territory": territory, "ids": list(dict.fromkeys(track_ids))},
        ).fetchall()
    except duckdb.CatalogException as exc:
        raise AvailabilityUnreadableError(
            f"track availability cannot be read ({str(exc).splitlines()[0]}); a catalog read model was reset "
            "and not rebuilt: "
            "run 'backbeat project -p tracks -p track_changes -p licences --until-caught-up'"
        ) from exc
    return {r[0] for r in rows}


__all__ = [
    "ALBUMS_TABLE",
    "DEFAULT_TERRITORY",
    "AvailabilityUnreadableError",
    "UnknownTerritoryError",
    "has_availability",
    "resolve_territory",
    "user_territory",
    "unavailable",
    "AVAILABILITY_VIEW",
    "CHANGES_TABLE",
    "CURRENT_VIEW",
    "EDITABLE",
    "LICENCES_TABLE",
    "NOW_SQL",
    "VIEWS_DDL",
    "change_rows",
    "licence_rows",
    "territories_sql",
]
