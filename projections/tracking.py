"""Consumed offsets stored with the read models, tied to the log they were read from.

The table ``projection_offsets`` holds, per ``(projection, topic, partition)``, the next offset
to read and the identity of the log: the broker's cluster id and the topic's id. The runner
writes it in the same DuckDB transaction as the rows (docs/design.md §3), so a redelivered batch is
applied once. Before reading, :func:`check_offsets` compares the stored identity and offsets
with the live log and raises :class:`~infra.errors.OffsetMismatchError` when they cannot belong
to it: the embedded broker restarted empty (new cluster id, every topic gone), a topic was
deleted and recreated (new topic id), or the log is shorter than what was read. Resuming then
would silently skip or double events; the error says how to rebuild instead.

Also here: ``projection_versions`` (which version and topic built each read model),
``projection_rejects`` (records that could not be decoded or mapped), ``projection_builds``
(the blue/green versions of a read model made by :mod:`projections.replay`; once a read model
has been replayed its name is a view over the current version's table, :func:`current_build`
says which), and :func:`reset`.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime

import duckdb
import pyarrow as pa

from events.log import LogIdentity, log_identity
from infra.errors import InfraError, OffsetMismatchError
from infra.settings import Settings
from projections.lake import (
    LAKE_FILES_DDL,
    LAKE_FILES_TABLE,
    LAKE_SWITCHES_DDL,
    LAKE_SWITCHES_TABLE,
    drop_dir,
)
from projections.readmodels import Projection
from projections.store import writer

OFFSETS_TABLE = "projection_offsets"
VERSIONS_TABLE = "projection_versions"
REJECTS_TABLE = "projection_rejects"
BUILDS_TABLE = "projection_builds"

BOOKKEEPING_DDL = (
    f"""CREATE TABLE IF NOT EXISTS {OFFSETS_TABLE} (
  projection VARCHAR NOT NULL, topic VARCHAR NOT NULL, "partition" INTEGER NOT NULL,
  next_offset BIGINT NOT NULL, cluster_id VARCHAR NOT NULL, topic_id VARCHAR NOT NULL,
  updated_at TIMESTAMP NOT NULL, PRIMARY KEY (projection, topic, "partition"))""",
    f"""CREATE TABLE IF NOT EXISTS {VERSIONS_TABLE} (
  projection VARCHAR PRIMARY KEY, version INTEGER NOT NULL, topic VARCHAR NOT NULL,
  created_at TIMESTAMP NOT NULL)""",
    f"""CREATE TABLE IF NOT EXISTS {REJECTS_TABLE} (
  projection VARCHAR NOT NULL, topic VARCHAR NOT NULL, "partition" INTEGER NOT NULL,
  "offset" BIGINT NOT NULL, reason VARCHAR NOT NULL, rejected_at TIMESTAMP NOT NULL)""",
    # one row per version of a replayed read model (projections.replay); offsets are JSON objects
    # {"partition": offset}; state: building | current | old | failed | abandoned
    f"""CREATE TABLE IF NOT EXISTS {BUILDS_TABLE} (
  projection VARCHAR NOT NULL, build INTEGER NOT NULL, version INTEGER NOT NULL,
  table_name VARCHAR NOT NULL, topic VARCHAR NOT NULL, source VARCHAR NOT NULL, state VARCHAR NOT NULL,
  start_offsets VARCHAR NOT NULL, stop_offsets VARCHAR NOT NULL, created_at TIMESTAMP NOT NULL,
  switched_at TIMESTAMP, note VARCHAR, PRIMARY KEY (projection, build))""",
)

REJECTS_SCHEMA = pa.schema(
    [
        ("projection", pa.string()),
        ("topic", pa.string()),
        ("partition", pa.int32()),
        ("offset", pa.int64()),
        ("reason", pa.string()),
        ("rejected_at", pa.timestamp("ms")),
    ]
)

_OFFSETS_SCHEMA = pa.schema(
    [
        ("projection", pa.string()),
        ("topic", pa.string()),
        ("partition", pa.int32()),
        ("next_offset", pa.int64()),
        ("cluster_id", pa.string()),
        ("topic_id", pa.string()),
        ("updated_at", pa.timestamp("ms")),
    ]
)


@dataclass(frozen=True)
class StoredOffset:
    """One row of ``projection_offsets``: the next offset to read and the log it belongs to."""

    projection: str
    topic: str
    partition: int
    next_offset: int
    cluster_id: str
    topic_id: str


def now_utc() -> datetime:
    """The current time as a naive UTC datetime (DuckDB ``TIMESTAMP`` convention here)."""
    return datetime.now(UTC).replace(tzinfo=None)


def check_topics_exist(stored: Iterable[StoredOffset], identity: LogIdentity, topics: Iterable[str]) -> None:
    """Every topic of ``topics`` must exist on the broker.

    Raises:
        OffsetMismatchError: a topic that offsets were stored for is gone (broker restarted
            empty, or the topic was deleted).
        InfraError: a topic that was never read does not exist (create it first).
    """
    read_before = {s.topic: s.projection for s in stored}
    for topic in sorted(set(topics)):
        if topic in identity.topic_ids:
            continue
        if topic in read_before:
            raise OffsetMismatchError(
                f"topic {topic} no longer exists on cluster {identity.cluster_id}, but read model "
                f"{read_before[topic]!r} was built from it: the topic was deleted or the embedded "
                f"broker restarted empty. {_fix(read_before[topic])}"
            )
        raise InfraError(
            f"topic {topic} does not exist; create it with 'backbeat topics apply' (and import data) first"
        )


def _fix(projection: str) -> str:
    return (
        f"The read model {projection!r} holds events this log does not have, so resuming would skip "
        "or double events. Either point BACKBEAT_BOOTSTRAP_SERVERS back at the broker it was read "
        "from, or rebuild it: re-import the data into the new broker ('backbeat import …') and run "
        f"'backbeat projections reset {projection}' (or delete the DuckDB file and the lake "
        "directory) before running the projections again."
    )


def ensure_tables(conn: duckdb.DuckDBPyConnection, projection: Projection) -> None:
    """Create the bookkeeping tables and ``projection``'s table if missing, and record which
    version and topic build it.

    Raises:
        OffsetMismatchError: the table was built by another version of the projection or from
            another topic (its rows and offsets do not fit this code or this topic).
    """
    for ddl in (*BOOKKEEPING_DDL, LAKE_FILES_DDL):
        conn.execute(ddl)
    conn.execute(projection.ddl)
    rows = conn.execute(
        f"SELECT version, topic FROM {VERSIONS_TABLE} WHERE projection = ?", [projection.name]
    ).fetchall()  # fetch to the end: DuckDB 2 refuses new work while a result is unfinished
    row = rows[0] if rows else None
    if row is None:
        conn.execute(
            f"INSERT INTO {VERSIONS_TABLE} VALUES (?, ?, ?, ?)",
            [projection.name, projection.version, projection.topic, now_utc()],
        )
        return
    version, topic = int(row[0]), str(row[1])
    if version != projection.version or topic != projection.topic:
        raise OffsetMismatchError(
            f"read model {projection.name!r} was built by version {version} from topic {topic}, "
            f"but this runner builds version {projection.version} from {projection.topic}; "
            f"rebuild it: 'backbeat projections reset {projection.name}' then run the projections"
        )


def current_build(conn: duckdb.DuckDBPyConnection, name: str) -> tuple[str, int] | None:
    """``(physical table, version)`` of read model ``name`` when a replay made its name a view
    over a versioned table (:mod:`projections.replay`), else ``None`` (the table is ``name``)."""
    exists = conn.execute(
        "SELECT count(*) FROM duckdb_tables() WHERE table_name = ?", [BUILDS_TABLE]
    ).fetchall()[0][0]
    if not exists:
        return None
    rows = conn.execute(
        f"SELECT table_name, version FROM {BUILDS_TABLE} WHERE projection = ? AND state = 'current'", [name]
    ).fetchall()
    return (str(rows[0][0]), int(rows[0][1])) if rows else None


def load_offsets(
    conn: duckdb.DuckDBPyConnection, names: Iterable[str]
) -> dict[tuple[str, str, int], StoredOffset]:
    """Stored offsets of the projections ``names``, keyed by ``(projection, topic, partition)``."""
    wanted = sorted(set(names))
    if not wanted:
        return {}
    rows = conn.execute(
        f'SELECT projection, topic, "partition", next_offset, cluster_id, topic_id '
        f"FROM {OFFSETS_TABLE} WHERE list_contains(?, projection)",
        [wanted],
    ).fetchall()
    return {(r[0], r[1], int(r[2])): StoredOffset(r[0], r[1], int(r[2]), int(r[3]), r[4], r[5]) for r in rows}


def save_offsets(
    conn: duckdb.DuckDBPyConnection,
    next_offsets: Mapping[tuple[str, str, int], int],
    identity: LogIdentity,
) -> None:
    """Upsert ``{(projection, topic, partition): next offset}`` with the log ``identity``
    (inside the caller's transaction, from one Arrow table)."""
    if not next_offsets:
        return
    keys = sorted(next_offsets)
    stamp = now_utc()
    table = pa.Table.from_pylist(
        [
            {
                "projection": proj,
                "topic": topic,
                "partition": part,
                "next_offset": next_offsets[(proj, topic, part)],
                "cluster_id": identity.cluster_id,
                "topic_id": identity.topic_ids.get(topic, ""),
                "updated_at": stamp,
            }
            for proj, topic, part in keys
        ],
        schema=_OFFSETS_SCHEMA,
    )
    conn.register("bb_offsets_batch", table)
    try:
        conn.execute(f"INSERT OR REPLACE INTO {OFFSETS_TABLE} SELECT * FROM bb_offsets_batch")
    finally:
        conn.unregister("bb_offsets_batch")


def check_offsets(
    stored: Iterable[StoredOffset],
    identity: LogIdentity,
    high_watermarks: Mapping[str, Mapping[int, int]],
    bootstrap: str = "the broker",
    *,
    cluster_only: bool = False,
) -> None:
    """Verify that stored offsets belong to the live log (pure). ``cluster_only``: check the
    cluster id alone (before topics are looked at: after a restart they are all gone).

    ``high_watermarks`` is ``{topic: {partition: high watermark}}`` from Fetch responses
    (:func:`events.offsets.high_watermarks`; ListOffsets is wrong on Tansu).

    Raises:
        OffsetMismatchError: another cluster id (broker restarted empty / other cluster),
            another topic id (topic recreated), a partition that no longer exists, or a stored
            offset beyond the partition's high watermark (the log is shorter than what was read).
    """
    rows = sorted(stored, key=lambda s: (s.projection, s.topic, s.partition))
    for s in rows:  # the cluster first: after a broker restart every other check is moot
        if s.cluster_id != identity.cluster_id:
            raise OffsetMismatchError(
                f"stored offsets of {s.projection!r} ({s.topic}[{s.partition}] at {s.next_offset}) "
                f"were read from cluster {s.cluster_id}, but {bootstrap} is cluster "
                f"{identity.cluster_id}: the embedded broker was restarted empty (it keeps topics in "
                f"memory) or this is another cluster. {_fix(s.projection)}"
            )
    if cluster_only:
        return
    for s in rows:
        fix = _fix(s.projection)
        where = f"{s.topic}[{s.partition}]"
        live_id = identity.topic_ids.get(s.topic)
        if s.topic_id and live_id and s.topic_id != live_id:
            raise OffsetMismatchError(
                f"stored offsets of {s.projection!r} were read from topic {s.topic} with id "
                f"{s.topic_id}, but the topic now has id {live_id}: it was deleted and recreated. "
                f"{fix}"
            )
        marks = high_watermarks.get(s.topic, {})
        if s.partition not in marks:
            raise OffsetMismatchError(
                f"stored offsets of {s.projection!r} name partition {where}, which does not exist "
                f"on {bootstrap}. {fix}"
            )
        if s.next_offset > marks[s.partition]:
            raise OffsetMismatchError(
                f"stored offset {s.next_offset} of {s.projection!r} for {where} is beyond the "
                f"partition's end ({marks[s.partition]}): the log is shorter than what was read. {fix}"
            )


def rebind(
    settings: Settings,
    topics: Iterable[str],
    *,
    previous: Mapping[str, Collection[tuple[str, str]]] | None = None,
    timeout_s: float = 120.0,
) -> int:
    """Move the stored offsets of ``topics`` to the live log after an archive restore
    (:func:`projections.restore.restore`). Returns the number of ``projection_offsets`` rows
    updated (0 when there is no read-model database).

    The rule: a stored offset belongs to a log identity (cluster id, topic id), and a restored
    log has a new one, so :func:`check_offsets` would refuse it. Rebinding is safe **only because
    the restore reproduced the same records at the same offsets** (it verified every partition's
    high watermark against the archive): "offset N of partition P" then names the same record in
    both logs. So a row is rebound only when its partition exists on the live log, its
    ``next_offset`` is at most the partition's high watermark (from a Fetch), and — when
    ``previous`` (``{topic: {(cluster_id, topic_id)}}``, the identities the archive was taken from)
    is given — its stored identity is one of them. Other rows are left as they are, so the runner
    still refuses them with :class:`OffsetMismatchError`.

    Raises:
        InfraError: the broker does not answer.
        DatabaseBusyError: the database stayed locked for ``timeout_s`` seconds.
    """
    from events.offsets import high_watermarks

    names = sorted(set(topics))
    if not names or not settings.duckdb_path.exists():
        return 0
    identity = log_identity(settings, names)
    marks = {t: high_watermarks(settings, t) for t in names if t in identity.topic_ids}
    updated = 0
    with writer(settings.duckdb_path, timeout_s) as conn:
        conn.begin()
        conn.execute(BOOKKEEPING_DDL[0])
        rows = conn.execute(
            f'SELECT projection, topic, "partition", next_offset, cluster_id, topic_id FROM {OFFSETS_TABLE} '
            "WHERE list_contains(?, topic)",
            [names],
        ).fetchall()
        for proj, topic, part, next_offset, cluster, topic_id in rows:
            live_id = identity.topic_ids.get(topic)
            if live_id is None or int(part) not in marks.get(topic, {}):
                continue
            if next_offset > marks[topic][int(part)] or (cluster, topic_id) == (identity.cluster_id, live_id):
                continue
            if previous is not None and (cluster, topic_id) not in previous.get(topic, ()):
                continue
            conn.execute(
                f"UPDATE {OFFSETS_TABLE} SET cluster_id = ?, topic_id = ?, updated_at = ? "
                'WHERE projection = ? AND topic = ? AND "partition" = ?',
                [identity.cluster_id, live_id, now_utc(), proj, topic, part],
            )
            updated += 1
        conn.commit()
    return updated


def _drop_companions(conn: duckdb.DuckDBPyConnection, name: str) -> None:
    """Drop the views and table macros named ``<name>_…`` (a projection's ``extra_ddl``,
    recreated by the runner with the table)."""
    prefix = name.replace("_", "\\_") + "\\_%"
    views = conn.execute(
        "SELECT view_name FROM duckdb_views() WHERE NOT internal AND view_name LIKE ? ESCAPE '\\'", [prefix]
    ).fetchall()
    for (view,) in views:
        conn.execute(f'DROP VIEW IF EXISTS "{view}"')
    macros = conn.execute(
        "SELECT DISTINCT function_name FROM duckdb_functions() WHERE function_type = 'table_macro' "
        "AND NOT internal AND function_name LIKE ? ESCAPE '\\'",
        [prefix],
    ).fetchall()
    for (macro,) in macros:
        conn.execute(f'DROP MACRO TABLE IF EXISTS "{macro}"')


def _retired_versions(conn: duckdb.DuckDBPyConnection, name: str) -> list[str]:
    """Tables ``<table>__v<version>_b<build>`` kept by replays of read model ``name``: of its own
    table, and for the stateful recommendations read model of each of its state tables."""
    from projections.recommendations import NAME as RECOMMENDATIONS  # noqa: PLC0415
    from projections.recommendations import STATE_TABLES

    owned = set(STATE_TABLES) if name == RECOMMENDATIONS else {name}
    pattern = re.compile(r"^(?P<table>.+)__v\d+_b\d+$")
    rows = conn.execute("SELECT table_name FROM duckdb_tables() WHERE NOT internal").fetchall()
    return [t for (t,) in rows if (m := pattern.match(t)) and m["table"] in owned]


def relation_kind(conn: duckdb.DuckDBPyConnection, name: str) -> str | None:
    """What ``name`` is in the DuckDB file: ``"table"``, ``"view"`` (a replayed read model's name,
    or a companion view) or ``None``."""
    if conn.execute("SELECT count(*) FROM duckdb_tables() WHERE table_name = ?", [name]).fetchall()[0][0]:
        return "table"
    if conn.execute(
        "SELECT count(*) FROM duckdb_views() WHERE NOT internal AND view_name = ?", [name]
    ).fetchall()[0][0]:
        return "view"
    return None


def switch_to_build(
    conn: duckdb.DuckDBPyConnection,
    name: str,
    table: str,
    build: int,
    *,
    retired_version: int,
    topic: str,
    source: str,
    retired_stop: str,
    stop: str | None = None,
) -> None:
    """Make build ``build`` (table ``table``) the current version of read model ``name``, inside the
    caller's transaction: the first time, the live table is renamed ``<name>__v<retired_version>_b0``
    and recorded as build 0 (``old``; ``topic``/``source`` say where it was read from,
    ``retired_stop`` its end as JSON); then ``name`` becomes ``CREATE OR REPLACE VIEW name AS SELECT *
    FROM table``, the previous current build ``old`` and this one ``current`` (its ``stop_offsets``
    set to ``stop`` when given). The one switch of every blue/green replay (Kafka read models,
    :mod:`projections.replay`; saga read models, :mod:`sagas.replay`).

    Raises:
        duckdb.Error: a statement failed (the caller's transaction rolls back).
    """
    stamp = now_utc()
    if current_build(conn, name) is None:
        kind = relation_kind(conn, name)
        if kind == "table":  # first replay: the live table joins the versioned scheme as build 0
            old = f"{name}__v{retired_version}_b0"
            conn.execute(f'DROP TABLE IF EXISTS "{old}"')
            conn.execute(f'ALTER TABLE "{name}" RENAME TO "{old}"')
            conn.execute(
                f"INSERT OR REPLACE INTO {BUILDS_TABLE} VALUES (?, 0, ?, ?, ?, ?, 'old', '{{}}', ?, ?, ?, ?)",
                [name, retired_version, old, topic, source, retired_stop, stamp, stamp,
                 "the live table before the first replay"],
            )  # fmt: skip
        elif kind == "view":
            conn.execute(f'DROP VIEW "{name}"')
    else:
        conn.execute(
            f"UPDATE {BUILDS_TABLE} SET state = 'old' WHERE projection = ? AND state = 'current'", [name]
        )
    conn.execute(f'CREATE OR REPLACE VIEW "{name}" AS SELECT * FROM "{table}"')
    conn.execute(
        f"UPDATE {BUILDS_TABLE} SET state = 'current', switched_at = ?, "
        "stop_offsets = coalesce(?, stop_offsets) WHERE projection = ? AND build = ?",
        [stamp, stop, name, build],
    )


def reset(settings: Settings, names: Iterable[str], timeout_s: float = 120.0) -> list[str]:
    """Drop the read models ``names``: their tables (with their ``<name>_…`` views and table
    macros; for a replayed read model the view ``name`` and every version's table, with their
    builds' offsets and rejects), stored offsets, versions, rejects, lake file records and lake
    directories (every version's, and the link a replay made), so the next run rebuilds them
    from offset 0.
    Returns the names reset. Other projections are untouched.

    Raises:
        DatabaseBusyError: the database stayed locked for ``timeout_s`` seconds.
    """
    done: list[str] = []
    dirs: dict[str, list[str]] = {}
    wanted = list(dict.fromkeys(names))
    with writer(settings.duckdb_path, timeout_s) as conn:
        conn.begin()
        for ddl in (*BOOKKEEPING_DDL, LAKE_FILES_DDL):
            conn.execute(ddl)
        for name in wanted:
            _drop_companions(conn, name)
            builds = [
                str(r[0])
                for r in conn.execute(
                    f"SELECT table_name FROM {BUILDS_TABLE} WHERE projection = ?", [name]
                ).fetchall()
            ]
            views = relation_kind(conn, name) == "view"
            conn.execute(f'DROP {"VIEW" if views else "TABLE"} IF EXISTS "{name}"')
            for build in builds:
                conn.execute(f'DROP TABLE IF EXISTS "{build}"')
                for table in (OFFSETS_TABLE, REJECTS_TABLE, LAKE_FILES_TABLE):
                    conn.execute(f"DELETE FROM {table} WHERE projection = ?", [build])
            retired = _retired_versions(conn, name)
            for table in retired:
                conn.execute(f'DROP TABLE IF EXISTS "{table}"')
                conn.execute(f"DELETE FROM {LAKE_FILES_TABLE} WHERE projection = ?", [table])
            conn.execute(f"DELETE FROM {BUILDS_TABLE} WHERE projection = ?", [name])
            for table in (OFFSETS_TABLE, VERSIONS_TABLE, REJECTS_TABLE, LAKE_FILES_TABLE):
                conn.execute(f"DELETE FROM {table} WHERE projection = ?", [name])
            conn.execute(LAKE_SWITCHES_DDL)
            conn.execute(f"DELETE FROM {LAKE_SWITCHES_TABLE} WHERE projection = ?", [name])
            dirs[name] = [name, *builds, *retired]
            done.append(name)
        conn.commit()
    for name in done:
        for directory in dirs[name]:  # the lake: a directory, or a link to a version's directory
            drop_dir(settings.lake_dir, directory)
    return done


__all__ = [
    "BOOKKEEPING_DDL",
    "BUILDS_TABLE",
    "OFFSETS_TABLE",
    "REJECTS_SCHEMA",
    "REJECTS_TABLE",
    "VERSIONS_TABLE",
    "LogIdentity",
    "StoredOffset",
    "check_offsets",
    "check_topics_exist",
    "current_build",
    "ensure_tables",
    "load_offsets",
    "log_identity",
    "now_utc",
    "rebind",
    "relation_kind",
    "reset",
    "switch_to_build",
    "save_offsets",
]
