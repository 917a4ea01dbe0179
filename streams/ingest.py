"""The listening-ingest agent: ``playback.listens`` → validated, de-duplicated, sessionised →
``SessionEnded`` on ``listening.sessions``; bad records → ``playback.listens.dlq``.

Per batch (``stream.take_events``), per source partition, in offset order: decode with the
registry (:meth:`events.serde.AvroDecoder.decode_many`), validate
(:func:`streams.sessions.validate_listen`), feed the partition's
:class:`streams.sessions.Sessionizer`; watermark control records (:mod:`events.control`) advance
the partition's watermark. Closed sessions are encoded as ``SessionEnded`` (Confluent wire
format, key = user id, CloudEvents headers, record time = session end) and written to the
sessions partition numbered like the source partition; dead letters keep the original key, value
and headers plus ``dlq_reason`` (``decode_error`` / ``validation_error``), ``dlq_error``,
``dlq_topic``, ``dlq_partition``, ``dlq_offset``.

State and restarts (what is guaranteed):

1. Each batch writes its outputs (sessions, dead letters) and waits until the broker has them;
   only then it writes the checkpoints of what the batch changed to the changelog of the
   ``sessions`` table (:mod:`streams.state`: users first, the partition watermark last, all in
   the changelog partition equal to the source partition, so any prefix that survives a crash is
   consistent). Faust commits source offsets only after the batch is acked and the producer is
   flushed.
2. On (re)assignment Faust recovers the table from its changelog up to the high watermark read
   from a Fetch response (:mod:`streams.recovery`), and the partition's sessionizer is rebuilt
   from it. Replayed records (after the last source commit) at or below a user's checkpointed
   offset are skipped but still advance the watermark, so every decision is made as before.
3. Hence, after a crash or restart, the sessions emitted are the same set (same content, same
   deterministic ``event_id``), but a session or dead letter may be emitted **more than once**
   (at-least-once delivery; consumers dedupe by ``event_id``, or by ``dlq_topic/partition/
   offset`` for dead letters). Counters (:func:`stats`) are per process and restart at zero;
   the FIFO of recent ids is not checkpointed (it only decides duplicate vs late counts).

Counters reconcile: ``listens_in = sessionised + duplicates + late + dead_lettered``, where
``duplicates`` includes ``replayed`` (source records seen again after a restart/rebalance).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Sequence, Set
from dataclasses import asdict, dataclass
from typing import Any

from faust.types import TP, EventT

from events.cloudevents import ce_headers
from events.control import is_control, watermark_of
from events.registry_client import registry_for
from events.schemas import get_schema
from events.serde import AvroDecoder, AvroEncoder
from streams import state
from streams.app import BackbeatApp, app, state_table
from streams.records import Record, dead_letter, send_records
from streams.sessions import ClosedSession, Sessionizer, validate_listen

log = logging.getLogger(__name__)

SESSION_TYPE = "SessionEnded"
SOURCE_URI = "/streams/listening-ingest"



@dataclass
class IngestStats:
    """Event counters of this process (see the module docstring for the reconciliation)."""

    listens_in: int = 0
    sessionised: int = 0
    duplicates: int = 0
    late: int = 0
    dead_lettered: int = 0
    replayed: int = 0
    control_records: int = 0
    sessions_emitted: int = 0
    batches: int = 0
    busy_s: float = 0.0

    def reconciles(self) -> bool:
        """True when every listen in is accounted for exactly once."""
        out = self.sessionised + self.duplicates + self.late + self.dead_lettered
        return self.listens_in == out


class ListenIngest:
    """The agent's state and batch processing (one instance per worker process)."""

    def __init__(self, faust_app: BackbeatApp, table: Any) -> None:
        self.app = faust_app
        self.table = table
        self.config = faust_app.ingest_config
        self.settings = faust_app.backbeat_settings
        self.gap = self.settings.session_gap_ms
        self.partitions: dict[int, Sessionizer] = {}
        self.stats = IngestStats()
        self._decoder: AvroDecoder | None = None
        self._encoder: AvroEncoder | None = None
        self._full_name = get_schema(SESSION_TYPE).full_name
        specs = self.config.topic_specs()
        self._sessions_partitions = specs[1].partitions

    async def start(self) -> None:
        """Connect to the registry (registers ``SessionEnded`` on the sessions topic)."""
        if self._encoder is None:
            registry = registry_for(self.settings.registry_url)
            self._encoder = await asyncio.to_thread(
                registry.encoder, self.config.sessions_topic, SESSION_TYPE
            )
            self._decoder = registry.decoder()

    def forget(self, tps: Set[TP]) -> None:
        """Drop the sessionizers of revoked source partitions (rebuilt from the table later)."""
        for tp in tps:
            if tp.topic == self.config.source_topic:
                self.partitions.pop(tp.partition, None)

    def _sessionizer(self, partition: int) -> Sessionizer:
        sz = self.partitions.get(partition)
        if sz is None:
            sz = state.restore(partition, self.table.data.items(), self.gap)
            self.partitions[partition] = sz
            log.info("partition %d: restored %d users, watermark %d", partition, len(sz.users), sz.watermark)
        return sz

    async def process(self, events: Sequence[EventT]) -> None:
        """Process one batch (see the module docstring for the order of writes)."""
        started = time.perf_counter()
        try:
            await self._process(events)
        finally:
            self.stats.busy_s += time.perf_counter() - started

    async def _process(self, events: Sequence[EventT]) -> None:
        now_ms = int(time.time() * 1000)
        by_partition: dict[int, list[Any]] = {}
        for event in events:
            message = event.message
            msgs = by_partition.get(message.partition)
            if msgs is None:
                msgs = by_partition[message.partition] = []
            msgs.append(message)
        sessions: list[tuple[int, ClosedSession]] = []
        dead: list[Record] = []
        checkpoints: list[tuple[int, list[tuple[bytes, bytes | None]]]] = []
        for partition, msgs in by_partition.items():
            closed, bad = self._process_partition(partition, msgs, now_ms)
            sessions.extend((partition, s) for s in closed)
            dead.extend(bad)
            sz = self.partitions[partition]
            checkpoints.append((partition, state.checkpoint_records(partition, sz, msgs[-1].offset)))
        self.stats.batches += 1
        producer = self.app.producer._ensure_producer()  # the aiokafka producer (batch API)
        pending: list[asyncio.Future[Any]] = []
        if sessions:
            pending += await self._send_sessions(producer, sessions)
        if dead:
            pending += await send_records(producer, self.config.dlq_topic, 0, dead)
            self.stats.dead_lettered += len(dead)
        if pending:
            await asyncio.gather(*pending)  # outputs are on the broker before the checkpoints
        changelog = self.table.changelog_topic.get_topic_name()
        for partition, records in checkpoints:
            if records:
                await send_records(producer, changelog, partition, [(k, v, None, []) for k, v in records])

    def _process_partition(
        self, partition: int, msgs: list[Any], now_ms: int
    ) -> tuple[list[ClosedSession], list[Record]]:
        sz = self._sessionizer(partition)
        before = (sz.accepted, sz.duplicates, sz.late, sz.replayed)
        control = [bool(m.headers) and is_control(m.headers) for m in msgs]
        payloads = [m.value for m, c in zip(msgs, control, strict=True) if not c]
        decoder = self._decoder
        assert decoder is not None, "start() first"
        records, errors = decoder.decode_many(payloads)
        reasons = dict(errors)
        closed: list[ClosedSession] = []
        bad: list[Record] = []
        add = sz.add
        validate = validate_listen
        j = 0
        for m, is_ctl in zip(msgs, control, strict=True):
            if is_ctl:
                self.stats.control_records += 1
                mark = watermark_of(m.headers)
                if mark is not None:
                    closed += sz.advance_watermark(mark)
                continue
            record = records[j]
            if record is None:
                bad.append(dead_letter(m, "decode_error", reasons[j]))
            else:
                reason = validate(record, now_ms)
                if reason is not None:
                    bad.append(dead_letter(m, "validation_error", reason))
                else:
                    done = add(record, m.offset)
                    if done:
                        closed += done
            j += 1
        closed += sz.advance_watermark()
        s = self.stats
        s.listens_in += j
        s.sessionised += sz.accepted - before[0]
        s.duplicates += (sz.duplicates - before[1]) + (sz.replayed - before[3])
        s.replayed += sz.replayed - before[3]
        s.late += sz.late - before[2]
        return closed, bad

    async def _send_sessions(
        self, producer: Any, sessions: list[tuple[int, ClosedSession]]
    ) -> list[asyncio.Future[Any]]:
        encoder = self._encoder
        assert encoder is not None, "start() first"
        gap = self.gap
        full_name = self._full_name
        by_partition: dict[int, list[Record]] = {}
        values = encoder.encode_many(
            {
                "event_id": s.event_id,
                "user_id": s.user_id,
                "session_start": s.start_ms,
                "session_end": s.end_ms,
                "listens": s.listens,
                "distinct_artists": s.distinct_artists,
                "gap_ms": gap,
            }
            for _, s in sessions
        )
        n = self._sessions_partitions
        for (partition, s), value in zip(sessions, values, strict=True):
            headers = ce_headers(
                event_id=s.event_id, event_type=full_name, source=SOURCE_URI, time_ms=s.end_ms
            )
            by_partition.setdefault(partition % n, []).append((s.user_id.encode(), value, s.end_ms, headers))
        pending: list[asyncio.Future[Any]] = []
        for partition, records in by_partition.items():
            pending += await send_records(producer, self.config.sessions_topic, partition, records)
        self.stats.sessions_emitted += len(sessions)
        return pending


ingest = ListenIngest(app, state_table)
source_topic = app.topic(
    app.ingest_config.source_topic,
    key_serializer="raw",
    value_serializer="raw",
    partitions=app.conf.topic_partitions,
)


def stats() -> dict[str, Any]:
    """The counters of this process, plus ``reconciles`` and the open sessions per partition."""
    out: dict[str, Any] = asdict(ingest.stats)
    out["busy_s"] = round(out["busy_s"], 3)
    out["reconciles"] = ingest.stats.reconciles()
    out["open_sessions"] = {p: sz.open_sessions() for p, sz in sorted(ingest.partitions.items())}
    return out


if "ingest" in app.ingest_config.agents:  # BACKBEAT_STREAMS_AGENTS

    @app.agent(source_topic, name="listening-ingest")
    async def listening_ingest(stream: Any) -> None:
        """The agent: batches of up to ``BACKBEAT_INGEST_BATCH`` events, at most
        ``BACKBEAT_INGEST_BATCH_WITHIN_S`` s apart."""
        await ingest.start()
        config = app.ingest_config
        async for events in stream.take_events(config.batch, within=config.batch_within_s):
            await ingest.process(events)

    @app.on_partitions_revoked.connect
    async def on_revoked(sender: Any, revoked: Set[TP], **kwargs: Any) -> None:
        """Forget the revoked partitions' sessionizers."""
        ingest.forget(revoked)

    @app.timer(app.ingest_config.stats_interval_s)
    async def log_stats() -> None:
        """Log :func:`stats` as one JSON line (``ingest stats {...}``)."""
        log.info("ingest stats %s", json.dumps(stats(), sort_keys=True))
