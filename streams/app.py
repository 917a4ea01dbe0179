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
:mod:`streams.features`), ``ads`` (ad reporting, :mod:`streams.ads`). On first start the
worker creates the topics its agents need that are missing, exactly as ``backbeat topics
apply`` does (Faust itself never creates topics), and applies :func:`infra.runtime.tune_gc`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import faust

from events.catalog import TopicSpec
from infra.provision import apply_topics
from infra.runtime import tune_gc
from infra.settings import Settings
from streams.config import IngestConfig
from streams.features_config import FeaturesConfig
from streams.runtime.agent import BatchAgent
from streams.runtime.runner import AgentRunner, RunnerConfig, group_id
from streams.runtime.service import AgentService, RuntimeBoot

log = logging.getLogger(__name__)


class BackbeatApp(faust.App):
    """The Faust app of the agents: Faust's worker and service tree without its Kafka consumer
    and producer (:class:`streams.runtime.service.RuntimeBoot`); the agents bring their own."""

    BootStrategy = RuntimeBoot

    def __init__(self, app_id: str, settings: Settings, config: IngestConfig, **conf: Any) -> None:
        super().__init__(app_id, **conf)
        self.backbeat_settings = settings
        self.ingest_config = config
        self.agent_services: list[AgentService] = []
        self.topic_specs: list[TopicSpec] = []

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


#: The agent groups a worker can run, by ``BACKBEAT_STREAMS_AGENTS`` name: one way to register.
AGENT_GROUPS: dict[str, Callable[[BackbeatApp], None]] = {
    "ingest": _ingest,
    "features": _features,
    "ads": _ads,
}


def create_app(settings: Settings | None = None, config: IngestConfig | None = None) -> BackbeatApp:
    """The app (not started) for ``settings`` and ``config`` (default: the environment), with
    the agent groups ``config.agents`` registered.

    Raises:
        ConfigError: a malformed ``BACKBEAT_*`` variable.
    """
    settings = settings or Settings.from_env()
    config = config or IngestConfig.from_env()
    app = BackbeatApp(
        config.app_id,
        settings,
        config,
        broker=[f"kafka://{hp.strip()}" for hp in settings.bootstrap_servers.split(",") if hp],
        datadir=str(settings.data_dir / "faust" / config.app_id),
        web_enabled=False,
        web_bind="127.0.0.1",  # faust's CLI turns the web server on unless --without-web
        web_host="127.0.0.1",
        topic_allow_declare=False,
    )
    for group in config.agents:
        AGENT_GROUPS[group](app)
    return app


def run_worker(app: BackbeatApp, loglevel: str = "info") -> None:
    """Run a Faust worker for ``app`` in this process until stopped (``backbeat worker``)."""
    from faust.worker import Worker

    Worker(app, loglevel=loglevel).execute_from_commandline()


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
