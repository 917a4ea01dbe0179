"""The projection runner: reads the projections' topics and keeps their DuckDB read models (and
the Parquet lake) up to date, exactly once.

How it runs:

1. Start: read the live log identity (cluster id, topic ids) and each partition's high
   watermark from Fetch responses (:func:`events.offsets.high_watermarks`, since ListOffsets
   LATEST is wrong on Tansu); open DuckDB once to create tables (with their views and macros,
   ``Projection.extra_ddl``, and the views over several read models once their tables exist:
   the experiment readout, :func:`projections.experiment_readout.ensure_views`), load the stored
   offsets and check them against the log
   (:func:`projections.tracking.check_offsets`, raising ``OffsetMismatchError``), finish a lake
   switch a replay left undone (:func:`projections.lake.finish_switches`), and delete orphan lake
   files.
2. A :class:`events.log.LogReader` is ``assign()``-ed to every partition at its stored offset
   (no consumer-group join, so no Tansu join delay; nothing is committed to Kafka: the offsets
   live in DuckDB). Its errors are classified once (:func:`events.log.classify`): the log changed
   under the runner → ``OffsetMismatchError``; every broker down → the log identity is checked
   again before the next batch is written.
3. Loop: consume up to ``batch_size`` records or ``linger_s`` seconds, decode, validate and map
   them to Arrow (:mod:`projections.decoding`), then write them in one DuckDB transaction with
   their offsets (:func:`projections.apply.apply_batch`) on a writer thread while the next batch
   is consumed (DuckDB and Parquet release the GIL). The database is opened per batch, so
   ``backbeat sql`` can read in between (:mod:`projections.store`). A registry that cannot be
   reached while decoding is waited out (:func:`events.log.wait_out`: backoff, a log line per
   wait, ``RunStats.waits``): the batch is decoded again, nothing is rejected for it.
4. Stop when every partition reached the high watermark taken at start
   (``until_caught_up=True``), or on :meth:`ProjectionRunner.stop` / SIGTERM / SIGINT, after the
   batch in flight is committed.

Stateful read models (:data:`STATEFUL`, e.g. :mod:`projections.recommendations`) bring their
own batch step (``write=``, in place of ``apply_batch``) and read a topic another projection reads
too, so :func:`run_projections` gives each one a runner of its own and runs all runners at once
(:func:`run_together`, a thread each; one DuckDB instance per process serves their connections,
and their transactions write different rows).

``python -m projections.runner [--until-caught-up] [--projection NAME]...`` runs it from a shell.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import duckdb

from events.log import LogReader, wait_out
from events.offsets import high_watermarks
from events.registry_client import registry_for
from events.serde import AvroDecoder
from infra import metrics
from infra.errors import BackbeatError, ConfigError, OffsetMismatchError, TransientError
from infra.lifecycle import LoopService, run_process
from infra.ops import add_port_argument, port_setting
from infra.settings import Settings
from projections import experiment_readout, lake
from projections.apply import Applied, apply_batch
from projections.decoding import INVALID, BatchPreparer, Prepared, Reject
from projections.readmodels import PROJECTIONS, Projection, get_projection
from projections.recommendations import RECOMMENDATIONS, RecommendationsWriter
from projections.store import WriterSession, writer
from projections.tracking import (
    LogIdentity,
    check_offsets,
    check_topics_exist,
    ensure_tables,
    load_offsets,
    log_identity,
)

log = logging.getLogger("backbeat.projections")

TopicPart = tuple[str, int]


@dataclass
class RunStats:
    """What a run did. ``applied``: rows written to read models (per projection in
    ``per_projection``); ``duplicates``: events whose key was already applied (``first``) or
    superseded in their batch (``last``); ``redelivered``: records at offsets already applied;
    ``rejects``: records stored in ``projection_rejects``; ``controls``: control records skipped;
    ``records``: every record consumed; ``waits``: times a batch waited for an unreachable
    registry; ``elapsed_s``: wall time in seconds."""

    records: int = 0
    applied: int = 0
    duplicates: int = 0
    redelivered: int = 0
    rejects: int = 0
    controls: int = 0
    batches: int = 0
    lake_files: int = 0
    waits: int = 0
    elapsed_s: float = 0.0
    per_projection: dict[str, int] = field(default_factory=dict)

    def add(self, done: Applied, records: int, controls: int) -> None:
        """Account one committed batch."""
        self.batches += 1
        self.records += records
        self.controls += controls
        self.duplicates += done.duplicates
        self.redelivered += done.redelivered
        self.rejects += done.rejects
        self.lake_files += done.lake_files
        for name, n in done.applied.items():
            self.applied += n
            self.per_projection[name] = self.per_projection.get(name, 0) + n

    @property
    def rate(self) -> float:
        """Records consumed per second of wall time."""
        return self.records / self.elapsed_s if self.elapsed_s > 0 else 0.0


@dataclass(frozen=True)
class Progress:
    """Reported after every committed batch. ``positions``/``starts``: next offset per
    ``(topic, partition)`` now and at start; ``targets``: the high watermarks to reach
    (``None`` in forever mode)."""

    stats: RunStats
    starts: dict[TopicPart, int]
    positions: dict[TopicPart, int]
    targets: dict[TopicPart, int] | None

    @property
    def done(self) -> int:
        """Records consumed since start."""
        return sum(self.positions[tp] - self.starts[tp] for tp in self.positions)

    @property
    def total(self) -> int | None:
        """Records to consume until caught up (``None`` in forever mode)."""
        if self.targets is None:
            return None
        return sum(max(0, t - self.starts[tp]) for tp, t in self.targets.items())


ProgressHook = Callable[[Progress], None]

#: The process name of ``python -m projections.runner`` (:data:`infra.ops.DEFAULT_PORTS`).
PROCESS = "projection-runner"


def component_name(projection: str) -> str:
    """The metrics component of read model ``projection``: ``projection:<name>``."""
    return f"projection:{projection}"


def reject_kind(reason: str) -> str:
    """The ``reason`` label of a reject (``backbeat_dead_letters_total``) from its stored reason
    text (:mod:`projections.decoding`, listed by ``backbeat projections rejects``):

    - ``validation_error``: a domain rule broken (``invalid: …``, :mod:`events.validation`);
    - ``wrong_event_type``: another event type than the read model reads (``event type X is not Y…``);
    - ``mapping_error``: the event does not map to a row (``… lacks field(s) …``, ``cannot map to …``);
    - ``decode_error``: anything else: no value (tombstone), not Confluent-framed Avro, a schema
      id the registry does not know, a body that does not decode.
    """
    if reason.startswith(INVALID):
        return "validation_error"
    if reason.startswith("event type ") and " is not " in reason:
        return "wrong_event_type"
    if " lacks field(s) " in reason or reason.startswith("cannot map to "):
        return "mapping_error"
    return "decode_error"


class RunnerMeter:
    """What one :class:`ProjectionRunner` reports to :mod:`infra.metrics`: one component per read
    model it feeds (:func:`component_name`), so that each read model has its own lag and
    readiness even when the process runs several runners (:func:`run_together`) and two of them
    read the same topic (``ad_reports`` and ``ad_reports_item``).

    A component's :class:`~infra.metrics.Observation`:

    - ``records_in`` ``{source topic: records}``: data records read from the read model's topic
      and committed (control records, the producers' watermarks, are not counted: the same rule
      as the agents', so one side's records out equal the other side's records in);
    - ``records_out`` ``{read model (table) name: rows}``: rows applied to the read model — the
      *topic* label of ``backbeat_records_out_total`` is the read model's name here;
    - ``dead_letters`` ``{reason: records}``: records stored in ``projection_rejects``, by
      :func:`reject_kind`;
    - ``retries``: waits for an unreachable registry (``RunStats.waits`` of the runner, so every
      read model fed by that runner shows the same count);
    - ``positions`` ``{(topic, partition): next offset}``: committed, i.e. what the read model holds;
    - ``ready``: every partition of its topic reached the high watermark taken at start;
    - ``detail``: ``applied`` and ``rejects`` of this read model, and ``duplicates``,
      ``redelivered``, ``batches``, ``waits`` of its runner (shared by the read models listed in
      ``runner``, which are written in the same transactions).

    The runner's loop calls :meth:`commit` per committed batch; :meth:`observe` runs on the ops
    server thread: both hold a lock and :meth:`observe` copies, so a scrape never sees a batch
    half-counted.
    """

    def __init__(self, projections: Sequence[Projection]) -> None:
        self._lock = threading.Lock()
        self.topic_of = {p.name: p.topic for p in projections}
        self.records_in: dict[str, int] = {}
        self.applied: dict[str, int] = {}
        self.rejects: dict[str, Counter[str]] = {p.name: Counter() for p in projections}
        self.positions: dict[TopicPart, int] = {}
        self.targets: dict[TopicPart, int] | None = None
        self.stats = RunStats()
        self._ready: set[str] = set()

    # -- registration ---------------------------------------------------------------------------
    def register(self) -> None:
        """Register a component per read model (replacing an earlier runner's of the same name)."""
        for name in self.topic_of:
            metrics.register(component_name(name), lambda name=name: self.observe(name))

    def unregister(self) -> None:
        """Stop reporting (the run ended)."""
        for name in self.topic_of:
            metrics.unregister(component_name(name))

    # -- updates (the runner's thread) ----------------------------------------------------------
    def start(self, positions: Mapping[TopicPart, int], targets: Mapping[TopicPart, int]) -> None:
        """The stored positions and the high watermarks to reach, known after start-up."""
        with self._lock:
            self.positions = dict(positions)
            self.targets = dict(targets)
        self._log_ready()

    def fresh_rejects(self, rejects: Sequence[Reject]) -> list[Reject]:
        """The rejects at or after the committed positions (those a batch stores; the others are
        redelivered, :func:`projections.apply.apply_batch`)."""
        with self._lock:
            pos = dict(self.positions)
        return [r for r in rejects if r.offset >= pos.get((r.topic, r.partition), 0)]

    def commit(
        self,
        stats: RunStats,
        counts: Mapping[str, int],
        applied: Mapping[str, int],
        rejects: Sequence[Reject],
        positions: Mapping[TopicPart, int],
    ) -> None:
        """Account one committed batch: ``counts`` records read per topic, rows ``applied`` per
        read model, the ``rejects`` stored (:meth:`fresh_rejects`), the reader's ``positions``
        after the batch; ``stats`` is the runner's running total."""
        with self._lock:
            for topic, n in counts.items():
                self.records_in[topic] = self.records_in.get(topic, 0) + n
            for name, n in applied.items():
                self.applied[name] = self.applied.get(name, 0) + n
            for r in rejects:
                self.rejects.setdefault(r.projection, Counter())[reject_kind(r.reason)] += 1
            for tp, off in positions.items():
                if off > self.positions.get(tp, -1):
                    self.positions[tp] = off
            self.stats = RunStats(**{**asdict(stats), "per_projection": {}})
        self._log_ready()

    def advance(self, positions: Mapping[TopicPart, int]) -> None:
        """Positions the reader moved on without records (past control or transaction markers)
        while nothing was pending."""
        self.commit(self.stats, {}, {}, [], positions)

    def _is_ready(self, name: str) -> bool:
        topic = self.topic_of[name]
        if self.targets is None:
            return False
        return all(self.positions.get(tp, 0) >= t for tp, t in self.targets.items() if tp[0] == topic)

    def _log_ready(self) -> None:
        with self._lock:
            now = {n for n in self.topic_of if n not in self._ready and self._is_ready(n)}
            self._ready |= now
        for name in sorted(now):
            log.info("%s: caught up with the log's end at start", name,
                     extra={"projection": name, "topic": self.topic_of[name]})  # fmt: skip

    # -- reading (the ops server's thread) ------------------------------------------------------
    def observe(self, name: str) -> metrics.Observation:
        """The :class:`~infra.metrics.Observation` of read model ``name`` (see the class doc)."""
        topic = self.topic_of[name]
        with self._lock:
            positions = {tp: off for tp, off in self.positions.items() if tp[0] == topic}
            rejects = dict(self.rejects.get(name, {}))
            applied = self.applied.get(name, 0)
            stats = self.stats
            return metrics.Observation(
                records_in={topic: self.records_in.get(topic, 0)},
                records_out={name: applied},
                dead_letters=rejects,
                retries=stats.waits,
                positions=positions,
                ready=name in self._ready or self._is_ready(name),
                detail={
                    "applied": applied,
                    "rejects": sum(rejects.values()),
                    "duplicates": stats.duplicates,
                    "redelivered": stats.redelivered,
                    "batches": stats.batches,
                    "waits": stats.waits,
                    "runner": sorted(self.topic_of),
                },
            )


#: One batch transaction: ``(connection, lake dir, {topic: projection}, prepared batch, log
#: identity) -> Applied``; it must write the batch's offsets (``save_offsets``) in the same
#: transaction. :func:`projections.apply.apply_batch` is the default.
BatchWriter = Callable[
    [duckdb.DuckDBPyConnection, Path, Mapping[str, Projection], Prepared, LogIdentity], Applied
]

#: Read models with their own batch step, by name: the projection and a factory of its writer.
STATEFUL: dict[str, tuple[Projection, Callable[[Settings], BatchWriter]]] = {
    RECOMMENDATIONS.name: (RECOMMENDATIONS, RecommendationsWriter),
}

#: Runners in one process create tables one at a time (concurrent CREATEs of the same bookkeeping
#: table would conflict in DuckDB).
_START_LOCK = threading.Lock()


@dataclass(frozen=True)
class _Pending:
    """A batch handed to the writer thread: its transaction's future (what it did, seconds), its
    record and control counts, records per topic, the rejects it stores, the reader's positions
    after it and the read models it feeds."""

    future: Future[tuple[Applied, float]]
    records: int
    controls: int
    counts: Mapping[str, int]
    rejects: list[Reject]
    positions: dict[TopicPart, int]
    projections: list[str]


class ProjectionRunner:
    """Runs ``projections`` against ``settings``' broker, registry and DuckDB (default: every
    projection of :data:`~projections.readmodels.PROJECTIONS` that one runner can feed, the first
    group of :func:`share_runners`; :func:`run_projections` runs them all).

    ``batch_size``: most records per transaction; ``linger_s``: longest wait to fill a batch
    (seconds); ``progress``: called with a :class:`Progress` after each committed batch;
    ``lookup``: schema id → parsed schema (default: the registry at ``settings.registry_url``),
    or the :class:`~events.serde.AvroDecoder` to decode with.

    ``write``: the batch step (default :func:`~projections.apply.apply_batch`; a stateful read
    model passes its own, see :data:`STATEFUL`).

    Raises:
        ConfigError: two projections read the same topic (one consumer feeds one projection
            per topic).
    """

    def __init__(
        self,
        settings: Settings,
        projections: Iterable[Projection] | None = None,
        *,
        batch_size: int = 50_000,
        linger_s: float = 0.5,
        progress: ProgressHook | None = None,
        lookup: Callable[[int], dict[str, Any]] | AvroDecoder | None = None,
        db_timeout_s: float = 120.0,
        write: BatchWriter | None = None,
    ) -> None:
        self.settings = settings
        self.projections = (
            share_runners(list(PROJECTIONS.values()))[0] if projections is None else list(projections)
        )
        self.by_topic: dict[str, Projection] = {}
        for proj in self.projections:
            other = self.by_topic.setdefault(proj.topic, proj)
            if other is not proj:
                raise ConfigError(
                    f"projections {other.name} and {proj.name} both read {proj.topic}, and one runner "
                    "feeds one projection per topic: give them a runner each (run_projections does)"
                )
        self.batch_size = max(1, batch_size)
        self.linger_s = linger_s
        self.progress = progress
        self.db_timeout_s = db_timeout_s
        self._lookup = lookup or registry_for(settings.registry_url).parsed_schema_by_id
        self._stop = threading.Event()
        self._apply: BatchWriter = write or apply_batch
        self.meter = RunnerMeter(self.projections)

    # -- control --------------------------------------------------------------------------------
    def stop(self) -> None:
        """Ask a running :meth:`run` to stop after the batch in flight (thread- and signal-safe)."""
        self._stop.set()

    # -- start-up -------------------------------------------------------------------------------
    def _start(self) -> tuple[LogIdentity, dict[TopicPart, int], dict[TopicPart, int | None]]:
        """Identity, high watermarks and stored offsets (``None`` = never read) after checks."""
        topics = sorted(self.by_topic)
        identity = log_identity(self.settings, topics)
        with _START_LOCK, writer(self.settings.duckdb_path, self.db_timeout_s) as conn:
            conn.begin()
            for proj in self.projections:
                ensure_tables(conn, proj)
                for statement in proj.extra_ddl:  # its views and macros (idempotent)
                    conn.execute(statement)
            # views joining read models that different runners create: whichever starts second makes them
            experiment_readout.ensure_views(conn)
            conn.commit()
            stored = load_offsets(conn, [p.name for p in self.projections])
            bootstrap = self.settings.bootstrap_servers
            check_offsets(stored.values(), identity, {}, bootstrap, cluster_only=True)
            check_topics_exist(stored.values(), identity, topics)
            marks = {t: high_watermarks(self.settings, t) for t in topics}
            check_offsets(stored.values(), identity, marks, bootstrap)
            lake.finish_switches(conn, self.settings.lake_dir)  # a replay's switch cut short (lake.py)
            for proj in self.projections:
                if proj.lake:
                    removed = lake.remove_orphans(conn, self.settings.lake_dir, proj.name)
                    if removed:
                        log.warning(
                            "%s: removed %d orphan lake file(s) of an uncommitted batch", proj.name, removed
                        )
        flat = {(t, p): hwm for t, parts in marks.items() for p, hwm in parts.items()}
        starts: dict[TopicPart, int | None] = {}
        for topic, part in flat:
            found = stored.get((self.by_topic[topic].name, topic, part))
            starts[(topic, part)] = found.next_offset if found else None
        return identity, flat, starts

    def _reader(self, starts: dict[TopicPart, int | None]) -> LogReader:
        reader = LogReader(
            self.settings,
            "projections",
            hint="Rebuild: re-import the data and run 'backbeat projections reset <name>', then run "
            "the projections again",
        )
        reader.assign(starts)
        return reader

    def _prepare(self, preparer: BatchPreparer, msgs: list[Any], stats: RunStats) -> Prepared | None:
        """``preparer.prepare(msgs)``, waiting out an unreachable registry (``None``: stopped
        while waiting; the batch is not written and is read again by the next run)."""

        def waited(_exc: TransientError, _seconds: float) -> None:
            stats.waits += 1

        try:
            return wait_out(
                lambda: preparer.prepare(msgs), what=f"projections {', '.join(self.by_topic)}: decoding",
                stop=self._stop, on_wait=waited, logger=log,
            )  # fmt: skip
        except TransientError:
            if self._stop.is_set():
                return None
            raise

    def _verify_identity(self, reader: LogReader, identity: LogIdentity) -> None:
        if not reader.recheck:
            return
        reader.recheck = False
        live = log_identity(self.settings, self.by_topic)
        if live != identity:
            raise OffsetMismatchError(
                f"the broker at {self.settings.bootstrap_servers} changed while running: cluster "
                f"{identity.cluster_id} -> {live.cluster_id}, topic ids {dict(identity.topic_ids)} -> "
                f"{dict(live.topic_ids)}: the embedded broker was restarted empty or a topic was "
                "recreated. Nothing after the last committed batch was applied. Re-import the data "
                "and run 'backbeat projections reset <name>', then run the projections again"
            )

    def run(self, until_caught_up: bool = False) -> RunStats:
        """Run until caught up with the high watermarks taken at start (``until_caught_up``) or
        until :meth:`stop` / SIGTERM / SIGINT (handlers installed when called from the main
        thread). Returns the :class:`RunStats`.

        While it runs, each read model is a metrics component (:class:`RunnerMeter`, registered
        here and unregistered at the end), readable by ``/metrics`` and ``/health`` when the
        process serves them (:mod:`infra.ops`).

        Raises:
            OffsetMismatchError: stored offsets do not belong to the live log (see
                :mod:`projections.tracking`), or it changed while running.
            InfraError: the broker, a topic or the registry cannot be reached.
            DatabaseBusyError: the DuckDB file stayed locked (another long writer or query).
        """
        meter = self.meter = RunnerMeter(self.projections)
        meter.register()
        try:
            return self._run(until_caught_up, meter)
        finally:
            meter.unregister()

    def _run(self, until_caught_up: bool, meter: RunnerMeter) -> RunStats:
        started = time.monotonic()
        stats = RunStats()
        identity, marks, stored = self._start()
        starts = {tp: off or 0 for tp, off in stored.items()}
        targets = marks if until_caught_up else None

        def caught_up() -> bool:
            return targets is not None and all(positions[tp] >= t for tp, t in targets.items())

        preparer = BatchPreparer(self.by_topic, self._lookup)
        reader = self._reader(stored)
        positions = reader.positions
        meter.start(positions, marks)
        restore = self._install_signals()
        pending: _Pending | None = None

        def settle() -> None:
            nonlocal pending
            if pending is None:
                return
            batch, pending = pending, None
            done, seconds = batch.future.result()
            stats.add(done, batch.records, batch.controls)
            stats.elapsed_s = time.monotonic() - started
            meter.commit(stats, batch.counts, done.applied, batch.rejects, batch.positions)
            for name in batch.projections:
                metrics.observe_batch(component_name(name), seconds)
            if self.progress is not None:
                self.progress(Progress(stats, starts, dict(positions), targets))

        try:
            with (
                WriterSession(self.settings.duckdb_path, self.db_timeout_s) as session,
                ThreadPoolExecutor(1, thread_name_prefix="bb-projection-writer") as pool,
            ):
                while not self._stop.is_set() and not caught_up():
                    msgs = reader.collect(self.batch_size, self.linger_s, stop=self._stop, until=caught_up)
                    if not msgs:  # idle: let readers have the file until records arrive
                        settle()
                        meter.advance(positions)
                        pool.submit(session.close).result()
                        continue
                    t0 = time.monotonic()
                    after = dict(positions)
                    prepared = self._prepare(preparer, msgs, stats)
                    if prepared is None:
                        break
                    settle()
                    self._verify_identity(reader, identity)
                    rejects = meter.fresh_rejects(prepared.rejects)
                    self._log_rejects(rejects)
                    future = pool.submit(self._write, session, prepared, identity, t0)
                    counts = Counter(m.topic() for m in msgs)  # data records: less the controls
                    counts.subtract(prepared.control_topics)
                    names = [self.by_topic[t].name for t in counts]
                    pending = _Pending(
                        future, prepared.records, prepared.controls, counts, rejects, after, names
                    )
                settle()
        finally:
            restore()
            reader.close()
        stats.elapsed_s = time.monotonic() - started
        return stats

    def _write(
        self, session: WriterSession, prepared: Prepared, identity: LogIdentity, t0: float
    ) -> tuple[Applied, float]:
        """One batch transaction (runs on the writer thread); returns what it did and the batch's
        seconds since ``t0`` (decode to commit)."""
        with session.connection() as conn:
            done = self._apply(conn, self.settings.lake_dir, self.by_topic, prepared, identity)
        return done, time.monotonic() - t0

    @staticmethod
    def _log_rejects(rejects: Sequence[Reject]) -> None:
        """One warning per read model and partition with rejects in a batch (the first one's
        offset and reason; ``backbeat projections rejects`` lists them all)."""
        groups: dict[tuple[str, str, int], list[Reject]] = {}
        for r in rejects:
            groups.setdefault((r.projection, r.topic, r.partition), []).append(r)
        for (name, topic, part), group in groups.items():
            first = group[0]
            log.warning(
                "%s: %d record(s) rejected, the first: %s", name, len(group), first.reason,
                extra={"projection": name, "topic": topic, "partition": part, "offset": first.offset},
            )  # fmt: skip

    def _install_signals(self) -> Callable[[], None]:
        return _on_signals(self.stop)


def _on_signals(stop: Callable[[], None]) -> Callable[[], None]:
    """Call ``stop`` on SIGTERM/SIGINT (from the main thread only); returns the undo."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None

    def handler(_signum: int, _frame: FrameType | None) -> None:
        stop()

    old = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGINT)}

    def restore() -> None:
        for sig, previous in old.items():
            signal.signal(sig, previous)

    return restore


def combine_stats(parts: Iterable[RunStats]) -> RunStats:
    """The sum of several runs' stats (``elapsed_s``: the longest)."""
    out = RunStats()
    for s in parts:
        for name in (
            "records",
            "applied",
            "duplicates",
            "redelivered",
            "rejects",
            "controls",
            "batches",
            "lake_files",
            "waits",
        ):
            setattr(out, name, getattr(out, name) + getattr(s, name))
        out.elapsed_s = max(out.elapsed_s, s.elapsed_s)
        for proj, n in s.per_projection.items():
            out.per_projection[proj] = out.per_projection.get(proj, 0) + n
    return out


def _merge_progress(parts: Mapping[int, Progress]) -> Progress:
    """One :class:`Progress` of several runners (runner ``i``'s keys become ``("<topic>#<i>", p)``,
    since two runners may read the same topic)."""

    def keyed(i: int, values: Mapping[TopicPart, int]) -> dict[TopicPart, int]:
        return {(f"{t}#{i}", p): v for (t, p), v in values.items()}

    targets: dict[TopicPart, int] | None = {}
    for i, part in parts.items():
        if part.targets is None or targets is None:
            targets = None
        else:
            targets.update(keyed(i, part.targets))
    return Progress(
        combine_stats(p.stats for p in parts.values()),
        {k: v for i, p in parts.items() for k, v in keyed(i, p.starts).items()},
        {k: v for i, p in parts.items() for k, v in keyed(i, p.positions).items()},
        targets,
    )


def run_together(
    runners: Sequence[ProjectionRunner],
    *,
    until_caught_up: bool = False,
    progress: ProgressHook | None = None,
) -> RunStats:
    """Run ``runners`` at once, a thread each, until all are done (caught up, or stopped by
    SIGTERM / SIGINT, which stop them all); ``progress`` gets their merged progress. Returns the
    combined :class:`RunStats`.

    Raises:
        Exception: the first error of a runner (in ``runners`` order), after the others stopped
            at the end of their batch in flight: as :meth:`ProjectionRunner.run`.
    """
    if len(runners) == 1:
        runners[0].progress = progress
        return runners[0].run(until_caught_up)
    latest: dict[int, Progress] = {}
    lock = threading.Lock()

    def hook(i: int) -> ProgressHook:
        def report(p: Progress) -> None:
            with lock:
                latest[i] = p
                merged = _merge_progress(latest)
            if progress is not None:
                progress(merged)

        return report

    def stop_all() -> None:
        for r in runners:
            r.stop()

    for i, r in enumerate(runners):
        r.progress = hook(i)
    restore = _on_signals(stop_all)
    try:
        with ThreadPoolExecutor(len(runners), thread_name_prefix="bb-runner") as pool:
            futures = [pool.submit(r.run, until_caught_up) for r in runners]
            pending: set[Future[RunStats]] = set(futures)
            while pending:  # short waits, so that the main thread keeps handling signals
                done, pending = wait(pending, timeout=0.2, return_when=FIRST_EXCEPTION)
                if any(f.exception() is not None for f in done):
                    stop_all()
    finally:
        restore()
    return combine_stats(f.result() for f in futures)


def share_runners(projections: Sequence[Projection]) -> list[list[Projection]]:
    """Group ``projections`` into as few runners as possible, none reading a topic twice (a
    runner feeds one projection per topic; e.g. ``ad_reports`` and ``ad_reports_item`` both
    read ``ads.reports``, each taking its rows by :attr:`Projection.where`). Order is kept: each
    projection joins the first group that does not read its topic yet."""
    groups: list[list[Projection]] = []
    for proj in projections:
        group = next((g for g in groups if all(p.topic != proj.topic for p in g)), None)
        if group is None:
            groups.append([proj])
        else:
            group.append(proj)
    return groups


def build_runners(
    settings: Settings,
    names: Sequence[str] | None = None,
    *,
    topics: dict[str, str] | None = None,
    batch_size: int = 50_000,
) -> list[ProjectionRunner]:
    """The runners of the projections ``names`` (default: all, :data:`STATEFUL` ones included).
    ``topics`` overrides source topics (``{projection: topic}``). Plain projections share one
    runner (a second one when two read the same topic, :func:`share_runners`); each stateful one
    gets its own.

    Raises:
        ConfigError: an unknown projection name.
    """
    wanted = list(dict.fromkeys(names or [*PROJECTIONS, *STATEFUL]))
    unknown = [n for n in wanted if n not in PROJECTIONS and n not in STATEFUL]
    if unknown:
        known = ", ".join(sorted([*PROJECTIONS, *STATEFUL]))
        raise ConfigError(f"there is no projection {unknown[0]!r}; known projections: {known}")
    overrides = topics or {}

    def on_topic(p: Projection) -> Projection:
        return p.on_topic(overrides[p.name]) if p.name in overrides else p

    plain = [on_topic(get_projection(n)) for n in wanted if n not in STATEFUL]
    linger_s = settings.projection_linger_ms / 1000
    runners = [
        ProjectionRunner(settings, group, batch_size=batch_size, linger_s=linger_s)
        for group in share_runners(plain)
    ]
    for name in wanted:
        if name in STATEFUL:
            proj, make_writer = STATEFUL[name]
            runners.append(
                ProjectionRunner(
                    settings,
                    [on_topic(proj)],
                    batch_size=batch_size,
                    write=make_writer(settings),
                    linger_s=linger_s,
                )
            )
    return runners


def run_projections(
    settings: Settings,
    names: Sequence[str] | None = None,
    *,
    until_caught_up: bool = False,
    topics: dict[str, str] | None = None,
    progress: ProgressHook | None = None,
    batch_size: int = 50_000,
) -> RunStats:
    """Run the projections ``names`` (default: all, :data:`STATEFUL` ones included) — the function
    ``backbeat project`` calls, in process. ``topics`` overrides source topics (``{projection:
    topic}``); the runners are :func:`build_runners`', run at once by :func:`run_together`.

    Raises:
        ConfigError: an unknown projection name.
        OffsetMismatchError, InfraError, DatabaseBusyError: as :meth:`ProjectionRunner.run`.
    """
    runners = build_runners(settings, names, topics=topics, batch_size=batch_size)
    return run_together(runners, until_caught_up=until_caught_up, progress=progress)


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m projections.runner", description="Materialise read models into DuckDB."
    )
    parser.add_argument("--until-caught-up", action="store_true", help="stop at the end of the log")
    parser.add_argument(
        "--projection",
        action="append",
        default=[],
        metavar="NAME",
        help=f"projection to run (repeatable; default all: {', '.join([*PROJECTIONS, *STATEFUL])})",
    )
    parser.add_argument(
        "--topic",
        action="append",
        default=[],
        metavar="NAME=TOPIC",
        help="read projection NAME from TOPIC instead of its declared topic",
    )
    parser.add_argument("--batch-size", type=int, default=50_000, help="records per transaction")
    add_port_argument(parser, PROCESS)
    return parser.parse_args(argv)


def run_as_process(
    settings: Settings,
    runners: Sequence[ProjectionRunner],
    *,
    until_caught_up: bool = False,
    ops_port: int | None,
    progress: ProgressHook | None = None,
) -> tuple[int, RunStats | None]:
    """Run ``runners`` together as process ``projection-runner`` under the one lifecycle
    (:func:`infra.lifecycle.run_process`): logging, ``/metrics`` and ``/health`` on ``ops_port``,
    SIGTERM/SIGINT stop after the batch in flight. Returns ``(exit status, stats)``; the stats
    are ``None`` when a runner failed (status 1, the error logged).

    Raises:
        infra.errors.ConfigError: the ops port is taken, or a bad ``BACKBEAT_LOG_*`` setting.
    """

    def stop_all() -> None:
        for r in runners:
            r.stop()

    service = LoopService(
        PROCESS, lambda: run_together(runners, until_caught_up=until_caught_up, progress=progress), stop_all
    )
    code = run_process(
        PROCESS, [service], ops_port=ops_port, run_dir=settings.run_dir,
        high_watermarks=lambda topic: high_watermarks(settings, topic),
    )  # fmt: skip
    stats = service.result if isinstance(service.result, RunStats) else None
    return code, stats


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry: runs the projections as process ``projection-runner`` under the one
    lifecycle (:func:`infra.lifecycle.run_process`: logging, ``/metrics`` and ``/health``,
    SIGTERM/SIGINT stop after the batch in flight) and prints the run's stats as one JSON line
    on stdout at the end (also after SIGTERM). Exit status 0; 1 on a backbeat error (logged);
    2 on bad arguments."""
    args = _parse(argv)
    try:
        topics = dict(item.split("=", 1) for item in args.topic)
    except ValueError:
        print("error: --topic takes NAME=TOPIC", file=sys.stderr)
        return 2
    try:
        settings = Settings.from_env()
        ops_port = port_setting(PROCESS, args.ops_port)
        runners = build_runners(settings, args.projection or None, topics=topics, batch_size=args.batch_size)
    except BackbeatError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1

    try:
        code, stats = run_as_process(
            settings, runners, until_caught_up=args.until_caught_up, ops_port=ops_port
        )
    except BackbeatError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if code == 0 and stats is not None:
        print(json.dumps({**asdict(stats), "rate": round(stats.rate, 1)}), flush=True)
    return code


__all__ = [
    "PROCESS",
    "STATEFUL",
    "BatchWriter",
    "Progress",
    "ProgressHook",
    "ProjectionRunner",
    "RunStats",
    "RunnerMeter",
    "build_runners",
    "combine_stats",
    "component_name",
    "main",
    "reject_kind",
    "run_as_process",
    "run_projections",
    "run_together",
    "share_runners",
]

if __name__ == "__main__":
    sys.exit(main())
