"""Test helpers for agents: a Faust worker subprocess and a topic reader."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from confluent_kafka import Consumer, TopicPartition

from infra.provision import apply_topics
from infra.settings import REPO_ROOT, Settings
from streams.config import IngestConfig


class Worker:
    """A `faust -A streams.app worker` subprocess with its log in a file."""

    def __init__(self, env: dict[str, str], log: Path) -> None:
        from infra.processes import free_port

        # its /metrics and /health (the caller's port if it chose one; kept across restarts)
        self.ops_port = int(env.get("BACKBEAT_OPS_PORT") or free_port())
        self.env = {**env, "BACKBEAT_OPS_PORT": str(self.ops_port)}
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None
        self._start_at = 0  # where this incarnation's lines begin in the (appended) log

    def start(self) -> None:
        self._start_at = self.log.stat().st_size if self.log.exists() else 0
        out = self.log.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "faust", "-A", "streams.app", "worker", "-l", "info", "--without-web"],
            cwd=REPO_ROOT,
            env=self.env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
        out.close()

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self.proc = None

    def metrics(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        """``{(sample name, sorted labels): value}`` of one scrape of its ``/metrics``."""
        from tests.ops_client import scrape

        return scrape(f"http://127.0.0.1:{self.ops_port}")

    def check(self) -> None:
        """Fail at once when the worker died."""
        assert self.proc is not None and self.proc.poll() is None, self.log.read_text(errors="replace")[
            -3000:
        ]

    def last_stats(self, kind: str = "ingest") -> dict | None:
        """The last ``<kind> stats {json}`` line this incarnation logged (``ingest``,
        ``features``, ``tracks``, ``ads``): after a restart, not the killed one's."""
        self.check()
        marker = f" {kind} stats "
        with self.log.open("rb") as fh:
            fh.seek(self._start_at)
            text = fh.read().decode(errors="replace")
        lines = [ln for ln in text.splitlines() if marker in ln]
        # the JSON object, then whatever the log format adds after the message (``process=…``)
        return json.JSONDecoder().raw_decode(lines[-1].split(marker, 1)[1])[0] if lines else None


class TopicReader:
    """Reads every record of a topic from the beginning, incrementally."""

    def __init__(self, settings: Settings, topic: str, partitions: int) -> None:
        self.consumer = Consumer(settings.consumer_conf(f"reader-{topic}"))
        self.consumer.assign([TopicPartition(topic, p, 0) for p in range(partitions)])
        self.records: list = []

    def poll(self, worker: Worker | None = None) -> list:
        if worker is not None:
            worker.check()
        for msg in self.consumer.consume(1000, timeout=0.2):
            if msg.error() is None:
                self.records.append(msg)
        return self.records

    def close(self) -> None:
        self.consumer.close()


def ingest_setup(settings: Settings, name: str, **env: str) -> tuple[IngestConfig, dict[str, str]]:
    """Isolated topics of the listening-ingest agent named ``name`` (created), and the environment
    of a worker running only that agent on them (fast stats and batches; ``env`` on top)."""
    config = IngestConfig(
        app_id=name, source_topic=f"{name}.listens", sessions_topic=f"{name}.sessions", dlq_topic=f"{name}.dlq"
    )
    apply_topics(settings, config.topic_specs())
    full = {**os.environ, **settings.to_env()}
    full.update(
        BACKBEAT_INGEST_APP_ID=name,
        BACKBEAT_INGEST_SOURCE_TOPIC=config.source_topic,
        BACKBEAT_INGEST_SESSIONS_TOPIC=config.sessions_topic,
        BACKBEAT_INGEST_DLQ_TOPIC=config.dlq_topic,
        BACKBEAT_INGEST_STATS_INTERVAL_S="0.3",
        BACKBEAT_INGEST_BATCH_WITHIN_S="0.02",
        BACKBEAT_STREAMS_AGENTS="ingest",
    )
    full.update(env)
    return config, full
