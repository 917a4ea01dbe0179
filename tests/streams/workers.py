"""Test helpers for agents: a Faust worker subprocess and a topic reader."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

from confluent_kafka import Consumer, TopicPartition

from infra.settings import REPO_ROOT, Settings


class Worker:
    """A `faust -A streams.app worker` subprocess with its log in a file."""

    def __init__(self, env: dict[str, str], log: Path) -> None:
        self.env = env
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
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

    def check(self) -> None:
        """Fail at once when the worker died."""
        assert self.proc is not None and self.proc.poll() is None, self.log.read_text(errors="replace")[
            -3000:
        ]

    def last_stats(self, kind: str = "ingest") -> dict | None:
        """The last ``<kind> stats {json}`` line of the log (``ingest`` or ``features``)."""
        self.check()
        marker = f"{kind} stats "
        lines = [ln for ln in self.log.read_text(errors="replace").splitlines() if marker in ln]
        return json.loads(lines[-1].split(marker, 1)[1]) if lines else None


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
