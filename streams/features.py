"""The feature agents: ``playback.listens`` → per-user window features
(``UserFeaturesComputed`` on ``personalisation.features.users``) and, through an internal topic
of per-partition track pane partials, per-track window features with a trending score
(``TrackFeaturesComputed`` on ``personalisation.features.tracks``).

* **user-features** (source: the listens, per source partition): decode, validate (invalid
  listens are skipped and counted here; the listening-ingest agent dead-letters them), feed the
  partition's :class:`streams.user_features.PartitionFeatures`; watermark control records
  advance its watermark. After each batch: closed user windows → ``UserFeaturesComputed``
  (partition = source partition, key = user id, record time = window end); closed track panes →
  partials on ``<app id>-track-panes`` (partition by murmur2 of the track id, as Kafka's default
  partitioner); once those are on the broker, the partition's watermark is forwarded to every
  partials partition (a control record with ``bb_source_partition``); then the checkpoint
  records go to the ``features`` table's changelog partition equal to the source partition.
* **track-features** (source: the partials topic): :class:`streams.track_features.TrackWindows`
  per partition; closed windows → ``TrackFeaturesComputed`` (same partition, key = track id),
  then checkpoints to the ``track-features`` changelog.

Guarantees (as for listening ingest, :mod:`streams.ingest`): outputs reach the broker before the
checkpoints that cover them, and Faust commits source offsets only after a batch is processed
and the producer flushed. After a crash the restored state makes the same decisions, so every
window is emitted with the same values and the same deterministic ``event_id`` — possibly twice
(at-least-once; the feature store keeps the first). The tracks' watermark is the minimum of the
source partitions' watermarks: an idle source partition holds track windows open until it
receives a listen or a watermark (importers send one at the end).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Sequence, Set
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from aiokafka.partitioner import murmur2
from faust.types import TP, EventT

from events.cloudevents import ce_headers
from events.control import is_control, watermark_headers, watermark_of
from events.registry_client import registry_for
from events.schemas import get_schema
from events.serde import AvroDecoder, AvroEncoder
from streams import features_state
from streams.features_config import FEATURES_TABLE, TRACK_TABLE, FeaturesConfig, partials_topic
from streams.records import Record, send_records
from streams.sessions import validate_listen
from streams.track_features import TrackWindowFeatures, TrackWindows
from streams.user_features import FEATURE_SET, PartitionFeatures, UserWindowFeatures

if TYPE_CHECKING:
    from streams.app import BackbeatApp

log = logging.getLogger(__name__)

USER_TYPE = "UserFeaturesComputed"
TRACK_TYPE = "TrackFeaturesComputed"
SOURCE_URI = "/streams/features"


@dataclass
class FeatureStats:
    """Counters of this process: listens in, how the first user window spec took them, and
    what went out. ``listens_in = invalid + accepted + late + duplicates + replayed`` of the
    first spec (per-spec counters are in :func:`stats`)."""

    listens_in: int = 0
    invalid: int = 0
    control_records: int = 0
    user_features: int = 0
    partials: int = 0
    track_features: int = 0
    batches: int = 0
    busy_s: float = 0.0


def partition_of(key: bytes, partitions: int) -> int:
    """Kafka's default partition of ``key`` (murmur2, as the Java client and aiokafka do)."""
    return (murmur2(key) & 0x7FFFFFFF) % partitions


class FeatureAgents:
    """State and batch processing of both feature agents (one instance per worker process)."""

    def __init__(
        self, faust_app: BackbeatApp, user_table: Any, track_table: Any, config: FeaturesConfig
    ) -> None:
        self.app = faust_app
        self.user_table = user_table
        self.track_table = track_table
        self.config = config
        self.settings = faust_app.backbeat_settings
        self.source_topic = faust_app.ingest_config.source_topic
        self.partials_topic = partials_topic(faust_app.conf.id)
        self.sources = faust_app.conf.topic_partitions
        self.users: dict[int, PartitionFeatures] = {}
        self.tracks: dict[int, TrackWindows] = {}
        self.stats = FeatureStats()
        self._decoder: AvroDecoder | None = None
        self._user_encoder: AvroEncoder | None = None
        self._track_encoder: AvroEncoder | None = None
        self._specs = config.specs_by_name

    async def start(self) -> None:
        """Connect to the registry (registers both feature event types on their topics)."""
        if self._user_encoder is None:
            registry = registry_for(self.settings.registry_url)
            self._user_encoder = await asyncio.to_thread(registry.encoder, self.config.users_topic, USER_TYPE)
            self._track_encoder = await asyncio.to_thread(
                registry.encoder, self.config.tracks_topic, TRACK_TYPE
            )
            self._decoder = registry.decoder()

    def forget(self, tps: Set[TP]) -> None:
        """Drop the state of revoked partitions (restored from the tables when reassigned)."""
        for tp in tps:
            if tp.topic == self.source_topic:
                self.users.pop(tp.partition, None)
            elif tp.topic == self.partials_topic:
                self.tracks.pop(tp.partition, None)

    # -- user features ---------------------------------------------------------------------------
    def _user_partition(self, partition: int) -> PartitionFeatures:
        pf = self.users.get(partition)
        if pf is None:
            c = self.config
            pf = features_state.restore_user_features(
                partition,
                self.user_table.data.items(),
                c.user_windows,
                c.track_windows,
                c.half_life_ms,
                self.settings.session_gap_ms,
            )
            self.users[partition] = pf
            log.info("user features: partition %d restored at watermark %d", partition, pf.watermark)
        return pf

    async def process_listens(self, events: Sequence[EventT]) -> None:
        """One batch of the user-features agent (module docstring)."""
        started = time.perf_counter()
        try:
            await self._process_listens(events)
        finally:
            self.stats.busy_s += time.perf_counter() - started

    async def _process_listens(self, events: Sequence[EventT]) -> None:
        now_ms = int(time.time() * 1000)
        by_partition: dict[int, list[Any]] = {}
        for event in events:
            by_partition.setdefault(event.message.partition, []).append(event.message)
        windows: list[tuple[int, UserWindowFeatures]] = []
        partials: list[Record] = []
        moved: list[int] = []
        checkpoints: list[tuple[int, PartitionFeatures, int]] = []
        n_partials = self.sources
        for partition, msgs in by_partition.items():
            pf = self._user_partition(partition)
            before = pf.watermark
            self._feed(pf, msgs, now_ms)
            closed, panes = pf.advance()
            windows += [(partition, w) for w in closed]
            for partial in panes:
                key, value = features_state.encode_partial(partial)
                partials.append((key, value, partial.pane_start, []))
            if pf.watermark > before:
                moved.append(partition)
            checkpoints.append((partition, pf, msgs[-1].offset))
        self.stats.batches += 1
        producer = self.app.producer._ensure_producer()  # the aiokafka producer (batch API)
        pending: list[asyncio.Future[Any]] = []
        if windows:
            pending += await self._send_user_features(producer, windows)
        by_target: dict[int, list[Record]] = {}
        for record in partials:
            by_target.setdefault(partition_of(record[0] or b"", n_partials), []).append(record)
        for target, records in by_target.items():
            pending += await send_records(producer, self.partials_topic, target, records)
        self.stats.partials += len(partials)
        if pending:
            await asyncio.gather(*pending)  # partials are on the broker before the watermarks
        if moved:
            marks: list[asyncio.Future[Any]] = []
            for partition in moved:
                pf = self.users[partition]
                headers = watermark_headers(pf.watermark) + [
                    (features_state.SOURCE_PARTITION_HEADER, str(partition).encode())
                ]
                for target in range(n_partials):
                    marks += await send_records(
                        producer, self.partials_topic, target, [(None, b"", None, headers)]
                    )
            await asyncio.gather(*marks)
        changelog = self.user_table.changelog_topic.get_topic_name()
        for partition, pf, offset in checkpoints:
            records = features_state.user_feature_records(pf, offset)
            if records:
                await send_records(producer, changelog, partition, [(k, v, None, []) for k, v in records])

    def _feed(self, pf: PartitionFeatures, msgs: list[Any], now_ms: int) -> None:
        control = [bool(m.headers) and is_control(m.headers) for m in msgs]
        decoder = self._decoder
        assert decoder is not None, "start() first"
        records, _errors = decoder.decode_many([m.value for m, c in zip(msgs, control, strict=True) if not c])
        s = self.stats
        j = 0
        for m, is_ctl in zip(msgs, control, strict=True):
            if is_ctl:
                s.control_records += 1
                mark = watermark_of(m.headers)
                if mark is not None:
                    pf.advance_watermark(mark)
                continue
            record = records[j]
            j += 1
            s.listens_in += 1
            if record is None or validate_listen(record, now_ms) is not None:
                s.invalid += 1
                continue
            pf.add(record, m.offset)

    async def _send_user_features(
        self, producer: Any, windows: list[tuple[int, UserWindowFeatures]]
    ) -> list[asyncio.Future[Any]]:
        encoder = self._user_encoder
        assert encoder is not None, "start() first"
        half_life = self.config.half_life_ms
        values = encoder.encode_many(
            {
                "event_id": w.event_id,
                "user_id": w.user_id,
                "occurred_at": w.window_end,
                "feature_set": FEATURE_SET,
                "window_start": w.window_start,
                "window_end": w.window_end,
                "window_size_ms": w.spec.size_ms,
                "window_step_ms": w.spec.step_ms,
                "grace_ms": w.spec.grace_ms,
                "plays": w.plays,
                "distinct_artists": w.distinct_artists,
                "distinct_tracks": w.distinct_tracks,
                "sessions": w.sessions,
                "session_ms_mean": w.session_ms_mean,
                "session_ms_p50": w.session_ms_p50,
                "session_ms_max": w.session_ms_max,
                "top_artists": [{"artist_id": a, "affinity": v} for a, v in w.top_artists],
                "affinity_half_life_ms": half_life,
            }
            for _, w in windows
        )
        full_name = get_schema(USER_TYPE).full_name
        n = self._topic_partitions(self.config.users_topic)
        by_partition: dict[int, list[Record]] = {}
        for (partition, w), value in zip(windows, values, strict=True):
            headers = ce_headers(
                event_id=w.event_id, event_type=full_name, source=SOURCE_URI, time_ms=w.window_end
            )
            by_partition.setdefault(partition % n, []).append(
                (w.user_id.encode(), value, w.window_end, headers)
            )
        pending: list[asyncio.Future[Any]] = []
        for partition, records in by_partition.items():
            pending += await send_records(producer, self.config.users_topic, partition, records)
        self.stats.user_features += len(windows)
        return pending

    def _topic_partitions(self, name: str) -> int:
        for spec in self.config.topic_specs(self.app.conf.id, self.sources):
            if spec.name == name:
                return spec.partitions
        return self.sources

    # -- track features --------------------------------------------------------------------------
    def _track_partition(self, q: int) -> TrackWindows:
        tw = self.tracks.get(q)
        if tw is None:
            c = self.config
            tw = features_state.restore_track_features(
                q,
                self.track_table.data.items(),
                c.user_windows,
                self.sources,
                c.baseline_windows,
                c.track_min_plays,
            )
            self.tracks[q] = tw
            log.info("track features: partition %d restored at watermark %d", q, tw.watermark)
        return tw

    async def process_partials(self, events: Sequence[EventT]) -> None:
        """One batch of the track-features agent (module docstring)."""
        started = time.perf_counter()
        try:
            await self._process_partials(events)
        finally:
            self.stats.busy_s += time.perf_counter() - started

    async def _process_partials(self, events: Sequence[EventT]) -> None:
        by_partition: dict[int, list[Any]] = {}
        for event in events:
            by_partition.setdefault(event.message.partition, []).append(event.message)
        out: list[tuple[int, TrackWindowFeatures]] = []
        touched: list[tuple[int, TrackWindows]] = []
        for q, msgs in by_partition.items():
            tw = self._track_partition(q)
            for m in msgs:
                headers = m.headers or ()
                if headers and is_control(headers):
                    mark = watermark_of(headers)
                    source = dict(headers).get(features_state.SOURCE_PARTITION_HEADER)
                    if mark is not None and source is not None:
                        tw.advance_watermark(int(source), mark)
                    continue
                try:
                    tw.add(features_state.decode_partial(m.key or b"", m.value or b"", self._specs))
                except (ValueError, TypeError) as exc:  # written by this app: a bug, say so loudly
                    log.error(
                        "track features: skipping a malformed partial at %s[%d]@%d: %s",
                        m.topic,
                        m.partition,
                        m.offset,
                        exc,
                    )
            out += [(q, f) for f in tw.advance()]
            touched.append((q, tw))
        producer = self.app.producer._ensure_producer()
        if out:
            await asyncio.gather(*await self._send_track_features(producer, out))
        changelog = self.track_table.changelog_topic.get_topic_name()
        for q, tw in touched:
            records = features_state.track_feature_records(q, tw)
            if records:
                await send_records(producer, changelog, q, [(k, v, None, []) for k, v in records])

    async def _send_track_features(
        self, producer: Any, features: list[tuple[int, TrackWindowFeatures]]
    ) -> list[asyncio.Future[Any]]:
        encoder = self._track_encoder
        assert encoder is not None, "start() first"
        values = encoder.encode_many(
            {
                "event_id": f.event_id,
                "track_id": f.track_id,
                "artist_id": f.artist_id,
                "occurred_at": f.window_end,
                "feature_set": FEATURE_SET,
                "window_start": f.window_start,
                "window_end": f.window_end,
                "window_size_ms": f.spec.size_ms,
                "window_step_ms": f.spec.step_ms,
                "grace_ms": f.spec.grace_ms,
                "plays": f.plays,
                "listeners": f.listeners,
                "trending_score": f.trending_score,
                "baseline_plays_mean": f.baseline_plays_mean,
                "baseline_windows": f.baseline_windows,
            }
            for _, f in features
        )
        full_name = get_schema(TRACK_TYPE).full_name
        n = self._topic_partitions(self.config.tracks_topic)
        by_partition: dict[int, list[Record]] = {}
        for (q, f), value in zip(features, values, strict=True):
            headers = ce_headers(
                event_id=f.event_id, event_type=full_name, source=SOURCE_URI, time_ms=f.window_end
            )
            by_partition.setdefault(q % n, []).append((f.track_id.encode(), value, f.window_end, headers))
        pending: list[asyncio.Future[Any]] = []
        for partition, records in by_partition.items():
            pending += await send_records(producer, self.config.tracks_topic, partition, records)
        self.stats.track_features += len(features)
        return pending

    def stats_dict(self) -> dict[str, Any]:
        """Counters, per-spec counters of every partition summed, and the watermarks."""
        out: dict[str, Any] = dict(vars(self.stats))
        out["busy_s"] = round(out["busy_s"], 3)
        per_spec: dict[str, dict[str, int]] = {}
        for pf in self.users.values():
            for name, counters in pf.counters_dict().items():
                acc = per_spec.setdefault(name, {})
                for k, v in counters.items():
                    acc[k] = acc.get(k, 0) + v
        out["windows"] = per_spec
        out["watermarks"] = {p: pf.watermark for p, pf in sorted(self.users.items())}
        out["track_watermarks"] = {q: tw.watermark for q, tw in sorted(self.tracks.items())}
        out["stale_partials"] = sum(tw.stale for tw in self.tracks.values())
        return out


def register(app: BackbeatApp, source_topic: Any, config: FeaturesConfig) -> FeatureAgents:
    """Define the feature tables and agents on ``app`` (reading ``source_topic``)."""
    partitions = app.conf.topic_partitions
    user_table = app.Table(FEATURES_TABLE, partitions=partitions, key_type=bytes, value_type=bytes)
    track_table = app.Table(TRACK_TABLE, partitions=partitions, key_type=bytes, value_type=bytes)
    agents = FeatureAgents(app, user_table, track_table, config)
    partials = app.topic(
        partials_topic(app.conf.id), key_serializer="raw", value_serializer="raw", partitions=partitions
    )
    batch = app.ingest_config.batch
    within = app.ingest_config.batch_within_s

    @app.agent(source_topic, name="user-features")
    async def user_features(stream: Any) -> None:
        """Batches of listens → user window features and track pane partials."""
        await agents.start()
        async for events in stream.take_events(batch, within=within):
            await agents.process_listens(events)

    @app.agent(partials, name="track-features")
    async def track_features(stream: Any) -> None:
        """Batches of partials → track window features."""
        await agents.start()
        async for events in stream.take_events(batch, within=within):
            await agents.process_partials(events)

    @app.on_partitions_revoked.connect
    async def on_revoked(sender: Any, revoked: Set[TP], **kwargs: Any) -> None:
        agents.forget(revoked)

    @app.timer(app.ingest_config.stats_interval_s)
    async def log_stats() -> None:
        """Log the counters as one JSON line (``features stats {...}``)."""
        log.info("features stats %s", json.dumps(agents.stats_dict(), sort_keys=True))

    return agents
