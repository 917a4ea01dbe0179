"""HTTP API under load while the projection runner writes: requests/s and latency percentiles of
``backbeat serve`` (issue 16).

Starts its own broker and registry on free ports in a temporary data dir, builds the real read
models with ``backbeat demo`` (the 30Music listens and the Spotify catalog: ``tracks``,
``recommendations``, the feature store), then starts ``backbeat serve`` as a subprocess and,
for ``--seconds`` each, drives it with ``--clients`` threads (one ``httpx2.Client`` each, keep-alive)
over a fixed mix of GETs (a user's recommendations, a user's features, a track, a track search),
cycling through users and tracks that exist:

1. ``idle``: nothing writes the DuckDB file;
2. ``writing``: ``backbeat project`` runs meanwhile over a second copy of the listens (88,761
   ListenRecorded with new event and user ids), so every read goes through the turnstile between
   the runner's transactions.

Prints ONE JSON line: per phase ``rps`` (requests/s, all endpoints), ``p50_ms``/``p99_ms`` over all
requests and per endpoint, ``errors`` (any non-2xx answer or transport error; a 404 of an
unknown id counts, none is expected), and for ``writing`` the rows the runner applied during
the window. On a 2-core machine the server, the runner, the broker and the clients share the
cores: the figures are the API's rate on such a box, not a server's ceiling.

Run: ``.venv/bin/python benchmarks/api.py [--seconds 20] [--clients 4]``
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
from typing import Any

import httpx2 as httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import private_stack, replayed_listens  # noqa: E402
from events.importers.run import LISTENS_TOPIC  # noqa: E402
from events.producer import EventProducer  # noqa: E402
from infra.processes import free_port  # noqa: E402
from infra.settings import REPO_ROOT, Settings  # noqa: E402
from projections.sql import query  # noqa: E402

ENDPOINTS = ("recommendations", "features", "track", "search")


def _env(settings: Settings) -> dict[str, str]:
    return {**os.environ, **settings.to_env()}


def _cli(settings: Settings, *args: str, **kwargs: Any) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "infra.cli", *args], env=_env(settings), cwd=REPO_ROOT,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, **kwargs,
    )  # fmt: skip


def _targets(settings: Settings) -> tuple[list[str], list[str], list[str]]:
    """Users with a list, tracks in the catalog and search words from their names."""
    users = [r[0] for r in query(settings, "SELECT DISTINCT user_id FROM recommendations LIMIT 200").rows]
    tracks = query(settings, "SELECT track_id, name FROM tracks WHERE name IS NOT NULL LIMIT 200").rows
    words = [str(name).split()[0] for _, name in tracks if str(name).split()]
    return users, [str(t) for t, _ in tracks], words


def _drive(url: str, seconds: float, clients: int, targets: tuple[list[str], list[str], list[str]]) -> dict:
    users, tracks, words = targets
    latencies: dict[str, list[float]] = {e: [] for e in ENDPOINTS}
    errors = [0]
    lock = threading.Lock()
    deadline = time.monotonic() + seconds

    def client(k: int) -> None:
        mine: dict[str, list[float]] = {e: [] for e in ENDPOINTS}
        failed = 0
        with httpx.Client(base_url=url, timeout=30) as http:
            i = k
            while time.monotonic() < deadline:
                kind = ENDPOINTS[i % len(ENDPOINTS)]
                path = {
                    "recommendations": f"/users/{users[i % len(users)]}/recommendations",
                    "features": f"/users/{users[i % len(users)]}/features",
                    "track": f"/tracks/{tracks[i % len(tracks)]}",
                    "search": f"/tracks/search?q={words[i % len(words)]}",
                }[kind]
                began = time.perf_counter()
                try:
                    ok = http.get(path).status_code < 300
                except httpx.TransportError:
                    ok = False
                mine[kind].append(time.perf_counter() - began)
                failed += not ok
                i += clients
        with lock:
            for kind, values in mine.items():
                latencies[kind] += values
            errors[0] += failed

    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    started = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.monotonic() - started
    every = np.array([v for values in latencies.values() for v in values]) * 1000
    out: dict[str, Any] = {
        "requests": int(every.size),
        "rps": round(every.size / elapsed, 1),
        "p50_ms": round(float(np.percentile(every, 50)), 2),
        "p99_ms": round(float(np.percentile(every, 99)), 2),
        "errors": errors[0],
    }
    for kind, values in latencies.items():
        ms = np.array(values) * 1000
        out[f"{kind}_p50_ms"] = round(float(np.percentile(ms, 50)), 2)
        out[f"{kind}_p99_ms"] = round(float(np.percentile(ms, 99)), 2)
    return out


def _listens_rows(settings: Settings) -> int:
    return int(query(settings, "SELECT count(*) FROM listens").rows[0][0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=20.0, help="seconds of load per phase")
    parser.add_argument("--clients", type=int, default=4, help="client threads")
    args = parser.parse_args()
    with private_stack() as settings:
        demo = _cli(settings, "demo")
        if demo.wait() != 0:
            raise SystemExit("backbeat demo failed: the read models could not be built")
        targets = _targets(settings)
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        server = _cli(settings, "serve", "--port", str(port))
        try:
            deadline = time.monotonic() + 60
            while True:  # until it answers
                try:
                    if httpx.get(url + "/health", timeout=1).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if time.monotonic() > deadline:
                    raise SystemExit("backbeat serve did not answer within 60 s")
                time.sleep(0.2)
            result: dict[str, Any] = {"benchmark": "api", "seconds": args.seconds, "clients": args.clients}
            result["idle"] = _drive(url, args.seconds, args.clients, targets)
            producer = EventProducer(settings)
            copy = [{**r, "user_id": f"api-{r['user_id']}"} for r in replayed_listens(2)[-88_761:]]
            producer.send_many(LISTENS_TOPIC, "ListenRecorded", copy, key_field="user_id",
                               time_field="occurred_at", source="/benchmarks/api")  # fmt: skip
            producer.flush()
            before = _listens_rows(settings)
            runner = _cli(settings, "project", "--until-caught-up")
            try:
                result["writing"] = _drive(url, args.seconds, args.clients, targets)
                result["writing"]["runner_still_writing_at_end"] = runner.poll() is None
            finally:
                runner.wait()
            result["writing"]["listens_rows_added"] = _listens_rows(settings) - before
        finally:
            server.terminate()
            server.wait(30)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
