"""Epsilon of a composition of mechanism events, under three accountants.

* ``pld``  dp-accounting's privacy-loss-distribution accountant (tight, pessimistic estimate),
* ``rdp``  Opacus's Renyi-DP accountant (loose but cheap upper bound),
* ``prv``  Opacus's PRV accountant (tight, with an explicit ``eps_error`` added on top).

Every number returned here is an upper bound on the true epsilon, never an estimate from below.
"""

from __future__ import annotations

import contextlib
import functools
import warnings
from collections.abc import Callable, Iterator, Sequence

import numpy as np

from dpgen.errors import ConfigError
from dpgen.privacy.events import GAUSSIAN, MechanismEvent

ACCOUNTANTS = ("pld", "rdp", "prv")

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
# Opacus's default RDP orders stop at 63. Large-sigma queries (histograms, class means) have their
# optimal order beyond that, so RDP would report a needlessly loose bound; more orders can only
# tighten an RDP bound, never loosen it.
_EXTRA_RDP_ORDERS = (72, 80, 96, 112, 128, 160, 192, 256, 384, 512)

# Canonical, hashable form of an event list for the accountants: ((q, sigma, count), ...).
# Stage names do not change epsilon, a plain Gaussian is a Poisson-subsampled one at q=1, and
# identical mechanisms self-compose, so merging them makes the caches hit across stages.
_Key = tuple[tuple[float, float, int], ...]


def canonical(events: Sequence[MechanismEvent]) -> _Key:
    counts: dict[tuple[float, float], int] = {}
    for e in events:
        q = 1.0 if e.mechanism == GAUSSIAN else e.sample_rate
        k = (q, e.noise_multiplier)
        counts[k] = counts.get(k, 0) + e.count
    return tuple(sorted((q, s, n) for (q, s), n in counts.items()))


# dp-accounting and Opacus are imported where their accountants are used: together they take
# about two seconds to import, which a refused config should not wait for.
@functools.lru_cache(maxsize=4096)
def pld_epsilon_at(key: _Key, delta: float, interval: float) -> float:
    from dp_accounting import GaussianDpEvent, PoissonSampledDpEvent
    from dp_accounting.pld.pld_privacy_accountant import PLDAccountant
    from dp_accounting.privacy_accountant import NeighboringRelation

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
    coarse = pld_epsilon_at(key, delta, h)
    fine = pld_epsilon_at(key, delta, h / 2)
    while (coarse - fine) / 3 > _PLD_RTOL * fine and h / 4 >= _PLD_MIN_INTERVAL:
        h /= 2
        coarse, fine = fine, pld_epsilon_at(key, delta, h / 2)
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
    from opacus.accountants import RDPAccountant

    acc = RDPAccountant()
    acc.history = _opacus_history(key)
    with _quiet_opacus():
        return float(acc.get_epsilon(delta, alphas=sorted(set(RDPAccountant.DEFAULT_ALPHAS) | set(_EXTRA_RDP_ORDERS))))


def _prv_epsilon(key: _Key, delta: float) -> float:
    from opacus.accountants import PRVAccountant

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


def check_accountant(accountant: str) -> None:
    if accountant not in ACCOUNTANTS:
        raise ConfigError(
            "privacy.accountant", accountant, "unknown accountant", f"use one of {', '.join(ACCOUNTANTS)}"
        )


def check_delta(delta: float) -> None:
    if not (0.0 < delta < 1.0):
        raise ConfigError("privacy.delta", delta, "must be in (0, 1)", "use e.g. 1e-5")


def compute_epsilon(
    events: Sequence[MechanismEvent], delta: float, accountant: str = "pld"
) -> float:
    """Epsilon at ``delta`` of the composition of ``events`` (add/remove neighbours).

    Results are cached by the canonical event list, so asking again after every step is cheap
    as long as the events did not change.
    """
    check_accountant(accountant)
    check_delta(delta)
    key = canonical(events)
    if not key:
        return 0.0
    return _epsilon_cached(key, float(delta), accountant)


def format_epsilon(x: float) -> str:
    return f"{x:.4g}"
