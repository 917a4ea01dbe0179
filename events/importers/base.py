"""What every importer shares: deterministic event ids, rejected rows, de-duplication and
event-time ordering of parsed rows, and producing them with a progress callback.

Rules (issue #2): each event id is derived from its source row (source, user, timestamp, item),
so importing a file twice re-sends the same ids and changes nothing downstream; rows that give
the same id collapse into one event (counted); events are produced in event-time order (ties keep
file order); a row that cannot be parsed is rejected with its line number and reason, never
dropped silently and never fatal.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

Record = dict[str, Any]

#: How many rejected rows an :class:`ImportResult` keeps verbatim (all are counted).
MAX_KEPT_REJECTS = 1000


def event_id(*parts: object) -> str:
    """A deterministic event id: the first 32 hex chars (128 bits) of SHA-256 over the parts
    joined by ``|``. Equal parts give equal ids in every run and on every machine."""
    return hashlib.sha256("|".join(str(p) for p in parts).encode()).hexdigest()[:32]


@dataclass(frozen=True)
class Reject:
    """A row that was not imported: 1-based ``line`` number in the file and the ``reason``."""

    line: int
    reason: str


@dataclass
class Parsed:
    """The outcome of parsing a file: ``records`` in file order (each with the 1-based
    ``_line`` it came from), ``rejects`` (the first :data:`MAX_KEPT_REJECTS`), ``rows_read``
    (data rows, header excluded) and ``rejected`` (the total count)."""

    records: list[Record] = field(default_factory=list)
    rejects: list[Reject] = field(default_factory=list)
    rows_read: int = 0
    rejected: int = 0

    def reject(self, line: int, reason: str) -> None:
        """Count a rejected row and keep its reason (up to the cap)."""
        self.rejected += 1
        if len(self.rejects) < MAX_KEPT_REJECTS:
            self.rejects.append(Reject(line, reason))


@dataclass
class ImportResult:
    """What an import did. ``rows_read = produced + duplicates + rejected`` always holds."""

    source: str
    topic: str
    rows_read: int
    produced: int
    duplicates: int
    rejected: int
    rejects: list[Reject]
    first_time_ms: int | None
    last_time_ms: int | None
    seconds: float = 0.0

    def reconciles(self) -> bool:
        """True when every row read is accounted for."""
        return self.rows_read == self.produced + self.duplicates + self.rejected


def dedupe_and_order(records: Iterable[Record], time_field: str) -> tuple[list[Record], int]:
    """Collapse records with equal ``event_id`` (the first occurrence wins) and sort by
    ``time_field`` (stable: ties keep file order). Returns ``(records, duplicates_removed)``."""
    seen: set[str] = set()
    kept: list[Record] = []
    duplicates = 0
    for rec in records:
        eid = rec["event_id"]
        if eid in seen:
            duplicates += 1
            continue
        seen.add(eid)
        kept.append(rec)
    kept.sort(key=lambda r: r[time_field])
    return kept, duplicates


ProgressCallback = Callable[[int], None]
"""Called with the number of records just produced (for a progress bar)."""
