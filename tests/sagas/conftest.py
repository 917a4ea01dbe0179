"""Fixtures of the saga tests: a real PostgreSQL server for the whole session (see ``tests/sagas/pg.py``)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.sagas.pg import PostgresUnavailable, create_database, postgres_for_tests


@pytest.fixture(scope="session")
def postgres_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """URL of a PostgreSQL database for this test session: ``$BACKBEAT_TEST_POSTGRES_URL`` if set,
    else a private server started from the system packages (stopped and deleted at the end).
    Fails (never skips) when PostgreSQL is not installed."""
    try:
        url, stop = postgres_for_tests(tmp_path_factory.mktemp("postgres"))
    except PostgresUnavailable as exc:
        pytest.fail(str(exc), pytrace=False)
    try:
        yield url
    finally:
        stop()


@pytest.fixture
def fresh_postgres_url(postgres_url: str) -> Iterator[str]:
    """URL of a new, empty database on the session's server, dropped after the test (close the
    applications that use it first, or they will be disconnected)."""
    url, drop = create_database(postgres_url)
    try:
        yield url
    finally:
        drop()
