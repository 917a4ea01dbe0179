"""Configuration of the listening-from-playback agent (:mod:`streams.playback`), from
``BACKBEAT_PLAYBACK_*`` environment variables.

=======================================  ===================================================
variable                                 meaning (default)
=======================================  ===================================================
``BACKBEAT_PLAYBACK_SOURCE_TOPIC``       player events to read (``playback.events``)
``BACKBEAT_PLAYBACK_LISTENS_TOPIC``      where ``ListenRecorded`` goes (``playback.listens``)
``BACKBEAT_PLAYBACK_DLQ_TOPIC``          dead letters (``playback.events.dlq``)
``BACKBEAT_PLAYBACK_EXPIRE``             sessions and plays with no activity for this long
                                         (event time) are dropped (``1d``)
=======================================  ===================================================

The app id (consumer group prefix, changelog prefix), batch sizes and stats interval are the
worker's (``BACKBEAT_INGEST_*``, :mod:`streams.config`). Overridden topics keep the partition
count and configs of the catalogue entry they replace (``infra/topics.toml``).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

from events.catalog import TopicSpec, topic
from streams.plays import EXPIRE_MS
from streams.windows import parse_duration_ms

SOURCE = "playback.events"
LISTENS = "playback.listens"
DLQ = "playback.events.dlq"
TABLE = "plays"


@dataclass(frozen=True)
class PlaybackConfig:
    """Resolved configuration (module docstring)."""

    source_topic: str = SOURCE
    listens_topic: str = LISTENS
    dlq_topic: str = DLQ
    expire_ms: int = EXPIRE_MS

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> PlaybackConfig:
        """Read ``BACKBEAT_PLAYBACK_*`` (from ``environ`` or ``os.environ``).

        Raises:
            ConfigError: a malformed duration.
        """
        env = dict(os.environ if environ is None else environ)
        expire = env.get("BACKBEAT_PLAYBACK_EXPIRE")
        return cls(
            source_topic=env.get("BACKBEAT_PLAYBACK_SOURCE_TOPIC") or SOURCE,
            listens_topic=env.get("BACKBEAT_PLAYBACK_LISTENS_TOPIC") or LISTENS,
            dlq_topic=env.get("BACKBEAT_PLAYBACK_DLQ_TOPIC") or DLQ,
            expire_ms=parse_duration_ms(expire) if expire else EXPIRE_MS,
        )

    def changelog_topic(self, app_id: str) -> str:
        """``<app id>-plays-changelog``."""
        return f"{app_id}-{TABLE}-changelog"

    def topic_specs(self, app_id: str) -> list[TopicSpec]:
        """Source, listens and DLQ (catalogue entries, renamed when overridden) and the changelog
        (compacted, as many partitions as the source)."""
        source = dataclasses.replace(topic(SOURCE), name=self.source_topic)
        return [
            source,
            dataclasses.replace(topic(LISTENS), name=self.listens_topic),
            dataclasses.replace(topic(DLQ), name=self.dlq_topic),
            TopicSpec(
                name=self.changelog_topic(app_id),
                partitions=source.partitions,
                cleanup_policy="compact",
                key="s:<partition>:<session> | p:<partition>:<playback> | c:<partition>",
                doc="Checkpoints of the listening-from-playback agent (streams.plays).",
            ),
        ]


__all__ = ["DLQ", "LISTENS", "SOURCE", "PlaybackConfig"]
