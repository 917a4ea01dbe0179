"""The README's merged sections are the files under docs/readme/ (tests run their SQL there)."""

from __future__ import annotations

import re

from infra.settings import REPO_ROOT

MARKER = re.compile(r"<!-- section: (docs/readme/[\w.-]+) -->\n(.*?)\n<!-- end section: \1 -->", re.S)


def test_readme_sections_equal_their_files() -> None:
    readme = (REPO_ROOT / "README.md").read_text()
    found = {path: body for path, body in MARKER.findall(readme)}
    files = sorted(p.relative_to(REPO_ROOT).as_posix() for p in (REPO_ROOT / "docs" / "readme").glob("*.md"))
    assert sorted(found) == files
    for path, body in found.items():
        assert body == (REPO_ROOT / path).read_text().rstrip(), f"README section {path} is stale"
