"""The billing ledger's posting rules: from a payment event on ``billing.payments`` to balanced
double-entry journal lines (pure; no I/O). The ledger agent publishes them on ``billing.ledger`` and the
read model ``ledger_entries`` is built from that topic
(:data:`projections.readmodels.LEDGER_ENTRIES`).

Double entry (the standard rule of bookkeeping, e.g. Pacioli 1494; any accounting textbook):
every transaction is posted as an *entry* of two or more *lines* whose debits equal their
credits, so each entry — and therefore the whole ledger — sums to zero, per currency.

Sign convention: a debit is positive, a credit negative; ``amount_minor`` is in minor units of
``currency`` (cents for EUR). The accounts (:data:`ACCOUNTS`):

- ``customer`` — what customers owe us (an asset, a receivable): debited when a sale is made,
  credited when the gateway settles it;
- ``gateway_clearing`` — money the payment gateway holds for us (an asset): debited by a
  capture, credited by a refund paid out of it;
- ``revenue`` — sales (credit-normal, so its balance is negative: −revenue);
- ``refunds`` — money returned to customers (a contra-revenue account, debit-normal).

Rules (:func:`postings`), for an event of amount ``A`` (``amount_minor``):

- ``PaymentCaptured``: entry ``sale`` — customer +A, revenue −A; and entry ``settlement`` —
  gateway_clearing +A, customer −A (the gateway collected the money for us);
- ``PaymentRefunded``: entry ``refund`` — refunds +A, gateway_clearing −A;
- ``PaymentAuthorized``, ``PaymentVoided``, ``PaymentDeclined``, ``PaymentCaptureFailed``: nothing
  (an authorisation is a hold on the payer's funds, not money; a void releases it; a decline
  or failed capture moves nothing).

So after a capture and a full refund of it: customer 0, gateway_clearing 0, revenue −A,
refunds +A. Entry ids are ``"<event_id>:<kind>"``: a re-delivered event (same ``event_id``)
yields the same ``(entry_id, line)`` keys, which the read model stores once.

On the log (issue 17): the ledger agent (:mod:`streams.ledger`) publishes every line as one
``LedgerEntryPosted`` on ``billing.ledger`` (:func:`ledger_events`), and the read model
``ledger_entries`` is built from those events (:func:`posted_rows`). Vocabulary of the schema: a
*journal* is what is called an entry here (``journal_id`` = ``"<event_id>:<kind>"``), an *entry*
of the schema is one line (``entry_id`` = ``"<journal_id>:<line>"``); ``direction`` DEBIT/CREDIT
with a positive ``amount_minor`` replaces the sign. Each line's ``event_id`` is
:func:`ledger_event_id` (a hash of the payment event id, the kind and the line), so a recomputation
after a crash publishes the same ids. What a payment was for (``reference_type`` ``SUBSCRIPTION``
or ``ORDER`` with the subscription or order id as ``reference_id``; else ``PAYMENT`` and the
payment id) is named by its ``PaymentAuthorized`` only (:func:`purpose_of`), which the agent
remembers per payment; every line of the payment carries it, the refund's too. Revenue from
subscriptions (royalties, :mod:`projections.royalties`) is found by it.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

#: The ledger's accounts.
CUSTOMER: Final = "customer"
GATEWAY_CLEARING: Final = "gateway_clearing"
REVENUE: Final = "revenue"
REFUNDS: Final = "refunds"
ACCOUNTS: Final = (CUSTOMER, GATEWAY_CLEARING, REVENUE, REFUNDS)

#: Entry kinds.
SALE: Final = "sale"
SETTLEMENT: Final = "settlement"
REFUND: Final = "refund"

NAMESPACE: Final = "backbeat.billing"
#: The event types of ``billing.payments`` (short names) and the entries each posts:
#: ``(kind, ((account, sign), ...))``, debit lines first.
RULES: Final[dict[str, tuple[tuple[str, tuple[tuple[str, int], ...]], ...]]] = {
    "PaymentCaptured": (
        (SALE, ((CUSTOMER, +1), (REVENUE, -1))),
        (SETTLEMENT, ((GATEWAY_CLEARING, +1), (CUSTOMER, -1))),
    ),
    "PaymentRefunded": ((REFUND, ((REFUNDS, +1), (GATEWAY_CLEARING, -1))),),
    "PaymentAuthorized": (),
    "PaymentVoided": (),
    "PaymentDeclined": (),
    "PaymentCaptureFailed": (),
}
#: Their Avro full names (``backbeat.billing.PaymentCaptured``, ...), posting types first.
EVENT_TYPES: Final = tuple(f"{NAMESPACE}.{name}" for name in RULES)
#: The event type of ``billing.ledger`` (one per journal line).
POSTED_TYPE: Final = f"{NAMESPACE}.LedgerEntryPosted"

_CURRENCY = re.compile(r"[A-Z]{3}")

#: ``LedgerEntryPosted.reference_type`` values the ledger posts: what a payment was for.
SUBSCRIPTION_REF: Final = "SUBSCRIPTION"
ORDER_REF: Final = "ORDER"
PAYMENT_REF: Final = "PAYMENT"
#: A payment's purpose: ``(reference_type, reference_id)``.
Purpose = tuple[str, str]
#: ``LedgerEntryPosted.direction``.
DEBIT: Final = "DEBIT"
CREDIT: Final = "CREDIT"


class LedgerError(ValueError):
    """A payment event that cannot be posted (unknown type, bad amount or currency, missing
    field). The projection runner stores such an event in ``projection_rejects`` with this
    message and moves on (it is never half-posted)."""


@dataclass(frozen=True)
class Posting:
    """One journal line. ``amount_minor``: debit > 0, credit < 0, minor units of ``currency``;
    ``posted_at_ms``: the event time (ms since the epoch, UTC); ``saga_id``: the event's
    ``correlation_id`` (``None`` when no saga asked); ``event_type``: short name
    (``PaymentCaptured``); ``line``: 1-based within the entry."""

    entry_id: str
    line: int
    saga_id: str | None
    payment_id: str
    account: str
    amount_minor: int
    currency: str
    posted_at_ms: int
    event_id: str
    event_type: str
    entry_kind: str
    reference_type: str = PAYMENT_REF
    reference_id: str = ""

    @property
    def ledger_event_id(self) -> str:
        """The ``event_id`` of this line's ``LedgerEntryPosted`` (:func:`ledger_event_id`)."""
        return ledger_event_id(self.event_id, self.entry_kind, self.line)

    def row(self) -> dict[str, Any]:
        """The ``ledger_entries`` row (``posted_at`` as ms since the epoch)."""
        return {
            "entry_id": self.entry_id,
            "line": self.line,
            "saga_id": self.saga_id,
            "payment_id": self.payment_id,
            "account": self.account,
            "amount_minor": self.amount_minor,
            "currency": self.currency,
            "posted_at": self.posted_at_ms,
            "event_id": self.event_id,
            "event_type": self.event_type,
            "entry_kind": self.entry_kind,
            "reference_type": self.reference_type,
            "reference_id": self.reference_id or self.payment_id,
            "ledger_event_id": self.ledger_event_id,
        }

    def event(self) -> dict[str, Any]:
        """This line as a ``LedgerEntryPosted`` record (schemas/billing/LedgerEntryPosted.avsc)."""
        return {
            "event_id": self.ledger_event_id,
            "entry_id": f"{self.entry_id}:{self.line}",
            "journal_id": self.entry_id,
            "account_id": self.account,
            "occurred_at": self.posted_at_ms,
            "direction": DEBIT if self.amount_minor > 0 else CREDIT,
            "amount_minor": abs(self.amount_minor),
            "currency": self.currency,
            "reference_type": self.reference_type,
            "reference_id": self.reference_id or self.payment_id,
            "journal_line": self.line,
            "payment_id": self.payment_id,
            "correlation_id": self.saga_id,
            "source_event_id": self.event_id,
            "source_event_type": self.event_type,
            "journal_kind": self.entry_kind,
        }


def ledger_event_id(event_id: str, kind: str, line: int) -> str:
    """The ``event_id`` of the ``LedgerEntryPosted`` of line ``line`` of the ``kind`` entry posted
    for payment event ``event_id``: the first 32 hex digits of SHA-256 over
    ``"ledger|<event_id>|<kind>|<line>"`` (UTF-8)."""
    return hashlib.sha256(f"ledger|{event_id}|{kind}|{line}".encode()).hexdigest()[:32]


def purpose_of(event_type: str, event: Mapping[str, Any]) -> Purpose | None:
    """What a payment is for, from its ``PaymentAuthorized`` (the only payment event that says):
    ``("SUBSCRIPTION", subscription_id)``, else ``("ORDER", order_id)``, else ``None`` (also for
    every other event type)."""
    if _short(event_type) != "PaymentAuthorized":
        return None
    sub, order = event.get("subscription_id"), event.get("order_id")
    if isinstance(sub, str) and sub:
        return (SUBSCRIPTION_REF, sub)
    if isinstance(order, str) and order:
        return (ORDER_REF, order)
    return None


def entry_id(event_id: str, kind: str) -> str:
    """The id of the ``kind`` entry posted for event ``event_id``: ``"<event_id>:<kind>"``."""
    return f"{event_id}:{kind}"


def _short(event_type: str) -> str:
    return event_type.rsplit(".", 1)[-1]


def _field(event: Mapping[str, Any], name: str, kind: type | tuple[type, ...]) -> Any:
    value = event.get(name)
    if value is None or isinstance(value, bool) or not isinstance(value, kind):
        raise LedgerError(f"field {name!r} is {value!r}, expected {getattr(kind, '__name__', kind)}")
    return value


def postings(event_type: str, event: Mapping[str, Any], purpose: Purpose | None = None) -> list[Posting]:
    """The journal lines an event posts (module docstring), entry by entry, lines in order.

    ``event_type``: the Avro name, full (``backbeat.billing.PaymentCaptured``) or short;
    ``event``: the decoded payload (``occurred_at`` in ms since the epoch, ``amount_minor`` in
    minor units, ``correlation_id`` the saga id or ``None``); ``purpose``: what the payment is for
    (:func:`purpose_of` of its authorisation; ``None``: ``("PAYMENT", payment_id)``). Returns
    ``[]`` for the types that post nothing. Each entry's lines sum to zero.

    Raises:
        LedgerError: an unknown event type; a posting event whose ``amount_minor`` is not a
            positive integer, whose ``currency`` is not three capital letters, or which lacks
            ``event_id``, ``payment_id`` or ``occurred_at``.
    """
    name = _short(event_type)
    if name not in RULES:
        known = ", ".join(RULES)
        raise LedgerError(f"{event_type} is not a billing.payments event the ledger knows ({known})")
    rules = RULES[name]
    if not rules:
        return []
    try:
        event_id = _field(event, "event_id", str)
        payment_id = _field(event, "payment_id", str)
        amount = _field(event, "amount_minor", int)
        currency = _field(event, "currency", str)
        occurred_at = _field(event, "occurred_at", int)
    except LedgerError as exc:
        raise LedgerError(f"{name} {event.get('event_id')!r} cannot be posted: {exc}") from None
    if amount <= 0:
        raise LedgerError(
            f"{name} {event_id!r} of payment {payment_id!r} has amount_minor {amount}; "
            "a posted amount must be positive (minor units)"
        )
    if not _CURRENCY.fullmatch(currency):
        raise LedgerError(f"{name} {event_id!r} has currency {currency!r}; expected an ISO 4217 code")
    saga = event.get("correlation_id")
    ref_type, ref_id = purpose if purpose is not None else (PAYMENT_REF, payment_id)
    out: list[Posting] = []
    for kind, lines in rules:
        eid = entry_id(event_id, kind)
        for i, (account, sign) in enumerate(lines, start=1):
            out.append(
                Posting(
                    entry_id=eid,
                    line=i,
                    saga_id=saga,
                    payment_id=payment_id,
                    account=account,
                    amount_minor=sign * amount,
                    currency=currency,
                    posted_at_ms=occurred_at,
                    event_id=event_id,
                    event_type=name,
                    entry_kind=kind,
                    reference_type=ref_type,
                    reference_id=ref_id,
                )
            )
    return out


def ledger_rows(
    event_type: str, event: Mapping[str, Any], purpose: Purpose | None = None
) -> list[dict[str, Any]]:
    """:func:`postings` of a payment event as ``ledger_entries`` rows, computed directly (what
    the read model built from ``billing.ledger`` must hold; tests and checks).

    Raises:
        LedgerError: as :func:`postings`.
    """
    return [p.row() for p in postings(event_type, event, purpose)]


def ledger_events(
    event_type: str, event: Mapping[str, Any], purpose: Purpose | None = None
) -> list[dict[str, Any]]:
    """:func:`postings` of a payment event as ``LedgerEntryPosted`` records, one per line (what
    the ledger agent publishes).

    Raises:
        LedgerError: as :func:`postings`.
    """
    return [p.event() for p in postings(event_type, event, purpose)]


def posted_rows(event_type: str, event: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The ``ledger_entries`` row of one ``LedgerEntryPosted`` (the projection's row mapping):
    the sign from ``direction`` (DEBIT +, CREDIT −), ``entry_id`` = ``journal_id``, ``line`` =
    ``journal_line``, ``saga_id`` = ``correlation_id``, ``event_id``/``event_type``/``entry_kind``
    = ``source_event_id``/``source_event_type``/``journal_kind``, ``ledger_event_id`` = its own
    ``event_id``. ``event_type`` must be ``LedgerEntryPosted`` (full or short name).

    Raises:
        LedgerError: another event type; a direction other than DEBIT or CREDIT; an amount that
            is not a positive integer; a missing ``journal_line``, ``payment_id`` or source
            field (an event from a producer that does not fill them): such an event becomes a
            projection reject.
    """
    if _short(event_type) != "LedgerEntryPosted":
        raise LedgerError(f"{event_type} is not a billing.ledger event (LedgerEntryPosted)")
    eid = event.get("event_id")
    direction = event.get("direction")
    if direction not in (DEBIT, CREDIT):
        raise LedgerError(f"LedgerEntryPosted {eid!r} has direction {direction!r}; expected DEBIT or CREDIT")
    amount = event.get("amount_minor")
    if not isinstance(amount, int) or isinstance(amount, bool) or amount <= 0:
        raise LedgerError(
            f"LedgerEntryPosted {eid!r} has amount_minor {amount!r}; expected a positive integer"
        )
    missing = [
        name
        for name in ("journal_line", "payment_id", "source_event_id", "source_event_type", "journal_kind")
        if event.get(name) is None
    ]
    if missing:
        raise LedgerError(
            f"LedgerEntryPosted {eid!r} lacks {', '.join(missing)}; the ledger read model needs them"
        )
    return [
        {
            "entry_id": event["journal_id"],
            "line": event["journal_line"],
            "saga_id": event.get("correlation_id"),
            "payment_id": event["payment_id"],
            "account": event["account_id"],
            "amount_minor": amount if direction == DEBIT else -amount,
            "currency": event["currency"],
            "posted_at": event["occurred_at"],
            "event_id": event["source_event_id"],
            "event_type": event["source_event_type"],
            "entry_kind": event["journal_kind"],
            "reference_type": event["reference_type"],
            "reference_id": event["reference_id"],
            "ledger_event_id": eid,
        }
    ]


#: The views over ``ledger_entries`` (created by the runner after the table, every start).
BALANCES_VIEW: Final = "ledger_balances"
BY_SAGA_VIEW: Final = "ledger_by_saga"
VIEWS_DDL: Final = (
    f"""CREATE OR REPLACE VIEW {BALANCES_VIEW} AS
SELECT account, currency, CAST(sum(amount_minor) AS BIGINT) AS balance_minor
FROM ledger_entries GROUP BY account, currency""",
    f"""CREATE OR REPLACE VIEW {BY_SAGA_VIEW} AS
SELECT saga_id, account, CAST(sum(amount_minor) AS BIGINT) AS balance_minor
FROM ledger_entries WHERE saga_id IS NOT NULL GROUP BY saga_id, account""",
)

__all__ = [
    "ACCOUNTS",
    "CREDIT",
    "DEBIT",
    "ORDER_REF",
    "PAYMENT_REF",
    "POSTED_TYPE",
    "SUBSCRIPTION_REF",
    "Purpose",
    "ledger_event_id",
    "ledger_events",
    "posted_rows",
    "purpose_of",
    "BALANCES_VIEW",
    "BY_SAGA_VIEW",
    "CUSTOMER",
    "EVENT_TYPES",
    "GATEWAY_CLEARING",
    "REFUND",
    "REFUNDS",
    "REVENUE",
    "RULES",
    "SALE",
    "SETTLEMENT",
    "VIEWS_DDL",
    "LedgerError",
    "Posting",
    "entry_id",
    "ledger_rows",
    "postings",
]
