"""Benchmark: listens/s through the feature agents (user features and track features) against
raw consume + decode of the same topic, and the worker's peak RSS, for the whole 30Music file
(optionally replayed N times with suffixed user ids).

The file is imported into a private broker first (not timed) and read once by a plain consume
+ decode (:func:`benchmarks.worker.raw_rate`); then a worker running only the feature agents
(``BACKBEAT_STREAMS_AGENTS=features``) reads it. Its rate is the listens over the time from the
user agent's first batch to the end of the last checkpointed batch of either agent (the runtime's
clock, ``active_s``) once every listen is in and every track window closed. ``ratio_vs_raw`` =
agent / raw (target >= 0.25, issue 13). The numbers of user and track windows emitted are checked
against a DuckDB GROUP BY over the same file (``matches_group_by``). Prints one JSON line.

    .venv/bin/python -m benchmarks.features [--copies 1]
"""

from __future__ import annotations

import argparse
import json
from typing import Any

import duckdb

from benchmarks.common import LISTENS_30MUSIC, private_stack, replayed_listens
from benchmarks.worker import raw_rate, run_worker, settled
from events.control import END_OF_INPUT_MS, watermark_headers
from events.offsets import partitions_of
from events.producer import EventProducer
from infra.provision import apply_topics
from infra.settings import Settings
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


def _offset(users: dict[str, Any], tracks: dict[str, Any]) -> float:
    """Seconds from the user agent's first batch to the track agent's first batch."""
    return tracks["first_batch_at"] - users["first_batch_at"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--copies", type=int, default=1, help="replay the file N times (default 1)")
    args = parser.parse_args()
    config = FeaturesConfig.from_env({})
    records = replayed_listens(args.copies, LISTENS_30MUSIC)
    records.sort(key=lambda r: r["occurred_at"])  # copies interleaved in event time: none is late
    expected = expected_windows(records, config)
    with private_stack() as settings:
        ingest = IngestConfig(app_id=APP_ID, source_topic=SOURCE)
        apply_topics(settings, ingest.topic_specs()[:1] + config.topic_specs(APP_ID, 6))
        mark = produce(settings, records)
        raw_n, raw = raw_rate(settings, SOURCE)
        assert raw_n == len(records), (raw_n, len(records))
        env = {"BACKBEAT_INGEST_APP_ID": APP_ID, "BACKBEAT_INGEST_SOURCE_TOPIC": SOURCE,
               "BACKBEAT_STREAMS_AGENTS": "features"}  # fmt: skip
        still = settled(("user_features", "track_features", "partials", "batches"))

        def done(st: dict[str, dict[str, Any]]) -> bool:
            marks = list(st["tracks"]["track_watermarks"].values())
            every_in = st["features"]["records_in"] >= len(records)
            return every_in and len(marks) == 6 and min(marks) >= mark and still(st)

        stats, rss = run_worker(settings, env, ("features", "tracks"), done, settings.data_dir / "worker.log")
    users, tracks = stats["features"], stats["tracks"]
    # the agents' work ends with the last track window: from the first listen batch to it
    active_s = max(users["active_s"], tracks["active_s"] + _offset(users, tracks))
    rate = len(records) / active_s
    got = {name: c["accepted"] for name, c in users["windows"].items()}
    emitted = {
        "user_features": users["user_features"],
        "track_features": tracks["track_features"],
        "partials": users["partials"],
    }
    users_expected = sum(v for k, v in expected.items() if k.startswith("users"))
    tracks_expected = sum(v for k, v in expected.items() if k.startswith("tracks"))
    print(
        json.dumps(
            {
                "benchmark": "features",
                "listens": len(records),
                "copies": args.copies,
                "raw_rate": round(raw),
                "agent_rate": round(rate),
                "ratio_vs_raw": round(rate / raw, 3),
                "agent_active_s": round(active_s, 3),
                "user_agent_busy_s": users["busy_s"],
                "track_agent_busy_s": tracks["busy_s"],
                "worker_peak_rss_mb": rss,
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
