"""Unit tests of the embedded registry's pure state (events.registry_state)."""

from __future__ import annotations

import json

import pytest

from events.registry_state import (
    ConfigRecord,
    IncompatibleSchemaError,
    InvalidCompatibilityLevelError,
    InvalidSchemaError,
    InvalidVersionError,
    RegistryState,
    SchemaNotFoundError,
    SchemaRecord,
    SubjectNotFoundError,
    VersionNotFoundError,
    decode_config,
    decode_record,
    encode_config,
    encode_record,
    normalise,
)

USER_V1 = json.dumps(
    {"type": "record", "name": "User", "namespace": "t", "fields": [{"name": "id", "type": "string"}]}
)
USER_V2 = json.dumps(
    {
        "type": "record",
        "name": "User",
        "namespace": "t",
        "fields": [{"name": "id", "type": "string"}, {"name": "age", "type": "int", "default": 0}],
    }
)


def register(state: RegistryState, subject: str, schema: str) -> int:
    """What the server does: plan, 'write', apply."""
    plan = state.plan_register(subject, schema)
    if plan.record is not None:
        state.apply(plan.record)
    return plan.id


def test_first_schema_gets_id_1_and_version_1():
    state = RegistryState()
    assert register(state, "s", USER_V1) == 1
    assert state.versions("s") == [1]
    assert state.get_version("s", 1) == SchemaRecord("s", 1, 1, USER_V1)


def test_same_schema_same_subject_is_idempotent():
    state = RegistryState()
    first = register(state, "s", USER_V1)
    plan = state.plan_register("s", USER_V1)
    assert plan.record is None and plan.existing is not None
    assert register(state, "s", USER_V1) == first
    assert state.versions("s") == [1]


def test_whitespace_and_key_order_do_not_matter():
    state = RegistryState()
    first = register(state, "s", USER_V1)
    spaced = (
        '{ "fields" : [ {"type": "string", "name": "id"} ],\n  "namespace": "t", "name": "User",'
        ' "type": "record" }'
    )
    assert register(state, "s", spaced) == first
    assert state.versions("s") == [1]
    assert state.lookup("s", spaced).id == first


def test_same_schema_in_two_subjects_shares_the_id():
    state = RegistryState()
    a = register(state, "a", USER_V1)
    b = register(state, "b", USER_V1)
    assert a == b
    assert state.versions("b") == [1]
    assert state.versions_of_id(a) == [("a", 1), ("b", 1)]


def test_new_schema_gets_new_id_and_version():
    state = RegistryState()
    register(state, "s", USER_V1)
    assert register(state, "s", USER_V2) == 2
    assert state.versions("s") == [1, 2]
    assert state.get_version("s", "latest").id == 2
    assert state.get_version("s", -1).version == 2
    assert state.get_version("s", "1").id == 1
    # going back to v1 in the same subject: v1 is still a live version, so nothing new
    assert register(state, "s", USER_V1) == 1
    assert state.versions("s") == [1, 2]


def test_ids_are_global_max_plus_one():
    state = RegistryState()
    register(state, "a", USER_V1)
    assert register(state, "b", '"string"') == 2
    assert register(state, "a", USER_V2) == 3


def test_defaults_and_logical_types_make_schemas_different():
    with_default = json.dumps(
        {"type": "record", "name": "R", "fields": [{"name": "x", "type": "int", "default": 1}]}
    )
    without = json.dumps({"type": "record", "name": "R", "fields": [{"name": "x", "type": "int"}]})
    assert normalise(with_default) != normalise(without)
    assert normalise('{"type":"long","logicalType":"timestamp-millis"}') != normalise('"long"')


def test_lookup():
    state = RegistryState()
    register(state, "s", USER_V1)
    register(state, "s", USER_V2)
    rec = state.lookup("s", USER_V2)
    assert (rec.subject, rec.version, rec.id) == ("s", 2, 2)
    with pytest.raises(SchemaNotFoundError) as err:
        state.lookup("s", '"string"')
    assert err.value.error_code == 40403
    with pytest.raises(SubjectNotFoundError) as err2:
        state.lookup("nope", USER_V1)
    assert err2.value.error_code == 40401 and err2.value.http_status == 404


def test_unknown_ids_subjects_versions():
    state = RegistryState()
    register(state, "s", USER_V1)
    with pytest.raises(SchemaNotFoundError) as err:
        state.schema_by_id(7)
    assert (err.value.error_code, err.value.http_status, str(err.value)) == (40403, 404, "Schema 7 not found")
    with pytest.raises(SubjectNotFoundError):
        state.versions("other")
    with pytest.raises(VersionNotFoundError) as verr:
        state.get_version("s", 5)
    assert verr.value.error_code == 40402
    with pytest.raises(InvalidVersionError) as ierr:
        state.get_version("s", "first")
    assert ierr.value.error_code == 42202
    assert state.subjects() == ["s"]


@pytest.mark.parametrize(
    "bad",
    ["not json", '{"type": "recrd", "name": "X"}', '{"type": "record", "name": "X"}', ""],
)
def test_invalid_schemas_are_42201(bad):
    state = RegistryState()
    with pytest.raises(InvalidSchemaError) as err:
        state.plan_register("s", bad)
    assert err.value.error_code == 42201 and err.value.http_status == 422
    assert state.subjects() == []


def test_non_avro_schema_type_is_refused():
    with pytest.raises(InvalidSchemaError, match="PROTOBUF"):
        RegistryState().plan_register("s", 'syntax = "proto3";', "PROTOBUF")


def test_soft_delete_hides_subject_but_keeps_id_and_numbering():
    state = RegistryState()
    register(state, "s", USER_V1)
    for rec in state.plan_delete_subject("s"):
        state.apply(rec)
    assert state.subjects() == [] and state.subjects(deleted=True) == ["s"]
    assert state.schema_by_id(1) == USER_V1
    with pytest.raises(SubjectNotFoundError):
        state.versions("s")
    # re-registering after a soft delete gets a new version, same id
    assert register(state, "s", USER_V1) == 1
    assert state.versions("s") == [2]


def test_records_round_trip_and_last_value_wins():
    rec = SchemaRecord("s", 1, 1, USER_V1)
    key, value = encode_record(rec)
    assert json.loads(key) == {"keytype": "SCHEMA", "subject": "s", "version": 1, "magic": 1}
    assert json.loads(value) == {"subject": "s", "version": 1, "id": 1, "schema": USER_V1, "deleted": False}
    assert decode_record(key, value) == ("s", 1, rec)
    assert decode_record(key, None) == ("s", 1, None)
    assert decode_record(b'{"keytype":"NOOP","magic":0}', b"") is None
    assert decode_record(b"junk", b"junk") is None

    state = RegistryState()
    state.apply(rec)
    state.apply(SchemaRecord("s", 1, 1, USER_V1, deleted=True))
    assert state.subjects() == []
    state.remove("s", 1)
    assert state.subjects(deleted=True) == []
    assert state.schema_by_id(1) == USER_V1


# -- compatibility levels ------------------------------------------------------------------------

USER_V3_BREAKING = json.dumps(
    {
        "type": "record",
        "name": "User",
        "namespace": "t",
        "fields": [{"name": "id", "type": "string"}, {"name": "age", "type": "string"}],
    }
)


def test_levels_default_global_and_per_subject():
    state = RegistryState()
    assert state.global_level() == "BACKWARD" and state.subject_level("s") is None
    assert state.level_of("s") == "BACKWARD"
    state.apply_config(ConfigRecord(None, "full"))
    state.apply_config(ConfigRecord("s", "NONE"))
    assert (state.global_level(), state.level_of("s"), state.level_of("t")) == ("FULL", "NONE", "FULL")
    state.apply_config(ConfigRecord("s", None))
    state.apply_config(ConfigRecord(None, None))
    assert state.level_of("s") == "BACKWARD" and state.subject_level("s") is None
    with pytest.raises(InvalidCompatibilityLevelError) as err:
        state.apply_config(ConfigRecord(None, "SIDEWAYS"))
    assert (err.value.http_status, err.value.error_code) == (422, 42203)


def test_incompatible_registration_is_409_and_names_the_field():
    state = RegistryState()
    register(state, "s", USER_V1)
    register(state, "s", USER_V2)
    with pytest.raises(IncompatibleSchemaError) as err:
        state.plan_register("s", USER_V3_BREAKING)
    assert (err.value.http_status, err.value.error_code) == (409, 409)
    assert "incompatible with an earlier schema" in str(err.value) and "'age'" in str(err.value)
    assert state.versions("s") == [1, 2]
    # already-registered schemas are answered without a check; NONE lets anything in
    assert register(state, "s", USER_V1) == 1
    state.apply_config(ConfigRecord("s", "NONE"))
    assert register(state, "s", USER_V3_BREAKING) == 3


def test_check_compatibility_against_one_version_or_all():
    state = RegistryState()
    register(state, "s", USER_V1)
    register(state, "s", USER_V2)
    required_age = json.dumps(
        {"type": "record", "name": "User", "namespace": "t", "fields": [{"name": "age", "type": "int"}]}
    )
    assert state.check_compatibility("s", required_age) == []  # BACKWARD: latest only
    assert state.check_compatibility("s", required_age, "latest") == []
    assert state.check_compatibility("s", required_age, 1) != []
    state.apply_config(ConfigRecord("s", "BACKWARD_TRANSITIVE"))
    assert any("'age'" in p for p in state.check_compatibility("s", required_age))
    assert state.check_compatibility("unknown", required_age, "latest") == []
    with pytest.raises(SubjectNotFoundError):
        state.check_compatibility("unknown", required_age, 1)
    with pytest.raises(VersionNotFoundError):
        state.check_compatibility("s", required_age, 7)
    with pytest.raises(InvalidSchemaError):
        state.check_compatibility("s", "not json")


def test_soft_deleted_versions_are_not_checked():
    state = RegistryState()
    register(state, "s", USER_V1)
    for rec in state.plan_delete_subject("s"):
        state.apply(rec)
    incompatible = json.dumps({"type": "record", "name": "User", "namespace": "t",
                               "fields": [{"name": "id", "type": "int"}]})  # fmt: skip
    assert register(state, "s", incompatible) == 2


def test_config_records_round_trip():
    key, value = encode_config(ConfigRecord("s", "FULL"))
    assert json.loads(key) == {"keytype": "CONFIG", "subject": "s", "magic": 0}
    assert json.loads(value) == {"compatibilityLevel": "FULL"}
    assert decode_config(key, value) == ConfigRecord("s", "FULL")
    gkey, gvalue = encode_config(ConfigRecord(None, "NONE"))
    assert json.loads(gkey) == {"keytype": "CONFIG", "subject": None, "magic": 0}
    assert decode_config(gkey, gvalue) == ConfigRecord(None, "NONE")
    tkey, tvalue = encode_config(ConfigRecord("s", None))
    assert tvalue is None and decode_config(tkey, None) == ConfigRecord("s", None)
    # config records are not schema records and vice versa; junk is skipped
    assert decode_record(key, value) is None
    assert decode_config(*encode_record(SchemaRecord("s", 1, 1, USER_V1))) is None
    assert decode_config(key, b'{"compatibilityLevel": "SIDEWAYS"}') is None
    assert decode_config(b"junk", b"junk") is None
