"""``backbeat replay``: rebuild a read model blue/green from the log (registered by :mod:`infra.cli`).

A thin shell over :func:`projections.replay.replay`.
"""

from __future__ import annotations

import dataclasses
import sys
from typing import Annotated

import typer

from infra.console import console, err_console, progress_bar
from infra.settings import get_settings


def register(app: typer.Typer) -> None:
    """Add the ``replay`` command to the ``backbeat`` app."""
    app.command("replay")(replay_cmd)


def _line(p: object) -> str:
    from projections.replay import ReplayProgress

    assert isinstance(p, ReplayProgress)
    eta = "?" if p.eta_s is None else f"{p.eta_s:,.0f} s"
    return (
        f"replay {p.phase}: {p.events:,}/{p.total:,} events, {p.events_per_s:,.0f} events/s, "
        f"lag {sum(p.lag.values()):,}, ETA {eta}"
    )


def _offsets(offsets: dict[int, int]) -> str:
    return ",".join(f"{p}:{o}" for p, o in sorted(offsets.items()))


def replay_cmd(
    projection: Annotated[str, typer.Argument(help="The read model to rebuild, e.g. listens.")],
    start: Annotated[
        str | None,
        typer.Option(
            "--from",
            help="Where to start: earliest (default: a whole rebuild), an ISO time (2014-04-20T08:00:00Z: "
            "the rows with an event time at or after it are replayed on top of the live rows older than "
            "it) or PARTITION:OFFSET,… (0:100,1:250: the records from those offsets on top of the live "
            "rows of the records before them). A partial replay needs a live read model of the same "
            "version.",
        ),
    ] = None,
    stop: Annotated[
        str | None,
        typer.Option(
            "--to",
            help="Where to stop (exclusive): latest, PARTITION:OFFSET,… or an ISO time (each partition up "
            "to and with its last record whose event time is before it). Default: the end of the log when "
            "the replay starts, extended to the live read model's offsets if its runner went further. An "
            "explicit --to is never extended: if the live read model is past it the replay stops (see "
            "--catch-up).",
        ),
    ] = None,
    catch_up: Annotated[
        bool,
        typer.Option(
            "--catch-up",
            help="With --to: extend the build to the live read model's offsets where they are further, "
            "so the switch never moves it back (reported).",
        ),
    ] = False,
    allow_log_gaps: Annotated[
        bool,
        typer.Option(
            "--allow-log-gaps",
            help="Accept offsets Kafka moved past without a record (transaction markers, compacted "
            "records on a real cluster); by default the switch requires every offset of the range read.",
        ),
    ] = False,
    source: Annotated[
        str, typer.Option(help="kafka (the topic) or archive (the Parquet archive of 'backbeat archive').")
    ] = "kafka",
    drop_old: Annotated[
        bool, typer.Option("--drop-old", help="After a successful switch, drop every non-current version.")
    ] = False,
    drop_only: Annotated[
        bool,
        typer.Option(
            "--drop-only", help="Replay nothing: drop the non-current versions kept by earlier replays."
        ),
    ] = False,
    abandon: Annotated[
        bool, typer.Option("--abandon", help="With --drop-only: also drop an interrupted build.")
    ] = False,
    topic: Annotated[
        str | None, typer.Option(help="Read this topic instead of the projection's own (tests, copies).")
    ] = None,
    batch_size: Annotated[int, typer.Option(help="Records per read from the source.", min=1)] = 50_000,
    write_rows: Annotated[
        int | None,
        typer.Option(
            help="Rows per DuckDB transaction, at least: reads are gathered up to it. Default 122,880, "
            "DuckDB's row group, which DuckDB writes straight to the file instead of to its WAL.",
            min=1,
            show_default=False,
        ),
    ] = None,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask before starting.")] = False,
) -> None:
    """Rebuild a read model from the log **blue/green**: the new version is built beside the live
    one, verified, then readers are switched to it in one transaction. Queries keep working all
    along ('backbeat sql' gets in between the replay's batches).

    **When to use it:** after changing a projection's mapping (bump its `version`), to repair a
    read model you suspect, or to rebuild one from a point in time, without downtime.

    **How:** the build gets its own table (`<name>__v<version>_b<n>`) and its own offsets; it reads
    `--from`…`--to` with the projection's own code and appends every mapped row, then catches up
    with the live read model's offsets and applies the projection's policy once (one row per key).

    **Verification** before the switch (the first failure stops it): *coverage*, every offset of
    every partition's range was read once, in order (an archive that ends early, a skipped or
    repeated offset: the message names the partition and offsets, the build is kept and resumes);
    *digest*, the rows in the build are exactly the rows the mapping produced from the records
    read (count and a checksum of every column: a row lost, written twice or altered fails);
    *content*, equal to the live read model when it is the same version at the same offsets, else
    one row per distinct key. On a digest or content mismatch nothing is switched, both versions are
    kept and the command exits 1. **Switch:** the read model's name becomes a view over the new
    table; 'backbeat project' then writes into it. After a version bump a lake read model's Parquet
    lake is rewritten too (lake/NAME then points at the new version's files). Old versions are
    kept until --drop-old / --drop-only.

    The saga read models (sagas, saga_events, saga_order_lines, inventory_*, gateway_operations)
    are rebuilt whole from their stores (no --from/--to/--source).

    A replay interrupted (Ctrl-C, kill) resumes where it was when run again. The stateful read
    model (recommendations) is rebuilt whole (--from earliest only) in a separate DuckDB file,
    verified, and swapped in table by table in one transaction."""
    from projections.readmodels import get_projection
    from projections.replay import WRITE_ROWS, drop_old_versions, replay
    from projections.runner import STATEFUL

    settings = get_settings()
    if drop_only:
        dropped = drop_old_versions(settings, projection, abandon=abandon)
        console.print(f"dropped {', '.join(dropped) or 'nothing'}")
        return
    override = None
    if topic is not None:
        base = STATEFUL[projection][0] if projection in STATEFUL else get_projection(projection)
        override = dataclasses.replace(base, topic=topic)
    if not yes and sys.stdin.isatty():
        typer.confirm(
            f"Rebuild {projection} from {source} ({start or 'earliest'} → {stop or 'end of log'}) and switch "
            "readers to it once verified?",
            abort=True,
        )
    live = sys.stderr.isatty()
    with progress_bar() as bar:
        task = bar.add_task(f"replay {projection}", total=None)

        def show(p: object) -> None:
            from projections.replay import ReplayProgress

            assert isinstance(p, ReplayProgress)
            if live:
                bar.update(task, completed=p.events, total=p.total, description=f"replay {p.phase}")
            else:  # a log line per batch when not on a terminal
                print(_line(p), file=sys.stderr, flush=True)

        result = replay(
            settings, projection, source=source, start=start, stop=stop, drop_old=drop_old,
            progress=show, projection=override, batch_size=batch_size,
            write_rows=write_rows or WRITE_ROWS, catch_up=catch_up, allow_log_gaps=allow_log_gaps,
        )  # fmt: skip
    v = result.verification
    if not result.verified:
        err_console.print(
            f"[red]not switched:[/red] build {result.build} of {projection} (table {result.table}) failed "
            f"verification ({v.mode}): {v.detail}. Both versions are kept; drop the failed one with "
            f"'backbeat replay {projection} --drop-only'."
        )
        raise typer.Exit(1)
    console.print(
        f"{projection} is now version {result.version} (table {result.table}, build {result.build}"
        f"{', resumed' if result.resumed else ''}): {result.events:,} events in {result.seconds:,.1f} s "
        f"({result.events_per_s:,.0f} events/s); verified ({v.mode}): {v.detail}"
    )
    if result.extended:
        console.print(
            f"extended past the --to asked ({_offsets(result.requested_stop)}) to the live read model's "
            f"offsets ({_offsets(result.stop)})"
        )
    if result.copied:
        console.print(f"{result.copied:,} rows of the live read model before the cut taken over")
    if result.lake_files:
        console.print(
            f"the Parquet lake was rewritten for version {result.version}: {result.lake_files} files"
        )
    if result.dropped:
        console.print(f"dropped {', '.join(result.dropped)}")
