"""The files backbeat ships with its code, found with :mod:`importlib.resources`: the Avro schemas
(package ``schemas``), the topic catalogue and the ad campaigns (``infra/topics.toml``,
``infra/campaigns.toml``) and the real data sets of the demo (package ``backbeat_data``, the
repository's ``data/`` folder). The same paths work in a source checkout, an editable install and
a wheel installed anywhere: nothing at run time reads through the checkout.

Data files may be gzip-compressed or plain; :func:`open_data` tells them apart by their first
bytes, whatever their name.
"""

from __future__ import annotations

import gzip
from importlib.resources import files
from pathlib import Path
from typing import BinaryIO

from infra.errors import ConfigError

#: The first two bytes of every gzip member (RFC 1952).
GZIP_MAGIC = b"\x1f\x8b"


def package_dir(package: str) -> Path:
    """The directory of ``package`` on the file system (wheels are installed unpacked, and an
    editable install maps the package onto the checkout).

    Raises:
        ConfigError: the package is not installed (an editable install older than the package:
            install again), or not as a directory (a zip import, for example).
    """
    try:
        root = files(package)
    except ModuleNotFoundError:
        raise ConfigError(
            f"package {package!r} is not installed: install backbeat again "
            "(`make venv`, or `pip install -e .` in the checkout)"
        ) from None
    if not isinstance(root, Path) or not root.is_dir():
        raise ConfigError(f"package {package!r} is not installed as a directory ({root}); reinstall backbeat")
    return root


#: The Avro schema tree (``schemas/<context>/<EventType>.avsc``).
SCHEMAS_DIR = package_dir("schemas")
#: The declarative topic catalogue.
TOPICS_FILE = package_dir("infra") / "topics.toml"
#: The ad campaigns of the Open Bandit items.
CAMPAIGNS_FILE = package_dir("infra") / "campaigns.toml"
#: The real data sets (``data/`` in the repository, with ``SOURCES.md``).
DATA_DIR = package_dir("backbeat_data")

LISTENS_30MUSIC = DATA_DIR / "listens_30music_2014.tsv.gz"
LISTENS_LASTFM1K = DATA_DIR / "listens_lastfm1k_sample.tsv.gz"
CATALOG_SPOTIFY = DATA_DIR / "catalog_spotify_songs_2020.csv.gz"
ADS_OPEN_BANDIT = DATA_DIR / "ads_open_bandit" / "random" / "all" / "all.csv.gz"


def is_gzip(path: Path) -> bool:
    """Whether the file at ``path`` starts with the gzip magic bytes.

    Raises:
        OSError: the file cannot be read.
    """
    with open(path, "rb") as handle:
        return handle.read(2) == GZIP_MAGIC


def open_data(path: Path) -> BinaryIO:
    """Open a data file for reading bytes, decompressing it when it is gzip (by its magic bytes,
    so ``x.tsv`` and ``x.tsv.gz`` both work whichever form they hold). Close it after use.

    Raises:
        OSError: the file cannot be read (a corrupt gzip stream raises ``gzip.BadGzipFile``, an
            ``OSError``, or ``EOFError`` when truncated, while reading).
    """
    if is_gzip(path):
        return gzip.GzipFile(path, "rb")
    return open(path, "rb")


def read_data_bytes(path: Path) -> bytes:
    """The whole content of a data file, decompressed when it is gzip (see :func:`open_data`).

    Raises:
        OSError: the file cannot be read, or is corrupt gzip.
    """
    try:
        with open_data(path) as handle:
            return handle.read()
    except EOFError as exc:  # a truncated gzip stream
        raise OSError(f"truncated gzip file: {exc}") from exc


__all__ = [
    "ADS_OPEN_BANDIT",
    "CAMPAIGNS_FILE",
    "CATALOG_SPOTIFY",
    "DATA_DIR",
    "GZIP_MAGIC",
    "LISTENS_30MUSIC",
    "LISTENS_LASTFM1K",
    "SCHEMAS_DIR",
    "TOPICS_FILE",
    "is_gzip",
    "open_data",
    "package_dir",
    "read_data_bytes",
]
