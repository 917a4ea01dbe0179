"""A read model's rejected records (``projection_rejects``) you can act on: list them by reason,
and re-apply them once their cause is gone (``backbeat projections rejects``).

A reject is a record the runner could not apply — not Confluent-framed Avro of a schema the
registry knew, another event type, a domain rule broken (:mod:`events.validation`), a value that
does not map to a row — stored with its topic, partition, offset and reason; the runner's offsets
move past it. :func:`reapply` reads those offsets from Kafka again (:func:`events.log.read_range`),
decodes, validates and maps them with the runner's own code
(:class:`~projections.decoding.BatchPreparer`) and writes what now passes with
:func:`projections.apply.apply_late`, one DuckDB transaction per batch: rows by the read model's
policy without undoing newer rows, lake files, and the reject rows deleted (or, for records still
rejected, their reason and time updated). A reject that was re-applied is gone, so re-applying
again applies nothing twice; records still bad stay rejected.

Rejects are positions in one log: when the live broker is another log than the one the read
model was built from (the embedded broker restarted empty, a topic recreated), re-applying is
refused with :class:`~infra.errors.OffsetMismatchError`.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from events.log import log_identity, read_range, wait_out
from events.registry_client import registry_for
from events.serde import AvroDecoder
from infra.errors import ConfigError, OffsetMismatchError
from infra.settings import Settings
from projections.apply import apply_late
from projections.decoding import BatchPreparer
from projections.readmodels import PROJECTIONS, Projection
from projections.store import reader, writer
from projections.tracking import OFFSETS_TABLE, REJECTS_TABLE, load_offsets

#: ``(records done, total)`` of a re-apply.
ProgressHook = Callable[[int, int], None]


@dataclass(frozen=True)
class RejectRow:
    """One row of ``projection_rejects``."""

    topic: str
    partition: int
    offset: int
    reason: str
    rejected_at: datetime


def _projection(name: str) -> Projection:
    """The plain read model ``name``.

    Raises:
        ConfigError: unknown, or a stateful read model (its rejects are re-applied by a replay).
    """
    if name in PROJECTIONS:
        return PROJECTIONS[name]
    from projections.runner import STATEFUL  # noqa: PLC0415 (the runner imports much)

    if name in STATEFUL:
        raise ConfigError(
            f"{name} is a stateful read model: its state depends on the order of events, so rejects "
            f"cannot be applied late; rebuild it with 'backbeat replay {name}'"
        )
    known = ", ".join(sorted(PROJECTIONS))
    raise ConfigError(f"there is no projection {name!r}; known projections: {known}")


def list_rejects(settings: Settings, name: str, reason: str | None = None) -> list[RejectRow]:
    """The rejects of read model ``name`` (those whose reason contains ``reason`` when given), in
    topic, partition and offset order; empty when there is no database yet."""
    db = settings.duckdb_path
    if not db.exists():
        return []
    with reader(db) as conn:
        exists = conn.execute(
            "SELECT count(*) FROM duckdb_tables() WHERE table_name = ?", [REJECTS_TABLE]
        ).fetchall()[0][0]
        if not exists:
            return []
        rows = conn.execute(
            f'SELECT topic, "partition", "offset", reason, rejected_at FROM {REJECTS_TABLE} '
            "WHERE projection = ? AND (? IS NULL OR contains(reason, ?)) "
            'ORDER BY topic, "partition", "offset"',
            [name, reason, reason],
        ).fetchall()
    return [RejectRow(str(t), int(p), int(o), str(r), at) for t, p, o, r, at in rows]


def reasons_of(rows: list[RejectRow]) -> list[tuple[str, int]]:
    """``(reason, count)`` of ``rows``, most frequent first. Reasons naming a value (``ms_played=-5
    is negative``) are counted as they are."""
    return sorted(Counter(r.reason for r in rows).items(), key=lambda kv: (-kv[1], kv[0]))


@dataclass
class ReapplyResult:
    """What :func:`reapply` did: ``rejects`` considered, rows ``applied``, records ``superseded``
    (mapped, but their key's row stayed), ``cleared`` reject rows (applied, superseded, filtered
    out as another read model's, or control records), ``kept`` (still rejected: ``reasons``),
    ``missing`` (their offset was not found in the log), ``lake_files`` and ``seconds``."""

    rejects: int = 0
    applied: int = 0
    superseded: int = 0
    cleared: int = 0
    kept: int = 0
    missing: int = 0
    lake_files: int = 0
    seconds: float = 0.0
    reasons: Counter[str] = field(default_factory=Counter)


def _check_log(settings: Settings, proj: Projection, topics: set[str]) -> None:
    """The read model's stored offsets must belong to the live log of ``topics``.

    Raises:
        OffsetMismatchError: another cluster or topic id.
    """
    live = log_identity(settings, topics)
    with reader(settings.duckdb_path) as conn:
        stored = load_offsets(conn, [proj.name]) if _has_table(conn, OFFSETS_TABLE) else {}
    for s in stored.values():
        if s.topic not in topics:
            continue
        live_id = live.topic_ids.get(s.topic)
        if s.cluster_id != live.cluster_id or live_id is None or (s.topic_id and s.topic_id != live_id):
            raise OffsetMismatchError(
                f"the rejects of {proj.name!r} were recorded from {s.topic} on cluster {s.cluster_id} "
                f"(topic id {s.topic_id}), but {settings.bootstrap_servers} is cluster {live.cluster_id} "
                f"(topic id {live.topic_ids.get(s.topic)}): their offsets name other records there. "
                f"Rebuild the read model instead ('backbeat projections reset {proj.name}')"
            )


def _has_table(conn: Any, name: str) -> bool:
    return bool(
        conn.execute("SELECT count(*) FROM duckdb_tables() WHERE table_name = ?", [name]).fetchall()[0][0]
    )


def reapply(
    settings: Settings,
    name: str,
    *,
    reason: str | None = None,
    lookup: Callable[[int], dict[str, Any]] | AvroDecoder | None = None,
    progress: ProgressHook | None = None,
    batch_size: int = 50_000,
    db_timeout_s: float = 120.0,
) -> ReapplyResult:
    """Re-apply the rejects of read model ``name`` (those whose reason contains ``reason``); see
    the module docstring. ``lookup``: the decoder or schema lookup (default: the registry).

    Raises:
        ConfigError: unknown or stateful read model.
        OffsetMismatchError: the live log is not the one the rejects were recorded from.
        InfraError: the broker cannot be reached (an unreachable registry is waited out).
        DatabaseBusyError: the DuckDB file stayed locked.
    """
    started = time.monotonic()
    proj = _projection(name)
    rows = list_rejects(settings, name, reason)
    result = ReapplyResult(rejects=len(rows))
    if not rows:
        return result
    topics = {r.topic for r in rows}
    _check_log(settings, proj, topics)
    by_topic = {t: proj.on_topic(t) for t in topics}
    preparer = BatchPreparer(by_topic, lookup or registry_for(settings.registry_url).decoder())
    wanted = {(r.topic, r.partition, r.offset) for r in rows}
    ranges: dict[tuple[str, int], tuple[int, int]] = {}
    for r in rows:
        first, end = ranges.get((r.topic, r.partition), (r.offset, r.offset + 1))
        ranges[(r.topic, r.partition)] = (min(first, r.offset), max(end, r.offset + 1))
    found: set[tuple[str, int, int]] = set()
    for msgs in read_range(settings, ranges, purpose="rejects", batch=batch_size):
        mine = [m for m in msgs if (m.topic(), m.partition(), m.offset()) in wanted]
        if not mine:
            continue
        prepared = wait_out(lambda m=mine: preparer.prepare(m), what=f"re-applying rejects of {name}")
        records = [(m.topic(), m.partition(), m.offset()) for m in mine]
        found.update(records)
        with writer(settings.duckdb_path, db_timeout_s) as conn:
            done = apply_late(conn, settings.lake_dir, proj, prepared, records)
        result.applied += done.applied
        result.superseded += done.superseded
        result.cleared += done.cleared
        result.kept += done.kept
        result.lake_files += done.lake_files
        result.reasons.update(r.reason for r in prepared.rejects)
        if progress is not None:
            progress(len(found), len(wanted))
    result.missing = len(wanted - found)
    result.seconds = time.monotonic() - started
    return result


__all__ = ["ReapplyResult", "RejectRow", "list_rejects", "reapply", "reasons_of"]
