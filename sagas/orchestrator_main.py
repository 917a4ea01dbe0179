"""``python -m sagas.orchestrator_main``: run the saga orchestrator against the configured
broker and event store until SIGTERM/SIGINT (what ``backbeat sagas run`` and
``backbeat sagas simulate`` start as a process).

It runs under the one process lifecycle (:func:`infra.lifecycle.run_process`, process name
``saga-orchestrator``): one logging setup, ``/metrics`` and ``/health`` on ``--ops-port`` /
``BACKBEAT_OPS_PORT`` (default 9463), SIGTERM/SIGINT stop it after the batch in flight, exit
status 0 (1 when the loop fails: broker or registry unreachable, a broker that lost its log).
Its metrics component ``saga-orchestrator`` reports records in by input topic, commands and
events out by topic, dead letters by reason, registry waits (``retries``), positions, and
``backbeat_saga_states`` from :class:`SagaStateCounts`; it is ready once it has applied every
input record that stood at its start.
"""

from __future__ import annotations

import argparse
import logging
import sys
import threading
from collections.abc import Sequence
from typing import Any
from uuid import UUID

from eventsourcing.utils import get_topic

from events.offsets import high_watermarks
from infra import metrics
from infra.errors import ConfigError
from infra.lifecycle import LoopService, run_process
from infra.logs import setup_logging
from infra.ops import add_port_argument, port_setting
from infra.settings import Settings
from sagas.eventstore import eventstore_env, open_application
from sagas.orchestrator import Orchestrator
from sagas.runner import ProcessRunner, RunStats
from sagas.saga import COMPENSATING, RUNNING, Saga, Timing

log = logging.getLogger("backbeat.sagas.orchestrator")

#: The eventsourcing application name of the orchestrator (its SQLite file / PostgreSQL tables).
APP_NAME = Orchestrator.name
#: Process name (``infra.ops.DEFAULT_PORTS``) and metrics component name.
PROCESS = COMPONENT = "saga-orchestrator"

_STARTED = get_topic(Saga.Started)  # type: ignore[attr-defined]
_COMPENSATION = get_topic(Saga.CompensationStarted)  # type: ignore[attr-defined]
_FINISHED = get_topic(Saga.Finished)  # type: ignore[attr-defined]
_TIMED_OUT = get_topic(Saga.TimedOut)  # type: ignore[attr-defined]


def build_orchestrator(settings: Settings, timing: Timing | None = None) -> Orchestrator:
    """The orchestrator on the configured event store (SQLite under ``data_dir`` by default),
    opened with :func:`sagas.eventstore.open_application` (which waits out another process
    creating the same store at the same moment).

    Raises:
        eventsourcing.persistence.PersistenceError: the event store cannot be opened.
    """
    return open_application(lambda: Orchestrator(eventstore_env(settings, APP_NAME), timing=timing))


class SagaStateCounts:
    """Sagas by ``(kind, state)``, kept in memory by following the orchestrator's notification
    log (only the events that change a state: ``Started``, ``CompensationStarted``,
    ``Finished``, plus ``TimedOut`` to count retried commands).

    :meth:`follow` runs on the thread that owns the application (at start it reads the whole
    log once; then each call reads what was recorded since); :meth:`snapshot` may be called
    from any thread (a scrape) and costs a dict copy. Sagas not yet ended are remembered by id
    (to move their count when they change state); ended ones only as counts.
    """

    def __init__(self, page: int = 5_000) -> None:
        self.page = page
        self.position = 0
        #: Commands sent again after a deadline passed (forward retries and compensation retries).
        self.command_retries = 0
        self._counts: dict[tuple[str, str], int] = {}
        self._live: dict[UUID, tuple[str, str]] = {}
        self._lock = threading.Lock()

    def snapshot(self) -> dict[tuple[str, str], int]:
        """``{(saga kind, state): sagas}`` now (states with no saga left stay, as 0)."""
        with self._lock:
            return dict(self._counts)

    def follow(self, app: Any, *, quiet: bool = False) -> int:
        """Apply the notifications recorded after :attr:`position`; returns how many were read.
        Sagas that end are logged at DEBUG with their ``saga_id`` unless ``quiet``."""
        topics = [_STARTED, _COMPENSATION, _FINISHED, _TIMED_OUT]
        last = int(app.recorder.max_notification_id() or 0)
        read = 0
        while self.position < last:
            notes = app.recorder.select_notifications(
                start=self.position + 1, limit=self.page, stop=last, topics=topics
            )
            with self._lock:
                for note in notes:
                    self._apply(app, note, quiet)
            read += len(notes)
            # fewer than a page: nothing else of interest up to ``last`` (the other events skipped)
            self.position = int(notes[-1].id) if len(notes) == self.page else last
        return read

    def _move(self, saga_id: UUID, kind: str, old: str | None, new: str) -> None:
        if old is not None:
            self._counts[(kind, old)] = self._counts.get((kind, old), 0) - 1
        self._counts[(kind, new)] = self._counts.get((kind, new), 0) + 1
        if new in (RUNNING, COMPENSATING):
            self._live[saga_id] = (kind, new)
        else:
            self._live.pop(saga_id, None)

    def _apply(self, app: Any, note: Any, quiet: bool) -> None:
        saga_id = note.originator_id
        if note.topic == _STARTED:
            event = app.mapper.to_domain_event(note)
            self._move(saga_id, str(event.kind), None, RUNNING)
            return
        if note.topic == _TIMED_OUT:
            if not app.mapper.to_domain_event(note).given_up:
                self.command_retries += 1
            return
        known = self._live.get(saga_id)
        if known is None:  # its start is not in this log (cannot happen with one event store)
            log.warning("saga changed state but its start is unknown", extra={"saga_id": str(saga_id)})
            return
        kind, old = known
        if note.topic == _COMPENSATION:
            self._move(saga_id, kind, old, COMPENSATING)
            if not quiet:
                log.debug("saga compensating", extra={"saga_id": str(saga_id)})
            return
        event = app.mapper.to_domain_event(note)
        self._move(saga_id, kind, old, str(event.state))
        if not quiet:
            log.debug("saga ended %s (%s)%s", event.state, kind, f": {event.reason}" if event.reason else "",
                      extra={"saga_id": str(saga_id)})  # fmt: skip


class OrchestratorLoop:
    """The orchestrator's loop for :class:`infra.lifecycle.LoopService`: builds the application
    on the loop's own thread (an eventsourcing application is used by one thread), runs a
    :class:`ProcessRunner` on it, and reports the ``saga-orchestrator`` metrics component."""

    def __init__(self, settings: Settings, timing: Timing) -> None:
        self.settings = settings
        self.timing = timing
        self.counts = SagaStateCounts()
        self.runner: ProcessRunner | None = None
        self._counted = False
        self._stop = threading.Event()
        self._seen = (-1, -1)

    def observe(self) -> metrics.Observation:
        """The component's :class:`infra.metrics.Observation` (any thread; dict copies only)."""
        runner = self.runner
        if runner is None:
            return metrics.Observation(ready=False, detail={"phase": "opening the event store"})
        obs = runner.observation()
        obs.saga_states = self.counts.snapshot()
        obs.ready = obs.ready and self._counted
        obs.detail = {**obs.detail, "command_retries": self.counts.command_retries}
        return obs

    def run(self) -> RunStats:
        """Open the event store, count the sagas, run until :meth:`stop`; returns the stats.

        Raises:
            infra.errors.InfraError: the broker or registry cannot be reached, or the broker lost
                the log the event store has applied.
        """
        app = build_orchestrator(self.settings, self.timing)
        try:
            runner = ProcessRunner(
                app, self.settings, name=APP_NAME, component=COMPONENT,
                on_round=lambda s: self._on_round(app, s),
            )  # fmt: skip
            self.runner = runner
            if self._stop.is_set():
                runner.stop()
            self.counts.follow(app, quiet=True)
            self._counted = True
            log.info("orchestrator: %d sagas in the event store (%d running or compensating)",
                     sum(self.counts.snapshot().values()), len(self.counts._live))  # fmt: skip
            stats = runner.run(until=lambda _s: self._stop.is_set())
            log.info("orchestrator stopped")
            return stats
        finally:
            app.close()

    def _on_round(self, app: Orchestrator, stats: RunStats) -> None:
        seen = (stats.applied, stats.timers_fired)  # what records new saga events
        if seen != self._seen:
            self._seen = seen
            self.counts.follow(app)

    def stop(self) -> None:
        """Ask the loop to end after the round in flight (any thread)."""
        self._stop.set()
        if self.runner is not None:
            self.runner.stop()


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m sagas.orchestrator_main", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument(
        "--step-timeout-ms",
        type=int,
        default=Timing.step_timeout_ms,
        help="deadline of each command attempt, ms (default %(default)s)",
    )
    parser.add_argument(
        "--max-attempts",
        type=int,
        default=Timing.max_attempts,
        help="tries of a forward step before the saga compensates (default %(default)s)",
    )
    add_port_argument(parser, PROCESS)
    return parser.parse_args(argv)  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m sagas.orchestrator_main``; returns the exit status (0; 1 when
    the loop failed; 2 for a bad ``--ops-port`` or ``BACKBEAT_*`` setting)."""
    args = _parse(argv)
    try:
        setup_logging(PROCESS)
        ops_port = port_setting(PROCESS, args.ops_port)
        settings = Settings.from_env()
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    loop = OrchestratorLoop(settings, Timing(args.step_timeout_ms, args.max_attempts))
    metrics.register(COMPONENT, loop.observe)
    try:
        return run_process(
            PROCESS, [LoopService(COMPONENT, loop.run, loop.stop)], ops_port=ops_port,
            run_dir=settings.run_dir, high_watermarks=lambda topic: high_watermarks(settings, topic),
        )  # fmt: skip
    finally:
        metrics.unregister(COMPONENT)


if __name__ == "__main__":
    raise SystemExit(main())
