"""The docs stay true to the code: the generated CLI reference is what the commands say, and the
README is the short front door it promises to be: it opens with the two commands, stays short,
copies nothing from the docs site, links only to what exists, and its queries run against the
read models' tables. (The event catalogue page is checked in tests/events/test_catalogue.py, the
site's strict build in tests/infra/test_docs_site.py.)"""

from __future__ import annotations

import re
from pathlib import Path

import duckdb
from markdown.extensions.toc import slugify

from infra.clidoc import CLI_DOC, render_markdown
from infra.settings import REPO_ROOT
from projections.lake import write_files
from projections.readmodels import LISTENS, SESSIONS, TRACKS, to_table
from tests.projections.test_readmodels import listen

README = REPO_ROOT / "README.md"
DOCS = REPO_ROOT / "docs"
#: "At most about 250 lines" (issue 14).
MAX_README_LINES = 260


def _readme() -> str:
    return README.read_text(encoding="utf-8")


def test_cli_reference_page_is_what_the_commands_say():
    assert CLI_DOC.read_text(encoding="utf-8") == render_markdown(), "run: .venv/bin/python -m infra.clidoc"


def test_every_command_is_in_the_cli_reference():
    text = CLI_DOC.read_text(encoding="utf-8")
    for command in ("backbeat demo", "backbeat demo ads", "backbeat sql", "backbeat replay", "backbeat sagas run"):
        assert f"## `{command}`" in text, command


def test_readme_opens_with_the_two_commands():
    lines = [line for line in _readme().splitlines() if line.strip()]
    block = lines[lines.index("```sh") + 1 : lines.index("```")]
    assert block == ["make demo", "make test"]
    assert lines.index("```sh") < 4


def test_readme_is_short():
    assert len(_readme().splitlines()) <= MAX_README_LINES


def _lines(text: str) -> set[str]:
    """The lines worth comparing: stripped, long enough to say something."""
    return {s for line in text.splitlines() if len(s := line.strip()) >= 25 and re.search(r"[A-Za-z]{3}", s)}


def test_readme_copies_no_line_of_the_docs():
    docs = set().union(*(_lines(p.read_text(encoding="utf-8")) for p in DOCS.rglob("*.md")))
    assert sorted(_lines(_readme()) & docs) == []


LINK = re.compile(r"\]\(([^)\s]+)\)")


def _anchors(page: Path) -> set[str]:
    """The heading ids mkdocs gives a page (its toc slugs)."""
    text = re.sub(r"```.*?```", "", page.read_text(encoding="utf-8"), flags=re.S)
    return {slugify(re.sub(r"[`*]", "", m), "-") for m in re.findall(r"^#{1,6} (.+)$", text, flags=re.M)}


def test_readme_links_point_to_what_exists():
    links = [target for target in LINK.findall(_readme()) if not target.startswith(("http://", "https://"))]
    assert len(links) >= 10  # it links into the docs
    broken = []
    for target in links:
        path, _, anchor = target.partition("#")
        file = REPO_ROOT / path
        if not file.exists():
            broken.append(target)
        elif anchor and anchor not in _anchors(file):
            broken.append(target)
    assert broken == []


#: ``backbeat sql "…"`` lines of the README (the queries to try).
SQL = re.compile(r'backbeat sql "(.+)"\s*$', re.M)


def test_readme_queries_run_against_the_read_models(tmp_path: Path, monkeypatch):
    queries = SQL.findall(_readme())
    assert len(queries) == 5
    conn = duckdb.connect()
    for projection in (LISTENS, SESSIONS, TRACKS):
        conn.execute(projection.ddl)
    rows = to_table(LISTENS, [listen(i) for i in range(3)], [0, 0, 0], [0, 1, 2])
    conn.register("new_rows", rows)
    conn.execute("INSERT INTO listens SELECT * FROM new_rows")
    lake = tmp_path / "var" / "lake"
    assert write_files(lake, LISTENS, rows, 1)
    monkeypatch.chdir(tmp_path)  # the lake query reads var/lake/… relative to where it runs
    for sql in queries:
        result = conn.execute(sql).fetchall()
        assert isinstance(result, list), sql
