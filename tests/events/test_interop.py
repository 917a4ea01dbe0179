"""Interoperability with the Confluent ecosystem: bytes written by confluent-kafka's
AvroSerializer decode with backbeat's decoder and vice versa, both through the embedded registry
and under the TopicRecordNameStrategy subject backbeat uses (docs/design.md §3)."""

from __future__ import annotations

from dataclasses import replace

import fastavro
import pytest
from confluent_kafka.schema_registry import SchemaRegistryClient, topic_record_subject_name_strategy
from confluent_kafka.schema_registry.avro import AvroDeserializer, AvroSerializer
from confluent_kafka.schema_registry.error import SchemaRegistryError
from confluent_kafka.serialization import MessageField, SerializationContext

from events.registry_client import Registry
from events.schemas import get_schema, subject_for
from events.serde import schema_id_of
from infra.errors import RegistryError

pytestmark = pytest.mark.integration

LISTEN = {
    "event_id": "e1",
    "user_id": "u1",
    "track_id": "t1",
    "artist_id": "a1",
    "occurred_at": 1_397_982_525_000,  # ms since the epoch: backbeat never uses datetime
    "source": "30music",
    "ms_played": 183_000,
    "track_name": "Song",
    "artist_name": None,
    "session_hint": "2464",
    "territory": "DE",
    "playback_id": None,
}


def _ms(value: object) -> int:
    """confluent's deserializer gives timestamp-millis as an aware datetime; backbeat as int ms."""
    return value if isinstance(value, int) else round(value.timestamp() * 1000)  # type: ignore[attr-defined]


def test_confluent_serializer_to_backbeat_decoder(stack, unique):
    topic = unique("playback.listens")
    schema = get_schema("ListenRecorded")
    client = SchemaRegistryClient({"url": stack.registry_url})
    serializer = AvroSerializer(
        client, schema.schema_str, conf={"subject.name.strategy": topic_record_subject_name_strategy}
    )
    payload = serializer(LISTEN, SerializationContext(topic, MessageField.VALUE))
    assert payload[0] == 0

    subject = subject_for(topic, schema.full_name)
    assert subject == f"{topic}-backbeat.playback.ListenRecorded"
    assert client.get_latest_version(subject).schema_id == schema_id_of(payload)

    registry = Registry(stack.registry_url)
    assert registry.decoder().decode(payload) == LISTEN
    # backbeat's encoder finds the same subject and id, and writes the same bytes
    encoder = registry.encoder(topic, "ListenRecorded")
    assert encoder.schema_id == schema_id_of(payload)
    assert encoder.encode(LISTEN) == payload


def test_backbeat_encoder_to_confluent_deserializer(stack, unique):
    topic = unique("playback.listens")
    registry = Registry(stack.registry_url)
    payload = registry.encoder(topic, "ListenRecorded").encode(LISTEN)
    ctx = SerializationContext(topic, MessageField.VALUE)

    decoded = AvroDeserializer(SchemaRegistryClient({"url": stack.registry_url}))(payload, ctx)
    assert isinstance(decoded, dict)
    assert _ms(decoded.pop("occurred_at")) == LISTEN["occurred_at"]
    assert decoded == {k: v for k, v in LISTEN.items() if k != "occurred_at"}

    # with a reader schema too (schema resolution on the confluent side)
    reader = AvroDeserializer(
        SchemaRegistryClient({"url": stack.registry_url}), get_schema("ListenRecorded").schema_str
    )
    again = reader(payload, ctx)
    assert _ms(again["occurred_at"]) == LISTEN["occurred_at"] and again["user_id"] == "u1"


def test_incompatible_change_is_refused_for_both_clients(stack, unique):
    topic = unique("playback.listens")
    schema = get_schema("ListenRecorded")
    registry = Registry(stack.registry_url)
    registry.encoder(topic, "ListenRecorded")
    raw = {
        **schema.raw,
        "fields": [
            {"name": "ms_played", "type": "int", "doc": "now required, and an int"}
            if fld["name"] == "ms_played"
            else fld
            for fld in schema.raw["fields"]
        ],
    }
    breaking = replace(schema, raw=raw, parsed=fastavro.parse_schema(raw))

    serializer = AvroSerializer(
        SchemaRegistryClient({"url": stack.registry_url}),
        breaking.schema_str,
        conf={"subject.name.strategy": topic_record_subject_name_strategy},
    )
    with pytest.raises(SchemaRegistryError) as err:
        serializer({**LISTEN, "ms_played": 1}, SerializationContext(topic, MessageField.VALUE))
    assert (err.value.http_status_code, err.value.error_code) == (409, 409)
    assert "field 'ms_played'" in err.value.error_message

    with pytest.raises(RegistryError) as rerr:
        registry.register(topic, breaking)
    assert (rerr.value.http_status, rerr.value.error_code) == (409, 409)
    assert "field 'ms_played'" in str(rerr.value)
