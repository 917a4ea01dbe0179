"""Pure tests of incremental session cutting, replay collapsing, 1/distance pair-weight and play
deltas and list assembly (personalisation.streaming) against the batch-free reference
(CooccurrenceModel(distance_weighted=True).add_sessions over whole collapsed sessions), and of the
served model being the offline evaluation's ``item-to-item``."""

from __future__ import annotations

import random

import numpy as np
import pytest

from events.importers.base import dedupe_and_order
from events.importers.listens import parse_30music
from infra.resources import open_data
from personalisation.cooccurrence import CooccurrenceModel
from personalisation.evaluation import ItemToItem, collapse_repeats, fit_method
from personalisation.sessions_data import Session
from personalisation.streaming import (
    UserContext,
    advance,
    assemble,
    cut_sessions,
    most_played,
    snap_weights,
    weight_unit,
)
from projections.recommendations import served_model
from tests.conftest import LISTENS_30MUSIC

MIN = 60_000
GAP = 30 * MIN


def fold(listens, batch_sizes, window=5, history=10):
    """Fold ``listens`` in batches of the given sizes, adding the batches' weights as the read
    model does (each sum rounded to the exact grid); returns (pairs, plays, contexts)."""
    contexts: dict[str, UserContext] = {}
    pairs: dict[tuple[str, str], float] = {}
    plays: dict[str, int] = {}
    i = 0
    sizes = iter(batch_sizes)
    while i < len(listens):
        n = next(sizes)
        delta = advance(contexts, listens[i : i + n], gap_ms=GAP, window=window, history=history)
        for k, v in delta.pairs.items():
            pairs[k] = float(snap_weights(np.array(pairs.get(k, 0.0) + v), window))
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


def test_pairs_window_weights_repeats_and_canonical_order():
    # window 2: each play pairs with the two before it in its session, weighing 1/distance;
    # a==a is no pair. session_pair_weights("bacab", 2): (b,a) 1, (b,c) 1/2, (a,c) 1,
    # [a,a skipped], (c,a) 1, (c,b) 1/2, (a,b) 1; stored a < b, summed
    delta = advance({}, [("u", t, i) for i, t in enumerate("bacab")], gap_ms=GAP, window=2)
    assert delta.pairs == {("a", "b"): 2.0, ("b", "c"): 1.0, ("a", "c"): 2.0}
    assert dict(delta.plays) == {"a": 2, "b": 2, "c": 1}
    assert delta.contexts["u"].session == ("a", "b")
    # window 5, one session "abcdef": a pairs with b..f at 1, 1/2, 1/3, 1/4, 1/5; a-f is 5 apart
    far = advance({}, [("u", t, i) for i, t in enumerate("abcdef")], gap_ms=GAP, window=5)
    assert [far.pairs[("a", t)] for t in "bcdef"] == [1.0, 0.5, 1 / 3, 0.25, 0.2]
    assert ("a", "g") not in advance({}, [("u", t, i) for i, t in enumerate("abcdefg")], gap_ms=GAP).pairs
    # a pair met at several distances sums exactly: b-a at 1, then a-b at 3 (1 + 1/3 = 4/3)
    again = advance({}, [("u", t, i) for i, t in enumerate("baxyb")], gap_ms=GAP, window=5)
    assert again.pairs[("a", "b")] == 4 / 3


def test_replays_are_collapsed_like_the_evaluation():
    # a a b a a c: the evaluation trains on "a b a c" (collapse_repeats); replays extend the
    # session in time and count as listens, but add no play, pair or history entry
    tracks = "aabaac"
    listens = [("u", t, i * MIN) for i, t in enumerate(tracks)]
    assert collapse_repeats(list(tracks)) == list("abac")
    delta = advance({}, listens, gap_ms=GAP)
    # a-b: 1 (a,b) + 1 (b,a) = 2; a-c: 1/3 + 1 = 4/3; b-c: 1/2
    assert delta.pairs == {("a", "b"): 2.0, ("a", "c"): 4 / 3, ("b", "c"): 0.5}
    assert dict(delta.plays) == {"a": 2, "b": 1, "c": 1}
    assert (delta.listens, delta.replays) == (6, 2)
    ctx = delta.contexts["u"]
    assert (ctx.session, ctx.recent, ctx.listens) == (tuple("abac"), tuple("abac"), 6)
    # the same split across batches, the replay first in its batch: the same result
    pairs, plays, contexts = fold(listens, [2, 1, 1, 2])
    assert (pairs, plays, contexts) == (delta.pairs, dict(delta.plays), delta.contexts)
    # a repeat after the gap opens a new session: a play, not a replay
    later = advance({}, [("u", "a", 0), ("u", "a", GAP + 1)], gap_ms=GAP)
    assert (dict(later.plays), later.replays, later.pairs) == ({"a": 2}, 0, {})


def test_late_event_joins_open_session_and_keeps_latest_time():
    delta = advance({}, [("u", "a", 10 * MIN), ("u", "b", 0), ("u", "c", 10 * MIN + GAP)], gap_ms=GAP)
    # b is late (earlier than a) but arrives in the open session; c is within GAP of the latest (a);
    # distances follow arrival order: a-c are 2 apart
    assert delta.pairs == {("a", "b"): 1.0, ("a", "c"): 0.5, ("b", "c"): 1.0}
    assert delta.contexts["u"].first_ms == 0
    assert delta.contexts["u"].last_ms == 10 * MIN + GAP


def test_bad_parameters():
    with pytest.raises(ValueError, match=">= 1"):
        advance({}, [], gap_ms=0)
    with pytest.raises(ValueError, match="between 1 and 10"):
        advance({}, [], window=11)


def test_weight_grid_is_exact_whatever_the_order():
    assert (weight_unit(1), weight_unit(5), weight_unit(10)) == (1, 60, 2520)
    rng = random.Random(3)
    terms = [1 / rng.randint(1, 5) for _ in range(5000)]
    exact = sum(round(t * 60) for t in terms) / 60  # integer sum, one division
    orders = []
    for _ in range(3):
        rng.shuffle(terms)
        total = 0.0
        for t in terms:
            total = float(snap_weights(np.array(total + t), 5))
        orders.append(total)
    assert orders == [exact] * 3
    plain = [sum(rng.sample(terms, len(terms))) for _ in range(5)]
    assert len(set(plain)) > 1  # unrounded float sums do depend on the order


@pytest.fixture(scope="module")
def real_listens() -> list[tuple[str, str, int]]:
    """The first 8,000 rows of the real 30Music file, in import order (event time)."""
    with open_data(LISTENS_30MUSIC) as f:
        lines = [line for _, line in zip(range(8001), f, strict=False)]
    records, _ = dedupe_and_order(parse_30music(lines).records, "occurred_at")
    return [(r["user_id"], r["track_id"], r["occurred_at"]) for r in records]


def model_of(pairs: dict[tuple[str, str], float], plays: dict[str, int]) -> CooccurrenceModel:
    """The served model (projections.recommendations.served_model) from folded sums."""
    a, b = zip(*pairs, strict=True)
    tracks = sorted(plays)
    return served_model(
        a, b, np.array([pairs[k] for k in pairs], float), tracks, np.array([plays[t] for t in tracks], float)
    )


def aligned(model: CooccurrenceModel, reference: CooccurrenceModel):
    """``model``'s matrix with rows/columns in ``reference``'s track order (same track set)."""
    assert sorted(model.items) == sorted(reference.items)
    perm = np.array([model.index[t] for t in reference.items])
    return model.counts[perm][:, perm].tocsr()


def test_any_batching_equals_whole_sessions_on_real_data(real_listens):
    sessions = [collapse_repeats(s) for s in cut_sessions(real_listens, GAP)]
    reference = CooccurrenceModel(distance_weighted=True)
    reference.add_sessions(sessions)
    unweighted = CooccurrenceModel()
    unweighted.add_sessions(sessions)
    rng = random.Random(7)
    results = []
    for sizes in ([len(real_listens)], [1] * len(real_listens), [rng.randint(1, 900) for _ in range(10_000)]):
        pairs, plays, _ = fold(real_listens, sizes)
        model = model_of(pairs, plays)
        results.append((pairs, plays))
        # the same matrix, entry by entry, once rows/columns are put in the reference's order:
        # same pattern, values equal to add_sessions' float sums to 1e-12 and, once those are
        # rounded to the same exact 1/60 grid, equal bit for bit
        got = aligned(model, reference)
        assert got.nnz == reference.counts.nnz > 1000
        assert (abs(got - reference.counts) > 1e-12 * abs(reference.counts)).nnz == 0
        assert (got != snap(reference.counts)).nnz == 0
        assert {t: model.plays[model.index[t]] for t in plays} == {
            t: reference.plays[reference.index[t]] for t in reference.items
        }
        # the weights are really 1/distance: plain counts (the unweighted model) differ
        assert (abs(got - aligned(unweighted, reference)) > 0.1).nnz > 0.3 * got.nnz
    # any batching: bit-identical sums and plays
    assert results[0] == results[1] == results[2]
    assert any(v != round(v) for v in results[0][0].values())  # fractional weights occur
    assert sum(len(s) for s in sessions) < len(real_listens)  # the data has replays to collapse


def snap(m):
    """A sparse matrix with its values rounded to the 1/60 grid (window 5)."""
    out = m.copy()
    out.data = snap_weights(out.data, 5)
    return out


def test_served_model_is_the_evaluations_item_to_item(real_listens):
    # the same sessions to both: what `backbeat evaluate recommendations` trains as
    # "item-to-item", and what the read model serves after folding the listens in batches
    cut = cut_sessions(real_listens, GAP)
    train = [
        Session("u", str(i), "w", tuple(s), tuple(range(len(s))), ("x",) * len(s)) for i, s in enumerate(cut)
    ]
    evaluated = fit_method("item-to-item", train)
    assert isinstance(evaluated, ItemToItem)
    reference = evaluated.model
    pairs, plays, contexts = fold(real_listens, [random.Random(5).randint(1, 700) for _ in range(10_000)])
    served = model_of(pairs, plays)
    # the configuration: window, pair weighting
    assert (served.window, served.distance_weighted) == (reference.window, reference.distance_weighted)
    assert (served.window, served.distance_weighted) == (5, True)
    # the trained data: plays (replays collapsed as in the evaluation) and pair weights
    assert {t: served.plays[served.index[t]] for t in plays} == {
        t: reference.plays[reference.index[t]] for t in reference.items
    }
    got = aligned(served, reference)
    assert (abs(got - reference.counts) > 1e-12 * abs(reference.counts)).nnz == 0
    # the lists (history decay included), for the recent plays of 60 users and for session prefixes
    # the evaluation asks about; scores to float tolerance
    histories = [list(c.recent) for _, c in sorted(contexts.items())[:60]]
    histories += [s[: i + 1] for s in cut[:40] for i in range(0, min(len(s), 12), 3)]
    compared = 0
    for history in histories:
        mine = served.recommend(history, 20)
        theirs = reference.recommend(history, 20)
        assert [t for t, _ in mine] == evaluated.recommend(history, 20) == [t for t, _ in theirs], history
        assert [s for _, s in mine] == pytest.approx([s for _, s in theirs], rel=1e-12)
        compared += len(mine)
    assert compared > 1000
    # and they are not the unweighted model's lists
    plain = fit_method("item-to-item-unweighted", train)
    assert sum(plain.recommend(h, 20) != evaluated.recommend(h, 20) for h in histories) > len(histories) / 4


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
