"""The error hierarchy of backbeat: every error a user can see derives from :class:`BackbeatError`.

Messages say what was wrong, with which input, and what to do (docs/design.md §4).
"""

from __future__ import annotations


class BackbeatError(Exception):
    """Root of backbeat's errors; the CLI prints its message and exits with status 1."""


class ConfigError(BackbeatError):
    """A setting (a ``BACKBEAT_*`` variable or a declaration file) is invalid."""


class InfraError(BackbeatError):
    """The embedded broker or registry could not be started, reached or stopped."""


class TransientError(InfraError):
    """A service the work depends on (the broker, the schema registry) is unreachable, timed out
    or answered with a server error. The work is retried with backoff and waited out: a record
    is never dead-lettered, rejected or dropped because of it."""


class SchemaError(BackbeatError):
    """An Avro schema is missing, invalid, or a record does not match it."""


class RegistryError(BackbeatError):
    """The schema registry answered with an error (carries Confluent's ``error_code``)."""

    def __init__(self, message: str, *, error_code: int = 50001, http_status: int = 500) -> None:
        super().__init__(message)
        self.error_code = error_code
        self.http_status = http_status

    @property
    def not_found(self) -> bool:
        """The registry answered "no such subject / version / schema id" (HTTP 404, Confluent
        error codes 40401-40403): a definite answer about *now*, never cached as permanent."""
        return self.http_status == 404 or self.error_code in (40401, 40402, 40403)


class DecodeError(BackbeatError):
    """A Kafka record's value is not a valid Confluent-framed Avro payload of a known schema."""


class ValidationError(BackbeatError):
    """A decoded event breaks a domain rule (e.g. an empty user id, a negative duration)."""


class OffsetMismatchError(BackbeatError):
    """Stored consumer offsets belong to another log (e.g. the embedded broker restarted empty)."""
