"""``data=mnist`` and ``data=fashion_mnist`` from a local torchvision-style root.

torchvision's readers only check that the unpacked idx files exist (no checksums), so we use
them as they are: ``<root>/MNIST/raw/train-images-idx3-ubyte`` and so on.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torchvision.datasets import MNIST, FashionMNIST

from dpgen.data.dataset import DatasetInfo, TensorImageDataset
from dpgen.data.registry import DataSpec
from dpgen.data.roots import require_files, require_root
from dpgen.data.transforms import uint8_to_model

IDX_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)


def _spec(
    name: str, title: str, reader: type[MNIST], class_names: tuple[str, ...], source: str
) -> DataSpec:
    folder = reader.__name__  # torchvision reads from <root>/<class name>/raw
    fix = f"download the four {title} .gz files from {source} and gunzip them into <root>/{folder}/raw"

    def raw_dir(cfg: dict[str, Any]) -> Path:
        return Path(str(cfg["root"])).expanduser() / folder / "raw"

    def check(cfg: dict[str, Any]) -> None:
        root = require_root(cfg, title, fix)
        raw = raw_dir(cfg)
        expected = f"{raw}/" + ", ".join(IDX_FILES)
        require_files(
            root, title, [raw / f for f in IDX_FILES], expected, fix.replace("<root>", str(root))
        )

    def build(cfg: dict[str, Any], split: str) -> TensorImageDataset:
        ds = reader(
            str(Path(str(cfg["root"])).expanduser()), train=split == "train", download=False
        )
        info = DatasetInfo(name, 10, class_names, cfg["channels"], cfg["image_size"])
        images = uint8_to_model(ds.data[:, None], info.image_size, info.channels)
        return TensorImageDataset(images, ds.targets.to(torch.long), info)

    return DataSpec(name, check, lambda cfg: class_names, build)


MNIST_SPEC = _spec(
    "mnist", "MNIST", MNIST, tuple(str(d) for d in range(10)), "yann.lecun.com/exdb/mnist"
)
FASHION_SPEC = _spec(
    "fashion_mnist",
    "Fashion-MNIST",
    FashionMNIST,
    tuple(FashionMNIST.classes),
    "github.com/zalandoresearch/fashion-mnist",
)
