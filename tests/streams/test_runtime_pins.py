"""The runtime's dependencies on Faust, mode, aiokafka and confluent-kafka
(:mod:`streams.runtime.pins`): the pinned versions, and each public part it relies on."""

from __future__ import annotations

import asyncio

import faust
from faust.app.base import BootStrategy

from infra import logs
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


def test_the_boot_strategy_leaves_out_fausts_web_server_even_when_the_cli_turns_it_on():
    class App(faust.App):
        BootStrategy = RuntimeBoot

    app = App("pins-web", web_enabled=True)  # what 'faust worker' without --without-web sets
    assert app.conf.web_enabled is True
    assert list(app.boot_strategy.web_server()) == []


def test_extra_services_start_in_registration_order_and_stop_in_reverse():
    events: list[str] = []

    class Recorder(faust.Service):
        def __init__(self, name: str) -> None:
            self.name = name
            super().__init__()

        async def on_start(self) -> None:
            events.append(f"start {self.name}")

        async def on_stop(self) -> None:
            events.append(f"stop {self.name}")

    class App(faust.App):
        BootStrategy = RuntimeBoot

    app = App("pins-order", web_enabled=False)
    for name in ("ops", "agent"):
        app.service(Recorder(name))

    async def run() -> None:
        await app.start()
        await app.stop()

    asyncio.run(run())
    assert events == ["start ops", "start agent", "stop agent", "stop ops"]


def test_the_worker_applies_the_apps_logging_config():
    from faust.worker import Worker

    config = logs.logging_config("WARNING", "json")
    app = faust.App("pins-logging", logging_config=config)
    assert app.conf.logging_config == config
    worker = Worker(app, loop=asyncio.new_event_loop())
    try:
        assert worker.logging_config is not None
        assert worker.logging_config["formatters"] == config["formatters"]
    finally:
        worker.loop.close()


def test_confluent_and_aiokafka_calls_keep_their_signatures():
    from aiokafka.partitioner import murmur2
    from confluent_kafka import Consumer

    # the value of this version's port of Kafka's murmur2 (a changed hash would move keys)
    assert murmur2(b"") == 275646681
    for name in ("consume", "subscribe", "assign", "pause", "resume", "seek", "commit", "close"):
        assert callable(getattr(Consumer, name)), name
    from faust.worker import Worker

    assert callable(Worker.execute_from_commandline)
