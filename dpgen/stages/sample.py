"""Sample the trained generator: ``samples.npz`` and a ``samples.png`` grid (one row per class).

Sampling only post-processes the trained (DP) model, so it costs no privacy. With
``sampling=cpsample`` each step is corrected by the protection classifier (which did read the
sensitive data: see :mod:`dpgen.stages.protection`); ``protection.json`` records how often.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import numpy as np
import torch

from dpgen.data.transforms import model_to_uint8
from dpgen.diffusion.config import run_solver
from dpgen.distributed import sampling_device
from dpgen.io import atomic_write, write_json
from dpgen.loggers.grids import save_grid
from dpgen.privacy.guarantee import CPSAMPLE_NO_GUARANTEE
from dpgen.stages import PROTECTION_JSON
from dpgen.stages.protection import load_protection_guidance, protection_summary
from dpgen.stages.training import load_final_module

if TYPE_CHECKING:
    from dpgen.pipeline import RunContext

log = logging.getLogger("dpgen")


def to_uint8_hwc(images: torch.Tensor) -> np.ndarray:
    """[-1, 1] float [N, C, H, W] -> uint8 [N, H, W, C] (the samples.npz contract)."""
    return model_to_uint8(images).permute(0, 2, 3, 1).numpy()


def from_uint8_hwc(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1


def balanced_labels(num_samples: int, num_classes: int) -> torch.Tensor:
    """Class-balanced labels: the sensitive class proportions are private, so never used."""
    return torch.arange(num_samples) % num_classes


def sample(ctx: RunContext) -> None:
    cfg = ctx.cfg
    module = load_final_module(ctx).to(sampling_device(cfg.trainer))
    labels = balanced_labels(cfg.sample.num_samples, cfg.data.num_classes)
    generator = torch.Generator().manual_seed(cfg.seed)
    protection = load_protection_guidance(ctx.run_dir, cfg, next(module.parameters()).device)
    images = module.sample(labels, cfg.sample.steps, cfg.sample.guidance_scale, generator=generator,
                           batch_size=cfg.sample.batch_size, eps_correction=protection,
                           solver=run_solver(cfg.sample))
    if protection is not None:
        summary = {"note": CPSAMPLE_NO_GUARANTEE, **protection_summary(ctx, protection)}
        write_json(ctx.path(PROTECTION_JSON), summary)
        log.info("sample: CPSample guided %.1f %% of the (sample, step) pairs", 100 * summary["guided_fraction"])

    def write_npz(f):
        np.savez_compressed(f, images=to_uint8_hwc(images), labels=labels.numpy().astype(np.int64))

    atomic_write(ctx.path("samples.npz"), write_npz)
    save_grid(ctx.path("samples.png"), images, labels, cfg.data.num_classes)
    log.info("sample: %d images -> %s", len(images), ctx.path("samples.npz"))
