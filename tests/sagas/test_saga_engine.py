"""The saga state machines (subscription, order) driven record by record, no broker."""

from __future__ import annotations

from pathlib import Path

import pytest

from sagas.runner import RejectedRecord
from sagas.saga import COMPENSATED, COMPLETED, REJECTED, saga_id_for
from tests.sagas.saga_driver import Driver, order_placed, subscription_request

POPO = {"PERSISTENCE_MODULE": "eventsourcing.popo"}


def sqlite_env(path: Path) -> dict[str, str]:
    return {"PERSISTENCE_MODULE": "eventsourcing.sqlite", "SQLITE_DBNAME": str(path)}


def start_subscription(d: Driver, sub: str = "sub-1") -> str:
    assert d.send("billing.subscriptions", "SubscriptionRequested", subscription_request(sub)) == "applied"
    return str(saga_id_for("subscription", sub))


def start_order(d: Driver, order_id: str = "o-1") -> str:
    assert d.send("orders.orders", "OrderPlaced", order_placed(order_id)) == "applied"
    return str(saga_id_for("order", order_id))


def test_subscription_happy_path_sends_commands_in_order_with_correlation() -> None:
    d = Driver(POPO)
    s = start_subscription(d)
    assert d.new_messages() == ["AuthorizePayment"]
    d.reply(s, "PaymentAuthorized", provider_reference="gw-1")
    assert d.new_messages() == ["GrantEntitlement"]
    d.reply(s, "EntitlementGranted")
    assert d.new_messages() == ["CapturePayment"]
    d.reply(s, "PaymentCaptured")
    assert d.new_messages() == ["SubscriptionActivated"]
    saga = d.saga(s)
    assert (saga.state, saga.reason, saga.retries) == (COMPLETED, None, 0)
    box = d.outbox()
    assert {m["correlation_id"] for m in box} == {s}
    assert all(m["payload"]["correlation_id"] == s for m in box)
    # every command names what caused it: the request, then each reply
    assert [m["causation_id"] for m in box[:3]] == [
        "billing.subscriptions-0", "billing.payments-0", "platform.entitlements-0",
    ]  # fmt: skip
    assert box[2]["payload"]["idempotency_key"] == f"{s}:capture:forward"
    assert d.app.pending_deadlines() == {}


def test_declined_subscription_is_rejected_without_compensation() -> None:
    d = Driver(POPO)
    s = start_subscription(d)
    d.reply(s, "PaymentDeclined")
    assert d.new_messages() == ["AuthorizePayment", "SubscriptionRejected"]
    saga = d.saga(s)
    assert (saga.state, saga.reason) == (REJECTED, "PAYMENT_DECLINED")
    assert d.outbox()[-1]["payload"]["reason"] == "PAYMENT_DECLINED"


def test_entitlement_failure_voids_the_authorisation() -> None:
    d = Driver(POPO)
    s = start_subscription(d)
    d.reply(s, "PaymentAuthorized")
    d.reply(s, "EntitlementGrantFailed")
    assert d.new_messages()[-1] == "VoidPayment"
    d.reply(s, "PaymentVoided")
    assert d.new_messages() == ["SubscriptionRejected"]
    assert (d.saga(s).state, d.saga(s).reason) == (COMPENSATED, "ENTITLEMENT_FAILED")


def test_capture_failure_revokes_then_voids_in_reverse_order() -> None:
    d = Driver(POPO)
    s = start_subscription(d)
    d.reply(s, "PaymentAuthorized")
    d.reply(s, "EntitlementGranted")
    d.new_messages()
    d.reply(s, "PaymentCaptureFailed")
    assert d.new_messages() == ["RevokeEntitlement"]
    d.reply(s, "PaymentVoided")  # not what the saga waits for now: ignored
    assert d.new_messages() == []
    d.reply(s, "EntitlementRevoked")
    assert d.new_messages() == ["VoidPayment"]
    d.reply(s, "PaymentVoided")
    assert d.new_messages() == ["SubscriptionRejected"]
    assert d.saga(s).state == COMPENSATED


def test_duplicate_replies_and_redelivered_records_change_nothing() -> None:
    d = Driver(POPO)
    s = start_subscription(d)
    assert d.reply(s, "PaymentAuthorized") == "applied"
    version = d.saga(s).version
    assert d.reply(s, "PaymentAuthorized") == "ignored"  # the gateway answered twice
    assert d.saga(s).version == version
    # the same start event again (another offset): the saga exists, nothing new
    assert d.send("billing.subscriptions", "SubscriptionRequested", subscription_request()) == "ignored"
    # a record at an offset already applied
    from sagas.messages import Inbound

    again = Inbound(topic="billing.payments", partition=0, offset=0, event_type="x.PaymentAuthorized", payload={},
                    correlation_id=s)  # fmt: skip
    assert d.app.process_record(again) == "redelivered"


def test_timeouts_retry_with_the_same_key_then_compensate() -> None:
    d = Driver(POPO)
    s = start_subscription(d)
    d.reply(s, "PaymentAuthorized")
    d.new_messages()
    assert d.tick(999) == 0  # not yet due
    assert d.tick(1) == 1
    assert d.tick(1_000) == 1
    grants = [m for m in d.outbox() if m["event_type"] == "GrantEntitlement"]
    assert [m["payload"]["idempotency_key"] for m in grants] == [f"{s}:grant:forward"] * 3
    assert len({m["payload"]["event_id"] for m in grants}) == 3
    assert d.new_messages() == ["GrantEntitlement", "GrantEntitlement"]
    assert d.tick(1_000) == 1  # third attempt timed out: give up, compensate
    # the grant may have happened with its answer lost: it is revoked too, before the void
    assert d.new_messages() == ["RevokeEntitlement"]
    # compensation retries do not give up; the wait doubles
    assert d.tick(1_000) == 1
    assert d.tick(1_999) == 0
    assert d.tick(1) == 1
    assert d.new_messages() == ["RevokeEntitlement", "RevokeEntitlement"]
    d.reply(s, "EntitlementRevoked")
    assert d.new_messages() == ["VoidPayment"]
    d.reply(s, "PaymentVoided")
    saga = d.saga(s)
    assert (saga.state, saga.reason, saga.retries) == (COMPENSATED, "TIMED_OUT", 4)
    assert d.app.pending_deadlines() == {}


def test_a_first_step_that_never_answers_is_compensated_not_just_rejected() -> None:
    # the gateway may have authorised and lost every answer: the saga must void, not walk away
    d = Driver(POPO)
    s = start_subscription(d)
    for _ in range(3):
        assert d.tick(1_000) == 1
    assert d.new_messages() == ["AuthorizePayment"] * 3 + ["VoidPayment"]
    assert d.saga(s).state == "COMPENSATING"
    d.reply(s, "PaymentVoided")
    assert d.new_messages() == ["SubscriptionRejected"]
    assert (d.saga(s).state, d.saga(s).reason) == (COMPENSATED, "TIMED_OUT")
    assert d.outbox()[-1]["payload"]["reason"] == "TIMED_OUT"


def test_order_happy_path_confirms_before_capture() -> None:
    d = Driver(POPO)
    o = start_order(d)
    d.reply(o, "InventoryReserved")
    d.reply(o, "PaymentAuthorized")
    assert d.new_messages() == ["ReserveInventory", "AuthorizePayment", "OrderConfirmed", "CapturePayment"]
    d.reply(o, "PaymentCaptured")
    assert d.new_messages() == []
    assert d.saga(o).state == COMPLETED


def test_order_out_of_stock_is_rejected_and_decline_releases_stock() -> None:
    d = Driver(POPO)
    o = start_order(d, "o-1")
    d.reply(o, "InventoryReservationRejected")
    assert d.new_messages() == ["ReserveInventory", "OrderCancelled"]
    assert (d.saga(o).state, d.outbox()[-1]["payload"]["reason"]) == (REJECTED, "OUT_OF_STOCK")
    o2 = start_order(d, "o-2")
    d.reply(o2, "InventoryReserved")
    d.reply(o2, "PaymentDeclined")
    assert d.new_messages() == ["ReserveInventory", "AuthorizePayment", "ReleaseInventory"]
    d.reply(o2, "InventoryReleased")
    assert d.new_messages() == ["OrderCancelled"]
    assert (d.saga(o2).state, d.saga(o2).reason) == (COMPENSATED, "PAYMENT_DECLINED")


def test_order_capture_failure_compensates_everything_in_reverse() -> None:
    d = Driver(POPO)
    o = start_order(d)
    d.reply(o, "InventoryReserved")
    d.reply(o, "PaymentAuthorized")
    d.new_messages()
    d.reply(o, "PaymentCaptureFailed")
    assert d.new_messages() == ["VoidPayment"]  # confirm is local: undone by the final OrderCancelled
    d.reply(o, "PaymentVoided")
    assert d.new_messages() == ["ReleaseInventory"]
    d.reply(o, "InventoryReleased")
    assert d.new_messages() == ["OrderCancelled"]
    assert d.saga(o).state == COMPENSATED


def test_invalid_start_events_are_rejected_for_the_dead_letter_topic() -> None:
    d = Driver(POPO)
    with pytest.raises(RejectedRecord, match="total_minor"):
        d.send("orders.orders", "OrderPlaced", {**order_placed(), "total_minor": 1})
    with pytest.raises(RejectedRecord, match="price_minor"):
        d.send("billing.subscriptions", "SubscriptionRequested", subscription_request(price=0))


def test_deadlines_survive_a_restart(tmp_path: Path) -> None:
    env = sqlite_env(tmp_path / "orch.sqlite")
    d = Driver(env)
    s = start_subscription(d)
    o = start_order(d)
    d.reply(o, "InventoryReserved")
    expected = d.app.pending_deadlines()
    assert len(expected) == 2
    # a new process on the same store: the timers come back from the stored events
    d2 = Driver(env, now_ms=d.now)
    assert d2.app.pending_deadlines() == {}
    assert d2.app.rebuild_timers() == 2
    assert d2.app.pending_deadlines() == expected
    assert d2.tick(1_000) == 2
    assert d2.saga(s).retries == 1 and d2.saga(o).retries == 1
    # and the input positions: the next offset of each partition is where the first run stopped
    assert d2.app.next_offset("billing.subscriptions", 0) == 1
    assert d2.app.next_offset("orders.inventory", 0) == 1


def test_a_batch_gives_what_one_record_at_a_time_gives(tmp_path: Path) -> None:
    """Records of one partition applied in one transaction: same events and outbox as one by
    one, a saga touched twice in the batch sees its own first change, one tracking record."""
    from sagas.messages import Inbound

    def records(saga: str) -> list[Inbound]:
        def rec(offset: int, topic: str, name: str, payload: dict, corr: str | None = None) -> Inbound:
            return Inbound(topic=topic, partition=0, offset=offset, event_type=f"x.{name}", payload=payload,
                           event_id=f"{topic}-{offset}", correlation_id=corr)  # fmt: skip

        return [
            rec(0, "billing.payments", "PaymentAuthorized", {"provider_reference": "gw"}, saga),
            rec(1, "billing.payments", "PaymentAuthorized", {}, saga),  # answered twice
            rec(2, "billing.payments", "PaymentCaptured", {}, saga),  # not awaited yet: ignored
        ]

    outs = []
    for batched in (False, True):
        d = Driver(sqlite_env(tmp_path / f"b{batched}.sqlite"))
        s = start_subscription(d)
        recs = records(s)
        if batched:
            got = d.app.process_batch("billing.payments", 0, recs)
        else:
            got = [d.app.process_record(r) for r in recs]
        assert got == ["applied", "ignored", "ignored"]
        assert d.app.process_batch("billing.payments", 0, recs) == ["redelivered"] * 3
        assert d.app.next_offset("billing.payments", 0) == 3
        outs.append(([m["event_type"] for m in d.outbox()], d.saga(s).version, d.saga(s).done))
    assert outs[0] == outs[1]
    # a record the process rejects: nothing of the batch is recorded
    d = Driver(POPO)
    bad = Inbound(topic="orders.orders", partition=0, offset=0, event_type="x.OrderPlaced",
                  payload={**order_placed(), "total_minor": 1})  # fmt: skip
    with pytest.raises(RejectedRecord):
        d.app.process_batch("orders.orders", 0, [bad])
    assert d.app.next_offset("orders.orders", 0) == 0
