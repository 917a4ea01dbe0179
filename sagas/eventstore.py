"""Where the saga applications keep their events: SQLite files by default, PostgreSQL on request.

Every eventsourcing application of backbeat (the saga orchestrator, the payment, entitlement and
inventory services…) has its own event store, chosen by ``BACKBEAT_EVENTSTORE_URL``
(:attr:`infra.settings.Settings.eventstore_url`):

==========================================  ==================================================
``BACKBEAT_EVENTSTORE_URL``                 store of the application named ``<app>``
==========================================  ==================================================
empty (default)                             SQLite file ``<data_dir>/eventstore/<app>.sqlite``
``sqlite:///abs/dir``                       SQLite file ``/abs/dir/<app>.sqlite``
``postgresql://user:pass@host:port/db``     PostgreSQL database ``db``, tables
(or ``postgres://…``)                       ``<app lowercased>_events`` and ``…_tracking``
==========================================  ==================================================

Build an application with ``MyApp(env=eventstore_env(settings, MyApp.name))``. The keys are the
plain eventsourcing ones (``PERSISTENCE_MODULE``, ``SQLITE_DBNAME``, ``POSTGRES_HOST``…):
``Application.construct_env`` merges ``type(app).env``, then ``os.environ``, then ``env=`` (ours
win over plain keys of the process environment) — but eventsourcing looks up
``<APP NAME UPPERCASED>_<KEY>`` before ``<KEY>``, so such a prefixed variable in the process
environment would still override our value.

In PostgreSQL the table prefix is the application's ``name`` (eventsourcing's factory reads it
from the application, not from the environment), so pass that same name as ``app_name``.
"""

from __future__ import annotations

import random
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar
from urllib.parse import unquote, urlsplit

from infra.errors import ConfigError
from infra.settings import Settings

#: Seconds a SQLite writer waits for another connection's lock before ``database is locked``.
SQLITE_LOCK_TIMEOUT_S = 10

#: PostgreSQL pool per application: connections kept open, and extra ones opened under load.
POSTGRES_POOL_SIZE = 2
POSTGRES_MAX_OVERFLOW = 8
#: Seconds to wait for a pooled PostgreSQL connection (eventsourcing's ``POSTGRES_CONNECT_TIMEOUT``
#: is the pool's wait, not libpq's ``connect_timeout``); eventsourcing retries failed operations.
POSTGRES_CONNECT_TIMEOUT_S = 5
#: Seconds an insert waits for the events table's lock (eventsourcing's default 0 = for ever).
POSTGRES_LOCK_TIMEOUT_S = 5
#: Seconds a connection may sit idle inside a transaction before the server ends the session.
POSTGRES_IDLE_IN_TRANSACTION_TIMEOUT_S = 5

# A name that is a safe file name and a PostgreSQL identifier once "_tracking" is appended (63 max).
_APP_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_]{0,53}")

_URL_FORMS = "use postgresql://user:password@host:port/dbname, sqlite:///absolute/dir, or leave it empty"


@dataclass(frozen=True)
class _SQLite:
    directory: Path


@dataclass(frozen=True)
class _Postgres:
    host: str
    port: int
    user: str
    password: str
    dbname: str


def _bad(url: str, why: str) -> ConfigError:
    shown = _redact(url)
    return ConfigError(f"BACKBEAT_EVENTSTORE_URL={shown!r}: {why}; {_URL_FORMS}")


def _redact(url: str) -> str:
    """``url`` with the password (if any) replaced by ``***``, for error messages."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return url
    if parts.password is None:
        return url
    userinfo, _, hostport = parts.netloc.rpartition("@")
    user = userinfo.split(":", 1)[0]
    return parts._replace(netloc=f"{user}:***@{hostport}").geturl()


def _parse(settings: Settings) -> _SQLite | _Postgres:
    url = settings.eventstore_url.strip()
    if not url:
        return _SQLite(settings.data_dir / "eventstore")
    try:
        parts = urlsplit(url)
    except ValueError as exc:
        raise _bad(url, f"not a URL ({exc})") from None
    scheme = parts.scheme.lower()
    if parts.query or parts.fragment:
        raise _bad(url, "query parameters and fragments are not supported")
    if scheme == "sqlite":
        if parts.netloc:
            why = f"SQLite URLs name an absolute directory after three slashes, not host {parts.netloc!r}"
            raise _bad(url, why)
        path = unquote(parts.path)
        if not path.startswith("/"):
            raise _bad(url, "the SQLite directory must be absolute")
        return _SQLite(Path(path))
    if scheme not in {"postgresql", "postgres"}:
        raise _bad(url, f"unsupported scheme {parts.scheme!r}")
    try:
        port = parts.port or 5432
    except ValueError:
        raise _bad(url, "the port is not a number from 1 to 65535") from None
    userinfo, _, hostport = parts.netloc.rpartition("@")
    # urlsplit().hostname lowercases; keep the host as written (and decode e.g. %2F for a socket dir).
    host = hostport[1 : hostport.index("]")] if hostport.startswith("[") else hostport.rsplit(":", 1)[0]
    host = unquote(host)
    if not host:
        raise _bad(url, "no host")
    user = unquote(userinfo.split(":", 1)[0])
    if not user:
        raise _bad(url, "no user name")
    dbname = unquote(parts.path.lstrip("/"))
    if not dbname or "/" in dbname:
        raise _bad(url, "the path must be the database name, e.g. /backbeat")
    return _Postgres(host=host, port=port, user=user, password=unquote(parts.password or ""), dbname=dbname)


def eventstore_env(settings: Settings, app_name: str) -> dict[str, str]:
    """The eventsourcing environment of the application named ``app_name`` (its ``Application.name``).

    Returns plain eventsourcing keys, to pass as ``Application(env=...)``:

    * SQLite: ``PERSISTENCE_MODULE=eventsourcing.sqlite``, ``SQLITE_DBNAME=<dir>/<app_name>.sqlite``
      (``<dir>`` is created), ``SQLITE_LOCK_TIMEOUT`` in seconds. eventsourcing turns on WAL itself.
    * PostgreSQL: ``PERSISTENCE_MODULE=eventsourcing.postgres``, ``POSTGRES_DBNAME`` / ``_HOST`` /
      ``_PORT`` / ``_USER`` / ``_PASSWORD`` from the URL (percent-decoded; no password = ``""``),
      pool size / overflow, and the timeouts above (seconds).
    * Both: ``SINGLE_ROW_TRACKING=y`` and ``CREATE_TABLE=y`` (eventsourcing's defaults, pinned so a
      stray variable of the process environment cannot change them).

    Raises:
        ConfigError: ``settings.eventstore_url`` has another scheme or is malformed (the message
            names the variable and hides the password).
        ValueError: ``app_name`` is not a letter followed by at most 53 letters, digits or ``_``.
    """
    if not _APP_NAME.fullmatch(app_name):
        raise ValueError(
            f"application name {app_name!r} must be a letter then at most 53 letters, digits or '_' "
            "(it names a SQLite file and PostgreSQL tables)"
        )
    target = _parse(settings)
    common = {"SINGLE_ROW_TRACKING": "y", "CREATE_TABLE": "y"}
    if isinstance(target, _SQLite):
        try:
            target.directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"cannot create the event store directory {target.directory}: {exc}") from None
        return {
            "PERSISTENCE_MODULE": "eventsourcing.sqlite",
            "SQLITE_DBNAME": str(target.directory / f"{app_name}.sqlite"),
            "SQLITE_LOCK_TIMEOUT": str(SQLITE_LOCK_TIMEOUT_S),
            **common,
        }
    return {
        "PERSISTENCE_MODULE": "eventsourcing.postgres",
        "POSTGRES_DBNAME": target.dbname,
        "POSTGRES_HOST": target.host,
        "POSTGRES_PORT": str(target.port),
        "POSTGRES_USER": target.user,
        "POSTGRES_PASSWORD": target.password,
        "POSTGRES_POOL_SIZE": str(POSTGRES_POOL_SIZE),
        "POSTGRES_MAX_OVERFLOW": str(POSTGRES_MAX_OVERFLOW),
        "POSTGRES_CONNECT_TIMEOUT": str(POSTGRES_CONNECT_TIMEOUT_S),
        "POSTGRES_LOCK_TIMEOUT": str(POSTGRES_LOCK_TIMEOUT_S),
        "POSTGRES_IDLE_IN_TRANSACTION_SESSION_TIMEOUT": str(POSTGRES_IDLE_IN_TRANSACTION_TIMEOUT_S),
        "POSTGRES_PRE_PING": "y",
        **common,
    }


def describe_eventstore(settings: Settings) -> str:
    """One line for humans: ``sqlite: /abs/var/eventstore`` or ``postgresql://user@host:port/db``
    (never the password).

    Raises:
        ConfigError: as :func:`eventstore_env`.
    """
    target = _parse(settings)
    if isinstance(target, _SQLite):
        return f"sqlite: {target.directory}"
    host = f"[{target.host}]" if ":" in target.host else target.host
    return f"postgresql://{target.user}@{host}:{target.port}/{target.dbname}"


__all__ = ["describe_eventstore", "eventstore_env"]


def reset_eventstore(settings: Settings, app_names: list[str]) -> list[str]:
    """Delete the stored events and tracking records of the named applications (SQLite: their
    files; PostgreSQL: their ``<name>_events`` / ``<name>_tracking`` tables). Returns what was
    removed, for the CLI. Only for starting afresh (``backbeat sagas reset``): the events are
    the sagas' only record.

    Raises:
        ConfigError: ``BACKBEAT_EVENTSTORE_URL`` is malformed.
        psycopg.Error: PostgreSQL refused (connection, permissions).
    """
    target = _parse(settings)
    removed: list[str] = []
    if isinstance(target, _SQLite):
        for name in app_names:
            for suffix in ("", "-wal", "-shm"):
                path = target.directory / f"{name}.sqlite{suffix}"
                if path.exists():
                    path.unlink()
                    removed.append(str(path))
        return removed
    import psycopg
    from psycopg import sql

    with psycopg.connect(
        host=target.host, port=target.port, user=target.user, password=target.password or None,
        dbname=target.dbname, connect_timeout=POSTGRES_CONNECT_TIMEOUT_S, autocommit=True,
    ) as conn:  # fmt: skip
        for name in app_names:
            for table in (f"{name.lower()}_events", f"{name.lower()}_tracking"):
                conn.execute(sql.SQL("DROP TABLE IF EXISTS {} CASCADE").format(sql.Identifier(table)))
                removed.append(f"table {table}")
    return removed


_OPEN_LOCK = threading.Lock()
#: Errors of two processes creating the same tables, types or functions at once: PostgreSQL's
#: catalog races, and (SQLite or PostgreSQL) eventsourcing's ``__migration__`` tracking row
#: inserted by the other process first, after it created the tables.
_DDL_RACES = ("concurrently", "already exists", "duplicate key value", "__migration__")

A = TypeVar("A")


def open_application(make: Callable[[], A], *, attempts: int = 10) -> A:
    """Construct an eventsourcing application with ``make()``, retrying when its start-up DDL
    (``CREATE TABLE IF NOT EXISTS``, ``CREATE OR REPLACE FUNCTION``, ``CREATE TYPE``) races with
    another process doing the same on PostgreSQL ("tuple concurrently updated", "duplicate key
    value violates unique constraint pg_type…": PostgreSQL's catalog updates are not safe for
    concurrent DDL), or with another process that created a new SQLite store's tables and its
    ``__migration__`` tracking row first (``backbeat sagas start --wait`` right after ``backbeat
    sagas run``). Constructions in one process are serialised by a lock.

    Raises:
        eventsourcing.persistence.PersistenceError: the error persists after ``attempts`` tries,
            or is not a DDL race.
    """
    from eventsourcing.persistence import PersistenceError

    for attempt in range(1, attempts + 1):
        try:
            with _OPEN_LOCK:
                return make()
        except PersistenceError as exc:
            if attempt == attempts or not any(s in str(exc) for s in _DDL_RACES):
                raise
            time.sleep(random.uniform(0.05, 0.1 * attempt))  # back off from the other process's DDL
    raise AssertionError("unreachable")
