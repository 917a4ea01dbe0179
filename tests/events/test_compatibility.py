"""Verdicts of events.compatibility.check (pure): a table of schema changes, each judged under
BACKWARD (new reads old), FORWARD (old reads new) and FULL (both), plus transitive levels over
three versions, NONE, and errors."""

from __future__ import annotations

import json
from typing import Any

import pytest

from events.compatibility import LEVELS, check
from infra.errors import SchemaError

OK, BAD = True, False


def rec(*fields: dict[str, Any], name: str = "R") -> str:
    return json.dumps({"type": "record", "name": name, "namespace": "t", "fields": list(fields)})


def f(name: str, type_: Any, **extra: Any) -> dict[str, Any]:
    return {"name": name, "type": type_, **extra}


ID = f("id", "string")


def enum(*symbols: str, **extra: Any) -> dict[str, Any]:
    return {"type": "enum", "name": "Kind", "symbols": list(symbols), **extra}


def inner(*fields: dict[str, Any]) -> dict[str, Any]:
    return {"type": "record", "name": "Inner", "fields": list(fields)}


# (case id, old schema, new schema, {level: compatible?}, text every problem must contain)
CHANGES: list[tuple[str, str, str, dict[str, bool], str]] = [
    # fields added / removed
    ("add field with default", rec(ID), rec(ID, f("age", "int", default=0)),
     {"BACKWARD": OK, "FORWARD": OK, "FULL": OK}, "age"),
    ("add field without default", rec(ID), rec(ID, f("age", "int")),
     {"BACKWARD": BAD, "FORWARD": OK, "FULL": BAD}, "field 'age'"),
    ("remove field with default", rec(ID, f("age", "int", default=0)), rec(ID),
     {"BACKWARD": OK, "FORWARD": OK, "FULL": OK}, "age"),
    ("remove field without default", rec(ID, f("age", "int")), rec(ID),
     {"BACKWARD": OK, "FORWARD": BAD, "FULL": BAD}, "field 'age'"),
    # numeric promotions (int -> long -> float -> double) and demotions
    ("int to long", rec(f("ms_played", "int")), rec(f("ms_played", "long")),
     {"BACKWARD": OK, "FORWARD": BAD, "FULL": BAD}, "field 'ms_played'"),
    ("long to float", rec(f("ms_played", "long")), rec(f("ms_played", "float")),
     {"BACKWARD": OK, "FORWARD": BAD, "FULL": BAD}, "field 'ms_played'"),
    ("float to double", rec(f("score", "float")), rec(f("score", "double")),
     {"BACKWARD": OK, "FORWARD": BAD, "FULL": BAD}, "field 'score'"),
    ("int to double", rec(f("score", "int")), rec(f("score", "double")),
     {"BACKWARD": OK, "FORWARD": BAD, "FULL": BAD}, "field 'score'"),
    ("long to int", rec(f("ms_played", "long")), rec(f("ms_played", "int")),
     {"BACKWARD": BAD, "FORWARD": OK, "FULL": BAD}, "field 'ms_played'"),
    ("double to float", rec(f("score", "double")), rec(f("score", "float")),
     {"BACKWARD": BAD, "FORWARD": OK, "FULL": BAD}, "field 'score'"),
    # string <-> bytes, and an unrelated type
    ("string to bytes", rec(f("blob", "string")), rec(f("blob", "bytes")),
     {"BACKWARD": OK, "FORWARD": OK, "FULL": OK}, "blob"),
    ("bytes to string", rec(f("blob", "bytes")), rec(f("blob", "string")),
     {"BACKWARD": OK, "FORWARD": OK, "FULL": OK}, "blob"),
    ("string to int", rec(f("track_id", "string")), rec(f("track_id", "int")),
     {"BACKWARD": BAD, "FORWARD": BAD, "FULL": BAD}, "field 'track_id'"),
    # enums, without and with an enum default symbol
    ("enum symbol added", rec(f("kind", enum("A", "B"))), rec(f("kind", enum("A", "B", "C"))),
     {"BACKWARD": OK, "FORWARD": BAD, "FULL": BAD}, "field 'kind'"),
    ("enum symbol removed", rec(f("kind", enum("A", "B"))), rec(f("kind", enum("A"))),
     {"BACKWARD": BAD, "FORWARD": OK, "FULL": BAD}, "field 'kind'"),
    ("enum symbol added, enum default",
     rec(f("kind", enum("UNKNOWN", "A", default="UNKNOWN"))),
     rec(f("kind", enum("UNKNOWN", "A", "B", default="UNKNOWN"))),
     {"BACKWARD": OK, "FORWARD": OK, "FULL": OK}, "kind"),
    ("enum symbol removed, enum default",
     rec(f("kind", enum("UNKNOWN", "A", "B", default="UNKNOWN"))),
     rec(f("kind", enum("UNKNOWN", "A", default="UNKNOWN"))),
     {"BACKWARD": OK, "FORWARD": OK, "FULL": OK}, "kind"),
    # unions
    ("union branch added", rec(f("tag", ["null", "string"], default=None)),
     rec(f("tag", ["null", "string", "int"], default=None)),
     {"BACKWARD": OK, "FORWARD": BAD, "FULL": BAD}, "field 'tag'"),
    ("union branch removed", rec(f("tag", ["null", "string", "int"], default=None)),
     rec(f("tag", ["null", "string"], default=None)),
     {"BACKWARD": BAD, "FORWARD": OK, "FULL": BAD}, "field 'tag'"),
    ("made nullable", rec(f("ms_played", "long")), rec(f("ms_played", ["null", "long"], default=None)),
     {"BACKWARD": OK, "FORWARD": BAD, "FULL": BAD}, "field 'ms_played'"),
    ("made required", rec(f("ms_played", ["null", "long"], default=None)), rec(f("ms_played", "long")),
     {"BACKWARD": BAD, "FORWARD": OK, "FULL": BAD}, "field 'ms_played'"),
    # renames
    ("renamed with alias", rec(f("user", "string")), rec(f("user_id", "string", aliases=["user"])),
     {"BACKWARD": OK, "FORWARD": BAD, "FULL": BAD}, "field 'user'"),
    ("renamed without alias", rec(f("user", "string")), rec(f("user_id", "string")),
     {"BACKWARD": BAD, "FORWARD": BAD, "FULL": BAD}, "field 'user"),
    ("renamed with alias and default", rec(f("user", "string")),
     rec(f("user_id", "string", aliases=["user"], default="")),
     {"BACKWARD": OK, "FORWARD": BAD, "FULL": BAD}, "field 'user'"),
    # nested records
    ("nested field int to long", rec(f("meta", inner(f("x", "int")))), rec(f("meta", inner(f("x", "long")))),
     {"BACKWARD": OK, "FORWARD": BAD, "FULL": BAD}, "field 'meta.x'"),
    ("nested field added without default", rec(f("meta", inner(f("x", "int")))),
     rec(f("meta", inner(f("x", "int"), f("y", "string")))),
     {"BACKWARD": BAD, "FORWARD": OK, "FULL": BAD}, "field 'meta.y'"),
    ("nested field added with default", rec(f("meta", inner(f("x", "int")))),
     rec(f("meta", inner(f("x", "int"), f("y", "string", default="")))),
     {"BACKWARD": OK, "FORWARD": OK, "FULL": OK}, "meta"),
    # logical types
    ("timestamp-millis added on long", rec(f("occurred_at", "long")),
     rec(f("occurred_at", {"type": "long", "logicalType": "timestamp-millis"})),
     {"BACKWARD": OK, "FORWARD": OK, "FULL": OK}, "occurred_at"),
    ("timestamp-millis long to int", rec(f("occurred_at", {"type": "long", "logicalType": "timestamp-millis"})),
     rec(f("occurred_at", "int")),
     {"BACKWARD": BAD, "FORWARD": OK, "FULL": BAD}, "field 'occurred_at'"),
    # arrays and maps
    ("array items int to long", rec(f("tags", {"type": "array", "items": "int"})),
     rec(f("tags", {"type": "array", "items": "long"})),
     {"BACKWARD": OK, "FORWARD": BAD, "FULL": BAD}, "field 'tags[]'"),
    ("array items string to int", rec(f("tags", {"type": "array", "items": "string"})),
     rec(f("tags", {"type": "array", "items": "int"})),
     {"BACKWARD": BAD, "FORWARD": BAD, "FULL": BAD}, "field 'tags[]'"),
    ("array of records, item field added without default",
     rec(f("items", {"type": "array", "items": inner(f("x", "int"))})),
     rec(f("items", {"type": "array", "items": inner(f("x", "int"), f("y", "int"))})),
     {"BACKWARD": BAD, "FORWARD": OK, "FULL": BAD}, "field 'items[].y'"),
    ("map values float to double", rec(f("props", {"type": "map", "values": "float"})),
     rec(f("props", {"type": "map", "values": "double"})),
     {"BACKWARD": OK, "FORWARD": BAD, "FULL": BAD}, "field 'props{}'"),
    ("map values int to string", rec(f("props", {"type": "map", "values": "int"})),
     rec(f("props", {"type": "map", "values": "string"})),
     {"BACKWARD": BAD, "FORWARD": BAD, "FULL": BAD}, "field 'props{}'"),
    ("array to map", rec(f("tags", {"type": "array", "items": "string"})),
     rec(f("tags", {"type": "map", "values": "string"})),
     {"BACKWARD": BAD, "FORWARD": BAD, "FULL": BAD}, "field 'tags'"),
    # names and fixed sizes
    ("record renamed", rec(ID), rec(ID, name="Other"),
     {"BACKWARD": BAD, "FORWARD": BAD, "FULL": BAD}, "t.Other"),
    ("record renamed with alias", rec(ID), json.dumps({**json.loads(rec(ID, name="Other")), "aliases": ["t.R"]}),
     {"BACKWARD": OK, "FORWARD": BAD, "FULL": BAD}, "t.Other"),
    ("fixed size changed", rec(f("hash", {"type": "fixed", "name": "Hash", "size": 16})),
     rec(f("hash", {"type": "fixed", "name": "Hash", "size": 32})),
     {"BACKWARD": BAD, "FORWARD": BAD, "FULL": BAD}, "field 'hash'"),
]  # fmt: skip

VERDICTS = [
    pytest.param(old, new, level, expected, names, id=f"{case} / {level}")
    for case, old, new, levels, names in CHANGES
    for level, expected in levels.items()
]


@pytest.mark.parametrize(("old", "new", "level", "expected", "names"), VERDICTS)
def test_verdict(old: str, new: str, level: str, expected: bool, names: str) -> None:
    problems = check(new, [old], level)
    assert (not problems) is expected, problems
    for problem in problems:
        assert names in problem, problem
    # FULL is exactly BACKWARD and FORWARD together
    if level == "FULL":
        assert (not problems) == (not check(new, [old], "BACKWARD") and not check(new, [old], "FORWARD"))
    # NONE accepts everything
    assert check(new, [old], "NONE") == []


def test_there_are_enough_verdict_cases() -> None:
    assert len(VERDICTS) >= 30


def test_message_names_field_type_and_location() -> None:
    old = rec(ID, f("ms_played", "long"))
    new = rec(ID, f("ms_played", "int"))
    assert check(new, [old], "BACKWARD") == [
        "field 'ms_played': reader's type 'int' does not match writer's 'long' "
        "(at /fields/1/type; new schema reading data of existing schema 1 of 1)"
    ]
    assert check(old, [new], "FORWARD") == [
        "field 'ms_played': reader's type 'int' does not match writer's 'long' "
        "(at /fields/1/type; existing schema 1 of 1 reading data of the new schema)"
    ]


def test_several_problems_are_all_reported() -> None:
    old = rec(ID, f("kind", enum("A", "B")), f("ms_played", "long"))
    new = rec(ID, f("kind", enum("A")), f("ms_played", "int"), f("age", "int"))
    problems = check(new, [old], "BACKWARD")
    assert len(problems) == 3, problems
    assert "field 'kind': reader's enum 't.Kind' lacks the writer's symbol(s) B" in problems[0]
    assert problems[1].startswith("field 'ms_played'")
    assert problems[2].startswith("field 'age': reader's field has no default value")


# -- transitive levels: three versions, the new one compatible with the latest only -------------

V1 = rec(ID)
V2 = rec(ID, f("age", "int", default=0))
V3_BACKWARD = rec(f("age", "int"))  # reads v2 (age present) but not v1 (age missing, no default)
F1 = rec(ID, f("age", "int"))
F2 = rec(ID, f("age", "int", default=0))
F3 = rec(ID)  # v2 reads it (age has a default), v1 does not


@pytest.mark.parametrize(
    ("existing", "new", "level", "expected"),
    [
        pytest.param([V1, V2], V3_BACKWARD, "BACKWARD", OK, id="backward latest only"),
        pytest.param([V1, V2], V3_BACKWARD, "BACKWARD_TRANSITIVE", BAD, id="backward transitive"),
        pytest.param([F1, F2], F3, "FORWARD", OK, id="forward latest only"),
        pytest.param([F1, F2], F3, "FORWARD_TRANSITIVE", BAD, id="forward transitive"),
        pytest.param([F1, F2], F3, "FULL", OK, id="full latest only"),
        pytest.param([F1, F2], F3, "FULL_TRANSITIVE", BAD, id="full transitive"),
        pytest.param([V1, V2], rec(ID, f("age", "int", default=0), f("x", "string", default="")),
                     "FULL_TRANSITIVE", OK, id="full transitive, defaults everywhere"),
        pytest.param([V2, V1], V3_BACKWARD, "BACKWARD", BAD, id="order matters: latest is last"),
        pytest.param([V1, V2], V3_BACKWARD, "NONE", OK, id="none"),
    ],
)  # fmt: skip
def test_transitive(existing: list[str], new: str, level: str, expected: bool) -> None:
    problems = check(new, existing, level)
    assert (not problems) is expected, problems
    for problem in problems:
        assert "field 'age'" in problem
        if level.endswith("_TRANSITIVE"):
            assert "existing schema 1 of 2" in problem


def test_transitive_reports_each_broken_version() -> None:
    new = rec(f("age", "long"), f("y", "int"))
    problems = check(new, [V1, V2], "BACKWARD_TRANSITIVE")
    assert any("existing schema 1 of 2" in p and "field 'age'" in p for p in problems)
    assert any("existing schema 2 of 2" in p and "field 'y'" in p for p in problems)


def test_none_empty_history_and_level_spelling() -> None:
    assert check(rec(f("x", "int")), [rec(f("x", "string"))], "NONE") == []
    assert check(rec(f("x", "int")), [], "FULL_TRANSITIVE") == []
    assert check(rec(f("x", "int")), [rec(f("x", "string"))], "backward") != []
    assert set(LEVELS) == {"BACKWARD", "BACKWARD_TRANSITIVE", "FORWARD", "FORWARD_TRANSITIVE",
                           "FULL", "FULL_TRANSITIVE", "NONE"}  # fmt: skip


def test_unknown_level_is_a_schema_error() -> None:
    with pytest.raises(SchemaError, match="SIDEWAYS"):
        check(V1, [V1], "SIDEWAYS")


@pytest.mark.parametrize("bad", ["not json", '{"type": "recrd"}', '{"type": "record", "name": "X"}', ""])
def test_unparsable_schemas_are_schema_errors(bad: str) -> None:
    with pytest.raises(SchemaError):
        check(bad, [V1], "BACKWARD")
    with pytest.raises(SchemaError):
        check(V1, [bad], "BACKWARD")
    with pytest.raises(SchemaError):
        check(bad, [], "NONE")
