"""``projections reset`` drops a projection's views and table macros with its table, and leaves
other projections' alone."""

from __future__ import annotations

from pathlib import Path

import duckdb

from infra.settings import Settings
from projections.readmodels import PROJECTIONS
from projections.tracking import reset


def _objects(path: Path) -> tuple[set[str], set[str]]:
    con = duckdb.connect(str(path))
    try:
        views = {r[0] for r in con.execute("SELECT view_name FROM duckdb_views() WHERE NOT internal").fetchall()}
        macros = {
            r[0]
            for r in con.execute(
                "SELECT function_name FROM duckdb_functions() WHERE function_type = 'table_macro' AND NOT internal"
            ).fetchall()
        }
        return views, macros
    finally:
        con.close()


def test_reset_drops_the_views_and_macros_of_the_projection_only(tmp_path: Path) -> None:
    settings = Settings.from_env({"BACKBEAT_DATA_DIR": str(tmp_path)})
    settings.duckdb_path.parent.mkdir(parents=True, exist_ok=True)
    con = duckdb.connect(str(settings.duckdb_path))
    for name in ("user_features", "track_features"):
        con.execute(PROJECTIONS[name].ddl)
        for ddl in PROJECTIONS[name].extra_ddl:
            con.execute(ddl)
    con.close()
    views, macros = _objects(settings.duckdb_path)
    assert {"user_features_latest", "track_features_latest"} <= views
    assert {"user_features_as_of", "track_features_as_of"} <= macros

    assert reset(settings, ["user_features"]) == ["user_features"]
    views, macros = _objects(settings.duckdb_path)
    assert "user_features_latest" not in views and "user_features_as_of" not in macros
    assert "track_features_latest" in views and "track_features_as_of" in macros
