"""Shared by the agent benchmarks: run a worker subprocess until its stats lines say it is done,
its rate from the runtime's own clock, its peak RSS; the raw consume + decode rate of the same
input topic (the baseline of ``ratio_vs_raw``)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks.common import process_peak_rss_mb, raw_read
from events.registry_client import registry_for
from infra.settings import REPO_ROOT, Settings

Stats = dict[str, dict[str, Any]]


def last_stats(log: Path, names: tuple[str, ...]) -> Stats:
    """The last ``<name> stats {json}`` line of each of ``names`` in the worker's log."""
    out: Stats = {}
    for line in log.read_text(errors="replace").splitlines():
        for name in names:
            marker = f" {name} stats "
            if marker in line:
                # the JSON object, then what the log format adds after the message (``process=…``)
                out[name] = json.JSONDecoder().raw_decode(line.split(marker, 1)[1])[0]
    return out


def run_worker(
    settings: Settings,
    env: dict[str, str],
    names: tuple[str, ...],
    done: Callable[[Stats], bool],
    log: Path,
    timeout_s: float = 1800,
) -> tuple[Stats, float]:
    """Start ``faust -A streams.app worker`` with ``env`` (on top of ``settings``), poll its
    stats lines until ``done(stats)``, then kill it. Returns the final stats of each agent and
    the worker's peak RSS in MB.

    Raises:
        RuntimeError: the worker died or did not finish in ``timeout_s`` s.
    """
    full = {**os.environ, **settings.to_env(), "BACKBEAT_INGEST_STATS_INTERVAL_S": "0.25", **env}
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "faust", "-A", "streams.app", "worker", "-l", "info", "--without-web"],
            cwd=REPO_ROOT, env=full, stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("worker died or timed out:\n" + log.read_text(errors="replace")[-3000:])
            time.sleep(0.5)
            stats = last_stats(log, names)
            if len(stats) == len(names) and done(stats):
                break
        rss = process_peak_rss_mb(proc.pid)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    return stats, rss


def settled(keys: tuple[str, ...]) -> Callable[[Stats], bool]:
    """A ``done`` that holds once two polls in a row show the same ``keys`` (summed over agents)."""
    seen: list[tuple[int, ...]] = []

    def check(stats: Stats) -> bool:
        now = tuple(sum(int(s.get(k, 0)) for s in stats.values()) for k in keys)
        if seen and seen[-1] == now:
            return True
        seen.append(now)
        return False

    return check


def raw_rate(settings: Settings, topic: str) -> tuple[int, float]:
    """``(data records, records/s)`` of :func:`benchmarks.common.raw_read` of ``topic`` with the
    registry's decoder (an input topic may hold several event types, e.g. impressions and clicks).

    Raises:
        AssertionError: a data record does not decode.
    """
    data, elapsed = raw_read(settings, topic, registry_for(settings.registry_url).decoder())
    return data, data / elapsed
