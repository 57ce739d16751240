"""GlyphNet: the offline default feature extractor for FID, KID, IS and precision/recall.

Inception-v3 weights cannot be downloaded here, so the default features come from a small
CNN trained on the *public* glyph set only (never on sensitive data), once per config, cached
under ``eval.cache_dir`` by a hash of that config. It is registered with torch-fidelity as its
own extractor (:data:`NAME`), so every metric is computed by torch-fidelity's code; numbers are
comparable only between runs that name the same extractor and weights.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch_fidelity import register_feature_extractor
from torch_fidelity.feature_extractor_base import FeatureExtractorBase
from torch_fidelity.helpers import vassert
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY
from torchvision.transforms.v2 import functional as TF

from dpgen.data import build_public_dataset
from dpgen.data.cache import config_key
from dpgen.data.transforms import model_to_uint8, resize_square
from dpgen.io import build_once, save_torch

log = logging.getLogger("dpgen")

# Bump when the architecture, preprocessing or training changes: old cache entries then miss.
NAME = "glyphnet-v1"


class GlyphNet(nn.Module):
    """uint8 images of any size and channel count -> (features, class logits).

    Images are converted to grey and resized to ``image_size``: the extractor sees every
    dataset as it saw the glyphs, so real and synthetic sets are treated identically.
    """

    def __init__(self, num_classes: int, image_size: int, width: int = 16, feature_dim: int = 128) -> None:
        super().__init__()
        self.image_size = image_size
        self.body = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1), nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(2 * width, 4 * width, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(4),
            nn.Flatten(), nn.Dropout(0.2), nn.Linear(4 * width * 16, feature_dim), nn.ReLU(),
        )
        self.head = nn.Linear(feature_dim, num_classes)
        # Features are multiplied by this so that public glyphs have unit mean square per
        # dimension: KID's polynomial kernel assumes features of order one, as Inception's are.
        self.register_buffer("feature_scale", torch.ones(()))

    def preprocess(self, images: Tensor) -> Tensor:
        x = images.float() / 255.0
        if x.shape[1] == 3:
            x = TF.rgb_to_grayscale(x)
        return resize_square(x, self.image_size) * 2 - 1

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        features = self.body(self.preprocess(images))
        return features * self.feature_scale, self.head(features)


class GlyphNetExtractor(FeatureExtractorBase):
    """torch-fidelity's view of a trained :class:`GlyphNet` (weights via ``feature_extractor_weights_path``)."""

    def __init__(self, name: str, features_list: list[str], feature_extractor_weights_path: str | None = None,
                 **kwargs: Any) -> None:
        super().__init__(name, features_list)
        vassert(feature_extractor_weights_path is not None, f"{NAME} needs feature_extractor_weights_path")
        saved = torch.load(feature_extractor_weights_path, map_location="cpu", weights_only=True)
        self.net = GlyphNet(**saved["architecture"])
        self.net.load_state_dict(saved["state_dict"])
        self.requires_grad_(False)
        self.eval()

    @staticmethod
    def get_provided_features_list() -> tuple[str, ...]:
        return ("features", "logits")

    @staticmethod
    def get_default_feature_layer_for_metric(metric: str) -> str:
        return {"isc": "logits", "fid": "features", "kid": "features", "prc": "features"}[metric]

    @staticmethod
    def can_be_compiled() -> bool:
        return False

    @staticmethod
    def get_dummy_input_for_compile() -> Tensor:
        return torch.zeros(1, 3, 16, 16, dtype=torch.uint8)

    def forward(self, x: Tensor) -> tuple[Tensor, ...]:
        vassert(x.dtype == torch.uint8 and x.dim() == 4 and x.shape[1] == 3, "expecting uint8 [B, 3, H, W]")
        features, logits = self.net(x)
        out = {"features": features, "logits": logits}
        return tuple(out[name] for name in self.features_list)


if NAME not in FEATURE_EXTRACTORS_REGISTRY:
    register_feature_extractor(NAME, GlyphNetExtractor)


def train_glyphnet(glyphs_cfg: Mapping[str, Any], train_cfg: Mapping[str, Any]) -> dict[str, Any]:
    """Train on the public glyphs; returns what :class:`GlyphNetExtractor` loads. The seed is the
    extractor's own (``train_cfg.seed``), never the run's: runs compare only under one extractor."""
    seed = train_cfg.get("seed", 0)
    data = build_public_dataset(glyphs_cfg)
    images, labels = model_to_uint8(data.images), data.labels
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(labels), generator=g)
    n_val = max(1, len(perm) // 10)
    val, tr = perm[:n_val], perm[n_val:]
    torch.manual_seed(seed)
    architecture = {"num_classes": data.info.num_classes, "image_size": glyphs_cfg["image_size"],
                    "width": train_cfg["width"], "feature_dim": train_cfg["feature_dim"]}
    net = GlyphNet(**architecture)
    opt = torch.optim.Adam(net.parameters(), lr=train_cfg["lr"])
    batch = train_cfg["batch_size"]
    for _ in range(train_cfg["epochs"]):
        net.train()
        for idx in tr[torch.randperm(len(tr), generator=g)].split(batch):
            opt.zero_grad()
            nn.functional.cross_entropy(net(images[idx])[1], labels[idx]).backward()
            opt.step()
    net.eval()
    with torch.no_grad():
        features, logits = (torch.cat(t) for t in zip(*(net(x) for x in images.split(1024))))
        net.feature_scale.fill_(features.pow(2).mean().rsqrt().item())
        val_acc = (logits[val].argmax(1) == labels[val]).float().mean().item()
    return {"architecture": architecture, "state_dict": net.state_dict(),
            "info": {"name": NAME, "trained_on": f"public glyphs ({glyphs_cfg['charset']}, "
                     f"{len(tr)} images, {glyphs_cfg['image_size']}px)",
                     "glyph_val_accuracy": val_acc, "classes": list(data.info.class_names)}}


def _train_and_save(glyphs_cfg: Mapping[str, Any], train_cfg: Mapping[str, Any], path: Path) -> None:
    log.info("evaluate: training the %s feature extractor on public glyphs (once; cached at %s)", NAME, path)
    start = time.time()
    saved = train_glyphnet(glyphs_cfg, train_cfg)
    save_torch(path, saved)
    log.info("evaluate: %s trained in %.1f s, %.1f%% on held-out glyphs", NAME, time.time() - start,
             100 * saved["info"]["glyph_val_accuracy"])


def glyphnet_weights(glyphs_cfg: Mapping[str, Any], train_cfg: Mapping[str, Any], cache_dir: str | Path) -> Path:
    """The cached weights file for this config, trained first when missing (public data only)."""
    glyphs = {k: v for k, v in glyphs_cfg.items() if k != "cache_dir"}
    key = config_key({"name": NAME, "glyphs": glyphs, "train": {"seed": 0, **train_cfg}})
    path = Path(cache_dir) / f"{NAME}-{key}.pt"
    build_once(path, "evaluate", f"{NAME} feature extractor", lambda: _train_and_save(glyphs_cfg, train_cfg, path))
    return path
