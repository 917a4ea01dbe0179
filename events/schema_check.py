"""``backbeat schemas check``: is every schema in ``schemas/`` compatible with what came before?

Three sources for "before" (each subject is ``<topic>-<full name>`` for every topic of the
catalogue that carries the event type, docs/design.md §3):

* ``registry``: the versions registered in the schema registry, at each subject's level
  (``GET /config/{subject}?defaultToGlobal=true``);
* a git revision ``REV``: the files as they were at ``REV`` (``git show REV:schemas/…``), at
  ``level`` (default BACKWARD);
* ``history``: every committed version of each file, oldest first, each checked against its
  predecessor (against all its predecessors for ``*_TRANSITIVE`` levels) — what a registry at
  that level would have enforced commit by commit. CI runs this mode.

Verdicts come from :func:`events.compatibility.check` (the Apache ``avro`` package's checker).
"""

from __future__ import annotations

import json
import subprocess
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

from events.catalog import load_catalogue
from events.compatibility import check
from events.schemas import EventSchema, read_schemas, subject_for
from infra.errors import ConfigError, RegistryError
from infra.resources import SCHEMAS_DIR
from infra.settings import REPO_ROOT


@dataclass
class SchemaVerdict:
    """The outcome for one event type: ``status`` is ``new``, ``unchanged``, ``compatible`` or
    ``incompatible``; ``diff`` lists field-level changes; ``problems`` the checker's messages."""

    full_name: str
    against: str
    level: str
    status: str
    diff: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """False only for an incompatible change."""
        return self.status != "incompatible"


def _fields(schema: dict[str, Any]) -> dict[str, Any]:
    return {f["name"]: f for f in schema.get("fields", [])}


def field_diff(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Readable top-level field changes from ``old`` to ``new`` (added, removed, type or
    default changed), e.g. ``- removed field 'ms_played' (["null", "long"])``."""
    before, after = _fields(old), _fields(new)
    out: list[str] = []
    for name in before.keys() - after.keys():
        out.append(f"- removed field {name!r} ({json.dumps(before[name]['type'])})")
    for name in after.keys() - before.keys():
        default = f", default {json.dumps(after[name]['default'])}" if "default" in after[name] else ""
        out.append(f"+ added field {name!r} ({json.dumps(after[name]['type'])}{default})")
    for name in before.keys() & after.keys():
        a, b = before[name], after[name]
        if a.get("type") != b.get("type"):
            out.append(f"~ field {name!r}: type {json.dumps(a['type'])} → {json.dumps(b['type'])}")
        old_default, new_default = a.get("default", "<none>"), b.get("default", "<none>")
        if old_default != new_default:
            out.append(f"~ field {name!r}: default {old_default!r} → {new_default!r}")
    return sorted(out)


def _git(root: Path, *args: str) -> str:
    try:
        return subprocess.run(
            ["git", *args], cwd=root, capture_output=True, text=True, check=True
        ).stdout
    except (OSError, subprocess.CalledProcessError) as exc:
        detail = getattr(exc, "stderr", "") or str(exc)
        raise ConfigError(f"git {' '.join(args)} failed: {detail.strip()}") from exc


def _require_checkout(root: Path) -> None:
    """``root`` must be the top of a git work tree: history checks read ``git log`` of
    ``schemas/`` there (an installed backbeat has its schemas but no history).

    Raises:
        ConfigError: it is not.
    """
    try:
        top = Path(_git(root, "rev-parse", "--show-toplevel").strip()).resolve()
    except ConfigError:
        top = None
    if top != root.resolve() or not (root / "schemas").is_dir():
        raise ConfigError(
            f"{root} is not a git checkout of backbeat: checking against git history needs one; "
            "run it in a clone or pass --repo PATH (--against registry needs no checkout)"
        )


def _relpath(root: Path, schema: EventSchema) -> str:
    return str(schema.path.relative_to(root))


def _at_revision(root: Path, rev: str, path: str) -> str | None:
    try:
        return subprocess.run(
            ["git", "show", f"{rev}:{path}"], cwd=root, capture_output=True, text=True, check=True
        ).stdout
    except subprocess.CalledProcessError:
        return None


def _canonical(text: str) -> str:
    return json.dumps(json.loads(text), sort_keys=True, separators=(",", ":"))


def _verdict(schema: EventSchema, versions: list[str], level: str, against: str) -> SchemaVerdict:
    """Check ``schema`` against earlier ``versions`` (oldest first)."""
    if not versions:
        return SchemaVerdict(schema.full_name, against, level, "new")
    latest = json.loads(versions[-1])
    if _canonical(versions[-1]) == _canonical(schema.schema_str):
        return SchemaVerdict(schema.full_name, against, level, "unchanged")
    problems = check(schema.schema_str, versions, level)
    return SchemaVerdict(
        schema.full_name, against, level,
        "incompatible" if problems else "compatible",
        field_diff(latest, schema.raw), problems,
    )  # fmt: skip


def check_against_revision(rev: str, level: str = "BACKWARD", root: Path = REPO_ROOT) -> list[SchemaVerdict]:
    """Each schema under ``root/schemas`` against its file at git revision ``rev``.

    Raises:
        ConfigError: ``root`` is not a git checkout, or ``rev`` is not a git revision.
    """
    _require_checkout(root)
    _git(root, "rev-parse", "--verify", f"{rev}^{{commit}}")
    out: list[SchemaVerdict] = []
    for schema in read_schemas(root / "schemas").values():
        old = _at_revision(root, rev, _relpath(root, schema))
        out.append(_verdict(schema, [old] if old is not None else [], level, rev))
    return out


def check_history(level: str = "BACKWARD", root: Path = REPO_ROOT) -> list[SchemaVerdict]:
    """Every committed version of each schema file under ``root/schemas`` against its
    predecessor(s), and the working tree's against the last committed one. An incompatible
    step anywhere fails the file.

    Raises:
        ConfigError: ``root`` is not a git checkout.
    """
    _require_checkout(root)
    transitive = level.endswith("_TRANSITIVE")
    out: list[SchemaVerdict] = []
    for schema in read_schemas(root / "schemas").values():
        path = _relpath(root, schema)
        revs = _git(root, "log", "--reverse", "--format=%H", "--", path).split()
        versions: list[str] = []
        for rev in revs:
            text = _at_revision(root, rev, path)
            if text is not None and (not versions or _canonical(text) != _canonical(versions[-1])):
                versions.append(text)
        if not versions or _canonical(versions[-1]) != _canonical(schema.schema_str):
            versions.append(schema.schema_str)
        problems: list[str] = []
        for i in range(1, len(versions)):
            earlier = versions[:i] if transitive else versions[i - 1 : i]
            for problem in check(versions[i], earlier, level):
                problems.append(f"version {i + 1} of {len(versions)}: {problem}")
        status = "new" if len(versions) == 1 else ("incompatible" if problems else "compatible")
        diff = field_diff(json.loads(versions[-2]), schema.raw) if len(versions) > 1 else []
        out.append(SchemaVerdict(schema.full_name, "git history", level, status, diff, problems))
    return out


def subject_level(registry_url: str, subject: str) -> str:
    """The compatibility level in force for ``subject`` (its own, else the global one), from
    ``GET /config/{subject}?defaultToGlobal=true`` (Confluent Schema Registry API).

    Raises:
        RegistryError: the registry cannot be reached or answers an error.
    """
    url = f"{registry_url}/config/{quote(subject, safe='')}?defaultToGlobal=true"
    try:
        with urllib.request.urlopen(url, timeout=10) as resp:
            body = json.loads(resp.read())
    except (OSError, ValueError) as exc:
        raise RegistryError(f"cannot read the compatibility level of {subject}: {exc}") from exc
    return str(body.get("compatibilityLevel") or body.get("compatibility") or "BACKWARD")


def check_against_registry(registry_url: str, root: Path | None = None) -> list[SchemaVerdict]:
    """Each current schema (those of the checkout ``root``, default the installed ones) against
    the versions registered under each of its subjects.

    Raises:
        RegistryError: the registry cannot be reached.
    """
    from confluent_kafka.schema_registry.error import SchemaRegistryError

    from events.registry_client import Registry

    client = Registry(registry_url).client
    topics_of: dict[str, list[str]] = {}
    for spec in load_catalogue().values():
        for event_type in spec.event_types:
            topics_of.setdefault(event_type, []).append(spec.name)
    out: list[SchemaVerdict] = []
    for schema in read_schemas(SCHEMAS_DIR if root is None else root / "schemas").values():
        for topic in topics_of.get(schema.full_name, []):
            subject = subject_for(topic, schema.full_name)
            try:
                versions = client.get_versions(subject)
            except SchemaRegistryError as exc:
                if exc.http_status_code == 404:
                    out.append(SchemaVerdict(schema.full_name, subject, "-", "new"))
                    continue
                raise
            texts = [client.get_version(subject, v).schema.schema_str for v in sorted(versions)]
            out.append(_verdict(schema, texts, subject_level(registry_url, subject), subject))
    return out
