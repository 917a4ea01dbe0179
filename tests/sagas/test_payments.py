"""The payment service against the gateway simulator, record by record (no broker), with a real
SQLite event store: what it answers, what the gateway did, and that nothing is charged twice."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from sagas.gateway import GatewaySimulator, SimulatorConfig
from sagas.messages import stable_id
from sagas.payments import AUTHORIZED, VOIDED, Payment, PaymentService, payment_uuid
from sagas.runner import RejectedRecord
from tests.sagas.feed import NOW_MS, Feeder, outbox, sqlite_env, types
from tests.sagas.test_gateway import key_where, quiet

TOPIC = "billing.payment-gateway.commands"


class Rig:
    """A payment service with its simulator, and a feeder of commands for payment ``p1``."""

    def __init__(self, tmp_path: Path, config: SimulatorConfig) -> None:
        self.gateway = GatewaySimulator(tmp_path / "gateway.sqlite", config, clock=lambda: NOW_MS)
        self.app = PaymentService(env=sqlite_env(tmp_path / "payments.sqlite"), gateway=self.gateway,
                                  clock=lambda: NOW_MS)  # fmt: skip
        self.feed = Feeder(self.app, TOPIC, "billing")

    def authorize(self, key: str, amount: int = 1299, saga: str = "saga-1") -> str:
        return self.feed.send(
            "AuthorizePayment", key, saga, payment_id="p1", user_id="u1", amount_minor=amount, currency="EUR",
            payment_method_id="pm_1", order_id=None, subscription_id="sub-1", description=None,
        )  # fmt: skip

    def capture(self, key: str, amount: int = 1299) -> str:
        return self.feed.send("CapturePayment", key, payment_id="p1", amount_minor=amount, currency="EUR")

    def void(self, key: str) -> str:
        return self.feed.send("VoidPayment", key, payment_id="p1", reason="saga compensation")

    def payment(self) -> Payment:
        return self.app.repository.get(payment_uuid("p1"))

    def ops(self) -> list[tuple[str, str]]:
        table = self.gateway.operations()
        return list(zip(table["kind"].to_pylist(), table["status"].to_pylist(), strict=True))


def payload(message: dict[str, Any]) -> dict[str, Any]:
    return message["payload"]


def test_authorize_replies_with_saga_ids_and_a_repeat_never_calls_the_gateway(tmp_path: Path) -> None:
    rig = Rig(tmp_path, quiet())
    assert rig.authorize("saga-1:authorize:forward") == "applied"
    [reply] = outbox(rig.app)
    command = rig.feed.record("AuthorizePayment", "saga-1:authorize:forward")
    assert reply["event_type"] == "PaymentAuthorized" and reply["topic"] == "billing.payments"
    assert reply["key"] == "p1" and reply["time_ms"] == NOW_MS
    assert (reply["correlation_id"], reply["causation_id"]) == ("saga-1", command.event_id)
    p = payload(reply)
    assert p["event_id"] == stable_id("saga-1:authorize:forward", "PaymentAuthorized")
    assert (p["correlation_id"], p["amount_minor"], p["currency"], p["subscription_id"]) == ("saga-1", 1299, "EUR",
                                                                                             "sub-1")  # fmt: skip
    assert p["provider"] == "simulator" and p["provider_reference"].startswith("auth_")
    calls = rig.app.gateway_calls

    assert rig.authorize("saga-1:authorize:forward") == "applied"  # the saga's retry, same key
    assert rig.app.gateway_calls == calls and rig.gateway.calls("saga-1:authorize:forward") == 1
    assert outbox(rig.app) == [reply, reply]
    assert rig.ops() == [("authorize", "approved")]


def test_redelivered_record_is_skipped(tmp_path: Path) -> None:
    rig = Rig(tmp_path, quiet())
    record = rig.feed.record("AuthorizePayment", "k1", payment_id="p1", user_id="u1", amount_minor=5,
                             currency="EUR", payment_method_id="pm", order_id="o1", subscription_id=None,
                             description=None)  # fmt: skip
    assert rig.app.process_record(record) == "applied"
    assert rig.app.process_record(record) == "redelivered"
    assert len(outbox(rig.app)) == 1 and rig.app.gateway_calls == 1


def test_decline_is_replied_and_repeated_identically(tmp_path: Path) -> None:
    rig = Rig(tmp_path, quiet(decline=1.0))
    rig.authorize("k1")
    rig.authorize("k1")
    first, second = outbox(rig.app)
    assert first == second and first["event_type"] == "PaymentDeclined"
    assert (
        payload(first)["retryable"] is False and payload(first)["reason"] == payload(first)["provider_code"]
    )
    assert rig.ops() == [("authorize", "declined")] and rig.app.gateway_calls == 1


def test_timeout_sends_nothing_then_the_retry_succeeds(tmp_path: Path) -> None:
    cfg = quiet(timeout=0.5)
    key = key_where(lambda k: cfg.per_call("timeout", k, 1) and not cfg.per_call("timeout", k, 2))
    rig = Rig(tmp_path, cfg)
    assert rig.authorize(key) == "applied"  # the attempt is recorded
    assert outbox(rig.app) == [] and rig.ops() == []
    assert rig.payment().attempts == {key: 1} and rig.payment().unresolved == {}
    rig.authorize(key)
    assert types(outbox(rig.app)) == ["PaymentAuthorized"]
    assert rig.ops() == [("authorize", "approved")] and rig.payment().state == AUTHORIZED


def test_fail_after_effect_gives_one_operation_and_one_reply(tmp_path: Path) -> None:
    cfg = quiet(fail_after_effect=0.5)
    key = key_where(
        lambda k: cfg.per_call("fail_after_effect", k, 1) and not cfg.per_call("fail_after_effect", k, 2)
    )
    rig = Rig(tmp_path, cfg)
    rig.authorize(key)
    assert types(outbox(rig.app)) == ["PaymentAuthorized"]
    assert rig.ops() == [("authorize", "approved")]
    assert rig.app.gateway_calls == 2 and rig.payment().unresolved == {}


def test_answer_delivered_twice_is_published_twice(tmp_path: Path) -> None:
    rig = Rig(tmp_path, quiet(duplicate=1.0))
    rig.authorize("k1")
    first, second = outbox(rig.app)
    assert first == second and first["event_type"] == "PaymentAuthorized"
    assert rig.ops() == [("authorize", "approved")]


def test_void_after_capture_refunds(tmp_path: Path) -> None:
    rig = Rig(tmp_path, quiet())
    rig.authorize("s:authorize")
    rig.capture("s:capture")
    rig.void("s:void")
    authorized, captured, refunded = outbox(rig.app)
    assert (captured["event_type"], payload(captured)["amount_minor"]) == ("PaymentCaptured", 1299)
    assert refunded["event_type"] == "PaymentRefunded"
    assert payload(refunded)["refund_id"] == stable_id("s:void", "refund")
    assert payload(refunded)["amount_minor"] == 1299 and payload(refunded)["provider_reference"].startswith(
        "ref_"
    )
    assert payload(refunded)["event_id"] == stable_id("s:void", "PaymentRefunded")
    assert rig.ops() == [("authorize", "approved"), ("capture", "approved"), ("refund", "approved")]
    rig.void("s:void")  # the compensation retried: same reply, no second refund
    assert outbox(rig.app)[-1] == refunded and len(rig.ops()) == 3


def test_void_of_an_authorisation_releases_it(tmp_path: Path) -> None:
    rig = Rig(tmp_path, quiet())
    rig.authorize("s:authorize")
    rig.void("s:void")
    voided = outbox(rig.app)[-1]
    assert voided["event_type"] == "PaymentVoided" and payload(voided)["amount_minor"] == 1299
    assert payload(voided)["reason"] == "saga compensation"
    assert rig.ops() == [("authorize", "approved"), ("void", "approved")]
    rig.capture("s:capture")  # a late capture never moves money after the void
    failed = outbox(rig.app)[-1]
    assert (failed["event_type"], payload(failed)["reason"]) == (
        "PaymentCaptureFailed",
        "AUTHORIZATION_VOIDED",
    )
    assert len(rig.ops()) == 2


def test_authorize_after_void_is_declined_without_the_gateway(tmp_path: Path) -> None:
    rig = Rig(tmp_path, quiet())
    rig.void("s:void")  # the saga compensated before the authorisation arrived
    rig.authorize("s:authorize")
    voided, declined = outbox(rig.app)
    assert voided["event_type"] == "PaymentVoided"
    assert (payload(voided)["amount_minor"], payload(voided)["currency"]) == (0, "XXX")
    assert declined["event_type"] == "PaymentDeclined"
    assert (payload(declined)["reason"], payload(declined)["retryable"]) == ("OTHER", False)
    assert rig.ops() == [] and rig.app.gateway_calls == 0
    assert rig.payment().state == VOIDED


def test_a_second_capture_with_another_key_gets_the_first_capture_reply(tmp_path: Path) -> None:
    rig = Rig(tmp_path, quiet())
    rig.authorize("s:authorize")
    rig.capture("s:capture")
    rig.capture("other:capture")
    _authorized, captured, again = outbox(rig.app)
    assert captured == again and captured["event_type"] == "PaymentCaptured"
    assert payload(captured)["event_id"] == stable_id("s:capture", "PaymentCaptured")
    assert rig.ops() == [("authorize", "approved"), ("capture", "approved")]


def test_capture_failures(tmp_path: Path) -> None:
    rig = Rig(tmp_path, quiet(capture_fail=1.0))
    rig.capture("s:capture-early")
    rig.authorize("s:authorize")
    rig.capture("s:capture")
    early, _authorized, refused = outbox(rig.app)
    assert (early["event_type"], payload(early)["reason"]) == ("PaymentCaptureFailed", "NOT_AUTHORIZED")
    assert (refused["event_type"], payload(refused)["reason"]) == ("PaymentCaptureFailed", "DO_NOT_HONOUR")
    assert rig.ops() == [("authorize", "approved"), ("capture", "declined")]


def test_void_finds_an_authorisation_whose_answer_was_lost(tmp_path: Path) -> None:
    """Four calls of the authorisation fail after the gateway authorised: the service sends no
    reply but remembers the key; the void first replays it (learning the authorisation), then
    voids it — the authorisation is never left open."""
    cfg = quiet(fail_after_effect=0.5)
    auth_key = key_where(
        lambda k: (
            all(cfg.per_call("fail_after_effect", k, n) for n in (1, 2, 3, 4))
            and not cfg.per_call("fail_after_effect", k, 5)
        ),
        "auth",
    )
    void_key = key_where(lambda k: not cfg.per_call("fail_after_effect", k, 1), "void")
    rig = Rig(tmp_path, cfg)
    rig.authorize(auth_key)
    assert outbox(rig.app) == [] and rig.ops() == [("authorize", "approved")]
    assert set(rig.payment().unresolved) == {auth_key}
    rig.void(void_key)
    authorized, voided = outbox(rig.app)
    assert authorized["event_type"] == "PaymentAuthorized"
    assert payload(authorized)["event_id"] == stable_id(auth_key, "PaymentAuthorized")
    assert (voided["event_type"], payload(voided)["amount_minor"]) == ("PaymentVoided", 1299)
    assert rig.ops() == [("authorize", "approved"), ("void", "approved")]
    assert rig.payment().unresolved == {}


def test_invalid_commands_are_rejected(tmp_path: Path) -> None:
    rig = Rig(tmp_path, quiet())
    with pytest.raises(RejectedRecord) as caught:
        rig.feed.send("CapturePayment", "", payment_id="p1", amount_minor=1, currency="EUR")
    assert caught.value.reason == "invalid_command"
    with pytest.raises(RejectedRecord) as caught:
        rig.feed.send("PaymentAuthorized", "k", payment_id="p1")
    assert caught.value.reason == "unexpected_type"
