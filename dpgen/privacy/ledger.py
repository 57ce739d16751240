"""Privacy ledger: every DP mechanism of a run, planned and spent, and ``privacy.json``.

Neighbouring relation: add/remove one example of the sensitive training split.

A run declares all of its mechanisms (``PlannedStage``) before sensitive data is touched; the
ledger calibrates the noise multipliers so that the composition meets ``privacy.eps`` and then
records what is actually spent. The governing accountant (PLD by default,
:mod:`dpgen.privacy.accounting`) decides calibration (:mod:`dpgen.privacy.calibration`) and
refusals; the other two are reported for comparison.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass

from dpgen.errors import BudgetError, ConfigError
from dpgen.io import atomic_write
from dpgen.privacy.accounting import ACCOUNTANTS, check_accountant, compute_epsilon, format_epsilon
from dpgen.privacy.calibration import calibrate_noise_multiplier
from dpgen.privacy.events import (
    EPS_RTOL,
    NEIGHBOURING,
    MechanismEvent,
    check_count,
    check_mechanism,
    check_sample_rate,
    check_sigma,
)

log = logging.getLogger(__name__)


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
        check_mechanism(self.mechanism)
        self.sample_rate = check_sample_rate(self.mechanism, self.sample_rate, what)
        self.count = check_count(self.count, what)
        if self.noise_multiplier is not None and self.budget_fraction is not None:
            raise ValueError(f"{what}: give noise_multiplier or budget_fraction, not both")
        if self.noise_multiplier is not None:
            self.noise_multiplier = check_sigma(self.noise_multiplier, what)
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
        check_accountant(accountant)
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
                f"privacy.eps={format_epsilon(target)} cannot be split: budget fractions sum to "
                f"{format_epsilon(fractions)}"
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
                        mechanism=s.mechanism, accountant=self.accountant, stage=s.stage)
                except BudgetError as e:
                    raise BudgetError(
                        f"privacy.eps={format_epsilon(target)} cannot be met: stage {s.stage!r} with "
                        f"budget_fraction={format_epsilon(s.budget_fraction)}: {e}"
                    ) from None

        def event(s: PlannedStage) -> MechanismEvent:
            return MechanismEvent(s.stage, s.mechanism, sigmas[s.stage], s.sample_rate, s.count)

        if remainder:
            r = remainder[0]
            others = [event(s) for s in stages if s is not r]
            sigmas[r.stage] = calibrate_noise_multiplier(
                target, self.delta, r.sample_rate, r.count, mechanism=r.mechanism, fixed_events=others,
                accountant=self.accountant, stage=r.stage)

        planned = [event(s) for s in stages]
        eps = compute_epsilon(planned, self.delta, self.accountant)
        if eps > target * (1 + EPS_RTOL):
            raise BudgetError(
                f"privacy.eps={format_epsilon(target)} cannot be met: the plan composes to "
                f"eps={format_epsilon(eps)} ({self.accountant}, delta={self.delta:g}). Fix: raise "
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
            if eps > self.epsilon_target * (1 + EPS_RTOL):
                raise BudgetError(
                    f"privacy.eps={format_epsilon(self.epsilon_target)} would be exceeded: recording "
                    f"{new.count} x {mechanism} (noise_multiplier={format_epsilon(new.noise_multiplier)}, "
                    f"sample_rate={format_epsilon(new.sample_rate)}) for stage {stage!r} brings eps to "
                    f"{format_epsilon(eps)} ({self.accountant}, delta={self.delta:g}), beyond the plan. "
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
            **self._header(),
            "epsilon_spent": by[self.accountant],
            "epsilon_by_accountant": by,
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


def non_private_record(dataset_size: int, method: str, note: str) -> dict:
    """``privacy.json`` of a run with no DP stage: the same keys, with no ε to state, so that a
    reader need not special-case the file."""
    return {"delta": None, "epsilon_target": None, "epsilon_spent": None, "accountant": None,
            "epsilon_by_accountant": {}, "dataset_size": dataset_size, "neighbouring": None,
            "events": [], "formal_guarantee": False, "method": method, "note": note}
