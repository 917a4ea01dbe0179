"""The runtime's dependencies on Faust, mode, aiokafka and confluent-kafka
(:mod:`streams.runtime.pins`): the pinned versions, and each public part it relies on."""

from __future__ import annotations

import faust
from faust.app.base import BootStrategy

from streams.runtime import pins
from streams.runtime.service import AgentService, RuntimeBoot


def test_the_installed_versions_are_the_ones_the_runtime_was_checked_with():
    assert pins.mismatches() == {}, (
        "a pinned dependency changed: re-check every item of streams/runtime/pins.py, then update PINNED"
    )


def test_the_boot_strategy_leaves_out_fausts_consumer_and_producer():
    class App(faust.App):
        BootStrategy = RuntimeBoot

    boot = App("pins-check").boot_strategy
    assert isinstance(boot, BootStrategy)
    assert list(boot.kafka_consumer()) == [] and list(boot.kafka_producer()) == []
    assert list(boot.tables()) == [] and list(boot.kafka_conductor()) == []


def test_app_service_takes_an_instance_and_the_service_hooks_exist():
    app = faust.App("pins-service")
    svc = faust.Service()
    assert app.service(svc) is svc
    for hook in ("on_start", "on_started", "on_stop", "add_future", "sleep", "crash"):
        assert callable(getattr(AgentService, hook)), hook


def test_confluent_and_aiokafka_calls_keep_their_signatures():
    from aiokafka.partitioner import murmur2
    from confluent_kafka import Consumer

    # the value of this version's port of Kafka's murmur2 (a changed hash would move keys)
    assert murmur2(b"") == 275646681
    for name in ("consume", "subscribe", "assign", "pause", "resume", "seek", "commit", "close"):
        assert callable(getattr(Consumer, name)), name
    from faust.worker import Worker

    assert callable(Worker.execute_from_commandline)
