"""The subscription lifecycle's rules (issue 17) on the orchestrator without a broker: renewal at
the period end (capture before grant), dunning retries at 1, 3 and 7 days then lapse, a retry
that pays, cancellation with the expiring notice, business timers surviving a restart, and every
message valid against its Avro schema."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from events.schemas import get_schema
from events.serde import AvroEncoder
from sagas.renewal import DAY_MS, KIND, LAPSED, Lifecycle, lifecycle_id, renewal_business_id
from sagas.saga import saga_id_for
from sagas.subscription import PERIOD_MS
from tests.sagas.saga_driver import Driver, subscription_request

START = 1_700_000_000_000  # subscription_request's occurred_at
END = START + PERIOD_MS["MONTHLY"]


def sqlite_env(path: Path) -> dict[str, str]:
    return {"PERSISTENCE_MODULE": "eventsourcing.sqlite", "SQLITE_DBNAME": str(path)}


def _active(d: Driver, sub: str = "sub-1") -> str:
    d.send("billing.subscriptions", "SubscriptionRequested", subscription_request(sub))
    s = str(saga_id_for("subscription", sub))
    d.reply(s, "PaymentAuthorized", provider_reference="gw-1")
    d.reply(s, "EntitlementGranted")
    d.reply(s, "PaymentCaptured")
    return s


def _tick(d: Driver, at_ms: int) -> str:
    payload = {"event_id": f"tick-{at_ms}", "clock_id": "sim", "tick": 1, "occurred_at": at_ms}
    return d.send("platform.clock", "ClockTicked", payload)


def _renewal(sub: str, period: int, attempt: int) -> str:
    return str(saga_id_for(KIND, renewal_business_id(sub, period, attempt)))


def _valid(messages: list[dict[str, Any]]) -> None:
    for m in messages:
        AvroEncoder(get_schema(m["event_type"]).parsed, 1).encode(m["payload"])


def _lifecycle(d: Driver, sub: str = "sub-1") -> Lifecycle:
    return d.app.repository.get(lifecycle_id(sub))


def test_first_grant_covers_the_first_period_only(tmp_path: Path) -> None:
    d = Driver(sqlite_env(tmp_path / "o.db"))
    _active(d)
    grant = next(m for m in d.outbox() if m["event_type"] == "GrantEntitlement")["payload"]
    assert (grant["valid_from"], grant["valid_until"]) == (START, END)
    lc = _lifecycle(d)
    assert (lc.state, lc.period, lc.period_end, lc.due_at_ms) == ("ACTIVE", 1, END, END)
    assert d.app.business_due == {lc.id: END}
    _valid(d.outbox())


def test_renewal_at_the_period_end_captures_before_it_grants(tmp_path: Path) -> None:
    d = Driver(sqlite_env(tmp_path / "o.db"))
    _active(d)
    d.new_messages()
    assert _tick(d, END - 1) == "ignored"  # not yet due
    assert d.new_messages() == []
    assert _tick(d, END) == "applied"
    r = _renewal("sub-1", 2, 1)
    assert d.new_messages() == ["AuthorizePayment"]
    d.reply(r, "PaymentAuthorized", provider_reference="gw-2")
    assert d.new_messages() == ["CapturePayment"]
    d.reply(r, "PaymentCaptured")
    assert d.new_messages() == ["GrantEntitlement"]
    grant = d.outbox()[-1]["payload"]
    assert (grant["valid_from"], grant["valid_until"]) == (END, END + PERIOD_MS["MONTHLY"])
    assert (
        grant["entitlement_id"]
        != next(m for m in d.outbox() if m["event_type"] == "GrantEntitlement")["payload"]["entitlement_id"]
    )  # one entitlement per paid period
    d.reply(r, "EntitlementGranted")
    assert d.new_messages() == ["SubscriptionRenewed"]
    renewed = d.outbox()[-1]["payload"]
    assert (renewed["period"], renewed["period_start"], renewed["access_from"], renewed["attempt"]) == (
        2, END, END, 1,
    )  # fmt: skip
    lc = _lifecycle(d)
    assert (lc.state, lc.period, lc.due_at_ms) == ("ACTIVE", 2, END + PERIOD_MS["MONTHLY"])
    _valid(d.outbox())


def test_declined_renewal_is_retried_after_1_3_7_days_then_lapses(tmp_path: Path) -> None:
    d = Driver(sqlite_env(tmp_path / "o.db"))
    _active(d)
    d.new_messages()
    retries = []
    for attempt, at in enumerate([END, END + DAY_MS, END + 3 * DAY_MS, END + 7 * DAY_MS], start=1):
        assert _tick(d, at) == "applied"
        assert d.new_messages() == ["AuthorizePayment"]
        d.reply(_renewal("sub-1", 2, attempt), "PaymentDeclined", reason="INSUFFICIENT_FUNDS")
        new = d.new_messages()
        notice = [m for m in d.outbox() if m["event_type"] == "NotificationRequested"][-1]["payload"]
        assert notice["template"] == "payment-declined@1" and notice["params"]["attempt"] == str(attempt)
        retries.append(notice["params"]["retries_left"])
        if attempt < 4:
            assert new == ["NotificationRequested"]
            assert _lifecycle(d).due_at_ms == END + (1, 3, 7)[attempt - 1] * DAY_MS
    assert retries == ["3", "2", "1", "0"]
    assert new == ["NotificationRequested", "RevokeEntitlement", "SubscriptionCancelled"]
    revoke, cancelled = d.outbox()[-2]["payload"], d.outbox()[-1]["payload"]
    assert revoke["reason"] == "PAYMENT_FAILED"
    assert (cancelled["reason"], cancelled["effective_at"]) == ("PAYMENT_FAILED", END)
    assert _lifecycle(d).state == LAPSED and d.app.business_due == {}
    assert _tick(d, END + 60 * DAY_MS) == "ignored"  # nothing due any more
    _valid(d.outbox())


def test_a_retry_that_pays_restores_access_from_the_retry(tmp_path: Path) -> None:
    d = Driver(sqlite_env(tmp_path / "o.db"))
    _active(d)
    _tick(d, END)
    d.reply(_renewal("sub-1", 2, 1), "PaymentDeclined", reason="INSUFFICIENT_FUNDS")
    _tick(d, END + DAY_MS)
    r = _renewal("sub-1", 2, 2)
    d.reply(r, "PaymentAuthorized", provider_reference="gw")
    d.reply(r, "PaymentCaptured")
    grant = d.outbox()[-1]["payload"]
    assert (grant["valid_from"], grant["valid_until"]) == (END + DAY_MS, END + PERIOD_MS["MONTHLY"])
    d.reply(r, "EntitlementGranted")
    renewed = d.outbox()[-1]["payload"]
    assert (renewed["period_start"], renewed["access_from"], renewed["attempt"]) == (END, END + DAY_MS, 2)
    assert _lifecycle(d).due_at_ms == END + PERIOD_MS["MONTHLY"]  # the billing anchor is kept


def test_cancellation_sends_the_notice_then_revokes_at_the_period_end(tmp_path: Path) -> None:
    d = Driver(sqlite_env(tmp_path / "o.db"))
    _active(d)
    d.new_messages()
    asked = START + 10 * DAY_MS
    req = {"event_id": "c-1", "subscription_id": "sub-1", "user_id": "u-1", "occurred_at": asked,
           "reason": "USER_REQUEST"}  # fmt: skip
    assert d.send("billing.subscriptions", "SubscriptionCancellationRequested", req) == "applied"
    assert d.new_messages() == ["SubscriptionCancelled"]
    assert d.outbox()[-1]["payload"]["effective_at"] == END
    assert _lifecycle(d).due_at_ms == END - 3 * DAY_MS
    _tick(d, END - 3 * DAY_MS)
    assert d.new_messages() == ["NotificationRequested"]
    assert d.outbox()[-1]["payload"]["template"] == "subscription-expiring@1"
    _tick(d, END)
    assert d.new_messages() == ["RevokeEntitlement"]  # and no AuthorizePayment: no renewal
    assert d.outbox()[-1]["payload"]["reason"] == "SUBSCRIPTION_CANCELLED"
    assert _lifecycle(d).state == "ENDED"
    _valid(d.outbox())


def test_business_timers_survive_a_restart_and_a_redelivered_tick_does_nothing(tmp_path: Path) -> None:
    env = sqlite_env(tmp_path / "o.db")
    d = Driver(env)
    _active(d)
    _active(d, "sub-2")
    lc = _lifecycle(d)
    d.app.close()
    again = Driver(env)
    again.app.rebuild_timers()
    assert again.app.business_due == {lc.id: END, lifecycle_id("sub-2"): END}
    assert _tick(again, END) == "applied"
    renewals = [m for m in again.outbox() if m["event_type"] == "AuthorizePayment"]
    assert len(renewals) == 2 + 2  # the two first sagas, then one renewal each
    # the same tick record again (same position, as after a crash before the position was known)
    record_offset = 0
    from sagas.messages import Inbound

    dup = Inbound(
        topic="platform.clock", partition=0, offset=record_offset, event_type="backbeat.platform.ClockTicked",
        payload={"event_id": f"tick-{END}", "clock_id": "sim", "tick": 1, "occurred_at": END},
    )  # fmt: skip
    assert again.app.process_record(dup) == "redelivered"
    assert len([m for m in again.outbox() if m["event_type"] == "AuthorizePayment"]) == 4


def test_the_live_clock_moves_business_time_on_and_resumes_after_a_restart(private_stack: Any) -> None:
    import threading
    import time

    from sagas.clock import LiveClock, last_tick

    start = 1_767_225_600_000
    first = LiveClock(private_stack, speed=86_400.0, interval_s=0.05, start_ms=start)
    thread = threading.Thread(target=first.run)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while first.ticks < 4 and time.monotonic() < deadline:
            thread.join(0.05)
    finally:
        first.stop()
        thread.join(10)
    assert first.ticks >= 4
    tick, at = last_tick(private_stack)  # type: ignore[misc]
    assert tick == first.ticks and start <= at == first.now_ms
    # a restarted clock continues: numbers go on, business time never goes back
    second = LiveClock(private_stack, speed=1.0, interval_s=0.05, start_ms=start)
    runner = threading.Thread(target=second.run)
    runner.start()
    try:
        deadline = time.monotonic() + 30
        while second.ticks < 1 and time.monotonic() < deadline:
            runner.join(0.02)
    finally:
        second.stop()
        runner.join(10)
    tick2, at2 = last_tick(private_stack)  # type: ignore[misc]
    assert second.ticks >= 1 and tick2 == tick + second.ticks and at2 >= at
