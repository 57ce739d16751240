"""The run a release samples from: checked to be finished and within its privacy budget.

Every check here reads files of the run directory only, so a refused release writes nothing.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from omegaconf import DictConfig, OmegaConf

from dpgen.data import describe_data
from dpgen.privacy.events import EPS_RTOL
from dpgen.privacy.guarantee import has_formal_guarantee, ledger_kept_guarantee, training_is_private
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


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ReleaseError(f"{path}: unreadable ({err}). Fix: pass an intact run directory") from err


def open_run(run_dir: str | Path) -> SourceRun:
    """The finished run in ``run_dir``, or ReleaseError saying why it cannot be released."""
    run_dir = Path(run_dir)
    config, stages = run_dir / "run_config.yaml", run_dir / "stages.json"
    if not config.is_file():
        raise ReleaseError(f"{run_dir}: not a dpgen run (no run_config.yaml). Fix: pass a run directory "
                           "such as outputs/<date>/<time>")
    cfg = OmegaConf.load(config)
    if trained_on_canaries(run_dir, cfg):
        raise ReleaseError(f"{run_dir}: a canary audit's run (python -m dpgen.audit); its model was trained on "
                           "canaries and is never sampled or released. Fix: pass an ordinary run's directory")
    done = _read_json(stages).get("completed", []) if stages.is_file() else []
    missing = [s for s in cfg.method.stages if s not in done]
    if missing or not (run_dir / FINAL_WEIGHTS).is_file():
        what = f"stage {missing[0]} has not finished" if missing else f"{FINAL_WEIGHTS} is missing"
        raise ReleaseError(f"{run_dir}: not a finished dpgen run ({what}). "
                           f"Fix: finish it with `python -m dpgen +resume={run_dir}` and its original overrides")

    privacy_file = run_dir / "privacy.json"
    if not privacy_file.is_file():
        if training_is_private(cfg):
            raise ReleaseError(f"{run_dir}: no privacy.json, so the guarantee of method {cfg.method.name} "
                               "cannot be stated. Fix: release only runs whose privacy.json is intact")
        return SourceRun(run_dir, cfg, {}, done)
    privacy = _read_json(privacy_file)
    spent, target = privacy.get("epsilon_spent"), privacy.get("epsilon_target")
    if target is not None and (spent is None or spent > target * (1 + EPS_RTOL)):
        raise ReleaseError(f"{run_dir}: privacy.json reports epsilon spent {spent} above its target {target}. "
                           "Fix: do not release this run; retrain within the budget")
    return SourceRun(run_dir, cfg, privacy, done)
