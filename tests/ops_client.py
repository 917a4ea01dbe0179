"""A real HTTP client for the processes' ops endpoints (``/metrics``, ``/health``), shared by the
tests that scrape running processes. Samples are ``{(name, sorted labels): value}``."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

Labels = tuple[tuple[str, str], ...]
Samples = dict[tuple[str, Labels], float]


def get(url: str, timeout_s: float = 5.0) -> tuple[int, str] | None:
    """``(status, body)`` of ``GET url``; ``None`` while nothing listens there."""
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return None


def health(base: str) -> tuple[int, dict[str, Any]] | None:
    """``(status, document)`` of ``<base>/health``; ``None`` while nothing listens."""
    got = get(f"{base}/health")
    return None if got is None else (got[0], json.loads(got[1]))


def scrape(base: str, *, required: bool = True) -> Samples:
    """Every sample of ``<base>/metrics``. ``required``: fail when it does not answer 200
    (else an empty dict)."""
    got = get(f"{base}/metrics")
    if got is None or got[0] != 200:
        assert not required, got
        return {}
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(got[1])
        for s in family.samples
    }


def matching(samples: Samples, name: str, **labels: str) -> dict[Labels, float]:
    """The samples of ``name`` whose labels include ``labels``."""
    want = set(labels.items())
    return {lab: v for (n, lab), v in samples.items() if n == name and want <= set(lab)}


def value(samples: Samples, name: str, **labels: str) -> float | None:
    """The one sample of ``name`` with exactly ``labels`` (``None`` when absent)."""
    return samples.get((name, tuple(sorted(labels.items()))))


def total(samples: Samples, name: str, **labels: str) -> float:
    """The sum of the samples of ``name`` whose labels include ``labels`` (0 when none)."""
    return sum(matching(samples, name, **labels).values())
