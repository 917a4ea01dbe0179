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
"""

from __future__ import annotations

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


__all__ = [
    "DATE_COLUMN",
    "LAKE_FILES_DDL",
    "LAKE_FILES_TABLE",
    "delete_files",
    "next_batch",
    "record_files",
    "remove_orphans",
    "write_files",
]
