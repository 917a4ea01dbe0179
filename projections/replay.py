"""Blue/green replay: rebuild a read model from the log beside the live one, verify it, then switch
readers to it atomically (docs/design.md §3 "Replay"; ``backbeat replay``).

How a replay runs (:func:`replay`):

1. **Build.** A new version of the read model gets its own table ``<name>__v<version>_b<build>``
   and a row in ``projection_builds`` (:data:`projections.tracking.BUILDS_TABLE`: build number,
   version, table, source, state, requested start and stop offsets as JSON). Its progress is
   tracked in ``projection_offsets`` under the build's table name (and its rejects in
   ``projection_rejects`` likewise), so it never touches the live read model's offsets. Records
   ``[start, stop)`` per partition are read (a confluent consumer ``assign()``-ed to the
   partitions, or H1's Parquet archive through :func:`projections.archive.iter_archive`),
   decoded and mapped by the projection code itself (:class:`~projections.decoding.BatchPreparer`,
   :func:`~projections.apply.apply_batch` with the projection renamed to the build table; the
   Parquet lake is not written by a replay: it is the live runner's history). The build only
   appends (``apply_batch(append=True)``): every mapped row goes in as it is, and the projection's
   policy (first or last row of a key) is applied once at the end by
   :func:`~projections.apply.dedupe`, so no batch scans the rows before it (the live runner's
   per-batch upsert anti-joins the whole table: its cost and DuckDB's cache grow with the table).
   Batches read are gathered into writes of at least :data:`WRITE_ROWS` rows, each one DuckDB
   transaction (rows, rejects, offsets), written on a writer thread while the next records are
   read and decoded; the file stays open across writes (:class:`~projections.store.WriterSession`),
   closed whenever a reader (``backbeat sql``) waits at the turnstile.
2. **Resume.** A replay killed mid-way leaves its build ``building``; running ``replay`` again for
   the same projection and version resumes it from its own stored offsets (same range).
3. **Catch up.** Before switching, the build is extended to the live read model's stored offsets
   where they are further (a runner may have kept going), so a switch never moves the read model
   back and a running runner carries on without a gap (it sees its next records as redelivered).
4. **Verify.** When the live read model has the same version, was built from the start of the log
   and stands at exactly the build's offsets, row counts and an order-independent checksum
   (``sum(hash(columns))`` over every column but ``kafka_partition``/``kafka_offset``) of both
   must match. Otherwise (mapping changed, another start, live elsewhere) a recount: the build
   must hold exactly one row per distinct key of the source range (count and ``sum(hash(key))``
   equal), the keys being those of every mapped record (row filter and row mapping applied,
   rejects left out). They are counted by :func:`~projections.apply.dedupe` over the appended
   rows (one per mapped record, written with their offsets in each transaction, so they resume
   with the build) just before it deletes the repeated keys' extra rows, in SQL under DuckDB's
   memory limit: memory stays flat and the range is read once. It checks what the write path did
   (rows lost or left twice by the dedupe), not the decoding, which both counts share.
   ``recount_source=True`` reads and decodes the range a second time instead (:func:`_recount`).
   On a mismatch nothing is switched: the build is marked ``failed`` and kept beside the live one.
5. **Switch.** In one DuckDB transaction: the first time, the live table is renamed
   ``<name>__v<old version>_b0`` (recorded as build 0); the name becomes
   ``CREATE OR REPLACE VIEW <name> AS SELECT * FROM <build table>``; the build becomes
   ``current`` (the previous one ``old``); the read model's offsets, version and rejects become
   the build's. Readers keep querying ``<name>``; the runner writes into the current version's
   table (:func:`projections.tracking.current_build`, looked up per batch by
   :func:`~projections.apply.apply_batch`). Old versions stay until :func:`drop_old_versions`.

Time positions (``--from``/``--to`` as ISO times): the embedded broker's ``offsets_for_times`` is
wrong (docs/broker.md §3), so a time becomes, per partition, the first offset whose event time (the
projection's ``lake_time``, else ``occurred_at``, else its first timestamp column) is at or after
it: taken from the live read model's own ``kafka_offset`` + event-time columns when it was built
from the same topic (partitions with no later row: the live model's next offset), else by
scanning the topic with the projection's decoder. Event time is not monotonic in offsets, so the
cut is the first such offset, not a sorted boundary.

Stateful read models (``recommendations``, :data:`projections.runner.STATEFUL`) are rebuilt whole
(``--from earliest`` only) into a separate DuckDB file and switched by renaming their tables in one
transaction: :mod:`projections.replay_stateful`.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa
import pyarrow.compute as pc

from events.log import read_batches, wait_out
from events.offsets import high_watermarks
from events.registry_client import registry_for
from events.serde import AvroDecoder
from infra.errors import BackbeatError, ConfigError, InfraError
from infra.settings import Settings
from projections.apply import Deduped, apply_batch, dedupe, row_checksum
from projections.decoding import BatchPreparer, MessageLike, Prepared
from projections.readmodels import OFFSET_COL, PARTITION_COL, Projection, get_projection
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
    save_offsets,
)

SOURCES = ("kafka", "archive")
_PARTITION_SPEC = re.compile(r"^\s*\d+\s*:\s*\d+\s*(,\s*\d+\s*:\s*\d+\s*)*$")
_IDLE_TIMEOUT_S = 30.0
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
#: The rows each build has written, as its writes committed them: ``(rows, sum(hash(every
#: column)))`` per build table, created with the build, added to in each write's transaction
#: (kept less what the dedupe deleted). Checked against the build table before the dedupe
#: (:func:`_verify`).
TALLY_TABLE = "projection_build_tally"
_TALLY_DDL = f"""CREATE TABLE IF NOT EXISTS {TALLY_TABLE} (
  build_table VARCHAR PRIMARY KEY, "rows" BIGINT NOT NULL, row_sum HUGEINT NOT NULL)"""

#: One batch of records read from a source and the next offset per partition after it.
Batches = Iterator[tuple[Sequence[MessageLike], dict[int, int]]]


class ReplayError(BackbeatError):
    """A replay cannot go on (another replay of the projection runs, the live runner kept moving)."""


@dataclass(frozen=True)
class ReplayProgress:
    """Reported after every committed write. ``phase``: ``build``, ``catch-up`` or ``verify``;
    ``events``: records of the build's range read so far (a resumed build counts what it had);
    ``total``: records in the range; ``events_per_s``: records per second of this run; ``lag``:
    records left per partition; ``eta_s``: seconds left at this rate (``None`` before a rate)."""

    phase: str
    events: int
    total: int
    events_per_s: float
    lag: dict[int, int]
    eta_s: float | None


@dataclass(frozen=True)
class Verification:
    """How a build was checked. ``mode``: ``live`` (against the live read model) or ``recount``
    (against a second read of the source); ``expected``/``got``: ``(rows, checksum)``;
    ``detail``: a sentence for people."""

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
    ``{partition: offset}`` of the range (``stop`` exclusive, after any catch-up); ``resumed``:
    an interrupted build was continued; ``dropped``: tables dropped by ``drop_old``."""

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


@dataclass(frozen=True)
class _Build:
    build: int
    version: int
    table: str
    start: dict[int, int]
    stop: dict[int, int]
    resumed: bool


# -- positions ---------------------------------------------------------------------------------------
def parse_time(text: str) -> datetime:
    """An ISO 8601 time (``2014-04-20``, ``2014-04-20T08:00:00Z``, with or without offset) as a
    naive UTC datetime (no offset = UTC).

    Raises:
        ConfigError: not an ISO time.
    """
    try:
        when = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise ConfigError(
            f"{text!r} is not a position: use 'earliest', 'latest', an ISO time (2014-04-20T08:00:00Z) "
            "or PARTITION:OFFSET,… (0:100,1:250)"
        ) from None
    return when.astimezone(UTC).replace(tzinfo=None) if when.tzinfo else when


def time_column(projection: Projection) -> str | None:
    """The event-time column of ``projection``: its ``lake_time``, else ``occurred_at``, else its
    first timestamp column (``None``: it has none)."""
    names = [c.name for c in projection.columns if pa.types.is_timestamp(c.type)]
    if projection.lake_time:
        return projection.lake_time
    return "occurred_at" if "occurred_at" in names else (names[0] if names else None)


def resolve_position(
    spec: str | None,
    marks: Mapping[int, int],
    default: Mapping[int, int],
    at_time: Callable[[datetime], dict[int, int]],
) -> dict[int, int]:
    """``{partition: offset}`` of a ``--from``/``--to`` ``spec``: ``None`` → ``default``;
    ``earliest`` → 0; ``latest`` → ``marks`` (the high watermarks); ``P:O,…`` → those offsets
    (unlisted partitions: ``default``); an ISO time → ``at_time(naive UTC datetime)``. Offsets are
    clamped to ``[0, marks[p]]``.

    Raises:
        ConfigError: a malformed spec or a partition the topic does not have.
    """
    if spec is None:
        out = dict(default)
    elif spec.strip().lower() == "earliest":
        out = {p: 0 for p in marks}
    elif spec.strip().lower() == "latest":
        out = dict(marks)
    elif _PARTITION_SPEC.match(spec):
        out = dict(default)
        for item in spec.split(","):
            part, off = (int(x) for x in item.split(":"))
            if part not in marks:
                raise ConfigError(
                    f"partition {part} in {spec!r} does not exist (partitions: {sorted(marks)})"
                )
            out[part] = off
    else:
        out = at_time(parse_time(spec))
    return {p: max(0, min(int(out.get(p, 0)), marks[p])) for p in marks}


# -- sources -----------------------------------------------------------------------------------------
def kafka_batches(
    settings: Settings, topic: str, start: Mapping[int, int], stop: Mapping[int, int], batch_size: int
) -> Batches:
    """Records ``[start[p], stop[p])`` of ``topic`` in batches of at most ``batch_size``, read by
    :func:`events.log.read_batches` (a reader ``assign()``-ed to the partitions, no group). Yields
    ``(records, next offsets)``; a partition whose remaining offsets hold no data records
    (transaction markers) ends at ``stop`` once the reader reaches the end of the log.

    Raises:
        OffsetMismatchError: an offset is out of range or the topic vanished (the log changed).
        TransientError: no progress for 30 s.
    """
    ranges = {(topic, p): (int(start.get(p, 0)), int(end)) for p, end in stop.items()}
    for msgs, positions in read_batches(
        settings, ranges, purpose="replay", batch=batch_size, idle_timeout_s=_IDLE_TIMEOUT_S
    ):
        yield msgs, {p: o for (_, p), o in positions.items()}


def archive_batches(
    settings: Settings, topic: str, start: Mapping[int, int], stop: Mapping[int, int], batch_size: int
) -> Batches:
    """As :func:`kafka_batches`, from the Parquet archive (:func:`projections.archive.iter_archive`).

    Raises:
        ConfigError: the archive module is not available.
    """
    iter_archive = _archive()[0]
    positions = {p: int(start.get(p, 0)) for p in stop}
    for batch in iter_archive(settings, topic, start=dict(start), stop=dict(stop), batch_size=batch_size):
        for msg in batch:
            positions[msg.partition()] = msg.offset() + 1
        yield batch, dict(positions)
    yield [], {p: max(positions[p], stop[p]) for p in stop}


def _archive() -> tuple[Callable[..., Iterator[list[Any]]], Callable[..., dict[int, int]]]:
    try:
        from projections import archive  # noqa: PLC0415 (optional: issue 7's archiver)

        return archive.iter_archive, archive.archived_positions
    except (ImportError, AttributeError) as exc:
        raise ConfigError(
            f"--source archive is not available: projections.archive ({exc}) is missing; archive the "
            "log first with 'backbeat archive' (issue 7), or replay from kafka"
        ) from None


def _batches(source: str) -> Callable[..., Batches]:
    return kafka_batches if source == "kafka" else archive_batches


# -- the live read model -----------------------------------------------------------------------------
def _exists(conn: duckdb.DuckDBPyConnection, name: str) -> str | None:
    """``"table"``, ``"view"`` or ``None``."""
    if conn.execute("SELECT count(*) FROM duckdb_tables() WHERE table_name = ?", [name]).fetchall()[0][0]:
        return "table"
    if conn.execute(
        "SELECT count(*) FROM duckdb_views() WHERE NOT internal AND view_name = ?", [name]
    ).fetchall()[0][0]:
        return "view"
    return None


def _live_offsets(conn: duckdb.DuckDBPyConnection, name: str, topic: str) -> dict[int, int]:
    if _exists(conn, OFFSETS_TABLE) is None:
        return {}
    return {p: s.next_offset for (_, t, p), s in load_offsets(conn, [name]).items() if t == topic}


def _live_version(conn: duckdb.DuckDBPyConnection, name: str) -> tuple[int, str] | None:
    if _exists(conn, VERSIONS_TABLE) is None:
        return None
    rows = conn.execute(
        f"SELECT version, topic FROM {VERSIONS_TABLE} WHERE projection = ?", [name]
    ).fetchall()
    return (int(rows[0][0]), str(rows[0][1])) if rows else None


def offsets_at_time(
    settings: Settings,
    projection: Projection,
    when: datetime,
    marks: Mapping[int, int],
    read: Callable[..., Batches],
    lookup: Callable[[int], dict[str, Any]],
) -> tuple[dict[int, int], str]:
    """Per partition, the first offset whose event time is at or after ``when`` (naive UTC), and
    how it was found (``index`` of the live read model, or ``scan`` of the source); partitions
    with no such record: their end. See the module docstring.

    Raises:
        ConfigError: the projection has no event-time column.
    """
    col = time_column(projection)
    if col is None:
        raise ConfigError(f"{projection.name} has no event-time column: give offsets (P:O,…) instead")
    db = settings.duckdb_path
    if db.exists():
        with reader(db) as conn:
            live = _live_version(conn, projection.name)
            if live is not None and live[1] == projection.topic and _exists(conn, projection.name):
                cols = {r[0] for r in conn.execute(f'DESCRIBE "{projection.name}"').fetchall()}
                if col in cols:
                    ends = _live_offsets(conn, projection.name, projection.topic)
                    rows = conn.execute(
                        f'SELECT "{PARTITION_COL}", min("{OFFSET_COL}") FROM "{projection.name}" '
                        f'WHERE "{col}" >= ? GROUP BY 1',
                        [when],
                    ).fetchall()
                    found = {int(p): int(o) for p, o in rows}
                    return {p: found.get(p, ends.get(p, marks[p])) for p in marks}, "index"
    found = {}
    preparer = BatchPreparer({projection.topic: projection}, lookup)
    cutoff = pa.scalar(when, pa.timestamp("ms"))
    for msgs, _ in read(settings, projection.topic, {p: 0 for p in marks}, marks, 50_000):
        table = preparer.prepare(msgs).tables.get(projection.name) if msgs else None
        if table is None or table.num_rows == 0:
            continue
        late = table.filter(pc.greater_equal(table[col], cutoff))
        for p, o in zip(late[PARTITION_COL].to_pylist(), late[OFFSET_COL].to_pylist(), strict=True):
            found[p] = min(o, found.get(p, o))
    return {p: found.get(p, marks[p]) for p in marks}, "scan"


# -- verification ------------------------------------------------------------------------------------
def _content_columns(conn: duckdb.DuckDBPyConnection, table: str) -> list[str]:
    cols = [str(r[0]) for r in conn.execute(f'DESCRIBE "{table}"').fetchall()]
    return [c for c in cols if c not in (PARTITION_COL, OFFSET_COL)]


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


def _open_build(
    settings: Settings,
    proj: Projection,
    source: str,
    start: str | None,
    stop: str | None,
    marks: Mapping[int, int],
    at_time: Callable[[datetime], dict[int, int]],
    timeout_s: float,
) -> _Build:
    """Resume the projection's build in progress, or start a new one (table, builds row)."""
    with writer(settings.duckdb_path, timeout_s) as conn:
        for ddl in (*BOOKKEEPING_DDL, _TALLY_DDL):
            conn.execute(ddl)
        found = _building(conn, proj.name)
    if found is not None:
        build, version, table, topic, src, start_json, stop_json = found
        if int(version) == proj.version and topic == proj.topic and src == source:
            s0, s1 = _offsets_of(start_json), _offsets_of(stop_json)
            want0 = resolve_position(start, marks, s0, at_time) if start else s0
            want1 = resolve_position(stop, marks, s1, at_time) if stop else s1
            if (want0, want1) != (s0, s1):
                raise ConfigError(
                    f"build {build} of {proj.name} (version {version}) is in progress over {s0} → {s1}; "
                    "run the replay without --from/--to to resume it, or 'backbeat replay "
                    f"{proj.name} --drop-only --abandon' to give it up"
                )
            return _Build(int(build), int(version), str(table), s0, s1, resumed=True)
    begin = resolve_position(start, marks, {p: 0 for p in marks}, at_time)
    end = resolve_position(stop, marks, marks, at_time)
    end = {p: max(end[p], begin[p]) for p in marks}
    with writer(settings.duckdb_path, timeout_s) as conn:
        conn.begin()
        if found is not None:  # another version/topic/source: the interrupted build is given up
            conn.execute(
                f"UPDATE {BUILDS_TABLE} SET state = 'abandoned', note = ? WHERE projection = ? AND build = ?",
                [f"superseded by a replay of version {proj.version} from {source}", proj.name, found[0]],
            )
        n = int(
            conn.execute(
                f"SELECT coalesce(max(build), 0) + 1 FROM {BUILDS_TABLE} WHERE projection = ?", [proj.name]
            ).fetchall()[0][0]
        )
        table = f"{proj.name}__v{proj.version}_b{n}"
        conn.execute(f'DROP TABLE IF EXISTS "{table}"')
        conn.execute(f"DELETE FROM {TALLY_TABLE} WHERE build_table = ?", [table])
        conn.execute(f"INSERT INTO {TALLY_TABLE} VALUES (?, 0, 0)", [table])
        conn.execute(replace(proj, name=table).ddl)
        conn.execute(
            f"INSERT INTO {BUILDS_TABLE} VALUES (?, ?, ?, ?, ?, ?, 'building', ?, ?, ?, NULL, NULL)",
            [proj.name, n, proj.version, table, proj.topic, source, _offsets_json(begin), _offsets_json(end),
             now_utc()],
        )  # fmt: skip
        conn.commit()
    return _Build(n, proj.version, table, begin, end, resumed=False)


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


class _Builder:
    """Applies records of one build's range to its table, batch by batch, reporting progress."""

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
        self.records = 0
        self.started = time.monotonic()

    def positions(self) -> dict[int, int]:
        """The build's stored next offsets (its start where none is stored yet)."""
        with writer(self.settings.duckdb_path, self.timeout_s) as conn:
            stored = _live_offsets(conn, self.build.table, self.proj.topic)
        return {p: max(stored.get(p, 0), self.build.start.get(p, 0)) for p in self.build.stop}

    def run(self, stop: Mapping[int, int], phase: str) -> dict[int, int]:
        """Apply ``[stored positions, stop)``; returns the positions reached (= ``stop``).

        The DuckDB file stays open across writes (:class:`~projections.store.WriterSession`: it
        closes and waits while a reader such as ``backbeat sql`` is at the turnstile); batches
        read are gathered until they hold ``write_rows`` rows (or the range ends), and each
        write is appended on a writer thread while the next records are read and decoded, its
        rows added to the build's tally (:data:`TALLY_TABLE`) in the same transaction.
        """
        positions = self.positions()
        target = {p: max(stop.get(p, 0), positions[p]) for p in positions}
        total = sum(target[p] - self.build.start.get(p, 0) for p in target)
        topic = self.proj.topic
        pending: tuple[Future[None], dict[int, int], int] | None = None
        gathered: Prepared | None = None  # batches read, not yet submitted
        gathered_at: dict[int, int] = {}
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
                pending = (pool.submit(self._write, session, gathered), dict(gathered_at), gathered_records)
                gathered, gathered_records = None, 0

            for msgs, reached in self.read(self.settings, topic, positions, target, self.batch_size):
                if msgs:
                    prepared = wait_out(
                        lambda m=msgs: self.preparer.prepare(m), what=f"replay {self.proj.name}: decoding"
                    )
                    gathered = prepared if gathered is None else gathered.merge(prepared)
                    gathered_at.update(reached)
                    gathered_records += len(msgs)
                    if sum(t.num_rows for t in gathered.tables.values()) >= self.write_rows:
                        submit()
                elif gathered is None:
                    settle()
                    positions.update(reached)
                    self._report(phase, positions, target, total)
                else:
                    gathered_at.update(reached)
            submit()
            settle()
            pool.submit(self._finish, session, positions).result()
        self._report(phase, positions, target, total)
        return positions

    def _write(self, session: WriterSession, prepared: Prepared) -> None:
        """One write transaction (writer thread): rows appended, rejects, offsets."""
        with session.connection() as conn:
            conn.execute(f"SET memory_limit = '{_BUILD_MEMORY}'")  # the file stays open: bound its cache
            apply_batch(
                conn,
                self.settings.lake_dir,
                {self.proj.topic: self.proj},
                prepared,
                self.identity,
                append=True,
                on_written=_tally,
            )

    def _finish(self, session: WriterSession, positions: Mapping[int, int]) -> None:
        """Store the end positions (past the last data record: markers, EOF) and close the file."""
        with session.connection() as conn:
            conn.begin()
            stored = _live_offsets(conn, self.build.table, self.proj.topic)
            moved = {
                (self.build.table, self.proj.topic, p): o
                for p, o in positions.items()
                if o > stored.get(p, -1)
            }
            save_offsets(conn, moved, self.identity)
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


def _rejected(conn: duckdb.DuckDBPyConnection, table: str) -> set[tuple[int, int]]:
    rows = conn.execute(f'SELECT "partition", "offset" FROM {REJECTS_TABLE} WHERE projection = ?', [table])
    return {(int(p), int(o)) for p, o in rows.fetchall()}


def _switch(
    conn: duckdb.DuckDBPyConnection, proj: Projection, build: _Build, live_version: int | None
) -> None:
    """Make ``build`` the current version of ``proj`` (inside the caller's transaction)."""
    name, stamp = proj.name, now_utc()
    if current_build(conn, name) is None:
        kind = _exists(conn, name)
        if kind == "table":  # first replay: the live table joins the versioned scheme as build 0
            old_version = live_version if live_version is not None else proj.version
            old = f"{name}__v{old_version}_b0"
            conn.execute(f'DROP TABLE IF EXISTS "{old}"')
            conn.execute(f'ALTER TABLE "{name}" RENAME TO "{old}"')
            ends = _live_offsets(conn, name, proj.topic)
            conn.execute(
                f"INSERT OR REPLACE INTO {BUILDS_TABLE} "
                "VALUES (?, 0, ?, ?, ?, 'kafka', 'old', '{}', ?, ?, ?, ?)",
                [name, old_version, old, proj.topic, _offsets_json(ends), stamp, stamp,
                 "the live table before the first replay"],
            )  # fmt: skip
        elif kind == "view":
            conn.execute(f'DROP VIEW "{name}"')
    else:
        conn.execute(
            f"UPDATE {BUILDS_TABLE} SET state = 'old' WHERE projection = ? AND state = 'current'", [name]
        )
    conn.execute(f'CREATE OR REPLACE VIEW "{name}" AS SELECT * FROM "{build.table}"')
    conn.execute(
        f"UPDATE {BUILDS_TABLE} SET state = 'current', switched_at = ? WHERE projection = ? AND build = ?",
        [stamp, name, build.build],
    )
    conn.execute(f"DELETE FROM {OFFSETS_TABLE} WHERE projection = ?", [name])
    conn.execute(f"UPDATE {OFFSETS_TABLE} SET projection = ? WHERE projection = ?", [name, build.table])
    conn.execute(
        f"INSERT OR REPLACE INTO {VERSIONS_TABLE} VALUES (?, ?, ?, ?)",
        [name, build.version, proj.topic, stamp],
    )
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


def drop_old_versions(
    settings: Settings, name: str, *, abandon: bool = False, timeout_s: float = 120.0
) -> list[str]:
    """Drop every version of read model ``name`` that is not current (``old``, ``failed``,
    ``abandoned``; with ``abandon`` an interrupted ``building`` one too): their tables, their
    offsets and rejects, their ``projection_builds`` rows. Returns the tables dropped.

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
            for ddl in BOOKKEEPING_DDL:
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
                conn.execute(f"DELETE FROM {TALLY_TABLE} WHERE build_table = ?", [table])
                for book in (OFFSETS_TABLE, REJECTS_TABLE):
                    conn.execute(f"DELETE FROM {book} WHERE projection = ?", [table])
                conn.execute(f"DELETE FROM {BUILDS_TABLE} WHERE projection = ? AND build = ?", [name, build])
            conn.commit()
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
    drop_old: bool = False,
    progress: Callable[[ReplayProgress], None] | None = None,
    projection: Projection | None = None,
    batch_size: int = 50_000,
    lookup: Callable[[int], dict[str, Any]] | None = None,
    db_timeout_s: float = 120.0,
    switch_tries: int = 5,
    recount_source: bool = False,
    write_rows: int = WRITE_ROWS,
) -> ReplayResult:
    """Rebuild read model ``name`` blue/green (module docstring): build, verify, switch.

    ``source``: ``kafka`` or ``archive``; ``start``/``stop``: ``earliest`` | ``latest`` | ISO time
    | ``P:O,…`` (default: the start of the log and the high watermarks at start, from Fetch
    responses); ``projection``: the projection to build (default ``PROJECTIONS[name]``; a changed
    mapping with a bumped ``version``, or another topic); ``batch_size``: records per read (a write
    gathers reads up to ``write_rows`` rows, default :data:`WRITE_ROWS`);
    ``progress``: called after every batch; ``drop_old``: drop the non-current versions after a
    switch; ``recount_source``: verify against a second read and decode of the source range
    instead of the keys counted over the rows appended while building (slower: reads everything
    twice). A build in
    progress for the same version, topic and source is resumed.

    Returns the :class:`ReplayResult`; ``verified=False`` (nothing switched, the build kept as
    ``failed``) when verification found a mismatch.

    Raises:
        ConfigError: unknown or stateful projection, bad position, bad source, archive missing.
        ReplayError: another replay of ``name`` runs, or the live runner kept moving past the build.
        OffsetMismatchError, InfraError, DatabaseBusyError: as the projection runner.
    """
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
    read = _batches(source)
    started = time.monotonic()
    with _replay_lock(settings.duckdb_path, name):
        if source == "archive":
            marks = _archive()[1](settings, proj.topic)
            identity = log_identity(settings, [proj.topic])
        else:
            identity = log_identity(settings, [proj.topic])
            if proj.topic not in identity.topic_ids:
                raise InfraError(f"topic {proj.topic} does not exist on {settings.bootstrap_servers}")
            marks = high_watermarks(settings, proj.topic)

        def at_time(when: datetime) -> dict[int, int]:
            return offsets_at_time(settings, proj, when, marks, read, lookup)[0]

        build = _open_build(settings, proj, source, start, stop, marks, at_time, db_timeout_s)
        builder = _Builder(
            settings, proj, build, read, lookup, identity, batch_size, db_timeout_s, progress, write_rows
        )
        end = builder.run(build.stop, "build")
        verification: Verification | None = None
        for _ in range(max(1, switch_tries)):
            with reader(settings.duckdb_path, db_timeout_s) as conn:
                live = _live_offsets(conn, name, proj.topic)
            if any(live.get(p, 0) > end.get(p, 0) for p in live):  # the live runner is further: catch up
                end = builder.run({p: max(end.get(p, 0), live.get(p, 0)) for p in end}, "catch-up")
            tally, appended = _dedupe(settings, proj, build, db_timeout_s)
            verification = _verify(
                settings, proj, build, end, live, read, lookup, batch_size, db_timeout_s, tally, appended,
                recount_source,
            )  # fmt: skip
            with writer(settings.duckdb_path, db_timeout_s) as conn:
                conn.begin()
                now_live = _live_offsets(conn, name, proj.topic)
                if any(now_live.get(p, 0) > end.get(p, 0) for p in now_live):
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
                    _switch(conn, proj, build, live_version[0] if live_version else None)
                conn.commit()
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


def _tally(conn: duckdb.DuckDBPyConnection, table: str, rows: pa.Table) -> None:
    """Add ``rows`` (just written to build table ``table``) to its tally, in the write's transaction."""
    conn.register("bb_tally", rows)
    try:
        n, row_sum = row_checksum(conn, "bb_tally", table)
    finally:
        conn.unregister("bb_tally")
    conn.execute(  # no row: a build begun by an older backbeat, which kept no tally
        f'UPDATE {TALLY_TABLE} SET "rows" = "rows" + ?, row_sum = row_sum + ? WHERE build_table = ?',
        [n, row_sum, table],
    )


def _dedupe(
    settings: Settings, proj: Projection, build: _Build, timeout_s: float
) -> tuple[tuple[int, int] | None, Deduped]:
    """Apply ``proj``'s policy to the build's appended rows (:func:`~projections.apply.dedupe`),
    in one transaction under :data:`_DUCKDB_MEMORY`; returns the build's tally as it was (the rows
    written, ``(rows, row checksum)``; ``None`` for a build begun by an older backbeat, which kept
    none) and what the dedupe counted before deleting. The tally
    then loses the deleted rows, so a dedupe run again (a resumed replay) finds them equal again."""
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
    """The live comparison when it applies (checked again under the writer by the caller), else the
    build's rows against the distinct keys of the source range: as counted over the appended rows
    by the dedupe (``appended``), or from a second read of the source (``recount_source``). Either
    way the appended rows must first be the rows the build's writes committed (``tally``: count
    and checksum of every column)."""
    with reader(settings.duckdb_path, timeout_s) as conn:
        conn.execute(f"SET memory_limit = '{_DUCKDB_MEMORY}'")
        live_version = _live_version(conn, proj.name)
        same = (
            live_version == (build.version, proj.topic)
            and all(o == 0 for o in build.start.values())
            and all(live.get(p, 0) == end.get(p, 0) for p in {*live, *end})
            and _exists(conn, proj.name) is not None
        )
        if tally is not None and tally != (appended.rows, appended.row_checksum):
            return Verification(
                "recount", False, tally, (appended.rows, appended.row_checksum),
                f"the build table held {appended.rows:,} rows (row checksum {appended.row_checksum}) before "
                f"the dedupe, but its writes had committed {tally[0]:,} (row checksum {tally[1]}): rows "
                "were lost, repeated or altered outside the replay",
            )  # fmt: skip
        if same:
            return Verification(
                "live", True, (0, 0), (0, 0), "compared with the live read model at the switch"
            )
        got = _build_keys(conn, proj, build.table)
        if not recount_source:
            expected = (appended.keys, appended.checksum)
            how = f"counted over the {appended.rows:,} rows appended while building"
            if tally is None:
                how += "; a build begun by an older backbeat: no tally to check them against"
        else:
            rejected = _rejected(conn, build.table)
    if recount_source:
        expected = _recount(settings, proj, read, build.start, end, lookup, rejected, batch_size)
        how = "recounted by a second read of the source"
    ok = expected == got
    if ok:
        detail = f"{got[0]:,} rows, one per distinct key of the source range ({how}), checksums equal"
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
    "SOURCES",
    "ReplayError",
    "ReplayProgress",
    "ReplayResult",
    "TALLY_TABLE",
    "Verification",
    "WRITE_ROWS",
    "archive_batches",
    "drop_old_versions",
    "kafka_batches",
    "offsets_at_time",
    "parse_time",
    "progress_of",
    "replay",
    "resolve_position",
    "table_checksum",
    "time_column",
]
