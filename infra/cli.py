"""The ``backbeat`` command line (typer). Each command is a thin shell over a library function;
errors derived from :class:`infra.errors.BackbeatError` print their message and exit 1."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from infra.console import console, err_console, progress_bar, run_with_bar, table
from infra.errors import BackbeatError, ConfigError
from infra.runtime import tune_gc
from infra.settings import Settings, get_settings

if TYPE_CHECKING:
    from projections.readmodels import Projection

app = typer.Typer(
    name="backbeat",
    help=(
        "backbeat: an event-sourced streaming backbone for a music platform. Avro events in "
        "Kafka, Faust agents, DuckDB/Parquet read models.\n\n"
        "Settings come from BACKBEAT_* environment variables (BACKBEAT_BOOTSTRAP_SERVERS, "
        "BACKBEAT_REGISTRY_URL, BACKBEAT_DATA_DIR); the defaults use the embedded broker and "
        "registry started by 'backbeat up' and ./var for data."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="markdown",
)


def _group(name: str, help_text: str) -> typer.Typer:
    """A sub-command group of ``backbeat``, registered under ``name``."""
    group = typer.Typer(help=help_text, no_args_is_help=True, rich_markup_mode="markdown")
    app.add_typer(group, name=name)
    return group


topics_app = _group("topics", "The topic catalogue (infra/topics.toml).")
import_app = _group("import", "Import real data sets as events.")
projections_app = typer.Typer(
    help="Read models: list them (bare 'backbeat projections' lists them too), reset one to rebuild it; "
    "'backbeat replay' rebuilds one blue/green.",
    invoke_without_command=True,
    rich_markup_mode="markdown",
)
app.add_typer(projections_app, name="projections")
schemas_app = _group("schemas", "Avro schemas under schemas/: compatibility checks.")


def _settings() -> Settings:
    return get_settings()


# -- infrastructure ------------------------------------------------------------------------------
@app.command()
def up() -> None:
    """Start the embedded broker, the schema registry and the archiver; wait until they answer.

    The Tansu broker listens on BACKBEAT_BOOTSTRAP_SERVERS (default 127.0.0.1:9092), the
    registry on BACKBEAT_REGISTRY_URL (default http://127.0.0.1:8081). The broker keeps topics
    in memory, so when it starts empty and the Parquet lake holds an archive
    ($BACKBEAT_DATA_DIR/lake/archive), the archive is restored first (same records, same
    offsets); the archiver then copies every topic to the lake continuously. Pids and logs go to
    $BACKBEAT_DATA_DIR/run. What already runs is left alone."""
    from infra import services

    settings = _settings()
    started = services.up(settings, archive=True, report=console.print)
    for running in started:
        console.print(f"started {running.name} on {running.address} (pid {running.pid})")
    if not started:
        console.print("already running; 'backbeat status' shows what")
    console.print(
        "note: the embedded broker keeps topics in memory; the archiver keeps them in the lake and "
        "the next 'backbeat up' restores them",
        style="dim",
    )


@app.command()
def down() -> None:
    """Stop what 'backbeat up' started (by recorded pid, nothing else)."""
    from infra import services

    stopped = services.down(_settings())
    console.print(f"stopped {', '.join(stopped)}" if stopped else "nothing was running")


@app.command()
def status() -> None:
    """Show whether the embedded broker and registry run, with pids and logs; then every running
    backbeat process that serves /metrics and /health (worker, runner, archiver, saga processes),
    with its address and what /health says (ready, starting, stopping, unreachable)."""
    from infra import services

    settings = _settings()
    rows = [
        (s.name, s.address, s.state, s.pid if s.pid is not None else "", s.log or "")
        for s in services.status(settings)
    ]
    console.print(table(["service", "address", "state", "pid", "log"], rows))
    procs = services.process_health(settings)
    if procs:
        console.print(
            table(
                ["process", "pid", "metrics and health", "health", "not ready yet"],
                [(p.process, str(p.pid or ""), p.url, p.status, ", ".join(p.waiting)) for p in procs],
            )
        )


@topics_app.command("apply")
def topics_apply() -> None:
    """Create the catalogue's missing topics and report drift (idempotent)."""
    from infra.provision import apply_topics

    reports = apply_topics(_settings())
    console.print(table(["topic", "action", "detail"], [(r.name, r.action, r.detail) for r in reports]))
    drift = [r for r in reports if r.action == "drift"]
    if drift:
        err_console.print(f"{len(drift)} topic(s) differ from infra/topics.toml (not changed)")


@topics_app.command("list")
def topics_list() -> None:
    """List the declared topics with partitions, cleanup policy, key and event types."""
    from events.catalog import load_catalogue

    rows = [
        (t.name, t.partitions, t.cleanup_policy, t.key, ", ".join(t.event_types))
        for t in load_catalogue().values()
    ]
    console.print(table(["topic", "partitions", "cleanup", "key", "event types"], rows))


# -- importers -----------------------------------------------------------------------------------
def _print_import(result: object) -> None:
    from events.importers.base import ImportResult

    assert isinstance(result, ImportResult)
    console.print(
        f"{result.source} → {result.topic}: {result.rows_read:,} rows read, "
        f"{result.produced:,} events produced, {result.duplicates:,} duplicate rows collapsed "
        f"(same event id), {result.rejected:,} rejected, in {result.seconds:.1f} s"
    )
    for reject in result.rejects[:20]:
        err_console.print(f"  line {reject.line}: {reject.reason}")
    if result.rejected > 20:
        err_console.print(f"  … and {result.rejected - 20:,} more rejected rows")


@import_app.command("listens")
def import_listens_cmd(
    file: Annotated[
        Path, typer.Argument(help="The listening log (TSV, plain or gzip).", exists=True, dir_okay=False)
    ],
    fmt: Annotated[
        str, typer.Option("--format", "-f", help="30music (30Music TSV with header) or lastfm1k.")
    ] = "30music",
    close_sessions: Annotated[
        bool,
        typer.Option(
            help="After the file, send a watermark past its last event time so every listening "
            "session closes (the file is a bounded source)."
        ),
    ] = True,
) -> None:
    """Import listens (30Music or Last.fm-1K) into playback.listens.

    Events are ListenRecorded, keyed by user, produced in event-time order, with event ids
    derived from (user, time, track): re-importing a file changes nothing downstream, and
    duplicate rows collapse into one event. Rejected rows are listed with line and reason."""
    from events.importers.run import import_listens

    settings = _settings()
    result = run_with_bar(
        f"import {file.name}",
        lambda total, advance: import_listens(
            settings, file, fmt, close_sessions=close_sessions, on_parsed=total, progress=advance
        ),
    )
    _print_import(result)


@import_app.command("ads")
def import_ads_cmd(
    file: Annotated[
        Path,
        typer.Argument(
            help="Open Bandit CSV, plain or gzip (e.g. random/all/all.csv).", exists=True, dir_okay=False
        ),
    ],
    campaigns: Annotated[
        Path | None,
        typer.Option(
            help="Campaigns file: items, prices, budgets (default: infra/campaigns.toml).", exists=True
        ),
    ] = None,
    close_windows: Annotated[
        bool,
        typer.Option(
            help="After the file, send a watermark past its last event time so every report window "
            "closes (the file is a bounded source)."
        ),
    ] = True,
) -> None:
    """Import Open Bandit ad logs into ads.delivery: impressions and their clicks.

    Each row is one AdImpressionServed (ad = item, campaign from the campaigns file); a clicked
    row adds an AdClicked at a deterministic delay after it (95% 2 s–10 min, 5% 30–60 min).
    Events are keyed by campaign, in event-time order, with ids derived from the row's content:
    re-importing changes nothing downstream. Rejected rows are listed with line and reason."""
    from events.campaigns import CAMPAIGNS_FILE
    from events.importers.run import import_ads

    settings = _settings()
    result = run_with_bar(
        f"import {file.name}",
        lambda total, advance: import_ads(
            settings, file, campaigns=campaigns or CAMPAIGNS_FILE, close_windows=close_windows,
            on_parsed=total, progress=advance,
        ),
    )  # fmt: skip
    console.print(
        f"{result.source} → {result.topic}: {result.rows_read:,} rows read, "
        f"{result.impressions:,} impressions and {result.clicks:,} clicks produced, "
        f"{result.duplicates:,} duplicate rows collapsed (same content), {result.rejected:,} rejected, "
        f"in {result.seconds:.1f} s"
    )
    for reject in result.rejects[:20]:
        err_console.print(f"  line {reject.line}: {reject.reason}")
    if result.rejected > 20:
        err_console.print(f"  … and {result.rejected - 20:,} more rejected rows")


@import_app.command("catalog")
def import_catalog_cmd(
    file: Annotated[
        Path, typer.Argument(help="Spotify songs CSV, plain or gzip (.csv or .csv.gz).", exists=True)
    ],
) -> None:
    """Import the Spotify catalog into catalog.tracks.

    One TrackPublished per track id (later rows of a track count as duplicates), keyed by
    track id, ordered by album release date."""
    from events.importers.run import import_catalog

    settings = _settings()
    result = run_with_bar(
        f"import {file.name}",
        lambda total, advance: import_catalog(settings, file, on_parsed=total, progress=advance),
    )
    _print_import(result)


@app.command()
def produce(
    topic: Annotated[str, typer.Argument(help="Topic to write to (see 'backbeat topics list').")],
    file: Annotated[
        Path | None,
        typer.Option("--file", "-f", help="JSON-lines file (default: standard input).", exists=True),
    ] = None,
    event_type: Annotated[
        str | None, typer.Option(help="Event type, e.g. ListenRecorded (needed when the topic has several).")
    ] = None,
    key_field: Annotated[
        str | None, typer.Option(help="Field whose value is the record key (default: the topic's key).")
    ] = None,
) -> None:
    """Write JSON lines as Avro events (Confluent wire format, CloudEvents headers).

    Each line is one JSON object matching the event type's schema; timestamp-millis fields take
    ms or an ISO-8601 time. Every line is validated first: if any line is bad JSON or does not
    match the schema, the errors name the line and the field and nothing is sent."""
    from events.console_io import produce_json_lines

    source = file.read_text(encoding="utf-8").splitlines() if file else sys.stdin.read().splitlines()
    try:
        report = produce_json_lines(
            _settings(), topic, source, event_type=event_type, key_field=key_field
        )
    except BackbeatError as exc:
        problems = getattr(exc, "problems", None)
        if problems:
            for problem in problems:
                where = f"line {problem.line}: {problem.field}" if problem.field else f"line {problem.line}"
                err_console.print(f"{where}: {problem.reason}", markup=False)
            err_console.print(f"[bold red]error:[/] {len(problems)} bad line(s); nothing was sent")
            raise typer.Exit(1) from None
        raise
    console.print(
        f"sent {report.produced:,} {report.event_type} to {report.topic} (key: {report.key_field})"
    )


@app.command()
def consume(
    topic: Annotated[str, typer.Argument(help="Topic to read.")],
    start: Annotated[
        str,
        typer.Option(
            "--from", help="earliest, latest, an offset N, P:N[,P:N…], or an ISO-8601 time."
        ),
    ] = "earliest",
    limit: Annotated[int | None, typer.Option(help="Stop after this many records.")] = None,
    follow: Annotated[bool, typer.Option("--follow", help="Keep waiting for new records.")] = False,
) -> None:
    """Print records as JSON lines: key, headers, partition, offset, timestamp and the decoded
    value (times in ms).

    Without --follow it stops at the end of the log as it was at start. Undecodable records are
    printed with an 'error' field, control records (watermarks) with 'control'."""
    from events.console_io import consume as consume_records
    from events.console_io import to_json_line

    for record in consume_records(_settings(), topic, start=start, limit=limit, follow=follow):
        print(to_json_line(record), flush=True)


@schemas_app.command("check")
def schemas_check(
    against: Annotated[
        str,
        typer.Option(
            help="'registry' (what is registered, at each subject's level), 'history' (every "
            "committed version of each file, as CI runs it) or a git revision such as HEAD~1."
        ),
    ] = "registry",
    level: Annotated[
        str, typer.Option(help="Compatibility level for 'history' and git revisions.")
    ] = "BACKWARD",
    repo: Annotated[
        Path | None,
        typer.Option(help="Git checkout whose schemas/ to check (default: the installed schemas; "
                     "for 'history' and revisions, the checkout backbeat runs from)."),
    ] = None,
) -> None:
    """Check that schemas/ is compatible with what came before; exit 1 on a breaking change.

    Verdicts come from the Apache avro package's compatibility checker. BACKWARD: consumers
    with the new schema read data written with the old one (add fields only with defaults,
    remove only fields that had defaults); FORWARD: the reverse; FULL: both; *_TRANSITIVE:
    against every earlier version, not only the latest."""
    from events.schema_check import check_against_registry, check_against_revision, check_history
    from infra.settings import REPO_ROOT

    root = (repo or REPO_ROOT).resolve()
    if against == "registry":
        verdicts = check_against_registry(_settings().registry_url, repo.resolve() if repo else None)
    elif against == "history":
        verdicts = check_history(level.upper(), root)
    else:
        verdicts = check_against_revision(against, level.upper(), root)
    rows = [(v.full_name, v.against, v.level, v.status) for v in verdicts]
    console.print(table(["event type", "against", "level", "status"], rows))
    bad = [v for v in verdicts if not v.ok]
    for verdict in bad:
        where = f"{verdict.level}, {verdict.against}"
        err_console.print(f"\n[bold red]{verdict.full_name}[/] is incompatible ({where}):")
        for line in verdict.diff:
            err_console.print(f"  {line}", markup=False)
        for problem in verdict.problems:
            err_console.print(f"  ✗ {problem}", markup=False)
    if bad:
        raise typer.Exit(1)
    console.print(f"{len(verdicts)} checked, no breaking change")


# -- stream processing and read models -------------------------------------------------------------
@app.command()
def worker(
    loglevel: Annotated[
        str | None,
        typer.Option(
            "--loglevel", "-l", help="critical|error|warning|info|debug (default BACKBEAT_LOG_LEVEL, info)"
        ),
    ] = None,
    ops_port: Annotated[
        str | None,
        typer.Option(
            "--ops-port",
            help="Port of /metrics and /health (default BACKBEAT_OPS_PORT, else 9460, or a free one "
            "when 9460 is taken); 'off' serves nothing.",
        ),
    ] = None,
) -> None:
    """Run the stream agents (a Faust worker of streams.app) until stopped.

    The same as 'faust -A streams.app worker'. BACKBEAT_STREAMS_AGENTS chooses the agent
    groups (ingest, features, ads, playback, ledger; default all). Listening from playback turns
    player events (playback.events) into listens by the 30-second rule; the ledger agent posts
    billing.payments to billing.ledger. Listening ingest reads playback.listens,
    dead-letters bad records to playback.listens.dlq and emits SessionEnded events to
    listening.sessions; every agent checkpoints its state to a changelog topic and restores it
    from there at start (a crash loses nothing and publishes nothing twice). Stop it with Ctrl-C
    or SIGTERM: the batch in flight is checkpointed first.

    Operations: GET /metrics (Prometheus: records in/out, dead letters by reason, consumer lag,
    batch seconds, state entries, per agent) and GET /health (200 once every agent has restored
    its state and caught up with the log as it stood at start; 503 "starting" before, "stopping"
    on SIGTERM) on --ops-port; the address is written to <data_dir>/run/worker.ops.json. Logs go
    to stderr, one JSON object per line with BACKBEAT_LOG_FORMAT=json."""
    from streams.app import create_app, run_worker

    faust_app = create_app(ops_port=ops_port, log_level=loglevel)
    sys.argv = [sys.argv[0]]  # Faust's worker parses the command line itself
    run_worker(faust_app)


def _runner_progress(bar: object, task: object) -> object:
    from projections.runner import Progress as RunnerProgress

    def hook(p: RunnerProgress) -> None:
        bar.update(task, completed=p.done, total=p.total)  # type: ignore[attr-defined]

    return hook


@app.command()
def project(
    projection: Annotated[
        list[str] | None,
        typer.Option("--projection", "-p", help="Projection to run (repeatable; default: all)."),
    ] = None,
    until_caught_up: Annotated[
        bool, typer.Option(help="Stop when every partition reached the end of the log taken at start.")
    ] = False,
    ops_port: Annotated[
        str | None,
        typer.Option(
            "--ops-port",
            help="Port of /metrics and /health while it runs (a number, 0 = any free port, 'off'; "
            "default BACKBEAT_OPS_PORT, else 9461). Not served with --until-caught-up.",
        ),
    ] = None,
) -> None:
    """Materialise read models into DuckDB and the Parquet lake: listens, sessions, tracks, the
    feature store (user_features, track_features), recommendations, the ad reports
    (ad_reports, ad_reports_item, campaign_pauses), the billing ledger (ledger_entries), and the
    live platform's: plays (skip rates), track_changes, licences, albums (tracks_current,
    track_availability), entitlement_events, subscription_events, business_clock (entitlements,
    subscription_periods) and notifications (notifications_status).

    Batches are decoded to Arrow and written in one DuckDB transaction together with the
    consumed offsets, so read models are exactly-once. Runs until stopped (Ctrl-C / SIGTERM)
    unless --until-caught-up; while it runs it is process projection-runner: /metrics and
    /health on --ops-port, logs through BACKBEAT_LOG_FORMAT. 'backbeat sql' works while it runs."""
    from infra.ops import port_setting
    from projections.runner import PROCESS, build_runners, run_as_process, run_projections

    settings = _settings()
    with progress_bar() as bar:
        task = bar.add_task("project", total=None)
        hook = _runner_progress(bar, task)
        if until_caught_up:
            stats = run_projections(settings, projection or None, until_caught_up=True, progress=hook)  # type: ignore[arg-type]
        else:
            port = port_setting(PROCESS, ops_port)
            code, result = run_as_process(
                settings, build_runners(settings, projection or None), ops_port=port, progress=hook  # type: ignore[arg-type]
            )
            if result is None:
                raise typer.Exit(code or 1)
            stats = result
    console.print(
        f"applied {stats.applied:,} rows from {stats.records:,} records "
        f"({stats.rate:,.0f} records/s) into {settings.duckdb_path}"
    )


def _all_projections() -> dict[str, Projection]:
    """Every read model by name: the plain ones and the stateful ones (recommendations)."""
    from projections.readmodels import PROJECTIONS
    from projections.runner import STATEFUL

    return {**PROJECTIONS, **{name: proj for name, (proj, _) in STATEFUL.items()}}


@projections_app.callback()
def projections_default(ctx: typer.Context) -> None:
    """With no sub-command: the same as 'backbeat projections list'."""
    if ctx.invoked_subcommand is None:
        projections_list()


@projections_app.command("list")
def projections_list() -> None:
    """List the read models: version (code / stored, and replay builds in progress or kept), rows,
    stored offsets, lag per partition (Fetch-based high watermark − stored offset), last event time
    and rejects."""
    from projections.status import projection_status

    statuses = projection_status(_settings(), _all_projections().values())
    rows = []
    for st in statuses:
        version = f"{st.version}"
        if st.live_version not in (None, st.version):
            version += f" (stored {st.live_version})"
        builds = ", ".join(
            f"b{b.build} v{b.version} {b.state}" + (f" lag {b.lag:,}" if b.lag is not None else "")
            for b in st.builds
            if b.state != "current"
        )
        offsets = " ".join(f"{p.partition}:{'-' if p.offset is None else p.offset}" for p in st.partitions)
        lags = " ".join(f"{p.partition}:{'?' if p.lag is None else p.lag}" for p in st.partitions)
        last = st.last_event_time.isoformat(sep=" ", timespec="seconds") if st.last_event_time else None
        rows.append(
            (st.name, version, st.topic, st.table, st.rows, offsets, lags, st.lag, last, st.rejects, builds)
        )
    console.print(
        table(
            ["projection", "version", "topic", "table", "rows", "offsets", "lag by partition", "lag",
             "last event", "rejects", "other versions"],
            rows,
        )
    )  # fmt: skip


@projections_app.command("reset")
def projections_reset(
    names: Annotated[
        list[str],
        typer.Argument(
            help="Projection(s) to reset: listens, sessions, tracks, user_features, track_features, "
            "recommendations, ad_reports, ad_reports_item, campaign_pauses, ledger_entries."
        ),
    ],
) -> None:
    """Drop read models (tables, stored offsets, rejects, lake files) so the next run rebuilds
    them from the start of their topics.

    Use it when the runner reports that its stored offsets belong to another log (the embedded
    broker restarted empty, or a topic was recreated)."""
    from projections.tracking import reset

    known = _all_projections()
    unknown = [n for n in names if n not in known]
    if unknown:  # unknown names fail before anything is dropped
        names_known = ", ".join(sorted(known))
        raise ConfigError(f"no projection {', '.join(unknown)}; known projections: {names_known}")
    done = reset(_settings(), names)
    console.print(f"reset {', '.join(done)}; run 'backbeat project' to rebuild")


@app.command()
def sql(
    query: Annotated[str, typer.Argument(help="A SQL statement (DuckDB dialect), read-only.")],
    max_rows: Annotated[int, typer.Option(help="Print at most this many rows.")] = 100,
    output: Annotated[str, typer.Option("--format", help="table, csv or json")] = "table",
) -> None:
    """Run SQL over the read models (the DuckDB file under BACKBEAT_DATA_DIR).

    Works while the projection runner is writing: the query waits for the batch in flight.
    Tables: listens, sessions, tracks, user_features, track_features (views *_latest, table
    macros *_as_of(ts) for point-in-time reads), recommendations, recommendation_history,
    experiment_assignments, ad_reports, ad_reports_item, campaign_pauses, ledger_entries (views
    ledger_balances, ledger_by_saga), the saga read models of 'backbeat sagas' (sagas,
    saga_events, saga_order_lines, gateway_operations, inventory_reservations, inventory_stock)
    (and projection_offsets, projection_rejects). The Parquet
    lake under BACKBEAT_DATA_DIR/lake can be read with read_parquet('…/**/*.parquet')."""
    from projections.sql import query as run_query

    result = run_query(_settings(), query, max_rows=max_rows)
    if output == "csv":
        import csv

        writer = csv.writer(sys.stdout)
        writer.writerow(result.columns)
        writer.writerows(result.rows)
    elif output == "json":
        import json

        for row in result.rows:
            print(json.dumps(dict(zip(result.columns, row, strict=True)), default=str))
    else:
        console.print(table(result.columns, result.rows))
    if result.truncated:
        err_console.print(f"(first {max_rows} rows shown; use --max-rows or LIMIT)")


demo_app = typer.Typer(rich_markup_mode="markdown")  # help: the callback's docstring
app.add_typer(demo_app, name="demo")


@demo_app.callback(invoke_without_command=True)
def demo(
    ctx: typer.Context,
    listens: Annotated[
        Path | None,
        typer.Option(
            help="Listening log, plain or gzip (default: the real 30Music file shipped with backbeat).",
            exists=True,
        ),
    ] = None,
    fmt: Annotated[str, typer.Option("--format", "-f", help="30music or lastfm1k")] = "30music",
    catalog: Annotated[
        Path | None,
        typer.Option(help="Spotify catalog CSV (default: the real one shipped with backbeat).", exists=True),
    ] = None,
    keep_running: Annotated[
        bool, typer.Option(help="Leave the broker and registry running afterwards.")
    ] = False,
) -> None:
    """The main job: up → topics → import → agent → read models → report → stop.

    Starts the embedded broker and registry (unless already running), creates the topics,
    imports the Spotify catalog and a listening log, runs the listening-ingest agent and the
    projection runner until every event is processed, prints top artists and tracks, session
    statistics and listens per hour of day, and stops what it started. Results stay in
    BACKBEAT_DATA_DIR (DuckDB file and Parquet lake) for 'backbeat sql'.

    'backbeat demo ads' runs the ad-reporting pipeline instead."""
    if ctx.invoked_subcommand is not None:
        return
    from infra.demo import DEFAULT_CATALOG, DEFAULT_LISTENS, run_demo

    run_demo(
        _settings(),
        listens=listens or DEFAULT_LISTENS,
        fmt=fmt,
        catalog=catalog or DEFAULT_CATALOG,
        keep_running=keep_running,
    )


@demo_app.command("ads")
def demo_ads(
    file: Annotated[
        Path | None,
        typer.Option(
            help="Open Bandit CSV (default: the real random/all/all.csv shipped with backbeat).",
            exists=True,
            dir_okay=False,
        ),
    ] = None,
    campaigns: Annotated[
        Path | None,
        typer.Option(
            help="Campaigns file: items, prices, budgets (default: infra/campaigns.toml).", exists=True
        ),
    ] = None,
    keep_running: Annotated[
        bool, typer.Option(help="Leave the broker and registry running afterwards.")
    ] = False,
) -> None:
    """Ad reporting end to end: up → topics → ad agent → import ads → read models → report → stop.

    Imports an Open Bandit log as impressions and clicks, runs the ad-reporting agent (final
    1-minute and hourly campaign reports, per-ad reports, budget pacing) until it has read
    everything, materialises ad_reports, ad_reports_item and campaign_pauses, and prints CTR by
    position, spend per campaign and hour, over-delivery and paused campaigns. Results stay in
    BACKBEAT_DATA_DIR for 'backbeat sql'."""
    from events.campaigns import CAMPAIGNS_FILE
    from infra.demo_ads import DEFAULT_ADS, run_ads_demo

    run_ads_demo(
        _settings(),
        file=file or DEFAULT_ADS,
        campaigns=campaigns or CAMPAIGNS_FILE,
        keep_running=keep_running,
    )


@demo_app.command("live")
def demo_live(
    seconds: Annotated[float, typer.Option(min=5, help="How long the player runs (wall seconds).")] = 60.0,
    rate: Annotated[float, typer.Option(min=1, help="Player events per second.")] = 1000.0,
    keep_running: Annotated[
        bool, typer.Option(help="Leave the broker and registry running afterwards.")
    ] = False,
) -> None:
    """The live platform end to end: player events become listens, skips and royalties;
    subscriptions renew, lapse and grant or revoke premium access; notifications go out.

    Starts the broker and registry (unless running), the worker (playback, ingest and ledger
    agents), the projection runner, the saga orchestrator and participants, a business clock (a
    day per second) and the notification relay; publishes the catalog with a year of licence and
    metadata changes, 40 subscriptions, and replays real 30Music listening live through the
    player simulator at RATE events/s for SECONDS. Prints listens, skips, premium users,
    renewals and notifications every 5 s, then entitlements, notifications, availability per
    territory and the month's royalty statement (also exported to Parquet under
    BACKBEAT_DATA_DIR/exports). Read models stay in BACKBEAT_DATA_DIR for 'backbeat sql'."""
    from infra.demo_live import run_live_demo

    run_live_demo(_settings(), seconds=seconds, rate=rate, keep_running=keep_running)


# Commands kept in their own modules, one line each.
_COMMAND_MODULES = (
    "infra.cli_evaluate",
    "infra.cli_recommend",
    "infra.cli_features",
    "infra.cli_sagas",
    "infra.cli_replay",
    "infra.cli_archive",
    "infra.cli_dlq",
    "infra.cli_serve",
    "infra.cli_simulate",
    "infra.cli_notifications",
    "infra.cli_catalog_changes",  # backbeat simulate catalog (issue 17)
    "infra.cli_royalties",
    "infra.cli_entitlements",
)
for _module in _COMMAND_MODULES:
    __import__(_module, fromlist=["register"]).register(app)


def main() -> None:
    """Entry point of the ``backbeat`` console script."""
    tune_gc()
    try:
        app()
    except BackbeatError as exc:
        err_console.print(f"[bold red]error:[/] {exc}")
        sys.exit(1)
    except KeyboardInterrupt:
        err_console.print("interrupted")
        sys.exit(130)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
