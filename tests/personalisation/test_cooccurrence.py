"""The co-occurrence model on tiny sessions with hand-computed counts and lists: pair definition,
distance weighting, the vectorised add_sessions against the pair generator, history decay,
exclusion and tie-breaking."""

from __future__ import annotations

import random

import numpy as np
import pytest

from personalisation.cooccurrence import (
    DECAY,
    CooccurrenceModel,
    session_pair_weights,
    session_pairs,
    top_n,
)


def dense(model: CooccurrenceModel) -> dict[tuple[str, str], float]:
    coo = model.counts.tocoo()
    return {(model.items[r], model.items[c]): v for r, c, v in zip(coo.row, coo.col, coo.data, strict=True)}


def test_session_pairs_are_distinct_tracks_within_the_window():
    assert list(session_pairs(["a", "b", "a", "c"], window=2)) == [
        ("a", "b"),
        ("b", "a"),
        ("b", "c"),
        ("a", "c"),
    ]
    # ("a", "a") two apart is not a pair
    assert list(session_pair_weights(["a", "b", "c"], window=5)) == [
        ("a", "b", 1.0),
        ("a", "c", 0.5),
        ("b", "c", 1.0),
    ]
    with pytest.raises(ValueError):
        list(session_pairs(["a"], window=0))


def test_unweighted_counts_and_cosine_list():
    model = CooccurrenceModel()
    model.add_sessions([["a", "b", "c"], ["a", "b"]])
    assert dense(model)[("a", "b")] == dense(model)[("b", "a")] == 2.0
    assert dense(model)[("a", "c")] == 1.0
    assert model.plays.tolist() == [2.0, 2.0, 1.0]
    # cosine: b = 2 / sqrt(2 * 2) = 1.0, c = 1 / sqrt(2 * 1)
    got = model.recommend(["a"])
    assert [t for t, _ in got] == ["b", "c"]
    assert [v for _, v in got] == pytest.approx([1.0, 1 / np.sqrt(2)])


def test_distance_weighted_counts_and_history_decay():
    model = CooccurrenceModel(distance_weighted=True)
    model.add_sessions([["a", "b", "c"]])
    assert dense(model) == {
        ("a", "b"): 1.0, ("b", "a"): 1.0, ("a", "c"): 0.5, ("c", "a"): 0.5, ("b", "c"): 1.0, ("c", "b"): 1.0,
    }  # fmt: skip
    got = model.recommend(["a"])
    assert [t for t, _ in got] == ["b", "c"] and [v for _, v in got] == pytest.approx([1.0, 0.5])
    # history [a, b]: b (most recent) weighs 1, a weighs DECAY
    expected = {"a": 1.0, "b": DECAY * 1.0, "c": 1.0 + DECAY * 0.5}
    got = dict(model.recommend(["a", "b"]))
    assert got == pytest.approx(expected)
    assert [t for t, _ in model.recommend(["a", "b"])] == ["c", "a", "b"]
    assert model.recommend(["a", "b"], exclude=["a", "b"]) == [("c", pytest.approx(1.25))]


def test_ties_are_broken_by_track_id_and_n_limits():
    model = CooccurrenceModel()
    model.add_sessions([["q", "z"], ["q", "m"], ["q", "b"]])
    assert [t for t, _ in model.recommend(["q"])] == ["b", "m", "z"]
    assert [t for t, _ in model.recommend(["q"], n=2)] == ["b", "m"]
    assert model.recommend(["unknown"]) == [] and model.recommend([]) == []


@pytest.mark.parametrize("weighted", [False, True])
def test_vectorised_add_sessions_equals_the_pair_generator(weighted):
    rng = random.Random(7)
    sessions = [[rng.choice("abcdefgh") for _ in range(rng.randint(0, 12))] for _ in range(200)]
    model = CooccurrenceModel(window=3, distance_weighted=weighted)
    model.add_sessions(sessions)
    a, b, w = [], [], []
    for s in sessions:
        for x, y, weight in session_pair_weights(s, 3):
            a.append(x), b.append(y), w.append(weight if weighted else 1.0)
    plays = [t for s in sessions for t in s]
    reference = CooccurrenceModel.from_counts(a, b, np.array(w), plays, np.ones(len(plays)), window=3)
    assert dense(model) == pytest.approx(dense(reference))
    assert dict(zip(model.items, model.plays, strict=True)) == dict(
        zip(reference.items, reference.plays, strict=True)
    )


def test_add_counts_grows_and_accumulates():
    model = CooccurrenceModel.from_counts(["a"], ["b"], np.array([2.0]), ["a", "b"], np.array([2.0, 2.0]))
    model.add_counts(["b"], ["c"], np.array([1.0]), ["c"], np.array([1.0]))
    assert model.counts.shape == (3, 3)
    assert dense(model)[("c", "b")] == 1.0 and dense(model)[("a", "b")] == 2.0
    assert [t for t, _ in model.recommend(["b"])] == ["a", "c"]  # 2/2 = 1.0 > 1/sqrt(2)


def test_top_n_keeps_positive_scores_best_first():
    ids = np.array(["d", "c", "b", "a"])
    assert top_n(np.array([1.0, 3.0, 1.0, 0.0]), ids, 2).tolist() == [1, 2]  # tie 1.0: "b" < "d"
    assert top_n(np.array([1.0, 3.0, 1.0, 0.0]), ids, 10).tolist() == [1, 2, 0]
    assert top_n(np.array([1.0]), np.array(["x"]), 0).tolist() == []
