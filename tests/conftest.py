"""Shared fixtures: a real Tansu broker and backbeat's embedded registry on free ports, in a
temporary data dir, started once per test session and stopped after it."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from infra.processes import free_port
from infra.resources import CATALOG_SPOTIFY as CATALOG
from infra.resources import DATA_DIR, LISTENS_30MUSIC, LISTENS_LASTFM1K
from infra.settings import Settings

#: The repository's real data sets (``data/``, gzipped; read them with ``infra.resources.open_data``).
DATA = DATA_DIR
__all__ = ["CATALOG", "DATA", "LISTENS_30MUSIC", "LISTENS_LASTFM1K", "env_for", "settings_for", "wait_for"]


def settings_for(data_dir: Path, broker_port: int, registry_port: int) -> Settings:
    """Settings pointing at a broker and registry on the given loopback ports."""
    return Settings.from_env(
        {
            "BACKBEAT_BOOTSTRAP_SERVERS": f"127.0.0.1:{broker_port}",
            "BACKBEAT_REGISTRY_URL": f"http://127.0.0.1:{registry_port}",
            "BACKBEAT_DATA_DIR": str(data_dir),
        }
    )


def env_for(settings: Settings) -> dict[str, str]:
    """os.environ plus the BACKBEAT_* variables of ``settings`` (for subprocesses)."""
    return {**os.environ, **settings.to_env()}


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Settings]:
    """A running broker + registry for the whole test session (the same code as 'backbeat up')."""
    from infra import services

    data_dir = tmp_path_factory.mktemp("stack")
    settings = settings_for(data_dir, free_port(), free_port())
    services.up(settings)
    try:
        yield settings
    finally:
        services.down(settings)


def wait_for(condition: Callable[[], object], timeout_s: float = 60.0, what: str = "") -> object:
    """Poll ``condition`` every 0.1 s until it returns a truthy value; fail after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    last: object = None
    while time.monotonic() < deadline:
        last = condition()
        if last:
            return last
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what or condition}: {last!r}")


_counter = iter(range(1, 1_000_000))


@pytest.fixture
def unique() -> Callable[[str], str]:
    """Unique names for topics/groups in the shared broker: unique('t') -> 't-<pid>-<n>'."""
    return lambda prefix: f"{prefix}-{os.getpid()}-{next(_counter)}"
