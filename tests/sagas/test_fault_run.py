"""The fault run of issue 6, end to end on a real broker: orchestrator and participants as
processes, the orchestrator SIGKILLed and restarted mid-run, every invariant checked over the
read models. Once on the default SQLite event store, once on PostgreSQL.

Each test starts its own broker and registry (the topics are fixed names, and a fresh event
store must not see another test's records).
"""

from __future__ import annotations

import dataclasses

from infra.settings import Settings
from projections.store import reader
from sagas.invariants import assert_invariants
from sagas.simulate import SimulationConfig, build_read_models, run_simulation, summarize


def _run(settings: Settings, config: SimulationConfig) -> dict[str, int]:
    run = run_simulation(settings, config)
    assert run.terminal == config.count
    assert len(run.kills) == config.kill_orchestrator
    build_read_models(settings, config.seed)
    summary = summarize(settings, run, config)
    assert_invariants(summary.invariants)
    assert sum(summary.run_states.values()) == config.count
    return summary.run_states


def test_fault_run_on_sqlite_keeps_every_invariant(private_stack: Settings) -> None:
    # high fault rates on few sagas, so every path (decline, retry after timeout, give up after
    # three timeouts, capture refused, grant failed, out of stock) happens in a short run
    config = SimulationConfig(
        count=240, seed=11, decline=0.15, timeout=0.25, duplicate=0.2, kill_orchestrator=3,
        fail_after_effect=0.1, capture_fail=0.08, entitlement_fail=0.08, rate=120, step_timeout_ms=1_500,
        stock_ratio=0.6, deadline_s=300,
    )  # fmt: skip
    states = _run(private_stack, config)
    assert states.get("COMPLETED", 0) > 0
    assert states.get("COMPENSATED", 0) > 0
    assert states.get("REJECTED", 0) > 0
    with reader(private_stack.duckdb_path) as con:
        reasons = {
            r for (r,) in con.execute("SELECT DISTINCT reason FROM sagas WHERE reason IS NOT NULL").fetchall()
        }
        kinds = dict(con.execute("SELECT kind, count(*) FROM sagas GROUP BY ALL").fetchall())
        retried = con.execute("SELECT count(*) FROM sagas WHERE retries > 0").fetchone()[0]
        ops = dict(con.execute("SELECT kind, count(*) FROM gateway_operations GROUP BY ALL").fetchall())
    assert {"PAYMENT_DECLINED", "TIMED_OUT", "OUT_OF_STOCK"} <= reasons
    assert set(kinds) == {"subscription", "order"}
    assert retried > 0  # timeouts were retried with the same idempotency key
    assert ops.get("void", 0) > 0 and ops.get("capture", 0) > 0


def test_the_issues_fault_run_2000_sagas(private_stack: Settings) -> None:
    # exactly the issue's run: 2,000 sagas, 10 % declines, 5 % timeouts, 5 % answered twice,
    # the orchestrator SIGKILLed and restarted 3 times
    config = SimulationConfig(count=2_000, seed=7, decline=0.10, timeout=0.05, duplicate=0.05, kill_orchestrator=3)
    states = _run(private_stack, config)
    assert set(states) == {"COMPLETED", "COMPENSATED", "REJECTED"}


def test_fault_run_on_postgresql(private_stack: Settings, fresh_postgres_url: str) -> None:
    settings = dataclasses.replace(private_stack, eventstore_url=fresh_postgres_url)
    config = SimulationConfig(
        count=80, seed=5, decline=0.1, timeout=0.15, duplicate=0.1, kill_orchestrator=1, rate=80,
        step_timeout_ms=1_500, deadline_s=240,
    )  # fmt: skip
    states = _run(settings, config)
    assert states.get("COMPLETED", 0) > 0
    # the sagas are in PostgreSQL, not in SQLite files
    assert not (settings.data_dir / "eventstore" / "orchestrator.sqlite").exists()
