"""backbeat installed as a user installs it: a wheel built from a copy of the sources, installed
into a fresh virtual environment, run from another directory after the copy is deleted. The
installed ``backbeat`` must find its schemas, topic catalogue, campaigns and demo data in the
packages (``importlib.resources``), never in a checkout.

To stay fast and offline the wheel is built without build isolation (setuptools from the dev
dependencies) and the fresh environment borrows this environment's third-party packages through a
``.pth`` file naming a directory of links to them (backbeat's own editable install left out);
backbeat itself is installed from the wheel only.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from infra.processes import free_port
from infra.settings import REPO_ROOT
from tests.infra.test_standalone import repository_files

pytestmark = pytest.mark.integration

#: The wheel carries the data sets (gzipped, ~4.5 MB): it must stay about that size.
MAX_WHEEL_BYTES = 8_000_000


def _run(argv: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, check=False, **kwargs)  # type: ignore[call-overload]


def _ok(result: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert result.returncode == 0, (
        f"{result.args}: exit {result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    )
    return result


def _borrowed_site_packages(tmp: Path) -> Path:
    """A directory of links to this environment's installed distributions, without backbeat."""
    here = Path(sysconfig.get_paths()["purelib"])
    links = tmp / "deps"
    links.mkdir()
    for entry in here.iterdir():
        name = entry.name
        if name.startswith(("__editable__", "backbeat")) or name.endswith(".pth") or name == "__pycache__":
            continue
        (links / name).symlink_to(entry)
    return links


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A fresh venv with backbeat installed from a wheel of a copy of the sources (then deleted)."""
    tmp = tmp_path_factory.mktemp("install")
    source = tmp / "source"
    for path in repository_files():
        target = source / path.relative_to(REPO_ROOT)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, target)
    wheels = tmp / "wheels"
    _ok(_run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
              "--wheel-dir", str(wheels), str(source)]))  # fmt: skip
    [wheel] = wheels.glob("backbeat-*.whl")
    shutil.rmtree(source)  # nothing may read the sources from here on

    venv = tmp / "venv"
    _ok(_run([sys.executable, "-m", "venv", "--without-pip", str(venv)]))
    python = venv / "bin" / "python"
    purelib = Path(_ok(_run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]))
                   .stdout.strip())  # fmt: skip
    (purelib / "_backbeat_test_deps.pth").write_text(f"{_borrowed_site_packages(tmp)}\n")
    _ok(_run([sys.executable, "-m", "pip", "--python", str(python), "install", "--quiet", "--no-deps",
              "--no-index", str(wheel)]))  # fmt: skip
    # --no-deps above, but the wheel's declared requirements must all be met by what it borrows
    _ok(_run([sys.executable, "-m", "pip", "--python", str(python), "check"]))
    elsewhere = tmp / "elsewhere"
    elsewhere.mkdir()
    return {"wheel": wheel, "venv": venv, "python": python, "purelib": purelib, "cwd": elsewhere}


def _env(data_dir: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BACKBEAT_", "PYTHON", "VIRTUAL_ENV"))}
    return env | {
        "BACKBEAT_BOOTSTRAP_SERVERS": f"127.0.0.1:{free_port()}",
        "BACKBEAT_REGISTRY_URL": f"http://127.0.0.1:{free_port()}",
        "BACKBEAT_DATA_DIR": str(data_dir),
        "COLUMNS": "160",
    }


def test_the_wheel_holds_the_package_data_and_stays_small(installed):
    wheel = installed["wheel"]
    assert wheel.stat().st_size < MAX_WHEEL_BYTES
    names = set(zipfile.ZipFile(wheel).namelist())
    for expected in ("infra/topics.toml", "infra/campaigns.toml", "schemas/playback/ListenRecorded.avsc",
                     "schemas/playback/history/ListenRecorded.v1.avsc", "backbeat_data/SOURCES.md",
                     "backbeat_data/listens_30music_2014.tsv.gz", "backbeat_data/catalog_spotify_songs_2020.csv.gz",
                     "backbeat_data/ads_open_bandit/random/all/all.csv.gz",
                     "backbeat_data/ads_open_bandit/LICENSE.obp-apache-2.0"):  # fmt: skip
        assert expected in names, expected
    assert not [n for n in names if n.startswith(("tests/", "benchmarks/", "docs/"))]


def test_the_installed_packages_come_from_the_venv_not_the_checkout(installed):
    code = "import infra.resources as r, events; print(r.SCHEMAS_DIR, r.DATA_DIR, r.TOPICS_FILE, events.__file__)"
    out = _ok(_run([str(installed["python"]), "-c", code], cwd=installed["cwd"], env=_env(installed["cwd"]))).stdout
    for path in out.split():
        assert Path(path).is_relative_to(installed["purelib"]), out


def test_installed_backbeat_runs_the_demo_from_another_directory(installed, tmp_path: Path):
    backbeat = str(installed["venv"] / "bin" / "backbeat")
    env, cwd = _env(tmp_path / "var"), installed["cwd"]
    assert "demo" in _ok(_run([backbeat, "--help"], cwd=cwd, env=env)).stdout
    history = _run([backbeat, "schemas", "check", "--against", "history"], cwd=cwd, env=env)
    assert history.returncode == 1 and "not a git checkout" in history.stderr  # a clear error,
    assert "Traceback" not in history.stderr  # not a crash
    _ok(_run([backbeat, "up"], cwd=cwd, env=env))
    try:
        check = _ok(_run([backbeat, "schemas", "check"], cwd=cwd, env=env, timeout=120))
        assert "no breaking change" in check.stdout
        demo = _ok(_run([backbeat, "demo"], cwd=cwd, env=env, timeout=900))
        assert "Top artists" in demo.stdout and "Made for You" in demo.stdout
        listens = _ok(_run([backbeat, "sql", "SELECT count(*) AS n FROM listens"], cwd=cwd, env=env))
        assert "86468" in listens.stdout.replace(",", ""), listens.stdout  # the 30Music listens, deduplicated
    finally:
        _run([backbeat, "down"], cwd=cwd, env=env, timeout=120)
    assert not (tmp_path / "var" / "run" / "broker.pid").exists()
