"""Subscriptions over time (issue 17), end to end on a real broker: a seeded four-month simulation
with renewals, dunning, cancellations and lapses, the orchestrator SIGKILLed and restarted twice
mid-run, once on the SQLite event store and once on PostgreSQL; the read models checked against an
independent model of the schedule (computed here from the workload and the gateway's seeded
decisions alone), against SQL over the other read models, and by the invariants.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import duckdb
import pytest
from typer.testing import CliRunner

from infra import services
from infra.processes import free_port
from infra.provision import apply_topics
from projections.store import reader
from sagas.access import answer, ts
from sagas.gateway import SimulatorConfig
from sagas.invariants import ENTITLEMENT_INVARIANTS, assert_invariants, check_invariants
from sagas.renewal import DAY_MS, DUNNING_DAYS, KIND
from sagas.saga import saga_id_for
from sagas.subscription import KIND as FIRST_KIND
from sagas.subscription import PERIOD_MS
from sagas.subscription_sim import (
    SubscriptionSimConfig,
    build_subscription_read_models,
    run_subscriptions,
    subscription_workload,
)
from tests.conftest import settings_for
from tests.sagas.pg import create_database

CONFIG = SubscriptionSimConfig(
    users=36, days=110, request_days=8, seed=23, decline=0.35, duplicate=0.1, cancel_share=0.3,
    kill_orchestrator=2, step_timeout_ms=3_000, run_id="t17", deadline_s=240,
)  # fmt: skip


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def simulated(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """The run, once on the SQLite event store, once on PostgreSQL (each on its own broker)."""
    settings = settings_for(tmp_path_factory.mktemp("subs") / "data", free_port(), free_port())
    drop = None
    if request.param == "postgres":
        url, drop = create_database(request.getfixturevalue("postgres_url"))
        settings = dataclasses.replace(settings, eventstore_url=url)
    services.up(settings)
    try:
        apply_topics(settings)
        run = run_subscriptions(settings, CONFIG)
        build_subscription_read_models(settings)
        yield settings, run
    finally:
        services.down(settings)
        if drop is not None:
            drop()


def _declined(kind: str, business_id: str) -> bool:
    """The gateway simulator's own seeded decision for the authorisation of that saga."""
    gateway = SimulatorConfig(seed=CONFIG.seed, decline=CONFIG.decline, timeout=0.0, duplicate=0.0)
    return gateway.per_key("decline", f"{saga_id_for(kind, business_id)}:authorize:forward")


def expected_schedule() -> tuple[set[tuple[str, int, int, int]], dict[str, str]]:
    """The paid periods ``(subscription, period, access_from ms, period_end ms)`` and the ended
    subscriptions ``{subscription: LAPSED | CANCELLED}`` the rules of docs/live-subscriptions.md
    give, from the workload and the gateway's decisions only (no read of what the run did)."""
    end = CONFIG.start_ms + CONFIG.days * DAY_MS
    requests: dict[str, int] = {}
    cancels: dict[str, int] = {}
    for a in subscription_workload(CONFIG, CONFIG.run_id):
        sub = a.payload["subscription_id"]
        (requests if a.event_type == "SubscriptionRequested" else cancels)[sub] = a.at_ms
    periods: set[tuple[str, int, int, int]] = set()
    ended: dict[str, str] = {}
    for sub, at in requests.items():
        if _declined(FIRST_KIND, sub):
            continue
        n, start, stop = 1, at, at + PERIOD_MS["MONTHLY"]
        periods.add((sub, 1, start, stop))
        cancel = cancels.get(sub)
        while True:
            if cancel is not None and cancel < stop:
                if stop <= end:
                    ended[sub] = "CANCELLED"
                break
            times = [stop] + [stop + d * DAY_MS for d in DUNNING_DAYS]
            paid = False
            for k, t in enumerate(times, start=1):
                if t > end:
                    break
                if cancel is not None and cancel < t:
                    ended[sub] = "CANCELLED"  # during dunning: ends at once
                    break
                if not _declined(KIND, f"{sub}/p{n + 1}/a{k}"):
                    periods.add((sub, n + 1, t, stop + PERIOD_MS["MONTHLY"]))
                    paid = True
                    break
            else:
                ended[sub] = "LAPSED"
            if not paid:
                break
            n, stop = n + 1, stop + PERIOD_MS["MONTHLY"]
    return periods, ended


def _ms(value: datetime) -> int:
    return int(value.replace(tzinfo=UTC).timestamp() * 1000)


def test_run_was_killed_and_every_invariant_holds(simulated: Any) -> None:
    settings, run = simulated
    assert len(run.kills) == CONFIG.kill_orchestrator
    with reader(settings.duckdb_path) as con:
        results = check_invariants(con, entitlements=True)
    names = {r.name for r in results}
    assert {inv.name for inv in ENTITLEMENT_INVARIANTS} <= names
    assert_invariants(results)


def test_periods_and_endings_exactly_as_the_rules_say(simulated: Any) -> None:
    settings, _run = simulated
    periods, ended = expected_schedule()
    with reader(settings.duckdb_path) as con:
        got = {
            (s, int(p), _ms(a), _ms(e))
            for s, p, a, e in con.execute(
                "SELECT subscription_id, period, access_from, period_end FROM subscription_periods"
            ).fetchall()
        }
        cancelled = dict(
            con.execute(
                "SELECT subscription_id, CASE WHEN reason = 'PAYMENT_FAILED' THEN 'LAPSED' ELSE 'CANCELLED' END "
                "FROM subscription_events WHERE event_type = 'SubscriptionCancelled' AND effective_at <= "
                "(SELECT max(now) FROM business_clock)"
            ).fetchall()
        )
        retried = con.execute(
            "SELECT count(*) FROM subscription_events WHERE event_type = 'SubscriptionRenewed' AND attempt > 1"
        ).fetchone()[0]
    assert got == periods  # no renewal lost or doubled, across two SIGKILLs
    assert cancelled == ended
    # every path happened: renewals, a retry that paid, lapses after the last retry, cancellations
    assert sum(1 for p in periods if p[1] > 1) > 10
    assert retried > 0
    assert "LAPSED" in ended.values() and "CANCELLED" in ended.values()


def test_entitlements_equal_the_paid_periods_in_sql(simulated: Any) -> None:
    # the read model from platform.entitlements against the periods from billing.subscriptions
    # whose payment the ledger (billing.payments) shows captured: the same windows, both ways
    settings, _run = simulated
    with reader(settings.duckdb_path) as con:
        diff = con.execute(
            """WITH paid AS (
                   SELECT payment_id FROM ledger_entries GROUP BY payment_id
                   HAVING -sum(amount_minor) FILTER (WHERE account = 'revenue') > 0
               ), periods AS (
                   SELECT subscription_id, access_from, period_end
                   FROM subscription_events JOIN paid USING (payment_id)
                   WHERE event_type IN ('SubscriptionActivated', 'SubscriptionRenewed')
               ), ents AS (
                   SELECT subscription_id, valid_from, valid_until FROM entitlements
                   WHERE kind = 'PREMIUM' AND state <> 'FAILED' AND revoke_reason IS DISTINCT FROM 'COMPENSATION'
               )
               SELECT 'missing entitlement', * FROM (SELECT * FROM periods EXCEPT ALL SELECT * FROM ents)
               UNION ALL
               SELECT 'unpaid entitlement', * FROM (SELECT * FROM ents EXCEPT ALL SELECT * FROM periods)"""
        ).fetchall()
        revenue = con.execute(
            "SELECT -sum(amount_minor) FROM ledger_entries WHERE account = 'revenue'"
        ).fetchone()[0]
        billed = con.execute(
            """SELECT sum(amount_minor) FROM (
                   SELECT r.amount_minor FROM subscription_events a
                   JOIN subscription_events r ON r.subscription_id = a.subscription_id
                        AND r.event_type = 'SubscriptionRequested'
                   WHERE a.event_type = 'SubscriptionActivated'
                   UNION ALL
                   SELECT amount_minor FROM subscription_events WHERE event_type = 'SubscriptionRenewed')"""
        ).fetchone()[0]
    assert diff == []
    assert revenue == billed  # every paid period is revenue in the ledger, once


def test_access_answers_follow_the_periods(simulated: Any) -> None:
    settings, _run = simulated
    periods, ended = expected_schedule()
    lapsed = next(s for s, why in sorted(ended.items()) if why == "LAPSED")
    with reader(settings.duckdb_path) as con:
        now = con.execute("SELECT max(now) FROM business_clock").fetchone()[0]
        users = dict(
            con.execute("SELECT DISTINCT subscription_id, user_id FROM subscription_events").fetchall()
        )
        # at noon of every 5th day, each user's answer = a paid period covers that instant
        for day in range(0, CONFIG.days, 5):
            at_ms = CONFIG.start_ms + day * DAY_MS + DAY_MS // 2
            covered = {s for s, _p, a, e in periods if a <= at_ms < e}
            for sub, user in sorted(users.items())[:12]:
                assert answer(con, user, ts(at_ms))["premium"] == (sub in covered), (sub, day)
        got = answer(con, users[lapsed])
    assert got["clock"] == "business" and got["at"] == now
    assert got["premium"] is False and "revoked" in got["why"]


def test_cli_answers_with_exit_codes(simulated: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    from infra.cli import app

    settings, _run = simulated
    periods, ended = expected_schedule()
    end = CONFIG.start_ms + CONFIG.days * DAY_MS
    active = sorted(s for s, _p, a, e in periods if a <= end < e)
    lapsed = sorted(s for s, why in ended.items() if why == "LAPSED")
    assert active and lapsed
    for key, value in settings.to_env().items():
        monkeypatch.setenv(key, value)
    runner = CliRunner()
    user_of = lambda sub: sub.replace("-sub-", "-user-")  # noqa: E731
    yes = runner.invoke(app, ["entitlements", user_of(active[0]), "--json"])
    assert yes.exit_code == 0, yes.output
    body = json.loads(yes.output)
    assert body["premium"] is True and body["clock"] == "business"
    no = runner.invoke(app, ["entitlements", user_of(lapsed[0])])
    assert no.exit_code == 1, no.output
    assert "no" in no.output.lower()


def test_a_lapse_that_did_not_revoke_is_caught(simulated: Any, tmp_path: Path) -> None:
    # the invariants are not vacuous: drop the revocations of the lapsed subscriptions from a copy
    settings, _run = simulated
    copy = tmp_path / "copy.duckdb"
    shutil.copy(settings.duckdb_path, copy)
    con = duckdb.connect(str(copy))
    try:
        lapsed = con.execute(
            "SELECT count(*) FROM subscription_events WHERE event_type = 'SubscriptionCancelled' "
            "AND reason = 'PAYMENT_FAILED'"
        ).fetchone()[0]
        assert lapsed > 0
        con.execute(
            """DELETE FROM entitlement_events WHERE event_type = 'EntitlementRevoked' AND reason = 'PAYMENT_FAILED'"""
        )
        results = {r.name: r for r in check_invariants(con, entitlements=True)}
    finally:
        con.close()
    assert not results["ended subscriptions revoked"].ok
    assert results["ended subscriptions revoked"].violations == lapsed


def test_dunning_and_expiring_notifications_requested(simulated: Any) -> None:
    from events.log import read_to_end
    from events.offsets import high_watermarks
    from events.registry_client import registry_for

    settings, _run = simulated
    topic = "platform.notifications"
    decoder = registry_for(settings.registry_url).decoder()
    notes = [
        decoder.decode(m.value())
        for batch in read_to_end(settings, {(topic, p): 0 for p in high_watermarks(settings, topic)})
        for m in batch
    ]
    by_id = {n["notification_id"]: n for n in notes}  # a relay may publish one twice: same id
    declined = [n for n in by_id.values() if n["template"] == "payment-declined@1"]
    expiring = [n for n in by_id.values() if n["template"] == "subscription-expiring@1"]
    with reader(settings.duckdb_path) as con:
        failed_attempts = con.execute(
            "SELECT count(*) FROM sagas WHERE kind = 'subscription-renewal' AND state <> 'COMPLETED'"
        ).fetchone()[0]
        lapsed = {
            s for (s,) in con.execute(
                "SELECT subscription_id FROM subscription_events WHERE event_type = 'SubscriptionCancelled' "
                "AND reason = 'PAYMENT_FAILED'"
            ).fetchall()
        }  # fmt: skip
        cancelled = {
            s for (s,) in con.execute(
                "SELECT subscription_id FROM subscription_events WHERE event_type = 'SubscriptionCancelled' "
                "AND reason = 'USER_REQUEST'"
            ).fetchall()
        }  # fmt: skip
    assert failed_attempts > 0 and len(declined) == failed_attempts  # one notice per declined attempt
    finals = {n["params"]["subscription_id"] for n in declined if n["params"]["retries_left"] == "0"}
    assert lapsed and lapsed <= finals
    assert expiring and {n["params"]["subscription_id"] for n in expiring} <= cancelled
    assert all(n["channel"] == "EMAIL" and n["params"]["ends_at"].endswith("Z") for n in expiring)


def test_api_entitlements_endpoint(simulated: Any) -> None:
    from fastapi.testclient import TestClient

    from infra.api import create_app

    settings, _run = simulated
    periods, ended = expected_schedule()
    end = CONFIG.start_ms + CONFIG.days * DAY_MS
    active = sorted(s for s, _p, a, e in periods if a <= end < e)[0].replace("-sub-", "-user-")
    client = TestClient(create_app(settings))
    now = client.get(f"/users/{active}/entitlements")
    assert now.status_code == 200, now.text
    body = now.json()
    assert body["premium"] is True and body["clock"] == "business" and body["until"].endswith("Z")
    before = client.get(f"/users/{active}/entitlements", params={"at": "2025-12-01T00:00:00Z"})
    assert before.status_code == 200 and before.json()["premium"] is False
    assert client.get(f"/users/{active}/entitlements", params={"at": "yesterday"}).status_code == 400
