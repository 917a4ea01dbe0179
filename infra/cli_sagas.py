"""``backbeat sagas``: run the saga orchestrator and its participants, start sagas, look at
them, and run the fault simulation (registered by :mod:`infra.cli`).

A thin shell: the work is in :mod:`sagas` (engine, processes, read models, simulation).
"""

from __future__ import annotations

import json
import time
from typing import Annotated, Any
from uuid import UUID

import typer

from infra.console import console, progress_bar, table
from infra.errors import ConfigError
from infra.settings import Settings, get_settings


def register(app: typer.Typer) -> None:
    """Add the ``sagas`` command group to the ``backbeat`` app."""
    from infra.cli_entitlements import clock, simulate_subscriptions

    group = typer.Typer(
        help=(
            "Saga orchestration: subscription billing and marketplace orders, with compensation, "
            "timeouts and a double-entry ledger. State lives in the event store "
            "(SQLite under BACKBEAT_DATA_DIR, or PostgreSQL with BACKBEAT_EVENTSTORE_URL)."
        ),
        no_args_is_help=True,
        rich_markup_mode="markdown",
    )
    app.add_typer(group, name="sagas")
    group.command("run")(run)
    group.command("start")(start)
    group.command("list")(list_sagas)
    group.command("show")(show)
    group.command("simulate")(simulate)
    group.command("simulate-subscriptions")(simulate_subscriptions)  # issue 17: infra/cli_entitlements.py
    group.command("clock")(clock)  # issue 17
    group.command("reset")(reset)


def _orchestrator(settings: Settings) -> Any:
    from sagas.eventstore import eventstore_env
    from sagas.orchestrator import Orchestrator

    return Orchestrator(eventstore_env(settings, Orchestrator.name))


# -- run -----------------------------------------------------------------------------------------
def run(
    step_timeout_ms: Annotated[
        int, typer.Option(help="Deadline of each command attempt (ms).", min=100)
    ] = 30_000,
    max_attempts: Annotated[
        int, typer.Option(help="Tries of a forward step before compensating.", min=1)
    ] = 3,
    participants: Annotated[
        bool, typer.Option(help="Also run the simulated participants (payments, entitlements, inventory).")
    ] = True,
    seed: Annotated[int, typer.Option(help="Seed of the participants' simulated faults.")] = 7,
    decline: Annotated[float, typer.Option(help="Share of authorisations the gateway declines.")] = 0.0,
    timeout: Annotated[float, typer.Option(help="Share of gateway calls that time out.")] = 0.0,
    duplicate: Annotated[float, typer.Option(help="Share of gateway answers given twice.")] = 0.0,
) -> None:
    """Run the orchestrator (and, by default, the participants) until Ctrl-C.

    Sagas start from events on the topics: `SubscriptionRequested` on billing.subscriptions,
    `OrderPlaced` on orders.orders (any producer, or `backbeat sagas start`). Logs go to
    BACKBEAT_DATA_DIR/run/saga-*.log.
    """
    from sagas.simulate import SimulationConfig, foreground

    config = SimulationConfig(
        seed=seed, decline=decline, timeout=timeout, duplicate=duplicate, fail_after_effect=0.0,
        capture_fail=0.0, entitlement_fail=0.0, step_timeout_ms=step_timeout_ms, max_attempts=max_attempts,
    )  # fmt: skip
    foreground(get_settings(), config, participants=participants, echo=console.print)


# -- start ---------------------------------------------------------------------------------------
def start(
    kind: Annotated[str, typer.Argument(help="subscription or order.")],
    user: Annotated[str, typer.Option(help="The user id.")] = "user-00001",
    plan: Annotated[
        str, typer.Option(help="Subscription plan: INDIVIDUAL, DUO, FAMILY, STUDENT.")
    ] = "INDIVIDUAL",
    yearly: Annotated[bool, typer.Option(help="Yearly billing (ten months' price).")] = False,
    line: Annotated[
        list[str] | None, typer.Option(help="Order line SKU:QUANTITY:UNIT_PRICE_MINOR (repeatable).")
    ] = None,
    business_id: Annotated[
        str | None, typer.Option("--id", help="Subscription or order id (default: a new one).")
    ] = None,
    wait: Annotated[float, typer.Option(help="Seconds to wait for the saga to end (0 = don't).")] = 30.0,
) -> None:
    """Start a saga by publishing its start event (the orchestrator must be running:
    `backbeat sagas run`), then wait for it to end and show it."""
    from events.producer import EventProducer
    from sagas.saga import saga_id_for
    from sagas.workload import PLAN_PRICES, YEARLY_MONTHS

    settings = get_settings()
    now = int(time.time() * 1000)
    if kind == "subscription":
        if plan not in PLAN_PRICES:
            raise ConfigError(f"unknown plan {plan!r}; choose one of {', '.join(PLAN_PRICES)}")
        bid = business_id or f"sub-{now:x}"
        payload: dict[str, Any] = {
            "event_id": f"{bid}-requested", "subscription_id": bid, "user_id": user, "occurred_at": now,
            "plan": plan, "billing_period": "YEARLY" if yearly else "MONTHLY",
            "price_minor": PLAN_PRICES[plan] * (YEARLY_MONTHS if yearly else 1), "currency": "EUR",
            "country": "DE", "payment_method_id": f"pm-{user}", "trial_days": 0,
        }  # fmt: skip
        topic, event_type, key = "billing.subscriptions", "SubscriptionRequested", "subscription_id"
    elif kind == "order":
        lines = [_parse_line(x) for x in (line or ["sku-000:1:2500"])]
        bid = business_id or f"order-{now:x}"
        payload = {
            "event_id": f"{bid}-placed", "order_id": bid, "user_id": user, "occurred_at": now, "lines": lines,
            "total_minor": sum(x["quantity"] * x["unit_price_minor"] for x in lines), "currency": "EUR",
            "payment_method_id": f"pm-{user}", "shipping_country": "DE",
        }  # fmt: skip
        topic, event_type, key = "orders.orders", "OrderPlaced", "order_id"
    else:
        raise ConfigError(f"unknown saga kind {kind!r}; use 'subscription' or 'order'")
    producer = EventProducer(settings)
    producer.send_many(topic, event_type, [payload], key_field=key, time_field="occurred_at", source="/cli")
    producer.flush()
    saga_id = saga_id_for(kind, bid)
    console.print(f"published {event_type} {bid} on {topic}; saga {saga_id}")
    if wait <= 0:
        return
    app = _orchestrator(settings)
    deadline = time.monotonic() + wait
    saga = None
    while time.monotonic() < deadline:
        saga = app.get_or_none(saga_id)
        if saga is not None and saga.terminal:
            break
        time.sleep(0.2)  # polling the event store for the saga's end
    if saga is None:
        console.print(
            f"no saga yet after {wait:.0f} s: is the orchestrator running ('backbeat sagas run')?",
            style="yellow",
        )
        raise typer.Exit(1)
    _print_saga(app, saga)


def _parse_line(text: str) -> dict[str, Any]:
    parts = text.split(":")
    if len(parts) != 3 or not parts[1].isdigit() or not parts[2].isdigit():
        raise ConfigError(f"--line {text!r}: use SKU:QUANTITY:UNIT_PRICE_MINOR, e.g. sku-003:2:2500")
    return {"sku": parts[0], "quantity": int(parts[1]), "unit_price_minor": int(parts[2])}


# -- list / show ---------------------------------------------------------------------------------
def list_sagas(
    state: Annotated[str | None, typer.Option(help="Only this state (RUNNING, COMPLETED, …).")] = None,
    kind: Annotated[str | None, typer.Option(help="Only this kind (subscription, order).")] = None,
    limit: Annotated[int, typer.Option(help="At most this many rows (newest first).", min=1)] = 20,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per line.")] = False,
) -> None:
    """List sagas with their state (the `sagas` read model, brought up to date first), and the
    count per kind and state."""
    from projections.store import writer
    from sagas.readmodel import project_sagas

    settings = get_settings()
    app = _orchestrator(settings)
    where, params = [], []
    if state:
        where.append("state = ?")
        params.append(state.upper())
    if kind:
        where.append("kind = ?")
        params.append(kind)
    clause = ("WHERE " + " AND ".join(where)) if where else ""
    with writer(settings.duckdb_path) as con:
        project_sagas(app, con)
        rows = con.execute(
            "SELECT saga_id, kind, state, business_id, amount_minor, currency, reason, retries, "
            "strftime(started_at, '%Y-%m-%d %H:%M:%S'), "
            f"duration_ms FROM sagas {clause} ORDER BY started_at DESC LIMIT ?",
            [*params, limit],
        ).fetchall()
        counts = con.execute("SELECT kind, state, count(*) FROM sagas GROUP BY ALL ORDER BY ALL").fetchall()
    columns = ["saga_id", "kind", "state", "business_id", "amount", "cur", "reason", "retries",
               "started (UTC)", "duration_ms"]  # fmt: skip
    if as_json:
        for r in rows:
            print(json.dumps(dict(zip(columns, r, strict=True)), default=str))
        return
    console.print(table(["kind", "state", "sagas"], counts, title="sagas by state"))
    console.print(table(columns, rows, title=f"latest {len(rows)}"))


def show(saga: Annotated[str, typer.Argument(help="Saga id (UUID), or a subscription or order id.")]) -> None:
    """A saga's state, data and full history (its stored events, with the commands it sent)."""
    from sagas.saga import saga_id_for

    settings = get_settings()
    app = _orchestrator(settings)
    candidates: list[UUID] = []
    try:
        candidates.append(UUID(saga))
    except ValueError:
        candidates += [saga_id_for("subscription", saga), saga_id_for("order", saga)]
    for cid in candidates:
        found = app.get_or_none(cid)
        if found is not None:
            _print_saga(app, found)
            return
    raise ConfigError(f"no saga {saga!r} in the event store; 'backbeat sagas list' shows the sagas there")


def _print_saga(app: Any, saga: Any) -> None:
    from sagas.readmodel import event_row

    end = "" if saga.ended_ms is None else f", ended after {saga.ended_ms - saga.requested_ms} ms"
    console.print(f"[bold]{saga.kind} saga {saga.saga_id}[/] ({saga.business_id})")
    console.print(f"state {saga.state}" + (f", reason {saga.reason}" if saga.reason else "") + end)
    console.print(f"retries {saga.retries}; data {json.dumps(saga.data, default=str)}")
    rows = []
    for event in app.events.get(saga.id):
        _sid, version, name, recorded, step, detail = event_row(saga.saga_id, event)
        rows.append((version, str(recorded)[:23], name, step or "", detail))
    console.print(table(["#", "recorded (UTC)", "event", "step", "detail"], rows, title="history"))


# -- simulate / reset ----------------------------------------------------------------------------
def simulate(
    count: Annotated[
        int, typer.Option(help="Sagas to run (half subscriptions, half orders).", min=1)
    ] = 2_000,
    seed: Annotated[int, typer.Option(help="Seed of the workload and of every simulated fault.")] = 7,
    decline: Annotated[float, typer.Option(help="Share of authorisations the gateway declines.")] = 0.10,
    timeout: Annotated[float, typer.Option(help="Share of gateway calls that time out (no answer).")] = 0.05,
    duplicate: Annotated[float, typer.Option(help="Share of gateway answers given twice.")] = 0.05,
    kill_orchestrator: Annotated[
        int, typer.Option(help="Times the orchestrator is SIGKILLed (and restarted) mid-run.", min=0)
    ] = 3,
    fail_after_effect: Annotated[
        float, typer.Option(help="Share of gateway calls that succeed but lose their answer.")
    ] = 0.02,
    capture_fail: Annotated[float, typer.Option(help="Share of captures the gateway refuses.")] = 0.02,
    entitlement_fail: Annotated[float, typer.Option(help="Share of entitlement grants that fail.")] = 0.02,
    rate: Annotated[float, typer.Option(help="Sagas started per second.", min=1)] = 200.0,
    step_timeout_ms: Annotated[
        int, typer.Option(help="Deadline of each command attempt (ms).", min=100)
    ] = 3_000,
    max_attempts: Annotated[
        int, typer.Option(help="Tries of a forward step before compensating.", min=1)
    ] = 3,
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary as one JSON line.")] = False,
) -> None:
    """The fault run: start the embedded broker if needed, run COUNT sagas through the
    orchestrator and simulated participants while SIGKILLing the orchestrator, then build the
    read models (`sagas`, `ledger_entries`, `gateway_operations`, …) in BACKBEAT_DATA_DIR's
    DuckDB and check every invariant. Exits 1 if one fails."""
    from sagas.simulate import SimulationConfig, simulate_command

    config = SimulationConfig(
        count=count, seed=seed, decline=decline, timeout=timeout, duplicate=duplicate,
        kill_orchestrator=kill_orchestrator, fail_after_effect=fail_after_effect, capture_fail=capture_fail,
        entitlement_fail=entitlement_fail, rate=rate, step_timeout_ms=step_timeout_ms,
        max_attempts=max_attempts,
    )  # fmt: skip
    with progress_bar() as bar:
        task = bar.add_task("sagas ended", total=count)
        summary = simulate_command(
            get_settings(),
            config,
            on_progress=lambda run: bar.update(task, completed=run.terminal),
            echo=console.print,
        )
    if as_json:
        print(json.dumps(summary.as_dict(), default=str))
    else:
        summary.print(console)
    if not summary.ok:
        raise typer.Exit(1)


def reset(
    yes: Annotated[
        bool, typer.Option("--yes", help="Really delete (the events are the sagas' only record).")
    ] = False,
) -> None:
    """Delete the sagas' event stores, the gateway simulator's record and the saga read models
    (after the embedded broker lost its log, or to start a simulation afresh)."""
    if not yes:
        raise ConfigError("this deletes every saga and payment record; run again with --yes")
    from sagas.simulate import reset_all

    for line in reset_all(get_settings()):
        console.print(f"removed {line}")
