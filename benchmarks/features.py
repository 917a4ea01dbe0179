"""Benchmark: listens/s through the feature agents, and the worker's peak RSS, for the whole
30Music file (optionally replayed N times with suffixed user ids).

The file is imported into a private broker first (not timed), then a Faust worker running only
the feature agents (``BACKBEAT_STREAMS_AGENTS=features``) reads it; the time runs from the
worker's first partition restore to the stats line showing every listen in and every track
window closed. The numbers of user and track windows emitted are checked against a DuckDB
GROUP BY over the same file (``matches_group_by``). Prints one JSON line.

    .venv/bin/python -m benchmarks.features [--copies 1]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import duckdb

from benchmarks.common import LISTENS_30MUSIC, log_time, private_stack, process_peak_rss_mb, replayed_listens
from events.control import END_OF_INPUT_MS, watermark_headers
from events.offsets import partitions_of
from events.producer import EventProducer
from infra.provision import apply_topics
from infra.settings import REPO_ROOT, Settings
from streams.config import IngestConfig
from streams.features_config import FeaturesConfig

APP_ID = "bench-features"
SOURCE = "bench.listens"




def produce(settings: Settings, records: list[dict[str, Any]]) -> int:
    """Produce the listens and a closing watermark per partition; returns that watermark."""
    producer = EventProducer(settings)
    producer.send_many(
        SOURCE, "ListenRecorded", records, key_field="user_id", time_field="occurred_at", source="/bench"
    )
    mark = max(r["occurred_at"] for r in records) + END_OF_INPUT_MS
    for partition in partitions_of(settings, SOURCE):
        producer.producer.produce(SOURCE, b"", partition=partition, headers=watermark_headers(mark))
    producer.flush()
    return mark


def expected_windows(records: list[dict[str, Any]], config: FeaturesConfig) -> dict[str, int]:
    """(user, window) pairs with a listen and (track, window) pairs with at least the minimum
    plays, per window spec, by DuckDB GROUP BY (the file is in event-time order, so no listen is
    late)."""
    import pyarrow as pa

    con = duckdb.connect()
    columns = ("user_id", "track_id", "occurred_at")
    con.register("l", pa.Table.from_pylist([{k: r[k] for k in columns} for r in records]))
    out = {}
    for i, spec in enumerate(config.user_windows):
        for entity, indices in (("users", range(len(config.user_windows))), ("tracks", config.track_windows)):
            if i not in indices:
                continue
            column = "user_id" if entity == "users" else "track_id"
            least = 1 if entity == "users" else config.track_min_plays
            sql = f"""SELECT count(*) FROM (SELECT {column},
                        occurred_at - occurred_at % {spec.step_ms} - k * {spec.step_ms} AS w
                      FROM l, range(0, {spec.panes_per_window}) r(k)
                      GROUP BY ALL HAVING count(*) >= {least})"""
            out[f"{entity} {spec.name}"] = con.execute(sql).fetchone()[0]
    return out


def run_worker(settings: Settings, total: int, mark: int, log: Path) -> dict[str, Any]:
    env = {
        **os.environ,
        **settings.to_env(),
        "BACKBEAT_INGEST_APP_ID": APP_ID,
        "BACKBEAT_INGEST_SOURCE_TOPIC": SOURCE,
        "BACKBEAT_STREAMS_AGENTS": "features",
        "BACKBEAT_INGEST_STATS_INTERVAL_S": "0.25",
    }
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "faust", "-A", "streams.app", "worker", "-l", "info", "--without-web"],
            cwd=REPO_ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 1200
        done = None
        seen: list[tuple[str, dict[str, Any]]] = []  # stats lines with everything closed
        while done is None:  # finished = two such lines in a row with the same counts
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("worker died or timed out:\n" + log.read_text(errors="replace")[-3000:])
            time.sleep(0.5)
            lines = [ln for ln in log.read_text(errors="replace").splitlines() if "features stats " in ln]
            if not lines:
                continue
            stats = json.loads(lines[-1].split("features stats ", 1)[1])
            marks = list(stats["track_watermarks"].values())
            if not (stats["listens_in"] >= total and len(marks) == 6 and min(marks) >= mark):
                seen.clear()
                continue
            counts = [stats[k] for k in ("user_features", "track_features", "partials")]
            if seen and [seen[0][1][k] for k in ("user_features", "track_features", "partials")] == counts:
                if lines[-1] != seen[0][0]:
                    done = (seen[0][0], stats)
            else:
                seen[:] = [(lines[-1], stats)]
        rss = process_peak_rss_mb(proc.pid)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    lines = log.read_text(errors="replace").splitlines()
    first = next(ln for ln in lines if "restored at watermark" in ln)
    elapsed = log_time(done[0]) - log_time(first)
    return {"elapsed_s": round(elapsed, 2), "peak_rss_mb": rss, "stats": done[1]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--copies", type=int, default=1, help="replay the file N times (default 1)")
    args = parser.parse_args()
    config = FeaturesConfig.from_env({})
    records = replayed_listens(args.copies, LISTENS_30MUSIC)
    expected = expected_windows(records, config)
    with private_stack() as settings:
        ingest = IngestConfig(app_id=APP_ID, source_topic=SOURCE)
        apply_topics(settings, ingest.topic_specs()[:1] + config.topic_specs(APP_ID, 6))
        mark = produce(settings, records)
        run = run_worker(settings, len(records), mark, settings.data_dir / "worker.log")
    stats = run["stats"]
    got = {name: c["accepted"] for name, c in stats["windows"].items()}
    emitted = {
        "user_features": stats["user_features"],
        "track_features": stats["track_features"],
        "partials": stats["partials"],
    }
    users_expected = sum(v for k, v in expected.items() if k.startswith("users"))
    tracks_expected = sum(v for k, v in expected.items() if k.startswith("tracks"))
    print(
        json.dumps(
            {
                "benchmark": "features",
                "listens": len(records),
                "copies": args.copies,
                "elapsed_s": run["elapsed_s"],
                "listens_per_s": round(len(records) / run["elapsed_s"]),
                "worker_peak_rss_mb": run["peak_rss_mb"],
                **emitted,
                "accepted_per_window": got,
                "expected_windows": expected,
                "matches_group_by": emitted["user_features"] == users_expected
                and emitted["track_features"] == tracks_expected,
            }
        )
    )


if __name__ == "__main__":
    main()
