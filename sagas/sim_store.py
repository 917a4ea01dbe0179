"""The record a simulated external party (the payment gateway, the notification provider) keeps:
one SQLite file, opened so that it survives process kills and can be shared by threads and
processes, as a real provider's own database would be."""

from __future__ import annotations

import sqlite3
from pathlib import Path


def open_record(path: Path, schema: str) -> sqlite3.Connection:
    """A connection to the SQLite file at ``path`` (created with its folder when missing), in
    autocommit mode, shareable between threads (the caller serialises with a lock), in WAL mode
    with ``synchronous=NORMAL`` (durable across process kills: SQLite's WAL documentation), with
    ``schema`` (idempotent ``CREATE ... IF NOT EXISTS`` statements) applied."""
    path.parent.mkdir(parents=True, exist_ok=True)
    db = sqlite3.connect(path, timeout=30, isolation_level=None, check_same_thread=False)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=NORMAL")
    db.executescript(schema)
    return db


__all__ = ["open_record"]
