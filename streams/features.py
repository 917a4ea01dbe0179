"""The feature agents: ``playback.listens`` → per-user window features
(``UserFeaturesComputed`` on ``personalisation.features.users``) and, through an internal topic
of per-partition track pane partials, per-track window features with a trending score
(``TrackFeaturesComputed`` on ``personalisation.features.tracks``).

* **user-features** (:class:`UserFeatures`, source: the listens): each source partition's
  :class:`streams.user_features.PartitionFeatures` takes the valid listens (the runtime
  dead-letters the invalid ones to ``playback.listens.dlq``, as listening ingest does); watermark
  control records advance its watermark. After each batch: closed user windows →
  ``UserFeaturesComputed`` (partition = source partition, key = user id, record time = window
  end); closed track panes → partials on ``<app id>-track-panes`` (partition by murmur2 of the
  track id, as Kafka's default partitioner), then the partition's watermark forwarded to every
  partials partition (a control record with ``bb_source_partition``; the producer keeps each
  partition's order, so a watermark never overtakes the partials before it).
* **track-features** (:class:`TrackFeatures`, source: the partials topic):
  :class:`streams.track_features.TrackWindows` per partition; closed windows →
  ``TrackFeaturesComputed`` (same partition, key = track id).

Checkpoints are :mod:`streams.features_state`; outputs, order and restarts are the runtime's
(:mod:`streams.runtime.runner`): after a crash the same windows with the same ids, none
published twice. Partials need no such care: a partial is *set* under its (window, pane, track,
source partition), so one delivered twice changes nothing. The tracks' watermark is the
minimum of the source partitions' watermarks: an idle source partition holds track windows open
until it receives a listen or a watermark (importers send one at the end).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from aiokafka.partitioner import murmur2

from events.control import watermark_headers
from events.validation import Validator, validate_listen
from streams import features_state
from streams.config import IngestConfig
from streams.features_config import FEATURES_TABLE, TRACK_TABLE, FeaturesConfig, partials_topic
from streams.runtime.agent import BatchAgent, ChangelogRecord, Emit, PartitionBatch, Raw, Result
from streams.track_features import TrackWindowFeatures, TrackWindows
from streams.user_features import FEATURE_SET, PartitionFeatures, UserWindowFeatures

log = logging.getLogger(__name__)

USER_TYPE = "UserFeaturesComputed"
TRACK_TYPE = "TrackFeaturesComputed"
SOURCE_URI = "/streams/features"


def partition_of(key: bytes, partitions: int) -> int:
    """Kafka's default partition of ``key`` (murmur2, as the Java client and aiokafka do)."""
    return (murmur2(key) & 0x7FFFFFFF) % partitions


def _topic_partitions(config: FeaturesConfig, app_id: str, sources: int, name: str) -> int:
    for spec in config.topic_specs(app_id, sources):
        if spec.name == name:
            return spec.partitions
    return sources


class UserFeatures(BatchAgent):
    """The user-features agent (module docstring). ``sources``: partitions of the listens topic
    (also those of the partials topic); ``gap_ms``: the session gap."""

    name = "user-features"
    stats_name = "features"
    source_uri = SOURCE_URI
    count_names = ("user_features", "partials", "invalid")

    def __init__(self, config: FeaturesConfig, ingest: IngestConfig, gap_ms: int, sources: int) -> None:
        self.config = config
        self.ingest = ingest
        self.gap_ms = gap_ms
        self.sources = sources
        self.partials_topic = partials_topic(ingest.app_id)
        self.users_partitions = _topic_partitions(config, ingest.app_id, sources, config.users_topic)
        self.partitions: dict[int, PartitionFeatures] = {}

    @property
    def source_topic(self) -> str:
        """The listens (``BACKBEAT_INGEST_SOURCE_TOPIC``)."""
        return self.ingest.source_topic

    @property
    def changelog_topic(self) -> str:
        """``<app id>-features-changelog``."""
        return f"{self.ingest.app_id}-{FEATURES_TABLE}-changelog"

    @property
    def output_topics(self) -> Sequence[str]:
        """User features and partials. Invalid listens are counted (``invalid``), not
        dead-lettered: listening ingest reads the same records with the same rule and owns their
        dead-letter topic, which then holds each bad listen once."""
        return (self.config.users_topic, self.partials_topic)

    @property
    def event_types(self) -> Mapping[str, str]:
        """``UserFeaturesComputed`` on the users topic."""
        return {self.config.users_topic: USER_TYPE}

    def validator(self) -> Validator:
        """:func:`events.validation.validate_listen`."""
        return validate_listen

    def restore(self, partition: int, items: Mapping[bytes, bytes]) -> None:
        """The partition's feature state from its checkpoint records."""
        c = self.config
        pf = features_state.restore_user_features(
            partition, items.items(), c.user_windows, c.track_windows, c.half_life_ms, self.gap_ms
        )
        self.partitions[partition] = pf
        log.info("user features: partition %d restored at watermark %d", partition, pf.watermark)

    def process(self, batch: PartitionBatch, now_ms: int) -> Result:
        """Feed the listens; emit the user windows and track panes the watermark closed."""
        p = batch.partition
        pf = self.partitions[p]
        before = pf.counters_dict()
        w0 = pf.watermark
        add = pf.add
        marks = batch.marks
        for i, (record, offset) in enumerate(zip(batch.records, batch.offsets, strict=True)):
            if record is None:
                mark = marks.get(i)
                if mark is not None:
                    pf.advance_watermark(mark)
                continue
            add(record, offset)
        windows, panes = pf.advance()
        half_life = self.config.half_life_ms
        users_topic = self.config.users_topic
        target = p % self.users_partitions
        emits = [self._user_emit(w, users_topic, target, half_life) for w in windows]
        raws: list[Raw] = []
        n = self.sources
        for partial in panes:
            key, value = features_state.encode_partial(partial)
            raws.append(Raw(self.partials_topic, partition_of(key, n), key, value, partial.pane_start, []))
        if pf.watermark > w0:
            headers = watermark_headers(pf.watermark) + [
                (features_state.SOURCE_PARTITION_HEADER, str(p).encode())
            ]
            raws += [Raw(self.partials_topic, q, None, b"", None, headers) for q in range(n)]
        counts = {"user_features": len(emits), "partials": len(panes)}
        for name, after in pf.counters_dict().items():
            for k, v in after.items():
                delta = v - before.get(name, {}).get(k, 0)
                if delta:
                    counts[f"window {name} {k}"] = delta
        return Result(emits=emits, raws=raws, counts=counts)

    @staticmethod
    def _user_emit(w: UserWindowFeatures, topic: str, partition: int, half_life: int) -> Emit:
        event_id = w.event_id  # a SHA-256: computed once
        record = {
            "event_id": event_id,
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
        return Emit(topic, partition, w.user_id.encode(), USER_TYPE, record, event_id, w.window_end)

    def checkpoint(self, partition: int, offset: int) -> Iterable[ChangelogRecord]:
        """Entries changed since the last checkpoint, the partition record, tombstones."""
        return features_state.user_feature_records(self.partitions[partition], offset)

    def revoke(self, partition: int) -> None:
        """Drop the partition's state."""
        self.partitions.pop(partition, None)

    def state_entries(self) -> int:
        """Keys of state across the assigned partitions: user panes, track panes and artist
        affinities (``len`` of each dict, safe while the agent runs)."""
        return sum(len(pf.user_panes) + len(pf.track_panes) + len(pf.affinity)
                   for pf in list(self.partitions.values()))  # fmt: skip

    def stats(self, counts: Mapping[str, int]) -> dict[str, Any]:
        """Per-window counters (``windows``) and the partition watermarks."""
        windows: dict[str, dict[str, int]] = {}
        for key, n in counts.items():
            if key.startswith("window "):
                name, _, field = key[len("window ") :].rpartition(" ")
                windows.setdefault(name, {})[field] = n
        return {
            "windows": windows,
            "watermarks": {p: pf.watermark for p, pf in sorted(self.partitions.items())},
        }

    def reconciles(self, counts: Mapping[str, int]) -> bool:
        """Every listen is counted once: ``records_in = invalid + accepted + late + duplicates +
        replayed`` of the first window spec."""
        first = self.config.user_windows[0].name
        taken = sum(
            counts.get(f"window {first} {k}", 0) for k in ("accepted", "late", "duplicates", "replayed")
        )
        return counts.get("records_in", 0) == counts.get("invalid", 0) + taken


class TrackFeatures(BatchAgent):
    """The track-features agent (module docstring)."""

    name = "track-features"
    stats_name = "tracks"
    source_uri = SOURCE_URI
    count_names = ("track_features", "stale_partials")
    decodes = False  # the partials topic is internal JSON

    def __init__(self, config: FeaturesConfig, ingest: IngestConfig, sources: int) -> None:
        self.config = config
        self.ingest = ingest
        self.sources = sources
        self.tracks_partitions = _topic_partitions(config, ingest.app_id, sources, config.tracks_topic)
        self.partitions: dict[int, TrackWindows] = {}
        self._specs = config.specs_by_name

    @property
    def source_topic(self) -> str:
        """``<app id>-track-panes``."""
        return partials_topic(self.ingest.app_id)

    @property
    def changelog_topic(self) -> str:
        """``<app id>-track-features-changelog``."""
        return f"{self.ingest.app_id}-{TRACK_TABLE}-changelog"

    @property
    def output_topics(self) -> Sequence[str]:
        """Track features."""
        return (self.config.tracks_topic,)

    @property
    def event_types(self) -> Mapping[str, str]:
        """``TrackFeaturesComputed`` on the tracks topic."""
        return {self.config.tracks_topic: TRACK_TYPE}

    def restore(self, partition: int, items: Mapping[bytes, bytes]) -> None:
        """The partition's track windows from its checkpoint records."""
        c = self.config
        tw = features_state.restore_track_features(
            partition, items.items(), c.user_windows, self.sources, c.baseline_windows, c.track_min_plays
        )
        self.partitions[partition] = tw
        log.info("track features: partition %d restored at watermark %d", partition, tw.watermark)

    def process(self, batch: PartitionBatch, now_ms: int) -> Result:
        """Set the partials, forward the watermarks; emit the windows that closed."""
        q = batch.partition
        tw = self.partitions[q]
        stale = tw.stale
        bad = 0
        for i, m in enumerate(batch.messages):
            value = m.value()
            if not value:  # a forwarded watermark (a control record)
                mark = batch.marks.get(i)
                source = dict(m.headers() or ()).get(features_state.SOURCE_PARTITION_HEADER)
                if mark is not None and source is not None:
                    tw.advance_watermark(int(source), mark)
                continue
            try:
                tw.add(features_state.decode_partial(m.key() or b"", value, self._specs))
            except (ValueError, TypeError) as exc:  # written by the user-features agent: a bug
                bad += 1
                log.error("track features: skipping a malformed partial at %s[%d]@%d: %s",
                          m.topic(), m.partition(), m.offset(), exc)  # fmt: skip
        topic = self.config.tracks_topic
        target = q % self.tracks_partitions
        emits = [self._track_emit(f, topic, target) for f in tw.advance()]
        counts = {"track_features": len(emits), "stale_partials": tw.stale - stale}
        if bad:
            counts["malformed_partials"] = bad
        return Result(emits=emits, counts=counts)

    @staticmethod
    def _track_emit(f: TrackWindowFeatures, topic: str, partition: int) -> Emit:
        event_id = f.event_id  # a SHA-256: computed once
        record = {
            "event_id": event_id,
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
        return Emit(topic, partition, f.track_id.encode(), TRACK_TYPE, record, event_id, f.window_end)

    def checkpoint(self, partition: int, offset: int) -> Iterable[ChangelogRecord]:
        """Panes changed since the last checkpoint, the watermarks, tombstones."""
        return features_state.track_feature_records(partition, self.partitions[partition])

    def revoke(self, partition: int) -> None:
        """Drop the partition's state."""
        self.partitions.pop(partition, None)

    def state_entries(self) -> int:
        """Track panes held across the assigned partitions (per window spec and track)."""
        return sum(len(panes) for tw in list(self.partitions.values()) for panes in list(tw.track_panes))

    def stats(self, counts: Mapping[str, int]) -> dict[str, Any]:
        """The partitions' track watermarks."""
        return {"track_watermarks": {q: tw.watermark for q, tw in sorted(self.partitions.items())}}


__all__ = ["TRACK_TYPE", "USER_TYPE", "TrackFeatures", "UserFeatures", "partition_of"]
