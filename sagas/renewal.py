"""Subscriptions over time: renewal at each period end, dunning, cancellation and lapse.

A :class:`Lifecycle` aggregate (one per subscription, in the orchestrator's event store) follows
a subscription after its first saga (:mod:`sagas.subscription`) completed. It acts on **business
time**: the simulated clock's ticks (``ClockTicked`` on ``platform.clock``, decision 6 of issue
17), never wall time. Each of its events carries ``due_at_ms``, the business time at which it
must act next (``None``: nothing due), so the orchestrator rebuilds its business timers from the
event store after a restart (:meth:`sagas.orchestrator.Orchestrator.rebuild_timers`).

States and what moves them (times are business time, ms since the epoch):

- ``ACTIVE`` — period ``n`` is paid until ``period_end``; due at ``period_end``: start renewal
  attempt 1 of period ``n + 1`` → ``RENEWING``;
- ``RENEWING`` — a renewal saga (:data:`PLAN`, kind ``subscription-renewal``: authorise →
  capture → grant the next period's entitlement, ``valid_from`` = when this attempt was due,
  ``valid_until`` = the new period end; publishes ``SubscriptionRenewed``) is running; nothing is
  due. Its end moves the lifecycle: COMPLETED → ``ACTIVE`` with period ``n + 1`` (the billing
  anchor is kept: the new period starts at the old ``period_end``); failed → a dunning
  notification (``NotificationRequested``, template :data:`DECLINED_TEMPLATE`) and ``PAST_DUE``,
  or, after the last retry, lapse;
- ``PAST_DUE`` — the renewal was declined; due at ``period_end + DUNNING_DAYS[k - 1]`` days:
  retry (attempt ``k + 1``) → ``RENEWING``. No access meanwhile: the entitlement of period ``n``
  ended at ``period_end`` (its ``valid_until``), and a successful retry grants access only from
  the retry's time;
- ``LAPSED`` — every retry was declined: ``RevokeEntitlement(PAYMENT_FAILED)`` of period ``n``'s
  entitlement and ``SubscriptionCancelled(PAYMENT_FAILED, effective_at=period_end)``; final;
- ``CANCELLING`` — the user asked to cancel (``SubscriptionCancellationRequested``) while
  ``ACTIVE``: ``SubscriptionCancelled(USER_REQUEST, effective_at=period_end)`` at once; no
  renewal; due at ``period_end − EXPIRING_NOTICE_DAYS`` (or at once if later): the
  ``subscription-expiring@1`` notification; then at ``period_end``: revoke the entitlement
  (``SUBSCRIPTION_CANCELLED``) → ``ENDED`` (final). A cancellation while ``PAST_DUE`` ends it at
  once (access already ended at ``period_end``); while ``RENEWING`` it is remembered and applied
  when the saga ends (a renewal paid meanwhile is honoured to its end).

Exactly once: a tick, and every renewal it starts, is recorded in one transaction with the tick's
position, so a tick is either applied with all its effects or read again after a crash. Ids are
deterministic: renewal saga ``<subscription>/p<period>/a<attempt>``, payment
``pay-<hash(subscription, period, attempt)>`` (so each attempt's idempotency keys differ, and a
period is never captured twice: an attempt starts only after the previous one failed),
entitlement ``ent-<hash(subscription, period)>``.

Why these numbers: three retries at 1, 3 and 7 days after the period end follow common practice
of subscription billing ("smart retries" spread over about a week); the expiring notice 3 days
before the end leaves a weekend to change one's mind.
"""

from __future__ import annotations

import uuid

from eventsourcing.domain import Aggregate, event

from sagas.messages import SAGA_NAMESPACE, OutboxMessage, outbox_message, stable_id
from sagas.payment_steps import CAPTURE_STEP, authorize_step
from sagas.saga import COMPLETED, CommandSpec, Data, SagaPlan, Step, register_plan
from sagas.subscription import (
    ENTITLEMENT_COMMANDS,
    ENTITLEMENT_KIND,
    SUBSCRIPTIONS,
    period_ms,
    revoke_entitlement,
)

KIND = "subscription-renewal"
NOTIFICATIONS = "platform.notifications"
CLOCK_TOPIC = "platform.clock"
DAY_MS = 86_400_000
#: Dunning: retry a declined renewal this many days after the period end (attempts 2, 3, 4).
DUNNING_DAYS: tuple[int, ...] = (1, 3, 7)
#: The "your subscription ends" notice goes out this many days before a cancelled period ends.
EXPIRING_NOTICE_DAYS = 3
DECLINED_TEMPLATE = "payment-declined@1"
EXPIRING_TEMPLATE = "subscription-expiring@1"

ACTIVE, RENEWING, PAST_DUE, CANCELLING = "ACTIVE", "RENEWING", "PAST_DUE", "CANCELLING"
ENDED, LAPSED = "ENDED", "LAPSED"
#: States a lifecycle never leaves.
FINAL = frozenset({ENDED, LAPSED})


def lifecycle_id(subscription_id: str) -> uuid.UUID:
    """The aggregate id of ``subscription_id``'s lifecycle."""
    return uuid.uuid5(SAGA_NAMESPACE, f"lifecycle\x1f{subscription_id}")


def entitlement_id_for(subscription_id: str, period: int) -> str:
    """The entitlement of paid period ``period`` (1 = the first saga's, :mod:`sagas.subscription`)."""
    if period == 1:
        return "ent-" + stable_id("entitlement", subscription_id)[:18]
    return "ent-" + stable_id("entitlement", subscription_id, period)[:18]


def payment_id_for(subscription_id: str, period: int, attempt: int) -> str:
    """The payment of renewal attempt ``attempt`` of period ``period`` (≥ 2)."""
    return "pay-" + stable_id("payment", KIND, subscription_id, period, attempt)[:18]


def renewal_business_id(subscription_id: str, period: int, attempt: int) -> str:
    """The renewal saga's business id: ``<subscription>/p<period>/a<attempt>``."""
    return f"{subscription_id}/p{period}/a{attempt}"


def _iso(ms: int) -> str:
    from datetime import UTC, datetime

    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class Lifecycle(Aggregate):
    """One subscription over time (module doc). Attributes: ``subscription_id``, ``user_id``,
    ``plan``, ``billing_period``, ``amount_minor``, ``currency``, ``payment_method_id``,
    ``period`` (number of the last paid period), ``period_start``/``period_end`` (ms, that
    period), ``state``, ``attempt`` (renewal attempts of the next period so far),
    ``cancel_requested``, ``notice_sent``, ``due_at_ms`` (business time of the next action)."""

    @staticmethod
    def create_id(subscription_id: str) -> uuid.UUID:  # type: ignore[override]
        return lifecycle_id(subscription_id)

    @event("Opened")
    def __init__(
        self, subscription_id: str, terms: Data, period_start: int, period_end: int, due_at_ms: int
    ) -> None:
        self.subscription_id = subscription_id
        self.user_id = str(terms["user_id"])
        self.plan = str(terms["plan"])
        self.billing_period = str(terms["billing_period"])
        self.amount_minor = int(terms["amount_minor"])
        self.currency = str(terms["currency"])
        self.payment_method_id = str(terms["payment_method_id"])
        self.period = 1
        self.period_start = period_start
        self.period_end = period_end
        self.state = ACTIVE
        self.attempt = 0
        self.cancel_requested = False
        self.notice_sent = False
        self.due_at_ms: int | None = due_at_ms

    @property
    def final(self) -> bool:
        """Whether nothing will happen to it any more."""
        return self.state in FINAL

    @property
    def entitlement_id(self) -> str:
        """The entitlement of the last paid period."""
        return entitlement_id_for(self.subscription_id, self.period)

    # -- decisions (called by the orchestrator; business time ``now`` in ms) ---------------------
    def on_clock(self, now: int) -> Data | None:
        """The clock shows ``now``: act if due. Returns the data of a renewal saga to start (the
        caller starts it in the same transaction), else ``None``."""
        due = self.due_at_ms
        if due is None or due > now or self.final:
            return None
        if self.state in (ACTIVE, PAST_DUE):
            return self._start_attempt(due)
        if self.state == CANCELLING:
            if not self.notice_sent and due < self.period_end:
                self._notice_sent(outbox=[self._expiring_notice(due)], due_at_ms=self.period_end)
                if self.period_end <= now:
                    self._end(ENDED, "SUBSCRIPTION_CANCELLED", self.period_end)
            else:
                self._end(ENDED, "SUBSCRIPTION_CANCELLED", self.period_end)
        return None

    def renewal_ended(self, saga_state: str, data: Data) -> None:
        """The renewal saga of the current attempt ended in ``saga_state`` (its ``data``)."""
        if (
            self.state != RENEWING
            or int(data["period"]) != self.period + 1
            or int(data["attempt"]) != self.attempt
        ):
            return  # not the attempt this lifecycle waits for (cannot happen; kept defensive)
        due = int(data["access_from"])
        if saga_state == COMPLETED:
            start, end = int(data["period_start"]), int(data["period_end"])
            if self.cancel_requested:
                self._renewed(start, end, due_at_ms=None)
                self._cancel(due, "USER_REQUEST")
            else:
                self._renewed(start, end, due_at_ms=end)
            return
        left = len(DUNNING_DAYS) - (self.attempt - 1)
        if self.cancel_requested or left <= 0:
            self._declined(outbox=[self._declined_notice(due, None)], due_at_ms=None)
            if self.cancel_requested:
                self._end(ENDED, "SUBSCRIPTION_CANCELLED", due, cancelled_reason="USER_REQUEST")
            else:
                self._end(LAPSED, "PAYMENT_FAILED", due)
            return
        retry_at = self.period_end + DUNNING_DAYS[self.attempt - 1] * DAY_MS
        self._declined(outbox=[self._declined_notice(due, retry_at)], due_at_ms=retry_at)

    def request_cancel(self, now: int) -> None:
        """The user asked to cancel at business time ``now`` (module doc)."""
        if self.final or self.state == CANCELLING or self.cancel_requested:
            return
        if self.state == RENEWING:
            self._cancel_noted()
            return
        self._cancel(now, "USER_REQUEST")

    # -- helpers that record events ----------------------------------------------------------------
    def _start_attempt(self, due: int) -> Data:
        period, attempt = self.period + 1, self.attempt + 1
        data: Data = {
            "subscription_id": self.subscription_id,
            "user_id": self.user_id,
            "plan": self.plan,
            "billing_period": self.billing_period,
            "amount_minor": self.amount_minor,
            "currency": self.currency,
            "payment_method_id": self.payment_method_id,
            "payment_id": payment_id_for(self.subscription_id, period, attempt),
            "entitlement_id": entitlement_id_for(self.subscription_id, period),
            "provider_reference": None,
            "period": period,
            "attempt": attempt,
            "period_start": self.period_end,
            "period_end": self.period_end + period_ms(self.billing_period),
            "access_from": due,
            "lifecycle_id": str(self.id),
        }
        self._attempt_started(period=period, attempt=attempt, at_ms=due, due_at_ms=None)
        return data

    def _cancel(self, now: int, reason: str) -> None:
        if self.state == PAST_DUE or self.state == RENEWING:
            self._end(ENDED, "SUBSCRIPTION_CANCELLED", now, cancelled_reason=reason)
            return
        notice_at = max(now, self.period_end - EXPIRING_NOTICE_DAYS * DAY_MS)
        due = notice_at if notice_at < self.period_end else self.period_end
        self._cancelling(outbox=[self._cancelled_msg(now, reason, self.period_end)], due_at_ms=due)

    def _end(self, state: str, revoke_reason: str, now: int, cancelled_reason: str | None = None) -> None:
        outbox = [self._revoke_msg(now, revoke_reason)]
        if state == LAPSED:
            outbox.append(self._cancelled_msg(now, "PAYMENT_FAILED", self.period_end))
        elif cancelled_reason is not None:
            outbox.append(self._cancelled_msg(now, cancelled_reason, min(now, self.period_end)))
        self._ended(state=state, at_ms=now, outbox=outbox, due_at_ms=None)

    # -- messages --------------------------------------------------------------------------------
    def _revoke_msg(self, now: int, reason: str) -> OutboxMessage:
        lid = str(self.id)
        key = f"{lid}:revoke:{self.period}"
        payload = {
            "event_id": stable_id(key, "command"),
            "idempotency_key": key,
            "correlation_id": lid,
            "causation_id": None,
            "issued_at": now,
            "expires_at": None,
            "entitlement_id": self.entitlement_id,
            "user_id": self.user_id,
            "reason": reason,
        }
        return outbox_message(topic=ENTITLEMENT_COMMANDS, event_type="RevokeEntitlement", key=self.user_id,
                              payload=payload, time_ms=now, correlation_id=lid)  # fmt: skip

    def _cancelled_msg(self, now: int, reason: str, effective_at: int) -> OutboxMessage:
        payload = {
            "event_id": stable_id(self.subscription_id, "SubscriptionCancelled"),
            "subscription_id": self.subscription_id,
            "user_id": self.user_id,
            "occurred_at": now,
            "reason": reason,
            "effective_at": effective_at,
            "correlation_id": str(self.id),
        }
        sub = self.subscription_id
        return outbox_message(topic=SUBSCRIPTIONS, event_type="SubscriptionCancelled", key=sub,
                              payload=payload, time_ms=now, correlation_id=str(self.id))  # fmt: skip

    def _notification(self, now: int, what: str, template: str, params: dict[str, str]) -> OutboxMessage:
        nid = "ntf-" + stable_id(self.subscription_id, what)[:18]
        payload = {
            "event_id": stable_id(nid, "NotificationRequested"),
            "notification_id": nid,
            "user_id": self.user_id,
            "occurred_at": now,
            "channel": "EMAIL",
            "template": template,
            "params": {"subscription_id": self.subscription_id, "plan": self.plan, **params},
            "priority": "NORMAL",
            "correlation_id": str(self.id),
        }
        return outbox_message(topic=NOTIFICATIONS, event_type="NotificationRequested", key=self.user_id,
                              payload=payload, time_ms=now, correlation_id=str(self.id))  # fmt: skip

    def _declined_notice(self, now: int, retry_at: int | None) -> OutboxMessage:
        period, attempt = self.period + 1, self.attempt
        params = {
            "period": str(period),
            "attempt": str(attempt),
            "retries_left": str(len(DUNNING_DAYS) - (attempt - 1)) if retry_at is not None else "0",
            "next_retry_at": _iso(retry_at) if retry_at is not None else "",
            "amount_minor": str(self.amount_minor),
            "currency": self.currency,
        }
        return self._notification(now, f"declined\x1f{period}\x1f{attempt}", DECLINED_TEMPLATE, params)

    def _expiring_notice(self, now: int) -> OutboxMessage:
        params = {"ends_at": _iso(self.period_end), "period": str(self.period)}
        return self._notification(now, f"expiring\x1f{self.period}", EXPIRING_TEMPLATE, params)

    # -- events (the only place state changes) -----------------------------------------------------
    @event("AttemptStarted")
    def _attempt_started(self, period: int, attempt: int, at_ms: int, due_at_ms: int | None) -> None:
        self.state = RENEWING
        self.attempt = attempt
        self.due_at_ms = due_at_ms

    @event("Renewed")
    def _renewed(self, period_start: int, period_end: int, due_at_ms: int | None) -> None:
        self.period += 1
        self.period_start = period_start
        self.period_end = period_end
        self.attempt = 0
        self.state = ACTIVE
        self.due_at_ms = due_at_ms

    @event("Declined")
    def _declined(self, outbox: list[OutboxMessage], due_at_ms: int | None) -> None:
        self.state = PAST_DUE
        self.due_at_ms = due_at_ms

    @event("CancelNoted")
    def _cancel_noted(self) -> None:
        self.cancel_requested = True

    @event("Cancelling")
    def _cancelling(self, outbox: list[OutboxMessage], due_at_ms: int | None) -> None:
        self.state = CANCELLING
        self.cancel_requested = True
        self.due_at_ms = due_at_ms

    @event("NoticeSent")
    def _notice_sent(self, outbox: list[OutboxMessage], due_at_ms: int | None) -> None:
        self.notice_sent = True
        self.due_at_ms = due_at_ms

    @event("Ended")
    def _ended(self, state: str, at_ms: int, outbox: list[OutboxMessage], due_at_ms: int | None) -> None:
        self.state = state
        self.due_at_ms = due_at_ms


def open_lifecycle(subscription_data: Data) -> Lifecycle:
    """The lifecycle of a subscription whose first saga just completed (its ``data``)."""
    start, end = int(subscription_data["period_start"]), int(subscription_data["period_end"])
    return Lifecycle(
        subscription_id=str(subscription_data["subscription_id"]),
        terms={k: subscription_data[k] for k in
               ("user_id", "plan", "billing_period", "amount_minor", "currency", "payment_method_id")},
        period_start=start, period_end=end, due_at_ms=end,
    )  # fmt: skip


# -- the renewal saga ------------------------------------------------------------------------------
def _grant(d: Data) -> CommandSpec:
    return CommandSpec(
        ENTITLEMENT_COMMANDS,
        "GrantEntitlement",
        d["user_id"],
        {
            "entitlement_id": d["entitlement_id"],
            "user_id": d["user_id"],
            "kind": ENTITLEMENT_KIND,
            "valid_from": d["access_from"],
            "valid_until": d["period_end"],
            "subscription_id": d["subscription_id"],
            "order_id": None,
        },
    )


def _renewed(d: Data, saga_id: str, now_ms: int) -> list[OutboxMessage]:
    at = int(d["access_from"])
    payload = {
        "event_id": stable_id(d["subscription_id"], "SubscriptionRenewed", d["period"]),
        "subscription_id": d["subscription_id"],
        "user_id": d["user_id"],
        "occurred_at": at,
        "period": int(d["period"]),
        "period_start": int(d["period_start"]),
        "period_end": int(d["period_end"]),
        "access_from": at,
        "payment_id": d["payment_id"],
        "amount_minor": int(d["amount_minor"]),
        "currency": d["currency"],
        "attempt": int(d["attempt"]),
        "correlation_id": saga_id,
    }
    return [
        outbox_message(
            topic=SUBSCRIPTIONS,
            event_type="SubscriptionRenewed",
            key=d["subscription_id"],
            payload=payload,
            time_ms=at,
            correlation_id=saga_id,
        )  # fmt: skip
    ]


def _failed(_d: Data, _saga_id: str, _now_ms: int, _reason: str) -> list[OutboxMessage]:
    return []  # the lifecycle notifies the user and decides on retry or lapse


#: The renewal: authorise, capture (the pivot: a period is paid before any access is granted for
#: it), then grant the period's entitlement. A failed grant after the capture refunds it (the
#: void of a captured payment is a refund, :mod:`sagas.payments`).
PLAN = register_plan(
    SagaPlan(
        kind=KIND,
        steps=(
            authorize_step(lambda d: f"{d['plan']} {d['billing_period']} renewal, period {d['period']}"),
            CAPTURE_STEP,
            Step(
                "grant",
                _grant,
                succeeded=frozenset({"EntitlementGranted"}),
                failed=frozenset({"EntitlementGrantFailed"}),
                failure_reason="ENTITLEMENT_FAILED",
                compensation=revoke_entitlement,
                compensated=frozenset({"EntitlementRevoked"}),
            ),
        ),
        on_completed=_renewed,
        on_failed=_failed,
    )
)
