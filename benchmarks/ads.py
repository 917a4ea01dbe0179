"""Benchmark: events/s through the ad-reporting agent against raw consume + decode of the same
topic, and the worker's peak RSS.

The real Open Bandit file (``random/all/all.csv``) is turned into events by the importer's own
function and replayed N times, each copy 8 days after the previous one with ids suffixed, into
a private broker (not timed); the raw rate is a plain consume + decode of that topic
(:func:`benchmarks.worker.raw_rate`); then a worker running only the ad-reporting agent reads
it, its rate being records in over the runtime's ``active_s`` (first batch to the last
checkpointed one). ``ratio_vs_raw`` = agent / raw (target >= 0.25, issue 13). Prints one JSON
line.

    .venv/bin/python -m benchmarks.ads [--copies 10]
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from benchmarks.common import private_stack, replayed_ad_events
from benchmarks.worker import raw_rate, run_worker, settled
from events.control import END_OF_INPUT_MS, watermark_headers
from events.importers.ads import without_type
from events.offsets import partitions_of
from events.producer import EventProducer
from infra.provision import apply_topics
from infra.settings import Settings
from streams.ads import AdsConfig

APP_ID = "bench-ads"
SOURCE = "bench.ads"


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--copies", type=int, default=10, help="replay the file N times (default 10)")
    args = parser.parse_args()
    evs = replayed_ad_events(args.copies)
    impressions = sum(e["event_type"] == "AdImpressionServed" for e in evs)
    with private_stack() as settings:
        apply_topics(settings, AdsConfig(source_topic=SOURCE).topic_specs(APP_ID))
        produce(settings, SOURCE, evs)
        raw_n, raw = raw_rate(settings, SOURCE)
        assert raw_n == len(evs), (raw_n, len(evs))
        env = {"BACKBEAT_INGEST_APP_ID": APP_ID, "BACKBEAT_STREAMS_AGENTS": "ads",
               "BACKBEAT_ADS_SOURCE_TOPIC": SOURCE}  # fmt: skip
        every_in = settled(("reports", "exhausted", "batches"))
        stats, rss = run_worker(
            settings, env, ("ads",),
            lambda st: st["ads"]["records_in"] >= len(evs) and every_in(st),
            settings.data_dir / "worker.log",
        )  # fmt: skip
    run = stats["ads"]
    rate = run["records_in"] / run["active_s"]
    print(json.dumps({
        "benchmark": "ads", "copies": args.copies, "events": len(evs), "impressions": impressions,
        "raw_rate": round(raw), "agent_rate": round(rate), "ratio_vs_raw": round(rate / raw, 3),
        "agent_active_s": run["active_s"], "agent_busy_s": run["busy_s"],
        "impressions_per_s": round(impressions / run["active_s"]),
        "worker_peak_rss_mb": rss, "reports": run["reports"], "exhausted": run["exhausted"],
        "reconciles": run["reconciles"],
    }))  # fmt: skip


if __name__ == "__main__":
    main()
