"""Monthly pro-rata royalty statements: the period's subscription revenue (from the ledger read
model) shared across tracks by counted plays (from the listens read model), per track, artist
and territory, in integer minor units that sum exactly to the pool (docs/live-royalties.md).

For a period ``YYYY-MM`` (the UTC month ``[start, end)``) and each currency:

* **revenue** = the subscription revenue recognised in the month: ``−Σ amount_minor`` of the
  ``revenue`` account's lines (credits, negative) minus ``Σ amount_minor`` of the ``refunds``
  account's lines (debits, positive) of ``ledger_entries`` rows with ``reference_type =
  'SUBSCRIPTION'`` and ``posted_at`` in the month (a refund counts in the month it is posted, not
  the month of the sale). A currency whose revenue is ≤ 0 has no pool and no rows.
* **pool** = ``floor(revenue × pool_bp / 10000)`` (``BACKBEAT_ROYALTY_POOL_BP``, default 7000
  basis points = 70 %; the platform keeps the fraction of a minor unit).
* **counted plays** = ``listens`` with ``occurred_at`` in the month and ``ms_played >= 30000``
  (the 30-second rule) or ``ms_played IS NULL`` (file imports: a Last.fm scrobble is already a
  play under a stricter rule, at least half the track or 4 minutes, tracks of 30 s or more),
  grouped by ``(track_id, artist_id, territory)``; a NULL territory (file imports) is ``ZZ``
  (the ISO 3166 code for "unknown"). ``P`` = all counted plays of the month (every currency's
  pool is shared over the same plays).
* **amount** of a row with ``p`` plays = ``pool × p / P`` by the largest-remainder method
  (Hamilton): each row gets ``floor(pool × p / P)``; the ``pool − Σ floor`` minor units left
  (fewer than the rows) go one each to the rows with the largest remainders ``(pool × p) mod P``,
  ties broken by ``track_id``, then ``territory``, then ``artist_id`` (ascending). So the amounts
  sum exactly to the pool and no row is more than one minor unit from its exact share.

**User-centric** (``method = 'user-centric'``, :func:`compute_user_centric`): each subscriber's
own revenue is shared over that subscriber's counted plays only. Per currency and user ``u``
(the subscription's user from :data:`SUBSCRIPTION_USERS`): ``revenue_u`` as above restricted to
``u``'s subscriptions, ``pool_u = floor(revenue_u × pool_bp / 10000)`` (users with
``revenue_u > 0``), split over ``u``'s plays per ``(track, artist, territory)`` by the same
largest-remainder rule. The pools of users without a counted play in the month, and of
subscriptions whose user is unknown, are added up and shared pro-rata over all counted plays
(same rule). A row's amount is the sum of its shares; the statement's ``pool_minor`` is
``Σ pool_u`` (it can be below the pro-rata pool by less than one minor unit per user, the
floors being per user), and the amounts sum to it exactly.

The read model ``royalty_statements`` (:data:`DDL`) holds one row per ``(period, method,
currency, track_id, artist_id, territory)``; computing a period replaces its rows in one
transaction (readers see the old statement or the new one, never a mix). :func:`export_parquet`
writes one Parquet file per period.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq

from infra.errors import BackbeatError, ConfigError
from infra.settings import Settings

TABLE = "royalty_statements"
PRO_RATA = "pro-rata"
USER_CENTRIC = "user-centric"
METHODS = (PRO_RATA, USER_CENTRIC)
#: The read model linking a subscription to its user (``subscription_id``, ``user_id``; built from
#: ``billing.subscriptions`` by the subscriptions part of issue 17), for the user-centric method.
SUBSCRIPTION_USERS = "subscription_events"
#: The 30-second rule (decision 4 of issue 17): a play counts from this many ms heard.
COUNTED_MS = 30_000
#: Territory of listens that have none (file imports): ISO 3166-1 "ZZ", unknown.
UNKNOWN_TERRITORY = "ZZ"
POOL_BP_VAR = "BACKBEAT_ROYALTY_POOL_BP"
#: Default pool share: 70 % of subscription revenue (module docstring, docs/live-royalties.md).
DEFAULT_POOL_BP = 7000

DDL = f"""CREATE TABLE IF NOT EXISTS {TABLE} (
  period VARCHAR NOT NULL, method VARCHAR NOT NULL, currency VARCHAR NOT NULL,
  track_id VARCHAR NOT NULL, artist_id VARCHAR NOT NULL, territory VARCHAR NOT NULL,
  plays BIGINT NOT NULL, amount_minor BIGINT NOT NULL, pool_minor BIGINT NOT NULL,
  total_plays BIGINT NOT NULL, revenue_minor BIGINT NOT NULL, pool_bp INTEGER NOT NULL,
  period_start TIMESTAMP NOT NULL, period_end TIMESTAMP NOT NULL, computed_at TIMESTAMP NOT NULL
)"""

SCHEMA = pa.schema(
    [
        pa.field("period", pa.string(), False),
        pa.field("method", pa.string(), False),
        pa.field("currency", pa.string(), False),
        pa.field("track_id", pa.string(), False),
        pa.field("artist_id", pa.string(), False),
        pa.field("territory", pa.string(), False),
        pa.field("plays", pa.int64(), False),
        pa.field("amount_minor", pa.int64(), False),
        pa.field("pool_minor", pa.int64(), False),
        pa.field("total_plays", pa.int64(), False),
        pa.field("revenue_minor", pa.int64(), False),
        pa.field("pool_bp", pa.int32(), False),
        pa.field("period_start", pa.timestamp("ms"), False),
        pa.field("period_end", pa.timestamp("ms"), False),
        pa.field("computed_at", pa.timestamp("ms"), False),
    ]
)

_PERIOD = re.compile(r"(\d{4})-(\d{2})")


class RoyaltyError(BackbeatError):
    """A statement cannot be computed: a malformed period, or a read model it needs is missing."""


@dataclass(frozen=True)
class Period:
    """A UTC calendar month ``YYYY-MM``; ``start_ms``/``end_ms`` its bounds, ms since the epoch
    (``[start, end)``)."""

    year: int
    month: int

    @classmethod
    def parse(cls, text: str) -> Period:
        """``"2026-01"`` → ``Period(2026, 1)``.

        Raises:
            RoyaltyError: not ``YYYY-MM`` with a month 01–12.
        """
        m = _PERIOD.fullmatch(text.strip())
        if not m or not 1 <= int(m.group(2)) <= 12:
            raise RoyaltyError(f"period {text!r}: expected YYYY-MM, a UTC month such as 2026-01")
        return cls(int(m.group(1)), int(m.group(2)))

    def __str__(self) -> str:
        return f"{self.year:04d}-{self.month:02d}"

    @property
    def start(self) -> datetime:
        """The first instant (naive UTC, as DuckDB ``TIMESTAMP`` columns hold it)."""
        return datetime(self.year, self.month, 1)

    @property
    def end(self) -> datetime:
        """The first instant of the next month (naive UTC)."""
        return datetime(self.year + self.month // 12, self.month % 12 + 1, 1)

    @property
    def start_ms(self) -> int:
        """:attr:`start` in ms since the epoch."""
        return int(self.start.replace(tzinfo=UTC).timestamp() * 1000)

    @property
    def end_ms(self) -> int:
        """:attr:`end` in ms since the epoch."""
        return int(self.end.replace(tzinfo=UTC).timestamp() * 1000)


def pool_bp_setting(environ: Mapping[str, str] | None = None) -> int:
    """``BACKBEAT_ROYALTY_POOL_BP``: the pool's share of revenue in basis points (0–10000;
    default :data:`DEFAULT_POOL_BP`).

    Raises:
        ConfigError: not an integer in 0..10000.
    """
    env = os.environ if environ is None else environ
    raw = (env.get(POOL_BP_VAR) or "").strip()
    if not raw:
        return DEFAULT_POOL_BP
    try:
        value = int(raw)
    except ValueError:
        value = -1
    if not 0 <= value <= 10_000:
        raise ConfigError(
            f"{POOL_BP_VAR}={raw!r}: expected basis points, an integer from 0 to 10000 (7000 = 70 %)"
        )
    return value


def largest_remainder(pool: int, weights: Sequence[int], order: Sequence[Any] | None = None) -> list[int]:
    """Split ``pool`` (minor units, ≥ 0) in proportion to ``weights`` (plays, ≥ 0, sum > 0) by the
    largest-remainder method: floors first, then one unit each to the largest remainders, ties by
    ``order[i]`` ascending (default: the index). The result sums to ``pool``.

    Raises:
        ValueError: a negative pool or weight, or weights that sum to 0.
    """
    total = sum(weights)
    if pool < 0 or total <= 0 or any(w < 0 for w in weights):
        raise ValueError(f"cannot share {pool} over weights summing to {total}")
    shares = [divmod(pool * w, total) for w in weights]
    amounts = [q for q, _ in shares]
    left = pool - sum(amounts)
    ties = order if order is not None else range(len(weights))
    ranked = sorted(range(len(weights)), key=lambda i: (-shares[i][1], ties[i]))
    for i in ranked[:left]:
        amounts[i] += 1
    return amounts


def _need(con: duckdb.DuckDBPyConnection, *names: str) -> None:
    known = {r[0] for r in con.execute("SELECT table_name FROM information_schema.tables").fetchall()}
    missing = [n for n in names if n not in known]
    if missing:
        raise RoyaltyError(
            f"read model(s) {', '.join(missing)} missing: run the projections first "
            "('backbeat project --until-caught-up'), with the ledger agent posting billing.payments"
        )


def revenue(con: duckdb.DuckDBPyConnection, period: Period) -> dict[str, int]:
    """Subscription revenue of ``period`` per currency (module docstring), minor units."""
    _need(con, "ledger_entries")
    rows = con.execute(
        """SELECT currency,
                  CAST(-coalesce(sum(amount_minor) FILTER (WHERE account = 'revenue'), 0)
                       - coalesce(sum(amount_minor) FILTER (WHERE account = 'refunds'), 0) AS BIGINT)
           FROM ledger_entries
           WHERE reference_type = 'SUBSCRIPTION' AND posted_at >= ? AND posted_at < ?
           GROUP BY currency ORDER BY currency""",
        [period.start, period.end],
    ).fetchall()
    return {str(c): int(v) for c, v in rows}


def counted_plays(con: duckdb.DuckDBPyConnection, period: Period) -> list[tuple[str, str, str, int]]:
    """``(track_id, artist_id, territory, plays)`` of ``period`` (module docstring), ordered by
    track, territory, artist."""
    _need(con, "listens")
    rows = con.execute(
        f"""SELECT track_id, artist_id, coalesce(territory, '{UNKNOWN_TERRITORY}') AS territory, count(*)
            FROM listens
            WHERE occurred_at >= ? AND occurred_at < ? AND (ms_played IS NULL OR ms_played >= {COUNTED_MS})
            GROUP BY ALL ORDER BY track_id, territory, artist_id""",
        [period.start, period.end],
    ).fetchall()
    return [(str(t), str(a), str(z), int(n)) for t, a, z, n in rows]


@dataclass(frozen=True)
class Statement:
    """A computed statement: its ``rows`` (:data:`SCHEMA`), and per currency the ``revenue`` and
    ``pools`` (minor units); ``total_plays`` of the period."""

    period: Period
    pool_bp: int
    rows: pa.Table
    revenue: dict[str, int]
    pools: dict[str, int]
    total_plays: int
    method: str = PRO_RATA


def _table(
    period: Period, method: str, pool_bp: int, total: int, plays: list[tuple[str, str, str, int]],
    amounts: dict[str, list[int]], pools: dict[str, int], revenues: dict[str, int],
) -> pa.Table:  # fmt: skip
    now = datetime.now(UTC).replace(tzinfo=None)
    cols: dict[str, list[Any]] = {f.name: [] for f in SCHEMA}
    for currency in sorted(amounts):
        for (track, artist, territory, n), amount in zip(plays, amounts[currency], strict=True):
            for name, value in (
                ("period", str(period)), ("method", method), ("currency", currency), ("track_id", track),
                ("artist_id", artist), ("territory", territory), ("plays", n), ("amount_minor", amount),
                ("pool_minor", pools[currency]), ("total_plays", total),
                ("revenue_minor", revenues[currency]), ("pool_bp", pool_bp), ("period_start", period.start),
                ("period_end", period.end), ("computed_at", now),
            ):  # fmt: skip
                cols[name].append(value)
    return pa.table(cols, schema=SCHEMA)


def compute(con: duckdb.DuckDBPyConnection, period: Period, pool_bp: int) -> Statement:
    """The pro-rata statement of ``period`` from the ``ledger_entries`` and ``listens`` read
    models on ``con`` (module docstring).

    Raises:
        RoyaltyError: a read model is missing.
    """
    revenues = revenue(con, period)
    plays = counted_plays(con, period)
    total = sum(p for *_, p in plays)
    pools = {c: r * pool_bp // 10_000 for c, r in revenues.items() if r > 0}
    order = [(t, z, a) for t, a, z, _ in plays]
    amounts = (
        {c: largest_remainder(pool, [p for *_, p in plays], order) for c, pool in pools.items()}
        if total
        else {}
    )
    table = _table(period, PRO_RATA, pool_bp, total, plays, amounts, pools, revenues)
    return Statement(period, pool_bp, table, revenues, pools, total, PRO_RATA)


def compute_user_centric(con: duckdb.DuckDBPyConnection, period: Period, pool_bp: int) -> Statement:
    """The user-centric statement of ``period`` (module docstring) from ``ledger_entries``,
    ``listens`` and :data:`SUBSCRIPTION_USERS` on ``con``.

    Raises:
        RoyaltyError: a read model is missing.
    """
    _need(con, "ledger_entries", "listens", SUBSCRIPTION_USERS)
    revenues = revenue(con, period)
    per_user = con.execute(
        f"""WITH owners AS (SELECT DISTINCT subscription_id, user_id FROM {SUBSCRIPTION_USERS}
                            QUALIFY row_number() OVER (PARTITION BY subscription_id ORDER BY user_id) = 1)
            SELECT currency, o.user_id,
                   CAST(-coalesce(sum(amount_minor) FILTER (WHERE account = 'revenue'), 0)
                        - coalesce(sum(amount_minor) FILTER (WHERE account = 'refunds'), 0) AS BIGINT)
            FROM ledger_entries e LEFT JOIN owners o ON o.subscription_id = e.reference_id
            WHERE reference_type = 'SUBSCRIPTION' AND posted_at >= ? AND posted_at < ?
            GROUP BY ALL""",
        [period.start, period.end],
    ).fetchall()
    user_plays = con.execute(
        f"""SELECT user_id, track_id, artist_id, coalesce(territory, '{UNKNOWN_TERRITORY}'), count(*)
            FROM listens
            WHERE occurred_at >= ? AND occurred_at < ? AND (ms_played IS NULL OR ms_played >= {COUNTED_MS})
            GROUP BY ALL""",
        [period.start, period.end],
    ).fetchall()
    plays = counted_plays(con, period)
    total = sum(p for *_, p in plays)
    index = {(t, a, z): i for i, (t, a, z, _) in enumerate(plays)}
    by_user: dict[str, list[tuple[int, int]]] = {}
    for user, track, artist, territory, n in user_plays:
        by_user.setdefault(str(user), []).append((index[(str(track), str(artist), str(territory))], int(n)))
    order = [(t, z, a) for t, a, z, _ in plays]
    amounts: dict[str, list[int]] = {}
    pools: dict[str, int] = {}
    unplayed: dict[str, int] = {}
    for currency, user, value in per_user:
        if value <= 0 or total == 0:
            continue
        pool_u = int(value) * pool_bp // 10_000
        pools[currency] = pools.get(currency, 0) + pool_u
        row = amounts.setdefault(currency, [0] * len(plays))
        mine = by_user.get(str(user)) if user is not None else None
        if not mine:
            unplayed[currency] = unplayed.get(currency, 0) + pool_u
            continue
        shares = largest_remainder(pool_u, [n for _, n in mine], [order[i] for i, _ in mine])
        for (i, _), amount in zip(mine, shares, strict=True):
            row[i] += amount
    for currency, rest in unplayed.items():
        for i, amount in enumerate(largest_remainder(rest, [p for *_, p in plays], order)):
            amounts[currency][i] += amount
    table = _table(period, USER_CENTRIC, pool_bp, total, plays, amounts, pools, revenues)
    return Statement(period, pool_bp, table, revenues, pools, total, USER_CENTRIC)


def store(con: duckdb.DuckDBPyConnection, statement: Statement) -> None:
    """Replace the period's rows of ``statement``'s method in ``royalty_statements`` with
    ``statement``'s, in one transaction (creating the table when missing)."""
    rows = statement.rows  # noqa: F841 - read by DuckDB's replacement scan
    con.begin()
    try:
        con.execute(DDL)
        con.execute(
            f"DELETE FROM {TABLE} WHERE period = ? AND method = ?", [str(statement.period), statement.method]
        )
        con.execute(f"INSERT INTO {TABLE} BY NAME SELECT * FROM rows")
        con.commit()
    except BaseException:
        con.rollback()
        raise


def export_parquet(statement: Statement, directory: Path) -> Path:
    """Write ``statement``'s rows to ``<directory>/royalty_statements_<YYYY-MM>.parquet``
    (``..._<YYYY-MM>_user-centric.parquet`` for that method; written to a temporary name, then
    renamed: a reader never sees half a file). Returns the path."""
    directory.mkdir(parents=True, exist_ok=True)
    suffix = "" if statement.method == PRO_RATA else f"_{statement.method}"
    path = directory / f"{TABLE}_{statement.period}{suffix}.parquet"
    tmp = path.with_name(path.name + ".tmp")
    pq.write_table(statement.rows, tmp)
    os.replace(tmp, path)
    return path


def run_statement(
    settings: Settings,
    period: Period,
    *,
    pool_bp: int | None = None,
    export_dir: Path | None = None,
    method: str = PRO_RATA,
) -> tuple[Statement, Path | None]:
    """Compute the statement of ``period`` from the read models in ``settings.duckdb_path``, store
    it in ``royalty_statements`` (one writer transaction, so inputs and output are one snapshot),
    and export it to ``export_dir`` when given. ``pool_bp``: default :func:`pool_bp_setting`;
    ``method``: ``pro-rata`` or ``user-centric``.

    Raises:
        RoyaltyError: a read model is missing, or an unknown method.
        ConfigError: a bad ``BACKBEAT_ROYALTY_POOL_BP``.
        DatabaseBusyError: the read-model file stayed locked.
    """
    from projections.store import writer

    bp = pool_bp_setting() if pool_bp is None else pool_bp
    if method not in METHODS:
        raise RoyaltyError(f"method {method!r}: use {' or '.join(METHODS)}")
    if not settings.duckdb_path.exists():
        raise RoyaltyError(
            f"there are no read models at {settings.duckdb_path} yet; "
            "run 'backbeat project --until-caught-up'"
        )
    with writer(settings.duckdb_path) as con:
        statement = (compute if method == PRO_RATA else compute_user_centric)(con, period, bp)
        store(con, statement)
    path = export_parquet(statement, export_dir) if export_dir is not None else None
    return statement, path


__all__ = [
    "COUNTED_MS",
    "DDL",
    "DEFAULT_POOL_BP",
    "METHODS",
    "SUBSCRIPTION_USERS",
    "USER_CENTRIC",
    "POOL_BP_VAR",
    "PRO_RATA",
    "SCHEMA",
    "TABLE",
    "UNKNOWN_TERRITORY",
    "Period",
    "RoyaltyError",
    "Statement",
    "compute",
    "compute_user_centric",
    "counted_plays",
    "export_parquet",
    "largest_remainder",
    "pool_bp_setting",
    "revenue",
    "run_statement",
    "store",
]
