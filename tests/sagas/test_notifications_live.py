"""The notification relay as a real process over the real broker: a seeded burst of requests
for a few users over a small bucket, the relay SIGKILLed mid-stream and restarted, then every
guarantee checked against the topic, the provider simulator's delivery log, ``/metrics`` and the
``notifications`` read model (equal to an independent SQL computation over the topic).

Its own broker and registry (module-scoped): the relay reads the fixed topic
``platform.notifications`` from the start.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
import urllib.request
from collections.abc import Iterator
from typing import Any

import duckdb
import pytest

from events.log import read_to_end
from events.offsets import high_watermarks
from events.producer import EventProducer
from events.registry_client import registry_for
from infra import services
from infra.processes import Running, free_port, is_alive, spawn, stop
from infra.provision import apply_topics
from infra.settings import Settings
from projections.runner import run_projections
from projections.store import reader
from sagas.messages import stable_id
from sagas.notification_provider import ProviderConfig, ProviderSimulator
from sagas.token_bucket import BucketSpec, conforms
from tests.conftest import env_for, settings_for, wait_for

TOPIC = "platform.notifications"
USERS = ["u-ada", "u-bob", "u-cy", "u-dee"]
CHANNELS = ["EMAIL", "PUSH"]
PER_BUCKET = 9  # requests per (user, channel): 72 in all
BUCKET = BucketSpec(capacity=2, refill_per_s=4.0)  # a burst of 2, then one every 250 ms
#: The provider records its call time after the relay took the token and recorded the attempt
#: (one SQLite commit in between): calls are checked against the bucket with this much slack.
SLACK_MS = 100
FAULTS = ["--seed", "17", "--invalid-address", "0.06", "--unsubscribed", "0.04", "--throttle", "0.2",
          "--error", "0.06", "--lost-answer", "0.1", "--retry-after-min-ms", "100",
          "--retry-after-max-ms", "300"]  # fmt: skip


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Settings]:
    settings = settings_for(tmp_path_factory.mktemp("notify"), free_port(), free_port())
    services.up(settings)
    try:
        apply_topics(settings)
        yield settings
    finally:
        services.down(settings)


def _requests(now: int) -> list[dict[str, Any]]:
    out = []
    for i in range(PER_BUCKET * len(USERS) * len(CHANNELS)):
        user, channel = USERS[i % len(USERS)], CHANNELS[(i // len(USERS)) % len(CHANNELS)]
        nid = f"n-{i:03d}"
        out.append({"event_id": stable_id(nid, "NotificationRequested"), "notification_id": nid,
                    "user_id": user, "occurred_at": now + i, "channel": channel, "template": "dunning@2",
                    "params": {"n": str(i)}, "priority": ["LOW", "NORMAL", "HIGH"][i % 3],
                    "correlation_id": f"saga-{i % 5}"})  # fmt: skip
    return out


def _topic(settings: Settings) -> list[tuple[int, int, str, dict[str, Any]]]:
    """Every decodable record of the topic as ``(partition, offset, short type, event)``."""
    decoder = registry_for(settings.registry_url).decoder()
    starts = {(TOPIC, p): 0 for p in high_watermarks(settings, TOPIC)}
    out = []
    for batch in read_to_end(settings, starts, purpose="test-notifications"):
        for msg in batch:
            if not (msg.value() or b"").startswith(b"\x00"):
                continue  # the undecodable record
            value = msg.value()
            writer = decoder.writer_schema(int.from_bytes(value[1:5], "big"))
            out.append(
                (msg.partition(), msg.offset(), str(writer["name"]).rsplit(".", 1)[-1], decoder.decode(value))
            )
    return out


def _finals(records: list[tuple[int, int, str, dict[str, Any]]]) -> dict[str, set[str]]:
    finals: dict[str, set[str]] = {}
    for _p, _o, kind, event in records:
        if kind != "NotificationRequested":
            finals.setdefault(event["notification_id"], set()).add(event["event_id"])
    return finals


def _spawn(settings: Settings, name: str) -> Running:
    env = {k: v for k, v in env_for(settings).items() if k != "BACKBEAT_OPS_PORT"}
    argv = [
        sys.executable,
        "-m",
        "sagas.notifications",
        "--capacity",
        str(BUCKET.capacity),
        "--refill-per-s",
        str(BUCKET.refill_per_s),
        "--max-attempts",
        "10",
        "--ops-port",
        "0",
        *FAULTS,
    ]
    return spawn(name, argv, run_dir=settings.run_dir, address="-", ready=lambda: True, env=env)  # fmt: skip


def _metrics(settings: Settings, pid: int) -> dict[str, float]:
    """The relay's ``backbeat_notification*`` samples, or ``{}`` while process ``pid`` has not
    written its address yet (a SIGKILLed one leaves its old address behind)."""
    try:
        address = json.loads((settings.run_dir / "notification-relay.ops.json").read_text())
        if address["pid"] != pid:
            return {}
        text = urllib.request.urlopen(address["url"] + "/metrics", timeout=5).read().decode()
    except (OSError, ValueError, KeyError):
        return {}
    out = {}
    for line in text.splitlines():
        if line.startswith("backbeat_notification") and " " in line:
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def test_burst_with_a_sigkill_ends_every_request_exactly_once_within_the_bucket(stack: Settings) -> None:
    settings = stack
    now = int(time.time() * 1000)
    wanted = _requests(now)
    producer = EventProducer(settings)
    producer.send_many(TOPIC, "NotificationRequested", wanted[:60], key_field="user_id",
                       time_field="occurred_at", source="/test")  # fmt: skip
    producer.send_many(TOPIC, "NotificationRequested", wanted[:3], key_field="user_id",
                       time_field="occurred_at", source="/test")  # a producer retry: same ids  # fmt: skip
    producer.produce_raw(TOPIC, [b"not avro at all"], [b"u-ada"])  # undecodable: dead-lettered
    producer.flush()
    provider_db = settings.data_dir / "notifications" / "provider.sqlite"

    relay = _spawn(settings, "notification-relay")
    try:
        wait_for(lambda: provider_db.exists(), 30, "the relay to open its provider")
        provider = ProviderSimulator(provider_db, ProviderConfig())
        wait_for(lambda: len(provider.deliveries()) >= 12, 60, "a first part of the deliveries")
        os.kill(relay.pid, signal.SIGKILL)  # mid-stream: most requests still wait for tokens
        wait_for(lambda: not is_alive(relay), 10, "the relay to die")
        killed_at = len(provider.deliveries())
        assert killed_at < len(wanted)
        # the rest of the burst arrives while the relay is down
        producer.send_many(TOPIC, "NotificationRequested", wanted[60:], key_field="user_id",
                           time_field="occurred_at", source="/test")  # fmt: skip
        producer.flush()
        relay = _spawn(settings, "notification-relay")
        wait_for(lambda: len(_finals(_topic(settings))) >= len(wanted), 60, "a final event for every request")
        wait_for(
            lambda: _metrics(settings, relay.pid).get("backbeat_notifications_pending") == 0, 20, "pending 0"
        )
        metrics = _metrics(settings, relay.pid)
    finally:
        stop(relay)

    records = _topic(settings)
    finals = _finals(records)
    ids = {r["notification_id"] for r in wanted}
    # every request ended exactly once: one distinct final event (a byte-identical copy
    # re-published by an outbox relay killed before it recorded its position has the same id)
    assert set(finals) == ids and all(len(v) == 1 for v in finals.values())
    sent = {e["notification_id"]: e for _p, _o, k, e in records if k == "NotificationSent"}
    failed = {e["notification_id"]: e for _p, _o, k, e in records if k == "NotificationFailed"}
    assert not set(sent) & set(failed) and len(sent) + len(failed) == len(ids)
    assert failed and {e["reason"] for e in failed.values()} <= {"INVALID_ADDRESS", "UNSUBSCRIBED"}

    # the provider delivered each at most once, exactly the sent ones, with their message ids
    provider = ProviderSimulator(provider_db, ProviderConfig())
    deliveries = provider.deliveries()
    keys = [d[0] for d in deliveries]
    assert len(keys) == len(set(keys)) and set(keys) == set(sent)
    calls = provider.calls()
    assert any(c[5] == "replayed" for c in calls)  # lost answers were retried with the same key
    # the rate per (user, channel) never exceeded the bucket, for calls and so for deliveries
    for user in USERS:
        for channel in CHANNELS:
            at = [c[4] for c in calls if (c[1], c[2]) == (user, channel)]
            assert conforms(BUCKET, at, SLACK_MS) == (True, ""), (user, channel)
    # transient failures were retried, no earlier than their retry_after_ms
    transient = [(i, c) for i, c in enumerate(calls) if c[6] is not None]
    assert len(transient) >= 5
    for i, call in transient:
        later = [c for c in calls[i + 1 :] if c[0] == call[0]]
        assert later and later[0][4] >= call[4] + call[6], call

    # counts reconcile in /metrics: requested = sent + failed + pending
    requested = metrics["backbeat_notifications_requested_total"]
    assert requested == len(ids)
    assert metrics["backbeat_notifications_sent_total"] == len(sent)
    assert metrics["backbeat_notifications_failed_total"] == len(failed)
    assert metrics["backbeat_notification_retries_total"] >= len(transient) - 1
    # the undecodable record went to the dead-letter topic
    dlq = [m for batch in read_to_end(settings, {("sagas.dlq", 0): 0}) for m in batch]
    assert [m.value() for m in dlq] == [b"not avro at all"]

    # the read model equals an independent SQL computation over the topic
    run_projections(settings, ["notifications"], until_caught_up=True)
    with reader(settings.duckdb_path) as con:
        model = con.execute(
            "SELECT notification_id, user_id, channel, state, final_events, attempts, reason, provider_message_id "
            "FROM notifications_status ORDER BY notification_id"
        ).fetchall()
    assert model == _independent(records) and len(model) == len(ids)


def _independent(records: list[tuple[int, int, str, dict[str, Any]]]) -> list[tuple[Any, ...]]:
    con = duckdb.connect()
    con.execute(
        "CREATE TABLE raw (event_id VARCHAR, kind VARCHAR, notification_id VARCHAR, user_id VARCHAR, "
        "channel VARCHAR, attempt INTEGER, reason VARCHAR, message_id VARCHAR)"
    )
    con.executemany(
        "INSERT INTO raw VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        [(e["event_id"], k, e["notification_id"], e["user_id"], e["channel"], e.get("attempt"), e.get("reason"),
          e.get("provider_message_id")) for _p, _o, k, e in records],
    )  # fmt: skip
    return con.execute(
        """
        WITH ev AS (SELECT DISTINCT * FROM raw)
        SELECT notification_id, any_value(user_id), any_value(channel),
               CASE WHEN bool_or(kind = 'NotificationSent') THEN 'SENT'
                    WHEN bool_or(kind = 'NotificationFailed') THEN 'FAILED' ELSE 'PENDING' END,
               CAST(count(DISTINCT event_id) FILTER (WHERE kind <> 'NotificationRequested') AS INTEGER),
               max(attempt), max(reason), max(message_id)
        FROM ev GROUP BY notification_id ORDER BY notification_id
        """
    ).fetchall()
