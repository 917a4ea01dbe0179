"""Benchmark: the cost of one incremental update of the streaming recommender
(:meth:`personalisation.session_model.SessionModel.observe`) against the model's size, and of
one list (:meth:`~personalisation.session_model.SessionModel.recommend`).

The real 30Music listens (``data/listens_30music_2014.tsv.gz``, in event-time order) are observed
``--copies`` times, each copy with its own user and track ids (``<id>#<copy>``), so the model grows
about linearly while its structure stays that of real listening. After each copy the mean update
cost (µs per listen, wall time of the copy's ``observe`` calls / its listens), the model's size
(stored weights, :meth:`~personalisation.session_model.SessionModel.size`) and the mean cost of a
list for 2,000 open sessions are recorded. An update touches ``rule_steps`` rows whatever the
size, so the cost should stay flat as the model grows. Prints one JSON line.

    .venv/bin/python -m benchmarks.recommender_update [--copies 4]
"""

from __future__ import annotations

import argparse
import json
import time

from benchmarks.common import LISTENS_30MUSIC
from infra.runtime import tune_gc
from personalisation.session_model import SessionModel
from personalisation.sessions_data import read_sessions

#: Open sessions a list is timed for, after each copy.
LISTS = 2000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--copies", type=int, default=4, help="times the file is observed (default 4)")
    args = parser.parse_args()
    sessions = read_sessions(LISTENS_30MUSIC)
    listens = sorted(
        (t * 1000, s.user_id, item, artist)
        for s in sessions
        for item, t, artist in zip(s.items, s.times, s.artists, strict=True)
    )
    span = listens[-1][0] - listens[0][0] + 1
    tune_gc()  # as every backbeat process does (infra/runtime.py)
    model = SessionModel()
    steps = []
    for copy in range(args.copies):
        shifted = [(f"{u}#{copy}", f"{t}#{copy}", at + copy * span, f"{a}#{copy}") for at, u, t, a in listens]
        started = time.perf_counter()
        for user, track, at, artist in shifted:
            model.observe(user, track, at, artist)
        update_s = time.perf_counter() - started
        users = list(model.open)[-LISTS:]
        started = time.perf_counter()
        for user in users:
            model.recommend(user, model.session(user), 20)
        list_s = time.perf_counter() - started
        steps.append({
            "listens": model.listens, "size": model.size(),
            "update_us": round(update_s / len(shifted) * 1e6, 2),
            "list_ms": round(list_s / len(users) * 1e3, 3),
        })  # fmt: skip
    first, last = steps[0], steps[-1]
    print(json.dumps({
        "benchmark": "recommender_update", "listens": last["listens"], "model_size": last["size"],
        "update_us_first": first["update_us"], "update_us_last": last["update_us"],
        "size_growth": round(last["size"] / first["size"], 2),
        "update_cost_growth": round(last["update_us"] / first["update_us"], 2),
        "list_ms_last": last["list_ms"], "steps": steps,
    }))  # fmt: skip


if __name__ == "__main__":
    main()
