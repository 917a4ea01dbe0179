"""The catalog change generator (:mod:`events.catalog_changes`), pure: deterministic per seed,
schema-valid events with unique ids, in time order within the period, and changes that refer to
what exists (a revocation to a licence granted before, a withdrawal it causes to that licence,
changes to published tracks)."""

from __future__ import annotations

from collections import Counter

import pytest
from fastavro.validation import validate

from events.catalog_changes import DAY_MS, DEFAULT_START_MS, ROUTES, TERRITORIES, generate, pick
from events.schemas import get_schema
from infra.cli_catalog_changes import load_catalog
from tests.conftest import CATALOG


@pytest.fixture(scope="module")
def catalog() -> list[dict]:
    return [{k: v for k, v in t.items() if k != "_line"} for t in load_catalog(CATALOG, limit=400)]


def test_same_seed_same_events_other_seed_other_events(catalog):
    one = generate(catalog, seed=3, changes=200)
    assert one == generate(catalog, seed=3, changes=200)
    other = generate(catalog, seed=4, changes=200)
    assert [e.record["event_id"] for e in one.events] != [e.record["event_id"] for e in other.events]
    assert pick(3, "a") == pick(3, "a") != pick(4, "a")


def test_events_match_their_schemas_and_ids_are_unique(catalog):
    made = generate(catalog, seed=1, changes=400)
    assert set(made.counts) == set(ROUTES)  # every kind occurs
    ids = [e.record["event_id"] for e in made.events]
    assert len(ids) == len(set(ids))
    for e in made.events:
        assert validate(e.record, get_schema(e.event_type).parsed, raise_errors=True)
    assert Counter(e.event_type for e in made.events) == made.counts


def test_times_are_in_order_within_the_period_and_territories_from_the_list(catalog):
    days = 100
    made = generate(catalog, seed=2, changes=300, days=days)
    changes = [e for e in made.events if e.record.get("occurred_at", 0) > DEFAULT_START_MS]
    times = [e.record["occurred_at"] for e in changes]
    assert times == sorted(times) and times[-1] < DEFAULT_START_MS + days * DAY_MS
    for e in made.events:
        assert set(e.record.get("territories") or []) <= set(TERRITORIES)


def test_changes_refer_to_what_exists(catalog):
    made = generate(catalog, seed=5, changes=500)
    tracks = {t["track_id"] for t in catalog}
    granted: dict[str, str] = {}
    revoked: set[str] = set()
    for e in made.events:
        r = e.record
        if e.event_type == "TrackPublished":
            tracks.add(r["track_id"])
        elif e.event_type == "LicenceGranted":
            assert r["track_id"] in tracks
            granted[r["licence_id"]] = r["track_id"]
        elif e.event_type == "LicenceRevoked":
            assert granted[r["licence_id"]] == r["track_id"]
            revoked.add(r["licence_id"])
        elif e.event_type == "TrackWithdrawn":
            assert r["track_id"] in tracks
            if r["reason"] == "LICENCE_REVOKED":
                assert r["licence_id"] in revoked
            else:
                assert r["licence_id"] is None
        elif e.event_type == "TrackUpdated":
            assert r["track_id"] in tracks and r["changed_fields"]
            assert r["artist"] is None and r["album_id"] is None  # keeps the name mapping stable
            assert all(r[f] is not None for f in r["changed_fields"])
        elif e.event_type == "AlbumReleased":
            assert set(r["track_ids"]) <= tracks and r["album_type"] in {"SINGLE", "EP", "ALBUM"}


def test_rejects_bad_parameters(catalog):
    with pytest.raises(ValueError, match="no tracks"):
        generate([], changes=1)
    with pytest.raises(ValueError, match="changes"):
        generate(catalog, changes=-1)


def test_simulate_catalog_command_counts_what_it_would_send(catalog):
    from typer.testing import CliRunner

    from infra.cli import app

    args = ["simulate", "catalog", "--dry-run", "--limit", "400", "--changes", "50", "--seed", "9"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    made = generate(catalog, seed=9, changes=50)
    for event_type, n in made.counts.items():
        assert f"{event_type:<16} {n:>8}" in result.output
    assert f"{len(made.events)} events generated for 400 catalog tracks" in result.output
    bad = CliRunner().invoke(app, ["simulate", "catalog", "--dry-run", "--territories", "DE,Fra"])
    assert bad.exit_code != 0
