"""Integration tests of the embedded schema registry (events.registry_server) against a real Tansu
broker, through confluent-kafka's own SchemaRegistryClient and Avro serialisers."""

from __future__ import annotations

import http.client
import json
import urllib.parse
import urllib.request

import pytest
from confluent_kafka.schema_registry import (
    ConfigCompatibilityLevel,
    Schema,
    SchemaRegistryClient,
    ServerConfig,
)
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
            # defaults keep adding fields BACKWARD compatible (the registry's default level)
            "fields": [{"name": f, "type": "string", "default": ""} for f in fields],
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
    path = parts.path + (f"?{parts.query}" if parts.query else "")
    try:
        conn.request(method, path, body=data, headers=headers)
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


# -- compatibility ---------------------------------------------------------------------------------


def listen_schema(ms_played: object, *extra: dict) -> str:
    return json.dumps(
        {
            "type": "record",
            "name": "Listen",
            "namespace": "backbeat.test",
            "fields": [
                {"name": "user_id", "type": "string"},
                {"name": "ms_played", "type": ms_played},
                *extra,
            ],
        }
    )


def level(value: str) -> ServerConfig:
    return ServerConfig(compatibility=ConfigCompatibilityLevel(value))


def test_subject_config_endpoints(stack, client, unique):
    subject = unique("cfg") + "-backbeat.test.Listen"
    assert client.get_config().compatibility_level == ConfigCompatibilityLevel.BACKWARD
    with pytest.raises(SchemaRegistryError) as err:
        client.get_config(subject)
    assert (err.value.http_status_code, err.value.error_code) == (404, 40408)
    status, _, body = call(f"{stack.registry_url}/config/{subject}?defaultToGlobal=true")
    assert (status, body) == (200, {"compatibilityLevel": "BACKWARD"})

    assert client.set_config(subject, level("FULL")) == {"compatibility": "FULL"}
    assert fresh_client(stack.registry_url).get_config(subject).compatibility_level.value == "FULL"
    status, _, body = call(f"{stack.registry_url}/config/{subject}?defaultToGlobal=true")
    assert body == {"compatibilityLevel": "FULL"}
    # Confluent's other spelling of the body, and lower case
    status, _, body = call(f"{stack.registry_url}/config/{subject}", "PUT", {"compatibilityLevel": "none"})
    assert (status, body) == (200, {"compatibility": "NONE"})

    status, _, body = call(f"{stack.registry_url}/config/{subject}", "PUT", {"compatibility": "SIDEWAYS"})
    assert (status, body["error_code"]) == (422, 42203)
    status, _, body = call(f"{stack.registry_url}/config", "PUT", {"compatibility": "SIDEWAYS"})
    assert (status, body["error_code"]) == (422, 42203)
    assert call(f"{stack.registry_url}/config")[2] == {"compatibilityLevel": "BACKWARD"}

    assert client.delete_config(subject).compatibility_level.value == "NONE"
    with pytest.raises(SchemaRegistryError) as err:
        client.get_config(subject)
    assert err.value.error_code == 40408
    status, _, body = call(f"{stack.registry_url}/config/{subject}", "DELETE")
    assert (status, body["error_code"]) == (404, 40408)


def test_global_config_round_trip(stack, client):
    try:
        assert client.set_config(config=level("FORWARD_TRANSITIVE")) == {
            "compatibility": "FORWARD_TRANSITIVE"
        }
        assert client.get_config().compatibility_level.value == "FORWARD_TRANSITIVE"
    finally:
        client.delete_config()  # back to the default, for the other tests of the session
    assert client.get_config().compatibility_level.value == "BACKWARD"


def test_incompatible_schema_is_refused_with_409(stack, client, unique):
    subject = unique("compat") + "-backbeat.test.Listen"
    v1 = listen_schema("long")
    client.register_schema(subject, Schema(v1, "AVRO"))
    breaking = Schema(listen_schema("int"), "AVRO")  # BACKWARD: int cannot read long

    assert client.test_compatibility(subject, breaking) is False
    assert client.test_compatibility(subject, breaking, version=1) is False
    assert client.test_compatibility_all_versions(subject, breaking) is False
    assert client.test_compatibility(subject, Schema(listen_schema(["null", "long"]), "AVRO")) is True
    status, _, body = call(
        f"{stack.registry_url}/compatibility/subjects/{subject}/versions/latest?verbose=true",
        "POST",
        {"schema": breaking.schema_str},
    )
    assert status == 200 and body["is_compatible"] is False
    assert len(body["messages"]) == 1 and "field 'ms_played'" in body["messages"][0]

    with pytest.raises(SchemaRegistryError) as err:
        fresh_client(stack.registry_url).register_schema(subject, breaking)
    assert (err.value.http_status_code, err.value.error_code) == (409, 409)
    assert "incompatible with an earlier schema" in err.value.error_message
    assert "'ms_played'" in err.value.error_message and "'int'" in err.value.error_message
    assert client.get_versions(subject) == [1]

    # the subject's own level wins over the global one
    client.set_config(subject, level("NONE"))
    assert client.test_compatibility(subject, breaking) is True
    assert fresh_client(stack.registry_url).register_schema(subject, breaking) >= 1
    assert client.get_versions(subject) == [1, 2]


def test_compatibility_errors_and_unknown_subjects(stack, client, unique):
    url = stack.registry_url
    subject = unique("compat-err")
    schema = listen_schema("long")
    # latest of an unknown subject is compatible (nothing to break), a numbered version is not found
    status, _, body = call(
        f"{url}/compatibility/subjects/{subject}/versions/latest", "POST", {"schema": schema}
    )
    assert (status, body) == (200, {"is_compatible": True})
    status, _, body = call(f"{url}/compatibility/subjects/{subject}/versions", "POST", {"schema": schema})
    assert (status, body) == (200, {"is_compatible": True})
    status, _, body = call(f"{url}/compatibility/subjects/{subject}/versions/1", "POST", {"schema": schema})
    assert (status, body["error_code"]) == (404, 40401)
    client.register_schema(subject, Schema(schema, "AVRO"))
    status, _, body = call(f"{url}/compatibility/subjects/{subject}/versions/5", "POST", {"schema": schema})
    assert (status, body["error_code"]) == (404, 40402)
    status, _, body = call(f"{url}/compatibility/subjects/{subject}/versions/x", "POST", {"schema": schema})
    assert (status, body["error_code"]) == (422, 42202)
    status, _, body = call(f"{url}/compatibility/subjects/{subject}/versions/1", "POST", {"schema": "{no"})
    assert (status, body["error_code"]) == (422, 42201)


def test_transitive_levels_check_every_version(stack, client, unique):
    subject = unique("trans") + "-backbeat.test.Listen"
    client.register_schema(subject, Schema(listen_schema("long"), "AVRO"))
    age = {"name": "age", "type": "int", "default": 0}
    client.register_schema(subject, Schema(listen_schema("long", age), "AVRO"))
    # age without default: reads v2's data (age present), not v1's
    v3 = Schema(listen_schema("long", {"name": "age", "type": "int"}), "AVRO")
    assert client.test_compatibility_all_versions(subject, v3) is True
    assert client.test_compatibility(subject, v3, version=2) is True
    assert client.test_compatibility(subject, v3, version=1) is False

    client.set_config(subject, level("BACKWARD_TRANSITIVE"))
    assert client.test_compatibility_all_versions(subject, v3) is False
    with pytest.raises(SchemaRegistryError) as err:
        client.register_schema(subject, v3)
    assert (err.value.http_status_code, err.value.error_code) == (409, 409)
    assert "field 'age'" in err.value.error_message
    client.set_config(subject, level("BACKWARD"))
    assert client.register_schema(subject, v3) >= 1
    assert client.get_versions(subject) == [1, 2, 3]


def test_config_survives_a_registry_restart(stack, client, unique, tmp_path):
    subject = unique("cfg-persist") + "-backbeat.test.Listen"
    dropped = unique("cfg-dropped")
    client.register_schema(subject, Schema(listen_schema("long"), "AVRO"))
    client.set_config(subject, level("FULL_TRANSITIVE"))
    client.set_config(dropped, level("FORWARD"))
    client.delete_config(dropped)

    second = settings_for(tmp_path, int(stack.bootstrap_servers.rsplit(":", 1)[1]), free_port())
    try:
        client.set_config(config=level("NONE"))
        running = start_registry(second)
        try:
            other = fresh_client(second.registry_url)
            assert other.get_config(subject).compatibility_level.value == "FULL_TRANSITIVE"
            assert other.get_config().compatibility_level.value == "NONE"
            with pytest.raises(SchemaRegistryError) as err:
                other.get_config(dropped)
            assert err.value.error_code == 40408
            # the reloaded level is enforced: FULL refuses the int change the global NONE would allow
            with pytest.raises(SchemaRegistryError) as err:
                other.register_schema(subject, Schema(listen_schema("int"), "AVRO"))
            assert err.value.error_code == 409 and "ms_played" in err.value.error_message
        finally:
            assert stop(running)
    finally:
        client.delete_config()
    wait_for(lambda: not _answers(second.registry_url), timeout_s=15, what="second registry to stop")
    assert client.get_config().compatibility_level.value == "BACKWARD"
