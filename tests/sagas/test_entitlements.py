"""The entitlement service, record by record (no broker), with a real SQLite event store."""

from __future__ import annotations

from pathlib import Path

from sagas.entitlements import GRANTED, REVOKED, EntitlementService, entitlement_uuid
from sagas.messages import stable_id
from sagas.seeded import uniform
from tests.sagas.feed import NOW_MS, Feeder, outbox, sqlite_env, types

TOPIC = "platform.entitlements.commands"


def service(tmp_path: Path, fail_rate: float = 0.0, seed: int = 3) -> tuple[EntitlementService, Feeder]:
    app = EntitlementService(env=sqlite_env(tmp_path / "ent.sqlite"), fail_rate=fail_rate, seed=seed,
                             clock=lambda: NOW_MS)  # fmt: skip
    return app, Feeder(app, TOPIC, "platform")


def grant(feed: Feeder, key: str, entitlement: str = "e1") -> str:
    return feed.send(
        "GrantEntitlement", key, entitlement_id=entitlement, user_id="u1", kind="PREMIUM", valid_until=None,
        subscription_id="sub-1", order_id=None,
    )  # fmt: skip


def revoke(feed: Feeder, key: str, entitlement: str = "e1", reason: str = "COMPENSATION") -> str:
    return feed.send("RevokeEntitlement", key, entitlement_id=entitlement, user_id="u1", reason=reason)


def test_grant_then_repeat_then_revoke(tmp_path: Path) -> None:
    app, feed = service(tmp_path)
    grant(feed, "s:grant")
    grant(feed, "s:grant")
    revoke(feed, "s:revoke")
    granted, again, revoked = outbox(app)
    assert granted == again and granted["event_type"] == "EntitlementGranted"
    assert granted["topic"] == "platform.entitlements" and granted["key"] == "u1"
    assert granted["payload"]["event_id"] == stable_id("s:grant", "EntitlementGranted")
    assert (granted["payload"]["kind"], granted["payload"]["subscription_id"]) == ("PREMIUM", "sub-1")
    assert granted["correlation_id"] == "saga-1"
    assert revoked["event_type"] == "EntitlementRevoked"
    assert (revoked["payload"]["reason"], revoked["payload"]["kind"]) == ("COMPENSATION", "PREMIUM")
    assert app.repository.get(entitlement_uuid("e1")).state == REVOKED


def test_grant_failures_are_seeded_per_key(tmp_path: Path) -> None:
    app, feed = service(tmp_path, fail_rate=0.4, seed=11)
    keys = [f"s{i}:grant" for i in range(30)]
    for i, key in enumerate(keys):
        grant(feed, key, entitlement=f"e{i}")
        grant(feed, key, entitlement=f"e{i}")  # a repeat gets the same answer
    replies = outbox(app)
    assert replies[0::2] == replies[1::2]
    expected = ["EntitlementGrantFailed" if uniform(11, k, "entitlement_fail") < 0.4 else "EntitlementGranted"
                for k in keys]  # fmt: skip
    assert types(replies[0::2]) == expected
    assert 0 < expected.count("EntitlementGrantFailed") < len(keys)
    failed = next(m for m in replies if m["event_type"] == "EntitlementGrantFailed")
    assert failed["payload"]["reason"] == "NOT_AVAILABLE_IN_REGION"


def test_revoke_of_nothing_is_answered_and_a_later_grant_fails(tmp_path: Path) -> None:
    app, feed = service(tmp_path)
    revoke(feed, "s:revoke")
    grant(feed, "s:grant")
    revoked, failed = outbox(app)
    assert revoked["event_type"] == "EntitlementRevoked"
    assert (
        failed["event_type"] == "EntitlementGrantFailed" and failed["payload"]["reason"] == "ALREADY_REVOKED"
    )
    events = list(app.events.get(entitlement_uuid("e1")))
    assert [type(e).__name__ for e in events] == ["Opened", "Revoked", "GrantFailed"]
    assert events[1].was_granted is False
    assert app.repository.get(entitlement_uuid("e1")).state == REVOKED


def test_grant_with_a_new_key_after_grant_grants_nothing_new(tmp_path: Path) -> None:
    app, feed = service(tmp_path)
    grant(feed, "s:grant")
    grant(feed, "s:grant-again")
    first, second = outbox(app)
    assert first == second  # the effect's reply again: same event_id, so consumers count it once
    assert first["payload"]["event_id"] == stable_id("s:grant", "EntitlementGranted")
    grant(feed, "s:grant-again")  # and that is now the key's record too
    assert outbox(app)[-1] == first
    assert app.repository.get(entitlement_uuid("e1")).state == GRANTED
