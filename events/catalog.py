"""The topic catalogue: every topic backbeat uses, declared once in ``infra/topics.toml``
(name, partitions, cleanup policy, retention, key, event types)."""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from infra.errors import ConfigError
from infra.resources import TOPICS_FILE

#: ``infra/topics.toml``, shipped as package data (:mod:`infra.resources`).
CATALOGUE_PATH = TOPICS_FILE


@dataclass(frozen=True)
class TopicSpec:
    """One declared topic. ``retention_ms`` is in ms (-1 = forever)."""

    name: str
    partitions: int
    cleanup_policy: str = "delete"
    retention_ms: int = -1
    key: str = ""
    event_types: tuple[str, ...] = field(default_factory=tuple)
    doc: str = ""

    def configs(self) -> dict[str, str]:
        """The topic configs backbeat sets explicitly (docs/broker.md §12: never rely on defaults)."""
        return {"cleanup.policy": self.cleanup_policy, "retention.ms": str(self.retention_ms)}


@lru_cache(maxsize=4)
def load_catalogue(path: Path = CATALOGUE_PATH) -> dict[str, TopicSpec]:
    """The declared topics by name.

    Raises:
        ConfigError: the file is missing, not TOML, or a topic is declared wrongly.
    """
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read the topic catalogue: {exc}") from exc
    topics: dict[str, TopicSpec] = {}
    for i, entry in enumerate(data.get("topic", []), start=1):
        try:
            spec = TopicSpec(
                name=str(entry["name"]),
                partitions=int(entry["partitions"]),
                cleanup_policy=str(entry.get("cleanup_policy", "delete")),
                retention_ms=int(entry.get("retention_ms", -1)),
                key=str(entry.get("key", "")),
                event_types=tuple(entry.get("event_types", ())),
                doc=str(entry.get("doc", "")),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(f"{path}: topic #{i} is invalid: {exc!r}") from exc
        if spec.partitions < 1 or spec.cleanup_policy not in {"delete", "compact"}:
            raise ConfigError(f"{path}: topic {spec.name}: partitions >= 1, policy delete|compact")
        if spec.name in topics:
            raise ConfigError(f"{path}: topic {spec.name} is declared twice")
        topics[spec.name] = spec
    return topics


def topic(name: str) -> TopicSpec:
    """The declared topic ``name``.

    Raises:
        ConfigError: the topic is not in the catalogue.
    """
    topics = load_catalogue()
    if name not in topics:
        raise ConfigError(f"topic {name!r} is not declared in {CATALOGUE_PATH}")
    return topics[name]
