"""The one logging setup of every backbeat process (structlog over the standard library).

Every process (the worker, projection runner, archiver, saga orchestrator and participants,
schema registry, HTTP API) calls :func:`setup_logging` once, or hands :func:`logging_config` to
the framework that owns its logging (Faust's ``logging_config`` setting, mode's ``Worker``).
Log calls stay plain standard-library calls (``log.info("...", extra={...})``), so Faust's,
mode's, aiokafka's and uvicorn's lines come out the same way as ours: structlog's
``ProcessorFormatter`` renders every record (structlog docs, "Rendering Using structlog-based
Formatters Within logging").

Output (stderr):

- ``BACKBEAT_LOG_FORMAT=console`` (the default): one human-readable line per record,
  ``2026-12-07T08:40:01.123Z info     backbeat.projections.runner  applied batch  topic=listens partition=2``.
- ``BACKBEAT_LOG_FORMAT=json``: one JSON object per line with ``timestamp`` (ISO 8601, UTC),
  ``level``, ``logger``, ``event`` (the message), ``process`` (the process name given to
  :func:`setup_logging`) and the context fields, plus ``exception`` when there is one.

Context fields: :data:`CONTEXT_FIELDS` (``topic``, ``partition``, ``offset``, ``event_id``, and
``agent``/``projection``/``saga_id`` where they apply) are taken from a record's ``extra`` and
from :func:`bind` (contextvars, so they follow the thread or task that bound them).
``BACKBEAT_LOG_LEVEL`` sets the level (``INFO``).
"""

from __future__ import annotations

import logging
import logging.config
import os
from collections.abc import Iterator, MutableMapping
from contextlib import contextmanager
from typing import Any

import structlog

from infra.errors import ConfigError

#: The values of ``BACKBEAT_LOG_FORMAT``.
FORMATS = ("console", "json")
#: Record attributes copied into the rendered line when a log call passes them in ``extra``.
CONTEXT_FIELDS = ("topic", "partition", "offset", "event_id", "agent", "projection", "saga_id", "group")

_PROCESS: dict[str, str] = {"name": ""}


def log_format(environ: MutableMapping[str, str] | None = None) -> str:
    """``BACKBEAT_LOG_FORMAT`` (``console`` or ``json``; default ``console``).

    Raises:
        infra.errors.ConfigError: any other value.
    """
    env = os.environ if environ is None else environ
    value = env.get("BACKBEAT_LOG_FORMAT", "console").strip().lower() or "console"
    if value not in FORMATS:
        raise ConfigError(f"BACKBEAT_LOG_FORMAT={value!r}: use one of {', '.join(FORMATS)}")
    return value


def log_level(environ: MutableMapping[str, str] | None = None, default: str = "INFO") -> str:
    """``BACKBEAT_LOG_LEVEL`` (a standard level name; ``default`` when unset).

    Raises:
        infra.errors.ConfigError: not a level name.
    """
    env = os.environ if environ is None else environ
    value = env.get("BACKBEAT_LOG_LEVEL", "").strip().upper() or default.upper()
    if not isinstance(logging.getLevelName(value), int):
        raise ConfigError(f"BACKBEAT_LOG_LEVEL={value!r} is not a level (DEBUG, INFO, WARNING, ERROR)")
    return value


def _add_context(_logger: Any, _name: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """Copy the context fields of a standard-library record (its ``extra``) into the event."""
    record = event.get("_record")
    if record is not None:
        for name in CONTEXT_FIELDS:
            value = getattr(record, name, None)
            if value is not None and name not in event:
                event[name] = value
    if _PROCESS["name"]:
        event.setdefault("process", _PROCESS["name"])
    return event


def _pre_chain() -> list[Any]:
    return [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        _add_context,
    ]


def formatter(fmt: str) -> logging.Formatter:
    """The ``logging.Formatter`` of format ``fmt`` (``console`` or ``json``)."""
    renderer: Any = (
        structlog.processors.JSONRenderer(sort_keys=False)
        if fmt == "json"
        else structlog.dev.ConsoleRenderer(
            colors=False, pad_event_to=30, exception_formatter=structlog.dev.plain_traceback
        )
    )
    processors: list[Any] = [structlog.stdlib.ProcessorFormatter.remove_processors_meta]
    if fmt == "json":
        processors.append(structlog.processors.format_exc_info)
    processors.append(renderer)
    return structlog.stdlib.ProcessorFormatter(foreign_pre_chain=_pre_chain(), processors=processors)


def logging_config(level: str | None = None, fmt: str | None = None) -> dict[str, Any]:
    """A ``logging.config.dictConfig`` dict of the one setup: one stderr handler on the root
    logger with :func:`formatter`; librdkafka's and aiokafka's chatter at WARNING.

    ``level`` defaults to ``BACKBEAT_LOG_LEVEL`` (INFO), ``fmt`` to ``BACKBEAT_LOG_FORMAT``.

    Raises:
        infra.errors.ConfigError: a bad level or format in the environment.
    """
    fmt = fmt or log_format()
    level = (level or log_level()).upper()
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"backbeat": {"()": formatter, "fmt": fmt}},
        "handlers": {
            "stderr": {
                "class": "logging.StreamHandler",
                "formatter": "backbeat",
                "stream": "ext://sys.stderr",
            }
        },
        "root": {"level": level, "handlers": ["stderr"]},
        "loggers": {
            "aiokafka": {"level": "WARNING"},
            "kafka": {"level": "WARNING"},
            "httpx": {"level": "WARNING"},
            "httpx2": {"level": "WARNING"},
        },
    }


def setup_logging(process: str, level: str | None = None, fmt: str | None = None) -> None:
    """Configure logging for process ``process`` (its name in every JSON line); replaces any
    handler set before. Call once, at the start of ``main``.

    Raises:
        infra.errors.ConfigError: a bad ``BACKBEAT_LOG_LEVEL`` or ``BACKBEAT_LOG_FORMAT``.
    """
    set_process(process)
    logging.config.dictConfig(logging_config(level, fmt))


def set_process(process: str) -> None:
    """Name the process in every line (for frameworks that apply :func:`logging_config` themselves)."""
    _PROCESS["name"] = process


@contextmanager
def bind(**fields: Any) -> Iterator[None]:
    """Add ``fields`` (e.g. ``topic=…, partition=…``) to every line logged inside the block, on
    this thread or task (``structlog.contextvars``)."""
    with structlog.contextvars.bound_contextvars(**fields):
        yield


__all__ = [
    "CONTEXT_FIELDS",
    "FORMATS",
    "bind",
    "formatter",
    "log_format",
    "log_level",
    "logging_config",
    "set_process",
    "setup_logging",
]
