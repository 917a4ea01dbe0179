"""Listening from playback, pure Python: the per-partition state machine that turns player events
(``playback.events``) into listens, and its checkpoint encoding.

One :class:`PlaysPartition` holds the state of one source partition (events are keyed by user, so
all of a user's events are in one partition, in the order the player sent them):

* **open sessions** (``session_id`` → user, country, last activity, the plays of the session
  that are still open and those that already ended);
* **open plays** (``playback_id`` → session, user, track, artist, start, last activity).

Rules, applied record by record in offset order (:meth:`PlaysPartition.apply`):

* ``PlaybackSessionStarted`` opens the session (its ``country`` is the territory of its plays);
  a second one for an open session is a **duplicate**.
* ``PlaybackStarted`` opens the play; one for a play that is open or already ended in its
  session is a **duplicate**. A play whose session is unknown (its ``PlaybackSessionStarted``
  never came) still counts: the session is opened implicitly with no country (the listen's
  ``territory`` is then null) and counted in ``plays_without_session``.
* ``PlaybackPaused`` / ``PlaybackResumed`` of an open play mark it active (``pauses``,
  ``resumes``); the end event carries ``ms_played``, heard time without pauses, so pauses change
  nothing else.
* ``PlaybackSkipped`` / ``PlaybackCompleted`` end the play (the first end of a play wins; a
  second end of it is a **duplicate**). With ``ms_played >= 30000`` (the 30-second rule,
  :data:`COUNT_THRESHOLD_MS`) the play is **counted**: it becomes a :class:`Listen`; below, it
  is a **short play**. Its id is remembered in its session so that, while the session is open,
  a redelivered end or start does nothing (after it, see ``docs/live-listening.md``: a listen
  computed again has the same ``event_id``, which the ingest agent and the read model drop).
* ``PlaybackSessionEnded`` drops the session: its ended play ids, and its plays still open, which
  never ended (``plays_abandoned``): without an end there is no ``ms_played``, so they never
  count.
* An end, pause or resume of a play that is not open, or the end of a session that is not open,
  is **unmatched** (its start never came, or its state was dropped by the session's end or by
  expiry; a redelivery long after the fact lands here too): it changes nothing.

Bounded state: besides the drops above, the partition's clock ``C`` (the largest event time seen,
or a control watermark) expires sessions and plays with no activity for :data:`EXPIRE_MS`
(24 h of event time): each time ``C`` enters a new hour (:data:`SWEEP_EVERY_MS`), every session
and play last active before ``C - EXPIRE_MS`` is dropped (``expired``). The sweeps depend only on
the sequence of records, never on batch boundaries, so a restored partition decides like an
uninterrupted one.

Every data record is counted once: ``records = sessions_started + sessions_ended +
plays_started + pauses + resumes + counted + short_plays + duplicates + unmatched``
(:data:`RECORD_COUNTS`; the agent adds ``dead_lettered``). ``plays_without_session``,
``plays_abandoned`` and ``expired`` are further figures, not part of that sum.

The listen (``ListenRecorded``, issue 17 decision 3): ``source = "player"``, ``occurred_at`` =
the play's start (``PlaybackStarted.occurred_at``), ``track_id`` and ``artist_id`` from
``PlaybackStarted`` (when the client sent no artist: :data:`UNKNOWN_ARTIST`), ``ms_played`` from
the end event, ``territory`` = the session's country, ``playback_id``, ``session_hint`` = the
player session id, ``event_id`` = :func:`events.importers.base.event_id` over ``("player",
playback_id)`` (so a recomputation has the same id; not the imported listens' ``source|user|time|
track``, because a live player stamps many events with the same ms and a user who plays one
track twice within it would get one id for two plays).

Checkpoint records (keys UTF-8, values compact JSON arrays; a key without value is a tombstone):

* ``s:<partition>:<session_id>`` → ``[user_id, country, seen_ms, opened, [open playback ids],
  [ended playback ids]]``;
* ``p:<partition>:<playback_id>`` → ``[session_id, user_id, track_id, artist_id, started_ms,
  seen_ms]``;
* ``c:<partition>`` → ``[clock_ms, sweep_bucket]``.

The runtime writes them with its position record as one checkpoint (a half-written one is
undone at recovery, :mod:`streams.runtime.store`), so restore needs no per-entry offsets.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from typing import Any, NamedTuple

from events.importers.base import event_id
from events.player import (
    COMPLETED,
    EVENT_TYPES,
    PAUSED,
    RESUMED,
    SESSION_ENDED,
    SESSION_STARTED,
    SKIPPED,
    STARTED,
)

#: The 30-second rule (issue 17 decision 4): a play counts when at least this many ms were heard.
COUNT_THRESHOLD_MS = 30_000
#: Sessions and plays with no activity for this long (event time, ms) are dropped.
EXPIRE_MS = 86_400_000
#: The expiry sweep runs each time the partition clock enters a new bucket of this many ms.
SWEEP_EVERY_MS = 3_600_000
#: ``ListenRecorded.source`` of listens derived from player events.
SOURCE = "player"
#: ``ListenRecorded.artist_id`` (required by the schema) when ``PlaybackStarted`` had none.
UNKNOWN_ARTIST = "ar-unknown"

#: The event types of ``playback.events`` (short names; full names are ``backbeat.playback.*``).
KINDS = EVENT_TYPES

#: The counters every data record goes to exactly one of.
RECORD_COUNTS = (
    "sessions_started", "sessions_ended", "plays_started", "pauses", "resumes", "counted",
    "short_plays", "duplicates", "unmatched",
)  # fmt: skip
#: Further figures (not part of the reconciliation).
OTHER_COUNTS = ("plays_without_session", "plays_abandoned", "expired")

_dumps = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode
_loads = json.loads


def kind_of(record: Mapping[str, Any]) -> str | None:
    """The event type (short name) of a decoded ``playback.events`` record, told by the fields
    only its schema has (the decoder gives no type; ``tests/streams/test_playback_state.py``
    checks this against every schema file); ``None`` for a record of none of them."""
    if "playback_id" not in record:
        if "device_type" in record:
            return SESSION_STARTED
        if "started_at" in record and "plays" in record:
            return SESSION_ENDED
        return None
    if "context_type" in record:
        return STARTED
    if "paused_ms" in record:
        return RESUMED
    if "reason" in record:
        return SKIPPED if "position_ms" in record else None
    if "position_ms" in record:
        return PAUSED
    if "duration_ms" in record and "ms_played" in record:
        return COMPLETED
    return None


def _ok(value: object) -> bool:
    return type(value) is str and bool(value) and not value.isspace()


def validate_player_event(record: Mapping[str, Any], now_ms: int | None = None) -> str | None:
    """Why a decoded ``playback.events`` record breaks a rule, or ``None`` when it is valid.

    Rules: it is one of :data:`KINDS` (:func:`kind_of`); ``user_id``, ``session_id`` (and for a
    play's events ``playback_id`` and ``track_id``) are non-blank; ``occurred_at`` > 0;
    ``ms_played`` (when present) >= 0. ``now_ms`` is unused (player clocks are not checked
    against the worker's).
    """
    kind = kind_of(record)
    if kind is None:
        return "not a playback event (its fields match none of " + ", ".join(KINDS) + ")"
    names = ("user_id", "session_id") if kind in (SESSION_STARTED, SESSION_ENDED) else (
        "user_id", "session_id", "playback_id", "track_id")  # fmt: skip
    for name in names:
        if not _ok(record.get(name)):
            return f"{name} is missing or blank"
    occurred = record.get("occurred_at")
    if type(occurred) is not int or occurred <= 0:
        return f"occurred_at={occurred!r} is not a positive time in ms"
    played = record.get("ms_played")
    if played is not None and played < 0:
        return f"ms_played={played} is negative"
    return None


def listen_event_id(playback_id: str) -> str:
    """``ListenRecorded.event_id`` of a play (module docstring): one id per play."""
    return event_id(SOURCE, playback_id)


class Listen(NamedTuple):
    """A counted play, as the fields of a ``ListenRecorded`` (module docstring)."""

    event_id: str
    user_id: str
    track_id: str
    artist_id: str
    occurred_at: int
    ms_played: int
    territory: str | None
    playback_id: str
    session_id: str

    def record(self) -> dict[str, Any]:
        """The ``ListenRecorded`` dict."""
        return {
            "event_id": self.event_id,
            "user_id": self.user_id,
            "track_id": self.track_id,
            "artist_id": self.artist_id,
            "occurred_at": self.occurred_at,
            "source": SOURCE,
            "ms_played": self.ms_played,
            "track_name": None,
            "artist_name": None,
            "session_hint": self.session_id,
            "territory": self.territory,
            "playback_id": self.playback_id,
        }


class Session:
    """An open player session (module docstring)."""

    __slots__ = ("user_id", "country", "seen", "opened", "open", "ended")

    def __init__(
        self, user_id: str, country: str | None, seen: int, opened: bool,
        open_: Iterable[str] = (), ended: Iterable[str] = (),
    ) -> None:  # fmt: skip
        self.user_id = user_id
        self.country = country
        self.seen = seen
        self.opened = opened  # False: opened implicitly by a play (no PlaybackSessionStarted yet)
        self.open: set[str] = set(open_)
        self.ended: set[str] = set(ended)

    def encode(self) -> bytes:
        """The checkpoint value."""
        return _dumps(
            [self.user_id, self.country, self.seen, self.opened, sorted(self.open), sorted(self.ended)]
        ).encode()

    @classmethod
    def decode(cls, value: bytes) -> Session:
        """Inverse of :meth:`encode`.

        Raises:
            ValueError: not a session checkpoint.
        """
        user, country, seen, opened, open_, ended = _loads(value)
        return cls(user, country, int(seen), bool(opened), open_, ended)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Session) and self.encode() == other.encode()

    def __repr__(self) -> str:
        return f"Session({self.encode().decode()})"


class Play:
    """An open play (module docstring)."""

    __slots__ = ("session_id", "user_id", "track_id", "artist_id", "started_at", "seen")

    def __init__(
        self, session_id: str, user_id: str, track_id: str, artist_id: str | None, started_at: int, seen: int
    ) -> None:
        self.session_id = session_id
        self.user_id = user_id
        self.track_id = track_id
        self.artist_id = artist_id
        self.started_at = started_at
        self.seen = seen

    def encode(self) -> bytes:
        """The checkpoint value."""
        return _dumps(
            [self.session_id, self.user_id, self.track_id, self.artist_id, self.started_at, self.seen]
        ).encode()

    @classmethod
    def decode(cls, value: bytes) -> Play:
        """Inverse of :meth:`encode`.

        Raises:
            ValueError: not a play checkpoint.
        """
        sid, user, track, artist, started, seen = _loads(value)
        return cls(sid, user, track, artist, int(started), int(seen))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Play) and self.encode() == other.encode()

    def __repr__(self) -> str:
        return f"Play({self.encode().decode()})"


class PlaysPartition:
    """The state of one source partition (module docstring). ``threshold_ms``: the counting rule;
    ``expire_ms``: inactivity after which sessions and plays are dropped."""

    def __init__(
        self, partition: int = 0, threshold_ms: int = COUNT_THRESHOLD_MS, expire_ms: int = EXPIRE_MS
    ) -> None:
        self.partition = partition
        self.threshold = threshold_ms
        self.expire = expire_ms
        self.sessions: dict[str, Session] = {}
        self.plays: dict[str, Play] = {}
        self.clock = -1
        self.bucket = -1
        self.counts: dict[str, int] = {}
        self._dirty_sessions: set[str] = set()
        self._dirty_plays: set[str] = set()
        self._clock_dirty = False

    # -- rules -----------------------------------------------------------------------------------
    def _count(self, name: str, n: int = 1) -> None:
        self.counts[name] = self.counts.get(name, 0) + n

    def take_counts(self) -> dict[str, int]:
        """The counter increments since the last call."""
        out, self.counts = self.counts, {}
        return out

    def apply(self, record: Mapping[str, Any], kind: str | None = None) -> Listen | None:
        """Apply one valid record (``kind``: its type, else :func:`kind_of`); returns the listen
        it completes, if any."""
        kind = kind or kind_of(record)
        t = record["occurred_at"]
        if t > self.clock:
            self._advance(t)
        if kind == STARTED:
            self._started(record, t)
            return None
        if kind == SKIPPED or kind == COMPLETED:
            return self._ended(record, t)
        if kind == PAUSED or kind == RESUMED:
            play = self.plays.get(record["playback_id"])
            if play is None:
                self._count("unmatched")
            else:
                self._touch(record["playback_id"], play, t)
                self._count("pauses" if kind == PAUSED else "resumes")
            return None
        if kind == SESSION_STARTED:
            self._session_started(record, t)
        elif kind == SESSION_ENDED:
            self._session_ended(record)
        else:
            raise ValueError(f"not a playback event: {sorted(record)}")
        return None

    def _touch(self, pid: str, play: Play, t: int) -> None:
        if t > play.seen:
            play.seen = t
            self._dirty_plays.add(pid)
        session = self.sessions.get(play.session_id)
        if session is not None and t > session.seen:
            session.seen = t
            self._dirty_sessions.add(play.session_id)

    def _session_started(self, record: Mapping[str, Any], t: int) -> None:
        sid = record["session_id"]
        session = self.sessions.get(sid)
        if session is not None and session.opened:
            self._count("duplicates")
            return
        if session is None:
            self.sessions[sid] = Session(record["user_id"], record.get("country"), t, True)
        else:  # opened by a play that came first
            session.opened = True
            session.country = record.get("country")
            session.seen = max(session.seen, t)
        self._dirty_sessions.add(sid)
        self._count("sessions_started")

    def _session_ended(self, record: Mapping[str, Any]) -> None:
        sid = record["session_id"]
        session = self.sessions.pop(sid, None)
        if session is None:
            self._count("unmatched")
            return
        self._dirty_sessions.add(sid)
        for pid in session.open:
            if self.plays.pop(pid, None) is not None:
                self._dirty_plays.add(pid)
                self._count("plays_abandoned")
        self._count("sessions_ended")

    def _started(self, record: Mapping[str, Any], t: int) -> None:
        pid = record["playback_id"]
        sid = record["session_id"]
        session = self.sessions.get(sid)
        if pid in self.plays or (session is not None and pid in session.ended):
            self._count("duplicates")
            return
        if session is None:
            session = self.sessions[sid] = Session(record["user_id"], None, t, False)
            self._count("plays_without_session")
        elif t > session.seen:
            session.seen = t
        session.open.add(pid)
        self._dirty_sessions.add(sid)
        self.plays[pid] = Play(sid, record["user_id"], record["track_id"], record.get("artist_id"), t, t)
        self._dirty_plays.add(pid)
        self._count("plays_started")

    def _ended(self, record: Mapping[str, Any], t: int) -> Listen | None:
        pid = record["playback_id"]
        play = self.plays.pop(pid, None)
        if play is None:
            session = self.sessions.get(record["session_id"])
            self._count("duplicates" if session is not None and pid in session.ended else "unmatched")
            return None
        self._dirty_plays.add(pid)
        session = self.sessions.get(play.session_id)
        country = None
        if session is not None:
            session.open.discard(pid)
            session.ended.add(pid)
            session.seen = max(session.seen, t)
            self._dirty_sessions.add(play.session_id)
            country = session.country
        played = record["ms_played"]
        if played < self.threshold:
            self._count("short_plays")
            return None
        self._count("counted")
        return Listen(
            listen_event_id(pid),
            play.user_id,
            play.track_id,
            play.artist_id or UNKNOWN_ARTIST,
            play.started_at,
            played,
            country,
            pid,
            play.session_id,
        )

    # -- time ------------------------------------------------------------------------------------
    def advance(self, watermark_ms: int) -> None:
        """A control watermark: raise the clock to it (never down) and sweep when due."""
        if watermark_ms > self.clock:
            self._advance(watermark_ms)

    def _advance(self, t: int) -> None:
        self.clock = t
        self._clock_dirty = True
        bucket = t // SWEEP_EVERY_MS
        if bucket > self.bucket:
            self.bucket = bucket
            self._sweep()

    def _sweep(self) -> None:
        limit = self.clock - self.expire
        expired = 0
        for pid in [pid for pid, play in self.plays.items() if play.seen < limit]:
            play = self.plays.pop(pid)
            self._dirty_plays.add(pid)
            session = self.sessions.get(play.session_id)
            if session is not None:
                session.open.discard(pid)
                self._dirty_sessions.add(play.session_id)
            expired += 1
        for sid in [sid for sid, s in self.sessions.items() if s.seen < limit and not s.open]:
            del self.sessions[sid]
            self._dirty_sessions.add(sid)
            expired += 1
        if expired:
            self._count("expired", expired)

    def low_watermark(self, watermark_ms: int) -> int:
        """The watermark a listens partition fed by this one may get for a source watermark
        ``watermark_ms``: no later listen of this partition has an ``occurred_at`` (a play's
        start) at or before it; an open play that could still end holds it below its start."""
        starts = [p.started_at for p in self.plays.values()]
        return min(watermark_ms, min(starts) - 1) if starts else watermark_ms

    # -- checkpoint ------------------------------------------------------------------------------
    def checkpoint_records(self) -> list[tuple[bytes, bytes | None]]:
        """``(key, value)`` records of what changed since the last call (module docstring)."""
        p = self.partition
        out: list[tuple[bytes, bytes | None]] = []
        for sid in sorted(self._dirty_sessions):
            s = self.sessions.get(sid)
            out.append((f"s:{p}:{sid}".encode(), None if s is None else s.encode()))
        for pid in sorted(self._dirty_plays):
            play = self.plays.get(pid)
            out.append((f"p:{p}:{pid}".encode(), None if play is None else play.encode()))
        if self._clock_dirty:
            out.append((f"c:{p}".encode(), _dumps([self.clock, self.bucket]).encode()))
        self._dirty_sessions.clear()
        self._dirty_plays.clear()
        self._clock_dirty = False
        return out

    @classmethod
    def restore(
        cls, partition: int, items: Iterable[tuple[bytes, bytes | None]], **kwargs: int
    ) -> PlaysPartition:
        """The state of ``partition`` from checkpoint ``items`` (other partitions' keys and
        tombstones ignored).

        Raises:
            ValueError: a value of this partition cannot be decoded.
        """
        st = cls(partition, **kwargs)
        sp, pp, ck = f"s:{partition}:".encode(), f"p:{partition}:".encode(), f"c:{partition}".encode()
        for key, value in items:
            if value is None:
                continue
            if key.startswith(sp):
                st.sessions[key[len(sp) :].decode()] = Session.decode(value)
            elif key.startswith(pp):
                st.plays[key[len(pp) :].decode()] = Play.decode(value)
            elif key == ck:
                st.clock, st.bucket = (int(v) for v in _loads(value))
        return st

    def state_entries(self) -> int:
        """Open sessions plus open plays."""
        return len(self.sessions) + len(self.plays)


__all__ = [
    "COUNT_THRESHOLD_MS",
    "EXPIRE_MS",
    "KINDS",
    "OTHER_COUNTS",
    "RECORD_COUNTS",
    "SOURCE",
    "UNKNOWN_ARTIST",
    "Listen",
    "Play",
    "PlaysPartition",
    "Session",
    "kind_of",
    "listen_event_id",
    "validate_player_event",
]
