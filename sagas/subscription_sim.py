"""``backbeat sagas simulate-subscriptions``: subscriptions over months of simulated time.

It starts the participants (payment service with the seeded gateway simulator, entitlements) and
the orchestrator as processes, then drives the **business clock** itself (decision 6 of issue 17):
it never sleeps over days. The run is an event-driven simulation in lockstep with the
orchestrator:

1. the next business time ``T`` is the earliest of: the next subscription request or
   cancellation of the workload, the earliest due lifecycle timer (``due_at_ms`` of the
   lifecycles in the orchestrator's event store: a renewal at a period end, a dunning retry, an
   expiry notice or end), and the end of the run;
2. the requests and cancellations at ``T`` are produced (``occurred_at = T``) and the driver
   waits until the orchestrator has applied them and every saga they started has ended;
3. if a timer is due at ``T``, one ``ClockTicked(T)`` is produced on ``platform.clock`` and the
   driver waits again (the tick applied, every renewal saga it started ended).

So a cancellation at ``T`` is applied before a renewal due at ``T`` (the cancellation wins), and
results do not depend on how fast anything runs: every business time in the events is a due time
or a workload time. ``kill_orchestrator`` times (spread over the run) the orchestrator is
SIGKILLed right after a tick was produced, and restarted at once: a tick is applied with all its
effects in one transaction, or read again (:mod:`sagas.renewal`). Every second kill waits until
the tick was applied, so renewal sagas are in flight when the process dies.

The workload (:func:`subscription_workload`) is pure: ``users`` users subscribe (monthly,
:data:`sagas.workload.PLAN_PRICES`) on one of the first ``request_days`` days, a share
``cancel_share`` of them asks to cancel at a seeded later day (noon); the gateway declines each
authorisation with probability ``decline`` (decided once per idempotency key, so a retry may
succeed).
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from eventsourcing.utils import get_topic

from events.offsets import high_watermarks
from infra.errors import InfraError
from infra.processes import is_alive
from infra.settings import Settings
from sagas.eventstore import eventstore_env, open_application
from sagas.orchestrator import LIFECYCLE_EVENTS, Orchestrator
from sagas.process import partitions_of
from sagas.renewal import CLOCK_TOPIC, DAY_MS
from sagas.saga import Saga
from sagas.seeded import uniform
from sagas.simulate import SimulationConfig, _Processes, stock_path
from sagas.subscription import SUBSCRIPTIONS
from sagas.workload import PLAN_PRICES

CLOCK_ID = "sim"
#: The CloudEvents ``ce_source`` of what the driver produces.
SOURCE = "/sagas/simulate-subscriptions"
#: 2026-01-01T00:00:00Z: the default start of business time (fixed, so runs are reproducible).
DEFAULT_START_MS = 1_767_225_600_000
#: The read models of this part (:mod:`sagas.access`).
READ_MODELS = ("entitlement_events", "subscription_events", "business_clock")
_SAGA_TOPICS = [get_topic(Saga.Started), get_topic(Saga.Finished)]  # type: ignore[attr-defined]


@dataclass(frozen=True)
class SubscriptionSimConfig:
    """The knobs: ``users`` subscriptions requested over the first ``request_days`` days, a run of
    ``days`` simulated days from ``start_ms`` (ms since the epoch), ``decline`` the probability
    that one authorisation is declined, ``duplicate`` that a gateway answer comes twice,
    ``cancel_share`` the share of users who cancel; ``kill_orchestrator`` SIGKILLs;
    ``step_timeout_ms`` the (wall-clock) step deadline; ``deadline_s`` the wall-clock budget."""

    users: int = 40
    days: int = 120
    request_days: int = 10
    seed: int = 17
    decline: float = 0.3
    duplicate: float = 0.05
    cancel_share: float = 0.25
    kill_orchestrator: int = 1
    step_timeout_ms: int = 3_000
    start_ms: int = DEFAULT_START_MS
    deadline_s: float = 300.0
    run_id: str = ""

    def participants(self) -> SimulationConfig:
        """The fault-run config the participant processes are started with (no timeouts, no
        refused captures, no failed grants: the faults here are declines and duplicates)."""
        return SimulationConfig(
            seed=self.seed, decline=self.decline, timeout=0.0, duplicate=self.duplicate,
            fail_after_effect=0.0, capture_fail=0.0, entitlement_fail=0.0,
            step_timeout_ms=self.step_timeout_ms,
        )  # fmt: skip


@dataclass(frozen=True)
class Action:
    """One workload event at business time ``at_ms``."""

    at_ms: int
    event_type: str
    payload: dict[str, Any]


def subscription_workload(config: SubscriptionSimConfig, run_id: str) -> list[Action]:
    """The requests and cancellations of a run, by time (pure: same config and run id, same
    actions). Subscription ``<run_id>-sub-<n>`` of user ``<run_id>-user-<n>``."""
    out: list[Action] = []
    seed = config.seed
    for n in range(config.users):
        sub, user = f"{run_id}-sub-{n:04d}", f"{run_id}-user-{n:04d}"
        day = int(uniform(seed, "day", n) * config.request_days)
        at = config.start_ms + day * DAY_MS
        plan = list(PLAN_PRICES)[int(uniform(seed, "plan", n) * len(PLAN_PRICES))]
        out.append(Action(at, "SubscriptionRequested", {
            "event_id": f"{sub}-requested", "subscription_id": sub, "user_id": user, "occurred_at": at,
            "plan": plan, "billing_period": "MONTHLY", "price_minor": PLAN_PRICES[plan], "currency": "EUR",
            "country": "DE", "payment_method_id": f"pm-{user}", "trial_days": 0,
        }))  # fmt: skip
        if uniform(seed, "cancel", n) < config.cancel_share:
            later = 1 + int(uniform(seed, "cancel_day", n) * max(1, config.days - day - 1))
            when = at + later * DAY_MS + DAY_MS // 2
            out.append(Action(when, "SubscriptionCancellationRequested", {
                "event_id": f"{sub}-cancel", "subscription_id": sub, "user_id": user, "occurred_at": when,
                "reason": "USER_REQUEST",
            }))  # fmt: skip
    out.sort(key=lambda a: (a.at_ms, a.event_type != "SubscriptionRequested", a.payload["subscription_id"]))
    return out


class StoreWatch:
    """What the driver reads of the orchestrator's event store (another process writes it):
    sagas started and ended, the lifecycles' business timers, and the applied positions."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.app = open_application(lambda: Orchestrator(eventstore_env(settings, Orchestrator.name)))
        self._saga_cursor = 0
        self._due_cursor = 0
        self.started = 0
        self.finished = 0
        self.due: dict[Any, int] = {}
        self._lifecycle_topics = [get_topic(c) for c in LIFECYCLE_EVENTS]
        self._finished_topic = _SAGA_TOPICS[1]

    def close(self) -> None:
        self.app.close()

    def poll(self) -> None:
        """Read what was recorded since the last call."""
        while True:
            notes = self.app.recorder.select_notifications(
                start=self._saga_cursor + 1, limit=10_000, topics=_SAGA_TOPICS
            )
            if not notes:
                break
            for note in notes:
                if note.topic == self._finished_topic:
                    self.finished += 1
                else:
                    self.started += 1
            self._saga_cursor = int(notes[-1].id)
        while True:
            notes = self.app.recorder.select_notifications(
                start=self._due_cursor + 1, limit=10_000, topics=self._lifecycle_topics
            )
            if not notes:
                break
            for note in notes:
                ev = self.app.mapper.to_domain_event(note)
                if ev.due_at_ms is None:
                    self.due.pop(ev.originator_id, None)
                else:
                    self.due[ev.originator_id] = int(ev.due_at_ms)
            self._due_cursor = int(notes[-1].id)

    def caught_up(self, topic: str) -> bool:
        """Whether the orchestrator applied every record of ``topic`` there is now."""
        highs = high_watermarks(self.settings, topic)
        for t, p in partitions_of((topic,)):
            if int(self.app.recorder.max_tracking_id(f"{t}:{p}") or 0) < highs.get(p, 0):
                return False
        return True


@dataclass
class SubscriptionRun:
    """What happened (wall-clock ``started_at``/``ended_at`` in s; ``ticks`` produced; ``kills``:
    the business times, ms, at which the orchestrator was SIGKILLed; ``in_flight_at_kills``: sagas
    running at each kill, −1 for a kill right after the tick was produced, before it was applied)."""

    run_id: str
    requests: int = 0
    cancellations: int = 0
    ticks: int = 0
    kills: list[int] = field(default_factory=list)
    in_flight_at_kills: list[int] = field(default_factory=list)
    now_ms: int = 0
    started_at: float = 0.0
    ended_at: float = 0.0


def _wait_quiet(watch: StoreWatch, processes: _Processes, topics: list[str], deadline: float) -> None:
    """Wait until the orchestrator applied every record of ``topics`` and every saga ended."""
    while True:
        processes.check()
        if all(watch.caught_up(t) for t in topics):
            watch.poll()
            if watch.started == watch.finished:
                return
        if time.monotonic() > deadline:
            raise InfraError(
                f"the orchestrator did not settle in time ({watch.started - watch.finished} sagas running); "
                f"see the logs in {processes.settings.run_dir}"
            )
        time.sleep(0.01)  # polling the other process's store


def _wait_participants(settings: Settings, deadline: float) -> None:
    """Wait until the entitlement service applied every command (the lifecycles' revocations are
    answered by nobody the orchestrator waits for)."""
    from sagas.entitlements import COMMANDS_TOPIC, EntitlementService

    app = open_application(lambda: EntitlementService(eventstore_env(settings, EntitlementService.name)))
    try:
        while True:
            highs = high_watermarks(settings, COMMANDS_TOPIC)
            if all(
                int(app.recorder.max_tracking_id(f"{t}:{p}") or 0) >= highs.get(p, 0)
                for t, p in partitions_of((COMMANDS_TOPIC,))
            ):
                return
            if time.monotonic() > deadline:
                raise InfraError("the entitlement service did not apply every command in time")
            time.sleep(0.02)  # polling the other process's store
    finally:
        app.close()


def run_subscriptions(
    settings: Settings,
    config: SubscriptionSimConfig,
    *,
    on_progress: Callable[[SubscriptionRun], None] | None = None,
) -> SubscriptionRun:
    """Run the simulation (module doc) against the broker and event stores of ``settings`` (both
    up, topics created). Returns when the business clock reached the end and everything settled.

    Raises:
        InfraError: a child process died, or the run did not settle within ``config.deadline_s``.
    """
    from events.producer import EventProducer

    run = SubscriptionRun(run_id=config.run_id or f"subs{int(time.time()):x}")
    actions = subscription_workload(config, run.run_id)
    end_ms = config.start_ms + config.days * DAY_MS
    kill_at = [config.start_ms + (i + 1) * config.days * DAY_MS // (config.kill_orchestrator + 1)
               for i in range(config.kill_orchestrator)]  # fmt: skip
    stock = stock_path(settings)
    stock.parent.mkdir(parents=True, exist_ok=True)
    if not stock.exists():
        stock.write_text(json.dumps({}))
    processes = _Processes(settings, config.participants(), stock)
    producer = EventProducer(settings)
    watch = StoreWatch(settings)
    deadline = time.monotonic() + config.deadline_s
    quiet_topics = [SUBSCRIPTIONS, CLOCK_TOPIC]
    run.started_at = time.time()
    processes.start()
    try:
        i = 0
        now = config.start_ms
        while True:
            watch.poll()
            next_action = actions[i].at_ms if i < len(actions) else None
            next_due = min(watch.due.values(), default=None)
            candidates = [t for t in (next_action, next_due, end_ms) if t is not None]
            now = max(now, min(candidates))
            if now > end_ms:
                now = end_ms
            batch: list[Action] = []
            while i < len(actions) and actions[i].at_ms <= now:
                batch.append(actions[i])
                i += 1
            if batch:
                for action in batch:
                    key = "subscription_id"
                    producer.send_many(SUBSCRIPTIONS, action.event_type, [action.payload], key_field=key,
                                       time_field="occurred_at", source=SOURCE)  # fmt: skip
                    if action.event_type == "SubscriptionRequested":
                        run.requests += 1
                    else:
                        run.cancellations += 1
                producer.flush()
                _wait_quiet(watch, processes, quiet_topics, deadline)
                watch.poll()
            due_now = any(t <= now for t in watch.due.values())
            if due_now or now >= end_ms:
                run.ticks += 1
                tick = {"event_id": f"{run.run_id}-tick-{run.ticks}", "clock_id": CLOCK_ID, "tick": run.ticks,
                        "occurred_at": now}  # fmt: skip
                producer.send_many(CLOCK_TOPIC, "ClockTicked", [tick], key_field="clock_id",
                                   time_field="occurred_at", source=SOURCE)  # fmt: skip
                producer.flush()
                if kill_at and now >= kill_at[0]:
                    kill_at.pop(0)
                    assert processes.orchestrator is not None
                    if len(run.kills) % 2 == 1:
                        # every second kill waits until the tick was applied: its renewal sagas are
                        # then in flight (commands sent, replies pending) when the process dies
                        while not watch.caught_up(CLOCK_TOPIC) and time.monotonic() < deadline:
                            time.sleep(0.005)  # polling the other process's store
                        watch.poll()
                        run.in_flight_at_kills.append(watch.started - watch.finished)
                    else:
                        run.in_flight_at_kills.append(-1)
                    os.kill(processes.orchestrator.pid, signal.SIGKILL)
                    limit = time.monotonic() + 10
                    while is_alive(processes.orchestrator) and time.monotonic() < limit:
                        time.sleep(0.02)  # waiting for the kernel to end it
                    processes.orchestrator = processes._spawn(
                        "saga-orchestrator", processes.orchestrator_argv
                    )
                    run.kills.append(now)
                _wait_quiet(watch, processes, quiet_topics, deadline)
            run.now_ms = now
            if on_progress is not None:
                on_progress(run)
            if now >= end_ms and i >= len(actions):
                watch.poll()
                if not any(t <= now for t in watch.due.values()):
                    break
        _wait_participants(settings, deadline)
        run.ended_at = time.time()
    finally:
        watch.close()
        producer.flush()
        processes.stop()
    return run


def build_subscription_read_models(settings: Settings) -> None:
    """The read models the run's checks read: ``sagas`` (and the other saga tables),
    ``ledger_entries``, ``entitlement_events``/``entitlements``, ``subscription_events``/
    ``subscription_periods`` and ``business_clock``."""
    from projections.runner import run_projections
    from sagas.simulate import build_saga_read_models
    from streams.ledger import publish_until_caught_up

    build_saga_read_models(settings)
    publish_until_caught_up(settings)  # the ledger is built from billing.ledger, which the agent posts
    run_projections(settings, ["ledger_entries", *READ_MODELS], until_caught_up=True)


def simulate_subscriptions_command(
    settings: Settings,
    config: SubscriptionSimConfig,
    *,
    on_progress: Callable[[SubscriptionRun], None] | None = None,
    echo: Callable[[str], None] = print,
) -> tuple[SubscriptionRun, list[Any]]:
    """What ``backbeat sagas simulate-subscriptions`` does: start the embedded broker and registry
    if they are not running (stopping them at the end), create the topics, run
    :func:`run_subscriptions`, build the read models and check the invariants (the saga ones
    and the entitlement ones, :mod:`sagas.invariants`). Returns the run and the results.

    Raises:
        InfraError, ConfigError: as the steps raise them.
    """
    from infra import services
    from infra.processes import pid_file, stop
    from infra.provision import apply_topics
    from projections.store import reader
    from projections.tracking import reset as reset_projection
    from sagas.invariants import check_invariants
    from sagas.simulate import reset_all

    started = services.up(settings)
    for running in started:
        echo(f"started {running.name} on {running.address} (pid {running.pid})")
    try:
        if any(r.name == services.BROKER for r in started):
            removed = reset_all(settings)
            if settings.duckdb_path.exists():
                reset_projection(settings, list(READ_MODELS))
            if removed:
                echo("the broker started empty: saga stores and read models of earlier runs were reset")
        apply_topics(settings)
        run = run_subscriptions(settings, config, on_progress=on_progress)
        build_subscription_read_models(settings)
        with reader(settings.duckdb_path) as con:
            results = check_invariants(con, entitlements=True)
        return run, results
    finally:
        for running in reversed(started):
            stop(running)
            pid_file(settings.run_dir, running.name).unlink(missing_ok=True)
