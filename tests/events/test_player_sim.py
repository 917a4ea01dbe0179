"""``backbeat simulate playback`` against the real broker: what replay and live mode report is
exactly what the topic holds, replay keeps the rule's events and times, live mode holds its
rate and stops on SIGTERM with everything it counted delivered."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from itertools import pairwise
from pathlib import Path
from threading import Event

import pytest
from confluent_kafka import Message
from typer.testing import CliRunner

from events.catalog import TopicSpec
from events.control import is_control, watermark_of
from events.log import read_to_end
from events.offsets import high_watermarks
from events.player import prepare, simulate
from events.registry_client import registry_for
from events.serde import AvroDecoder
from events.simulate_playback import BATCH, live, replay
from infra.cli import app
from infra.provision import apply_topics
from infra.settings import Settings
from tests.conftest import env_for, wait_for
from tests.events.test_player import catalog, listens, parsed_records

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]


def make_topic(settings: Settings, unique: Callable[[str], str]) -> str:
    name = unique("player.events")
    apply_topics(settings, [TopicSpec(name, 6)])
    return name


def everything(settings: Settings, topic: str) -> list[Message]:
    starts = {(topic, p): 0 for p in high_watermarks(settings, topic)}
    return [m for batch in read_to_end(settings, starts, purpose="test-read") for m in batch]


def decoded(settings: Settings, messages: list[Message]) -> list[tuple[Message, str, dict]]:
    """``(message, short type, record)`` of the data records (control records left out)."""
    registry = registry_for(settings.registry_url)
    decoder = AvroDecoder(registry.parsed_schema_by_id)
    out = []
    for m in messages:
        if is_control(m.headers()):
            continue
        schema_id = int.from_bytes(m.value()[1:5], "big")
        out.append((m, decoder.type_of(schema_id).rsplit(".", 1)[-1], decoder.decode(m.value())))
    return out


def total(settings: Settings, topic: str) -> int:
    return sum(high_watermarks(settings, topic).values())


def test_cli_replay_sends_the_rules_events_with_their_times(stack: Settings, unique: Callable[[str], str]):
    topic = make_topic(stack, unique)
    result = CliRunner().invoke(
        app, ["simulate", "playback", "--limit", "3000", "--topic", topic], env=stack.to_env()
    )
    assert result.exit_code == 0, (result.output, result.exception)
    reported = int(re.search(r"done: ([\d,]+) events", result.stdout).group(1).replace(",", ""))
    table = dict(re.findall(r"│ (Playback\w+)\s+│\s+([\d,]+) │", result.stdout))

    messages = everything(stack, topic)
    controls = [m for m in messages if is_control(m.headers())]
    events = decoded(stack, messages)
    assert len(events) == reported
    by_type = Counter(t for _, t, _ in events)
    assert {t: f"{n:,}" for t, n in by_type.items()} == table

    expected = list(simulate(prepare(parsed_records(), limit=3000), catalog()))
    assert len(expected) == reported
    assert sorted(r["event_id"] for _, _, r in events) == sorted(e.record["event_id"] for e in expected)
    want = {e.record["event_id"]: e.record for e in expected}
    assert all(r == want[r["event_id"]] for _, _, r in events)  # every field, original times

    per_user: dict[str, list[tuple[int, int]]] = defaultdict(list)
    partition_of: dict[str, set[int]] = defaultdict(set)
    for m, _, r in events:
        assert m.key() == r["user_id"].encode()
        assert m.timestamp()[1] == r["occurred_at"]
        partition_of[r["user_id"]].add(m.partition())
        per_user[r["user_id"]].append((m.offset(), r["occurred_at"]))
    assert all(len(ps) == 1 for ps in partition_of.values())  # a user on one partition ...
    for seq in per_user.values():  # ... in time order
        assert all(a[1] <= b[1] for a, b in pairwise(sorted(seq)))
    assert len(controls) == 6
    assert min(watermark_of(m.headers()) for m in controls) > max(r["occurred_at"] for _, _, r in events)


def test_live_mode_repeats_the_input_with_new_ids_and_stops_at_max_events(
    stack: Settings, unique: Callable[[str], str]
):
    topic = make_topic(stack, unique)
    sample = listens(3)
    one_round = len(list(simulate(sample, catalog())))
    before = int(time.time() * 1000)
    result = live(stack, sample, catalog(), rate=20_000, topic=topic, max_events=one_round + 50)
    after = int(time.time() * 1000)
    assert result.produced == one_round + 50 and result.rounds == 2 and not result.stopped
    events = decoded(stack, everything(stack, topic))
    assert len(events) == result.produced
    assert len({r["event_id"] for _, _, r in events}) == len(events)  # round 2 has new ids
    assert all(before <= r["occurred_at"] <= after for _, _, r in events)  # event time = now
    starts = {r["session_id"]: r["occurred_at"] for _, t, r in events if t == "PlaybackSessionStarted"}
    ended = [r for _, t, r in events if t == "PlaybackSessionEnded"]
    assert ended and all(r["started_at"] == starts[r["session_id"]] for r in ended)


def test_live_mode_holds_its_rate_and_stops_on_sigterm_with_all_it_counted_sent(
    stack: Settings, unique: Callable[[str], str]
):
    topic = make_topic(stack, unique)
    rate = 1_500
    env = {**env_for(stack), "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "infra.cli", "simulate", "playback", "--rate", str(rate), "--topic", topic]
    before = int(time.time() * 1000)
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: total(stack, topic) >= 4 * rate, 60, "4 s of live events")
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, err
    match = re.search(r"stopped: ([\d,]+) events .* in ([\d.]+) s", out.replace("\n", " "))
    assert match, out
    reported = int(match.group(1).replace(",", ""))
    events = decoded(stack, everything(stack, topic))
    assert len(events) == reported >= 4 * rate  # nothing half-sent, nothing lost
    times = sorted(r["occurred_at"] for _, _, r in events)
    assert before <= times[0] and times[-1] <= int(time.time() * 1000)
    measured = (len(times) - 1) / ((times[-1] - times[0]) / 1000)
    assert abs(measured - rate) / rate < 0.10, measured
    assert abs(reported / float(match.group(2)) - rate) / rate < 0.10
    assert Counter(t for _, t, _ in events)["PlaybackStarted"] > 0


def test_replay_stopped_mid_way_sends_whole_batches_and_no_watermark(
    stack: Settings, unique: Callable[[str], str]
):
    topic = make_topic(stack, unique)
    stop = Event()
    batches: list[int] = []

    def advance(k: int) -> None:
        batches.append(k)
        if len(batches) == 2:
            stop.set()  # as SIGTERM does in the CLI

    sample = prepare(parsed_records(), limit=6_000)
    result = replay(stack, sample, catalog(), topic=topic, stop=stop, progress=advance)
    assert result.stopped and result.watermarks == 0
    assert result.produced == 2 * BATCH < len(list(simulate(sample, catalog())))
    messages = everything(stack, topic)
    assert len(messages) == result.produced and not any(is_control(m.headers()) for m in messages)
