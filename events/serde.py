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

from infra.errors import DecodeError, RegistryError, SchemaError, TransientError

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
    """The one decoder of Confluent-framed Avro payloads (every consumer of the log uses it).

    Resolves writer schemas by id through ``lookup`` (usually
    :meth:`events.registry_client.Registry.parsed_schema_by_id`) and optionally reads into a
    ``reader_schema`` (Avro spec, "Schema Resolution"). Schemas given to it should be passed
    through :func:`plain_times` first so times decode as ms.

    Errors come in two kinds, and only one of them is about the record:

    * **permanent** (:class:`~infra.errors.DecodeError`): bad framing, a schema id the registry
      answered 404 for, a body that is not valid Avro for its schema, trailing bytes, a schema
      that is not a record. The record goes to a dead-letter topic (or ``projection_rejects``).
    * **transient** (:class:`~infra.errors.TransientError`): the registry cannot be reached, timed
      out or answered 5xx. Nothing is rejected; the caller retries the batch and waits it out.

    Found schemas are cached for the life of the decoder; a "not found" answer is never cached
    (the id may be registered a moment later), except within one :meth:`decode_many` call.
    """

    def __init__(self, lookup: SchemaLookup, reader_schema: dict[str, Any] | None = None) -> None:
        self._lookup = lookup
        self._reader = reader_schema
        self._cache: dict[int, dict[str, Any]] = {}

    def writer_schema(self, schema_id: int) -> dict[str, Any]:
        """The parsed writer schema of ``schema_id`` (cached once found).

        Raises:
            DecodeError: the registry answered that it does not know the id (permanent).
            TransientError: the registry cannot be asked now (retry later).
        """
        schema = self._cache.get(schema_id)
        if schema is None:
            try:
                schema = self._lookup(schema_id)
            except TransientError:
                raise
            except RegistryError as exc:
                if exc.not_found:
                    raise DecodeError(f"schema id {schema_id} is not in the registry") from exc
                raise TransientError(f"the registry cannot resolve schema id {schema_id}: {exc}") from exc
            except Exception as exc:
                raise TransientError(f"schema id {schema_id} cannot be resolved now: {exc}") from exc
            if "__fastavro_parsed" not in schema:
                # without fastavro's "already parsed" marker it re-parses on every record
                schema = parse_schema(schema)
            self._cache[schema_id] = schema
        return schema

    def type_of(self, schema_id: int) -> str:
        """The full name (``namespace.Name``) of the writer schema ``schema_id``.

        Raises:
            DecodeError, TransientError: as :meth:`writer_schema`.
        """
        return str(self.writer_schema(schema_id).get("name"))

    def decode(self, payload: bytes) -> dict[str, Any]:
        """Decode one framed payload into a dict.

        Raises:
            DecodeError: bad framing, unknown schema id, or the body is not valid Avro for it.
            TransientError: the registry cannot be asked for the schema now.
        """
        schema_id = schema_id_of(payload)
        writer = self.writer_schema(schema_id)
        return self._body(payload, schema_id, writer)

    def _body(self, payload: bytes, schema_id: int, writer: dict[str, Any]) -> dict[str, Any]:
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
        payload with a permanent error and ``errors`` lists ``(index, reason)`` for those; a bad
        payload never fails the batch.

        Raises:
            TransientError: the registry cannot be asked for a schema the batch needs (nothing of
                the batch is decided; retry it).
        """
        out: list[dict[str, Any] | None] = []
        errors: list[tuple[int, str]] = []
        add = out.append
        cache = self._cache
        reader = self._reader
        missing: dict[int, str] = {}  # "not found" answers, for this batch only
        for i, payload in enumerate(payloads):
            if not payload:
                add(None)
                errors.append((i, "tombstone: the record has no value" if payload is None else "empty value"))
                continue
            if payload[0] == MAGIC and len(payload) > HEADER_SIZE:  # the hot path
                schema_id = int.from_bytes(payload[1:5], "big")
                writer = cache.get(schema_id)
                if writer is not None:
                    buf = BytesIO(payload)
                    buf.seek(HEADER_SIZE)
                    try:
                        record = schemaless_reader(buf, writer, reader, return_record_name=False)
                        if buf.tell() == len(payload) and type(record) is dict:
                            add(record)
                            continue
                    except Exception:  # noqa: S110 - the careful path below says why
                        pass
            try:
                schema_id = schema_id_of(payload)
                if schema_id in missing:
                    raise DecodeError(missing[schema_id])
                try:
                    writer = self.writer_schema(schema_id)
                except DecodeError as exc:
                    missing[schema_id] = str(exc)
                    raise
                add(self._body(payload, schema_id, writer))
            except DecodeError as exc:
                add(None)
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
