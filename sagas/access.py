"""Who may play premium content when: the ``entitlements`` read model and the questions asked of it.

Three projections (defined in :mod:`projections.readmodels`, rows mapped here) feed it, each from
the log, so ``backbeat replay`` rebuilds them like any read model:

- ``entitlement_events`` (``platform.entitlements``: ``EntitlementGranted``,
  ``EntitlementGrantFailed``, ``EntitlementRevoked``; one row per event, ``first`` by
  ``event_id``) and the view ``entitlements(entitlement_id, user_id, kind, subscription_id,
  order_id, valid_from, valid_until, state, granted_at, revoked_at, revoke_reason)``: one row per
  entitlement, ``state`` GRANTED, REVOKED or FAILED. ``valid_from``/``valid_until`` are business
  time (the paid period, :mod:`sagas.renewal`); ``granted_at``/``revoked_at`` the entitlement
  service's processing time;
- ``subscription_events`` (``billing.subscriptions``, every type; ``first`` by ``event_id``) and
  the view ``subscription_periods(subscription_id, user_id, period, period_start, period_end,
  access_from, payment_id)``: one row per paid period (``SubscriptionActivated`` is period 1,
  ``SubscriptionRenewed`` the others);
- ``business_clock`` (``platform.clock``, ``last`` per ``clock_id``): the simulated "now".

Why a projection from the log rather than a saga-side read model: access is a fact other
services need (the player, the API) without reading the orchestrator's store, and a projection
is exactly once, replayable and readable while it is written, like every other read model.

**The access rule** (:func:`access_predicate`): user ``u`` may play premium content at ``t``
when an entitlement of kind PREMIUM has ``valid_from <= t < valid_until`` (a NULL ``valid_from``
counts from ``granted_at``, a NULL ``valid_until`` as open) and is GRANTED, or was REVOKED at the
end of its term (:data:`END_OF_TERM_REASONS`: a cancellation or lapse, which this backbone sends
at or after ``valid_until``, so they cut nothing inside the window; asking about an instant
inside a past period gives the answer of that instant). Any other revocation (COMPENSATION,
REFUNDED, …) means the entitlement never gave access. Revocation times are the entitlement
service's processing time, not business time, which is why the rule does not read them.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from infra.errors import BackbeatError
from infra.settings import Settings

PLATFORM = "backbeat.platform"
BILLING = "backbeat.billing"
ENTITLEMENT_TYPES = tuple(
    f"{PLATFORM}.{n}" for n in ("EntitlementGranted", "EntitlementGrantFailed", "EntitlementRevoked")
)
SUBSCRIPTION_TYPES = tuple(
    f"{BILLING}.{n}"
    for n in (
        "SubscriptionRequested", "SubscriptionActivated", "SubscriptionRejected", "SubscriptionCancelled",
        "SubscriptionRenewed", "SubscriptionCancellationRequested",
    )
)  # fmt: skip
CLOCK_TYPE = f"{PLATFORM}.ClockTicked"


def _short(event_type: str) -> str:
    return event_type.rsplit(".", 1)[-1]


def entitlement_rows(event_type: str, event: Mapping[str, Any]) -> list[dict[str, Any]]:
    """One ``entitlement_events`` row of an entitlement reply (pure)."""
    return [
        {
            "event_id": str(event["event_id"]),
            "event_type": _short(event_type),
            "entitlement_id": str(event["entitlement_id"]),
            "user_id": str(event["user_id"]),
            "kind": event.get("kind"),
            "subscription_id": event.get("subscription_id"),
            "order_id": event.get("order_id"),
            "valid_from": event.get("valid_from"),
            "valid_until": event.get("valid_until"),
            "reason": event.get("reason"),
            "occurred_at": int(event["occurred_at"]),
            "correlation_id": event.get("correlation_id"),
        }
    ]


def subscription_rows(event_type: str, event: Mapping[str, Any]) -> list[dict[str, Any]]:
    """One ``subscription_events`` row of a ``billing.subscriptions`` event (pure)."""
    amount = event.get("amount_minor", event.get("price_minor"))
    return [
        {
            "event_id": str(event["event_id"]),
            "event_type": _short(event_type),
            "subscription_id": str(event["subscription_id"]),
            "user_id": str(event["user_id"]),
            "occurred_at": int(event["occurred_at"]),
            "plan": event.get("plan"),
            "period": event.get("period", 1 if _short(event_type) == "SubscriptionActivated" else None),
            "period_start": event.get("period_start"),
            "period_end": event.get("period_end"),
            "access_from": event.get("access_from", event.get("period_start")),
            "effective_at": event.get("effective_at"),
            "payment_id": event.get("payment_id"),
            "amount_minor": int(amount) if amount is not None else None,
            "currency": event.get("currency"),
            "reason": event.get("reason"),
            "attempt": event.get("attempt"),
            "correlation_id": event.get("correlation_id"),
        }
    ]


ENTITLEMENTS_VIEW = """CREATE OR REPLACE VIEW entitlements AS
SELECT entitlement_id,
       any_value(user_id) AS user_id,
       coalesce(any_value(kind) FILTER (WHERE event_type = 'EntitlementGranted'), any_value(kind)) AS kind,
       max(subscription_id) AS subscription_id,
       max(order_id) AS order_id,
       max(valid_from) FILTER (WHERE event_type = 'EntitlementGranted') AS valid_from,
       max(valid_until) FILTER (WHERE event_type = 'EntitlementGranted') AS valid_until,
       CASE WHEN count(*) FILTER (WHERE event_type = 'EntitlementRevoked') > 0 THEN 'REVOKED'
            WHEN count(*) FILTER (WHERE event_type = 'EntitlementGranted') > 0 THEN 'GRANTED'
            ELSE 'FAILED' END AS state,
       min(occurred_at) FILTER (WHERE event_type = 'EntitlementGranted') AS granted_at,
       min(occurred_at) FILTER (WHERE event_type = 'EntitlementRevoked') AS revoked_at,
       any_value(reason) FILTER (WHERE event_type = 'EntitlementRevoked') AS revoke_reason
FROM entitlement_events GROUP BY entitlement_id"""

PERIODS_VIEW = """CREATE OR REPLACE VIEW subscription_periods AS
SELECT subscription_id, user_id, CAST(coalesce(period, 1) AS INTEGER) AS period, period_start, period_end,
       coalesce(access_from, period_start) AS access_from, payment_id, amount_minor, currency, attempt,
       event_type
FROM subscription_events
WHERE event_type IN ('SubscriptionActivated', 'SubscriptionRenewed')"""

#: Revocations that come at or after the end of the entitlement's window (a cancellation at the
#: period end, a lapse after the last dunning retry, an expiry): they cut nothing inside it.
END_OF_TERM_REASONS = ("SUBSCRIPTION_CANCELLED", "PAYMENT_FAILED", "EXPIRED")


def access_predicate(at: str, alias: str = "e") -> str:
    """The access rule (module doc) as SQL over the ``entitlements`` row ``alias`` at the
    TIMESTAMP expression ``at``."""
    reasons = ", ".join(f"'{r}'" for r in END_OF_TERM_REASONS)
    return f"""({alias}.kind = 'PREMIUM'
  AND coalesce({alias}.valid_from, {alias}.granted_at) <= {at}
  AND ({alias}.valid_until IS NULL OR {at} < {alias}.valid_until)
  AND ({alias}.state = 'GRANTED' OR ({alias}.state = 'REVOKED' AND {alias}.valid_until IS NOT NULL
       AND {alias}.revoke_reason IN ({reasons}))))"""


#: The access rule at the query parameter ``$at``.
ACCESS_SQL = access_predicate("$at")


class NoEntitlementsReadModelError(BackbeatError):
    """The ``entitlements`` read model has not been built in the DuckDB file yet."""


def ts(ms: int) -> datetime:
    """A naive UTC ``datetime`` of ms since the epoch (how the read models store times)."""
    return datetime.fromtimestamp(ms / 1000, UTC).replace(tzinfo=None)


def _present(con: Any) -> set[str]:
    return {
        r[0]
        for r in con.execute(
            "SELECT table_name FROM duckdb_tables() UNION SELECT view_name FROM duckdb_views()"
        ).fetchall()
    }


def clock_now(con: Any) -> datetime | None:
    """The business clock's latest time (``business_clock``), or ``None`` when there is none."""
    if "business_clock" not in _present(con):
        return None
    row = con.execute("SELECT max(now) FROM business_clock").fetchone()
    return row[0] if row and row[0] is not None else None


def answer(con: Any, user_id: str, at: datetime | None = None) -> dict[str, Any]:
    """May ``user_id`` play premium content at ``at`` (naive UTC; default: the business clock's
    now if there is one, else the wall clock)? Returns ``{"user_id", "at", "clock" ("business" |
    "wall" | "given"), "premium" (bool), "until" (end of the covering entitlement or None),
    "why" (a sentence), "entitlements": [rows of the view, newest first]}``.

    Raises:
        NoEntitlementsReadModelError: there is no ``entitlements`` view in ``con``'s database.
    """
    if "entitlements" not in _present(con):
        raise NoEntitlementsReadModelError(
            "there is no entitlements read model yet: run 'backbeat project --projection entitlement_events' "
            "(or 'backbeat sagas simulate-subscriptions', which builds it)"
        )
    clock = "given"
    if at is None:
        business = clock_now(con)
        clock, at = ("business", business) if business is not None else ("wall", ts(int(time.time() * 1000)))
    cur = con.execute(
        f"""SELECT e.*, ({ACCESS_SQL}) AS covers FROM entitlements e WHERE e.user_id = $u
            ORDER BY coalesce(e.valid_until, TIMESTAMP '9999-12-31') DESC, e.entitlement_id""",
        {"u": user_id, "at": at},
    )
    names = [d[0] for d in cur.description]
    rows = [dict(zip(names, r, strict=True)) for r in cur.fetchall()]
    covering = [r for r in rows if r["covers"]]
    premium = bool(covering)
    until = max((r["valid_until"] for r in covering if r["valid_until"] is not None), default=None)
    why = _why(rows, covering, at)
    return {"user_id": user_id, "at": at, "clock": clock, "premium": premium, "until": until, "why": why,
            "entitlements": rows}  # fmt: skip


def _why(rows: list[dict[str, Any]], covering: list[dict[str, Any]], at: datetime) -> str:
    if covering:
        r = covering[0]
        sub, until = r["subscription_id"], r["valid_until"]
        return f"entitlement {r['entitlement_id']} (subscription {sub}) is paid until {until}"
    premium = [r for r in rows if r["kind"] == "PREMIUM"]
    if not premium:
        return "no premium entitlement was ever granted to this user"
    last = premium[0]
    if last["state"] == "REVOKED":
        why, until = last["revoke_reason"], last["valid_until"]
        if why in END_OF_TERM_REASONS and until is not None and until <= at:
            return f"the last paid period ended at {until}; its entitlement was revoked ({why})"
        return f"entitlement {last['entitlement_id']} was revoked ({why}) at {last['revoked_at']}"
    if last["state"] == "FAILED":
        return f"the grant of entitlement {last['entitlement_id']} failed"
    if last["valid_until"] is not None and last["valid_until"] <= at:
        return f"the last paid period ended at {last['valid_until']} (renewal pending, declined or cancelled)"
    return f"entitlement {last['entitlement_id']} starts at {last['valid_from']}"


def read_answer(
    settings: Settings, user_id: str, at: datetime | None = None, timeout_s: float = 30.0
) -> dict[str, Any]:
    """:func:`answer` on the read-model file of ``settings`` (through :func:`projections.store.reader`).

    Raises:
        NoReadModelsError: there is no DuckDB file yet.
        NoEntitlementsReadModelError: as :func:`answer`.
        DatabaseBusyError: a writer held the file for ``timeout_s`` seconds.
    """
    from projections.store import reader

    with reader(settings.duckdb_path, timeout_s) as con:
        return answer(con, user_id, at)
