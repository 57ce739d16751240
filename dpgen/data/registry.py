"""What each ``data.name`` needs: its checks, its class names, and how to build a split."""

from __future__ import annotations

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


def registry() -> dict[str, DataSpec]:
    # Imported here so that importing dpgen.data stays cheap and free of cycles.
    from dpgen.data import celeba, cifar10, imagefolder, mnist, mnist5k

    specs = [
        mnist5k.SPEC,
        mnist.MNIST_SPEC,
        mnist.FASHION_SPEC,
        cifar10.SPEC,
        celeba.SPEC,
        imagefolder.SPEC,
    ]
    return {s.name: s for s in specs}
