"""A seeded generator of catalog changes on top of the imported Spotify catalog (pure: no Kafka):
licences granted and revoked per territory, metadata edits, withdrawals and album releases, as
the events of ``schemas/catalog/`` with deterministic ids (``backbeat simulate catalog``;
``docs/live-catalog.md``).

Input: the catalog's ``TrackPublished`` records (:func:`events.importers.catalog.parse_catalog_file`
of the same file ``backbeat import catalog`` reads, so the output is a function of the file and
the parameters alone, whether or not a runner has projected the catalog yet). Every choice comes
from :func:`pick`, a hash of the seed and the choice's name, never from a random state, so one
seed gives the same events, ids and times in every run and on every machine.

1. **Baseline** (at ``start_ms``), per track in ``track_id`` order, by ``pick(seed, "baseline",
   track) % 100``: below 55 one worldwide ``MASTER`` licence from a rights holder (``territories
   = []``); 55-94 territorial ``PERFORMANCE`` licences, one per rights society (:data:`SOCIETIES`:
   the EU territories share ICE), each society's licence granted with probability 85 %; 95-99
   no licence at all (the track is unlicensed everywhere until a later grant). 15 % of the
   licences have a fixed term that ends 30 to ``2 x days`` days after the start; 70 % of those
   are renewed in advance (a second licence, granted at the start, valid from the end of the
   first, open-ended), the others expire. ``royalty_share_bp`` 500-2499.
2. **Changes** ``i = 0 .. changes-1`` at ``start_ms + (i + 1) * span / (changes + 1)``, kind by
   ``pick(seed, "kind", i) % 100``:

   - 0-44 ``TrackUpdated``: one or two of ``name`` (``" - Remastered <year>"`` appended),
     ``popularity``, ``genre`` (another genre of the catalog), ``duration_ms`` (± up to 10 s,
     at least 30 s) and ``explicit``. Never ``artist`` or ``album_id``: the display-name
     mapping of 30Music ids (:mod:`projections.names`) positions tracks by artist;
   - 45-64 ``LicenceRevoked`` of one of a track's licences still in force, for all it covers
     (``territories = []``) or one or two of its territories; half of them cause a
     ``TrackWithdrawn`` (``reason = LICENCE_REVOKED``, its ``licence_id``) for the same
     territories at the same time (``[]`` only when a worldwide licence is revoked whole);
     a track without a licence in force gets an update instead;
   - 65-77 ``TrackWithdrawn`` for another reason (takedown, artist request, duplicate,
     quality): worldwide (35 %) or one to three territories;
   - 78-89 ``LicenceGranted``: a new territorial licence for one to three territories;
   - 90-99 ``AlbumReleased``: a new album (1 track: SINGLE, 2-6: EP, else ALBUM, up to 12) by an
     artist of the catalog, whose tracks are published as ``TrackPublished`` (audio features of
     a catalog track of that artist) and licensed worldwide from the release.

Ids: event ids are ``event_id("catalog-sim", seed, kind, i, …)`` (SHA-256, 32 hex); licence ids
``"lic-"`` + 16 hex of the same; new album and track ids 22 base-62 characters like Spotify's.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from events.importers.base import event_id

#: The territories of the live platform, ISO 3166-1 alpha-2 (the player simulator gives each user
#: one of these by a seeded hash, :data:`events.player.COUNTRIES`).
TERRITORIES: tuple[str, ...] = ("DE", "FR", "GB", "US", "SE", "ES", "IT", "NL", "BR", "JP")
#: The rights society licensing performance rights per territory (the EU ones through ICE, the
#: pan-European hub); a territory not listed gets ``CMO-<territory>``.
SOCIETIES: Mapping[str, str] = {
    "DE": "ICE", "FR": "ICE", "GB": "ICE", "SE": "ICE", "ES": "ICE", "IT": "ICE", "NL": "ICE",
    "US": "ASCAP", "BR": "ECAD", "JP": "JASRAC",
}  # fmt: skip
#: Rights holders granting worldwide master licences.
HOLDERS: tuple[str, ...] = ("Merlin", "Sony Music", "Universal Music", "Warner Music")
DAY_MS = 86_400_000
#: Default start of the simulated period: 2021-01-01T00:00Z (after the 2020 catalog snapshot).
DEFAULT_START_MS = 1_609_459_200_000
#: Topics (infra/topics.toml).
TRACKS_TOPIC = "catalog.tracks"
CHANGES_TOPIC = "catalog.track-changes"
LICENCES_TOPIC = "catalog.licences"
ALBUMS_TOPIC = "catalog.albums"
#: Event type -> (topic, key field, time field).
ROUTES: Mapping[str, tuple[str, str, str]] = {
    "TrackPublished": (TRACKS_TOPIC, "track_id", "published_at"),
    "TrackUpdated": (CHANGES_TOPIC, "track_id", "occurred_at"),
    "TrackWithdrawn": (CHANGES_TOPIC, "track_id", "occurred_at"),
    "LicenceGranted": (LICENCES_TOPIC, "track_id", "occurred_at"),
    "LicenceRevoked": (LICENCES_TOPIC, "track_id", "occurred_at"),
    "AlbumReleased": (ALBUMS_TOPIC, "album_id", "occurred_at"),
}
_BASE62 = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
_WORDS = (
    "Midnight", "Golden", "Echoes", "River", "Neon", "Paper", "Hearts", "Summer", "Static", "Velvet",
    "Horizon", "Wild", "Glass", "Fire", "Silent", "Electric", "Blue", "Ghost", "Satellite", "Home",
)  # fmt: skip
_WITHDRAWAL_REASONS = ("TAKEDOWN_REQUEST", "ARTIST_REQUEST", "DUPLICATE", "QUALITY", "OTHER")
_REVOCATION_REASONS = ("EXPIRED", "TERMINATED", "DISPUTE", "NON_PAYMENT", "OTHER")


def pick(seed: int, *parts: object) -> int:
    """The seeded hash every choice is made from: the first 12 hex digits (48 bits) of SHA-256
    over ``seed`` and ``parts`` joined by ``|``, as an int."""
    text = "|".join(str(p) for p in ("catalog-sim", seed, *parts))
    return int(hashlib.sha256(text.encode()).hexdigest()[:12], 16)


def _base62_id(seed: int, *parts: object) -> str:
    """22 base-62 characters (a Spotify-like id) from SHA-256 over ``seed`` and ``parts``."""
    text = "|".join(str(p) for p in ("catalog-sim-id", seed, *parts))
    n = int(hashlib.sha256(text.encode()).hexdigest(), 16)
    out = []
    for _ in range(22):
        n, r = divmod(n, 62)
        out.append(_BASE62[r])
    return "".join(out)


@dataclass(frozen=True)
class Emitted:
    """One generated event: its ``event_type`` (short name) and ``record`` (the Avro record as
    a dict, times in ms since the epoch). Topic, key and time field: :data:`ROUTES`."""

    event_type: str
    record: dict[str, Any]

    @property
    def topic(self) -> str:
        """The topic it goes to (:data:`ROUTES`)."""
        return ROUTES[self.event_type][0]


@dataclass
class _Licence:
    licence_id: str
    track_id: str
    society: str
    territories: frozenset[str] | None  # None: worldwide
    valid_until: int | None
    valid_from: int
    revoked: set[str] = field(default_factory=set)
    revoked_all: bool = False

    def in_force(self, territories: Sequence[str], at_ms: int) -> list[str]:
        """Territories (of ``territories``) this licence still covers at ``at_ms``."""
        if self.revoked_all or at_ms < self.valid_from:
            return []
        if self.valid_until is not None and at_ms >= self.valid_until:
            return []
        mine = self.territories
        covered = territories if mine is None else [t for t in territories if t in mine]
        return [t for t in covered if t not in self.revoked]


@dataclass(frozen=True)
class Generated:
    """What :func:`generate` made: ``events`` in production order (baseline, then changes in
    time order) and ``counts`` per event type."""

    events: tuple[Emitted, ...]
    counts: dict[str, int]


class _Generator:
    def __init__(
        self,
        tracks: Sequence[Mapping[str, Any]],
        seed: int,
        territories: Sequence[str],
        start_ms: int,
        span_ms: int,
    ) -> None:
        if not tracks:
            raise ValueError("the catalog has no tracks: import or pass a catalog first")
        if not territories:
            raise ValueError("at least one territory is needed")
        self.seed = seed
        self.territories = list(dict.fromkeys(territories))
        self.start_ms = start_ms
        self.span_ms = span_ms
        self.tracks: dict[str, dict[str, Any]] = {
            t["track_id"]: dict(t) for t in sorted(tracks, key=lambda r: r["track_id"])
        }
        self.track_ids: list[str] = list(self.tracks)
        self.by_artist: dict[str, list[str]] = {}
        for tid, t in self.tracks.items():
            self.by_artist.setdefault(t["artist"], []).append(tid)
        self.artists = sorted(self.by_artist)
        self.genres = sorted({t["genre"] for t in self.tracks.values()})
        self.licences: dict[str, _Licence] = {}
        self.by_track: dict[str, list[str]] = {}
        self.events: list[Emitted] = []

    # -- helpers ---------------------------------------------------------------------------------
    def h(self, *parts: object) -> int:
        return pick(self.seed, *parts)

    def emit(self, event_type: str, record: dict[str, Any]) -> None:
        self.events.append(Emitted(event_type, record))

    def grant(
        self, tag: tuple[object, ...], track_id: str, at_ms: int, territories: frozenset[str] | None,
        society: str, rights: str, valid_until: int | None, valid_from: int | None = None,
    ) -> None:  # fmt: skip
        eid = event_id("catalog-sim", self.seed, "grant", *tag)
        lid = "lic-" + eid[:16]
        start = at_ms if valid_from is None else valid_from
        lic = _Licence(lid, track_id, society, territories, valid_until, start)
        self.licences[lid] = lic
        self.by_track.setdefault(track_id, []).append(lid)
        self.emit(
            "LicenceGranted",
            {
                "event_id": eid,
                "licence_id": lid,
                "track_id": track_id,
                "occurred_at": at_ms,
                "society": society,
                "rights_type": rights,
                "territories": sorted(territories) if territories is not None else [],
                "valid_from": start,
                "valid_until": valid_until,
                "royalty_share_bp": 500 + self.h("share", lid) % 2000,
            },
        )

    def term(self, *tag: object) -> int | None:
        """A fixed term's end for 15 % of licences (30 days to 2 x span after the start)."""
        if self.h("term", *tag) % 100 >= 15:
            return None
        return self.start_ms + 30 * DAY_MS + self.h("term-end", *tag) % max(1, 2 * self.span_ms - 30 * DAY_MS)

    def some_territories(self, *tag: object, most: int = 3) -> list[str]:
        """One to ``most`` distinct territories, in the order of :attr:`territories`."""
        n = 1 + self.h("n-territories", *tag) % min(most, len(self.territories))
        ranked = sorted(self.territories, key=lambda t: self.h("territory", *tag, t))
        chosen = set(ranked[:n])
        return [t for t in self.territories if t in chosen]

    # -- baseline --------------------------------------------------------------------------------
    def baseline(self) -> None:
        groups: dict[str, list[str]] = {}
        for t in self.territories:
            groups.setdefault(SOCIETIES.get(t, f"CMO-{t}"), []).append(t)
        for tid in self.track_ids:
            u = self.h("baseline", tid) % 100
            if u < 55:
                holder = HOLDERS[self.h("holder", tid) % len(HOLDERS)]
                self.licensed(("base", tid, "world"), tid, None, holder, "MASTER")
            elif u < 95:
                for society, members in groups.items():
                    if self.h("society", tid, society) % 100 < 85:
                        self.licensed(("base", tid, society), tid, frozenset(members), society, "PERFORMANCE")

    def licensed(
        self, tag: tuple[object, ...], tid: str, territories: frozenset[str] | None, society: str, rights: str
    ) -> None:
        """A baseline licence; one with a fixed term is renewed in advance (a second licence from
        its end, open-ended, granted at the start) with probability 70 %."""
        end = self.term(*tag)
        self.grant(tag, tid, self.start_ms, territories, society, rights, end)
        if end is not None and self.h("renew", *tag) % 100 < 70:
            self.grant(
                ("renew", *tag), tid, self.start_ms, territories, society, rights, None, valid_from=end
            )

    # -- changes ---------------------------------------------------------------------------------
    def change(self, i: int) -> None:
        at = self.start_ms + self.span_ms * (i + 1) // (self.changes + 1)
        kind = self.h("kind", i) % 100
        if kind < 45:
            self.update(i, at)
        elif kind < 65:
            if not self.revoke(i, at):
                self.update(i, at)
        elif kind < 78:
            self.withdraw(i, at)
        elif kind < 90:
            tid = self.track_ids[self.h("grant-track", i) % len(self.track_ids)]
            ts = self.some_territories("grant", i)
            society = SOCIETIES.get(ts[0], f"CMO-{ts[0]}")
            self.grant(("change", i), tid, at, frozenset(ts), society, "PERFORMANCE", None)
        else:
            self.album(i, at)

    def update(self, i: int, at: int) -> None:
        tid = self.track_ids[self.h("update-track", i) % len(self.track_ids)]
        track = self.tracks[tid]
        fields = ["name", "popularity", "genre", "duration_ms", "explicit"]
        ranked = sorted(fields, key=lambda f: self.h("field", i, f))
        chosen = [f for f in fields if f in ranked[: 1 + self.h("n-fields", i) % 2]]
        rec: dict[str, Any] = {
            "event_id": event_id("catalog-sim", self.seed, "update", i),
            "track_id": tid,
            "occurred_at": at,
            "changed_fields": chosen,
            "name": None, "artist": None, "album_id": None, "genre": None,
            "popularity": None, "duration_ms": None, "explicit": None,
        }  # fmt: skip
        for f in chosen:
            if f == "name":
                year = datetime.fromtimestamp(at / 1000, UTC).year
                value: Any = f"{track['name']} - Remastered {year}"
            elif f == "popularity":
                value = self.h("popularity", i) % 101
            elif f == "genre":
                others = [g for g in self.genres if g != track["genre"]] or self.genres
                value = others[self.h("genre", i) % len(others)]
            elif f == "duration_ms":
                value = max(30_000, int(track["duration_ms"]) + self.h("duration", i) % 20_001 - 10_000)
            else:
                value = bool(self.h("explicit", i) % 2)
            rec[f] = value
            track[f] = value
        self.emit("TrackUpdated", rec)

    def revoke(self, i: int, at: int) -> bool:
        for attempt in range(8):
            tid = self.track_ids[self.h("revoke-track", i, attempt) % len(self.track_ids)]
            live = [
                (lid, cov)
                for lid in self.by_track.get(tid, [])
                if (cov := self.licences[lid].in_force(self.territories, at))
            ]
            if live:
                break
        else:
            return False
        lid, covered = live[self.h("revoke-licence", i) % len(live)]
        lic = self.licences[lid]
        whole = self.h("revoke-whole", i) % 2 == 0
        if whole:
            listed: list[str] = []
            lic.revoked_all = True
            gone = covered
        else:
            n = 1 + self.h("revoke-n", i) % min(2, len(covered))
            ranked = sorted(covered, key=lambda t: self.h("revoke-territory", i, t))
            listed = [t for t in covered if t in ranked[:n]]
            lic.revoked.update(listed)
            gone = listed
        self.emit(
            "LicenceRevoked",
            {
                "event_id": event_id("catalog-sim", self.seed, "revoke", i),
                "licence_id": lid,
                "track_id": tid,
                "occurred_at": at,
                "society": lic.society,
                "reason": _REVOCATION_REASONS[self.h("revoke-reason", i) % len(_REVOCATION_REASONS)],
                "territories": listed,
            },
        )
        if self.h("revoke-withdraws", i) % 2 == 0:
            worldwide = whole and lic.territories is None
            self.emit(
                "TrackWithdrawn",
                {
                    "event_id": event_id("catalog-sim", self.seed, "revoke-withdraw", i),
                    "track_id": tid,
                    "occurred_at": at,
                    "reason": "LICENCE_REVOKED",
                    "territories": [] if worldwide else list(gone),
                    "licence_id": lid,
                },
            )
        return True

    def withdraw(self, i: int, at: int) -> None:
        tid = self.track_ids[self.h("withdraw-track", i) % len(self.track_ids)]
        worldwide = self.h("withdraw-world", i) % 100 < 35
        self.emit(
            "TrackWithdrawn",
            {
                "event_id": event_id("catalog-sim", self.seed, "withdraw", i),
                "track_id": tid,
                "occurred_at": at,
                "reason": _WITHDRAWAL_REASONS[self.h("withdraw-reason", i) % len(_WITHDRAWAL_REASONS)],
                "territories": [] if worldwide else self.some_territories("withdraw", i),
                "licence_id": None,
            },
        )

    def album(self, i: int, at: int) -> None:
        artist = self.artists[self.h("album-artist", i) % len(self.artists)]
        own = self.by_artist[artist]
        template = self.tracks[own[self.h("album-template", i) % len(own)]]
        n = 1 + self.h("album-size", i) % 12
        kind = "SINGLE" if n == 1 else "EP" if n <= 6 else "ALBUM"
        album_id = _base62_id(self.seed, "album", i)
        title = f"{_WORDS[self.h('album-w1', i) % len(_WORDS)]} {_WORDS[self.h('album-w2', i) % len(_WORDS)]}"
        date = datetime.fromtimestamp(at / 1000, UTC).strftime("%Y-%m-%d")
        day = at - at % DAY_MS  # published at 00:00 UTC of the release date, as the importer does
        track_ids: list[str] = []
        for k in range(n):
            tid = _base62_id(self.seed, "album-track", i, k)
            track_ids.append(tid)
            word = _WORDS[self.h("track-word", i, k) % len(_WORDS)]
            rec = {
                **{key: template[key] for key in _AUDIO},
                "event_id": event_id("catalog-sim", self.seed, "publish", i, k),
                "track_id": tid,
                "name": title if n == 1 else f"{word} ({title} {k + 1})",
                "artist": artist,
                "popularity": self.h("track-popularity", i, k) % 60 + 20,
                "album_id": album_id,
                "album_name": title,
                "album_release_date": date,
                "genre": template["genre"],
                "subgenre": template["subgenre"],
                "duration_ms": 120_000 + self.h("track-duration", i, k) % 180_000,
                "published_at": day,
            }
            self.tracks[tid] = dict(rec)  # a copy: later edits change the state, not the event
            self.emit("TrackPublished", rec)
        self.emit(
            "AlbumReleased",
            {
                "event_id": event_id("catalog-sim", self.seed, "album", i),
                "album_id": album_id,
                "occurred_at": at,
                "name": title,
                "artist": artist,
                "album_type": kind,
                "track_ids": track_ids,
                "release_date": date,
                "label": None,
                "upc": None,
            },
        )
        for k, tid in enumerate(track_ids):
            holder = HOLDERS[self.h("holder", tid) % len(HOLDERS)]
            self.grant(("album", i, k), tid, at, None, holder, "MASTER", None)
        # new tracks join the pool only after their release: later changes may pick them
        self.track_ids.extend(track_ids)
        self.by_artist[artist].extend(track_ids)

    def run(self, changes: int) -> Generated:
        self.changes = changes
        self.baseline()
        for i in range(changes):
            self.change(i)
        counts: dict[str, int] = {}
        for e in self.events:
            counts[e.event_type] = counts.get(e.event_type, 0) + 1
        return Generated(tuple(self.events), counts)


_AUDIO = (
    "danceability", "energy", "key", "loudness_db", "mode", "speechiness", "acousticness",
    "instrumentalness", "liveness", "valence", "tempo_bpm",
)  # fmt: skip


def generate(
    tracks: Iterable[Mapping[str, Any]],
    *,
    seed: int = 17,
    changes: int = 1000,
    territories: Sequence[str] = TERRITORIES,
    start_ms: int = DEFAULT_START_MS,
    days: int = 365,
) -> Generated:
    """The baseline licences and ``changes`` changes for ``tracks`` (``TrackPublished``
    records: at least ``track_id``, ``name``, ``artist``, ``genre``, ``subgenre``,
    ``duration_ms`` and the audio features), over ``days`` days from ``start_ms`` (ms since the
    epoch, UTC); rules in the module docstring. Pure and deterministic.

    Raises:
        ValueError: no tracks, no territories, ``changes < 0`` or ``days < 1``.
    """
    if changes < 0 or days < 1:
        raise ValueError(f"changes must be >= 0 and days >= 1 (got {changes}, {days})")
    return _Generator(list(tracks), seed, territories, start_ms, days * DAY_MS).run(changes)


__all__ = [
    "ALBUMS_TOPIC",
    "CHANGES_TOPIC",
    "DEFAULT_START_MS",
    "LICENCES_TOPIC",
    "ROUTES",
    "SOCIETIES",
    "TERRITORIES",
    "TRACKS_TOPIC",
    "Emitted",
    "Generated",
    "generate",
    "pick",
]
