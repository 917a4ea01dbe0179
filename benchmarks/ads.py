"""Benchmark: impressions/s through the ad-reporting agent, and the worker's peak RSS.

The real Open Bandit file (``random/all/all.csv``) is turned into events by the importer's own
function and replayed N times, each copy 8 days after the previous one with ids suffixed, into
a private broker (not timed); then a worker running only the ad-reporting agent reads them. The
time runs from its first partition restore to the stats line where every event is in and the
counts stopped moving. Prints one JSON line.

    .venv/bin/python -m benchmarks.ads [--copies 10]
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

from benchmarks.common import log_time, private_stack, process_peak_rss_mb
from events.control import END_OF_INPUT_MS, watermark_headers
from events.importers.ads import ad_events, without_type
from events.offsets import partitions_of
from events.producer import EventProducer
from infra.provision import apply_topics
from infra.settings import REPO_ROOT, Settings
from streams.ads import AdsConfig

ADS_ALL = REPO_ROOT.parent / "shared" / "data" / "ads_open_bandit" / "random" / "all" / "all.csv"
APP_ID = "bench-ads"
SHIFT_MS = 8 * 86_400_000


def events(copies: int) -> list[dict[str, Any]]:
    base = ad_events(ADS_ALL)
    out = []
    for k in range(copies):
        for e in base:
            out.append(
                {**e, "occurred_at": e["occurred_at"] + k * SHIFT_MS, "event_id": f"{e['event_id']}#{k}",
                 "impression_id": f"{e['impression_id']}#{k}",
                 **({"click_id": f"{e['click_id']}#{k}"} if e.get("click_id") else {})}
            )  # fmt: skip
    return out


def produce(settings: Settings, source: str, evs: list[dict[str, Any]]) -> None:
    producer = EventProducer(settings)
    for kind in ("AdImpressionServed", "AdClicked"):
        producer.encoder(source, kind)  # register both first
    batch: list[dict[str, Any]] = []
    kind = ""
    for e in evs + [{"event_type": ""}]:
        if e["event_type"] != kind and batch:
            producer.send_many(
                source, kind, batch, key_field="campaign_id", time_field="occurred_at", source="/bench"
            )
            batch = []
        kind = e["event_type"]
        if kind:
            batch.append(without_type(e))
    mark = max(e["occurred_at"] for e in evs) + END_OF_INPUT_MS
    for partition in partitions_of(settings, source):
        producer.producer.produce(source, b"", partition=partition, headers=watermark_headers(mark))
    producer.flush()


def run_worker(settings: Settings, total: int, log: Path) -> dict[str, Any]:
    env = {
        **os.environ, **settings.to_env(), "BACKBEAT_INGEST_APP_ID": APP_ID, "BACKBEAT_STREAMS_AGENTS": "ads",
        "BACKBEAT_ADS_SOURCE_TOPIC": "bench.ads", "BACKBEAT_INGEST_STATS_INTERVAL_S": "0.25",
    }  # fmt: skip
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "faust", "-A", "streams.app", "worker", "-l", "info", "--without-web"],
            cwd=REPO_ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 900
        first_done: tuple[str, dict[str, Any]] | None = None
        done = None
        while done is None:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("worker died or timed out:\n" + log.read_text(errors="replace")[-3000:])
            time.sleep(0.5)
            lines = [ln for ln in log.read_text(errors="replace").splitlines() if "ads stats " in ln]
            if not lines:
                continue
            stats = json.loads(lines[-1].split("ads stats ", 1)[1])
            if stats["events_in"] < total:
                continue
            if first_done and first_done[1]["reports"] == stats["reports"] and first_done[0] != lines[-1]:
                done = (first_done[0], stats)
            elif not first_done or first_done[1]["reports"] != stats["reports"]:
                first_done = (lines[-1], stats)
        rss = process_peak_rss_mb(proc.pid)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    lines = log.read_text(errors="replace").splitlines()
    start = next(ln for ln in lines if "ad reporting: partition" in ln)
    return {"elapsed_s": round(log_time(done[0]) - log_time(start), 2), "peak_rss_mb": rss, "stats": done[1]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--copies", type=int, default=10, help="replay the file N times (default 10)")
    args = parser.parse_args()
    evs = events(args.copies)
    impressions = sum(e["event_type"] == "AdImpressionServed" for e in evs)
    with private_stack() as settings:
        apply_topics(settings, AdsConfig(source_topic="bench.ads").topic_specs(APP_ID))
        produce(settings, "bench.ads", evs)
        run = run_worker(settings, len(evs), settings.data_dir / "worker.log")
    stats = run["stats"]
    print(json.dumps({
        "benchmark": "ads", "copies": args.copies, "events": len(evs), "impressions": impressions,
        "elapsed_s": run["elapsed_s"], "impressions_per_s": round(impressions / run["elapsed_s"]),
        "worker_peak_rss_mb": run["peak_rss_mb"], "reports": stats["reports"],
        "exhausted": stats["exhausted"],
        "reconciles": stats["reconciles"],
    }))  # fmt: skip


if __name__ == "__main__":
    main()
