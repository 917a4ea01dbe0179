"""The notification relay without a broker: the token bucket, the provider simulator, and the
relay fed records in process with a fake clock, including a crash at each point of an attempt
(docs/live-notifications.md, "Crash semantics").

The same relay as real processes over the real broker, SIGKILLed mid-stream:
``test_notifications_live.py``.
"""

from __future__ import annotations

import random
from itertools import count
from pathlib import Path
from typing import Any

import duckdb
import pytest

from sagas.messages import Inbound
from sagas.new_releases import artist_id_of, followers, notification_id_for, release_requests
from sagas.notification_model import notification_rows
from sagas.notification_provider import (
    ProviderConfig,
    ProviderRejected,
    ProviderResult,
    ProviderSimulator,
    ProviderTransient,
)
from sagas.notifications import (
    ATTEMPTING,
    FAILED,
    SENT,
    NotificationCounts,
    NotificationRelay,
    RelayConfig,
    notification_uuid,
)
from sagas.runner import RejectedRecord
from sagas.token_bucket import BucketSpec, conforms, take, wait_ms
from tests.sagas.feed import outbox, sqlite_env

T0 = 1_767_225_600_000  # 2026-01-01T00:00:00Z


class Clock:
    """A fake wall clock (ms) the tests move by hand."""

    def __init__(self, now: int = T0) -> None:
        self.now = now

    def __call__(self) -> int:
        return self.now


def request(nid: str, user: str, channel: str = "EMAIL", **extra: Any) -> dict[str, Any]:
    return {"event_id": f"req-{nid}", "notification_id": nid, "user_id": user, "occurred_at": T0,
            "channel": channel, "template": "hello@1", "params": {"a": "1"}, "priority": "NORMAL",
            "correlation_id": None, **extra}  # fmt: skip


_offsets = count()


def record(payload: dict[str, Any], name: str = "NotificationRequested") -> Inbound:
    return Inbound("platform.notifications", 0, next(_offsets), f"backbeat.platform.{name}", payload)


# -- token bucket --------------------------------------------------------------------------------
def test_gcra_admits_exactly_what_a_token_bucket_admits() -> None:
    spec = BucketSpec(capacity=3, refill_per_s=2.0)  # a token every 500 ms
    rng = random.Random(4)
    times = sorted(rng.randrange(0, 20_000) for _ in range(200))
    tat, tokens, last = 0.0, float(spec.capacity), 0
    for t in times:
        # the classic bucket: refill by elapsed time, capped at capacity; a send costs one token
        tokens = min(spec.capacity, tokens + (t - last) / spec.interval_ms)
        last = t
        classic = tokens >= 1 - 1e-9
        assert (wait_ms(spec, tat, t) == 0) == classic, t
        if classic:
            tokens -= 1
            tat = take(spec, tat, t)


def test_sends_at_the_waits_gcra_gives_conform_and_a_burst_does_not() -> None:
    spec = BucketSpec(capacity=2, refill_per_s=4.0)
    tat, now, sent = 0.0, T0, []
    for _ in range(12):  # 12 sends wanted at once: each waits for its token
        now += wait_ms(spec, tat, now)
        tat = take(spec, tat, now)
        sent.append(now)
    assert sent[:2] == [T0, T0] and sent[2] == T0 + 250 and sent[-1] == T0 + 10 * 250
    assert conforms(spec, sent) == (True, "")
    ok, why = conforms(spec, [T0, T0, T0 + 10])
    assert not ok and "3 sends within 10 ms" in why
    with pytest.raises(ValueError, match="no token"):
        take(spec, tat, now)
    with pytest.raises(ValueError):
        BucketSpec(capacity=0, refill_per_s=1.0)


# -- provider simulator --------------------------------------------------------------------------
def _send(provider: ProviderSimulator, key: str, user: str = "u1") -> ProviderResult:
    return provider.send(idempotency_key=key, user_id=user, channel="EMAIL", template="t@1", params={})


def test_provider_delivers_once_per_key_and_replays(tmp_path: Path) -> None:
    clock = Clock()
    provider = ProviderSimulator(tmp_path / "p.sqlite", ProviderConfig(seed=1), clock=clock)
    first = _send(provider, "n-1")
    again = _send(provider, "n-1")
    assert not first.replayed and again.replayed and again.message_id == first.message_id
    assert [d[0] for d in provider.deliveries()] == ["n-1"]
    assert [c[5] for c in provider.calls()] == ["delivered", "replayed"]
    # a new object on the same file (a restarted process) still knows the key
    provider.close()
    reopened = ProviderSimulator(tmp_path / "p.sqlite", ProviderConfig(seed=1), clock=clock)
    assert _send(reopened, "n-1").replayed and len(reopened.deliveries()) == 1


def test_provider_faults_are_seeded_and_typed(tmp_path: Path) -> None:
    config = ProviderConfig(seed=3, invalid_address=0.2, throttle=0.3, lost_answer=0.2,
                            retry_after_min_ms=100, retry_after_max_ms=300)  # fmt: skip
    provider = ProviderSimulator(tmp_path / "p.sqlite", config, clock=Clock())
    outcomes: dict[str, list[str]] = {}
    for i in range(60):
        key = f"n-{i}"
        for _ in range(6):
            try:
                _send(provider, key)
                outcomes.setdefault(key, []).append("ok")
                break
            except ProviderTransient as exc:
                outcomes.setdefault(key, []).append(exc.reason)
                if exc.reason == "RATE_LIMITED":
                    assert exc.retry_after_ms is not None and 100 <= exc.retry_after_ms <= 300
                else:
                    assert exc.reason == "TIMEOUT" and exc.retry_after_ms is None
            except ProviderRejected as exc:
                assert exc.reason == "INVALID_ADDRESS"
                outcomes.setdefault(key, []).append("rejected")
                again = [_first(provider, key) for _ in range(4)]  # for good (throttling aside)
                assert set(again) - {"RATE_LIMITED"} == {"INVALID_ADDRESS"}
                break
    flat = [o for seq in outcomes.values() for o in seq]
    assert {"ok", "RATE_LIMITED", "TIMEOUT", "rejected"} <= set(flat)
    # every TIMEOUT (lost answer) had delivered: the next call of the key is a replay
    delivered = [d[0] for d in provider.deliveries()]
    assert len(delivered) == len(set(delivered))
    assert all(k in delivered for k, seq in outcomes.items() if "TIMEOUT" in seq)
    again = ProviderSimulator(tmp_path / "q.sqlite", config, clock=Clock())
    fresh = ProviderSimulator(tmp_path / "r.sqlite", config, clock=Clock())
    firsts = [_first(again, f"m-{i}") for i in range(30)]
    assert firsts == [_first(fresh, f"m-{i}") for i in range(30)]  # same seed, same decisions
    assert len(set(firsts)) > 1


def _first(provider: ProviderSimulator, key: str) -> str:
    try:
        _send(provider, key)
        return "ok"
    except (ProviderTransient, ProviderRejected) as exc:
        return exc.reason


# -- the relay in process ------------------------------------------------------------------------
def relay_app(
    tmp_path: Path, provider: Any, clock: Clock, config: RelayConfig | None = None
) -> NotificationRelay:
    return NotificationRelay(
        env=sqlite_env(tmp_path / "relay.sqlite"), provider=provider, clock=clock,
        config=config or RelayConfig(bucket=BucketSpec(2, 4.0), max_attempts=6),
    )  # fmt: skip


def drive(app: NotificationRelay, clock: Clock, until_ms: int, step_ms: int = 10) -> None:
    """Fire timers as the runner does, moving the fake clock by ``step_ms``."""
    while clock.now < until_ms:
        app.fire_due(clock.now)
        clock.now += step_ms


def finals(app: NotificationRelay) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for message in outbox(app):
        out.setdefault(message["payload"]["notification_id"], []).append(message)
    return out


def test_relay_burst_ends_each_once_within_the_bucket(tmp_path: Path) -> None:
    clock = Clock()
    config = ProviderConfig(seed=9, invalid_address=0.05, unsubscribed=0.05, throttle=0.2, error=0.05,
                            lost_answer=0.1, retry_after_min_ms=100, retry_after_max_ms=300)  # fmt: skip
    provider = ProviderSimulator(tmp_path / "p.sqlite", config, clock=clock)
    app = relay_app(tmp_path, provider, clock)
    users, channels = ["u1", "u2", "u3"], ["EMAIL", "PUSH"]
    nids = []
    for i in range(48):
        nid = f"n-{i:02d}"
        nids.append(nid)
        assert app.process_record(record(request(nid, users[i % 3], channels[i % 2]))) == "applied"
    # a repeated request, and the relay's own output on the topic, change nothing
    assert app.process_record(record(request("n-00", "u1"))) == "ignored"
    assert app.process_record(record({"event_id": "x"}, "NotificationSent")) == "ignored"
    with pytest.raises(RejectedRecord, match="invalid_request"):
        app.process_record(record(request("", "u1")))
    drive(app, clock, T0 + 20_000)

    got = finals(app)
    assert sorted(got) == nids and all(len(v) == 1 for v in got.values())
    states = {nid: app.repository.get(notification_uuid(nid)).state for nid in nids}
    assert set(states.values()) <= {SENT, FAILED}
    delivered = [d[0] for d in provider.deliveries()]
    assert len(delivered) == len(set(delivered))
    assert set(delivered) == {n for n, s in states.items() if s == SENT}
    spec = BucketSpec(2, 4.0)
    calls = provider.calls()
    for user in users:
        for channel in channels:
            at = [c[4] for c in calls if c[1] == user and c[2] == channel]
            assert conforms(spec, at) == (True, ""), (user, channel)
    # a transient failure is retried no earlier than its Retry-After
    for i, call in enumerate(calls):
        if call[6] is not None:
            later = [c for c in calls[i + 1 :] if c[0] == call[0]]
            assert later and later[0][4] >= call[4] + call[6]
    reasons = {
        m[0]["payload"].get("reason") for m in got.values() if m[0]["event_type"] == "NotificationFailed"
    }
    assert reasons <= {"INVALID_ADDRESS", "UNSUBSCRIBED", "RATE_LIMITED", "PROVIDER_ERROR", "TIMEOUT"}
    assert {"INVALID_ADDRESS", "UNSUBSCRIBED"} & reasons
    counts = NotificationCounts()
    counts.follow(app)
    snap = counts.snapshot()
    assert snap["requested"] == 48 and snap["sent"] + snap["failed"] == 48 and snap["pending"] == 0
    assert snap["retries"] > 0 and snap["replayed"] > 0 and snap["attempts"] == len(calls)
    assert app.delays > 0  # the bucket made some wait


def test_high_priority_does_not_bypass_the_bucket(tmp_path: Path) -> None:
    clock = Clock()
    provider = ProviderSimulator(tmp_path / "p.sqlite", ProviderConfig(), clock=clock)
    app = relay_app(tmp_path, provider, clock, RelayConfig(bucket=BucketSpec(1, 1.0)))
    for i in range(3):
        app.process_record(record(request(f"h-{i}", "u1", priority="HIGH")))
    drive(app, clock, T0 + 2_500)
    assert [c[4] - T0 for c in provider.calls()] == [0, 1000, 2000]


def test_waiting_notifications_of_a_bucket_go_in_order_each_timer_once_per_slot(tmp_path: Path) -> None:
    clock = Clock()
    provider = ProviderSimulator(tmp_path / "p.sqlite", ProviderConfig(), clock=clock)
    app = relay_app(tmp_path, provider, clock, RelayConfig(bucket=BucketSpec(1, 2.0)))
    names = [f"q-{i}" for i in (5, 1, 4, 0, 3, 2)]  # not in id order
    fired = 0
    for name in names:  # one request per ms
        app.process_record(record(request(name, "u1")))
        fired += app.fire_due(clock.now)
        clock.now += 1
    while clock.now < T0 + 4_000:
        fired += app.fire_due(clock.now)
        clock.now += 10
    calls = provider.calls()
    assert [c[0] for c in calls] == names  # first come, first served
    assert [c[4] - T0 for c in calls] == [0, 506, 1006, 1506, 2006, 2506]  # slots 500 ms apart, 10 ms steps
    assert fired == len(names) + (len(names) - 1)  # one look each, plus one fire per waiting slot
    assert app.delays == len(names) - 1


class CrashAfter:
    """A provider that "crashes the process" (raises) before or after the real call."""

    name = "simulator"

    def __init__(self, inner: ProviderSimulator, when: str) -> None:
        self.inner, self.when = inner, when

    def send(self, **kwargs: Any) -> ProviderResult:
        if self.when == "before":
            raise KeyboardInterrupt("killed before the provider call")
        self.inner.send(**kwargs)
        raise KeyboardInterrupt("killed after the provider call, before the outcome was recorded")


@pytest.mark.parametrize("when", ["before", "after"])
def test_a_crash_around_the_provider_call_neither_loses_nor_sends_twice(tmp_path: Path, when: str) -> None:
    clock = Clock()
    provider = ProviderSimulator(tmp_path / "p.sqlite", ProviderConfig(), clock=clock)
    crashing = relay_app(tmp_path, CrashAfter(provider, when), clock)
    crashing.process_record(record(request("n-1", "u1")))
    with pytest.raises(KeyboardInterrupt):
        crashing.fire_due(clock.now)
    assert crashing.repository.get(notification_uuid("n-1")).state == ATTEMPTING  # step 1 was durable
    assert len(provider.deliveries()) == (1 if when == "after" else 0)

    clock.now += 5_000
    restarted = relay_app(tmp_path, provider, clock)  # a new process on the same event store
    assert restarted.rebuild_timers() == 1
    drive(restarted, clock, clock.now + 100)
    note = restarted.repository.get(notification_uuid("n-1"))
    assert note.state == SENT and note.attempts == 2
    assert len(provider.deliveries()) == 1  # never twice
    [sent] = finals(restarted)["n-1"]
    assert sent["payload"]["attempt"] == 2
    assert [c[5] for c in provider.calls()] == (
        ["delivered", "replayed"] if when == "after" else ["delivered"]
    )


def test_a_final_event_recorded_but_not_published_is_published_after_a_restart(tmp_path: Path) -> None:
    from sagas.outbox import OutboxRelay

    clock = Clock()
    provider = ProviderSimulator(tmp_path / "p.sqlite", ProviderConfig(), clock=clock)
    app = relay_app(tmp_path, provider, clock)
    app.process_record(record(request("n-1", "u1")))
    drive(app, clock, clock.now + 50)  # Sent recorded; the process "dies" before its relay runs

    class Sink:
        def __init__(self) -> None:
            self.sent: list[Any] = []

        def encoder(self, topic: str, event_type: str) -> Any:
            return type("E", (), {"encode": staticmethod(lambda payload: payload)})()

        def produce_raw(
            self, topic: str, values: Any, keys: Any, times: Any = None, headers: Any = None
        ) -> None:
            self.sent.extend(values)

        def flush(self, timeout_s: float = 60.0) -> None:
            pass

    sink = Sink()
    assert OutboxRelay(relay_app(tmp_path, provider, clock), sink).publish_pending() == 1
    assert sink.sent[0]["notification_id"] == "n-1" and sink.sent[0]["provider"] == "simulator"
    assert OutboxRelay(relay_app(tmp_path, provider, clock), sink).publish_pending() == 0


def test_gives_up_after_max_attempts_with_the_last_reason(tmp_path: Path) -> None:
    clock = Clock()
    provider = ProviderSimulator(tmp_path / "p.sqlite", ProviderConfig(seed=2, error=1.0), clock=clock)
    app = relay_app(tmp_path, provider, clock, RelayConfig(bucket=BucketSpec(5, 10.0), max_attempts=3))
    app.process_record(record(request("n-1", "u1")))
    drive(app, clock, clock.now + 5_000)
    [failed] = finals(app)["n-1"]
    assert failed["event_type"] == "NotificationFailed"
    assert failed["payload"]["reason"] == "PROVIDER_ERROR" and failed["payload"]["attempt"] == 3
    assert (
        failed["payload"]["retryable"] is False and "gave up after 3 attempts" in failed["payload"]["detail"]
    )
    assert len(provider.calls()) == 3


# -- read-model rows and the new-release rule ----------------------------------------------------
def test_rows_of_each_event_type() -> None:
    [row] = notification_rows("backbeat.platform.NotificationFailed", {"event_id": "e", "retryable": False})
    assert row["event_type"] == "NotificationFailed" and row["retryable"] == 0
    with pytest.raises(ValueError):
        notification_rows("backbeat.platform.Other", {})


def test_followers_and_their_requests() -> None:
    con = duckdb.connect()
    con.execute("CREATE TABLE listens (user_id VARCHAR, artist_id VARCHAR)")
    a, b = artist_id_of("Artist A"), artist_id_of("B")
    assert a == "ar-" + __import__("hashlib").md5(b"Artist A").hexdigest()[:16]
    rows = [("u1", a)] * 3 + [("u2", a)] * 2 + [("u3", a)] * 5 + [("u3", b)] * 9
    con.executemany("INSERT INTO listens VALUES (?, ?)", rows)
    assert followers(con, a, 3) == [("u1", 3), ("u3", 5)]
    album = {"event_id": "rel-1", "album_id": "al-1", "name": "First", "artist": "Artist A",
             "album_type": "ALBUM", "release_date": "2026-01-01"}  # fmt: skip
    reqs = release_requests(album, followers(con, a, 3), now_ms=T0)
    again = release_requests(album, followers(con, a, 3), now_ms=T0 + 1)
    assert [r["notification_id"] for r in reqs] == [r["notification_id"] for r in again]
    assert reqs[0]["notification_id"] == notification_id_for("al-1", "u1")
    assert reqs[0]["params"]["artist_id"] == a and reqs[0]["template"] == "new-release@1"
    assert {r["event_id"] for r in reqs} == {r["event_id"] for r in again}


def test_relay_paths_are_wired_into_the_cli() -> None:
    from typer.testing import CliRunner

    from infra.cli import app

    out = CliRunner().invoke(app, ["notifications", "--help"])
    assert out.exit_code == 0 and all(c in out.output for c in ("relay", "request", "releases", "status"))


def test_reset_removes_the_relays_record_and_read_model(tmp_path: Path) -> None:
    from infra.settings import Settings
    from projections.readmodels import NOTIFICATIONS
    from sagas.notifications import build_relay, provider_file, reset_relay

    settings = Settings.from_env({"BACKBEAT_DATA_DIR": str(tmp_path)})
    provider = ProviderSimulator(provider_file(settings), ProviderConfig())
    app = build_relay(settings, provider, RelayConfig())
    app.process_record(record(request("n-1", "u1")))
    app.fire_due(T0)
    app.close()
    provider.close()
    settings.duckdb_path.parent.mkdir(parents=True, exist_ok=True)
    with duckdb.connect(str(settings.duckdb_path)) as con:
        con.execute(NOTIFICATIONS.ddl)
        for ddl in NOTIFICATIONS.extra_ddl:
            con.execute(ddl)
    store = settings.data_dir / "eventstore" / "NotificationRelay.sqlite"
    assert store.exists() and provider_file(settings).exists()

    removed = reset_relay(settings)

    assert str(store) in removed and "read model notifications" in removed
    assert not store.exists() and not provider_file(settings).exists()
    with duckdb.connect(str(settings.duckdb_path)) as con:
        names = {r[0] for r in con.execute("SELECT table_name FROM information_schema.tables").fetchall()}
    assert not {"notifications", "notifications_status"} & names
