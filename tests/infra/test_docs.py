"""The README stays true: its CLI reference is what the commands say, it opens with the two
commands, and the event catalogue lists every schema."""

from __future__ import annotations

from events.schemas import load_schemas
from infra.clidoc import README, updated_readme


def test_cli_reference_in_readme_matches_the_commands():
    text = README.read_text(encoding="utf-8")
    assert updated_readme(text) == text, "run: .venv/bin/python -m infra.clidoc"


def test_readme_opens_with_the_two_commands():
    lines = [line for line in README.read_text(encoding="utf-8").splitlines() if line.strip()]
    block = lines[lines.index("```sh") + 1 : lines.index("```")]
    assert block == ["make demo", "make test"]
    assert lines.index("```sh") < 4


def test_readme_lists_every_event_type():
    text = README.read_text(encoding="utf-8")
    for schema in load_schemas().values():
        assert schema.full_name in text, schema.full_name
