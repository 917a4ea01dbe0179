"""What ``backbeat projections list`` shows: every read model with its versions (live, and builds
of :mod:`projections.replay` in progress or kept), stored offsets, lag per partition and last event
time.

Lag is ``high watermark − stored next offset`` per partition, the high watermark taken from Fetch
responses (:func:`events.offsets.high_watermarks`; ListOffsets LATEST is wrong on the embedded
broker, docs/broker.md §2). Without a broker (or topic) the high watermarks and lags are ``None``.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime

import duckdb
import pyarrow as pa

from events.offsets import high_watermarks
from infra.broker import cluster_id_of
from infra.errors import InfraError
from infra.settings import Settings
from projections.readmodels import PROJECTIONS, Projection
from projections.store import reader
from projections.tracking import BUILDS_TABLE, OFFSETS_TABLE, REJECTS_TABLE, VERSIONS_TABLE


@dataclass(frozen=True)
class PartitionStatus:
    """One partition: stored next ``offset`` (``None``: never read), ``high_watermark`` (``None``:
    unknown) and ``lag`` (records not applied yet; ``None`` when either is unknown)."""

    partition: int
    offset: int | None
    high_watermark: int | None
    lag: int | None


@dataclass(frozen=True)
class BuildStatus:
    """A version made by a replay: ``build`` number, ``version``, ``state`` (``building``,
    ``current``, ``old``, ``failed``, ``abandoned``), its ``table``, ``rows``, and for one in
    progress its ``positions`` and ``stop`` (``{partition: offset}``) and ``lag`` (records left)."""

    build: int
    version: int
    state: str
    table: str
    rows: int | None
    positions: dict[int, int] = field(default_factory=dict)
    stop: dict[int, int] = field(default_factory=dict)
    lag: int | None = None


@dataclass(frozen=True)
class ProjectionStatus:
    """One read model. ``version``: of the code; ``live_version``: of what is stored (``None``: not
    built); ``table``: the physical table readers see through ``name``; ``rows``; ``partitions``;
    ``lag``: sum of the partitions' lags; ``last_event_time``: the latest event time in the read
    model (naive UTC; ``None``: empty or no time column); ``rejects``; ``builds``."""

    name: str
    version: int
    topic: str
    live_version: int | None
    table: str | None
    rows: int | None
    partitions: list[PartitionStatus]
    lag: int | None
    last_event_time: datetime | None
    rejects: int
    builds: list[BuildStatus]


def _time_column(proj: Projection) -> str | None:
    names = [c.name for c in proj.columns if pa.types.is_timestamp(c.type)]
    if proj.lake_time:
        return proj.lake_time
    return "occurred_at" if "occurred_at" in names else (names[0] if names else None)


def _tables(conn: duckdb.DuckDBPyConnection) -> set[str]:
    tables = {r[0] for r in conn.execute("SELECT table_name FROM duckdb_tables()").fetchall()}
    views = {r[0] for r in conn.execute("SELECT view_name FROM duckdb_views() WHERE NOT internal").fetchall()}
    return tables | views


def projection_status(
    settings: Settings, projections: Iterable[Projection] | None = None, timeout_s: float = 5.0
) -> list[ProjectionStatus]:
    """The status of ``projections`` (default: every plain one of ``PROJECTIONS``), in order.

    Raises:
        DatabaseBusyError: the read models stayed locked for 30 s.
    """
    projs = list(PROJECTIONS.values()) if projections is None else list(projections)
    marks: dict[str, dict[int, int] | None] = {}
    try:
        cluster_id_of(settings.bootstrap_servers, timeout_s)
        up = True
    except InfraError:
        up = False
    for topic in dict.fromkeys(p.topic for p in projs):
        try:
            marks[topic] = high_watermarks(settings, topic, timeout_s) if up else None
        except InfraError:
            marks[topic] = None
    if not settings.duckdb_path.exists():
        return [_status(None, p, marks[p.topic], set()) for p in projs]
    with reader(settings.duckdb_path) as conn:
        names = _tables(conn)
        return [_status(conn, p, marks[p.topic], names) for p in projs]


def _status(
    conn: duckdb.DuckDBPyConnection | None,
    proj: Projection,
    marks: dict[int, int] | None,
    names: set[str],
) -> ProjectionStatus:
    def one(sql: str, params: list[object]) -> tuple[object, ...] | None:
        assert conn is not None
        rows = conn.execute(sql, params).fetchall()
        return rows[0] if rows else None

    live_version: int | None = None
    offsets: dict[int, int] = {}
    rows: int | None = None
    last: datetime | None = None
    rejects = 0
    table: str | None = None
    builds: list[BuildStatus] = []
    if conn is not None and VERSIONS_TABLE in names:
        found = one(f"SELECT version FROM {VERSIONS_TABLE} WHERE projection = ?", [proj.name])
        live_version = int(found[0]) if found else None  # type: ignore[arg-type]
        offsets = {
            int(p): int(o)
            for p, o in conn.execute(
                f'SELECT "partition", next_offset FROM {OFFSETS_TABLE} WHERE projection = ? AND topic = ?',
                [proj.name, proj.topic],
            ).fetchall()
        }
        rejects = int(one(f"SELECT count(*) FROM {REJECTS_TABLE} WHERE projection = ?", [proj.name])[0])  # type: ignore[index,arg-type]
    if conn is not None and proj.name in names:
        table = proj.name
        rows = int(one(f'SELECT count(*) FROM "{proj.name}"', [])[0])  # type: ignore[index,arg-type]
        col = _time_column(proj)
        cols = {r[0] for r in conn.execute(f'DESCRIBE "{proj.name}"').fetchall()}
        if col in cols:
            last = one(f'SELECT max("{col}") FROM "{proj.name}"', [])[0]  # type: ignore[index,assignment]
    if conn is not None and BUILDS_TABLE in names:
        for build, version, state, tbl, stop_json in conn.execute(
            f"SELECT build, version, state, table_name, stop_offsets FROM {BUILDS_TABLE} "
            "WHERE projection = ? ORDER BY build",
            [proj.name],
        ).fetchall():
            count = (
                int(one(f'SELECT count(*) FROM "{tbl}"', [])[0])  # type: ignore[index,arg-type]
                if tbl in names
                else None
            )
            if state == "current":
                table = str(tbl)
            positions: dict[int, int] = {}
            stop: dict[int, int] = {}
            lag: int | None = None
            if state == "building":
                stop = {int(p): int(o) for p, o in json.loads(stop_json).items()}
                positions = {
                    int(p): int(o)
                    for p, o in conn.execute(
                        f'SELECT "partition", next_offset FROM {OFFSETS_TABLE} WHERE projection = ?', [tbl]
                    ).fetchall()
                }
                lag = sum(max(0, o - positions.get(p, 0)) for p, o in stop.items())
            builds.append(
                BuildStatus(int(build), int(version), str(state), str(tbl), count, positions, stop, lag)
            )
    parts_known = sorted(set(offsets) | set(marks or {}))
    partitions = []
    for p in parts_known:
        hwm = marks.get(p) if marks is not None else None
        off = offsets.get(p)
        lag_p = None if hwm is None else max(0, hwm - (off or 0))
        partitions.append(PartitionStatus(p, off, hwm, lag_p))
    total = None if marks is None else sum(x.lag or 0 for x in partitions)
    return ProjectionStatus(
        proj.name,
        proj.version,
        proj.topic,
        live_version,
        table,
        rows,
        partitions,
        total,
        last,
        rejects,
        builds,
    )


__all__ = ["BuildStatus", "PartitionStatus", "ProjectionStatus", "projection_status"]
