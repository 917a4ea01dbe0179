"""The ledger on the log over a seeded saga run (issue 17): the fault run of :mod:`sagas.simulate`
(orchestrator and participants as processes, declines, timeouts, duplicate answers, failed
captures, the orchestrator SIGKILLed once), then :func:`sagas.simulate.build_read_models`, which
runs the ledger agent until caught up and builds ``ledger_entries`` from ``billing.ledger``. The
read model equals the postings computed by independent DuckDB SQL over the payment events read
back from ``billing.payments`` (:data:`tests.streams.test_ledger_agent.EXPECTED_SQL`), and the
saga invariants (the ledger sums to zero and matches the gateway's own record) hold."""

from __future__ import annotations

import pytest

from events.log import read_to_end
from events.offsets import high_watermarks
from events.registry_client import registry_for
from infra.settings import Settings
from projections.store import reader
from sagas.invariants import assert_invariants, check_invariants
from sagas.simulate import SimulationConfig, build_read_models, run_simulation
from tests.streams.payments_feed import Message
from tests.streams.test_ledger_agent import COLUMNS, expected_postings

pytestmark = pytest.mark.integration


def payment_events(settings: Settings) -> list[Message]:
    """Every record of ``billing.payments``, decoded, in offset order per partition."""
    decoder = registry_for(settings.registry_url).decoder()
    starts = {("billing.payments", p): 0 for p in high_watermarks(settings, "billing.payments")}
    records = [m for batch in read_to_end(settings, starts, purpose="test") for m in batch]
    out = []
    for m in sorted(records, key=lambda m: (m.partition(), m.offset())):
        name = decoder.type_of(int.from_bytes(m.value()[1:5], "big")).rsplit(".", 1)[-1]
        out.append(Message(name, "", decoder.decode(m.value())))
    return out


def test_saga_runs_ledger_from_the_log_equals_sql_over_its_payment_events(private_stack: Settings) -> None:
    config = SimulationConfig(
        count=80, seed=11, decline=0.15, timeout=0.2, duplicate=0.2, kill_orchestrator=1, fail_after_effect=0.1,
        capture_fail=0.08, rate=150, step_timeout_ms=1_500, deadline_s=300,
    )  # fmt: skip
    run_simulation(private_stack, config)
    build_read_models(private_stack, config.seed)
    want = expected_postings(payment_events(private_stack))
    with reader(private_stack.duckdb_path) as con:
        got = con.execute(f"SELECT {COLUMNS} FROM ledger_entries ORDER BY entry_id, line").fetchall()
        kinds = dict(
            con.execute("SELECT reference_type, count(*) FROM ledger_entries GROUP BY ALL").fetchall()
        )
        assert_invariants(check_invariants(con))
    assert len(got) > 40 and got == want
    assert kinds.get("SUBSCRIPTION", 0) > 0 and kinds.get("ORDER", 0) > 0
