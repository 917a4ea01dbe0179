"""The ``recommendations`` read model: "Made for You" lists per user, kept up to date from
``playback.listens`` by the projection runner, exactly once, with the A/B experiment
:data:`personalisation.experiments.MADE_FOR_YOU` deciding which model serves each user.

The model is the streaming recommender :class:`personalisation.session_model.SessionModel`
(sequence-aware co-occurrence; the ``streaming`` row of ``docs/evaluation.md``), held in memory
and in the state tables ``item_pairs`` (rule and co-occurrence weights, whole numbers of
``1 / 2520``), ``item_plays`` (plays and each track's first artist), ``user_transitions``,
``user_artist_affinity`` and ``recommendation_context`` (each user's open session).

Per batch, in ONE DuckDB transaction together with the consumed offsets
(:func:`projections.tracking.save_offsets`):

1. drop records below the stored offsets (redelivered) and listens whose ``event_id`` was
   applied before (``recommendation_seen``; a re-import or a retried producer), keeping the first
   by (partition, offset);
2. fold the listens into the model ONE AT A TIME, each user's in offset order, the users merged
   by event time (ties: partition, offset); right after a user's last listen of the batch, the
   user's list is made from the model as it stands then (:meth:`SessionModel.recommend` for the
   user's open session, without its tracks, backfilled with the most played so far; the control
   arm gets the most played alone): a list never depends on a listen of its batch with a later
   event time (``docs/recommendations.md``);
3. assign the users of the batch to the experiment (a new user gets a row in
   ``experiment_assignments`` and an ``ExperimentAssigned`` event, id deterministic per user,
   experiment and version); ``control`` users get the most-played list instead;
4. rewrite the state rows the batch changed (:meth:`SessionModel.take_changes`), replace the
   batch users' rows in ``recommendations``, append each new list to
   ``recommendation_history``, and emit one ``RecommendationsGenerated`` per list (event id =
   list id, a hash of the list);
5. flush the events to Kafka, then commit.

Failure semantics: a crash before the commit leaves nothing in DuckDB (the in-memory model is
dropped and loaded again from the tables), and the batch is read again; events already flushed are
then sent again (at-least-once delivery with deterministic ids: consumers de-duplicate by
``event_id``). ``ExperimentAssigned`` comes back with the same id; a list comes back with the same
id when the retried batch ends where the first one did, else it is another list (the first one's
event then has no ``recommendation_history`` row). A crash after the commit loses nothing. So the
tables are exactly-once, the events at-least-once. The state tables do not depend on where
batches ended (each user's listens are folded in offset order and weights are integers); which
lists exist does (one per user per batch), and ``generated_at`` is event time: the user's latest
listen the list accounts for.

:func:`projections.tracking.reset` with ``["recommendations"]`` drops the ``recommendations``
table and its offsets; the next run finds no offsets and empties the other tables here too, so
the whole model is rebuilt from offset 0 (its state tables are dropped and created again, so a
file written by an older version of this read model gets the current layout). A file from an
older version is refused at start with the reset command to run
(:func:`projections.tracking.ensure_tables`).
"""

from __future__ import annotations

import hashlib
import heapq
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
from personalisation.experiments import (
    MADE_FOR_YOU,
    POPULAR_MODEL,
    STREAMING_MODEL,
    Assignment,
    Experiment,
    assign,
    assignment_event_id,
)
from personalisation.session_model import Changes, OpenSession, SessionModel
from personalisation.streaming import ListItem, assemble
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
TRANSITIONS_TABLE = "user_transitions"
AFFINITY_TABLE = "user_artist_affinity"
CONTEXT_TABLE = "recommendation_context"
SEEN_TABLE = "recommendation_seen"
ASSIGNMENTS_TABLE = "experiment_assignments"
HISTORY_TABLE = "recommendation_history"
#: The tables a reset or first run empties (all but bookkeeping).
STATE_TABLES = (
    NAME,
    PAIRS_TABLE,
    PLAYS_TABLE,
    TRANSITIONS_TABLE,
    AFFINITY_TABLE,
    CONTEXT_TABLE,
    SEEN_TABLE,
    ASSIGNMENTS_TABLE,
    HISTORY_TABLE,
)

_LIST_COLUMNS = """user_id VARCHAR NOT NULL, "rank" INTEGER NOT NULL, track_id VARCHAR NOT NULL,
  score DOUBLE NOT NULL, source VARCHAR NOT NULL, model VARCHAR NOT NULL,
  experiment_id VARCHAR NOT NULL, experiment_version INTEGER NOT NULL, variant VARCHAR NOT NULL,
  generated_at TIMESTAMP NOT NULL, list_id VARCHAR NOT NULL, computed_at TIMESTAMP NOT NULL"""

RECOMMENDATIONS_DDL = f"""CREATE TABLE IF NOT EXISTS {NAME} (
  {_LIST_COLUMNS}, PRIMARY KEY (user_id, "rank"))"""

#: The state tables (created at every start after the ``recommendations`` table).
STATE_DDL = (
    f"""CREATE TABLE IF NOT EXISTS {PAIRS_TABLE} (
  track_a VARCHAR NOT NULL, track_b VARCHAR NOT NULL, rule_weight BIGINT NOT NULL,
  near_weight BIGINT NOT NULL, PRIMARY KEY (track_a, track_b))""",
    f"""CREATE TABLE IF NOT EXISTS {PLAYS_TABLE} (
  track_id VARCHAR PRIMARY KEY, artist_id VARCHAR NOT NULL, track_name VARCHAR, artist_name VARCHAR,
  plays BIGINT NOT NULL)""",
    f"""CREATE TABLE IF NOT EXISTS {TRANSITIONS_TABLE} (
  user_id VARCHAR NOT NULL, track_a VARCHAR NOT NULL, track_b VARCHAR NOT NULL, plays BIGINT NOT NULL,
  PRIMARY KEY (user_id, track_a, track_b))""",
    f"""CREATE TABLE IF NOT EXISTS {CONTEXT_TABLE} (
  user_id VARCHAR PRIMARY KEY, first_at TIMESTAMP NOT NULL, last_at TIMESTAMP NOT NULL,
  session_tracks VARCHAR[] NOT NULL, listens BIGINT NOT NULL, sessions BIGINT NOT NULL,
  affinity_ref_at TIMESTAMP NOT NULL)""",
    f"""CREATE TABLE IF NOT EXISTS {AFFINITY_TABLE} (
  user_id VARCHAR NOT NULL, artist_id VARCHAR NOT NULL, affinity DOUBLE NOT NULL,
  PRIMARY KEY (user_id, artist_id))""",
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

#: Version 3: the streaming model's state (``item_pairs`` with integer ``rule_weight`` and
#: ``near_weight``, ``user_transitions``, the open session in ``recommendation_context``) replaced
#: version 2's summed 1/distance pair weights; an older file must be reset and rebuilt.
RECOMMENDATIONS = StatefulProjection(
    name=NAME,
    version=3,
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
        ("listens", pa.int64()),
        ("sessions", pa.int64()),
        ("affinity_ref_at", _T),
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
_REASONS = {"cooccurrence": "often played after the tracks of your session", "popular": "popular"}


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
            if v.model not in (POPULAR_MODEL, STREAMING_MODEL):
                raise ConfigError(
                    f"variant {v.name!r} of {experiment.experiment_id!r} names model {v.model!r}; the "
                    f"recommendations read model serves {POPULAR_MODEL!r} and {STREAMING_MODEL!r}"
                )
        self.settings = settings
        self.experiment = experiment
        self.top_n = top_n
        self.experiments_topic = experiments_topic
        self.recommendations_topic = recommendations_topic
        self._producer = producer
        self._model: SessionModel | None = None
        #: the offsets this writer last committed: other ones at a batch's start mean the tables
        #: were replaced under it (a replay's switch, a reset), so the model is loaded again
        self._committed: dict[tuple[str, int], int] | None = None

    @property
    def model(self) -> SessionModel | None:
        """The in-memory model the lists are made from, as of the last committed batch (equal to
        :func:`load_model` of the state tables); ``None`` before the first batch of a run and after
        a failed one. Do not modify it."""
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
        popular_n = self.top_n + model.rule_steps
        users = new["user_id"].to_pylist()
        tracks = new["track_id"].to_pylist()
        artists = new["artist_id"].to_pylist()
        times = new["occurred_at"].cast(pa.int64()).to_pylist()
        queues: dict[str, list[int]] = {}
        for k, user in enumerate(users):  # rows are in (partition, offset) order
            queues.setdefault(user, []).append(k)
        assignments = {u: assign(u, self.experiment) for u in queues}
        # merge the users' queues by event time (ties: the row order): each user's listens stay in
        # offset order, and a user's list is made right after the user's last listen of the batch
        heap = [(times[q[0]], q[0], u) for u, q in queues.items()]
        heapq.heapify(heap)
        pos = dict.fromkeys(queues, 0)
        lists: dict[str, tuple[int, list[ListItem]]] = {}
        while heap:
            _, k, user = heapq.heappop(heap)
            model.observe(user, tracks[k], times[k], artists[k])
            pos[user] += 1
            q = queues[user]
            if pos[user] < len(q):
                nxt = q[pos[user]]
                heapq.heappush(heap, (times[nxt], nxt, user))
                continue
            session = model.session(user)
            popular = model.popular(popular_n)
            primary: list[tuple[str, float]] = []
            if self.experiment.variant(assignments[user].variant).model == STREAMING_MODEL:
                primary = model.recommend(user, session, self.top_n, exclude=session)
            lists[user] = (model.open[user].last_ms, assemble(primary, popular, self.top_n, exclude=session))
        changes = model.take_changes()
        _save_state(conn, model, changes, new)
        self._assign(conn, {u: model.open[u] for u in queues}, assignments)
        self._generate(conn, lists, assignments)
        return new.num_rows

    # -- experiment ------------------------------------------------------------------------------
    def _assign(
        self,
        conn: duckdb.DuckDBPyConnection,
        contexts: Mapping[str, OpenSession],
        out: Mapping[str, Assignment],
    ) -> None:
        """Record the assignments ``out`` of the batch's users that are new: a row and an
        ``ExperimentAssigned`` each."""
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
        fresh = [u for u in users if u not in known]
        if not fresh:
            return
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

    # -- lists -----------------------------------------------------------------------------------
    def _generate(
        self,
        conn: duckdb.DuckDBPyConnection,
        lists: Mapping[str, tuple[int, list[ListItem]]],
        assignments: Mapping[str, Assignment],
    ) -> None:
        """Replace the lists of the batch's users (``lists``: user -> (generated_at ms, items));
        append new lists to the history; emit events."""
        stamp = now_utc()
        cols: dict[str, list[Any]] = {f.name: [] for f in _LIST_SCHEMA}
        events: list[dict[str, Any]] = []
        for user in sorted(lists):
            generated_ms, items = lists[user]
            a = assignments[user]
            variant = self.experiment.variant(a.variant)
            if not items:
                continue
            lid = list_id(user, a, variant.model, generated_ms, [i.track_id for i in items])
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
                    ("generated_at", generated_ms),
                    ("list_id", lid),
                    ("computed_at", stamp),
                ):
                    cols[key].append(value)
            events.append(_list_event(user, a, variant.model, generated_ms, lid, items))
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


def _insert(conn: duckdb.DuckDBPyConnection, table: str, rows: pa.Table, *, replace: bool = False) -> None:
    """Insert ``rows`` (columns in the table's order) into ``table``; with ``replace``, ``INSERT OR
    REPLACE`` (rows with an existing key overwrite it)."""
    if rows.num_rows == 0:
        return
    conn.register("bb_rec_rows", rows)
    try:
        conn.execute(f"INSERT {'OR REPLACE ' if replace else ''}INTO {table} SELECT * FROM bb_rec_rows")
    finally:
        conn.unregister("bb_rec_rows")


def load_model(conn: duckdb.DuckDBPyConnection) -> SessionModel:
    """The streaming model from the state tables (``item_pairs``, ``item_plays``,
    ``user_transitions``, ``user_artist_affinity``, ``recommendation_context``): equal to the one
    that wrote them."""
    model = SessionModel(track_changes=True)
    pairs = conn.sql(f"SELECT track_a, track_b, rule_weight, near_weight FROM {PAIRS_TABLE}").to_arrow_table()
    for a, b, rule, near in zip(*(pairs[c].to_pylist() for c in pairs.column_names), strict=True):
        if rule:
            model.rules.setdefault(a, {})[b] = rule
        if near:
            model.near.setdefault(a, {})[b] = near
    for track, artist, plays in conn.execute(
        f"SELECT track_id, artist_id, plays FROM {PLAYS_TABLE}"
    ).fetchall():
        model.artist_of[track] = artist
        if plays:
            model.plays[track] = plays
    for user, artist, value in conn.execute(
        f"SELECT user_id, artist_id, affinity FROM {AFFINITY_TABLE}"
    ).fetchall():
        model.affinity.setdefault(user, {})[artist] = value
    for user, a, b, n in conn.execute(
        f"SELECT user_id, track_a, track_b, plays FROM {TRANSITIONS_TABLE}"
    ).fetchall():
        model.transitions.setdefault(user, {}).setdefault(a, {})[b] = n
    for user, first, last, session, listens, sessions, ref in conn.execute(
        "SELECT user_id, epoch_ms(first_at), epoch_ms(last_at), session_tracks, listens, sessions, "
        f"epoch_ms(affinity_ref_at) FROM {CONTEXT_TABLE}"
    ).fetchall():
        model.open[user] = OpenSession(int(first), int(last), list(session), int(listens), int(sessions))
        model.affinity_ref[user] = int(ref)
        model.listens += int(listens)
    model.rebuild_popular()
    return model


def _load_model(conn: duckdb.DuckDBPyConnection, *, fresh: bool) -> SessionModel:
    """:func:`load_model`; with ``fresh`` (no stored offsets: a first run or a reset) the state
    tables are first dropped and created again (in the current layout) and the
    ``recommendations`` table emptied, to be rebuilt from offset 0."""
    if fresh:
        for table in STATE_TABLES:
            if table != NAME:  # NAME is the projection's own table (ensure_tables made it)
                conn.execute(f"DROP TABLE IF EXISTS {table}")
        for ddl in STATE_DDL:
            conn.execute(ddl)
        conn.execute(f"DELETE FROM {NAME}")
    return load_model(conn)


def _save_state(
    conn: duckdb.DuckDBPyConnection, model: SessionModel, changes: Changes, new: pa.Table
) -> None:
    """Rewrite the state rows ``changes`` names with the model's current values (absolute, not
    increments, so the tables equal the model whatever the batches); ``item_plays`` keeps the
    first names seen for a track (from ``new``, the batch's listens)."""
    pairs = sorted(changes.pairs)
    _insert(
        conn,
        PAIRS_TABLE,
        pa.table(
            {
                "track_a": pa.array([a for a, _ in pairs], pa.string()),
                "track_b": pa.array([b for _, b in pairs], pa.string()),
                "rule_weight": pa.array([model.rules.get(a, {}).get(b, 0) for a, b in pairs], pa.int64()),
                "near_weight": pa.array([model.near.get(a, {}).get(b, 0) for a, b in pairs], pa.int64()),
            }
        ),
        replace=True,
    )
    moves = sorted(changes.transitions)
    _insert(
        conn,
        TRANSITIONS_TABLE,
        pa.table(
            {
                "user_id": pa.array([u for u, _, _ in moves], pa.string()),
                "track_a": pa.array([a for _, a, _ in moves], pa.string()),
                "track_b": pa.array([b for _, _, b in moves], pa.string()),
                "plays": pa.array([model.transitions[u][a][b] for u, a, b in moves], pa.int64()),
            }
        ),
        replace=True,
    )
    users = sorted(changes.users)
    ctx = [model.open[u] for u in users]
    _insert(
        conn,
        CONTEXT_TABLE,
        pa.table(
            [
                pa.array(users, pa.string()),
                pa.array([c.first_ms for c in ctx], pa.int64()).cast(_T),
                pa.array([c.last_ms for c in ctx], pa.int64()).cast(_T),
                pa.array([list(c.plays) for c in ctx], pa.list_(pa.string())),
                pa.array([c.listens for c in ctx], pa.int64()),
                pa.array([c.sessions for c in ctx], pa.int64()),
                pa.array([model.affinity_ref[u] for u in users], pa.int64()).cast(_T),
            ],
            schema=_CONTEXT_SCHEMA,
        ),
        replace=True,
    )
    liked = sorted(changes.affinity)
    _insert(
        conn,
        AFFINITY_TABLE,
        pa.table(
            {
                "user_id": pa.array([u for u, _ in liked], pa.string()),
                "artist_id": pa.array([a for _, a in liked], pa.string()),
                "affinity": pa.array([model.affinity[u][a] for u, a in liked], pa.float64()),
            }
        ),
        replace=True,
    )
    played = sorted(set(new["track_id"].to_pylist()))
    conn.register("bb_rec_new", new)
    conn.register(
        "bb_rec_played",
        pa.table(
            {
                "track_id": pa.array(played, pa.string()),
                "artist_id": pa.array([model.artist_of[t] for t in played], pa.string()),
                "plays": pa.array([model.plays.get(t, 0) for t in played], pa.int64()),
            }
        ),
    )
    try:
        conn.execute(
            f"INSERT INTO {PLAYS_TABLE} SELECT n.track_id, any_value(p.artist_id), min(n.track_name), "
            "min(n.artist_name), any_value(p.plays) FROM bb_rec_new n JOIN bb_rec_played p USING (track_id) "
            f"GROUP BY n.track_id ON CONFLICT (track_id) DO UPDATE SET plays = excluded.plays, "
            f"track_name = coalesce({PLAYS_TABLE}.track_name, excluded.track_name), "
            f"artist_name = coalesce({PLAYS_TABLE}.artist_name, excluded.artist_name)"
        )
    finally:
        conn.unregister("bb_rec_played")
        conn.unregister("bb_rec_new")


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
    "AFFINITY_TABLE",
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
    "TRANSITIONS_TABLE",
    "NoRecommendationsModelError",
    "RecommendationsError",
    "RecommendationsWriter",
    "ShownItem",
    "StatefulProjection",
    "UnknownUserError",
    "UserRecommendations",
    "list_id",
    "read_recommendations",
    "load_model",
]
