"""One run's loggers: the W&B run around all its stages, each stage's Lightning loggers and
callbacks, and the final results (see the package docstring for what goes where)."""

from __future__ import annotations

import json
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from lightning.fabric.utilities.rank_zero import rank_zero_only
from lightning.pytorch import Callback
from lightning.pytorch.callbacks import LearningRateMonitor
from lightning.pytorch.loggers import CSVLogger, Logger, WandbLogger
from omegaconf import DictConfig, OmegaConf

from dpgen.distributed import is_rank_zero
from dpgen.io import write_json
from dpgen.loggers.grids import SampleGridCallback
from dpgen.privacy.guarantee import (
    OUTSIDE_GUARANTEE,
    guarantee_notes,
    has_formal_guarantee,
    training_is_private,
)


def _uses_wandb(cfg: DictConfig) -> bool:
    return cfg.logger.name == "wandb" and rank_zero_only.rank == 0


def _sweep_group() -> str | None:
    """In a Hydra multirun, the sweep directory: W&B then groups the sweep's runs."""
    if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
        return str(HydraConfig.get().sweep.dir)
    return None


RUN_RECORD = "wandb-run.json"


def _run_name(cfg: DictConfig) -> str:
    """``dpdm-eps10``; ``nonprivate``; ``dpdm-eps10-cpsample-no-formal-dp`` when sampling voids the
    guarantee of a DP-trained generator, so a dashboard never shows such a run as a DP point. A
    name the user sets (``logger.run_name``) keeps that suffix, and a non-private run's name says
    so."""
    if not training_is_private(cfg):
        name = cfg.logger.get("run_name")
        return f"{name}-nonprivate" if name and "nonprivate" not in name else name or cfg.method.name
    name = cfg.logger.get("run_name") or f"{cfg.method.name}-eps{cfg.privacy.eps:g}"
    return name if has_formal_guarantee(cfg) else f"{name}-{cfg.sampling.name}-no-formal-dp"


def _job_suffix() -> str:
    """``-job<n>`` in a Hydra multirun: a sweep over more than ε would otherwise name runs alike."""
    if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
        return f"-job{HydraConfig.get().job.num}"
    return ""


def _tags(cfg: DictConfig) -> list[str]:
    """The user's tags, and what a dashboard filters DP points by."""
    private = training_is_private(cfg)
    tags = [cfg.method.name, f"eps={cfg.privacy.eps:g}" if private else "nonprivate",
            "formal-dp" if private and has_formal_guarantee(cfg) else "no-formal-dp"]
    if private and cfg.privacy.get("log_train_loss"):
        tags.append("unnoised-train-loss")
    return list(dict.fromkeys([*cfg.logger.tags, *tags]))


def _run_identity(cfg: DictConfig, run_dir: Path) -> dict[str, Any]:
    """The W&B run id, name and group of this attempt. The id is kept from the first attempt, so
    that a resume (``+resume``, a requeued job, a re-run sweep) continues the same W&B run; the
    name and group are this attempt's (a resume into ``sampling=cpsample`` must be renamed
    ``…-no-formal-dp``), except that a job resumed alone keeps its sweep's group and ``-job<n>``."""
    path = run_dir / RUN_RECORD
    saved = json.loads(path.read_text()) if path.exists() else {}
    identity = {
        "id": saved.get("id") or secrets.token_hex(6),  # W&B's run ids are short lowercase alphanumerics
        "job_suffix": _job_suffix() or saved.get("job_suffix", ""),
        "group": cfg.logger.group or _sweep_group() or saved.get("group"),
    }
    identity["name"] = _run_name(cfg) + identity["job_suffix"]
    if identity != saved:
        write_json(path, identity)
    return identity


@contextmanager
def experiment(cfg: DictConfig, run_dir: Path) -> Iterator[None]:
    """The W&B run around all stages of one dpgen run (nothing for ``logger=csv``)."""
    if not _uses_wandb(cfg):
        yield
        return
    import wandb

    lg = cfg.logger
    identity = _run_identity(cfg, run_dir)
    run = wandb.init(
        dir=str(run_dir), mode=lg.mode, project=lg.project, entity=lg.entity, id=identity["id"], resume="allow",
        group=identity["group"], name=identity["name"], tags=_tags(cfg), notes=OUTSIDE_GUARANTEE,
        config=OmegaConf.to_container(cfg, resolve=True), settings=wandb.Settings(console=lg.console),
    )
    # Lightning defines this x axis only for runs it creates itself.
    run.define_metric("trainer/global_step")
    run.define_metric("*", step_metric="trainer/global_step", step_sync=True)
    exit_code = 1
    try:
        yield
        exit_code = 0
    finally:
        run.finish(exit_code=exit_code)


def _keep_earlier_attempt(log_dir: Path) -> None:
    """Lightning's CSVLogger deletes a ``metrics.csv`` it finds: a resumed stage keeps the
    interrupted attempt's as ``metrics-attempt<n>.csv``."""
    current = log_dir / "metrics.csv"
    if current.is_file() and is_rank_zero():
        current.rename(log_dir / f"metrics-attempt{1 + len(list(log_dir.glob('metrics-attempt*.csv')))}.csv")


def stage_loggers(cfg: DictConfig, run_dir: Path, stage: str) -> list[Logger]:
    _keep_earlier_attempt(run_dir / "logs" / stage)
    # Every logged row reaches the disk at once (Lightning's default holds 100 steps in memory),
    # so a killed stage leaves its curves up to the kill for the resumed attempt to keep. Rows
    # come only at logging steps (and ε's at its own steps), so this is not a write per step.
    loggers: list[Logger] = [CSVLogger(run_dir, name="logs", version=stage, flush_logs_every_n_steps=1)]
    if cfg.logger.name == "wandb":
        import wandb

        # On rank 0 this attaches to the run of `experiment`; elsewhere Lightning logs nothing.
        loggers.append(WandbLogger(experiment=wandb.run, prefix=stage, save_dir=run_dir))
    return loggers


def stage_callbacks(cfg: DictConfig, run_dir: Path, stage: str) -> list[Callback]:
    """Learning rate every step; sample grids every ``logger.sample_every_n_steps`` (0 = off)."""
    lg = cfg.logger
    callbacks: list[Callback] = [LearningRateMonitor(logging_interval="step")]
    if lg.sample_every_n_steps:
        callbacks.append(SampleGridCallback(run_dir / "logs" / stage / "grids", lg.sample_every_n_steps,
                                            cfg.data.num_classes, lg.grid_per_class, lg.grid_steps))
    return callbacks


def log_results(cfg: DictConfig, run_dir: Path) -> None:
    """metrics.json and privacy.json as the W&B run summary, samples.png as an image."""
    if not _uses_wandb(cfg):
        return
    import wandb

    summary: dict[str, Any] = {}
    for name in ("metrics", "privacy"):
        path = run_dir / f"{name}.json"
        if path.exists():
            summary[name] = json.loads(path.read_text())
    wandb.run.summary.update({**summary.get("metrics", {}), "privacy": summary.get("privacy", {}),
                              "outside_dp_guarantee": OUTSIDE_GUARANTEE})
    if (run_dir / "samples.png").exists():
        caption = "final samples, one row per class"
        if not has_formal_guarantee(cfg):
            caption += "; no formal DP guarantee: " + " ".join(guarantee_notes(cfg))
        wandb.run.log({"samples": wandb.Image(str(run_dir / "samples.png"), caption=caption)})
