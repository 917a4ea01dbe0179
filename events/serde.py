"""Confluent wire-format Avro serialisation, in batches, with fastavro.

Wire format (Confluent docs, "Wire format"): byte 0 is the magic byte ``0``, bytes 1-4 the
schema id as a big-endian unsigned 32-bit integer, then the Avro binary encoding of the record.
Logical ``timestamp-millis`` fields are plain ``int`` milliseconds here: records are encoded and
decoded as ms since the epoch (UTC), never as ``datetime``, so hot paths stay cheap.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterable, Sequence
from io import BytesIO
from typing import Any

from fastavro import parse_schema, schemaless_reader, schemaless_writer

try:  # fastavro's compiled record writer; the public schemaless_writer re-parses the schema
    # on every call (about half its cost), so hot paths call the writer it wraps directly.
    from fastavro._write import write_data as _write_data
except ImportError:  # pragma: no cover - pure-Python fastavro builds
    _write_data = None

from infra.errors import DecodeError, SchemaError

MAGIC = 0
_HEADER = struct.Struct(">bI")
HEADER_SIZE = _HEADER.size  # 5 bytes


def frame(schema_id: int) -> bytes:
    """The 5-byte wire-format prefix for ``schema_id``."""
    return _HEADER.pack(MAGIC, schema_id)


def schema_id_of(payload: bytes) -> int:
    """The schema id of a framed payload.

    Raises:
        DecodeError: the payload is shorter than 5 bytes or its magic byte is not 0.
    """
    if len(payload) < HEADER_SIZE:
        raise DecodeError(f"payload of {len(payload)} bytes is shorter than the 5-byte header")
    magic, schema_id = _HEADER.unpack_from(payload)
    if magic != MAGIC:
        raise DecodeError(f"magic byte is {magic}, not 0: not Confluent wire format")
    return schema_id


class AvroEncoder:
    """Encodes records of one schema to framed bytes.

    ``parsed_schema`` is a fastavro-parsed schema; ``schema_id`` the registry id it has.
    """

    def __init__(self, parsed_schema: dict[str, Any], schema_id: int) -> None:
        self.schema = parsed_schema
        self.schema_id = schema_id
        self._prefix = frame(schema_id)
        self._named: dict[str, Any] = {}
        self._parsed = parse_schema(parsed_schema, self._named)
        self._options = {"strict": False, "strict_allow_default": True, "disable_tuple_notation": False}

    def encode(self, record: dict[str, Any]) -> bytes:
        """Encode one record (a dict matching the schema).

        Raises:
            SchemaError: the record does not match the schema (names the field when fastavro does).
        """
        try:
            if _write_data is not None:
                out = bytearray(self._prefix)
                _write_data(out, record, self._parsed, self._named, "", self._options)
                return bytes(out)
            buf = BytesIO()
            buf.write(self._prefix)
            schemaless_writer(buf, self.schema, record, strict_allow_default=True)
            return buf.getvalue()
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            raise SchemaError(f"record does not match {self.schema.get('name')}: {exc}") from exc

    def encode_many(self, records: Iterable[dict[str, Any]]) -> list[bytes]:
        """Encode a batch; same errors as :meth:`encode`."""
        encode = self.encode
        return [encode(r) for r in records]


SchemaLookup = Callable[[int], dict[str, Any]]

#: Logical types decoded as their underlying ``long``/``int`` (ms, µs, days) instead of objects.
PLAIN_LOGICAL_TYPES = frozenset(
    {"timestamp-millis", "timestamp-micros", "local-timestamp-millis", "local-timestamp-micros",
     "time-millis", "time-micros", "date"}
)  # fmt: skip


def plain_times(schema: Any) -> Any:
    """A copy of a schema (JSON form) without the time/date logical types, so that fastavro
    decodes them as plain numbers (ms since the epoch for ``timestamp-millis``) instead of
    ``datetime`` objects: cheaper, and what the rest of backbeat works with."""
    if isinstance(schema, dict):
        out = {k: plain_times(v) for k, v in schema.items()}
        if out.get("logicalType") in PLAIN_LOGICAL_TYPES:
            del out["logicalType"]
        return out
    if isinstance(schema, list):
        return [plain_times(v) for v in schema]
    return schema


class AvroDecoder:
    """Decodes framed payloads, resolving the writer schema by id through ``lookup``
    (usually :meth:`events.registry_client.Registry.parsed_schema_by_id`), and optionally
    reading into a ``reader_schema`` (Avro spec, "Schema Resolution"). Schemas given to it
    should be passed through :func:`plain_times` first so times decode as ms."""

    def __init__(self, lookup: SchemaLookup, reader_schema: dict[str, Any] | None = None) -> None:
        self._lookup = lookup
        self._reader = reader_schema
        self._cache: dict[int, dict[str, Any]] = {}

    def writer_schema(self, schema_id: int) -> dict[str, Any]:
        """The parsed writer schema of ``schema_id`` (cached).

        Raises:
            DecodeError: the registry does not know the id.
        """
        schema = self._cache.get(schema_id)
        if schema is None:
            try:
                schema = self._lookup(schema_id)
            except Exception as exc:
                raise DecodeError(f"schema id {schema_id} cannot be resolved: {exc}") from exc
            self._cache[schema_id] = schema
        return schema

    def decode(self, payload: bytes) -> dict[str, Any]:
        """Decode one framed payload into a dict.

        Raises:
            DecodeError: bad framing, unknown schema id, or the body is not valid Avro for it.
        """
        schema_id = schema_id_of(payload)
        writer = self.writer_schema(schema_id)
        buf = BytesIO(payload)
        buf.seek(HEADER_SIZE)
        try:
            record = schemaless_reader(buf, writer, self._reader, return_record_name=False)
        except Exception as exc:  # fastavro raises EOFError, ValueError, IndexError, ...
            raise DecodeError(f"Avro body does not decode with schema id {schema_id}: {exc}") from exc
        if buf.tell() != len(payload):
            raise DecodeError(
                f"{len(payload) - buf.tell()} trailing bytes after the record (schema id {schema_id})"
            )
        if not isinstance(record, dict):
            raise DecodeError(f"schema id {schema_id} does not describe a record")
        return record

    def decode_many(
        self, payloads: Sequence[bytes | None]
    ) -> tuple[list[dict[str, Any] | None], list[tuple[int, str]]]:
        """Decode a batch. Returns ``(records, errors)`` where ``records[i]`` is ``None`` for a
        payload that failed and ``errors`` lists ``(index, reason)`` for those; never raises for a
        bad payload, so a batch is never lost to one bad record."""
        out: list[dict[str, Any] | None] = []
        errors: list[tuple[int, str]] = []
        decode = self.decode
        for i, payload in enumerate(payloads):
            if payload is None:
                out.append(None)
                errors.append((i, "tombstone: the record has no value"))
                continue
            try:
                out.append(decode(payload))
            except DecodeError as exc:
                out.append(None)
                errors.append((i, str(exc)))
        return out, errors


def decode_with_schema(payload: bytes, parsed_schema: dict[str, Any]) -> dict[str, Any]:
    """Decode a framed payload whose writer schema is known (tests, tools)."""
    return AvroDecoder(lambda _id: parsed_schema).decode(payload)


__all__ = [
    "AvroDecoder",
    "AvroEncoder",
    "HEADER_SIZE",
    "MAGIC",
    "PLAIN_LOGICAL_TYPES",
    "SchemaError",
    "decode_with_schema",
    "frame",
    "plain_times",
    "schema_id_of",
]
