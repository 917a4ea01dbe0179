"""Settings from BACKBEAT_* variables (pure)."""

from __future__ import annotations

from pathlib import Path

import pytest

from events.catalog import load_catalogue
from infra.errors import ConfigError
from infra.settings import Settings


def test_defaults_point_at_the_embedded_stack():
    s = Settings.from_env({})
    assert s.bootstrap_servers == "127.0.0.1:9092"
    assert s.registry_url == "http://127.0.0.1:8081"
    assert s.embedded is True
    assert s.data_dir == Path("var").resolve()
    assert s.consumer_conf("g")["session.timeout.ms"] == 6000


def test_real_cluster_keeps_kafka_defaults_and_sasl():
    s = Settings.from_env({
        "BACKBEAT_BOOTSTRAP_SERVERS": "kafka-1.prod:9092,kafka-2.prod:9092",
        "BACKBEAT_SECURITY_PROTOCOL": "SASL_SSL",
        "BACKBEAT_SASL_MECHANISM": "SCRAM-SHA-512",
        "BACKBEAT_SASL_USERNAME": "bb",
        "BACKBEAT_SASL_PASSWORD": "secret",
        "BACKBEAT_DATA_DIR": "/tmp/bbdata",
    })  # fmt: skip
    assert s.embedded is False
    conf = s.consumer_conf("g")
    assert "session.timeout.ms" not in conf
    assert conf["sasl.mechanism"] == "SCRAM-SHA-512" and conf["security.protocol"] == "SASL_SSL"
    assert s.duckdb_path == Path("/tmp/bbdata/backbeat.duckdb")


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"BACKBEAT_EMBEDDED": "maybe"}, "BACKBEAT_EMBEDDED"),
        ({"BACKBEAT_REGISTRY_URL": "127.0.0.1:8081"}, "http"),
        ({"BACKBEAT_SESSION_GAP_MS": "30m"}, "integer"),
        ({"BACKBEAT_PROJECTION_LINGER_MS": "0"}, "BACKBEAT_PROJECTION_LINGER_MS.*at least 1"),
    ],
)
def test_bad_values_name_the_variable(env, message):
    with pytest.raises(ConfigError, match=message):
        Settings.from_env(env)


def test_topic_catalogue_declares_the_skeleton_topics():
    topics = load_catalogue()
    for name in ("playback.listens", "playback.listens.dlq", "listening.sessions", "catalog.tracks"):
        assert name in topics
    assert topics["catalog.tracks"].cleanup_policy == "compact"
    assert topics["playback.listens"].configs() == {"cleanup.policy": "delete", "retention.ms": "-1"}


def test_projection_linger_reaches_child_processes():
    settings = Settings.from_env({"BACKBEAT_PROJECTION_LINGER_MS": "200"})
    assert settings.projection_linger_ms == 200 and Settings.from_env({}).projection_linger_ms == 500
    assert Settings.from_env(settings.to_env()).projection_linger_ms == 200
