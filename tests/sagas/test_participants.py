"""The three participants in one process on the real broker: commands in, correlated replies out,
a repeated command answered with the same reply and no second charge, garbage dead-lettered."""

from __future__ import annotations

import dataclasses
import json
import signal
import subprocess
import sys
import threading
import uuid
from pathlib import Path
from typing import Any

import pytest

from events.catalog import topic as declared
from events.cloudevents import ce_headers, header_value
from events.offsets import high_watermarks
from events.producer import EventProducer
from events.registry_client import registry_for
from events.schemas import get_schema
from infra.provision import apply_topics
from infra.settings import Settings
from sagas.gateway import GatewaySimulator, SimulatorConfig
from sagas.participants import ParticipantsConfig, run_participants
from sagas.runner import DLQ_TOPIC, RunStats
from tests.conftest import env_for, wait_for
from tests.sagas.feed import NOW_MS
from tests.streams.workers import TopicReader

COMMAND_TOPICS = (
    "billing.payment-gateway.commands",
    "platform.entitlements.commands",
    "orders.inventory.commands",
)
REPLY_TOPICS = ("billing.payments", "platform.entitlements", "orders.inventory", DLQ_TOPIC)


def command(event_type: str, saga: str, step: str, **fields: Any) -> dict[str, Any]:
    return {
        "event_id": str(uuid.uuid5(uuid.NAMESPACE_URL, f"{saga}/{step}")),
        "idempotency_key": f"{saga}:{step}",
        "correlation_id": saga,
        "causation_id": None,
        "issued_at": NOW_MS,
        "expires_at": None,
        **fields,
    }


def send(producer: EventProducer, topic: str, event_type: str, key: str, payload: dict[str, Any]) -> None:
    value = producer.encoder(topic, event_type).encode(payload)
    headers = ce_headers(
        event_id=payload["event_id"], event_type=get_schema(event_type).full_name, source="/tests",
        time_ms=NOW_MS, correlation_id=payload["correlation_id"], causation_id=payload["event_id"],
    )  # fmt: skip
    producer.produce_raw(topic, [value], [key.encode()], [NOW_MS], [headers])


@pytest.mark.integration
def test_participants_answer_over_kafka(stack: Settings, tmp_path: Path) -> None:
    settings = dataclasses.replace(stack, data_dir=tmp_path)
    apply_topics(settings, [declared(name) for name in (*COMMAND_TOPICS, *REPLY_TOPICS)])
    run = uuid.uuid4().hex[:8]
    saga, payment, user, order = f"saga-{run}", f"pay-{run}", f"user-{run}", f"order-{run}"
    config = ParticipantsConfig(
        simulator=SimulatorConfig(seed=1, decline=0.0, timeout=0.0, duplicate=0.0, fail_after_effect=0.0),
        initial_stock={"sku-1": 3},
        gateway_path=tmp_path / "gateway.sqlite",
    )
    stop = threading.Event()
    outcome: dict[str, Any] = {}

    def work() -> None:
        try:
            outcome["stats"] = run_participants(settings, config, stop)
        except BaseException as exc:  # surfaced by the assertions below
            outcome["error"] = exc

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    readers = {name: TopicReader(settings, name, declared(name).partitions) for name in REPLY_TOPICS}
    try:
        producer = EventProducer(settings)
        authorize = command(
            "AuthorizePayment", saga, "authorize", payment_id=payment, user_id=user, amount_minor=999,
            currency="EUR", payment_method_id="pm_1", order_id=order, subscription_id=None, description=None,
        )  # fmt: skip
        grant = command(
            "GrantEntitlement", saga, "grant", entitlement_id=f"ent-{run}", user_id=user, kind="PREMIUM",
            valid_until=None, subscription_id=None, order_id=order,
        )  # fmt: skip
        reserve = command(
            "ReserveInventory", saga, "reserve", reservation_id=f"res-{run}", order_id=order,
            lines=[{"sku": "sku-1", "quantity": 2}], hold_until=None,
        )  # fmt: skip
        send(producer, COMMAND_TOPICS[0], "AuthorizePayment", payment, authorize)
        send(producer, COMMAND_TOPICS[0], "AuthorizePayment", payment, authorize)  # the saga's retry
        send(producer, COMMAND_TOPICS[1], "GrantEntitlement", user, grant)
        send(producer, COMMAND_TOPICS[2], "ReserveInventory", order, reserve)
        garbage_key = f"garbage-{run}".encode()
        producer.produce_raw(COMMAND_TOPICS[2], [b"\x00not avro"], [garbage_key], [NOW_MS], [None])
        producer.flush()

        def mine() -> dict[str, list[Any]]:
            for reader in readers.values():
                reader.poll()
            found = {
                name: [
                    m for m in readers[name].records if header_value(m.headers(), "ce_correlationid") == saga
                ]
                for name in REPLY_TOPICS[:3]
            }
            found[DLQ_TOPIC] = [m for m in readers[DLQ_TOPIC].records if m.key() == garbage_key]
            return found

        def complete() -> dict[str, list[Any]] | None:
            if "error" in outcome:
                raise AssertionError(f"participants failed: {outcome['error']!r}")
            found = mine()
            counts = [len(found[name]) for name in REPLY_TOPICS]
            return found if counts == [2, 1, 1, 1] else None

        found: dict[str, list[Any]] = wait_for(complete, timeout_s=90, what="the participants' replies")  # type: ignore[assignment]
        stop.set()
        thread.join(timeout=60)
        assert not thread.is_alive() and "error" not in outcome

        # the command line on the same stores: starts, resumes at the tracked positions (nothing is
        # answered again), and stops cleanly on SIGTERM
        stock_file = tmp_path / "stock.json"
        stock_file.write_text(json.dumps(config.initial_stock))
        log_path = tmp_path / "participants.log"
        argv = [sys.executable, "-m", "sagas.participants", "--seed", "1", "--fail-after-effect", "0",
                "--stock-file", str(stock_file), "--gateway-db", str(config.gateway_file(settings))]  # fmt: skip
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env_for(settings))
        try:
            wait_for(lambda: b"participants ready" in log_path.read_bytes() or proc.poll() is not None,
                     timeout_s=60, what="participants ready")  # fmt: skip
            assert proc.poll() is None, log_path.read_text()
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=60) == 0, log_path.read_text()
        finally:
            if proc.poll() is None:
                proc.kill()
        text = log_path.read_text()
        assert all(
            f"{name} stats:" in text for name in ("PaymentService", "EntitlementService", "InventoryService")
        )
        for name in REPLY_TOPICS:  # read every reply topic to its end: still the same replies
            total = sum(high_watermarks(settings, name).values())
            wait_for(lambda n=name, t=total: len(readers[n].poll()) >= t, timeout_s=30, what=f"end of {name}")
        assert [len(v) for v in mine().values()] == [2, 1, 1, 1]
    finally:
        stop.set()
        thread.join(timeout=60)
        for reader in readers.values():
            reader.close()

    decoder = registry_for(settings.registry_url).decoder()
    commands = {"billing.payments": authorize, "platform.entitlements": grant, "orders.inventory": reserve}
    expected = {
        "billing.payments": ("backbeat.billing.PaymentAuthorized", "/sagas/payments", payment),
        "platform.entitlements": ("backbeat.platform.EntitlementGranted", "/sagas/entitlements", user),
        "orders.inventory": ("backbeat.orders.InventoryReserved", "/sagas/inventory", order),
    }
    for name, (event_type, source, key) in expected.items():
        for msg in found[name]:
            headers = msg.headers()
            assert header_value(headers, "ce_type") == event_type
            assert header_value(headers, "ce_source") == source
            assert header_value(headers, "ce_causationid") == commands[name]["event_id"]
            assert msg.key() == key.encode()
            reply = decoder.decode(msg.value())
            assert reply["correlation_id"] == saga and header_value(headers, "ce_id") == reply["event_id"]
    first, second = (decoder.decode(m.value()) for m in found["billing.payments"])
    assert first == second and first["amount_minor"] == 999 and first["order_id"] == order
    assert decoder.decode(found["orders.inventory"][0].value())["lines"] == [{"sku": "sku-1", "quantity": 2}]

    [dead] = found[DLQ_TOPIC]
    assert header_value(dead.headers(), "dlq_reason") == "undecodable"
    assert header_value(dead.headers(), "dlq_topic") == COMMAND_TOPICS[2]

    stats: dict[str, RunStats] = outcome["stats"]
    assert set(stats) == {"PaymentService", "EntitlementService", "InventoryService"}
    assert stats["InventoryService"].dead_lettered >= 1
    gateway = GatewaySimulator(config.gateway_file(settings), config.simulator)
    ops = [r for r in gateway.operations().to_pylist() if r["payment_id"] == payment]
    gateway.close()
    assert [(r["kind"], r["status"], r["saga_id"]) for r in ops] == [("authorize", "approved", saga)]
