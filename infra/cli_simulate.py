"""``backbeat simulate``: simulators that produce realistic events (registered by :mod:`infra.cli`).

:data:`simulate_app` is the command group; other modules add their simulators to it
(``@simulate_app.command("…")``). A thin shell: the player's rule is :mod:`events.player`, the
producing :mod:`events.simulate_playback`.
"""

from __future__ import annotations

import dataclasses
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import typer

from events.player import DEFAULT_SEED
from infra.console import console, err_console, run_with_bar, table
from infra.errors import ConfigError
from infra.resources import CATALOG_SPOTIFY, LISTENS_30MUSIC
from infra.settings import get_settings

simulate_app = typer.Typer(
    help="Simulators: realistic events from real data sets, replayed or live.",
    no_args_is_help=True,
    rich_markup_mode="markdown",
)


def register(app: typer.Typer) -> None:
    """Add the ``simulate`` command group to the ``backbeat`` app."""
    app.add_typer(simulate_app, name="simulate")


@contextmanager
def _stop_on_signals() -> Iterator[threading.Event]:
    """An event set by SIGTERM or SIGINT (Ctrl-C) while the block runs; the previous handlers
    come back after it."""
    stop = threading.Event()
    previous = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    for sig in previous:
        signal.signal(sig, lambda *_: stop.set())
    try:
        yield stop
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


@simulate_app.command("playback")
def playback(
    file: Annotated[
        Path | None,
        typer.Option(
            help="The 30Music listens (TSV with header, plain or gzip); default: the shipped "
            "data/listens_30music_2014.tsv.gz.",
            exists=True,
            dir_okay=False,
        ),
    ] = None,
    catalog: Annotated[
        Path | None,
        typer.Option(
            help="The Spotify catalog CSV the listens map onto; default: the shipped "
            "data/catalog_spotify_songs_2020.csv.gz.",
            exists=True,
            dir_okay=False,
        ),
    ] = None,
    seed: Annotated[
        int, typer.Option(help="Seed of every choice (skips, pauses, devices, countries).")
    ] = DEFAULT_SEED,
    users: Annotated[
        int | None, typer.Option(help="Only the first N users (by first listen).", min=1)
    ] = None,
    limit: Annotated[
        int | None, typer.Option(help="Only the first N listens (in time order).", min=1)
    ] = None,
    rate: Annotated[
        float | None,
        typer.Option(help="Live mode: send EVENTS_PER_S events per second with event time = now."),
    ] = None,
    seconds: Annotated[float | None, typer.Option(help="Live mode: stop after this many seconds.")] = None,
    max_events: Annotated[int | None, typer.Option(help="Live mode: stop after N events.", min=1)] = None,
    repeat: Annotated[
        bool,
        typer.Option(help="Live mode: at the end of the input start over (new ids) instead of stopping."),
    ] = True,
    close_input: Annotated[
        bool,
        typer.Option(
            help="Replay mode: after the last event, send a watermark so downstream sessions close."
        ),
    ] = True,
    topic: Annotated[str, typer.Option(help="The topic to produce to.")] = "playback.events",
) -> None:
    """Turn real 30Music listens into player events on playback.events.

    Each listen becomes a play of a catalog track (PlaybackStarted, maybe Paused/Resumed, then
    Skipped or Completed) inside player sessions (PlaybackSessionStarted/Ended), by a
    deterministic rule seeded by --seed (docs: live-player). Without --rate the history is
    replayed as fast as possible with the original event times; with --rate it runs live, event
    time = now, until Ctrl-C/SIGTERM, --seconds or --max-events. Stopping flushes what was sent;
    a summary counts the events per type."""
    from events import player_catalog
    from events.catalog import load_catalogue
    from events.simulate_playback import TOPIC, LiveProgress, live, load_listens, replay
    from infra.provision import apply_topics

    if rate is None and (seconds is not None or max_events is not None):
        raise ConfigError("--seconds and --max-events apply to live mode: add --rate EVENTS_PER_S")
    settings = get_settings()
    # the topic as the catalogue declares it (a custom --topic gets playback.events' layout), so a
    # fresh broker does not auto-create it with its own default partition count
    declared = load_catalogue()
    apply_topics(settings, [declared.get(topic) or dataclasses.replace(declared[TOPIC], name=topic)])
    listens = load_listens(file or LISTENS_30MUSIC, users=users, limit=limit)
    cat = player_catalog.load(catalog or CATALOG_SPOTIFY)
    with _stop_on_signals() as stop:
        if rate is None:
            result = run_with_bar(
                f"replay {len(listens):,} listens",
                lambda total, advance: replay(
                    settings, listens, cat, seed, topic=topic, close_input=close_input, stop=stop,
                    on_total=total, progress=advance,
                ),
            )  # fmt: skip
        else:

            def report(p: LiveProgress) -> None:
                err_console.print(
                    f"live: {p.produced:,} events in {p.seconds:.0f} s ({p.produced / p.seconds:,.0f} ev/s), "
                    f"round {p.round + 1}, {p.plays:,} of {p.listens:,} plays"
                )

            err_console.print(f"live: {len(listens):,} listens at {rate:,.0f} events/s; Ctrl-C stops")
            result = live(
                settings, listens, cat, seed, rate=rate, topic=topic, seconds=seconds, max_events=max_events,
                repeat=repeat, stop=stop, on_progress=report,
            )  # fmt: skip
    rows = [(t, n) for t, n in sorted(result.by_type.items())] + [("total", result.produced)]
    console.print(table(["event type", "events"], rows, title=f"{result.topic} ({result.mode})"))
    how = "stopped" if result.stopped else "done"
    console.print(
        f"{how}: {result.produced:,} events from {result.listens:,} listens in {result.seconds:.1f} s "
        f"({result.rate:,.0f} events/s, {result.rounds} round(s), {result.watermarks} watermark records)"
    )
