"""Noise calibration: the smallest noise multiplier whose event meets a privacy target."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np

from dpgen.errors import BudgetError
from dpgen.privacy.accounting import (
    canonical,
    check_accountant,
    check_delta,
    compute_epsilon,
    format_epsilon,
    pld_epsilon_at,
)
from dpgen.privacy.events import (
    EPS_RTOL,
    POISSON_GAUSSIAN,
    MechanismEvent,
    check_count,
    check_mechanism,
    check_sample_rate,
)

# Calibration searches on a coarser grid (a few % pessimistic, ~4x faster), then finishes on the
# accurate one, so the sigma it returns is always checked at the setting the ledger reports.
PLD_SEARCH_INTERVAL = 5e-3

# Calibration range for noise multipliers. Below 0.05 a single Gaussian release already costs
# eps ~ 100, so smaller values are never a meaningful privacy setting (and PLD grids explode);
# above 1e4 the requested budget is treated as unreachable.
SIGMA_MIN = 0.05
SIGMA_MAX = 1e4


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
    check_accountant(accountant)
    check_delta(delta)
    check_mechanism(mechanism)
    target = float(target_epsilon)
    if not (math.isfinite(target) and target > 0):
        raise BudgetError(f"privacy.eps={target!r}: target epsilon must be a finite number > 0")
    if not (0.0 < rtol < 1.0):
        raise ValueError(f"rtol must be in (0, 1), got {rtol!r}")
    what = f"calibration of stage {stage!r}"
    q = check_sample_rate(mechanism, sample_rate, what)
    n = check_count(steps, what)
    fixed = list(fixed_events)
    floor = target * (1.0 - rtol)

    if fixed:
        eps_fixed = compute_epsilon(fixed, delta, accountant)
        if eps_fixed >= target:
            names = ", ".join(sorted({e.stage for e in fixed}))
            raise BudgetError(
                f"privacy.eps={format_epsilon(target)} cannot be met: the fixed events ({names}) alone "
                f"already spend eps={format_epsilon(eps_fixed)} ({accountant}, delta={delta:g}), leaving "
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
        interval = PLD_SEARCH_INTERVAL * min(1.0, max(math.sqrt(target), 0.1))
        return pld_epsilon_at(canonical([*fixed, event(sigma)]), float(delta), interval)

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
            f"privacy.eps={format_epsilon(target)} cannot be met: stage {stage!r} ({mechanism}, "
            f"sample_rate={format_epsilon(q)}, count={n}) would need noise_multiplier > {SIGMA_MAX:g} "
            f"({accountant}, delta={delta:g}). Fix: raise privacy.eps or lower the number of "
            f"steps / the sample rate"
        ) from None
    # The last phase is the accountant itself, so this is a check, not a recomputation.
    if eps > target * (1 + EPS_RTOL):
        raise AssertionError(f"calibration returned eps={eps} above target {target}")
    return sigma
