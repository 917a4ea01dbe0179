"""Blue/green replay of the saga read models, from their sources of truth (``backbeat replay``;
docs/replay.md "Saga read models").

The saga read models are not projections of a Kafka topic, so :func:`projections.replay.replay`
cannot rebuild them; :func:`replay_saga_read_model` does, with the same scheme (build tables
``<name>__v<version>_b<n>``, rows in ``projection_builds``, verification, an atomic switch through
a view, old versions kept until ``drop_old``). Their sources (:data:`SAGA_SOURCES`), each rebuilt
as a group because its tables are projected together:

- ``orchestrator``: ``sagas``, ``saga_events``, ``saga_order_lines`` from the saga orchestrator's
  event store (its eventsourcing notification log, SQLite or PostgreSQL as configured by
  ``BACKBEAT_EVENTSTORE_URL``: :func:`sagas.eventstore.eventstore_env`), projected live by
  :func:`sagas.readmodel.project_sagas`;
- ``inventory``: ``inventory_reservations``, ``inventory_stock`` from the inventory service's event
  store, and the initial stock file (:func:`sagas.simulate.stock_path`: SKUs never touched are at
  their initial units, which no event records);
- ``gateway``: ``gateway_operations``, a copy of the gateway simulator's own record of the
  operations it did (the table ``gateway_operations`` of its SQLite file,
  :func:`sagas.simulate.gateway_path`). That file is the source of truth: the payment service's
  events hold what the gateway *answered*, not the provider's record. It is neither an event store
  nor a topic; rows are only ever inserted (one per idempotency key), so a position is its
  ``rowid``.

A position is a notification id (the ``rowid`` for the gateway): a build holds the source *as of*
that position exactly (each aggregate loaded at its last version at or below it), recorded as
``{"0": position}`` in the builds row's ``stop_offsets`` (notification ids ``1..position``, i.e.
offsets ``[0, position)`` in the log's 0-based numbering). The live writers record their position
in ``saga_projection(store, notification_id)`` (:func:`sagas.readmodel.project_sagas`;
:func:`project_copies` for the inventory and gateway copies).

How a replay runs:

1. **Build.** Every table of the group gets a build table and a ``building`` row in
   ``projection_builds`` with one build number; an interrupted build of the group is marked
   ``abandoned`` (no resume: these read models are small). The notification log up to the source's
   last notification id is scanned (``select_notifications``), each aggregate it names is loaded at
   its last version in range, and its rows (the live projection's own mapping:
   :func:`sagas.readmodel.saga_rows`, :func:`inventory_rows`) are appended in one DuckDB
   transaction per chunk, through :func:`projections.store.writer`, so ``backbeat sql`` gets in
   between chunks and keeps reading the live tables.
2. **Catch up.** If the live projection's position is further (it kept running), the build
   reloads the aggregates changed since its position and replaces their rows.
3. **Verify.** A fresh projection of the same range, read another way (for event stores: every
   domain event of the notification log folded into its aggregate in memory, instead of the
   repository's per-aggregate reads and snapshots; for the gateway: a second, unpaged read of the
   SQLite table), mapped by the same code into in-memory DuckDB tables of the same shape: each
   build table must have the same row count and ``sum(hash(every column))``. This checks what the
   build's reads and writes did (aggregates missed, stale or written twice, rows lost, repeated or
   altered in the build table); it does not check the row mapping, which both share. When the live
   tables stand at the same position (and the source has not moved since), they are compared too
   (``mode="live"`` when equal); live tables that differ do not stop the switch (the build is
   what the source says) but the ``detail`` says so.
4. **Switch.** In one DuckDB transaction, per table: the first time, the live table is renamed
   ``<name>__v<version>_b0`` (recorded as build 0, ``old``); ``<name>`` becomes a view over the
   build table; the build becomes ``current``, the previous one ``old``; and the source's position
   in ``saga_projection`` becomes the build's. The live writers then write into the current build
   table (:func:`sagas.readmodel.physical`). If the live projection moved past the build meanwhile,
   the switch is retried after another catch-up.
"""

from __future__ import annotations

import fcntl
import json
import os
import sqlite3
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from uuid import UUID

import duckdb
import pyarrow as pa

from infra.errors import ConfigError
from infra.settings import Settings
from projections.replay import (
    ReplayError,
    ReplayProgress,
    ReplayResult,
    Verification,
    drop_old_versions,
    progress_of,
    table_checksum,
)
from projections.store import reader, writer
from projections.tracking import (
    BOOKKEEPING_DDL,
    BUILDS_TABLE,
    now_utc,
    relation_kind,
    switch_to_build,
)
from sagas import readmodel
from sagas.readmodel import POSITIONS_DDL, VERSION, physical

#: Column definitions of the copied read models (their live shape: the Arrow schemas of
#: :data:`sagas.gateway.OPERATION_SCHEMA`, :data:`sagas.inventory.RESERVATION_SCHEMA` and
#: :data:`sagas.inventory.STOCK_SCHEMA` as DuckDB types).
COPY_COLUMNS = {
    "gateway_operations": (
        "operation_id VARCHAR, saga_id VARCHAR, payment_id VARCHAR, idempotency_key VARCHAR, kind VARCHAR, "
        "status VARCHAR, amount_minor BIGINT, currency VARCHAR, provider_reference VARCHAR, "
        "created_at_ms BIGINT"
    ),
    "inventory_reservations": (
        "reservation_id VARCHAR, order_id VARCHAR, sku VARCHAR, quantity BIGINT, state VARCHAR"
    ),
    "inventory_stock": "sku VARCHAR, initial_units BIGINT, available_units BIGINT",
}
#: ``CREATE TABLE`` bodies of every saga read model.
COLUMNS: dict[str, str] = {**readmodel.COLUMNS, **COPY_COLUMNS}
#: The column identifying a row's owner in each table (the rows replaced when it changes).
KEYS = {
    "sagas": "saga_id",
    "saga_events": "saga_id",
    "saga_order_lines": "saga_id",
    "inventory_reservations": "reservation_id",
    "inventory_stock": "sku",
    "gateway_operations": "operation_id",
}
#: Aggregates (or gateway rows) per build transaction.
CHUNK = 1_000
_PAGE = 5_000
_SWITCH_TRIES = 5

Rows = dict[str, list[tuple[Any, ...]]]


@dataclass
class _Chunk:
    """Rows of some owners (``rows`` per table), the owners whose old rows they replace
    (``keys`` per table) and how many source records (notifications, gateway rows) they cover."""

    rows: Rows
    keys: dict[str, list[Any]]
    records: int


@dataclass(frozen=True)
class SagaSource:
    """Where a group of saga read models comes from. ``name``: also its key in ``saga_projection``;
    ``tables``: the read models projected together from it; ``label``/``kind``: what the builds
    rows record as ``topic``/``source``; ``what``: a sentence for people."""

    name: str
    tables: tuple[str, ...]
    label: str
    kind: str
    what: str
    open: Callable[[Settings, bool], AbstractContextManager[Any]] = field(repr=False)
    end: Callable[[Any], int] = field(repr=False)
    changes: Callable[[Any, int, int, int], Iterator[_Chunk]] = field(repr=False)
    total: Callable[[Any, int, int], int] = field(repr=False)
    recount: Callable[[Any, int], Rows] = field(repr=False)


# -- event stores ------------------------------------------------------------------------------------
def _scan(app: Any, after: int, upto: int) -> dict[UUID, tuple[int, int]]:
    """``{aggregate id: (last version, notifications)}`` of notifications ``after < id <= upto``."""
    out: dict[UUID, tuple[int, int]] = {}
    start = after + 1
    while start <= upto:
        notes = app.recorder.select_notifications(start=start, limit=_PAGE, stop=upto)
        if not notes:
            break
        for note in notes:
            version, count = out.get(note.originator_id, (0, 0))
            out[note.originator_id] = (max(version, int(note.originator_version)), count + 1)
        start = int(notes[-1].id) + 1
    return out


def _fold(app: Any, upto: int) -> tuple[dict[UUID, Any], dict[UUID, list[Any]]]:
    """Every aggregate of ``app`` as of notification ``upto``, folded in memory from the domain
    events of the notification log (not through the repository), and each one's events."""
    aggregates: dict[UUID, Any] = {}
    events: dict[UUID, list[Any]] = {}
    start = 1
    while start <= upto:
        notes = app.recorder.select_notifications(start=start, limit=_PAGE, stop=upto)
        if not notes:
            break
        for note in notes:
            event = app.mapper.to_domain_event(note)
            aggregates[note.originator_id] = event.mutate(aggregates.get(note.originator_id))
            events.setdefault(note.originator_id, []).append(event)
        start = int(notes[-1].id) + 1
    return aggregates, events


def _count(app: Any, after: int, upto: int) -> int:
    return sum(c for _, c in _scan(app, after, upto).values())


def _end(app: Any) -> int:
    return int(app.recorder.max_notification_id() or 0)


@contextmanager
def _application(make: Callable[[], Any]) -> Iterator[Any]:
    from sagas.eventstore import open_application  # noqa: PLC0415

    app = open_application(make)
    try:
        yield app
    finally:
        app.close()


def _open_orchestrator(settings: Settings, replaying: bool) -> AbstractContextManager[Any]:
    from sagas.eventstore import eventstore_env  # noqa: PLC0415
    from sagas.orchestrator import Orchestrator  # noqa: PLC0415

    return _application(lambda: Orchestrator(eventstore_env(settings, Orchestrator.name)))


def _orchestrator_changes(app: Any, after: int, upto: int, chunk: int) -> Iterator[_Chunk]:
    from sagas.saga import Saga  # noqa: PLC0415

    items = list(_scan(app, after, upto).items())
    for i in range(0, len(items), chunk):
        rows: Rows = {t: [] for t in readmodel.COLUMNS}
        owners: list[Any] = []
        records = 0
        for oid, (version, count) in items[i : i + chunk]:
            records += count
            saga = app.repository.get(oid, version=version)
            if not isinstance(saga, Saga):
                continue
            _add_saga(rows, readmodel.saga_rows(saga, app.events.get(oid, lte=version)))
            owners.append(saga.saga_id)
        yield _Chunk(rows, {t: owners for t in readmodel.COLUMNS}, records)


def _add_saga(rows: Rows, saga: tuple[tuple[Any, ...], list[tuple[Any, ...]], list[tuple[Any, ...]]]) -> None:
    row, history, lines = saga
    rows["sagas"].append(row)
    rows["saga_events"].extend(history)
    rows["saga_order_lines"].extend(lines)


def _orchestrator_recount(app: Any, upto: int) -> Rows:
    from sagas.saga import Saga  # noqa: PLC0415

    aggregates, events = _fold(app, upto)
    rows: Rows = {t: [] for t in readmodel.COLUMNS}
    for oid, saga in aggregates.items():
        if isinstance(saga, Saga):
            _add_saga(rows, readmodel.saga_rows(saga, events[oid]))
    return rows


@dataclass
class _Inventory:
    app: Any
    initial: dict[str, int]


@contextmanager
def _inventory_handle(settings: Settings) -> Iterator[_Inventory]:
    from sagas.eventstore import eventstore_env  # noqa: PLC0415
    from sagas.inventory import InventoryService  # noqa: PLC0415
    from sagas.simulate import stock_path  # noqa: PLC0415

    path = stock_path(settings)
    initial = {str(k): int(v) for k, v in json.loads(path.read_text()).items()} if path.exists() else {}
    env = eventstore_env(settings, InventoryService.name)
    with _application(lambda: InventoryService(env, initial_stock=initial)) as app:
        yield _Inventory(app, initial)


def _open_inventory(settings: Settings, replaying: bool) -> AbstractContextManager[Any]:
    return _inventory_handle(settings)


def inventory_rows(aggregates: Sequence[Any], initial: Mapping[str, int], rows: Rows) -> dict[str, list[Any]]:
    """Append the rows of inventory ``aggregates`` (reservations and stocks, anything else ignored)
    to ``rows`` (``inventory_reservations``: one row per line of a reservation past ``NEW``, state
    lowercased; ``inventory_stock``: ``(sku, initial units, available units)`` of a SKU in
    ``initial``). Returns the owners seen per table (reservation ids, SKUs)."""
    from sagas.inventory import NEW, Reservation, Stock  # noqa: PLC0415

    owners: dict[str, list[Any]] = {"inventory_reservations": [], "inventory_stock": []}
    for agg in aggregates:
        if isinstance(agg, Reservation):
            owners["inventory_reservations"].append(agg.reservation_id)
            if agg.state != NEW:
                rows["inventory_reservations"].extend(
                    (agg.reservation_id, agg.order_id, line["sku"], int(line["quantity"]), agg.state.lower())
                    for line in agg.lines
                )
        elif isinstance(agg, Stock) and agg.sku in initial:
            owners["inventory_stock"].append(agg.sku)
            rows["inventory_stock"].append((agg.sku, initial[agg.sku], int(agg.available)))
    return owners


def _untouched(initial: Mapping[str, int], touched: set[str]) -> list[tuple[Any, ...]]:
    return [(sku, units, units) for sku, units in sorted(initial.items()) if sku not in touched]


def _inventory_changes(inv: _Inventory, after: int, upto: int, chunk: int) -> Iterator[_Chunk]:
    items = list(_scan(inv.app, after, upto).items())
    touched: set[str] = set()
    for i in range(0, len(items), chunk):
        rows: Rows = {t: [] for t in COPY_COLUMNS if t.startswith("inventory_")}
        part = items[i : i + chunk]
        aggregates = [inv.app.repository.get(oid, version=version) for oid, (version, _) in part]
        owners = inventory_rows(aggregates, inv.initial, rows)
        touched.update(owners["inventory_stock"])
        yield _Chunk(rows, owners, sum(c for _, (_, c) in part))
    if after == 0:  # SKUs no event touched are at their initial units (a catch-up has them already)
        rows = {"inventory_reservations": [], "inventory_stock": _untouched(inv.initial, touched)}
        yield _Chunk(rows, {"inventory_reservations": [], "inventory_stock": []}, 0)


def _inventory_recount(inv: _Inventory, upto: int) -> Rows:
    aggregates, _ = _fold(inv.app, upto)
    rows: Rows = {"inventory_reservations": [], "inventory_stock": []}
    owners = inventory_rows(list(aggregates.values()), inv.initial, rows)
    rows["inventory_stock"].extend(_untouched(inv.initial, set(owners["inventory_stock"])))
    return rows


# -- the gateway's record ----------------------------------------------------------------------------
_GATEWAY_COLUMNS = (
    "operation_id, saga_id, payment_id, idempotency_key, kind, status, amount_minor, currency, "
    "provider_reference, created_at_ms"
)


@contextmanager
def _gateway_handle(settings: Settings, replaying: bool) -> Iterator[sqlite3.Connection | None]:
    """A read-only connection to the gateway simulator's SQLite file (``None``: no file yet).

    Raises:
        ConfigError: ``replaying`` and there is no gateway record to rebuild from.
    """
    from sagas.simulate import gateway_path  # noqa: PLC0415

    path = gateway_path(settings)
    if not path.exists():
        if replaying:
            raise ConfigError(
                f"no gateway record at {path}: gateway_operations is a copy of the gateway simulator's "
                "own record, which this BACKBEAT_DATA_DIR does not have"
            )
        yield None
        return
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30)
    try:
        has = db.execute(
            "SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name = 'gateway_operations'"
        ).fetchone()[0]
        yield db if has else None
    finally:
        db.close()


def _gateway_end(db: sqlite3.Connection | None) -> int:
    if db is None:
        return 0
    return int(db.execute("SELECT coalesce(max(rowid), 0) FROM gateway_operations").fetchone()[0])


def _gateway_total(db: sqlite3.Connection | None, after: int, upto: int) -> int:
    if db is None:
        return 0
    return int(
        db.execute(
            "SELECT count(*) FROM gateway_operations WHERE rowid > ? AND rowid <= ?", (after, upto)
        ).fetchone()[0]
    )


def _gateway_changes(db: sqlite3.Connection | None, after: int, upto: int, chunk: int) -> Iterator[_Chunk]:
    position = after
    while db is not None and position < upto:
        found = db.execute(
            f"SELECT rowid, {_GATEWAY_COLUMNS} FROM gateway_operations WHERE rowid > ? AND rowid <= ? "
            "ORDER BY rowid LIMIT ?",
            (position, upto, chunk),
        ).fetchall()
        if not found:
            break
        position = int(found[-1][0])
        rows = [tuple(r[1:]) for r in found]
        yield _Chunk({"gateway_operations": rows}, {"gateway_operations": [r[0] for r in rows]}, len(rows))


def _gateway_recount(db: sqlite3.Connection | None, upto: int) -> Rows:
    if db is None:
        return {"gateway_operations": []}
    found = db.execute(f"SELECT {_GATEWAY_COLUMNS} FROM gateway_operations WHERE rowid <= ?", (upto,))
    return {"gateway_operations": [tuple(r) for r in found.fetchall()]}


#: The sources of the saga read models, by source name.
SAGA_SOURCES: dict[str, SagaSource] = {
    s.name: s
    for s in (
        SagaSource(
            "orchestrator",
            ("sagas", "saga_events", "saga_order_lines"),
            "eventstore:orchestrator",
            "eventstore",
            "the saga orchestrator's event store (notification log)",
            _open_orchestrator,
            _end,
            _orchestrator_changes,
            _count,
            _orchestrator_recount,
        ),
        SagaSource(
            "inventory",
            ("inventory_reservations", "inventory_stock"),
            "eventstore:inventory",
            "eventstore",
            "the inventory service's event store (notification log) and the initial stock",
            _open_inventory,
            lambda inv: _end(inv.app),
            _inventory_changes,
            lambda inv, a, b: _count(inv.app, a, b),
            _inventory_recount,
        ),
        SagaSource(
            "gateway",
            ("gateway_operations",),
            "sqlite:gateway_operations",
            "sqlite",
            "the gateway simulator's own record (SQLite table gateway_operations)",
            _gateway_handle,
            _gateway_end,
            _gateway_changes,
            _gateway_total,
            _gateway_recount,
        ),
    )
}

#: The read models :func:`replay_saga_read_model` rebuilds, each mapped to the name of its source
#: (:data:`SAGA_SOURCES`); the tables of one source are rebuilt and switched together.
SAGA_READ_MODELS: dict[str, str] = {t: s.name for s in SAGA_SOURCES.values() for t in s.tables}


# -- DuckDB helpers ----------------------------------------------------------------------------------
def _columns(conn: duckdb.DuckDBPyConnection, table: str) -> list[str]:
    return [str(r[0]) for r in conn.execute(f'DESCRIBE "{table}"').fetchall()]


def _insert(conn: duckdb.DuckDBPyConnection, table: str, rows: Sequence[tuple[Any, ...]]) -> None:
    """Append ``rows`` (tuples in column order) to ``table`` through one Arrow table (DuckDB casts
    each column to the table's type)."""
    if not rows:
        return
    names = _columns(conn, table)
    arrays = [pa.array(list(col)) for col in zip(*rows, strict=True)]
    conn.register("bb_saga_rows", pa.Table.from_arrays(arrays, names=names))
    try:
        conn.execute(f'INSERT INTO "{table}" SELECT * FROM bb_saga_rows')
    finally:
        conn.unregister("bb_saga_rows")


def _live_position(conn: duckdb.DuckDBPyConnection, source: SagaSource) -> int | None:
    if relation_kind(conn, "saga_projection") != "table":
        return None
    rows = conn.execute(
        "SELECT notification_id FROM saga_projection WHERE store = ?", [source.name]
    ).fetchall()
    return int(rows[0][0]) if rows else None


def _ensure_live(conn: duckdb.DuckDBPyConnection, name: str) -> str:
    """The physical table of read model ``name``, created (live shape) when missing."""
    conn.execute(f"CREATE TABLE IF NOT EXISTS {name} ({COLUMNS[name]})")  # a no-op over a replay's view
    return physical(conn, name)


def project_copies(settings: Settings, conn: duckdb.DuckDBPyConnection, sources: Sequence[str] = ()) -> None:
    """The live writer of the copied read models: replace the rows of ``inventory_*`` and
    ``gateway_operations`` (``sources``: names of :data:`SAGA_SOURCES`, default ``inventory`` and
    ``gateway``) with their source as of its last position, in one transaction per source on
    ``conn`` (a :func:`projections.store.writer` connection), and record that position in
    ``saga_projection``. After a replay the rows go into the current version's tables.

    Raises:
        eventsourcing.persistence.PersistenceError: the inventory event store cannot be read.
        sqlite3.Error: the gateway record cannot be read.
    """
    for name in sources or ("inventory", "gateway"):
        source = SAGA_SOURCES[name]
        with source.open(settings, False) as handle:
            upto = source.end(handle)
            rows: Rows = {t: [] for t in source.tables}
            for chunk in source.changes(handle, 0, upto, CHUNK):
                for table, found in chunk.rows.items():
                    rows[table].extend(found)
        conn.execute(POSITIONS_DDL)
        conn.begin()
        try:
            for table in source.tables:
                target = _ensure_live(conn, table)
                conn.execute(f'DELETE FROM "{target}"')
                _insert(conn, target, rows[table])
            conn.execute("INSERT OR REPLACE INTO saga_projection VALUES (?, ?)", [source.name, upto])
            conn.commit()
        except BaseException:
            conn.rollback()
            raise


def forget_saga_read_models(conn: duckdb.DuckDBPyConnection) -> list[str]:
    """Drop every saga read model (live tables, replay views, build tables and their
    ``projection_builds`` rows) and ``saga_projection``, inside the caller's transaction, for
    ``backbeat sagas reset``. Returns the tables and views dropped."""
    dropped: list[str] = []
    if relation_kind(conn, BUILDS_TABLE) == "table":
        found = conn.execute(
            f"SELECT table_name FROM {BUILDS_TABLE} WHERE list_contains(?, projection)",
            [list(SAGA_READ_MODELS)],
        ).fetchall()
        for (table,) in found:
            conn.execute(f'DROP TABLE IF EXISTS "{table}"')
            dropped.append(str(table))
        conn.execute(
            f"DELETE FROM {BUILDS_TABLE} WHERE list_contains(?, projection)", [list(SAGA_READ_MODELS)]
        )
    for name in (*SAGA_READ_MODELS, "saga_projection"):
        kind = relation_kind(conn, name)
        if kind is not None:
            conn.execute(f'DROP {"VIEW" if kind == "view" else "TABLE"} "{name}"')
            dropped.append(name)
    return dropped


@contextmanager
def _lock(db_path: Path, source: str) -> Iterator[None]:
    """One replay per saga source at a time (``flock`` on ``<db>.replay-saga-<source>.lock``).

    Raises:
        ReplayError: another replay of the source holds it.
    """
    path = db_path.with_name(f"{db_path.name}.replay-saga-{source}.lock")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ReplayError(
                f"another replay of the {source} read models is running (lock {path})"
            ) from None
        yield
    finally:
        os.close(fd)


def _offsets_json(position: int) -> str:
    return json.dumps({"0": int(position)})


# -- build -------------------------------------------------------------------------------------------
def _open_build(
    settings: Settings, source: SagaSource, upto: int, timeout_s: float
) -> tuple[int, dict[str, str]]:
    """A new build of every table of ``source``: ``(build number, {read model: build table})``."""
    names = list(source.tables)
    with writer(settings.duckdb_path, timeout_s) as conn:
        for ddl in BOOKKEEPING_DDL:
            conn.execute(ddl)
        conn.begin()
        conn.execute(
            f"UPDATE {BUILDS_TABLE} SET state = 'abandoned', note = 'interrupted; superseded' "
            "WHERE list_contains(?, projection) AND state = 'building'",
            [names],
        )
        n = int(
            conn.execute(
                f"SELECT coalesce(max(build), 0) + 1 FROM {BUILDS_TABLE} WHERE list_contains(?, projection)",
                [names],
            ).fetchall()[0][0]
        )
        tables = {name: f"{name}__v{VERSION}_b{n}" for name in names}
        for name, table in tables.items():
            conn.execute(f'DROP TABLE IF EXISTS "{table}"')
            conn.execute(f'CREATE TABLE "{table}" ({COLUMNS[name]})')
            conn.execute(
                f"INSERT INTO {BUILDS_TABLE} VALUES (?, ?, ?, ?, ?, ?, 'building', ?, ?, ?, NULL, NULL)",
                [name, n, VERSION, table, source.label, source.kind, _offsets_json(0), _offsets_json(upto),
                 now_utc()],
            )  # fmt: skip
        conn.commit()
    return n, tables


class _Builder:
    """Writes a source's rows into build tables, chunk by chunk, reporting progress."""

    def __init__(
        self,
        settings: Settings,
        source: SagaSource,
        tables: Mapping[str, str],
        timeout_s: float,
        progress: Callable[[ReplayProgress], None] | None,
    ) -> None:
        self.settings = settings
        self.source = source
        self.tables = dict(tables)
        self.timeout_s = timeout_s
        self.progress = progress
        self.records = 0
        self.started = time.monotonic()

    def run(self, handle: Any, after: int, upto: int, phase: str) -> None:
        """Write the source's rows of positions ``after < p <= upto``; a catch-up (``after > 0``)
        replaces the rows of the owners that changed."""
        total = self.source.total(handle, after, upto)
        done = 0
        self.report(phase, done, total)
        for chunk in self.source.changes(handle, after, upto, CHUNK):
            with writer(self.settings.duckdb_path, self.timeout_s) as conn:
                conn.begin()
                for name, table in self.tables.items():
                    keys = chunk.keys.get(name, [])
                    if after > 0 and keys:
                        conn.execute(
                            f'DELETE FROM "{table}" WHERE list_contains(?, "{KEYS[name]}")', [list(keys)]
                        )
                    _insert(conn, table, chunk.rows.get(name, []))
                conn.commit()
            done += chunk.records
            self.records += chunk.records
            self.report(phase, done, total)

    def report(self, phase: str, done: int, total: int) -> None:
        """Call the progress callback (``events``: source records of this phase written)."""
        if self.progress is not None:
            self.progress(progress_of(phase, self.records, self.started, {0: done}, {0: total}, total))


# -- verify and switch -------------------------------------------------------------------------------
def _recount_checksums(source: SagaSource, rows: Rows) -> dict[str, tuple[int, int]]:
    """``{read model: (rows, sum(hash(every column)))}`` of ``rows`` loaded into in-memory tables
    of the read models' shapes."""
    mem = duckdb.connect()
    try:
        out = {}
        for name in source.tables:
            mem.execute(f'CREATE TABLE "{name}" ({COLUMNS[name]})')
            _insert(mem, name, rows.get(name, []))
            out[name] = table_checksum(mem, f'"{name}"')
        return out
    finally:
        mem.close()


def _check(
    conn: duckdb.DuckDBPyConnection,
    source: SagaSource,
    tables: Mapping[str, str],
    expected: Mapping[str, tuple[int, int]],
    position: int,
    live_comparable: bool,
) -> Verification:
    """Compare each build table with the recount (``expected``) and, when ``live_comparable``, with
    the live table; see the module docstring."""
    got: dict[str, tuple[int, int]] = {}
    live: dict[str, tuple[int, int] | None] = {}
    for name, table in tables.items():
        cols = _columns(conn, table)
        got[name] = table_checksum(conn, f'"{table}"', cols)
        live[name] = None
        if live_comparable and relation_kind(conn, name) is not None:
            try:
                live[name] = table_checksum(conn, f'"{physical(conn, name)}"', cols)
            except duckdb.Error:  # another shape: not comparable
                live[name] = (-1, -1)
    bad = [n for n in tables if got[n] != expected[n]]
    live_equal = live_comparable and all(live[n] == got[n] for n in tables)
    total_got = (sum(g[0] for g in got.values()), sum(g[1] for g in got.values()))
    total_expected = (sum(e[0] for e in expected.values()), sum(e[1] for e in expected.values()))
    counts = ", ".join(f"{n} {got[n][0]:,}" for n in tables)
    fresh = f"a fresh projection of {source.what} up to position {position} read another way"
    if bad:
        detail = "; ".join(
            f"{n}: build has {got[n][0]:,} rows (checksum {got[n][1]}), {fresh} gives {expected[n][0]:,} "
            f"(checksum {expected[n][1]})"
            for n in bad
        )
        return Verification("recount", False, total_expected, total_got, detail)
    if live_equal:
        total_live = (sum(v[0] for v in live.values() if v), sum(v[1] for v in live.values() if v))
        detail = (
            f"{counts} rows; row counts and sum(hash(every column)) equal to the live tables at the same "
            f"position {position} and to {fresh}"
        )
        return Verification("live", True, total_live, total_got, detail)
    detail = f"{counts} rows; row counts and sum(hash(every column)) equal to {fresh}"
    if live_comparable:
        differ = ", ".join(f"{n} (live {live[n]}, build {got[n]})" for n in tables if live[n] != got[n])
        detail += (
            f"; the live tables at the same position differ: {differ} — they do not hold what the source "
            "says, the build replaces them"
        )
    return Verification("recount", True, total_expected, total_got, detail)


def _switch(
    conn: duckdb.DuckDBPyConnection, source: SagaSource, build: int, tables: Mapping[str, str], position: int
) -> None:
    """Make build ``build`` the current version of every table of ``source`` (caller's transaction)."""
    live_position = _live_position(conn, source)
    for name, table in tables.items():
        switch_to_build(
            conn, name, table, build, retired_version=VERSION, topic=source.label, source=source.kind,
            retired_stop=_offsets_json(live_position or 0), stop=_offsets_json(position),
        )  # fmt: skip
    conn.execute(POSITIONS_DDL)
    conn.execute("INSERT OR REPLACE INTO saga_projection VALUES (?, ?)", [source.name, position])


def replay_saga_read_model(
    settings: Settings,
    name: str,
    *,
    drop_old: bool = False,
    progress: Callable[[ReplayProgress], None] | None = None,
    db_timeout_s: float = 120.0,
) -> ReplayResult:
    """Rebuild saga read model ``name`` (a key of :data:`SAGA_READ_MODELS`) and the tables
    projected with it from their source, blue/green (module docstring): build, catch up, verify,
    switch. ``progress`` is called after every written chunk (``phase``: ``build``, ``catch-up``,
    ``verify``; ``events``/``total``: source records, i.e. notifications or gateway rows, of the
    phase; ``lag``: ``{0: records left}``) and before verifying; the DuckDB file is not held open
    between calls. ``drop_old`` drops the group's non-current versions after a switch;
    ``db_timeout_s`` bounds each wait for the DuckDB file (s).

    Returns the :class:`~projections.replay.ReplayResult` of ``name`` (its build ``table``;
    ``start``/``stop``: ``{0: 0}``/``{0: position}``, the notification ids ``1..position``;
    ``events``: source records read by this run; ``dropped``: tables of the whole group).
    ``verified=False`` (nothing switched, every build of the group kept as ``failed``) when
    verification found a mismatch.

    Raises:
        ConfigError: ``name`` is not a saga read model, ``BACKBEAT_EVENTSTORE_URL`` is malformed, or
            there is no gateway record to rebuild ``gateway_operations`` from.
        ReplayError: another replay of the same source runs, or the live projection kept moving
            past the build (``5`` catch-ups).
        DatabaseBusyError: the DuckDB file stayed locked for ``db_timeout_s``.
        eventsourcing.persistence.PersistenceError, sqlite3.Error: the source cannot be read.
    """
    if name not in SAGA_READ_MODELS:
        raise ConfigError(f"{name!r} is not a saga read model (one of {', '.join(SAGA_READ_MODELS)})")
    source = SAGA_SOURCES[SAGA_READ_MODELS[name]]
    started = time.monotonic()
    with _lock(settings.duckdb_path, source.name), source.open(settings, True) as handle:
        position = source.end(handle)
        build, tables = _open_build(settings, source, position, db_timeout_s)
        builder = _Builder(settings, source, tables, db_timeout_s, progress)
        builder.run(handle, 0, position, "build")
        verification: Verification | None = None
        for _ in range(_SWITCH_TRIES):
            with reader(settings.duckdb_path, db_timeout_s) as conn:
                live = _live_position(conn, source)
            end = source.end(handle)
            if live is not None and position < live <= end:  # the live projection is further
                builder.run(handle, position, live, "catch-up")
                position = live
            builder.report("verify", 0, 0)
            expected = _recount_checksums(source, source.recount(handle, position))
            with writer(settings.duckdb_path, db_timeout_s) as conn:
                conn.begin()
                now_live = _live_position(conn, source)
                if now_live is not None and position < now_live <= source.end(handle):
                    conn.rollback()
                    continue  # the live projection moved on meanwhile: catch up again
                comparable = now_live == position and source.end(handle) == position
                verification = _check(conn, source, tables, expected, position, comparable)
                if verification.ok:
                    _switch(conn, source, build, tables, position)
                else:
                    conn.execute(
                        f"UPDATE {BUILDS_TABLE} SET state = 'failed', note = ? "
                        "WHERE list_contains(?, projection) AND build = ?",
                        [verification.detail, list(tables), build],
                    )
                conn.commit()
            break
        else:
            raise ReplayError(
                f"the live projection of {', '.join(source.tables)} kept moving past build {build} "
                f"({_SWITCH_TRIES} catch-ups); run the replay again when the sagas are quieter"
            )
        assert verification is not None
        dropped: list[str] = []
        if drop_old and verification.ok:
            for table in source.tables:
                dropped += drop_old_versions(settings, table, timeout_s=db_timeout_s)
    seconds = time.monotonic() - started
    return ReplayResult(
        name=name,
        version=VERSION,
        build=build,
        table=tables[name],
        events=builder.records,
        seconds=seconds,
        events_per_s=builder.records / seconds if seconds > 0 else 0.0,
        verified=verification.ok,
        switched=verification.ok,
        verification=verification,
        start={0: 0},
        stop={0: position},
        dropped=dropped,
    )


__all__ = [
    "COLUMNS",
    "SAGA_READ_MODELS",
    "SAGA_SOURCES",
    "SagaSource",
    "forget_saga_read_models",
    "inventory_rows",
    "project_copies",
    "replay_saga_read_model",
]
