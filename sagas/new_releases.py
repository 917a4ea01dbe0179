"""New releases of followed artists: ``AlbumReleased`` on ``catalog.albums`` becomes one
``new-release@1`` ``NotificationRequested`` per follower of the album's artist.

**Followers** (the rule, documented in docs/live-notifications.md): the users with at least
``min_listens`` (default :data:`DEFAULT_MIN_LISTENS`) rows in the ``listens`` read model whose
``artist_id`` is the album's catalog artist id, ``'ar-' || substr(md5(artist), 1, 16)``
(decision 2 of issue 17; :func:`artist_id_of`), counted over everything the read model holds
when the release is processed. A row of ``listens`` is a counted play already (the 30-second
rule is applied where listens are derived), so every row counts. Exactly::

    SELECT user_id FROM listens WHERE artist_id = ? GROUP BY user_id HAVING count(*) >= ?

Requests are deterministic: ``notification_id = "nr-" + stable_id("new-release", album_id,
user_id)`` and ``event_id = stable_id(notification_id, "NotificationRequested")``, so running the
requester again over the same releases asks for nothing new (the relay and the read model
de-duplicate by those ids); a user who becomes a follower later is asked for on a later run from
the start (``--from-start``). Priority LOW; channel PUSH by default.

Positions: the next offset of each ``catalog.albums`` partition is kept in
``<data_dir>/notifications/new-releases.json``, written after the requests are acknowledged by
the broker (a crash in between asks again with the same ids: harmless).
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from infra.errors import ConfigError, OffsetMismatchError
from sagas.messages import stable_id

log = logging.getLogger("backbeat.notifications.releases")

ALBUMS_TOPIC = "catalog.albums"
TEMPLATE = "new-release@1"
DEFAULT_MIN_LISTENS = 3
SOURCE = "/platform/new-releases"

FOLLOWERS_SQL = (
    "SELECT user_id, count(*) AS listens FROM listens WHERE artist_id = ? "
    "GROUP BY user_id HAVING count(*) >= ? ORDER BY user_id"
)


def artist_id_of(artist: str) -> str:
    """The catalog artist id of an artist name: ``"ar-" + md5(name UTF-8).hexdigest()[:16]``."""
    return "ar-" + hashlib.md5(artist.encode("utf-8")).hexdigest()[:16]


def notification_id_for(album_id: str, user_id: str) -> str:
    """The deterministic notification id of the release of ``album_id`` for ``user_id``."""
    return "nr-" + stable_id("new-release", album_id, user_id)


def followers(con: Any, artist_id: str, min_listens: int) -> list[tuple[str, int]]:
    """``(user_id, listens)`` of the followers of ``artist_id`` (module doc), by user id, from a
    DuckDB connection holding the ``listens`` read model."""
    return [(str(u), int(n)) for u, n in con.execute(FOLLOWERS_SQL, [artist_id, int(min_listens)]).fetchall()]


def release_requests(
    album: Mapping[str, Any], fans: Sequence[tuple[str, int]], *, now_ms: int, channel: str = "PUSH"
) -> list[dict[str, Any]]:
    """The ``NotificationRequested`` payloads of one ``AlbumReleased`` (decoded) for ``fans``
    (``(user_id, listens)``); ``occurred_at = now_ms`` (when it was requested). Pure."""
    artist = str(album["artist"])
    params = {
        "album_id": str(album["album_id"]),
        "album_name": str(album.get("name") or ""),
        "artist": artist,
        "artist_id": artist_id_of(artist),
        "album_type": str(album.get("album_type") or "OTHER"),
    }
    if album.get("release_date"):
        params["release_date"] = str(album["release_date"])
    out = []
    for user_id, listens in fans:
        nid = notification_id_for(str(album["album_id"]), user_id)
        out.append({
            "event_id": stable_id(nid, "NotificationRequested"),
            "notification_id": nid,
            "user_id": user_id,
            "occurred_at": int(now_ms),
            "channel": channel,
            "template": TEMPLATE,
            "params": {**params, "listens": str(listens)},
            "priority": "LOW",
            "correlation_id": str(album.get("event_id") or "") or None,
        })  # fmt: skip
    return out


@dataclass
class RequesterStats:
    """``albums`` read, ``undecodable`` ones skipped, ``requested`` notifications produced."""

    albums: int = 0
    undecodable: int = 0
    requested: int = 0
    by_album: dict[str, int] = field(default_factory=dict)


def positions_file(settings: Any) -> Path:
    """Where the requester keeps its positions."""
    return Path(settings.data_dir) / "notifications" / "new-releases.json"


def _load_positions(path: Path) -> dict[tuple[str, int], int]:
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        raise ConfigError(
            f"{path}: unreadable positions ({exc}); delete it or run with --from-start"
        ) from exc
    return {(ALBUMS_TOPIC, int(p)): int(off) for p, off in raw.get("positions", {}).items()}


def _save_positions(path: Path, positions: Mapping[tuple[str, int], int]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(
        json.dumps({"topic": ALBUMS_TOPIC, "positions": {str(p): o for (_t, p), o in positions.items()}})
    )
    tmp.replace(path)


def run_requester(
    settings: Any,
    *,
    min_listens: int = DEFAULT_MIN_LISTENS,
    channel: str = "PUSH",
    from_start: bool = False,
    follow: bool = False,
    stop: threading.Event | None = None,
    poll_s: float = 1.0,
    clock: Callable[[], int] | None = None,
    on_album: Callable[[str, int], None] | None = None,
) -> RequesterStats:
    """Read ``catalog.albums`` from the stored positions (or the start) to its end, request the
    notifications, store the new positions; with ``follow``, keep reading every ``poll_s`` s
    until ``stop`` is set. ``on_album(album_id, requests)`` is called per release (progress).

    Raises:
        ConfigError: no ``listens`` read model yet, or unreadable positions.
        OffsetMismatchError: stored positions beyond the topic's end (the broker lost its log).
        infra.errors.InfraError, TransientError: broker or registry unreachable.
    """
    import duckdb

    from events.log import read_to_end
    from events.offsets import high_watermarks
    from events.producer import EventProducer
    from events.registry_client import registry_for
    from events.serde import DecodeError
    from projections.store import reader

    now = clock or (lambda: int(time.time() * 1000))
    path = positions_file(settings)
    stats = RequesterStats()
    producer = EventProducer(settings)
    decoder = registry_for(settings.registry_url).decoder()
    stored = {} if from_start else _load_positions(path)
    while True:
        highs = high_watermarks(settings, ALBUMS_TOPIC)
        starts = {(ALBUMS_TOPIC, p): stored.get((ALBUMS_TOPIC, p), 0) for p in highs}
        ahead = [(tp, off) for tp, off in starts.items() if off > highs[tp[1]]]
        if ahead:
            raise OffsetMismatchError(
                f"new-release requester: stored position {ahead[0][1]} of "
                f"{ALBUMS_TOPIC}[{ahead[0][0][1]}] is beyond "
                f"the topic's end {highs[ahead[0][0][1]]} (the broker lost its log); run with --from-start"
            )
        for batch in read_to_end(settings, starts, purpose="new-releases"):
            albums: list[dict[str, Any]] = []
            for msg in batch:
                stored[(msg.topic(), msg.partition())] = msg.offset() + 1
                try:
                    albums.append(decoder.decode(msg.value() or b""))
                except DecodeError as exc:
                    stats.undecodable += 1
                    log.warning("new-release requester: skipped %s[%d]@%d: %s", msg.topic(), msg.partition(),
                                msg.offset(), exc)  # fmt: skip
            requests: list[dict[str, Any]] = []
            try:
                with reader(settings.duckdb_path) if albums else _nothing() as con:
                    for album in albums:
                        fans = followers(con, artist_id_of(str(album["artist"])), min_listens)
                        asked = release_requests(album, fans, now_ms=now(), channel=channel)
                        requests.extend(asked)
                        stats.albums += 1
                        stats.by_album[str(album["album_id"])] = len(asked)
                        if on_album is not None:
                            on_album(str(album["album_id"]), len(asked))
            except duckdb.CatalogException as exc:
                raise ConfigError(
                    f"there is no listens read model at {settings.duckdb_path} ({exc}); build it first "
                    "('backbeat project --projection listens --until-caught-up')"
                ) from None
            if requests:
                producer.send_many("platform.notifications", "NotificationRequested", requests,
                                   key_field="user_id", time_field="occurred_at", source=SOURCE)  # fmt: skip
                producer.flush()
                stats.requested += len(requests)
            _save_positions(path, stored)
        for tp in starts:
            stored.setdefault(tp, starts[tp])
        _save_positions(path, stored)
        if not follow or (stop is not None and stop.wait(poll_s)) or (stop is None and not _sleep(poll_s)):
            return stats


@contextmanager
def _nothing() -> Iterator[None]:
    yield None


def _sleep(seconds: float) -> bool:
    time.sleep(seconds)
    return True


__all__ = [
    "ALBUMS_TOPIC",
    "DEFAULT_MIN_LISTENS",
    "FOLLOWERS_SQL",
    "TEMPLATE",
    "RequesterStats",
    "artist_id_of",
    "followers",
    "notification_id_for",
    "positions_file",
    "release_requests",
    "run_requester",
]
