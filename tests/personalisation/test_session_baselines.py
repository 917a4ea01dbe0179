"""SR, V-SkNN, STAN and V-STAN on tiny sessions whose scores are computed by hand here, from the
definitions of the session-rec framework (rules and their pruning, position weights, the vec and
cosine similarities, the three STAN decays, V-STAN's idf and position factors), asserting exact
scores and list order."""

from __future__ import annotations

import math

import pytest

from personalisation.session_baselines import STAN, VSKNN, SequentialRules

# oldest first: s1 .. s4
SESSIONS = [["a", "b", "c"], ["a", "d"], ["x", "y"], ["a", "b", "e"]]
DAY = 24 * 3600.0


def scores_of(method, context, **kw) -> dict[str, float]:
    s = method.scores(context, **kw)
    return {t: float(v) for t, v in zip(method.ids.tolist(), s, strict=True) if v > 0}


def test_sr_rules_weigh_one_over_distance_from_the_last_track_only():
    sr = SequentialRules().fit([["a", "b", "c"], ["a", "c"], ["b", "a"]])
    # a->b 1 (s1), a->c 1/2 (s1, two apart) + 1 (s2); b->c 1 (s1), b->a 1 (s3)
    assert scores_of(sr, ["a"]) == pytest.approx({"b": 1.0, "c": 1.5})
    assert sr.recommend(["a"], 5) == ["c", "b"]
    assert sr.recommend(["c", "b"], 5) == ["a", "c"]  # only b's rules; tie 1 = 1 by track id
    assert sr.recommend(["b", "a"], 5) == sr.recommend(["a"], 5)
    assert sr.recommend(["zzz"], 5) == [] and sr.recommend([], 5) == []
    assert sr.recommend(["a"], 1) == ["c"]


def test_sr_steps_pruning_and_repeats():
    one_step = SequentialRules(steps=1).fit([["a", "b", "c"], ["a", "c"]])
    assert scores_of(one_step, ["a"]) == pytest.approx({"b": 1.0, "c": 1.0})  # a->c two apart: gone
    pruned = SequentialRules(pruning=1).fit([["a", "b", "c"], ["a", "c"], ["b", "a"]])
    assert scores_of(pruned, ["a"]) == pytest.approx({"c": 1.5})
    assert scores_of(pruned, ["b"]) == pytest.approx({"a": 1.0})  # tie a = c = 1: smaller id kept
    # a non-consecutive repeat is a rule too: a->b 1, b->a 1, a->a 1/2
    rep = SequentialRules().fit([["a", "b", "a"]])
    assert scores_of(rep, ["a"]) == pytest.approx({"b": 1.0, "a": 0.5})
    with pytest.raises(ValueError):
        SequentialRules(steps=0)


def test_vsknn_vec_similarity_with_linear_position_weights_and_div_score():
    knn = VSKNN().fit(SESSIONS, [10, 20, 30, 40])
    # context [d, b], L = 2: weights d = 1/2, b = 2/2; 2 distinct tracks
    # sims: s1 (b) 1/2, s2 (d) (1/2)/2 = 1/4, s4 (b) 1/2; s3 shares nothing
    # step: s1, s4 contain b (position 2) -> 1; s2 contains only d (position 1) -> 2
    expected = {"a": 0.5 + 0.25 / 2 + 0.5, "b": 1.0, "c": 0.5, "e": 0.5, "d": 0.25 / 2}
    assert scores_of(knn, ["d", "b"]) == pytest.approx(expected)
    assert knn.recommend(["d", "b"], 10) == ["a", "b", "c", "e", "d"]
    # k = 2 drops s2 (the least similar); sample = 1 keeps the most recent candidate, s4
    assert VSKNN(k=2).fit(SESSIONS, [10, 20, 30, 40]).recommend(["d", "b"], 10) == ["a", "b", "c", "e"]
    assert scores_of(VSKNN(sample=1).fit(SESSIONS, [10, 20, 30, 40]), ["d", "b"]) == pytest.approx(
        {"a": 0.5, "b": 0.5, "e": 0.5}
    )


def test_vsknn_repeated_context_track_takes_its_last_position():
    knn = VSKNN().fit(SESSIONS, [10, 20, 30, 40])
    # context [a, b, a], L = 3: a -> 3/3 (last position), b -> 2/3; divided by 2 distinct tracks
    s1 = s4 = (1 + 2 / 3) / 2
    s2 = 1 / 2
    assert scores_of(knn, ["a", "b", "a"]) == pytest.approx(
        {"a": s1 + s2 + s4, "b": s1 + s4, "c": s1, "d": s2, "e": s4}
    )
    assert knn.recommend(["zzz"], 5) == []


def test_stan_three_decays_on_hand_computed_scores():
    ends = [0.0, 5 * DAY, 6 * DAY, 7 * DAY]
    stan = STAN(k=2).fit(SESSIONS, ends)
    # context [b, a], L = 2. λ1: w_b = exp((1 - 2) / 1.02), w_a = exp(0) = 1
    wb = math.exp(-1 / 1.02)
    norm = math.sqrt(wb**2 + 1)
    # cosine x recency exp(-(now - end) / 5 days), now = the latest training end (7 days):
    cos1 = (1 + wb) / (norm * math.sqrt(3))  # s1 = {a, b, c}
    cos2 = 1 / (norm * math.sqrt(2))  # s2 = {a, d}
    cos4 = (1 + wb) / (norm * math.sqrt(3))  # s4 = {a, b, e}
    sim1, sim2, sim4 = cos1 * math.exp(-7 / 5), cos2 * math.exp(-2 / 5), cos4
    assert cos1 > cos2 and sim2 > sim1  # recency drops s1 from the k = 2 neighbours
    rows, sims, _ = stan.neighbours(["b", "a"])
    assert sorted(sims.tolist()) == pytest.approx(sorted([sim2, sim4]))
    # λ3: i* = last position in the neighbour of a context track; s4 = [a, b, e]: i* = 2 (b);
    # s2 = [a, d]: i* = 1 (a); item weight exp(-|pos - i*| / 2.05)
    f1 = math.exp(-1 / 2.05)
    expected = {"a": sim4 * f1 + sim2, "b": sim4, "e": sim4 * f1, "d": sim2 * f1}
    assert scores_of(stan, ["b", "a"]) == pytest.approx(expected)
    assert stan.recommend(["b", "a"], 10) == ["a", "b", "e", "d"]
    # the reference time only scales all scores of a query: same list
    later = scores_of(stan, ["b", "a"], now=17 * DAY)
    assert later == pytest.approx({t: v * math.exp(-10 / 5) for t, v in expected.items()})


def test_vstan_adds_idf_and_the_position_of_the_shared_track():
    ends = [0.0, 5 * DAY, 6 * DAY, 7 * DAY]
    vstan = STAN(vstan=True).fit(SESSIONS, ends)
    # context [d, b], L = 2: w_d = exp(-1/1.02), w_b = 1
    wd = math.exp(-1 / 1.02)
    norm = math.sqrt(wd**2 + 1)
    sim1 = 1 / (norm * math.sqrt(3)) * math.exp(-7 / 5)  # s1 shares b
    sim2 = wd / (norm * math.sqrt(2)) * math.exp(-2 / 5)  # s2 shares d
    sim4 = 1 / (norm * math.sqrt(3))  # s4 shares b
    f = [math.exp(-d / 2.05) for d in range(3)]
    # idf over 4 training sessions: plays a 3, b 2, others 1; factor 1 + 5 * ln(4 / plays)
    idf = {t: 1 + 5 * math.log(4 / p) for t, p in {"a": 3, "b": 2, "c": 1, "d": 1, "e": 1}.items()}
    # λ_ipw: s1, s4 hold b (context position 2) -> exp(0); s2 holds only d (position 1) -> exp(-1/1.02)
    ipw2 = math.exp(-1 / 1.02)
    # i*: s1 = [a, b, c] -> 2; s2 = [a, d] -> 2; s4 = [a, b, e] -> 2
    expected = {
        "a": (sim1 * f[1] + sim2 * ipw2 * f[1] + sim4 * f[1]) * idf["a"],
        "b": (sim1 + sim4) * idf["b"],
        "c": sim1 * f[1] * idf["c"],
        "d": sim2 * ipw2 * idf["d"],
        "e": sim4 * f[1] * idf["e"],
    }
    assert scores_of(vstan, ["d", "b"]) == pytest.approx(expected)
    assert vstan.recommend(["d", "b"], 10) == sorted(expected, key=lambda t: (-expected[t], t))
    # plain STAN on the same context: no idf, no ipw
    stan = STAN().fit(SESSIONS, ends)
    plain = {"a": sim1 * f[1] + sim2 * f[1] + sim4 * f[1], "b": sim1 + sim4, "c": sim1 * f[1]}
    plain |= {"d": sim2, "e": sim4 * f[1]}
    assert scores_of(stan, ["d", "b"]) == pytest.approx(plain)
    assert stan.recommend(["zzz"], 5) == []
    with pytest.raises(ValueError):
        STAN(k=0)
