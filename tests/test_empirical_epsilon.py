"""The arithmetic of empirical ε lower bounds, against closed forms and independent references."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from dpgen.eval.audit import roc_summary
from dpgen.eval.empirical_epsilon import (
    clopper_pearson,
    clopper_pearson_epsilon_lower_bound,
    epsilon_from_error_rates,
    guess_outcomes,
    one_run_audit,
    one_run_epsilon_lower_bound,
    one_run_p_value,
)


@pytest.mark.parametrize("k,n", [(0, 10), (10, 10), (3, 17), (50, 100), (1, 1000)])
def test_clopper_pearson_matches_scipy_exact_interval(k, n):
    ref = stats.binomtest(k, n).proportion_ci(confidence_level=0.9, method="exact")
    assert clopper_pearson(k, n, 0.9) == pytest.approx((ref.low, ref.high), abs=1e-10)


def test_clopper_pearson_edge_cases_in_closed_form():
    # No successes: upper = 1 - (alpha/2)^(1/n); all successes: lower = (alpha/2)^(1/n).
    assert clopper_pearson(0, 20, 0.95) == pytest.approx((0.0, 1 - 0.025 ** (1 / 20)))
    assert clopper_pearson(20, 20, 0.95) == pytest.approx((0.025 ** (1 / 20), 1.0))


def test_clopper_pearson_covers_at_its_level():
    rng = np.random.default_rng(0)
    p, n = 0.3, 40
    interval = {k: clopper_pearson(k, n, 0.9) for k in range(n + 1)}
    hits = [interval[int(k)][0] <= p <= interval[int(k)][1] for k in rng.binomial(n, p, 2000)]
    assert np.mean(hits) >= 0.9  # exact intervals are conservative


def test_epsilon_from_error_rates():
    # FPR = e^-2 (1 - FNR) rules out exactly eps < 2 (delta = 0); the other direction, with
    # log((1 - FPR) / FNR) < 2, rules out less.
    assert epsilon_from_error_rates(math.exp(-2) * 0.5, 0.5, 0.0) == pytest.approx(2.0)
    assert epsilon_from_error_rates(0.5, math.exp(-2) * 0.5, 0.0) == pytest.approx(2.0)
    assert epsilon_from_error_rates(0.5, 0.5, 0.0) == 0.0  # a coin flip proves nothing
    assert epsilon_from_error_rates(0.0, 0.2, 0.0) == math.inf


def test_clopper_pearson_bound_needs_evidence():
    # 100 vs 100 perfectly separated: FPR, FNR <= 1 - 0.025^(1/100) with 95 % confidence.
    hi = 1 - 0.025 ** (1 / 100)
    assert clopper_pearson_epsilon_lower_bound(0, 100, 0, 100, 0.0, 0.95) == pytest.approx(math.log((1 - hi) / hi))
    assert clopper_pearson_epsilon_lower_bound(50, 100, 50, 100, 0.0, 0.95) == 0.0


def test_one_run_p_value_without_delta_is_the_binomial_tail():
    eps, r, v = 1.3, 40, 31
    q = math.exp(eps) / (1 + math.exp(eps))
    assert one_run_p_value(100, r, v, eps, 0.0) == pytest.approx(stats.binom.sf(v - 1, r, q))
    # delta only adds to the p-value
    assert one_run_p_value(100, r, v, eps, 1e-3) > one_run_p_value(100, r, v, eps, 0.0)


def test_one_run_p_value_delta_term_by_hand():
    """Steinke et al.'s δ term, 2mδ · max_i P[v - i <= Binomial(r, q) < v] / i, written out for
    two guesses at ε = 0 (q = 1/2), where it is a quarter of the p-value: a missing 2m or a
    shifted index changes the result."""
    m, r, delta = 256, 2, 1e-3
    # v = 1: P[B >= 1] = 3/4, and the term is 2mδ · P[B = 0] = 2mδ / 4.
    assert one_run_p_value(m, r, 1, 0.0, delta) == pytest.approx(0.75 + 2 * m * delta * 0.25)
    # v = 2: P[B = 2] = 1/4, and the term is 2mδ · max(P[B = 1], P[B <= 1] / 2) = 2mδ / 2.
    assert one_run_p_value(m, r, 2, 0.0, delta) == pytest.approx(0.25 + 2 * m * delta * 0.5)


def test_one_run_bound_all_correct_closed_form():
    # r correct of r: p(eps) = q^r, so the bound solves q = (1 - c)^(1/r), eps = log(q / (1 - q)).
    r, c = 64, 0.95
    q = (1 - c) ** (1 / r)
    assert one_run_epsilon_lower_bound(1000, r, r, 0.0, c) == pytest.approx(math.log(q / (1 - q)), abs=1e-5)
    assert one_run_epsilon_lower_bound(1000, r, r // 2, 0.0, c) == 0.0


@pytest.mark.parametrize("eps", [0.5, 2.0])
def test_one_run_bound_is_valid_for_randomized_response(eps):
    """Canaries whose membership leaks through eps-DP randomized response: the 95 % bound may
    exceed eps in at most about 5 % of trials, and must get close to eps with many canaries."""
    rng = np.random.default_rng(1)
    m, trials = 1000, 200
    q = math.exp(eps) / (1 + math.exp(eps))
    correct = rng.binomial(m, q, trials)
    bound = {int(v): one_run_epsilon_lower_bound(m, m, int(v), 1e-5, 0.95) for v in np.unique(correct)}
    bounds = [bound[int(v)] for v in correct]
    assert np.mean(np.array(bounds) > eps) <= 0.08
    assert np.median(bounds) > 0.6 * eps


def test_guesses_take_top_and_bottom_scores():
    scores = np.array([0.9, 0.1, 0.8, 0.2, 0.5, 0.55])
    included = np.array([True, False, False, False, True, True])
    # top 2 = {0.9 (in, right), 0.8 (out, wrong)}; bottom 2 = {0.1 (out, right), 0.2 (out, right)}
    assert guess_outcomes(scores, included, 4) == (4, 3)


def test_one_run_audit_bonferroni_and_separation():
    rng = np.random.default_rng(2)
    included = np.zeros(256, dtype=bool)
    included[rng.permutation(256)[:128]] = True  # exactly half in: 256 guesses can all be right
    separated = np.where(included, 1.0, 0.0) + rng.random(256) * 0.1
    audit = one_run_audit(separated, included, 0.0, [64, 256], 0.95)
    assert audit["epsilon_lower_bound"] > 2.5
    # each guess count is tested at 97.5 %: the all-correct bound for r = 256 at that level (δ = 0)
    q = 0.025 ** (1 / 256)
    assert audit["by_guesses"][1]["epsilon_lower_bound"] == pytest.approx(math.log(q / (1 - q)), abs=0.02)
    noise = one_run_audit(rng.random(256), included, 1e-5, [64, 256], 0.95)
    assert noise["epsilon_lower_bound"] < 0.5
    # δ > 0 only weakens what the same outcome proves
    with_delta = one_run_audit(separated, included, 1e-5, [64, 256], 0.95)
    assert 2.5 < with_delta["epsilon_lower_bound"] < audit["epsilon_lower_bound"]


def test_roc_summary_against_a_brute_force_threshold_scan():
    rng = np.random.default_rng(3)
    pos, neg = rng.normal(1, 1, 300), rng.normal(0, 1, 2000)
    out = roc_summary(pos, neg)
    auc = np.mean([(p > n) + 0.5 * (p == n) for p in pos for n in neg])
    assert out["auc"] == pytest.approx(auc)
    for name, level in (("1pct", 0.01), ("0.1pct", 0.001)):
        best = max((pos > t).mean() for t in np.concatenate([neg, [np.inf]]) if (neg > t).mean() <= level)
        assert out[f"tpr_at_fpr_{name}"] == pytest.approx(best)
    far = roc_summary([40, 41, 42, 43], [38, 39, 39.5, 37.5])  # scores far outside [0, 1]
    assert far["auc"] == 1.0 and far["tpr_at_fpr_1pct"] == 1.0
    tied_pos, tied_neg = np.round(pos), np.round(neg)  # a tie counts half
    auc = np.mean([(p > n) + 0.5 * (p == n) for p in tied_pos for n in tied_neg])
    assert roc_summary(tied_pos, tied_neg)["auc"] == pytest.approx(auc)
