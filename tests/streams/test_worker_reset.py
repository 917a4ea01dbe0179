"""``backbeat worker --reset-state`` on the rocksdict store: a worker's local RocksDB state is
corrupted while it is down; restarted with ``--reset-state`` it removes the stores, rebuilds the
table from the whole changelog (records and keys logged) and its outputs equal an uninterrupted
run's. Also: the reset refuses to delete stores that a running worker holds."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest

from events.offsets import high_watermarks
from infra.errors import InfraError
from infra.provision import apply_topics
from infra.settings import REPO_ROOT, Settings
from streams.config import TABLE, IngestConfig
from streams.reset import reset_local_state
from tests.conftest import env_for, wait_for
from tests.streams.test_ingest_agent import RestartScenario, decode_sessions
from tests.streams.workers import TopicReader, Worker

pytestmark = pytest.mark.integration


class CliWorker(Worker):
    """``backbeat worker [--reset-state]`` as a subprocess (the CLI entry point, not faust's)."""

    reset = False

    def start(self) -> None:
        out = self.log.open("ab")
        args = [sys.executable, "-m", "infra.cli", "worker", "-l", "info"]
        self.proc = subprocess.Popen(
            args + (["--reset-state"] if self.reset else []),
            cwd=REPO_ROOT,
            env=self.env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
        out.close()


@pytest.fixture
def rocks_env(stack: Settings, unique: Callable[[str], str], tmp_path: Path) -> Iterator[dict]:
    name = unique("reset")
    config = IngestConfig(
        app_id=name,
        source_topic=f"{name}.listens",
        sessions_topic=f"{name}.sessions",
        dlq_topic=f"{name}.dlq",
    )
    apply_topics(stack, config.topic_specs())
    env = env_for(stack)
    env.update(
        BACKBEAT_INGEST_APP_ID=config.app_id,
        BACKBEAT_INGEST_SOURCE_TOPIC=config.source_topic,
        BACKBEAT_INGEST_SESSIONS_TOPIC=config.sessions_topic,
        BACKBEAT_INGEST_DLQ_TOPIC=config.dlq_topic,
        BACKBEAT_INGEST_STATS_INTERVAL_S="0.5",
        BACKBEAT_INGEST_BATCH_WITHIN_S="0.05",
        BACKBEAT_STREAMS_AGENTS="ingest",
        BACKBEAT_STREAMS_STORE="rocksdict://",
    )
    worker = CliWorker(env, tmp_path / "worker.log")
    readers: list[TopicReader] = []
    tabledir = stack.data_dir / "faust" / name / "v1" / "tables"
    yield {"config": config, "settings": stack, "worker": worker, "readers": readers, "tabledir": tabledir}
    worker.kill()
    for reader in readers:
        reader.close()
    if worker.log.exists():
        print("".join(worker.log.read_text(errors="replace").splitlines(True)[-60:]))


def changelog_state(settings: Settings, topic: str) -> tuple[int, int]:
    """``(records, live keys)`` of a changelog: every record, and keys whose last value is set."""
    marks = high_watermarks(settings, topic)
    reader = TopicReader(settings, topic, len(marks))
    try:
        wait_for(lambda: len(reader.poll()) >= sum(marks.values()), 30, "changelog read")
        last: dict[bytes, bytes | None] = {}
        for msg in reader.records:
            last[msg.key()] = msg.value()
    finally:
        reader.close()
    return sum(marks.values()), sum(1 for v in last.values() if v)


def test_reset_state_rebuilds_corrupted_rocksdb_tables(rocks_env):
    settings: Settings = rocks_env["settings"]
    config: IngestConfig = rocks_env["config"]
    worker: CliWorker = rocks_env["worker"]
    tabledir: Path = rocks_env["tabledir"]
    scenario = RestartScenario(settings, config)
    users = scenario.users
    sessions = scenario.run_phase1(worker, rocks_env["readers"])

    # a reset while the worker holds its RocksDB stores is refused and removes nothing
    stores = sorted(p.name for p in tabledir.iterdir())
    assert [n for n in stores if n.endswith(".db")] == [f"{TABLE}-{p}.db" for p in range(6)], stores
    running = SimpleNamespace(conf=SimpleNamespace(tabledir=tabledir, store="rocksdb:"))
    with pytest.raises(InfraError, match="locked by a running process"):
        reset_local_state(running)
    assert sorted(p.name for p in tabledir.iterdir()) == stores

    worker.kill(signal.SIGKILL)

    # while it is down: corrupt every store (RocksDB cannot open them any more), add a stray file
    for db in tabledir.glob("*.db"):
        for f in db.iterdir():
            if f.is_file() and (f.name == "CURRENT" or f.name.startswith("MANIFEST")):
                f.write_bytes(b"garbage\n")
    (tabledir / "stray.tmp").write_bytes(b"x" * 10)
    scenario.send_phase2()
    records, live_keys = changelog_state(settings, config.changelog_topic)
    assert records > 0 and live_keys > 0

    offset = len(worker.log.read_bytes())
    worker.reset = True
    worker.start()
    expected = scenario.expected
    wait_for(lambda: len(decode_sessions(settings, sessions.poll(worker))) >= len(expected), 120, "phase 2")
    assert decode_sessions(settings, sessions.records) == expected  # = an uninterrupted run's output
    # phase 2's new listens were sessionised; phase 1's were sessionised again only on partitions
    # whose last checkpoint had not reached the changelog when the SIGKILL came (it may still sit
    # in the producer's buffer: TANSU.md, "Faust tables"), which the exact output above absorbs
    stats = wait_for(
        lambda: (s := worker.last_stats()) and s["sessions_emitted"] == len(users) and s, 30, "phase 2 stats"
    )
    assert 2 * len(users) <= stats["sessionised"] <= 2 * len(users) + len(scenario.phase1)
    assert (
        stats["listens_in"]
        == stats["sessionised"] + stats["duplicates"] + stats["late"]
        >= len(scenario.phase2)
    )

    log = worker.log.read_bytes()[offset:].decode(errors="replace")
    removed = re.search(r"reset-state: removed (\d+) table stores", log)
    assert removed and int(removed.group(1)) == len(stores) + 1, log[:2000]
    recovered = re.search(
        r"table recovery: (\S+): read (\d+) changelog records from 6 partitions, (\d+) keys \(full", log
    )
    assert recovered, log[-4000:]
    assert recovered.group(1) == TABLE
    assert (int(recovered.group(2)), int(recovered.group(3))) == (records, live_keys)
    restored = re.findall(r"partition \d+: restored (\d+) users", log)
    assert sum(int(n) for n in restored) == len(users)
    assert sorted(p.name for p in tabledir.iterdir()) == stores  # rebuilt, same layout
