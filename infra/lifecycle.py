"""The one lifecycle of every long-running backbeat process: mode services run by a mode worker.

mode (the service library Faust is built on, installed with it) gives each process the same
shape, the one ``faust worker`` already has:

- **start**: the worker applies the one logging setup (:func:`infra.logs.logging_config`),
  starts :class:`OpsService` (``/metrics`` and ``/health``, :mod:`infra.ops`) and then the
  process's work, each loop a :class:`LoopService` running a blocking loop on its own thread
  (librdkafka, DuckDB and SQLite calls block; uvicorn's server for the HTTP API), or a
  :class:`WebAppService` (the schema registry's aiohttp app);
- **ready**: ``/health`` answers 200 once every component reports ``ready`` (caught up after
  the (re)start; each component decides, see :class:`infra.metrics.Observation`);
- **stop**: SIGTERM or SIGINT (mode's signal handlers) marks ``/health`` ``stopping``, asks
  each loop to stop, waits for the batch in flight to finish, then stops the ops server; a
  loop that ends by itself (``--until-caught-up``) stops the process the same way; a loop that
  dies of an error stops it with exit status 1 and the error logged.

:func:`run_process` is what each process's ``main`` calls. The Faust worker (``backbeat worker``)
is a mode worker already: it adds :class:`OpsService` to the app and uses the same logging dict
(:mod:`streams.app`).
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import mode

from infra import logs, metrics, ops
from infra.errors import BackbeatError

log = logging.getLogger("backbeat.lifecycle")

#: Seconds a loop gets to finish its batch in flight after being asked to stop.
STOP_TIMEOUT_S = 120.0


class LoopService(mode.Service):
    """Runs ``run()`` on a thread for the life of the service; ``stop()`` asks it to end.

    When ``run`` returns by itself the process stops (``on_done``); when it raises, the error
    is logged (a :class:`~infra.errors.BackbeatError` as its message, a ``SystemExit`` from a
    library as its status, anything else with its traceback) and the process stops with
    status 1, so nothing half-runs. ``result`` holds what ``run`` returned, ``failure`` what it
    raised.
    """

    def __init__(self, name: str, run: Callable[[], Any], stop: Callable[[], None], **kwargs: Any) -> None:
        self.loop_name = name
        self._run = run
        self._stop_loop = stop
        self.result: Any = None
        self.failure: BaseException | None = None
        self.stopping = False
        self.on_done: Callable[[], Awaitable[None]] | None = None
        self._thread: threading.Thread | None = None
        super().__init__(**kwargs)

    @property
    def label(self) -> str:
        """The loop's name (mode's log prefix)."""
        return self.loop_name

    @property
    def shortlabel(self) -> str:
        """The loop's name (mode's short log prefix)."""
        return self.loop_name

    def _target(self) -> None:
        try:
            self.result = self._run()
        except BaseException as exc:  # reported by _watch on the event loop
            self.failure = exc

    async def on_start(self) -> None:
        """Start the loop's thread."""
        self._thread = threading.Thread(target=self._target, name=f"bb-{self.loop_name}", daemon=True)
        self._thread.start()

    async def on_started(self) -> None:
        """Watch the thread: stop the process when it ends."""
        self.add_future(self._watch())

    async def _watch(self) -> None:
        while not self.should_stop:
            await self.sleep(0.1)
            thread = self._thread
            if thread is None or thread.is_alive() or self.stopping:
                continue
            if self.failure is not None:
                if isinstance(self.failure, BackbeatError):
                    log.error("%s: %s", self.loop_name, self.failure)
                elif isinstance(self.failure, SystemExit):  # the library said why before exiting
                    log.error("%s exited with status %s", self.loop_name, self.failure.code)
                else:
                    log.error("%s ended with an error", self.loop_name, exc_info=self.failure)
                await self.crash(self.failure)
            elif self.on_done is not None:
                await self.on_done()
            return

    async def on_stop(self) -> None:
        """Mark ``/health`` stopping, ask the loop to stop and wait for it."""
        ops.mark_stopping()
        self.stopping = True
        self._stop_loop()
        thread = self._thread
        if thread is not None:
            await asyncio.to_thread(thread.join, STOP_TIMEOUT_S)
            if thread.is_alive():
                log.error("%s did not stop within %.0f s", self.loop_name, STOP_TIMEOUT_S)


class OpsService(mode.Service):
    """Serves ``/metrics`` and ``/health`` (:class:`infra.ops.OpsServer`) for the life of the
    process; writes its address to ``<run_dir>/<process>.ops.json``."""

    def __init__(self, process: str, port: int | None, run_dir: Any = None, **kwargs: Any) -> None:
        self.process = process
        self.port = port
        self.run_dir = run_dir
        self.server: ops.OpsServer | None = None
        super().__init__(**kwargs)

    @property
    def label(self) -> str:
        """mode's log prefix."""
        return "ops"

    async def on_start(self) -> None:
        """Bind and serve (nothing when the port setting is ``off``)."""
        if self.port is None:
            return
        host = os.environ.get("BACKBEAT_OPS_HOST", "127.0.0.1")
        fallback = self.port == ops.DEFAULT_PORTS.get(self.process)
        self.server = ops.OpsServer(host, self.port, fallback=fallback).start()
        if self.run_dir is not None:
            ops.write_address(self.run_dir, self.process, self.server.url)
        log.info("%s: /metrics and /health on %s", self.process, self.server.url)

    async def on_stop(self) -> None:
        """Stop serving."""
        if self.server is not None:
            self.server.stop()
            if self.run_dir is not None:
                (self.run_dir / f"{self.process}.ops.json").unlink(missing_ok=True)


class ProcessWorker(mode.Worker):
    """mode's worker with backbeat's logging (no stdout redirection: commands print results)."""

    def __init__(
        self, process: str, *services: mode.ServiceT, log_level: str | None = None, **kwargs: Any
    ) -> None:
        self.process = process
        super().__init__(
            *services,
            logging_config=logs.logging_config(log_level),
            override_logging=True,
            redirect_stdouts=False,
            daemon=True,
            **kwargs,
        )


class WebAppService(mode.Service):
    """Serves an aiohttp application on ``host:port`` for the life of the service (aiohttp's
    ``AppRunner``/``TCPSite``, the pieces ``web.run_app`` is made of): on stop it stops
    accepting, lets requests in flight finish and runs the app's shutdown and cleanup hooks.

    Raises (from start):
        OSError: the port is taken.
    """

    def __init__(self, name: str, app: Any, host: str, port: int, **kwargs: Any) -> None:
        self.web_name = name
        self.app = app
        self.host = host
        self.port = port
        self._runner: Any = None
        super().__init__(**kwargs)

    @property
    def label(self) -> str:
        """The server's name (mode's log prefix)."""
        return self.web_name

    async def on_start(self) -> None:
        """Bind and serve."""
        from aiohttp import web

        self._runner = web.AppRunner(self.app, handle_signals=False)
        await self._runner.setup()
        await web.TCPSite(self._runner, self.host, self.port).start()

    async def on_stop(self) -> None:
        """Stop accepting, finish requests, run the app's cleanup."""
        ops.mark_stopping()
        if self._runner is not None:
            await self._runner.cleanup()


def run_process(
    process: str,
    services: Sequence[mode.Service],
    *,
    ops_port: int | None,
    run_dir: Any = None,
    high_watermarks: metrics.HighWatermarks | None = None,
    log_level: str | None = None,
) -> int:
    """Run ``services`` (:class:`LoopService`, :class:`WebAppService`, any mode service) as process
    ``process`` until SIGTERM/SIGINT, or until every :class:`LoopService` among them has ended;
    returns the exit status (0, or 1 when a service failed).

    ``ops_port`` (:func:`infra.ops.port_setting`; ``None`` = no separate endpoint, e.g. for an
    HTTP server that serves ``/metrics`` and ``/health`` itself), ``run_dir`` (where the
    endpoint's address is written), ``high_watermarks`` (for ``backbeat_consumer_lag``),
    ``log_level`` (default ``BACKBEAT_LOG_LEVEL``).

    Raises:
        infra.errors.ConfigError: a bad ``BACKBEAT_LOG_*`` setting, or the ops port is taken.
    """
    logs.set_process(process)
    metrics.set_process(process, high_watermarks)
    ops_service = OpsService(process, ops_port, run_dir)
    worker = ProcessWorker(process, ops_service, *services, log_level=log_level)
    loops = [s for s in services if isinstance(s, LoopService)]

    async def done() -> None:
        if all(not (s._thread and s._thread.is_alive()) for s in loops):
            await worker.stop()

    for service in loops:
        service.on_done = done
    try:
        worker.execute_from_commandline()
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        return 1 if any(s.failure is not None for s in loops) or worker.crash_reason else code
    return 0


__all__ = ["STOP_TIMEOUT_S", "LoopService", "OpsService", "ProcessWorker", "WebAppService", "run_process"]
