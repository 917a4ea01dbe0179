"""The recommendations read model inside the projection runner process, over the real broker:
it runs beside the listens projection (its own runner thread), lists follow new listens while it
runs, SIGTERM stops both cleanly, and a failing runner stops the others instead of hanging."""

from __future__ import annotations

import dataclasses
import json
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from events.catalog import TopicSpec, topic
from events.producer import EventProducer
from infra.errors import InfraError
from infra.provision import apply_topics
from infra.settings import REPO_ROOT, Settings
from personalisation.experiments import MADE_FOR_YOU, assign
from projections.readmodels import LISTENS
from projections.recommendations import (
    EXPERIMENTS_TOPIC,
    RECOMMENDATIONS,
    RECOMMENDATIONS_TOPIC,
    RecommendationsWriter,
)
from projections.runner import ProjectionRunner, run_together
from projections.sql import query
from tests.conftest import env_for, wait_for

pytestmark = pytest.mark.integration

MIN = 60_000


@pytest.fixture
def settings(stack: Settings, tmp_path: Path) -> Settings:
    return dataclasses.replace(stack, data_dir=tmp_path)


def listens(users: list[str], tracks: list[str], start_ms: int) -> list[dict]:
    """Each user plays ``tracks`` in order, one a minute (one session)."""
    return [
        {
            "event_id": f"{u}-{t}-{start_ms}",
            "user_id": u,
            "track_id": t,
            "artist_id": "a1",
            "occurred_at": start_ms + i * MIN,
            "source": "test",
            "ms_played": None,
            "track_name": None,
            "artist_name": None,
            "session_hint": None,
        }
        for u in users
        for i, t in enumerate(tracks)
    ]


def send(settings: Settings, name: str, records: list[dict]) -> None:
    producer = EventProducer(settings)
    producer.send_many(
        name, "ListenRecorded", records, key_field="user_id", time_field="occurred_at", source="/t"
    )
    producer.flush()


def lists(settings: Settings) -> dict[str, tuple[str, list[str]]]:
    """``{user: (variant, tracks by rank)}`` from the read model (empty before it exists)."""
    try:
        got = query(
            settings,
            'SELECT user_id, any_value(variant), list(track_id ORDER BY "rank") FROM recommendations GROUP BY 1',
        ).rows
    except Exception:  # no file or no table yet
        return {}
    return {u: (v, t) for u, v, t in got}


def test_runs_beside_listens_follows_new_listens_and_stops_on_sigterm(settings: Settings, unique):
    name = unique("rec.live")
    apply_topics(settings, [TopicSpec(name, 2), topic(EXPERIMENTS_TOPIC), topic(RECOMMENDATIONS_TOPIC)])
    group_a = [f"a-{i}" for i in range(8)]
    group_b = [f"b-{i}" for i in range(4)]
    send(settings, name, listens(group_a, ["t1", "t2", "t3"], 1_700_000_000_000))
    send(settings, name, listens(group_b, ["t1", "t9"], 1_700_000_000_000))
    cmd = [
        sys.executable,
        "-m",
        "projections.runner",
        "--projection",
        "listens",
        "--projection",
        "recommendations",
    ]
    cmd += ["--topic", f"listens={name}", "--topic", f"recommendations={name}"]
    proc = subprocess.Popen(
        cmd, cwd=REPO_ROOT, env=env_for(settings), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        wait_for(lambda: len(lists(settings)) == 12, 60, "lists for the first 12 users")
        now = lists(settings)
        assert all(v == assign(u, MADE_FOR_YOU).variant for u, (v, _) in now.items())
        # the only track group a has not played is t9, in either variant
        assert {u: t for u, (_, t) in now.items() if u in group_a} == {u: ["t9"] for u in group_a}
        # while it runs: group c plays t1, t4, t5, then group a plays t1 again: its lists are
        # recomputed and now offer t4 and t5 too
        send(settings, name, listens([f"c-{i}" for i in range(8)], ["t1", "t4", "t5"], 1_700_000_600_000))
        send(settings, name, listens(group_a, ["t1"], 1_700_001_000_000))
        wait_for(
            lambda: all(set(lists(settings)[u][1]) == {"t4", "t5", "t9"} for u in group_a),
            60,
            "group a's lists to offer the new tracks",
        )
        assert proc.poll() is None  # forever mode
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err
    stats = json.loads(out.strip().splitlines()[-1])
    assert stats["per_projection"] == {"listens": 64, "recommendations": 64}


def test_a_failing_runner_stops_the_others(settings: Settings, unique):
    name = unique("rec.ok")
    apply_topics(settings, [TopicSpec(name, 1)])
    ok = ProjectionRunner(settings, [LISTENS.on_topic(name)], linger_s=0.1)
    bad = ProjectionRunner(
        settings, [RECOMMENDATIONS.on_topic(unique("rec.missing"))], write=RecommendationsWriter(settings)
    )
    guard = threading.Timer(30, ok.stop)  # if the failure did not stop it, end the test anyway
    guard.start()
    began = time.monotonic()
    try:
        with pytest.raises(InfraError, match="does not exist"):
            run_together([ok, bad])  # forever mode: only the failure can end it
    finally:
        guard.cancel()
    assert time.monotonic() - began < 30
