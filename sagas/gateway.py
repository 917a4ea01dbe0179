"""The payment-gateway port and its seeded simulator.

:class:`PaymentGateway` is what the payment service needs of a gateway (Stripe, Adyen…): authorise,
capture, void, refund, each with a client-chosen **idempotency key**. The gateway keeps the result
of the first request made with a key and answers every later request with that key from it,
without a new operation (Stripe, "Idempotent requests": the status and body of the first request
are saved, retries with the same key return them, and a retry with other parameters is an error).

A call can fail in two ways the caller must tell apart:

- :class:`GatewayTimeout`: no answer, and **nothing was done** (the request never started);
- :class:`GatewayFailedAfterEffect`: the operation **was done** (and its result stored under the
  key) but the answer was lost ("fail after charging"); repeating the call with the same key
  returns the stored result.

:class:`GatewaySimulator` implements the port on its own SQLite file (WAL, one transaction per
call), so its record survives process kills and is the ground truth the ledger is checked
against. Its faults are decided by :func:`sagas.seeded.uniform` of (seed, idempotency key, call
number of that key, fault name), never by timing, so a run is reproducible.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import pyarrow as pa

from sagas.messages import stable_id
from sagas.seeded import hits, uniform
from sagas.sim_store import open_record

AUTHORIZE, CAPTURE, VOID, REFUND = "authorize", "capture", "void", "refund"
APPROVED, DECLINED = "approved", "declined"

#: Decline reasons the simulator draws from (symbols of PaymentDeclined.reason).
DECLINE_REASONS = ("INSUFFICIENT_FUNDS", "CARD_EXPIRED", "DO_NOT_HONOUR", "FRAUD_SUSPECTED")


class GatewayTimeout(Exception):
    """The gateway did not answer and did nothing: retry with the same idempotency key."""


class GatewayFailedAfterEffect(Exception):
    """The gateway did the operation (its result is stored under the key) but the answer was
    lost: repeat the call with the same key to get the stored result."""


class GatewayKeyReused(ValueError):
    """An idempotency key already used for another operation or payment (a caller bug)."""


@dataclass(frozen=True)
class GatewayResult:
    """A gateway answer.

    ``approved`` False means declined/refused, with ``reason`` (authorisation:
    a :data:`DECLINE_REASONS` symbol or ``INVALID_DETAILS``; capture: ``DO_NOT_HONOUR``,
    ``NOT_AUTHORIZED``, ``AUTHORIZATION_VOIDED``, ``ALREADY_CAPTURED``, ``AMOUNT_TOO_LARGE``;
    void: ``NOT_AUTHORIZED``, ``ALREADY_CAPTURED``, ``ALREADY_VOIDED``; refund: ``NOT_CAPTURED``,
    ``ALREADY_REFUNDED``). ``provider_reference`` is the gateway's id of the operation (``None``
    when declined); for authorisations it is the reference later calls pass. ``amount_minor`` is
    the amount acted on (a void releases the whole authorisation; a refund at most what is left).
    ``answered_twice``: the gateway delivered this answer twice. ``replayed``: the answer came
    from the stored result of an earlier call with the same key (no new operation).
    """

    approved: bool
    provider_reference: str | None
    amount_minor: int
    reason: str | None = None
    answered_twice: bool = False
    replayed: bool = False


class PaymentGateway(Protocol):
    """The port. Every method raises :class:`GatewayTimeout` or :class:`GatewayFailedAfterEffect`
    (see the module doc) and :class:`GatewayKeyReused`. Amounts in minor units, ISO 4217
    currency. ``provider_reference`` of capture/void/refund is the *authorisation's* reference.
    """

    provider: str

    def authorize(
        self, *, idempotency_key: str, saga_id: str | None, payment_id: str, amount_minor: int, currency: str
    ) -> GatewayResult: ...

    def capture(
        self,
        *,
        idempotency_key: str,
        saga_id: str | None,
        payment_id: str,
        amount_minor: int,
        currency: str,
        provider_reference: str,
    ) -> GatewayResult: ...

    def void(
        self,
        *,
        idempotency_key: str,
        saga_id: str | None,
        payment_id: str,
        amount_minor: int,
        currency: str,
        provider_reference: str,
    ) -> GatewayResult: ...

    def refund(
        self,
        *,
        idempotency_key: str,
        saga_id: str | None,
        payment_id: str,
        amount_minor: int,
        currency: str,
        provider_reference: str,
    ) -> GatewayResult: ...


@dataclass(frozen=True)
class SimulatorConfig:
    """Fault rates (probabilities 0..1) of :class:`GatewaySimulator`.

    ``decline``: an authorisation is declined (decided once per key); ``timeout``: a call times
    out before doing anything; ``duplicate``: the answer is delivered twice; ``fail_after_effect``:
    the call is done but its answer lost; ``capture_fail``: a capture is refused DO_NOT_HONOUR
    (once per key). ``timeout``, ``duplicate`` and ``fail_after_effect`` are drawn per call.

    Raises:
        ValueError: a rate outside [0, 1].
    """

    seed: int
    decline: float
    timeout: float
    duplicate: float
    fail_after_effect: float = 0.02
    capture_fail: float = 0.02

    def __post_init__(self) -> None:
        for name in ("decline", "timeout", "duplicate", "fail_after_effect", "capture_fail"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name}={value} is not a probability in [0, 1]")

    def per_call(self, fault: str, idempotency_key: str, call: int) -> bool:
        """Whether per-call ``fault`` hits call number ``call`` (1, 2, …) of ``idempotency_key``."""
        return hits(getattr(self, fault), self.seed, idempotency_key, call, fault)

    def per_key(self, fault: str, idempotency_key: str) -> bool:
        """Whether once-per-key ``fault`` (decline, capture_fail) hits ``idempotency_key``."""
        return hits(getattr(self, fault), self.seed, idempotency_key, 0, fault)


_SCHEMA = """
CREATE TABLE IF NOT EXISTS gateway_operations (
    operation_id TEXT PRIMARY KEY,
    saga_id TEXT,
    payment_id TEXT NOT NULL,
    idempotency_key TEXT NOT NULL UNIQUE,
    kind TEXT NOT NULL CHECK (kind IN ('authorize', 'capture', 'void', 'refund')),
    status TEXT NOT NULL CHECK (status IN ('approved', 'declined')),
    amount_minor INTEGER NOT NULL,
    currency TEXT NOT NULL,
    provider_reference TEXT,
    created_at_ms INTEGER NOT NULL,
    reason TEXT
);
CREATE INDEX IF NOT EXISTS gateway_operations_payment ON gateway_operations (payment_id);
CREATE TABLE IF NOT EXISTS gateway_calls (
    idempotency_key TEXT PRIMARY KEY,
    calls INTEGER NOT NULL
);
"""

#: Columns of :meth:`GatewaySimulator.operations` (and their Arrow types).
OPERATION_SCHEMA = pa.schema(
    [
        ("operation_id", pa.string()),
        ("saga_id", pa.string()),
        ("payment_id", pa.string()),
        ("idempotency_key", pa.string()),
        ("kind", pa.string()),
        ("status", pa.string()),
        ("amount_minor", pa.int64()),
        ("currency", pa.string()),
        ("provider_reference", pa.string()),
        ("created_at_ms", pa.int64()),
    ]
)

# (status, provider_reference, amount_minor, reason) of a new operation
_Outcome = tuple[str, str | None, int, str | None]


class GatewaySimulator:
    """A seeded payment gateway persisted in the SQLite file ``path`` (created if missing).

    Per call, in one transaction: count the call of the key; maybe time out (nothing stored);
    return the key's stored result, or do the operation and store it (one row of
    ``gateway_operations`` per key, declined or approved); maybe lose the answer
    (:class:`GatewayFailedAfterEffect`, the row stays); maybe answer twice. Rules: capture needs an
    approved authorisation, not voided, not captured, for at most its amount; a void of a
    captured payment is refused (``ALREADY_CAPTURED``: refund instead); a refund returns at most
    what was captured and not yet refunded. Safe to share between threads (one lock).
    """

    provider = "simulator"

    def __init__(
        self, path: Path, config: SimulatorConfig, *, clock: Callable[[], int] | None = None
    ) -> None:
        self.path = Path(path)
        self.config = config
        self.clock = clock or (lambda: int(time.time() * 1000))
        self._lock = threading.Lock()
        self._db = open_record(self.path, _SCHEMA)

    def close(self) -> None:
        """Close the database connection."""
        with self._lock:
            self._db.close()

    # -- the port ------------------------------------------------------------------------------
    def authorize(
        self, *, idempotency_key: str, saga_id: str | None, payment_id: str, amount_minor: int, currency: str
    ) -> GatewayResult:
        """Authorise ``amount_minor``; declined per key with rate ``decline`` (reason drawn from
        :data:`DECLINE_REASONS`) or ``INVALID_DETAILS`` for a non-positive amount."""

        def decide(_db: sqlite3.Connection) -> _Outcome:
            if amount_minor <= 0:
                return DECLINED, None, amount_minor, "INVALID_DETAILS"
            if self.config.per_key("decline", idempotency_key):
                pick = uniform(self.config.seed, idempotency_key, "decline_reason")
                return DECLINED, None, amount_minor, DECLINE_REASONS[int(pick * len(DECLINE_REASONS))]
            return APPROVED, "auth_" + _ref(idempotency_key), amount_minor, None

        return self._call(AUTHORIZE, idempotency_key, saga_id, payment_id, currency, decide)

    def capture(
        self,
        *,
        idempotency_key: str,
        saga_id: str | None,
        payment_id: str,
        amount_minor: int,
        currency: str,
        provider_reference: str,
    ) -> GatewayResult:
        """Capture up to the authorised amount of authorisation ``provider_reference``."""

        def decide(db: sqlite3.Connection) -> _Outcome:
            book = _Book.read(db, payment_id, provider_reference)
            refusal = (
                "NOT_AUTHORIZED"
                if book.authorized is None
                else "AUTHORIZATION_VOIDED"
                if book.voided
                else "ALREADY_CAPTURED"
                if book.captured
                else "AMOUNT_TOO_LARGE"
                if amount_minor > book.authorized or amount_minor <= 0
                else "DO_NOT_HONOUR"
                if self.config.per_key("capture_fail", idempotency_key)
                else None
            )
            if refusal:
                return DECLINED, None, amount_minor, refusal
            return APPROVED, "cap_" + _ref(idempotency_key), amount_minor, None

        return self._call(CAPTURE, idempotency_key, saga_id, payment_id, currency, decide)

    def void(
        self,
        *,
        idempotency_key: str,
        saga_id: str | None,
        payment_id: str,
        amount_minor: int,
        currency: str,
        provider_reference: str,
    ) -> GatewayResult:
        """Release authorisation ``provider_reference`` (its whole amount; ``amount_minor`` is
        informative); refused when it was captured."""

        def decide(db: sqlite3.Connection) -> _Outcome:
            book = _Book.read(db, payment_id, provider_reference)
            if book.authorized is None:
                return DECLINED, None, 0, "NOT_AUTHORIZED"
            if book.captured:
                return DECLINED, None, 0, "ALREADY_CAPTURED"
            if book.voided:
                return DECLINED, None, 0, "ALREADY_VOIDED"
            return APPROVED, "void_" + _ref(idempotency_key), book.authorized, None

        return self._call(VOID, idempotency_key, saga_id, payment_id, currency, decide)

    def refund(
        self,
        *,
        idempotency_key: str,
        saga_id: str | None,
        payment_id: str,
        amount_minor: int,
        currency: str,
        provider_reference: str,
    ) -> GatewayResult:
        """Refund ``amount_minor`` of the capture of authorisation ``provider_reference``
        (at most what is captured and not yet refunded)."""

        def decide(db: sqlite3.Connection) -> _Outcome:
            book = _Book.read(db, payment_id, provider_reference)
            if not book.captured:
                return DECLINED, None, 0, "NOT_CAPTURED"
            left = book.captured - book.refunded
            if left <= 0:
                return DECLINED, None, 0, "ALREADY_REFUNDED"
            return APPROVED, "ref_" + _ref(idempotency_key), min(max(amount_minor, 0), left) or left, None

        return self._call(REFUND, idempotency_key, saga_id, payment_id, currency, decide)

    # -- the record ----------------------------------------------------------------------------
    def operations(self) -> pa.Table:
        """Every stored operation as an Arrow table with the columns of :data:`OPERATION_SCHEMA`
        (``gateway_operations(operation_id, saga_id, payment_id, idempotency_key, kind, status,
        amount_minor, currency, provider_reference, created_at_ms)``), in the order they were done."""
        names = ", ".join(OPERATION_SCHEMA.names)
        with self._lock:
            rows = self._db.execute(f"SELECT {names} FROM gateway_operations ORDER BY rowid").fetchall()
        columns = list(zip(*rows, strict=True)) if rows else [[] for _ in OPERATION_SCHEMA.names]
        return pa.table(
            [pa.array(list(col), type=f.type) for col, f in zip(columns, OPERATION_SCHEMA, strict=True)],
            schema=OPERATION_SCHEMA,
        )

    def calls(self, idempotency_key: str) -> int:
        """How many calls were made with ``idempotency_key`` (timed-out ones included)."""
        with self._lock:
            row = self._db.execute(
                "SELECT calls FROM gateway_calls WHERE idempotency_key = ?", (idempotency_key,)
            ).fetchone()
        return int(row[0]) if row else 0

    # -- one call ------------------------------------------------------------------------------
    def _call(
        self,
        kind: str,
        key: str,
        saga_id: str | None,
        payment_id: str,
        currency: str,
        decide: Callable[[sqlite3.Connection], _Outcome],
    ) -> GatewayResult:
        cfg = self.config
        with self._lock:
            db = self._db
            db.execute("BEGIN IMMEDIATE")
            try:
                call = int(
                    db.execute(
                        "INSERT INTO gateway_calls VALUES (?, 1) "
                        "ON CONFLICT (idempotency_key) DO UPDATE SET calls = calls + 1 RETURNING calls",
                        (key,),
                    ).fetchone()[0]
                )
                if cfg.per_call("timeout", key, call):
                    db.execute("COMMIT")
                    raise GatewayTimeout(f"{kind} {key}: no answer (call {call})")
                row = db.execute(
                    "SELECT kind, payment_id, status, provider_reference, amount_minor, reason "
                    "FROM gateway_operations WHERE idempotency_key = ?",
                    (key,),
                ).fetchone()
                if row is not None:
                    if (row[0], row[1]) != (kind, payment_id):
                        raise GatewayKeyReused(f"key {key} was used for {row[0]} of {row[1]}")
                    status, reference, amount, reason = row[2], row[3], int(row[4]), row[5]
                    replayed = True
                else:
                    status, reference, amount, reason = decide(db)
                    db.execute(
                        "INSERT INTO gateway_operations VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                        (
                            stable_id("gateway-operation", key),
                            saga_id,
                            payment_id,
                            key,
                            kind,
                            status,
                            amount,
                            currency,
                            reference,
                            self.clock(),
                            reason,
                        ),
                    )
                    replayed = False
                db.execute("COMMIT")
            except BaseException:
                if db.in_transaction:
                    db.execute("ROLLBACK")
                raise
        if cfg.per_call("fail_after_effect", key, call):
            raise GatewayFailedAfterEffect(f"{kind} {key}: done, answer lost (call {call})")
        return GatewayResult(
            approved=status == APPROVED,
            provider_reference=reference,
            amount_minor=amount,
            reason=reason,
            answered_twice=cfg.per_call("duplicate", key, call),
            replayed=replayed,
        )


def _ref(idempotency_key: str) -> str:
    return stable_id("gateway-reference", idempotency_key).replace("-", "")[:20]


@dataclass
class _Book:
    """What the gateway holds for one authorisation of a payment (approved operations only)."""

    authorized: int | None = None
    captured: int = 0
    voided: bool = False
    refunded: int = 0

    @classmethod
    def read(cls, db: sqlite3.Connection, payment_id: str, authorization: str) -> _Book:
        book = cls()
        rows = db.execute(
            "SELECT kind, amount_minor, provider_reference FROM gateway_operations "
            "WHERE payment_id = ? AND status = 'approved' ORDER BY rowid",
            (payment_id,),
        ).fetchall()
        for kind, amount, reference in rows:
            if kind == AUTHORIZE and reference == authorization:
                book.authorized = int(amount)
        if book.authorized is None:
            return book
        for kind, amount, _reference in rows:
            if kind == CAPTURE:
                book.captured += int(amount)
            elif kind == VOID:
                book.voided = True
            elif kind == REFUND:
                book.refunded += int(amount)
        return book
