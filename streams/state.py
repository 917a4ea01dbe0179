"""Checkpoint records of the listening-ingest state: how a partition's :class:`Sessionizer` is
written to (and read back from) its changelog table, pure Python.

Keys are UTF-8: ``r:<partition>:<seq>`` for a chunk of the FIFO of recently accepted event
ids, ``u:<partition>:<user_id>`` for a user's state, ``w:<partition>`` for the partition's
watermark, written in that order. Values are compact JSON arrays:

* recent-ids chunk: ``[source_offset, [event ids accepted since the previous chunk]]``
* user: ``[start_ms, end_ms, listens, last_closed_end_ms, source_offset, [artist ids], [event ids]]``
* watermark: ``[watermark_ms, source_offset]``

A user key with no value (a tombstone) means the user was forgotten; a chunk key with none, that
all its ids left the FIFO. A chunk comes first so that a user state that reached the changelog
implies the ids it accepted did too.
"""

from __future__ import annotations

import json
from collections import deque
from collections.abc import Iterable

from streams.sessions import RECENT_IDS, Sessionizer, UserState, members_of

_dumps = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode
_loads = json.loads


def user_key(partition: int, user_id: str) -> bytes:
    """The table key of ``user_id``'s state in source ``partition``."""
    return f"u:{partition}:{user_id}".encode()


def watermark_key(partition: int) -> bytes:
    """The table key of source ``partition``'s watermark."""
    return f"w:{partition}".encode()


def encode_user(st: UserState) -> bytes:
    """The checkpoint value of one user's state."""
    return _dumps(
        [
            st.start,
            st.end,
            st.count,
            st.last_closed_end,
            st.offset,
            members_of(st.artists),
            members_of(st.ids),
        ]
    ).encode()


def decode_user(value: bytes) -> UserState:
    """Inverse of :func:`encode_user`.

    Raises:
        ValueError: the value is not a user checkpoint.
    """
    start, end, count, last_closed_end, offset, artists, ids = _loads(value)
    return UserState(start, end, count, last_closed_end, offset, set(artists), set(ids))


def encode_watermark(watermark_ms: int, offset: int) -> bytes:
    """The checkpoint value of a partition watermark applied up to source ``offset``."""
    return _dumps([watermark_ms, offset]).encode()


class RecentChunks:
    """Which FIFO chunks of one partition are live: ``(seq, ids)`` oldest first, and the next
    sequence number. A chunk is dropped (tombstoned) once the newer chunks alone hold ``cap`` ids,
    i.e. every id of it has left the FIFO."""

    def __init__(self, cap: int = RECENT_IDS) -> None:
        self.cap = cap
        self.live: deque[tuple[int, int]] = deque()
        self.total = 0
        self.next_seq = 0

    def add(self, seq: int, n: int) -> list[int]:
        """Record chunk ``seq`` of ``n`` ids; returns the sequence numbers to drop."""
        self.live.append((seq, n))
        self.total += n
        self.next_seq = max(self.next_seq, seq + 1)
        dropped = []
        while self.live and self.total - self.live[0][1] >= self.cap:
            old, m = self.live.popleft()
            self.total -= m
            dropped.append(old)
        return dropped


def checkpoint_records(
    partition: int, sz: Sessionizer, offset: int, chunks: RecentChunks | None = None
) -> list[tuple[bytes, bytes | None]]:
    """``(key, value)`` records for what changed in ``sz`` since the last call (consumes its dirty
    sets): the new recent-ids chunk (with ``chunks``), users, then the watermark (applied up to
    source ``offset``) last, so that a changelog prefix never holds a watermark ahead of the users
    it covers, nor a user ahead of the ids it accepted."""
    out: list[tuple[bytes, bytes | None]] = []
    if chunks is not None:
        ids = sz.take_recent()
        if ids:
            seq = chunks.next_seq
            out.append((f"r:{partition}:{seq}".encode(), _dumps([offset, ids]).encode()))
            out += [(f"r:{partition}:{old}".encode(), None) for old in chunks.add(seq, len(ids))]
    users, moved = sz.take_dirty()
    out += [(user_key(partition, user), None if st is None else encode_user(st)) for user, st in users]
    if moved or users:
        out.append((watermark_key(partition), encode_watermark(sz.watermark, offset)))
    return out


def restore(
    partition: int,
    items: Iterable[tuple[bytes, bytes | None]],
    gap_ms: int,
    chunks: RecentChunks | None = None,
) -> Sessionizer:
    """A :class:`Sessionizer` for ``partition`` from table ``items`` (other partitions' keys and
    tombstones are ignored); its FIFO of recent ids refilled from the chunks, which ``chunks``
    (when given) then tracks.

    Raises:
        ValueError: a value of this partition cannot be decoded.
    """
    users: dict[str, UserState] = {}
    watermark = -1
    uprefix = f"u:{partition}:".encode()
    rprefix = f"r:{partition}:".encode()
    wkey = watermark_key(partition)
    n = len(uprefix)
    found: list[tuple[int, int, list[str]]] = []
    for key, value in items:
        if value is None:
            continue
        if key.startswith(uprefix):
            users[key[n:].decode()] = decode_user(value)
        elif key == wkey:
            watermark = int(_loads(value)[0])
        elif key.startswith(rprefix):
            chunk_offset, ids = _loads(value)
            found.append((int(key[len(rprefix) :]), int(chunk_offset), ids))
    sz = Sessionizer.restored(gap_ms, users, watermark)
    found.sort()
    sz.restore_recent((eid for _, _, ids in found for eid in ids), max((o for _, o, _ in found), default=-1))
    if chunks is not None:
        for seq, _, ids in found:
            chunks.add(seq, len(ids))
    return sz
