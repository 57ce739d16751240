"""The run a release samples from: checked to be finished and within its privacy budget.

Every check here reads files of the run directory only, so a refused release writes nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from omegaconf import DictConfig

from dpgen.data import describe_data
from dpgen.privacy.events import EPS_RTOL
from dpgen.privacy.guarantee import has_formal_guarantee, ledger_kept_guarantee
from dpgen.run_files import (
    RUN_CONFIG,
    RunFileError,
    check_weights,
    load_run_config,
    read_privacy,
    read_stages,
)
from dpgen.stages import FINAL_WEIGHTS, trained_on_canaries

if TYPE_CHECKING:
    from dpgen.methods.base import DiffusionModule


class ReleaseError(ValueError):
    """A release that must not happen; the message is one line and names the fix."""


@dataclass(frozen=True)
class SourceRun:
    run_dir: Path
    cfg: DictConfig
    privacy: dict[str, Any]  # privacy.json; {} for a non-private run without one
    stages_done: list[str]

    @property
    def formal_guarantee(self) -> bool:
        """False when a stage of the run read the sensitive images without DP (``train``, CPSample)
        and when its ledger gave the guarantee up."""
        return has_formal_guarantee(self.cfg) and ledger_kept_guarantee(self.privacy)

    @property
    def class_names(self) -> tuple[str, ...]:
        return tuple(str(n) for n in describe_data(self.cfg.data).class_names)

    @property
    def weights(self) -> Path:
        return self.run_dir / FINAL_WEIGHTS

    @cached_property
    def generator(self) -> DiffusionModule:
        """The final generator: ``model.pt`` holds the EMA weights where the run kept an EMA,
        and every weight sampling needs (DP-LDM's public decoder included)."""
        from dpgen.stages.training import build_module  # Lightning and diffusers: not for a refusal

        module = build_module(self.cfg)
        module.load_generator_state_dict(torch.load(self.weights, map_location="cpu"))
        return module.eval()


def open_run(run_dir: str | Path) -> SourceRun:
    """The finished run in ``run_dir``, or ReleaseError saying why it cannot be released (or
    sampled again: ``python -m dpgen.sampling`` opens its source run here too)."""
    run_dir = Path(run_dir)
    if not (run_dir / RUN_CONFIG).is_file():
        raise ReleaseError(f"{run_dir}: not a dpgen run (no {RUN_CONFIG}). Fix: pass a run directory "
                           "such as outputs/<date>/<time>")
    try:
        cfg = load_run_config(run_dir)
        if trained_on_canaries(run_dir, cfg):
            raise ReleaseError(f"{run_dir}: a canary audit's run (python -m dpgen.audit); its model was trained on "
                               "canaries and is never sampled or released. Fix: pass an ordinary run's directory")
        done = read_stages(run_dir)["completed"]
        missing = [s for s in cfg.method.stages if s not in done]
        if missing or not (run_dir / FINAL_WEIGHTS).is_file():
            what = f"stage {missing[0]} has not finished" if missing else f"{FINAL_WEIGHTS} is missing"
            raise ReleaseError(f"{run_dir}: not a finished dpgen run ({what}). Fix: finish it with "
                               f"`python -m dpgen +resume={run_dir}` and its original overrides")
        # A truncated model.pt would otherwise fail only at the first sample, after a release's
        # manifest or a resampling's copy of it was written.
        check_weights(run_dir / FINAL_WEIGHTS)
        privacy = read_privacy(run_dir, cfg)
    except RunFileError as err:
        raise ReleaseError(str(err)) from err
    spent, target = privacy.get("epsilon_spent"), privacy.get("epsilon_target")
    if target is not None and spent is None:  # the ledger's accountant found no finite ε
        raise ReleaseError(f"{run_dir}: privacy.json reports no finite epsilon spent (target {target}). "
                           "Fix: do not sample from or release this run; retrain it within the budget")
    if target is not None and spent > target * (1 + EPS_RTOL):
        raise ReleaseError(f"{run_dir}: privacy.json reports epsilon spent {spent} above its target {target}. "
                           "Fix: do not sample from or release this run; retrain it within the budget")
    return SourceRun(run_dir, cfg, privacy, done)
