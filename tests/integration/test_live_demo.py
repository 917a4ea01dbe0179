"""`backbeat demo live --seconds 12` end to end, as a user types it (its own broker, registry and
data dir): every process of the live path runs as the real process, and what it leaves in DuckDB
is checked against independent SQL over other read models and the Parquet export."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import duckdb
import pytest

from infra.processes import free_port
from sagas.invariants import ENTITLEMENT_INVARIANTS, check_invariants


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, subprocess.CompletedProcess[str]]:
    data_dir = tmp_path_factory.mktemp("live-demo")
    env = dict(os.environ)
    env.update(
        BACKBEAT_BOOTSTRAP_SERVERS=f"127.0.0.1:{free_port()}",
        BACKBEAT_REGISTRY_URL=f"http://127.0.0.1:{free_port()}",
        BACKBEAT_DATA_DIR=str(data_dir),
        BACKBEAT_OPS_PORT="0",
        COLUMNS="200",
    )
    result = subprocess.run(
        [sys.executable, "-m", "infra.cli", "demo", "live", "--seconds", "12", "--rate", "600"],
        env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    (data_dir / "demo.out").write_text(result.stdout + result.stderr)
    return data_dir, result


@pytest.fixture(scope="module")
def db(demo: tuple[Path, subprocess.CompletedProcess[str]]) -> duckdb.DuckDBPyConnection:
    data_dir, result = demo
    assert result.returncode == 0, (result.stdout[-3000:], result.stderr[-3000:])
    return duckdb.connect(str(data_dir / "backbeat.duckdb"), read_only=True)


def test_the_demo_prints_the_live_path_and_stops_what_it_started(demo, db):
    data_dir, result = demo
    out = result.stdout
    for text in ("started worker", "started notification-relay", "subscriptions: 40 requested", "listens ",
                 "royalty statement", "exported to", "track availability now", "done in"):  # fmt: skip
        assert text in out, text
    run_dir = data_dir / "run"
    assert not list(run_dir.glob("*.pid")), "every process it started is stopped"


def test_listens_are_the_counted_plays(db):
    """Two paths from the same player events: the agent's listens (30-second rule) and the
    projection of the end events (plays.counted)."""
    got = db.execute(
        "SELECT playback_id, user_id, track_id, ms_played FROM listens WHERE source = 'player' ORDER BY ALL"
    ).fetchall()
    want = db.execute(
        "SELECT playback_id, user_id, track_id, ms_played FROM plays WHERE ms_played >= 30000 ORDER BY ALL"
    ).fetchall()
    assert len(got) > 1000 and got == want
    skips, short = db.execute(
        "SELECT count(*) FILTER (WHERE outcome = 'SKIPPED'), count(*) FILTER (WHERE NOT counted) FROM plays"
    ).fetchone()
    assert skips > 0 and short > 0
    assert (
        db.execute("SELECT count(DISTINCT territory) FROM listens WHERE source = 'player'").fetchone()[0] >= 5
    )


def test_the_royalty_statement_shares_the_months_pool_over_its_counted_plays(demo, db):
    data_dir, _ = demo
    period, pool, plays, amount = db.execute(
        "SELECT period, any_value(pool_minor), sum(plays), sum(amount_minor) FROM royalty_statements GROUP BY period"
    ).fetchone()
    revenue = db.execute(
        "SELECT -sum(amount_minor) FROM ledger_entries WHERE account = 'revenue' AND reference_type = 'SUBSCRIPTION' "
        "AND strftime(posted_at, '%Y-%m') = ?",
        [period],
    ).fetchone()[0]
    counted = db.execute(
        "SELECT count(*) FROM listens WHERE ms_played >= 30000 AND strftime(occurred_at, '%Y-%m') = ?",
        [period],
    ).fetchone()[0]
    assert revenue > 0 and pool == revenue * 7000 // 10_000 and amount == pool
    assert plays == counted
    export = duckdb.connect().execute(
        f"SELECT sum(amount_minor), sum(plays) FROM '{data_dir}/exports/royalty_statements_{period}.parquet'"
    ).fetchone()
    assert export == (amount, plays)


def test_entitlements_follow_paid_periods_and_notifications_end_once(db):
    names = {i.name for i in ENTITLEMENT_INVARIANTS}
    results = [r for r in check_invariants(db, entitlements=True) if r.name in names]
    checked = [r for r in results if "cannot be checked" not in r.detail]
    assert len(checked) >= 3 and all(r.ok for r in checked), [(r.name, r.detail) for r in checked]
    assert db.execute("SELECT count(*) FROM entitlements WHERE kind = 'PREMIUM'").fetchone()[0] > 0
    sent, twice = db.execute(
        "SELECT count(*) FILTER (WHERE state = 'SENT'), count(*) FILTER (WHERE final_events > 1) "
        "FROM notifications_status"
    ).fetchone()
    assert sent > 0 and twice == 0
    territories = db.execute("SELECT count(DISTINCT territory) FROM track_availability").fetchone()[0]
    assert territories == 10
