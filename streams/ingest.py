"""The listening-ingest agent: ``playback.listens`` → validated, de-duplicated, sessionised →
``SessionEnded`` on ``listening.sessions``; bad records → ``playback.listens.dlq``.

The domain rules are :class:`streams.sessions.Sessionizer` (one per source partition) and the
listen validator (:func:`events.validation.validate_listen`); the checkpoint format is
:mod:`streams.state`. Everything else (decode, dead letters, outputs, checkpoint order, restore,
no duplicate output after a crash) is the runtime's (:mod:`streams.runtime.runner`).

Per batch and source partition, in offset order: each listen goes to the partition's
sessionizer; a watermark control record advances its watermark. Closed sessions become
``SessionEnded`` events (key = user id, record time = session end, deterministic ``event_id``)
on the sessions partition numbered like the source partition.

Counters (kept with each partition's state, so they survive restarts) reconcile:
``records_in = sessionised + duplicates + late + dead_lettered``, where ``duplicates`` includes
``replayed`` (records at or below a user's checkpointed offset, after a half-written checkpoint).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from events.validation import Validator, validate_listen
from streams import state
from streams.config import IngestConfig
from streams.runtime.agent import BatchAgent, ChangelogRecord, Emit, PartitionBatch, Result
from streams.sessions import Sessionizer

log = logging.getLogger(__name__)

SESSION_TYPE = "SessionEnded"
SOURCE_URI = "/streams/listening-ingest"


class ListenIngest(BatchAgent):
    """The agent (module docstring); ``gap_ms`` is the session inactivity gap."""

    name = "listening-ingest"
    stats_name = "ingest"
    source_uri = SOURCE_URI
    count_names = ("sessionised", "duplicates", "replayed", "late", "sessions_emitted")

    def __init__(self, config: IngestConfig, gap_ms: int) -> None:
        self.config = config
        self.gap = gap_ms
        self.partitions: dict[int, Sessionizer] = {}
        self.chunks: dict[int, state.RecentChunks] = {}
        self._sessions_partitions = config.topic_specs()[1].partitions

    @property
    def source_topic(self) -> str:
        """``BACKBEAT_INGEST_SOURCE_TOPIC``."""
        return self.config.source_topic

    @property
    def changelog_topic(self) -> str:
        """``<app id>-sessions-changelog``."""
        return self.config.changelog_topic

    @property
    def output_topics(self) -> Sequence[str]:
        """Sessions and dead letters."""
        return (self.config.sessions_topic, self.config.dlq_topic)

    @property
    def dlq_topic(self) -> str:
        """``BACKBEAT_INGEST_DLQ_TOPIC``."""
        return self.config.dlq_topic

    @property
    def event_types(self) -> Mapping[str, str]:
        """``SessionEnded`` on the sessions topic."""
        return {self.config.sessions_topic: SESSION_TYPE}

    def validator(self) -> Validator:
        """:func:`events.validation.validate_listen`."""
        return validate_listen

    def restore(self, partition: int, items: Mapping[bytes, bytes]) -> None:
        """The partition's sessionizer from its checkpoint records."""
        chunks = self.chunks[partition] = state.RecentChunks()
        sz = state.restore(partition, items.items(), self.gap, chunks)
        self.partitions[partition] = sz
        log.info("partition %d: restored %d users, watermark %d", partition, len(sz.users), sz.watermark)

    def process(self, batch: PartitionBatch, now_ms: int) -> Result:
        """Sessionise one partition's listens; emit the sessions they close."""
        p = batch.partition
        sz = self.partitions[p]
        accepted, duplicates, late, replayed = sz.accepted, sz.duplicates, sz.late, sz.replayed
        closed = []
        add = sz.add
        marks = batch.marks
        for i, (record, offset) in enumerate(zip(batch.records, batch.offsets, strict=True)):
            if record is None:
                mark = marks.get(i)
                if mark is not None:
                    closed += sz.advance_watermark(mark)
                continue
            done = add(record, offset)
            if done:
                closed += done
        closed += sz.advance_watermark()
        topic = self.config.sessions_topic
        target = p % self._sessions_partitions
        gap = self.gap
        emits = [
            Emit(
                topic,
                target,
                s.user_id.encode(),
                SESSION_TYPE,
                {
                    "event_id": s.event_id,
                    "user_id": s.user_id,
                    "session_start": s.start_ms,
                    "session_end": s.end_ms,
                    "listens": s.listens,
                    "distinct_artists": s.distinct_artists,
                    "gap_ms": gap,
                },
                s.event_id,
                s.end_ms,
            )
            for s in closed
        ]
        counts = {
            "sessionised": sz.accepted - accepted,
            "duplicates": (sz.duplicates - duplicates) + (sz.replayed - replayed),
            "replayed": sz.replayed - replayed,
            "late": sz.late - late,
            "sessions_emitted": len(closed),
        }
        return Result(emits=emits, counts=counts)

    def checkpoint(self, partition: int, offset: int) -> Iterable[ChangelogRecord]:
        """New recent ids, the users changed since the last checkpoint, then the watermark
        (:mod:`streams.state`)."""
        return state.checkpoint_records(partition, self.partitions[partition], offset, self.chunks[partition])

    def revoke(self, partition: int) -> None:
        """Drop the partition's sessionizer."""
        self.partitions.pop(partition, None)
        self.chunks.pop(partition, None)

    def stats(self, counts: Mapping[str, int]) -> dict[str, Any]:
        """Open sessions per assigned partition."""
        return {"open_sessions": {p: sz.open_sessions() for p, sz in sorted(self.partitions.items())}}

    def state_entries(self) -> int:
        """Users with state (open session or remembered ids) across the assigned partitions."""
        return sum(len(sz.users) for sz in list(self.partitions.values()))

    def reconciles(self, counts: Mapping[str, int]) -> bool:
        """``records_in = sessionised + duplicates + late + dead_lettered``."""
        out = sum(counts.get(k, 0) for k in ("sessionised", "duplicates", "late", "dead_lettered"))
        return counts.get("records_in", 0) == out


__all__ = ["SESSION_TYPE", "SOURCE_URI", "ListenIngest"]
