"""Benchmark: the worker's peak RSS with 1M distinct users of state, while processing and after a
restart that restores them from the changelog (issue 13 target: < 1 GiB).

One listen per user, 1,000,000 users (``bench-u<i>``), tracks and artists taken in turn from the
real 30Music listens, event times 1 ms apart: 16.7 minutes in all, shorter than the 30-minute
session gap, so every user holds an open session (a user's state: its open session, event ids,
artists, checkpointed offset) at the end. A worker running only listening ingest reads them
(peak RSS sampled from ``VmHWM``), is SIGKILLed, and a second worker restores the 1M users from
the changelog (its peak RSS and the restore time from the runtime's log line). Prints one JSON
line.

    .venv/bin/python -m benchmarks.state_memory [--users 1000000]
"""

from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path

from benchmarks.common import LISTENS_30MUSIC, private_stack, replayed_listens
from benchmarks.worker import run_worker
from events.importers.base import event_id
from events.producer import EventProducer
from infra.provision import apply_topics
from streams.config import IngestConfig

APP_ID = "bench-state"
SOURCE = "bench-state.listens"
T0 = 1_700_000_000_000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=1_000_000)
    args = parser.parse_args()
    base = replayed_listens(1, LISTENS_30MUSIC)
    config = IngestConfig(app_id=APP_ID, source_topic=SOURCE, sessions_topic="bench-state.sessions",
                          dlq_topic="bench-state.dlq")  # fmt: skip
    with private_stack() as settings:
        apply_topics(settings, config.topic_specs())
        producer = EventProducer(settings)
        started = time.perf_counter()
        for lo in range(0, args.users, 50_000):
            chunk = []
            for i in range(lo, min(args.users, lo + 50_000)):
                r = base[i % len(base)]
                user, t = f"bench-u{i}", T0 + i
                chunk.append({**r, "user_id": user, "occurred_at": t,
                              "event_id": event_id("bench", user, t, r["track_id"])})  # fmt: skip
            producer.send_many(SOURCE, "ListenRecorded", chunk, key_field="user_id", time_field="occurred_at",
                               source="/benchmarks/state")  # fmt: skip
        producer.flush(300)
        produce_s = time.perf_counter() - started
        env = {
            "BACKBEAT_INGEST_APP_ID": APP_ID,
            "BACKBEAT_INGEST_SOURCE_TOPIC": SOURCE,
            "BACKBEAT_INGEST_SESSIONS_TOPIC": config.sessions_topic,
            "BACKBEAT_INGEST_DLQ_TOPIC": config.dlq_topic,
            "BACKBEAT_STREAMS_AGENTS": "ingest",
        }
        first, rss = run_worker(
            settings, env, ("ingest",), lambda st: st["ingest"]["records_in"] >= args.users,
            settings.data_dir / "first.log",
        )  # fmt: skip
        log = settings.data_dir / "restored.log"
        _, restored_rss = run_worker(settings, env, ("ingest",), lambda st: bool(st["ingest"]["ready"]), log)
        restore_s = _restore_seconds(log)
        restored_users = sum(int(n) for n in re.findall(r"restored (\d+) users", log.read_text()))
    open_sessions = sum(first["ingest"]["open_sessions"].values())
    print(json.dumps({
        "benchmark": "state_memory", "users": args.users, "open_sessions": open_sessions,
        "produce_s": round(produce_s, 1), "agent_active_s": first["ingest"]["active_s"],
        "worker_peak_rss_mb": rss, "restored_worker_peak_rss_mb": restored_rss,
        "restore_s": restore_s, "restored_users": restored_users,
        "target_mb": 1024, "meets_target": max(rss, restored_rss) < 1024,
    }))  # fmt: skip


def _restore_seconds(log: Path) -> float | None:
    found = re.search(r"changelog records in ([0-9.]+) s", log.read_text(errors="replace"))
    return float(found.group(1)) if found else None


if __name__ == "__main__":
    main()
