"""The ``sagas`` read model: the orchestrator's event store projected into DuckDB.

Tables (in backbeat's read-model DuckDB file, beside the other read models):

- ``sagas(saga_id, kind, state, business_id, user_id, payment_id, amount_minor, currency,
  reason, requested_at, started_at, ended_at, duration_ms, retries, version)`` — one row per
  saga, its current state; ``duration_ms`` is request (the start event's ``occurred_at``) to
  end, in ms;
- ``saga_events(saga_id, version, event, recorded_at, step, detail)`` — every stored event of
  every saga (its history, for SQL);
- ``saga_order_lines(saga_id, order_id, sku, quantity)`` — the lines of order sagas;
- ``saga_projection(store, notification_id)`` — how far the notification log was projected,
  written in the same transaction as the rows, so a killed projection resumes exactly.

The projection reads the notification log after its position, reloads every saga that changed
and replaces its rows. If the event store is new (its last notification id is below the
stored position) the tables are rebuilt from scratch.

Once ``backbeat replay`` has rebuilt these tables blue/green (:mod:`sagas.replay`), each name is a
view over the current version's table (``sagas__v1_b2``…, :func:`projections.tracking.current_build`):
the projection writes into that table (:func:`physical`), never into the view.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import duckdb

from infra.errors import BackbeatError
from infra.settings import Settings
from projections.store import reader
from projections.tracking import current_build
from sagas.saga import Saga

#: Column definitions of each table (its ``CREATE TABLE`` body): the live tables and the replay's
#: build tables (:mod:`sagas.replay`) are created from them.
COLUMNS = {
    "sagas": """saga_id VARCHAR PRIMARY KEY, kind VARCHAR, state VARCHAR, business_id VARCHAR,
    user_id VARCHAR, payment_id VARCHAR, amount_minor BIGINT, currency VARCHAR, reason VARCHAR,
    requested_at TIMESTAMP, started_at TIMESTAMP, ended_at TIMESTAMP, duration_ms BIGINT,
    retries INTEGER, version INTEGER""",
    "saga_events": """saga_id VARCHAR, version INTEGER, event VARCHAR, recorded_at TIMESTAMP, step VARCHAR,
    detail VARCHAR, PRIMARY KEY (saga_id, version)""",
    "saga_order_lines": "saga_id VARCHAR, order_id VARCHAR, sku VARCHAR, quantity INTEGER",
}
POSITIONS_DDL = (
    "CREATE TABLE IF NOT EXISTS saga_projection (store VARCHAR PRIMARY KEY, notification_id BIGINT);"
)
DDL = "\n".join(f"CREATE TABLE IF NOT EXISTS {t} ({c});" for t, c in COLUMNS.items()) + "\n" + POSITIONS_DDL

#: The version of the mapping from events to rows (bump it when :func:`saga_row`/:func:`event_row`
#: change: a replay then builds ``<table>__v<version>_b<n>``).
VERSION = 1

TABLES = ("sagas", "saga_events", "saga_order_lines", "saga_projection")
STORE = "orchestrator"


def physical(con: duckdb.DuckDBPyConnection, name: str) -> str:
    """The table that holds read model ``name``: the current replay build's table when ``name`` is a
    view made by a replay (:func:`projections.tracking.current_build`), else ``name`` itself."""
    found = current_build(con, name)
    return found[0] if found is not None else name


def _ts(ms: int | None) -> datetime | None:
    return None if ms is None else datetime.fromtimestamp(ms / 1000, UTC).replace(tzinfo=None)


def saga_row(saga: Saga) -> tuple[Any, ...]:
    """The ``sagas`` row of one saga (column order of the table)."""
    d = saga.data
    duration = None if saga.ended_ms is None else saga.ended_ms - saga.requested_ms
    return (
        saga.saga_id, saga.kind, saga.state, saga.business_id, d.get("user_id"), d.get("payment_id"),
        d.get("amount_minor"), d.get("currency"), saga.reason, _ts(saga.requested_ms), _ts(saga.started_ms),
        _ts(saga.ended_ms), duration, saga.retries, saga.version,
    )  # fmt: skip


_SKIP = {"originator_id", "originator_version", "timestamp", "originator_topic", "outbox", "data"}


def event_row(saga_id: str, event: Any) -> tuple[Any, ...]:
    """The ``saga_events`` row of one stored event: its class name, the step it concerns, and
    its other attributes as JSON (``detail``), with the messages it sent by type."""
    attrs = {k: v for k, v in vars(event).items() if k not in _SKIP}
    outbox = getattr(event, "outbox", None) or []
    if outbox:
        attrs["sent"] = [m["event_type"] for m in outbox]
    ts = event.timestamp
    recorded = ts.astimezone(UTC).replace(tzinfo=None) if isinstance(ts, datetime) else None
    return (
        saga_id, int(event.originator_version), type(event).__name__, recorded,
        attrs.get("step"), json.dumps(attrs, default=str, sort_keys=True),
    )  # fmt: skip


def saga_rows(
    saga: Saga, history: Any
) -> tuple[tuple[Any, ...], list[tuple[Any, ...]], list[tuple[Any, ...]]]:
    """The rows of one saga: its ``sagas`` row, its ``saga_events`` rows (``history``: its stored
    events, in version order) and its ``saga_order_lines`` rows (none unless an order saga)."""
    sid = saga.saga_id
    lines = (
        [(sid, saga.business_id, x["sku"], x["quantity"]) for x in saga.data.get("lines", [])]
        if saga.kind == "order"
        else []
    )
    return saga_row(saga), [event_row(sid, e) for e in history], lines


def write_sagas(
    con: duckdb.DuckDBPyConnection, tables: dict[str, str], rows: Any, *, replace_rows: bool = True
) -> None:
    """Write the rows of some sagas (``rows``: an iterable of :func:`saga_rows` results) into the
    physical ``tables`` (``{read model name: table}``), inside the caller's transaction; with
    ``replace_rows`` each saga's old rows are deleted first."""
    for row, history, lines in rows:
        sid = row[0]
        if replace_rows:
            for name in COLUMNS:
                con.execute(f'DELETE FROM "{tables[name]}" WHERE saga_id = ?', [sid])
        con.execute(f'INSERT INTO "{tables["sagas"]}" VALUES ({", ".join("?" * 15)})', list(row))
        if history:
            con.executemany(f'INSERT INTO "{tables["saga_events"]}" VALUES (?, ?, ?, ?, ?, ?)', history)
        if lines:
            con.executemany(f'INSERT INTO "{tables["saga_order_lines"]}" VALUES (?, ?, ?, ?)', lines)


def project_sagas(app: Any, con: duckdb.DuckDBPyConnection, *, page: int = 5_000) -> int:
    """Bring the tables up to date with ``app`` (an :class:`sagas.orchestrator.Orchestrator`)
    in one transaction per page of notifications. Returns how many sagas were (re)written.
    After a replay the rows go into the current version's tables (:func:`physical`)."""
    con.execute(DDL)
    row = con.execute("SELECT notification_id FROM saga_projection WHERE store = ?", [STORE]).fetchone()
    position = int(row[0]) if row else 0
    last = int(app.recorder.max_notification_id() or 0)
    if last < position:  # a new event store: rebuild
        con.execute("BEGIN")
        for name in COLUMNS:
            con.execute(f'DELETE FROM "{physical(con, name)}"')
        con.execute("DELETE FROM saga_projection WHERE store = ?", [STORE])
        con.execute("COMMIT")
        position = 0
    written = 0
    while True:
        notes = app.recorder.select_notifications(start=position + 1, limit=page)
        if not notes:
            return written
        changed = {note.originator_id for note in notes}
        sagas = [s for s in (app.repository.get(i) for i in changed) if isinstance(s, Saga)]
        con.execute("BEGIN")
        try:
            tables = {name: physical(con, name) for name in COLUMNS}
            write_sagas(con, tables, (saga_rows(s, app.events.get(s.id)) for s in sagas))
            position = int(notes[-1].id)
            con.execute("INSERT OR REPLACE INTO saga_projection VALUES (?, ?)", [STORE, position])
            con.execute("COMMIT")
        except BaseException:
            con.execute("ROLLBACK")
            raise
        written += len(sagas)


# -- reading (the HTTP API's GET /sagas/{id}) -----------------------------------------------------
class NoSagasReadModelError(BackbeatError):
    """There is no ``sagas`` read model in the DuckDB file yet."""


class UnknownSagaError(BackbeatError):
    """No saga has this id (or business id) in the ``sagas`` read model."""


def _named(cursor: duckdb.DuckDBPyConnection) -> list[dict[str, Any]]:
    names = [d[0] for d in cursor.description or []]
    return [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]


def read_saga(settings: Settings, key: str, timeout_s: float = 30.0) -> dict[str, Any]:
    """One saga from the read model, found by its saga id (UUID text) or its business id (a
    subscription or order id): ``{"saga": {column: value} (the ``sagas`` row; times naive UTC
    ``datetime``, ``duration_ms`` in ms), "events": [{version, event, recorded_at, step, detail}]
    (``detail`` parsed from its JSON), "order_lines": [{order_id, sku, quantity}]}``. Read through
    :func:`projections.store.reader`, so it answers while the projection writes.

    Raises:
        NoReadModelsError: there is no DuckDB file yet.
        NoSagasReadModelError: the ``sagas`` read model was never projected.
        UnknownSagaError: no saga has ``key`` as its id or business id.
        DatabaseBusyError: a writer held the file for ``timeout_s`` seconds.
    """
    with reader(settings.duckdb_path, timeout_s) as con:
        present = {
            r[0]
            for r in con.execute(
                "SELECT table_name FROM duckdb_tables() UNION SELECT view_name FROM duckdb_views()"
            ).fetchall()
        }
        if not {"sagas", "saga_events", "saga_order_lines"} <= present:
            raise NoSagasReadModelError(
                f"there is no sagas read model in {settings.duckdb_path} yet: it is written by "
                "'backbeat sagas run' (or 'backbeat sagas list', which projects the event store first)"
            )
        found = _named(
            con.execute(
                "SELECT * FROM sagas WHERE saga_id = $k OR business_id = $k ORDER BY saga_id = $k DESC, "
                "requested_at DESC LIMIT 1",
                {"k": key},
            )
        )
        if not found:
            raise UnknownSagaError(
                f"no saga {key!r} in the sagas read model (neither a saga id nor a subscription or order "
                "id); 'backbeat sagas list' shows the sagas there"
            )
        saga = found[0]
        sid = saga["saga_id"]
        events = _named(
            con.execute(
                "SELECT version, event, recorded_at, step, detail FROM saga_events WHERE saga_id = ? "
                "ORDER BY version",
                [sid],
            )
        )
        lines = _named(
            con.execute(
                "SELECT order_id, sku, quantity FROM saga_order_lines WHERE saga_id = ? ORDER BY sku", [sid]
            )
        )
    for e in events:
        e["detail"] = json.loads(e["detail"]) if e["detail"] else None
    return {"saga": saga, "events": events, "order_lines": lines}
