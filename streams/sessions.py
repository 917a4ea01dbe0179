"""Listening sessions on event time: validation, de-duplication and sessionisation, pure Python.

A *session* is a user's run of listens with no gap longer than ``gap_ms`` (30 min by default)
between consecutive event times; a gap of exactly ``gap_ms`` stays in the session. One
:class:`Sessionizer` holds the state of one source partition (its users and its watermark) and
imports nothing from Faust or Kafka, so the agent (:mod:`streams.ingest`), the benchmark baseline
and the unit tests share it.

Rules, with ``W`` the partition watermark (the largest event time seen, or a control watermark):

* **duplicate**: the event id is in the user's open session, or among the last
  ``recent_ids`` accepted ids of the partition (a bounded FIFO, checkpointed in chunks, so a
  restored partition counts a re-sent event exactly as an uninterrupted one).
* **late**: the event is at or before the end of the user's last closed session plus the gap (it
  would have extended a session already emitted), or no open session covers it and
  ``W - t > gap`` (a session holding only it would already be closed).
* otherwise it is **accepted** into the user's open session, or opens one.
* A user's open session closes when ``W - end > gap``: in :meth:`Sessionizer.add` for that
  user before its event is placed, and for everyone in :meth:`Sessionizer.advance_watermark`.
  Decisions therefore do not depend on when ``advance_watermark`` is called (batch boundaries).
* A user with no open session whose last session ended more than ``2 * gap`` before ``W`` is
  forgotten (bounded state): every later event of that user is late by the ``W`` rule anyway.

Replays of the source log are recognised by offset: each user remembers the source offset of the
last listen it accepted, and :meth:`Sessionizer.add` skips (counts as ``replayed``) events at or
below it. Replayed events still advance ``W``, so a restored partition makes the same decisions.
"""

from __future__ import annotations

import hashlib
import heapq
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, NamedTuple

from events.validation import MAX_FUTURE_MS, validate_listen

#: Default size of the per-partition FIFO of recently accepted event ids.
RECENT_IDS = 100_000

_NOTHING: tuple[ClosedSession, ...] = ()


def session_event_id(user_id: str, session_start_ms: int) -> str:
    """Deterministic ``SessionEnded.event_id``: 32 hex chars of sha256(``user|start_ms``)."""
    return hashlib.sha256(f"{user_id}|{session_start_ms}".encode()).hexdigest()[:32]


class ClosedSession(NamedTuple):
    """A closed session: times in ms since the epoch (event time), ``listens`` counts distinct
    accepted listens, ``distinct_artists`` distinct artist ids."""

    user_id: str
    start_ms: int
    end_ms: int
    listens: int
    distinct_artists: int

    @property
    def event_id(self) -> str:
        """The deterministic id of the ``SessionEnded`` event (:func:`session_event_id`)."""
        return session_event_id(self.user_id, self.start_ms)


#: A small set of strings kept compactly: ``None`` (empty), the string itself (one member) or a
#: ``set`` (two or more). Most open sessions hold one or two listens, and a Python ``set`` costs
#: 216 bytes even with one member: with a million users of state that is the difference between
#: fitting in 1 GiB or not (``benchmarks/state_memory.py``).
Members = str | set[str] | None


def _with(members: Members, item: str) -> Members:
    """``members`` with ``item`` added (a set grows in place)."""
    if members is None:
        return item
    if type(members) is str:
        return members if members == item else {members, item}
    members.add(item)  # type: ignore[union-attr]
    return members


def _holds(members: Members, item: str) -> bool:
    if type(members) is str:
        return members == item
    return members is not None and item in members


def members_of(members: Members) -> list[str]:
    """The members as a list (checkpoints)."""
    if members is None:
        return []
    if type(members) is str:
        return [members]
    return list(members)  # type: ignore[arg-type]


def _compact(items: set[str] | None) -> Members:
    if not items:
        return None
    if len(items) == 1:
        return next(iter(items))
    return set(items)


def _count(members: Members) -> int:
    if members is None:
        return 0
    return 1 if type(members) is str else len(members)  # type: ignore[arg-type]


class UserState:
    """One user's state. ``count == 0`` means no open session (then ``start``/``end`` are
    meaningless and ``artists``/``ids`` empty); ``last_closed_end`` is ``-1`` before the first
    close; ``offset`` is the source offset of the last accepted listen (``-1`` unknown)."""

    __slots__ = ("artists", "count", "end", "ids", "last_closed_end", "offset", "start")

    def __init__(
        self,
        start: int = 0,
        end: int = 0,
        count: int = 0,
        last_closed_end: int = -1,
        offset: int = -1,
        artists: set[str] | None = None,
        ids: set[str] | None = None,
    ) -> None:
        self.start = start
        self.end = end
        self.count = count
        self.last_closed_end = last_closed_end
        self.offset = offset
        self.artists: Members = _compact(artists)  # distinct artist ids of the open session
        self.ids: Members = _compact(ids)  # event ids of the open session

    def __repr__(self) -> str:
        return (
            f"UserState(start={self.start}, end={self.end}, count={self.count}, "
            f"last_closed_end={self.last_closed_end}, offset={self.offset}, "
            f"artists={_count(self.artists)}, ids={_count(self.ids)})"
        )


class Sessionizer:
    """The sessions of one source partition (see the module docstring for the rules).

    Counters (events): ``accepted``, ``duplicates``, ``late``, ``replayed``; every event given to
    :meth:`add` lands in exactly one. ``dirty`` holds the users changed since
    :meth:`take_dirty`, for checkpointing.
    """

    def __init__(self, gap_ms: int, recent_ids: int = RECENT_IDS) -> None:
        if gap_ms <= 0:
            raise ValueError(f"gap_ms={gap_ms} must be positive")
        self.gap = gap_ms
        self.watermark = -1
        self.users: dict[str, UserState] = {}
        self.accepted = 0
        self.duplicates = 0
        self.late = 0
        self.replayed = 0
        self.dirty: set[str] = set()
        self.watermark_dirty = False
        self._recent_cap = recent_ids
        self._recent: deque[str] = deque()
        self._recent_set: set[str] = set()
        self._recent_new: list[str] = []  # accepted since :meth:`take_recent`
        self._recent_offset = -1  # the restored FIFO holds the ids accepted up to this offset
        self._open_heap: list[tuple[int, str]] = []  # (session end, user); stale entries skipped
        self._evict_heap: list[tuple[int, str]] = []  # (last closed end, user)

    # -- restore ---------------------------------------------------------------------------------
    @classmethod
    def restored(
        cls, gap_ms: int, users: Mapping[str, UserState], watermark: int, recent_ids: int = RECENT_IDS
    ) -> Sessionizer:
        """A sessionizer holding checkpointed ``users`` and ``watermark`` (nothing dirty)."""
        sz = cls(gap_ms, recent_ids)
        sz.users = dict(users)
        sz.watermark = watermark
        for user, st in sz.users.items():
            if st.count:
                sz._open_heap.append((st.end, user))
            if st.last_closed_end >= 0:
                sz._evict_heap.append((st.last_closed_end, user))
        heapq.heapify(sz._open_heap)
        heapq.heapify(sz._evict_heap)
        return sz

    # -- events ----------------------------------------------------------------------------------
    def add(self, record: Mapping[str, Any], offset: int = -1) -> Sequence[ClosedSession]:
        """Apply one valid listen (``user_id``, ``event_id``, ``artist_id``, ``occurred_at`` ms)
        read at source ``offset`` (``-1``: unknown, no replay check). Returns the sessions this
        closes (at most the user's own previous session), usually none."""
        t: int = record["occurred_at"]
        if t > self.watermark:
            self.watermark = t
            self.watermark_dirty = True
        w = self.watermark
        gap = self.gap
        user: str = record["user_id"]
        eid: str = record["event_id"]
        st = self.users.get(user)
        closed: Sequence[ClosedSession] = _NOTHING
        if st is None:
            if eid in self._recent_set:
                self.duplicates += 1
                return _NOTHING
            if w - t > gap:
                self.late += 1
                return _NOTHING
            st = self.users[user] = UserState()
        else:
            if offset >= 0 and offset <= st.offset:
                self.replayed += 1
                return _NOTHING
            if _holds(st.ids, eid) or eid in self._recent_set:
                self.duplicates += 1
                return _NOTHING
            if st.count and w - st.end > gap:
                closed = [self._close(user, st)]
            if t <= st.last_closed_end + gap:
                self.late += 1
                return closed
            if st.count:
                if t < st.start - gap:  # its own session, which W has already closed
                    self.late += 1
                    return closed
            elif w - t > gap:
                self.late += 1
                return closed
        # accept
        if st.count:
            if t > st.end:
                st.end = t
                heapq.heappush(self._open_heap, (t, user))
            elif t < st.start:
                st.start = t
            st.count += 1
        else:
            st.start = st.end = t
            st.count = 1
            heapq.heappush(self._open_heap, (t, user))
        st.artists = _with(st.artists, record["artist_id"])
        st.ids = _with(st.ids, eid)
        if offset > st.offset:
            st.offset = offset
        self.dirty.add(user)
        self.accepted += 1
        if offset < 0 or offset > self._recent_offset:  # not already in a restored chunk
            self._remember(eid)
        return closed

    def _remember(self, eid: str) -> None:
        recent = self._recent
        recent.append(eid)
        self._recent_set.add(eid)
        self._recent_new.append(eid)
        if len(recent) > self._recent_cap:
            self._recent_set.discard(recent.popleft())

    def add_many(
        self, records: Iterable[Mapping[str, Any]], offsets: Iterable[int] | None = None
    ) -> list[ClosedSession]:
        """:meth:`add` for each record (with its offset), then nothing else; the closed sessions
        in order."""
        out: list[ClosedSession] = []
        add = self.add
        if offsets is None:
            for record in records:
                closed = add(record)
                if closed:
                    out.extend(closed)
        else:
            for record, offset in zip(records, offsets, strict=True):
                closed = add(record, offset)
                if closed:
                    out.extend(closed)
        return out

    def advance_watermark(self, watermark_ms: int | None = None) -> list[ClosedSession]:
        """Raise the watermark to ``watermark_ms`` (``None``: keep it; it never goes down) and
        close every open session with ``W - end > gap``, ordered by end. Also forgets users idle
        for more than ``2 * gap`` (listed in :attr:`dirty` so their checkpoint is deleted)."""
        if watermark_ms is not None and watermark_ms > self.watermark:
            self.watermark = watermark_ms
            self.watermark_dirty = True
        limit = self.watermark - self.gap
        out: list[ClosedSession] = []
        heap = self._open_heap
        users = self.users
        while heap and heap[0][0] < limit:
            end, user = heapq.heappop(heap)
            st = users.get(user)
            if st is not None and st.count and st.end == end:
                out.append(self._close(user, st))
        evict = self._evict_heap
        forget = self.watermark - 2 * self.gap
        while evict and evict[0][0] < forget:
            end, user = heapq.heappop(evict)
            st = users.get(user)
            if st is not None and not st.count and st.last_closed_end == end:
                del users[user]
                self.dirty.add(user)
        return out

    def _close(self, user: str, st: UserState) -> ClosedSession:
        session = ClosedSession(user, st.start, st.end, st.count, _count(st.artists))
        st.last_closed_end = st.end
        st.count = 0
        st.artists = None
        st.ids = None
        self.dirty.add(user)
        heapq.heappush(self._evict_heap, (st.end, user))
        return session

    # -- checkpoints and stats -------------------------------------------------------------------
    def take_recent(self) -> list[str]:
        """The event ids accepted since the last call, in order (for a FIFO checkpoint chunk)."""
        new, self._recent_new = self._recent_new, []
        return new

    def restore_recent(self, ids: Iterable[str], up_to_offset: int) -> None:
        """Refill the FIFO of recent ids from checkpoint chunks (oldest first) that hold the ids
        accepted up to source offset ``up_to_offset``; listens replayed at or below it are not
        remembered twice."""
        for eid in ids:
            self._remember(eid)
        self._recent_new = []
        self._recent_offset = up_to_offset

    def take_dirty(self) -> tuple[list[tuple[str, UserState | None]], bool]:
        """The users changed since the last call (``None`` = forgotten) and whether the watermark
        changed; resets both."""
        users = self.users
        changed = [(user, users.get(user)) for user in self.dirty]
        self.dirty = set()
        moved = self.watermark_dirty
        self.watermark_dirty = False
        return changed, moved

    def open_sessions(self) -> int:
        """How many users have an open session."""
        return sum(1 for st in self.users.values() if st.count)

    def counters(self) -> dict[str, int]:
        """``accepted``, ``duplicates``, ``late``, ``replayed`` (events) and ``users`` kept."""
        return {
            "accepted": self.accepted,
            "duplicates": self.duplicates,
            "late": self.late,
            "replayed": self.replayed,
            "users": len(self.users),
        }


__all__ = [
    "MAX_FUTURE_MS",
    "ClosedSession",
    "Sessionizer",
    "UserState",
    "session_event_id",
    "validate_listen",
]
