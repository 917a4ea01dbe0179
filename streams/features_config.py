"""Configuration of the feature agents, from ``BACKBEAT_FEATURES_*`` environment variables.

=======================================  =================================================
variable                                 meaning (default)
=======================================  =================================================
``BACKBEAT_FEATURES_USER_WINDOWS``       hopping windows of the user features, SIZE/STEP
                                         list (``1h/5m,1d/1h``); every step a multiple of
                                         the first window's step
``BACKBEAT_FEATURES_TRACK_WINDOWS``      hopping windows of the track features, a subset of
                                         the user windows (``1h/5m``)
``BACKBEAT_FEATURES_GRACE``              grace period for late listens (``10m``)
``BACKBEAT_FEATURES_HALF_LIFE``          half-life of the artist affinity decay (``7d``)
``BACKBEAT_FEATURES_BASELINE_WINDOWS``   earlier windows in a trending baseline (``24``)
``BACKBEAT_FEATURES_TRACK_MIN_PLAYS``    emit a track window with at least this many plays
                                         (``2``; ``1`` emits every window)
``BACKBEAT_FEATURES_USERS_TOPIC``        user features out (``personalisation.features.users``)
``BACKBEAT_FEATURES_TRACKS_TOPIC``       track features out (``personalisation.features.tracks``)
=======================================  =================================================

Durations take a unit: ``ms``, ``s``, ``m``, ``h``, ``d``. Track windows default to 1 h/5 min
only, and to windows with at least 2 plays: hopping windows emit ``size / step`` values per
listen of a rarely played track, and on the 30Music file 97% of the 984,354 track windows of
1 h/5 min hold a single play (33,870 hold two or more; a 1 d/1 h window would add about 2
million). Lower the threshold or add ``1d/1h`` when you want them.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

from events.catalog import TopicSpec, topic
from events.control import END_OF_INPUT_MS
from infra.errors import ConfigError
from streams.windows import HoppingWindows, parse_duration_ms, parse_windows

USERS_TOPIC = "personalisation.features.users"
TRACKS_TOPIC = "personalisation.features.tracks"
FEATURES_TABLE = "features"
TRACK_TABLE = "track-features"


@dataclass(frozen=True)
class FeaturesConfig:
    """Resolved feature-agent configuration (see the module docstring)."""

    user_windows: tuple[HoppingWindows, ...]
    track_windows: tuple[int, ...]  # indices into user_windows
    grace_ms: int
    half_life_ms: int
    baseline_windows: int = 24
    track_min_plays: int = 2
    users_topic: str = USERS_TOPIC
    tracks_topic: str = TRACKS_TOPIC

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> FeaturesConfig:
        """Read ``BACKBEAT_FEATURES_*`` (from ``environ`` or ``os.environ``).

        Raises:
            ConfigError: a malformed duration or window, track windows that are not user
                windows, steps that do not nest, or a non-positive baseline.
        """
        env = dict(os.environ if environ is None else environ)
        grace = parse_duration_ms(env.get("BACKBEAT_FEATURES_GRACE") or "10m")
        users = parse_windows(env.get("BACKBEAT_FEATURES_USER_WINDOWS") or "1h/5m,1d/1h", grace)
        tracks = parse_windows(env.get("BACKBEAT_FEATURES_TRACK_WINDOWS") or "1h/5m", grace)
        missing = [t.name for t in tracks if t not in users]
        if missing:
            raise ConfigError(
                f"BACKBEAT_FEATURES_TRACK_WINDOWS has {', '.join(missing)}, which is not among "
                f"the user windows ({', '.join(u.name for u in users)}); add it there too"
            )
        if any(u.step_ms % users[0].step_ms for u in users):
            raise ConfigError(
                f"every user window step must be a multiple of the first ({users[0].name}); "
                "list the finest window first"
            )
        longest = max(u.size_ms for u in users) + grace
        if longest > END_OF_INPUT_MS:
            raise ConfigError(
                f"the longest window plus grace ({longest} ms) exceeds the closing watermark of an "
                f"import ({END_OF_INPUT_MS} ms past its last listen): the last windows would never close"
            )
        raw = env.get("BACKBEAT_FEATURES_BASELINE_WINDOWS") or "24"
        if not raw.isdigit() or int(raw) <= 0:
            raise ConfigError(f"BACKBEAT_FEATURES_BASELINE_WINDOWS={raw!r} must be a positive integer")
        min_raw = env.get("BACKBEAT_FEATURES_TRACK_MIN_PLAYS") or "2"
        if not min_raw.isdigit() or int(min_raw) <= 0:
            raise ConfigError(f"BACKBEAT_FEATURES_TRACK_MIN_PLAYS={min_raw!r} must be a positive integer")
        return cls(
            user_windows=users,
            track_windows=tuple(users.index(t) for t in tracks),
            grace_ms=grace,
            half_life_ms=parse_duration_ms(env.get("BACKBEAT_FEATURES_HALF_LIFE") or "7d"),
            baseline_windows=int(raw),
            track_min_plays=int(min_raw),
            users_topic=env.get("BACKBEAT_FEATURES_USERS_TOPIC") or USERS_TOPIC,
            tracks_topic=env.get("BACKBEAT_FEATURES_TRACKS_TOPIC") or TRACKS_TOPIC,
        )

    @property
    def specs_by_name(self) -> dict[str, HoppingWindows]:
        """User windows by name (``"1h/5m"``)."""
        return {w.name: w for w in self.user_windows}

    def horizon_ms(self) -> int:
        """How far past the last event a watermark must go to close every window."""
        return max(w.size_ms for w in self.user_windows) + self.grace_ms

    def topic_specs(self, app_id: str, source_partitions: int) -> list[TopicSpec]:
        """The topics the feature agents need: the two feature topics (catalogue entries,
        renamed when overridden), the internal partials topic and both changelogs (compacted,
        as many partitions as the source)."""
        users = dataclasses.replace(topic(USERS_TOPIC), name=self.users_topic)
        tracks = dataclasses.replace(topic(TRACKS_TOPIC), name=self.tracks_topic)
        internal = [
            TopicSpec(
                name=partials_topic(app_id),
                partitions=source_partitions,
                cleanup_policy="delete",
                key="track_id",
                doc="Internal: per-partition track pane partials and forwarded watermarks.",
            ),
            TopicSpec(
                name=f"{app_id}-{FEATURES_TABLE}-changelog",
                partitions=source_partitions,
                cleanup_policy="compact",
                key="w|u|t|a:<partition>:…",
                doc="Checkpoints of the user-features agent (streams.features_state).",
            ),
            TopicSpec(
                name=f"{app_id}-{TRACK_TABLE}-changelog",
                partitions=source_partitions,
                cleanup_policy="compact",
                key="w|t:<partition>:…",
                doc="Checkpoints of the track-features agent (streams.features_state).",
            ),
        ]
        return [users, tracks, *internal]


def partials_topic(app_id: str) -> str:
    """The internal topic of track pane partials (Faust-style name, prefixed by the app id)."""
    return f"{app_id}-track-panes"
