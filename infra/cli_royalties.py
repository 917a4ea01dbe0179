"""``backbeat royalties statement --period YYYY-MM``: the monthly pro-rata royalty statement
(:mod:`projections.royalties`), stored in the ``royalty_statements`` read model and optionally
exported to Parquet (registered by :mod:`infra.cli`).

Errors (:class:`~projections.royalties.RoyaltyError`, a bad ``BACKBEAT_ROYALTY_POOL_BP``) print
their message and exit 1 through ``infra.cli.main``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from infra.console import console, table
from infra.settings import get_settings

#: Rows of the human output (largest amounts first).
TOP = 20


def summary(statement: Any, export: Path | None) -> dict[str, Any]:
    """The JSON form of a statement: period, pool share, per currency revenue and pool, total
    plays, rows stored, the export path, and every row (``period_start``/``end`` as ISO-8601)."""
    rows = statement.rows.drop_columns(["period_start", "period_end", "computed_at"]).to_pylist()
    return {
        "period": str(statement.period),
        "method": statement.method,
        "pool_bp": statement.pool_bp,
        "revenue_minor": statement.revenue,
        "pool_minor": statement.pools,
        "total_plays": statement.total_plays,
        "rows": len(rows),
        "export": str(export) if export else None,
        "statement": rows,
    }


def statement(
    period: Annotated[str, typer.Option(help="The UTC month, YYYY-MM (e.g. 2026-01).")],
    export: Annotated[
        Path | None,
        typer.Option(help="Also write royalty_statements_YYYY-MM.parquet (the period) into this directory."),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the statement as JSON.")] = False,
    pool_bp: Annotated[
        int | None,
        typer.Option(
            help="Pool share in basis points (default BACKBEAT_ROYALTY_POOL_BP, else 7000).",
            min=0,
            max=10_000,
        ),
    ] = None,  # fmt: skip
    method: Annotated[
        str,
        typer.Option(
            help="pro-rata (the default), or user-centric: each subscriber's payment shared "
            "over that subscriber's plays only (needs the subscription_events read model)."
        ),
    ] = "pro-rata",  # fmt: skip
) -> None:
    """Compute the pro-rata royalty statement of a month: the subscription revenue recognised in
    the ledger that month (net of refunds), times the pool share, shared across tracks by counted
    plays (ms_played >= 30000) per track, artist and territory, in minor units that sum exactly to
    the pool (largest remainder). Replaces the month's rows of the royalty_statements read model."""
    from projections.royalties import Period, run_statement

    done, path = run_statement(
        get_settings(), Period.parse(period), pool_bp=pool_bp, export_dir=export, method=method
    )
    if as_json:
        typer.echo(json.dumps(summary(done, path), default=str))
        return
    money = [(c, done.revenue.get(c, 0), p) for c, p in sorted(done.pools.items())]
    console.print(
        table(["currency", "revenue (minor)", "pool (minor)"], money,
              title=f"royalties {done.period} ({done.method}): pool {done.pool_bp / 100:g} % of revenue")
    )  # fmt: skip
    console.print(f"{done.total_plays} counted plays, {done.rows.num_rows} statement rows stored")
    top = sorted(done.rows.to_pylist(), key=lambda r: (-r["amount_minor"], r["track_id"], r["territory"]))[
        :TOP
    ]
    if top:
        console.print(
            table(["currency", "track", "artist", "territory", "plays", "amount (minor)"],
                  [(r["currency"], r["track_id"], r["artist_id"], r["territory"], r["plays"],
                    r["amount_minor"]) for r in top], title=f"top {len(top)} rows")
        )  # fmt: skip
    if path is not None:
        console.print(f"exported to {path}")


def register(app: typer.Typer) -> None:
    """Add the ``royalties`` command group to the ``backbeat`` app."""
    group = typer.Typer(
        help="Royalties: monthly statements (pro-rata or user-centric) from the ledger and listens.",
        no_args_is_help=True,
        rich_markup_mode="markdown",
    )
    group.command("statement")(statement)
    app.add_typer(group, name="royalties")
