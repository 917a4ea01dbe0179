"""The Faust app that hosts backbeat's stream agents (``faust -A streams.app worker -l info``,
or ``backbeat worker``).

:func:`create_app` is the explicit factory: it builds the app for given settings and agent
configurations and registers the chosen agents, each as a
:class:`streams.runtime.service.AgentService` running on the shared runtime
(:mod:`streams.runtime`). Importing this module registers nothing; the module attribute ``app``
(what Faust's ``-A streams.app`` looks up) is built on first access from the environment
(``BACKBEAT_*``, :class:`streams.config.IngestConfig`).

The agent groups (``BACKBEAT_STREAMS_AGENTS``, default all): ``ingest`` (listening ingest,
:mod:`streams.ingest`), ``features`` (the user- and track-features agents,
:mod:`streams.features`), ``ads`` (ad reporting, :mod:`streams.ads`), ``playback`` (listening
from playback: player events → listens, :mod:`streams.playback`), ``ledger`` (payments →
``billing.ledger``, :mod:`streams.ledger`). On first start the
worker creates the topics its agents need that are missing, exactly as ``backbeat topics
apply`` does (Faust itself never creates topics), and applies :func:`infra.runtime.tune_gc`.

Operations (the shape of every backbeat process, :mod:`infra.lifecycle`): the app's
``logging_config`` is :func:`infra.logs.logging_config` (process ``worker``), so Faust's, mode's
and the agents' lines come out through the one setup (``BACKBEAT_LOG_FORMAT``,
``BACKBEAT_LOG_LEVEL``; Faust's ``-l`` is superseded by ``BACKBEAT_LOG_LEVEL``); the app runs
:class:`infra.lifecycle.OpsService` (``/metrics``, ``/health``; port ``--ops-port`` /
``BACKBEAT_OPS_PORT`` / 9460, address in ``<data_dir>/run/worker.ops.json``) with one component
``agent:<name>`` per agent (:meth:`streams.runtime.runner.AgentRunner.observe`). ``/health`` is
200 once every agent has restored its partitions and read up to the high watermarks that stood
at its assignment. Faust's own web server (port 6066) is never started
(:class:`streams.runtime.service.RuntimeBoot`).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import faust

from events.catalog import TopicSpec
from events.offsets import high_watermarks
from infra import logs, metrics, ops
from infra.errors import ConfigError
from infra.lifecycle import OpsService
from infra.provision import apply_topics
from infra.runtime import tune_gc
from infra.settings import Settings
from streams.config import IngestConfig
from streams.features_config import FeaturesConfig
from streams.runtime.agent import BatchAgent
from streams.runtime.runner import AgentRunner, RunnerConfig, group_id
from streams.runtime.service import AgentService, RuntimeBoot

log = logging.getLogger(__name__)

#: The process name of the worker (log lines, ``/metrics``, ``infra.ops.DEFAULT_PORTS``).
PROCESS = "worker"


class BackbeatApp(faust.App):
    """The Faust app of the agents: Faust's worker and service tree without its Kafka consumer
    and producer (:class:`streams.runtime.service.RuntimeBoot`); the agents bring their own."""

    BootStrategy = RuntimeBoot

    def __init__(
        self, app_id: str, settings: Settings, config: IngestConfig, ops_port: int | None = None, **conf: Any
    ) -> None:
        super().__init__(app_id, **conf)
        self.backbeat_settings = settings
        self.ingest_config = config
        self.agent_services: list[AgentService] = []
        self.topic_specs: list[TopicSpec] = []
        self.log_level = "INFO"  # the level of ``logging_config`` (create_app sets it)
        #: ``/metrics`` and ``/health``; registered first, so it starts before the agents and
        #: stops after them (``/health`` says ``stopping`` while they finish their batches).
        self.ops_service = OpsService(PROCESS, ops_port, settings.run_dir)
        self.service(self.ops_service)

    def add_agent(self, agent: BatchAgent, specs: list[TopicSpec]) -> AgentService:
        """Register ``agent`` (started and stopped with the app) and the topics it needs."""
        c = self.ingest_config
        config = RunnerConfig(
            group_id=group_id(c.app_id, agent.name),
            batch=c.batch,
            within_s=c.batch_within_s,
            stats_interval_s=c.stats_interval_s,
            fetch_wait_ms=c.fetch_wait_ms,
            stall_after_s=c.stall_after_s,
        )
        service = AgentService(AgentRunner(agent, self.backbeat_settings, config), loop=self.loop)
        self.agent_services.append(service)
        self.topic_specs += [s for s in specs if s.name not in {t.name for t in self.topic_specs}]
        self.service(service)
        return service

    async def on_first_start(self) -> None:
        """Create the agents' missing topics (idempotent; drift is reported in the log)."""
        Path(self.conf.datadir).mkdir(parents=True, exist_ok=True)
        tune_gc()
        await super().on_first_start()
        reports = await asyncio.to_thread(apply_topics, self.backbeat_settings, self.topic_specs)
        for report in reports:
            if report.action == "drift":
                self.log.warning("topic %s drifted from the catalogue: %s", report.name, report.detail)


def _ingest(app: BackbeatApp) -> None:
    from streams.ingest import ListenIngest

    config = app.ingest_config
    app.add_agent(ListenIngest(config, app.backbeat_settings.session_gap_ms), config.topic_specs())


def _features(app: BackbeatApp) -> None:
    from streams.features import TrackFeatures, UserFeatures

    features = FeaturesConfig.from_env()
    config = app.ingest_config
    partitions = config.topic_specs()[0].partitions
    specs = config.topic_specs()[:1] + features.topic_specs(config.app_id, partitions)
    gap = app.backbeat_settings.session_gap_ms
    app.add_agent(UserFeatures(features, config, gap, partitions), specs)
    app.add_agent(TrackFeatures(features, config, partitions), [])


def _ads(app: BackbeatApp) -> None:
    from streams.ads import AdReporting, AdsConfig

    ads = AdsConfig.from_env()
    app.add_agent(AdReporting(ads, app.ingest_config.app_id), ads.topic_specs(app.ingest_config.app_id))


def _playback(app: BackbeatApp) -> None:
    from streams.playback import ListeningFromPlayback
    from streams.playback_config import PlaybackConfig

    playback = PlaybackConfig.from_env()
    app_id = app.ingest_config.app_id
    specs = playback.topic_specs(app_id)
    app.add_agent(ListeningFromPlayback(playback, app_id, specs[0].partitions), specs)


def _ledger(app: BackbeatApp) -> None:
    from streams.ledger import LedgerConfig, build_agent

    ledger = LedgerConfig.from_env()
    app_id = app.ingest_config.app_id
    app.add_agent(build_agent(app.backbeat_settings, app_id, ledger), ledger.topic_specs(app_id))


#: The agent groups a worker can run, by ``BACKBEAT_STREAMS_AGENTS`` name: one way to register.
AGENT_GROUPS: dict[str, Callable[[BackbeatApp], None]] = {
    "ingest": _ingest,
    "features": _features,
    "ads": _ads,
    "playback": _playback,
    "ledger": _ledger,
}


def create_app(
    settings: Settings | None = None,
    config: IngestConfig | None = None,
    *,
    ops_port: str | int | None = None,
    log_level: str | None = None,
) -> BackbeatApp:
    """The app (not started) for ``settings`` and ``config`` (default: the environment), with
    the agent groups ``config.agents`` registered.

    ``ops_port``: the ``--ops-port`` option (:func:`infra.ops.port_setting`: default
    ``BACKBEAT_OPS_PORT``, else 9460; ``off``: no endpoint); ``log_level``: the level of the
    worker's logging (default ``BACKBEAT_LOG_LEVEL``, INFO). Names this process ``worker`` in
    log lines and metrics.

    Raises:
        ConfigError: a malformed ``BACKBEAT_*`` variable or ops port.
    """
    settings = settings or Settings.from_env()
    config = config or IngestConfig.from_env()
    port = ops.port_setting(PROCESS, None if ops_port is None else str(ops_port))
    level = (log_level or logs.log_level()).upper()
    if not isinstance(logging.getLevelName(level), int):
        raise ConfigError(f"log level {level!r}: use DEBUG, INFO, WARNING, ERROR or CRITICAL")
    logs.set_process(PROCESS)
    metrics.set_process(PROCESS, lambda topic: high_watermarks(settings, topic))
    app = BackbeatApp(
        config.app_id,
        settings,
        config,
        port,
        logging_config=logs.logging_config(level),
        broker=[f"kafka://{hp.strip()}" for hp in settings.bootstrap_servers.split(",") if hp],
        datadir=str(settings.data_dir / "faust" / config.app_id),
        web_enabled=False,
        web_bind="127.0.0.1",  # faust's CLI turns the web server on unless --without-web
        web_host="127.0.0.1",
        topic_allow_declare=False,
    )
    app.log_level = level
    for group in config.agents:
        AGENT_GROUPS[group](app)
    return app


def run_worker(app: BackbeatApp) -> None:
    """Run a Faust worker for ``app`` in this process until stopped (``backbeat worker``); its
    logging is the app's ``logging_config`` (:func:`create_app`)."""
    from faust.worker import Worker

    Worker(app, loglevel=app.log_level).execute_from_commandline()


_app: BackbeatApp | None = None


def __getattr__(name: str) -> Any:
    """``streams.app.app``: the app of the environment, built on first access (Faust's ``-A``)."""
    global _app
    if name == "app":
        if _app is None:
            _app = create_app()
        return _app
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["AGENT_GROUPS", "BackbeatApp", "create_app", "run_worker"]
