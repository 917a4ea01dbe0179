"""``backbeat sql``: one read-only query against the read models, while runners are writing.

The DuckDB file is opened read-only for the query and closed right after, through
:func:`projections.store.reader` (which waits for the runner's batch in flight and keeps the
runner from reopening until the query is done). The Parquet lake can be queried in the same
statement, e.g. ``SELECT count(*) FROM read_parquet('var/lake/listens/**/*.parquet')``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import duckdb

from infra.errors import BackbeatError
from infra.settings import Settings
from projections.store import reader


class QueryError(BackbeatError):
    """The SQL statement failed (syntax, unknown table or column, a write on a read-only file)."""


@dataclass(frozen=True)
class QueryResult:
    """``columns`` (names), ``types`` (DuckDB type names) and ``rows`` (tuples of Python values:
    ``TIMESTAMP`` as naive ``datetime`` in UTC); ``truncated`` when more than ``max_rows`` rows
    matched (only the first ``max_rows`` are returned)."""

    columns: list[str]
    types: list[str]
    rows: list[tuple[Any, ...]]
    truncated: bool = False


def query(
    settings: Settings,
    sql: str,
    params: Sequence[object] | None = None,
    *,
    max_rows: int | None = 10_000,
    timeout_s: float = 30.0,
) -> QueryResult:
    """Run ``sql`` (with ``?`` ``params``) read-only on ``settings.duckdb_path``.

    Returns at most ``max_rows`` rows (``None``: all). ``timeout_s`` bounds the wait for a
    runner's batch in flight, not the query itself.

    Raises:
        NoReadModelsError: no projection has run yet (no database file).
        DatabaseBusyError: the file stayed locked for ``timeout_s`` seconds.
        QueryError: DuckDB rejected or failed the statement (its message included).
    """
    with reader(settings.duckdb_path, timeout_s) as conn:
        try:
            cursor = conn.execute(sql, list(params) if params else None)
            description = cursor.description or []
            if max_rows is None:
                rows = cursor.fetchall()
                truncated = False
            else:
                rows = cursor.fetchmany(max_rows + 1)
                truncated = len(rows) > max_rows
                rows = rows[:max_rows]
        except duckdb.Error as exc:
            raise QueryError(f"query failed: {exc}") from exc
    return QueryResult([d[0] for d in description], [str(d[1]) for d in description], rows, truncated)


__all__ = ["QueryError", "QueryResult", "query"]
