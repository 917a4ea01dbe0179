"""The player simulator's rule (events/player.py) on the real 30Music file: determinism, one start
and one end per play, positions within the track, the cap at the next play, sessions by the gap
rule, the skip shares, and Avro validity (pure, no broker)."""

from __future__ import annotations

import functools
from collections import Counter, defaultdict
from itertools import pairwise

import pytest
from fastavro.validation import validate

from events import player
from events.importers.listens import parse_listens_file
from events.player import COUNTRIES, EVENT_TYPES, PlayerEvent, prepare, simulate
from events.player_catalog import PlayerCatalog, load
from events.schemas import get_schema
from events.serde import AvroEncoder, decode_with_schema
from infra.errors import ConfigError
from tests.conftest import CATALOG, LISTENS_30MUSIC

GAP = player.SESSION_GAP_MS
ENDS = ("PlaybackSkipped", "PlaybackCompleted")


@functools.cache
def catalog() -> PlayerCatalog:
    """The real catalog (cached for the test session)."""
    return load(CATALOG)


@functools.cache
def parsed_records() -> tuple[dict, ...]:
    """The real 30Music records (cached)."""
    return tuple(parse_listens_file(LISTENS_30MUSIC, "30music").records)


@functools.cache
def listens(users: int | None = None) -> tuple[player.Listen, ...]:
    """The real listens, or those of the first ``users`` users (cached)."""
    return tuple(prepare(parsed_records(), users=users))


@functools.cache
def full_events(seed: int = player.DEFAULT_SEED) -> tuple[PlayerEvent, ...]:
    """The events of the whole real file (cached)."""
    return tuple(simulate(listens(), catalog(), seed))


def encode(event: PlayerEvent) -> bytes:
    return _encoders(event.event_type).encode(event.record)


@functools.cache
def _encoders(event_type: str) -> AvroEncoder:
    return AvroEncoder(get_schema(event_type).parsed_plain, 1)


def by_playback(events: tuple[PlayerEvent, ...]) -> dict[str, list[PlayerEvent]]:
    plays: dict[str, list[PlayerEvent]] = defaultdict(list)
    for e in events:
        if "playback_id" in e.record:
            plays[e.record["playback_id"]].append(e)
    return plays


def test_same_seed_gives_identical_events_and_bytes():
    sample = listens(300)
    first = list(simulate(sample, catalog(), 5))
    again = list(simulate(list(sample), load(CATALOG), 5))  # a fresh catalog: no shared cache
    assert len(first) > 1000
    assert first == again
    assert [encode(e) for e in first] == [encode(e) for e in again]
    ids = [e.record["event_id"] for e in first]
    assert len(set(ids)) == len(ids)


def test_another_seed_gives_other_skips_and_ids_on_the_same_plays():
    sample = listens(300)
    a = list(simulate(sample, catalog(), 5))
    b = list(simulate(sample, catalog(), 6))
    starts_a = [(e.key, e.time_ms, e.record["track_id"]) for e in a if e.event_type == "PlaybackStarted"]
    starts_b = [(e.key, e.time_ms, e.record["track_id"]) for e in b if e.event_type == "PlaybackStarted"]
    assert starts_a == starts_b  # the same plays of the same tracks ...
    skips_a = {(e.key, e.record["ms_played"]) for e in a if e.event_type == "PlaybackSkipped"}
    skips_b = {(e.key, e.record["ms_played"]) for e in b if e.event_type == "PlaybackSkipped"}
    assert skips_a != skips_b  # ... skipped elsewhere
    assert not {e.record["event_id"] for e in a} & {e.record["event_id"] for e in b}


def test_every_listen_is_one_play_with_one_start_and_one_end():
    events = full_events()
    counts = Counter(e.event_type for e in events)
    assert counts["PlaybackStarted"] == len(listens()) == 86_468
    assert counts["PlaybackSkipped"] + counts["PlaybackCompleted"] == len(listens())
    assert counts["PlaybackPaused"] == counts["PlaybackResumed"] > 0
    assert set(counts) == set(EVENT_TYPES)
    for pid, evs in by_playback(events).items():
        types = [e.event_type for e in evs]
        assert types[0] == "PlaybackStarted" and types[-1] in ENDS, (pid, types)
        assert types[1:-1] in ([], ["PlaybackPaused", "PlaybackResumed"]), (pid, types)


def test_positions_and_ms_played_stay_within_the_track():
    for evs in by_playback(full_events()).values():
        start, end = evs[0], evs[-1]
        duration = start.record["duration_ms"]
        heard = end.record["ms_played"]
        assert start.record["position_ms"] == 0 and duration > 0
        assert start.record["artist_id"].startswith("ar-")
        assert 0 <= heard <= duration
        paused = 0
        if len(evs) == 4:
            pause, resume = evs[1], evs[2]
            assert 1 <= pause.record["position_ms"] == pause.record["ms_played"] < heard
            assert resume.record["position_ms"] == pause.record["position_ms"]
            paused = resume.record["paused_ms"]
            assert pause.time_ms == start.time_ms + pause.record["position_ms"]
            assert resume.time_ms == pause.time_ms + paused
        assert end.time_ms == start.time_ms + heard + paused
        if end.event_type == "PlaybackCompleted":
            assert heard == duration == end.record["duration_ms"]
        else:
            assert end.record["position_ms"] == heard < duration


def test_a_users_events_are_in_time_order_and_a_play_ends_by_the_next_start():
    events = full_events()
    assert all(a.time_ms <= b.time_ms for a, b in pairwise(events))  # merged in time order
    per_user: dict[str, list[PlayerEvent]] = defaultdict(list)
    for e in events:
        per_user[e.key].append(e)
    capped = 0
    for user, evs in per_user.items():
        assert all(e.record["user_id"] == user for e in evs)
        assert all(a.time_ms <= b.time_ms for a, b in pairwise(evs)), user
        plays = [e for e in evs if e.event_type in ("PlaybackStarted", *ENDS)]
        for end, nxt in pairwise(plays[1:]):  # a play's end, then the next play's start
            if end.event_type not in ENDS:
                continue
            assert end.time_ms <= nxt.time_ms
            capped += end.time_ms == nxt.time_ms
    assert capped > 1000  # the cap is real on this file, not a corner case


def test_sessions_follow_the_gap_rule_and_sum_their_plays():
    events = full_events()
    per_user: dict[str, list[PlayerEvent]] = defaultdict(list)
    for e in events:
        per_user[e.key].append(e)
    sessions = 0
    for evs in per_user.values():
        assert evs[0].event_type == "PlaybackSessionStarted" and evs[-1].event_type == "PlaybackSessionEnded"
        countries = {e.record["country"] for e in evs if e.event_type == "PlaybackSessionStarted"}
        assert len(countries) == 1 and countries <= set(COUNTRIES)
        open_session = None
        plays: list[PlayerEvent] = []
        last_start_of_previous = None
        for e in evs:
            if e.event_type == "PlaybackSessionStarted":
                assert open_session is None
                open_session, plays = e, []
                if last_start_of_previous is not None:
                    assert e.time_ms - last_start_of_previous > GAP
            elif e.event_type == "PlaybackSessionEnded":
                sessions += 1
                rec = e.record
                assert rec["session_id"] == open_session.record["session_id"]
                assert rec["started_at"] == open_session.time_ms
                starts = [p for p in plays if p.event_type == "PlaybackStarted"]
                ends = [p for p in plays if p.event_type in ENDS]
                assert rec["plays"] == len(starts) == len(ends) >= 1
                assert rec["ms_played"] == sum(p.record["ms_played"] for p in ends)
                assert e.time_ms == ends[-1].time_ms
                assert starts[0].time_ms == open_session.time_ms
                gaps = [b.time_ms - a.time_ms for a, b in pairwise(starts)]
                assert all(g <= GAP for g in gaps)
                last_start_of_previous = starts[-1].time_ms
                open_session = None
            else:
                assert (
                    open_session is not None and e.record["session_id"] == open_session.record["session_id"]
                )
                plays.append(e)
        assert open_session is None
    assert sessions == Counter(e.event_type for e in events)["PlaybackSessionStarted"] > 1000


def test_skip_shares_on_the_real_file_are_in_the_documented_range():
    ends = [e for e in full_events() if e.event_type in ENDS]
    skipped = [e for e in ends if e.event_type == "PlaybackSkipped"]
    share = len(skipped) / len(ends)
    under_30s = sum(e.record["ms_played"] < 30_000 for e in ends) / len(ends)
    assert 0.20 <= share <= 0.35, share
    assert 0.03 <= under_30s <= 0.15, under_30s  # the 30-second rule matters, for a minority
    early = [e for e in skipped if e.record["ms_played"] < 30_000]
    assert (
        sum(e.record["ms_played"] < 10_000 for e in early) > len(early) / 2
    )  # most early skips are very early
    assert Counter(e.record["reason"] for e in skipped).most_common(1)[0][0] == "FORWARD"


def test_every_event_validates_against_its_avro_schema():
    events = full_events()
    seen: dict[str, int] = Counter()
    for e in events[:20_000] + events[-2_000:]:
        seen[e.event_type] += 1
        schema = get_schema(e.event_type)
        assert validate(e.record, schema.parsed_plain, strict=True)
        assert decode_with_schema(encode(e), schema.parsed_plain) == e.record  # no field lost or added
        assert e.time_ms == e.record["occurred_at"] and e.key == e.record["user_id"]
    assert set(seen) == set(EVENT_TYPES)


def test_prepare_takes_the_first_users_and_the_first_listens():
    records = parsed_records()
    five = prepare(records, users=5)
    assert len({x.user_id for x in five}) == 5
    first = prepare(records, limit=100)
    assert len(first) == 100
    assert [x.occurred_at for x in first] == sorted(x.occurred_at for x in listens())[:100]
    assert len(prepare(records + records[:10])) == len(listens())  # equal event ids collapse


def test_a_later_round_is_new_plays_of_the_same_users_in_the_same_countries():
    sample = listens(50)
    r0 = list(simulate(sample, catalog(), 5))
    r1 = list(simulate(sample, catalog(), 5, round_=1))
    assert len([e for e in r1 if e.event_type == "PlaybackStarted"]) == len(sample)
    assert not {e.record["event_id"] for e in r0} & {e.record["event_id"] for e in r1}
    country = {e.key: e.record["country"] for e in r0 if e.event_type == "PlaybackSessionStarted"}
    assert all(country[e.key] == e.record["country"] for e in r1 if e.event_type == "PlaybackSessionStarted")


def test_draws_are_uniform_numbers_in_the_unit_interval():
    values = [u for i in range(2_000) for u in player.draws(f"x|{i}")]
    assert all(0.0 <= u < 1.0 for u in values)
    assert 0.48 < sum(values) / len(values) < 0.52
    assert player.draws("a") == player.draws("a") != player.draws("b")


def test_gap_must_be_positive():
    with pytest.raises(ConfigError, match="gap_ms"):
        simulate(listens(5), catalog(), gap_ms=0)
