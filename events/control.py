"""Control records: out-of-band markers that travel in a data topic's partitions.

A *watermark* record says "no event with an event time at or before ``watermark_ms`` will
follow in this partition" (the Dataflow/Flink watermark). An importer of a bounded file sends
one to every partition at the end, :data:`END_OF_INPUT_MS` past the last event time, so that
stream processors close every open session and window, as Flink does at the end of bounded
input (MAX_WATERMARK).

A control record has an empty value (zero bytes), no key, and the headers
``bb_control=watermark`` and ``bb_watermark_ms=<decimal ms>``. Consumers that are not
interested skip any record with a ``bb_control`` header; it is never an event and never a
dead letter.
"""

from __future__ import annotations

from collections.abc import Sequence

#: How far past a bounded import's last event time its closing watermark goes (ms): longer
#: than any session gap or window plus grace period backbeat's agents accept (the feature
#: agents check theirs against it), so the end of a file closes everything.
END_OF_INPUT_MS = 2 * 86_400_000

CONTROL_HEADER = "bb_control"
WATERMARK = b"watermark"
WATERMARK_HEADER = "bb_watermark_ms"


def watermark_headers(watermark_ms: int) -> list[tuple[str, bytes]]:
    """Headers of a watermark control record for ``watermark_ms`` (ms since the epoch)."""
    return [(CONTROL_HEADER, WATERMARK), (WATERMARK_HEADER, str(int(watermark_ms)).encode())]


def is_control(headers: Sequence[tuple[str, bytes | None]] | None) -> bool:
    """True when a record carries the ``bb_control`` header."""
    if not headers:
        return False
    return any(k == CONTROL_HEADER for k, _ in headers)


def watermark_of(headers: Sequence[tuple[str, bytes | None]] | None) -> int | None:
    """The watermark (ms) of a watermark control record, else ``None``."""
    if not headers:
        return None
    found = dict(headers)
    if found.get(CONTROL_HEADER) != WATERMARK:
        return None
    raw = found.get(WATERMARK_HEADER)
    try:
        return int(raw) if raw is not None else None
    except ValueError:
        return None
