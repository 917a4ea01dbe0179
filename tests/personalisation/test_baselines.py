"""Most-popular and session-kNN on tiny sessions with hand-computed answers: similarities,
the k nearest, the sample of most recent candidates, and ties."""

from __future__ import annotations

import math

import pytest

from personalisation.baselines import MostPopular, SessionKNN

# oldest first: s1 .. s4
SESSIONS = [["a", "b", "c"], ["a", "d"], ["x", "y"], ["a", "b", "e"]]
ENDS = [10.0, 20.0, 30.0, 40.0]


def test_most_popular_ranks_by_plays_then_id_and_ignores_context():
    pop = MostPopular().fit([["b", "a", "b"], ["c", "a"], ["d"]])
    assert pop.recommend([], 3) == ["a", "b", "c"]  # a=2, b=2 (tie by id), then c=1 < d=1
    assert pop.recommend(["zzz"], 10) == ["a", "b", "c", "d"]


def test_sknn_cosine_neighbours_and_scores():
    knn = SessionKNN().fit(SESSIONS, ENDS)
    rows, sims = knn.neighbours(["a", "b"])
    by_row = dict(zip(rows.tolist(), sims.tolist(), strict=True))
    # s1 and s4 share {a, b}: 2 / sqrt(2 * 3); s2 shares {a}: 1 / sqrt(2 * 2); s3 shares nothing
    assert by_row == pytest.approx({0: 2 / math.sqrt(6), 1: 0.5, 3: 2 / math.sqrt(6)})
    scores = dict(zip(knn.ids.tolist(), knn.scores(["a", "b"]).tolist(), strict=True))
    assert scores["a"] == pytest.approx(4 / math.sqrt(6) + 0.5)
    assert scores["d"] == pytest.approx(0.5) and scores["x"] == 0.0
    # c and e tie (one neighbour each, same similarity): track id order
    assert knn.recommend(["a", "b"], 10) == ["a", "b", "c", "e", "d"]


def test_sknn_k_keeps_the_most_similar_and_prefers_recent_on_ties():
    assert SessionKNN(k=2).fit(SESSIONS, ENDS).recommend(["a", "b"], 10) == ["a", "b", "c", "e"]
    # s1 and s4 are equally similar: k=1 keeps the more recent s4
    assert SessionKNN(k=1).fit(SESSIONS, ENDS).recommend(["a", "b"], 10) == ["a", "b", "e"]


def test_sknn_sample_takes_the_most_recent_candidates():
    # sample=2 of the candidates {s1, s2, s4}: s2 and s4
    assert SessionKNN(sample=2).fit(SESSIONS, ENDS).recommend(["a", "b"], 10) == ["a", "b", "e", "d"]
    # recency follows the end times, not the order given
    shuffled = SessionKNN(sample=1).fit(list(reversed(SESSIONS)), list(reversed(ENDS)))
    assert shuffled.recommend(["a", "b"], 10) == ["a", "b", "e"]


def test_sknn_unknown_context_gives_nothing_and_bad_parameters_fail():
    knn = SessionKNN().fit(SESSIONS)
    assert knn.recommend(["nope"], 5) == [] and knn.recommend([], 5) == []
    with pytest.raises(ValueError):
        SessionKNN(k=0)
    with pytest.raises(ValueError):
        SessionKNN().fit(SESSIONS, [1.0])
