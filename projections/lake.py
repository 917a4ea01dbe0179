"""The Parquet lake: append-only read-model rows as Parquet files partitioned by event date,
``<lake_dir>/<projection>/event_date=YYYY-MM-DD/v<version>-b<batch>-<i>.parquet`` (Hive-style, so
DuckDB, Spark or pyarrow read it as a dataset: ``read_parquet('var/lake/listens/**/*.parquet',
hive_partitioning = true)``).

Exactly-once like the tables: the runner writes a batch's files *before* committing its DuckDB
transaction and records them in ``lake_files`` inside that transaction. A file that exists but
is not recorded is the orphan of a batch that never committed (crash, rollback);
:func:`remove_orphans` deletes those at start-up, and the batch, redelivered, writes its files
again. The batch number comes from the committed ``lake_files`` rows, so a retried batch reuses
the name of its orphan. Readers of the directory must tolerate orphans while a runner is down
(or read the file list from ``lake_files``).

Versions (:mod:`projections.replay` after a version bump): a replay writes the new version's
files under ``<lake_dir>/<build table>/`` (e.g. ``listens__v2_b3/``), recorded in ``lake_files``
under that name, and the switch makes ``<lake_dir>/<projection>`` a symbolic link to that
directory, so readers keep globbing ``lake/<projection>/**`` and see one version. The previous
version's files stay in their own directory (a real ``<projection>/`` directory is renamed to
the retired table's name, ``listens__v1_b0/``) until ``--drop-old``. ``lake_files`` follows in
the switch's transaction (the current version's files are listed under ``<projection>/``, a
retired version's under its directory), together with a row of :data:`LAKE_SWITCHES_TABLE`
saying what the file system must look like; :func:`finish_switches` then renames and links and
deletes the row. A crash between the two leaves the row, and the next runner or replay
finishes the switch (:func:`finish_switches` is idempotent) before anything else touches the
directory, so :func:`remove_orphans` never sees a half-switched lake.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds

from projections.readmodels import Projection

LAKE_FILES_TABLE = "lake_files"
LAKE_FILES_DDL = f"""CREATE TABLE IF NOT EXISTS {LAKE_FILES_TABLE} (
  projection VARCHAR NOT NULL, path VARCHAR PRIMARY KEY, batch BIGINT NOT NULL,
  "rows" BIGINT NOT NULL, created_at TIMESTAMP NOT NULL)"""
DATE_COLUMN = "event_date"
#: Lake directory switches decided by a committed replay switch but maybe not yet done on disk:
#: ``<lake_dir>/<projection>`` must become a link to ``target`` (a directory name beside it);
#: a real directory found there is first renamed ``retire_as``.
LAKE_SWITCHES_TABLE = "lake_switches"
LAKE_SWITCHES_DDL = f"""CREATE TABLE IF NOT EXISTS {LAKE_SWITCHES_TABLE} (
  projection VARCHAR PRIMARY KEY, target VARCHAR NOT NULL, retire_as VARCHAR NOT NULL)"""

_PARTITIONING = ds.partitioning(pa.schema([(DATE_COLUMN, pa.date32())]), flavor="hive")


def next_batch(conn: duckdb.DuckDBPyConnection, projection: str) -> int:
    """The next lake batch number of ``projection`` (1 + the largest committed one)."""
    rows = conn.execute(
        f"SELECT coalesce(max(batch), 0) + 1 FROM {LAKE_FILES_TABLE} WHERE projection = ?", [projection]
    ).fetchall()  # fetch to the end: DuckDB 2 refuses new work while a result is unfinished
    return int(rows[0][0])


def write_files(lake_dir: Path, projection: Projection, rows: pa.Table, batch: int) -> list[tuple[str, int]]:
    """Write ``rows`` of ``projection`` as Parquet, one file per event date (UTC date of
    ``projection.lake_time``), and return ``[(path relative to lake_dir, row count)]``.
    Existing files of the same name (orphans of this batch number) are overwritten."""
    if rows.num_rows == 0:
        return []
    dates = pc.cast(rows[projection.lake_time], pa.date32())
    table = rows.append_column(pa.field(DATE_COLUMN, pa.date32()), dates)
    root = lake_dir / projection.name
    written: list[tuple[str, int]] = []

    def visit(file: ds.WrittenFile) -> None:
        rows_in = file.metadata.num_rows if file.metadata is not None else 0
        written.append((str(Path(file.path).relative_to(lake_dir)), int(rows_in)))

    ds.write_dataset(
        table,
        root,
        format="parquet",
        partitioning=_PARTITIONING,
        basename_template=f"v{projection.version}-b{batch:09d}-{{i}}.parquet",
        existing_data_behavior="overwrite_or_ignore",
        file_visitor=visit,
        max_rows_per_group=1_000_000,
        min_rows_per_group=0,
        use_threads=True,
    )
    return sorted(written)


def record_files(
    conn: duckdb.DuckDBPyConnection, projection: str, batch: int, files: list[tuple[str, int]], stamp: object
) -> None:
    """Record written files in ``lake_files`` (inside the caller's transaction)."""
    if not files:
        return
    table = pa.table(
        {
            "projection": pa.array([projection] * len(files), pa.string()),
            "path": pa.array([f for f, _ in files], pa.string()),
            "batch": pa.array([batch] * len(files), pa.int64()),
            "rows": pa.array([n for _, n in files], pa.int64()),
            "created_at": pa.array([stamp] * len(files), pa.timestamp("ms")),
        }
    )
    conn.register("bb_lake_batch", table)
    try:
        conn.execute(f"INSERT INTO {LAKE_FILES_TABLE} SELECT * FROM bb_lake_batch")
    finally:
        conn.unregister("bb_lake_batch")


def delete_files(lake_dir: Path, files: list[tuple[str, int]]) -> None:
    """Delete files written by a batch whose transaction did not commit."""
    for rel, _ in files:
        (lake_dir / rel).unlink(missing_ok=True)


def remove_orphans(conn: duckdb.DuckDBPyConnection, lake_dir: Path, projection: str) -> int:
    """Delete Parquet files under ``<lake_dir>/<projection>`` that ``lake_files`` does not list
    (call while holding the writer connection, before the first batch). Returns how many."""
    root = lake_dir / projection
    if not root.exists():
        return 0
    known = {
        r[0]
        for r in conn.execute(
            f"SELECT path FROM {LAKE_FILES_TABLE} WHERE projection = ?", [projection]
        ).fetchall()
    }
    removed = 0
    for path in root.rglob("*.parquet"):
        if str(path.relative_to(lake_dir)) not in known:
            path.unlink(missing_ok=True)
            removed += 1
    return removed


def current_dir(lake_dir: Path, projection: str, retire_as: str) -> str:
    """The name of the directory beside ``<lake_dir>/<projection>`` that holds the current
    version's files: the link's target when it is a link, else ``retire_as`` (the name a real
    directory gets when a switch retires it)."""
    link = lake_dir / projection
    return os.readlink(link) if link.is_symlink() else retire_as


def plan_switch(
    conn: duckdb.DuckDBPyConnection, lake_dir: Path, projection: str, target: str, retire_as: str
) -> None:
    """Inside the caller's transaction (a replay's switch): record that ``<lake_dir>/<projection>``
    must now show directory ``target`` (the new version's files, recorded in ``lake_files`` under
    ``target``), and move the ``lake_files`` rows: the current version's files to the directory
    they will be found in once retired (:func:`current_dir`), ``target``'s to ``<projection>/``.
    Then commit and call :func:`finish_switches`.

    Raises:
        duckdb.Error: the statements failed (the caller's transaction rolls back).
    """
    old = current_dir(lake_dir, projection, retire_as)
    for ddl in (LAKE_FILES_DDL, LAKE_SWITCHES_DDL):
        conn.execute(ddl)
    moves = ((projection, old), (target, projection))
    for src, dst in moves:
        conn.execute(
            f"UPDATE {LAKE_FILES_TABLE} SET projection = ?, path = ? || substr(path, ?) WHERE projection = ?",
            [dst, dst, len(src) + 1, src],
        )
    conn.execute(f"INSERT OR REPLACE INTO {LAKE_SWITCHES_TABLE} VALUES (?, ?, ?)", [projection, target, old])


def finish_switches(conn: duckdb.DuckDBPyConnection, lake_dir: Path) -> list[str]:
    """Do on disk the lake switches recorded by :func:`plan_switch` (idempotent: call at every
    start before :func:`remove_orphans`): a real ``<projection>`` directory is renamed to its
    ``retire_as`` name, then ``<projection>`` becomes a link to ``target`` (replacing an older
    link atomically), and the row is deleted. Returns the projections switched.

    Raises:
        OSError: a rename or link failed (the row stays; the next call tries again).
    """
    exists = conn.execute(
        "SELECT count(*) FROM duckdb_tables() WHERE table_name = ?", [LAKE_SWITCHES_TABLE]
    ).fetchall()[0][0]
    if not exists:
        return []
    done = []
    for projection, target, retire_as in conn.execute(
        f"SELECT projection, target, retire_as FROM {LAKE_SWITCHES_TABLE}"
    ).fetchall():
        lake_dir.mkdir(parents=True, exist_ok=True)
        (lake_dir / target).mkdir(exist_ok=True)
        link = lake_dir / projection
        if link.exists() and not link.is_symlink():
            os.rename(link, lake_dir / retire_as)
        tmp = lake_dir / f".{projection}.link.tmp"
        tmp.unlink(missing_ok=True)
        os.symlink(target, tmp)
        os.replace(tmp, link)  # atomic: readers see the old link or the new one
        conn.execute(f"DELETE FROM {LAKE_SWITCHES_TABLE} WHERE projection = ?", [projection])
        done.append(str(projection))
    return done


def drop_dir(lake_dir: Path, name: str) -> None:
    """Delete a retired version's lake directory ``<lake_dir>/<name>`` (never the directory the
    projection's link points at), or a link of that name."""
    path = lake_dir / name
    if path.is_symlink():
        path.unlink()
    elif path.is_dir():
        shutil.rmtree(path, ignore_errors=True)


__all__ = [
    "DATE_COLUMN",
    "LAKE_FILES_DDL",
    "LAKE_FILES_TABLE",
    "LAKE_SWITCHES_DDL",
    "LAKE_SWITCHES_TABLE",
    "current_dir",
    "delete_files",
    "drop_dir",
    "finish_switches",
    "plan_switch",
    "next_batch",
    "record_files",
    "remove_orphans",
    "write_files",
]
