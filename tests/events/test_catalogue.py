"""The event catalogue holds together: the schemas follow the conventions of docs/design.md §3–§4, the
topic catalogue and the schemas agree, and ``docs/events.md`` is what the generator writes."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from events.catalog import load_catalogue
from events.schemas import EventSchema, load_schemas
from infra.clidoc import EVENTS_DOC, events_doc

SCHEMAS = load_schemas()
TOPICS = load_catalogue()
COMMAND_TYPES = {t for spec in TOPICS.values() if spec.name.endswith(".commands") for t in spec.event_types}
EXISTING = {
    "backbeat.playback.ListenRecorded",
    "backbeat.catalog.TrackPublished",
    "backbeat.listening.SessionEnded",
}


def _named(avro_type: Any) -> Iterator[dict[str, Any]]:
    """Enums and records inside ``avro_type`` (through unions, arrays and maps)."""
    if isinstance(avro_type, list):
        for branch in avro_type:
            yield from _named(branch)
    elif isinstance(avro_type, dict):
        if avro_type.get("type") in {"record", "enum"}:
            yield avro_type
        elif avro_type.get("type") == "array":
            yield from _named(avro_type["items"])
        elif avro_type.get("type") == "map":
            yield from _named(avro_type["values"])


def _records(record: dict[str, Any], enclosing: tuple[dict[str, Any], ...] = ()) -> Iterator[tuple]:
    """``record`` and every record nested in it, each with the records enclosing it."""
    yield record, enclosing
    for field in record["fields"]:
        for named in _named(field["type"]):
            if named["type"] == "record":
                yield from _records(named, (*enclosing, record))


def _fields(schema: EventSchema) -> Iterator[tuple[dict[str, Any], dict[str, Any], tuple]]:
    for record, enclosing in _records(schema.raw):
        for field in record["fields"]:
            yield field, record, enclosing


def _non_null(avro_type: Any) -> Any:
    if isinstance(avro_type, list):
        rest = [t for t in avro_type if t != "null"]
        return rest[0] if len(rest) == 1 else rest
    return avro_type


ids = pytest.mark.parametrize("schema", SCHEMAS.values(), ids=lambda s: s.full_name)


def test_docs_events_md_is_generated():
    assert EVENTS_DOC.exists(), "docs/events.md is missing: run .venv/bin/python -m infra.clidoc"
    assert EVENTS_DOC.read_text(encoding="utf-8") == events_doc(), "run: .venv/bin/python -m infra.clidoc"


def test_the_catalogue_covers_every_context():
    contexts = {s.context for s in SCHEMAS.values()}
    assert {
        "playback",
        "catalog",
        "personalisation",
        "billing",
        "orders",
        "ads",
        "platform",
        "media",
    } <= contexts
    assert EXISTING <= set(SCHEMAS)


def test_every_schema_is_on_a_topic():
    on_topics = {t for spec in TOPICS.values() for t in spec.event_types}
    assert sorted(set(SCHEMAS) - on_topics) == [], "add these event types to a topic in infra/topics.toml"


def test_every_topic_event_type_exists():
    for spec in TOPICS.values():
        unknown = [t for t in spec.event_types if t not in SCHEMAS]
        assert unknown == [], f"{spec.name} lists event types without a schema: {unknown}"


def test_topics_follow_the_conventions():
    for spec in TOPICS.values():
        context = spec.name.split(".", 1)[0]
        assert spec.name == spec.name.lower() and "." in spec.name, spec.name
        for event_type in spec.event_types:
            assert SCHEMAS[event_type].context == context, f"{event_type} on {spec.name}: other context"
        if spec.event_types:
            assert spec.partitions in {1, 3, 6} and spec.key, spec.name


def test_commands_only_on_command_topics():
    for spec in TOPICS.values():
        if not spec.name.endswith(".commands"):
            assert not set(spec.event_types) & COMMAND_TYPES, f"{spec.name} carries commands"


@ids
def test_topic_key_is_a_required_string_field(schema):
    names = {f["name"]: f for f in schema.raw["fields"]}
    for spec in TOPICS.values():
        if schema.full_name in spec.event_types:
            assert spec.key in names, f"{schema.full_name} on {spec.name} lacks its key field {spec.key!r}"
            assert names[spec.key]["type"] == "string", f"{schema.full_name}.{spec.key}: key must be a string"


@ids
def test_record_style(schema):
    raw = schema.raw
    assert raw["namespace"] == f"backbeat.{schema.context}"
    assert raw.get("doc"), f"{schema.full_name}: record doc missing"
    first = raw["fields"][0]
    assert (first["name"], first["type"]) == ("event_id", "string"), f"{schema.full_name}: event_id first"


@ids
def test_every_field_has_a_doc(schema):
    for field, record, _ in _fields(schema):
        assert str(field.get("doc", "")).strip(), (
            f"{schema.full_name}: {record['name']}.{field['name']} has no doc"
        )


@ids
def test_money_fields_are_minor_longs_with_a_currency(schema):
    money_words = ("amount", "price", "budget", "spend", "spent", "cost", "total", "fee", "revenue")
    for field, record, enclosing in _fields(schema):
        name, avro_type = field["name"], _non_null(field["type"])
        where = f"{schema.full_name}: {record['name']}.{name}"
        if name.endswith("_minor"):
            assert avro_type == "long", f"{where}: money is an integer number of minor units (long)"
            has_currency = any("currency" in {f["name"] for f in r["fields"]} for r in (record, *enclosing))
            assert has_currency, f"{where}: money needs an ISO 4217 `currency` field beside it"
        elif any(word in name for word in money_words):
            assert avro_type not in ("float", "double"), f"{where}: money as a float; use {name}_minor (long)"
        if name == "currency":
            assert avro_type == "string", f"{where}: currency is an ISO 4217 code (string)"


@ids
def test_at_fields_are_timestamp_millis(schema):
    for field, record, _ in _fields(schema):
        if field["name"].endswith("_at"):
            avro_type = _non_null(field["type"])
            assert avro_type == {"type": "long", "logicalType": "timestamp-millis"}, (
                f"{schema.full_name}: {record['name']}.{field['name']} must be timestamp-millis"
            )


@ids
def test_optional_fields_default_to_null(schema):
    for field, record, _ in _fields(schema):
        if isinstance(field["type"], list) and "null" in field["type"]:
            assert field["type"][0] == "null" and field.get("default", "missing") is None, (
                f'{schema.full_name}: {record["name"]}.{field["name"]}: optional is ["null", T] with default null'
            )


@ids
def test_enums_have_a_default_symbol(schema):
    for field, _record, _ in _fields(schema):
        for named in _named(field["type"]):
            if named["type"] == "enum":
                assert named.get("default") in named["symbols"], (
                    f"{schema.full_name}: enum {named['name']} needs a default symbol (for evolution)"
                )


@ids
def test_events_have_an_event_id_commands_an_idempotency_key(schema):
    names = {f["name"] for f in schema.raw["fields"]}
    assert "event_id" in names
    if schema.full_name in COMMAND_TYPES:
        assert {"idempotency_key", "correlation_id"} <= names, f"{schema.full_name}: command fields missing"
    else:
        assert "idempotency_key" not in names, f"{schema.full_name}: an event on a non-command topic"
