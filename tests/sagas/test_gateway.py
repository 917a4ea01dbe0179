"""The payment-gateway simulator: seeded faults, Stripe-style idempotency, its own record."""

from __future__ import annotations

from collections.abc import Callable
from itertools import count
from pathlib import Path

import pytest

from sagas.gateway import (
    DECLINE_REASONS,
    OPERATION_SCHEMA,
    GatewayFailedAfterEffect,
    GatewayKeyReused,
    GatewayResult,
    GatewaySimulator,
    GatewayTimeout,
    SimulatorConfig,
)
from tests.sagas.feed import NOW_MS


def quiet(seed: int = 1, **rates: float) -> SimulatorConfig:
    """A config with no faults but the ``rates`` given."""
    base = {"decline": 0.0, "timeout": 0.0, "duplicate": 0.0, "fail_after_effect": 0.0, "capture_fail": 0.0}
    return SimulatorConfig(seed=seed, **{**base, **rates})


def key_where(condition: Callable[[str], bool], prefix: str = "k") -> str:
    """The first key ``<prefix>-<n>`` that satisfies ``condition``."""
    for n in count():
        key = f"{prefix}-{n}"
        if condition(key):
            return key
    raise AssertionError("unreachable")


def sim(tmp_path: Path, config: SimulatorConfig, name: str = "gw.sqlite") -> GatewaySimulator:
    return GatewaySimulator(tmp_path / name, config, clock=lambda: NOW_MS)


def auth(gw: GatewaySimulator, key: str, payment: str = "p1", amount: int = 999) -> GatewayResult:
    return gw.authorize(
        idempotency_key=key, saga_id="s1", payment_id=payment, amount_minor=amount, currency="EUR"
    )


def test_repeated_key_returns_the_stored_result_without_a_new_operation(tmp_path: Path) -> None:
    gw = sim(tmp_path, quiet())
    first = auth(gw, "k1")
    again = auth(gw, "k1")
    assert first.approved and first.provider_reference and not first.replayed
    assert again.replayed and (again.provider_reference, again.amount_minor) == (
        first.provider_reference,
        999,
    )
    ops = gw.operations()
    assert ops.schema == OPERATION_SCHEMA
    assert ops.to_pylist() == [
        {
            "operation_id": ops["operation_id"][0].as_py(),
            "saga_id": "s1",
            "payment_id": "p1",
            "idempotency_key": "k1",
            "kind": "authorize",
            "status": "approved",
            "amount_minor": 999,
            "currency": "EUR",
            "provider_reference": first.provider_reference,
            "created_at_ms": NOW_MS,
        }
    ]
    assert gw.calls("k1") == 2
    with pytest.raises(GatewayKeyReused):
        gw.capture(
            idempotency_key="k1", saga_id="s1", payment_id="p1", amount_minor=1, currency="EUR",
            provider_reference=str(first.provider_reference),
        )  # fmt: skip


def test_timed_out_call_stores_nothing_and_a_retry_succeeds(tmp_path: Path) -> None:
    cfg = quiet(timeout=0.5)
    key = key_where(lambda k: cfg.per_call("timeout", k, 1) and not cfg.per_call("timeout", k, 2))
    gw = sim(tmp_path, cfg)
    with pytest.raises(GatewayTimeout):
        auth(gw, key)
    assert gw.operations().num_rows == 0
    result = auth(gw, key)
    assert result.approved and not result.replayed
    assert gw.operations().num_rows == 1 and gw.calls(key) == 2


def test_fail_after_effect_did_the_operation_and_a_retry_replays_it(tmp_path: Path) -> None:
    cfg = quiet(fail_after_effect=0.5)
    key = key_where(
        lambda k: cfg.per_call("fail_after_effect", k, 1) and not cfg.per_call("fail_after_effect", k, 2)
    )
    gw = sim(tmp_path, cfg)
    with pytest.raises(GatewayFailedAfterEffect):
        auth(gw, key)
    assert gw.operations()["status"].to_pylist() == ["approved"]
    result = auth(gw, key)
    assert result.approved and result.replayed
    assert gw.operations().num_rows == 1


def test_declines_are_decided_once_per_key(tmp_path: Path) -> None:
    cfg = quiet(decline=0.5, duplicate=0.5)
    gw = sim(tmp_path, cfg)
    keys = [f"k-{i}" for i in range(40)]
    first = {k: auth(gw, k, payment=f"p-{k}") for k in keys}
    declined = [k for k, r in first.items() if not r.approved]
    assert 5 < len(declined) < 35  # both outcomes occur at rate 0.5
    assert {first[k].reason for k in declined} <= set(DECLINE_REASONS)
    assert all(first[k].provider_reference is None for k in declined)
    for k in keys:
        again = auth(gw, k, payment=f"p-{k}")
        assert (again.approved, again.reason) == (first[k].approved, first[k].reason)
    statuses = dict(zip(gw.operations()["idempotency_key"].to_pylist(), gw.operations()["status"].to_pylist(),
                        strict=True))  # fmt: skip
    assert statuses == {k: "declined" if k in declined else "approved" for k in keys}
    # answered twice is decided per call: some calls are, some are not
    assert 0 < sum(r.answered_twice for r in first.values()) < len(keys)


def test_same_seed_same_decisions_other_seed_others(tmp_path: Path) -> None:
    def run(seed: int, name: str) -> list[tuple[str, object]]:
        cfg = SimulatorConfig(seed=seed, decline=0.3, timeout=0.3, duplicate=0.3, fail_after_effect=0.3)
        gw = sim(tmp_path, cfg, name)
        outcomes: list[tuple[str, object]] = []
        for i in range(30):
            for _attempt in range(2):
                try:
                    r = auth(gw, f"k-{i}", payment=f"p-{i}")
                    outcomes.append(
                        ("ok", (r.approved, r.reason, r.provider_reference, r.answered_twice, r.replayed))
                    )
                except (GatewayTimeout, GatewayFailedAfterEffect) as exc:
                    outcomes.append(("fault", type(exc).__name__))
        return outcomes

    a, b, c = run(7, "a.sqlite"), run(7, "b.sqlite"), run(8, "c.sqlite")
    assert a == b
    assert a != c
    kinds = {o[0] for o in a} | {o[1] for o in a if o[0] == "fault"}
    assert {"ok", "fault", "GatewayTimeout", "GatewayFailedAfterEffect"} <= kinds


def test_capture_void_refund_rules(tmp_path: Path) -> None:
    gw = sim(tmp_path, quiet())
    ref = str(auth(gw, "a1", amount=500).provider_reference)
    common = {"saga_id": "s1", "payment_id": "p1", "currency": "EUR", "provider_reference": ref}
    too_much = gw.capture(idempotency_key="c0", amount_minor=501, **common)
    assert (too_much.approved, too_much.reason) == (False, "AMOUNT_TOO_LARGE")
    captured = gw.capture(idempotency_key="c1", amount_minor=500, **common)
    assert captured.approved and captured.amount_minor == 500
    void = gw.void(idempotency_key="v1", amount_minor=500, **common)
    assert (void.approved, void.reason) == (False, "ALREADY_CAPTURED")
    refund = gw.refund(idempotency_key="r1", amount_minor=500, **common)
    assert refund.approved and refund.amount_minor == 500
    again = gw.refund(idempotency_key="r2", amount_minor=500, **common)
    assert (again.approved, again.reason) == (False, "ALREADY_REFUNDED")
    ops = gw.operations()
    assert list(zip(ops["kind"].to_pylist(), ops["status"].to_pylist(), strict=True)) == [
        ("authorize", "approved"), ("capture", "declined"), ("capture", "approved"), ("void", "declined"),
        ("refund", "approved"), ("refund", "declined"),
    ]  # fmt: skip

    ref2 = str(auth(gw, "a2", payment="p2", amount=300).provider_reference)
    common2 = {**common, "payment_id": "p2", "provider_reference": ref2}
    voided = gw.void(idempotency_key="v2", amount_minor=300, **common2)
    assert voided.approved and voided.amount_minor == 300
    late = gw.capture(idempotency_key="c2", amount_minor=300, **common2)
    assert (late.approved, late.reason) == (False, "AUTHORIZATION_VOIDED")
    nothing = gw.capture(idempotency_key="c3", amount_minor=1, **{**common, "payment_id": "p3"})
    assert (nothing.approved, nothing.reason) == (False, "NOT_AUTHORIZED")


def test_capture_fail_is_decided_per_key(tmp_path: Path) -> None:
    gw = sim(tmp_path, quiet(capture_fail=1.0))
    ref = str(auth(gw, "a1").provider_reference)
    result = gw.capture(
        idempotency_key="c1",
        saga_id="s1",
        payment_id="p1",
        amount_minor=999,
        currency="EUR",
        provider_reference=ref,
    )
    assert (result.approved, result.reason) == (False, "DO_NOT_HONOUR")


def test_record_survives_reopening(tmp_path: Path) -> None:
    gw = sim(tmp_path, quiet())
    first = auth(gw, "k1")
    gw.close()
    reopened = sim(tmp_path, quiet())
    again = auth(reopened, "k1")
    assert again.replayed and again.provider_reference == first.provider_reference
    assert reopened.operations().num_rows == 1 and reopened.calls("k1") == 2


def test_rates_must_be_probabilities() -> None:
    with pytest.raises(ValueError, match="timeout"):
        SimulatorConfig(seed=1, decline=0.0, timeout=1.5, duplicate=0.0)
