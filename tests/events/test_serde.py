"""Confluent wire format and CloudEvents headers (pure)."""

from __future__ import annotations

import pytest

from events.cloudevents import ce_headers, header_value, rfc3339_ms
from events.control import is_control, watermark_headers, watermark_of
from events.schemas import get_schema, load_schemas, subject_for
from events.serde import AvroDecoder, AvroEncoder, frame, schema_id_of
from infra.errors import DecodeError, RegistryError, SchemaError, TransientError

LISTEN = {
    "event_id": "e1",
    "user_id": "u1",
    "track_id": "t1",
    "artist_id": "a1",
    "occurred_at": 1_397_982_525_000,
    "source": "30music",
    "ms_played": None,
    "track_name": None,
    "artist_name": None,
    "session_hint": "2464",
    "territory": None,
    "playback_id": None,
}


def test_every_schema_parses_and_is_named_after_its_file():
    schemas = load_schemas()
    assert {"backbeat.playback.ListenRecorded", "backbeat.catalog.TrackPublished",
            "backbeat.listening.SessionEnded"} <= set(schemas)  # fmt: skip
    for schema in schemas.values():
        assert schema.path.stem == schema.name
        assert all(f.get("doc") for f in schema.raw["fields"]), schema.full_name


def test_subject_follows_topic_record_name_strategy():
    assert subject_for("playback.listens", "backbeat.playback.ListenRecorded") == (
        "playback.listens-backbeat.playback.ListenRecorded"
    )


def test_wire_format_round_trip_with_schema_id_prefix():
    schema = get_schema("ListenRecorded")
    enc = AvroEncoder(schema.parsed, 42)
    payloads = enc.encode_many([LISTEN, {**LISTEN, "event_id": "e2", "ms_played": 1234}])
    assert payloads[0][:5] == b"\x00\x00\x00\x00\x2a"
    assert schema_id_of(payloads[0]) == 42
    records, errors = AvroDecoder(lambda i: schema.parsed_plain).decode_many(payloads)
    assert errors == []
    assert records[0] == LISTEN and records[1]["ms_played"] == 1234


def test_record_not_matching_schema_is_a_schema_error():
    enc = AvroEncoder(get_schema("ListenRecorded").parsed, 1)
    with pytest.raises(SchemaError):
        enc.encode({**LISTEN, "occurred_at": "yesterday"})


def test_bad_payloads_are_reported_not_raised_in_batches():
    schema = get_schema("ListenRecorded")
    good = AvroEncoder(schema.parsed, 1).encode(LISTEN)

    def lookup(schema_id: int) -> dict:
        if schema_id != 1:
            raise RegistryError(f"Schema {schema_id} not found", error_code=40403, http_status=404)
        return schema.parsed_plain

    records, errors = AvroDecoder(lookup).decode_many(
        [good, b"\x01\x00\x00\x00\x01abc", b"\x00\x00", good[:-3], frame(9) + good[5:], None, good + b"x"]
    )
    assert records[0] == LISTEN
    assert [i for i, _ in errors] == [1, 2, 3, 4, 5, 6]
    reasons = dict(errors)
    assert "magic byte" in reasons[1]
    assert "shorter than the 5-byte header" in reasons[2]
    assert "does not decode" in reasons[3]
    assert "schema id 9" in reasons[4]
    assert "tombstone" in reasons[5]
    assert "trailing bytes" in reasons[6]
    with pytest.raises(DecodeError):
        AvroDecoder(lookup).decode(b"")


def test_an_unreachable_registry_is_transient_and_nothing_is_decided():
    """Defect: a registry that is briefly down turned valid events into dead letters."""
    schema = get_schema("ListenRecorded")
    good = AvroEncoder(schema.parsed, 1).encode(LISTEN)
    up = False

    def lookup(schema_id: int) -> dict:
        if not up:
            raise ConnectionError("connection refused")
        return schema.parsed_plain

    decoder = AvroDecoder(lookup)
    with pytest.raises(TransientError):
        decoder.decode_many([good, b"junk"])
    up = True
    records, errors = decoder.decode_many([good, b"junk"])
    assert records[0] == LISTEN and [i for i, _ in errors] == [1]


def test_not_found_is_never_cached_across_batches():
    """Defect: "schema id N is not in the registry" was cached for the life of the process."""
    schema = get_schema("ListenRecorded")
    good = AvroEncoder(schema.parsed, 2).encode(LISTEN)
    registered: set[int] = set()
    asked: list[int] = []

    def lookup(schema_id: int) -> dict:
        asked.append(schema_id)
        if schema_id not in registered:
            raise RegistryError(f"Schema {schema_id} not found", error_code=40403, http_status=404)
        return schema.parsed_plain

    decoder = AvroDecoder(lookup)
    records, errors = decoder.decode_many([good, good, good])
    assert records == [None, None, None] and "not in the registry" in errors[0][1]
    assert asked == [2]  # asked once per batch, not once per record
    registered.add(2)
    records, errors = decoder.decode_many([good])
    assert records == [LISTEN] and errors == []


def test_cloudevents_headers_binary_mode():
    headers = ce_headers(event_id="e1", event_type="backbeat.playback.ListenRecorded",
                         source="/importers/30music", time_ms=1_397_982_525_000,
                         correlation_id="c1")  # fmt: skip
    assert header_value(headers, "ce_specversion") == "1.0"
    assert header_value(headers, "ce_id") == "e1"
    assert header_value(headers, "ce_time") == "2014-04-20T08:28:45.000Z"
    assert header_value(headers, "ce_correlationid") == "c1"
    assert header_value(headers, "ce_causationid") is None
    assert header_value(headers, "content-type") == "application/avro"
    assert rfc3339_ms(0) == "1970-01-01T00:00:00.000Z"


def test_watermark_control_records():
    headers = watermark_headers(1234)
    assert is_control(headers) and watermark_of(headers) == 1234
    assert not is_control([("ce_id", b"x")]) and watermark_of(None) is None
