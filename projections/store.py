"""Sharing the read-model DuckDB file between one writing runner and readers in other processes.

DuckDB lets one process open a file for writing and refuses every other open (read-only too)
while it does. So readers and the writer take turns, through a *turnstile* lock file beside the
database (``backbeat.duckdb.turnstile``, ``flock``):

* a reader (``backbeat sql``, :func:`reader`) takes the turnstile *shared* and holds it from
  before it opens the file read-only until after it closed it; it retries DuckDB's lock error
  with a short backoff until a deadline (the writer's batch in flight);
* a writer takes the turnstile *exclusively* only while it opens the file. A runner keeps the file
  open across batches (:class:`WriterSession`; closing checkpoints, ~0.15 s a batch) and, between
  two batch transactions, tests the turnstile without blocking: when a reader holds it, the
  runner closes the file and waits for the turnstile, so the reader gets in after at most one
  batch and the runner resumes when the query is done.

A reader therefore waits at most for one batch transaction, and the runner pauses while a query
runs: ad-hoc queries should be short. :func:`writer` is the one-shot form (start-up, reset).
"""

from __future__ import annotations

import fcntl
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import duckdb

from infra.errors import BackbeatError

_BACKOFF_START_S = 0.002
_BACKOFF_MAX_S = 0.05


class DatabaseBusyError(BackbeatError):
    """The read-model database stayed locked by another process until the deadline."""


class NoReadModelsError(BackbeatError):
    """The read-model database file does not exist yet."""


def turnstile_path(db_path: Path) -> Path:
    """The lock file that orders writers and readers of ``db_path``."""
    return db_path.with_name(db_path.name + ".turnstile")


def _is_lock_error(exc: BaseException) -> bool:
    text = str(exc).lower()
    return "lock" in text and ("conflicting" in text or "could not set" in text)


@contextmanager
def _flock(path: Path, exclusive: bool, deadline: float, what: str) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        mode = (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB
        pause = _BACKOFF_START_S
        while True:
            try:
                fcntl.flock(fd, mode)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise DatabaseBusyError(
                        f"{what}: {path} stayed locked by another backbeat process; "
                        "a long query or another runner holds the read models, try again"
                    ) from None
                time.sleep(pause)
                pause = min(pause * 2, _BACKOFF_MAX_S)
        yield
    finally:
        os.close(fd)  # releases the lock


def _connect(db_path: Path, read_only: bool, deadline: float) -> duckdb.DuckDBPyConnection:
    pause = _BACKOFF_START_S
    while True:
        try:
            return duckdb.connect(str(db_path), read_only=read_only)
        except (duckdb.IOException, duckdb.ConnectionException) as exc:
            if not _is_lock_error(exc):
                raise
            if time.monotonic() >= deadline:
                raise DatabaseBusyError(
                    f"{db_path} stayed locked by another process ({exc}); a runner lets readers in "
                    "between batches, so a batch, a query or another writer took longer than the deadline"
                ) from exc
            time.sleep(pause)
            pause = min(pause * 2, _BACKOFF_MAX_S)


@contextmanager
def writer(db_path: Path, timeout_s: float = 120.0) -> Iterator[duckdb.DuckDBPyConnection]:
    """A read-write connection to ``db_path`` (created if missing), closed on exit.

    Waits for readers that are in (turnstile) and retries DuckDB's lock error for up to
    ``timeout_s`` seconds. The caller runs its transaction inside the block.

    Raises:
        DatabaseBusyError: the file stayed locked for ``timeout_s`` seconds.
    """
    deadline = time.monotonic() + timeout_s
    db_path.parent.mkdir(parents=True, exist_ok=True)
    with _flock(turnstile_path(db_path), True, deadline, "writing the read models"):
        conn = _connect(db_path, False, deadline)
    try:
        yield conn
    finally:
        conn.close()


class WriterSession:
    """The runner's connection to ``db_path``, kept open across batches while no reader waits.

    Use :meth:`connection` around each batch transaction, from one thread at a time, and
    :meth:`close` at the end.
    """

    def __init__(self, db_path: Path, timeout_s: float = 120.0) -> None:
        self.db_path = db_path
        self.timeout_s = timeout_s
        self._conn: duckdb.DuckDBPyConnection | None = None
        self._gate: int | None = None

    def _reader_waiting(self) -> bool:
        if self._gate is None:
            self._gate = os.open(turnstile_path(self.db_path), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._gate, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(self._gate, fcntl.LOCK_UN)
        return False

    @contextmanager
    def connection(self) -> Iterator[duckdb.DuckDBPyConnection]:
        """The open connection (opened, or reopened after letting a waiting reader in).
        A failure inside the block closes it (the next batch reopens).

        Raises:
            DatabaseBusyError: the file stayed locked for ``timeout_s`` seconds.
        """
        self.db_path.parent.mkdir(parents=True, exist_ok=True)
        if self._conn is not None and self._reader_waiting():
            self.close()
        if self._conn is None:
            deadline = time.monotonic() + self.timeout_s
            with _flock(turnstile_path(self.db_path), True, deadline, "writing the read models"):
                self._conn = _connect(self.db_path, False, deadline)
        try:
            yield self._conn
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Close the connection (DuckDB checkpoints its WAL into the file)."""
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()

    def __enter__(self) -> WriterSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
        if self._gate is not None:
            os.close(self._gate)
            self._gate = None


@contextmanager
def reader(db_path: Path, timeout_s: float = 30.0) -> Iterator[duckdb.DuckDBPyConnection]:
    """A read-only connection to ``db_path`` for one query, while runners may be writing.

    Raises:
        NoReadModelsError: the file does not exist (no projection has run yet).
        DatabaseBusyError: a runner's batch (or another writer) held it for ``timeout_s`` s.
    """
    if not db_path.exists():
        raise NoReadModelsError(
            f"there are no read models at {db_path} yet; run the projections first "
            "('backbeat project --until-caught-up')"
        )
    deadline = time.monotonic() + timeout_s
    with _flock(turnstile_path(db_path), False, deadline, "reading the read models"):
        conn = _connect(db_path, True, deadline)
        try:
            yield conn
        finally:
            conn.close()


__all__ = [
    "DatabaseBusyError",
    "NoReadModelsError",
    "WriterSession",
    "reader",
    "turnstile_path",
    "writer",
]
