"""DP-FETA's easy stages: DP central images of the sensitive data, then a warm-up on them.

``dp_central_images`` is the only one that reads sensitive data: each of its rounds is a
Poisson-subsampled Gaussian mechanism (``dpgen/privacy/class_means.py``), charged to the ledger
before its noise is drawn. ``warmup`` sees only the released central images, so it is
post-processing and costs nothing; ``dp_train`` then starts from its weights.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Subset

from dpgen.data.curriculum import CurriculumBatches, Phase, random_affine
from dpgen.diffusion.config import run_solver
from dpgen.io import save_torch
from dpgen.loggers.grids import save_grid
from dpgen.privacy.class_means import CentralImageQuery, nominal_class_counts
from dpgen.privacy.events import POISSON_GAUSSIAN
from dpgen.privacy.poisson import PoissonBatchSampler
from dpgen.stages.trainer import build_trainer, ema_callbacks
from dpgen.stages.training import (
    WARMUP_WEIGHTS,
    build_module,
    init_from_pretraining,
)

if TYPE_CHECKING:
    from dpgen.pipeline import RunContext

log = logging.getLogger("dpgen")

STAGE = "dp_central_images"
CENTRAL_IMAGES = "central_images.pt"
CENTRAL_GRID = "central_images.png"
RELEASED_ROUNDS = "central_images.partial.pt"  # the rounds released so far, until central_images.pt
WARMUP_GRID = "warmup_samples.png"
_PREVIEW_PER_CLASS = 8
_CHUNK = 4096  # examples per forward through the query's preprocessing; memory only


def _subsample_sums(query: CentralImageQuery, dataset: torch.utils.data.Dataset, idx: list[int]) -> torch.Tensor:
    sums = torch.zeros((query.num_classes, query.channels, query.resolution, query.resolution), dtype=torch.float64)
    for images, labels in DataLoader(Subset(dataset, idx), batch_size=_CHUNK):
        sums += query.class_sums(images, labels)
    return sums


def _released_rounds(ctx: RunContext) -> list[torch.Tensor]:
    """The rounds an interrupted attempt released (each charged before its noise was drawn)."""
    path = ctx.path(RELEASED_ROUNDS)
    return list(torch.load(path, map_location="cpu")["means"]) if path.exists() else []


def _save_central_images(ctx: RunContext, means: list[torch.Tensor], release: dict) -> None:
    # Post-processing of the release: clamp to the pixel range, back to the model's [-1, 1].
    images = torch.cat(means).clamp(0.0, 1.0) * 2.0 - 1.0
    labels = torch.arange(ctx.cfg.data.num_classes).repeat(len(means))
    save_torch(ctx.path(CENTRAL_IMAGES), {"images": images, "labels": labels, **release})
    _save_central_grid(ctx)
    ctx.path(RELEASED_ROUNDS).unlink(missing_ok=True)  # now inside central_images.pt


def _save_central_grid(ctx: RunContext) -> None:
    """Nearest upsampling shows exactly what was released, one column per round."""
    central = torch.load(ctx.path(CENTRAL_IMAGES), map_location="cpu")
    images, labels, num_classes = central["images"], central["labels"], ctx.cfg.data.num_classes
    scale = max(1, 64 // images.shape[-1])
    save_grid(ctx.path(CENTRAL_GRID), F.interpolate(images, scale_factor=scale, mode="nearest"), labels,
              num_classes, per_row=len(labels) // num_classes)


def dp_central_images(ctx: RunContext) -> None:
    cfg, ledger = ctx.cfg, ctx.ledger
    assert ledger is not None, "dp_central_images needs a privacy plan"
    c, data = cfg.method.central, cfg.data
    rounds = ledger.remaining_steps(STAGE)
    if rounds == 0 and ctx.path(CENTRAL_IMAGES).exists():
        log.info("dp_central_images: all rounds spent, reusing %s", ctx.path(CENTRAL_IMAGES))
        if not ctx.path(CENTRAL_GRID).exists():  # killed between the two writes
            _save_central_grid(ctx)
        ctx.path(RELEASED_ROUNDS).unlink(missing_ok=True)
        return
    # Each round is kept on disk as soon as it is released: it was charged before its noise was
    # drawn, so a resume keeps it instead of losing what it cost.
    means = _released_rounds(ctx)
    lost = c.rounds - rounds - len(means)
    if lost < 0:  # privacy.json replaced by an older copy, say: releasing them would exceed the charge
        raise RuntimeError(f"{STAGE}: {ctx.path(RELEASED_ROUNDS)} holds {len(means)} released rounds but "
                           f"{ctx.privacy_json} charges only {c.rounds - rounds}. Fix: restore the run's own "
                           "privacy.json, or start a new run directory")
    if lost:
        log.warning("dp_central_images: %d of %d rounds were charged by an interrupted attempt and not kept "
                    "(killed before the round was saved); their budget is spent and they are lost",
                    lost, c.rounds)
    if means:
        log.info("dp_central_images: keeping %d rounds an interrupted attempt released", len(means))
    if rounds == 0 and not means:
        raise RuntimeError(f"{STAGE}: the ledger shows every round spent but {CENTRAL_IMAGES} is missing; "
                           "the budget is gone. Fix: start a new run directory")
    sigma = ledger.planned_noise_multiplier(STAGE)
    query = CentralImageQuery(num_classes=data.num_classes, channels=data.channels, resolution=c.resolution,
                              noise_multiplier=sigma, clip_norm=c.clip_norm)
    proportions = c.class_proportions if c.class_proportions is not None else [1.0] * data.num_classes
    nominal = nominal_class_counts(ledger.dataset_size, c.sample_rate, proportions)
    log.info("dp_central_images: %d rounds, q=%.3g, sigma=%.4g, L2 sensitivity %.4g, nominal count %.4g per class",
             rounds, c.sample_rate, sigma, query.sensitivity, float(nominal.mean()))

    for idx in PoissonBatchSampler(len(ctx.train_set), c.sample_rate, rounds):
        ledger.record(STAGE, POISSON_GAUSSIAN, sigma, c.sample_rate)  # refuses beyond the plan
        ledger.write(ctx.privacy_json)
        means.append(query.release(_subsample_sums(query, ctx.train_set, idx), nominal))
        save_torch(ctx.path(RELEASED_ROUNDS), {"means": torch.stack(means)})
    _save_central_images(ctx, means, {"noise_multiplier": sigma, "sensitivity": query.sensitivity,
                                      "nominal_counts": nominal, "sample_rate": c.sample_rate})


def warmup(ctx: RunContext) -> None:
    """Non-private training on the central images only, blurred first, then sharper."""
    cfg = ctx.cfg
    w = cfg.method.warmup
    central = torch.load(ctx.path(CENTRAL_IMAGES), map_location="cpu")
    size = cfg.data.image_size
    images = F.interpolate(central["images"], size=(size, size), mode="bilinear", align_corners=False)
    phases = [Phase(steps=p.steps, blur=float(p.get("blur", 0.0))) for p in w.curriculum]
    a = w.augment
    batches = CurriculumBatches(images, central["labels"], phases, w.batch_size,
                                random_affine(a.degrees, a.translate, a.scale, a.shear), seed=cfg.seed)
    module = build_module(cfg)
    init_from_pretraining(ctx, module)
    module.lr = w.lr
    module.multiplicity = 1  # no clipping or noise here: K copies would only be a larger batch
    trainer = build_trainer(ctx, "warmup", len(batches), ema_callbacks(w.get("ema_decay")))
    trainer.fit(module, DataLoader(batches, batch_size=None))
    save_torch(ctx.path(WARMUP_WEIGHTS), module.generator_state_dict())
    # What the warm-up taught, before any DP-SGD step: a small grid, no privacy cost.
    labels = torch.arange(cfg.data.num_classes).repeat_interleave(_PREVIEW_PER_CLASS)
    with torch.no_grad():
        preview = module.sample(labels, cfg.sample.steps, cfg.sample.guidance_scale,
                                generator=torch.Generator().manual_seed(cfg.seed), progress=False,
                                solver=run_solver(cfg.sample))
    save_grid(ctx.path(WARMUP_GRID), preview, labels, cfg.data.num_classes, per_row=_PREVIEW_PER_CLASS)
    log.info("warmup: %d steps on %d central images, phases %s", len(batches), len(images),
             [(p.steps, p.blur) for p in phases])
