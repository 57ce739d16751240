"""The replication and membership-inference audits (dpgen/eval/audit.py) on inputs whose answer is known."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image
from torch.utils.data import TensorDataset

import dpgen.eval.audit as audit
from dpgen.data import build_dataset
from dpgen.errors import ConfigError
from dpgen.eval.fidelity import FeatureExtractor

EXTRACTOR = FeatureExtractor("pixels", Path("none"), "", "raw pixels (test stand-in)")


def _pixel_features(extractor, images, batch_size=256, cuda=False):
    """Features = the uint8 pixels themselves: a copy has cosine 1 with its original."""
    return torch.stack([images[i].flatten().double() for i in range(len(images))])


def _uint8(x: torch.Tensor) -> torch.Tensor:
    return ((x + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)


def test_replication_counts_copies_and_draws_them_first(monkeypatch, tmp_path):
    monkeypatch.setattr(audit, "extract_features", _pixel_features)
    g = torch.Generator().manual_seed(0)
    train_x = torch.rand(50, 1, 8, 8, generator=g) * 2 - 1
    train = TensorDataset(train_x, torch.zeros(50, dtype=torch.long))
    held_out = TensorDataset(torch.rand(30, 1, 8, 8, generator=g) * 2 - 1, torch.zeros(30, dtype=torch.long))
    copies = _uint8(train_x[[3, 7, 11, 19]])
    fresh = _uint8(torch.rand(12, 1, 8, 8, generator=g) * 2 - 1)
    grid = tmp_path / "pairs.png"
    out = audit.replication(torch.cat([fresh, copies]), train, held_out, EXTRACTOR, threshold=0.95, pairs=4,
                            grid_path=grid)
    assert out["replication_rate"] == pytest.approx(4 / 16)
    assert out["replication_rate_heldout_reference"] == 0.0  # independent images are not copies
    assert out["replication_similarity_quantiles"]["q99"] > 0.99 > out["replication_similarity_quantiles"]["q50"]
    # the grid holds the 4 most similar pairs (the copies), each beside its nearest training image
    with Image.open(grid) as im:
        width, height = im.size
    assert (width, height) == (8 * (8 + 1) + 1, 8 + 2)  # 2 x 4 tiles of 8 px, 1 px padding, one row


class _FakeDiffusion(torch.nn.Module):
    """A 'model' whose denoising error is small exactly on the images it memorised."""

    def __init__(self, memorised: torch.Tensor) -> None:
        super().__init__()
        self.memorised = memorised
        self.anchor = torch.nn.Parameter(torch.zeros(1))

    def diffusion_inputs(self, images: torch.Tensor) -> torch.Tensor:
        return images

    def denoising_error(self, x, y, t, noise) -> torch.Tensor:
        distance = torch.cdist(x.flatten(1), self.memorised.flatten(1)).min(1).values
        return distance + 0.01 * noise.flatten(1).mean(1).abs()


def test_membership_inference_separates_memorised_members():
    g = torch.Generator().manual_seed(1)
    members = TensorDataset(torch.rand(40, 1, 4, 4, generator=g), torch.zeros(40, dtype=torch.long))
    non_members = TensorDataset(torch.rand(40, 1, 4, 4, generator=g), torch.zeros(40, dtype=torch.long))
    settings = audit.LossScoreSettings(timesteps=(10, 100), noise_draws=2, batch_size=16)
    leaky = audit.membership_inference(_FakeDiffusion(members.tensors[0]), members, non_members, settings,
                                       max_examples=30)
    assert leaky["mia_auc"] == 1.0 and leaky["mia_tpr_at_fpr_1pct"] == 1.0
    assert leaky["mia_members"] == leaky["mia_non_members"] == 30
    # a model that memorised neither split: the attack is a coin flip
    blind = audit.membership_inference(_FakeDiffusion(torch.rand(40, 1, 4, 4, generator=g)), members, non_members,
                                       settings, max_examples=30)
    assert abs(blind["mia_auc"] - 0.5) < 0.2 and blind["mia_tpr_at_fpr_1pct"] < 0.5


def test_train_limit_draws_a_fixed_small_training_split_and_leaves_the_test_split(tiny_cfg):
    small = tiny_cfg("data.train_limit=100").data
    a, b = build_dataset(small, "train"), build_dataset(small, "train")
    assert len(a) == 100 and torch.equal(a.images, b.images) and a.info == b.info
    assert len(build_dataset(small, "test")) == len(build_dataset(tiny_cfg().data, "test"))
    with pytest.raises(ConfigError, match=r"^data.train_limit"):
        build_dataset(tiny_cfg("data.train_limit=0").data, "train")
