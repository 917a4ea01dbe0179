"""``backbeat demo`` (= ``make demo``): the walking skeleton end to end on real data.

up → topics → import the Spotify catalog and a real listening log → the listening-ingest agent
(a Faust worker) sessionises the listens → the projection runner materialises ``listens``,
``sessions`` and ``tracks`` into DuckDB (+ the Parquet lake) → a report → stop what it started.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from confluent_kafka import TopicPartition
from confluent_kafka.admin import AdminClient, ConsumerGroupTopicPartitions

from events.offsets import high_watermarks
from infra.errors import InfraError
from infra.processes import Running, spawn, stop, tail
from infra.settings import REPO_ROOT, Settings

DATA_DIR = REPO_ROOT.parent / "shared" / "data"
DEFAULT_LISTENS = DATA_DIR / "listens_30music_2014.tsv"
DEFAULT_CATALOG = DATA_DIR / "catalog_spotify_songs_2020.csv.gz"


@dataclass(frozen=True)
class AgentProgress:
    """How far a consumer group got: committed offsets and high watermarks summed over
    partitions (events, control records included)."""

    committed: int
    end: int

    @property
    def done(self) -> bool:
        """True when every partition's committed offset reached its high watermark."""
        return self.committed >= self.end


def group_progress(settings: Settings, group: str, topic: str) -> AgentProgress:
    """Committed offsets of ``group`` on ``topic`` against the Fetch-based high watermarks.

    Raises:
        InfraError: the broker cannot be reached.
    """
    ends = high_watermarks(settings, topic)
    admin = AdminClient(settings.kafka_common())
    request = ConsumerGroupTopicPartitions(group, [TopicPartition(topic, p) for p in ends])
    try:
        result = admin.list_consumer_group_offsets([request])[group].result(timeout=10)
    except Exception as exc:
        raise InfraError(f"cannot read the offsets of consumer group {group}: {exc}") from exc
    committed = {tp.partition: max(tp.offset, 0) for tp in result.topic_partitions}
    return AgentProgress(
        committed=sum(min(committed.get(p, 0), end) for p, end in ends.items()),
        end=sum(ends.values()),
    )


def worker_env(settings: Settings) -> dict[str, str]:
    """The environment of a worker subprocess: ours plus the resolved BACKBEAT_* settings."""
    env = dict(os.environ)
    env.update(
        BACKBEAT_BOOTSTRAP_SERVERS=settings.bootstrap_servers,
        BACKBEAT_REGISTRY_URL=settings.registry_url,
        BACKBEAT_DATA_DIR=str(settings.data_dir),
        PYTHONUNBUFFERED="1",
    )
    return env


def start_worker(settings: Settings, ready: Callable[[], bool] | None = None) -> Running:
    """Start the Faust worker (``faust -A streams.app worker``) in the background, logging to
    ``<data_dir>/run/worker.log``.

    Raises:
        InfraError: it exits while starting.
    """
    argv = [sys.executable, "-m", "faust", "-A", "streams.app", "worker", "-l", "info"]
    return spawn(
        "worker",
        argv,
        run_dir=settings.run_dir,
        address="-",
        ready=ready or (lambda: True),
        timeout_s=60,
        env=worker_env(settings),
    )


def wait_until(
    check: Callable[[], AgentProgress],
    *,
    on_progress: Callable[[AgentProgress], None],
    worker: Running,
    timeout_s: float,
) -> AgentProgress:
    """Poll ``check`` twice a second until it reports done; fail when the worker dies or
    ``timeout_s`` (s) passes.

    Raises:
        InfraError: the worker exited, or no completion in time (the log's tail is quoted).
    """
    from infra.processes import is_alive

    deadline = time.monotonic() + timeout_s
    while True:
        progress = check()
        on_progress(progress)
        if progress.done:
            return progress
        if not is_alive(worker):
            raise InfraError(f"the worker exited; last lines of {worker.log}:\n{tail(Path(worker.log))}")
        if time.monotonic() > deadline:
            raise InfraError(
                f"the agent did not finish within {timeout_s:.0f} s "
                f"({progress.committed:,}/{progress.end:,}); see {worker.log}"
            )
        time.sleep(0.5)


def stop_worker(worker: Running) -> None:
    """Stop the worker started by :func:`start_worker`."""
    stop(worker, timeout_s=20)


__all__ = [
    "AgentProgress",
    "DEFAULT_CATALOG",
    "DEFAULT_LISTENS",
    "group_progress",
    "start_worker",
    "stop_worker",
    "wait_until",
]
