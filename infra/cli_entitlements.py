"""``backbeat entitlements USER`` ("may this user play premium content now?"),
``backbeat sagas simulate-subscriptions`` (subscriptions over months of simulated time) and
``backbeat sagas clock`` (the business clock of a live run), registered by :mod:`infra.cli` /
:mod:`infra.cli_sagas`.

``entitlements`` answers from the ``entitlements`` read model (:mod:`sagas.access`) at the
business clock's now (the latest ``ClockTicked`` in ``business_clock``) or, with no simulated
clock, at the wall clock; ``--at`` asks about another instant. Exit status: 0 yes, 1 no (or an
error, whose message says what to do).
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Annotated, Any

import typer

from infra.errors import BackbeatError


class BadTimeError(BackbeatError):
    """``--at`` is not an ISO-8601 time."""


def parse_at(text: str) -> datetime:
    """An ISO-8601 date or time (``2026-03-01``, ``2026-03-01T10:00:00Z``, ``…+02:00``) as a naive
    UTC ``datetime``; no offset means UTC.

    Raises:
        BadTimeError: ``text`` is not such a time.
    """
    try:
        when = datetime.fromisoformat(text.strip())
    except ValueError:
        raise BadTimeError(
            f"--at {text!r} is not an ISO-8601 time; use e.g. 2026-03-01T12:00:00Z or 2026-03-01 "
            "(a time without an offset is UTC)"
        ) from None
    return when.astimezone(UTC).replace(tzinfo=None) if when.tzinfo else when


def _iso(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat(timespec="seconds") + "Z"
    return value


def to_json(doc: dict[str, Any]) -> str:
    """The ``--json`` document of :func:`sagas.access.answer` (times ISO-8601 UTC with ``Z``)."""
    out = {k: _iso(v) for k, v in doc.items() if k != "entitlements"}
    out["entitlements"] = [
        {k: _iso(v) for k, v in row.items() if k != "covers"} for row in doc["entitlements"]
    ]
    return json.dumps(out, indent=2)


def entitlements(
    user: Annotated[str, typer.Argument(metavar="USER", help="The user id.")],
    at: Annotated[
        str | None,
        typer.Option(
            "--at",
            metavar="ISO-TIME",
            help="Ask about this instant instead of now (the business clock's now when a simulation "
            "ticks one, else the wall clock), e.g. 2026-03-01T12:00:00Z; no offset means UTC.",
        ),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON document.")] = False,
) -> None:
    """May USER play premium content now? Answers from the entitlements read model (which
    'backbeat project' or 'backbeat sagas simulate-subscriptions' builds): yes with the end of the
    paid period, or no with the reason. Exit status 0 yes, 1 no."""
    from infra.console import console, table
    from infra.settings import get_settings
    from sagas.access import read_answer

    doc = read_answer(get_settings(), user, parse_at(at) if at else None)
    if as_json:
        print(to_json(doc))
    else:
        verdict = f"yes, until {doc['until']:%Y-%m-%d %H:%M:%S} UTC" if doc["premium"] else "no"
        console.print(
            f"user {user} at {doc['at']:%Y-%m-%d %H:%M:%S} UTC ({doc['clock']} clock): premium {verdict}"
        )
        console.print(f"why: {doc['why']}")
        rows = [
            [r["entitlement_id"], r["kind"], r["subscription_id"] or "—", r["valid_from"], r["valid_until"],
             r["state"], r["revoke_reason"] or "—"]
            for r in doc["entitlements"]
        ]  # fmt: skip
        if rows:
            columns = [
                "entitlement",
                "kind",
                "subscription",
                "valid from",
                "valid until",
                "state",
                "revoked for",
            ]
            console.print(table(columns, rows, title=f"entitlements of {user}"))
    if not doc["premium"]:
        raise typer.Exit(1)


def simulate_subscriptions(
    users: Annotated[int, typer.Option(help="Subscriptions requested (one per user).", min=1)] = 200,
    days: Annotated[int, typer.Option(help="Simulated days to run.", min=1)] = 180,
    request_days: Annotated[int, typer.Option(help="Requests spread over the first N days.", min=1)] = 20,
    seed: Annotated[int, typer.Option(help="Seed of the workload and of every simulated fault.")] = 17,
    decline: Annotated[float, typer.Option(help="Share of authorisations the gateway declines.")] = 0.2,
    duplicate: Annotated[float, typer.Option(help="Share of gateway answers given twice.")] = 0.05,
    cancel_share: Annotated[float, typer.Option(help="Share of users who ask to cancel.")] = 0.25,
    kill_orchestrator: Annotated[
        int, typer.Option(help="Times the orchestrator is SIGKILLed (and restarted) mid-run.", min=0)
    ] = 2,
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary as one JSON line.")] = False,
) -> None:
    """Subscriptions over time: run USERS subscriptions through DAYS of simulated business time
    (renewal at each period end, dunning retries 1, 3 and 7 days after a declined renewal, then
    lapse; cancellations effective at the period end), driving the business clock
    (platform.clock) in lockstep with the orchestrator and SIGKILLing it mid-run; then build the
    read models (entitlements, subscription_periods, ledger_entries, sagas) and check every
    invariant. Exits 1 if one fails."""
    from infra.console import console
    from infra.settings import get_settings
    from sagas.invariants import format_report
    from sagas.subscription_sim import SubscriptionSimConfig, simulate_subscriptions_command

    config = SubscriptionSimConfig(
        users=users, days=days, request_days=request_days, seed=seed, decline=decline, duplicate=duplicate,
        cancel_share=cancel_share, kill_orchestrator=kill_orchestrator, deadline_s=max(300.0, days * 5.0),
    )  # fmt: skip
    last = [-1]

    def progress(run: Any) -> None:
        day = (run.now_ms - config.start_ms) // 86_400_000
        if day != last[0] and not as_json:
            last[0] = day
            console.print(f"day {day:>4}/{days}: {run.requests} requests, {run.cancellations} cancellations, "
                          f"{run.ticks} ticks, {len(run.kills)} kills", highlight=False)  # fmt: skip

    settings = get_settings()
    run, results = simulate_subscriptions_command(settings, config, on_progress=progress, echo=console.print)
    summary = _summary(settings, run, results)
    if as_json:
        print(json.dumps(summary, default=str))
    else:
        for key, value in summary.items():
            if key != "invariants":
                console.print(f"{key}: {value}", highlight=False)
        console.print(format_report(results))
    if not all(r.ok for r in results):
        raise typer.Exit(1)


def clock(
    speed: Annotated[
        float, typer.Option(help="Business ms per wall ms (86400: a day per second).")
    ] = 86_400.0,
    interval_s: Annotated[float, typer.Option(help="Wall seconds between ticks.")] = 1.0,
    clock_id: Annotated[str, typer.Option(help="The clock's id in its ticks.")] = "live",
) -> None:
    """Tick the business clock (platform.clock) until Ctrl-C, business time running SPEED times
    faster than the wall clock and continuing from the last tick on the topic: the orchestrator
    renews, retries and ends subscriptions as their due times pass. Serves /metrics and /health
    as process business-clock."""
    from sagas.clock import main

    code = main(["--speed", str(speed), "--interval-s", str(interval_s), "--clock-id", clock_id])
    if code:
        raise typer.Exit(code)


def _summary(settings: Any, run: Any, results: list[Any]) -> dict[str, Any]:
    from projections.store import reader

    with reader(settings.duckdb_path) as con:
        events = dict(
            con.execute(
                "SELECT CASE WHEN event_type = 'SubscriptionCancelled' THEN event_type || ':' || reason "
                "ELSE event_type END, count(*) FROM subscription_events WHERE subscription_id LIKE ? "
                "GROUP BY ALL",
                [run.run_id + "-%"],
            ).fetchall()
        )
        retried = con.execute(
            "SELECT count(*) FROM subscription_events WHERE event_type = 'SubscriptionRenewed' "
            "AND attempt > 1 AND subscription_id LIKE ?",
            [run.run_id + "-%"],
        ).fetchone()[0]
        revenue = con.execute(
            "SELECT currency, -sum(amount_minor) FROM ledger_entries WHERE account = 'revenue' GROUP BY ALL"
        ).fetchall()
    return {
        "run_id": run.run_id,
        "elapsed_s": round(run.ended_at - run.started_at, 1),
        "ticks": run.ticks,
        "kills": len(run.kills),
        "events": events,
        "renewals_paid_on_retry": retried,
        "revenue_minor": {c: int(v) for c, v in revenue},
        "invariants_ok": all(r.ok for r in results),
        "invariants": {r.name: r.ok for r in results},
    }


def register(app: typer.Typer) -> None:
    """Add ``backbeat entitlements`` to the ``backbeat`` app."""
    app.command("entitlements")(entitlements)
