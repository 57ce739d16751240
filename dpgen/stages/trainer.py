"""A stage's Lightning Trainer, its checkpointing and EMA, and the loader of non-private stages."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from lightning.pytorch import Callback, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.callbacks.weight_averaging import WeightAveraging
from lightning.pytorch.plugins.io import TorchCheckpointIO
from torch.optim.swa_utils import get_ema_multi_avg_fn
from torch.utils.data import DataLoader, Dataset

from dpgen.io import save_torch
from dpgen.loggers.run import stage_callbacks, stage_loggers
from dpgen.privacy.strategy import DDPDPSGDStrategy

if TYPE_CHECKING:
    from dpgen.pipeline import RunContext


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning checkpoints written by rename, so ``last.ckpt`` is always loadable."""

    def save_checkpoint(self, checkpoint: dict, path: str | os.PathLike, storage_options: Any = None) -> None:
        save_torch(path, checkpoint)


class _CheckpointEveryNAndLast(ModelCheckpoint):
    """``last.ckpt`` every n steps and at the last step. Lightning's own saves at the end only if
    the fit saved nothing: a crash after the last step but before ``model.pt`` (or
    ``stages.json``) would resume from an older checkpoint and rebuild ``model.pt`` from fewer
    steps than the ledger charged. Saved through ModelCheckpoint's bookkeeping (no ``last-v1``)."""

    def on_train_end(self, trainer: Trainer, pl_module: Any) -> None:
        if self._last_global_step_saved != trainer.global_step:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))


def build_trainer(ctx: RunContext, stage: str, max_steps: int, callbacks: list[Callback],
                  strategy: Any = "auto", checkpoint_dir: Path | None = None) -> Trainer:
    """The Lightning Trainer of a stage: its loggers and callbacks, atomic checkpoints into
    ``checkpoint_dir`` (none without), and the run's trainer settings."""
    t = ctx.cfg.trainer
    if checkpoint_dir is not None:
        callbacks = [*callbacks, _CheckpointEveryNAndLast(dirpath=checkpoint_dir, save_last=True, save_top_k=0,
                                                          every_n_train_steps=t.checkpoint_every_n_steps)]
    callbacks = [*callbacks, *stage_callbacks(ctx.cfg, ctx.run_dir, stage)]
    kwargs: dict[str, Any] = {}
    # The accelerator is always named: "auto" would pick the GPU of a GPU machine under trainer=cpu.
    if isinstance(strategy, DDPDPSGDStrategy):
        kwargs.update(accelerator=t.accelerator, devices=t.devices, num_nodes=t.num_nodes)
    else:
        # DP-SGD without DDP, and the non-private stages, run in one process on one device
        # (see dpgen/distributed.py).
        kwargs.update(accelerator=t.accelerator, devices=1, num_nodes=1)
    return Trainer(
        max_steps=max_steps, max_epochs=-1, strategy=strategy, precision=t.precision,
        logger=stage_loggers(ctx.cfg, ctx.run_dir, stage), callbacks=callbacks,
        plugins=[AtomicCheckpointIO()], log_every_n_steps=min(t.log_every_n_steps, max_steps),
        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
        use_distributed_sampler=False, default_root_dir=ctx.run_dir,
        # Stages without checkpoints (public pretraining: a cache) get no Lightning default checkpoint
        # under logs/ either.
        enable_checkpointing=checkpoint_dir is not None, **kwargs,
    )


def ema_callbacks(decay: float | None) -> list[Callback]:
    """EMA of weights, updated once per optimizer step (= once per logical DP step).

    torch's multi-tensor EMA is a lerp, which leaves a weight that did not move bit-identical;
    Lightning's ``EMAWeightAveraging`` computes ``decay*avg + (1-decay)*w``, which drifts by
    rounding, and frozen weights (DP-LDM fine-tunes a subset) must stay the pretrained ones.
    """
    return [WeightAveraging(multi_avg_fn=_EMAUpdate(decay))] if decay else []


class _EMAUpdate:
    """``get_ema_multi_avg_fn(decay)`` as a picklable object: DDP spawn pickles callbacks."""

    def __init__(self, decay: float) -> None:
        self.decay = decay

    def __call__(self, averaged: list[torch.Tensor], current: list[torch.Tensor], num_averaged: Any) -> None:
        get_ema_multi_avg_fn(self.decay)(averaged, current, num_averaged)


def shuffled_loader(dataset: Dataset, batch_size: int, seed: int) -> DataLoader:
    """The loader of a non-private stage (DP stages sample Poisson batches instead)."""
    return DataLoader(dataset, batch_size=batch_size, shuffle=True, drop_last=len(dataset) > batch_size,
                      generator=torch.Generator().manual_seed(seed))
