"""Both sagas from the command line and from events on the topics: `backbeat sagas run` as a
process, `backbeat sagas start` publishing start events, `list`/`show` reading the result, and
bad start events dead-lettered with their reason."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from typing import Any

from events.cloudevents import header_value
from events.producer import EventProducer
from infra.settings import Settings
from sagas.runner import DLQ_TOPIC
from sagas.saga import saga_id_for
from tests.conftest import env_for, wait_for
from tests.streams.workers import TopicReader


def backbeat(settings: Settings, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "infra.cli", *args], env={**env_for(settings), "COLUMNS": "200"},
        capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip


def test_sagas_start_from_the_cli_and_from_the_topics(private_stack: Settings) -> None:
    settings = private_stack
    run = subprocess.Popen(
        [sys.executable, "-m", "infra.cli", "sagas", "run", "--step-timeout-ms", "5000"],
        env=env_for(settings), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        # from the CLI: publishes SubscriptionRequested, waits for the end, shows the saga
        done = backbeat(settings, "sagas", "start", "subscription", "--id", "sub-cli-1", "--plan", "FAMILY",
                        "--wait", "90")  # fmt: skip
        assert done.returncode == 0, done.stdout + done.stderr
        assert "state COMPLETED" in done.stdout
        assert "SubscriptionActivated" in done.stdout  # the history names what it sent
        done = backbeat(settings, "sagas", "start", "order", "--id", "order-cli-1", "--line", "sku-001:2:2500",
                        "--wait", "90")  # fmt: skip
        assert done.returncode == 0, done.stdout + done.stderr
        assert "state COMPLETED" in done.stdout
        # from the topic: any producer's OrderPlaced starts a saga
        producer = EventProducer(settings)
        order: dict[str, Any] = {
            "event_id": "placed-topic-1", "order_id": "order-topic-1", "user_id": "user-7",
            "occurred_at": 1_795_000_000_000, "lines": [{"sku": "sku-002", "quantity": 1, "unit_price_minor": 4000}],
            "total_minor": 4000, "currency": "EUR", "payment_method_id": "pm-7", "shipping_country": "DE",
        }  # fmt: skip
        bad = {**order, "event_id": "placed-bad", "order_id": "order-bad", "total_minor": 1}
        producer.send_many("orders.orders", "OrderPlaced", [order, bad], key_field="order_id",
                           time_field="occurred_at", source="/tests")  # fmt: skip
        producer.produce_raw("orders.orders", [b"\x00garbage"], [b"order-garbage"])
        producer.flush()

        def ended() -> str | None:
            shown = backbeat(settings, "sagas", "show", "order-topic-1")
            return shown.stdout if "state COMPLETED" in shown.stdout else None

        wait_for(ended, timeout_s=90, what="the saga of the topic's OrderPlaced to complete")
        reader = TopicReader(settings, DLQ_TOPIC, 1)
        letters = wait_for(lambda: (lambda r: r if len(r) >= 2 else None)(reader.poll()), timeout_s=60,
                           what="two dead letters")  # fmt: skip
        reader.close()
        reasons = sorted(header_value(m.headers(), "dlq_reason") for m in letters)
        assert reasons == ["invalid", "undecodable"]
        invalid = next(m for m in letters if header_value(m.headers(), "dlq_reason") == "invalid")
        assert "total_minor" in (header_value(invalid.headers(), "dlq_error") or "")
        assert header_value(invalid.headers(), "dlq_topic") == "orders.orders"

        listed = backbeat(settings, "sagas", "list", "--json")
        rows = [json.loads(line) for line in listed.stdout.splitlines()]
        assert {r["business_id"]: r["state"] for r in rows} == {
            "sub-cli-1": "COMPLETED", "order-cli-1": "COMPLETED", "order-topic-1": "COMPLETED",
        }  # fmt: skip
        assert {r["saga_id"] for r in rows} == {
            str(saga_id_for("subscription", "sub-cli-1")), str(saga_id_for("order", "order-cli-1")),
            str(saga_id_for("order", "order-topic-1")),
        }  # fmt: skip
        missing = backbeat(settings, "sagas", "show", "nope")
        assert missing.returncode == 1 and "no saga 'nope'" in missing.stderr
    except AssertionError as exc:  # say what the orchestrator process printed meanwhile
        run.send_signal(signal.SIGTERM)
        out, _ = run.communicate(timeout=60)
        raise AssertionError(f"{exc}\n--- output of 'backbeat sagas run' ---\n{out}") from exc
    finally:
        if run.poll() is None:
            run.send_signal(signal.SIGTERM)
    out, _ = run.communicate(timeout=60)
    assert run.returncode == 0, out
    assert "stopping" in out
