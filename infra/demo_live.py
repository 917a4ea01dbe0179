"""``backbeat demo live``: the live path of the platform, end to end, for ``--seconds`` of wall
time (docs: live.md).

Starts the embedded broker and registry (unless running), then, each as its own process with its
log under ``<data_dir>/run/``: the worker (agent groups ``playback``, ``ingest``, ``ledger``),
the projection runner (the live read models, :data:`READ_MODELS`), the saga orchestrator and
participants (``backbeat sagas run``, the gateway declining :data:`DECLINE` of authorisations), the
business clock (a day of business time per second) and the notification relay. It then publishes
the catalog and a year of catalog changes around now, a subscription for the first
:data:`SUBSCRIBERS` simulated listeners (a few of them cancelling), and runs the player simulator
live at ``--rate`` events/s. Every 5 s it prints listens, skips, premium users, renewals and
notifications; at the end it waits for the read models to catch up, asks the followers of the
released albums' artists to be notified, prints entitlements and notifications, computes the
month's royalty statement (and exports it to Parquet), and stops what it started. The read
models stay in ``BACKBEAT_DATA_DIR`` for ``backbeat sql``.

When this run starts the broker (so the log is empty), state of an earlier run that refers to the
old log is removed first: the read models, the saga event stores and the relay's store.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from infra import ops
from infra.errors import InfraError
from infra.processes import Running, is_alive, pid_file, spawn, stop, tail
from infra.settings import Settings

#: The read models the live path builds (one runner process runs them all).
READ_MODELS = (
    "tracks", "track_changes", "licences", "albums", "listens", "sessions", "plays", "ledger_entries",
    "entitlement_events", "subscription_events", "business_clock", "notifications",
)  # fmt: skip
#: Agent groups of the live worker.
AGENTS = "playback,ingest,ledger"
#: Listeners who subscribe, and the share of them who cancel during the run.
SUBSCRIBERS = 40
CANCEL_SHARE = 0.15
#: Share of payment authorisations the simulated gateway declines (renewals then go to dunning).
DECLINE = 0.25
#: Business ms per wall ms of the clock (a day per second: a 60 s run covers two renewals).
CLOCK_SPEED = 86_400.0
DAY_MS = 86_400_000
#: The runner's batch wait on the live path (ms; ``BACKBEAT_PROJECTION_LINGER_MS``): fresher read
#: models than the default 500 (benchmarks/live.py).
LIVE_LINGER_MS = 200


@dataclass
class LiveRun:
    """What the demo started (stopped in reverse order) and the figures it printed last."""

    started: list[Running] = field(default_factory=list)
    processes: list[Running] = field(default_factory=list)
    figures: dict[str, Any] = field(default_factory=dict)


def _env(settings: Settings, **extra: str) -> dict[str, str]:
    from infra.demo import worker_env

    return {**worker_env(settings), **extra}


def is_ready(settings: Settings, process: str) -> bool:
    """``process``'s ``/health`` says ready (:func:`infra.services.process_health`)."""
    from infra.services import process_health

    return any(h.process == process and h.status == "ready" for h in process_health(settings))


def _start(settings: Settings, name: str, argv: list[str], process: str | None, **env: str) -> Running:
    """Start ``argv`` as ``name`` (log ``<run_dir>/<name>.log``); ready when ``process``'s
    ``/health`` answers 200 (``None``: when it runs)."""
    ready: Callable[[], bool] = (lambda: is_ready(settings, process)) if process else (lambda: True)
    return spawn(name, argv, run_dir=settings.run_dir, address="-", ready=ready, timeout_s=120,
                 env=_env(settings, **env))  # fmt: skip


def _query(settings: Settings, sql: str, params: list[Any] | None = None) -> list[tuple[Any, ...]]:
    """Rows of ``sql`` through the read path users have; ``[]`` while a table is not there yet."""
    import duckdb

    from projections.store import NoReadModelsError, reader

    try:
        with reader(settings.duckdb_path, timeout_s=30) as con:
            return con.execute(sql, params or []).fetchall()
    except (NoReadModelsError, duckdb.CatalogException, duckdb.BinderException):
        return []


def figures(settings: Settings) -> dict[str, Any]:
    """The live figures: player listens, plays and skips, premium users at the business clock's
    now, renewals paid, notifications sent/failed/pending (``0`` for a read model not built yet)."""
    from sagas.access import access_predicate

    def one(sql: str) -> Any:
        rows = _query(settings, sql)
        return rows[0][0] if rows and rows[0][0] is not None else 0

    return {
        "listens": one("SELECT count(*) FROM listens WHERE source = 'player'"),
        "plays": one("SELECT count(*) FROM plays"),
        "skips": one("SELECT count(*) FROM plays WHERE outcome = 'SKIPPED'"),
        "premium": one(
            "SELECT count(DISTINCT e.user_id) FROM entitlements e WHERE "
            + access_predicate("(SELECT max(now) FROM business_clock)")
        ),
        "renewals": one("SELECT count(*) FROM subscription_events WHERE event_type = 'SubscriptionRenewed'"),
        "lapsed": one(
            "SELECT count(*) FROM subscription_events WHERE event_type = 'SubscriptionCancelled' "
            "AND reason = 'PAYMENT_FAILED'"
        ),
        "sent": one("SELECT count(*) FROM notifications_status WHERE state = 'SENT'"),
        "failed": one("SELECT count(*) FROM notifications_status WHERE state = 'FAILED'"),
        "pending": one("SELECT count(*) FROM notifications_status WHERE state = 'PENDING'"),
    }


def _status_line(f: dict[str, Any]) -> str:
    skip = f"{f['skips'] / f['plays']:.0%}" if f["plays"] else "-"
    return (
        f"listens {f['listens']:,} · plays {f['plays']:,} (skipped {skip}) · premium users {f['premium']} · "
        f"renewals {f['renewals']} · lapsed {f['lapsed']} · notifications sent {f['sent']}, "
        f"failed {f['failed']}, pending {f['pending']}"
    )


def _reset_earlier_state(settings: Settings, echo: Callable[[str], None]) -> None:
    """Remove what an earlier run kept about a log that is gone (the broker started empty)."""
    from projections.readmodels import PROJECTIONS
    from projections.runner import STATEFUL
    from projections.tracking import reset
    from sagas.notifications import reset_relay
    from sagas.simulate import reset_all

    removed = list(reset_all(settings)) + list(reset_relay(settings))
    if settings.duckdb_path.exists():
        reset(settings, [*PROJECTIONS, *STATEFUL])
        removed.append("the read models")
    if removed:
        echo("the broker started empty: state of an earlier run was reset")


def _publish_subscriptions(settings: Settings, users: list[str], now_ms: int) -> tuple[int, int]:
    """A monthly subscription for each of ``users`` and a cancellation for a seeded share of
    them (effective at their period end); returns ``(requests, cancellations)``."""
    from events.producer import EventProducer
    from sagas.seeded import uniform
    from sagas.workload import PLAN_PRICES

    plans = list(PLAN_PRICES)
    requests, cancels = [], []
    for n, user in enumerate(users):
        sub = f"live-{now_ms:x}-{n:03d}"
        plan = plans[int(uniform(17, "plan", user) * len(plans))]
        requests.append({
            "event_id": f"{sub}-requested", "subscription_id": sub, "user_id": user, "occurred_at": now_ms,
            "plan": plan, "billing_period": "MONTHLY", "price_minor": PLAN_PRICES[plan], "currency": "EUR",
            "country": "DE", "payment_method_id": f"pm-{user}", "trial_days": 0,
        })  # fmt: skip
        if uniform(17, "cancel", user) < CANCEL_SHARE:
            cancels.append({
                "event_id": f"{sub}-cancel", "subscription_id": sub, "user_id": user,
                "occurred_at": now_ms + 10 * DAY_MS, "reason": "USER_REQUEST",
            })  # fmt: skip
    producer = EventProducer(settings)
    topic = "billing.subscriptions"
    producer.send_many(topic, "SubscriptionRequested", requests, key_field="subscription_id",
                       time_field="occurred_at", source="/demo/live")  # fmt: skip
    if cancels:
        producer.send_many(topic, "SubscriptionCancellationRequested", cancels, key_field="subscription_id",
                           time_field="occurred_at", source="/demo/live")  # fmt: skip
    producer.flush()
    return len(requests), len(cancels)


def consumer_lag(settings: Settings, process: str) -> float | None:
    """``backbeat_consumer_lag`` of ``process`` summed over its components and partitions
    (records), from its ``/metrics``; ``None`` when it has no endpoint or does not answer."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    base = ops.read_address(settings.run_dir, process)
    if base is None:
        return None
    try:
        with urllib.request.urlopen(f"{base}/metrics", timeout=5) as resp:
            text = resp.read().decode()
    except OSError:
        return None
    return sum(
        s.value
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
        if s.name == "backbeat_consumer_lag"
    )


def _caught_up(settings: Settings, processes: tuple[str, ...]) -> bool:
    """Every process in ``processes`` reports a total ``backbeat_consumer_lag`` of 0."""
    return all(consumer_lag(settings, p) == 0 for p in processes)


def _wait_caught_up(settings: Settings, timeout_s: float = 120.0) -> None:
    """Wait until the worker and the runner have no lag twice in a row, 1 s apart (what was
    published before the call is then in the read models).

    Raises:
        InfraError: not within ``timeout_s`` (s).
    """
    deadline = time.monotonic() + timeout_s
    streak = 0
    while streak < 2:
        streak = streak + 1 if _caught_up(settings, ("worker", "projection-runner")) else 0
        if time.monotonic() > deadline:
            raise InfraError(f"the worker and runner did not catch up within {timeout_s:.0f} s; see the logs")
        time.sleep(1.0)


def run_live_demo(
    settings: Settings,
    *,
    seconds: float = 60.0,
    rate: float = 1000.0,
    keep_running: bool = False,
    listens_file: Path | None = None,
    catalog_file: Path | None = None,
) -> LiveRun:
    """The live demo (module docstring). Stops what it started, also on errors.

    ``seconds``: how long the player runs (s); ``rate``: player events per second.

    Raises:
        BackbeatError subclasses: a step failed (the message says which and why).
    """
    from events import player_catalog
    from events.catalog_changes import generate
    from events.importers.run import import_catalog
    from events.simulate_playback import LiveProgress, live, load_listens
    from infra import services
    from infra.cli_catalog_changes import load_catalog, produce_changes
    from infra.console import console, table
    from infra.provision import apply_topics
    from infra.resources import CATALOG_SPOTIFY, LISTENS_30MUSIC
    from projections.royalties import Period, run_statement
    from sagas.new_releases import run_requester

    catalog_file = catalog_file or CATALOG_SPOTIFY
    began = time.monotonic()
    run = LiveRun()
    console.rule("[bold]backbeat demo live")
    run.started = services.up(settings)
    for r in run.started:
        console.print(f"started {r.name} on {r.address} (pid {r.pid})")
    python = sys.executable
    try:
        if any(r.name == services.BROKER for r in run.started):
            _reset_earlier_state(settings, console.print)
        apply_topics(settings)
        worker_argv = [python, "-m", "faust", "-A", "streams.app", "worker", "-l", "info", "--without-web"]
        plan = [
            ("worker", worker_argv, "worker", {"BACKBEAT_STREAMS_AGENTS": AGENTS}),
            ("projection-runner",
             [python, "-m", "projections.runner", *[a for m in READ_MODELS for a in ("--projection", m)]],
             "projection-runner", {"BACKBEAT_PROJECTION_LINGER_MS": str(LIVE_LINGER_MS)}),
            ("sagas", [python, "-m", "infra.cli", "sagas", "run", "--decline", str(DECLINE)], None, {}),
            ("business-clock", [python, "-m", "infra.cli", "sagas", "clock", "--speed", str(CLOCK_SPEED)],
             "business-clock", {}),
            ("notification-relay", [python, "-m", "sagas.notifications"], "notification-relay", {}),
        ]  # fmt: skip
        for name, argv, process, env in plan:
            running = _start(settings, name, argv, process, **env)
            run.processes.append(running)
            console.print(f"started {name} (pid {running.pid}, log {running.log})")

        now_ms = int(time.time() * 1000)
        result = import_catalog(settings, catalog_file)
        console.print(f"catalog: {result.produced:,} TrackPublished")
        made = generate(
            load_catalog(catalog_file), seed=17, changes=1000, start_ms=now_ms - 330 * DAY_MS, days=365
        )
        written = produce_changes(settings, made.events)
        console.print(
            "catalog changes: "
            + ", ".join(f"{n:,} {t}" for t, n in sorted(made.counts.items()))
            + f" → {', '.join(sorted(written))}"
        )
        listens = load_listens(listens_file or LISTENS_30MUSIC)
        users = list(dict.fromkeys(x.user_id for x in listens))[:SUBSCRIBERS]
        requested, cancelling = _publish_subscriptions(settings, users, now_ms)
        console.print(f"subscriptions: {requested} requested, {cancelling} of them cancelling after 10 days")

        cat = player_catalog.load(catalog_file)
        stop_player = threading.Event()
        outcome: dict[str, Any] = {}

        def player() -> None:
            try:
                outcome["result"] = live(
                    settings, listens, cat, rate=rate, seconds=seconds, stop=stop_player,
                    on_progress=lambda p: outcome.__setitem__("progress", p),
                )  # fmt: skip
            except BaseException as exc:  # reported by the main thread
                outcome["error"] = exc

        console.print(
            f"player: {len(listens):,} real listens replayed live at {rate:,.0f} events/s for {seconds:.0f} s"
        )
        thread = threading.Thread(target=player, name="player", daemon=True)
        thread.start()
        try:
            while thread.is_alive():
                thread.join(5.0)
                for r in run.processes:
                    if not is_alive(r):
                        raise InfraError(f"{r.name} exited; last lines of {r.log}:\n{tail(Path(r.log))}")
                progress: LiveProgress | None = outcome.get("progress")
                sent = f"{progress.produced:,} player events · " if progress else ""
                run.figures = figures(settings)
                console.print(f"[{time.monotonic() - began:5.0f} s] {sent}{_status_line(run.figures)}")
        finally:
            stop_player.set()
            thread.join(30)
        if "error" in outcome:
            raise outcome["error"]
        console.print(f"player done: {outcome['result'].produced:,} events")

        # business time stops here: no more renewals or payments, so the read models can settle
        for r in [r for r in run.processes if r.name in ("business-clock", "sagas")]:
            stop(r, timeout_s=30)
            pid_file(settings.run_dir, r.name).unlink(missing_ok=True)
            run.processes.remove(r)
        _wait_caught_up(settings)
        stats = run_requester(settings, from_start=True)
        console.print(f"new releases: {stats.albums} albums read, {stats.requested} notifications requested")
        _wait_caught_up(settings)
        run.figures = figures(settings)
        console.print(_status_line(run.figures))
        _report(settings, console, table)
        period = Period.parse(datetime.now(UTC).strftime("%Y-%m"))
        statement, path = run_statement(settings, period, export_dir=settings.data_dir / "exports")
        _print_statement(settings, console, table, str(period), path)
    finally:
        for r in reversed(run.processes):
            stop(r, timeout_s=30)
            pid_file(settings.run_dir, r.name).unlink(missing_ok=True)
        if not keep_running:
            for r in reversed(run.started):
                stop(r)
                pid_file(settings.run_dir, r.name).unlink(missing_ok=True)
    console.print(
        f"\ndone in {time.monotonic() - began:.0f} s; read models in {settings.duckdb_path}", style="bold"
    )
    return run


def _report(settings: Settings, console: Any, table: Any) -> None:
    rows = _query(
        settings,
        "SELECT track_id, plays, skips, round(skip_rate, 2) FROM track_skip_rates "
        "ORDER BY plays DESC, track_id LIMIT 5",
    )
    console.print(table(["track", "plays", "skips", "skip rate"], rows, title="most played tracks (plays)"))
    rows = _query(
        settings,
        "SELECT user_id, kind, state, strftime(valid_from, '%Y-%m-%d %H:%M'), "
        "strftime(valid_until, '%Y-%m-%d %H:%M'), revoke_reason FROM entitlements "
        "ORDER BY user_id, valid_from LIMIT 8",
    )
    console.print(table(["user", "kind", "state", "from", "until", "revoked"], rows, title="entitlements"))
    rows = _query(
        settings,
        "SELECT template, state, count(*) FROM notifications_status GROUP BY ALL ORDER BY ALL",
    )
    console.print(table(["template", "state", "notifications"], rows, title="notifications"))
    rows = _query(
        settings,
        "SELECT territory, count(*) FILTER (WHERE available), count(*) FROM track_availability "
        "GROUP BY ALL ORDER BY territory",
    )
    console.print(table(["territory", "playable", "tracks"], rows, title="track availability now"))


def _print_statement(settings: Settings, console: Any, table: Any, period: str, path: Path | None) -> None:
    rows = _query(
        settings,
        "SELECT track_id, artist_id, territory, plays, amount_minor, currency FROM royalty_statements "
        "WHERE period = ? ORDER BY amount_minor DESC, track_id LIMIT 10",
        [period],
    )
    console.print(table(["track", "artist", "territory", "plays", "amount (minor)", "currency"], rows,
                        title=f"royalty statement {period} (pro rata, top 10)"))  # fmt: skip
    total = _query(
        settings,
        "SELECT currency, sum(amount_minor), sum(plays), count(*) FROM royalty_statements "
        "WHERE period = ? GROUP BY ALL",
        [period],
    )
    for currency, amount, plays, n in total:
        console.print(
            f"{period}: {amount:,} {currency} minor units shared over {plays:,} plays in {n:,} rows"
        )
    if path is not None:
        console.print(f"exported to {path}")


__all__ = ["AGENTS", "READ_MODELS", "LiveRun", "consumer_lag", "figures", "is_ready", "run_live_demo"]
