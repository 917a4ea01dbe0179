"""Parsing of the real data sets: counts, ids, ordering, rejects (pure, no broker)."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from events.importers.base import dedupe_and_order, event_id
from events.importers.catalog import parse_catalog_file, release_ms
from events.importers.listens import parse_30music, parse_lastfm1k, parse_listens_file
from infra.errors import ConfigError
from tests.conftest import CATALOG, LISTENS_30MUSIC, LISTENS_LASTFM1K

HEADER = b"UserId\tSessionId\tItemId\tTime\tArtistId\tsplit\n"


def test_event_id_is_deterministic_and_part_sensitive():
    assert event_id("30music", "1", 1000, "7") == event_id("30music", "1", 1000, "7")
    assert event_id("30music", "1", 1000, "7") != event_id("30music", "1", 1000, "8")
    assert len(event_id("x")) == 32


def test_30music_rows_become_listens_with_ms_times():
    parsed = parse_30music(io.BytesIO(HEADER + b"40265\t2464\t1818271\t1397982525\t228054\ttest0\n"))
    assert parsed.rows_read == 1 and parsed.rejected == 0
    rec = parsed.records[0]
    assert rec["user_id"] == "40265" and rec["track_id"] == "1818271" and rec["artist_id"] == "228054"
    assert rec["occurred_at"] == 1_397_982_525_000
    assert rec["session_hint"] == "2464"
    assert rec["event_id"] == event_id("30music", "40265", 1_397_982_525_000, "1818271")


def test_30music_bad_rows_are_rejected_with_line_and_reason():
    body = HEADER + b"1\t2\t3\n" + b"x\t2\t3\t1397982525\t5\tt\n" + b"1\t2\t3\tnope\t5\tt\n"
    body += b"1\t2\t3\t12\t5\tt\n" + b"\xff\xfe\t2\n" + b"1\t2\t3\t1397982525\t5\tt\n"
    parsed = parse_30music(io.BytesIO(body))
    assert parsed.rows_read == 6
    assert parsed.rejected == 5 and len(parsed.records) == 1
    lines = [r.line for r in parsed.rejects]
    assert sorted(lines) == [2, 3, 4, 5, 6]
    reasons = {r.line: r.reason for r in parsed.rejects}
    assert "6 tab-separated columns" in reasons[2]
    assert "numeric" in reasons[3]
    assert "unix seconds" in reasons[4]
    assert "outside" in reasons[5]
    assert "UTF-8" in reasons[6]


def test_30music_without_header_is_a_format_error():
    with pytest.raises(ConfigError, match="lastfm1k"):
        parse_30music(io.BytesIO(b"user_000001\t2009-05-04T23:08:57Z\ta\tb\tc\td\n"))


def test_lastfm1k_missing_mbids_get_name_ids():
    row = b"user_1\t2009-05-04T13:54:10Z\t\tSakamoto\t\tComposition 0919\n"
    rec = parse_lastfm1k(io.BytesIO(row)).records[0]
    assert rec["artist_id"].startswith("name:") and rec["track_id"].startswith("name:")
    assert rec["occurred_at"] == 1_241_445_250_000
    assert rec["track_name"] == "Composition 0919" and rec["artist_name"] == "Sakamoto"


def test_lastfm1k_rejects_bad_timestamps():
    parsed = parse_lastfm1k(io.BytesIO(b"u\tyesterday\ta\tb\tc\td\nu\t2009-05-04T13:54:10\ta\tb\tc\td\n"))
    assert parsed.rejected == 2
    assert "ISO-8601" in parsed.rejects[0].reason and "time zone" in parsed.rejects[1].reason


def test_dedupe_and_order_collapses_equal_ids_and_sorts_stably():
    recs = [
        {"event_id": "a", "t": 3, "n": 1},
        {"event_id": "b", "t": 1, "n": 2},
        {"event_id": "a", "t": 3, "n": 3},
        {"event_id": "c", "t": 1, "n": 4},
    ]
    kept, dups = dedupe_and_order(recs, "t")
    assert dups == 1
    assert [r["n"] for r in kept] == [2, 4, 1]


def test_real_30music_file_reconciles():
    parsed = parse_listens_file(LISTENS_30MUSIC, "30music")
    kept, dups = dedupe_and_order(parsed.records, "occurred_at")
    assert parsed.rows_read == 88_761
    assert parsed.rows_read == len(kept) + dups + parsed.rejected
    # the same (user, time, item) twice in the file collapses into one event
    keys = {(r["user_id"], r["occurred_at"], r["track_id"]) for r in parsed.records}
    assert len(kept) == len(keys)
    times = [r["occurred_at"] for r in kept]
    assert times == sorted(times)


def test_real_lastfm1k_sample_parses_every_row():
    parsed = parse_listens_file(LISTENS_LASTFM1K, "lastfm1k")
    assert parsed.rows_read == 5000 and parsed.rejected == 0


def test_real_catalog_collapses_repeated_tracks():
    parsed = parse_catalog_file(CATALOG)
    kept, dups = dedupe_and_order(parsed.records, "published_at")
    assert parsed.rows_read == 32_833
    assert len(kept) == len({r["track_id"] for r in parsed.records})
    assert len(kept) + dups + parsed.rejected == 32_833
    assert all(0.0 <= r["danceability"] <= 1.0 for r in kept)


def test_release_dates_of_every_precision():
    assert release_ms("2019-06-14") == 1_560_470_400_000
    assert release_ms("2019-06") == release_ms("2019-06-01")
    assert release_ms("1957") == release_ms("1957-01-01") < 0
    assert release_ms("soon") == 0


def test_unknown_format_and_missing_file_are_clear_errors(tmp_path: Path):
    with pytest.raises(ConfigError, match="unknown listens format"):
        parse_listens_file(LISTENS_30MUSIC, "csv")
    with pytest.raises(ConfigError, match="cannot read"):
        parse_listens_file(tmp_path / "missing.tsv", "30music")
