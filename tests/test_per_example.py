"""Per-example gradients on the real diffusers UNet (conv, attention, GroupNorm, embeddings)
against an explicit loop over examples, with K copies folded in."""

from __future__ import annotations

import pytest
import torch

from dpgen.models.unet import build_unet
from dpgen.privacy.per_example import PerExampleGradients

TINY = {"name": "t", "block_out_channels": [8, 16], "down_block_types": ["DownBlock2D", "AttnDownBlock2D"],
        "up_block_types": ["AttnUpBlock2D", "UpBlock2D"], "layers_per_block": 1, "norm_num_groups": 4,
        "attention_head_dim": 8}


@pytest.mark.parametrize("k", [1, 3])
def test_unet_per_example_gradients_match_explicit_loop(k):
    torch.manual_seed(0)
    unet = build_unet(TINY, image_size=8, channels=1, num_classes=3)
    b = 4
    x = torch.randn(b * k, 1, 8, 8)
    t = torch.randint(0, 1000, (b * k,))
    y = torch.randint(0, 4, (b,)).repeat_interleave(k)
    target = torch.randn_like(x)

    def row_losses(sl):
        return (unet(x[sl], t[sl], class_labels=y[sl]).sample - target[sl]).pow(2).flatten(1).mean(1)

    engine = PerExampleGradients(unet)
    params = engine.params
    with engine.capture(b):
        torch.autograd.grad(row_losses(slice(None)).view(b, k).mean(1).sum(), params)
        per_example = [p.grad_sample.clone() for p in params]
    engine.remove()
    for i in range(b):
        ref = torch.autograd.grad(row_losses(slice(i * k, (i + 1) * k)).mean(), params)
        got = torch.cat([g[i].flatten() for g in per_example])
        want = torch.cat([r.flatten() for r in ref])
        assert (got - want).norm() <= 1e-4 * want.norm()
