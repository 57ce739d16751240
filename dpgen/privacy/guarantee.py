"""Whether a run's outputs carry a formal DP guarantee, read from the stages it runs.

The guarantee follows from what touches the sensitive training images, never from a flag a
config could set: a stage that reads them through no DP mechanism voids it, whatever else the
run does. Every other stage either goes through a mechanism charged to the ledger
(``dpgen/stages/planning.py``), reads only public data or DP outputs, or evaluates.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

NO_GUARANTEE = ("This run carries no formal differential-privacy guarantee: it trains on the "
                "sensitive data without clipping or noise.")
CPSAMPLE_NO_GUARANTEE = ("This run's samples carry no formal differential-privacy guarantee: CPSample's "
                         "protection classifier is trained on the sensitive training images without "
                         "clipping or noise. Any epsilon reported covers the generator's training only; "
                         "CPSample's protection is empirical (see the audit metrics).")

# What ε does not cover, beside ε in metrics.json and a W&B run (its notes, and a summary key).
OUTSIDE_GUARANTEE = (
    "The privacy guarantee (privacy.epsilon_spent) covers the generator's samples and weights only. Metrics "
    "computed against the sensitive training split (FID/KID/precision/recall against it, the audits' MIA AUC "
    "and replication rate, the real-data ceiling), any DP stage's train/loss curve and the console log are "
    "computed from sensitive data without noise: they are outside the guarantee. Do not publish this run as is.")

# The flags that claimed a guarantee in older dpgen versions; saved configs of older runs still hold them.
# They never changed what a run did, so resume checks and reports ignore them.
RETIRED_FLAGS = ("method.formal_guarantee", "sampling.formal_guarantee")

# Stages that read the sensitive training images without clipping or noise, and what that voids.
NON_PRIVATE_STAGES = {"train": NO_GUARANTEE, "train_protection_classifier": CPSAMPLE_NO_GUARANTEE}


def _stages(node: Any) -> list[str]:
    return list((node.get("stages") if node is not None else None) or [])


def training_is_private(cfg: Any) -> bool:
    """The generator's training (``method.stages``) touches the sensitive images only under DP."""
    return not any(s in NON_PRIVATE_STAGES for s in _stages(cfg.method))


def guarantee_notes(cfg: Any) -> list[str]:
    """Why the run's outputs carry no formal guarantee, one note per reason; [] when they do.

    CPSample counts by name as well as by stage: its guided sampling reads a classifier trained
    on the training images, even when that classifier was trained by an earlier attempt.
    """
    sampling = cfg.get("sampling")
    stages = _stages(cfg.method) + _stages(sampling)
    notes = [NON_PRIVATE_STAGES[s] for s in stages if s in NON_PRIVATE_STAGES]
    if sampling is not None and sampling.get("name") == "cpsample":
        notes.append(CPSAMPLE_NO_GUARANTEE)
    return list(dict.fromkeys(notes))


def has_formal_guarantee(cfg: Any) -> bool:
    return not guarantee_notes(cfg)


def epsilon_scope(cfg: Any, privacy: Mapping[str, Any], formal_guarantee: bool) -> str | None:
    """What a run's ε covers where it is not a guarantee of the run's outputs (its DP training,
    when CPSample's sampling then read the sensitive images); None where there is no ε or it is
    the outputs' guarantee. Beside the ε in metrics.json and datacard.json, for tools that read
    the number without ``formal_guarantee``."""
    if formal_guarantee or privacy.get("epsilon_spent") is None:
        return None
    sampling = cfg.get("sampling")
    why = ("CPSample's protection classifier read the training images"
           if sampling is not None and sampling.get("name") == "cpsample"
           else "a stage read the sensitive training images outside differential privacy")
    return f"generator training only; the samples carry no formal guarantee ({why})"


def ledger_kept_guarantee(privacy: Mapping[str, Any]) -> bool:
    """What a run's ``privacy.json`` says: its ``formal_guarantee``, or for a ledger from before
    that key existed, whether it spent an ε at all."""
    return bool(privacy.get("formal_guarantee", "epsilon_spent" in privacy))
