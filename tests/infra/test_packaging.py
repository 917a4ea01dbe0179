"""The wheel's package list (``pyproject.toml``, listed by hand because ``data/`` installs as
``backbeat_data``) holds every package of the code, so no module is left out of an install."""

from __future__ import annotations

import tomllib

from infra.settings import REPO_ROOT

CODE = ("events", "infra", "personalisation", "projections", "sagas", "streams")


def test_every_code_package_is_listed_in_pyproject():
    config = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(config["packages"])
    found = {
        d.relative_to(REPO_ROOT).as_posix().replace("/", ".")
        for top in CODE
        for d in [REPO_ROOT / top, *(REPO_ROOT / top).rglob("*")]
        if d.is_dir() and d.name != "__pycache__" and any(d.glob("*.py"))
    }
    assert found <= listed, f"add to [tool.setuptools] packages: {sorted(found - listed)}"
    assert {"schemas", "backbeat_data"} <= listed
    assert config["package-dir"] == {"backbeat_data": "data"}
