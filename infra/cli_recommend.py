"""``backbeat recommend USER``: a user's current "Made for You" list from the ``recommendations``
read model, with track and artist names (registered by :mod:`infra.cli`).

A thin shell over :func:`projections.recommendations.read_recommendations`; the formatting helpers
here are pure. Errors (``RecommendationsError``, ``NoReadModelsError``) print their message and
exit 1 through ``infra.cli.main``.
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import TYPE_CHECKING, Annotated

import typer

if TYPE_CHECKING:
    from projections.recommendations import UserRecommendations

#: Shown in place of a name the catalog cannot give.
NO_NAME = "—"


def _iso(value: datetime) -> str:
    return value.isoformat(timespec="milliseconds") + "Z"


def to_json(recs: UserRecommendations) -> str:
    """The ``--json`` document: ``{"user_id", "experiment_id", "variant", "model",
    "generated_at", "computed_at" (ISO-8601 UTC), "territory", "withheld" (track ids left out:
    not playable in the territory now), "items": [{rank, track_id, track, artist, score,
    source}]}`` (``track``/``artist`` null without a catalog)."""
    return json.dumps(
        {
            "user_id": recs.user_id,
            "experiment_id": recs.experiment_id,
            "variant": recs.variant,
            "model": recs.model,
            "generated_at": _iso(recs.generated_at),
            "computed_at": _iso(recs.computed_at),
            "territory": recs.territory,
            "withheld": list(recs.withheld),
            "items": [
                {
                    "rank": i.rank,
                    "track_id": i.track_id,
                    "track": i.track,
                    "artist": i.artist,
                    "score": i.score,
                    "source": i.source,
                }
                for i in recs.items
            ],
        }
    )


def rows(recs: UserRecommendations) -> tuple[list[str], list[tuple[object, ...]]]:
    """The table of the human output: ``(columns, rows)``, one row per recommended track."""
    columns = ["rank", "track", "artist", "score", "variant", "from", "track id"]
    body = [
        (i.rank, i.track or NO_NAME, i.artist or NO_NAME, i.score, recs.variant, i.source, i.track_id)
        for i in recs.items
    ]
    return columns, body


def recommend(
    user: Annotated[
        str, typer.Argument(metavar="USER", help="The user id, as in the listens (e.g. 40265 for 30Music).")
    ],
    n: Annotated[int, typer.Option("--n", min=1, help="Show at most this many tracks.")] = 20,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON document instead.")] = False,
    territory: Annotated[
        str | None,
        typer.Option(
            "--territory",
            help="ISO country the list is served in (default: the country of the user's latest player "
            "listen, else US): tracks withdrawn or unlicensed there are never shown.",
        ),
    ] = None,
) -> None:
    """Show a user's recommendations: rank, track, artist, score and A/B variant.

    Reads the 'recommendations' read model, which 'backbeat project' keeps up to date from
    playback.listens. The user's variant in experiment made-for-you-v1 decides the model:
    'control' gets the most played tracks, 'streaming' the streaming next-track model for the
    user's current session (backfilled with popular tracks). 30Music ids have no names: they are
    mapped onto the Spotify catalog deterministically, so the names are illustrative (import the
    catalog to see them).
    Tracks that may not be played in the territory now (track_availability: withdrawn, or no
    licence in force) are left out, whenever the list was computed."""
    from infra.console import console, err_console, table
    from infra.settings import get_settings
    from projections.recommendations import read_recommendations

    recs = read_recommendations(get_settings(), user, n, territory=territory)
    if as_json:
        print(to_json(recs))
        return
    columns, body = rows(recs)
    title = (
        f"Made for You — user {recs.user_id}: {recs.experiment_id} / {recs.variant} ({recs.model}), "
        f"as of {recs.generated_at:%Y-%m-%d %H:%M} UTC, in {recs.territory}"
    )
    console.print(table(columns, body, title=title))
    if recs.withheld:
        err_console.print(
            f"{len(recs.withheld)} track(s) of the list withheld: not playable in {recs.territory} now"
        )
    if not recs.named:
        err_console.print(
            "no catalog in the read models, so no names: import it ('backbeat import catalog FILE') "
            "and run 'backbeat project'"
        )


def register(app: typer.Typer) -> None:
    """Add ``backbeat recommend`` to the ``backbeat`` app."""
    app.command("recommend")(recommend)
