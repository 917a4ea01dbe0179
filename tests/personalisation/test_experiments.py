"""Pure tests of deterministic A/B assignment (personalisation.experiments)."""

from __future__ import annotations

import hashlib
import math

import pytest

from infra.errors import ConfigError
from personalisation.experiments import (
    BUCKETS,
    MADE_FOR_YOU,
    Experiment,
    Variant,
    assign,
    assignment_event_id,
    bucket_of,
    shares,
)

USERS = [str(40_000 + i) for i in range(100_000)]


def test_bucket_is_the_documented_sha256_rule():
    digest = hashlib.sha256(b"made-for-you-v1|1|40265").digest()
    assert bucket_of("40265", "made-for-you-v1", 1) == int.from_bytes(digest[:8], "big") % 10_000
    assert all(0 <= bucket_of(u, "e", 1) < BUCKETS for u in USERS[:1000])


def test_assignment_is_deterministic_and_sticky():
    first = {u: assign(u, MADE_FOR_YOU) for u in USERS[:2000]}
    # a fresh, equal experiment object and another call order give the same variants
    again = Experiment("made-for-you-v1", 2, (Variant("control", 5000), Variant("streaming", 5000)))
    assert {u: assign(u, again) for u in reversed(USERS[:2000])} == first
    a = first["40007"]
    assert (a.experiment_id, a.version) == ("made-for-you-v1", 2)
    assert a.variant == ("control" if a.bucket < 5000 else "streaming")


def test_fifty_fifty_within_binomial_tolerance():
    # n users, p = 0.5: the control count has sd sqrt(n p (1-p)) = 158 for n = 100k. The hash is
    # deterministic, so this is not flaky; 5 sd (share 0.5 +- 0.0079) would flag a biased rule,
    # e.g. a modulo on too few hash bits or a variant order bug (share 0 or 1).
    got = shares({u: assign(u, MADE_FOR_YOU) for u in USERS})
    tol = 5 * math.sqrt(0.25 / len(USERS))
    assert set(got) == {"control", "streaming"}
    assert abs(got["control"] - 0.5) < tol, got


def test_uneven_weights_and_zero_weight_variant():
    exp = Experiment("e3", 1, (Variant("a", 2000), Variant("b", 0), Variant("c", 8000)))
    got = shares({u: assign(u, exp) for u in USERS})
    assert "b" not in got
    tol = 5 * math.sqrt(0.2 * 0.8 / len(USERS))
    assert abs(got["a"] - 0.2) < tol, got
    # bucket ranges follow declaration order: 0..1999 -> a, 2000..9999 -> c
    for u in USERS[:500]:
        a = assign(u, exp)
        assert a.variant == ("a" if a.bucket < 2000 else "c")


def test_experiments_are_independent():
    # the same users split in two experiments: the 2x2 table is near 25% per cell
    other = Experiment("other-exp", 1, MADE_FOR_YOU.variants)
    both = sum(
        assign(u, MADE_FOR_YOU).variant == "control" and assign(u, other).variant == "control"
        for u in USERS[:40_000]
    )
    tol = 5 * math.sqrt(0.25 * 0.75 / 40_000)
    assert abs(both / 40_000 - 0.25) < tol


def test_new_version_rerandomises_and_gets_new_event_ids():
    v2 = Experiment(MADE_FOR_YOU.experiment_id, MADE_FOR_YOU.version + 1, MADE_FOR_YOU.variants)
    moved = sum(assign(u, MADE_FOR_YOU).variant != assign(u, v2).variant for u in USERS[:20_000])
    # independent re-randomisation moves half of the users (sd 71 of 20k)
    assert abs(moved / 20_000 - 0.5) < 5 * math.sqrt(0.25 / 20_000)
    assert assignment_event_id("u1", MADE_FOR_YOU) == assignment_event_id("u1", MADE_FOR_YOU)
    assert assignment_event_id("u1", MADE_FOR_YOU) != assignment_event_id("u1", v2)
    assert assignment_event_id("u1", MADE_FOR_YOU) != assignment_event_id("u2", MADE_FOR_YOU)
    assert len(assignment_event_id("u1", MADE_FOR_YOU)) == 32


@pytest.mark.parametrize(
    ("variants", "message"),
    [
        ((), "no variants"),
        ((Variant("a", 5000), Variant("b", 4000)), "sum to 9000"),
        ((Variant("a", 5000), Variant("a", 5000)), "distinct"),
        ((Variant("a", 11000), Variant("b", -1000)), ">= 0"),
    ],
)
def test_invalid_experiments_are_refused(variants, message):
    with pytest.raises(ConfigError, match=message):
        Experiment("bad", 1, variants)


def test_made_for_you_declaration():
    assert MADE_FOR_YOU.weights == {"control": 5000, "streaming": 5000}
    assert MADE_FOR_YOU.variant("control").model == "most-popular-v1"
    assert MADE_FOR_YOU.variant("streaming").model == "session-seq-cooc-v3"
    with pytest.raises(ConfigError, match="no variant 'x'"):
        MADE_FOR_YOU.variant("x")
