"""What ships with the code is found through the packages, not the checkout, and every reader of
a data file takes it plain or gzipped (recognised by its magic bytes, whatever its name)."""

from __future__ import annotations

import gzip
import shutil
from pathlib import Path

import pytest

from events.catalog import CATALOGUE_PATH, load_catalogue
from events.importers.ads import parse_ads_file
from events.importers.catalog import parse_catalog_file
from events.importers.listens import parse_listens_file
from infra import resources
from infra.errors import ConfigError
from infra.resources import is_gzip, open_data, read_data_bytes
from personalisation.sessions_data import read_sessions

HEAD_30MUSIC = 2_001  # header + 2,000 rows


def test_shipped_files_are_found_through_their_packages():
    assert (resources.SCHEMAS_DIR / "playback" / "ListenRecorded.avsc").is_file()
    assert resources.TOPICS_FILE.is_file() and resources.CAMPAIGNS_FILE.is_file()
    assert CATALOGUE_PATH == resources.TOPICS_FILE and load_catalogue()
    assert (resources.DATA_DIR / "SOURCES.md").is_file()
    assert (resources.DATA_DIR / "ads_open_bandit" / "LICENSE.obp-apache-2.0").is_file()
    for path in (resources.LISTENS_30MUSIC, resources.LISTENS_LASTFM1K, resources.CATALOG_SPOTIFY,
                 resources.ADS_OPEN_BANDIT):  # fmt: skip
        assert path.is_file() and is_gzip(path), path


def test_package_dir_of_a_missing_package_says_to_install_again():
    with pytest.raises(ConfigError, match="install backbeat again"):
        resources.package_dir("no_such_backbeat_package")


def _head(path: Path, lines: int) -> bytes:
    with open_data(path) as handle:
        return b"".join(line for _, line in zip(range(lines), handle, strict=False))


@pytest.fixture(scope="module")
def forms(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The same 30Music slice four ways: plain and gzip, each under a plain and a .gz name."""
    tmp = tmp_path_factory.mktemp("forms")
    body = _head(resources.LISTENS_30MUSIC, HEAD_30MUSIC)
    (tmp / "plain.tsv").write_bytes(body)
    (tmp / "plain-named.tsv.gz").write_bytes(body)
    (tmp / "gzip.tsv.gz").write_bytes(gzip.compress(body))
    (tmp / "gzip-named.tsv").write_bytes(gzip.compress(body))
    return {p.name: p for p in tmp.iterdir()}


def test_open_data_decompresses_by_magic_bytes_not_by_name(forms: dict[str, Path]):
    contents = {name: read_data_bytes(path) for name, path in forms.items()}
    assert len(set(contents.values())) == 1
    assert contents["plain.tsv"].count(b"\n") == HEAD_30MUSIC
    assert {name for name, path in forms.items() if is_gzip(path)} == {"gzip.tsv.gz", "gzip-named.tsv"}


def test_listens_and_sessions_read_every_form_alike(forms: dict[str, Path]):
    parsed = {name: parse_listens_file(path, "30music") for name, path in forms.items()}
    first = parsed["plain.tsv"]
    assert first.rows_read == HEAD_30MUSIC - 1 and first.rejected == 0
    assert all(p.records == first.records for p in parsed.values())
    sessions = {name: read_sessions(path) for name, path in forms.items()}
    assert len({tuple(s) for s in sessions.values()}) == 1 and sessions["plain.tsv"]


def test_catalog_and_ads_read_plain_and_gzip_alike(tmp_path: Path):
    catalog = tmp_path / "catalog.csv"
    catalog.write_bytes(_head(resources.CATALOG_SPOTIFY, 301))
    head = parse_catalog_file(catalog).records
    assert head and head == parse_catalog_file(resources.CATALOG_SPOTIFY).records[: len(head)]
    ads_dir = tmp_path / "random" / "all"  # the policy comes from the folder names
    ads_dir.mkdir(parents=True)
    plain = ads_dir / "all.csv"
    plain.write_bytes(read_data_bytes(resources.ADS_OPEN_BANDIT))
    shipped = parse_ads_file(resources.ADS_OPEN_BANDIT)
    assert parse_ads_file(plain).events == shipped.events and shipped.impressions == 10_000


def test_a_corrupt_or_truncated_gzip_file_is_a_clear_error(tmp_path: Path):
    truncated = tmp_path / "cut.tsv.gz"
    truncated.write_bytes(resources.LISTENS_30MUSIC.read_bytes()[:5_000])
    with pytest.raises(ConfigError, match="cannot read .*cut.tsv.gz"):
        parse_listens_file(truncated, "30music")
    corrupt = tmp_path / "bad.csv.gz"
    corrupt.write_bytes(b"\x1f\x8bnot really gzip")
    with pytest.raises(ConfigError, match="cannot read .*bad.csv.gz"):
        parse_catalog_file(corrupt)


def test_a_shipped_file_decompressed_by_hand_parses_the_same(tmp_path: Path):
    plain = tmp_path / "listens.tsv"
    with open_data(resources.LISTENS_LASTFM1K) as src, plain.open("wb") as out:
        shutil.copyfileobj(src, out)
    assert parse_listens_file(plain, "lastfm1k").records == parse_listens_file(
        resources.LISTENS_LASTFM1K, "lastfm1k"
    ).records
