"""``data=imagefolder``: any labelled image set exported as ``<root>/{train,test}/<class>/*.png``.

E.g. Camelyon17 patches. Classes are the sub-folders of ``train`` in sorted order (as
torchvision's ImageFolder does); ``test`` must use the same class names.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any

from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset

from dpgen.checks import require_int
from dpgen.data.dataset import DatasetInfo, FileImageDataset
from dpgen.data.registry import DataSpec
from dpgen.data.roots import require_root
from dpgen.data.transforms import pil_to_model
from dpgen.errors import ConfigError

_FIX = "export the images as {root}/train/<class>/*.png and {root}/test/<class>/*.png"


def _split_dir(cfg: dict[str, Any], split: str) -> Path:
    return Path(str(cfg["root"])).expanduser() / split


def _classes(directory: Path) -> list[str]:
    try:
        return find_classes(directory)[0]
    except FileNotFoundError:
        return []


def check(cfg: dict[str, Any]) -> None:
    root = require_root(cfg, "the image folder", _FIX.format(root="<root>"))
    fix = _FIX.format(root=root)
    train = _classes(root / "train")
    if not train:
        raise ConfigError(
            "data.root",
            str(root),
            f"no class folders found (expected {root}/train/<class>/*.png)",
            fix,
        )
    if not (root / "test").is_dir():
        raise ConfigError(
            "data.root", str(root), f"no test split found (expected {root}/test/<class>/*.png)", fix
        )
    # (make_dataset walks each class folder, subfolders included)
    empty = [c for c in train if not any(f.suffix.lower() in IMG_EXTENSIONS for f in (root / "train" / c).rglob("*"))]
    if empty:
        raise ConfigError("data.root", str(root), f"train/{empty[0]} holds no images"
                          f"{f' (nor do {len(empty) - 1} more class folders)' if len(empty) > 1 else ''}",
                          f"add images to {root}/train/{empty[0]}, or remove the folder")
    extra = sorted(set(_classes(root / "test")) - set(train))
    if extra:
        raise ConfigError(
            "data.root",
            str(root),
            f"test has classes absent from train: {', '.join(extra[:5])}",
            "use the same class folder names in train/ and test/",
        )
    if cfg.get("crop_size") is not None:
        require_int(cfg, "data", "crop_size", minimum=1)


def class_names(cfg: dict[str, Any]) -> tuple[str, ...]:
    return tuple(_classes(_split_dir(cfg, "train")))


def build(cfg: dict[str, Any], split: str) -> FileImageDataset:
    names = class_names(cfg)
    # Labels come from the train classes so they agree between splits even when the test
    # split lacks a class.
    samples = make_dataset(
        str(_split_dir(cfg, split)),
        {n: i for i, n in enumerate(names)},
        extensions=IMG_EXTENSIONS,
        allow_empty=split == "test",
    )
    size, channels, crop = cfg["image_size"], cfg["channels"], cfg.get("crop_size")
    info = DatasetInfo("imagefolder", len(names), names, channels, size)
    return FileImageDataset(
        [Path(p) for p, _ in samples],
        [label for _, label in samples],
        info,
        partial(pil_to_model, image_size=size, channels=channels, crop_size=crop),
    )


SPEC = DataSpec("imagefolder", check, class_names, build)
