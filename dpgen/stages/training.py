"""Training stages: public pretraining (cached), non-private training, DP-SGD training."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from lightning.pytorch import Trainer
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import Dataset, TensorDataset

from dpgen.data import build_public_dataset, describe_data
from dpgen.distributed import ddp_strategy_kwargs, is_ddp, is_rank_zero
from dpgen.io import build_once, save_torch
from dpgen.methods.base import DiffusionModule
from dpgen.methods.registry import METHODS
from dpgen.privacy.callback import PrivacyAccountantCallback
from dpgen.privacy.journal import JOURNAL
from dpgen.privacy.poisson import PoissonDataModule
from dpgen.privacy.strategy import DDPDPSGDStrategy, DPSGDConfig, DPSGDStrategy
from dpgen.stages import FINAL_WEIGHTS
from dpgen.stages.trainer import build_trainer, ema_callbacks, shuffled_loader

if TYPE_CHECKING:
    from dpgen.pipeline import RunContext

log = logging.getLogger("dpgen")

WARMUP_WEIGHTS = "warmup.pt"  # written by the warm-up stage (dpgen/stages/central.py)


def build_module(cfg: DictConfig) -> DiffusionModule:
    return METHODS[cfg.method.name].from_config(cfg)


def load_final_module(ctx: RunContext) -> DiffusionModule:
    module = build_module(ctx.cfg)
    module.load_generator_state_dict(torch.load(ctx.path(FINAL_WEIGHTS), map_location="cpu"))
    return module


def _resume_path(checkpoint_dir: Path) -> str | None:
    last = checkpoint_dir / "last.ckpt"
    if last.exists():
        log.info("resuming from %s", last)
        return str(last)
    return None


def _fit(trainer: Trainer, module: DiffusionModule, resume: str | None, **data: Any) -> None:
    """``trainer.fit`` from the checkpoint ``resume``, leaving the final weights in ``module``."""
    saved = torch.load(resume, map_location="cpu", weights_only=False, mmap=True) if resume is not None else None
    finished = saved is not None and saved["global_step"] >= trainer.max_steps
    trainer.fit(module, ckpt_path=resume, **data)
    if finished:
        # Lightning restored the checkpoint (weights, optimizer, ledger) and skipped training, and
        # with it WeightAveraging's on_train_end that puts the average in the module: the
        # checkpoint's state_dict is that average (the trained weights where there is no EMA;
        # a checkpoint saved at on_train_end, after that copy, holds the average in both).
        module.load_state_dict(saved["state_dict"])


def _save_final(ctx: RunContext, module: DiffusionModule) -> None:
    save_torch(ctx.path(FINAL_WEIGHTS), module.generator_state_dict())


# -- public pretraining --------------------------------------------------------------------
def relabel_public(ctx: RunContext) -> TensorDataset:
    """Public images labelled in the sensitive label space where class names agree (digit
    glyph '3' -> MNIST class 3); other public classes get the null (unconditional) label."""
    public = build_public_dataset(ctx.cfg.public)
    sensitive_names = [str(n) for n in ctx.train_set.info.class_names]
    null = ctx.cfg.data.num_classes
    mapping = torch.tensor([sensitive_names.index(str(n)) if str(n) in sensitive_names else null
                            for n in public.info.class_names])
    return TensorDataset(public.images, mapping[public.labels])


def hashed_cache_path(cfg: DictConfig, prefix: str, key: dict) -> Path:
    """``<cache_dir>/pretrained/<prefix>-<hash of key>.pt``: public pretraining depends on no
    sensitive data, so it is keyed by everything that determines its weights and reused."""
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return Path(cfg.paths.cache_dir) / "pretrained" / f"{prefix}-{digest}.pt"


def public_config_key(cfg: DictConfig) -> dict:
    """The public set's generating config (where it is cached does not change it)."""
    public = OmegaConf.to_container(cfg.public, resolve=True)
    public.pop("cache_dir", None)
    return public


def pretrain_cache_path(cfg: DictConfig, selection: list[list[str]] | None = None) -> Path:
    """Where ``pretrain_public`` caches the pixel UNet it trains on the public set; with a
    ``selection`` (public class names per sensitive class), the UNet trained on that subset."""
    key = {
        "public": public_config_key(cfg),
        "model": OmegaConf.to_container(cfg.model, resolve=True),
        "diffusion": OmegaConf.to_container(cfg.diffusion, resolve=True),
        "pretrain": OmegaConf.to_container(cfg.method.pretrain_public, resolve=True),
        "label_dropout": cfg.method.label_dropout,
        # The public labels are mapped onto the sensitive classes by name (relabel_public):
        # MNIST and FashionMNIST both have 10 classes, but not the same glyphs in them.
        "classes": list(describe_data(cfg.data).class_names),
        "seed": cfg.seed,
    }
    if selection is not None:
        key["selection"] = selection
    return hashed_cache_path(cfg, f"unet-{cfg.model.name}", key)


def pretrain_public(ctx: RunContext) -> None:
    cfg = ctx.cfg
    if cfg.method.get("pretrain", "none") != "public":
        log.info("pretrain_public: method.pretrain=%s, nothing to do", cfg.method.get("pretrain"))
        return
    cache = pretrain_cache_path(cfg)
    build_once(cache, "pretrain_public", "public pretraining",
               lambda: pretrain_unet(ctx, "pretrain_public", relabel_public(ctx), cache))


def pretrain_unet(ctx: RunContext, stage: str, data: Dataset, cache: Path) -> None:
    """Non-private training of the method's UNet on public ``data`` (labels in the sensitive
    label space) as ``method.pretrain_public`` says; the weights go to ``cache``. Callers go through
    ``build_once(cache, ...)`` so that concurrent jobs of a sweep train it once."""
    cfg = ctx.cfg
    p = cfg.method.pretrain_public
    module = build_module(cfg)
    module.lr = p.lr
    # Multiplicity reduces the variance of *clipped, noised* gradients; without privacy it is
    # just a larger batch, so public pretraining uses K=1 and spends its compute on steps.
    module.multiplicity = 1
    trainer = build_trainer(ctx, stage, p.steps, ema_callbacks(p.get("ema_decay")))
    trainer.fit(module, shuffled_loader(data, p.batch_size, cfg.seed))
    save_torch(cache, module.unet.state_dict())
    log.info("%s: cached %s", stage, cache)


def init_from_pretraining(ctx: RunContext, module: DiffusionModule) -> None:
    """Load the run's non-private pretraining, if the method has one: the public set's
    (``method.pretrain=public``) or PrivImage's selected subset (``method.pretrain=selection``)."""
    source = ctx.cfg.method.get("pretrain", "none")
    if source == "public":
        weights = pretrain_cache_path(ctx.cfg)
    elif source == "selection":
        # PrivImage: the stages that select and pretrain build on this module.
        from dpgen.stages.semantic import selected_pretraining_path

        weights = selected_pretraining_path(ctx)
    else:
        return
    module.unet.load_state_dict(torch.load(weights, map_location="cpu"))


def _init_weights(ctx: RunContext, module: DiffusionModule) -> None:
    """Training starts from the run's warm-up when the method has one (the warm-up itself
    started from the public pretraining), else from the public pretraining if configured."""
    if "warmup" in ctx.cfg.method.stages:
        module.load_generator_state_dict(torch.load(ctx.path(WARMUP_WEIGHTS), map_location="cpu"))
    else:
        init_from_pretraining(ctx, module)


# -- non-private training on the sensitive data ---------------------------------------------
def train(ctx: RunContext) -> None:
    cfg = ctx.cfg
    module = build_module(cfg)
    _init_weights(ctx, module)
    ckpt_dir = ctx.path("checkpoints")
    trainer = build_trainer(ctx, "train", cfg.method.train.steps, ema_callbacks(cfg.method.get("ema_decay")), checkpoint_dir=ckpt_dir)
    _fit(trainer, module, _resume_path(ckpt_dir),
         train_dataloaders=shuffled_loader(ctx.train_set, cfg.method.train.batch_size, cfg.seed))
    _save_final(ctx, module)


# -- DP-SGD training --------------------------------------------------------------------------
def dp_strategy(ctx: RunContext, stage: str = "dp_train") -> DPSGDStrategy | DDPDPSGDStrategy:
    cfg, ledger = ctx.cfg, ctx.ledger
    assert ledger is not None, "dp_train needs a privacy plan"
    event = next(e for e in ledger.planned if e.stage == stage)
    dp = DPSGDConfig(noise_multiplier=event.noise_multiplier, max_grad_norm=cfg.privacy.clip,
                     sample_rate=event.sample_rate, dataset_size=ledger.dataset_size,
                     max_physical_batch=cfg.privacy.max_physical_batch, clipping=cfg.privacy.clipping,
                     stage=stage, log_train_loss=cfg.privacy.log_train_loss)
    if dp.log_train_loss:
        log.warning("%s: privacy.log_train_loss=true logs each sensitive batch's loss without noise; the logs "
                    "(and a W&B run) are outside the DP guarantee", stage)
    journal = ctx.path(JOURNAL)
    if is_ddp(cfg.trainer):
        return DDPDPSGDStrategy(dp, ledger=ledger, spend_journal=journal, **ddp_strategy_kwargs(cfg.trainer))
    # Lightning's CUDA set-up needs a device index; "cuda" alone fails there.
    device = torch.device("cuda", 0) if cfg.trainer.accelerator == "gpu" else torch.device("cpu")
    return DPSGDStrategy(dp, ledger=ledger, device=device, spend_journal=journal)


def fit_dp(ctx: RunContext, module: DiffusionModule, dataset: Dataset, stage: str) -> None:
    """DP-SGD on ``dataset`` (the sensitive training split, or a public function of each of
    its examples) for ``method.train.steps`` logical steps, as planned for ``stage``; resumes
    from the last checkpoint; writes the final weights."""
    cfg = ctx.cfg
    if len(dataset) != ctx.ledger.dataset_size:  # q = B/N and the q·N normaliser assume this N
        raise ValueError(f"{stage}: {len(dataset)} training examples, but the privacy plan was made for "
                         f"N={ctx.ledger.dataset_size}")
    strategy = dp_strategy(ctx, stage)
    remaining = ctx.ledger.remaining_steps(stage)
    ckpt_dir = ctx.path("checkpoints")
    resume = _resume_path(ckpt_dir)
    if resume is not None:
        _check_checkpoint_trains_the_same_parameters(resume, module, stage)
    spent = ctx.ledger.steps_spent(stage)
    if resume is None and spent:
        # An attempt spent budget but left no checkpoint: its steps are gone from the model and
        # stay spent, so the weights start again with only what the plan has left.
        if not remaining:
            raise RuntimeError(f"{stage}: every planned step was spent by an interrupted attempt that left no "
                               "checkpoint; the budget is gone. Fix: start a new run directory (and lower "
                               "trainer.checkpoint_every_n_steps)")
        log.warning("%s: %d of %d steps were spent by an interrupted attempt that left no checkpoint; the "
                    "model starts again with the remaining %d (trainer.checkpoint_every_n_steps sets how "
                    "many a crash can lose)", stage, spent, spent + remaining, remaining)
    accountant = PrivacyAccountantCallback(ctx.ledger, stage, ctx.privacy_json, cfg.privacy.log_every_n_steps,
                                           output_every_n_steps=cfg.logger.sample_every_n_steps)
    trainer = build_trainer(ctx, stage, cfg.method.train.steps, [accountant, *ema_callbacks(cfg.method.get("ema_decay"))],
                       strategy=strategy, checkpoint_dir=ckpt_dir)
    data = PoissonDataModule(dataset, strategy.dp_config.sample_rate, steps=max(remaining, 1))
    if is_ddp(cfg.trainer) and torch.cuda.is_available():
        # Spawned rank 0 trains on GPU 0, beside this process's cache from the earlier stages.
        torch.cuda.empty_cache()
    _fit(trainer, module, resume, datamodule=data)
    if is_rank_zero():  # under DDP spawn this process is rank 0 and holds rank 0's results
        ctx.ledger.write(ctx.privacy_json)
        _save_final(ctx, module)


def _check_checkpoint_trains_the_same_parameters(path: str, module: DiffusionModule, stage: str) -> None:
    """Refuse, before any step, a checkpoint whose optimizer trained another parameter set (a run
    started by a dpgen whose trainable set differed, e.g. DP-LDM's in older dpgen versions)."""
    checkpoint = torch.load(path, map_location="cpu", weights_only=False, mmap=True)  # Lightning reads it again
    saved = sum(len(group["params"]) for state in checkpoint.get("optimizer_states", [])
                for group in state["param_groups"])
    now = len(module.trainable_parameters())
    if saved and saved != now:
        raise ValueError(f"{stage}: checkpoint {path} trained {saved} parameter tensors, this dpgen trains {now}. "
                         "Fix: finish the run with the dpgen version that started it, or start a new run")


def dp_train(ctx: RunContext) -> None:
    module = build_module(ctx.cfg)
    _init_weights(ctx, module)
    fit_dp(ctx, module, ctx.train_set, "dp_train")
