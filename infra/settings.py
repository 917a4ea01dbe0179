"""One settings object for all of backbeat, read from ``BACKBEAT_*`` environment variables.

Defaults point at the embedded broker (Tansu on 127.0.0.1:9092), the embedded schema registry
(http://127.0.0.1:8081) and ``./var`` for data, so a laptop needs no configuration; set the
variables to run the same code against a real Kafka cluster and a Confluent-compatible registry.

=====================================  =====================================================
variable                               meaning (default)
=====================================  =====================================================
``BACKBEAT_BOOTSTRAP_SERVERS``         Kafka bootstrap servers (``127.0.0.1:9092``)
``BACKBEAT_REGISTRY_URL``              Schema Registry base URL (``http://127.0.0.1:8081``)
``BACKBEAT_DATA_DIR``                  data, logs and pids: DuckDB file, lake (``./var``)
``BACKBEAT_EMBEDDED``                  ``1`` = the broker is the embedded Tansu: use short
                                       group timeouts (docs/broker.md §1) and Fetch-based high
                                       watermarks (§2); ``0`` = real Kafka defaults
                                       (``1`` when the bootstrap servers are loopback)
``BACKBEAT_SECURITY_PROTOCOL``         ``PLAINTEXT`` / ``SSL`` / ``SASL_SSL`` … (``PLAINTEXT``)
``BACKBEAT_SASL_MECHANISM``            e.g. ``PLAIN``, ``SCRAM-SHA-512`` (unset)
``BACKBEAT_SASL_USERNAME`` / ``_PASSWORD``  SASL credentials (unset)
``BACKBEAT_SSL_CA_LOCATION``           CA bundle for TLS (unset)
``BACKBEAT_SESSION_GAP_MS``            listening-session inactivity gap in ms (1800000)
``BACKBEAT_EVENTSTORE_URL``            event store of the saga applications: empty = one SQLite
                                       file per application under ``<data_dir>/eventstore``;
                                       ``postgresql://user:pass@host:port/db`` = PostgreSQL
                                       (tables ``<app>_events``); ``sqlite:///abs/dir`` = SQLite
                                       files in that directory (empty)
=====================================  =====================================================
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

from infra.errors import ConfigError

#: The root of the source checkout when backbeat runs from one (an editable install): where
#: ``.git``, ``docs/`` and ``benchmarks/`` are. Only checkout tools read through it (the docs
#: generator, ``backbeat schemas check --against history``); what backbeat needs at run time
#: ships as package data, see :mod:`infra.resources`. In an installed wheel it is site-packages.
REPO_ROOT = Path(__file__).resolve().parent.parent

_LOOPBACK = {"127.0.0.1", "localhost", "::1"}

#: librdkafka's own log lines go to this Python logger instead of stderr.
RDKAFKA_LOGGER = logging.getLogger("backbeat.librdkafka")


def _bool(name: str, value: str) -> bool:
    low = value.strip().lower()
    if low in {"1", "true", "yes", "on"}:
        return True
    if low in {"0", "false", "no", "off"}:
        return False
    raise ConfigError(f"{name}={value!r} is not a boolean; use 1 or 0")


def _int(name: str, value: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"{name}={value!r} is not an integer") from None


def _positive(name: str, value: str) -> int:
    number = _int(name, value)
    if number < 1:
        raise ConfigError(f"{name}={value!r} must be at least 1")
    return number


@dataclass(frozen=True)
class Settings:
    """Resolved settings. Build with :meth:`from_env`; all paths are absolute."""

    bootstrap_servers: str = "127.0.0.1:9092"
    registry_url: str = "http://127.0.0.1:8081"
    data_dir: Path = field(default_factory=lambda: Path("var").resolve())
    embedded: bool = True
    security_protocol: str = "PLAINTEXT"
    sasl_mechanism: str | None = None
    sasl_username: str | None = None
    sasl_password: str | None = None
    ssl_ca_location: str | None = None
    session_gap_ms: int = 30 * 60 * 1000
    eventstore_url: str = ""
    #: Longest wait (ms) of a projection runner to fill a batch before it writes what it has.
    projection_linger_ms: int = 500

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> Settings:
        """Read ``BACKBEAT_*`` variables (from ``environ`` or ``os.environ``).

        Raises:
            ConfigError: a variable has a value of the wrong form.
        """
        env = dict(os.environ if environ is None else environ)

        def get(name: str, default: str) -> str:
            value = env.get(name)
            return default if value is None or value == "" else value

        bootstrap = get("BACKBEAT_BOOTSTRAP_SERVERS", "127.0.0.1:9092")
        hosts = {hp.rsplit(":", 1)[0].strip("[]") for hp in bootstrap.split(",") if hp}
        embedded_default = "1" if hosts <= _LOOPBACK else "0"
        registry = get("BACKBEAT_REGISTRY_URL", "http://127.0.0.1:8081").rstrip("/")
        if urlparse(registry).scheme not in {"http", "https"}:
            raise ConfigError(f"BACKBEAT_REGISTRY_URL={registry!r} must be an http(s) URL")
        return cls(
            bootstrap_servers=bootstrap,
            registry_url=registry,
            data_dir=Path(get("BACKBEAT_DATA_DIR", "var")).expanduser().resolve(),
            embedded=_bool("BACKBEAT_EMBEDDED", get("BACKBEAT_EMBEDDED", embedded_default)),
            security_protocol=get("BACKBEAT_SECURITY_PROTOCOL", "PLAINTEXT"),
            sasl_mechanism=env.get("BACKBEAT_SASL_MECHANISM") or None,
            sasl_username=env.get("BACKBEAT_SASL_USERNAME") or None,
            sasl_password=env.get("BACKBEAT_SASL_PASSWORD") or None,
            ssl_ca_location=env.get("BACKBEAT_SSL_CA_LOCATION") or None,
            session_gap_ms=_int("BACKBEAT_SESSION_GAP_MS", get("BACKBEAT_SESSION_GAP_MS", "1800000")),
            eventstore_url=get("BACKBEAT_EVENTSTORE_URL", "").strip(),
            projection_linger_ms=_positive(
                "BACKBEAT_PROJECTION_LINGER_MS", get("BACKBEAT_PROJECTION_LINGER_MS", "500")
            ),
        )

    def to_env(self) -> dict[str, str]:
        """The ``BACKBEAT_*`` variables that reproduce these settings in a child process."""
        env = {
            "BACKBEAT_BOOTSTRAP_SERVERS": self.bootstrap_servers,
            "BACKBEAT_REGISTRY_URL": self.registry_url,
            "BACKBEAT_DATA_DIR": str(self.data_dir),
            "BACKBEAT_EMBEDDED": "1" if self.embedded else "0",
            "BACKBEAT_SECURITY_PROTOCOL": self.security_protocol,
            "BACKBEAT_SESSION_GAP_MS": str(self.session_gap_ms),
            "BACKBEAT_PROJECTION_LINGER_MS": str(self.projection_linger_ms),
            # Always set, even empty: an inherited URL must not override "SQLite" in the child.
            "BACKBEAT_EVENTSTORE_URL": self.eventstore_url,
        }
        for name, value in (
            ("BACKBEAT_SASL_MECHANISM", self.sasl_mechanism),
            ("BACKBEAT_SASL_USERNAME", self.sasl_username),
            ("BACKBEAT_SASL_PASSWORD", self.sasl_password),
            ("BACKBEAT_SSL_CA_LOCATION", self.ssl_ca_location),
        ):
            if value:
                env[name] = value
        return env

    # -- derived paths -------------------------------------------------------------------------
    @property
    def duckdb_path(self) -> Path:
        """The read-model database file (``<data_dir>/backbeat.duckdb``)."""
        return self.data_dir / "backbeat.duckdb"

    @property
    def lake_dir(self) -> Path:
        """Root of the Parquet lake (``<data_dir>/lake``)."""
        return self.data_dir / "lake"

    @property
    def run_dir(self) -> Path:
        """Pid files and logs of what ``backbeat up`` started (``<data_dir>/run``)."""
        return self.data_dir / "run"

    @property
    def schemas_dir(self) -> Path:
        """The Avro schema tree (the package ``schemas``, :data:`infra.resources.SCHEMAS_DIR`)."""
        from infra.resources import SCHEMAS_DIR

        return SCHEMAS_DIR

    # -- client configuration ------------------------------------------------------------------
    def kafka_common(self) -> dict[str, object]:
        """librdkafka properties shared by producers, consumers and the admin client
        (librdkafka logs are routed to the ``backbeat.librdkafka`` Python logger)."""
        conf: dict[str, object] = {
            "bootstrap.servers": self.bootstrap_servers,
            "security.protocol": self.security_protocol,
            "logger": RDKAFKA_LOGGER,
        }
        for key, value in (
            ("sasl.mechanism", self.sasl_mechanism),
            ("sasl.username", self.sasl_username),
            ("sasl.password", self.sasl_password),
            ("ssl.ca.location", self.ssl_ca_location),
        ):
            if value:
                conf[key] = value
        return conf

    def producer_conf(self, **extra: str | int | float | bool) -> dict[str, object]:
        """librdkafka producer properties: batching per docs/broker.md §7 (linger 10 ms, big batches)."""
        conf: dict[str, object] = {
            **self.kafka_common(),
            "linger.ms": 10,
            "batch.size": 1_000_000,
            "batch.num.messages": 100_000,
            "queue.buffering.max.messages": 1_000_000,
            "queue.buffering.max.kbytes": 1_048_576,
            "compression.type": "lz4",
            "enable.idempotence": True,
        }
        conf.update(extra)
        return conf

    def consumer_conf(self, group_id: str, **extra: str | int | float | bool) -> dict[str, object]:
        """librdkafka consumer properties; short group timeouts on the embedded broker (docs/broker.md §1)."""
        conf: dict[str, object] = {
            **self.kafka_common(),
            "group.id": group_id,
            "enable.auto.commit": False,
            "auto.offset.reset": "earliest",
            "fetch.wait.max.ms": 100,
            "fetch.max.bytes": 52_428_800,
            "max.partition.fetch.bytes": 10_485_760,
        }
        if self.embedded:
            conf.update({"session.timeout.ms": 6000, "heartbeat.interval.ms": 1000})
        conf.update(extra)
        return conf


def get_settings() -> Settings:
    """The settings of this process, read from the environment each call (cheap)."""
    return Settings.from_env()


__all__ = ["REPO_ROOT", "Settings", "get_settings"]
