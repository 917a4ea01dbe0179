"""The docs site builds with ``mkdocs build --strict``: a broken link or anchor, a page left out of
the nav, a missing include or an API reference that does not resolve fails ``pytest`` as it
fails ``make test``. Built into a temporary directory (about 5 s)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from infra.settings import REPO_ROOT


def test_the_docs_site_builds_strictly(tmp_path: Path):
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file", str(REPO_ROOT / "mkdocs.yml"),
         "--site-dir", str(tmp_path / "site")],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
        env=os.environ | {"NO_MKDOCS_2_WARNING": "1"},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-5000:]
    assert (tmp_path / "site" / "index.html").is_file()
    # the generated pages and the included data sources made it into the site
    for page in ("cli", "events", "api", "data-sources"):
        assert (tmp_path / "site" / page / "index.html").is_file(), page
    assert "30Music" in (tmp_path / "site" / "data-sources" / "index.html").read_text()
