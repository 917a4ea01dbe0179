"""Hopping windows from panes (streams.windows) and the feature agents' configuration."""

from __future__ import annotations

import random

import pytest

from infra.errors import ConfigError
from streams.features_config import FeaturesConfig
from streams.windows import HoppingWindows, format_duration, parse_duration_ms, parse_windows

MIN = 60_000
W = HoppingWindows(60 * MIN, 5 * MIN, 10 * MIN)


def test_durations_parse_and_format() -> None:
    assert parse_duration_ms("5m") == 300_000 and parse_duration_ms("1d") == 86_400_000
    assert parse_duration_ms("250ms") == 250 and parse_duration_ms(" 2h ") == 7_200_000
    assert format_duration(300_000) == "5m" and format_duration(86_400_000) == "1d"
    for bad in ("5", "m", "-1h", "0s", "1w"):
        with pytest.raises(ConfigError):
            parse_duration_ms(bad)


def test_parse_windows_and_errors() -> None:
    assert [w.name for w in parse_windows("1h/5m, 1d/1h", 0)] == ["1h/5m", "1d/1h"]
    with pytest.raises(ConfigError, match="SIZE/STEP"):
        parse_windows("1h", 0)
    with pytest.raises(ConfigError, match="divide"):
        parse_windows("1h/7m", 0)


def test_windows_of_a_pane_are_the_windows_holding_it_by_brute_force() -> None:
    rng = random.Random(1)
    for _ in range(200):
        t = rng.randrange(10**12, 2 * 10**12)
        p = W.pane(t)
        starts = list(W.windows_of_pane(p))
        brute = [s for s in range(p - W.size_ms, p + W.step_ms, W.step_ms) if s <= t < s + W.size_ms]
        assert starts == brute and len(starts) == W.panes_per_window
        for s in starts:
            assert p in W.panes_of(s)


def test_lateness_is_decided_by_the_pane() -> None:
    p = 1_000 * W.step_ms
    assert not W.is_late(p + 1, p + W.step_ms + W.grace_ms - 1)
    assert W.is_late(p + 1, p + W.step_ms + W.grace_ms)
    # a window closes with its last pane; closing() reports each window once, oldest first
    assert W.closing([p], before=-1, after=p + W.step_ms + W.grace_ms) == [p - W.size_ms + W.step_ms]
    assert W.closing([p], before=-1, after=p + W.size_ms + W.grace_ms) == list(W.windows_of_pane(p))
    assert W.closing([p], before=p + W.size_ms + W.grace_ms, after=p * 2) == []
    assert W.pane_retired(p, W.window_closes_at(p)) and not W.pane_retired(p, W.window_closes_at(p) - 1)


def test_features_config_defaults_and_errors() -> None:
    c = FeaturesConfig.from_env({})
    assert [w.name for w in c.user_windows] == ["1h/5m", "1d/1h"] and c.track_windows == (0,)
    assert c.grace_ms == 10 * MIN and c.half_life_ms == 7 * 86_400_000 and c.track_min_plays == 2
    with pytest.raises(ConfigError, match="not among the user windows"):
        FeaturesConfig.from_env({"BACKBEAT_FEATURES_TRACK_WINDOWS": "2h/1h"})
    with pytest.raises(ConfigError, match="finest window first"):
        FeaturesConfig.from_env({"BACKBEAT_FEATURES_USER_WINDOWS": "1d/1h,1h/5m"})
    with pytest.raises(ConfigError, match="never close"):
        FeaturesConfig.from_env({"BACKBEAT_FEATURES_USER_WINDOWS": "3d/1d", "BACKBEAT_FEATURES_TRACK_WINDOWS": "3d/1d"})
    with pytest.raises(ConfigError, match="positive integer"):
        FeaturesConfig.from_env({"BACKBEAT_FEATURES_TRACK_MIN_PLAYS": "0"})
