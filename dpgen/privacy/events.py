"""DP mechanism events: what a run applies to its sensitive data, as the ledger records it.

Neighbouring relation: add/remove one example of the sensitive training split.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

GAUSSIAN = "gaussian"
POISSON_GAUSSIAN = "poisson_subsampled_gaussian"
MECHANISMS = (POISSON_GAUSSIAN, GAUSSIAN)
NEIGHBOURING = "add_remove"

# Relative slack when checking a spent epsilon against the target: the accountants are
# deterministic, this only absorbs float round-off between equivalent event lists.
EPS_RTOL = 1e-9


def check_mechanism(mechanism: str) -> None:
    if mechanism not in MECHANISMS:
        raise ValueError(f"unknown DP mechanism {mechanism!r}; expected one of {MECHANISMS}")


def check_sigma(noise_multiplier: float, what: str) -> float:
    sigma = float(noise_multiplier)
    if not (math.isfinite(sigma) and sigma > 0):
        raise ValueError(f"{what}: noise_multiplier must be a finite number > 0, got {sigma!r}")
    return sigma


def check_sample_rate(mechanism: str, sample_rate: float, what: str) -> float:
    q = float(sample_rate)
    if mechanism == GAUSSIAN and q != 1.0:
        # A silently ignored rate would hide a mis-declared mechanism (and its amplification).
        raise ValueError(
            f"{what}: the 'gaussian' mechanism has no subsampling, so sample_rate must be 1.0 "
            f"(got {q!r}); use '{POISSON_GAUSSIAN}' for a Poisson-subsampled release"
        )
    if not (0.0 < q <= 1.0):
        raise ValueError(f"{what}: sample_rate must be in (0, 1], got {q!r}")
    return q


def check_count(count: int, what: str) -> int:
    if isinstance(count, bool) or int(count) != count or count < 1:
        raise ValueError(f"{what}: count must be an integer >= 1, got {count!r}")
    return int(count)


@dataclass
class MechanismEvent:
    """One mechanism applied to the sensitive data ``count`` times with the same parameters."""

    stage: str  # e.g. "dp_train", "dp_semantic_query"
    mechanism: str  # "poisson_subsampled_gaussian" | "gaussian"
    noise_multiplier: float  # noise std / L2 sensitivity
    sample_rate: float = 1.0  # q, only meaningful for poisson_subsampled_gaussian
    count: int = 1  # compositions: steps for DP-SGD, queries for gaussian

    def __post_init__(self) -> None:
        what = f"event of stage {self.stage!r}"
        check_mechanism(self.mechanism)
        # Plain floats/ints so that equality, hashing and JSON never see numpy or torch scalars.
        self.noise_multiplier = check_sigma(self.noise_multiplier, what)
        self.sample_rate = check_sample_rate(self.mechanism, self.sample_rate, what)
        self.count = check_count(self.count, what)

    @property
    def key(self) -> tuple[str, str, float, float]:
        """What must match for two events to be merged or for a plan to cover an event."""
        return (self.stage, self.mechanism, self.noise_multiplier, self.sample_rate)

    def to_json(self) -> dict:
        d: dict = {
            "stage": self.stage,
            "mechanism": self.mechanism,
            "noise_multiplier": self.noise_multiplier,
        }
        if self.mechanism == GAUSSIAN:
            d["count"] = self.count
        else:
            d["sample_rate"] = self.sample_rate
            d["steps"] = self.count
        return d

    @classmethod
    def from_json(cls, d: dict) -> MechanismEvent:
        count = d["steps"] if "steps" in d else d.get("count", 1)
        return cls(
            stage=d["stage"],
            mechanism=d["mechanism"],
            noise_multiplier=d["noise_multiplier"],
            sample_rate=d.get("sample_rate", 1.0),
            count=count,
        )
