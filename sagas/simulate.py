"""``backbeat sagas simulate``: the fault run of issue 6.

It starts the participants (payment service with the seeded gateway simulator, entitlements,
inventory) and the orchestrator as separate processes, produces ``count`` start events
(subscriptions and orders, :mod:`sagas.workload`) at ``rate`` per second, SIGKILLs the
orchestrator ``kill_orchestrator`` times while sagas are in flight (restarting it at once),
waits until every saga is terminal, then builds the read models in DuckDB (``sagas``,
``saga_events``, ``saga_order_lines``, ``ledger_entries``, ``gateway_operations``,
``inventory_reservations``, ``inventory_stock``) and checks the invariants
(:mod:`sagas.invariants`).

Fault decisions are seeded (:mod:`sagas.seeded`); business ids carry a run id (the start time)
so several runs can share one broker and event store, and the invariants are checked over every
saga of every run.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from eventsourcing.utils import get_topic

from infra.errors import InfraError
from infra.processes import Running, is_alive, pid_file, spawn, stop, tail
from infra.settings import Settings
from sagas.eventstore import eventstore_env, open_application
from sagas.orchestrator import Orchestrator
from sagas.saga import Saga
from sagas.workload import StartEvent, initial_stock, workload

ORCHESTRATOR = "saga-orchestrator"
PARTICIPANTS = "saga-participants"
FINISHED_TOPIC = get_topic(Saga.Finished)  # type: ignore[attr-defined]


@dataclass(frozen=True)
class SimulationConfig:
    """The fault run's knobs. Rates are probabilities (0..1) per gateway call / grant;
    ``rate`` is start events per second; times in ms unless named ``_s``."""

    count: int = 2_000
    seed: int = 7
    decline: float = 0.10
    timeout: float = 0.05
    duplicate: float = 0.05
    kill_orchestrator: int = 3
    fail_after_effect: float = 0.02
    capture_fail: float = 0.02
    entitlement_fail: float = 0.02
    orders_share: float = 0.5
    skus: int = 20
    stock_ratio: float = 0.9
    rate: float = 200.0
    step_timeout_ms: int = 3_000
    max_attempts: int = 3
    deadline_s: float = 900.0


@dataclass
class SimulationRun:
    """What happened: ``started_at``/``ended_at`` are wall-clock seconds; ``kills`` the
    terminal-saga counts at which the orchestrator was killed."""

    run_id: str
    produced: int = 0
    terminal: int = 0
    kills: list[int] = field(default_factory=list)
    started_at: float = 0.0
    ended_at: float = 0.0


def _python_module(module: str, *args: str) -> list[str]:
    return [sys.executable, "-m", module, *args]


class _Processes:
    """The two child processes, with restart and liveness checks."""

    def __init__(self, settings: Settings, config: SimulationConfig, stock_file: Path) -> None:
        self.settings = settings
        # BACKBEAT_OPS_PORT names one process's port: two children cannot both bind it, so each
        # serves /metrics and /health on its kind's default port (a free one when that is taken)
        self.env = {k: v for k, v in {**os.environ, **settings.to_env()}.items() if k != "BACKBEAT_OPS_PORT"}
        self.orchestrator_argv = _python_module(
            "sagas.orchestrator_main",
            "--step-timeout-ms", str(config.step_timeout_ms), "--max-attempts", str(config.max_attempts),
        )  # fmt: skip
        self.participants_argv = _python_module(
            "sagas.participants",
            "--seed", str(config.seed), "--decline", str(config.decline), "--timeout", str(config.timeout),
            "--duplicate", str(config.duplicate), "--fail-after-effect", str(config.fail_after_effect),
            "--capture-fail", str(config.capture_fail), "--entitlement-fail", str(config.entitlement_fail),
            "--stock-file", str(stock_file),
        )  # fmt: skip
        self.orchestrator: Running | None = None
        self.participants: Running | None = None

    def _spawn(self, name: str, argv: list[str]) -> Running:
        return spawn(name, argv, run_dir=self.settings.run_dir, address="-", ready=lambda: True, env=self.env)

    def start(self) -> None:
        self.participants = self._spawn(PARTICIPANTS, self.participants_argv)
        self.orchestrator = self._spawn(ORCHESTRATOR, self.orchestrator_argv)

    def kill_and_restart_orchestrator(self) -> None:
        assert self.orchestrator is not None
        os.kill(self.orchestrator.pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while is_alive(self.orchestrator) and time.monotonic() < deadline:
            time.sleep(0.02)
        self.orchestrator = self._spawn(ORCHESTRATOR, self.orchestrator_argv)

    def check(self) -> None:
        for running in (self.orchestrator, self.participants):
            if running is not None and not is_alive(running):
                raise InfraError(
                    f"{running.name} exited; last lines of {running.log}:\n{tail(Path(running.log))}"
                )

    def stop(self) -> None:
        for running in (self.orchestrator, self.participants):
            if running is not None:
                stop(running)
                pid_file(self.settings.run_dir, running.name).unlink(missing_ok=True)


class TerminalCounter:
    """Counts sagas that reached a terminal state, by reading ``Finished`` events from the
    orchestrator's notification log (another process writes it; SQLite WAL or PostgreSQL)."""

    def __init__(self, settings: Settings) -> None:
        self.app = open_application(lambda: Orchestrator(eventstore_env(settings, Orchestrator.name)))
        self._cursor = 0
        self.count = 0

    def poll(self) -> int:
        while True:
            notes = self.app.recorder.select_notifications(
                start=self._cursor + 1, limit=10_000, topics=[FINISHED_TOPIC]
            )
            if not notes:
                return self.count
            self.count += len(notes)
            self._cursor = int(notes[-1].id)


def produce_workload(
    settings: Settings, events: list[StartEvent], rate: float, between: Callable[[int], None]
) -> int:
    """Produce ``events`` at ``rate`` per second (``occurred_at`` = the send time, ms), calling
    ``between(produced)`` between batches (kills, progress). Returns how many were produced."""
    from events.producer import EventProducer

    producer = EventProducer(settings)
    began = time.monotonic()
    batch = max(1, int(rate / 20))
    done = 0
    for start in range(0, len(events), batch):
        chunk = events[start : start + batch]
        now_ms = int(time.time() * 1000)
        by_topic: dict[tuple[str, str], list[dict[str, object]]] = {}
        for ev in chunk:
            ev.payload["occurred_at"] = now_ms
            by_topic.setdefault((ev.topic, ev.event_type), []).append(ev.payload)
        for (topic, event_type), payloads in by_topic.items():
            key = "order_id" if event_type == "OrderPlaced" else "subscription_id"
            producer.send_many(topic, event_type, payloads, key_field=key, time_field="occurred_at",
                               source="/sagas/simulate")  # fmt: skip
        producer.flush()
        done += len(chunk)
        between(done)
        wait = began + done / rate - time.monotonic()
        if wait > 0:
            time.sleep(wait)  # pacing the producer, not synchronisation
    return done


def run_simulation(
    settings: Settings,
    config: SimulationConfig,
    *,
    on_progress: Callable[[SimulationRun], None] | None = None,
) -> SimulationRun:
    """Run the fault run against the broker and event store of ``settings`` (both must be
    up: the CLI starts the embedded ones). Returns when every saga of the run is terminal.

    Raises:
        InfraError: a child process died, or the sagas were not all terminal within
            ``config.deadline_s`` s.
    """
    run = SimulationRun(run_id=f"sim{int(time.time()):x}")
    stock = initial_stock(config.count, config.orders_share, config.skus, config.stock_ratio)
    stock_file = settings.data_dir / "sagas" / "stock.json"
    stock_file.parent.mkdir(parents=True, exist_ok=True)
    if stock_file.exists():  # earlier runs: keep their stock and add this run's
        for sku, units in json.loads(stock_file.read_text()).items():
            stock[sku] = stock.get(sku, 0) + int(units)
    stock_file.write_text(json.dumps(stock, sort_keys=True))
    counter = TerminalCounter(settings)
    before = counter.poll()
    events = workload(
        count=config.count, seed=config.seed, run_id=run.run_id, orders_share=config.orders_share,
        skus=config.skus, now_ms=int(time.time() * 1000),
    )  # fmt: skip
    kill_points = [
        config.count * (i + 1) // (config.kill_orchestrator + 1) for i in range(config.kill_orchestrator)
    ]
    processes = _Processes(settings, config, stock_file)
    processes.start()
    run.started_at = time.time()

    def step(produced: int) -> None:
        run.produced = produced
        processes.check()
        run.terminal = counter.poll() - before
        while kill_points and run.terminal >= kill_points[0]:
            kill_points.pop(0)
            processes.kill_and_restart_orchestrator()
            run.kills.append(run.terminal)
        if on_progress is not None:
            on_progress(run)

    try:
        produce_workload(settings, events, config.rate, step)
        deadline = time.monotonic() + config.deadline_s
        while run.terminal < config.count:
            if time.monotonic() > deadline:
                raise InfraError(
                    f"only {run.terminal} of {config.count} sagas ended within {config.deadline_s:.0f} s; "
                    f"see the logs in {settings.run_dir}"
                )
            step(run.produced)
            time.sleep(0.2)  # polling interval of the progress display
        run.ended_at = time.time()
    finally:
        processes.stop()
    return run


# -- read models, invariants, summary ------------------------------------------------------------
#: Every eventsourcing application of the saga processes (their stores are reset together).
def saga_app_names() -> list[str]:
    """The application names of the orchestrator and the participants."""
    from sagas.entitlements import EntitlementService
    from sagas.inventory import InventoryService
    from sagas.payments import PaymentService

    return [Orchestrator.name, PaymentService.name, EntitlementService.name, InventoryService.name]


def gateway_path(settings: Settings) -> Path:
    """The gateway simulator's own record (SQLite)."""
    return settings.data_dir / "gateway" / "gateway.sqlite"


def stock_path(settings: Settings) -> Path:
    """The initial stock of the simulated inventory (JSON: SKU → units)."""
    return settings.data_dir / "sagas" / "stock.json"


def reset_all(settings: Settings) -> list[str]:
    """Delete the saga event stores, the gateway record, the stock file and the saga read models
    (``sagas``, ``saga_*``, ``gateway_operations``, ``inventory_*``, and the ledger projection's
    rows and offsets). Returns what was removed."""
    from projections.store import writer
    from projections.tracking import reset as reset_projection
    from sagas.eventstore import reset_eventstore
    from sagas.replay import forget_saga_read_models

    removed = reset_eventstore(settings, saga_app_names())
    for path in (gateway_path(settings), stock_path(settings)):
        for suffix in ("", "-wal", "-shm"):
            p = path.with_name(path.name + suffix)
            if p.exists():
                p.unlink()
                removed.append(str(p))
    if settings.duckdb_path.exists():
        with writer(settings.duckdb_path) as con:
            con.begin()
            forget_saga_read_models(con)  # tables, and the views and versions of replays
            con.commit()
            removed.append(f"saga tables in {settings.duckdb_path}")
        reset_projection(settings, ["ledger_entries"])
        removed.append("read model ledger_entries")
    return removed


def build_read_models(settings: Settings, seed: int) -> None:
    """Bring the saga read models in DuckDB up to date: ``sagas`` (from the orchestrator's
    event store), ``gateway_operations`` (the simulator's record), ``inventory_reservations``
    and ``inventory_stock`` (the inventory service's aggregates) and ``ledger_entries`` (the
    ledger agent, :mod:`streams.ledger`, posts ``billing.payments`` to ``billing.ledger`` until
    caught up, then the projection runner reads that). ``seed`` is not used (the gateway record is
    read as stored). After a ``backbeat replay`` of them, the rows go into the current versions'
    tables (:mod:`sagas.replay`)."""
    from projections.runner import run_projections
    from streams.ledger import publish_until_caught_up

    build_saga_read_models(settings)
    publish_until_caught_up(settings)
    run_projections(settings, ["ledger_entries"], until_caught_up=True)


def build_saga_read_models(settings: Settings) -> None:
    """The saga part of :func:`build_read_models` (everything but ``ledger_entries``), in
    ``settings.duckdb_path``.

    Raises:
        DatabaseBusyError: the DuckDB file stayed locked.
        eventsourcing.persistence.PersistenceError, sqlite3.Error: a source cannot be read.
    """
    from projections.store import writer
    from sagas.readmodel import project_sagas
    from sagas.replay import project_copies

    orchestrator = open_application(lambda: Orchestrator(eventstore_env(settings, Orchestrator.name)))
    try:
        with writer(settings.duckdb_path) as con:
            project_sagas(orchestrator, con)
            project_copies(settings, con)
    finally:
        orchestrator.close()


@dataclass
class Summary:
    """The outcome of a simulation: counts, rates, latencies and the invariants."""

    run: SimulationRun
    config: SimulationConfig
    states: list[tuple[str, str, int]]
    run_states: dict[str, int]
    sagas_per_s: float
    p50_ms: float
    p99_ms: float
    retries: int
    invariants: list[Any]
    ledger_balances: list[tuple[str, int]]

    @property
    def ok(self) -> bool:
        """Whether every invariant held."""
        return all(r.ok for r in self.invariants)

    def as_dict(self) -> dict[str, Any]:
        """A JSON-able summary (``--json``)."""
        return {
            "run_id": self.run.run_id,
            "count": self.config.count,
            "seed": self.config.seed,
            "kills": len(self.run.kills),
            "elapsed_s": round(self.run.ended_at - self.run.started_at, 2),
            "sagas_per_s": round(self.sagas_per_s, 1),
            "time_to_terminal_p50_ms": round(self.p50_ms),
            "time_to_terminal_p99_ms": round(self.p99_ms),
            "retries": self.retries,
            "states": self.run_states,
            "invariants_ok": self.ok,
            "invariants": {r.name: r.ok for r in self.invariants},
        }

    def print(self, console: Any) -> None:
        """The human report."""
        from infra.console import table
        from sagas.invariants import format_report

        console.print(
            table(["kind", "state", "sagas"], self.states, title=f"run {self.run.run_id}: sagas by state")
        )
        console.print(
            f"{self.config.count:,} sagas in {self.run.ended_at - self.run.started_at:.1f} s = "
            f"{self.sagas_per_s:,.1f} sagas/s; time to terminal p50 {self.p50_ms:,.0f} ms, "
            f"p99 {self.p99_ms:,.0f} ms; {self.retries:,} command retries; orchestrator SIGKILLed "
            f"{len(self.run.kills)}× (at {', '.join(map(str, self.run.kills)) or '-'} sagas ended)"
        )
        console.print(table(["account", "balance (minor units)"], self.ledger_balances, title="ledger"))
        console.print(format_report(self.invariants))


def summarize(settings: Settings, run: SimulationRun, config: SimulationConfig) -> Summary:
    """Read the run's figures and check every invariant (over all sagas in the store)."""
    from projections.store import reader
    from sagas.invariants import check_invariants

    prefix = run.run_id + "-%"
    with reader(settings.duckdb_path) as con:
        states = con.execute(
            "SELECT kind, state, count(*) FROM sagas WHERE business_id LIKE ? GROUP BY ALL ORDER BY ALL",
            [prefix],
        ).fetchall()
        p50, p99, first, last, retries = con.execute(
            "SELECT quantile_cont(duration_ms, 0.5), quantile_cont(duration_ms, 0.99), min(requested_at), "
            "max(ended_at), sum(retries) FROM sagas WHERE business_id LIKE ?",
            [prefix],
        ).fetchone()
        balances = con.execute(
            "SELECT account, sum(amount_minor)::BIGINT FROM ledger_entries GROUP BY ALL ORDER BY ALL"
        ).fetchall()
        results = check_invariants(con)
    span_s = (last - first).total_seconds() if first and last else 0.0
    run_states: dict[str, int] = {}
    for _kind, state, n in states:
        run_states[state] = run_states.get(state, 0) + n
    return Summary(
        run=run, config=config, states=states, run_states=run_states,
        sagas_per_s=config.count / span_s if span_s else 0.0, p50_ms=float(p50 or 0), p99_ms=float(p99 or 0),
        retries=int(retries or 0), invariants=results, ledger_balances=balances,
    )  # fmt: skip


def simulate_command(
    settings: Settings,
    config: SimulationConfig,
    *,
    on_progress: Callable[[SimulationRun], None] | None = None,
    echo: Callable[[str], None] = print,
) -> Summary:
    """What ``backbeat sagas simulate`` does: start the embedded broker and registry if they are
    not running (and stop them at the end), create the topics, run :func:`run_simulation`,
    build the read models and check the invariants.

    Raises:
        InfraError, ConfigError: as the steps raise them.
    """
    from infra import services
    from infra.provision import apply_topics

    started = services.up(settings)
    for running in started:
        echo(f"started {running.name} on {running.address} (pid {running.pid})")
    try:
        if any(r.name == services.BROKER for r in started):
            removed = reset_all(settings)
            if removed:
                echo("the broker started empty: saga stores and read models of earlier runs were reset")
        apply_topics(settings)
        run = run_simulation(settings, config, on_progress=on_progress)
        build_read_models(settings, config.seed)
        return summarize(settings, run, config)
    finally:
        for running in reversed(started):
            stop(running)
            pid_file(settings.run_dir, running.name).unlink(missing_ok=True)


def foreground(
    settings: Settings, config: SimulationConfig, *, participants: bool, echo: Callable[[str], None] = print
) -> None:
    """``backbeat sagas run``: run the orchestrator (and the participants) as child processes
    until Ctrl-C, restarting neither; topics are created first."""
    from infra.provision import apply_topics

    apply_topics(settings)
    stock = stock_path(settings)
    if not stock.exists():
        stock.parent.mkdir(parents=True, exist_ok=True)
        stock.write_text(json.dumps(initial_stock(2_000, 0.5, config.skus, 1.0), sort_keys=True))
    processes = _Processes(settings, config, stock)
    if participants:
        processes.participants = processes._spawn(PARTICIPANTS, processes.participants_argv)
    processes.orchestrator = processes._spawn(ORCHESTRATOR, processes.orchestrator_argv)
    echo(f"orchestrator pid {processes.orchestrator.pid}, log {processes.orchestrator.log}")
    if processes.participants:
        echo(f"participants pid {processes.participants.pid}, log {processes.participants.log}")
    echo("running; Ctrl-C stops")

    def on_term(*_: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)  # stop the children on SIGTERM too
    try:
        while True:
            processes.check()
            time.sleep(0.5)  # watching the children
    except KeyboardInterrupt:
        echo("stopping")
    finally:
        processes.stop()
