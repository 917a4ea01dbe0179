"""The contract between the runtime and an agent: what an agent is given (a partition's batch)
and what it gives back (outputs, counters, checkpoint records).

An agent holds only its domain rules. It keeps one state object per source partition (a
:class:`streams.sessions.Sessionizer`, a :class:`streams.user_features.PartitionFeatures`, …),
and the runtime (:mod:`streams.runtime.runner`) calls, for each partition it owns:

* :meth:`BatchAgent.restore` once when the partition is assigned, with the partition's
  changelog items (last value per key, tombstones removed);
* :meth:`BatchAgent.process` for each batch of the partition's records, in offset order,
  already decoded and validated (what failed went to the dead-letter topic);
* :meth:`BatchAgent.checkpoint` after the batch's outputs are on the broker: the changelog
  records of what the batch changed;
* :meth:`BatchAgent.revoke` when the partition goes to another worker (or is rewound).

Everything here is pure: no Kafka, no registry; unit tests drive an agent with these types.
"""

from __future__ import annotations

import abc
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, NamedTuple

from events.validation import Validator

#: A changelog record: ``(key, value)``; ``value is None`` is a tombstone (the key was dropped).
ChangelogRecord = tuple[bytes, bytes | None]
#: Kafka headers.
Headers = list[tuple[str, bytes]]


class Emit(NamedTuple):
    """An event an agent emits: ``record`` (a dict of the Avro schema of ``event_type``, short
    or full name) to ``topic``/``partition`` with ``key``; ``event_id`` (deterministic, so a
    recomputation after a crash has the same id) and ``time_ms`` (event time, ms; the record
    timestamp and ``ce_time``) go into the CloudEvents headers."""

    topic: str
    partition: int
    key: bytes | None
    event_type: str
    record: dict[str, Any]
    event_id: str
    time_ms: int


class Raw(NamedTuple):
    """A record an agent sends as bytes (an internal repartition topic, a copy of a source record
    to a side topic). ``output_id``: its identity for the runtime's no-duplicate rule (``None``:
    the consumer of the topic is idempotent by design and duplicates are harmless)."""

    topic: str
    partition: int
    key: bytes | None
    value: bytes | None
    time_ms: int | None
    headers: Headers
    output_id: str | None = None


@dataclass
class PartitionBatch:
    """One source partition's records of a consumed batch, in offset order.

    ``offsets[i]`` is the offset of record ``i``; ``records[i]`` the decoded, valid event (a
    dict), or ``None`` at a control record (then ``marks[i]`` is its watermark in ms when it is
    a watermark) or, for an agent that decodes nothing (:attr:`BatchAgent.decodes`), always;
    ``messages[i]`` the consumed message (``key()``, ``value()``, ``headers()``,
    ``timestamp()``) for agents that need the raw record. Records that failed decoding or
    validation are not here: the runtime dead-lettered them.
    """

    partition: int
    offsets: list[int] = field(default_factory=list)
    records: list[dict[str, Any] | None] = field(default_factory=list)
    messages: list[Any] = field(default_factory=list)
    marks: dict[int, int] = field(default_factory=dict)

    @property
    def last_offset(self) -> int:
        """The offset of the last record (``-1`` when empty)."""
        return self.offsets[-1] if self.offsets else -1


@dataclass
class Result:
    """What :meth:`BatchAgent.process` returns: ``emits`` (encoded by the runtime), ``raws``
    (sent as they are) and ``counts``: counter increments of this batch (e.g. ``accepted``,
    ``late``), kept per partition with the partition's state, so they survive restarts and
    count each record once."""

    emits: list[Emit] = field(default_factory=list)
    raws: list[Raw] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)


class BatchAgent(abc.ABC):
    """A stream processor: one source topic in, outputs and a changelog out (module docstring).

    Class attributes a subclass sets: :attr:`name` (the agent's name: consumer group
    ``<app id>-<name>``, log and metric labels), :attr:`stats_name` (the ``<stats_name> stats
    {json}`` log line), :attr:`source_uri` (``ce_source`` of its events).
    """

    name: ClassVar[str]
    stats_name: ClassVar[str]
    source_uri: ClassVar[str] = "/streams"
    #: ``False``: the source is not Avro (an internal topic); ``records`` are all ``None``.
    decodes: ClassVar[bool] = True
    #: The names of the counts :meth:`process` returns (listed as 0 before the first batch).
    count_names: ClassVar[tuple[str, ...]] = ()

    @property
    @abc.abstractmethod
    def source_topic(self) -> str:
        """The topic the agent reads."""

    @property
    @abc.abstractmethod
    def changelog_topic(self) -> str:
        """The changelog: one partition per source partition, holding the checkpoints."""

    @property
    @abc.abstractmethod
    def output_topics(self) -> Sequence[str]:
        """Every topic the agent writes to (its dead-letter topic included)."""

    @property
    def dlq_topic(self) -> str | None:
        """Where records that cannot be decoded or fail validation go (``None``: the agent
        decodes nothing and has no dead-letter topic)."""
        return None

    @property
    def event_types(self) -> Mapping[str, str]:
        """The event type the agent emits on each output topic (``topic → event type``): the
        runtime registers their schemas at start."""
        return {}

    def validator(self) -> Validator | None:
        """The rule decoded records must meet (failures are dead-lettered with reason
        ``validation_error``); default: none beyond the schema."""
        return None

    @abc.abstractmethod
    def restore(self, partition: int, items: Mapping[bytes, bytes]) -> None:
        """Build the state of ``partition`` from its changelog ``items`` (last value per key,
        no tombstones; empty for a partition never checkpointed)."""

    @abc.abstractmethod
    def process(self, batch: PartitionBatch, now_ms: int) -> Result:
        """Apply one partition's batch (``now_ms``: the wall clock, for rules that need it)."""

    @abc.abstractmethod
    def checkpoint(self, partition: int, offset: int) -> Iterable[ChangelogRecord]:
        """The changelog records of what changed in ``partition`` since its last checkpoint,
        which now covers source offsets up to and including ``offset``. The runtime writes them
        in this order, followed by its own position record."""

    @abc.abstractmethod
    def revoke(self, partition: int) -> None:
        """Forget ``partition`` (it is rebuilt by :meth:`restore` when assigned again)."""

    def stats(self, counts: Mapping[str, int]) -> dict[str, Any]:
        """Agent-specific figures for the stats line (e.g. open sessions per partition, its
        counters reshaped); ``counts`` are the summed counters of the assigned partitions."""
        return {}

    def state_entries(self) -> int | None:
        """Keys in the agent's state across its assigned partitions (``backbeat_state_entries``;
        default ``None``: not reported). Called on the ops server's thread while the agent
        runs: it must be cheap (``len`` of the state's dicts) and must not iterate a dict the
        agent changes (take ``list(d.values())`` first)."""
        return None

    def reconciles(self, counts: Mapping[str, int]) -> bool | None:
        """Whether the summed counters account for every record once (``None``: no rule)."""
        return None


__all__ = ["BatchAgent", "ChangelogRecord", "Emit", "Headers", "PartitionBatch", "Raw", "Result"]
