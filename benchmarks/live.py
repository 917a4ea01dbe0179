"""Live-path latency: player events at a fixed rate → the ``listening-from-playback`` agent →
``playback.listens`` → the projection runner → the ``listens`` read model in DuckDB.

Starts its own broker and registry on free ports in a temporary data dir, a worker running only
the ``playback`` agent group, and a projection runner for ``listens``, each as the real process
(``faust -A streams.app worker``, ``python -m projections.runner``), waits until both answer
``/health`` 200, then runs ``backbeat simulate playback --rate RATE --seconds SECONDS`` (live
mode: event time = the time each event is sent). Meanwhile it

* reads ``playback.events`` and notes, for every play that counts (``PlaybackSkipped`` or
  ``PlaybackCompleted`` with ``ms_played >= 30000``), the record time of that end event (ms: the
  moment the simulator stamped and sent it);
* polls the ``listens`` read model every ``--poll-s`` seconds through the read path users have
  (:func:`projections.store.reader`) and notes when each ``playback_id`` first shows up;
* scrapes both processes' ``/metrics`` once a second for ``backbeat_consumer_lag`` (summed over
  partitions): a sample *keeps up* when the lag is at most ``--lag-bound`` records.

Latency of a listen = first seen in DuckDB − its end event's time (ms), so it includes the
agent's batch wait, the produce, the runner's batch wait (``--linger-ms``, default 200: the live
path's ``BACKBEAT_PROJECTION_LINGER_MS``) and transaction, and the poll interval (up to
``--poll-s``). It also splits the latency in two stages: player event → its listen read back
from ``playback.listens`` (the agent), and → DuckDB (the runner). After the simulator stops, it
waits up to 60 s for the rest.
Prints ONE JSON line: events sent, listens expected/seen/missing, latency p50/p90/p99/max (ms),
the target (p99 < 2,000 ms) and whether it was met, and per process the share of lag samples
that kept up and the largest lag seen.

Run: ``.venv/bin/python benchmarks/live.py [--rate 5000] [--seconds 60]``
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
from confluent_kafka import OFFSET_BEGINNING  # noqa: E402

from benchmarks.common import private_stack  # noqa: E402
from events.log import LogReader  # noqa: E402
from events.registry_client import registry_for  # noqa: E402
from events.serde import AvroDecoder  # noqa: E402
from infra.demo import start_worker, worker_env  # noqa: E402
from infra.demo_live import consumer_lag, is_ready  # noqa: E402
from infra.processes import Running, spawn, stop  # noqa: E402
from infra.provision import apply_topics  # noqa: E402
from infra.settings import REPO_ROOT, Settings  # noqa: E402
from projections.store import NoReadModelsError, reader  # noqa: E402

PLAYER_TOPIC = "playback.events"
LISTENS_TOPIC = "playback.listens"
COUNTS_FROM_MS = 30_000  # the 30-second rule (docs/live-listening.md)
ENDS = {b"backbeat.playback.PlaybackSkipped", b"backbeat.playback.PlaybackCompleted"}


class EndRecorder(threading.Thread):
    """Reads ``playback.events`` from the start and keeps ``{playback_id: end event time ms}`` of
    the plays that count."""

    def __init__(self, settings: Settings) -> None:
        super().__init__(daemon=True)
        self.settings = settings
        self.ends: dict[str, int] = {}
        self.on_topic: dict[str, float] = {}  # playback_id → when its listen was read on playback.listens
        self.events = 0
        self.stop = threading.Event()

    def run(self) -> None:
        registry = registry_for(self.settings.registry_url)
        decoder = AvroDecoder(registry.parsed_schema_by_id)
        with LogReader(self.settings, "bench-live-ends", conf={"fetch.wait.max.ms": 20}) as log:
            log.assign({(t, p): OFFSET_BEGINNING for t in (PLAYER_TOPIC, LISTENS_TOPIC) for p in range(6)})
            while not self.stop.is_set():
                msgs = log.collect(20_000, 0.05, stop=self.stop)
                now = time.time()
                ends, listens = [], []
                for m in msgs:
                    if not m.value():
                        continue
                    if m.topic() == LISTENS_TOPIC:
                        listens.append(m)
                        continue
                    self.events += 1
                    if dict(m.headers() or ()).get("ce_type") in ENDS:
                        ends.append(m)
                for r in decoder.decode_many([m.value() for m in listens])[0]:
                    if r is not None and r.get("playback_id"):
                        self.on_topic.setdefault(r["playback_id"], now)
                records, _ = decoder.decode_many([m.value() for m in ends])
                for m, r in zip(ends, records, strict=True):
                    if r is not None and r["ms_played"] >= COUNTS_FROM_MS:
                        self.ends[r["playback_id"]] = m.timestamp()[1]


def _poll_listens(settings: Settings, seen: dict[str, float], after: int) -> int:
    """Note the first-seen time of listens with a playback id beyond row ``after``; the new
    ``after``."""
    try:
        with reader(settings.duckdb_path, timeout_s=10) as con:
            rows = con.execute(
                "SELECT rowid, playback_id FROM listens WHERE rowid >= ? AND playback_id IS NOT NULL", [after]
            ).fetchall()
    except NoReadModelsError:
        return after
    except Exception as exc:  # the table is created by the runner's first transaction
        if "listens" in str(exc):
            return after
        raise
    now = time.time()
    for rowid, pid in rows:
        seen.setdefault(pid, now)
        after = max(after, rowid + 1)
    return after


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=int, default=5000, help="player events per second")
    parser.add_argument("--seconds", type=int, default=60, help="how long the simulator runs (s)")
    parser.add_argument("--poll-s", type=float, default=0.1, help="DuckDB poll interval (s)")
    parser.add_argument("--lag-bound", type=int, default=10_000, help="lag (records) that still keeps up")
    parser.add_argument(
        "--linger-ms",
        type=int,
        default=200,
        help="the runner's BACKBEAT_PROJECTION_LINGER_MS (the live path's 200)",
    )
    args = parser.parse_args()

    with private_stack() as settings:
        apply_topics(settings)
        env = {"BACKBEAT_STREAMS_AGENTS": "playback", "BACKBEAT_OPS_PORT": "0"}
        worker = start_worker(settings, ready=lambda: is_ready(settings, "worker"), env=env)
        runner: Running = spawn(
            "projection-runner",
            [sys.executable, "-m", "projections.runner", "--projection", "listens", "--ops-port", "0"],
            run_dir=settings.run_dir,
            address="-",
            ready=lambda: is_ready(settings, "projection-runner"),
            timeout_s=120,
            env={
                **worker_env(settings),
                "BACKBEAT_OPS_PORT": "0",
                "BACKBEAT_PROJECTION_LINGER_MS": str(args.linger_ms),
            },
        )
        recorder = EndRecorder(settings)
        recorder.start()
        seen: dict[str, float] = {}
        lags: dict[str, list[float]] = {"worker": [], "projection-runner": []}
        after = 0
        sim_log = settings.run_dir / "simulator.log"
        try:
            with sim_log.open("wb") as out:
                sim = subprocess.Popen(
                    [sys.executable, "-m", "infra.cli", "simulate", "playback", "--rate", str(args.rate),
                     "--seconds", str(args.seconds)],
                    cwd=REPO_ROOT, env={**worker_env(settings), "COLUMNS": "200"}, stdout=out,
                    stderr=subprocess.STDOUT,
                )  # fmt: skip
                next_scrape = time.monotonic()
                drain_deadline: float | None = None
                while True:
                    after = _poll_listens(settings, seen, after)
                    if time.monotonic() >= next_scrape:
                        next_scrape += 1.0
                        for process in lags:
                            lag = consumer_lag(settings, process)
                            if lag is not None and sim.poll() is None:
                                lags[process].append(lag)
                    if sim.poll() is not None and drain_deadline is None:
                        drain_deadline = time.monotonic() + 60
                    if drain_deadline is not None:
                        waiting = [p for p in recorder.ends if p not in seen]
                        if (not waiting and recorder.events > 0) or time.monotonic() > drain_deadline:
                            break
                    time.sleep(args.poll_s)
            if sim.returncode != 0:
                raise SystemExit(f"the simulator failed ({sim.returncode}): {sim_log.read_text()[-2000:]}")
        finally:
            recorder.stop.set()
            stop(runner, timeout_s=30)
            stop(worker, timeout_s=30)
        recorder.join(10)
        with reader(settings.duckdb_path, timeout_s=30) as con:
            stored = {
                r[0]
                for r in con.execute(
                    "SELECT playback_id FROM listens WHERE playback_id IS NOT NULL"
                ).fetchall()
            }
        lat = np.array([seen[p] * 1000 - t for p, t in recorder.ends.items() if p in seen])
        # the two stages: player event → listen on playback.listens (the agent), then → DuckDB (the runner)
        agent = np.array(
            [recorder.on_topic[p] * 1000 - t for p, t in recorder.ends.items() if p in recorder.on_topic]
        )
        runner_stage = np.array(
            [(seen[p] - recorder.on_topic[p]) * 1000 for p in seen if p in recorder.on_topic]
        )
        pct = (lambda q: round(float(np.percentile(lat, q)), 1)) if lat.size else (lambda q: None)
        result = {
            "benchmark": "live",
            "rate_events_per_s": args.rate,
            "seconds": args.seconds,
            "player_events": recorder.events,
            "listens_expected": len(recorder.ends),
            "listens_seen": int(lat.size),
            "listens_missing": len(set(recorder.ends) - stored),
            "listens_unexpected": len(stored - set(recorder.ends)),
            "listens_stored_unseen_by_poll": len((set(recorder.ends) & stored) - set(seen)),
            "latency_p50_ms": pct(50),
            "latency_p90_ms": pct(90),
            "latency_p99_ms": pct(99),
            "latency_max_ms": round(float(lat.max()), 1) if lat.size else None,
            "agent_stage_p50_ms": round(float(np.percentile(agent, 50)), 1) if agent.size else None,
            "agent_stage_p99_ms": round(float(np.percentile(agent, 99)), 1) if agent.size else None,
            "runner_stage_p50_ms": round(float(np.percentile(runner_stage, 50)), 1)
            if runner_stage.size
            else None,
            "runner_stage_p99_ms": round(float(np.percentile(runner_stage, 99)), 1)
            if runner_stage.size
            else None,
            "target_p99_ms": 2000,
            "target_met": bool(lat.size) and pct(99) < 2000,
            "poll_s": args.poll_s,
            "runner_linger_ms": args.linger_ms,
            "lag_bound_records": args.lag_bound,
        }
        for process, samples in lags.items():
            key = process.replace("-", "_")
            result[f"{key}_keeps_up_share"] = (
                round(sum(s <= args.lag_bound for s in samples) / len(samples), 3) if samples else None
            )
            result[f"{key}_max_lag"] = max(samples) if samples else None
        result["cpu_count"] = os.cpu_count()
        print(json.dumps(result))


if __name__ == "__main__":
    main()
