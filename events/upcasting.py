"""Reading old events in today's shape: Avro schema resolution first, upcasters where it
cannot do the job.

A consumer reads with its own *reader* schema (the current file under ``schemas/``); Avro schema
resolution (Avro spec, "Schema Resolution") fills added fields from their defaults and drops
removed ones. That is right for most changes and wrong for a change of meaning: when
``ListenRecorded`` v2 replaced ``seconds_played`` (int s) with ``ms_played`` (long ms, default
null), resolution reads a v1 event as ``ms_played = null`` and the play time is lost. An
*upcaster* is a pure function from version N's record to version N+1's; the chain runs from the
writer's version up to the current one.

Versions: the superseded schemas of an event type live in ``schemas/<context>/history/`` as
``<Name>.v<N>.avsc``; the current file is version max(N)+1. A writer schema's version is found
by comparing its Parsing Canonical Form (Avro spec, "Parsing Canonical Form for Schemas") with
those files; an unknown writer schema is read by plain resolution.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import avro.schema
import fastavro

from events.schemas import get_schema
from events.serde import AvroDecoder, plain_times, schema_id_of
from infra.errors import SchemaError

Record = dict[str, Any]
Upcaster = Callable[[Record], Record]
_VERSION_FILE = re.compile(r"^(?P<name>[A-Za-z0-9_]+)\.v(?P<version>\d+)\.avsc$")


def canonical_form(schema_text: str) -> str:
    """The Parsing Canonical Form of an Avro schema (via the Apache ``avro`` package).

    Raises:
        SchemaError: the text is not a valid Avro schema.
    """
    try:
        return str(avro.schema.parse(schema_text).canonical_form)
    except Exception as exc:  # avro raises several types
        raise SchemaError(f"invalid Avro schema: {exc}") from exc


@lru_cache(maxsize=64)
def schema_history(event_type: str) -> tuple[str, ...]:
    """Every version's schema text of ``event_type`` (full or short name), oldest first; the
    last one is the current file.

    Raises:
        SchemaError: unknown event type, or a history file with a gap in its numbering.
    """
    current = get_schema(event_type)
    found: dict[int, str] = {}
    history = current.path.parent / "history"
    for path in sorted(history.glob(f"{current.name}.v*.avsc")) if history.is_dir() else []:
        match = _VERSION_FILE.match(path.name)
        if match and match["name"] == current.name:
            found[int(match["version"])] = path.read_text(encoding="utf-8")
    if sorted(found) != list(range(1, len(found) + 1)):
        raise SchemaError(f"{history}: versions of {current.name} must be numbered 1..N, got {sorted(found)}")
    return (*(found[v] for v in sorted(found)), current.schema_str)


def version_of(event_type: str, writer_schema_text: str) -> int | None:
    """The version number (1-based) of ``writer_schema_text`` among ``event_type``'s versions,
    or ``None`` when it is none of them."""
    wanted = canonical_form(writer_schema_text)
    for number, text in enumerate(schema_history(event_type), start=1):
        if canonical_form(text) == wanted:
            return number
    return None


@dataclass
class UpcasterChain:
    """Upcasters by ``(event full name, from version)``; :meth:`upcast` runs them in order."""

    steps: dict[tuple[str, int], Upcaster] = field(default_factory=dict)

    def register(self, event_type: str, from_version: int) -> Callable[[Upcaster], Upcaster]:
        """Decorator: ``fn`` turns a version ``from_version`` record into version +1."""
        full_name = get_schema(event_type).full_name

        def add(fn: Upcaster) -> Upcaster:
            self.steps[(full_name, from_version)] = fn
            return fn

        return add

    def upcast(self, event_type: str, from_version: int, record: Record) -> Record:
        """Run the steps from ``from_version`` to the current version.

        Raises:
            SchemaError: a step is missing in the chain.
        """
        full_name = get_schema(event_type).full_name
        current = len(schema_history(full_name))
        for version in range(from_version, current):
            step = self.steps.get((full_name, version))
            if step is None:
                raise SchemaError(f"no upcaster for {full_name} v{version} → v{version + 1}")
            record = step(dict(record))
        return record

    def has_steps_from(self, event_type: str, version: int) -> bool:
        """True when an upcaster starts at ``version`` (then resolution alone is not enough)."""
        return (get_schema(event_type).full_name, version) in self.steps


#: backbeat's upcasters.
UPCASTERS = UpcasterChain()


@UPCASTERS.register("backbeat.playback.ListenRecorded", 1)
def listen_recorded_v1_to_v2(record: Record) -> Record:
    """v1 → v2: ``seconds_played`` (int s) became ``ms_played`` (long ms); v2 also added the
    optional ``track_name``, ``artist_name`` and ``session_hint`` (null for v1 events)."""
    seconds = record.pop("seconds_played", None)
    record["ms_played"] = None if seconds is None else int(seconds) * 1000
    for name in ("track_name", "artist_name", "session_hint"):
        record.setdefault(name, None)
    return record


class UpcastingDecoder:
    """Decodes framed payloads of one event type into its *current* shape.

    ``schema_text_by_id`` resolves a writer schema id to its text (e.g.
    :meth:`events.registry_client.Registry.schema_text_by_id`). A writer of an older known
    version that has upcasters is decoded with its own schema and upcast; anything else is read
    with the current schema as reader schema (Avro resolution). Times decode as ms. Decoding is
    the one decoder's (:class:`events.serde.AvroDecoder`), errors by kind included: an id the
    registry does not know is a :class:`~infra.errors.DecodeError`, a registry that cannot be
    asked a :class:`~infra.errors.TransientError`.
    """

    def __init__(
        self,
        event_type: str,
        schema_text_by_id: Callable[[int], str],
        chain: UpcasterChain = UPCASTERS,
    ) -> None:
        self.event_type = get_schema(event_type).full_name
        self._text = schema_text_by_id
        self._chain = chain
        reader = fastavro.parse_schema(plain_times(json.loads(schema_history(event_type)[-1])))
        self._versions: dict[int, int | None] = {}
        self._own = AvroDecoder(self._writer)  # a writer's own shape, for its upcasters
        self._resolved = AvroDecoder(self._writer, reader)  # Avro resolution into the current shape

    def _writer(self, schema_id: int) -> dict[str, Any]:
        """The parsed writer schema of ``schema_id``, its version noted (AvroDecoder's lookup)."""
        text = self._text(schema_id)
        self._versions[schema_id] = version_of(self.event_type, text)
        return fastavro.parse_schema(plain_times(json.loads(text)))

    def decode(self, payload: bytes) -> Record:
        """One payload → a record of the current version.

        Raises:
            DecodeError: bad framing, unknown id, or a body that does not decode.
            TransientError: the registry cannot be asked for the writer schema now.
            SchemaError: an upcaster step is missing.
        """
        schema_id = schema_id_of(payload)
        self._own.writer_schema(schema_id)  # resolves (and caches) it, noting its version
        version = self._versions[schema_id]
        if version is not None and self._chain.has_steps_from(self.event_type, version):
            return self._chain.upcast(self.event_type, version, self._own.decode(payload))
        return self._resolved.decode(payload)
