"""The Faust app of backbeat's stream processors (``faust -A streams.app worker -l info``).

Configured from :class:`infra.settings.Settings` and :class:`streams.config.IngestConfig`
(environment variables). On the embedded broker it uses the short group timeouts and producer
linger of TANSU.md §1/§7, a 100 ms fetch wait instead of Faust's 1.5 s (:mod:`streams.transport`)
and table recovery from Fetch high watermarks (:mod:`streams.recovery`). Faust never creates
topics (``topic_allow_declare=False``, so a source is never made with a wrong partition count):
on first start the worker creates what is missing from the catalogue, exactly as
``backbeat topics apply`` does, plus its changelog. The web server is off under ``backbeat
worker`` / ``python -m streams``; Faust's own CLI (``faust -A streams.app worker``) turns it on
unless given ``--without-web``, and it then binds loopback only (127.0.0.1:6066, not Faust's
0.0.0.0). Streams use :class:`streams.delivery.BatchStream` (a bulk ``take_events``) and the
transport a leaner conductor for raw topics (:mod:`streams.delivery`).

Garbage collection: on first start the worker applies :func:`infra.runtime.tune_gc` (measured:
the 10-copy ingest ratio went from 0.44 to 0.61 with it; the reasons are in that module).

Importing this module registers the agents chosen by ``BACKBEAT_STREAMS_AGENTS`` (default: all):
listening ingest (:mod:`streams.ingest`), the feature agents (:mod:`streams.features`) and ad
reporting (:mod:`streams.ads`).
"""

from __future__ import annotations

import asyncio
import os
import ssl
from pathlib import Path
from typing import Any

import faust

from infra.errors import ConfigError
from infra.provision import apply_topics
from infra.runtime import tune_gc
from infra.settings import Settings
from streams.config import TABLE, IngestConfig
from streams.features_config import FeaturesConfig
from streams.transport import FetchWaitTransport


def broker_credentials(settings: Settings) -> Any:
    """Faust credentials for SASL/TLS settings, or ``None`` for PLAINTEXT."""
    context = None
    if "SSL" in settings.security_protocol.upper():
        context = ssl.create_default_context(cafile=settings.ssl_ca_location)
    if settings.sasl_mechanism:
        return faust.SASLCredentials(
            username=settings.sasl_username,
            password=settings.sasl_password,
            mechanism=settings.sasl_mechanism,
            ssl_context=context,
        )
    if context is not None:
        return faust.SSLCredentials(context)
    return None


class BackbeatApp(faust.App):
    """A Faust app that knows backbeat's settings, provisions its topics on first start and
    uses :class:`streams.transport.FetchWaitTransport`."""

    backbeat_settings: Settings
    ingest_config: IngestConfig
    features_config: FeaturesConfig
    fetch_wait_ms: int

    def _new_transport(self) -> Any:
        return FetchWaitTransport(self.conf.broker_consumer, self)

    async def on_first_start(self) -> None:
        """Create the agent's missing topics (idempotent; drift is reported in the log)."""
        Path(self.conf.datadir).mkdir(parents=True, exist_ok=True)
        tune_gc()
        await super().on_first_start()
        specs = self.ingest_config.topic_specs()
        if "features" in self.ingest_config.agents:
            specs += self.features_config.topic_specs(self.conf.id, self.conf.topic_partitions)
        if "ads" in self.ingest_config.agents:
            from streams.ads import AdsConfig

            specs += AdsConfig.from_env().topic_specs(self.conf.id)
        reports = await asyncio.to_thread(apply_topics, self.backbeat_settings, specs)
        for report in reports:
            if report.action == "drift":
                self.log.warning("topic %s drifted from the catalogue: %s", report.name, report.detail)


def table_store(url: str) -> str:
    """Faust's store URL for ``BACKBEAT_STREAMS_STORE``: ``memory://`` (default; rebuilt from
    the changelogs at start) or ``rocksdict://`` (RocksDB on disk under the data dir through the
    ``rocksdict`` package, which is what faust-streaming's ``rocksdb://`` store uses when it is
    installed; tables larger than memory, faster restarts).

    Raises:
        ConfigError: another scheme.
    """
    scheme = url.split("://", 1)[0].lower()
    if scheme == "memory":
        return "memory://"
    if scheme in ("rocksdict", "rocksdb"):
        return "rocksdb://"
    raise ConfigError(f"BACKBEAT_STREAMS_STORE={url!r}: expected memory:// or rocksdict://")


def create_app(
    settings: Settings | None = None,
    config: IngestConfig | None = None,
    features: FeaturesConfig | None = None,
) -> BackbeatApp:
    """Build the app (not started) for ``settings`` and the agents' configurations (default:
    the environment).

    Raises:
        ConfigError: a malformed ``BACKBEAT_*`` variable.
    """
    settings = settings or Settings.from_env()
    config = config or IngestConfig.from_env()
    features = features or FeaturesConfig.from_env()
    source_partitions = config.topic_specs()[0].partitions
    conf: dict[str, Any] = {
        "broker": [f"kafka://{hp.strip()}" for hp in settings.bootstrap_servers.split(",") if hp],
        "broker_credentials": broker_credentials(settings),
        "value_serializer": "raw",
        "key_serializer": "raw",
        "datadir": str(settings.data_dir / "faust" / config.app_id),
        "store": table_store(os.environ.get("BACKBEAT_STREAMS_STORE") or "memory://"),
        "topic_partitions": source_partitions,
        "topic_allow_declare": False,
        "TableManager": "streams.recovery:FetchTableManager",
        "Stream": "streams.delivery:BatchStream",
        "web_enabled": False,
        "web_bind": "127.0.0.1",  # faust's CLI enables the web server by default (--with-web)
        "web_host": "127.0.0.1",
        "stream_buffer_maxsize": max(4096, 2 * config.batch),
        "consumer_max_fetch_size": 4 * 1024 * 1024,
        "producer_max_batch_size": 512 * 1024,
        "producer_max_request_size": 8 * 1024 * 1024,
        "producer_linger": 0.01,
    }
    if settings.embedded:
        conf.update(broker_session_timeout=6.0, broker_heartbeat_interval=1.0)
    app = BackbeatApp(config.app_id, **conf)
    app.backbeat_settings = settings
    app.ingest_config = config
    app.features_config = features
    app.fetch_wait_ms = config.fetch_wait_ms
    return app


app = create_app()

#: The ingest state: checkpoints of each partition's sessionizer (:mod:`streams.state`).
state_table = app.Table(
    TABLE,
    partitions=app.conf.topic_partitions,
    key_type=bytes,
    value_type=bytes,
)


def run_worker(loglevel: str = "info") -> None:
    """Run a worker for :data:`app` in this process until stopped (what ``backbeat worker`` runs)."""
    from faust.worker import Worker

    Worker(app, loglevel=loglevel).execute_from_commandline()


from streams import ingest  # noqa: E402  (registers listening ingest)

if "features" in app.ingest_config.agents:
    from streams import features as _features  # noqa: E402

    feature_agents = _features.register(app, ingest.source_topic, app.features_config)

if "ads" in app.ingest_config.agents:
    from streams import ads as _ads  # noqa: E402

    ad_agent = _ads.register(app, _ads.AdsConfig.from_env())
