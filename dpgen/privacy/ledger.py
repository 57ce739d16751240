"""Privacy ledger: every DP mechanism of a run, its composed epsilon, and sigma calibration.

Neighbouring relation: add/remove one example of the sensitive training split.

A run declares all of its mechanisms (``PlannedStage``) before sensitive data is touched; the
ledger calibrates the noise multipliers so that the composition meets ``privacy.eps`` and then
records what is actually spent. Three accountants are available; the governing one (PLD by
default) decides calibration and refusals, the other two are reported for comparison:

* ``pld``  dp-accounting's privacy-loss-distribution accountant (tight, pessimistic estimate),
* ``rdp``  Opacus's Renyi-DP accountant (loose but cheap upper bound),
* ``prv``  Opacus's PRV accountant (tight, with an explicit ``eps_error`` added on top).

Every number returned here is an upper bound on the true epsilon, never an estimate from below.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import math
import os
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
from dp_accounting import GaussianDpEvent, PoissonSampledDpEvent
from dp_accounting.pld.pld_privacy_accountant import PLDAccountant
from dp_accounting.privacy_accountant import NeighboringRelation
from opacus.accountants import PRVAccountant, RDPAccountant

from dpgen.errors import ConfigError
from dpgen.io import atomic_write

log = logging.getLogger(__name__)

GAUSSIAN = "gaussian"
POISSON_GAUSSIAN = "poisson_subsampled_gaussian"
MECHANISMS = (POISSON_GAUSSIAN, GAUSSIAN)
ACCOUNTANTS = ("pld", "rdp", "prv")
NEIGHBOURING = "add_remove"

# PLD value discretisation interval. dp-accounting's default (1e-4) costs 0.35-0.5 s on the
# ANCHORS cases; 1e-3 costs 40-80 ms and overestimates them by only 0.01 % / 0.04 %.
# The (pessimistic) discretisation error grows with the square of the interval, but its size
# depends on the regime: many steps with a small per-step loss (large sigma, small eps) are
# hit hardest (0.7 % at eps=0.3, sigma=20, q=0.04, 2000 steps, even at 5.5e-4). So every PLD
# epsilon is computed at 2e-3 and at 1e-3, the error of the finer value is estimated from the
# difference (Richardson: err(h/2) ~ (eps(h) - eps(h/2)) / 3), and the interval is halved
# until that estimate is below _PLD_RTOL. On the anchors this stops at 1e-3.
PLD_VALUE_DISCRETIZATION_INTERVAL = 1e-3
_PLD_RTOL = 1e-3
_PLD_MIN_INTERVAL = 1e-5
# Calibration searches on a coarser grid (a few % pessimistic, ~4x faster), then finishes on the
# accurate one, so the sigma it returns is always checked at the setting the ledger reports.
_PLD_SEARCH_INTERVAL = 5e-3

# Opacus's default RDP orders stop at 63. Large-sigma queries (histograms, class means) have their
# optimal order beyond that, so RDP would report a needlessly loose bound; more orders can only
# tighten an RDP bound, never loosen it.
_RDP_ORDERS = tuple(
    sorted(set(RDPAccountant.DEFAULT_ALPHAS) | {72, 80, 96, 112, 128, 160, 192, 256, 384, 512})
)

# Calibration range for noise multipliers. Below 0.05 a single Gaussian release already costs
# eps ~ 100, so smaller values are never a meaningful privacy setting (and PLD grids explode);
# above 1e4 the requested budget is treated as unreachable.
SIGMA_MIN = 0.05
SIGMA_MAX = 1e4

# Relative slack when checking a spent epsilon against the target: the accountants are
# deterministic, this only absorbs float round-off between equivalent event lists.
_EPS_RTOL = 1e-9


class BudgetError(ValueError):
    """The privacy budget cannot be met by a plan, or recording an event would exceed it."""


# --------------------------------------------------------------------------------------------
# Events
# --------------------------------------------------------------------------------------------


def _check_mechanism(mechanism: str) -> None:
    if mechanism not in MECHANISMS:
        raise ValueError(f"unknown DP mechanism {mechanism!r}; expected one of {MECHANISMS}")


def _check_sigma(noise_multiplier: float, what: str) -> float:
    sigma = float(noise_multiplier)
    if not (math.isfinite(sigma) and sigma > 0):
        raise ValueError(f"{what}: noise_multiplier must be a finite number > 0, got {sigma!r}")
    return sigma


def _check_sample_rate(mechanism: str, sample_rate: float, what: str) -> float:
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


def _check_count(count: int, what: str) -> int:
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
        _check_mechanism(self.mechanism)
        # Plain floats/ints so that equality, hashing and JSON never see numpy or torch scalars.
        self.noise_multiplier = _check_sigma(self.noise_multiplier, what)
        self.sample_rate = _check_sample_rate(self.mechanism, self.sample_rate, what)
        self.count = _check_count(self.count, what)

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


# --------------------------------------------------------------------------------------------
# Epsilon
# --------------------------------------------------------------------------------------------

# Canonical, hashable form of an event list for the accountants: ((q, sigma, count), ...).
# Stage names do not change epsilon, a plain Gaussian is a Poisson-subsampled one at q=1, and
# identical mechanisms self-compose, so merging them makes the caches hit across stages.
_Key = tuple[tuple[float, float, int], ...]


def _canonical(events: Sequence[MechanismEvent]) -> _Key:
    counts: dict[tuple[float, float], int] = {}
    for e in events:
        q = 1.0 if e.mechanism == GAUSSIAN else e.sample_rate
        k = (q, e.noise_multiplier)
        counts[k] = counts.get(k, 0) + e.count
    return tuple(sorted((q, s, n) for (q, s), n in counts.items()))


@functools.lru_cache(maxsize=4096)
def _pld_epsilon_at(key: _Key, delta: float, interval: float) -> float:
    acc = PLDAccountant(
        NeighboringRelation.ADD_OR_REMOVE_ONE, value_discretization_interval=interval
    )
    for q, sigma, n in key:
        if q == 1.0:
            # dp-accounting composes n Gaussian releases exactly, as one with sigma / sqrt(n).
            acc.compose(GaussianDpEvent(sigma), n)
        else:
            acc.compose(PoissonSampledDpEvent(q, GaussianDpEvent(sigma)), n)
    return float(acc.get_epsilon(delta))


def _pld_epsilon(key: _Key, delta: float) -> float:
    h = 2 * PLD_VALUE_DISCRETIZATION_INTERVAL
    coarse = _pld_epsilon_at(key, delta, h)
    fine = _pld_epsilon_at(key, delta, h / 2)
    while (coarse - fine) / 3 > _PLD_RTOL * fine and h / 4 >= _PLD_MIN_INTERVAL:
        h /= 2
        coarse, fine = fine, _pld_epsilon_at(key, delta, h / 2)
    # Both values are pessimistic upper bounds, so the smaller one is still a valid bound.
    return min(coarse, fine)


def _opacus_history(key: _Key) -> list[tuple[float, float, int]]:
    return [(sigma, q, n) for q, sigma, n in key]


@contextlib.contextmanager
def _quiet_opacus() -> Iterator[None]:
    with warnings.catch_warnings(), np.errstate(divide="ignore", over="ignore", invalid="ignore"):
        # "Optimal order is the largest alpha" (also raised inside PRV's domain sizing): the
        # bound is still valid and there is nothing a user could act on.
        warnings.filterwarnings("ignore", message="Optimal order", category=UserWarning)
        # The np.errstate: q=1 makes Opacus's PRV evaluate log(1-q) = -inf, handled but noisy.
        yield


def _rdp_epsilon(key: _Key, delta: float) -> float:
    acc = RDPAccountant()
    acc.history = _opacus_history(key)
    with _quiet_opacus():
        return float(acc.get_epsilon(delta, alphas=list(_RDP_ORDERS)))


def _prv_epsilon(key: _Key, delta: float) -> float:
    acc = PRVAccountant()
    acc.history = _opacus_history(key)
    with _quiet_opacus():
        return float(acc.get_epsilon(delta))


_EPSILON_FNS: dict[str, Callable[[_Key, float], float]] = {
    "pld": _pld_epsilon,
    "rdp": _rdp_epsilon,
    "prv": _prv_epsilon,
}


@functools.lru_cache(maxsize=4096)
def _epsilon_cached(key: _Key, delta: float, accountant: str) -> float:
    return _EPSILON_FNS[accountant](key, delta)


def _check_accountant(accountant: str) -> None:
    if accountant not in ACCOUNTANTS:
        raise ConfigError(
            "privacy.accountant", accountant, "unknown accountant", f"use one of {ACCOUNTANTS}"
        )


def _check_delta(delta: float) -> None:
    if not (0.0 < delta < 1.0):
        raise ConfigError("privacy.delta", delta, "must be in (0, 1)", "use e.g. 1e-5")


def compute_epsilon(
    events: Sequence[MechanismEvent], delta: float, accountant: str = "pld"
) -> float:
    """Epsilon at ``delta`` of the composition of ``events`` (add/remove neighbours).

    Results are cached by the canonical event list, so asking again after every step is cheap
    as long as the events did not change.
    """
    _check_accountant(accountant)
    _check_delta(delta)
    key = _canonical(events)
    if not key:
        return 0.0
    return _epsilon_cached(key, float(delta), accountant)


def _fmt(x: float) -> str:
    return f"{x:.4g}"


# --------------------------------------------------------------------------------------------
# Calibration
# --------------------------------------------------------------------------------------------


class _SigmaTooLarge(Exception):
    """The search hit SIGMA_MAX with epsilon still above the target."""


def _search_sigma(
    eps_of: Callable[[float], float], target: float, floor: float, start: float
) -> tuple[float, float]:
    """Find sigma with ``floor <= eps_of(sigma) <= target``; ``eps_of`` decreases with sigma.

    Works on x = log(sigma), y = log(eps) - log(goal), with goal the geometric centre of the
    band: log(eps) is close to linear in log(sigma), so secant steps land in the band after a
    handful of evaluations, and the Illinois variant of false position keeps it bracketed.
    Returns (sigma, eps). If the band cannot be hit exactly (discretisation steps), the smallest
    sigma seen with eps <= target is returned; at SIGMA_MIN an eps below ``floor`` is accepted.
    """
    goal = target * (floor / target) ** 0.25
    x_min, x_max = math.log(SIGMA_MIN), math.log(SIGMA_MAX)

    def f(x: float) -> tuple[float, float]:
        eps = eps_of(math.exp(x))
        y = math.log(eps / goal) if eps > 0 else -50.0
        return eps, float(np.clip(y, -50.0, 50.0))

    x = float(np.clip(math.log(start), x_min, x_max))
    eps, y = f(x)
    if floor <= eps <= target:
        return math.exp(x), eps

    # 1) Bracket: secant extrapolation (slope ~ -1 for Gaussian-like mechanisms), steps capped
    #    to a factor 8 so that one wild slope cannot throw the search to the range limits.
    slope = -1.0
    while True:
        step = float(np.clip(-y / slope, -math.log(8), math.log(8)))
        if abs(step) < 1e-3:
            step = math.copysign(1e-3, -y / slope)
        x_new = float(np.clip(x + step, x_min, x_max))
        if x_new == x:
            if y > 0:
                raise _SigmaTooLarge
            return math.exp(x), eps  # at SIGMA_MIN: even less noise would be allowed
        eps_new, y_new = f(x_new)
        if floor <= eps_new <= target:
            return math.exp(x_new), eps_new
        if (y_new > 0) != (y > 0):
            break
        s = (y_new - y) / (x_new - x)
        if math.isfinite(s) and s < -0.05:
            slope = s
        x, eps, y = x_new, eps_new, y_new

    # (xa, ya): too little noise (eps > target); (xb, yb): too much noise (eps < floor).
    if y > 0:
        (xa, ya), (xb, yb, eps_b) = (x, y), (x_new, y_new, eps_new)
    else:
        (xa, ya), (xb, yb, eps_b) = (x_new, y_new), (x, y, eps)

    # 2) Illinois false position inside the bracket.
    side = 0
    for _ in range(60):
        if xb - xa < 1e-7:
            break
        xm = xb - yb * (xb - xa) / (yb - ya)
        # Keep the probe strictly inside, away from the ends, so that the bracket shrinks.
        lo, hi = xa + 0.01 * (xb - xa), xb - 0.01 * (xb - xa)
        xm = min(max(xm, lo), hi)
        eps_m, ym = f(xm)
        if floor <= eps_m <= target:
            return math.exp(xm), eps_m
        if ym > 0:
            xa, ya = xm, ym
            if side == 1:
                yb /= 2
            side = 1
        else:
            xb, yb, eps_b = xm, ym, eps_m
            if side == -1:
                ya /= 2
            side = -1
    return math.exp(xb), eps_b


def calibrate_noise_multiplier(
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    steps: int,
    mechanism: str = POISSON_GAUSSIAN,
    fixed_events: Sequence[MechanismEvent] = (),
    accountant: str = "pld",
    stage: str = "dp_train",
    rtol: float = 0.01,
) -> float:
    """Smallest noise multiplier whose event, composed with ``fixed_events``, meets the target.

    The returned sigma gives ``compute_epsilon(fixed_events + [event], delta, accountant)`` in
    ``[target * (1 - rtol), target]`` (at the accurate setting the ledger reports). For
    ``mechanism="gaussian"``, ``steps`` is the number of queries and ``sample_rate`` must be 1.
    Raises BudgetError when no sigma up to SIGMA_MAX can meet the target. If even SIGMA_MIN stays
    below the band (absurdly large targets), SIGMA_MIN is returned.
    """
    _check_accountant(accountant)
    _check_delta(delta)
    _check_mechanism(mechanism)
    target = float(target_epsilon)
    if not (math.isfinite(target) and target > 0):
        raise BudgetError(f"privacy.eps={target!r}: target epsilon must be a finite number > 0")
    if not (0.0 < rtol < 1.0):
        raise ValueError(f"rtol must be in (0, 1), got {rtol!r}")
    what = f"calibration of stage {stage!r}"
    q = _check_sample_rate(mechanism, sample_rate, what)
    n = _check_count(steps, what)
    fixed = list(fixed_events)
    floor = target * (1.0 - rtol)

    if fixed:
        eps_fixed = compute_epsilon(fixed, delta, accountant)
        if eps_fixed >= target:
            names = ", ".join(sorted({e.stage for e in fixed}))
            raise BudgetError(
                f"privacy.eps={_fmt(target)} cannot be met: the fixed events ({names}) alone "
                f"already spend eps={_fmt(eps_fixed)} ({accountant}, delta={delta:g}), leaving "
                f"nothing for stage {stage!r}. Fix: raise privacy.eps or the fixed noise "
                f"multipliers"
            )

    def event(sigma: float) -> MechanismEvent:
        return MechanismEvent(stage, mechanism, sigma, q, n)

    def accurate(sigma: float) -> float:
        return compute_epsilon([*fixed, event(sigma)], delta, accountant)

    def coarse_pld(sigma: float) -> float:
        # Coarser PLD grid for the search. Its error is roughly constant in absolute eps, so the
        # grid shrinks with sqrt(target) for small targets; the floor keeps the first probes
        # (sigma=1, possibly far from the answer for tiny targets) from costing seconds.
        interval = _PLD_SEARCH_INTERVAL * min(1.0, max(math.sqrt(target), 0.1))
        return _pld_epsilon_at(_canonical([*fixed, event(sigma)]), float(delta), interval)

    # RDP is cheap enough to search on directly; PLD and PRV search on a coarse PLD first
    # (PLD and PRV agree to ~1 %) and finish with a few evaluations of the accountant itself.
    phases = [accurate] if accountant == "rdp" else [coarse_pld, accurate]
    sigma = 1.0
    try:
        for eps_of in phases[:-1]:
            try:
                sigma, _ = _search_sigma(eps_of, target, floor, sigma)
            except _SigmaTooLarge:
                # A pessimistic proxy must not declare the budget impossible; the last phase,
                # the accountant itself, decides.
                sigma = SIGMA_MAX
        sigma, eps = _search_sigma(phases[-1], target, floor, sigma)
    except _SigmaTooLarge:
        raise BudgetError(
            f"privacy.eps={_fmt(target)} cannot be met: stage {stage!r} ({mechanism}, "
            f"sample_rate={_fmt(q)}, count={n}) would need noise_multiplier > {SIGMA_MAX:g} "
            f"({accountant}, delta={delta:g}). Fix: raise privacy.eps or lower the number of "
            f"steps / the sample rate"
        ) from None
    # The last phase is the accountant itself, so this is a check, not a recomputation.
    if eps > target * (1 + _EPS_RTOL):
        raise AssertionError(f"calibration returned eps={eps} above target {target}")
    return sigma


# --------------------------------------------------------------------------------------------
# Ledger
# --------------------------------------------------------------------------------------------


@dataclass
class PlannedStage:
    """One mechanism of the run, declared before sensitive data is touched.

    Exactly one stage of a plan may leave both ``noise_multiplier`` and ``budget_fraction``
    None: the remainder stage, calibrated last so that the whole plan meets the target.
    """

    stage: str
    mechanism: str
    sample_rate: float = 1.0
    count: int = 1
    noise_multiplier: float | None = None  # fixed sigma, or None to calibrate
    budget_fraction: float | None = None  # calibrate alone to this fraction of the target

    def __post_init__(self) -> None:
        what = f"planned stage {self.stage!r}"
        _check_mechanism(self.mechanism)
        self.sample_rate = _check_sample_rate(self.mechanism, self.sample_rate, what)
        self.count = _check_count(self.count, what)
        if self.noise_multiplier is not None and self.budget_fraction is not None:
            raise ValueError(f"{what}: give noise_multiplier or budget_fraction, not both")
        if self.noise_multiplier is not None:
            self.noise_multiplier = _check_sigma(self.noise_multiplier, what)
        if self.budget_fraction is not None:
            f = float(self.budget_fraction)
            if not (0.0 < f <= 1.0):
                raise ValueError(f"{what}: budget_fraction must be in (0, 1], got {f!r}")
            self.budget_fraction = f

    @property
    def is_remainder(self) -> bool:
        return self.noise_multiplier is None and self.budget_fraction is None


def _copy(events: Sequence[MechanismEvent]) -> list[MechanismEvent]:
    return [dataclasses.replace(e) for e in events]


def _counts(events: Sequence[MechanismEvent]) -> dict[tuple[str, str, float, float], int]:
    out: dict[tuple[str, str, float, float], int] = {}
    for e in events:
        out[e.key] = out.get(e.key, 0) + e.count
    return out


class PrivacyLedger:
    """The run's privacy budget: its plan, what has been spent, and ``privacy.json``."""

    def __init__(
        self,
        epsilon_target: float,
        delta: float,
        dataset_size: int,
        accountant: str = "pld",
        neighbouring: str = NEIGHBOURING,
    ) -> None:
        eps = float(epsilon_target)
        if not (math.isfinite(eps) and eps > 0):
            raise ConfigError(
                "privacy.eps", epsilon_target, "must be a finite number > 0",
                "set a positive budget, e.g. privacy.eps=1 (use method=nonprivate for no DP)",
            )  # fmt: skip
        if isinstance(dataset_size, bool) or int(dataset_size) != dataset_size or dataset_size < 1:
            raise ConfigError(
                "dataset_size", dataset_size, "the sensitive training split must hold >= 1 example",
                "check data.* (the sensitive split is empty)",
            )  # fmt: skip
        n = int(dataset_size)
        d = float(delta)
        if not (0.0 < d < 1.0 / n):
            raise ConfigError(
                "privacy.delta", delta,
                f"must be in (0, 1/N) with N={n} sensitive training examples, i.e. < {1.0 / n:.3g}",
                f"set privacy.delta below 1/N, e.g. {min(1e-5, 0.1 / n):.1g}",
            )  # fmt: skip
        _check_accountant(accountant)
        if neighbouring != NEIGHBOURING:
            raise ConfigError(
                "privacy.neighbouring", neighbouring, "only add/remove-one is supported",
                f"set privacy.neighbouring={NEIGHBOURING}",
            )  # fmt: skip
        self.epsilon_target = eps
        self.delta = d
        self.dataset_size = n
        self.accountant = accountant
        self.neighbouring = neighbouring
        # Set to False (with a note in the data card) by stages that look at sensitive data
        # without charging it, e.g. CPSample's protection classifier: see void_guarantee.
        self.formal_guarantee = True
        self.note: str | None = None
        self._planned: list[MechanismEvent] = []
        self._events: list[MechanismEvent] = []

    # -- views ---------------------------------------------------------------------------------

    @property
    def planned(self) -> list[MechanismEvent]:
        """The planned events (copies: editing them does not change the ledger)."""
        return _copy(self._planned)

    @property
    def events(self) -> list[MechanismEvent]:
        """The events spent so far (copies: editing them does not change the ledger)."""
        return _copy(self._events)

    def _planned_event(self, stage: str) -> MechanismEvent:
        for e in self._planned:
            if e.stage == stage:
                return e
        planned = [e.stage for e in self._planned]
        raise KeyError(f"stage {stage!r} is not in the privacy plan (planned: {planned})")

    def planned_noise_multiplier(self, stage: str) -> float:
        return self._planned_event(stage).noise_multiplier

    def steps_spent(self, stage: str) -> int:
        return sum(e.count for e in self._events if e.stage == stage)

    def remaining_steps(self, stage: str) -> int:
        return max(0, self._planned_event(stage).count - self.steps_spent(stage))

    # -- planning ------------------------------------------------------------------------------

    def plan(self, stages: Sequence[PlannedStage]) -> list[MechanismEvent]:
        """Calibrate every stage's sigma, store and return the planned events.

        Fixed-sigma stages are taken as given, ``budget_fraction`` stages are calibrated alone
        to their share of the target, and the remainder stage (if any) is calibrated last
        against the composition of all the others. The whole plan must compose to
        ``<= epsilon_target`` under the governing accountant, else BudgetError.
        """
        stages = list(stages)
        names = [s.stage for s in stages]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"privacy plan: stage names must be unique, repeated: {dupes}")
        remainder = [s for s in stages if s.is_remainder]
        if len(remainder) > 1:
            raise ValueError(
                "privacy plan: at most one stage may have neither noise_multiplier nor "
                f"budget_fraction (the remainder), got {[s.stage for s in remainder]}"
            )
        target = self.epsilon_target
        fractions = sum(s.budget_fraction for s in stages if s.budget_fraction is not None)
        if fractions > 1.0 + 1e-12 or (remainder and fractions >= 1.0):
            raise BudgetError(
                f"privacy.eps={_fmt(target)} cannot be split: budget fractions sum to "
                f"{_fmt(fractions)}"
                + (f", leaving nothing for stage {remainder[0].stage!r}" if remainder else "")
                + ". Fix: lower the stages' budget_fraction values"
            )

        sigmas: dict[str, float] = {}
        for s in stages:
            if s.noise_multiplier is not None:
                sigmas[s.stage] = s.noise_multiplier
            elif s.budget_fraction is not None:
                try:
                    sigmas[s.stage] = calibrate_noise_multiplier(
                        s.budget_fraction * target, self.delta, s.sample_rate, s.count,
                        s.mechanism, (), self.accountant, s.stage,
                    )  # fmt: skip
                except BudgetError as e:
                    raise BudgetError(
                        f"privacy.eps={_fmt(target)} cannot be met: stage {s.stage!r} with "
                        f"budget_fraction={_fmt(s.budget_fraction)}: {e}"
                    ) from None

        def event(s: PlannedStage) -> MechanismEvent:
            return MechanismEvent(s.stage, s.mechanism, sigmas[s.stage], s.sample_rate, s.count)

        if remainder:
            r = remainder[0]
            others = [event(s) for s in stages if s is not r]
            sigmas[r.stage] = calibrate_noise_multiplier(
                target, self.delta, r.sample_rate, r.count, r.mechanism, others,
                self.accountant, r.stage,
            )  # fmt: skip

        planned = [event(s) for s in stages]
        eps = compute_epsilon(planned, self.delta, self.accountant)
        if eps > target * (1 + _EPS_RTOL):
            raise BudgetError(
                f"privacy.eps={_fmt(target)} cannot be met: the plan composes to "
                f"eps={_fmt(eps)} ({self.accountant}, delta={self.delta:g}). Fix: raise "
                "privacy.eps, raise the fixed noise multipliers, or leave one stage's sigma to "
                "be calibrated (no noise_multiplier, no budget_fraction)"
            )
        if self._events and not self._covers(planned, self._events):
            raise BudgetError(
                "privacy plan does not cover the events already recorded "
                f"({[e.to_json() for e in self._events]}). Fix: plan before touching sensitive "
                "data, or resume with the plan stored in privacy.json"
            )
        self._planned = planned
        return _copy(planned)

    # -- spending ------------------------------------------------------------------------------

    @staticmethod
    def _covers(planned: Sequence[MechanismEvent], events: Sequence[MechanismEvent]) -> bool:
        budget = _counts(planned)
        return all(n <= budget.get(k, 0) for k, n in _counts(events).items())

    def record(
        self,
        stage: str,
        mechanism: str,
        noise_multiplier: float,
        sample_rate: float = 1.0,
        count: int = 1,
    ) -> None:
        """Record ``count`` applications of a mechanism; refuse them if they overspend.

        Merges into the last event when stage, mechanism, sigma and q are identical. Anything
        the plan covers is accepted without computing epsilon (the plan was checked to compose
        to <= target, and a sub-composition cannot cost more); anything else is accepted only if
        the new total still meets the target, else BudgetError and nothing is recorded.
        """
        new = MechanismEvent(stage, mechanism, noise_multiplier, sample_rate, count)
        events = _copy(self._events)
        if events and events[-1].key == new.key:
            events[-1].count += new.count
        else:
            events.append(new)
        if not self._covers(self._planned, events):
            eps = compute_epsilon(events, self.delta, self.accountant)
            if eps > self.epsilon_target * (1 + _EPS_RTOL):
                raise BudgetError(
                    f"privacy.eps={_fmt(self.epsilon_target)} would be exceeded: recording "
                    f"{new.count} x {mechanism} (noise_multiplier={_fmt(new.noise_multiplier)}, "
                    f"sample_rate={_fmt(new.sample_rate)}) for stage {stage!r} brings eps to "
                    f"{_fmt(eps)} ({self.accountant}, delta={self.delta:g}), beyond the plan. "
                    f"Fix: stop the stage at its planned count, or raise privacy.eps"
                )
        self._events = events

    def epsilon_spent(self, accountant: str | None = None) -> float:
        return compute_epsilon(self._events, self.delta, accountant or self.accountant)

    def epsilon_by_accountant(self) -> dict[str, float]:
        """Epsilon spent under every accountant.

        The governing accountant's errors propagate. The others are informative only: if one
        fails numerically in some regime (Opacus PRV can for very large epsilons) its value is
        NaN and a warning is logged, rather than stopping a run whose guarantee does not
        depend on it.
        """
        out: dict[str, float] = {}
        for name in ACCOUNTANTS:
            if name == self.accountant:
                out[name] = self.epsilon_spent(name)
                continue
            try:
                out[name] = self.epsilon_spent(name)
            except (ArithmeticError, RuntimeError, ValueError) as e:
                log.warning("%s accountant failed on %s: %s", name, self._events, e)
                out[name] = math.nan
        return out

    def void_guarantee(self, note: str) -> None:
        """The run also uses the sensitive data outside DP: its outputs carry no formal
        guarantee. Events and ε are still tracked (they describe the DP parts); ``note`` says why."""
        self.formal_guarantee = False
        self.note = note

    # -- serialisation -------------------------------------------------------------------------

    def _header(self) -> dict:
        return {
            "delta": self.delta,
            "epsilon_target": self.epsilon_target,
            "accountant": self.accountant,
            "dataset_size": self.dataset_size,
            "neighbouring": self.neighbouring,
        }

    def to_json(self) -> dict:
        """The ``privacy.json`` contract (README, Run directory) (plus ``planned``, ``formal_guarantee``).

        Non-finite values (a failed informative accountant, an infinite epsilon) are written
        as null so that the file stays strict JSON.
        """
        by = {k: (v if math.isfinite(v) else None) for k, v in self.epsilon_by_accountant().items()}
        return {
            "delta": self.delta,
            "epsilon_target": self.epsilon_target,
            "epsilon_spent": by[self.accountant],
            "accountant": self.accountant,
            "epsilon_by_accountant": by,
            "dataset_size": self.dataset_size,
            "neighbouring": self.neighbouring,
            "events": [e.to_json() for e in self._events],
            "planned": [e.to_json() for e in self._planned],
            "formal_guarantee": self.formal_guarantee,
            **({"note": self.note} if self.note else {}),
        }

    @classmethod
    def from_json(cls, d: dict) -> PrivacyLedger:
        """Rebuild a ledger from ``to_json``/``state_dict`` output (spent epsilons are recomputed)."""
        ledger = cls(
            d["epsilon_target"],
            d["delta"],
            d["dataset_size"],
            d.get("accountant", "pld"),
            d.get("neighbouring", NEIGHBOURING),
        )
        ledger._events = [MechanismEvent.from_json(e) for e in d.get("events", [])]
        ledger._planned = [MechanismEvent.from_json(e) for e in d.get("planned", [])]
        ledger.formal_guarantee = bool(d.get("formal_guarantee", True))
        ledger.note = d.get("note")
        return ledger

    def state_dict(self) -> dict:
        """Plain-Python state for Lightning checkpoints; computes no epsilon (cheap per save)."""
        return {
            "version": 1,
            **self._header(),
            "events": [e.to_json() for e in self._events],
            "planned": [e.to_json() for e in self._planned],
            "formal_guarantee": self.formal_guarantee,
            "note": self.note,
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore events and plan from a checkpoint of the same privacy configuration.

        A checkpoint planned under another budget, delta, N or accountant is refused: its
        noise multipliers were calibrated for that setting, not for this run's config.
        A ledger never un-spends: where the state records fewer steps than this ledger already
        holds (an older checkpoint than the privacy.json a resume read), this ledger's events
        stay. Both are records of one history, so the larger one contains the smaller.
        """
        keys = {
            "epsilon_target": "privacy.eps",
            "delta": "privacy.delta",
            "dataset_size": "dataset_size",
            "accountant": "privacy.accountant",
            "neighbouring": "privacy.neighbouring",
        }
        mine = self._header()
        for field, config_key in keys.items():
            if field not in state:  # partial states (e.g. events only) keep this run's settings
                continue
            theirs = state[field]
            same = (
                math.isclose(float(theirs), float(mine[field]), rel_tol=1e-12)
                if isinstance(mine[field], float | int)
                else theirs == mine[field]
            )
            if not same:
                raise ConfigError(
                    config_key, mine[field],
                    f"the checkpoint's privacy ledger was planned for {config_key}={theirs!r}",
                    "resume with the original privacy settings, or start a new run directory",
                )  # fmt: skip
        events = [MechanismEvent.from_json(e) for e in state.get("events", [])]
        if sum(e.count for e in events) >= sum(e.count for e in self._events):
            self._events = events
        if "planned" in state:
            self._planned = [MechanismEvent.from_json(e) for e in state["planned"]]
        # A voided guarantee stays void, as spent budget stays spent: a state written before
        # the void (an older checkpoint) must not restore it.
        if self.formal_guarantee and not state.get("formal_guarantee", True):
            self.void_guarantee(state.get("note"))

    def write(self, path: str | os.PathLike) -> None:
        """Write ``privacy.json`` atomically (``dpgen.io.atomic_write``)."""
        # Serialise first: an accountant failure must not leave a temporary file behind.
        text = json.dumps(self.to_json(), indent=2, allow_nan=False) + "\n"
        atomic_write(path, lambda f: f.write(text.encode("utf-8")))
