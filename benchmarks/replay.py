"""Replay throughput and memory: ``projections.replay.replay(settings, "listens", …)`` (build,
verify, switch) against raw consume + fastavro decode of the same topic in the same run, and the
peak RSS of the replay for two log sizes.

Starts its own broker and registry on free ports in a temporary data dir, then for each size
(``--small``, default 1M events; ``--large``, default 5M; ``--large 0`` skips it): produces that
many ListenRecorded events (the real 30Music file, 88,761 rows, replayed as many times as needed
with distinct event and user ids; the last copy cut short) into its own 6-partition topic with
:class:`~events.producer.EventProducer`, measures raw consume + decode of the topic in this
process, then runs the replay in a fresh subprocess (its own data dir, so its own DuckDB file;
the same broker and registry) that reports its result and its own peak RSS
(``getrusage(RUSAGE_SELF).ru_maxrss``). The topic is deleted before the next size (the broker
holds topics in memory, ~220 B per record).

Prints ONE JSON line: ``ratio`` = replay events/s ÷ raw consume+decode events/s at the small size
(the replay's end-to-end rate: build + verification + switch, what ``backbeat replay`` takes;
``build_ratio`` uses the build phase's rate alone), ``rss_mb_1m``/``rss_mb_5m`` = peak RSS of the
replay subprocess in MiB at the small/large size (the key names keep the default sizes; the
sizes used are in ``small_events``/``large_events``); ``build_rss_mb_*`` = its peak while only the
build phase had run (before verification), plus the per-size figures.

Run: ``.venv/bin/python benchmarks/replay.py [--small 1000000] [--large 5000000] [--batch-size 50000]``
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from confluent_kafka.admin import AdminClient

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import peak_rss_mib, private_stack, process_peak_rss_mb, raw_consume_decode  # noqa: E402
from events.catalog import TopicSpec  # noqa: E402
from events.importers.listens import parse_30music  # noqa: E402
from events.producer import EventProducer  # noqa: E402
from infra.provision import apply_topics  # noqa: E402
from infra.resources import LISTENS_30MUSIC, open_data  # noqa: E402
from infra.runtime import tune_gc  # noqa: E402
from infra.settings import REPO_ROOT, Settings  # noqa: E402

DATA = LISTENS_30MUSIC
PARTITIONS = 6


def produce(settings: Settings, topic: str, events: int) -> tuple[int, int]:
    """Produce exactly ``events`` ListenRecorded records (copies of the file, ids suffixed by copy)
    into ``topic``; returns ``(records, distinct event ids)`` (the file repeats 2,293 of its
    listens, which the read model keeps once). Builds one copy at a time (5M dicts: ~5 GB)."""
    with open_data(DATA) as fh:
        base = [{k: v for k, v in r.items() if k != "_line"} for r in parse_30music(fh).records]
    producer = EventProducer(settings)
    total = 0
    distinct = 0
    copy = 0
    while total < events:
        batch = []
        for r in base[: events - total]:
            batch.append(
                {**r, "event_id": f"{r['event_id'][:24]}{copy:08x}", "user_id": f"{r['user_id']}#{copy}"}
            )
        distinct += len({r["event_id"] for r in batch})
        total += producer.send_many(
            topic, "ListenRecorded", batch, key_field="user_id", time_field="occurred_at", source="/bench"
        )
        copy += 1
    producer.flush(300)
    return total, distinct


def child(topic: str, batch_size: int) -> None:
    """In the subprocess: replay ``listens`` from ``topic`` and print the result + own peak RSS."""
    from projections.readmodels import LISTENS
    from projections.replay import ReplayProgress, replay
    from projections.sql import query

    tune_gc()  # as every backbeat process does
    settings = Settings.from_env()
    last: dict[str, ReplayProgress] = {}
    build_rss: list[float] = [0.0]

    def progress(p: ReplayProgress) -> None:
        last[p.phase] = p
        if p.phase == "build":  # the peak so far, while only the build has run
            build_rss[0] = process_peak_rss_mb(os.getpid())

    result = replay(
        settings, "listens", projection=LISTENS.on_topic(topic), batch_size=batch_size, progress=progress
    )
    rows = query(settings, "SELECT count(*) FROM listens").rows[0][0]
    build = last.get("build")
    out: dict[str, Any] = {
        "events": result.events,
        "seconds": result.seconds,
        "events_per_s": result.events_per_s,
        "build_events_per_s": build.events_per_s if build else None,
        "verified": result.verified,
        "verification": result.verification.mode,
        "rows": rows,
        "peak_rss_mib": peak_rss_mib(),
        "build_peak_rss_mib": build_rss[0],
    }
    print("REPLAY " + json.dumps(out), flush=True)


def run_child(settings: Settings, topic: str, data_dir: Path, batch_size: int) -> dict[str, Any]:
    """Run :func:`child` in a fresh interpreter with its own data dir; its parsed report.

    Raises:
        RuntimeError: the subprocess failed or printed no report.
    """
    env = {**os.environ, **settings.to_env(), "BACKBEAT_DATA_DIR": str(data_dir)}
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--child", topic, "--batch-size", str(batch_size)],
        env=env,
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("REPLAY ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"replay subprocess failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1].removeprefix("REPLAY "))


def measure(settings: Settings, events: int, batch_size: int) -> dict[str, Any]:
    """Produce ``events``, measure raw consume+decode and the replay subprocess; delete the topic."""
    topic = f"bench.replay.{events}"
    apply_topics(settings, [TopicSpec(topic, PARTITIONS)])
    t0 = time.perf_counter()
    total, distinct = produce(settings, topic, events)
    produce_s = time.perf_counter() - t0
    raw_eps = raw_consume_decode(settings, topic, total)
    data_dir = settings.data_dir / f"replay-{events}"
    data_dir.mkdir()
    rep = run_child(settings, topic, data_dir, batch_size)
    if rep["rows"] != distinct or rep["events"] != total or not rep["verified"]:
        raise RuntimeError(f"replay of {total} events ({distinct} distinct) gave {rep}")
    admin = AdminClient(settings.kafka_common())
    admin.delete_topics([topic])[topic].result(60)
    return {"events": total, "produce_s": round(produce_s, 1), "raw_eps": raw_eps, **rep}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--small", type=int, default=1_000_000, help="events of the first size (ratio, rss_mb_1m)"
    )
    parser.add_argument("--large", type=int, default=5_000_000, help="events of the second size (0: skip)")
    parser.add_argument("--batch-size", type=int, default=50_000)
    parser.add_argument("--child", metavar="TOPIC", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.batch_size)
        return
    tune_gc()  # both sides share it, as in benchmarks/projection.py
    with private_stack() as settings:
        small = measure(settings, args.small, args.batch_size)
        large = measure(settings, args.large, args.batch_size) if args.large > 0 else None
    out: dict[str, Any] = {
        "benchmark": "replay",
        "small_events": small["events"],
        "raw_consume_decode_eps": round(small["raw_eps"]),
        "replay_eps": round(small["events_per_s"]),
        "ratio": round(small["events_per_s"] / small["raw_eps"], 3),
        "build_eps": round(small["build_events_per_s"] or 0),
        "build_ratio": round((small["build_events_per_s"] or 0) / small["raw_eps"], 3),
        "replay_seconds": round(small["seconds"], 2),
        "verification": small["verification"],
        "rss_mb_1m": round(small["peak_rss_mib"], 1),
        "build_rss_mb_1m": round(small["build_peak_rss_mib"], 1),
        "batch_size": args.batch_size,
    }
    if large is not None:
        out.update(
            large_events=large["events"],
            rss_mb_5m=round(large["peak_rss_mib"], 1),
            build_rss_mb_5m=round(large["build_peak_rss_mib"], 1),
            large_raw_consume_decode_eps=round(large["raw_eps"]),
            large_replay_eps=round(large["events_per_s"]),
            large_ratio=round(large["events_per_s"] / large["raw_eps"], 3),
            large_build_eps=round(large["build_events_per_s"] or 0),
            large_replay_seconds=round(large["seconds"], 2),
        )
    print(json.dumps(out))


if __name__ == "__main__":
    main()
