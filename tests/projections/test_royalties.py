"""Royalty statements (:mod:`projections.royalties`): the rounding rule and the period on their
own; then on the real broker, the statement of a month equals an independent DuckDB SQL
computation (largest remainder included) over the ``listens`` read model (built by the runner from
ListenRecorded events) and the ``ledger_entries`` read model (built from the ledger topic the
ledger agent wrote from a seeded run of the payment service); re-running a month replaces it; the
Parquet export and ``backbeat royalties statement --json`` give the same rows.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from events.catalog import topic
from events.producer import EventProducer
from infra.errors import ConfigError
from infra.provision import apply_topics
from infra.settings import Settings
from projections.readmodels import LISTENS
from projections.royalties import Period, RoyaltyError, largest_remainder, pool_bp_setting, run_statement
from projections.runner import run_projections
from projections.sql import query
from streams.ledger import LedgerConfig, publish_until_caught_up
from tests.streams.payments_feed import DAY_MS, T_2026_01, produce, seeded_payments


# -- the rules on their own -------------------------------------------------------------------------
def test_largest_remainder_sums_to_the_pool_and_breaks_ties_by_order():
    assert largest_remainder(10, [1, 1, 1]) == [4, 3, 3]
    assert largest_remainder(10, [1, 1, 1], order=["c", "b", "a"]) == [3, 3, 4]  # ties by order, not index
    assert largest_remainder(100, [2, 1]) == [67, 33]  # remainders 0.67 and 0.33: the larger gets the unit
    assert largest_remainder(0, [3, 4]) == [0, 0]
    rng = random.Random(5)
    for _ in range(300):
        weights = [rng.randrange(0, 50) for _ in range(rng.randrange(1, 30))] + [1]
        pool = rng.randrange(0, 10**9)
        got = largest_remainder(pool, weights)
        assert sum(got) == pool
        assert all(abs(a * sum(weights) - pool * w) < sum(weights) for a, w in zip(got, weights, strict=True))
    with pytest.raises(ValueError, match="cannot share"):
        largest_remainder(5, [0, 0])


def test_period_and_pool_share_settings():
    jan = Period.parse("2026-01")
    assert (jan.start_ms, jan.end_ms) == (T_2026_01, T_2026_01 + 31 * DAY_MS)
    assert str(Period.parse("2025-12")) == "2025-12" and Period.parse("2025-12").end.year == 2026
    for bad in ("2026-13", "2026-1", "26-01", "january"):
        with pytest.raises(RoyaltyError, match="expected YYYY-MM"):
            Period.parse(bad)
    assert pool_bp_setting({}) == 7000 and pool_bp_setting({"BACKBEAT_ROYALTY_POOL_BP": "5500"}) == 5500
    for bad in ("-1", "10001", "70%"):
        with pytest.raises(ConfigError, match="BACKBEAT_ROYALTY_POOL_BP"):
            pool_bp_setting({"BACKBEAT_ROYALTY_POOL_BP": bad})


# -- on the broker ----------------------------------------------------------------------------------
TERRITORIES = ("DE", "FR", "GB", "US", "SE", None)
PLAYED = (None, 5_000, 29_999, 30_000, 95_000, 240_000)


def seeded_listens(n: int, seed: int = 3) -> list[dict[str, Any]]:
    """``n`` listens over January to mid-February 2026: 40 tracks of 9 artists, ms played and
    territories drawn from :data:`PLAYED` and :data:`TERRITORIES` (NULL: a file import)."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        track = rng.randrange(40)
        territory = rng.choice(TERRITORIES)
        out.append({
            "event_id": f"l-{seed}-{i}", "user_id": f"u{rng.randrange(50)}", "track_id": f"tr-{track:02d}",
            "artist_id": f"ar-{track % 9}", "occurred_at": T_2026_01 + rng.randrange(45 * DAY_MS),
            "source": "player" if territory else "30music", "ms_played": rng.choice(PLAYED),
            "track_name": None, "artist_name": None, "session_hint": None, "territory": territory,
            "playback_id": f"pb-{i}" if territory else None,
        })  # fmt: skip
    return out


#: The statement by SQL over the read models (the test's own computation): per currency, revenue =
#: revenue credits minus refund debits of subscription entries posted in the month; pool =
#: floor(revenue × bp / 10000); plays per (track, artist, territory) with the 30-second rule (NULL
#: counts); amounts by largest remainder, ties by track, territory, artist.
EXPECTED_SQL = """
WITH rev AS (
    SELECT currency,
           -sum(CASE WHEN account = 'revenue' THEN amount_minor ELSE 0 END)
           - sum(CASE WHEN account = 'refunds' THEN amount_minor ELSE 0 END) AS revenue
    FROM ledger_entries
    WHERE reference_type = 'SUBSCRIPTION' AND posted_at >= $start AND posted_at < $end
    GROUP BY currency
), pools AS (
    SELECT currency, revenue, (revenue * $bp) // 10000 AS pool FROM rev WHERE revenue > 0
), plays AS (
    SELECT track_id, artist_id, coalesce(territory, 'ZZ') AS territory, count(*) AS plays
    FROM listens
    WHERE occurred_at >= $start AND occurred_at < $end AND (ms_played IS NULL OR ms_played >= 30000)
    GROUP BY ALL
), total AS (
    SELECT sum(plays) AS total_plays FROM plays
), shares AS (
    SELECT currency, revenue, pool, plays.*, total_plays,
           (CAST(pool AS HUGEINT) * plays) // total_plays AS base,
           (CAST(pool AS HUGEINT) * plays) % total_plays AS remainder
    FROM pools, plays, total
), ranked AS (
    SELECT *, pool - sum(base) OVER (PARTITION BY currency) AS leftover,
           row_number() OVER (PARTITION BY currency ORDER BY remainder DESC, track_id, territory, artist_id) AS rank
    FROM shares
)
SELECT currency, track_id, artist_id, territory, plays,
       CAST(base + CASE WHEN rank <= leftover THEN 1 ELSE 0 END AS BIGINT) AS amount_minor,
       CAST(pool AS BIGINT) AS pool_minor, CAST(total_plays AS BIGINT), CAST(revenue AS BIGINT)
FROM ranked ORDER BY currency, track_id, territory, artist_id
"""
GOT_SQL = """
SELECT currency, track_id, artist_id, territory, plays, amount_minor, pool_minor, total_plays, revenue_minor
FROM royalty_statements WHERE period = ? AND method = 'pro-rata' ORDER BY currency, track_id, territory, artist_id
"""


@pytest.fixture(scope="module")
def world(stack: Settings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Settings]:
    """Read models ``listens`` and ``ledger_entries`` built from isolated topics (module docstring)."""
    tmp = tmp_path_factory.mktemp("royalties")
    settings = dataclasses.replace(stack, data_dir=tmp / "data")
    app_id = f"royalties-{os.getpid()}-{time.monotonic_ns() % 10**6}"
    config = LedgerConfig(f"{app_id}.payments", f"{app_id}.ledger", f"{app_id}.dlq")
    listens_topic = f"{app_id}.listens"
    apply_topics(
        settings, [*config.topic_specs(app_id), dataclasses.replace(topic(LISTENS.topic), name=listens_topic)]
    )
    produce(settings, config.source_topic, seeded_payments(tmp, n=150, seed=29, span_ms=60 * DAY_MS))
    listens = seeded_listens(3000)
    producer = EventProducer(settings)
    producer.send_many(listens_topic, "ListenRecorded", listens + listens[:20],  # redelivered
                       key_field="user_id", time_field="occurred_at", source="/tests")  # fmt: skip
    producer.flush()
    publish_until_caught_up(settings, app_id=app_id, config=config, timeout_s=120)
    run_projections(settings, ["listens", "ledger_entries"], until_caught_up=True,
                    topics={"listens": listens_topic, "ledger_entries": config.ledger_topic})  # fmt: skip
    yield settings


def expected(settings: Settings, period: Period, bp: int) -> list[tuple]:
    from projections.store import reader

    with reader(settings.duckdb_path) as con:
        return con.execute(EXPECTED_SQL, {"start": period.start, "end": period.end, "bp": bp}).fetchall()


def got(settings: Settings, period: Period) -> list[tuple]:
    from projections.store import reader

    with reader(settings.duckdb_path) as con:
        return con.execute(GOT_SQL, [str(period)]).fetchall()


@pytest.mark.integration
@pytest.mark.parametrize(("month", "bp"), [("2026-01", 7000), ("2026-02", 5_555)])
def test_statement_equals_sql_over_the_read_models(world: Settings, month: str, bp: int):
    period = Period.parse(month)
    statement, _ = run_statement(world, period, pool_bp=bp)
    want = expected(world, period, bp)
    assert got(world, period) == want
    currencies = {r[0] for r in want}
    assert len(currencies) >= 2 and len(want) > 100  # several currencies, many (track, territory) rows
    for c in currencies:
        rows = [r for r in want if r[0] == c]
        assert sum(r[5] for r in rows) == rows[0][6] == statement.pools[c]  # the amounts sum to the pool
        assert rows[0][6] == rows[0][8] * bp // 10_000
    assert {r[3] for r in want} >= {"DE", "US", "ZZ"}
    # the 30-second rule and the month bound: plays are the counted listens of the month only
    counted = query(
        world,
        f"""SELECT count(*) FROM listens WHERE occurred_at >= '{period.start}'
        AND occurred_at < '{period.end}' AND (ms_played IS NULL OR ms_played >= 30000)""",
    ).rows[0][0]
    assert want[0][7] == statement.total_plays == counted
    assert 0 < counted < query(world, "SELECT count(*) FROM listens").rows[0][0]


#: The user-centric statement by SQL (the test's own): per currency and subscriber, the pool of the
#: subscriber's net revenue shared over the subscriber's plays (largest remainder per subscriber);
#: the pools of subscribers without plays, or of unknown subscribers, shared over all plays.
USER_CENTRIC_SQL = """
WITH owners AS (
    SELECT subscription_id, min(user_id) AS user_id FROM subscription_events GROUP BY ALL
), rev AS (
    SELECT currency, o.user_id,
           -sum(CASE WHEN account = 'revenue' THEN amount_minor ELSE 0 END)
           - sum(CASE WHEN account = 'refunds' THEN amount_minor ELSE 0 END) AS revenue
    FROM ledger_entries e LEFT JOIN owners o ON o.subscription_id = e.reference_id
    WHERE reference_type = 'SUBSCRIPTION' AND posted_at >= $start AND posted_at < $end
    GROUP BY ALL
), upool AS (
    SELECT currency, user_id, (revenue * $bp) // 10000 AS pool FROM rev WHERE revenue > 0
), uplays AS (
    SELECT user_id, track_id, artist_id, coalesce(territory, 'ZZ') AS territory, count(*) AS plays
    FROM listens
    WHERE occurred_at >= $start AND occurred_at < $end AND (ms_played IS NULL OR ms_played >= 30000)
    GROUP BY ALL
), ushare AS (
    SELECT u.currency, u.user_id, u.pool, l.track_id, l.artist_id, l.territory,
           (CAST(u.pool AS HUGEINT) * l.plays) // sum(l.plays) OVER w AS base,
           (CAST(u.pool AS HUGEINT) * l.plays) % sum(l.plays) OVER w AS remainder
    FROM upool u JOIN uplays l ON l.user_id = u.user_id
    WINDOW w AS (PARTITION BY u.currency, u.user_id)
), uranked AS (
    SELECT *, pool - sum(base) OVER (PARTITION BY currency, user_id) AS leftover,
           row_number() OVER (PARTITION BY currency, user_id
                              ORDER BY remainder DESC, track_id, territory, artist_id) AS rank
    FROM ushare
), ualloc AS (
    SELECT currency, track_id, artist_id, territory,
           sum(base + CASE WHEN rank <= leftover THEN 1 ELSE 0 END) AS amount
    FROM uranked GROUP BY ALL
), plays AS (
    SELECT track_id, artist_id, territory, sum(plays) AS plays FROM uplays GROUP BY ALL
), total AS (
    SELECT sum(plays) AS total_plays FROM plays
), rest AS (
    SELECT currency, sum(pool) AS pool FROM upool u
    WHERE NOT EXISTS (SELECT 1 FROM uplays l WHERE l.user_id = u.user_id) GROUP BY ALL
), rshare AS (
    SELECT r.currency, r.pool, p.track_id, p.artist_id, p.territory,
           (CAST(r.pool AS HUGEINT) * p.plays) // total_plays AS base,
           (CAST(r.pool AS HUGEINT) * p.plays) % total_plays AS remainder
    FROM rest r, plays p, total
), rranked AS (
    SELECT *, pool - sum(base) OVER (PARTITION BY currency) AS leftover,
           row_number() OVER (PARTITION BY currency ORDER BY remainder DESC, track_id, territory, artist_id) AS rank
    FROM rshare
), ralloc AS (
    SELECT currency, track_id, artist_id, territory,
           base + CASE WHEN rank <= leftover THEN 1 ELSE 0 END AS amount
    FROM rranked
), pools AS (
    SELECT currency, sum(pool) AS pool FROM upool GROUP BY ALL
)
SELECT po.currency, p.track_id, p.artist_id, p.territory, p.plays,
       CAST(coalesce(u.amount, 0) + coalesce(r.amount, 0) AS BIGINT) AS amount_minor,
       CAST(po.pool AS BIGINT) AS pool_minor, CAST(total_plays AS BIGINT)
FROM pools po CROSS JOIN plays p CROSS JOIN total
LEFT JOIN ualloc u ON u.currency = po.currency AND u.track_id = p.track_id AND u.artist_id = p.artist_id
                  AND u.territory = p.territory
LEFT JOIN ralloc r ON r.currency = po.currency AND r.track_id = p.track_id AND r.artist_id = p.artist_id
                  AND r.territory = p.territory
ORDER BY po.currency, p.track_id, p.territory, p.artist_id
"""


@pytest.mark.integration
def test_user_centric_statement_equals_sql(world: Settings):
    """Subscriptions ``sub-<i>`` of the payment run belong to ``u<i mod 37>`` (the listeners
    ``u0``–``u49``), except every 5th (a subscriber who played nothing) and every 7th (no row: an
    unknown subscriber), in a stand-in for the subscriptions part's ``subscription_events``."""
    from projections.store import reader, writer

    owners = [(f"sub-{i}", f"nobody-{i}" if i % 5 == 0 else f"u{i % 37}") for i in range(150) if i % 7]
    with writer(world.duckdb_path) as con:
        con.execute("CREATE OR REPLACE TABLE subscription_events (subscription_id VARCHAR, user_id VARCHAR)")
        con.executemany("INSERT INTO subscription_events VALUES (?, ?)", owners)
    period = Period.parse("2026-01")
    statement, _ = run_statement(world, period, pool_bp=7000, method="user-centric")
    with reader(world.duckdb_path) as con:
        want = con.execute(
            USER_CENTRIC_SQL, {"start": period.start, "end": period.end, "bp": 7000}
        ).fetchall()
        got = con.execute(
            "SELECT currency, track_id, artist_id, territory, plays, amount_minor, pool_minor, total_plays "
            "FROM royalty_statements WHERE period = '2026-01' AND method = 'user-centric' "
            "ORDER BY currency, track_id, territory, artist_id"
        ).fetchall()
        pro_rata = con.execute(
            "SELECT currency, track_id, territory, amount_minor FROM royalty_statements "
            "WHERE period = '2026-01' AND method = 'pro-rata' ORDER BY ALL"
        ).fetchall()
    assert got == want and len(want) > 100
    for c, pool in statement.pools.items():
        assert sum(r[5] for r in want if r[0] == c) == pool > 0
    if pro_rata:  # the two methods share the same plays differently
        assert [r[3] for r in pro_rata] != [r[5] for r in sorted(got, key=lambda r: (r[0], r[1], r[3]))]


@pytest.mark.integration
def test_rerun_replaces_the_period_and_export_and_cli_agree(world: Settings, tmp_path: Path, monkeypatch):
    jan, feb = Period.parse("2026-01"), Period.parse("2026-02")
    run_statement(world, jan, pool_bp=7000)
    run_statement(world, feb, pool_bp=7000)
    first = got(world, jan)
    _, path = run_statement(world, jan, pool_bp=7000, export_dir=tmp_path)
    assert got(world, jan) == first  # replaced, not appended
    assert query(
        world, "SELECT count(*) FROM royalty_statements WHERE period = '2026-01' AND method = 'pro-rata'"
    ).rows[0][0] == len(first)
    assert got(world, feb) and got(world, feb) != first  # another period is left alone
    assert path == tmp_path / "royalty_statements_2026-01.parquet"
    exported = pq.read_table(path).to_pylist()
    cols = ("currency", "track_id", "artist_id", "territory", "plays", "amount_minor", "pool_minor",
            "total_plays", "revenue_minor")  # fmt: skip
    assert sorted(tuple(r[c] for c in cols) for r in exported) == sorted(first)
    assert {r["period"] for r in exported} == {"2026-01"}

    from infra.cli import app

    for name, value in world.to_env().items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("BACKBEAT_ROYALTY_POOL_BP", "7000")
    out = CliRunner().invoke(app, ["royalties", "statement", "--period", "2026-01", "--json"])
    assert out.exit_code == 0, out.output
    doc = json.loads(out.output)
    assert doc["period"] == "2026-01" and doc["pool_bp"] == 7000 and doc["rows"] == len(first)
    assert sorted(tuple(r[c] for c in cols) for r in doc["statement"]) == sorted(first)
    bad = CliRunner().invoke(app, ["royalties", "statement", "--period", "2026-13"])
    assert bad.exit_code != 0 and "expected YYYY-MM" in str(bad.exception)
