"""``backbeat worker --reset-state``: drop a worker's local table state so that it rebuilds every
table from its changelog topic at start.

Where the state is: Faust keeps local table data under ``tabledir`` (``<data_dir>/faust/<app
id>/v<version>/tables``). With ``BACKBEAT_STREAMS_STORE=rocksdict://`` each table partition is a
RocksDB directory there (``<table>-<partition>.db``) that also holds the changelog offset it was
written up to (Faust's ``__faust\\0offset__`` key), so a restart only reads the changelog after
that offset. With ``memory://`` nothing is written there (the directories are created empty) and
every start is already a full recovery; the reset then removes whatever stray files it finds and
says so.

What the reset does not touch: the changelog topics (the source of the rebuilt state), the
consumer group's committed offsets on the source topics (the agents resume where they were; the
source topics are not reprocessed) and anything outside the app's data dir.

:func:`reset_local_state` deletes the files; :class:`streams.recovery.FetchRecovery` then ignores
any persisted offset in the first recovery of the process (so the changelog is read from its
first offset whatever is on disk) and logs the records it read and the keys each table holds.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from infra.errors import InfraError

log = logging.getLogger("streams.reset")


@dataclass(frozen=True)
class ResetReport:
    """What :func:`reset_local_state` removed.

    ``tabledir``: the directory that was emptied; ``removed``: ``(path, bytes)`` of each removed
    top-level entry (a RocksDB partition directory or a stray file); ``store``: Faust's store URL
    (``memory://`` or ``rocksdb://``).
    """

    tabledir: Path
    store: str
    removed: list[tuple[Path, int]] = field(default_factory=list)

    @property
    def bytes(self) -> int:
        """Total size of what was removed, in bytes."""
        return sum(size for _, size in self.removed)

    def describe(self) -> str:
        """One line for the log."""
        if not self.removed:
            return f"reset-state: nothing on disk under {self.tabledir} (store {self.store})"
        names = ", ".join(p.name for p, _ in self.removed)
        return (
            f"reset-state: removed {len(self.removed)} table stores ({self.bytes / 1e6:.1f} MB) "
            f"from {self.tabledir} (store {self.store}): {names}"
        )


def _size(path: Path) -> int:
    if path.is_file() or path.is_symlink():
        return path.lstat().st_size
    return sum(p.lstat().st_size for p in path.rglob("*") if p.is_file())


def _check_unlocked(db_dir: Path) -> None:
    """Fail when another process holds the RocksDB lock of ``db_dir`` (a worker still running)."""
    lock = db_dir / "LOCK"
    if not lock.is_file():
        return
    with lock.open("r+b") as fh:
        try:
            fcntl.lockf(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno in (errno.EACCES, errno.EAGAIN):
                raise InfraError(
                    f"{db_dir} is locked by a running process: stop the worker of this app before "
                    "resetting its state"
                ) from None
            raise
        fcntl.lockf(fh, fcntl.LOCK_UN)


def reset_local_state(app: Any) -> ResetReport:
    """Delete the local table state of Faust ``app`` (not started) and mark it so that its first
    recovery reads every changelog from the beginning (``app.reset_state = True``).

    Returns:
        What was removed (logged at INFO too).

    Raises:
        InfraError: a RocksDB store is locked by a running worker (nothing is removed then).
    """
    tabledir = Path(app.conf.tabledir)
    store = str(app.conf.store)
    entries = sorted(tabledir.iterdir()) if tabledir.is_dir() else []
    for entry in entries:
        if entry.is_dir():
            _check_unlocked(entry)
    report = ResetReport(tabledir, store)
    for entry in entries:
        size = _size(entry)
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()
        report.removed.append((entry, size))
    app.reset_state = True
    log.info(report.describe())
    return report
