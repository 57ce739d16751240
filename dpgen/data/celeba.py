"""``data=celeba``: aligned CelebA faces labelled by one binary attribute (default ``Male``).

Expects the official files in torchvision's layout, ``<root>/celeba/`` (or ``<root>`` itself):
``img_align_celeba/*.jpg``, ``list_attr_celeba.txt`` and ``list_eval_partition.txt``.
Partition 0 is "train" and 2 is "test"; the validation partition (1) is not used.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

from dpgen.checks import require_int
from dpgen.data.dataset import DatasetInfo, FileImageDataset
from dpgen.data.registry import DataSpec
from dpgen.data.roots import require_files, require_root
from dpgen.data.transforms import pil_to_model
from dpgen.errors import ConfigError

FILES = ("img_align_celeba", "list_attr_celeba.txt", "list_eval_partition.txt")
PARTITION = {"train": "0", "test": "2"}
_FIX = "download img_align_celeba.zip, list_attr_celeba.txt and list_eval_partition.txt from the CelebA site and put them in {root}/celeba (unzip the images there)"


def base_dir(cfg: dict[str, Any]) -> Path:
    root = Path(str(cfg["root"])).expanduser()
    return root / "celeba" if (root / "celeba").is_dir() else root


def attribute_names(attr_file: Path) -> tuple[str, ...]:
    """The 40 attribute names: line 2 of list_attr_celeba.txt (line 1 is the image count)."""
    with open(attr_file) as f:
        f.readline()
        return tuple(f.readline().split())


def check(cfg: dict[str, Any]) -> None:
    root = require_root(cfg, "CelebA", _FIX.format(root="<root>"))
    base = base_dir(cfg)
    require_files(
        root,
        "CelebA",
        [base / n for n in FILES],
        f"{root}/celeba/" + ", ".join(FILES),
        _FIX.format(root=root),
    )
    attr = cfg.get("label_attr")
    names = attribute_names(base / "list_attr_celeba.txt")
    if attr not in names:
        raise ConfigError(
            "data.label_attr", attr, "is not a CelebA attribute", f"use one of {', '.join(names)}"
        )
    crop = cfg.get("crop_size")
    if crop is not None:
        require_int(cfg, "data", "crop_size", minimum=1)


def class_names(cfg: dict[str, Any]) -> tuple[str, ...]:
    attr = cfg["label_attr"]
    return (f"not_{attr}", attr)


@functools.cache
def _index(base: Path, attr: str, partition: str) -> tuple[tuple[str, ...], tuple[int, ...]]:
    """(file names, labels) of one partition; label 1 where the attribute is +1."""
    with open(base / "list_eval_partition.txt") as f:
        wanted = {
            name for name, part in (line.split() for line in f if line.strip()) if part == partition
        }
    with open(base / "list_attr_celeba.txt") as f:
        f.readline()
        column = f.readline().split().index(attr) + 1  # rows start with the file name
        rows = [line.split() for line in f if line.strip()]
    picked = [(row[0], int(row[column] == "1")) for row in rows if row[0] in wanted]
    return tuple(n for n, _ in picked), tuple(lab for _, lab in picked)


def build(cfg: dict[str, Any], split: str) -> FileImageDataset:
    base = base_dir(cfg)
    names, labels = _index(base, cfg["label_attr"], PARTITION[split])
    size, channels, crop = cfg["image_size"], cfg["channels"], cfg.get("crop_size")
    info = DatasetInfo("celeba", 2, class_names(cfg), channels, size)
    paths = [base / "img_align_celeba" / n for n in names]
    return FileImageDataset(
        paths,
        labels,
        info,
        functools.partial(pil_to_model, image_size=size, channels=channels, crop_size=crop),
    )


SPEC = DataSpec("celeba", check, class_names, build)
