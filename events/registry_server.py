"""backbeat's embedded Confluent-compatible schema registry: an aiohttp server speaking the subset
of the Confluent Schema Registry REST API that serialisers use, storing schemas in a compacted
``_schemas`` Kafka topic as Confluent does (docs/design.md §3).

Run: ``python -m events.registry_server --host 127.0.0.1 --port 8081 --bootstrap-servers
127.0.0.1:9092`` (``backbeat up`` does, see :mod:`infra.services`). At start it creates
``_schemas`` if missing (1 partition, ``cleanup.policy=compact``, ``retention.ms=-1``), reads it
from the beginning to its high watermark taken from a Fetch response (ListOffsets LATEST is wrong on
the embedded broker, docs/broker.md §2) and rebuilds its state, last value per key winning
(docs/broker.md §6).
A registration is written to ``_schemas`` and flushed before the state changes and the request is
answered, so an answered registration is durable in the log.

It is a **single-instance** server: it does not follow ``_schemas`` after start, so two instances
writing to one topic would hand out clashing ids. Read-only extra instances are fine.
Compatibility is enforced on registration at the subject's level (its own, else the global one,
``BACKWARD`` by default), with verdicts from :mod:`events.compatibility`; levels are stored in
``_schemas`` as Confluent stores them. Only Avro schemas without references are accepted. Domain rules live in
:mod:`events.registry_state`; this module does the HTTP and Kafka I/O.

Endpoints (Confluent API reference, docs.confluent.io …/schema-registry/develop/api.html):
``POST /subjects/{s}/versions``, ``POST /subjects/{s}``, ``GET /subjects``,
``GET /subjects/{s}/versions``, ``GET /subjects/{s}/versions/{v}``,
``GET /subjects/{s}/versions/{v}/schema``, ``DELETE /subjects/{s}`` (soft),
``GET /schemas/ids/{id}``, ``GET /schemas/ids/{id}/schema``, ``GET /schemas/ids/{id}/versions``,
``GET /schemas/ids/{id}/subjects``, ``GET /schemas/types``, ``GET|PUT|DELETE /config``,
``GET|PUT|DELETE /config/{s}`` (``?defaultToGlobal=true``),
``POST /compatibility/subjects/{s}/versions/{v}``, ``POST /compatibility/subjects/{s}/versions``
(``?verbose=true``), ``GET /``; and, like every long-running backbeat process, ``GET /metrics``
(Prometheus text, :mod:`infra.metrics`: component ``schema-registry`` with the ``_schemas`` records
written since start as ``records_out``, subjects as ``state_entries``) and ``GET /health`` (``200``
once the state is loaded, which is before the server listens; ``503 stopping`` on shutdown),
served on the registry's own port (:mod:`infra.ops` bodies). Logging: :func:`infra.logs.setup_logging`
(console or JSON lines, ``BACKBEAT_LOG_FORMAT``; ``--log-level`` or ``BACKBEAT_LOG_LEVEL``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from confluent_kafka import KafkaError, KafkaException, Producer
from confluent_kafka.admin import AdminClient, NewTopic

from events.log import read_range
from events.offsets import high_watermarks
from events.registry_state import (
    AVRO,
    ConfigRecord,
    InvalidSchemaError,
    RegistryState,
    SchemaRecord,
    SubjectLevelNotConfiguredError,
    decode_config,
    decode_record,
    encode_config,
    encode_record,
    parse_level,
)
from infra import metrics, ops
from infra.errors import BackbeatError, ConfigError, InfraError, RegistryError
from infra.lifecycle import WebAppService, run_process
from infra.logs import setup_logging
from infra.settings import Settings

log = logging.getLogger("backbeat.registry")

#: The topic holding the registry's state (Confluent's default ``kafkastore.topic``).
SCHEMAS_TOPIC = "_schemas"
#: Content type of every response (Confluent's v1 media type).
CONTENT_TYPE = "application/vnd.schemaregistry.v1+json"
#: Request body content types accepted (a request without Content-Type is accepted too).
ACCEPTED_CONTENT_TYPES = {
    "application/vnd.schemaregistry.v1+json",
    "application/vnd.schemaregistry+json",
    "application/json",
}
#: Process name (``infra.ops.DEFAULT_PORTS``) and metrics component name.
PROCESS = "schema-registry"
#: librdkafka gives up on a write after this many ms; flushing waits longer, so a finished flush
#: means every write has a final outcome.
WRITE_TIMEOUT_MS = 15_000

# -- Kafka I/O ----------------------------------------------------------------------------------


def ensure_schemas_topic(settings: Settings, timeout_s: float = 30.0) -> None:
    """Create ``_schemas`` (1 partition, compacted, infinite retention) unless it exists
    (docs/broker.md §8: create topics explicitly; §12: with their configs).

    Raises:
        InfraError: the broker cannot be reached or refuses to create the topic.
    """
    admin = AdminClient(settings.kafka_common())
    topic = NewTopic(
        SCHEMAS_TOPIC,
        num_partitions=1,
        replication_factor=1 if settings.embedded else -1,
        config={"cleanup.policy": "compact", "retention.ms": "-1"},
    )
    try:
        admin.create_topics([topic], request_timeout=timeout_s)[SCHEMAS_TOPIC].result(timeout=timeout_s)
        log.info("created topic %s", SCHEMAS_TOPIC)
    except KafkaException as exc:
        err = exc.args[0] if exc.args else None
        if isinstance(err, KafkaError) and err.code() == KafkaError.TOPIC_ALREADY_EXISTS:
            log.info("topic %s exists", SCHEMAS_TOPIC)
            return
        raise InfraError(
            f"cannot create topic {SCHEMAS_TOPIC} on {settings.bootstrap_servers}: {exc}"
        ) from exc
    except Exception as exc:
        raise InfraError(
            f"cannot create topic {SCHEMAS_TOPIC} on {settings.bootstrap_servers}: {exc}; "
            "is the broker running ('backbeat up')?"
        ) from exc


def load_state(settings: Settings, timeout_s: float = 60.0) -> RegistryState:
    """Read ``_schemas`` from its beginning to its high watermark (from a Fetch, docs/broker.md §2) and
    rebuild the registry state, the last value of each key winning (docs/broker.md §6).

    Raises:
        InfraError: the topic cannot be found, or nothing of it arrives for ``timeout_s`` seconds
            (``TransientError``).
        OffsetMismatchError: the topic changed under the reader.
    """
    deadline = time.monotonic() + timeout_s
    while True:  # the metadata of a just-created topic can lag behind for a moment
        try:
            end = high_watermarks(settings, SCHEMAS_TOPIC, timeout_s=10.0).get(0, 0)
            break
        except InfraError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
    state = RegistryState()
    if end <= 0:
        log.info("%s is empty", SCHEMAS_TOPIC)
        return state
    count = 0
    ranges = {(SCHEMAS_TOPIC, 0): (0, end)}
    idle_s = max(1.0, deadline - time.monotonic())
    for msgs in read_range(settings, ranges, purpose="registry-load", idle_timeout_s=idle_s):
        for msg in msgs:
            count += 1
            decoded = decode_record(msg.key(), msg.value())
            if decoded is None:
                config = decode_config(msg.key(), msg.value())
                if config is not None:
                    state.apply_config(config)
                continue
            subject, version, record = decoded
            if record is None:
                state.remove(subject, version)
                continue
            try:
                state.apply(record)
            except InvalidSchemaError as exc:
                log.warning("skipping %s offset %d: %s", SCHEMAS_TOPIC, msg.offset(), exc)
    log.info("loaded %d records of %s: %d subjects", count, SCHEMAS_TOPIC, len(state.subjects(True)))
    return state


class SchemaStore:
    """Writes records to ``_schemas`` synchronously (produce, then flush and check delivery)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        #: Records written and acknowledged since start.
        self.written = 0
        self._producer = Producer(
            settings.producer_conf(**{"linger.ms": 0, "message.timeout.ms": WRITE_TIMEOUT_MS})
        )

    def write(self, records: list[SchemaRecord | ConfigRecord]) -> None:
        """Produce ``records`` and wait until the broker has them all.

        Raises:
            RegistryError: a write failed or timed out (500 / 50001); it may still be in the log.
        """
        errors: list[str] = []

        def on_delivery(err: KafkaError | None, _msg: object) -> None:
            if err is not None:
                errors.append(str(err))

        try:
            for rec in records:
                key, value = encode_config(rec) if isinstance(rec, ConfigRecord) else encode_record(rec)
                self._producer.produce(SCHEMAS_TOPIC, value=value, key=key, on_delivery=on_delivery)
        except (KafkaException, BufferError) as exc:
            errors.append(str(exc))
        left = self._producer.flush(WRITE_TIMEOUT_MS / 1000 + 15)
        if left:
            errors.append(f"{left} records not acknowledged in time")
        if errors:
            raise RegistryError(
                f"Error while writing to {SCHEMAS_TOPIC} at {self.settings.bootstrap_servers}: "
                + "; ".join(errors),
                error_code=50001,
                http_status=500,
            )
        self.written += len(records)

    def close(self) -> None:
        """Flush what is pending (nothing, normally)."""
        self._producer.flush(5.0)


class Registry:
    """The state plus its log: serialises writes and keeps the state equal to the log."""

    def __init__(self, settings: Settings, state: RegistryState, store: SchemaStore) -> None:
        self.settings = settings
        self.state = state
        self.store = store
        self._lock = asyncio.Lock()
        self._stale = False  # a failed write may have landed: re-read the log before the next one

    async def _write(self, records: list[SchemaRecord | ConfigRecord]) -> None:
        try:
            await asyncio.to_thread(self.store.write, records)
        except RegistryError:
            self._stale = True
            raise
        for rec in records:
            if isinstance(rec, ConfigRecord):
                self.state.apply_config(rec)
            else:
                self.state.apply(rec)

    async def _refresh(self) -> None:
        if self._stale:
            log.warning("re-reading %s after a failed write", SCHEMAS_TOPIC)
            try:
                self.state = await asyncio.to_thread(load_state, self.settings, 30.0)
            except InfraError as exc:
                raise RegistryError(str(exc), error_code=50001, http_status=500) from exc
            self._stale = False

    async def register(self, subject: str, schema: str, schema_type: str | None) -> int:
        """Register ``schema`` under ``subject`` (idempotent) and return its id."""
        async with self._lock:
            await self._refresh()
            plan = self.state.plan_register(subject, schema, schema_type)
            if plan.record is not None:
                await self._write([plan.record])
                log.info("registered %s version %d id %d", subject, plan.record.version, plan.record.id)
            return plan.id

    async def set_level(self, subject: str | None, level: object) -> str:
        """Set the global (``subject`` ``None``) or a subject's compatibility level; the level.

        Raises:
            InvalidCompatibilityLevelError: not a known level (422 / 42203).
        """
        level = parse_level(level)
        async with self._lock:
            await self._refresh()
            await self._write([ConfigRecord(subject, level)])
            log.info("compatibility of %s set to %s", subject or "(global)", level)
            return level

    async def delete_level(self, subject: str | None) -> str:
        """Delete the global level (back to ``BACKWARD``) or a subject's own level (back to the
        global one); the level it had.

        Raises:
            SubjectLevelNotConfiguredError: the subject has no level of its own (404 / 40408).
        """
        async with self._lock:
            await self._refresh()
            if subject is None:
                previous = self.state.global_level()
            else:
                own = self.state.subject_level(subject)
                if own is None:
                    raise SubjectLevelNotConfiguredError(subject)
                previous = own
            await self._write([ConfigRecord(subject, None)])
            return previous

    async def delete_subject(self, subject: str) -> list[int]:
        """Soft-delete every live version of ``subject``; the deleted version numbers."""
        async with self._lock:
            await self._refresh()
            records = self.state.plan_delete_subject(subject)
            await self._write(records)
            return [r.version for r in records]


_REGISTRY: web.AppKey[Registry] = web.AppKey("registry", Registry)


# -- HTTP ---------------------------------------------------------------------------------------


def _json(data: Any, status: int = 200) -> web.Response:
    return web.Response(text=json.dumps(data), status=status, content_type=CONTENT_TYPE)


def _error(status: int, error_code: int, message: str) -> web.Response:
    return _json({"error_code": error_code, "message": message}, status=status)


@web.middleware
async def errors_middleware(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Turn errors into Confluent's ``{"error_code", "message"}`` JSON."""
    try:
        return await handler(request)
    except RegistryError as exc:
        return _error(exc.http_status, exc.error_code, str(exc))
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return _error(exc.status, exc.status, exc.text or exc.reason)
    except Exception:
        log.exception("%s %s failed", request.method, request.path)
        return _error(500, 50001, "Error in the backend data store")


def _registry(request: web.Request) -> Registry:
    return request.app[_REGISTRY]


def _flag(request: web.Request, name: str) -> bool:
    return request.query.get(name, "false").lower() == "true"


def _schema_id(request: web.Request) -> int:
    raw = request.match_info["id"]
    try:
        return int(raw)
    except ValueError:
        raise RegistryError(f"Schema {raw} not found", error_code=40403, http_status=404) from None


async def _json_body(request: web.Request) -> dict[str, Any]:
    """The JSON object of a request body (an empty body is ``{}``)."""
    if "Content-Type" in request.headers and request.content_type not in ACCEPTED_CONTENT_TYPES:
        raise RegistryError(
            f"Unsupported Content-Type {request.content_type!r}; use {CONTENT_TYPE}",
            error_code=415,
            http_status=415,
        )
    raw = await request.text()
    try:
        body = json.loads(raw) if raw.strip() else {}
    except ValueError as exc:
        raise RegistryError(
            f"Unrecognized request body: not JSON ({exc})", error_code=400, http_status=400
        ) from None
    if not isinstance(body, dict):
        raise RegistryError(
            "Unrecognized request body: expected a JSON object", error_code=400, http_status=400
        )
    return body


async def _schema_body(request: web.Request) -> tuple[str, str | None]:
    """``(schema, schemaType)`` of a register/lookup body."""
    body = await _json_body(request)
    if body.get("references"):
        raise InvalidSchemaError("schema references are not supported by the embedded registry")
    schema = body.get("schema")
    if not isinstance(schema, str) or not schema.strip():
        raise InvalidSchemaError("Empty schema")
    schema_type = body.get("schemaType")
    return schema, (schema_type if schema_type is None else str(schema_type))


async def root(request: web.Request) -> web.Response:
    """``GET /`` → ``{}`` (Confluent answers an empty object)."""
    return _json({})


async def get_config(request: web.Request) -> web.Response:
    """``GET /config`` → ``{"compatibilityLevel": L}`` (``BACKWARD`` until set)."""
    return _json({"compatibilityLevel": _registry(request).state.global_level()})


async def _level_body(request: web.Request) -> object:
    body = await _json_body(request)
    return body.get("compatibility", body.get("compatibilityLevel"))


async def put_config(request: web.Request) -> web.Response:
    """``PUT /config`` ``{"compatibility": L}`` → ``{"compatibility": L}``; 422/42203 for an
    unknown level."""
    level = await _registry(request).set_level(None, await _level_body(request))
    return _json({"compatibility": level})


async def delete_config(request: web.Request) -> web.Response:
    """``DELETE /config`` → the level it had; the global level is ``BACKWARD`` again."""
    return _json({"compatibilityLevel": await _registry(request).delete_level(None)})


async def get_subject_config(request: web.Request) -> web.Response:
    """``GET /config/{subject}`` → ``{"compatibilityLevel": L}``; 404/40408 when the subject has
    no level of its own, unless ``?defaultToGlobal=true`` (then the global level)."""
    subject = request.match_info["subject"]
    state = _registry(request).state
    level = state.subject_level(subject)
    if level is None:
        if not _flag(request, "defaultToGlobal"):
            raise SubjectLevelNotConfiguredError(subject)
        level = state.global_level()
    return _json({"compatibilityLevel": level})


async def put_subject_config(request: web.Request) -> web.Response:
    """``PUT /config/{subject}`` ``{"compatibility": L}`` → ``{"compatibility": L}``."""
    reg = _registry(request)
    level = await reg.set_level(request.match_info["subject"], await _level_body(request))
    return _json({"compatibility": level})


async def delete_subject_config(request: web.Request) -> web.Response:
    """``DELETE /config/{subject}`` → the level it had; the subject follows the global level
    again. 404/40408 when it had none."""
    return _json({"compatibilityLevel": await _registry(request).delete_level(request.match_info["subject"])})


def _verdict(request: web.Request, problems: list[str]) -> web.Response:
    body: dict[str, Any] = {"is_compatible": not problems}
    if _flag(request, "verbose"):
        body["messages"] = problems
    return _json(body)


async def test_compatibility(request: web.Request) -> web.Response:
    """``POST /compatibility/subjects/{subject}/versions/{version}`` ``{"schema"}`` →
    ``{"is_compatible": bool}`` (``"messages"`` too with ``?verbose=true``), against that version
    at the subject's level; ``latest`` of an unknown subject is compatible."""
    schema, schema_type = await _schema_body(request)
    normalise_type(schema_type)
    problems = _registry(request).state.check_compatibility(
        request.match_info["subject"], schema, request.match_info["version"]
    )
    return _verdict(request, problems)


async def test_compatibility_all(request: web.Request) -> web.Response:
    """``POST /compatibility/subjects/{subject}/versions`` ``{"schema"}`` → ``{"is_compatible"}``
    against the subject's live versions (the latest, or all for ``*_TRANSITIVE`` levels)."""
    schema, schema_type = await _schema_body(request)
    normalise_type(schema_type)
    problems = _registry(request).state.check_compatibility(request.match_info["subject"], schema)
    return _verdict(request, problems)


def normalise_type(schema_type: str | None) -> None:
    """Refuse a non-Avro ``schemaType`` (422 / 42201)."""
    if schema_type not in (None, "", AVRO):
        raise InvalidSchemaError(
            f"schemaType {schema_type!r} is not supported by the embedded registry; only AVRO is"
        )


async def get_types(request: web.Request) -> web.Response:
    """``GET /schemas/types`` → ``["AVRO"]``."""
    return _json([AVRO])


async def get_schema_by_id(request: web.Request) -> web.Response:
    """``GET /schemas/ids/{id}`` → ``{"schema"}``; 404/40403 for an unknown id."""
    return _json({"schema": _registry(request).state.schema_by_id(_schema_id(request))})


async def get_raw_schema_by_id(request: web.Request) -> web.Response:
    """``GET /schemas/ids/{id}/schema`` → the schema itself."""
    return web.Response(
        text=_registry(request).state.schema_by_id(_schema_id(request)), content_type=CONTENT_TYPE
    )


async def get_id_versions(request: web.Request) -> web.Response:
    """``GET /schemas/ids/{id}/versions`` → ``[{"subject", "version"}, …]``."""
    pairs = _registry(request).state.versions_of_id(_schema_id(request), _flag(request, "deleted"))
    return _json([{"subject": s, "version": v} for s, v in pairs])


async def get_id_subjects(request: web.Request) -> web.Response:
    """``GET /schemas/ids/{id}/subjects`` → ``[subject, …]``."""
    pairs = _registry(request).state.versions_of_id(_schema_id(request), _flag(request, "deleted"))
    return _json(sorted({s for s, _ in pairs}))


async def get_subjects(request: web.Request) -> web.Response:
    """``GET /subjects`` → ``[subject, …]`` (``?deleted=true`` includes soft-deleted ones)."""
    return _json(_registry(request).state.subjects(_flag(request, "deleted")))


async def get_versions(request: web.Request) -> web.Response:
    """``GET /subjects/{subject}/versions`` → ``[1, 2, …]``; 404/40401 for an unknown subject."""
    reg = _registry(request)
    return _json(reg.state.versions(request.match_info["subject"], _flag(request, "deleted")))


async def get_version(request: web.Request) -> web.Response:
    """``GET /subjects/{subject}/versions/{version}`` (int or ``latest``) →
    ``{"subject","version","id","schema"}``; 40401 / 40402 / 42202 errors."""
    rec = _registry(request).state.get_version(
        request.match_info["subject"], request.match_info["version"], _flag(request, "deleted")
    )
    return _json(rec.to_response())


async def get_version_schema(request: web.Request) -> web.Response:
    """``GET /subjects/{subject}/versions/{version}/schema`` → the schema itself."""
    rec = _registry(request).state.get_version(
        request.match_info["subject"], request.match_info["version"], _flag(request, "deleted")
    )
    return web.Response(text=rec.schema, content_type=CONTENT_TYPE)


async def register(request: web.Request) -> web.Response:
    """``POST /subjects/{subject}/versions`` ``{"schema", "schemaType"?, "references"?}`` →
    ``{"id"}``; 422/42201 for an invalid schema; 500/50001 when ``_schemas`` cannot be written."""
    schema, schema_type = await _schema_body(request)
    schema_id = await _registry(request).register(request.match_info["subject"], schema, schema_type)
    return _json({"id": schema_id})


async def lookup(request: web.Request) -> web.Response:
    """``POST /subjects/{subject}`` ``{"schema"}`` → ``{"subject","version","id","schema"}``;
    404/40401 unknown subject, 404/40403 schema not under the subject."""
    schema, schema_type = await _schema_body(request)
    rec = _registry(request).state.lookup(
        request.match_info["subject"], schema, schema_type, _flag(request, "deleted")
    )
    return _json(rec.to_response())


async def delete_subject(request: web.Request) -> web.Response:
    """``DELETE /subjects/{subject}`` (soft) → the deleted versions ``[1, 2, …]``."""
    if _flag(request, "permanent"):
        raise RegistryError(
            "permanent deletes are not supported by the embedded registry",
            error_code=50001,
            http_status=501,
        )
    return _json(await _registry(request).delete_subject(request.match_info["subject"]))


def observe(registry: Registry) -> metrics.Observation:
    """The ``schema-registry`` metrics component: ``_schemas`` records written since start,
    subjects (soft-deleted included) as state entries; always ready (it serves once loaded)."""
    subjects = len(registry.state.subjects(True))
    return metrics.Observation(
        records_out={SCHEMAS_TOPIC: registry.store.written},
        state_entries=subjects,
        ready=True,
        detail={"subjects": subjects},
    )


async def get_metrics(_request: web.Request) -> web.Response:
    """``GET /metrics``: Prometheus text of :data:`infra.metrics.REGISTRY`."""
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    body = await asyncio.to_thread(generate_latest, metrics.REGISTRY)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


async def get_health(_request: web.Request) -> web.Response:
    """``GET /health``: :func:`infra.ops.health` (200 ready, 503 stopping)."""
    status, body = ops.health()
    return web.json_response(body, status=status)


def make_app(registry: Registry) -> web.Application:
    """The aiohttp application serving ``registry``."""
    app = web.Application(middlewares=[errors_middleware])
    app[_REGISTRY] = registry
    app.router.add_get("/", root)
    app.router.add_get("/config", get_config)
    app.router.add_put("/config", put_config)
    app.router.add_delete("/config", delete_config)
    app.router.add_get("/config/{subject}", get_subject_config)
    app.router.add_put("/config/{subject}", put_subject_config)
    app.router.add_delete("/config/{subject}", delete_subject_config)
    app.router.add_post("/compatibility/subjects/{subject}/versions", test_compatibility_all)
    app.router.add_post("/compatibility/subjects/{subject}/versions/{version}", test_compatibility)
    app.router.add_get("/schemas/types", get_types)
    app.router.add_get("/schemas/ids/{id}", get_schema_by_id)
    app.router.add_get("/schemas/ids/{id}/schema", get_raw_schema_by_id)
    app.router.add_get("/schemas/ids/{id}/versions", get_id_versions)
    app.router.add_get("/schemas/ids/{id}/subjects", get_id_subjects)
    app.router.add_get("/subjects", get_subjects)
    app.router.add_post("/subjects/{subject}", lookup)
    app.router.add_delete("/subjects/{subject}", delete_subject)
    app.router.add_get("/subjects/{subject}/versions", get_versions)
    app.router.add_post("/subjects/{subject}/versions", register)
    app.router.add_get("/subjects/{subject}/versions/{version}", get_version)
    app.router.add_get("/subjects/{subject}/versions/{version}/schema", get_version_schema)
    app.router.add_get("/metrics", get_metrics)
    app.router.add_get("/health", get_health)

    async def stopping(_app: web.Application) -> None:
        ops.mark_stopping()

    async def close_store(_app: web.Application) -> None:
        await asyncio.to_thread(registry.store.close)

    app.on_shutdown.append(stopping)
    app.on_cleanup.append(close_store)
    return app


def main(argv: list[str] | None = None) -> int:
    """Entry point: parse arguments, load ``_schemas``, serve until SIGTERM/SIGINT."""
    parser = argparse.ArgumentParser(
        prog="python -m events.registry_server",
        description="backbeat's embedded Confluent-compatible schema registry (single instance)",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8081)
    parser.add_argument(
        "--bootstrap-servers",
        default=None,
        help="Kafka bootstrap servers (default: BACKBEAT_BOOTSTRAP_SERVERS or 127.0.0.1:9092)",
    )
    parser.add_argument("--log-level", default=None, help="default BACKBEAT_LOG_LEVEL, else INFO")
    args = parser.parse_args(argv)
    try:
        setup_logging(PROCESS, level=args.log_level)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    env = dict(os.environ)  # keeps SASL/TLS settings; the flag wins for the servers
    if args.bootstrap_servers:
        env["BACKBEAT_BOOTSTRAP_SERVERS"] = args.bootstrap_servers
    try:
        settings = Settings.from_env(env)
        ensure_schemas_topic(settings)
        state = load_state(settings)
        registry = Registry(settings, state, SchemaStore(settings))
    except BackbeatError as exc:
        log.error("%s", exc)
        return 1
    metrics.set_process(PROCESS)
    metrics.register(PROCESS, lambda: observe(registry))
    log.info("serving on http://%s:%d (Kafka %s)", args.host, args.port, settings.bootstrap_servers)
    # the one lifecycle (infra.lifecycle): SIGTERM/SIGINT stop accepting, finish requests and run
    # the app's on_cleanup; /metrics and /health are the registry's own routes, on its port
    server = WebAppService(PROCESS, make_app(registry), args.host, args.port)
    code = run_process(PROCESS, [server], ops_port=None, log_level=args.log_level)
    log.info("stopped")
    return code


if __name__ == "__main__":
    sys.exit(main())
