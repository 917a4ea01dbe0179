"""The feature state machines against DuckDB GROUP BY ground truth (late events inside and
outside the grace period, duplicates, watermarks), and against themselves across simulated
crashes (checkpoint prefixes restored, source replayed from an earlier offset)."""

from __future__ import annotations

import math
import random
from collections import defaultdict

import numpy as np
import pytest
from scipy import stats

from streams import features_state
from streams.featuremath import BASELINE_FLOOR
from streams.track_features import TrackWindows
from streams.user_features import PartitionFeatures
from streams.windows import HoppingWindows
from tests.streams import feature_reference as ref

MIN = 60_000
HOUR = 60 * MIN
GAP = 30 * MIN
HALF_LIFE = 2 * HOUR
GRACE = 10 * MIN
SPECS = (HoppingWindows(HOUR, 5 * MIN, GRACE), HoppingWindows(4 * HOUR, HOUR, GRACE))
TRACK_SPECS = (0,)
BASELINE = 3
PARTITIONS = 3
T0 = 1_400_000_000_000 - 1_400_000_000_000 % (4 * HOUR)


def make_rows(seed: int, n: int = 1500) -> list[ref.Row]:
    """Listens of 24 users over ~10 h on 3 partitions, in arrival order per partition, with late
    listens (some within the grace period, some beyond it), re-sent duplicates and a mid-stream
    watermark; a final watermark closes everything."""
    rng = random.Random(seed)
    rows: list[ref.Row] = []
    offsets = [0] * PARTITIONS
    clock = [T0] * PARTITIONS
    sent: list[ref.Row] = []
    for k in range(n):
        user = f"u{rng.randrange(24)}"
        p = int(user[1:]) % PARTITIONS
        clock[p] += rng.randrange(0, 90_000) if rng.random() > 0.02 else rng.randrange(GAP, 3 * HOUR)
        t = clock[p]
        roll = rng.random()
        if roll < 0.06:
            t -= rng.randrange(1, 8 * MIN)  # late, mostly within the grace period
        elif roll < 0.09:
            t -= rng.randrange(15 * MIN, 50 * MIN)  # late beyond the grace period
        if roll > 0.97 and sent:
            old = rng.choice(sent)  # a re-sent duplicate (same id and time)
            if int(old.user_id[1:]) % PARTITIONS == p:
                row = ref.Row(p, offsets[p], old.t, old.user_id, old.track_id, old.artist_id, old.event_id)
                rows.append(row)
                offsets[p] += 1
                continue
        track = f"t{min(int(rng.expovariate(0.15)), 39)}"
        row = ref.Row(p, offsets[p], t, user, track, f"a{int(track[1:]) % 9}", f"e{k}")
        rows.append(row)
        sent.append(row)
        offsets[p] += 1
        if k == n // 2:
            rows.append(ref.Row(p, offsets[p], clock[p] + 20 * MIN, control=True))
            offsets[p] += 1
    end = max(clock) + 10 * HOUR
    for p in range(PARTITIONS):
        rows.append(ref.Row(p, offsets[p], end, control=True))
        offsets[p] += 1
    return rows


def listen(row: ref.Row) -> dict:
    return {
        "event_id": row.event_id,
        "user_id": row.user_id,
        "track_id": row.track_id,
        "artist_id": row.artist_id,
        "occurred_at": row.t,
    }


class Pipeline:
    """Both stages wired through an in-memory partials log, checkpointing like the agents; a
    crash keeps a prefix of the last batch's checkpoint records, then both stages restore from
    their changelogs and resume their inputs from their (lagging) committed positions."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.parts = {p: PartitionFeatures(p, SPECS, TRACK_SPECS, HALF_LIFE, GAP) for p in range(PARTITIONS)}
        self.tracks = TrackWindows(SPECS, PARTITIONS, BASELINE)
        self.changelog: dict[bytes, bytes | None] = {}  # the user-features table
        self.track_changelog: dict[bytes, bytes | None] = {}  # the track-features table
        self.users_out: dict[str, tuple] = {}
        self.tracks_out: dict[str, tuple] = {}
        self.partials_log: list[tuple] = []  # the partials topic (one partition)
        self.pos2 = 0
        self.committed2 = 0

    def feed(self, p: int, rows: list[ref.Row], crash_after: int | None = None) -> None:
        pf = self.parts[p]
        for row in rows:
            if row.control:
                pf.advance_watermark(row.t)
            else:
                pf.add(listen(row), row.offset)
        windows, partials = pf.advance()
        for w in windows:
            self._out(self.users_out, w.event_id, w)
        for partial in partials:
            self.partials_log.append(("partial", *features_state.encode_partial(partial)))
        self.partials_log.append(("mark", p, pf.watermark))
        records = [(self.changelog, r) for r in features_state.user_feature_records(pf, rows[-1].offset)]
        # the track stage consumes what is there
        for entry in self.partials_log[self.pos2 :]:
            if entry[0] == "mark":
                self.tracks.advance_watermark(entry[1], entry[2])
            else:
                self.tracks.add(features_state.decode_partial(entry[1], entry[2], {s.name: s for s in SPECS}))
        self.pos2 = len(self.partials_log)
        for f in self.tracks.advance():
            self._out(self.tracks_out, f.event_id, f)
        records += [(self.track_changelog, r) for r in features_state.track_feature_records(0, self.tracks)]
        if crash_after is not None:
            records = records[:crash_after]
        for table, (key, value) in records:
            table[key] = value
        if crash_after is None and self.rng.random() < 0.5:
            self.committed2 = self.pos2 - self.rng.randrange(0, 5)  # commits lag behind

    @staticmethod
    def _out(sink: dict, event_id: str, value: tuple) -> None:
        if event_id in sink:
            assert sink[event_id] == value, f"{event_id} emitted twice with different values"
        sink[event_id] = value

    def restore(self) -> None:
        items = list(self.changelog.items())
        self.parts = {
            p: features_state.restore_user_features(p, items, SPECS, TRACK_SPECS, HALF_LIFE, GAP)
            for p in range(PARTITIONS)
        }
        track_items = list(self.track_changelog.items())
        self.tracks = features_state.restore_track_features(0, track_items, SPECS, PARTITIONS, BASELINE)
        self.pos2 = max(0, self.committed2)


def run(rows: list[ref.Row], seed: int, crashes: int = 0) -> Pipeline:
    rng = random.Random(seed)
    by_p: dict[int, list[ref.Row]] = defaultdict(list)
    for row in rows:
        by_p[row.partition].append(row)
    pipe = Pipeline(random.Random(seed + 1000))
    pos = dict.fromkeys(by_p, 0)
    committed = dict.fromkeys(by_p, 0)
    crash_at = set(rng.sample(range(1, len(rows) // 40), crashes)) if crashes else set()
    step = 0
    while any(pos[p] < len(by_p[p]) for p in by_p):
        p = rng.choice([p for p in by_p if pos[p] < len(by_p[p])])
        batch = by_p[p][pos[p] : pos[p] + rng.randrange(1, 80)]
        step += 1
        if step in crash_at:
            pipe.feed(p, batch, crash_after=rng.randrange(0, 40))
            pipe.restore()  # the worker died: state from the changelog, sources from the commits
            pos = dict(committed)
            continue
        pipe.feed(p, batch)
        pos[p] += len(batch)
        if rng.random() < 0.5:
            committed[p] = pos[p] - rng.randrange(0, len(batch))  # commits lag behind
    return pipe


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_user_windows_equal_a_group_by(seed: int) -> None:
    rows = make_rows(seed)
    pipe = run(rows, seed)
    con = ref.connect(rows)
    late = sum(c.late for pf in pipe.parts.values() for c in pf.counters[:1])
    assert late > 0, "the data must hold late listens"
    for i, spec in enumerate(SPECS):
        truth = ref.user_windows(con, spec, GAP)
        got = {
            (w.user_id, w.window_start): (
                w.plays,
                w.distinct_artists,
                w.distinct_tracks,
                w.sessions,
                w.session_ms_max,
            )
            for w in pipe.users_out.values()
            if w.spec == spec
        }
        assert got == truth, f"window {spec.name}"
        assert len(truth) > 50
        del i


@pytest.mark.parametrize("seed", [1, 2])
def test_track_windows_and_trending_equal_a_group_by(seed: int) -> None:
    rows = make_rows(seed)
    pipe = run(rows, seed)
    truth = ref.track_windows(ref.connect(rows), SPECS[0], BASELINE)
    got = {(f.track_id, f.window_start): f for f in pipe.tracks_out.values()}
    assert set(got) == set(truth)
    for key, (plays, listeners, baseline_total) in truth.items():
        f = got[key]
        assert (f.plays, f.listeners) == (plays, listeners), key
        lam = max(baseline_total / BASELINE, BASELINE_FLOOR)
        assert f.baseline_plays_mean == pytest.approx(lam)
        expected = -stats.poisson.logsf(plays - 1, lam) / math.log(10)
        assert f.trending_score == pytest.approx(max(expected, 0.0))


def test_affinity_is_the_decayed_sum_of_earlier_listens() -> None:
    rows = make_rows(4)
    pipe = run(rows, 4)
    accepted = ref.affinity_listens(ref.connect(rows), SPECS[0])
    by_user: dict[str, list[tuple[int, str]]] = defaultdict(list)
    for user, t, artist in accepted:
        by_user[user].append((t, artist))
    checked = 0
    for w in pipe.users_out.values():
        end = w.window_start + w.spec.size_ms
        expected: dict[str, float] = defaultdict(float)
        for t, artist in by_user[w.user_id]:
            if t < end:
                expected[artist] += 2.0 ** (-(end - t) / HALF_LIFE)
        for artist, value in w.top_artists:
            assert value == pytest.approx(expected[artist], abs=5e-3), (w.user_id, end, artist)
            checked += 1
        best = max(expected.values(), default=0.0)
        if w.top_artists:
            assert w.top_artists[0][1] == pytest.approx(best, abs=5e-3)
    assert checked > 100


def test_counters_reconcile_per_window_spec() -> None:
    rows = make_rows(9)
    pipe = run(rows, 9)
    listens = sum(not r.control for r in rows)
    for i, spec in enumerate(SPECS):
        counters = [pf.counters[i] for pf in pipe.parts.values()]
        assert sum(c.listens for c in counters) == listens, spec.name
        assert sum(c.late for c in counters) > 0 and sum(c.duplicates for c in counters) > 0


@pytest.mark.parametrize("seed", [5, 6, 7, 8])
def test_crashes_and_replays_change_nothing(seed: int) -> None:
    rows = make_rows(seed)
    clean = run(rows, seed)
    crashed = run(rows, seed, crashes=6)
    assert crashed.users_out == clean.users_out
    assert crashed.tracks_out == clean.tracks_out


def test_trending_flags_a_burst() -> None:
    spec = SPECS[0]
    tw = TrackWindows((spec,), 1, baseline_windows=3)
    from streams.user_features import TrackPanePartial

    for h in range(3):  # one play an hour, then a burst of 12
        tw.add(TrackPanePartial("x", "a", spec, T0 + h * HOUR, 0, {"u": 1}))
    tw.add(TrackPanePartial("x", "a", spec, T0 + 3 * HOUR, 0, {f"u{i}": 1 for i in range(12)}))
    tw.advance_watermark(0, T0 + 10 * HOUR)
    out = {f.window_start: f for f in tw.advance()}
    burst = out[T0 + 3 * HOUR]
    assert burst.plays == 12 and burst.listeners == 12
    assert burst.baseline_plays_mean == pytest.approx(1.0)
    assert burst.trending_score > 5
    assert out[T0 + 2 * HOUR].trending_score < 1
    assert np.isfinite([f.trending_score for f in out.values()]).all()
