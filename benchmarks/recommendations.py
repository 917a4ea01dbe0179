"""Benchmark: the ``recommendations`` read model end to end (the streaming model folded per listen,
a list per user per batch) beside ``listens``, and the experiment readout it leads to.

Starts its own broker and registry (:func:`benchmarks.common.private_stack`), imports the real
30Music file and the Last.fm-1K sample into ``playback.listens`` (as ``backbeat import listens``
does), then for each ``--batch-sizes`` builds ``listens`` + ``recommendations`` from offset 0 in a
fresh DuckDB file and records the wall time, listens/s, lists generated and the readout of
``made-for-you-v1`` (:func:`projections.experiment_readout.readout`, 7 days). Prints one JSON
line.

    .venv/bin/python -m benchmarks.recommendations [--batch-sizes 50000,5000,1000]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time

from benchmarks.common import private_stack
from events.importers.run import import_listens
from infra.provision import apply_topics
from infra.resources import LISTENS_30MUSIC, LISTENS_LASTFM1K
from projections.experiment_readout import readout
from projections.runner import run_projections
from projections.sql import query


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--batch-sizes", default="50000,5000,1000", help="comma-separated (default 50000,5000,1000)"
    )
    args = parser.parse_args()
    sizes = [int(s) for s in args.batch_sizes.split(",")]
    runs = []
    with private_stack() as stack:
        apply_topics(stack)
        listens = import_listens(stack, LISTENS_30MUSIC, "30music").produced
        listens += import_listens(stack, LISTENS_LASTFM1K, "lastfm1k").produced
        for size in sizes:
            settings = dataclasses.replace(stack, data_dir=stack.data_dir / f"b{size}")
            settings.data_dir.mkdir()
            started = time.perf_counter()
            run_projections(settings, ["listens", "recommendations"], until_caught_up=True, batch_size=size)
            seconds = time.perf_counter() - started
            lists = query(settings, "SELECT count(DISTINCT list_id) FROM recommendation_history").rows[0][0]
            variants = {
                r.variant: {
                    "users": r.users, "lists": r.lists, "recommended": r.recommended, "played": r.played,
                    "mean_user_play_through": r.mean_user_play_through, "mean_ci": r.mean_ci,
                    "diff_vs_control": r.diff_vs_control, "diff_ci": r.diff_ci,
                    "immature_lists": r.immature_lists,
                }
                for r in readout(settings)
            }  # fmt: skip
            runs.append({
                "batch_size": size, "seconds": round(seconds, 1), "listens_per_s": round(listens / seconds),
                "lists": lists, "readout": variants,
            })  # fmt: skip
    print(json.dumps({"benchmark": "recommendations", "listens": listens, "runs": runs}))


if __name__ == "__main__":
    main()
