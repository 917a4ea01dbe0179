"""Projection throughput: events/s from a topic into DuckDB (and the Parquet lake) through the
projection runner, against raw consume + fastavro decode of the same topic, in one run.

Starts its own broker and registry on free ports in a temporary data dir (as the test fixture
does), replays the 30Music file ``--copies`` times with distinct event ids (88,761 rows each,
so 8 copies ≈ 710k events) into a 6-partition topic, measures both, prints ONE JSON line
(``ratio`` = projection events/s ÷ raw events/s) and cleans up.

Run: ``.venv/bin/python benchmarks/projection.py [--copies 8] [--batch-size 50000]``
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import private_stack, raw_consume_decode  # noqa: E402
from events.catalog import TopicSpec  # noqa: E402
from events.importers.listens import parse_30music  # noqa: E402
from events.producer import EventProducer  # noqa: E402
from infra.provision import apply_topics  # noqa: E402
from infra.resources import LISTENS_30MUSIC, open_data  # noqa: E402
from infra.runtime import tune_gc  # noqa: E402
from infra.settings import Settings  # noqa: E402
from projections.readmodels import LISTENS  # noqa: E402
from projections.runner import ProjectionRunner  # noqa: E402
from projections.sql import query  # noqa: E402

DATA = LISTENS_30MUSIC
TOPIC = "bench.listens"


def produce(settings: Settings, copies: int) -> int:
    with open_data(DATA) as fh:
        base = parse_30music(fh).records
    producer = EventProducer(settings)
    total = 0
    for copy in range(copies):
        batch = []
        for r in base:
            rec = {k: v for k, v in r.items() if k != "_line"}
            rec["event_id"] = f"{rec['event_id'][:24]}{copy:08x}"
            batch.append(rec)
        total += producer.send_many(
            TOPIC, "ListenRecorded", batch, key_field="user_id", time_field="occurred_at", source="/bench"
        )
    producer.flush(120)
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--copies", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=50_000)
    args = parser.parse_args()
    tune_gc()  # as every backbeat process does (infra/runtime.py); both sides share it
    with private_stack() as settings:
        apply_topics(settings, [TopicSpec(TOPIC, 6)])
        total = produce(settings, args.copies)
        raw_eps = raw_consume_decode(settings, TOPIC, total)
        runner = ProjectionRunner(settings, [LISTENS.on_topic(TOPIC)], batch_size=args.batch_size)
        stats = runner.run(until_caught_up=True)
        proj_eps = stats.records / stats.elapsed_s
        rows = query(settings, "SELECT count(*) FROM listens").rows[0][0]
        lake_rows = query(
            settings,
            "SELECT count(*) FROM read_parquet(?)",
            [str(settings.lake_dir / "listens" / "**" / "*.parquet")],
        ).rows[0][0]
    print(
        json.dumps(
            {
                "benchmark": "projection",
                "events": total,
                "raw_consume_decode_eps": round(raw_eps),
                "projection_eps": round(proj_eps),
                "ratio": round(proj_eps / raw_eps, 3),
                "projection_seconds": round(stats.elapsed_s, 2),
                "rows": rows,
                "lake_rows": lake_rows,
                "batches": stats.batches,
                "lake_files": stats.lake_files,
                "batch_size": args.batch_size,
            }
        )
    )


if __name__ == "__main__":
    main()
