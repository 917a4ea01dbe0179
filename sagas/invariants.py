"""The saga invariants of issue 6, as SQL over one DuckDB connection (read-only is enough).

The tables checked (filled by the saga read models, the gateway simulator's record, the inventory
service and the ledger projection; :data:`TABLES_DDL` gives their shapes):

- ``sagas(saga_id, kind, state, business_id, user_id, payment_id, amount_minor, currency, reason,
  started_at, ended_at, duration_ms, retries, version)``; ``state`` is RUNNING, COMPENSATING,
  COMPLETED, COMPENSATED or REJECTED;
- ``saga_order_lines(saga_id, order_id, sku, quantity)``;
- ``gateway_operations(operation_id, saga_id, payment_id, idempotency_key, kind, status,
  amount_minor, currency, provider_reference, created_at_ms)``; ``kind`` authorize, capture,
  void or refund; ``status`` approved or declined. An operation is counted once per
  ``operation_id`` even if the record held it twice;
- ``inventory_reservations(reservation_id, order_id, sku, quantity, state)`` (reserved,
  released, rejected) and ``inventory_stock(sku, initial_units, available_units)``;
- ``ledger_entries`` (:data:`projections.readmodels.LEDGER_ENTRIES`, signed minor units).

Each invariant (:data:`INVARIANTS`) is one query listing the offending items as ``(id, why)``
rows, in id order; none means it holds. "Failed saga" below means any saga not COMPLETED, and a
gateway operation whose ``saga_id`` names no saga counts as belonging to a failed one.

1. ``every saga is terminal`` — sagas whose state is not COMPLETED, COMPENSATED or REJECTED.
2. ``no capture for a failed saga`` — payments with an approved capture whose saga is not
   COMPLETED and that were not refunded in full (approved refunds of the payment ≥ captures).
3. ``captures of failed sagas refunded`` — informational, never fails: the failed sagas whose
   capture was refunded in full (compensated by a refund rather than a void).
4. ``no payment captured twice`` — payment ids with more than one approved capture.
5. ``no saga captured twice`` — saga ids with more than one approved capture.
6. ``completed sagas captured once in full`` — COMPLETED sagas without exactly one approved
   capture, or whose capture's amount or currency differs from the saga's.
7. ``authorisations of failed sagas released`` — approved authorisations of failed sagas whose
   payment was neither voided (approved void) nor, when it was captured, refunded in full.
8. ``inventory reserved = completed orders`` — SKUs whose units in reservations in state
   ``reserved`` differ from the units of the lines of COMPLETED sagas.
9. ``stock accounts for reservations`` — SKUs where ``initial_units − available_units`` differs
   from the reserved units (or reserved SKUs without stock).
10. ``ledger sums to zero`` — entries (per ``entry_id`` and currency) whose lines do not sum to
    zero, then currencies whose ledger does not.
11. ``ledger matches the gateway`` — per saga and currency (sagaless operations and postings
    together as ``(no saga)``), then per currency overall: ``gateway_clearing`` balance ≠
    approved captures − approved refunds, ``revenue`` ≠ −captures, or ``refunds`` ≠ refunds.

Subscriptions over time (issue 17, :data:`ENTITLEMENT_INVARIANTS`, over the ``entitlements``,
``subscription_periods``, ``subscription_events`` and ``business_clock`` read models of
:mod:`sagas.access` besides ``ledger_entries`` and ``sagas``):

12. ``premium access covered by a paid period`` — PREMIUM entitlements whose
    ``[valid_from, valid_until)`` is not inside a paid period (captured, not refunded) of their
    subscription: no user ever had premium access without a paid period covering it.
13. ``no premium access now without a paid period`` — the same at the business clock's now.
14. ``ended subscriptions revoked`` — subscriptions cancelled or lapsed by now whose last
    entitlement is not REVOKED.
15. ``no subscription period captured twice`` — (subscription, period) pairs with more than one
    captured payment (a doubled renewal).
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass

import duckdb
from rich import box
from rich.console import Console
from rich.table import Table

from sagas.access import access_predicate

#: The shapes :func:`check_invariants` reads (``ledger_entries``: the projection's DDL, with
#: ``kafka_partition`` and ``kafka_offset`` besides). Extra columns are ignored.
TABLES_DDL: dict[str, str] = {
    "sagas": """CREATE TABLE sagas (
    saga_id VARCHAR, kind VARCHAR, state VARCHAR, business_id VARCHAR, user_id VARCHAR,
    payment_id VARCHAR, amount_minor BIGINT, currency VARCHAR, reason VARCHAR,
    started_at TIMESTAMP, ended_at TIMESTAMP, duration_ms BIGINT, retries INTEGER, version INTEGER)""",
    "saga_order_lines": """CREATE TABLE saga_order_lines (
    saga_id VARCHAR, order_id VARCHAR, sku VARCHAR, quantity INTEGER)""",
    "gateway_operations": """CREATE TABLE gateway_operations (
    operation_id VARCHAR, saga_id VARCHAR, payment_id VARCHAR, idempotency_key VARCHAR, kind VARCHAR,
    status VARCHAR, amount_minor BIGINT, currency VARCHAR, provider_reference VARCHAR,
    created_at_ms BIGINT)""",
    "inventory_reservations": """CREATE TABLE inventory_reservations (
    reservation_id VARCHAR, order_id VARCHAR, sku VARCHAR, quantity INTEGER, state VARCHAR)""",
    "inventory_stock": """CREATE TABLE inventory_stock (
    sku VARCHAR, initial_units INTEGER, available_units INTEGER)""",
}

#: How many offending ids a result carries.
SAMPLE = 5

#: The gateway's operations, once per operation id.
_OPS = """ops AS (
    SELECT * FROM gateway_operations
    QUALIFY row_number() OVER (PARTITION BY operation_id ORDER BY created_at_ms) = 1
)"""

#: Per payment: captured and refunded amounts (approved), its saga and that saga's state.
_CAPTURED = f"""WITH {_OPS},
cap AS (
    SELECT payment_id, currency, any_value(saga_id) AS saga_id, sum(amount_minor) AS captured
    FROM ops WHERE kind = 'capture' AND status = 'approved' GROUP BY payment_id, currency
), ref AS (
    SELECT payment_id, currency, sum(amount_minor) AS refunded
    FROM ops WHERE kind = 'refund' AND status = 'approved' GROUP BY payment_id, currency
), failed AS (
    SELECT c.*, coalesce(r.refunded, 0) AS refunded, coalesce(s.state, 'no saga') AS state
    FROM cap c
    LEFT JOIN sagas s ON s.saga_id = c.saga_id
    LEFT JOIN ref r ON r.payment_id = c.payment_id AND r.currency = c.currency
    WHERE s.state IS DISTINCT FROM 'COMPLETED'
)"""

_WHY_CAPTURED = """format('payment {} captured {} {}, refunded {}; saga {}',
       payment_id, captured, currency, refunded, state)"""


@dataclass(frozen=True)
class Invariant:
    """One check: ``name``; ``checks``, what it verifies (docs and the passing detail);
    ``sql``, a query of ``(id VARCHAR, why VARCHAR)`` rows, one per offending item, ordered;
    ``informational``: a report that never fails (its rows are shown, not counted)."""

    name: str
    checks: str
    sql: str
    informational: bool = False


@dataclass(frozen=True)
class InvariantResult:
    """The outcome of one invariant: ``ok``; ``detail``, what was checked or what is wrong (the
    first reasons); ``violations``, how many offending items; ``sample``, up to :data:`SAMPLE`
    of their ids (saga ids, payment ids, SKUs or entry ids, as the invariant says)."""

    name: str
    ok: bool
    detail: str
    violations: int
    sample: list[str]


INVARIANTS: tuple[Invariant, ...] = (
    Invariant(
        "every saga is terminal",
        "every saga is COMPLETED, COMPENSATED or REJECTED",
        """SELECT saga_id AS id, format('{} saga in state {}', kind, coalesce(state, 'NULL')) AS why
FROM sagas WHERE state IS NULL OR state NOT IN ('COMPLETED', 'COMPENSATED', 'REJECTED')
ORDER BY id""",
    ),
    Invariant(
        "no capture for a failed saga",
        "every approved capture belongs to a COMPLETED saga or was refunded in full",
        f"""{_CAPTURED}
SELECT coalesce(saga_id, payment_id) AS id, {_WHY_CAPTURED} AS why
FROM failed WHERE refunded < captured ORDER BY id""",
    ),
    Invariant(
        "captures of failed sagas refunded",
        "failed saga(s) whose capture was refunded in full (compensated by a refund)",
        f"""{_CAPTURED}
SELECT coalesce(saga_id, payment_id) AS id, {_WHY_CAPTURED} AS why
FROM failed WHERE refunded >= captured ORDER BY id""",
        informational=True,
    ),
    Invariant(
        "no payment captured twice",
        "every payment has at most one approved capture",
        f"""WITH {_OPS}
SELECT payment_id AS id,
       format('{{}} approved captures: {{}}', count(*),
              string_agg(operation_id, ', ' ORDER BY created_at_ms)) AS why
FROM ops WHERE kind = 'capture' AND status = 'approved'
GROUP BY payment_id HAVING count(*) > 1 ORDER BY id""",
    ),
    Invariant(
        "no saga captured twice",
        "every saga has at most one approved capture",
        f"""WITH {_OPS}
SELECT saga_id AS id,
       format('{{}} approved captures of payment(s) {{}}', count(*),
              string_agg(DISTINCT payment_id, ', ' ORDER BY payment_id)) AS why
FROM ops WHERE kind = 'capture' AND status = 'approved' AND saga_id IS NOT NULL
GROUP BY saga_id HAVING count(*) > 1 ORDER BY id""",
    ),
    Invariant(
        "completed sagas captured once in full",
        "every COMPLETED saga has exactly one approved capture, of its amount and currency",
        f"""WITH {_OPS},
cap AS (
    SELECT saga_id, count(*) AS n, sum(amount_minor) AS amount,
           string_agg(DISTINCT currency, ',' ORDER BY currency) AS currencies
    FROM ops WHERE kind = 'capture' AND status = 'approved' GROUP BY saga_id
)
SELECT s.saga_id AS id,
       format('{{}} approved capture(s) of {{}} {{}}; the saga is for {{}} {{}}', coalesce(c.n, 0),
              coalesce(c.amount, 0), coalesce(c.currencies, '-'), s.amount_minor, s.currency) AS why
FROM sagas s LEFT JOIN cap c ON c.saga_id = s.saga_id
WHERE s.state = 'COMPLETED'
  AND (coalesce(c.n, 0) <> 1 OR c.amount IS DISTINCT FROM s.amount_minor
       OR c.currencies IS DISTINCT FROM s.currency)
ORDER BY id""",
    ),
    Invariant(
        "authorisations of failed sagas released",
        "every approved authorisation of a failed saga was voided, or refunded in full if captured",
        f"""WITH {_OPS},
auth AS (
    SELECT payment_id, any_value(saga_id) AS saga_id FROM ops
    WHERE kind = 'authorize' AND status = 'approved' GROUP BY payment_id
), pay AS (
    SELECT payment_id,
           count(*) FILTER (WHERE kind = 'void') AS voids,
           coalesce(sum(amount_minor) FILTER (WHERE kind = 'capture'), 0) AS captured,
           coalesce(sum(amount_minor) FILTER (WHERE kind = 'refund'), 0) AS refunded
    FROM ops WHERE status = 'approved' GROUP BY payment_id
)
SELECT coalesce(a.saga_id, a.payment_id) AS id,
       format('payment {{}} authorised, {{}} void(s), captured {{}}, refunded {{}}; saga {{}}', a.payment_id,
              coalesce(p.voids, 0), coalesce(p.captured, 0), coalesce(p.refunded, 0),
              coalesce(s.state, 'no saga')) AS why
FROM auth a
LEFT JOIN sagas s ON s.saga_id = a.saga_id
LEFT JOIN pay p ON p.payment_id = a.payment_id
WHERE s.state IS DISTINCT FROM 'COMPLETED'
  AND CASE WHEN coalesce(p.captured, 0) > 0 THEN p.refunded < p.captured
           ELSE coalesce(p.voids, 0) = 0 END
ORDER BY id""",
    ),
    Invariant(
        "inventory reserved = completed orders",
        "per SKU, units in reservations still reserved = units of the lines of COMPLETED orders",
        """WITH reserved AS (
    SELECT sku, sum(quantity) AS units FROM inventory_reservations WHERE state = 'reserved' GROUP BY sku
), confirmed AS (
    SELECT l.sku, sum(l.quantity) AS units
    FROM saga_order_lines l JOIN sagas s ON s.saga_id = l.saga_id
    WHERE s.state = 'COMPLETED' GROUP BY l.sku
)
SELECT coalesce(r.sku, c.sku) AS id,
       format('{} units reserved, {} in completed orders', coalesce(r.units, 0), coalesce(c.units, 0)) AS why
FROM reserved r FULL JOIN confirmed c ON c.sku = r.sku
WHERE coalesce(r.units, 0) <> coalesce(c.units, 0)
ORDER BY id""",
    ),
    Invariant(
        "stock accounts for reservations",
        "per SKU, initial units − available units = units reserved",
        """WITH reserved AS (
    SELECT sku, sum(quantity) AS units FROM inventory_reservations WHERE state = 'reserved' GROUP BY sku
)
SELECT coalesce(st.sku, r.sku) AS id,
       CASE WHEN st.sku IS NULL THEN format('{} units reserved of a SKU without stock', r.units)
            ELSE format('initial {} − available {} = {}, but {} units reserved', st.initial_units,
                        st.available_units, st.initial_units - st.available_units, coalesce(r.units, 0))
       END AS why
FROM inventory_stock st FULL JOIN reserved r ON r.sku = st.sku
WHERE st.sku IS NULL OR st.initial_units - st.available_units <> coalesce(r.units, 0)
ORDER BY id""",
    ),
    Invariant(
        "ledger sums to zero",
        "every ledger entry, and the ledger per currency, sums to zero",
        """SELECT id, why FROM (
    SELECT 0 AS rank, entry_id AS id, format('entry sums to {} {}', sum(amount_minor), currency) AS why
    FROM ledger_entries GROUP BY entry_id, currency HAVING sum(amount_minor) <> 0
    UNION ALL
    SELECT 1, 'currency ' || currency, format('the ledger sums to {} {}', sum(amount_minor), currency)
    FROM ledger_entries GROUP BY currency HAVING sum(amount_minor) <> 0
) ORDER BY rank, id""",
    ),
    Invariant(
        "ledger matches the gateway",
        "per saga and per currency: gateway_clearing = captures − refunds, revenue = −captures, "
        "refunds = refunds (approved gateway operations)",
        f"""WITH {_OPS},
led AS (
    SELECT saga_id, currency,
           coalesce(sum(amount_minor) FILTER (WHERE account = 'gateway_clearing'), 0) AS clearing,
           coalesce(sum(amount_minor) FILTER (WHERE account = 'revenue'), 0) AS revenue,
           coalesce(sum(amount_minor) FILTER (WHERE account = 'refunds'), 0) AS refunds
    FROM ledger_entries GROUP BY saga_id, currency
), gw AS (
    SELECT saga_id, currency,
           coalesce(sum(amount_minor) FILTER (WHERE kind = 'capture'), 0) AS captured,
           coalesce(sum(amount_minor) FILTER (WHERE kind = 'refund'), 0) AS refunded
    FROM ops WHERE status = 'approved' AND kind IN ('capture', 'refund') GROUP BY saga_id, currency
), per_saga AS (
    SELECT coalesce(l.saga_id, g.saga_id) AS saga_id, coalesce(l.currency, g.currency) AS currency,
           coalesce(l.clearing, 0) AS clearing, coalesce(l.revenue, 0) AS revenue,
           coalesce(l.refunds, 0) AS refunds, coalesce(g.captured, 0) AS captured,
           coalesce(g.refunded, 0) AS refunded
    FROM led l FULL JOIN gw g ON l.saga_id IS NOT DISTINCT FROM g.saga_id AND l.currency = g.currency
), per_currency AS (
    SELECT currency, sum(clearing) AS clearing, sum(revenue) AS revenue, sum(refunds) AS refunds,
           sum(captured) AS captured, sum(refunded) AS refunded
    FROM per_saga GROUP BY currency
), wrong AS (
    SELECT 0 AS rank, coalesce(saga_id, '(no saga)') AS id, * EXCLUDE (saga_id) FROM per_saga
    UNION ALL
    SELECT 1, 'currency ' || currency, * FROM per_currency
)
SELECT id,
       format('{{}}: gateway_clearing {{}} vs captures − refunds {{}}; '
              || 'revenue {{}} vs {{}}; refunds {{}} vs {{}}',
              currency, clearing, captured - refunded, revenue, -captured, refunds, refunded) AS why
FROM wrong
WHERE clearing <> captured - refunded OR revenue <> -captured OR refunds <> refunded
ORDER BY rank, id""",
    ),
)


# -- issue 17, subscriptions over time ------------------------------------------------------------
#: Per payment: captured (−revenue) and refunded amounts in the ledger; paid = captured, not
#: refunded in full.
_PAID = """paid AS (
    SELECT payment_id, any_value(saga_id) AS saga_id,
           -coalesce(sum(amount_minor) FILTER (WHERE account = 'revenue'), 0) AS captured,
           coalesce(sum(amount_minor) FILTER (WHERE account = 'refunds'), 0) AS refunded
    FROM ledger_entries GROUP BY payment_id
), paid_periods AS (
    SELECT p.* FROM subscription_periods p JOIN paid USING (payment_id)
    WHERE paid.captured > 0 AND paid.refunded < paid.captured
)"""

#: The entitlement invariants (checked when the ``entitlements``, ``subscription_periods``,
#: ``subscription_events``, ``business_clock``, ``ledger_entries`` and ``sagas`` read models are
#: there: :func:`check_invariants` with ``entitlements=True``). Entitlements revoked as a saga's
#: COMPENSATION (a first saga that failed after its grant) never counted as access.
ENTITLEMENT_INVARIANTS: tuple[Invariant, ...] = (
    Invariant(
        "premium access covered by a paid period",
        "every PREMIUM entitlement's [valid_from, valid_until) lies inside a paid period of its "
        "subscription (a captured, not refunded payment)",
        f"""WITH {_PAID}
SELECT e.entitlement_id AS id,
       format('{{}} of {{}} (subscription {{}}): premium from {{}} to {{}}, no paid period covers it',
              e.state, e.user_id, coalesce(e.subscription_id, '-'), e.valid_from, e.valid_until) AS why
FROM entitlements e
WHERE e.kind = 'PREMIUM' AND e.state <> 'FAILED' AND e.revoke_reason IS DISTINCT FROM 'COMPENSATION'
  AND NOT EXISTS (
      SELECT 1 FROM paid_periods p
      WHERE p.subscription_id = e.subscription_id AND p.access_from <= e.valid_from
        AND e.valid_until <= p.period_end)
ORDER BY id""",
    ),
    Invariant(
        "no premium access now without a paid period",
        "at the business clock's now, every user with premium access has a paid period covering now",
        f"""WITH {_PAID}, clock AS (SELECT max(now) AS at FROM business_clock)
SELECT e.user_id AS id,
       format('premium at {{}} through {{}}, no paid period covers it', c.at, e.entitlement_id) AS why
FROM entitlements e, clock c
WHERE c.at IS NOT NULL AND {access_predicate("c.at")}
  AND NOT EXISTS (
      SELECT 1 FROM paid_periods p
      WHERE p.subscription_id = e.subscription_id AND p.access_from <= c.at AND c.at < p.period_end)
ORDER BY id""",
    ),
    Invariant(
        "ended subscriptions revoked",
        "every subscription cancelled or lapsed by the business clock's now has its last entitlement REVOKED",
        """WITH clock AS (SELECT max(now) AS at FROM business_clock),
ended AS (
    SELECT subscription_id, any_value(reason) AS reason, min(effective_at) AS effective_at
    FROM subscription_events WHERE event_type = 'SubscriptionCancelled' GROUP BY subscription_id
), last AS (
    SELECT * FROM entitlements WHERE kind = 'PREMIUM' AND subscription_id IS NOT NULL
    QUALIFY row_number() OVER (PARTITION BY subscription_id ORDER BY valid_until DESC NULLS FIRST) = 1
)
SELECT d.subscription_id AS id,
       format('{} at {}: entitlement {} is {}', d.reason, d.effective_at, l.entitlement_id, l.state) AS why
FROM ended d JOIN last l USING (subscription_id), clock c
WHERE d.effective_at <= c.at AND l.state <> 'REVOKED'
ORDER BY id""",
    ),
    Invariant(
        "no subscription period captured twice",
        "every period of a subscription has at most one captured (not refunded) payment",
        f"""WITH {_PAID}, per AS (
    SELECT CASE WHEN s.kind = 'subscription' THEN s.business_id
                ELSE regexp_extract(s.business_id, '^(.*)/p[0-9]+/a[0-9]+$', 1) END AS subscription_id,
           CASE WHEN s.kind = 'subscription' THEN 1
                ELSE CAST(regexp_extract(s.business_id, '/p([0-9]+)/a[0-9]+$', 1) AS INTEGER) END AS period,
           paid.payment_id
    FROM sagas s JOIN paid ON paid.saga_id = s.saga_id
    WHERE s.kind IN ('subscription', 'subscription-renewal') AND paid.captured > paid.refunded
)
SELECT format('{{}} period {{}}', subscription_id, period) AS id,
       format('{{}} captured payments: {{}}', count(*),
              string_agg(payment_id, ', ' ORDER BY payment_id)) AS why
FROM per GROUP BY subscription_id, period HAVING count(*) > 1 ORDER BY id""",
    ),
)


def _run(con: duckdb.DuckDBPyConnection, inv: Invariant) -> InvariantResult:
    try:
        rows = con.execute(inv.sql).fetchall()
    except (duckdb.CatalogException, duckdb.BinderException) as exc:  # a table or column is missing
        first = str(exc).splitlines()[0]
        return InvariantResult(inv.name, False, f"cannot be checked: {first}", 0, [])
    ids = [str(r[0]) for r in rows]
    whys = "; ".join(f"{r[0]}: {r[1]}" for r in rows[:3]) + ("; …" if len(rows) > 3 else "")
    if inv.informational:
        detail = f"{len(rows)} {inv.checks}" + (f" — {whys}" if rows else "")
        return InvariantResult(inv.name, True, detail, 0, ids[:SAMPLE])
    if not rows:
        return InvariantResult(inv.name, True, inv.checks, 0, [])
    return InvariantResult(inv.name, False, f"{len(rows)} violation(s) — {whys}", len(rows), ids[:SAMPLE])


def check_invariants(con: duckdb.DuckDBPyConnection, *, entitlements: bool = False) -> list[InvariantResult]:
    """Check every invariant of :data:`INVARIANTS` (module docstring) over ``con``'s tables, and
    with ``entitlements`` those of :data:`ENTITLEMENT_INVARIANTS` too.

    Returns one :class:`InvariantResult` per invariant, in that order. A missing table or
    column makes the invariants that read it fail with "cannot be checked: …" (nothing is
    raised). Only reads: a read-only connection will do.
    """
    checked = INVARIANTS + (ENTITLEMENT_INVARIANTS if entitlements else ())
    return [_run(con, inv) for inv in checked]


def format_report(results: Sequence[InvariantResult]) -> str:
    """A text table of ``results`` for the CLI (one row per invariant: ok / FAIL / info, the
    violation count, the sample ids and the detail), then a one-line verdict."""
    table = Table(title="saga invariants", box=box.SIMPLE_HEAVY, show_lines=False)
    for column in ("invariant", "result", "violations", "sample", "detail"):
        table.add_column(column, overflow="fold")
    by_name = {inv.name: inv for inv in INVARIANTS + ENTITLEMENT_INVARIANTS}
    for r in results:
        info = by_name.get(r.name) is not None and by_name[r.name].informational
        verdict = "info" if info else ("ok" if r.ok else "FAIL")
        table.add_row(r.name, verdict, str(r.violations), ", ".join(r.sample), r.detail)
    out = io.StringIO()
    console = Console(file=out, width=160, color_system=None, force_terminal=False)
    console.print(table)
    failed = [r.name for r in results if not r.ok]
    console.print(f"{len(failed)} of {len(results)} invariants failed: {', '.join(failed)}" if failed else
                  f"all {len(results)} invariants hold")  # fmt: skip
    return "\n".join(line.rstrip() for line in out.getvalue().splitlines()) + "\n"


def assert_invariants(results: Sequence[InvariantResult]) -> None:
    """Raise when an invariant failed.

    Raises:
        AssertionError: listing every failed invariant with its violations, sample ids and detail.
    """
    failed = [r for r in results if not r.ok]
    if failed:
        lines = [f"- {r.name}: {r.violations} violation(s), e.g. {r.sample}: {r.detail}" for r in failed]
        raise AssertionError(f"{len(failed)} saga invariant(s) failed:\n" + "\n".join(lines))


__all__ = [
    "ENTITLEMENT_INVARIANTS",
    "INVARIANTS",
    "SAMPLE",
    "TABLES_DDL",
    "Invariant",
    "InvariantResult",
    "assert_invariants",
    "check_invariants",
    "format_report",
]
