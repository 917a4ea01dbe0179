"""``backbeat features``: a user's feature values from the feature store (registered by
:mod:`infra.cli`) — the latest per window size, or those known as of a time (point in time).

A thin shell over :func:`projections.feature_store.read_features`; the formatting helpers here are
pure. Errors (:class:`~projections.feature_store.FeatureStoreError`) print their message and exit 1
through ``infra.cli.main``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Annotated, Any

import typer

#: Rows of the human output: (label, column of user_features).
_FIELDS = (
    ("feature set", "feature_set"),
    ("window start (UTC)", "window_start"),
    ("window end (UTC)", "window_end"),
    ("known at (UTC)", "occurred_at"),
    ("plays", "plays"),
    ("distinct artists", "distinct_artists"),
    ("distinct tracks", "distinct_tracks"),
    ("sessions", "sessions"),
    ("session length mean", "session_ms_mean"),
    ("session length median", "session_ms_p50"),
    ("session length max", "session_ms_max"),
    ("affinity half-life", "affinity_half_life_ms"),
    ("top artists (affinity)", "top_artists"),
)

_UNITS = ((86_400_000, "d"), (3_600_000, "h"), (60_000, "min"), (1_000, "s"))


def human_ms(ms: int) -> str:
    """A duration in ms as the largest whole unit that divides it: ``3600000`` → ``"1 h"``,
    ``300000`` → ``"5 min"``, ``86400000`` → ``"1 d"``, ``1500`` → ``"1500 ms"``."""
    for size, unit in _UNITS:
        if ms and ms % size == 0:
            return f"{ms // size} {unit}"
    return f"{ms} ms"


def iso_utc(value: datetime) -> str:
    """A naive UTC ``datetime`` as ISO-8601 with ``Z``, to the millisecond when not whole seconds."""
    spec = "milliseconds" if value.microsecond else "seconds"
    return value.isoformat(timespec=spec) + "Z"


def window_label(row: Mapping[str, Any]) -> str:
    """``"1 h window / 5 min step"`` of a feature row."""
    return f"{human_ms(row['window_size_ms'])} window / {human_ms(row['window_step_ms'])} step"


def _cell(key: str, value: Any) -> object:
    """One value of the human table: times to the second, durations in minutes (``session_ms_*``)
    or whole units, top artists one per line as ``rank. artist_id (affinity)``."""
    if value is None:
        return "—"
    if isinstance(value, datetime):
        return f"{value:%Y-%m-%d %H:%M:%S}"
    if key.startswith("session_ms_"):
        return f"{value / 60_000:,.1f} min"
    if key == "affinity_half_life_ms":
        return human_ms(int(value))
    if key == "top_artists":
        lines = [f"{i}. {a['artist_id']} ({a['affinity']:.3g})" for i, a in enumerate(value, 1)]
        return "\n".join(lines) or "—"
    return value


def human_tables(rows: Sequence[Mapping[str, Any]]) -> tuple[list[str], list[list[object]]]:
    """The features table of the human output: ``(columns, rows)`` with one column per feature
    row (window size; the feature set is a row) and one row per feature (``_FIELDS``)."""
    columns = ["feature", *(window_label(r) for r in rows)]
    body = [[label, *(_cell(key, r[key]) for r in rows)] for label, key in _FIELDS]
    return columns, body


def to_json(user: str, as_of: datetime | None, rows: Sequence[Mapping[str, Any]]) -> str:
    """The ``--json`` document: ``{"user_id", "as_of" (ISO UTC or null), "features": [row…]}``,
    times as ISO-8601 UTC strings with ``Z``, ``top_artists`` as ``[{artist_id, affinity}]``."""

    def default(value: object) -> str:
        if isinstance(value, datetime):
            return iso_utc(value)
        raise TypeError(f"{type(value).__name__} is not JSON serialisable")

    doc = {"user_id": user, "as_of": iso_utc(as_of) if as_of else None, "features": list(rows)}
    return json.dumps(doc, default=default, indent=2)


def features(
    user: Annotated[
        str, typer.Argument(metavar="USER", help="The user id, as in the listens (e.g. 42 for 30Music).")
    ],
    as_of: Annotated[
        str | None,
        typer.Option(
            "--as-of",
            metavar="ISO-TIME",
            help="Point in time: the values known then (occurred_at <= it), e.g. 2014-04-20T10:00:00Z; "
            "no offset means UTC. Default: the latest values.",
        ),
    ] = None,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print one JSON document instead of tables.")
    ] = False,
) -> None:
    """Show a user's features from the feature store, per window size, with top artists.

    Reads the DuckDB read models (user_features_latest, or user_features_as_of(ts) with
    --as-of), which the Faust worker's feature events and 'backbeat project' fill. Works while
    the projection runner is writing."""
    from infra.console import console, table
    from infra.settings import get_settings
    from projections.feature_store import USER_TABLE, parse_as_of, read_features

    when = parse_as_of(as_of) if as_of is not None else None
    rows = read_features(get_settings(), USER_TABLE, user, when)
    if as_json:
        print(to_json(user, when, rows))
        return
    point = f"as of {when:%Y-%m-%d %H:%M:%S} UTC" if when else "latest"
    columns, body = human_tables(rows)
    console.print(table(columns, body, title=f"features of user {user} ({point})"))


def register(app: typer.Typer) -> None:
    """Add ``backbeat features`` to the ``backbeat`` app."""
    app.command("features")(features)
