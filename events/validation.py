"""The domain rules an event must meet beyond its Avro schema: one validator per event type,
shared by every consumer that decides on events (the stream agents dead-letter what fails, the
read models reject it into ``projection_rejects``), so a listen an agent refuses never lands in
the ``listens`` read model or the lake.

A rule returns ``None`` for a valid event or a sentence saying what is wrong (it becomes the
``dlq_error`` header or the reject reason). Rules that need context (the campaigns an ad event
may name) take it as an argument; :func:`validator_for` lists the context-free ones by event
type, which is what the read models apply.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from typing import Any

#: Events more than this far in the future (ms, against the caller's clock) are invalid.
MAX_FUTURE_MS = 24 * 3600 * 1000

#: ``(event, now_ms | None) -> reason | None``
Validator = Callable[[Mapping[str, Any], int | None], str | None]


def _blank(record: Mapping[str, Any], names: tuple[str, ...]) -> str | None:
    for name in names:
        value = record.get(name)
        if not isinstance(value, str) or not value.strip():
            return f"{name} is empty"
    return None


def _event_time(record: Mapping[str, Any], now_ms: int | None) -> str | None:
    occurred = record.get("occurred_at")
    if not isinstance(occurred, int) or occurred <= 0:
        return f"occurred_at={occurred!r} is not a positive ms timestamp"
    if now_ms is not None and occurred > now_ms + MAX_FUTURE_MS:
        return f"occurred_at={occurred} is more than a day in the future"
    return None


def validate_listen(record: Mapping[str, Any], now_ms: int | None = None) -> str | None:
    """Why a decoded ``ListenRecorded`` breaks a domain rule, or ``None`` when it is valid.

    Rules: ``event_id``, ``user_id``, ``track_id``, ``artist_id`` are non-blank strings;
    ``occurred_at`` (ms since the epoch) is > 0 and at most :data:`MAX_FUTURE_MS` after
    ``now_ms`` (default: no future check); ``ms_played`` is ``None`` or >= 0. It runs on every
    listen an agent or a read model takes, so the valid case is checked first in one pass.
    """
    get = record.get
    e, u, t, a = get("event_id"), get("user_id"), get("track_id"), get("artist_id")
    occurred = get("occurred_at")
    played = get("ms_played")
    if (
        type(e) is str and e and not e.isspace()
        and type(u) is str and u and not u.isspace()
        and type(t) is str and t and not t.isspace()
        and type(a) is str and a and not a.isspace()
        and type(occurred) is int and occurred > 0
        and (now_ms is None or occurred <= now_ms + MAX_FUTURE_MS)
        and (played is None or played >= 0)
    ):  # fmt: skip
        return None
    reason = _blank(record, ("event_id", "user_id", "track_id", "artist_id")) or _event_time(record, now_ms)
    if reason is not None:
        return reason
    if played is not None and played < 0:
        return f"ms_played={played} is negative"
    return None


def validate_ad_event(
    record: Mapping[str, Any], now_ms: int | None = None, campaigns: Collection[str] | None = None
) -> str | None:
    """Why a decoded ``AdImpressionServed`` / ``AdClicked`` breaks a domain rule, or ``None``.

    Rules: ``occurred_at`` as for listens; ``campaign_id`` one of ``campaigns`` (when given: the
    campaigns file the ad agent reads); an impression's ``position`` is 1-3 (the Open Bandit
    slots).
    """
    campaign = record.get("campaign_id")
    if campaigns is not None and campaign not in campaigns:
        return f"campaign_id={campaign!r} is not a known campaign"
    reason = _event_time(record, now_ms)
    if reason is not None:
        return reason
    if "click_id" not in record and not 1 <= int(record.get("position") or 0) <= 3:
        return f"position={record.get('position')!r} is not 1-3"
    return None


_CONTEXT_FREE: dict[str, Validator] = {
    "backbeat.playback.ListenRecorded": validate_listen,
}


def validator_for(event_type: str) -> Validator | None:
    """The context-free rule of ``event_type`` (full name, ``namespace.Name``), or ``None`` when
    its schema is all there is to check."""
    return _CONTEXT_FREE.get(event_type)


__all__ = ["MAX_FUTURE_MS", "Validator", "validate_ad_event", "validate_listen", "validator_for"]
