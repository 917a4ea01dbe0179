"""`backbeat schemas check`: a breaking change in schemas/ fails, a compatible one passes, in a
real git repository (history and revision modes) and against the real registry."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from events.catalog import load_catalogue
from events.schema_check import check_against_registry, check_against_revision, check_history
from events.schemas import load_schemas, subject_for
from infra.settings import REPO_ROOT

V1 = {
    "type": "record", "name": "ThingHappened", "namespace": "backbeat.test", "doc": "test",
    "fields": [
        {"name": "event_id", "type": "string", "doc": "id"},
        {"name": "amount_minor", "type": "long", "doc": "money"},
    ],
}  # fmt: skip


def _git(root: Path, *args: str) -> None:
    subprocess.run(["git", *args], cwd=root, check=True, capture_output=True)


def _repo(tmp_path: Path) -> Path:
    root = tmp_path / "repo"
    (root / "schemas" / "test").mkdir(parents=True)
    _git(root, "init", "-q")
    _git(root, "config", "user.email", "t@example.com")
    _git(root, "config", "user.name", "t")
    _write(root, V1)
    _git(root, "add", "-A")
    _git(root, "commit", "-qm", "v1")
    return root


def _write(root: Path, schema: dict) -> None:
    (root / "schemas" / "test" / "ThingHappened.avsc").write_text(json.dumps(schema, indent=2))


def _with_field(field: dict) -> dict:
    return {**V1, "fields": [*V1["fields"], field]}


def _cli(root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "infra.cli", "schemas", "check", "--repo", str(root), *args],
        capture_output=True, text=True, timeout=60, env={"COLUMNS": "200", "PATH": "/usr/bin:/bin"},
    )  # fmt: skip


def test_compatible_change_passes_in_history_and_against_a_revision(tmp_path):
    root = _repo(tmp_path)
    _write(root, _with_field({"name": "note", "type": ["null", "string"], "default": None, "doc": "n"}))
    [verdict] = check_against_revision("HEAD", "BACKWARD", root)
    assert verdict.status == "compatible"
    assert verdict.diff == ["+ added field 'note' ([\"null\", \"string\"], default null)"]
    _git(root, "commit", "-qam", "v2")
    [verdict] = check_history("BACKWARD", root)
    assert verdict.status == "compatible" and verdict.ok


def test_breaking_change_fails_with_a_readable_diff(tmp_path):
    root = _repo(tmp_path)
    _write(root, _with_field({"name": "currency", "type": "string", "doc": "ISO 4217"}))
    [verdict] = check_against_revision("HEAD", "BACKWARD", root)
    assert verdict.status == "incompatible" and not verdict.ok
    assert verdict.diff == ["+ added field 'currency' (\"string\")"]
    assert any("currency" in p for p in verdict.problems), verdict.problems
    # the same change is fine for a FORWARD subject (old readers ignore the new field)
    assert check_against_revision("HEAD", "FORWARD", root)[0].ok
    result = _cli(root, "--against", "HEAD")
    assert result.returncode == 1
    assert "ThingHappened is incompatible" in result.stderr and "currency" in result.stderr


def test_a_committed_break_stays_visible_in_history(tmp_path):
    root = _repo(tmp_path)
    _write(root, {**V1, "fields": [V1["fields"][0], {"name": "amount_minor", "type": "string", "doc": "x"}]})
    _git(root, "commit", "-qam", "break")
    _write(root, V1)  # a later commit goes back: the break is still in the history
    _git(root, "commit", "-qam", "revert")
    [verdict] = check_history("BACKWARD", root)
    assert verdict.status == "incompatible"
    assert any("amount_minor" in p for p in verdict.problems)
    assert _cli(root, "--against", "history").returncode == 1


def test_this_repository_has_no_breaking_change():
    verdicts = check_history("BACKWARD", REPO_ROOT)
    assert {v.full_name for v in verdicts} == set(load_schemas())
    assert all(v.ok for v in verdicts), [(v.full_name, v.problems) for v in verdicts if not v.ok]


def test_against_the_registry(stack):
    from events.registry_client import Registry

    schemas = load_schemas()
    listen = schemas["backbeat.playback.ListenRecorded"]
    registry = Registry(stack.registry_url)
    registry.register("playback.listens", listen)
    verdicts = {v.against: v for v in check_against_registry(stack.registry_url)}
    assert verdicts["playback.listens-backbeat.playback.ListenRecorded"].status == "unchanged"
    assert verdicts["playback.listens-backbeat.playback.ListenRecorded"].ok


def test_a_registered_version_the_files_break_fails_against_the_registry(stack):
    from events.registry_client import Registry
    from events.schemas import get_schema

    current = get_schema("FileAnalysed")
    topic = next(t for t, spec in load_catalogue().items() if current.full_name in spec.event_types)
    required = [f for f in current.raw["fields"] if "default" not in f and f["name"] != "event_id"]
    old = {**current.raw, "fields": [f for f in current.raw["fields"] if f is not required[0]]}
    registry = Registry(stack.registry_url)
    registry.register_text(subject_for(topic, current.full_name), json.dumps(old))
    verdict = next(v for v in check_against_registry(stack.registry_url) if v.full_name == current.full_name)
    assert verdict.status == "incompatible"
    assert any(required[0]["name"] in p for p in verdict.problems), verdict.problems
    assert "- removed field" not in "\n".join(verdict.diff)
    assert f"+ added field {required[0]['name']!r}" in "\n".join(verdict.diff)
