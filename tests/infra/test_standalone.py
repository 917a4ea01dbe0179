"""A clone stands alone: no file of the repository (code, tests, docs, README) reads or points to
anything beside it, such as the sibling ``shared`` folder the data sets used to come from."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

from infra.settings import REPO_ROOT

#: The sibling folder's name, spelled in pieces so that this file does not itself point at it.
_SIBLING = "sha" + "red"
#: Ways of pointing outside the repository: the sibling folder, and its data folder by any path.
OUTSIDE = re.compile(rf"\.\./{_SIBLING}|{_SIBLING}/data|{_SIBLING}\" */ *\"data|\"{_SIBLING}\"")


def repository_files() -> list[Path]:
    """Every file of the checkout: tracked, or new and not ignored."""
    out = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO_ROOT, capture_output=True, check=True,
    ).stdout  # fmt: skip
    return [REPO_ROOT / name for name in out.decode().split("\0") if name and (REPO_ROOT / name).is_file()]


def lines_matching(pattern: re.Pattern[str], skip: set[Path]) -> list[str]:
    """``path:line: text`` for each line of a text file of the repository that matches."""
    found = []
    for path in repository_files():
        if path in skip:
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:  # the gzipped data sets
            continue
        for number, line in enumerate(text.splitlines(), start=1):
            if pattern.search(line):
                found.append(f"{path.relative_to(REPO_ROOT)}:{number}: {line.strip()[:120]}")
    return found


def test_nothing_points_to_the_shared_folder_outside_the_repository():
    assert lines_matching(OUTSIDE, skip={Path(__file__).resolve()}) == []


def test_the_pattern_catches_the_old_spellings():
    for old in (f'DATA = REPO_ROOT.parent / "{_SIBLING}" / "data"', f"`../{_SIBLING}/data/SOURCES.md`",
                f"/work/{_SIBLING}/data"):  # fmt: skip
        assert OUTSIDE.search(old), old


#: The design and broker notes that used to live beside the repository, by their old names.
OLD_NOTES = re.compile(r"\b(DESIGN|TANSU)(\.md\b| §)")
#: ``docs/broker.md §2``, ``broker.md §1, §4``, ``docs/design.md §3–§4``: a page and its sections.
SECTION_REF = re.compile(r"(?:docs/)?\b(broker|design)\.md`?((?:[ ,;–-]*§\d+)+)")


def test_nothing_points_to_the_old_design_and_broker_notes():
    assert lines_matching(OLD_NOTES, skip={Path(__file__).resolve()}) == []


def test_every_cited_section_of_the_design_and_broker_pages_exists():
    headings = {
        page: set(re.findall(r"^## (\d+)\. ", (REPO_ROOT / "docs" / f"{page}.md").read_text(), flags=re.M))
        for page in ("broker", "design")
    }
    assert headings["broker"] == {str(n) for n in range(1, 14)}  # the numbering code comments cite
    missing = []
    for path in repository_files():
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
        for match in SECTION_REF.finditer(text):
            for number in re.findall(r"§(\d+)", match.group(2)):
                if number not in headings[match.group(1)]:
                    missing.append(f"{path.relative_to(REPO_ROOT)}: {match.group(0)}")
    assert missing == []
    assert len(lines_matching(SECTION_REF, skip=set())) > 40  # the references were found at all
