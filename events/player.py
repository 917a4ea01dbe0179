"""The player simulator's rule: real 30Music listens → player sessions and playback events (pure:
no Kafka, no clock, no global random state).

Every choice is a *draw* from a seeded hash, so the same listens, catalog and seed always give
the same events, byte for byte, and a re-run is de-duplicated downstream by ``event_id``.

Input
    Listens as :func:`events.importers.listens.parse_30music` gives them (``user_id``,
    ``track_id`` = 30Music item, ``artist_id`` = 30Music artist, ``occurred_at`` ms,
    ``event_id``). :func:`prepare` collapses equal ``event_id`` (the importer's rule), orders by
    time (stable), keeps the first ``users`` users (by first listen) and then the first ``limit``
    listens.

Draws
    A draw is a number in [0, 1): 4 bytes of a SHA-512 digest read as a big-endian integer,
    divided by 2³². Draw *k* of a play is bytes ``4k…4k+3`` of
    ``sha512("<seed>|play|<user>|<listen ms>|<item>")``; of a session,
    ``sha512("<seed>|session|<user>|<session start ms>")``; of a user,
    ``sha512("<base seed>|user|<user>")``. ``<seed>`` is the seed (``DEFAULT_SEED`` = 17), or
    ``<seed>r<n>`` in the *n*-th repetition of the input (live mode, ``round_`` ≥ 1); the user
    draws always use the plain seed, so a user keeps its country and device.

Plays
    Each listen is one play of the catalog track it maps onto
    (:class:`events.player_catalog.PlayerCatalog`, the rule of :mod:`projections.names`), of
    duration ``D`` ms. It starts at the listen's time ``T`` at position 0, with
    ``PlaybackStarted`` carrying the catalog ``track_id``, ``artist_id`` and ``duration_ms``, a
    context (draw 7: PLAYLIST 30 %, ALBUM 20 %, LIBRARY 15 %, ARTIST 10 %, RECOMMENDATION 10 %,
    RADIO 8 %, SEARCH 5 %, OTHER 2 %; ``context_id`` the album id, the catalog artist id,
    ``radio-<artist id>``, or ``pl-<user>-<1..5>`` by draw 8; none otherwise), shuffle (draw 9
    < 0.3 for playlist, album, artist and library contexts) and offline (draw 10 < 0.1 on a
    mobile device).

    The play is *heard* for ``h`` ms (no seeks: position = ms heard):

    * **seeded skip**: when draw 0 < :data:`SKIP_PROBABILITY`, the listener skips. Early (draw 1
      < :data:`EARLY_SKIP_SHARE`): ``h = 1,000 + ⌊u² × 29,000⌋`` with u = draw 2 (1–30 s,
      most near the start); late: ``h = 30,000 + ⌊u × (D − 31,000)⌋`` (when ``D > 31,000``, else
      ``⌊u × D⌋``); ``h`` is at most ``D − 1``. Reason (draw 3): FORWARD 80 %, SELECTED_OTHER 10 %,
      BACKWARD 8 %, PLAYBACK_ERROR 2 %;
    * otherwise ``h = D``;
    * **the cap**: a play never runs past the start of the user's next play (``A`` = next
      listen's time − ``T``; no limit for a user's last listen): ``h = min(h, A)``. A play cut
      this way that would have completed is a skip with reason FORWARD at position ``A`` (the
      listener moved on; on the real file this is 28 % of plays, because the mapped catalog
      track is often longer than the real gap between listens); a seeded skip cut this way
      keeps its reason;
    * **pause**: when draw 4 < :data:`PAUSE_PROBABILITY` and ``h ≥ 2``, the play pauses at
      position ``p = 1 + ⌊draw 5 × (h − 1)⌋`` for ``L = 2,000 + ⌊u² × 298,000⌋`` ms (u = draw 6:
      2 s to 5 min), but only if it still ends by the next play's start (``h + L ≤ A``);
      otherwise it has no pause.

    Events of a play: ``PlaybackStarted`` at ``T``; ``PlaybackPaused`` at ``T + p``
    (``position_ms = ms_played = p``) and ``PlaybackResumed`` at ``T + p + L``
    (``position_ms = p``, ``paused_ms = L``) when it pauses; then ``PlaybackCompleted`` when
    ``h = D`` or else ``PlaybackSkipped`` (``position_ms = h``), at ``T + h + L`` with
    ``ms_played = h``: **ms_played is audio heard, pauses excluded**, so a completed play has
    ``ms_played = duration_ms``, and ``0 ≤ ms_played ≤ duration_ms`` always. Two listens of a
    user at the same second give a play skipped at 0 ms.

Sessions
    A user's listens form sessions by the 30Music gap rule of :mod:`streams.sessions`: a gap
    between consecutive listen times longer than ``gap_ms`` (``Settings.session_gap_ms``,
    30 min) starts a new session; a gap of exactly ``gap_ms`` stays. ``PlaybackSessionStarted``
    is at the first play's start (before it), ``PlaybackSessionEnded`` at the last play's end
    (after it) with ``started_at``, ``plays`` (plays in the session), ``ms_played`` (their sum)
    and a reason (session draw 3: IDLE_TIMEOUT 40 %, APP_CLOSED 40 %, DEVICE_SWITCHED 12 %,
    LOGGED_OUT 8 %). Country: :data:`COUNTRIES` [user draw 0 × 10] (the user's country, the
    same in every session). Device: the user's primary device (user draw 1: MOBILE 55 %,
    DESKTOP 22 %, WEB 8 %, SMART_SPEAKER 5 %, CAR 5 %, TV 3 %, WEARABLE 2 %), except in
    sessions with session draw 0 ≥ 0.8 (20 %), whose device is drawn again by the same weights
    (session draw 1; it may be the primary one). The client (``android/8.9.12``,
    ``ios/8.9.10``, ``windows/1.2.31`` …) is one of the device's: by user draw 2 on the primary
    device, by session draw 2 on another.

Ids
    ``playback_id = event_id("player", seed, user, listen ms, item)``,
    ``session_id = event_id("player-session", seed, user, session start ms)`` and each event's
    ``event_id = event_id(playback_id or session_id, event type)``
    (:func:`events.importers.base.event_id`: SHA-256, first 32 hex digits).

Order
    The key is ``user_id``. A user's events are in time order (a play's end is at or before the
    next play's start; ties keep the order above); :func:`simulate` merges users by time (ties:
    users in order of their first listen), which is the order replay produces them in.

What this module does not do: decide which plays count as listens (the consumers apply the
30-second rule themselves) or assign wall-clock times (``events.simulate_playback``'s live mode).
"""

from __future__ import annotations

import hashlib
import heapq
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from events.catalog_changes import TERRITORIES
from events.importers.base import dedupe_and_order, event_id
from events.player_catalog import CatalogTrack, PlayerCatalog
from infra.errors import ConfigError

#: The seed used when none is given.
DEFAULT_SEED = 17
#: The default session gap (ms): ``Settings.session_gap_ms``'s default, the 30Music gap rule.
SESSION_GAP_MS = 30 * 60 * 1000
#: Share of plays the listener skips by choice (draw 0), before the cap by the next play.
SKIP_PROBABILITY = 0.06
#: Share of seeded skips that happen in the first 30 s (draw 1).
EARLY_SKIP_SHARE = 0.9
#: Share of plays that pause once (draw 4), when the pause fits before the next play.
PAUSE_PROBABILITY = 0.06
#: The users' countries (ISO 3166-1 alpha-2), one per user by a seeded hash: the platform's
#: territories, the ones licences cover (:data:`events.catalog_changes.TERRITORIES`).
COUNTRIES = TERRITORIES

SESSION_STARTED = "PlaybackSessionStarted"
STARTED = "PlaybackStarted"
PAUSED = "PlaybackPaused"
RESUMED = "PlaybackResumed"
SKIPPED = "PlaybackSkipped"
COMPLETED = "PlaybackCompleted"
SESSION_ENDED = "PlaybackSessionEnded"
#: Every event type the simulator emits (short names, as in ``schemas/playback/``).
EVENT_TYPES = (SESSION_STARTED, STARTED, PAUSED, RESUMED, SKIPPED, COMPLETED, SESSION_ENDED)

_CONTEXTS = (
    ("PLAYLIST", 0.30), ("ALBUM", 0.20), ("LIBRARY", 0.15), ("ARTIST", 0.10),
    ("RECOMMENDATION", 0.10), ("RADIO", 0.08), ("SEARCH", 0.05), ("OTHER", 0.02),
)  # fmt: skip
_SHUFFLE_CONTEXTS = frozenset({"PLAYLIST", "ALBUM", "ARTIST", "LIBRARY"})
_SKIP_REASONS = (("FORWARD", 0.80), ("SELECTED_OTHER", 0.10), ("BACKWARD", 0.08), ("PLAYBACK_ERROR", 0.02))
_END_REASONS = (("IDLE_TIMEOUT", 0.40), ("APP_CLOSED", 0.40), ("DEVICE_SWITCHED", 0.12), ("LOGGED_OUT", 0.08))
_DEVICES = (
    ("MOBILE", 0.55), ("DESKTOP", 0.22), ("WEB", 0.08), ("SMART_SPEAKER", 0.05), ("CAR", 0.05),
    ("TV", 0.03), ("WEARABLE", 0.02),
)  # fmt: skip
_CLIENTS = {
    "MOBILE": ("android/8.9.12", "ios/8.9.10"),
    "DESKTOP": ("windows/1.2.31", "macos/1.2.31"),
    "WEB": ("web/1.2.31",),
    "SMART_SPEAKER": ("speaker/3.4.0",),
    "CAR": ("car/1.7.2",),
    "TV": ("tv/2.1.4",),
    "WEARABLE": ("wearos/1.1.0",),
}
_NO_LIMIT = 1 << 62


@dataclass(frozen=True, slots=True)
class Listen:
    """One 30Music listen: ``user_id``, ``track_id`` (30Music item id), ``artist_id`` (30Music
    artist id), ``occurred_at`` (ms since the epoch)."""

    user_id: str
    track_id: str
    artist_id: str
    occurred_at: int


@dataclass(frozen=True, slots=True)
class PlayerEvent:
    """One player event: ``event_type`` (short name, e.g. ``PlaybackStarted``), ``key`` (the
    record key: ``user_id``), ``record`` (a dict matching ``schemas/playback/<event_type>.avsc``)
    and ``time_ms`` (its ``occurred_at``)."""

    event_type: str
    key: str
    record: dict[str, Any]
    time_ms: int


def draws(text: str) -> tuple[float, ...]:
    """The 16 draws in [0, 1) of ``text``: SHA-512 of its UTF-8 bytes, 4 bytes each, / 2³²."""
    digest = hashlib.sha512(text.encode()).digest()
    return tuple(int.from_bytes(digest[i : i + 4], "big") / 4_294_967_296 for i in range(0, 64, 4))


def _pick(u: float, table: Sequence[tuple[str, float]]) -> str:
    acc = 0.0
    for value, weight in table:
        acc += weight
        if u < acc:
            return value
    return table[-1][0]


def round_seed(seed: int | str, round_: int = 0) -> str:
    """The seed text of repetition ``round_`` of the input: ``"<seed>"``, or ``"<seed>r<n>"``."""
    return str(seed) if round_ == 0 else f"{seed}r{round_}"


def prepare(
    records: Iterable[Mapping[str, Any]], *, users: int | None = None, limit: int | None = None
) -> list[Listen]:
    """Parsed 30Music records → the listens to simulate: equal ``event_id`` collapsed (first
    wins), ordered by ``occurred_at`` (stable), the first ``users`` users by first listen, then
    the first ``limit`` listens (``None``: all)."""
    kept, _ = dedupe_and_order(records, "occurred_at")
    if users is not None:
        chosen: set[str] = set()
        for rec in kept:
            if len(chosen) >= users:
                break
            chosen.add(rec["user_id"])
        kept = [r for r in kept if r["user_id"] in chosen]
    if limit is not None:
        kept = kept[:limit]
    return [
        Listen(str(r["user_id"]), str(r["track_id"]), str(r["artist_id"]), int(r["occurred_at"]))
        for r in kept
    ]


@dataclass(frozen=True, slots=True)
class _User:
    country: str
    device: str
    client_draw: float


def _user_profile(base_seed: str, user: str) -> _User:
    d = draws(f"{base_seed}|user|{user}")
    return _User(COUNTRIES[int(d[0] * len(COUNTRIES))], _pick(d[1], _DEVICES), d[2])


def simulate_user(
    user: str,
    listens: Sequence[Listen],
    catalog: PlayerCatalog,
    seed: int | str = DEFAULT_SEED,
    *,
    gap_ms: int = SESSION_GAP_MS,
    round_: int = 0,
) -> Iterator[PlayerEvent]:
    """The events of one user's ``listens`` (all of ``user``, in time order), in time order."""
    s = round_seed(seed, round_)
    profile = _user_profile(str(seed), user)
    n = len(listens)
    i = 0
    while i < n:
        j = i + 1
        while j < n and listens[j].occurred_at - listens[j - 1].occurred_at <= gap_ms:
            j += 1
        yield from _session(user, listens, i, j, catalog, s, profile)
        i = j


def _session(
    user: str, listens: Sequence[Listen], i: int, j: int, catalog: PlayerCatalog, s: str, profile: _User
) -> Iterator[PlayerEvent]:
    start = listens[i].occurred_at
    sd = draws(f"{s}|session|{user}|{start}")
    device = profile.device if sd[0] < 0.8 else _pick(sd[1], _DEVICES)
    clients = _CLIENTS[device]
    client = clients[int((sd[2] if device != profile.device else profile.client_draw) * len(clients))]
    session_id = event_id("player-session", s, user, start)
    yield PlayerEvent(
        SESSION_STARTED,
        user,
        {
            "event_id": event_id(session_id, SESSION_STARTED),
            "user_id": user,
            "session_id": session_id,
            "occurred_at": start,
            "device_type": device,
            "client": client,
            "country": profile.country,
        },
        start,
    )
    total_ms = 0
    end = start
    for k in range(i, j):
        nxt = listens[k + 1].occurred_at if k + 1 < len(listens) else None
        for event in _play(user, listens[k], nxt, catalog, s, session_id, device):
            yield event
        total_ms += event.record["ms_played"]  # the play's last event: Completed or Skipped
        end = event.time_ms
    yield PlayerEvent(
        SESSION_ENDED,
        user,
        {
            "event_id": event_id(session_id, SESSION_ENDED),
            "user_id": user,
            "session_id": session_id,
            "occurred_at": end,
            "started_at": start,
            "plays": j - i,
            "ms_played": total_ms,
            "reason": _pick(sd[3], _END_REASONS),
        },
        end,
    )


def _play(
    user: str, listen: Listen, next_start: int | None, catalog: PlayerCatalog, s: str, session_id: str,
    device: str,
) -> Iterator[PlayerEvent]:  # fmt: skip
    t = listen.occurred_at
    track: CatalogTrack = catalog.track_for(listen.artist_id, listen.track_id)
    dur = track.duration_ms
    d = draws(f"{s}|play|{user}|{t}|{listen.track_id}")
    playback_id = event_id("player", s, user, t, listen.track_id)
    budget = _NO_LIMIT if next_start is None else next_start - t

    skipped = d[0] < SKIP_PROBABILITY
    if skipped:
        if d[1] < EARLY_SKIP_SHARE:
            heard = 1_000 + int(d[2] * d[2] * 29_000)
        elif dur > 31_000:
            heard = 30_000 + int(d[2] * (dur - 31_000))
        else:
            heard = int(d[2] * dur)
        heard = min(heard, dur - 1)
        reason = _pick(d[3], _SKIP_REASONS)
    else:
        heard = dur
        reason = "FORWARD"
    heard = min(heard, budget)
    paused_ms = 0
    pause_at = 0
    if d[4] < PAUSE_PROBABILITY and heard >= 2:
        length = 2_000 + int(d[6] * d[6] * 298_000)
        if heard + length <= budget:
            pause_at = 1 + int(d[5] * (heard - 1))
            paused_ms = length

    context = _pick(d[7], _CONTEXTS)
    context_id: str | None = None
    if context == "ALBUM":
        context_id = track.album_id or None
    elif context == "ARTIST":
        context_id = track.artist_id
    elif context == "RADIO":
        context_id = f"radio-{track.artist_id}"
    elif context == "PLAYLIST":
        context_id = f"pl-{user}-{1 + int(d[8] * 5)}"
    common = {
        "user_id": user,
        "session_id": session_id,
        "playback_id": playback_id,
        "track_id": track.track_id,
    }
    yield PlayerEvent(
        STARTED,
        user,
        {
            "event_id": event_id(playback_id, STARTED),
            **common,
            "occurred_at": t,
            "position_ms": 0,
            "context_type": context,
            "context_id": context_id,
            "shuffle": context in _SHUFFLE_CONTEXTS and d[9] < 0.3,
            "offline": device == "MOBILE" and d[10] < 0.1,
            "artist_id": track.artist_id,
            "duration_ms": dur,
        },
        t,
    )
    if paused_ms:
        yield PlayerEvent(
            PAUSED,
            user,
            {
                "event_id": event_id(playback_id, PAUSED),
                **common,
                "occurred_at": t + pause_at,
                "position_ms": pause_at,
                "ms_played": pause_at,
            },
            t + pause_at,
        )
        yield PlayerEvent(
            RESUMED,
            user,
            {
                "event_id": event_id(playback_id, RESUMED),
                **common,
                "occurred_at": t + pause_at + paused_ms,
                "position_ms": pause_at,
                "paused_ms": paused_ms,
            },
            t + pause_at + paused_ms,
        )
    end = t + heard + paused_ms
    if heard == dur:
        record = {
            "event_id": event_id(playback_id, COMPLETED),
            **common,
            "occurred_at": end,
            "ms_played": heard,
            "duration_ms": dur,
        }
        yield PlayerEvent(COMPLETED, user, record, end)
    else:
        record = {
            "event_id": event_id(playback_id, SKIPPED),
            **common,
            "occurred_at": end,
            "position_ms": heard,
            "ms_played": heard,
            "reason": reason,
        }
        yield PlayerEvent(SKIPPED, user, record, end)


def simulate(
    listens: Sequence[Listen],
    catalog: PlayerCatalog,
    seed: int | str = DEFAULT_SEED,
    *,
    gap_ms: int = SESSION_GAP_MS,
    round_: int = 0,
) -> Iterator[PlayerEvent]:
    """The player events of ``listens`` (e.g. from :func:`prepare`), every user's in time order,
    merged by time (ties: users by first listen). ``round_`` ≥ 1 is the *n*-th repetition of the
    input (other ids and draws; the users keep country and device). Pure and deterministic.

    Raises:
        ConfigError: ``gap_ms`` is not positive.
    """
    if gap_ms <= 0:
        raise ConfigError(f"session gap_ms={gap_ms} must be positive (BACKBEAT_SESSION_GAP_MS)")
    by_user: dict[str, list[Listen]] = {}
    for listen in listens:
        by_user.setdefault(listen.user_id, []).append(listen)
    streams = []
    for user, own in by_user.items():
        own.sort(key=lambda x: x.occurred_at)
        streams.append(simulate_user(user, own, catalog, seed, gap_ms=gap_ms, round_=round_))
    return heapq.merge(*streams, key=lambda e: e.time_ms)


__all__ = [
    "COUNTRIES", "DEFAULT_SEED", "EARLY_SKIP_SHARE", "EVENT_TYPES", "PAUSE_PROBABILITY",
    "SESSION_GAP_MS", "SKIP_PROBABILITY", "Listen", "PlayerEvent", "draws", "prepare", "round_seed",
    "simulate", "simulate_user",
]  # fmt: skip
