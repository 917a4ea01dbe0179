"""Saga throughput and time to terminal, under the fault run's faults and orchestrator kills.

Two runs on a private broker and SQLite event stores (``--eventstore-url`` for PostgreSQL):

- *saturated*: start events produced faster than the sagas can run (``--rate`` 400/s), so
  ``sagas_per_s`` is the capacity of one orchestrator plus one participants process;
- *paced*: start events at ``--paced-rate`` (default 40/s, below capacity), so the time to
  terminal is the sagas' own latency, not queueing.

Prints one JSON line: count, sagas/s, time to terminal p50/p99 (ms, request to end), retries,
states, and whether every invariant held. Usage::

    .venv/bin/python -m benchmarks.sagas [--count 2000] [--paced-count 600]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from typing import Any

from benchmarks.common import private_stack
from infra.provision import apply_topics
from sagas.simulate import SimulationConfig, build_read_models, reset_all, run_simulation, summarize


def one(settings: Any, config: SimulationConfig) -> dict[str, Any]:
    run = run_simulation(settings, config)
    build_read_models(settings, config.seed)
    summary = summarize(settings, run, config)
    out = summary.as_dict()
    out.pop("invariants")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=2_000)
    parser.add_argument("--rate", type=float, default=400.0)
    parser.add_argument("--paced-count", type=int, default=600)
    parser.add_argument("--paced-rate", type=float, default=40.0)
    parser.add_argument("--eventstore-url", default="")
    args = parser.parse_args()
    base = SimulationConfig(count=args.count, rate=args.rate)  # the fault rates, 3 kills
    result: dict[str, Any] = {
        "benchmark": "sagas",
        "eventstore": "postgresql" if args.eventstore_url else "sqlite",
    }
    for label, config in (
        ("saturated", base),
        (
            "paced",
            dataclasses.replace(base, count=args.paced_count, rate=args.paced_rate, seed=base.seed + 1),
        ),
    ):
        with private_stack() as settings:
            if args.eventstore_url:
                settings = dataclasses.replace(settings, eventstore_url=args.eventstore_url)
            reset_all(settings)  # a PostgreSQL store outlives the private broker of the last run
            apply_topics(settings)
            result[label] = one(settings, config)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
