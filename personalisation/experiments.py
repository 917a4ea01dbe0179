"""Deterministic A/B experiment assignment (pure: no I/O), and the experiments backbeat runs.

The rule: a user's *bucket* in an experiment is ``int(SHA-256("<experiment_id>|<version>|
<user_id>")[:8 bytes], big-endian) mod 10000``, a number in 0..9999; the experiment's variants
own consecutive bucket ranges sized by their weights in basis points (1 bp = 0.01 %, weights
sum to 10000), in declaration order. So assignment is a pure function of (user, experiment,
version): sticky with no stored state, the same on every machine and in every replay, and
independent between experiments (the experiment id is hashed with the user, as in Kohavi et
al., "Controlled experiments on the web: survey and practical guide", Data Min. Knowl. Disc.
18 (2009), §4.1.1: consistent per user, right proportions, no correlation across experiments).
The version is hashed too: changing the weights needs a new version, which re-randomises every
user (no carry-over between allocations). The modulo bias of 2**64 mod 10000 is below 1e-15.

``MADE_FOR_YOU`` is the recommendation experiment the ``recommendations`` read model runs:
``control`` gets the most-popular list, ``streaming`` the streaming model's
(:mod:`personalisation.session_model`), 50/50. Version 1 served the item-to-item co-occurrence
model as ``item2item``; the change of model made version 2, so every user is randomised anew.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass

from infra.errors import ConfigError

#: Buckets per experiment: weights are in basis points of this.
BUCKETS = 10_000


@dataclass(frozen=True)
class Variant:
    """One arm: ``name`` (e.g. ``control``), ``weight_bp`` (share in basis points, 0..10000)
    and ``model`` (the name of what serves it, e.g. ``most-popular-v1``)."""

    name: str
    weight_bp: int
    model: str = ""


@dataclass(frozen=True)
class Experiment:
    """An experiment: id, allocation ``version`` (>= 1) and ``variants`` in bucket order.

    Raises:
        ConfigError: no variants, a repeated or empty variant name, a negative weight, or
            weights that do not sum to 10000 basis points.
    """

    experiment_id: str
    version: int
    variants: tuple[Variant, ...]

    def __post_init__(self) -> None:
        where = f"experiment {self.experiment_id!r} version {self.version}"
        if not self.experiment_id:
            raise ConfigError("an experiment needs a non-empty experiment_id")
        if self.version < 1:
            raise ConfigError(f"{where}: version must be >= 1")
        if not self.variants:
            raise ConfigError(f"{where} has no variants; declare at least one")
        names = [v.name for v in self.variants]
        if any(not n for n in names) or len(set(names)) != len(names):
            raise ConfigError(f"{where}: variant names must be non-empty and distinct, got {names}")
        if any(v.weight_bp < 0 for v in self.variants):
            raise ConfigError(f"{where}: weights must be >= 0 basis points, got {self.weights}")
        if sum(v.weight_bp for v in self.variants) != BUCKETS:
            raise ConfigError(
                f"{where}: weights {self.weights} sum to {sum(v.weight_bp for v in self.variants)} "
                f"basis points; they must sum to {BUCKETS} (e.g. 5000/5000 for 50/50)"
            )

    @property
    def weights(self) -> dict[str, int]:
        """``{variant name: weight in basis points}``."""
        return {v.name: v.weight_bp for v in self.variants}

    def variant(self, name: str) -> Variant:
        """The variant called ``name``.

        Raises:
            ConfigError: no such variant (the message lists them).
        """
        for v in self.variants:
            if v.name == name:
                return v
        raise ConfigError(
            f"experiment {self.experiment_id!r} has no variant {name!r}; it has {list(self.weights)}"
        )


@dataclass(frozen=True)
class Assignment:
    """Where a user fell: ``variant`` name and ``bucket`` (0..9999) in ``experiment_id`` at
    ``version``."""

    experiment_id: str
    version: int
    variant: str
    bucket: int


def bucket_of(user_id: str, experiment_id: str, version: int) -> int:
    """The user's bucket, 0..9999 (the rule in the module docstring)."""
    digest = hashlib.sha256(f"{experiment_id}|{version}|{user_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % BUCKETS


def assign(user_id: str, experiment: Experiment) -> Assignment:
    """The variant of ``user_id`` in ``experiment``: the variant whose cumulative basis-point
    range holds the user's bucket (a variant of weight 0 never gets anyone)."""
    bucket = bucket_of(user_id, experiment.experiment_id, experiment.version)
    upper = 0
    for v in experiment.variants:
        upper += v.weight_bp
        if bucket < upper:
            return Assignment(experiment.experiment_id, experiment.version, v.name, bucket)
    raise AssertionError("unreachable: weights sum to BUCKETS")  # checked in Experiment


def assignment_event_id(user_id: str, experiment: Experiment) -> str:
    """The deterministic ``event_id`` of the user's ``ExperimentAssigned`` event: the first 32
    hex chars of SHA-256 over ``assigned|<experiment_id>|<version>|<user_id>``. Assigning again
    gives the same id (consumers de-duplicate by it); a new version gives a new id."""
    key = f"assigned|{experiment.experiment_id}|{experiment.version}|{user_id}"
    return hashlib.sha256(key.encode()).hexdigest()[:32]


def shares(assignments: Mapping[str, Assignment]) -> dict[str, float]:
    """Observed share of users per variant (``{variant: fraction}``) of ``{user: assignment}``."""
    total = len(assignments)
    out: dict[str, float] = {}
    for a in assignments.values():
        out[a.variant] = out.get(a.variant, 0.0) + 1.0
    return {k: v / total for k, v in sorted(out.items())} if total else {}


#: Model names of the variants' lists (stored with each list).
POPULAR_MODEL = "most-popular-v1"
STREAMING_MODEL = "session-seq-cooc-v3"

#: "Made for You": most-popular (control) against the streaming model, 50/50 (version 2).
MADE_FOR_YOU = Experiment(
    "made-for-you-v1",
    2,
    (Variant("control", 5000, POPULAR_MODEL), Variant("streaming", 5000, STREAMING_MODEL)),
)

__all__ = [
    "BUCKETS",
    "MADE_FOR_YOU",
    "POPULAR_MODEL",
    "STREAMING_MODEL",
    "Assignment",
    "Experiment",
    "Variant",
    "assign",
    "assignment_event_id",
    "bucket_of",
    "shares",
]
