"""Evaluate the samples: downstream accuracy on the held-out real split -> ``metrics.json``."""

from __future__ import annotations

import json
import logging
from typing import TYPE_CHECKING

import numpy as np
import torch

from dpgen.eval.downstream import downstream_accuracy
from dpgen.io import write_json
from dpgen.stages.sample import from_uint8_hwc
from dpgen.stages.training import build_module

if TYPE_CHECKING:
    from dpgen.pipeline import RunContext

log = logging.getLogger("dpgen")


def evaluate(ctx: RunContext) -> None:
    cfg = ctx.cfg
    with np.load(ctx.path("samples.npz")) as z:
        images, labels = from_uint8_hwc(z["images"]), torch.from_numpy(z["labels"])
    e = cfg.eval
    result = downstream_accuracy(
        images, labels, ctx.held_out_test_set(), cfg.data.num_classes, classifier=e.classifier,
        epochs=e.epochs, batch_size=e.batch_size, lr=e.lr, val_fraction=e.val_fraction, seed=cfg.seed,
    )
    module = build_module(cfg)
    trainable = [n for n in cfg.method.stages if n in ("train", "dp_train", "dp_finetune")]
    privacy = json.loads(ctx.privacy_json.read_text()) if ctx.privacy_json.exists() else {}
    metrics = {
        "method": cfg.method.name,
        "epsilon": privacy.get("epsilon_spent"),
        "delta": privacy.get("delta"),
        "formal_guarantee": privacy.get("formal_guarantee", False),
        "num_samples": int(len(images)),
        "downstream_accuracy": {e.classifier: result.accuracy, "mean": result.accuracy},
        "downstream_val_accuracy": {e.classifier: result.val_accuracy},
        "trainable_parameters": sum(p.numel() for p in module.unet.parameters() if p.requires_grad),
        "total_parameters": sum(p.numel() for p in module.unet.parameters()),
        "train_wall_s": sum(ctx.wall_s.get(n, 0.0) for n in trainable),
        "total_wall_s": sum(ctx.wall_s.values()),
    }
    write_json(ctx.path("metrics.json"), metrics)
    log.info("evaluate: downstream accuracy (%s, held-out real) = %.4f", e.classifier, result.accuracy)
