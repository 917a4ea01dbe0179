"""The experiment readout (:mod:`projections.experiment_readout`) on a hand-built read-model file:
real DuckDB tables in the layouts the ``listens`` and ``recommendations`` read models create,
the readout's views and macros made by :func:`ensure_views`, and their numbers compared with an
independent Python computation; the 7-day boundary, immature lists, the intervals, and
``backbeat evaluate experiment`` as a user runs it (no broker needed)."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from collections import defaultdict
from datetime import datetime, timedelta
from pathlib import Path

import duckdb
import numpy as np
import pytest

from infra.settings import REPO_ROOT, Settings
from personalisation.evaluation import bootstrap_ci
from projections.experiment_readout import (
    EXPOSURES_SQL,
    READOUT_SQL,
    USERS_SQL,
    NoReadoutError,
    UnknownExperimentError,
    difference_ci,
    ensure_views,
    readout,
)
from projections.readmodels import LISTENS
from projections.recommendations import HISTORY_TABLE, STATE_DDL
from projections.sql import query
from projections.store import NoReadModelsError

T0 = datetime(2014, 3, 1)
WEEK = timedelta(days=7)
MS = timedelta(milliseconds=1)
EXP = "made-for-you-v1"


def settings_at(tmp_path: Path) -> Settings:
    settings = Settings.from_env({"BACKBEAT_DATA_DIR": str(tmp_path)})
    settings.duckdb_path.parent.mkdir(parents=True, exist_ok=True)
    return settings


def build(
    settings: Settings,
    history: list[tuple[str, int, str, str, int, str, datetime, str]],
    listens: list[tuple[str, str, datetime]],
) -> None:
    """Write ``history`` rows ``(user, rank, track, experiment, version, variant, generated_at,
    list_id)`` and ``listens`` rows ``(user, track, occurred_at)`` into the real tables, then
    create the readout views."""
    con = duckdb.connect(str(settings.duckdb_path))
    try:
        con.execute(LISTENS.ddl)
        con.execute(next(d for d in STATE_DDL if f"EXISTS {HISTORY_TABLE} " in d))
        assert ensure_views(con)  # both tables exist now: the views are made
        for i, (user, track, at) in enumerate(listens):
            con.execute(
                "INSERT INTO listens (event_id, user_id, track_id, artist_id, occurred_at, source, "
                "kafka_partition, kafka_offset) VALUES (?, ?, ?, 'a', ?, 'test', 0, ?)",
                [f"e{i}", user, track, at, i],
            )
        for user, rank, track, exp, version, variant, at, list_id in history:
            con.execute(
                f"INSERT INTO {HISTORY_TABLE} (user_id, rank, track_id, score, source, model, experiment_id, "
                "experiment_version, variant, generated_at, list_id, computed_at) "
                "VALUES (?, ?, ?, 1.0, 'popular', 'm', ?, ?, ?, ?, ?, ?)",
                [user, rank, track, exp, version, variant, at, list_id, at],
            )
    finally:
        con.close()


def rows(settings: Settings, sql: str) -> list[tuple]:
    return query(settings, sql, max_rows=None).rows


def test_views_need_both_tables(tmp_path: Path):
    con = duckdb.connect(str(tmp_path / "x.duckdb"))
    con.execute(LISTENS.ddl)
    assert ensure_views(con) is False
    con.execute(next(d for d in STATE_DDL if f"EXISTS {HISTORY_TABLE} " in d))
    assert ensure_views(con) is True
    views = {r[0] for r in con.execute("SELECT view_name FROM duckdb_views() WHERE NOT internal").fetchall()}
    assert {"experiment_exposures", "experiment_users", "experiment_readout"} <= views
    con.close()


def test_the_seven_day_boundary_and_immature_lists(tmp_path: Path):
    settings = settings_at(tmp_path)
    g = T0
    history = [
        ("u1", 1, "at-generated", EXP, 1, "control", g, "L1"),
        ("u1", 2, "exactly-7d", EXP, 1, "control", g, "L1"),
        ("u1", 3, "7d-plus-1ms", EXP, 1, "control", g, "L1"),
        ("u1", 4, "1ms-after", EXP, 1, "control", g, "L1"),
        ("u1", 5, "other-user", EXP, 1, "control", g, "L1"),
        # generated 7 days before the watermark: mature (window ends at the watermark)
        ("u2", 1, "t", EXP, 1, "item2item", g + timedelta(days=3), "L2"),
        # generated 7 days minus 1 ms before the watermark: immature, though already played
        ("u3", 1, "t", EXP, 1, "item2item", g + timedelta(days=3) + MS, "L3"),
        ("u3", 2, "never", EXP, 1, "item2item", g + timedelta(days=3) + MS, "L3"),
    ]
    listens = [
        ("u1", "at-generated", g),
        ("u1", "exactly-7d", g + WEEK),
        ("u1", "7d-plus-1ms", g + WEEK + MS),
        ("u1", "1ms-after", g + MS),
        ("u9", "other-user", g + timedelta(days=1)),
        ("u3", "t", g + timedelta(days=4)),
        ("u9", "x", g + timedelta(days=10)),  # the watermark
    ]
    build(settings, history, listens)
    got = {
        r[0]: r[1:]
        for r in rows(
            settings, "SELECT track_id, mature, played FROM experiment_exposures WHERE user_id = 'u1'"
        )
    }
    assert got == {
        "at-generated": (True, False),
        "exactly-7d": (True, True),
        "7d-plus-1ms": (True, False),
        "1ms-after": (True, True),
        "other-user": (True, False),
    }
    u3 = rows(
        settings,
        "SELECT mature, played, played_so_far FROM experiment_exposures WHERE user_id = 'u3' ORDER BY rank",
    )
    # not "not played": unknown until the window closes (what is known so far is kept apart)
    assert u3 == [(False, None, True), (False, None, False)]
    readout_rows = rows(
        settings,
        "SELECT variant, users, lists, recommended, played, play_through, mean_user_play_through, "
        "immature_lists, immature_recommended FROM experiment_readout ORDER BY variant",
    )
    assert readout_rows == [
        ("control", 1, 1, 5, 2, 0.4, 0.4, 0, 0),
        ("item2item", 1, 1, 1, 0, 0.0, 0.0, 1, 2),
    ]
    # a longer window makes fewer lists mature, and the 8th day's listen counts
    eight = rows(
        settings,
        "SELECT variant, recommended, played, immature_lists FROM experiment_readout_of(8) ORDER BY 1",
    )
    assert eight == [("control", 5, 3, 0), ("item2item", 0, 0, 2)]


def random_world(seed: int = 7) -> tuple[list, list]:
    rng = random.Random(seed)
    tracks = [f"t{i}" for i in range(30)]
    history, listens = [], []
    for u in range(60):
        user = f"user{u}"
        variant = "control" if u % 2 else "item2item"
        version = 1 if u < 50 else 2
        for k in range(rng.randint(1, 4)):
            at = T0 + timedelta(hours=rng.randint(0, 24 * 28), milliseconds=rng.randint(0, 999))
            picks = rng.sample(tracks, 5)
            for rank, track in enumerate(picks, 1):
                history.append((user, rank, track, EXP, version, variant, at, f"{user}-{k}"))
            if at < T0 + timedelta(days=20):  # listens right at the boundaries of this list's window
                listens.append((user, picks[0], at + WEEK))
                listens.append((user, picks[1], at + WEEK + MS))
                listens.append((user, picks[2], at))
        for _ in range(rng.randint(0, 25)):
            at = T0 + timedelta(hours=rng.randint(0, 24 * 30), milliseconds=rng.randint(0, 999))
            listens.append((user, rng.choice(tracks), at))
    history.append(("other", 1, "t1", "another-exp", 1, "a", T0, "other-list"))
    return history, listens


def expected(history: list, listens: list, days: int = 7) -> dict:
    """The readout computed in Python from the rows (the definition in the module docstring)."""
    window = timedelta(days=days)
    watermark = max(at for _, _, at in listens)
    heard: dict[tuple[str, str], list[datetime]] = defaultdict(list)
    for user, track, at in listens:
        heard[(user, track)].append(at)
    out: dict = {}
    per_user: dict = defaultdict(lambda: [0, 0])
    for user, _, track, exp, version, variant, at, list_id in history:
        if exp != EXP:
            continue
        v = out.setdefault((version, variant), {"lists": set(), "immature": set(), "immature_rec": 0})
        if at + window > watermark:
            v["immature"].add(list_id)
            v["immature_rec"] += 1
            continue
        v["lists"].add(list_id)
        played = any(at < t <= at + window for t in heard[(user, track)])
        per_user[(version, variant, user)][0] += 1
        per_user[(version, variant, user)][1] += played
    for (version, variant), v in out.items():
        # in user_id order: the order the readout resamples them in
        users = {u: pr for (ver, var, u), pr in sorted(per_user.items()) if (ver, var) == (version, variant)}
        v["users"] = users
        v["recommended"] = sum(r for r, _ in users.values())
        v["played"] = sum(p for _, p in users.values())
    return out


def test_readout_equals_an_independent_computation_with_intervals(tmp_path: Path):
    settings = settings_at(tmp_path)
    history, listens = random_world()
    build(settings, history, listens)
    want = expected(history, listens)
    got = readout(settings, EXP)
    assert [(r.experiment_version, r.variant) for r in got] == [
        (1, "control"), (1, "item2item"), (2, "control"), (2, "item2item"),
    ]  # fmt: skip
    assert sum(r.immature_lists for r in got) > 0 and sum(r.played for r in got) > 0
    for r in got:
        w = want[(r.experiment_version, r.variant)]
        through = [p / n for n, p in w["users"].values()]
        assert r.users == len(w["users"]) and r.lists == len(w["lists"])
        assert (r.recommended, r.played) == (w["recommended"], w["played"])
        assert (r.immature_lists, r.immature_recommended) == (len(w["immature"]), w["immature_rec"])
        assert r.play_through == pytest.approx(w["played"] / w["recommended"])
        assert r.mean_user_play_through == pytest.approx(np.mean(through))
        assert r.mean_ci == pytest.approx(bootstrap_ci(through, [1] * len(through)))
        assert r.mean_ci[0] <= r.mean_user_play_through <= r.mean_ci[1]
        played = [p for _, p in w["users"].values()]
        assert r.play_through_ci == pytest.approx(bootstrap_ci(played, [n for n, _ in w["users"].values()]))
        assert r.control == "control" and r.window_days == 7
        if r.variant == "control":
            assert (r.diff_vs_control, r.diff_ci) == (0.0, (0.0, 0.0))
        else:
            c = want[(r.experiment_version, "control")]["users"]
            base = [p / n for n, p in c.values()]
            assert r.diff_vs_control == pytest.approx(np.mean(through) - np.mean(base))
            assert r.diff_ci == pytest.approx(difference_ci(through, base))
            assert r.diff_ci[0] <= r.diff_vs_control <= r.diff_ci[1]
    # the same per-user rows are in the view backbeat sql shows
    n = rows(settings, f"SELECT count(*) FROM experiment_users WHERE experiment_id = '{EXP}'")[0][0]
    assert n == sum(r.users for r in got)
    # another window
    three = readout(settings, EXP, days=3)
    want3 = expected(history, listens, days=3)
    for r in three:
        w = want3[(r.experiment_version, r.variant)]
        assert (r.recommended, r.played, r.immature_lists) == (
            w["recommended"],
            w["played"],
            len(w["immature"]),
        )


def test_difference_interval_is_seeded_and_covers_a_known_shift():
    rng = np.random.default_rng(1)
    control = rng.binomial(20, 0.1, 400) / 20
    treatment = rng.binomial(20, 0.2, 400) / 20
    low, high = difference_ci(treatment, control)
    assert (low, high) == difference_ci(treatment, control)
    diff = treatment.mean() - control.mean()
    assert low < diff < high and low > 0  # a real shift of 0.1: the interval excludes 0
    # on 400 users a side, the bootstrap agrees with the normal (Welch) interval to within 10 %
    se = np.sqrt(treatment.var(ddof=1) / treatment.size + control.var(ddof=1) / control.size)
    assert (high - low) / 2 == pytest.approx(1.96 * se, rel=0.1)
    with pytest.raises(ValueError):
        difference_ci([], control)


def test_errors_before_the_read_models_exist(tmp_path: Path):
    settings = settings_at(tmp_path)
    with pytest.raises(NoReadModelsError, match="backbeat project"):
        readout(settings)
    duckdb.connect(str(settings.duckdb_path)).close()
    with pytest.raises(NoReadoutError, match="backbeat project") as err:
        readout(settings)
    assert "listens" in str(err.value) and "recommendation_history" in str(err.value)
    build(settings, [("u", 1, "t", EXP, 1, "control", T0, "L")], [("u", "t", T0 + WEEK)])
    with pytest.raises(UnknownExperimentError, match="experiments with lists: made-for-you-v1"):
        readout(settings, "nope")
    with pytest.raises(ValueError):
        readout(settings, days=0)


def backbeat(settings: Settings, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, **settings.to_env(), "COLUMNS": "200"}
    return subprocess.run(
        [sys.executable, "-m", "infra.cli", *args], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
        timeout=120,
    )  # fmt: skip


def test_cli_json_table_and_errors(tmp_path: Path):
    settings = settings_at(tmp_path / "data")
    history, listens = random_world()
    build(settings, history, listens)
    result = backbeat(settings, "evaluate", "experiment", "--json")
    assert result.returncode == 0, result.stderr
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    direct = [r.as_json() for r in readout(settings, EXP)]
    assert lines == direct and len(lines) == 4
    assert {"variant", "users", "mean_user_play_through", "mean_ci", "diff_ci", "immature_lists"} <= set(
        lines[0]
    )

    table = backbeat(settings, "evaluate", "experiment", "--days", "3")
    assert table.returncode == 0, table.stderr
    assert "play-through within 3 days" in table.stdout and "control (control)" not in table.stdout
    assert "item2item" in table.stdout and "still open are left out" in table.stdout

    missing = backbeat(settings_at(tmp_path / "empty"), "evaluate", "experiment")
    assert missing.returncode == 1 and "Traceback" not in missing.stderr
    assert "backbeat project" in missing.stderr

    unknown = backbeat(settings, "evaluate", "experiment", "--experiment", "nope", "--json")
    assert unknown.returncode == 1 and "Traceback" not in unknown.stderr and unknown.stdout == ""
    assert "no list of experiment 'nope'" in unknown.stderr


def test_docs_page_shows_the_readout_sql_verbatim():
    doc = (REPO_ROOT / "docs" / "experiments.md").read_text(encoding="utf-8")
    for sql in (EXPOSURES_SQL, USERS_SQL, READOUT_SQL):
        assert f"```sql\n{sql}\n```" in doc
