"""backbeat's client side of a Confluent-compatible schema registry.

Wraps confluent-kafka's ``SchemaRegistryClient`` (the library does the REST calls and caching)
and adds what backbeat needs on top: registering a schema under its TopicRecordNameStrategy
subject and building encoders/decoders for the Confluent wire format (:mod:`events.serde`).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache
from typing import Any

import fastavro
from confluent_kafka.schema_registry import Schema, SchemaRegistryClient
from confluent_kafka.schema_registry.error import SchemaRegistryError

from events.schemas import EventSchema, get_schema, subject_for
from events.serde import AvroDecoder, AvroEncoder, plain_times
from infra.errors import BackbeatError, RegistryError, TransientError
from infra.settings import Settings


class Registry:
    """A registry connection at ``url`` (e.g. ``http://127.0.0.1:8081``)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.client = SchemaRegistryClient({"url": url})
        self._parsed: dict[int, dict[str, Any]] = {}

    @classmethod
    def from_settings(cls, settings: Settings) -> Registry:
        """The registry at ``settings.registry_url``."""
        return cls(settings.registry_url)

    @contextmanager
    def _asking(self, what: str) -> Iterator[None]:
        """The one translation of the client's errors for a call about ``what``: the registry
        answered 5xx, 408 or 429, or could not be reached or timed out → :class:`TransientError`
        (retry); any other answer (404 not found, 409 incompatible, 422 invalid) →
        :class:`RegistryError` with Confluent's ``error_code`` and the HTTP status."""
        try:
            yield
        except SchemaRegistryError as exc:
            status = exc.http_status_code or 500
            if status >= 500 or status in (408, 429):
                raise TransientError(
                    f"{what}: the schema registry at {self.url} answered {status}: {exc.error_message}"
                ) from exc
            raise RegistryError(
                f"{what}: {exc.error_message}", error_code=exc.error_code, http_status=status
            ) from exc
        except BackbeatError:
            raise
        except Exception as exc:  # httpx connect/read errors, timeouts
            raise TransientError(
                f"{what}: the schema registry at {self.url} cannot be reached ({exc}); is it running? "
                "Start the embedded one with 'backbeat up' or set BACKBEAT_REGISTRY_URL"
            ) from exc

    def register(self, topic: str, schema: EventSchema) -> int:
        """Register ``schema`` under ``<topic>-<full name>`` and return its id (idempotent).

        Raises:
            RegistryError: the registry refused (e.g. 409 incompatible).
            TransientError: the registry cannot be reached, timed out or answered 5xx (retry).
        """
        subject = subject_for(topic, schema.full_name)
        with self._asking(f"registering {subject}"):
            schema_id = self.client.register_schema(subject, Schema(schema.schema_str, "AVRO"))
        return schema_id

    def parsed_schema_by_id(self, schema_id: int) -> dict[str, Any]:
        """The fastavro-parsed schema of ``schema_id`` (cached once found; a "not found" answer
        is never cached, since the id may be registered later), time logical types decoded as
        plain numbers (:func:`events.serde.plain_times`).

        Raises:
            RegistryError: the registry answered; ``not_found`` tells "no such id" (404).
            TransientError: the registry cannot be reached, timed out or answered 5xx (retry).
        """
        parsed = self._parsed.get(schema_id)
        if parsed is None:
            with self._asking(f"schema id {schema_id}"):
                schema = self.client.get_schema(schema_id)
            parsed = fastavro.parse_schema(plain_times(json.loads(schema.schema_str)))
            self._parsed[schema_id] = parsed
        return parsed

    def schema_text_by_id(self, schema_id: int) -> str:
        """The schema text registered under ``schema_id`` (cached by the client).

        Raises:
            RegistryError: the id is unknown (``not_found``).
            TransientError: the registry cannot be reached now (retry).
        """
        with self._asking(f"schema id {schema_id}"):
            text = str(self.client.get_schema(schema_id).schema_str)
        return text

    def register_text(self, subject: str, schema_text: str) -> int:
        """Register raw Avro ``schema_text`` under ``subject`` (e.g. an old version from
        ``schemas/<context>/history/``) and return its id.

        Raises:
            RegistryError: refused (e.g. 409 incompatible).
            TransientError: the registry cannot be reached now (retry).
        """
        with self._asking(f"registering {subject}"):
            schema_id = self.client.register_schema(subject, Schema(schema_text, "AVRO"))
        return schema_id

    def encoder(self, topic: str, event_type: str) -> AvroEncoder:
        """An encoder for ``event_type`` (full or short name) on ``topic``; registers the schema."""
        schema = get_schema(event_type)
        return AvroEncoder(schema.parsed, self.register(topic, schema))

    def decoder(self, reader_schema: dict[str, Any] | None = None) -> AvroDecoder:
        """A decoder resolving writer schemas by id through this registry."""
        return AvroDecoder(self.parsed_schema_by_id, reader_schema)


@lru_cache(maxsize=8)
def registry_for(url: str) -> Registry:
    """A shared :class:`Registry` per URL (its caches are then shared too)."""
    return Registry(url)
