"""The listening-from-playback state machine (:mod:`streams.plays`), pure: the 30-second rule at
its boundary, pauses, duplicates, plays without a session, bounded state, counters that
reconcile, the ``plays`` row mapping, and a restore from checkpoints that decides like an
uninterrupted run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from events.importers.base import event_id
from projections.readmodels import PLAYBACK_EVENT_TYPES, play_rows
from streams.plays import (
    EXPIRE_MS,
    KINDS,
    OTHER_COUNTS,
    RECORD_COUNTS,
    UNKNOWN_ARTIST,
    PlaysPartition,
    kind_of,
    validate_player_event,
)
from tests.streams.playback_gen import T0, expected_listens, player_events

SCHEMAS = Path(__file__).resolve().parents[2] / "schemas" / "playback"


def session_started(sid: str = "s1", t: int = T0, user: str = "u1", country: str | None = "SE") -> dict:
    return {"event_id": f"{sid}-st", "user_id": user, "session_id": sid, "occurred_at": t,
            "device_type": "MOBILE", "client": "t", "country": country}  # fmt: skip


def session_ended(sid: str = "s1", t: int = T0, user: str = "u1") -> dict:
    return {"event_id": f"{sid}-en", "user_id": user, "session_id": sid, "occurred_at": t, "started_at": T0,
            "plays": 1, "ms_played": 0, "reason": "LOGGED_OUT"}  # fmt: skip


def started(
    pid: str, t: int, sid: str = "s1", user: str = "u1", track: str = "tr-1", artist: str | None = "ar-1"
):
    return {"event_id": f"{pid}-s", "user_id": user, "session_id": sid, "playback_id": pid, "track_id": track,
            "occurred_at": t, "position_ms": 0, "context_type": "OTHER", "context_id": None, "shuffle": False,
            "offline": False, "artist_id": artist, "duration_ms": 200_000}  # fmt: skip


def skipped(pid: str, t: int, played: int, sid: str = "s1", user: str = "u1", track: str = "tr-1") -> dict:
    return {"event_id": f"{pid}-k", "user_id": user, "session_id": sid, "playback_id": pid, "track_id": track,
            "occurred_at": t, "position_ms": played, "ms_played": played, "reason": "FORWARD"}  # fmt: skip


def completed(pid: str, t: int, played: int, sid: str = "s1", user: str = "u1", track: str = "tr-1") -> dict:
    return {"event_id": f"{pid}-c", "user_id": user, "session_id": sid, "playback_id": pid, "track_id": track,
            "occurred_at": t, "ms_played": played, "duration_ms": played}  # fmt: skip


def paused(pid: str, t: int, played: int, sid: str = "s1", user: str = "u1") -> dict:
    return {"event_id": f"{pid}-p{t}", "user_id": user, "session_id": sid, "playback_id": pid, "track_id": "tr-1",
            "occurred_at": t, "position_ms": played, "ms_played": played}  # fmt: skip


def resumed(pid: str, t: int, sid: str = "s1", user: str = "u1") -> dict:
    return {"event_id": f"{pid}-r{t}", "user_id": user, "session_id": sid, "playback_id": pid, "track_id": "tr-1",
            "occurred_at": t, "position_ms": 1, "paused_ms": 5000}  # fmt: skip


def run(st: PlaysPartition, records: list[dict]) -> list:
    return [x for r in records if (x := st.apply(r)) is not None]


def reconciles(st: PlaysPartition, n: int) -> bool:
    return sum(st.counts.get(k, 0) for k in RECORD_COUNTS) == n


def test_kind_of_tells_every_schema_apart():
    for kind in KINDS:
        schema = json.loads((SCHEMAS / f"{kind}.avsc").read_text())
        record = {f["name"]: None for f in schema["fields"]}
        assert kind_of(record) == kind, kind
    listen = json.loads((SCHEMAS / "ListenRecorded.avsc").read_text())
    assert kind_of({f["name"]: None for f in listen["fields"]}) is None
    assert "not a playback event" in (validate_player_event({"event_id": "x", "occurred_at": 1}) or "")
    assert validate_player_event(skipped("p", T0, -1)) == "ms_played=-1 is negative"
    assert validate_player_event(started("p", T0, track=" ")) == "track_id is missing or blank"
    assert validate_player_event(completed("p", T0, 5)) is None


def test_the_30_second_boundary():
    st = PlaysPartition()
    listens = run(st, [
        session_started(),
        started("a", T0 + 1), skipped("a", T0 + 29_000, 29_999),
        started("b", T0 + 40_000), skipped("b", T0 + 70_000, 30_000),
        started("c", T0 + 80_000, track="tr-2"), completed("c", T0 + 300_000, 220_000, track="tr-2"),
    ])  # fmt: skip
    assert [x.playback_id for x in listens] == ["b", "c"]
    b = listens[0].record()
    assert b == {
        "event_id": event_id("player", "u1", T0 + 40_000, "tr-1"),
        "user_id": "u1", "track_id": "tr-1", "artist_id": "ar-1", "occurred_at": T0 + 40_000, "source": "player",
        "ms_played": 30_000, "track_name": None, "artist_name": None, "session_hint": "s1", "territory": "SE",
        "playback_id": "b",
    }  # fmt: skip
    assert st.counts == {"sessions_started": 1, "plays_started": 3, "short_plays": 1, "counted": 2}
    assert reconciles(st, 7)
    assert st.plays == {} and st.sessions["s1"].ended == {"a", "b", "c"}


def test_pauses_and_resumes_change_nothing_but_activity():
    st = PlaysPartition()
    listens = run(st, [
        session_started(), started("a", T0 + 1), paused("a", T0 + 10_000, 9_999), resumed("a", T0 + 500_000),
        skipped("a", T0 + 520_000, 30_000), paused("zz", T0 + 520_001, 1), resumed("zz", T0 + 520_002),
    ])  # fmt: skip
    assert [(x.playback_id, x.ms_played, x.occurred_at) for x in listens] == [("a", 30_000, T0 + 1)]
    assert st.counts["pauses"] == 1 and st.counts["resumes"] == 1 and st.counts["unmatched"] == 2
    assert reconciles(st, 7)


def test_duplicates_never_make_a_second_listen():
    st = PlaysPartition()
    records = [
        session_started(),
        session_started(t=T0 + 1),
        started("a", T0 + 2),
        started("a", T0 + 2),
        completed("a", T0 + 60_000, 50_000),
        completed("a", T0 + 60_000, 50_000),
        skipped("a", T0 + 60_001, 40_000),  # a later, different end of the same play: the first wins
        started("a", T0 + 2),  # its start redelivered after its end
        completed("a", T0 + 60_000, 50_000),
    ]
    listens = run(st, records)
    assert len(listens) == 1
    assert st.counts == {"sessions_started": 1, "plays_started": 1, "counted": 1, "duplicates": 6}
    assert reconciles(st, len(records))


def test_a_play_without_a_session_counts_with_no_territory():
    st = PlaysPartition()
    listens = run(
        st, [started("a", T0, sid="nos", artist=None), skipped("a", T0 + 31_000, 31_000, sid="nos")]
    )
    assert len(listens) == 1
    assert listens[0].territory is None and listens[0].artist_id == UNKNOWN_ARTIST
    assert st.counts["plays_without_session"] == 1
    # an end of a play never started changes nothing
    assert run(st, [skipped("b", T0 + 40_000, 40_000, sid="nos")]) == []
    assert st.counts["unmatched"] == 1
    # the session's start, after its first play, sets the territory of the later plays
    listens = run(st, [session_started("nos", T0 + 50_000, country="JP"), started("c", T0 + 60_000, sid="nos"),
                       completed("c", T0 + 99_000, 39_000, sid="nos")])  # fmt: skip
    assert listens[0].territory == "JP" and st.counts["sessions_started"] == 1


def test_state_is_dropped_at_session_end_and_by_expiry():
    st = PlaysPartition()
    run(
        st,
        [
            session_started(),
            started("a", T0 + 1),
            completed("a", T0 + 40_000, 39_000),
            started("b", T0 + 41_000),
        ],
    )
    assert st.state_entries() == 2  # the session and the open play b
    run(st, [session_ended(t=T0 + 50_000)])
    assert st.state_entries() == 0 and st.counts["plays_abandoned"] == 1
    assert run(st, [completed("b", T0 + 60_000, 40_000)]) == [] and st.counts["unmatched"] == 1
    # a session that never ends and a play that never ends: gone a day (event time) later
    run(st, [session_started("s2", T0 + 100_000, user="u2"), started("x", T0 + 100_001, sid="s2", user="u2")])
    assert st.state_entries() == 2
    run(st, [session_started("s3", T0 + 100_000 + EXPIRE_MS + 3_600_000, user="u3")])
    assert set(st.sessions) == {"s3"} and st.plays == {} and st.counts["expired"] == 2
    assert st.low_watermark(T0 + 10 * EXPIRE_MS) == T0 + 10 * EXPIRE_MS
    run(st, [started("y", T0 + 2 * EXPIRE_MS, sid="s3", user="u3")])
    assert st.low_watermark(T0 + 3 * EXPIRE_MS) == T0 + 2 * EXPIRE_MS - 1


def _split_run(events: list[tuple[str, dict]], cuts: list[int]) -> tuple[PlaysPartition, list, dict]:
    """Apply ``events``, checkpointing at each cut and restoring a new state from the changelog
    there (a restart); returns the final state, the listens and the summed counters."""
    table: dict[bytes, bytes] = {}
    st = PlaysPartition(3)
    listens: list = []
    counts: dict[str, int] = {}
    last = 0
    for cut in [*cuts, len(events)]:
        for kind, record in events[last:cut]:
            x = st.apply(record, kind)
            if x is not None:
                listens.append(x)
        last = cut
        for k, v in st.take_counts().items():
            counts[k] = counts.get(k, 0) + v
        for key, value in st.checkpoint_records():
            if value is None:
                table.pop(key, None)
            else:
                table[key] = value
        st = PlaysPartition.restore(3, list(table.items()))
    return st, listens, counts


def test_restore_from_checkpoints_equals_an_uninterrupted_run():
    events = player_events(seed=7, users=30, sessions_per_user=6)
    whole, listens, counts = _split_run(events, [])
    n = len(events)
    split, listens2, counts2 = _split_run(events, [n // 7, n // 3, n // 3 + 1, n // 2, 4 * n // 5])
    assert listens2 == listens
    assert counts2 == counts
    assert split.sessions == whole.sessions and split.plays == whole.plays
    assert (split.clock, split.bucket) == (whole.clock, whole.bucket)
    # and the listens are what a plain reading of the events gives
    expected = expected_listens(events)
    assert {x.playback_id: {"user_id": x.user_id, "track_id": x.track_id, "occurred_at": x.occurred_at,
                            "ms_played": x.ms_played, "territory": x.territory} for x in listens} == expected  # fmt: skip
    assert len(listens) == len(expected) > 100
    assert sum(counts.get(k, 0) for k in RECORD_COUNTS) == n
    assert counts["duplicates"] > 0 and counts["short_plays"] > 0 and counts["plays_abandoned"] > 0
    assert set(counts) <= set(RECORD_COUNTS) | set(OTHER_COUNTS)


def test_plays_rows_of_end_events_only():
    sk = play_rows("backbeat.playback.PlaybackSkipped", skipped("a", T0, 29_999))
    assert sk == [{"playback_id": "a", "event_id": "a-k", "user_id": "u1", "session_id": "s1", "track_id": "tr-1",
                   "ended_at": T0, "ms_played": 29_999, "outcome": "SKIPPED", "counted": False,
                   "skip_position_ms": 29_999, "skip_reason": "FORWARD", "duration_ms": None}]  # fmt: skip
    (co,) = play_rows("backbeat.playback.PlaybackCompleted", completed("b", T0, 30_000))
    assert co["counted"] is True and co["outcome"] == "COMPLETED" and co["duration_ms"] == 30_000
    for name in PLAYBACK_EVENT_TYPES[2:]:
        assert play_rows(name, {}) == []
    with pytest.raises(KeyError):
        play_rows("backbeat.playback.PlaybackSkipped", {"ms_played": 1})


def test_the_agent_emits_listens_and_forwards_lowered_watermarks():
    from events.control import watermark_of
    from streams.playback import ListeningFromPlayback
    from streams.playback_config import PlaybackConfig
    from streams.runtime.agent import PartitionBatch

    config = PlaybackConfig(source_topic="src", listens_topic="lis", dlq_topic="dlq")
    agent = ListeningFromPlayback(config, "app", 6)
    assert agent.changelog_topic == "app-plays-changelog" and agent.output_topics == ("lis", "dlq")
    agent.restore(2, {})
    records = [session_started(), started("a", T0 + 1), completed("a", T0 + 40_000, 39_000),
               started("b", T0 + 41_000), None, skipped("b", T0 + 50_000, 9_000)]  # fmt: skip
    batch = PartitionBatch(2, list(range(len(records))), records, [None] * len(records), {4: T0 + 45_000})
    result = agent.process(batch, 0)
    (emit,) = result.emits
    assert (emit.topic, emit.partition, emit.key, emit.event_type, emit.time_ms) == (
        "lis", 2, b"u1", "ListenRecorded", T0 + 1)  # fmt: skip
    assert emit.event_id == emit.record["event_id"] and emit.record["territory"] == "SE"
    (raw,) = result.raws  # the watermark, held below the start of the open play b
    assert (raw.topic, raw.partition, raw.value, raw.output_id) == ("lis", 2, b"", None)
    assert watermark_of(raw.headers) == T0 + 41_000 - 1
    counts = {**result.counts, "records_in": 5}
    assert agent.reconciles(counts) and counts["listens_emitted"] == 1 and counts["short_plays"] == 1
    assert agent.state_entries() == 1  # the session (its plays ended)
    records = list(agent.checkpoint(2, 5))
    again = ListeningFromPlayback(config, "app", 6)
    again.restore(2, {k: v for k, v in records if v is not None})
    assert again.partitions[2].sessions == agent.partitions[2].sessions
    assert again.stats({}) == {"open_sessions": {2: 1}, "open_plays": {2: 0}}
    # a listens topic with fewer partitions than the source: watermarks are not passed on
    fewer = ListeningFromPlayback(config, "app", 12)
    fewer.restore(7, {})
    assert fewer.process(PartitionBatch(7, [0], [None], [None], {0: T0}), 0).raws == []
    # fewer source partitions than listens partitions (4 → 6): each listens partition has one feeder
    four = ListeningFromPlayback(config, "app", 4)
    four.restore(3, {})
    (raw,) = four.process(PartitionBatch(3, [0], [None], [None], {0: T0}), 0).raws
    assert (raw.partition, watermark_of(raw.headers)) == (3, T0)
