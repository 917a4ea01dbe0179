"""The evaluation protocol and metrics: HR@k and MRR@k on hand-computed ranks, which positions are
predicted with which context, repeats and unseen targets, the bootstrap intervals, and on the
real 30Music file the item-to-item model beating most-popular."""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from personalisation.evaluation import (
    METHODS,
    EvaluationError,
    bootstrap_ci,
    collapse_repeats,
    evaluate,
    hit_rate,
    mean_reciprocal_rank,
    paired_difference_ci,
    prediction_cases,
    protocol_sequences,
    rank_of,
    run_evaluation,
)
from personalisation.sessions_data import Session, read_sessions, split_last_window
from tests.conftest import LISTENS_30MUSIC


class Fixed:
    """Recommends the same list for any context and records the contexts it was asked about."""

    def __init__(self, ranked: list[str]) -> None:
        self.ranked = ranked
        self.contexts: list[list[str]] = []

    def recommend(self, context: Sequence[str], n: int) -> list[str]:
        self.contexts.append(list(context))
        return self.ranked[:n]


def session(sid: str, items: str, start: int = 0, split: str = "w") -> Session:
    return Session(
        "u" + sid, sid, split, tuple(items), tuple(range(start, start + len(items))), ("x",) * len(items)
    )


def test_metrics_on_hand_computed_ranks():
    ranks = [1, 0, 2, 5]
    assert hit_rate(ranks) == 0.75
    assert mean_reciprocal_rank(ranks) == pytest.approx((1 + 0.5 + 0.2) / 4)
    assert hit_rate([]) == mean_reciprocal_rank([]) == 0.0
    assert rank_of(["a", "b", "c"], "c", 3) == 3
    assert rank_of(["a", "b", "c"], "c", 2) == 0  # outside the cutoff
    assert rank_of([], "c", 20) == 0


def test_positions_and_contexts_predicted():
    assert collapse_repeats(["a", "a", "b", "a", "a"]) == ["a", "b", "a"]
    assert list(prediction_cases(["a", "b", "c"])) == [(["a"], "b"), (["a", "b"], "c")]
    assert list(prediction_cases(["a"])) == []
    # [x, x] collapses to one play: no prediction, not counted
    assert protocol_sequences([["a", "a", "b", "c", "b"], ["x", "x"], []]) == [["a", "b", "c", "b"]]


def test_evaluate_counts_every_target_including_unseen_and_repeats():
    method = Fixed(["b", "c"])
    result = evaluate("fixed", method, [["a", "b", "c", "b"]], known={"a", "b"}, cutoff=20)
    assert method.contexts == [["a"], ["a", "b"], ["a", "b", "c"]]
    # targets b (rank 1), c (rank 2: unseen in training yet recommended), b (rank 1, also in context)
    assert (result.targets, result.sessions, result.unseen_targets) == (3, 1, 1)
    assert result.hr == 1.0 and result.mrr == pytest.approx((1 + 0.5 + 1) / 3)
    short = evaluate("fixed", Fixed(["b", "c"]), [["a", "b", "c", "b"]], known={"a", "b"}, cutoff=1)
    assert short.hr == pytest.approx(2 / 3) and short.mrr == pytest.approx(2 / 3)
    line = short.as_json()
    assert line["hr_at_1"] == pytest.approx(2 / 3, abs=1e-6) and line["method"] == "fixed"
    # one session: every resample is that session, so the interval is the point
    assert line["hr_at_1_ci"] == pytest.approx([2 / 3, 2 / 3], abs=1e-6)
    assert line["mrr_at_1_ci"] == pytest.approx([2 / 3, 2 / 3], abs=1e-6)


def test_bootstrap_resamples_sessions_not_targets():
    # session 1: 3 targets all hit; session 2: 1 target missed. A resample of n copies of
    # session 1 and 2 - n of session 2 gives 3n / (3n + (2 - n)): 0, 3/4 or 1
    lo, hi = bootstrap_ci([3, 0], [3, 1])
    assert (lo, hi) == (0.0, 1.0)
    assert bootstrap_ci([3, 0], [3, 1]) == (lo, hi)  # seeded
    lo, hi = bootstrap_ci([1, 0] * 200, [1, 1] * 200)  # 400 sessions, HR 0.5: about +-0.049
    assert 0.44 < lo < 0.47 and 0.53 < hi < 0.56
    assert bootstrap_ci([], []) == (0.0, 0.0)
    evaluated = evaluate("fixed", Fixed(["b"]), [["a", "b"], ["a", "c"]] * 50, known={"a", "b"})
    assert evaluated.hr == 0.5 and evaluated.hr_ci[0] < 0.5 < evaluated.hr_ci[1]
    assert evaluated.mrr_ci == evaluated.hr_ci  # rank 1 or miss: the same per-session sums
    assert evaluated.per_session == ((1, 1.0, 1), (0, 0.0, 1)) * 50


def test_paired_difference_resamples_both_methods_on_the_same_sessions():
    sessions = [["a", "b", "c"], ["a", "c"]] * 20
    better = evaluate("b-c", Fixed(["b", "c"]), sessions, known={"a", "b", "c"})
    worse = evaluate("c-b", Fixed(["c", "b"]), sessions, known={"a", "b", "c"})
    # per session 1: ranks (1, 2) vs (2, 1), same sum 1.5; session 2: rank 2 vs rank 1
    # MRR difference = 20 * (1.5 - 1.5 + 0.5 - 1) / 60 targets = -1/6
    diff, lo, hi = paired_difference_ci(better, worse, "mrr")
    assert diff == pytest.approx(-1 / 6) and lo <= diff <= hi < 0
    assert paired_difference_ci(better, worse, "hr") == (0.0, 0.0, 0.0)  # both always hit
    with pytest.raises(ValueError, match="same test sessions"):
        paired_difference_ci(better, evaluate("x", Fixed([]), sessions[:2], known=set()))


def test_run_evaluation_each_method_on_a_known_answer():
    # training: a -> b three times; c and d played most (5 each); test: a then b
    train = [session(str(i), "ab", start=i * 10) for i in range(3)]
    train += [session("8", "cdcdc", start=100), session("9", "dcdcd", start=200)]
    test = [session("t", "ab", start=1000)]
    results = {r.method: r for r in run_evaluation(train, test, cutoff=2)}
    assert list(results) == list(METHODS)
    assert {r.sessions for r in results.values()} == {1} and {r.targets for r in results.values()} == {1}
    # item-to-item: [b]; session-kNN: [a, b] (the context track scores too); most-popular: [c, d]
    assert results["item-to-item"].mrr == results["item-to-item-unweighted"].mrr == 1.0
    assert (results["session-knn"].hr, results["session-knn"].mrr) == (1.0, 0.5)
    assert (results["most-popular"].hr, results["most-popular"].mrr) == (0.0, 0.0)
    # SR: the rule a -> b (weight 3); V-SkNN, STAN, V-STAN: the three "ab" neighbours score a
    # before b (a tie for V-SkNN and V-STAN, broken by id; STAN weighs b by exp(-1 / 2.05))
    assert (results["sr"].hr, results["sr"].mrr) == (1.0, 1.0)
    for name in ("v-sknn", "stan", "v-stan"):
        assert (results[name].hr, results[name].mrr) == (1.0, 0.5), name
    excluded = {r.method: r for r in run_evaluation(train, test, cutoff=2, exclude_context=True)}
    assert excluded["session-knn"].mrr == 1.0 and excluded["most-popular"].mrr == 0.0


def test_run_evaluation_rejects_what_it_cannot_evaluate():
    train = [session("1", "ab")]
    with pytest.raises(EvaluationError, match="nothing to predict"):
        run_evaluation(train, [session("t", "aa")])
    with pytest.raises(EvaluationError, match="no sessions"):
        run_evaluation([], [session("t", "ab")])
    with pytest.raises(EvaluationError, match="unknown method"):
        run_evaluation(train, [session("t", "ab")], methods=["magic"])
    with pytest.raises(EvaluationError, match="at least 1"):
        run_evaluation(train, [session("t", "ab")], cutoff=0)


def test_model_beats_popularity_on_the_real_file():
    window = split_last_window(read_sessions(LISTENS_30MUSIC))
    assert window.test_window == "test3" and window.train_windows == ("test0", "test1", "test2")
    results = {
        r.method: r
        for r in run_evaluation(
            window.train, window.test, methods=["item-to-item", "item-to-item-unweighted", "most-popular"]
        )
    }
    model, unweighted, pop = (
        results["item-to-item"],
        results["item-to-item-unweighted"],
        results["most-popular"],
    )
    assert model.sessions > 1000 and 0 < model.unseen_targets < model.targets
    assert model.hr > 10 * pop.hr and model.mrr > 10 * pop.mrr
    # distance weighting is what ranks the true next track higher
    assert model.mrr > 1.2 * unweighted.mrr
