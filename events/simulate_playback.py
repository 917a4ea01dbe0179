"""Producing the player simulator's events (:mod:`events.player`) to ``playback.events``.

Two modes, both through the one producer (:class:`events.producer.EventProducer`: Avro in the
Confluent wire format, CloudEvents headers, source ``/simulators/player``), keyed by ``user_id``
so one user's events stay in order on one partition:

* **replay** (:func:`replay`): the events of the listens as fast as the producer takes them, in
  the rule's order (time order), each with its original event time (record timestamp =
  ``occurred_at``). The input is a bounded source: at the end, unless ``close_input=False``, a
  watermark control record (:mod:`events.control`) goes to every partition at the last event time
  plus ``max(session gap + 1, END_OF_INPUT_MS)``, as ``backbeat import listens`` does.
* **live** (:func:`live`): the same events in the same order, paced at ``rate`` events/s by a
  token loop (every tick sends the events due since the start, ``⌊rate × elapsed⌋ − sent``),
  each stamped with the wall-clock time it is sent (``occurred_at`` = now, ms;
  ``PlaybackSessionEnded.started_at`` = the time its session's start was sent). Gaps between
  events are thus compressed to ``1 / rate``; positions, ``ms_played`` and ``paused_ms`` keep the
  rule's values (a play's fields say what was heard, its time when it was reported). At the end
  of the input it starts over (``repeat``) with the next *round* (:func:`events.player.simulate`
  ``round_``: new ids and draws, same users), until ``seconds`` pass, ``max_events`` are sent or
  ``stop`` is set. A stop mid-input leaves the plays and sessions in flight open (no closing
  events are invented).

Stopping (``stop`` set, e.g. by SIGTERM or Ctrl-C in the CLI) ends the loop after the batch in
hand; the producer is then flushed, so every event counted in the result was delivered.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from threading import Event

from events.cloudevents import ce_headers
from events.control import END_OF_INPUT_MS, watermark_headers
from events.importers.listens import parse_listens_file
from events.offsets import partitions_of
from events.player import DEFAULT_SEED, EVENT_TYPES, Listen, PlayerEvent, prepare, simulate
from events.player_catalog import PlayerCatalog
from events.producer import EventProducer
from events.schemas import get_schema
from infra.errors import ConfigError
from infra.settings import Settings

TOPIC = "playback.events"
SOURCE = "/simulators/player"
#: Events encoded and produced together in replay mode.
BATCH = 5_000
#: The live pacing loop's tick (s): each tick sends the events due.
TICK_S = 0.005


@dataclass
class SimulationResult:
    """What a run sent: ``mode`` (``replay``/``live``), ``topic``, ``listens`` (input listens),
    ``produced`` (events delivered), ``by_type`` (events per short type name), ``rounds``
    (passes over the input started), ``stopped`` (ended by ``stop``), ``watermarks`` (control
    records sent), ``seconds`` (wall time), ``first_time_ms``/``last_time_ms`` (event times of
    the first and last event sent, or ``None``)."""

    mode: str
    topic: str
    listens: int
    produced: int = 0
    by_type: Counter[str] = field(default_factory=Counter)
    rounds: int = 0
    stopped: bool = False
    watermarks: int = 0
    seconds: float = 0.0
    first_time_ms: int | None = None
    last_time_ms: int | None = None

    @property
    def rate(self) -> float:
        """Events per second of wall time."""
        return self.produced / self.seconds if self.seconds > 0 else 0.0


def load_listens(path: Path, *, users: int | None = None, limit: int | None = None) -> list[Listen]:
    """The 30Music listens of ``path`` to simulate (:func:`events.player.prepare`).

    Raises:
        ConfigError: unreadable file, not a 30Music file, or no listens left.
    """
    listens = prepare(parse_listens_file(path, "30music").records, users=users, limit=limit)
    if not listens:
        raise ConfigError(f"{path} gives no listens to simulate (check --users/--limit)")
    return listens


class _Sender:
    """Encodes mixed player events per type and produces them in the given order."""

    def __init__(self, producer: EventProducer, topic: str, result: SimulationResult) -> None:
        self.producer = producer
        self.topic = topic
        self.result = result
        self.full_names = {t: get_schema(t).full_name for t in EVENT_TYPES}

    def send(self, events: Sequence[PlayerEvent], records: Sequence[dict] | None = None) -> None:
        recs = records if records is not None else [e.record for e in events]
        values: list[bytes] = [b""] * len(events)
        by_type: dict[str, list[int]] = {}
        for i, event in enumerate(events):
            by_type.setdefault(event.event_type, []).append(i)
        for event_type, index in by_type.items():
            encoded = self.producer.encoder(self.topic, event_type).encode_many([recs[i] for i in index])
            for i, value in zip(index, encoded, strict=True):
                values[i] = value
        names = self.full_names
        times = [int(r["occurred_at"]) for r in recs]
        headers = [
            ce_headers(event_id=r["event_id"], event_type=names[e.event_type], source=SOURCE, time_ms=t)
            for e, r, t in zip(events, recs, times, strict=True)
        ]
        self.producer.produce_raw(
            self.topic, values, [e.key.encode() for e in events], [max(1, t) for t in times], headers
        )
        res = self.result
        res.produced += len(events)
        res.by_type.update(e.event_type for e in events)
        if res.first_time_ms is None:
            res.first_time_ms = times[0]
        res.last_time_ms = times[-1]


def replay(
    settings: Settings,
    listens: Sequence[Listen],
    catalog: PlayerCatalog,
    seed: int | str = DEFAULT_SEED,
    *,
    topic: str = TOPIC,
    close_input: bool = True,
    stop: Event | None = None,
    on_total: Callable[[int], None] | None = None,
    progress: Callable[[int], None] | None = None,
) -> SimulationResult:
    """Produce the events of ``listens`` with their original times, as fast as possible.

    ``on_total(n)`` is called once with the number of events (for a progress bar), ``progress(k)``
    after each batch of ``k``. A set ``stop`` ends the run after the batch in hand (then no
    watermark is sent).

    Raises:
        InfraError: the broker or registry cannot be reached, or deliveries failed.
    """
    began = time.monotonic()
    result = SimulationResult("replay", topic, len(listens), rounds=1)
    events = list(simulate(listens, catalog, seed, gap_ms=settings.session_gap_ms))
    if on_total is not None:
        on_total(len(events))
    producer = EventProducer(settings)
    sender = _Sender(producer, topic, result)
    for start in range(0, len(events), BATCH):
        if stop is not None and stop.is_set():
            result.stopped = True
            break
        chunk = events[start : start + BATCH]
        sender.send(chunk)
        if progress is not None:
            progress(len(chunk))
    if close_input and not result.stopped and result.last_time_ms is not None:
        watermark = result.last_time_ms + max(settings.session_gap_ms + 1, END_OF_INPUT_MS)
        for partition in partitions_of(settings, topic):
            producer.producer.produce(
                topic, b"", partition=partition, timestamp=watermark, headers=watermark_headers(watermark)
            )
            result.watermarks += 1
    producer.flush()
    result.seconds = time.monotonic() - began
    return result


@dataclass(frozen=True)
class LiveProgress:
    """A live run's state for a progress line: ``produced`` events, ``seconds`` since the start,
    ``round`` (0-based pass over the input), ``plays`` started in this round of ``listens``."""

    produced: int
    seconds: float
    round: int
    plays: int
    listens: int


def _rounds(
    listens: Sequence[Listen], catalog: PlayerCatalog, seed: int | str, gap_ms: int, repeat: bool
) -> Iterable[tuple[int, PlayerEvent]]:
    round_ = 0
    while True:
        for event in simulate(listens, catalog, seed, gap_ms=gap_ms, round_=round_):
            yield round_, event
        if not repeat:
            return
        round_ += 1


def live(
    settings: Settings,
    listens: Sequence[Listen],
    catalog: PlayerCatalog,
    seed: int | str = DEFAULT_SEED,
    *,
    rate: float,
    topic: str = TOPIC,
    seconds: float | None = None,
    max_events: int | None = None,
    repeat: bool = True,
    stop: Event | None = None,
    on_progress: Callable[[LiveProgress], None] | None = None,
    progress_every_s: float = 5.0,
    clock: Callable[[], float] = time.time,
) -> SimulationResult:
    """Produce the events of ``listens`` at ``rate`` events/s with event time = now (module
    docstring) until ``seconds`` have passed, ``max_events`` were sent, ``stop`` is set, or (with
    ``repeat=False``) the input ends. ``on_progress`` is called every ``progress_every_s`` s.

    Raises:
        ConfigError: ``rate`` is not positive.
        InfraError: the broker or registry cannot be reached, or deliveries failed.
    """
    if rate <= 0:
        raise ConfigError(f"--rate {rate} must be positive (events per second)")
    stop = stop or Event()
    result = SimulationResult("live", topic, len(listens))
    producer = EventProducer(settings)
    sender = _Sender(producer, topic, result)
    source = iter(_rounds(listens, catalog, seed, settings.session_gap_ms, repeat))
    session_starts: dict[str, int] = {}
    began = time.monotonic()
    next_report = progress_every_s
    plays = 0
    current_round = -1
    exhausted = False
    while not exhausted:
        elapsed = time.monotonic() - began
        if seconds is not None and elapsed >= seconds:
            break
        if stop.is_set():
            result.stopped = True
            break
        due = int(rate * elapsed) - result.produced
        if max_events is not None:
            due = min(due, max_events - result.produced)
        if due > 0:
            now = int(clock() * 1000)
            events: list[PlayerEvent] = []
            records: list[dict] = []
            for round_, event in source:
                if round_ != current_round:
                    current_round, plays = round_, 0
                    result.rounds += 1
                rec = dict(event.record)
                rec["occurred_at"] = now
                if event.event_type == "PlaybackSessionStarted":
                    session_starts[rec["session_id"]] = now
                elif event.event_type == "PlaybackSessionEnded":
                    rec["started_at"] = session_starts.pop(rec["session_id"], now)
                elif event.event_type == "PlaybackStarted":
                    plays += 1
                events.append(event)
                records.append(rec)
                if len(events) >= due:
                    break
            else:
                exhausted = True
            if events:
                sender.send(events, records)
        if max_events is not None and result.produced >= max_events:
            break
        if on_progress is not None and elapsed >= next_report:
            next_report += progress_every_s
            on_progress(LiveProgress(result.produced, elapsed, max(current_round, 0), plays, len(listens)))
        if due <= 0:
            stop.wait(TICK_S)
    producer.flush()
    result.seconds = time.monotonic() - began
    return result


__all__ = ["BATCH", "SOURCE", "TOPIC", "LiveProgress", "SimulationResult", "live", "load_listens", "replay"]
