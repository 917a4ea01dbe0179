"""Fixtures of the saga tests: a real PostgreSQL server for the whole session (see ``tests/sagas/pg.py``)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from infra import services
from infra.processes import free_port
from infra.provision import apply_topics
from infra.settings import Settings
from tests.conftest import settings_for
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


@pytest.fixture
def private_stack(tmp_path: Path) -> Iterator[Settings]:
    """A broker and registry of this test alone, with every topic created: saga tests need one,
    because the topics have fixed names and a fresh event store reads them from the start."""
    settings = settings_for(tmp_path / "data", free_port(), free_port())
    services.up(settings)
    try:
        apply_topics(settings)
        yield settings
    finally:
        services.down(settings)
