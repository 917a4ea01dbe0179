"""``backbeat evaluate`` as a user types it, on a small subset of the real 30Music file written to
tmp_path: JSON lines with their keys, the split command reproducing the default run, the table,
and clear errors (no broker needed)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from infra.settings import REPO_ROOT
from personalisation.evaluation import METHODS
from personalisation.sessions_data import read_sessions, write_sessions
from tests.conftest import LISTENS_30MUSIC


def backbeat(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "infra.cli", *args], cwd=REPO_ROOT, env=os.environ | {"COLUMNS": "200"},
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip


@pytest.fixture(scope="module")
def subset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The first 150 sessions of each of the four windows of the real file."""
    taken: dict[str, int] = {}
    keep = []
    for s in read_sessions(LISTENS_30MUSIC):
        if taken.get(s.split, 0) < 150:
            taken[s.split] = taken.get(s.split, 0) + 1
            keep.append(s)
    path = tmp_path_factory.mktemp("evaluate") / "subset.tsv"
    write_sessions(path, keep)
    return path


def json_lines(result: subprocess.CompletedProcess[str]) -> list[dict]:
    assert result.returncode == 0, result.stderr
    return [json.loads(line) for line in result.stdout.splitlines()]


def test_json_lines_and_split_files_reproduce_the_default_run(subset: Path, tmp_path: Path):
    default = backbeat("evaluate", "recommendations", "--data", str(subset), "--json")
    lines = json_lines(default)
    assert (
        "train: windows test0, test1, test2 (450 sessions); test: window test3 (150 sessions)"
        in default.stderr
    )
    assert [line["method"] for line in lines] == list(METHODS)
    for line in lines:
        assert {"method", "hr_at_20", "mrr_at_20", "sessions", "hr_at_20_ci", "mrr_at_20_ci"} <= set(line)
        assert 0.0 <= line["mrr_at_20"] <= line["hr_at_20"] <= 1.0 and line["sessions"] > 100
        for key in ("hr_at_20", "mrr_at_20"):
            low, high = line[f"{key}_ci"]
            assert low <= line[key] <= high
    by_method = {line["method"]: line for line in lines}
    assert by_method["item-to-item"]["hr_at_20"] > by_method["most-popular"]["hr_at_20"]

    written = backbeat("evaluate", "split", str(subset), "--out", str(tmp_path / "split"))
    assert written.returncode == 0, written.stderr
    assert "window test3, 150 sessions" in written.stdout
    again = json_lines(
        backbeat(
            "evaluate",
            "recommendations",
            "--json",
            "--train",
            str(tmp_path / "split" / "train.tsv"),
            "--test",
            str(tmp_path / "split" / "test.tsv"),
        )  # fmt: skip
    )
    strip = [{k: v for k, v in line.items() if k != "seconds"} for line in lines]
    assert [{k: v for k, v in line.items() if k != "seconds"} for line in again] == strip


def test_table_and_cutoff(subset: Path):
    table = backbeat("evaluate", "recommendations", "--data", str(subset), "--cutoff", "5")
    assert table.returncode == 0, table.stderr
    assert "HR@5" in table.stdout and "MRR@5" in table.stdout
    assert all(method in table.stdout for method in METHODS)
    assert "never occur in training" in table.stdout
    lines = json_lines(
        backbeat("evaluate", "recommendations", "--data", str(subset), "--cutoff", "5", "--json")
    )
    assert all("hr_at_5" in line and line["cutoff"] == 5 for line in lines)


def test_errors_are_clear(subset: Path, tmp_path: Path):
    half = backbeat("evaluate", "recommendations", "--train", str(subset))
    assert half.returncode == 1 and "pass both --train and --test" in half.stderr
    broken = tmp_path / "broken.tsv"
    broken.write_text("UserId\tSessionId\tItemId\tTime\tArtistId\tsplit\n1\t2\t3\tnoon\t4\tw\n")
    bad = backbeat("evaluate", "recommendations", "--train", str(subset), "--test", str(broken))
    assert bad.returncode == 1 and "Traceback" not in bad.stderr
    assert "broken.tsv, line 2: Time is not unix seconds" in " ".join(bad.stderr.split())
    one_window = tmp_path / "one.tsv"
    one_window.write_text("UserId\tSessionId\tItemId\tTime\tArtistId\tsplit\n1\t2\t3\t1400000000\t4\tw\n")
    single = backbeat("evaluate", "split", str(one_window), "--out", str(tmp_path / "x"))
    assert single.returncode == 1 and "only one time window" in " ".join(single.stderr.split())
