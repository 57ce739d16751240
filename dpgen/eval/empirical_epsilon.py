"""Empirical lower bounds on ε from a membership guessing game (privacy auditing).

An audit inserts canaries into training and guesses, from the trained model alone, which were
in. If training is (ε, δ)-DP, no guesser can be right much more often than ε allows; a guesser
that is right more often proves, at a stated confidence, that the claimed ε is wrong (a bug, or
a broken configuration). Two conversions of the guesses into a bound:

- :func:`one_run_epsilon_lower_bound` (Steinke, Nasr & Jagielski 2023, "Privacy auditing with
  one (1) training run"): m canaries, each included independently with probability 1/2, in a
  *single* training run. Under (ε, δ)-DP the number of correct guesses among r non-abstaining
  guesses is dominated by Binomial(r, e^ε / (1 + e^ε)) plus a δ term. This is the bound that is
  valid for one run, and the one dpgen reports as ``epsilon_lower_bound``.
- :func:`clopper_pearson_epsilon_lower_bound` (Jagielski et al. 2020; Nasr et al. 2021):
  Clopper–Pearson upper confidence limits on the false-positive and false-negative rates of a
  membership test turned into ε through (1 − δ − FNR) ≤ e^ε · FPR (and symmetrically). Exact
  when every trial is an independent training run; applied to the canaries of one run it treats
  them as independent trials, which the one-run analysis does not need to assume. Reported for
  comparison with the literature, never as the headline.

Neither is an accountant: they bound ε from below, from data; the ledger bounds it from above.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from scipy import stats


def clopper_pearson(successes: int, trials: int, confidence: float = 0.95) -> tuple[float, float]:
    """Exact two-sided binomial confidence interval (Clopper & Pearson 1934) for a proportion.

    Each end fails with probability at most (1 − confidence) / 2.
    """
    if not 0 <= successes <= trials or trials < 1:
        raise ValueError(f"need 0 <= successes <= trials and trials >= 1, got {successes}/{trials}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    interval = stats.binomtest(successes, trials).proportion_ci(confidence_level=confidence, method="exact")
    return float(interval.low), float(interval.high)


def epsilon_from_error_rates(fpr: float, fnr: float, delta: float) -> float:
    """The smallest ε consistent with a test of these error rates under (ε, δ)-DP:
    max over both directions of log((1 − δ − FNR) / FPR); 0 when nothing is ruled out."""
    bounds = [0.0]
    for a, b in ((fnr, fpr), (fpr, fnr)):
        if 1 - delta - a > 0:
            bounds.append(math.inf if b == 0 else math.log((1 - delta - a) / b))
    return max(bounds)


def clopper_pearson_epsilon_lower_bound(false_positives: int, negatives: int, false_negatives: int,
                                        positives: int, delta: float, confidence: float = 0.95) -> float:
    """ε lower bound from the Clopper–Pearson upper limits of FPR and FNR (Jagielski et al. 2020).

    Each two-sided interval fails with probability at most (1 − confidence) / 2 on its upper
    end, so both upper limits hold together with probability at least ``confidence``.
    """
    fpr_hi = clopper_pearson(false_positives, negatives, confidence)[1]
    fnr_hi = clopper_pearson(false_negatives, positives, confidence)[1]
    return epsilon_from_error_rates(fpr_hi, fnr_hi, delta)


def one_run_p_value(m: int, r: int, v: int, epsilon: float, delta: float) -> float:
    """P[≥ v correct of r guesses] under the null hypothesis "the training run is (ε, δ)-DP",
    with m canaries each included independently with probability 1/2 (Steinke et al. 2023:
    the binomial tail of ε-DP randomized response, plus their term for δ > 0)."""
    if not 0 <= v <= r <= m:
        raise ValueError(f"need 0 <= v <= r <= m, got v={v}, r={r}, m={m}")
    if epsilon < 0 or not 0 <= delta <= 1:
        raise ValueError(f"need epsilon >= 0 and delta in [0, 1], got {epsilon}, {delta}")
    q = 1 / (1 + math.exp(-epsilon))  # the accuracy of ε-DP randomized response
    beta = float(stats.binom.sf(v - 1, r, q))  # P[Binomial(r, q) >= v]
    # δ's contribution: 2mδ · max_i P[v - i <= Binomial(r, q) < v] / i.
    below = np.cumsum(stats.binom.pmf(v - np.arange(1, v + 1), r, q)) if v > 0 else np.zeros(0)
    alpha = float(np.max(below / np.arange(1, v + 1))) if v > 0 else 0.0
    return min(1.0, beta + 2 * m * delta * alpha)


def one_run_epsilon_lower_bound(m: int, r: int, v: int, delta: float, confidence: float = 0.95) -> float:
    """The largest ε that ``v`` correct of ``r`` guesses reject at ``confidence`` (0 if none).

    The p-value grows with ε, so the boundary is found by bisection to 1e-6.
    """
    p = 1 - confidence
    if one_run_p_value(m, r, v, 0.0, delta) >= p:
        return 0.0
    lo, hi = 0.0, 1.0
    while one_run_p_value(m, r, v, hi, delta) < p:
        lo, hi = hi, 2 * hi
        if hi > 1e3:  # only reachable with absurd r; report "unbounded" rather than loop
            return math.inf
    while hi - lo > 1e-6:
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if one_run_p_value(m, r, v, mid, delta) < p else (lo, mid)
    return lo


def guess_outcomes(scores: np.ndarray, included: np.ndarray, guesses: int) -> tuple[int, int]:
    """Guess "in" for the ``guesses // 2`` highest scores and "out" for as many lowest, abstain
    on the rest; returns (r guesses made, v correct)."""
    order = np.argsort(-np.asarray(scores, dtype=float), kind="stable")
    k = min(guesses // 2, len(order) // 2)
    guessed_in, guessed_out = order[:k], order[len(order) - k:]
    included = np.asarray(included, dtype=bool)
    correct = int(included[guessed_in].sum() + (~included[guessed_out]).sum())
    return 2 * k, correct


def one_run_audit(scores: Sequence[float], included: Sequence[bool], delta: float,
                  guesses: Sequence[int], confidence: float = 0.95) -> dict:
    """Steinke et al.'s audit of one run, over a list of guess counts fixed in advance.

    Trying several guess counts and keeping the best is a multiple comparison: each is tested
    at the Bonferroni-corrected level (1 − confidence) / len(guesses), so the reported bound
    holds at ``confidence`` overall.
    """
    scores, included = np.asarray(scores, dtype=float), np.asarray(included, dtype=bool)
    m = len(scores)
    level = 1 - (1 - confidence) / len(guesses)
    rows = []
    for g in guesses:
        r, v = guess_outcomes(scores, included, g)
        eps = one_run_epsilon_lower_bound(m, r, v, delta, level) if r else 0.0
        rows.append({"guesses": r, "correct": v, "epsilon_lower_bound": eps})
    best = max(rows, key=lambda row: row["epsilon_lower_bound"])
    return {"epsilon_lower_bound": best["epsilon_lower_bound"], "confidence": confidence,
            "canaries": m, "included": int(included.sum()), "by_guesses": rows}


def median_split_clopper_pearson(scores: Sequence[float], included: Sequence[bool], delta: float,
                                 confidence: float = 0.95) -> float:
    """Jagielski et al.'s bound for the test "in iff the score is above the median" (a threshold
    fixed in advance, so no selection on the outcomes)."""
    scores, included = np.asarray(scores, dtype=float), np.asarray(included, dtype=bool)
    guessed_in = scores > np.median(scores)
    fp = int((guessed_in & ~included).sum())
    fn = int((~guessed_in & included).sum())
    return clopper_pearson_epsilon_lower_bound(fp, int((~included).sum()), fn, int(included.sum()), delta,
                                               confidence)
