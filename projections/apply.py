"""One batch, one DuckDB transaction: rows, rejects, lake files and consumed offsets together.

Failure semantics (what a crash at each step leaves behind):

1. The Parquet files of the batch are written, then the transaction commits. A crash before the
   commit leaves files that ``lake_files`` does not list: orphans, deleted at the next start
   (:func:`projections.lake.remove_orphans`); the batch is redelivered and written again.
2. Inside the transaction the stored offsets are read first and every record below them is
   dropped (``redelivered``): a batch delivered twice is applied once, whoever delivered it.
3. ``first``-policy read models insert only keys not present yet (and the first of a key within
   the batch); ``last``-policy ones replace the rows of the batch's keys with the latest event.
   A key may be several columns (:attr:`Projection.key_columns`).
4. A read model that a replay switched to a new version (:mod:`projections.replay`) is written
   into that version's table (:func:`projections.tracking.current_build`, looked up in the
   transaction, so a running runner follows a switch at its next batch); a runner whose
   projection version differs from the switched-to one stops with ``OffsetMismatchError``.
5. ``append=True`` (a replay's build, :mod:`projections.replay`) skips step 3: every fresh row is
   inserted as it is, a plain append that touches no existing row, and the caller applies the
   policy to the whole table once at the end (:func:`dedupe`).
6. The new offsets (the offset after each partition's last record, control records and rejects
   included) are upserted with the log identity, and the transaction commits. A crash after the
   commit loses nothing: the next run starts after the batch.

Rejected records re-applied once their cause is gone (:func:`apply_late`,
:mod:`projections.rejects`) lie below the stored offsets, so they take another path: no
redelivery filter and no offsets; ``first``-policy read models insert a key only where it is
absent, ``last``-policy ones replace a key's row only with a later record (higher partition and
offset), so a late record never undoes a newer one; their rows go to the lake like any others,
and their ``projection_rejects`` rows are deleted in the same transaction.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa

from infra.errors import OffsetMismatchError
from projections import lake
from projections.decoding import Prepared, Reject
from projections.readmodels import OFFSET_COL, PARTITION_COL, Projection
from projections.tracking import (
    REJECTS_SCHEMA,
    REJECTS_TABLE,
    LogIdentity,
    current_build,
    load_offsets,
    now_utc,
    save_offsets,
)


@dataclass
class Applied:
    """What one batch transaction did: rows ``applied`` per projection (inserted or replaced),
    ``duplicates`` (events whose key was already applied or superseded in the batch),
    ``redelivered`` (records below the stored offsets), ``rejects`` stored, ``lake_files``."""

    applied: dict[str, int] = field(default_factory=dict)
    duplicates: int = 0
    redelivered: int = 0
    rejects: int = 0
    lake_files: int = 0


def _fresh(table: pa.Table, thresholds: Mapping[int, int]) -> pa.Table:
    """Rows at or above their partition's stored next offset."""
    if not thresholds or table.num_rows == 0:
        return table
    parts = table[PARTITION_COL].to_numpy()
    offs = table[OFFSET_COL].to_numpy()
    lut = np.zeros(max(int(parts.max()), max(thresholds)) + 1, dtype=np.int64)
    for part, next_offset in thresholds.items():
        lut[part] = next_offset
    mask = offs >= lut[parts]
    return table if bool(mask.all()) else table.filter(pa.array(mask))


def _upsert(conn: duckdb.DuckDBPyConnection, proj: Projection, rows: pa.Table) -> pa.Table:
    """Apply ``rows`` to ``proj``'s table by its policy; returns the rows written."""
    name, keys = proj.name, proj.key_columns
    match = " AND ".join(f't."{k}" = b."{k}"' for k in keys)
    conn.register("bb_batch", rows)
    try:
        if proj.policy == "first":
            by = ", ".join(f'b."{k}"' for k in keys)
            new = conn.sql(
                f'SELECT b.* FROM bb_batch b ANTI JOIN "{name}" t ON {match} '
                f"QUALIFY row_number() OVER (PARTITION BY {by} "
                f'ORDER BY b."{PARTITION_COL}", b."{OFFSET_COL}") = 1'
            ).to_arrow_table()
        else:
            by = ", ".join(f'"{k}"' for k in keys)
            new = conn.sql(
                f"SELECT * FROM bb_batch QUALIFY row_number() OVER (PARTITION BY {by} "
                f'ORDER BY "{PARTITION_COL}" DESC, "{OFFSET_COL}" DESC) = 1'
            ).to_arrow_table()
        if new.num_rows:
            conn.register("bb_new", new)
            try:
                if proj.policy == "last":
                    if len(keys) == 1:
                        key = keys[0]
                        conn.execute(f'DELETE FROM "{name}" WHERE "{key}" IN (SELECT "{key}" FROM bb_new)')
                    else:
                        conn.execute(
                            f'DELETE FROM "{name}" t WHERE EXISTS (SELECT 1 FROM bb_new b WHERE {match})'
                        )
                conn.execute(f'INSERT INTO "{name}" SELECT * FROM bb_new')
            finally:
                conn.unregister("bb_new")
        return new
    finally:
        conn.unregister("bb_batch")


def _append(conn: duckdb.DuckDBPyConnection, proj: Projection, rows: pa.Table) -> pa.Table:
    """Insert every row of ``rows`` into ``proj``'s table (no policy: :func:`dedupe` applies it later)."""
    conn.register("bb_batch", rows)
    try:
        conn.execute(f'INSERT INTO "{proj.name}" SELECT * FROM bb_batch')
    finally:
        conn.unregister("bb_batch")
    return rows


@dataclass(frozen=True)
class Deduped:
    """What :func:`dedupe` found: ``rows`` before it and ``row_checksum`` (``sum(hash(every
    column))`` over them), ``keys`` (distinct keys) and ``checksum`` (``sum(hash(key columns))``
    over the distinct keys), ``deleted`` (rows removed: ``rows - keys`` when it worked) and
    ``deleted_checksum`` (``sum(hash(every column))`` over the removed rows, so a tally of the
    rows written can be kept in step). Hashes are DuckDB's ``hash`` (64-bit), summed as HUGEINT."""

    rows: int
    row_checksum: int
    keys: int
    checksum: int
    deleted: int
    deleted_checksum: int


def row_checksum(conn: duckdb.DuckDBPyConnection, relation: str, table: str) -> tuple[int, int]:
    """``(rows, sum(hash(every column)))`` of ``relation`` (a table, or rows registered with
    ``conn.register``) read as table ``table``'s columns: its names, order and types (an Arrow
    ``timestamp[ms]`` hashes as a ``TIMESTAMP``, as it is stored). The figures :func:`dedupe`
    gives of ``table`` before it deletes anything."""
    every = _row_hash(conn, table)
    got = conn.execute(f'SELECT count(*), coalesce(sum({every}), 0) FROM "{relation}"').fetchall()[0]
    return int(got[0]), int(got[1])


def _row_hash(conn: duckdb.DuckDBPyConnection, table: str, alias: str = "") -> str:
    """``hash(CAST(<alias>.c AS type), …)`` over ``table``'s columns, in order."""
    cols = conn.execute(
        "SELECT column_name, data_type FROM information_schema.columns WHERE table_name = ? "
        "ORDER BY ordinal_position",
        [table],
    ).fetchall()
    prefix = f"{alias}." if alias else ""
    return "hash(" + ", ".join(f'CAST({prefix}"{c}" AS {t})' for c, t in cols) + ")"


def dedupe(conn: duckdb.DuckDBPyConnection, proj: Projection) -> Deduped:
    """Apply ``proj``'s policy to its whole table at once: of the rows sharing a key, keep the
    first (``first``: lowest ``(kafka_partition, kafka_offset)``) or the last (``last``: highest)
    and delete the others. The same rule as step 3 of the module docstring within one batch;
    across batches the live runner keeps the first or last *written*, which is the same row for
    keys that stay on one partition (keyed topics).

    Set-based, so DuckDB may spill to its temporary directory under ``memory_limit``: a
    ``GROUP BY`` of the key columns finds the repeated keys (usually few), and only their rows are
    ranked. Idempotent (a second run deletes nothing). Runs in the caller's transaction, if any.

    Raises:
        duckdb.Error: the table is missing or the statement failed.
    """
    name, keys = proj.name, proj.key_columns
    cols = ", ".join(f'"{k}"' for k in keys)
    match = " AND ".join(f't."{k}" = d."{k}"' for k in keys)
    by = ", ".join(f't."{k}"' for k in keys)
    every = _row_hash(conn, name)
    rows, row_sum, n_keys, checksum = conn.execute(
        f"SELECT coalesce(sum(n), 0), coalesce(sum(r), 0), count(*), coalesce(sum(h), 0) FROM "
        f'(SELECT count(*) AS n, sum({every}) AS r, hash({cols}) AS h FROM "{name}" GROUP BY {cols})'
    ).fetchall()[0]
    deleted, deleted_sum = 0, 0
    if rows > n_keys:
        order = "ASC" if proj.policy == "first" else "DESC"
        conn.execute(
            f"CREATE OR REPLACE TEMP TABLE bb_dedupe AS SELECT t.rowid AS rid, {_row_hash(conn, name, 't')} "
            f'AS h FROM "{name}" t SEMI JOIN '
            f'(SELECT {cols} FROM "{name}" GROUP BY {cols} HAVING count(*) > 1) d ON {match} '
            f"QUALIFY row_number() OVER (PARTITION BY {by} "
            f'ORDER BY t."{PARTITION_COL}" {order}, t."{OFFSET_COL}" {order}) > 1'
        )
        found = conn.execute("SELECT count(*), coalesce(sum(h), 0) FROM bb_dedupe").fetchall()[0]
        deleted, deleted_sum = found
        conn.execute(f'DELETE FROM "{name}" WHERE rowid IN (SELECT rid FROM bb_dedupe)')
        conn.execute("DROP TABLE bb_dedupe")
    return Deduped(int(rows), int(row_sum), int(n_keys), int(checksum), int(deleted), int(deleted_sum))


def _store_rejects(
    conn: duckdb.DuckDBPyConnection, rejects: list[Reject], thresholds: Mapping[tuple[str, str, int], int]
) -> int:
    fresh = [r for r in rejects if r.offset >= thresholds.get((r.projection, r.topic, r.partition), 0)]
    if not fresh:
        return 0
    stamp = now_utc()
    table = pa.table(
        [
            pa.array([r.projection for r in fresh], pa.string()),
            pa.array([r.topic for r in fresh], pa.string()),
            pa.array([r.partition for r in fresh], pa.int32()),
            pa.array([r.offset for r in fresh], pa.int64()),
            pa.array([r.reason for r in fresh], pa.string()),
            pa.array([stamp] * len(fresh), pa.timestamp("ms")),
        ],
        schema=REJECTS_SCHEMA,
    )
    conn.register("bb_rejects", table)
    try:
        conn.execute(
            f"INSERT INTO {REJECTS_TABLE} SELECT n.* FROM bb_rejects n ANTI JOIN {REJECTS_TABLE} o "
            'ON o.projection = n.projection AND o.topic = n.topic AND o."partition" = n."partition" '
            'AND o."offset" = n."offset"'
        )
    finally:
        conn.unregister("bb_rejects")
    return len(fresh)


@contextmanager
def _transaction(conn: duckdb.DuckDBPyConnection, lake_dir: Path) -> Iterator[list[tuple[str, int]]]:
    """One DuckDB transaction around a batch; yields the list of lake files the batch writes.
    Commits at the end; on any error rolls back and deletes those files (step 1)."""
    written: list[tuple[str, int]] = []
    conn.begin()
    try:
        yield written
        conn.commit()
    except BaseException:
        lake.delete_files(lake_dir, written)
        try:
            conn.rollback()
        except duckdb.Error:
            pass  # the connection is broken: nothing was committed either way
        raise


def _to_lake(
    conn: duckdb.DuckDBPyConnection,
    lake_dir: Path,
    proj: Projection,
    rows: pa.Table,
    written: list[tuple[str, int]],
) -> int:
    """Write ``rows`` of lake projection ``proj`` as one lake batch (files recorded in the
    transaction, added to ``written``); returns the number of files."""
    batch = lake.next_batch(conn, proj.name)
    files = lake.write_files(lake_dir, proj, rows, batch)
    written += files
    lake.record_files(conn, proj.name, batch, files, now_utc())
    return len(files)


def _upsert_late(conn: duckdb.DuckDBPyConnection, proj: Projection, rows: pa.Table) -> pa.Table:
    """Apply late ``rows`` (below the stored offsets) by ``proj``'s policy without undoing newer
    rows (module docstring); returns the rows written."""
    if proj.policy == "first":
        return _upsert(conn, proj, rows)
    name, keys = proj.name, proj.key_columns
    match = " AND ".join(f't."{k}" = b."{k}"' for k in keys)
    by = ", ".join(f'"{k}"' for k in keys)
    conn.register("bb_batch", rows)
    try:
        new = conn.sql(
            f"SELECT b.* FROM (SELECT * FROM bb_batch QUALIFY row_number() OVER (PARTITION BY {by} "
            f'ORDER BY "{PARTITION_COL}" DESC, "{OFFSET_COL}" DESC) = 1) b '
            f'WHERE NOT EXISTS (SELECT 1 FROM "{name}" t WHERE {match} AND '
            f'(t."{PARTITION_COL}" > b."{PARTITION_COL}" OR (t."{PARTITION_COL}" = b."{PARTITION_COL}" '
            f'AND t."{OFFSET_COL}" >= b."{OFFSET_COL}")))'
        ).to_arrow_table()
    finally:
        conn.unregister("bb_batch")
    if new.num_rows:
        conn.register("bb_new", new)
        try:
            conn.execute(f'DELETE FROM "{name}" t WHERE EXISTS (SELECT 1 FROM bb_new b WHERE {match})')
            conn.execute(f'INSERT INTO "{name}" SELECT * FROM bb_new')
        finally:
            conn.unregister("bb_new")
    return new


@dataclass
class AppliedLate:
    """What :func:`apply_late` did: rows ``applied`` (inserted or replaced), ``superseded``
    (mapped but a key's row stayed: already there, or newer), ``lake_files`` written, and the
    reject rows ``cleared`` (gone from ``projection_rejects``) and ``kept`` (still rejected,
    reason updated)."""

    applied: int = 0
    superseded: int = 0
    lake_files: int = 0
    cleared: int = 0
    kept: int = 0


def _settle_rejects(
    conn: duckdb.DuckDBPyConnection,
    name: str,
    records: Sequence[tuple[str, int, int]],
    again: Mapping[tuple[str, int, int], str],
) -> tuple[int, int]:
    """In ``projection_rejects`` of ``name``: update the reason of ``again``'s records, delete the
    other ``records``' rows (set-based). Returns ``(kept, cleared)``."""
    late = pa.table(
        {
            "topic": pa.array([r[0] for r in records], pa.string()),
            "partition": pa.array([r[1] for r in records], pa.int32()),
            "offset": pa.array([r[2] for r in records], pa.int64()),
            "kept": pa.array([r in again for r in records], pa.bool_()),
            "reason": pa.array([again.get(tuple(r)) for r in records], pa.string()),  # type: ignore[arg-type]
        }
    )
    match = 'l.topic = r.topic AND l."partition" = r."partition" AND l."offset" = r."offset"'
    conn.register("bb_late", late)
    try:
        conn.execute(
            f"DELETE FROM {REJECTS_TABLE} r WHERE r.projection = ? AND EXISTS "
            f"(SELECT 1 FROM bb_late l WHERE {match} AND NOT l.kept)",
            [name],
        )
        conn.execute(
            f"UPDATE {REJECTS_TABLE} r SET reason = l.reason, rejected_at = ? FROM bb_late l "
            f"WHERE r.projection = ? AND {match} AND l.kept",
            [now_utc(), name],
        )
    finally:
        conn.unregister("bb_late")
    kept = sum(1 for r in records if r in again)
    return kept, len(records) - kept


def apply_late(
    conn: duckdb.DuckDBPyConnection,
    lake_dir: Path,
    proj: Projection,
    prepared: Prepared,
    records: Sequence[tuple[str, int, int]],
) -> AppliedLate:
    """Re-apply ``records`` (``(topic, partition, offset)`` of ``proj``'s rejects, decoded again
    into ``prepared``) in one transaction: the mapped rows by :func:`_upsert_late`, lake files
    for a lake projection, and in ``projection_rejects`` the rows of ``records`` deleted except
    those ``prepared`` rejects again (their reason and time updated).

    Raises:
        OffsetMismatchError: a replay switched the read model to another version.
        duckdb.Error, OSError: the write failed; nothing is kept.
    """
    result = AppliedLate()
    again = {(r.topic, r.partition, r.offset): r.reason for r in prepared.rejects}
    with _transaction(conn, lake_dir) as written:
        table = prepared.tables.get(proj.name)
        if table is not None and table.num_rows:
            new = _upsert_late(conn, _physical(conn, proj), table)
            result.applied = new.num_rows
            result.superseded = table.num_rows - new.num_rows
            if proj.lake and new.num_rows:
                result.lake_files = _to_lake(conn, lake_dir, proj, new, written)
        result.kept, result.cleared = _settle_rejects(conn, proj.name, records, again)
    return result


def _physical(conn: duckdb.DuckDBPyConnection, proj: Projection) -> Projection:
    """``proj`` naming the table its rows go to: the current version's table of a replayed read
    model, else its own name.

    Raises:
        OffsetMismatchError: a replay switched the read model to another version than ``proj``'s.
    """
    found = current_build(conn, proj.name)
    if found is None:
        return proj
    table, version = found
    if version != proj.version:
        raise OffsetMismatchError(
            f"read model {proj.name!r} was switched to version {version} by 'backbeat replay', but "
            f"this runner maps version {proj.version}; restart the projections with the code of version "
            f"{version}"
        )
    return replace(proj, name=table)


def apply_batch(
    conn: duckdb.DuckDBPyConnection,
    lake_dir: Path,
    by_topic: Mapping[str, Projection],
    prepared: Prepared,
    identity: LogIdentity,
    *,
    append: bool = False,
    on_written: Callable[[duckdb.DuckDBPyConnection, str, pa.Table], None] | None = None,
    before_commit: Callable[[duckdb.DuckDBPyConnection], None] | None = None,
) -> Applied:
    """Write ``prepared`` in one transaction on ``conn`` (module docstring), lake files of
    lake projections under ``lake_dir``; ``append``: insert every row, no policy (step 5);
    ``on_written(conn, table, rows)``: called in the transaction after each table's rows are
    written, with the rows written; ``before_commit(conn)``: called last in the transaction,
    after the offsets are stored (a replay's digest and coverage of what it read). An exception
    from either rolls the batch back.

    Raises:
        duckdb.Error, OSError: the write failed; nothing of the batch is kept (rolled back,
            its lake files deleted).
    """
    by_name = {p.name: p for p in by_topic.values()}
    result = Applied()
    with _transaction(conn, lake_dir) as written:
        stored = {k: v.next_offset for k, v in load_offsets(conn, by_name).items()}
        for name, table in prepared.tables.items():
            proj = by_name[name]
            marks = {p: off for (n, t, p), off in stored.items() if n == name and t == proj.topic}
            fresh = _fresh(table, marks)
            result.redelivered += table.num_rows - fresh.num_rows
            if fresh.num_rows == 0:
                continue
            physical = _physical(conn, proj)
            new = _append(conn, physical, fresh) if append else _upsert(conn, physical, fresh)
            result.applied[name] = new.num_rows
            if on_written is not None:
                on_written(conn, physical.name, new)
            result.duplicates += fresh.num_rows - new.num_rows
            if proj.lake and new.num_rows:
                result.lake_files += _to_lake(conn, lake_dir, proj, new, written)
        result.rejects = _store_rejects(conn, prepared.rejects, stored)
        result.redelivered += len(prepared.rejects) - result.rejects
        next_offsets: dict[tuple[str, str, int], int] = {}
        for (topic, part), end in prepared.ends.items():
            key = (by_topic[topic].name, topic, part)
            if end > stored.get(key, 0):
                next_offsets[key] = end
        save_offsets(conn, next_offsets, identity)
        if before_commit is not None:
            before_commit(conn)
    return result


__all__ = ["Applied", "AppliedLate", "Deduped", "apply_batch", "apply_late", "dedupe", "row_checksum"]
