"""The saga processes under the one lifecycle: ``/metrics`` and ``/health`` of the orchestrator and
the participants as real processes on a real broker, read with a real HTTP client; SIGTERM stops
them with status 0; JSON log lines carry the process name and the saga or record they concern."""

from __future__ import annotations

import dataclasses
import json
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from events.producer import EventProducer
from infra import ops
from infra.processes import free_port, stop
from infra.services import start_registry
from infra.settings import Settings
from sagas.saga import saga_id_for
from tests.conftest import env_for, settings_for, wait_for

pytestmark = pytest.mark.integration

ORCH, PART = "saga-orchestrator", "saga-participants"
PARTICIPANT_ARGS = ("--seed", "3", "--fail-after-effect", "0", "--capture-fail", "0")
NOW_MS = 1_795_000_000_000


@dataclasses.dataclass
class Proc:
    """A process started by a test: its ``/metrics`` base URL and its stderr file."""

    popen: subprocess.Popen[bytes]
    url: str
    stderr: Path

    def log(self) -> str:
        return self.stderr.read_text(errors="replace")


@contextmanager
def started(module: str, settings: Settings, tmp: Path, *args: str, **env: str) -> Iterator[Proc]:
    """``python -m module args`` with the settings' environment plus ``env`` and a free ops port;
    killed at the end if the test did not stop it."""
    port = free_port()
    name = module.rsplit(".", 1)[-1]
    err, out = tmp / f"{name}.stderr", tmp / f"{name}.stdout"
    full_env = {**env_for(settings), "BACKBEAT_OPS_PORT": str(port), **env}
    with open(err, "ab") as e, open(out, "ab") as o:
        popen = subprocess.Popen([sys.executable, "-m", module, *args], stdout=o, stderr=e, env=full_env)
    proc = Proc(popen, f"http://127.0.0.1:{port}", err)
    try:
        yield proc
    finally:
        if popen.poll() is None:
            popen.kill()
            popen.wait(timeout=30)


def get(url: str) -> tuple[int, bytes]:
    """(status, body) of ``GET url``; (0, b"") when nothing answers yet."""
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()
    except OSError:
        return 0, b""


def health(proc: Proc) -> tuple[int, dict[str, Any]]:
    status, body = get(f"{proc.url}/health")
    return status, (json.loads(body) if status else {})


def scrape(proc: Proc) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    """``{sample name: {sorted labels: value}}`` of ``GET /metrics`` (asserting it answers 200)."""
    status, body = get(f"{proc.url}/metrics")
    assert status == 200, (status, proc.log()[-3000:])
    out: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            out.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return out


def by(samples: dict[str, dict[Any, float]], name: str, label: str, **match: str) -> dict[str, float]:
    """``{value of label: sample value}`` of metric ``name`` restricted to labels ``match``."""
    found: dict[str, float] = {}
    for labels, value in samples.get(name, {}).items():
        d = dict(labels)
        if all(d.get(k) == v for k, v in match.items()):
            found[d[label]] = value
    return found


def saga_states(proc: Proc) -> dict[tuple[str, str], int]:
    samples = scrape(proc).get("backbeat_saga_states", {})
    return {(dict(k)["saga_type"], dict(k)["state"]): int(v) for k, v in samples.items()}


def subscription(sub: str) -> dict[str, Any]:
    return {
        "event_id": f"{sub}-requested", "subscription_id": sub, "user_id": f"user-{sub}", "occurred_at": NOW_MS,
        "plan": "INDIVIDUAL", "billing_period": "MONTHLY", "price_minor": 999, "currency": "EUR",
        "country": "DE", "payment_method_id": f"pm-{sub}", "trial_days": 0,
    }  # fmt: skip


def order(order_id: str, total: int | None = None) -> dict[str, Any]:
    return {
        "event_id": f"{order_id}-placed", "order_id": order_id, "user_id": f"user-{order_id}",
        "occurred_at": NOW_MS, "lines": [{"sku": "sku-1", "quantity": 1, "unit_price_minor": 2500}],
        "total_minor": 2500 if total is None else total, "currency": "EUR", "payment_method_id": "pm-1",
        "shipping_country": "DE",
    }  # fmt: skip


def publish(settings: Settings, subscriptions: list[dict[str, Any]], orders: list[dict[str, Any]]) -> None:
    producer = EventProducer(settings)
    if subscriptions:
        producer.send_many("billing.subscriptions", "SubscriptionRequested", subscriptions,
                           key_field="subscription_id", time_field="occurred_at", source="/tests")  # fmt: skip
    if orders:
        producer.send_many("orders.orders", "OrderPlaced", orders, key_field="order_id",
                           time_field="occurred_at", source="/tests")  # fmt: skip
    producer.flush()


def terminate(proc: Proc) -> None:
    """SIGTERM, then the exit status must be 0."""
    proc.popen.send_signal(signal.SIGTERM)
    assert proc.popen.wait(timeout=90) == 0, proc.log()[-3000:]


def test_orchestrator_and_participants_metrics_and_health(private_stack: Settings, tmp_path: Path) -> None:
    settings = dataclasses.replace(private_stack, data_dir=tmp_path / "data")
    stock = tmp_path / "stock.json"
    stock.write_text(json.dumps({"sku-1": 100}))
    subs = [subscription(f"sub-ops-{i}") for i in range(4)]
    orders = [order(f"order-ops-{i}") for i in range(3)]
    publish(settings, subs, orders)  # a backlog the orchestrator must catch up with
    expected = {("subscription", "COMPLETED"): len(subs), ("order", "COMPLETED"): len(orders)}

    # the processes start with their registry unreachable: the orchestrator cannot decode its
    # backlog, so it waits (retries), and /health says 503 until the registry is there and it has
    # caught up. (The participants have nothing to read yet: they are ready at once.) One registry
    # serves both from then on: a registry does not follow _schemas after its start.
    late = settings_for(settings.data_dir / "late-registry", int(settings.bootstrap_servers.rsplit(":", 1)[1]),
                        free_port())  # fmt: skip
    settings = dataclasses.replace(settings, registry_url=late.registry_url)
    with (
        started("sagas.participants", settings, tmp_path, *PARTICIPANT_ARGS, "--stock-file", str(stock)) as part,
        started("sagas.orchestrator_main", settings, tmp_path, "--step-timeout-ms", "10000") as orch,
    ):  # fmt: skip
        wait_for(lambda: health(part)[0] == 200 or part.popen.poll() is not None, timeout_s=90,
                 what="participants /health 200")  # fmt: skip
        status, body = health(part)
        assert status == 200 and body["status"] == "ready" and body["process"] == PART, body
        assert "participants ready (caught up)" in part.log()

        def waiting() -> bool:
            assert orch.popen.poll() is None, orch.log()[-3000:]
            samples = scrape(orch) if health(orch)[0] else {}
            return by(samples, "backbeat_retries_total", "component").get(ORCH, 0) >= 1

        wait_for(waiting, timeout_s=90, what="the orchestrator to wait for the registry")
        status, body = health(orch)
        assert status == 503 and body["status"] == "starting", body
        assert body["components"][ORCH]["ready"] is False
        assert ops.read_address(settings.run_dir, ORCH) == orch.url  # how tools find the endpoint
        assert saga_states(orch) == {}  # nothing decoded, so no saga yet

        registry = start_registry(late)
        try:
            wait_for(lambda: health(orch)[0] == 200, timeout_s=90, what="orchestrator /health 200")
            assert health(orch)[1]["components"][ORCH]["ready"] is True
            wait_for(lambda: {k: v for k, v in saga_states(orch).items() if v} == expected, timeout_s=120,
                     what=f"sagas to end {expected}")  # fmt: skip
            states = saga_states(orch)
            assert sum(states.values()) == len(subs) + len(orders)
            assert states.get(("subscription", "RUNNING")) == 0 and states.get(("order", "RUNNING")) == 0

            # the start topics carry the start events and the sagas' own ends (SubscriptionActivated,
            # OrderConfirmed), which the orchestrator reads back and ignores
            def starts_read() -> dict[str, float] | None:
                rin = by(scrape(orch), "backbeat_records_in_total", "topic", component=ORCH)
                got = (rin.get("billing.subscriptions"), rin.get("orders.orders"))
                return rin if got == (2 * len(subs), 2 * len(orders)) else None

            rin: dict[str, float] = wait_for(starts_read, timeout_s=60, what="the start topics read")  # type: ignore[assignment]
            samples = scrape(orch)
            assert rin["billing.payments"] >= len(subs) + len(orders)  # authorised, captured
            assert rin["orders.inventory"] >= len(orders)
            rout = by(samples, "backbeat_records_out_total", "topic", component=ORCH)
            assert rout["billing.payment-gateway.commands"] >= 2 * (len(subs) + len(orders))
            assert rout["orders.inventory.commands"] >= len(orders)
            assert rout["billing.subscriptions"] == len(subs)  # SubscriptionActivated
            assert rout["orders.orders"] == len(orders)  # OrderConfirmed
            pos = by(
                samples, "backbeat_consumer_position", "partition", component=ORCH, topic="orders.orders"
            )
            assert sum(pos.values()) == 2 * len(orders)
            lag = by(samples, "backbeat_consumer_lag", "partition", component=ORCH, topic="orders.orders")
            assert lag and set(lag.values()) == {0.0}
            assert by(samples, "backbeat_ready", "component") == {ORCH: 1.0}
            assert by(samples, "backbeat_batch_duration_seconds_count", "component")[ORCH] >= 1

            psamples = scrape(part)
            pin = by(psamples, "backbeat_records_in_total", "topic", component=PART)
            assert pin["billing.payment-gateway.commands"] == rout["billing.payment-gateway.commands"]
            assert pin["orders.inventory.commands"] == rout["orders.inventory.commands"]
            pout = by(psamples, "backbeat_records_out_total", "topic", component=PART)
            assert pout["billing.payments"] == rin["billing.payments"]
            assert by(psamples, "backbeat_ready", "component") == {PART: 1.0}
            assert by(psamples, "backbeat_up", "process") == {PART: 1.0}

            # more sagas: records in grow while it runs
            publish(settings, [subscription("sub-ops-late")], [])
            wait_for(lambda: saga_states(orch).get(("subscription", "COMPLETED")) == len(subs) + 1,
                     timeout_s=90, what="the late saga to complete")  # fmt: skip
            wait_for(lambda: by(scrape(orch), "backbeat_records_in_total", "topic", component=ORCH)
                     ["billing.subscriptions"] == 2 * (len(subs) + 1), timeout_s=60, what="records in to grow")  # fmt: skip

            terminate(orch)
            assert "orchestrator stats:" in orch.log()
            assert ops.read_address(settings.run_dir, ORCH) is None  # removed on a clean stop
        finally:
            stop(registry)
        terminate(part)

    # a restart counts the sagas again from the event store (and is ready once caught up)
    settings = dataclasses.replace(settings, registry_url=private_stack.registry_url)
    with started("sagas.orchestrator_main", settings, tmp_path) as again:
        wait_for(lambda: health(again)[0] == 200 or again.popen.poll() is not None, timeout_s=90,
                 what="restarted orchestrator /health 200")  # fmt: skip
        assert health(again)[0] == 200, again.log()[-3000:]
        states = {k: v for k, v in saga_states(again).items() if v}
        assert states == {("subscription", "COMPLETED"): len(subs) + 1, ("order", "COMPLETED"): len(orders)}
        assert (
            by(scrape(again), "backbeat_records_in_total", "topic", component=ORCH) == {}
        )  # nothing new read
        terminate(again)


def test_json_logs_name_the_process_and_the_saga(private_stack: Settings, tmp_path: Path) -> None:
    settings = dataclasses.replace(private_stack, data_dir=tmp_path / "data")
    stock = tmp_path / "stock.json"
    stock.write_text(json.dumps({"sku-1": 10}))
    json_env = {"BACKBEAT_LOG_FORMAT": "json", "BACKBEAT_LOG_LEVEL": "DEBUG"}
    with (
        started("sagas.participants", settings, tmp_path, *PARTICIPANT_ARGS, "--stock-file", str(stock),
                **json_env) as part,
        started("sagas.orchestrator_main", settings, tmp_path, **json_env) as orch,
    ):  # fmt: skip
        for proc in (part, orch):
            wait_for(lambda p=proc: health(p)[0] == 200 or p.popen.poll() is not None, timeout_s=90,
                     what="/health 200")  # fmt: skip
            assert proc.popen.poll() is None, proc.log()[-3000:]
        publish(settings, [], [order("order-json-1"), order("order-json-bad", total=1)])
        wait_for(lambda: saga_states(orch).get(("order", "COMPLETED")) == 1, timeout_s=90,
                 what="the order saga to complete")  # fmt: skip
        wait_for(lambda: by(scrape(orch), "backbeat_dead_letters_total", "reason", component=ORCH) == {"invalid": 1},
                 timeout_s=30, what="the bad order dead-lettered")  # fmt: skip
        terminate(orch)
        terminate(part)

    for proc, process in ((orch, ORCH), (part, PART)):
        lines = proc.log().splitlines()
        assert lines, f"{process} logged nothing"
        records = []
        for line in lines:
            try:
                records.append(json.loads(line))
            except ValueError:
                pytest.fail(f"{process}: not a JSON line: {line!r}")
        assert all(r.get("process") == process for r in records), [
            r for r in records if r.get("process") != process
        ]
        assert all({"timestamp", "level", "event"} <= r.keys() for r in records)
    orch_records = [json.loads(line) for line in orch.log().splitlines()]
    saga = str(saga_id_for("order", "order-json-1"))
    ended = [r for r in orch_records if r.get("saga_id") == saga]
    assert ended and "COMPLETED" in ended[-1]["event"], ended
    [letter] = [r for r in orch_records if "dead-lettered" in r["event"]]
    assert letter["topic"] == "orders.orders" and letter["level"] == "warning"
    assert isinstance(letter["partition"], int) and isinstance(letter["offset"], int)
    part_records = [json.loads(line) for line in part.log().splitlines()]
    assert any(r["event"] == "participants ready (caught up)" for r in part_records)


def test_bad_options_exit_2(tmp_path: Path) -> None:
    env = env_for(settings_for(tmp_path, free_port(), free_port()))  # nothing listens: it must not matter
    for argv in (["sagas.participants", "--entitlement-fail", "2"], ["sagas.participants", "--ops-port", "nope"],
                 ["sagas.orchestrator_main", "--ops-port", "70000"]):  # fmt: skip
        done = subprocess.run(
            [sys.executable, "-m", *argv], env=env, capture_output=True, text=True, timeout=60
        )
        assert done.returncode == 2, (argv, done.stderr)
        assert done.stderr.strip(), argv
    for module in ("sagas.participants", "sagas.orchestrator_main"):  # a bad setting: its message, no traceback
        done = subprocess.run([sys.executable, "-m", module], env={**env, "BACKBEAT_EMBEDDED": "maybe"},
                              capture_output=True, text=True, timeout=60)  # fmt: skip
        assert done.returncode == 2 and "BACKBEAT_EMBEDDED='maybe'" in done.stderr, (module, done.stderr)
        assert "Traceback" not in done.stderr
