"""Pure tests of incremental session cutting, pair/play deltas and list assembly
(personalisation.streaming) against the batch-free reference (CooccurrenceModel.add_sessions)."""

from __future__ import annotations

import random

import numpy as np
import pytest

from events.importers.base import dedupe_and_order
from events.importers.listens import parse_30music
from personalisation.cooccurrence import CooccurrenceModel
from personalisation.streaming import (
    UserContext,
    advance,
    assemble,
    cut_sessions,
    most_played,
)
from tests.conftest import LISTENS_30MUSIC

MIN = 60_000
GAP = 30 * MIN


def fold(listens, batch_sizes, window=5, history=10):
    """Fold ``listens`` in batches of the given sizes; returns (pairs, plays, contexts)."""
    contexts: dict[str, UserContext] = {}
    pairs: dict[tuple[str, str], int] = {}
    plays: dict[str, int] = {}
    i = 0
    sizes = iter(batch_sizes)
    while i < len(listens):
        n = next(sizes)
        delta = advance(contexts, listens[i : i + n], gap_ms=GAP, window=window, history=history)
        for k, v in delta.pairs.items():
            pairs[k] = pairs.get(k, 0) + v
        for k, v in delta.plays.items():
            plays[k] = plays.get(k, 0) + v
        contexts = {**contexts, **delta.contexts}
        i += n
    return pairs, plays, contexts


def test_gap_rule_exactly_thirty_minutes_stays():
    listens = [("u", "a", 0), ("u", "b", GAP), ("u", "c", 2 * GAP + 1), ("v", "a", 5)]
    assert cut_sessions(listens, GAP) == [["a", "b"], ["c"], ["a"]]
    delta = advance({}, listens, gap_ms=GAP)
    assert dict(delta.pairs) == {("a", "b"): 1}
    assert delta.sessions_started == 3
    ctx = delta.contexts["u"]
    assert (ctx.first_ms, ctx.last_ms, ctx.session, ctx.recent, ctx.listens, ctx.sessions) == (
        0, 2 * GAP + 1, ("c",), ("a", "b", "c"), 3, 2,
    )  # fmt: skip


def test_pairs_window_repeats_and_canonical_order():
    # window 2: each listen pairs with the two before it in its session; a==a is no pair
    delta = advance({}, [("u", t, i) for i, t in enumerate("bacab")], gap_ms=GAP, window=2)
    # session_pairs("bacab", 2): (b,a) (b,c) (a,c) [a,a skipped] (c,a) (c,b) (a,b), stored a < b
    assert dict(delta.pairs) == {("a", "b"): 2, ("b", "c"): 2, ("a", "c"): 2}
    assert dict(delta.plays) == {"a": 2, "b": 2, "c": 1}
    assert delta.contexts["u"].session == ("a", "b")


def test_late_event_joins_open_session_and_keeps_latest_time():
    delta = advance({}, [("u", "a", 10 * MIN), ("u", "b", 0), ("u", "c", 10 * MIN + GAP)], gap_ms=GAP)
    # b is late (earlier than a) but arrives in the open session; c is within GAP of the latest (a)
    assert dict(delta.pairs) == {("a", "b"): 1, ("a", "c"): 1, ("b", "c"): 1}
    assert delta.contexts["u"].first_ms == 0
    assert delta.contexts["u"].last_ms == 10 * MIN + GAP


def test_bad_parameters():
    with pytest.raises(ValueError, match=">= 1"):
        advance({}, [], gap_ms=0)


@pytest.fixture(scope="module")
def real_listens() -> list[tuple[str, str, int]]:
    """The first 8,000 rows of the real 30Music file, in import order (event time)."""
    with LISTENS_30MUSIC.open("rb") as f:
        lines = [line for _, line in zip(range(8001), f, strict=False)]
    records, _ = dedupe_and_order(parse_30music(lines).records, "occurred_at")
    return [(r["user_id"], r["track_id"], r["occurred_at"]) for r in records]


def test_any_batching_equals_whole_sessions_on_real_data(real_listens):
    reference = CooccurrenceModel()
    reference.add_sessions(cut_sessions(real_listens, GAP))
    rng = random.Random(7)
    results = []
    for sizes in ([len(real_listens)], [1] * len(real_listens), [rng.randint(1, 900) for _ in range(10_000)]):
        pairs, plays, _ = fold(real_listens, sizes)
        a, b = zip(*pairs, strict=True)
        tracks = sorted(plays)
        model = CooccurrenceModel.from_counts(
            a,
            b,
            np.array([pairs[k] for k in pairs], float),
            tracks,
            np.array([plays[t] for t in tracks], float),
        )
        results.append((pairs, plays))
        # the same matrix, entry by entry, once rows/columns are put in the reference's order
        perm = np.array([model.index[t] for t in reference.items])
        assert model.counts.nnz == reference.counts.nnz > 1000
        assert (model.counts[perm][:, perm] != reference.counts).nnz == 0
        assert {t: model.plays[model.index[t]] for t in tracks} == {
            t: reference.plays[reference.index[t]] for t in reference.items
        }
    assert results[0] == results[1] == results[2]


def test_contexts_resume_like_one_batch(real_listens):
    _, _, one = fold(real_listens, [len(real_listens)])
    _, _, many = fold(real_listens, [333] * 1000)
    assert one == many
    assert sum(c.listens for c in one.values()) == len(real_listens)


def test_most_played_ties_by_id_whatever_the_order():
    items = ["d", "b", "a", "c", "e"]
    plays = np.array([1.0, 3.0, 3.0, 2.0, 1.0])
    assert most_played(items, plays, 3) == [("a", 0.3), ("b", 0.3), ("c", 0.2)]
    perm = [4, 2, 0, 3, 1]
    assert most_played([items[i] for i in perm], plays[perm], 4) == most_played(items, plays, 4)
    assert most_played([], np.zeros(0), 3) == []


def test_assemble_backfills_skips_history_and_repeats():
    primary = [("x", 0.9), ("h", 0.8), ("y", 0.5)]
    popular = [("y", 0.3), ("p", 0.2), ("h", 0.1), ("q", 0.05)]
    got = assemble(primary, popular, 4, exclude={"h"})
    assert [(i.track_id, i.source) for i in got] == [
        ("x", "cooccurrence"), ("y", "cooccurrence"), ("p", "popular"), ("q", "popular"),
    ]  # fmt: skip
    assert [i.track_id for i in assemble([], popular, 2)] == ["y", "p"]
