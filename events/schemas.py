"""Load and validate the Avro schemas under ``schemas/`` (one ``.avsc`` per event type).

A schema's *full name* (``backbeat.playback.ListenRecorded``) identifies the event type; its
subject in the registry follows the TopicRecordNameStrategy, ``<topic>-<full name>``
(Confluent docs, "Subject name strategy"), because several event types may share a topic.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import fastavro

from events.serde import plain_times
from infra.errors import SchemaError
from infra.resources import SCHEMAS_DIR


@dataclass(frozen=True)
class EventSchema:
    """One event type: ``full_name`` (namespace.Name), ``context`` (the folder), the raw JSON
    text as written (``canonical``: compact JSON used for registration), the parsed fastavro
    schema (``parsed``) and the file it came from."""

    full_name: str
    context: str
    raw: dict[str, Any]
    parsed: dict[str, Any]
    path: Path

    @property
    def parsed_plain(self) -> dict[str, Any]:
        """The parsed schema with time logical types removed: decodes times as ms (ints)."""
        return fastavro.parse_schema(plain_times(self.raw))

    @property
    def name(self) -> str:
        """The short record name (``ListenRecorded``)."""
        return self.full_name.rsplit(".", 1)[-1]

    @property
    def schema_str(self) -> str:
        """The schema as compact JSON text, as sent to the registry."""
        return json.dumps(self.raw, separators=(",", ":"), sort_keys=False)


def load_schema_file(path: Path) -> EventSchema:
    """Parse one ``.avsc`` file.

    Raises:
        SchemaError: the file is not JSON, not a valid Avro record schema, or its name does not
            match its file name.
    """
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise SchemaError(f"{path}: cannot read schema: {exc}") from exc
    try:
        parsed = fastavro.parse_schema(raw)
    except Exception as exc:  # fastavro raises several exception types
        raise SchemaError(f"{path}: invalid Avro schema: {exc}") from exc
    if raw.get("type") != "record" or raw.get("name") != path.stem:
        raise SchemaError(f"{path}: must hold one record named {path.stem!r}")
    full_name = f"{raw['namespace']}.{raw['name']}" if raw.get("namespace") else raw["name"]
    return EventSchema(full_name, path.parent.name, raw, parsed, path)


def read_schemas(root: Path) -> dict[str, EventSchema]:
    """All schemas under ``root`` (``root/<context>/<Name>.avsc``), keyed by full name, read
    from disk now (see :func:`load_schemas` for the cached tree of this checkout).

    Raises:
        SchemaError: a file is invalid or two files declare the same full name.
    """
    found: dict[str, EventSchema] = {}
    for path in sorted(root.glob("*/*.avsc")):
        schema = load_schema_file(path)
        if schema.full_name in found:
            raise SchemaError(f"{path}: {schema.full_name} also in {found[schema.full_name].path}")
        found[schema.full_name] = schema
    return found


@lru_cache(maxsize=4)
def load_schemas(root: Path = SCHEMAS_DIR) -> dict[str, EventSchema]:
    """All schemas under ``root``, keyed by full name, read once per process.

    Raises:
        SchemaError: a file is invalid or two files declare the same full name.
    """
    return read_schemas(root)


def get_schema(full_name_or_name: str) -> EventSchema:
    """Look a schema up by full name or by short record name.

    Raises:
        SchemaError: no such schema, or the short name is ambiguous.
    """
    schemas = load_schemas()
    if full_name_or_name in schemas:
        return schemas[full_name_or_name]
    matches = [s for s in schemas.values() if s.name == full_name_or_name]
    if len(matches) == 1:
        return matches[0]
    known = ", ".join(sorted(schemas))
    raise SchemaError(f"unknown event type {full_name_or_name!r}; known: {known}")


def subject_for(topic: str, full_name: str) -> str:
    """The registry subject of ``full_name`` on ``topic`` (TopicRecordNameStrategy)."""
    return f"{topic}-{full_name}"
