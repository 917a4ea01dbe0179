"""Integration tests of the embedded schema registry (events.registry_server) against a real Tansu
broker, through confluent-kafka's own SchemaRegistryClient and Avro serialisers."""

from __future__ import annotations

import http.client
import json
import urllib.parse
import urllib.request

import pytest
from confluent_kafka.schema_registry import Schema, SchemaRegistryClient
from confluent_kafka.schema_registry.avro import AvroDeserializer, AvroSerializer
from confluent_kafka.schema_registry.error import SchemaRegistryError
from confluent_kafka.serialization import MessageField, SerializationContext

from events.offsets import high_watermarks
from infra.processes import free_port, stop
from infra.services import start_registry
from tests.conftest import settings_for, wait_for

pytestmark = pytest.mark.integration


def record_schema(name: str, *fields: str) -> str:
    return json.dumps(
        {
            "type": "record",
            "name": name,
            "namespace": "backbeat.test",
            "fields": [{"name": f, "type": "string"} for f in fields],
        }
    )


@pytest.fixture
def client(stack):
    return SchemaRegistryClient({"url": stack.registry_url})


def fresh_client(url: str) -> SchemaRegistryClient:
    """A client with an empty cache, so every call goes to the server."""
    return SchemaRegistryClient({"url": url})


def call(url: str, method: str = "GET", body: object = None, content_type: str | None = None):
    """(status, content type, parsed JSON) of a raw request; no Content-Type header unless given."""
    parts = urllib.parse.urlsplit(url)
    data = None if body is None else json.dumps(body).encode()
    headers = {"Content-Type": content_type} if content_type else {}
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)
    try:
        conn.request(method, parts.path, body=data, headers=headers)
        resp = conn.getresponse()
        ctype = (resp.getheader("Content-Type") or "").split(";")[0].strip()
        return resp.status, ctype, json.loads(resp.read())
    finally:
        conn.close()


def test_register_is_idempotent_and_readable(stack, client, unique):
    subject = unique("orders") + "-backbeat.test.Order"
    schema = record_schema("Order", "order_id")
    schema_id = client.register_schema(subject, Schema(schema, "AVRO"))
    assert schema_id >= 1

    other = fresh_client(stack.registry_url)
    # idempotent: same id, no new version (whitespace differs too)
    spaced = json.dumps(json.loads(schema), indent=4)
    assert other.register_schema(subject, Schema(spaced, "AVRO")) == schema_id
    assert other.get_versions(subject) == [1]

    fetched = other.get_schema(schema_id)
    assert json.loads(fetched.schema_str) == json.loads(schema)
    assert fetched.schema_type == "AVRO"
    assert subject in other.get_subjects()

    latest = other.get_latest_version(subject)
    assert (latest.subject, latest.version, latest.schema_id) == (subject, 1, schema_id)
    v1 = other.get_version(subject, 1)
    assert v1.schema_id == schema_id and json.loads(v1.schema.schema_str) == json.loads(schema)

    found = fresh_client(stack.registry_url).lookup_schema(subject, Schema(spaced, "AVRO"))
    assert (found.subject, found.version, found.schema_id) == (subject, 1, schema_id)


def test_new_version_and_global_ids(stack, client, unique):
    subject = unique("s") + "-backbeat.test.A"
    v1 = client.register_schema(subject, Schema(record_schema("A", "x"), "AVRO"))
    v2 = client.register_schema(subject, Schema(record_schema("A", "x", "y"), "AVRO"))
    assert v2 != v1
    assert client.get_versions(subject) == [1, 2]
    assert client.get_latest_version(subject).schema_id == v2
    # the same schema under another subject gets the same id (ids are global)
    other_subject = unique("t") + "-backbeat.test.A"
    assert (
        fresh_client(stack.registry_url).register_schema(
            other_subject, Schema(record_schema("A", "x"), "AVRO")
        )
        == v1
    )
    status, ctype, body = call(f"{stack.registry_url}/schemas/ids/{v1}/versions")
    assert status == 200 and ctype == "application/vnd.schemaregistry.v1+json"
    assert {"subject": subject, "version": 1} in body and {"subject": other_subject, "version": 1} in body


def test_error_codes(stack, client, unique):
    subject = unique("e") + "-backbeat.test.E"
    client.register_schema(subject, Schema(record_schema("E", "x"), "AVRO"))

    with pytest.raises(SchemaRegistryError) as err:
        client.get_schema(987654)
    assert (err.value.http_status_code, err.value.error_code) == (404, 40403)
    assert "987654" in err.value.error_message

    with pytest.raises(SchemaRegistryError) as err:
        client.get_versions(unique("missing"))
    assert (err.value.http_status_code, err.value.error_code) == (404, 40401)

    with pytest.raises(SchemaRegistryError) as err:
        client.get_version(subject, 9)
    assert (err.value.http_status_code, err.value.error_code) == (404, 40402)

    with pytest.raises(SchemaRegistryError) as err:
        client.lookup_schema(subject, Schema(record_schema("E", "other"), "AVRO"))
    assert (err.value.http_status_code, err.value.error_code) == (404, 40403)

    with pytest.raises(SchemaRegistryError) as err:
        client.register_schema(subject, Schema('{"type": "recrd"}', "AVRO"))
    assert (err.value.http_status_code, err.value.error_code) == (422, 42201)
    assert client.get_versions(subject) == [1]


def test_raw_http_details(stack, unique):
    url = stack.registry_url
    status, ctype, body = call(f"{url}/schemas/ids/7000")
    assert (status, ctype, body) == (
        404,
        "application/vnd.schemaregistry.v1+json",
        {"error_code": 40403, "message": "Schema 7000 not found"},
    )
    assert call(f"{url}/config")[2] == {"compatibilityLevel": "BACKWARD"}

    subject = unique("raw")
    for ctype_in in ("application/vnd.schemaregistry+json", "application/json", None):
        status, _, body = call(f"{url}/subjects/{subject}/versions", "POST", {"schema": '"string"'}, ctype_in)
        assert status == 200 and isinstance(body["id"], int)
    assert call(f"{url}/subjects/{subject}/versions")[2] == [1]
    status, _, body = call(f"{url}/subjects/{subject}/versions", "POST", {"schema": '"int"'}, "text/plain")
    assert (status, body["error_code"]) == (415, 415)
    assert call(f"{url}/subjects/{subject}/versions")[2] == [1]
    status, _, body = call(f"{url}/subjects/{subject}/versions", "POST", {"schema": "{not json"})
    assert (status, body["error_code"]) == (422, 42201)
    assert call(f"{url}/subjects/{subject}/versions/latest/schema")[2] == "string"
    status, _, body = call(f"{url}/subjects/{subject}/versions/first")
    assert (status, body["error_code"]) == (422, 42202)


def test_soft_delete_subject(stack, client, unique):
    subject = unique("del")
    schema_id = client.register_schema(subject, Schema(record_schema("D", "x"), "AVRO"))
    assert client.delete_subject(subject) == [1]
    fresh = fresh_client(stack.registry_url)
    assert subject not in fresh.get_subjects()
    assert json.loads(fresh.get_schema(schema_id).schema_str)["name"] == "D"  # ids stay readable


def test_avro_serializer_round_trip(stack, client, unique):
    topic = unique("playback.listens")
    schema = json.dumps(
        {
            "type": "record",
            "name": "ListenRecorded",
            "namespace": "backbeat.test",
            "fields": [
                {"name": "user_id", "type": "string"},
                {"name": "ms_played", "type": "long"},
                {"name": "at", "type": {"type": "long", "logicalType": "timestamp-millis"}},
            ],
        }
    )
    serializer = AvroSerializer(client, schema)
    ctx = SerializationContext(topic, MessageField.VALUE)
    value = {"user_id": "u1", "ms_played": 1234, "at": 1_700_000_000_000}
    payload = serializer(value, ctx)
    assert payload[0] == 0
    schema_id = int.from_bytes(payload[1:5], "big")
    assert fresh_client(stack.registry_url).get_latest_version(f"{topic}-value").schema_id == schema_id

    deserializer = AvroDeserializer(fresh_client(stack.registry_url))
    decoded = deserializer(payload, ctx)
    assert decoded["user_id"] == "u1" and decoded["ms_played"] == 1234
    assert int(decoded["at"].timestamp() * 1000) == 1_700_000_000_000


def test_schemas_topic_holds_records_and_second_registry_reloads(stack, client, unique, tmp_path):
    subject = unique("persist") + "-backbeat.test.P"
    id1 = client.register_schema(subject, Schema(record_schema("P", "a"), "AVRO"))
    id2 = client.register_schema(subject, Schema(record_schema("P", "a", "b"), "AVRO"))
    assert high_watermarks(stack, "_schemas")[0] >= 2

    second = settings_for(tmp_path, int(stack.bootstrap_servers.rsplit(":", 1)[1]), free_port())
    assert second.bootstrap_servers == stack.bootstrap_servers
    running = start_registry(second)
    try:
        other = fresh_client(second.registry_url)
        assert subject in other.get_subjects()
        assert set(other.get_subjects()) == set(fresh_client(stack.registry_url).get_subjects())
        assert other.get_versions(subject) == [1, 2]
        assert other.get_latest_version(subject).schema_id == id2
        assert json.loads(other.get_schema(id1).schema_str) == json.loads(record_schema("P", "a"))
        # the reloaded instance agrees on ids: re-registering does not create anything new
        assert other.register_schema(subject, Schema(record_schema("P", "a", "b"), "AVRO")) == id2
        assert other.get_versions(subject) == [1, 2]
    finally:
        assert stop(running)
    wait_for(lambda: not _answers(second.registry_url), timeout_s=15, what="second registry to stop")


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/subjects", timeout=1):
            return True
    except OSError:
        return False
