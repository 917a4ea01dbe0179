"""Agents inside a Faust worker: each :class:`~streams.runtime.runner.AgentRunner` runs on its own
thread, owned by an :class:`AgentService` (an :class:`infra.lifecycle.LoopService`, the one
loop-service class of every backbeat process) that the Faust app starts and stops, so
``faust -A streams.app worker`` and ``backbeat worker`` start, stop (SIGTERM/SIGINT: ``/health``
says ``stopping``, then the batch in flight is checkpointed) and log them like any other
backbeat loop.

Faust provides the worker (command line, signals, logging, the service tree, timers); the
runtime provides consuming, state and checkpoints. The app's boot strategy therefore leaves out
Faust's own Kafka consumer and producer (``BootStrategy.enable_kafka_consumer = False``, the
public switch faust-streaming documents for apps that bring their own): no Faust consumer group
is joined and no Faust table is recovered. It leaves out Faust's web server too
(``enable_web = False``): ``/metrics`` and ``/health`` are served by
:class:`infra.lifecycle.OpsService` like in every other process, and Faust's own pages (port
6066) would show nothing of the runtime's agents. Nothing here touches a private Faust or
aiokafka attribute (:mod:`streams.runtime.pins` lists what is relied on, with a test per item).
"""

from __future__ import annotations

from typing import Any

from faust.app.base import BootStrategy

from infra.errors import BackbeatError
from infra.lifecycle import LoopService
from streams.runtime.runner import AgentRunner


class AgentFailed(BackbeatError):
    """An agent's runner ended by itself: an error it already logged with its traceback, or it
    returned without being asked to stop. The worker stops (exit status 1; a supervisor
    restarts it), so nothing half-runs."""


class AgentService(LoopService):
    """Runs one :class:`AgentRunner` on a thread for the life of the service (component
    ``agent:<name>`` in ``/metrics`` and ``/health``); a runner that dies of an error stops the
    whole worker."""

    def __init__(self, runner: AgentRunner, **kwargs: Any) -> None:
        self.runner = runner
        super().__init__(runner.component, self._run_runner, runner.stop, **kwargs)

    def _run_runner(self) -> None:
        self.runner.run()
        if self.runner.stopping:
            return
        failure = self.runner.failure
        raise AgentFailed(
            f"the runner of {self.runner.agent.name} ended: {failure!r}; stopping the worker"
            if failure is not None
            else f"the runner of {self.runner.agent.name} ended by itself; stopping the worker"
        ) from failure


class RuntimeBoot(BootStrategy):
    """Faust's services minus its Kafka consumer and producer and its web server (module
    docstring)."""

    enable_kafka_consumer = False
    enable_kafka_producer = False
    enable_web = False


__all__ = ["AgentFailed", "AgentService", "RuntimeBoot"]
