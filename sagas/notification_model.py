"""The ``notifications`` read model's rules: from an event of ``platform.notifications`` to its row,
and the view of each notification's final state (pure; no I/O). The read model is built by the
projection runner (:data:`projections.readmodels.NOTIFICATIONS`).

One row per event (``NotificationRequested``, ``NotificationSent``, ``NotificationFailed``),
keyed by ``event_id`` with policy ``first``: the relay's final events have deterministic ids
(``stable_id(notification_id, <type>)``, :mod:`sagas.notifications`), so a copy published
again after a crash of its outbox relay is stored once.

View :data:`STATES_VIEW` (``notifications_status``), one row per notification id:
``notification_id, user_id, channel, template, priority, correlation_id, requested_at,
state ('SENT' | 'FAILED' | 'PENDING'), final_at, attempts, reason, detail, provider,
provider_message_id, latency_ms (final_at - requested_at), final_events`` — ``final_events``
counts the distinct final events of the notification, so ``final_events > 1`` would show a
notification that ended twice (the relay's invariant says never). The request is the earliest
``NotificationRequested`` of the id, the final event the earliest Sent/Failed (by event time,
then ``event_id``). A final event without a request (the request not projected yet) still gives
a row, with NULL ``requested_at``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final

#: The event types of ``platform.notifications`` (Avro full names), the request first.
EVENT_TYPES: Final = (
    "backbeat.platform.NotificationRequested",
    "backbeat.platform.NotificationSent",
    "backbeat.platform.NotificationFailed",
)

#: The view of final states.
STATES_VIEW: Final = "notifications_status"


def notification_rows(event_type: str, event: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The row of one event: its fields plus ``event_type`` (the short name); fields another
    type carries are NULL; ``retryable`` as 0/1.

    Raises:
        ValueError: ``event_type`` is not one of :data:`EVENT_TYPES`.
    """
    if event_type not in EVENT_TYPES:
        raise ValueError(f"{event_type} is not a notification event")
    row = dict(event)
    row["event_type"] = event_type.rsplit(".", 1)[-1]
    if row.get("retryable") is not None:
        row["retryable"] = int(bool(row["retryable"]))
    return [row]


VIEWS_DDL: Final = (
    f"""CREATE OR REPLACE VIEW {STATES_VIEW} AS
WITH requests AS (
  SELECT * EXCLUDE (rn) FROM (
    SELECT *, row_number() OVER (PARTITION BY notification_id ORDER BY occurred_at, event_id) AS rn
    FROM notifications WHERE event_type = 'NotificationRequested') WHERE rn = 1),
finals AS (
  SELECT * EXCLUDE (rn) FROM (
    SELECT *, row_number() OVER (PARTITION BY notification_id ORDER BY occurred_at, event_id) AS rn
    FROM notifications WHERE event_type IN ('NotificationSent', 'NotificationFailed')) WHERE rn = 1),
counted AS (
  SELECT notification_id, count(DISTINCT event_id) FILTER (WHERE event_type <> 'NotificationRequested')
         AS final_events
  FROM notifications GROUP BY notification_id)
SELECT coalesce(r.notification_id, f.notification_id) AS notification_id,
       coalesce(r.user_id, f.user_id) AS user_id,
       coalesce(r.channel, f.channel) AS channel,
       r.template, r.priority, r.correlation_id,
       r.occurred_at AS requested_at,
       CASE f.event_type WHEN 'NotificationSent' THEN 'SENT' WHEN 'NotificationFailed' THEN 'FAILED'
            ELSE 'PENDING' END AS state,
       f.occurred_at AS final_at, f.attempt AS attempts, f.reason, f.detail,
       f.provider, f.provider_message_id,
       CAST(date_diff('millisecond', r.occurred_at, f.occurred_at) AS BIGINT) AS latency_ms,
       CAST(c.final_events AS INTEGER) AS final_events
FROM requests r FULL OUTER JOIN finals f ON r.notification_id = f.notification_id
JOIN counted c ON c.notification_id = coalesce(r.notification_id, f.notification_id)""",
)

__all__ = ["EVENT_TYPES", "STATES_VIEW", "VIEWS_DDL", "notification_rows"]
