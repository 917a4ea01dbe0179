"""Failpoints: named places in the runtime where a test can make the worker die as a SIGKILL
would, to prove the failure semantics of :mod:`streams.runtime.runner` at every step of a
checkpoint instead of hoping a timed kill lands there.

``BACKBEAT_FAILPOINT=<name>:<n>`` makes the process exit at once (``os._exit(137)``, no cleanup,
nothing flushed) the ``n``-th time it passes ``<name>`` (``n`` defaults to 1). The names:

* ``outputs-produced``: a batch's outputs handed to the producer, not yet acknowledged;
* ``outputs-acked``: outputs on the broker, no changelog record produced;
* ``changelog-half``: half of the first processed partition's checkpoint records produced and
  acknowledged, the rest (and its position record) not;
* ``changelog-acked``: checkpoints on the broker, source offsets not committed;
* ``committed``: after the commit (the next batch's work is lost).

One more is a behaviour, not an exit: ``stall`` keeps every assigned partition paused, as a
consumer whose fetches return nothing would (the stall detector must report it).

Unset (production), :func:`failpoint` is one dictionary lookup of a module constant.
"""

from __future__ import annotations

import os
import sys

#: The failpoints a worker is told to die at: name → how many passes remain before it does.
_ARMED: dict[str, int] = {}
_spec = os.environ.get("BACKBEAT_FAILPOINT", "")
if _spec:
    _name, _, _count = _spec.partition(":")
    _ARMED[_name.strip()] = int(_count or 1)

NAMES = ("outputs-produced", "outputs-acked", "changelog-half", "changelog-acked", "committed")


def failpoint(name: str) -> None:
    """Exit the process at once if ``name`` is armed and this is its ``n``-th pass."""
    if not _ARMED or name not in _ARMED:
        return
    _ARMED[name] -= 1
    if _ARMED[name] <= 0:
        sys.stderr.write(f"failpoint {name}: exiting as a SIGKILL would\n")
        sys.stderr.flush()
        os._exit(137)


def active(name: str) -> bool:
    """True when the behaviour failpoint ``name`` is set (e.g. ``stall``)."""
    return name in _ARMED


def armed() -> bool:
    """True when a failpoint is set (tests check the variable reached the worker)."""
    return bool(_ARMED)


__all__ = ["NAMES", "active", "armed", "failpoint"]
