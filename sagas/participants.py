"""Run the three saga participants (payments + gateway simulator, entitlements, inventory) in one
OS process, each with its own :class:`~sagas.runner.ProcessRunner` in its own thread.

An eventsourcing application is used by one thread only, so each thread builds its own
application (and runner); only the gateway simulator, which has its own lock, is shared.

Command line (the saga fault run starts it as a subprocess; SIGTERM/SIGINT stop it cleanly)::

    python -m sagas.participants --seed 7 --decline 0.1 --timeout 0.05 --duplicate 0.05 \\
        --fail-after-effect 0.02 --capture-fail 0.02 --entitlement-fail 0.05 --stock-file stock.json

``stock.json`` maps SKU → units (``{"sku-1": 100}``). Settings come from ``BACKBEAT_*`` variables.
The process runs under the one lifecycle (:func:`infra.lifecycle.run_process`, process name
``saga-participants``): ``/metrics`` and ``/health`` on ``--ops-port`` / ``BACKBEAT_OPS_PORT``
(default 9464), the metrics component ``saga-participants`` summing the three runners (records
in by command topic, replies out by topic, dead letters by reason, registry waits), ready once
all three have caught up. Exit status 0, 1 when a participant failed, 2 for bad options.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from events.offsets import high_watermarks
from infra import metrics
from infra.errors import ConfigError
from infra.lifecycle import LoopService, run_process
from infra.logs import setup_logging
from infra.ops import add_port_argument, port_setting
from infra.settings import Settings
from sagas.entitlements import EntitlementService
from sagas.eventstore import eventstore_env, open_application
from sagas.gateway import GatewaySimulator, SimulatorConfig
from sagas.inventory import InventoryService
from sagas.payments import PaymentService
from sagas.process import KafkaProcess
from sagas.runner import ProcessRunner, RunStats

log = logging.getLogger("backbeat.sagas.participants")

#: Process name (``infra.ops.DEFAULT_PORTS``) and metrics component name.
PROCESS = COMPONENT = "saga-participants"


@dataclass(frozen=True)
class ParticipantsConfig:
    """What the participants simulate: the gateway's faults (``simulator``), the rate of
    entitlement grant failures (``entitlement_fail``, 0..1) and their ``seed``, the stock
    (SKU → units) and the gateway's SQLite file (default ``<data_dir>/gateway/gateway.sqlite``)."""

    simulator: SimulatorConfig = field(
        default_factory=lambda: SimulatorConfig(seed=0, decline=0.0, timeout=0.0, duplicate=0.0)
    )
    entitlement_fail: float = 0.0
    seed: int = 0
    initial_stock: dict[str, int] = field(default_factory=dict)
    gateway_path: Path | None = None

    def gateway_file(self, settings: Settings) -> Path:
        """The gateway simulator's SQLite file."""
        return self.gateway_path or settings.data_dir / "gateway" / "gateway.sqlite"


def _factories(
    settings: Settings, config: ParticipantsConfig, gateway: GatewaySimulator
) -> list[Callable[[], KafkaProcess]]:
    def payments() -> KafkaProcess:
        return PaymentService(env=eventstore_env(settings, PaymentService.name), gateway=gateway)

    def entitlements() -> KafkaProcess:
        return EntitlementService(
            env=eventstore_env(settings, EntitlementService.name),
            fail_rate=config.entitlement_fail,
            seed=config.seed,
        )

    def inventory() -> KafkaProcess:
        return InventoryService(
            env=eventstore_env(settings, InventoryService.name), initial_stock=config.initial_stock
        )

    return [payments, entitlements, inventory]


def build_participants(settings: Settings, config: ParticipantsConfig) -> list[KafkaProcess]:
    """The payment, entitlement and inventory services (in that order), with their event stores
    from :func:`sagas.eventstore.eventstore_env` and one :class:`GatewaySimulator` on
    :meth:`ParticipantsConfig.gateway_file` (reachable as ``services[0].gateway``).

    Raises:
        infra.errors.ConfigError: the event store settings are malformed.
    """
    gateway = GatewaySimulator(config.gateway_file(settings), config.simulator)
    return [make() for make in _factories(settings, config, gateway)]


def run_participants(
    settings: Settings,
    config: ParticipantsConfig,
    stop_event: threading.Event,
    *,
    on_ready: Callable[[], None] | None = None,
    on_runner: Callable[[ProcessRunner], None] | None = None,
    component: str | None = None,
) -> dict[str, RunStats]:
    """Run the three services until ``stop_event`` is set; returns each one's stats by name.

    Each service runs in its own thread with its own application and :class:`ProcessRunner`;
    ``on_ready`` is called (from one of those threads) once every runner has caught up with its
    input topics, i.e. applied everything they held when it started. ``on_runner`` is called
    with each runner once built (to report its metrics); ``component`` names the metrics
    component whose batch histogram the runners feed (``None``: none). If a thread fails,
    ``stop_event`` is set (the others stop) and its exception is raised here after every thread
    has ended.

    Raises:
        infra.errors.InfraError: the broker or registry cannot be reached (from a thread).
    """
    gateway = GatewaySimulator(config.gateway_file(settings), config.simulator)
    factories = _factories(settings, config, gateway)
    stats: dict[str, RunStats] = {}
    errors: list[BaseException] = []
    lock = threading.Lock()
    waiting = [len(factories)]

    def caught_up(runner_stats: RunStats, seen: list[bool]) -> None:
        if seen or not runner_stats.caught_up:
            return
        seen.append(True)
        with lock:
            waiting[0] -= 1
            last = waiting[0] == 0
        if last and on_ready is not None:
            on_ready()

    def work(make: Callable[[], KafkaProcess]) -> None:
        app: KafkaProcess | None = None
        try:
            app = open_application(make)
            seen: list[bool] = []
            runner = ProcessRunner(app, settings, on_round=lambda s: caught_up(s, seen), component=component)
            if on_runner is not None:
                on_runner(runner)
            stats[runner.name] = runner.run(until=lambda _s: stop_event.is_set())
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
            errors.append(exc)
            log.exception("participant %s failed", type(app).__name__ if app else "?")
            stop_event.set()
        finally:
            if app is not None:
                app.close()

    threads = [
        threading.Thread(target=work, args=(make,), name=f"participant-{i}", daemon=True)
        for i, make in enumerate(factories)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    gateway.close()
    if errors:
        raise errors[0]
    return stats


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m sagas.participants", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of every simulated fault")
    parser.add_argument("--decline", type=float, default=0.0, help="rate of declined authorisations")
    parser.add_argument("--timeout", type=float, default=0.0, help="rate of gateway calls that time out")
    parser.add_argument("--duplicate", type=float, default=0.0, help="rate of answers delivered twice")
    parser.add_argument(
        "--fail-after-effect", type=float, default=0.02, help="rate of calls done, answer lost"
    )
    parser.add_argument("--capture-fail", type=float, default=0.02, help="rate of refused captures")
    parser.add_argument("--entitlement-fail", type=float, default=0.0, help="rate of failed grants")
    parser.add_argument("--stock-file", type=Path, help="JSON object SKU -> units (default: no stock)")
    parser.add_argument("--gateway-db", type=Path, help="gateway SQLite file (default <data_dir>/gateway/…)")
    add_port_argument(parser, PROCESS)
    return parser.parse_args(argv)


def config_from_args(args: argparse.Namespace) -> ParticipantsConfig:
    """The configuration of the command-line options.

    Raises:
        ValueError: a rate outside [0, 1], or a stock file that is not a JSON object of integers.
    """
    stock: dict[str, int] = {}
    if args.stock_file is not None:
        raw = json.loads(Path(args.stock_file).read_text())
        if not isinstance(raw, dict):
            raise ValueError(f"{args.stock_file}: expected a JSON object SKU -> units")
        stock = {str(sku): int(units) for sku, units in raw.items()}
    simulator = SimulatorConfig(
        seed=args.seed,
        decline=args.decline,
        timeout=args.timeout,
        duplicate=args.duplicate,
        fail_after_effect=args.fail_after_effect,
        capture_fail=args.capture_fail,
    )
    if not 0.0 <= args.entitlement_fail <= 1.0:
        raise ValueError(f"--entitlement-fail={args.entitlement_fail} is not a probability in [0, 1]")
    return ParticipantsConfig(
        simulator=simulator,
        entitlement_fail=args.entitlement_fail,
        seed=args.seed,
        initial_stock=stock,
        gateway_path=args.gateway_db,
    )


class ParticipantsObserver:
    """The ``saga-participants`` metrics component: the sum of the three runners' counters
    (:meth:`sagas.runner.ProcessRunner.observation`), ready once all have caught up."""

    def __init__(self) -> None:
        self.runners: list[ProcessRunner] = []
        self.ready = threading.Event()

    def add(self, runner: ProcessRunner) -> None:
        """Report ``runner`` too (called from its thread)."""
        self.runners.append(runner)

    def on_ready(self) -> None:
        """Every runner has caught up: log it (tests and tools wait for this line) and be ready."""
        self.ready.set()
        log.info("participants ready (caught up)")

    def observe(self) -> metrics.Observation:
        """The summed :class:`infra.metrics.Observation` (any thread; copies only)."""
        records_in: dict[str, int] = {}
        records_out: dict[str, int] = {}
        letters: dict[str, int] = {}
        positions: dict[tuple[str, int], int] = {}
        retries = 0
        detail: dict[str, object] = {}
        for runner in list(self.runners):
            o = runner.observation()
            for into, counts in (
                (records_in, o.records_in),
                (records_out, o.records_out),
                (letters, o.dead_letters),
            ):
                for key, n in counts.items():
                    into[key] = into.get(key, 0) + n
            positions.update(o.positions)
            retries += o.retries
            detail[runner.name] = {"ready": o.ready, **o.detail}
        return metrics.Observation(
            records_in=records_in, records_out=records_out, dead_letters=letters, retries=retries,
            positions=positions, ready=self.ready.is_set(), detail=detail,
        )  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m sagas.participants``; returns the exit status (0; 1 when a
    participant failed; 2 for bad options or a bad ``BACKBEAT_*`` setting)."""
    args = _parse(argv)
    try:
        setup_logging(PROCESS)
        ops_port = port_setting(PROCESS, args.ops_port)
        settings = Settings.from_env()
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        config = config_from_args(args)
    except (ValueError, OSError) as exc:
        log.error("%s", exc)
        return 2
    stop = threading.Event()
    observer = ParticipantsObserver()
    log.info(
        "participants: stock of %d SKUs, gateway %s", len(config.initial_stock), config.gateway_file(settings)
    )

    def work() -> dict[str, RunStats]:
        return run_participants(
            settings, config, stop, on_ready=observer.on_ready, on_runner=observer.add, component=COMPONENT
        )

    metrics.register(COMPONENT, observer.observe)
    try:
        return run_process(
            PROCESS, [LoopService(COMPONENT, work, stop.set)], ops_port=ops_port, run_dir=settings.run_dir,
            high_watermarks=lambda topic: high_watermarks(settings, topic),
        )  # fmt: skip
    finally:
        metrics.unregister(COMPONENT)


if __name__ == "__main__":
    raise SystemExit(main())
