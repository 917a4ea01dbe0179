"""A private PostgreSQL server for tests and benchmarks, started from the system's packages.

``start_postgres(tmp_dir)`` runs ``initdb`` + ``pg_ctl start`` from the highest
``/usr/lib/postgresql/<version>/bin`` (Debian, Ubuntu), else from the directory of ``initdb`` on
``PATH`` (Fedora, Homebrew…), on a free 127.0.0.1 port (unix socket inside the temporary
directory, ``fsync=off``), creates the database ``backbeat`` and returns its URL (user
``postgres``, trust authentication, no password) and a ``stop()`` that stops the server and
deletes its files. As root (CI) the server commands run as the ``postgres`` system user that
Debian's ``postgresql`` package creates, because ``initdb`` refuses to run as root.

Without the binaries the PostgreSQL tests *fail* with :data:`MISSING` (what to install), never
skip: ``make test`` installs them with apt-get when it can (``infra/ensure-postgres.sh``).
"""

from __future__ import annotations

import os
import pwd
import re
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlsplit

import psycopg
from psycopg import sql

from infra.processes import free_port

#: Where Debian/Ubuntu install the server binaries, one directory per major version.
PG_LIB_DIR = Path("/usr/lib/postgresql")
INSTALL_HINT = "apt-get install -y postgresql"
#: Set to a server URL to use that server instead of starting one.
TEST_URL_VARIABLE = "BACKBEAT_TEST_POSTGRES_URL"
_TOOLS = ("initdb", "pg_ctl", "postgres")
#: Why the PostgreSQL tests fail on a machine without PostgreSQL, and what to do (the same words as
#: ``infra/ensure-postgres.sh``).
MISSING = (
    f"PostgreSQL server binaries (initdb, pg_ctl, postgres) not found under {PG_LIB_DIR}/*/bin or on "
    "PATH: the PostgreSQL saga tests (event store contract on PostgreSQL, fault run) fail without "
    f"them. Install the PostgreSQL server: `{INSTALL_HINT}` (Debian/Ubuntu; `make test` does it when "
    "apt-get is available), `dnf install postgresql-server` (Fedora), `brew install postgresql` "
    f"(macOS); or set {TEST_URL_VARIABLE} to a server where the tests may create databases"
)

_SERVER_USER = "postgres"
_DATABASE = "backbeat"


class PostgresUnavailable(RuntimeError):
    """The PostgreSQL server binaries are missing, or the server did not start (message says why)."""


def find_postgres_bindir(lib_dir: Path = PG_LIB_DIR, search_path: str | None = None) -> Path | None:
    """The ``bin`` directory of the highest PostgreSQL version under ``lib_dir`` that has ``initdb``,
    ``pg_ctl`` and ``postgres``; else the directory of ``initdb`` on ``search_path`` (default
    ``$PATH``; ``""`` searches nothing) when the other two are beside it; ``None`` when there is none."""
    found: list[tuple[tuple[int, ...], Path]] = []
    for bindir in lib_dir.glob("*/bin"):
        version = tuple(int(part) for part in re.findall(r"\d+", bindir.parent.name))
        if version and all((bindir / tool).is_file() for tool in _TOOLS):
            found.append((version, bindir))
    if found:
        return max(found)[1]
    initdb = shutil.which("initdb", path=search_path) if search_path != "" else None
    if initdb:
        bindir = Path(initdb).resolve().parent
        if all((bindir / tool).is_file() for tool in _TOOLS):
            return bindir
    return None


def _as_server_user(argv: list[str]) -> list[str]:
    return ["runuser", "-u", _SERVER_USER, "--", *argv] if os.geteuid() == 0 else argv


def _run(argv: list[str], cwd: Path, what: str) -> None:
    proc = subprocess.run(_as_server_user(argv), cwd=cwd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise PostgresUnavailable(
            f"{what} failed ({proc.returncode}): {proc.stderr.strip() or proc.stdout.strip()}"
        )


def _server_can_use(directory: Path) -> bool:
    """Whether the server user can create files in ``directory`` (pytest's root-owned 0700 temp
    directories are not even traversable by ``postgres``)."""
    if os.geteuid() != 0:
        return True
    probe = subprocess.run(
        _as_server_user(["test", "-w", str(directory), "-a", "-x", str(directory)]), check=False
    )
    return probe.returncode == 0


def start_postgres(
    tmp_dir: Path, *, timeout_s: float = 60.0, lib_dir: Path = PG_LIB_DIR, search_path: str | None = None
) -> tuple[str, Callable[[], None]]:
    """Start a private PostgreSQL server with its files under ``tmp_dir``, binaries from ``lib_dir``
    or ``search_path`` (:func:`find_postgres_bindir`).

    Returns ``(url, stop)``: ``url`` is ``postgresql://postgres@127.0.0.1:<port>/backbeat``;
    ``stop()`` (idempotent) stops the server (fast, no checkpoint) and deletes its files.

    Raises:
        PostgresUnavailable: no server binaries (:data:`MISSING`: what to install), no
            ``postgres`` user when running as root, or the server did not accept connections
            within ``timeout_s`` seconds (the message ends with the server log).
    """
    bindir = find_postgres_bindir(lib_dir, search_path)
    if bindir is None:
        raise PostgresUnavailable(MISSING if lib_dir == PG_LIB_DIR else f"{MISSING} (searched {lib_dir})")
    if os.geteuid() == 0 and shutil.which("runuser") is None:
        raise PostgresUnavailable(
            "running as root needs `runuser` (util-linux) to start PostgreSQL as 'postgres'"
        )
    if os.geteuid() == 0:
        try:
            server_user = pwd.getpwnam(_SERVER_USER)
        except KeyError:
            raise PostgresUnavailable(
                f"running as root but there is no '{_SERVER_USER}' system user (initdb refuses root); "
                f"`{INSTALL_HINT}` creates it"
            ) from None

    tmp_dir.mkdir(parents=True, exist_ok=True)
    base = Path(tempfile.mkdtemp(prefix="pg-", dir=tmp_dir))
    if os.geteuid() == 0:
        os.chown(base, server_user.pw_uid, server_user.pw_gid)
    # Unix socket paths are limited to ~107 bytes; the server user must reach the directory.
    if len(str(base)) > 70 or not _server_can_use(base):
        shutil.rmtree(base, ignore_errors=True)
        base = Path(tempfile.mkdtemp(prefix="backbeat-pg-"))
        if os.geteuid() == 0:
            os.chown(base, server_user.pw_uid, server_user.pw_gid)
    data, log = base / "data", base / "server.log"
    port = 0
    stopped = False

    def stop() -> None:
        nonlocal stopped
        if stopped:
            return
        stopped = True
        if (data / "postmaster.pid").exists():
            subprocess.run(
                _as_server_user([str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop"]),
                cwd=base, capture_output=True, check=False, timeout=60,
            )  # fmt: skip
        shutil.rmtree(base, ignore_errors=True)

    try:
        _run(
            [str(bindir / "initdb"), "-D", str(data), "-A", "trust", "-U", _SERVER_USER, "-E", "UTF8",
             "--locale=C", "--no-sync", "--no-instructions"],
            base, "initdb",
        )  # fmt: skip
        with (data / "postgresql.conf").open("a") as conf:
            conf.write(
                "\n# backbeat tests: private, throw-away server\n"
                "listen_addresses = '127.0.0.1'\n"
                f"unix_socket_directories = '{base}'\n"
                "fsync = off\n"
                "synchronous_commit = off\n"
                "full_page_writes = off\n"
                "max_connections = 200\n"
            )
        for _attempt in range(3):  # another process may take the free port before the server binds it
            port = free_port()
            log.unlink(missing_ok=True)
            # `pg_ctl -w` waits until the postmaster reports itself ready in postmaster.pid (the
            # pg_ctl documentation, "-w"), so no connection is tried while it is still starting up.
            proc = subprocess.run(
                _as_server_user([str(bindir / "pg_ctl"), "-D", str(data), "-l", str(log), "-o", f"-p {port}",
                                 "-w", "-t", str(max(1, int(timeout_s))), "start"]),
                cwd=base, capture_output=True, text=True, check=False,
            )  # fmt: skip
            if proc.returncode == 0:
                _create_database(port)
                break
            if not _port_taken(log):
                raise PostgresUnavailable(
                    f"PostgreSQL on 127.0.0.1:{port} did not start (pg_ctl exit {proc.returncode}): "
                    f"{proc.stderr.strip() or proc.stdout.strip()}\n{_tail(log)}"
                )
        else:
            raise PostgresUnavailable(f"PostgreSQL could not bind a free port 3 times:\n{_tail(log)}")
    except BaseException:
        stop()
        raise
    return f"postgresql://{_SERVER_USER}@127.0.0.1:{port}/{_DATABASE}", stop


def _tail(log: Path) -> str:
    return log.read_text(errors="replace")[-2000:] if log.exists() else "(no server log)"


def _port_taken(log: Path) -> bool:
    """Whether the server log says the port was taken (then another port is tried)."""
    text = log.read_text(errors="replace") if log.exists() else ""
    return "could not bind" in text or "could not create any TCP/IP sockets" in text


def _create_database(port: int) -> None:
    """Create the test database on the (ready) server listening on ``port``.

    Raises:
        PostgresUnavailable: the server refused the connection or the statement.
    """
    admin = f"postgresql://{_SERVER_USER}@127.0.0.1:{port}/postgres"
    try:
        with psycopg.connect(admin, connect_timeout=10, autocommit=True) as conn:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(_DATABASE)))
    except psycopg.Error as exc:
        raise PostgresUnavailable(f"PostgreSQL on 127.0.0.1:{port} is up but refused: {exc}") from None


def create_database(url: str, prefix: str = "t") -> tuple[str, Callable[[], None]]:
    """Create a fresh, uniquely named database on the server of ``url``.

    Returns ``(new_url, drop)``; ``drop()`` removes the database even if connections remain
    (``DROP DATABASE … WITH (FORCE)``, PostgreSQL 13+).
    """
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))

    def drop() -> None:
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))

    return urlsplit(url)._replace(path=f"/{name}").geturl(), drop


def postgres_for_tests(tmp_dir: Path) -> tuple[str, Callable[[], None]]:
    """``$BACKBEAT_TEST_POSTGRES_URL`` with a no-op stop when set, else :func:`start_postgres`."""
    url = os.environ.get(TEST_URL_VARIABLE, "").strip()
    if url:
        return url, lambda: None
    return start_postgres(tmp_dir)
