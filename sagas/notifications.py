"""The notification relay: ``NotificationRequested`` in, one provider delivery per notification,
one final ``NotificationSent`` or ``NotificationFailed`` out, within a token bucket per
(user, channel).

It reads ``platform.notifications`` (the same topic carries its own Sent/Failed events: those
are skipped as input) and keeps its state in an event store like the saga participants
(:mod:`sagas.process`: each input record is applied exactly once, with its tracking position in
the same transaction; what it publishes is in the aggregate events' ``outbox`` and is relayed by
:class:`sagas.outbox.OutboxRelay`). Two aggregates:

- :class:`Notification`, one per ``notification_id`` (the idempotency key):
  ``PENDING`` → ``ATTEMPTING`` → ``SENT`` | ``FAILED`` | ``WAITING`` (a transient failure;
  back to ``ATTEMPTING`` when its ``retry_after_ms`` has passed). A second request with the same
  ``notification_id`` changes nothing.
- :class:`Bucket`, one per ``(user_id, channel)``: the token bucket as one number
  (:mod:`sagas.token_bucket`, GCRA). Every provider call takes a token, at the relay's wall-clock
  time just before the call; a notification with no token is not dropped nor failed but waits
  for the next free slot of its bucket, slots handed out in the order notifications first look
  for a token (an in-memory queue and timer; after a restart every pending notification looks
  again). ``priority`` does not bypass the bucket: the schema says HIGH
  bypasses *quiet hours*, not the rate limit.

One attempt, in order (the crash semantics, docs/live-notifications.md):

1. take a token and record ``AttemptStarted(attempt n)`` (with the bucket's new state) — durable
   **before** the provider call;
2. call the provider with ``idempotency_key = notification_id``; the provider de-duplicates by
   it (:mod:`sagas.notification_provider`), so calling again after a crash never delivers twice;
3. record the outcome: ``Sent`` / ``Failed`` (each carrying its event in the outbox, with the
   deterministic ``event_id = stable_id(notification_id, <type>)``) or ``RetryScheduled``
   (deadline = answer time + ``retry_after_ms``; exponential back-off when the provider gave no
   hint); after ``max_attempts`` transient failures the notification fails for good with the
   last reason;
4. the outbox relay publishes the final event, then records its position.

A notification found ``ATTEMPTING`` at start (a crash between 1 and 3) is attempted again at
once (a new token, the same key). Only final events are published; attempts, retries and waits
stay in the event store and in the metrics.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from uuid import UUID

from eventsourcing.application import ProcessingEvent
from eventsourcing.domain import Aggregate, event
from eventsourcing.utils import get_topic
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from infra import metrics
from sagas.messages import Inbound, outbox_message, stable_id
from sagas.notification_provider import (
    NotificationProvider,
    ProviderConfig,
    ProviderRejected,
    ProviderSimulator,
    ProviderTransient,
)
from sagas.participant import PARTICIPANT_ENV
from sagas.process import KafkaProcess
from sagas.runner import ProcessRunner, RejectedRecord, RunStats
from sagas.token_bucket import BucketSpec, take, wait_ms

log = logging.getLogger("backbeat.notifications")

#: The topic of requests and outcomes.
TOPIC = "platform.notifications"
REQUESTED, SENT_EVENT, FAILED_EVENT = "NotificationRequested", "NotificationSent", "NotificationFailed"

#: Process name (``infra.ops.DEFAULT_PORTS``) and metrics component name.
PROCESS = COMPONENT = "notification-relay"

PENDING, ATTEMPTING, WAITING, SENT, FAILED = "PENDING", "ATTEMPTING", "WAITING", "SENT", "FAILED"
FINAL = (SENT, FAILED)

#: Defaults of the rate limit and retries (``BACKBEAT_NOTIFY_*`` variables override them, see
#: :func:`RelayConfig.from_env`).
DEFAULT_CAPACITY = 5
DEFAULT_REFILL_PER_S = 0.1
DEFAULT_MAX_ATTEMPTS = 8
DEFAULT_BACKOFF_FIRST_MS = 200
DEFAULT_BACKOFF_MAX_MS = 10_000


@dataclass(frozen=True)
class RelayConfig:
    """The relay's rules: ``bucket`` (per user and channel), ``max_attempts`` (provider calls
    before a transiently failing notification fails for good, >= 1), and the back-off used when
    the provider gives no ``retry_after_ms``: ``backoff_first_ms * 2**(attempt-1)`` capped at
    ``backoff_max_ms``.

    Raises:
        ValueError: ``max_attempts < 1`` or negative back-off.
    """

    bucket: BucketSpec = BucketSpec(DEFAULT_CAPACITY, DEFAULT_REFILL_PER_S)
    max_attempts: int = DEFAULT_MAX_ATTEMPTS
    backoff_first_ms: int = DEFAULT_BACKOFF_FIRST_MS
    backoff_max_ms: int = DEFAULT_BACKOFF_MAX_MS

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError(f"max_attempts={self.max_attempts}: give at least 1")
        if self.backoff_first_ms < 0 or self.backoff_max_ms < self.backoff_first_ms:
            raise ValueError("back-off: give 0 <= first <= max (ms)")

    def backoff_ms(self, attempt: int) -> int:
        """The wait after transient failure ``attempt`` (1-based) when the provider gave no hint."""
        return int(min(self.backoff_max_ms, self.backoff_first_ms * 2 ** max(0, attempt - 1)))


def notification_uuid(notification_id: str) -> UUID:
    """The aggregate id of notification ``notification_id``."""
    return uuid.UUID(stable_id("notification", notification_id))


def bucket_uuid(user_id: str, channel: str) -> UUID:
    """The aggregate id of the bucket of ``(user_id, channel)``."""
    return uuid.UUID(stable_id("notification-bucket", user_id, channel))


class Notification(Aggregate):
    """One notification: ``notification_id``, the ``request`` (the NotificationRequested
    payload), ``state`` (module doc), ``attempts`` (provider calls started), ``reason`` and
    ``message_id`` once final."""

    @staticmethod
    def create_id(notification_id: str) -> UUID:
        return notification_uuid(notification_id)

    @event("Requested")
    def __init__(self, notification_id: str, request: dict[str, Any], deadline_ms: int) -> None:
        self.notification_id = notification_id
        self.request = request
        self.state = PENDING
        self.attempts = 0
        self.reason: str | None = None
        self.message_id: str | None = None

    @property
    def user_id(self) -> str:
        """The recipient."""
        return str(self.request["user_id"])

    @property
    def channel(self) -> str:
        """The delivery channel."""
        return str(self.request.get("channel") or "OTHER")

    @event("AttemptStarted")
    def attempt_started(self, attempt: int, at_ms: int, deadline_ms: int) -> None:
        self.state = ATTEMPTING
        self.attempts = attempt

    @event("RetryScheduled")
    def retry_scheduled(
        self, attempt: int, reason: str, retry_after_ms: int | None, detail: str, deadline_ms: int
    ) -> None:
        self.state = WAITING
        self.reason = reason

    @event("Sent")
    def sent(
        self, attempt: int, message_id: str, replayed: bool, at_ms: int, outbox: list[Any], deadline_ms: None
    ) -> None:
        self.state = SENT
        self.message_id = message_id

    @event("Failed")
    def failed(
        self, attempt: int, reason: str, detail: str, at_ms: int, outbox: list[Any], deadline_ms: None
    ) -> None:
        self.state = FAILED
        self.reason = reason


class Bucket(Aggregate):
    """The token bucket of one ``(user_id, channel)``: ``tat`` (ms, :mod:`sagas.token_bucket`)."""

    @staticmethod
    def create_id(user_id: str, channel: str) -> UUID:
        return bucket_uuid(user_id, channel)

    @event("Opened")
    def __init__(self, user_id: str, channel: str) -> None:
        self.user_id = user_id
        self.channel = channel
        self.tat = 0.0

    @event("TokenTaken")
    def token_taken(self, at_ms: int, tat: float, notification_id: str) -> None:
        self.tat = tat


class NotificationRelay(KafkaProcess):
    """The relay (module doc): ``provider`` (the port), ``config`` (:class:`RelayConfig`),
    ``clock`` (ms since the epoch, wall time by default: the bucket limits what a person
    receives per real second, and a backlog of old requests must not go out in one burst).
    Construct with ``env=`` from :func:`sagas.eventstore.eventstore_env`."""

    env = PARTICIPANT_ENV
    input_topics = (TOPIC,)
    source = "/platform/notification-relay"

    def __init__(
        self,
        env: dict[str, str] | None = None,
        *,
        provider: NotificationProvider,
        config: RelayConfig | None = None,
        clock: Callable[[], int] | None = None,
    ) -> None:
        super().__init__(env)
        self.provider = provider
        self.config = config or RelayConfig()
        self.clock = clock or (lambda: int(time.time() * 1000))
        #: waits for a token (in memory: they are recomputed after a restart), duplicate requests
        self.delays = 0
        self.duplicates = 0
        #: the queue of each bucket, in memory: the bucket's ``tat`` with the slots handed out
        #: to waiting notifications, and each waiting notification's slot (ms)
        self._queued_tat: dict[UUID, float] = {}
        self._slots: dict[UUID, int] = {}

    # -- input ---------------------------------------------------------------------------------
    def handle_record(self, record: Inbound, processing_event: ProcessingEvent[UUID]) -> None:
        """Open a notification for a new ``NotificationRequested``; skip Sent/Failed (the
        relay's own output) and repeated requests.

        Raises:
            RejectedRecord: another event type (``unexpected_type``) or a request without
                ``notification_id``/``user_id`` (``invalid_request``): dead-lettered.
        """
        if record.name in (SENT_EVENT, FAILED_EVENT):
            return
        if record.name != REQUESTED:
            raise RejectedRecord("unexpected_type", f"{record.event_type} is not a notification event")
        p = record.payload
        for name in ("notification_id", "user_id"):
            if p.get(name) in (None, ""):
                raise RejectedRecord("invalid_request", f"{REQUESTED} has no {name}")
        nid = str(p["notification_id"])
        if self.get_or_none(notification_uuid(nid)) is not None:
            self.duplicates += 1
            return
        request = {k: v for k, v in p.items()}
        request["params"] = {str(k): str(v) for k, v in (p.get("params") or {}).items()}
        note = Notification(notification_id=nid, request=request, deadline_ms=self.clock())
        processing_event.collect_events(note)

    # -- attempts ------------------------------------------------------------------------------
    def on_deadline(self, aggregate_id: UUID, now_ms: int) -> None:
        """A notification is due: wait for a token, or take one and call the provider (module
        doc, steps 1-3).

        Raises:
            Exception: whatever the provider raises besides its transient and permanent errors
                (a bug or a broken provider file): the process stops, and the notification is
                attempted again after the restart.
        """
        note = self.get_or_none(aggregate_id)
        if not isinstance(note, Notification) or note.state in FINAL:
            return
        bucket = self.get_or_none(bucket_uuid(note.user_id, note.channel))
        if bucket is None:
            bucket = Bucket(user_id=note.user_id, channel=note.channel)
        spec = self.config.bucket
        now = self.clock()
        if self._queue(aggregate_id, bucket, now):  # not dropped, not failed: waits for its slot
            return
        wait = wait_ms(spec, bucket.tat, now)
        if wait > 0:  # its slot came early (a clock step): look again when the token comes
            self._slots[aggregate_id] = now + wait
            self._set_deadline(aggregate_id, now + wait)
            return
        attempt = note.attempts + 1
        bucket.token_taken(at_ms=now, tat=take(spec, bucket.tat, now), notification_id=note.notification_id)
        note.attempt_started(attempt=attempt, at_ms=now, deadline_ms=now)
        self.commit(note, bucket)  # step 1: durable before the call
        request = note.request
        try:
            result = self.provider.send(
                idempotency_key=note.notification_id,
                user_id=note.user_id,
                channel=note.channel,
                template=str(request.get("template") or ""),
                params=dict(request.get("params") or {}),
            )
        except ProviderTransient as exc:
            answered = self.clock()
            if attempt >= self.config.max_attempts:
                detail = f"gave up after {attempt} attempts: {exc.detail}"
                self._fail(note, attempt, exc.reason, detail, answered)
            else:
                pause = (
                    exc.retry_after_ms if exc.retry_after_ms is not None else self.config.backoff_ms(attempt)
                )
                note.retry_scheduled(
                    attempt=attempt, reason=exc.reason, retry_after_ms=exc.retry_after_ms, detail=exc.detail,
                    deadline_ms=answered + pause,
                )  # fmt: skip
        except ProviderRejected as exc:
            self._fail(note, attempt, exc.reason, exc.detail, self.clock())
        else:
            at = self.clock()
            fields = {
                "provider": self.provider.name,
                "provider_message_id": result.message_id,
                "attempt": attempt,
            }
            note.sent(
                attempt=attempt, message_id=result.message_id, replayed=result.replayed, at_ms=at,
                outbox=[self._final(note, SENT_EVENT, at, fields)], deadline_ms=None,
            )  # fmt: skip
        self.commit(note)  # step 3

    def _queue(self, aggregate_id: UUID, bucket: Bucket, now: int) -> bool:
        """Give a notification that looks for a token for the first time (or again, after a
        transient failure or a restart) the next free slot of its bucket, after those handed out
        before: waiting notifications of one bucket go in the order they came, and each timer
        fires once per slot. Returns True when the slot is in the future (the timer is set)."""
        if self._slots.pop(aggregate_id, None) is not None:
            return False  # its slot has come
        spec = self.config.bucket
        queued = max(self._queued_tat.get(bucket.id, 0.0), bucket.tat)
        slot = max(now, int(math.ceil(queued - spec.tolerance_ms)))
        self._queued_tat[bucket.id] = max(queued, float(slot)) + spec.interval_ms
        if slot <= now:
            return False
        self.delays += 1
        self._slots[aggregate_id] = slot
        self._set_deadline(aggregate_id, slot)
        return True

    def _fail(self, note: Notification, attempt: int, reason: str, detail: str, at: int) -> None:
        fields = {"reason": reason, "retryable": False, "retry_after_ms": None, "attempt": attempt,
                  "detail": detail}  # fmt: skip
        note.failed(
            attempt=attempt, reason=reason, detail=detail, at_ms=at,
            outbox=[self._final(note, FAILED_EVENT, at, fields)], deadline_ms=None,
        )  # fmt: skip

    def _final(self, note: Notification, event_type: str, at: int, fields: dict[str, Any]) -> dict[str, Any]:
        request = note.request
        payload = {
            "event_id": stable_id(note.notification_id, event_type),
            "notification_id": note.notification_id,
            "user_id": note.user_id,
            "occurred_at": int(at),
            "channel": note.channel,
            **fields,
        }
        return outbox_message(
            topic=TOPIC, event_type=event_type, key=note.user_id, payload=payload, time_ms=at,
            correlation_id=request.get("correlation_id"), causation_id=request.get("event_id"),
        )  # fmt: skip


# -- counts that reconcile ----------------------------------------------------------------------
_REQUESTED_T = get_topic(Notification.Requested)  # type: ignore[attr-defined]
_ATTEMPT_T = get_topic(Notification.AttemptStarted)  # type: ignore[attr-defined]
_RETRY_T = get_topic(Notification.RetryScheduled)  # type: ignore[attr-defined]
_SENT_T = get_topic(Notification.Sent)  # type: ignore[attr-defined]
_FAILED_T = get_topic(Notification.Failed)  # type: ignore[attr-defined]


class NotificationCounts:
    """``requested``, ``sent``, ``failed``, ``attempts``, ``retries`` (transient failures) and
    ``replayed`` (sends the provider answered from an earlier delivery) counted from the relay's
    notification log, so they survive restarts; ``pending = requested - sent - failed``.
    :meth:`follow` runs on the application's thread; :meth:`snapshot` from any thread."""

    def __init__(self, page: int = 5_000) -> None:
        self.page = page
        self.position = 0
        self._lock = threading.Lock()
        self._counts = {"requested": 0, "sent": 0, "failed": 0, "attempts": 0, "retries": 0, "replayed": 0}

    def follow(self, app: Any) -> int:
        """Count what was recorded after :attr:`position`; returns how many events were read."""
        topics = [_REQUESTED_T, _ATTEMPT_T, _RETRY_T, _SENT_T, _FAILED_T]
        last = int(app.recorder.max_notification_id() or 0)
        read = 0
        names = {_REQUESTED_T: "requested", _ATTEMPT_T: "attempts", _RETRY_T: "retries", _SENT_T: "sent",
                 _FAILED_T: "failed"}  # fmt: skip
        while self.position < last:
            notes = app.recorder.select_notifications(
                start=self.position + 1, limit=self.page, stop=last, topics=topics
            )
            with self._lock:
                for n in notes:
                    self._counts[names[n.topic]] += 1
                    if n.topic == _SENT_T and app.mapper.to_domain_event(n).replayed:
                        self._counts["replayed"] += 1
            read += len(notes)
            self.position = int(notes[-1].id) if len(notes) == self.page else last
        return read

    def snapshot(self) -> dict[str, int]:
        """The counts now, with ``pending``."""
        with self._lock:
            out = dict(self._counts)
        out["pending"] = out["requested"] - out["sent"] - out["failed"]
        return out


class _NotificationMetrics(Collector):
    """``backbeat_notifications_{requested,sent,failed}_total``, ``backbeat_notifications_pending``,
    ``backbeat_notification_attempts_total``, ``backbeat_notification_retries_total``,
    ``backbeat_notification_waits_total`` (waits for a token since this process started)."""

    def __init__(self, loop: RelayLoop) -> None:
        self.loop = loop

    def collect(self) -> Any:
        counts = self.loop.counts.snapshot()
        for name in ("requested", "sent", "failed"):
            family = CounterMetricFamily(f"backbeat_notifications_{name}", f"Notifications {name}.")
            family.add_metric([], counts[name])
            yield family
        pending = GaugeMetricFamily("backbeat_notifications_pending", "Requested, not yet sent nor failed.")
        pending.add_metric([], counts["pending"])
        yield pending
        for name, value, text in (
            ("attempts", counts["attempts"], "Provider calls started."),
            ("retries", counts["retries"], "Transient provider failures retried later."),
            ("waits", self.loop.waits(), "Times a notification waited for a token (this process)."),
        ):
            family = CounterMetricFamily(f"backbeat_notification_{name}", text)
            family.add_metric([], value)
            yield family


# -- the process --------------------------------------------------------------------------------
def provider_file(settings: Any) -> Path:
    """The provider simulator's SQLite file: ``<data_dir>/notifications/provider.sqlite``."""
    return Path(settings.data_dir) / "notifications" / "provider.sqlite"


def build_relay(settings: Any, provider: NotificationProvider, config: RelayConfig) -> NotificationRelay:
    """The relay on its event store (:func:`sagas.eventstore.eventstore_env`, application
    ``NotificationRelay``).

    Raises:
        eventsourcing.persistence.PersistenceError: the event store cannot be opened.
    """
    from sagas.eventstore import eventstore_env, open_application

    return open_application(
        lambda: NotificationRelay(
            eventstore_env(settings, NotificationRelay.name), provider=provider, config=config
        )
    )


class RelayLoop:
    """The relay's loop for :class:`infra.lifecycle.LoopService`: opens the provider and the
    event store on its own thread, counts, runs a :class:`ProcessRunner` until :meth:`stop`."""

    def __init__(self, settings: Any, config: RelayConfig, provider_config: ProviderConfig,
                 provider_path: Path | None = None) -> None:  # fmt: skip
        self.settings = settings
        self.config = config
        self.provider_config = provider_config
        self.provider_path = provider_path or provider_file(settings)
        self.counts = NotificationCounts()
        self.runner: ProcessRunner | None = None
        self.app: NotificationRelay | None = None
        self._counted = False
        self._stop = threading.Event()
        self._seen = (-1, -1)

    def waits(self) -> int:
        """Token waits of this process."""
        return self.app.delays if self.app is not None else 0

    def observe(self) -> metrics.Observation:
        """The ``notification-relay`` component (any thread; copies only): the runner's
        counters plus ``backbeat_saga_states{saga_type="notification"}`` by state and the
        reconciling counts in ``detail``."""
        runner = self.runner
        if runner is None:
            return metrics.Observation(ready=False, detail={"phase": "opening the event store"})
        obs = runner.observation()
        counts = self.counts.snapshot()
        obs.saga_states = {("notification", s): counts[s] for s in ("sent", "failed", "pending")}
        obs.ready = obs.ready and self._counted
        obs.detail = {**obs.detail, **counts, "waits": self.waits()}
        return obs

    def run(self) -> RunStats:
        """Run until :meth:`stop`; returns the stats.

        Raises:
            infra.errors.InfraError: the broker or registry cannot be reached, or the broker lost
                the log the event store has applied.
        """
        provider = ProviderSimulator(self.provider_path, self.provider_config)
        app = build_relay(self.settings, provider, self.config)
        self.app = app
        try:
            runner = ProcessRunner(app, self.settings, name=PROCESS, component=COMPONENT,
                                   on_round=lambda s: self._on_round(app, s))  # fmt: skip
            self.runner = runner
            if self._stop.is_set():
                runner.stop()
            self._check_log(app)
            self.counts.follow(app)
            self._counted = True
            log.info("notification relay: %s; bucket %d tokens, %.3g/s per user and channel; provider %s",
                     self.counts.snapshot(), self.config.bucket.capacity, self.config.bucket.refill_per_s,
                     self.provider_path)  # fmt: skip
            stats = runner.run(until=lambda _s: self._stop.is_set())
            log.info("notification relay stopped: %s", self.counts.snapshot())
            return stats
        finally:
            app.close()
            provider.close()

    def _check_log(self, app: NotificationRelay) -> None:
        """Refuse to start on an event store that applied more of the topic than it holds (the
        embedded broker restarted empty), saying what to do for the relay.

        Raises:
            infra.errors.InfraError: the store is ahead of the topic.
        """
        from events.offsets import high_watermarks
        from infra.errors import InfraError

        for p, high in high_watermarks(self.settings, TOPIC).items():
            applied = app.next_offset(TOPIC, p)
            if applied > high:
                raise InfraError(
                    f"{PROCESS}: its event store has applied {TOPIC}[{p}] up to offset {applied}, but the "
                    f"topic ends at {high}: the broker lost its log (the embedded broker keeps topics in "
                    "memory). Run 'backbeat notifications reset --yes' to start the relay afresh."
                )

    def _on_round(self, app: NotificationRelay, stats: RunStats) -> None:
        seen = (stats.applied, stats.timers_fired)
        if seen != self._seen:
            self._seen = seen
            self.counts.follow(app)

    def stop(self) -> None:
        """Ask the loop to end after the round in flight (any thread)."""
        self._stop.set()
        if self.runner is not None:
            self.runner.stop()


def reset_relay(settings: Any) -> list[str]:
    """Delete the relay's event store, the provider simulator's record, the new-release
    requester's positions and the ``notifications`` read model (after the embedded broker lost
    its log, or to start afresh). Returns what was removed."""
    from projections.tracking import reset as reset_projection
    from sagas.eventstore import reset_eventstore
    from sagas.new_releases import positions_file

    removed = reset_eventstore(settings, [NotificationRelay.name])
    base = provider_file(settings)
    for path in (base, base.with_name(base.name + "-wal"), base.with_name(base.name + "-shm"),
                 positions_file(settings)):  # fmt: skip
        if path.exists():
            path.unlink()
            removed.append(str(path))
    if Path(settings.duckdb_path).exists():
        reset_projection(settings, ["notifications"])
        removed.append("read model notifications")
    return removed


def _env_number(name: str, default: float, cast: Callable[[str], float]) -> float:
    import os

    from infra.errors import ConfigError

    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        return cast(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not a number") from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The relay's options (also used by ``backbeat notifications relay``)."""
    parser.add_argument(
        "--capacity",
        type=int,
        default=None,
        help=f"tokens per user and channel (BACKBEAT_NOTIFY_CAPACITY, default {DEFAULT_CAPACITY})",
    )
    parser.add_argument(
        "--refill-per-s",
        type=float,
        default=None,
        help=f"tokens added per second (BACKBEAT_NOTIFY_REFILL_PER_S, default {DEFAULT_REFILL_PER_S})",
    )
    parser.add_argument(
        "--max-attempts",
        type=int,
        default=None,
        help=f"provider calls before giving up (BACKBEAT_NOTIFY_MAX_ATTEMPTS, "
        f"default {DEFAULT_MAX_ATTEMPTS})",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the provider simulator's faults")
    parser.add_argument("--invalid-address", type=float, default=0.02, help="share of notifications rejected")
    parser.add_argument("--unsubscribed", type=float, default=0.01, help="share of recipients unsubscribed")
    parser.add_argument("--throttle", type=float, default=0.05, help="share of calls answered 429")
    parser.add_argument("--error", type=float, default=0.02, help="share of calls answered 503")
    parser.add_argument(
        "--lost-answer", type=float, default=0.02, help="share of deliveries whose answer is lost"
    )
    parser.add_argument("--retry-after-min-ms", type=int, default=100, help="smallest Retry-After hint (ms)")
    parser.add_argument("--retry-after-max-ms", type=int, default=400, help="largest Retry-After hint (ms)")
    parser.add_argument(
        "--provider-db",
        type=Path,
        default=None,
        help="provider simulator SQLite file (default <data_dir>/notifications/provider.sqlite)",
    )
    # fmt: skip


def configs_from_args(args: argparse.Namespace) -> tuple[RelayConfig, ProviderConfig]:
    """The relay and provider configuration of parsed options (+ ``BACKBEAT_NOTIFY_*``).

    Raises:
        infra.errors.ConfigError: a ``BACKBEAT_NOTIFY_*`` value is not a number.
        ValueError: a value out of range (rates outside [0, 1], capacity < 1, …).
    """
    capacity = (
        args.capacity
        if args.capacity is not None
        else int(_env_number("BACKBEAT_NOTIFY_CAPACITY", DEFAULT_CAPACITY, int))
    )
    refill = (
        args.refill_per_s
        if args.refill_per_s is not None
        else _env_number("BACKBEAT_NOTIFY_REFILL_PER_S", DEFAULT_REFILL_PER_S, float)
    )
    attempts = args.max_attempts if args.max_attempts is not None else int(
        _env_number("BACKBEAT_NOTIFY_MAX_ATTEMPTS", DEFAULT_MAX_ATTEMPTS, int))  # fmt: skip
    relay = RelayConfig(bucket=BucketSpec(capacity, refill), max_attempts=attempts)
    provider = ProviderConfig(
        seed=args.seed, invalid_address=args.invalid_address, unsubscribed=args.unsubscribed,
        throttle=args.throttle, error=args.error, lost_answer=args.lost_answer,
        retry_after_min_ms=args.retry_after_min_ms, retry_after_max_ms=args.retry_after_max_ms,
    )  # fmt: skip
    return relay, provider


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m sagas.notifications`` (and ``backbeat notifications relay``):
    run the relay under the one lifecycle (process ``notification-relay``, ``/metrics`` and
    ``/health`` on ``--ops-port`` / ``BACKBEAT_OPS_PORT``, default 9465) until SIGTERM/SIGINT.
    Returns the exit status: 0; 1 when the loop failed; 2 for bad options or settings."""
    from events.offsets import high_watermarks
    from infra.errors import ConfigError
    from infra.lifecycle import LoopService, run_process
    from infra.logs import setup_logging
    from infra.ops import add_port_argument, port_setting
    from infra.settings import Settings

    parser = argparse.ArgumentParser(
        prog="python -m sagas.notifications", description=__doc__.split("\n\n")[0]
    )
    add_arguments(parser)
    add_port_argument(parser, PROCESS)
    args = parser.parse_args(argv)
    try:
        setup_logging(PROCESS)
        ops_port = port_setting(PROCESS, args.ops_port)
        settings = Settings.from_env()
        relay_config, provider_config = configs_from_args(args)
    except (ConfigError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    loop = RelayLoop(settings, relay_config, provider_config, args.provider_db)
    collector = _NotificationMetrics(loop)
    metrics.register(COMPONENT, loop.observe)
    metrics.REGISTRY.register(collector)
    try:
        return run_process(
            PROCESS, [LoopService(COMPONENT, loop.run, loop.stop)], ops_port=ops_port,
            run_dir=settings.run_dir,
            high_watermarks=lambda topic: high_watermarks(settings, topic),
        )  # fmt: skip
    finally:
        metrics.unregister(COMPONENT)
        metrics.REGISTRY.unregister(collector)


if __name__ == "__main__":
    raise SystemExit(main())
