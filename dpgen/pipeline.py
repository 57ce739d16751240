"""The stage runner: a run is the ordered list of stages in ``method.stages`` (plus the stages
``sampling.stages`` inserts before ``sample``).

Each stage reads what earlier stages wrote into the run directory and writes its own files, so
an interrupted run resumes stage by stage (``stages.json`` lists the finished ones) and, inside
a training stage, from the last checkpoint. The privacy ledger is planned for *all* stages
before the first one runs; a run whose budget cannot be met never starts.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from torch.utils.data import Dataset

from dpgen.data import build_dataset
from dpgen.io import write_json
from dpgen.loggers import experiment, log_results
from dpgen.privacy.ledger import PrivacyLedger
from dpgen.stages import STAGES, run_stages
from dpgen.stages.planning import plan_privacy

log = logging.getLogger("dpgen")


@dataclass
class RunContext:
    """What every stage gets: the config, the run directory, the ledger, the sensitive data."""

    cfg: DictConfig
    run_dir: Path
    ledger: PrivacyLedger | None = None
    wall_s: dict[str, float] = field(default_factory=dict)

    @cached_property
    def train_set(self) -> Dataset:
        return build_dataset(self.cfg.data, "train")

    def held_out_test_set(self) -> Dataset:
        """The held-out real split. Only the final evaluation may call this."""
        return build_dataset(self.cfg.data, "test")

    def path(self, name: str) -> Path:
        return self.run_dir / name

    @property
    def privacy_json(self) -> Path:
        return self.path("privacy.json")


def _load_state(run_dir: Path) -> dict[str, Any]:
    state_file = run_dir / "stages.json"
    if state_file.exists():
        return json.loads(state_file.read_text())
    return {"completed": [], "wall_s": {}}


def _check_resume_config(cfg: DictConfig, run_dir: Path) -> None:
    saved = run_dir / "run_config.yaml"
    if not saved.exists():
        return
    before = OmegaConf.to_container(OmegaConf.load(saved), resolve=True)
    now = OmegaConf.to_container(cfg, resolve=True)
    before.pop("resume", None)
    now.pop("resume", None)
    diffs = sorted(k for k in set(before) | set(now) if before.get(k) != now.get(k))
    if diffs:
        raise ValueError(
            f"resume={run_dir}: this run was started with a different configuration in "
            f"{', '.join(diffs)}. Fix: repeat the original overrides (see {saved})"
        )


def run_pipeline(cfg: DictConfig, run_dir: Path, stages: Sequence[str] | None = None,
                 train_set: Dataset | None = None) -> RunContext:
    """Run ``stages`` (default: :func:`dpgen.stages.run_stages`) in ``run_dir``.

    ``train_set`` replaces the configured training split; only the canary audit
    (``python -m dpgen.audit``) passes one, so canaries never enter an ordinary run.
    """
    start = time.time()
    run_dir.mkdir(parents=True, exist_ok=True)
    log.info("run directory: %s", run_dir.resolve())
    _check_resume_config(cfg, run_dir)
    OmegaConf.save(cfg, run_dir / "run_config.yaml", resolve=True)
    state = _load_state(run_dir)
    ctx = RunContext(cfg=cfg, run_dir=run_dir, wall_s=state["wall_s"])
    if train_set is not None:
        ctx.train_set = train_set
    ctx.ledger = plan_privacy(ctx)
    with experiment(cfg, run_dir):
        for name in run_stages(cfg) if stages is None else stages:
            if name in state["completed"]:
                log.info("stage %s: already complete, skipping", name)
                continue
            log.info("stage %s: starting", name)
            t0 = time.time()
            STAGES[name](ctx)
            ctx.wall_s[name] = ctx.wall_s.get(name, 0.0) + time.time() - t0
            state["completed"].append(name)
            state["wall_s"] = ctx.wall_s
            write_json(run_dir / "stages.json", state)
            log.info("stage %s: done in %.1f s", name, time.time() - t0)
        _record_total_wall(ctx)
        log_results(cfg, run_dir)
    log.info("run finished in %.1f s; results in %s", time.time() - start, run_dir.resolve())
    return ctx


def _record_total_wall(ctx: RunContext) -> None:
    """evaluate writes metrics.json before its own time is known; complete the total here."""
    metrics_file = ctx.path("metrics.json")
    if metrics_file.exists():
        metrics = json.loads(metrics_file.read_text())
        metrics["total_wall_s"] = sum(ctx.wall_s.values())
        write_json(metrics_file, metrics)
