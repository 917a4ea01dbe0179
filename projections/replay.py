"""Blue/green replay: rebuild a read model from the log beside the live one, verify it, then switch
readers to it atomically (docs/design.md §3 "Replay"; ``backbeat replay``; docs/replay.md says
exactly what is verified).

How a replay runs (:func:`replay`):

1. **Build.** A new version of the read model gets its own table ``<name>__v<version>_b<build>``
   and a row in ``projection_builds`` (:data:`projections.tracking.BUILDS_TABLE`: build number,
   version, table, source, state, requested start and stop offsets as JSON), with its plan
   (:data:`PLAN_TABLE`: the cut, the ``--from``/``--to`` given), its coverage
   (:data:`COVERAGE_TABLE`) and its digest (:data:`TALLY_TABLE`). Its progress is tracked in
   ``projection_offsets`` under the build's table name (and its rejects in
   ``projection_rejects`` likewise), so it never touches the live read model's offsets. Records
   ``[start, stop)`` per partition are read (through :func:`events.log.read_batches`, or from the
   Parquet archive through :func:`projections.archive.iter_archive`), decoded and mapped by the
   projection code itself (:class:`~projections.decoding.BatchPreparer`,
   :func:`~projections.apply.apply_batch` with the projection renamed to the build table). The
   build only appends (``apply_batch(append=True)``): every mapped row goes in as it is, and the
   projection's policy (first or last row of a key) is applied once at the end by
   :func:`~projections.apply.dedupe`, so no batch scans the rows before it. Batches read are
   gathered into writes of at least :data:`WRITE_ROWS` rows, each one DuckDB transaction (rows,
   rejects, offsets, digest, coverage), written on a writer thread while the next records are read
   and decoded; the file stays open across writes (:class:`~projections.store.WriterSession`),
   closed whenever a reader (``backbeat sql``) waits at the turnstile.
2. **Resume.** A replay killed mid-way leaves its build ``building``; running ``replay`` again for
   the same projection and version resumes it where its coverage ends (same range, same plan).
3. **Catch up.** Before switching, the build is extended to the live read model's stored offsets
   where they are further (a runner may have kept going), so a switch never moves the read model
   back and a running runner carries on without a gap. That extension is the default's
   (``--to`` not given) and is reported (:attr:`ReplayResult.requested_stop`); an explicit
   ``--to`` is extended only with ``catch_up=True`` (``--catch-up``), else the replay stops
   with :class:`ReplayError` and keeps the build.
4. **Verify**, in this order; the first failure stops the switch:

   a. *Coverage* (:class:`Coverage`): every offset of every partition's range ``[start, stop)``
      was read, each once and in order, from the source itself: the first record read of a
      partition is at the position the build stood at, each next one at the offset after the
      previous, and the last at ``stop - 1``. Offsets the source moved past without a record
      (Kafka only: transaction markers, compacted records, a partition's end) are *skipped*
      and refused unless ``allow_log_gaps``; offsets the source never reached (an archive that
      ends early, :func:`archive_batches`) are *not read*; either way the message names the
      partition and the offsets, and the build stays ``building`` (run again to resume).
   b. *Digest* of the source: each write adds to the build's :data:`TALLY_TABLE` the row count
      and ``sum(hash(every column))`` of the rows the mapping produced from the records read
      (before the write path: redelivery filter, insert), ``kafka_partition``/``kafka_offset``
      included. The build table's rows before the dedupe must give exactly these two figures
      (:func:`~projections.apply.dedupe` computes them in its transaction): a row lost by the
      write path (a skipped offset), written twice, or with any value different from what was
      mapped fails here (``mode="digest"``).
   c. *Content.* When the live read model has the same version, was built from the start of the
      log, the build is a full one and both stand at the same offsets: row counts and
      ``sum(hash(columns))`` (every column but ``kafka_partition``/``kafka_offset``) must match
      (``mode="live"``). Otherwise a recount (``mode="recount"``): the build must hold exactly
      one row per distinct key of the rows appended (count and ``sum(hash(key))``), as counted
      by the dedupe before it deletes. ``recount_source=True`` reads and decodes the range a
      second time for the keys instead (:func:`_recount`).

   On a digest or content mismatch nothing is switched: the build is marked ``failed`` and kept
   beside the live one.
5. **Switch.** In one DuckDB transaction: the first time, the live table is renamed
   ``<name>__v<old version>_b0`` (recorded as build 0); the name becomes
   ``CREATE OR REPLACE VIEW <name> AS SELECT * FROM <build table>``; the build becomes
   ``current`` (the previous one ``old``); the read model's offsets, version and rejects become
   the build's. Readers keep querying ``<name>``; the runner writes into the current version's
   table (:func:`projections.tracking.current_build`, looked up per batch by
   :func:`~projections.apply.apply_batch`). Old versions stay until :func:`drop_old_versions`.
   A lake read model whose version changed also gets its Parquet lake rewritten: the build's
   rows are written under ``<lake>/<build table>/`` before the switch and
   ``<lake>/<name>`` points at them after it (:mod:`projections.lake`, "Versions").

Partial replays (``--from`` other than ``earliest``) are *merged* with the live read model, so
the read model after the switch still holds every row: ``--from P:O,…`` takes the live rows of
records before those offsets and replays the records from them; ``--from TIME`` takes the live
rows whose event time (:func:`time_column`) is before TIME and replays every row whose event time
is at or after it, from the first offset of each partition that can hold one (found in the live
read model's own ``kafka_offset`` and time columns, and its rejects: the embedded broker's
``offsets_for_times`` is wrong, docs/broker.md §3). Rows the live read model does not have
(records past its offsets, or that it rejected) are replayed whatever their time. A read model
that cannot be merged (no live version, another version or topic, no event-time column, a cut
past the live offsets) is refused with the reason. ``--to TIME`` stops each partition right after
its last record whose row's event time is before TIME.

Stateful read models (``recommendations``, :data:`projections.runner.STATEFUL`) are rebuilt whole
(``--from earliest`` only) into a separate DuckDB file and switched by renaming their tables in one
transaction: :mod:`projections.replay_stateful`. The saga read models (``sagas``,
``saga_events``, ``saga_order_lines``, ``gateway_operations``, ``inventory_reservations``,
``inventory_stock``) are rebuilt from their stores: :mod:`sagas.replay`.
"""

from __future__ import annotations

import fcntl
import json
import os
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from events.log import wait_out
from events.offsets import high_watermarks
from events.registry_client import registry_for
from events.serde import AvroDecoder
from infra.errors import BackbeatError, ConfigError, InfraError
from infra.settings import Settings
from projections import lake
from projections.apply import Deduped, apply_batch, dedupe, row_checksum
from projections.decoding import BatchPreparer, Prepared
from projections.readmodels import OFFSET_COL, PARTITION_COL, Projection, get_projection
from projections.replay_source import (
    ARCHIVE_WAIT_S,
    COVERAGE_DDL,
    COVERAGE_TABLE,
    SOURCES,
    Batches,
    Coverage,
    archive_batches,
    archive_functions,
    batches_for,
    is_time,
    kafka_batches,
    load_coverage,
    parse_time,
    resolve_position,
    save_coverage,
    time_column,
)
from projections.store import WriterSession, reader, writer
from projections.tracking import (
    BOOKKEEPING_DDL,
    BUILDS_TABLE,
    OFFSETS_TABLE,
    REJECTS_TABLE,
    VERSIONS_TABLE,
    LogIdentity,
    current_build,
    load_offsets,
    log_identity,
    now_utc,
    relation_kind,
    save_offsets,
    switch_to_build,
)

#: DuckDB's memory limit in a replay's process while deduplicating and verifying (its default is
#: 80 % of RAM): above it, DuckDB spills the dedupe's GROUP BY to its temporary directory.
_DUCKDB_MEMORY = "256MB"
#: DuckDB's memory limit while building. The file stays open across writes, so without a cap
#: DuckDB's block cache keeps the appended blocks and grows with the build (measured: +170 MiB of
#: peak RSS from 1M to 5M listens at 256 MB). Appends read nothing back, so a small cache costs
#: nothing: at 64 MB the peak is the same at 1M and 5M.
_BUILD_MEMORY = "64MB"
#: Rows per build transaction, at least: DuckDB's row group size (122,880 rows, "Storage" in the
#: DuckDB docs). An insert of a full row group is written straight to the database file
#: ("optimistic writing") instead of the WAL and then again at the checkpoint; measured on the
#: 1M-listens benchmark, 50k-row transactions spent a fifth of the build in COMMIT.
WRITE_ROWS = 122_880
#: Rows per Parquet row group when a replay rewrites a read model's lake (a version bump).
_LAKE_ROWS = 250_000
#: The digest of what each build's mapping produced from the records it read: ``(rows,
#: sum(hash(every column)))`` per build table, created with the build and added to in each
#: write's transaction from the rows as mapped, before the write path (plus the live rows a
#: partial replay took over). Checked against the build table before the dedupe (:func:`_verify`),
#: then kept less what the dedupe deleted.
TALLY_TABLE = "projection_build_tally"
_TALLY_DDL = f"""CREATE TABLE IF NOT EXISTS {TALLY_TABLE} (
  build_table VARCHAR PRIMARY KEY, "rows" BIGINT NOT NULL, row_sum HUGEINT NOT NULL)"""
#: What each build was asked for: ``start_spec``/``stop_spec`` as given (``''``: not given);
#: ``cut``: ``none`` (a full build), ``offsets`` or ``time`` (merged with the live read model);
#: ``cut_time``; ``live_offsets`` (JSON, the live read model's offsets when the build took its
#: rows over); ``kept`` (JSON ``{partition: [offsets]}``, records the live read model had
#: rejected, replayed whatever their time); ``copied``: rows taken over from the live read model.
PLAN_TABLE = "projection_build_plan"
_PLAN_DDL = f"""CREATE TABLE IF NOT EXISTS {PLAN_TABLE} (
  build_table VARCHAR PRIMARY KEY, start_spec VARCHAR NOT NULL, stop_spec VARCHAR NOT NULL,
  cut VARCHAR NOT NULL, cut_time TIMESTAMP, live_offsets VARCHAR NOT NULL, kept VARCHAR NOT NULL,
  copied BIGINT NOT NULL)"""
_BUILD_DDL = (*BOOKKEEPING_DDL, _TALLY_DDL, COVERAGE_DDL, _PLAN_DDL)


class ReplayError(BackbeatError):
    """A replay cannot go on (another replay of the projection runs, the live runner kept moving,
    the live runner is past an explicit ``--to``)."""


@dataclass(frozen=True)
class ReplayProgress:
    """Reported after every committed write. ``phase``: ``build``, ``catch-up``, ``verify`` or
    ``wait-archive`` (waiting for the archiver); ``events``: records of the build's range read so
    far (a resumed build counts what it had); ``total``: records in the range; ``events_per_s``:
    records per second of this run; ``lag``: records left per partition; ``eta_s``: seconds left
    at this rate (``None`` before a rate)."""

    phase: str
    events: int
    total: int
    events_per_s: float
    lag: dict[int, int]
    eta_s: float | None


@dataclass(frozen=True)
class Verification:
    """How a build was checked. ``mode``: ``coverage`` (offsets not read, skipped or repeated),
    ``digest`` (the build's rows differ from what the mapping produced from the records read),
    ``live`` (compared with the live read model) or ``recount`` (one row per distinct key of the
    source range); ``expected``/``got``: ``(rows or offsets, checksum)``; ``detail``: a sentence
    for people."""

    mode: str
    ok: bool
    expected: tuple[int, int]
    got: tuple[int, int]
    detail: str


@dataclass(frozen=True)
class ReplayResult:
    """What :func:`replay` did. ``events``: records read by this run; ``seconds``: its wall time;
    ``events_per_s``: their ratio; ``verified``/``switched``: whether the build passed and readers
    now see it; ``version``/``build``/``table``: the new version; ``start``/``stop``:
    ``{partition: offset}`` of the range (``stop`` exclusive, after any catch-up);
    ``requested_stop``: the stop asked for (or the default's), before the catch-up; ``resumed``:
    an interrupted build was continued; ``resumable``: not switched, but the build is kept
    ``building`` and the same command resumes it (coverage incomplete); ``copied``: rows of a
    partial replay taken over from the live read model; ``lake_files``: Parquet files written for
    a version's new lake; ``dropped``: tables dropped by ``drop_old``."""

    name: str
    version: int
    build: int
    table: str
    events: int
    seconds: float
    events_per_s: float
    verified: bool
    switched: bool
    verification: Verification
    start: dict[int, int]
    stop: dict[int, int]
    resumed: bool = False
    dropped: list[str] = field(default_factory=list)
    requested_stop: dict[int, int] = field(default_factory=dict)
    resumable: bool = False
    copied: int = 0
    lake_files: int = 0

    @property
    def extended(self) -> bool:
        """True when the catch-up took the build past the stop asked for."""
        return any(self.stop.get(p, 0) > o for p, o in self.requested_stop.items())


@dataclass(frozen=True)
class Plan:
    """A build's plan (:data:`PLAN_TABLE`): the specs given, the cut and what it took over."""

    start_spec: str = ""
    stop_spec: str = ""
    cut: str = "none"
    cut_time: datetime | None = None
    live_offsets: dict[int, int] = field(default_factory=dict)
    kept: dict[int, list[int]] = field(default_factory=dict)
    copied: int = 0


@dataclass(frozen=True)
class _Build:
    build: int
    version: int
    table: str
    start: dict[int, int]
    stop: dict[int, int]
    resumed: bool
    plan: Plan = field(default_factory=Plan)


# -- the live read model -----------------------------------------------------------------------------
def _live_offsets(conn: duckdb.DuckDBPyConnection, name: str, topic: str) -> dict[int, int]:
    if relation_kind(conn, OFFSETS_TABLE) is None:
        return {}
    return {p: s.next_offset for (_, t, p), s in load_offsets(conn, [name]).items() if t == topic}


def _live_version(conn: duckdb.DuckDBPyConnection, name: str) -> tuple[int, str] | None:
    if relation_kind(conn, VERSIONS_TABLE) is None:
        return None
    rows = conn.execute(
        f"SELECT version, topic FROM {VERSIONS_TABLE} WHERE projection = ?", [name]
    ).fetchall()
    return (int(rows[0][0]), str(rows[0][1])) if rows else None


def _columns(conn: duckdb.DuckDBPyConnection, relation: str) -> list[str]:
    return [str(r[0]) for r in conn.execute(f'DESCRIBE "{relation}"').fetchall()]


def offsets_before(
    settings: Settings,
    projection: Projection,
    when: datetime,
    marks: Mapping[int, int],
    read: Callable[..., Batches],
    lookup: Callable[[int], dict[str, Any]],
) -> tuple[dict[int, int], str]:
    """``--to TIME``: per partition, the offset right after its last record whose row's event
    time (:func:`time_column`) is before ``when`` (naive UTC), so every such record is in
    ``[0, offset)`` (records with later times that lie before it come with it: a read model's
    position is an offset); 0 for a partition with none. And how it was found: ``index`` (the
    live read model's ``kafka_offset`` and time columns for the offsets it has applied, when it
    has this version and topic, then a scan of the rest) or ``scan`` (the topic decoded with the
    projection's code from offset 0). Never the broker's ``offsets_for_times`` (docs/broker.md §3).

    Raises:
        ConfigError: the projection has no event-time column.
    """
    col = time_column(projection)
    if col is None:
        raise ConfigError(f"{projection.name} has no event-time column: give --to as offsets (P:O,…)")
    found: dict[int, int] = {}
    scan_from = {p: 0 for p in marks}
    how = "scan"
    if settings.duckdb_path.exists():
        with reader(settings.duckdb_path) as conn:
            live = _live_version(conn, projection.name)
            if live == (projection.version, projection.topic) and relation_kind(conn, projection.name):
                if col in _columns(conn, projection.name):
                    ends = _live_offsets(conn, projection.name, projection.topic)
                    rows = conn.execute(
                        f'SELECT "{PARTITION_COL}", max("{OFFSET_COL}") FROM "{projection.name}" '
                        f'WHERE "{col}" < ? GROUP BY 1',
                        [when],
                    ).fetchall()
                    found = {int(p): int(o) for p, o in rows}
                    scan_from = {p: min(ends.get(p, 0), marks[p]) for p in marks}
                    how = "index"
    preparer = BatchPreparer({projection.topic: projection}, lookup)
    cutoff = pa.scalar(when, pa.timestamp("ms"))
    if any(scan_from[p] < marks[p] for p in marks):
        for msgs, _ in read(settings, projection.topic, scan_from, marks, 50_000):
            table = preparer.prepare(msgs).tables.get(projection.name) if msgs else None
            if table is None or table.num_rows == 0:
                continue
            early = table.filter(pc.fill_null(pc.less(table[col], cutoff), False))
            for p, o in zip(early[PARTITION_COL].to_pylist(), early[OFFSET_COL].to_pylist(), strict=True):
                found[p] = max(o, found.get(p, o))
    return {p: found[p] + 1 if p in found else 0 for p in marks}, how


# -- verification ------------------------------------------------------------------------------------
def _content_columns(conn: duckdb.DuckDBPyConnection, table: str) -> list[str]:
    return [c for c in _columns(conn, table) if c not in (PARTITION_COL, OFFSET_COL)]


def table_checksum(
    conn: duckdb.DuckDBPyConnection, relation: str, columns: Sequence[str] | None = None
) -> tuple[int, int]:
    """``(rows, sum of hash(columns))`` of ``relation`` (SQL: a quoted, possibly qualified table
    name), every column when ``columns`` is ``None``: an order-independent fingerprint."""
    if columns is None:
        columns = [str(r[0]) for r in conn.execute(f"DESCRIBE {relation}").fetchall()]
    cols = ", ".join(f'"{c}"' for c in columns)
    row = conn.execute(f"SELECT count(*), coalesce(sum(hash({cols})), 0) FROM {relation}").fetchall()[0]
    return int(row[0]), int(row[1])


def _recount(
    settings: Settings,
    projection: Projection,
    read: Callable[..., Batches],
    start: Mapping[int, int],
    stop: Mapping[int, int],
    lookup: Callable[[int], dict[str, Any]],
    rejected: set[tuple[int, int]],
    batch_size: int,
) -> tuple[int, int]:
    """``(distinct keys, sum of hash(key))`` of the records ``[start, stop)`` as read by a second,
    raw pass over the source (Avro decoded here; the row filter and row mapping applied)."""
    keys = [next(c for c in projection.columns if c.name == k) for k in projection.key_columns]
    values: list[list[Any]] = [[] for _ in keys]
    decoder = AvroDecoder(lookup)
    for msgs, _ in read(settings, projection.topic, start, stop, batch_size):
        if rejected:
            msgs = [m for m in msgs if (m.partition(), m.offset()) not in rejected]
        payloads = [m.value() for m in msgs]
        what = f"recount {projection.name}"
        events, _ = wait_out(lambda p=payloads: decoder.decode_many(p), what=what)
        for value, event in zip(payloads, events, strict=True):
            if event is None:  # a reject of the build, or a control record (empty value)
                continue
            event_type = decoder.type_of(int.from_bytes(value[1:5], "big"))  # type: ignore[index]
            if event_type not in projection.event_types:
                continue
            if projection.where is not None and not projection.where.accepts(event):
                continue
            items = projection.rows(event_type, event) if projection.rows is not None else [event]
            for item in items:
                for i, col in enumerate(keys):
                    values[i].append(item.get(col.source))
    arrays = [pc.cast(pa.array(v, c.source_type), c.type) for v, c in zip(values, keys, strict=True)]
    names = [c.name for c in keys]
    mem = duckdb.connect()
    try:
        mem.register("bb_keys", pa.Table.from_arrays(arrays, names=names))
        cols = ", ".join(f'"{c}"' for c in names)
        got = mem.execute(
            f"SELECT count(*), coalesce(sum(hash({cols})), 0) FROM (SELECT DISTINCT {cols} FROM bb_keys)"
        ).fetchall()[0]
    finally:
        mem.close()
    return int(got[0]), int(got[1])


def _build_keys(conn: duckdb.DuckDBPyConnection, projection: Projection, table: str) -> tuple[int, int]:
    cols = ", ".join(f'"{c}"' for c in projection.key_columns)
    row = conn.execute(
        f'SELECT count(*), coalesce(sum(hash({cols})), 0), count(DISTINCT ({cols})) FROM "{table}"'
    ).fetchall()[0]
    rows, checksum, distinct = int(row[0]), int(row[1]), int(row[2])
    return (rows, checksum) if rows == distinct else (rows, -1)


# -- builds ------------------------------------------------------------------------------------------
def _projection(name: str, override: Projection | None) -> Projection:
    from projections.runner import STATEFUL  # noqa: PLC0415 (runner imports much; only needed here)

    proj = override or (STATEFUL[name][0] if name in STATEFUL else get_projection(name))
    if proj.name != name:
        raise ConfigError(f"the projection given is {proj.name!r}, not {name!r}")
    if "__" in name:
        raise ConfigError(f"{name!r}: read-model names with '__' are reserved for replay builds")
    return proj


def _is_stateful(name: str) -> bool:
    from projections.runner import STATEFUL  # noqa: PLC0415

    return name in STATEFUL


def _offsets_json(offsets: Mapping[int, int]) -> str:
    return json.dumps({str(p): int(o) for p, o in sorted(offsets.items())})


def _offsets_of(text: str) -> dict[int, int]:
    return {int(p): int(o) for p, o in json.loads(text).items()}


def _building(conn: duckdb.DuckDBPyConnection, name: str) -> tuple[Any, ...] | None:
    rows = conn.execute(
        f"SELECT build, version, table_name, topic, source, start_offsets, stop_offsets FROM {BUILDS_TABLE} "
        "WHERE projection = ? AND state = 'building' ORDER BY build DESC",
        [name],
    ).fetchall()
    return rows[0] if rows else None


def _load_plan(conn: duckdb.DuckDBPyConnection, table: str) -> Plan:
    rows = conn.execute(
        f"SELECT start_spec, stop_spec, cut, cut_time, live_offsets, kept, copied FROM {PLAN_TABLE} "
        "WHERE build_table = ?",
        [table],
    ).fetchall()
    if not rows:  # a build begun by an older backbeat: a full build
        return Plan()
    start_spec, stop_spec, cut, cut_time, live, kept, copied = rows[0]
    return Plan(
        str(start_spec), str(stop_spec), str(cut), cut_time, _offsets_of(live),
        {int(p): [int(o) for o in offs] for p, offs in json.loads(kept).items()}, int(copied),
    )  # fmt: skip


def _save_plan(conn: duckdb.DuckDBPyConnection, table: str, plan: Plan) -> None:
    conn.execute(
        f"INSERT OR REPLACE INTO {PLAN_TABLE} VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        [table, plan.start_spec, plan.stop_spec, plan.cut, plan.cut_time, _offsets_json(plan.live_offsets),
         json.dumps({str(p): offs for p, offs in sorted(plan.kept.items())}), plan.copied],
    )  # fmt: skip


def _cut_of(start: str | None) -> str:
    """``none`` (a full build from offset 0), ``offsets`` or ``time`` for a ``--from`` spec."""
    if start is None or start.strip().lower() == "earliest":
        return "none"
    return "time" if is_time(start) else "offsets"


def _merge_live(
    conn: duckdb.DuckDBPyConnection,
    proj: Projection,
    table: str,
    start: str,
    marks: Mapping[int, int],
) -> tuple[dict[int, int], Plan]:
    """A partial replay's start (``{partition: offset}``) and plan, taking over into build
    ``table`` (inside the caller's transaction) the live read model's rows and rejects that the
    replay will not produce: ``--from P:O,…`` the rows of records before those offsets; ``--from
    TIME`` the rows whose event time is before TIME (the replay then keeps, of the records it
    reads, the rows at or after TIME, and every row of a record the live model rejected or had not
    reached). Module docstring, "Partial replays".

    Raises:
        ConfigError: the read model cannot be merged (no live version of the same version and
            topic, no event-time column, a cut past the live read model's offsets); the reason is
            in the message.
    """
    name, cut = proj.name, _cut_of(start)
    live_version = _live_version(conn, name)
    refuse = f"cannot replay {name} --from {start} on top of the live read model"
    if live_version is None or relation_kind(conn, name) is None:
        raise ConfigError(f"{refuse}: there is none; replay it whole (--from earliest)")
    if live_version != (proj.version, proj.topic):
        raise ConfigError(
            f"{refuse}: the live read model is version {live_version[0]} of {live_version[1]}, the replay "
            f"builds version {proj.version} of {proj.topic}, and rows of two mappings cannot be merged; "
            "replay it whole (--from earliest)"
        )
    live = {p: min(o, marks.get(p, o)) for p, o in _live_offsets(conn, name, proj.topic).items()}
    live = {p: live.get(p, 0) for p in marks}
    cols = ", ".join(f'"{c}"' for c in _columns(conn, table))
    if cut == "offsets":
        begin = resolve_position(start, marks, live, lambda _: dict(live))
        past = {p: o for p, o in begin.items() if o > live[p]}
        if past:
            raise ConfigError(
                f"{refuse}: the cut {_offsets_json(past)} is past the live read model's offsets "
                f"{_offsets_json(live)}: it has no rows there to keep; wait for the runner or cut earlier"
            )
        before = " OR ".join(f'("{PARTITION_COL}" = {p} AND "{OFFSET_COL}" < {o})' for p, o in begin.items())
        keep, cut_time, kept = before or "false", None, {}
    else:
        cut_time = parse_time(start)
        col = time_column(proj)
        if col is None or col not in _columns(conn, name):
            raise ConfigError(
                f"{refuse}: it has no event-time column to cut at; give --from as offsets (P:O,…)"
            )
        found = conn.execute(
            f'SELECT "{PARTITION_COL}", min("{OFFSET_COL}") FROM "{name}" '
            f'WHERE NOT coalesce("{col}" < ?, false) GROUP BY 1',
            [cut_time],
        ).fetchall()
        first = {int(p): int(o) for p, o in found}
        begin = {p: min(first.get(p, live[p]), live[p]) for p in marks}
        keep = f'coalesce("{col}" < $cut, false)'
        kept = {}
        for p, o in conn.execute(
            f'SELECT "partition", "offset" FROM {REJECTS_TABLE} WHERE projection = ? AND topic = ? '
            "ORDER BY 1, 2",
            [name, proj.topic],
        ).fetchall():
            if begin.get(int(p), 0) <= int(o) < live.get(int(p), 0):
                kept.setdefault(int(p), []).append(int(o))
    params = {"cut": cut_time} if cut == "time" else {}
    conn.execute(f'INSERT INTO "{table}" SELECT {cols} FROM "{name}" WHERE {keep}', params)
    copied = int(conn.execute(f'SELECT count(*) FROM "{table}"').fetchall()[0][0])
    rows, row_sum = row_checksum(conn, table, table)
    conn.execute(
        f'UPDATE {TALLY_TABLE} SET "rows" = ?, row_sum = ? WHERE build_table = ?', [rows, row_sum, table]
    )
    for p, o in begin.items():  # the live read model's rejects of records not read again stay rejects
        conn.execute(
            f'INSERT INTO {REJECTS_TABLE} SELECT ?, topic, "partition", "offset", reason, rejected_at '
            f'FROM {REJECTS_TABLE} WHERE projection = ? AND topic = ? AND "partition" = ? AND "offset" < ?',
            [table, name, proj.topic, p, o],
        )
    plan = Plan(start, "", cut, cut_time, live, kept, copied)
    return begin, plan


def _open_build(
    settings: Settings,
    proj: Projection,
    source: str,
    start: str | None,
    stop: str | None,
    marks: Mapping[int, int],
    until: Callable[[datetime], dict[int, int]],
    timeout_s: float,
) -> _Build:
    """Resume the projection's build in progress (same version, topic and source; ``--from``/
    ``--to`` not given or as given to it), or start a new one: its table, ``projection_builds``
    row, plan, digest and coverage rows, and for a partial replay the live rows taken over
    (:func:`_merge_live`), all in one transaction.

    Raises:
        ConfigError: another range was asked of the build in progress; a partial replay that
            cannot be merged.
    """
    with writer(settings.duckdb_path, timeout_s) as conn:
        for ddl in (*_BUILD_DDL, lake.LAKE_FILES_DDL):
            conn.execute(ddl)
        lake.finish_switches(conn, settings.lake_dir)  # a lake switch cut short (projections/lake.py)
        found = _building(conn, proj.name)
        if found is not None:
            build, version, table, topic, src, start_json, stop_json = found
            if int(version) == proj.version and topic == proj.topic and src == source:
                plan = _load_plan(conn, str(table))
                asked = (start or plan.start_spec, stop or plan.stop_spec)
                if asked != (plan.start_spec, plan.stop_spec):
                    raise ConfigError(
                        f"build {build} of {proj.name} (version {version}) is in progress with --from "
                        f"{plan.start_spec or 'earliest'} --to {plan.stop_spec or '(end of log)'}; run the "
                        "replay without --from/--to to resume it, or 'backbeat replay "
                        f"{proj.name} --drop-only --abandon' to give it up"
                    )
                return _Build(
                    int(build), int(version), str(table), _offsets_of(start_json), _offsets_of(stop_json),
                    resumed=True, plan=plan,
                )  # fmt: skip
    wanted_end = resolve_position(stop, marks, marks, until)  # reads the live read model: not in the writer
    with writer(settings.duckdb_path, timeout_s) as conn:
        conn.begin()
        try:
            if found is not None:  # another version/topic/source: the interrupted build is given up
                conn.execute(
                    f"UPDATE {BUILDS_TABLE} SET state = 'abandoned', note = ? "
                    "WHERE projection = ? AND build = ?",
                    [f"superseded by a replay of version {proj.version} from {source}", proj.name, found[0]],
                )
            n = int(
                conn.execute(
                    f"SELECT coalesce(max(build), 0) + 1 FROM {BUILDS_TABLE} WHERE projection = ?",
                    [proj.name],
                ).fetchall()[0][0]
            )
            table = f"{proj.name}__v{proj.version}_b{n}"
            conn.execute(f'DROP TABLE IF EXISTS "{table}"')
            for book in (TALLY_TABLE, COVERAGE_TABLE, PLAN_TABLE):
                conn.execute(f"DELETE FROM {book} WHERE build_table = ?", [table])
            conn.execute(f"INSERT INTO {TALLY_TABLE} VALUES (?, 0, 0)", [table])
            conn.execute(replace(proj, name=table).ddl)
            if _cut_of(start) == "none":
                begin, plan = {p: 0 for p in marks}, Plan(start or "")
            else:
                assert start is not None
                begin, plan = _merge_live(conn, proj, table, start, marks)
            end = {p: max(wanted_end[p], begin[p]) for p in marks}
            plan = replace(plan, stop_spec=stop or "")
            _save_plan(conn, table, plan)
            save_coverage(conn, table, Coverage.starting(begin))
            conn.execute(
                f"INSERT INTO {BUILDS_TABLE} VALUES (?, ?, ?, ?, ?, ?, 'building', ?, ?, ?, NULL, NULL)",
                [proj.name, n, proj.version, table, proj.topic, source, _offsets_json(begin),
                 _offsets_json(end), now_utc()],
            )  # fmt: skip
            conn.commit()
        except BaseException:
            conn.rollback()
            raise
    return _Build(n, proj.version, table, begin, end, resumed=False, plan=plan)


@contextmanager
def _replay_lock(db_path: Path, name: str) -> Iterator[None]:
    """One replay per read model at a time (``flock`` on ``<db>.replay-<name>.lock``).

    Raises:
        ReplayError: another replay of ``name`` holds it.
    """
    path = db_path.with_name(f"{db_path.name}.replay-{name}.lock")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ReplayError(f"another replay of {name} is running (lock {path})") from None
        yield
    finally:
        os.close(fd)


def _time_filter(proj: Projection, plan: Plan) -> Callable[[pa.Table], pa.Table] | None:
    """For a ``--from TIME`` build: the rows of a batch the replay keeps (event time at or after
    the cut or none, or a record the live read model had not reached or had rejected); else
    ``None`` (every row kept)."""
    if plan.cut != "time" or plan.cut_time is None:
        return None
    col = time_column(proj)
    assert col is not None
    cutoff = pa.scalar(plan.cut_time, pa.timestamp("ms"))
    live = plan.live_offsets
    kept = {(p, o) for p, offs in plan.kept.items() for o in offs}
    lut = np.zeros(max(live, default=0) + 2, dtype=np.int64)  # partition -> live offset (none: 0)
    for part, offset in live.items():
        lut[part] = offset

    def keep(table: pa.Table) -> pa.Table:
        if table.num_rows == 0:
            return table
        early = pc.fill_null(pc.less(table[col], cutoff), False).to_numpy(zero_copy_only=False)
        parts = table[PARTITION_COL].to_numpy()
        offs = table[OFFSET_COL].to_numpy()
        mask = ~early | (offs >= lut[np.minimum(parts, len(lut) - 1)])
        if kept:
            mask |= np.array([(int(p), int(o)) in kept for p, o in zip(parts, offs, strict=True)])
        return table if bool(mask.all()) else table.filter(pa.array(mask))

    return keep


class _Builder:
    """Applies records of one build's range to its table, batch by batch, reporting progress;
    keeps the build's :class:`Coverage` and digest (:data:`TALLY_TABLE`) in step with its rows."""

    def __init__(
        self,
        settings: Settings,
        proj: Projection,
        build: _Build,
        read: Callable[..., Batches],
        lookup: Callable[[int], dict[str, Any]],
        identity: LogIdentity,
        batch_size: int,
        timeout_s: float,
        progress: Callable[[ReplayProgress], None] | None,
        write_rows: int = WRITE_ROWS,
    ) -> None:
        self.settings = settings
        self.proj = replace(proj, name=build.table, lake=False)  # the build's table and offsets key
        self.build = build
        self.read = read
        self.identity = identity
        self.batch_size = batch_size
        self.write_rows = write_rows
        self.timeout_s = timeout_s
        self.progress = progress
        self.preparer = BatchPreparer({proj.topic: self.proj}, lookup)
        self.keep = _time_filter(proj, build.plan)
        self.records = 0
        self.started = time.monotonic()
        with writer(settings.duckdb_path, timeout_s) as conn:
            found = load_coverage(conn, build.table)
            stored = _live_offsets(conn, build.table, proj.topic)
        if found is None:  # a build begun by an older backbeat: it covers what it stored
            found = Coverage.starting({p: max(stored.get(p, 0), o) for p, o in build.start.items()})
        self.coverage = found

    def positions(self) -> dict[int, int]:
        """Where the build's coverage ends, ``{partition: next offset}``."""
        return self.coverage.positions()

    def run(self, stop: Mapping[int, int], phase: str) -> dict[int, int]:
        """Apply ``[positions, stop)``; returns the positions it was to reach (``stop``, or further
        where the build already stood); where the source ended short of them, :meth:`Coverage.problems`
        says so.

        The DuckDB file stays open across writes (:class:`~projections.store.WriterSession`: it
        closes and waits while a reader such as ``backbeat sql`` is at the turnstile); batches
        read are gathered until they hold ``write_rows`` rows (or the range ends), and each
        write is appended on a writer thread while the next records are read and decoded, with
        the digest of its mapped rows and the coverage so far in the same transaction.
        """
        positions = self.positions()
        target = {p: max(stop.get(p, 0), positions[p]) for p in positions}
        total = sum(target[p] - self.build.start.get(p, 0) for p in target)
        topic = self.proj.topic
        pending: tuple[Future[None], dict[int, int], int] | None = None
        gathered: Prepared | None = None  # batches read, not yet submitted
        gathered_records = 0

        def settle() -> None:
            nonlocal pending
            if pending is None:
                return
            future, reached, records = pending
            pending = None
            future.result()
            self.records += records
            positions.update(reached)
            self._report(phase, positions, target, total)

        with (
            WriterSession(self.settings.duckdb_path, self.timeout_s) as session,
            ThreadPoolExecutor(1, thread_name_prefix="bb-replay-writer") as pool,
        ):

            def submit() -> None:
                nonlocal pending, gathered, gathered_records
                if gathered is None:
                    return
                settle()
                covered = self.coverage.snapshot()
                job = pool.submit(self._write, session, gathered, covered)
                pending = (job, covered.positions(), gathered_records)
                gathered, gathered_records = None, 0

            for msgs, reached in self.read(self.settings, topic, positions, target, self.batch_size):
                if msgs:
                    prepared = wait_out(
                        lambda m=msgs: self.preparer.prepare(m), what=f"replay {self.proj.name}: decoding"
                    )
                    self.coverage.read(prepared)
                    if self.keep is not None and self.proj.name in prepared.tables:
                        prepared.tables[self.proj.name] = self.keep(prepared.tables[self.proj.name])
                    gathered = prepared if gathered is None else gathered.merge(prepared)
                    gathered_records += len(msgs)
                self.coverage.moved({p: o for p, o in reached.items() if o <= target.get(p, o)})
                if gathered is not None and _rows(gathered) >= self.write_rows:
                    submit()
            submit()
            settle()
            pool.submit(self._finish, session, self.coverage.snapshot()).result()
        positions.update(self.positions())
        self._report(phase, positions, target, total)
        return target

    def _write(self, session: WriterSession, prepared: Prepared, covered: Coverage) -> None:
        """One write transaction (writer thread): rows appended, rejects, offsets, and in the same
        transaction the digest of the rows as mapped (before the write path) and the coverage."""
        table = self.build.table

        def book(conn: duckdb.DuckDBPyConnection) -> None:
            rows = prepared.tables.get(table)
            if rows is not None and rows.num_rows:
                _digest(conn, table, rows)
            save_coverage(conn, table, covered)

        with session.connection() as conn:
            conn.execute(f"SET memory_limit = '{_BUILD_MEMORY}'")  # the file stays open: bound its cache
            apply_batch(
                conn,
                self.settings.lake_dir,
                {self.proj.topic: self.proj},
                prepared,
                self.identity,
                append=True,
                before_commit=book,
            )

    def _finish(self, session: WriterSession, covered: Coverage) -> None:
        """Store the end positions and coverage (past the last data record: markers, EOF) and
        close the file."""
        with session.connection() as conn:
            conn.begin()
            stored = _live_offsets(conn, self.build.table, self.proj.topic)
            moved = {
                (self.build.table, self.proj.topic, p): o
                for p, o in covered.positions().items()
                if o > stored.get(p, -1)
            }
            save_offsets(conn, moved, self.identity)
            save_coverage(conn, self.build.table, covered)
            conn.commit()
        session.close()

    def _report(
        self, phase: str, positions: Mapping[int, int], target: Mapping[int, int], total: int
    ) -> None:
        if self.progress is not None:
            self.progress(progress_of(phase, self.records, self.started, positions, target, total))


def progress_of(
    phase: str,
    records: int,
    started: float,
    positions: Mapping[int, int],
    target: Mapping[int, int],
    total: int,
) -> ReplayProgress:
    """The :class:`ReplayProgress` of a build that has read ``records`` since ``started``
    (``time.monotonic()``, s), stands at ``positions`` and reads up to ``target`` (``{partition:
    offset}``), ``total`` records in its whole range."""
    elapsed = time.monotonic() - started
    rate = records / elapsed if elapsed > 0 else 0.0
    lag = {p: max(0, target[p] - positions.get(p, 0)) for p in target}
    left = sum(lag.values())
    return ReplayProgress(phase, max(0, total - left), total, rate, lag, left / rate if rate > 0 else None)


def _rows(prepared: Prepared) -> int:
    return sum(t.num_rows for t in prepared.tables.values())


def _rejected(conn: duckdb.DuckDBPyConnection, table: str) -> set[tuple[int, int]]:
    rows = conn.execute(f'SELECT "partition", "offset" FROM {REJECTS_TABLE} WHERE projection = ?', [table])
    return {(int(p), int(o)) for p, o in rows.fetchall()}


def _retiring(conn: duckdb.DuckDBPyConnection, name: str, live_version: int | None, version: int) -> str:
    """The table of the version a switch retires: the current build's, or ``<name>__v<v>_b0`` for
    a live table never replayed."""
    found = current_build(conn, name)
    if found is not None:
        return found[0]
    return f"{name}__v{live_version if live_version is not None else version}_b0"


def _switch(
    conn: duckdb.DuckDBPyConnection, proj: Projection, build: _Build, live_version: int | None
) -> None:
    """Make ``build`` the current version of ``proj`` (inside the caller's transaction)."""
    name, stamp = proj.name, now_utc()
    retired = live_version if live_version is not None else proj.version
    switch_to_build(
        conn, name, build.table, build.build, retired_version=retired, topic=proj.topic, source="kafka",
        retired_stop=_offsets_json(_live_offsets(conn, name, proj.topic)),
    )  # fmt: skip
    conn.execute(f"DELETE FROM {OFFSETS_TABLE} WHERE projection = ?", [name])
    conn.execute(f"UPDATE {OFFSETS_TABLE} SET projection = ? WHERE projection = ?", [name, build.table])
    conn.execute(
        f"INSERT OR REPLACE INTO {VERSIONS_TABLE} VALUES (?, ?, ?, ?)",
        [name, build.version, proj.topic, stamp],
    )
    if build.plan.cut != "none":  # the build carries over the live rejects it kept: it replaces them
        conn.execute(f"DELETE FROM {REJECTS_TABLE} WHERE projection = ?", [name])
    conn.execute(
        f'INSERT INTO {REJECTS_TABLE} SELECT ?, b.topic, b."partition", b."offset", b.reason, b.rejected_at '
        f"FROM {REJECTS_TABLE} b WHERE b.projection = ? AND NOT EXISTS (SELECT 1 FROM {REJECTS_TABLE} r "
        'WHERE r.projection = ? AND r.topic = b.topic AND r."partition" = b."partition" '
        'AND r."offset" = b."offset")',
        [name, build.table, name],
    )
    conn.execute(f"DELETE FROM {REJECTS_TABLE} WHERE projection = ?", [build.table])
    for statement in proj.extra_ddl:  # companions of the new version's shape
        conn.execute(statement)


def _write_lake(settings: Settings, proj: Projection, build: _Build, timeout_s: float) -> int:
    """Write build ``build``'s rows (after its dedupe) as the new version's Parquet lake under
    ``<lake_dir>/<build table>/``: the lake's layout (:func:`projections.lake.write_files`: a
    ``event_date=YYYY-MM-DD`` directory per UTC date of ``lake_time``, files
    ``v<version>-b000000001-<i>.parquet``), written by DuckDB's ``COPY … PARTITION_BY`` so the rows
    stream under its memory limit, and recorded in ``lake_files`` under the build table's name as
    batch 1; an earlier attempt's files are replaced. Returns the number of files. The switch then
    points ``<lake_dir>/<name>`` at them (:mod:`projections.lake`, "Versions").

    Raises:
        OSError, duckdb.Error: a write failed (nothing is switched; the next attempt rewrites).
    """
    lake_dir, table = settings.lake_dir, build.table
    root = lake_dir / table
    with writer(settings.duckdb_path, timeout_s) as conn:
        conn.execute(f"SET memory_limit = '{_DUCKDB_MEMORY}'")
        conn.execute(lake.LAKE_FILES_DDL)
        conn.execute(f"DELETE FROM {lake.LAKE_FILES_TABLE} WHERE projection = ?", [table])
        lake.drop_dir(lake_dir, table)
        root.mkdir(parents=True)
        date = lake.DATE_COLUMN
        units = {"s": "TIMESTAMP_S", "ms": "TIMESTAMP_MS"}  # as the runner's files (Arrow) store them
        cols = (
            ", ".join(
                f'CAST("{c.name}" AS {units[c.type.unit]}) AS "{c.name}"'
                if pa.types.is_timestamp(c.type) and c.type.unit in units
                else f'"{c.name}"'
                for c in proj.columns
            )
            + f', "{PARTITION_COL}", "{OFFSET_COL}"'
        )
        conn.execute(
            f'COPY (SELECT {cols}, CAST("{proj.lake_time}" AS DATE) AS "{date}" FROM "{table}" '
            f'ORDER BY "{PARTITION_COL}", "{OFFSET_COL}") TO \'{root}\' (FORMAT parquet, '
            f"PARTITION_BY (\"{date}\"), FILENAME_PATTERN 'v{proj.version}-b{1:09d}-{{i}}', "
            f"ROW_GROUP_SIZE {_LAKE_ROWS})"
        )
        written = conn.execute(
            "SELECT filename, count(*) FROM read_parquet(?, filename = true, hive_partitioning = false) "
            "GROUP BY 1 ORDER BY 1",
            [str(root / "**" / "*.parquet")],
        ).fetchall()
        files = [(str(Path(f).relative_to(lake_dir)), int(n)) for f, n in written]
        conn.begin()
        lake.record_files(conn, table, 1, files, now_utc())
        conn.commit()
    return len(files)


def drop_old_versions(
    settings: Settings, name: str, *, abandon: bool = False, timeout_s: float = 120.0
) -> list[str]:
    """Drop every version of read model ``name`` that is not current (``old``, ``failed``,
    ``abandoned``; with ``abandon`` an interrupted ``building`` one too): their tables, their
    offsets, rejects, digest, coverage and plan, their ``projection_builds`` rows, and their Parquet
    lake directories and ``lake_files`` rows (a lake read model's retired versions). Returns the
    tables dropped.

    Raises:
        ReplayError: ``abandon`` while a replay of ``name`` is running.
        DatabaseBusyError: the database stayed locked for ``timeout_s`` seconds.
    """
    states = ["old", "failed", "abandoned", *(["building"] if abandon else [])]
    if not settings.duckdb_path.exists():
        return []
    with _replay_lock(settings.duckdb_path, name) if abandon else _nothing():
        with writer(settings.duckdb_path, timeout_s) as conn:
            conn.begin()
            for ddl in (*_BUILD_DDL, lake.LAKE_FILES_DDL):
                conn.execute(ddl)
            if _is_stateful(name):
                from projections.replay_stateful import drop_old_stateful  # noqa: PLC0415

                dropped = drop_old_stateful(conn, settings, name, states)
                conn.commit()
                return dropped
            rows = conn.execute(
                f"SELECT build, table_name FROM {BUILDS_TABLE} "
                "WHERE projection = ? AND list_contains(?, state)",
                [name, states],
            ).fetchall()
            for build, table in rows:
                conn.execute(f'DROP TABLE IF EXISTS "{table}"')
                for book in (TALLY_TABLE, COVERAGE_TABLE, PLAN_TABLE):
                    conn.execute(f"DELETE FROM {book} WHERE build_table = ?", [table])
                for book in (OFFSETS_TABLE, REJECTS_TABLE, lake.LAKE_FILES_TABLE):
                    conn.execute(f"DELETE FROM {book} WHERE projection = ?", [table])
                conn.execute(f"DELETE FROM {BUILDS_TABLE} WHERE projection = ? AND build = ?", [name, build])
            conn.commit()
        link = settings.lake_dir / name
        shown = os.readlink(link) if link.is_symlink() else None  # a retired build's lake may be current
        for _, table in rows:
            if str(table) != shown:
                lake.drop_dir(settings.lake_dir, str(table))
    return [str(r[1]) for r in rows]


@contextmanager
def _nothing() -> Iterator[None]:
    yield


# -- replay ------------------------------------------------------------------------------------------
def replay(
    settings: Settings,
    name: str,
    *,
    source: str = "kafka",
    start: str | None = None,
    stop: str | None = None,
    catch_up: bool = False,
    allow_log_gaps: bool = False,
    drop_old: bool = False,
    progress: Callable[[ReplayProgress], None] | None = None,
    projection: Projection | None = None,
    batch_size: int = 50_000,
    lookup: Callable[[int], dict[str, Any]] | None = None,
    db_timeout_s: float = 120.0,
    switch_tries: int = 5,
    recount_source: bool = False,
    write_rows: int = WRITE_ROWS,
    archive_wait_s: float = ARCHIVE_WAIT_S,
) -> ReplayResult:
    """Rebuild read model ``name`` blue/green (module docstring): build, verify, switch.

    ``source``: ``kafka`` or ``archive``; ``start``/``stop``: ``earliest`` | ``latest`` | ISO time
    | ``P:O,…`` (default: the start of the log and the high watermarks at start, from Fetch
    responses; a ``start`` other than ``earliest`` is a partial replay merged with the live read
    model); ``catch_up``: extend an explicit ``stop`` to the live read model's offsets where they
    are further (without it such a replay stops with :class:`ReplayError`; the default ``stop``
    always catches up, reported in :attr:`ReplayResult.requested_stop`); ``allow_log_gaps``:
    accept offsets a Kafka source moved past without a record (transaction markers, compaction);
    ``projection``: the projection to build (default ``PROJECTIONS[name]``; a changed mapping with
    a bumped ``version``, or another topic); ``batch_size``: records per read (a write gathers
    reads up to ``write_rows`` rows, default :data:`WRITE_ROWS`); ``progress``: called after every
    write; ``drop_old``: drop the non-current versions after a switch; ``recount_source``: also
    count the keys of a second read and decode of the source range (full builds only; reads
    everything twice); ``archive_wait_s``: how long a replay from the archive waits for a running
    archiver (s). A build in progress for the same version, topic and source is resumed. The
    saga read models (:data:`sagas.replay.SAGA_READ_MODELS`) are rebuilt from their event stores.

    Returns the :class:`ReplayResult`; ``verified=False`` (nothing switched, the build kept as
    ``failed``) when the digest or content check found a mismatch.

    Raises:
        ConfigError: unknown projection, bad position or source, archive missing, a partial replay
            that cannot be merged (the reason in the message).
        ReplayError: another replay of ``name`` runs; the live runner kept moving past the build,
            or is past an explicit ``--to``; the build does not cover its range (offsets not read,
            skipped or read twice: the message names the partition and offsets; the build is kept
            and resumes).
        OffsetMismatchError, InfraError, DatabaseBusyError: as the projection runner.
    """
    from sagas.replay import SAGA_READ_MODELS, replay_saga_read_model  # noqa: PLC0415 (imports this module)

    if name in SAGA_READ_MODELS:
        if start is not None or stop is not None or source != "kafka":
            raise ConfigError(
                f"{name} is rebuilt whole from its event store's notification log: --from, --to and "
                "--source do not apply"
            )
        return replay_saga_read_model(
            settings, name, drop_old=drop_old, progress=progress, db_timeout_s=db_timeout_s
        )
    if source not in SOURCES:
        raise ConfigError(f"--source must be one of {', '.join(SOURCES)}, not {source!r}")
    proj = _projection(name, projection)
    lookup = lookup or registry_for(settings.registry_url).parsed_schema_by_id
    if _is_stateful(name):
        from projections.replay_stateful import replay_stateful  # noqa: PLC0415 (imports this module)

        return replay_stateful(
            settings, proj, source=source, start=start, stop=stop, drop_old=drop_old, progress=progress,
            batch_size=batch_size, lookup=lookup, db_timeout_s=db_timeout_s, switch_tries=switch_tries,
        )  # fmt: skip
    read = batches_for(source, archive_wait_s)
    started = time.monotonic()
    with _replay_lock(settings.duckdb_path, name):
        if source == "archive":
            marks = archive_functions()[1](settings, proj.topic)
            identity = log_identity(settings, [proj.topic])
        else:
            identity = log_identity(settings, [proj.topic])
            if proj.topic not in identity.topic_ids:
                raise InfraError(f"topic {proj.topic} does not exist on {settings.bootstrap_servers}")
            marks = high_watermarks(settings, proj.topic)

        def until(when: datetime) -> dict[int, int]:
            return offsets_before(settings, proj, when, marks, read, lookup)[0]

        build = _open_build(settings, proj, source, start, stop, marks, until, db_timeout_s)
        if recount_source and build.plan.cut != "none":
            raise ConfigError("recount_source checks a whole build: it does not apply to a partial replay")
        builder = _Builder(
            settings, proj, build, read, lookup, identity, batch_size, db_timeout_s, progress, write_rows
        )
        end = builder.run(build.stop, "build")
        explicit_stop = bool(build.plan.stop_spec)
        verification: Verification | None = None
        files = 0
        for _ in range(max(1, switch_tries)):
            with reader(settings.duckdb_path, db_timeout_s) as conn:
                live = _live_offsets(conn, name, proj.topic)
            ahead = {p: o for p, o in live.items() if o > end.get(p, 0) and p in end}
            if ahead and explicit_stop and not catch_up:
                raise ReplayError(
                    f"the live read model {name} stands at {_offsets_json(live)}, past the --to of build "
                    f"{build.build} ({_offsets_json(end)}): switching would move it back. Run it again "
                    "with --catch-up to extend the build to the live offsets (reported), or give it up "
                    f"with 'backbeat replay {name} --drop-only --abandon'; the build is kept and resumes"
                )
            if ahead:  # the live runner is further: catch up
                end = builder.run({p: max(end.get(p, 0), live.get(p, 0)) for p in end}, "catch-up")
            gaps = builder.coverage.problems(end, allow_skipped=allow_log_gaps)
            if gaps:
                raise ReplayError(
                    f"build {build.build} of {name} does not cover its range {_offsets_json(build.start)} → "
                    f"{_offsets_json(end)} from {source}, so it is not switched: " + "; ".join(gaps)
                    + ". The build is kept and resumes where its coverage ends: run the replay again"
                    + (" once the archiver has archived those offsets, or replay from kafka"
                       if source == "archive" else "")
                )  # fmt: skip
            tally, appended = _dedupe(settings, proj, build, db_timeout_s)
            verification = _verify(
                settings, proj, build, end, live, read, lookup, batch_size, db_timeout_s, tally, appended,
                recount_source,
            )  # fmt: skip
            with reader(settings.duckdb_path, db_timeout_s) as conn:
                live_version = _live_version(conn, name)
            relake = (
                verification.ok and proj.lake and live_version is not None and live_version[0] != proj.version
            )
            if relake:
                files = _write_lake(settings, proj, build, db_timeout_s)
            with writer(settings.duckdb_path, db_timeout_s) as conn:
                conn.begin()
                now_live = _live_offsets(conn, name, proj.topic)
                if any(now_live.get(p, 0) > end.get(p, 0) for p in now_live if p in end):
                    conn.rollback()
                    continue  # the runner moved on meanwhile: catch up again
                if verification.mode == "live" and any(now_live.get(p, 0) != live.get(p, 0) for p in end):
                    conn.rollback()
                    continue
                if verification.mode == "live":
                    verification = _compare_live(conn, proj, build)
                live_version = _live_version(conn, name)
                if not verification.ok:
                    conn.execute(
                        f"UPDATE {BUILDS_TABLE} SET state = 'failed', note = ? "
                        "WHERE projection = ? AND build = ?",
                        [verification.detail, name, build.build],
                    )
                else:
                    if relake:
                        was = live_version[0] if live_version else None
                        retire = _retiring(conn, name, was, proj.version)
                        lake.plan_switch(conn, settings.lake_dir, name, build.table, retire)
                    _switch(conn, proj, build, live_version[0] if live_version else None)
                conn.commit()
                if relake and verification.ok:
                    lake.finish_switches(conn, settings.lake_dir)
            break
        else:
            raise ReplayError(
                f"the live runner of {name} kept moving past build {build.build} ({switch_tries} catch-ups); "
                "the build is kept and resumes: run the replay again when the topic is quieter, or stop "
                "'backbeat project' for the switch"
            )
        assert verification is not None
        dropped = (
            drop_old_versions(settings, name, timeout_s=db_timeout_s) if drop_old and verification.ok else []
        )
    seconds = time.monotonic() - started
    return ReplayResult(
        name=name,
        version=build.version,
        build=build.build,
        table=build.table,
        events=builder.records,
        seconds=seconds,
        events_per_s=builder.records / seconds if seconds > 0 else 0.0,
        verified=verification.ok,
        switched=verification.ok,
        verification=verification,
        start=build.start,
        stop=end,
        resumed=build.resumed,
        dropped=dropped,
        requested_stop=dict(build.stop),
        copied=build.plan.copied,
        lake_files=files,
    )


def _compare_live(conn: duckdb.DuckDBPyConnection, proj: Projection, build: _Build) -> Verification:
    """Rows and checksum of the live read model against the build (same version, same offsets)."""
    cols = _content_columns(conn, build.table)
    expected = table_checksum(conn, f'"{proj.name}"', cols)
    got = table_checksum(conn, f'"{build.table}"', cols)
    ok = expected == got
    detail = (
        f"{got[0]:,} rows, checksum equal to the live read model's"
        if ok
        else f"build has {got[0]:,} rows (checksum {got[1]}), the live read model {expected[0]:,} "
        f"(checksum {expected[1]}) at the same offsets"
    )
    return Verification("live", ok, expected, got, detail)


def _digest(conn: duckdb.DuckDBPyConnection, table: str, rows: pa.Table) -> None:
    """Add ``rows`` (what the mapping produced for build table ``table``, before the write path)
    to its digest, in the write's transaction."""
    conn.register("bb_digest", rows)
    try:
        n, row_sum = row_checksum(conn, "bb_digest", table)
    finally:
        conn.unregister("bb_digest")
    conn.execute(  # no row: a build begun by an older backbeat, which kept no digest
        f'UPDATE {TALLY_TABLE} SET "rows" = "rows" + ?, row_sum = row_sum + ? WHERE build_table = ?',
        [n, row_sum, table],
    )


def _dedupe(
    settings: Settings, proj: Projection, build: _Build, timeout_s: float
) -> tuple[tuple[int, int] | None, Deduped]:
    """Apply ``proj``'s policy to the build's appended rows (:func:`~projections.apply.dedupe`),
    in one transaction under :data:`_DUCKDB_MEMORY`; returns the build's digest as it was (the rows
    mapped, ``(rows, row checksum)``; ``None`` for a build begun by an older backbeat, which kept
    none) and what the dedupe counted before deleting. The digest then loses the deleted rows, so
    a dedupe run again (a resumed replay) finds them equal again."""
    with writer(settings.duckdb_path, timeout_s) as conn:
        conn.execute(f"SET memory_limit = '{_DUCKDB_MEMORY}'")
        conn.execute(_TALLY_DDL)
        conn.begin()
        found = conn.execute(
            f'SELECT "rows", row_sum FROM {TALLY_TABLE} WHERE build_table = ?', [build.table]
        ).fetchall()
        tally = (int(found[0][0]), int(found[0][1])) if found else None
        deduped = dedupe(conn, replace(proj, name=build.table))
        if tally is not None:
            conn.execute(
                f'UPDATE {TALLY_TABLE} SET "rows" = ?, row_sum = ? WHERE build_table = ?',
                [tally[0] - deduped.deleted, tally[1] - deduped.deleted_checksum, build.table],
            )
        conn.commit()
    return tally, deduped


def _verify(
    settings: Settings,
    proj: Projection,
    build: _Build,
    end: Mapping[int, int],
    live: Mapping[int, int],
    read: Callable[..., Batches],
    lookup: Callable[[int], dict[str, Any]],
    batch_size: int,
    timeout_s: float,
    tally: tuple[int, int] | None,
    appended: Deduped,
    recount_source: bool,
) -> Verification:
    """Steps 4b and 4c of the module docstring: the digest (the rows appended must be the rows
    the mapping produced from the records read, ``tally``), then the live comparison when it
    applies (checked again under the writer by the caller), else one row per distinct key of the
    rows appended (``appended``, as counted by the dedupe) or, with ``recount_source``, of a second
    read of the source."""
    with reader(settings.duckdb_path, timeout_s) as conn:
        conn.execute(f"SET memory_limit = '{_DUCKDB_MEMORY}'")
        live_version = _live_version(conn, proj.name)
        same = (
            build.plan.cut == "none"
            and live_version == (build.version, proj.topic)
            and all(o == 0 for o in build.start.values())
            and all(live.get(p, 0) == end.get(p, 0) for p in {*live, *end})
            and relation_kind(conn, proj.name) is not None
        )
        if tally is not None and tally != (appended.rows, appended.row_checksum):
            return Verification(
                "digest", False, tally, (appended.rows, appended.row_checksum),
                f"the build table held {appended.rows:,} rows (row checksum {appended.row_checksum}) before "
                f"the dedupe, but the mapping produced {tally[0]:,} (row checksum {tally[1]}) from the "
                "records read: rows were lost, written twice or altered on the way to the table",
            )  # fmt: skip
        digest = (
            f"digest of the {appended.rows:,} rows mapped equal"
            if tally is not None
            else "a build begun by an older backbeat: no digest to check"
        )
        if same:
            return Verification("live", True, (0, 0), (0, 0), f"{digest}; compared with the live read model")
        got = _build_keys(conn, proj, build.table)
        if not recount_source:
            expected = (appended.keys, appended.checksum)
            how = f"counted over the {appended.rows:,} rows appended"
        else:
            rejected = _rejected(conn, build.table)
    if recount_source:
        expected = _recount(settings, proj, read, build.start, end, lookup, rejected, batch_size)
        how = "recounted by a second read of the source"
    ok = expected == got
    if ok:
        detail = f"{digest}; {got[0]:,} rows, one per distinct key ({how}), checksums equal"
    elif got[1] == -1:
        detail = (
            f"build has {got[0]:,} rows but repeated keys; the source range has {expected[0]:,} keys ({how})"
        )
    else:
        detail = (
            f"build has {got[0]:,} rows (key checksum {got[1]}), the source range "
            f"{expected[0]:,} distinct keys (checksum {expected[1]}; {how})"
        )
    return Verification("recount", ok, expected, got, detail)


__all__ = [
    "ARCHIVE_WAIT_S",
    "COVERAGE_TABLE",
    "PLAN_TABLE",
    "SOURCES",
    "TALLY_TABLE",
    "WRITE_ROWS",
    "Coverage",
    "Plan",
    "ReplayError",
    "ReplayProgress",
    "ReplayResult",
    "Verification",
    "archive_batches",
    "drop_old_versions",
    "kafka_batches",
    "offsets_before",
    "parse_time",
    "progress_of",
    "replay",
    "resolve_position",
    "table_checksum",
    "time_column",
]
