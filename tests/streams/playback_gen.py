"""A small seeded generator of player events for the listening-from-playback tests (not the
simulator of ``backbeat simulate playback``: these streams exercise the agent's edge cases).

:func:`player_events` returns ``(event type, record)`` pairs in the order a player would send
them (each user's events in time order, users interleaved by time), with: sessions in
countries (some without one), plays of tracks from a small pool (some without ``artist_id``),
pauses and resumes, skips and completions (``ms_played`` around the 30-second boundary
included), plays that never end (abandoned at the session's end), plays whose session never
started, and redelivered events (a play's end or start, a session start, sent twice).
"""

from __future__ import annotations

import random
from typing import Any

T0 = 1_780_000_000_000
COUNTRIES = ("DE", "FR", "GB", "US", "SE", "ES", "IT", "NL", "BR", "JP")


def _track(rng: random.Random, n_tracks: int) -> tuple[str, str, int]:
    i = rng.randrange(n_tracks)
    return f"tr-{i:04d}", f"ar-{i % 7:016x}", 60_000 + (i * 7919) % 240_000


def player_events(seed: int, users: int, sessions_per_user: int) -> list[tuple[str, dict[str, Any]]]:
    """Player events of ``users`` users with ``sessions_per_user`` sessions each (module
    docstring), deterministic for ``seed``."""
    rng = random.Random(seed)
    timed: list[tuple[int, int, str, dict[str, Any]]] = []
    seq = 0

    def emit(kind: str, record: dict[str, Any]) -> None:
        nonlocal seq
        timed.append((record["occurred_at"], seq, kind, record))
        seq += 1

    for u in range(users):
        user = f"user-{seed}-{u:04d}"
        t = T0 + rng.randrange(3_600_000)
        for s in range(sessions_per_user):
            sid = f"{user}-s{s}"
            has_session = rng.random() > 0.05  # else its plays come without a session start
            if has_session:
                start = {
                    "event_id": f"{sid}-start", "user_id": user, "session_id": sid, "occurred_at": t,
                    "device_type": rng.choice(["MOBILE", "DESKTOP", "WEB"]), "client": "tests/1.0",
                    "country": rng.choice(COUNTRIES) if rng.random() > 0.1 else None,
                }  # fmt: skip
                emit("PlaybackSessionStarted", start)
                if rng.random() < 0.03:
                    emit("PlaybackSessionStarted", dict(start, occurred_at=t + 1))  # a redelivery
            session_start = t
            plays = rng.randint(1, 8)
            total_ms = 0
            for k in range(plays):
                t += rng.randint(100, 3000)
                pid = f"{sid}-p{k}"
                track, artist, duration = _track(rng, 40)
                started = {
                    "event_id": f"{pid}-started", "user_id": user, "session_id": sid, "playback_id": pid,
                    "track_id": track, "occurred_at": t, "position_ms": 0,
                    "context_type": "PLAYLIST", "context_id": None, "shuffle": False, "offline": False,
                    "artist_id": artist if rng.random() > 0.1 else None, "duration_ms": duration,
                }  # fmt: skip
                emit("PlaybackStarted", started)
                roll = rng.random()
                if roll < 0.1:
                    played = rng.choice([29_999, 30_000, 30_001, 0])
                elif roll < 0.45:
                    played = rng.randrange(0, duration)
                else:
                    played = duration
                heard = 0
                if played > 10_000 and rng.random() < 0.3:  # a pause in the middle
                    heard = played // 2
                    emit("PlaybackPaused", {
                        "event_id": f"{pid}-paused", "user_id": user, "session_id": sid, "playback_id": pid,
                        "track_id": track, "occurred_at": t + heard, "position_ms": heard, "ms_played": heard,
                    })  # fmt: skip
                    pause = rng.randint(1000, 600_000)
                    t += pause
                    emit("PlaybackResumed", {
                        "event_id": f"{pid}-resumed", "user_id": user, "session_id": sid, "playback_id": pid,
                        "track_id": track, "occurred_at": t + heard, "position_ms": heard, "paused_ms": pause,
                    })  # fmt: skip
                t += max(played, 1)
                if k == plays - 1 and rng.random() < 0.1:
                    continue  # never ends: abandoned at the session's end
                total_ms += played
                if played >= duration:
                    end_kind, end = "PlaybackCompleted", {
                        "event_id": f"{pid}-completed", "user_id": user, "session_id": sid,
                        "playback_id": pid, "track_id": track, "occurred_at": t, "ms_played": played,
                        "duration_ms": duration,
                    }  # fmt: skip
                else:
                    end_kind, end = "PlaybackSkipped", {
                        "event_id": f"{pid}-skipped", "user_id": user, "session_id": sid,
                        "playback_id": pid, "track_id": track, "occurred_at": t, "position_ms": played,
                        "ms_played": played, "reason": rng.choice(["FORWARD", "SELECTED_OTHER"]),
                    }  # fmt: skip
                emit(end_kind, end)
                redeliver = rng.random()
                if redeliver < 0.04:
                    emit(end_kind, dict(end))  # the end twice
                elif redeliver < 0.06:
                    emit("PlaybackStarted", dict(started))  # its start again, after its end
            t += rng.randint(1000, 5000)
            if has_session or rng.random() < 0.5:
                emit("PlaybackSessionEnded", {
                    "event_id": f"{sid}-ended", "user_id": user, "session_id": sid, "occurred_at": t,
                    "started_at": session_start, "plays": plays, "ms_played": total_ms, "reason": "LOGGED_OUT",
                })  # fmt: skip
            t += rng.randint(60_000, 4 * 3_600_000)  # the next session later
    timed.sort(key=lambda x: (x[0], x[1]))
    return [(kind, record) for _, _, kind, record in timed]


def expected_listens(events: list[tuple[str, dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """The listens the 30-second rule makes of ``events``, by ``playback_id``, computed
    plainly (the first end of each started play), for the unit tests; the integration test
    checks the agent against DuckDB instead."""
    starts: dict[str, dict[str, Any]] = {}
    countries: dict[str, str | None] = {}
    out: dict[str, dict[str, Any]] = {}
    ended: set[str] = set()
    for kind, r in events:
        if kind == "PlaybackSessionStarted":
            countries.setdefault(r["session_id"], r["country"])
        elif kind == "PlaybackStarted":
            starts.setdefault(r["playback_id"], r)
        elif kind in ("PlaybackSkipped", "PlaybackCompleted"):
            pid = r["playback_id"]
            if pid in ended or pid not in starts:
                continue
            ended.add(pid)
            if r["ms_played"] >= 30_000:
                s = starts[pid]
                out[pid] = {"user_id": s["user_id"], "track_id": s["track_id"], "occurred_at": s["occurred_at"],
                            "ms_played": r["ms_played"], "territory": countries.get(s["session_id"])}  # fmt: skip
    return out
