"""Pure tests of how a served list is put together (personalisation.streaming.assemble) and of the
most-played list the control arm serves (SessionModel.popular)."""

from __future__ import annotations

import random

from personalisation.session_model import POPULAR, SessionModel
from personalisation.streaming import assemble


def test_most_played_ties_by_id_whatever_the_order():
    m = SessionModel()
    m.plays = {"d": 1, "b": 3, "a": 3, "c": 2, "e": 1}
    m.rebuild_popular()
    assert m.popular(3) == [("a", 0.3), ("b", 0.3), ("c", 0.2)]
    other = SessionModel()
    other.plays = dict(reversed(list(m.plays.items())))
    other.rebuild_popular()
    assert other.popular(4) == m.popular(4)
    assert SessionModel().popular(3) == []


def test_most_played_kept_per_listen_equals_a_full_sort():
    rng = random.Random(18)
    m = SessionModel()
    tracks = [f"t{i:03d}" for i in range(300)]
    for k in range(6000):  # skewed, with many ties among the rarely played
        m.observe(f"u{k % 50}", tracks[min(int(rng.paretovariate(1.2)) - 1, 299)], k * 600_000)
        if k % 97 == 0:
            full = sorted(m.plays.items(), key=lambda kv: (-kv[1], kv[0]))[:POPULAR]
            assert [t for t, _ in m.popular()] == [t for t, _ in full], k
    assert m.popular(POPULAR + 5) == [(t, c / sum(m.plays.values())) for t, c in
                                      sorted(m.plays.items(), key=lambda kv: (-kv[1], kv[0]))[:POPULAR + 5]]  # fmt: skip


def test_assemble_backfills_skips_history_and_repeats():
    primary = [("x", 0.9), ("h", 0.8), ("y", 0.5)]
    popular = [("y", 0.3), ("p", 0.2), ("h", 0.1), ("q", 0.05)]
    got = assemble(primary, popular, 4, exclude={"h"})
    assert [(i.track_id, i.source) for i in got] == [
        ("x", "cooccurrence"), ("y", "cooccurrence"), ("p", "popular"), ("q", "popular"),
    ]  # fmt: skip
    assert [i.track_id for i in assemble([], popular, 2)] == ["y", "p"]
