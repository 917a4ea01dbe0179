"""The listening-from-playback agent: ``playback.events`` (the player's sessions, plays, pauses,
resumes, skips and completions, keyed by user) → ``ListenRecorded`` on ``playback.listens`` for
every play heard for at least 30 s; bad records → ``playback.events.dlq``.

The domain rules and the checkpoint format are :mod:`streams.plays` (one
:class:`~streams.plays.PlaysPartition` per source partition); the listens then go the way of every
listen: the listening-ingest agent (:mod:`streams.ingest`) sessionises them, the read models take
them. Everything else (decode, dead letters, outputs, checkpoint order, restore, no duplicate
output after a crash) is the runtime's (:mod:`streams.runtime.runner`).

Per batch and source partition, in offset order: each event goes to the partition's state
machine; a counted play becomes a ``ListenRecorded`` (key = user id, record time = the play's
start, deterministic ``event_id``) on the listens partition numbered like the source partition
(modulo the listens topic's partitions, as ingest does for sessions). A watermark control record
advances the partition's clock and, when the listens topic has at least as many partitions as the
source (so each listens partition is fed by one source partition at most; the counts are the
catalogue's, ``infra/topics.toml``), is passed on to the listens partition,
lowered below the start of every play still open (:meth:`streams.plays.PlaysPartition.
low_watermark`): the ingest agent then closes its sessions at the end of a bounded input as it
does for imported listens. Forwarded watermarks carry no output identity: a second copy after
a restart is harmless (a watermark never goes down).

Duplicates: a redelivered player event does nothing (the first end of a play wins, the play's id
is remembered in its session, :mod:`streams.plays`); a listen published before a crash and
computed again after it is recognised by its ``event_id`` and not published again (the
runtime's read-back).

Counters (kept with each partition's state, so they survive restarts) reconcile:
``records_in = sessions_started + sessions_ended + plays_started + pauses + resumes + counted +
short_plays + duplicates + unmatched + dead_lettered``; ``listens_emitted = counted``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from events.catalog import topic
from events.control import watermark_headers
from events.validation import Validator
from streams.playback_config import LISTENS, PlaybackConfig
from streams.plays import OTHER_COUNTS, RECORD_COUNTS, PlaysPartition, kind_of, validate_player_event
from streams.runtime.agent import BatchAgent, ChangelogRecord, Emit, PartitionBatch, Raw, Result

log = logging.getLogger(__name__)

LISTEN_TYPE = "ListenRecorded"
SOURCE_URI = "/streams/listening-from-playback"


class ListeningFromPlayback(BatchAgent):
    """The agent (module docstring); ``app_id`` prefixes its changelog; ``sources``: partitions
    of the source topic (default: the catalogue's ``playback.events``)."""

    name = "listening-from-playback"
    stats_name = "playback"
    source_uri = SOURCE_URI
    count_names = (*RECORD_COUNTS, *OTHER_COUNTS, "listens_emitted")

    def __init__(self, config: PlaybackConfig, app_id: str, sources: int | None = None) -> None:
        self.config = config
        self.app_id = app_id
        self.partitions: dict[int, PlaysPartition] = {}
        self._listens_partitions = topic(LISTENS).partitions
        self._forward = (sources or topic("playback.events").partitions) <= self._listens_partitions

    @property
    def source_topic(self) -> str:
        """``BACKBEAT_PLAYBACK_SOURCE_TOPIC``."""
        return self.config.source_topic

    @property
    def changelog_topic(self) -> str:
        """``<app id>-plays-changelog``."""
        return self.config.changelog_topic(self.app_id)

    @property
    def output_topics(self) -> Sequence[str]:
        """Listens and dead letters."""
        return (self.config.listens_topic, self.config.dlq_topic)

    @property
    def dlq_topic(self) -> str:
        """``BACKBEAT_PLAYBACK_DLQ_TOPIC``."""
        return self.config.dlq_topic

    @property
    def event_types(self) -> Mapping[str, str]:
        """``ListenRecorded`` on the listens topic."""
        return {self.config.listens_topic: LISTEN_TYPE}

    def validator(self) -> Validator:
        """:func:`streams.plays.validate_player_event`."""
        return validate_player_event

    def restore(self, partition: int, items: Mapping[bytes, bytes]) -> None:
        """The partition's state from its checkpoint records."""
        st = PlaysPartition.restore(partition, items.items(), expire_ms=self.config.expire_ms)
        self.partitions[partition] = st
        log.info("partition %d: restored %d open sessions, %d open plays, clock %d",
                 partition, len(st.sessions), len(st.plays), st.clock)  # fmt: skip

    def process(self, batch: PartitionBatch, now_ms: int) -> Result:
        """Apply one partition's player events; emit the listens they complete."""
        p = batch.partition
        st = self.partitions[p]
        topic_name = self.config.listens_topic
        target = p % self._listens_partitions
        emits: list[Emit] = []
        raws: list[Raw] = []
        marks = batch.marks
        apply = st.apply
        for i, record in enumerate(batch.records):
            if record is None:
                mark = marks.get(i)
                if mark is not None:
                    st.advance(mark)
                    if self._forward:
                        low = st.low_watermark(mark)
                        raws.append(Raw(topic_name, target, None, b"", None, watermark_headers(low)))
                continue
            kind = kind_of(record)
            listen = apply(record, kind)
            if listen is not None:
                emits.append(
                    Emit(
                        topic_name,
                        target,
                        listen.user_id.encode(),
                        LISTEN_TYPE,
                        listen.record(),
                        listen.event_id,
                        listen.occurred_at,
                    )  # fmt: skip
                )
        counts = st.take_counts()
        counts["listens_emitted"] = len(emits)
        return Result(emits=emits, raws=raws, counts=counts)

    def checkpoint(self, partition: int, offset: int) -> Iterable[ChangelogRecord]:
        """Sessions and plays changed since the last checkpoint, then the clock
        (:mod:`streams.plays`)."""
        return self.partitions[partition].checkpoint_records()

    def revoke(self, partition: int) -> None:
        """Drop the partition's state."""
        self.partitions.pop(partition, None)

    def stats(self, counts: Mapping[str, int]) -> dict[str, Any]:
        """Open sessions and plays per assigned partition."""
        parts = sorted(self.partitions.items())
        return {
            "open_sessions": {p: len(st.sessions) for p, st in parts},
            "open_plays": {p: len(st.plays) for p, st in parts},
        }

    def state_entries(self) -> int:
        """Open sessions plus open plays across the assigned partitions."""
        return sum(st.state_entries() for st in list(self.partitions.values()))

    def reconciles(self, counts: Mapping[str, int]) -> bool:
        """``records_in`` = the sum of :data:`streams.plays.RECORD_COUNTS` + ``dead_lettered``."""
        out = sum(counts.get(k, 0) for k in (*RECORD_COUNTS, "dead_lettered"))
        return counts.get("records_in", 0) == out


__all__ = ["LISTEN_TYPE", "SOURCE_URI", "ListeningFromPlayback"]
