"""``backbeat simulate catalog``: generate catalog changes (licences, edits, withdrawals, album
releases) on top of the Spotify catalog file and produce them to the catalog topics
(:mod:`events.catalog_changes` has the rules; ``docs/live-catalog.md``).

The catalog is read from the file (the one ``backbeat import catalog`` imports), not from the
``tracks`` read model: the output then depends on the file and the options alone, and the
changes may be produced before, after or while the catalog is imported and projected (the read
models fold them in any order). :func:`produce_changes` is the I/O part, used by the command and
the tests.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from events.catalog_changes import TERRITORIES
from infra.errors import ConfigError

if TYPE_CHECKING:
    from events.catalog_changes import Emitted, Generated
    from infra.settings import Settings

#: CloudEvents source of the generated events.
SOURCE = "/simulate/catalog"
#: Records per ``send_many`` call.
CHUNK = 10_000


def load_catalog(path: Path, limit: int | None = None) -> list[dict[str, object]]:
    """The ``TrackPublished`` records of the catalog file at ``path`` (first row of a track
    wins, as the importer does), in ``track_id`` order; only the first ``limit`` when given.

    Raises:
        ConfigError: the file cannot be read or is not the Spotify catalog CSV.
    """
    from events.importers.base import dedupe_and_order
    from events.importers.catalog import parse_catalog_file

    records, _ = dedupe_and_order(parse_catalog_file(path).records, "published_at")
    records.sort(key=lambda r: str(r["track_id"]))
    return records[:limit] if limit is not None else records


def produce_changes(
    settings: Settings,
    events: Iterable[Emitted],
    *,
    topics: Mapping[str, str] | None = None,
    progress: Callable[[int], None] | None = None,
) -> dict[str, int]:
    """Produce ``events`` in their order, each to its topic (:data:`events.catalog_changes.ROUTES`;
    ``topics`` maps a default topic to another, e.g. in tests), keyed by its entity id, and flush.
    Returns the count per topic actually written to.

    Raises:
        SchemaError: an event does not match its schema. InfraError: broker or registry unreachable.
    """
    from events.catalog_changes import ROUTES
    from events.producer import EventProducer

    producer = EventProducer(settings)
    counts: dict[str, int] = {}
    run: list[dict[str, object]] = []
    run_type = ""

    def flush_run() -> None:
        if not run:
            return
        default, key, when = ROUTES[run_type]
        topic = (topics or {}).get(default, default)
        producer.send_many(topic, run_type, run, key_field=key, time_field=when, source=SOURCE)
        counts[topic] = counts.get(topic, 0) + len(run)
        if progress is not None:
            progress(len(run))
        run.clear()

    for e in events:  # consecutive events of one type go together; the order is kept
        if e.event_type != run_type or len(run) >= CHUNK:
            flush_run()
            run_type = e.event_type
        run.append(e.record)
    flush_run()
    producer.flush()
    return counts


def _parse_start(value: str) -> int:
    """``--start``: an ISO-8601 date or time (UTC when it has no offset), or ``now``."""
    if value.strip().lower() == "now":
        return int(time.time() * 1000)
    try:
        when = datetime.fromisoformat(value)
    except ValueError:
        raise ConfigError(
            f"--start {value!r} is not 'now' or an ISO-8601 date or time, e.g. 2021-01-01"
        ) from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return int(when.timestamp() * 1000)


def simulate_catalog(
    seed: Annotated[int, typer.Option("--seed", help="Seed of every choice (same seed, same events).")] = 17,
    changes: Annotated[int, typer.Option("--changes", min=0, help="Changes after the baseline.")] = 1000,
    territories: Annotated[
        str, typer.Option("--territories", help="Comma-separated ISO 3166-1 alpha-2 territories.")
    ] = ",".join(TERRITORIES),
    catalog: Annotated[
        Path | None, typer.Option("--catalog", help="Spotify catalog CSV (default: the repository's).")
    ] = None,
    limit: Annotated[
        int | None,
        typer.Option(
            "--limit",
            min=1,
            help="Only the first N tracks (by id) get licences and changes: the others stay unlicensed "
            "(for quick runs; recommendations then withhold most tracks).",
        ),
    ] = None,
    start: Annotated[
        str,
        typer.Option(
            "--start",
            help="Start of the simulated period (UTC), or 'now': the changes then take effect over the "
            "coming days, and the read models (which answer for the current time) follow them.",
        ),
    ] = "2021-01-01",
    days: Annotated[int, typer.Option("--days", min=1, help="Length of the simulated period.")] = 365,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Count the events; produce nothing.")] = False,
) -> None:
    """Generate catalog changes and produce them to the catalog topics.

    First a baseline of licences for every catalog track (worldwide or per territory, some
    with a fixed term, a few tracks unlicensed), then CHANGES changes spread over the period:
    metadata edits (TrackUpdated), licences revoked (LicenceRevoked, half of them withdrawing the
    track there too) and granted, withdrawals (TrackWithdrawn) and album releases (AlbumReleased
    plus a TrackPublished per new track). Deterministic: one seed gives the same events and ids.
    The 'tracks_current' and 'track_availability' read models fold them ('backbeat project')."""
    from events.catalog_changes import generate
    from infra.console import console
    from infra.resources import CATALOG_SPOTIFY
    from infra.settings import get_settings

    wanted = [t.strip().upper() for t in territories.split(",") if t.strip()]
    bad = [t for t in wanted if len(t) != 2 or not t.isalpha()]
    if bad or not wanted:
        raise ConfigError(
            f"--territories needs ISO 3166-1 alpha-2 codes separated by commas, got {territories!r}"
        )
    began = time.monotonic()
    tracks = load_catalog(catalog or CATALOG_SPOTIFY, limit)
    made: Generated = generate(
        tracks, seed=seed, changes=changes, territories=wanted, start_ms=_parse_start(start), days=days
    )
    for event_type, n in sorted(made.counts.items()):
        console.print(f"{event_type:<16} {n:>8}")
    if dry_run:
        console.print(f"{len(made.events)} events generated for {len(tracks)} catalog tracks (dry run)")
        return
    written = produce_changes(get_settings(), made.events)
    for topic, n in sorted(written.items()):
        console.print(f"→ {topic:<24} {n:>8}")
    console.print(
        f"{len(made.events)} events for {len(tracks)} catalog tracks in {time.monotonic() - began:.1f} s; "
        "run 'backbeat project' to fold them into tracks_current and track_availability"
    )


def register(app: typer.Typer) -> None:
    """Add ``backbeat simulate catalog`` to the ``simulate`` group (made here when missing)."""
    group = next((g.typer_instance for g in app.registered_groups if g.name == "simulate"), None)
    if group is None:
        group = typer.Typer(
            help="Simulators of the live platform.", no_args_is_help=True, rich_markup_mode="markdown"
        )
        app.add_typer(group, name="simulate")
    group.command("catalog")(simulate_catalog)
