"""The saga engine: an event-sourced aggregate that runs a plan of steps with deadlines,
bounded retries and compensation in reverse order.

A *plan* (:class:`SagaPlan`, one per saga kind: :mod:`sagas.subscription`, :mod:`sagas.order`)
is a list of :class:`Step` s. Each step sends one command to a participant (or is *local*: done
by the saga itself) and waits for a reply that says it succeeded or failed. Terms after
Garcia-Molina & Salem, "Sagas" (SIGMOD 1987) and Richardson, *Microservices Patterns* ch. 4:

- a step with a ``compensation`` is *compensatable*: when a later step fails, its compensating
  command is sent, last done first;
- a step without one is the *pivot* (capture): once it succeeded the saga can only complete;
- a failure before anything was done ends the saga ``REJECTED``; a failure after some step was
  done compensates them and ends it ``COMPENSATED``; all steps done ends it ``COMPLETED``;
- a compensatable step that never answered is *abandoned*: its outcome is unknown (a gateway may
  have charged and lost the answer), so it is compensated with the steps done.

Every command carries an idempotency key ``"<saga id>:<step>:<phase>"`` that stays the same over
retries, so a participant applies it once. Every command has a deadline (ms since the epoch)
stored in the saga's events; when it passes without a reply the command is sent again (same
key), up to ``max_attempts`` times for forward steps, after which the saga compensates (reason
``TIMED_OUT``). Compensating commands are retried until they are answered (a compensation
must not give up: Garcia-Molina & Salem §5), with the wait doubling up to 8 step timeouts.

The aggregate decides only; it never does I/O. What it wants sent is stored in its events'
``outbox`` attribute and published by :mod:`sagas.outbox`. Times (``now_ms``) are passed in.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from eventsourcing.domain import Aggregate, event

from sagas.messages import SAGA_NAMESPACE, OutboxMessage, outbox_message, stable_id

RUNNING = "RUNNING"
COMPENSATING = "COMPENSATING"
COMPLETED = "COMPLETED"
COMPENSATED = "COMPENSATED"
REJECTED = "REJECTED"
#: States a saga never leaves.
TERMINAL = frozenset({COMPLETED, COMPENSATED, REJECTED})

FORWARD = "forward"
COMPENSATE = "compensate"


@dataclass(frozen=True)
class CommandSpec:
    """A command a step sends: ``event_type`` (short Avro name) on ``topic`` with record key
    ``key``; ``fields`` are the payload minus the envelope fields the engine adds
    (``event_id``, ``idempotency_key``, ``correlation_id``, ``causation_id``, ``issued_at``,
    ``expires_at``)."""

    topic: str
    event_type: str
    key: str
    fields: dict[str, Any]


Data = dict[str, Any]


@dataclass(frozen=True)
class Step:
    """One step of a plan.

    ``command(data)`` builds the forward command (``None`` for a local step); ``succeeded`` /
    ``failed`` are the reply types (short names) that end it; ``on_success(data, reply)``
    returns updates to the saga's data (e.g. the gateway's reference); ``failure_reason`` is the
    saga's reason when this step fails or times out for good. ``compensation(data)`` builds the
    compensating command (``None``: nothing to undo by command), ended by a reply in
    ``compensated``. ``local_outbox(data, saga_id, now_ms)`` is what a local step publishes.
    """

    name: str
    command: Callable[[Data], CommandSpec] | None
    succeeded: frozenset[str] = frozenset()
    failed: frozenset[str] = frozenset()
    failure_reason: str = "OTHER"
    on_success: Callable[[Data, dict[str, Any]], Data] = lambda _d, _r: {}
    compensation: Callable[[Data], CommandSpec] | None = None
    compensated: frozenset[str] = frozenset()
    local_outbox: Callable[[Data, str, int], list[OutboxMessage]] | None = None


@dataclass(frozen=True)
class SagaPlan:
    """A saga kind: its steps in order, and the messages it publishes when it ends.

    ``on_completed(data, saga_id, now_ms)`` and ``on_failed(data, saga_id, now_ms, reason)``
    return outbox messages (``SubscriptionActivated``, ``OrderCancelled``, …)."""

    kind: str
    steps: tuple[Step, ...]
    on_completed: Callable[[Data, str, int], list[OutboxMessage]]
    on_failed: Callable[[Data, str, int, str], list[OutboxMessage]]
    step_by_name: dict[str, Step] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "step_by_name", {s.name: s for s in self.steps})


@dataclass(frozen=True)
class Timing:
    """Deadlines: ``step_timeout_ms`` per attempt (ms), ``max_attempts`` per forward step."""

    step_timeout_ms: int = 30_000
    max_attempts: int = 3

    def compensation_wait_ms(self, attempt: int) -> int:
        """The deadline of the ``attempt``-th try of a compensation (doubling, ≤ 8 timeouts)."""
        return self.step_timeout_ms * min(8, 2 ** (attempt - 1))


PLANS: dict[str, SagaPlan] = {}


def register_plan(plan: SagaPlan) -> SagaPlan:
    """Make ``plan`` known to :class:`Saga` (by its kind)."""
    PLANS[plan.kind] = plan
    return plan


def saga_id_for(kind: str, business_id: str) -> uuid.UUID:
    """The saga's id: uuid5 of its kind and business id (subscription id, order id), so a
    re-delivered ``SubscriptionRequested`` finds the saga it started."""
    return uuid.uuid5(SAGA_NAMESPACE, f"saga\x1f{kind}\x1f{business_id}")


class Saga(Aggregate):
    """One saga instance. Start it with :meth:`start`; feed it :meth:`on_reply` and
    :meth:`on_timeout`. Its events are its history; ``state`` is one of ``RUNNING``,
    ``COMPENSATING``, ``COMPLETED``, ``COMPENSATED``, ``REJECTED``."""

    @staticmethod
    def create_id(kind: str, business_id: str) -> uuid.UUID:  # type: ignore[override]
        return saga_id_for(kind, business_id)

    @event("Started")
    def __init__(self, kind: str, business_id: str, data: Data, requested_ms: int, started_ms: int) -> None:
        self.kind = kind
        self.business_id = business_id
        self.data: Data = dict(data)
        self.requested_ms = requested_ms
        self.started_ms = started_ms
        self.ended_ms: int | None = None
        self.state = RUNNING
        self.reason: str | None = None
        self.done: list[str] = []
        self.pending: dict[str, Any] | None = None
        self.retries = 0

    # -- queries -------------------------------------------------------------------------------
    @property
    def plan(self) -> SagaPlan:
        """The plan of this saga's kind."""
        return PLANS[self.kind]

    @property
    def saga_id(self) -> str:
        """The id as text: the ``correlation_id`` of every message of this saga."""
        return str(self.id)

    @property
    def terminal(self) -> bool:
        """Whether the saga has ended."""
        return self.state in TERMINAL

    # -- commands (decide, then record events) -------------------------------------------------
    def begin(self, now_ms: int, timing: Timing, cause_id: str | None) -> None:
        """Issue the first step (right after construction)."""
        self._next_forward(now_ms, timing, cause_id)

    def on_reply(
        self, reply_type: str, reply: dict[str, Any], reply_id: str, now_ms: int, timing: Timing
    ) -> bool:
        """Apply a participant's reply (``reply_type`` short name, decoded ``reply`` payload,
        its ``event_id``). Returns ``False`` (and records nothing) when the saga is not
        waiting for it: a duplicate, a late answer to an attempt already replaced, or a reply
        to a step already given up."""
        pending = self.pending
        if self.terminal or pending is None:
            return False
        step = self.plan.step_by_name[pending["step"]]
        if pending["phase"] == FORWARD:
            if reply_type in step.succeeded:
                self._step_succeeded(step.name, reply_type, reply_id, step.on_success(self.data, reply))
                self._next_forward(now_ms, timing, reply_id)
                return True
            if reply_type in step.failed:
                self._step_failed(step.name, reply_type, reply_id, step.failure_reason, deadline_ms=None)
                self._fail(step.failure_reason, now_ms, timing, reply_id)
                return True
            return False
        if reply_type in step.compensated:
            self._step_compensated(step.name, reply_type, reply_id, deadline_ms=None)
            self._next_compensation(now_ms, timing, reply_id)
            return True
        return False

    def on_timeout(self, now_ms: int, timing: Timing) -> bool:
        """The pending command's deadline passed: send it again (same idempotency key) or, after
        ``max_attempts`` forward tries, compensate. Returns ``False`` when nothing is pending
        or the deadline is not yet due."""
        pending = self.pending
        if self.terminal or pending is None or pending["deadline_ms"] > now_ms:
            return False
        step = self.plan.step_by_name[pending["step"]]
        attempt = int(pending["attempt"])
        if pending["phase"] == FORWARD and attempt >= timing.max_attempts:
            self._timed_out(step.name, pending["phase"], attempt, given_up=True, deadline_ms=None)
            if step.compensation is not None:
                # no answer is not "not done": the participant may have acted and lost its reply
                # (a gateway that charged, then timed out). Compensate the step as if it was done;
                # compensations are answered as done when there was nothing to undo.
                self._step_abandoned(step.name)
            self._fail("TIMED_OUT", now_ms, timing, pending["event_id"])
            return True
        self._timed_out(step.name, pending["phase"], attempt, given_up=False, deadline_ms=None)
        self._issue(step, pending["phase"], attempt + 1, now_ms, timing, pending["event_id"])
        return True

    # -- engine --------------------------------------------------------------------------------
    def _next_forward(self, now_ms: int, timing: Timing, cause_id: str | None) -> None:
        for step in self.plan.steps:
            if step.name in self.done:
                continue
            if step.command is None:  # local step: done at once
                outbox = step.local_outbox(self.data, self.saga_id, now_ms) if step.local_outbox else []
                self._local_step_done(step.name, outbox=outbox, deadline_ms=None)
                continue
            self._issue(step, FORWARD, 1, now_ms, timing, cause_id)
            return
        self._finish(
            COMPLETED, None, now_ms, self.plan.on_completed(self.data, self.saga_id, now_ms), deadline_ms=None
        )

    def _fail(self, reason: str, now_ms: int, timing: Timing, cause_id: str | None) -> None:
        if not self.done:
            outbox = self.plan.on_failed(self.data, self.saga_id, now_ms, reason)
            self._finish(REJECTED, reason, now_ms, outbox, deadline_ms=None)
            return
        self._compensation_started(reason)
        self._next_compensation(now_ms, timing, cause_id)

    def _next_compensation(self, now_ms: int, timing: Timing, cause_id: str | None) -> None:
        while self.done:
            step = self.plan.step_by_name[self.done[-1]]
            if step.compensation is None:
                self._step_compensated(step.name, "local", "", deadline_ms=None)
                continue
            self._issue(step, COMPENSATE, 1, now_ms, timing, cause_id)
            return
        outbox = self.plan.on_failed(self.data, self.saga_id, now_ms, self.reason or "OTHER")
        self._finish(COMPENSATED, self.reason, now_ms, outbox, deadline_ms=None)

    def _issue(
        self, step: Step, phase: str, attempt: int, now_ms: int, timing: Timing, cause_id: str | None
    ) -> None:
        build = step.command if phase == FORWARD else step.compensation
        assert build is not None
        spec = build(self.data)
        wait = timing.step_timeout_ms if phase == FORWARD else timing.compensation_wait_ms(attempt)
        deadline = now_ms + wait
        event_id = stable_id(self.saga_id, step.name, phase, attempt)
        payload = {
            **spec.fields,
            "event_id": event_id,
            "idempotency_key": f"{self.saga_id}:{step.name}:{phase}",
            "correlation_id": self.saga_id,
            "causation_id": cause_id,
            "issued_at": now_ms,
            "expires_at": deadline,
        }
        message = outbox_message(
            topic=spec.topic,
            event_type=spec.event_type,
            key=spec.key,
            payload=payload,
            time_ms=now_ms,
            correlation_id=self.saga_id,
            causation_id=cause_id,
        )
        self._command_issued(
            step=step.name,
            phase=phase,
            command=spec.event_type,
            attempt=attempt,
            event_id=event_id,
            deadline_ms=deadline,
            outbox=[message],
        )

    # -- events (the only place state changes; replayed on load) -------------------------------
    @event("CommandIssued")
    def _command_issued(
        self,
        step: str,
        phase: str,
        command: str,
        attempt: int,
        event_id: str,
        deadline_ms: int,
        outbox: list[OutboxMessage],
    ) -> None:
        self.pending = {
            "step": step,
            "phase": phase,
            "command": command,
            "attempt": attempt,
            "event_id": event_id,
            "deadline_ms": deadline_ms,
        }
        if attempt > 1:
            self.retries += 1

    @event("StepSucceeded")
    def _step_succeeded(self, step: str, reply: str, reply_id: str, updates: Data) -> None:
        self.done.append(step)
        self.data.update(updates)
        self.pending = None

    @event("LocalStepDone")
    def _local_step_done(self, step: str, outbox: list[OutboxMessage], deadline_ms: int | None) -> None:
        self.done.append(step)

    @event("StepFailed")
    def _step_failed(
        self, step: str, reply: str, reply_id: str, reason: str, deadline_ms: int | None
    ) -> None:
        self.pending = None

    @event("TimedOut")
    def _timed_out(
        self, step: str, phase: str, attempt: int, given_up: bool, deadline_ms: int | None
    ) -> None:
        self.pending = None

    @event("StepAbandoned")
    def _step_abandoned(self, step: str) -> None:
        self.done.append(step)  # outcome unknown: compensate it with the rest

    @event("CompensationStarted")
    def _compensation_started(self, reason: str) -> None:
        self.state = COMPENSATING
        self.reason = reason

    @event("StepCompensated")
    def _step_compensated(self, step: str, reply: str, reply_id: str, deadline_ms: int | None) -> None:
        self.done.remove(step)
        self.pending = None

    @event("Finished")
    def _finish(
        self,
        state: str,
        reason: str | None,
        ended_ms: int,
        outbox: list[OutboxMessage],
        deadline_ms: int | None,
    ) -> None:
        self.state = state
        self.reason = reason
        self.ended_ms = ended_ms
        self.pending = None
