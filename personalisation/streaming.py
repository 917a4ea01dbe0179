"""Serving helpers of the streaming ``recommendations`` read model: the session gap and how a
served list is put together from a model's results and the most played tracks (no Kafka, no
DuckDB: :mod:`projections.recommendations` does I/O; the model is
:mod:`personalisation.session_model`).

Sessions: a user's listens are taken in arrival order (offset order in the user's partition,
which the importers make event-time order); a listen starts a new session when its event time is
more than ``GAP_MS`` after the latest event time seen for the user (a gap of exactly ``GAP_MS``
stays in the session, as in :mod:`streams.sessions`; the 30-minute default is the usual web-log
inactivity timeout, Catledge & Pitkow, "Characterizing browsing strategies in the World-Wide
Web", 1995). A listen that arrives with an earlier event time than one already seen (late) joins
the open session.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

#: Default inactivity gap between sessions, ms (30 min; ``Settings.session_gap_ms``).
GAP_MS = 30 * 60 * 1000


@dataclass(frozen=True)
class ListItem:
    """One entry of a list: ``track_id``, ``score`` (higher is better, comparable within one
    list) and ``source``: ``cooccurrence`` (the model's) or ``popular``."""

    track_id: str
    score: float
    source: str


def assemble(
    primary: Sequence[tuple[str, float]],
    popular: Sequence[tuple[str, float]],
    n: int,
    exclude: Iterable[str] = (),
) -> list[ListItem]:
    """A list of at most ``n``: ``primary`` (co-occurrence results, best first) then backfill from
    ``popular`` (best first), skipping ``exclude`` and repeats. With an empty ``primary`` this is
    the most-popular list."""
    skip = set(exclude)
    out: list[ListItem] = []
    for source, entries in (("cooccurrence", primary), ("popular", popular)):
        for track, score in entries:
            if len(out) >= n:
                return out
            if track in skip:
                continue
            skip.add(track)
            out.append(ListItem(track, score, source))
    return out


__all__ = ["GAP_MS", "ListItem", "assemble"]
