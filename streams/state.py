"""Checkpoint records of the listening-ingest state: how a partition's :class:`Sessionizer` is
written to (and read back from) its changelog table, pure Python.

Keys are UTF-8: ``u:<partition>:<user_id>`` for a user's state, ``w:<partition>`` for the
partition's watermark. Values are compact JSON arrays:

* user: ``[start_ms, end_ms, listens, last_closed_end_ms, source_offset, [artist ids], [event ids]]``
* watermark: ``[watermark_ms, source_offset]``

A user key with no value (a tombstone) means the user was forgotten.
"""

from __future__ import annotations

import json
from collections.abc import Iterable

from streams.sessions import Sessionizer, UserState

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
        [st.start, st.end, st.count, st.last_closed_end, st.offset, list(st.artists), list(st.ids)]
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


def checkpoint_records(
    partition: int, sz: Sessionizer, offset: int
) -> list[tuple[bytes, bytes | None]]:
    """``(key, value)`` records for what changed in ``sz`` since the last call (consumes its dirty
    sets): users first, the watermark (applied up to source ``offset``) last, so that a changelog
    prefix never holds a watermark ahead of the users it covers."""
    users, moved = sz.take_dirty()
    out: list[tuple[bytes, bytes | None]] = [
        (user_key(partition, user), None if st is None else encode_user(st)) for user, st in users
    ]
    if moved or users:
        out.append((watermark_key(partition), encode_watermark(sz.watermark, offset)))
    return out


def restore(
    partition: int, items: Iterable[tuple[bytes, bytes | None]], gap_ms: int
) -> Sessionizer:
    """A :class:`Sessionizer` for ``partition`` from table ``items`` (other partitions' keys and
    tombstones are ignored).

    Raises:
        ValueError: a value of this partition cannot be decoded.
    """
    users: dict[str, UserState] = {}
    watermark = -1
    uprefix = f"u:{partition}:".encode()
    wkey = watermark_key(partition)
    n = len(uprefix)
    for key, value in items:
        if value is None:
            continue
        if key.startswith(uprefix):
            users[key[n:].decode()] = decode_user(value)
        elif key == wkey:
            watermark = int(_loads(value)[0])
    return Sessionizer.restored(gap_ms, users, watermark)

