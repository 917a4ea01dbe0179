"""Seeded, timing-independent random decisions for the simulators.

A decision is a pure function of a seed and the names of what is decided (an idempotency key, a
call number, a fault name), so a fault run is reproducible whatever the scheduling and however
often the processes are restarted.
"""

from __future__ import annotations

import hashlib

_SCALE = float(2**64)


def uniform(seed: int, *parts: object) -> float:
    """A number in [0, 1) from SHA-256 of ``seed`` and ``parts`` (the first 8 bytes, big-endian,
    divided by 2**64): the same arguments always give the same number."""
    text = "\x1f".join([str(int(seed)), *(str(p) for p in parts)])
    digest = hashlib.sha256(text.encode()).digest()
    return int.from_bytes(digest[:8], "big") / _SCALE


def hits(rate: float, seed: int, *parts: object) -> bool:
    """True with probability ``rate`` (0..1), decided by :func:`uniform` of ``seed`` and ``parts``."""
    return rate > 0.0 and uniform(seed, *parts) < rate
