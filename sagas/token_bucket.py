"""A token bucket kept as one number: the generic cell rate algorithm (GCRA, "virtual scheduling").

A bucket of ``capacity`` tokens refilled at ``refill_per_s`` tokens per second admits at most
``capacity + refill_per_s * (b - a)`` sends in any interval ``[a, b]`` (seconds): a burst of
``capacity`` after a quiet spell, then one every ``1 / refill_per_s`` s. GCRA states the same
rule with a single value per bucket, the *theoretical arrival time* ``tat`` (ms): a send at
``now`` is allowed when ``now >= tat - tolerance`` (``tolerance = (capacity - 1) * interval``,
``interval = 1000 / refill_per_s`` ms) and then moves ``tat`` to ``max(tat, now) + interval``
(ITU-T I.371 "virtual scheduling algorithm"; the same as a token bucket, with no refill timer).
A fresh bucket has ``tat = 0`` (full).

Why one number: the relay persists the bucket of each (user, channel) in its event store, one
small event per send, and a restart continues with the same limit. The bound holds for the
times at which tokens were taken, whatever order the takes come in (each take moves ``tat`` on
by ``interval``; the k-th take inside ``[a, b]`` needs ``now >= a + (k - capacity) * interval``).
Pure functions; times in ms since the epoch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class BucketSpec:
    """``capacity`` tokens (the burst, >= 1), refilled at ``refill_per_s`` tokens per second (> 0).

    Raises:
        ValueError: ``capacity < 1`` or ``refill_per_s <= 0``.
    """

    capacity: int
    refill_per_s: float

    def __post_init__(self) -> None:
        if self.capacity < 1:
            raise ValueError(f"bucket capacity {self.capacity}: give at least 1 token")
        if not self.refill_per_s > 0:
            raise ValueError(f"bucket refill {self.refill_per_s}/s: give a positive rate")

    @property
    def interval_ms(self) -> float:
        """Milliseconds between two tokens (``1000 / refill_per_s``)."""
        return 1000.0 / self.refill_per_s

    @property
    def tolerance_ms(self) -> float:
        """How far ``tat`` may run ahead of now and a send still be allowed (ms)."""
        return (self.capacity - 1) * self.interval_ms

    def max_in(self, span_ms: float) -> float:
        """The most sends any interval of ``span_ms`` ms (both ends included) may hold."""
        return self.capacity + max(0.0, span_ms) / self.interval_ms


def wait_ms(spec: BucketSpec, tat: float, now_ms: int) -> int:
    """Milliseconds until a token is available (0: now) for a bucket at ``tat``."""
    return max(0, math.ceil(tat - spec.tolerance_ms - now_ms))


def take(spec: BucketSpec, tat: float, now_ms: int) -> float:
    """The bucket's new ``tat`` after taking a token at ``now_ms``.

    Raises:
        ValueError: no token is available at ``now_ms`` (call :func:`wait_ms` first).
    """
    if wait_ms(spec, tat, now_ms) > 0:
        raise ValueError(f"no token at {now_ms}: the next one comes in {wait_ms(spec, tat, now_ms)} ms")
    return max(tat, float(now_ms)) + spec.interval_ms


def conforms(spec: BucketSpec, times_ms: list[int], slack_ms: float = 0.0) -> tuple[bool, str]:
    """Whether sends at ``times_ms`` keep within the bucket: every window ``[t_i, t_j]`` of the
    sorted times holds at most ``spec.max_in(t_j - t_i + slack_ms)`` sends. Returns ``(ok, why)``,
    ``why`` naming the first window that holds too many (tests and the docs' check use it)."""
    ts = sorted(times_ms)
    for i in range(len(ts)):
        for j in range(i, len(ts)):
            if j - i + 1 > spec.max_in(ts[j] - ts[i] + slack_ms) + 1e-9:
                return False, f"{j - i + 1} sends within {ts[j] - ts[i]} ms ({ts[i]}..{ts[j]})"
    return True, ""


__all__ = ["BucketSpec", "conforms", "take", "wait_ms"]
