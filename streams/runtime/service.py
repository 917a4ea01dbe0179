"""Agents inside a Faust worker: each :class:`~streams.runtime.runner.AgentRunner` runs on its own
thread, owned by a mode ``Service`` of the Faust app, so ``faust -A streams.app worker`` and
``backbeat worker`` start, stop (SIGTERM/SIGINT: the batch in flight is checkpointed first) and
log them like any Faust service.

Faust provides the worker (command line, signals, logging, the service tree, timers); the
runtime provides consuming, state and checkpoints. The app's boot strategy therefore leaves out
Faust's own Kafka consumer and producer (``BootStrategy.enable_kafka_consumer = False``, the
public switch faust-streaming documents for apps that bring their own): no Faust consumer group
is joined and no Faust table is recovered. Nothing here touches a private Faust or aiokafka
attribute (:mod:`streams.runtime.pins` lists what is relied on, with a test per item).
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import faust
from faust.app.base import BootStrategy

from streams.runtime.runner import AgentRunner


class AgentService(faust.Service):
    """Runs one :class:`AgentRunner` on a thread for the life of the service; a runner that dies
    of an error stops the whole worker (a supervisor restarts it), so nothing half-runs."""

    def __init__(self, runner: AgentRunner, **kwargs: Any) -> None:
        self.runner = runner
        self._thread: threading.Thread | None = None
        super().__init__(**kwargs)

    @property
    def label(self) -> str:
        """The agent's name (mode's log prefix)."""
        return f"Agent {self.runner.agent.name}"

    @property
    def shortlabel(self) -> str:
        """The agent's name (mode's short log prefix)."""
        return self.runner.agent.name

    async def on_start(self) -> None:
        """Start the runner's thread."""
        self._thread = threading.Thread(
            target=self.runner.run, name=f"agent-{self.runner.agent.name}", daemon=True
        )
        self._thread.start()

    async def on_started(self) -> None:
        """Watch the runner: stop the worker if it dies of an error."""
        self.add_future(self._watch())

    async def _watch(self) -> None:
        while not self.should_stop:
            await self.sleep(0.5)
            thread = self._thread
            if thread is not None and not thread.is_alive() and not self.runner.stopping:
                self.log.error("runner of %s ended: %r; stopping the worker", self.runner.agent.name,
                               self.runner.failure)  # fmt: skip
                await self.crash(self.runner.failure or RuntimeError("agent runner ended"))
                return

    async def on_stop(self) -> None:
        """Ask the runner to stop and wait for it (the batch in flight is checkpointed first)."""
        self.runner.stop()
        thread = self._thread
        if thread is not None:
            await asyncio.to_thread(thread.join, 120.0)


class RuntimeBoot(BootStrategy):
    """Faust's services minus its Kafka consumer and producer (module docstring)."""

    enable_kafka_consumer = False
    enable_kafka_producer = False


__all__ = ["AgentService", "RuntimeBoot"]
