"""The new-release requester over the real broker: a small ``listens`` read model, three
``AlbumReleased`` on ``catalog.albums``, and requests on ``platform.notifications`` for exactly the
followers (users with >= 3 listens of the album's catalog artist, the artist id computed in SQL
here, in Python by the requester); a second run asks for nothing new, a run from the start asks
again with the same ids.

Its own broker and registry (module-scoped): the topics have fixed names.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import duckdb
import pytest

from events.log import read_to_end
from events.offsets import high_watermarks
from events.producer import EventProducer
from events.registry_client import registry_for
from infra import services
from infra.processes import free_port
from infra.provision import apply_topics
from infra.settings import Settings
from projections.readmodels import LISTENS
from sagas.new_releases import run_requester
from tests.conftest import settings_for

ARTISTS = {"al-a": "Artist A", "al-b": "Nobody Listens", "al-c": "Björk"}
LISTENS_OF = {  # user -> {artist name: listens}
    "u1": {"Artist A": 3, "Björk": 1},
    "u2": {"Artist A": 2},
    "u3": {"Artist A": 5, "Björk": 4},
    "u4": {"Someone Else": 9},
}


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Settings]:
    settings = settings_for(tmp_path_factory.mktemp("releases"), free_port(), free_port())
    services.up(settings)
    try:
        apply_topics(settings)
        yield settings
    finally:
        services.down(settings)


def _listens(settings: Settings) -> None:
    settings.duckdb_path.parent.mkdir(parents=True, exist_ok=True)
    con = duckdb.connect(str(settings.duckdb_path))
    con.execute(LISTENS.ddl)
    n = 0
    for user, artists in LISTENS_OF.items():
        for artist, times in artists.items():
            for _ in range(times):
                n += 1
                con.execute(
                    "INSERT INTO listens (event_id, user_id, track_id, artist_id, occurred_at, source, "
                    "artist_name, kafka_partition, kafka_offset) VALUES (?, ?, 'tr-1', "
                    "'ar-' || substr(md5(?), 1, 16), TIMESTAMP '2026-01-01', 'player', ?, 0, ?)",
                    [f"e{n}", user, artist, artist, n],
                )
    con.close()


def _albums(settings: Settings) -> None:
    now = int(time.time() * 1000)
    albums = [{"event_id": f"rel-{aid}", "album_id": aid, "occurred_at": now, "name": f"Album {aid}",
               "artist": artist, "album_type": "ALBUM", "track_ids": ["tr-1"], "release_date": "2026-12-07",
               "label": None, "upc": None} for aid, artist in ARTISTS.items()]  # fmt: skip
    producer = EventProducer(settings)
    producer.send_many("catalog.albums", "AlbumReleased", albums, key_field="album_id",
                       time_field="occurred_at", source="/test")  # fmt: skip
    producer.flush()


def _requests(settings: Settings) -> list[dict[str, Any]]:
    decoder = registry_for(settings.registry_url).decoder()
    topic = "platform.notifications"
    starts = {(topic, p): 0 for p in high_watermarks(settings, topic)}
    return [decoder.decode(m.value()) for batch in read_to_end(settings, starts) for m in batch]


def test_an_album_release_asks_for_exactly_the_followers(stack: Settings) -> None:
    _listens(stack)
    _albums(stack)
    with duckdb.connect(str(stack.duckdb_path), read_only=True) as con:
        expected = {
            (aid, user)
            for aid, artist in ARTISTS.items()
            for (user,) in con.execute(
                "SELECT user_id FROM listens WHERE artist_id = 'ar-' || substr(md5(?), 1, 16) "
                "GROUP BY user_id HAVING count(*) >= 3",
                [artist],
            ).fetchall()
        }
    assert expected == {("al-a", "u1"), ("al-a", "u3"), ("al-c", "u3")}

    stats = run_requester(stack, min_listens=3)

    assert stats.albums == 3 and stats.by_album == {"al-a": 2, "al-b": 0, "al-c": 1}
    got = _requests(stack)
    assert {(r["params"]["album_id"], r["user_id"]) for r in got} == expected and len(got) == 3
    assert {r["template"] for r in got} == {"new-release@1"} and {r["priority"] for r in got} == {"LOW"}
    assert {r["params"]["artist"] for r in got} == {"Artist A", "Björk"}
    assert {r["params"]["listens"] for r in got if r["user_id"] == "u3"} == {"5", "4"}

    assert run_requester(stack, min_listens=3).requested == 0  # positions kept: nothing new
    assert len(_requests(stack)) == 3
    again = run_requester(stack, min_listens=3, from_start=True)  # asks again, with the same ids
    assert again.requested == 3
    after = _requests(stack)
    assert len(after) == 6 and {r["notification_id"] for r in after} == {r["notification_id"] for r in got}
    assert {r["event_id"] for r in after} == {r["event_id"] for r in got}
