"""The generated CLI reference page is what the commands say, and the README opens with the two
commands. (The event catalogue page is checked in tests/events/test_catalogue.py.)"""

from __future__ import annotations

from infra.clidoc import CLI_DOC, render_markdown
from infra.settings import REPO_ROOT

README = REPO_ROOT / "README.md"


def test_cli_reference_page_is_what_the_commands_say():
    assert CLI_DOC.read_text(encoding="utf-8") == render_markdown(), "run: .venv/bin/python -m infra.clidoc"


def test_every_command_is_in_the_cli_reference():
    text = CLI_DOC.read_text(encoding="utf-8")
    for command in ("backbeat demo", "backbeat demo ads", "backbeat sql", "backbeat replay", "backbeat sagas run"):
        assert f"## `{command}`" in text, command


def test_readme_opens_with_the_two_commands():
    lines = [line for line in README.read_text(encoding="utf-8").splitlines() if line.strip()]
    block = lines[lines.index("```sh") + 1 : lines.index("```")]
    assert block == ["make demo", "make test"]
    assert lines.index("```sh") < 4
