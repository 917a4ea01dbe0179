"""``infra/ensure-postgres.sh`` (run by ``make test``): it installs PostgreSQL with apt-get when it
can, and otherwise says clearly what to install and that the PostgreSQL saga tests will fail,
without stopping the rest of the suite. Run here with a fake PATH and library folder, so nothing
is installed."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from infra.settings import REPO_ROOT

SCRIPT = REPO_ROOT / "infra" / "ensure-postgres.sh"
#: What the script runs besides bash builtins.
TOOLS = ("ls", "sort", "tail", "dirname", "cat", "awk", "env")


def _script(path: Path, body: str) -> None:
    path.unlink(missing_ok=True)  # never write through a link to a real tool
    path.write_text(f"#!/bin/sh\n{body}\n")
    path.chmod(0o755)


@pytest.fixture
def bin_dir(tmp_path: Path) -> Path:
    """A PATH with the tools the script needs and nothing else (no apt-get, sudo or initdb)."""
    bins = tmp_path / "bin"
    bins.mkdir()
    for tool in TOOLS:
        (bins / tool).symlink_to(shutil.which(tool))
    return bins


def run(bin_dir: Path, lib_dir: Path, **env: str) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if k != "BACKBEAT_TEST_POSTGRES_URL"}
    return subprocess.run(
        [shutil.which("bash"), str(SCRIPT)],
        env=base | {"PATH": str(bin_dir), "PG_LIB_DIR": str(lib_dir), **env},
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip


def fake_postgres(bindir: Path, version: str = "16.4") -> None:
    bindir.mkdir(parents=True)
    _script(bindir / "initdb", f'echo "initdb (PostgreSQL) {version}"')
    _script(bindir / "pg_ctl", "exit 0")
    _script(bindir / "postgres", "exit 0")


def assert_explains(result: subprocess.CompletedProcess[str], why: str) -> None:
    assert result.returncode == 0, result.stderr  # the rest of the suite still runs
    assert why in result.stderr
    for words in ("PostgreSQL saga tests", "will FAIL", "apt-get install -y postgresql", "dnf install",
                  "brew install", "BACKBEAT_TEST_POSTGRES_URL"):  # fmt: skip
        assert words in result.stderr, words


def test_installed_postgres_is_reported(bin_dir: Path, tmp_path: Path):
    fake_postgres(tmp_path / "lib" / "16" / "bin")
    result = run(bin_dir, tmp_path / "lib")
    assert result.returncode == 0 and "saga tests use PostgreSQL 16.4 from" in result.stdout


def test_postgres_on_path_is_found_too(bin_dir: Path, tmp_path: Path):
    fake_postgres(tmp_path / "opt" / "bin", "17.1")
    result = run(bin_dir, tmp_path / "no-lib", PATH=f"{bin_dir}:{tmp_path / 'opt' / 'bin'}")
    assert result.returncode == 0 and "PostgreSQL 17.1" in result.stdout


def test_a_configured_server_needs_nothing_installed(bin_dir: Path, tmp_path: Path):
    result = run(bin_dir, tmp_path / "no-lib", BACKBEAT_TEST_POSTGRES_URL="postgresql://x@db:5432/t")
    assert result.returncode == 0 and "BACKBEAT_TEST_POSTGRES_URL" in result.stdout


def test_without_apt_get_it_says_what_to_install(bin_dir: Path, tmp_path: Path):
    assert_explains(run(bin_dir, tmp_path / "no-lib"), "apt-get is not available")


def test_without_root_or_sudo_it_says_what_to_install(bin_dir: Path, tmp_path: Path):
    _script(bin_dir / "apt-get", f"touch {tmp_path / 'apt-get-ran'}")
    _script(bin_dir / "id", "echo 1000")
    assert_explains(run(bin_dir, tmp_path / "no-lib"), "needs root (no sudo here)")
    assert not (tmp_path / "apt-get-ran").exists()


def test_a_failed_install_says_what_to_install(bin_dir: Path, tmp_path: Path):
    _script(bin_dir / "apt-get", "exit 100")
    _script(bin_dir / "id", "echo 0")
    assert_explains(run(bin_dir, tmp_path / "no-lib"), "apt-get update' failed")


def test_apt_get_installs_it_when_missing(bin_dir: Path, tmp_path: Path):
    lib = tmp_path / "lib"
    # a fake apt-get that "installs" the binaries where Debian puts them
    _script(bin_dir / "apt-get", f'case "$*" in *install*) mkdir -p {lib}/16/bin && cd {lib}/16/bin && '
            f'printf \'#!/bin/sh\\necho "initdb (PostgreSQL) 16.9"\\n\' > initdb && '
            f"printf '#!/bin/sh\\n' > pg_ctl && cp pg_ctl postgres && chmod +x initdb pg_ctl postgres;; esac")  # fmt: skip
    _script(bin_dir / "id", "echo 0")
    for tool in ("mkdir", "printf", "cp", "chmod"):
        (bin_dir / tool).symlink_to(shutil.which(tool))
    result = run(bin_dir, lib)
    assert result.returncode == 0, result.stderr
    assert "installing PostgreSQL" in result.stdout and "PostgreSQL 16.9" in result.stdout
