"""What each ``data.name`` needs: its checks, its class names, and how to build a split."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch.utils.data import Dataset


@dataclass(frozen=True)
class DataSpec:
    name: str
    # Dataset-specific keys and files; raises ConfigError. Never reads images.
    check: Callable[[dict[str, Any]], None]
    # Class names in label order, known without reading images (after `check` passed).
    class_names: Callable[[dict[str, Any]], tuple[str, ...]]
    # Builds one split ("train" or "test") of a checked config.
    build: Callable[[dict[str, Any], str], Dataset]


# Each data.name's module and spec. A spec is imported when its name is asked for: importing
# dpgen.data stays cheap and free of cycles, and validating the default (mnist5k) does not import
# torchvision's datasets for the others (seconds before a refusal).
_SPECS = {
    "mnist5k": ("mnist5k", "SPEC"),
    "mnist": ("mnist", "MNIST_SPEC"),
    "fashion_mnist": ("mnist", "FASHION_SPEC"),
    "cifar10": ("cifar10", "SPEC"),
    "celeba": ("celeba", "SPEC"),
    "imagefolder": ("imagefolder", "SPEC"),
}
DATA_NAMES = tuple(_SPECS)


def data_spec(name: str) -> DataSpec:
    """The spec of ``data.name`` (one of :data:`DATA_NAMES`)."""
    module, attribute = _SPECS[name]
    return getattr(importlib.import_module(f"dpgen.data.{module}"), attribute)
