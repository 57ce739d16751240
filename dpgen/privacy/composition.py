"""What releasing several runs' outputs together costs: their ledgers, composed.

A run's ε covers that run's outputs alone. Outputs of several runs on the same sensitive data
(every point of an ε sweep, a run repeated in a new directory) are covered only by the
composition of all their mechanisms. Basic composition bounds that by the sum of the runs' ε
at the sum of their δ; composing every recorded event with the PLD accountant, as one run
composes its own steps, gives a tighter ε at a single δ.

Runs on disjoint sensitive data do not compose (each dataset's people appear in its own runs
only), so runs are grouped by the data they trained on (:func:`sensitive_data`). Every doubt
errs towards composing more: runs on subsets of one dataset share a group, image folders share
one whatever their roots (one folder is written many ways), and a run whose data is unknown
joins every group. Datasets under different names that share people must be composed as one
(``python -m dpgen.compose --same-data``).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from dpgen.errors import ConfigError
from dpgen.privacy.accounting import compute_epsilon
from dpgen.privacy.events import NEIGHBOURING, MechanismEvent
from dpgen.privacy.guarantee import ledger_kept_guarantee
from dpgen.privacy.journal import JOURNAL, read_spend
from dpgen.privacy.ledger import PrivacyLedger

# Sensitive sets drawn from another one share its people: the embedded 5000 digits are MNIST's.
_DRAWN_FROM = {"mnist5k": "mnist"}
UNKNOWN_DATA = "unknown (no data.name in run_config.yaml)"
SOURCE_RUN = "source_run.json"  # written by python -m dpgen.sampling beside the copied ledger


def spent_ledger(run_dir: str | Path) -> dict[str, Any]:
    """A run's ``privacy.json``, brought up to its spend journal: privacy.json is rewritten only
    every ``privacy.log_every_n_steps``, so a crashed run's journal may hold steps it lacks
    (a resume keeps whichever spent most; so does this). ``{}`` when the run has no ledger;
    ValueError when the journal was written under other privacy settings than privacy.json."""
    path = Path(run_dir) / "privacy.json"
    if not path.is_file():
        return {}
    privacy = json.loads(path.read_text())
    journaled = read_spend(Path(run_dir) / JOURNAL)
    if journaled is None or "epsilon_target" not in privacy:  # nothing newer, or a non-private run
        return privacy
    try:
        ledger = PrivacyLedger.from_json(privacy)
        ledger.load_state_dict(journaled)
    except (ConfigError, KeyError) as err:  # other privacy settings, or no ledger: which one holds is unknown
        raise ValueError(f"{Path(run_dir) / JOURNAL} does not belong to {path} ({err!r})") from err
    state = ledger.state_dict()
    if state["events"] == privacy.get("events") and state["formal_guarantee"] == privacy.get("formal_guarantee"):
        return privacy  # a finished run: the journal adds nothing, and ε need not be computed again
    return ledger.to_json()


def saved_config(run_dir: str | Path) -> dict[str, Any] | None:
    """A run's ``run_config.yaml`` as plain containers (what :func:`sensitive_data` reads), or None."""
    config = Path(run_dir) / "run_config.yaml"
    return OmegaConf.to_container(OmegaConf.load(config)) if config.is_file() else None


def has_guarantee(privacy: Mapping[str, Any]) -> bool:
    """Whether a ledger states a formal guarantee with an ε: what a release of its run can compose."""
    return ledger_kept_guarantee(privacy) and privacy.get("epsilon_spent") is not None


Run = tuple[str, Mapping[str, Any], Mapping[str, Any] | None]  # (name, privacy.json, saved config or None)


def without_resamplings(runs: Mapping[Path, Run]) -> tuple[list[Run], dict[Path, Path]]:
    """``runs`` (resolved run directory -> its run) less those whose release adds nothing to their
    source's: a ``python -m dpgen.sampling`` directory re-samples a run's generator, and while its
    ledger still holds exactly the source's events and guarantee, its samples are post-processing
    of that generator. Only where the source is in ``runs`` too: alone, the resampling stands for
    it. Returns the runs to compose, and each resampling left out with its source."""
    skipped = {}
    for run_dir, (_, privacy, _) in runs.items():
        record = run_dir / SOURCE_RUN
        if not record.is_file():
            continue
        source = Path(json.loads(record.read_text())["source_run"]).resolve()
        same = (source in runs and ledger_kept_guarantee(privacy)
                and privacy.get("events") == runs[source][1].get("events"))
        if same:
            skipped[run_dir] = source
    return [run for run_dir, run in runs.items() if run_dir not in skipped], skipped


def sensitive_data(config: Mapping[str, Any] | None) -> str:
    """Which sensitive data a run trained on, from its saved config (``run_config.yaml``): the
    dataset's name (every image folder one name: roots are written many ways for one folder)."""
    data = (config or {}).get("data") or {}
    name = data.get("name")
    if name is None:
        return UNKNOWN_DATA
    if name == "imagefolder":
        return "imagefolder (every root)"
    return _DRAWN_FROM.get(name, name)


@dataclass(frozen=True)
class CombinedGuarantee:
    """The guarantee of releasing the outputs of ``runs`` together.

    ``epsilon`` (at ``delta``) composes every recorded event with the PLD accountant; it is None
    when a ledger's events do not account for the ε it states. ``epsilon_sum`` (at ``delta_sum``) is basic composition of the
    runs' own ε. Both are None when a run has no formal guarantee: releasing its outputs voids
    any guarantee of the release (``without_guarantee`` names those runs)."""

    runs: tuple[str, ...]
    delta: float | None
    epsilon: float | None
    delta_sum: float | None
    epsilon_sum: float | None
    without_guarantee: tuple[str, ...] = ()


def combine(ledgers: Mapping[str, Mapping[str, Any]], delta: float | None = None) -> CombinedGuarantee:
    """Compose the ``privacy.json`` of each run (by name) into one guarantee, at ``delta``
    (default: the smallest δ among the runs, so no run's own guarantee is stated more loosely)."""
    if not ledgers:
        raise ValueError("no runs to combine")
    runs = tuple(ledgers)
    voided = tuple(run for run, p in ledgers.items() if not has_guarantee(p))
    if voided:
        return CombinedGuarantee(runs, None, None, None, None, voided)
    relations = {p.get("neighbouring", NEIGHBOURING) for p in ledgers.values()}
    if relations != {NEIGHBOURING}:
        # The accountant composes add/remove guarantees; another relation's ε is not one of them.
        raise ValueError(f"runs with neighbouring relations {sorted(map(str, relations))}: only "
                         f"{NEIGHBOURING!r} ledgers compose here")
    deltas = [float(p["delta"]) for p in ledgers.values()]
    delta = min(deltas) if delta is None else delta
    events: list[MechanismEvent] = []
    complete = True
    for p in ledgers.values():
        recorded = [MechanismEvent.from_json(e) for e in p.get("events") or []]
        # A ledger whose events do not account for the ε it claims (hand-made, or truncated)
        # cannot be composed event by event; basic composition still holds.
        complete &= _accounts_for_its_epsilon(p, recorded)
        events += recorded
    composed = compute_epsilon(events, delta, "pld") if complete else None
    return CombinedGuarantee(runs, delta, composed, min(sum(deltas), 1.0),
                             math.fsum(float(p["epsilon_spent"]) for p in ledgers.values()))


def _accounts_for_its_epsilon(privacy: Mapping[str, Any], recorded: list[MechanismEvent]) -> bool:
    claimed = float(privacy["epsilon_spent"])
    if claimed == 0.0:
        return True
    try:
        own = compute_epsilon(recorded, float(privacy["delta"]), privacy.get("accountant", "pld"))
    except ValueError:  # an accountant or δ this version does not know
        return False
    return own >= claimed * (1 - 1e-6)


def combine_by_data(runs: Sequence[Run],
                    delta: float | None = None) -> dict[str, CombinedGuarantee]:
    """``runs``: (name, ``privacy.json``, saved config or None). One combined guarantee per
    sensitive dataset, for the runs trained on it; a run of unknown data counts in every group."""
    groups: dict[str, dict[str, Mapping[str, Any]]] = {}
    unknown: dict[str, Mapping[str, Any]] = {}
    for name, privacy, config in runs:
        data = sensitive_data(config)
        (unknown if data == UNKNOWN_DATA else groups.setdefault(data, {}))[name] = privacy
    if unknown and not groups:
        groups[UNKNOWN_DATA] = {}
    for ledgers in groups.values():
        ledgers.update(unknown)
    return {data: combine(ledgers, delta) for data, ledgers in sorted(groups.items())}
