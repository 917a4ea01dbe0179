"""Reading events written with an old schema version: resolution, and the upcaster chain for
what resolution gets wrong (ListenRecorded v1 → v2: seconds_played became ms_played)."""

from __future__ import annotations

import json

import fastavro
import pytest

from events.registry_client import Registry
from events.schemas import subject_for
from events.serde import AvroDecoder, AvroEncoder, plain_times
from events.upcasting import UPCASTERS, UpcasterChain, UpcastingDecoder, schema_history, version_of
from infra.errors import SchemaError

V1, V2 = schema_history("ListenRecorded")
OLD_EVENT = {
    "event_id": "e-old",
    "user_id": "u1",
    "track_id": "t1",
    "artist_id": "a1",
    "occurred_at": 1_397_982_525_000,
    "source": "30music",
    "seconds_played": 215,
}


def _encode(schema_text: str, schema_id: int, record: dict) -> bytes:
    return AvroEncoder(fastavro.parse_schema(json.loads(schema_text)), schema_id).encode(record)


def test_versions_come_from_the_history_folder():
    assert version_of("ListenRecorded", V1) == 1
    assert version_of("ListenRecorded", V2) == 2
    assert version_of("ListenRecorded", json.dumps({"type": "record", "name": "X", "fields": []})) is None


def test_resolution_alone_loses_the_play_time():
    payload = _encode(V1, 1, OLD_EVENT)
    reader = fastavro.parse_schema(plain_times(json.loads(V2)))
    writer = fastavro.parse_schema(plain_times(json.loads(V1)))
    resolved = AvroDecoder(lambda _id: writer, reader).decode(payload)
    assert resolved["ms_played"] is None and "seconds_played" not in resolved


def test_upcasting_decoder_reads_old_and_new_events_in_the_current_shape():
    texts = {1: V1, 2: V2}
    decoder = UpcastingDecoder("ListenRecorded", texts.__getitem__)
    old = decoder.decode(_encode(V1, 1, OLD_EVENT))
    assert old["ms_played"] == 215_000
    assert old["track_name"] is None and "seconds_played" not in old
    new_event = {**OLD_EVENT, "event_id": "e-new", "ms_played": 1234, "track_name": "x",
                 "artist_name": None, "session_hint": None, "territory": None, "playback_id": None}  # fmt: skip
    del new_event["seconds_played"]
    assert decoder.decode(_encode(V2, 2, new_event)) == new_event


def test_a_missing_step_is_a_clear_error():
    with pytest.raises(SchemaError, match="no upcaster"):
        UpcasterChain().upcast("ListenRecorded", 1, OLD_EVENT)
    assert UPCASTERS.has_steps_from("ListenRecorded", 1)


def test_old_events_through_the_registry(stack, unique):
    """v1 registered first, then v2 under the same subject (a BACKWARD-compatible change);
    events written by the old version decode through the registry into v2's shape."""
    registry = Registry(stack.registry_url)
    subject = subject_for(unique("upcast"), "backbeat.playback.ListenRecorded")
    v1_id = registry.register_text(subject, V1)
    v2_id = registry.register_text(subject, V2)
    assert v1_id != v2_id
    decoder = UpcastingDecoder("ListenRecorded", registry.schema_text_by_id)
    assert decoder.decode(_encode(V1, v1_id, OLD_EVENT))["ms_played"] == 215_000
