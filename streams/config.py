"""Configuration of the listening-ingest agent, from ``BACKBEAT_INGEST_*`` environment variables.

=====================================  ===================================================
variable                               meaning (default)
=====================================  ===================================================
``BACKBEAT_INGEST_APP_ID``             Faust app id = consumer group and prefix of the
                                       changelog topic (``backbeat-ingest``)
``BACKBEAT_INGEST_SOURCE_TOPIC``       listens to read (``playback.listens``)
``BACKBEAT_INGEST_SESSIONS_TOPIC``     where ``SessionEnded`` goes (``listening.sessions``)
``BACKBEAT_INGEST_DLQ_TOPIC``          dead letters (``playback.listens.dlq``)
``BACKBEAT_INGEST_BATCH``              max events per batch (``20000``)
``BACKBEAT_INGEST_BATCH_WITHIN_S``     max seconds to fill a batch (``0.2``)
``BACKBEAT_INGEST_STATS_INTERVAL_S``   seconds between ``ingest stats`` log lines (``10``)
``BACKBEAT_INGEST_FETCH_WAIT_MS``      consumer fetch max wait, ms (``100``)
``BACKBEAT_STREAMS_STALL_AFTER_S``     report an agent as stalled when records wait but none
                                       arrived for this long, seconds (``30``)
``BACKBEAT_STREAMS_AGENTS``            which agents the worker runs: ``ingest``,
                                       ``features``, ``ads``, ``playback``, ``ledger``,
                                       comma-separated (all)
=====================================  ===================================================

Topics that are overridden keep the partition count and configs of the catalogue entry they
replace (``infra/topics.toml``), so tests can run isolated copies on a shared broker.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

from events.catalog import TopicSpec, topic
from infra.errors import ConfigError

SOURCE = "playback.listens"
SESSIONS = "listening.sessions"
DLQ = "playback.listens.dlq"
TABLE = "sessions"
#: The agent groups a worker can run (``BACKBEAT_STREAMS_AGENTS``).
AGENT_GROUPS = ("ingest", "features", "ads", "playback", "ledger")


def _num(env: dict[str, str], name: str, default: str, kind: type[int] | type[float]) -> float:
    raw = env.get(name) or default
    try:
        value = kind(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not a number") from None
    if value <= 0:
        raise ConfigError(f"{name}={raw!r} must be positive")
    return value


def _agents(raw: str) -> tuple[str, ...]:
    names = tuple(dict.fromkeys(n.strip() for n in raw.split(",") if n.strip()))
    unknown = [n for n in names if n not in AGENT_GROUPS]
    if unknown or not names:
        raise ConfigError(
            f"BACKBEAT_STREAMS_AGENTS={raw!r}: expected a comma-separated subset of {', '.join(AGENT_GROUPS)}"
        )
    return names


@dataclass(frozen=True)
class IngestConfig:
    """Resolved agent configuration (see the module docstring)."""

    app_id: str = "backbeat-ingest"
    source_topic: str = SOURCE
    sessions_topic: str = SESSIONS
    dlq_topic: str = DLQ
    batch: int = 20_000
    batch_within_s: float = 0.2
    stats_interval_s: float = 10.0
    fetch_wait_ms: int = 100
    agents: tuple[str, ...] = AGENT_GROUPS
    stall_after_s: float = 30.0

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> IngestConfig:
        """Read ``BACKBEAT_INGEST_*`` (from ``environ`` or ``os.environ``).

        Raises:
            ConfigError: a number is malformed or not positive.
        """
        env = dict(os.environ if environ is None else environ)
        return cls(
            app_id=env.get("BACKBEAT_INGEST_APP_ID") or cls.app_id,
            source_topic=env.get("BACKBEAT_INGEST_SOURCE_TOPIC") or SOURCE,
            sessions_topic=env.get("BACKBEAT_INGEST_SESSIONS_TOPIC") or SESSIONS,
            dlq_topic=env.get("BACKBEAT_INGEST_DLQ_TOPIC") or DLQ,
            batch=int(_num(env, "BACKBEAT_INGEST_BATCH", "20000", int)),
            batch_within_s=float(_num(env, "BACKBEAT_INGEST_BATCH_WITHIN_S", "0.2", float)),
            stats_interval_s=float(_num(env, "BACKBEAT_INGEST_STATS_INTERVAL_S", "10", float)),
            fetch_wait_ms=int(_num(env, "BACKBEAT_INGEST_FETCH_WAIT_MS", "100", int)),
            agents=_agents(env.get("BACKBEAT_STREAMS_AGENTS") or ",".join(AGENT_GROUPS)),
            stall_after_s=float(_num(env, "BACKBEAT_STREAMS_STALL_AFTER_S", "30", float)),
        )

    @property
    def changelog_topic(self) -> str:
        """The state table's changelog (Faust's name: ``<app id>-<table>-changelog``)."""
        return f"{self.app_id}-{TABLE}-changelog"

    def topic_specs(self) -> list[TopicSpec]:
        """The topics the agent needs: source, sessions and DLQ (catalogue entries, renamed when
        overridden) and the changelog (compacted, as many partitions as the source)."""
        source = dataclasses.replace(topic(SOURCE), name=self.source_topic)
        return [
            source,
            dataclasses.replace(topic(SESSIONS), name=self.sessions_topic),
            dataclasses.replace(topic(DLQ), name=self.dlq_topic),
            TopicSpec(
                name=self.changelog_topic,
                partitions=source.partitions,
                cleanup_policy="compact",
                key="u:<partition>:<user> | w:<partition>",
                doc="Checkpoints of the listening-ingest sessionizer (streams.state).",
            ),
        ]
