"""The in-memory state of backbeat's embedded schema registry: subjects, versions, global schema ids
and schema equality, with no I/O, so the rules can be unit-tested on their own.

The rules follow the Confluent Schema Registry API reference
(https://docs.confluent.io/platform/current/schema-registry/develop/api.html):

* a schema id is global: the same schema (by normalised form, see :func:`normalise`) gets the same
  id under every subject; a new schema gets ``max id + 1`` (ids start at 1);
* registering a schema that a subject already holds (in a live version) returns that version's id
  and creates no version; otherwise the subject gets version ``max version + 1`` (deleted versions
  count, so numbers are never reused);
* a soft-deleted version stays readable by id but is hidden from subject listings and lookups
  unless ``deleted=True`` is asked for.

State changes only through :meth:`RegistryState.apply`, which takes :class:`SchemaRecord` values
in log order (the ``_schemas`` topic, last value per key wins); :meth:`RegistryState.plan_register`
and :meth:`RegistryState.plan_delete_subject` say which records a request must write first.
:func:`encode_record` / :func:`decode_record` convert records to and from Confluent's ``_schemas``
key/value JSON.

Compatibility levels (:mod:`events.compatibility`) are a global level (``BACKWARD`` until set)
and optional per-subject levels, stored in ``_schemas`` as Confluent stores them (key
``{"keytype":"CONFIG","subject":S or null,"magic":0}``, value ``{"compatibilityLevel": L}``, a
tombstone when a level is deleted) and applied with :meth:`RegistryState.apply_config`.
:meth:`RegistryState.plan_register` refuses a schema that is incompatible with the subject's live
versions at the subject's level (409).

Only Avro is supported; schema references are not (a request with references is refused).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import avro.errors
import avro.schema

from events.compatibility import DEFAULT_LEVEL, LEVELS, check
from infra.errors import RegistryError, SchemaError

#: The one schema type this registry serves (Confluent's default when ``schemaType`` is absent).
AVRO = "AVRO"


class SubjectNotFoundError(RegistryError):
    """404 / 40401: the subject has no (live) versions."""

    def __init__(self, subject: str) -> None:
        super().__init__(f"Subject '{subject}' not found.", error_code=40401, http_status=404)


class VersionNotFoundError(RegistryError):
    """404 / 40402: the subject has no such (live) version."""

    def __init__(self, subject: str, version: int | str) -> None:
        super().__init__(
            f"Version {version} not found for subject '{subject}'.", error_code=40402, http_status=404
        )


class SchemaNotFoundError(RegistryError):
    """404 / 40403: no schema with this id, or the schema is not registered under the subject."""

    def __init__(self, message: str = "Schema not found") -> None:
        super().__init__(message, error_code=40403, http_status=404)


class InvalidSchemaError(RegistryError):
    """422 / 42201: the schema is not valid JSON/Avro, or uses something this registry lacks."""

    def __init__(self, message: str) -> None:
        super().__init__(message, error_code=42201, http_status=422)


class InvalidVersionError(RegistryError):
    """422 / 42202: a version is neither a positive integer, ``-1`` nor ``latest``."""

    def __init__(self, version: str) -> None:
        super().__init__(
            f"The specified version '{version}' is not a valid version id. Allowed values are between "
            '[1, 2^31-1] and the string "latest"',
            error_code=42202,
            http_status=422,
        )


class IncompatibleSchemaError(RegistryError):
    """409 / 409: the schema breaks the subject's compatibility level; names the problems."""

    def __init__(self, subject: str, level: str, problems: list[str]) -> None:
        super().__init__(
            f"Schema being registered is incompatible with an earlier schema for subject "
            f'"{subject}" (compatibility {level}): ' + "; ".join(problems),
            error_code=409,
            http_status=409,
        )
        self.problems = problems


class InvalidCompatibilityLevelError(RegistryError):
    """422 / 42203: not one of the compatibility levels."""

    def __init__(self, level: object) -> None:
        super().__init__(
            f"Invalid compatibility level {level!r}. Valid values are " + ", ".join(LEVELS),
            error_code=42203,
            http_status=422,
        )


class SubjectLevelNotConfiguredError(RegistryError):
    """404 / 40408: the subject has no compatibility level of its own."""

    def __init__(self, subject: str) -> None:
        super().__init__(
            f"Subject '{subject}' does not have subject-level compatibility configured",
            error_code=40408,
            http_status=404,
        )


def parse_level(level: object) -> str:
    """``level`` upper-cased if it is one of :data:`events.compatibility.LEVELS`.

    Raises:
        InvalidCompatibilityLevelError: anything else (422 / 42203).
    """
    if isinstance(level, str) and level.upper() in LEVELS:
        return level.upper()
    raise InvalidCompatibilityLevelError(level)


@dataclass(frozen=True)
class ConfigRecord:
    """A compatibility level: of ``subject``, or the global one when ``subject`` is ``None``;
    ``level`` ``None`` deletes it (a tombstone in ``_schemas``)."""

    subject: str | None
    level: str | None


@dataclass(frozen=True)
class SchemaRecord:
    """One registered version: ``subject``, ``version`` (1, 2, …), global ``id``, the ``schema``
    text as first registered, and whether the version is soft-``deleted``."""

    subject: str
    version: int
    id: int
    schema: str
    deleted: bool = False

    def to_response(self) -> dict[str, Any]:
        """The Confluent JSON of a subject version: ``{"subject","version","id","schema"}``."""
        return {"subject": self.subject, "version": self.version, "id": self.id, "schema": self.schema}


def normalise(schema: str, schema_type: str | None = AVRO) -> str:
    """The normalised form by which two schema texts are compared: the schema parsed by the Apache
    ``avro`` package and dumped back as compact JSON with sorted object keys. Whitespace, key order
    and redundant namespaces do not matter; docs, defaults, logical types and custom properties do
    (as with Confluent, which compares Avro's ``Schema.toString()``, not the Parsing Canonical
    Form, which would drop defaults and logical types and so merge schemas that differ).

    Raises:
        InvalidSchemaError: not JSON, not valid Avro, or ``schema_type`` is not ``AVRO``.
    """
    if schema_type not in (None, "", AVRO):
        raise InvalidSchemaError(
            f"schemaType {schema_type!r} is not supported by the embedded registry; only AVRO is"
        )
    if not isinstance(schema, str) or not schema.strip():
        raise InvalidSchemaError("Empty schema")
    try:
        parsed = avro.schema.parse(schema)
    except (avro.errors.AvroException, ValueError, TypeError, KeyError, AttributeError) as exc:
        raise InvalidSchemaError(f"Invalid schema {schema!r}: {exc}") from exc
    return json.dumps(parsed.to_json(), sort_keys=True, separators=(",", ":"))


@dataclass(frozen=True)
class RegisterPlan:
    """What registering a schema under a subject amounts to: ``existing`` is the live version that
    already holds it (nothing to write), else ``record`` is the new version to write."""

    existing: SchemaRecord | None
    record: SchemaRecord | None

    @property
    def id(self) -> int:
        """The schema id the request answers with."""
        chosen = self.existing or self.record
        assert chosen is not None
        return chosen.id


class RegistryState:
    """Subjects, versions and ids, rebuilt by applying ``_schemas`` records in log order."""

    def __init__(self) -> None:
        self._versions: dict[str, dict[int, SchemaRecord]] = {}
        self._schema_by_id: dict[int, str] = {}
        self._id_by_form: dict[str, int] = {}
        self._form_by_id: dict[int, str] = {}
        self._global_level: str | None = None
        self._subject_levels: dict[str, str] = {}

    # -- changes -------------------------------------------------------------------------------
    def apply(self, record: SchemaRecord) -> None:
        """Store ``record`` as the value of its (subject, version) key (last value wins).

        Raises:
            InvalidSchemaError: the record's schema does not parse.
        """
        form = normalise(record.schema)
        self._versions.setdefault(record.subject, {})[record.version] = record
        if record.id not in self._schema_by_id:
            self._schema_by_id[record.id] = record.schema
            self._form_by_id[record.id] = form
        self._id_by_form.setdefault(form, record.id)

    def apply_config(self, record: ConfigRecord) -> None:
        """Set (or, with ``level`` ``None``, delete) a global or subject compatibility level.

        Raises:
            InvalidCompatibilityLevelError: the level is not a known one.
        """
        level = None if record.level is None else parse_level(record.level)
        if record.subject is None:
            self._global_level = level
        elif level is None:
            self._subject_levels.pop(record.subject, None)
        else:
            self._subject_levels[record.subject] = level

    def remove(self, subject: str, version: int) -> None:
        """Forget a (subject, version) key (a tombstone in ``_schemas``); the id stays readable."""
        versions = self._versions.get(subject)
        if versions is not None:
            versions.pop(version, None)
            if not versions:
                del self._versions[subject]

    def plan_register(self, subject: str, schema: str, schema_type: str | None = AVRO) -> RegisterPlan:
        """What ``POST /subjects/{subject}/versions`` must do for ``schema`` (changes nothing).
        A schema the subject already holds is answered as is; a new one must be compatible with
        the subject's live versions at :meth:`level_of` the subject.

        Raises:
            InvalidSchemaError: the schema is invalid or not Avro.
            IncompatibleSchemaError: the schema breaks the subject's compatibility level (409).
        """
        form = normalise(schema, schema_type)
        versions = self._versions.get(subject, {})
        for rec in sorted(versions.values(), key=lambda r: r.version):
            if not rec.deleted and self._form_by_id.get(rec.id) == form:
                return RegisterPlan(existing=rec, record=None)
        problems = self.check_compatibility(subject, schema)
        if problems:
            raise IncompatibleSchemaError(subject, self.level_of(subject), problems)
        schema_id = self._id_by_form.get(form)
        if schema_id is None:
            schema_id = max(self._schema_by_id, default=0) + 1
            text = schema
        else:
            text = self._schema_by_id[schema_id]
        version = max(versions, default=0) + 1
        return RegisterPlan(existing=None, record=SchemaRecord(subject, version, schema_id, text))

    def plan_delete_subject(self, subject: str) -> list[SchemaRecord]:
        """The records that soft-delete every live version of ``subject`` (``deleted=True``).

        Raises:
            SubjectNotFoundError: the subject has no live versions.
        """
        live = self._live(subject, deleted=False)
        return [SchemaRecord(r.subject, r.version, r.id, r.schema, deleted=True) for r in live]

    # -- compatibility -------------------------------------------------------------------------
    def global_level(self) -> str:
        """The global compatibility level (``BACKWARD`` until one is set)."""
        return self._global_level or DEFAULT_LEVEL

    def subject_level(self, subject: str) -> str | None:
        """The subject's own level, ``None`` when it has none."""
        return self._subject_levels.get(subject)

    def level_of(self, subject: str) -> str:
        """The level that applies to ``subject``: its own, else the global one."""
        return self._subject_levels.get(subject) or self.global_level()

    def check_compatibility(self, subject: str, schema: str, version: int | str | None = None) -> list[str]:
        """The problems of ``schema`` under ``subject``'s level: against ``version`` only (an int,
        ``latest`` or ``-1``), or with ``version`` ``None`` against every live version (the level
        decides whether the latest or all of them count). An empty subject has no problems,
        and so has ``latest`` of an unknown subject (as with Confluent).

        Raises:
            InvalidSchemaError: the schema is invalid (42201).
            SubjectNotFoundError / VersionNotFoundError / InvalidVersionError: for ``version``.
        """
        normalise(schema)
        if version is None or (parse_version(version) == -1 and not self._has_live(subject)):
            existing = [r.schema for _, r in sorted(self._versions.get(subject, {}).items()) if not r.deleted]
        else:
            existing = [self.get_version(subject, version).schema]
        try:
            return check(schema, existing, self.level_of(subject))
        except SchemaError as exc:
            raise InvalidSchemaError(str(exc)) from exc

    def _has_live(self, subject: str) -> bool:
        return any(not r.deleted for r in self._versions.get(subject, {}).values())

    # -- queries -------------------------------------------------------------------------------
    def schema_by_id(self, schema_id: int) -> str:
        """The schema text of ``schema_id`` (deleted versions' schemas included).

        Raises:
            SchemaNotFoundError: the id is unknown (40403).
        """
        try:
            return self._schema_by_id[schema_id]
        except KeyError:
            raise SchemaNotFoundError(f"Schema {schema_id} not found") from None

    def versions_of_id(self, schema_id: int, deleted: bool = False) -> list[tuple[str, int]]:
        """``[(subject, version), …]`` holding ``schema_id``, sorted.

        Raises:
            SchemaNotFoundError: the id is unknown (40403).
        """
        self.schema_by_id(schema_id)
        return sorted(
            (r.subject, r.version)
            for versions in self._versions.values()
            for r in versions.values()
            if r.id == schema_id and (deleted or not r.deleted)
        )

    def subjects(self, deleted: bool = False) -> list[str]:
        """The subjects with at least one live version (any version with ``deleted``), sorted."""
        return sorted(
            s for s, vs in self._versions.items() if deleted or any(not r.deleted for r in vs.values())
        )

    def _live(self, subject: str, deleted: bool) -> list[SchemaRecord]:
        records = [r for _, r in sorted(self._versions.get(subject, {}).items()) if deleted or not r.deleted]
        if not records:
            raise SubjectNotFoundError(subject)
        return records

    def versions(self, subject: str, deleted: bool = False) -> list[int]:
        """The version numbers of ``subject``, ascending.

        Raises:
            SubjectNotFoundError: the subject has no live versions (40401).
        """
        return [r.version for r in self._live(subject, deleted)]

    def get_version(self, subject: str, version: int | str, deleted: bool = False) -> SchemaRecord:
        """Version ``version`` of ``subject``: an int, ``"latest"`` or ``-1`` (the latest live one),
        or a string of digits.

        Raises:
            SubjectNotFoundError: the subject has no live versions (40401).
            VersionNotFoundError: no such version (40402).
            InvalidVersionError: ``version`` is not a valid version id (42202).
        """
        number = parse_version(version)
        records = self._live(subject, deleted)
        if number == -1:
            return records[-1]
        for rec in records:
            if rec.version == number:
                return rec
        raise VersionNotFoundError(subject, number)

    def lookup(
        self, subject: str, schema: str, schema_type: str | None = AVRO, deleted: bool = False
    ) -> SchemaRecord:
        """The version of ``subject`` holding ``schema`` (by normalised form; the earliest one).

        Raises:
            InvalidSchemaError: the schema is invalid (42201).
            SubjectNotFoundError: the subject has no live versions (40401).
            SchemaNotFoundError: the subject does not hold this schema (40403).
        """
        form = normalise(schema, schema_type)
        for rec in self._live(subject, deleted):
            if self._form_by_id.get(rec.id) == form:
                return rec
        raise SchemaNotFoundError("Schema not found")


def parse_version(version: int | str) -> int:
    """``version`` as an int, with ``"latest"`` and ``-1`` both meaning ``-1`` (latest).

    Raises:
        InvalidVersionError: not ``latest``, ``-1`` or an integer in [1, 2^31-1] (42202).
    """
    if isinstance(version, str):
        if version == "latest":
            return -1
        try:
            number = int(version)
        except ValueError:
            raise InvalidVersionError(version) from None
    else:
        number = version
    if number == -1 or 1 <= number <= 2**31 - 1:
        return number
    raise InvalidVersionError(str(version))


# -- the _schemas topic's records (Confluent's format) -----------------------------------------


def encode_record(record: SchemaRecord) -> tuple[bytes, bytes]:
    """``(key, value)`` bytes of ``record`` as Confluent writes them to ``_schemas``: key
    ``{"keytype":"SCHEMA","subject":…,"version":N,"magic":1}``, value
    ``{"subject","version","id","schema","deleted"}``."""
    key = {"keytype": "SCHEMA", "subject": record.subject, "version": record.version, "magic": 1}
    value = {
        "subject": record.subject,
        "version": record.version,
        "id": record.id,
        "schema": record.schema,
        "deleted": record.deleted,
    }
    return (
        json.dumps(key, separators=(",", ":")).encode(),
        json.dumps(value, separators=(",", ":")).encode(),
    )


def decode_record(key: bytes | None, value: bytes | None) -> tuple[str, int, SchemaRecord | None] | None:
    """``(subject, version, record)`` of a ``_schemas`` record, ``record`` being ``None`` for a
    tombstone; ``None`` for keys that are not schema keys (``CONFIG``, ``NOOP``, …) or that are
    not JSON objects of the expected shape (other writers' records are skipped, not fatal)."""
    try:
        k = json.loads(key) if key else None
    except ValueError:
        return None
    if not isinstance(k, dict) or k.get("keytype") != "SCHEMA":
        return None
    subject, version = k.get("subject"), k.get("version")
    if not isinstance(subject, str) or not isinstance(version, int):
        return None
    if value is None:
        return subject, version, None
    try:
        v = json.loads(value)
        schema_type = v.get("schemaType") or AVRO
        if schema_type != AVRO:
            return None
        record = SchemaRecord(
            subject=str(v["subject"]),
            version=int(v["version"]),
            id=int(v["id"]),
            schema=str(v["schema"]),
            deleted=bool(v.get("deleted", False)),
        )
    except (ValueError, KeyError, TypeError, AttributeError):
        return None
    return subject, version, record


def encode_config(record: ConfigRecord) -> tuple[bytes, bytes | None]:
    """``(key, value)`` bytes of a compatibility level as Confluent writes them to ``_schemas``:
    key ``{"keytype":"CONFIG","subject":S or null,"magic":0}``, value
    ``{"compatibilityLevel": L}``, or ``None`` (a tombstone) when the level is deleted."""
    key = {"keytype": "CONFIG", "subject": record.subject, "magic": 0}
    value = None if record.level is None else {"compatibilityLevel": record.level}
    return (
        json.dumps(key, separators=(",", ":")).encode(),
        None if value is None else json.dumps(value, separators=(",", ":")).encode(),
    )


def decode_config(key: bytes | None, value: bytes | None) -> ConfigRecord | None:
    """The :class:`ConfigRecord` of a ``_schemas`` ``CONFIG`` record (``level`` ``None`` for a
    tombstone); ``None`` for other keys and for values without a valid level."""
    try:
        k = json.loads(key) if key else None
    except ValueError:
        return None
    if not isinstance(k, dict) or k.get("keytype") != "CONFIG":
        return None
    subject = k.get("subject")
    if subject is not None and not isinstance(subject, str):
        return None
    if value is None:
        return ConfigRecord(subject, None)
    try:
        v = json.loads(value)
        level = parse_level(v.get("compatibilityLevel"))
    except (ValueError, AttributeError, RegistryError):
        return None
    return ConfigRecord(subject, level)


__all__ = [
    "AVRO",
    "ConfigRecord",
    "IncompatibleSchemaError",
    "InvalidCompatibilityLevelError",
    "SubjectLevelNotConfiguredError",
    "decode_config",
    "encode_config",
    "parse_level",
    "InvalidSchemaError",
    "InvalidVersionError",
    "RegisterPlan",
    "RegistryState",
    "SchemaNotFoundError",
    "SchemaRecord",
    "SubjectNotFoundError",
    "VersionNotFoundError",
    "decode_record",
    "encode_record",
    "normalise",
    "parse_version",
]
