"""Per-partition state on a changelog topic: recovery at assignment and the runtime's own
position record.

An agent's state for source partition ``p`` lives in memory (its domain objects) and, durably,
in partition ``p`` of the agent's changelog topic: the checkpoint records the agent writes
(:meth:`streams.runtime.agent.BatchAgent.checkpoint`) followed by one record of the runtime,
key :data:`POSITION_KEY`, value :class:`Position`: the source offset the checkpoint covers, the
positions of the output partitions when it was written, and the partition's counters.

Recovery reads the changelog partition from its first record to its high watermark taken
from a Fetch response (the embedded broker's ListOffsets LATEST is short, docs/broker.md §2; on a
real cluster the two agree) and keeps the last value per key (the embedded broker never
compacts, docs/broker.md §6, so the changelog is the full history). The consumer then resumes the
source partition at ``Position.offset``: the state and the position it covers come from the
same place, so nothing is applied twice or skipped because a group commit was late or early.

A crash can leave a checkpoint half written: some of its agent records, not its position
record. The position record is the checkpoint's commit marker: recovery applies the records up
to the last position record and sets aside what follows it (the *tail*). The restored state is
then exactly the last complete checkpoint, with the counters and position that belong to it, so
replaying from there makes the same decisions and counts as an uninterrupted run. The runner
then writes a *repair* (each tail key's committed value, or a tombstone, and the position again)
before anything else, so that the tail never becomes part of a later checkpoint.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from events.log import read_range
from events.offsets import high_watermarks
from infra.settings import Settings

#: librdkafka ``fetch.wait.max.ms`` of changelog recovery and the output read-back (module code).
RECOVERY_FETCH_WAIT_MS = 1000

#: The key of the runtime's position record in every changelog partition.
POSITION_KEY = b"__position__"

_dumps = json.JSONEncoder(separators=(",", ":")).encode


@dataclass
class Position:
    """What a changelog partition's last complete checkpoint covers.

    ``offset``: the next source offset to read (``None``: never checkpointed; the consumer
    group's committed offset, else the first record, is used). ``outputs``: for every output
    partition (``"topic:partition"``), an offset no output written after the checkpoint can be
    below (used to find what was published after it, :mod:`streams.runtime.published`).
    ``counters``: the partition's counters (records in, dead-lettered, the agent's counts).
    """

    offset: int | None = None
    outputs: dict[str, int] = field(default_factory=dict)
    counters: dict[str, int] = field(default_factory=dict)

    def encode(self) -> bytes:
        """The record value (compact JSON)."""
        return _dumps({"offset": self.offset, "outputs": self.outputs, "counters": self.counters}).encode()

    @classmethod
    def decode(cls, raw: bytes | None) -> Position:
        """Inverse of :meth:`encode`; ``None`` → a partition never checkpointed.

        Raises:
            ValueError: the value is not a position record.
        """
        if raw is None:
            return cls()
        data = json.loads(raw)
        return cls(data.get("offset"), dict(data.get("outputs") or {}), dict(data.get("counters") or {}))


@dataclass
class Recovered:
    """One partition's recovered state: ``items`` (last value per key as of the last complete
    checkpoint, position record and tombstoned keys removed), its :class:`Position`, how many
    changelog records were read, and the keys of an incomplete checkpoint after it (``tail``)."""

    items: dict[bytes, bytes]
    position: Position
    records_read: int
    tail: set[bytes] = field(default_factory=set)

    def repair(self) -> list[tuple[bytes, bytes | None]]:
        """The records that undo the tail: each tail key's committed value (a tombstone when it
        had none), then the position record again. Empty when there is no tail."""
        if not self.tail:
            return []
        out: list[tuple[bytes, bytes | None]] = [(k, self.items.get(k)) for k in sorted(self.tail)]
        out.append((POSITION_KEY, self.position.encode()))
        return out


def recover(
    settings: Settings, changelog: str, partitions: Iterable[int], marks: Mapping[int, int] | None = None
) -> dict[int, Recovered]:
    """Read ``partitions`` of ``changelog`` to their high watermarks (blocking); ``marks``: the
    changelog's high watermarks when the caller has them (read from Fetch responses otherwise).

    Raises:
        InfraError: the changelog topic is missing or the broker cannot be reached.
        OffsetMismatchError: the changelog changed while being read.
        ValueError: a position record cannot be decoded.
    """
    wanted = sorted(set(partitions))
    if not wanted:
        return {}
    if marks is None:
        marks = high_watermarks(settings, changelog)
    items: dict[int, dict[bytes, bytes]] = {p: {} for p in wanted}
    # records after the last position record seen: committed when the next one comes
    pending: dict[int, dict[bytes, bytes | None]] = {p: {} for p in wanted}
    read = dict.fromkeys(wanted, 0)
    # ``None``: from the partition's first record (compacted changelogs do not start at 0)
    ranges = {(changelog, p): (None, marks.get(p, 0)) for p in wanted}
    # a changelog holds one small batch per checkpoint; on the embedded broker a Fetch lists every
    # batch of the partition and answers nothing when that takes longer than the fetch wait
    # (docs/broker.md §7), so recovery waits longer per Fetch than the agents' consumers do
    slow = {"fetch.wait.max.ms": RECOVERY_FETCH_WAIT_MS}
    for batch in read_range(settings, ranges, purpose=f"recover-{changelog}", conf=slow):  # type: ignore[arg-type]
        for msg in batch:
            p = msg.partition()
            key = msg.key()
            read[p] += 1
            if key is None:
                continue
            tail = pending[p]
            tail[key] = msg.value()
            if key == POSITION_KEY:  # the commit marker: apply the checkpoint it ends
                committed = items[p]
                for k, v in tail.items():
                    if v is None:
                        committed.pop(k, None)
                    else:
                        committed[k] = v
                tail.clear()
    out: dict[int, Recovered] = {}
    for p in wanted:
        position = Position.decode(items[p].pop(POSITION_KEY, None))
        out[p] = Recovered(items[p], position, read[p], set(pending[p]) - {POSITION_KEY})
    return out


__all__ = ["POSITION_KEY", "Position", "Recovered", "recover"]
