"""PrivacyLedger, compute_epsilon and sigma calibration against independent references.

References: the accounting values of ANCHORS.md (Opacus, dp-accounting), dp-accounting's
PrivacyLossDistribution API driven directly at its fine default grid (a different code path
from the PLDAccountant used by the ledger), and the closed form of the Gaussian mechanism.
"""

from __future__ import annotations

import json
import math
import os
import time

import pytest
from dp_accounting.pld import privacy_loss_distribution as pld_lib
from scipy.stats import norm

from dpgen.errors import BudgetError, ConfigError
from dpgen.privacy import accounting
from dpgen.privacy import ledger as ledger_mod
from dpgen.privacy.accounting import compute_epsilon
from dpgen.privacy.calibration import calibrate_noise_multiplier
from dpgen.privacy.events import GAUSSIAN, POISSON_GAUSSIAN, MechanismEvent
from dpgen.privacy.ledger import PlannedStage, PrivacyLedger

DELTA = 1e-5


def poisson(sigma: float, q: float, steps: int, stage: str = "dp_train") -> MechanismEvent:
    return MechanismEvent(stage, POISSON_GAUSSIAN, sigma, q, steps)


def gaussian(sigma: float, count: int = 1, stage: str = "dp_query") -> MechanismEvent:
    return MechanismEvent(stage, GAUSSIAN, sigma, count=count)


def reference_pld_epsilon(events: list[MechanismEvent], delta: float = DELTA) -> float:
    """dp-accounting's PLD objects composed by hand at the library's default 1e-4 grid."""
    total = None
    for e in events:
        q = 1.0 if e.mechanism == GAUSSIAN else e.sample_rate
        p = pld_lib.from_gaussian_mechanism(
            e.noise_multiplier, sampling_prob=q, value_discretization_interval=1e-4
        ).self_compose(e.count)
        total = p if total is None else total.compose(p)
    return total.get_epsilon_for_delta(delta)


def gaussian_delta(sigma: float, eps: float) -> float:
    """Exact delta(eps) of one Gaussian release with sensitivity 1 (Balle & Wang 2018)."""
    return norm.cdf(0.5 / sigma - eps * sigma) - math.exp(eps) * norm.cdf(
        -0.5 / sigma - eps * sigma
    )


def clear_caches() -> None:
    accounting._epsilon_cached.cache_clear()
    accounting.pld_epsilon_at.cache_clear()


# ------------------------------------------------------------------------------------------
# compute_epsilon
# ------------------------------------------------------------------------------------------

ANCHOR_1 = (1.5, 0.04, 2250)  # Opacus reference
ANCHOR_2 = (1.0, 0.01, 2000)  # dp-accounting / Opacus reference


@pytest.mark.parametrize(
    ("accountant", "anchor", "expected"),
    [
        ("rdp", ANCHOR_1, 7.329),
        ("prv", ANCHOR_1, 6.777),
        ("pld", ANCHOR_2, 2.584),
        ("rdp", ANCHOR_2, 2.866),
        ("prv", ANCHOR_2, 2.594),
    ],
)
def test_epsilon_matches_anchor_values(accountant, anchor, expected):
    eps = compute_epsilon([poisson(*anchor)], DELTA, accountant)
    assert eps == pytest.approx(expected, rel=0.005)


@pytest.mark.parametrize(
    "events",
    [
        [poisson(*ANCHOR_1)],
        [poisson(*ANCHOR_2)],
        # Many steps with a small per-step loss: the regime where a fixed 1e-3 grid is off by
        # ~2 %, so this needs the adaptive refinement.
        [poisson(20.0, 0.04, 2000)],
        # Heterogeneous composition, and a Gaussian query composed 3 times (count matters).
        [gaussian(12.3), poisson(1.42, 0.05, 800)],
        [gaussian(5.0, count=3), poisson(2.0, 0.1, 300, stage="dp_central_images")],
    ],
)
def test_pld_matches_direct_dp_accounting(events):
    ours = compute_epsilon(events, DELTA, "pld")
    assert ours == pytest.approx(reference_pld_epsilon(events), rel=0.005)


def test_epsilon_ignores_stage_names_and_event_order_and_merges_counts():
    a = compute_epsilon([gaussian(8.0), poisson(1.0, 0.02, 300), poisson(1.0, 0.02, 200)], DELTA)
    b = compute_epsilon([poisson(1.0, 0.02, 500, stage="other"), gaussian(8.0, stage="x")], DELTA)
    assert a == b
    # Poisson sampling at q=1 is the plain Gaussian mechanism.
    assert compute_epsilon([poisson(4.0, 1.0, 2)], DELTA, "rdp") == pytest.approx(
        compute_epsilon([gaussian(4.0, count=2)], DELTA, "rdp")
    )


def test_gaussian_query_matches_closed_form():
    sigma = 12.3
    eps = compute_epsilon([gaussian(sigma)], DELTA)
    # eps is an upper bound: delta at eps must not exceed the target, and must be close to it
    # a hair below (within the 0.5 % accuracy budget).
    assert gaussian_delta(sigma, eps) <= DELTA
    assert gaussian_delta(sigma, eps * 0.995) > DELTA


def test_more_noise_and_fewer_steps_cost_less():
    for acc in ("pld", "rdp", "prv"):
        base = compute_epsilon([poisson(1.0, 0.02, 500)], DELTA, acc)
        assert compute_epsilon([poisson(1.2, 0.02, 500)], DELTA, acc) < base
        assert compute_epsilon([poisson(1.0, 0.02, 400)], DELTA, acc) < base
        assert compute_epsilon([poisson(1.0, 0.02, 500), gaussian(20.0)], DELTA, acc) > base


def test_empty_events_cost_nothing():
    for acc in ("pld", "rdp", "prv"):
        assert compute_epsilon([], DELTA, acc) == 0.0


def test_compute_epsilon_rejects_unknown_accountant():
    with pytest.raises(ValueError, match="privacy.accountant"):
        compute_epsilon([poisson(1.0, 0.01, 10)], DELTA, "gdp")


def test_events_validate_their_parameters():
    with pytest.raises(ValueError, match="sample_rate"):
        MechanismEvent("q", GAUSSIAN, 2.0, sample_rate=0.5)
    with pytest.raises(ValueError, match="noise_multiplier"):
        poisson(0.0, 0.1, 10)
    with pytest.raises(ValueError, match="count"):
        poisson(1.0, 0.1, 0)
    with pytest.raises(ValueError, match="mechanism"):
        MechanismEvent("q", "laplace", 1.0)


# ------------------------------------------------------------------------------------------
# calibration
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("target", "q", "steps"),
    [(1.0, 0.01, 1000), (10.0, 0.1, 5000), (1.0, 0.1, 5000), (4.0, 0.04, 200)],
)
def test_calibration_hits_target_quickly(target, q, steps):
    clear_caches()
    t0 = time.perf_counter()
    sigma = calibrate_noise_multiplier(target, DELTA, q, steps)
    wall = time.perf_counter() - t0
    assert wall < 5.0, f"calibration took {wall:.2f} s"
    ours = compute_epsilon([poisson(sigma, q, steps)], DELTA)
    assert target * 0.99 <= ours <= target
    # Independently: the finer reference must also be within the budget and near the target.
    ref = reference_pld_epsilon([poisson(sigma, q, steps)])
    assert target * 0.985 <= ref <= target


def test_calibrated_gaussian_query_matches_closed_form():
    sigma = calibrate_noise_multiplier(0.5, DELTA, 1.0, 1, mechanism=GAUSSIAN, stage="query")
    assert gaussian_delta(sigma, 0.5) <= DELTA  # meets (0.5, 1e-5)
    assert gaussian_delta(sigma, 0.5 * 0.985) > DELTA  # and does not waste more than ~1 %


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
def test_calibration_with_other_accountants(accountant):
    sigma = calibrate_noise_multiplier(3.0, DELTA, 0.04, 500, accountant=accountant)
    eps = compute_epsilon([poisson(sigma, 0.04, 500)], DELTA, accountant)
    assert 3.0 * 0.99 <= eps <= 3.0


def test_calibration_composes_with_fixed_events():
    fixed = [gaussian(10.0, stage="dp_semantic_query")]
    sigma = calibrate_noise_multiplier(2.0, DELTA, 0.05, 500, fixed_events=fixed)
    total = compute_epsilon([*fixed, poisson(sigma, 0.05, 500)], DELTA)
    assert 2.0 * 0.99 <= total <= 2.0
    # The query takes part of the budget, so training alone must come out below the target.
    assert compute_epsilon([poisson(sigma, 0.05, 500)], DELTA) < 2.0 * 0.99


def test_calibration_raises_when_fixed_events_exhaust_the_budget():
    fixed = [gaussian(1.0, stage="dp_semantic_query")]  # eps ~ 4.4 on its own
    with pytest.raises(BudgetError, match=r"privacy\.eps=2 cannot be met.*dp_semantic_query"):
        calibrate_noise_multiplier(2.0, DELTA, 0.05, 500, fixed_events=fixed)


def test_calibration_raises_when_target_needs_absurd_noise():
    with pytest.raises(BudgetError, match=r"privacy\.eps=1e-05 cannot be met.*noise_multiplier >"):
        calibrate_noise_multiplier(1e-5, DELTA, 0.1, 1000)


# ------------------------------------------------------------------------------------------
# ledger: validation and planning
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        ({"epsilon_target": 0.0}, "privacy.eps"),
        ({"epsilon_target": -1.0}, "privacy.eps"),
        ({"delta": 1 / 4000}, "privacy.delta"),
        ({"delta": 0.0}, "privacy.delta"),
        ({"accountant": "moments"}, "privacy.accountant"),
        ({"neighbouring": "replace_one"}, "privacy.neighbouring"),
        ({"dataset_size": 0}, "dataset_size"),
    ],
)
def test_ledger_validation_names_the_key(kwargs, key):
    args = {"epsilon_target": 1.0, "delta": DELTA, "dataset_size": 4000} | kwargs
    with pytest.raises(ValueError, match=key.replace(".", r"\.")) as info:
        PrivacyLedger(**args)
    assert "\n" not in str(info.value)
    if key == "privacy.delta":
        assert "1/N" in str(info.value) and "N=4000" in str(info.value)


def test_plan_fixed_query_plus_remainder_meets_target():
    ledger = PrivacyLedger(1.0, DELTA, 4000)
    planned = ledger.plan(
        [
            PlannedStage("dp_semantic_query", GAUSSIAN, noise_multiplier=12.3),
            PlannedStage("dp_train", POISSON_GAUSSIAN, sample_rate=0.05, count=800),
        ]
    )
    assert [e.stage for e in planned] == ["dp_semantic_query", "dp_train"]
    assert ledger.planned_noise_multiplier("dp_semantic_query") == 12.3
    assert planned[1].count == 800 and planned[1].sample_rate == 0.05
    assert 0.99 <= compute_epsilon(planned, DELTA) <= 1.0
    assert 0.985 <= reference_pld_epsilon(planned) <= 1.0
    # The query's cost is charged: training alone gets clearly less than the whole budget.
    assert compute_epsilon(planned[1:], DELTA) < 0.95


def test_plan_budget_fraction_stage_spends_its_fraction():
    ledger = PrivacyLedger(2.0, DELTA, 4000)
    ledger.plan(
        [
            PlannedStage("dp_central_images", POISSON_GAUSSIAN, 0.1, 5, budget_fraction=0.3),
            PlannedStage("dp_train", POISSON_GAUSSIAN, sample_rate=0.05, count=300),
        ]
    )
    central, train = ledger.planned
    assert 0.6 * 0.99 <= compute_epsilon([central], DELTA) <= 0.6
    assert 2.0 * 0.99 <= compute_epsilon([central, train], DELTA) <= 2.0


def test_plan_without_remainder_is_checked_against_target():
    ledger = PrivacyLedger(1.0, DELTA, 4000)
    with pytest.raises(BudgetError, match=r"privacy\.eps=1 cannot be met: the plan composes"):
        ledger.plan([PlannedStage("dp_train", POISSON_GAUSSIAN, 0.05, 800, noise_multiplier=0.8)])
    assert ledger.planned == []


def test_plan_rejects_impossible_splits():
    ledger = PrivacyLedger(1.0, DELTA, 4000)
    with pytest.raises(BudgetError, match="privacy.eps=1 cannot be met.*dp_semantic_query"):
        ledger.plan(
            [
                PlannedStage("dp_semantic_query", GAUSSIAN, noise_multiplier=2.0),
                PlannedStage("dp_train", POISSON_GAUSSIAN, 0.05, 100),
            ]
        )
    with pytest.raises(BudgetError, match="budget fractions sum to 1"):
        ledger.plan(
            [
                PlannedStage("a", POISSON_GAUSSIAN, 0.05, 10, budget_fraction=0.5),
                PlannedStage("b", POISSON_GAUSSIAN, 0.05, 10, budget_fraction=0.5),
                PlannedStage("c", POISSON_GAUSSIAN, 0.05, 10),
            ]
        )
    with pytest.raises(ValueError, match="at most one stage"):
        ledger.plan([PlannedStage("a", GAUSSIAN), PlannedStage("b", GAUSSIAN)])
    with pytest.raises(ValueError, match="unique"):
        ledger.plan([PlannedStage("a", GAUSSIAN), PlannedStage("a", GAUSSIAN, noise_multiplier=9)])
    with pytest.raises(ValueError, match="not both"):
        PlannedStage("a", GAUSSIAN, noise_multiplier=2.0, budget_fraction=0.5)


# ------------------------------------------------------------------------------------------
# ledger: spending
# ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def planned_state() -> dict:
    ledger = PrivacyLedger(1.0, DELTA, 2000)
    ledger.plan(
        [
            PlannedStage("dp_semantic_query", GAUSSIAN, noise_multiplier=20.0),
            PlannedStage("dp_train", POISSON_GAUSSIAN, sample_rate=0.05, count=100),
        ]
    )
    return ledger.state_dict()


@pytest.fixture
def ledger(planned_state) -> PrivacyLedger:
    return PrivacyLedger.from_json(planned_state)


def record_train(ledger: PrivacyLedger, count: int = 1) -> None:
    sigma = ledger.planned_noise_multiplier("dp_train")
    ledger.record("dp_train", POISSON_GAUSSIAN, sigma, 0.05, count)


def test_record_merges_identical_consecutive_events(ledger):
    for _ in range(3):
        record_train(ledger)
    assert len(ledger.events) == 1 and ledger.events[0].count == 3
    ledger.record("dp_semantic_query", GAUSSIAN, 20.0)
    record_train(ledger, 2)  # not merged across the query: the log keeps the order of events
    assert [(e.stage, e.count) for e in ledger.events] == [
        ("dp_train", 3),
        ("dp_semantic_query", 1),
        ("dp_train", 2),
    ]
    assert ledger.steps_spent("dp_train") == 5
    assert ledger.remaining_steps("dp_train") == 95
    assert ledger.steps_spent("dp_semantic_query") == 1
    assert ledger.remaining_steps("dp_semantic_query") == 0
    with pytest.raises(KeyError, match="not in the privacy plan"):
        ledger.remaining_steps("nope")


def test_record_within_plan_does_not_compute_epsilon(ledger, monkeypatch):
    def boom(*args, **kwargs):
        raise AssertionError("epsilon computed")

    monkeypatch.setattr(ledger_mod, "compute_epsilon", boom)
    ledger.record("dp_semantic_query", GAUSSIAN, 20.0)
    for _ in range(100):
        record_train(ledger)
    assert ledger.remaining_steps("dp_train") == 0
    with pytest.raises(AssertionError, match="epsilon computed"):
        record_train(ledger)  # beyond the plan: now it has to check


def test_record_refuses_overspending_and_leaves_state_unchanged(ledger):
    ledger.record("dp_semantic_query", GAUSSIAN, 20.0)
    record_train(ledger, 100)
    before = ledger.to_json()
    assert before["epsilon_spent"] <= 1.0
    with pytest.raises(BudgetError, match=r"privacy\.eps=1 would be exceeded.*'dp_train'"):
        record_train(ledger, 40)
    assert ledger.to_json() == before
    with pytest.raises(BudgetError):
        ledger.record("dp_semantic_query", GAUSSIAN, 2.0)  # an unplanned, expensive query


def test_a_step_with_less_noise_than_planned_is_not_covered_by_the_plan(ledger):
    """The plan covers its own (stage, mechanism, σ, q) only: the same steps at half the planned
    σ must be checked against the budget, and refused (found by a mutation review)."""
    half = ledger.planned_noise_multiplier("dp_train") / 2
    ledger.record("dp_semantic_query", GAUSSIAN, 20.0)
    before = ledger.to_json()
    with pytest.raises(BudgetError):
        ledger.record("dp_train", POISSON_GAUSSIAN, half, 0.05, 100)
    assert ledger.to_json() == before


def test_even_a_small_overspend_is_refused(ledger):
    """The slack on the target is float round-off, not a tolerance: the first extra step that
    takes ε above the target is refused, however little above."""
    ledger.record("dp_semantic_query", GAUSSIAN, 20.0)
    record_train(ledger, 100)
    sigma = ledger.planned_noise_multiplier("dp_train")
    extra = next(k for k in range(1, 200)
                 if compute_epsilon([*ledger.events, poisson(sigma, 0.05, k)], DELTA) > 1.0)
    assert compute_epsilon([*ledger.events, poisson(sigma, 0.05, extra)], DELTA) < 1.02
    record_train(ledger, extra - 1)  # still within the target
    with pytest.raises(BudgetError):
        record_train(ledger)


def test_record_accepts_unplanned_events_that_fit(ledger):
    record_train(ledger, 50)
    # Not covered by the plan (other sigma), but half the steps leave room for it.
    ledger.record("dp_train", POISSON_GAUSSIAN, 5.0, 0.05, 10)
    assert ledger.steps_spent("dp_train") == 60
    assert ledger.epsilon_spent() < 1.0


def test_events_and_planned_are_copies(ledger):
    ledger.planned[1].count = 10**6
    record_train(ledger)
    ledger.events[0].count = 10**6
    assert ledger.remaining_steps("dp_train") == 99


# ------------------------------------------------------------------------------------------
# ledger: files and checkpoints
# ------------------------------------------------------------------------------------------

CONTRACT_KEYS = {
    "delta",
    "epsilon_target",
    "epsilon_spent",
    "accountant",
    "epsilon_by_accountant",
    "dataset_size",
    "neighbouring",
    "events",
}


def test_to_json_follows_the_privacy_json_contract(ledger):
    ledger.record("dp_semantic_query", GAUSSIAN, 20.0)
    record_train(ledger, 10)
    d = json.loads(json.dumps(ledger.to_json(), allow_nan=False))
    assert CONTRACT_KEYS | {"planned", "formal_guarantee"} == set(d)
    assert d["delta"] == DELTA and d["epsilon_target"] == 1.0 and d["dataset_size"] == 2000
    assert d["accountant"] == "pld" and d["neighbouring"] == "add_remove"
    assert d["formal_guarantee"] is True
    assert set(d["epsilon_by_accountant"]) == {"pld", "rdp", "prv"}
    assert d["epsilon_spent"] == d["epsilon_by_accountant"]["pld"] == ledger.epsilon_spent()
    assert 0 < d["epsilon_spent"] < 1.0
    query, train = d["events"]
    assert query == {
        "stage": "dp_semantic_query",
        "mechanism": "gaussian",
        "noise_multiplier": 20.0,
        "count": 1,
    }
    assert set(train) == {"stage", "mechanism", "noise_multiplier", "sample_rate", "steps"}
    assert train["steps"] == 10 and train["sample_rate"] == 0.05
    assert [e["stage"] for e in d["planned"]] == ["dp_semantic_query", "dp_train"]


def test_a_failing_informative_accountant_does_not_break_privacy_json(ledger, monkeypatch):
    def prv_fails(key, delta):
        raise RuntimeError("Cannot compute epsilon")

    monkeypatch.setitem(accounting._EPSILON_FNS, "prv", prv_fails)
    record_train(ledger, 13)  # an event list no other test caches
    d = json.loads(json.dumps(ledger.to_json(), allow_nan=False))
    assert d["epsilon_by_accountant"]["prv"] is None
    assert d["epsilon_spent"] == d["epsilon_by_accountant"]["pld"] > 0
    # The governing accountant's failure is never swallowed.
    monkeypatch.setitem(accounting._EPSILON_FNS, "pld", prv_fails)
    record_train(ledger, 1)
    with pytest.raises(RuntimeError):
        ledger.to_json()


def test_epsilon_is_cached(ledger):
    record_train(ledger, 7)
    ledger.to_json()
    misses = accounting._epsilon_cached.cache_info().misses
    ledger.to_json()
    ledger.epsilon_by_accountant()
    assert accounting._epsilon_cached.cache_info().misses == misses


def test_json_round_trip(ledger):
    ledger.record("dp_semantic_query", GAUSSIAN, 20.0)
    record_train(ledger, 10)
    d = json.loads(json.dumps(ledger.to_json()))
    back = PrivacyLedger.from_json(d)
    assert back.to_json() == ledger.to_json()
    assert back.events == ledger.events and back.planned == ledger.planned
    assert back.remaining_steps("dp_train") == 90


def _plain(x) -> bool:
    if isinstance(x, dict):
        return all(isinstance(k, str) and _plain(v) for k, v in x.items())
    if isinstance(x, list):
        return all(_plain(v) for v in x)
    return x is None or type(x) in (str, int, float, bool)


def test_state_dict_round_trip(ledger, planned_state):
    record_train(ledger, 12)
    state = ledger.state_dict()
    assert _plain(state)
    fresh = PrivacyLedger.from_json(planned_state)
    fresh.load_state_dict(state)
    assert fresh.events == ledger.events and fresh.planned == ledger.planned
    assert fresh.steps_spent("dp_train") == 12
    # The form the pipeline restores from privacy.json: events as dataclass fields.
    state["events"] = [e.__dict__ for e in ledger.events]
    fresh.load_state_dict(state)
    assert fresh.events == ledger.events


def test_a_ledger_never_unspends_when_an_older_record_is_loaded(ledger):
    record_train(ledger, 5)
    older = ledger.state_dict()
    record_train(ledger, 3)
    ledger.load_state_dict(older)  # a checkpoint written before privacy.json's last update
    assert ledger.steps_spent("dp_train") == 8
    fresh = PrivacyLedger.from_json(ledger.state_dict())
    fresh.load_state_dict(ledger.state_dict())
    assert fresh.steps_spent("dp_train") == 8


def test_a_voided_guarantee_is_never_restored_by_loading_a_state(ledger, planned_state):
    """As spent budget is never un-spent: a checkpoint written before CPSample voided the
    guarantee must not make the run claim it again."""
    ledger.void_guarantee("CPSample read the training images")
    ledger.load_state_dict(planned_state)  # formal_guarantee true
    assert ledger.formal_guarantee is False and ledger.note == "CPSample read the training images"
    fresh = PrivacyLedger.from_json(planned_state)
    fresh.load_state_dict(ledger.state_dict())  # a voided state voids a ledger that was not
    assert fresh.formal_guarantee is False and fresh.note == "CPSample read the training images"


def test_load_state_dict_refuses_another_budget(ledger):
    other = PrivacyLedger(2.0, DELTA, 2000)
    with pytest.raises(ConfigError, match=r"privacy\.eps.*planned for privacy\.eps=1\.0"):
        other.load_state_dict(ledger.state_dict())


def test_write_is_atomic(ledger, tmp_path, monkeypatch):
    path = tmp_path / "privacy.json"
    ledger.write(path)
    assert os.listdir(tmp_path) == ["privacy.json"]
    first = json.loads(path.read_text())
    assert set(first) >= CONTRACT_KEYS and first["events"] == []

    record_train(ledger, 3)
    ledger.write(str(path))  # str paths too; overwrites in place
    assert json.loads(path.read_text())["events"][0]["steps"] == 3
    assert os.listdir(tmp_path) == ["privacy.json"]

    def crash(src, dst):
        raise OSError("disk full")

    record_train(ledger, 1)
    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="disk full"):
        ledger.write(path)
    # A crash mid-write leaves the previous file intact and no temporary file behind.
    assert os.listdir(tmp_path) == ["privacy.json"]
    assert json.loads(path.read_text())["events"][0]["steps"] == 3


def test_the_spend_journal_keeps_the_last_whole_line(tmp_path):
    """A line cut short by a crash was never fsynced before its step's noise: the line before it counts."""
    from dpgen.privacy.journal import append_spend, read_spend

    ledger = PrivacyLedger(epsilon_target=8.0, delta=1e-5, dataset_size=100)
    ledger.plan([PlannedStage("dp_train", POISSON_GAUSSIAN, sample_rate=0.1, count=5)])
    path = tmp_path / "journal.jsonl"
    assert read_spend(path) is None
    for _ in range(2):
        ledger.record("dp_train", POISSON_GAUSSIAN, ledger.planned_noise_multiplier("dp_train"), 0.1, 1)
        append_spend(path, ledger)
    with open(path, "a") as f:
        f.write('\n{"events": [{"stage": "dp_tr')
    resumed = PrivacyLedger(epsilon_target=8.0, delta=1e-5, dataset_size=100)
    resumed.plan([PlannedStage("dp_train", POISSON_GAUSSIAN, sample_rate=0.1, count=5)])
    resumed.load_state_dict(read_spend(path))
    assert resumed.steps_spent("dp_train") == 2 and resumed.remaining_steps("dp_train") == 3
    # The resumed run's next record, appended after the cut one, is not swallowed by it.
    resumed.record("dp_train", POISSON_GAUSSIAN, resumed.planned_noise_multiplier("dp_train"), 0.1, 1)
    append_spend(path, resumed)
    assert sum(e["steps"] for e in read_spend(path)["events"]) == 3
    other = PrivacyLedger(epsilon_target=4.0, delta=1e-5, dataset_size=100)  # another budget
    with pytest.raises(ConfigError, match="privacy.eps"):
        other.load_state_dict(read_spend(path))


def test_the_spend_journal_is_compacted_to_its_last_record_only_after_the_append(tmp_path, monkeypatch):
    """A long run's journal stays bounded, and the step being charged is durable before the rewrite."""
    from dpgen.privacy import journal

    monkeypatch.setattr(journal, "COMPACT_AT_BYTES", 2000)
    ledger = PrivacyLedger(epsilon_target=8.0, delta=1e-5, dataset_size=100)
    ledger.plan([PlannedStage("dp_train", POISSON_GAUSSIAN, sample_rate=0.1, count=100)])
    path = tmp_path / "journal.jsonl"
    sizes, compactions = [], 0
    for _ in range(40):
        ledger.record("dp_train", POISSON_GAUSSIAN, ledger.planned_noise_multiplier("dp_train"), 0.1, 1)
        journal.append_spend(path, ledger)
        sizes.append(path.stat().st_size)
        if len(sizes) > 1 and sizes[-1] < sizes[-2]:  # rewritten: the last record alone
            compactions += 1
            assert path.read_text().count("\n") == 1
        assert journal.read_spend(path)["events"][0]["steps"] == ledger.steps_spent("dp_train")
    assert compactions >= 3 and max(sizes) <= 2000
    assert os.listdir(tmp_path) == ["journal.jsonl"]  # no temporary file left behind

    def crash(*args):
        raise OSError("disk full")

    monkeypatch.setattr(journal, "atomic_write", crash)
    monkeypatch.setattr(journal, "COMPACT_AT_BYTES", 0)  # the next append compacts
    ledger.record("dp_train", POISSON_GAUSSIAN, ledger.planned_noise_multiplier("dp_train"), 0.1, 1)
    with pytest.raises(OSError, match="disk full"):
        journal.append_spend(path, ledger)
    assert journal.read_spend(path)["events"][0]["steps"] == 41  # charged before the failed rewrite
