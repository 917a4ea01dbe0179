"""Blue/green replay of a stateful read model (:data:`projections.runner.STATEFUL`, i.e.
``recommendations``): called by :func:`projections.replay.replay`; see ``docs/replay.md``.

A stateful read model's rows come from state across all events (sessions, pair weights, first
assignments), so only full rebuilds exist: ``start`` must be ``earliest`` (or omitted).

1. **Build** into a separate DuckDB file, ``<data_dir>/builds/<name>-b<n>.duckdb``, with the read
   model's own batch writer (:class:`~projections.recommendations.RecommendationsWriter`, events
   NOT emitted: a rebuild must not announce lists and assignments again) over records
   ``[0, stop)``; ``stop`` defaults to the live read model's stored offsets (the high watermarks
   when there is none). It reads nothing but its own tables. The build is recorded in the live
   file's ``projection_builds`` (state ``building``); its progress is the build file's own offsets,
   one transaction per batch, so a killed build **resumes** from its last committed batch.
2. **Catch up** to the live offsets where the live runner went further, as for plain projections.
3. **Verify** (under the live file's writer lock, just before the switch). Mode ``live`` when the
   live read model has the same version and topic and stands at exactly the build's offsets: the
   tables that do not depend on where batches ended (``item_pairs``, ``item_plays``,
   ``user_transitions``, ``user_artist_affinity``, ``recommendation_context``, ``recommendation_seen``,
   ``experiment_assignments``) must equal the
   live ones (rows and ``sum(hash(all columns))``). Otherwise mode ``recount``: a second read of
   the source gives the distinct ``event_id``s of the mappable records (rejects left out), which
   must equal ``recommendation_seen`` (count and ``sum(hash(event_id))``). In both modes the lists
   must be well formed: ranks 1..k per user, every current list in ``recommendation_history``,
   every user with a list has a context. Lists themselves are not compared with the live ones:
   a user gets one list per batch, after the last of the user's listens in it, and across
   partitions the batches decide which listens come before it, so lists depend on batch
   boundaries (``projections/recommendations.py``), and ``computed_at`` is wall time.
4. **Switch**, in one transaction on the live file: each of the read model's tables is renamed
   ``<table>__v<version>_b<build>`` (the version being retired; build 0 = the tables before the
   first replay), the build's tables are created (same DDL, keys included) under the plain names
   and filled from the build file (attached read-only), and offsets, rejects and version become
   the build's (its ``projection_builds.table_name`` becomes the plain name; a retired one's
   ``<name>__v<version>_b<build>``). Readers and the runner keep using the plain names: the
   runner writes by literal name, and its writer reloads its in-memory model when the stored
   offsets are not the ones it last committed. The build file is deleted after the switch; old
   versions stay until :func:`drop_old_stateful`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from datetime import datetime
from pathlib import Path
from typing import Any, cast

import duckdb

from events.log import wait_out
from events.offsets import high_watermarks
from events.producer import EventProducer
from infra.errors import ConfigError, InfraError
from infra.settings import Settings
from projections import replay as rp
from projections.decoding import BatchPreparer
from projections.readmodels import Projection
from projections.recommendations import (
    CONTEXT_TABLE,
    HISTORY_TABLE,
    NAME,
    SEEN_TABLE,
    STATE_DDL,
    STATE_TABLES,
    RecommendationsWriter,
)
from projections.replay_source import archive_functions, batches_for
from projections.store import WriterSession, reader, writer
from projections.tracking import (
    BOOKKEEPING_DDL,
    BUILDS_TABLE,
    OFFSETS_TABLE,
    REJECTS_TABLE,
    VERSIONS_TABLE,
    ensure_tables,
    log_identity,
    now_utc,
    relation_kind,
    save_offsets,
)

#: Tables of the read model that do not depend on where batches ended (compared with the live ones).
STABLE_TABLES = tuple(t for t in STATE_TABLES if t not in (NAME, HISTORY_TABLE))
_ATTACHED = "bb_build"


class _NoEvents:
    """A producer that sends nothing: a rebuild does not announce lists and assignments again."""

    def send_many(self, *_args: Any, **_kwargs: Any) -> None:
        return None

    def flush(self, *_args: Any, **_kwargs: Any) -> None:
        return None


def build_path(settings: Settings, name: str, build: int) -> Path:
    """The DuckDB file a stateful build is made in: ``<data_dir>/builds/<name>-b<build>.duckdb``."""
    return settings.data_dir / "builds" / f"{name}-b{build}.duckdb"


def _tables_of(name: str) -> tuple[str, ...]:
    if name != NAME:
        raise ConfigError(f"no blue/green replay for the stateful read model {name!r}")
    return STATE_TABLES


def _open(
    settings: Settings, proj: Projection, source: str, stop: dict[int, int], given: bool, timeout_s: float
) -> rp._Build:
    """Resume the build in progress (same version, topic, source) or record a new one."""
    with writer(settings.duckdb_path, timeout_s) as conn:
        conn.begin()
        for ddl in BOOKKEEPING_DDL:
            conn.execute(ddl)
        found = rp._building(conn, proj.name)
        if found is not None:
            build, version, table, topic, src, start_json, stop_json = found
            if int(version) == proj.version and topic == proj.topic and src == source:
                s1 = rp._offsets_of(stop_json)
                if given and stop != s1:
                    conn.rollback()
                    raise ConfigError(
                        f"build {build} of {proj.name} is in progress up to {s1}; run the replay without "
                        f"--to to resume it, or 'backbeat replay {proj.name} --drop-only --abandon' "
                        "to give it up"
                    )
                conn.commit()
                return rp._Build(int(build), int(version), str(table), rp._offsets_of(start_json), s1, True)
            conn.execute(
                f"UPDATE {BUILDS_TABLE} SET state = 'abandoned', note = ? WHERE projection = ? AND build = ?",
                [f"superseded by a replay of version {proj.version} from {source}", proj.name, build],
            )
        n = int(
            conn.execute(
                f"SELECT coalesce(max(build), 0) + 1 FROM {BUILDS_TABLE} WHERE projection = ?", [proj.name]
            ).fetchall()[0][0]
        )
        start = {p: 0 for p in stop}
        label = f"{proj.name}__v{proj.version}_b{n}"
        conn.execute(
            f"INSERT INTO {BUILDS_TABLE} VALUES (?, ?, ?, ?, ?, ?, 'building', ?, ?, ?, NULL, ?)",
            [proj.name, n, proj.version, label, proj.topic, source, rp._offsets_json(start),
             rp._offsets_json(stop), now_utc(), f"built in {build_path(settings, proj.name, n)}"],
        )  # fmt: skip
        conn.commit()
    path = build_path(settings, proj.name, n)
    for leftover in (path, path.with_name(path.name + ".wal")):  # a file of an earlier, dropped build n
        leftover.unlink(missing_ok=True)
    return rp._Build(n, proj.version, label, start, stop, False)


class _StatefulBuilder:
    """Applies records ``[stored, stop)`` to the build file with the read model's batch writer."""

    def __init__(
        self,
        settings: Settings,
        proj: Projection,
        build: rp._Build,
        read: Callable[..., rp.Batches],
        lookup: Callable[[int], dict[str, Any]],
        batch_size: int,
        timeout_s: float,
        progress: Callable[[rp.ReplayProgress], None] | None,
        write: Callable[..., Any],
    ) -> None:
        self.settings, self.proj, self.build, self.read = settings, proj, build, read
        self.path = build_path(settings, proj.name, build.build)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.identity = log_identity(settings, [proj.topic])
        self.batch_size, self.timeout_s, self.progress = batch_size, timeout_s, progress
        self.preparer = BatchPreparer({proj.topic: proj}, lookup)
        self.write = write
        self.records = 0
        self.started = time.monotonic()
        with writer(self.path, timeout_s) as conn:
            conn.begin()
            ensure_tables(conn, proj)
            for ddl in proj.extra_ddl:
                conn.execute(ddl)
            conn.commit()

    def positions(self) -> dict[int, int]:
        with writer(self.path, self.timeout_s) as conn:
            stored = rp._live_offsets(conn, self.proj.name, self.proj.topic)
        return {p: stored.get(p, 0) for p in self.build.stop}

    def run(self, stop: Mapping[int, int], phase: str) -> dict[int, int]:
        """Apply the records from the stored positions to ``stop``; returns the positions reached."""
        positions = self.positions()
        target = {p: max(stop.get(p, 0), positions[p]) for p in positions}
        total = sum(target.values())
        topic = self.proj.topic
        with WriterSession(self.path, self.timeout_s) as session:
            for msgs, reached in self.read(self.settings, topic, positions, target, self.batch_size):
                if msgs:
                    prepared = wait_out(
                        lambda m=msgs: self.preparer.prepare(m), what=f"replay {self.proj.name}: decoding"
                    )
                    with session.connection() as conn:
                        self.write(conn, self.settings.lake_dir, {topic: self.proj}, prepared, self.identity)
                    self.records += len(msgs)
                positions.update(reached)
                self._report(phase, positions, target, total)
            with session.connection() as conn:  # past the last data record (markers, EOF)
                conn.begin()
                stored = rp._live_offsets(conn, self.proj.name, topic)
                moved = {(self.proj.name, topic, p): o for p, o in positions.items() if o > stored.get(p, -1)}
                save_offsets(conn, moved, self.identity)
                conn.commit()
        return positions

    def _report(
        self, phase: str, positions: Mapping[int, int], target: Mapping[int, int], total: int
    ) -> None:
        if self.progress is not None:
            self.progress(rp.progress_of(phase, self.records, self.started, positions, target, total))


# -- verification ------------------------------------------------------------------------------------
def _well_formed(conn: duckdb.DuckDBPyConnection, db: str) -> str | None:
    """Why the build's lists are malformed, or ``None``."""
    bad = conn.execute(
        f"SELECT count(*) FROM (SELECT user_id FROM {db}.{NAME} GROUP BY user_id "
        f'HAVING count(*) <> max("rank") OR min("rank") <> 1 OR count(DISTINCT list_id) <> 1)'
    ).fetchall()[0][0]
    if bad:
        return f"{bad} user(s) with lists whose ranks are not 1..k of one list"
    missing = conn.execute(
        f"SELECT count(*) FROM (SELECT DISTINCT list_id FROM {db}.{NAME}) ANTI JOIN "
        f"(SELECT DISTINCT list_id FROM {db}.{HISTORY_TABLE}) USING (list_id)"
    ).fetchall()[0][0]
    if missing:
        return f"{missing} current list(s) missing from {HISTORY_TABLE}"
    orphans = conn.execute(
        f"SELECT count(DISTINCT user_id) FROM {db}.{NAME} ANTI JOIN {db}.{CONTEXT_TABLE} USING (user_id)"
    ).fetchall()[0][0]
    if orphans:
        return f"{orphans} user(s) with a list but no context"
    return None


def _compare_live(conn: duckdb.DuckDBPyConnection) -> rp.Verification:
    """The build (attached) against the live tables at the same offsets and version."""
    expected = [0, 0]
    got = [0, 0]
    for table in STABLE_TABLES:
        e = rp.table_checksum(conn, f'main."{table}"')
        g = rp.table_checksum(conn, f'{_ATTACHED}.main."{table}"')
        expected = [expected[0] + e[0], expected[1] ^ e[1]]
        got = [got[0] + g[0], got[1] ^ g[1]]
        if e != g:
            return rp.Verification(
                "live", False, e, g,
                f"{table}: build has {g[0]:,} rows (checksum {g[1]}), the live read model {e[0]:,} "
                f"(checksum {e[1]}) at the same offsets",
            )  # fmt: skip
    why = _well_formed(conn, _ATTACHED)
    detail = f"{', '.join(STABLE_TABLES)} equal to the live read model's ({got[0]:,} rows); lists well formed"
    return rp.Verification("live", why is None, (expected[0], expected[1]), (got[0], got[1]), why or detail)


def _recount_check(
    settings: Settings,
    proj: Projection,
    path: Path,
    end: Mapping[int, int],
    read: Callable[..., rp.Batches],
    lookup: Callable[[int], dict[str, Any]],
    batch_size: int,
    timeout_s: float,
) -> rp.Verification:
    """``recommendation_seen`` against the distinct event ids of a second read of ``[0, end)``."""
    with reader(path, timeout_s) as conn:
        rejected = rp._rejected(conn, proj.name)
        row = conn.execute(
            f"SELECT count(*), coalesce(sum(hash(event_id)), 0), count(DISTINCT event_id) FROM {SEEN_TABLE}"
        ).fetchall()[0]
        got = (int(row[0]), int(row[1]) if row[0] == row[2] else -1)
        why = _well_formed(conn, "main")
    expected = rp._recount(settings, proj, read, {p: 0 for p in end}, end, lookup, rejected, batch_size)
    if expected != got:
        detail = (
            f"{SEEN_TABLE} has {got[0]:,} event ids (checksum {got[1]}), a recount of the source "
            f"{expected[0]:,} distinct ids (checksum {expected[1]})"
        )
        return rp.Verification("recount", False, expected, got, detail)
    detail = f"{got[0]:,} listens applied, one per distinct event id of the source (recounted)"
    return rp.Verification("recount", why is None, expected, got, why or f"{detail}; lists well formed")


# -- switch and drop ---------------------------------------------------------------------------------
def _switch(
    conn: duckdb.DuckDBPyConnection, proj: Projection, build: rp._Build, live_version: int | None
) -> None:
    """Make the attached build the current version (inside the caller's transaction)."""
    name, stamp = proj.name, now_utc()
    current = conn.execute(
        f"SELECT build, version FROM {BUILDS_TABLE} WHERE projection = ? AND state = 'current'", [name]
    ).fetchall()
    if current:
        old_build, old_version = int(current[0][0]), int(current[0][1])
        conn.execute(
            f"UPDATE {BUILDS_TABLE} SET state = 'old', table_name = ? WHERE projection = ? AND build = ?",
            [f"{name}__v{old_version}_b{old_build}", name, old_build],
        )
    else:
        old_build, old_version = 0, live_version if live_version is not None else proj.version
        if relation_kind(conn, name) == "table":
            ends = rp._live_offsets(conn, name, proj.topic)
            conn.execute(
                f"INSERT OR REPLACE INTO {BUILDS_TABLE} "
                "VALUES (?, 0, ?, ?, ?, 'kafka', 'old', '{}', ?, ?, ?, ?)",
                [name, old_version, f"{name}__v{old_version}_b0", proj.topic, rp._offsets_json(ends), stamp,
                 stamp, "the live tables before the first replay"],
            )  # fmt: skip
    for table in _tables_of(name):
        if relation_kind(conn, table) == "table":
            retired = f"{table}__v{old_version}_b{old_build}"
            conn.execute(f'DROP TABLE IF EXISTS "{retired}"')
            conn.execute(f'ALTER TABLE "{table}" RENAME TO "{retired}"')
    for ddl in (proj.ddl, *STATE_DDL):
        conn.execute(ddl)
    for table in _tables_of(name):
        conn.execute(f'INSERT INTO "{table}" SELECT * FROM {_ATTACHED}.main."{table}"')
    for book in (OFFSETS_TABLE, REJECTS_TABLE):
        conn.execute(f"DELETE FROM {book} WHERE projection = ?", [name])
        conn.execute(f"INSERT INTO {book} SELECT * FROM {_ATTACHED}.main.{book} WHERE projection = ?", [name])
    conn.execute(
        f"INSERT OR REPLACE INTO {VERSIONS_TABLE} VALUES (?, ?, ?, ?)",
        [name, build.version, proj.topic, stamp],
    )
    conn.execute(
        f"UPDATE {BUILDS_TABLE} SET state = 'current', switched_at = ?, table_name = ?, note = ? "
        "WHERE projection = ? AND build = ?",
        [stamp, name, "tables under the plain names", name, build.build],
    )


def drop_old_stateful(
    conn: duckdb.DuckDBPyConnection, settings: Settings, name: str, states: list[str]
) -> list[str]:
    """Drop the versions of stateful read model ``name`` in ``states`` (inside the caller's
    transaction): their ``<table>__v<version>_b<build>`` tables, build files and builds rows.
    Returns the tables dropped."""
    rows = conn.execute(
        f"SELECT build, version FROM {BUILDS_TABLE} WHERE projection = ? AND list_contains(?, state)",
        [name, states],
    ).fetchall()
    dropped: list[str] = []
    for build, version in rows:
        for table in _tables_of(name):
            retired = f"{table}__v{version}_b{build}"
            if relation_kind(conn, retired) == "table":
                conn.execute(f'DROP TABLE "{retired}"')
                dropped.append(retired)
        path = build_path(settings, name, int(build))
        for leftover in (path, path.with_name(path.name + ".wal")):
            leftover.unlink(missing_ok=True)
        conn.execute(f"DELETE FROM {BUILDS_TABLE} WHERE projection = ? AND build = ?", [name, build])
    return dropped


# -- replay ------------------------------------------------------------------------------------------
def replay_stateful(
    settings: Settings,
    proj: Projection,
    *,
    source: str,
    start: str | None,
    stop: str | None,
    drop_old: bool,
    progress: Callable[[rp.ReplayProgress], None] | None,
    batch_size: int,
    lookup: Callable[[int], dict[str, Any]],
    db_timeout_s: float,
    switch_tries: int,
) -> rp.ReplayResult:
    """Rebuild the stateful read model ``proj`` blue/green (module docstring); arguments and result
    as :func:`projections.replay.replay`.

    Raises:
        ConfigError: ``start`` other than ``earliest``; a ``stop`` different from the build in progress.
        ReplayError: another replay runs, or the live runner kept moving past the build.
        OffsetMismatchError, InfraError, DatabaseBusyError: as the projection runner.
    """
    name = proj.name
    if start is not None and start.strip().lower() != "earliest":
        raise ConfigError(
            f"{name} is a stateful read model: its state (sessions, pair weights, assignments) depends on "
            f"all history, so it can only be rebuilt from the start of the log; drop --from {start!r}"
        )
    read = batches_for(source)
    started = time.monotonic()
    with rp._replay_lock(settings.duckdb_path, name):
        if source == "archive":
            marks = archive_functions()[1](settings, proj.topic)
        else:
            identity = log_identity(settings, [proj.topic])
            if proj.topic not in identity.topic_ids:
                raise InfraError(f"topic {proj.topic} does not exist on {settings.bootstrap_servers}")
            marks = high_watermarks(settings, proj.topic)
        live: dict[int, int] = {}
        if settings.duckdb_path.exists():
            with reader(settings.duckdb_path, db_timeout_s) as conn:
                live = rp._live_offsets(conn, name, proj.topic)

        def at_time(when: datetime) -> dict[int, int]:
            return rp.offsets_before(settings, proj, when, marks, read, lookup)[0]

        default = {p: live.get(p, 0) for p in marks} if live else dict(marks)
        end0 = rp.resolve_position(stop, marks, default, at_time)
        build = _open(settings, proj, source, end0, stop is not None, db_timeout_s)
        write = RecommendationsWriter(settings, producer=cast(EventProducer, _NoEvents()))
        builder = _StatefulBuilder(
            settings, proj, build, read, lookup, batch_size, db_timeout_s, progress, write
        )
        end = builder.run(build.stop, "build")
        verification: rp.Verification | None = None
        for _ in range(max(1, switch_tries)):
            with reader(settings.duckdb_path, db_timeout_s) as conn:
                live = rp._live_offsets(conn, name, proj.topic)
                live_version = rp._live_version(conn, name)
            if any(live.get(p, 0) > end.get(p, 0) for p in live):
                end = builder.run({p: max(end.get(p, 0), live.get(p, 0)) for p in end}, "catch-up")
            same = live_version == (build.version, proj.topic) and all(
                live.get(p, 0) == end.get(p, 0) for p in {*live, *end}
            )
            if not same:
                verification = _recount_check(
                    settings, proj, builder.path, end, read, lookup, batch_size, db_timeout_s
                )
            with writer(settings.duckdb_path, db_timeout_s) as conn:
                conn.execute(f"ATTACH '{builder.path}' AS {_ATTACHED} (READ_ONLY)")
                try:
                    conn.begin()
                    now_live = rp._live_offsets(conn, name, proj.topic)
                    if any(now_live.get(p, 0) > end.get(p, 0) for p in now_live) or (
                        same and now_live != live
                    ):
                        conn.rollback()
                        continue  # the live runner moved on meanwhile: catch up again
                    if same:
                        verification = _compare_live(conn)
                    assert verification is not None
                    now_version = rp._live_version(conn, name)
                    if verification.ok:
                        _switch(conn, proj, build, now_version[0] if now_version else None)
                    else:
                        conn.execute(
                            f"UPDATE {BUILDS_TABLE} SET state = 'failed', note = ? "
                            "WHERE projection = ? AND build = ?",
                            [verification.detail, name, build.build],
                        )
                    conn.commit()
                finally:
                    conn.execute(f"DETACH {_ATTACHED}")
            break
        else:
            raise rp.ReplayError(
                f"the live runner of {name} kept moving past build {build.build} ({switch_tries} catch-ups); "
                "the build is kept and resumes: run the replay again when the topic is quieter, or stop "
                "'backbeat project' for the switch"
            )
        assert verification is not None
        if verification.ok:
            for leftover in (builder.path, builder.path.with_name(builder.path.name + ".wal")):
                leftover.unlink(missing_ok=True)  # copied into the live file
        dropped = (
            rp.drop_old_versions(settings, name, timeout_s=db_timeout_s)
            if drop_old and verification.ok
            else []
        )
    seconds = time.monotonic() - started
    return rp.ReplayResult(
        name=name,
        version=build.version,
        build=build.build,
        table=name if verification.ok else str(builder.path),
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


__all__ = ["STABLE_TABLES", "build_path", "drop_old_stateful", "replay_stateful"]
