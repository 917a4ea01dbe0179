"""One way to read the log outside a consumer group: an assigned reader that keeps positions,
ranges of offsets in batches, one classification of what a consumer can report, and one way to
wait out an unreachable service.

Every reader that is not a group member (the agents' changelog recovery and output read-back,
projection runners, replay, archive, restore, the registry's ``_schemas`` reader, the saga
runners, ``backbeat consume``, ``backbeat dlq``) reads through this module, with confluent-kafka
``assign()``-ed to explicit offsets (no group join, so no join delay on the embedded broker,
docs/broker.md §1; nothing is committed):

* :class:`LogReader`: a long-running reader; partitions are assigned at start offsets (and
  optionally end offsets), it tracks the next offset of each partition (records and end-of-partition
  events), the end each partition last reported, and collects batches within a linger time or until
  a stop event is set;
* :func:`read_range` / :func:`read_batches`: every record of ``[start, end)`` ranges in batches;
* :func:`read_to_end`: from start offsets to the high watermarks of now;
* :func:`log_identity`: which log this is (cluster id, topic ids), since offsets mean nothing
  across logs (the embedded broker restarts empty).

Errors a consumer reports (``Message.error()``) fall in one of four kinds (:func:`classify`):

* ``EOF``: the partition's end was reached (``_PARTITION_EOF``), not an error;
* ``FATAL``: the log changed under the reader (offset out of range, topic or partition gone,
  a fatal client error): stored positions no longer fit, stop and say so
  (:class:`~infra.errors.OffsetMismatchError`, unless the reader was given ``on_fatal``);
* ``RECHECK``: every broker was unreachable (``_TRANSPORT``, ``_ALL_BROKERS_DOWN``): the client
  reconnects by itself, but a restarted embedded broker comes back empty, so check the log's
  identity before trusting positions again (:attr:`LogReader.recheck`);
* ``TRANSIENT``: anything else (timeouts, throttling, leader changes): librdkafka retries.

Work that needs a service which may be briefly unreachable (the schema registry while decoding,
the broker) raises :class:`~infra.errors.TransientError`; :func:`wait_out` retries it with
exponential backoff (tenacity), logging that it waits, and never turns it into a dead letter or
a reject.

End offsets come from Fetch responses (:func:`events.offsets.high_watermarks`), because the
embedded broker answers ListOffsets LATEST wrongly (docs/broker.md §2).
"""

from __future__ import annotations

import enum
import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import tenacity
from confluent_kafka import (
    OFFSET_BEGINNING,
    Consumer,
    KafkaError,
    KafkaException,
    Message,
    TopicCollection,
    TopicPartition,
)
from confluent_kafka.admin import AdminClient

from events.offsets import high_watermarks, partitions_of
from infra.broker import cluster_id_of
from infra.errors import InfraError, OffsetMismatchError, TransientError
from infra.settings import Settings

log = logging.getLogger("backbeat.log")

TopicPart = tuple[str, int]
T = TypeVar("T")


class ErrorKind(enum.Enum):
    """What a consumer error means for the reader (module docstring)."""

    EOF = "eof"
    FATAL = "fatal"
    RECHECK = "recheck"
    TRANSIENT = "transient"


_FATAL_CODES = frozenset(
    {
        KafkaError._AUTO_OFFSET_RESET,
        KafkaError.OFFSET_OUT_OF_RANGE,
        KafkaError.UNKNOWN_TOPIC_OR_PART,
        KafkaError._UNKNOWN_PARTITION,
        KafkaError._UNKNOWN_TOPIC,
    }
)
_RECHECK_CODES = frozenset({KafkaError._TRANSPORT, KafkaError._ALL_BROKERS_DOWN})


def classify(err: KafkaError) -> ErrorKind:
    """The :class:`ErrorKind` of a consumer error (module docstring; codes from librdkafka's
    ``rdkafka.h``)."""
    code = err.code()
    if code == KafkaError._PARTITION_EOF:
        return ErrorKind.EOF
    if code in _FATAL_CODES or err.fatal():
        return ErrorKind.FATAL
    if code in _RECHECK_CODES:
        return ErrorKind.RECHECK
    return ErrorKind.TRANSIENT


def reader_conf(settings: Settings, purpose: str, **extra: Any) -> dict[str, object]:
    """librdkafka properties of an assign-only reader: a throw-away group id naming
    ``purpose`` (never joined, never committed), partition EOF events on, no offset reset."""
    return settings.consumer_conf(
        f"bb-{purpose}-{uuid.uuid4().hex[:8]}",
        **{"enable.partition.eof": True, "auto.offset.reset": "error", "enable.auto.offset.store": False},
        **extra,
    )


#: Called by a :class:`LogReader` for a FATAL consumer error instead of raising:
#: ``(topic, partition, error)``.
FatalHandler = Callable[[str, int, KafkaError], None]


class LogReader:
    """An assign-only reader (no group, nothing committed) that keeps positions.

    ``purpose`` names it in the throw-away group id and in messages; ``conf`` adds librdkafka
    properties (e.g. ``fetch.wait.max.ms``). ``on_fatal``: what to do with a FATAL error (default:
    raise :class:`~infra.errors.OffsetMismatchError`, its message ending with ``hint``, what to do;
    a continuous reader such as the archiver passes a handler that drops the topic and carries
    on).

    State, updated by :meth:`poll`: :attr:`positions` (next offset of every assigned partition,
    from records and end-of-partition events), :attr:`eof` (the end offset each partition last
    reported), :attr:`recheck` (an every-broker-down error was seen: check the log identity before
    trusting positions; the caller clears it). A partition assigned with an end offset is
    *bounded*: records at or after the end are not returned, and once its position reaches the
    end it is unassigned and leaves :attr:`open` (its position is then the end).

    Use as a context manager, or call :meth:`close`.
    """

    def __init__(
        self,
        settings: Settings,
        purpose: str,
        *,
        conf: Mapping[str, Any] | None = None,
        on_fatal: FatalHandler | None = None,
        hint: str = "",
    ) -> None:
        self.settings = settings
        self.hint = hint
        self.purpose = purpose
        self.positions: dict[TopicPart, int] = {}
        self.eof: dict[TopicPart, int] = {}
        self.open: set[TopicPart] = set()
        self.recheck = False
        self._ends: dict[TopicPart, int] = {}
        self._on_fatal = on_fatal
        self._consumer = Consumer(reader_conf(settings, purpose, **dict(conf or {})))

    # -- assignment -----------------------------------------------------------------------------
    def assign(
        self, starts: Mapping[TopicPart, int | None], ends: Mapping[TopicPart, int] | None = None
    ) -> None:
        """Add partitions at their start offsets (``None``: the beginning of the partition) and,
        when ``ends`` names them, with an end offset (exclusive). A bounded partition whose start
        is at or after its end is finished at once (not assigned)."""
        assign: list[TopicPartition] = []
        for tp, start in starts.items():
            end = None if ends is None else ends.get(tp)
            self.positions[tp] = 0 if start is None else int(start)
            if end is not None:
                self._ends[tp] = int(end)
                if self.positions[tp] >= end:
                    continue
                self.open.add(tp)
            assign.append(TopicPartition(tp[0], tp[1], OFFSET_BEGINNING if start is None else int(start)))
        if assign:
            self._consumer.incremental_assign(assign)

    def unassign(self, tps: list[TopicPart]) -> None:
        """Stop reading ``tps`` and forget their positions."""
        live = [tp for tp in tps if tp in self.positions and (tp not in self._ends or tp in self.open)]
        if live:
            self._consumer.incremental_unassign([TopicPartition(t, p) for t, p in live])
        for tp in tps:
            self.positions.pop(tp, None)
            self.eof.pop(tp, None)
            self._ends.pop(tp, None)
            self.open.discard(tp)

    def _finish(self, tp: TopicPart) -> None:
        if tp in self.open:
            self.open.discard(tp)
            self.positions[tp] = max(self.positions[tp], self._ends[tp])
            self._consumer.incremental_unassign([TopicPartition(tp[0], tp[1])])

    @property
    def bounded_done(self) -> bool:
        """True when every bounded partition reached its end."""
        return not self.open

    # -- reading --------------------------------------------------------------------------------
    def poll(self, max_records: int, timeout_s: float) -> list[Message]:
        """One ``consume`` call: the data records it returned (per partition in offset order),
        with the error events handled (module docstring) and :attr:`positions` moved on.

        Raises:
            OffsetMismatchError: a FATAL error and no ``on_fatal`` handler.
        """
        got = self._consumer.consume(num_messages=max_records, timeout=timeout_s)
        if not got:
            return got
        positions = self.positions
        ends = self._ends
        out: list[Message] = []
        add = out.append
        for msg in got:
            err = msg.error()
            if err is not None:
                self._error(msg, err)
                continue
            tp = (msg.topic(), msg.partition())
            off = msg.offset()
            if ends:
                end = ends.get(tp)
                if end is not None:
                    if off >= end or tp not in self.open:
                        self._finish(tp)
                        continue
                    positions[tp] = off + 1
                    add(msg)
                    if off + 1 >= end:
                        self._finish(tp)
                    continue
            positions[tp] = off + 1
            add(msg)
        return out

    def collect(
        self,
        max_records: int,
        linger_s: float,
        *,
        stop: threading.Event | None = None,
        until: Callable[[], bool] | None = None,
    ) -> list[Message]:
        """Up to ``max_records`` data records, waiting at most ``linger_s`` seconds to fill the
        batch; returns early when ``stop`` is set or ``until()`` becomes true (checked after each
        ``consume``).

        Raises:
            OffsetMismatchError: as :meth:`poll`.
        """
        out: list[Message] = []
        deadline = time.monotonic() + linger_s
        while len(out) < max_records and not (stop is not None and stop.is_set()):
            wait = deadline - time.monotonic()
            if wait <= 0:
                break
            out.extend(self.poll(max_records - len(out), wait))
            if until is not None and until():
                break
        return out

    def _error(self, msg: Message, err: KafkaError) -> None:
        kind = classify(err)
        topic, part = msg.topic(), msg.partition()
        if kind is ErrorKind.EOF:
            tp = (topic, part)
            off = msg.offset()
            self.eof[tp] = off
            end = self._ends.get(tp)
            if tp in self.positions:  # a bounded partition's position never passes its end
                self.positions[tp] = max(self.positions[tp], off if end is None else min(off, end))
            if end is not None and off >= end:
                self._finish(tp)
            return
        if kind is ErrorKind.FATAL:
            if self._on_fatal is not None:
                self._on_fatal(topic, part, err)
                return
            where = f"{topic}[{part}]" if topic else "the log"
            raise OffsetMismatchError(
                f"{self.purpose}: reading {where} failed: {err.str()}. The log changed under the "
                "reader (broker restarted empty, topic recreated, or records deleted): the offsets "
                "it was given no longer fit it" + (f". {self.hint}" if self.hint else "")
            )
        if kind is ErrorKind.RECHECK:
            self.recheck = True
        log.warning("%s: consumer: %s", self.purpose, err.str())

    def close(self) -> None:
        """Leave (nothing is committed)."""
        self._consumer.close()

    def __enter__(self) -> LogReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_batches(
    settings: Settings,
    ranges: Mapping[TopicPart, tuple[int, int]],
    *,
    purpose: str = "read",
    batch: int = 50_000,
    idle_timeout_s: float = 60.0,
    conf: Mapping[str, Any] | None = None,
) -> Iterator[tuple[list[Message], dict[TopicPart, int]]]:
    """Every record of ``ranges`` (``(topic, partition)`` → ``[start, end)`` offsets) as
    ``(records, positions)``: at most ``batch`` records (each partition in offset order) and the
    next offset of every partition after them. Yields whenever it moved on (records, or a
    partition whose remaining offsets hold no data records, e.g. transaction markers, reached its
    end: then its position is its end), and ends once every partition reached its end.

    Raises:
        OffsetMismatchError: a range no longer fits the log (offset out of range, topic gone).
        TransientError: nothing arrived for ``idle_timeout_s`` s (broker unreachable).
    """
    with LogReader(settings, purpose, conf=conf) as reader:
        reader.assign(
            {tp: start for tp, (start, _) in ranges.items()}, {tp: end for tp, (_, end) in ranges.items()}
        )
        last_progress = time.monotonic()
        while reader.open:
            before = len(reader.open)
            out = reader.poll(batch, 0.5)
            if out or len(reader.open) != before:
                last_progress = time.monotonic()
                yield out, dict(reader.positions)
            elif time.monotonic() - last_progress > idle_timeout_s:
                short = {tp: (reader.positions[tp], reader._ends[tp]) for tp in sorted(reader.open)}
                raise TransientError(
                    f"{purpose}: nothing arrived for {idle_timeout_s:.0f} s while partitions are short of "
                    f"their end (position, end: {short}); is the broker at {settings.bootstrap_servers} up?"
                )


def read_range(
    settings: Settings,
    ranges: Mapping[TopicPart, tuple[int, int]],
    *,
    purpose: str = "read",
    batch: int = 50_000,
    idle_timeout_s: float = 60.0,
    conf: Mapping[str, Any] | None = None,
) -> Iterator[list[Message]]:
    """Every record of ``ranges`` (``(topic, partition)`` → ``[start, end)`` offsets), in
    batches of at most ``batch`` records, each partition in offset order; ends once every
    partition reached its ``end`` (records at or after it are not yielded). ``conf``: librdkafka
    properties on top of :func:`reader_conf`'s.

    Raises:
        OffsetMismatchError: a range no longer fits the log (offset out of range, topic gone).
        TransientError: no record or end came for ``idle_timeout_s`` s (broker unreachable).
    """
    for out, _ in read_batches(
        settings, ranges, purpose=purpose, batch=batch, idle_timeout_s=idle_timeout_s, conf=conf
    ):
        if out:
            yield out


def read_to_end(
    settings: Settings,
    starts: Mapping[TopicPart, int],
    *,
    purpose: str = "read",
    batch: int = 50_000,
    idle_timeout_s: float = 60.0,
) -> Iterator[list[Message]]:
    """:func:`read_range` from ``starts`` to each partition's current high watermark (taken
    from Fetch responses when called).

    Raises:
        InfraError: a topic is missing; otherwise as :func:`read_range`.
    """
    marks: dict[TopicPart, int] = {}
    for topic in {t for t, _ in starts}:
        for p, high in high_watermarks(settings, topic).items():
            marks[(topic, p)] = high
    ranges = {tp: (start, marks.get(tp, 0)) for tp, start in starts.items()}
    yield from read_range(settings, ranges, purpose=purpose, batch=batch, idle_timeout_s=idle_timeout_s)


@dataclass(frozen=True)
class LogIdentity:
    """Which log is being read: the broker's ``cluster_id`` and ``{topic: topic id}``."""

    cluster_id: str
    topic_ids: Mapping[str, str]


def log_identity(settings: Settings, topics: Iterable[str], timeout_s: float = 10.0) -> LogIdentity:
    """The live identity of ``topics`` on ``settings.bootstrap_servers``: cluster id (random per
    embedded-broker start) and topic ids (new when a topic is recreated). Offsets are only
    meaningful within one identity. Topics that do not exist are left out of ``topic_ids`` (the
    caller decides what that means).

    Raises:
        InfraError: the broker does not answer.
    """
    cluster = cluster_id_of(settings.bootstrap_servers, timeout_s)
    names = sorted(set(topics))
    admin = AdminClient(settings.kafka_common())
    ids: dict[str, str] = {}
    for name, future in admin.describe_topics(TopicCollection(names)).items():
        try:
            ids[name] = str(future.result(timeout=timeout_s).topic_id)
        except KafkaException as exc:
            if exc.args and getattr(exc.args[0], "code", lambda: None)() == KafkaError.UNKNOWN_TOPIC_OR_PART:
                continue
            raise InfraError(
                f"topic {name} cannot be described on {settings.bootstrap_servers}: {exc}"
            ) from exc
    return LogIdentity(cluster, ids)


def wait_out(
    work: Callable[[], T],
    *,
    what: str,
    stop: threading.Event | None = None,
    first_wait_s: float = 0.5,
    max_wait_s: float = 30.0,
    on_wait: Callable[[TransientError, float], None] | None = None,
    logger: logging.Logger | None = None,
    sleep: Callable[[float], object] | None = None,
) -> T:
    """``work()``, retried with exponential backoff (``first_wait_s`` doubling up to
    ``max_wait_s``) for as long as it raises :class:`~infra.errors.TransientError` (a service it
    needs is unreachable). Each wait is logged as a warning saying what waits and why, and
    reported to ``on_wait(error, seconds)`` (a counter). Gives up only when ``stop`` is set (the
    wait is cut short then). ``sleep(seconds)`` replaces the wait itself (a stream agent keeps
    serving its consumer group while it waits).

    Raises:
        TransientError: ``stop`` was set while waiting (the last error).
        Exception: whatever else ``work`` raises, at once.
    """
    out = logger or log

    def before_sleep(state: tenacity.RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome is not None else None
        seconds = state.next_action.sleep if state.next_action is not None else 0.0
        out.warning(
            "%s: waiting %.1f s before retrying (attempt %d): %s", what, seconds, state.attempt_number, exc
        )
        if on_wait is not None and isinstance(exc, TransientError):
            on_wait(exc, seconds)

    retrying = tenacity.Retrying(
        retry=tenacity.retry_if_exception_type(TransientError),
        wait=tenacity.wait_exponential(multiplier=first_wait_s, min=first_wait_s, max=max_wait_s),
        stop=tenacity.stop_never if stop is None else (lambda _state: stop.is_set()),
        sleep=sleep or (time.sleep if stop is None else stop.wait),
        before_sleep=before_sleep,
        reraise=True,
    )
    return retrying(work)


__all__ = [
    "ErrorKind",
    "FatalHandler",
    "LogIdentity",
    "LogReader",
    "TopicPart",
    "classify",
    "high_watermarks",
    "log_identity",
    "partitions_of",
    "read_batches",
    "read_range",
    "read_to_end",
    "reader_conf",
    "wait_out",
]
