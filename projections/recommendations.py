"""The ``recommendations`` read model: "Made for You" lists per user, kept up to date from
``playback.listens`` by the projection runner, exactly once, with the A/B experiment
:data:`personalisation.experiments.MADE_FOR_YOU` deciding which model serves each user.

Per batch, in ONE DuckDB transaction together with the consumed offsets
(:func:`projections.tracking.save_offsets`):

1. drop records below the stored offsets (redelivered) and listens whose ``event_id`` was
   applied before (``recommendation_seen``; a re-import or a retried producer), keeping the first
   by (partition, offset);
2. fold the listens, per user in offset order, into each user's open-session context
   (``recommendation_context``: latest event time, the last plays of the open session, the last
   10 plays) with :func:`personalisation.streaming.advance` (the 30-minute gap rule,
   ``Settings.session_gap_ms``; a replay of the previous track of the session is collapsed into
   it), and add the pair-weight and play deltas to ``item_pairs`` (summed ``1 / distance``) and
   ``item_plays`` and to the in-memory :class:`~personalisation.cooccurrence.CooccurrenceModel`
   (built from those tables by :func:`served_model` at the first batch of a run, and again when
   the stored offsets are not the ones the writer last committed: a replay switched the tables);
3. assign the users of the batch to the experiment (a new user gets a row in
   ``experiment_assignments`` and an ``ExperimentAssigned`` event, id deterministic per user,
   experiment and version);
4. recompute the top-20 list of every user of the batch — ``control``: the most played tracks,
   ``item2item``: the co-occurrence model's list for the user's last 10 tracks, backfilled with the
   most played — skipping the user's last 10 tracks; replace their rows in ``recommendations``,
   append each new list to ``recommendation_history``, and emit one ``RecommendationsGenerated``
   per list (event id = list id, a hash of the list);
5. flush the events to Kafka, then commit.

Failure semantics: a crash before the commit leaves nothing in DuckDB (the in-memory model is
dropped and rebuilt from the tables), and the batch is read again; events already flushed are
then sent again (at-least-once delivery with deterministic ids: consumers de-duplicate by
``event_id``). ``ExperimentAssigned`` comes back with the same id; a list comes back with the same
id when the retried batch ends where the first one did, else it is another list (the first one's
event then has no ``recommendation_history`` row). A crash after the commit loses nothing. So the
tables are exactly-once, the events at-least-once. A list is generated from the model as it
stands at the end of the batch, so lists (unlike the pair weights, plays and contexts) depend on
where batches ended; ``generated_at`` is event time: the user's latest listen the list accounts
for.

The model served is the offline evaluation's ``item-to-item``
(:func:`personalisation.evaluation.fit_method`; ``docs/evaluation.md``): window 5, pairs
weighted ``1 / distance``, consecutive repeats collapsed, history of 10 with decay 0.5, trained on
the sessions cut here. Weight sums are kept on the exact ``1 / 60`` grid
(:func:`personalisation.streaming.snap_weights`), in ``item_pairs`` and in memory alike, so the
tables and lists do not depend on where batches ended or whether the run restarted.

:func:`projections.tracking.reset` with ``["recommendations"]`` drops the ``recommendations``
table and its offsets; the next run finds no offsets and empties the other tables here too, so
the whole model is rebuilt from offset 0 (its state tables are dropped and created again, so a
file written by an older version of this read model gets the current layout). A file from
version 1 (integer pair counts, replays not collapsed) is refused at start with the reset command
to run (:func:`projections.tracking.ensure_tables`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import pyarrow as pa

from events.producer import EventProducer
from infra.errors import BackbeatError, ConfigError
from infra.settings import Settings
from personalisation.cooccurrence import HISTORY, WINDOW, CooccurrenceModel
from personalisation.experiments import (
    ITEM2ITEM_MODEL,
    MADE_FOR_YOU,
    POPULAR_MODEL,
    Assignment,
    Experiment,
    assign,
    assignment_event_id,
)
from personalisation.streaming import (
    ListItem,
    UserContext,
    advance,
    assemble,
    most_played,
    snap_weights,
    weight_unit,
)
from projections.apply import Applied
from projections.availability import resolve_territory, unavailable, user_territory
from projections.decoding import Prepared, Reject
from projections.names import name_ctes
from projections.readmodels import OFFSET_COL, PARTITION_COL, Column, Projection
from projections.store import reader
from projections.tracking import (
    REJECTS_SCHEMA,
    REJECTS_TABLE,
    LogIdentity,
    load_offsets,
    now_utc,
    save_offsets,
)

NAME = "recommendations"
#: Where the events go (infra/topics.toml).
EXPERIMENTS_TOPIC = "personalisation.experiments"
RECOMMENDATIONS_TOPIC = "personalisation.recommendations"
#: Length of a list.
TOP_N = 20
#: The CloudEvents source of the events emitted here.
EVENT_SOURCE = "/projections/recommendations"

PAIRS_TABLE = "item_pairs"
PLAYS_TABLE = "item_plays"
CONTEXT_TABLE = "recommendation_context"
SEEN_TABLE = "recommendation_seen"
ASSIGNMENTS_TABLE = "experiment_assignments"
HISTORY_TABLE = "recommendation_history"
#: The tables a reset or first run empties (all but bookkeeping).
STATE_TABLES = (NAME, PAIRS_TABLE, PLAYS_TABLE, CONTEXT_TABLE, SEEN_TABLE, ASSIGNMENTS_TABLE, HISTORY_TABLE)

_LIST_COLUMNS = """user_id VARCHAR NOT NULL, "rank" INTEGER NOT NULL, track_id VARCHAR NOT NULL,
  score DOUBLE NOT NULL, source VARCHAR NOT NULL, model VARCHAR NOT NULL,
  experiment_id VARCHAR NOT NULL, experiment_version INTEGER NOT NULL, variant VARCHAR NOT NULL,
  generated_at TIMESTAMP NOT NULL, list_id VARCHAR NOT NULL, computed_at TIMESTAMP NOT NULL"""

RECOMMENDATIONS_DDL = f"""CREATE TABLE IF NOT EXISTS {NAME} (
  {_LIST_COLUMNS}, PRIMARY KEY (user_id, "rank"))"""

#: The state tables (created at every start after the ``recommendations`` table).
STATE_DDL = (
    f"""CREATE TABLE IF NOT EXISTS {PAIRS_TABLE} (
  track_a VARCHAR NOT NULL, track_b VARCHAR NOT NULL, distance_weight DOUBLE NOT NULL,
  PRIMARY KEY (track_a, track_b))""",
    f"""CREATE TABLE IF NOT EXISTS {PLAYS_TABLE} (
  track_id VARCHAR PRIMARY KEY, artist_id VARCHAR NOT NULL, track_name VARCHAR, artist_name VARCHAR,
  plays BIGINT NOT NULL)""",
    f"""CREATE TABLE IF NOT EXISTS {CONTEXT_TABLE} (
  user_id VARCHAR PRIMARY KEY, first_at TIMESTAMP NOT NULL, last_at TIMESTAMP NOT NULL,
  session_tracks VARCHAR[] NOT NULL, recent_tracks VARCHAR[] NOT NULL, listens BIGINT NOT NULL,
  sessions BIGINT NOT NULL)""",
    f"CREATE TABLE IF NOT EXISTS {SEEN_TABLE} (event_id VARCHAR NOT NULL)",
    f"""CREATE TABLE IF NOT EXISTS {ASSIGNMENTS_TABLE} (
  user_id VARCHAR NOT NULL, experiment_id VARCHAR NOT NULL, experiment_version INTEGER NOT NULL,
  variant VARCHAR NOT NULL, bucket INTEGER NOT NULL, assigned_at TIMESTAMP NOT NULL,
  event_id VARCHAR NOT NULL, PRIMARY KEY (user_id, experiment_id, experiment_version))""",
    f"CREATE TABLE IF NOT EXISTS {HISTORY_TABLE} ({_LIST_COLUMNS})",
)


@dataclass(frozen=True)
class StatefulProjection(Projection):
    """A projection applied by its own batch writer rather than row upserts: ``columns`` are the
    event fields it reads (what :class:`~projections.decoding.BatchPreparer` maps to Arrow), and
    ``table_ddl`` creates its own table called ``name``, whose columns differ."""

    table_ddl: str = ""

    @property
    def ddl(self) -> str:
        """``CREATE TABLE IF NOT EXISTS`` of the read model's own table."""
        return self.table_ddl


_S, _T = pa.string(), pa.timestamp("ms")

#: Version 2: ``item_pairs.distance_weight`` (summed 1/distance, DOUBLE) replaced version 1's
#: integer ``count``, and replays are collapsed; a version-1 file must be reset and rebuilt.
RECOMMENDATIONS = StatefulProjection(
    name=NAME,
    version=2,
    topic="playback.listens",
    event_type="backbeat.playback.ListenRecorded",
    columns=(
        Column("event_id", _S),
        Column("user_id", _S),
        Column("track_id", _S),
        Column("artist_id", _S),
        Column("occurred_at", _T),
        Column("track_name", _S, nullable=True),
        Column("artist_name", _S, nullable=True),
    ),
    key="event_id",
    policy="first",
    extra_ddl=STATE_DDL,
    table_ddl=RECOMMENDATIONS_DDL,
)

_CONTEXT_SCHEMA = pa.schema(
    [
        ("user_id", pa.string()),
        ("first_at", _T),
        ("last_at", _T),
        ("session_tracks", pa.list_(pa.string())),
        ("recent_tracks", pa.list_(pa.string())),
        ("listens", pa.int64()),
        ("sessions", pa.int64()),
    ]
)
_LIST_SCHEMA = pa.schema(
    [
        ("user_id", pa.string()),
        ("rank", pa.int32()),
        ("track_id", pa.string()),
        ("score", pa.float64()),
        ("source", pa.string()),
        ("model", pa.string()),
        ("experiment_id", pa.string()),
        ("experiment_version", pa.int32()),
        ("variant", pa.string()),
        ("generated_at", _T),
        ("list_id", pa.string()),
        ("computed_at", _T),
    ]
)
#: The batch's users, registered for the length of a batch.
_USERS = "bb_rec_users"
_REASONS = {"cooccurrence": "often played in sessions with your recent tracks", "popular": "popular"}


def list_id(
    user_id: str, assignment: Assignment, model: str, generated_ms: int, tracks: Sequence[str]
) -> str:
    """The id of a generated list (and of its ``RecommendationsGenerated`` event): the first 32 hex
    chars of SHA-256 over user, experiment, version, variant, model, ``generated_ms`` and the track
    ids in rank order. The same list for the same moment gets the same id."""
    parts = [
        "list",
        user_id,
        assignment.experiment_id,
        str(assignment.version),
        assignment.variant,
        model,
        str(generated_ms),
        ",".join(tracks),
    ]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:32]


class RecommendationsWriter:
    """The batch step of :data:`RECOMMENDATIONS` for :class:`~projections.runner.ProjectionRunner`
    (``write=``): called on the runner's writer thread with an open connection, it runs the
    whole batch transaction of the module docstring and returns what it did as
    :class:`~projections.apply.Applied` (``applied``: listens folded into the model).

    ``experiment``: the experiment whose variants serve the lists; ``top_n``: list length;
    ``experiments_topic``/``recommendations_topic``: where events go; ``producer``: the event
    producer (default: one for ``settings``, made at the first batch).

    Raises:
        ConfigError: a variant of ``experiment`` names a model this read model cannot serve.
    """

    def __init__(
        self,
        settings: Settings,
        *,
        experiment: Experiment = MADE_FOR_YOU,
        top_n: int = TOP_N,
        experiments_topic: str = EXPERIMENTS_TOPIC,
        recommendations_topic: str = RECOMMENDATIONS_TOPIC,
        producer: EventProducer | None = None,
    ) -> None:
        for v in experiment.variants:
            if v.model not in (POPULAR_MODEL, ITEM2ITEM_MODEL):
                raise ConfigError(
                    f"variant {v.name!r} of {experiment.experiment_id!r} names model {v.model!r}; the "
                    f"recommendations read model serves {POPULAR_MODEL!r} and {ITEM2ITEM_MODEL!r}"
                )
        self.settings = settings
        self.experiment = experiment
        self.top_n = top_n
        self.experiments_topic = experiments_topic
        self.recommendations_topic = recommendations_topic
        self._producer = producer
        self._model: CooccurrenceModel | None = None
        #: the offsets this writer last committed: other ones at a batch's start mean the tables
        #: were replaced under it (a replay's switch, a reset), so the model is loaded again
        self._committed: dict[tuple[str, int], int] | None = None

    @property
    def model(self) -> CooccurrenceModel | None:
        """The in-memory model the lists are made from, as of the last committed batch (equal, bit
        for bit, to :func:`served_model` of ``item_pairs``/``item_plays``); ``None`` before the
        first batch of a run and after a failed one. Do not modify it."""
        return self._model

    # -- the batch transaction -------------------------------------------------------------------
    def __call__(
        self,
        conn: duckdb.DuckDBPyConnection,
        lake_dir: Path,
        by_topic: Mapping[str, Projection],
        prepared: Prepared,
        identity: LogIdentity,
    ) -> Applied:
        """Apply ``prepared`` (the runner's batch) in one transaction on ``conn``.

        Raises:
            duckdb.Error: the write failed (rolled back; the model is rebuilt at the next batch).
            InfraError: events could not be delivered (rolled back likewise).
        """
        proj = next(p for p in by_topic.values() if p.name == NAME)
        result = Applied()
        conn.begin()
        try:
            stored = {(t, p): off for (_, t, p), off in _offsets(conn, proj.name).items()}
            if self._model is None or stored != self._committed:
                self._model = _load_model(conn, fresh=not stored)
            table = prepared.tables.get(proj.name)
            if table is not None and table.num_rows:
                fresh = _fresh(table, {p: off for (t, p), off in stored.items() if t == proj.topic})
                result.redelivered = table.num_rows - fresh.num_rows
                new = _first_seen(conn, fresh)
                result.duplicates = fresh.num_rows - new.num_rows
                if new.num_rows:
                    result.applied[proj.name] = self._apply_listens(conn, new)
            result.rejects = _store_rejects(conn, prepared.rejects, stored)
            result.redelivered += len(prepared.rejects) - result.rejects
            ends = {
                (proj.name, topic, part): end
                for (topic, part), end in prepared.ends.items()
                if end > stored.get((topic, part), 0)
            }
            save_offsets(conn, ends, identity)
            if self._producer is not None:
                self._producer.flush()
            conn.commit()
            self._committed = {**stored, **{(t, p): end for (_, t, p), end in ends.items()}}
        except BaseException:
            self._model = None
            self._committed = None
            try:
                conn.rollback()
            except duckdb.Error:
                pass  # the connection is broken: nothing was committed either way
            raise
        return result

    def _apply_listens(self, conn: duckdb.DuckDBPyConnection, new: pa.Table) -> int:
        """Steps 2-4 of the module docstring for the batch's new listens (in offset order);
        returns how many were folded."""
        users = sorted(set(new["user_id"].to_pylist()))
        conn.register(_USERS, pa.table({"user_id": pa.array(users, pa.string())}))
        try:
            return self._fold(conn, new)
        finally:
            conn.unregister(_USERS)

    def _fold(self, conn: duckdb.DuckDBPyConnection, new: pa.Table) -> int:
        model = self._model
        assert model is not None
        listens = zip(
            new["user_id"].to_pylist(),
            new["track_id"].to_pylist(),
            new["occurred_at"].cast(pa.int64()).to_pylist(),
            strict=True,
        )
        delta = advance(
            _load_contexts(conn),
            listens,
            gap_ms=self.settings.session_gap_ms,
            window=model.window,
            history=HISTORY,
        )
        a, b, weights = delta.pair_arrays()
        played, plays = delta.play_arrays()
        _upsert_pairs(conn, a, b, weights, model.window)
        _upsert_plays(conn, new, played, plays)
        _save_contexts(conn, delta.contexts)
        model.add_counts(a, b, weights, played, plays)
        # the in-memory sums on the same exact grid as item_pairs (so a restart changes nothing)
        model.counts.data = snap_weights(model.counts.data, model.window)
        assignments = self._assign(conn, delta.contexts)
        self._generate(conn, delta.contexts, assignments)
        return delta.listens

    # -- experiment ------------------------------------------------------------------------------
    def _assign(
        self, conn: duckdb.DuckDBPyConnection, contexts: Mapping[str, UserContext]
    ) -> dict[str, Assignment]:
        """Every batch user's assignment; new users get a row and an ``ExperimentAssigned``."""
        exp = self.experiment
        users = sorted(contexts)
        known = {
            r[0]
            for r in conn.execute(
                f"SELECT user_id FROM {ASSIGNMENTS_TABLE} SEMI JOIN {_USERS} USING (user_id) "
                "WHERE experiment_id = ? AND experiment_version = ?",
                [exp.experiment_id, exp.version],
            ).fetchall()
        }
        out = {u: assign(u, exp) for u in users}
        fresh = [u for u in users if u not in known]
        if not fresh:
            return out
        events = [
            {
                "event_id": assignment_event_id(u, exp),
                "user_id": u,
                "experiment_id": exp.experiment_id,
                "occurred_at": contexts[u].first_ms,
                "variant": out[u].variant,
                "bucket": out[u].bucket,
                "experiment_version": exp.version,
            }
            for u in fresh
        ]
        rows = pa.table(
            {
                "user_id": pa.array(fresh, pa.string()),
                "experiment_id": pa.array([exp.experiment_id] * len(fresh), pa.string()),
                "experiment_version": pa.array([exp.version] * len(fresh), pa.int32()),
                "variant": pa.array([e["variant"] for e in events], pa.string()),
                "bucket": pa.array([e["bucket"] for e in events], pa.int32()),
                "assigned_at": pa.array([e["occurred_at"] for e in events], pa.int64()).cast(_T),
                "event_id": pa.array([e["event_id"] for e in events], pa.string()),
            }
        )
        _insert(conn, ASSIGNMENTS_TABLE, rows)
        self._send(self.experiments_topic, "ExperimentAssigned", events)
        return out

    # -- lists -----------------------------------------------------------------------------------
    def _generate(
        self,
        conn: duckdb.DuckDBPyConnection,
        contexts: Mapping[str, UserContext],
        assignments: Mapping[str, Assignment],
    ) -> None:
        """Replace the lists of the batch's users; append new lists to the history; emit events."""
        model = self._model
        assert model is not None
        popular = most_played(model.items, model.plays, self.top_n + HISTORY)
        stamp = now_utc()
        cols: dict[str, list[Any]] = {f.name: [] for f in _LIST_SCHEMA}
        events: list[dict[str, Any]] = []
        for user in sorted(contexts):
            ctx, a = contexts[user], assignments[user]
            variant = self.experiment.variant(a.variant)
            history = list(ctx.recent)
            primary: list[tuple[str, float]] = []
            if variant.model == ITEM2ITEM_MODEL:
                primary = model.recommend(history, self.top_n, exclude=history)
            items = assemble(primary, popular, self.top_n, exclude=history)
            if not items:
                continue
            lid = list_id(user, a, variant.model, ctx.last_ms, [i.track_id for i in items])
            for rank, item in enumerate(items, start=1):
                for key, value in (
                    ("user_id", user),
                    ("rank", rank),
                    ("track_id", item.track_id),
                    ("score", item.score),
                    ("source", item.source),
                    ("model", variant.model),
                    ("experiment_id", a.experiment_id),
                    ("experiment_version", a.version),
                    ("variant", a.variant),
                    ("generated_at", ctx.last_ms),
                    ("list_id", lid),
                    ("computed_at", stamp),
                ):
                    cols[key].append(value)
            events.append(_list_event(user, a, variant.model, ctx.last_ms, lid, items))
        rows = pa.table({f.name: pa.array(cols[f.name], f.type) for f in _LIST_SCHEMA}, schema=_LIST_SCHEMA)
        conn.execute(f"DELETE FROM {NAME} WHERE user_id IN (SELECT user_id FROM {_USERS})")
        _insert(conn, NAME, rows)
        conn.register("bb_rec_lists", rows)
        try:
            conn.execute(
                f"INSERT INTO {HISTORY_TABLE} SELECT n.* FROM bb_rec_lists n "
                f"ANTI JOIN (SELECT DISTINCT list_id FROM {HISTORY_TABLE}) h USING (list_id)"
            )
        finally:
            conn.unregister("bb_rec_lists")
        self._send(self.recommendations_topic, "RecommendationsGenerated", events)

    def _send(self, topic: str, event_type: str, events: list[dict[str, Any]]) -> None:
        if not events:
            return
        if self._producer is None:
            self._producer = EventProducer(self.settings)
        self._producer.send_many(
            topic, event_type, events, key_field="user_id", time_field="occurred_at", source=EVENT_SOURCE
        )


def _list_event(
    user: str, a: Assignment, model: str, generated_ms: int, lid: str, items: Sequence[ListItem]
) -> dict[str, Any]:
    return {
        "event_id": lid,
        "user_id": user,
        "occurred_at": generated_ms,
        "surface": "HOME",
        "model": model,
        "items": [
            {"track_id": i.track_id, "rank": r, "score": i.score, "reason": _REASONS[i.source]}
            for r, i in enumerate(items, start=1)
        ],
        "request_id": None,
        "experiment_id": a.experiment_id,
        "variant": a.variant,
    }


# -- DuckDB helpers (inside the caller's transaction) ----------------------------------------------
def _offsets(conn: duckdb.DuckDBPyConnection, name: str) -> dict[tuple[str, str, int], int]:
    return {k: v.next_offset for k, v in load_offsets(conn, [name]).items()}


def _insert(conn: duckdb.DuckDBPyConnection, table: str, rows: pa.Table) -> None:
    if rows.num_rows == 0:
        return
    conn.register("bb_rec_rows", rows)
    try:
        conn.execute(f"INSERT INTO {table} SELECT * FROM bb_rec_rows")
    finally:
        conn.unregister("bb_rec_rows")


def served_model(
    a: Sequence[str], b: Sequence[str], weights: np.ndarray, tracks: Sequence[str], plays: np.ndarray
) -> CooccurrenceModel:
    """The model the ``item2item`` variant serves, from stored sums: ``weights[k]`` (float64,
    shape (n,)) the summed ``1 / distance`` of the unordered pair ``(a[k], b[k])``, ``plays[k]``
    the plays of ``tracks[k]``. Window 5, ``distance_weighted``: the configuration of the offline
    evaluation's ``item-to-item`` row (``docs/evaluation.md``), which it equals when given
    the same sessions (tested)."""
    return CooccurrenceModel.from_counts(a, b, weights, tracks, plays, window=WINDOW, distance_weighted=True)


def _load_model(conn: duckdb.DuckDBPyConnection, *, fresh: bool) -> CooccurrenceModel:
    """The model from ``item_pairs``/``item_plays``; with ``fresh`` (no stored offsets: a first run
    or a reset) the state tables are dropped and created again (in the current layout) and the
    ``recommendations`` table emptied, to be rebuilt from offset 0."""
    if fresh:
        for table in STATE_TABLES:
            if table != NAME:  # NAME is the projection's own table (ensure_tables made it)
                conn.execute(f"DROP TABLE IF EXISTS {table}")
        for ddl in STATE_DDL:
            conn.execute(ddl)
        conn.execute(f"DELETE FROM {NAME}")
    pairs = conn.sql(f"SELECT track_a, track_b, distance_weight FROM {PAIRS_TABLE}").to_arrow_table()
    plays = conn.sql(f"SELECT track_id, plays FROM {PLAYS_TABLE}").to_arrow_table()
    return served_model(
        pairs["track_a"].to_pylist(),
        pairs["track_b"].to_pylist(),
        pairs["distance_weight"].to_numpy().astype(np.float64),
        plays["track_id"].to_pylist(),
        plays["plays"].to_numpy().astype(np.float64),
    )


def _fresh(table: pa.Table, thresholds: Mapping[int, int]) -> pa.Table:
    """Rows at or above their partition's stored next offset."""
    if not thresholds:
        return table
    parts = table[PARTITION_COL].to_numpy()
    offs = table[OFFSET_COL].to_numpy()
    floor = np.array([thresholds.get(int(p), 0) for p in parts], dtype=np.int64)
    return table.filter(pa.array(offs >= floor))


def _first_seen(conn: duckdb.DuckDBPyConnection, rows: pa.Table) -> pa.Table:
    """The rows whose ``event_id`` was never applied, the first per id, in (partition, offset)
    order; their ids are recorded in ``recommendation_seen``."""
    conn.register("bb_rec_batch", rows)
    try:
        new = conn.sql(
            f"SELECT b.* FROM bb_rec_batch b ANTI JOIN {SEEN_TABLE} s USING (event_id) "
            f"QUALIFY row_number() OVER (PARTITION BY b.event_id ORDER BY b.{PARTITION_COL}, "
            f"b.{OFFSET_COL}) = 1 ORDER BY b.{PARTITION_COL}, b.{OFFSET_COL}"
        ).to_arrow_table()
    finally:
        conn.unregister("bb_rec_batch")
    _insert(conn, SEEN_TABLE, new.select(["event_id"]))
    return new


def _load_contexts(conn: duckdb.DuckDBPyConnection) -> dict[str, UserContext]:
    """The stored contexts of the batch's users (registered as ``bb_rec_users``)."""
    rows = conn.execute(
        "SELECT user_id, epoch_ms(first_at), epoch_ms(last_at), session_tracks, recent_tracks, listens, "
        f"sessions FROM {CONTEXT_TABLE} SEMI JOIN {_USERS} USING (user_id)"
    ).fetchall()
    return {
        r[0]: UserContext(int(r[1]), int(r[2]), tuple(r[3]), tuple(r[4]), int(r[5]), int(r[6])) for r in rows
    }


def _save_contexts(conn: duckdb.DuckDBPyConnection, contexts: Mapping[str, UserContext]) -> None:
    users = sorted(contexts)
    ctx = [contexts[u] for u in users]
    rows = pa.table(
        [
            pa.array(users, pa.string()),
            pa.array([c.first_ms for c in ctx], pa.int64()).cast(_T),
            pa.array([c.last_ms for c in ctx], pa.int64()).cast(_T),
            pa.array([list(c.session) for c in ctx], pa.list_(pa.string())),
            pa.array([list(c.recent) for c in ctx], pa.list_(pa.string())),
            pa.array([c.listens for c in ctx], pa.int64()),
            pa.array([c.sessions for c in ctx], pa.int64()),
        ],
        schema=_CONTEXT_SCHEMA,
    )
    conn.register("bb_rec_ctx", rows)
    try:
        conn.execute(f"INSERT OR REPLACE INTO {CONTEXT_TABLE} SELECT * FROM bb_rec_ctx")
    finally:
        conn.unregister("bb_rec_ctx")


def _upsert_pairs(
    conn: duckdb.DuckDBPyConnection, a: list[str], b: list[str], weights: np.ndarray, window: int
) -> None:
    """Add the batch's pair weights; each new sum is rounded to the exact ``1 / weight_unit``
    grid, as :func:`personalisation.streaming.snap_weights` (same bits as the in-memory model)."""
    if not a:
        return
    rows = pa.table(
        {
            "track_a": pa.array(a, pa.string()),
            "track_b": pa.array(b, pa.string()),
            "distance_weight": pa.array(weights, pa.float64()),
        }
    )
    unit = weight_unit(window)
    conn.register("bb_rec_pairs", rows)
    try:
        conn.execute(
            f"INSERT INTO {PAIRS_TABLE} SELECT * FROM bb_rec_pairs ON CONFLICT (track_a, track_b) "
            f"DO UPDATE SET distance_weight = round(({PAIRS_TABLE}.distance_weight + "
            f"excluded.distance_weight) * {unit}.0) / {unit}.0"
        )
    finally:
        conn.unregister("bb_rec_pairs")


def _upsert_plays(
    conn: duckdb.DuckDBPyConnection, new: pa.Table, played: list[str], plays: np.ndarray
) -> None:
    """Add the batch's plays per track (``plays[k]`` of ``played[k]``: replays collapsed, so a
    track of ``new`` may add 0); keep the first artist id and names seen."""
    conn.register("bb_rec_new", new)
    conn.register(
        "bb_rec_played",
        pa.table({"track_id": pa.array(played, pa.string()), "plays": pa.array(plays.astype(np.int64))}),
    )
    try:
        conn.execute(
            f"INSERT INTO {PLAYS_TABLE} SELECT n.track_id, min(n.artist_id), min(n.track_name), "
            "min(n.artist_name), coalesce(any_value(p.plays), 0) FROM bb_rec_new n "
            "LEFT JOIN bb_rec_played p USING (track_id) GROUP BY n.track_id "
            f"ON CONFLICT (track_id) DO UPDATE SET plays = {PLAYS_TABLE}.plays + excluded.plays, "
            f"track_name = coalesce({PLAYS_TABLE}.track_name, excluded.track_name), "
            f"artist_name = coalesce({PLAYS_TABLE}.artist_name, excluded.artist_name)"
        )
    finally:
        conn.unregister("bb_rec_played")
        conn.unregister("bb_rec_new")


def _store_rejects(
    conn: duckdb.DuckDBPyConnection, rejects: Sequence[Reject], stored: Mapping[tuple[str, int], int]
) -> int:
    """Record rejects at or above the stored offsets in ``projection_rejects``; returns how many."""
    fresh = [r for r in rejects if r.offset >= stored.get((r.topic, r.partition), 0)]
    if not fresh:
        return 0
    stamp = now_utc()
    rows = pa.table(
        {
            "projection": pa.array([r.projection for r in fresh], pa.string()),
            "topic": pa.array([r.topic for r in fresh], pa.string()),
            "partition": pa.array([r.partition for r in fresh], pa.int32()),
            "offset": pa.array([r.offset for r in fresh], pa.int64()),
            "reason": pa.array([r.reason for r in fresh], pa.string()),
            "rejected_at": pa.array([stamp] * len(fresh), pa.timestamp("ms")),
        },
        schema=REJECTS_SCHEMA,
    )
    _insert(conn, REJECTS_TABLE, rows)
    return len(fresh)


# -- reading (``backbeat recommend``) --------------------------------------------------------------
class RecommendationsError(BackbeatError):
    """A user's recommendations cannot be shown (no read model yet, or an unknown user)."""


class NoRecommendationsModelError(RecommendationsError):
    """There is no ``recommendations`` read model in the DuckDB file yet."""


class UnknownUserError(RecommendationsError):
    """The read model has no list for this user (unknown, or too little to recommend from)."""


@dataclass(frozen=True)
class ShownItem:
    """One row of a shown list: ``rank`` (1-based), ``track_id``, display ``track``/``artist``
    (mapped names, :mod:`projections.names`; ``None`` without a catalog), ``score``, ``source``."""

    rank: int
    track_id: str
    track: str | None
    artist: str | None
    score: float
    source: str


@dataclass(frozen=True)
class UserRecommendations:
    """A user's current list: experiment, ``variant`` and ``model`` that produced it,
    ``generated_at`` (event time of the latest listen it accounts for, naive UTC),
    ``computed_at`` (wall clock, naive UTC), ``named`` (whether the catalog gave names),
    ``items`` best first (ranks as the model gave them, so a gap marks a withheld track),
    ``territory`` the list is served for and ``withheld`` the track ids of the stored list left out
    because they may not be played there now (withdrawn or unlicensed,
    :func:`projections.availability.unavailable`)."""

    user_id: str
    experiment_id: str
    variant: str
    model: str
    generated_at: datetime
    computed_at: datetime
    named: bool
    items: tuple[ShownItem, ...]
    territory: str = ""
    withheld: tuple[str, ...] = ()


def _tables(conn: duckdb.DuckDBPyConnection) -> set[str]:
    return {r[0] for r in conn.execute("SELECT table_name FROM duckdb_tables()").fetchall()}


def read_recommendations(
    settings: Settings, user_id: str, n: int = TOP_N, timeout_s: float = 30.0, territory: str | None = None
) -> UserRecommendations:
    """The current list of ``user_id`` (at most ``n`` items) from the read model, with names,
    for ``territory`` (default: the territory of the user's latest listen that has one,
    :func:`projections.availability.user_territory`, else
    :data:`projections.availability.DEFAULT_TERRITORY`): tracks of the
    list that may not be played there now (withdrawn or unlicensed, ``track_availability``) are
    never shown, whenever the list was computed (``withheld`` names them).

    Raises:
        UnknownTerritoryError: ``territory`` is not one availability is tracked for.
        NoReadModelsError: there is no DuckDB file yet.
        NoRecommendationsModelError: the read model does not exist yet (the message says which
            commands to run).
        UnknownUserError: it has no list for ``user_id`` (the message shows some known users).
        DatabaseBusyError: a runner held the file for ``timeout_s`` seconds.
    """
    if territory is not None:
        where = resolve_territory(territory)
    with reader(settings.duckdb_path, timeout_s) as conn:
        if territory is None:
            where = resolve_territory(user_territory(conn, user_id))
        tables = _tables(conn)
        if NAME not in tables or CONTEXT_TABLE not in tables:
            raise NoRecommendationsModelError(
                f"there is no recommendations read model in {settings.duckdb_path} yet: import listens "
                "('backbeat import listens FILE') and run the projections ('backbeat project', or "
                "'backbeat project -p recommendations --until-caught-up')"
            )
        rows = conn.execute(
            f"SELECT experiment_id, variant, model, generated_at, computed_at FROM {NAME} WHERE user_id = ? "
            'ORDER BY "rank" LIMIT 1',
            [user_id],
        ).fetchall()
        if not rows:
            raise UnknownUserError(_unknown_user(conn, user_id))
        experiment_id, variant, model, generated_at, computed_at = rows[0]
        listed = [
            r[0] for r in conn.execute(f"SELECT track_id FROM {NAME} WHERE user_id = ?", [user_id]).fetchall()
        ]
        withheld = sorted(unavailable(conn, listed, where))
        named = "tracks" in tables and PLAYS_TABLE in tables
        if named:
            source = (
                f'(SELECT r."rank", r.track_id, r.score, r.source, p.artist_id, p.track_name, p.artist_name '
                f"FROM {NAME} r JOIN {PLAYS_TABLE} p USING (track_id) WHERE r.user_id = $user)"
            )
            sql = (
                f'WITH {name_ctes(source)} SELECT "rank", track_id, track_shown, artist_shown, score, source '
                "FROM named WHERE NOT list_contains(CAST($withheld AS VARCHAR[]), track_id) "
                'ORDER BY "rank" LIMIT $n'
            )
        else:
            sql = (
                f'SELECT "rank", track_id, NULL, NULL, score, source FROM {NAME} WHERE user_id = $user '
                "AND NOT list_contains(CAST($withheld AS VARCHAR[]), track_id) "
                'ORDER BY "rank" LIMIT $n'
            )
        params = {"user": user_id, "n": n, "withheld": withheld}
        items = tuple(
            ShownItem(int(r[0]), r[1], r[2], r[3], float(r[4]), r[5])
            for r in conn.execute(sql, params).fetchall()
        )
    return UserRecommendations(
        user_id,
        experiment_id,
        variant,
        model,
        generated_at,
        computed_at,
        named,
        items,
        where,
        tuple(withheld),
    )


def _unknown_user(conn: duckdb.DuckDBPyConnection, user_id: str) -> str:
    seen = conn.execute(f"SELECT listens FROM {CONTEXT_TABLE} WHERE user_id = ?", [user_id]).fetchall()
    if seen:
        return (
            f"user {user_id!r} has {seen[0][0]} listens in the read model but no list (the catalog of "
            "played tracks is too small to recommend anything the user has not just played)"
        )
    examples = [
        r[0] for r in conn.execute(f"SELECT DISTINCT user_id FROM {NAME} ORDER BY 1 LIMIT 5").fetchall()
    ]
    hint = f"; users with lists include {', '.join(examples)}" if examples else "; no user has a list yet"
    return (
        f"unknown user {user_id!r}: no listens of this user reached the recommendations read model "
        f"(check the id; if the listens were imported just now, run 'backbeat project'){hint}"
    )


__all__ = [
    "ASSIGNMENTS_TABLE",
    "CONTEXT_TABLE",
    "EXPERIMENTS_TOPIC",
    "HISTORY_TABLE",
    "NAME",
    "PAIRS_TABLE",
    "PLAYS_TABLE",
    "RECOMMENDATIONS",
    "RECOMMENDATIONS_TOPIC",
    "SEEN_TABLE",
    "TOP_N",
    "NoRecommendationsModelError",
    "RecommendationsError",
    "RecommendationsWriter",
    "ShownItem",
    "StatefulProjection",
    "UnknownUserError",
    "UserRecommendations",
    "list_id",
    "read_recommendations",
    "served_model",
]
