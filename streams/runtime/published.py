"""No output twice: what an agent published after its last checkpoint, found again at restore.

Outputs are written before the checkpoint that covers them (:mod:`streams.runtime.runner`), so
a crash between the two leaves outputs on the broker that the restored state will compute again
(same values, same deterministic ids). Each checkpoint's position record holds, per output
partition, an offset that anything produced after the checkpoint is at or above
(:attr:`streams.runtime.producer.OutputProducer.ends`: offsets are monotonic in a partition, and
the ends are taken before the next batch's outputs are produced). A restored partition reads
every output partition from that offset to its current high watermark and collects the
identities found: ``bb_out_id`` for raw outputs that carry one (dead letters, late records),
else ``ce_id`` (emitted events). The runtime then does not send an output whose identity is in
that set, so the topic holds it once.

Identities are global (deterministic ids), so reading what other partitions published in the same
range is harmless: none of it can be computed again by this partition.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from events.log import read_range
from events.offsets import high_watermarks
from infra.settings import Settings
from streams.runtime.producer import OUTPUT_ID_HEADER
from streams.runtime.store import RECOVERY_FETCH_WAIT_MS


def output_id(headers: Iterable[tuple[str, bytes | None]] | None) -> str | None:
    """The identity of an output record: its ``bb_out_id`` header, else its ``ce_id``."""
    found = None
    for name, value in headers or ():
        if value is None:
            continue
        if name == OUTPUT_ID_HEADER:
            return value.decode("utf-8", "replace")
        if name == "ce_id" and found is None:
            found = value.decode("utf-8", "replace")
    return found


def published_since(settings: Settings, positions: Mapping[str, int]) -> tuple[set[str], int]:
    """The identities of the records from ``positions`` (``"topic:partition"`` → offset) to the
    current end of each partition (blocking); also how many records were read.

    Raises:
        InfraError: a topic is missing or the broker cannot be reached.
        TransientError: the records did not come (broker unreachable).
    """
    starts: dict[tuple[str, int], int] = {}
    for where, offset in positions.items():
        name, _, part = where.rpartition(":")
        starts[(name, int(part))] = offset
    ranges: dict[tuple[str, int], tuple[int, int]] = {}
    for name in {t for t, _ in starts}:
        for part, end in high_watermarks(settings, name).items():
            if (name, part) in starts and starts[(name, part)] < end:
                ranges[(name, part)] = (starts[(name, part)], end)
    found: set[str] = set()
    read = 0
    slow = {"fetch.wait.max.ms": RECOVERY_FETCH_WAIT_MS}  # small batches: see streams.runtime.store
    for batch in read_range(settings, ranges, purpose="published", conf=slow):
        read += len(batch)
        for msg in batch:
            ident = output_id(msg.headers())
            if ident is not None:
                found.add(ident)
    return found, read


__all__ = ["output_id", "published_since"]
