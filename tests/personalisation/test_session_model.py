"""The streaming recommender (:mod:`personalisation.session_model`): its state and scores computed
by hand on tiny streams, exact integer state whatever the interleaving, and the evaluation's
test-then-train run never letting a list see a listen at or after the one it predicts."""

from __future__ import annotations

import random

import pytest

from infra.resources import LISTENS_30MUSIC
from personalisation.evaluation import listen_stream, run_evaluation, streaming_cases
from personalisation.session_model import SessionModel, Weights
from personalisation.sessions_data import Session, read_sessions

MIN = 60_000


def test_state_of_one_session_by_hand():
    m = SessionModel()
    assert [m.observe("u1", t, i * MIN) for i, t in enumerate("abcb")] == [True] * 4
    u = m.unit  # 2520 = lcm(1..10)
    assert u == 2520
    assert m.rules["a"] == {"b": u + u // 3, "c": u // 2}  # a->b at d=1 and d=3
    assert m.rules["b"] == {"c": u}  # b->b (d=2) is a repeat, not a rule
    assert m.rules["c"] == {"b": u}
    assert m.near["a"] == {"b": u + u // 3, "c": u // 2}
    assert m.near["b"] == {"a": u + u // 3, "c": 2 * u}
    assert m.plays == {"a": 1, "b": 2, "c": 1}
    assert m.transitions["u1"] == {"a": {"b": 1}, "b": {"c": 1}, "c": {"b": 1}}
    assert m.session("u1") == ("a", "b", "c", "b")


def test_scores_by_hand():
    m = SessionModel()
    for i, t in enumerate("abc"):
        m.observe("u1", t, i * MIN)
    # context [a]: rules a -> {b: 1, c: 1/2}; co-occurrence (plays all 1) the same; u1's own
    # transitions from a: {b: 1}, weighted 0.5
    assert m.scores("u1", ["a"]) == pytest.approx({"b": 2.5, "c": 1.0})
    assert m.scores("u2", ["a"]) == pytest.approx({"b": 2.0, "c": 1.0})
    # context [a, b]: rules of b only {c: 1}; co-occurrence b (weight 1) + a (weight 1/2):
    #   a: 1 (from b); c: 1 (b) + 0.5 * 0.5 (a) = 1.25; b: 0.5 * 1 = 0.5; max 1.25
    assert m.scores("u2", ["a", "b"]) == pytest.approx({"c": 1 + 1, "a": 1 / 1.25, "b": 0.5 / 1.25})
    assert [t for t, _ in m.recommend("u2", ["a", "b"], 2)] == ["c", "a"]
    assert [t for t, _ in m.recommend("u2", ["a", "b"], 5, exclude=["c"])] == ["a", "b"]
    assert m.recommend("u2", ["zzz"]) == [] and m.recommend("u2", []) == []
    only_rules = SessionModel(weights=Weights(1.0, 0.0, 0.0))
    only_rules.observe_all(("u1", t, i * MIN) for i, t in enumerate("abc"))
    assert only_rules.scores("u1", ["a"]) == pytest.approx({"b": 1.0, "c": 0.5})


def test_artist_affinity_reranks_with_the_feature_stores_decay():
    week = 7 * 24 * 60 * MIN  # the half-life
    m = SessionModel(weights=Weights(rules=1.0, context=0.0, personal=0.0, artist=1.0))
    m.observe_all(
        [("v", "a", 0, "A"), ("v", "b", MIN, "B"), ("v", "a", 120 * MIN, "A"), ("v", "c", 121 * MIN, "C")]
    )
    assert m.scores("u", ["a"]) == pytest.approx({"b": 1.0, "c": 1.0})  # no affinity yet: a tie
    m.observe("u", "y", 0, "C")
    m.observe("u", "z", week, "B")  # one half-life later: B weighs 2, C 1 (relative to u's first)
    assert m.affinity["u"] == pytest.approx({"C": 1.0, "B": 2.0}) and m.affinity_ref["u"] == 0
    assert m.scores("u", ["a"]) == pytest.approx({"b": 1.0 + 1.0, "c": 1.0 + 0.5})
    assert [t for t, _ in m.recommend("u", ["a"])] == ["b", "c"]
    assert m.artist_of == {"a": "A", "b": "B", "c": "C", "y": "C", "z": "B"}
    # far later the stored values are rescaled to a new reference time; the ranking stays
    late = 70 * week
    m.observe("u", "y", late, "C")
    assert m.affinity_ref["u"] == late
    assert m.affinity["u"] == pytest.approx({"C": 1.0 + 2.0**-70, "B": 2.0**-69})
    assert [t for t, _ in m.recommend("u", ["a"])] == ["c", "b"]


def test_sessions_replays_and_late_listens():
    m = SessionModel()
    m.observe("u", "a", 0)
    assert m.observe("u", "a", MIN) is False  # a replay: collapsed
    m.observe("u", "b", 2 * MIN)
    assert m.plays == {"a": 1, "b": 1} and m.listens == 3
    m.observe("u", "c", 2 * MIN + 30 * MIN)  # exactly the gap: same session
    m.observe("u", "d", 2 * MIN + 60 * MIN + 1)  # more than the gap after c: a new session
    assert m.rules["b"] == {"c": m.unit}  # c was in b's session
    assert "d" not in m.rules.get("c", {}) and m.session("u") == ("d",)
    m.observe("u", "e", 0)  # late: joins the open session
    assert m.rules["d"] == {"e": m.unit}


def test_state_is_exact_whatever_the_interleaving_of_users():
    rng = random.Random(18)
    streams = {u: [(u, rng.choice("abcdefgh"), i * MIN) for i in range(40)] for u in ("u1", "u2", "u3")}
    one = SessionModel()
    for u in sorted(streams):
        one.observe_all(streams[u])
    mixed = SessionModel()
    queues = {u: list(s) for u, s in streams.items()}
    while any(queues.values()):
        u = rng.choice([k for k, q in queues.items() if q])
        mixed.observe(*queues[u].pop(0))
    assert (one.rules, one.near, one.plays, one.transitions) == (
        mixed.rules,
        mixed.near,
        mixed.plays,
        mixed.transitions,
    )


def test_bad_parameters_are_refused():
    for kw in ({"window": 11}, {"rule_steps": 0}, {"decay": 0.0}, {"gap_ms": 0}, {"history": 0}):
        with pytest.raises(ValueError):
            SessionModel(**kw)


@pytest.fixture(scope="module")
def windows() -> tuple[list[Session], list[Session]]:
    sessions = read_sessions(LISTENS_30MUSIC)
    train = [s for s in sessions if s.split == "test1"][:1500]
    test = [s for s in sessions if s.split == "test2"][:600]
    return train, test


def test_a_list_is_made_from_the_model_as_of_its_listen(windows):
    """The leakage test. For a sample of targets, an independent reference: a fresh model that
    observes ONLY the listens before the target's listen in the stream (training, then the test
    listens in event-time order), asked for the same context. The evaluation's rank must be the
    same; then every listen at or after a cut time is scrambled (other tracks, some dropped) and
    the ranks of all targets before the cut must not move."""
    train, test = windows
    cases = list(streaming_cases(SessionModel(), train, test))
    assert len(cases) > 2000
    stream = sorted(listen_stream(train, 0)) + sorted(listen_stream(test, 1))
    rng = random.Random(18)
    for case in rng.sample(cases, 25):
        ref = SessionModel()
        ref.observe_all((u, t, at, a) for at, tag, i, pos, u, t, a in stream if (at, tag, i, pos) < case.key)
        ranked = [k for k, _ in ref.recommend(case.user, case.context, 20)]
        assert case.rank == (ranked.index(case.target) + 1 if case.target in ranked else 0)
    assert sum(c.rank > 0 for c in cases) > 200  # not vacuous: many targets are hit

    cut = cases[len(cases) // 2].key[0] // 1000  # unix seconds
    pool = sorted({t for s in test for t in s.items})
    scrambled = []
    for s in test:
        idx = [k for k, t in enumerate(s.times) if t < cut or rng.random() < 0.8]
        scrambled.append(
            Session(
                s.user_id,
                s.session_id,
                s.split,
                tuple(s.items[k] if s.times[k] < cut else rng.choice(pool) for k in idx),
                tuple(s.times[k] for k in idx),
                tuple(s.artists[k] for k in idx),
            )
        )
    before = [(c.key, c.rank) for c in cases if c.key[0] < cut * 1000]
    again = [
        (c.key, c.rank) for c in streaming_cases(SessionModel(), train, scrambled) if c.key[0] < cut * 1000
    ]
    assert len(before) > 1000
    assert again == before


def test_streaming_in_the_protocol_pairs_with_the_batch_methods(windows):
    train, test = windows
    results = {
        r.method: r for r in run_evaluation(train, test, methods=("sr", "streaming", "streaming-frozen"))
    }
    a, b, c = results["sr"], results["streaming"], results["streaming-frozen"]
    assert a.targets == b.targets == c.targets and a.sessions == b.sessions
    assert [p[2] for p in a.per_session] == [p[2] for p in b.per_session]
    assert b.hr > c.hr  # learning from the test stream helps on real listens
