"""CPSample's extra stage: train the protection classifier on the sensitive training split.

The classifier reads the sensitive images without clipping or noise: the run's outputs lose any
formal DP guarantee (the privacy plan already marked privacy.json so). The classifier file stays
in the run directory for the sample stage; it memorises the training images and is no part of a
released output.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from omegaconf import DictConfig, OmegaConf

from dpgen.data.dataset import stack_items
from dpgen.diffusion.sampling import make_train_scheduler
from dpgen.io import save_torch
from dpgen.models.protection import ProtectionClassifier
from dpgen.privacy.guarantee import CPSAMPLE_NO_GUARANTEE
from dpgen.sampling.guidance import ProtectionGuidance
from dpgen.sampling.protection import ProtectionSettings, train_protection_classifier

if TYPE_CHECKING:
    from dpgen.pipeline import RunContext

log = logging.getLogger("dpgen")

CLASSIFIER_FILE = "protection_classifier.pt"


def _alphas_cumprod(cfg: DictConfig) -> torch.Tensor:
    return make_train_scheduler(OmegaConf.to_container(cfg.diffusion, resolve=True)).alphas_cumprod


def train_protection_classifier_stage(ctx: RunContext) -> None:
    log.warning(CPSAMPLE_NO_GUARANTEE)
    settings = ProtectionSettings.from_config(ctx.cfg.sampling.classifier)
    images, _ = stack_items(ctx.train_set)  # CPSample's random bits replace the labels
    classifier, info = train_protection_classifier(images, _alphas_cumprod(ctx.cfg), settings, ctx.cfg.seed)
    save_torch(ctx.path(CLASSIFIER_FILE), {"state_dict": classifier.state_dict(), "channels": images.shape[1],
                                           "width": settings.width, "info": info})
    log.info("train_protection_classifier: %d steps, accuracy on the random labels %.3f -> %s",
             info["steps"], info["train_accuracy_low_noise"], ctx.path(CLASSIFIER_FILE))


def load_protection_guidance(run_dir: Path, cfg: DictConfig, device: torch.device | str) -> ProtectionGuidance | None:
    """The run's CPSample guidance, or None where the run samples plainly (``sampling=default``,
    or a run made before the ``sampling`` group existed). Every sampler of a finished run (the
    sample stage, the utility study, ``python -m dpgen.release``) samples through this."""
    s = cfg.get("sampling")
    if s is None or s.name != "cpsample":
        return None
    saved = torch.load(run_dir / CLASSIFIER_FILE, map_location="cpu", weights_only=True)
    classifier = ProtectionClassifier(saved["channels"], saved["width"])
    classifier.load_state_dict(saved["state_dict"])
    return ProtectionGuidance(classifier.to(device), _alphas_cumprod(cfg), s.threshold, s.scale)


def protection_summary(ctx: RunContext, guidance: ProtectionGuidance) -> dict:
    """What metrics.json records about the protection (written by the sample stage)."""
    saved = torch.load(ctx.path(CLASSIFIER_FILE), map_location="cpu", weights_only=True)
    s = ctx.cfg.sampling
    return {"threshold": s.threshold, "scale": s.scale, "guided_fraction": guidance.guided_fraction,
            "classifier": saved["info"]}
