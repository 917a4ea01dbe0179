"""``backbeat dlq`` (dead-letter topics) and ``backbeat projections rejects`` (a read model's
rejected records): see what failed and why, and put it back once the cause is fixed
(registered by :mod:`infra.cli`).

A thin shell over :mod:`events.dead_letters` and :mod:`projections.rejects`.
"""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer

from infra.console import console, err_console, progress_bar, table
from infra.errors import InfraError
from infra.settings import get_settings

JsonOption = Annotated[bool, typer.Option("--json", help="Print one JSON object instead of a table.")]
ReasonContains = Annotated[
    str | None, typer.Option("--reason", "-r", help="Only rejects whose reason contains this text.")
]

dlq_app = typer.Typer(
    help="Dead-letter topics (*.dlq): what failed and why ('list'), and putting records back into "
    "their topic once the cause is fixed ('redrive', each record once).",
    no_args_is_help=True,
    rich_markup_mode="markdown",
)
rejects_app = typer.Typer(
    help="A read model's rejected records (projection_rejects): 'list' them by reason, 'reapply' "
    "them once the cause is gone.",
    no_args_is_help=True,
    rich_markup_mode="markdown",
)


def register(app: typer.Typer) -> None:
    """Add ``dlq`` to the ``backbeat`` app and ``rejects`` to its ``projections`` group."""
    app.add_typer(dlq_app, name="dlq")
    for group in app.registered_groups:
        if group.name == "projections" and group.typer_instance is not None:
            group.typer_instance.add_typer(rejects_app, name="rejects")
            break
    else:  # pragma: no cover - infra.cli defines the group before registering command modules
        app.add_typer(rejects_app, name="rejects")


class _Bar:
    """A rich progress bar (on stderr) fed by ``(phase, done, total)`` reports."""

    def __init__(self) -> None:
        self.bar = progress_bar()
        self.tasks: dict[str, Any] = {}

    def __enter__(self) -> _Bar:
        self.bar.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.bar.__exit__(None, None, None)

    def __call__(self, phase: str, done: int, total: int | None) -> None:
        task = self.tasks.get(phase)
        if task is None:
            task = self.tasks[phase] = self.bar.add_task(phase, total=total)
        self.bar.update(task, completed=done, total=total)


@dlq_app.command("list")
def dlq_list(
    topic: Annotated[str, typer.Argument(help="The dead-letter topic, e.g. playback.listens.dlq.")],
    as_json: JsonOption = False,
) -> None:
    """Count the dead letters of TOPIC by reason (the dlq_reason header: decode_error,
    validation_error, …), with the first and last offset per partition, the topics they came
    from (dlq_topic), how many were redriven already, and one example error (dlq_error).

    Reads the whole topic, up to its end now; changes nothing."""
    from events.dead_letters import summarize

    settings = get_settings()
    with _Bar() as bar:
        summary = summarize(settings, topic, progress=None if as_json else bar)
    if as_json:
        print(json.dumps(summary.as_json()))
        return
    rows = [
        (
            r.reason,
            r.count,
            r.redriven,
            " ".join(f"{p}:{first}-{last}" for p, (first, last) in sorted(r.offsets.items())),
            ", ".join(f"{t} ({n:,})" for t, n in sorted(r.sources.items())),
            r.example[:80],
        )
        for r in summary.reasons
    ]
    console.print(table(["reason", "count", "redriven", "offsets (p:first-last)", "from", "example"], rows))
    console.print(f"{summary.records:,} dead letters in {topic}")


@dlq_app.command("redrive")
def dlq_redrive(
    topic: Annotated[str, typer.Argument(help="The dead-letter topic, e.g. playback.listens.dlq.")],
    reason: Annotated[
        str | None, typer.Option("--reason", "-r", help="Only dead letters of this dlq_reason.")
    ] = None,
    to: Annotated[
        str | None,
        typer.Option("--to", help="Put them into this topic (partitioned by key) instead of their own."),
    ] = None,
    as_json: JsonOption = False,
) -> None:
    """Put the dead letters of TOPIC back into the topic and partition they came from (the
    dlq_topic and dlq_partition headers), with their key, value, timestamp and headers minus the
    dlq_* ones, after the cause is fixed (a schema registered, a bug in an agent fixed).

    Idempotent: each redriven record carries a bb_redrive header naming its origin, and what was
    redriven is recorded in $BACKBEAT_DATA_DIR/dlq/TOPIC.redrive.json after it was found in the
    target topic; running it again, even after a crash mid-way, puts nothing back twice. A record
    that fails again is dead-lettered again and can be redriven again after the next fix."""
    from events.dead_letters import redrive

    settings = get_settings()
    with _Bar() as bar:
        result = redrive(settings, topic, reason=reason, to=to, progress=None if as_json else bar)
    if as_json:
        print(json.dumps({**result.__dict__, "per_target": dict(result.per_target)}))
        return
    for target, n in sorted(result.per_target.items()):
        console.print(f"redriven {n:,} records into {target}")
    console.print(
        f"{result.selected:,} dead letters selected: {result.redriven:,} redriven now, {result.already:,} "
        f"redriven before, {result.no_origin:,} without an origin topic (use --to)"
    )


@rejects_app.command("list")
def rejects_list(
    name: Annotated[str, typer.Argument(help="The read model, e.g. listens.")],
    reason: ReasonContains = None,
    limit: Annotated[int, typer.Option(help="Print at most this many rejects after the counts.")] = 20,
    as_json: JsonOption = False,
) -> None:
    """Count the rejects of read model NAME by reason (not decodable, unknown schema id, another
    event type, a domain rule broken, not mappable to a row) and show the first of them with
    their topic, partition and offset. 'backbeat consume TOPIC --from P:O' shows the record."""
    from projections.rejects import list_rejects, reasons_of

    rows = list_rejects(get_settings(), name, reason)
    if as_json:
        print(
            json.dumps(
                {
                    "projection": name,
                    "rejects": len(rows),
                    "reasons": [{"reason": r, "count": n} for r, n in reasons_of(rows)],
                    "first": [
                        {"topic": r.topic, "partition": r.partition, "offset": r.offset, "reason": r.reason}
                        for r in rows[:limit]
                    ],
                }
            )
        )
        return
    console.print(table(["reason", "count"], reasons_of(rows), title=f"{len(rows):,} rejects of {name}"))
    if rows and limit > 0:
        shown = [(r.topic, r.partition, r.offset, r.reason, r.rejected_at) for r in rows[:limit]]
        console.print(table(["topic", "partition", "offset", "reason", "rejected at"], shown))


@rejects_app.command("reapply")
def rejects_reapply(
    name: Annotated[str, typer.Argument(help="The read model, e.g. listens.")],
    reason: ReasonContains = None,
    as_json: JsonOption = False,
) -> None:
    """Re-apply the rejects of read model NAME once their cause is gone (a schema registered,
    a mapping fixed): their offsets are read from Kafka again, decoded, validated and mapped by the
    runner's own code; what passes is written (rows, lake files) and leaves projection_rejects in
    the same transaction, what is still bad stays rejected with its reason updated.

    Re-applying twice applies once. A late record never undoes a newer one: a 'last' read model
    keeps a key's newer row, a 'first' one a key already present. Works while 'backbeat project'
    runs."""
    from projections.rejects import reapply

    settings = get_settings()
    if as_json:
        result = reapply(settings, name, reason=reason)
    else:
        with progress_bar() as bar:
            task = bar.add_task(f"reapply {name}", total=None)
            result = reapply(
                settings, name, reason=reason,
                progress=lambda done, total: bar.update(task, completed=done, total=total),
            )  # fmt: skip
    if as_json:
        print(json.dumps({**result.__dict__, "reasons": dict(result.reasons)}))
        return
    console.print(
        f"{result.rejects:,} rejects: {result.applied:,} rows applied, {result.superseded:,} superseded by "
        f"rows already there, {result.cleared:,} cleared, {result.kept:,} still rejected, "
        f"{result.missing:,} not found in the log ({result.seconds:.1f} s)"
    )
    for why, n in result.reasons.most_common(10):
        err_console.print(f"  still rejected ({n:,}): {why}")
    if result.missing:
        raise InfraError(f"{result.missing} rejected offsets of {name} were not found in the log")
