"""CloudEvents metadata as Kafka headers, after the CloudEvents Kafka protocol binding v1.0.2,
binary content mode (§3.2): attributes travel as ``ce_<name>`` headers, the payload is the
record value, ``content-type`` names its format.

backbeat adds the extension attributes ``ce_correlationid`` and ``ce_causationid`` for sagas.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from functools import lru_cache

CONTENT_TYPE = b"application/avro"  # Confluent wire-format Avro
SPEC_VERSION = b"1.0"

Headers = list[tuple[str, bytes]]


def rfc3339_ms(epoch_ms: int) -> str:
    """Format ms since the epoch as an RFC 3339 UTC time with ms precision (``ce_time``)."""
    return datetime.fromtimestamp(epoch_ms / 1000, UTC).isoformat(timespec="milliseconds").replace(
        "+00:00", "Z"
    )


@lru_cache(maxsize=256)
def _constant_headers(event_type: str, source: str) -> tuple[tuple[str, bytes], ...]:
    return (
        ("ce_specversion", SPEC_VERSION),
        ("ce_source", source.encode()),
        ("ce_type", event_type.encode()),
        ("content-type", CONTENT_TYPE),
    )


@lru_cache(maxsize=65_536)
def _minute(minutes: int) -> bytes:
    return time.strftime("%Y-%m-%dT%H:%M:", time.gmtime(minutes * 60)).encode()


def _ce_time(epoch_ms: int) -> bytes:
    # the hot path of rfc3339_ms (~5x faster than datetime.isoformat): events come roughly in
    # time order, so the "YYYY-MM-DDTHH:MM:" prefix is cached per minute
    minutes, rest = divmod(epoch_ms, 60_000)
    return _minute(minutes) + b"%02d.%03dZ" % divmod(rest, 1000)


def ce_headers(
    *,
    event_id: str,
    event_type: str,
    source: str,
    time_ms: int,
    correlation_id: str | None = None,
    causation_id: str | None = None,
) -> Headers:
    """The CloudEvents headers of one event.

    ``event_type`` is the Avro full name (``backbeat.playback.ListenRecorded``); ``source`` a
    URI-reference naming the producer (``/importers/30music``); ``time_ms`` the event time.
    """
    headers: Headers = [
        *_constant_headers(event_type, source),
        ("ce_id", event_id.encode()),
        ("ce_time", _ce_time(time_ms)),
    ]
    if correlation_id:
        headers.append(("ce_correlationid", correlation_id.encode()))
    if causation_id:
        headers.append(("ce_causationid", causation_id.encode()))
    return headers


def header_value(headers: Headers | None, name: str) -> str | None:
    """The first value of header ``name`` decoded as UTF-8, or ``None``."""
    for key, value in headers or ():
        if key == name:
            return value.decode("utf-8", "replace") if value is not None else None
    return None
