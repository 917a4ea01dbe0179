"""Schema compatibility verdicts for the registry and ``backbeat schemas check`` (pure, no I/O).

The verdicts come from the Apache ``avro`` package's checker
(:class:`avro.compatibility.ReaderWriterCompatibilityChecker`, a port of Java Avro's
``SchemaCompatibility``), as docs/design.md §3 requires; this module only chooses which
(reader, writer) pairs a level asks for and turns the checker's incompatibilities into readable
messages that name the offending field.

Levels (Confluent's, https://docs.confluent.io/platform/current/schema-registry/fundamentals/
schema-evolution.html):

* ``BACKWARD``: the new schema can read data written with the latest existing one
  (reader = new, writer = old); ``FORWARD``: the latest existing schema can read data written
  with the new one (reader = old, writer = new); ``FULL``: both;
* the ``*_TRANSITIVE`` variants check against every existing schema, not only the latest;
* ``NONE``: no check.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import avro.errors
import avro.schema
from avro.compatibility import (
    ReaderWriterCompatibilityChecker,
    SchemaCompatibilityResult,
    SchemaCompatibilityType,
    lookup_writer_field,
)
from avro.schema import (
    ArraySchema,
    EnumSchema,
    FixedSchema,
    MapSchema,
    NamedSchema,
    RecordSchema,
    Schema,
    UnionSchema,
)

from infra.errors import SchemaError

#: Confluent's compatibility levels.
LEVELS = (
    "BACKWARD",
    "BACKWARD_TRANSITIVE",
    "FORWARD",
    "FORWARD_TRANSITIVE",
    "FULL",
    "FULL_TRANSITIVE",
    "NONE",
)
#: The level of a registry that was never configured (Confluent's default).
DEFAULT_LEVEL = "BACKWARD"


def validate_level(level: str) -> str:
    """``level`` in upper case, if it is one of :data:`LEVELS` (case-insensitive).

    Raises:
        SchemaError: not a known level.
    """
    upper = level.upper() if isinstance(level, str) else ""
    if upper not in LEVELS:
        raise SchemaError(f"unknown compatibility level {level!r}; valid levels are {', '.join(LEVELS)}")
    return upper


def parse(schema: str) -> Schema:
    """``schema`` (Avro JSON text) parsed by the Apache ``avro`` package.

    Raises:
        SchemaError: not JSON or not a valid Avro schema.
    """
    try:
        return avro.schema.parse(schema)
    except (avro.errors.AvroException, ValueError, TypeError, KeyError, AttributeError) as exc:
        raise SchemaError(f"invalid Avro schema {_shorten(schema)}: {exc}") from exc


def check(new_schema: str, existing: Sequence[str], level: str) -> list[str]:
    """The problems that stop ``new_schema`` from following ``existing`` at ``level`` (empty
    list = compatible).

    ``existing`` are the subject's schemas, oldest first. Non-transitive levels compare with the
    last one only, transitive levels with every one. Each problem names the field and the
    checker's location, e.g. ``field 'ms_played': reader's type 'int' does not match writer's
    'long' (at /fields/6/type; new schema reading data of existing schema 2 of 2)``.

    Raises:
        SchemaError: ``level`` is unknown, or a schema does not parse.
    """
    level = validate_level(level)
    new = parse(new_schema)
    if level == "NONE" or not existing:
        return []
    olds = [(i, parse(text)) for i, text in enumerate(existing, start=1)]
    if not level.endswith("_TRANSITIVE"):
        olds = olds[-1:]
    base = level.removesuffix("_TRANSITIVE")
    count = len(existing)
    problems: list[str] = []
    for index, old in olds:
        name = f"existing schema {index} of {count}"
        if base in ("BACKWARD", "FULL"):
            problems += reader_writer_problems(new, old, f"new schema reading data of {name}")
        if base in ("FORWARD", "FULL"):
            problems += reader_writer_problems(old, new, f"{name} reading data of the new schema")
    return list(dict.fromkeys(problems))


def reader_writer_problems(reader: Schema, writer: Schema, context: str = "") -> list[str]:
    """The problems a ``reader`` schema has reading data written with ``writer`` (one message per
    incompatibility the checker reports, sorted by location); ``context`` is added to each."""
    result = _LocatingChecker().get_compatibility(reader, writer)
    if result.compatibility is not SchemaCompatibilityType.incompatible:
        return []
    suffix = f"; {context}" if context else ""
    out = []
    for location in sorted(result.locations, key=_location_order):
        try:
            text = _explain(reader, writer, location)
        except (IndexError, AttributeError, ValueError, TypeError, KeyError):
            # a location we cannot walk (the checker memoises by schema pair, so a type used twice
            # reports the first place it met): fall back to the checker's own words
            text = "; ".join(sorted(result.messages))
        if text:
            out.append(f"{text} (at {location}{suffix})")
    if not out:  # never hide an incompatible verdict behind an empty list
        out.append(f"{'; '.join(sorted(result.messages))} (at {', '.join(sorted(result.locations))}{suffix})")
    return out


class _LocatingChecker(ReaderWriterCompatibilityChecker):
    """The Apache checker, with one fix to where it reports problems: when it compares a reader
    against each branch of a writer union (and for union branches generally) it calls
    :meth:`get_compatibility` without a location, so problems found there would be reported at
    ``/`` instead of at the field. Here such calls inherit the location of the node being
    compared. Verdicts are unchanged."""

    def __init__(self) -> None:
        super().__init__()
        self._at: list[list[str]] = []

    def get_compatibility(
        self,
        reader: Schema,
        writer: Schema,
        reference_token: str = ReaderWriterCompatibilityChecker.ROOT_REFERENCE_TOKEN,
        location: list[str] | None = None,
    ) -> SchemaCompatibilityResult:
        if location is None and self._at:
            here = self._at[-1]
            location, reference_token = here[:-1], here[-1]
        return super().get_compatibility(reader, writer, reference_token, location)

    def calculate_compatibility(
        self, reader: Schema, writer: Schema, location: list[str]
    ) -> SchemaCompatibilityResult:
        self._at.append(location)
        try:
            return super().calculate_compatibility(reader, writer, location)
        finally:
            self._at.pop()


# -- messages ---------------------------------------------------------------------------------


def _location_order(location: str) -> list[Any]:
    return [(0, int(t)) if t.isdigit() else (1, t) for t in location.split("/") if t]


def _shorten(text: str, limit: int = 80) -> str:
    text = text if isinstance(text, str) else repr(text)
    return repr(text if len(text) <= limit else text[: limit - 1] + "…")


def _name(schema: Schema | None) -> str:
    """A short type name: ``long``, ``ns.Rec``, ``array<string>``, ``[null, long]``."""
    if schema is None:
        return "nothing"
    if isinstance(schema, UnionSchema):
        return "[" + ", ".join(_name(s) for s in schema.schemas) + "]"
    if isinstance(schema, ArraySchema):
        return f"array<{_name(schema.items)}>"
    if isinstance(schema, MapSchema):
        return f"map<{_name(schema.values)}>"
    if isinstance(schema, NamedSchema):
        return schema.fullname
    logical = schema.props.get("logicalType")
    return f"{schema.type} ({logical})" if logical else str(schema.type)


def _kind(schema: Schema) -> str:
    if isinstance(schema, (RecordSchema, EnumSchema, FixedSchema)):
        return f"{schema.type} '{_name(schema)}'"
    return f"'{_name(schema)}'"


def _like(reader: Schema, writer: Schema | None) -> Schema | None:
    """The branch of a writer union the checker compares a non-union ``reader`` with when it
    descends (same type, same name for named types); ``writer`` itself otherwise."""
    if not isinstance(writer, UnionSchema) or isinstance(reader, UnionSchema):
        return writer
    same = [s for s in writer.schemas if s.type == reader.type]
    if isinstance(reader, NamedSchema):
        named = [s for s in same if isinstance(s, NamedSchema) and s.name == reader.name]
        same = named or same
    return same[0] if same else writer


def _explain(reader: Schema, writer: Schema, location: str) -> str | None:
    """``<where>: <what>`` for one incompatibility location reported by the checker, or ``None``
    when the location holds no problem of its own."""
    tokens = [t for t in location.split("/") if t]
    r: Schema = reader
    w: Schema | None = writer
    label = ""
    i = 0
    while i < len(tokens):
        token = tokens[i]
        w = _like(r, w)
        if token == "fields":
            field = r.fields[int(tokens[i + 1])]  # type: ignore[attr-defined]
            label = f"{label}.{field.name}" if label else field.name
            writer_field = (
                lookup_writer_field(writer_schema=w, reader_field=field)
                if isinstance(w, RecordSchema)
                else None
            )
            if writer_field is None:
                return (
                    f"{_where(label)}: reader's field has no default value and the writer has no "
                    "field of that name (or alias)"
                )
            r, w = field.type, writer_field.type
            i += 3 if i + 2 < len(tokens) and tokens[i + 2] == "type" else 2
            continue
        if token == "items":
            r, w = r.items, getattr(w, "items", None)  # type: ignore[attr-defined]
            label += "[]"
        elif token == "values":
            r, w = r.values, getattr(w, "values", None)  # type: ignore[attr-defined]
            label += "{}"
        elif token == "symbols":
            missing = sorted(set(w.symbols) - set(r.symbols))  # type: ignore[union-attr]
            return (
                f"{_where(label)}: reader's enum '{_name(r)}' lacks the writer's symbol(s) "
                f"{', '.join(missing)} and has no default symbol"
            )
        elif token == "name":
            return (
                f"{_where(label)}: reader's name '{_name(r)}' does not match writer's "
                f"'{_name(w)}' (nor is it among the reader's aliases)"
            )
        elif token == "size":
            return (
                f"{_where(label)}: reader's fixed size {r.size} does not match writer's "  # type: ignore[attr-defined]
                f"{w.size}"  # type: ignore[union-attr]
            )
        elif token.isdigit() and isinstance(w, UnionSchema):
            branch = w.schemas[int(token)]
            return (
                f"{_where(label)}: reader's type {_kind(r)} has no branch for the writer's "
                f"union branch {_kind(branch)}"
            )
        else:
            raise ValueError(f"unexpected location token {token!r}")
        i += 1
    if not _incompatible(r, w) or (r.type == getattr(w, "type", None) and r.type != "union"):
        # the checker also reports "/" for an incompatible result merged with a compatible one;
        # equal non-union types only have problems deeper down, reported at their own location
        return None
    if isinstance(r, UnionSchema):
        return f"{_where(label)}: reader's union {_kind(r)} has no branch for the writer's type {_kind(w)}"
    if isinstance(w, UnionSchema):
        bad = [s for s in w.schemas if _incompatible(r, s)]
        return (
            f"{_where(label)}: reader's type {_kind(r)} cannot read the writer's union {_kind(w)} "
            f"(branch {', '.join(_kind(s) for s in bad)})"
        )
    return f"{_where(label)}: reader's type {_kind(r)} does not match writer's {_kind(w)}"


def _incompatible(reader: Schema, writer: Schema | None) -> bool:
    return writer is None or (
        ReaderWriterCompatibilityChecker().get_compatibility(reader, writer).compatibility
        is SchemaCompatibilityType.incompatible
    )


def _where(label: str) -> str:
    return f"field '{label}'" if label else "schema"


__all__ = [
    "DEFAULT_LEVEL",
    "LEVELS",
    "check",
    "parse",
    "reader_writer_problems",
    "validate_level",
]
