"""The generated docs: the README's CLI reference, from the ``backbeat`` command tree itself, and
the event catalogue (:mod:`events.catalogue_doc`).

``python -m infra.clidoc`` rewrites the part of README.md between the markers
``<!-- cli-reference:start -->`` and ``<!-- cli-reference:end -->``, the README's short event
summary between ``<!-- events:start -->`` and ``<!-- events:end -->``, and the full catalogue page
``docs/events.md``; tests fail when these and the commands or schemas disagree, so ``--help``,
the schemas and the docs never drift apart.
"""

from __future__ import annotations

import inspect
import sys
from typing import Any

import typer.main

from infra.settings import REPO_ROOT

START = "<!-- cli-reference:start -->"
END = "<!-- cli-reference:end -->"
README = REPO_ROOT / "README.md"
EVENTS_DOC = REPO_ROOT / "docs" / "events.md"


# typer vendors its own click; commands and parameters are duck-typed here.
def _commands(group: Any, prefix: str) -> list[tuple[str, Any]]:
    out: list[tuple[str, Any]] = []
    ctx = group.context_class(group)
    for name in group.list_commands(ctx):
        cmd = group.get_command(ctx, name)
        if cmd is None or cmd.hidden:
            continue
        path = f"{prefix} {name}"
        if hasattr(cmd, "list_commands"):
            out.extend(_commands(cmd, path))
        else:
            out.append((path, cmd))
    return out


def _param_line(param: Any) -> str:
    if param.param_type_name == "argument":
        return f"- `{(param.metavar or param.name).upper()}`: {getattr(param, 'help', '') or ''}".rstrip()
    names = ", ".join(f"`{o}`" for o in [*param.opts, *param.secondary_opts])
    default = ""
    if param.show_default is not False and param.default not in (None, (), False) and not param.is_flag:
        default = f" (default: `{param.default}`)"
    elif param.is_flag and param.secondary_opts:
        default = f" (default: `{param.opts[0] if param.default else param.secondary_opts[0]}`)"
    return f"- {names}: {param.help or ''}{default}".rstrip()


def render_markdown() -> str:
    """The CLI reference as Markdown: one section per command with its help and parameters."""
    from infra.cli import app

    root = typer.main.get_command(app)
    parts = [f"`backbeat --help`: {inspect.cleandoc(root.help or '').splitlines()[0]}", ""]
    for path, cmd in _commands(root, "backbeat"):
        parts.append(f"#### `{path}`")
        parts.append("")
        parts.append(inspect.cleandoc(cmd.help or ""))
        params = [p for p in cmd.params if p.name != "help"]
        if params:
            parts.append("")
            parts.extend(_param_line(p) for p in params)
        parts.append("")
    return "\n".join(parts).rstrip() + "\n"


EVENTS_START = "<!-- events:start -->"
EVENTS_END = "<!-- events:end -->"


def _replace(text: str, start: str, end: str, body: str) -> str:
    head, sep, rest = text.partition(start)
    _, sep2, tail = rest.partition(end)
    if not sep or not sep2:
        raise ValueError(f"README.md lacks the markers {start} … {end}")
    return f"{head}{start}\n{body}{end}{tail}"


def updated_readme(text: str) -> str:
    """``text`` with the generated parts (CLI reference, event summary) rewritten.

    Raises:
        ValueError: the markers are missing.
    """
    from events.catalogue_doc import render_events_summary

    text = _replace(text, START, END, render_markdown())
    link = EVENTS_DOC.relative_to(REPO_ROOT).as_posix()
    return _replace(text, EVENTS_START, EVENTS_END, render_events_summary(link))


def events_doc() -> str:
    """The full event catalogue page, as ``docs/events.md`` must hold it."""
    from events.catalogue_doc import render_events_markdown

    return render_events_markdown()


def main() -> None:
    """Rewrite README.md's generated parts and docs/events.md in place."""
    text = README.read_text(encoding="utf-8")
    new = updated_readme(text)
    if new != text:
        README.write_text(new, encoding="utf-8")
        print("README.md: generated sections updated", file=sys.stderr)
    page = events_doc()
    old = EVENTS_DOC.read_text(encoding="utf-8") if EVENTS_DOC.exists() else None
    if page != old:
        EVENTS_DOC.parent.mkdir(parents=True, exist_ok=True)
        EVENTS_DOC.write_text(page, encoding="utf-8")
        print(f"{EVENTS_DOC.relative_to(REPO_ROOT)}: event catalogue updated", file=sys.stderr)


if __name__ == "__main__":
    main()
