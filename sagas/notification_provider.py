"""The notification-provider port and its seeded simulator.

:class:`NotificationProvider` is what the relay needs of a delivery provider (e-mail, push, SMS:
SES, SendGrid, FCM…): ``send`` one message with a client-chosen **idempotency key** (the
notification id). The simulator behaves as a provider that honours idempotency keys (the
idempotent-request rule the payment gateway simulator follows, :mod:`sagas.gateway`): it keeps
the result of the first accepted request with a key and answers every later request with that
key from it, without delivering again. With a provider that takes no such key, a crash between
the call and the relay's record of it could send a message twice.

A call ends in one of three ways the caller must tell apart:

- :class:`ProviderResult`: accepted for delivery (``replayed`` when the key was delivered
  before: nothing new was sent);
- :class:`ProviderRejected`: permanent, the same key will always fail (``INVALID_ADDRESS``,
  ``UNSUBSCRIBED``): the notification fails for good;
- :class:`ProviderTransient`: try again later with the same key; ``retry_after_ms`` is the
  provider's Retry-After hint (``RATE_LIMITED``, ``PROVIDER_ERROR``), ``None`` for ``TIMEOUT``,
  where the answer was lost and the message *may* have been delivered (the retry with the same
  key then returns the stored delivery).

:class:`ProviderSimulator` implements the port on its own SQLite file (WAL, one transaction per
call), so its delivery log survives process kills and is the ground truth the tests check the
relay against: ``provider_deliveries`` (one row per message actually delivered; no uniqueness
constraint, so a second delivery of a key would show as a second row) and ``provider_calls``
(every call with its outcome and time). Faults are decided by :func:`sagas.seeded.uniform` of
(seed, idempotency key, call number of that key, fault name), never by timing, as in
:mod:`sagas.gateway`.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from sagas.messages import stable_id
from sagas.seeded import hits, uniform
from sagas.sim_store import open_record

#: The provider name in ``NotificationSent.provider``.
PROVIDER_NAME = "simulator"


class ProviderTransient(Exception):
    """Try again later with the same key: ``reason`` (a ``FailureReason`` symbol:
    ``RATE_LIMITED``, ``PROVIDER_ERROR``, ``TIMEOUT``), ``retry_after_ms`` (the provider's hint,
    ms; ``None`` when it gave none)."""

    def __init__(self, reason: str, retry_after_ms: int | None, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.retry_after_ms = retry_after_ms
        self.detail = detail


class ProviderRejected(Exception):
    """Permanent failure: ``reason`` (``INVALID_ADDRESS``, ``UNSUBSCRIBED``), ``detail``."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class ProviderResult:
    """Accepted: the provider's ``message_id``; ``replayed`` when it came from an earlier
    delivery with the same key (nothing new was sent)."""

    message_id: str
    replayed: bool = False


class NotificationProvider(Protocol):
    """The port (module doc). ``send`` raises :class:`ProviderTransient` or
    :class:`ProviderRejected`."""

    name: str

    def send(
        self, *, idempotency_key: str, user_id: str, channel: str, template: str, params: dict[str, str]
    ) -> ProviderResult: ...


@dataclass(frozen=True)
class ProviderConfig:
    """Fault rates (probabilities 0..1) of :class:`ProviderSimulator`.

    Per key (decided once for a notification, whatever the number of calls): ``invalid_address``
    → ``INVALID_ADDRESS``, ``unsubscribed`` → ``UNSUBSCRIBED`` (both permanent). Per call:
    ``throttle`` → ``RATE_LIMITED`` with ``retry_after_ms`` drawn in
    ``[retry_after_min_ms, retry_after_max_ms]``; ``error`` → ``PROVIDER_ERROR`` (a 503) with
    ``retry_after_ms`` drawn the same way; ``lost_answer`` → the message **is delivered** but the
    answer is lost (``TIMEOUT``, no hint).

    Raises:
        ValueError: a rate outside [0, 1], or retry bounds that are negative or reversed.
    """

    seed: int = 0
    invalid_address: float = 0.0
    unsubscribed: float = 0.0
    throttle: float = 0.0
    error: float = 0.0
    lost_answer: float = 0.0
    retry_after_min_ms: int = 100
    retry_after_max_ms: int = 400

    def __post_init__(self) -> None:
        for name in ("invalid_address", "unsubscribed", "throttle", "error", "lost_answer"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name}={value} is not a probability in [0, 1]")
        if not 0 <= self.retry_after_min_ms <= self.retry_after_max_ms:
            raise ValueError(
                f"retry_after between {self.retry_after_min_ms} and {self.retry_after_max_ms} ms: "
                "give 0 <= min <= max"
            )

    def per_call(self, fault: str, key: str, call: int) -> bool:
        """Whether per-call ``fault`` hits call ``call`` (1, 2, …) of ``key``."""
        return hits(getattr(self, fault), self.seed, key, call, fault)

    def per_key(self, fault: str, key: str) -> bool:
        """Whether per-key ``fault`` hits ``key``."""
        return hits(getattr(self, fault), self.seed, key, 0, fault)

    def retry_after(self, key: str, call: int) -> int:
        """The Retry-After hint of call ``call`` of ``key`` (ms)."""
        span = self.retry_after_max_ms - self.retry_after_min_ms
        return self.retry_after_min_ms + int(uniform(self.seed, key, call, "retry_after") * (span + 1))


_SCHEMA = """
CREATE TABLE IF NOT EXISTS provider_calls (
    call_id INTEGER PRIMARY KEY AUTOINCREMENT,
    idempotency_key TEXT NOT NULL,
    user_id TEXT NOT NULL,
    channel TEXT NOT NULL,
    call_no INTEGER NOT NULL,
    at_ms INTEGER NOT NULL,
    outcome TEXT NOT NULL,
    retry_after_ms INTEGER
);
CREATE INDEX IF NOT EXISTS provider_calls_key ON provider_calls (idempotency_key);
CREATE TABLE IF NOT EXISTS provider_deliveries (
    delivery_id INTEGER PRIMARY KEY AUTOINCREMENT,
    idempotency_key TEXT NOT NULL,
    message_id TEXT NOT NULL,
    user_id TEXT NOT NULL,
    channel TEXT NOT NULL,
    template TEXT NOT NULL,
    delivered_at_ms INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS provider_deliveries_key ON provider_deliveries (idempotency_key);
CREATE TABLE IF NOT EXISTS provider_rejections (
    idempotency_key TEXT PRIMARY KEY,
    reason TEXT NOT NULL
);
"""


class ProviderSimulator:
    """A seeded provider persisted in the SQLite file ``path`` (created if missing).

    Per call, in one transaction: number the call of the key; maybe throttle or fail
    transiently (nothing delivered); return the key's stored delivery (``replayed``) or stored
    rejection; else reject per key, or deliver (a row in ``provider_deliveries``); after the
    commit maybe lose the answer (:class:`ProviderTransient` ``TIMEOUT``, the delivery stays).
    Every call is logged in ``provider_calls`` with its outcome (``delivered``, ``replayed``,
    ``rejected``, ``throttled``, ``error``) and time. Safe to share between threads (one lock);
    several processes may open the same file (SQLite locking).
    """

    name = PROVIDER_NAME

    def __init__(self, path: Path, config: ProviderConfig, *, clock: Callable[[], int] | None = None) -> None:
        self.path = Path(path)
        self.config = config
        self.clock = clock or (lambda: int(time.time() * 1000))
        self._lock = threading.Lock()
        self._db = open_record(self.path, _SCHEMA)

    def close(self) -> None:
        """Close the database connection."""
        with self._lock:
            self._db.close()

    def send(
        self, *, idempotency_key: str, user_id: str, channel: str, template: str, params: dict[str, str]
    ) -> ProviderResult:
        """Deliver one message (class doc).

        Raises:
            ProviderTransient: throttled, a provider error, or the answer was lost.
            ProviderRejected: the key is (or was) rejected for good.
        """
        cfg, key = self.config, idempotency_key
        with self._lock:
            db = self._db
            db.execute("BEGIN IMMEDIATE")
            try:
                now = self.clock()
                call = 1 + int(
                    db.execute(
                        "SELECT count(*) FROM provider_calls WHERE idempotency_key = ?", (key,)
                    ).fetchone()[0]
                )

                def log_call(outcome: str, retry_after: int | None = None) -> None:
                    db.execute(
                        "INSERT INTO provider_calls (idempotency_key, user_id, channel, call_no, at_ms, "
                        "outcome, retry_after_ms) VALUES (?, ?, ?, ?, ?, ?, ?)",
                        (key, user_id, channel, call, now, outcome, retry_after),
                    )

                failure: Exception
                if cfg.per_call("throttle", key, call) or cfg.per_call("error", key, call):
                    throttled = cfg.per_call("throttle", key, call)
                    wait = cfg.retry_after(key, call)
                    log_call("throttled" if throttled else "error", wait)
                    db.execute("COMMIT")
                    if throttled:
                        failure = ProviderTransient(
                            "RATE_LIMITED", wait, f"429 too many requests (call {call})"
                        )
                    else:
                        failure = ProviderTransient("PROVIDER_ERROR", wait, f"503 unavailable (call {call})")
                    raise failure
                delivered = db.execute(
                    "SELECT message_id FROM provider_deliveries WHERE idempotency_key = ? "
                    "ORDER BY delivery_id",
                    (key,),
                ).fetchone()
                rejected = db.execute(
                    "SELECT reason FROM provider_rejections WHERE idempotency_key = ?", (key,)
                ).fetchone()
                if delivered is not None:
                    log_call("replayed")
                    db.execute("COMMIT")
                    return ProviderResult(str(delivered[0]), replayed=True)
                reason = (
                    str(rejected[0])
                    if rejected is not None
                    else "INVALID_ADDRESS"
                    if cfg.per_key("invalid_address", key)
                    else "UNSUBSCRIBED"
                    if cfg.per_key("unsubscribed", key)
                    else None
                )
                if reason is not None:
                    if rejected is None:
                        db.execute("INSERT INTO provider_rejections VALUES (?, ?)", (key, reason))
                    log_call("rejected")
                    db.execute("COMMIT")
                    what = "no valid address" if reason == "INVALID_ADDRESS" else "unsubscribed"
                    raise ProviderRejected(reason, f"{channel} to {user_id}: {what}")
                message_id = "msg-" + stable_id("provider-message", key).replace("-", "")[:20]
                db.execute(
                    "INSERT INTO provider_deliveries (idempotency_key, message_id, user_id, channel, "
                    "template, delivered_at_ms) VALUES (?, ?, ?, ?, ?, ?)",
                    (key, message_id, user_id, channel, template, now),
                )
                log_call("delivered")
                db.execute("COMMIT")
            except BaseException:
                if db.in_transaction:
                    db.execute("ROLLBACK")
                raise
        if cfg.per_call("lost_answer", key, call):
            raise ProviderTransient(
                "TIMEOUT", None, f"no answer (call {call}); the message may have gone out"
            )
        return ProviderResult(message_id)

    # -- the record (tests, docs) --------------------------------------------------------------
    def deliveries(self) -> list[tuple[str, str, str, int]]:
        """Every delivery as ``(idempotency_key, user_id, channel, delivered_at_ms)``, in order."""
        with self._lock:
            rows = self._db.execute(
                "SELECT idempotency_key, user_id, channel, delivered_at_ms FROM provider_deliveries "
                "ORDER BY delivery_id"
            ).fetchall()
        return [(str(k), str(u), str(c), int(t)) for k, u, c, t in rows]

    def calls(self) -> list[tuple[str, str, str, int, int, str, int | None]]:
        """Every call as ``(idempotency_key, user_id, channel, call_no, at_ms, outcome,
        retry_after_ms)``, in order."""
        with self._lock:
            rows = self._db.execute(
                "SELECT idempotency_key, user_id, channel, call_no, at_ms, outcome, retry_after_ms "
                "FROM provider_calls ORDER BY call_id"
            ).fetchall()
        return [
            (str(k), str(u), str(c), int(n), int(t), str(o), None if r is None else int(r))
            for k, u, c, n, t, o, r in rows
        ]


__all__ = [
    "PROVIDER_NAME",
    "NotificationProvider",
    "ProviderConfig",
    "ProviderRejected",
    "ProviderResult",
    "ProviderSimulator",
    "ProviderTransient",
]
