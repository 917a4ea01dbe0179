"""The A/B readout of the "Made for You" experiment (issue 18): play-through of recommended tracks
within 7 days, per variant, computed from the stream's read models, with 95 % intervals.

**The metric.** Every (list, track) the ``recommendations`` read model served
(``recommendation_history``, one row per rank of a list) is an *exposure* of its user at the
list's ``generated_at`` (event time of the user's latest listen the list accounts for). The
exposure is *played* when the ``listens`` read model holds a listen of that user and that track
with ``generated_at < occurred_at <= generated_at + days`` (7 by default): a listen at
``generated_at`` itself is the one the list was made after, not a response to it; a listen at
exactly 7 days counts, one a millisecond later does not. A user's *play-through* is played /
recommended over the user's exposures; a variant's readout is the mean over its users of their
play-through (and, for reference, the pooled played / recommended).

**Immature lists.** A list whose window has not closed yet (``generated_at + days`` later than
the *watermark*, the latest ``occurred_at`` in ``listens``) cannot be "not played" yet: its
exposures have ``mature = false`` and ``played = NULL`` (``played_so_far`` says what is known
so far) and are left out of every number of the readout, which says how many lists were left out
(``immature_lists``). The watermark is the largest event time the read model has seen; a listen
that arrives later with an older event time (a lagging partition, an offline client) can still
turn a closed window's "not played" into "played" at the next query: the readout is as of the
listens read so far.

**Unit of analysis.** The user is the unit of randomisation
(:mod:`personalisation.experiments`), and one user's exposures are not independent of each other,
so the user is the unit of analysis: the variant's metric is the mean of per-user play-throughs,
and its interval resamples users, not exposures (Kohavi, Tang & Xu, *Trustworthy Online
Controlled Experiments*, Cambridge University Press 2020, ch. 18 "Variance Estimation and Improved
Sensitivity: Pitfalls and Solutions": when the analysis unit differs from the randomisation unit,
the naive variance over exposures is wrong; bootstrap or the delta method over randomisation units
is right). The pooled
played / recommended is a ratio metric with the same problem; its interval here also resamples
users (:func:`personalisation.evaluation.bootstrap_ci` resamples units and recomputes
``sum(played) / sum(recommended)``), the bootstrap counterpart of the delta method of Deng, Knoblich
& Lu, "Applying the delta method in metric analytics", KDD 2018.

**Intervals** (:func:`readout`): 95 % percentile bootstrap, 1000 resamples, seeded
(:data:`personalisation.evaluation.BOOTSTRAP_SEED`), each variant's users taken in ``user_id``
order (so the same read models always give the same intervals). Per variant: users resampled with
replacement (:func:`personalisation.evaluation.bootstrap_ci` with counts of 1). Difference of a
variant against the control (the experiment's first variant): the two variants' users are
independent samples, so each resample draws each variant's users separately and the interval is
taken over the differences of the resampled means. The bootstrap rather than a normal interval
because per-user play-through is bounded, mostly zero and skewed on small samples.

**Where it lives.** The SQL is DuckDB table macros and views over ``listens`` and
``recommendation_history`` (:data:`VIEWS_DDL`): ``experiment_exposures_of(days)`` /
``experiment_exposures`` (one row per exposure), ``experiment_users_of(days)`` /
``experiment_users`` (one row per user and variant, mature exposures only) and
``experiment_readout_of(days)`` / ``experiment_readout`` (one row per experiment, version and
variant); the views use 7 days. They need both tables, which two different runners create, so the
projection runner creates them at start once both exist (:func:`ensure_views`, called by
:class:`projections.runner.ProjectionRunner`); ``backbeat project`` (which runs both) therefore
leaves them in the file for ``backbeat sql`` and ``backbeat evaluate experiment``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any

import duckdb
import numpy as np

from infra.errors import BackbeatError
from infra.settings import Settings
from personalisation.evaluation import BOOTSTRAP_SAMPLES, BOOTSTRAP_SEED, CONFIDENCE, bootstrap_ci
from personalisation.experiments import MADE_FOR_YOU, Experiment
from projections.store import reader

#: The default play-through window, in days (the issue's "within 7 days").
WINDOW_DAYS = 7
#: The read models the readout reads: the listens, and every list served.
LISTENS_TABLE = "listens"
HISTORY_TABLE = "recommendation_history"
NEEDS = (LISTENS_TABLE, HISTORY_TABLE)

EXPOSURES_VIEW = "experiment_exposures"
USERS_VIEW = "experiment_users"
READOUT_VIEW = "experiment_readout"
EXPOSURES_MACRO = "experiment_exposures_of"
USERS_MACRO = "experiment_users_of"
READOUT_MACRO = "experiment_readout_of"

#: One row per exposure (a distinct (list, rank, track) served): ``experiment_id``,
#: ``experiment_version``, ``variant``, ``user_id``, ``list_id``, ``rank``, ``track_id``,
#: ``generated_at`` (TIMESTAMP, UTC), ``window_days`` (INTEGER), ``window_ends_at`` (=
#: ``generated_at`` + ``days``), ``watermark`` (latest ``listens.occurred_at``), ``mature``
#: (``window_ends_at <= watermark``; false when there are no listens), ``played_so_far`` (BOOLEAN:
#: the listens read so far hold one of that user and track in ``(generated_at, window_ends_at]``)
#: and ``played`` (the same, but NULL while not mature: the metric's outcome).
EXPOSURES_SQL = f"""CREATE OR REPLACE MACRO {EXPOSURES_MACRO}(days) AS TABLE
WITH watermark AS (SELECT max(occurred_at) AS watermark FROM {LISTENS_TABLE}),
served AS (
    SELECT DISTINCT experiment_id, experiment_version, variant, user_id, list_id, "rank", track_id,
           generated_at, generated_at + to_days(CAST(days AS INTEGER)) AS window_ends_at
    FROM {HISTORY_TABLE}
),
judged AS (
    SELECT s.*, CAST(days AS INTEGER) AS window_days, w.watermark,
           coalesce(s.window_ends_at <= w.watermark, false) AS mature,
           EXISTS (
               SELECT 1 FROM {LISTENS_TABLE} l
               WHERE l.user_id = s.user_id AND l.track_id = s.track_id
                 AND l.occurred_at > s.generated_at AND l.occurred_at <= s.window_ends_at
           ) AS played_so_far
    FROM served s CROSS JOIN watermark w
)
SELECT experiment_id, experiment_version, variant, user_id, list_id, "rank", track_id, generated_at,
       window_days, window_ends_at, watermark, mature, played_so_far,
       CASE WHEN mature THEN played_so_far END AS played
FROM judged"""

#: One row per (experiment, version, variant, user) with at least one mature exposure:
#: ``lists``, ``recommended`` (mature exposures), ``played`` (BIGINT) and ``play_through``
#: (DOUBLE, played / recommended).
USERS_SQL = f"""CREATE OR REPLACE MACRO {USERS_MACRO}(days) AS TABLE
SELECT experiment_id, experiment_version, variant, user_id,
       CAST(count(DISTINCT list_id) AS BIGINT) AS lists,
       CAST(count(*) AS BIGINT) AS recommended,
       CAST(count(*) FILTER (WHERE played) AS BIGINT) AS played,
       count(*) FILTER (WHERE played) / count(*) AS play_through
FROM {EXPOSURES_MACRO}(days) WHERE mature
GROUP BY experiment_id, experiment_version, variant, user_id"""

#: One row per (experiment, version, variant) that served a list: ``users``, ``lists``,
#: ``recommended``, ``played`` (mature only, BIGINT), ``play_through`` (pooled played /
#: recommended, DOUBLE, NULL without mature exposures), ``mean_user_play_through`` (mean over
#: ``users`` of their play-through: the metric), ``immature_lists`` and ``immature_recommended``
#: (left out), ``window_days`` and ``watermark``.
READOUT_SQL = f"""CREATE OR REPLACE MACRO {READOUT_MACRO}(days) AS TABLE
WITH per_variant AS (
    SELECT experiment_id, experiment_version, variant,
           any_value(window_days) AS window_days, any_value(watermark) AS watermark,
           CAST(count(DISTINCT list_id) FILTER (WHERE mature) AS BIGINT) AS lists,
           CAST(count(DISTINCT list_id) FILTER (WHERE NOT mature) AS BIGINT) AS immature_lists,
           CAST(count(*) FILTER (WHERE NOT mature) AS BIGINT) AS immature_recommended
    FROM {EXPOSURES_MACRO}(days)
    GROUP BY experiment_id, experiment_version, variant
), per_user AS (
    SELECT experiment_id, experiment_version, variant, CAST(count(*) AS BIGINT) AS users,
           CAST(sum(recommended) AS BIGINT) AS recommended, CAST(sum(played) AS BIGINT) AS played,
           avg(play_through) AS mean_user_play_through
    FROM {USERS_MACRO}(days)
    GROUP BY experiment_id, experiment_version, variant
)
SELECT v.experiment_id, v.experiment_version, v.variant, coalesce(u.users, 0) AS users, v.lists,
       coalesce(u.recommended, 0) AS recommended, coalesce(u.played, 0) AS played,
       u.played / u.recommended AS play_through, u.mean_user_play_through,
       v.immature_lists, v.immature_recommended, v.window_days, v.watermark
FROM per_variant v LEFT JOIN per_user u USING (experiment_id, experiment_version, variant)
ORDER BY v.experiment_id, v.experiment_version, v.variant"""

#: The macros and the 7-day views, in creation order (idempotent: ``CREATE OR REPLACE``).
VIEWS_DDL: tuple[str, ...] = (
    EXPOSURES_SQL,
    USERS_SQL,
    READOUT_SQL,
    f"CREATE OR REPLACE VIEW {EXPOSURES_VIEW} AS SELECT * FROM {EXPOSURES_MACRO}({WINDOW_DAYS})",
    f"CREATE OR REPLACE VIEW {USERS_VIEW} AS SELECT * FROM {USERS_MACRO}({WINDOW_DAYS})",
    f"CREATE OR REPLACE VIEW {READOUT_VIEW} AS SELECT * FROM {READOUT_MACRO}({WINDOW_DAYS})",
)


def _relations(conn: duckdb.DuckDBPyConnection) -> set[str]:
    rows = conn.execute(
        "SELECT table_name FROM duckdb_tables() UNION SELECT view_name FROM duckdb_views() WHERE NOT internal"
    ).fetchall()
    return {r[0] for r in rows}


def ensure_views(conn: duckdb.DuckDBPyConnection) -> bool:
    """Create (or replace) the readout's macros and views on ``conn`` (a writable connection, in
    the caller's transaction) when both ``listens`` and ``recommendation_history`` exist (as
    tables, or as the views a replay leaves); returns whether it did. DuckDB binds a view when it
    is created, so they cannot be made before both tables are; the runner calls this at every
    start, so whichever of the two runners starts second makes them.

    Raises:
        duckdb.Error: a statement failed (e.g. one of the tables lacks a column the SQL reads).
    """
    if not set(NEEDS) <= _relations(conn):
        return False
    for statement in VIEWS_DDL:
        conn.execute(statement)
    return True


# -- the readout with intervals (``backbeat evaluate experiment``) --------------------------------
class ExperimentReadoutError(BackbeatError):
    """The readout cannot be computed (no read models, or the experiment is unknown)."""


class NoReadoutError(ExperimentReadoutError):
    """The DuckDB file lacks ``listens``, ``recommendation_history`` or the readout's macros."""


class UnknownExperimentError(ExperimentReadoutError):
    """No list of the requested experiment is in ``recommendation_history``."""


@dataclass(frozen=True)
class UserOutcome:
    """One user's mature exposures in one variant: ``recommended`` and ``played`` counts and
    ``play_through`` = played / recommended (0..1)."""

    user_id: str
    recommended: int
    played: int

    @property
    def play_through(self) -> float:
        """played / recommended (``recommended`` is at least 1 for a user in the readout)."""
        return self.played / self.recommended


@dataclass(frozen=True)
class VariantReadout:
    """The readout of one variant (one row of ``experiment_readout_of(days)`` plus intervals).

    ``users``/``lists``/``recommended``/``played``: counts over mature exposures;
    ``play_through``: pooled played / recommended, with ``play_through_ci`` (users resampled);
    ``mean_user_play_through``: mean over users of their play-through (the metric), with
    ``mean_ci``; ``diff_vs_control``: this variant's ``mean_user_play_through`` minus the control's,
    with ``diff_ci`` (``0.0`` and ``(0.0, 0.0)`` for the control itself; ``None`` when either side
    has no users); ``immature_lists``/``immature_recommended``: left out (window still open);
    ``window_days``; ``watermark``: latest listen event time (naive UTC, ``None`` without
    listens). Rates are fractions 0..1; intervals are ``(low, high)`` at 95 %, ``None`` without
    users.
    """

    experiment_id: str
    experiment_version: int
    variant: str
    control: str
    users: int
    lists: int
    recommended: int
    played: int
    play_through: float | None
    play_through_ci: tuple[float, float] | None
    mean_user_play_through: float | None
    mean_ci: tuple[float, float] | None
    diff_vs_control: float | None
    diff_ci: tuple[float, float] | None
    immature_lists: int
    immature_recommended: int
    window_days: int
    watermark: datetime | None

    def as_json(self) -> dict[str, Any]:
        """A JSON-ready dict of every field (``watermark`` as ISO-8601, intervals as lists)."""
        out = asdict(self)
        out["watermark"] = self.watermark.isoformat() if self.watermark else None
        for key in ("play_through_ci", "mean_ci", "diff_ci"):
            out[key] = list(out[key]) if out[key] is not None else None
        return out


#: Experiments whose variant order is known (the first variant is the control).
KNOWN_EXPERIMENTS: dict[str, Experiment] = {MADE_FOR_YOU.experiment_id: MADE_FOR_YOU}


def control_of(experiment_id: str, variants: Sequence[str]) -> str:
    """The control of ``experiment_id`` among ``variants`` (those with lists): the first declared
    variant for an experiment of :data:`KNOWN_EXPERIMENTS`, else ``control`` if present, else the
    first name in sorted order.

    Raises:
        ValueError: ``variants`` is empty.
    """
    if not variants:
        raise ValueError("no variants")
    known = KNOWN_EXPERIMENTS.get(experiment_id)
    if known is not None:
        for v in known.variants:
            if v.name in variants:
                return v.name
    return "control" if "control" in variants else sorted(variants)[0]


def difference_ci(
    treatment: Sequence[float],
    control: Sequence[float],
    samples: int = BOOTSTRAP_SAMPLES,
    seed: int = BOOTSTRAP_SEED,
    level: float = CONFIDENCE,
) -> tuple[float, float]:
    """Percentile bootstrap interval of ``mean(treatment) - mean(control)`` for two independent
    samples of per-unit values (here: users' play-throughs in two variants): each of ``samples``
    resamples draws ``len(treatment)`` and ``len(control)`` units with replacement
    (``numpy.random.default_rng(seed)``, treatment first), and the ``(1 - level) / 2`` and
    ``(1 + level) / 2`` quantiles of the differences are returned.

    Raises:
        ValueError: either sample is empty.
    """
    t = np.asarray(treatment, dtype=np.float64)
    c = np.asarray(control, dtype=np.float64)
    if t.size == 0 or c.size == 0:
        raise ValueError("both samples need at least one unit")
    rng = np.random.default_rng(seed)
    t_means = t[rng.integers(0, t.size, size=(samples, t.size))].mean(axis=1)
    c_means = c[rng.integers(0, c.size, size=(samples, c.size))].mean(axis=1)
    lo, hi = np.quantile(t_means - c_means, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def readout(
    settings: Settings,
    experiment_id: str = MADE_FOR_YOU.experiment_id,
    days: int = WINDOW_DAYS,
    *,
    timeout_s: float = 30.0,
) -> list[VariantReadout]:
    """The readout of ``experiment_id`` with a ``days``-day window (``days`` >= 1), one
    :class:`VariantReadout` per (version, variant) in (version, control first, name) order, read
    from ``settings.duckdb_path`` read-only (``experiment_readout_of(days)`` and
    ``experiment_users_of(days)``), with the intervals of the module docstring.

    Raises:
        ValueError: ``days`` < 1.
        NoReadModelsError: there is no DuckDB file yet.
        NoReadoutError: ``listens``, ``recommendation_history`` or the readout's macros are missing
            (the message says to run ``backbeat project``).
        UnknownExperimentError: no list of ``experiment_id`` was served (the message lists the
            experiments that have lists).
        DatabaseBusyError: a runner held the file for ``timeout_s`` seconds.
    """
    if days < 1:
        raise ValueError(f"days must be >= 1, got {days}")
    with reader(settings.duckdb_path, timeout_s) as conn:
        have = _relations(conn)
        macros = {
            r[0]
            for r in conn.execute(
                "SELECT function_name FROM duckdb_functions() WHERE function_type = 'table_macro'"
            ).fetchall()
        }
        missing = [n for n in NEEDS if n not in have] + [
            m for m in (EXPOSURES_MACRO, USERS_MACRO, READOUT_MACRO) if m not in macros
        ]
        if missing:
            raise NoReadoutError(
                f"no experiment readout in {settings.duckdb_path} yet (missing: {', '.join(missing)}): "
                "import listens and run the projections ('backbeat project --until-caught-up', which "
                "runs 'listens' and 'recommendations' and creates the readout views)"
            )
        known: list[str] = []
        try:
            rows = conn.execute(
                f"SELECT * FROM {READOUT_MACRO}(?) WHERE experiment_id = ?", [days, experiment_id]
            ).fetchall()
            cols = [d[0] for d in conn.description or []]
            users = conn.execute(
                f"SELECT experiment_version, variant, user_id, recommended, played FROM {USERS_MACRO}(?) "
                "WHERE experiment_id = ? ORDER BY user_id",
                [days, experiment_id],
            ).fetchall()
            if not rows:
                sql = f"SELECT DISTINCT experiment_id FROM {HISTORY_TABLE} ORDER BY 1"
                known = [str(r[0]) for r in conn.execute(sql).fetchall()]
        except duckdb.Error as exc:
            raise NoReadoutError(
                f"the experiment readout in {settings.duckdb_path} cannot be read ({exc}); run "
                "'backbeat project --until-caught-up' to rebuild the read models and views"
            ) from exc
    if not rows:
        listed = ", ".join(known) if known else "none yet"
        raise UnknownExperimentError(
            f"no list of experiment {experiment_id!r} was served; experiments with lists: {listed}"
        )
    outcomes: dict[tuple[int, str], list[UserOutcome]] = {}
    for version, variant, user, recommended, played in users:
        outcome = UserOutcome(str(user), int(recommended), int(played))
        outcomes.setdefault((int(version), str(variant)), []).append(outcome)
    return _with_intervals([dict(zip(cols, r, strict=True)) for r in rows], outcomes)


def _with_intervals(
    rows: list[dict[str, Any]], outcomes: dict[tuple[int, str], list[UserOutcome]]
) -> list[VariantReadout]:
    out: list[VariantReadout] = []
    for version in sorted({int(r["experiment_version"]) for r in rows}):
        mine = [r for r in rows if int(r["experiment_version"]) == version]
        control = control_of(mine[0]["experiment_id"], [r["variant"] for r in mine])
        base = [u.play_through for u in outcomes.get((version, control), [])]
        mine.sort(key=lambda r: (r["variant"] != control, r["variant"]))
        for r in mine:
            users = outcomes.get((version, r["variant"]), [])
            through = [u.play_through for u in users]
            pooled_ci = mean_ci = diff = diff_ci = None
            if users:
                pooled_ci = bootstrap_ci([u.played for u in users], [u.recommended for u in users])
                mean_ci = bootstrap_ci(through, [1] * len(through))
                if r["variant"] == control:
                    diff, diff_ci = 0.0, (0.0, 0.0)
                elif base:
                    diff = float(np.mean(through) - np.mean(base))
                    diff_ci = difference_ci(through, base)
            out.append(
                VariantReadout(
                    experiment_id=r["experiment_id"],
                    experiment_version=version,
                    variant=r["variant"],
                    control=control,
                    users=int(r["users"]),
                    lists=int(r["lists"]),
                    recommended=int(r["recommended"]),
                    played=int(r["played"]),
                    play_through=_float(r["play_through"]),
                    play_through_ci=pooled_ci,
                    mean_user_play_through=_float(r["mean_user_play_through"]),
                    mean_ci=mean_ci,
                    diff_vs_control=diff,
                    diff_ci=diff_ci,
                    immature_lists=int(r["immature_lists"]),
                    immature_recommended=int(r["immature_recommended"]),
                    window_days=int(r["window_days"]),
                    watermark=r["watermark"],
                )
            )
    return out


def _float(value: object) -> float | None:
    return None if value is None else float(value)  # type: ignore[arg-type]


__all__ = [
    "EXPOSURES_MACRO",
    "EXPOSURES_VIEW",
    "KNOWN_EXPERIMENTS",
    "NEEDS",
    "READOUT_MACRO",
    "READOUT_VIEW",
    "USERS_MACRO",
    "USERS_VIEW",
    "VIEWS_DDL",
    "WINDOW_DAYS",
    "ExperimentReadoutError",
    "NoReadoutError",
    "UnknownExperimentError",
    "UserOutcome",
    "VariantReadout",
    "control_of",
    "difference_ci",
    "ensure_views",
    "readout",
]
