"""Event-time hopping windows built from panes, with a grace period: the windowing rules of the
feature agents, pure Python.

A hopping window of ``size_ms`` advancing by ``step_ms`` covers ``[start, start + size)`` for
every ``start`` that is a multiple of ``step`` since the epoch (Kafka Streams'
``TimeWindows.ofSizeAndGrace(size).advanceBy(step)``); ``step`` must divide ``size``. Each
window is the union of ``size / step`` *panes* ``[p, p + step)`` (Li et al., "No pane, no gain:
efficient evaluation of sliding-window aggregates over data streams", SIGMOD Record 34(1),
2005): a listen updates one pane instead of ``size / step`` windows, and a window's value is
computed from its panes once, when it closes.

Lateness, with ``W`` the partition watermark (the largest event time seen so far, or a control
watermark, :mod:`events.control`):

* a pane ``[p, p + step)`` is **closed** once ``W >= p + step + grace``; an event whose pane is
  closed when it arrives is **late**: it is counted and dropped, never applied;
* a window ``[s, s + size)`` closes with its last pane, once ``W >= s + size + grace``, and its
  value (the sum of its panes) is emitted then, once: a final result, not a stream of updates.

Deciding lateness per pane (not per window, as Kafka Streams does) keeps every window equal to
the sum of its panes, so overlapping windows never disagree about a listen. The equivalent
GROUP BY over the input: a listen at ``t`` arriving when the watermark before it was ``W0``
counts iff ``W0 < pane_start(t) + step + grace``.

Why not Faust's windowed tables (``Table.hopping``): they expire windows against the wall clock
(``Window.stale(timestamp, time.time())`` in ``faust/tables/base.py``), so replayed history
(the 2014 listens) would be expired as soon as it is written; they have no watermark or grace
period, no notion of a late event, and they update ``size / step`` windows per event. State is
still kept in Faust tables with changelogs (:mod:`streams.features_state`).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from infra.errors import ConfigError

_UNITS = {"ms": 1, "s": 1000, "m": 60_000, "min": 60_000, "h": 3_600_000, "d": 86_400_000}
_DURATION = re.compile(r"^\s*(\d+)\s*(ms|s|min|m|h|d)\s*$")


def parse_duration_ms(text: str) -> int:
    """``"5m"`` → 300000. Units: ms, s, m/min, h, d.

    Raises:
        ConfigError: not a positive duration with a unit.
    """
    match = _DURATION.match(text)
    if not match or int(match.group(1)) <= 0:
        raise ConfigError(f"{text!r} is not a duration like 500ms, 30s, 5m, 1h or 1d")
    return int(match.group(1)) * _UNITS[match.group(2)]


def format_duration(ms: int) -> str:
    """300000 → ``"5m"`` (the largest unit that divides ``ms``)."""
    for unit, size in (("d", 86_400_000), ("h", 3_600_000), ("m", 60_000), ("s", 1000)):
        if ms % size == 0:
            return f"{ms // size}{unit}"
    return f"{ms}ms"


@dataclass(frozen=True)
class HoppingWindows:
    """Hopping windows of ``size_ms`` advancing by ``step_ms``, grace period ``grace_ms``."""

    size_ms: int
    step_ms: int
    grace_ms: int

    def __post_init__(self) -> None:
        if self.size_ms <= 0 or self.step_ms <= 0 or self.grace_ms < 0:
            raise ConfigError(f"window {self}: sizes must be positive and the grace period >= 0")
        if self.size_ms % self.step_ms:
            raise ConfigError(f"window {self.name}: the step must divide the size (e.g. 1h/5m, 1d/1h)")

    @property
    def name(self) -> str:
        """``"1h/5m"``: size/step."""
        return f"{format_duration(self.size_ms)}/{format_duration(self.step_ms)}"

    @property
    def panes_per_window(self) -> int:
        """``size / step``."""
        return self.size_ms // self.step_ms

    def pane(self, t_ms: int) -> int:
        """Start of the pane holding event time ``t_ms``."""
        return t_ms - t_ms % self.step_ms

    def pane_closes_at(self, pane_start: int) -> int:
        """The watermark at which pane ``pane_start`` closes (``start + step + grace``)."""
        return pane_start + self.step_ms + self.grace_ms

    def is_late(self, t_ms: int, watermark: int) -> bool:
        """Whether an event at ``t_ms`` arriving at ``watermark`` is late (its pane is closed)."""
        return watermark >= self.pane_closes_at(self.pane(t_ms))

    def window_closes_at(self, start: int) -> int:
        """The watermark at which window ``[start, start + size)`` closes."""
        return start + self.size_ms + self.grace_ms

    def panes_of(self, start: int) -> range:
        """Pane starts of window ``start``."""
        return range(start, start + self.size_ms, self.step_ms)

    def windows_of_pane(self, pane_start: int) -> range:
        """Starts of the windows that contain pane ``pane_start``, oldest first."""
        return range(pane_start - self.size_ms + self.step_ms, pane_start + 1, self.step_ms)

    def closing(self, panes: Iterable[int], before: int, after: int) -> list[int]:
        """Starts of the windows holding at least one of ``panes`` that close when the watermark
        moves from ``before`` to ``after`` (``before < close <= after``), oldest first."""
        out: set[int] = set()
        if after <= before:
            return []
        for p in panes:
            for start in self.windows_of_pane(p):
                if before < self.window_closes_at(start) <= after:
                    out.add(start)
        return sorted(out)

    def pane_retired(self, pane_start: int, watermark: int) -> bool:
        """Whether every window holding pane ``pane_start`` has closed at ``watermark``."""
        return watermark >= self.window_closes_at(pane_start)


def parse_windows(text: str, grace_ms: int) -> tuple[HoppingWindows, ...]:
    """``"1h/5m,1d/1h"`` → hopping windows with ``grace_ms``.

    Raises:
        ConfigError: a malformed entry (the message names it).
    """
    out = []
    for part in text.split(","):
        if not part.strip():
            continue
        size, sep, step = part.partition("/")
        if not sep:
            raise ConfigError(f"window {part.strip()!r} is not SIZE/STEP, e.g. 1h/5m")
        out.append(HoppingWindows(parse_duration_ms(size), parse_duration_ms(step), grace_ms))
    if not out:
        raise ConfigError(f"no windows in {text!r}; expected e.g. 1h/5m,1d/1h")
    return tuple(out)
