"""The metrics every long-running backbeat process exports (prometheus-client), one set of names.

A process's parts (an agent, the projection runner, the archiver, the saga orchestrator, …)
register as *components* with :func:`register`: each gives a function returning an
:class:`Observation` of its counters at that moment, read when Prometheus scrapes
(``prometheus_client`` "custom collectors"), so the loops pay nothing per record. Batch
latencies are the one thing observed in the loop (:func:`observe_batch`, a histogram).

==============================================  ==========================================================
metric (labels)                                 meaning
==============================================  ==========================================================
``backbeat_records_in_total`` (component,       records read from ``topic`` (counter)
topic)
``backbeat_records_out_total`` (component,      records written to ``topic`` (counter)
topic)
``backbeat_dead_letters_total`` (component,     records set aside as permanent errors, by ``reason``
reason)                                         (``decode_error``, ``validation_error``, …; counter)
``backbeat_retries_total`` (component)          waits on a transient error (registry, broker,
                                                database unreachable; counter)
``backbeat_batch_duration_seconds``             seconds per batch, histogram
(component)
``backbeat_consumer_position`` (component,      next offset the component will read (gauge)
topic, partition)
``backbeat_consumer_lag`` (component, topic,    records between the position and the partition's high
partition)                                      watermark (gauge; taken at scrape, cached 5 s)
``backbeat_state_entries`` (component)          keys in the component's state (gauge)
``backbeat_saga_states`` (saga_type, state)     sagas by type and state (gauge)
``backbeat_ready`` (component)                  1 when caught up after a (re)start, else 0
``backbeat_up`` (process)                       1 while the process runs
==============================================  ==========================================================

plus prometheus-client's ``process_*`` (CPU seconds, resident memory bytes, open fds) and
``python_*`` collectors. Names follow Prometheus' naming guide (base units, ``_total`` counters).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import (
    GC_COLLECTOR,
    PLATFORM_COLLECTOR,
    PROCESS_COLLECTOR,
    CollectorRegistry,
    Histogram,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

log = logging.getLogger("backbeat.metrics")

TopicPart = tuple[str, int]

#: Seconds a topic's high watermarks are reused between scrapes.
LAG_CACHE_S = 5.0


@dataclass
class Observation:
    """One component's counters at one moment (all counts are totals since the component's state
    began, so they survive restarts where the component persists them).

    ``positions`` maps ``(topic, partition)`` to the next offset to read; ``ready`` is false until
    the component has caught up after a (re)start; ``detail`` goes into ``/health`` as is."""

    records_in: Mapping[str, int] = field(default_factory=dict)
    records_out: Mapping[str, int] = field(default_factory=dict)
    dead_letters: Mapping[str, int] = field(default_factory=dict)
    retries: int = 0
    state_entries: int | None = None
    positions: Mapping[TopicPart, int] = field(default_factory=dict)
    saga_states: Mapping[tuple[str, str], int] = field(default_factory=dict)
    ready: bool = False
    detail: Mapping[str, Any] = field(default_factory=dict)


Observe = Callable[[], Observation]
HighWatermarks = Callable[[str], Mapping[int, int]]


class _Components(Collector):
    """The collector of every registered component (read at scrape time)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.components: dict[str, Observe] = {}
        self.high_watermarks: HighWatermarks | None = None
        self._highs: dict[str, tuple[float, Mapping[int, int]]] = {}
        self.process = ""

    def observe_all(self) -> dict[str, Observation]:
        with self._lock:
            items = list(self.components.items())
        out: dict[str, Observation] = {}
        for name, observe in items:
            try:
                out[name] = observe()
            except Exception as exc:  # a component mid-restart must not break the scrape
                log.warning("metrics: component %s could not report: %r", name, exc)
                out[name] = Observation(ready=False, detail={"error": repr(exc)})
        return out

    def _high(self, topic: str) -> Mapping[int, int] | None:
        if self.high_watermarks is None:
            return None
        now = time.monotonic()
        cached = self._highs.get(topic)
        if cached is not None and now - cached[0] < LAG_CACHE_S:
            return cached[1]
        try:
            highs = dict(self.high_watermarks(topic))
        except Exception as exc:  # broker unreachable: no lag this scrape, the rest still reported
            log.debug("metrics: no high watermarks of %s: %r", topic, exc)
            return None
        self._highs[topic] = (now, highs)
        return highs

    def collect(self) -> Iterator[Metric]:
        obs = self.observe_all()
        rin = CounterMetricFamily(
            "backbeat_records_in", "Records read, by topic.", labels=["component", "topic"]
        )
        rout = CounterMetricFamily(
            "backbeat_records_out", "Records written, by topic.", labels=["component", "topic"]
        )
        dlq = CounterMetricFamily(
            "backbeat_dead_letters", "Records set aside as permanent errors.", labels=["component", "reason"]
        )
        retries = CounterMetricFamily("backbeat_retries", "Waits on a transient error.", labels=["component"])
        pos = GaugeMetricFamily(
            "backbeat_consumer_position", "Next offset to read.", labels=["component", "topic", "partition"]
        )
        lag = GaugeMetricFamily(
            "backbeat_consumer_lag",
            "Records between the position and the high watermark.",
            labels=["component", "topic", "partition"],
        )
        state = GaugeMetricFamily(
            "backbeat_state_entries", "Keys in the component's state.", labels=["component"]
        )
        sagas = GaugeMetricFamily(
            "backbeat_saga_states", "Sagas by type and state.", labels=["saga_type", "state"]
        )
        ready = GaugeMetricFamily(
            "backbeat_ready", "1 when caught up after a (re)start.", labels=["component"]
        )
        up = GaugeMetricFamily("backbeat_up", "1 while the process runs.", labels=["process"])
        up.add_metric([self.process or "backbeat"], 1)
        for name, o in sorted(obs.items()):
            for topic, n in sorted(o.records_in.items()):
                rin.add_metric([name, topic], n)
            for topic, n in sorted(o.records_out.items()):
                rout.add_metric([name, topic], n)
            for reason, n in sorted(o.dead_letters.items()):
                dlq.add_metric([name, reason], n)
            retries.add_metric([name], o.retries)
            if o.state_entries is not None:
                state.add_metric([name], o.state_entries)
            for (saga_type, st), n in sorted(o.saga_states.items()):
                sagas.add_metric([saga_type, st], n)
            ready.add_metric([name], 1 if o.ready else 0)
            for (topic, p), offset in sorted(o.positions.items()):
                pos.add_metric([name, topic, str(p)], offset)
                highs = self._high(topic)
                if highs is not None and p in highs:
                    lag.add_metric([name, topic, str(p)], max(0, highs[p] - offset))
        yield from (rin, rout, dlq, retries, pos, lag, state, sagas, ready, up)


#: The registry of this process: the components, the batch histogram, the process collectors.
REGISTRY = CollectorRegistry(auto_describe=False)
_COMPONENTS = _Components()
REGISTRY.register(_COMPONENTS)
for _collector in (PROCESS_COLLECTOR, PLATFORM_COLLECTOR, GC_COLLECTOR):
    REGISTRY.register(_collector)

BATCH_SECONDS = Histogram(
    "backbeat_batch_duration_seconds",
    "Seconds to process one batch (decode, apply, write, checkpoint).",
    ["component"],
    registry=REGISTRY,
    buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0),
)


def set_process(name: str, high_watermarks: HighWatermarks | None = None) -> None:
    """Name the process (``backbeat_up``) and give the function that reads a topic's high
    watermarks (``{partition: offset}``) for ``backbeat_consumer_lag``; ``None``: no lag."""
    _COMPONENTS.process = name
    _COMPONENTS.high_watermarks = high_watermarks


def register(name: str, observe: Observe) -> None:
    """Report component ``name`` (e.g. ``agent:listen_ingest``, ``projection-runner``) with
    ``observe``, called at every scrape and health check; a second call replaces the first."""
    with _COMPONENTS._lock:
        _COMPONENTS.components[name] = observe


def unregister(name: str) -> None:
    """Stop reporting component ``name`` (no error if it is not registered)."""
    with _COMPONENTS._lock:
        _COMPONENTS.components.pop(name, None)


def observe_all() -> dict[str, Observation]:
    """Every registered component's :class:`Observation`, now (what ``/health`` reads)."""
    return _COMPONENTS.observe_all()


def observe_batch(component: str, seconds: float) -> None:
    """Record one batch of ``component`` that took ``seconds`` s."""
    BATCH_SECONDS.labels(component).observe(seconds)


def totals(counts: Iterable[tuple[str, int]]) -> dict[str, int]:
    """``{key: sum}`` of ``(key, n)`` pairs (to fold per-partition counters into per-topic ones)."""
    out: dict[str, int] = {}
    for key, n in counts:
        out[key] = out.get(key, 0) + n
    return out


__all__ = [
    "BATCH_SECONDS",
    "LAG_CACHE_S",
    "REGISTRY",
    "Observation",
    "observe_all",
    "observe_batch",
    "register",
    "set_process",
    "totals",
    "unregister",
]
