"""Unit tests of the pure listening-session logic (streams.sessions) and its checkpoints."""

from __future__ import annotations

import hashlib

from streams import state
from streams.sessions import ClosedSession, Sessionizer, session_event_id, validate_listen

GAP = 1_800_000
T0 = 1_400_000_000_000


def listen(user: str, t: int, eid: str | None = None, artist: str = "a1", **extra):
    record = {
        "event_id": eid or f"{user}-{t}",
        "user_id": user,
        "track_id": "t1",
        "artist_id": artist,
        "occurred_at": t,
        "source": "test",
        "ms_played": None,
    }
    record.update(extra)
    return record


def run(sz: Sessionizer, records, final_watermark: int | None = None) -> list[ClosedSession]:
    out = sz.add_many(records)
    out += sz.advance_watermark(final_watermark)
    return out


def test_gap_exactly_30_min_stays_in_session():
    sz = Sessionizer(GAP)
    out = run(sz, [listen("u", T0), listen("u", T0 + GAP)], T0 + 10 * GAP)
    assert out == [ClosedSession("u", T0, T0 + GAP, 2, 1)]


def test_gap_just_above_30_min_splits():
    sz = Sessionizer(GAP)
    out = run(sz, [listen("u", T0), listen("u", T0 + GAP + 1)], T0 + 10 * GAP)
    assert out == [
        ClosedSession("u", T0, T0, 1, 1),
        ClosedSession("u", T0 + GAP + 1, T0 + GAP + 1, 1, 1),
    ]


def test_the_split_closes_the_previous_session_at_once():
    sz = Sessionizer(GAP)
    assert sz.add(listen("u", T0)) == ()
    assert sz.add(listen("u", T0 + GAP + 1)) == [ClosedSession("u", T0, T0, 1, 1)]


def test_duplicates_in_session_are_dropped_and_counted():
    sz = Sessionizer(GAP)
    records = [listen("u", T0, "e1"), listen("u", T0 + 1000, "e2"), listen("u", T0 + 1000, "e2")]
    out = run(sz, records + [listen("u", T0, "e1")], T0 + 10 * GAP)
    assert out == [ClosedSession("u", T0, T0 + 1000, 2, 1)]
    assert (sz.accepted, sz.duplicates, sz.late) == (2, 2, 0)


def test_reimport_after_close_changes_nothing():
    sz = Sessionizer(GAP)
    records = [listen("u", T0 + i * 60_000, f"e{i}") for i in range(5)]
    first = run(sz, records, T0 + 10 * GAP)
    again = run(sz, records, T0 + 10 * GAP)
    assert len(first) == 1 and again == []
    assert sz.accepted == 5 and sz.duplicates + sz.late == 5


def test_late_event_after_close_is_counted_not_added():
    sz = Sessionizer(GAP)
    sz.add_many([listen("u", T0), listen("v", T0 + 5 * GAP)])
    closed = sz.advance_watermark()
    assert closed == [ClosedSession("u", T0, T0, 1, 1)]
    # within gap after the closed session: it would have extended an emitted session
    assert sz.add(listen("u", T0 + GAP)) == ()
    assert sz.late == 1
    # older than W - gap with no open session covering it
    assert sz.add(listen("w", T0 + 2 * GAP)) == ()
    assert sz.late == 2 and "w" not in sz.users


def test_out_of_order_within_open_session_extends_start():
    sz = Sessionizer(GAP)
    out = run(sz, [listen("u", T0 + 1000), listen("u", T0), listen("u", T0 + 2000)], T0 + 10 * GAP)
    assert out == [ClosedSession("u", T0, T0 + 2000, 3, 1)]


def test_event_far_before_open_session_is_late():
    sz = Sessionizer(GAP)
    sz.add(listen("u", T0 + 5 * GAP))
    assert sz.add(listen("u", T0)) == ()
    assert sz.late == 1


def test_watermark_closes_only_sessions_past_the_gap():
    sz = Sessionizer(GAP)
    sz.add_many([listen("a", T0), listen("b", T0 + 1000)])
    assert sz.advance_watermark(T0 + GAP) == []
    assert sz.advance_watermark(T0 + GAP + 1) == [ClosedSession("a", T0, T0, 1, 1)]
    assert sz.advance_watermark(T0 + GAP + 1001) == [ClosedSession("b", T0 + 1000, T0 + 1000, 1, 1)]
    assert sz.advance_watermark(T0) == []  # never goes down
    assert sz.watermark == T0 + GAP + 1001


def test_multiple_users_are_independent_and_artists_distinct():
    sz = Sessionizer(GAP)
    records = [
        listen("a", T0, artist="x"),
        listen("b", T0 + 10, artist="x"),
        listen("a", T0 + 20, artist="y"),
        listen("a", T0 + 30, artist="x"),
        listen("b", T0 + 40, artist="x"),
    ]
    out = run(sz, records, T0 + 10 * GAP)
    assert sorted(out) == [
        ClosedSession("a", T0, T0 + 30, 3, 2),
        ClosedSession("b", T0 + 10, T0 + 40, 2, 1),
    ]


def test_replayed_offsets_are_skipped_but_advance_the_watermark():
    sz = Sessionizer(GAP)
    sz.add(listen("u", T0), offset=0)
    sz.add(listen("u", T0 + 1000), offset=1)
    assert sz.add(listen("u", T0 + 1000), offset=1) == ()
    assert sz.replayed == 1


def test_idle_users_are_forgotten():
    sz = Sessionizer(GAP)
    sz.add(listen("u", T0))
    sz.advance_watermark(T0 + GAP + 1)
    assert "u" in sz.users
    sz.advance_watermark(T0 + 3 * GAP + 1)
    assert "u" not in sz.users
    assert sz.add(listen("u", T0 + GAP)) == ()
    assert sz.late == 1


def test_recent_ids_are_bounded():
    sz = Sessionizer(GAP, recent_ids=3)
    sz.add_many([listen(f"u{i}", T0 + i, f"e{i}") for i in range(10)])
    assert len(sz._recent_set) == 3


def test_session_event_id_is_deterministic():
    expected = hashlib.sha256(f"u|{T0}".encode()).hexdigest()[:32]
    assert session_event_id("u", T0) == expected
    assert ClosedSession("u", T0, T0, 1, 1).event_id == expected


def test_validation_reasons():
    now = T0
    assert validate_listen(listen("u", T0), now) is None
    assert "user_id" in validate_listen(listen("", T0), now)
    assert "event_id" in validate_listen(listen("u", T0, eid=" "), now)
    assert "artist_id" in validate_listen(listen("u", T0, artist=""), now)
    assert "occurred_at" in validate_listen(listen("u", 0), now)
    assert "future" in validate_listen(listen("u", now + 2 * 86_400_000), now)
    assert "ms_played" in validate_listen(listen("u", T0, ms_played=-1), now)
    assert validate_listen(listen("u", T0, ms_played=0), now) is None


def test_checkpoint_roundtrip_gives_the_same_decisions():
    records = [listen(f"u{i % 7}", T0 + i * 400_000, f"e{i}", artist=f"a{i % 3}") for i in range(60)]
    reference = Sessionizer(GAP)
    ref_out = reference.add_many(records, range(60))
    ref_out += reference.advance_watermark(T0 + 100 * GAP)

    sz = Sessionizer(GAP)
    out = sz.add_many(records[:30], range(30))
    out += sz.advance_watermark()
    table: dict[bytes, bytes | None] = {}
    table.update(state.checkpoint_records(3, sz, 29))
    restored = state.restore(3, table.items(), GAP)
    # replay from an earlier offset, as after a crash before the source commit
    out += restored.add_many(records[20:], range(20, 60))
    out += restored.advance_watermark(T0 + 100 * GAP)
    assert sorted(out) == sorted(ref_out)
    assert restored.replayed == 10


def test_checkpoint_deletes_forgotten_users_and_ignores_other_partitions():
    sz = Sessionizer(GAP)
    sz.add(listen("u", T0))
    table = dict(state.checkpoint_records(1, sz, 0))
    table[state.user_key(2, "other")] = state.encode_user(sz.users["u"])
    sz.advance_watermark(T0 + 5 * GAP)
    table.update(state.checkpoint_records(1, sz, 0))
    assert table[state.user_key(1, "u")] is None
    restored = state.restore(1, table.items(), GAP)
    assert restored.users == {} and restored.watermark == T0 + 5 * GAP


def test_the_recent_ids_survive_a_restore_so_a_resent_event_counts_the_same():
    """A re-sent event of a closed session is a duplicate while its id is in the FIFO; after a
    restore from checkpoints the FIFO is the same, so it is not counted late instead."""
    cap = 5
    live = Sessionizer(GAP, recent_ids=cap)
    chunks = state.RecentChunks(cap)
    table: dict[bytes, bytes | None] = {}
    events = [listen("u1", T0 + i * 60_000, f"e{i}") for i in range(4)]
    events += [listen("u2", T0 + 3 * GAP + i * 60_000, f"f{i}") for i in range(4)]  # closes u1's session
    for offset, e in enumerate(events):
        live.add(e, offset)
        if offset % 3 == 2:  # a checkpoint every third listen
            table.update(state.checkpoint_records(0, live, offset, chunks))
    live.advance_watermark()  # closes u1's session
    table.update(state.checkpoint_records(0, live, len(events) - 1, chunks))
    assert any(v is None for k, v in table.items() if k.startswith(b"r:0:")), "old chunks dropped"
    restored = state.restore(0, {k: v for k, v in table.items() if v is not None}.items(), GAP,
                             state.RecentChunks(cap))  # fmt: skip
    restored._recent_cap = cap
    for sz in (live, restored):
        before = (sz.duplicates, sz.late)
        sz.add(events[5], 100)  # f1 again: in the FIFO (the last 5 ids) -> duplicate
        sz.add(events[1], 101)  # e1 again: left the FIFO, its session closed -> late
        assert (sz.duplicates - before[0], sz.late - before[1]) == (1, 1)
    assert list(restored._recent) == list(live._recent)
